//! The paper's Table 1 measurement, shared by `saccade bench` and
//! `benches/epoch.rs`: one training step (forward, backward, Adam) of the
//! saccade model against the tiled ResNet18 at 2528², and against ResNet18
//! at 100², at the same batch size, on the CPU and on the GPU when one is
//! usable. Per model: the median step time, the time per epoch estimated as
//! steps per epoch × step time, a measured short epoch (the same steps with
//! the loader, warm-up included), and the peak bytes of tensor storage from
//! the device's allocator counter (parameters and Adam moments included).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Result};
use rayon::prelude::*;
use serde::Serialize;

use crate::data::{self, Batch, Dataset, Loader, LoaderConfig, Split, SplitSizes};
use crate::device::cpu::{sgemm, Mat};
use crate::device::Device;
use crate::models::{ResNet18, ResNetConfig, SaccadeConfig, Saccader, TiledConfig, TiledResNet18};
use crate::train::{Baseline, LrSchedule, Model, TrainConfig, Trainer};

#[derive(Clone, Debug, Serialize)]
pub struct BenchConfig {
    /// Image sides to compare at: 2528 (against the tiled ResNet18) and/or
    /// anything else (against ResNet18 over the whole image).
    pub sizes: Vec<usize>,
    pub batch_size: usize,
    /// Timed steps after one warm-up step.
    pub steps: usize,
    /// Training images per epoch for the epoch estimate (the paper's 100k).
    pub epoch_images: usize,
    /// Tiled ResNet18: tiles per trunk pass, and gradient checkpointing.
    pub tile_chunk: usize,
    pub checkpointing: bool,
    /// Run on the CPU.
    pub cpu: bool,
    /// Run on the GPU: when `cpu` too, only if one is usable (else noted in
    /// `skipped`); alone, a GPU that cannot be used is an error.
    pub gpu: bool,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            sizes: vec![2528, 100],
            batch_size: 2,
            steps: 2,
            epoch_images: 100_000,
            tile_chunk: 16,
            checkpointing: false,
            cpu: true,
            gpu: true,
        }
    }
}

/// One model's figures.
#[derive(Clone, Debug, Serialize)]
pub struct ModelBench {
    pub model: String,
    pub trainable_params: usize,
    /// Median of the timed steps.
    pub step_seconds: f64,
    pub step_samples: Vec<f64>,
    pub steps_per_epoch: usize,
    pub epoch_seconds_estimate: f64,
    /// Wall time of warm-up plus timed steps with the loader.
    pub short_epoch_steps: usize,
    pub short_epoch_seconds: f64,
    pub peak_bytes: usize,
}

/// The saccade model against a baseline, same size, batch and device.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub size: usize,
    pub batch_size: usize,
    pub device: String,
    pub saccade: ModelBench,
    pub baseline: ModelBench,
    /// Baseline step time over saccade step time.
    pub step_speedup: f64,
    /// Saccade peak bytes over baseline peak bytes.
    pub memory_fraction: f64,
}

/// Everything one run measured, and the devices it skipped and why.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub config: BenchConfig,
    pub comparisons: Vec<Comparison>,
    pub skipped: Vec<String>,
}

/// The spec of generated cluttered MNIST at side `size`.
pub fn cluttered_spec(size: usize) -> String {
    if size == 100 {
        "cluttered-mnist".to_string()
    } else {
        format!("cluttered-mnist@{size}")
    }
}

/// The generated cluttered-MNIST task at `size`, `n` training images.
pub fn dataset(size: usize, n: usize) -> Result<Arc<dyn Dataset>> {
    dataset_of(&cluttered_spec(size), n)
}

/// The first `n` training images of the dataset `spec`.
pub fn dataset_of(spec: &str, n: usize) -> Result<Arc<dyn Dataset>> {
    let cfg = data::DataConfig {
        sizes: SplitSizes {
            train: n,
            valid: 1,
            test: 1,
        },
        ..Default::default()
    };
    data::open_dataset(spec, Split::Train, &cfg)
}

/// A saccade model run on `data`: the paper's preset or the small default
/// one (`saccade train`'s), with its optimizer settings.
pub fn saccade_config(paper: bool, data: &dyn Dataset, batch_size: usize) -> TrainConfig {
    let (c, k) = (data.channels(), data.num_classes());
    let mut model = if paper {
        SaccadeConfig::paper(c, k)
    } else {
        SaccadeConfig::small(c, k)
    };
    model.proxy_size = data.proxy_shape().1;
    TrainConfig {
        model,
        baseline: None,
        dataset: data.describe(),
        epochs: 1,
        batch_size,
        lr: 1e-3,
        lr_schedule: LrSchedule::Constant,
        clip_value: 0.0,
        clip_norm: 0.0,
        seed: 0,
        sizes: [data.len(), 1, 1],
        augment: false,
        class_names: Vec::new(),
    }
}

/// The run configurations: the paper's saccade model, then the baseline
/// for this size (tiled at 2528² and above 224², whole-image otherwise).
pub fn configs(cfg: &BenchConfig, data: &dyn Dataset) -> (TrainConfig, TrainConfig) {
    let (c, k) = (data.channels(), data.num_classes());
    let saccade = saccade_config(true, data, cfg.batch_size);
    let baseline = if data.image_size().0 > 224 {
        Baseline::TiledResNet18(TiledConfig {
            chunk: cfg.tile_chunk,
            checkpoint: cfg.checkpointing,
            ..TiledConfig::paper(c, k)
        })
    } else {
        Baseline::ResNet18(ResNetConfig {
            channels: c,
            num_classes: k,
            width: 64,
        })
    };
    let base = TrainConfig {
        baseline: Some(baseline),
        ..saccade.clone()
    };
    (saccade, base)
}

/// The loader the measurement reads batches from.
pub fn loader(data: &Arc<dyn Dataset>, batch_size: usize, dev: &Device) -> Result<Loader> {
    let cfg = LoaderConfig {
        batch_size,
        shuffle: false,
        drop_last: true,
        ..LoaderConfig::default()
    };
    Loader::new(data.clone(), cfg, dev)
}

/// A trainer and one batch, for timing single steps (criterion).
pub fn prepare<M: Model>(
    cfg: TrainConfig,
    data: &Arc<dyn Dataset>,
    dev: &Device,
) -> Result<(Trainer<M>, Batch)> {
    let bs = cfg.batch_size;
    let trainer = Trainer::<M>::new(cfg, dev.clone())?;
    let batch = loader(data, bs, dev)?
        .epoch(0)
        .next()
        .ok_or_else(|| anyhow::anyhow!("bench: the dataset has no full batch"))??;
    Ok((trainer, batch))
}

/// Bytes training with `cfg` holds at its peak, estimated on the CPU from
/// steps of 4 and 8 images of `data` on fresh models (parameters, optimizer
/// state and the batch included), extrapolated linearly (the growth per
/// image falls with the batch: 2.0 MiB from 8 to 32 images of the small
/// preset, 1.4 from 32 to 64, but 0.5 from 1 to 2), plus the loader's
/// batches ahead. `None` for batches of 8 or fewer, which the first step
/// measures well enough, and for datasets smaller than 8 images.
pub fn step_memory<M: Model>(cfg: &TrainConfig, data: &Arc<dyn Dataset>) -> Result<Option<StepMemory>> {
    const SMALL: usize = 4;
    const LARGE: usize = 8;
    if cfg.batch_size <= LARGE || data.len() < LARGE {
        return Ok(None);
    }
    let peak = |b: usize| -> Result<usize> {
        let dev = Device::cpu();
        let mut c = cfg.clone();
        c.batch_size = b;
        let (mut trainer, batch) = prepare::<M>(c, data, &dev)?;
        dev.reset_peak();
        trainer.step(&batch)?;
        Ok(dev.memory().peak_bytes)
    };
    // The loader's host copies: `workers × (prefetch + 1)` batches ahead and
    // one in the making, each image whole where it is resident, and its proxy.
    let l = LoaderConfig::default();
    let (c, (h, w), (ph, pw)) = (data.channels(), data.image_size(), data.proxy_shape());
    let resident = if h * w <= l.max_resident_pixels { h * w } else { 0 };
    let host = 4 * c * (resident + ph * pw) * (l.workers * (l.prefetch + 1) + 1);
    let (small, large) = (peak(SMALL)?, peak(LARGE)?);
    let per_image = large.saturating_sub(small) / (LARGE - SMALL) + host;
    let base = large.saturating_sub(per_image.saturating_sub(host) * LARGE);
    Ok(Some(StepMemory {
        base,
        per_image,
        need: base + per_image * cfg.batch_size,
    }))
}

/// What [`step_memory`] found.
#[derive(Clone, Copy, Debug)]
pub struct StepMemory {
    /// What does not grow with the batch (parameters, optimizer state).
    pub base: usize,
    /// Each image of the batch.
    pub per_image: usize,
    /// The whole batch.
    pub need: usize,
}

impl StepMemory {
    /// Refuse a batch that needs more than 90% of `available` bytes (the
    /// process holds more than tensors), naming both and the largest batch
    /// that fits.
    pub fn check(&self, batch_size: usize, available: usize) -> Result<()> {
        let room = available / 10 * 9;
        let fits = room.saturating_sub(self.base) / self.per_image.max(1);
        ensure!(
            self.need <= room,
            "--batch-size {batch_size}: training needs about {} ({:.1} MiB per image: a step's tensors, \
             measured at 4 and 8 images, and the loader's batches ahead), more than this machine's {} of \
             available memory allows: use --batch-size {fits} or less",
            gib(self.need),
            self.per_image as f64 / (1 << 20) as f64,
            gib(available)
        );
        Ok(())
    }
}

/// The memory the system can give this process now (`MemAvailable` of
/// /proc/meminfo); `None` where it cannot say.
pub fn available_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Warm-up plus `steps` training steps of `M` through the loader.
pub fn measure<M: Model>(
    name: &str,
    cfg: TrainConfig,
    data: &Arc<dyn Dataset>,
    steps: usize,
    epoch_images: usize,
    dev: &Device,
) -> Result<ModelBench> {
    let bs = cfg.batch_size;
    let mut trainer = Trainer::<M>::new(cfg, dev.clone())?;
    let loader = loader(data, bs, dev)?;
    ensure!(
        loader.num_batches() > steps,
        "bench: {} images make {} batches of {bs}, need {}",
        data.len(),
        loader.num_batches(),
        steps + 1
    );
    dev.reset_peak();
    let t0 = Instant::now();
    let mut samples = Vec::new();
    for batch in loader.epoch(0).take(steps + 1) {
        let batch = batch?;
        let t = Instant::now();
        trainer.step(&batch)?;
        samples.push(t.elapsed().as_secs_f64());
    }
    let short_epoch_seconds = t0.elapsed().as_secs_f64();
    let timed = &samples[1..];
    let step_seconds = median(timed);
    let steps_per_epoch = epoch_images.div_ceil(bs);
    Ok(ModelBench {
        model: name.to_string(),
        trainable_params: trainer.model.params().num_trainable(),
        step_seconds,
        step_samples: timed.to_vec(),
        steps_per_epoch,
        epoch_seconds_estimate: steps_per_epoch as f64 * step_seconds,
        short_epoch_steps: samples.len(),
        short_epoch_seconds,
        peak_bytes: dev.memory().peak_bytes,
    })
}

/// Saccade against the baseline at one size on one device. `fresh` makes a
/// new handle of the device, so each model's peak is its own.
pub fn compare(cfg: &BenchConfig, size: usize, fresh: &dyn Fn() -> Result<Device>) -> Result<Comparison> {
    let data = dataset(size, (cfg.steps + 1) * cfg.batch_size)?;
    let (sc, bc) = configs(cfg, data.as_ref());
    if let Some(available) = available_memory() {
        // A batch of 100 000 grew to 23.7 GB before the kernel killed it.
        let eight = dataset(size, 8)?;
        let needs = [
            step_memory::<Saccader>(&sc, &eight)?,
            match bc.baseline {
                Some(Baseline::TiledResNet18(_)) => step_memory::<TiledResNet18>(&bc, &eight)?,
                _ => step_memory::<ResNet18>(&bc, &eight)?,
            },
        ];
        for m in needs.into_iter().flatten() {
            m.check(cfg.batch_size, available)?;
        }
    }
    let (n, e) = (cfg.steps, cfg.epoch_images);
    let dev = fresh()?;
    let saccade = measure::<Saccader>("saccade", sc, &data, n, e, &dev)?;
    let baseline = match bc.baseline {
        Some(Baseline::TiledResNet18(t)) => {
            let name = if t.checkpoint {
                "tiled-resnet18 (checkpointed)"
            } else {
                "tiled-resnet18"
            };
            measure::<TiledResNet18>(name, bc, &data, n, e, &fresh()?)?
        }
        _ => measure::<ResNet18>("resnet18", bc, &data, n, e, &fresh()?)?,
    };
    Ok(Comparison {
        size,
        batch_size: cfg.batch_size,
        device: dev.to_string(),
        step_speedup: baseline.step_seconds / saccade.step_seconds,
        memory_fraction: saccade.peak_bytes as f64 / baseline.peak_bytes as f64,
        saccade,
        baseline,
    })
}

/// Makes a fresh handle of one device.
type DeviceMaker = Box<dyn Fn() -> Result<Device>>;

/// Every comparison of `cfg` on the CPU, then on the GPU when usable.
pub fn run(cfg: &BenchConfig, log: &dyn Fn(&str)) -> Result<BenchReport> {
    let mut comparisons = Vec::new();
    let mut skipped = Vec::new();
    let mut devices: Vec<(&str, DeviceMaker)> = Vec::new();
    if cfg.cpu {
        devices.push(("cpu", Box::new(|| Ok(Device::cpu()))));
    }
    if cfg.gpu {
        match Device::cuda(0) {
            Ok(_) => devices.push(("cuda", Box::new(|| Device::cuda(0)))),
            Err(e) if cfg.cpu => skipped.push(format!("gpu: {e:#}")),
            Err(e) => return Err(e.context("bench --device cuda")),
        }
    }
    for (name, fresh) in &devices {
        for &size in &cfg.sizes {
            log(&format!("measuring {size}² on {name}, batch {}", cfg.batch_size));
            let c = compare(cfg, size, fresh.as_ref())?;
            log(&format!(
                "{size}² on {name}: saccade {:.3} s a step, {} {:.3} s ({:.1}x)",
                c.saccade.step_seconds, c.baseline.model, c.baseline.step_seconds, c.step_speedup
            ));
            comparisons.push(c);
        }
    }
    Ok(BenchReport {
        config: cfg.clone(),
        comparisons,
        skipped,
    })
}

/// The limits the profile compares ops with: GEMM GFLOP/s (a 512³ product)
/// and memory GB/s (a threaded 64 MiB copy), best of five runs each.
pub fn machine_limits() -> (f64, f64) {
    let best = |f: &mut dyn FnMut()| {
        (0..5)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let n = 512;
    let (a, b, mut c) = (vec![1.0f32; n * n], vec![1.0f32; n * n], vec![0.0f32; n * n]);
    let gemm = best(&mut || sgemm(n, n, n, Mat::n(&a), Mat::n(&b), &mut c, false));
    let len = 16 << 20;
    let (src, mut dst) = (vec![1.0f32; len], vec![0.0f32; len]);
    let copy = best(&mut || {
        dst.par_chunks_mut(1 << 16)
            .zip(src.par_chunks(1 << 16))
            .for_each(|(d, s)| d.copy_from_slice(s))
    });
    (
        2.0 * (n * n * n) as f64 / gemm / 1e9,
        2.0 * 4.0 * len as f64 / copy / 1e9,
    )
}

/// The CPU as a reader needs it beside a time: its model, the vector
/// extensions the GEMM and our loops run on, and the threads used.
pub fn cpu_description() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    #[cfg(target_arch = "x86_64")]
    let vector = if std::arch::is_x86_feature_detected!("avx512f") {
        "AVX-512"
    } else if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        "AVX2+FMA, no AVX-512"
    } else {
        "no AVX2"
    };
    #[cfg(not(target_arch = "x86_64"))]
    let vector = std::env::consts::ARCH;
    format!("{model} ({vector}), {} threads", rayon::current_num_threads())
}

/// `steps` training steps of the saccade model on the CPU, each on the same
/// batch (the first of `data`), after one warm-up step.
#[derive(Clone, Debug, Serialize)]
pub struct StepTiming {
    pub batch_size: usize,
    pub steps: usize,
    pub median_step_s: f64,
    pub samples_per_s: f64,
    pub peak_tensor_mib: f64,
    pub cpu: String,
}

/// Time `steps` steps (see [`StepTiming`]); with `per_op`, also the per-op
/// profile (see [`crate::profile`]) as Markdown: the per-op table plus the
/// work outside the tape (loss readout, clipping, Adam). The loader is not
/// in the step: `saccade train` reports the epoch with it.
pub fn time_steps(
    cfg: TrainConfig,
    data: &Arc<dyn Dataset>,
    steps: usize,
    per_op: bool,
) -> Result<(StepTiming, Option<String>)> {
    let batch_size = cfg.batch_size;
    let dev = Device::cpu();
    let (mut trainer, batch) = prepare::<Saccader>(cfg, data, &dev)?;
    if per_op {
        dev.enable_profile();
    }
    let mut step_times = Vec::new();
    for i in 0..=steps {
        dev.profile_mark();
        if i == 0 {
            dev.reset_peak();
        }
        let t = Instant::now();
        trainer.step(&batch)?;
        if per_op {
            dev.profile_lap("optimizer and step glue");
        }
        step_times.push(t.elapsed().as_secs_f64());
        if i == 0 && per_op {
            dev.take_profile();
        }
    }
    let step = median(&step_times[1..]);
    let timing = StepTiming {
        batch_size,
        steps,
        median_step_s: step,
        samples_per_s: batch_size as f64 / step,
        peak_tensor_mib: dev.memory().peak_bytes as f64 / (1 << 20) as f64,
        cpu: cpu_description(),
    };
    let table = per_op.then(|| {
        let prof = dev.take_profile().expect("profiling is on");
        let (gflops, gbytes) = machine_limits();
        prof.table(steps, gflops, gbytes)
    });
    Ok((timing, table))
}

/// [`time_steps`] with the per-op profile, as Markdown under a line that
/// names the data, the step time, the peak tensor memory and the CPU.
pub fn profile(cfg: TrainConfig, data: &Arc<dyn Dataset>, steps: usize) -> Result<String> {
    let (t, table) = time_steps(cfg, data, steps, true)?;
    Ok(format!(
        "saccade on {}, batch {}, {steps} steps on the same batch, {}: median step {:.1} ms \
         ({:.0} samples/s), peak tensor memory {:.1} MiB\n{}",
        data.describe(),
        t.batch_size,
        t.cpu,
        1e3 * t.median_step_s,
        t.samples_per_s,
        t.peak_tensor_mib,
        table.unwrap_or_default()
    ))
}

fn gib(b: usize) -> String {
    format!("{:.3} GiB", b as f64 / (1u64 << 30) as f64)
}

/// The comparisons as a Markdown table.
pub fn table(cs: &[Comparison]) -> String {
    let mut s = String::from(
        "| size | batch | device | model | params | step (median) | steps/epoch | epoch (est.) | short epoch \
         (steps, s) | peak tensor memory |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for c in cs {
        for m in [&c.saccade, &c.baseline] {
            s += &format!(
                "| {}² | {} | {} | {} | {:.2} M | {:.3} s | {} | {:.1} h | {}, {:.1} s | {} |\n",
                c.size,
                c.batch_size,
                c.device,
                m.model,
                m.trainable_params as f64 / 1e6,
                m.step_seconds,
                m.steps_per_epoch,
                m.epoch_seconds_estimate / 3600.0,
                m.short_epoch_steps,
                m.short_epoch_seconds,
                gib(m.peak_bytes)
            );
        }
        s += &format!(
            "| {}² | | | **saccade vs {}** | | **{:.1}× faster** | | | | **{:.1}% of the memory** |\n",
            c.size,
            c.baseline.model,
            c.step_speedup,
            100.0 * c.memory_fraction
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn baselines_follow_the_image_size() {
        let cfg = BenchConfig::default();
        let small = dataset(100, 2).unwrap();
        let (s, b) = configs(&cfg, small.as_ref());
        assert!(s.baseline.is_none());
        assert!(matches!(b.baseline, Some(Baseline::ResNet18(r)) if r.width == 64));
        let large = dataset(2528, 2).unwrap();
        let (_, b) = configs(&cfg, large.as_ref());
        assert!(matches!(b.baseline, Some(Baseline::TiledResNet18(t)) if t.tile == 224));
    }

    #[test]
    fn table_shows_both_models_and_the_ratios() {
        let m = |name: &str, t: f64, p: usize| ModelBench {
            model: name.into(),
            trainable_params: 1_000_000,
            step_seconds: t,
            step_samples: vec![t],
            steps_per_epoch: 10,
            epoch_seconds_estimate: 10.0 * t,
            short_epoch_steps: 2,
            short_epoch_seconds: 2.0 * t,
            peak_bytes: p,
        };
        let c = Comparison {
            size: 2528,
            batch_size: 2,
            device: "cpu".into(),
            saccade: m("saccade", 0.1, 1 << 20),
            baseline: m("tiled-resnet18", 3.0, 1 << 30),
            step_speedup: 30.0,
            memory_fraction: 1.0 / 1024.0,
        };
        let t = table(&[c]);
        assert!(
            t.contains("tiled-resnet18") && t.contains("30.0× faster") && t.contains("0.1% of"),
            "{t}"
        );
    }
}
