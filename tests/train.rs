//! Training end to end on the CPU: a tiny run learns, and a run interrupted
//! and resumed from its checkpoint ends exactly where an uninterrupted one does.

mod common;
use common::metric_epochs;

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
        augment: false,
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
    // The interrupted epoch's figures count all its steps, as the whole
    // run's do (they counted only those after the resume: probe item 4).
    let lines = |run: &str| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(dir.path().join(run).join("metrics.jsonl")).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let (w, p) = (lines("whole"), lines("parts"));
    for key in ["samples", "train_loss", "train_accuracy", "train_kl"] {
        assert_eq!(p[0][key], w[0][key], "{key} of the resumed epoch");
    }
    assert!(p[0].get("from_step").is_none(), "{}", p[0]);
}

/// metrics.jsonl used to be appended before the checkpoint was written, so
/// a run killed between the two repeated that epoch's line on resume. Now
/// it is rewritten from the checkpoint's own history with every checkpoint.
#[test]
fn metrics_never_repeat_an_epoch_after_a_crash_between_metrics_and_checkpoint() {
    let cfg = config(2, 32);
    let train = data(&cfg, Split::Train);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let mut t: Trainer = Trainer::new(config(1, 32), Device::cpu()).unwrap();
    t.fit(&train, None, out, false, &AtomicBool::new(false)).unwrap();
    let metrics = out.join("metrics.jsonl");
    assert_eq!(metric_epochs(&metrics), [1]);
    // As if killed after writing epoch 2's line, before its checkpoint.
    let mut text = std::fs::read_to_string(&metrics).unwrap();
    text.push_str("{\"epoch\":2,\"train_loss\":1.0}\n");
    std::fs::write(&metrics, text).unwrap();

    let ck = out.join("checkpoint.safetensors");
    let mut resumed: Trainer = Trainer::from_checkpoint(&ck, Device::cpu()).unwrap();
    resumed.cfg.epochs = 2;
    resumed
        .fit(&train, None, out, false, &AtomicBool::new(false))
        .unwrap();
    assert_eq!(metric_epochs(&metrics), [1, 2]);
    let saved = saccade::checkpoint::Checkpoint::load(&ck).unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(saved.meta["history"], serde_json::Value::from(lines));
}

/// A checkpoint from before the history: its metrics.jsonl (here with a
/// repeated epoch) is read back, one line per epoch done.
#[test]
fn a_checkpoint_without_history_takes_it_from_metrics_once_per_epoch() {
    let train = data(&config(2, 32), Split::Train);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let mut t: Trainer = Trainer::new(config(1, 32), Device::cpu()).unwrap();
    t.fit(&train, None, out, false, &AtomicBool::new(false)).unwrap();
    let metrics = out.join("metrics.jsonl");
    let line = std::fs::read_to_string(&metrics).unwrap();
    std::fs::write(&metrics, format!("{line}{line}")).unwrap();
    t.history.clear();
    let ck = out.join("checkpoint.safetensors");
    t.save(&ck).unwrap();

    let mut resumed: Trainer = Trainer::from_checkpoint(&ck, Device::cpu()).unwrap();
    assert!(resumed.history.is_empty());
    resumed.cfg.epochs = 2;
    resumed
        .fit(&train, None, out, false, &AtomicBool::new(false))
        .unwrap();
    assert_eq!(metric_epochs(&metrics), [1, 2]);
}

/// A write that fails (here: the target is a folder; a full disk alike)
/// leaves neither a temporary file nor a changed target behind.
#[test]
fn a_failed_atomic_write_removes_its_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("metrics.jsonl");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep"), b"x").unwrap();
    assert!(saccade::files::write_atomic(&target, b"data").is_err());
    assert!(!dir.path().join("metrics.jsonl.tmp").exists());
    assert!(target.join("keep").is_file());
}

/// A checkpoint whose configuration the model cannot run (glimpses 0 used
/// to fail later with "concat of no tensors") is refused on load by name.
#[test]
fn a_checkpoint_with_an_impossible_configuration_is_refused_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("checkpoint.safetensors");
    let mut t: Trainer = Trainer::new(config(1, 16), Device::cpu()).unwrap();
    t.cfg.model.glimpses = 0;
    t.save(&ck).unwrap();
    let e = match Trainer::<saccade::models::Saccader>::from_checkpoint(&ck, Device::cpu()) {
        Ok(_) => panic!("loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("configuration is invalid"), "{e}");
    assert!(
        e.contains("glimpses (--glimpses) must be within 1..=256, got 0"),
        "{e}"
    );
}
