//! The paper's Table 1 on this machine: one training step of the saccade
//! model against the tiled ResNet18 at 2528² and against ResNet18 at 100²,
//! same batch size, CPU and (when usable) GPU, with peak tensor memory and
//! the ratios; the same measurement as `saccade bench` (src/bench.rs).
//!
//! A tiled ResNet18 step takes minutes on 2 cores, far too long for
//! criterion's 10-sample minimum, so the comparison table is timed with a
//! plain timer (one warm-up step, `SACCADE_BENCH_STEPS` timed steps, median)
//! and criterion times the cheap steps (saccade at both sizes, ResNet18 at
//! 100²). `SACCADE_BENCH_BATCH` sets the batch size (default 2).

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use saccade::bench::{self, BenchConfig};
use saccade::data::Dataset;
use saccade::models::{ResNet18, Saccader};
use saccade::train::{Model, TrainConfig};
use saccade::Device;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn config() -> BenchConfig {
    BenchConfig {
        batch_size: env("SACCADE_BENCH_BATCH", 2),
        steps: env("SACCADE_BENCH_STEPS", 2),
        ..BenchConfig::default()
    }
}

fn step<M: Model>(c: &mut Criterion, name: &str, cfg: TrainConfig, data: &Arc<dyn Dataset>) {
    let (mut trainer, batch) = bench::prepare::<M>(cfg, data, &Device::cpu()).expect("bench setup");
    c.bench_function(name, |b| b.iter(|| trainer.step(&batch).expect("training step")));
}

fn bench_epoch(c: &mut Criterion) {
    let cfg = config();
    let report = bench::run(&cfg, &|line| eprintln!("{line}")).expect("bench");
    println!("{}", bench::table(&report.comparisons));
    for s in &report.skipped {
        println!("skipped {s}");
    }
    println!("{}", serde_json::to_string(&report).expect("json"));

    for size in [2528, 100] {
        let data = bench::dataset(size, cfg.batch_size).expect("dataset");
        let (saccade, baseline) = bench::configs(&cfg, data.as_ref());
        step::<Saccader>(
            c,
            &format!("saccade step {size}² batch {}", cfg.batch_size),
            saccade,
            &data,
        );
        if size == 100 {
            step::<ResNet18>(
                c,
                &format!("resnet18 step 100² batch {}", cfg.batch_size),
                baseline,
                &data,
            );
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(5));
    targets = bench_epoch
}
criterion_main!(benches);
