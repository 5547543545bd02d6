//! The tiled pyramid store: large images on disk, read region by region
//! through memmap2, so a crop costs the few tiles it touches whatever the
//! image size (the paper's App. 7.4 used pyramid TIFFs with VIPS for this).
//!
//! One image = one `.tiles` file (little-endian):
//!
//! ```text
//! magic "SACTILE\n" | version u32 | channels u32 | tile u32 | levels u32 | height u64 | width u64
//! per level:  height u64 | width u64 | tile u32 | tiles_y u32 | tiles_x u32 | 0 u32 | offset u64
//! per tile (levels in order, tiles row-major): CRC-32 u32
//! CRC-32 u32 of every header byte before it
//! (zeros up to a 4096-byte boundary) tile data
//! ```
//!
//! A tile is `channels × t × t` u8 (CHW), `t` = 256, or the next power of two
//! of a level's longer side when that is smaller; edge tiles are
//! zero-padded. Level `l+1` is [`downsample2`] of level `l` as stored, then
//! rounded to u8, so every level is the area downsample of the one above.
//! The header is checked when a file is opened (magic, version, CRC, length)
//! and each tile's CRC when it is read, so truncation and corruption are
//! errors naming the file, never wrong pixels or a panic.
//!
//! A store is a folder: `manifest.tsv` and `images/*.tiles`. The manifest's
//! lines are tab-separated:
//!
//! ```text
//! saccade-store  4  crc32=XXXXXXXX     (version 2: one task, no `task` lines)
//! channels       C
//! size           H  W
//! task           NAME  single|multi   (versions 3-4; its `class` lines follow)
//! class          NAME
//! image          SPLIT  LABEL...  FILE  crc32=XXXXXXXX
//! ```
//!
//! An image line holds one label per task (a multi-label task's is the
//! bitmask of its classes), the file's path inside the store, and (version
//! 4) the file's identity: its header CRC, which covers every tile's CRC, so
//! files swapped or replaced are refused when opened.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use memmap2::{Mmap, MmapMut};

use super::proxy::{AreaProxy, ProxyMaker};
use super::source::{downsample2, pyramid_sizes, ImageSource, PYRAMID_MIN_SIDE};
use super::{mix_seed, Dataset, Sample, Split, TaskSpec, DEFAULT_TASK, MAX_MULTI_LABEL_CLASSES};

pub const MAGIC: &[u8; 8] = b"SACTILE\n";
pub const VERSION: u32 = 1;
pub const TILE: usize = 256;
const FIXED_HEADER: usize = 40;
const LEVEL_ENTRY: usize = 40;
const DATA_ALIGN: usize = 4096;
pub const MANIFEST: &str = "manifest.tsv";
/// The first line of a manifest is `saccade-store<TAB>VERSION<TAB>crc32=XXXXXXXX`,
/// the CRC-32 of every byte after that line, so a truncated or altered
/// manifest is an error rather than a store with other images or labels.
/// Version 2 holds one task, version 3 several; version 1 (no CRC) is
/// still read.
const MANIFEST_MAGIC: &str = "saccade-store";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Level {
    h: usize,
    w: usize,
    tile: usize,
    tiles_y: usize,
    tiles_x: usize,
    offset: usize,
    /// Index of this level's first tile in the CRC table.
    first_tile: usize,
}

impl Level {
    fn tile_bytes(&self, c: usize) -> usize {
        c * self.tile * self.tile
    }
}

/// The levels of a `c`×`h`×`w` image: sizes, tile sides and data offsets.
fn layout(c: usize, h: usize, w: usize) -> (Vec<Level>, usize, usize) {
    let sizes = pyramid_sizes(h, w, PYRAMID_MIN_SIDE);
    let tiles: usize = sizes
        .iter()
        .map(|&(h, w)| {
            let t = TILE.min(h.max(w).next_power_of_two());
            h.div_ceil(t) * w.div_ceil(t)
        })
        .sum();
    let header = FIXED_HEADER + LEVEL_ENTRY * sizes.len() + 4 * tiles + 4;
    let mut offset = header.next_multiple_of(DATA_ALIGN);
    let mut first_tile = 0;
    let levels = sizes
        .iter()
        .map(|&(h, w)| {
            let tile = TILE.min(h.max(w).next_power_of_two());
            let l = Level {
                h,
                w,
                tile,
                tiles_y: h.div_ceil(tile),
                tiles_x: w.div_ceil(tile),
                offset,
                first_tile,
            };
            offset += l.tiles_y * l.tiles_x * l.tile_bytes(c);
            first_tile += l.tiles_y * l.tiles_x;
            l
        })
        .collect();
    (levels, header, offset)
}

/// Round to the nearest of 256 levels (`+ 0.5` then truncation: `round`
/// without its libm call, the same for non-negative values).
fn quantize(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0 + 0.5) as u8
}

/// Write `src` (its level 0; the pyramid is rebuilt here) as a tiled file at
/// `path`, atomically (temporary file, then rename). Level 0 is read in
/// bands of one tile row, so memory stays at a few bands whatever the size.
/// Returns the file's size and identity.
pub fn write_tiled(path: &Path, src: &dyn ImageSource) -> Result<Written> {
    let tmp = path.with_extension("tiles.tmp");
    let written = write_tiled_to(&tmp, src);
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    let total = written?;
    fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    Ok(total)
}

/// Give `file` its `len` bytes by writing zeros: with `set_len` the blocks
/// would be allocated only when the map is written, and a full disk would
/// then kill the process with SIGBUS instead of returning an error.
fn reserve(file: &mut File, len: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        file.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    file.flush()
}

/// A tiled file written.
#[derive(Clone, Copy, Debug)]
pub struct Written {
    pub bytes: u64,
    /// [`TiledImage::identity`] of the file.
    pub identity: u32,
}

/// [`write_tiled`]'s work, into the temporary file `tmp`.
fn write_tiled_to(tmp: &Path, src: &dyn ImageSource) -> Result<Written> {
    let c = src.channels();
    let (h, w) = src.size();
    let (levels, header_len, total) = layout(c, h, w);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    reserve(&mut file, total as u64)
        .with_context(|| format!("cannot write {} ({total} bytes; disk full?)", tmp.display()))?;
    // SAFETY: the file was just created by us and is not shared while mapped.
    let mut map =
        unsafe { MmapMut::map_mut(&file) }.with_context(|| format!("cannot map {}", tmp.display()))?;
    let mut crcs = vec![0u32; levels.iter().map(|l| l.tiles_y * l.tiles_x).sum()];

    // Each level's rows not yet written, per channel.
    let mut pending: Vec<(usize, Vec<Vec<f32>>)> = levels.iter().map(|_| (0, vec![Vec::new(); c])).collect();
    let mut written = vec![0usize; levels.len()]; // tile rows written per level
    let band = levels[0].tile;
    let mut buf = Vec::new();
    for y0 in (0..h).step_by(band) {
        let n = band.min(h - y0);
        buf.resize(c * n * w, 0.0);
        src.read_region(0, y0 as i64, 0, n, w, &mut buf)?;
        let chans = buf.chunks(n * w).map(<[f32]>::to_vec).collect();
        push_rows(
            &levels,
            0,
            n,
            chans,
            &mut pending,
            &mut written,
            &mut map,
            &mut crcs,
            false,
        );
    }
    for l in 0..levels.len() {
        push_rows(
            &levels,
            l,
            0,
            vec![Vec::new(); c],
            &mut pending,
            &mut written,
            &mut map,
            &mut crcs,
            true,
        );
    }

    let mut head = Vec::with_capacity(header_len);
    head.extend_from_slice(MAGIC);
    for v in [VERSION, c as u32, TILE as u32, levels.len() as u32] {
        head.extend_from_slice(&v.to_le_bytes());
    }
    head.extend_from_slice(&(h as u64).to_le_bytes());
    head.extend_from_slice(&(w as u64).to_le_bytes());
    for l in &levels {
        head.extend_from_slice(&(l.h as u64).to_le_bytes());
        head.extend_from_slice(&(l.w as u64).to_le_bytes());
        for v in [l.tile, l.tiles_y, l.tiles_x, 0] {
            head.extend_from_slice(&(v as u32).to_le_bytes());
        }
        head.extend_from_slice(&(l.offset as u64).to_le_bytes());
    }
    crcs.iter()
        .for_each(|crc| head.extend_from_slice(&crc.to_le_bytes()));
    let crc = crc32fast::hash(&head);
    head.extend_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(head.len(), header_len);
    map[..header_len].copy_from_slice(&head);
    map.flush()
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    Ok(Written {
        bytes: total as u64,
        identity: crc,
    })
}

/// Append `n` rows (per channel) to `level`; write every complete tile row
/// (all rows when `flush`) and pass its area downsample to the next level.
#[allow(clippy::too_many_arguments)]
fn push_rows(
    levels: &[Level],
    level: usize,
    n: usize,
    rows: Vec<Vec<f32>>,
    pending: &mut [(usize, Vec<Vec<f32>>)],
    written: &mut [usize],
    map: &mut [u8],
    crcs: &mut [u32],
    flush: bool,
) {
    let lv = levels[level];
    let c = rows.len();
    {
        let (count, buf) = &mut pending[level];
        for (b, r) in buf.iter_mut().zip(rows) {
            b.extend(r);
        }
        *count += n;
    }
    loop {
        let (count, buf) = &mut pending[level];
        if *count < lv.tile && !(flush && *count > 0) {
            break;
        }
        let take = lv.tile.min(*count);
        // Quantize this tile row as stored; the next level is made from it.
        let chunk: Vec<Vec<u8>> = buf
            .iter_mut()
            .map(|b| b.drain(..take * lv.w).map(quantize).collect())
            .collect();
        *count -= take;
        let ty = written[level];
        written[level] += 1;
        for tx in 0..lv.tiles_x {
            let index = ty * lv.tiles_x + tx;
            let start = lv.offset + index * lv.tile_bytes(c);
            let tile = &mut map[start..start + lv.tile_bytes(c)];
            let (x0, x1) = (tx * lv.tile, ((tx + 1) * lv.tile).min(lv.w));
            for (ch, data) in chunk.iter().enumerate() {
                for y in 0..take {
                    tile[(ch * lv.tile + y) * lv.tile..][..x1 - x0]
                        .copy_from_slice(&data[y * lv.w + x0..y * lv.w + x1]);
                }
            }
            crcs[lv.first_tile + index] = crc32fast::hash(tile);
        }
        if level + 1 < levels.len() {
            let down: Vec<Vec<f32>> = chunk
                .iter()
                .map(|d| {
                    let stored: Vec<f32> = d.iter().map(|&v| v as f32 / 255.0).collect();
                    downsample2(&stored, 1, take, lv.w)
                })
                .collect();
            let n2 = take.div_ceil(2);
            push_rows(levels, level + 1, n2, down, pending, written, map, crcs, false);
        }
    }
}

/// One tiled image file, memory-mapped.
pub struct TiledImage {
    path: PathBuf,
    map: Mmap,
    channels: usize,
    levels: Vec<Level>,
    crc_table: usize,
    identity: u32,
    bytes_read: AtomicU64,
}

impl TiledImage {
    /// Map `path` and check its header; tiles are checked as they are read.
    pub fn open(path: &Path) -> Result<TiledImage> {
        let fix = "re-create it with `saccade data import` or `saccade data generate`";
        crate::files::ensure_regular(path)
            .with_context(|| format!("tiled image {}; {fix}", path.display()))?;
        let file = File::open(path).with_context(|| format!("cannot open tiled image {}", path.display()))?;
        // SAFETY: store files are written once (atomically renamed) and only read afterwards.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let bad = |what: String| anyhow::anyhow!("tiled image {} {what}; {fix}", path.display());
        if map.len() < FIXED_HEADER {
            return Err(bad(format!(
                "is truncated: {} bytes, shorter than its header",
                map.len()
            )));
        }
        if &map[..8] != MAGIC {
            return Err(bad("is not a saccade tiled image (bad magic)".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(map[o..o + 4].try_into().unwrap()) as usize;
        let u64_at = |o: usize| u64::from_le_bytes(map[o..o + 8].try_into().unwrap()) as usize;
        let version = u32_at(8);
        if version != VERSION as usize {
            return Err(bad(format!(
                "has format version {version}, this build reads {VERSION}"
            )));
        }
        let (c, nlev, h, w) = (u32_at(12), u32_at(20), u64_at(24), u64_at(32));
        if c == 0 || h == 0 || w == 0 || nlev == 0 || nlev > 64 || h > 1 << 24 || w > 1 << 24 {
            return Err(bad(format!(
                "has an implausible header ({c} channels, {h}x{w}, {nlev} levels)"
            )));
        }
        let (levels, header_len, total) = layout(c, h, w);
        if map.len() < header_len {
            return Err(bad(format!(
                "is truncated: {} bytes, its header alone needs {header_len}",
                map.len()
            )));
        }
        let stored = u32_at(header_len - 4) as u32;
        if crc32fast::hash(&map[..header_len - 4]) != stored || levels.len() != nlev {
            return Err(bad("has a corrupt header (checksum mismatch)".into()));
        }
        for (i, l) in levels.iter().enumerate() {
            let e = FIXED_HEADER + i * LEVEL_ENTRY;
            let got = (u64_at(e), u64_at(e + 8), u32_at(e + 16), u64_at(e + 32));
            if got != (l.h, l.w, l.tile, l.offset) {
                return Err(bad(format!("has an inconsistent level table at level {i}")));
            }
        }
        if map.len() != total {
            return Err(bad(format!(
                "is truncated or padded: {} bytes, its header says {total}",
                map.len()
            )));
        }
        Ok(TiledImage {
            path: path.to_path_buf(),
            map,
            channels: c,
            crc_table: FIXED_HEADER + LEVEL_ENTRY * levels.len(),
            identity: stored,
            levels,
            bytes_read: AtomicU64::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header's CRC, which covers every tile's CRC: two files with the
    /// same identity hold the same pixels (up to CRC collisions).
    pub fn identity(&self) -> u32 {
        self.identity
    }

    /// The bytes of tile `(ty, tx)` of `level`, after checking its CRC.
    fn tile(&self, level: usize, ty: usize, tx: usize) -> Result<&[u8]> {
        let l = &self.levels[level];
        let index = ty * l.tiles_x + tx;
        let size = l.tile_bytes(self.channels);
        let bytes = &self.map[l.offset + index * size..][..size];
        let at = self.crc_table + 4 * (l.first_tile + index);
        let want = u32::from_le_bytes(self.map[at..at + 4].try_into().unwrap());
        ensure!(
            crc32fast::hash(bytes) == want,
            "tiled image {}: tile ({ty}, {tx}) of level {level} fails its checksum, the file is corrupt; \
             re-create it with `saccade data import` or `saccade data generate`",
            self.path.display()
        );
        self.bytes_read.fetch_add(size as u64, Ordering::Relaxed);
        Ok(bytes)
    }
}

impl ImageSource for TiledImage {
    fn channels(&self) -> usize {
        self.channels
    }

    fn levels(&self) -> usize {
        self.levels.len()
    }

    fn level_size(&self, level: usize) -> (usize, usize) {
        (self.levels[level].h, self.levels[level].w)
    }

    fn read_region(&self, level: usize, y0: i64, x0: i64, h: usize, w: usize, out: &mut [f32]) -> Result<()> {
        ensure!(
            level < self.levels.len(),
            "{}: level {level} out of range ({} levels)",
            self.path.display(),
            self.levels.len()
        );
        let c = self.channels;
        ensure!(
            out.len() == c * h * w,
            "tiled read_region: output buffer holds {} values, {c}x{h}x{w} needs {}",
            out.len(),
            c * h * w
        );
        out.fill(0.0);
        let l = self.levels[level];
        let clip =
            |a: i64, n: usize, len: usize| (a.max(0) as usize, (a + n as i64).clamp(0, len as i64) as usize);
        let ((ya, yb), (xa, xb)) = (clip(y0, h, l.h), clip(x0, w, l.w));
        if ya >= yb || xa >= xb {
            return Ok(());
        }
        let t = l.tile;
        for ty in ya / t..=(yb - 1) / t {
            for tx in xa / t..=(xb - 1) / t {
                let tile = self.tile(level, ty, tx)?;
                let (ty0, tx0) = (ty * t, tx * t);
                let (ys, ye) = (ya.max(ty0), yb.min(ty0 + t));
                let (xs, xe) = (xa.max(tx0), xb.min(tx0 + t));
                for ch in 0..c {
                    for y in ys..ye {
                        let src = &tile[(ch * t + y - ty0) * t + xs - tx0..][..xe - xs];
                        let row = (ch * h + (y as i64 - y0) as usize) * w + (xs as i64 - x0) as usize;
                        for (o, &v) in out[row..row + xe - xs].iter_mut().zip(src) {
                            *o = v as f32 / 255.0;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }
}

/// One image of a store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub split: Split,
    /// One per task of [`Manifest::tasks`] (see [`Sample::labels`]).
    pub labels: Vec<usize>,
    /// Path relative to the store folder.
    pub file: String,
    /// The file's [`TiledImage::identity`] (none in manifests before
    /// version 4, and for images not stored as tiles).
    pub identity: Option<u32>,
}

/// A store's `manifest.tsv`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub channels: usize,
    pub size: (usize, usize),
    pub tasks: Vec<TaskSpec>,
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// Whether the tasks are one single-label task named [`DEFAULT_TASK`],
    /// which version 2 holds: such a store is written as before, readable
    /// by builds that predate several tasks.
    fn single_task(&self) -> bool {
        matches!(self.tasks.as_slice(), [t] if t.name == DEFAULT_TASK && !t.multi_label)
    }

    /// Write `manifest.tsv` into `dir`, after the checks [`Manifest::read`]
    /// makes, so that no store is written that cannot be read back.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST);
        self.check(&path)?;
        crate::files::write_atomic(&path, self.text().as_bytes())
    }

    /// The manifest's text, CRC line first. Version 4, or 2 (readable by
    /// builds before tasks and identities) for one task without identities.
    fn text(&self) -> String {
        let version = if self.single_task() && self.entries.iter().all(|e| e.identity.is_none()) {
            2
        } else {
            4
        };
        let mut s = format!(
            "channels\t{}\nsize\t{}\t{}\n",
            self.channels, self.size.0, self.size.1
        );
        for t in &self.tasks {
            if version == 4 {
                let kind = if t.multi_label { "multi" } else { "single" };
                s += &format!("task\t{}\t{kind}\n", t.name);
            }
            for c in &t.class_names {
                s += &format!("class\t{c}\n");
            }
        }
        for e in &self.entries {
            let labels: Vec<String> = e.labels.iter().map(usize::to_string).collect();
            s += &format!("image\t{}\t{}\t{}", e.split.name(), labels.join("\t"), e.file);
            if version == 4 {
                s += &e
                    .identity
                    .map_or("\t-".to_string(), |c| format!("\tcrc32={c:08x}"));
            }
            s += "\n";
        }
        format!(
            "{MANIFEST_MAGIC}\t{version}\tcrc32={:08x}\n{s}",
            crc32fast::hash(s.as_bytes())
        )
    }

    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text = crate::files::read_regular(&path)
            .and_then(|b| Ok(String::from_utf8(b)?))
            .with_context(|| {
            format!(
                "{} is not a saccade store: cannot read {}; make one with `saccade data import` or `saccade data generate`",
                dir.display(),
                path.display()
            )
        })?;
        let (head, body) = text.split_once('\n').unwrap_or((&text, ""));
        let version = match head.split('\t').collect::<Vec<_>>().as_slice() {
            [MANIFEST_MAGIC, "1"] => 1,
            [MANIFEST_MAGIC, v @ ("2" | "3" | "4"), crc] => {
                let crc = crc
                    .strip_prefix("crc32=")
                    .and_then(|h| u32::from_str_radix(h, 16).ok());
                ensure!(
                    crc == Some(crc32fast::hash(body.as_bytes())),
                    "{}: checksum mismatch: the manifest is truncated or corrupt; write the store again",
                    path.display()
                );
                v.parse::<u32>().expect("matched digits")
            }
            _ => bail!(
                "{}: first line must be `{MANIFEST_MAGIC}<TAB>4<TAB>crc32=XXXXXXXX` (or version 3, 2 or 1), \
                 is `{}`; this build reads store manifests of versions 1 to 4",
                path.display(),
                head.replace('\t', "<TAB>")
            ),
        };
        let mut m = Manifest {
            channels: 0,
            size: (0, 0),
            tasks: Vec::new(),
            entries: Vec::new(),
        };
        for (i, line) in body.lines().enumerate() {
            let f: Vec<&str> = line.split('\t').collect();
            let bad = || anyhow::anyhow!("{} line {}: cannot parse `{line}`", path.display(), i + 2);
            let num = |s: &str| s.parse::<usize>().map_err(|_| bad());
            match f.as_slice() {
                ["channels", c] => m.channels = num(c)?,
                ["size", h, w] => m.size = (num(h)?, num(w)?),
                ["task", name, kind @ ("single" | "multi")] if version >= 3 => m.tasks.push(TaskSpec {
                    name: name.to_string(),
                    class_names: Vec::new(),
                    multi_label: *kind == "multi",
                }),
                ["class", name] => {
                    // Versions 1 and 2 hold one task, named by no line.
                    if version < 3 && m.tasks.is_empty() {
                        m.tasks.push(TaskSpec::single(DEFAULT_TASK, Vec::new()));
                    }
                    let task = m.tasks.last_mut().ok_or_else(bad)?;
                    task.class_names.push(name.to_string());
                }
                ["image", split, rest @ ..] if rest.len() >= 2 + usize::from(version == 4) => {
                    let (labels, file, identity) = match rest {
                        [labels @ .., file, id] if version == 4 => {
                            let id = match *id {
                                "-" => None,
                                id => Some(
                                    id.strip_prefix("crc32=")
                                        .and_then(|h| u32::from_str_radix(h, 16).ok())
                                        .ok_or_else(bad)?,
                                ),
                            };
                            (labels, file, id)
                        }
                        [labels @ .., file] => (labels, file, None),
                        [] => return Err(bad()),
                    };
                    m.entries.push(Entry {
                        split: Split::parse(split).map_err(|_| bad())?,
                        labels: labels.iter().map(|l| num(l)).collect::<Result<_>>()?,
                        file: file.to_string(),
                        identity,
                    })
                }
                [""] => {}
                _ => return Err(bad()),
            }
        }
        m.check(&path)?;
        Ok(m)
    }

    /// What every manifest holds: a shape, tasks with classes and distinct
    /// names, and per image one label per task within its classes.
    fn check(&self, path: &Path) -> Result<()> {
        ensure!(
            self.channels > 0
                && self.size.0 > 0
                && self.size.1 > 0
                && !self.tasks.is_empty()
                && self.tasks.iter().all(|t| t.num_classes() > 0),
            "{}: missing channels, size, tasks or classes",
            path.display()
        );
        for (i, t) in self.tasks.iter().enumerate() {
            let printable = |s: &str| !s.is_empty() && !s.chars().any(char::is_control);
            ensure!(
                printable(&t.name) && t.class_names.iter().all(|c| printable(c)),
                "{}: task `{}` has an empty name or a tab, newline or other control character in its \
                 name or a class name",
                path.display(),
                t.name
            );
            ensure!(
                !self.tasks[..i].iter().any(|u| u.name == t.name),
                "{}: two tasks are named `{}`",
                path.display(),
                t.name
            );
            ensure!(
                !t.multi_label || t.num_classes() <= MAX_MULTI_LABEL_CLASSES,
                "{}: multi-label task `{}` has {} classes, more than the {MAX_MULTI_LABEL_CLASSES} allowed",
                path.display(),
                t.name,
                t.num_classes()
            );
        }
        let mut files = std::collections::HashSet::new();
        for e in &self.entries {
            let inside = !e.file.is_empty()
                && Path::new(&e.file)
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
            ensure!(
                inside,
                "{}: image `{}` is not a path inside the store (no `..`, no absolute path): the manifest \
                 is not one saccade wrote; re-create the store with `saccade data import`",
                path.display(),
                e.file
            );
            ensure!(
                files.insert(e.file.as_str()),
                "{}: image `{}` is listed twice: the manifest is not one saccade wrote; re-create the store",
                path.display(),
                e.file
            );
            ensure!(
                e.labels.len() == self.tasks.len(),
                "{}: image {} has {} labels but there are {} tasks",
                path.display(),
                e.file,
                e.labels.len(),
                self.tasks.len()
            );
            for (t, &label) in self.tasks.iter().zip(&e.labels) {
                let n = t.num_classes();
                let fits = if t.multi_label {
                    n >= MAX_MULTI_LABEL_CLASSES || label >> n == 0
                } else {
                    label < n
                };
                ensure!(
                    fits,
                    "{}: image {} has label {label} in task `{}`, beyond its {n} classes{}",
                    path.display(),
                    e.file,
                    t.name,
                    if t.multi_label {
                        " (a multi-label task's label is a bitmask)"
                    } else {
                        ""
                    }
                );
            }
        }
        Ok(())
    }
}

/// One split of a store, as a dataset.
pub struct StoreDataset {
    dir: PathBuf,
    manifest: Arc<Manifest>,
    /// Indices into `manifest.entries` of this split.
    items: Vec<usize>,
    split: Split,
    proxy: Arc<dyn ProxyMaker>,
}

impl StoreDataset {
    pub fn open(dir: &Path, split: Split, proxy_size: usize, noise: f32, seed: u64) -> Result<StoreDataset> {
        let manifest = Manifest::read(dir)?;
        let items: Vec<usize> = (0..manifest.entries.len())
            .filter(|&i| manifest.entries[i].split == split)
            .collect();
        let proxy = Arc::new(AreaProxy {
            channels: manifest.channels,
            size: proxy_size,
            noise,
            seed: mix_seed(&[seed, split as u64]),
        });
        Ok(StoreDataset {
            dir: dir.to_path_buf(),
            manifest: Arc::new(manifest),
            items,
            split,
            proxy,
        })
    }

    /// Replace the proxy (the hook for a proxy of another modality).
    pub fn with_proxy(mut self, proxy: Arc<dyn ProxyMaker>) -> StoreDataset {
        self.proxy = proxy;
        self
    }

    /// The opened image of sample `i`.
    pub fn image(&self, i: usize) -> Result<TiledImage> {
        let e = &self.manifest.entries[self.items[i]];
        let img = TiledImage::open(&self.dir.join(&e.file))?;
        if let Some(want) = e.identity.filter(|&w| w != img.identity()) {
            bail!(
                "{} is not the image the store's manifest lists there (its checksum is {:08x}, the \
                 manifest's {want:08x}): files were swapped or replaced; re-create the store with \
                 `saccade data import` or `saccade data generate`",
                img.path().display(),
                img.identity()
            );
        }
        ensure!(
            img.channels() == self.manifest.channels && img.size() == self.manifest.size,
            "{}: {}x{}x{} but the manifest says {}x{}x{}",
            img.path().display(),
            img.channels(),
            img.size().0,
            img.size().1,
            self.manifest.channels,
            self.manifest.size.0,
            self.manifest.size.1
        );
        Ok(img)
    }
}

impl Dataset for StoreDataset {
    fn len(&self) -> usize {
        self.items.len()
    }

    fn num_classes(&self) -> usize {
        self.manifest.tasks[0].num_classes()
    }

    fn class_names(&self) -> Vec<String> {
        self.manifest.tasks[0].class_names.clone()
    }

    fn tasks(&self) -> Vec<TaskSpec> {
        self.manifest.tasks.clone()
    }

    fn channels(&self) -> usize {
        self.manifest.channels
    }

    fn image_size(&self) -> (usize, usize) {
        self.manifest.size
    }

    fn proxy_shape(&self) -> (usize, usize) {
        self.proxy.shape()
    }

    fn get(&self, i: usize) -> Result<Sample> {
        ensure!(
            i < self.len(),
            "sample {i} out of range: {} has {} samples",
            self.describe(),
            self.len()
        );
        let image = Arc::new(self.image(i)?);
        Ok(Sample {
            proxy: self.proxy.make(i, image.as_ref())?,
            labels: self.manifest.entries[self.items[i]].labels.clone(),
            image,
        })
    }

    fn describe(&self) -> String {
        let (h, w) = self.manifest.size;
        let labels = match self.manifest.tasks.as_slice() {
            [t] => format!("{} classes", t.num_classes()),
            tasks => format!("{} tasks", tasks.len()),
        };
        format!(
            "store {} ({h}x{w}x{}, {labels}), {} split, {} images",
            self.dir.display(),
            self.manifest.channels,
            self.split.name(),
            self.items.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::cluttered::{Mode, SceneConfig, SceneDataset, Task};
    use crate::data::mnist::{tests::mnist, MnistSplit};
    use crate::data::source::InMemoryImage;
    use crate::ops::sampler::choose_level;

    /// On a full disk the store's writer returns an error naming the cause
    /// (before, the mapped writes died with SIGBUS) and leaves no temporary
    /// file. Needs a 200 KB tmpfs, so root; skipped with the reason otherwise.
    #[test]
    fn a_full_disk_is_an_error_and_leaves_no_temporary_file() {
        let Some(disk) = crate::files::small_disk::SmallDisk::mount("200k") else {
            return;
        };
        // 1 MB of pixels (1.3 MB with the pyramid) for 200 KB of disk.
        let img = InMemoryImage::new(vec![0.5; 1024 * 1024], 1, 1024, 1024, 1).unwrap();
        let e = write_tiled(&disk.path().join("big.tiles"), &img).unwrap_err();
        assert!(format!("{e:#}").contains("disk full"), "{e:#}");
        let left: Vec<_> = fs::read_dir(disk.path()).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    fn full(src: &dyn ImageSource, level: usize) -> Vec<f32> {
        let (h, w) = src.level_size(level);
        let mut out = vec![0.0; src.channels() * h * w];
        src.read_region(level, 0, 0, h, w, &mut out).unwrap();
        out
    }

    fn random_image(c: usize, h: usize, w: usize, seed: u64) -> InMemoryImage {
        let data = (0..c * h * w)
            .map(|i| (mix_seed(&[seed, i as u64]) % 256) as f32 / 255.0)
            .collect();
        InMemoryImage::new(data, c, h, w, usize::MAX).unwrap()
    }

    #[test]
    fn store_regions_equal_crops_and_levels_are_area_downsamples() {
        let dir = tempfile::tempdir().unwrap();
        // Odd sizes, several tiles per row at level 0, three channels.
        let src = random_image(3, 601, 530, 1);
        let path = dir.path().join("a.tiles");
        let bytes = write_tiled(&path, &src).unwrap();
        let img = TiledImage::open(&path).unwrap();
        assert_eq!(bytes.bytes, fs::metadata(&path).unwrap().len());
        assert_eq!(img.levels(), pyramid_sizes(601, 530, PYRAMID_MIN_SIDE).len());
        // Level 0 is the source, quantized to u8 (the source already is).
        assert_eq!(full(&img, 0), src.level_data(0));
        for level in 0..img.levels() {
            let whole = full(&img, level);
            let (h, w) = img.level_size(level);
            if level + 1 < img.levels() {
                // The next level is the area downsample of this one, rounded to u8.
                let want = downsample2(&whole, 3, h, w);
                let got = full(&img, level + 1);
                let err = want
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(err <= 0.5 / 255.0 + 1e-6, "level {} off by {err}", level + 1);
            }
            let mem = InMemoryImage::new(whole, 3, h, w, usize::MAX).unwrap();
            for (y0, x0, rh, rw) in [
                (250, 250, 20, 300),
                (-5, w as i64 - 7, 270, 9),
                (h as i64, 0, 3, 3),
            ] {
                let n = 3 * rh * rw;
                let (mut a, mut b) = (vec![7.0; n], vec![0.0; n]);
                img.read_region(level, y0, x0, rh, rw, &mut a).unwrap();
                mem.read_region(0, y0, x0, rh, rw, &mut b).unwrap();
                assert_eq!(a, b, "level {level} region ({y0},{x0}) {rh}x{rw}");
            }
        }
    }

    #[test]
    fn store_of_a_procedural_image_equals_it() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SceneConfig::large(Task::Pair, 700, Mode::Native);
        let ds = SceneDataset::new(cfg, Split::Test, 2, 1, mnist(MnistSplit::Test), 32, 0.0).unwrap();
        let src = ds.image(0).unwrap();
        let path = dir.path().join("p.tiles");
        write_tiled(&path, src.as_ref()).unwrap();
        let img = TiledImage::open(&path).unwrap();
        let (a, b) = (full(&img, 0), full(src.as_ref(), 0));
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 0.5 / 255.0 + 1e-6));
        let (mut r, mut s) = (vec![0.0; 40 * 50], vec![0.0; 40 * 50]);
        img.read_region(0, 300, 280, 40, 50, &mut r).unwrap();
        src.read_region(0, 300, 280, 40, 50, &mut s).unwrap();
        assert!(r.iter().zip(&s).all(|(x, y)| (x - y).abs() <= 0.5 / 255.0 + 1e-6));
    }

    #[test]
    fn truncated_or_corrupt_files_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.tiles");
        write_tiled(&path, &random_image(1, 300, 300, 2)).unwrap();
        let good = fs::read(&path).unwrap();
        let err_of = |bytes: &[u8]| {
            fs::write(&path, bytes).unwrap();
            match TiledImage::open(&path) {
                Err(e) => e.to_string(),
                Ok(img) => (0..img.levels())
                    .find_map(|l| {
                        img.read_region(l, 0, 0, 300, 300, &mut vec![0.0; 300 * 300])
                            .err()
                    })
                    .expect("corruption went unnoticed")
                    .to_string(),
            }
        };
        for (what, bytes, needle) in [
            ("truncated", good[..good.len() - 1000].to_vec(), "truncated"),
            ("cut in the header", good[..30].to_vec(), "truncated"),
            ("empty", Vec::new(), "truncated"),
            ("bad magic", [b"PNG".as_slice(), &good[3..]].concat(), "magic"),
            ("header bit flip", flip(&good, 45), "corrupt header"),
            (
                "tile bit flip",
                flip(&good, good.len() - 70_000),
                "fails its checksum",
            ),
        ] {
            let err = err_of(&bytes);
            assert!(err.contains("img.tiles") && err.contains(needle), "{what}: {err}");
        }
        fs::remove_file(&path).unwrap();
        assert!(TiledImage::open(&path)
            .err()
            .unwrap()
            .to_string()
            .contains("img.tiles"));
    }

    /// Random truncations and byte flips of a tile file: every one is a
    /// clean error or reads back exactly the original pixels, never a panic.
    #[test]
    fn damaged_tile_files_fail_cleanly_or_read_identically() {
        use rand::{Rng, SeedableRng};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.tiles");
        // Two levels of several tiles each, and edge tiles.
        write_tiled(&path, &random_image(2, 300, 520, 5)).unwrap();
        let good = fs::read(&path).unwrap();
        let pixels = |img: &TiledImage| -> Result<Vec<Vec<f32>>> {
            (0..img.levels())
                .map(|l| {
                    let (h, w) = img.level_size(l);
                    let mut out = vec![0.0; 2 * h * w];
                    img.read_region(l, 0, 0, h, w, &mut out).map(|()| out)
                })
                .collect()
        };
        let want = pixels(&TiledImage::open(&path).unwrap()).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let bad = dir.path().join("bad.tiles");
        // The header and CRC table end at the last non-zero byte before the
        // padding that aligns the tile data.
        let header = good[..DATA_ALIGN].iter().rposition(|&b| b != 0).unwrap() + 1;
        for case in 0..90 {
            let mut bytes = good.clone();
            let must_fail = match case % 3 {
                0 => {
                    bytes.truncate(rng.random_range(0..good.len()));
                    true
                }
                1 => {
                    bytes[rng.random_range(0..header)] ^= rng.random_range(1..=255u8);
                    true
                }
                // Anywhere, padding included, where a flip may be immaterial.
                _ => {
                    bytes[rng.random_range(0..good.len())] ^= rng.random_range(1..=255u8);
                    false
                }
            };
            fs::write(&bad, &bytes).unwrap();
            let read = std::panic::catch_unwind(|| TiledImage::open(&bad).and_then(|img| pixels(&img)));
            match read {
                Err(_) => panic!("case {case}: reading panicked"),
                Ok(Err(_)) => {}
                Ok(Ok(got)) => {
                    assert!(
                        !must_fail,
                        "case {case}: a truncated file or damaged header was read"
                    );
                    assert!(got == want, "case {case}: read other pixels");
                }
            }
        }
    }

    /// Random truncations and byte flips of a manifest: every one is an
    /// error, never a store with other images, splits or labels.
    #[test]
    fn damaged_manifests_are_refused() {
        use rand::SeedableRng;
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        for m in [manifest(1), manifest(3)] {
            m.write(dir.path()).unwrap();
            let good = fs::read(dir.path().join(MANIFEST)).unwrap();
            damage_manifest(dir.path(), &good, &mut rng);
        }
    }

    /// A store of one single-label task named `class` is written exactly as
    /// before several tasks (version 2), and the stores of earlier builds
    /// (versions 1 and 2) read as that one task.
    #[test]
    fn single_task_stores_keep_version_2_and_old_stores_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = manifest(1);
        m.entries.truncate(2);
        m.tasks[0].class_names.truncate(2);
        m.write(dir.path()).unwrap();
        let body = "channels\t1\nsize\t64\t64\nclass\tclass 0\nclass\tclass 1\n\
                    image\ttrain\t0\timages/0000000.tiles\nimage\tvalid\t1\timages/0000001.tiles\n";
        let v2 = format!(
            "saccade-store\t2\tcrc32={:08x}\n{body}",
            crc32fast::hash(body.as_bytes())
        );
        assert_eq!(fs::read_to_string(dir.path().join(MANIFEST)).unwrap(), v2);
        for old in [v2, format!("saccade-store\t1\n{body}")] {
            fs::write(dir.path().join(MANIFEST), old).unwrap();
            let got = Manifest::read(dir.path()).unwrap();
            assert_eq!(got, m);
            assert_eq!(got.tasks[0].name, DEFAULT_TASK);
        }
        // A single task of another name or a multi-label one needs version 4.
        for (name, multi_label) in [("kind", false), (DEFAULT_TASK, true)] {
            m.tasks[0].name = name.into();
            m.tasks[0].multi_label = multi_label;
            m.write(dir.path()).unwrap();
            let text = fs::read_to_string(dir.path().join(MANIFEST)).unwrap();
            assert!(text.starts_with("saccade-store\t4\t"), "{text}");
            assert_eq!(Manifest::read(dir.path()).unwrap(), m);
        }
    }

    /// Several tasks read back as written, through the dataset too; labels
    /// beyond a task's classes are refused when written and when read.
    #[test]
    fn stores_of_several_tasks_read_back_and_bad_labels_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = manifest(3);
        m.entries.truncate(3);
        fs::create_dir(dir.path().join("images")).unwrap();
        for e in &m.entries {
            write_tiled(&dir.path().join(&e.file), &random_image(1, 64, 64, 3)).unwrap();
        }
        m.write(dir.path()).unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap(), m);
        let ds = StoreDataset::open(dir.path(), Split::Valid, 8, 0.0, 0).unwrap();
        assert_eq!(ds.tasks(), m.tasks);
        assert_eq!(
            (ds.len(), ds.num_classes(), ds.class_names()[11].as_str()),
            (1, 12, "class 11")
        );
        assert_eq!(ds.get(0).unwrap().labels, vec![1, 1, 1]);
        assert!(ds.describe().contains("3 tasks"), "{}", ds.describe());

        for (task, label, needle) in [
            (0, 12, "label 12 in task `class`, beyond its 12 classes"),
            (
                1,
                32,
                "label 32 in task `tags`, beyond its 5 classes (a multi-label",
            ),
            (2, 3, "label 3 in task `size`"),
        ] {
            let mut bad = m.clone();
            bad.entries[2].labels[task] = label;
            let err = bad.write(dir.path()).unwrap_err().to_string();
            assert!(err.contains(needle) && err.contains("0000002.tiles"), "{err}");
            // The manifest a build without the check would write.
            fs::write(dir.path().join(MANIFEST), bad.text()).unwrap();
            let err = Manifest::read(dir.path()).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        let mut dup = m.clone();
        dup.tasks[2].name = "tags".into();
        let err = dup.write(dir.path()).unwrap_err().to_string();
        assert!(err.contains("two tasks are named `tags`"), "{err}");
        let mut short = m.clone();
        short.entries[0].labels.pop();
        let err = short.write(dir.path()).unwrap_err().to_string();
        assert!(err.contains("has 2 labels but there are 3 tasks"), "{err}");
    }

    /// A manifest of 40 images and the first `tasks` of: 12 classes, single
    /// label; 5 classes, multi-label; 3 classes, single label.
    fn manifest(tasks: usize) -> Manifest {
        let all = [
            TaskSpec::single(DEFAULT_TASK, (0..12).map(|c| format!("class {c}")).collect()),
            TaskSpec {
                name: "tags".into(),
                class_names: ["a", "b", "c", "d", "e"].map(String::from).to_vec(),
                multi_label: true,
            },
            TaskSpec::single("size", ["s", "m", "l"].map(String::from).to_vec()),
        ];
        Manifest {
            channels: 1,
            size: (64, 64),
            tasks: all[..tasks].to_vec(),
            entries: (0..40)
                .map(|i| Entry {
                    split: [Split::Train, Split::Valid, Split::Test][i % 3],
                    labels: [i % 12, i % 32, i % 3][..tasks].to_vec(),
                    file: format!("images/{i:07}.tiles"),
                    identity: None,
                })
                .collect(),
        }
    }

    /// Write 80 truncations and byte flips of the manifest `good` into `dir`:
    /// each must fail to read.
    fn damage_manifest(dir: &Path, good: &[u8], rng: &mut rand::rngs::StdRng) {
        use rand::Rng;
        for case in 0..80 {
            let mut bytes = good.to_vec();
            if case % 2 == 0 {
                bytes.truncate(rng.random_range(0..good.len()));
            } else {
                bytes[rng.random_range(0..good.len())] ^= rng.random_range(1..=255u8);
            }
            fs::write(dir.join(MANIFEST), &bytes).unwrap();
            match std::panic::catch_unwind(|| Manifest::read(dir)) {
                Err(_) => panic!("case {case}: reading the manifest panicked"),
                Ok(Err(_)) => {}
                Ok(Ok(got)) => panic!("case {case}: a damaged manifest was read: {got:?}"),
            }
        }
    }

    /// The paper's claim behind the store: reading a crop costs the same
    /// whatever the image size, because it is read at the pyramid level that
    /// matches the crop's output resolution and so touches at most 2×2 tiles.
    #[test]
    fn bytes_read_per_crop_do_not_grow_from_2528_to_16384() {
        let dir = tempfile::tempdir().unwrap();
        let bound = 4 * (TILE * TILE) as u64;
        for size in [2528, 16384] {
            let cfg = SceneConfig::large(Task::Pair, size, Mode::Native);
            let ds = SceneDataset::new(cfg, Split::Test, 4, 1, mnist(MnistSplit::Test), 32, 0.0).unwrap();
            let path = dir.path().join(format!("{size}.tiles"));
            write_tiled(&path, ds.image(0).unwrap().as_ref()).unwrap();
            let img = TiledImage::open(&path).unwrap();
            // The same crops relative to the image: scale (fraction of the side) and centre.
            for (scale, cy, cx) in [
                (0.3, 0.5, 0.5),
                (0.1, 0.23, 0.71),
                (0.05, 0.9, 0.1),
                (0.02, 0.37, 0.37),
            ] {
                let extent = scale * size as f64;
                let level = choose_level(&img, scale as f32, 32);
                let k = img.level_size(level).0 as f64 / size as f64;
                // The window at that level plus a one-pixel margin, as the localized transformer reads it.
                let side = (extent * k).ceil() as usize + 2;
                let y0 = ((cy * size as f64 - extent / 2.0) * k).floor() as i64 - 1;
                let x0 = ((cx * size as f64 - extent / 2.0) * k).floor() as i64 - 1;
                let before = img.bytes_read();
                img.read_region(level, y0, x0, side, side, &mut vec![0.0; side * side])
                    .unwrap();
                let bytes = img.bytes_read() - before;
                // The same crop read at full resolution would touch this many tiles.
                let tiles = |a: f64| ((a + extent) as usize).div_ceil(TILE) - a as usize / TILE;
                let level0 = tiles(cy * size as f64 - extent / 2.0) * tiles(cx * size as f64 - extent / 2.0);
                eprintln!(
                    "{size}² crop at scale {scale}: level {level}, {side}² px, {bytes} bytes read \
                     (at level 0: {} bytes)",
                    level0 * TILE * TILE
                );
                assert!(
                    bytes <= bound,
                    "{size}² crop at scale {scale} read {bytes} bytes > {bound}"
                );
            }
        }
    }

    fn flip(bytes: &[u8], at: usize) -> Vec<u8> {
        let mut b = bytes.to_vec();
        b[at] ^= 0x10;
        b
    }

    #[test]
    fn store_dataset_reads_manifest_and_reports_problems() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("images")).unwrap();
        let mut entries = Vec::new();
        for (i, split) in [Split::Train, Split::Train, Split::Test].into_iter().enumerate() {
            let file = format!("images/{i}.tiles");
            let written = write_tiled(&dir.path().join(&file), &random_image(1, 64, 64, i as u64)).unwrap();
            entries.push(Entry {
                split,
                labels: vec![i % 2],
                file,
                identity: Some(written.identity),
            });
        }
        let m = Manifest {
            channels: 1,
            size: (64, 64),
            tasks: vec![TaskSpec::single(
                DEFAULT_TASK,
                vec!["cat".into(), "dog house".into()],
            )],
            entries,
        };
        m.write(dir.path()).unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap(), m);
        let ds = StoreDataset::open(dir.path(), Split::Train, 8, 0.0, 0).unwrap();
        assert_eq!((ds.len(), ds.num_classes(), ds.image_size()), (2, 2, (64, 64)));
        let s = ds.get(1).unwrap();
        assert_eq!((s.label(), s.proxy.len()), (1, 64));
        assert_eq!(ds.class_names()[1], "dog house");

        // Two files swapped: each is refused as not the image listed there
        // (it was read silently: 87.5% instead of 100% in eval).
        let (a, b) = (
            dir.path().join("images/0.tiles"),
            dir.path().join("images/1.tiles"),
        );
        let tmp = dir.path().join("images/swap");
        fs::rename(&a, &tmp).unwrap();
        fs::rename(&b, &a).unwrap();
        fs::rename(&tmp, &b).unwrap();
        for i in 0..2 {
            let err = format!("{:#}", ds.get(i).err().expect("a swapped file is refused"));
            assert!(
                err.contains("swapped") && err.contains(&format!("images/{i}.tiles")),
                "{err}"
            );
        }
        // A manifest pointing outside the store or listing a file twice.
        for file in [
            "../0.tiles",
            "/tmp/0.tiles",
            "images/../../0.tiles",
            "images/1.tiles",
        ] {
            let mut bad = m.clone();
            bad.entries[0].file = file.into();
            let e = bad.write(dir.path()).unwrap_err().to_string();
            let want = if file == "images/1.tiles" {
                "listed twice"
            } else {
                "inside the store"
            };
            assert!(e.contains(want), "{file}: {e}");
        }

        fs::remove_file(dir.path().join("images/1.tiles")).unwrap();
        let err = format!("{:#}", ds.get(1).err().unwrap());
        assert!(err.contains("images/1.tiles"), "{err}");
        fs::write(
            dir.path().join(MANIFEST),
            format!("{MANIFEST_MAGIC}\t1\nchannels\tx\n"),
        )
        .unwrap();
        let err = StoreDataset::open(dir.path(), Split::Train, 8, 0.0, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("manifest.tsv line 2"), "{err}");
        let err = StoreDataset::open(&dir.path().join("nope"), Split::Train, 8, 0.0, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not a saccade store"), "{err}");
    }
}
