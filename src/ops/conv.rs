//! 2-D convolution and its adjoint, the transposed convolution, in PyTorch's
//! layouts: `conv2d` weight `[out, in, kh, kw]`, `conv_transpose2d` weight
//! `[in, out, kh, kw]`, zero padding, one stride and padding for both axes.
//!
//! On the CPU everything is im2col + GEMM. Three products cover both ops:
//! - `apply`: `cols(img) -> W · cols` (conv forward, conv-transpose data gradient);
//! - `adjoint`: `W^T · colside -> col2im` (conv data gradient, conv-transpose forward);
//! - `weight_grad`: `colside · cols(img)^T` summed over the batch (both weight gradients).
//!
//! Here "img" is the conv's input side `[c, h, w]` and "colside" its output
//! grid `[o, ho, wo]`. The batch is cut into groups of images laid side by
//! side in one column matrix, so small feature maps still make one large
//! GEMM. Groups run in parallel, one per thread: with `o` rows (often 64) a
//! single GEMM does not split well over threads, independent ones do. A
//! batch of one falls back on the threads inside the GEMM and im2col. In a
//! training graph the forward keeps its column matrices for `weight_grad`
//! while the graph's budget allows (`Graph::keep_for_backward`), and the
//! data gradient is skipped for inputs that need none (images, proxies).
//!
//! On the GPU the same three products run on chunks of images, each chunk one
//! batched GEMM over per-image column matrices; col2im there is a gather
//! (each pixel sums the column entries it feeds), so results are deterministic.

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use super::for_chunks;
use crate::autograd::{Graph, Var};
use crate::device::cpu::{sgemm, Mat};
use crate::device::CpuDevice;
use crate::tensor::{fmt_shape, Storage, Tensor};

/// Column-matrix size (floats) a group of images aims for: enough columns
/// for an efficient GEMM, small enough that im2col writes it into L2 and the
/// GEMM reads it back from there (512 KiB; at the saccade model's shapes
/// this made conv2d 10-15% faster than 4 MiB, and 256 KiB the same).
/// Tests use a tiny budget so that every path (one image per group, several,
/// a short last group) is exercised on small shapes.
const COLS_BUDGET: usize = if cfg!(test) { 1 << 11 } else { 1 << 17 };

/// From this many input channels the CPU lays the columns out channels-last
/// (see [`Geom::channels_last`]); with fewer, a kernel line is too short a
/// copy to pay for the transposes. Tests take both layouts on small shapes.
const CHANNELS_LAST_MIN: usize = if cfg!(test) { 3 } else { 8 };

/// Output size along one axis: `(input + 2 * padding - kernel) / stride + 1`.
pub fn conv_out_size(input: usize, kernel: usize, stride: usize, padding: usize) -> Option<usize> {
    let padded = input + 2 * padding;
    (stride > 0 && kernel > 0 && padded >= kernel).then(|| (padded - kernel) / stride + 1)
}

/// One convolution's geometry, seen from the conv (not the transpose) side.
#[derive(Clone, Copy, Debug)]
struct Geom {
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    /// Rows of the column matrix.
    fn ck(&self) -> usize {
        self.c * self.kh * self.kw
    }
    /// Columns per image.
    fn hw(&self) -> usize {
        self.ho * self.wo
    }
    fn img_len(&self) -> usize {
        self.c * self.h * self.w
    }
    /// A 1x1 conv without stride or padding: an image is its own column matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    /// Whether the CPU's column matrix is channels-last: one row per output
    /// pixel holding its receptive field as `[kh, kw, c]`, cut from a padded
    /// `[h, w, c]` copy of the image. Each kernel line is then one contiguous
    /// copy of `kw * c` floats, where im2col's channel-major rows copy a few
    /// pixels at a time: on the crop classifier's 12x12 to 3x3 maps im2col
    /// and col2im were 15% of the training step. The weight is read as
    /// `[o, kh, kw, c]` to match. Only for images whose columns fit the
    /// group budget: on ResNet's larger maps the GEMM's packing of the
    /// transposed operand costs more than im2col does there.
    fn channels_last(&self) -> bool {
        self.c >= CHANNELS_LAST_MIN && !self.pointwise() && self.ck() * self.hw() <= COLS_BUDGET
    }
    /// A group's column matrix read as `[ck, m]`, or with `t` as `[m, ck]`.
    fn cols_mat<'a>(&self, cols: &'a [f32], t: bool) -> Mat<'a> {
        if self.channels_last() != t {
            Mat::t(cols)
        } else {
            Mat::n(cols)
        }
    }
    /// Side lengths of the zero-padded image.
    fn padded(&self) -> (usize, usize) {
        (self.h + 2 * self.pad, self.w + 2 * self.pad)
    }
    /// Floats of the padded channels-last image.
    fn hwc_len(&self) -> usize {
        let (hp, wp) = self.padded();
        hp * wp * self.c
    }
    /// Where, in the padded channels-last image, kernel line `i` of output
    /// pixel `q` starts: it runs on for `kw * c` floats.
    fn line_at(&self, q: usize, i: usize) -> usize {
        let (oy, ox) = (q / self.wo, q % self.wo);
        ((oy * self.stride + i) * self.padded().1 + ox * self.stride) * self.c
    }
    /// Images per GEMM for a batch of `n`: as many as fit the column budget,
    /// but no more than leaves one group per thread.
    fn group(&self, n: usize) -> usize {
        let per_thread = n.div_ceil(rayon::current_num_threads()).max(1);
        (COLS_BUDGET / (self.ck() * self.hw()).max(1)).clamp(1, per_thread)
    }
    /// Output positions `ox` (or `oy`) whose input `ox * stride + j - pad`
    /// lies in `0..size`, for kernel offset `j`.
    fn valid(&self, j: usize, size: usize, out: usize) -> (usize, usize) {
        let lo = (self.pad.saturating_sub(j)).div_ceil(self.stride);
        let hi = if size + self.pad > j {
            ((size + self.pad - j - 1) / self.stride + 1).min(out)
        } else {
            0
        };
        (lo.min(hi), hi)
    }
}

/// Columns of a group of images `[g, c, h, w]` into `cols [c*kh*kw, g*ho*wo]`:
/// row `(ci, i, j)`, column `(gi, oy, ox)` holds `img[gi, ci, oy*s+i-p, ox*s+j-p]`
/// (0 in the padding).
fn im2col(g: &Geom, imgs: &[f32], cols: &mut [f32]) {
    let (hw, plane) = (g.hw(), g.h * g.w);
    let n = imgs.len() / g.img_len();
    let fill_row = |r: usize, row: &mut [f32]| {
        let (ci, i, j) = (r / (g.kh * g.kw), r / g.kw % g.kh, r % g.kw);
        let (x0, x1) = g.valid(j, g.w, g.wo);
        // No valid column means no valid pixel in any line.
        let (y0, y1) = if x0 < x1 { g.valid(i, g.h, g.ho) } else { (0, 0) };
        for gi in 0..n {
            let src = &imgs[(gi * g.c + ci) * plane..][..plane];
            let dst = &mut row[gi * hw..][..hw];
            dst[..y0 * g.wo].fill(0.0);
            dst[y1 * g.wo..].fill(0.0);
            for oy in y0..y1 {
                let line = &src[(oy * g.stride + i - g.pad) * g.w..][..g.w];
                let seg = &mut dst[oy * g.wo..][..g.wo];
                seg[..x0].fill(0.0);
                seg[x1..].fill(0.0);
                if g.stride == 1 {
                    seg[x0..x1].copy_from_slice(&line[x0 + j - g.pad..x1 + j - g.pad]);
                } else {
                    let src = line[x0 * g.stride + j - g.pad..].iter().step_by(g.stride);
                    seg[x0..x1].iter_mut().zip(src).for_each(|(v, x)| *v = *x);
                }
            }
        }
    };
    for_chunks(cols, n * hw, fill_row);
}

/// The adjoint of [`im2col`]: add every column entry back onto the pixel it
/// was read from. `imgs` must start zeroed.
fn col2im(g: &Geom, cols: &[f32], imgs: &mut [f32]) {
    let (hw, plane) = (g.hw(), g.h * g.w);
    let ld = imgs.len() / g.img_len() * hw;
    let fill_plane = |q: usize, dst: &mut [f32]| {
        let (gi, ci) = (q / g.c, q % g.c);
        for i in 0..g.kh {
            let (y0, y1) = g.valid(i, g.h, g.ho);
            for j in 0..g.kw {
                let (x0, x1) = g.valid(j, g.w, g.wo);
                if x0 == x1 {
                    continue;
                }
                let row = &cols[((ci * g.kh + i) * g.kw + j) * ld + gi * hw..][..hw];
                for oy in y0..y1 {
                    let line = &mut dst[(oy * g.stride + i - g.pad) * g.w..][..g.w];
                    let seg = &row[oy * g.wo..][x0..x1];
                    if g.stride == 1 {
                        let out = &mut line[x0 + j - g.pad..x1 + j - g.pad];
                        out.iter_mut().zip(seg).for_each(|(o, v)| *o += v);
                    } else {
                        let out = line[x0 * g.stride + j - g.pad..].iter_mut().step_by(g.stride);
                        out.zip(seg).for_each(|(o, v)| *o += v);
                    }
                }
            }
        }
    };
    for_chunks(imgs, plane, fill_plane);
}

/// One image `[c, h, w]` into `out [h + 2p, w + 2p, c]`, zeros around it.
fn to_padded_hwc(g: &Geom, img: &[f32], out: &mut [f32]) {
    let (c, p, plane) = (g.c, g.pad, g.h * g.w);
    let line = g.padded().1 * c;
    out[..p * line].fill(0.0);
    out[(p + g.h) * line..].fill(0.0);
    for (y, row) in out[p * line..][..g.h * line].chunks_exact_mut(line).enumerate() {
        row[..p * c].fill(0.0);
        row[(p + g.w) * c..].fill(0.0);
        let inner = &mut row[p * c..][..g.w * c];
        for (ci, src) in img.chunks_exact(plane).enumerate() {
            let src = &src[y * g.w..][..g.w];
            inner[ci..]
                .iter_mut()
                .step_by(c)
                .zip(src)
                .for_each(|(v, x)| *v = *x);
        }
    }
}

/// The inverse of [`to_padded_hwc`], dropping the border.
fn from_padded_hwc(g: &Geom, hwc: &[f32], img: &mut [f32]) {
    let (c, p, plane) = (g.c, g.pad, g.h * g.w);
    let line = g.padded().1 * c;
    for (ci, dst) in img.chunks_exact_mut(plane).enumerate() {
        for (y, out) in dst.chunks_exact_mut(g.w).enumerate() {
            let row = &hwc[(y + p) * line + p * c + ci..];
            out.iter_mut()
                .zip(row.iter().step_by(c))
                .for_each(|(o, v)| *o = *v);
        }
    }
}

/// Channels-last columns (see [`Geom::channels_last`]) of a group of
/// images `[g, c, h, w]` into `rows [g*ho*wo, kh*kw*c]`; `hwc` is scratch.
fn im2row(g: &Geom, imgs: &[f32], rows: &mut [f32], hwc: &mut [f32]) {
    let (ck, seg) = (g.ck(), g.kw * g.c);
    for (img, out) in imgs
        .chunks_exact(g.img_len())
        .zip(rows.chunks_exact_mut(g.hw() * ck))
    {
        to_padded_hwc(g, img, hwc);
        for (q, row) in out.chunks_exact_mut(ck).enumerate() {
            for (i, dst) in row.chunks_exact_mut(seg).enumerate() {
                dst.copy_from_slice(&hwc[g.line_at(q, i)..][..seg]);
            }
        }
    }
}

/// The adjoint of [`im2row`]: every row entry added back onto the pixel it
/// was read from. Overwrites `imgs`.
fn row2im(g: &Geom, rows: &[f32], imgs: &mut [f32], hwc: &mut [f32]) {
    let (ck, seg) = (g.ck(), g.kw * g.c);
    for (img, src) in imgs
        .chunks_exact_mut(g.img_len())
        .zip(rows.chunks_exact(g.hw() * ck))
    {
        hwc.fill(0.0);
        for (q, row) in src.chunks_exact(ck).enumerate() {
            for (i, part) in row.chunks_exact(seg).enumerate() {
                let line = &mut hwc[g.line_at(q, i)..][..seg];
                line.iter_mut().zip(part).for_each(|(o, v)| *o += v);
            }
        }
        from_padded_hwc(g, hwc, img);
    }
}

/// `w [o, c, kh, kw]` as the GEMMs read it: `[o, kh, kw, c]` when the
/// columns are channels-last.
fn weight_for_cols<'a>(g: &Geom, w: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
    match g.channels_last() {
        true => permute_taps(g, w, true).into(),
        false => w.into(),
    }
}

/// The inverse of [`weight_for_cols`] (for the weight gradient).
fn weight_from_cols(g: &Geom, dw: Vec<f32>) -> Vec<f32> {
    match g.channels_last() {
        true => permute_taps(g, &dw, false),
        false => dw,
    }
}

/// Each `[c, kh*kw]` block of `w` as `[kh*kw, c]` (`to_last`), or back.
fn permute_taps(g: &Geom, w: &[f32], to_last: bool) -> Vec<f32> {
    let (taps, c) = (g.kh * g.kw, g.c);
    let mut out = vec![0.0; w.len()];
    for (src, dst) in w.chunks_exact(g.ck()).zip(out.chunks_exact_mut(g.ck())) {
        for ci in 0..c {
            for t in 0..taps {
                let (first, last) = (ci * taps + t, t * c + ci);
                let (to, from) = if to_last { (last, first) } else { (first, last) };
                dst[to] = src[from];
            }
        }
    }
    out
}

/// `[g, rows, hw] -> [rows, g*hw]`, so a group's output grids form one GEMM operand.
fn to_rows(src: &[f32], rows: usize, hw: usize, dst: &mut [f32]) {
    let n = src.len() / (rows * hw);
    for_chunks(dst, n * hw, |r, d| {
        for gi in 0..n {
            d[gi * hw..][..hw].copy_from_slice(&src[(gi * rows + r) * hw..][..hw]);
        }
    });
}

/// The inverse of [`to_rows`].
fn from_rows(src: &[f32], rows: usize, hw: usize, dst: &mut [f32]) {
    let n = dst.len() / (rows * hw);
    for_chunks(dst, hw, |q, d| {
        let (gi, r) = (q / rows, q % rows);
        d.copy_from_slice(&src[r * n * hw + gi * hw..][..hw]);
    });
}

/// `[g*hw, rows] -> [g, rows, hw]`: a group's product with one row per
/// output pixel as the output grids.
fn from_pixel_rows(src: &[f32], rows: usize, hw: usize, dst: &mut [f32]) {
    for (q, d) in dst.chunks_exact_mut(hw).enumerate() {
        let (gi, r) = (q / rows, q % rows);
        let pixels = src[gi * hw * rows..][..hw * rows].chunks_exact(rows);
        d.iter_mut().zip(pixels).for_each(|(v, p)| *v = p[r]);
    }
}

/// `buf` as `len` floats to be overwritten entirely, from `dev`'s pool
/// unless it has that length already.
fn sized<'a>(dev: &CpuDevice, buf: &'a mut Vec<f32>, len: usize) -> &'a mut [f32] {
    if buf.len() != len {
        dev.recycle(std::mem::replace(buf, dev.buffer(len)));
    }
    buf
}

/// Fill `cols` with the column matrix of a group of images, in the
/// layout [`Geom::channels_last`] says; `hwc` is scratch for it.
fn fill_cols(dev: &CpuDevice, g: &Geom, imgs: &[f32], cols: &mut [f32], hwc: &mut Vec<f32>) {
    if g.channels_last() {
        im2row(g, imgs, cols, sized(dev, hwc, g.hwc_len()));
    } else {
        im2col(g, imgs, cols);
    }
}

/// The columns of one group: the images themselves when that is what
/// im2col would produce, else `buf` filled by [`fill_cols`].
fn group_cols<'a>(
    dev: &CpuDevice,
    g: &Geom,
    imgs: &'a [f32],
    buf: &'a mut Vec<f32>,
    hwc: &mut Vec<f32>,
) -> &'a [f32] {
    let n = imgs.len() / g.img_len();
    if n == 1 && g.pointwise() {
        return imgs;
    }
    let cols = sized(dev, buf, g.ck() * n * g.hw());
    fill_cols(dev, g, imgs, cols, hwc);
    cols
}

/// One group's output grids as a `[o, n*hw]` matrix (a copy unless `n == 1`).
fn group_rows<'a>(
    dev: &CpuDevice,
    g: &Geom,
    o: usize,
    colside: &'a [f32],
    buf: &'a mut Vec<f32>,
) -> &'a [f32] {
    if colside.len() == o * g.hw() {
        return colside;
    }
    let rows = sized(dev, buf, colside.len());
    to_rows(colside, o, g.hw(), rows);
    rows
}

/// Scratch of one task: a group's column matrix, its output grids as rows
/// and a padded channels-last image, in buffers of the device's pool (they
/// go back to it on drop).
struct Scratch<'a> {
    dev: &'a CpuDevice,
    cols: Vec<f32>,
    rows: Vec<f32>,
    hwc: Vec<f32>,
}

impl<'a> Scratch<'a> {
    fn new(dev: &'a CpuDevice) -> Self {
        Scratch {
            dev,
            cols: Vec::new(),
            rows: Vec::new(),
            hwc: Vec::new(),
        }
    }
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        for buf in [&mut self.cols, &mut self.rows, &mut self.hwc] {
            self.dev.recycle(std::mem::take(buf));
        }
    }
}

/// The column matrices of a forward pass on the CPU, group after group,
/// kept for the weight gradient: backward then reads them instead of
/// running im2col again (im2col was a third of conv's time in the default
/// model's step). A tensor, so their bytes count as live memory.
struct Columns {
    data: Tensor,
    /// Images per group when they were written.
    group: usize,
}

/// `colside[n] = W · cols(img[n])` with `W [o, ck]`, and with `keep` the
/// column matrices of every group and the group size (see [`Columns`]).
fn apply_cpu(
    dev: &CpuDevice,
    g: &Geom,
    o: usize,
    imgs: &[f32],
    w: &[f32],
    keep: bool,
) -> (Vec<f32>, Option<(Vec<f32>, usize)>) {
    let n = imgs.len() / g.img_len();
    let (ck, hw, gs) = (g.ck(), g.hw(), g.group(n));
    let w = &weight_for_cols(g, w)[..];
    let mut out = dev.buffer(n * o * hw);
    let mut kept = keep.then(|| dev.buffer(ck * n * hw));
    let slots: Vec<Option<&mut [f32]>> = match kept.as_mut() {
        Some(k) => k.chunks_mut(gs * ck * hw).map(Some).collect(),
        None => (0..n.div_ceil(gs)).map(|_| None).collect(),
    };
    let groups = out
        .par_chunks_mut(gs * o * hw)
        .zip(imgs.par_chunks(gs * g.img_len()))
        .zip(slots);
    groups.for_each_init(
        || Scratch::new(dev),
        |s, ((y, x), slot)| {
            let m = y.len() / o;
            let cols: &[f32] = match slot {
                Some(c) => {
                    fill_cols(dev, g, x, c, &mut s.hwc);
                    c
                }
                None => group_cols(dev, g, x, &mut s.cols, &mut s.hwc),
            };
            if g.channels_last() {
                // Channels-last columns are the left operand: `y^T = cols · W^T`,
                // written row-major and transposed after: gemm stores a
                // transposed `[o, m]` result 1.15-1.5x slower at these shapes
                // (o = 32-64, m = 225-1536, k = 144-576; AVX2 EPYC).
                let rows = sized(dev, &mut s.rows, y.len());
                sgemm(m, o, ck, Mat::n(cols), Mat::t(w), rows, false);
                from_pixel_rows(rows, o, hw, y);
            } else if m == hw {
                sgemm(o, m, ck, Mat::n(w), Mat::n(cols), y, false);
            } else {
                let rows = sized(dev, &mut s.rows, y.len());
                sgemm(o, m, ck, Mat::n(w), Mat::n(cols), rows, false);
                from_rows(rows, o, hw, y);
            }
        },
    );
    (out, kept.map(|k| (k, gs)))
}

/// `img[n] = col2im(W^T · colside[n])`, the adjoint of [`apply_cpu`].
fn adjoint_cpu(dev: &CpuDevice, g: &Geom, o: usize, colside: &[f32], w: &[f32]) -> Vec<f32> {
    let (ck, hw) = (g.ck(), g.hw());
    let n = colside.len() / (o * hw);
    let gs = g.group(n);
    let w = &weight_for_cols(g, w)[..];
    // col2im adds onto its output; row2im overwrites it.
    let mut out = if g.channels_last() {
        dev.buffer(n * g.img_len())
    } else {
        dev.zeros(n * g.img_len())
    };
    let groups = out
        .par_chunks_mut(gs * g.img_len())
        .zip(colside.par_chunks(gs * o * hw));
    groups.for_each_init(
        || Scratch::new(dev),
        |s, (dx, dy)| {
            let rows = group_rows(dev, g, o, dy, &mut s.rows);
            let m = rows.len() / o;
            if m == hw && g.pointwise() {
                sgemm(ck, m, o, Mat::t(w), Mat::n(rows), dx, false);
            } else if g.channels_last() {
                let cols = sized(dev, &mut s.cols, ck * m);
                sgemm(m, ck, o, Mat::t(rows), Mat::n(w), cols, false);
                row2im(g, cols, dx, sized(dev, &mut s.hwc, g.hwc_len()));
            } else {
                let cols = sized(dev, &mut s.cols, ck * m);
                sgemm(ck, m, o, Mat::t(w), Mat::n(rows), cols, false);
                col2im(g, cols, dx);
            }
        },
    );
    out
}

/// `dW [o, ck] = sum_n colside[n] · cols(img[n])^T`, reading the columns
/// from `kept` (written by a forward with the same group size) when given.
/// The groups are cut into one fixed run per thread, each summed in order
/// into its own `dW`, and those are added in order: the same bits whatever
/// the scheduling (a fold over rayon's adaptive splits would vary with work
/// stealing).
fn weight_grad_cpu(
    dev: &CpuDevice,
    g: &Geom,
    o: usize,
    imgs: &[f32],
    colside: &[f32],
    kept: Option<(&[f32], usize)>,
) -> Vec<f32> {
    let n = imgs.len() / g.img_len();
    let (ck, hw) = (g.ck(), g.hw());
    let gs = kept.map_or_else(|| g.group(n), |(_, gs)| gs);
    let groups = n.div_ceil(gs);
    let per_run = groups.div_ceil(rayon::current_num_threads()).max(1);
    let runs: Vec<Vec<f32>> = (0..groups.div_ceil(per_run))
        .into_par_iter()
        .map(|r| {
            let (mut dw, mut s) = (dev.zeros(o * ck), Scratch::new(dev));
            for q in r * per_run..((r + 1) * per_run).min(groups) {
                let x = &imgs[q * gs * g.img_len()..][..(n - q * gs).min(gs) * g.img_len()];
                let dy = &colside[q * gs * o * hw..][..x.len() / g.img_len() * o * hw];
                let rows = group_rows(dev, g, o, dy, &mut s.rows);
                let cols = match kept {
                    Some((k, _)) => &k[q * gs * ck * hw..][..ck * dy.len() / o],
                    None => group_cols(dev, g, x, &mut s.cols, &mut s.hwc),
                };
                sgemm(
                    o,
                    ck,
                    rows.len() / o,
                    Mat::n(rows),
                    g.cols_mat(cols, true),
                    &mut dw,
                    true,
                );
            }
            dw
        })
        .collect();
    let mut runs = runs.into_iter();
    let mut dw = runs.next().unwrap_or_else(|| dev.zeros(o * ck));
    for r in runs {
        dw.iter_mut().zip(&r).for_each(|(x, y)| *x += y);
        dev.recycle(r);
    }
    weight_from_cols(g, dw)
}

/// `out[n, c, :, :] += b[c]`.
fn add_bias(out: &mut [f32], b: &[f32], plane: usize) {
    let c = b.len();
    for_chunks(out, plane, |q, p| p.iter_mut().for_each(|v| *v += b[q % c]));
}

/// `db[c] = sum over n, h, w of gy[n, c, h, w]`.
fn bias_grad(gy: &[f32], c: usize, plane: usize) -> Vec<f32> {
    let n = gy.len() / (c * plane);
    (0..c)
        .into_par_iter()
        .map(|ci| {
            (0..n)
                .map(|ni| gy[(ni * c + ci) * plane..][..plane].iter().sum::<f32>())
                .sum()
        })
        .collect()
}

/// Geometry and output channels of `conv2d(x, w)`, or an error naming the shapes.
fn conv_geom(op: &str, x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<(Geom, usize)> {
    ensure!(
        x.rank() == 4 && w.rank() == 4 && x.shape()[1] == w.shape()[1],
        "{op}: input {} and weight {} do not fit (expected [n, c, h, w] and [out, c, kh, kw])",
        fmt_shape(x.shape()),
        fmt_shape(w.shape())
    );
    ensure!(
        x.shape()[1..].iter().chain(w.shape()).all(|&d| d > 0),
        "{op}: empty input {} or weight {}",
        fmt_shape(x.shape()),
        fmt_shape(w.shape())
    );
    let (c, h, wd) = (x.shape()[1], x.shape()[2], x.shape()[3]);
    let (o, kh, kw) = (w.shape()[0], w.shape()[2], w.shape()[3]);
    let (Some(ho), Some(wo)) = (
        conv_out_size(h, kh, stride, padding),
        conv_out_size(wd, kw, stride, padding),
    ) else {
        bail!(
            "{op}: kernel {kh}x{kw} with stride {stride} and padding {padding} does not fit input {} \
             (need stride >= 1 and the padded input at least as large as the kernel)",
            fmt_shape(x.shape())
        );
    };
    let geom = Geom {
        c,
        h,
        w: wd,
        kh,
        kw,
        stride,
        pad: padding,
        ho,
        wo,
    };
    Ok((geom, o))
}

fn check_bias(op: &str, b: Option<&Tensor>, channels: usize) -> Result<()> {
    match b {
        Some(b) => b.expect_shape(&[channels], &format!("{op} bias")),
        None => Ok(()),
    }
}

/// `x [n, c, h, w] * w [o, c, kh, kw] (+ b [o]) -> [n, o, ho, wo]`, zero padding.
pub fn conv2d_forward(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    Ok(forward(x, w, b, stride, padding, false)?.0)
}

/// [`conv2d_forward`], with `keep` also the column matrices for
/// [`backward`] (on the CPU; the GPU recomputes them chunk by chunk).
fn forward(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
    keep: bool,
) -> Result<(Tensor, Option<Columns>)> {
    let (g, o) = conv_geom("conv2d", x, w, stride, padding)?;
    check_bias("conv2d", b, o)?;
    let n = x.shape()[0];
    match x.storage() {
        Storage::Cuda(xs) => {
            let mut y = cuda::apply(&g, o, xs, w.cuda()?)?;
            if let Some(b) = b {
                cuda::add_bias(&mut y, b.cuda()?, g.hw())?;
            }
            Ok((Tensor::from_cuda(y, &[n, o, g.ho, g.wo]), None))
        }
        Storage::Cpu(_) => {
            let dev = x.host();
            let (mut y, kept) = apply_cpu(dev, &g, o, x.cpu()?, w.cpu()?, keep);
            if let Some(b) = b {
                add_bias(&mut y, b.cpu()?, g.hw());
            }
            let cols = kept
                .map(|(k, group)| {
                    let data = Tensor::from_vec(k, &[g.ck() * n * g.hw()], &x.device())?;
                    anyhow::Ok(Columns { data, group })
                })
                .transpose()?;
            Ok((Tensor::from_vec(y, &[n, o, g.ho, g.wo], &x.device())?, cols))
        }
    }
}

/// Gradients of [`conv2d_forward`] from the output gradient `gy`: `(dx, dw, db)`,
/// `db` only when `bias`.
pub fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
    stride: usize,
    padding: usize,
    bias: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let (dx, dw, db) = backward(x, w, gy, (stride, padding), bias, true, None)?;
    Ok((dx.expect("dx was asked for"), dw, db))
}

/// [`conv2d_backward`], `dx` only when `need_dx`, reading the forward's
/// column matrices when kept.
fn backward(
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
    (stride, padding): (usize, usize),
    bias: bool,
    need_dx: bool,
    cols: Option<&Columns>,
) -> Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
    let (g, o) = conv_geom("conv2d backward", x, w, stride, padding)?;
    gy.expect_shape(&[x.shape()[0], o, g.ho, g.wo], "conv2d output gradient")?;
    match x.storage() {
        Storage::Cuda(xs) => {
            let (ws, gs) = (w.cuda()?, gy.cuda()?);
            let dx = need_dx
                .then(|| anyhow::Ok(Tensor::from_cuda(cuda::adjoint(&g, o, gs, ws)?, x.shape())))
                .transpose()?;
            let dw = Tensor::from_cuda(cuda::weight_grad(&g, o, xs, gs)?, w.shape());
            let db = if bias {
                Some(Tensor::from_cuda(cuda::bias_grad(gs, o, g.hw())?, &[o]))
            } else {
                None
            };
            Ok((dx, dw, db))
        }
        Storage::Cpu(_) => {
            let (xv, wv, gv) = (x.cpu()?, w.cpu()?, gy.cpu()?);
            let dx = need_dx
                .then(|| x.same_shape(adjoint_cpu(x.host(), &g, o, gv, wv)))
                .transpose()?;
            let kept = match cols {
                Some(c) => Some((c.data.cpu()?, c.group)),
                None => None,
            };
            let dw = w.same_shape(weight_grad_cpu(x.host(), &g, o, xv, gv, kept))?;
            let db = bias
                .then(|| Tensor::from_vec(bias_grad(gv, o, g.hw()), &[o], &x.device()))
                .transpose()?;
            Ok((dx, dw, db))
        }
    }
}

/// Geometry of `conv_transpose2d(x, w)` as the conv it is the adjoint of, and
/// the output shape.
fn transpose_geom(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    output_padding: usize,
) -> Result<(Geom, Vec<usize>)> {
    let op = "conv_transpose2d";
    ensure!(
        x.rank() == 4 && w.rank() == 4 && x.shape()[1] == w.shape()[0],
        "{op}: input {} and weight {} do not fit (expected [n, c_in, h, w] and [c_in, c_out, kh, kw])",
        fmt_shape(x.shape()),
        fmt_shape(w.shape())
    );
    ensure!(
        stride >= 1 && output_padding < stride,
        "{op}: need stride >= 1 and output_padding < stride, got stride {stride}, output_padding {output_padding}"
    );
    ensure!(
        x.shape()[1..].iter().chain(w.shape()).all(|&d| d > 0),
        "{op}: empty input {} or weight {}",
        fmt_shape(x.shape()),
        fmt_shape(w.shape())
    );
    let (n, h, wd) = (x.shape()[0], x.shape()[2], x.shape()[3]);
    let (co, kh, kw) = (w.shape()[1], w.shape()[2], w.shape()[3]);
    let size = |i: usize, k: usize| ((i - 1) * stride + k + output_padding).checked_sub(2 * padding);
    let (Some(hout @ 1..), Some(wout @ 1..)) = (size(h, kh), size(wd, kw)) else {
        bail!(
            "{op}: padding {padding} leaves no output for input {} and kernel {kh}x{kw}",
            fmt_shape(x.shape())
        );
    };
    // output_padding < stride makes the conv over the output land back on h x w.
    let geom = Geom {
        c: co,
        h: hout,
        w: wout,
        kh,
        kw,
        stride,
        pad: padding,
        ho: h,
        wo: wd,
    };
    Ok((geom, vec![n, co, hout, wout]))
}

/// `x [n, c_in, h, w]`, `w [c_in, c_out, kh, kw]` (+ `b [c_out]`) ->
/// `[n, c_out, (h-1)*stride - 2*padding + kh + output_padding, ...]`: the
/// adjoint of `conv2d` with the same weight, as in PyTorch.
pub fn conv_transpose2d_forward(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
    output_padding: usize,
) -> Result<Tensor> {
    let (g, shape) = transpose_geom(x, w, stride, padding, output_padding)?;
    check_bias("conv_transpose2d", b, g.c)?;
    match x.storage() {
        Storage::Cuda(xs) => {
            let mut y = cuda::adjoint(&g, x.shape()[1], xs, w.cuda()?)?;
            if let Some(b) = b {
                cuda::add_bias(&mut y, b.cuda()?, g.h * g.w)?;
            }
            Ok(Tensor::from_cuda(y, &shape))
        }
        Storage::Cpu(_) => {
            let mut y = adjoint_cpu(x.host(), &g, x.shape()[1], x.cpu()?, w.cpu()?);
            if let Some(b) = b {
                add_bias(&mut y, b.cpu()?, g.h * g.w);
            }
            Tensor::from_vec(y, &shape, &x.device())
        }
    }
}

/// Gradients of [`conv_transpose2d_forward`]: `(dx, dw, db)`, `db` only when `bias`.
pub fn conv_transpose2d_backward(
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
    stride: usize,
    padding: usize,
    output_padding: usize,
    bias: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let (g, shape) = transpose_geom(x, w, stride, padding, output_padding)?;
    gy.expect_shape(&shape, "conv_transpose2d output gradient")?;
    let ci = x.shape()[1];
    match x.storage() {
        Storage::Cuda(xs) => {
            let (ws, gs) = (w.cuda()?, gy.cuda()?);
            let dx = Tensor::from_cuda(cuda::apply(&g, ci, gs, ws)?, x.shape());
            let dw = Tensor::from_cuda(cuda::weight_grad(&g, ci, gs, xs)?, w.shape());
            let db = if bias {
                Some(Tensor::from_cuda(cuda::bias_grad(gs, g.c, g.h * g.w)?, &[g.c]))
            } else {
                None
            };
            Ok((dx, dw, db))
        }
        Storage::Cpu(_) => {
            let (xv, wv, gv) = (x.cpu()?, w.cpu()?, gy.cpu()?);
            let dx = x.same_shape(apply_cpu(x.host(), &g, ci, gv, wv, false).0)?;
            let dw = w.same_shape(weight_grad_cpu(x.host(), &g, ci, gv, xv, None))?;
            let db = bias
                .then(|| Tensor::from_vec(bias_grad(gv, g.c, g.h * g.w), &[g.c], &x.device()))
                .transpose()?;
            Ok((dx, dw, db))
        }
    }
}

/// Launchers of kernels/conv.cu: the same three products as on the CPU, with
/// per-image column matrices `[ck, hw]` so that a chunk of images is one
/// batched GEMM (kernels/matmul.cu, images along blockIdx.z). Chunks keep
/// the scratch (column matrices, per-image weight gradients) near a budget.
mod cuda {
    use anyhow::Result;
    use cudarc::driver::LaunchConfig;

    use super::Geom;
    use crate::device::cuda::{grid, launch, CudaDevice, CudaStorage, KernelValue, View, BLOCK};
    use crate::ops::linear::cuda::sgemm_view;

    /// [`Geom`] as the kernels' `struct ConvDims`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct ConvDims([i32; 9]);

    // SAFETY: plain `repr(C)` integers, laid out as the kernels' `struct ConvDims`.
    unsafe impl KernelValue for ConvDims {
        const C_TYPE: &'static str = "ConvDims";
    }

    fn dims(g: &Geom) -> ConvDims {
        ConvDims([g.c, g.h, g.w, g.kh, g.kw, g.stride, g.pad, g.ho, g.wo].map(|d| d as i32))
    }

    /// Images per chunk of a batch of `n` when each needs `per_image` scratch
    /// floats, within the device's scratch budget.
    fn chunk_size(dev: &CudaDevice, n: usize, per_image: usize) -> usize {
        (dev.scratch_budget() / per_image.max(1))
            .clamp(1, 65_535)
            .min(n.max(1))
    }

    /// Scratch for the column matrices of `gs` images; none for a pointwise conv.
    fn col_scratch(dev: &CudaDevice, g: &Geom, gs: usize) -> Result<Option<CudaStorage>> {
        (!g.pointwise())
            .then(|| dev.alloc(gs * g.ck() * g.hw()))
            .transpose()
    }

    /// The column matrices `[nz, ck, hw]` of the `nz` images `x`: the images
    /// themselves for a pointwise conv, else `cols` filled by im2col.
    fn chunk_cols<'a>(
        dev: &CudaDevice,
        g: &Geom,
        x: View<'a>,
        cols: &'a mut Option<CudaStorage>,
        nz: usize,
    ) -> Result<View<'a>> {
        let Some(c) = cols else { return Ok(x) };
        let cfg = grid(nz * g.ck() * g.hw())?;
        launch!(
            dev,
            "conv",
            "im2col",
            cfg,
            &x,
            c.slice_mut(),
            &dims(g),
            &(nz as i32)
        );
        Ok(c.slice())
    }

    /// `colside[n] = W · cols(img[n])` with `W [o, ck]`: `[n, o, hw]`.
    pub(super) fn apply(g: &Geom, o: usize, imgs: &CudaStorage, w: &CudaStorage) -> Result<CudaStorage> {
        let dev = imgs.device();
        let (ck, hw, il) = (g.ck(), g.hw(), g.img_len());
        let n = imgs.len() / il;
        let mut out = dev.alloc(n * o * hw)?;
        let gs = chunk_size(&dev, n, ck * hw);
        let mut cols = col_scratch(&dev, g, gs)?;
        for n0 in (0..n).step_by(gs) {
            let nz = gs.min(n - n0);
            let x = imgs.view(n0 * il..(n0 + nz) * il);
            let b = chunk_cols(&dev, g, x, &mut cols, nz)?;
            let mut y = out.view_mut(n0 * o * hw..(n0 + nz) * o * hw);
            let a = (&w.slice(), false, 0);
            sgemm_view(&dev, nz, (o, hw, ck), a, (&b, false, ck * hw), &mut y, false)?;
        }
        Ok(out)
    }

    /// `img[n] = col2im(W^T · colside[n])`, the adjoint of [`apply`]: `[n, c, h, w]`.
    pub(super) fn adjoint(g: &Geom, o: usize, colside: &CudaStorage, w: &CudaStorage) -> Result<CudaStorage> {
        let dev = colside.device();
        let (ck, hw, il) = (g.ck(), g.hw(), g.img_len());
        let n = colside.len() / (o * hw);
        let mut out = dev.alloc(n * il)?;
        let gs = chunk_size(&dev, n, ck * hw);
        let mut cols = col_scratch(&dev, g, gs)?;
        for n0 in (0..n).step_by(gs) {
            let nz = gs.min(n - n0);
            let dy = colside.view(n0 * o * hw..(n0 + nz) * o * hw);
            let mut dx = out.view_mut(n0 * il..(n0 + nz) * il);
            let (a, b) = ((&w.slice(), true, 0), (&dy, false, o * hw));
            match &mut cols {
                // A pointwise conv's column matrices are the images.
                None => sgemm_view(&dev, nz, (ck, hw, o), a, b, &mut dx, false)?,
                Some(c) => {
                    sgemm_view(&dev, nz, (ck, hw, o), a, b, &mut c.slice_mut(), false)?;
                    let cfg = grid(nz * il)?;
                    launch!(
                        &dev,
                        "conv",
                        "col2im",
                        cfg,
                        c.slice(),
                        &mut dx,
                        &dims(g),
                        &(nz as i32)
                    );
                }
            }
        }
        Ok(out)
    }

    /// `dW [o, ck] = sum_n colside[n] · cols(img[n])^T`: per-image products
    /// of a chunk side by side, then summed in image order by `sum_images`
    /// (a chunk of one image accumulates straight into `dW`).
    pub(super) fn weight_grad(
        g: &Geom,
        o: usize,
        imgs: &CudaStorage,
        colside: &CudaStorage,
    ) -> Result<CudaStorage> {
        let dev = imgs.device();
        let (ck, hw, il) = (g.ck(), g.hw(), g.img_len());
        let n = imgs.len() / il;
        let gs = chunk_size(&dev, n, o * ck + if g.pointwise() { 0 } else { ck * hw });
        let mut cols = col_scratch(&dev, g, gs)?;
        let mut part = (gs > 1).then(|| dev.alloc(gs * o * ck)).transpose()?;
        let mut dw = dev.alloc(o * ck)?;
        dw.fill(0.0)?;
        for n0 in (0..n).step_by(gs) {
            let nz = gs.min(n - n0);
            let x = imgs.view(n0 * il..(n0 + nz) * il);
            let b = chunk_cols(&dev, g, x, &mut cols, nz)?;
            let dy = colside.view(n0 * o * hw..(n0 + nz) * o * hw);
            let (a, b) = ((&dy, false, o * hw), (&b, true, ck * hw));
            match &mut part {
                Some(p) if nz > 1 => {
                    sgemm_view(&dev, nz, (o, ck, hw), a, b, &mut p.slice_mut(), false)?;
                    let len = o * ck;
                    let cfg = grid(len)?;
                    launch!(
                        &dev,
                        "conv",
                        "sum_images",
                        cfg,
                        p.slice(),
                        dw.slice_mut(),
                        &(nz as i32),
                        &(len as i32)
                    );
                }
                _ => sgemm_view(&dev, 1, (o, ck, hw), a, b, &mut dw.slice_mut(), true)?,
            }
        }
        Ok(dw)
    }

    /// `y[n, c, :] += b[c]` over planes of `plane` values.
    pub(super) fn add_bias(y: &mut CudaStorage, b: &CudaStorage, plane: usize) -> Result<()> {
        let (dev, total) = (y.device(), y.len());
        let cfg = grid(total)?;
        let (c, p, t) = (b.len() as i32, plane as i32, total as i32);
        launch!(
            &dev,
            "conv",
            "add_bias",
            cfg,
            y.slice_mut(),
            b.slice(),
            &c,
            &p,
            &t
        );
        Ok(())
    }

    /// `db[c] = sum over n, h, w of gy[n, c, h, w]`, one block per channel.
    pub(super) fn bias_grad(gy: &CudaStorage, c: usize, plane: usize) -> Result<CudaStorage> {
        let dev = gy.device();
        // The kernel's indices are 32-bit, like every one-thread-per-element launch.
        grid(gy.len())?;
        let mut db = dev.alloc(c)?;
        let cfg = LaunchConfig {
            grid_dim: (c as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n, ci, p) = ((gy.len() / (c * plane)) as i32, c as i32, plane as i32);
        launch!(
            &dev,
            "conv",
            "bias_grad",
            cfg,
            gy.slice(),
            db.slice_mut(),
            &n,
            &ci,
            &p
        );
        Ok(db)
    }
}

/// The backward result as one gradient per recorded input.
fn grads(dx: Tensor, dw: Tensor, db: Option<Tensor>) -> Vec<Option<Tensor>> {
    let mut out = vec![Some(dx), Some(dw)];
    out.extend(db.map(Some));
    out
}

impl Graph {
    /// `conv2d(x, w, b)` with PyTorch's weight layout `[out, in, kh, kw]`.
    pub fn conv2d(&mut self, x: Var, w: Var, b: Option<Var>, stride: usize, padding: usize) -> Result<Var> {
        let (xv, wv) = (self.value(x).clone(), self.value(w).clone());
        let (g, _) = conv_geom("conv2d", &xv, &wv, stride, padding)?;
        let cols_bytes = g.ck() * xv.shape()[0] * g.hw() * 4;
        let need_dx = self.needs_grad(x);
        let on_cpu = matches!(xv.storage(), Storage::Cpu(_));
        let keep = self.needs_grad(w) && on_cpu && self.keep_for_backward(cols_bytes);
        let (y, cols) = forward(&xv, &wv, b.map(|b| self.value(b)), stride, padding, keep)?;
        let inputs: Vec<Var> = [Some(x), Some(w), b].into_iter().flatten().collect();
        let bias = b.is_some();
        Ok(self.record(y, &inputs, move |gy| {
            let geom = (stride, padding);
            let (dx, dw, db) = backward(&xv, &wv, gy, geom, bias, need_dx, cols.as_ref())?;
            let mut out = vec![dx, Some(dw)];
            out.extend(db.map(Some));
            Ok(out)
        }))
    }

    /// `conv_transpose2d(x, w, b)` with PyTorch's weight layout `[in, out, kh, kw]`.
    pub fn conv_transpose2d(
        &mut self,
        x: Var,
        w: Var,
        b: Option<Var>,
        stride: usize,
        padding: usize,
        output_padding: usize,
    ) -> Result<Var> {
        let (xv, wv) = (self.value(x).clone(), self.value(w).clone());
        let y = conv_transpose2d_forward(
            &xv,
            &wv,
            b.map(|b| self.value(b)),
            stride,
            padding,
            output_padding,
        )?;
        let inputs: Vec<Var> = [Some(x), Some(w), b].into_iter().flatten().collect();
        let bias = b.is_some();
        Ok(self.record(y, &inputs, move |gy| {
            let (dx, dw, db) =
                conv_transpose2d_backward(&xv, &wv, gy, stride, padding, output_padding, bias)?;
            Ok(grads(dx, dw, db))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_op, rand_tensor, Check};
    use crate::Device;

    /// Direct convolution, one output at a time.
    fn conv_ref(x: &Tensor, w: &Tensor, b: &Tensor, s: usize, p: usize) -> Vec<f32> {
        let (xs, ws, bs) = (x.to_vec().unwrap(), w.to_vec().unwrap(), b.to_vec().unwrap());
        let [n, c, h, wd] = x.shape().try_into().unwrap();
        let [o, _, kh, kw] = w.shape().try_into().unwrap();
        let (ho, wo) = ((h + 2 * p - kh) / s + 1, (wd + 2 * p - kw) / s + 1);
        let mut out = Vec::new();
        for ni in 0..n {
            for oc in 0..o {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = bs[oc];
                        for ci in 0..c {
                            for i in 0..kh {
                                for j in 0..kw {
                                    let (iy, ix) = (
                                        (oy * s + i) as isize - p as isize,
                                        (ox * s + j) as isize - p as isize,
                                    );
                                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < wd {
                                        let xv = xs[((ni * c + ci) * h + iy as usize) * wd + ix as usize];
                                        acc += xv * ws[((oc * c + ci) * kh + i) * kw + j];
                                    }
                                }
                            }
                        }
                        out.push(acc);
                    }
                }
            }
        }
        out
    }

    /// Transposed convolution by scattering every input pixel through the kernel.
    fn conv_t_ref(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        s: usize,
        p: usize,
        op: usize,
    ) -> (Vec<f32>, Vec<usize>) {
        let (xs, ws, bs) = (x.to_vec().unwrap(), w.to_vec().unwrap(), b.to_vec().unwrap());
        let [n, ci, h, wd] = x.shape().try_into().unwrap();
        let [_, co, kh, kw] = w.shape().try_into().unwrap();
        let (ho, wo) = ((h - 1) * s + kh + op - 2 * p, (wd - 1) * s + kw + op - 2 * p);
        let mut out = vec![0.0; n * co * ho * wo];
        for (q, v) in out.iter_mut().enumerate() {
            *v = bs[q / (ho * wo) % co];
        }
        for ni in 0..n {
            for c in 0..ci {
                for iy in 0..h {
                    for ix in 0..wd {
                        let xv = xs[((ni * ci + c) * h + iy) * wd + ix];
                        for oc in 0..co {
                            for i in 0..kh {
                                for j in 0..kw {
                                    let (y, xx) = (
                                        (iy * s + i) as isize - p as isize,
                                        (ix * s + j) as isize - p as isize,
                                    );
                                    if y >= 0 && xx >= 0 && (y as usize) < ho && (xx as usize) < wo {
                                        let wv = ws[((c * co + oc) * kh + i) * kw + j];
                                        out[((ni * co + oc) * ho + y as usize) * wo + xx as usize] += xv * wv;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        (out, vec![n, co, ho, wo])
    }

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{what} at {i}: {a} vs {b}"
            );
        }
    }

    /// (x shape, w shape, stride, padding): odd sizes, stride 2, padding
    /// wider than the kernel, a kernel wider than the input, non-square kernels, 1x1.
    const CONV_CASES: [([usize; 4], [usize; 4], usize, usize); 9] = [
        ([3, 2, 7, 9], [4, 2, 3, 3], 2, 1),
        ([5, 2, 7, 7], [3, 2, 3, 3], 1, 1),
        ([2, 3, 11, 13], [5, 3, 3, 3], 1, 1),
        ([2, 3, 9, 8], [4, 3, 2, 5], 2, 2),
        ([3, 4, 5, 6], [2, 4, 1, 1], 1, 0),
        ([1, 4, 5, 6], [2, 4, 1, 1], 1, 0),
        ([2, 4, 5, 7], [3, 4, 1, 1], 2, 0),
        ([1, 1, 3, 3], [1, 1, 2, 2], 1, 2),
        ([2, 2, 2, 3], [1, 2, 5, 5], 3, 2),
    ];

    /// Run `f` on two threads, so that the batch splits into GEMM groups the
    /// same way on every machine.
    fn two_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap()
            .install(f)
    }

    #[test]
    fn conv2d_matches_reference_loop() {
        two_threads(conv2d_cases)
    }

    fn conv2d_cases() {
        let dev = Device::cpu();
        let mut groups = Vec::new();
        for (k, (xs, ws, s, p)) in CONV_CASES.into_iter().enumerate() {
            let x = rand_tensor(&xs, k as u64, &dev);
            let w = rand_tensor(&ws, 100 + k as u64, &dev);
            let b = rand_tensor(&[ws[0]], 200 + k as u64, &dev);
            let y = conv2d_forward(&x, &w, Some(&b), s, p).unwrap();
            let (g, _) = conv_geom("test", &x, &w, s, p).unwrap();
            assert_eq!(y.shape(), &[xs[0], ws[0], g.ho, g.wo]);
            assert_close(
                &y.to_vec().unwrap(),
                &conv_ref(&x, &w, &b, s, p),
                &format!("case {k}"),
            );
            groups.push((g.group(xs[0]), xs[0], g.channels_last()));
        }
        // The cases cover one image per GEMM, and several with a shorter last
        // group, and both column layouts.
        assert!(groups.iter().any(|&(g, _, _)| g == 1));
        assert!(groups.iter().any(|&(g, n, _)| g > 1 && n % g != 0));
        assert!(groups.iter().any(|&(_, _, cl)| cl) && groups.iter().any(|&(_, _, cl)| !cl));
    }

    /// The weight gradient from the forward's kept columns has the same bits
    /// as recomputing them, and the data gradient is skipped when not asked.
    #[test]
    fn kept_columns_give_the_same_weight_gradient() {
        let dev = Device::cpu();
        for (k, (xs, ws, s, p)) in CONV_CASES.into_iter().enumerate() {
            let x = rand_tensor(&xs, k as u64, &dev);
            let w = rand_tensor(&ws, 100 + k as u64, &dev);
            two_threads(|| {
                let (y, cols) = forward(&x, &w, None, s, p, true).unwrap();
                let gy = rand_tensor(y.shape(), 300 + k as u64, &dev);
                let (dx, dw, _) = backward(&x, &w, &gy, (s, p), false, false, cols.as_ref()).unwrap();
                let (_, want, _) = conv2d_backward(&x, &w, &gy, s, p, false).unwrap();
                assert!(dx.is_none() && cols.is_some(), "case {k}");
                assert_eq!(dw.to_vec().unwrap(), want.to_vec().unwrap(), "case {k}");
            });
        }
    }

    #[test]
    fn conv_transpose2d_matches_reference_loop() {
        let dev = Device::cpu();
        // (x shape, w shape, stride, padding, output_padding)
        let cases = [
            ([2, 3, 4, 5], [3, 2, 3, 3], 2, 1, 1),
            ([3, 2, 5, 3], [2, 4, 2, 3], 3, 0, 2),
            ([5, 3, 6, 6], [3, 2, 3, 3], 1, 1, 0),
            ([2, 4, 5, 7], [4, 3, 1, 1], 1, 0, 0),
            ([1, 2, 3, 3], [2, 2, 4, 4], 2, 2, 1),
        ];
        for (k, (xs, ws, s, p, op)) in cases.into_iter().enumerate() {
            let x = rand_tensor(&xs, k as u64, &dev);
            let w = rand_tensor(&ws, 100 + k as u64, &dev);
            let b = rand_tensor(&[ws[1]], 200 + k as u64, &dev);
            let y = conv_transpose2d_forward(&x, &w, Some(&b), s, p, op).unwrap();
            let (want, shape) = conv_t_ref(&x, &w, &b, s, p, op);
            assert_eq!(y.shape(), &shape[..], "case {k}");
            assert_close(&y.to_vec().unwrap(), &want, &format!("case {k}"));
        }
    }

    #[test]
    fn gradcheck_conv2d() {
        two_threads(gradcheck_conv2d_cases)
    }

    fn gradcheck_conv2d_cases() {
        let dev = Device::cpu();
        // (x, w, stride, padding): stride 2 + padding 1 with a non-square
        // kernel on odd sizes; then a batch that splits into GEMM groups 2 + 1.
        for (k, (xs, ws, s, p)) in [
            ([2, 3, 5, 7], [4, 3, 3, 2], 2, 1),
            ([3, 2, 7, 7], [2, 2, 3, 3], 1, 1),
            ([2, 3, 4, 5], [2, 3, 1, 1], 1, 0),
        ]
        .into_iter()
        .enumerate()
        {
            let x = rand_tensor(&xs, 1 + k as u64, &dev);
            let w = rand_tensor(&ws, 2 + k as u64, &dev);
            let b = rand_tensor(&[ws[0]], 3, &dev);
            check_op(&[x.clone(), w.clone(), b], Check::default(), |g, v| {
                g.conv2d(v[0], v[1], Some(v[2]), s, p)
            })
            .unwrap_or_else(|e| panic!("case {k}: {e}"));
            check_op(&[x, w], Check::default(), |g, v| g.conv2d(v[0], v[1], None, s, p)).unwrap();
        }
    }

    #[test]
    fn gradcheck_conv_transpose2d() {
        let dev = Device::cpu();
        for (k, (xs, ws, s, p, op)) in [
            ([2, 3, 3, 4], [3, 2, 3, 2], 2, 1, 1),
            ([3, 2, 4, 3], [2, 3, 3, 3], 1, 1, 0),
        ]
        .into_iter()
        .enumerate()
        {
            let x = rand_tensor(&xs, 4 + k as u64, &dev);
            let w = rand_tensor(&ws, 5 + k as u64, &dev);
            let b = rand_tensor(&[ws[1]], 6, &dev);
            check_op(&[x.clone(), w.clone(), b], Check::default(), |g, v| {
                g.conv_transpose2d(v[0], v[1], Some(v[2]), s, p, op)
            })
            .unwrap_or_else(|e| panic!("case {k}: {e}"));
            check_op(&[x, w], Check::default(), |g, v| {
                g.conv_transpose2d(v[0], v[1], None, s, p, op)
            })
            .unwrap();
        }
    }

    #[test]
    fn conv_shape_errors_name_the_op_and_shapes() {
        let dev = Device::cpu();
        let x = rand_tensor(&[2, 3, 5, 5], 1, &dev);
        let w = rand_tensor(&[4, 3, 3, 3], 2, &dev);
        let err = |r: Result<Tensor>| r.unwrap_err().to_string();
        let e = err(conv2d_forward(
            &x,
            &rand_tensor(&[4, 2, 3, 3], 2, &dev),
            None,
            1,
            0,
        ));
        assert!(e.contains("conv2d") && e.contains("[2, 3, 5, 5]"), "{e}");
        let e = err(conv2d_forward(
            &x,
            &rand_tensor(&[4, 3, 7, 7], 2, &dev),
            None,
            1,
            0,
        ));
        assert!(e.contains("does not fit"), "{e}");
        assert!(conv2d_forward(&x, &rand_tensor(&[4, 3, 7, 7], 2, &dev), None, 1, 1).is_ok());
        assert!(conv2d_forward(&x, &w, None, 0, 1).is_err());
        assert!(conv2d_forward(&x, &w, Some(&rand_tensor(&[3], 3, &dev)), 1, 1).is_err());
        assert!(conv2d_forward(&rand_tensor(&[3, 5, 5], 1, &dev), &w, None, 1, 1).is_err());
        assert!(conv2d_forward(&rand_tensor(&[2, 3, 0, 5], 1, &dev), &w, None, 1, 1).is_err());
        let gy = rand_tensor(&[2, 4, 4, 4], 3, &dev);
        assert!(conv2d_backward(&x, &w, &gy, 1, 1, true).is_err());

        let wt = rand_tensor(&[3, 4, 3, 3], 2, &dev);
        let e = err(conv_transpose2d_forward(&x, &wt, None, 2, 1, 2));
        assert!(e.contains("output_padding"), "{e}");
        assert!(conv_transpose2d_forward(&x, &w, None, 1, 0, 0).is_err());
        assert!(conv_transpose2d_forward(&rand_tensor(&[1, 3, 1, 1], 1, &dev), &wt, None, 1, 2, 0).is_err());
        assert!(conv_transpose2d_forward(&x, &wt, Some(&rand_tensor(&[3], 3, &dev)), 1, 1, 0).is_err());
        let gy = rand_tensor(&[2, 4, 6, 6], 3, &dev);
        assert!(conv_transpose2d_backward(&x, &wt, &gy, 1, 1, 0, false).is_err());
    }
}
