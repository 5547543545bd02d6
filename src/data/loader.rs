//! Batches for training and evaluation: a shuffled order per epoch (from the
//! seed and the epoch number, so runs repeat), samples made on background
//! threads, and a bounded queue per thread so at most
//! `workers × (prefetch + 1)` batches exist ahead of the consumer.
//!
//! Workers build host buffers only; tensors are made on the consuming thread,
//! where the device (and its CUDA context, on a GPU) lives.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, ensure, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::source::ImageSource;
use super::{mix_seed, Dataset};
use crate::device::Device;
use crate::tensor::Tensor;

const AUGMENT_STREAM: u64 = 0x4155_474d;

#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub shuffle: bool,
    pub seed: u64,
    /// Background threads making batches; 0 makes them on the calling thread.
    pub workers: usize,
    /// Finished batches each worker may hold (at least 1).
    pub prefetch: usize,
    /// Skip the last batch when it is short.
    pub drop_last: bool,
    /// Load whole images into [`Batch::images`] when an image has at most this
    /// many pixels (256² by default: the 100² tasks yes, 2528² no).
    pub max_resident_pixels: usize,
    /// Vary the samples each epoch ([`Dataset::get_varied`]).
    pub augment: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 64,
            shuffle: true,
            seed: 0,
            workers: 1,
            prefetch: 2,
            drop_last: false,
            max_resident_pixels: 256 * 256,
            augment: false,
        }
    }
}

/// A batch of `B` samples.
pub struct Batch {
    /// Each image, to read crops from.
    pub sources: Vec<Arc<dyn ImageSource>>,
    /// `[B, C, H, W]` full images, when small enough to keep resident.
    pub images: Option<Tensor>,
    /// `[B, C, J, J]`.
    pub proxies: Tensor,
    /// `targets[task][sample]`: the samples' labels (see [`super::Sample::labels`]).
    pub targets: Vec<Vec<usize>>,
    /// Dataset indices of the samples.
    pub indices: Vec<usize>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The first task's labels: the classes of a single-task dataset.
    pub fn labels(&self) -> &[usize] {
        &self.targets[0]
    }
}

/// What a worker sends: a batch without its tensors.
struct HostBatch {
    sources: Vec<Arc<dyn ImageSource>>,
    images: Option<Vec<f32>>,
    proxies: Vec<f32>,
    targets: Vec<Vec<usize>>,
    indices: Vec<usize>,
}

pub struct Loader {
    dataset: Arc<dyn Dataset>,
    cfg: LoaderConfig,
    device: Device,
}

impl Loader {
    pub fn new(dataset: Arc<dyn Dataset>, cfg: LoaderConfig, device: &Device) -> Result<Loader> {
        ensure!(cfg.batch_size > 0, "loader: batch size must be at least 1");
        ensure!(
            !dataset.is_empty(),
            "loader: {} has no samples",
            dataset.describe()
        );
        Ok(Loader {
            dataset,
            cfg,
            device: device.clone(),
        })
    }

    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.dataset
    }

    pub fn num_batches(&self) -> usize {
        let n = self.dataset.len();
        if self.cfg.drop_last {
            n / self.cfg.batch_size
        } else {
            n.div_ceil(self.cfg.batch_size)
        }
    }

    /// The sample order of `epoch`.
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.cfg.shuffle {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(&[
                self.cfg.seed,
                epoch as u64,
            ])));
        }
        order
    }

    /// The batches of `epoch`, in order; dropping the iterator stops the workers.
    pub fn epoch(&self, epoch: usize) -> Epoch {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` from batch `first` on (resuming mid-epoch):
    /// the same batches the whole epoch would give after its first `first`.
    pub fn epoch_from(&self, epoch: usize, first: usize) -> Epoch {
        let order = self.order(epoch);
        let batches: Vec<Vec<usize>> = order
            .chunks(self.cfg.batch_size)
            .take(self.num_batches())
            .skip(first)
            .map(<[usize]>::to_vec)
            .collect();
        let total = batches.len();
        let resident = {
            let (h, w) = self.dataset.image_size();
            h * w <= self.cfg.max_resident_pixels
        };
        let batches = Arc::new(batches);
        let draw = self
            .cfg
            .augment
            .then(|| mix_seed(&[self.cfg.seed, epoch as u64, AUGMENT_STREAM]));
        let mut receivers = Vec::new();
        let mut handles = Vec::new();
        let workers = self.cfg.workers.min(total);
        for w in 0..workers {
            let (tx, rx) = sync_channel(self.cfg.prefetch.max(1));
            let (ds, batches) = (self.dataset.clone(), batches.clone());
            handles.push(std::thread::spawn(move || {
                for b in (w..batches.len()).step_by(workers) {
                    let batch = make_batch(ds.as_ref(), &batches[b], resident, draw);
                    let failed = batch.is_err();
                    // The consumer hung up: stop.
                    if tx.send(batch).is_err() || failed {
                        return;
                    }
                }
            }));
            receivers.push(rx);
        }
        Epoch {
            receivers,
            handles,
            dataset: self.dataset.clone(),
            batches,
            resident,
            draw,
            shape: {
                let ds = &self.dataset;
                let ((h, w), (pc, j)) = (ds.image_size(), ds.proxy_shape());
                (ds.channels(), h, w, pc, j)
            },
            next: 0,
            total,
            device: self.device.clone(),
        }
    }
}

fn make_batch(ds: &dyn Dataset, indices: &[usize], resident: bool, draw: Option<u64>) -> Result<HostBatch> {
    let c = ds.channels();
    let (h, w) = ds.image_size();
    let (pc, j) = ds.proxy_shape();
    let mut out = HostBatch {
        sources: Vec::with_capacity(indices.len()),
        images: resident.then(|| vec![0.0; indices.len() * c * h * w]),
        proxies: Vec::with_capacity(indices.len() * pc * j * j),
        targets: vec![Vec::with_capacity(indices.len()); ds.tasks().len()],
        indices: indices.to_vec(),
    };
    for (k, &i) in indices.iter().enumerate() {
        let s = match draw {
            Some(d) => ds.get_varied(i, d)?,
            None => ds.get(i)?,
        };
        ensure!(
            s.proxy.len() == pc * j * j && s.image.channels() == c && s.image.size() == (h, w),
            "{}: sample {i} does not have the dataset's image or proxy shape",
            ds.describe()
        );
        if let Some(images) = &mut out.images {
            s.image
                .read_region(0, 0, 0, h, w, &mut images[k * c * h * w..(k + 1) * c * h * w])?;
        }
        out.proxies.extend_from_slice(&s.proxy);
        ensure!(
            s.labels.len() == out.targets.len(),
            "{}: sample {i} has {} labels for {} tasks",
            ds.describe(),
            s.labels.len(),
            out.targets.len()
        );
        for (t, &l) in out.targets.iter_mut().zip(&s.labels) {
            t.push(l);
        }
        out.sources.push(s.image);
    }
    Ok(out)
}

/// The batches of one epoch.
pub struct Epoch {
    receivers: Vec<Receiver<Result<HostBatch>>>,
    handles: Vec<JoinHandle<()>>,
    /// Made here when there are no workers.
    dataset: Arc<dyn Dataset>,
    batches: Arc<Vec<Vec<usize>>>,
    resident: bool,
    /// The epoch's variation of the samples, when augmenting.
    draw: Option<u64>,
    /// Image channels, height, width; proxy channels, side.
    shape: (usize, usize, usize, usize, usize),
    next: usize,
    total: usize,
    device: Device,
}

impl Epoch {
    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    fn to_batch(&self, host: HostBatch) -> Result<Batch> {
        let (c, h, w, pc, j) = self.shape;
        let b = host.indices.len();
        let images = match host.images {
            Some(data) => Some(Tensor::from_vec(data, &[b, c, h, w], &self.device)?),
            None => None,
        };
        Ok(Batch {
            sources: host.sources,
            images,
            proxies: Tensor::from_vec(host.proxies, &[b, pc, j, j], &self.device)?,
            targets: host.targets,
            indices: host.indices,
        })
    }
}

impl Iterator for Epoch {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.total {
            return None;
        }
        let k = self.next;
        self.next += 1;
        let host = if self.receivers.is_empty() {
            make_batch(self.dataset.as_ref(), &self.batches[k], self.resident, self.draw)
        } else {
            let rx = &self.receivers[k % self.receivers.len()];
            rx.recv()
                .unwrap_or_else(|_| Err(anyhow!("loader: a worker thread stopped early")))
        };
        let result = host.and_then(|host| self.to_batch(host));
        if result.is_err() {
            self.next = self.total;
        }
        Some(result)
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        // Hang up first so blocked workers see it, then wait for them.
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::cluttered::{mnist_split, SceneConfig, SceneDataset, Task};
    use crate::data::mnist::tests::mnist;
    use crate::data::proxy::ProxyMaker;
    use crate::data::Split;

    fn dataset(n: usize) -> Arc<SceneDataset> {
        let m = mnist(mnist_split(Split::Valid));
        Arc::new(SceneDataset::new(SceneConfig::base(Task::Single), Split::Valid, 1, n, m, 16, 0.0).unwrap())
    }

    fn cfg(workers: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size: 8,
            workers,
            prefetch: 1,
            seed: 3,
            ..LoaderConfig::default()
        }
    }

    #[test]
    fn loader_batches_are_shuffled_complete_and_match_the_dataset() {
        let ds = dataset(30);
        let dev = Device::cpu();
        let loader = Loader::new(ds.clone(), cfg(2), &dev).unwrap();
        assert_eq!(loader.num_batches(), 4);
        let batches: Vec<Batch> = loader.epoch(0).map(Result::unwrap).collect();
        let seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
        assert_eq!(seen, loader.order(0));
        assert_ne!(loader.order(0), loader.order(1));
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(sorted, (0..30).collect::<Vec<_>>());
        assert_ne!(seen, sorted, "not shuffled");
        let b = &batches[3];
        assert_eq!(b.len(), 6);
        assert_eq!(b.proxies.shape(), &[6, 1, 16, 16]);
        let images = b.images.as_ref().unwrap();
        assert_eq!(images.shape(), &[6, 1, 100, 100]);
        // Same contents as asking the dataset directly.
        let s = ds.get(b.indices[2]).unwrap();
        assert_eq!(b.labels()[2], s.label());
        assert_eq!(&b.proxies.cpu().unwrap()[2 * 256..3 * 256], s.proxy.as_slice());
        let mut img = vec![0.0; 100 * 100];
        s.image.read_region(0, 0, 0, 100, 100, &mut img).unwrap();
        assert_eq!(&images.cpu().unwrap()[2 * 10_000..3 * 10_000], img.as_slice());
        // Workers or none, the batches are the same.
        let inline: Vec<Vec<usize>> = Loader::new(ds, cfg(0), &dev)
            .unwrap()
            .epoch(0)
            .map(|b| b.unwrap().labels().to_vec())
            .collect();
        assert_eq!(
            inline,
            batches.iter().map(|b| b.labels().to_vec()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn loader_stops_cleanly_and_reports_errors() {
        let dev = Device::cpu();
        let loader = Loader::new(dataset(40), cfg(2), &dev).unwrap();
        // Dropping an epoch half-way joins its workers.
        let mut epoch = loader.epoch(0);
        epoch.next().unwrap().unwrap();
        drop(epoch);

        /// A proxy that fails on one sample.
        struct Failing;
        impl ProxyMaker for Failing {
            fn shape(&self) -> (usize, usize) {
                (1, 4)
            }
            fn make(&self, index: usize, _: &dyn ImageSource) -> Result<Vec<f32>> {
                ensure!(index != 5, "no proxy for sample 5");
                Ok(vec![0.5; 16])
            }
        }
        let m = mnist(mnist_split(Split::Test));
        let ds = SceneDataset::new(SceneConfig::base(Task::Pair), Split::Test, 0, 16, m, 32, 0.0).unwrap();
        let ds = Arc::new(ds.with_proxy(Arc::new(Failing)));
        let cfg = LoaderConfig {
            shuffle: false,
            ..cfg(1)
        };
        let results: Vec<Result<Batch>> = Loader::new(ds, cfg, &dev).unwrap().epoch(0).collect();
        assert_eq!(results.len(), 1);
        assert!(results[0]
            .as_ref()
            .err()
            .unwrap()
            .to_string()
            .contains("sample 5"));
    }

    #[test]
    fn proxy_hook_supplies_another_modality() {
        /// A 2-channel "map": where the image is bright, and its mean.
        struct Map;
        impl ProxyMaker for Map {
            fn shape(&self) -> (usize, usize) {
                (2, 4)
            }
            fn make(&self, _: usize, image: &dyn ImageSource) -> Result<Vec<f32>> {
                let (h, w, d) = image.overview(4)?;
                let small = crate::data::proxy::area_resize(&d, 1, h, w, 4, 4);
                let mean = small.iter().sum::<f32>() / 16.0;
                Ok(small
                    .iter()
                    .map(|&v| (v > mean) as u8 as f32)
                    .chain([mean; 16])
                    .collect())
            }
        }
        let ds = Arc::new(
            Arc::try_unwrap(dataset(8))
                .ok()
                .unwrap()
                .with_proxy(Arc::new(Map)),
        );
        let b = Loader::new(ds, cfg(1), &Device::cpu())
            .unwrap()
            .epoch(0)
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(b.proxies.shape(), &[8, 2, 4, 4]);
    }
}
