//! Images as [`ImageSource`]s (the trait lives with its reader, the
//! localized crop in `ops::sampler`): in memory, with a pyramid built by
//! [`downsample2`], and the helpers other sources share.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{ensure, Result};

pub use crate::ops::sampler::ImageSource;

/// Read a region of `level >= 1` by reading the region of `level - 1` it
/// covers and area-downsampling it; the result equals that region of a
/// pyramid built from the whole image, for sources that only render level 0.
#[allow(clippy::too_many_arguments)]
pub fn read_via_finer_level(
    src: &dyn ImageSource,
    level: usize,
    y0: i64,
    x0: i64,
    h: usize,
    w: usize,
    out: &mut [f32],
) -> Result<()> {
    ensure!(
        level >= 1 && level < src.levels(),
        "read_via_finer_level: level {level} is not in 1..{}",
        src.levels()
    );
    let c = src.channels();
    let mut fine = vec![0.0; c * 4 * h * w];
    src.read_region(level - 1, 2 * y0, 2 * x0, 2 * h, 2 * w, &mut fine)?;
    let down = downsample2_window(
        &fine,
        c,
        src.level_size(level - 1),
        (2 * h, 2 * w),
        (y0, x0),
        (h, w),
    );
    out.copy_from_slice(&down);
    Ok(())
}

/// Size of the next pyramid level.
pub fn half_size(h: usize, w: usize) -> (usize, usize) {
    (h.div_ceil(2).max(1), w.div_ceil(2).max(1))
}

/// Pyramids stop at the first level whose longer side is at most this: the
/// size of a default proxy.
pub const PYRAMID_MIN_SIDE: usize = 32;

/// Sizes of the pyramid levels of an `h`×`w` image: halved (ceil) until
/// the longer side is at most `min_side`.
pub fn pyramid_sizes(h: usize, w: usize, min_side: usize) -> Vec<(usize, usize)> {
    let mut sizes = vec![(h, w)];
    let mut cur = (h, w);
    while cur.0.max(cur.1) > min_side.max(1) {
        cur = half_size(cur.0, cur.1);
        sizes.push(cur);
    }
    sizes
}

/// Area downsampling by 2: each output pixel is the mean of the (up to) 2×2
/// input pixels it covers; at an odd edge only the existing ones count.
pub fn downsample2(data: &[f32], c: usize, h: usize, w: usize) -> Vec<f32> {
    downsample2_window(data, c, (h, w), (h, w), (0, 0), half_size(h, w))
}

/// [`downsample2`] of a window: `src` (CHW, `win` = rows × columns) holds
/// the pixels of a level of size `fine` from row `2 * y0`, column `2 * x0`
/// on, covering every existing pixel of the 2×2 blocks under rows
/// `y0..y0+h`, columns `x0..x0+w` of the next level, which are returned (0
/// outside that level). Pixels are summed in the same order as a whole-image
/// `downsample2`, so a window's result equals the same crop of it exactly.
pub fn downsample2_window(
    src: &[f32],
    c: usize,
    (fh, fw): (usize, usize),
    (sh, sw): (usize, usize),
    (y0, x0): (i64, i64),
    (h, w): (usize, usize),
) -> Vec<f32> {
    let (h2, w2) = half_size(fh, fw);
    let mut out = vec![0.0; c * h * w];
    // Output columns inside the next level: (index in out, first fine column in the window, 1 or 2 columns).
    let cols: Vec<(usize, usize, usize)> = (0..w)
        .filter_map(|j| {
            let x = x0 + j as i64;
            (x >= 0 && x < w2 as i64).then(|| (j, (2 * (x - x0)) as usize, (fw - 2 * x as usize).min(2)))
        })
        .collect();
    for ch in 0..c {
        let s = &src[ch * sh * sw..(ch + 1) * sh * sw];
        for i in 0..h {
            let y = y0 + i as i64;
            if y < 0 || y >= h2 as i64 {
                continue;
            }
            let ny = (fh - 2 * y as usize).min(2);
            let r0 = &s[(2 * (y - y0)) as usize * sw..];
            let r1 = &s[((2 * (y - y0)) as usize + ny - 1) * sw..];
            let o = &mut out[(ch * h + i) * w..(ch * h + i + 1) * w];
            // Summed row by row, left to right, as the plain 2x2 loop would.
            for &(j, fx, nx) in &cols {
                let mut sum = r0[fx];
                if nx == 2 {
                    sum += r0[fx + 1];
                }
                if ny == 2 {
                    sum += r1[fx];
                    if nx == 2 {
                        sum += r1[fx + 1];
                    }
                }
                o[j] = sum / (ny * nx) as f32;
            }
        }
    }
    out
}

/// Copy a window of a CHW image, zero outside it.
#[allow(clippy::too_many_arguments)]
pub fn copy_region(
    src: &[f32],
    c: usize,
    sh: usize,
    sw: usize,
    y0: i64,
    x0: i64,
    h: usize,
    w: usize,
    out: &mut [f32],
) {
    for ch in 0..c {
        for i in 0..h {
            let y = y0 + i as i64;
            let row = &mut out[(ch * h + i) * w..(ch * h + i + 1) * w];
            if y < 0 || y >= sh as i64 {
                row.fill(0.0);
                continue;
            }
            for (j, o) in row.iter_mut().enumerate() {
                let x = x0 + j as i64;
                *o = if x < 0 || x >= sw as i64 {
                    0.0
                } else {
                    src[(ch * sh + y as usize) * sw + x as usize]
                };
            }
        }
    }
}

/// A whole image held in memory with its pyramid.
pub struct InMemoryImage {
    channels: usize,
    /// (height, width, CHW data) per level.
    levels: Vec<(usize, usize, Vec<f32>)>,
    bytes_read: AtomicU64,
}

impl InMemoryImage {
    /// `data` is CHW; pyramid levels are built down to `min_side` pixels.
    pub fn new(data: Vec<f32>, channels: usize, h: usize, w: usize, min_side: usize) -> Result<Self> {
        ensure!(
            data.len() == channels * h * w && h > 0 && w > 0,
            "in-memory image: {} values do not make {channels}x{h}x{w}",
            data.len()
        );
        let sizes = pyramid_sizes(h, w, min_side);
        let mut levels = vec![(h, w, data)];
        for &(h2, w2) in &sizes[1..] {
            let (h, w, d) = levels.last().unwrap();
            let d2 = downsample2(d, channels, *h, *w);
            levels.push((h2, w2, d2));
        }
        Ok(InMemoryImage {
            channels,
            levels,
            bytes_read: AtomicU64::new(0),
        })
    }

    /// The CHW pixels of a level.
    pub fn level_data(&self, level: usize) -> &[f32] {
        &self.levels[level].2
    }
}

impl ImageSource for InMemoryImage {
    fn channels(&self) -> usize {
        self.channels
    }

    fn levels(&self) -> usize {
        self.levels.len()
    }

    fn level_size(&self, level: usize) -> (usize, usize) {
        (self.levels[level].0, self.levels[level].1)
    }

    fn read_region(&self, level: usize, y0: i64, x0: i64, h: usize, w: usize, out: &mut [f32]) -> Result<()> {
        ensure!(
            level < self.levels.len(),
            "level {level} out of range ({} levels)",
            self.levels.len()
        );
        ensure!(
            out.len() == self.channels * h * w,
            "read_region: output buffer has the wrong size"
        );
        let (sh, sw, d) = &self.levels[level];
        copy_region(d, self.channels, *sh, *sw, y0, x0, h, w, out);
        let inside = |a: i64, n: usize, len: usize| (a + n as i64).min(len as i64) - a.max(0);
        let pixels = inside(y0, h, *sh).max(0) * inside(x0, w, *sw).max(0);
        self.bytes_read
            .fetch_add(4 * (self.channels as i64 * pixels) as u64, Ordering::Relaxed);
        Ok(())
    }

    fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::sampler::choose_level;

    #[test]
    fn pyramid_and_regions() {
        let (h, w) = (5, 6);
        let data: Vec<f32> = (0..h * w).map(|i| i as f32).collect();
        let img = InMemoryImage::new(data.clone(), 1, h, w, 1).unwrap();
        assert_eq!(img.levels(), 4); // 5x6, 3x3, 2x2, 1x1
        assert_eq!(img.level_size(1), (3, 3));
        // Level-1 corner pixel = mean of the top-left 2x2 block; bottom edge has one row.
        assert_eq!(img.level_data(1)[0], (0.0 + 1.0 + 6.0 + 7.0) / 4.0);
        assert_eq!(img.level_data(1)[6], (24.0 + 25.0) / 2.0);
        let mut out = vec![9.0; 3 * 3];
        img.read_region(0, -1, 4, 3, 3, &mut out).unwrap();
        assert_eq!(out, vec![0.0, 0.0, 0.0, 4.0, 5.0, 0.0, 10.0, 11.0, 0.0]);
        assert!(img.read_region(9, 0, 0, 1, 1, &mut [0.0]).is_err());
        assert_eq!(img.bytes_read(), 4 * 4); // 2x2 of the 3x3 window lay inside
    }

    #[test]
    fn downsampled_windows_equal_crops_of_the_pyramid() {
        let (c, h, w) = (2, 13, 10);
        let data: Vec<f32> = (0..c * h * w).map(|i| ((i * 37) % 101) as f32 / 100.0).collect();
        let img = InMemoryImage::new(data, c, h, w, 1).unwrap();
        for level in 1..img.levels() {
            let (lh, lw) = img.level_size(level);
            for (y0, x0, rh, rw) in [(0, 0, lh, lw), (-1, 1, 3, 2), (lh as i64 - 1, -2, 2, 4)] {
                let mut got = vec![9.0; c * rh * rw];
                read_via_finer_level(&img, level, y0, x0, rh, rw, &mut got).unwrap();
                let mut want = vec![0.0; c * rh * rw];
                img.read_region(level, y0, x0, rh, rw, &mut want).unwrap();
                assert_eq!(got, want, "level {level} window ({y0},{x0}) {rh}x{rw}");
            }
        }
    }

    #[test]
    fn crop_level_and_overview() {
        let img = InMemoryImage::new(vec![0.5; 1024 * 1024], 1, 1024, 1024, 8).unwrap();
        let level = |extent: f32| choose_level(&img, extent / 1024.0, 32);
        assert_eq!(level(1024.0), 5); // 1024 -> 32 pixels
        assert_eq!(level(300.0), 3); // 300/8 = 37.5 >= 32 > 18.75
        assert_eq!(level(10.0), 0);
        let (h, w, d) = img.overview(100).unwrap();
        assert_eq!((h, w, d.len()), (128, 128, 128 * 128));
    }
}
