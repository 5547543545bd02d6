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

// --- sampler ---

use emulation::Arg;
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

/// `affine_grid`'s grid `[n, oh, ow, 2]` as `sampler::cuda::affine_grid` launches it.
fn emu_affine_grid(emu: &Emu, theta: &Tensor, oh: usize, ow: usize) -> Vec<f32> {
    let n = theta.dim(0);
    let mut g = poisoned(n * oh * ow * 2);
    emu.launch(
        "sampler",
        "affine_grid",
        grid(n * oh * ow).unwrap(),
        &mut [
            In(&vals(theta)),
            Out(&mut g),
            I32(n as i32),
            I32(oh as i32),
            I32(ow as i32),
        ],
    );
    g
}

/// theta's gradient `[n, 2, 3]` as `sampler::cuda::affine_grid_backward`
/// launches it: one block of BLOCK threads per theta entry.
fn emu_affine_grid_backward(emu: &Emu, gg: &[f32], n: usize, oh: usize, ow: usize) -> Vec<f32> {
    let cfg = LaunchConfig {
        grid_dim: ((n * 6) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut dtheta = poisoned(n * 6);
    emu.launch(
        "sampler",
        "affine_grid_backward",
        cfg,
        &mut [In(gg), Out(&mut dtheta), I32(oh as i32), I32(ow as i32)],
    );
    dtheta
}

#[test]
fn sampler_affine_grid_and_backward() {
    let Some(emu) = Emu::get() else { return };
    for (k, &(n, oh, ow)) in [(1, 1, 1), (4, 5, 7), (3, 32, 32), (2, 17, 3)].iter().enumerate() {
        let seed = 10 * k as u64;
        let theta = sampler_thetas(n, k, seed);
        let what = format!("n={n} {oh}x{ow}");
        let g = emu_affine_grid(emu, &theta, oh, ow);
        assert_close(
            &format!("affine_grid {what}"),
            &g,
            &vals(&affine_grid_forward(&theta, oh, ow).unwrap()),
        );
        let gg = randn(&[n, oh, ow, 2], seed + 1);
        assert_close(
            &format!("affine_grid_backward {what}"),
            &emu_affine_grid_backward(emu, &vals(&gg), n, oh, ow),
            &vals(&affine_grid_backward(&gg).unwrap()),
        );
    }
}

/// `args` followed by `ints` as `I32`s.
fn with_ints<'a>(mut args: Vec<Arg<'a>>, ints: &[usize]) -> Vec<Arg<'a>> {
    args.extend(ints.iter().map(|&v| I32(v as i32)));
    args
}

#[test]
fn sampler_grid_sample_forward_and_backward() {
    let Some(emu) = Emu::get() else { return };
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
        for (gk, grid_t) in grids.iter().enumerate() {
            let what = format!("n={n} c={c} {h}x{w} -> {oh}x{ow}, grid {gk}");
            let want = grid_sample_forward(&img, grid_t).unwrap();
            let (want_gimg, want_ggrid) = grid_sample_backward(&img, grid_t, &gout, true).unwrap();
            let (iv, gv, gov) = (vals(&img), vals(grid_t), vals(&gout));
            let ints = [n, c, h, w, oh * ow];
            let mut out = poisoned(n * c * oh * ow);
            emu.launch(
                "sampler",
                "grid_sample",
                grid(n * c * oh * ow).unwrap(),
                &mut with_ints(vec![In(&iv), In(&gv), Out(&mut out)], &ints),
            );
            assert_close(&format!("grid_sample {what}"), &out, &vals(&want));
            let mut ggrid = poisoned(n * oh * ow * 2);
            emu.launch(
                "sampler",
                "grid_sample_backward_grid",
                grid(n * oh * ow).unwrap(),
                &mut with_ints(vec![In(&iv), In(&gv), In(&gov), Out(&mut ggrid)], &ints),
            );
            assert_close(
                &format!("grid_sample_backward_grid {what}"),
                &ggrid,
                &vals(&want_ggrid),
            );
            // The launcher zero-fills the image gradient with `fill`, then scatters.
            let len = n * c * h * w;
            let mut gimg = poisoned(len);
            emu.launch(
                "elementwise",
                "fill",
                grid(len).unwrap(),
                &mut [Out(&mut gimg), I32(len as i32), F32(0.0)],
            );
            emu.launch(
                "sampler",
                "grid_sample_backward_img",
                grid(n * c * oh * ow).unwrap(),
                &mut with_ints(vec![In(&gv), In(&gov), Out(&mut gimg)], &ints),
            );
            assert_close(
                &format!("grid_sample_backward_img {what}"),
                &gimg,
                &vals(&want_gimg.unwrap()),
            );
        }
    }
}

/// The localized crop as `localized_crop_forward` and `_backward` run it on
/// the GPU: regions read on the host (the CPU op's windows and table), the
/// grid from `affine_grid`, the crop, then the grid's gradient through
/// `affine_grid_backward` to theta's. Samples alternate between 37x53 and
/// 9x7 images, so the table's per-sample image sizes matter.
#[test]
fn sampler_localized_crop_forward_and_backward() {
    let Some(emu) = Emu::get() else { return };
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
        let (want, saved) = localized_crop_forward(&sources, &theta, oh, ow, level).unwrap();
        let want_dtheta = localized_crop_backward(&saved, &gout).unwrap();
        let what = format!("n={n} c={c} level {level} {oh}x{ow}");

        let (windows, table) = (vals(saved.windows()), saved.window_table().unwrap());
        let g = emu_affine_grid(emu, &theta, oh, ow);
        let ints = [n, c, oh * ow];
        let mut out = poisoned(n * c * oh * ow);
        emu.launch(
            "sampler",
            "localized_crop",
            grid(n * c * oh * ow).unwrap(),
            &mut with_ints(vec![In(&windows), InInt(&table), In(&g), Out(&mut out)], &ints),
        );
        assert_close(&format!("localized_crop {what}"), &out, &vals(&want));
        let mut ggrid = poisoned(n * oh * ow * 2);
        emu.launch(
            "sampler",
            "localized_crop_backward",
            grid(n * oh * ow).unwrap(),
            &mut with_ints(
                vec![
                    In(&windows),
                    InInt(&table),
                    In(&g),
                    In(&vals(&gout)),
                    Out(&mut ggrid),
                ],
                &ints,
            ),
        );
        // The grid's gradient equals grid_sample's on the whole level image.
        let (pts, outs) = (oh * ow * 2, c * oh * ow);
        let cpu = Device::cpu();
        for (i, img) in images.iter().enumerate() {
            let (lh, lw) = img.level_size(level);
            let level_img = Tensor::from_vec(img.level_data(level).to_vec(), &[1, c, lh, lw], &cpu).unwrap();
            let grid_i = Tensor::from_vec(g[i * pts..(i + 1) * pts].to_vec(), &[1, oh, ow, 2], &cpu).unwrap();
            let gout_i = Tensor::from_vec(
                vals(&gout)[i * outs..(i + 1) * outs].to_vec(),
                &[1, c, oh, ow],
                &cpu,
            );
            let (_, want_ggrid) = grid_sample_backward(&level_img, &grid_i, &gout_i.unwrap(), false).unwrap();
            assert_close(
                &format!("localized_crop_backward {what}, sample {i}"),
                &ggrid[i * pts..(i + 1) * pts],
                &vals(&want_ggrid),
            );
        }
        assert_close(
            &format!("localized_crop theta gradient {what}"),
            &emu_affine_grid_backward(emu, &ggrid, n, oh, ow),
            &vals(&want_dtheta),
        );
    }
}

// --- conv ---
//
// The launchers of src/ops/conv.rs (`mod cuda`) chain im2col, the batched
// GEMM (`linear::cuda::sgemm_view`) and col2im over chunks of images; the
// functions below repeat them launch for launch, buffers as the launchers
// allocate them (NaN, as `alloc` leaves them under poisoning) and views as
// sub-slices, with the chunk budget a parameter so that small batches split.

use saccade::ops::conv::{
    conv2d_backward, conv2d_forward, conv_out_size, conv_transpose2d_backward, conv_transpose2d_forward,
};

/// `Geom` of src/ops/conv.rs: the convolution seen from its input side.
#[derive(Clone, Copy, Debug)]
struct ConvGeom {
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl ConvGeom {
    /// As `conv_geom`: input `[c, h, w]`, weight `[o, c, kh, kw]`.
    fn conv(x: &[usize], w: &[usize], stride: usize, pad: usize) -> ConvGeom {
        let (h, wd, kh, kw) = (x[2], x[3], w[2], w[3]);
        ConvGeom {
            c: x[1],
            h,
            w: wd,
            kh,
            kw,
            stride,
            pad,
            ho: conv_out_size(h, kh, stride, pad).unwrap(),
            wo: conv_out_size(wd, kw, stride, pad).unwrap(),
        }
    }
    /// As `transpose_geom`: the conv whose adjoint maps `x` to `out`.
    fn transpose(x: &[usize], w: &[usize], out: &[usize], stride: usize, pad: usize) -> ConvGeom {
        ConvGeom {
            c: w[1],
            h: out[2],
            w: out[3],
            kh: w[2],
            kw: w[3],
            stride,
            pad,
            ho: x[2],
            wo: x[3],
        }
    }
    fn ck(&self) -> usize {
        self.c * self.kh * self.kw
    }
    fn hw(&self) -> usize {
        self.ho * self.wo
    }
    fn img_len(&self) -> usize {
        self.c * self.h * self.w
    }
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    /// `cuda::dims`: the kernels' `struct ConvDims`.
    fn dims(&self) -> emulation::Arg<'static> {
        let g = self;
        ConvDims([g.c, g.h, g.w, g.kh, g.kw, g.stride, g.pad, g.ho, g.wo].map(|d| d as i32))
    }
}

/// `conv::cuda::BUDGET`, the launchers' scratch floats per chunk.
const CONV_BUDGET: usize = 1 << 22;

/// `conv::cuda::chunk_size` under `budget`.
fn conv_chunk_size(n: usize, per_image: usize, budget: usize) -> usize {
    (budget / per_image.max(1)).clamp(1, 65_535).min(n.max(1))
}

type Operand<'a> = (&'a [f32], bool, usize);

/// `linear::cuda::sgemm_view`: `c[z] = a[z] b[z] (+ c[z])`, `c[z]` is `m x n`.
fn emu_sgemm(
    emu: &Emu,
    batch: usize,
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    c: &mut [f32],
    acc: bool,
) {
    if batch * m * n == 0 {
        return;
    }
    let ((a, ta, sa), (b, tb, sb)) = (a, b);
    emu.launch(
        "matmul",
        "sgemm",
        sgemm_config(batch, m, n),
        &mut [
            In(a),
            In(b),
            Out(c),
            I32(m as i32),
            I32(n as i32),
            I32(k as i32),
            I32(ta as i32),
            I32(tb as i32),
            I64(sa as i64),
            I64(sb as i64),
            I32(acc as i32),
        ],
    );
}

/// `cuda::chunk_cols`: the `nz` images `x` themselves for a pointwise conv,
/// else the scratch `cols` (all of it) filled by im2col.
fn conv_cols<'a>(
    emu: &Emu,
    g: &ConvGeom,
    x: &'a [f32],
    cols: &'a mut Option<Vec<f32>>,
    nz: usize,
) -> &'a [f32] {
    let Some(c) = cols else { return x };
    emu.launch(
        "conv",
        "im2col",
        grid(nz * g.ck() * g.hw()).unwrap(),
        &mut [In(x), Out(c), g.dims(), I32(nz as i32)],
    );
    c
}

/// `cuda::col_scratch`.
fn conv_col_scratch(g: &ConvGeom, gs: usize) -> Option<Vec<f32>> {
    (!g.pointwise()).then(|| poisoned(gs * g.ck() * g.hw()))
}

/// `cuda::apply`: `colside[n] = W · cols(img[n])`.
fn conv_apply(emu: &Emu, g: &ConvGeom, o: usize, imgs: &[f32], w: &[f32], budget: usize) -> Vec<f32> {
    let (ck, hw, il) = (g.ck(), g.hw(), g.img_len());
    let n = imgs.len() / il;
    let mut out = poisoned(n * o * hw);
    let gs = conv_chunk_size(n, ck * hw, budget);
    let mut cols = conv_col_scratch(g, gs);
    for n0 in (0..n).step_by(gs) {
        let nz = gs.min(n - n0);
        let x = &imgs[n0 * il..(n0 + nz) * il];
        let b = conv_cols(emu, g, x, &mut cols, nz);
        let y = &mut out[n0 * o * hw..(n0 + nz) * o * hw];
        emu_sgemm(emu, nz, (o, hw, ck), (w, false, 0), (b, false, ck * hw), y, false);
    }
    out
}

/// `cuda::adjoint`: `img[n] = col2im(W^T · colside[n])`.
fn conv_adjoint(emu: &Emu, g: &ConvGeom, o: usize, colside: &[f32], w: &[f32], budget: usize) -> Vec<f32> {
    let (ck, hw, il) = (g.ck(), g.hw(), g.img_len());
    let n = colside.len() / (o * hw);
    let mut out = poisoned(n * il);
    let gs = conv_chunk_size(n, ck * hw, budget);
    let mut cols = conv_col_scratch(g, gs);
    for n0 in (0..n).step_by(gs) {
        let nz = gs.min(n - n0);
        let dy = &colside[n0 * o * hw..(n0 + nz) * o * hw];
        let dx = &mut out[n0 * il..(n0 + nz) * il];
        let (a, b) = ((w, true, 0), (dy, false, o * hw));
        match &mut cols {
            None => emu_sgemm(emu, nz, (ck, hw, o), a, b, dx, false),
            Some(c) => {
                emu_sgemm(emu, nz, (ck, hw, o), a, b, c, false);
                emu.launch(
                    "conv",
                    "col2im",
                    grid(nz * il).unwrap(),
                    &mut [In(c), Out(dx), g.dims(), I32(nz as i32)],
                );
            }
        }
    }
    out
}

/// `cuda::weight_grad`: `dW [o, ck] = sum_n colside[n] · cols(img[n])^T`.
fn conv_weight_grad(
    emu: &Emu,
    g: &ConvGeom,
    o: usize,
    imgs: &[f32],
    colside: &[f32],
    budget: usize,
) -> Vec<f32> {
    let (ck, hw, il) = (g.ck(), g.hw(), g.img_len());
    let n = imgs.len() / il;
    let per_image = o * ck + if g.pointwise() { 0 } else { ck * hw };
    let gs = conv_chunk_size(n, per_image, budget);
    let mut cols = conv_col_scratch(g, gs);
    let mut part = (gs > 1).then(|| poisoned(gs * o * ck));
    let mut dw = poisoned(o * ck);
    let len = o * ck;
    emu.launch(
        "elementwise",
        "fill",
        grid(len).unwrap(),
        &mut [Out(&mut dw), I32(len as i32), F32(0.0)],
    );
    for n0 in (0..n).step_by(gs) {
        let nz = gs.min(n - n0);
        let x = &imgs[n0 * il..(n0 + nz) * il];
        let b = conv_cols(emu, g, x, &mut cols, nz);
        let dy = &colside[n0 * o * hw..(n0 + nz) * o * hw];
        let (a, b) = ((dy, false, o * hw), (b, true, ck * hw));
        match &mut part {
            Some(p) if nz > 1 => {
                emu_sgemm(emu, nz, (o, ck, hw), a, b, p, false);
                emu.launch(
                    "conv",
                    "sum_images",
                    grid(len).unwrap(),
                    &mut [In(p), Out(&mut dw), I32(nz as i32), I32(len as i32)],
                );
            }
            _ => emu_sgemm(emu, 1, (o, ck, hw), a, b, &mut dw, true),
        }
    }
    dw
}

/// `cuda::add_bias`: `y[n, c, :] += b[c]`.
fn conv_add_bias(emu: &Emu, y: &mut [f32], b: &[f32], plane: usize) {
    let total = y.len();
    emu.launch(
        "conv",
        "add_bias",
        grid(total).unwrap(),
        &mut [
            Out(y),
            In(b),
            I32(b.len() as i32),
            I32(plane as i32),
            I32(total as i32),
        ],
    );
}

/// `cuda::bias_grad`: `db[c]`, one block per channel.
fn conv_bias_grad(emu: &Emu, gy: &[f32], c: usize, plane: usize) -> Vec<f32> {
    let mut db = poisoned(c);
    let cfg = LaunchConfig {
        grid_dim: (c as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let n = gy.len() / (c * plane);
    emu.launch(
        "conv",
        "bias_grad",
        cfg,
        &mut [
            In(gy),
            Out(&mut db),
            I32(n as i32),
            I32(c as i32),
            I32(plane as i32),
        ],
    );
    db
}

/// Chunk budgets for `g` with `o` channels on the GEMM's other side: the
/// launchers' own (one chunk here), one image per chunk, and two images per
/// chunk for the column matrices and for the weight gradient's scratch (on a
/// batch of 3, a short last chunk).
fn conv_budgets(g: &ConvGeom, o: usize) -> [usize; 4] {
    let per_image = o * g.ck() + if g.pointwise() { 0 } else { g.ck() * g.hw() };
    [CONV_BUDGET, 1, 2 * g.ck() * g.hw(), 2 * per_image]
}

#[test]
fn conv_conv2d_forward_and_backward() {
    let Some(emu) = Emu::get() else { return };
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
    let mut chunks = Vec::new();
    for (k, (xs, ws, s, p)) in cases.into_iter().enumerate() {
        let seed = 10 * k as u64;
        let (x, w, b) = (randn(&xs, seed), randn(&ws, seed + 1), randn(&[ws[0]], seed + 2));
        let y_cpu = conv2d_forward(&x, &w, Some(&b), s, p).unwrap();
        let gy = randn(y_cpu.shape(), seed + 3);
        let (dx_cpu, dw_cpu, db_cpu) = conv2d_backward(&x, &w, &gy, s, p, true).unwrap();
        let g = ConvGeom::conv(&xs, &ws, s, p);
        let o = ws[0];
        let (xv, wv, gyv) = (vals(&x), vals(&w), vals(&gy));
        for budget in conv_budgets(&g, o) {
            let what = |t: &str| format!("conv2d {t} x {xs:?} w {ws:?} stride {s} pad {p} budget {budget}");
            let mut y = conv_apply(emu, &g, o, &xv, &wv, budget);
            conv_add_bias(emu, &mut y, &vals(&b), g.hw());
            assert_close(&what("forward"), &y, &vals(&y_cpu));
            let dx = conv_adjoint(emu, &g, o, &gyv, &wv, budget);
            assert_close(&what("dx"), &dx, &vals(&dx_cpu));
            let dw = conv_weight_grad(emu, &g, o, &xv, &gyv, budget);
            assert_close(&what("dw"), &dw, &vals(&dw_cpu));
            // (batch, images per chunk in apply and adjoint, in weight_grad)
            let (n, wg_per_image) = (xs[0], conv_budgets(&g, o)[3] / 2);
            chunks.push((
                n,
                conv_chunk_size(n, g.ck() * g.hw(), budget),
                conv_chunk_size(n, wg_per_image, budget),
            ));
        }
        let db = conv_bias_grad(emu, &gyv, o, g.hw());
        assert_close(
            &format!("conv2d db case {k}"),
            &db,
            &vals(db_cpu.as_ref().unwrap()),
        );
    }
    // One chunk, one image per chunk, and chunks of 2 + 1 all ran, in each product.
    for gs in 1..=3 {
        assert!(
            chunks.iter().any(|&(n, a, _)| (n, a) == (3, gs)),
            "apply: no chunks of {gs}"
        );
        assert!(
            chunks.iter().any(|&(n, _, w)| (n, w) == (3, gs)),
            "weight_grad: no chunks of {gs}"
        );
    }
}

#[test]
fn conv_conv_transpose2d_forward_and_backward() {
    let Some(emu) = Emu::get() else { return };
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
        let y_cpu = conv_transpose2d_forward(&x, &w, Some(&b), s, p, op).unwrap();
        let gy = randn(y_cpu.shape(), seed + 3);
        let (dx_cpu, dw_cpu, db_cpu) = conv_transpose2d_backward(&x, &w, &gy, s, p, op, true).unwrap();
        let g = ConvGeom::transpose(&xs, &ws, y_cpu.shape(), s, p);
        let (ci, plane) = (xs[1], g.h * g.w);
        let (xv, wv, gyv) = (vals(&x), vals(&w), vals(&gy));
        for budget in conv_budgets(&g, ci) {
            let what = |t: &str| {
                format!(
                    "conv_transpose2d {t} x {xs:?} w {ws:?} stride {s} pad {p} out_pad {op} budget {budget}"
                )
            };
            let mut y = conv_adjoint(emu, &g, ci, &xv, &wv, budget);
            conv_add_bias(emu, &mut y, &vals(&b), plane);
            assert_close(&what("forward"), &y, &vals(&y_cpu));
            let dx = conv_apply(emu, &g, ci, &gyv, &wv, budget);
            assert_close(&what("dx"), &dx, &vals(&dx_cpu));
            let dw = conv_weight_grad(emu, &g, ci, &gyv, &xv, budget);
            assert_close(&what("dw"), &dw, &vals(&dw_cpu));
        }
        let db = conv_bias_grad(emu, &gyv, g.c, plane);
        let what = format!("conv_transpose2d db case {k}");
        assert_close(&what, &db, &vals(db_cpu.as_ref().unwrap()));
    }
}

// --- norm ---

/// `norm::cuda::Segments` of a pooling (`groups` > 0 for group norm, 0 for
/// batch norm) over `[n, c, s]`: (count, len, first, run, step).
fn norm_segments((n, c, s): (usize, usize, usize), groups: usize) -> (usize, i32, i64, i32, i64) {
    match c.checked_div(groups) {
        // Group norm: the C / G channels of one sample's group are contiguous.
        Some(per_group) => {
            let len = per_group * s;
            (n * groups, len as i32, len as i64, len as i32, 0)
        }
        // Batch norm: one channel is a plane of S elements per sample, C * S apart.
        None => (c, (n * s) as i32, s as i64, s as i32, (c * s) as i64),
    }
}

/// `Segments::launch_config`: one block of `BLOCK` threads per segment.
fn norm_segment_config(count: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (count as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// norm.rs's CUDA chain on `x [n, c, s]`: statistics (`norm_stats`, or the
/// given running `(mean, var)`), `norm_rstd`, `norm_forward`, then backward
/// (`norm_backward_sums` per channel, and per statistic when they came from
/// `x`, else zeros by `fill`; `norm_backward_dx`). Returns
/// `[mean, rstd, y, dx, dgamma, dbeta]`.
#[allow(clippy::too_many_arguments)]
fn norm_chain(
    emu: &Emu,
    [x, gamma, beta, gy]: [&[f32]; 4],
    (n, c, s): (usize, usize, usize),
    groups: usize,
    running: Option<(&[f32], &[f32])>,
    eps: f32,
) -> [Vec<f32>; 6] {
    let total = n * c * s;
    let (count, len, first, run, step) = norm_segments((n, c, s), groups);
    let (mean, var) = match running {
        Some((m, v)) => (m.to_vec(), v.to_vec()),
        None => {
            let (mut mean, mut var) = (poisoned(count), poisoned(count));
            emu.launch(
                "norm",
                "norm_stats",
                norm_segment_config(count),
                &mut [
                    In(x),
                    Out(&mut mean),
                    Out(&mut var),
                    I32(len),
                    I64(first),
                    I32(run),
                    I64(step),
                ],
            );
            (mean, var)
        }
    };
    let stats = mean.len();
    let mut rstd = poisoned(stats);
    emu.launch(
        "norm",
        "norm_rstd",
        grid(stats).unwrap(),
        &mut [In(&var), Out(&mut rstd), I32(stats as i32), F32(eps)],
    );
    let (c32, s32, g32) = (c as i32, s as i32, groups as i32);
    let mut y = poisoned(total);
    emu.launch(
        "norm",
        "norm_forward",
        grid(total).unwrap(),
        &mut [
            In(x),
            In(gamma),
            In(beta),
            In(&mean),
            In(&rstd),
            Out(&mut y),
            I32(total as i32),
            I32(c32),
            I32(s32),
            I32(g32),
        ],
    );

    // (sum w * gy, sum w * gy * xhat) per segment of a pooling.
    let sums = |pooling: usize, weighted: bool| {
        let (count, len, first, run, step) = norm_segments((n, c, s), pooling);
        let (mut a, mut b) = (poisoned(count), poisoned(count));
        emu.launch(
            "norm",
            "norm_backward_sums",
            norm_segment_config(count),
            &mut [
                In(x),
                In(gy),
                In(gamma),
                In(&mean),
                In(&rstd),
                Out(&mut a),
                Out(&mut b),
                I32(len),
                I64(first),
                I32(run),
                I64(step),
                I32(c32),
                I32(s32),
                I32(g32),
                I32(weighted as i32),
            ],
        );
        (a, b)
    };
    let (dbeta, dgamma) = sums(0, false);
    let (a, b) = if running.is_none() {
        sums(groups, true)
    } else {
        let (mut a, mut b) = (poisoned(stats), poisoned(stats));
        for z in [&mut a, &mut b] {
            emu.launch(
                "elementwise",
                "fill",
                grid(stats).unwrap(),
                &mut [Out(z), I32(stats as i32), F32(0.0)],
            );
        }
        (a, b)
    };
    let mut dx = poisoned(total);
    emu.launch(
        "norm",
        "norm_backward_dx",
        grid(total).unwrap(),
        &mut [
            In(x),
            In(gy),
            In(gamma),
            In(&mean),
            In(&rstd),
            In(&a),
            In(&b),
            Out(&mut dx),
            I32(total as i32),
            I32(c32),
            I32(s32),
            I32(g32),
            I32((total / stats) as i32),
        ],
    );
    [mean, rstd, y, dx, dgamma, dbeta]
}

/// The shapes of the norm tests: batch 1 and 5, spatial 1x1 and 7x9.
const NORM_SHAPES: [[usize; 4]; 4] = [[1, 6, 1, 1], [5, 6, 1, 1], [1, 6, 7, 9], [5, 6, 7, 9]];

/// `assert_close` on dx, relative to the size of the terms it sums
/// (`|gy * gamma * rstd|` at most): a statistic of one element gives dx = 0
/// up to their rounding.
#[track_caller]
fn norm_assert_dx(what: &str, got: &[f32], want: &[f32], [gy, gamma, rstd]: [&[f32]; 3]) {
    let max = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = max(want).max(max(gy) * max(gamma) * max(rstd));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * w.abs().max(1e-2 * scale),
            "{what}: element {i}: kernel {g} vs CPU {w}"
        );
    }
}

#[test]
fn norm_group_norm_forward_and_backward() {
    use saccade::ops::norm::{group_norm_backward, group_norm_forward};
    let Some(emu) = Emu::get() else { return };
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
            let (y, mean, rstd) = group_norm_forward(&x, &gamma, &beta, groups, eps).unwrap();
            let (dx, dg, db) = group_norm_backward(&x, &gamma, &mean, &rstd, groups, &gy).unwrap();
            let (xv, gv, bv, gyv) = (vals(&x), vals(&gamma), vals(&beta), vals(&gy));
            let got = norm_chain(
                emu,
                [&xv, &gv, &bv, &gyv],
                (shape[0], c, shape[2] * shape[3]),
                groups,
                None,
                eps,
            );
            let what = format!("group norm {shape:?} groups {groups}");
            for (name, got, want) in [
                ("mean", &got[0], &mean),
                ("rstd", &got[1], &rstd),
                ("y", &got[2], &y),
                ("dgamma", &got[4], &dg),
                ("dbeta", &got[5], &db),
            ] {
                assert_close(&format!("{what} {name}"), got, &vals(want));
            }
            norm_assert_dx(&format!("{what} dx"), &got[3], &vals(&dx), [&gyv, &gv, &got[1]]);
        }
    }
}

#[test]
fn norm_batch_norm_training_and_eval() {
    use saccade::ops::norm::{batch_norm_backward, batch_norm_forward, batch_stats};
    let Some(emu) = Emu::get() else { return };
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
            // As Graph::batch_norm: the batch's statistics or the running ones.
            let (mean, var) = if training {
                batch_stats(&x).unwrap()
            } else {
                running.clone()
            };
            let rstd = var
                .same_shape(vals(&var).iter().map(|v| 1.0 / (v + eps).sqrt()).collect())
                .unwrap();
            let y = batch_norm_forward(&x, &gamma, &beta, &mean, &rstd).unwrap();
            let (dx, dg, db) = batch_norm_backward(&x, &gamma, &mean, &rstd, training, &gy).unwrap();
            let (xv, gv, bv, gyv) = (vals(&x), vals(&gamma), vals(&beta), vals(&gy));
            let (rm, rv) = (vals(&running.0), vals(&running.1));
            let got = norm_chain(
                emu,
                [&xv, &gv, &bv, &gyv],
                (n, c, s),
                0,
                (!training).then_some((&rm[..], &rv[..])),
                eps,
            );
            let what = format!("batch norm {shape:?} training {training}");
            for (name, got, want) in [
                ("mean", &got[0], &mean),
                ("rstd", &got[1], &rstd),
                ("y", &got[2], &y),
                ("dgamma", &got[4], &dg),
                ("dbeta", &got[5], &db),
            ] {
                assert_close(&format!("{what} {name}"), got, &vals(want));
            }
            norm_assert_dx(&format!("{what} dx"), &got[3], &vals(&dx), [&gyv, &gv, &got[1]]);
        }
    }
}

// --- gru ---

/// One `linear::cuda::sgemm` of batch 1 (strides 0): `c = a b (+ c)`, `c` is
/// `m x n`, `a` and `b` read transposed when `ta`, `tb`.
#[allow(clippy::too_many_arguments)]
fn gru_sgemm(
    emu: &Emu,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    (m, n, k): (usize, usize, usize),
    ta: bool,
    tb: bool,
    acc: bool,
) {
    // sgemm_view launches nothing for an empty product.
    if m * n == 0 {
        return;
    }
    emu.launch(
        "matmul",
        "sgemm",
        sgemm_config(1, m, n),
        &mut [
            In(a),
            In(b),
            Out(c),
            I32(m as i32),
            I32(n as i32),
            I32(k as i32),
            I32(ta as i32),
            I32(tb as i32),
            I64(0),
            I64(0),
            I32(acc as i32),
        ],
    );
}

/// `linear_forward`'s CUDA branch: the bias broadcast to `[nb, fout]`
/// (`broadcast_rows`), then `x W^T` accumulated onto it.
fn gru_linear_forward(
    emu: &Emu,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    (nb, fin, fout): (usize, usize, usize),
) -> Vec<f32> {
    let mut out = poisoned(nb * fout);
    emu.launch(
        "shape",
        "broadcast_rows",
        grid(nb * fout).unwrap(),
        &mut [In(b), Out(&mut out), I32(nb as i32), I32(fout as i32)],
    );
    gru_sgemm(emu, x, w, &mut out, (nb, fout, fin), false, true, true);
    out
}

/// `linear_backward`'s CUDA branch: `(dx, dW, db)` from `g [nb, fout]`, db
/// by `reduce::cuda::sum_axis` over `(1, nb, fout)`.
fn gru_linear_backward(
    emu: &Emu,
    x: &[f32],
    w: &[f32],
    g: &[f32],
    (nb, fin, fout): (usize, usize, usize),
) -> [Vec<f32>; 3] {
    let mut dx = poisoned(nb * fin);
    gru_sgemm(emu, g, w, &mut dx, (nb, fin, fout), false, false, false);
    let mut dw = poisoned(fout * fin);
    gru_sgemm(emu, g, x, &mut dw, (fout, fin, nb), true, false, false);
    let mut db = poisoned(fout);
    let (kernel, cfg) = if (1..4096).contains(&fout) && nb >= 256 {
        let cfg = LaunchConfig {
            grid_dim: (fout as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        ("sum_axis_block", cfg)
    } else {
        ("sum_axis", grid(fout).unwrap())
    };
    emu.launch(
        "reduce",
        kernel,
        cfg,
        &mut [In(g), Out(&mut db), I32(1), I32(nb as i32), I32(fout as i32)],
    );
    [dx, dw, db]
}

#[test]
fn gru_cell_forward_and_backward() {
    use saccade::ops::gru::{gru_cell_backward, gru_cell_forward};
    let Some(emu) = Emu::get() else { return };
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
        let (y, saved) = gru_cell_forward(&x, &h, &w_ih, &w_hh, &b_ih, &b_hh).unwrap();
        let want = gru_cell_backward(&x, &h, &w_ih, &w_hh, &saved, &g).unwrap();
        let [xv, hv, gv, wiv, whv, biv, bhv] = [&x, &h, &g, &w_ih, &w_hh, &b_ih, &b_hh].map(vals);

        let gi = gru_linear_forward(emu, &xv, &wiv, &biv, (n, i, 3 * hd));
        let gh = gru_linear_forward(emu, &hv, &whv, &bhv, (n, hd, 3 * hd));
        let (mut out, mut sv) = (poisoned(n * hd), poisoned(n * 4 * hd));
        emu.launch(
            "gru",
            "gru_forward",
            grid(n * hd).unwrap(),
            &mut [
                In(&gi),
                In(&gh),
                In(&hv),
                Out(&mut out),
                Out(&mut sv),
                I32(n as i32),
                I32(hd as i32),
            ],
        );
        let what = format!("gru n={n} i={i} h={hd}");
        assert_close(&format!("{what} h'"), &out, &vals(&y));
        assert_close(&format!("{what} saved"), &sv, &vals(&saved));

        let (mut d_gi, mut d_gh, mut dh_direct) =
            (poisoned(n * 3 * hd), poisoned(n * 3 * hd), poisoned(n * hd));
        emu.launch(
            "gru",
            "gru_backward",
            grid(n * hd).unwrap(),
            &mut [
                In(&sv),
                In(&gv),
                In(&hv),
                Out(&mut d_gi),
                Out(&mut d_gh),
                Out(&mut dh_direct),
                I32(n as i32),
                I32(hd as i32),
            ],
        );
        let [dx, dw_ih, db_ih] = gru_linear_backward(emu, &xv, &wiv, &d_gi, (n, i, 3 * hd));
        let [dh_gates, dw_hh, db_hh] = gru_linear_backward(emu, &hv, &whv, &d_gh, (n, hd, 3 * hd));
        // add_same: binary_forward's Add over equal shapes.
        let shape = [n, hd];
        let strides = broadcast_strides(&shape, &shape);
        let mut dh = poisoned(n * hd);
        emu.launch(
            "elementwise",
            "binary_forward",
            grid(n * hd).unwrap(),
            &mut [
                In(&dh_gates),
                In(&dh_direct),
                Out(&mut dh),
                I32((n * hd) as i32),
                I32(Binary::Add as i32),
                Dims(Dims::new(&shape, &strides, &strides).unwrap()),
            ],
        );
        for (name, got, w) in [
            ("dx", &dx, &want[0]),
            ("dh", &dh, &want[1]),
            ("dw_ih", &dw_ih, &want[2]),
            ("dw_hh", &dw_hh, &want[3]),
            ("db_ih", &db_ih, &want[4]),
            ("db_hh", &db_hh, &want[5]),
        ] {
            assert_close(&format!("{what} {name}"), got, &vals(w));
        }
    }
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
