//! The tape. A [`Graph`] is a `Vec` of nodes in the order ops ran; each node
//! holds its value and, when some input needs a gradient, a hand-written
//! backward closure mapping the output gradient to one gradient per input.
//! [`Graph::backward`] walks the nodes in reverse. Nothing is global: drop the
//! graph and everything it saved for backward is freed.

use std::collections::BTreeMap;

use anyhow::{ensure, Result};

use crate::profile::{self, Phase};
use crate::tensor::Tensor;

/// A parameter's key: the tape collects one gradient per parameter, in
/// this order, whichever store the values come from (`nn::ParamStore`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(usize);

impl ParamId {
    pub fn new(index: usize) -> Self {
        ParamId(index)
    }

    /// Position in its store (dense, from 0).
    pub fn index(self) -> usize {
        self.0
    }
}

/// A handle to a node of one graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(pub(crate) usize);

/// Output gradient in, one optional gradient per recorded input out.
pub type BackwardFn = Box<dyn Fn(&Tensor) -> Result<Vec<Option<Tensor>>>>;

struct Node {
    value: Tensor,
    needs_grad: bool,
    backward: Option<(Vec<Var>, BackwardFn)>,
    /// The op kind, for the profile.
    op: &'static str,
}

pub struct Graph {
    nodes: Vec<Node>,
    params: BTreeMap<ParamId, Var>,
    grad_enabled: bool,
    /// Bytes ops have kept for backward beyond their inputs (see
    /// [`Graph::keep_for_backward`]).
    kept_bytes: usize,
}

/// What the ops of one graph may keep for backward to save recomputing it.
/// The default model's step keeps 24 MiB of conv columns (a tenth of its
/// time); a tiled ResNet18 would keep gigabytes, so the budget stops there.
const KEEP_BUDGET_BYTES: usize = 32 << 20;

impl Default for Graph {
    fn default() -> Self {
        Graph::new()
    }
}

impl Graph {
    /// A graph that records backward closures (training).
    pub fn new() -> Self {
        Graph {
            nodes: Vec::new(),
            params: BTreeMap::new(),
            grad_enabled: true,
            kept_bytes: 0,
        }
    }

    /// A graph that records no backward closures (evaluation), so nothing is
    /// saved for a backward pass; values live until the graph drops.
    pub fn inference() -> Self {
        Graph {
            grad_enabled: false,
            ..Graph::new()
        }
    }

    pub fn grad_enabled(&self) -> bool {
        self.grad_enabled
    }

    /// Whether an op may keep `bytes` of intermediate results for its
    /// backward (counted against the graph's budget when it may): only
    /// when a backward will run and the budget has room.
    pub(crate) fn keep_for_backward(&mut self, bytes: usize) -> bool {
        let fits = self.grad_enabled && self.kept_bytes + bytes <= KEEP_BUDGET_BYTES;
        if fits {
            self.kept_bytes += bytes;
        }
        fits
    }

    /// A value no gradient flows to (inputs, labels, noise).
    pub fn constant(&mut self, value: Tensor) -> Var {
        self.push_leaf(value, false)
    }

    /// A leaf that receives a gradient (used by tests and gradient checks).
    pub fn leaf(&mut self, value: Tensor) -> Var {
        let g = self.grad_enabled;
        self.push_leaf(value, g)
    }

    /// The graph variable of a parameter; the same parameter used twice (a
    /// recurrent cell over T steps) is one variable, so its gradients add up.
    pub fn param(&mut self, id: ParamId, value: &Tensor) -> Var {
        if let Some(&v) = self.params.get(&id) {
            return v;
        }
        let v = self.leaf(value.clone());
        self.params.insert(id, v);
        v
    }

    pub fn value(&self, v: Var) -> &Tensor {
        &self.nodes[v.0].value
    }

    pub fn shape(&self, v: Var) -> &[usize] {
        self.nodes[v.0].value.shape()
    }

    pub fn needs_grad(&self, v: Var) -> bool {
        self.nodes[v.0].needs_grad
    }

    /// Record an op's output. `backward` is kept only when some input needs a
    /// gradient; it returns one entry per input (None where none flows). The
    /// profile names the op after the method that defines `backward`.
    pub fn record<F>(&mut self, value: Tensor, inputs: &[Var], backward: F) -> Var
    where
        F: Fn(&Tensor) -> Result<Vec<Option<Tensor>>> + 'static,
    {
        self.record_as(
            profile::op_name(std::any::type_name::<F>()),
            value,
            inputs,
            backward,
        )
    }

    /// [`Graph::record`] under the profile name `op` (ops that share one
    /// method, such as the activations).
    pub fn record_as<F>(&mut self, op: &'static str, value: Tensor, inputs: &[Var], backward: F) -> Var
    where
        F: Fn(&Tensor) -> Result<Vec<Option<Tensor>>> + 'static,
    {
        let counter = value.counter();
        if let Some(mut p) = counter.profile() {
            let shapes: Vec<&[usize]> = inputs.iter().map(|&v| self.shape(v)).collect();
            let (flops, bytes) = profile::op_cost(op, &shapes, value.shape());
            let s = p.lap(op, Phase::Forward, counter.allocated());
            s.flops += flops;
            s.bytes += bytes;
        }
        let needs = self.grad_enabled && inputs.iter().any(|&v| self.nodes[v.0].needs_grad);
        let backward: Option<(Vec<Var>, BackwardFn)> = if needs {
            Some((inputs.to_vec(), Box::new(backward)))
        } else {
            None
        };
        self.nodes.push(Node {
            value,
            needs_grad: needs,
            backward,
            op,
        });
        Var(self.nodes.len() - 1)
    }

    fn push_leaf(&mut self, value: Tensor, needs_grad: bool) -> Var {
        self.nodes.push(Node {
            value,
            needs_grad,
            backward: None,
            op: "leaf",
        });
        Var(self.nodes.len() - 1)
    }

    /// Gradients of the one-element `loss` with respect to every leaf that
    /// needs one. Gradients of intermediate nodes are freed as soon as they
    /// have been passed on, which keeps backward's peak memory low.
    pub fn backward(&self, loss: Var) -> Result<Gradients> {
        let lv = self.value(loss);
        ensure!(
            lv.numel() == 1,
            "backward needs a one-element loss, got shape {:?}; reduce it with sum or mean first",
            lv.shape()
        );
        self.backward_from(loss, Tensor::full(lv.shape(), 1.0, &lv.device()))
    }

    /// Backward from any node, seeded with `seed` as its gradient (a
    /// vector-Jacobian product; gradient checks use it).
    pub fn backward_from(&self, out: Var, seed: Tensor) -> Result<Gradients> {
        seed.expect_shape(self.shape(out), "backward seed")?;
        let counter = self.value(out).counter();
        if let Some(mut p) = counter.profile() {
            p.mark(counter.allocated());
        }
        let mut grads: Vec<Option<Tensor>> = vec![None; self.nodes.len()];
        grads[out.0] = Some(seed);
        for i in (0..=out.0).rev() {
            let Some((inputs, backward)) = &self.nodes[i].backward else {
                continue;
            };
            let Some(g) = grads[i].take() else { continue };
            let in_grads = backward(&g)?;
            ensure!(
                in_grads.len() == inputs.len(),
                "internal: backward of node {i} returned {} gradients for {} inputs",
                in_grads.len(),
                inputs.len()
            );
            for (&v, ig) in inputs.iter().zip(in_grads) {
                let Some(ig) = ig else { continue };
                if !self.nodes[v.0].needs_grad {
                    continue;
                }
                ensure!(
                    ig.shape() == self.nodes[v.0].value.shape(),
                    "internal: gradient shape {:?} differs from value shape {:?}",
                    ig.shape(),
                    self.nodes[v.0].value.shape()
                );
                grads[v.0] = Some(match grads[v.0].take() {
                    None => ig,
                    Some(acc) => acc.add_same(&ig)?,
                });
            }
            if let Some(mut p) = counter.profile() {
                p.lap(self.nodes[i].op, Phase::Backward, counter.allocated());
            }
        }
        // Keep leaf gradients only.
        for (i, n) in self.nodes.iter().enumerate() {
            if n.backward.is_some() || !n.needs_grad {
                grads[i] = None;
            }
        }
        Ok(Gradients {
            grads,
            params: self.params.clone(),
        })
    }
}

/// Leaf gradients from one backward pass.
pub struct Gradients {
    grads: Vec<Option<Tensor>>,
    params: BTreeMap<ParamId, Var>,
}

impl Gradients {
    /// Parameter gradients computed outside one graph (gradient
    /// checkpointing sums them over several graphs).
    pub fn from_params(grads: impl IntoIterator<Item = (ParamId, Tensor)>) -> Gradients {
        let (params, grads): (BTreeMap<ParamId, Var>, Vec<Option<Tensor>>) = grads
            .into_iter()
            .enumerate()
            .map(|(i, (id, g))| ((id, Var(i)), Some(g)))
            .unzip();
        Gradients { grads, params }
    }

    pub fn get(&self, v: Var) -> Option<&Tensor> {
        self.grads.get(v.0).and_then(|g| g.as_ref())
    }

    /// The gradient of a parameter, if it took part in the loss.
    pub fn param(&self, id: ParamId) -> Option<&Tensor> {
        self.params.get(&id).and_then(|&v| self.get(v))
    }

    /// Replace every parameter gradient by `f(gradient)` (clipping).
    pub fn map_params(&mut self, mut f: impl FnMut(&Tensor) -> Result<Tensor>) -> Result<()> {
        for &v in self.params.values() {
            if let Some(g) = &self.grads[v.0] {
                self.grads[v.0] = Some(f(g)?);
            }
        }
        Ok(())
    }

    /// In parameter order, so that sums over them (the clipping norm) give
    /// the same bits in every process.
    pub fn param_grads(&self) -> impl Iterator<Item = (ParamId, &Tensor)> {
        self.params
            .iter()
            .filter_map(|(&id, &v)| self.get(v).map(|g| (id, g)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Device;

    /// Parameter gradients come in parameter order (a hash map's order
    /// changes from process to process, and so would a norm summed over it).
    #[test]
    fn parameter_gradients_come_in_parameter_order() {
        let dev = Device::cpu();
        let ids: Vec<ParamId> = (0..40).map(ParamId::new).collect();
        let mut g = Graph::new();
        let vars: Vec<Var> = ids
            .iter()
            .rev()
            .map(|&id| g.param(id, &Tensor::full(&[2], id.index() as f32, &dev)))
            .collect();
        let all = g.concat(&vars, 0).unwrap();
        let loss = g.sum(all, &[0], false).unwrap();
        let grads = g.backward(loss).unwrap();
        let order: Vec<ParamId> = grads.param_grads().map(|(id, _)| id).collect();
        assert_eq!(order, ids);
    }
}
