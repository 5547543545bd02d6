//! Prediction with posterior means: batches, image files, and the saccade
//! picture of a dataset's first images.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{ensure, Context, Result};

use crate::autograd::Graph;
use crate::data::proxy::{AreaProxy, ProxyMaker};
use crate::data::{Batch, Dataset, ImageSource, InMemoryImage};
use crate::models::Saccader;
use crate::ops::loss::softmax;
use crate::tensor::Tensor;
use crate::train::{argmax_rows, images_of};
use crate::viz::{save_saccades, SaccadeRow};

/// Class probabilities `[B, K]`, glimpses per sample as `(s, tx, ty)` per
/// step, and the crops `[T*B, C, L, L]`.
#[allow(clippy::type_complexity)]
pub fn predict_batch(model: &Saccader, batch: &Batch) -> Result<(Tensor, Vec<Vec<[f32; 3]>>, Tensor)> {
    let mut g = Graph::inference();
    let out = model.forward(&mut g, &images_of(batch), &batch.proxies, &batch.labels, None)?;
    let probs = softmax(g.value(out.logits))?;
    Ok((probs, out.glimpses(&g)?, g.value(out.crops).clone()))
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
        labels: vec![0],
        indices: vec![0],
    })
}

/// Decode an image file to a CHW source with the model's channel count.
fn open_image(path: &Path, channels: usize) -> Result<InMemoryImage> {
    let img = image::open(path).with_context(|| {
        format!(
            "cannot read {} as an image (PNG, JPEG or TIFF expected)",
            path.display()
        )
    })?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<f32> = if channels == 1 {
        img.into_luma8()
            .into_raw()
            .iter()
            .map(|&v| v as f32 / 255.0)
            .collect()
    } else {
        ensure!(
            channels == 3,
            "models with {channels} channels cannot read image files"
        );
        let rgb = img.into_rgb8().into_raw();
        (0..3)
            .flat_map(|ch| (0..h * w).map(move |i| (ch, i)))
            .map(|(ch, i)| rgb[i * 3 + ch] as f32 / 255.0)
            .collect()
    };
    InMemoryImage::new(data, channels, h, w, 32)
}

/// Predict each image file; with `viz`, draw them with their saccades.
/// Returns class probabilities per file.
pub fn predict_files(model: &Saccader, paths: &[PathBuf], viz: Option<&Path>) -> Result<Vec<Vec<f32>>> {
    let c = &model.cfg;
    let proxy_maker = AreaProxy {
        channels: c.channels,
        size: c.proxy_size,
        noise: 0.0,
        seed: 0,
    };
    let mut kept = Vec::new();
    let mut out = Vec::new();
    for path in paths {
        let source: Arc<dyn ImageSource> = Arc::new(open_image(path, c.channels)?);
        let proxy = proxy_maker.make(0, source.as_ref())?;
        let batch = single_batch(model, source, proxy.clone())?;
        let (probs, glimpses, crops) = predict_batch(model, &batch)?;
        let p = probs.to_vec()?;
        if viz.is_some() {
            let best = argmax_rows(&probs)?[0];
            kept.push((
                batch.sources[0].clone(),
                proxy,
                crops.to_vec()?,
                glimpses[0].clone(),
                best,
            ));
        }
        out.push(p);
    }
    if let Some(path) = viz {
        let rows: Vec<SaccadeRow> = kept
            .iter()
            .map(|(src, proxy, crops, gl, _)| row(model, src.as_ref(), proxy, crops, 1, 0, gl, true))
            .collect();
        save_saccades(&rows, path)?;
    }
    Ok(out)
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
    correct: bool,
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
        correct,
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
        labels: samples.iter().map(|s| s.label).collect(),
        indices: (0..n).collect(),
    };
    let (probs, glimpses, crops) = predict_batch(model, &batch)?;
    let pred = argmax_rows(&probs)?;
    let crops = crops.to_vec()?;
    let rows: Vec<SaccadeRow> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            row(
                model,
                s.image.as_ref(),
                &s.proxy,
                &crops,
                n,
                i,
                &glimpses[i],
                pred[i] == s.label,
            )
        })
        .collect();
    save_saccades(&rows, path)
}
