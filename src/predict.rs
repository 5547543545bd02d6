//! Prediction with posterior means: batches, one image at a time (files,
//! folders and stores, for `saccade predict`), and the saccade picture of a
//! dataset's first images.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{ensure, Result};
use image::RgbImage;

use crate::autograd::Graph;
use crate::data::decode::{has_image_ext, open_image_file, IMAGE_EXTS, IMAGE_KINDS};
use crate::data::proxy::{AreaProxy, ProxyMaker};
use crate::data::store::{Manifest, TiledImage, MANIFEST};
use crate::data::{Batch, Dataset, ImageSource, Split, TaskSpec, DEFAULT_TASK};
use crate::models::Saccader;
use crate::ops::elementwise::{unary_forward, Unary};
use crate::ops::loss::softmax;
use crate::tensor::Tensor;
use crate::train::images_of;
use crate::viz::{render_row, save_saccades, SaccadeRow};

/// Per task the class probabilities `[B, K]` (a softmax, or a multi-label
/// task's sigmoid per class), glimpses per sample as `(s, tx, ty)` per
/// step, and the crops `[T*B, C, L, L]`.
#[allow(clippy::type_complexity)]
pub fn predict_batch(model: &Saccader, batch: &Batch) -> Result<(Vec<Tensor>, Vec<Vec<[f32; 3]>>, Tensor)> {
    let mut g = Graph::inference();
    let out = model.forward(&mut g, &images_of(batch), &batch.proxies, &batch.targets, None)?;
    let probs = model
        .cfg
        .tasks()
        .iter()
        .zip(&out.logits)
        .map(|(task, &l)| {
            if task.multi_label {
                unary_forward(g.value(l), Unary::Sigmoid)
            } else {
                softmax(g.value(l))
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((probs, out.glimpses(&g)?, g.value(out.crops).clone()))
}

/// A model's answer to one task for one image.
pub struct Answer {
    /// As a label (see [`crate::data::Sample::labels`]).
    pub label: usize,
    /// The probability of the answer: of the class, or for a multi-label
    /// task the least certain of its ten (or K) yes/no decisions.
    pub prob: f32,
}

impl Answer {
    /// From one image's probabilities for `task` (see [`predict_batch`]).
    pub fn of(task: &TaskSpec, probs: &[f32]) -> Answer {
        if task.multi_label {
            let label = probs
                .iter()
                .enumerate()
                .filter(|(_, &p)| p > 0.5)
                .map(|(k, _)| 1 << k)
                .sum();
            let prob = probs.iter().map(|&p| p.max(1.0 - p)).fold(1.0, f32::min);
            Answer { label, prob }
        } else {
            let (label, &prob) = probs
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .expect("a task has classes");
            Answer { label, prob }
        }
    }

    /// `predicted 7 93.1%`, prefixed by the task's name when it is not the
    /// only one's default (`majority: predicted 7 93.1%`).
    pub fn describe(&self, task: &TaskSpec) -> String {
        let text = format!(
            "predicted {} {:.1}%",
            task.describe_label(self.label),
            100.0 * self.prob
        );
        if task.name == DEFAULT_TASK {
            text
        } else {
            format!("{}: {text}", task.name)
        }
    }
}

/// A batch of one image read through its source (the localized sampler).
fn single_batch(model: &Saccader, source: Arc<dyn ImageSource>, proxy: Vec<f32>) -> Result<Batch> {
    let c = &model.cfg;
    let proxies = Tensor::from_vec(
        proxy,
        &[1, c.channels, c.proxy_size, c.proxy_size],
        &model.device(),
    )?;
    Ok(Batch {
        sources: vec![source],
        images: None,
        proxies,
        targets: vec![vec![0]; model.cfg.tasks().len()],
        indices: vec![0],
    })
}

/// One image to predict: a file, or an image of a store with its class.
pub struct Input {
    pub path: PathBuf,
    /// A store's tiled image, not an image file.
    pub tiled: bool,
    /// The true class name (images of a store).
    pub truth: Option<String>,
}

/// Every image the arguments name, in order: files as given, folders walked
/// recursively (sorted; files with an image extension, see
/// [`IMAGE_EXTS`]), store folders (those holding a manifest, at the top or
/// inside a walked folder) image by image with their classes, only `split`'s
/// when given. An argument that yields nothing, or a store that cannot be
/// read or has other than `channels` channels, is an `Err` item naming it.
/// Also returns the number of files skipped in folders for their extension.
#[allow(clippy::type_complexity)]
pub fn collect_inputs(
    args: &[PathBuf],
    split: Option<Split>,
    channels: usize,
) -> (Vec<Result<Input, (PathBuf, anyhow::Error)>>, usize) {
    let mut out = Vec::new();
    let mut skipped = 0;
    for arg in args {
        if !arg.is_dir() {
            out.push(Ok(Input {
                path: arg.clone(),
                tiled: false,
                truth: None,
            }));
            continue;
        }
        let before = out.len();
        walk(arg, split, channels, &mut out, &mut skipped);
        if out.len() == before {
            out.push(Err((
                arg.clone(),
                anyhow::anyhow!(
                    "no {IMAGE_KINDS} files (.{}) or stores in this folder or below",
                    IMAGE_EXTS.join(", .")
                ),
            )));
        }
    }
    (out, skipped)
}

#[allow(clippy::type_complexity)]
fn walk(
    dir: &Path,
    split: Option<Split>,
    channels: usize,
    out: &mut Vec<Result<Input, (PathBuf, anyhow::Error)>>,
    skipped: &mut usize,
) {
    if dir.join(MANIFEST).exists() {
        match store_inputs(dir, split, channels) {
            Ok(v) => out.extend(v.into_iter().map(Ok)),
            Err(e) => out.push(Err((dir.to_path_buf(), e))),
        }
        return;
    }
    let entries = std::fs::read_dir(dir).and_then(|rd| {
        rd.map(|e| e.and_then(|e| Ok((e.path(), e.file_type()?))))
            .collect::<std::io::Result<Vec<_>>>()
    });
    let mut entries = match entries {
        Ok(v) => v,
        Err(e) => {
            out.push(Err((
                dir.to_path_buf(),
                anyhow::Error::from(e).context("cannot list the folder"),
            )));
            return;
        }
    };
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, kind) in entries {
        // Links to folders are not followed (no cycles); links to files are.
        if kind.is_dir() {
            walk(&path, split, channels, out, skipped);
        } else if has_image_ext(&path) && path.is_file() {
            out.push(Ok(Input {
                path,
                tiled: false,
                truth: None,
            }));
        } else {
            *skipped += 1;
        }
    }
}

/// The images of the store at `dir` (those of `split` when given).
fn store_inputs(dir: &Path, split: Option<Split>, channels: usize) -> Result<Vec<Input>> {
    let m = Manifest::read(dir)?;
    ensure!(
        m.channels == channels,
        "a store of {}-channel images, but the model reads {channels} channels",
        m.channels
    );
    let v: Vec<Input> = m
        .entries
        .iter()
        .filter(|e| split.is_none_or(|s| e.split == s))
        .map(|e| Input {
            path: dir.join(&e.file),
            tiled: true,
            truth: Some(m.tasks[0].describe_label(e.labels[0])),
        })
        .collect();
    ensure!(
        !v.is_empty(),
        "the store has no images{}",
        split
            .map(|s| format!(" in its {} split", s.name()))
            .unwrap_or_default()
    );
    Ok(v)
}

/// What the model made of one image.
pub struct Prediction {
    pub source: Arc<dyn ImageSource>,
    /// Per task, class probabilities (see [`predict_batch`]).
    pub probs: Vec<Vec<f32>>,
    pub proxy: Vec<f32>,
    /// `(s, tx, ty)` per glimpse.
    pub glimpses: Vec<[f32; 3]>,
    /// The crops, `[T, C, L, L]`.
    pub crops: Vec<f32>,
}

/// Read `input` (a file within the decoder's budget, see
/// [`crate::data::decode`], or a store's tiled image) and predict it.
pub fn predict_input(model: &Saccader, input: &Input) -> Result<Prediction> {
    let c = &model.cfg;
    let source: Arc<dyn ImageSource> = if input.tiled {
        Arc::new(TiledImage::open(&input.path)?)
    } else {
        open_image_file(&input.path, c.channels)?
    };
    let proxy = AreaProxy {
        channels: c.channels,
        size: c.proxy_size,
        noise: 0.0,
        seed: 0,
    }
    .make(0, source.as_ref())?;
    let batch = single_batch(model, source.clone(), proxy.clone())?;
    let (probs, glimpses, crops) = predict_batch(model, &batch)?;
    Ok(Prediction {
        source,
        probs: probs.iter().map(Tensor::to_vec).collect::<Result<_>>()?,
        proxy,
        glimpses: glimpses.into_iter().next().unwrap_or_default(),
        crops: crops.to_vec()?,
    })
}

/// The picture of one prediction (see [`crate::viz`]): `caption` beside it,
/// the bar coloured by `verdict`.
pub fn render_prediction(
    model: &Saccader,
    p: &Prediction,
    caption: Vec<String>,
    verdict: Option<bool>,
) -> Result<RgbImage> {
    let mut r = row(
        model,
        p.source.as_ref(),
        &p.proxy,
        &p.crops,
        1,
        0,
        &p.glimpses,
        verdict,
    );
    r.caption = caption;
    render_row(&r)
}

#[allow(clippy::too_many_arguments)]
fn row<'a>(
    model: &Saccader,
    source: &'a dyn ImageSource,
    proxy: &'a [f32],
    crops: &'a [f32],
    batch: usize,
    i: usize,
    glimpses: &[[f32; 3]],
    verdict: Option<bool>,
) -> SaccadeRow<'a> {
    let c = &model.cfg;
    let per = c.channels * c.crop * c.crop;
    SaccadeRow {
        source,
        proxy: (c.channels, c.proxy_size, proxy),
        crops: (0..c.glimpses)
            .map(|t| &crops[(t * batch + i) * per..(t * batch + i + 1) * per])
            .collect(),
        crop: c.crop,
        glimpses: glimpses.to_vec(),
        verdict,
        caption: Vec::new(),
    }
}

/// Draw the first `n` images of `data` with their saccades (paper Figure 3).
pub fn save_saccade_picture(model: &Saccader, data: &Arc<dyn Dataset>, n: usize, path: &Path) -> Result<()> {
    let n = n.min(data.len());
    let samples = (0..n).map(|i| data.get(i)).collect::<Result<Vec<_>>>()?;
    let c = &model.cfg;
    let proxy: Vec<f32> = samples.iter().flat_map(|s| s.proxy.iter().copied()).collect();
    let batch = Batch {
        sources: samples.iter().map(|s| s.image.clone()).collect(),
        images: None,
        proxies: Tensor::from_vec(
            proxy,
            &[n, c.channels, c.proxy_size, c.proxy_size],
            &model.device(),
        )?,
        targets: (0..samples[0].labels.len())
            .map(|t| samples.iter().map(|s| s.labels[t]).collect())
            .collect(),
        indices: (0..n).collect(),
    };
    let (probs, glimpses, crops) = predict_batch(model, &batch)?;
    let probs = probs.iter().map(Tensor::to_vec).collect::<Result<Vec<_>>>()?;
    let mut tasks = model.cfg.tasks();
    tasks[0].class_names = data.class_names();
    let crops = crops.to_vec()?;
    let rows: Vec<SaccadeRow> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let answers: Vec<Answer> = tasks
                .iter()
                .zip(&probs)
                .map(|(task, p)| {
                    let k = task.num_classes();
                    Answer::of(task, &p[i * k..(i + 1) * k])
                })
                .collect();
            let right = answers.iter().zip(&s.labels).all(|(a, &l)| a.label == l);
            let mut r = row(
                model,
                s.image.as_ref(),
                &s.proxy,
                &crops,
                n,
                i,
                &glimpses[i],
                Some(right),
            );
            r.caption = answers
                .iter()
                .zip(&tasks)
                .zip(&s.labels)
                .map(|((a, task), &l)| format!("{}, true {}", a.describe(task), task.describe_label(l)))
                .collect();
            r
        })
        .collect();
    save_saccades(&rows, path)
}
