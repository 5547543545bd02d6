//! Pooling: `avg_pool2d` over square windows without padding (PyTorch's
//! `F.avg_pool2d(x, kernel, stride)`, floor mode), `max_pool2d` with
//! padding (`F.max_pool2d(x, kernel, stride, padding)`, ResNet's stem), and
//! `global_avg_pool` of each channel plane to one value. Every (image,
//! channel) plane is independent, so the CPU loops thread over planes.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::for_chunks;
use crate::autograd::{Graph, Var};
use crate::tensor::{fmt_shape, Storage, Tensor};

/// Output size of `avg_pool2d`, or an error naming the shapes.
fn pool_geom(x: &Tensor, kernel: usize, stride: usize) -> Result<(usize, usize)> {
    ensure!(
        x.rank() == 4 && kernel >= 1 && stride >= 1 && x.shape()[2] >= kernel && x.shape()[3] >= kernel,
        "avg_pool2d: input {} with kernel {kernel}, stride {stride} (expected [n, c, h, w] with h, w >= kernel >= 1, \
         stride >= 1)",
        fmt_shape(x.shape())
    );
    let out = |s: usize| (s - kernel) / stride + 1;
    Ok((out(x.shape()[2]), out(x.shape()[3])))
}

/// Mean of every `kernel x kernel` window, windows `stride` apart: `[n, c, h, w]
/// -> [n, c, (h - kernel) / stride + 1, (w - kernel) / stride + 1]`.
pub fn avg_pool2d_forward(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    let (ho, wo) = pool_geom(x, kernel, stride)?;
    let (n, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let scale = 1.0 / (kernel * kernel) as f32;
    match x.storage() {
        Storage::Cuda(xs) => {
            let win = cuda::Window::new((h, w), (ho, wo), (kernel, stride, 0));
            cuda::avg_pool2d(xs, win, scale, &[n, c, ho, wo])
        }
        Storage::Cpu(_) => {
            let xs = x.cpu()?;
            let mut out = x.host().buffer(n * c * ho * wo);
            for_chunks(&mut out, ho * wo, |q, dst| {
                let src = &xs[q * h * w..][..h * w];
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut s = 0.0;
                        for i in 0..kernel {
                            s += src[(oy * stride + i) * w + ox * stride..][..kernel]
                                .iter()
                                .sum::<f32>();
                        }
                        dst[oy * wo + ox] = s * scale;
                    }
                }
            });
            Tensor::from_vec(out, &[n, c, ho, wo], &x.device())
        }
    }
}

/// Gradient of [`avg_pool2d_forward`]: each output gradient spread evenly
/// over its window (overlapping windows add up).
pub fn avg_pool2d_backward(x: &Tensor, gy: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    let (ho, wo) = pool_geom(x, kernel, stride)?;
    let (n, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    gy.expect_shape(&[n, c, ho, wo], "avg_pool2d output gradient")?;
    let scale = 1.0 / (kernel * kernel) as f32;
    match x.storage() {
        Storage::Cuda(_) => {
            let win = cuda::Window::new((h, w), (ho, wo), (kernel, stride, 0));
            cuda::avg_pool2d_backward(gy.cuda()?, win, scale, x.shape())
        }
        Storage::Cpu(_) => {
            let gs = gy.cpu()?;
            let mut dx = x.host().zeros(x.numel());
            for_chunks(&mut dx, h * w, |q, dst| {
                let src = &gs[q * ho * wo..][..ho * wo];
                for oy in 0..ho {
                    for ox in 0..wo {
                        let v = src[oy * wo + ox] * scale;
                        for i in 0..kernel {
                            let row = &mut dst[(oy * stride + i) * w + ox * stride..][..kernel];
                            row.iter_mut().for_each(|d| *d += v);
                        }
                    }
                }
            });
            x.same_shape(dx)
        }
    }
}

/// Output size of `max_pool2d`, or an error naming the shapes. Padding is at
/// most half the kernel (as in PyTorch), so every window holds a real pixel.
fn max_pool_geom(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<(usize, usize)> {
    ensure!(
        x.rank() == 4
            && kernel >= 1
            && stride >= 1
            && 2 * padding <= kernel
            && x.shape()[2] + 2 * padding >= kernel
            && x.shape()[3] + 2 * padding >= kernel,
        "max_pool2d: input {} with kernel {kernel}, stride {stride}, padding {padding} (expected [n, c, h, w] \
         with h + 2 padding, w + 2 padding >= kernel >= 1, stride >= 1, padding <= kernel / 2)",
        fmt_shape(x.shape())
    );
    let out = |s: usize| (s + 2 * padding - kernel) / stride + 1;
    Ok((out(x.shape()[2]), out(x.shape()[3])))
}

/// For each output of one `h x w` plane, the index in the plane of its
/// window's maximum (the first one on ties, as PyTorch).
fn max_pool_argmax(
    src: &[f32],
    (h, w): (usize, usize),
    (ho, wo): (usize, usize),
    (kernel, stride, padding): (usize, usize, usize),
    mut f: impl FnMut(usize, usize),
) {
    for oy in 0..ho {
        let y0 = (oy * stride).saturating_sub(padding);
        let y1 = (oy * stride + kernel - padding).min(h);
        for ox in 0..wo {
            let x0 = (ox * stride).saturating_sub(padding);
            let x1 = (ox * stride + kernel - padding).min(w);
            let mut best = y0 * w + x0;
            for y in y0..y1 {
                for (x, &v) in src[y * w..][x0..x1].iter().enumerate() {
                    if v > src[best] {
                        best = y * w + x0 + x;
                    }
                }
            }
            f(oy * wo + ox, best);
        }
    }
}

/// Maximum of every `kernel x kernel` window, windows `stride` apart, over
/// the input padded by `padding` on each side (padding never wins):
/// `[n, c, h, w] -> [n, c, (h + 2p - k) / s + 1, (w + 2p - k) / s + 1]`.
pub fn max_pool2d_forward(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let (ho, wo) = max_pool_geom(x, kernel, stride, padding)?;
    let (n, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    match x.storage() {
        Storage::Cuda(xs) => {
            let win = cuda::Window::new((h, w), (ho, wo), (kernel, stride, padding));
            cuda::max_pool2d(xs, win, &[n, c, ho, wo])
        }
        Storage::Cpu(_) => {
            let xs = x.cpu()?;
            let mut out = x.host().buffer(n * c * ho * wo);
            for_chunks(&mut out, ho * wo, |q, dst| {
                let src = &xs[q * h * w..][..h * w];
                max_pool_argmax(src, (h, w), (ho, wo), (kernel, stride, padding), |o, i| {
                    dst[o] = src[i]
                });
            });
            Tensor::from_vec(out, &[n, c, ho, wo], &x.device())
        }
    }
}

/// Gradient of [`max_pool2d_forward`]: each output gradient goes to its
/// window's maximum (found again from `x`; overlapping windows add up).
pub fn max_pool2d_backward(
    x: &Tensor,
    gy: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (ho, wo) = max_pool_geom(x, kernel, stride, padding)?;
    let (n, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    gy.expect_shape(&[n, c, ho, wo], "max_pool2d output gradient")?;
    match x.storage() {
        Storage::Cuda(xs) => {
            let win = cuda::Window::new((h, w), (ho, wo), (kernel, stride, padding));
            cuda::max_pool2d_backward(xs, gy.cuda()?, win, x.shape())
        }
        Storage::Cpu(_) => {
            let (xs, gs) = (x.cpu()?, gy.cpu()?);
            let mut dx = x.host().zeros(x.numel());
            for_chunks(&mut dx, h * w, |q, dst| {
                let (src, g) = (&xs[q * h * w..][..h * w], &gs[q * ho * wo..][..ho * wo]);
                max_pool_argmax(src, (h, w), (ho, wo), (kernel, stride, padding), |o, i| {
                    dst[i] += g[o]
                });
            });
            x.same_shape(dx)
        }
    }
}

fn check_global(x: &Tensor) -> Result<()> {
    ensure!(
        x.rank() == 4 && x.shape()[2] * x.shape()[3] > 0,
        "global_avg_pool: expected a non-empty [n, c, h, w] input, got {}",
        fmt_shape(x.shape())
    );
    Ok(())
}

/// Mean of each channel plane: `[n, c, h, w] -> [n, c]`.
pub fn global_avg_pool_forward(x: &Tensor) -> Result<Tensor> {
    check_global(x)?;
    let (n, c, hw) = (x.shape()[0], x.shape()[1], x.shape()[2] * x.shape()[3]);
    match x.storage() {
        Storage::Cuda(xs) => cuda::global_avg_pool(xs, hw, &[n, c]),
        Storage::Cpu(_) => {
            let xs = x.cpu()?;
            let out = xs
                .par_chunks(hw)
                .map(|p| p.iter().sum::<f32>() / hw as f32)
                .collect();
            Tensor::from_vec(out, &[n, c], &x.device())
        }
    }
}

/// Gradient of [`global_avg_pool_forward`]: `gy[n, c] / (h * w)` over the plane.
pub fn global_avg_pool_backward(x: &Tensor, gy: &Tensor) -> Result<Tensor> {
    check_global(x)?;
    let (n, c, hw) = (x.shape()[0], x.shape()[1], x.shape()[2] * x.shape()[3]);
    gy.expect_shape(&[n, c], "global_avg_pool output gradient")?;
    match x.storage() {
        Storage::Cuda(_) => cuda::global_avg_pool_backward(gy.cuda()?, hw, x.shape()),
        Storage::Cpu(_) => {
            let gs = gy.cpu()?;
            let mut dx = x.host().buffer(x.numel());
            for_chunks(&mut dx, hw, |q, p| p.fill(gs[q] / hw as f32));
            x.same_shape(dx)
        }
    }
}

/// Launchers of kernels/pool.cu.
mod cuda {
    use anyhow::Result;

    use crate::device::cuda::{grid, launch, CudaStorage};
    use crate::tensor::Tensor;

    /// A pooling's geometry as the kernels take it (mirrors `struct Window`
    /// in kernels/pool.cu): input and output plane sizes, window size,
    /// stride and padding.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub(super) struct Window {
        h: i32,
        w: i32,
        ho: i32,
        wo: i32,
        k: i32,
        s: i32,
        p: i32,
    }

    // SAFETY: plain `repr(C)` integers, laid out as the kernels' `struct Window`.
    unsafe impl crate::device::cuda::KernelValue for Window {
        const C_TYPE: &'static str = "Window";
    }

    impl Window {
        pub(super) fn new(
            (h, w): (usize, usize),
            (ho, wo): (usize, usize),
            (k, s, p): (usize, usize, usize),
        ) -> Window {
            let [h, w, ho, wo, k, s, p] = [h, w, ho, wo, k, s, p].map(|v| v as i32);
            Window {
                h,
                w,
                ho,
                wo,
                k,
                s,
                p,
            }
        }
    }

    pub(super) fn avg_pool2d(x: &CudaStorage, win: Window, scale: f32, shape: &[usize]) -> Result<Tensor> {
        let (dev, n) = (x.device(), shape.iter().product::<usize>());
        let mut y = dev.alloc(n)?;
        let cfg = grid(n)?;
        launch!(
            &dev,
            "pool",
            "avg_pool2d",
            cfg,
            x.slice(),
            y.slice_mut(),
            &(n as i32),
            &win,
            &scale
        );
        Ok(Tensor::from_cuda(y, shape))
    }

    pub(super) fn avg_pool2d_backward(
        gy: &CudaStorage,
        win: Window,
        scale: f32,
        shape: &[usize],
    ) -> Result<Tensor> {
        let (dev, n) = (gy.device(), shape.iter().product::<usize>());
        let mut dx = dev.alloc(n)?;
        let cfg = grid(n)?;
        launch!(
            &dev,
            "pool",
            "avg_pool2d_backward",
            cfg,
            gy.slice(),
            dx.slice_mut(),
            &(n as i32),
            &win,
            &scale
        );
        Ok(Tensor::from_cuda(dx, shape))
    }

    pub(super) fn max_pool2d(x: &CudaStorage, win: Window, shape: &[usize]) -> Result<Tensor> {
        let (dev, n) = (x.device(), shape.iter().product::<usize>());
        let mut y = dev.alloc(n)?;
        let cfg = grid(n)?;
        launch!(
            &dev,
            "pool",
            "max_pool2d",
            cfg,
            x.slice(),
            y.slice_mut(),
            &(n as i32),
            &win
        );
        Ok(Tensor::from_cuda(y, shape))
    }

    pub(super) fn max_pool2d_backward(
        x: &CudaStorage,
        gy: &CudaStorage,
        win: Window,
        shape: &[usize],
    ) -> Result<Tensor> {
        let (dev, n) = (x.device(), x.len());
        let mut dx = dev.alloc(n)?;
        let cfg = grid(n)?;
        launch!(
            &dev,
            "pool",
            "max_pool2d_backward",
            cfg,
            x.slice(),
            gy.slice(),
            dx.slice_mut(),
            &(n as i32),
            &win
        );
        Ok(Tensor::from_cuda(dx, shape))
    }

    pub(super) fn global_avg_pool(x: &CudaStorage, hw: usize, shape: &[usize]) -> Result<Tensor> {
        let (dev, planes) = (x.device(), x.len() / hw);
        let mut y = dev.alloc(planes)?;
        let cfg = grid(planes)?;
        launch!(
            &dev,
            "pool",
            "global_avg_pool",
            cfg,
            x.slice(),
            y.slice_mut(),
            &(planes as i32),
            &(hw as i32)
        );
        Ok(Tensor::from_cuda(y, shape))
    }

    pub(super) fn global_avg_pool_backward(gy: &CudaStorage, hw: usize, shape: &[usize]) -> Result<Tensor> {
        let (dev, n) = (gy.device(), gy.len() * hw);
        let mut dx = dev.alloc(n)?;
        let cfg = grid(n)?;
        launch!(
            &dev,
            "pool",
            "global_avg_pool_backward",
            cfg,
            gy.slice(),
            dx.slice_mut(),
            &(n as i32),
            &(hw as i32)
        );
        Ok(Tensor::from_cuda(dx, shape))
    }
}

impl Graph {
    /// Average pooling over `kernel x kernel` windows, `stride` apart, no padding.
    pub fn avg_pool2d(&mut self, x: Var, kernel: usize, stride: usize) -> Result<Var> {
        let xv = self.value(x).clone();
        let y = avg_pool2d_forward(&xv, kernel, stride)?;
        Ok(self.record(y, &[x], move |g| {
            Ok(vec![Some(avg_pool2d_backward(&xv, g, kernel, stride)?)])
        }))
    }

    /// Max pooling over `kernel x kernel` windows, `stride` apart, with `padding`.
    pub fn max_pool2d(&mut self, x: Var, kernel: usize, stride: usize, padding: usize) -> Result<Var> {
        let xv = self.value(x).clone();
        let y = max_pool2d_forward(&xv, kernel, stride, padding)?;
        Ok(self.record(y, &[x], move |g| {
            Ok(vec![Some(max_pool2d_backward(&xv, g, kernel, stride, padding)?)])
        }))
    }

    /// Mean over each channel plane: `[n, c, h, w] -> [n, c]`.
    pub fn global_avg_pool(&mut self, x: Var) -> Result<Var> {
        let xv = self.value(x).clone();
        let y = global_avg_pool_forward(&xv)?;
        Ok(self.record(y, &[x], move |g| {
            Ok(vec![Some(global_avg_pool_backward(&xv, g)?)])
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_op, rand_tensor, Check};
    use crate::Device;

    #[test]
    fn avg_pool2d_matches_reference_loop() {
        let dev = Device::cpu();
        // (shape, kernel, stride): odd sizes with leftover rows and columns,
        // overlapping windows, stride wider than the kernel.
        for (shape, k, s) in [
            ([2, 3, 7, 9], 2, 2),
            ([1, 2, 8, 5], 3, 1),
            ([3, 1, 11, 10], 3, 2),
            ([1, 1, 9, 9], 2, 3),
            ([2, 2, 4, 4], 4, 4),
        ] {
            let x = rand_tensor(&shape, 1, &dev);
            let y = avg_pool2d_forward(&x, k, s).unwrap();
            let [n, c, h, w] = shape;
            let (ho, wo) = ((h - k) / s + 1, (w - k) / s + 1);
            assert_eq!(y.shape(), &[n, c, ho, wo]);
            let (xs, ys) = (x.to_vec().unwrap(), y.to_vec().unwrap());
            for q in 0..n * c {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut sum = 0.0;
                        for i in 0..k {
                            for j in 0..k {
                                sum += xs[(q * h + oy * s + i) * w + ox * s + j];
                            }
                        }
                        let want = sum / (k * k) as f32;
                        let got = ys[(q * ho + oy) * wo + ox];
                        assert!((got - want).abs() < 1e-5, "{shape:?} k{k} s{s}: {got} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn gradcheck_avg_pool2d() {
        let dev = Device::cpu();
        for (shape, k, s) in [([2, 3, 7, 5], 3, 2), ([1, 2, 6, 7], 2, 1), ([1, 2, 9, 8], 2, 3)] {
            let x = rand_tensor(&shape, 2, &dev);
            check_op(&[x], Check::default(), |g, v| g.avg_pool2d(v[0], k, s))
                .unwrap_or_else(|e| panic!("{shape:?} k{k} s{s}: {e}"));
        }
    }

    /// Distinct values at least 0.05 apart in shuffled order, so that the
    /// finite-difference step never changes which element is a maximum.
    fn distinct_tensor(shape: &[usize], seed: u64, dev: &Device) -> Tensor {
        use rand::seq::SliceRandom;
        let n: usize = shape.iter().product();
        let mut v: Vec<f32> = (0..n).map(|i| (i as f32 - n as f32 / 2.0) * 0.05).collect();
        v.shuffle(&mut crate::gradcheck::rng(seed));
        Tensor::from_vec(v, shape, dev).unwrap()
    }

    #[test]
    fn max_pool2d_matches_reference_loop() {
        let dev = Device::cpu();
        // (shape, kernel, stride, padding): ResNet's 3/2/1, odd sizes,
        // overlapping windows, no padding, stride wider than the kernel.
        for (shape, k, s, p) in [
            ([2, 3, 9, 7], 3, 2, 1),
            ([1, 2, 8, 5], 3, 1, 0),
            ([3, 1, 11, 10], 2, 2, 1),
            ([1, 1, 9, 9], 2, 3, 0),
            ([2, 2, 4, 4], 4, 4, 2),
            ([1, 1, 1, 1], 3, 2, 1),
        ] {
            let x = rand_tensor(&shape, 4, &dev);
            let y = max_pool2d_forward(&x, k, s, p).unwrap();
            let [n, c, h, w] = shape;
            let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
            assert_eq!(y.shape(), &[n, c, ho, wo]);
            let (xs, ys) = (x.to_vec().unwrap(), y.to_vec().unwrap());
            for q in 0..n * c {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut want = f32::NEG_INFINITY;
                        for i in 0..k {
                            for j in 0..k {
                                let (yy, xx) =
                                    ((oy * s + i) as i64 - p as i64, (ox * s + j) as i64 - p as i64);
                                if yy >= 0 && xx >= 0 && (yy as usize) < h && (xx as usize) < w {
                                    want = want.max(xs[(q * h + yy as usize) * w + xx as usize]);
                                }
                            }
                        }
                        let got = ys[(q * ho + oy) * wo + ox];
                        assert_eq!(got, want, "{shape:?} k{k} s{s} p{p}");
                    }
                }
            }
        }
    }

    #[test]
    fn gradcheck_max_pool2d() {
        let dev = Device::cpu();
        for (shape, k, s, p) in [
            ([2, 2, 7, 6], 3, 2, 1),
            ([1, 2, 6, 7], 2, 1, 0),
            ([1, 1, 9, 8], 3, 3, 1),
        ] {
            let x = distinct_tensor(&shape, 5, &dev);
            check_op(&[x], Check::default(), |g, v| g.max_pool2d(v[0], k, s, p))
                .unwrap_or_else(|e| panic!("{shape:?} k{k} s{s} p{p}: {e}"));
        }
    }

    #[test]
    fn max_pool2d_backward_sends_each_gradient_to_its_maximum() {
        let dev = Device::cpu();
        let x = Tensor::from_vec(
            vec![1.0, 5.0, 2.0, 0.0, 3.0, 4.0, 9.0, 8.0, 7.0],
            &[1, 1, 3, 3],
            &dev,
        )
        .unwrap();
        // 2x2 windows, stride 1: maxima 5, 5, 9, 8.
        let gy = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[1, 1, 2, 2], &dev).unwrap();
        let dx = max_pool2d_backward(&x, &gy, 2, 1, 0).unwrap().to_vec().unwrap();
        assert_eq!(dx, vec![0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 3.0, 4.0, 0.0]);
    }

    #[test]
    fn global_avg_pool_matches_mean_and_gradchecks() {
        let dev = Device::cpu();
        let x = rand_tensor(&[2, 3, 5, 7], 3, &dev);
        let y = global_avg_pool_forward(&x).unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        let (xs, ys) = (x.to_vec().unwrap(), y.to_vec().unwrap());
        for q in 0..6 {
            let want = xs[q * 35..(q + 1) * 35].iter().sum::<f32>() / 35.0;
            assert!((ys[q] - want).abs() < 1e-5);
        }
        check_op(&[x], Check::default(), |g, v| g.global_avg_pool(v[0])).unwrap();
    }

    #[test]
    fn pool_shape_errors() {
        let dev = Device::cpu();
        let x = rand_tensor(&[1, 2, 3, 5], 1, &dev);
        let e = avg_pool2d_forward(&x, 4, 1).unwrap_err().to_string();
        assert!(e.contains("avg_pool2d") && e.contains("[1, 2, 3, 5]"), "{e}");
        assert!(avg_pool2d_forward(&x, 2, 0).is_err());
        assert!(avg_pool2d_forward(&x, 0, 1).is_err());
        assert!(avg_pool2d_forward(&rand_tensor(&[2, 3, 5], 1, &dev), 2, 2).is_err());
        assert!(global_avg_pool_forward(&rand_tensor(&[2, 3], 1, &dev)).is_err());
        let e = max_pool2d_forward(&x, 3, 2, 2).unwrap_err().to_string();
        assert!(e.contains("max_pool2d") && e.contains("[1, 2, 3, 5]"), "{e}");
        assert!(max_pool2d_forward(&x, 5, 1, 0).is_err());
        assert!(max_pool2d_forward(&x, 3, 0, 1).is_err());
        assert!(max_pool2d_backward(&x, &rand_tensor(&[1, 2, 3, 3], 1, &dev), 3, 2, 1).is_err());
        assert!(global_avg_pool_backward(&x, &rand_tensor(&[2, 1], 1, &dev)).is_err());
    }
}
