//! The VRNN over the proxy (Chung et al. 2015, as used by variational
//! saccading, paper §3 and App. 7.6). At each of T steps, from the GRU state
//! `h` and the proxy features `phi_x(c)`:
//! - posterior `q(z | c, h) = N(mu_q, exp(logvar_q))`, learned prior
//!   `p(z | h) = N(mu_p, exp(logvar_p))`. The posterior's scale mean and
//!   log-variances come from an MLP on `[phi_x(c), h]` as in the paper; its
//!   centre mean comes from attention of a query `W h` over the proxy
//!   encoder's 8x8 feature map (the expected cell position). The paper's MLP
//!   learnt one image-independent place for every glimpse on our budget;
//!   attention lets a feature learnt on one image attract glimpses anywhere.
//!   With `mask_attended`, cells an earlier glimpse covered are excluded
//!   from later steps' attention, so the T glimpses spread over the objects
//!   instead of returning to the most salient one;
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
use crate::ops::pool::avg_pool2d_forward;
use crate::ops::shape::permute_forward;
use crate::tensor::Tensor;

/// Latent size: z = (scale, x, y) of the glimpse.
pub const LATENT: usize = 3;

/// Posterior net outputs: the scale's mean and the three log-variances (the
/// glimpse centre's mean comes from attention over the proxy).
const POSTERIOR_OUT: usize = 1 + LATENT;

/// `[2, m*m]`: x then y, in normalized image coordinates, of the proxy pixel
/// each cell of the encoder's `m x m` map is centred on (row-major like the
/// map). A 3x3, padding 1, stride 2 conv centres output `j` on input `2j`, so
/// after a total stride `r` cell `j` sits on proxy pixel `r*j`, whose centre
/// is at `(2rj + 1)/J - 1`. (`r` is the encoder's, not `J/m`: they differ
/// when the proxy side is not a multiple of `r`.)
fn cell_centres(m: usize, r: usize, proxy_size: usize) -> Vec<f32> {
    let c = |k: usize| (2 * r * k + 1) as f32 / proxy_size as f32 - 1.0;
    let xs = (0..m * m).map(|p| c(p % m));
    let ys = (0..m * m).map(|p| c(p / m));
    xs.chain(ys).collect()
}

/// Initial posterior log-variance: standard deviation e^-2 = 0.14 in z, about
/// 7 pixels of a 100-pixel image at the centre. With e^-1 the training crops
/// jitter by a digit's half-width and learning is slower (cluttered-mnist-1,
/// 20k images, 1 epoch: 43% test against 58%).
const INIT_LOGVAR: f32 = -4.0;

/// The initial posterior log-variance of the glimpse centre: [`INIT_LOGVAR`],
/// or less where the smallest glimpse is small, so that the jitter keeps
/// the ratio to the smallest glimpse it has at the small preset (std 0.135
/// against half-side 0.2). On a 1500² megapixel-MNIST image with 52-px
/// glimpses, e^-2 would move each training crop by 100 px, off the digit
/// the attention chose (no learning in 20k images).
fn init_centre_logvar(scale_min: f32) -> f32 {
    let std = (INIT_LOGVAR / 2.0).exp().min(0.68 * scale_min);
    2.0 * std.ln()
}

/// Score added to attended cells: their softmax weight underflows to 0
/// (finite, so a softmax never sees inf - inf).
const MASKED: f32 = -1e9;

/// The ink prior's score of a cell with no ink: never attended while a cell
/// with ink is left (its weight underflows), yet far enough above
/// [`MASKED`] that the learnt scores still order what is left. A soft
/// `ln(0.001)` let the learnt scores outbid the ink and send the glimpses
/// to empty background (megapixel MNIST: 0.17 of 5 digits covered).
const EMPTY: f32 = -1e4;

/// Mean proxy value below which a cell counts as empty.
const NO_INK: f32 = 1e-4;

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
    /// Glimpse side as a fraction of the image side, `[s_min, s_max]`: the
    /// mask needs each glimpse's box.
    pub scale: [f32; 2],
    /// Exclude the cells earlier glimpses covered from later attention
    /// (hard masking: sampling without replacement over cells).
    pub mask_attended: bool,
    /// How attention places the glimpse centre.
    pub focus: Focus,
    /// Add `ln(ink + 0.001)` to each cell's score, ink being the mean proxy
    /// value over the cell's pixels, and rule out cells without ink:
    /// glimpses go to what is drawn, not to empty background (see
    /// [`Vrnn::ink_scores`]).
    pub ink_prior: bool,
    /// The decoder reconstructs the proxy average-pooled by this factor (1:
    /// the proxy itself): a 128² proxy's decoder would cost more than the
    /// rest of the model.
    pub decoder_pool: usize,
    /// phi_x reads the feature map average-pooled by this factor (1: the
    /// map itself): a 128² proxy's 32² map made its dense layer 4.2M
    /// weights, 90% of the model.
    pub summary_pool: usize,
    /// One learnt query for every step instead of one from the state: the
    /// cells are ranked once by what marks an object, and with the mask and
    /// [`Focus::Peak`] the glimpses take the best cells in turn (IPS's
    /// top-k). For many objects of one kind, where what was learnt for one
    /// glimpse holds for all.
    pub fixed_query: bool,
}

/// How the attention scores over the proxy's cells become a glimpse centre.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Focus {
    /// The softmax-weighted mean of all cell centres: one object per image
    /// is found anywhere, but several equally salient ones pull the glimpse
    /// to the empty middle between them.
    #[default]
    Mean,
    /// The highest-scoring cell (with the mask: the best one no earlier
    /// glimpse covered), then the softmax-weighted mean over its 3x3
    /// neighbourhood, through which the glimpse's gradient reaches the
    /// scores. For many small objects. (Drawing the cell from the softmax
    /// instead, by Gumbel-max, sent most training glimpses onto the noise
    /// strokes of megapixel MNIST.)
    Peak,
}

/// The proxy encoder's conv strides (3x3, pad 1).
const ENC_STRIDES: [usize; 3] = [2, 2, 1];

/// The side of the proxy encoder's feature map for a proxy of side `j`.
pub fn map_side(j: usize) -> usize {
    ENC_STRIDES.iter().fold(j, |n, s| (n - 1) / s + 1)
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
    /// Attention query from `h` over the proxy's feature map.
    query: Linear,
    /// The map cells' centres as rows `(x, y)`, `[P, 2]` (see [`cell_centres`]).
    cells: Tensor,
    /// The same on the host, for the mask's box tests (no device read per step).
    cells_host: Vec<f32>,
    prior: Mlp,
    decoder: Mlp,
    gru: GruCell,
}

/// What one unrolled run gives the saccader.
pub struct VrnnRun {
    /// z_t per step, `[B, 3]`.
    pub z: Vec<Var>,
    /// Per step, the attention score where the glimpse went, `[B, 1]`: the
    /// mean score under the attention weights.
    pub scores: Vec<Var>,
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
            &[
                (w, ENC_STRIDES[0]),
                (2 * w, ENC_STRIDES[1]),
                (2 * w, ENC_STRIDES[2]),
            ],
            rng,
            dev,
        );
        let side = enc_convs.out_side(cfg.proxy_size);
        let cells_host = cell_centres(side, enc_convs.stride(), cfg.proxy_size);
        let e = cfg.embed;
        let h = cfg.hidden;
        let summary = side / cfg.summary_pool;
        let recon = cfg.proxy_size / cfg.decoder_pool;
        let proxy_values = cfg.channels * recon * recon;
        // The posterior starts at N(0, e^INIT_LOGVAR) for every image: the
        // glimpses begin at the centre at mid scale and jitter moderately.
        // With PyTorch's default init they start saturated at random edges
        // and, with unit variance, jump across the image from step to step.
        let posterior = Mlp::new(ps, "vrnn.posterior", e + h, e, POSTERIOR_OUT, rng, dev);
        ps.set(posterior.l2.w, Tensor::zeros(&[POSTERIOR_OUT, e], dev))
            .expect("same shape");
        let bias: Vec<f32> = (0..POSTERIOR_OUT)
            .map(|i| match i {
                0 => 0.0,
                1 => INIT_LOGVAR,
                _ => init_centre_logvar(cfg.scale[0]),
            })
            .collect();
        ps.set(
            posterior.l2.b,
            Tensor::from_vec(bias, &[POSTERIOR_OUT], dev).expect("length"),
        )
        .expect("same shape");
        // The query starts at zero: uniform attention, glimpses at the centre.
        // A fixed query is read from a constant 1 instead of the state.
        let q_in = if cfg.fixed_query { 1 } else { h };
        let query = Linear::new(ps, "vrnn.query", q_in, enc_convs.out_channels, rng, dev);
        ps.set(query.w, Tensor::zeros(&[enc_convs.out_channels, q_in], dev))
            .expect("same shape");
        Vrnn {
            enc_fc: Linear::new(
                ps,
                "vrnn.enc.fc",
                enc_convs.out_channels * summary * summary,
                e,
                rng,
                dev,
            ),
            query,
            cells: Tensor::from_vec(cells_host.clone(), &[2, side * side], dev)
                .and_then(|c| permute_forward(&c, &[1, 0]))
                .expect("2*m*m values"),
            cells_host,
            enc_convs,
            phi_z: Linear::new(ps, "vrnn.phi_z", LATENT, e, rng, dev),
            posterior,
            prior: Mlp::new(ps, "vrnn.prior", h, e, 2 * LATENT, rng, dev),
            decoder: Mlp::new(ps, "vrnn.decoder", e + h, e, proxy_values, rng, dev),
            gru: GruCell::new(ps, "vrnn.gru", 2 * e, h, rng, dev),
            cfg,
        }
    }

    /// Cells of the proxy's feature map, P.
    pub fn cells(&self) -> usize {
        self.cells.dim(0)
    }

    /// phi_x(c) `[B, embed]` and the feature map it comes from `[B, F, m*m]`.
    fn encode(&self, g: &mut Graph, ps: &ParamStore, proxy: Var) -> Result<(Var, Var)> {
        let b = g.shape(proxy)[0];
        let map = self.enc_convs.forward(g, ps, proxy)?;
        let (f, m) = (g.shape(map)[1], g.shape(map)[2]);
        let k = self.cfg.summary_pool;
        let summary = if k > 1 { g.avg_pool2d(map, k, k)? } else { map };
        let x = g.reshape(summary, &[b, f * (m / k) * (m / k)])?;
        let x = self.enc_fc.forward(g, ps, x)?;
        let phi_x = g.elu(x)?;
        Ok((phi_x, g.reshape(map, &[b, f, m * m])?))
    }

    /// Where to look, `[B, 2]` in z units: the attention-weighted mean of the
    /// feature map's cell centres (x, y in [-1, 1], PyTorch's grid
    /// convention), through atanh so that `tanh(z)` gives the point back.
    /// Scores are `<query(h), features of the cell>`: a feature that marks an
    /// object attracts the glimpse wherever it sits in the proxy, so what is
    /// learnt on one image transfers to every position.
    /// `mask` (`[B, 1, P]`, 0 or [`MASKED`]) is added to the scores. With
    /// [`Focus::Peak`] and the proxy's values (`ink`, `[B, C, J, J]` on the
    /// host: the ink prior's), the point is the centre of the ink around the
    /// peak cell, the window's attention mean carrying its gradient (a cell
    /// is 47 px of a 1500² image, as wide as a glimpse: the mean over cell
    /// centres cut the digits at the crop's edge). Also returns the mean
    /// score where the glimpse went, `[B, 1]`, and the peak cells.
    fn attend(
        &self,
        g: &mut Graph,
        ps: &ParamStore,
        keys: Var,
        h: Var,
        mask: Option<&Tensor>,
        ink: Option<&[f32]>,
    ) -> Result<(Var, Var, Vec<usize>)> {
        let (b, f) = (g.shape(keys)[0], g.shape(keys)[1]);
        let p = g.shape(keys)[2];
        let q_in = if self.cfg.fixed_query {
            g.constant(Tensor::full(&[b, 1], 1.0, &g.value(h).device()))
        } else {
            h
        };
        let q = self.query.forward(g, ps, q_in)?;
        let q = g.reshape(q, &[b, 1, f])?;
        // [B, 1, F] @ [B, F, P]: one batched product (a broadcast multiply
        // and a sum took 5% of the default step).
        let mut scores = g.matmul(q, keys)?;
        if let Some(m) = mask {
            let m = g.constant(m.clone());
            scores = g.add(scores, m)?;
        }
        let mut peaks = Vec::new();
        if self.cfg.focus == Focus::Peak {
            let (window, at) = self.peak_window(g.value(scores))?;
            let window = g.constant(window);
            scores = g.add(scores, window)?;
            peaks = at;
        }
        let weights = g.softmax(scores)?;
        // [B, P] @ [P, 2]: the expected (x, y).
        let weights = g.reshape(weights, &[b, p])?;
        let flat = g.reshape(scores, &[b, p])?;
        let weighted = g.mul(weights, flat)?;
        let score = g.sum(weighted, &[1], true)?;
        let cells = g.constant(self.cells.clone());
        let mut xy = g.matmul(weights, cells)?;
        if let (Some(ink), false) = (ink, peaks.is_empty()) {
            // Straight through: the value of the ink's centre, the gradient
            // of the attention mean.
            let soft = g.value(xy).to_vec()?;
            let shift: Vec<f32> = self
                .ink_centres(ink, &peaks)
                .iter()
                .zip(soft.chunks(2))
                .flat_map(|(c, s)| [c[0] - s[0], c[1] - s[1]])
                .collect();
            let shift = g.constant(Tensor::from_vec(shift, &[b, 2], &g.value(xy).device())?);
            xy = g.add(xy, shift)?;
        }
        // atanh(c) = (ln(1 + c) - ln(1 - c)) / 2; |c| < 1, finite.
        let up = g.affine(xy, 1.0, 1.0)?;
        let up = g.log(up)?;
        let down = g.affine(xy, -1.0, 1.0)?;
        let down = g.log(down)?;
        let diff = g.sub(up, down)?;
        Ok((g.affine(diff, 0.5, 0.0)?, score, peaks))
    }

    /// Per image, `[x, y]` (normalized) of the ink-weighted centre of the
    /// proxy pixels within one stride of its peak cell's pixel (the cell and
    /// half of each neighbour), or the cell's centre where there is no ink;
    /// kept off the edge so that atanh stays finite.
    fn ink_centres(&self, proxy: &[f32], peaks: &[usize]) -> Vec<[f32; 2]> {
        let (p, r, j) = (self.cells.dim(0), self.enc_convs.stride(), self.cfg.proxy_size);
        let m = (p as f64).sqrt().round() as usize;
        let per = proxy.len() / peaks.len();
        let norm = |v: f32| (2.0 * (v + 0.5) / j as f32 - 1.0).clamp(-0.999, 0.999);
        peaks
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                let img = &proxy[i * per..(i + 1) * per];
                let (cy, cx) = (r * (k / m), r * (k % m));
                let (mut sum, mut sy, mut sx) = (0.0f32, 0.0f32, 0.0f32);
                for plane in img.chunks(j * j) {
                    for y in cy.saturating_sub(r)..(cy + r + 1).min(j) {
                        for x in cx.saturating_sub(r)..(cx + r + 1).min(j) {
                            let v = plane[y * j + x];
                            sum += v;
                            sy += v * y as f32;
                            sx += v * x as f32;
                        }
                    }
                }
                if sum > 1e-6 {
                    [norm(sx / sum), norm(sy / sum)]
                } else {
                    [norm(cx as f32), norm(cy as f32)]
                }
            })
            .collect()
    }

    /// `[B, 1, P]`: 0 on the 3x3 cells around each row's peak of `scores`
    /// (`[B, 1, P]`, masked cells included at [`MASKED`]), [`MASKED`]
    /// elsewhere.
    /// Also returns each row's peak cell.
    fn peak_window(&self, scores: &Tensor) -> Result<(Tensor, Vec<usize>)> {
        let p = self.cells.dim(0);
        let m = (p as f64).sqrt().round() as usize;
        let v = scores.to_vec()?;
        let mut out = vec![MASKED; v.len()];
        let mut peaks = Vec::with_capacity(v.len() / p);
        for (row, o) in v.chunks(p).zip(out.chunks_mut(p)) {
            let peak = (0..p).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap_or(0);
            peaks.push(peak);
            let (py, px) = (peak / m, peak % m);
            for y in py.saturating_sub(1)..(py + 2).min(m) {
                for x in px.saturating_sub(1)..(px + 2).min(m) {
                    o[y * m + x] = 0.0;
                }
            }
        }
        Ok((Tensor::from_vec(out, scores.shape(), &scores.device())?, peaks))
    }

    /// Flag the cells whose centres lie inside the glimpse each row of `z`
    /// (`[B, 3]`, the z the crop is taken with) places, `attended` being `[B, P]`.
    /// No gradient flows through this choice.
    fn mark_attended(&self, z: &Tensor, attended: &mut [bool]) -> Result<()> {
        let z = z.to_vec()?;
        let cells = &self.cells_host;
        let p = self.cells.dim(0);
        let [lo, hi] = self.cfg.scale;
        for (zi, flags) in z.chunks(LATENT).zip(attended.chunks_mut(p)) {
            // Saccader::theta's mapping of z to the glimpse, on the host.
            let s = lo + (hi - lo) / (1.0 + (-zi[0]).exp());
            let (tx, ty) = (zi[1].tanh(), zi[2].tanh());
            for (k, flag) in flags.iter_mut().enumerate() {
                *flag |= (cells[k] - tx).abs() <= s && (cells[p + k] - ty).abs() <= s;
            }
        }
        Ok(())
    }

    /// `[B, 1, P]`: [`MASKED`] on `attended` cells, elsewhere `base` (or 0);
    /// nothing is masked in a row whose every cell was attended.
    fn score_mask(
        &self,
        attended: Option<&[bool]>,
        base: Option<&[f32]>,
        b: usize,
        dev: &Device,
    ) -> Result<Tensor> {
        let p = self.cells.dim(0);
        let mut m = base.map_or_else(|| vec![0.0f32; b * p], <[f32]>::to_vec);
        if let Some(attended) = attended {
            for (flags, row) in attended.chunks(p).zip(m.chunks_mut(p)) {
                if flags.iter().all(|&f| f) {
                    continue;
                }
                for (f, v) in flags.iter().zip(row) {
                    if *f {
                        *v = MASKED;
                    }
                }
            }
        }
        Tensor::from_vec(m, &[b, 1, p], dev)
    }

    /// Per image and cell, `ln(ink + 0.001)`: `ink` is the mean of the
    /// proxy (`v`, `[B, C, J, J]` read to the host) over the stride-wide
    /// square of pixels the cell is centred on (see [`cell_centres`]); a
    /// cell a 28-px digit of a 1500² image half fills scores about -3, a
    /// cell without ink [`EMPTY`].
    fn ink_scores(&self, v: &[f32]) -> Vec<f32> {
        let (c, j) = (self.cfg.channels, self.cfg.proxy_size);
        let b = v.len() / (c * j * j);
        let p = self.cells.dim(0);
        let m = (p as f64).sqrt().round() as usize;
        let r = self.enc_convs.stride();
        let span = |k: usize| (r * k).saturating_sub(r / 2)..(r * k + r.div_ceil(2)).min(j);
        let mut out = Vec::with_capacity(b * p);
        for img in v.chunks(c * j * j) {
            for cell in 0..p {
                let (rows, cols) = (span(cell / m), span(cell % m));
                let n = (c * rows.len() * cols.len()).max(1) as f32;
                let mut sum = 0.0f32;
                for plane in img.chunks(j * j) {
                    for y in rows.clone() {
                        sum += plane[y * j + cols.start..y * j + cols.end].iter().sum::<f32>();
                    }
                }
                let ink = sum / n;
                out.push(if ink < NO_INK { EMPTY } else { (ink + 1e-3).ln() });
            }
        }
        out
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
        let target = match self.cfg.decoder_pool {
            1 => g.value(proxy).clone(),
            k => avg_pool2d_forward(g.value(proxy), k, k)?,
        };
        let target = target.reshape(&[b, target.numel() / b])?;
        let (phi_x, keys) = self.encode(g, ps, proxy)?;
        let mut h = g.constant(Tensor::zeros(&[b, self.cfg.hidden], &dev));
        let (mut zs, mut nll_kl, mut kls, mut scores) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut attended = vec![false; b * self.cells.dim(0)];
        // One host read of the proxy serves the prior and the ink centres.
        let pixels = if self.cfg.ink_prior {
            Some(g.value(proxy).to_vec()?)
        } else {
            None
        };
        let ink = pixels.as_deref().map(|v| self.ink_scores(v));
        for t in 0..steps {
            let masked = self.cfg.mask_attended && t > 0;
            let mask = if masked || ink.is_some() {
                Some(self.score_mask(masked.then_some(attended.as_slice()), ink.as_deref(), b, &dev)?)
            } else {
                None
            };
            let xh = g.concat(&[phi_x, h], 1)?;
            let q = self.posterior.forward(g, ps, xh)?;
            let mu_s = g.slice(q, 1, 0, 1)?;
            let (mu_xy, score, peaks) = self.attend(g, ps, keys, h, mask.as_ref(), pixels.as_deref())?;
            scores.push(score);
            let mu_q = g.concat(&[mu_s, mu_xy], 1)?;
            let logvar_q = match self.cfg.fixed_variance {
                Some(v) => g.constant(Tensor::full(&[b, LATENT], v.ln(), &dev)),
                None => g.slice(q, 1, 1, LATENT)?,
            };
            let p = self.prior.forward(g, ps, h)?;
            let mu_p = g.slice(p, 1, 0, LATENT)?;
            let logvar_p = g.slice(p, 1, LATENT, LATENT)?;
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
            if self.cfg.mask_attended && t + 1 < steps {
                self.mark_attended(g.value(z), &mut attended)?;
                // The peak cell too, when the glimpse's box left its centre out.
                let p = self.cells.dim(0);
                for (i, &k) in peaks.iter().enumerate() {
                    attended[i * p + k] = true;
                }
            }
            zs.push(z);
        }
        let per_step = g.stack(&nll_kl, 0)?;
        let elbo_terms = g.mean(per_step, &[0], false)?;
        let kl_steps = g.stack(&kls, 0)?;
        let kl = g.mean(kl_steps, &[0], false)?;
        Ok(VrnnRun {
            z: zs,
            scores,
            elbo_terms,
            kl,
        })
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    fn vrnn(mask: bool) -> Vrnn {
        let cfg = VrnnConfig {
            channels: 1,
            proxy_size: 32,
            enc_width: 4,
            embed: 8,
            hidden: 8,
            fixed_variance: None,
            scale: [0.2, 0.5],
            mask_attended: mask,
            focus: Focus::Mean,
            ink_prior: false,
            decoder_pool: 1,
            summary_pool: 1,
            fixed_query: false,
        };
        Vrnn::new(
            &mut ParamStore::new(),
            cfg,
            &mut StdRng::seed_from_u64(0),
            &Device::cpu(),
        )
    }

    /// Cells sit on the proxy pixels their features are centred on, also for
    /// a proxy side that is not a multiple of the encoder's stride (4): at
    /// J = 30 the last cell is on pixel 28, so attention reaches the edge.
    #[test]
    fn cells_sit_on_their_receptive_field_centres() {
        let mut cfg = vrnn(false).cfg;
        cfg.proxy_size = 30;
        let v = Vrnn::new(
            &mut ParamStore::new(),
            cfg,
            &mut StdRng::seed_from_u64(0),
            &Device::cpu(),
        );
        let c = v.cells.to_vec().unwrap();
        assert_eq!(v.cells.shape(), &[64, 2]);
        let want = |k: usize| (8 * k + 1) as f32 / 30.0 - 1.0;
        for k in 0..8 {
            assert!(
                (c[2 * k] - want(k)).abs() < 1e-6,
                "x of cell {k}: {} vs {}",
                c[2 * k],
                want(k)
            );
            assert!((c[2 * 8 * k + 1] - want(k)).abs() < 1e-6, "y of row {k}");
        }
    }

    /// A glimpse flags exactly the cells whose centres its box holds, and a
    /// row whose every cell is flagged masks nothing.
    #[test]
    fn mask_flags_the_cells_inside_the_glimpse() {
        let v = vrnn(true);
        // Image 0: scale 0.2 (sigmoid(-inf)), centred on (0.5, -0.5);
        // image 1: scale 0.5 at the centre.
        let z = Tensor::from_vec(
            vec![-1e4, 0.5f32.atanh(), (-0.5f32).atanh(), 1e4, 0.0, 0.0],
            &[2, 3],
            &Device::cpu(),
        )
        .unwrap();
        let p = 64;
        let mut attended = vec![false; 2 * p];
        v.mark_attended(&z, &mut attended).unwrap();
        // Cell k is centred at (8k + 1)/32 - 1 per axis.
        let c = |k: usize| (8 * k + 1) as f32 / 32.0 - 1.0;
        for (i, (cx, cy, s)) in [(0.5f32, -0.5f32, 0.2f32), (0.0, 0.0, 0.5)].iter().enumerate() {
            for k in 0..p {
                let inside = (c(k % 8) - cx).abs() <= *s && (c(k / 8) - cy).abs() <= *s;
                assert_eq!(attended[i * p + k], inside, "image {i} cell {k}");
            }
        }
        assert_eq!(attended[..p].iter().filter(|&&f| f).count(), 1);
        assert_eq!(attended[p..].iter().filter(|&&f| f).count(), 16);
        attended[..p].fill(true);
        let m = v
            .score_mask(Some(&attended), None, 2, &Device::cpu())
            .unwrap()
            .to_vec()
            .unwrap();
        assert!(
            m[..p].iter().all(|&x| x == 0.0),
            "a fully attended row masks nothing"
        );
        for k in 0..p {
            assert_eq!(m[p + k] == MASKED, attended[p + k]);
        }
    }

    /// With a fixed query (no dependence on `h`), the unmasked second
    /// glimpse repeats the first; the masked one moves away from it.
    #[test]
    fn masked_glimpses_leave_the_first_box() {
        let dev = Device::cpu();
        let proxy: Vec<f32> = (0..1024).map(|i| ((i * 7) % 13) as f32 / 13.0).collect();
        let proxy = Tensor::from_vec(proxy, &[1, 1, 32, 32], &dev).unwrap();
        let mut steps = Vec::new();
        for mask in [false, true] {
            let mut ps = ParamStore::new();
            let v = Vrnn::new(&mut ps, vrnn(mask).cfg, &mut StdRng::seed_from_u64(0), &dev);
            let f = v.enc_convs.out_channels;
            let q: Vec<f32> = (0..f).map(|i| 3.0 * ((i % 3) as f32 - 1.0)).collect();
            ps.set(v.query.b, Tensor::from_vec(q, &[f], &dev).unwrap())
                .unwrap();
            let mut g = Graph::inference();
            let x = g.constant(proxy.clone());
            let run = v.run(&mut g, &ps, x, 2, None).unwrap();
            let xy = |t: usize| g.value(run.z[t]).to_vec().unwrap()[1..].to_vec();
            steps.push((xy(0), xy(1)));
        }
        let ((a0, a1), (b0, b1)) = (&steps[0], &steps[1]);
        assert_eq!(a0, b0, "the first glimpse is never masked");
        assert!(a0 != &vec![0.0, 0.0], "the query must prefer some cells: {a0:?}");
        assert_eq!(a0, a1, "without the mask the same query picks the same place");
        let moved = (b1[0].tanh() - b0[0].tanh()).hypot(b1[1].tanh() - b0[1].tanh());
        assert!(
            moved > 0.1,
            "the masked second glimpse stayed at {b1:?} (first {b0:?})"
        );
    }

    /// Two equally salient cells far apart: the mean focus puts the glimpse
    /// between them, on neither; the peak focus on one of them.
    #[test]
    fn peak_focus_picks_one_of_two_objects() {
        let dev = Device::cpu();
        // Bright 4x4 squares at proxy pixels (2..6, 2..6) and (24..28, 24..28).
        let mut img = vec![0.0f32; 1024];
        for (y0, x0) in [(2, 2), (24, 24)] {
            for y in y0..y0 + 4 {
                for x in x0..x0 + 4 {
                    img[y * 32 + x] = 1.0;
                }
            }
        }
        let proxy = Tensor::from_vec(img, &[1, 1, 32, 32], &dev).unwrap();
        let mut centres = Vec::new();
        for focus in [Focus::Mean, Focus::Peak] {
            let mut cfg = vrnn(false).cfg;
            cfg.focus = focus;
            cfg.ink_prior = true;
            let mut ps = ParamStore::new();
            let v = Vrnn::new(&mut ps, cfg, &mut StdRng::seed_from_u64(0), &dev);
            let ink = v.ink_scores(&proxy.to_vec().unwrap());
            // Cell (1, 1) sits on pixel (4, 4), inside the first square.
            assert!((ink[9] - 1.001f32.ln()).abs() < 1e-5 && ink[0] == EMPTY);
            let mut g = Graph::inference();
            let x = g.constant(proxy.clone());
            let run = v.run(&mut g, &ps, x, 1, None).unwrap();
            let z = g.value(run.z[0]).to_vec().unwrap();
            centres.push((z[1].tanh(), z[2].tanh()));
        }
        let ((mx, my), (px, py)) = (centres[0], centres[1]);
        // Pixel 4's centre is at 9/32 - 1 = -0.72, pixel 26's at 0.66.
        assert!(mx.abs() < 0.3 && my.abs() < 0.3, "mean focus at ({mx}, {my})");
        let near = |c: f32| (c + 0.72).abs() < 0.15 || (c - 0.66).abs() < 0.15;
        assert!(
            near(px) && near(py) && (px - py).abs() < 0.2,
            "peak focus at ({px}, {py})"
        );
    }
}
