//! saccade: a small GPU compute engine whose first model is Variational
//! Saccading (Ramapuram et al.). README.md gives the tour.
//!
//! Layers, from the bottom; each uses only the ones above it in this list
//! (no import cycles):
//! - [`profile`]: the opt-in per-op timer; [`files`]: files written whole
//!   or not at all.
//! - [`device`]: where storage lives (host memory or a CUDA device), its
//!   allocators and live-byte counters, kernel compilation and launch.
//! - [`tensor`]: a contiguous f32 NCHW tensor = shape + shared storage.
//! - [`autograd`]: the tape that records ops and runs their backward closures
//!   in reverse, keyed by [`autograd::ParamId`] for parameters.
//! - [`ops`]: one file per op family: forward, backward, the CPU loop, the
//!   CUDA launcher, and the `Graph` method that records it on the tape. The
//!   localized crop reads images through [`ops::sampler::ImageSource`].
//! - [`nn`], [`optim`]: the parameter store, layers, Adam and clipping.
//! - [`data`]: datasets, image stores and the loader (images implement
//!   `ImageSource`); [`models`]: the saccade model and the baselines.
//! - [`checkpoint`], [`train`], then [`predict`], [`viz`], [`bench`] and,
//!   on top, [`cli`]: the `saccade` command line (`src/main.rs` only calls it).
//!
//! The tape in five lines: record ops on a [`Graph`], then ask for gradients.
//!
//! ```
//! use saccade::{Device, Graph, Tensor};
//!
//! let dev = Device::cpu();
//! let mut g = Graph::new();
//! let x = g.leaf(Tensor::from_vec(vec![1.0, -2.0, 3.0], &[3], &dev)?);
//! let y = g.mul(x, x)?; // x^2
//! let loss = g.sum_all(y)?;
//! let grads = g.backward(loss)?;
//! assert_eq!(grads.get(x).unwrap().to_vec()?, vec![2.0, -4.0, 6.0]); // 2x
//! # Ok::<(), saccade::Error>(())
//! ```

pub mod autograd;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod device;
pub mod files;
pub mod gradcheck;
pub mod models;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod predict;
pub mod profile;
pub mod runs;
pub mod tensor;
pub mod train;
pub mod viz;

pub use anyhow::{Error, Result};
pub use autograd::{Gradients, Graph, Var};
pub use device::Device;
pub use tensor::Tensor;
