//! One full training step (forward, backward, Adam) of the saccade model at
//! batch 32 on 100² cluttered MNIST, on the CPU: the default (`small`)
//! preset that `saccade train` runs, and the paper's preset. The same batch
//! every iteration, so the loader is not timed. `saccade bench --profile`
//! breaks the same step down per op.

use criterion::{criterion_group, criterion_main, Criterion};
use saccade::bench;
use saccade::models::Saccader;
use saccade::Device;

const BATCH: usize = 32;

fn bench_step(c: &mut Criterion) {
    let data = bench::dataset(100, BATCH).expect("dataset");
    for (name, paper) in [("small", false), ("paper", true)] {
        let cfg = bench::saccade_config(paper, data.as_ref(), BATCH);
        let (mut trainer, batch) =
            bench::prepare::<Saccader>(cfg, &data, &Device::cpu()).expect("bench setup");
        c.bench_function(&format!("saccade {name} step 100² batch {BATCH}"), |b| {
            b.iter(|| trainer.step(&batch).expect("training step"))
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_secs(2))
        .measurement_time(std::time::Duration::from_secs(8));
    targets = bench_step
}
criterion_main!(benches);
