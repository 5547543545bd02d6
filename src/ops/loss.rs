//! Per-sample losses: Bernoulli NLL with logits, diagonal Gaussian NLL and
//! softmax cross-entropy. Each returns shape `[N]`, the sum over every
//! non-batch axis, so a model can weight and average samples as it likes.

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use super::math::{sigmoid, softplus};
use super::{for_chunks, par_fill, par_fill_multi, row_sums, same_shapes, PAR_MIN};
use crate::autograd::{Graph, Var};
use crate::tensor::{fmt_shape, Storage, Tensor};

/// `log(2 pi)`.
const LN_2PI: f32 = 1.837_877_1;

/// `(rows, elements per row)` of a per-sample op's input, or an error.
fn per_sample(x: &Tensor, op: &str) -> Result<(usize, usize)> {
    ensure!(
        x.rank() >= 1 && x.dim(0) > 0,
        "{op}: expected a batch [N, ...] with N > 0, got shape {}",
        fmt_shape(x.shape())
    );
    Ok((x.dim(0), x.numel() / x.dim(0)))
}

// ---- Bernoulli NLL with logits ----

/// Per-sample `sum(softplus(x) - x t) = sum(max(x, 0) - x t + log(1 + e^-|x|))`: the negative
/// log-likelihood of targets `t` in `[0, 1]` under `Bernoulli(sigmoid(x))`,
/// without overflow for large `|x|`. A target outside `[0, 1]` is an error
/// on the CPU; on the GPU, which cannot check without a copy to the host,
/// it makes its sample's loss NaN.
pub fn bce_with_logits_forward(logits: &Tensor, target: &Tensor) -> Result<Tensor> {
    let rows = per_sample(logits, "bce_with_logits")?.0;
    same_shapes("bce_with_logits", ["logits", "target"], logits, target)?;
    match logits.storage() {
        Storage::Cuda(xs) => cuda::bce_with_logits(xs, target.cuda()?, rows),
        Storage::Cpu(_) => {
            let (xs, ts) = (logits.cpu()?, target.cpu()?);
            if let Some(i) = ts.iter().position(|t| !(0.0..=1.0).contains(t)) {
                bail!("bce_with_logits: target[{i}] = {} is outside [0, 1]", ts[i]);
            }
            let data = row_sums(logits.host(), rows, [xs, ts], |[x, t]| softplus(x) - x * t);
            Tensor::from_vec(data, &[rows], &logits.device())
        }
    }
}

/// `d/dx = g[n] * (sigmoid(x) - t)`.
pub fn bce_with_logits_backward(logits: &Tensor, target: &Tensor, g: &Tensor) -> Result<Tensor> {
    let d = logits.numel() / logits.dim(0);
    match logits.storage() {
        Storage::Cuda(xs) => cuda::bce_with_logits_backward(xs, target.cuda()?, g.cuda()?, d, logits.shape()),
        Storage::Cpu(_) => {
            let (xs, ts, gs) = (logits.cpu()?, target.cpu()?, g.cpu()?);
            let mut dx = logits.host().buffer(xs.len());
            for_chunks(&mut dx, d, |n, o| {
                let (x, t) = (&xs[n * d..][..d], &ts[n * d..][..d]);
                for j in 0..d {
                    o[j] = gs[n] * (sigmoid(x[j]) - t[j]);
                }
            });
            logits.same_shape(dx)
        }
    }
}

// ---- Gaussian NLL ----

/// Per-sample `sum 0.5 * (log 2pi + logvar + (x - mu)^2 / e^logvar)`: the
/// negative log-density of `x` under `N(mu, e^logvar)`.
pub fn gaussian_nll_forward(x: &Tensor, mu: &Tensor, logvar: &Tensor) -> Result<Tensor> {
    let rows = per_sample(mu, "gaussian_nll")?.0;
    same_shapes("gaussian_nll", ["x", "mu"], x, mu)?;
    same_shapes("gaussian_nll", ["mu", "logvar"], mu, logvar)?;
    match mu.storage() {
        Storage::Cuda(ms) => cuda::gaussian_nll(x.cuda()?, ms, logvar.cuda()?, rows),
        Storage::Cpu(_) => {
            let (xs, ms, ls) = (x.cpu()?, mu.cpu()?, logvar.cpu()?);
            let data = row_sums(x.host(), rows, [xs, ms, ls], |[x, m, l]| {
                0.5 * (LN_2PI + l + (x - m) * (x - m) * (-l).exp())
            });
            Tensor::from_vec(data, &[rows], &mu.device())
        }
    }
}

/// Gradients `(d mu, d logvar)` in one pass.
pub fn gaussian_nll_backward(
    x: &Tensor,
    mu: &Tensor,
    logvar: &Tensor,
    g: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let d = mu.numel() / mu.dim(0);
    match mu.storage() {
        Storage::Cuda(ms) => {
            cuda::gaussian_nll_backward(x.cuda()?, ms, logvar.cuda()?, g.cuda()?, d, mu.shape())
        }
        Storage::Cpu(_) => {
            let (xs, ms, ls, gs) = (x.cpu()?, mu.cpu()?, logvar.cpu()?, g.cpu()?);
            let [dmu, dlv] = par_fill_multi(mu.host(), ms.len(), |i| {
                let gn = gs[i / d];
                let scaled = (ms[i] - xs[i]) * (-ls[i]).exp();
                [gn * scaled, gn * 0.5 * (1.0 - (ms[i] - xs[i]) * scaled)]
            });
            Ok((mu.same_shape(dmu)?, logvar.same_shape(dlv)?))
        }
    }
}

// ---- Softmax cross-entropy ----

/// Check `logits [N, K]` against `labels` (length N, each < K).
fn check_labels(logits: &Tensor, labels: &[usize]) -> Result<(usize, usize)> {
    ensure!(
        logits.rank() == 2,
        "softmax_cross_entropy: logits must be [N, K], got {}",
        fmt_shape(logits.shape())
    );
    let (n, k) = (logits.dim(0), logits.dim(1));
    ensure!(
        labels.len() == n,
        "softmax_cross_entropy: {} labels for logits {} (need one per row)",
        labels.len(),
        fmt_shape(logits.shape())
    );
    if let Some(i) = labels.iter().position(|&y| y >= k) {
        bail!(
            "softmax_cross_entropy: label[{i}] = {} is not a class of logits {} (need < {k})",
            labels[i],
            fmt_shape(logits.shape())
        );
    }
    Ok((n, k))
}

/// `log sum_j e^{x_j}` of each row of length `k`, shifted by the row max.
fn row_logsumexp(xs: &[f32], rows: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; rows];
    out.par_iter_mut()
        .with_min_len((PAR_MIN / k.max(1)).max(1))
        .enumerate()
        .for_each(|(n, o)| {
            let row = &xs[n * k..(n + 1) * k];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let s: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
            *o = m + s.ln() as f32;
        });
    out
}

/// Per-sample `logsumexp(x_n) - x_n[y_n]`; also returns the row log-sum-exps
/// `[N]` that backward reuses.
pub fn softmax_cross_entropy_forward(logits: &Tensor, labels: &[usize]) -> Result<(Tensor, Tensor)> {
    let (n, k) = check_labels(logits, labels)?;
    match logits.storage() {
        Storage::Cuda(xs) => cuda::softmax_cross_entropy(xs, labels, (n, k)),
        Storage::Cpu(_) => {
            let xs = logits.cpu()?;
            let lse = row_logsumexp(xs, n, k);
            let loss = (0..n).map(|i| lse[i] - xs[i * k + labels[i]]).collect();
            let dev = logits.device();
            Ok((
                Tensor::from_vec(loss, &[n], &dev)?,
                Tensor::from_vec(lse, &[n], &dev)?,
            ))
        }
    }
}

/// `d/dx = g[n] * (softmax(x_n) - onehot(y_n))`.
pub fn softmax_cross_entropy_backward(
    logits: &Tensor,
    labels: &[usize],
    lse: &Tensor,
    g: &Tensor,
) -> Result<Tensor> {
    let k = logits.dim(1);
    match logits.storage() {
        Storage::Cuda(xs) => {
            cuda::softmax_cross_entropy_backward(xs, labels, lse.cuda()?, g.cuda()?, logits.shape())
        }
        Storage::Cpu(_) => {
            let (xs, ls, gs) = (logits.cpu()?, lse.cpu()?, g.cpu()?);
            logits.same_shape(par_fill(logits.host(), xs.len(), |i| {
                let (n, j) = (i / k, i % k);
                gs[n] * ((xs[i] - ls[n]).exp() - (j == labels[n]) as u8 as f32)
            }))
        }
    }
}

/// Softmax over the last axis (class probabilities for prediction).
pub fn softmax(logits: &Tensor) -> Result<Tensor> {
    ensure!(
        logits.rank() >= 1 && logits.dim(-1) > 0,
        "softmax: needs a non-empty last axis, got shape {}",
        fmt_shape(logits.shape())
    );
    let k = logits.dim(-1);
    let rows = logits.numel() / k;
    match logits.storage() {
        Storage::Cuda(xs) => cuda::softmax(xs, rows, logits.shape()),
        Storage::Cpu(_) => {
            let xs = logits.cpu()?;
            let lse = row_logsumexp(xs, rows, k);
            logits.same_shape(par_fill(logits.host(), xs.len(), |i| (xs[i] - lse[i / k]).exp()))
        }
    }
}

/// Softmax's vector-Jacobian product from its output `y`:
/// `dx = y * (g - sum_j g_j y_j)` per row of the last axis.
pub fn softmax_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    let k = y.dim(-1);
    match y.storage() {
        Storage::Cuda(ys) => cuda::softmax_backward(ys, g.cuda()?, ys.len() / k, y.shape()),
        Storage::Cpu(_) => {
            let (ys, gs) = (y.cpu()?, g.cpu()?);
            let dots = row_sums(y.host(), ys.len() / k, [gs, ys], |[g, y]| g * y);
            y.same_shape(par_fill(y.host(), ys.len(), |i| ys[i] * (gs[i] - dots[i / k])))
        }
    }
}

/// Launchers of kernels/loss.cu.
mod cuda {
    use anyhow::{ensure, Result};
    use cudarc::driver::LaunchConfig;

    use crate::device::cuda::{grid, launch, CudaDevice, CudaStorage, BLOCK};
    use crate::tensor::Tensor;

    /// One block of `BLOCK` threads per row (`block_row_sum` in the kernels).
    fn block_per_row(rows: usize) -> Result<LaunchConfig> {
        grid(rows)?;
        Ok(LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    pub(super) fn bce_with_logits(x: &CudaStorage, t: &CudaStorage, rows: usize) -> Result<Tensor> {
        let dev = x.device();
        let mut out = dev.alloc(rows)?;
        let d = (x.len() / rows) as i32;
        launch!(
            &dev,
            "loss",
            "bce_with_logits",
            block_per_row(rows)?,
            x.slice(),
            t.slice(),
            out.slice_mut(),
            &d
        );
        Ok(Tensor::from_cuda(out, &[rows]))
    }

    pub(super) fn bce_with_logits_backward(
        x: &CudaStorage,
        t: &CudaStorage,
        g: &CudaStorage,
        d: usize,
        shape: &[usize],
    ) -> Result<Tensor> {
        let (dev, n) = (x.device(), x.len());
        let mut dx = dev.alloc(n)?;
        launch!(
            &dev,
            "loss",
            "bce_with_logits_backward",
            grid(n)?,
            x.slice(),
            t.slice(),
            g.slice(),
            dx.slice_mut(),
            &(n as i32),
            &(d as i32)
        );
        Ok(Tensor::from_cuda(dx, shape))
    }

    pub(super) fn gaussian_nll(
        x: &CudaStorage,
        mu: &CudaStorage,
        lv: &CudaStorage,
        rows: usize,
    ) -> Result<Tensor> {
        let dev = mu.device();
        let mut out = dev.alloc(rows)?;
        let d = (mu.len() / rows) as i32;
        launch!(
            &dev,
            "loss",
            "gaussian_nll",
            block_per_row(rows)?,
            x.slice(),
            mu.slice(),
            lv.slice(),
            out.slice_mut(),
            &d
        );
        Ok(Tensor::from_cuda(out, &[rows]))
    }

    pub(super) fn gaussian_nll_backward(
        x: &CudaStorage,
        mu: &CudaStorage,
        lv: &CudaStorage,
        g: &CudaStorage,
        d: usize,
        shape: &[usize],
    ) -> Result<(Tensor, Tensor)> {
        let (dev, n) = (mu.device(), mu.len());
        let (mut dmu, mut dlv) = (dev.alloc(n)?, dev.alloc(n)?);
        launch!(
            &dev,
            "loss",
            "gaussian_nll_backward",
            grid(n)?,
            x.slice(),
            mu.slice(),
            lv.slice(),
            g.slice(),
            dmu.slice_mut(),
            dlv.slice_mut(),
            &(n as i32),
            &(d as i32)
        );
        Ok((Tensor::from_cuda(dmu, shape), Tensor::from_cuda(dlv, shape)))
    }

    /// The labels on the device as floats (exact below 2^24 classes).
    fn upload_labels(dev: &CudaDevice, labels: &[usize], k: usize) -> Result<CudaStorage> {
        ensure!(
            k <= 1 << 24,
            "softmax_cross_entropy: {k} classes exceed the CUDA kernel's 2^24"
        );
        let as_f32: Vec<f32> = labels.iter().map(|&y| y as f32).collect();
        dev.upload(&as_f32)
    }

    /// `(loss, lse)`, both `[n]`, of logits `[n, k]`.
    pub(super) fn softmax_cross_entropy(
        x: &CudaStorage,
        labels: &[usize],
        (n, k): (usize, usize),
    ) -> Result<(Tensor, Tensor)> {
        let dev = x.device();
        let ys = upload_labels(&dev, labels, k)?;
        let (mut loss, mut lse) = (dev.alloc(n)?, dev.alloc(n)?);
        launch!(
            &dev,
            "loss",
            "softmax_cross_entropy",
            grid(n)?,
            x.slice(),
            ys.slice(),
            loss.slice_mut(),
            lse.slice_mut(),
            &(n as i32),
            &(k as i32)
        );
        Ok((Tensor::from_cuda(loss, &[n]), Tensor::from_cuda(lse, &[n])))
    }

    pub(super) fn softmax_cross_entropy_backward(
        x: &CudaStorage,
        labels: &[usize],
        lse: &CudaStorage,
        g: &CudaStorage,
        shape: &[usize],
    ) -> Result<Tensor> {
        let (dev, n, k) = (x.device(), x.len(), shape[1]);
        let ys = upload_labels(&dev, labels, k)?;
        let mut dx = dev.alloc(n)?;
        launch!(
            &dev,
            "loss",
            "softmax_cross_entropy_backward",
            grid(n)?,
            x.slice(),
            ys.slice(),
            lse.slice(),
            g.slice(),
            dx.slice_mut(),
            &(n as i32),
            &(k as i32)
        );
        Ok(Tensor::from_cuda(dx, shape))
    }

    /// Softmax over the last axis of `shape` (its length from the shape, not
    /// `len / rows`: a tensor with no rows, `[0, k]`, is valid).
    pub(super) fn softmax(x: &CudaStorage, rows: usize, shape: &[usize]) -> Result<Tensor> {
        let (dev, k) = (x.device(), shape[shape.len() - 1]);
        let mut y = dev.alloc(x.len())?;
        launch!(
            &dev,
            "loss",
            "softmax",
            grid(rows)?,
            x.slice(),
            y.slice_mut(),
            &(rows as i32),
            &(k as i32)
        );
        Ok(Tensor::from_cuda(y, shape))
    }

    pub(super) fn softmax_backward(
        y: &CudaStorage,
        g: &CudaStorage,
        rows: usize,
        shape: &[usize],
    ) -> Result<Tensor> {
        let (dev, k) = (y.device(), shape[shape.len() - 1]);
        let mut dx = dev.alloc(y.len())?;
        launch!(
            &dev,
            "loss",
            "softmax_backward",
            grid(rows)?,
            y.slice(),
            g.slice(),
            dx.slice_mut(),
            &(rows as i32),
            &(k as i32)
        );
        Ok(Tensor::from_cuda(dx, shape))
    }
}

impl Graph {
    /// Softmax over the last axis.
    pub fn softmax(&mut self, x: Var) -> Result<Var> {
        let y = softmax(self.value(x))?;
        let yv = y.clone();
        Ok(self.record(y, &[x], move |g| Ok(vec![Some(softmax_backward(&yv, g)?)])))
    }

    /// Per-sample Bernoulli NLL of `target` (constant, values in `[0, 1]`)
    /// under logits; shape `[N]`.
    pub fn bce_with_logits(&mut self, logits: Var, target: &Tensor) -> Result<Var> {
        let xv = self.value(logits).clone();
        let y = bce_with_logits_forward(&xv, target)?;
        let tv = target.clone();
        Ok(self.record(y, &[logits], move |g| {
            Ok(vec![Some(bce_with_logits_backward(&xv, &tv, g)?)])
        }))
    }

    /// Per-sample NLL of constant `x` under `N(mu, e^logvar)`; shape `[N]`.
    pub fn gaussian_nll(&mut self, x: &Tensor, mu: Var, logvar: Var) -> Result<Var> {
        let (mv, lv) = (self.value(mu).clone(), self.value(logvar).clone());
        let y = gaussian_nll_forward(x, &mv, &lv)?;
        let xv = x.clone();
        Ok(self.record(y, &[mu, logvar], move |g| {
            let (dmu, dlv) = gaussian_nll_backward(&xv, &mv, &lv, g)?;
            Ok(vec![Some(dmu), Some(dlv)])
        }))
    }

    /// Per-sample cross-entropy of `labels` under `softmax(logits)`,
    /// logits `[N, K]`; shape `[N]`.
    pub fn softmax_cross_entropy(&mut self, logits: Var, labels: &[usize]) -> Result<Var> {
        let xv = self.value(logits).clone();
        let (y, lse) = softmax_cross_entropy_forward(&xv, labels)?;
        let labels = labels.to_vec();
        Ok(self.record(y, &[logits], move |g| {
            Ok(vec![Some(softmax_cross_entropy_backward(&xv, &labels, &lse, g)?)])
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_op, rand_tensor, rng, Check};
    use crate::Device;

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn bce_with_logits_matches_hand_values_and_is_stable() {
        let dev = Device::cpu();
        // Row 0: x = 0 gives ln 2 for any t; row 1: -ln sigmoid(2) and
        // -ln(1 - sigmoid(-1)) = ln(1 + e^-2) + ln(1 + e^-1); row 2: huge
        // logits with the matching target cost ~0, the wrong one cost |x|.
        let x = Tensor::from_vec(vec![0.0, 0.0, 2.0, -1.0, 100.0, -100.0], &[3, 2], &dev).unwrap();
        let t = Tensor::from_vec(vec![1.0, 0.3, 1.0, 0.0, 1.0, 1.0], &[3, 2], &dev).unwrap();
        let y = bce_with_logits_forward(&x, &t).unwrap().to_vec().unwrap();
        let ln2 = 2f32.ln();
        let r1 = (-2f32).exp().ln_1p() + (-1f32).exp().ln_1p();
        close(&y, &[2.0 * ln2, r1, 100.0], 1e-5);
        // Soft target: x = 1, t = 0.25 gives softplus(1) - 0.25.
        let x = Tensor::from_vec(vec![1.0], &[1], &dev).unwrap();
        let t = Tensor::from_vec(vec![0.25], &[1], &dev).unwrap();
        let want = 1f32.exp().ln_1p() - 0.25;
        close(
            &bce_with_logits_forward(&x, &t).unwrap().to_vec().unwrap(),
            &[want],
            1e-6,
        );
    }

    #[test]
    fn bce_with_logits_rejects_bad_targets_and_shapes() {
        let dev = Device::cpu();
        let x = rand_tensor(&[2, 3], 1, &dev);
        let e = bce_with_logits_forward(&x, &Tensor::full(&[2, 3], 1.5, &dev)).unwrap_err();
        assert!(e.to_string().contains("outside [0, 1]"), "{e}");
        let e = bce_with_logits_forward(&x, &Tensor::zeros(&[3, 2], &dev)).unwrap_err();
        assert!(e.to_string().contains("[3, 2]"), "{e}");
    }

    #[test]
    fn gradcheck_bce_with_logits() {
        let dev = Device::cpu();
        let x = Tensor::uniform(&[3, 5, 3], -4.0, 4.0, &mut rng(1), &dev);
        let t = Tensor::uniform(&[3, 5, 3], 0.0, 1.0, &mut rng(2), &dev);
        check_op(&[x], Check::default(), |g, v| g.bce_with_logits(v[0], &t)).unwrap();
    }

    #[test]
    fn gaussian_nll_matches_hand_values() {
        let dev = Device::cpu();
        // Standard normal at 0: 0.5 ln 2pi. x = 3, mu = 1, var = e^2:
        // 0.5 (ln 2pi + 2 + 4 e^-2).
        let x = Tensor::from_vec(vec![0.0, 3.0], &[1, 2], &dev).unwrap();
        let mu = Tensor::from_vec(vec![0.0, 1.0], &[1, 2], &dev).unwrap();
        let lv = Tensor::from_vec(vec![0.0, 2.0], &[1, 2], &dev).unwrap();
        let y = gaussian_nll_forward(&x, &mu, &lv).unwrap().to_vec().unwrap();
        let want = 0.5 * LN_2PI + 0.5 * (LN_2PI + 2.0 + 4.0 * (-2f32).exp());
        close(&y, &[want], 1e-6);
        assert!((LN_2PI as f64 - (2.0 * std::f64::consts::PI).ln()).abs() < 1e-6);
        let e = gaussian_nll_forward(&x, &mu, &Tensor::zeros(&[2, 1], &dev)).unwrap_err();
        assert!(e.to_string().contains("logvar"), "{e}");
    }

    #[test]
    fn gradcheck_gaussian_nll() {
        let dev = Device::cpu();
        let x = rand_tensor(&[3, 7], 1, &dev);
        let mu = rand_tensor(&[3, 7], 2, &dev);
        let lv = Tensor::uniform(&[3, 7], -1.0, 1.0, &mut rng(3), &dev);
        check_op(&[mu, lv], Check::default(), |g, v| g.gaussian_nll(&x, v[0], v[1])).unwrap();
    }

    #[test]
    fn softmax_cross_entropy_matches_hand_values() {
        let dev = Device::cpu();
        // Equal logits over 4 classes: ln 4. Logits (0, ln 2, 0, 0), label 1:
        // -ln(2/5). Huge logits stay finite.
        let x = Tensor::from_vec(
            vec![
                2.0,
                2.0,
                2.0,
                2.0,
                0.0,
                2f32.ln(),
                0.0,
                0.0,
                1000.0,
                0.0,
                0.0,
                0.0,
            ],
            &[3, 4],
            &dev,
        )
        .unwrap();
        let (y, _) = softmax_cross_entropy_forward(&x, &[3, 1, 1]).unwrap();
        let r1 = -(0.4f32).ln();
        close(&y.to_vec().unwrap(), &[4f32.ln(), r1, 1000.0], 1e-5);
        let p = softmax(&x).unwrap().to_vec().unwrap();
        close(&p[..8], &[0.25, 0.25, 0.25, 0.25, 0.2, 0.4, 0.2, 0.2], 1e-6);
        close(&p[8..], &[1.0, 0.0, 0.0, 0.0], 1e-6);
    }

    #[test]
    fn softmax_cross_entropy_rejects_bad_labels() {
        let dev = Device::cpu();
        let x = rand_tensor(&[2, 3], 1, &dev);
        let mut g = Graph::new();
        let v = g.leaf(x);
        let e = g.softmax_cross_entropy(v, &[0, 3]).unwrap_err();
        assert!(e.to_string().contains("label[1] = 3"), "{e}");
        let e = g.softmax_cross_entropy(v, &[0]).unwrap_err();
        assert!(e.to_string().contains("1 labels"), "{e}");
        let v3 = g.leaf(rand_tensor(&[2, 3, 1], 1, &dev));
        assert!(g.softmax_cross_entropy(v3, &[0, 1]).is_err());
    }

    #[test]
    fn gradcheck_softmax_cross_entropy() {
        let dev = Device::cpu();
        let x = rand_tensor(&[3, 5], 1, &dev);
        check_op(&[x], Check::default(), |g, v| {
            g.softmax_cross_entropy(v[0], &[4, 0, 2])
        })
        .unwrap();
    }

    #[test]
    fn gradcheck_softmax() {
        let dev = Device::cpu();
        let x = rand_tensor(&[2, 3, 7], 2, &dev);
        check_op(&[x], Check::default(), |g, v| g.softmax(v[0])).unwrap();
    }

    #[test]
    fn row_helpers_match_serial_loops_above_the_thread_threshold() {
        let dev = crate::device::CpuDevice::new();
        let (rows, d) = (3, PAR_MIN + 17);
        let f = |i: usize| ((i % 7) as f32 - 3.0) * 0.5;
        let xs: Vec<f32> = (0..rows * d).map(f).collect();
        let sums = row_sums(&dev, rows, [&xs], |[x]| x);
        for (n, s) in sums.iter().enumerate() {
            let want: f64 = (n * d..(n + 1) * d).map(|i| f(i) as f64).sum();
            assert!((*s as f64 - want).abs() < 1e-3);
        }
        let [a, b] = par_fill_multi(&dev, rows * d, |i| [f(i), 2.0 * f(i)]);
        assert!((0..rows * d).all(|i| a[i] == f(i) && b[i] == 2.0 * f(i)));
    }
}
