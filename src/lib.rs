//! saccade: a small GPU compute engine whose first model is Variational
//! Saccading (Ramapuram et al.). See DESIGN.md in the shared folder and
//! README.md for the tour.
//!
//! Layers, from the bottom:
//! - [`device`]: where storage lives (CPU now; CUDA next) and how many bytes are live.
//! - [`tensor`]: a contiguous f32 NCHW tensor = shape + shared storage.
//! - [`ops`]: one file per op family, each with forward, backward and the
//!   CPU reference loop (and, with the CUDA backend, the launcher).
//! - [`autograd`]: the tape that records ops and runs their backward in reverse.
//! - [`nn`], [`optim`]: parameters, layers, Adam and clipping.
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
pub mod data;
pub mod device;
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
