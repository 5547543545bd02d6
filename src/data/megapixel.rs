//! Megapixel MNIST, the benchmark of attention sampling (Katharopoulos &
//! Fleuret 2019) and IPS (Bergner et al. 2023), after IPS's generator: on a
//! black SIDE² canvas (1500² in the benchmark) 50 noise patterns (two
//! straight lines from a corner, from a bank of 50 per split), then five
//! 28-px MNIST digits, three of a target class and two of other classes, at
//! positions whose boxes do not overlap. Every draw pastes its whole 28×28
//! box, zeros included, over what lies under it. Four tasks per image:
//! `majority` (the target class), `max` (the largest digit), `top` (the
//! digit whose box is highest; ties go to the earlier, majority digits
//! first) and `multi` (the set of classes present).
//!
//! The recipe is the peers' in distribution, not in random stream: scenes
//! come from our per-sample ChaCha8 seeds, as in [`super::cluttered`].
//!
//! A scene is 55 boxes, of which only the ink still visible after the
//! pastes is kept (a few thousand pixels). Every read, at any pyramid level,
//! and the proxy are sums over that ink, so a sample costs the same at any
//! canvas side: a 65536² image is as cheap as a 1500² one.

use std::f64::consts::PI;
use std::ops::Range;
use std::sync::Arc;

use anyhow::{ensure, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::cluttered::{digit_pool, MAX_SIZE};
use super::mnist::{Mnist, PIXELS, SIDE as DIGIT};
use super::proxy::{area_taps, AreaProxy};
use super::source::{pyramid_sizes, ImageSource, PYRAMID_MIN_SIDE};
use super::spec::SplitSizes;
use super::{mix_seed, Dataset, Sample, Split, TaskSpec};

/// The spec name.
pub const NAME: &str = "megapixel-mnist";
/// Canvas side of the benchmark.
pub const DEFAULT_SIDE: usize = 1500;
/// Smallest canvas side: room for five 28-px digits apart and for noise.
pub const MIN_SIDE: usize = 100;
/// Largest canvas side, as for the other generated datasets.
pub const MAX_SIDE: usize = MAX_SIZE;
/// Proxy side unless `proxy=` says otherwise: at 64² digits and noise are
/// hard to tell apart (a locator told where the digits are misses a digit
/// in its top ten cells in half the images), at 128² it finds all five in
/// 89% (EXPERIMENTS.md, "Megapixel MNIST: what a low-resolution proxy can
/// find").
pub const DEFAULT_PROXY: usize = 128;
/// Split sizes unless the user gives them: the peers' 5000 train and 1000
/// test images, and 1000 valid.
pub const DEFAULT_SIZES: SplitSizes = SplitSizes {
    train: 5_000,
    valid: 1_000,
    test: 1_000,
};
/// The tasks, in the order of [`Sample::labels`].
pub const TASKS: [&str; 4] = ["majority", "max", "top", "multi"];

/// Digits of the target class, then of other classes, per image.
const MAJORITY_DIGITS: usize = 3;
const DIGITS: usize = 5;
/// Noise patterns per split (the bank) and noise boxes per image.
const NOISE_PATTERNS: usize = 50;
const NOISE_BOXES: usize = 50;
/// Points sampled along a noise line (the peers' `linspace`).
const LINE_POINTS: usize = 56;
/// Chance of each of the two flips of a pattern's second line.
const FLIP_CHANCE: f64 = 0.33;
/// Digit corners drawn before a placement starts over: rejection can paint
/// itself into a corner on small canvases (four boxes can block a 100²).
const PLACEMENT_TRIES: usize = 1_000;
/// Seed the noise bank and the proxy noise apart from the scenes.
const NOISE_STREAM: u64 = 0x004e_4f49_5345;
const PROXY_STREAM: u64 = 0x5052_4f58;

/// What a box holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sprite {
    /// A pattern of the split's noise bank.
    Noise(usize),
    /// An MNIST digit, by index.
    Digit(usize),
}

/// A 28×28 box pasted with its top-left corner at row `y`, column `x`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placed {
    pub y: usize,
    pub x: usize,
    pub sprite: Sprite,
}

impl Placed {
    fn overlaps(&self, o: &Placed) -> bool {
        self.y.abs_diff(o.y) < DIGIT && self.x.abs_diff(o.x) < DIGIT
    }
}

/// Everything random about one sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scene {
    /// In draw order: the noise boxes, then the digits, majority first.
    pub boxes: Vec<Placed>,
    /// The digits' MNIST labels, in the order of their boxes.
    pub digit_labels: [u8; DIGITS],
}

impl Scene {
    pub fn digits(&self) -> &[Placed] {
        &self.boxes[NOISE_BOXES..]
    }

    /// One label per task of [`TASKS`].
    pub fn labels(&self) -> Vec<usize> {
        let l = self.digit_labels.map(usize::from);
        // The first of the highest boxes: `min_by_key` keeps the first minimum.
        let top = (0..DIGITS).min_by_key(|&k| self.digits()[k].y).unwrap();
        vec![
            l[0],
            *l.iter().max().unwrap(),
            l[top],
            l.iter().fold(0, |m, &d| m | 1 << d),
        ]
    }

    /// The same boxes mirrored left-right (`mirror`, the sprites unmirrored)
    /// and then moved by one offset that keeps every box on the canvas:
    /// every label holds (rows keep their order; the top digit's tie break
    /// is by box order). A training augmentation.
    pub fn moved(&self, side: usize, mirror: bool, rng: &mut ChaCha8Rng) -> Scene {
        let last = side - DIGIT;
        let mut boxes = self.boxes.clone();
        if mirror {
            boxes.iter_mut().for_each(|b| b.x = last - b.x);
        }
        let offset = |rng: &mut ChaCha8Rng, at: &dyn Fn(&Placed) -> usize| {
            let lo = boxes.iter().map(at).min().unwrap() as i64;
            let hi = boxes.iter().map(at).max().unwrap() as i64;
            rng.random_range(-lo..=last as i64 - hi)
        };
        let (dy, dx) = (offset(rng, &|b| b.y), offset(rng, &|b| b.x));
        for b in &mut boxes {
            b.y = (b.y as i64 + dy) as usize;
            b.x = (b.x as i64 + dx) as usize;
        }
        Scene {
            boxes,
            digit_labels: self.digit_labels,
        }
    }

    /// The digits' centres `[x, y]` in normalized coordinates (`[-1, 1]`).
    pub fn digit_centres(&self, side: usize) -> Vec<[f32; 2]> {
        let c = |o: usize| (2 * o + DIGIT) as f32 / side as f32 - 1.0;
        self.digits().iter().map(|d| [c(d.x), c(d.y)]).collect()
    }
}

/// The noise patterns of a split: 28×28 bytes, as the peers' uint8 canvas
/// holds them.
pub type NoiseBank = Vec<[u8; PIXELS]>;

/// The pixels of a line from pixel (0, 0) with slope `a`: rows `round(x)`,
/// columns `round(a x)` for `x` over `LINE_POINTS` points up to where the
/// line leaves the box (numpy rounds halves to even).
fn line(a: f64) -> [bool; PIXELS] {
    let end = 27.49f64.min(27.49 / a);
    let mut lit = [false; PIXELS];
    for k in 0..LINE_POINTS {
        let x = end * k as f64 / (LINE_POINTS - 1) as f64;
        let (r, c) = (x.round_ties_even() as usize, (a * x).round_ties_even() as usize);
        lit[r * DIGIT + c] = true;
    }
    lit
}

/// The bank of noise patterns of one (seed, split): each the union of a
/// line at an angle uniform in 0..72° and another pattern's line (a shuffled
/// copy), the latter mirrored left-right with chance 0.33 twice over (the
/// peers meant one flip per axis but both mirror columns, so two cancel);
/// each lit pixel `floor(255 v)`, `v` uniform in [0.8, 1).
pub fn noise_bank(seed: u64, split: Split) -> NoiseBank {
    let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[seed, split as u64, NOISE_STREAM]));
    let lines: Vec<[bool; PIXELS]> = (0..NOISE_PATTERNS)
        .map(|_| line((rng.random::<f64>() * PI / 2.5).tan()))
        .collect();
    let mut partner: Vec<usize> = (0..NOISE_PATTERNS).collect();
    partner.shuffle(&mut rng);
    partner
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let mirror = rng.random_bool(FLIP_CHANCE) != rng.random_bool(FLIP_CHANCE);
            let mut out = [0u8; PIXELS];
            for (q, o) in out.iter_mut().enumerate() {
                let (r, c) = (q / DIGIT, q % DIGIT);
                let c2 = if mirror { DIGIT - 1 - c } else { c };
                if lines[i][q] || lines[p][r * DIGIT + c2] {
                    // The peers' float32 intensity, truncated by their uint8 canvas.
                    let v = (0.8 + 0.2 * rng.random::<f64>()) as f32;
                    *o = (255.0 * v).floor() as u8;
                }
            }
            out
        })
        .collect()
}

/// A box's ink left visible by the later pastes: `(row, column)` within the
/// box and value, zeros left out.
struct Visible {
    y: usize,
    x: usize,
    ink: Vec<(u8, u8, f32)>,
}

/// A generated image: the visible ink of its boxes, read at any level as
/// the area downsample of the pasted canvas.
pub struct MegapixelImage {
    side: usize,
    sizes: Vec<(usize, usize)>,
    visible: Vec<Visible>,
}

impl MegapixelImage {
    /// The image of `scene` on a `side`² canvas; `pixels` gives a sprite's bytes.
    pub fn new<'a>(scene: &Scene, side: usize, pixels: impl Fn(Sprite) -> &'a [u8]) -> MegapixelImage {
        let boxes = &scene.boxes;
        let visible = boxes
            .iter()
            .enumerate()
            .map(|(k, b)| {
                let later: Vec<&Placed> = boxes[k + 1..].iter().filter(|l| l.overlaps(b)).collect();
                let covered = |y: usize, x: usize| {
                    later
                        .iter()
                        .any(|l| (l.y..l.y + DIGIT).contains(&y) && (l.x..l.x + DIGIT).contains(&x))
                };
                let ink = pixels(b.sprite)
                    .iter()
                    .enumerate()
                    .filter(|&(q, &v)| v > 0 && !covered(b.y + q / DIGIT, b.x + q % DIGIT))
                    .map(|(q, &v)| ((q / DIGIT) as u8, (q % DIGIT) as u8, v as f32 / 255.0))
                    .collect();
                Visible { y: b.y, x: b.x, ink }
            })
            .collect();
        MegapixelImage {
            side,
            sizes: pyramid_sizes(side, side, PYRAMID_MIN_SIDE),
            visible,
        }
    }

    /// Every visible canvas pixel `(row, column, value)`.
    fn ink(&self) -> impl Iterator<Item = (usize, usize, f32)> + '_ {
        self.visible.iter().flat_map(|b| {
            b.ink
                .iter()
                .map(move |&(r, c, v)| (b.y + r as usize, b.x + c as usize, v))
        })
    }

    /// Weight of canvas row (or column) `i` in its pixel of `level`: the
    /// pyramid averages the (up to) two pixels under each, level by level.
    fn weight(&self, level: usize, i: usize) -> f32 {
        (0..level)
            .map(|k| 1.0 / (self.sizes[k].0 - 2 * (i >> (k + 1))).min(2) as f32)
            .product()
    }
}

impl ImageSource for MegapixelImage {
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
            level < self.sizes.len(),
            "level {level} out of range ({} levels)",
            self.sizes.len()
        );
        ensure!(
            out.len() == h * w,
            "megapixel read_region: output buffer holds {} values, {h}x{w} needs {}",
            out.len(),
            h * w
        );
        out.fill(0.0);
        // The canvas rows (columns) under the window.
        let span = |o: i64, n: usize| -> Range<usize> {
            let canvas = |v: i64| ((v.max(0) as usize) << level).min(self.side);
            canvas(o)..canvas(o + n as i64)
        };
        let (ys, xs) = (span(y0, h), span(x0, w));
        for b in &self.visible {
            if b.y >= ys.end || b.y + DIGIT <= ys.start || b.x >= xs.end || b.x + DIGIT <= xs.start {
                continue;
            }
            for &(r, c, v) in &b.ink {
                let (y, x) = (b.y + r as usize, b.x + c as usize);
                if ys.contains(&y) && xs.contains(&x) {
                    let (i, j) = ((y >> level) - (y0 as usize), (x >> level) - (x0 as usize));
                    // Level 0: the value itself (weights 1), as pasted.
                    out[i * w + j] += self.weight(level, y) * self.weight(level, x) * v;
                }
            }
        }
        Ok(())
    }
}

/// The proxy: the area downsample [`AreaProxy`] makes of the full canvas
/// (same weights, clipping and noise, so a generated image and the same
/// image imported from a PNG get the same proxy), summed over the visible
/// ink alone instead of over SIDE² pixels.
/// The weights come from the coordinates, not from a table per canvas
/// row: a table for a 24000² canvas falls out of cache between images and
/// made the proxy 4x dearer than at 1500².
struct InkProxy {
    area: AreaProxy,
}

impl InkProxy {
    fn make(&self, index: usize, image: &MegapixelImage) -> Result<Vec<f32>> {
        let (n, j) = (image.side, self.area.size);
        let mut out = vec![0.0f32; j * j];
        for (y, x, v) in image.ink() {
            for (oy, wy) in area_taps(n, j, y) {
                let row = &mut out[oy * j..(oy + 1) * j];
                for (ox, wx) in area_taps(n, j, x) {
                    row[ox] += wy * (wx * v);
                }
            }
        }
        self.area.finish(index, &mut out)?;
        Ok(out)
    }
}

/// One split of megapixel MNIST on a `side`² canvas.
pub struct MegapixelDataset {
    side: usize,
    split: Split,
    seed: u64,
    len: usize,
    mnist: Arc<Mnist>,
    /// The split's MNIST indices.
    pool: Range<usize>,
    /// Those of each class.
    by_class: Vec<Vec<usize>>,
    bank: NoiseBank,
    proxy: InkProxy,
}

impl MegapixelDataset {
    /// `mnist` must be [`super::cluttered::mnist_split`]`(split)`; digits
    /// come from its [`digit_pool`], so train and valid share none.
    /// Proxies are `proxy_size`² area downsamples with `noise`.
    pub fn new(
        side: usize,
        split: Split,
        seed: u64,
        len: usize,
        mnist: Arc<Mnist>,
        proxy_size: usize,
        noise: f32,
    ) -> Result<MegapixelDataset> {
        ensure!(
            (MIN_SIDE..=MAX_SIDE).contains(&side),
            "image size {side} is out of range: {MIN_SIDE}..={MAX_SIDE}"
        );
        ensure!(proxy_size >= 1, "proxy size must be at least 1");
        let pool = digit_pool(split, mnist.len())?;
        let mut by_class = vec![Vec::new(); 10];
        for i in pool.clone() {
            by_class[mnist.labels[i] as usize].push(i);
        }
        ensure!(
            by_class.iter().all(|c| !c.is_empty()),
            "{} split: the MNIST digits lack a class",
            split.name()
        );
        let area = AreaProxy {
            channels: 1,
            size: proxy_size,
            noise,
            seed: mix_seed(&[seed, split as u64, PROXY_STREAM]),
        };
        Ok(MegapixelDataset {
            side,
            split,
            seed,
            len,
            mnist,
            pool,
            by_class,
            bank: noise_bank(seed, split),
            proxy: InkProxy { area },
        })
    }

    /// The layout of sample `i`, from its own seed.
    pub fn scene(&self, i: usize) -> Scene {
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[self.seed, self.split as u64, i as u64]));
        let target = rng.random_range(0..10);
        let pick = |rng: &mut ChaCha8Rng, class: usize| {
            let c = &self.by_class[class];
            c[rng.random_range(0..c.len())]
        };
        let digits: Vec<usize> = (0..DIGITS)
            .map(|k| {
                if k < MAJORITY_DIGITS {
                    pick(&mut rng, target)
                } else {
                    // Uniform over the other classes' digits: redraw the target's.
                    loop {
                        let d = rng.random_range(self.pool.clone());
                        if self.mnist.labels[d] as usize != target {
                            break d;
                        }
                    }
                }
            })
            .collect();
        let corners = self.digit_corners(&mut rng);
        let noise_corner = |rng: &mut ChaCha8Rng| rng.random_range(DIGIT..self.side - DIGIT);
        let mut boxes: Vec<Placed> = (0..NOISE_BOXES)
            .map(|_| Placed {
                y: noise_corner(&mut rng),
                x: noise_corner(&mut rng),
                sprite: Sprite::Noise(rng.random_range(0..NOISE_PATTERNS)),
            })
            .collect();
        boxes.extend(digits.iter().zip(corners).map(|(&d, (y, x))| Placed {
            y,
            x,
            sprite: Sprite::Digit(d),
        }));
        Scene {
            boxes,
            digit_labels: std::array::from_fn(|k| self.mnist.labels[digits[k]]),
        }
    }

    /// Five digit corners uniform over the canvas, each redrawn while its
    /// box overlaps an earlier one.
    fn digit_corners(&self, rng: &mut ChaCha8Rng) -> Vec<(usize, usize)> {
        loop {
            let mut corners: Vec<(usize, usize)> = Vec::with_capacity(DIGITS);
            for _ in 0..PLACEMENT_TRIES {
                let (y, x) = (
                    rng.random_range(0..=self.side - DIGIT),
                    rng.random_range(0..=self.side - DIGIT),
                );
                if corners
                    .iter()
                    .all(|&(cy, cx)| cy.abs_diff(y) >= DIGIT || cx.abs_diff(x) >= DIGIT)
                {
                    corners.push((y, x));
                    if corners.len() == DIGITS {
                        return corners;
                    }
                }
            }
            // Start over: the boxes so far leave no room for the rest.
        }
    }

    /// The bytes of a sprite.
    pub fn pixels(&self, sprite: Sprite) -> &[u8] {
        match sprite {
            Sprite::Noise(p) => &self.bank[p],
            Sprite::Digit(d) => self.mnist.image(d),
        }
    }

    /// Sample `i` drawn as `scene`.
    fn sample(&self, i: usize, scene: &Scene) -> Result<Sample> {
        ensure!(
            i < self.len,
            "sample {i} out of range: {} has {} samples",
            self.describe(),
            self.len
        );
        let image = self.image_of(scene);
        Ok(Sample {
            proxy: self.proxy.make(i, &image)?,
            labels: scene.labels(),
            image: Arc::new(image),
        })
    }

    /// The image of `scene`.
    pub fn image_of(&self, scene: &Scene) -> MegapixelImage {
        MegapixelImage::new(scene, self.side, |s| self.pixels(s))
    }
}

impl Dataset for MegapixelDataset {
    fn len(&self) -> usize {
        self.len
    }

    fn num_classes(&self) -> usize {
        10
    }

    fn class_names(&self) -> Vec<String> {
        (0..10).map(|d| d.to_string()).collect()
    }

    fn tasks(&self) -> Vec<TaskSpec> {
        TASKS
            .iter()
            .map(|&name| TaskSpec {
                multi_label: name == "multi",
                ..TaskSpec::single(name, self.class_names())
            })
            .collect()
    }

    fn channels(&self) -> usize {
        1
    }

    fn image_size(&self) -> (usize, usize) {
        (self.side, self.side)
    }

    fn proxy_shape(&self) -> (usize, usize) {
        (1, self.proxy.area.size)
    }

    fn get(&self, i: usize) -> Result<Sample> {
        self.sample(i, &self.scene(i))
    }

    /// Sample `i` mirrored left-right or not and moved ([`Scene::moved`]).
    fn get_varied(&self, i: usize, draw: u64) -> Result<Sample> {
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[self.seed, self.split as u64, i as u64, draw]));
        let mirror = rng.random_bool(0.5);
        let scene = self.scene(i).moved(self.side, mirror, &mut rng);
        self.sample(i, &scene)
    }

    fn varies(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!(
            "{NAME} {0}x{0} (5 digits, {NOISE_BOXES} noise patterns), {1} split, {2} samples, seed {3}",
            self.side,
            self.split.name(),
            self.len,
            self.seed
        )
    }

    fn object_centres(&self, i: usize) -> Option<Vec<[f32; 2]>> {
        Some(self.scene(i).digit_centres(self.side))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::data::cluttered::mnist_split;
    use crate::data::mnist::tests::mnist;
    use crate::data::proxy::area_resize;
    use crate::data::source::InMemoryImage;

    fn dataset(side: usize, split: Split, len: usize, proxy: usize) -> MegapixelDataset {
        MegapixelDataset::new(side, split, 3, len, mnist(mnist_split(split)), proxy, 0.0).unwrap()
    }

    /// The plain renderer: every box pasted whole, in order, on a black canvas.
    fn paste_render(ds: &MegapixelDataset, scene: &Scene) -> Vec<f32> {
        let side = ds.side;
        let mut canvas = vec![0.0f32; side * side];
        for b in &scene.boxes {
            for (q, &v) in ds.pixels(b.sprite).iter().enumerate() {
                canvas[(b.y + q / DIGIT) * side + b.x + q % DIGIT] = v as f32 / 255.0;
            }
        }
        canvas
    }

    fn read(src: &dyn ImageSource, level: usize, y0: i64, x0: i64, h: usize, w: usize) -> Vec<f32> {
        let mut out = vec![9.0; h * w];
        src.read_region(level, y0, x0, h, w, &mut out).unwrap();
        out
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn reads_and_proxies_equal_those_of_the_pasted_canvas() {
        for (side, proxy) in [(1500, 128), (300, 128), (300, 70)] {
            let ds = dataset(side, Split::Test, 4, proxy);
            for i in 0..4 {
                let scene = ds.scene(i);
                let want = paste_render(&ds, &scene);
                let s = ds.get(i).unwrap();
                let img = s.image.as_ref();
                assert_eq!(read(img, 0, 0, 0, side, side), want, "{side}² image {i}");
                // The noise shows: some pixels hold noise values, as pasted.
                assert!(want
                    .iter()
                    .any(|&v| (0.79..0.999).contains(&v) && v * 255.0 >= 204.0));
                let d = scene.digits()[1];
                let (y, x) = (d.y as i64 - 5, d.x as i64 + 3);
                let crop = read(img, 0, y, x, 40, 33);
                for (k, &v) in crop.iter().enumerate() {
                    let (r, c) = (y + (k / 33) as i64, x + (k % 33) as i64);
                    let inside = (0..side as i64).contains(&r) && (0..side as i64).contains(&c);
                    let w = if inside {
                        want[r as usize * side + c as usize]
                    } else {
                        0.0
                    };
                    assert_eq!(v, w, "{side}² image {i} pixel ({r},{c})");
                }
                let mut area = area_resize(&want, 1, side, side, proxy, proxy);
                area.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
                assert!(
                    max_diff(&s.proxy, &area) < 1e-5,
                    "{side}² proxy {proxy} of image {i}"
                );
                if i == 0 {
                    let mem = InMemoryImage::new(want, 1, side, side, PYRAMID_MIN_SIDE).unwrap();
                    assert_eq!(img.levels(), mem.levels());
                    for level in 1..img.levels() {
                        let (h, w) = img.level_size(level);
                        let whole = read(img, level, 0, 0, h, w);
                        assert!(
                            max_diff(&whole, mem.level_data(level)) < 1e-5,
                            "{side}² level {level}"
                        );
                        let (y0, x0) = ((d.y >> level) as i64 - 2, (d.x >> level) as i64 - 1);
                        let mut want = vec![0.0; 6 * 7];
                        mem.read_region(level, y0, x0, 6, 7, &mut want).unwrap();
                        assert!(max_diff(&read(img, level, y0, x0, 6, 7), &want) < 1e-5);
                    }
                }
            }
        }
    }

    #[test]
    fn scenes_and_labels_follow_the_recipe() {
        let train = dataset(400, Split::Train, 200, 32);
        let valid = dataset(400, Split::Valid, 200, 32);
        let test = dataset(100, Split::Test, 200, 32);
        let mut top_ties = 0;
        for ds in [&train, &valid, &test] {
            let tasks = ds.tasks();
            assert_eq!(tasks.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), TASKS);
            assert_eq!(
                tasks.iter().map(|t| t.multi_label).collect::<Vec<_>>(),
                [false, false, false, true]
            );
            assert!(tasks.iter().all(|t| t.class_names == ds.class_names()));
            for i in 0..ds.len() {
                let scene = ds.scene(i);
                let (noise, digits) = scene.boxes.split_at(NOISE_BOXES);
                assert_eq!(digits.len(), DIGITS);
                for b in noise {
                    assert!(
                        (DIGIT..ds.side - DIGIT).contains(&b.y) && (DIGIT..ds.side - DIGIT).contains(&b.x)
                    );
                    assert!(matches!(b.sprite, Sprite::Noise(p) if p < NOISE_PATTERNS));
                }
                let mut labels = [0u8; DIGITS];
                for (k, d) in digits.iter().enumerate() {
                    assert!(d.y + DIGIT <= ds.side && d.x + DIGIT <= ds.side);
                    assert!(digits[..k].iter().all(|e| !e.overlaps(d)), "digit boxes overlap");
                    let Sprite::Digit(m) = d.sprite else {
                        panic!("a digit box holds noise")
                    };
                    assert!(ds.pool.contains(&m));
                    labels[k] = ds.mnist.labels[m];
                }
                assert_eq!(labels, scene.digit_labels);
                let t = labels[0];
                assert!(labels[..3].iter().all(|&l| l == t) && labels[3..].iter().all(|&l| l != t));
                let s = ds.get(i).unwrap();
                let highest = digits.iter().map(|d| d.y).min().unwrap();
                let first_top = digits.iter().position(|d| d.y == highest).unwrap();
                top_ties += (digits.iter().filter(|d| d.y == highest).count() > 1) as usize;
                let multi = labels.iter().fold(0usize, |m, &l| m | 1 << l);
                let want = [
                    t as usize,
                    *labels.iter().max().unwrap() as usize,
                    labels[first_top] as usize,
                    multi,
                ];
                assert_eq!(s.labels, want);
                assert_eq!(
                    tasks[3].classes_of(s.labels[3]).len(),
                    multi.count_ones() as usize
                );
                let centres = ds.object_centres(i).unwrap();
                let c = |o: usize| (o as f32 + 14.0) / ds.side as f32 * 2.0 - 1.0;
                assert_eq!(centres[4], [c(digits[4].x), c(digits[4].y)]);
            }
        }
        // On a 100² canvas rows collide often: the tie rule was exercised.
        assert!(top_ties > 0);
        // Train and valid draw from disjoint MNIST digits.
        assert!(train.pool.end <= valid.pool.start);
    }

    #[test]
    fn varied_samples_keep_their_labels_and_layout_on_the_canvas() {
        let side = 200;
        let ds = dataset(side, Split::Train, 30, 16);
        let (mut moved, mut mirrored) = (0, 0);
        for i in 0..30 {
            let scene = ds.scene(i);
            let s = ds.get_varied(i, 7).unwrap();
            assert_eq!(s.labels, scene.labels());
            assert_ne!(
                s.proxy,
                ds.get_varied(i, 8).unwrap().proxy,
                "sample {i}: draws 7 and 8 alike"
            );
            for mirror in [false, true] {
                let m = scene.moved(side, mirror, &mut ChaCha8Rng::seed_from_u64(i as u64));
                assert_eq!(m.labels(), scene.labels());
                assert!(m.boxes.iter().all(|b| b.y <= side - DIGIT && b.x <= side - DIGIT));
                let sign = if mirror { -1 } else { 1 };
                let d = |p: &Placed, q: &Placed, sign: i64| {
                    (p.y as i64 - q.y as i64, sign * (p.x as i64 - q.x as i64))
                };
                for (a, b) in scene.boxes.iter().zip(&m.boxes).skip(1) {
                    assert_eq!(
                        d(a, &scene.boxes[0], 1),
                        d(b, &m.boxes[0], sign),
                        "the layout changed"
                    );
                    assert_eq!(a.sprite, b.sprite);
                }
                moved += (m.boxes[0].y != scene.boxes[0].y) as usize;
                mirrored += mirror as usize;
            }
        }
        assert!(moved > 30 && mirrored == 30);
        assert!(ds.varies());
    }

    #[test]
    fn the_noise_bank_is_line_pairs_fixed_per_seed_and_split() {
        let bank = noise_bank(3, Split::Train);
        assert_eq!(bank.len(), NOISE_PATTERNS);
        for p in &bank {
            let lit: Vec<u8> = p.iter().copied().filter(|&v| v > 0).collect();
            // Two lines of 28-56 pixels each, one from each top corner or both from (0, 0).
            assert!((28..=112).contains(&lit.len()), "{} lit pixels", lit.len());
            assert!(lit.iter().all(|&v| v >= 204), "noise intensity below 0.8");
            assert!(p[0] > 0 || p[DIGIT - 1] > 0);
        }
        // Some second lines are mirrored: lit in the top-right corner.
        assert!(bank.iter().any(|p| p[DIGIT - 1] > 0));
        assert_eq!(bank, noise_bank(3, Split::Train));
        assert_ne!(bank, noise_bank(3, Split::Test));
        assert_ne!(bank, noise_bank(4, Split::Train));
        // A flat line runs down column 0; a steep one reaches column 27 by row 9.
        assert!(line(0.0).iter().enumerate().all(|(q, &l)| l == (q % DIGIT == 0)));
        let steep = line((0.999 * PI / 2.5).tan());
        assert!(steep[9 * DIGIT + 27] || steep[8 * DIGIT + 27]);
    }

    #[test]
    fn same_seed_same_sample() {
        let bytes = |ds: &MegapixelDataset| {
            let s = ds.get(2).unwrap();
            let mut v = read(s.image.as_ref(), 3, 0, 0, 40, 40);
            v.extend(&s.proxy);
            v
        };
        let a = dataset(600, Split::Valid, 3, 32);
        assert_eq!(bytes(&a), bytes(&dataset(600, Split::Valid, 3, 32)));
        let other = MegapixelDataset::new(600, Split::Valid, 4, 3, mnist(mnist_split(Split::Valid)), 32, 0.0)
            .unwrap();
        assert_ne!(bytes(&a), bytes(&other));
        assert!(a.get(3).is_err());
        assert!(
            MegapixelDataset::new(99, Split::Test, 0, 1, mnist(mnist_split(Split::Test)), 32, 0.0).is_err()
        );
    }

    /// What an evaluation pays per image (the sample, its proxy, ten 64²
    /// glimpses at full resolution) stays flat from 1500² to 24000². Sides
    /// take turns and each keeps its best round, so a busy machine slows
    /// them alike.
    #[test]
    fn megapixel_cost_does_not_grow_with_the_side() {
        let sides = [1500, 6000, 24000];
        let sets: Vec<MegapixelDataset> = sides
            .iter()
            .map(|&side| dataset(side, Split::Test, 24, DEFAULT_PROXY))
            .collect();
        let mut best = [f64::MAX; 3];
        for _ in 0..5 {
            for (ds, best) in sets.iter().zip(&mut best) {
                let t = Instant::now();
                for i in 0..ds.len() {
                    let s = ds.get(i).unwrap();
                    for (k, d) in ds.scene(i).digits().iter().cycle().take(10).enumerate() {
                        let crop = read(s.image.as_ref(), 0, d.y as i64 - k as i64, d.x as i64, 64, 64);
                        assert!(crop.iter().any(|&v| v > 0.0));
                    }
                }
                *best = best.min(t.elapsed().as_secs_f64() / ds.len() as f64);
            }
        }
        for (side, t) in sides.iter().zip(best).skip(1) {
            assert!(
                t < 2.0 * best[0],
                "{side}²: {:.3} ms per image, 1500²: {:.3} ms",
                t * 1e3,
                best[0] * 1e3
            );
        }
    }
}
