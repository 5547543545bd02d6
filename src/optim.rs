//! Adam and gradient clipping.

use anyhow::Result;

use crate::autograd::Gradients;
use crate::device::cuda::CudaStorage;
use crate::nn::{ParamId, ParamStore};
use rayon::prelude::*;

use crate::ops::{par_fill, CHUNK, PAR_MIN};
use crate::tensor::{Storage, Tensor};

#[derive(Clone, Copy, Debug)]
pub struct AdamConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Adam (Kingma & Ba) with bias correction; `weight_decay` is L2 added to
/// the gradient, as in PyTorch's `Adam`.
pub struct Adam {
    pub config: AdamConfig,
    /// Steps taken so far (bias correction and checkpoints use it).
    pub step: u64,
    moments: Vec<Option<(Tensor, Tensor)>>,
}

/// One fused Adam update of one tensor: new (param, m, v).
pub fn adam_update(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    c: &AdamConfig,
    step: u64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let bc1 = 1.0 - c.beta1.powi(step as i32);
    let bc2 = 1.0 - c.beta2.powi(step as i32);
    match p.storage() {
        Storage::Cpu(_) => {
            let ins = [p.cpu()?, g.cpu()?, m.cpu()?, v.cpu()?];
            let dev = p.host();
            let mut outs: [Vec<f32>; 3] = std::array::from_fn(|_| dev.buffer(ins[0].len()));
            let [p2, m2, v2] = outs.each_mut().map(|o| &mut o[..]);
            if p2.len() >= PAR_MIN {
                let chunks = p2.par_chunks_mut(CHUNK).zip(m2.par_chunks_mut(CHUNK));
                chunks
                    .zip(v2.par_chunks_mut(CHUNK))
                    .enumerate()
                    .for_each(|(k, ((p2, m2), v2))| {
                        let ins = ins.map(|x| &x[k * CHUNK..]);
                        adam_cpu(c, (bc1, bc2), ins, [p2, m2, v2]);
                    });
            } else {
                adam_cpu(c, (bc1, bc2), ins, [p2, m2, v2]);
            }
            let [p2, m2, v2] = outs;
            Ok((p.same_shape(p2)?, p.same_shape(m2)?, p.same_shape(v2)?))
        }
        Storage::Cuda(ps) => cuda::adam(ps, g.cuda()?, m.cuda()?, v.cuda()?, p.shape(), c, (bc1, bc2)),
    }
}

/// One Adam update of `[p, g, m, v]` into `[p2, m2, v2]` (over `p2`'s
/// length), with the same expressions as the kernel in kernels/optim.cu.
/// A function of its own over equal-length slices so that the loop
/// vectorizes (see `ops::map_into`): as an indexed closure it ran scalar,
/// 4% of the default model's step.
#[inline(never)]
fn adam_cpu(c: &AdamConfig, (bc1, bc2): (f32, f32), ins: [&[f32]; 4], outs: [&mut [f32]; 3]) {
    let [p2, m2, v2] = outs;
    let n = p2.len();
    let (m2, v2) = (&mut m2[..n], &mut v2[..n]);
    let [p, g, m, v] = ins.map(|x| &x[..n]);
    for i in 0..n {
        let grad = g[i] + c.weight_decay * p[i];
        m2[i] = c.beta1 * m[i] + (1.0 - c.beta1) * grad;
        v2[i] = c.beta2 * v[i] + (1.0 - c.beta2) * grad * grad;
        p2[i] = p[i] - c.lr * (m2[i] / bc1) / ((v2[i] / bc2).sqrt() + c.eps);
    }
}

/// Launchers of kernels/optim.cu.
mod cuda {
    use anyhow::Result;
    use cudarc::driver::LaunchConfig;

    use super::AdamConfig;
    use crate::device::cuda::{grid, launch, CudaStorage, BLOCK};
    use crate::tensor::Tensor;

    pub(super) fn adam(
        p: &CudaStorage,
        g: &CudaStorage,
        m: &CudaStorage,
        v: &CudaStorage,
        shape: &[usize],
        c: &AdamConfig,
        (bc1, bc2): (f32, f32),
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (dev, n) = (p.device(), p.len());
        let (mut p2, mut m2, mut v2) = (dev.alloc(n)?, dev.alloc(n)?, dev.alloc(n)?);
        launch!(
            &dev,
            "optim",
            "adam",
            grid(n)?,
            p.slice(),
            g.slice(),
            m.slice(),
            v.slice(),
            p2.slice_mut(),
            m2.slice_mut(),
            v2.slice_mut(),
            &(n as i32),
            &c.lr,
            &c.beta1,
            &c.beta2,
            &c.eps,
            &c.weight_decay,
            &bc1,
            &bc2
        );
        let t = |s| Tensor::from_cuda(s, shape);
        Ok((t(p2), t(m2), t(v2)))
    }

    pub(super) fn clamp(g: &CudaStorage, shape: &[usize], c: f32) -> Result<Tensor> {
        let (dev, n) = (g.device(), g.len());
        let mut out = dev.alloc(n)?;
        launch!(
            &dev,
            "optim",
            "clamp",
            grid(n)?,
            g.slice(),
            out.slice_mut(),
            &(n as i32),
            &c
        );
        Ok(Tensor::from_cuda(out, shape))
    }

    /// Add the sum of squares of `x` into the one-element `acc`.
    pub(super) fn add_sum_squares(x: &CudaStorage, acc: &mut CudaStorage) -> Result<()> {
        let (dev, n) = (x.device(), x.len());
        // Few blocks, each looping: fewer atomic adds into `acc`.
        let blocks = grid(n)?.grid_dim.0.min(1024);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            &dev,
            "optim",
            "sum_squares",
            cfg,
            x.slice(),
            &(n as i32),
            acc.slice_mut()
        );
        Ok(())
    }
}

impl Adam {
    pub fn new(config: AdamConfig) -> Self {
        Adam {
            config,
            step: 0,
            moments: Vec::new(),
        }
    }

    /// Update every trainable parameter that has a gradient.
    pub fn step(&mut self, params: &mut ParamStore, grads: &Gradients) -> Result<()> {
        self.step += 1;
        self.moments.resize(params.len(), None);
        for id in params.ids().collect::<Vec<_>>() {
            if !params.get(id).trainable {
                continue;
            }
            let Some(g) = grads.param(id) else { continue };
            let p = params.value(id).clone();
            let (m, v) = match &self.moments[index(id)] {
                Some(mv) => mv.clone(),
                None => {
                    let z = Tensor::zeros(p.shape(), &p.device());
                    (z.clone(), z)
                }
            };
            let (p2, m2, v2) = adam_update(&p, g, &m, &v, &self.config, self.step)?;
            params.set(id, p2)?;
            self.moments[index(id)] = Some((m2, v2));
        }
        Ok(())
    }

    /// First and second moments by parameter, for checkpoints.
    pub fn moments(&self, id: ParamId) -> Option<&(Tensor, Tensor)> {
        self.moments.get(index(id)).and_then(|m| m.as_ref())
    }

    pub fn set_moments(&mut self, id: ParamId, m: Tensor, v: Tensor) {
        let i = index(id);
        if self.moments.len() <= i {
            self.moments.resize(i + 1, None);
        }
        self.moments[i] = Some((m, v));
    }
}

fn index(id: ParamId) -> usize {
    id.index()
}

/// Clamp every parameter gradient to `[-c, c]`.
pub fn clip_by_value(grads: &mut Gradients, c: f32) -> Result<()> {
    grads.map_params(|g| match g.storage() {
        Storage::Cpu(_) => {
            let gv = g.cpu()?;
            g.same_shape(par_fill(g.host(), gv.len(), |i| gv[i].clamp(-c, c)))
        }
        Storage::Cuda(gs) => cuda::clamp(gs, g.shape(), c),
    })
}

/// Scale all parameter gradients together so their global L2 norm is at most
/// `max_norm`; returns the norm before clipping. On a GPU the squares are
/// summed there and only the one total is read back.
pub fn clip_by_norm(grads: &mut Gradients, max_norm: f32) -> Result<f32> {
    let mut sq = 0.0f64;
    let mut acc: Option<CudaStorage> = None;
    for (_, g) in grads.param_grads() {
        match g.storage() {
            Storage::Cpu(_) => sq += crate::ops::sum_squares(g.cpu()?),
            Storage::Cuda(gs) => {
                if acc.is_none() {
                    let mut a = gs.device().alloc(1)?;
                    a.fill(0.0)?;
                    acc = Some(a);
                }
                cuda::add_sum_squares(gs, acc.as_mut().expect("set above"))?;
            }
        }
    }
    if let Some(a) = acc {
        sq += a.to_vec()?[0] as f64;
    }
    let norm = sq.sqrt() as f32;
    if norm > max_norm {
        let s = max_norm / (norm + 1e-12);
        grads.map_params(|g| {
            crate::ops::elementwise::unary_forward(g, crate::ops::elementwise::Unary::Affine(s, 0.0))
        })?;
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Device, Graph};

    #[test]
    fn adam_first_step_moves_each_weight_by_lr() {
        // With bias correction the first step is lr * g / (|g| + eps) = lr * sign(g).
        let dev = Device::cpu();
        let mut ps = ParamStore::new();
        let id = ps.add("w", Tensor::from_vec(vec![1.0, -2.0, 3.0], &[3], &dev).unwrap());
        let mut g = Graph::new();
        let w = ps.var(&mut g, id);
        let c = g.constant(Tensor::from_vec(vec![2.0, -0.5, 0.0], &[3], &dev).unwrap());
        let y = g.mul(w, c).unwrap();
        let loss = g.sum_all(y).unwrap();
        let grads = g.backward(loss).unwrap();
        let mut adam = Adam::new(AdamConfig {
            lr: 0.1,
            ..Default::default()
        });
        adam.step(&mut ps, &grads).unwrap();
        let v = ps.value(id).to_vec().unwrap();
        assert!(
            (v[0] - 0.9).abs() < 1e-6 && (v[1] + 1.9).abs() < 1e-6 && v[2] == 3.0,
            "{v:?}"
        );
    }

    #[test]
    fn adam_minimizes_a_quadratic() {
        let dev = Device::cpu();
        let mut ps = ParamStore::new();
        let id = ps.add("w", Tensor::from_vec(vec![5.0, -3.0], &[2], &dev).unwrap());
        let mut adam = Adam::new(AdamConfig {
            lr: 0.1,
            ..Default::default()
        });
        for _ in 0..500 {
            let mut g = Graph::new();
            let w = ps.var(&mut g, id);
            let sq = g.mul(w, w).unwrap();
            let loss = g.sum_all(sq).unwrap();
            let grads = g.backward(loss).unwrap();
            adam.step(&mut ps, &grads).unwrap();
        }
        assert!(ps.value(id).to_vec().unwrap().iter().all(|v| v.abs() < 0.05));
    }

    #[test]
    fn clipping_by_value_and_by_norm() {
        let dev = Device::cpu();
        let mut ps = ParamStore::new();
        let id = ps.add("w", Tensor::from_vec(vec![3.0, 4.0], &[2], &dev).unwrap());
        let grads_of = |ps: &ParamStore| {
            let mut g = Graph::new();
            let w = ps.var(&mut g, id);
            let sq = g.mul(w, w).unwrap();
            let l = g.affine(sq, 0.5, 0.0).unwrap();
            let loss = g.sum_all(l).unwrap();
            g.backward(loss).unwrap() // gradient = w = [3, 4]
        };
        let mut gr = grads_of(&ps);
        clip_by_value(&mut gr, 3.5).unwrap();
        assert_eq!(gr.param(id).unwrap().to_vec().unwrap(), vec![3.0, 3.5]);
        let mut gr = grads_of(&ps);
        let n = clip_by_norm(&mut gr, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-5);
        let v = gr.param(id).unwrap().to_vec().unwrap();
        assert!((v[0] - 0.6).abs() < 1e-5 && (v[1] - 0.8).abs() < 1e-5);
    }
}
