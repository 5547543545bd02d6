//! Reductions: sum and mean over axes, and the broadcast pair
//! `sum_to_shape` / `broadcast_to` (each the other's adjoint).

use anyhow::{ensure, Result};

use super::par_fill;
use crate::autograd::{Graph, Var};
use crate::tensor::{fmt_shape, Storage, Tensor};

/// Sum one axis of a tensor viewed as `[outer, n, inner]`, keeping the axis as 1.
fn sum_axis(x: &Tensor, axis: usize) -> Result<Tensor> {
    let shape = x.shape();
    let outer: usize = shape[..axis].iter().product();
    let n = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let mut out_shape = shape.to_vec();
    out_shape[axis] = 1;
    match x.storage() {
        Storage::Cpu(_) => {
            let xs = x.cpu()?;
            let data = par_fill(x.host(), outer * inner, |o| {
                let (a, b) = (o / inner, o % inner);
                let base = a * n * inner + b;
                let mut s = 0.0f64;
                for k in 0..n {
                    s += xs[base + k * inner] as f64;
                }
                s as f32
            });
            Tensor::from_vec(data, &out_shape, &x.device())
        }
        Storage::Cuda(xs) => cuda::sum_axis(xs, (outer, n, inner), &out_shape),
    }
}

/// Launchers of kernels/reduce.cu.
pub(crate) mod cuda {
    use anyhow::Result;
    use cudarc::driver::LaunchConfig;

    use crate::device::cuda::{grid, launch, CudaStorage, BLOCK};
    use crate::tensor::Tensor;

    /// Sum the middle axis of `x` viewed as `[outer, n, inner]`.
    pub(crate) fn sum_axis(
        x: &CudaStorage,
        (outer, n, inner): (usize, usize, usize),
        shape: &[usize],
    ) -> Result<Tensor> {
        let dev = x.device();
        let outs = outer * inner;
        let mut out = dev.alloc(outs)?;
        let (o, k, i) = (outer as i32, n as i32, inner as i32);
        // A block per output only pays when outputs are too few to fill the
        // GPU (and with no outputs it would be a grid of 0 blocks, which fails).
        if (1..4096).contains(&outs) && n >= 256 {
            grid(outs)?;
            let cfg = LaunchConfig {
                grid_dim: (outs as u32, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(
                &dev,
                "reduce",
                "sum_axis_block",
                cfg,
                x.slice(),
                out.slice_mut(),
                &o,
                &k,
                &i
            );
        } else {
            launch!(
                &dev,
                "reduce",
                "sum_axis",
                grid(outs)?,
                x.slice(),
                out.slice_mut(),
                &o,
                &k,
                &i
            );
        }
        Ok(Tensor::from_cuda(out, shape))
    }
}

/// Sum `x` down to `shape`, which must broadcast to `x`'s shape (the
/// gradient of a broadcast).
pub fn sum_to_shape(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if x.shape() == shape {
        return Ok(x.clone());
    }
    let r = x.rank();
    ensure!(
        shape.len() <= r,
        "cannot sum {} down to {}",
        fmt_shape(x.shape()),
        fmt_shape(shape)
    );
    let off = r - shape.len();
    let mut y = x.clone();
    for axis in 0..r {
        let target = if axis >= off { shape[axis - off] } else { 1 };
        if x.shape()[axis] != target {
            ensure!(
                target == 1,
                "cannot sum {} down to {}",
                fmt_shape(x.shape()),
                fmt_shape(shape)
            );
            y = sum_axis(&y, axis)?;
        }
    }
    y.reshape(shape)
}

/// Repeat `x` along its size-1 (or missing leading) axes to `shape`.
pub fn broadcast_to(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if x.shape() == shape {
        return Ok(x.clone());
    }
    let zeros = Tensor::zeros(shape, &x.device());
    let y = super::elementwise::binary_forward(&zeros, x, super::elementwise::Binary::Add)?;
    ensure!(
        y.shape() == shape,
        "cannot broadcast {} to {}",
        fmt_shape(x.shape()),
        fmt_shape(shape)
    );
    Ok(y)
}

/// Shape with `axes` set to 1.
fn kept_shape(shape: &[usize], axes: &[usize]) -> Result<Vec<usize>> {
    let mut s = shape.to_vec();
    for &a in axes {
        ensure!(
            a < shape.len(),
            "axis {a} out of range for shape {}",
            fmt_shape(shape)
        );
        s[a] = 1;
    }
    Ok(s)
}

/// Sum over `axes`; with `keepdim` the axes stay as size 1.
pub fn sum_forward(x: &Tensor, axes: &[usize], keepdim: bool) -> Result<Tensor> {
    let kept = kept_shape(x.shape(), axes)?;
    let y = sum_to_shape(x, &kept)?;
    if keepdim {
        return Ok(y);
    }
    let out: Vec<usize> = (0..x.rank())
        .filter(|a| !axes.contains(a))
        .map(|a| x.shape()[a])
        .collect();
    y.reshape(if out.is_empty() { &[1] } else { &out })
}

impl Graph {
    /// Sum over `axes`; with `keepdim` they stay as size-1 axes.
    pub fn sum(&mut self, x: Var, axes: &[usize], keepdim: bool) -> Result<Var> {
        let xv = self.value(x);
        let in_shape = xv.shape().to_vec();
        let kept = kept_shape(&in_shape, axes)?;
        let y = sum_forward(xv, axes, keepdim)?;
        Ok(self.record(y, &[x], move |g| {
            Ok(vec![Some(broadcast_to(&g.reshape(&kept)?, &in_shape)?)])
        }))
    }

    /// Mean over `axes`.
    pub fn mean(&mut self, x: Var, axes: &[usize], keepdim: bool) -> Result<Var> {
        let n: usize = axes
            .iter()
            .map(|&a| self.shape(x).get(a).copied().unwrap_or(1))
            .product();
        let s = self.sum(x, axes, keepdim)?;
        self.affine(s, 1.0 / n as f32, 0.0)
    }

    /// Sum of every element, shape `[1]`.
    pub fn sum_all(&mut self, x: Var) -> Result<Var> {
        let axes: Vec<usize> = (0..self.shape(x).len()).collect();
        self.sum(x, &axes, false)
    }

    /// Mean of every element, shape `[1]`.
    pub fn mean_all(&mut self, x: Var) -> Result<Var> {
        let axes: Vec<usize> = (0..self.shape(x).len()).collect();
        self.mean(x, &axes, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_op, rand_tensor, Check};
    use crate::Device;

    #[test]
    fn sum_matches_reference_loop() {
        let dev = Device::cpu();
        let x = rand_tensor(&[3, 4, 5], 1, &dev);
        let xs = x.to_vec().unwrap();
        let y = sum_forward(&x, &[0, 2], false).unwrap();
        assert_eq!(y.shape(), &[4]);
        let yv = y.to_vec().unwrap();
        for j in 0..4 {
            let mut s = 0.0;
            for i in 0..3 {
                for k in 0..5 {
                    s += xs[(i * 4 + j) * 5 + k];
                }
            }
            assert!((yv[j] - s).abs() < 1e-5);
        }
        assert!(sum_forward(&x, &[3], false).is_err());
    }

    #[test]
    fn gradcheck_sum_mean() {
        let dev = Device::cpu();
        let x = rand_tensor(&[3, 4, 5], 2, &dev);
        check_op(std::slice::from_ref(&x), Check::default(), |g, v| {
            g.sum(v[0], &[1], false)
        })
        .unwrap();
        check_op(std::slice::from_ref(&x), Check::default(), |g, v| {
            g.sum(v[0], &[0, 2], true)
        })
        .unwrap();
        check_op(std::slice::from_ref(&x), Check::default(), |g, v| {
            g.mean(v[0], &[2], false)
        })
        .unwrap();
        check_op(&[x], Check::default(), |g, v| g.mean_all(v[0])).unwrap();
    }

    #[test]
    fn sum_to_shape_and_broadcast_to_are_adjoint() {
        let dev = Device::cpu();
        let x = rand_tensor(&[2, 3, 4], 3, &dev);
        let s = sum_to_shape(&x, &[3, 1]).unwrap();
        let b = broadcast_to(&s, &[2, 3, 4]).unwrap();
        assert_eq!(b.shape(), &[2, 3, 4]);
        // <sum_to(x), s> == <x, broadcast(s)>
        let lhs: f32 = s.to_vec().unwrap().iter().map(|v| v * v).sum();
        let rhs: f32 = x
            .to_vec()
            .unwrap()
            .iter()
            .zip(b.to_vec().unwrap())
            .map(|(a, b)| a * b)
            .sum();
        assert!((lhs - rhs).abs() < 1e-3 * lhs.abs().max(1.0));
        assert!(sum_to_shape(&x, &[5]).is_err());
    }
}
