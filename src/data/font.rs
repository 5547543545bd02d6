//! A 3×5 pixel font for labels on PNGs (inspection grids, saccade overlays),
//! so no font file or rasterizer is needed. Letters are upper case; anything
//! without a glyph draws as `?`.

use image::{Rgb, RgbImage};

/// Each glyph: five rows of three pixels, `1` = ink.
const GLYPHS: &[(char, &str)] = &[
    ('0', "111101101101111"),
    ('1', "010110010010111"),
    ('2', "111001111100111"),
    ('3', "111001111001111"),
    ('4', "101101111001001"),
    ('5', "111100111001111"),
    ('6', "111100111101111"),
    ('7', "111001010010010"),
    ('8', "111101111101111"),
    ('9', "111101111001111"),
    ('A', "010101111101101"),
    ('B', "110101110101110"),
    ('C', "011100100100011"),
    ('D', "110101101101110"),
    ('E', "111100110100111"),
    ('F', "111100110100100"),
    ('G', "011100101101011"),
    ('H', "101101111101101"),
    ('I', "111010010010111"),
    ('J', "001001001101010"),
    ('K', "101101110101101"),
    ('L', "100100100100111"),
    ('M', "101111111101101"),
    ('N', "110101101101101"),
    ('O', "010101101101010"),
    ('P', "110101110100100"),
    ('Q', "010101101110011"),
    ('R', "110101110101101"),
    ('S', "011100010001110"),
    ('T', "111010010010010"),
    ('U', "101101101101111"),
    ('V', "101101101101010"),
    ('W', "101101111111101"),
    ('X', "101101010101101"),
    ('Y', "101101010010010"),
    ('Z', "111001010100111"),
    ('+', "000010111010000"),
    ('-', "000000111000000"),
    ('_', "000000000000111"),
    ('.', "000000000000010"),
    (':', "000010000010000"),
    ('/', "001001010100100"),
    ('=', "000111000111000"),
    (',', "000000000010100"),
    ('#', "101111101111101"),
    ('(', "010100100100010"),
    (')', "010001001001010"),
    ('%', "101001010100101"),
    ('<', "001010100010001"),
    ('>', "100010001010100"),
    ('!', "010010010000010"),
    ('\'', "010010000000000"),
    ('*', "000101010101000"),
    ('?', "111001010000010"),
    (' ', "000000000000000"),
];

/// Width in pixels of `text` drawn at `scale`.
pub fn text_width(text: &str, scale: u32) -> u32 {
    text.chars().count() as u32 * 4 * scale
}

/// Draw `text` with its top-left corner at `(x, y)`, each font pixel a
/// `scale`×`scale` square; what falls outside the image is skipped.
pub fn draw_text(img: &mut RgbImage, x: u32, y: u32, text: &str, scale: u32, color: Rgb<u8>) {
    for (k, ch) in text.chars().enumerate() {
        let up = ch.to_ascii_uppercase();
        let bits = GLYPHS
            .iter()
            .find(|(c, _)| *c == up)
            .or_else(|| GLYPHS.iter().find(|(c, _)| *c == '?'))
            .map(|(_, b)| b.as_bytes())
            .unwrap_or_default();
        let gx = x + k as u32 * 4 * scale;
        for (i, &b) in bits.iter().enumerate() {
            if b != b'1' {
                continue;
            }
            let (px, py) = (gx + (i as u32 % 3) * scale, y + (i as u32 / 3) * scale);
            for dy in 0..scale {
                for dx in 0..scale {
                    if px + dx < img.width() && py + dy < img.height() {
                        img.put_pixel(px + dx, py + dy, color);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_draws_glyph_pixels() {
        let mut img = RgbImage::new(40, 12);
        draw_text(&mut img, 1, 1, "1+", 2, Rgb([255, 0, 0]));
        let ink = img.pixels().filter(|p| p[0] == 255).count();
        // "1" has 8 ink pixels, "+" 5, each 2x2.
        assert_eq!(ink, (8 + 5) * 4);
        assert_eq!(text_width("ab", 2), 16);
        assert!(GLYPHS.iter().all(|(_, b)| b.len() == 15));
    }
}
