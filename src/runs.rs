//! Run folders: every `saccade train` without `--out` writes into a new
//! folder `runs/<UTC time>` and points `runs/latest` at it, so no run
//! replaces another; a folder given with `--out` is checked before any work.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

/// The files a run writes into its folder.
pub const CHECKPOINT: &str = "checkpoint.safetensors";
pub const METRICS: &str = "metrics.jsonl";
pub const SACCADES: &str = "saccades.png";
/// The metrics again, as CSV, and the run's whole configuration.
pub const METRICS_CSV: &str = "metrics.csv";
pub const CONFIG: &str = "config.json";

/// Whether `dir` holds a run: a checkpoint or metrics file.
pub fn holds_run(dir: &Path) -> bool {
    [CHECKPOINT, METRICS]
        .iter()
        .any(|f| fs::symlink_metadata(dir.join(f)).is_ok_and(|m| !m.is_dir()))
}

/// `YYYYMMDD-HHMMSS` of `t`, UTC.
pub fn stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, s) = ((secs / 86_400) as i64, secs % 86_400);
    // The civil date of a day count (Howard Hinnant's days_from_civil, inverted).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Create `root/<name>`, or `root/<name>-2`, `-3`... if taken.
pub fn fresh_dir(root: &Path, name: &str) -> Result<PathBuf> {
    fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    for k in 1.. {
        let dir = match k {
            1 => root.join(name),
            _ => root.join(format!("{name}-{k}")),
        };
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
        }
    }
    unreachable!("the loop returns")
}

/// Point `root/latest` at `dir`, a folder in `root`: a new link renamed over
/// the old one, so `latest` always names a whole run. Returns false, and
/// leaves it alone, when `latest` is a real folder (earlier versions wrote
/// runs there) or the platform has no symlinks.
pub fn point_latest(root: &Path, dir: &Path) -> Result<bool> {
    let latest = root.join("latest");
    if fs::symlink_metadata(&latest).is_ok_and(|m| !m.file_type().is_symlink()) {
        return Ok(false);
    }
    link_over(&latest, dir)
}

#[cfg(unix)]
fn link_over(latest: &Path, dir: &Path) -> Result<bool> {
    let target = dir.file_name().context("a run folder has a name")?;
    let tmp = latest.with_file_name(format!(".latest.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    if let Err(e) = fs::rename(&tmp, latest) {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot replace {}", latest.display()));
    }
    Ok(true)
}

#[cfg(not(unix))]
fn link_over(_: &Path, _: &Path) -> Result<bool> {
    Ok(false)
}

/// `p`, or where it points when it is a symlink (so `runs/latest` names the
/// run it points at now, not whichever run it points at later).
pub fn resolve_link(p: &Path) -> PathBuf {
    match fs::read_link(p) {
        Ok(t) if t.is_relative() => p.parent().unwrap_or(Path::new("")).join(t),
        Ok(t) => t,
        Err(_) => p.to_path_buf(),
    }
}

/// Fail unless a file can be created in `dir` (created if need be) and the
/// run's own files are not folders: checked before training, not after it.
pub fn check_writable(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create the output folder {}: choose another --out",
            dir.display()
        )
    })?;
    let probe = dir.join(format!(".write-probe.{}", std::process::id()));
    fs::write(&probe, b"").with_context(|| {
        format!(
            "cannot write in the output folder {}: choose another --out",
            dir.display()
        )
    })?;
    fs::remove_file(&probe).with_context(|| format!("cannot remove {}", probe.display()))?;
    for f in [CHECKPOINT, METRICS, SACCADES, METRICS_CSV, CONFIG] {
        let p = dir.join(f);
        if p.is_dir() {
            bail!(
                "{} is a folder where the run writes a file: remove it or choose another --out",
                p.display()
            );
        }
    }
    Ok(())
}

/// Held while a run writes into its folder (an exclusive advisory lock on
/// the folder itself, released when the process ends, however it ends).
pub struct RunLock {
    _folder: fs::File,
}

/// Lock `dir` for this run: a second `saccade train` onto the same folder
/// is refused, where the two overwrote each other's files and one died on a
/// rename, its epoch lost.
pub fn lock(dir: &Path) -> Result<RunLock> {
    let f =
        fs::File::open(dir).with_context(|| format!("cannot open the output folder {}", dir.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(RunLock { _folder: f }),
        Err(fs::TryLockError::WouldBlock) => bail!(
            "another saccade is training into {} right now: wait for it to finish, or choose another --out",
            dir.display()
        ),
        Err(fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock the output folder {}", dir.display()))
        }
    }
}

/// Remove the run in `dir` (for `--overwrite`).
pub fn clear_run(dir: &Path) -> Result<()> {
    for f in [CHECKPOINT, METRICS, SACCADES, METRICS_CSV, CONFIG] {
        let p = dir.join(f);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {}", p.display()))
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stamps_are_utc_civil_time() {
        assert_eq!(stamp(UNIX_EPOCH), "19700101-000000");
        // 2024-02-29T23:59:58Z, a leap day.
        assert_eq!(
            stamp(UNIX_EPOCH + Duration::from_secs(1_709_251_198)),
            "20240229-235958"
        );
        assert_eq!(
            stamp(UNIX_EPOCH + Duration::from_secs(1_767_225_600)),
            "20260101-000000"
        );
    }

    #[test]
    fn fresh_dirs_never_reuse_a_folder() {
        let root = tempfile::tempdir().unwrap();
        let a = fresh_dir(root.path(), "x").unwrap();
        let b = fresh_dir(root.path(), "x").unwrap();
        let c = fresh_dir(root.path(), "x").unwrap();
        assert_eq!(a, root.path().join("x"));
        assert_eq!(b, root.path().join("x-2"));
        assert_eq!(c, root.path().join("x-3"));
    }

    #[cfg(unix)]
    #[test]
    fn latest_follows_the_newest_run_but_an_old_latest_folder_is_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let a = fresh_dir(root.path(), "a").unwrap();
        let b = fresh_dir(root.path(), "b").unwrap();
        fs::write(b.join(CHECKPOINT), b"b").unwrap();
        assert!(point_latest(root.path(), &a).unwrap());
        assert!(point_latest(root.path(), &b).unwrap());
        let latest = root.path().join("latest");
        assert_eq!(fs::read(latest.join(CHECKPOINT)).unwrap(), b"b");
        assert_eq!(resolve_link(&latest), b);

        let old = tempfile::tempdir().unwrap();
        fs::create_dir(old.path().join("latest")).unwrap();
        assert!(!point_latest(old.path(), &a).unwrap());
        assert!(old.path().join("latest").is_dir());
    }

    #[test]
    fn a_metrics_folder_is_refused_before_training() {
        let dir = tempfile::tempdir().unwrap();
        check_writable(dir.path()).unwrap();
        assert!(!holds_run(dir.path()));
        fs::create_dir(dir.path().join(METRICS)).unwrap();
        let e = check_writable(dir.path()).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl is a folder"), "{e}");
        let file = dir.path().join("f");
        fs::write(&file, b"").unwrap();
        let e = format!("{:#}", check_writable(&file.join("out")).unwrap_err());
        assert!(e.contains("cannot create the output folder"), "{e}");
    }
}
