//! ResNet18 (He et al.), the paper's baseline: a 7x7 stride-2 stem with batch
//! norm, ReLU and a 3x3 stride-2 max pool, four stages of two basic blocks
//! (widths w, 2w, 4w, 8w with w = 64 standard; stages 2-4 halve the side
//! with a strided conv and a 1x1 projection shortcut), global average
//! pooling, trained from scratch. [`ResNetTrunk`] is shared with the tiled
//! baseline; [`ResNet18`] adds a linear classifier for whole images.

use anyhow::{ensure, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::autograd::{Graph, Var};
use crate::device::Device;
use crate::nn::{BatchNorm, Conv2d, Linear, ParamStore};
use crate::tensor::Tensor;

/// Which statistics batch norm uses. The tiled baseline's gradient
/// checkpointing runs the training forward in an inference graph, so the
/// mode is explicit instead of following `Graph::grad_enabled`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BnMode {
    /// Batch statistics; `update` also moves the running statistics (false
    /// when a forward is recomputed, so they move once per step).
    Batch { update: bool },
    /// Running statistics (evaluation).
    Running,
}

impl BnMode {
    /// Training mode (updating the running statistics) when the graph
    /// records gradients, evaluation otherwise.
    pub fn of(g: &Graph) -> BnMode {
        if g.grad_enabled() {
            BnMode::Batch { update: true }
        } else {
            BnMode::Running
        }
    }
}

fn batch_norm(g: &mut Graph, ps: &mut ParamStore, bn: &BatchNorm, x: Var, mode: BnMode) -> Result<Var> {
    let (gamma, beta) = (ps.var(g, bn.gamma), ps.var(g, bn.beta));
    let (y, stats) = g.batch_norm(
        x,
        gamma,
        beta,
        ps.value(bn.running_mean),
        ps.value(bn.running_var),
        mode != BnMode::Running,
        BatchNorm::MOMENTUM,
        BatchNorm::EPS,
    )?;
    if let (Some((m, v)), BnMode::Batch { update: true }) = (stats, mode) {
        ps.set(bn.running_mean, m)?;
        ps.set(bn.running_var, v)?;
    }
    Ok(y)
}

/// Conv (no bias, as torchvision) followed by batch norm.
struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        ps: &mut ParamStore,
        name: &str,
        cio: (usize, usize),
        kernel: usize,
        stride: usize,
        rng: &mut impl Rng,
        dev: &Device,
    ) -> Self {
        let conv = Conv2d::new(
            ps,
            &format!("{name}.conv"),
            cio,
            kernel,
            stride,
            kernel / 2,
            false,
            rng,
            dev,
        );
        let bn = BatchNorm::new(ps, &format!("{name}.bn"), cio.1, dev);
        ConvBn { conv, bn }
    }

    fn forward(&self, g: &mut Graph, ps: &mut ParamStore, x: Var, mode: BnMode) -> Result<Var> {
        let y = self.conv.forward(g, ps, x)?;
        batch_norm(g, ps, &self.bn, y, mode)
    }
}

/// `relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`.
struct BasicBlock {
    a: ConvBn,
    b: ConvBn,
    /// 1x1 strided projection where the shape changes.
    shortcut: Option<ConvBn>,
}

impl BasicBlock {
    fn forward(&self, g: &mut Graph, ps: &mut ParamStore, x: Var, mode: BnMode) -> Result<Var> {
        let y = self.a.forward(g, ps, x, mode)?;
        let y = g.relu(y)?;
        let y = self.b.forward(g, ps, y, mode)?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(g, ps, x, mode)?,
            None => x,
        };
        let y = g.add(y, skip)?;
        g.relu(y)
    }
}

/// Images `[N, C, H, W]` (H, W >= 32) to features `[N, 8 * width]`.
pub struct ResNetTrunk {
    stem: ConvBn,
    blocks: Vec<BasicBlock>,
    pub features: usize,
}

impl ResNetTrunk {
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        channels: usize,
        width: usize,
        rng: &mut impl Rng,
        dev: &Device,
    ) -> Self {
        let stem = ConvBn::new(ps, &format!("{name}.stem"), (channels, width), 7, 2, rng, dev);
        let mut blocks = Vec::new();
        let mut cin = width;
        for stage in 0..4 {
            let cout = width << stage;
            for i in 0..2 {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let n = format!("{name}.layer{}.{i}", stage + 1);
                blocks.push(BasicBlock {
                    a: ConvBn::new(ps, &format!("{n}.a"), (cin, cout), 3, stride, rng, dev),
                    b: ConvBn::new(ps, &format!("{n}.b"), (cout, cout), 3, 1, rng, dev),
                    shortcut: (stride != 1 || cin != cout)
                        .then(|| ConvBn::new(ps, &format!("{n}.down"), (cin, cout), 1, stride, rng, dev)),
                });
                cin = cout;
            }
        }
        ResNetTrunk {
            stem,
            blocks,
            features: cin,
        }
    }

    pub fn forward(&self, g: &mut Graph, ps: &mut ParamStore, x: Var, mode: BnMode) -> Result<Var> {
        let y = self.stem.forward(g, ps, x, mode)?;
        let y = g.relu(y)?;
        let mut y = g.max_pool2d(y, 3, 2, 1)?;
        for block in &self.blocks {
            y = block.forward(g, ps, y, mode)?;
        }
        g.global_avg_pool(y)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResNetConfig {
    pub channels: usize,
    pub num_classes: usize,
    /// Channels of the first stage: 64 is the standard ResNet18.
    pub width: usize,
}

/// ResNet18 over whole images: trunk, then one linear layer to logits.
pub struct ResNet18 {
    pub cfg: ResNetConfig,
    pub params: ParamStore,
    trunk: ResNetTrunk,
    fc: Linear,
}

impl ResNet18 {
    pub fn new(cfg: ResNetConfig, rng: &mut impl Rng, dev: &Device) -> Self {
        let mut ps = ParamStore::new();
        let trunk = ResNetTrunk::new(&mut ps, "resnet", cfg.channels, cfg.width, rng, dev);
        let fc = Linear::new(&mut ps, "fc", trunk.features, cfg.num_classes, rng, dev);
        ResNet18 {
            cfg,
            params: ps,
            trunk,
            fc,
        }
    }

    /// Logits `[B, K]` of images `[B, C, H, W]`; batch norm trains when the
    /// graph records gradients.
    pub fn forward(&mut self, g: &mut Graph, images: &Tensor) -> Result<Var> {
        ensure!(
            images.rank() == 4 && images.shape()[1] == self.cfg.channels,
            "resnet18: images have shape {:?}, expected [batch, {}, height, width]",
            images.shape(),
            self.cfg.channels
        );
        let x = g.constant(images.clone());
        let mode = BnMode::of(g);
        let f = self.trunk.forward(g, &mut self.params, x, mode)?;
        self.fc.forward(g, &self.params, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{rand_tensor, rng};

    #[test]
    fn resnet18_has_the_standard_shape_and_parameter_count() {
        let dev = Device::cpu();
        let m = ResNet18::new(
            ResNetConfig {
                channels: 3,
                num_classes: 1000,
                width: 64,
            },
            &mut rng(0),
            &dev,
        );
        // torchvision's resnet18: 11,689,512 trainable parameters.
        assert_eq!(m.params.num_trainable(), 11_689_512);
    }

    #[test]
    fn resnet18_trains_and_evaluates_on_small_images() {
        let dev = Device::cpu();
        let cfg = ResNetConfig {
            channels: 1,
            num_classes: 3,
            width: 4,
        };
        let mut m = ResNet18::new(cfg, &mut rng(1), &dev);
        let x = rand_tensor(&[2, 1, 33, 40], 2, &dev);
        let mut g = Graph::new();
        let logits = m.forward(&mut g, &x).unwrap();
        assert_eq!(g.shape(logits), &[2, 3]);
        let loss = g.softmax_cross_entropy(logits, &[0, 2]).unwrap();
        let loss = g.mean_all(loss).unwrap();
        let grads = g.backward(loss).unwrap();
        let stem = m.params.find("resnet.stem.conv.weight").unwrap();
        assert!(grads.param(stem).is_some());
        // Training moved the running statistics; evaluation uses them.
        let rm = m.params.find("resnet.stem.bn.running_mean").unwrap();
        assert!(m.params.value(rm).to_vec().unwrap().iter().any(|&v| v != 0.0));
        let mut g = Graph::inference();
        let logits = m.forward(&mut g, &x).unwrap();
        assert_eq!(g.shape(logits), &[2, 3]);
        let e = m
            .forward(&mut Graph::inference(), &rand_tensor(&[2, 3, 33, 33], 2, &dev))
            .unwrap_err();
        assert!(e.to_string().contains("resnet18"), "{e}");
    }
}
