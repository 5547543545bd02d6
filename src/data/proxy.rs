//! Proxies: the small picture the saccade model looks at to decide where to
//! crop. The default is the image area-downsampled to J×J (J = 32), optionally
//! with Gaussian noise for the paper's robustness ablation (Fig. 4); a dataset
//! whose proxy is another modality (a game minimap) supplies its own
//! [`ProxyMaker`].

use anyhow::{ensure, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::mix_seed;
use super::source::ImageSource;

pub const DEFAULT_PROXY_SIZE: usize = 32;

/// Makes the proxy of each sample.
pub trait ProxyMaker: Send + Sync {
    /// `(channels, side)` of the proxies it makes.
    fn shape(&self) -> (usize, usize);

    /// The proxy (CHW, `channels * side * side` values) of sample `index`,
    /// whose image is `image`.
    fn make(&self, index: usize, image: &dyn ImageSource) -> Result<Vec<f32>>;
}

/// The image area-downsampled to `size`×`size`, plus optional noise.
pub struct AreaProxy {
    pub channels: usize,
    pub size: usize,
    /// Standard deviation of the additive Gaussian noise (0 = none); the
    /// result is clipped to [0, 1]. Noise is drawn per sample from `seed`,
    /// so a sample's proxy is the same every epoch.
    pub noise: f32,
    pub seed: u64,
}

impl ProxyMaker for AreaProxy {
    fn shape(&self) -> (usize, usize) {
        (self.channels, self.size)
    }

    fn make(&self, index: usize, image: &dyn ImageSource) -> Result<Vec<f32>> {
        ensure!(
            image.channels() == self.channels,
            "proxy: image has {} channels, the proxy expects {}",
            image.channels(),
            self.channels
        );
        // A level with at least 8 pixels per proxy pixel makes the area mean
        // of full resolution up to resampling error, without reading it.
        let (h, w, data) = image.overview(8 * self.size)?;
        let mut out = area_resize(&data, self.channels, h, w, self.size, self.size);
        self.finish(index, &mut out)?;
        Ok(out)
    }
}

impl AreaProxy {
    /// Clip an area downsample to [0, 1] and add sample `index`'s noise:
    /// the last step of every area proxy, however the downsample was made.
    pub fn finish(&self, index: usize, out: &mut [f32]) -> Result<()> {
        // Weights of a non-integer factor sum to 1 only up to rounding (a
        // white 60x80 image gave 1.0000001), and the decoder's Bernoulli
        // loss refuses targets outside [0, 1].
        for v in out.iter_mut() {
            *v = v.clamp(0.0, 1.0);
        }
        if self.noise > 0.0 {
            let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[self.seed, index as u64]));
            let normal = Normal::new(0.0, self.noise)?;
            for v in out.iter_mut() {
                *v = (*v + normal.sample(&mut rng)).clamp(0.0, 1.0);
            }
        }
        Ok(())
    }
}

/// For each output index along an axis of `n` inputs resized to `m`: the
/// inputs it covers and their weights (overlap length / output pixel length).
fn area_weights(n: usize, m: usize) -> Vec<Vec<(usize, f32)>> {
    let step = n as f64 / m as f64;
    (0..m)
        .map(|o| {
            let (lo, hi) = (o as f64 * step, (o + 1) as f64 * step);
            (lo.floor() as usize..(hi.ceil() as usize).min(n))
                .map(|i| (i, area_weight(step, o, i)))
                .filter(|&(_, wt)| wt > 0.0)
                .collect()
        })
        .collect()
}

/// Weight of input `i` in output `o` when each output spans `step` inputs:
/// their overlap over the output's length.
fn area_weight(step: f64, o: usize, i: usize) -> f32 {
    let (lo, hi) = (o as f64 * step, (o + 1) as f64 * step);
    let overlap = (hi.min(i as f64 + 1.0) - lo.max(i as f64)).max(0.0);
    (overlap / step) as f32
}

/// [`area_weights`] seen from input `i`: the outputs it overlaps and its
/// (same) weight in each, for sums over a few inputs of a large axis.
pub(super) fn area_taps(n: usize, m: usize, i: usize) -> impl Iterator<Item = (usize, f32)> {
    let step = n as f64 / m as f64;
    // One output early: the division may round either way.
    let first = ((i as f64 / step) as usize).saturating_sub(1);
    (first..m)
        .take_while(move |&o| (o as f64) * step < i as f64 + 1.0)
        .map(move |o| (o, area_weight(step, o, i)))
        .filter(|&(_, wt)| wt > 0.0)
}

/// Area resampling of a CHW image to `oh`×`ow`: each output pixel is the mean
/// of the input over the rectangle it covers, partial pixels weighted by
/// overlap (OpenCV's INTER_AREA). Shrinking by an integer factor is the mean
/// of each block.
pub fn area_resize(data: &[f32], c: usize, h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let (wy, wx) = (area_weights(h, oh), area_weights(w, ow));
    let mut rows = vec![0.0f32; c * h * ow];
    for (src, dst) in data.chunks(w).zip(rows.chunks_mut(ow)) {
        for (o, taps) in dst.iter_mut().zip(&wx) {
            *o = taps.iter().map(|&(i, wt)| wt * src[i]).sum();
        }
    }
    let mut out = vec![0.0f32; c * oh * ow];
    for ch in 0..c {
        for (i, taps) in wy.iter().enumerate() {
            let dst = &mut out[(ch * oh + i) * ow..(ch * oh + i + 1) * ow];
            for &(y, wt) in taps {
                let src = &rows[(ch * h + y) * ow..(ch * h + y + 1) * ow];
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += wt * s);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::source::{downsample2, InMemoryImage};

    #[test]
    fn area_resize_is_block_mean_and_preserves_mass() {
        let (h, w) = (8, 6);
        let data: Vec<f32> = (0..h * w).map(|i| (i % 7) as f32).collect();
        // Halving is the 2x2 block mean.
        let got = area_resize(&data, 1, h, w, 4, 3);
        let want = downsample2(&data, 1, h, w);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5);
        }
        // A non-integer factor keeps the mean.
        let got = area_resize(&data, 1, h, w, 3, 5);
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        assert!((mean(&got) - mean(&data)).abs() < 1e-4);
        // Identity.
        assert_eq!(area_resize(&data, 1, h, w, h, w), data);
    }

    #[test]
    fn area_taps_are_the_area_weights_by_input() {
        for (n, m) in [(1500, 128), (300, 70), (100, 1024), (24000, 128), (7, 7)] {
            let mut by_input = vec![Vec::new(); n];
            for (o, taps) in area_weights(n, m).into_iter().enumerate() {
                for (i, wt) in taps {
                    by_input[i].push((o, wt));
                }
            }
            for (i, want) in by_input.iter().enumerate() {
                assert_eq!(
                    &area_taps(n, m, i).collect::<Vec<_>>(),
                    want,
                    "{n} -> {m}, input {i}"
                );
            }
        }
    }

    #[test]
    fn noisy_proxy_is_deterministic_and_clipped() {
        let img = InMemoryImage::new(vec![0.5; 64 * 64], 1, 64, 64, 1).unwrap();
        let clean = AreaProxy {
            channels: 1,
            size: 8,
            noise: 0.0,
            seed: 1,
        };
        assert_eq!(clean.make(0, &img).unwrap(), vec![0.5; 64]);
        let noisy = AreaProxy { noise: 0.3, ..clean };
        let a = noisy.make(3, &img).unwrap();
        assert_eq!(a, noisy.make(3, &img).unwrap());
        assert_ne!(a, noisy.make(4, &img).unwrap());
        assert!(a.iter().all(|v| (0.0..=1.0).contains(v)) && a.iter().any(|&v| v != 0.5));
    }

    /// Area weights of a non-integer factor sum to 1 only up to rounding;
    /// the proxy of a white image of any size stays in [0, 1] all the same
    /// (a white 60x80 PNG failed in `predict` with a target of 1.0000001).
    #[test]
    fn proxies_of_white_images_of_any_size_stay_in_unit_range() {
        let proxy = AreaProxy {
            channels: 1,
            size: 32,
            noise: 0.0,
            seed: 0,
        };
        let mut raw_over_one = false;
        for (h, w) in [(60, 80), (80, 60), (37, 91), (100, 77), (250, 33)] {
            let ones = vec![1.0; h * w];
            raw_over_one |= area_resize(&ones, 1, h, w, 32, 32).iter().any(|&v| v > 1.0);
            let img = InMemoryImage::new(ones, 1, h, w, 1).unwrap();
            let p = proxy.make(0, &img).unwrap();
            assert!(p.iter().all(|v| (0.0..=1.0).contains(v)), "{h}x{w}");
        }
        assert!(
            raw_over_one,
            "no size shows the rounding: the test proves nothing"
        );
    }
}
