//! The CUDA kernels run on the CPU, against the engine's CPU reference ops.
//!
//! No machine we develop on has a GPU, so kernels are written blind and
//! `cuda_parity.rs` skips. Here g++ compiles every file of `KERNEL_FILES` as
//! C++ with a small emulation of CUDA (tests/emulation/: `cuda_emu.h` maps the
//! keywords and built-ins, `cuda_emu.cpp` runs the threads of a block as
//! fibers switching at barriers, `mod.rs` builds, loads and launches), and
//! each test launches a kernel with the grid, block and arguments its
//! launcher (`mod cuda` in src/ops/*.rs, src/optim.rs) computes, on random
//! inputs, outputs filled with NaN first, and compares with the CPU op within
//! 1e-4 relative. The emulation also fails a launch whose argument types do
//! not match the kernel's parameters, that exceeds a GPU's limits, that
//! writes outside a buffer, or whose barriers not every thread reaches (see
//! the `emulator_*` tests). Without g++ every test prints
//! "skipped: g++ not found" and passes.
//!
//! What it cannot show: speed, warp-level timing, memory coalescing, and
//! whether NVRTC accepts the file (`saccade kernels check` does that).
//!
//! # Adding a test for a new kernel
//!
//! 1. The kernel is `extern "C" __global__ void name(...)` in a file listed in
//!    `KERNEL_FILES` (src/device/cuda.rs); nothing else is needed to build it.
//! 2. Write a `#[test]` here that repeats the launcher's `launch!` call:
//!    ```ignore
//!    let Some(emu) = Emu::get() else { return };
//!    let x = randn(&[3, 7], 1);                          // CPU inputs
//!    let want = vals(&my_op_forward(&x).unwrap());       // the CPU reference
//!    let mut y = poisoned(want.len());                   // an output: NaN first
//!    emu.launch("myfile", "my_kernel", grid(21).unwrap(), &mut [
//!        In(&vals(&x)), Out(&mut y), I32(21),            // launch!'s arguments, in order
//!    ]);
//!    assert_close("my_kernel", &y, &want);
//!    ```
//!    `"myfile"` is the module name in `KERNEL_FILES`. Arguments map one to
//!    one: `x.slice()` is `In`, `x.slice_mut()` is `Out` (its contents go in
//!    too, for kernels that accumulate), `&(n as i32)` is `I32`, an `i64` is
//!    `I64`, an `f32` is `F32`, a `Dims` is `Dims`; another kind (an `int`
//!    buffer, say) is one more variant of `Arg` in tests/emulation/mod.rs.
//!    Use the launcher's `LaunchConfig` (`grid(n)`, or the expression it
//!    builds, as `sgemm_config` does) and compute any argument it derives
//!    (strides, constants) the way it does. Small sizes keep the test fast;
//!    odd ones (not multiples of the block or tile) find the edge bugs.
//! 3. `cargo test --release --test kernel_emulation`. A g++ error names the
//!    line in kernels/<file>.cu; a CUDA built-in the emulation lacks shows as
//!    an undeclared identifier and is added to tests/emulation/cuda_emu.h.
//!
//! `every_kernel_has_an_emulation_test` fails, naming the kernel, while a
//! kernel's name appears nowhere in this file.

mod emulation;

use cudarc::driver::LaunchConfig;
use emulation::{assert_close, poisoned, Arg::*, Emu};
use saccade::device::cuda::{grid, Dims, BLOCK, KERNEL_FILES};
use saccade::gradcheck::{rand_tensor, rng};
use saccade::ops::elementwise::{
    binary_forward, broadcast_shape, broadcast_strides, unary_backward, unary_forward, Binary, Unary,
};
use saccade::ops::gaussian::{
    kl_diag_gaussians_backward, kl_diag_gaussians_forward, reparameterize_backward, reparameterize_forward,
};
use saccade::ops::linear::matmul_forward;
use saccade::ops::reduce::{broadcast_to, sum_forward};
use saccade::ops::shape::{concat_forward, permute_forward, slice_forward};
use saccade::optim::{adam_update, clip_by_norm, clip_by_value, AdamConfig};
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

/// Sizes of the one-dimensional kernels: one block, a partial one, several.
const SIZES: &[usize] = &[1, 7, 256, 257, 1000];

// ---- elementwise.cu --------------------------------------------------------

#[test]
fn elementwise_fill() {
    let Some(emu) = Emu::get() else { return };
    for &n in SIZES {
        let mut y = poisoned(n);
        emu.launch(
            "elementwise",
            "fill",
            grid(n).unwrap(),
            &mut [Out(&mut y), I32(n as i32), F32(-2.5)],
        );
        assert_close("fill", &y, &vec![-2.5; n]);
    }
}

#[test]
fn elementwise_unary_forward_and_backward() {
    let Some(emu) = Emu::get() else { return };
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
            let y_cpu = unary_forward(&x, op).unwrap();
            let gx_cpu = unary_backward(&x, &y_cpu, &gy, op).unwrap();
            let (c, a, b) = op.kernel_code();
            let (xv, n32) = (vals(&x), n as i32);
            let mut y = poisoned(n);
            emu.launch(
                "elementwise",
                "unary_forward",
                grid(n).unwrap(),
                &mut [In(&xv), Out(&mut y), I32(n32), I32(c), F32(a), F32(b)],
            );
            assert_close(&format!("{op:?} forward"), &y, &vals(&y_cpu));
            let mut gx = poisoned(n);
            emu.launch(
                "elementwise",
                "unary_backward",
                grid(n).unwrap(),
                &mut [
                    In(&xv),
                    In(&y),
                    In(&vals(&gy)),
                    Out(&mut gx),
                    I32(n32),
                    I32(c),
                    F32(a),
                ],
            );
            assert_close(&format!("{op:?} backward"), &gx, &vals(&gx_cpu));
        }
    }
}

#[test]
fn elementwise_binary_broadcasting() {
    let Some(emu) = Emu::get() else { return };
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
            let want = binary_forward(&a, &b, op).unwrap();
            // As binary_forward computes them for its CUDA branch.
            let shape = broadcast_shape(sa, sb).unwrap();
            let dims = Dims::new(
                &shape,
                &broadcast_strides(sa, &shape),
                &broadcast_strides(sb, &shape),
            )
            .unwrap();
            let n = shape.iter().product();
            let mut out = poisoned(n);
            emu.launch(
                "elementwise",
                "binary_forward",
                grid(n).unwrap(),
                &mut [
                    In(&vals(&a)),
                    In(&vals(&b)),
                    Out(&mut out),
                    I32(n as i32),
                    I32(op as i32),
                    Dims(dims),
                ],
            );
            assert_close(&format!("{op:?} {sa:?} {sb:?}"), &out, &vals(&want));
        }
    }
}

// ---- reduce.cu -------------------------------------------------------------

#[test]
fn reduce_sum_and_mean_with_both_kernels() {
    let Some(emu) = Emu::get() else { return };
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
        let want = vals(&sum_forward(&x, &[axis], true).unwrap());
        let (outer, n, inner): (usize, usize, usize) = (
            shape[..axis].iter().product(),
            shape[axis],
            shape[axis + 1..].iter().product(),
        );
        let outs = outer * inner;
        let block_per_output = LaunchConfig {
            grid_dim: (outs as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // The launcher picks one by size; both must be right for any size.
        let xv = vals(&x);
        let mut sum = Vec::new();
        for (kernel, cfg) in [
            ("sum_axis", grid(outs).unwrap()),
            ("sum_axis_block", block_per_output),
        ] {
            sum = poisoned(outs);
            emu.launch(
                "reduce",
                kernel,
                cfg,
                &mut [
                    In(&xv),
                    Out(&mut sum),
                    I32(outer as i32),
                    I32(n as i32),
                    I32(inner as i32),
                ],
            );
            assert_close(&format!("{kernel} {shape:?} axis {axis}"), &sum, &want);
        }

        // Graph::mean is the sum followed by the affine unary map.
        let mut g = Graph::new();
        let v = g.leaf(x.clone());
        let m = g.mean(v, &[axis], true).unwrap();
        let (c, a, b) = Unary::Affine(1.0 / n as f32, 0.0).kernel_code();
        let mut mean = poisoned(outs);
        emu.launch(
            "elementwise",
            "unary_forward",
            grid(outs).unwrap(),
            &mut [In(&sum), Out(&mut mean), I32(outs as i32), I32(c), F32(a), F32(b)],
        );
        assert_close(&format!("mean {shape:?} axis {axis}"), &mean, &vals(g.value(m)));
    }
}

// ---- shape.cu --------------------------------------------------------------

/// `[outer, n, inner]` around `axis`, as src/ops/shape.rs splits shapes.
fn split(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (
        shape[..axis].iter().product(),
        shape[axis],
        shape[axis + 1..].iter().product(),
    )
}

#[test]
fn shape_concat_and_slice() {
    let Some(emu) = Emu::get() else { return };
    for axis in 0..3 {
        let mut sb = vec![2, 3, 4];
        sb[axis] = 5;
        let (a, b) = (randn(&[2, 3, 4], 1), randn(&sb, 2));
        let want = concat_forward(&[&a, &b], axis).unwrap();
        let (outer, total, inner) = split(want.shape(), axis);
        let mut out = poisoned(want.numel());
        let mut off = 0;
        for x in [&a, &b] {
            let n = x.shape()[axis];
            emu.launch(
                "shape",
                "copy_into",
                grid(outer * n * inner).unwrap(),
                &mut [
                    In(&vals(x)),
                    Out(&mut out),
                    I32(outer as i32),
                    I32(n as i32),
                    I32(inner as i32),
                    I32(total as i32),
                    I32(off as i32),
                ],
            );
            off += n;
        }
        assert_close(&format!("concat axis {axis}"), &out, &vals(&want));

        let (start, len) = (1, 3);
        let want = slice_forward(&want, axis, start, len).unwrap();
        let mut sliced = poisoned(want.numel());
        emu.launch(
            "shape",
            "copy_from",
            grid(outer * len * inner).unwrap(),
            &mut [
                In(&out),
                Out(&mut sliced),
                I32(outer as i32),
                I32(total as i32),
                I32(inner as i32),
                I32(start as i32),
                I32(len as i32),
            ],
        );
        assert_close(&format!("slice axis {axis}"), &sliced, &vals(&want));
    }
}

#[test]
fn shape_broadcast_rows_and_permute() {
    let Some(emu) = Emu::get() else { return };
    let (rows, cols) = (37, 9);
    let b = randn(&[cols], 3);
    let mut out = poisoned(rows * cols);
    emu.launch(
        "shape",
        "broadcast_rows",
        grid(rows * cols).unwrap(),
        &mut [In(&vals(&b)), Out(&mut out), I32(rows as i32), I32(cols as i32)],
    );
    assert_close(
        "broadcast_rows",
        &out,
        &vals(&broadcast_to(&b, &[rows, cols]).unwrap()),
    );

    let cases: [(&[usize], &[usize]); 4] = [
        (&[5, 7], &[1, 0]),
        (&[2, 3, 4], &[2, 0, 1]),
        (&[2, 3, 4, 5], &[0, 2, 1, 3]),
        (&[3, 1, 4, 2, 3], &[4, 3, 2, 1, 0]),
    ];
    for (i, &(in_shape, perm)) in cases.iter().enumerate() {
        let x = randn(in_shape, i as u64);
        let want = permute_forward(&x, perm).unwrap();
        // As permute_forward computes them for its CUDA branch.
        let mut in_strides = vec![1; in_shape.len()];
        for a in (0..in_shape.len() - 1).rev() {
            in_strides[a] = in_strides[a + 1] * in_shape[a + 1];
        }
        let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
        let dims = Dims::new(want.shape(), &strides, &strides).unwrap();
        let n = x.numel();
        let mut y = poisoned(n);
        emu.launch(
            "shape",
            "permute",
            grid(n).unwrap(),
            &mut [In(&vals(&x)), Out(&mut y), I32(n as i32), Dims(dims)],
        );
        assert_close(&format!("permute {in_shape:?} {perm:?}"), &y, &vals(&want));
    }
}

// ---- matmul.cu -------------------------------------------------------------

/// The launch of `linear::cuda::sgemm`: a 64x64 tile of C per block.
fn sgemm_config(batch: usize, m: usize, n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(64) as u32, m.div_ceil(64) as u32, batch as u32),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The `[batch, rows, cols]` matrices a stored operand stands for: read
/// transposed when `t`, repeated over the batch when its stride is 0.
fn logical(stored: &Tensor, t: bool, batch: usize) -> Tensor {
    let x = if t {
        permute_forward(stored, &[0, 2, 1]).unwrap()
    } else {
        stored.clone()
    };
    let s = x.shape();
    broadcast_to(&x, &[batch, s[1], s[2]]).unwrap()
}

#[test]
fn matmul_sgemm_transposes_accumulation_and_batches() {
    let Some(emu) = Emu::get() else { return };
    let mut seed = 0;
    for (m, n, k) in [(67, 45, 33), (1, 1, 1), (64, 64, 16), (5, 130, 17), (129, 3, 70)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            // (batch, A batched, B batched): stride 0 shares one matrix.
            for (batch, a_batched, b_batched) in [
                (1, false, false),
                (3, true, true),
                (3, true, false),
                (2, false, true),
            ] {
                for accumulate in [false, true] {
                    seed += 10;
                    let ba = if a_batched { batch } else { 1 };
                    let bb = if b_batched { batch } else { 1 };
                    let a = randn(&if ta { [ba, k, m] } else { [ba, m, k] }, seed);
                    let b = randn(&if tb { [bb, n, k] } else { [bb, k, n] }, seed + 1);
                    let c0 = randn(&[batch, m, n], seed + 2);
                    let product = matmul_forward(&logical(&a, ta, batch), &logical(&b, tb, batch)).unwrap();
                    let mut want = vals(&product);
                    let mut c = poisoned(batch * m * n);
                    if accumulate {
                        want = vals(&binary_forward(&product, &c0, Binary::Add).unwrap());
                        c = vals(&c0);
                    }
                    let sa = if a_batched { m * k } else { 0 };
                    let sb = if b_batched { k * n } else { 0 };
                    emu.launch(
                        "matmul",
                        "sgemm",
                        sgemm_config(batch, m, n),
                        &mut [
                            In(&vals(&a)),
                            In(&vals(&b)),
                            Out(&mut c),
                            I32(m as i32),
                            I32(n as i32),
                            I32(k as i32),
                            I32(ta as i32),
                            I32(tb as i32),
                            I64(sa as i64),
                            I64(sb as i64),
                            I32(accumulate as i32),
                        ],
                    );
                    let what = format!(
                        "sgemm {m}x{n}x{k} ta={ta} tb={tb} batch={batch} strides=({sa}, {sb}) accumulate={accumulate}"
                    );
                    assert_close(&what, &c, &want);
                }
            }
        }
    }
}

// ---- optim.cu --------------------------------------------------------------

#[test]
fn optim_adam() {
    let Some(emu) = Emu::get() else { return };
    let c = AdamConfig {
        lr: 0.01,
        weight_decay: 0.1,
        ..Default::default()
    };
    for (i, &n) in SIZES.iter().enumerate() {
        let seed = 10 * i as u64;
        let (p, g, m) = (randn(&[n], seed), randn(&[n], seed + 1), randn(&[n], seed + 2));
        let v = uniform(&[n], 0.0, 1.0, seed + 3);
        let step = 3;
        let want = adam_update(&p, &g, &m, &v, &c, step).unwrap();
        // As adam_update computes them.
        let bc1 = 1.0 - c.beta1.powi(step as i32);
        let bc2 = 1.0 - c.beta2.powi(step as i32);
        let (mut p2, mut m2, mut v2) = (poisoned(n), poisoned(n), poisoned(n));
        emu.launch(
            "optim",
            "adam",
            grid(n).unwrap(),
            &mut [
                In(&vals(&p)),
                In(&vals(&g)),
                In(&vals(&m)),
                In(&vals(&v)),
                Out(&mut p2),
                Out(&mut m2),
                Out(&mut v2),
                I32(n as i32),
                F32(c.lr),
                F32(c.beta1),
                F32(c.beta2),
                F32(c.eps),
                F32(c.weight_decay),
                F32(bc1),
                F32(bc2),
            ],
        );
        assert_close("adam param", &p2, &vals(&want.0));
        assert_close("adam m", &m2, &vals(&want.1));
        assert_close("adam v", &v2, &vals(&want.2));
    }
}

/// Parameter gradients equal to `values` (those of `sum(w_i * values_i)`).
fn gradients(values: &[Tensor]) -> (Gradients, Vec<saccade::nn::ParamId>) {
    let mut g = Graph::new();
    let mut ps = saccade::nn::ParamStore::new();
    let mut ids = Vec::new();
    let mut loss = None;
    for (i, v) in values.iter().enumerate() {
        let id = ps.add(&format!("w{i}"), randn(v.shape(), 99));
        let w = g.param(&ps, id);
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
    let Some(emu) = Emu::get() else { return };
    let tensors: Vec<Tensor> = SIZES.iter().map(|&n| randn(&[n], n as u64)).collect();
    let (mut clipped, ids) = gradients(&tensors);
    clip_by_value(&mut clipped, 0.8).unwrap();
    for (t, id) in tensors.iter().zip(&ids) {
        let n = t.numel();
        let mut out = poisoned(n);
        emu.launch(
            "optim",
            "clamp",
            grid(n).unwrap(),
            &mut [In(&vals(t)), Out(&mut out), I32(n as i32), F32(0.8)],
        );
        assert_close("clamp", &out, &vals(clipped.param(*id).unwrap()));
    }

    // clip_by_norm: one accumulator, zeroed by `fill`, every tensor's squares
    // added by `sum_squares` on at most 1024 blocks; then a grid smaller than
    // the data, which the kernel's loop must cover.
    let (mut grads, _) = gradients(&tensors);
    let want = clip_by_norm(&mut grads, 1.0).unwrap();
    for blocks in [None, Some(2)] {
        let mut acc = poisoned(1);
        emu.launch(
            "elementwise",
            "fill",
            grid(1).unwrap(),
            &mut [Out(&mut acc), I32(1), F32(0.0)],
        );
        for t in &tensors {
            let n = t.numel();
            let cfg = LaunchConfig {
                grid_dim: (blocks.unwrap_or(grid(n).unwrap().grid_dim.0.min(1024)), 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            emu.launch(
                "optim",
                "sum_squares",
                cfg,
                &mut [In(&vals(t)), I32(n as i32), Out(&mut acc)],
            );
        }
        assert_close(
            &format!("global norm, {blocks:?} blocks"),
            &[acc[0].sqrt()],
            &[want],
        );
    }
}

// ---- gaussian.cu -----------------------------------------------------------

#[test]
fn gaussian_reparameterize_and_kl() {
    let Some(emu) = Emu::get() else { return };
    for (i, &(rows, d)) in [(1, 1), (4, 3), (7, 33), (300, 2)].iter().enumerate() {
        let seed = 10 * i as u64;
        let n = rows * d;
        let shape = [rows, d];
        let (mq, mp) = (randn(&shape, seed), randn(&shape, seed + 1));
        let (lq, lp) = (
            uniform(&shape, -2.0, 2.0, seed + 2),
            uniform(&shape, -2.0, 2.0, seed + 3),
        );
        let (eps, g) = (randn(&shape, seed + 4), randn(&shape, seed + 5));
        let (n32, d32) = (n as i32, d as i32);

        let mut z = poisoned(n);
        emu.launch(
            "gaussian",
            "reparameterize",
            grid(n).unwrap(),
            &mut [
                In(&vals(&mq)),
                In(&vals(&lq)),
                In(&vals(&eps)),
                Out(&mut z),
                I32(n32),
            ],
        );
        assert_close(
            "reparameterize",
            &z,
            &vals(&reparameterize_forward(&mq, &lq, &eps).unwrap()),
        );

        let mut dlv = poisoned(n);
        emu.launch(
            "gaussian",
            "reparameterize_backward",
            grid(n).unwrap(),
            &mut [
                In(&vals(&lq)),
                In(&vals(&eps)),
                In(&vals(&g)),
                Out(&mut dlv),
                I32(n32),
            ],
        );
        let want = reparameterize_backward(&lq, &eps, &g).unwrap().1;
        assert_close("reparameterize_backward", &dlv, &vals(&want));

        let ins = [&mq, &lq, &mp, &lp].map(vals);
        let mut kl = poisoned(rows);
        emu.launch(
            "gaussian",
            "kl_diag",
            grid(rows).unwrap(),
            &mut [
                In(&ins[0]),
                In(&ins[1]),
                In(&ins[2]),
                In(&ins[3]),
                Out(&mut kl),
                I32(rows as i32),
                I32(d32),
            ],
        );
        let want = kl_diag_gaussians_forward(&mq, &lq, &mp, &lp).unwrap();
        assert_close("kl_diag", &kl, &vals(&want));

        let gk = randn(&[rows], seed + 6);
        let [mut a, mut b, mut c, mut e] = [(); 4].map(|_| poisoned(n));
        emu.launch(
            "gaussian",
            "kl_diag_backward",
            grid(n).unwrap(),
            &mut [
                In(&ins[0]),
                In(&ins[1]),
                In(&ins[2]),
                In(&ins[3]),
                In(&vals(&gk)),
                Out(&mut a),
                Out(&mut b),
                Out(&mut c),
                Out(&mut e),
                I32(n32),
                I32(d32),
            ],
        );
        let want = kl_diag_gaussians_backward(&mq, &lq, &mp, &lp, &gk).unwrap();
        for (name, got, w) in [
            ("mu_q", &a, &want[0]),
            ("logvar_q", &b, &want[1]),
            ("mu_p", &c, &want[2]),
            ("logvar_p", &e, &want[3]),
        ] {
            assert_close(&format!("kl_diag_backward d{name} [{rows}, {d}]"), got, &vals(w));
        }
    }
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
            &mut [Out(&mut y), I32(10)],
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
    let e = panic_of(|| emu.launch("selftest", "divergent_barrier", threads(64), &mut [Out(&mut y)]));
    assert!(
        e.contains("10 thread(s) wait at __syncthreads") && e.contains("54 returned"),
        "{e}"
    );
    let e = panic_of(|| {
        emu.launch(
            "selftest",
            "return_before_barrier",
            threads(64),
            &mut [Out(&mut y), I32(50)],
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
        &mut [In(&x), Out(&mut out)],
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
    let e = panic_of(|| {
        emu.launch(
            "elementwise",
            "fill",
            grid(4).unwrap(),
            &mut [Out(&mut y), I64(4), F32(1.0)],
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
            grid(4).unwrap(),
            &mut [In(&[0.0; 4]), I32(4), F32(1.0)],
        )
    });
    assert!(e.contains("launched with (float const*, int, float)"), "{e}");
    let e = panic_of(|| {
        emu.launch(
            "elementwise",
            "fill",
            threads(2048),
            &mut [Out(&mut y), I32(4), F32(1.0)],
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
            In(&x),
            Out(&mut sum),
            Out(&mut mx),
            Out(&mut ballot),
            Out(&mut left),
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
        &mut [In(&x), Out(&mut y), I32(n as i32)],
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

/// Runs without g++ too: the names come from the sources.
#[test]
fn every_kernel_has_an_emulation_test() {
    let src = "// __global__ in a comment\nextern \"C\" __global__ void a(int n) {}\n\
               extern \"C\" __global__ void __launch_bounds__(256) b(const float* x) {}";
    assert_eq!(emulation::kernel_names(src), ["a", "b"]);
    let this = include_str!("kernel_emulation.rs");
    let missing: Vec<String> = KERNEL_FILES
        .iter()
        .flat_map(|(file, src)| emulation::kernel_names(src).into_iter().map(move |k| (file, k)))
        .filter(|(_, k)| !this.contains(&format!("\"{k}\"")))
        .map(|(file, k)| format!("kernels/{file}.cu: {k}"))
        .collect();
    assert!(
        missing.is_empty(),
        "kernels without an emulation test (see the top of tests/kernel_emulation.rs): {missing:?}"
    );
}

// --- pool ---

use saccade::ops::pool::{
    avg_pool2d_backward, avg_pool2d_forward, global_avg_pool_backward, global_avg_pool_forward,
    max_pool2d_backward, max_pool2d_forward,
};

/// `pool::cuda::Window::new` of an `[n, c, h, w]` input: `[h, w, ho, wo, k, s, p]`.
fn pool_window(x: &[usize], (ho, wo): (usize, usize), (k, s, p): (usize, usize, usize)) -> [i32; 7] {
    [x[2], x[3], ho, wo, k, s, p].map(|v| v as i32)
}

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
    let Some(emu) = Emu::get() else { return };
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
        let y_cpu = avg_pool2d_forward(&x, k, s).unwrap();
        let (ho, wo) = (y_cpu.shape()[2], y_cpu.shape()[3]);
        let win = pool_window(&shape, (ho, wo), (k, s, 0));
        let scale = 1.0 / (k * k) as f32;
        let n = y_cpu.numel();
        let mut y = poisoned(n);
        emu.launch(
            "pool",
            "avg_pool2d",
            grid(n).unwrap(),
            &mut [In(&vals(&x)), Out(&mut y), I32(n as i32), Window(win), F32(scale)],
        );
        let what = format!("{shape:?} k{k} s{s}");
        assert_close(&format!("avg_pool2d {what}"), &y, &vals(&y_cpu));

        let gy = randn(y_cpu.shape(), 100 + i as u64);
        let n = x.numel();
        let mut dx = poisoned(n);
        emu.launch(
            "pool",
            "avg_pool2d_backward",
            grid(n).unwrap(),
            &mut [
                In(&vals(&gy)),
                Out(&mut dx),
                I32(n as i32),
                Window(win),
                F32(scale),
            ],
        );
        let want = avg_pool2d_backward(&x, &gy, k, s).unwrap();
        assert_close(&format!("avg_pool2d_backward {what}"), &dx, &vals(&want));
    }
}

#[test]
fn pool_max_pool2d_forward_and_backward_with_ties() {
    let Some(emu) = Emu::get() else { return };
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
        let constant = Tensor::from_vec(vec![0.5; shape.iter().product()], &shape, &Device::cpu()).unwrap();
        for (kind, x) in [
            ("distinct", randn(&shape, i as u64)),
            ("ties", ties(&shape, i as u64)),
            ("constant", constant),
        ] {
            let y_cpu = max_pool2d_forward(&x, k, s, p).unwrap();
            let (ho, wo) = (y_cpu.shape()[2], y_cpu.shape()[3]);
            let win = pool_window(&shape, (ho, wo), (k, s, p));
            let xv = vals(&x);
            let n = y_cpu.numel();
            let mut y = poisoned(n);
            emu.launch(
                "pool",
                "max_pool2d",
                grid(n).unwrap(),
                &mut [In(&xv), Out(&mut y), I32(n as i32), Window(win)],
            );
            let what = format!("{shape:?} k{k} s{s} p{p} {kind}");
            assert_close(&format!("max_pool2d {what}"), &y, &vals(&y_cpu));

            let gy = randn(y_cpu.shape(), 100 + i as u64);
            let n = x.numel();
            let mut dx = poisoned(n);
            emu.launch(
                "pool",
                "max_pool2d_backward",
                grid(n).unwrap(),
                &mut [In(&xv), In(&vals(&gy)), Out(&mut dx), I32(n as i32), Window(win)],
            );
            let want = max_pool2d_backward(&x, &gy, k, s, p).unwrap();
            assert_close(&format!("max_pool2d_backward {what}"), &dx, &vals(&want));
        }
    }
}

#[test]
fn pool_global_avg_pool_forward_and_backward() {
    let Some(emu) = Emu::get() else { return };
    // More planes than a block, one pixel per plane, large odd planes.
    for (i, shape) in [[2, 3, 5, 7], [1, 1, 1, 1], [3, 100, 2, 1], [1, 2, 33, 31]]
        .iter()
        .enumerate()
    {
        let x = randn(shape, i as u64);
        let (planes, hw) = (shape[0] * shape[1], shape[2] * shape[3]);
        let mut y = poisoned(planes);
        emu.launch(
            "pool",
            "global_avg_pool",
            grid(planes).unwrap(),
            &mut [In(&vals(&x)), Out(&mut y), I32(planes as i32), I32(hw as i32)],
        );
        assert_close(
            &format!("global_avg_pool {shape:?}"),
            &y,
            &vals(&global_avg_pool_forward(&x).unwrap()),
        );

        let gy = randn(&shape[..2], 100 + i as u64);
        let n = planes * hw;
        let mut dx = poisoned(n);
        emu.launch(
            "pool",
            "global_avg_pool_backward",
            grid(n).unwrap(),
            &mut [In(&vals(&gy)), Out(&mut dx), I32(n as i32), I32(hw as i32)],
        );
        let want = global_avg_pool_backward(&x, &gy).unwrap();
        assert_close(&format!("global_avg_pool_backward {shape:?}"), &dx, &vals(&want));
    }
}

// --- resize ---

use saccade::ops::resize::{resize_bilinear_backward, resize_bilinear_forward};

#[test]
fn resize_bilinear_up_down_forward_and_backward() {
    let Some(emu) = Emu::get() else { return };
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
        let y_cpu = resize_bilinear_forward(&x, oh, ow).unwrap();
        let (h, w) = (shape[2], shape[3]);
        // As resize::cuda::resize_bilinear computes them.
        let (sy, sx) = (h as f32 / oh as f32, w as f32 / ow as f32);
        let [h, w, oh, ow] = [h, w, oh, ow].map(|v| v as i32);
        let what = format!("{shape:?} -> {oh}x{ow}");

        let n = y_cpu.numel();
        let mut y = poisoned(n);
        emu.launch(
            "resize",
            "resize_bilinear",
            grid(n).unwrap(),
            &mut [
                In(&vals(&x)),
                Out(&mut y),
                I32(n as i32),
                I32(h),
                I32(w),
                I32(oh),
                I32(ow),
                F32(sy),
                F32(sx),
            ],
        );
        assert_close(&format!("resize_bilinear {what}"), &y, &vals(&y_cpu));

        let gy = randn(y_cpu.shape(), 100 + i as u64);
        let n = x.numel();
        let mut dx = poisoned(n);
        emu.launch(
            "resize",
            "resize_bilinear_backward",
            grid(n).unwrap(),
            &mut [
                In(&vals(&gy)),
                Out(&mut dx),
                I32(n as i32),
                I32(h),
                I32(w),
                I32(oh),
                I32(ow),
                F32(sy),
                F32(sx),
            ],
        );
        let want = resize_bilinear_backward(&x, &gy).unwrap();
        assert_close(&format!("resize_bilinear_backward {what}"), &dx, &vals(&want));
    }
}

// --- loss ---

use saccade::ops::loss::{
    bce_with_logits_backward, bce_with_logits_forward, gaussian_nll_backward, gaussian_nll_forward, softmax,
    softmax_backward, softmax_cross_entropy_backward, softmax_cross_entropy_forward,
};

/// The launch of `loss::cuda::block_per_row`: one block of `BLOCK` threads per row.
fn block_per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Per-sample loss inputs: one element, a partial block, rows longer than a
/// block (70001, as fast as 3000 here), several rows, more than two axes.
const LOSS_SHAPES: &[&[usize]] = &[&[1, 1], &[3, 7], &[2, 257], &[2, 70001], &[20, 3], &[2, 3, 5]];

#[test]
fn loss_bce_with_logits_forward_and_backward() {
    let Some(emu) = Emu::get() else { return };
    for (i, &shape) in LOSS_SHAPES.iter().enumerate() {
        let seed = 10 * i as u64;
        let x = uniform(shape, -30.0, 30.0, seed);
        let t = uniform(shape, 0.0, 1.0, seed + 1);
        let (rows, n) = (shape[0], x.numel());
        let d = n / rows;
        let (xv, tv) = (vals(&x), vals(&t));
        let mut out = poisoned(rows);
        emu.launch(
            "loss",
            "bce_with_logits",
            block_per_row(rows),
            &mut [In(&xv), In(&tv), Out(&mut out), I32(d as i32)],
        );
        let want = bce_with_logits_forward(&x, &t).unwrap();
        assert_close(&format!("bce_with_logits {shape:?}"), &out, &vals(&want));

        let g = randn(&[rows], seed + 2);
        let mut dx = poisoned(n);
        emu.launch(
            "loss",
            "bce_with_logits_backward",
            grid(n).unwrap(),
            &mut [
                In(&xv),
                In(&tv),
                In(&vals(&g)),
                Out(&mut dx),
                I32(n as i32),
                I32(d as i32),
            ],
        );
        let want = bce_with_logits_backward(&x, &t, &g).unwrap();
        assert_close(&format!("bce_with_logits_backward {shape:?}"), &dx, &vals(&want));
    }

    // A target outside [0, 1], an error on the CPU, makes its row NaN.
    let (x, mut t) = (vals(&randn(&[3, 5], 1)), vals(&uniform(&[3, 5], 0.0, 1.0, 2)));
    t[7] = 1.5;
    let mut out = poisoned(3);
    emu.launch(
        "loss",
        "bce_with_logits",
        block_per_row(3),
        &mut [In(&x), In(&t), Out(&mut out), I32(5)],
    );
    assert!(
        out[0].is_finite() && out[1].is_nan() && out[2].is_finite(),
        "{out:?}"
    );
}

#[test]
fn loss_gaussian_nll_forward_and_backward() {
    let Some(emu) = Emu::get() else { return };
    for (i, &shape) in LOSS_SHAPES.iter().enumerate() {
        let seed = 10 * i as u64;
        let (x, mu) = (randn(shape, seed), randn(shape, seed + 1));
        let lv = uniform(shape, -3.0, 3.0, seed + 2);
        let (rows, n) = (shape[0], mu.numel());
        let d = n / rows;
        let ins = [&x, &mu, &lv].map(vals);
        let mut out = poisoned(rows);
        emu.launch(
            "loss",
            "gaussian_nll",
            block_per_row(rows),
            &mut [
                In(&ins[0]),
                In(&ins[1]),
                In(&ins[2]),
                Out(&mut out),
                I32(d as i32),
            ],
        );
        let want = gaussian_nll_forward(&x, &mu, &lv).unwrap();
        assert_close(&format!("gaussian_nll {shape:?}"), &out, &vals(&want));

        let g = randn(&[rows], seed + 3);
        let (mut dmu, mut dlv) = (poisoned(n), poisoned(n));
        emu.launch(
            "loss",
            "gaussian_nll_backward",
            grid(n).unwrap(),
            &mut [
                In(&ins[0]),
                In(&ins[1]),
                In(&ins[2]),
                In(&vals(&g)),
                Out(&mut dmu),
                Out(&mut dlv),
                I32(n as i32),
                I32(d as i32),
            ],
        );
        let want = gaussian_nll_backward(&x, &mu, &lv, &g).unwrap();
        assert_close(
            &format!("gaussian_nll_backward dmu {shape:?}"),
            &dmu,
            &vals(&want.0),
        );
        assert_close(
            &format!("gaussian_nll_backward dlogvar {shape:?}"),
            &dlv,
            &vals(&want.1),
        );
    }
}

/// Logits `[rows, k]`: one class, a partial block, more rows than a block,
/// rows longer than a block.
const CLASSES: &[(usize, usize)] = &[(1, 1), (5, 7), (300, 3), (2, 257), (2, 70001)];

#[test]
fn loss_softmax_cross_entropy_forward_and_backward() {
    let Some(emu) = Emu::get() else { return };
    for (i, &(rows, k)) in CLASSES.iter().enumerate() {
        let seed = 10 * i as u64;
        // Wide enough that a shift-free exp would overflow.
        let x = uniform(&[rows, k], -100.0, 100.0, seed);
        let labels: Vec<usize> = vals(&uniform(&[rows], 0.0, k as f32, seed + 1))
            .iter()
            .map(|&v| (v as usize).min(k - 1))
            .collect();
        // As loss::cuda::upload_labels passes them.
        let ys: Vec<f32> = labels.iter().map(|&y| y as f32).collect();
        let xv = vals(&x);
        let (mut loss, mut lse) = (poisoned(rows), poisoned(rows));
        emu.launch(
            "loss",
            "softmax_cross_entropy",
            grid(rows).unwrap(),
            &mut [
                In(&xv),
                In(&ys),
                Out(&mut loss),
                Out(&mut lse),
                I32(rows as i32),
                I32(k as i32),
            ],
        );
        let (want_loss, want_lse) = softmax_cross_entropy_forward(&x, &labels).unwrap();
        assert_close(
            &format!("softmax_cross_entropy loss [{rows}, {k}]"),
            &loss,
            &vals(&want_loss),
        );
        assert_close(
            &format!("softmax_cross_entropy lse [{rows}, {k}]"),
            &lse,
            &vals(&want_lse),
        );

        let g = randn(&[rows], seed + 2);
        let n = rows * k;
        let mut dx = poisoned(n);
        emu.launch(
            "loss",
            "softmax_cross_entropy_backward",
            grid(n).unwrap(),
            &mut [
                In(&xv),
                In(&ys),
                In(&lse),
                In(&vals(&g)),
                Out(&mut dx),
                I32(n as i32),
                I32(k as i32),
            ],
        );
        let want = softmax_cross_entropy_backward(&x, &labels, &want_lse, &g).unwrap();
        assert_close(
            &format!("softmax_cross_entropy_backward [{rows}, {k}]"),
            &dx,
            &vals(&want),
        );
    }
}

#[test]
fn loss_softmax_forward_and_backward() {
    let Some(emu) = Emu::get() else { return };
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
        // As loss::softmax and its launcher compute them.
        let (n, k) = (x.numel(), shape[shape.len() - 1]);
        let rows = n / k;
        let mut y = poisoned(n);
        emu.launch(
            "loss",
            "softmax",
            grid(rows).unwrap(),
            &mut [In(&vals(&x)), Out(&mut y), I32(rows as i32), I32(k as i32)],
        );
        let y_cpu = softmax(&x).unwrap();
        assert_close(&format!("softmax {shape:?}"), &y, &vals(&y_cpu));

        let g = randn(shape, 100 + i as u64);
        let mut dx = poisoned(n);
        emu.launch(
            "loss",
            "softmax_backward",
            grid(rows).unwrap(),
            &mut [
                In(&vals(&y_cpu)),
                In(&vals(&g)),
                Out(&mut dx),
                I32(rows as i32),
                I32(k as i32),
            ],
        );
        let want = softmax_backward(&y_cpu, &g).unwrap();
        assert_close(&format!("softmax_backward {shape:?}"), &dx, &vals(&want));
    }
}
