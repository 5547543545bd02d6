//! Layers: parameter shapes, initialization and forward in terms of graph
//! ops. Weights use PyTorch's layouts and default initialization
//! (uniform in ±1/sqrt(fan_in)), so checkpoints map onto PyTorch modules.

use anyhow::Result;
use rand::Rng;

use super::{ParamId, ParamStore};
use crate::autograd::{Graph, Var};
use crate::device::Device;
use crate::tensor::Tensor;

fn uniform(shape: &[usize], fan_in: usize, rng: &mut impl Rng, dev: &Device) -> Tensor {
    let b = 1.0 / (fan_in.max(1) as f32).sqrt();
    Tensor::uniform(shape, -b, b, rng, dev)
}

/// Dense layer `y = x W^T + b`.
pub struct Linear {
    pub w: ParamId,
    pub b: ParamId,
}

impl Linear {
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        fin: usize,
        fout: usize,
        rng: &mut impl Rng,
        dev: &Device,
    ) -> Self {
        Linear {
            w: ps.add(&format!("{name}.weight"), uniform(&[fout, fin], fin, rng, dev)),
            b: ps.add(&format!("{name}.bias"), uniform(&[fout], fin, rng, dev)),
        }
    }

    pub fn forward(&self, g: &mut Graph, ps: &ParamStore, x: Var) -> Result<Var> {
        let (w, b) = (ps.var(g, self.w), ps.var(g, self.b));
        g.linear(x, w, Some(b))
    }
}

/// 2-D convolution, square kernel.
pub struct Conv2d {
    pub w: ParamId,
    pub b: Option<ParamId>,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        (cin, cout): (usize, usize),
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
        rng: &mut impl Rng,
        dev: &Device,
    ) -> Self {
        let fan_in = cin * kernel * kernel;
        let w = ps.add(
            &format!("{name}.weight"),
            uniform(&[cout, cin, kernel, kernel], fan_in, rng, dev),
        );
        let b = bias.then(|| ps.add(&format!("{name}.bias"), uniform(&[cout], fan_in, rng, dev)));
        Conv2d {
            w,
            b,
            stride,
            padding,
        }
    }

    pub fn forward(&self, g: &mut Graph, ps: &ParamStore, x: Var) -> Result<Var> {
        let w = ps.var(g, self.w);
        let b = self.b.map(|b| ps.var(g, b));
        g.conv2d(x, w, b, self.stride, self.padding)
    }
}

/// Group normalization with a per-channel affine.
pub struct GroupNorm {
    pub gamma: ParamId,
    pub beta: ParamId,
    pub groups: usize,
}

impl GroupNorm {
    pub fn new(ps: &mut ParamStore, name: &str, groups: usize, channels: usize, dev: &Device) -> Self {
        GroupNorm {
            gamma: ps.add(&format!("{name}.weight"), Tensor::full(&[channels], 1.0, dev)),
            beta: ps.add(&format!("{name}.bias"), Tensor::zeros(&[channels], dev)),
            groups,
        }
    }

    pub fn forward(&self, g: &mut Graph, ps: &ParamStore, x: Var) -> Result<Var> {
        let (gamma, beta) = (ps.var(g, self.gamma), ps.var(g, self.beta));
        g.group_norm(x, gamma, beta, self.groups, 1e-5)
    }
}

/// Batch normalization over `[N, C]` or `[N, C, H, W]`. The running
/// statistics are buffers of the store, updated by `forward` in training.
pub struct BatchNorm {
    pub gamma: ParamId,
    pub beta: ParamId,
    pub running_mean: ParamId,
    pub running_var: ParamId,
}

impl BatchNorm {
    pub const MOMENTUM: f32 = 0.1;
    pub const EPS: f32 = 1e-5;

    pub fn new(ps: &mut ParamStore, name: &str, channels: usize, dev: &Device) -> Self {
        BatchNorm {
            gamma: ps.add(&format!("{name}.weight"), Tensor::full(&[channels], 1.0, dev)),
            beta: ps.add(&format!("{name}.bias"), Tensor::zeros(&[channels], dev)),
            running_mean: ps.add_buffer(&format!("{name}.running_mean"), Tensor::zeros(&[channels], dev)),
            running_var: ps.add_buffer(
                &format!("{name}.running_var"),
                Tensor::full(&[channels], 1.0, dev),
            ),
        }
    }

    /// Batch statistics when the graph records gradients (training), running
    /// statistics otherwise.
    pub fn forward(&self, g: &mut Graph, ps: &mut ParamStore, x: Var) -> Result<Var> {
        let (gamma, beta) = (ps.var(g, self.gamma), ps.var(g, self.beta));
        let training = g.grad_enabled();
        let (y, stats) = g.batch_norm(
            x,
            gamma,
            beta,
            ps.value(self.running_mean),
            ps.value(self.running_var),
            training,
            Self::MOMENTUM,
            Self::EPS,
        )?;
        if let Some((m, v)) = stats {
            ps.set(self.running_mean, m)?;
            ps.set(self.running_var, v)?;
        }
        Ok(y)
    }
}

/// GRU cell with PyTorch's `GRUCell` layout (gates r, z, n).
pub struct GruCell {
    pub w_ih: ParamId,
    pub w_hh: ParamId,
    pub b_ih: ParamId,
    pub b_hh: ParamId,
    pub hidden: usize,
}

impl GruCell {
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        input: usize,
        hidden: usize,
        rng: &mut impl Rng,
        dev: &Device,
    ) -> Self {
        GruCell {
            w_ih: ps.add(
                &format!("{name}.weight_ih"),
                uniform(&[3 * hidden, input], hidden, rng, dev),
            ),
            w_hh: ps.add(
                &format!("{name}.weight_hh"),
                uniform(&[3 * hidden, hidden], hidden, rng, dev),
            ),
            b_ih: ps.add(
                &format!("{name}.bias_ih"),
                uniform(&[3 * hidden], hidden, rng, dev),
            ),
            b_hh: ps.add(
                &format!("{name}.bias_hh"),
                uniform(&[3 * hidden], hidden, rng, dev),
            ),
            hidden,
        }
    }

    pub fn forward(&self, g: &mut Graph, ps: &ParamStore, x: Var, h: Var) -> Result<Var> {
        let (wi, wh) = (ps.var(g, self.w_ih), ps.var(g, self.w_hh));
        let (bi, bh) = (ps.var(g, self.b_ih), ps.var(g, self.b_hh));
        g.gru_cell(x, h, wi, wh, bi, bh)
    }
}
