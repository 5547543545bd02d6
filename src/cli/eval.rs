//! `saccade eval`, `export` and `predict`: what a trained checkpoint does.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::config::probe;
use super::data::SplitArg;
use super::{select_device, usage, DeviceArgs, Failure};
use crate::data::decode::IMAGE_KINDS;
use crate::data::{self, Split, SplitSizes};
use crate::models::saccader::glimpse_box;
use crate::models::{ResNet18, SaccadeConfig, Saccader, TiledResNet18};
use crate::predict::Input;
use crate::train::{checkpoint_config, Baseline, Coverage, Model, TrainConfig, Trainer};
use crate::Device;

#[derive(Args)]
pub(super) struct EvalArgs {
    /// Checkpoint written by `saccade train` or `saccade export`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Dataset to evaluate on, test split: a generated dataset spec or a store folder
    /// (default: the checkpoint's).
    #[arg(long)]
    dataset: Option<String>,
    /// Test images of a generated dataset to evaluate [default: 2000, or the dataset's
    /// own: megapixel-mnist 1000]; a store's test split is used whole.
    #[arg(long)]
    test_size: Option<usize>,
    /// Seed of a generated dataset's test scenes [default: the checkpoint's]: another
    /// seed draws other scenes from the same MNIST test digits, a check that the
    /// accuracy is not tied to one draw.
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    pub(super) device: DeviceArgs,
    /// Print one JSON object (the report) instead of text.
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
    /// Checkpoint written by `saccade train` or `saccade export` (a saccade model).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Image files (PNG, JPEG, TIFF, WebP or BMP), folders (walked recursively for .png,
    /// .jpg, .jpeg, .tif, .tiff, .webp, .bmp files, in sorted order) or store folders (`saccade data
    /// generate|import`; their true classes are shown).
    #[arg(required = true, value_name = "INPUT")]
    images: Vec<PathBuf>,
    /// Only this split of store inputs [default: every image of a store].
    #[arg(long, value_enum)]
    split: Option<SplitArg>,
    /// Draw each image with its glimpses, file name, predicted class and probability, and
    /// true class when known: a path ending in .png gets one picture with a row for each
    /// of the first 50 images; any other path is a folder (new or empty) that gets one
    /// PNG per image, written as it goes. Refuses to replace an existing file.
    #[arg(long, value_name = "OUT.png|DIR")]
    viz: Option<PathBuf>,
    /// Classes to list per image, most probable first.
    #[arg(long, default_value_t = 3)]
    top: usize,
    #[command(flatten)]
    pub(super) device: DeviceArgs,
    /// Print one JSON object instead of text: a record per input, with "top" and
    /// "glimpses" (each glimpse's box as [x0, y0, x1, y1] in the image's pixels), or "error".
    #[arg(long)]
    json: bool,
}

/// Rows of the `--viz OUT.png` picture: images after these are not drawn
/// (and the run says so), which bounds its memory at about 30 MB.
const VIZ_MAX_ROWS: usize = 50;

/// Where `--viz` goes: one picture of rows, or a folder of pictures.
enum Viz {
    Picture {
        path: PathBuf,
        rows: Vec<image::RgbImage>,
        left_out: usize,
    },
    Folder(PathBuf),
}

impl Viz {
    /// The checks before any work (usage errors): nothing is replaced.
    fn new(path: &Path) -> Result<Viz> {
        let is_png = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("png"));
        if is_png {
            if path.exists() {
                bail!("--viz {} exists; choose a new file", path.display());
            }
            return Ok(Viz::Picture {
                path: path.to_path_buf(),
                rows: Vec::new(),
                left_out: 0,
            });
        }
        if path.exists() {
            let used = std::fs::read_dir(path)
                .with_context(|| format!("--viz {} exists and is not a folder", path.display()))?
                .next()
                .is_some();
            if used {
                bail!(
                    "--viz {} is a folder that is not empty; choose a new or empty folder",
                    path.display()
                );
            }
        }
        Ok(Viz::Folder(path.to_path_buf()))
    }

    /// Add the picture of input `k` (0-based) from `file`.
    fn add(&mut self, k: usize, file: &Path, picture: image::RgbImage) -> Result<()> {
        match self {
            Viz::Picture { rows, left_out, .. } => {
                if rows.len() < VIZ_MAX_ROWS {
                    rows.push(picture);
                } else {
                    *left_out += 1;
                }
                Ok(())
            }
            Viz::Folder(dir) => {
                let stem: String = file
                    .file_stem()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_default()
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || "-_.+".contains(c) {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                std::fs::create_dir_all(&*dir)
                    .with_context(|| format!("cannot create --viz {}", dir.display()))?;
                crate::files::save_png(&picture, &dir.join(format!("{:06}-{stem}.png", k + 1)))
            }
        }
    }

    /// Write the picture (one-picture mode); says what was left out.
    fn finish(self, json: bool) -> Result<()> {
        match self {
            Viz::Picture { path, rows, left_out } => {
                if rows.is_empty() {
                    eprintln!("no picture written to {}: no image was predicted", path.display());
                    return Ok(());
                }
                crate::viz::save_stacked(&rows, &path)?;
                if left_out > 0 {
                    eprintln!(
                        "{} shows the first {} predicted images; {left_out} more were not drawn \
                         (give --viz a folder for one picture per image)",
                        path.display(),
                        rows.len()
                    );
                }
                if !json {
                    println!("wrote {}", path.display());
                }
            }
            Viz::Folder(dir) => {
                if !json {
                    println!("wrote one picture per image into {}", dir.display());
                }
            }
        }
        Ok(())
    }
}

/// The checkpoint's class names, or (older checkpoints) its dataset's.
fn class_names(cfg: &TrainConfig) -> Result<Vec<String>> {
    if !cfg.class_names.is_empty() {
        return Ok(cfg.class_names.clone());
    }
    Ok(probe(&cfg.dataset)?.class_names())
}

pub(super) fn check_compatible(m: &SaccadeConfig, d: &dyn data::Dataset) -> Result<()> {
    let (mine, theirs) = (m.tasks(), d.tasks());
    let names = |ts: &[data::TaskSpec]| ts.iter().map(|t| t.name.clone()).collect::<Vec<_>>().join(", ");
    if mine.len() > 1 || theirs.len() > 1 {
        let same = mine.len() == theirs.len()
            && mine.iter().zip(&theirs).all(|(a, b)| {
                a.name == b.name && a.multi_label == b.multi_label && a.class_names == b.class_names
            });
        if !same {
            bail!(
                "the model answers the tasks {} but {} has the tasks {}: evaluate on data with the model's tasks, \
                 classes and order",
                names(&mine),
                d.describe(),
                names(&theirs)
            );
        }
    }
    if m.channels != d.channels()
        || m.num_classes != d.num_classes()
        || d.proxy_shape() != (m.channels, m.proxy_size)
    {
        bail!(
            "the model has {} channels, {} classes and {}x{} proxies but {} has {} channels, {} classes and {}x{} proxies",
            m.channels,
            m.num_classes,
            m.proxy_size,
            m.proxy_size,
            d.describe(),
            d.channels(),
            d.num_classes(),
            d.proxy_shape().1,
            d.proxy_shape().1
        );
    }
    Ok(())
}

/// The tasks a checkpoint's model answers, with its class names (a
/// single-task model's are the run's, or its dataset's).
fn model_tasks(cfg: &TrainConfig) -> Result<Vec<data::TaskSpec>> {
    let mut tasks = cfg.model.tasks();
    if cfg.model.task_heads.is_empty() {
        tasks[0].class_names = class_names(cfg)?;
    }
    Ok(tasks)
}

pub(super) fn run_eval(a: EvalArgs) -> Result<(), Failure> {
    if a.test_size == Some(0) {
        return Err(usage(anyhow::anyhow!("--test-size must be at least 1")));
    }
    crate::data::check_split_size("--test-size", a.test_size.unwrap_or(0)).map_err(usage)?;
    match checkpoint_config(&a.checkpoint)?.baseline {
        None => eval_model::<Saccader>(a),
        Some(Baseline::ResNet18(_)) => eval_model::<ResNet18>(a),
        Some(Baseline::TiledResNet18(_)) => eval_model::<TiledResNet18>(a),
    }
}

fn eval_model<M: Model>(a: EvalArgs) -> Result<(), Failure> {
    let device = select_device(&a.device)?;
    let mut t = Trainer::<M>::from_checkpoint(&a.checkpoint, device)?;
    let mut spec = a.dataset.unwrap_or_else(|| t.cfg.dataset.clone());
    if !spec.contains("proxy=") {
        // Another dataset (an imported store) is read at the model's proxy size.
        spec = format!("{spec},proxy={}", t.cfg.model.proxy_size);
    }
    let own = data::spec::DatasetSpec::parse(&spec)?.default_sizes();
    let cfg = data::DataConfig {
        seed: a.seed.unwrap_or(t.cfg.seed),
        sizes: SplitSizes {
            test: a.test_size.unwrap_or(own.map_or(2_000, |s| s.test)),
            ..Default::default()
        },
        mnist_dir: None,
    };
    // Labels are class indices: data listing its classes in another order,
    // or only some of them, is matched to the model's classes by name.
    let test = data::relabel::by_name(
        data::open_dataset(&spec, Split::Test, &cfg)?,
        &model_tasks(&t.cfg)?,
    )?;
    check_compatible(&t.cfg.model, test.as_ref())?;
    let r = t.evaluate(&test, !a.json)?;
    if a.json {
        let by_task: serde_json::Map<String, serde_json::Value> = r
            .tasks
            .iter()
            .map(|t| (t.name.clone(), serde_json::json!(t.accuracy)))
            .collect();
        println!(
            "{}",
            serde_json::json!({"command": "eval", "dataset": spec, "accuracy": by_task, "report": r})
        );
        return Ok(());
    }
    if r.tasks.len() > 1 {
        println!(
            "mean accuracy over {} tasks {:.2}% on {} test images of {spec}",
            r.tasks.len(),
            100.0 * r.accuracy,
            r.samples
        );
        for task in &r.tasks {
            println!("  {:>10}  {:.2}%", task.name, 100.0 * task.accuracy);
        }
    } else {
        println!(
            "accuracy {:.2}% on {} test images of {spec}",
            100.0 * r.accuracy,
            r.samples
        );
    }
    if let Some(c) = &r.coverage {
        println!("{}", coverage_line(c));
    }
    let mut worst: Vec<(usize, f64)> = r
        .per_class_accuracy
        .iter()
        .enumerate()
        .filter_map(|(c, a)| a.map(|a| (c, a)))
        .collect();
    worst.sort_by(|a, b| a.1.total_cmp(&b.1));
    let absent = r.per_class_accuracy.len() - worst.len();
    let note = if absent > 0 {
        format!("; {absent} class(es) without test images left out")
    } else {
        String::new()
    };
    println!("lowest per-class accuracy ({}{note}):", r.tasks[0].name);
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

/// Every class with its probability, most probable first (the class's
/// index when it has no name).
fn ranked(probs: &[f32], names: &[String]) -> Vec<(String, f32)> {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&i, &j| probs[j].total_cmp(&probs[i]));
    order
        .into_iter()
        .map(|i| (names.get(i).cloned().unwrap_or_else(|| i.to_string()), probs[i]))
        .collect()
}

/// Up to five names, then how many more.
fn preview(names: &[String]) -> String {
    match names.len() {
        0..=5 => names.join(", "),
        n => format!("{}, … ({n} in all)", names[..5].join(", ")),
    }
}

pub(super) fn run_predict(a: PredictArgs) -> Result<(), Failure> {
    if a.top == 0 {
        return Err(usage(anyhow::anyhow!("--top must be at least 1")));
    }
    let mut viz = a.viz.as_deref().map(Viz::new).transpose().map_err(usage)?;
    let device = select_device(&a.device)?;
    let t = Trainer::<Saccader>::from_checkpoint(&a.checkpoint, device)?;
    let names = class_names(&t.cfg)?;
    let tasks = t.model.cfg.tasks();
    let split = a.split.map(|s| match s {
        SplitArg::Train => Split::Train,
        SplitArg::Valid => Split::Valid,
        SplitArg::Test => Split::Test,
    });
    let (mut inputs, skipped) = crate::predict::collect_inputs(&a.images, split, t.model.cfg.channels);
    if split.is_some() && inputs.iter().all(|r| matches!(r, Ok(i) if !i.tiled)) {
        return Err(usage(anyhow::anyhow!(
            "--split picks the images of stores, and no input is a store (image files and folders of \
             them are predicted whole): leave out --split"
        )));
    }
    // A store's true class the model does not know can be neither right nor
    // wrong: say so, and show no verdict (it printed "0 of 2 right").
    let mut unknown: Vec<String> = Vec::new();
    for input in inputs.iter_mut().flatten() {
        if let Some(truth) = input.truth.take_if(|t| !names.contains(t)) {
            if !unknown.contains(&truth) {
                unknown.push(truth);
            }
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        eprintln!(
            "note: the stores given label images with classes this model does not have ({}; the model's: {}): \
             those images are predicted without a verdict",
            unknown.join(", "),
            preview(&names)
        );
    }
    if skipped > 0 {
        eprintln!(
            "skipped {skipped} files in the folders given that are not {IMAGE_KINDS} by their extension"
        );
    }
    let mut report = PredictReport::default();
    for (k, item) in inputs.iter().enumerate() {
        let outcome = match item {
            Ok(input) => crate::predict::predict_input(&t.model, input)
                .map(|p| (input, p))
                .map_err(|e| (input.path.as_path(), format!("{e:#}"))),
            Err((path, e)) => Err((path.as_path(), format!("{e:#}"))),
        };
        let (input, p) = match outcome {
            Ok(v) => v,
            Err((path, msg)) => {
                eprintln!("error: {}: {msg}", path.display());
                report.rows.push(serde_json::json!({"image": path, "error": msg}));
                report.failed += 1;
                continue;
            }
        };
        let mut top = ranked(&p.probs[0], &names);
        let (best, best_p) = top[0].clone();
        top.truncate(a.top);
        // The other tasks' answers (multi-task models), after the first's ranking.
        let others: Vec<(String, String)> = tasks
            .iter()
            .zip(&p.probs)
            .skip(1)
            .map(|(task, probs)| {
                let ans = crate::predict::Answer::of(task, probs);
                (task.name.clone(), ans.describe(task))
            })
            .collect();
        let (h, w) = p.source.level_size(0);
        let boxes: Vec<[f32; 4]> = p
            .glimpses
            .iter()
            .map(|&g| glimpse_box(g, w as f32, h as f32))
            .collect();
        let verdict = report.add(input, (&top, &best), &others, &boxes, a.json);
        if let Some(v) = viz.as_mut() {
            let caption = vec![
                input.path.display().to_string(),
                format!("predicted {best} {:.1}%", 100.0 * best_p),
                match (&input.truth, verdict) {
                    (Some(truth), Some(true)) => format!("true {truth}: right"),
                    (Some(truth), _) => format!("true {truth}: wrong"),
                    (None, _) => "true class unknown".to_string(),
                },
            ];
            let picture = crate::predict::render_prediction(&t.model, &p, caption, verdict)?;
            v.add(k, &input.path, picture)?;
        }
    }
    if let Some(v) = viz {
        v.finish(a.json)?;
    }
    report.finish(&a, inputs.len())
}

/// What `predict` has printed and will print: one JSON row per input, and
/// the counts of failed inputs and of right answers where the truth is known.
#[derive(Default)]
struct PredictReport {
    rows: Vec<serde_json::Value>,
    failed: usize,
    known: usize,
    right: usize,
}

impl PredictReport {
    /// Record (and unless `json`, print) one prediction; returns whether it
    /// is right, when the input's class is known.
    fn add(
        &mut self,
        input: &Input,
        (top, best): (&[(String, f32)], &str),
        others: &[(String, String)],
        glimpses: &[[f32; 4]],
        json: bool,
    ) -> Option<bool> {
        let verdict = input.truth.as_ref().map(|truth| truth == best);
        if let Some(v) = verdict {
            self.known += 1;
            self.right += v as usize;
        }
        if !json {
            let s: Vec<String> = top
                .iter()
                .map(|(n, p)| format!("{n} {:.1}%", 100.0 * p))
                .collect();
            let truth = input
                .truth
                .as_ref()
                .map(|t| format!(" (true {t})"))
                .unwrap_or_default();
            let rest: String = others.iter().map(|(_, text)| format!("; {text}")).collect();
            println!("{}: {}{truth}{rest}", input.path.display(), s.join(", "));
        }
        let mut row = serde_json::json!({"image": input.path, "top": top, "glimpses": glimpses});
        for (name, text) in others {
            row[name] = serde_json::json!(text);
        }
        if let Some(truth) = &input.truth {
            row["truth"] = serde_json::json!(truth);
            row["correct"] = serde_json::json!(verdict == Some(true));
        }
        self.rows.push(row);
        verdict
    }

    /// The closing lines (or the JSON object), and exit 1 if any input failed.
    fn finish(self, a: &PredictArgs, inputs: usize) -> Result<(), Failure> {
        if self.known > 0 && !a.json {
            println!(
                "{} of {} images with a known class predicted right ({:.2}%)",
                self.right,
                self.known,
                100.0 * self.right as f64 / self.known as f64
            );
        }
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "command": "predict",
                    "predictions": self.rows,
                    "failed": self.failed,
                    "viz": a.viz,
                })
            );
        }
        if self.failed > 0 {
            return Err(anyhow::anyhow!(
                "{} of {inputs} inputs could not be predicted (each named above); the other {} were",
                self.failed,
                inputs - self.failed
            )
            .into());
        }
        Ok(())
    }
}
