//! Training end to end on the CPU: a tiny run learns, and a run interrupted
//! and resumed from its checkpoint ends exactly where an uninterrupted one does.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use saccade::data::{open_dataset, DataConfig, Dataset, Split, SplitSizes};
use saccade::models::SaccadeConfig;
use saccade::train::{LrSchedule, TrainConfig, Trainer};
use saccade::Device;

fn config(epochs: usize, train: usize) -> TrainConfig {
    let mut model = SaccadeConfig::small(1, 10);
    model.glimpses = 2;
    TrainConfig {
        model,
        dataset: "cluttered-mnist-1".into(),
        epochs,
        batch_size: 16,
        lr: 1e-3,
        lr_schedule: LrSchedule::Cosine,
        clip_value: 0.0,
        clip_norm: 0.0,
        seed: 5,
        sizes: [train, 64, 256],
        class_names: Vec::new(),
        baseline: None,
    }
}

fn data(cfg: &TrainConfig, split: Split) -> Arc<dyn Dataset> {
    let [train, valid, test] = cfg.sizes;
    let dc = DataConfig {
        seed: cfg.seed,
        sizes: SplitSizes { train, valid, test },
        mnist_dir: None,
    };
    open_dataset(&cfg.dataset, split, &dc).unwrap()
}

fn params(t: &Trainer) -> Vec<Vec<f32>> {
    t.model
        .params
        .iter()
        .map(|(_, p)| p.value.to_vec().unwrap())
        .collect()
}

#[test]
fn resume_equals_an_uninterrupted_run() {
    let cfg = config(2, 48);
    let train = data(&cfg, Split::Train);
    let dir = tempfile::tempdir().unwrap();

    let mut whole: Trainer = Trainer::new(cfg.clone(), Device::cpu()).unwrap();
    whole
        .fit(
            &train,
            None,
            &dir.path().join("whole"),
            false,
            &AtomicBool::new(false),
        )
        .unwrap();

    // Stop after the first step (as Ctrl-C does), then resume from the
    // checkpoint in a fresh trainer, mid-epoch.
    let out = dir.path().join("parts");
    let mut first: Trainer = Trainer::new(cfg, Device::cpu()).unwrap();
    let report = first
        .fit(&train, None, &out, false, &AtomicBool::new(true))
        .unwrap();
    assert!(report.interrupted);
    assert_eq!((first.progress.epoch, first.progress.step), (0, 1));
    let ck = report.last_checkpoint.unwrap();
    let mut resumed: Trainer = Trainer::from_checkpoint(&ck, Device::cpu()).unwrap();
    assert_eq!((resumed.progress.epoch, resumed.progress.step), (0, 1));
    resumed
        .fit(&train, None, &out, false, &AtomicBool::new(false))
        .unwrap();

    assert_eq!(resumed.adam.step, whole.adam.step);
    assert!(params(&resumed) == params(&whole), "resumed parameters differ");
}
