//! The `saccade` command line: parses flags, calls the library, prints.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use saccade::data::commands::{self, GenerateArgs, ImportArgs, InspectArgs, OutputFormat};
use saccade::data::spec::{DatasetSpec, SPEC_HELP};
use saccade::data::{self, Split, SplitSizes};
use saccade::models::{
    GlimpsePool, ResNet18, ResNetConfig, SaccadeConfig, Saccader, TiledConfig, TiledResNet18,
};
use saccade::train::{checkpoint_config, Baseline, Coverage, LrSchedule, Model, TrainConfig, Trainer};
use saccade::{runs, Device};

#[derive(Parser)]
#[command(
    name = "saccade",
    version,
    about = "Variational saccading: classify huge images by learning where to look",
    long_about = "Variational saccading (Ramapuram et al.): a recurrent latent-variable model looks at a \
                  cheap proxy of an image (a 32x32 downsample) and learns where to crop the full-resolution \
                  image; only the crops are ever read at full resolution.\n\n\
                  Start with `saccade train` (trains on the vendored cluttered MNIST with defaults sized \
                  for a laptop CPU), then `saccade eval --checkpoint runs/latest/checkpoint.safetensors`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (defaults: cluttered-mnist, 100x100, auto device).
    Train(TrainArgs),
    /// Evaluate a checkpoint: accuracy, per-class accuracy, confusions.
    Eval(EvalArgs),
    /// Classify image files with a checkpoint and draw where it looked.
    Predict(PredictArgs),
    /// Write a checkpoint's weights, configuration and class names without the optimizer
    /// state: a third of the size, for sharing (eval and predict read it; training cannot
    /// resume from it exactly).
    #[command(
        after_help = "Example:\n  saccade export --checkpoint runs/latest/checkpoint.safetensors --out model.safetensors"
    )]
    Export(ExportArgs),
    /// Generate, import and inspect datasets.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Show the compute devices found.
    Device,
    /// Time one training step and peak memory: saccade against the tiled
    /// ResNet18 at 2528² and against ResNet18 at 100² (the paper's Table 1).
    Bench(BenchArgs),
    /// CUDA kernel tools.
    Kernels {
        #[command(subcommand)]
        command: KernelsCommand,
    },
}

#[derive(Subcommand)]
enum KernelsCommand {
    /// Compile every kernels/*.cu with NVRTC for each architecture (no GPU needed).
    Check {
        /// Comma-separated GPU architectures.
        #[arg(long, value_delimiter = ',', default_value = "sm_80,sm_90")]
        arch: Vec<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// Tiled pyramid store (use the folder as --dataset).
    Store,
    /// PNG files, OUT/<split>/<class>/<index>.png.
    Png,
}

#[derive(Clone, Copy, ValueEnum)]
enum SplitArg {
    Train,
    Valid,
    Test,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Write a generated dataset (all three splits) to disk.
    #[command(after_help = SPEC_HELP)]
    Generate {
        /// Dataset spec (see below).
        #[arg(long, default_value = "cluttered-mnist")]
        dataset: String,
        /// Output folder (must be new or empty).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 100_000)]
        train: usize,
        #[arg(long, default_value_t = 10_000)]
        valid: usize,
        #[arg(long, default_value_t = 10_000)]
        test: usize,
        #[arg(long, value_enum, default_value = "store")]
        format: Format,
    },
    /// Import PNG/JPEG/TIFF images, one class per subfolder, into a tiled store.
    Import {
        /// Folder with one subfolder of images per class.
        #[arg(long)]
        folder: PathBuf,
        /// Store folder to create.
        #[arg(long)]
        out: PathBuf,
        /// Resize every image to SIZE x SIZE (required when sizes differ).
        #[arg(long)]
        size: Option<usize>,
        /// Fraction of images in the valid split (fixed per file by a hash of its path).
        #[arg(long, default_value_t = 0.1)]
        valid_frac: f64,
        /// Fraction of images in the test split.
        #[arg(long, default_value_t = 0.1)]
        test_frac: f64,
    },
    /// Draw a grid of images with their proxies and labels to a PNG.
    #[command(after_help = SPEC_HELP)]
    Inspect {
        /// A store folder or a dataset spec (see below).
        dataset: String,
        #[arg(long, default_value = "grid.png")]
        out: PathBuf,
        #[arg(long, default_value_t = 12)]
        count: usize,
        #[arg(long, value_enum, default_value = "train")]
        split: SplitArg,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Side of each picture in pixels.
        #[arg(long, default_value_t = 160)]
        cell: u32,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum DeviceChoice {
    /// A GPU if one is usable, else the CPU (says why).
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Preset {
    /// Sized to train in under 15 minutes on a 2-core CPU: 32x32 crops at 0.2-0.5 of the side,
    /// T=4, hidden 128, hard mask over attended cells, 4 epochs of 100k images, batch 32,
    /// Adam 1e-3 with warmup + cosine decay.
    Small,
    /// The paper's setting: 64x64 crops at 0.1-0.3 of the side, hidden 256, 60 epochs of 100k
    /// images, batch 100, Adam 1e-4 constant, gradient values clipped to 0.25.
    Paper,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum ModelChoice {
    /// Variational saccading.
    Saccade,
    /// Baseline: ResNet18 over the whole image (100x100 tasks).
    Resnet18,
    /// Baseline: one ResNet18 over every tile of a large image, features summed.
    TiledResnet18,
}

#[derive(Args, Clone)]
struct DeviceArgs {
    /// Compute device.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args, Clone)]
struct TrainArgs {
    // Flags with defaults are options, applied in `train_config`, so that a
    // flag given with --resume can be told from one left out.
    /// Dataset: a generated task (see `saccade data generate --help`) or a store folder
    /// [default: cluttered-mnist].
    #[arg(long)]
    dataset: Option<String>,
    /// Model and training defaults that the other flags override [default: small].
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    /// Which model to train [default: saccade].
    #[arg(long, value_enum)]
    model: Option<ModelChoice>,
    /// ResNet first-stage width for the baselines [default: 64, the standard ResNet18].
    #[arg(long)]
    resnet_width: Option<usize>,
    /// Tiled ResNet18: tile side in pixels [default: 224].
    #[arg(long)]
    tile: Option<usize>,
    /// Tiled ResNet18: tiles per trunk pass [default: 16].
    #[arg(long)]
    tile_chunk: Option<usize>,
    /// Tiled ResNet18: recompute each chunk of tiles in backward (gradient checkpointing).
    #[arg(long)]
    checkpointing: bool,
    #[command(flatten)]
    device: DeviceArgs,
    /// Passes over the training set (with --resume: raise it to extend the run).
    #[arg(long)]
    epochs: Option<usize>,
    /// Wall-clock budget: stop training after this many minutes (mid-epoch if need be,
    /// with a resumable checkpoint), then evaluate on the test split.
    #[arg(long)]
    minutes: Option<f64>,
    #[arg(long)]
    batch_size: Option<usize>,
    /// Adam learning rate.
    #[arg(long)]
    lr: Option<f32>,
    /// Learning-rate schedule over the run.
    #[arg(long, value_enum)]
    lr_schedule: Option<LrSchedule>,
    /// Training images (generated datasets).
    #[arg(long)]
    train_size: Option<usize>,
    /// Validation images (generated datasets; at least 1: every epoch is validated).
    #[arg(long)]
    valid_size: Option<usize>,
    /// Test images (generated datasets; at least 1: a run ends with a test evaluation).
    #[arg(long)]
    test_size: Option<usize>,
    /// Glimpses per image (T).
    #[arg(long)]
    glimpses: Option<usize>,
    /// Crop side in pixels (L).
    #[arg(long)]
    crop: Option<usize>,
    /// Largest glimpse as a fraction of the image side.
    #[arg(long)]
    max_scale: Option<f32>,
    /// Weight of the VRNN terms (proxy NLL + KL) against the classification loss.
    #[arg(long)]
    beta: Option<f32>,
    /// Multiply the classification loss by the VRNN terms (the authors' code) instead of adding them (the paper).
    #[arg(long)]
    multiplicative: bool,
    /// Let later glimpses attend to proxy cells an earlier glimpse already covered (ablation of
    /// the default hard mask, which excludes them).
    #[arg(long)]
    no_mask: bool,
    /// Training images during which the classification loss does not move the glimpses (then
    /// ramped in over as many images): the classifier learns what matters before the glimpses
    /// follow it. Default 40000 for the small preset, 0 (off) for paper.
    #[arg(long)]
    policy_warmup: Option<usize>,
    /// How the glimpses' features are pooled into one: mean (the paper, default) or max.
    #[arg(long, value_enum)]
    glimpse_pool: Option<GlimpsePool>,
    /// Fix the posterior variance to this value instead of learning it (paper ablation, e.g. 0.6).
    #[arg(long)]
    fixed_variance: Option<f32>,
    /// Proxy side in pixels (default 32; same as `,proxy=J` in the dataset spec).
    #[arg(long)]
    proxy_size: Option<usize>,
    /// Standard deviation of Gaussian noise added to the proxy, robustness ablation
    /// (same as `,noise=S` in the dataset spec).
    #[arg(long)]
    proxy_noise: Option<f32>,
    /// Clip gradient values to [-c, c] (0: off).
    #[arg(long)]
    clip_value: Option<f32>,
    /// Seed of the data, the initialization and the training noise [default: 1].
    #[arg(long)]
    seed: Option<u64>,
    /// Output folder for the checkpoint, metrics.jsonl and saccades.png. Default: a new
    /// folder runs/<YYYYMMDD-HHMMSS> (UTC), with runs/latest pointing at it; with --resume,
    /// the checkpoint's folder. A folder that holds another run is refused (see --overwrite).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace the run in --out instead of refusing the folder.
    #[arg(long)]
    overwrite: bool,
    /// Continue from a checkpoint written by an earlier run, in its folder. Flags that
    /// would change its configuration are refused; --epochs may extend it.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Print one JSON object with the figures as the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchArgs {
    #[command(subcommand)]
    what: Option<BenchCommand>,
    /// Image side; 2528 compares with the tiled ResNet18, 100 with ResNet18 (default: both).
    #[arg(long)]
    size: Option<usize>,
    /// Batch size (default: 2, or 32 with --profile).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Timed steps per model after one warm-up step.
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// Instead of the comparison, print a per-op profile of the saccade
    /// model's training step on the CPU (at --size, default 100).
    #[arg(long)]
    profile: bool,
    /// The saccade preset --profile runs.
    #[arg(long, value_enum, default_value_t = Preset::Small)]
    preset: Preset,
    /// Training images per epoch for the epoch estimate.
    #[arg(long, default_value_t = 100_000)]
    epoch_images: usize,
    /// Tiled ResNet18: tiles per trunk pass.
    #[arg(long, default_value_t = 16)]
    tile_chunk: usize,
    /// Tiled ResNet18 with gradient checkpointing per chunk of tiles.
    #[arg(long)]
    checkpointing: bool,
    /// CPU only, even when a GPU is usable.
    #[arg(long)]
    no_gpu: bool,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print the figures as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Train a configuration with several seeds and report test accuracy, glimpse coverage,
    /// samples seen and samples/s per seed and as median/min/max.
    #[command(
        after_help = "Example, the default configuration under a 15-minute budget per seed:\n  \
        saccade bench learning --seeds 3 --minutes 15 --out runs/learning\n\
        Every `saccade train` flag applies; seed N runs with --seed <seed>+N into OUT/seed-<seed>."
    )]
    Learning(LearningArgs),
}

#[derive(Args)]
struct LearningArgs {
    /// How many seeds, counting up from --seed.
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Args)]
struct EvalArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    /// Dataset to evaluate on (default: the checkpoint's, test split).
    #[arg(long)]
    dataset: Option<String>,
    #[arg(long)]
    test_size: Option<usize>,
    #[command(flatten)]
    device: DeviceArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ExportArgs {
    /// Checkpoint written by `saccade train`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// File to write (must not exist).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct PredictArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    /// PNG, JPEG or TIFF files, or a store folder.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Write the images with their saccades drawn to this PNG.
    #[arg(long)]
    viz: Option<PathBuf>,
    /// Classes to list per image.
    #[arg(long, default_value_t = 3)]
    top: usize,
    #[command(flatten)]
    device: DeviceArgs,
    #[arg(long)]
    json: bool,
}

/// A failure with its exit code: 2 for usage and environment errors.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure { code: 1, error }
    }
}

fn select_device(args: &DeviceArgs) -> Result<Device, Failure> {
    if let Some(n) = args.threads {
        // Only fails when a pool already exists, which is harmless.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    }
    match args.device {
        DeviceChoice::Cpu => Ok(Device::cpu()),
        DeviceChoice::Auto => {
            let (device, why) = saccade::device::auto_device();
            eprintln!("{why}");
            Ok(device)
        }
        DeviceChoice::Cuda => Device::cuda(0).map_err(|e| Failure {
            code: 2,
            error: e.context("--device cuda"),
        }),
    }
}

/// Raised by the first Ctrl-C during training: the loop then writes a checkpoint and stops.
static STOP: AtomicBool = AtomicBool::new(false);
/// What Ctrl-C says once training is over and its checkpoint written; it
/// then ends the process at once (the test evaluation writes nothing).
static AFTER_TRAINING: Mutex<Option<String>> = Mutex::new(None);

/// Install the Ctrl-C handler, once: `bench learning` trains several runs.
fn handle_ctrlc() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if let Some(msg) = AFTER_TRAINING.lock().ok().and_then(|m| m.clone()) {
                eprintln!("\n{msg}");
                std::process::exit(130);
            }
            if STOP.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\nstopping: writing a checkpoint (press Ctrl-C again to quit now)");
        });
    });
}

/// The saccade picture for the saccade model; nothing for the baselines.
type Picture<M> = fn(&M, &Arc<dyn data::Dataset>, &std::path::Path) -> Result<Option<PathBuf>>;

fn saccade_picture(
    m: &Saccader,
    test: &Arc<dyn data::Dataset>,
    out: &std::path::Path,
) -> Result<Option<PathBuf>> {
    let viz = out.join("saccades.png");
    saccade::predict::save_saccade_picture(m, test, 8, &viz)?;
    Ok(Some(viz))
}

fn no_picture<M>(_: &M, _: &Arc<dyn data::Dataset>, _: &std::path::Path) -> Result<Option<PathBuf>> {
    Ok(None)
}

/// What one training run measured (the learning benchmark's row).
#[derive(serde::Serialize)]
struct RunSummary {
    seed: u64,
    test_accuracy: f64,
    test_coverage: Option<Coverage>,
    samples: usize,
    train_seconds: f64,
    samples_per_second: f64,
    seconds: f64,
}

fn usage(error: anyhow::Error) -> Failure {
    Failure { code: 2, error }
}

fn run_train(a: TrainArgs) -> Result<RunSummary, Failure> {
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
fn check_train_flags(a: &TrainArgs) -> Result<(), Failure> {
    if a.minutes.is_some_and(|m| m.is_nan() || m <= 0.0) {
        return Err(usage(anyhow::anyhow!("--minutes must be positive")));
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
    if a.overwrite && a.out.is_none() {
        return Err(usage(anyhow::anyhow!(
            "--overwrite needs --out: without --out every run gets a new folder"
        )));
    }
    Ok(())
}

fn train_model<M: Model>(a: TrainArgs, cfg: TrainConfig, picture: Picture<M>) -> Result<RunSummary, Failure> {
    let device = select_device(&a.device)?;
    let started = std::time::Instant::now();
    let mut trainer = match &a.resume {
        Some(path) => resumed::<M>(path, a.epochs, device.clone())?,
        None => Trainer::<M>::new(cfg, device.clone())?,
    };
    let [train, valid, test] = trainer.cfg.sizes;
    let cfg = data::DataConfig {
        seed: trainer.cfg.seed,
        sizes: SplitSizes { train, valid, test },
        mnist_dir: None,
    };
    let spec = trainer.cfg.dataset.clone();
    let train_set = data::open_dataset(&spec, Split::Train, &cfg)?;
    let valid_set = data::open_dataset(&spec, Split::Valid, &cfg)?;
    let test_set = data::open_dataset(&spec, Split::Test, &cfg)?;
    check_compatible(&trainer.cfg.model, train_set.as_ref())?;
    for (split, set) in [("train", &train_set), ("valid", &valid_set), ("test", &test_set)] {
        if set.is_empty() {
            return Err(usage(anyhow::anyhow!(
                "the {split} split of {spec} is empty: a run needs images in all three splits"
            )));
        }
    }
    // The last check, as it makes the folder.
    let out = prepare_out(&a)?;
    if !a.json {
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
    }
    handle_ctrlc();
    *AFTER_TRAINING.lock().unwrap_or_else(|e| e.into_inner()) = None;
    trainer.deadline = a
        .minutes
        .map(|m| started + std::time::Duration::from_secs_f64(60.0 * m));
    let fit = trainer.fit(&train_set, Some(&valid_set), &out, !a.json, &STOP)?;
    let ck = out.join(runs::CHECKPOINT);
    // The checkpoint is in its run's folder, where --resume writes: no --out needed.
    let resume = format!("saccade train --resume {}", ck.display());
    if fit.interrupted {
        eprintln!("stopped; continue with: {resume}");
        return Err(Failure {
            code: 130,
            error: anyhow::anyhow!("interrupted"),
        });
    }
    if fit.out_of_time {
        eprintln!("continue this run with: {resume}");
    }
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
        return Err(Failure {
            code: 130,
            error: anyhow::anyhow!("interrupted"),
        });
    }
    let report = trainer.evaluate(&test_set, !a.json)?;
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
fn prepare_out(a: &TrainArgs) -> Result<PathBuf, Failure> {
    let own = a.resume.as_deref().map(checkpoint_dir);
    let Some(out) = a.out.clone().or(own.clone()) else {
        let dir = new_run_dir().map_err(usage)?;
        runs::check_writable(&dir).map_err(usage)?;
        return Ok(dir);
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
    if continuing {
        return Ok(own.unwrap_or(out));
    }
    if a.overwrite {
        runs::clear_run(&out)?;
    }
    Ok(out)
}

/// A new folder runs/<UTC time> for a run given no --out, with runs/latest
/// pointing at it.
fn new_run_dir() -> Result<PathBuf> {
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

/// The dataset spec with the proxy flags folded in; `base` without --dataset.
fn dataset_spec(a: &TrainArgs, base: &str) -> String {
    let mut spec = a.dataset.clone().unwrap_or_else(|| base.to_string());
    if let Some(j) = a.proxy_size {
        spec.push_str(&format!(",proxy={j}"));
    }
    if let Some(n) = a.proxy_noise {
        spec.push_str(&format!(",noise={n}"));
    }
    spec
}

/// Open a few test samples of `spec` to learn its shapes and class names.
fn probe(spec: &str) -> Result<Arc<dyn data::Dataset>> {
    let cfg = data::DataConfig {
        sizes: SplitSizes {
            train: 1,
            valid: 1,
            test: 1,
        },
        ..Default::default()
    };
    data::open_dataset(spec, Split::Test, &cfg)
}

fn preset_model(p: Preset, channels: usize, num_classes: usize) -> SaccadeConfig {
    match p {
        Preset::Small => SaccadeConfig::small(channels, num_classes),
        Preset::Paper => SaccadeConfig::paper(channels, num_classes),
    }
}

/// A new run's configuration: the preset's, then the flags given.
fn train_config(a: &TrainArgs) -> Result<TrainConfig> {
    let spec = dataset_spec(a, "cluttered-mnist");
    let probe = probe(&spec)?;
    let preset = a.preset.unwrap_or(Preset::Small);
    let paper = preset == Preset::Paper;
    let mut model = preset_model(preset, probe.channels(), probe.num_classes());
    model.proxy_size = probe.proxy_shape().1;
    let mut cfg = TrainConfig {
        model,
        baseline: None,
        dataset: spec,
        epochs: if paper { 60 } else { 4 },
        batch_size: if paper { 100 } else { 32 },
        lr: if paper { 1e-4 } else { 1e-3 },
        lr_schedule: if paper {
            LrSchedule::Constant
        } else {
            LrSchedule::Cosine
        },
        clip_value: if paper { 0.25 } else { 0.0 },
        clip_norm: 0.0,
        seed: 1,
        class_names: probe.class_names(),
        sizes: [
            100_000,
            if paper { 10_000 } else { 1_000 },
            if paper { 10_000 } else { 2_000 },
        ],
    };
    apply_flags(a, &mut cfg);
    cfg.validate()?;
    Ok(cfg)
}

/// Put the flags given into `cfg`; a flag left out leaves it as it is (the
/// dataset and proxy flags are the caller's: they make the spec).
fn apply_flags(a: &TrainArgs, cfg: &mut TrainConfig) {
    let m = &mut cfg.model;
    m.glimpses = a.glimpses.unwrap_or(m.glimpses);
    m.crop = a.crop.unwrap_or(m.crop);
    m.scale_max = a.max_scale.unwrap_or(m.scale_max);
    m.beta = a.beta.unwrap_or(m.beta);
    m.policy_warmup = a.policy_warmup.unwrap_or(m.policy_warmup);
    m.glimpse_pool = a.glimpse_pool.unwrap_or(m.glimpse_pool);
    m.multiplicative |= a.multiplicative;
    m.mask_attended &= !a.no_mask;
    if a.fixed_variance.is_some() {
        m.fixed_variance = a.fixed_variance;
    }
    let (channels, num_classes) = (m.channels, m.num_classes);
    cfg.epochs = a.epochs.unwrap_or(cfg.epochs);
    cfg.batch_size = a.batch_size.unwrap_or(cfg.batch_size);
    cfg.lr = a.lr.unwrap_or(cfg.lr);
    cfg.lr_schedule = a.lr_schedule.unwrap_or(cfg.lr_schedule);
    cfg.clip_value = a.clip_value.unwrap_or(cfg.clip_value);
    cfg.seed = a.seed.unwrap_or(cfg.seed);
    for (s, v) in cfg
        .sizes
        .iter_mut()
        .zip([a.train_size, a.valid_size, a.test_size])
    {
        *s = v.unwrap_or(*s);
    }
    cfg.baseline = baseline(a, cfg.baseline, channels, num_classes);
}

/// The baseline the flags ask for, starting from `current`.
fn baseline(
    a: &TrainArgs,
    current: Option<Baseline>,
    channels: usize,
    num_classes: usize,
) -> Option<Baseline> {
    let kind = a.model.unwrap_or(match current {
        None => ModelChoice::Saccade,
        Some(Baseline::ResNet18(_)) => ModelChoice::Resnet18,
        Some(Baseline::TiledResNet18(_)) => ModelChoice::TiledResnet18,
    });
    match kind {
        ModelChoice::Saccade => None,
        ModelChoice::Resnet18 => {
            let mut c = match current {
                Some(Baseline::ResNet18(c)) => c,
                _ => ResNetConfig {
                    channels,
                    num_classes,
                    width: 64,
                },
            };
            c.width = a.resnet_width.unwrap_or(c.width);
            Some(Baseline::ResNet18(c))
        }
        ModelChoice::TiledResnet18 => {
            let mut c = match current {
                Some(Baseline::TiledResNet18(c)) => c,
                _ => TiledConfig::paper(channels, num_classes),
            };
            c.width = a.resnet_width.unwrap_or(c.width);
            c.tile = a.tile.unwrap_or(c.tile);
            c.chunk = a.tile_chunk.unwrap_or(c.chunk);
            c.checkpoint |= a.checkpointing;
            Some(Baseline::TiledResNet18(c))
        }
    }
}

/// The checkpoint's configuration, refusing flags that would change it;
/// --epochs may (a run can be extended, see `resumed`).
fn resume_config(a: &TrainArgs, path: &Path) -> Result<TrainConfig, Failure> {
    let saved = checkpoint_config(path)?;
    let mut want = saved.clone();
    apply_flags(a, &mut want);
    want.epochs = saved.epochs;
    let mut conflicts: Vec<String> = config_differences(&want, &saved)
        .into_iter()
        .map(|(field, w, s)| format!("{} ({field} {w}, the checkpoint's {s})", flag_of(&field)))
        .collect();
    if let Some(p) = a.preset {
        // The preset's own fields: those no other flag given sets.
        let m = &saved.model;
        let mut preset = TrainConfig {
            model: SaccadeConfig {
                proxy_size: m.proxy_size,
                ..preset_model(p, m.channels, m.num_classes)
            },
            ..saved.clone()
        };
        apply_flags(a, &mut preset);
        preset.epochs = saved.epochs;
        let fields: Vec<String> = config_differences(&preset, &want)
            .into_iter()
            .map(|(field, w, s)| format!("{field} {w} against {s}"))
            .collect();
        if !fields.is_empty() {
            conflicts.push(format!("--preset ({})", fields.join(", ")));
        }
    }
    if a.dataset.is_some() || a.proxy_size.is_some() || a.proxy_noise.is_some() {
        let spec = dataset_spec(a, &saved.dataset);
        if DatasetSpec::parse(&spec).ok() != DatasetSpec::parse(&saved.dataset).ok() {
            conflicts.push(format!(
                "--dataset/--proxy-size/--proxy-noise ({spec}, the checkpoint's {})",
                saved.dataset
            ));
        }
    }
    if !conflicts.is_empty() {
        return Err(usage(anyhow::anyhow!(
            "--resume {}: these flags conflict with the checkpoint's configuration: {}. \
             Leave them out to continue that run, or start a new run without --resume",
            path.display(),
            conflicts.join("; ")
        )));
    }
    Ok(saved)
}

/// The fields where `a` and `b` differ, as (path, a's value, b's value).
fn config_differences(a: &TrainConfig, b: &TrainConfig) -> Vec<(String, String, String)> {
    // Through text, so that f32 values read as written (0.01, not 0.009999999776).
    let json = |c: &TrainConfig| -> serde_json::Value {
        serde_json::to_string(c)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    diff_json(String::new(), &json(a), &json(b), &mut out);
    out
}

fn diff_json(
    path: String,
    a: &serde_json::Value,
    b: &serde_json::Value,
    out: &mut Vec<(String, String, String)>,
) {
    use serde_json::Value;
    let join = |k: &dyn std::fmt::Display| match path.is_empty() {
        true => k.to_string(),
        false => format!("{path}.{k}"),
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let (u, v) = (x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null));
                diff_json(join(k), u, v, out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                diff_json(join(&i), u, v, out);
            }
        }
        _ if a != b => out.push((path, a.to_string(), b.to_string())),
        _ => {}
    }
}

/// The `saccade train` flag that sets a configuration field.
fn flag_of(field: &str) -> &'static str {
    match field {
        "sizes.0" => return "--train-size",
        "sizes.1" => return "--valid-size",
        "sizes.2" => return "--test-size",
        _ => {}
    }
    match field.rsplit('.').next().unwrap_or(field) {
        "glimpses" => "--glimpses",
        "crop" => "--crop",
        "scale_max" => "--max-scale",
        "beta" => "--beta",
        "multiplicative" => "--multiplicative",
        "fixed_variance" => "--fixed-variance",
        "mask_attended" => "--no-mask",
        "policy_warmup" => "--policy-warmup",
        "glimpse_pool" => "--glimpse-pool",
        "batch_size" => "--batch-size",
        "lr" => "--lr",
        "lr_schedule" => "--lr-schedule",
        "clip_value" => "--clip-value",
        "seed" => "--seed",
        "width" => "--resnet-width",
        "tile" => "--tile",
        "chunk" => "--tile-chunk",
        "checkpoint" => "--checkpointing",
        "baseline" | "ResNet18" | "TiledResNet18" => "--model",
        _ => "a flag",
    }
}

/// The checkpoint's class names, or (older checkpoints) its dataset's.
fn class_names(cfg: &TrainConfig) -> Result<Vec<String>> {
    if !cfg.class_names.is_empty() {
        return Ok(cfg.class_names.clone());
    }
    Ok(probe(&cfg.dataset)?.class_names())
}

fn check_compatible(m: &SaccadeConfig, d: &dyn data::Dataset) -> Result<()> {
    if m.channels != d.channels()
        || m.num_classes != d.num_classes()
        || d.proxy_shape() != (m.channels, m.proxy_size)
    {
        bail!(
            "the model has {} channels, {} classes and {}x{} proxies but {} has {} channels, {} classes and {:?} proxies",
            m.channels,
            m.num_classes,
            m.proxy_size,
            m.proxy_size,
            d.describe(),
            d.channels(),
            d.num_classes(),
            d.proxy_shape()
        );
    }
    Ok(())
}

fn run_eval(a: EvalArgs) -> Result<(), Failure> {
    match checkpoint_config(&a.checkpoint)?.baseline {
        None => eval_model::<Saccader>(a),
        Some(Baseline::ResNet18(_)) => eval_model::<ResNet18>(a),
        Some(Baseline::TiledResNet18(_)) => eval_model::<TiledResNet18>(a),
    }
}

fn eval_model<M: Model>(a: EvalArgs) -> Result<(), Failure> {
    let device = select_device(&a.device)?;
    let mut t = Trainer::<M>::from_checkpoint(&a.checkpoint, device)?;
    let spec = a.dataset.unwrap_or_else(|| t.cfg.dataset.clone());
    let cfg = data::DataConfig {
        seed: t.cfg.seed,
        sizes: SplitSizes {
            test: a.test_size.unwrap_or(2_000),
            ..Default::default()
        },
        mnist_dir: None,
    };
    let test = data::open_dataset(&spec, Split::Test, &cfg)?;
    check_compatible(&t.cfg.model, test.as_ref())?;
    let r = t.evaluate(&test, !a.json)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"command": "eval", "dataset": spec, "report": r})
        );
        return Ok(());
    }
    println!(
        "accuracy {:.2}% on {} test images of {spec}",
        100.0 * r.accuracy,
        r.samples
    );
    if let Some(c) = &r.coverage {
        println!("{}", coverage_line(c));
    }
    let mut worst: Vec<(usize, f64)> = r.per_class_accuracy.iter().copied().enumerate().collect();
    worst.sort_by(|a, b| a.1.total_cmp(&b.1));
    println!("lowest per-class accuracy:");
    for (c, acc) in worst.iter().take(5) {
        println!("  {:>8}  {:.1}%", r.class_names[*c], 100.0 * acc);
    }
    println!("most frequent confusions (true -> predicted: count):");
    for (t, p, n) in r.top_confusions(5) {
        println!("  {t:>8} -> {p:<8} {n}");
    }
    Ok(())
}

fn coverage_line(c: &Coverage) -> String {
    format!(
        "glimpse coverage: every object inside some glimpse in {:.1}% of images; {:.2} of {:.2} objects covered on average",
        100.0 * c.all_objects,
        c.mean_covered,
        c.mean_objects
    )
}

fn run_export(a: ExportArgs) -> Result<(), Failure> {
    if a.out.exists() {
        return Err(Failure {
            code: 2,
            error: anyhow::anyhow!("--out {} exists; choose a new file", a.out.display()),
        });
    }
    match checkpoint_config(&a.checkpoint)?.baseline {
        None => export_model::<Saccader>(a),
        Some(Baseline::ResNet18(_)) => export_model::<ResNet18>(a),
        Some(Baseline::TiledResNet18(_)) => export_model::<TiledResNet18>(a),
    }
}

fn export_model<M: Model>(a: ExportArgs) -> Result<(), Failure> {
    let mut t = Trainer::<M>::from_checkpoint(&a.checkpoint, Device::cpu())?;
    t.cfg.class_names = class_names(&t.cfg)?;
    t.save_weights(&a.out)?;
    let bytes = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({:.1} MB): weights, configuration and {} class names",
        a.out.display(),
        bytes as f64 / 1e6,
        t.cfg.class_names.len()
    );
    Ok(())
}

fn run_predict(a: PredictArgs) -> Result<(), Failure> {
    let device = select_device(&a.device)?;
    let t = Trainer::<Saccader>::from_checkpoint(&a.checkpoint, device)?;
    let names = class_names(&t.cfg)?;
    let results = saccade::predict::predict_files(&t.model, &a.images, a.viz.as_deref())?;
    let mut rows = Vec::new();
    for (path, probs) in a.images.iter().zip(&results) {
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&i, &j| probs[j].total_cmp(&probs[i]));
        let top: Vec<(String, f32)> = order
            .iter()
            .take(a.top)
            .map(|&i| (names[i].clone(), probs[i]))
            .collect();
        if !a.json {
            let s: Vec<String> = top
                .iter()
                .map(|(n, p)| format!("{n} {:.1}%", 100.0 * p))
                .collect();
            println!("{}: {}", path.display(), s.join(", "));
        }
        rows.push(serde_json::json!({"image": path, "top": top}));
    }
    if let Some(v) = &a.viz {
        if !a.json {
            println!("wrote {}", v.display());
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({"command": "predict", "predictions": rows, "viz": a.viz})
        );
    }
    Ok(())
}

fn run_data(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Generate {
            dataset,
            out,
            seed,
            train,
            valid,
            test,
            format,
        } => commands::generate(&GenerateArgs {
            dataset,
            out,
            seed,
            sizes: SplitSizes { train, valid, test },
            format: match format {
                Format::Store => OutputFormat::Store,
                Format::Png => OutputFormat::Png,
            },
            mnist_dir: None,
        }),
        DataCommand::Import {
            folder,
            out,
            size,
            valid_frac,
            test_frac,
        } => commands::import(&ImportArgs {
            folder,
            out,
            size,
            valid_frac,
            test_frac,
        }),
        DataCommand::Inspect {
            dataset,
            out,
            count,
            split,
            seed,
            cell,
        } => commands::inspect(&InspectArgs {
            dataset,
            out,
            count,
            split: match split {
                SplitArg::Train => Split::Train,
                SplitArg::Valid => Split::Valid,
                SplitArg::Test => Split::Test,
            },
            seed,
            cell,
        }),
    }
}

fn run_bench(a: BenchArgs) -> Result<(), Failure> {
    if let Some(BenchCommand::Learning(l)) = a.what {
        return run_learning(l);
    }
    if let Some(n) = a.threads {
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    }
    let batch_size = a.batch_size.unwrap_or(if a.profile { 32 } else { 2 });
    if batch_size == 0 || a.steps == 0 || a.tile_chunk == 0 {
        return Err(Failure {
            code: 2,
            error: anyhow::anyhow!("need --batch-size, --steps and --tile-chunk >= 1"),
        });
    }
    if a.profile {
        let size = a.size.unwrap_or(100);
        print!(
            "{}",
            saccade::bench::profile(a.preset == Preset::Paper, size, batch_size, a.steps)?
        );
        return Ok(());
    }
    let cfg = saccade::bench::BenchConfig {
        sizes: a.size.map(|s| vec![s]).unwrap_or_else(|| vec![2528, 100]),
        batch_size,
        steps: a.steps,
        epoch_images: a.epoch_images,
        tile_chunk: a.tile_chunk,
        checkpointing: a.checkpointing,
        gpu: !a.no_gpu,
    };
    let report = saccade::bench::run(&cfg, &|line| eprintln!("{line}"))?;
    if a.json {
        println!("{}", serde_json::to_string(&report).map_err(anyhow::Error::from)?);
    } else {
        print!("{}", saccade::bench::table(&report.comparisons));
        for s in &report.skipped {
            println!("skipped {s}");
        }
    }
    Ok(())
}

/// Median, min and max of `v`.
fn median_min_max(mut v: Vec<f64>) -> [f64; 3] {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    [median, v[0], v[n - 1]]
}

/// The learning benchmark: one training run per seed, then the table.
fn run_learning(l: LearningArgs) -> Result<(), Failure> {
    if l.seeds == 0 || l.train.resume.is_some() {
        return Err(Failure {
            code: 2,
            error: anyhow::anyhow!("bench learning needs --seeds >= 1 and no --resume"),
        });
    }
    check_train_flags(&l.train)?;
    let base = match &l.train.out {
        Some(out) => out.clone(),
        None => new_run_dir().map_err(usage)?,
    };
    let mut rows = Vec::new();
    for k in 0..l.seeds {
        let mut a = l.train.clone();
        let seed = l.train.seed.unwrap_or(1) + k;
        let out = base.join(format!("seed-{seed}"));
        eprintln!("seed {seed} ({} of {}) -> {}", k + 1, l.seeds, out.display());
        (a.seed, a.out) = (Some(seed), Some(out));
        rows.push(run_train(a)?);
    }
    let cover = |r: &RunSummary| r.test_coverage.as_ref().map_or(f64::NAN, |c| c.all_objects);
    let figures = |r: &RunSummary| {
        [
            r.test_accuracy,
            cover(r),
            r.samples as f64,
            r.samples_per_second,
            r.seconds,
        ]
    };
    let names = [
        "test_accuracy",
        "coverage",
        "samples",
        "samples_per_second",
        "seconds",
    ];
    let stats: Vec<[f64; 3]> = (0..names.len())
        .map(|i| median_min_max(rows.iter().map(|r| figures(r)[i]).collect()))
        .collect();
    if l.train.json {
        let summary: serde_json::Map<String, serde_json::Value> = names
            .iter()
            .zip(&stats)
            .map(|(name, [median, min, max])| {
                (
                    name.to_string(),
                    serde_json::json!({"median": median, "min": min, "max": max}),
                )
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"command": "bench learning", "dataset": l.train.dataset, "runs": rows, "summary": summary})
        );
        return Ok(());
    }
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "seed", "test acc", "coverage", "samples", "samples/s", "seconds"
    );
    let line = |name: String, v: [f64; 5]| {
        println!(
            "{name:>8} {:>9.2}% {:>9.1}% {:>10.0} {:>10.0} {:>8.0}",
            100.0 * v[0],
            100.0 * v[1],
            v[2],
            v[3],
            v[4]
        )
    };
    for r in &rows {
        line(r.seed.to_string(), figures(r));
    }
    for (i, name) in ["median", "min", "max"].iter().enumerate() {
        line(name.to_string(), std::array::from_fn(|c| stats[c][i]));
    }
    Ok(())
}

fn run_device() -> Result<(), Failure> {
    print!("{}", saccade::device::report());
    Ok(())
}

fn run_kernels(command: KernelsCommand) -> Result<(), Failure> {
    let KernelsCommand::Check { arch } = command;
    let checks = saccade::device::cuda::check_kernels(&arch).map_err(|e| Failure { code: 2, error: e })?;
    let mut failed = 0;
    for c in &checks {
        match &c.error {
            None => println!("OK   kernels/{}.cu {}", c.file, c.arch),
            Some(log) => {
                failed += 1;
                println!("FAIL kernels/{}.cu {}\n{log}", c.file, c.arch);
            }
        }
    }
    if failed > 0 {
        return Err(anyhow::anyhow!("{failed} of {} kernel compilations failed", checks.len()).into());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => run_train(a).map(|_| ()),
        Command::Eval(a) => run_eval(a),
        Command::Predict(a) => run_predict(a),
        Command::Export(a) => run_export(a),
        Command::Data { command } => run_data(command).map_err(Failure::from),
        Command::Device => run_device(),
        Command::Bench(a) => run_bench(a),
        Command::Kernels { command } => run_kernels(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if f.code != 130 {
                eprintln!("error: {:#}", f.error);
            }
            ExitCode::from(f.code)
        }
    }
}
