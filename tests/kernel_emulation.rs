//! The CUDA launchers run on the CPU, against the engine's CPU reference ops.
//!
//! No machine we develop on has a GPU, so kernels and launchers are written
//! blind and `cuda_parity.rs` skips. Here g++ compiles every file of
//! `KERNEL_FILES` as C++ with a small emulation of CUDA (tests/emulation/:
//! `cuda_emu.h` maps the keywords and built-ins, `cuda_emu.cpp` runs the
//! threads of a block as fibers switching at barriers, `mod.rs` builds, loads
//! and launches), and installs it as the launcher of an emulated
//! `CudaDevice` (src/device/launch.rs). Each test puts random inputs on that
//! device, calls the engine's public ops, whose real launchers (`mod cuda` in
//! src/ops/*.rs, src/optim.rs) compute grids, chunks and arguments and
//! launch through the one seam every GPU launch takes, and compares with the
//! same ops on the CPU within 1e-4 relative. Emulated memory starts as NaN,
//! so an output a kernel skips fails. The emulation also fails a launch
//! whose argument types do not match the kernel's parameters, that exceeds a
//! GPU's limits, that writes outside a buffer, or whose barriers not every
//! thread reaches (see the `emulator_*` tests). Without g++ every test
//! prints "skipped: g++ not found" and passes.
//!
//! What it cannot show: speed, warp-level timing, memory coalescing, and
//! whether NVRTC accepts the file (`saccade kernels check` does that).
//!
//! # Adding a test for a new kernel
//!
//! 1. The kernel is `extern "C" __global__ void name(...)` in a file listed in
//!    `KERNEL_FILES` (src/device/cuda.rs), launched by its op's `mod cuda`
//!    with `launch!`; nothing else is needed to build it.
//! 2. Write a `#[test]` here that runs the op on both devices:
//!    ```ignore
//!    let Some(gpu) = Emulated::get() else { return };
//!    let x = randn(&[3, 7], 1);                            // CPU inputs
//!    let want = my_op_forward(&x).unwrap();                // the CPU reference
//!    let got = my_op_forward(&gpu.put(&x)).unwrap();       // the launcher, emulated
//!    check("my_op", &got, &want);
//!    gpu.assert_launched(&["myfile::my_kernel"]);
//!    ```
//!    Small sizes keep the test fast; odd ones (not multiples of the block
//!    or tile) find the edge bugs; make sure every branch of the launcher
//!    runs (the assertion on launched kernels shows that each kernel did).
//! 3. `cargo test --release --test kernel_emulation`. A g++ error names the
//!    line in kernels/<file>.cu; a CUDA built-in the emulation lacks shows as
//!    an undeclared identifier and is added to tests/emulation/cuda_emu.h.
//!
//! `every_kernel_has_an_emulation_test` fails, naming the kernel, while no
//! test asserts that `"file::kernel"` was launched.

mod emulation;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use cudarc::driver::LaunchConfig;
use emulation::{assert_close, poisoned, read, value, write, Emu};
use saccade::device::cuda::{grid, CudaDevice, KERNEL_FILES};
use saccade::gradcheck::{rand_tensor, rng};
use saccade::{Device, Gradients, Graph, Tensor};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    rand_tensor(shape, seed, &Device::cpu())
}

fn uniform(shape: &[usize], lo: f32, hi: f32, seed: u64) -> Tensor {
    Tensor::uniform(shape, lo, hi, &mut rng(seed), &Device::cpu())
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.to_vec().unwrap()
}

/// An emulated GPU, and every kernel launched on it as `"file::kernel"`.
struct Emulated {
    dev: Device,
    launched: Arc<Mutex<BTreeSet<String>>>,
}

impl Emulated {
    /// None (after saying so) without g++.
    fn get() -> Option<Emulated> {
        let (dev, launched) = Emu::get()?.device();
        Some(Emulated { dev, launched })
    }

    fn cuda(&self) -> &CudaDevice {
        match &self.dev {
            Device::Cuda(d) => d,
            Device::Cpu(_) => unreachable!("an emulated device is a CUDA device"),
        }
    }

    /// `t` copied onto the emulated device.
    fn put(&self, t: &Tensor) -> Tensor {
        t.to_device(&self.dev).unwrap()
    }

    #[track_caller]
    fn assert_launched(&self, kernels: &[&str]) {
        let launched = self.launched.lock().unwrap();
        let missing: Vec<&&str> = kernels.iter().filter(|k| !launched.contains(**k)).collect();
        assert!(
            missing.is_empty(),
            "not launched: {missing:?}; launched: {launched:?}"
        );
    }
}

/// `got`, from the emulated device, against `want`, from the CPU: shapes,
/// and values within 1e-4 relative.
#[track_caller]
fn check(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    assert!(
        matches!(got.device(), Device::Cuda(_)),
        "{what}: not computed on the device"
    );
    assert_close(what, &vals(got), &vals(want));
}

/// Sizes of the one-dimensional kernels: one block, a partial one, several.
const SIZES: &[usize] = &[1, 7, 256, 257, 1000];

// ---- elementwise.cu --------------------------------------------------------

use saccade::ops::elementwise::{
    binary_backward, binary_forward, unary_backward, unary_forward, Binary, Unary,
};

#[test]
fn elementwise_fill() {
    let Some(gpu) = Emulated::get() else { return };
    for &n in SIZES {
        let want = Tensor::full(&[n], -2.5, &Device::cpu());
        check("fill", &Tensor::full(&[n], -2.5, &gpu.dev), &want);
    }
    gpu.assert_launched(&["elementwise::fill"]);
}

#[test]
fn elementwise_unary_forward_and_backward() {
    let Some(gpu) = Emulated::get() else { return };
    let ops = [
        (Unary::Relu, -3.0, 3.0),
        (Unary::Elu(0.7), -4.0, 2.0),
        (Unary::Selu, -4.0, 2.0),
        (Unary::Sigmoid, -30.0, 30.0),
        (Unary::Tanh, -4.0, 4.0),
        (Unary::Softplus, -30.0, 30.0),
        (Unary::Exp, -5.0, 5.0),
        (Unary::Log, 0.05, 5.0),
        (Unary::Affine(-1.5, 0.25), -3.0, 3.0),
    ];
    for (k, &(op, lo, hi)) in ops.iter().enumerate() {
        for &n in &[7, 1000] {
            let x = uniform(&[n], lo, hi, k as u64);
            let gy = randn(&[n], 100 + k as u64);
            let y = unary_forward(&x, op).unwrap();
            let (xd, gyd) = (gpu.put(&x), gpu.put(&gy));
            let yd = unary_forward(&xd, op).unwrap();
            check(&format!("{op:?} forward"), &yd, &y);
            let gx = unary_backward(&xd, &yd, &gyd, op).unwrap();
            check(
                &format!("{op:?} backward"),
                &gx,
                &unary_backward(&x, &y, &gy, op).unwrap(),
            );
        }
    }
    gpu.assert_launched(&["elementwise::unary_forward", "elementwise::unary_backward"]);
}

#[test]
fn elementwise_binary_broadcasting_forward_and_backward() {
    let Some(gpu) = Emulated::get() else { return };
    let pairs: [(&[usize], &[usize]); 7] = [
        (&[2, 3, 4], &[2, 3, 4]),
        (&[2, 3, 4], &[4]),
        (&[2, 1, 4], &[3, 1]),
        (&[1], &[2, 3]),
        (&[2, 3, 5, 5], &[1, 3, 1, 1]),
        (&[300], &[1]),
        (&[3, 1, 2, 1, 2, 1, 2, 3], &[2, 1, 2, 1, 2, 1]),
    ];
    for op in [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div] {
        for (i, &(sa, sb)) in pairs.iter().enumerate() {
            let a = randn(sa, i as u64);
            let b = uniform(sb, 0.5, 2.0, 50 + i as u64);
            let (ad, bd) = (gpu.put(&a), gpu.put(&b));
            let want = binary_forward(&a, &b, op).unwrap();
            let what = format!("{op:?} {sa:?} {sb:?}");
            check(&what, &binary_forward(&ad, &bd, op).unwrap(), &want);
            let gy = randn(want.shape(), 80 + i as u64);
            let (ga, gb) = binary_backward(&a, &b, &gy, op).unwrap();
            let (gad, gbd) = binary_backward(&ad, &bd, &gpu.put(&gy), op).unwrap();
            check(&format!("{what} backward a"), &gad, &ga);
            check(&format!("{what} backward b"), &gbd, &gb);
        }
    }
    gpu.assert_launched(&["elementwise::binary_forward"]);
}

// ---- reduce.cu -------------------------------------------------------------

use saccade::ops::reduce::sum_forward;

#[test]
fn reduce_sum_and_mean_with_both_kernels() {
    let Some(gpu) = Emulated::get() else { return };
    // The launcher takes a block per output for few outputs of long sums
    // ([2, 300, 3] axis 1, [1000, 2] axis 0), else a thread per output.
    let cases: [(&[usize], usize); 6] = [
        (&[5, 7], 0),
        (&[5, 7], 1),
        (&[3, 5, 17], 1),
        (&[2, 300, 3], 1),
        (&[1000, 2], 0),
        (&[1, 1], 0),
    ];
    for (i, &(shape, axis)) in cases.iter().enumerate() {
        let x = randn(shape, i as u64);
        let what = format!("{shape:?} axis {axis}");
        let want = sum_forward(&x, &[axis], true).unwrap();
        check(
            &format!("sum {what}"),
            &sum_forward(&gpu.put(&x), &[axis], true).unwrap(),
            &want,
        );
        // Graph::mean is the sum followed by the affine unary map.
        let mean = |x: Tensor| {
            let mut g = Graph::new();
            let v = g.leaf(x);
            let m = g.mean(v, &[axis], true).unwrap();
            g.value(m).clone()
        };
        check(&format!("mean {what}"), &mean(gpu.put(&x)), &mean(x));
    }
    gpu.assert_launched(&["reduce::sum_axis", "reduce::sum_axis_block"]);
}

// ---- shape.cu --------------------------------------------------------------

use saccade::ops::shape::{concat_forward, permute_forward, slice_forward};

#[test]
fn shape_concat_slice_and_permute() {
    let Some(gpu) = Emulated::get() else { return };
    for axis in 0..3 {
        let mut sb = vec![2, 3, 4];
        sb[axis] = 5;
        let (a, b) = (randn(&[2, 3, 4], 1), randn(&sb, 2));
        let want = concat_forward(&[&a, &b], axis).unwrap();
        let got = concat_forward(&[&gpu.put(&a), &gpu.put(&b)], axis).unwrap();
        check(&format!("concat axis {axis}"), &got, &want);
        let (start, len) = (1, 3);
        check(
            &format!("slice axis {axis}"),
            &slice_forward(&got, axis, start, len).unwrap(),
            &slice_forward(&want, axis, start, len).unwrap(),
        );
    }
    let cases: [(&[usize], &[usize]); 4] = [
        (&[5, 7], &[1, 0]),
        (&[2, 3, 4], &[2, 0, 1]),
        (&[2, 3, 4, 5], &[0, 2, 1, 3]),
        (&[3, 1, 4, 2, 3], &[4, 3, 2, 1, 0]),
    ];
    for (i, &(shape, perm)) in cases.iter().enumerate() {
        let x = randn(shape, i as u64);
        check(
            &format!("permute {shape:?} {perm:?}"),
            &permute_forward(&gpu.put(&x), perm).unwrap(),
            &permute_forward(&x, perm).unwrap(),
        );
    }
    gpu.assert_launched(&["shape::copy_into", "shape::copy_from", "shape::permute"]);
}

// ---- matmul.cu -------------------------------------------------------------

use saccade::ops::linear::{linear_backward, linear_forward, matmul_backward, matmul_forward};

/// Sizes `(m, n, k)`: odd ones across the 64x64 tile, one element, exact tiles.
const GEMMS: [(usize, usize, usize); 5] = [(67, 45, 33), (1, 1, 1), (64, 64, 16), (5, 130, 17), (129, 3, 70)];

#[test]
fn matmul_batched_and_shared_forward_and_backward() {
    let Some(gpu) = Emulated::get() else { return };
    for (i, &(m, n, k)) in GEMMS.iter().enumerate() {
        // b shared by the batch (stride 0; its gradient stacks the batch into
        // the reduction) or one per batch entry; a with and without a batch.
        for (sa, sb) in [
            (vec![m, k], vec![k, n]),
            (vec![3, m, k], vec![k, n]),
            (vec![2, m, k], vec![2, k, n]),
        ] {
            let seed = 10 * i as u64;
            let (a, b) = (randn(&sa, seed), randn(&sb, seed + 1));
            let (ad, bd) = (gpu.put(&a), gpu.put(&b));
            let what = format!("matmul {sa:?} x {sb:?}");
            let y = matmul_forward(&a, &b).unwrap();
            check(&what, &matmul_forward(&ad, &bd).unwrap(), &y);
            let g = randn(y.shape(), seed + 2);
            let (da, db) = matmul_backward(&a, &b, &g).unwrap();
            let (dad, dbd) = matmul_backward(&ad, &bd, &gpu.put(&g)).unwrap();
            check(&format!("{what} da"), &dad, &da);
            check(&format!("{what} db"), &dbd, &db);
        }
    }
    gpu.assert_launched(&["matmul::sgemm"]);
}

#[test]
fn matmul_linear_with_and_without_bias() {
    let Some(gpu) = Emulated::get() else { return };
    for (i, &(nb, fout, fin)) in GEMMS.iter().enumerate() {
        let seed = 10 * i as u64;
        let (x, w, b) = (
            randn(&[nb, fin], seed),
            randn(&[fout, fin], seed + 1),
            randn(&[fout], seed + 2),
        );
        let (xd, wd, bd) = (gpu.put(&x), gpu.put(&w), gpu.put(&b));
        let what = format!("linear [{nb}, {fin}] -> {fout}");
        // With a bias the product accumulates onto it, broadcast to the rows.
        check(
            &what,
            &linear_forward(&xd, &wd, Some(&bd)).unwrap(),
            &linear_forward(&x, &w, Some(&b)).unwrap(),
        );
        check(
            &format!("{what} no bias"),
            &linear_forward(&xd, &wd, None).unwrap(),
            &linear_forward(&x, &w, None).unwrap(),
        );
        let g = randn(&[nb, fout], seed + 3);
        let want = linear_backward(&x, &w, &g).unwrap();
        let got = linear_backward(&xd, &wd, &gpu.put(&g)).unwrap();
        check(&format!("{what} dx"), &got.0, &want.0);
        check(&format!("{what} dw"), &got.1, &want.1);
        check(&format!("{what} db"), &got.2, &want.2);
    }
    gpu.assert_launched(&["matmul::sgemm", "shape::broadcast_rows", "reduce::sum_axis"]);
}

// ---- optim.cu --------------------------------------------------------------

use saccade::optim::{adam_update, clip_by_norm, clip_by_value, AdamConfig};

#[test]
fn optim_adam() {
    let Some(gpu) = Emulated::get() else { return };
    let c = AdamConfig {
        lr: 0.01,
        weight_decay: 0.1,
        ..Default::default()
    };
    for (i, &n) in SIZES.iter().enumerate() {
        let seed = 10 * i as u64;
        let (p, g, m) = (randn(&[n], seed), randn(&[n], seed + 1), randn(&[n], seed + 2));
        let v = uniform(&[n], 0.0, 1.0, seed + 3);
        let want = adam_update(&p, &g, &m, &v, &c, 3).unwrap();
        let [pd, gd, md, vd] = [&p, &g, &m, &v].map(|t| gpu.put(t));
        let got = adam_update(&pd, &gd, &md, &vd, &c, 3).unwrap();
        check("adam param", &got.0, &want.0);
        check("adam m", &got.1, &want.1);
        check("adam v", &got.2, &want.2);
    }
    gpu.assert_launched(&["optim::adam"]);
}

/// Parameter gradients equal to `values` (those of `sum(w_i * values_i)`),
/// on the values' device.
fn gradients(values: &[Tensor]) -> (Gradients, Vec<saccade::nn::ParamId>) {
    let mut g = Graph::new();
    let mut ps = saccade::nn::ParamStore::new();
    let mut ids = Vec::new();
    let mut loss = None;
    for (i, v) in values.iter().enumerate() {
        let id = ps.add(
            &format!("w{i}"),
            randn(v.shape(), 99).to_device(&v.device()).unwrap(),
        );
        let w = ps.var(&mut g, id);
        let c = g.constant(v.clone());
        let y = g.mul(w, c).unwrap();
        let s = g.sum_all(y).unwrap();
        loss = Some(match loss {
            None => s,
            Some(l) => g.add(l, s).unwrap(),
        });
        ids.push(id);
    }
    (g.backward(loss.unwrap()).unwrap(), ids)
}

#[test]
fn optim_clip_by_value_and_by_norm() {
    let Some(gpu) = Emulated::get() else { return };
    // 300 000 elements need more than the 1024 blocks `sum_squares` is given,
    // so its grid-stride loop must cover the rest.
    let sizes = SIZES.iter().copied().chain([300_000]);
    let tensors: Vec<Tensor> = sizes.map(|n| randn(&[n], n as u64)).collect();
    let on_gpu: Vec<Tensor> = tensors.iter().map(|t| gpu.put(t)).collect();
    let (mut want, ids) = gradients(&tensors);
    let (mut got, _) = gradients(&on_gpu);
    clip_by_value(&mut want, 0.8).unwrap();
    clip_by_value(&mut got, 0.8).unwrap();
    for id in &ids {
        check("clip_by_value", got.param(*id).unwrap(), want.param(*id).unwrap());
    }
    let (mut want, _) = gradients(&tensors);
    let (mut got, _) = gradients(&on_gpu);
    let norm = clip_by_norm(&mut want, 1.0).unwrap();
    assert_close("global norm", &[clip_by_norm(&mut got, 1.0).unwrap()], &[norm]);
    for id in &ids {
        check("clip_by_norm", got.param(*id).unwrap(), want.param(*id).unwrap());
    }
    gpu.assert_launched(&["optim::clamp", "optim::sum_squares"]);
}

// ---- gaussian.cu -----------------------------------------------------------

use saccade::ops::gaussian::{
    kl_diag_gaussians_backward, kl_diag_gaussians_forward, reparameterize_backward, reparameterize_forward,
};

#[test]
fn gaussian_reparameterize_and_kl() {
    let Some(gpu) = Emulated::get() else { return };
    for (i, &(rows, d)) in [(1, 1), (4, 3), (7, 33), (300, 2)].iter().enumerate() {
        let seed = 10 * i as u64;
        let shape = [rows, d];
        let (mq, mp) = (randn(&shape, seed), randn(&shape, seed + 1));
        let (lq, lp) = (
            uniform(&shape, -2.0, 2.0, seed + 2),
            uniform(&shape, -2.0, 2.0, seed + 3),
        );
        let (eps, g, gk) = (
            randn(&shape, seed + 4),
            randn(&shape, seed + 5),
            randn(&[rows], seed + 6),
        );
        let [mqd, lqd, mpd, lpd, epsd, gd, gkd] = [&mq, &lq, &mp, &lp, &eps, &g, &gk].map(|t| gpu.put(t));
        let what = format!("[{rows}, {d}]");
        check(
            &format!("reparameterize {what}"),
            &reparameterize_forward(&mqd, &lqd, &epsd).unwrap(),
            &reparameterize_forward(&mq, &lq, &eps).unwrap(),
        );
        let want = reparameterize_backward(&lq, &eps, &g).unwrap();
        let got = reparameterize_backward(&lqd, &epsd, &gd).unwrap();
        check(&format!("reparameterize_backward dmu {what}"), &got.0, &want.0);
        check(
            &format!("reparameterize_backward dlogvar {what}"),
            &got.1,
            &want.1,
        );
        check(
            &format!("kl_diag {what}"),
            &kl_diag_gaussians_forward(&mqd, &lqd, &mpd, &lpd).unwrap(),
            &kl_diag_gaussians_forward(&mq, &lq, &mp, &lp).unwrap(),
        );
        let want = kl_diag_gaussians_backward(&mq, &lq, &mp, &lp, &gk).unwrap();
        let got = kl_diag_gaussians_backward(&mqd, &lqd, &mpd, &lpd, &gkd).unwrap();
        for (k, name) in ["mu_q", "logvar_q", "mu_p", "logvar_p"].iter().enumerate() {
            check(&format!("kl_diag_backward d{name} {what}"), &got[k], &want[k]);
        }
    }
    gpu.assert_launched(&[
        "gaussian::reparameterize",
        "gaussian::reparameterize_backward",
        "gaussian::kl_diag",
        "gaussian::kl_diag_backward",
    ]);
}

// ---- sampler.cu ------------------------------------------------------------

use saccade::data::{ImageSource, InMemoryImage};
use saccade::ops::sampler::{
    affine_grid_backward, affine_grid_forward, grid_sample_backward, grid_sample_forward,
    localized_crop_backward, localized_crop_forward,
};

/// `n` thetas `[n, 2, 3]`, cycling from `first` through: inside the image,
/// crossing its right and top borders, larger than it (crossing all four),
/// wholly outside; each jittered a little.
fn sampler_thetas(n: usize, first: usize, seed: u64) -> Tensor {
    const KINDS: [[f32; 6]; 4] = [
        [0.4, 0.1, -0.2, -0.05, 0.5, 0.1],
        [0.6, -0.3, 0.7, 0.25, 0.5, -0.8],
        [1.3, 0.2, 0.0, -0.1, 1.2, 0.05],
        [0.2, 0.0, 1.6, 0.0, 0.3, -0.1],
    ];
    let jitter = vals(&uniform(&[n * 6], -0.05, 0.05, seed));
    let t = (0..n)
        .flat_map(|i| KINDS[(first + i) % 4])
        .zip(jitter)
        .map(|(t, j)| t + j)
        .collect();
    Tensor::from_vec(t, &[n, 2, 3], &Device::cpu()).unwrap()
}

#[test]
fn sampler_affine_grid_and_backward() {
    let Some(gpu) = Emulated::get() else { return };
    // An empty batch launches no affine_grid_backward (a grid of 0 blocks fails).
    for (k, &(n, oh, ow)) in [(1, 1, 1), (4, 5, 7), (3, 32, 32), (2, 17, 3), (0, 2, 2)]
        .iter()
        .enumerate()
    {
        let seed = 10 * k as u64;
        let theta = sampler_thetas(n, k, seed);
        let what = format!("n={n} {oh}x{ow}");
        let grid = affine_grid_forward(&gpu.put(&theta), oh, ow).unwrap();
        check(
            &format!("affine_grid {what}"),
            &grid,
            &affine_grid_forward(&theta, oh, ow).unwrap(),
        );
        let gg = randn(&[n, oh, ow, 2], seed + 1);
        check(
            &format!("affine_grid_backward {what}"),
            &affine_grid_backward(&gpu.put(&gg)).unwrap(),
            &affine_grid_backward(&gg).unwrap(),
        );
    }
    gpu.assert_launched(&["sampler::affine_grid", "sampler::affine_grid_backward"]);
}

#[test]
fn sampler_grid_sample_forward_and_backward() {
    let Some(gpu) = Emulated::get() else { return };
    let shapes = [
        (1, 1, 9, 7, 1, 1),
        (2, 3, 37, 53, 5, 7),
        (4, 2, 9, 7, 32, 32),
        (3, 1, 37, 53, 32, 32),
    ];
    for (k, &(n, c, h, w, oh, ow)) in shapes.iter().enumerate() {
        let seed = 100 + 10 * k as u64;
        let img = randn(&[n, c, h, w], seed);
        let gout = randn(&[n, c, oh, ow], seed + 1);
        // The grid of thetas, and random points around the image with two
        // far off (the kernel clamps them before its integer casts).
        let mut random = vals(&uniform(&[n, oh, ow, 2], -1.3, 1.3, seed + 2));
        if random.len() >= 4 {
            random[..4].copy_from_slice(&[3e9, -1.0, 0.2, -7e9]);
        }
        let grids = [
            affine_grid_forward(&sampler_thetas(n, k, seed + 3), oh, ow).unwrap(),
            Tensor::from_vec(random, &[n, oh, ow, 2], &Device::cpu()).unwrap(),
        ];
        let (imgd, goutd) = (gpu.put(&img), gpu.put(&gout));
        for (gk, grid_t) in grids.iter().enumerate() {
            let what = format!("n={n} c={c} {h}x{w} -> {oh}x{ow}, grid {gk}");
            let gridd = gpu.put(grid_t);
            check(
                &format!("grid_sample {what}"),
                &grid_sample_forward(&imgd, &gridd).unwrap(),
                &grid_sample_forward(&img, grid_t).unwrap(),
            );
            for img_grad in [true, false] {
                let (gimg, ggrid) = grid_sample_backward(&img, grid_t, &gout, img_grad).unwrap();
                let (gimgd, ggridd) = grid_sample_backward(&imgd, &gridd, &goutd, img_grad).unwrap();
                check(&format!("grid_sample_backward grid {what}"), &ggridd, &ggrid);
                assert_eq!(gimgd.is_some(), img_grad);
                if let (Some(got), Some(want)) = (gimgd, gimg) {
                    check(&format!("grid_sample_backward img {what}"), &got, &want);
                }
            }
        }
    }
    gpu.assert_launched(&[
        "sampler::grid_sample",
        "sampler::grid_sample_backward_grid",
        "sampler::grid_sample_backward_img",
    ]);
}

/// Samples alternate between 37x53 and 9x7 images, so the window table's
/// per-sample image sizes matter.
#[test]
fn sampler_localized_crop_forward_and_backward() {
    let Some(gpu) = Emulated::get() else { return };
    // (batch, channels, level, crop height, crop width, first theta kind)
    let cases = [
        (1, 1, 0, 1, 1, 1),
        (1, 2, 0, 5, 7, 3), // wholly outside: no pixels read at all
        (4, 3, 1, 5, 7, 0),
        (3, 2, 0, 32, 32, 1),
        (4, 1, 1, 32, 32, 2),
        (2, 3, 1, 1, 1, 3),
    ];
    for (k, &(n, c, level, oh, ow, first)) in cases.iter().enumerate() {
        let seed = 200 + 10 * k as u64;
        let images: Vec<InMemoryImage> = (0..n)
            .map(|i| {
                let (h, w) = if i % 2 == 0 { (37, 53) } else { (9, 7) };
                let d = vals(&uniform(&[c * h * w], 0.0, 1.0, seed + i as u64));
                InMemoryImage::new(d, c, h, w, 1).unwrap()
            })
            .collect();
        let sources: Vec<&dyn ImageSource> = images.iter().map(|i| i as _).collect();
        let theta = sampler_thetas(n, first, seed);
        let gout = randn(&[n, c, oh, ow], seed + 9);
        let what = format!("n={n} c={c} level {level} {oh}x{ow}");
        let (want, saved) = localized_crop_forward(&sources, &theta, oh, ow, level).unwrap();
        let (got, saved_d) = localized_crop_forward(&sources, &gpu.put(&theta), oh, ow, level).unwrap();
        check(&format!("localized_crop {what}"), &got, &want);
        check(
            &format!("localized_crop theta gradient {what}"),
            &localized_crop_backward(&saved_d, &gpu.put(&gout)).unwrap(),
            &localized_crop_backward(&saved, &gout).unwrap(),
        );
    }
    gpu.assert_launched(&["sampler::localized_crop", "sampler::localized_crop_backward"]);
}

// ---- conv.cu ---------------------------------------------------------------

use saccade::ops::conv::{
    conv2d_backward, conv2d_forward, conv_transpose2d_backward, conv_transpose2d_forward,
};

/// Scratch budgets (floats) for a conv whose input side is `[n, c, h, w]`
/// and output side `[n, o, ho, wo]` (`k` the kernel's size): the device's
/// own (one chunk here), one image per chunk, and for a batch of 3, chunks
/// of 2 + 1 in the column matrices and in the weight gradient's scratch.
fn conv_budgets([c, o]: [usize; 2], k: usize, hw: usize, pointwise: bool) -> [usize; 4] {
    let cols = c * k * hw;
    let weight_grad = o * c * k + if pointwise { 0 } else { cols };
    [1 << 22, 1, 2 * cols, 2 * weight_grad]
}

#[test]
fn conv_conv2d_forward_and_backward() {
    let Some(gpu) = Emulated::get() else { return };
    // (x, w, stride, padding): 3x3, 5x5, non-square and 1x1 kernels, odd
    // sizes, padding 0/1/2, strides 1/2/3, a kernel wider than the input.
    let cases = [
        ([1, 2, 5, 6], [3, 2, 3, 3], 1, 1),
        ([3, 3, 7, 5], [4, 3, 3, 3], 2, 1),
        ([3, 2, 6, 7], [2, 2, 5, 5], 1, 2),
        ([3, 2, 9, 8], [3, 2, 5, 5], 2, 2),
        ([3, 3, 7, 9], [2, 3, 2, 3], 2, 0),
        ([3, 4, 5, 6], [3, 4, 1, 1], 1, 0),
        ([1, 4, 5, 6], [2, 4, 1, 1], 1, 0),
        ([3, 3, 5, 7], [2, 3, 1, 1], 2, 0),
        ([3, 2, 2, 3], [1, 2, 5, 5], 3, 2),
    ];
    for (k, (xs, ws, s, p)) in cases.into_iter().enumerate() {
        let seed = 10 * k as u64;
        let (x, w, b) = (randn(&xs, seed), randn(&ws, seed + 1), randn(&[ws[0]], seed + 2));
        let y = conv2d_forward(&x, &w, Some(&b), s, p).unwrap();
        let gy = randn(y.shape(), seed + 3);
        let (dx, dw, db) = conv2d_backward(&x, &w, &gy, s, p, true).unwrap();
        let [xd, wd, bd, gyd] = [&x, &w, &b, &gy].map(|t| gpu.put(t));
        let hw = y.shape()[2] * y.shape()[3];
        let pointwise = ws[2] * ws[3] == 1 && s == 1 && p == 0;
        for budget in conv_budgets([xs[1], ws[0]], ws[2] * ws[3], hw, pointwise) {
            gpu.cuda().set_scratch_budget(budget);
            let what = |t: &str| format!("conv2d {t} x {xs:?} w {ws:?} stride {s} pad {p} budget {budget}");
            check(
                &what("forward"),
                &conv2d_forward(&xd, &wd, Some(&bd), s, p).unwrap(),
                &y,
            );
            let got = conv2d_backward(&xd, &wd, &gyd, s, p, true).unwrap();
            check(&what("dx"), &got.0, &dx);
            check(&what("dw"), &got.1, &dw);
            check(&what("db"), got.2.as_ref().unwrap(), db.as_ref().unwrap());
        }
    }
    gpu.assert_launched(&[
        "conv::im2col",
        "conv::col2im",
        "conv::sum_images",
        "conv::add_bias",
        "conv::bias_grad",
    ]);
}

#[test]
fn conv_conv_transpose2d_forward_and_backward() {
    let Some(gpu) = Emulated::get() else { return };
    // (x, w, stride, padding, output_padding)
    let cases = [
        ([3, 3, 4, 5], [3, 2, 3, 3], 2, 1, 1),
        ([1, 2, 5, 3], [2, 4, 3, 3], 1, 1, 0),
        ([3, 2, 3, 4], [2, 3, 5, 5], 2, 2, 0),
        ([3, 2, 4, 3], [2, 2, 5, 5], 1, 2, 0),
        ([3, 4, 5, 6], [4, 3, 1, 1], 1, 0, 0),
        ([1, 3, 4, 4], [3, 2, 1, 1], 2, 0, 1),
        ([3, 2, 5, 3], [2, 4, 2, 3], 3, 0, 2),
    ];
    for (k, (xs, ws, s, p, op)) in cases.into_iter().enumerate() {
        let seed = 10 * k as u64;
        let (x, w, b) = (randn(&xs, seed), randn(&ws, seed + 1), randn(&[ws[1]], seed + 2));
        let y = conv_transpose2d_forward(&x, &w, Some(&b), s, p, op).unwrap();
        let gy = randn(y.shape(), seed + 3);
        let (dx, dw, db) = conv_transpose2d_backward(&x, &w, &gy, s, p, op, true).unwrap();
        let [xd, wd, bd, gyd] = [&x, &w, &b, &gy].map(|t| gpu.put(t));
        // The conv it is the adjoint of maps y's side ([c_out]) to x's ([c_in]).
        let pointwise = ws[2] * ws[3] == 1 && s == 1 && p == 0;
        for budget in conv_budgets([ws[1], xs[1]], ws[2] * ws[3], xs[2] * xs[3], pointwise) {
            gpu.cuda().set_scratch_budget(budget);
            let what = |t: &str| {
                format!(
                    "conv_transpose2d {t} x {xs:?} w {ws:?} stride {s} pad {p} out_pad {op} budget {budget}"
                )
            };
            let got_y = conv_transpose2d_forward(&xd, &wd, Some(&bd), s, p, op).unwrap();
            check(&what("forward"), &got_y, &y);
            let got = conv_transpose2d_backward(&xd, &wd, &gyd, s, p, op, true).unwrap();
            check(&what("dx"), &got.0, &dx);
            check(&what("dw"), &got.1, &dw);
            check(&what("db"), got.2.as_ref().unwrap(), db.as_ref().unwrap());
        }
    }
    gpu.assert_launched(&[
        "conv::im2col",
        "conv::col2im",
        "conv::sum_images",
        "matmul::sgemm",
    ]);
}

// ---- norm.cu ---------------------------------------------------------------

use saccade::ops::norm::{
    batch_norm_backward, batch_norm_forward, batch_stats, group_norm_backward, group_norm_forward,
};

/// The shapes of the norm tests: batch 1 and 5, spatial 1x1 and 7x9.
const NORM_SHAPES: [[usize; 4]; 4] = [[1, 6, 1, 1], [5, 6, 1, 1], [1, 6, 7, 9], [5, 6, 7, 9]];

/// [`check`] on dx, relative to the size of the terms it sums
/// (`|gy * gamma * rstd|` at most): a statistic of one element gives dx = 0
/// up to their rounding.
#[track_caller]
fn norm_check_dx(what: &str, got: &Tensor, want: &Tensor, [gy, gamma, rstd]: [&Tensor; 3]) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let max = |t: &Tensor| vals(t).iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = max(want).max(max(gy) * max(gamma) * max(rstd));
    for (i, (g, w)) in vals(got).iter().zip(vals(want)).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * w.abs().max(1e-2 * scale),
            "{what}: element {i}: kernel {g} vs CPU {w}"
        );
    }
}

#[test]
fn norm_group_norm_forward_and_backward() {
    let Some(gpu) = Emulated::get() else { return };
    let eps = 1e-5;
    for (i, shape) in NORM_SHAPES.iter().enumerate() {
        for groups in [1, 2, 6] {
            let seed = 10 * i as u64 + groups as u64;
            let c = shape[1];
            // An offset mean: the variance must not lose precision.
            let x = uniform(shape, 2.0, 4.0, seed);
            let (gamma, beta, gy) = (
                randn(&[c], seed + 1),
                randn(&[c], seed + 2),
                randn(shape, seed + 3),
            );
            let [xd, gammad, betad, gyd] = [&x, &gamma, &beta, &gy].map(|t| gpu.put(t));
            let what = format!("group norm {shape:?} groups {groups}");
            let (y, mean, rstd) = group_norm_forward(&x, &gamma, &beta, groups, eps).unwrap();
            let (yd, meand, rstdd) = group_norm_forward(&xd, &gammad, &betad, groups, eps).unwrap();
            check(&format!("{what} y"), &yd, &y);
            check(&format!("{what} mean"), &meand, &mean);
            check(&format!("{what} rstd"), &rstdd, &rstd);
            let (dx, dg, db) = group_norm_backward(&x, &gamma, &mean, &rstd, groups, &gy).unwrap();
            let got = group_norm_backward(&xd, &gammad, &meand, &rstdd, groups, &gyd).unwrap();
            norm_check_dx(&format!("{what} dx"), &got.0, &dx, [&gy, &gamma, &rstd]);
            check(&format!("{what} dgamma"), &got.1, &dg);
            check(&format!("{what} dbeta"), &got.2, &db);
        }
    }
    gpu.assert_launched(&[
        "norm::norm_stats",
        "norm::norm_rstd",
        "norm::norm_forward",
        "norm::norm_backward_sums",
        "norm::norm_backward_dx",
    ]);
}

#[test]
fn norm_batch_norm_training_and_eval() {
    let Some(gpu) = Emulated::get() else { return };
    let eps = 1e-5;
    // [N, C] too; training needs more than one value per channel.
    let shapes: Vec<&[usize]> = NORM_SHAPES
        .iter()
        .map(|s| &s[..])
        .chain([&[5, 6][..], &[1, 6]])
        .collect();
    for (i, &shape) in shapes.iter().enumerate() {
        let (n, c) = (shape[0], shape[1]);
        let s: usize = shape[2..].iter().product();
        for training in [true, false] {
            if training && n * s == 1 {
                continue;
            }
            let seed = 10 * i as u64 + training as u64;
            let x = uniform(shape, -1.0, 3.0, seed);
            let (gamma, beta, gy) = (
                randn(&[c], seed + 1),
                randn(&[c], seed + 2),
                randn(shape, seed + 3),
            );
            let running = (randn(&[c], seed + 4), uniform(&[c], 0.5, 2.0, seed + 5));
            let [xd, gammad, betad, gyd] = [&x, &gamma, &beta, &gy].map(|t| gpu.put(t));
            let what = format!("batch norm {shape:?} training {training}");
            // As Graph::batch_norm: the batch's statistics or the running ones.
            let (mean, var) = if training {
                let want = batch_stats(&x).unwrap();
                let got = batch_stats(&xd).unwrap();
                check(&format!("{what} mean"), &got.0, &want.0);
                check(&format!("{what} var"), &got.1, &want.1);
                want
            } else {
                running
            };
            let rstd = var
                .same_shape(vals(&var).iter().map(|v| 1.0 / (v + eps).sqrt()).collect())
                .unwrap();
            let (meand, rstdd) = (gpu.put(&mean), gpu.put(&rstd));
            check(
                &format!("{what} y"),
                &batch_norm_forward(&xd, &gammad, &betad, &meand, &rstdd).unwrap(),
                &batch_norm_forward(&x, &gamma, &beta, &mean, &rstd).unwrap(),
            );
            let (dx, dg, db) = batch_norm_backward(&x, &gamma, &mean, &rstd, training, &gy).unwrap();
            let got = batch_norm_backward(&xd, &gammad, &meand, &rstdd, training, &gyd).unwrap();
            norm_check_dx(&format!("{what} dx"), &got.0, &dx, [&gy, &gamma, &rstd]);
            check(&format!("{what} dgamma"), &got.1, &dg);
            check(&format!("{what} dbeta"), &got.2, &db);
        }
    }
    gpu.assert_launched(&["norm::norm_stats", "norm::norm_forward", "norm::norm_backward_dx"]);
}

// ---- gru.cu ----------------------------------------------------------------

use saccade::ops::gru::{gru_cell_backward, gru_cell_forward};

#[test]
fn gru_cell_forward_and_backward() {
    let Some(gpu) = Emulated::get() else { return };
    for (case, &(n, i, hd)) in [
        (1, 3, 1),
        (5, 3, 1),
        (1, 10, 17),
        (5, 10, 17),
        (5, 7, 128),
        (1, 7, 128),
    ]
    .iter()
    .enumerate()
    {
        let seed = 10 * case as u64;
        // PyTorch's initialization keeps the gates out of saturation.
        let k = 1.0 / (hd as f32).sqrt();
        let (x, h, g) = (
            randn(&[n, i], seed),
            randn(&[n, hd], seed + 1),
            randn(&[n, hd], seed + 2),
        );
        let w_ih = uniform(&[3 * hd, i], -k, k, seed + 3);
        let w_hh = uniform(&[3 * hd, hd], -k, k, seed + 4);
        let b_ih = uniform(&[3 * hd], -k, k, seed + 5);
        let b_hh = uniform(&[3 * hd], -k, k, seed + 6);
        let [xd, hdv, gd, wid, whd, bid, bhd] = [&x, &h, &g, &w_ih, &w_hh, &b_ih, &b_hh].map(|t| gpu.put(t));
        let what = format!("gru n={n} i={i} h={hd}");
        let (y, saved) = gru_cell_forward(&x, &h, &w_ih, &w_hh, &b_ih, &b_hh).unwrap();
        let (yd, savedd) = gru_cell_forward(&xd, &hdv, &wid, &whd, &bid, &bhd).unwrap();
        check(&format!("{what} h'"), &yd, &y);
        check(&format!("{what} saved"), &savedd, &saved);
        let want = gru_cell_backward(&x, &h, &w_ih, &w_hh, &saved, &g).unwrap();
        let got = gru_cell_backward(&xd, &hdv, &wid, &whd, &savedd, &gd).unwrap();
        for (k, name) in ["dx", "dh", "dw_ih", "dw_hh", "db_ih", "db_hh"]
            .iter()
            .enumerate()
        {
            check(&format!("{what} {name}"), &got[k], &want[k]);
        }
    }
    gpu.assert_launched(&["gru::gru_forward", "gru::gru_backward"]);
}

// ---- pool.cu ---------------------------------------------------------------

use saccade::ops::pool::{
    avg_pool2d_backward, avg_pool2d_forward, global_avg_pool_backward, global_avg_pool_forward,
    max_pool2d_backward, max_pool2d_forward,
};

/// Whole numbers 0, 1 and 2: windows with tied maxima everywhere.
fn ties(shape: &[usize], seed: u64) -> Tensor {
    let v = vals(&uniform(shape, 0.0, 3.0, seed))
        .iter()
        .map(|v| v.floor())
        .collect();
    Tensor::from_vec(v, shape, &Device::cpu()).unwrap()
}

#[test]
fn pool_avg_pool2d_forward_and_backward() {
    let Some(gpu) = Emulated::get() else { return };
    // (shape, kernel, stride): leftover rows and columns, overlapping
    // windows, stride wider than the kernel, one window, one pixel, and
    // more outputs than a block.
    let cases: [([usize; 4], usize, usize); 7] = [
        ([2, 3, 7, 9], 2, 2),
        ([1, 2, 8, 5], 3, 1),
        ([3, 1, 11, 10], 3, 2),
        ([1, 1, 9, 9], 2, 3),
        ([2, 2, 4, 4], 4, 4),
        ([1, 1, 1, 1], 1, 1),
        ([2, 3, 19, 17], 3, 2),
    ];
    for (i, &(shape, k, s)) in cases.iter().enumerate() {
        let x = randn(&shape, i as u64);
        let xd = gpu.put(&x);
        let what = format!("{shape:?} k{k} s{s}");
        let y = avg_pool2d_forward(&x, k, s).unwrap();
        check(
            &format!("avg_pool2d {what}"),
            &avg_pool2d_forward(&xd, k, s).unwrap(),
            &y,
        );
        let gy = randn(y.shape(), 100 + i as u64);
        check(
            &format!("avg_pool2d_backward {what}"),
            &avg_pool2d_backward(&xd, &gpu.put(&gy), k, s).unwrap(),
            &avg_pool2d_backward(&x, &gy, k, s).unwrap(),
        );
    }
    gpu.assert_launched(&["pool::avg_pool2d", "pool::avg_pool2d_backward"]);
}

#[test]
fn pool_max_pool2d_forward_and_backward_with_ties() {
    let Some(gpu) = Emulated::get() else { return };
    // (shape, kernel, stride, padding): ResNet's 3/2/1, no padding,
    // overlapping windows, stride wider than the kernel, padding of half the
    // kernel, a 1x1 plane, more outputs than a block.
    let cases: [([usize; 4], usize, usize, usize); 7] = [
        ([2, 3, 9, 7], 3, 2, 1),
        ([1, 2, 8, 5], 3, 1, 0),
        ([3, 1, 11, 10], 2, 2, 1),
        ([1, 1, 9, 9], 2, 3, 0),
        ([2, 2, 4, 4], 4, 4, 2),
        ([1, 1, 1, 1], 3, 2, 1),
        ([2, 3, 17, 16], 3, 1, 1),
    ];
    for (i, &(shape, k, s, p)) in cases.iter().enumerate() {
        // Distinct values, then ties in almost every window, then one value.
        let constant = Tensor::full(&shape, 0.5, &Device::cpu());
        for (kind, x) in [
            ("distinct", randn(&shape, i as u64)),
            ("ties", ties(&shape, i as u64)),
            ("constant", constant),
        ] {
            let xd = gpu.put(&x);
            let what = format!("{shape:?} k{k} s{s} p{p} {kind}");
            let y = max_pool2d_forward(&x, k, s, p).unwrap();
            check(
                &format!("max_pool2d {what}"),
                &max_pool2d_forward(&xd, k, s, p).unwrap(),
                &y,
            );
            let gy = randn(y.shape(), 100 + i as u64);
            check(
                &format!("max_pool2d_backward {what}"),
                &max_pool2d_backward(&xd, &gpu.put(&gy), k, s, p).unwrap(),
                &max_pool2d_backward(&x, &gy, k, s, p).unwrap(),
            );
        }
    }
    gpu.assert_launched(&["pool::max_pool2d", "pool::max_pool2d_backward"]);
}

#[test]
fn pool_global_avg_pool_forward_and_backward() {
    let Some(gpu) = Emulated::get() else { return };
    // More planes than a block, one pixel per plane, large odd planes.
    for (i, shape) in [[2, 3, 5, 7], [1, 1, 1, 1], [3, 100, 2, 1], [1, 2, 33, 31]]
        .iter()
        .enumerate()
    {
        let x = randn(shape, i as u64);
        let xd = gpu.put(&x);
        check(
            &format!("global_avg_pool {shape:?}"),
            &global_avg_pool_forward(&xd).unwrap(),
            &global_avg_pool_forward(&x).unwrap(),
        );
        let gy = randn(&shape[..2], 100 + i as u64);
        check(
            &format!("global_avg_pool_backward {shape:?}"),
            &global_avg_pool_backward(&xd, &gpu.put(&gy)).unwrap(),
            &global_avg_pool_backward(&x, &gy).unwrap(),
        );
    }
    gpu.assert_launched(&["pool::global_avg_pool", "pool::global_avg_pool_backward"]);
}

// ---- resize.cu -------------------------------------------------------------

use saccade::ops::resize::{resize_bilinear_backward, resize_bilinear_forward};

#[test]
fn resize_bilinear_up_down_forward_and_backward() {
    let Some(gpu) = Emulated::get() else { return };
    // (input shape, out h, out w): up, down by non-integer and integer
    // factors, mixed, to and from one pixel, same size, large factors.
    let cases: [([usize; 4], usize, usize); 11] = [
        ([2, 2, 3, 4], 7, 9),
        ([1, 2, 9, 11], 4, 5),
        ([1, 3, 5, 4], 3, 10),
        ([2, 1, 4, 6], 1, 1),
        ([1, 2, 1, 1], 5, 3),
        ([1, 2, 7, 5], 7, 5),
        ([1, 1, 13, 17], 5, 7),
        ([1, 1, 5, 3], 13, 11),
        ([1, 1, 31, 29], 10, 9),
        ([1, 1, 6, 9], 2, 3),
        ([1, 1, 2, 3], 17, 29),
    ];
    for (i, &(shape, oh, ow)) in cases.iter().enumerate() {
        let x = randn(&shape, i as u64);
        let xd = gpu.put(&x);
        let what = format!("{shape:?} -> {oh}x{ow}");
        let y = resize_bilinear_forward(&x, oh, ow).unwrap();
        check(
            &format!("resize_bilinear {what}"),
            &resize_bilinear_forward(&xd, oh, ow).unwrap(),
            &y,
        );
        let gy = randn(y.shape(), 100 + i as u64);
        check(
            &format!("resize_bilinear_backward {what}"),
            &resize_bilinear_backward(&xd, &gpu.put(&gy)).unwrap(),
            &resize_bilinear_backward(&x, &gy).unwrap(),
        );
    }
    gpu.assert_launched(&["resize::resize_bilinear", "resize::resize_bilinear_backward"]);
}

// ---- loss.cu ---------------------------------------------------------------

use saccade::ops::loss::{
    bce_with_logits_backward, bce_with_logits_forward, gaussian_nll_backward, gaussian_nll_forward, softmax,
    softmax_backward, softmax_cross_entropy_backward, softmax_cross_entropy_forward,
};

/// Per-sample loss inputs: one element, a partial block, rows longer than a
/// block (70001, as fast as 3000 here), several rows, more than two axes.
const LOSS_SHAPES: &[&[usize]] = &[&[1, 1], &[3, 7], &[2, 257], &[2, 70001], &[20, 3], &[2, 3, 5]];

#[test]
fn loss_bce_with_logits_forward_and_backward() {
    let Some(gpu) = Emulated::get() else { return };
    for (i, &shape) in LOSS_SHAPES.iter().enumerate() {
        let seed = 10 * i as u64;
        let x = uniform(shape, -30.0, 30.0, seed);
        let t = uniform(shape, 0.0, 1.0, seed + 1);
        let g = randn(&[shape[0]], seed + 2);
        let [xd, td, gd] = [&x, &t, &g].map(|v| gpu.put(v));
        check(
            &format!("bce_with_logits {shape:?}"),
            &bce_with_logits_forward(&xd, &td).unwrap(),
            &bce_with_logits_forward(&x, &t).unwrap(),
        );
        check(
            &format!("bce_with_logits_backward {shape:?}"),
            &bce_with_logits_backward(&xd, &td, &gd).unwrap(),
            &bce_with_logits_backward(&x, &t, &g).unwrap(),
        );
    }
    // A target outside [0, 1], an error on the CPU, makes its row NaN.
    let mut t = vals(&uniform(&[3, 5], 0.0, 1.0, 2));
    t[7] = 1.5;
    let t = Tensor::from_vec(t, &[3, 5], &gpu.dev).unwrap();
    let out = vals(&bce_with_logits_forward(&gpu.put(&randn(&[3, 5], 1)), &t).unwrap());
    assert!(
        out[0].is_finite() && out[1].is_nan() && out[2].is_finite(),
        "{out:?}"
    );
    gpu.assert_launched(&["loss::bce_with_logits", "loss::bce_with_logits_backward"]);
}

#[test]
fn loss_gaussian_nll_forward_and_backward() {
    let Some(gpu) = Emulated::get() else { return };
    for (i, &shape) in LOSS_SHAPES.iter().enumerate() {
        let seed = 10 * i as u64;
        let (x, mu) = (randn(shape, seed), randn(shape, seed + 1));
        let lv = uniform(shape, -3.0, 3.0, seed + 2);
        let g = randn(&[shape[0]], seed + 3);
        let [xd, mud, lvd, gd] = [&x, &mu, &lv, &g].map(|v| gpu.put(v));
        check(
            &format!("gaussian_nll {shape:?}"),
            &gaussian_nll_forward(&xd, &mud, &lvd).unwrap(),
            &gaussian_nll_forward(&x, &mu, &lv).unwrap(),
        );
        let want = gaussian_nll_backward(&x, &mu, &lv, &g).unwrap();
        let got = gaussian_nll_backward(&xd, &mud, &lvd, &gd).unwrap();
        check(&format!("gaussian_nll_backward dmu {shape:?}"), &got.0, &want.0);
        check(
            &format!("gaussian_nll_backward dlogvar {shape:?}"),
            &got.1,
            &want.1,
        );
    }
    gpu.assert_launched(&["loss::gaussian_nll", "loss::gaussian_nll_backward"]);
}

/// Logits `[rows, k]`: one class, a partial block, more rows than a block,
/// rows longer than a block.
const CLASSES: &[(usize, usize)] = &[(1, 1), (5, 7), (300, 3), (2, 257), (2, 70001)];

#[test]
fn loss_softmax_cross_entropy_forward_and_backward() {
    let Some(gpu) = Emulated::get() else { return };
    for (i, &(rows, k)) in CLASSES.iter().enumerate() {
        let seed = 10 * i as u64;
        // Wide enough that a shift-free exp would overflow.
        let x = uniform(&[rows, k], -100.0, 100.0, seed);
        let labels: Vec<usize> = vals(&uniform(&[rows], 0.0, k as f32, seed + 1))
            .iter()
            .map(|&v| (v as usize).min(k - 1))
            .collect();
        let g = randn(&[rows], seed + 2);
        let (xd, gd) = (gpu.put(&x), gpu.put(&g));
        let what = format!("[{rows}, {k}]");
        let (loss, lse) = softmax_cross_entropy_forward(&x, &labels).unwrap();
        let (lossd, lsed) = softmax_cross_entropy_forward(&xd, &labels).unwrap();
        check(&format!("softmax_cross_entropy loss {what}"), &lossd, &loss);
        check(&format!("softmax_cross_entropy lse {what}"), &lsed, &lse);
        check(
            &format!("softmax_cross_entropy_backward {what}"),
            &softmax_cross_entropy_backward(&xd, &labels, &lsed, &gd).unwrap(),
            &softmax_cross_entropy_backward(&x, &labels, &lse, &g).unwrap(),
        );
    }
    gpu.assert_launched(&[
        "loss::softmax_cross_entropy",
        "loss::softmax_cross_entropy_backward",
    ]);
}

#[test]
fn loss_softmax_forward_and_backward() {
    let Some(gpu) = Emulated::get() else { return };
    // No rows, one element, a partial block, more than two axes, more rows
    // than a block, rows longer than a block.
    let shapes: [&[usize]; 7] = [
        &[0, 5],
        &[1],
        &[5, 7],
        &[2, 3, 4],
        &[300, 3],
        &[2, 257],
        &[2, 70001],
    ];
    for (i, &shape) in shapes.iter().enumerate() {
        let x = uniform(shape, -100.0, 100.0, i as u64);
        let g = randn(shape, 100 + i as u64);
        let y = softmax(&x).unwrap();
        let yd = softmax(&gpu.put(&x)).unwrap();
        check(&format!("softmax {shape:?}"), &yd, &y);
        check(
            &format!("softmax_backward {shape:?}"),
            &softmax_backward(&yd, &gpu.put(&g)).unwrap(),
            &softmax_backward(&y, &g).unwrap(),
        );
    }
    gpu.assert_launched(&["loss::softmax", "loss::softmax_backward"]);
}

// ---- The emulation itself --------------------------------------------------

/// The panic message of `f`, which must panic.
fn panic_of(f: impl FnOnce()) -> String {
    let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).expect_err("expected a panic");
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

fn threads(n: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (n, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[test]
fn emulator_catches_writes_outside_a_buffer() {
    let Some(emu) = Emu::get() else { return };
    let mut y = poisoned(10);
    let e = panic_of(|| {
        emu.launch(
            "selftest",
            "write_past_end",
            grid(10).unwrap(),
            &mut [write(&mut y), value(&10)],
        )
    });
    assert!(
        e.contains("wrote outside buffer argument 0 (length 10) at index 10"),
        "{e}"
    );
}

#[test]
fn emulator_catches_barriers_not_every_thread_reaches() {
    let Some(emu) = Emu::get() else { return };
    let mut y = poisoned(64);
    let e = panic_of(|| emu.launch("selftest", "divergent_barrier", threads(64), &mut [write(&mut y)]));
    assert!(
        e.contains("10 thread(s) wait at __syncthreads") && e.contains("54 returned"),
        "{e}"
    );
    let e = panic_of(|| {
        emu.launch(
            "selftest",
            "return_before_barrier",
            threads(64),
            &mut [write(&mut y), value(&50)],
        )
    });
    assert!(e.contains("block (0, 0, 0)") && e.contains("early return"), "{e}");
}

#[test]
fn emulator_catches_a_missing_barrier() {
    let Some(emu) = Emu::get() else { return };
    let x: Vec<f32> = (0..256).map(|i| i as f32).collect();
    let mut out = poisoned(1);
    emu.launch(
        "selftest",
        "sum_missing_barrier",
        threads(256),
        &mut [read(&x), write(&mut out)],
    );
    // Threads run in a shuffled order between barriers, so some add a partial
    // sum before it is complete.
    assert_ne!(
        out[0],
        x.iter().sum::<f32>(),
        "a race the emulation should expose"
    );
}

#[test]
fn emulator_catches_argument_mismatches_and_impossible_launches() {
    let Some(emu) = Emu::get() else { return };
    let mut y = poisoned(4);
    let cfg = grid(4).unwrap();
    let e = panic_of(|| {
        emu.launch(
            "elementwise",
            "fill",
            cfg,
            &mut [write(&mut y), value(&4i64), value(&1f32)],
        )
    });
    assert!(
        e.contains("takes (float*, int, float) but is launched with (float*, long long, float)"),
        "{e}"
    );
    let e = panic_of(|| {
        emu.launch(
            "elementwise",
            "fill",
            cfg,
            &mut [read(&[0.0; 4]), value(&4), value(&1f32)],
        )
    });
    assert!(e.contains("launched with (float const*, int, float)"), "{e}");
    let e = panic_of(|| {
        emu.launch(
            "elementwise",
            "fill",
            threads(2048),
            &mut [write(&mut y), value(&4), value(&1f32)],
        )
    });
    assert!(
        e.contains("would not launch on a GPU: more than 1024 threads"),
        "{e}"
    );
    let e = panic_of(|| emu.launch("elementwise", "no_such_kernel", threads(1), &mut []));
    assert!(
        e.contains("no kernel no_such_kernel in kernels/elementwise.cu"),
        "{e}"
    );
}

#[test]
fn emulator_runs_warp_shuffles_votes_and_dynamic_shared_memory() {
    let Some(emu) = Emu::get() else { return };
    // Two blocks of 16 x 8 threads: 8 warps.
    let x = vals(&randn(&[256], 7));
    let (mut sum, mut mx, mut ballot, mut left) = (poisoned(8), poisoned(8), poisoned(8), poisoned(256));
    let cfg = LaunchConfig {
        grid_dim: (2, 1, 1),
        block_dim: (16, 8, 1),
        shared_mem_bytes: 0,
    };
    emu.launch(
        "selftest",
        "warp_ops",
        cfg,
        &mut [
            read(&x),
            write(&mut sum),
            write(&mut mx),
            write(&mut ballot),
            write(&mut left),
        ],
    );
    for (w, lanes) in x.chunks(32).enumerate() {
        let s: f32 = lanes.iter().sum();
        assert!((sum[w] - s).abs() < 1e-4, "warp {w} sum {} vs {s}", sum[w]);
        assert_eq!(mx[w], lanes.iter().fold(f32::MIN, |m, &v| m.max(v)));
        assert_eq!(ballot[w], lanes.iter().filter(|&&v| v > 0.0).count() as f32);
        for l in 0..32 {
            assert_eq!(
                left[w * 32 + l],
                lanes[l.saturating_sub(1)],
                "shuffle up, lane {l}"
            );
        }
    }

    let n = 100;
    let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut y = poisoned(n);
    let cfg = LaunchConfig {
        grid_dim: (2, 1, 1),
        block_dim: (64, 1, 1),
        shared_mem_bytes: 64 * 4,
    };
    emu.launch(
        "selftest",
        "reverse_blocks",
        cfg,
        &mut [read(&x), write(&mut y), value(&(n as i32))],
    );
    let mut want = vec![f32::NAN; n];
    for (b, t) in (0..2).flat_map(|b| (0..64).map(move |t| (b, t))) {
        let (i, j) = (b * 64 + t, b * 64 + 63 - t);
        if j < n {
            want[j] = if i < n { x[i] } else { 0.0 };
        }
    }
    assert_eq!(y, want, "reversed through dynamic shared memory");
}

/// A wrong launch through the seam is an error of the op that made it, not
/// a panic, and names the kernel.
#[test]
fn launch_errors_on_the_emulated_device_reach_the_op() {
    let Some(emu) = Emu::get() else { return };
    let dev = Device::Cuda(CudaDevice::emulated(Box::new(|file, kernel, cfg, args| {
        // Every launch as if the launcher had dropped its last argument.
        let n = args.len() - 1;
        emu.run(file, kernel, cfg, &mut args[..n])
            .map_err(|e| anyhow::anyhow!(e))
    })));
    let x = Tensor::from_vec(vec![1.0; 3], &[3], &dev).unwrap();
    let e = unary_forward(&x, Unary::Relu).unwrap_err().to_string();
    assert!(e.contains("elementwise::unary_forward takes ("), "{e}");
}

/// Runs without g++ too: the names come from the sources.
#[test]
fn every_kernel_has_an_emulation_test() {
    let src = "// __global__ in a comment\nextern \"C\" __global__ void a(int n) {}\n\
               extern \"C\" __global__ void __launch_bounds__(256) b(const float* x) {}";
    assert_eq!(emulation::kernel_names(src), ["a", "b"]);
    let this = include_str!("kernel_emulation.rs");
    let missing: Vec<String> = KERNEL_FILES
        .iter()
        .flat_map(|(file, src)| {
            emulation::kernel_names(src)
                .into_iter()
                .map(move |k| format!("{file}::{k}"))
        })
        .filter(|k| !this.contains(&format!("\"{k}\"")))
        .collect();
    assert!(
        missing.is_empty(),
        "kernels no test asserts were launched (see the top of tests/kernel_emulation.rs): {missing:?}"
    );
}
