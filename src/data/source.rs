//! `ImageSource`: read a rectangle of an image at a pyramid level, so that
//! large images are never loaded whole. Level `l` is level 0 area-downsampled
//! `l` times by 2 (see [`downsample2`]); reads outside the image give zeros,
//! which is the zero padding of the spatial transformer.

use anyhow::{ensure, Result};

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
}

/// Size of the next pyramid level.
pub fn half_size(h: usize, w: usize) -> (usize, usize) {
    (h.div_ceil(2).max(1), w.div_ceil(2).max(1))
}

/// Area downsampling by 2: each output pixel is the mean of the (up to) 2×2
/// input pixels it covers; at an odd edge only the existing ones count.
pub fn downsample2(data: &[f32], c: usize, h: usize, w: usize) -> Vec<f32> {
    let (h2, w2) = half_size(h, w);
    let mut out = vec![0.0; c * h2 * w2];
    for ch in 0..c {
        let src = &data[ch * h * w..(ch + 1) * h * w];
        for i in 0..h2 {
            for j in 0..w2 {
                let (mut s, mut n) = (0.0, 0.0);
                for y in 2 * i..(2 * i + 2).min(h) {
                    for x in 2 * j..(2 * j + 2).min(w) {
                        s += src[y * w + x];
                        n += 1.0;
                    }
                }
                out[(ch * h2 + i) * w2 + j] = s / n;
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
}

impl InMemoryImage {
    /// `data` is CHW; pyramid levels are built down to `min_side` pixels.
    pub fn new(data: Vec<f32>, channels: usize, h: usize, w: usize, min_side: usize) -> Result<Self> {
        ensure!(
            data.len() == channels * h * w && h > 0 && w > 0,
            "in-memory image: {} values do not make {channels}x{h}x{w}",
            data.len()
        );
        let mut levels = vec![(h, w, data)];
        loop {
            let (h, w, d) = levels.last().unwrap();
            if (*h).max(*w) <= min_side.max(1) || (*h == 1 && *w == 1) {
                break;
            }
            let (h2, w2) = half_size(*h, *w);
            let d2 = downsample2(d, channels, *h, *w);
            levels.push((h2, w2, d2));
        }
        Ok(InMemoryImage { channels, levels })
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
