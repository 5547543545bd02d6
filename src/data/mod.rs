//! Data: image sources (in memory, procedural, tiled store), datasets and
//! loaders.
//!
//! - [`source`]: the [`ImageSource`] trait (read a region at a pyramid level).
//! - [`mnist`]: the vendored, checksummed MNIST digits.
//! - [`cluttered`]: the generated tasks (cluttered two-digit identification,
//!   two-digit sum, one-digit cluttered) at 100² and as procedural large images.
//! - [`megapixel`]: megapixel MNIST (attention sampling's and IPS's
//!   benchmark, four tasks per image), rendered from its 55 boxes at a cost
//!   that does not grow with the canvas.
//! - [`store`]: the tiled pyramid store on disk, read through memmap2.
//! - [`decode`]: PNG/JPEG/TIFF files as image sources, within a memory budget.
//! - [`labels`]: the images an import takes and their labels (class
//!   subfolders or a labels CSV).
//! - [`proxy`]: the small proxy images the saccade model looks at.
//! - [`loader`]: shuffled, prefetched batches.
//! - [`spec`]: dataset names (`cluttered-mnist@2528:native`,
//!   `megapixel-mnist@6000`, a store path)
//!   to [`Dataset`]s, shared by every command.
//! - [`commands`]: `saccade data generate|import|inspect`.

pub mod cluttered;
pub mod commands;
pub mod decode;
pub mod font;
pub mod labels;
pub mod loader;
pub mod megapixel;
pub mod mnist;
pub mod proxy;
pub mod relabel;
pub mod source;
pub mod spec;
pub mod store;

use std::sync::Arc;

use anyhow::{ensure, Result};

pub use loader::{Batch, Loader, LoaderConfig};
pub use proxy::{AreaProxy, ProxyMaker};
pub use source::{ImageSource, InMemoryImage};
pub use spec::{open_dataset, DataConfig, SplitSizes};

/// Which part of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Valid,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Valid, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }

    pub fn parse(s: &str) -> Result<Split> {
        Split::ALL
            .into_iter()
            .find(|sp| sp.name() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown split `{s}`: expected train, valid or test"))
    }
}

/// One example: the image (read by region, never needed whole), its proxy
/// (CHW, `proxy_shape`), and one label per task of [`Dataset::tasks`].
#[derive(Clone)]
pub struct Sample {
    pub image: Arc<dyn ImageSource>,
    pub proxy: Vec<f32>,
    /// Per task: the class index, or for a multi-label task the bitmask of
    /// the classes present (bit `k` = class `k`).
    pub labels: Vec<usize>,
}

impl Sample {
    /// The first task's label: the class of a single-task dataset.
    pub fn label(&self) -> usize {
        self.labels[0]
    }
}

/// Most images of one split a command takes: a hundred million, a day of
/// training at 1 000 images/s; the order and labels of a split this large
/// already take 800 MB each (4 294 967 296 asked for 32 GiB and aborted).
pub const MAX_SPLIT_IMAGES: usize = 100_000_000;

/// Refuse a split size above [`MAX_SPLIT_IMAGES`], naming `flag`.
pub fn check_split_size(flag: &str, n: usize) -> Result<()> {
    ensure!(
        n <= MAX_SPLIT_IMAGES,
        "{flag} must be at most {MAX_SPLIT_IMAGES} images, got {n}"
    );
    Ok(())
}

/// Most classes of a multi-label task: its label is a bitmask in a `usize`.
pub const MAX_MULTI_LABEL_CLASSES: usize = usize::BITS as usize;

/// One of a dataset's labelling tasks (`majority`, `multi`, ...); a
/// single-task dataset has one, named [`DEFAULT_TASK`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TaskSpec {
    pub name: String,
    pub class_names: Vec<String>,
    /// Any number of classes per image (presence), scored by a sigmoid
    /// per class; otherwise exactly one, scored by a softmax.
    #[serde(default)]
    pub multi_label: bool,
}

/// The task name of single-task datasets.
pub const DEFAULT_TASK: &str = "class";

impl TaskSpec {
    pub fn single(name: &str, class_names: Vec<String>) -> TaskSpec {
        TaskSpec {
            name: name.to_string(),
            class_names,
            multi_label: false,
        }
    }

    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// The classes a label holds: itself, or a multi-label task's bits.
    pub fn classes_of(&self, label: usize) -> Vec<usize> {
        if self.multi_label {
            (0..self.num_classes()).filter(|k| label >> k & 1 == 1).collect()
        } else {
            vec![label]
        }
    }

    /// A label as text: its class name, or a multi-label task's names
    /// separated by spaces (`0 5 8`).
    pub fn describe_label(&self, label: usize) -> String {
        let names: Vec<&str> = self
            .classes_of(label)
            .into_iter()
            .map(|k| self.class_names.get(k).map_or("?", |s| s.as_str()))
            .collect();
        names.join(" ")
    }
}

/// A split of a dataset: indexed samples with fixed image and proxy shapes.
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Classes of the (first) task.
    fn num_classes(&self) -> usize;

    /// Human-readable class names (`"3+7"` for the pair task), `num_classes` long.
    /// Of the first task when there are several.
    fn class_names(&self) -> Vec<String>;

    /// The labelling tasks, in the order of [`Sample::labels`]: by default
    /// one single-label task over `class_names`.
    fn tasks(&self) -> Vec<TaskSpec> {
        vec![TaskSpec::single(DEFAULT_TASK, self.class_names())]
    }

    fn channels(&self) -> usize;

    /// `(height, width)` of every image at full resolution.
    fn image_size(&self) -> (usize, usize);

    /// `(channels, side)` of the proxies.
    fn proxy_shape(&self) -> (usize, usize);

    /// Sample `i`; the same `i` gives the same sample every time.
    fn get(&self, i: usize) -> Result<Sample>;

    /// Sample `i` varied by `draw` (training augmentation), its labels
    /// unchanged; `get(i)` where the dataset has no variations.
    fn get_varied(&self, i: usize, _draw: u64) -> Result<Sample> {
        self.get(i)
    }

    /// Whether [`Dataset::get_varied`] varies anything.
    fn varies(&self) -> bool {
        false
    }

    /// One line saying what this is, for logs.
    fn describe(&self) -> String;

    /// Centres `[x, y]` of the objects that make sample `i`'s label, in
    /// normalized image coordinates (`[-1, 1]`, the glimpses' convention),
    /// when the dataset knows them (generated tasks): glimpse coverage.
    fn object_centres(&self, _i: usize) -> Option<Vec<[f32; 2]>> {
        None
    }
}

/// Mix several values into one well-spread 64-bit seed (SplitMix64 finalizer
/// over a running hash), so per-sample random streams are independent and
/// stable across versions of the `rand` crates.
pub fn mix_seed(parts: &[u64]) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    for &p in parts {
        h = (h ^ p).wrapping_add(0x9e37_79b9_7f4a_7c15);
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
    }
    h
}
