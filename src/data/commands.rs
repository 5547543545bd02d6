//! `saccade data generate|import|inspect`: plain functions taking argument
//! structs, so the command line (`crate::cli`) only parses flags.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use image::{imageops, DynamicImage, GrayImage, ImageReader, Rgb, RgbImage};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rayon::prelude::*;

use super::decode::{decode_file, Pixels8};
use super::font::{draw_text, text_width};
use super::labels::{self, Listed, Listing};
use super::proxy::area_resize;
use super::source::ImageSource;
use super::spec::{DatasetSpec, Source};
use super::store::{write_tiled, Entry, Manifest};
use super::{mix_seed, open_dataset, DataConfig, Dataset, Split, SplitSizes, TaskSpec};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// A tiled pyramid store (readable as `--dataset DIR`).
    Store,
    /// PNG files, `DIR/<split>/<class>/<index>.png` (readable by `data import`).
    Png,
}

pub struct GenerateArgs {
    pub dataset: String,
    pub out: PathBuf,
    pub seed: u64,
    pub sizes: SplitSizes,
    pub format: OutputFormat,
    pub mnist_dir: Option<PathBuf>,
}

impl GenerateArgs {
    /// The checks that need no work done (the command line's usage errors):
    /// a generated dataset's spec and an --out free to write.
    pub fn check(&self) -> Result<()> {
        let s = &self.sizes;
        for (flag, n) in [("--train", s.train), ("--valid", s.valid), ("--test", s.test)] {
            super::check_split_size(flag, n)?;
        }
        ensure!(
            s.train + s.valid + s.test > 0,
            "--train, --valid and --test are all 0: nothing to generate"
        );
        if let Source::Store(dir) = &DatasetSpec::parse(&self.dataset)?.source {
            bail!(
                "{} is already a store; generate takes a generated dataset name",
                dir.display()
            );
        }
        check_out(&self.out)
    }
}

fn progress(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} [{elapsed_precise} < {eta_precise}]")
            .expect("valid template"),
    );
    bar.set_message(what.to_string());
    bar
}

/// Refuse to write into a folder that already holds data.
fn check_out(out: &Path) -> Result<()> {
    if out.exists() {
        let used = fs::read_dir(out)
            .with_context(|| format!("--out {} exists and is not a readable folder", out.display()))?
            .next()
            .is_some();
        ensure!(
            !used,
            "--out {} is not empty; remove it or choose another folder",
            out.display()
        );
    }
    Ok(())
}

/// The folder a dataset is written into before it becomes `out`: a sibling
/// `.<name>.partial`, renamed onto `out` only once every file is written, so
/// an error, a kill or a full disk never leaves a half-written store at
/// `out`. Dropped before [`Partial::finish`], it removes what it holds; a
/// kill leaves it behind, and the next run into the same `out` clears it.
struct Partial {
    dir: PathBuf,
    out: PathBuf,
}

impl Partial {
    fn new(out: &Path) -> Result<Partial> {
        ensure!(
            out.file_name().is_some(),
            "--out {} names no folder",
            out.display()
        );
        let dir = partial_of(out);
        if dir.exists() {
            eprintln!("removing {}, left by an interrupted run", dir.display());
            fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Partial {
            dir,
            out: out.to_path_buf(),
        })
    }

    /// Move the finished folder to `out` (an empty `out` is replaced).
    fn finish(self) -> Result<()> {
        if self.out.exists() {
            fs::remove_dir(&self.out).with_context(|| format!("cannot replace {}", self.out.display()))?;
        }
        fs::rename(&self.dir, &self.out)
            .with_context(|| format!("cannot move {} to {}", self.dir.display(), self.out.display()))
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Where a dataset bound for `out` is written first: `.<name>.partial`
/// beside it ([`Partial`]).
pub(crate) fn partial_of(out: &Path) -> PathBuf {
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    out.with_file_name(format!(".{name}.partial"))
}

/// Level 0 of an image as 8-bit pixels (HWC).
fn to_u8(src: &dyn ImageSource) -> Result<(u32, u32, Vec<u8>)> {
    let c = src.channels();
    let (h, w) = src.size();
    let mut chw = vec![0.0f32; c * h * w];
    src.read_region(0, 0, 0, h, w, &mut chw)?;
    let hwc = (0..h * w)
        .flat_map(|p| (0..c).map(move |ch| (p, ch)))
        .map(|(p, ch)| (chw[ch * h * w + p].clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    Ok((w as u32, h as u32, hwc))
}

/// Write every split of a generated dataset to disk.
pub fn generate(args: &GenerateArgs) -> Result<()> {
    args.check()?;
    let cfg = DataConfig {
        seed: args.seed,
        sizes: args.sizes,
        mnist_dir: args.mnist_dir.clone(),
    };
    let datasets: Vec<(Split, Arc<dyn Dataset>)> = Split::ALL
        .into_iter()
        .map(|s| Ok((s, open_dataset(&args.dataset, s, &cfg)?)))
        .collect::<Result<_>>()?;
    let first = &datasets[0].1;
    let tasks = first.tasks();
    // Several tasks (or a multi-label one) do not fit one class folder per
    // image: PNGs then go into <split>/ with a labels CSV `data import
    // --labels` reads back.
    let csv = tasks.len() > 1 || tasks[0].multi_label;
    let partial = Partial::new(&args.out)?;
    let dir = &partial.dir;
    let total: usize = datasets.iter().map(|(_, d)| d.len()).sum();
    let classes = first.class_names();
    eprintln!(
        "generating {total} images of {} into {}",
        first.describe(),
        args.out.display()
    );
    let bar = progress(total as u64, "generate");
    let mut entries = Vec::new();
    if args.format == OutputFormat::Store {
        fs::create_dir_all(dir.join("images"))?;
    }
    for (split, ds) in &datasets {
        let made: Vec<Entry> = (0..ds.len())
            .into_par_iter()
            .map(|i| {
                let s = ds.get(i)?;
                let (file, identity) = match args.format {
                    OutputFormat::Store => {
                        let file = format!("images/{}-{i:07}.tiles", split.name());
                        let written = write_tiled(&dir.join(&file), s.image.as_ref())?;
                        (file, Some(written.identity))
                    }
                    OutputFormat::Png => {
                        let file = if csv {
                            format!("{}/{i:07}.png", split.name())
                        } else {
                            format!("{}/{}/{i:07}.png", split.name(), classes[s.label()])
                        };
                        let path = dir.join(&file);
                        fs::create_dir_all(path.parent().unwrap())?;
                        let (w, h, px) = to_u8(s.image.as_ref())?;
                        let img = match s.image.channels() {
                            1 => DynamicImage::ImageLuma8(GrayImage::from_raw(w, h, px).unwrap()),
                            _ => DynamicImage::ImageRgb8(RgbImage::from_raw(w, h, px).unwrap()),
                        };
                        // Encoded in memory, then written with its errors
                        // checked (into the staging folder): the image
                        // crate's `save` lost a full disk's errors (exit 0,
                        // "wrote", 764 of 1 020 PNGs empty).
                        let mut png = std::io::Cursor::new(Vec::new());
                        img.write_to(&mut png, image::ImageFormat::Png)?;
                        fs::write(&path, png.get_ref())
                            .with_context(|| format!("cannot write {} (disk full?)", path.display()))?;
                        (file, None)
                    }
                };
                bar.inc(1);
                Ok(Entry {
                    split: *split,
                    labels: s.labels,
                    file,
                    identity,
                })
            })
            .collect::<Result<_>>()?;
        entries.extend(made);
    }
    bar.finish();
    if args.format == OutputFormat::Png && csv {
        let mut text = format!(
            "file,split,{}\n",
            tasks
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(",")
        );
        for e in &entries {
            let labels: Vec<String> = tasks
                .iter()
                .zip(&e.labels)
                .map(|(t, &l)| t.describe_label(l))
                .collect();
            text += &format!("{},{},{}\n", e.file, e.split.name(), labels.join(","));
        }
        crate::files::write_atomic(&dir.join("labels.csv"), text.as_bytes())?;
    }
    if args.format == OutputFormat::Store {
        Manifest {
            channels: first.channels(),
            size: first.image_size(),
            tasks: first.tasks(),
            entries,
        }
        .write(dir)?;
    }
    partial.finish()?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

pub struct ImportArgs {
    pub folder: PathBuf,
    /// A labels CSV (see [`labels`]) naming the images of `folder`; else
    /// one class per subfolder.
    pub labels: Option<PathBuf>,
    pub out: PathBuf,
    /// Resize every image to `size`×`size` (needed when sizes differ).
    pub size: Option<usize>,
    pub valid_frac: f64,
    pub test_frac: f64,
}

impl ImportArgs {
    /// The checks that need no image read (the command line's usage errors):
    /// the split fractions and an --out free to write.
    pub fn check(&self) -> Result<()> {
        ensure!(
            (0.0..1.0).contains(&(self.valid_frac + self.test_frac))
                && self.valid_frac >= 0.0
                && self.test_frac >= 0.0,
            "--valid-frac and --test-frac must be non-negative and sum to less than 1"
        );
        ensure!(
            self.size.is_none_or(|s| (1..=MAX_IMPORT_SIDE).contains(&s)),
            "--size must be 1 to {MAX_IMPORT_SIDE}"
        );
        check_out(&self.out)
    }

    /// The images to import, with their labels and splits: the input's
    /// errors (no class folders; a labels CSV's bad row), found before any
    /// work.
    pub fn list(&self) -> Result<Listing> {
        match &self.labels {
            Some(csv) => labels::from_csv(csv, &self.folder),
            None => labels::from_folders(&self.folder),
        }
    }
}

/// The largest `--size` of an import: the side of a 65536² image, as the
/// generated datasets allow.
const MAX_IMPORT_SIDE: usize = 65_536;

/// Split of an imported file: fixed by a hash of its path, so re-importing
/// (or adding files) keeps every file in its split.
fn split_of(rel: &str, valid_frac: f64, test_frac: f64) -> Split {
    let h = rel.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let u = (mix_seed(&[h]) >> 11) as f64 / (1u64 << 53) as f64;
    if u < test_frac {
        Split::Test
    } else if u < test_frac + valid_frac {
        Split::Valid
    } else {
        Split::Train
    }
}

/// Whether any of `files` has color, and the side the store's images get:
/// `size` if given, else the files' common size (refused when they differ).
/// Reads headers only.
fn import_shape(files: &[Listed], size: Option<usize>) -> Result<(bool, (usize, usize))> {
    let mut color = false;
    let mut sizes = Vec::new();
    for Listed { path: p, .. } in files {
        let dec = crate::files::ensure_regular(p)
            .and_then(|()| Ok(ImageReader::open(p)?.with_guessed_format()?))
            .and_then(|r| Ok(r.into_decoder()?))
            .with_context(|| format!("cannot read image {}", p.display()))?;
        use image::ImageDecoder;
        color |= dec.color_type().has_color();
        sizes.push(dec.dimensions());
    }
    let size = match size {
        Some(s) => (s, s),
        None => {
            if let Some(k) = sizes.iter().position(|&s| s != sizes[0]) {
                bail!(
                    "images differ in size ({} is {}x{}, {} is {}x{}); pass --size N to resize all to NxN",
                    files[0].path.display(),
                    sizes[0].0,
                    sizes[0].1,
                    files[k].path.display(),
                    sizes[k].0,
                    sizes[k].1
                );
            }
            (sizes[0].1 as usize, sizes[0].0 as usize)
        }
    };
    Ok((color, size))
}

/// Import a folder of images (one class per subfolder, or listed by a
/// labels CSV) into a store.
pub fn import(args: &ImportArgs) -> Result<()> {
    args.check()?;
    import_listed(args, &args.list()?)
}

/// Import the images of `listing` (from [`ImportArgs::list`]) into a store.
pub fn import_listed(args: &ImportArgs, listing: &Listing) -> Result<()> {
    let files = &listing.images;
    let (color, size) = import_shape(files, args.size)?;
    let channels = if color { 3 } else { 1 };
    let partial = Partial::new(&args.out)?;
    fs::create_dir_all(partial.dir.join("images"))?;
    let bar = progress(files.len() as u64, "import");
    let entries: Vec<Entry> = files
        .par_iter()
        .enumerate()
        .map(|(i, listed)| {
            let p = &listed.path;
            let img = decode_file(p).with_context(|| format!("cannot decode image {}", p.display()))?;
            let img = if args.size.is_some() {
                img.resize_exact(size.1 as u32, size.0 as u32, imageops::FilterType::Triangle)
            } else {
                img
            };
            let data = if color {
                img.into_rgb8().into_raw()
            } else {
                img.into_luma8().into_raw()
            };
            let src = Pixels8 {
                c: channels,
                h: size.0,
                w: size.1,
                data,
            };
            let file = format!("images/{i:07}.tiles");
            let written = write_tiled(&partial.dir.join(&file), &src)?;
            bar.inc(1);
            Ok(Entry {
                identity: Some(written.identity),
                split: listed
                    .split
                    .unwrap_or_else(|| split_of(&listed.rel, args.valid_frac, args.test_frac)),
                labels: listed.labels.clone(),
                file,
            })
        })
        .collect::<Result<_>>()?;
    bar.finish();
    let count = |s| entries.iter().filter(|e| e.split == s).count();
    let empty: Vec<Split> = Split::ALL.into_iter().filter(|&s| count(s) == 0).collect();
    let summary = format!(
        "imported {} images ({} train, {} valid, {} test) into {}, labelled by:\n{}",
        entries.len(),
        count(Split::Train),
        count(Split::Valid),
        count(Split::Test),
        args.out.display(),
        task_lines(&listing.tasks)
    );
    Manifest {
        channels,
        size,
        tasks: listing.tasks.clone(),
        entries,
    }
    .write(&partial.dir)?;
    partial.finish()?;
    eprintln!("{summary}");
    for note in &listing.notes {
        eprintln!("note: {note}");
    }
    for split in empty {
        eprintln!(
            "note: the {} split is empty, and `saccade train` needs images in all three: import more \
             images, raise --valid-frac/--test-frac or fill the labels CSV's split column",
            split.name()
        );
    }
    Ok(())
}

/// The tasks, one indented line each: name, class count, kind and the
/// first classes.
fn task_lines(tasks: &[TaskSpec]) -> String {
    const SHOWN: usize = 12;
    let lines: Vec<String> = tasks
        .iter()
        .map(|t| {
            let more = if t.num_classes() > SHOWN { ", ..." } else { "" };
            format!(
                "  {}: {} classes, {} ({}{more})",
                t.name,
                t.num_classes(),
                if t.multi_label {
                    "multi-label"
                } else {
                    "single-label"
                },
                t.class_names[..t.num_classes().min(SHOWN)].join(", ")
            )
        })
        .collect();
    lines.join("\n")
}

pub struct InspectArgs {
    /// A dataset spec or a store folder.
    pub dataset: String,
    pub out: PathBuf,
    pub count: usize,
    pub split: Split,
    pub seed: u64,
    /// Side of each picture in the grid, in pixels.
    pub cell: u32,
}

impl InspectArgs {
    /// The checks on the arguments alone (the command line's usage errors).
    pub fn check(&self) -> Result<()> {
        ensure!(
            self.count > 0 && self.cell >= 16,
            "--count must be positive and --cell at least 16"
        );
        // As `export` and `--viz`: a picture never replaces a file (it once
        // replaced an exported checkpoint).
        ensure!(
            !self.out.exists(),
            "--out {} exists; choose a new file",
            self.out.display()
        );
        let (w, h) = grid_size(self.count, self.cell);
        ensure!(
            w.saturating_mul(h) <= MAX_GRID_PIXELS,
            "--count {} with --cell {} makes a {w}x{h} picture, over {} M pixels: ask for fewer images or smaller cells",
            self.count,
            self.cell,
            MAX_GRID_PIXELS >> 20
        );
        Ok(())
    }
}

/// `inspect`'s gaps and text scale, in pixels.
const GAP: u32 = 6;
const TEXT: u32 = 2;
/// The largest picture `inspect` draws: 128 M pixels (384 MB of RGB).
const MAX_GRID_PIXELS: u64 = 1 << 27;

/// Width of `inspect`'s grid of `n` samples in cells of `cell` pixels (the
/// title may widen it) and its height; in u64, so that the check before
/// allocating cannot overflow.
fn grid_size(n: usize, cell: u32) -> (u64, u64) {
    let (n, cell, gap, text) = (n as u64, u64::from(cell), u64::from(GAP), u64::from(TEXT));
    let cols = n.clamp(1, 4);
    let band = 5 * text + 2 * gap;
    (
        cols * (2 * cell + 3 * gap),
        band + n.div_ceil(cols) * (cell + band + gap),
    )
}

/// A grid PNG: per sample, the image (downsampled to fit a cell), its proxy
/// (nearest-neighbour upscaled), its label and its index.
pub fn inspect(args: &InspectArgs) -> Result<()> {
    args.check()?;
    let cfg = DataConfig {
        seed: args.seed,
        sizes: SplitSizes {
            train: args.count,
            valid: args.count,
            test: args.count,
        },
        mnist_dir: None,
    };
    let ds = open_dataset(&args.dataset, args.split, &cfg)?;
    let n = args.count.min(ds.len());
    ensure!(n > 0, "{} has no samples", ds.describe());
    // Which samples: a generated dataset renders its first `n` from the
    // seed; a store's are a seeded choice among all of its split's.
    let mut picks: Vec<usize> = if ds.len() > n {
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix_seed(&[args.seed, 0x1a5ec7]));
        rand::seq::index::sample(&mut rng, ds.len(), n).into_vec()
    } else {
        (0..n).collect()
    };
    picks.sort_unstable();
    let tasks = ds.tasks();
    let (cell, gap, text) = (args.cell, GAP, TEXT);
    let band = 5 * text + 2 * gap;
    let cols = 4u32.min(n as u32);
    let pair_w = 2 * cell + 3 * gap;
    let title = format!("{} - image, proxy, label", ds.describe());
    let top = band;
    // check() bounded this size, so it fits in u32.
    let (grid_w, grid_h) = grid_size(n, cell);
    let width = (grid_w as u32).max(text_width(&title, text) + 2 * gap);
    let mut grid = RgbImage::from_pixel(width, grid_h as u32, Rgb([24, 24, 32]));
    draw_text(&mut grid, gap, gap, &title, text, Rgb([220, 220, 220]));
    for (i, &index) in picks.iter().enumerate() {
        let s = ds.get(index)?;
        let (gx, gy) = (
            (i as u32 % cols) * pair_w + gap,
            top + (i as u32 / cols) * (cell + band + gap),
        );
        // The image, aspect kept, from the pyramid level nearest the cell size.
        let (h, w, data) = s.image.overview(cell as usize)?;
        let k = cell as f64 / h.max(w) as f64;
        let (th, tw) = (((h as f64 * k) as usize).max(1), ((w as f64 * k) as usize).max(1));
        let thumb = area_resize(&data, s.image.channels(), h, w, th, tw);
        paste(&mut grid, gx, gy, &thumb, s.image.channels(), th, tw, 1);
        let (pc, j) = ds.proxy_shape();
        let up = (cell / j as u32).max(1);
        paste(&mut grid, gx + cell + gap, gy, &s.proxy, pc, j, j, up);
        // Each task's label, `/` between tasks (no spaces: a multi-label
        // task's names are separated by spaces).
        let label: Vec<String> = tasks
            .iter()
            .zip(&s.labels)
            .map(|(t, &l)| t.describe_label(l))
            .collect();
        let label = label.join("/");
        draw_text(&mut grid, gx, gy + cell + gap, &label, text, Rgb([255, 210, 80]));
        let index_x = gx + text_width(&label, text) + 2 * text;
        draw_text(
            &mut grid,
            index_x,
            gy + cell + gap,
            &format!("i={index}"),
            text,
            Rgb([150, 150, 170]),
        );
        let proxy_note = format!("proxy {j}x{j}");
        draw_text(
            &mut grid,
            gx + cell + gap,
            gy + cell + gap,
            &proxy_note,
            text,
            Rgb([150, 150, 170]),
        );
    }
    crate::files::save_png(&grid, &args.out)?;
    eprintln!(
        "wrote {} ({n} samples of {}), labelled by:\n{}",
        args.out.display(),
        ds.describe(),
        task_lines(&tasks)
    );
    Ok(())
}

/// Draw a CHW image (1 or 3 channels shown; others: the first) at `(x, y)`,
/// each pixel a `scale`×`scale` square.
#[allow(clippy::too_many_arguments)]
fn paste(grid: &mut RgbImage, x: u32, y: u32, chw: &[f32], c: usize, h: usize, w: usize, scale: u32) {
    let to_u8 = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    for i in 0..h {
        for j in 0..w {
            let at = |ch: usize| to_u8(chw[(ch * h + i) * w + j]);
            let px = if c == 3 {
                Rgb([at(0), at(1), at(2)])
            } else {
                Rgb([at(0); 3])
            };
            for dy in 0..scale {
                for dx in 0..scale {
                    let (gx, gy) = (x + j as u32 * scale + dx, y + i as u32 * scale + dy);
                    if gx < grid.width() && gy < grid.height() {
                        grid.put_pixel(gx, gy, px);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Grids too large to allocate are refused before any work, overflow
    /// included (`--cell 4294967295` and `--count 10000000` aborted with
    /// "memory allocation failed").
    #[test]
    fn inspect_refuses_pictures_too_large_to_allocate() {
        let args = |count, cell| super::InspectArgs {
            dataset: "cluttered-mnist".into(),
            out: "x.png".into(),
            count,
            split: super::Split::Test,
            seed: 1,
            cell,
        };
        assert!(args(16, 128).check().is_ok());
        for (count, cell) in [(10_000_000, 128), (4, u32::MAX), (1, 100_000)] {
            let e = args(count, cell).check().unwrap_err().to_string();
            assert!(e.contains("fewer images or smaller cells"), "{count} {cell}: {e}");
        }
    }

    /// `inspect --out` onto an existing file is refused before any work and
    /// leaves the file as it was (it replaced an exported checkpoint).
    #[test]
    fn inspect_refuses_to_replace_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model.safetensors");
        std::fs::write(&out, b"weights").unwrap();
        let args = super::InspectArgs {
            dataset: "cluttered-mnist".into(),
            out: out.clone(),
            count: 4,
            split: super::Split::Test,
            seed: 1,
            cell: 64,
        };
        let e = args.check().unwrap_err().to_string();
        assert!(e.contains("exists; choose a new file"), "{e}");
        assert_eq!(std::fs::read(&out).unwrap(), b"weights");
    }

    use super::*;
    use crate::data::store::StoreDataset;

    #[test]
    fn generate_png_then_import_then_inspect() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = SplitSizes {
            train: 4,
            valid: 2,
            test: 2,
        };
        let png = dir.path().join("png");
        generate(&GenerateArgs {
            dataset: "cluttered-mnist-1".into(),
            out: png.clone(),
            seed: 1,
            sizes,
            format: OutputFormat::Png,
            mnist_dir: None,
        })
        .unwrap();
        // Generating into a used folder is refused.
        let again = generate(&GenerateArgs {
            dataset: "cluttered-mnist-1".into(),
            out: png.clone(),
            seed: 1,
            sizes,
            format: OutputFormat::Store,
            mnist_dir: None,
        });
        assert!(again.err().unwrap().to_string().contains("not empty"));

        let store = dir.path().join("store");
        import(&ImportArgs {
            folder: png.join("train"),
            labels: None,
            out: store.clone(),
            size: None,
            valid_frac: 0.0,
            test_frac: 0.0,
        })
        .unwrap();
        let ds = StoreDataset::open(&store, Split::Train, 32, 0.0, 0).unwrap();
        assert_eq!((ds.len(), ds.image_size(), ds.channels()), (4, (100, 100), 1));
        // The imported pixels are the generated ones (8-bit both ways) and labels follow folders.
        let generated = open_dataset(
            "cluttered-mnist-1",
            Split::Train,
            &DataConfig {
                seed: 1,
                sizes,
                mnist_dir: None,
            },
        )
        .unwrap();
        let mut labels: Vec<usize> = (0..4).map(|i| generated.get(i).unwrap().label()).collect();
        let mut imported: Vec<usize> = (0..4).map(|i| ds.get(i).unwrap().label()).collect();
        labels.sort();
        imported.sort();
        let names = ds.class_names();
        let imported: Vec<usize> = imported.iter().map(|&l| names[l].parse().unwrap()).collect();
        assert_eq!(imported, labels);

        let grid = dir.path().join("grid.png");
        inspect(&InspectArgs {
            dataset: store.display().to_string(),
            out: grid.clone(),
            count: 4,
            split: Split::Train,
            seed: 0,
            cell: 64,
        })
        .unwrap();
        let img = image::open(&grid).unwrap().into_rgb8();
        assert!(img.width() >= 4 * 2 * 64);
    }

    /// PNGs onto a full disk: an error naming the cause and no dataset, where
    /// the image crate's `save` exited 0 with most PNGs empty. Needs a small
    /// tmpfs, so root; skipped with the reason otherwise.
    #[test]
    fn generate_png_onto_a_full_disk_fails_and_leaves_nothing() {
        let Some(disk) = crate::files::small_disk::SmallDisk::mount("48k") else {
            return;
        };
        let out = disk.path().join("png");
        let e = generate(&GenerateArgs {
            dataset: "cluttered-mnist-1".into(),
            out: out.clone(),
            seed: 1,
            sizes: SplitSizes {
                train: 60,
                valid: 2,
                test: 2,
            },
            format: OutputFormat::Png,
            mnist_dir: None,
        })
        .expect_err("48 KB cannot hold 64 PNGs of 100x100");
        assert!(format!("{e:#}").contains("disk full"), "{e:#}");
        let left: Vec<_> = fs::read_dir(disk.path()).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    /// A dataset of four tasks is written whole: a store holds every
    /// task's labels, a PNG folder gets a labels CSV that `import --labels`
    /// reads back to the same labels.
    #[test]
    fn generate_writes_every_task() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = SplitSizes {
            train: 3,
            valid: 1,
            test: 2,
        };
        let gen = |format, out: &str| {
            generate(&GenerateArgs {
                dataset: "megapixel-mnist@300".into(),
                out: dir.path().join(out),
                seed: 4,
                sizes,
                format,
                mnist_dir: None,
            })
            .unwrap()
        };
        gen(OutputFormat::Store, "s");
        gen(OutputFormat::Png, "p");
        let csv = std::fs::read_to_string(dir.path().join("p/labels.csv")).unwrap();
        assert!(csv.starts_with("file,split,majority,max,top,multi\n"), "{csv}");
        import(&ImportArgs {
            folder: dir.path().join("p"),
            labels: Some(dir.path().join("p/labels.csv")),
            out: dir.path().join("i"),
            size: None,
            valid_frac: 0.0,
            test_frac: 0.0,
        })
        .unwrap();
        let cfg = DataConfig {
            seed: 4,
            sizes,
            mnist_dir: None,
        };
        for split in Split::ALL {
            let want = open_dataset("megapixel-mnist@300", split, &cfg).unwrap();
            for store in ["s", "i"] {
                let spec = dir.path().join(store).display().to_string();
                let got = open_dataset(&spec, split, &cfg).unwrap();
                let tasks = got.tasks();
                assert_eq!(got.len(), want.len(), "{store} {split:?}");
                for i in 0..got.len() {
                    // Imported classes are those that occur, in number order:
                    // compare label names.
                    let names = |d: &dyn Dataset, t: &[crate::data::TaskSpec]| -> Vec<String> {
                        let s = d.get(i).unwrap();
                        t.iter()
                            .zip(&s.labels)
                            .map(|(t, &l)| t.describe_label(l))
                            .collect()
                    };
                    assert_eq!(
                        names(got.as_ref(), &tasks),
                        names(want.as_ref(), &want.tasks()),
                        "{store} {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn generate_store_and_import_errors() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("s");
        generate(&GenerateArgs {
            dataset: "mnist-sum@300:native".into(),
            out: out.clone(),
            seed: 2,
            sizes: SplitSizes {
                train: 2,
                valid: 1,
                test: 1,
            },
            format: OutputFormat::Store,
            mnist_dir: None,
        })
        .unwrap();
        let from_store =
            open_dataset(&out.display().to_string(), Split::Test, &DataConfig::default()).unwrap();
        assert_eq!(
            (
                from_store.len(),
                from_store.num_classes(),
                from_store.image_size()
            ),
            (1, 19, (300, 300))
        );

        // Import: no subfolders; mixed sizes without --size.
        let src = dir.path().join("imgs");
        fs::create_dir_all(src.join("a")).unwrap();
        let err = import(&ImportArgs {
            folder: dir.path().join("nope"),
            labels: None,
            out: dir.path().join("o1"),
            size: None,
            valid_frac: 0.1,
            test_frac: 0.1,
        });
        assert!(err.err().unwrap().to_string().contains("nope"));
        GrayImage::new(10, 12).save(src.join("a/x.png")).unwrap();
        GrayImage::new(11, 12).save(src.join("a/y.png")).unwrap();
        fs::write(src.join("a/z.png"), b"not a png").unwrap();
        let args = |size| ImportArgs {
            folder: src.clone(),
            labels: None,
            out: dir.path().join(format!("o{size:?}")),
            size,
            valid_frac: 0.0,
            test_frac: 0.0,
        };
        let err = format!("{:#}", import(&args(None)).err().unwrap());
        assert!(err.contains("z.png"), "{err}");
        fs::remove_file(src.join("a/z.png")).unwrap();
        let err = import(&args(None)).err().unwrap().to_string();
        assert!(err.contains("--size"), "{err}");
        import(&args(Some(16))).unwrap();
    }

    #[test]
    fn a_failed_import_leaves_no_store_and_a_rerun_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("imgs");
        fs::create_dir_all(src.join("a")).unwrap();
        for i in 0..6 {
            GrayImage::new(10, 10)
                .save(src.join(format!("a/{i}.png")))
                .unwrap();
        }
        // A PNG cut short in its pixel data: its header reads, its pixels do
        // not, so the import fails halfway through writing the store.
        let noise = GrayImage::from_fn(64, 64, |x, y| {
            image::Luma([(x * 37 + y * 101) as u8 ^ (x * y) as u8])
        });
        noise.save(src.join("a/bad.png")).unwrap();
        let bytes = fs::read(src.join("a/bad.png")).unwrap();
        fs::write(src.join("a/bad.png"), &bytes[..bytes.len() / 2]).unwrap();
        let out = dir.path().join("store");
        let partial = dir.path().join(".store.partial");
        // What a killed run leaves behind is cleared by the next one.
        fs::create_dir_all(partial.join("images")).unwrap();
        fs::write(partial.join("images/0000000.tiles"), b"half").unwrap();
        let args = ImportArgs {
            folder: src.clone(),
            labels: None,
            out: out.clone(),
            size: Some(8),
            valid_frac: 0.0,
            test_frac: 0.0,
        };
        let err = format!("{:#}", import(&args).err().unwrap());
        assert!(err.contains("bad.png"), "{err}");
        assert!(!out.exists() && !partial.exists(), "a failed import left files");
        fs::remove_file(src.join("a/bad.png")).unwrap();
        import(&args).unwrap();
        assert!(!partial.exists());
        let ds = StoreDataset::open(&out, Split::Train, 8, 0.0, 0).unwrap();
        assert_eq!(ds.len(), 6);
    }

    #[test]
    fn inspect_of_a_store_draws_a_seeded_choice_of_its_images() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s");
        generate(&GenerateArgs {
            dataset: "cluttered-mnist-1".into(),
            out: store.clone(),
            seed: 1,
            sizes: SplitSizes {
                train: 12,
                valid: 1,
                test: 1,
            },
            format: OutputFormat::Store,
            mnist_dir: None,
        })
        .unwrap();
        let draw = |seed: u64, name: &str| {
            let out = dir.path().join(name);
            inspect(&InspectArgs {
                dataset: store.display().to_string(),
                out: out.clone(),
                count: 2,
                split: Split::Train,
                seed,
                cell: 32,
            })
            .unwrap();
            fs::read(out).unwrap()
        };
        let (a, again, b) = (draw(1, "a.png"), draw(1, "a2.png"), draw(2, "b.png"));
        assert_eq!(a, again, "the same seed draws the same images");
        assert_ne!(a, b, "another seed draws other images");
    }

    /// PNGs listed by a labels CSV of two single-label tasks, one
    /// multi-label task and a split column: the store reads back every
    /// image's labels, in its split; a bad CSV writes nothing.
    #[test]
    fn import_with_a_labels_csv_keeps_every_task_and_split() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("imgs");
        fs::create_dir_all(src.join("sub")).unwrap();
        // (file, its gray level, split, digit, colour, present)
        let rows = [
            ("a.png", 10, "train", "7", "red", "1 3"),
            ("sub/b.png", 20, "train", "10", "blue", ""),
            ("c.png", 30, "valid", "7", "red", "3"),
            ("d.png", 40, "test", "2", "green", "0 1 3"),
        ];
        let mut csv = "file,split,digit,colour,present\n".to_string();
        for (file, gray, split, digit, colour, present) in rows {
            GrayImage::from_pixel(12, 9, image::Luma([gray]))
                .save(src.join(file))
                .unwrap();
            csv += &format!("{file},{split},{digit},{colour},\"{present}\"\n");
        }
        fs::write(src.join("labels.csv"), &csv).unwrap();
        let args = |labels: &str, out: &str| ImportArgs {
            folder: src.clone(),
            labels: Some(src.join(labels)),
            out: dir.path().join(out),
            size: None,
            // The split column, not these, places every image.
            valid_frac: 0.45,
            test_frac: 0.45,
        };
        import(&args("labels.csv", "store")).unwrap();
        let store = dir.path().join("store");
        let expect = |name: &str, classes: &[&str], multi_label| TaskSpec {
            name: name.into(),
            class_names: classes.iter().map(|c| c.to_string()).collect(),
            multi_label,
        };
        let tasks = vec![
            expect("digit", &["2", "7", "10"], false),
            expect("colour", &["blue", "green", "red"], false),
            expect("present", &["0", "1", "3"], true),
        ];
        // Per gray level: the labels as class names.
        let mut seen = Vec::new();
        for split in Split::ALL {
            let ds = StoreDataset::open(&store, split, 4, 0.0, 0).unwrap();
            assert_eq!(ds.tasks(), tasks);
            assert_eq!(
                (ds.num_classes(), ds.class_names()),
                (3, tasks[0].class_names.clone())
            );
            for i in 0..ds.len() {
                let s = ds.get(i).unwrap();
                let mut px = [0.0];
                s.image.read_region(0, 0, 0, 1, 1, &mut px).unwrap();
                let names: Vec<String> = tasks
                    .iter()
                    .zip(&s.labels)
                    .map(|(t, &l)| t.describe_label(l))
                    .collect();
                seen.push(((px[0] * 255.0).round() as u8, split.name(), names.join(",")));
            }
        }
        seen.sort();
        assert_eq!(
            seen,
            [
                (10, "train", "7,red,1 3".to_string()),
                (20, "train", "10,blue,".to_string()),
                (30, "valid", "7,red,3".to_string()),
                (40, "test", "2,green,0 1 3".to_string()),
            ]
        );
        let manifest = fs::read_to_string(store.join("manifest.tsv")).unwrap();
        assert!(manifest.starts_with("saccade-store\t4\t"), "{manifest}");

        // A bad row: the error names it, and nothing is written.
        fs::write(
            src.join("bad.csv"),
            csv.replace("c.png,valid", "c.png,validation"),
        )
        .unwrap();
        let err = format!("{:#}", import(&args("bad.csv", "bad")).unwrap_err());
        assert!(
            err.contains("bad.csv line 4, column `split`: unknown split `validation`"),
            "{err}"
        );
        assert!(!dir.path().join("bad").exists() && !dir.path().join(".bad.partial").exists());
    }

    /// Both wrote a store that could not be read back, with exit 0.
    #[test]
    fn import_refuses_size_zero_and_control_characters_in_class_names() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("imgs");
        fs::create_dir_all(src.join("a\tb")).unwrap();
        GrayImage::new(8, 8).save(src.join("a\tb/x.png")).unwrap();
        let args = |size| ImportArgs {
            folder: src.clone(),
            labels: None,
            out: dir.path().join("o"),
            size,
            valid_frac: 0.0,
            test_frac: 0.0,
        };
        let err = import(&args(Some(0))).err().unwrap().to_string();
        assert!(err.contains("--size"), "{err}");
        let err = import(&args(None)).err().unwrap().to_string();
        assert!(err.contains("control character"), "{err}");
        assert!(!dir.path().join("o").exists());
    }
}
