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
