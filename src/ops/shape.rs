//! Shape ops: reshape, concat, slice, stack and permute (transpose). Tensors
//! are contiguous, so all but reshape copy.

use anyhow::{ensure, Result};

use super::par_fill;
use crate::autograd::{Graph, Var};
use crate::tensor::{fmt_shape, Storage, Tensor};

/// `[outer, n, inner]` sizes around `axis`.
fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (
        shape[..axis].iter().product(),
        shape[axis],
        shape[axis + 1..].iter().product(),
    )
}

/// Concatenate along `axis`; all other axes must agree.
pub fn concat_forward(xs: &[&Tensor], axis: usize) -> Result<Tensor> {
    ensure!(!xs.is_empty(), "concat of no tensors");
    let first = xs[0].shape();
    ensure!(
        axis < first.len(),
        "concat axis {axis} out of range for shape {}",
        fmt_shape(first)
    );
    for x in xs {
        let s = x.shape();
        ensure!(
            s.len() == first.len() && (0..s.len()).all(|a| a == axis || s[a] == first[a]),
            "concat along axis {axis}: shapes {} and {} differ off that axis",
            fmt_shape(first),
            fmt_shape(s)
        );
    }
    let mut shape = first.to_vec();
    shape[axis] = xs.iter().map(|x| x.shape()[axis]).sum();
    let (outer, total, inner) = split_at_axis(&shape, axis);
    match xs[0].storage() {
        Storage::Cpu(_) => {
            // Block copies: each part holds `outer` runs of `n * inner` floats.
            let mut data = xs[0].host().buffer(outer * total * inner);
            let mut at = 0;
            for x in xs {
                let run = x.shape()[axis] * inner;
                if run > 0 {
                    let dst = data.chunks_exact_mut(total * inner).map(|o| &mut o[at..][..run]);
                    dst.zip(x.cpu()?.chunks_exact(run))
                        .for_each(|(o, v)| o.copy_from_slice(v));
                }
                at += run;
            }
            Tensor::from_vec(data, &shape, &xs[0].device())
        }
        Storage::Cuda(first) => {
            let mut out = first.device().alloc(outer * total * inner)?;
            let mut off = 0;
            for x in xs {
                let n = x.shape()[axis];
                cuda::copy_into(x.cuda()?, &mut out, (outer, n, inner), total, off)?;
                off += n;
            }
            Ok(Tensor::from_cuda(out, &shape))
        }
    }
}

/// `len` entries of `axis` starting at `start`.
pub fn slice_forward(x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
    ensure!(
        axis < x.rank(),
        "slice axis {axis} out of range for shape {}",
        fmt_shape(x.shape())
    );
    ensure!(
        start + len <= x.shape()[axis],
        "slice {start}..{} of axis {axis} is outside shape {}",
        start + len,
        fmt_shape(x.shape())
    );
    let (outer, n, inner) = split_at_axis(x.shape(), axis);
    let mut shape = x.shape().to_vec();
    shape[axis] = len;
    match x.storage() {
        Storage::Cpu(_) => {
            let run = len * inner;
            let mut data = x.host().buffer(outer * run);
            if run > 0 {
                let src = x
                    .cpu()?
                    .chunks_exact(n * inner)
                    .map(|o| &o[start * inner..][..run]);
                data.chunks_exact_mut(run)
                    .zip(src)
                    .for_each(|(o, v)| o.copy_from_slice(v));
            }
            Tensor::from_vec(data, &shape, &x.device())
        }
        Storage::Cuda(xs) => cuda::copy_from(xs, (outer, n, inner), start, len, &shape),
    }
}

/// Zero-pad along `axis`: `before` zeros, `x`, then zeros up to `total`
/// (the adjoint of slice).
fn pad_axis(x: &Tensor, axis: usize, before: usize, total: usize) -> Result<Tensor> {
    let (outer, len, inner) = split_at_axis(x.shape(), axis);
    let mut shape = x.shape().to_vec();
    shape[axis] = total;
    match x.storage() {
        Storage::Cpu(_) => {
            let mut data = x.host().zeros(outer * total * inner);
            let run = len * inner;
            if run > 0 {
                let dst = data
                    .chunks_exact_mut(total * inner)
                    .map(|o| &mut o[before * inner..][..run]);
                dst.zip(x.cpu()?.chunks_exact(run))
                    .for_each(|(o, v)| o.copy_from_slice(v));
            }
            Tensor::from_vec(data, &shape, &x.device())
        }
        Storage::Cuda(xs) => {
            let mut out = xs.device().alloc(outer * total * inner)?;
            out.fill(0.0)?;
            cuda::copy_into(xs, &mut out, (outer, len, inner), total, before)?;
            Ok(Tensor::from_cuda(out, &shape))
        }
    }
}

/// Reorder axes: output axis `i` is input axis `perm[i]`.
pub fn permute_forward(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let r = x.rank();
    let mut seen = vec![false; r];
    ensure!(
        perm.len() == r
            && perm
                .iter()
                .all(|&p| p < r && !std::mem::replace(&mut seen[p], true)),
        "permutation {perm:?} does not fit shape {}",
        fmt_shape(x.shape())
    );
    let in_shape = x.shape();
    let shape: Vec<usize> = perm.iter().map(|&p| in_shape[p]).collect();
    let mut in_strides = vec![1; r];
    for a in (0..r.saturating_sub(1)).rev() {
        in_strides[a] = in_strides[a + 1] * in_shape[a + 1];
    }
    let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    match x.storage() {
        Storage::Cpu(_) => {
            let xs = x.cpu()?;
            let data = par_fill(x.host(), x.numel(), |i| {
                let (mut rem, mut src) = (i, 0);
                for a in (0..r).rev() {
                    src += (rem % shape[a]) * strides[a];
                    rem /= shape[a];
                }
                xs[src]
            });
            Tensor::from_vec(data, &shape, &x.device())
        }
        Storage::Cuda(xs) => {
            let dims = crate::device::cuda::Dims::new(&shape, &strides, &strides)?;
            cuda::permute(xs, dims, &shape)
        }
    }
}

/// Launchers of kernels/shape.cu.
pub(crate) mod cuda {
    use anyhow::Result;

    use crate::device::cuda::{grid, launch, CudaStorage, Dims};
    use crate::tensor::Tensor;

    /// Write `src` (`[outer, n, inner]`) into `dst` (`[outer, total, inner]`)
    /// from offset `off` of the middle axis.
    pub(crate) fn copy_into(
        src: &CudaStorage,
        dst: &mut CudaStorage,
        (outer, n, inner): (usize, usize, usize),
        total: usize,
        off: usize,
    ) -> Result<()> {
        let dev = src.device();
        let cfg = grid(outer * n * inner)?;
        let (o, k, i, t, f) = (outer as i32, n as i32, inner as i32, total as i32, off as i32);
        launch!(
            &dev,
            "shape",
            "copy_into",
            cfg,
            src.slice(),
            dst.slice_mut(),
            &o,
            &k,
            &i,
            &t,
            &f
        );
        Ok(())
    }

    /// `len` entries of the middle axis of `src` (`[outer, n, inner]`) from `start`.
    pub(crate) fn copy_from(
        src: &CudaStorage,
        (outer, n, inner): (usize, usize, usize),
        start: usize,
        len: usize,
        shape: &[usize],
    ) -> Result<Tensor> {
        let dev = src.device();
        let mut out = dev.alloc(outer * len * inner)?;
        let cfg = grid(outer * len * inner)?;
        let (o, k, i, s, l) = (outer as i32, n as i32, inner as i32, start as i32, len as i32);
        launch!(
            &dev,
            "shape",
            "copy_from",
            cfg,
            src.slice(),
            out.slice_mut(),
            &o,
            &k,
            &i,
            &s,
            &l
        );
        Ok(Tensor::from_cuda(out, shape))
    }

    /// `[rows, cols]` with `src` (`[cols]`) on every row.
    pub(crate) fn broadcast_rows(src: &CudaStorage, rows: usize) -> Result<CudaStorage> {
        let (dev, cols) = (src.device(), src.len());
        let mut out = dev.alloc(rows * cols)?;
        let cfg = grid(rows * cols)?;
        launch!(
            &dev,
            "shape",
            "broadcast_rows",
            cfg,
            src.slice(),
            out.slice_mut(),
            &(rows as i32),
            &(cols as i32)
        );
        Ok(out)
    }

    pub(crate) fn permute(x: &CudaStorage, dims: Dims, shape: &[usize]) -> Result<Tensor> {
        let (dev, n) = (x.device(), x.len());
        let mut out = dev.alloc(n)?;
        launch!(
            &dev,
            "shape",
            "permute",
            grid(n)?,
            x.slice(),
            out.slice_mut(),
            &(n as i32),
            &dims
        );
        Ok(Tensor::from_cuda(out, shape))
    }
}

impl Graph {
    pub fn reshape(&mut self, x: Var, shape: &[usize]) -> Result<Var> {
        let in_shape = self.shape(x).to_vec();
        let y = self.value(x).reshape(shape)?;
        Ok(self.record(y, &[x], move |g| Ok(vec![Some(g.reshape(&in_shape)?)])))
    }

    pub fn concat(&mut self, xs: &[Var], axis: usize) -> Result<Var> {
        let vals: Vec<Tensor> = xs.iter().map(|&v| self.value(v).clone()).collect();
        let y = concat_forward(&vals.iter().collect::<Vec<_>>(), axis)?;
        let sizes: Vec<usize> = vals.iter().map(|t| t.shape()[axis]).collect();
        Ok(self.record(y, xs, move |g| {
            let mut start = 0;
            sizes
                .iter()
                .map(|&n| {
                    let s = slice_forward(g, axis, start, n);
                    start += n;
                    s.map(Some)
                })
                .collect()
        }))
    }

    pub fn slice(&mut self, x: Var, axis: usize, start: usize, len: usize) -> Result<Var> {
        let total = self.shape(x).get(axis).copied().unwrap_or(0);
        let y = slice_forward(self.value(x), axis, start, len)?;
        Ok(self.record(y, &[x], move |g| Ok(vec![Some(pad_axis(g, axis, start, total)?)])))
    }

    /// Stack equal-shaped tensors along a new axis.
    pub fn stack(&mut self, xs: &[Var], axis: usize) -> Result<Var> {
        let mut expanded = Vec::with_capacity(xs.len());
        for &x in xs {
            let mut s = self.shape(x).to_vec();
            ensure!(
                axis <= s.len(),
                "stack axis {axis} out of range for shape {}",
                fmt_shape(&s)
            );
            s.insert(axis, 1);
            expanded.push(self.reshape(x, &s)?);
        }
        self.concat(&expanded, axis)
    }

    pub fn permute(&mut self, x: Var, perm: &[usize]) -> Result<Var> {
        let y = permute_forward(self.value(x), perm)?;
        let mut inverse = vec![0; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p] = i;
        }
        Ok(self.record(y, &[x], move |g| Ok(vec![Some(permute_forward(g, &inverse)?)])))
    }

    /// Swap two axes.
    pub fn transpose(&mut self, x: Var, a: usize, b: usize) -> Result<Var> {
        let mut perm: Vec<usize> = (0..self.shape(x).len()).collect();
        ensure!(
            a < perm.len() && b < perm.len(),
            "transpose axes {a}, {b} out of range"
        );
        perm.swap(a, b);
        self.permute(x, &perm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_op, rand_tensor, Check};
    use crate::Device;

    #[test]
    fn gradcheck_reshape_concat_slice_stack_transpose() {
        let dev = Device::cpu();
        let a = rand_tensor(&[2, 3, 4], 1, &dev);
        let b = rand_tensor(&[2, 5, 4], 2, &dev);
        let c = rand_tensor(&[2, 3, 4], 3, &dev);
        let ck = Check::default();
        check_op(std::slice::from_ref(&a), ck, |g, v| g.reshape(v[0], &[6, 4])).unwrap();
        check_op(&[a.clone(), b.clone()], ck, |g, v| g.concat(&[v[0], v[1]], 1)).unwrap();
        check_op(std::slice::from_ref(&b), ck, |g, v| g.slice(v[0], 1, 1, 3)).unwrap();
        check_op(&[a.clone(), c.clone()], ck, |g, v| g.stack(&[v[0], v[1]], 3)).unwrap();
        check_op(std::slice::from_ref(&a), ck, |g, v| g.transpose(v[0], 0, 2)).unwrap();
        check_op(&[a], ck, |g, v| g.permute(v[0], &[1, 2, 0])).unwrap();
    }

    #[test]
    fn shape_ops_match_index_loops() {
        let dev = Device::cpu();
        let a = rand_tensor(&[2, 3, 4], 4, &dev);
        let av = a.to_vec().unwrap();
        let t = permute_forward(&a, &[2, 0, 1]).unwrap();
        assert_eq!(t.shape(), &[4, 2, 3]);
        let tv = t.to_vec().unwrap();
        for i in 0..2 {
            for j in 0..3 {
                for k in 0..4 {
                    assert_eq!(tv[(k * 2 + i) * 3 + j], av[(i * 3 + j) * 4 + k]);
                }
            }
        }
        let s = slice_forward(&a, 2, 1, 2).unwrap().to_vec().unwrap();
        assert_eq!(s[0], av[1]);
        assert_eq!(s[3], av[6]);
        let c = concat_forward(&[&a, &a], 0).unwrap();
        assert_eq!(c.to_vec().unwrap()[24..], av[..]);
    }

    #[test]
    fn bad_shape_arguments_are_errors() {
        let dev = Device::cpu();
        let a = rand_tensor(&[2, 3], 1, &dev);
        let b = rand_tensor(&[3, 3], 1, &dev);
        assert!(concat_forward(&[&a, &b], 1).is_err());
        assert!(slice_forward(&a, 1, 2, 2).is_err());
        assert!(permute_forward(&a, &[0, 0]).is_err());
    }
}
