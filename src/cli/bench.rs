//! `saccade bench`: one training step timed against the baselines, the
//! per-op profile, and `bench learning` (training runs over several seeds).

use clap::{Args, Subcommand};

use super::config::{preset_run, probe, Preset};
use super::train::{check_train_flags, new_run_dir, run_train, RunSummary, TrainArgs};
use super::{usage, DeviceArgs, DeviceChoice, Failure};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(super) struct BenchArgs {
    #[command(subcommand)]
    pub(super) what: Option<BenchCommand>,
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
    /// model's training step on the CPU (on cluttered MNIST at --size,
    /// default 100; many-objects on megapixel MNIST).
    #[arg(long)]
    profile: bool,
    /// Instead of the comparison, time the saccade model's training step on
    /// the CPU without the per-op profile (the figure benches/torch_step.py
    /// sets beside PyTorch's): the same batch every step, the glimpses'
    /// gradient on as in PyTorch's replica.
    #[arg(long, conflicts_with = "profile")]
    step: bool,
    /// The saccade preset --profile and --step run.
    #[arg(long, value_enum, default_value_t = Preset::Small)]
    preset: Preset,
    /// With --profile or --step: the configuration of this checkpoint, on its dataset, instead
    /// of a preset's (e.g. runs/latest/checkpoint.safetensors).
    #[arg(long, value_name = "CKPT")]
    config_of: Option<std::path::PathBuf>,
    /// Training images per epoch for the epoch estimate.
    #[arg(long, default_value_t = 100_000)]
    epoch_images: usize,
    /// Tiled ResNet18: tiles per trunk pass.
    #[arg(long, default_value_t = 16)]
    tile_chunk: usize,
    /// Tiled ResNet18 with gradient checkpointing per chunk of tiles.
    #[arg(long)]
    checkpointing: bool,
    // Where to measure: auto = the CPU, then the GPU too when one is usable;
    // cpu; cuda = the GPU only.
    #[command(flatten)]
    pub(super) device: DeviceArgs,
    /// The same as --device cpu (kept for older commands).
    #[arg(long, hide = true)]
    no_gpu: bool,
    /// Print the figures as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub(super) enum BenchCommand {
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
pub(super) struct LearningArgs {
    /// How many seeds, counting up from --seed.
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    #[command(flatten)]
    pub(super) train: TrainArgs,
}

pub(super) fn run_bench(a: BenchArgs) -> Result<(), Failure> {
    if let Some(BenchCommand::Learning(l)) = a.what {
        return run_learning(l);
    }
    let single = a.profile || a.step;
    if a.config_of.is_some() && !single {
        return Err(usage(anyhow::anyhow!("--config-of needs --profile or --step")));
    }
    let batch_size = a.batch_size.unwrap_or(if single { 32 } else { 2 });
    if batch_size == 0 || a.steps == 0 || a.tile_chunk == 0 {
        return Err(usage(anyhow::anyhow!(
            "need --batch-size, --steps and --tile-chunk >= 1"
        )));
    }
    if single {
        let mut cfg = match &a.config_of {
            Some(path) => crate::train::checkpoint_config(path)?,
            None => {
                let spec = match (a.preset, a.size) {
                    (Preset::ManyObjects, None) => crate::data::megapixel::NAME.to_string(),
                    (_, s) => crate::bench::cluttered_spec(s.unwrap_or(100)),
                };
                let mut cfg = preset_run(a.preset, spec.clone(), probe(&spec)?.as_ref())?;
                // The work PyTorch's replica does every step.
                cfg.model.policy_warmup = 0;
                cfg
            }
        };
        cfg.batch_size = batch_size;
        if let Some(available) = crate::bench::available_memory() {
            let eight = crate::bench::dataset_of(&cfg.dataset, 8)?;
            if let Some(m) = crate::bench::step_memory::<crate::models::Saccader>(&cfg, &eight)? {
                m.check(batch_size, available).map_err(usage)?;
            }
        }
        let data = crate::bench::dataset_of(&cfg.dataset, batch_size)?;
        if a.profile {
            print!("{}", crate::bench::profile(cfg, &data, a.steps)?);
        } else {
            let (t, _) = crate::bench::time_steps(cfg, &data, a.steps, false)?;
            if a.json {
                println!("{}", serde_json::to_string(&t).map_err(anyhow::Error::from)?);
            } else {
                println!(
                    "saccade step on {}, batch {}: median {:.1} ms ({:.0} samples/s) over {} steps, \
                     peak tensor memory {:.1} MiB; {}",
                    data.describe(),
                    t.batch_size,
                    1e3 * t.median_step_s,
                    t.samples_per_s,
                    t.steps,
                    t.peak_tensor_mib,
                    t.cpu
                );
            }
        }
        return Ok(());
    }
    if a.device.device == DeviceChoice::Cuda && !a.no_gpu {
        // A GPU asked for that this machine cannot use: a usage error.
        super::select_device(&a.device)?;
    }
    let cfg = crate::bench::BenchConfig {
        sizes: a.size.map(|s| vec![s]).unwrap_or_else(|| vec![2528, 100]),
        batch_size,
        steps: a.steps,
        epoch_images: a.epoch_images,
        tile_chunk: a.tile_chunk,
        checkpointing: a.checkpointing,
        cpu: a.no_gpu || a.device.device != DeviceChoice::Cuda,
        gpu: !a.no_gpu && a.device.device != DeviceChoice::Cpu,
    };
    let report = crate::bench::run(&cfg, &|line| eprintln!("{line}"))?;
    if a.json {
        println!("{}", serde_json::to_string(&report).map_err(anyhow::Error::from)?);
    } else {
        print!("{}", crate::bench::table(&report.comparisons));
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
        return Err(usage(anyhow::anyhow!(
            "bench learning needs --seeds >= 1 and no --resume"
        )));
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
