//! The vendored MNIST digits (`datasets/mnist/`, gzip IDX files). Every file is
//! checked against the MD5 of its uncompressed bytes published with the data,
//! so a missing, truncated or altered file is an error that names the file and
//! the fix instead of a silently different dataset.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use flate2::read::GzDecoder;
use md5::{Digest, Md5};

pub const SIDE: usize = 28;
pub const PIXELS: usize = SIDE * SIDE;

/// Environment variable naming a folder with the four IDX files, for running
/// the binary away from the repository.
pub const DIR_ENV: &str = "SACCADE_MNIST";

/// `(file name, MD5 of the uncompressed bytes)`, as in `datasets/mnist/MD5SUMS.uncompressed`.
pub const FILES: [(&str, &str); 4] = [
    ("train-images.idx3-ubyte.gz", "6bbc9ace898e44ae57da46a324031adb"),
    ("train-labels.idx1-ubyte.gz", "a25bea736e30d166cdddb491f175f624"),
    ("t10k-images.idx3-ubyte.gz", "2646ac647ad5339dbf082846283269ea"),
    ("t10k-labels.idx1-ubyte.gz", "27ae3e4e09519cfbb04c329615203637"),
];

/// Which MNIST file pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MnistSplit {
    /// 60,000 digits; the generators draw train and valid digits from it.
    Train,
    /// 10,000 digits; the generators draw test digits from it.
    Test,
}

/// One MNIST split: `len` 28×28 u8 digits and their labels.
pub struct Mnist {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Mnist {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The 28×28 pixels of digit `i`, row-major.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * PIXELS..(i + 1) * PIXELS]
    }

    /// Load and verify one split from `dir`.
    pub fn load(dir: &Path, split: MnistSplit) -> Result<Mnist> {
        let (img_file, lbl_file) = match split {
            MnistSplit::Train => (FILES[0], FILES[1]),
            MnistSplit::Test => (FILES[2], FILES[3]),
        };
        let images = read_idx(dir, img_file, 0x0803)?;
        let labels = read_idx(dir, lbl_file, 0x0801)?;
        let n = labels.len();
        let img_path = dir.join(img_file.0);
        ensure!(
            images.len() == n * PIXELS,
            "{}: holds {} bytes of pixels, but {n} labels need {} (mismatched files?)",
            img_path.display(),
            images.len(),
            n * PIXELS
        );
        if let Some(bad) = labels.iter().find(|&&l| l > 9) {
            bail!("{}: label {bad} is not a digit", dir.join(lbl_file.0).display());
        }
        Ok(Mnist { images, labels })
    }
}

/// Where the MNIST files are: `$SACCADE_MNIST`, else `datasets/mnist` under
/// the working directory, else the one in the source tree the binary was built from.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(DIR_ENV) {
        return PathBuf::from(d);
    }
    let local = PathBuf::from("datasets/mnist");
    if local.is_dir() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/mnist")
}

/// Decompress one IDX file, check its MD5 and magic, and return the payload
/// after the header.
fn read_idx(dir: &Path, (name, md5): (&str, &str), magic: u32) -> Result<Vec<u8>> {
    let path = dir.join(name);
    let restore = format!(
        "restore it with `git checkout -- datasets/mnist/{name}` or point ${DIR_ENV} at a folder holding the four MNIST files"
    );
    let file = File::open(&path)
        .with_context(|| format!("MNIST file {} cannot be opened; {restore}", path.display()))?;
    let mut raw = Vec::new();
    GzDecoder::new(file).read_to_end(&mut raw).with_context(|| {
        format!(
            "MNIST file {} is not valid gzip (corrupt or truncated); {restore}",
            path.display()
        )
    })?;
    let got = format!("{:x}", Md5::digest(&raw));
    ensure!(
        got == md5,
        "MNIST file {} is corrupt: MD5 of its uncompressed bytes is {got}, expected {md5}; {restore}",
        path.display()
    );
    // Header: magic, then one big-endian u32 per dimension.
    let dims = (magic & 0xff) as usize;
    let header = 4 + 4 * dims;
    ensure!(
        raw.len() >= header,
        "MNIST file {} is too short for its header",
        path.display()
    );
    let be = |i: usize| u32::from_be_bytes(raw[4 * i..4 * i + 4].try_into().unwrap());
    ensure!(
        be(0) == magic,
        "MNIST file {}: magic {:#x}, expected {magic:#x} (images and labels swapped?)",
        path.display(),
        be(0)
    );
    let count: usize = (1..=dims).map(|i| be(i) as usize).product();
    ensure!(
        raw.len() == header + count,
        "MNIST file {}: header promises {count} bytes, file has {}",
        path.display(),
        raw.len() - header
    );
    raw.drain(..header);
    Ok(raw)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, OnceLock};

    /// Both splits, loaded once per test binary.
    pub(crate) fn mnist(split: MnistSplit) -> Arc<Mnist> {
        static TRAIN: OnceLock<Arc<Mnist>> = OnceLock::new();
        static TEST: OnceLock<Arc<Mnist>> = OnceLock::new();
        let cell = if split == MnistSplit::Train { &TRAIN } else { &TEST };
        cell.get_or_init(|| Arc::new(Mnist::load(&default_dir(), split).unwrap()))
            .clone()
    }

    #[test]
    fn mnist_loads_and_checks() {
        let train = mnist(MnistSplit::Train);
        let test = mnist(MnistSplit::Test);
        assert_eq!((train.len(), test.len()), (60_000, 10_000));
        // The first training digit of MNIST is a 5, the first test digit a 7.
        assert_eq!((train.labels[0], test.labels[0]), (5, 7));
        assert!(train.image(0).contains(&255));
    }

    #[test]
    fn mnist_missing_or_corrupt_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = Mnist::load(dir.path(), MnistSplit::Test)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("t10k-images.idx3-ubyte.gz") && err.contains("cannot be opened"),
            "{err}"
        );

        // A valid gzip whose content is altered by one byte fails the MD5.
        let src = default_dir();
        for (name, _) in &FILES[2..] {
            std::fs::copy(src.join(name), dir.path().join(name)).unwrap();
        }
        let mut raw = Vec::new();
        GzDecoder::new(File::open(src.join(FILES[3].0)).unwrap())
            .read_to_end(&mut raw)
            .unwrap();
        raw[100] ^= 1;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &raw).unwrap();
        std::fs::write(dir.path().join(FILES[3].0), enc.finish().unwrap()).unwrap();
        let err = Mnist::load(dir.path(), MnistSplit::Test)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("t10k-labels.idx1-ubyte.gz") && err.contains("MD5"),
            "{err}"
        );

        // A truncated gzip is reported as such.
        let bytes = std::fs::read(src.join(FILES[2].0)).unwrap();
        std::fs::write(dir.path().join(FILES[2].0), &bytes[..bytes.len() / 2]).unwrap();
        let err = format!("{:#}", Mnist::load(dir.path(), MnistSplit::Test).err().unwrap());
        assert!(
            err.contains("t10k-images.idx3-ubyte.gz") && err.contains("gzip"),
            "{err}"
        );
    }
}
