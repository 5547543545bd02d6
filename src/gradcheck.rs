//! Gradient checking: an op's hand-written backward against central finite
//! differences. The output is projected on a fixed random tensor `r`, so one
//! backward pass (seeded with `r`) gives the gradient of `sum(r * y)`, and
//! the same sum is evaluated in f64 for every perturbed input element.

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::autograd::{Graph, Var};
use crate::device::Device;
use crate::tensor::Tensor;

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Standard-normal tensor from a seed.
pub fn rand_tensor(shape: &[usize], seed: u64, device: &Device) -> Tensor {
    Tensor::randn(shape, 1.0, &mut rng(seed), device)
}

#[derive(Clone, Copy, Debug)]
pub struct Check {
    /// Finite-difference step.
    pub eps: f32,
    /// Pass when `|analytic - numeric| <= atol + rtol * max(|analytic|, |numeric|)`.
    pub atol: f32,
    pub rtol: f32,
    /// Elements checked per input (evenly spaced through it); all when smaller.
    pub max_checks: usize,
}

impl Default for Check {
    fn default() -> Self {
        // With f32 values of order 1, eps = 1e-2 keeps the truncation error
        // (~eps^2) and the rounding error (~1e-7 / eps) both near 1e-4, so a
        // backward that is off by a few percent anywhere is caught.
        Check {
            eps: 1e-2,
            atol: 2e-3,
            rtol: 1e-2,
            max_checks: 200,
        }
    }
}

fn projected(out: &Tensor, r: &[f32]) -> Result<f64> {
    Ok(out
        .to_vec()?
        .iter()
        .zip(r)
        .map(|(&y, &w)| y as f64 * w as f64)
        .sum())
}

/// Check the gradients of `build` with respect to every input. `build` gets
/// one leaf per input and returns the op's output.
pub fn check_op(
    inputs: &[Tensor],
    check: Check,
    build: impl Fn(&mut Graph, &[Var]) -> Result<Var>,
) -> Result<()> {
    let mut g = Graph::new();
    let vars: Vec<Var> = inputs.iter().map(|t| g.leaf(t.clone())).collect();
    let out = build(&mut g, &vars)?;
    let y = g.value(out).clone();
    let r = rand_tensor(y.shape(), 0x5eed, &y.device());
    let grads = g.backward_from(out, r.clone())?;
    let r = r.to_vec()?;

    let eval = |ins: &[Tensor]| -> Result<f64> {
        let mut g = Graph::inference();
        let vars: Vec<Var> = ins.iter().map(|t| g.constant(t.clone())).collect();
        let out = build(&mut g, &vars)?;
        projected(g.value(out), &r)
    };

    for (k, x) in inputs.iter().enumerate() {
        let analytic = match grads.get(vars[k]) {
            Some(t) => t.to_vec()?,
            None => vec![0.0; x.numel()],
        };
        let base = x.to_vec()?;
        let n = base.len();
        let step = n.div_ceil(check.max_checks.max(1)).max(1);
        for j in (0..n).step_by(step) {
            let mut ins = inputs.to_vec();
            let mut plus = base.clone();
            plus[j] += check.eps;
            ins[k] = x.same_shape(plus)?;
            let fp = eval(&ins)?;
            let mut minus = base.clone();
            minus[j] -= check.eps;
            ins[k] = x.same_shape(minus)?;
            let fm = eval(&ins)?;
            let numeric = ((fp - fm) / (2.0 * check.eps as f64)) as f32;
            let a = analytic[j];
            let tol = check.atol + check.rtol * a.abs().max(numeric.abs());
            // Written so that a NaN on either side fails.
            let close = (a - numeric).abs() <= tol;
            if !close {
                bail!(
                    "gradient of input {k} (shape {:?}) at element {j}: analytic {a}, numeric {numeric}",
                    x.shape()
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::elementwise::{unary_forward, Unary};

    /// The mutant: sigmoid whose backward forgets the `(1 - y)` factor must
    /// fail the check, while the true sigmoid passes on the same input.
    #[test]
    fn gradcheck_catches_a_wrong_backward() {
        let dev = Device::cpu();
        let x = rand_tensor(&[3, 4], 7, &dev);
        let wrong = |g: &mut Graph, v: &[Var]| -> Result<Var> {
            let y = unary_forward(g.value(v[0]), Unary::Sigmoid)?;
            let yv = y.clone();
            Ok(g.record(y, &[v[0]], move |gy| {
                let d = unary_forward(&yv, Unary::Affine(1.0, 0.0))?; // y, should be y(1-y)
                Ok(vec![Some(crate::ops::elementwise::binary_forward(
                    gy,
                    &d,
                    crate::ops::elementwise::Binary::Mul,
                )?)])
            }))
        };
        let err = check_op(std::slice::from_ref(&x), Check::default(), wrong).unwrap_err();
        assert!(err.to_string().contains("analytic"), "{err}");
        check_op(&[x], Check::default(), |g, v| g.sigmoid(v[0])).unwrap();
    }

    /// A backward off by only 3% must fail too.
    #[test]
    fn gradcheck_catches_a_slightly_scaled_backward() {
        let dev = Device::cpu();
        let x = rand_tensor(&[10], 8, &dev);
        let scaled = |g: &mut Graph, v: &[Var]| -> Result<Var> {
            let y = unary_forward(g.value(v[0]), Unary::Affine(2.0, 0.0))?;
            Ok(g.record(y, &[v[0]], |gy| {
                Ok(vec![Some(unary_forward(gy, Unary::Affine(2.06, 0.0))?)])
            }))
        };
        assert!(check_op(&[x], Check::default(), scaled).is_err());
    }
}
