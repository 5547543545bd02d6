//! Bilinear resizing of `[n, c, h, w]` images, number for number PyTorch's
//! `F.interpolate(mode="bilinear", align_corners=False, antialias=False)`,
//! for up- and downsampling alike (downsampling reads only the two nearest
//! source pixels per axis, as PyTorch does without antialias).

use anyhow::{ensure, Result};

use super::for_chunks;
use crate::autograd::{Graph, Var};
use crate::tensor::{fmt_shape, Storage, Tensor};

/// For one output index along an axis: the two source indices and their weights.
#[derive(Clone, Copy, Debug)]
struct Tap {
    i0: usize,
    i1: usize,
    w0: f32,
    w1: f32,
}

/// PyTorch's rule: source `(dst + 0.5) * in / out - 0.5`, clamped at 0,
/// computed in f32 as its CPU kernel does, so the weights match bit for bit.
fn taps(input: usize, output: usize) -> Vec<Tap> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|d| {
            let src = ((d as f32 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src as usize).min(input - 1);
            let w1 = (src - i0 as f32).clamp(0.0, 1.0);
            Tap {
                i0,
                i1: (i0 + 1).min(input - 1),
                w0: 1.0 - w1,
                w1,
            }
        })
        .collect()
}

/// Checked shapes: `(planes, h, w)` of the input.
fn geom(x: &Tensor, out_h: usize, out_w: usize) -> Result<(usize, usize, usize)> {
    ensure!(
        x.rank() == 4 && x.shape()[2] > 0 && x.shape()[3] > 0 && out_h > 0 && out_w > 0,
        "resize_bilinear: input {} to {out_h}x{out_w} (expected a non-empty [n, c, h, w] and output size)",
        fmt_shape(x.shape())
    );
    let s = x.shape();
    Ok((s[0] * s[1], s[2], s[3]))
}

/// Bilinear resize of every channel plane to `out_h x out_w`.
pub fn resize_bilinear_forward(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (planes, h, w) = geom(x, out_h, out_w)?;
    let (oh, ow) = (out_h, out_w);
    match x.storage() {
        Storage::Cuda(xs) => {
            let shape = [x.shape()[0], x.shape()[1], oh, ow];
            cuda::resize_bilinear(xs, (h, w), (oh, ow), &shape, false)
        }
        Storage::Cpu(_) => {
            let xs = x.cpu()?;
            let (ty, tx) = (taps(h, oh), taps(w, ow));
            let mut out = vec![0.0; planes * oh * ow];
            for_chunks(&mut out, oh * ow, |q, dst| {
                let src = &xs[q * h * w..][..h * w];
                for (row, a) in dst.chunks_mut(ow).zip(&ty) {
                    let (r0, r1) = (&src[a.i0 * w..][..w], &src[a.i1 * w..][..w]);
                    for (v, b) in row.iter_mut().zip(&tx) {
                        *v = a.w0 * (b.w0 * r0[b.i0] + b.w1 * r0[b.i1])
                            + a.w1 * (b.w0 * r1[b.i0] + b.w1 * r1[b.i1]);
                    }
                }
            });
            Tensor::from_vec(out, &[x.shape()[0], x.shape()[1], oh, ow], &x.device())
        }
    }
}

/// Gradient of [`resize_bilinear_forward`]: every output gradient goes back
/// to its four source pixels with the forward's weights.
pub fn resize_bilinear_backward(x: &Tensor, gy: &Tensor) -> Result<Tensor> {
    ensure!(
        gy.rank() == 4,
        "resize_bilinear output gradient: expected [n, c, h, w], got {}",
        fmt_shape(gy.shape())
    );
    let (oh, ow) = (gy.shape()[2], gy.shape()[3]);
    let (planes, h, w) = geom(x, oh, ow)?;
    gy.expect_shape(
        &[x.shape()[0], x.shape()[1], oh, ow],
        "resize_bilinear output gradient",
    )?;
    match x.storage() {
        Storage::Cuda(_) => cuda::resize_bilinear(gy.cuda()?, (h, w), (oh, ow), x.shape(), true),
        Storage::Cpu(_) => {
            let gs = gy.cpu()?;
            let (ty, tx) = (taps(h, oh), taps(w, ow));
            let mut dx = vec![0.0; planes * h * w];
            for_chunks(&mut dx, h * w, |q, dst| {
                let src = &gs[q * oh * ow..][..oh * ow];
                for (row, a) in src.chunks(ow).zip(&ty) {
                    for (&g, b) in row.iter().zip(&tx) {
                        let (g0, g1) = (a.w0 * g, a.w1 * g);
                        dst[a.i0 * w + b.i0] += g0 * b.w0;
                        dst[a.i0 * w + b.i1] += g0 * b.w1;
                        dst[a.i1 * w + b.i0] += g1 * b.w0;
                        dst[a.i1 * w + b.i1] += g1 * b.w1;
                    }
                }
            });
            x.same_shape(dx)
        }
    }
}

/// Launcher of kernels/resize.cu.
mod cuda {
    use anyhow::Result;

    use crate::device::cuda::{grid, launch, CudaStorage};
    use crate::tensor::Tensor;

    /// Resize `src` from `h x w` planes to `oh x ow` planes (`backward`
    /// false), or send output gradients `src` back to the input planes
    /// (`backward` true); the result has `shape`.
    pub(super) fn resize_bilinear(
        src: &CudaStorage,
        (h, w): (usize, usize),
        (oh, ow): (usize, usize),
        shape: &[usize],
        backward: bool,
    ) -> Result<Tensor> {
        let (dev, n) = (src.device(), shape.iter().product::<usize>());
        let mut out = dev.alloc(n)?;
        let cfg = grid(n)?;
        // The CPU's `taps` scales, so both compute the same source positions.
        let (sy, sx) = (h as f32 / oh as f32, w as f32 / ow as f32);
        let [n, h, w, oh, ow] = [n, h, w, oh, ow].map(|v| v as i32);
        // Forward and backward take the same arguments.
        macro_rules! go {
            ($kernel:literal) => {
                launch!(
                    &dev,
                    "resize",
                    $kernel,
                    cfg,
                    src.slice(),
                    out.slice_mut(),
                    &n,
                    &h,
                    &w,
                    &oh,
                    &ow,
                    &sy,
                    &sx
                )
            };
        }
        if backward {
            go!("resize_bilinear_backward");
        } else {
            go!("resize_bilinear");
        }
        Ok(Tensor::from_cuda(out, shape))
    }
}

impl Graph {
    /// Bilinear resize to `out_h x out_w` (PyTorch `align_corners=False`).
    pub fn resize_bilinear(&mut self, x: Var, out_h: usize, out_w: usize) -> Result<Var> {
        let xv = self.value(x).clone();
        let y = resize_bilinear_forward(&xv, out_h, out_w)?;
        Ok(self.record(y, &[x], move |g| {
            Ok(vec![Some(resize_bilinear_backward(&xv, g)?)])
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_op, rand_tensor, Check};
    use crate::Device;

    /// Expected values printed by PyTorch 2.15 (CPU) with:
    ///
    /// ```python
    /// import torch, torch.nn.functional as F
    /// x = (torch.arange(1, 16, dtype=torch.float32) ** 1.5 / 10).reshape(1, 1, 3, 5)
    /// for size in [(2, 3), (7, 4), (5, 9), (1, 1)]:
    ///     y = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
    ///     print(size, [round(v, 5) for v in y.flatten().tolist()])
    /// ```
    #[test]
    fn resize_bilinear_matches_pytorch() {
        let dev = Device::cpu();
        let xs: Vec<f32> = (1..16).map(|i| (i as f32).powf(1.5) / 10.0).collect();
        let x = Tensor::from_vec(xs, &[1, 1, 3, 5], &dev).unwrap();
        let cases: [((usize, usize), &[f32]); 4] = [
            ((2, 3), &[0.52, 0.9554, 1.51106, 3.26266, 4.0811, 4.96636]),
            (
                (7, 4),
                &[
                    0.12286, 0.37163, 0.69486, 1.07828, 0.32209, 0.60512, 0.95788, 1.36774, 0.91979, 1.30558,
                    1.74695, 2.23612, 1.51749, 2.00604, 2.53603, 3.10449, 2.45793, 3.01308, 3.60558, 4.23317,
                    3.39838, 4.02011, 4.67514, 5.36185, 3.71187, 4.35578, 5.03166, 5.73808,
                ],
            ),
            (
                (5, 9),
                &[
                    0.1, 0.16095, 0.26253, 0.38807, 0.51962, 0.67538, 0.83534, 1.01202, 1.11803, 0.64788,
                    0.73542, 0.88133, 1.04667, 1.21687, 1.4075, 1.60175, 1.81049, 1.93573, 1.46969, 1.59714,
                    1.80954, 2.03457, 2.26274, 2.50566, 2.75136, 3.00819, 3.16228, 2.77685, 2.92955, 3.18406,
                    3.44939, 3.71743, 3.9983, 4.28162, 4.57473, 4.7506, 3.64829, 3.81783, 4.10041, 4.39261,
                    4.68722, 4.99339, 5.30178, 5.61909, 5.80947,
                ],
            ),
            ((1, 1), &[2.26274]),
        ];
        for ((oh, ow), want) in cases {
            let y = resize_bilinear_forward(&x, oh, ow).unwrap();
            assert_eq!(y.shape(), &[1, 1, oh, ow]);
            for (i, (a, b)) in y.to_vec().unwrap().iter().zip(want).enumerate() {
                assert!((a - b).abs() < 2e-5, "{oh}x{ow} at {i}: {a} vs torch {b}");
            }
        }
    }

    #[test]
    fn resize_to_same_size_is_identity() {
        let dev = Device::cpu();
        let x = rand_tensor(&[2, 3, 5, 7], 1, &dev);
        let y = resize_bilinear_forward(&x, 5, 7).unwrap();
        assert_eq!(y.to_vec().unwrap(), x.to_vec().unwrap());
    }

    #[test]
    fn gradcheck_resize_bilinear() {
        let dev = Device::cpu();
        // Up, down (by non-integer factors), mixed, and to a single pixel.
        for (shape, oh, ow) in [
            ([2, 2, 3, 4], 7, 9),
            ([1, 2, 9, 11], 4, 5),
            ([1, 3, 5, 4], 3, 10),
            ([2, 1, 4, 6], 1, 1),
        ] {
            let x = rand_tensor(&shape, 3, &dev);
            check_op(&[x], Check::default(), |g, v| g.resize_bilinear(v[0], oh, ow))
                .unwrap_or_else(|e| panic!("{shape:?} -> {oh}x{ow}: {e}"));
        }
    }

    #[test]
    fn resize_shape_errors() {
        let dev = Device::cpu();
        let x = rand_tensor(&[1, 2, 3, 5], 1, &dev);
        let e = resize_bilinear_forward(&x, 0, 4).unwrap_err().to_string();
        assert!(e.contains("resize_bilinear") && e.contains("[1, 2, 3, 5]"), "{e}");
        assert!(resize_bilinear_forward(&rand_tensor(&[2, 3, 5], 1, &dev), 4, 4).is_err());
        assert!(resize_bilinear_backward(&x, &rand_tensor(&[1, 3, 4, 4], 1, &dev)).is_err());
    }
}
