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
pub(crate) mod math;
pub mod norm;
pub mod pool;
pub mod reduce;
pub mod resize;
pub mod sampler;
pub mod shape;

use anyhow::{ensure, Result};
use rayon::prelude::*;

use crate::device::CpuDevice;
use crate::tensor::{fmt_shape, Tensor};

/// Below this many elements a loop is not worth splitting across threads.
pub(crate) const PAR_MIN: usize = 1 << 15;

/// Elements per task of the threaded loops: large enough that rayon's
/// per-task cost vanishes against the work.
pub(crate) const CHUNK: usize = 1 << 14;

/// `out[i] = f(i)` over a buffer of `dev`, threaded in chunks when large.
pub(crate) fn par_fill(dev: &CpuDevice, n: usize, f: impl Fn(usize) -> f32 + Sync) -> Vec<f32> {
    let mut out = dev.buffer(n);
    let fill = |c: usize, chunk: &mut [f32]| {
        for (j, o) in chunk.iter_mut().enumerate() {
            *o = f(c * CHUNK + j);
        }
    };
    if n >= PAR_MIN {
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| fill(c, chunk));
    } else {
        out.chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| fill(c, chunk));
    }
    out
}

/// `out[i] = f(a[i], b[i], c[i])` over a buffer of `dev`: `par_fill`
/// without the indexing, so that simple maps vectorize.
pub(crate) fn par_map3(
    dev: &CpuDevice,
    [a, b, c]: [&[f32]; 3],
    f: impl Fn(f32, f32, f32) -> f32 + Sync,
) -> Vec<f32> {
    assert!(a.len() == b.len() && a.len() == c.len());
    let mut out = dev.buffer(a.len());
    if a.len() >= PAR_MIN {
        let chunks = out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK));
        chunks
            .zip(b.par_chunks(CHUNK))
            .zip(c.par_chunks(CHUNK))
            .for_each(|(((o, a), b), c)| map_into(o, [a, b, c], &f));
    } else {
        map_into(&mut out, [a, b, c], &f);
    }
    out
}

/// The loop of [`par_map3`]. A function of its own, not inlined, so that
/// `out` stays a `&mut` parameter, which tells LLVM it aliases nothing `f`
/// captures (inlined into rayon's closures, the captures were reloaded per
/// element and the loop stayed scalar); indexed over equal lengths, the form
/// the loop vectorizer handles.
#[inline(never)]
fn map_into(out: &mut [f32], [a, b, c]: [&[f32]; 3], f: &impl Fn(f32, f32, f32) -> f32) {
    let n = out.len();
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    for i in 0..n {
        out[i] = f(a[i], b[i], c[i]);
    }
}

/// `out[i] = f(xs[i])`, see [`par_map3`].
pub(crate) fn par_map(dev: &CpuDevice, xs: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    par_map3(dev, [xs; 3], move |x, _, _| f(x))
}

/// `f(index, chunk)` over the `len`-sized chunks of `data`, threaded when
/// large (shared with the pooling and resize loops).
pub(crate) fn for_chunks(data: &mut [f32], len: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if data.len() >= PAR_MIN {
        data.par_chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        data.chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// `out[n] = sum_j f([x[n * d + j] for x in inputs])` over `rows` rows of
/// `d = len / rows` elements, accumulated in f64; threaded over rows from an
/// eighth of [`PAR_MIN`] terms, since the terms of the losses that use it
/// cost a transcendental or two each.
pub(crate) fn row_sums<const K: usize>(
    dev: &CpuDevice,
    rows: usize,
    inputs: [&[f32]; K],
    f: impl Fn([f32; K]) -> f32 + Sync,
) -> Vec<f32> {
    let d = inputs[0].len() / rows.max(1);
    assert!(inputs.iter().all(|x| x.len() == rows * d));
    let mut out = dev.buffer(rows);
    out.par_iter_mut()
        .with_min_len((PAR_MIN / 8 / d.max(1)).max(1))
        .enumerate()
        .for_each(|(n, o)| *o = row_sum(inputs.map(|x| &x[n * d..][..d]), &f) as f32);
    out
}

/// One row of [`row_sums`]: the terms of a block go to a stack buffer in a
/// plain indexed loop (the form the loop vectorizer handles, so the
/// transcendentals run 8 lanes wide), then into `LANES` interleaved f64
/// partial sums: independent additions pipeline (one chain of f64 adds
/// waits four cycles an element), and f64 keeps the reassociation invisible
/// at f32 precision. Not inlined, for the reason given at [`map_into`].
#[inline(never)]
fn row_sum<const K: usize>(row: [&[f32]; K], f: &impl Fn([f32; K]) -> f32) -> f64 {
    const LANES: usize = 8;
    const BLOCK: usize = 32 * LANES;
    let mut acc = [0.0f64; LANES];
    let mut terms = [0.0f32; BLOCK];
    let d = row[0].len();
    for start in (0..d).step_by(BLOCK) {
        let n = BLOCK.min(d - start);
        let block = row.map(|x| &x[start..][..n]);
        for (j, t) in terms[..n].iter_mut().enumerate() {
            *t = f(std::array::from_fn(|k| block[k][j]));
        }
        for lanes in terms[..n].chunks(LANES) {
            for (a, &t) in acc.iter_mut().zip(lanes) {
                *a += t as f64;
            }
        }
    }
    acc.iter().sum()
}

/// `sum x^2` over `xs` in f64, in interleaved partial sums as [`row_sum`].
pub(crate) fn sum_squares(xs: &[f32]) -> f64 {
    row_sum([xs], &|[x]| x * x)
}

/// `K` outputs of length `n` filled in one pass: `out[k][i] = f(i)[k]`. Lets
/// a backward compute the gradients of several inputs from shared terms.
pub(crate) fn par_fill_multi<const K: usize>(
    dev: &CpuDevice,
    n: usize,
    f: impl Fn(usize) -> [f32; K] + Sync,
) -> [Vec<f32>; K] {
    const CHUNK: usize = 4096;
    let mut outs: [Vec<f32>; K] = std::array::from_fn(|_| dev.buffer(n));
    let mut iters = outs.each_mut().map(|o| o.chunks_mut(CHUNK));
    let chunks: Vec<[&mut [f32]; K]> = (0..n.div_ceil(CHUNK))
        .map(|_| iters.each_mut().map(|it| it.next().expect("equal lengths")))
        .collect();
    chunks
        .into_par_iter()
        .with_min_len((PAR_MIN / CHUNK).max(1))
        .enumerate()
        .for_each(|(c, cs)| {
            for j in 0..cs[0].len() {
                let v = f(c * CHUNK + j);
                for k in 0..K {
                    cs[k][j] = v[k];
                }
            }
        });
    outs
}

/// `a` and `b` must have equal shapes; the message names the op and both.
pub(crate) fn same_shapes(op: &str, names: [&str; 2], a: &Tensor, b: &Tensor) -> Result<()> {
    ensure!(
        a.shape() == b.shape(),
        "{op}: {} {} and {} {} must have the same shape",
        names[0],
        fmt_shape(a.shape()),
        names[1],
        fmt_shape(b.shape())
    );
    Ok(())
}
