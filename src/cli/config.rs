//! A run's [`TrainConfig`] from the `saccade train` flags: the presets, the
//! flags over them, and for --resume the flags checked against the
//! checkpoint's configuration.

use std::path::Path;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use clap::ValueEnum;

use super::train::TrainArgs;
use super::{usage, Failure};
use crate::data::spec::DatasetSpec;
use crate::data::{self, Split, SplitSizes};
use crate::models::saccader::{decoder_pool_for, summary_pool_for};
use crate::models::{ResNetConfig, SaccadeConfig, TiledConfig};
use crate::train::{checkpoint_config, Baseline, LrSchedule, TrainConfig};

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub(super) enum Preset {
    /// Sized to train in under 15 minutes on a 2-core CPU: 24x24 crops at 0.2-0.5 of the side,
    /// T=4, hidden 128, hard mask over attended cells, glimpses follow the classifier after
    /// 40k images, 5 epochs of 150k images, batch 32, Adam 1e-3 with warmup, constant rate and
    /// a linear decay over the last 20% (WSD).
    Small,
    /// The paper's setting: 64x64 crops at 0.1-0.3 of the side, hidden 256, 60 epochs of 100k
    /// images, batch 100, Adam 1e-4 constant, gradient values clipped to 0.25.
    Paper,
    /// Many small objects on a large canvas (the default for megapixel-mnist): 10 glimpses of
    /// 32x32 at 0.035-0.06 of the side, each on the best proxy cell (one learnt ranking) with
    /// ink not yet covered,
    /// pooled by attention (proxy scores plus a score of what each glimpse saw, which the proxy
    /// learns) beside a max with their places; 12 epochs, batch 32, Adam 1e-3 WSD, gradient
    /// values clipped to 1.
    ManyObjects,
}

/// What each preset is, in one place: the model side lives in
/// `SaccadeConfig::small` and `SaccadeConfig::paper`, the training side here.
impl Preset {
    fn model(self, channels: usize, num_classes: usize) -> SaccadeConfig {
        match self {
            Preset::Small => SaccadeConfig::small(channels, num_classes),
            Preset::Paper => SaccadeConfig::paper(channels, num_classes),
            Preset::ManyObjects => SaccadeConfig::many_objects(channels, num_classes),
        }
    }

    /// A new run of this preset on `dataset`, before any flag; the caller
    /// fills in what the data says (proxy size, class names).
    fn config(self, dataset: String, channels: usize, num_classes: usize) -> TrainConfig {
        let model = self.model(channels, num_classes);
        match self {
            Preset::Small => TrainConfig {
                model,
                baseline: None,
                dataset,
                epochs: 5,
                batch_size: 32,
                lr: 1e-3,
                lr_schedule: LrSchedule::Wsd,
                clip_value: 0.0,
                clip_norm: 0.0,
                seed: 1,
                // 750k images: about 9 minutes on 2 cores (BENCHMARKS.md,
                // "The default run"), 1.7 points above 500k at the median.
                sizes: [150_000, 1_000, 2_000],
                augment: false,
                class_names: Vec::new(),
            },
            Preset::Paper => TrainConfig {
                model,
                baseline: None,
                dataset,
                epochs: 60,
                batch_size: 100,
                lr: 1e-4,
                lr_schedule: LrSchedule::Constant,
                clip_value: 0.25,
                clip_norm: 0.0,
                seed: 1,
                sizes: [100_000, 10_000, 10_000],
                augment: false,
                class_names: Vec::new(),
            },
            Preset::ManyObjects => TrainConfig {
                model,
                epochs: 12,
                clip_value: 1.0,
                // The dataset's own sizes replace these (megapixel-mnist:
                // the peers' 5000 training images).
                sizes: [5_000, 1_000, 1_000],
                augment: false,
                ..Preset::Small.config(dataset, channels, num_classes)
            },
        }
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub(super) enum ModelChoice {
    /// Variational saccading.
    Saccade,
    /// Baseline: ResNet18 over the whole image (100x100 tasks).
    Resnet18,
    /// Baseline: one ResNet18 over every tile of a large image, features summed.
    TiledResnet18,
}

/// The dataset spec with the proxy flags folded in; `base` without --dataset.
fn dataset_spec(a: &TrainArgs, base: &str) -> String {
    let mut spec = a.dataset.clone().unwrap_or_else(|| base.to_string());
    if let Some(j) = a.proxy_size {
        spec.push_str(&format!(",proxy={j}"));
    }
    if let Some(n) = a.proxy_noise {
        spec.push_str(&format!(",noise={n}"));
    }
    spec
}

/// Open a few test samples of `spec` to learn its shapes and class names.
pub(super) fn probe(spec: &str) -> Result<Arc<dyn data::Dataset>> {
    let cfg = data::DataConfig {
        sizes: SplitSizes {
            train: 1,
            valid: 1,
            test: 1,
        },
        ..Default::default()
    };
    data::open_dataset(spec, Split::Test, &cfg)
}

/// A new run's configuration: the preset's, then the flags given.
pub(super) fn train_config(a: &TrainArgs) -> Result<TrainConfig> {
    let spec = dataset_spec(a, "cluttered-mnist");
    let probe = probe(&spec)?;
    let source = DatasetSpec::parse(&spec)?.source;
    let many = matches!(source, data::spec::Source::Megapixel(_));
    ensure!(
        !matches!(source, data::spec::Source::Store(_))
            || [a.train_size, a.valid_size, a.test_size]
                .iter()
                .all(Option::is_none),
        "--train-size, --valid-size and --test-size size generated datasets; a store's splits are \
         the images its manifest lists (`saccade data inspect {spec}` shows them): leave them out"
    );
    let preset = a
        .preset
        .unwrap_or(if many { Preset::ManyObjects } else { Preset::Small });
    let mut cfg = preset_run(preset, spec, probe.as_ref())?;
    if let Some(init) = &a.init {
        ensure!(
            a.model.is_none_or(|m| m == ModelChoice::Saccade),
            "--init fine-tunes the saccade model; leave out --model"
        );
        cfg.model = init_model(&cfg.model, init)?;
    }
    apply_flags(a, &mut cfg);
    check_model_flags(a, &cfg)?;
    if a.policy_warmup.is_none() {
        fit_policy_warmup(&mut cfg)?;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Shorten the preset's policy warmup to a quarter of a short run's
/// training images, so that the glimpses follow the classifier from half
/// the run on (the gradient ramps in over as many images again), and say
/// so: on 33 images the small preset's 40 000 kept the glimpses where they
/// started for the whole run, silently.
fn fit_policy_warmup(cfg: &mut TrainConfig) -> Result<()> {
    let m = &cfg.model;
    if cfg.baseline.is_some() || !m.policy_gradient || m.policy_warmup == 0 {
        return Ok(());
    }
    let images = cfg.epochs * data::open_dataset(&cfg.dataset, Split::Train, &cfg.data_config())?.len();
    if m.policy_warmup > images / 4 {
        eprintln!(
            "note: the preset's policy warmup ({} images) is longer than a quarter of this run's {images} \
             training images: {} here, so the glimpses follow the classifier from half the run on \
             (--policy-warmup sets it)",
            m.policy_warmup,
            images / 4
        );
        cfg.model.policy_warmup = images / 4;
    }
    Ok(())
}

/// Refuse a baseline's flags for a model that has no use for them (they
/// were ignored silently).
fn check_model_flags(a: &TrainArgs, cfg: &TrainConfig) -> Result<()> {
    let tiled = matches!(cfg.baseline, Some(Baseline::TiledResNet18(_)));
    ensure!(
        tiled || (a.tile.is_none() && a.tile_chunk.is_none() && !a.checkpointing),
        "--tile, --tile-chunk and --checkpointing apply to --model tiled-resnet18 only"
    );
    ensure!(
        cfg.baseline.is_some() || a.resnet_width.is_none(),
        "--resnet-width applies to the baselines (--model resnet18 or tiled-resnet18) only"
    );
    Ok(())
}

/// The model of `init`'s checkpoint on the data `data` describes: its
/// architecture with the data's channels, classes, tasks and proxy size
/// (and the pools that follow from the proxy).
fn init_model(data: &SaccadeConfig, init: &Path) -> Result<SaccadeConfig> {
    let from = checkpoint_config(init).with_context(|| format!("--init {}", init.display()))?;
    ensure!(
        from.baseline.is_none(),
        "--init {}: a baseline's checkpoint; --init takes a saccade model's",
        init.display()
    );
    Ok(SaccadeConfig {
        channels: data.channels,
        num_classes: data.num_classes,
        task_heads: data.task_heads.clone(),
        proxy_size: data.proxy_size,
        decoder_pool: data.decoder_pool,
        summary_pool: data.summary_pool,
        ..from.model
    })
}

/// `preset` on the dataset `spec`, before any flag, with what the data says
/// filled in (`probe`: its test split): split sizes of a benchmark, proxy
/// size and the pools that follow from it, class names, task heads.
pub(super) fn preset_run(preset: Preset, spec: String, probe: &dyn data::Dataset) -> Result<TrainConfig> {
    let mut cfg = preset.config(spec, probe.channels(), probe.num_classes());
    if let Some(s) = data::spec::DatasetSpec::parse(&cfg.dataset)?.default_sizes() {
        cfg.sizes = [s.train, s.valid, s.test];
    }
    cfg.model.proxy_size = probe.proxy_shape().1;
    cfg.model.decoder_pool = decoder_pool_for(cfg.model.proxy_size);
    cfg.model.summary_pool = summary_pool_for(cfg.model.proxy_size);
    cfg.class_names = probe.class_names();
    let tasks = probe.tasks();
    if tasks.len() > 1 || tasks[0].multi_label {
        cfg.model.task_heads = tasks;
    }
    Ok(cfg)
}

/// Put the flags given into `cfg`; a flag left out leaves it as it is (the
/// dataset and proxy flags are the caller's: they make the spec).
fn apply_flags(a: &TrainArgs, cfg: &mut TrainConfig) {
    let m = &mut cfg.model;
    m.glimpses = a.glimpses.unwrap_or(m.glimpses);
    m.crop = a.crop.unwrap_or(m.crop);
    m.scale_max = a.max_scale.unwrap_or(m.scale_max);
    m.scale_min = a.min_scale.unwrap_or(m.scale_min);
    m.focus = a.focus.unwrap_or(m.focus);
    m.glimpse_position |= a.glimpse_position;
    m.ink_prior |= a.ink_prior;
    m.fixed_query |= a.fixed_query;
    m.task_pools = (m.task_pools || a.task_pools) && !a.no_task_pools;
    m.beta = a.beta.unwrap_or(m.beta);
    m.policy_warmup = a.policy_warmup.unwrap_or(m.policy_warmup);
    m.policy_gradient &= !a.no_policy_gradient;
    m.glimpse_pool = a.glimpse_pool.unwrap_or(m.glimpse_pool);
    m.classifier_width = a.classifier_width.unwrap_or(m.classifier_width);
    m.multiplicative |= a.multiplicative;
    m.mask_attended &= !a.no_mask;
    if a.fixed_variance.is_some() {
        m.fixed_variance = a.fixed_variance;
    }
    let (channels, num_classes) = (m.channels, m.num_classes);
    cfg.epochs = a.epochs.unwrap_or(cfg.epochs);
    cfg.batch_size = a.batch_size.unwrap_or(cfg.batch_size);
    cfg.lr = a.lr.unwrap_or(cfg.lr);
    cfg.lr_schedule = a.lr_schedule.unwrap_or(cfg.lr_schedule);
    cfg.clip_value = a.clip_value.unwrap_or(cfg.clip_value);
    cfg.seed = a.seed.unwrap_or(cfg.seed);
    cfg.augment = (cfg.augment || a.augment) && !a.no_augment;
    for (s, v) in cfg
        .sizes
        .iter_mut()
        .zip([a.train_size, a.valid_size, a.test_size])
    {
        *s = v.unwrap_or(*s);
    }
    cfg.baseline = baseline(a, cfg.baseline, channels, num_classes);
}

/// The baseline the flags ask for, starting from `current`.
fn baseline(
    a: &TrainArgs,
    current: Option<Baseline>,
    channels: usize,
    num_classes: usize,
) -> Option<Baseline> {
    let kind = a.model.unwrap_or(match current {
        None => ModelChoice::Saccade,
        Some(Baseline::ResNet18(_)) => ModelChoice::Resnet18,
        Some(Baseline::TiledResNet18(_)) => ModelChoice::TiledResnet18,
    });
    match kind {
        ModelChoice::Saccade => None,
        ModelChoice::Resnet18 => {
            let mut c = match current {
                Some(Baseline::ResNet18(c)) => c,
                _ => ResNetConfig {
                    channels,
                    num_classes,
                    width: 64,
                },
            };
            c.width = a.resnet_width.unwrap_or(c.width);
            Some(Baseline::ResNet18(c))
        }
        ModelChoice::TiledResnet18 => {
            let mut c = match current {
                Some(Baseline::TiledResNet18(c)) => c,
                _ => TiledConfig::paper(channels, num_classes),
            };
            c.width = a.resnet_width.unwrap_or(c.width);
            c.tile = a.tile.unwrap_or(c.tile);
            c.chunk = a.tile_chunk.unwrap_or(c.chunk);
            c.checkpoint |= a.checkpointing;
            Some(Baseline::TiledResNet18(c))
        }
    }
}

/// The checkpoint's configuration, refusing flags that would change it;
/// --epochs may (a run can be extended, see `resumed`).
pub(super) fn resume_config(a: &TrainArgs, path: &Path) -> Result<TrainConfig, Failure> {
    // Resuming weights alone would restart Adam from zero mid-run, silently.
    if crate::checkpoint::Checkpoint::load(path)?.adam_step.is_none() {
        return Err(usage(anyhow::anyhow!(
            "{} holds weights only (an exported or shipped model, without the optimizer's state), \
             so it cannot resume a run: resume from the run's checkpoint.safetensors, or evaluate \
             it with `saccade eval --checkpoint {}`",
            path.display(),
            path.display()
        )));
    }
    let saved = checkpoint_config(path)?;
    let mut want = saved.clone();
    apply_flags(a, &mut want);
    want.epochs = saved.epochs;
    let mut conflicts: Vec<String> = config_differences(&want, &saved)
        .into_iter()
        .map(|(field, w, s)| format!("{} ({field} {w}, the checkpoint's {s})", flag_of(&field)))
        .collect();
    if let Some(p) = a.preset {
        // The preset's own fields: those no other flag given sets.
        let m = &saved.model;
        let mut preset = TrainConfig {
            model: SaccadeConfig {
                proxy_size: m.proxy_size,
                decoder_pool: m.decoder_pool,
                summary_pool: m.summary_pool,
                task_heads: m.task_heads.clone(),
                ..p.model(m.channels, m.num_classes)
            },
            ..saved.clone()
        };
        apply_flags(a, &mut preset);
        preset.epochs = saved.epochs;
        let fields: Vec<String> = config_differences(&preset, &want)
            .into_iter()
            .map(|(field, w, s)| format!("{field} {w} against {s}"))
            .collect();
        if !fields.is_empty() {
            conflicts.push(format!("--preset ({})", fields.join(", ")));
        }
    }
    if a.dataset.is_some() || a.proxy_size.is_some() || a.proxy_noise.is_some() {
        let spec = dataset_spec(a, &saved.dataset);
        if DatasetSpec::parse(&spec).ok() != DatasetSpec::parse(&saved.dataset).ok() {
            conflicts.push(format!(
                "--dataset/--proxy-size/--proxy-noise ({spec}, the checkpoint's {})",
                saved.dataset
            ));
        }
    }
    if !conflicts.is_empty() {
        return Err(usage(anyhow::anyhow!(
            "--resume {}: these flags conflict with the checkpoint's configuration: {}. \
             Leave them out to continue that run, or start a new run without --resume",
            path.display(),
            conflicts.join("; ")
        )));
    }
    Ok(saved)
}

/// The fields where `a` and `b` differ, as (path, a's value, b's value).
fn config_differences(a: &TrainConfig, b: &TrainConfig) -> Vec<(String, String, String)> {
    // Through text, so that f32 values read as written (0.01, not 0.009999999776).
    let json = |c: &TrainConfig| -> serde_json::Value {
        serde_json::to_string(c)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    diff_json(String::new(), &json(a), &json(b), &mut out);
    out
}

fn diff_json(
    path: String,
    a: &serde_json::Value,
    b: &serde_json::Value,
    out: &mut Vec<(String, String, String)>,
) {
    use serde_json::Value;
    let join = |k: &dyn std::fmt::Display| match path.is_empty() {
        true => k.to_string(),
        false => format!("{path}.{k}"),
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let (u, v) = (x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null));
                diff_json(join(k), u, v, out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                diff_json(join(&i), u, v, out);
            }
        }
        _ if a != b => out.push((path, a.to_string(), b.to_string())),
        _ => {}
    }
}

/// The `saccade train` flag that sets a configuration field.
fn flag_of(field: &str) -> &'static str {
    match field {
        "sizes.0" => return "--train-size",
        "sizes.1" => return "--valid-size",
        "sizes.2" => return "--test-size",
        _ => {}
    }
    match field.rsplit('.').next().unwrap_or(field) {
        "glimpses" => "--glimpses",
        "crop" => "--crop",
        "scale_max" => "--max-scale",
        "scale_min" => "--min-scale",
        "focus" => "--focus",
        "glimpse_position" => "--glimpse-position",
        "ink_prior" => "--ink-prior",
        "fixed_query" => "--fixed-query",
        "task_pools" => "--task-pools/--no-task-pools",
        "beta" => "--beta",
        "multiplicative" => "--multiplicative",
        "fixed_variance" => "--fixed-variance",
        "mask_attended" => "--no-mask",
        "policy_warmup" => "--policy-warmup",
        "policy_gradient" => "--no-policy-gradient",
        "glimpse_pool" => "--glimpse-pool",
        "classifier_width" => "--classifier-width",
        "batch_size" => "--batch-size",
        "lr" => "--lr",
        "lr_schedule" => "--lr-schedule",
        "clip_value" => "--clip-value",
        "seed" => "--seed",
        "augment" => "--augment",
        "width" => "--resnet-width",
        "tile" => "--tile",
        "chunk" => "--tile-chunk",
        "checkpoint" => "--checkpointing",
        "baseline" | "ResNet18" | "TiledResNet18" => "--model",
        _ => "a flag",
    }
}
