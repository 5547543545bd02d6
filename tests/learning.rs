//! The model learns where to look, on the CPU, in about a minute: a tiny run
//! on cluttered-mnist-1 (one digit among clutter on a 100x100 canvas, ten
//! classes) must classify far above chance and put its glimpses on the digit.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use saccade::data::cluttered::{mnist_split, SceneDataset};
use saccade::data::mnist::{default_dir, Mnist};
use saccade::data::spec::{DatasetSpec, Source};
use saccade::data::{open_dataset, DataConfig, Dataset, Loader, LoaderConfig, Split, SplitSizes};
use saccade::models::SaccadeConfig;
use saccade::predict::predict_batch;
use saccade::train::{LrSchedule, TrainConfig, Trainer};
use saccade::Device;

const TRAIN: usize = 20_000;
const TEST: usize = 500;

/// Fraction of test digits whose centre lies inside at least one glimpse
/// (posterior means), and the test accuracy.
fn coverage_and_accuracy(t: &Trainer, seed: u64) -> (f64, f64) {
    let parsed = DatasetSpec::parse("cluttered-mnist-1").unwrap();
    let Source::Generated(scene) = parsed.source else {
        unreachable!("a generated task")
    };
    let mnist = Arc::new(Mnist::load(&default_dir(), mnist_split(Split::Test)).unwrap());
    let ds = Arc::new(SceneDataset::new(scene, Split::Test, seed, TEST, mnist, 32, 0.0).unwrap());
    let side = ds.image_size().0 as f32;
    let data: Arc<dyn Dataset> = ds.clone();
    let loader = Loader::new(
        data,
        LoaderConfig {
            batch_size: 100,
            shuffle: false,
            ..Default::default()
        },
        &Device::cpu(),
    )
    .unwrap();
    let (mut covered, mut correct) = (0, 0);
    for batch in loader.epoch(0) {
        let batch = batch.unwrap();
        let (probs, glimpses, _) = predict_batch(&t.model, &batch).unwrap();
        let k = probs.shape()[1];
        let p = probs.to_vec().unwrap();
        for (i, &idx) in batch.indices.iter().enumerate() {
            let row = &p[i * k..(i + 1) * k];
            let best = (0..k).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
            correct += (best == batch.labels[i]) as usize;
            let d = ds.scene(idx).digits[0];
            let (cx, cy) = (d.x as f32 + d.px as f32 / 2.0, d.y as f32 + d.px as f32 / 2.0);
            let inside = glimpses[i].iter().any(|&[s, tx, ty]| {
                let (gx, gy, half) = ((tx + 1.0) * side / 2.0, (ty + 1.0) * side / 2.0, s * side / 2.0);
                (cx - gx).abs() <= half && (cy - gy).abs() <= half
            });
            covered += inside as usize;
        }
    }
    (covered as f64 / TEST as f64, correct as f64 / TEST as f64)
}

/// One epoch over 20,000 images (625 Adam steps of 32) with the small preset
/// at T = 2, about 75 s on 2 cores (this seed: 33% accuracy, 93% coverage).
/// Runs are deterministic for a seed but this early in training they vary a
/// lot between seeds (16,000 images, seeds 7 and 1: 49% / 26% accuracy, 98% /
/// 81% coverage), so the thresholds leave room:
/// - accuracy >= 20%, twice chance (10%);
/// - coverage >= 70%, the evidence that the glimpses follow the digit: the
///   best single fixed glimpse of the largest size (half the side) covers
///   about 48% of digit centres, since centres fall uniformly on a 72-pixel
///   span and the glimpse spans 50 pixels per axis ((50/72)^2); runs whose
///   glimpses ignored the image covered 20-43%.
#[test]
fn learns_where_to_look_on_cluttered_mnist_1() {
    let mut model = SaccadeConfig::small(1, 10);
    model.glimpses = 2;
    let cfg = TrainConfig {
        model,
        dataset: "cluttered-mnist-1".into(),
        epochs: 1,
        batch_size: 32,
        lr: 1e-3,
        lr_schedule: LrSchedule::Constant,
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
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let mut t: Trainer = Trainer::new(cfg, Device::cpu()).unwrap();
    t.fit(&train, None, dir.path(), false, &AtomicBool::new(false))
        .unwrap();
    let (coverage, accuracy) = coverage_and_accuracy(&t, 7);
    println!(
        "test accuracy {:.1}%, digit centres inside a glimpse {:.1}%, {:.0} s",
        100.0 * accuracy,
        100.0 * coverage,
        t0.elapsed().as_secs_f64()
    );
    assert!(accuracy >= 0.20, "test accuracy {accuracy}");
    assert!(coverage >= 0.70, "digit centres inside a glimpse: {coverage}");
}
