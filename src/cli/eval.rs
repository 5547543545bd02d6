//! `saccade eval`, `export` and `predict`: what a trained checkpoint does.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use super::config::probe;
use super::{select_device, usage, DeviceArgs, Failure};
use crate::data::{self, Split, SplitSizes};
use crate::models::{ResNet18, SaccadeConfig, Saccader, TiledResNet18};
use crate::train::{checkpoint_config, Baseline, Coverage, Model, TrainConfig, Trainer};
use crate::Device;

#[derive(Args)]
pub(super) struct EvalArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    /// Dataset to evaluate on (default: the checkpoint's, test split).
    #[arg(long)]
    dataset: Option<String>,
    #[arg(long)]
    test_size: Option<usize>,
    #[command(flatten)]
    pub(super) device: DeviceArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(super) struct ExportArgs {
    /// Checkpoint written by `saccade train`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// File to write (must not exist).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub(super) struct PredictArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    /// PNG, JPEG or TIFF files, or a store folder.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Write the images with their saccades drawn to this PNG.
    #[arg(long)]
    viz: Option<PathBuf>,
    /// Classes to list per image.
    #[arg(long, default_value_t = 3)]
    top: usize,
    #[command(flatten)]
    pub(super) device: DeviceArgs,
    #[arg(long)]
    json: bool,
}

/// The checkpoint's class names, or (older checkpoints) its dataset's.
fn class_names(cfg: &TrainConfig) -> Result<Vec<String>> {
    if !cfg.class_names.is_empty() {
        return Ok(cfg.class_names.clone());
    }
    Ok(probe(&cfg.dataset)?.class_names())
}

pub(super) fn check_compatible(m: &SaccadeConfig, d: &dyn data::Dataset) -> Result<()> {
    if m.channels != d.channels()
        || m.num_classes != d.num_classes()
        || d.proxy_shape() != (m.channels, m.proxy_size)
    {
        bail!(
            "the model has {} channels, {} classes and {}x{} proxies but {} has {} channels, {} classes and {:?} proxies",
            m.channels,
            m.num_classes,
            m.proxy_size,
            m.proxy_size,
            d.describe(),
            d.channels(),
            d.num_classes(),
            d.proxy_shape()
        );
    }
    Ok(())
}

pub(super) fn run_eval(a: EvalArgs) -> Result<(), Failure> {
    if a.test_size == Some(0) {
        return Err(usage(anyhow::anyhow!("--test-size must be at least 1")));
    }
    match checkpoint_config(&a.checkpoint)?.baseline {
        None => eval_model::<Saccader>(a),
        Some(Baseline::ResNet18(_)) => eval_model::<ResNet18>(a),
        Some(Baseline::TiledResNet18(_)) => eval_model::<TiledResNet18>(a),
    }
}

fn eval_model<M: Model>(a: EvalArgs) -> Result<(), Failure> {
    let device = select_device(&a.device)?;
    let mut t = Trainer::<M>::from_checkpoint(&a.checkpoint, device)?;
    let spec = a.dataset.unwrap_or_else(|| t.cfg.dataset.clone());
    let cfg = data::DataConfig {
        seed: t.cfg.seed,
        sizes: SplitSizes {
            test: a.test_size.unwrap_or(2_000),
            ..Default::default()
        },
        mnist_dir: None,
    };
    let test = data::open_dataset(&spec, Split::Test, &cfg)?;
    check_compatible(&t.cfg.model, test.as_ref())?;
    let r = t.evaluate(&test, !a.json)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"command": "eval", "dataset": spec, "report": r})
        );
        return Ok(());
    }
    println!(
        "accuracy {:.2}% on {} test images of {spec}",
        100.0 * r.accuracy,
        r.samples
    );
    if let Some(c) = &r.coverage {
        println!("{}", coverage_line(c));
    }
    let mut worst: Vec<(usize, f64)> = r.per_class_accuracy.iter().copied().enumerate().collect();
    worst.sort_by(|a, b| a.1.total_cmp(&b.1));
    println!("lowest per-class accuracy:");
    for (c, acc) in worst.iter().take(5) {
        println!("  {:>8}  {:.1}%", r.class_names[*c], 100.0 * acc);
    }
    println!("most frequent confusions (true -> predicted: count):");
    for (t, p, n) in r.top_confusions(5) {
        println!("  {t:>8} -> {p:<8} {n}");
    }
    Ok(())
}

pub(super) fn coverage_line(c: &Coverage) -> String {
    format!(
        "glimpse coverage: every object inside some glimpse in {:.1}% of images; {:.2} of {:.2} objects covered on average",
        100.0 * c.all_objects,
        c.mean_covered,
        c.mean_objects
    )
}

pub(super) fn run_export(a: ExportArgs) -> Result<(), Failure> {
    if a.out.exists() {
        return Err(usage(anyhow::anyhow!(
            "--out {} exists; choose a new file",
            a.out.display()
        )));
    }
    match checkpoint_config(&a.checkpoint)?.baseline {
        None => export_model::<Saccader>(a),
        Some(Baseline::ResNet18(_)) => export_model::<ResNet18>(a),
        Some(Baseline::TiledResNet18(_)) => export_model::<TiledResNet18>(a),
    }
}

fn export_model<M: Model>(a: ExportArgs) -> Result<(), Failure> {
    let mut t = Trainer::<M>::from_checkpoint(&a.checkpoint, Device::cpu())?;
    t.cfg.class_names = class_names(&t.cfg)?;
    t.save_weights(&a.out)?;
    let bytes = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({:.1} MB): weights, configuration and {} class names",
        a.out.display(),
        bytes as f64 / 1e6,
        t.cfg.class_names.len()
    );
    Ok(())
}

pub(super) fn run_predict(a: PredictArgs) -> Result<(), Failure> {
    let device = select_device(&a.device)?;
    let t = Trainer::<Saccader>::from_checkpoint(&a.checkpoint, device)?;
    let names = class_names(&t.cfg)?;
    let results = crate::predict::predict_files(&t.model, &a.images, a.viz.as_deref())?;
    let mut rows = Vec::new();
    for (path, probs) in a.images.iter().zip(&results) {
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&i, &j| probs[j].total_cmp(&probs[i]));
        let top: Vec<(String, f32)> = order
            .iter()
            .take(a.top)
            .map(|&i| (names[i].clone(), probs[i]))
            .collect();
        if !a.json {
            let s: Vec<String> = top
                .iter()
                .map(|(n, p)| format!("{n} {:.1}%", 100.0 * p))
                .collect();
            println!("{}: {}", path.display(), s.join(", "));
        }
        rows.push(serde_json::json!({"image": path, "top": top}));
    }
    if let Some(v) = &a.viz {
        if !a.json {
            println!("wrote {}", v.display());
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({"command": "predict", "predictions": rows, "viz": a.viz})
        );
    }
    Ok(())
}
