//! Data: image sources (in memory, procedural, tiled store), datasets and
//! loaders.

pub mod mnist;
pub mod source;

pub use source::{ImageSource, InMemoryImage};
