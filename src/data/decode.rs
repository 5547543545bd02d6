//! Image files (PNG, JPEG, TIFF) as image sources, within a stated memory
//! budget, for `saccade predict`.
//!
//! A file is decoded whole (the formats give no region reads through the
//! `image` crate), with the decoder's allocations capped at
//! [`MAX_DECODE_BYTES`]: a file over it is an error naming the limit, never
//! an abort. What the model then reads depends on the size:
//!
//! - up to [`IN_MEMORY_MAX_VALUES`] values (channels × pixels), a float
//!   image with its pyramid in memory;
//! - larger, the decoded 8-bit pixels are written, a band of tiles at a
//!   time, to a temporary tiled pyramid file (the store's format) that is
//!   then read through memmap like a store image, and the decoded pixels are
//!   freed. Peak memory is the decoded 8-bit image plus a few tile bands
//!   (about 0.8 GB for a 16384² RGB file), not four bytes per value.
//!
//! A JPEG whose entropy-coded data stops before its end-of-image marker (a
//! truncated download) is refused: the decoder would fill the missing part
//! with gray and predict from it.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use image::{DynamicImage, ImageFormat, ImageReader, Limits};

use super::source::{ImageSource, InMemoryImage, PYRAMID_MIN_SIDE};
use super::store::{write_tiled, TiledImage};

/// File name extensions taken from folders (any case).
pub const IMAGE_EXTS: [&str; 7] = ["png", "jpg", "jpeg", "tif", "tiff", "webp", "bmp"];
/// [`IMAGE_EXTS`] in words, for messages.
pub const IMAGE_KINDS: &str = "PNG, JPEG, TIFF, WebP or BMP";

/// Most bytes the decoder may allocate for one file: 2 GiB, enough for a
/// 16384² RGB image at 16 bits per channel (1.6 GB) or about 26000² RGB /
/// 46000² gray at 8 bits.
pub const MAX_DECODE_BYTES: u64 = 2 << 30;

/// Images with more values (channels × pixels) than this, 16 M (a 4096²
/// gray or 2364² RGB image, 64 MB as floats), go through a temporary tiled
/// file instead of a float pyramid in memory.
pub const IN_MEMORY_MAX_VALUES: usize = 1 << 24;

/// Whether `path` has one of [`IMAGE_EXTS`].
pub fn has_image_ext(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Decode `path` with the decoder's allocations capped at
/// [`MAX_DECODE_BYTES`]; a truncated JPEG is an error. Errors do not repeat
/// the path: the caller names the file.
pub fn decode_file(path: &Path) -> Result<DynamicImage> {
    crate::files::ensure_regular(path)?;
    ensure!(
        fs::metadata(path).context("cannot read")?.len() > 0,
        "the file is empty (0 bytes): not an image"
    );
    let mut reader = ImageReader::open(path)
        .context("cannot open")?
        .with_guessed_format()
        .context("cannot read")?;
    if reader.format() == Some(ImageFormat::Jpeg) {
        let bytes = fs::read(path).context("cannot read")?;
        ensure!(
            jpeg_is_complete(&bytes),
            "truncated JPEG: no end-of-image marker after its last scan"
        );
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => anyhow::anyhow!(
            "{e}: decoding it needs more than the {} GiB allowed per image file; \
             make it smaller (or split it) before predicting",
            MAX_DECODE_BYTES >> 30
        ),
        e => anyhow::anyhow!("cannot decode as {IMAGE_KINDS}: {e}"),
    })
}

/// Whether a JPEG's last scan is followed by an end-of-image marker. In
/// entropy-coded data a 0xFF byte is always followed by 0x00 or a restart
/// marker (0xD0..=0xD7), so 0xFF 0xDA (start of scan) and 0xFF 0xD9 (end of
/// image) can only be markers.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    match last_scan {
        Some(i) => bytes[i..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => false,
    }
}

/// Deletes a temporary tiled file when dropped (after the image mapping it).
struct TempTiles {
    image: TiledImage,
    path: PathBuf,
}

impl Drop for TempTiles {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

impl ImageSource for TempTiles {
    fn channels(&self) -> usize {
        self.image.channels()
    }

    fn levels(&self) -> usize {
        self.image.levels()
    }

    fn level_size(&self, level: usize) -> (usize, usize) {
        self.image.level_size(level)
    }

    fn read_region(&self, level: usize, y0: i64, x0: i64, h: usize, w: usize, out: &mut [f32]) -> Result<()> {
        self.image.read_region(level, y0, x0, h, w, out)
    }

    fn bytes_read(&self) -> u64 {
        self.image.bytes_read()
    }
}

/// Decoded 8-bit pixels (HWC) as a one-level source, for [`write_tiled`]
/// without a float copy of a large image.
pub(crate) struct Pixels8 {
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) data: Vec<u8>,
}

impl ImageSource for Pixels8 {
    fn channels(&self) -> usize {
        self.c
    }

    fn levels(&self) -> usize {
        1
    }

    fn level_size(&self, _: usize) -> (usize, usize) {
        (self.h, self.w)
    }

    fn read_region(&self, level: usize, y0: i64, x0: i64, h: usize, w: usize, out: &mut [f32]) -> Result<()> {
        ensure!(
            level == 0 && out.len() == self.c * h * w,
            "decoded image: bad region request"
        );
        for ch in 0..self.c {
            for i in 0..h {
                for j in 0..w {
                    let (y, x) = (y0 + i as i64, x0 + j as i64);
                    let inside = y >= 0 && x >= 0 && (y as usize) < self.h && (x as usize) < self.w;
                    out[(ch * h + i) * w + j] = if inside {
                        self.data[(y as usize * self.w + x as usize) * self.c + ch] as f32 / 255.0
                    } else {
                        0.0
                    };
                }
            }
        }
        Ok(())
    }
}

/// The image file at `path` as a source with `channels` channels (1: gray,
/// 3: RGB; other images are converted), see the module comment for memory.
pub fn open_image_file(path: &Path, channels: usize) -> Result<Arc<dyn ImageSource>> {
    ensure!(
        channels == 1 || channels == 3,
        "models with {channels} channels cannot read image files"
    );
    let img = decode_file(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let pixels = Pixels8 {
        c: channels,
        h,
        w,
        data: if channels == 1 {
            img.into_luma8().into_raw()
        } else {
            img.into_rgb8().into_raw()
        },
    };
    if channels * h * w <= IN_MEMORY_MAX_VALUES {
        let mut chw = vec![0.0; channels * h * w];
        pixels.read_region(0, 0, 0, h, w, &mut chw)?;
        return Ok(Arc::new(InMemoryImage::new(
            chw,
            channels,
            h,
            w,
            PYRAMID_MIN_SIDE,
        )?));
    }
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = std::env::temp_dir().join(format!(
        "saccade-predict-{}-{}.tiles",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    // write_tiled removes its own temporary file when it fails.
    if let Err(e) = write_tiled(&tmp, &pixels) {
        bail!(
            "a {w}x{h} image is read through a temporary tiled file, which could not be written in {}: {e:#}",
            std::env::temp_dir().display()
        );
    }
    drop(pixels);
    let image = TiledImage::open(&tmp);
    match image {
        Ok(image) => Ok(Arc::new(TempTiles { image, path: tmp })),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jpeg_is_complete_only_with_an_end_marker_after_its_last_scan() {
        let full = [0xFF, 0xD8, 0xFF, 0xDA, 1, 0xFF, 0x00, 2, 0xFF, 0xD9];
        assert!(jpeg_is_complete(&full));
        assert!(!jpeg_is_complete(&full[..8]));
        // An end marker before the last scan (a thumbnail's) does not count.
        let thumb = [0xFF, 0xD8, 0xFF, 0xD9, 0xFF, 0xDA, 1, 2];
        assert!(!jpeg_is_complete(&thumb));
    }

    /// A PNG whose header says 40000x40000 RGB (4.8 GB decoded) is refused
    /// for that file, naming the budget, before anything is allocated.
    #[test]
    fn an_image_over_the_decoders_budget_is_an_error_naming_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.png");
        let mut bytes = Vec::new();
        image::RgbImage::new(1, 1)
            .write_to(&mut std::io::Cursor::new(&mut bytes), ImageFormat::Png)
            .unwrap();
        // IHDR: length (4) type (4) at byte 8, width and height at 16 and 20, CRC at 29.
        bytes[16..20].copy_from_slice(&40_000u32.to_be_bytes());
        bytes[20..24].copy_from_slice(&40_000u32.to_be_bytes());
        let crc = crc32fast::hash(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        fs::write(&path, &bytes).unwrap();
        let e = format!("{:#}", open_image_file(&path, 3).err().unwrap());
        assert!(e.contains("more than the 2 GiB allowed per image file"), "{e}");
    }

    /// The decoder fills a truncated JPEG's missing part with gray and
    /// returns Ok (image 0.25 with zune-jpeg), so the check is ours.
    #[test]
    fn a_truncated_jpeg_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, 90]));
        let mut bytes = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut bytes), ImageFormat::Jpeg)
            .unwrap();
        let (whole, cut) = (dir.path().join("whole.jpg"), dir.path().join("cut.jpg"));
        fs::write(&whole, &bytes).unwrap();
        fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
        println!(
            "the decoder alone on the truncated JPEG: {}",
            match image::load_from_memory(&bytes[..bytes.len() * 2 / 3]) {
                Ok(_) => "Ok (would be predicted)".to_string(),
                Err(e) => format!("Err({e})"),
            }
        );
        assert!(open_image_file(&whole, 3).is_ok());
        let e = format!("{:#}", open_image_file(&cut, 3).err().unwrap());
        assert!(e.contains("truncated JPEG"), "{e}");
    }

    #[test]
    fn large_images_read_through_a_temporary_tiled_file_equal_the_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let (w, h) = (4200u32, 4100u32);
        let img = image::GrayImage::from_fn(w, h, |x, y| image::Luma([((x * 7 + y * 3) % 251) as u8]));
        let path = dir.path().join("big.png");
        img.save(&path).unwrap();
        let src = open_image_file(&path, 1).unwrap();
        assert_eq!(src.size(), (h as usize, w as usize));
        assert!(src.levels() > 1);
        let mut out = vec![0.0; 4 * 5];
        src.read_region(0, 4000, 4100, 4, 5, &mut out).unwrap();
        for i in 0..4 {
            for j in 0..5 {
                let v = img.get_pixel(4100 + j, 4000 + i)[0] as f32 / 255.0;
                assert_eq!(out[(i * 5 + j) as usize], v);
            }
        }
        drop(src);
        let left = fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("saccade-predict-{}-", std::process::id()))
            })
            .count();
        assert_eq!(left, 0, "temporary tiled files left behind");
    }
}
