//! Models: the variational saccading model (`saccader`, built from the
//! recurrent `vrnn` that places glimpses and the `classifier` of crops).

pub mod classifier;
pub mod saccader;
pub mod vrnn;

pub use saccader::{Images, SaccadeConfig, Saccader};
