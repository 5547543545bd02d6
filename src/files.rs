//! Files written whole or not at all: a temporary file in the same folder,
//! flushed to disk, then renamed over the target, so a crash, a kill or a
//! full disk never leaves a truncated checkpoint, metrics file, manifest or
//! picture. Below every other module: it uses none of them.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use image::RgbImage;

/// Replace `path` with `bytes` whole or not at all: a temporary file in the
/// same folder, flushed to disk before it is renamed over `path` (else a
/// crash can leave the new name on an empty file); removed if anything fails.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut name = path.file_name().context("a file name")?.to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let written = (|| -> Result<()> {
        let mut f = fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    // The rename itself is durable once the folder is flushed (unix only).
    #[cfg(unix)]
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// Refuse what is not a regular file (following links) before it is
/// opened: opening a FIFO blocks until a writer comes, a device never ends.
pub fn ensure_regular(path: &Path) -> Result<()> {
    let meta = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    anyhow::ensure!(
        meta.is_file(),
        "{} is not a regular file (a folder, FIFO, socket or device): give the path of a file",
        path.display()
    );
    Ok(())
}

/// The bytes of `path`, refused first if it is not a regular file (see
/// [`ensure_regular`]).
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    ensure_regular(path)?;
    fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Write `img` as a PNG whole or not at all (encoded in memory, then
/// [`write_atomic`]): a full disk or a kill
/// never leaves a truncated picture. The error names the file.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .context("encoding a PNG")?;
    write_atomic(path, &png).with_context(|| format!("writing {} (is the folder writable?)", path.display()))
}

/// A small tmpfs for tests of a full disk.
#[cfg(test)]
pub(crate) mod small_disk {
    use std::path::Path;
    use std::process::Command;

    /// A tmpfs of `size` (as `mount -o size=` reads it) in a temporary
    /// folder, unmounted on drop.
    pub struct SmallDisk(tempfile::TempDir);

    impl SmallDisk {
        /// `None`, with the reason printed, where mounting needs a root this
        /// process is not.
        pub fn mount(size: &str) -> Option<SmallDisk> {
            let dir = tempfile::tempdir().unwrap();
            let mounted = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .output()
                .is_ok_and(|o| o.status.success());
            if !mounted {
                println!("skipped: cannot mount a small tmpfs here (needs root)");
            }
            mounted.then_some(SmallDisk(dir))
        }

        pub fn path(&self) -> &Path {
            self.0.path()
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0.path()).output();
        }
    }
}
