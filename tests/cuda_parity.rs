//! GPU against CPU: every op with a CUDA kernel, forward and backward (a
//! vector-Jacobian product with a random seed), on fresh random inputs at
//! several shapes, odd sizes included. New GPU buffers are filled with NaN
//! first, so a kernel that leaves an output element unwritten fails. Without
//! a usable GPU each test prints why it skipped and passes.

use anyhow::Result;
use saccade::gradcheck::rand_tensor;
use saccade::ops::elementwise::{Binary, Unary};
use saccade::optim::{adam_update, clip_by_norm, clip_by_value, AdamConfig};
use saccade::{Device, Graph, Tensor, Var};

/// The GPU with NaN poisoning on, or None after printing why not.
fn gpu() -> Option<Device> {
    match Device::cuda(0) {
        Ok(d) => {
            if let Device::Cuda(c) = &d {
                c.set_poison(true);
            }
            Some(d)
        }
        Err(e) => {
            println!("skipped: {e:#}");
            None
        }
    }
}

/// `got` matches `want` within 1e-4 relative (1e-4 absolute near zero); a NaN fails.
fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
            "{what}: element {i}: gpu {g} vs cpu {w}"
        );
    }
}

/// Output and input gradients of `build` on `inputs` placed on `dev`,
/// backward seeded with `seed` (values of the output's shape).
fn run(
    dev: &Device,
    inputs: &[Tensor],
    seed: u64,
    build: &dyn Fn(&mut Graph, &[Var]) -> Result<Var>,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut g = Graph::new();
    let vars: Vec<Var> = inputs.iter().map(|t| g.leaf(t.to_device(dev).unwrap())).collect();
    let out = build(&mut g, &vars).unwrap();
    let shape = g.shape(out).to_vec();
    let seed = rand_tensor(&shape, seed, &Device::cpu()).to_device(dev).unwrap();
    let grads = g.backward_from(out, seed).unwrap();
    let value = g.value(out).to_vec().unwrap();
    let dins = vars
        .iter()
        .map(|&v| grads.get(v).map(|t| t.to_vec().unwrap()).unwrap_or_default())
        .collect();
    (value, dins)
}

/// Compare `build` on the GPU with the CPU reference.
fn parity(what: &str, gpu: &Device, inputs: &[Tensor], build: impl Fn(&mut Graph, &[Var]) -> Result<Var>) {
    let (want, dwant) = run(&Device::cpu(), inputs, 99, &build);
    let (got, dgot) = run(gpu, inputs, 99, &build);
    assert_close(&format!("{what} forward"), &got, &want);
    for (i, (g, w)) in dgot.iter().zip(&dwant).enumerate() {
        assert_close(&format!("{what} gradient of input {i}"), g, w);
    }
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    rand_tensor(shape, seed, &Device::cpu())
}

fn uniform(shape: &[usize], lo: f32, hi: f32, seed: u64) -> Tensor {
    Tensor::uniform(shape, lo, hi, &mut saccade::gradcheck::rng(seed), &Device::cpu())
}

const SHAPES: &[&[usize]] = &[&[1], &[7], &[3, 5, 17], &[4099], &[2, 3, 65, 67]];

#[test]
fn cuda_parity_unary() {
    let Some(dev) = gpu() else { return };
    for op in [
        Unary::Relu,
        Unary::Elu(0.7),
        Unary::Selu,
        Unary::Sigmoid,
        Unary::Tanh,
        Unary::Softplus,
        Unary::Exp,
        Unary::Affine(-1.5, 0.25),
    ] {
        for (i, s) in SHAPES.iter().enumerate() {
            parity(&format!("{op:?} {s:?}"), &dev, &[randn(s, i as u64)], |g, v| {
                g.unary(v[0], op)
            });
        }
    }
    for s in SHAPES {
        parity(&format!("Log {s:?}"), &dev, &[uniform(s, 0.3, 3.0, 1)], |g, v| {
            g.log(v[0])
        });
    }
}

#[test]
fn cuda_parity_binary() {
    let Some(dev) = gpu() else { return };
    for op in [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div] {
        for (sa, sb) in [
            (vec![2, 3, 4], vec![2, 3, 4]),
            (vec![2, 3, 4], vec![4]),
            (vec![2, 1, 4], vec![3, 1]),
            (vec![1], vec![2, 3]),
            (vec![5, 3, 33, 17], vec![1, 3, 1, 1]),
            (vec![4099], vec![1]),
        ] {
            let (a, b) = (randn(&sa, 3), uniform(&sb, 0.5, 2.0, 4));
            parity(&format!("{op:?} {sa:?} {sb:?}"), &dev, &[a, b], |g, v| {
                g.binary(v[0], v[1], op)
            });
        }
    }
}

#[test]
fn cuda_parity_sum_mean() {
    let Some(dev) = gpu() else { return };
    let x = randn(&[3, 4, 5], 1);
    for axes in [vec![0], vec![1], vec![2], vec![0, 2], vec![0, 1, 2]] {
        parity(
            &format!("sum {axes:?}"),
            &dev,
            std::slice::from_ref(&x),
            |g, v| g.sum(v[0], &axes, false),
        );
        parity(
            &format!("mean {axes:?}"),
            &dev,
            std::slice::from_ref(&x),
            |g, v| g.mean(v[0], &axes, true),
        );
    }
    // Long sums with few outputs take the block-per-output kernel.
    let long = randn(&[3, 5001], 2);
    parity("sum long axis", &dev, std::slice::from_ref(&long), |g, v| {
        g.sum(v[0], &[1], false)
    });
    parity("sum_all", &dev, &[randn(&[70_001], 3)], |g, v| g.sum_all(v[0]));
    parity("mean_all", &dev, &[randn(&[2, 3, 65, 67], 4)], |g, v| {
        g.mean_all(v[0])
    });
}

#[test]
fn cuda_parity_reshape_concat_slice_permute() {
    let Some(dev) = gpu() else { return };
    let a = randn(&[2, 3, 5], 1);
    let b = randn(&[2, 7, 5], 2);
    let c = randn(&[2, 3, 5], 3);
    parity("reshape", &dev, std::slice::from_ref(&a), |g, v| {
        g.reshape(v[0], &[6, 5])
    });
    parity("concat", &dev, &[a.clone(), b.clone()], |g, v| {
        g.concat(&[v[0], v[1]], 1)
    });
    parity("concat axis 0", &dev, &[a.clone(), c.clone()], |g, v| {
        g.concat(&[v[0], v[1]], 0)
    });
    parity("slice", &dev, std::slice::from_ref(&b), |g, v| {
        g.slice(v[0], 1, 2, 3)
    });
    parity("slice last axis", &dev, std::slice::from_ref(&b), |g, v| {
        g.slice(v[0], 2, 1, 3)
    });
    parity("stack", &dev, &[a.clone(), c], |g, v| g.stack(&[v[0], v[1]], 3));
    parity("transpose", &dev, std::slice::from_ref(&a), |g, v| {
        g.transpose(v[0], 0, 2)
    });
    parity("permute", &dev, &[randn(&[3, 4, 33, 17], 4)], |g, v| {
        g.permute(v[0], &[2, 0, 3, 1])
    });
}

#[test]
fn cuda_parity_matmul() {
    let Some(dev) = gpu() else { return };
    for (m, k, n) in [(1, 1, 1), (7, 13, 5), (65, 129, 67), (128, 64, 256)] {
        let (a, b) = (randn(&[m, k], 1), randn(&[k, n], 2));
        parity(&format!("matmul {m}x{k}x{n}"), &dev, &[a, b], |g, v| {
            g.matmul(v[0], v[1])
        });
        let (a3, b3) = (randn(&[3, m, k], 3), randn(&[3, k, n], 4));
        parity(
            &format!("batched matmul {m}x{k}x{n}"),
            &dev,
            &[a3.clone(), b3],
            |g, v| g.matmul(v[0], v[1]),
        );
        let b2 = randn(&[k, n], 5);
        parity(
            &format!("shared-b matmul {m}x{k}x{n}"),
            &dev,
            &[a3, b2],
            |g, v| g.matmul(v[0], v[1]),
        );
    }
}

#[test]
fn cuda_parity_linear() {
    let Some(dev) = gpu() else { return };
    for (nb, fin, fout) in [(1, 1, 1), (5, 7, 3), (130, 257, 65)] {
        let (x, w, b) = (randn(&[nb, fin], 1), randn(&[fout, fin], 2), randn(&[fout], 3));
        parity(
            &format!("linear {nb}x{fin}->{fout}"),
            &dev,
            &[x.clone(), w.clone(), b],
            |g, v| g.linear(v[0], v[1], Some(v[2])),
        );
        parity(
            &format!("linear no bias {nb}x{fin}->{fout}"),
            &dev,
            &[x, w],
            |g, v| g.linear(v[0], v[1], None),
        );
    }
}

#[test]
fn cuda_parity_reparameterize() {
    let Some(dev) = gpu() else { return };
    for s in [&[1, 1][..], &[5, 7], &[3, 4, 17], &[64, 257]] {
        let eps = randn(s, 7);
        let inputs = [randn(s, 1), uniform(s, -2.0, 1.0, 2)];
        parity(&format!("reparameterize {s:?}"), &dev, &inputs, |g, v| {
            let e = eps.to_device(&g.value(v[0]).device())?;
            g.reparameterize(v[0], v[1], &e)
        });
    }
}

#[test]
fn cuda_parity_kl_diag_gaussians() {
    let Some(dev) = gpu() else { return };
    for s in [&[1, 1][..], &[5, 7], &[3, 4, 17], &[64, 257]] {
        let inputs = [
            randn(s, 1),
            uniform(s, -2.0, 1.0, 2),
            randn(s, 3),
            uniform(s, -1.0, 1.0, 4),
        ];
        parity(&format!("kl_diag_gaussians {s:?}"), &dev, &inputs, |g, v| {
            g.kl_diag_gaussians(v[0], v[1], v[2], v[3])
        });
    }
}

#[test]
fn cuda_parity_adam_update() {
    let Some(dev) = gpu() else { return };
    let c = AdamConfig {
        lr: 0.01,
        weight_decay: 0.1,
        ..Default::default()
    };
    for (i, s) in SHAPES.iter().enumerate() {
        let seed = 10 * i as u64;
        let p = randn(s, seed);
        let gr = randn(s, seed + 1);
        let m = randn(s, seed + 2);
        let v = uniform(s, 0.0, 1.0, seed + 3);
        let want = adam_update(&p, &gr, &m, &v, &c, 3).unwrap();
        let on = |t: &Tensor| t.to_device(&dev).unwrap();
        let got = adam_update(&on(&p), &on(&gr), &on(&m), &on(&v), &c, 3).unwrap();
        for (name, g, w) in [
            ("param", got.0, want.0),
            ("m", got.1, want.1),
            ("v", got.2, want.2),
        ] {
            assert_close(
                &format!("adam {name} {s:?}"),
                &g.to_vec().unwrap(),
                &w.to_vec().unwrap(),
            );
        }
    }
}

#[test]
fn cuda_parity_clipping() {
    let Some(dev) = gpu() else { return };
    // Gradients of sum(w * c) are c: known values to clip.
    let grads_on = |d: &Device| {
        let mut g = Graph::new();
        let mut ps = saccade::nn::ParamStore::new();
        let mut loss = None;
        for (i, s) in [&[3, 5][..], &[4099], &[7]].iter().enumerate() {
            let id = ps.add(&format!("w{i}"), randn(s, i as u64).to_device(d).unwrap());
            let w = ps.var(&mut g, id);
            let c = g.constant(randn(s, 10 + i as u64).to_device(d).unwrap());
            let y = g.mul(w, c).unwrap();
            let s = g.sum_all(y).unwrap();
            loss = Some(match loss {
                None => s,
                Some(l) => g.add(l, s).unwrap(),
            });
        }
        let grads = g.backward(loss.unwrap()).unwrap();
        (grads, ps)
    };
    let (mut want, ps) = grads_on(&Device::cpu());
    let (mut got, _) = grads_on(&dev);
    clip_by_value(&mut want, 0.8).unwrap();
    clip_by_value(&mut got, 0.8).unwrap();
    let (nw, ng) = (
        clip_by_norm(&mut want, 5.0).unwrap(),
        clip_by_norm(&mut got, 5.0).unwrap(),
    );
    assert!((nw - ng).abs() <= 1e-4 * nw, "norm gpu {ng} vs cpu {nw}");
    for id in ps.ids() {
        let (g, w) = (got.param(id).unwrap(), want.param(id).unwrap());
        assert_close("clipped gradient", &g.to_vec().unwrap(), &w.to_vec().unwrap());
    }
}

#[test]
fn cuda_allocator_counts_bytes_reuses_buffers_and_agrees_with_the_driver() {
    let Some(dev) = gpu() else { return };
    let Device::Cuda(cuda) = &dev else { unreachable!() };
    let before = dev.memory().live_bytes;
    let n = 16 << 20; // 64 MiB of f32
    let t = Tensor::zeros(&[n], &dev);
    assert_eq!(dev.memory().live_bytes, before + 4 * n);
    assert!(cuda.reserved_bytes() >= dev.memory().live_bytes);
    let (free, total) = cuda.mem_get_info().unwrap();
    assert!(
        total - free >= cuda.reserved_bytes(),
        "driver: {free} of {total} free"
    );
    drop(t);
    assert_eq!(dev.memory().live_bytes, before);
    let reserved = cuda.reserved_bytes();
    let t2 = Tensor::full(&[n], 2.0, &dev);
    assert_eq!(
        cuda.reserved_bytes(),
        reserved,
        "a freed buffer of the class is reused"
    );
    assert!(t2.to_vec().unwrap().iter().all(|&v| v == 2.0));
    drop(t2);
    cuda.empty_cache();
    assert!(cuda.reserved_bytes() < reserved);
}

// --- norm and gru ---

#[test]
fn cuda_parity_group_norm() {
    let Some(dev) = gpu() else { return };
    // With one value per group (groups = C on [N, C]) the variance is zero,
    // rstd = 1 / sqrt(eps) and dx a difference of terms that large, so those
    // cases take a larger eps to stay comparable at 1e-4.
    for (shape, groups, eps) in [
        (&[1, 6][..], 1, 1e-5),
        (&[5, 6][..], 2, 1e-5),
        (&[5, 6][..], 6, 0.1),
        (&[1, 6, 1, 1][..], 2, 1e-5),
        (&[5, 6, 1, 1][..], 6, 0.1),
        (&[1, 6, 7, 9][..], 1, 1e-5),
        (&[5, 6, 7, 9][..], 2, 1e-5),
        (&[5, 6, 7, 9][..], 6, 1e-5),
        (&[3, 5, 17][..], 5, 1e-5),
        (&[2, 32, 33, 31][..], 8, 1e-5),
    ] {
        let c = shape[1];
        // Offset inputs check the variance keeps its precision.
        let inputs = [uniform(shape, 2.0, 4.0, 1), randn(&[c], 2), randn(&[c], 3)];
        parity(
            &format!("group_norm {shape:?} groups {groups}"),
            &dev,
            &inputs,
            |g, v| g.group_norm(v[0], v[1], v[2], groups, eps),
        );
    }
}

#[test]
fn cuda_parity_batch_norm() {
    let Some(dev) = gpu() else { return };
    for (shape, training) in [
        (&[5, 6][..], true),
        (&[5, 6][..], false),
        (&[1, 6][..], false),
        (&[5, 6, 1, 1][..], true),
        (&[1, 6, 7, 9][..], true),
        (&[5, 6, 7, 9][..], true),
        (&[5, 6, 7, 9][..], false),
        (&[8, 3, 33, 31][..], true),
    ] {
        let c = shape[1];
        let inputs = [uniform(shape, -1.0, 3.0, 1), randn(&[c], 2), randn(&[c], 3)];
        let (rm, rv) = (randn(&[c], 4), uniform(&[c], 0.5, 2.0, 5));
        let what = format!("batch_norm {shape:?} training {training}");
        let norm = |g: &mut Graph, v: &[Var]| {
            let d = g.value(v[0]).device();
            g.batch_norm(
                v[0],
                v[1],
                v[2],
                &rm.to_device(&d)?,
                &rv.to_device(&d)?,
                training,
                0.1,
                1e-5,
            )
        };
        parity(&what, &dev, &inputs, |g, v| Ok(norm(g, v)?.0));
        // The updated running statistics.
        let running = |d: &Device| {
            let mut g = Graph::new();
            let v: Vec<Var> = inputs.iter().map(|t| g.leaf(t.to_device(d).unwrap())).collect();
            let r = norm(&mut g, &v).unwrap().1;
            r.map(|(m, v)| [m.to_vec().unwrap(), v.to_vec().unwrap()])
        };
        match (running(&dev), running(&Device::cpu())) {
            (Some(got), Some(want)) => {
                assert_close(&format!("{what} running mean"), &got[0], &want[0]);
                assert_close(&format!("{what} running var"), &got[1], &want[1]);
            }
            (got, want) => assert!(got.is_none() && want.is_none() && !training, "{what}"),
        }
    }
}

#[test]
fn cuda_parity_gru_cell() {
    let Some(dev) = gpu() else { return };
    for (n, i, hd) in [
        (1, 1, 1),
        (5, 3, 1),
        (1, 7, 17),
        (5, 33, 17),
        (5, 65, 128),
        (2, 128, 128),
    ] {
        let inputs = [
            randn(&[n, i], 1),
            uniform(&[n, hd], -1.0, 1.0, 2),
            uniform(&[3 * hd, i], -0.5, 0.5, 3),
            uniform(&[3 * hd, hd], -0.5, 0.5, 4),
            randn(&[3 * hd], 5),
            randn(&[3 * hd], 6),
        ];
        parity(
            &format!("gru_cell n {n} in {i} hidden {hd}"),
            &dev,
            &inputs,
            |g, v| g.gru_cell(v[0], v[1], v[2], v[3], v[4], v[5]),
        );
    }
}

// --- pooling, resize and losses ---

#[test]
fn cuda_parity_avg_pool2d() {
    let Some(dev) = gpu() else { return };
    // (shape, kernel, stride): leftover rows and columns, overlapping
    // windows, stride wider than the kernel, one window, a large image.
    for (i, (s, k, st)) in [
        ([2, 3, 7, 9], 2, 2),
        ([1, 2, 8, 5], 3, 1),
        ([3, 1, 11, 10], 3, 2),
        ([1, 1, 9, 9], 2, 3),
        ([2, 2, 4, 4], 4, 4),
        ([2, 3, 65, 67], 3, 2),
    ]
    .into_iter()
    .enumerate()
    {
        parity(
            &format!("avg_pool2d {s:?} k{k} s{st}"),
            &dev,
            &[randn(&s, i as u64)],
            |g, v| g.avg_pool2d(v[0], k, st),
        );
    }
}

#[test]
fn cuda_parity_max_pool2d() {
    let Some(dev) = gpu() else { return };
    // (shape, kernel, stride, padding): ResNet's 3/2/1, no padding,
    // overlapping windows, stride wider than the kernel, padding half the
    // kernel, a single pixel, a large image.
    let cases = [
        ([2, 3, 9, 7], 3, 2, 1),
        ([1, 2, 8, 5], 3, 1, 0),
        ([3, 1, 11, 10], 2, 2, 1),
        ([1, 1, 9, 9], 2, 3, 0),
        ([2, 2, 4, 4], 4, 4, 2),
        ([1, 1, 1, 1], 3, 2, 1),
        ([2, 4, 33, 35], 3, 2, 1),
    ];
    for (i, &(s, k, st, p)) in cases.iter().enumerate() {
        parity(
            &format!("max_pool2d {s:?} k{k} s{st} p{p}"),
            &dev,
            &[randn(&s, i as u64)],
            |g, v| g.max_pool2d(v[0], k, st, p),
        );
    }
    // Three values only, so most windows hold ties: the GPU must send each
    // gradient to the same (first) maximum as the CPU.
    for &(s, k, st, p) in &cases {
        let n: usize = s.iter().product();
        let x = Tensor::from_vec((0..n).map(|i| (i * 7 % 3) as f32).collect(), &s, &Device::cpu()).unwrap();
        parity(
            &format!("max_pool2d ties {s:?} k{k} s{st} p{p}"),
            &dev,
            &[x],
            |g, v| g.max_pool2d(v[0], k, st, p),
        );
    }
}

#[test]
fn cuda_parity_global_avg_pool() {
    let Some(dev) = gpu() else { return };
    for (i, s) in [[1, 1, 1, 1], [2, 3, 5, 7], [3, 64, 4, 4], [2, 3, 65, 67]]
        .iter()
        .enumerate()
    {
        parity(
            &format!("global_avg_pool {s:?}"),
            &dev,
            &[randn(s, i as u64)],
            |g, v| g.global_avg_pool(v[0]),
        );
    }
}

#[test]
fn cuda_parity_resize_bilinear() {
    let Some(dev) = gpu() else { return };
    // Up and down by non-integer factors, mixed, to and from one pixel,
    // the same size, and large factors both ways.
    for (i, (s, oh, ow)) in [
        ([2, 2, 3, 4], 7, 9),
        ([1, 2, 9, 11], 4, 5),
        ([1, 3, 5, 4], 3, 10),
        ([2, 1, 4, 6], 1, 1),
        ([1, 2, 1, 1], 5, 3),
        ([2, 3, 5, 7], 5, 7),
        ([2, 3, 7, 5], 61, 64),
        ([1, 2, 65, 67], 9, 8),
    ]
    .into_iter()
    .enumerate()
    {
        parity(
            &format!("resize_bilinear {s:?} -> {oh}x{ow}"),
            &dev,
            &[randn(&s, i as u64)],
            |g, v| g.resize_bilinear(v[0], oh, ow),
        );
    }
}

/// Per-sample loss shapes: one element, short rows, rows longer than a
/// block of threads, few long rows.
const LOSS_SHAPES: &[&[usize]] = &[&[1, 1], &[5, 7], &[3, 4, 17], &[4, 3, 33, 35], &[2, 70_001]];

#[test]
fn cuda_parity_bce_with_logits() {
    let Some(dev) = gpu() else { return };
    for (i, s) in LOSS_SHAPES.iter().enumerate() {
        let target = uniform(s, 0.0, 1.0, 50 + i as u64);
        parity(
            &format!("bce_with_logits {s:?}"),
            &dev,
            &[uniform(s, -6.0, 6.0, i as u64)],
            |g, v| {
                let t = target.to_device(&g.value(v[0]).device())?;
                g.bce_with_logits(v[0], &t)
            },
        );
    }
    // The GPU cannot reject a target outside [0, 1]; its sample's loss is NaN.
    let t = Tensor::from_vec(vec![0.5, 0.5, 1.5, 0.5], &[2, 2], &dev).unwrap();
    let y = saccade::ops::loss::bce_with_logits_forward(&Tensor::zeros(&[2, 2], &dev), &t).unwrap();
    let y = y.to_vec().unwrap();
    assert!(y[0].is_finite() && y[1].is_nan(), "{y:?}");
}

#[test]
fn cuda_parity_gaussian_nll() {
    let Some(dev) = gpu() else { return };
    for (i, s) in LOSS_SHAPES.iter().enumerate() {
        let x = randn(s, 50 + i as u64);
        let inputs = [randn(s, i as u64), uniform(s, -2.0, 2.0, 20 + i as u64)];
        parity(&format!("gaussian_nll {s:?}"), &dev, &inputs, |g, v| {
            let xd = x.to_device(&g.value(v[0]).device())?;
            g.gaussian_nll(&xd, v[0], v[1])
        });
    }
}

#[test]
fn cuda_parity_softmax_cross_entropy() {
    let Some(dev) = gpu() else { return };
    for (i, (n, k)) in [(1, 1), (5, 7), (64, 10), (3, 1000)].into_iter().enumerate() {
        let labels: Vec<usize> = (0..n).map(|r| (r * 7 + i) % k).collect();
        let logits = uniform(&[n, k], -8.0, 8.0, i as u64);
        parity(
            &format!("softmax_cross_entropy {n}x{k}"),
            &dev,
            &[logits],
            |g, v| g.softmax_cross_entropy(v[0], &labels),
        );
    }
}

#[test]
fn cuda_parity_softmax() {
    let Some(dev) = gpu() else { return };
    // [0, 5]: no rows (the launchers once divided by the row count).
    for (i, s) in [&[1][..], &[5, 7], &[3, 4, 10], &[2, 1000], &[0, 5]]
        .iter()
        .enumerate()
    {
        let x = uniform(s, -20.0, 20.0, i as u64);
        parity(&format!("softmax {s:?}"), &dev, &[x], |g, v| g.softmax(v[0]));
    }
}

// --- conv ---

/// Inputs of a conv test: `x`, `w` and, when `bias`, a bias of `channels`.
fn conv_inputs(xs: &[usize], ws: &[usize], channels: usize, bias: bool, seed: u64) -> Vec<Tensor> {
    let mut v = vec![randn(xs, seed), randn(ws, seed + 1)];
    if bias {
        v.push(randn(&[channels], seed + 2));
    }
    v
}

#[test]
fn cuda_parity_conv2d() {
    let Some(dev) = gpu() else { return };
    // (x, w, stride, padding): odd sizes, stride 2, padding 0/1/2, non-square,
    // 1x1 (pointwise and strided) and 7x7 kernels, batches of 1 and 3; the
    // last case needs several chunks of the GPU's column budget (2 + 1 images).
    let cases = [
        ([1, 1, 5, 5], [1, 1, 3, 3], 1, 0),
        ([3, 2, 7, 9], [4, 2, 3, 3], 2, 1),
        ([1, 3, 11, 13], [5, 3, 3, 3], 1, 1),
        ([3, 3, 9, 8], [4, 3, 2, 5], 2, 2),
        ([3, 4, 5, 7], [3, 4, 1, 1], 1, 0),
        ([3, 4, 9, 7], [6, 4, 1, 1], 2, 0),
        ([3, 3, 17, 15], [8, 3, 7, 7], 2, 2),
        ([1, 2, 2, 3], [3, 2, 5, 5], 3, 2),
        ([3, 8, 65, 63], [5, 8, 7, 7], 1, 3),
    ];
    for (k, (xs, ws, s, p)) in cases.into_iter().enumerate() {
        for bias in [true, false] {
            let inputs = conv_inputs(&xs, &ws, ws[0], bias, 10 * k as u64);
            parity(&format!("conv2d case {k} bias {bias}"), &dev, &inputs, |g, v| {
                g.conv2d(v[0], v[1], v.get(2).copied(), s, p)
            });
        }
    }
}

#[test]
fn cuda_parity_conv_transpose2d() {
    let Some(dev) = gpu() else { return };
    // (x, w, stride, padding, output_padding), as for conv2d; the last case's
    // output side needs several chunks of the GPU's column budget.
    let cases = [
        ([1, 1, 3, 3], [1, 1, 3, 3], 1, 0, 0),
        ([3, 3, 4, 5], [3, 2, 3, 3], 2, 1, 1),
        ([1, 2, 5, 3], [2, 4, 2, 3], 3, 0, 2),
        ([3, 3, 7, 6], [3, 2, 3, 3], 1, 1, 0),
        ([3, 4, 5, 7], [4, 3, 1, 1], 1, 0, 0),
        ([3, 4, 5, 7], [4, 3, 1, 1], 2, 0, 1),
        ([3, 3, 9, 7], [3, 5, 7, 7], 2, 2, 1),
        ([1, 2, 3, 3], [2, 2, 4, 4], 2, 2, 0),
        ([3, 5, 65, 63], [5, 8, 7, 7], 2, 3, 1),
    ];
    for (k, (xs, ws, s, p, op)) in cases.into_iter().enumerate() {
        for bias in [true, false] {
            let inputs = conv_inputs(&xs, &ws, ws[1], bias, 10 * k as u64);
            parity(
                &format!("conv_transpose2d case {k} bias {bias}"),
                &dev,
                &inputs,
                |g, v| g.conv_transpose2d(v[0], v[1], v.get(2).copied(), s, p, op),
            );
        }
    }
}

// --- sampler ---

/// Random thetas `[n, 2, 3]`: scales 0.1..1.2, rotation and shear, and
/// centres reaching past the border, so that many crops cross it and some
/// lie wholly outside.
fn thetas(n: usize, seed: u64) -> Tensor {
    use rand::Rng;
    let mut r = saccade::gradcheck::rng(seed);
    let v: Vec<f32> = (0..n)
        .flat_map(|_| {
            let s = r.random_range(0.1..1.2);
            let (a, b) = (r.random_range(-0.3..0.3), r.random_range(-0.3..0.3));
            let (tx, ty) = (r.random_range(-1.3..1.3), r.random_range(-1.3..1.3));
            [s, a, tx, b, s * r.random_range(0.7..1.3), ty]
        })
        .collect();
    Tensor::from_vec(v, &[n, 2, 3], &Device::cpu()).unwrap()
}

/// `(N, C, H, W, Ho, Wo)`: odd image sizes, crops of 1x1, 5x7 and 32x32
/// (smaller and larger than the image), several channels and batch sizes.
const SAMPLER_SHAPES: &[[usize; 6]] = &[
    [1, 1, 37, 53, 1, 1],
    [2, 3, 37, 53, 5, 7],
    [3, 4, 37, 53, 32, 32],
    [5, 2, 9, 7, 32, 32],
    [4, 3, 64, 33, 5, 7],
];

#[test]
fn cuda_parity_affine_grid() {
    let Some(dev) = gpu() else { return };
    // 32x32 and 37x53 grids sum more points than a block has threads.
    for (n, oh, ow) in [(1, 1, 1), (3, 5, 7), (4, 32, 32), (2, 37, 53)] {
        parity(
            &format!("affine_grid {n}x{oh}x{ow}"),
            &dev,
            &[thetas(n, n as u64)],
            |g, v| g.affine_grid(v[0], oh, ow),
        );
    }
}

#[test]
fn cuda_parity_grid_sample() {
    let Some(dev) = gpu() else { return };
    for (k, &[n, c, h, w, oh, ow]) in SAMPLER_SHAPES.iter().enumerate() {
        let what = format!("grid_sample {n}x{c}x{h}x{w} -> {oh}x{ow}");
        let seed = 10 * k as u64;
        let img = uniform(&[n, c, h, w], 0.0, 1.0, seed);
        let theta = thetas(n, seed + 1);
        // The grid as an input: its gradient and the image's.
        let grid = saccade::ops::sampler::affine_grid_forward(&theta, oh, ow).unwrap();
        parity(&what, &dev, &[img.clone(), grid], |g, v| {
            g.grid_sample(v[0], v[1])
        });
        // Through theta, as the model crops resident images (no image gradient).
        parity(&format!("{what} via theta"), &dev, &[theta], |g, v| {
            let x = g.constant(img.to_device(&g.value(v[0]).device())?);
            let grid = g.affine_grid(v[0], oh, ow)?;
            g.grid_sample(x, grid)
        });
    }
}

#[test]
fn cuda_parity_localized_crop() {
    use std::sync::Arc;

    use saccade::data::{ImageSource, InMemoryImage};
    let Some(dev) = gpu() else { return };
    let image = |c: usize, h: usize, w: usize, seed: u64| {
        let data = uniform(&[c * h * w], 0.0, 1.0, seed).to_vec().unwrap();
        Arc::new(InMemoryImage::new(data, c, h, w, 4).unwrap())
    };
    for (k, &[n, c, h, w, oh, ow]) in SAMPLER_SHAPES.iter().enumerate() {
        let seed = 10 * k as u64;
        let images: Vec<_> = (0..n).map(|i| image(c, h, w, seed + i as u64)).collect();
        let sources: Vec<Arc<dyn ImageSource>> = images.iter().map(|i| i.clone() as _).collect();
        let mut rows = thetas(n, seed + 1).to_vec().unwrap();
        rows[..6].copy_from_slice(&[0.2, 0.0, 1.5, 0.0, 0.2, 0.0]); // wholly outside
        let theta = Tensor::from_vec(rows, &[n, 2, 3], &Device::cpu()).unwrap();
        for level in 0..images[0].levels().min(2) {
            let what = format!("localized_crop {n}x{c}x{h}x{w} -> {oh}x{ow} level {level}");
            parity(&what, &dev, std::slice::from_ref(&theta), |g, v| {
                g.localized_crop(&sources, v[0], oh, ow, level)
            });

            // On the GPU too, the crop equals grid_sample of the whole level
            // image bit for bit: the same kernel code with another window.
            let (lh, lw) = images[0].level_size(level);
            let level_data: Vec<f32> = images.iter().flat_map(|i| i.level_data(level).to_vec()).collect();
            let full_img = Tensor::from_vec(level_data, &[n, c, lh, lw], &dev).unwrap();
            let seed_grad = randn(&[n, c, oh, ow], 5).to_device(&dev).unwrap();
            let crop = |full: bool| {
                let mut g = Graph::new();
                let t = g.leaf(theta.to_device(&dev).unwrap());
                let y = if full {
                    let x = g.constant(full_img.clone());
                    let grid = g.affine_grid(t, oh, ow).unwrap();
                    g.grid_sample(x, grid).unwrap()
                } else {
                    g.localized_crop(&sources, t, oh, ow, level).unwrap()
                };
                let grads = g.backward_from(y, seed_grad.clone()).unwrap();
                let dt = grads.get(t).unwrap().to_vec().unwrap();
                (g.value(y).to_vec().unwrap(), dt)
            };
            assert_eq!(crop(false), crop(true), "{what}: localized vs full on the GPU");
        }
    }
    // Sources of different sizes in one batch.
    let sources: Vec<Arc<dyn ImageSource>> =
        vec![image(3, 37, 53, 1), image(3, 29, 31, 2), image(3, 8, 5, 3)];
    parity("localized_crop mixed sizes", &dev, &[thetas(3, 4)], |g, v| {
        g.localized_crop(&sources, v[0], 5, 7, 0)
    });
}
