//! The `saccade` command line: the clap types, the dispatch and exit codes,
//! device selection and Ctrl-C. One file per subcommand family parses its
//! flags, calls the library and prints; `src/main.rs` only calls [`run`].

mod bench;
mod config;
mod data;
mod eval;
mod train;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::Device;
use bench::BenchArgs;
use data::DataCommand;
use eval::{EvalArgs, ExportArgs, PredictArgs};
use train::TrainArgs;

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
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (defaults: cluttered-mnist, 100x100, auto device).
    #[command(after_help = "Examples:\n  \
        saccade train                                   # the default run, ~10 min on a 2-core CPU\n  \
        saccade train --dataset cluttered-mnist-1 --train-size 50000 --epochs 5 --policy-warmup 10000 --glimpse-pool max\n  \
        saccade train --dataset ./stores/slides --preset paper --out runs/slides\n  \
        saccade train --resume runs/latest/checkpoint.safetensors --epochs 8   # extend a run")]
    Train(TrainArgs),
    /// Evaluate a checkpoint: accuracy, per-class accuracy, confusions.
    #[command(
        after_help = "Example:\n  saccade eval --checkpoint pretrained/cluttered-mnist/model.safetensors --test-size 500"
    )]
    Eval(EvalArgs),
    /// Classify image files, folders and stores with a checkpoint and draw where it looked.
    #[command(
        after_help = "Example:\n  saccade predict --checkpoint pretrained/cluttered-mnist/model.safetensors photos/ --viz seen/",
        after_long_help = PREDICT_HELP
    )]
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
    #[command(after_help = "Examples:\n  \
        saccade bench --size 100 --steps 4           # the Table 1 comparison at 100x100\n  \
        saccade bench --profile --steps 20           # where a training step of the small preset goes\n  \
        saccade bench learning --seeds 3 --minutes 15")]
    Bench(BenchArgs),
    /// CUDA kernel tools.
    Kernels {
        #[command(subcommand)]
        command: KernelsCommand,
    },
}

const PREDICT_HELP: &str = "\
Each input is predicted on its own, in order: a file that cannot be read is named on stderr \
(`error: FILE: reason`) and the others are still predicted; the exit status is then 1, after \
every result is printed (with --json, such inputs are records with an \"error\" field). \
Exit 2: refused before any work (a bad flag, a --viz that would replace a file).

Memory: an image file is decoded whole, with the decoder's allocations capped at 2 GiB \
(a 16384x16384 RGB image needs 0.8 GB); a file over the cap is an error for that \
file. Images over 16 M values are then read through a temporary tiled file in the system's \
temporary folder, freed as soon as they are predicted; store images are read tile by tile, \
whatever their size. --viz draws from a 192-pixel overview, so its memory does not grow \
with the image size; a folder gets each picture as soon as its image is predicted.

Examples:
  saccade predict --checkpoint pretrained/cluttered-mnist/model.safetensors a.png b.jpg
  saccade predict --checkpoint model.safetensors photos/ --viz seen/      (one PNG per image)
  saccade predict --checkpoint model.safetensors mystore --split test --viz test.png --json";

#[derive(Subcommand)]
enum KernelsCommand {
    /// Compile every kernels/*.cu with NVRTC for each architecture (no GPU needed).
    Check {
        /// Comma-separated GPU architectures.
        #[arg(long, value_delimiter = ',', default_value = "sm_80,sm_90")]
        arch: Vec<String>,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum DeviceChoice {
    /// A GPU if one is usable, else the CPU (says why).
    Auto,
    /// The CPU, with --threads threads.
    Cpu,
    /// The first CUDA GPU; refused (exit 2) when none is usable.
    Cuda,
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

/// A failure with its exit code, one rule for every subcommand:
/// - 2, a usage error: the command is refused as given, before any work,
///   and the fix is in the command line: a bad flag value or combination
///   (clap's own parse errors exit 2 too), an output that would be
///   overwritten, flags that conflict with the checkpoint of --resume, a
///   device or NVRTC asked for that this machine lacks, an import's folder
///   without class subfolders or labels CSV with a bad line ([`usage`]);
/// - 1: the work itself failed: an input that cannot be read, a corrupt
///   file, a failed write, a kernel that does not compile (`?` on any error);
/// - 130: stopped by Ctrl-C, after training wrote its checkpoint.
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
    match args.device {
        DeviceChoice::Cpu => Ok(Device::cpu()),
        DeviceChoice::Auto => {
            let (device, why) = crate::device::auto_device();
            eprintln!("{why}");
            Ok(device)
        }
        DeviceChoice::Cuda => Device::cuda(0).map_err(|e| usage(e.context("--device cuda"))),
    }
}

/// Raised by the first Ctrl-C during training: the loop then writes a checkpoint and stops.
static STOP: AtomicBool = AtomicBool::new(false);
/// What Ctrl-C says once training is over and its checkpoint written; it
/// then ends the process at once (the test evaluation writes nothing).
static AFTER_TRAINING: Mutex<Option<String>> = Mutex::new(None);

/// Install the Ctrl-C handler, once: `bench learning` trains several runs.
/// SIGTERM and SIGHUP take the same path (ctrlc's `termination`): job
/// schedulers, `timeout` and `docker stop` send TERM.
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

/// A usage error (exit code 2, see [`Failure`]).
fn usage(error: anyhow::Error) -> Failure {
    Failure { code: 2, error }
}

/// The failure of a run stopped by Ctrl-C (exit code 130, nothing printed).
fn interrupted() -> Failure {
    Failure {
        code: 130,
        error: anyhow::anyhow!("interrupted"),
    }
}

fn run_device() -> Result<(), Failure> {
    print!("{}", crate::device::report());
    Ok(())
}

fn run_kernels(command: KernelsCommand) -> Result<(), Failure> {
    let KernelsCommand::Check { arch } = command;
    let checks = crate::device::cuda::check_kernels(&arch).map_err(usage)?;
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

/// Run the command `cli` names, print its error if it fails, and say how
/// the process should exit (see [`Failure`]).
pub fn run(cli: Cli) -> ExitCode {
    if let Some(n) = cli.command.threads() {
        if let Err(e) = check_threads(n) {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
        // Only fails when a pool already exists, which is harmless.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    }
    // The command runs on a worker of rayon's pool, so that the ops' parallel
    // loops split their work from inside the pool instead of waking it from
    // the main thread and sleeping until it is done (a futex round trip per
    // op; BENCHMARKS.md has the step times).
    let result = rayon::scope(|_| dispatch(cli.command));
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

/// Refuse a `--threads` that can only slow the run down: 1000 threads on 2
/// cores trained at 1 sample/s.
fn check_threads(n: usize) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    anyhow::ensure!(
        (1..=4 * cores).contains(&n),
        "--threads {n}: this machine has {cores} cores; give 1 to {} (more threads than cores only \
         wait for one another), or leave it out to use every core",
        4 * cores
    );
    Ok(())
}

fn dispatch(command: Command) -> Result<(), Failure> {
    match command {
        Command::Train(a) => train::run_train(a).map(|_| ()),
        Command::Eval(a) => eval::run_eval(a),
        Command::Predict(a) => eval::run_predict(a),
        Command::Export(a) => eval::run_export(a),
        Command::Data { command } => data::run_data(command),
        Command::Device => run_device(),
        Command::Bench(a) => bench::run_bench(a),
        Command::Kernels { command } => run_kernels(command),
    }
}

impl Command {
    /// The --threads the command was given, which sizes rayon's pool.
    fn threads(&self) -> Option<usize> {
        match self {
            Command::Train(a) => a.device.threads,
            Command::Eval(a) => a.device.threads,
            Command::Predict(a) => a.device.threads,
            Command::Bench(a) => match &a.what {
                Some(bench::BenchCommand::Learning(l)) => l.train.device.threads,
                None => a.device.threads,
            },
            _ => None,
        }
    }
}
