//! The model learns where to look, on the CPU, in about a minute: short runs
//! on cluttered-mnist-1 (one digit among clutter on a 100x100 canvas, ten
//! classes) must classify above chance and put their glimpses on the digit.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use saccade::data::{open_dataset, DataConfig, Split, SplitSizes};
use saccade::models::SaccadeConfig;
use saccade::train::{LrSchedule, TrainConfig, Trainer};
use saccade::Device;

const TRAIN: usize = 30_000;
const TEST: usize = 500;

/// What one short run reached: test accuracy and the share of test digits
/// inside a glimpse before and after training.
struct Outcome {
    accuracy: f64,
    before: f64,
    after: f64,
}

/// One epoch over 30,000 images (938 Adam steps of 32) of the default model
/// (T = 4, hard mask), cosine schedule, glimpses free from the first step
/// (the default waits 40k images, longer than this whole run): 30-45 s on
/// 2 cores.
fn short_run(seed: u64) -> Outcome {
    let mut model = SaccadeConfig::small(1, 10);
    model.policy_warmup = 0;
    let cfg = TrainConfig {
        model,
        dataset: "cluttered-mnist-1".into(),
        epochs: 1,
        batch_size: 32,
        lr: 1e-3,
        lr_schedule: LrSchedule::Cosine,
        clip_value: 0.0,
        clip_norm: 0.0,
        seed,
        sizes: [TRAIN, 1, TEST],
        augment: false,
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
        "seed {seed}: test accuracy {:.1}%; digit inside a glimpse: {:.1}% before training, {:.1}% after; {:.0} s",
        100.0 * r.accuracy,
        100.0 * before.all_objects,
        100.0 * after.all_objects,
        t0.elapsed().as_secs_f64()
    );
    Outcome {
        accuracy: r.accuracy,
        before: before.all_objects,
        after: after.all_objects,
    }
}

/// Runs this short succeed or fail as a whole: either the classifier picks
/// up digits and the glimpses follow, or neither happens. Measured
/// 2026-11-30: at 30k images seeds 3, 4, 7, 8 reached 29.6-32.4% accuracy
/// and 87.8-99.2% coverage, seed 5 13.4% and 55.6%; at 20k images seeds 1,
/// 2, 7, 9 reached 20.4-28.8% and 94-99%, seed 8 17.6% and 59%. A change in
/// the last bits of any op (a faster `exp`) moves a seed from one group to
/// the other. So the guard takes the
/// better of two seeds, which fails when learning breaks, not when a seed's
/// trajectory shifts. Thresholds, for the better run:
/// - accuracy >= 20%, twice chance (the successful runs reached 20-32%);
/// - coverage >= 75%, and 40 points above the same model untrained (whose
///   glimpses hold about a fifth of the digits, 19-28%): the glimpses find
///   the digit.
#[test]
fn learns_where_to_look_on_cluttered_mnist_1() {
    let runs = [short_run(7), short_run(8)];
    let best = runs
        .iter()
        .max_by(|a, b| a.accuracy.total_cmp(&b.accuracy))
        .unwrap();
    assert!(best.accuracy >= 0.20, "test accuracy {}", best.accuracy);
    assert!(best.after >= 0.75, "coverage {}", best.after);
    assert!(
        best.after >= best.before + 0.40,
        "coverage {}, untrained {}",
        best.after,
        best.before
    );
}
