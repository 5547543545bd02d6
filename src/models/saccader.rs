//! Variational saccading (Ramapuram et al.): the VRNN places T glimpses on
//! the proxy, the crops are read from the full-resolution image (never loaded
//! whole when it lives in an `ImageSource`), classified by a
//! fully-convolutional network, and their features are averaged over the T
//! glimpses into one prediction.
//!
//! Loss per sample (paper Eq. 5, negated): `CE + beta * mean_t(NLL_t + KL_t)`,
//! or, with `multiplicative`, the authors' code's `CE * beta * mean_t(...)`.

use std::sync::Arc;

use anyhow::{ensure, Result};
use rand::Rng;

use super::classifier::CropClassifier;
pub use super::vrnn::Focus;
use super::vrnn::{Vrnn, VrnnConfig, LATENT};
use crate::autograd::{Graph, Var};
use crate::data::{ImageSource, TaskSpec, DEFAULT_TASK, MAX_MULTI_LABEL_CLASSES};
use crate::device::Device;
use crate::nn::{Linear, ParamStore};
use crate::ops::elementwise::{unary_forward, Unary};
use crate::ops::loss::softmax;
use crate::ops::sampler::choose_level;
use crate::tensor::Tensor;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SaccadeConfig {
    pub channels: usize,
    pub num_classes: usize,
    pub proxy_size: usize,
    /// Glimpses per image, T.
    pub glimpses: usize,
    /// Crop side L in pixels.
    pub crop: usize,
    /// Glimpse side as a fraction of the image side, `[s_min, s_max]`.
    pub scale_min: f32,
    pub scale_max: f32,
    pub beta: f32,
    pub multiplicative: bool,
    pub fixed_variance: Option<f32>,
    /// Later glimpses attend only to proxy cells no earlier glimpse covered
    /// (absent in checkpoints from before the option: off).
    #[serde(default)]
    pub mask_attended: bool,
    /// Training images during which the classification loss does not move
    /// the glimpses (its gradient into them then ramps up linearly over as
    /// many images again). Absent in older checkpoints: 0, no warmup.
    #[serde(default)]
    pub policy_warmup: usize,
    /// Let the classification loss move the glimpses through the crops (the
    /// sampler's gradient), after `policy_warmup`. Absent in older
    /// checkpoints: on.
    #[serde(default = "yes")]
    pub policy_gradient: bool,
    /// How the T glimpses' features become one (absent in older
    /// checkpoints: the paper's mean).
    #[serde(default)]
    pub glimpse_pool: GlimpsePool,
    /// How attention places each glimpse (absent in older checkpoints: the
    /// mean over all cells).
    #[serde(default)]
    pub focus: Focus,
    /// Add each glimpse's place (`s, tx, ty`, through a dense layer) to its
    /// features before pooling ("what" and "where", as RAM does): tasks
    /// about positions (the highest digit) need it. Absent in older
    /// checkpoints: off.
    #[serde(default)]
    pub glimpse_position: bool,
    /// Start glimpses on ink: see `VrnnConfig::ink_prior` (absent in older
    /// checkpoints: off).
    #[serde(default)]
    pub ink_prior: bool,
    /// The VRNN's decoder reconstructs the proxy average-pooled by this
    /// factor, a divisor of `proxy_size` (absent in older checkpoints: 1).
    #[serde(default = "one")]
    pub decoder_pool: usize,
    /// phi_x reads the proxy's feature map average-pooled by this factor,
    /// a divisor of the map's side (absent in older checkpoints: 1).
    #[serde(default = "one")]
    pub summary_pool: usize,
    /// One learnt query ranks the proxy's cells for every glimpse: see
    /// `VrnnConfig::fixed_query` (absent in older checkpoints: off).
    #[serde(default)]
    pub fixed_query: bool,
    /// Each task pools the glimpses with its own weights: the shared
    /// pooling logits plus a learnt linear score of each glimpse's place
    /// (zero at first), so a task about positions (the highest digit) can
    /// weigh the glimpses by where they are, which a sum of features does
    /// poorly. Needs a weighted pool; absent in older checkpoints: off.
    #[serde(default)]
    pub task_pools: bool,
    pub enc_width: usize,
    pub embed: usize,
    pub hidden: usize,
    pub classifier_width: usize,
    /// The labelling tasks, one head each, when there are several (or one
    /// multi-label task); empty for one single-label task of `num_classes`
    /// classes (and in checkpoints from before multi-task models).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub task_heads: Vec<TaskSpec>,
}

fn one() -> usize {
    1
}

fn yes() -> bool {
    true
}

/// The [`SaccadeConfig::decoder_pool`] for a proxy of side `j`: the largest
/// factor that divides it and leaves at least 32 pixels (the paper's proxy).
pub fn decoder_pool_for(j: usize) -> usize {
    (1..=j / 32).rev().find(|&k| j.is_multiple_of(k)).unwrap_or(1)
}

/// The [`SaccadeConfig::summary_pool`] for a proxy of side `j`: the largest
/// factor that divides the feature map's side and leaves at least 8 cells a
/// side, the paper's 32² proxy's map.
pub fn summary_pool_for(j: usize) -> usize {
    let m = super::vrnn::map_side(j);
    (1..=m / 8).rev().find(|&k| m.is_multiple_of(k)).unwrap_or(1)
}

/// How the crop classifier's features of the T glimpses are pooled.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum GlimpsePool {
    /// The average over glimpses (the paper).
    #[default]
    Mean,
    /// The elementwise maximum: a digit seen by one glimpse is not diluted
    /// by the glimpses that saw clutter.
    Max,
    /// The maximum beside a mean weighted by a softmax over the glimpses'
    /// attention scores (attention MIL, as attention sampling and IPS
    /// aggregate patches): the weights' gradient teaches the scores which
    /// cells hold what the task needs, and the weighted mean counts (three
    /// digits against two). Twice the features.
    Attention,
    /// As `Attention`, plus a linear score of what each glimpse saw (zero at
    /// first) added to its proxy score in the softmax, and the proxy's
    /// scores taught that softmax (a cross-entropy per image): the full
    /// resolution tells the locator which cells were worth a glimpse.
    /// Through the pooling alone, the proxy learnt too little to tell digits
    /// from look-alike noise on megapixel MNIST. (Weights from the crops
    /// alone, uniform at first, diluted the few digits among the noise
    /// glimpses: the classifier learnt nothing in 60k images.)
    Relevance,
}

impl GlimpsePool {
    /// Pools to a weighted mean beside the maximum (twice the features).
    fn weighted(self) -> bool {
        matches!(self, GlimpsePool::Attention | GlimpsePool::Relevance)
    }
}

/// `[T, B, F]` glimpse features to `[B, F]` (`[B, 2F]` for the weighted
/// pools, which weigh by a softmax over `weights`, `[B, T]` logits).
pub fn pool_glimpses(g: &mut Graph, feats: Var, pool: GlimpsePool, weights: Option<Var>) -> Result<Var> {
    let (t_steps, b, f) = (g.shape(feats)[0], g.shape(feats)[1], g.shape(feats)[2]);
    let max = |g: &mut Graph| -> Result<Var> {
        // max(a, b) = b + relu(a - b): the gradient goes to the larger.
        let mut m = g.slice(feats, 0, 0, 1)?;
        for t in 1..t_steps {
            let f_t = g.slice(feats, 0, t, 1)?;
            let d = g.sub(m, f_t)?;
            let d = g.relu(d)?;
            m = g.add(f_t, d)?;
        }
        g.reshape(m, &[b, f])
    };
    match pool {
        GlimpsePool::Mean => g.mean(feats, &[0], false),
        GlimpsePool::Max => max(g),
        GlimpsePool::Attention | GlimpsePool::Relevance => {
            let s = weights.ok_or_else(|| anyhow::anyhow!("{pool:?} pooling needs weights"))?;
            ensure!(
                g.shape(s) == [b, t_steps],
                "weights of shape {:?} for {t_steps} glimpses of {b} images",
                g.shape(s)
            );
            let w = g.softmax(s)?;
            let w = g.reshape(w, &[b, 1, t_steps])?;
            let per_image = g.permute(feats, &[1, 0, 2])?;
            // [B, 1, T] @ [B, T, F]
            let mean = g.matmul(w, per_image)?;
            let mean = g.reshape(mean, &[b, f])?;
            let m = max(g)?;
            g.concat(&[mean, m], 1)
        }
    }
}

impl SaccadeConfig {
    /// The tasks the model's heads answer, in order.
    pub fn tasks(&self) -> Vec<TaskSpec> {
        if self.task_heads.is_empty() {
            let names = (0..self.num_classes).map(|k| k.to_string()).collect();
            vec![TaskSpec::single(DEFAULT_TASK, names)]
        } else {
            self.task_heads.clone()
        }
    }

    /// Defaults sized for a 2-core CPU on 100x100 cluttered MNIST.
    pub fn small(channels: usize, num_classes: usize) -> Self {
        SaccadeConfig {
            channels,
            num_classes,
            proxy_size: 32,
            glimpses: 4,
            // A 50-pixel glimpse read at 24x24 shows a digit at about 13
            // pixels, enough to tell it; against 32x32 a step costs 0.7x as
            // much, so a 15-minute run sees 500k images instead of 400k.
            crop: 24,
            // Larger glimpses than the paper's 0.3: on a 2-core CPU budget the
            // classifier must see digits early for the glimpses to learn at all.
            scale_min: 0.2,
            scale_max: 0.5,
            beta: 0.01,
            multiplicative: false,
            fixed_variance: None,
            mask_attended: true,
            // At initialization a crop with a digit in it raises the loss of
            // a classifier that knows no digits, so the loss's gradient moves
            // the glimpses onto empty background at minimum scale, where it
            // then never learns digits (seed 1: 1.2% of test images covered,
            // 2.75% accuracy after 93k images). The glimpses follow the
            // classifier only once it has learnt something: here after 40k
            // images, fully from 80k.
            policy_warmup: 40_000,
            policy_gradient: true,
            glimpse_pool: GlimpsePool::Mean,
            focus: Focus::Mean,
            glimpse_position: false,
            ink_prior: false,
            decoder_pool: 1,
            summary_pool: 1,
            fixed_query: false,
            task_pools: false,
            enc_width: 16,
            embed: 128,
            hidden: 128,
            classifier_width: 16,
            task_heads: Vec::new(),
        }
    }

    /// The paper's setting (App. 7.6 and the authors' code): 64x64 crops at
    /// up to 30% of the side, T = 4, hidden 256.
    pub fn paper(channels: usize, num_classes: usize) -> Self {
        SaccadeConfig {
            crop: 64,
            scale_min: 0.1,
            scale_max: 0.3,
            enc_width: 32,
            embed: 256,
            hidden: 256,
            classifier_width: 32,
            policy_warmup: 0,
            ..SaccadeConfig::small(channels, num_classes)
        }
    }

    /// Many small objects among look-alike clutter on a large canvas
    /// (megapixel MNIST: 28-px digits on 1500²): ten glimpses of 52-90 px
    /// read at 32², each on the best proxy cell no earlier glimpse covered
    /// (among the cells with ink; one learnt query ranks them), pooled by their attention scores plus a
    /// score of what each saw, which the proxy's scores are taught (see
    /// [`GlimpsePool::Relevance`]), beside a max, with their places, for
    /// tasks about positions.
    pub fn many_objects(channels: usize, num_classes: usize) -> Self {
        SaccadeConfig {
            glimpses: 10,
            crop: 32,
            scale_min: 0.035,
            scale_max: 0.06,
            focus: Focus::Peak,
            glimpse_pool: GlimpsePool::Relevance,
            glimpse_position: true,
            ink_prior: true,
            // The glimpses learn where to go from the relevance pool; once
            // the classification loss moved them too (ramped in over 20k-40k
            // images), every digit was inside a glimpse in 8-18% of the
            // validation images, down from 51% (seed 1; kept off: 61-66%).
            policy_gradient: false,
            policy_warmup: 0,
            // Posterior std 0.003 (2.4 px of 1500²): with the learned
            // variance's initial 18 px the training crops cut the 28-px
            // digits, and one batch's loss did not fall in 50 Adam steps
            // (13.8 -> 11.6; with 0.003: 13.8 -> 8.4).
            fixed_variance: Some(1e-5),
            // A query from the state learnt digits for the first glimpse
            // and noise strokes for the other nine (seed 2: 1.35 of 5 digits
            // seen, 47.7% majority).
            fixed_query: true,
            // `top` at 12 epochs, three seeds, peers' images: 70.9-77.4%
            // with a pool per task against 57.3-59.4% (four seeds) without.
            task_pools: true,
            ..SaccadeConfig::small(channels, num_classes)
        }
    }

    /// Refuse what the model cannot run (or could not allocate), naming the
    /// field and the `saccade train` flag that sets it: checked for new runs
    /// and for every checkpoint loaded.
    pub fn validate(&self) -> Result<()> {
        let within = |name: &str, flag: &str, v: usize, lo: usize, hi: usize| {
            ensure!(
                (lo..=hi).contains(&v),
                "{name} ({flag}) must be within {lo}..={hi}, got {v}"
            );
            Ok(())
        };
        within("channels", "the dataset", self.channels, 1, 64)?;
        within("num_classes", "the dataset", self.num_classes, 1, 100_000)?;
        within("proxy_size", "--proxy-size", self.proxy_size, 1, MAX_PROXY)?;
        within("glimpses", "--glimpses", self.glimpses, 1, 256)?;
        within("crop", "--crop", self.crop, 4, MAX_CROP)?;
        for (name, flag, v) in [
            ("enc_width", "--preset", self.enc_width),
            ("embed", "--preset", self.embed),
            ("hidden", "--preset", self.hidden),
            ("classifier_width", "--classifier-width", self.classifier_width),
        ] {
            within(name, flag, v, 1, 4096)?;
        }
        if !self.task_heads.is_empty() {
            let first = self.task_heads[0].num_classes();
            ensure!(
                first == self.num_classes,
                "the first task has {first} classes, num_classes says {}",
                self.num_classes
            );
        }
        for (i, t) in self.task_heads.iter().enumerate() {
            ensure!(
                !t.class_names.is_empty() && (!t.multi_label || t.num_classes() <= MAX_MULTI_LABEL_CLASSES),
                "task `{}` has {} classes: a task needs at least 1, a multi-label task at most {MAX_MULTI_LABEL_CLASSES}",
                t.name,
                t.num_classes()
            );
            ensure!(
                !self.task_heads[..i].iter().any(|o| o.name == t.name),
                "task `{}` appears twice",
                t.name
            );
        }
        ensure!(
            !self.task_pools || self.glimpse_pool.weighted(),
            "--task-pools weighs glimpses per task: it needs --glimpse-pool attention or relevance, got {:?}",
            self.glimpse_pool
        );
        ensure!(
            self.decoder_pool >= 1 && self.proxy_size.is_multiple_of(self.decoder_pool),
            "decoder_pool must divide the proxy side {}, got {}",
            self.proxy_size,
            self.decoder_pool
        );
        let map = super::vrnn::map_side(self.proxy_size);
        ensure!(
            self.summary_pool >= 1 && map.is_multiple_of(self.summary_pool),
            "summary_pool must divide the proxy's feature map side {map}, got {}",
            self.summary_pool
        );
        ensure!(
            self.scale_min > 0.0 && self.scale_min < self.scale_max && self.scale_max <= 1.0,
            "glimpse scales need 0 < scale_min (--min-scale) < scale_max (--max-scale) <= 1, got {} and {}",
            self.scale_min,
            self.scale_max
        );
        ensure!(
            self.beta.is_finite() && self.beta >= 0.0,
            "beta (--beta) must be finite and >= 0, got {}",
            self.beta
        );
        if let Some(v) = self.fixed_variance {
            ensure!(
                v.is_finite() && v > 0.0,
                "fixed_variance (--fixed-variance) must be positive, got {v}"
            );
        }
        Ok(())
    }
}

/// Bitmask labels (bit `k` = class `k`) as `[B, K]` 0/1 targets.
pub fn multi_hot(labels: &[usize], k: usize, dev: &Device) -> Result<Tensor> {
    let data = labels
        .iter()
        .flat_map(|&l| (0..k).map(move |c| (l >> c & 1) as f32))
        .collect();
    Tensor::from_vec(data, &[labels.len(), k], dev)
}

/// Largest crop side: the paper's is 64; a batch of 32 four-glimpse crops
/// at 1024² already holds 512 MiB.
pub const MAX_CROP: usize = 1024;
/// Largest proxy side (the paper's is 32).
pub const MAX_PROXY: usize = crate::data::spec::MAX_PROXY;

/// Where crops are read from.
pub enum Images<'a> {
    /// The whole batch is in memory, `[B, C, H, W]`: the spatial transformer.
    Resident(&'a Tensor),
    /// One source per sample: the localized spatial transformer.
    Sources(&'a [Arc<dyn ImageSource>]),
}

pub struct Saccader {
    pub cfg: SaccadeConfig,
    pub params: ParamStore,
    vrnn: Vrnn,
    classifier: CropClassifier,
    /// The glimpse's place into its features ([`SaccadeConfig::glimpse_position`]).
    place: Option<Linear>,
    /// A glimpse's features to its pooling score ([`GlimpsePool::Relevance`]).
    relevance: Option<Linear>,
    head1: Linear,
    /// One output layer per task of [`SaccadeConfig::tasks`].
    heads: Vec<Linear>,
    /// Per task, a glimpse's place to a score added to its pooling logit
    /// ([`SaccadeConfig::task_pools`]); empty without.
    task_pools: Vec<Linear>,
    /// How much of the classification loss's gradient reaches the glimpses,
    /// in [0, 1] (see [`SaccadeConfig::policy_warmup`]).
    policy_grad: f32,
}

/// One forward pass.
pub struct Forward {
    /// Per task, `[B, K_task]`.
    pub logits: Vec<Var>,
    /// Per-sample classification loss `[B]`: the sum over tasks of the
    /// softmax cross-entropy, or a multi-label task's summed sigmoid BCE.
    pub ce: Var,
    pub elbo_terms: Var,
    pub kl: Var,
    /// The batch mean of the combined loss, shape `[1]`.
    pub loss: Var,
    /// Glimpse transforms per step, `[B, 2, 3]`.
    pub thetas: Vec<Var>,
    /// The crops, `[T*B, C, L, L]` (step-major).
    pub crops: Var,
}

/// The box a glimpse `[s, tx, ty]` reads, `[x0, y0, x1, y1]` on an image of
/// `width x height` pixels (normalized coordinates run from -1 at the left
/// edge to 1 at the right; the box may reach past the border).
pub fn glimpse_box([s, tx, ty]: [f32; 3], width: f32, height: f32) -> [f32; 4] {
    let at = |v: f32, side: f32| (v + 1.0) / 2.0 * side;
    [
        at(tx - s, width),
        at(ty - s, height),
        at(tx + s, width),
        at(ty + s, height),
    ]
}

impl Forward {
    /// Per sample, per glimpse `[s, tx, ty]`: half-side and centre in
    /// normalized image coordinates (see [`glimpse_box`]).
    pub fn glimpses(&self, g: &Graph) -> Result<Vec<Vec<[f32; 3]>>> {
        let b = g.shape(self.logits[0])[0];
        let mut out = vec![Vec::with_capacity(self.thetas.len()); b];
        for &th in &self.thetas {
            let v = g.value(th).to_vec()?;
            for (i, gl) in out.iter_mut().enumerate() {
                gl.push([v[i * 6], v[i * 6 + 2], v[i * 6 + 5]]);
            }
        }
        Ok(out)
    }
}

impl Saccader {
    pub fn new(cfg: SaccadeConfig, rng: &mut impl Rng, dev: &Device) -> Self {
        let mut ps = ParamStore::new();
        let vrnn = Vrnn::new(
            &mut ps,
            VrnnConfig {
                channels: cfg.channels,
                proxy_size: cfg.proxy_size,
                enc_width: cfg.enc_width,
                embed: cfg.embed,
                hidden: cfg.hidden,
                fixed_variance: cfg.fixed_variance,
                scale: [cfg.scale_min, cfg.scale_max],
                mask_attended: cfg.mask_attended,
                focus: cfg.focus,
                ink_prior: cfg.ink_prior,
                decoder_pool: cfg.decoder_pool,
                summary_pool: cfg.summary_pool,
                fixed_query: cfg.fixed_query,
            },
            rng,
            dev,
        );
        let classifier = CropClassifier::new(&mut ps, cfg.channels, cfg.classifier_width, rng, dev);
        let f = classifier.features();
        // Zero at first: a random place embedding as large as the crop
        // features would decide the max pooling instead of what was seen.
        let place = cfg.glimpse_position.then(|| {
            let l = Linear::new(&mut ps, "place", LATENT, f, rng, dev);
            ps.set(l.w, Tensor::zeros(&[f, LATENT], dev)).expect("same shape");
            ps.set(l.b, Tensor::zeros(&[f], dev)).expect("same shape");
            l
        });
        // Zero at first: every glimpse weighs the same until one proves useful.
        let relevance = (cfg.glimpse_pool == GlimpsePool::Relevance).then(|| {
            let l = Linear::new(&mut ps, "relevance", f, 1, rng, dev);
            ps.set(l.w, Tensor::zeros(&[1, f], dev)).expect("same shape");
            ps.set(l.b, Tensor::zeros(&[1], dev)).expect("same shape");
            l
        });
        // Until `set_progress` says otherwise: all of it, or none when the
        // configuration keeps the classification loss off the glimpses.
        let policy_grad = if cfg.policy_gradient { 1.0 } else { 0.0 };
        let pooled = if cfg.glimpse_pool.weighted() { 2 * f } else { f };
        let head1 = Linear::new(&mut ps, "head.0", pooled, f, rng, dev);
        let tasks = cfg.tasks();
        // A single task keeps the name every earlier checkpoint uses.
        let heads = tasks
            .iter()
            .map(|t| {
                let name = if tasks.len() == 1 {
                    "head.1".to_string()
                } else {
                    format!("head.1.{}", t.name)
                };
                Linear::new(&mut ps, &name, f, t.num_classes(), rng, dev)
            })
            .collect();
        // Made last, so that every other weight is what it is without them;
        // zero at first: every task starts from the shared pooling.
        let task_pools = tasks
            .iter()
            .filter(|_| cfg.task_pools)
            .map(|t| {
                let l = Linear::new(&mut ps, &format!("pool.{}", t.name), LATENT, 1, rng, dev);
                ps.set(l.w, Tensor::zeros(&[1, LATENT], dev)).expect("same shape");
                ps.set(l.b, Tensor::zeros(&[1], dev)).expect("same shape");
                l
            })
            .collect();
        Saccader {
            cfg,
            params: ps,
            vrnn,
            classifier,
            place,
            relevance,
            head1,
            heads,
            task_pools,
            policy_grad,
        }
    }

    /// Where training stands, as training images seen: sets how much of the
    /// classification loss's gradient reaches the glimpses.
    pub fn set_progress(&mut self, images: u64) {
        let w = self.cfg.policy_warmup as f64;
        self.policy_grad = if !self.cfg.policy_gradient {
            0.0
        } else if w > 0.0 {
            (images as f64 / w - 1.0).clamp(0.0, 1.0) as f32
        } else {
            1.0
        };
    }

    /// `theta` with its value unchanged and `policy_grad` times its gradient.
    fn gate_policy(&self, g: &mut Graph, theta: Var) -> Result<Var> {
        let a = self.policy_grad;
        if a >= 1.0 {
            return Ok(theta);
        }
        let fixed = g.constant(g.value(theta).clone());
        if a <= 0.0 {
            return Ok(fixed);
        }
        let moving = g.affine(theta, a, 0.0)?;
        let fixed = g.affine(fixed, 1.0 - a, 0.0)?;
        g.add(moving, fixed)
    }

    /// The device the parameters live on.
    pub fn device(&self) -> Device {
        self.params
            .iter()
            .next()
            .map(|(_, p)| p.value.device())
            .unwrap_or_else(Device::cpu)
    }

    /// z = (z_s, z_x, z_y) to `theta = [[s, 0, tx], [0, s, ty]]` with
    /// `s = s_min + (s_max - s_min) * sigmoid(z_s)` and `tx = tanh(z_x)`
    /// (likewise ty): the glimpse's centre is bounded to the image, so it can
    /// sit on an object at the very edge (the part of the glimpse past the
    /// border reads zeros), and `tanh(z)` is the point the attention chose.
    pub fn theta(&self, g: &mut Graph, z: Var) -> Result<Var> {
        let b = g.shape(z)[0];
        let (lo, hi) = (self.cfg.scale_min, self.cfg.scale_max);
        let zs = g.slice(z, 1, 0, 1)?;
        let zs = g.sigmoid(zs)?;
        let s = g.affine(zs, hi - lo, lo)?;
        let zxy = g.slice(z, 1, 1, 2)?;
        let txy = g.tanh(zxy)?;
        let tx = g.slice(txy, 1, 0, 1)?;
        let ty = g.slice(txy, 1, 1, 1)?;
        let zero = g.constant(Tensor::zeros(&[b, 1], &g.value(z).device()));
        let row0 = g.concat(&[s, zero, tx], 1)?;
        let row1 = g.concat(&[zero, s, ty], 1)?;
        g.stack(&[row0, row1], 1)
    }

    fn crop(&self, g: &mut Graph, images: &Images, theta: Var) -> Result<Var> {
        let l = self.cfg.crop;
        match images {
            Images::Resident(x) => {
                let x = g.constant((*x).clone());
                let grid = g.affine_grid(theta, l, l)?;
                g.grid_sample(x, grid)
            }
            Images::Sources(sources) => {
                // The pyramid level at which the smallest allowed glimpse still
                // spans L pixels: bytes read per crop then do not grow with the
                // image size, and small glimpses keep full detail.
                let level = choose_level(sources[0].as_ref(), self.cfg.scale_min, l);
                g.localized_crop(sources, theta, l, l, level)
            }
        }
    }

    /// Run the model. `rng` draws the posterior noise in training; `None`
    /// evaluates with posterior means.
    pub fn forward(
        &self,
        g: &mut Graph,
        images: &Images,
        proxies: &Tensor,
        targets: &[Vec<usize>],
        rng: Option<&mut dyn rand::RngCore>,
    ) -> Result<Forward> {
        let b = proxies.shape()[0];
        ensure!(
            proxies.shape()[1..] == [self.cfg.channels, self.cfg.proxy_size, self.cfg.proxy_size],
            "proxies have shape {:?}, the model expects [batch, {}, {}, {}]",
            proxies.shape(),
            self.cfg.channels,
            self.cfg.proxy_size,
            self.cfg.proxy_size
        );
        let tasks = self.cfg.tasks();
        ensure!(
            targets.len() == tasks.len() && targets.iter().all(|t| t.len() == b),
            "labels for {} tasks of a batch of {b} given, the model has {} tasks",
            targets.len(),
            tasks.len()
        );
        let dev = proxies.device();
        let ps = &self.params;
        let t_steps = self.cfg.glimpses;
        let noise: Option<Vec<Tensor>> = rng.map(|mut r| {
            (0..t_steps)
                .map(|_| Tensor::randn(&[b, LATENT], 1.0, &mut r, &dev))
                .collect()
        });
        let proxy = g.constant(proxies.clone());
        let run = self.vrnn.run(g, ps, proxy, t_steps, noise.as_deref())?;
        let mut thetas = Vec::with_capacity(t_steps);
        let mut crops = Vec::with_capacity(t_steps);
        for &z in &run.z {
            let theta = self.theta(g, z)?;
            let gated = self.gate_policy(g, theta)?;
            crops.push(self.crop(g, images, gated)?);
            thetas.push(theta);
        }
        // All T*B crops through the classifier in one batch.
        let crops = g.concat(&crops, 0)?;
        let feats = self.classifier.forward(g, ps, crops)?;
        let f = g.shape(feats)[1];
        // What each glimpse saw, scored: `[B, T]`.
        let relevance = match &self.relevance {
            Some(r) => {
                let c = r.forward(g, ps, feats)?;
                let c = g.reshape(c, &[t_steps, b])?;
                Some(g.permute(c, &[1, 0])?)
            }
            None => None,
        };
        let mut feats = g.reshape(feats, &[t_steps, b, f])?;
        // tanh(z), `[T*B, 3]`: the centre itself and a bounded form of the
        // scale. Detached: the place informs the heads, it is not a second
        // route for the loss to move the glimpses by.
        let places = if self.place.is_some() || !self.task_pools.is_empty() {
            let z = g.concat(&run.z, 0)?;
            Some(g.constant(unary_forward(g.value(z), Unary::Tanh)?))
        } else {
            None
        };
        if let (Some(place), Some(z)) = (&self.place, places) {
            let p = place.forward(g, ps, z)?;
            let p = g.tanh(p)?;
            let p = g.reshape(p, &[t_steps, b, f])?;
            feats = g.add(feats, p)?;
        }
        let proxy_scores = g.concat(&run.scores, 1)?;
        // Relevance: the crops' scores join the proxy's, which are taught
        // the softmax of the sum (a fixed target: the proxy learns from the
        // crops, not the crops' scores from the proxy).
        let (weights, target) = match relevance {
            Some(c) => {
                let w = g.add(proxy_scores, c)?;
                (Some(w), Some(softmax(g.value(w))?))
            }
            None => (
                (self.cfg.glimpse_pool == GlimpsePool::Attention).then_some(proxy_scores),
                None,
            ),
        };
        let shared = if self.task_pools.is_empty() {
            let pooled = pool_glimpses(g, feats, self.cfg.glimpse_pool, weights)?;
            let h = self.head1.forward(g, ps, pooled)?;
            Some(g.elu(h)?)
        } else {
            None
        };
        let mut logits = Vec::with_capacity(tasks.len());
        let mut ce: Option<Var> = None;
        for (i, ((task, head), labels)) in tasks.iter().zip(&self.heads).zip(targets).enumerate() {
            let h = match shared {
                Some(h) => h,
                None => {
                    let z = places.expect("places are made whenever there are task pools");
                    let s = self.task_pools[i].forward(g, ps, z)?;
                    let s = g.reshape(s, &[t_steps, b])?;
                    let s = g.permute(s, &[1, 0])?;
                    let w = weights.expect("task pools need a weighted pool (validated)");
                    let w = g.add(w, s)?;
                    let pooled = pool_glimpses(g, feats, self.cfg.glimpse_pool, Some(w))?;
                    let h = self.head1.forward(g, ps, pooled)?;
                    g.elu(h)?
                }
            };
            let l = head.forward(g, ps, h)?;
            let loss = if task.multi_label {
                let target = multi_hot(labels, task.num_classes(), &dev)?;
                g.bce_with_logits(l, &target)?
            } else {
                g.softmax_cross_entropy(l, labels)?
            };
            ce = Some(match ce {
                Some(sum) => g.add(sum, loss)?,
                None => loss,
            });
            logits.push(l);
        }
        let ce = ce.expect("a model has at least one task");
        let scaled = g.affine(run.elbo_terms, self.cfg.beta, 0.0)?;
        let mut per_sample = if self.cfg.multiplicative {
            g.mul(ce, scaled)?
        } else {
            g.add(ce, scaled)?
        };
        if let Some(target) = target {
            let distill = soft_cross_entropy(g, proxy_scores, &target)?;
            per_sample = g.add(per_sample, distill)?;
        }
        let loss = g.mean_all(per_sample)?;
        Ok(Forward {
            logits,
            ce,
            elbo_terms: run.elbo_terms,
            kl: run.kl,
            loss,
            thetas,
            crops,
        })
    }
}

/// Per row, `-sum_k p_k ln softmax(x)_k` of logits `x` `[N, K]` against
/// fixed probabilities `p` (rows summing to 1): `lse(x) - <p, x>`, with
/// `lse(x) = CE(x, class 0) + x_0` from the fused cross-entropy.
fn soft_cross_entropy(g: &mut Graph, logits: Var, probs: &Tensor) -> Result<Var> {
    let n = g.shape(logits)[0];
    let lse = g.softmax_cross_entropy(logits, &vec![0; n])?;
    let x0 = g.slice(logits, 1, 0, 1)?;
    let x0 = g.reshape(x0, &[n])?;
    let lse = g.add(lse, x0)?;
    let p = g.constant(probs.clone());
    let px = g.mul(p, logits)?;
    let px = g.sum(px, &[1], false)?;
    g.sub(lse, px)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Max pooling gives the elementwise maximum over glimpses and sends each
    /// feature's gradient to the glimpse that holds it; mean pooling averages.
    #[test]
    fn glimpse_pooling_values_and_gradients() {
        let dev = Device::cpu();
        // [T = 3, B = 1, F = 2]
        let x = Tensor::from_vec(vec![1.0, -2.0, 3.0, -5.0, 2.0, -1.0], &[3, 1, 2], &dev).unwrap();
        let run = |pool| {
            let mut g = Graph::new();
            let v = g.leaf(x.clone());
            let p = pool_glimpses(&mut g, v, pool, None).unwrap();
            let w = g.constant(Tensor::from_vec(vec![1.0, 10.0], &[1, 2], &dev).unwrap());
            let y = g.mul(p, w).unwrap();
            let loss = g.sum_all(y).unwrap();
            let grads = g.backward(loss).unwrap();
            (
                g.value(p).to_vec().unwrap(),
                grads.get(v).unwrap().to_vec().unwrap(),
            )
        };
        let (max, gmax) = run(GlimpsePool::Max);
        assert_eq!(max, vec![3.0, -1.0]);
        assert_eq!(gmax, vec![0.0, 0.0, 1.0, 0.0, 0.0, 10.0]);
        let (mean, gmean) = run(GlimpsePool::Mean);
        assert_eq!(mean, vec![2.0, -8.0 / 3.0]);
        let third = 1.0 / 3.0;
        assert_eq!(
            gmean,
            vec![third, 10.0 * third, third, 10.0 * third, third, 10.0 * third]
        );
    }

    /// The soft cross-entropy against hand values, and its gradient
    /// `softmax(x) - p`.
    #[test]
    fn soft_cross_entropy_value_and_gradient() {
        let dev = Device::cpu();
        let x = Tensor::from_vec(vec![1.0, 2.0, 0.5, -1.0, 0.0, 3.0], &[2, 3], &dev).unwrap();
        let p = Tensor::from_vec(vec![0.2, 0.5, 0.3, 1.0, 0.0, 0.0], &[2, 3], &dev).unwrap();
        let mut g = Graph::new();
        let v = g.leaf(x.clone());
        let l = soft_cross_entropy(&mut g, v, &p).unwrap();
        let total = g.sum_all(l).unwrap();
        let grads = g.backward(total).unwrap();
        let (xs, ps) = (x.to_vec().unwrap(), p.to_vec().unwrap());
        let got = g.value(l).to_vec().unwrap();
        let grad = grads.get(v).unwrap().to_vec().unwrap();
        for r in 0..2 {
            let row = &xs[r * 3..r * 3 + 3];
            let lse = row.iter().map(|a| a.exp()).sum::<f32>().ln();
            let want: f32 = (0..3).map(|k| -ps[r * 3 + k] * (row[k] - lse)).sum();
            assert!((got[r] - want).abs() < 1e-5, "row {r}: {} vs {want}", got[r]);
            for k in 0..3 {
                let d = (row[k] - lse).exp() - ps[r * 3 + k];
                assert!((grad[r * 3 + k] - d).abs() < 1e-5, "grad {r},{k}");
            }
        }
    }
}
