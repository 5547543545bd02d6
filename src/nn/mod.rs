//! Named parameters and the layers built from them. A model owns a
//! [`ParamStore`]; layers hold [`ParamId`]s into it and, on each forward,
//! fetch their variables from the [`Graph`](crate::Graph).

pub mod layers;

use anyhow::{bail, Result};

pub use layers::{BatchNorm, Conv2d, GroupNorm, GruCell, Linear};

pub use crate::autograd::ParamId;
use crate::autograd::{Graph, Var};
use crate::tensor::Tensor;

pub struct Param {
    pub name: String,
    pub value: Tensor,
    /// False for buffers such as batch-norm running statistics: saved in
    /// checkpoints, never touched by the optimizer.
    pub trainable: bool,
}

#[derive(Default)]
pub struct ParamStore {
    params: Vec<Param>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a trainable parameter; names must be unique (they key checkpoints).
    pub fn add(&mut self, name: &str, value: Tensor) -> ParamId {
        self.push(name, value, true)
    }

    /// Add a non-trainable buffer.
    pub fn add_buffer(&mut self, name: &str, value: Tensor) -> ParamId {
        self.push(name, value, false)
    }

    fn push(&mut self, name: &str, value: Tensor, trainable: bool) -> ParamId {
        assert!(
            self.params.iter().all(|p| p.name != name),
            "duplicate parameter name {name}"
        );
        self.params.push(Param {
            name: name.to_string(),
            value,
            trainable,
        });
        ParamId::new(self.params.len() - 1)
    }

    pub fn value(&self, id: ParamId) -> &Tensor {
        &self.params[id.index()].value
    }

    /// The parameter's variable in `g` (one per parameter and graph).
    pub fn var(&self, g: &mut Graph, id: ParamId) -> Var {
        g.param(id, self.value(id))
    }

    pub fn get(&self, id: ParamId) -> &Param {
        &self.params[id.index()]
    }

    /// Replace a value, keeping its shape.
    pub fn set(&mut self, id: ParamId, value: Tensor) -> Result<()> {
        let p = &mut self.params[id.index()];
        if p.value.shape() != value.shape() {
            bail!(
                "parameter {}: new value has shape {:?}, expected {:?}",
                p.name,
                value.shape(),
                p.value.shape()
            );
        }
        p.value = value;
        Ok(())
    }

    pub fn ids(&self) -> impl Iterator<Item = ParamId> {
        (0..self.params.len()).map(ParamId::new)
    }

    pub fn iter(&self) -> impl Iterator<Item = (ParamId, &Param)> {
        self.params.iter().enumerate().map(|(i, p)| (ParamId::new(i), p))
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Number of trainable scalars.
    pub fn num_trainable(&self) -> usize {
        self.params
            .iter()
            .filter(|p| p.trainable)
            .map(|p| p.value.numel())
            .sum()
    }

    pub fn find(&self, name: &str) -> Option<ParamId> {
        self.params.iter().position(|p| p.name == name).map(ParamId::new)
    }
}
