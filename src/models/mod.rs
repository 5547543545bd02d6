//! Models: the variational saccading model (`saccader`, built from the
//! recurrent `vrnn` that places glimpses and the `classifier` of crops) and
//! the paper's baselines (`resnet`: ResNet18 over whole images; `tiled`:
//! ResNet18 over the tiles of a large image).

pub mod classifier;
pub mod resnet;
pub mod saccader;
pub mod tiled;
pub mod vrnn;

pub use resnet::{ResNet18, ResNetConfig};
pub use saccader::{Focus, GlimpsePool, Images, SaccadeConfig, Saccader};
pub use tiled::{TiledConfig, TiledResNet18};
