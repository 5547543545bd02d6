//! Generated MNIST tasks, after DeepMind's mnist-cluttered recipe: digits
//! pasted at uniform positions on a black canvas, plus distractor fragments
//! (8×8 crops of random other digits) at uniform positions, summed and
//! clipped to [0, 1].
//!
//! - [`Task::Pair`] (`cluttered-mnist`): two digits + 8 fragments on 100×100;
//!   the label is the unordered pair of digits (55 classes).
//! - [`Task::Sum`] (`mnist-sum`): two digits, no clutter; label = sum (19 classes).
//! - [`Task::Single`] (`cluttered-mnist-1`): one digit + clutter (10 classes).
//!
//! Large variants ([`Mode`]): `upsampled` is the 100×100 image bilinearly
//! upsampled to K×K (the paper's 2528² protocol); `native` lays the scene out
//! on the K×K canvas itself, digits `digit_px` wide (default K/16, two proxy
//! pixels of a 32×32 proxy, so the proxy shows where digits are but not which)
//! and the clutter scaled to match: fragments scaled like the digits, 8 per
//! cell of 100 digit-pixels square, as on the 100×100 canvas.
//!
//! Nothing is stored: a sample is a [`Scene`] (where each digit and fragment
//! goes) drawn from a per-sample seed, and pixels are rendered when read. A
//! 100² sample renders in tens of microseconds, far below a training step, so
//! regenerating per access costs nothing while 100k stored f32 canvases would
//! cost 4 GB; a large sample renders only the region asked for, so a 2528²
//! dataset of 120k images needs no disk. Fragments are drawn per canvas cell
//! from the scene's seed, so a region read only visits the cells it overlaps.

use std::ops::Range;
use std::sync::Arc;

use anyhow::{bail, ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::mnist::{Mnist, MnistSplit, SIDE as DIGIT};
use super::proxy::{AreaProxy, ProxyMaker};
use super::source::{pyramid_sizes, read_via_finer_level, ImageSource, InMemoryImage, PYRAMID_MIN_SIDE};
use super::{mix_seed, Dataset, Sample, Split};

/// Side of the original recipe's canvas.
pub const BASE_SIDE: usize = 100;
/// Side of a distractor fragment, in MNIST pixels.
const FRAGMENT: usize = 8;
/// Fragments per `BASE_SIDE`² digit-pixel cell.
const FRAGMENTS_PER_CELL: usize = 8;
/// Largest canvas side accepted for the large variants.
pub const MAX_SIZE: usize = 1 << 16;
/// Reads of a coarse level that would cost more full-resolution pixels
/// than this (16 M) through the finer levels draw the level at its own
/// resolution instead, when that still resolves the digits: the area
/// downsample up to resampling error, at a cost that does not grow with the
/// image. Smaller reads (every read of the 100² task) stay exact.
const DRAW_COARSE_ABOVE: usize = 1 << 24;

/// Seeds the proxy noise apart from the scenes.
const PROXY_STREAM: u64 = 0x5052_4f58;
/// MNIST train digits held out for the valid split (the last ones).
pub const VALID_DIGITS: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    Pair,
    Sum,
    Single,
}

impl Task {
    pub const ALL: [Task; 3] = [Task::Pair, Task::Sum, Task::Single];

    pub fn name(self) -> &'static str {
        match self {
            Task::Pair => "cluttered-mnist",
            Task::Sum => "mnist-sum",
            Task::Single => "cluttered-mnist-1",
        }
    }

    pub fn parse(name: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|t| t.name() == name)
    }

    pub fn digits(self) -> usize {
        if self == Task::Single {
            1
        } else {
            2
        }
    }

    pub fn cluttered(self) -> bool {
        self != Task::Sum
    }

    pub fn num_classes(self) -> usize {
        match self {
            Task::Pair => 55,
            Task::Sum => 19,
            Task::Single => 10,
        }
    }

    /// The class of a sample whose digits are `digits`.
    pub fn label(self, digits: &[u8]) -> usize {
        match self {
            Task::Pair => {
                let (a, b) = (
                    digits[0].min(digits[1]) as usize,
                    digits[0].max(digits[1]) as usize,
                );
                // Pairs (a, b), a <= b, in lexicographic order: rows before a hold 10 + 9 + ... entries.
                a * 10 - a * (a.saturating_sub(1)) / 2 + (b - a)
            }
            Task::Sum => digits.iter().map(|&d| d as usize).sum(),
            Task::Single => digits[0] as usize,
        }
    }

    pub fn class_names(self) -> Vec<String> {
        match self {
            Task::Pair => (0..10)
                .flat_map(|a| (a..10).map(move |b| format!("{a}+{b}")))
                .collect(),
            Task::Sum => (0..19).map(|s| s.to_string()).collect(),
            Task::Single => (0..10).map(|d| d.to_string()).collect(),
        }
    }
}

/// How a large image is made from the scene.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Upsampled,
    Native,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Upsampled => "upsampled",
            Mode::Native => "native",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SceneConfig {
    pub task: Task,
    /// Image side in pixels; 100 is the original recipe.
    pub size: usize,
    pub mode: Mode,
    /// `Native` only: side of a digit in pixels.
    pub digit_px: usize,
}

impl SceneConfig {
    /// The original 100×100 task.
    pub fn base(task: Task) -> SceneConfig {
        SceneConfig {
            task,
            size: BASE_SIDE,
            mode: Mode::Upsampled,
            digit_px: DIGIT,
        }
    }

    /// A large variant with the default digit size for `Native`.
    pub fn large(task: Task, size: usize, mode: Mode) -> SceneConfig {
        SceneConfig {
            task,
            size,
            mode,
            digit_px: (size / 16).max(DIGIT),
        }
    }

    fn check(&self) -> Result<()> {
        ensure!(
            (BASE_SIDE..=MAX_SIZE).contains(&self.size),
            "image size {} is out of range: {BASE_SIDE}..={MAX_SIZE}",
            self.size
        );
        ensure!(
            (DIGIT..=self.size / 2).contains(&self.digit_px) || self.mode == Mode::Upsampled,
            "native digit size {} px must be in {DIGIT}..={} for a {}² image",
            self.digit_px,
            self.size / 2,
            self.size
        );
        Ok(())
    }

    /// The canvas the scene is laid out on.
    fn geometry(&self) -> Geometry {
        let (side, digit_px) = match self.mode {
            Mode::Upsampled => (BASE_SIDE, DIGIT),
            Mode::Native => (self.size, self.digit_px),
        };
        let scale = |n: usize| ((n * digit_px) as f64 / DIGIT as f64).round().max(1.0) as usize;
        Geometry {
            side,
            digit_px,
            fragment_px: scale(FRAGMENT),
            cell_px: scale(BASE_SIDE),
        }
    }

    pub fn describe(&self) -> String {
        if self.size == BASE_SIDE {
            format!("{} {}x{}", self.task.name(), self.size, self.size)
        } else if self.mode == Mode::Native {
            format!(
                "{} {}x{} native (digits {} px)",
                self.task.name(),
                self.size,
                self.size,
                self.digit_px
            )
        } else {
            format!(
                "{} {}x{} upsampled from 100x100",
                self.task.name(),
                self.size,
                self.size
            )
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    /// Canvas side in pixels.
    side: usize,
    digit_px: usize,
    fragment_px: usize,
    /// Side of a clutter cell (holds `FRAGMENTS_PER_CELL` fragments).
    cell_px: usize,
}

/// A window of an MNIST digit pasted, scaled, onto the canvas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Item {
    /// MNIST index of the digit it comes from.
    pub digit: usize,
    /// Top-left corner and side of the window in the 28×28 digit.
    pub sy: usize,
    pub sx: usize,
    pub n: usize,
    /// Top-left corner and side on the canvas, in pixels.
    pub y: i64,
    pub x: i64,
    pub px: usize,
}

/// Everything random about one sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scene {
    /// The labelled digits.
    pub digits: Vec<Item>,
    /// Their MNIST labels.
    pub digit_labels: Vec<u8>,
    pub label: usize,
    /// Seed of the per-cell clutter; `None` without clutter.
    clutter_seed: Option<u64>,
    geo: Geometry,
    /// MNIST indices clutter is cut from.
    pool: Range<usize>,
}

impl Scene {
    /// The labelled digits' centres in normalized coordinates (`[-1, 1]`).
    pub fn digit_centres(&self) -> Vec<[f32; 2]> {
        let side = self.geo.side as f32;
        let c = |o: i64, px: usize| (2.0 * o as f32 + px as f32) / side - 1.0;
        self.digits.iter().map(|d| [c(d.x, d.px), c(d.y, d.px)]).collect()
    }

    /// The distractor fragments of clutter cell `(cy, cx)`.
    fn cell_fragments(&self, cy: usize, cx: usize, out: &mut Vec<Item>) {
        let Some(seed) = self.clutter_seed else { return };
        let g = &self.geo;
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[seed, cy as u64, cx as u64]));
        for _ in 0..FRAGMENTS_PER_CELL {
            let digit = rng.random_range(self.pool.clone());
            let sy = rng.random_range(0..=DIGIT - FRAGMENT);
            let sx = rng.random_range(0..=DIGIT - FRAGMENT);
            let y = cy * g.cell_px + rng.random_range(0..=g.cell_px - g.fragment_px);
            let x = cx * g.cell_px + rng.random_range(0..=g.cell_px - g.fragment_px);
            out.push(Item {
                digit,
                sy,
                sx,
                n: FRAGMENT,
                y: y as i64,
                x: x as i64,
                px: g.fragment_px,
            });
        }
    }

    /// Digits and fragments that may touch canvas rows `ys`, columns `xs`.
    fn items_in(&self, ys: Range<i64>, xs: Range<i64>) -> Vec<Item> {
        // Bilinear sampling reaches half a digit pixel past an item's edge.
        let pad = (self.geo.digit_px.div_ceil(DIGIT) + 1) as i64;
        let (ys, xs) = (ys.start - pad..ys.end + pad, xs.start - pad..xs.end + pad);
        let overlaps = |it: &Item| {
            it.y < ys.end && it.y + it.px as i64 > ys.start && it.x < xs.end && it.x + it.px as i64 > xs.start
        };
        let mut items: Vec<Item> = self.digits.iter().copied().filter(overlaps).collect();
        if self.clutter_seed.is_some() {
            let cells = self.geo.side.div_ceil(self.geo.cell_px) as i64;
            let cell = |v: i64| (v.div_euclid(self.geo.cell_px as i64)).clamp(0, cells - 1) as usize;
            if ys.end > 0 && xs.end > 0 && ys.start < self.geo.side as i64 && xs.start < self.geo.side as i64
            {
                let mut frags = Vec::new();
                for cy in cell(ys.start)..=cell(ys.end - 1) {
                    for cx in cell(xs.start)..=cell(xs.end - 1) {
                        self.cell_fragments(cy, cx, &mut frags);
                    }
                }
                items.extend(frags.into_iter().filter(overlaps));
            }
        }
        items
    }

    /// Rows `y0..y0+h`, columns `x0..x0+w` of the canvas drawn at `res`×`res`
    /// pixels (`res` = canvas side draws it pixel for pixel; a digit pixel
    /// then lands exactly on a canvas pixel when digits are unscaled).
    /// Windows are sampled bilinearly with zeros outside them.
    #[allow(clippy::too_many_arguments)]
    pub fn render(&self, mnist: &Mnist, res: usize, y0: i64, x0: i64, h: usize, w: usize) -> Vec<f32> {
        let k = self.geo.side as f64 / res as f64; // canvas pixels per output pixel
        let span = |o: i64, n: usize| {
            (o as f64 * k).floor() as i64 - 1..((o + n as i64) as f64 * k).ceil() as i64 + 1
        };
        let mut out = vec![0.0f32; h * w];
        for it in self.items_in(span(y0, h), span(x0, w)) {
            let scale = it.px as f64 / it.n as f64; // canvas pixels per digit pixel
            let sprite = mnist.image(it.digit);
            // Output pixel o samples window coordinate ((o + 0.5) k - corner) / scale - 0.5.
            let taps = |o0: i64, n: usize, corner: i64| -> Vec<(usize, i64, f32)> {
                (0..n)
                    .filter_map(|i| {
                        let s = (((o0 + i as i64) as f64 + 0.5) * k - corner as f64) / scale - 0.5;
                        (s > -1.0 && s < it.n as f64).then(|| {
                            let f = s.floor();
                            (i, f as i64, (s - f) as f32)
                        })
                    })
                    .collect()
            };
            let (rows, cols) = (taps(y0, h, it.y), taps(x0, w, it.x));
            let px = |a: i64, b: i64| -> f32 {
                if a < 0 || b < 0 || a >= it.n as i64 || b >= it.n as i64 {
                    0.0
                } else {
                    sprite[(it.sy + a as usize) * DIGIT + it.sx + b as usize] as f32 / 255.0
                }
            };
            for &(i, a, fy) in &rows {
                let row = &mut out[i * w..(i + 1) * w];
                for &(j, b, fx) in &cols {
                    let top = (1.0 - fx) * px(a, b) + fx * px(a, b + 1);
                    let bottom = (1.0 - fx) * px(a + 1, b) + fx * px(a + 1, b + 1);
                    row[j] += (1.0 - fy) * top + fy * bottom;
                }
            }
        }
        out.iter_mut().for_each(|v| *v = v.min(1.0));
        out
    }
}

/// Bilinear resampling taps (align_corners = false, edges clamped, as
/// PyTorch's `interpolate`) for outputs `o0..o0+n` of an axis of `len`
/// inputs stretched to `size` pixels; `None` outside the image.
fn upsample_taps(o0: i64, n: usize, len: usize, size: usize) -> Vec<Option<(usize, usize, f32)>> {
    (o0..o0 + n as i64)
        .map(|o| {
            (0..size as i64).contains(&o).then(|| {
                let s = ((o as f64 + 0.5) * len as f64 / size as f64 - 0.5).clamp(0.0, (len - 1) as f64);
                let i = s.floor() as usize;
                (i, (i + 1).min(len - 1), (s - i as f64) as f32)
            })
        })
        .collect()
}

/// A large generated image, rendered region by region on demand.
pub struct SceneSource {
    scene: Scene,
    cfg: SceneConfig,
    mnist: Arc<Mnist>,
    /// `Upsampled`: the 100×100 image everything is interpolated from.
    base: Option<Vec<f32>>,
    sizes: Vec<(usize, usize)>,
}

impl SceneSource {
    pub fn new(scene: Scene, cfg: SceneConfig, mnist: Arc<Mnist>) -> SceneSource {
        let base = (cfg.mode == Mode::Upsampled)
            .then(|| scene.render(&mnist, BASE_SIDE, 0, 0, BASE_SIDE, BASE_SIDE));
        SceneSource {
            sizes: pyramid_sizes(cfg.size, cfg.size, PYRAMID_MIN_SIDE),
            scene,
            cfg,
            mnist,
            base,
        }
    }

    pub fn scene(&self) -> &Scene {
        &self.scene
    }

    /// Whether the image drawn at `res`×`res` still resolves the digits: a
    /// digit pixel covers at least half a pixel.
    fn resolved_at(&self, res: usize) -> bool {
        let geo = self.scene.geo;
        let unit = geo.digit_px as f64 / DIGIT as f64 * self.cfg.size as f64 / geo.side as f64;
        unit * res as f64 / self.cfg.size as f64 >= 0.5
    }

    /// The whole image drawn at `res`×`res`.
    fn draw(&self, res: usize, y0: i64, x0: i64, h: usize, w: usize) -> Vec<f32> {
        match &self.base {
            None => self.scene.render(&self.mnist, res, y0, x0, h, w),
            Some(base) => {
                let (rows, cols) = (
                    upsample_taps(y0, h, BASE_SIDE, res),
                    upsample_taps(x0, w, BASE_SIDE, res),
                );
                let mut out = vec![0.0f32; h * w];
                for (i, r) in rows.iter().enumerate() {
                    let Some((a0, a1, fy)) = *r else { continue };
                    for (j, c) in cols.iter().enumerate() {
                        let Some((b0, b1, fx)) = *c else { continue };
                        let at = |a: usize, b: usize| base[a * BASE_SIDE + b];
                        let top = (1.0 - fx) * at(a0, b0) + fx * at(a0, b1);
                        let bottom = (1.0 - fx) * at(a1, b0) + fx * at(a1, b1);
                        out[i * w + j] = (1.0 - fy) * top + fy * bottom;
                    }
                }
                out
            }
        }
    }
}

impl ImageSource for SceneSource {
    fn channels(&self) -> usize {
        1
    }

    fn levels(&self) -> usize {
        self.sizes.len()
    }

    fn level_size(&self, level: usize) -> (usize, usize) {
        self.sizes[level]
    }

    fn read_region(&self, level: usize, y0: i64, x0: i64, h: usize, w: usize, out: &mut [f32]) -> Result<()> {
        ensure!(
            out.len() == h * w,
            "scene read_region: output buffer holds {} values, {h}x{w} needs {}",
            out.len(),
            h * w
        );
        let res = self.sizes[level].0;
        if level > 0 && ((h * w) << (2 * level) <= DRAW_COARSE_ABOVE || !self.resolved_at(res)) {
            return read_via_finer_level(self, level, y0, x0, h, w, out);
        }
        // Level 0, or a coarse level drawn at its own resolution: through the
        // finer levels, a 24x24 read at level 9 of a 65536² image would draw
        // 150 M full-resolution pixels.
        let mut img = self.draw(res, y0, x0, h, w);
        // Outside the image: zeros (the native canvas may draw past its edge).
        let inside = |v: i64| (0..res as i64).contains(&v);
        for i in 0..h {
            for j in 0..w {
                if !inside(y0 + i as i64) || !inside(x0 + j as i64) {
                    img[i * w + j] = 0.0;
                }
            }
        }
        out.copy_from_slice(&img);
        Ok(())
    }

    /// The scene drawn at the smallest power-of-two multiple of `min_side`
    /// at which a digit pixel still covers half an output pixel (so small
    /// native digits are not missed), at most the full size: rendering at
    /// a lower resolution stands in for the pyramid level, which would cost
    /// a full-resolution render.
    fn overview(&self, min_side: usize) -> Result<(usize, usize, Vec<f32>)> {
        let size = self.cfg.size;
        let mut res = min_side.max(1);
        while res < size && !self.resolved_at(res) {
            res *= 2;
        }
        let res = res.min(size);
        Ok((res, res, self.draw(res, 0, 0, res, res)))
    }
}

/// The generated dataset of one task and split.
pub struct SceneDataset {
    cfg: SceneConfig,
    split: Split,
    seed: u64,
    len: usize,
    mnist: Arc<Mnist>,
    pool: Range<usize>,
    proxy: Arc<dyn ProxyMaker>,
}

/// The MNIST split a dataset split draws its digits from.
pub fn mnist_split(split: Split) -> MnistSplit {
    if split == Split::Test {
        MnistSplit::Test
    } else {
        MnistSplit::Train
    }
}

/// The MNIST indices split `split` draws its digits from, out of the `n`
/// digits of [`mnist_split`]`(split)`: train uses MNIST train digits except
/// the last [`VALID_DIGITS`], which valid uses; test uses MNIST test.
pub fn digit_pool(split: Split, n: usize) -> Result<Range<usize>> {
    Ok(match split {
        Split::Train | Split::Valid if n <= VALID_DIGITS => {
            bail!(
                "{} split needs the MNIST train digits, got {n} digits",
                split.name()
            )
        }
        Split::Train => 0..n - VALID_DIGITS,
        Split::Valid => n - VALID_DIGITS..n,
        Split::Test => 0..n,
    })
}

impl SceneDataset {
    /// `mnist` must be [`mnist_split`]`(split)`; digits come from its
    /// [`digit_pool`]. Proxies are `proxy_size`² area downsamples with `noise`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: SceneConfig,
        split: Split,
        seed: u64,
        len: usize,
        mnist: Arc<Mnist>,
        proxy_size: usize,
        noise: f32,
    ) -> Result<SceneDataset> {
        cfg.check()?;
        let pool = digit_pool(split, mnist.len())?;
        ensure!(proxy_size >= 1, "proxy size must be at least 1");
        let proxy = Arc::new(AreaProxy {
            channels: 1,
            size: proxy_size,
            noise,
            seed: mix_seed(&[seed, split as u64, PROXY_STREAM]),
        });
        Ok(SceneDataset {
            cfg,
            split,
            seed,
            len,
            mnist,
            pool,
            proxy,
        })
    }

    /// Replace the proxy (the hook for a proxy of another modality).
    pub fn with_proxy(mut self, proxy: Arc<dyn ProxyMaker>) -> SceneDataset {
        self.proxy = proxy;
        self
    }

    pub fn config(&self) -> SceneConfig {
        self.cfg
    }

    /// The layout of sample `i`, from its own seed.
    pub fn scene(&self, i: usize) -> Scene {
        let geo = self.cfg.geometry();
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[self.seed, self.split as u64, i as u64]));
        let digits: Vec<Item> = (0..self.cfg.task.digits())
            .map(|_| Item {
                digit: rng.random_range(self.pool.clone()),
                sy: 0,
                sx: 0,
                n: DIGIT,
                y: rng.random_range(0..=geo.side - geo.digit_px) as i64,
                x: rng.random_range(0..=geo.side - geo.digit_px) as i64,
                px: geo.digit_px,
            })
            .collect();
        let digit_labels: Vec<u8> = digits.iter().map(|d| self.mnist.labels[d.digit]).collect();
        Scene {
            label: self.cfg.task.label(&digit_labels),
            digits,
            digit_labels,
            clutter_seed: self.cfg.task.cluttered().then(|| rng.random()),
            geo,
            pool: self.pool.clone(),
        }
    }

    /// The image of sample `i`: held in memory at 100², rendered on demand above.
    pub fn image(&self, i: usize) -> Result<Arc<dyn ImageSource>> {
        self.image_of(self.scene(i))
    }

    fn image_of(&self, scene: Scene) -> Result<Arc<dyn ImageSource>> {
        Ok(if self.cfg.size == BASE_SIDE {
            let data = scene.render(&self.mnist, BASE_SIDE, 0, 0, BASE_SIDE, BASE_SIDE);
            Arc::new(InMemoryImage::new(
                data,
                1,
                BASE_SIDE,
                BASE_SIDE,
                PYRAMID_MIN_SIDE,
            )?)
        } else {
            Arc::new(SceneSource::new(scene, self.cfg, self.mnist.clone()))
        })
    }
}

impl Dataset for SceneDataset {
    fn len(&self) -> usize {
        self.len
    }

    fn num_classes(&self) -> usize {
        self.cfg.task.num_classes()
    }

    fn class_names(&self) -> Vec<String> {
        self.cfg.task.class_names()
    }

    fn channels(&self) -> usize {
        1
    }

    fn image_size(&self) -> (usize, usize) {
        (self.cfg.size, self.cfg.size)
    }

    fn proxy_shape(&self) -> (usize, usize) {
        self.proxy.shape()
    }

    fn object_centres(&self, i: usize) -> Option<Vec<[f32; 2]>> {
        Some(self.scene(i).digit_centres())
    }

    fn get(&self, i: usize) -> Result<Sample> {
        ensure!(
            i < self.len,
            "sample {i} out of range: {} has {} samples",
            self.describe(),
            self.len
        );
        let scene = self.scene(i);
        let label = scene.label;
        let image = self.image_of(scene)?;
        Ok(Sample {
            proxy: self.proxy.make(i, image.as_ref())?,
            labels: vec![label],
            image,
        })
    }

    fn describe(&self) -> String {
        format!(
            "{}, {} split, {} samples, seed {}",
            self.cfg.describe(),
            self.split.name(),
            self.len,
            self.seed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mnist::tests::mnist;

    fn dataset(cfg: SceneConfig, split: Split, seed: u64, len: usize) -> SceneDataset {
        SceneDataset::new(cfg, split, seed, len, mnist(mnist_split(split)), 32, 0.0).unwrap()
    }

    fn full(src: &dyn ImageSource, level: usize) -> Vec<f32> {
        let (h, w) = src.level_size(level);
        let mut out = vec![0.0; h * w];
        src.read_region(level, 0, 0, h, w, &mut out).unwrap();
        out
    }

    #[test]
    fn pair_labels_enumerate_unordered_pairs() {
        let names = Task::Pair.class_names();
        assert_eq!(names.len(), 55);
        for a in 0..10u8 {
            for b in 0..10u8 {
                let l = Task::Pair.label(&[a, b]);
                assert_eq!(l, Task::Pair.label(&[b, a]));
                assert_eq!(names[l], format!("{}+{}", a.min(b), a.max(b)));
            }
        }
        assert_eq!(Task::Sum.label(&[9, 8]), 17);
        assert_eq!(Task::Sum.class_names().len(), 19);
    }

    #[test]
    fn labels_match_the_digits_placed() {
        for task in Task::ALL {
            for split in Split::ALL {
                let ds = dataset(SceneConfig::base(task), split, 7, 20);
                let m = mnist(mnist_split(split));
                for i in 0..20 {
                    let s = ds.get(i).unwrap();
                    let scene = ds.scene(i);
                    let labels: Vec<u8> = scene.digits.iter().map(|d| m.labels[d.digit]).collect();
                    assert_eq!(s.label(), task.label(&labels));
                    assert!(s.label() < ds.num_classes());
                    // Each digit is where the scene says: the canvas is at least the digit (sums, clipped).
                    let img = full(s.image.as_ref(), 0);
                    for d in &scene.digits {
                        assert!(
                            ds.pool.contains(&d.digit),
                            "{split:?} digit from outside its pool"
                        );
                        for (p, &v) in m.image(d.digit).iter().enumerate() {
                            let (y, x) = (d.y as usize + p / DIGIT, d.x as usize + p % DIGIT);
                            assert!(img[y * BASE_SIDE + x] >= v as f32 / 255.0 - 1e-6);
                        }
                    }
                    assert!(img.iter().all(|v| (0.0..=1.0).contains(v)));
                    assert_eq!(s.proxy.len(), 32 * 32);
                }
            }
        }
    }

    #[test]
    fn clutter_follows_the_recipe() {
        let ds = dataset(SceneConfig::base(Task::Pair), Split::Train, 3, 4);
        let scene = ds.scene(0);
        let frags = scene.items_in(0..100, 0..100);
        assert_eq!(frags.len(), 2 + FRAGMENTS_PER_CELL);
        for f in &frags[2..] {
            assert_eq!((f.n, f.px), (8, 8));
            assert!(f.y >= 0 && f.y + 8 <= 100 && f.x >= 0 && f.x + 8 <= 100);
        }
        // No clutter for the sum task: the image is exactly the two digits summed.
        let ds = dataset(SceneConfig::base(Task::Sum), Split::Test, 3, 4);
        let scene = ds.scene(1);
        assert_eq!(scene.items_in(0..100, 0..100).len(), 2);
        let img = full(ds.get(1).unwrap().image.as_ref(), 0);
        let m = mnist(MnistSplit::Test);
        let mut want = vec![0.0f32; 100 * 100];
        for d in &scene.digits {
            for (p, &v) in m.image(d.digit).iter().enumerate() {
                want[(d.y as usize + p / 28) * 100 + d.x as usize + p % 28] += v as f32 / 255.0;
            }
        }
        want.iter_mut().for_each(|v| *v = v.min(1.0));
        assert_eq!(img, want);
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let bytes = |seed| {
            let ds = dataset(SceneConfig::base(Task::Pair), Split::Train, seed, 5);
            (0..5)
                .flat_map(|i| {
                    let s = ds.get(i).unwrap();
                    let mut v = full(s.image.as_ref(), 0);
                    v.extend(&s.proxy);
                    v.push(s.label() as f32);
                    v
                })
                .map(f32::to_bits)
                .collect::<Vec<u32>>()
        };
        assert_eq!(bytes(11), bytes(11));
        assert_ne!(bytes(11), bytes(12));
    }

    #[test]
    fn procedural_regions_equal_crops_of_the_full_image() {
        for (mode, size) in [(Mode::Upsampled, 253), (Mode::Native, 517)] {
            let cfg = SceneConfig::large(Task::Pair, size, mode);
            let ds = dataset(cfg, Split::Valid, 5, 3);
            let src = ds.image(2).unwrap();
            assert_eq!(src.levels(), pyramid_sizes(size, size, PYRAMID_MIN_SIDE).len());
            let whole = full(src.as_ref(), 0);
            assert!(whole.iter().any(|&v| v > 0.5), "{mode:?}: nothing drawn");
            // Levels equal an in-memory pyramid of the full image, and crops equal crops of them.
            let mem = InMemoryImage::new(whole, 1, size, size, PYRAMID_MIN_SIDE).unwrap();
            for level in 0..src.levels() {
                assert_eq!(
                    full(src.as_ref(), level),
                    mem.level_data(level),
                    "{mode:?} level {level}"
                );
                let (lh, _) = src.level_size(level);
                for (y0, x0, h, w) in [(3, 5, 17, 9), (-4, lh as i64 - 6, 10, 12)] {
                    let (mut a, mut b) = (vec![0.0; h * w], vec![0.0; h * w]);
                    src.read_region(level, y0, x0, h, w, &mut a).unwrap();
                    mem.read_region(level, y0, x0, h, w, &mut b).unwrap();
                    assert_eq!(a, b, "{mode:?} level {level} region ({y0},{x0})");
                }
            }
        }
    }

    #[test]
    fn native_digits_are_sharp_on_the_canvas_and_blobs_in_the_proxy() {
        let m = mnist(MnistSplit::Train);
        let cfg = SceneConfig::large(Task::Sum, 1024, Mode::Native);
        let ds = dataset(cfg, Split::Train, 9, 2);
        let s = ds.get(0).unwrap();
        let d = ds.scene(0).digits[0];
        assert_eq!(d.px, 64);
        // On the canvas: the MNIST digit resampled to 64 px.
        let mut crop = vec![0.0; 64 * 64];
        s.image.read_region(0, d.y, d.x, 64, 64, &mut crop).unwrap();
        let small = crate::data::proxy::area_resize(&crop, 1, 64, 64, 28, 28);
        let digit: Vec<f32> = m.image(d.digit).iter().map(|&v| v as f32 / 255.0).collect();
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let cos = dot(&small, &digit) / (dot(&small, &small) * dot(&digit, &digit)).sqrt();
        assert!(
            cos > 0.9,
            "native digit does not look like its MNIST digit: cos {cos}"
        );
        // In the 32x32 proxy (32 canvas px per pixel) it is a blob of at most 3x3 pixels, at the right place.
        let (py, px) = ((d.y + 32) as usize / 32, (d.x + 32) as usize / 32);
        assert!(s.proxy[py * 32 + px] > 0.0);
        let lit = s.proxy.iter().filter(|&&v| v > 0.0).count();
        assert!(lit <= 2 * 9, "two digits light {lit} proxy pixels");
    }

    #[test]
    fn bad_configs_are_errors() {
        let m = mnist(MnistSplit::Test);
        assert!(SceneDataset::new(
            SceneConfig::base(Task::Pair),
            Split::Train,
            0,
            1,
            m.clone(),
            32,
            0.0
        )
        .is_err());
        let huge = SceneConfig::large(Task::Pair, MAX_SIZE + 1, Mode::Native);
        assert!(SceneDataset::new(huge, Split::Test, 0, 1, m.clone(), 32, 0.0).is_err());
        let ds = SceneDataset::new(SceneConfig::base(Task::Pair), Split::Test, 0, 1, m, 32, 0.0).unwrap();
        assert!(ds.get(1).is_err());
    }

    /// A coarse read too costly through the finer levels is drawn at the
    /// level's own resolution: close to the exact area downsample, and at a
    /// cost that does not grow with the image (a 24x24 glimpse of a 65536²
    /// image drew 150 M pixels and training showed no progress for minutes).
    #[test]
    fn costly_coarse_reads_draw_the_level_and_match_the_area_downsample() {
        for mode in [Mode::Upsampled, Mode::Native] {
            let ds = dataset(SceneConfig::large(Task::Pair, 16384, mode), Split::Train, 3, 1);
            let img = ds.get(0).unwrap().image;
            // 40x40 at level 7 is 26 M pixels at full resolution.
            let (level, y0, x0, n) = (7, 30, 40, 40);
            assert!((n * n) << (2 * level) > DRAW_COARSE_ABOVE);
            let mut drawn = vec![0.0; n * n];
            let t = std::time::Instant::now();
            img.read_region(level, y0, x0, n, n, &mut drawn).unwrap();
            assert!(t.elapsed().as_secs_f64() < 0.1, "{:?}", t.elapsed());
            let mut exact = vec![0.0; n * n];
            read_via_finer_level(img.as_ref(), level, y0, x0, n, n, &mut exact).unwrap();
            let diffs: Vec<f32> = drawn.iter().zip(&exact).map(|(a, b)| (a - b).abs()).collect();
            let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
            let lit = exact.iter().filter(|&&v| v > 0.1).count();
            assert!(lit > 20, "{mode:?}: the region holds no digit ({lit} lit pixels)");
            assert!(mean < 0.02, "{mode:?}: mean difference {mean}");
        }
    }
}
