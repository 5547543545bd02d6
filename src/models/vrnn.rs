//! The VRNN over the proxy (Chung et al. 2015, as used by variational
//! saccading, paper §3 and App. 7.6). At each of T steps, from the GRU state
//! `h` and the proxy features `phi_x(c)`:
//! - posterior `q(z | c, h) = N(mu_q, exp(logvar_q))`, learned prior
//!   `p(z | h) = N(mu_p, exp(logvar_p))`;
//! - `z = mu_q + exp(logvar_q / 2) * eps` in training, `mu_q` in evaluation;
//! - the decoder reconstructs the proxy from `[phi_z(z), h]` (Bernoulli logits);
//! - `h = GRU([phi_x(c), phi_z(z)], h)`.
//!
//! Every variance is carried as a log-variance, in sampling and in the KL
//! alike (the authors' code mixes log-variance and standard deviation).

use anyhow::Result;
use rand::Rng;

use super::classifier::ConvStack;
use crate::autograd::{Graph, Var};
use crate::device::Device;
use crate::nn::{GruCell, Linear, ParamStore};
use crate::tensor::Tensor;

/// Latent size: z = (scale, x, y) of the glimpse.
pub const LATENT: usize = 3;

/// Initial posterior log-variance (standard deviation e^-1 = 0.37 in z).
const INIT_LOGVAR: f32 = -2.0;

#[derive(Clone, Debug)]
pub struct VrnnConfig {
    pub channels: usize,
    pub proxy_size: usize,
    /// Width of the proxy encoder's first conv; later ones double it.
    pub enc_width: usize,
    /// Size of phi_x(c), phi_z(z) and the MLP hidden layers.
    pub embed: usize,
    pub hidden: usize,
    /// Fixed posterior variance instead of a learned one (paper ablation).
    pub fixed_variance: Option<f32>,
}

/// Two dense layers with an ELU between.
struct Mlp {
    l1: Linear,
    l2: Linear,
}

impl Mlp {
    #[allow(clippy::too_many_arguments)]
    fn new(
        ps: &mut ParamStore,
        name: &str,
        fin: usize,
        hidden: usize,
        fout: usize,
        rng: &mut impl Rng,
        dev: &Device,
    ) -> Self {
        Mlp {
            l1: Linear::new(ps, &format!("{name}.0"), fin, hidden, rng, dev),
            l2: Linear::new(ps, &format!("{name}.1"), hidden, fout, rng, dev),
        }
    }

    fn forward(&self, g: &mut Graph, ps: &ParamStore, x: Var) -> Result<Var> {
        let h = self.l1.forward(g, ps, x)?;
        let h = g.elu(h)?;
        self.l2.forward(g, ps, h)
    }
}

pub struct Vrnn {
    pub cfg: VrnnConfig,
    enc_convs: ConvStack,
    enc_fc: Linear,
    phi_z: Linear,
    posterior: Mlp,
    prior: Mlp,
    decoder: Mlp,
    gru: GruCell,
}

/// What one unrolled run gives the saccader.
pub struct VrnnRun {
    /// z_t per step, `[B, 3]`.
    pub z: Vec<Var>,
    /// Per-sample `mean_t(NLL_t + KL_t)`, `[B]`.
    pub elbo_terms: Var,
    /// Per-sample `mean_t KL_t`, `[B]` (reported separately).
    pub kl: Var,
}

impl Vrnn {
    pub fn new(ps: &mut ParamStore, cfg: VrnnConfig, rng: &mut impl Rng, dev: &Device) -> Self {
        let w = cfg.enc_width;
        let enc_convs = ConvStack::new(
            ps,
            "vrnn.enc",
            cfg.channels,
            &[(w, 2), (2 * w, 2), (2 * w, 2)],
            rng,
            dev,
        );
        let side = enc_convs.out_side(cfg.proxy_size);
        let e = cfg.embed;
        let h = cfg.hidden;
        let proxy_values = cfg.channels * cfg.proxy_size * cfg.proxy_size;
        // The posterior starts at N(0, e^INIT_LOGVAR) for every image: the
        // glimpses begin at the centre at mid scale and jitter moderately.
        // With PyTorch's default init they start saturated at random edges
        // and, with unit variance, jump across the image from step to step.
        let posterior = Mlp::new(ps, "vrnn.posterior", e + h, e, 2 * LATENT, rng, dev);
        ps.set(posterior.l2.w, Tensor::zeros(&[2 * LATENT, e], dev))
            .expect("same shape");
        let bias: Vec<f32> = (0..2 * LATENT)
            .map(|i| if i < LATENT { 0.0 } else { INIT_LOGVAR })
            .collect();
        ps.set(
            posterior.l2.b,
            Tensor::from_vec(bias, &[2 * LATENT], dev).expect("length"),
        )
        .expect("same shape");
        Vrnn {
            enc_fc: Linear::new(
                ps,
                "vrnn.enc.fc",
                enc_convs.out_channels * side * side,
                e,
                rng,
                dev,
            ),
            enc_convs,
            phi_z: Linear::new(ps, "vrnn.phi_z", LATENT, e, rng, dev),
            posterior,
            prior: Mlp::new(ps, "vrnn.prior", h, e, 2 * LATENT, rng, dev),
            decoder: Mlp::new(ps, "vrnn.decoder", e + h, e, proxy_values, rng, dev),
            gru: GruCell::new(ps, "vrnn.gru", 2 * e, h, rng, dev),
            cfg,
        }
    }

    /// phi_x(c): proxy `[B, C, J, J]` to `[B, embed]`.
    fn encode(&self, g: &mut Graph, ps: &ParamStore, proxy: Var) -> Result<Var> {
        let b = g.shape(proxy)[0];
        let x = self.enc_convs.forward(g, ps, proxy)?;
        let n: usize = g.shape(x)[1..].iter().product();
        let x = g.reshape(x, &[b, n])?;
        let x = self.enc_fc.forward(g, ps, x)?;
        g.elu(x)
    }

    /// Split `[B, 6]` into mean and log-variance `[B, 3]` each.
    fn gaussian(&self, g: &mut Graph, out: Var, fixed: Option<f32>) -> Result<(Var, Var)> {
        let mu = g.slice(out, 1, 0, LATENT)?;
        let logvar = match fixed {
            Some(v) => {
                let b = g.shape(out)[0];
                let dev = g.value(out).device();
                g.constant(Tensor::full(&[b, LATENT], v.ln(), &dev))
            }
            None => g.slice(out, 1, LATENT, LATENT)?,
        };
        Ok((mu, logvar))
    }

    /// Unroll T steps over the proxy. `noise` holds one `[B, 3]` standard
    /// normal tensor per step in training; `None` uses posterior means.
    pub fn run(
        &self,
        g: &mut Graph,
        ps: &ParamStore,
        proxy: Var,
        steps: usize,
        noise: Option<&[Tensor]>,
    ) -> Result<VrnnRun> {
        let b = g.shape(proxy)[0];
        let dev = g.value(proxy).device();
        let target = g.value(proxy).reshape(&[b, g.value(proxy).numel() / b])?;
        let phi_x = self.encode(g, ps, proxy)?;
        let mut h = g.constant(Tensor::zeros(&[b, self.cfg.hidden], &dev));
        let (mut zs, mut nll_kl, mut kls) = (Vec::new(), Vec::new(), Vec::new());
        for t in 0..steps {
            let xh = g.concat(&[phi_x, h], 1)?;
            let q = self.posterior.forward(g, ps, xh)?;
            let (mu_q, logvar_q) = self.gaussian(g, q, self.cfg.fixed_variance)?;
            let p = self.prior.forward(g, ps, h)?;
            let (mu_p, logvar_p) = self.gaussian(g, p, None)?;
            let z = match noise {
                Some(eps) => g.reparameterize(mu_q, logvar_q, &eps[t])?,
                None => mu_q,
            };
            let phi_z = self.phi_z.forward(g, ps, z)?;
            let phi_z = g.elu(phi_z)?;
            let zh = g.concat(&[phi_z, h], 1)?;
            let logits = self.decoder.forward(g, ps, zh)?;
            let nll = g.bce_with_logits(logits, &target)?;
            let kl = g.kl_diag_gaussians(mu_q, logvar_q, mu_p, logvar_p)?;
            nll_kl.push(g.add(nll, kl)?);
            kls.push(kl);
            let xz = g.concat(&[phi_x, phi_z], 1)?;
            h = self.gru.forward(g, ps, xz, h)?;
            zs.push(z);
        }
        let per_step = g.stack(&nll_kl, 0)?;
        let elbo_terms = g.mean(per_step, &[0], false)?;
        let kl_steps = g.stack(&kls, 0)?;
        let kl = g.mean(kl_steps, &[0], false)?;
        Ok(VrnnRun {
            z: zs,
            elbo_terms,
            kl,
        })
    }
}
