//! Saccade pictures (paper Figure 3): per test image one row with the image
//! and its numbered glimpse boxes, the proxy, the T crops the classifier
//! saw, and a caption (file name, predicted class and probability, true
//! class). A bar under the image is green when the prediction is right, red
//! when wrong, gray when the true class is unknown.
//!
//! A row is drawn from the image's coarsest pyramid level no larger than
//! the panel, so its memory does not depend on the image size.

use std::path::Path;

use anyhow::Result;
use image::{Rgb, RgbImage};

use crate::data::font::draw_text;
use crate::data::ImageSource;
use crate::models::saccader::glimpse_box;

/// Glimpse colours, one per step (cycled).
const COLORS: [[u8; 3]; 6] = [
    [255, 64, 64],
    [64, 160, 255],
    [255, 200, 0],
    [64, 220, 64],
    [220, 64, 255],
    [0, 220, 220],
];

/// One row of the picture.
pub struct SaccadeRow<'a> {
    pub source: &'a dyn ImageSource,
    /// Proxy, CHW.
    pub proxy: (usize, usize, &'a [f32]),
    /// Crops, each CHW with side `crop`.
    pub crops: Vec<&'a [f32]>,
    pub crop: usize,
    /// Glimpses as `(s, tx, ty)` in normalized coordinates.
    pub glimpses: Vec<[f32; 3]>,
    /// Whether the prediction is right; `None` when the true class is unknown.
    pub verdict: Option<bool>,
    /// Lines of text drawn beside the image (3×5 font, upper case; a line
    /// too long to fit keeps its end, after `...`).
    pub caption: Vec<String>,
}

/// Side of the image panel in pixels.
const PANEL: u32 = 192;
const GAP: u32 = 6;

fn gray_or_rgb(data: &[f32], c: usize, h: usize, w: usize, y: usize, x: usize) -> [u8; 3] {
    let px = |ch: usize| (data[(ch * h + y) * w + x].clamp(0.0, 1.0) * 255.0).round() as u8;
    if c >= 3 {
        [px(0), px(1), px(2)]
    } else {
        let v = px(0);
        [v, v, v]
    }
}

/// Blit a CHW image into `canvas` at (x0, y0), nearest-neighbour scaled to `side`.
fn blit(
    canvas: &mut RgbImage,
    (x0, y0): (u32, u32),
    side: u32,
    (c, h, w): (usize, usize, usize),
    data: &[f32],
) {
    for y in 0..side {
        for x in 0..side {
            let sy = (y as usize * h) / side as usize;
            let sx = (x as usize * w) / side as usize;
            canvas.put_pixel(x0 + x, y0 + y, Rgb(gray_or_rgb(data, c, h, w, sy, sx)));
        }
    }
}

fn rect(
    canvas: &mut RgbImage,
    (x0, y0, x1, y1): (i64, i64, i64, i64),
    color: [u8; 3],
    clip: (u32, u32, u32),
) {
    let (cx, cy, side) = clip;
    let mut put = |x: i64, y: i64| {
        if x >= cx as i64 && y >= cy as i64 && x < (cx + side) as i64 && y < (cy + side) as i64 {
            canvas.put_pixel(x as u32, y as u32, Rgb(color));
        }
    };
    for t in 0..2 {
        for x in x0..=x1 {
            put(x, y0 + t);
            put(x, y1 - t);
        }
        for y in y0..=y1 {
            put(x0 + t, y);
            put(x1 - t, y);
        }
    }
}

/// 3x5 digit glyphs, one row of 3 bits per line.
const DIGITS: [[u8; 5]; 10] = [
    [7, 5, 5, 5, 7],
    [2, 6, 2, 2, 7],
    [7, 1, 7, 4, 7],
    [7, 1, 7, 1, 7],
    [5, 5, 7, 1, 1],
    [7, 4, 7, 1, 7],
    [7, 4, 7, 5, 7],
    [7, 1, 1, 1, 1],
    [7, 5, 7, 5, 7],
    [7, 5, 7, 1, 7],
];

/// Draw digit `d` with 2x2-pixel dots on a dark backing at (x, y).
fn digit(canvas: &mut RgbImage, (x, y): (u32, u32), d: usize, color: [u8; 3]) {
    for yy in 0..12 {
        for xx in 0..8 {
            if x + xx < canvas.width() && y + yy < canvas.height() {
                canvas.put_pixel(x + xx, y + yy, Rgb([0, 0, 0]));
            }
        }
    }
    for (r, bits) in DIGITS[d % 10].iter().enumerate() {
        for col in 0..3u32 {
            if bits >> (2 - col) & 1 == 1 {
                for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                    let (px, py) = (x + 1 + col * 2 + dx, y + 1 + r as u32 * 2 + dy);
                    if px < canvas.width() && py < canvas.height() {
                        canvas.put_pixel(px, py, Rgb(color));
                    }
                }
            }
        }
    }
}

/// The coarsest pyramid level no larger than the panel, read whole.
fn panel_image(source: &dyn ImageSource) -> Result<(usize, usize, usize, Vec<f32>)> {
    let mut level = 0;
    while level + 1 < source.levels()
        && source.level_size(level).0.max(source.level_size(level).1) > PANEL as usize
    {
        level += 1;
    }
    let (h, w) = source.level_size(level);
    let c = source.channels();
    let mut data = vec![0.0; c * h * w];
    source.read_region(level, 0, 0, h, w, &mut data)?;
    Ok((c, h, w, data))
}

/// Width and height of a row with `t` crops.
fn row_size(t: u32) -> (u32, u32) {
    let small = PANEL / 2;
    (GAP + (PANEL + GAP) + (small + GAP) * (1 + t), PANEL + 3 * GAP)
}

/// Scale of the caption font (each font pixel `CAPTION_SCALE`² pixels).
const CAPTION_SCALE: u32 = 2;

/// `line` cut to `max` characters, keeping its end after `...`.
fn fit(line: &str, max: usize) -> String {
    let n = line.chars().count();
    if n <= max {
        return line.to_string();
    }
    let keep = max.saturating_sub(3);
    format!("...{}", line.chars().skip(n - keep).collect::<String>())
}

/// Draw one row (image with glimpse boxes, verdict bar, proxy, crops,
/// caption) as a picture of its own.
pub fn render_row(row: &SaccadeRow) -> Result<RgbImage> {
    let (width, height) = row_size(row.crops.len() as u32);
    let mut canvas = RgbImage::from_pixel(width, height, Rgb([40, 40, 40]));
    draw_row(&mut canvas, row, GAP)?;
    Ok(canvas)
}

fn draw_row(canvas: &mut RgbImage, row: &SaccadeRow, y0: u32) -> Result<()> {
    let small = PANEL / 2;
    let (c, h, w, data) = panel_image(row.source)?;
    blit(canvas, (GAP, y0), PANEL, (c, h, w), &data);
    for (t, g) in row.glimpses.iter().enumerate() {
        let [x0, ya, x1, yb] = glimpse_box(*g, PANEL as f32, PANEL as f32);
        let (x0, x1) = (x0 + GAP as f32, x1 + GAP as f32);
        let (ya, yb) = (ya + y0 as f32, yb + y0 as f32);
        let color = COLORS[t % COLORS.len()];
        rect(
            canvas,
            (x0 as i64, ya as i64, x1 as i64, yb as i64),
            color,
            (GAP, y0, PANEL),
        );
        let lx = (x0.max(GAP as f32) as u32 + 3).min(GAP + PANEL - 9);
        let ly = (ya.max(y0 as f32) as u32 + 3).min(y0 + PANEL - 13);
        digit(canvas, (lx, ly), t + 1, color);
    }
    let bar = match row.verdict {
        Some(true) => [40, 200, 40],
        Some(false) => [220, 40, 40],
        None => [128, 128, 128],
    };
    for x in GAP..GAP + PANEL {
        for y in y0 + PANEL + 2..y0 + PANEL + 2 + GAP {
            canvas.put_pixel(x, y, Rgb(bar));
        }
    }
    let px0 = GAP + PANEL + GAP;
    let (pc, pj, pdata) = row.proxy;
    blit(canvas, (px0, y0), small, (pc, pj, pj), pdata);
    for (t, crop) in row.crops.iter().enumerate() {
        let cx = px0 + (small + GAP) * (t as u32 + 1);
        blit(canvas, (cx, y0), small, (pc, row.crop, row.crop), crop);
        let color = COLORS[t % COLORS.len()];
        rect(
            canvas,
            (
                cx as i64,
                y0 as i64,
                (cx + small - 1) as i64,
                (y0 + small - 1) as i64,
            ),
            color,
            (cx, y0, small),
        );
        digit(canvas, (cx + 3, y0 + 3), t + 1, color);
    }
    let max_chars = (canvas.width().saturating_sub(px0 + GAP) / (4 * CAPTION_SCALE)) as usize;
    let line_h = 7 * CAPTION_SCALE;
    for (k, line) in row.caption.iter().enumerate() {
        let y = y0 + small + 2 * GAP + k as u32 * line_h;
        if y + 5 * CAPTION_SCALE > y0 + PANEL {
            break;
        }
        draw_text(
            canvas,
            px0,
            y,
            &fit(line, max_chars),
            CAPTION_SCALE,
            Rgb([230, 230, 230]),
        );
    }
    Ok(())
}

/// Render the rows to a PNG at `path`.
pub fn save_saccades(rows: &[SaccadeRow], path: &Path) -> Result<()> {
    let t_max = rows.iter().map(|r| r.crops.len()).max().unwrap_or(0) as u32;
    let (width, row_h) = row_size(t_max);
    let mut canvas = RgbImage::from_pixel(width, GAP + row_h * rows.len() as u32, Rgb([40, 40, 40]));
    for (i, row) in rows.iter().enumerate() {
        draw_row(&mut canvas, row, GAP + i as u32 * row_h)?;
    }
    crate::files::save_png(&canvas, path)
}

/// Stack pictures of rows made by [`render_row`] into one PNG at `path`.
pub fn save_stacked(rows: &[RgbImage], path: &Path) -> Result<()> {
    let width = rows.iter().map(|r| r.width()).max().unwrap_or(1);
    let height = GAP + rows.iter().map(|r| r.height()).sum::<u32>();
    let mut canvas = RgbImage::from_pixel(width, height, Rgb([40, 40, 40]));
    let mut y = 0;
    for r in rows {
        image::imageops::replace(&mut canvas, r, 0, y as i64);
        y += r.height();
    }
    crate::files::save_png(&canvas, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_caption_lines_keep_their_end() {
        assert_eq!(fit("short", 10), "short");
        assert_eq!(fit("a/long/path/name.png", 11), "...name.png");
    }
}
