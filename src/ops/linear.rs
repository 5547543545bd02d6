//! Matrix products: batched `matmul` and the dense layer `linear`
//! (`y = x W^T + b`, PyTorch's weight layout `[out, in]`). CPU products go
//! through the GEMM in `device::cpu`.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use crate::autograd::{Graph, Var};
use crate::device::cpu::{sgemm, Mat};
use crate::device::CpuDevice;
use crate::tensor::{fmt_shape, Storage, Tensor};

/// Batched product of `[batch, m, k]` views; `a_batched`/`b_batched` false
/// means one matrix shared by the whole batch. Transposes read operands as
/// stored `[k, m]` / `[n, k]`.
#[allow(clippy::too_many_arguments)]
fn bmm_cpu(
    dev: &CpuDevice,
    batch: usize,
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    ta: bool,
    a_batched: bool,
    b: &[f32],
    tb: bool,
    b_batched: bool,
) -> Vec<f32> {
    let mut out = dev.buffer(batch * m * n);
    let one = |i: usize, c: &mut [f32]| {
        let ai = if a_batched {
            &a[i * m * k..(i + 1) * m * k]
        } else {
            a
        };
        let bi = if b_batched {
            &b[i * k * n..(i + 1) * k * n]
        } else {
            b
        };
        sgemm(
            m,
            n,
            k,
            Mat { data: ai, trans: ta },
            Mat { data: bi, trans: tb },
            c,
            false,
        );
    };
    if m * n == 0 {
        return out;
    }
    if batch > 1 && m * n * k < 1 << 18 {
        out.par_chunks_mut(m * n).enumerate().for_each(|(i, c)| one(i, c));
    } else {
        out.chunks_mut(m * n).enumerate().for_each(|(i, c)| one(i, c));
    }
    out
}

/// Sum of `batch` products `a_i^T b_i` (or `a_i b_i^T`) into one matrix: the
/// gradient of a matrix shared across the batch. Stacking the batch into the
/// reduction dimension turns it into one GEMM.
fn shared_grad_cpu(
    dev: &CpuDevice,
    rows_total: usize,
    (m, n): (usize, usize),
    a: &[f32],
    b: &[f32],
) -> Vec<f32> {
    // a: [rows_total, m], b: [rows_total, n] -> a^T b : [m, n]
    let mut out = dev.buffer(m * n);
    sgemm(m, n, rows_total, Mat::t(a), Mat::n(b), &mut out, false);
    out
}

fn split_batch(shape: &[usize]) -> (usize, usize, usize) {
    let r = shape.len();
    (shape[..r - 2].iter().product(), shape[r - 2], shape[r - 1])
}

/// `a @ b` with `a: [..., m, k]` and `b: [k, n]` (shared) or `[..., k, n]`
/// (same leading axes).
pub fn matmul_forward(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    ensure!(
        a.rank() >= 2 && b.rank() >= 2,
        "matmul needs matrices, got {} and {}",
        fmt_shape(a.shape()),
        fmt_shape(b.shape())
    );
    let (batch, m, k) = split_batch(a.shape());
    let (_, k2, n) = split_batch(b.shape());
    let shared = b.rank() == 2;
    ensure!(
        k == k2 && (shared || a.shape()[..a.rank() - 2] == b.shape()[..b.rank() - 2]),
        "matmul shapes {} and {} do not fit: inner sizes {k} vs {k2}, batches must match or b be 2-D",
        fmt_shape(a.shape()),
        fmt_shape(b.shape())
    );
    let mut shape = a.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    match a.storage() {
        Storage::Cpu(_) => {
            let data = bmm_cpu(
                a.host(),
                batch,
                (m, n, k),
                a.cpu()?,
                false,
                true,
                b.cpu()?,
                false,
                !shared,
            );
            Tensor::from_vec(data, &shape, &a.device())
        }
        Storage::Cuda(xa) => {
            let mut out = xa.device().alloc(batch * m * n)?;
            let bs = if shared { 0 } else { k * n };
            cuda::sgemm(
                batch,
                (m, n, k),
                (xa, false, m * k),
                (b.cuda()?, false, bs),
                &mut out,
                false,
            )?;
            Ok(Tensor::from_cuda(out, &shape))
        }
    }
}

/// Gradients of `matmul_forward(a, b)` given the output gradient `g`.
pub fn matmul_backward(a: &Tensor, b: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let (batch, m, k) = split_batch(a.shape());
    let n = b.shape()[b.rank() - 1];
    let shared = b.rank() == 2;
    match a.storage() {
        Storage::Cpu(_) => {
            let (av, bv, gv) = (a.cpu()?, b.cpu()?, g.cpu()?);
            // da = g b^T : [m, n] x [n, k]
            let da = bmm_cpu(a.host(), batch, (m, k, n), gv, false, true, bv, true, !shared);
            // db = a^T g : [k, m] x [m, n]
            let db = if shared {
                shared_grad_cpu(a.host(), batch * m, (k, n), av, gv)
            } else {
                bmm_cpu(a.host(), batch, (k, n, m), av, true, true, gv, false, true)
            };
            Ok((a.same_shape(da)?, b.same_shape(db)?))
        }
        Storage::Cuda(xa) => {
            let (xb, xg) = (b.cuda()?, g.cuda()?);
            let dev = xa.device();
            let bs = if shared { 0 } else { k * n };
            let mut da = dev.alloc(batch * m * k)?;
            cuda::sgemm(
                batch,
                (m, k, n),
                (xg, false, m * n),
                (xb, true, bs),
                &mut da,
                false,
            )?;
            let mut db = dev.alloc(b.numel())?;
            if shared {
                // The batch stacked into the reduction: a^T g over batch * m rows.
                cuda::sgemm(
                    1,
                    (k, n, batch * m),
                    (xa, true, 0),
                    (xg, false, 0),
                    &mut db,
                    false,
                )?;
            } else {
                cuda::sgemm(
                    batch,
                    (k, n, m),
                    (xa, true, m * k),
                    (xg, false, m * n),
                    &mut db,
                    false,
                )?;
            }
            Ok((Tensor::from_cuda(da, a.shape()), Tensor::from_cuda(db, b.shape())))
        }
    }
}

/// `x [batch, in] -> x W^T + b`, `W [out, in]`, `b [out]`.
pub fn linear_forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    ensure!(
        x.rank() == 2 && w.rank() == 2 && x.shape()[1] == w.shape()[1],
        "linear: input {} does not fit weight {} (expected [batch, {}])",
        fmt_shape(x.shape()),
        fmt_shape(w.shape()),
        w.shape().get(1).copied().unwrap_or(0)
    );
    let (nb, fin, fout) = (x.shape()[0], x.shape()[1], w.shape()[0]);
    if let Some(b) = b {
        b.expect_shape(&[fout], "linear bias")?;
    }
    match x.storage() {
        Storage::Cpu(_) => {
            let mut out = x.host().zeros(nb * fout);
            if let Some(b) = b {
                let bv = b.cpu()?;
                out.chunks_mut(fout).for_each(|r| r.copy_from_slice(bv));
            }
            sgemm(
                nb,
                fout,
                fin,
                Mat::n(x.cpu()?),
                Mat::t(w.cpu()?),
                &mut out,
                b.is_some(),
            );
            Tensor::from_vec(out, &[nb, fout], &x.device())
        }
        Storage::Cuda(xs) => {
            let mut out = match b {
                Some(b) => super::shape::cuda::broadcast_rows(b.cuda()?, nb)?,
                None => xs.device().alloc(nb * fout)?,
            };
            cuda::sgemm(
                1,
                (nb, fout, fin),
                (xs, false, 0),
                (w.cuda()?, true, 0),
                &mut out,
                b.is_some(),
            )?;
            Ok(Tensor::from_cuda(out, &[nb, fout]))
        }
    }
}

/// Gradients of `linear_forward`: (dx, dW, db).
pub fn linear_backward(x: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let (nb, fin, fout) = (x.shape()[0], x.shape()[1], w.shape()[0]);
    match x.storage() {
        Storage::Cpu(_) => {
            let (xv, wv, gv) = (x.cpu()?, w.cpu()?, g.cpu()?);
            let mut dx = x.host().zeros(nb * fin);
            sgemm(nb, fin, fout, Mat::n(gv), Mat::n(wv), &mut dx, false);
            let dw = shared_grad_cpu(x.host(), nb, (fout, fin), gv, xv);
            let mut db = vec![0.0f32; fout];
            for r in gv.chunks(fout) {
                db.iter_mut().zip(r).for_each(|(d, v)| *d += v);
            }
            let dev = x.device();
            Ok((
                x.same_shape(dx)?,
                w.same_shape(dw)?,
                Tensor::from_vec(db, &[fout], &dev)?,
            ))
        }
        Storage::Cuda(xs) => {
            let (ws, gs) = (w.cuda()?, g.cuda()?);
            let dev = xs.device();
            let mut dx = dev.alloc(nb * fin)?;
            cuda::sgemm(1, (nb, fin, fout), (gs, false, 0), (ws, false, 0), &mut dx, false)?;
            let mut dw = dev.alloc(fout * fin)?;
            cuda::sgemm(1, (fout, fin, nb), (gs, true, 0), (xs, false, 0), &mut dw, false)?;
            let db = super::reduce::cuda::sum_axis(gs, (1, nb, fout), &[fout])?;
            Ok((
                Tensor::from_cuda(dx, x.shape()),
                Tensor::from_cuda(dw, w.shape()),
                db,
            ))
        }
    }
}

/// Launchers of kernels/matmul.cu.
pub(crate) mod cuda {
    use anyhow::{ensure, Result};
    use cudarc::driver::LaunchConfig;

    use crate::device::cuda::{launch, CudaDevice, CudaStorage, View, ViewMut, BLOCK};

    /// Tile of C one block computes (TM = TN in kernels/matmul.cu).
    const TILE: usize = 64;

    /// Batched row-major GEMM: `c[z] = a[z] b[z] (+ c[z] when accumulate)`,
    /// `c[z]` is `m x n`. Each operand is (storage, transposed, batch stride),
    /// a stride of 0 sharing one matrix across the batch.
    pub(crate) fn sgemm(
        batch: usize,
        dims: (usize, usize, usize),
        (a, ta, sa): (&CudaStorage, bool, usize),
        (b, tb, sb): (&CudaStorage, bool, usize),
        c: &mut CudaStorage,
        accumulate: bool,
    ) -> Result<()> {
        sgemm_view(
            &a.device(),
            batch,
            dims,
            (&a.slice(), ta, sa),
            (&b.slice(), tb, sb),
            &mut c.slice_mut(),
            accumulate,
        )
    }

    /// [`sgemm`] on views, for operands that start inside a buffer (one
    /// chunk of a batch); `c[z]` lies at `z * m * n` in `c`.
    pub(crate) fn sgemm_view(
        dev: &CudaDevice,
        batch: usize,
        (m, n, k): (usize, usize, usize),
        (a, ta, sa): (&View, bool, usize),
        (b, tb, sb): (&View, bool, usize),
        c: &mut ViewMut,
        accumulate: bool,
    ) -> Result<()> {
        if batch * m * n == 0 {
            return Ok(());
        }
        ensure!(
            batch <= 65_535
                && m.div_ceil(TILE) <= 65_535
                && [m, n, k].iter().all(|&d| d <= i32::MAX as usize),
            "matmul of {batch} x [{m}, {k}] x [{k}, {n}] exceeds the CUDA kernel's grid"
        );
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(TILE) as u32, m.div_ceil(TILE) as u32, batch as u32),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (mi, ni, ki) = (m as i32, n as i32, k as i32);
        let (tai, tbi, sai, sbi) = (ta as i32, tb as i32, sa as i64, sb as i64);
        launch!(
            dev,
            "matmul",
            "sgemm",
            cfg,
            a,
            b,
            c,
            &mi,
            &ni,
            &ki,
            &tai,
            &tbi,
            &sai,
            &sbi,
            &(accumulate as i32)
        );
        Ok(())
    }
}

impl Graph {
    pub fn matmul(&mut self, a: Var, b: Var) -> Result<Var> {
        let (av, bv) = (self.value(a).clone(), self.value(b).clone());
        let y = matmul_forward(&av, &bv)?;
        Ok(self.record(y, &[a, b], move |g| {
            let (da, db) = matmul_backward(&av, &bv, g)?;
            Ok(vec![Some(da), Some(db)])
        }))
    }

    /// Dense layer `x W^T + b`.
    pub fn linear(&mut self, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
        let (xv, wv) = (self.value(x).clone(), self.value(w).clone());
        let bv = b.map(|b| self.value(b).clone());
        let y = linear_forward(&xv, &wv, bv.as_ref())?;
        let inputs: Vec<Var> = [Some(x), Some(w), b].into_iter().flatten().collect();
        let has_bias = b.is_some();
        Ok(self.record(y, &inputs, move |g| {
            let (dx, dw, db) = linear_backward(&xv, &wv, g)?;
            let mut out = vec![Some(dx), Some(dw)];
            if has_bias {
                out.push(Some(db));
            }
            Ok(out)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_op, rand_tensor, Check};
    use crate::Device;

    #[test]
    fn gradcheck_matmul() {
        let dev = Device::cpu();
        let ck = Check::default();
        let a = rand_tensor(&[3, 5], 1, &dev);
        let b = rand_tensor(&[5, 4], 2, &dev);
        check_op(&[a, b.clone()], ck, |g, v| g.matmul(v[0], v[1])).unwrap();
        let a3 = rand_tensor(&[2, 3, 5], 3, &dev);
        check_op(&[a3.clone(), b], ck, |g, v| g.matmul(v[0], v[1])).unwrap();
        let b3 = rand_tensor(&[2, 5, 7], 4, &dev);
        check_op(&[a3, b3], ck, |g, v| g.matmul(v[0], v[1])).unwrap();
    }

    #[test]
    fn gradcheck_linear() {
        let dev = Device::cpu();
        let x = rand_tensor(&[4, 6], 1, &dev);
        let w = rand_tensor(&[3, 6], 2, &dev);
        let b = rand_tensor(&[3], 3, &dev);
        check_op(&[x.clone(), w.clone(), b], Check::default(), |g, v| {
            g.linear(v[0], v[1], Some(v[2]))
        })
        .unwrap();
        check_op(&[x, w], Check::default(), |g, v| g.linear(v[0], v[1], None)).unwrap();
    }

    #[test]
    fn linear_matches_reference_loop_and_checks_shapes() {
        let dev = Device::cpu();
        let (x, w, b) = (
            rand_tensor(&[5, 7], 1, &dev),
            rand_tensor(&[3, 7], 2, &dev),
            rand_tensor(&[3], 3, &dev),
        );
        let y = linear_forward(&x, &w, Some(&b)).unwrap().to_vec().unwrap();
        let (xv, wv, bv) = (x.to_vec().unwrap(), w.to_vec().unwrap(), b.to_vec().unwrap());
        for i in 0..5 {
            for o in 0..3 {
                let s: f32 = bv[o] + (0..7).map(|k| xv[i * 7 + k] * wv[o * 7 + k]).sum::<f32>();
                assert!((y[i * 3 + o] - s).abs() < 1e-4);
            }
        }
        let e = linear_forward(&rand_tensor(&[5, 6], 1, &dev), &w, None).unwrap_err();
        assert!(e.to_string().contains("linear"), "{e}");
        assert!(matmul_forward(&x, &rand_tensor(&[6, 2], 1, &dev)).is_err());
    }
}
