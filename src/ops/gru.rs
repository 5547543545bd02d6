//! The GRU cell as one op, PyTorch `nn.GRUCell` layout and gate order
//! `(r, z, n)`: `w_ih [3H, I]`, `w_hh [3H, H]`, `b_ih`, `b_hh [3H]`.
//!
//! ```text
//! r  = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
//! z  = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
//! n  = tanh(W_in x + b_in + r * (W_hn h + b_hn))
//! h' = (1 - z) * n + z * h
//! ```
//!
//! Forward is two GEMMs (`x W_ih^T + b_ih`, `h W_hh^T + b_hh`) and one loop
//! over the gates; backward is one loop for all gate gradients and then the
//! GEMMs of two dense-layer backwards. The tape holds one node per step
//! instead of a dozen elementwise ones.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::linear::{linear_backward, linear_forward};
use super::math::{sigmoid, tanh};
use super::PAR_MIN;
use crate::autograd::{Graph, Var};
use crate::tensor::{fmt_shape, Storage, Tensor};

/// `(batch, input size, hidden size)` after checking every shape.
fn check_shapes(
    x: &Tensor,
    h: &Tensor,
    w_ih: &Tensor,
    w_hh: &Tensor,
    b_ih: &Tensor,
    b_hh: &Tensor,
) -> Result<(usize, usize, usize)> {
    ensure!(
        x.rank() == 2 && h.rank() == 2 && x.dim(0) == h.dim(0),
        "gru_cell: x {} and h {} must be [N, I] and [N, H]",
        fmt_shape(x.shape()),
        fmt_shape(h.shape())
    );
    let (n, i, hd) = (x.dim(0), x.dim(1), h.dim(1));
    w_ih.expect_shape(&[3 * hd, i], "gru_cell w_ih (need [3H, I])")?;
    w_hh.expect_shape(&[3 * hd, hd], "gru_cell w_hh (need [3H, H])")?;
    b_ih.expect_shape(&[3 * hd], "gru_cell b_ih (need [3H])")?;
    b_hh.expect_shape(&[3 * hd], "gru_cell b_hh (need [3H])")?;
    Ok((n, i, hd))
}

/// Rows per rayon task so that small batches stay on one thread.
fn min_rows(row_len: usize) -> usize {
    (PAR_MIN / row_len.max(1)).max(1)
}

/// The next hidden state `[N, H]`, and what backward needs: the gates
/// `r, z, n` and `W_hn h + b_hn`, as `[N, 4H]`.
pub fn gru_cell_forward(
    x: &Tensor,
    h: &Tensor,
    w_ih: &Tensor,
    w_hh: &Tensor,
    b_ih: &Tensor,
    b_hh: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (n, _, hd) = check_shapes(x, h, w_ih, w_hh, b_ih, b_hh)?;
    let gi = linear_forward(x, w_ih, Some(b_ih))?;
    let gh = linear_forward(h, w_hh, Some(b_hh))?;
    match x.storage() {
        Storage::Cuda(_) => cuda::forward(gi.cuda()?, gh.cuda()?, h.cuda()?, n, hd),
        Storage::Cpu(_) => {
            let (gi, gh, hs) = (gi.cpu()?, gh.cpu()?, h.cpu()?);
            let mut out = h.host().zeros(n * hd);
            let mut saved = h.host().zeros(n * 4 * hd);
            out.par_chunks_mut(hd.max(1))
                .zip(saved.par_chunks_mut(4 * hd.max(1)))
                .with_min_len(min_rows(4 * hd))
                .enumerate()
                .for_each(|(row, (o, s))| {
                    let (gi, gh) = (&gi[row * 3 * hd..], &gh[row * 3 * hd..]);
                    for j in 0..hd {
                        let r = sigmoid(gi[j] + gh[j]);
                        let z = sigmoid(gi[hd + j] + gh[hd + j]);
                        let hn = gh[2 * hd + j];
                        let nn = tanh(gi[2 * hd + j] + r * hn);
                        o[j] = (1.0 - z) * nn + z * hs[row * hd + j];
                        [s[j], s[hd + j], s[2 * hd + j], s[3 * hd + j]] = [r, z, nn, hn];
                    }
                });
            let dev = x.device();
            Ok((
                Tensor::from_vec(out, &[n, hd], &dev)?,
                Tensor::from_vec(saved, &[n, 4 * hd], &dev)?,
            ))
        }
    }
}

/// Gradients `[dx, dh, dw_ih, dw_hh, db_ih, db_hh]` from the output gradient
/// `g [N, H]` and the forward's saved gates.
pub fn gru_cell_backward(
    x: &Tensor,
    h: &Tensor,
    w_ih: &Tensor,
    w_hh: &Tensor,
    saved: &Tensor,
    g: &Tensor,
) -> Result<[Tensor; 6]> {
    let (n, hd) = (h.dim(0), h.dim(1));
    // Gradients of the pre-activations x W_ih^T + b_ih and h W_hh^T + b_hh,
    // and of h through the direct path z * h.
    let (d_gi, d_gh, dh_direct) = match x.storage() {
        Storage::Cuda(_) => cuda::backward(saved.cuda()?, g.cuda()?, h.cuda()?, n, hd)?,
        Storage::Cpu(_) => {
            let (sv, gs, hs) = (saved.cpu()?, g.cpu()?, h.cpu()?);
            let mut d_gi = h.host().zeros(n * 3 * hd);
            let mut d_gh = h.host().zeros(n * 3 * hd);
            let mut dh = h.host().zeros(n * hd);
            d_gi.par_chunks_mut(3 * hd.max(1))
                .zip(d_gh.par_chunks_mut(3 * hd.max(1)))
                .zip(dh.par_chunks_mut(hd.max(1)))
                .with_min_len(min_rows(7 * hd))
                .enumerate()
                .for_each(|(row, ((di, dg), dh))| {
                    let s = &sv[row * 4 * hd..];
                    for j in 0..hd {
                        let [r, z, nn, hn] = [s[j], s[hd + j], s[2 * hd + j], s[3 * hd + j]];
                        let (gy, hv) = (gs[row * hd + j], hs[row * hd + j]);
                        let dn = gy * (1.0 - z) * (1.0 - nn * nn);
                        let dz = gy * (hv - nn) * z * (1.0 - z);
                        let dr = dn * hn * r * (1.0 - r);
                        [di[j], di[hd + j], di[2 * hd + j]] = [dr, dz, dn];
                        [dg[j], dg[hd + j], dg[2 * hd + j]] = [dr, dz, dn * r];
                        dh[j] = gy * z;
                    }
                });
            let dev = x.device();
            (
                Tensor::from_vec(d_gi, &[n, 3 * hd], &dev)?,
                Tensor::from_vec(d_gh, &[n, 3 * hd], &dev)?,
                h.same_shape(dh)?,
            )
        }
    };
    let (dx, dw_ih, db_ih) = linear_backward(x, w_ih, &d_gi)?;
    let (dh_gates, dw_hh, db_hh) = linear_backward(h, w_hh, &d_gh)?;
    let dh = dh_gates.add_same(&dh_direct)?;
    Ok([dx, dh, dw_ih, dw_hh, db_ih, db_hh])
}

/// Launchers of kernels/gru.cu.
mod cuda {
    use anyhow::Result;

    use crate::device::cuda::{grid, launch, CudaStorage};
    use crate::tensor::Tensor;

    /// `(h', saved)` from the pre-activations `gi`, `gh [N, 3H]` and `h [N, H]`.
    pub(super) fn forward(
        gi: &CudaStorage,
        gh: &CudaStorage,
        h: &CudaStorage,
        n: usize,
        hd: usize,
    ) -> Result<(Tensor, Tensor)> {
        let dev = h.device();
        let (mut out, mut saved) = (dev.alloc(n * hd)?, dev.alloc(n * 4 * hd)?);
        launch!(
            &dev,
            "gru",
            "gru_forward",
            grid(n * hd)?,
            gi.slice(),
            gh.slice(),
            h.slice(),
            out.slice_mut(),
            saved.slice_mut(),
            &(n as i32),
            &(hd as i32)
        );
        Ok((
            Tensor::from_cuda(out, &[n, hd]),
            Tensor::from_cuda(saved, &[n, 4 * hd]),
        ))
    }

    /// `(d_gi, d_gh, dh_direct)` from the saved gates and the output gradient `g`.
    pub(super) fn backward(
        saved: &CudaStorage,
        g: &CudaStorage,
        h: &CudaStorage,
        n: usize,
        hd: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let dev = h.device();
        let (mut d_gi, mut d_gh) = (dev.alloc(n * 3 * hd)?, dev.alloc(n * 3 * hd)?);
        let mut dh = dev.alloc(n * hd)?;
        launch!(
            &dev,
            "gru",
            "gru_backward",
            grid(n * hd)?,
            saved.slice(),
            g.slice(),
            h.slice(),
            d_gi.slice_mut(),
            d_gh.slice_mut(),
            dh.slice_mut(),
            &(n as i32),
            &(hd as i32)
        );
        Ok((
            Tensor::from_cuda(d_gi, &[n, 3 * hd]),
            Tensor::from_cuda(d_gh, &[n, 3 * hd]),
            Tensor::from_cuda(dh, &[n, hd]),
        ))
    }
}

impl Graph {
    /// One GRU step `h' = GRUCell(x, h)` (PyTorch layout and gate order).
    pub fn gru_cell(&mut self, x: Var, h: Var, w_ih: Var, w_hh: Var, b_ih: Var, b_hh: Var) -> Result<Var> {
        let inputs = [x, h, w_ih, w_hh, b_ih, b_hh];
        let [xv, hv, wi, wh, bi, bh] = inputs.map(|v| self.value(v).clone());
        let (y, saved) = gru_cell_forward(&xv, &hv, &wi, &wh, &bi, &bh)?;
        Ok(self.record(y, &inputs, move |g| {
            Ok(gru_cell_backward(&xv, &hv, &wi, &wh, &saved, g)?
                .map(Some)
                .to_vec())
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_op, rand_tensor, Check};
    use crate::Device;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::cpu()).unwrap()
    }

    /// Expected values from PyTorch 2.15 (CPU, float64), made by:
    ///
    /// ```python
    /// import math, torch
    /// N, I, H = 2, 3, 2
    /// f = lambda n, a: torch.tensor([round(0.5 * math.sin(a * (k + 1)), 4) for k in range(n)],
    ///                               dtype=torch.float64)
    /// x = f(N * I, 1.3).reshape(N, I).requires_grad_()
    /// h = f(N * H, 2.1).reshape(N, H).requires_grad_()
    /// cell = torch.nn.GRUCell(I, H).double()
    /// with torch.no_grad():
    ///     cell.weight_ih.copy_(f(3 * H * I, 0.7).reshape(3 * H, I))
    ///     cell.weight_hh.copy_(f(3 * H * H, 1.9).reshape(3 * H, H))
    ///     cell.bias_ih.copy_(f(3 * H, 2.9))
    ///     cell.bias_hh.copy_(f(3 * H, 0.4))
    /// y = cell(x, h)
    /// (y * torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)).sum().backward()
    /// print(y, x.grad, h.grad, cell.weight_hh.grad, cell.bias_hh.grad)
    /// ```
    #[test]
    fn gru_cell_matches_pytorch() {
        let x = t(&[0.4818, 0.2578, -0.3439, -0.4417, 0.1076, 0.4993], &[2, 3]);
        let h = t(&[0.4316, -0.4358, 0.0084, 0.4273], &[2, 2]);
        let w_ih = t(
            &[
                0.3221, 0.4927, 0.4316, 0.1675, -0.1754, -0.4358, -0.4912, -0.3156, 0.0084, 0.3285, 0.4941,
                0.4273, 0.1595, -0.1832, -0.4398, -0.4896, -0.3091, 0.0168,
            ],
            &[6, 3],
        );
        let w_hh = t(
            &[
                0.4732, -0.3059, -0.2753, 0.484, -0.0376, -0.4597, 0.3348, 0.2432, -0.492, 0.0749, 0.4436,
                -0.3617,
            ],
            &[6, 2],
        );
        let b_ih = t(&[0.1196, -0.2323, 0.3315, -0.4114, 0.4674, -0.4963], &[6]);
        let b_hh = t(&[0.1947, 0.3587, 0.466, 0.4998, 0.4546, 0.3377], &[6]);

        let mut g = Graph::new();
        let vars = [&x, &h, &w_ih, &w_hh, &b_ih, &b_hh].map(|v| g.leaf(v.clone()));
        let y = g
            .gru_cell(vars[0], vars[1], vars[2], vars[3], vars[4], vars[5])
            .unwrap();
        let seed = t(&[1.0, -2.0, 0.5, 3.0], &[2, 2]);
        let grads = g.backward_from(y, seed).unwrap();
        let close = |got: &Tensor, want: &[f32]| {
            let got = got.to_vec().unwrap();
            assert!(
                got.iter().zip(want).all(|(a, b)| (a - b).abs() < 2e-6),
                "{got:?} vs {want:?}"
            );
        };
        close(g.value(y), &[0.5092798, -0.4394097, 0.1341546, 0.1597348]);
        let grad = |k: usize| grads.get(vars[k]).unwrap();
        close(
            grad(0),
            &[
                0.3783963, 0.2195313, -0.0426112, -0.3835868, -0.1571598, 0.1431988,
            ],
        );
        close(grad(1), &[0.4788468, -1.0352548, 0.7266669, 1.6754642]);
        close(
            grad(3),
            &[
                0.0038714, 0.0027557, -0.0511546, 0.0762865, -0.0224711, 0.0038547, 0.0021369, 0.2001958,
                0.0576608, -0.0255022, -0.1438758, 0.4116459,
            ],
        );
        close(
            grad(5),
            &[0.0239661, -0.0630948, -0.0944448, 0.4602596, 0.2072193, 0.2659956],
        );
    }

    #[test]
    fn gradcheck_gru_cell() {
        let dev = Device::cpu();
        let (n, i, hd) = (3, 5, 4);
        let shapes: [&[usize]; 6] = [
            &[n, i],
            &[n, hd],
            &[3 * hd, i],
            &[3 * hd, hd],
            &[3 * hd],
            &[3 * hd],
        ];
        let ins: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(k, s)| rand_tensor(s, 10 + k as u64, &dev))
            .collect();
        check_op(&ins, Check::default(), |g, v| {
            g.gru_cell(v[0], v[1], v[2], v[3], v[4], v[5])
        })
        .unwrap();
    }

    #[test]
    fn gru_cell_rejects_bad_shapes() {
        let dev = Device::cpu();
        let r = |s: &[usize]| rand_tensor(s, 1, &dev);
        let (x, h) = (r(&[2, 3]), r(&[2, 4]));
        let (wi, wh, b) = (r(&[12, 3]), r(&[12, 4]), r(&[12]));
        assert!(gru_cell_forward(&x, &h, &wi, &wh, &b, &b).is_ok());
        let e = gru_cell_forward(&x, &h, &r(&[12, 4]), &wh, &b, &b).unwrap_err();
        assert!(e.to_string().contains("w_ih"), "{e}");
        let e = gru_cell_forward(&x, &r(&[3, 4]), &wi, &wh, &b, &b).unwrap_err();
        assert!(e.to_string().contains("[3, 4]"), "{e}");
        let e = gru_cell_forward(&x, &h, &wi, &wh, &b, &r(&[8])).unwrap_err();
        assert!(e.to_string().contains("b_hh"), "{e}");
    }
}
