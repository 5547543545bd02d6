//! `saccade train`: its flags, and a run from the configuration to the test
//! evaluation: the output folder, resuming, Ctrl-C and the figures printed.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Result;
use clap::Args;

use super::config::{resume_config, train_config, ModelChoice, Preset};
use super::eval::{check_compatible, coverage_line};
use super::{handle_ctrlc, interrupted, select_device, usage, DeviceArgs, Failure, AFTER_TRAINING, STOP};
use crate::data::{self, Split};
use crate::models::{Focus, GlimpsePool, ResNet18, Saccader, TiledResNet18};
use crate::runs;
use crate::train::{Baseline, Coverage, LrSchedule, Model, TrainConfig, Trainer};
use crate::Device;

#[derive(Args, Clone)]
pub(super) struct TrainArgs {
    // Flags with defaults are options, applied in `train_config`, so that a
    // flag given with --resume can be told from one left out.
    /// Dataset: a generated task (see `saccade data generate --help`) or a store folder
    /// [default: cluttered-mnist].
    #[arg(long)]
    pub(super) dataset: Option<String>,
    /// Model and training defaults that the other flags override [default: small].
    #[arg(long, value_enum)]
    pub(super) preset: Option<Preset>,
    /// Which model to train [default: saccade].
    #[arg(long, value_enum)]
    pub(super) model: Option<ModelChoice>,
    /// ResNet first-stage width for the baselines [default: 64, the standard ResNet18].
    #[arg(long)]
    pub(super) resnet_width: Option<usize>,
    /// Tiled ResNet18: tile side in pixels [default: 224].
    #[arg(long)]
    pub(super) tile: Option<usize>,
    /// Tiled ResNet18: tiles per trunk pass [default: 16].
    #[arg(long)]
    pub(super) tile_chunk: Option<usize>,
    /// Tiled ResNet18: recompute each chunk of tiles in backward (gradient checkpointing).
    #[arg(long)]
    pub(super) checkpointing: bool,
    #[command(flatten)]
    pub(super) device: DeviceArgs,
    /// Passes over the training set (with --resume: raise it to extend the run).
    #[arg(long)]
    pub(super) epochs: Option<usize>,
    /// Wall-clock budget: stop training after this many minutes (mid-epoch if need be,
    /// with a resumable checkpoint), then evaluate on the test split.
    #[arg(long)]
    pub(super) minutes: Option<f64>,
    /// Images per training step (default: the preset's, 32 for small, 100 for paper).
    #[arg(long)]
    pub(super) batch_size: Option<usize>,
    /// Adam learning rate.
    #[arg(long, allow_negative_numbers = true)]
    pub(super) lr: Option<f32>,
    /// Learning-rate schedule over the run.
    #[arg(long, value_enum)]
    pub(super) lr_schedule: Option<LrSchedule>,
    /// Training images (generated datasets).
    #[arg(long)]
    pub(super) train_size: Option<usize>,
    /// Validation images (generated datasets; at least 1: every epoch is validated).
    #[arg(long)]
    pub(super) valid_size: Option<usize>,
    /// Test images (generated datasets; at least 1: a run ends with a test evaluation).
    #[arg(long)]
    pub(super) test_size: Option<usize>,
    /// Glimpses per image (T).
    #[arg(long)]
    pub(super) glimpses: Option<usize>,
    /// Crop side in pixels (L).
    #[arg(long)]
    pub(super) crop: Option<usize>,
    /// Largest glimpse as a fraction of the image side.
    #[arg(long, allow_negative_numbers = true)]
    pub(super) max_scale: Option<f32>,
    /// Smallest glimpse as a fraction of the image side (0.2 for the small preset, 0.1 for
    /// paper). Small glimpses are read from a finer pyramid level: they cost the same.
    #[arg(long, allow_negative_numbers = true)]
    pub(super) min_scale: Option<f32>,
    /// Where attention puts a glimpse: mean (the attention-weighted mean of all proxy cells; one
    /// object per image) or peak (the best unattended cell, refined over its neighbours; many
    /// small objects).
    #[arg(long, value_enum)]
    pub(super) focus: Option<Focus>,
    /// Add each glimpse's place to its features, for tasks about positions.
    #[arg(long)]
    pub(super) glimpse_position: bool,
    /// Favour proxy cells with ink (ln of their mean value) in the glimpses' attention, so that
    /// glimpses start on what is drawn rather than on empty background.
    #[arg(long)]
    pub(super) ink_prior: bool,
    /// Rank the proxy's cells by one learnt query for every glimpse instead of a query from the
    /// recurrent state (many objects of one kind: what marks one marks all).
    #[arg(long)]
    pub(super) fixed_query: bool,
    /// Each task weighs the glimpses by its own attention, which may favour glimpses by their
    /// place (the highest digit); needs --glimpse-pool attention or relevance [default: on for
    /// the many-objects preset].
    #[arg(long, conflicts_with = "no_task_pools")]
    pub(super) task_pools: bool,
    /// One pooling for every task (ablation of the many-objects preset's --task-pools).
    #[arg(long)]
    pub(super) no_task_pools: bool,
    /// Weight of the VRNN terms (proxy NLL + KL) against the classification loss.
    #[arg(long, allow_negative_numbers = true)]
    pub(super) beta: Option<f32>,
    /// Multiply the classification loss by the VRNN terms (the authors' code) instead of adding them (the paper).
    #[arg(long)]
    pub(super) multiplicative: bool,
    /// Let later glimpses attend to proxy cells an earlier glimpse already covered (ablation of
    /// the default hard mask, which excludes them).
    #[arg(long)]
    pub(super) no_mask: bool,
    /// Training images during which the classification loss does not move the glimpses (then
    /// ramped in over as many images): the classifier learns what matters before the glimpses
    /// follow it. Default 40000 for the small preset, 0 (off) for paper.
    #[arg(long)]
    pub(super) policy_warmup: Option<usize>,
    /// Vary the training images each epoch, labels kept (megapixel MNIST: the layout mirrored
    /// left-right or not and shifted on the canvas); the many-objects preset's default.
    #[arg(long, conflicts_with = "no_augment")]
    pub(super) augment: bool,
    /// Train on the images exactly as they are every epoch.
    #[arg(long)]
    pub(super) no_augment: bool,
    /// Never let the classification loss move the glimpses (the many-objects preset's default:
    /// its glimpses learn where to look from the relevance pool).
    #[arg(long)]
    pub(super) no_policy_gradient: bool,
    /// How the glimpses' features are pooled into one: mean (the paper, default), max,
    /// attention (max beside a mean weighted by the glimpses' attention scores), or relevance
    /// (attention plus a score of what each crop showed, which the proxy's scores learn).
    #[arg(long, value_enum)]
    pub(super) glimpse_pool: Option<GlimpsePool>,
    /// Channels of the crop classifier's first conv (then 2x and 4x): 16 for the small preset,
    /// 32 for paper. Its cost per crop grows with the square.
    #[arg(long)]
    pub(super) classifier_width: Option<usize>,
    /// Fix the posterior variance to this value instead of learning it (paper ablation, e.g. 0.6).
    #[arg(long, allow_negative_numbers = true)]
    pub(super) fixed_variance: Option<f32>,
    /// Proxy side in pixels (default 32; same as `,proxy=J` in the dataset spec).
    #[arg(long)]
    pub(super) proxy_size: Option<usize>,
    /// Standard deviation of Gaussian noise added to the proxy, robustness ablation
    /// (same as `,noise=S` in the dataset spec).
    #[arg(long, allow_negative_numbers = true)]
    pub(super) proxy_noise: Option<f32>,
    /// Clip gradient values to [-c, c] (0: off).
    #[arg(long, allow_negative_numbers = true)]
    pub(super) clip_value: Option<f32>,
    /// Seed of the data, the initialization and the training noise [default: 1].
    #[arg(long)]
    pub(super) seed: Option<u64>,
    /// Output folder for the checkpoint, metrics.jsonl and saccades.png. Default: a new
    /// folder runs/<YYYYMMDD-HHMMSS> (UTC), with runs/latest pointing at it; with --resume,
    /// the checkpoint's folder. A folder that holds another run is refused (see --overwrite).
    #[arg(long)]
    pub(super) out: Option<PathBuf>,
    /// Replace the run in --out instead of refusing the folder.
    #[arg(long)]
    pub(super) overwrite: bool,
    /// Continue from a checkpoint written by an earlier run, in its folder. Flags that
    /// would change its configuration are refused; --epochs may extend it.
    #[arg(long)]
    pub(super) resume: Option<PathBuf>,
    /// Start a new run from a saccade checkpoint's weights (fine-tuning, e.g.
    /// pretrained/cluttered-mnist/model.safetensors): its model configuration on this run's
    /// data; every tensor whose name and shape fit is loaded, the others (a head for other
    /// classes, a first layer for other channels) start fresh, and the run says which.
    /// Training settings come from the preset and flags as for any new run.
    #[arg(long, conflicts_with = "resume")]
    pub(super) init: Option<PathBuf>,
    /// Print one JSON object with the figures on stdout, as its only line (progress stays
    /// on stderr).
    #[arg(long)]
    pub(super) json: bool,
}

/// The saccade picture for the saccade model; nothing for the baselines.
type Picture<M> = fn(&M, &Arc<dyn data::Dataset>, &Path) -> Result<Option<PathBuf>>;

fn saccade_picture(m: &Saccader, test: &Arc<dyn data::Dataset>, out: &Path) -> Result<Option<PathBuf>> {
    let viz = out.join("saccades.png");
    crate::predict::save_saccade_picture(m, test, 8, &viz)?;
    Ok(Some(viz))
}

fn no_picture<M>(_: &M, _: &Arc<dyn data::Dataset>, _: &Path) -> Result<Option<PathBuf>> {
    Ok(None)
}

/// What one training run measured (the learning benchmark's row).
#[derive(serde::Serialize)]
pub(super) struct RunSummary {
    pub(super) seed: u64,
    pub(super) test_accuracy: f64,
    pub(super) test_coverage: Option<Coverage>,
    pub(super) samples: usize,
    pub(super) train_seconds: f64,
    pub(super) samples_per_second: f64,
    pub(super) seconds: f64,
}

pub(super) fn run_train(a: TrainArgs) -> Result<RunSummary, Failure> {
    check_train_flags(&a)?;
    let cfg = match &a.resume {
        Some(path) => resume_config(&a, path)?,
        None => train_config(&a).map_err(usage)?,
    };
    match cfg.baseline {
        None => train_model::<Saccader>(a, cfg, saccade_picture),
        Some(Baseline::ResNet18(_)) => train_model::<ResNet18>(a, cfg, no_picture),
        Some(Baseline::TiledResNet18(_)) => train_model::<TiledResNet18>(a, cfg, no_picture),
    }
}

/// The checks on flags alone, before anything is read.
pub(super) fn check_train_flags(a: &TrainArgs) -> Result<(), Failure> {
    // A year at most: Duration cannot hold inf or 1e300 minutes.
    if a.minutes.is_some_and(|m| !(m > 0.0 && m <= 525_600.0)) {
        return Err(usage(anyhow::anyhow!(
            "--minutes must be positive and at most 525600 (a year), got {}",
            a.minutes.unwrap_or_default()
        )));
    }
    if a.proxy_noise.is_some_and(|n| !(n.is_finite() && n >= 0.0)) {
        return Err(usage(anyhow::anyhow!(
            "--proxy-noise must be a finite standard deviation >= 0, got {}",
            a.proxy_noise.unwrap_or_default()
        )));
    }
    for (flag, v) in [
        ("--epochs", a.epochs),
        ("--batch-size", a.batch_size),
        ("--train-size", a.train_size),
        ("--valid-size", a.valid_size),
        ("--test-size", a.test_size),
    ] {
        if v == Some(0) {
            return Err(usage(anyhow::anyhow!(
                "{flag} must be at least 1: every run trains, validates each epoch and ends with a test evaluation"
            )));
        }
    }
    for (flag, v) in [
        ("--train-size", a.train_size),
        ("--valid-size", a.valid_size),
        ("--test-size", a.test_size),
    ] {
        data::check_split_size(flag, v.unwrap_or(0)).map_err(usage)?;
    }
    if a.overwrite && a.out.is_none() {
        return Err(usage(anyhow::anyhow!(
            "--overwrite needs --out: without --out every run gets a new folder"
        )));
    }
    if a.batch_size.is_some_and(|b| b > MAX_BATCH) {
        return Err(usage(anyhow::anyhow!(
            "--batch-size must be at most {MAX_BATCH} (a batch is held in memory at once)"
        )));
    }
    Ok(())
}

/// The largest --batch-size: ten times the paper's 100 and more than a GPU
/// step of this model needs; a batch of 10 million 100² images asked for
/// 400 GB and aborted.
const MAX_BATCH: usize = 4096;

// Over 80 lines: the run's steps in their order (open, announce, fit, test,
// report), each a call or a print of values gathered here; split, the
// report would take ten of them as arguments.
fn train_model<M: Model>(a: TrainArgs, cfg: TrainConfig, picture: Picture<M>) -> Result<RunSummary, Failure> {
    let device = select_device(&a.device)?;
    let started = std::time::Instant::now();
    let mut trainer = match &a.resume {
        Some(path) => resumed::<M>(path, a.epochs, device.clone())?,
        None => Trainer::<M>::new(cfg, device.clone())?,
    };
    if let Some(init) = &a.init {
        let r = crate::checkpoint::Checkpoint::load(init)?
            .restore_matching(trainer.model.params_mut(), &device)?;
        eprintln!(
            "initialized from {}: {} of {} tensors loaded{}",
            init.display(),
            r.loaded.len(),
            r.loaded.len() + r.fresh.len(),
            if r.fresh.is_empty() {
                ""
            } else {
                "; starting fresh:"
            }
        );
        for (name, why) in &r.fresh {
            eprintln!("  {name} ({why})");
        }
    }
    let spec = trainer.cfg.dataset.clone();
    let [train_set, valid_set, test_set] = open_splits(&trainer.cfg)?;
    // On the CPU, the batch's memory against what the machine has (a batch
    // of 4096 of the paper preset asked for one 8 GiB allocation).
    if let (Device::Cpu(_), Some(available)) = (&device, crate::bench::available_memory()) {
        if let Some(m) = crate::bench::step_memory::<M>(&trainer.cfg, &train_set)? {
            m.check(trainer.cfg.batch_size, available).map_err(usage)?;
        }
    }
    // The last check, as it makes the folder.
    let (out, _lock) = prepare_out(&a)?;
    eprintln!(
        "training on {spec}: {} train / {} valid / {} test images of {:?}, {} classes; {} parameters; device {device}; writing to {}",
        train_set.len(),
        valid_set.len(),
        test_set.len(),
        train_set.image_size(),
        train_set.num_classes(),
        trainer.model.params().num_trainable(),
        out.display()
    );
    handle_ctrlc();
    *AFTER_TRAINING.lock().unwrap_or_else(|e| e.into_inner()) = None;
    trainer.deadline = a
        .minutes
        .map(|m| started + std::time::Duration::from_secs_f64(60.0 * m));
    let fit = trainer.fit(&train_set, Some(&valid_set), &out, true, &STOP)?;
    let ck = out.join(runs::CHECKPOINT);
    // The checkpoint is in its run's folder, where --resume writes: no --out needed.
    let resume = format!("saccade train --resume {}", ck.display());
    if fit.interrupted {
        eprintln!("stopped; continue with: {resume}");
        return Err(interrupted());
    }
    if fit.out_of_time {
        eprintln!("continue this run with: {resume}");
    }
    after_training(&ck, trainer.cfg.sizes[2])?;
    let report = trainer.evaluate(&test_set, true)?;
    let viz = picture(&trainer.model, &test_set, &out)?;
    let seconds = started.elapsed().as_secs_f64();
    let peak = fit.epochs.iter().map(|e| e.peak_bytes).max().unwrap_or(0);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "command": "train",
                "dataset": spec,
                "test_accuracy": report.accuracy,
                "test_coverage": report.coverage,
                "valid_accuracy": fit.epochs.last().map(|e| e.valid_accuracy),
                "epochs": fit.epochs,
                "out_of_time": fit.out_of_time,
                "seconds": seconds,
                "peak_bytes": peak,
                "device": device.to_string(),
                "checkpoint": fit.last_checkpoint,
                "saccades_png": viz,
            })
        );
    } else {
        println!(
            "test accuracy {:.2}% on {} images; {:.0}s; peak tensor memory {:.1} MiB; wrote {}{}",
            100.0 * report.accuracy,
            report.samples,
            seconds,
            peak as f64 / (1 << 20) as f64,
            ck.display(),
            viz.map(|v| format!(" and {}", v.display())).unwrap_or_default()
        );
        if let Some(c) = &report.coverage {
            println!("{}", coverage_line(c));
        }
    }
    let samples = fit.epochs.iter().map(|e| e.samples).sum();
    let train_seconds: f64 = fit.epochs.iter().map(|e| e.seconds).sum();
    Ok(RunSummary {
        seed: trainer.cfg.seed,
        test_accuracy: report.accuracy,
        test_coverage: report.coverage,
        samples,
        train_seconds,
        samples_per_second: samples as f64 / train_seconds.max(1e-9),
        seconds,
    })
}

/// Training is over and `ck` written: from here Ctrl-C ends the process
/// at once, naming the eval command for the `test` images not yet evaluated.
fn after_training(ck: &Path, test: usize) -> Result<(), Failure> {
    let after = format!(
        "interrupted during the test evaluation: training is complete and {} is written; \
         evaluate it with: saccade eval --checkpoint {} --test-size {test}",
        ck.display(),
        ck.display()
    );
    *AFTER_TRAINING.lock().unwrap_or_else(|e| e.into_inner()) = Some(after.clone());
    if STOP.load(Ordering::SeqCst) {
        // Ctrl-C came after the last step, before the message above was set.
        eprintln!("{after}");
        return Err(interrupted());
    }
    Ok(())
}

/// The run's train, valid and test splits, checked against its model and
/// refused when one is empty.
fn open_splits(cfg: &TrainConfig) -> Result<[Arc<dyn data::Dataset>; 3], Failure> {
    let data_cfg = cfg.data_config();
    let spec = &cfg.dataset;
    let train_set = data::open_dataset(spec, Split::Train, &data_cfg)?;
    let valid_set = data::open_dataset(spec, Split::Valid, &data_cfg)?;
    let test_set = data::open_dataset(spec, Split::Test, &data_cfg)?;
    check_compatible(&cfg.model, train_set.as_ref())?;
    if cfg.augment && !train_set.varies() {
        return Err(usage(anyhow::anyhow!(
            "--augment: {spec} has no variations of its images (megapixel-mnist has); leave the flag out"
        )));
    }
    for (split, set) in [("train", &train_set), ("valid", &valid_set), ("test", &test_set)] {
        if set.is_empty() {
            return Err(usage(anyhow::anyhow!(
                "the {split} split of {spec} is empty: a run needs images in all three splits"
            )));
        }
    }
    Ok([train_set, valid_set, test_set])
}

/// The trainer a checkpoint holds, its epochs raised to `epochs` if given.
fn resumed<M: Model>(path: &Path, epochs: Option<usize>, device: Device) -> Result<Trainer<M>, Failure> {
    let mut t = Trainer::<M>::from_checkpoint(path, device)?;
    if let Some(e) = epochs {
        let begun = t.progress.epoch + usize::from(t.progress.step > 0);
        if e < begun {
            return Err(usage(anyhow::anyhow!(
                "--epochs {e} is fewer than the {begun} epochs {} has begun: give --epochs {begun} or more, or leave it out",
                path.display()
            )));
        }
        t.cfg.epochs = e;
    }
    if t.progress.epoch >= t.cfg.epochs {
        // Nothing to train: resuming would only rewrite the checkpoint.
        return Err(usage(anyhow::anyhow!(
            "{} has finished all {} of its epochs: give --epochs {} or more to train on, or \
             evaluate it with `saccade eval --checkpoint {}`",
            path.display(),
            t.cfg.epochs,
            t.cfg.epochs + 1,
            path.display()
        )));
    }
    eprintln!(
        "resuming {} at epoch {} step {}",
        path.display(),
        t.progress.epoch + 1,
        t.progress.step
    );
    Ok(t)
}

/// The folder a checkpoint lies in, read through a symlink such as
/// runs/latest so that it names the run itself.
fn checkpoint_dir(ck: &Path) -> PathBuf {
    let dir = ck.parent().filter(|d| !d.as_os_str().is_empty());
    runs::resolve_link(dir.unwrap_or(Path::new(".")))
}

fn same_file(a: &Path, b: &Path) -> bool {
    matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
}

/// The run's folder, ready before any training: --resume continues in the
/// checkpoint's folder when it is that folder's checkpoint.safetensors; a
/// folder holding another run is refused unless --overwrite; without --out
/// a new folder under runs/.
fn prepare_out(a: &TrainArgs) -> Result<(PathBuf, runs::RunLock), Failure> {
    let own = a.resume.as_deref().map(checkpoint_dir);
    let Some(out) = a.out.clone().or(own.clone()) else {
        let dir = new_run_dir().map_err(usage)?;
        runs::check_writable(&dir).map_err(usage)?;
        let lock = runs::lock(&dir).map_err(usage)?;
        return Ok((dir, lock));
    };
    let continuing = a
        .resume
        .as_deref()
        .is_some_and(|ck| same_file(ck, &out.join(runs::CHECKPOINT)));
    if !continuing && runs::holds_run(&out) && !a.overwrite {
        let d = out.display();
        return Err(usage(anyhow::anyhow!(
            "the output folder {d} already holds a run ({d}/{} or {d}/{}): continue it with --resume {d}/{}, \
             replace it with --overwrite, or choose another --out",
            runs::CHECKPOINT,
            runs::METRICS,
            runs::CHECKPOINT
        )));
    }
    runs::check_writable(&out).map_err(usage)?;
    let lock = runs::lock(&out).map_err(usage)?;
    if !continuing && !runs::holds_run(&out) {
        let other = std::fs::read_dir(&out)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok());
        if let Some(e) = other {
            return Err(usage(anyhow::anyhow!(
                "the output folder {} holds files that are not a run (such as {}): a run writes {}, {} and \
                 saccades.png there; choose an empty or new --out",
                out.display(),
                e.file_name().to_string_lossy(),
                runs::CHECKPOINT,
                runs::METRICS
            )));
        }
    }
    if continuing {
        return Ok((own.unwrap_or(out), lock));
    }
    if a.overwrite {
        runs::clear_run(&out)?;
    }
    Ok((out, lock))
}

/// A new folder runs/<UTC time> for a run given no --out, with runs/latest
/// pointing at it.
pub(super) fn new_run_dir() -> Result<PathBuf> {
    let root = Path::new("runs");
    let dir = runs::fresh_dir(root, &runs::stamp(std::time::SystemTime::now()))?;
    if !runs::point_latest(root, &dir)? {
        eprintln!(
            "note: runs/latest is a folder from an earlier version (or this system has no symlinks) \
             and stays as it is; this run writes to {}",
            dir.display()
        );
    }
    Ok(dir)
}
