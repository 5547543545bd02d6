//! The spatial transformer: `affine_grid` and bilinear `grid_sample` with
//! PyTorch's conventions (`align_corners=False`, zero padding), and the
//! localized crop (paper App. 7.3) that reads only the crop's region of an
//! [`ImageSource`] instead of the whole image.
//!
//! All of them share one bilinear core that reads pixels through a
//! [`Region`] window of the image while unnormalizing coordinates with the
//! full image size. `grid_sample` uses the whole image as its window, the
//! localized crop the pixels its taps can reach plus a one-pixel margin, so
//! both run the very same arithmetic and agree bit for bit, outputs and
//! gradients.
//!
//! On the GPU (kernels/sampler.cu) the same core runs per output element;
//! the localized crop still reads its regions on the host (data loading) and
//! uploads them once per batch, then samples and differentiates on the GPU.

use std::borrow::Cow;
use std::sync::Arc;

use anyhow::{anyhow, ensure, Result};
use rayon::prelude::*;

use crate::autograd::{Graph, Var};
use crate::device::cuda::CudaStorage;
use crate::device::{CpuDevice, Device};
use crate::tensor::{fmt_shape, Storage, Tensor};

/// An image read a rectangle at a time at pyramid levels, so that large
/// images are never loaded whole. Level `l` is level 0 area-downsampled `l`
/// times by 2; reads outside the image give zeros, which is the zero padding
/// of the spatial transformer. Implemented by the data layer's images.
pub trait ImageSource: Send + Sync {
    fn channels(&self) -> usize;

    /// Number of pyramid levels (at least 1).
    fn levels(&self) -> usize;

    /// `(height, width)` of `level`.
    fn level_size(&self, level: usize) -> (usize, usize);

    /// `(height, width)` at full resolution.
    fn size(&self) -> (usize, usize) {
        self.level_size(0)
    }

    /// Write rows `y0..y0+h`, columns `x0..x0+w` of `level` into `out`
    /// (`channels * h * w` values, CHW, in `[0, 1]`); pixels outside the
    /// image are 0.
    fn read_region(&self, level: usize, y0: i64, x0: i64, h: usize, w: usize, out: &mut [f32]) -> Result<()>;

    /// Bytes of stored pixels `read_region` has touched so far (whole tiles
    /// for the tiled store, in-image pixels for in-memory images, 0 for
    /// sources that render on demand): the figure behind "bytes read per crop
    /// do not grow with the image size".
    fn bytes_read(&self) -> u64 {
        0
    }

    /// The whole image at the coarsest level whose sides are both at least
    /// `min_side` (level 0 when none is), as `(h, w, CHW data)`: proxies are
    /// made from it without reading the full resolution.
    fn overview(&self, min_side: usize) -> Result<(usize, usize, Vec<f32>)> {
        let level = (0..self.levels())
            .rev()
            .find(|&l| {
                let (h, w) = self.level_size(l);
                h.min(w) >= min_side
            })
            .unwrap_or(0);
        let (h, w) = self.level_size(level);
        let mut out = vec![0.0; self.channels() * h * w];
        self.read_region(level, 0, 0, h, w, &mut out)?;
        Ok((h, w, out))
    }
}

/// Normalized coordinate of pixel centre `i` of an axis of `size` pixels.
fn base_coord(i: usize, size: usize) -> f32 {
    (2 * i + 1) as f32 / size as f32 - 1.0
}

/// Normalized coordinate (-1 and 1 are the outer pixel edges) to pixel units.
fn unnormalize(v: f32, size: usize) -> f32 {
    ((v + 1.0) * size as f32 - 1.0) * 0.5
}

/// `grid[n, i, j] = theta[n] · (x_j, y_i, 1)` over the output's pixel centres.
pub fn affine_grid_forward(theta: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    ensure!(
        theta.rank() == 3 && theta.dim(1) == 2 && theta.dim(2) == 3,
        "affine_grid: theta must be [N, 2, 3], got {}",
        fmt_shape(theta.shape())
    );
    ensure!(
        out_h > 0 && out_w > 0,
        "affine_grid: output size {out_h}x{out_w} must be positive"
    );
    let n = theta.dim(0);
    match theta.storage() {
        Storage::Cuda(ts) => cuda::affine_grid(ts, n, out_h, out_w),
        Storage::Cpu(_) => {
            let out = affine_grid_cpu(theta.host(), theta.cpu()?, out_h, out_w);
            Tensor::from_vec(out, &[n, out_h, out_w, 2], &theta.device())
        }
    }
}

/// The host loop of [`affine_grid_forward`] over thetas `t` (6 values each).
fn affine_grid_cpu(dev: &CpuDevice, t: &[f32], out_h: usize, out_w: usize) -> Vec<f32> {
    let mut out = dev.buffer(t.len() / 6 * out_h * out_w * 2);
    out.par_chunks_mut(out_h * out_w * 2)
        .zip(t.par_chunks(6))
        .for_each(|(o, t)| {
            for i in 0..out_h {
                let y = base_coord(i, out_h);
                for j in 0..out_w {
                    let x = base_coord(j, out_w);
                    let p = 2 * (i * out_w + j);
                    o[p] = t[0] * x + t[1] * y + t[2];
                    o[p + 1] = t[3] * x + t[4] * y + t[5];
                }
            }
        });
    out
}

/// Gradient of theta `[N, 2, 3]` from the grid's gradient `[N, Ho, Wo, 2]`
/// (the grid is linear in theta, so theta itself is not needed).
pub fn affine_grid_backward(grad_grid: &Tensor) -> Result<Tensor> {
    ensure!(
        grad_grid.rank() == 4 && grad_grid.dim(3) == 2 && grad_grid.dim(1) > 0 && grad_grid.dim(2) > 0,
        "affine_grid backward: grid gradient must be [N, Ho, Wo, 2] with Ho, Wo > 0, got {}",
        fmt_shape(grad_grid.shape())
    );
    let (n, oh, ow) = (grad_grid.dim(0), grad_grid.dim(1), grad_grid.dim(2));
    match grad_grid.storage() {
        Storage::Cuda(gs) => cuda::affine_grid_backward(gs, n, oh, ow),
        Storage::Cpu(_) => {
            let g = grad_grid.cpu()?;
            let mut out = vec![0.0; n * 6];
            out.par_chunks_mut(6)
                .zip(g.par_chunks(oh * ow * 2))
                .for_each(|(o, g)| {
                    // f64 sums: a crop has thousands of points.
                    let mut s = [0.0f64; 6];
                    for i in 0..oh {
                        let y = base_coord(i, oh) as f64;
                        for j in 0..ow {
                            let x = base_coord(j, ow) as f64;
                            let p = 2 * (i * ow + j);
                            let (gx, gy) = (g[p] as f64, g[p + 1] as f64);
                            s[0] += gx * x;
                            s[1] += gx * y;
                            s[2] += gx;
                            s[3] += gy * x;
                            s[4] += gy * y;
                            s[5] += gy;
                        }
                    }
                    o.iter_mut().zip(s).for_each(|(o, s)| *o = s as f32);
                });
            Tensor::from_vec(out, &[n, 2, 3], &grad_grid.device())
        }
    }
}

/// Rows `y0..y0+h`, columns `x0..x0+w` of an image (or pyramid level) of
/// `img_h` × `img_w` pixels: the pixels a sampler holds. It lies inside the
/// image; taps outside the image are zero padding and never read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub y0: i64,
    pub x0: i64,
    pub h: usize,
    pub w: usize,
    pub img_h: usize,
    pub img_w: usize,
}

impl Region {
    /// The whole image as a window.
    fn whole(img_h: usize, img_w: usize) -> Region {
        Region {
            y0: 0,
            x0: 0,
            h: img_h,
            w: img_w,
            img_h,
            img_w,
        }
    }

    pub fn pixels(&self) -> usize {
        self.h * self.w
    }

    /// The pixels the bilinear taps of `grid` (points `x, y`) can touch, with
    /// a one-pixel margin, clamped to the image (outside it is zero padding):
    /// `floor(min) - 1 ..= ceil(max) + 1` holds every tap `floor(u)`,
    /// `floor(u) + 1`. `grid` must be finite.
    fn of_grid(grid: &[f32], img_h: usize, img_w: usize) -> Region {
        let (mut lx, mut hx, mut ly, mut hy) = (f32::MAX, f32::MIN, f32::MAX, f32::MIN);
        for p in grid.chunks_exact(2) {
            let (ix, iy) = (unnormalize(p[0], img_w), unnormalize(p[1], img_h));
            (lx, hx) = (lx.min(ix), hx.max(ix));
            (ly, hy) = (ly.min(iy), hy.max(iy));
        }
        // In f64 so that far-off coordinates neither overflow nor wrap.
        let span = |lo: f32, hi: f32, size: usize| -> (i64, usize) {
            let a = (lo.floor() as f64 - 1.0).max(0.0);
            let b = (hi.ceil() as f64 + 1.0).min(size as f64 - 1.0);
            if b < a {
                (0, 0)
            } else {
                (a as i64, (b - a) as usize + 1)
            }
        };
        let ((y0, h), (x0, w)) = (span(ly, hy, img_h), span(lx, hx, img_w));
        if h == 0 || w == 0 {
            return Region {
                h: 0,
                w: 0,
                ..Region::whole(img_h, img_w)
            };
        }
        Region {
            y0,
            x0,
            h,
            w,
            img_h,
            img_w,
        }
    }
}

/// The 2×2 bilinear taps of one grid point: offsets into a window's channel
/// plane in the order top-left, top-right, bottom-left, bottom-right (None
/// where the tap falls outside the window, i.e. is zero padding), and the
/// column and row weights.
struct Taps {
    at: [Option<usize>; 4],
    wx: [f32; 2],
    wy: [f32; 2],
}

impl Taps {
    fn new(win: &Region, gx: f32, gy: f32) -> Taps {
        let (ix, iy) = (unnormalize(gx, win.img_w), unnormalize(gy, win.img_h));
        let (fx, fy) = (ix.floor(), iy.floor());
        // Window-relative; the casts saturate, so huge or NaN coordinates
        // simply land outside the window.
        let cx = (fx as i64).saturating_sub(win.x0);
        let cy = (fy as i64).saturating_sub(win.y0);
        let col = |d: i64| {
            let x = cx.saturating_add(d);
            (0..win.w as i64).contains(&x).then_some(x as usize)
        };
        let row = |d: i64| {
            let y = cy.saturating_add(d);
            (0..win.h as i64).contains(&y).then_some(y as usize * win.w)
        };
        let tap = |r: Option<usize>, c: Option<usize>| Some(r? + c?);
        let (c0, c1, r0, r1) = (col(0), col(1), row(0), row(1));
        Taps {
            at: [tap(r0, c0), tap(r0, c1), tap(r1, c0), tap(r1, c1)],
            wx: [fx + 1.0 - ix, ix - fx],
            wy: [fy + 1.0 - iy, iy - fy],
        }
    }

    fn values(&self, plane: &[f32]) -> [f32; 4] {
        self.at.map(|a| a.map_or(0.0, |i| plane[i]))
    }

    fn weights(&self) -> [f32; 4] {
        let (wx, wy) = (self.wx, self.wy);
        [wx[0] * wy[0], wx[1] * wy[0], wx[0] * wy[1], wx[1] * wy[1]]
    }
}

/// Bilinear samples of one image, read through `win` (`data` holds its
/// `channels` planes), at `grid` (points `x, y`) into `out` (CHW).
fn sample_forward(win: &Region, data: &[f32], channels: usize, grid: &[f32], out: &mut [f32]) {
    let (npts, plane) = (grid.len() / 2, win.pixels());
    for (p, g) in grid.chunks_exact(2).enumerate() {
        let t = Taps::new(win, g[0], g[1]);
        let w = t.weights();
        for ch in 0..channels {
            let v = t.values(&data[ch * plane..(ch + 1) * plane]);
            out[ch * npts + p] = w[0] * v[0] + w[1] * v[1] + w[2] * v[2] + w[3] * v[3];
        }
    }
}

/// Backward of [`sample_forward`]: the grid's gradient into `grad_grid`
/// and, when given, the window's gradient added into `grad_win`.
fn sample_backward(
    win: &Region,
    data: &[f32],
    channels: usize,
    grid: &[f32],
    grad_out: &[f32],
    mut grad_win: Option<&mut [f32]>,
    grad_grid: &mut [f32],
) {
    let (npts, plane) = (grid.len() / 2, win.pixels());
    // d(pixel units)/d(normalized coordinate).
    let (sx, sy) = (win.img_w as f32 * 0.5, win.img_h as f32 * 0.5);
    for (p, g) in grid.chunks_exact(2).enumerate() {
        let t = Taps::new(win, g[0], g[1]);
        let w = t.weights();
        let (mut gix, mut giy) = (0.0f32, 0.0f32);
        for ch in 0..channels {
            let go = grad_out[ch * npts + p];
            let v = t.values(&data[ch * plane..(ch + 1) * plane]);
            gix += go * ((v[1] - v[0]) * t.wy[0] + (v[3] - v[2]) * t.wy[1]);
            giy += go * ((v[2] - v[0]) * t.wx[0] + (v[3] - v[1]) * t.wx[1]);
            if let Some(gw) = grad_win.as_deref_mut() {
                let gw = &mut gw[ch * plane..(ch + 1) * plane];
                for (a, wk) in t.at.iter().zip(w) {
                    if let Some(i) = a {
                        gw[*i] += wk * go;
                    }
                }
            }
        }
        grad_grid[2 * p] = gix * sx;
        grad_grid[2 * p + 1] = giy * sy;
    }
}

/// `(N, C, H, W, Ho, Wo)` of a `grid_sample`, checked.
fn sample_dims(img: &Tensor, grid: &Tensor) -> Result<[usize; 6]> {
    ensure!(
        img.rank() == 4 && grid.rank() == 4 && grid.dim(3) == 2 && img.dim(0) == grid.dim(0),
        "grid_sample: need image [N, C, H, W] and grid [N, Ho, Wo, 2], got {} and {}",
        fmt_shape(img.shape()),
        fmt_shape(grid.shape())
    );
    let d = [
        img.dim(0),
        img.dim(1),
        img.dim(2),
        img.dim(3),
        grid.dim(1),
        grid.dim(2),
    ];
    ensure!(
        d[1..].iter().all(|&s| s > 0),
        "grid_sample: empty image {} or grid {}",
        fmt_shape(img.shape()),
        fmt_shape(grid.shape())
    );
    Ok(d)
}

/// Bilinear sampling of `img` `[N, C, H, W]` at `grid` `[N, Ho, Wo, 2]`
/// (normalized `x, y`) into `[N, C, Ho, Wo]`; taps outside the image are 0.
pub fn grid_sample_forward(img: &Tensor, grid: &Tensor) -> Result<Tensor> {
    let d = sample_dims(img, grid)?;
    let [n, c, h, w, oh, ow] = d;
    match img.storage() {
        Storage::Cuda(xs) => cuda::grid_sample(xs, grid.cuda()?, d),
        Storage::Cpu(_) => {
            let (xs, gs) = (img.cpu()?, grid.cpu()?);
            let win = Region::whole(h, w);
            let mut out = img.host().zeros(n * c * oh * ow);
            out.par_chunks_mut(c * oh * ow)
                .zip(xs.par_chunks(c * h * w).zip(gs.par_chunks(oh * ow * 2)))
                .for_each(|(o, (x, g))| sample_forward(&win, x, c, g, o));
            Tensor::from_vec(out, &[n, c, oh, ow], &img.device())
        }
    }
}

/// Gradients of `grid_sample` with respect to the image (only when
/// `img_grad`: images are usually data) and the grid.
pub fn grid_sample_backward(
    img: &Tensor,
    grid: &Tensor,
    grad_out: &Tensor,
    img_grad: bool,
) -> Result<(Option<Tensor>, Tensor)> {
    let d = sample_dims(img, grid)?;
    let [n, c, h, w, oh, ow] = d;
    grad_out.expect_shape(&[n, c, oh, ow], "grid_sample backward: output gradient")?;
    match img.storage() {
        Storage::Cuda(xs) => cuda::grid_sample_backward(xs, grid.cuda()?, grad_out.cuda()?, d, img_grad),
        Storage::Cpu(_) => {
            let (xs, gs, go) = (img.cpu()?, grid.cpu()?, grad_out.cpu()?);
            let win = Region::whole(h, w);
            let (chw, ppts) = (c * h * w, oh * ow * 2);
            let one = |i: usize, gw: Option<&mut [f32]>, gg: &mut [f32]| {
                let (x, g) = (&xs[i * chw..(i + 1) * chw], &gs[i * ppts..(i + 1) * ppts]);
                let gout = &go[i * c * oh * ow..(i + 1) * c * oh * ow];
                sample_backward(&win, x, c, g, gout, gw, gg);
            };
            let mut ggrid = grid.host().zeros(n * ppts);
            let gimg = if img_grad {
                let mut gimg = img.host().zeros(n * chw);
                gimg.par_chunks_mut(chw)
                    .zip(ggrid.par_chunks_mut(ppts))
                    .enumerate()
                    .for_each(|(i, (gw, gg))| one(i, Some(gw), gg));
                Some(img.same_shape(gimg)?)
            } else {
                ggrid
                    .par_chunks_mut(ppts)
                    .enumerate()
                    .for_each(|(i, gg)| one(i, None, gg));
                None
            };
            Ok((gimg, grid.same_shape(ggrid)?))
        }
    }
}

/// What the localized crop's backward needs: the sampling grid and the
/// pixels read, packed sample after sample.
pub struct LocalizedCrop {
    grid: Tensor,
    windows: Tensor,
    regions: Vec<Region>,
    offsets: Vec<usize>,
    channels: usize,
    /// On the GPU, the regions and offsets as its kernels read them.
    table: Option<Tensor>,
}

impl LocalizedCrop {
    /// The region read per sample, in pixels of the sampled level.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Pixels read over the batch (per channel; values are `channels` times this).
    pub fn pixels_read(&self) -> usize {
        self.regions.iter().map(Region::pixels).sum()
    }

    fn window<'a>(&self, windows: &'a [f32], i: usize) -> (Region, &'a [f32]) {
        let len = self.channels * self.regions[i].pixels();
        (self.regions[i], &windows[self.offsets[i]..self.offsets[i] + len])
    }

    /// The pixels read, packed sample after sample (`channels` planes of
    /// `regions()[i].pixels()` values each).
    pub fn windows(&self) -> &Tensor {
        &self.windows
    }

    /// The regions and offsets as the CUDA kernels read them (what the GPU
    /// path uploads): per sample `y0, x0, h, w, img_h, img_w, offset`, i32
    /// bit patterns in f32 storage (the kernels take it as `const int*`).
    pub fn window_table(&self) -> Result<Vec<f32>> {
        window_table(&self.regions, &self.offsets)
    }

    /// The regions and offsets on the GPU, for its kernels.
    fn table(&self) -> Result<&CudaStorage> {
        self.table
            .as_ref()
            .ok_or_else(|| anyhow!("localized_crop: a GPU gradient for a crop made on the CPU"))?
            .cuda()
    }
}

/// See [`LocalizedCrop::window_table`].
fn window_table(regions: &[Region], offsets: &[usize]) -> Result<Vec<f32>> {
    let int = |v: usize| {
        ensure!(
            v <= i32::MAX as usize,
            "localized_crop: {v} exceeds the CUDA kernels' 32-bit indexing"
        );
        Ok(f32::from_bits(v as u32))
    };
    regions
        .iter()
        .zip(offsets)
        .flat_map(|(r, &o)| [r.y0 as usize, r.x0 as usize, r.h, r.w, r.img_h, r.img_w, o].map(int))
        .collect()
}

/// One source per sample of `theta`, all with the same channels (returned)
/// and a non-empty `level`.
fn check_sources(sources: &[&dyn ImageSource], theta: &Tensor, level: usize) -> Result<usize> {
    ensure!(
        sources.len() == theta.dim(0) && !sources.is_empty(),
        "localized_crop: {} image sources for theta {}; need one per sample, at least one",
        sources.len(),
        fmt_shape(theta.shape())
    );
    let c = sources[0].channels();
    ensure!(c > 0, "localized_crop: source 0 has no channels");
    for (i, s) in sources.iter().enumerate() {
        ensure!(
            s.channels() == c,
            "localized_crop: source {i} has {} channels, source 0 has {c}",
            s.channels()
        );
        ensure!(
            level < s.levels(),
            "localized_crop: level {level} out of range for source {i} ({} levels)",
            s.levels()
        );
        let (h, w) = s.level_size(level);
        ensure!(
            h > 0 && w > 0,
            "localized_crop: source {i} is empty at level {level}"
        );
    }
    Ok(c)
}

/// Every sample's region of its source at `level`, read in parallel into
/// one buffer, and where each starts in it.
fn read_windows(
    sources: &[&dyn ImageSource],
    regions: &[Region],
    c: usize,
    level: usize,
) -> Result<(Vec<f32>, Vec<usize>)> {
    let mut offsets = Vec::with_capacity(regions.len());
    let mut total = 0;
    for r in regions {
        offsets.push(total);
        total += c * r.pixels();
    }
    let mut windows = vec![0.0; total];
    let mut bufs = Vec::with_capacity(regions.len());
    let mut rest = windows.as_mut_slice();
    for r in regions {
        let (buf, tail) = rest.split_at_mut(c * r.pixels());
        bufs.push(buf);
        rest = tail;
    }
    bufs.into_par_iter()
        .zip(regions.par_iter().zip(sources.par_iter()))
        .try_for_each(|(buf, (r, s))| s.read_region(level, r.y0, r.x0, r.h, r.w, buf))?;
    Ok((windows, offsets))
}

/// Crops `[N, C, Ho, Wo]` of `sources[n]` at pyramid `level` through
/// `theta[n]` (normalized coordinates relative to the whole image, so one
/// theta addresses the same region at every level), reading only each crop's
/// region plus a one-pixel margin. Equal to `grid_sample` of the whole level
/// image at `affine_grid(theta)`, bit for bit. Samples are read and cropped
/// in parallel.
pub fn localized_crop_forward(
    sources: &[&dyn ImageSource],
    theta: &Tensor,
    out_h: usize,
    out_w: usize,
    level: usize,
) -> Result<(Tensor, LocalizedCrop)> {
    let grid = affine_grid_forward(theta, out_h, out_w)?;
    let n = theta.dim(0);
    let c = check_sources(sources, theta, level)?;
    let ppts = out_h * out_w * 2;
    let regions: Vec<Region> = {
        // The regions come from the grid on the host. On the GPU that takes
        // theta back (6 values per sample): which pixels to load depends on
        // it. The host grid has the very values of `grid`, whose kernel rounds
        // like the CPU; were it off by an ulp, the margin would still hold
        // every tap.
        let host_grid = match grid.storage() {
            Storage::Cpu(_) => Cow::Borrowed(grid.cpu()?),
            Storage::Cuda(_) => {
                Cow::Owned(affine_grid_cpu(&CpuDevice::new(), &theta.to_vec()?, out_h, out_w))
            }
        };
        ensure!(
            host_grid.iter().all(|v| v.is_finite()),
            "localized_crop: theta gives non-finite sampling coordinates"
        );
        sources
            .iter()
            .zip(host_grid.chunks(ppts))
            .map(|(s, g)| {
                let (h, w) = s.level_size(level);
                Region::of_grid(g, h, w)
            })
            .collect()
    };
    let (windows, offsets) = read_windows(sources, &regions, c, level)?;
    let total = windows.len();
    let device = theta.device();
    let table = match &device {
        Device::Cuda(d) => Some(cuda::window_table(d, &regions, &offsets)?),
        Device::Cpu(_) => None,
    };
    let saved = LocalizedCrop {
        grid,
        windows: Tensor::from_vec(windows, &[total], &device)?,
        regions,
        offsets,
        channels: c,
        table,
    };
    let dims = [n, c, out_h, out_w];
    let out = match saved.windows.storage() {
        Storage::Cuda(ws) => cuda::localized_crop(ws, saved.table()?, saved.grid.cuda()?, dims)?,
        Storage::Cpu(_) => {
            let (gs, ws) = (saved.grid.cpu()?, saved.windows.cpu()?);
            let mut out = saved.grid.host().zeros(n * c * out_h * out_w);
            out.par_chunks_mut(c * out_h * out_w)
                .zip(gs.par_chunks(ppts))
                .enumerate()
                .for_each(|(i, (o, g))| {
                    let (r, data) = saved.window(ws, i);
                    sample_forward(&r, data, c, g, o);
                });
            Tensor::from_vec(out, &dims, &device)?
        }
    };
    Ok((out, saved))
}

/// Gradient of theta from the crops' gradient (the images are data).
pub fn localized_crop_backward(saved: &LocalizedCrop, grad_out: &Tensor) -> Result<Tensor> {
    let (n, oh, ow) = (saved.grid.dim(0), saved.grid.dim(1), saved.grid.dim(2));
    let c = saved.channels;
    grad_out.expect_shape(&[n, c, oh, ow], "localized_crop backward: output gradient")?;
    match grad_out.storage() {
        Storage::Cuda(gos) => {
            let ggrid = cuda::localized_crop_backward(
                saved.windows.cuda()?,
                saved.table()?,
                saved.grid.cuda()?,
                gos,
                [n, c, oh, ow],
            )?;
            affine_grid_backward(&ggrid)
        }
        Storage::Cpu(_) => {
            let (gs, go, ws) = (saved.grid.cpu()?, grad_out.cpu()?, saved.windows.cpu()?);
            let ppts = oh * ow * 2;
            let mut ggrid = saved.grid.host().zeros(n * ppts);
            ggrid
                .par_chunks_mut(ppts)
                .zip(gs.par_chunks(ppts).zip(go.par_chunks(c * oh * ow)))
                .enumerate()
                .for_each(|(i, (gg, (g, gout)))| {
                    let (r, data) = saved.window(ws, i);
                    sample_backward(&r, data, c, g, gout, None, gg);
                });
            affine_grid_backward(&saved.grid.same_shape(ggrid)?)
        }
    }
}

/// The pyramid level to crop from for a crop of `out_size` pixels (the
/// larger of its height and width) spanning `theta_scale` of the image's
/// sides: the coarsest level at which the crop's region still spans at least
/// `out_size` pixels along the image's shorter side, so that the crop never
/// has fewer source pixels than output pixels. Because each level halves the
/// sides, the region at the chosen level spans fewer than `2 * out_size`
/// pixels along that side (unless level 0 is chosen, where it is smaller, or
/// the pyramid ends first), so the bytes read per crop stay bounded by about
/// `(2 * out_size + 2)^2` per channel for a given aspect ratio, whatever the
/// image size.
pub fn choose_level(source: &dyn ImageSource, theta_scale: f32, out_size: usize) -> usize {
    let scale = theta_scale.abs() as f64;
    let spans = |level: usize| {
        let (h, w) = source.level_size(level);
        scale * h.min(w) as f64 >= out_size as f64
    };
    let mut level = 0;
    while level + 1 < source.levels() && spans(level + 1) {
        level += 1;
    }
    level
}

/// Launchers of kernels/sampler.cu.
mod cuda {
    use anyhow::Result;
    use cudarc::driver::LaunchConfig;

    use super::Region;
    use crate::device::cuda::{grid, launch, CudaDevice, CudaStorage, Ints, BLOCK};
    use crate::tensor::Tensor;

    /// Sizes as the kernels take them.
    fn ints<const K: usize>(v: [usize; K]) -> [i32; K] {
        v.map(|x| x as i32)
    }

    pub(super) fn affine_grid(theta: &CudaStorage, n: usize, oh: usize, ow: usize) -> Result<Tensor> {
        let dev = theta.device();
        let mut out = dev.alloc(n * oh * ow * 2)?;
        let [n32, oh32, ow32] = ints([n, oh, ow]);
        launch!(
            &dev,
            "sampler",
            "affine_grid",
            grid(n * oh * ow)?,
            theta.slice(),
            out.slice_mut(),
            &n32,
            &oh32,
            &ow32
        );
        Ok(Tensor::from_cuda(out, &[n, oh, ow, 2]))
    }

    pub(super) fn affine_grid_backward(gg: &CudaStorage, n: usize, oh: usize, ow: usize) -> Result<Tensor> {
        let dev = gg.device();
        grid(n * oh * ow)?; // the kernel's 32-bit point indices
        let mut out = dev.alloc(n * 6)?;
        // One block per theta entry (none for an empty batch); the kernel's
        // shared array holds BLOCK partial sums.
        let cfg = LaunchConfig {
            grid_dim: ((n * 6) as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let [oh32, ow32] = ints([oh, ow]);
        if n > 0 {
            launch!(
                &dev,
                "sampler",
                "affine_grid_backward",
                cfg,
                gg.slice(),
                out.slice_mut(),
                &oh32,
                &ow32
            );
        }
        Ok(Tensor::from_cuda(out, &[n, 2, 3]))
    }

    /// `d` is `[N, C, H, W, Ho, Wo]`.
    pub(super) fn grid_sample(img: &CudaStorage, gs: &CudaStorage, d: [usize; 6]) -> Result<Tensor> {
        let [n, c, h, w, oh, ow] = d;
        let dev = img.device();
        let mut out = dev.alloc(n * c * oh * ow)?;
        let [n32, c32, h32, w32, p32] = ints([n, c, h, w, oh * ow]);
        launch!(
            &dev,
            "sampler",
            "grid_sample",
            grid(n * c * oh * ow)?,
            img.slice(),
            gs.slice(),
            out.slice_mut(),
            &n32,
            &c32,
            &h32,
            &w32,
            &p32
        );
        Ok(Tensor::from_cuda(out, &[n, c, oh, ow]))
    }

    /// The image's gradient (when `img_grad`) and the grid's.
    pub(super) fn grid_sample_backward(
        img: &CudaStorage,
        gs: &CudaStorage,
        go: &CudaStorage,
        d: [usize; 6],
        img_grad: bool,
    ) -> Result<(Option<Tensor>, Tensor)> {
        let [n, c, h, w, oh, ow] = d;
        let dev = img.device();
        let [n32, c32, h32, w32, p32] = ints([n, c, h, w, oh * ow]);
        let mut ggrid = dev.alloc(n * oh * ow * 2)?;
        launch!(
            &dev,
            "sampler",
            "grid_sample_backward_grid",
            grid(n * oh * ow)?,
            img.slice(),
            gs.slice(),
            go.slice(),
            ggrid.slice_mut(),
            &n32,
            &c32,
            &h32,
            &w32,
            &p32
        );
        let gimg = if img_grad {
            // The kernel scatters with atomicAdd into zeros.
            let mut gimg = dev.alloc(n * c * h * w)?;
            gimg.fill(0.0)?;
            launch!(
                &dev,
                "sampler",
                "grid_sample_backward_img",
                grid(n * c * oh * ow)?,
                gs.slice(),
                go.slice(),
                gimg.slice_mut(),
                &n32,
                &c32,
                &h32,
                &w32,
                &p32
            );
            Some(Tensor::from_cuda(gimg, &[n, c, h, w]))
        } else {
            None
        };
        Ok((gimg, Tensor::from_cuda(ggrid, &[n, oh, ow, 2])))
    }

    /// The localized crop's window table on the GPU.
    pub(super) fn window_table(dev: &CudaDevice, regions: &[Region], offsets: &[usize]) -> Result<Tensor> {
        let table = super::window_table(regions, offsets)?;
        Ok(Tensor::from_cuda(dev.upload(&table)?, &[table.len()]))
    }

    /// `d` is `[N, C, Ho, Wo]`.
    pub(super) fn localized_crop(
        windows: &CudaStorage,
        table: &CudaStorage,
        gs: &CudaStorage,
        d: [usize; 4],
    ) -> Result<Tensor> {
        let [n, c, oh, ow] = d;
        let dev = windows.device();
        let mut out = dev.alloc(n * c * oh * ow)?;
        let [n32, c32, p32] = ints([n, c, oh * ow]);
        launch!(
            &dev,
            "sampler",
            "localized_crop",
            grid(n * c * oh * ow)?,
            windows.slice(),
            Ints(table.slice()),
            gs.slice(),
            out.slice_mut(),
            &n32,
            &c32,
            &p32
        );
        Ok(Tensor::from_cuda(out, &d))
    }

    /// The grid's gradient `[N, Ho, Wo, 2]`; `d` is `[N, C, Ho, Wo]`.
    pub(super) fn localized_crop_backward(
        windows: &CudaStorage,
        table: &CudaStorage,
        gs: &CudaStorage,
        go: &CudaStorage,
        d: [usize; 4],
    ) -> Result<Tensor> {
        let [n, c, oh, ow] = d;
        let dev = windows.device();
        let mut ggrid = dev.alloc(n * oh * ow * 2)?;
        let [n32, c32, p32] = ints([n, c, oh * ow]);
        launch!(
            &dev,
            "sampler",
            "localized_crop_backward",
            grid(n * oh * ow)?,
            windows.slice(),
            Ints(table.slice()),
            gs.slice(),
            go.slice(),
            ggrid.slice_mut(),
            &n32,
            &c32,
            &p32
        );
        Ok(Tensor::from_cuda(ggrid, &[n, oh, ow, 2]))
    }
}

impl Graph {
    /// The sampling grid `[N, Ho, Wo, 2]` of theta `[N, 2, 3]`.
    pub fn affine_grid(&mut self, theta: Var, out_h: usize, out_w: usize) -> Result<Var> {
        let y = affine_grid_forward(self.value(theta), out_h, out_w)?;
        Ok(self.record(y, &[theta], |g| Ok(vec![Some(affine_grid_backward(g)?)])))
    }

    /// Bilinear sampling of `img` `[N, C, H, W]` at `grid` `[N, Ho, Wo, 2]`.
    pub fn grid_sample(&mut self, img: Var, grid: Var) -> Result<Var> {
        let (iv, gv) = (self.value(img).clone(), self.value(grid).clone());
        let y = grid_sample_forward(&iv, &gv)?;
        let img_grad = self.needs_grad(img);
        Ok(self.record(y, &[img, grid], move |g| {
            let (gi, gg) = grid_sample_backward(&iv, &gv, g, img_grad)?;
            Ok(vec![gi, Some(gg)])
        }))
    }

    /// Crops `[N, C, Ho, Wo]` of pyramid `level` of `sources` through `theta`
    /// `[N, 2, 3]`, reading only the crops' regions; see
    /// [`localized_crop_forward`]. Gradients flow to theta only.
    pub fn localized_crop(
        &mut self,
        sources: &[Arc<dyn ImageSource>],
        theta: Var,
        out_h: usize,
        out_w: usize,
        level: usize,
    ) -> Result<Var> {
        let refs: Vec<&dyn ImageSource> = sources.iter().map(|s| s.as_ref()).collect();
        let (y, saved) = localized_crop_forward(&refs, self.value(theta), out_h, out_w, level)?;
        Ok(self.record(y, &[theta], move |g| {
            Ok(vec![Some(localized_crop_backward(&saved, g)?)])
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rand::Rng;

    use super::*;
    use crate::data::source::half_size;
    use crate::data::InMemoryImage;
    use crate::gradcheck::{check_op, rand_tensor, rng, Check};
    use crate::Device;

    /// Distance from `v` to the nearest integer.
    fn off_integer(v: f32) -> f32 {
        (v - v.round()).abs()
    }

    fn theta_tensor(rows: &[[f32; 6]], dev: &Device) -> Tensor {
        Tensor::from_vec(rows.concat(), &[rows.len(), 2, 3], dev).unwrap()
    }

    /// Random thetas of scale `s`, small rotation/shear and centres that
    /// reach past the border.
    fn random_thetas(n: usize, s_lo: f32, s_hi: f32, seed: u64) -> Vec<[f32; 6]> {
        let mut r = rng(seed);
        (0..n)
            .map(|_| {
                let s = r.random_range(s_lo..s_hi);
                let (a, b) = (r.random_range(-0.1..0.1), r.random_range(-0.1..0.1));
                let (tx, ty) = (r.random_range(-1.2..1.2), r.random_range(-1.2..1.2));
                [s, a, tx, b, s, ty]
            })
            .collect()
    }

    #[test]
    fn gradcheck_affine_grid() {
        let dev = Device::cpu();
        let theta = rand_tensor(&[2, 2, 3], 11, &dev);
        check_op(&[theta], Check::default(), |g, v| g.affine_grid(v[0], 3, 5)).unwrap();
    }

    #[test]
    fn gradcheck_grid_sample() {
        let dev = Device::cpu();
        let (n, c, h, w, oh, ow) = (2, 2, 5, 6, 3, 4);
        let img = rand_tensor(&[n, c, h, w], 12, &dev);
        // Points at a pixel-unit offset of 0.15..0.85 from the integers, where
        // bilinear is differentiable (the eps step moves them by 0.03 pixel),
        // from outside the image to past its far edge.
        let mut r = rng(13);
        let mut pts = Vec::new();
        for _ in 0..n * oh * ow {
            for size in [w, h] {
                let u = r.random_range(-2..size as i32 + 1) as f32 + r.random_range(0.15..0.85);
                pts.push((2.0 * u + 1.0) / size as f32 - 1.0);
            }
        }
        let grid = Tensor::from_vec(pts, &[n, oh, ow, 2], &dev).unwrap();
        check_op(&[img, grid], Check::default(), |g, v| g.grid_sample(v[0], v[1])).unwrap();
    }

    #[test]
    fn gradcheck_localized_crop() {
        let dev = Device::cpu();
        let (c, h, w, oh, ow) = (2, 9, 11, 3, 3);
        let data = Tensor::uniform(&[c * h * w], 0.0, 1.0, &mut rng(14), &dev);
        let img = Arc::new(InMemoryImage::new(data.to_vec().unwrap(), c, h, w, 1).unwrap());
        let sources: Vec<Arc<dyn ImageSource>> = vec![img.clone(), img];
        let check = Check {
            eps: 1e-3,
            ..Check::default()
        };
        for level in [0, 1] {
            let (lh, lw) = sources[0].level_size(level);
            // Thetas whose grid points sit 0.02 pixel or more from the
            // integers, where bilinear is differentiable (an eps step moves a
            // point by at most 0.006 pixel).
            let theta = (0..)
                .map(|seed| theta_tensor(&random_thetas(2, 0.3, 0.6, seed), &dev))
                .find(|t| {
                    let grid = affine_grid_forward(t, oh, ow).unwrap().to_vec().unwrap();
                    grid.chunks(2).all(|p| {
                        off_integer(unnormalize(p[0], lw)) > 0.02 && off_integer(unnormalize(p[1], lh)) > 0.02
                    })
                })
                .unwrap();
            check_op(&[theta], check, |g, v| {
                g.localized_crop(&sources, v[0], oh, ow, level)
            })
            .unwrap_or_else(|e| panic!("level {level}: {e}"));
        }
    }

    // From tests/pytorch_sampler.py (torch 2.15.0, CPU).
    const TORCH_OUT: [f32; 48] = [
        0.07581946,
        0.22859454,
        0.3473611,
        0.06623264,
        0.4473985,
        0.2645,
        0.5676641,
        0.33939824,
        0.38424394,
        0.668646,
        0.6311103,
        0.20445484,
        0.50152165,
        0.14459027,
        0.27048612,
        0.006623263,
        0.62878907,
        0.5981797,
        0.38766408,
        0.2178983,
        0.2515,
        0.5855252,
        0.4511103,
        0.12495485,
        0.63893753,
        0.4123126,
        0.3897917,
        0.44302082,
        0.71893746,
        0.49231255,
        0.4187656,
        0.45726562,
        0.46227074,
        0.23564582,
        0.5192813,
        0.66088545,
        0.5872917,
        0.5668749,
        0.3423541,
        0.2630208,
        0.6352031,
        0.5632344,
        0.3381875,
        0.27726564,
        0.6031563,
        0.8920521,
        0.6706876,
        0.4808855,
    ];
    const TORCH_GRAD_THETA: [f32; 12] = [
        -1.2032504,
        -1.2031862,
        0.48065662,
        1.075632,
        0.7857987,
        -0.34815067,
        0.2890225,
        -2.9852097,
        6.0174465,
        1.402412,
        0.75053406,
        0.71249986,
    ];
    const TORCH_GRAD_IMG: [f32; 140] = [
        0.0,
        0.0,
        -0.032204892,
        -0.72035587,
        0.46017796,
        0.18280163,
        -0.17313366,
        0.0,
        0.0,
        0.0,
        -0.5696942,
        0.32022578,
        0.33355027,
        -0.019835025,
        0.0,
        0.0,
        0.0,
        -0.39290366,
        0.118869334,
        0.47022587,
        0.1064236,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        -0.020128058,
        -0.43685973,
        0.19448763,
        0.31138238,
        0.11827255,
        0.0,
        0.0,
        0.0,
        -0.32190767,
        -0.6729599,
        0.1387153,
        0.27157116,
        0.0,
        0.0,
        0.0,
        -0.19645183,
        -0.5256076,
        -0.04962027,
        0.36697045,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        -0.053125013,
        -0.16536453,
        0.2744791,
        0.027343743,
        0.0,
        0.0,
        0.0,
        -0.16770846,
        -0.6854166,
        1.2769532,
        0.15950519,
        0.0,
        0.0,
        0.0,
        -0.022916745,
        -0.8109375,
        0.15091139,
        0.14127606,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.02499997,
        -0.22317699,
        0.018489555,
        0.054687485,
        0.0,
        0.0,
        0.0,
        0.20338526,
        -0.82057273,
        0.275716,
        0.289388,
        0.0,
        0.0,
        0.0,
        0.23098955,
        -0.30156243,
        0.39251304,
        0.23014326,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
    ];

    fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((a - b).abs() <= tol * b.abs().max(1.0), "{what}[{i}]: {a} vs {b}");
        }
    }

    /// `affine_grid` + `grid_sample` and their gradients against PyTorch, on
    /// a 5x7 image with a rotated theta that crosses the border.
    #[test]
    fn matches_pytorch_values() {
        let dev = Device::cpu();
        let (c, h, w) = (2, 5, 7);
        let v = |ch: usize, y: usize, x: usize| ((ch * h * w + y * w + x) * 37 % 101) as f32 / 100.0;
        let mut img = Vec::new();
        for flip in [false, true] {
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        img.push(v(ch, y, if flip { w - 1 - x } else { x }));
                    }
                }
            }
        }
        let img = Tensor::from_vec(img, &[2, c, h, w], &dev).unwrap();
        let theta = theta_tensor(
            &[
                [0.6, 0.1, 0.5, -0.05, 0.7, -0.55],
                [0.35, 0.0, -0.2, 0.0, 0.35, 0.1],
            ],
            &dev,
        );
        let wts = (0..48).map(|k| ((k * 13) % 17) as f32 / 8.0 - 1.0).collect();
        let wts = Tensor::from_vec(wts, &[2, c, 3, 4], &dev).unwrap();

        let mut g = Graph::new();
        let (iv, tv) = (g.leaf(img), g.leaf(theta));
        let grid = g.affine_grid(tv, 3, 4).unwrap();
        let out = g.grid_sample(iv, grid).unwrap();
        let grads = g.backward_from(out, wts).unwrap();
        assert_close("out", &g.value(out).to_vec().unwrap(), &TORCH_OUT, 2e-6);
        assert_close(
            "grad theta",
            &grads.get(tv).unwrap().to_vec().unwrap(),
            &TORCH_GRAD_THETA,
            2e-5,
        );
        assert_close(
            "grad img",
            &grads.get(iv).unwrap().to_vec().unwrap(),
            &TORCH_GRAD_IMG,
            2e-6,
        );
    }

    #[test]
    fn identity_theta_reproduces_the_image() {
        let dev = Device::cpu();
        let img = rand_tensor(&[1, 3, 7, 5], 15, &dev);
        let grid = affine_grid_forward(&theta_tensor(&[[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]], &dev), 7, 5).unwrap();
        let out = grid_sample_forward(&img, &grid).unwrap();
        assert_close("identity", &out.to_vec().unwrap(), &img.to_vec().unwrap(), 1e-5);
    }

    /// Localized crops against `grid_sample` of the whole level image, via
    /// the graph: outputs and theta gradients must agree exactly.
    fn localized_equals_full(c: usize, h: usize, w: usize, level: usize, seed: u64) {
        let dev = Device::cpu();
        let n = 6;
        let images: Vec<Arc<InMemoryImage>> = (0..n as u64)
            .map(|k| {
                let d = Tensor::uniform(&[c * h * w], 0.0, 1.0, &mut rng(seed + k), &dev);
                Arc::new(InMemoryImage::new(d.to_vec().unwrap(), c, h, w, 1).unwrap())
            })
            .collect();
        let sources: Vec<Arc<dyn ImageSource>> = images.iter().map(|i| i.clone() as _).collect();
        let mut thetas = random_thetas(n - 2, 0.1, 0.6, seed);
        thetas.push([0.3, 0.0, 0.7, 0.0, 0.3, -0.7]); // touches the right and top borders
        thetas.push([0.2, 0.0, 1.5, 0.0, 0.2, 0.0]); // wholly outside
        let theta = theta_tensor(&thetas, &dev);
        let (oh, ow) = (5, 6);
        let (lh, lw) = images[0].level_size(level);
        let level_data: Vec<f32> = images.iter().flat_map(|i| i.level_data(level).to_vec()).collect();
        let seed_grad = rand_tensor(&[n, c, oh, ow], seed, &dev);

        let mut g = Graph::new();
        let t = g.leaf(theta.clone());
        let img = g.constant(Tensor::from_vec(level_data, &[n, c, lh, lw], &dev).unwrap());
        let grid = g.affine_grid(t, oh, ow).unwrap();
        let full = g.grid_sample(img, grid).unwrap();
        let full_grad = g.backward_from(full, seed_grad.clone()).unwrap();

        let mut gl = Graph::new();
        let tl = gl.leaf(theta);
        let local = gl.localized_crop(&sources, tl, oh, ow, level).unwrap();
        let local_grad = gl.backward_from(local, seed_grad).unwrap();

        let what = format!("C={c} {h}x{w} level {level}");
        let full_out = g.value(full).to_vec().unwrap();
        assert_eq!(gl.value(local).to_vec().unwrap(), full_out, "{what}: outputs");
        assert!(full_out.iter().any(|&v| v != 0.0), "{what}: crops are all zero");
        let tg = |gr: &crate::Gradients, v| gr.get(v).unwrap().to_vec().unwrap();
        assert_eq!(tg(&local_grad, tl), tg(&full_grad, t), "{what}: theta gradients");
    }

    #[test]
    fn localized_crop_equals_full_sampler() {
        for level in [0, 1] {
            localized_equals_full(1, 37, 29, level, 100 + level as u64);
            localized_equals_full(3, 23, 41, level, 200 + level as u64);
        }
    }

    /// A huge image that is never stored: reads give zeros and count pixels.
    struct Huge {
        side: usize,
        read: AtomicUsize,
    }

    impl ImageSource for Huge {
        fn channels(&self) -> usize {
            3
        }
        fn levels(&self) -> usize {
            (0..).find(|&l| self.level_size(l).0 == 1).unwrap() + 1
        }
        fn level_size(&self, level: usize) -> (usize, usize) {
            (0..level).fold((self.side, self.side), |(h, w), _| half_size(h, w))
        }
        fn read_region(&self, _: usize, _: i64, _: i64, h: usize, w: usize, out: &mut [f32]) -> Result<()> {
            self.read.fetch_add(h * w, Ordering::Relaxed);
            out.fill(0.0);
            Ok(())
        }
    }

    #[test]
    fn choose_level_is_the_coarsest_that_still_spans_the_crop() {
        let img = InMemoryImage::new(vec![0.0; 100 * 100], 1, 100, 100, 1).unwrap(); // 100, 50, 25, 13, 7, 4, 2, 1
        assert_eq!(choose_level(&img, 0.3, 64), 0); // 30 < 64 even at level 0
        assert_eq!(choose_level(&img, 0.3, 8), 1); // 15 >= 8 > 7.5
        assert_eq!(choose_level(&img, 0.3, 1), 5); // 1.2 >= 1 > 0.6
        assert_eq!(choose_level(&img, 5.0, 1), 7); // the last level
        assert_eq!(choose_level(&img, f32::NAN, 1), 0);
    }

    /// Pixels read per crop at the chosen level stay under a bound that does
    /// not depend on the image size, from 2528² to 100000².
    #[test]
    fn pixels_read_per_crop_do_not_grow_with_the_image() {
        let dev = Device::cpu();
        let (s, out) = (0.3, 32);
        let bound = (2 * out + 3) * (2 * out + 3);
        // Interior, touching a border, crossing a corner.
        let thetas = theta_tensor(
            &[
                [s, 0.0, 0.1, 0.0, s, -0.2],
                [s, 0.0, 0.7, 0.0, s, 0.0],
                [s, 0.0, -0.9, 0.0, s, 0.95],
            ],
            &dev,
        );
        for side in [2528, 16384, 100_000] {
            let src = Huge {
                side,
                read: AtomicUsize::new(0),
            };
            let level = choose_level(&src, s, out);
            let (lh, _) = src.level_size(level);
            assert!(s * lh as f32 >= out as f32 && s * src.level_size(level + 1).0 as f32 <= out as f32);
            let sources: [&dyn ImageSource; 3] = [&src, &src, &src];
            let (crops, saved) = localized_crop_forward(&sources, &thetas, out, out, level).unwrap();
            assert_eq!(crops.shape(), &[3, 3, out, out]);
            assert_eq!(src.read.load(Ordering::Relaxed), saved.pixels_read());
            let r = saved.regions();
            assert!(
                r[0].h >= out && r[0].w >= out,
                "{side}: interior region {:?}",
                r[0]
            );
            for r in r {
                assert!(
                    r.pixels() <= bound,
                    "{side}²: {r:?} reads more than {bound} pixels"
                );
            }
        }
    }

    #[test]
    fn bad_shapes_and_arguments_are_errors() {
        let dev = Device::cpu();
        let e = affine_grid_forward(&rand_tensor(&[2, 3, 2], 1, &dev), 4, 4).unwrap_err();
        assert!(e.to_string().contains("[2, 3, 2]"), "{e}");
        assert!(affine_grid_forward(&rand_tensor(&[1, 2, 3], 1, &dev), 0, 4).is_err());
        let img = rand_tensor(&[2, 1, 4, 4], 1, &dev);
        let e = grid_sample_forward(&img, &rand_tensor(&[3, 2, 2, 2], 1, &dev)).unwrap_err();
        assert!(e.to_string().contains("[3, 2, 2, 2]"), "{e}");
        assert!(grid_sample_forward(&img, &rand_tensor(&[2, 2, 2, 3], 1, &dev)).is_err());
        let grid = rand_tensor(&[2, 2, 2, 2], 1, &dev);
        assert!(grid_sample_backward(&img, &grid, &rand_tensor(&[2, 1, 2, 3], 1, &dev), true).is_err());

        let a = InMemoryImage::new(vec![0.5; 3 * 8 * 8], 3, 8, 8, 4).unwrap(); // levels 8, 4
        let b = InMemoryImage::new(vec![0.5; 8 * 8], 1, 8, 8, 4).unwrap();
        let theta = theta_tensor(&[[0.5, 0.0, 0.0, 0.0, 0.5, 0.0]; 2], &dev);
        let err = |s: &[&dyn ImageSource], t: &Tensor, level| {
            localized_crop_forward(s, t, 4, 4, level)
                .err()
                .unwrap()
                .to_string()
        };
        assert!(err(&[&a], &theta, 0).contains("1 image sources"));
        assert!(err(&[&a, &b], &theta, 0).contains("channels"));
        assert!(err(&[&a, &a], &theta, 2).contains("level 2"));
        let nan = theta_tensor(&[[f32::NAN, 0.0, 0.0, 0.0, 0.5, 0.0]; 2], &dev);
        assert!(err(&[&a, &a], &nan, 0).contains("non-finite"));
        let (_, saved) = localized_crop_forward(&[&a, &a], &theta, 4, 4, 1).unwrap();
        assert!(localized_crop_backward(&saved, &rand_tensor(&[2, 3, 4, 5], 1, &dev)).is_err());
    }
}
