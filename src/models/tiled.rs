//! The paper's large-image baseline (§4.1): the image is cut into a grid of
//! `tile x tile` pieces read at full resolution through [`ImageSource`]
//! (12 x 12 tiles of 224² for 2528²; the last row and column are shifted
//! back inside the image, so they overlap their neighbours), one shared
//! ResNet18 trunk runs over every tile, the tile features of each image are
//! summed and a two-layer dense head maps the sum to logits:
//! `y = f(sum_i g(x_i))`.
//!
//! Tiles go through the trunk in chunks of `chunk` tiles (batch-norm
//! statistics are per chunk). With `checkpoint`, a training step keeps only
//! one chunk's activations at a time (the paper's 6.5 GB variant, after
//! Chen et al.): the forward runs every chunk in an inference graph keeping
//! only the summed features, the head runs in a training graph, and the
//! backward reads every chunk again, reruns its forward in a training graph
//! and backpropagates the head's gradient of the sum through it. The result
//! equals the plain step's (the running statistics move once, in the first
//! pass) at the cost of a second forward of the trunk.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{ensure, Result};
use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::resnet::{BnMode, ResNetTrunk};
use crate::autograd::{Gradients, Graph, Var};
use crate::data::ImageSource;
use crate::device::Device;
use crate::nn::{Linear, ParamId, ParamStore};
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TiledConfig {
    pub channels: usize,
    pub num_classes: usize,
    /// Trunk width (64: the standard ResNet18).
    pub width: usize,
    /// Tile side (224 in the paper).
    pub tile: usize,
    /// Tiles per trunk pass.
    pub chunk: usize,
    /// Recompute each chunk's forward in backward instead of keeping it.
    pub checkpoint: bool,
}

impl TiledConfig {
    /// The paper's setting: standard ResNet18 over 224² tiles.
    pub fn paper(channels: usize, num_classes: usize) -> Self {
        TiledConfig {
            channels,
            num_classes,
            width: 64,
            tile: 224,
            chunk: 16,
            checkpoint: false,
        }
    }
}

/// Top-left corners along one side of length `side`: `ceil(side / tile)`
/// tiles `tile` apart, the last one moved back to end at the border.
pub fn tile_starts(side: usize, tile: usize) -> Vec<usize> {
    if side <= tile {
        return vec![0];
    }
    (0..side.div_ceil(tile))
        .map(|i| (i * tile).min(side - tile))
        .collect()
}

pub struct TiledResNet18 {
    pub cfg: TiledConfig,
    pub params: ParamStore,
    trunk: ResNetTrunk,
    head1: Linear,
    head2: Linear,
}

/// What a training step returns.
pub struct TiledStep {
    pub logits: Tensor,
    /// Per-sample cross-entropy `[B]`.
    pub ce: Tensor,
    /// The batch mean of `ce`.
    pub loss: f64,
    pub grads: Gradients,
}

/// One chunk: tiles `[n, C, tile, tile]` and the `[B, n]` 0/1 matrix that
/// sums each image's tile features.
struct Chunk {
    tiles: Tensor,
    owner: Tensor,
}

impl TiledResNet18 {
    pub fn new(cfg: TiledConfig, rng: &mut impl Rng, dev: &Device) -> Self {
        let mut ps = ParamStore::new();
        let trunk = ResNetTrunk::new(&mut ps, "resnet", cfg.channels, cfg.width, rng, dev);
        let f = trunk.features;
        let head1 = Linear::new(&mut ps, "head.0", f, f, rng, dev);
        let head2 = Linear::new(&mut ps, "head.1", f, cfg.num_classes, rng, dev);
        TiledResNet18 {
            cfg,
            params: ps,
            trunk,
            head1,
            head2,
        }
    }

    /// The chunks of a batch, in (image, row, column) order, read lazily so
    /// that only one chunk of pixels exists at a time.
    fn chunks<'a>(
        &self,
        sources: &'a [Arc<dyn ImageSource>],
        dev: &'a Device,
    ) -> Result<impl Iterator<Item = Result<Chunk>> + 'a> {
        let (c, t) = (self.cfg.channels, self.cfg.tile);
        ensure!(!sources.is_empty(), "tiled-resnet18: empty batch");
        let (h, w) = sources[0].size();
        for s in sources {
            ensure!(
                s.channels() == c && s.size() == (h, w),
                "tiled-resnet18: images must all be {c}-channel {h}x{w}, got a {}-channel {:?} one",
                s.channels(),
                s.size()
            );
        }
        let (ys, xs) = (tile_starts(h, t), tile_starts(w, t));
        let per_image = ys.len() * xs.len();
        let b = sources.len();
        let total = b * per_image;
        let chunk = self.cfg.chunk.max(1);
        Ok((0..total).step_by(chunk).map(move |start| {
            let n = chunk.min(total - start);
            let mut pixels = vec![0.0; n * c * t * t];
            pixels
                .par_chunks_mut(c * t * t)
                .enumerate()
                .try_for_each(|(j, out)| {
                    let k = start + j;
                    let (img, cell) = (k / per_image, k % per_image);
                    let (y0, x0) = (ys[cell / xs.len()], xs[cell % xs.len()]);
                    sources[img].read_region(0, y0 as i64, x0 as i64, t, t, out)
                })?;
            let mut owner = vec![0.0; b * n];
            for j in 0..n {
                owner[(start + j) / per_image * n + j] = 1.0;
            }
            Ok(Chunk {
                tiles: Tensor::from_vec(pixels, &[n, c, t, t], dev)?,
                owner: Tensor::from_vec(owner, &[b, n], dev)?,
            })
        }))
    }

    /// This chunk's share of the summed features, `[B, F]`.
    fn chunk_sum(&mut self, g: &mut Graph, chunk: &Chunk, mode: BnMode) -> Result<Var> {
        let x = g.constant(chunk.tiles.clone());
        let f = self.trunk.forward(g, &mut self.params, x, mode)?;
        let owner = g.constant(chunk.owner.clone());
        g.matmul(owner, f)
    }

    fn head(&self, g: &mut Graph, summed: Var) -> Result<Var> {
        let h = self.head1.forward(g, &self.params, summed)?;
        let h = g.relu(h)?;
        self.head2.forward(g, &self.params, h)
    }

    /// Logits `[B, K]` in evaluation mode (running statistics).
    pub fn logits(&mut self, sources: &[Arc<dyn ImageSource>], dev: &Device) -> Result<Tensor> {
        let mut g = Graph::inference();
        let summed = self.summed_features(sources, dev, BnMode::Running)?;
        let s = g.constant(summed);
        let logits = self.head(&mut g, s)?;
        Ok(g.value(logits).clone())
    }

    /// Summed tile features `[B, F]`, one inference graph per chunk.
    fn summed_features(
        &mut self,
        sources: &[Arc<dyn ImageSource>],
        dev: &Device,
        mode: BnMode,
    ) -> Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        for chunk in self.chunks(sources, dev)? {
            let mut g = Graph::inference();
            let s = self.chunk_sum(&mut g, &chunk?, mode)?;
            let s = g.value(s).clone();
            sum = Some(match sum {
                None => s,
                Some(acc) => acc.add_same(&s)?,
            });
        }
        sum.ok_or_else(|| anyhow::anyhow!("tiled-resnet18: no tiles"))
    }

    /// Loss, logits and parameter gradients of one training batch.
    pub fn train_step(
        &mut self,
        sources: &[Arc<dyn ImageSource>],
        labels: &[usize],
        dev: &Device,
    ) -> Result<TiledStep> {
        ensure!(
            labels.len() == sources.len(),
            "tiled-resnet18: {} labels for {} images",
            labels.len(),
            sources.len()
        );
        let train = BnMode::Batch { update: true };
        let mut g = Graph::new();
        let summed = if self.cfg.checkpoint {
            let s = self.summed_features(sources, dev, train)?;
            g.leaf(s)
        } else {
            let mut parts = Vec::new();
            for chunk in self.chunks(sources, dev)? {
                parts.push(self.chunk_sum(&mut g, &chunk?, train)?);
            }
            let mut acc = parts[0];
            for &p in &parts[1..] {
                acc = g.add(acc, p)?;
            }
            acc
        };
        let logits = self.head(&mut g, summed)?;
        let ce = g.softmax_cross_entropy(logits, labels)?;
        let loss = g.mean_all(ce)?;
        let grads = g.backward(loss)?;
        let step = |grads| -> Result<TiledStep> {
            Ok(TiledStep {
                logits: g.value(logits).clone(),
                ce: g.value(ce).clone(),
                loss: g.value(loss).item()? as f64,
                grads,
            })
        };
        if !self.cfg.checkpoint {
            return step(grads);
        }
        // Backward through the trunk, one recomputed chunk at a time.
        let seed = grads
            .get(summed)
            .ok_or_else(|| anyhow::anyhow!("internal: no gradient for the summed features"))?
            .clone();
        let mut acc: HashMap<ParamId, Tensor> = grads.param_grads().map(|(id, t)| (id, t.clone())).collect();
        for chunk in self.chunks(sources, dev)? {
            let mut cg = Graph::new();
            let s = self.chunk_sum(&mut cg, &chunk?, BnMode::Batch { update: false })?;
            for (id, t) in cg.backward_from(s, seed.clone())?.param_grads() {
                let sum = match acc.remove(&id) {
                    None => t.clone(),
                    Some(a) => a.add_same(t)?,
                };
                acc.insert(id, sum);
            }
        }
        step(Gradients::from_params(acc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::InMemoryImage;
    use crate::gradcheck::{rand_tensor, rng};

    #[test]
    fn tiles_cover_the_image_and_the_last_overlaps() {
        assert_eq!(tile_starts(2528, 224).len(), 12);
        assert_eq!(tile_starts(2528, 224)[10..], [2240, 2304]);
        assert_eq!(tile_starts(448, 224), vec![0, 224]);
        assert_eq!(tile_starts(100, 224), vec![0]);
    }

    fn sources(n: usize, side: usize, dev: &Device) -> Vec<Arc<dyn ImageSource>> {
        (0..n)
            .map(|i| {
                let x = rand_tensor(&[side * side], 10 + i as u64, dev).to_vec().unwrap();
                let img = InMemoryImage::new(x, 1, side, side, 32).unwrap();
                Arc::new(img) as Arc<dyn ImageSource>
            })
            .collect()
    }

    fn model(checkpoint: bool, chunk: usize) -> TiledResNet18 {
        let cfg = TiledConfig {
            channels: 1,
            num_classes: 3,
            width: 2,
            tile: 32,
            chunk,
            checkpoint,
        };
        TiledResNet18::new(cfg, &mut rng(3), &Device::cpu())
    }

    #[test]
    fn checkpointed_step_equals_the_plain_step() {
        let dev = Device::cpu();
        // 80² in 32² tiles: 3 x 3 tiles per image, chunks of 4 span images.
        let src = sources(2, 80, &dev);
        let (mut plain, mut ckpt) = (model(false, 4), model(true, 4));
        let a = plain.train_step(&src, &[0, 2], &dev).unwrap();
        let b = ckpt.train_step(&src, &[0, 2], &dev).unwrap();
        assert!((a.loss - b.loss).abs() < 1e-6, "{} vs {}", a.loss, b.loss);
        let mut n = 0;
        for (id, ga) in a.grads.param_grads() {
            let gb = b.grads.param(id).expect("same parameters get gradients");
            for (x, y) in ga.to_vec().unwrap().iter().zip(gb.to_vec().unwrap()) {
                assert!(
                    (x - y).abs() <= 1e-4 + 1e-3 * x.abs(),
                    "{}: {x} vs {y}",
                    plain.params.get(id).name
                );
            }
            n += 1;
        }
        assert_eq!(n, plain.params.iter().filter(|(_, p)| p.trainable).count());
        // The running statistics moved once in both.
        for (id, p) in plain.params.iter() {
            assert_eq!(
                p.value.to_vec().unwrap(),
                ckpt.params.value(id).to_vec().unwrap(),
                "{}",
                p.name
            );
        }
        let logits = plain.logits(&src, &dev).unwrap();
        assert_eq!(logits.shape(), &[2, 3]);
    }

    #[test]
    fn tiled_errors_name_the_problem() {
        let dev = Device::cpu();
        let mut m = model(false, 4);
        let mut src = sources(1, 64, &dev);
        src.extend(sources(1, 80, &dev));
        let e = m.train_step(&src, &[0, 1], &dev).err().unwrap().to_string();
        assert!(e.contains("tiled-resnet18"), "{e}");
        let e = m.train_step(&src[..1], &[0, 1], &dev).err().unwrap().to_string();
        assert!(e.contains("labels"), "{e}");
    }
}
