//! The fully-convolutional crop classifier: conv + group norm + ELU blocks,
//! then global average pooling, so any crop size works.

use anyhow::Result;
use rand::Rng;

use crate::autograd::{Graph, Var};
use crate::device::Device;
use crate::nn::{Conv2d, GroupNorm, ParamStore};

/// Group count for group norm: 8 channels a group, as few as 1 group.
pub fn gn_groups(channels: usize) -> usize {
    (channels / 8).max(1)
}

/// A stack of 3x3 conv → GroupNorm → ELU blocks.
pub struct ConvStack {
    blocks: Vec<(Conv2d, GroupNorm)>,
    pub out_channels: usize,
}

impl ConvStack {
    /// `plan` lists (output channels, stride) per block.
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        in_channels: usize,
        plan: &[(usize, usize)],
        rng: &mut impl Rng,
        dev: &Device,
    ) -> Self {
        let mut cin = in_channels;
        let blocks = plan
            .iter()
            .enumerate()
            .map(|(i, &(cout, stride))| {
                let conv = Conv2d::new(
                    ps,
                    &format!("{name}.{i}.conv"),
                    (cin, cout),
                    3,
                    stride,
                    1,
                    false,
                    rng,
                    dev,
                );
                let norm = GroupNorm::new(ps, &format!("{name}.{i}.gn"), gn_groups(cout), cout, dev);
                cin = cout;
                (conv, norm)
            })
            .collect();
        ConvStack {
            blocks,
            out_channels: cin,
        }
    }

    pub fn forward(&self, g: &mut Graph, ps: &ParamStore, mut x: Var) -> Result<Var> {
        for (conv, norm) in &self.blocks {
            x = conv.forward(g, ps, x)?;
            x = norm.forward(g, ps, x)?;
            x = g.elu(x)?;
        }
        Ok(x)
    }

    /// The product of the blocks' strides: output cell `j` is centred on
    /// input pixel `stride() * j` (3x3, pad 1).
    pub fn stride(&self) -> usize {
        self.blocks.iter().map(|(conv, _)| conv.stride).product()
    }

    /// Spatial side after the stack for an input of side `n` (3x3, pad 1).
    pub fn out_side(&self, mut n: usize) -> usize {
        for (conv, _) in &self.blocks {
            n = (n - 1) / conv.stride + 1;
        }
        n
    }
}

/// Crops `[N, C, L, L]` to features `[N, F]`.
pub struct CropClassifier {
    convs: ConvStack,
}

impl CropClassifier {
    pub fn new(ps: &mut ParamStore, channels: usize, width: usize, rng: &mut impl Rng, dev: &Device) -> Self {
        let plan = [(width, 1), (2 * width, 2), (4 * width, 2), (4 * width, 2)];
        CropClassifier {
            convs: ConvStack::new(ps, "classifier", channels, &plan, rng, dev),
        }
    }

    pub fn features(&self) -> usize {
        self.convs.out_channels
    }

    pub fn forward(&self, g: &mut Graph, ps: &ParamStore, crops: Var) -> Result<Var> {
        let x = self.convs.forward(g, ps, crops)?;
        g.global_avg_pool(x)
    }
}
