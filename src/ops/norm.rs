//! Group and batch normalization (PyTorch semantics, biased variance when
//! normalizing). Both view `x` as `[N, C, S]` planes (`S` = spatial size, 1
//! for `[N, C]`) and differ only in which planes share statistics: group
//! norm pools the `C / G` channels of a group within one sample, batch norm
//! pools one channel across the batch. So one forward and one backward
//! serve both, each a pass of per-plane sums and a pass of per-plane
//! `y = a * x + b` maps.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::elementwise::{binary_forward, unary_forward, Binary, Unary};
use super::{for_chunks, PAR_MIN};
use crate::autograd::{Graph, Var};
use crate::device::CpuDevice;
use crate::tensor::{fmt_shape, Storage, Tensor};

/// Which planes share statistics.
#[derive(Clone, Copy, Debug)]
enum Pooling {
    /// Group norm with this many groups: statistics per (sample, group).
    Groups(usize),
    /// Batch norm: statistics per channel.
    Channels,
}

#[derive(Clone, Copy, Debug)]
struct Layout {
    n: usize,
    c: usize,
    s: usize,
    pooling: Pooling,
}

impl Layout {
    fn new(x: &Tensor, pooling: Pooling) -> Layout {
        let (n, c) = (x.dim(0), x.dim(1));
        Layout {
            n,
            c,
            s: x.numel() / (n * c).max(1),
            pooling,
        }
    }

    /// The statistics index of plane `p = n * C + c`.
    fn stat(&self, p: usize) -> usize {
        let (n, c) = (p / self.c, p % self.c);
        match self.pooling {
            Pooling::Groups(g) => n * g + c / (self.c / g),
            Pooling::Channels => c,
        }
    }

    fn num_stats(&self) -> usize {
        match self.pooling {
            Pooling::Groups(g) => self.n * g,
            Pooling::Channels => self.c,
        }
    }

    /// Elements pooled into one statistic.
    fn pooled(&self) -> usize {
        self.n * self.c * self.s / self.num_stats().max(1)
    }
}

/// Per-plane `(sum a, sum a * b)` in f64 over `S`-element planes. Each sum
/// runs in `LANES` interleaved partial sums so the loop vectorizes; f64 makes
/// the reassociation invisible at f32 precision.
fn plane_sums(l: Layout, a: &[f32], b: &[f32]) -> Vec<(f64, f64)> {
    const LANES: usize = 8;
    let mut out = vec![(0.0, 0.0); l.n * l.c];
    out.par_iter_mut()
        .with_min_len((PAR_MIN / l.s.max(1)).max(1))
        .enumerate()
        .for_each(|(p, o)| {
            let (a, b) = (&a[p * l.s..][..l.s], &b[p * l.s..][..l.s]);
            let (mut sa, mut sab) = ([0.0f64; LANES], [0.0f64; LANES]);
            for (ca, cb) in a.chunks(LANES).zip(b.chunks(LANES)) {
                for k in 0..ca.len() {
                    let (x, y) = (ca[k] as f64, cb[k] as f64);
                    sa[k] += x;
                    sab[k] += x * y;
                }
            }
            *o = (sa.iter().sum(), sab.iter().sum());
        });
    out
}

/// `out[i] = f(coef[p], x[i], y[i])` for `i` in plane `p`: the per-plane
/// coefficients read once per plane rather than through a division per
/// element.
fn plane_map<C: Copy + Sync>(
    dev: &CpuDevice,
    s: usize,
    coef: &[C],
    (x, y): (&[f32], &[f32]),
    f: impl Fn(C, f32, f32) -> f32 + Sync,
) -> Vec<f32> {
    let mut out = dev.buffer(x.len());
    for_chunks(&mut out, s.max(1), |p, o| {
        let (x, y) = (&x[p * s..][..s], &y[p * s..][..s]);
        for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
            *o = f(coef[p], x, y);
        }
    });
    out
}

/// Per-plane sums pooled into the statistics they belong to.
fn pool(l: Layout, planes: &[(f64, f64)], weight: impl Fn(usize) -> f64) -> Vec<(f64, f64)> {
    let mut out = vec![(0.0, 0.0); l.num_stats()];
    for (p, &(a, b)) in planes.iter().enumerate() {
        let (w, o) = (weight(p), &mut out[l.stat(p)]);
        o.0 += w * a;
        o.1 += w * b;
    }
    out
}

/// Mean and biased variance per statistic, as host vectors.
fn stats_cpu(xs: &[f32], l: Layout) -> (Vec<f32>, Vec<f32>) {
    let planes = plane_sums(l, xs, xs);
    let m = l.pooled() as f64;
    pool(l, &planes, |_| 1.0)
        .into_iter()
        .map(|(s, ss)| {
            let mean = s / m;
            (mean as f32, (ss / m - mean * mean).max(0.0) as f32)
        })
        .unzip()
}

/// `y = (x - mean) * rstd * gamma + beta` with per-statistic `mean`, `rstd`.
fn normalize_cpu(
    dev: &CpuDevice,
    xs: &[f32],
    l: Layout,
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    rstd: &[f32],
) -> Vec<f32> {
    // Per plane (mean, gamma * rstd, beta); subtracting the mean before
    // scaling keeps precision when |mean| >> std.
    let coef: Vec<(f32, f32, f32)> = (0..l.n * l.c)
        .map(|p| {
            let (c, k) = (p % l.c, l.stat(p));
            (mean[k], gamma[c] * rstd[k], beta[c])
        })
        .collect();
    plane_map(dev, l.s, &coef, (xs, xs), |(m, a, b), x, _| (x - m) * a + b)
}

/// `(dx, dgamma, dbeta)`. With `through_stats` the mean and variance are
/// functions of `x` (group norm, batch norm in training) and their gradient
/// is folded into per-statistic coefficients,
/// `dx = dy * gamma * rstd + (x - mean) * P + Q` (PyTorch's formulation, with
/// the mean subtracted first for precision); without, `dx = dy * gamma * rstd`.
#[allow(clippy::too_many_arguments)]
fn backward_cpu(
    dev: &CpuDevice,
    xs: &[f32],
    gy: &[f32],
    l: Layout,
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    through_stats: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let planes = plane_sums(l, gy, xs);
    let (mut dgamma, mut dbeta) = (vec![0.0f64; l.c], vec![0.0f64; l.c]);
    for (p, &(sdy, sdyx)) in planes.iter().enumerate() {
        let (c, k) = (p % l.c, l.stat(p));
        dbeta[c] += sdy;
        // sum dy * xhat = rstd * (sum dy x - mean * sum dy).
        dgamma[c] += rstd[k] as f64 * (sdyx - mean[k] as f64 * sdy);
    }
    let mut pq = vec![(0.0f32, 0.0f32); l.num_stats()];
    if through_stats {
        let m = l.pooled() as f64;
        let sums = pool(l, &planes, |p| gamma[p % l.c] as f64);
        for (k, (db, ds)) in sums.into_iter().enumerate() {
            let (mu, r) = (mean[k] as f64, rstd[k] as f64);
            // dx = rstd * (g - mean(g) - xhat * mean(g xhat)) with g = gamma dy,
            // so P = -rstd^2 * mean(g xhat) and Q = -rstd * mean(g).
            pq[k] = ((-r * r * r * (ds - mu * db) / m) as f32, (-r * db / m) as f32);
        }
    }
    let coef: Vec<(f32, f32, f32, f32)> = (0..l.n * l.c)
        .map(|p| {
            let k = l.stat(p);
            (gamma[p % l.c] * rstd[k], mean[k], pq[k].0, pq[k].1)
        })
        .collect();
    let dx = plane_map(dev, l.s, &coef, (xs, gy), |(a, m, p, q), x, gy| {
        gy * a + (x - m) * p + q
    });
    let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    (dx, f32s(dgamma), f32s(dbeta))
}

/// `gamma` and `beta` must be `[C]`.
fn check_affine(op: &str, x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<()> {
    let c = x.dim(1);
    ensure!(
        gamma.shape() == [c] && beta.shape() == [c],
        "{op}: gamma {} and beta {} must be [C] = [{c}] for x {}",
        fmt_shape(gamma.shape()),
        fmt_shape(beta.shape()),
        fmt_shape(x.shape())
    );
    Ok(())
}

/// Per-statistic mean and biased variance as tensors of `shape`.
fn stats(x: &Tensor, l: Layout, shape: &[usize]) -> Result<(Tensor, Tensor)> {
    match x.storage() {
        Storage::Cuda(xs) => cuda::stats(xs, l, shape),
        Storage::Cpu(_) => {
            let (mean, var) = stats_cpu(x.cpu()?, l);
            let dev = x.device();
            Ok((
                Tensor::from_vec(mean, shape, &dev)?,
                Tensor::from_vec(var, shape, &dev)?,
            ))
        }
    }
}

/// `1 / sqrt(var + eps)`.
fn rstd_of(var: &Tensor, eps: f32) -> Result<Tensor> {
    match var.storage() {
        Storage::Cuda(vs) => cuda::rstd(vs, eps, var.shape()),
        Storage::Cpu(_) => var.same_shape(var.cpu()?.iter().map(|v| 1.0 / (v + eps).sqrt()).collect()),
    }
}

/// Shared forward on tensors: `y`, with `mean`/`rstd` given per statistic.
fn forward(
    x: &Tensor,
    l: Layout,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
) -> Result<Tensor> {
    match x.storage() {
        Storage::Cuda(xs) => cuda::forward(
            xs,
            l,
            [gamma.cuda()?, beta.cuda()?, mean.cuda()?, rstd.cuda()?],
            x.shape(),
        ),
        Storage::Cpu(_) => x.same_shape(normalize_cpu(
            x.host(),
            x.cpu()?,
            l,
            gamma.cpu()?,
            beta.cpu()?,
            mean.cpu()?,
            rstd.cpu()?,
        )),
    }
}

/// Shared backward on tensors: `(dx, dgamma, dbeta)`.
fn backward(
    x: &Tensor,
    l: Layout,
    gamma: &Tensor,
    (mean, rstd): (&Tensor, &Tensor),
    through_stats: bool,
    gy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    match x.storage() {
        Storage::Cuda(xs) => {
            let (dx, dg, db) = cuda::backward(
                xs,
                gy.cuda()?,
                l,
                [gamma.cuda()?, mean.cuda()?, rstd.cuda()?],
                through_stats,
            )?;
            Ok((
                Tensor::from_cuda(dx, x.shape()),
                Tensor::from_cuda(dg, gamma.shape()),
                Tensor::from_cuda(db, gamma.shape()),
            ))
        }
        Storage::Cpu(_) => {
            let (dx, dg, db) = backward_cpu(
                x.host(),
                x.cpu()?,
                gy.cpu()?,
                l,
                gamma.cpu()?,
                mean.cpu()?,
                rstd.cpu()?,
                through_stats,
            );
            Ok((x.same_shape(dx)?, gamma.same_shape(dg)?, gamma.same_shape(db)?))
        }
    }
}

// ---- Group norm ----

fn group_layout(x: &Tensor, gamma: &Tensor, beta: &Tensor, groups: usize) -> Result<Layout> {
    ensure!(
        x.rank() >= 2,
        "group_norm: x must be [N, C, ...], got {}",
        fmt_shape(x.shape())
    );
    ensure!(
        groups > 0 && x.dim(1).is_multiple_of(groups),
        "group_norm: {groups} groups do not divide the {} channels of x {}",
        x.dim(1),
        fmt_shape(x.shape())
    );
    check_affine("group_norm", x, gamma, beta)?;
    Ok(Layout::new(x, Pooling::Groups(groups)))
}

/// Group norm of `x [N, C, ...]` with `gamma`, `beta [C]`. Returns `y` and
/// the per-(sample, group) `mean` and `rstd = 1 / sqrt(var + eps)`, `[N, G]`,
/// that backward needs.
pub fn group_norm_forward(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let l = group_layout(x, gamma, beta, groups)?;
    let (mean, var) = stats(x, l, &[l.n, groups])?;
    let rstd = rstd_of(&var, eps)?;
    Ok((forward(x, l, gamma, beta, &mean, &rstd)?, mean, rstd))
}

/// `(dx, dgamma, dbeta)` of group norm from its saved `mean`, `rstd`.
pub fn group_norm_backward(
    x: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    groups: usize,
    gy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let l = Layout::new(x, Pooling::Groups(groups));
    backward(x, l, gamma, (mean, rstd), true, gy)
}

// ---- Batch norm ----

fn batch_layout(x: &Tensor) -> Result<Layout> {
    ensure!(
        x.rank() == 2 || x.rank() == 4,
        "batch_norm: x must be [N, C] or [N, C, H, W], got {}",
        fmt_shape(x.shape())
    );
    Ok(Layout::new(x, Pooling::Channels))
}

/// Per-channel batch mean and biased variance of `x [N, C]` or
/// `[N, C, H, W]`, each `[C]`.
pub fn batch_stats(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let l = batch_layout(x)?;
    stats(x, l, &[l.c])
}

/// Batch norm with given per-channel `mean` and `rstd` (batch statistics in
/// training, running statistics in evaluation).
pub fn batch_norm_forward(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
) -> Result<Tensor> {
    let l = batch_layout(x)?;
    check_affine("batch_norm", x, gamma, beta)?;
    mean.expect_shape(&[l.c], "batch_norm mean")?;
    rstd.expect_shape(&[l.c], "batch_norm rstd")?;
    forward(x, l, gamma, beta, mean, rstd)
}

/// `(dx, dgamma, dbeta)` of batch norm. `training` says whether `mean` and
/// `rstd` were the batch's own (so gradient flows through them) or running
/// statistics (a per-channel affine map).
pub fn batch_norm_backward(
    x: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    training: bool,
    gy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let l = Layout::new(x, Pooling::Channels);
    backward(x, l, gamma, (mean, rstd), training, gy)
}

/// Launchers of kernels/norm.cu.
mod cuda {
    use anyhow::{ensure, Result};
    use cudarc::driver::LaunchConfig;

    use super::{Layout, Pooling};
    use crate::device::cuda::{grid, launch, CudaStorage, BLOCK};
    use crate::tensor::Tensor;

    /// The elements that `pooling` groups together, for the one-block-per-
    /// segment reductions: `count` segments of `len` elements, element `j` of
    /// segment `k` at `k * first + (j / run) * step + j % run`.
    struct Segments {
        count: usize,
        len: i32,
        first: i64,
        run: i32,
        step: i64,
    }

    impl Segments {
        fn new(l: Layout, pooling: Pooling) -> Result<Segments> {
            let total = l.n * l.c * l.s;
            ensure!(
                total <= i32::MAX as usize,
                "{total} elements exceed the CUDA norm kernels' 32-bit indexing"
            );
            Ok(match pooling {
                // The C / G channels of one sample's group are contiguous.
                Pooling::Groups(g) => {
                    let len = l.c / g * l.s;
                    Segments {
                        count: l.n * g,
                        len: len as i32,
                        first: len as i64,
                        run: len as i32,
                        step: 0,
                    }
                }
                // One channel: a plane of S elements per sample, C * S apart.
                Pooling::Channels => Segments {
                    count: l.c,
                    len: (l.n * l.s) as i32,
                    first: l.s as i64,
                    run: l.s as i32,
                    step: (l.c * l.s) as i64,
                },
            })
        }

        /// One block of `BLOCK` threads per segment.
        fn launch_config(&self) -> LaunchConfig {
            LaunchConfig {
                grid_dim: (self.count as u32, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            }
        }
    }

    /// The kernels' `groups` argument: 0 pools channels across the batch.
    fn groups_arg(l: Layout) -> i32 {
        match l.pooling {
            Pooling::Groups(g) => g as i32,
            Pooling::Channels => 0,
        }
    }

    pub(super) fn stats(x: &CudaStorage, l: Layout, shape: &[usize]) -> Result<(Tensor, Tensor)> {
        let seg = Segments::new(l, l.pooling)?;
        let dev = x.device();
        let (mut mean, mut var) = (dev.alloc(seg.count)?, dev.alloc(seg.count)?);
        if seg.count > 0 {
            launch!(
                &dev,
                "norm",
                "norm_stats",
                seg.launch_config(),
                x.slice(),
                mean.slice_mut(),
                var.slice_mut(),
                &seg.len,
                &seg.first,
                &seg.run,
                &seg.step
            );
        }
        Ok((Tensor::from_cuda(mean, shape), Tensor::from_cuda(var, shape)))
    }

    pub(super) fn rstd(var: &CudaStorage, eps: f32, shape: &[usize]) -> Result<Tensor> {
        let (dev, n) = (var.device(), var.len());
        let mut out = dev.alloc(n)?;
        launch!(
            &dev,
            "norm",
            "norm_rstd",
            grid(n)?,
            var.slice(),
            out.slice_mut(),
            &(n as i32),
            &eps
        );
        Ok(Tensor::from_cuda(out, shape))
    }

    pub(super) fn forward(
        x: &CudaStorage,
        l: Layout,
        [gamma, beta, mean, rstd]: [&CudaStorage; 4],
        shape: &[usize],
    ) -> Result<Tensor> {
        let (dev, n) = (x.device(), x.len());
        let mut y = dev.alloc(n)?;
        launch!(
            &dev,
            "norm",
            "norm_forward",
            grid(n)?,
            x.slice(),
            gamma.slice(),
            beta.slice(),
            mean.slice(),
            rstd.slice(),
            y.slice_mut(),
            &(n as i32),
            &(l.c as i32),
            &(l.s as i32),
            &groups_arg(l)
        );
        Ok(Tensor::from_cuda(y, shape))
    }

    /// Per segment of `pooling`: `(sum w * gy, sum w * gy * xhat)` with `w`
    /// gamma when `weighted`, else 1.
    fn backward_sums(
        x: &CudaStorage,
        gy: &CudaStorage,
        l: Layout,
        [gamma, mean, rstd]: [&CudaStorage; 3],
        pooling: Pooling,
        weighted: bool,
    ) -> Result<(CudaStorage, CudaStorage)> {
        let seg = Segments::new(l, pooling)?;
        let dev = x.device();
        let (mut a, mut b) = (dev.alloc(seg.count)?, dev.alloc(seg.count)?);
        if seg.count > 0 {
            launch!(
                &dev,
                "norm",
                "norm_backward_sums",
                seg.launch_config(),
                x.slice(),
                gy.slice(),
                gamma.slice(),
                mean.slice(),
                rstd.slice(),
                a.slice_mut(),
                b.slice_mut(),
                &seg.len,
                &seg.first,
                &seg.run,
                &seg.step,
                &(l.c as i32),
                &(l.s as i32),
                &groups_arg(l),
                &(weighted as i32)
            );
        }
        Ok((a, b))
    }

    /// `(dx, dgamma, dbeta)`: per-channel sums give `dbeta` and `dgamma`;
    /// with `through_stats`, gamma-weighted sums per statistic give the
    /// terms of `dx` that flow through the mean and variance (else zeros).
    pub(super) fn backward(
        x: &CudaStorage,
        gy: &CudaStorage,
        l: Layout,
        [gamma, mean, rstd]: [&CudaStorage; 3],
        through_stats: bool,
    ) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
        let params = [gamma, mean, rstd];
        let (dbeta, dgamma) = backward_sums(x, gy, l, params, Pooling::Channels, false)?;
        let (a, b) = if through_stats {
            backward_sums(x, gy, l, params, l.pooling, true)?
        } else {
            let dev = x.device();
            let (mut a, mut b) = (dev.alloc(l.num_stats())?, dev.alloc(l.num_stats())?);
            a.fill(0.0)?;
            b.fill(0.0)?;
            (a, b)
        };
        let (dev, n) = (x.device(), x.len());
        let mut dx = dev.alloc(n)?;
        launch!(
            &dev,
            "norm",
            "norm_backward_dx",
            grid(n)?,
            x.slice(),
            gy.slice(),
            gamma.slice(),
            mean.slice(),
            rstd.slice(),
            a.slice(),
            b.slice(),
            dx.slice_mut(),
            &(n as i32),
            &(l.c as i32),
            &(l.s as i32),
            &groups_arg(l),
            &(l.pooled() as i32)
        );
        Ok((dx, dgamma, dbeta))
    }
}

impl Graph {
    /// Group norm of `x [N, C, ...]`, `gamma`, `beta [C]`; `groups` divides C.
    pub fn group_norm(&mut self, x: Var, gamma: Var, beta: Var, groups: usize, eps: f32) -> Result<Var> {
        let (xv, gv) = (self.value(x).clone(), self.value(gamma).clone());
        let (y, mean, rstd) = group_norm_forward(&xv, &gv, self.value(beta), groups, eps)?;
        Ok(self.record(y, &[x, gamma, beta], move |g| {
            let (dx, dg, db) = group_norm_backward(&xv, &gv, &mean, &rstd, groups, g)?;
            Ok(vec![Some(dx), Some(dg), Some(db)])
        }))
    }

    /// Batch norm of `x [N, C]` or `[N, C, H, W]`. In training it normalizes
    /// with the batch's statistics (biased variance) and also returns the
    /// updated running statistics `(1 - momentum) * running + momentum *
    /// batch`, with the unbiased batch variance for `running_var` (PyTorch).
    /// In evaluation it uses the running statistics and returns `None`.
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm(
        &mut self,
        x: Var,
        gamma: Var,
        beta: Var,
        running_mean: &Tensor,
        running_var: &Tensor,
        training: bool,
        momentum: f32,
        eps: f32,
    ) -> Result<(Var, Option<(Tensor, Tensor)>)> {
        let (xv, gv) = (self.value(x).clone(), self.value(gamma).clone());
        let l = batch_layout(&xv)?;
        check_affine("batch_norm", &xv, &gv, self.value(beta))?;
        running_mean.expect_shape(&[l.c], "batch_norm running_mean")?;
        running_var.expect_shape(&[l.c], "batch_norm running_var")?;
        let (mean, var, running) = if training {
            let m = l.pooled();
            ensure!(
                m > 1,
                "batch_norm: training needs more than one value per channel, x is {}",
                fmt_shape(xv.shape())
            );
            let (mean, var) = stats(&xv, l, &[l.c])?;
            // (1 - momentum) * running + momentum * scale * batch.
            let mix = |run: &Tensor, batch: &Tensor, scale: f32| -> Result<Tensor> {
                binary_forward(
                    &unary_forward(run, Unary::Affine(1.0 - momentum, 0.0))?,
                    &unary_forward(batch, Unary::Affine(momentum * scale, 0.0))?,
                    Binary::Add,
                )
            };
            let unbias = m as f32 / (m - 1) as f32;
            let running = (mix(running_mean, &mean, 1.0)?, mix(running_var, &var, unbias)?);
            (mean, var, Some(running))
        } else {
            (running_mean.clone(), running_var.clone(), None)
        };
        let rstd = rstd_of(&var, eps)?;
        let y = forward(&xv, l, &gv, self.value(beta), &mean, &rstd)?;
        let v = self.record(y, &[x, gamma, beta], move |g| {
            let (dx, dg, db) = batch_norm_backward(&xv, &gv, &mean, &rstd, training, g)?;
            Ok(vec![Some(dx), Some(dg), Some(db)])
        });
        Ok((v, running))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_op, rand_tensor, rng, Check};
    use crate::Device;

    /// Normalize `x [N, C, S]` over the index sets `members(n, c)` returns,
    /// in f64 with a two-pass variance: the plain definition.
    fn reference(
        x: &[f32],
        (n, c, s): (usize, usize, usize),
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        members: impl Fn(usize, usize) -> Vec<usize>,
    ) -> Vec<f32> {
        let mut y = vec![0.0; x.len()];
        for ni in 0..n {
            for ci in 0..c {
                let idx = members(ni, ci);
                let m = idx.len() as f64;
                let mean = idx.iter().map(|&i| x[i] as f64).sum::<f64>() / m;
                let var = idx.iter().map(|&i| (x[i] as f64 - mean).powi(2)).sum::<f64>() / m;
                for si in 0..s {
                    let i = (ni * c + ci) * s + si;
                    let xh = (x[i] as f64 - mean) / (var + eps as f64).sqrt();
                    y[i] = (xh * gamma[ci] as f64 + beta[ci] as f64) as f32;
                }
            }
        }
        y
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "at {i}: {x} vs {y}");
        }
    }

    #[test]
    fn group_norm_matches_reference_loop() {
        let dev = Device::cpu();
        let (n, c, h, w, groups) = (3, 6, 3, 5, 3);
        // An offset mean checks the variance does not lose precision.
        let x = Tensor::uniform(&[n, c, h, w], 9.0, 11.0, &mut rng(1), &dev);
        let gamma = rand_tensor(&[c], 2, &dev);
        let beta = rand_tensor(&[c], 3, &dev);
        let (y, mean, rstd) = group_norm_forward(&x, &gamma, &beta, groups, 1e-5).unwrap();
        assert_eq!(mean.shape(), &[n, groups]);
        assert_eq!(rstd.shape(), &[n, groups]);
        let s = h * w;
        let cg = c / groups;
        let want = reference(
            &x.to_vec().unwrap(),
            (n, c, s),
            &gamma.to_vec().unwrap(),
            &beta.to_vec().unwrap(),
            1e-5,
            |ni, ci| {
                let first = ni * c + ci / cg * cg;
                (first * s..(first + cg) * s).collect()
            },
        );
        close(&y.to_vec().unwrap(), &want, 2e-4);
        // [N, C] input: each group is its channels of one sample.
        let x2 = rand_tensor(&[3, 6], 4, &dev);
        let (y2, _, _) = group_norm_forward(&x2, &gamma, &beta, 2, 1e-5).unwrap();
        let want = reference(
            &x2.to_vec().unwrap(),
            (3, 6, 1),
            &gamma.to_vec().unwrap(),
            &beta.to_vec().unwrap(),
            1e-5,
            |ni, ci| (ni * 6 + ci / 3 * 3..ni * 6 + ci / 3 * 3 + 3).collect(),
        );
        close(&y2.to_vec().unwrap(), &want, 1e-4);
    }

    #[test]
    fn group_norm_rejects_bad_shapes() {
        let dev = Device::cpu();
        let x = rand_tensor(&[2, 6, 3], 1, &dev);
        let p = rand_tensor(&[6], 2, &dev);
        let e = group_norm_forward(&x, &p, &p, 4, 1e-5).unwrap_err();
        assert!(e.to_string().contains("4 groups do not divide"), "{e}");
        assert!(group_norm_forward(&x, &p, &p, 0, 1e-5).is_err());
        let e = group_norm_forward(&x, &rand_tensor(&[3], 1, &dev), &p, 3, 1e-5).unwrap_err();
        assert!(e.to_string().contains("gamma [3]"), "{e}");
        assert!(group_norm_forward(&rand_tensor(&[6], 1, &dev), &p, &p, 3, 1e-5).is_err());
    }

    #[test]
    fn gradcheck_group_norm() {
        let dev = Device::cpu();
        for (shape, groups) in [
            (&[3, 5, 3, 5][..], 5),
            (&[3, 6, 3, 5][..], 3),
            (&[2, 5, 7][..], 1),
            (&[4, 6][..], 2),
        ] {
            let x = rand_tensor(shape, 1, &dev);
            let gamma = rand_tensor(&[shape[1]], 2, &dev);
            let beta = rand_tensor(&[shape[1]], 3, &dev);
            check_op(&[x, gamma, beta], Check::default(), |g, v| {
                g.group_norm(v[0], v[1], v[2], groups, 1e-5)
            })
            .unwrap_or_else(|e| panic!("{shape:?} groups {groups}: {e}"));
        }
    }

    fn batch_norm_case(shape: &[usize]) -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
        let dev = Device::cpu();
        let c = shape[1];
        (
            Tensor::uniform(shape, -1.0, 3.0, &mut rng(1), &dev),
            rand_tensor(&[c], 2, &dev),
            rand_tensor(&[c], 3, &dev),
            rand_tensor(&[c], 4, &dev),
            Tensor::uniform(&[c], 0.5, 2.0, &mut rng(5), &dev),
        )
    }

    #[test]
    fn batch_norm_training_matches_reference_and_updates_running_stats() {
        let (n, c, h, w) = (3, 5, 3, 5);
        let (x, gamma, beta, rm, rv) = batch_norm_case(&[n, c, h, w]);
        let mut g = Graph::new();
        let vars = [&x, &gamma, &beta].map(|t| g.leaf(t.clone()));
        let (y, running) = g
            .batch_norm(vars[0], vars[1], vars[2], &rm, &rv, true, 0.1, 1e-5)
            .unwrap();
        let s = h * w;
        let xs = x.to_vec().unwrap();
        let members = |ci: usize| -> Vec<usize> {
            (0..n)
                .flat_map(|ni| (ni * c + ci) * s..(ni * c + ci + 1) * s)
                .collect()
        };
        let want = reference(
            &xs,
            (n, c, s),
            &gamma.to_vec().unwrap(),
            &beta.to_vec().unwrap(),
            1e-5,
            |_, ci| members(ci),
        );
        close(&g.value(y).to_vec().unwrap(), &want, 1e-4);
        let (new_m, new_v) = running.unwrap();
        let (rm, rv) = (rm.to_vec().unwrap(), rv.to_vec().unwrap());
        for ci in 0..c {
            let idx = members(ci);
            let m = idx.len() as f64;
            let mean = idx.iter().map(|&i| xs[i] as f64).sum::<f64>() / m;
            let unbiased = idx.iter().map(|&i| (xs[i] as f64 - mean).powi(2)).sum::<f64>() / (m - 1.0);
            let want_m = 0.9 * rm[ci] as f64 + 0.1 * mean;
            let want_v = 0.9 * rv[ci] as f64 + 0.1 * unbiased;
            assert!((new_m.to_vec().unwrap()[ci] as f64 - want_m).abs() < 1e-5);
            assert!((new_v.to_vec().unwrap()[ci] as f64 - want_v).abs() < 1e-5);
        }
    }

    #[test]
    fn batch_norm_eval_uses_running_stats() {
        let (x, gamma, beta, rm, rv) = batch_norm_case(&[4, 3]);
        let mut g = Graph::inference();
        let vars = [&x, &gamma, &beta].map(|t| g.constant(t.clone()));
        let (y, running) = g
            .batch_norm(vars[0], vars[1], vars[2], &rm, &rv, false, 0.1, 1e-3)
            .unwrap();
        assert!(running.is_none());
        let [xs, gs, bs, ms, vs] = [&x, &gamma, &beta, &rm, &rv].map(|t| t.to_vec().unwrap());
        let want: Vec<f32> = (0..12)
            .map(|i| {
                let c = i % 3;
                (xs[i] - ms[c]) / (vs[c] + 1e-3).sqrt() * gs[c] + bs[c]
            })
            .collect();
        close(&g.value(y).to_vec().unwrap(), &want, 1e-5);
    }

    #[test]
    fn batch_norm_rejects_bad_shapes() {
        let dev = Device::cpu();
        let p = rand_tensor(&[5], 1, &dev);
        let mut g = Graph::new();
        let gv = g.leaf(p.clone());
        let bad_rank = g.leaf(rand_tensor(&[3, 5, 7], 1, &dev));
        let e = g
            .batch_norm(bad_rank, gv, gv, &p, &p, true, 0.1, 1e-5)
            .unwrap_err();
        assert!(e.to_string().contains("[N, C, H, W]"), "{e}");
        let x = g.leaf(rand_tensor(&[3, 5], 1, &dev));
        let e = g
            .batch_norm(x, gv, gv, &rand_tensor(&[4], 1, &dev), &p, false, 0.1, 1e-5)
            .unwrap_err();
        assert!(e.to_string().contains("running_mean"), "{e}");
        let one = g.leaf(rand_tensor(&[1, 5], 1, &dev));
        let e = g.batch_norm(one, gv, gv, &p, &p, true, 0.1, 1e-5).unwrap_err();
        assert!(e.to_string().contains("more than one value"), "{e}");
    }

    #[test]
    fn gradcheck_batch_norm() {
        for (shape, training) in [
            (&[3, 5, 3, 5][..], true),
            (&[7, 5][..], true),
            (&[3, 5, 3, 5][..], false),
            (&[7, 5][..], false),
        ] {
            let (x, gamma, beta, rm, rv) = batch_norm_case(shape);
            check_op(&[x, gamma, beta], Check::default(), |g, v| {
                Ok(g.batch_norm(v[0], v[1], v[2], &rm, &rv, training, 0.1, 1e-5)?.0)
            })
            .unwrap_or_else(|e| panic!("{shape:?} training {training}: {e}"));
        }
    }
}
