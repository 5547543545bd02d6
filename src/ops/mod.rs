//! Ops, one file per family. Each file holds, for its ops:
//! - the forward and backward functions on [`Tensor`](crate::Tensor)s, which
//!   check shapes and dispatch on the storage's device;
//! - the CPU reference loops;
//! - the `Graph` method that records the op on the tape;
//! - its `gradcheck_<op>` tests.

pub mod conv;
pub mod elementwise;
pub mod gaussian;
pub mod gru;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod pool;
pub mod reduce;
pub mod resize;
pub mod sampler;
pub mod shape;

use rayon::prelude::*;

/// Op families of the model that have no CUDA kernel yet; while any is
/// listed, `--device auto` keeps the CPU.
pub const OPS_WITHOUT_CUDA_KERNEL: &[&str] = &[
    "conv2d",
    "conv_transpose2d",
    "avg_pool2d",
    "global_avg_pool",
    "resize_bilinear",
    "group_norm",
    "batch_norm",
    "gru_cell",
    "bce_with_logits",
    "gaussian_nll",
    "softmax_cross_entropy",
    "affine_grid",
    "grid_sample",
    "localized_crop",
];

/// The error of an op called on GPU tensors that has no CUDA kernel yet.
pub(crate) fn no_cuda_kernel(op: &str) -> anyhow::Error {
    anyhow::anyhow!("op {op} has no CUDA kernel yet; run with --device cpu")
}

/// Below this many elements a loop is not worth splitting across threads.
pub(crate) const PAR_MIN: usize = 1 << 15;

/// `out[i] = f(i)` over a fresh vector, threaded when large.
pub(crate) fn par_fill(n: usize, f: impl Fn(usize) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0.0f32; n];
    if n >= PAR_MIN {
        out.par_iter_mut().enumerate().for_each(|(i, o)| *o = f(i));
    } else {
        out.iter_mut().enumerate().for_each(|(i, o)| *o = f(i));
    }
    out
}
