//! Op throughput on the CPU backend, one group per op family.
//!
//! Groups named `*_flops` report criterion's "elements/s" over a count of
//! floating-point operations (2 per multiply-add), so `Gelem/s` there reads
//! as GFLOP/s. `benches/torch_ops.py` times the same shapes with PyTorch for
//! comparison on the same machine. Run: `cargo bench --bench ops -- --quick`.

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use saccade::gradcheck::rand_tensor;
use saccade::ops::conv::{conv2d_backward, conv2d_forward, conv_out_size};
use saccade::ops::elementwise::{unary_forward, Unary};
use saccade::ops::linear::{linear_forward, matmul_forward};
use saccade::{Device, Tensor};

/// Short runs: every case here takes milliseconds, so ten samples settle.
fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g
}

fn matmul(c: &mut Criterion) {
    let dev = Device::cpu();
    let mut g = group(c, "matmul_flops");
    let (a, b) = (
        rand_tensor(&[512, 512], 1, &dev),
        rand_tensor(&[512, 512], 2, &dev),
    );
    g.throughput(Throughput::Elements(2 * 512 * 512 * 512));
    g.bench_function("matmul_512x512x512", |bch| {
        bch.iter(|| matmul_forward(black_box(&a), black_box(&b)).unwrap())
    });
    let x = rand_tensor(&[256, 1024], 3, &dev);
    let (w, bias) = (rand_tensor(&[1024, 1024], 4, &dev), rand_tensor(&[1024], 5, &dev));
    g.throughput(Throughput::Elements(2 * 256 * 1024 * 1024));
    g.bench_function("linear_256x1024_to_1024", |bch| {
        bch.iter(|| linear_forward(black_box(&x), black_box(&w), Some(&bias)).unwrap())
    });
    g.finish();
}

/// A conv case: name, input `[n, c, h, w]`, output channels, kernel, stride, padding.
struct ConvCase {
    name: &'static str,
    x: [usize; 4],
    out: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

const CONV_CASES: [ConvCase; 9] = [
    // Every conv of the default model's step: the VRNN's encoder over the
    // batch of 32 proxies of 32x32, then the crop classifier over 4 glimpses
    // x batch 32 crops of 24x24 (from 16 input channels the CPU lays the
    // columns out channels-last).
    ConvCase {
        name: "encoder3x3s2_n32_1to16_32x32",
        x: [32, 1, 32, 32],
        out: 16,
        k: 3,
        stride: 2,
        pad: 1,
    },
    ConvCase {
        name: "encoder3x3s2_n32_16to32_16x16",
        x: [32, 16, 16, 16],
        out: 32,
        k: 3,
        stride: 2,
        pad: 1,
    },
    ConvCase {
        name: "encoder3x3_n32_32to32_8x8",
        x: [32, 32, 8, 8],
        out: 32,
        k: 3,
        stride: 1,
        pad: 1,
    },
    ConvCase {
        name: "classifier3x3_n128_1to16_24x24",
        x: [128, 1, 24, 24],
        out: 16,
        k: 3,
        stride: 1,
        pad: 1,
    },
    ConvCase {
        name: "classifier3x3s2_n128_16to32_24x24",
        x: [128, 16, 24, 24],
        out: 32,
        k: 3,
        stride: 2,
        pad: 1,
    },
    ConvCase {
        name: "classifier3x3s2_n128_32to64_12x12",
        x: [128, 32, 12, 12],
        out: 64,
        k: 3,
        stride: 2,
        pad: 1,
    },
    ConvCase {
        name: "classifier3x3s2_n128_64to64_6x6",
        x: [128, 64, 6, 6],
        out: 64,
        k: 3,
        stride: 2,
        pad: 1,
    },
    ConvCase {
        name: "resnet3x3_n8_64to64_56x56",
        x: [8, 64, 56, 56],
        out: 64,
        k: 3,
        stride: 1,
        pad: 1,
    },
    ConvCase {
        name: "stem7x7s2_n2_3to64_224x224",
        x: [2, 3, 224, 224],
        out: 64,
        k: 7,
        stride: 2,
        pad: 3,
    },
];

impl ConvCase {
    fn tensors(&self, dev: &Device) -> (Tensor, Tensor, Tensor) {
        let [_, c, ..] = self.x;
        (
            rand_tensor(&self.x, 1, dev),
            rand_tensor(&[self.out, c, self.k, self.k], 2, dev),
            rand_tensor(&[self.out], 3, dev),
        )
    }

    /// Forward flops: 2 per multiply-add of every output value.
    fn flops(&self) -> u64 {
        let [n, c, h, w] = self.x;
        let ho = conv_out_size(h, self.k, self.stride, self.pad).unwrap();
        let wo = conv_out_size(w, self.k, self.stride, self.pad).unwrap();
        (2 * n * self.out * ho * wo * c * self.k * self.k) as u64
    }
}

fn conv2d(c: &mut Criterion) {
    let dev = Device::cpu();
    let mut g = group(c, "conv2d_fwd_flops");
    for case in &CONV_CASES {
        let (x, w, b) = case.tensors(&dev);
        g.throughput(Throughput::Elements(case.flops()));
        g.bench_function(case.name, |bch| {
            bch.iter(|| conv2d_forward(black_box(&x), &w, Some(&b), case.stride, case.pad).unwrap())
        });
    }
    g.finish();

    // Forward, then the input and weight gradients: three products of the
    // forward's size.
    let mut g = group(c, "conv2d_fwd_bwd_flops");
    for case in &CONV_CASES {
        let (x, w, b) = case.tensors(&dev);
        g.throughput(Throughput::Elements(3 * case.flops()));
        g.bench_function(case.name, |bch| {
            bch.iter(|| {
                let y = conv2d_forward(black_box(&x), &w, Some(&b), case.stride, case.pad).unwrap();
                conv2d_backward(&x, &w, &y, case.stride, case.pad, true).unwrap()
            })
        });
    }
    g.finish();
}

fn elementwise(c: &mut Criterion) {
    let dev = Device::cpu();
    let mut g = group(c, "elementwise_elems");
    let x = rand_tensor(&[8, 64, 56, 56], 1, &dev);
    g.throughput(Throughput::Elements(x.numel() as u64));
    g.bench_function("relu_8x64x56x56", |bch| {
        bch.iter(|| unary_forward(black_box(&x), Unary::Relu).unwrap())
    });
    g.finish();
}

criterion_group!(benches, matmul, conv2d, elementwise);
criterion_main!(benches);
