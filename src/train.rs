//! Training and evaluation: the loop with its progress bar, per-epoch
//! metrics and checkpoints, exact resume, NaN guards, Ctrl-C handling and
//! evaluation reports, for any [`Model`]: the saccade model and the
//! baselines (ResNet18 over whole images, tiled ResNet18 over large ones).
//!
//! Randomness is derived from (seed, epoch, step) alone: the loader's
//! shuffle from (seed, epoch), the posterior noise from (seed, epoch, step).
//! A run resumed from a checkpoint therefore continues exactly as the
//! uninterrupted run would have.

use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::autograd::{Gradients, Graph};
use crate::checkpoint::{self, Checkpoint};
use crate::data::{mix_seed, Batch, Dataset, Loader, LoaderConfig, TaskSpec};
use crate::device::cuda::OutOfMemory;
use crate::device::Device;
use crate::models::{Images, ResNet18, ResNetConfig, SaccadeConfig, Saccader, TiledConfig, TiledResNet18};
use crate::nn::ParamStore;
use crate::optim::{clip_by_norm, clip_by_value, Adam, AdamConfig};
use crate::runs;
use crate::tensor::Tensor;

/// A baseline trained instead of the saccade model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Baseline {
    ResNet18(ResNetConfig),
    TiledResNet18(TiledConfig),
}

/// How the learning rate moves over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// The configured rate throughout (the paper).
    #[default]
    Constant,
    /// Linear warmup over the first 2% of steps, then cosine decay to zero
    /// at the last step: large early steps without a noisy end.
    Cosine,
    /// Warmup, stable, decay: linear warmup over the first 2% of steps, the
    /// configured rate until 80%, then linear decay to zero at the last step.
    /// The rate stays high while the model is still learning fast, and the
    /// end is quiet.
    Wsd,
}

impl LrSchedule {
    /// The rate at 0-based `step` of `total`.
    pub fn rate(self, lr: f32, step: usize, total: usize) -> f32 {
        let total = total.max(1);
        let warm = ((step + 1) as f32 / (total / 50).max(1) as f32).min(1.0);
        let done = step.min(total) as f32 / total as f32;
        match self {
            LrSchedule::Constant => lr,
            LrSchedule::Cosine => lr * warm * 0.5 * (1.0 + (std::f32::consts::PI * done).cos()),
            LrSchedule::Wsd => lr * warm * ((1.0 - done) / (1.0 - WSD_DECAY_FROM)).min(1.0),
        }
    }
}

/// Where [`LrSchedule::Wsd`] starts to decay, as a share of the run.
const WSD_DECAY_FROM: f32 = 0.8;

/// Everything a run needs besides the data; saved in every checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The saccade model, or with `baseline` only the data's shape
    /// (channels, classes, proxy size).
    pub model: SaccadeConfig,
    /// Train this baseline instead of the saccade model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Baseline>,
    pub dataset: String,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f32,
    /// Absent in checkpoints from before the option: constant.
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// Clip each gradient value to `[-clip, clip]` (0 disables).
    pub clip_value: f32,
    /// Clip the global gradient norm (0 disables).
    pub clip_norm: f32,
    pub seed: u64,
    /// Images in the train, valid and test splits of generated datasets.
    pub sizes: [usize; 3],
    /// Vary the training images each epoch where the dataset can
    /// ([`crate::data::Dataset::varies`]); absent in older checkpoints: off.
    #[serde(default)]
    pub augment: bool,
    /// The dataset's class names, so a checkpoint names its predictions
    /// without the dataset (absent in older checkpoints).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub class_names: Vec<String>,
}

impl TrainConfig {
    /// How the run's splits are opened: its seed and split sizes.
    pub fn data_config(&self) -> crate::data::DataConfig {
        let [train, valid, test] = self.sizes;
        crate::data::DataConfig {
            seed: self.seed,
            sizes: crate::data::SplitSizes { train, valid, test },
            mnist_dir: None,
        }
    }

    /// Refuse a configuration that cannot train or run, naming the field
    /// and its `saccade train` flag.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        ensure!(
            self.batch_size >= 1,
            "batch_size (--batch-size) must be at least 1"
        );
        ensure!(
            self.lr.is_finite() && self.lr > 0.0,
            "lr (--lr) must be positive, got {}",
            self.lr
        );
        ensure!(
            self.clip_value >= 0.0 && self.clip_norm >= 0.0,
            "clip_value (--clip-value) and clip_norm must be >= 0 (0: off), got {} and {}",
            self.clip_value,
            self.clip_norm
        );
        ensure!(
            self.baseline.is_none() || self.model.task_heads.is_empty(),
            "the baseline models answer one single-label task; {} has the tasks {}: train the saccade model on it",
            self.dataset,
            self.model.tasks().iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ")
        );
        match self.baseline {
            Some(Baseline::ResNet18(c)) => ensure!(
                (1..=1024).contains(&c.width),
                "width (--resnet-width) must be within 1..=1024, got {}",
                c.width
            ),
            Some(Baseline::TiledResNet18(c)) => ensure!(
                (1..=1024).contains(&c.width) && (32..=4096).contains(&c.tile) && c.chunk >= 1,
                "need --resnet-width within 1..=1024, --tile within 32..=4096 and --tile-chunk >= 1, got {}, {} and {}",
                c.width,
                c.tile,
                c.chunk
            ),
            None => {}
        }
        Ok(())
    }
}

/// Where a run stands; saved in checkpoints for `--resume`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Epochs fully done.
    pub epoch: usize,
    /// Steps done within the current epoch.
    pub step: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_ce: f64,
    pub train_kl: f64,
    pub train_accuracy: f64,
    pub valid_accuracy: f64,
    /// Share of valid images with every object inside some glimpse
    /// (generated datasets, saccade model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid_coverage: Option<f64>,
    pub seconds: f64,
    /// Training samples seen in this epoch.
    pub samples: usize,
    pub samples_per_second: f64,
    pub peak_bytes: usize,
    /// The learning rate of the epoch's last step.
    pub lr: f64,
    /// When the epoch's training ended, seconds since 1970 (UTC).
    pub unix_seconds: u64,
    /// The figures count the epoch's steps from this one on: it was resumed
    /// from a checkpoint written before checkpoints kept an epoch's sums.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_step: Option<usize>,
}

impl EpochMetrics {
    /// The line printed after the epoch.
    pub fn summary(&self) -> String {
        format!(
            "epoch {}: loss {:.3}{}, train acc {:.1}%, valid acc {:.1}%{}, {:.0}s, {:.0} samples/s",
            self.epoch,
            self.train_loss,
            // What the loss is made of, where it is more than the classification's.
            Some(self.train_loss - self.train_ce)
                .filter(|rest| rest.abs() > 5e-4)
                .map(|rest| format!(
                    " (classification {:.3} + glimpse and proxy terms {rest:.3})",
                    self.train_ce
                ))
                .unwrap_or_default(),
            100.0 * self.train_accuracy,
            100.0 * self.valid_accuracy,
            self.valid_coverage
                .map(|c| format!(" (all objects in a glimpse: {:.1}%)", 100.0 * c))
                .unwrap_or_default(),
            self.seconds,
            self.samples_per_second
        )
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    /// The mean over tasks of their accuracies (one task: its accuracy).
    pub accuracy: f64,
    /// Each task's accuracy; a multi-label task's answer counts as right
    /// when every class's presence is (IPS's protocol).
    pub tasks: Vec<TaskAccuracy>,
    pub samples: usize,
    /// Of the first task, when it is single-label (else empty); None for a
    /// class without test images.
    pub per_class_accuracy: Vec<Option<f64>>,
    /// `confusion[true][predicted]` counts, of the same task.
    pub confusion: Vec<Vec<usize>>,
    pub class_names: Vec<String>,
    /// Where the glimpses fell against the objects, when the dataset knows
    /// where its objects are and the model has glimpses.
    pub coverage: Option<Coverage>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TaskAccuracy {
    pub name: String,
    pub accuracy: f64,
}

/// Glimpse coverage: an object counts as covered when its centre lies
/// inside at least one glimpse's box.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Coverage {
    /// Share of images whose every object is covered.
    pub all_objects: f64,
    /// Mean number of distinct objects covered per image.
    pub mean_covered: f64,
    /// Mean number of objects per image.
    pub mean_objects: f64,
    pub images: usize,
}

impl Coverage {
    /// Add one image's objects and glimpses (`[s, tx, ty]`).
    fn add(&mut self, objects: &[[f32; 2]], glimpses: &[[f32; 3]]) {
        let covered = objects
            .iter()
            .filter(|[x, y]| {
                glimpses
                    .iter()
                    .any(|&[s, tx, ty]| (x - tx).abs() <= s && (y - ty).abs() <= s)
            })
            .count();
        // Running sums until `finish` turns them into means.
        self.all_objects += (covered == objects.len()) as u8 as f64;
        self.mean_covered += covered as f64;
        self.mean_objects += objects.len() as f64;
        self.images += 1;
    }

    fn finish(mut self) -> Self {
        let n = self.images.max(1) as f64;
        self.all_objects /= n;
        self.mean_covered /= n;
        self.mean_objects /= n;
        self
    }
}

impl EvalReport {
    /// The most frequent confusions, as (true, predicted, count).
    pub fn top_confusions(&self, n: usize) -> Vec<(String, String, usize)> {
        let mut v = Vec::new();
        for (t, row) in self.confusion.iter().enumerate() {
            for (p, &c) in row.iter().enumerate() {
                if t != p && c > 0 {
                    v.push((self.class_names[t].clone(), self.class_names[p].clone(), c));
                }
            }
        }
        v.sort_by_key(|a| std::cmp::Reverse(a.2));
        v.truncate(n);
        v
    }
}

/// Per-step posterior-noise RNG.
fn step_rng(seed: u64, epoch: usize, step: usize) -> StdRng {
    StdRng::seed_from_u64(mix_seed(&[seed, epoch as u64, step as u64]))
}

pub fn images_of(batch: &Batch) -> Images<'_> {
    match &batch.images {
        Some(t) => Images::Resident(t),
        None => Images::Sources(&batch.sources),
    }
}

/// Each row's answer to `task`, as a label (see [`crate::data::Sample::labels`]):
/// the argmax, or for a multi-label task the bitmask of positive logits.
pub fn answers(task: &TaskSpec, logits: &Tensor) -> Result<Vec<usize>> {
    let k = logits.shape()[1];
    Ok(logits
        .to_vec()?
        .chunks(k)
        .map(|r| {
            if task.multi_label {
                r.iter()
                    .enumerate()
                    .filter(|(_, &v)| v > 0.0)
                    .map(|(c, _)| 1 << c)
                    .sum()
            } else {
                argmax(r)
            }
        })
        .collect())
}

fn argmax(r: &[f32]) -> usize {
    r.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap_or(0)
}

/// One training batch's loss terms, predictions and gradients.
pub struct StepOutput {
    pub loss: f64,
    /// Batch means of the cross-entropy and of the KL term (0 without one).
    pub ce: f64,
    pub kl: f64,
    /// Per task, `[B, K_task]`.
    pub logits: Vec<Tensor>,
    pub grads: Gradients,
}

/// What one optimizer step measured on its batch.
#[derive(Clone, Copy, Debug)]
pub struct StepFigures {
    pub loss: f64,
    /// Batch means of the cross-entropy and of the KL term (0 without one).
    pub ce: f64,
    pub kl: f64,
    /// Images of the batch answered right, summed over tasks.
    pub correct: usize,
}

/// An epoch's running sums of [`StepFigures`], for the progress line and
/// the epoch's metrics; a checkpoint written mid-epoch holds them, so a
/// resumed epoch's figures count its steps from the start.
#[derive(Clone, Default, Serialize, Deserialize)]
struct EpochSums {
    loss: f64,
    ce: f64,
    kl: f64,
    correct: usize,
    /// Answers given: images times tasks.
    answers: usize,
    seen: usize,
    steps: usize,
    /// Seconds spent on the epoch's steps (by earlier sessions too).
    seconds: f64,
    /// Resumed from a checkpoint without the sums (written before they
    /// were kept): the figures count the steps from this one on.
    #[serde(skip)]
    from_step: Option<usize>,
}

impl EpochSums {
    fn add(&mut self, f: StepFigures, images: usize, tasks: usize) {
        self.steps += 1;
        self.loss += f.loss;
        self.ce += f.ce;
        self.kl += f.kl;
        self.correct += f.correct;
        self.answers += images * tasks;
        self.seen += images;
    }

    /// The progress bar's line, with the time the run's `steps_left`
    /// training steps will take at this epoch's pace (validation and test
    /// not counted).
    fn status(&self, steps_left: usize) -> String {
        let seconds = self.seconds;
        let left = seconds / self.steps.max(1) as f64 * steps_left as f64;
        format!(
            "loss {:.3} acc {:.1}% {:.0} samples/s, run {} left",
            self.loss / self.steps.max(1) as f64,
            100.0 * self.correct as f64 / self.answers.max(1) as f64,
            self.seen as f64 / seconds,
            duration(left)
        )
    }

    /// The epoch's metrics, validation not yet filled in.
    fn metrics(&self, epoch: usize, peak_bytes: usize, lr: f32) -> EpochMetrics {
        let (n, seconds) = (self.steps.max(1) as f64, self.seconds);
        EpochMetrics {
            epoch,
            train_loss: self.loss / n,
            train_ce: self.ce / n,
            train_kl: self.kl / n,
            train_accuracy: self.correct as f64 / self.answers.max(1) as f64,
            valid_accuracy: f64::NAN,
            valid_coverage: None,
            seconds,
            samples: self.seen,
            samples_per_second: self.seen as f64 / seconds,
            peak_bytes,
            lr: lr as f64,
            unix_seconds: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            from_step: self.from_step,
        }
    }
}

/// How an epoch's loop over its batches ended.
#[derive(PartialEq, Eq)]
enum EpochEnd {
    Complete,
    /// Ctrl-C: `stop` was raised.
    Interrupted,
    /// The wall-clock budget ran out mid-epoch, of this many steps.
    OutOfTime {
        steps: usize,
    },
}

fn batch_mean(x: &Tensor) -> Result<f64> {
    let v = x.to_vec()?;
    Ok(v.iter().map(|&a| a as f64).sum::<f64>() / v.len().max(1) as f64)
}

/// What the trainer needs of a model.
pub trait Model: Sized {
    /// The model `cfg` describes, initialized from `rng`.
    fn build(cfg: &TrainConfig, rng: &mut StdRng, dev: &Device) -> Result<Self>;
    fn params(&self) -> &ParamStore;
    fn params_mut(&mut self) -> &mut ParamStore;
    /// Forward and backward on a training batch; `rng` draws any noise.
    fn train_batch(&mut self, batch: &Batch, rng: &mut StdRng) -> Result<StepOutput>;
    /// Where training stands before a step, as training images seen (for
    /// schedules inside the model).
    fn set_progress(&mut self, _images: u64) {}
    /// Class scores in evaluation mode, and where the model looked.
    fn scores(&mut self, batch: &Batch) -> Result<BatchScores>;
}

/// One evaluation batch's output.
pub struct BatchScores {
    /// Per task, `[B, K]` logits: a single-label task's answer is their
    /// argmax, a multi-label task's the classes with a positive logit.
    pub scores: Vec<Tensor>,
    /// Per sample, per glimpse `[s, tx, ty]` (saccade model only).
    pub glimpses: Option<Vec<Vec<[f32; 3]>>>,
}

impl From<Tensor> for BatchScores {
    fn from(scores: Tensor) -> Self {
        BatchScores {
            scores: vec![scores],
            glimpses: None,
        }
    }
}

impl Model for Saccader {
    fn build(cfg: &TrainConfig, rng: &mut StdRng, dev: &Device) -> Result<Self> {
        match cfg.baseline {
            None => Ok(Saccader::new(cfg.model.clone(), rng, dev)),
            Some(b) => bail!("the run's configuration is the baseline {b:?}, not the saccade model"),
        }
    }
    fn params(&self) -> &ParamStore {
        &self.params
    }
    fn params_mut(&mut self) -> &mut ParamStore {
        &mut self.params
    }
    fn set_progress(&mut self, images: u64) {
        Saccader::set_progress(self, images);
    }
    fn train_batch(&mut self, batch: &Batch, rng: &mut StdRng) -> Result<StepOutput> {
        let mut g = Graph::new();
        let out = self.forward(
            &mut g,
            &images_of(batch),
            &batch.proxies,
            &batch.targets,
            Some(rng as &mut dyn rand::RngCore),
        )?;
        Ok(StepOutput {
            loss: g.value(out.loss).item()? as f64,
            ce: batch_mean(g.value(out.ce))?,
            kl: batch_mean(g.value(out.kl))?,
            logits: out.logits.iter().map(|&l| g.value(l).clone()).collect(),
            grads: g.backward(out.loss)?,
        })
    }
    fn scores(&mut self, batch: &Batch) -> Result<BatchScores> {
        let mut g = Graph::inference();
        let out = self.forward(&mut g, &images_of(batch), &batch.proxies, &batch.targets, None)?;
        Ok(BatchScores {
            scores: out.logits.iter().map(|&l| g.value(l).clone()).collect(),
            glimpses: Some(out.glimpses(&g)?),
        })
    }
}

/// The whole images of a batch, `[B, C, H, W]`, read from the sources when
/// the loader did not keep them resident.
fn whole_images(batch: &Batch) -> Result<Tensor> {
    if let Some(t) = &batch.images {
        return Ok(t.clone());
    }
    let (c, (h, w)) = (batch.sources[0].channels(), batch.sources[0].size());
    let mut data = vec![0.0; batch.len() * c * h * w];
    for (s, out) in batch.sources.iter().zip(data.chunks_mut(c * h * w)) {
        s.read_region(0, 0, 0, h, w, out)?;
    }
    Tensor::from_vec(data, &[batch.len(), c, h, w], &batch.proxies.device())
}

impl Model for ResNet18 {
    fn build(cfg: &TrainConfig, rng: &mut StdRng, dev: &Device) -> Result<Self> {
        match cfg.baseline {
            Some(Baseline::ResNet18(c)) => Ok(ResNet18::new(c, rng, dev)),
            other => bail!("the run's configuration is {other:?}, not a ResNet18"),
        }
    }
    fn params(&self) -> &ParamStore {
        &self.params
    }
    fn params_mut(&mut self) -> &mut ParamStore {
        &mut self.params
    }
    fn train_batch(&mut self, batch: &Batch, _: &mut StdRng) -> Result<StepOutput> {
        let mut g = Graph::new();
        let logits = self.forward(&mut g, &whole_images(batch)?)?;
        let ce = g.softmax_cross_entropy(logits, batch.labels())?;
        let loss = g.mean_all(ce)?;
        let l = g.value(loss).item()? as f64;
        Ok(StepOutput {
            loss: l,
            ce: l,
            kl: 0.0,
            logits: vec![g.value(logits).clone()],
            grads: g.backward(loss)?,
        })
    }
    fn scores(&mut self, batch: &Batch) -> Result<BatchScores> {
        let mut g = Graph::inference();
        let logits = self.forward(&mut g, &whole_images(batch)?)?;
        Ok(g.value(logits).clone().into())
    }
}

impl Model for TiledResNet18 {
    fn build(cfg: &TrainConfig, rng: &mut StdRng, dev: &Device) -> Result<Self> {
        match cfg.baseline {
            Some(Baseline::TiledResNet18(c)) => Ok(TiledResNet18::new(c, rng, dev)),
            other => bail!("the run's configuration is {other:?}, not a tiled ResNet18"),
        }
    }
    fn params(&self) -> &ParamStore {
        &self.params
    }
    fn params_mut(&mut self) -> &mut ParamStore {
        &mut self.params
    }
    fn train_batch(&mut self, batch: &Batch, _: &mut StdRng) -> Result<StepOutput> {
        let s = self.train_step(&batch.sources, batch.labels(), &batch.proxies.device())?;
        Ok(StepOutput {
            loss: s.loss,
            ce: s.loss,
            kl: 0.0,
            logits: vec![s.logits],
            grads: s.grads,
        })
    }
    fn scores(&mut self, batch: &Batch) -> Result<BatchScores> {
        Ok(TiledResNet18::logits(self, &batch.sources, &batch.proxies.device())?.into())
    }
}

/// A trainer: the model, its optimizer and the run's state.
pub struct Trainer<M: Model = Saccader> {
    pub cfg: TrainConfig,
    pub model: M,
    pub adam: Adam,
    pub progress: Progress,
    pub device: Device,
    /// Stop training at the first step boundary after this instant (a
    /// wall-clock budget); `None` trains the configured epochs.
    pub deadline: Option<Instant>,
    /// Every whole epoch's metrics, saved in the checkpoint: metrics.jsonl
    /// is rewritten from it with every checkpoint, so the two agree.
    pub history: Vec<serde_json::Value>,
    /// The current epoch's sums so far, when stopped mid-epoch.
    partial: EpochSums,
}

/// What `Trainer::fit` reports.
#[derive(Clone, Debug, Serialize)]
pub struct FitReport {
    pub epochs: Vec<EpochMetrics>,
    pub interrupted: bool,
    /// Training stopped at the trainer's deadline, mid-epoch; the last
    /// entry of `epochs` is that partial epoch (not in metrics.jsonl).
    pub out_of_time: bool,
    pub last_checkpoint: Option<PathBuf>,
}

/// The training configuration saved in a checkpoint.
pub fn checkpoint_config(path: &Path) -> Result<TrainConfig> {
    let ck = Checkpoint::load(path)?;
    serde_json::from_value(ck.meta["train"].clone())
        .with_context(|| format!("{}: no training configuration in the checkpoint", path.display()))
}

impl<M: Model> Trainer<M> {
    pub fn new(cfg: TrainConfig, device: Device) -> Result<Self> {
        cfg.validate()?;
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let model = M::build(&cfg, &mut rng, &device)?;
        let adam = Adam::new(AdamConfig {
            lr: cfg.lr,
            ..Default::default()
        });
        Ok(Trainer {
            cfg,
            model,
            adam,
            progress: Progress::default(),
            device,
            deadline: None,
            history: Vec::new(),
            partial: EpochSums::default(),
        })
    }

    /// Rebuild a trainer from a checkpoint, with its config and state.
    pub fn from_checkpoint(path: &Path, device: Device) -> Result<Self> {
        let ck = Checkpoint::load(path)?;
        let cfg: TrainConfig = serde_json::from_value(ck.meta["train"].clone())
            .with_context(|| format!("{}: no training configuration in the checkpoint", path.display()))?;
        let progress: Progress = serde_json::from_value(ck.meta["progress"].clone()).unwrap_or_default();
        cfg.validate()
            .with_context(|| format!("{}: the checkpoint's configuration is invalid", path.display()))?;
        let mut t = Trainer::<M>::new(cfg, device)?;
        ck.restore(t.model.params_mut(), Some(&mut t.adam), &t.device)?;
        t.progress = progress;
        // Absent in checkpoints from before it: `fit` recovers it from metrics.jsonl.
        t.history = serde_json::from_value(ck.meta["history"].clone()).unwrap_or_default();
        t.partial = match serde_json::from_value::<EpochSums>(ck.meta["epoch_sums"].clone()) {
            Ok(sums) => sums,
            Err(_) => EpochSums {
                from_step: (progress.step > 0).then_some(progress.step),
                ..EpochSums::default()
            },
        };
        Ok(t)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        checkpoint::save(path, self.model.params(), Some(&self.adam), &self.meta())
    }

    /// The checkpoint, then metrics.jsonl from the history it holds: after
    /// a crash between the two, metrics.jsonl lags the checkpoint (the next
    /// save catches up), never runs ahead of it or repeats an epoch.
    fn save_run(&self, out: &Path) -> Result<PathBuf> {
        let ck = out.join(runs::CHECKPOINT);
        self.save(&ck)?;
        let lines: String = self.history.iter().map(|m| format!("{m}\n")).collect();
        crate::files::write_atomic(&out.join(runs::METRICS), lines.as_bytes())?;
        crate::files::write_atomic(
            &out.join(runs::METRICS_CSV),
            metrics_csv(&self.history).as_bytes(),
        )?;
        let config = serde_json::to_string_pretty(&self.cfg)? + "\n";
        crate::files::write_atomic(&out.join(runs::CONFIG), config.as_bytes())?;
        Ok(ck)
    }

    /// The weights and configuration only, without the optimizer state: a
    /// checkpoint to ship for `eval` and `predict` (a third of the size).
    pub fn save_weights(&self, path: &Path) -> Result<()> {
        checkpoint::save(path, self.model.params(), None, &self.meta())
    }

    fn meta(&self) -> serde_json::Value {
        let mut meta = serde_json::json!({
            "train": self.cfg,
            "progress": self.progress,
            "classes": self.cfg.model.num_classes,
            "history": self.history,
        });
        if self.progress.step > 0 {
            meta["epoch_sums"] = serde_json::json!(self.partial);
        }
        meta
    }

    /// One optimizer step on one batch.
    pub fn step(&mut self, batch: &Batch) -> Result<StepFigures> {
        let mut rng = step_rng(self.cfg.seed, self.progress.epoch, self.progress.step);
        let StepOutput {
            loss,
            ce,
            kl,
            logits,
            mut grads,
        } = self.model.train_batch(batch, &mut rng)?;
        if !loss.is_finite() {
            bail!("the loss is {loss}");
        }
        if self.cfg.clip_value > 0.0 {
            clip_by_value(&mut grads, self.cfg.clip_value)?;
        }
        let norm = clip_by_norm(
            &mut grads,
            if self.cfg.clip_norm > 0.0 {
                self.cfg.clip_norm
            } else {
                f32::MAX
            },
        )?;
        if !norm.is_finite() {
            bail!("the gradient norm is {norm}");
        }
        self.adam.step(self.model.params_mut(), &grads)?;
        let mut correct = 0;
        for ((task, scores), labels) in self.cfg.model.tasks().iter().zip(&logits).zip(&batch.targets) {
            correct += answers(task, scores)?
                .iter()
                .zip(labels)
                .filter(|(a, l)| a == l)
                .count();
        }
        self.progress.step += 1;
        Ok(StepFigures {
            loss,
            ce,
            kl,
            correct,
        })
    }

    /// Train for the configured epochs from the current progress. Writes
    /// `metrics.jsonl` and `checkpoint.safetensors` into `out` after every
    /// epoch; stops cleanly (checkpoint first) when `stop` is raised.
    pub fn fit(
        &mut self,
        train: &Arc<dyn Dataset>,
        valid: Option<&Arc<dyn Dataset>>,
        out: &Path,
        show_progress: bool,
        stop: &AtomicBool,
    ) -> Result<FitReport> {
        fs::create_dir_all(out).with_context(|| format!("cannot create output folder {}", out.display()))?;
        let ck_path = out.join(runs::CHECKPOINT);
        if self.history.len() < self.progress.epoch {
            self.history = history_from(&out.join(runs::METRICS), self.progress.epoch);
        }
        let mut report = FitReport {
            epochs: Vec::new(),
            interrupted: false,
            out_of_time: false,
            last_checkpoint: None,
        };
        while self.progress.epoch < self.cfg.epochs {
            let epoch = self.progress.epoch;
            self.device.reset_peak();
            let (sums, end) = self.run_epoch(train, show_progress, stop, &ck_path)?;
            let mut m = sums.metrics(epoch + 1, self.device.memory().peak_bytes, self.adam.config.lr);
            match end {
                EpochEnd::Interrupted => {
                    report.last_checkpoint = Some(self.save_run(out)?);
                    report.interrupted = true;
                    return Ok(report);
                }
                EpochEnd::OutOfTime { steps } => {
                    // A partial epoch: checkpoint where it stands (resumable),
                    // report its figures, leave metrics.jsonl to whole epochs.
                    report.last_checkpoint = Some(self.save_run(out)?);
                    report.out_of_time = true;
                    if show_progress {
                        eprintln!(
                            "time budget reached at epoch {} step {}/{steps}",
                            epoch + 1,
                            self.progress.step
                        );
                    }
                    report.epochs.push(m);
                    return Ok(report);
                }
                EpochEnd::Complete => {}
            }
            if let Some(v) = valid {
                let r = self.evaluate(v, show_progress)?;
                m.valid_accuracy = r.accuracy;
                m.valid_coverage = r.coverage.map(|c| c.all_objects);
            }
            self.progress = Progress {
                epoch: epoch + 1,
                step: 0,
            };
            self.history.truncate(epoch);
            self.history.push(serde_json::to_value(&m)?);
            report.last_checkpoint = Some(self.save_run(out)?);
            if show_progress {
                eprintln!("{}", m.summary());
            }
            report.epochs.push(m);
        }
        Ok(report)
    }

    /// The batches of the current epoch from the current step: one
    /// optimizer step each, with the progress bar (or, without a terminal,
    /// a line every tenth of the epoch), until the epoch ends, `stop` is
    /// raised or the time budget runs out.
    fn run_epoch(
        &mut self,
        train: &Arc<dyn Dataset>,
        show_progress: bool,
        stop: &AtomicBool,
        ck_path: &Path,
    ) -> Result<(EpochSums, EpochEnd)> {
        let (epoch, epochs, bs) = (self.progress.epoch, self.cfg.epochs, self.cfg.batch_size);
        let loader = Loader::new(
            train.clone(),
            LoaderConfig {
                augment: self.cfg.augment,
                ..loader_config(bs, Some(self.cfg.seed))
            },
            &self.device,
        )?;
        let steps = loader.num_batches();
        let label = format!("epoch {}/{epochs}", epoch + 1);
        let bar = progress_bar(show_progress, steps as u64, &label);
        bar.set_position(self.progress.step as u64);
        let t0 = Instant::now();
        let mut sums = std::mem::take(&mut self.partial);
        let before = sums.seconds;
        for batch in loader.epoch_from(epoch, self.progress.step) {
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    bar.abandon();
                    self.partial = sums;
                    return Err(self.data_failed(e, ck_path));
                }
            };
            let done = epoch * steps + self.progress.step;
            self.adam.config.lr = self.cfg.lr_schedule.rate(self.cfg.lr, done, steps * epochs);
            self.model.set_progress((done * bs) as u64);
            let figures = self.step(&batch).map_err(|e| {
                bar.abandon();
                self.step_failed(e, ck_path)
            })?;
            sums.add(figures, batch.len(), batch.targets.len());
            sums.seconds = before + t0.elapsed().as_secs_f64();
            let step = self.progress.step;
            let mut steps_left = (steps * epochs).saturating_sub(epoch * steps + step);
            if let Some(d) = self.deadline {
                // The budget ends the run first when the pace says so.
                let pace = sums.seconds / sums.steps as f64;
                let fit = d.saturating_duration_since(Instant::now()).as_secs_f64() / pace;
                steps_left = steps_left.min(fit as usize);
            }
            let status = sums.status(steps_left);
            if show_progress
                && !std::io::stderr().is_terminal()
                && step.is_multiple_of(steps.div_ceil(10).max(1))
            {
                eprintln!("{label} step {step}/{steps}: {status}");
            }
            bar.set_message(status);
            bar.inc(1);
            if stop.load(Ordering::SeqCst) {
                bar.abandon_with_message("interrupted");
                self.partial = sums.clone();
                return Ok((sums, EpochEnd::Interrupted));
            }
            if step < steps && self.deadline.is_some_and(|d| Instant::now() >= d) {
                bar.finish_and_clear();
                self.partial = sums.clone();
                return Ok((sums, EpochEnd::OutOfTime { steps }));
            }
        }
        bar.finish_and_clear();
        Ok((sums, EpochEnd::Complete))
    }

    /// The error of a batch that could not be read (a damaged image or
    /// tile): the model is sound, so the run so far is saved as at Ctrl-C
    /// and the error says how to go on.
    fn data_failed(&self, e: anyhow::Error, ck_path: &Path) -> anyhow::Error {
        let at = format!(
            "training stopped at epoch {} step {}: a batch could not be read",
            self.progress.epoch + 1,
            self.progress.step
        );
        let out = ck_path.parent().unwrap_or(Path::new("."));
        match self.save_run(out) {
            Ok(ck) => e.context(format!(
                "{at}; the run so far is saved (once the file named here reads again, continue \
                 with saccade train --resume {})",
                ck.display()
            )),
            Err(save) => e.context(format!("{at}; saving the run failed too: {save:#}")),
        }
    }

    /// The error of a failed training step, saying where training stopped,
    /// which checkpoint is the last good one and what to change.
    fn step_failed(&self, e: anyhow::Error, ck_path: &Path) -> anyhow::Error {
        let last = if ck_path.exists() {
            format!("the last good checkpoint is {}", ck_path.display())
        } else {
            "no checkpoint was written yet".to_string()
        };
        let bs = self.cfg.batch_size;
        let advice = if e.chain().any(|c| c.is::<OutOfMemory>()) {
            format!(
                "A batch of {bs} does not fit in the GPU's memory: lower --batch-size (say {}) in a new run, \
                 or train with --device cpu.",
                (bs / 2).max(1)
            )
        } else {
            "Try a lower --lr or a tighter --clip-value.".to_string()
        };
        anyhow::anyhow!(
            "training stopped at epoch {} step {}: {e:#}; {last}. {advice}",
            self.progress.epoch + 1,
            self.progress.step
        )
    }

    /// Accuracy, per-class accuracy and the confusion matrix, using
    /// posterior means.
    pub fn evaluate(&mut self, data: &Arc<dyn Dataset>, show_progress: bool) -> Result<EvalReport> {
        evaluate(
            &mut self.model,
            data,
            self.cfg.batch_size,
            &self.device,
            show_progress,
        )
    }
}

/// Epochs 1..=`epochs` of an existing metrics.jsonl, the last line of each
/// (for checkpoints written before they held their history). Stops at the
/// first epoch missing: the history must list epochs in order.
/// The metrics lines as CSV: a header of every key any line has (older
/// lines lack the newer keys: empty cells).
fn metrics_csv(history: &[serde_json::Value]) -> String {
    let mut keys: Vec<&String> = Vec::new();
    for m in history.iter().filter_map(|m| m.as_object()) {
        for k in m.keys() {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    let mut csv = keys.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(",") + "\n";
    for m in history {
        let cells: Vec<String> = keys
            .iter()
            .map(|k| match &m[k.as_str()] {
                serde_json::Value::Null => String::new(),
                v => v.to_string(),
            })
            .collect();
        csv += &(cells.join(",") + "\n");
    }
    csv
}

fn history_from(path: &Path, epochs: usize) -> Vec<serde_json::Value> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut by_epoch = vec![None; epochs];
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        let e = v["epoch"].as_u64().unwrap_or(0) as usize;
        if (1..=epochs).contains(&e) {
            by_epoch[e - 1] = Some(v);
        }
    }
    by_epoch.into_iter().map_while(|v| v).collect()
}

/// Batches in a fixed order per (seed, epoch); `None` keeps dataset order.
fn loader_config(batch_size: usize, shuffle_seed: Option<u64>) -> LoaderConfig {
    LoaderConfig {
        batch_size,
        shuffle: shuffle_seed.is_some(),
        seed: shuffle_seed.unwrap_or(0),
        ..LoaderConfig::default()
    }
}

/// `s` seconds as `1h05m`, `12m30s` or `45s`.
pub fn duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, min, sec) => format!("{min}m{sec:02}s"),
        (h, min, _) => format!("{h}h{min:02}m"),
    }
}

pub fn progress_bar(show: bool, len: u64, prefix: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    bar
}

pub fn evaluate<M: Model>(
    model: &mut M,
    data: &Arc<dyn Dataset>,
    batch_size: usize,
    device: &Device,
    show: bool,
) -> Result<EvalReport> {
    let tasks = data.tasks();
    // The confusion matrix of the first task, when it is single-label.
    let k = if tasks[0].multi_label {
        0
    } else {
        tasks[0].num_classes()
    };
    let mut confusion = vec![vec![0usize; k]; k];
    let mut right = vec![0usize; tasks.len()];
    let mut samples = 0;
    let loader = Loader::new(data.clone(), loader_config(batch_size, None), device)?;
    let bar = progress_bar(show, loader.num_batches() as u64, "evaluating");
    let mut coverage: Option<Coverage> = None;
    for batch in loader.epoch(0) {
        let batch = batch?;
        let out = model.scores(&batch)?;
        ensure!(
            out.scores.len() == tasks.len(),
            "the model answers {} tasks, the dataset has {}",
            out.scores.len(),
            tasks.len()
        );
        for (t, task) in tasks.iter().enumerate() {
            let answers = answers(task, &out.scores[t])?;
            for (&a, &l) in answers.iter().zip(&batch.targets[t]) {
                right[t] += (a == l) as usize;
                if t == 0 && k > 0 {
                    confusion[l][a] += 1;
                }
            }
        }
        samples += batch.len();
        if let Some(glimpses) = &out.glimpses {
            for (&i, gl) in batch.indices.iter().zip(glimpses) {
                if let Some(objects) = data.object_centres(i) {
                    coverage.get_or_insert_with(Coverage::default).add(&objects, gl);
                }
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let per_class_accuracy = confusion
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let n = row.iter().sum::<usize>();
            (n > 0).then(|| row[i] as f64 / n as f64)
        })
        .collect();
    let tasks: Vec<TaskAccuracy> = tasks
        .iter()
        .zip(&right)
        .map(|(t, &r)| TaskAccuracy {
            name: t.name.clone(),
            accuracy: r as f64 / samples.max(1) as f64,
        })
        .collect();
    Ok(EvalReport {
        accuracy: tasks.iter().map(|t| t.accuracy).sum::<f64>() / tasks.len() as f64,
        tasks,
        samples,
        per_class_accuracy,
        confusion,
        class_names: data.class_names(),
        coverage: coverage.map(Coverage::finish),
    })
}

#[cfg(test)]
mod tests {
    use super::{duration, LrSchedule};

    #[test]
    fn durations_read_as_hours_minutes_seconds() {
        assert_eq!(duration(-3.0), "0s");
        assert_eq!(duration(44.6), "45s");
        assert_eq!(duration(750.0), "12m30s");
        assert_eq!(duration(3900.0), "1h05m");
    }

    /// Both schedules warm up over the first 2% of steps and end at zero;
    /// cosine is at half the rate midway, WSD holds the full rate until 80%
    /// and is at half at 90%.
    #[test]
    fn lr_schedules_have_their_shapes() {
        let (lr, total) = (1e-3, 1000);
        let at = |s: LrSchedule, step: usize| s.rate(lr, step, total);
        for s in [LrSchedule::Cosine, LrSchedule::Wsd] {
            assert!((at(s, 0) - lr / 20.0).abs() < 1e-9, "{s:?} starts warming up");
            assert!(at(s, 9) < at(s, 10) && (at(s, 19) - lr).abs() < 1e-6, "{s:?}");
            assert_eq!(at(s, total), 0.0, "{s:?} ends at zero");
        }
        assert!((at(LrSchedule::Cosine, 500) - lr / 2.0).abs() < 1e-6);
        assert_eq!(at(LrSchedule::Wsd, 500), lr);
        assert_eq!(at(LrSchedule::Wsd, 800), lr);
        assert!((at(LrSchedule::Wsd, 900) - lr / 2.0).abs() < 1e-6);
        assert_eq!(at(LrSchedule::Constant, 0), lr);
    }
}
