//! The model learns where to look, on the CPU, in about a minute: a short run
//! on cluttered-mnist-1 (one digit among clutter on a 100x100 canvas, ten
//! classes) must classify above chance and put its glimpses on the digit.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use saccade::data::{open_dataset, DataConfig, Split, SplitSizes};
use saccade::models::SaccadeConfig;
use saccade::train::{LrSchedule, TrainConfig, Trainer};
use saccade::Device;

const TRAIN: usize = 20_000;
const TEST: usize = 500;

/// One epoch over 20,000 images (625 Adam steps of 32) with the default
/// model at T = 2, cosine schedule, 20-90 s on 2 cores. Runs this short
/// vary a lot between seeds: seeds 7, 8, 9 gave 19.8%, 25.2%, 31.2% test
/// accuracy and 67%, 80%, 95% of digits inside a glimpse (BENCHMARKS.md,
/// "learning guard", 32x32 crops, measured before the speedups); this seed
/// is 7, the lowest, and gives 18.4% and 73.4% with today's 24x24 crops.
/// Thresholds:
/// - accuracy >= 15%, one and a half times chance (10%);
/// - coverage >= 55%, and 20 points above the same model untrained (its
///   two glimpses sit at the centre at mid scale and hold about a fifth
///   of the digits, 19%): the glimpses follow the digit.
#[test]
fn learns_where_to_look_on_cluttered_mnist_1() {
    let mut model = SaccadeConfig::small(1, 10);
    // The glimpses follow the classifier from the first step: the default
    // waits 40k images, longer than this whole run.
    model.policy_warmup = 0;
    model.glimpses = 2;
    let cfg = TrainConfig {
        model,
        dataset: "cluttered-mnist-1".into(),
        epochs: 1,
        batch_size: 32,
        lr: 1e-3,
        lr_schedule: LrSchedule::Cosine,
        clip_value: 0.0,
        clip_norm: 0.0,
        seed: 7,
        sizes: [TRAIN, 1, TEST],
        class_names: Vec::new(),
        baseline: None,
    };
    let dc = DataConfig {
        seed: cfg.seed,
        sizes: SplitSizes {
            train: TRAIN,
            valid: 1,
            test: TEST,
        },
        mnist_dir: None,
    };
    let train = open_dataset(&cfg.dataset, Split::Train, &dc).unwrap();
    let test = open_dataset(&cfg.dataset, Split::Test, &dc).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let mut t: Trainer = Trainer::new(cfg, Device::cpu()).unwrap();
    let before = t.evaluate(&test, false).unwrap().coverage.unwrap();
    t.fit(&train, None, dir.path(), false, &AtomicBool::new(false))
        .unwrap();
    let r = t.evaluate(&test, false).unwrap();
    let after = r.coverage.unwrap();
    println!(
        "test accuracy {:.1}%; digit inside a glimpse: {:.1}% before training, {:.1}% after; {:.0} s",
        100.0 * r.accuracy,
        100.0 * before.all_objects,
        100.0 * after.all_objects,
        t0.elapsed().as_secs_f64()
    );
    assert!(after.all_objects >= 0.55, "coverage {after:?}");
    assert!(
        after.all_objects >= before.all_objects + 0.20,
        "coverage {after:?}, untrained {before:?}"
    );
    assert!(r.accuracy >= 0.15, "test accuracy {}", r.accuracy);
}
