//! Elementwise ops: activations and other unary maps, and the four
//! arithmetic ops with NumPy broadcasting.

use anyhow::{bail, Result};

use super::math::{expm1_neg, sigmoid, softplus, tanh};
use super::{for_chunks, par_fill, par_map, par_map3, reduce::sum_to_shape};
use crate::autograd::{Graph, Var};
use crate::tensor::{fmt_shape, Storage, Tensor};

/// SELU's constants (Klambauer et al. 2017).
const SELU_ALPHA: f32 = 1.673_263_2;
const SELU_SCALE: f32 = 1.050_701;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unary {
    Relu,
    Elu(f32),
    Selu,
    Sigmoid,
    Tanh,
    Softplus,
    Exp,
    Log,
    /// `a * x + b`.
    Affine(f32, f32),
}

impl Unary {
    /// Inlined always so that a loop over one known op compiles to that op.
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Unary::Relu => x.max(0.0),
            Unary::Elu(a) => {
                // Both sides computed and one selected, so loops vectorize.
                let neg = a * expm1_neg(if x > 0.0 { 0.0 } else { x });
                if x > 0.0 {
                    x
                } else {
                    neg
                }
            }
            Unary::Selu => {
                let neg = SELU_ALPHA * expm1_neg(if x > 0.0 { 0.0 } else { x });
                SELU_SCALE * if x > 0.0 { x } else { neg }
            }
            Unary::Sigmoid => sigmoid(x),
            Unary::Tanh => tanh(x),
            Unary::Softplus => softplus(x),
            Unary::Exp => x.exp(),
            Unary::Log => x.ln(),
            Unary::Affine(a, b) => a * x + b,
        }
    }

    /// The op's name in the profile.
    pub fn name(self) -> &'static str {
        match self {
            Unary::Relu => "relu",
            Unary::Elu(_) => "elu",
            Unary::Selu => "selu",
            Unary::Sigmoid => "sigmoid",
            Unary::Tanh => "tanh",
            Unary::Softplus => "softplus",
            Unary::Exp => "exp",
            Unary::Log => "log",
            Unary::Affine(..) => "affine",
        }
    }

    /// The op code and two constants the kernels in kernels/elementwise.cu take.
    pub fn kernel_code(self) -> (i32, f32, f32) {
        match self {
            Unary::Relu => (0, 0.0, 0.0),
            Unary::Elu(a) => (1, a, 0.0),
            Unary::Selu => (2, 0.0, 0.0),
            Unary::Sigmoid => (3, 0.0, 0.0),
            Unary::Tanh => (4, 0.0, 0.0),
            Unary::Softplus => (5, 0.0, 0.0),
            Unary::Exp => (6, 0.0, 0.0),
            Unary::Log => (7, 0.0, 0.0),
            Unary::Affine(a, b) => (8, a, b),
        }
    }

    /// d apply / dx, given the input `x` and the output `y = apply(x)`.
    #[inline(always)]
    pub fn derivative(self, x: f32, y: f32) -> f32 {
        match self {
            Unary::Relu => (x > 0.0) as u8 as f32,
            Unary::Elu(a) => {
                if x > 0.0 {
                    1.0
                } else {
                    y + a
                }
            }
            Unary::Selu => {
                if x > 0.0 {
                    SELU_SCALE
                } else {
                    y + SELU_SCALE * SELU_ALPHA
                }
            }
            Unary::Sigmoid => y * (1.0 - y),
            Unary::Tanh => 1.0 - y * y,
            Unary::Softplus => sigmoid(x),
            Unary::Exp => y,
            Unary::Log => 1.0 / x,
            Unary::Affine(a, _) => a,
        }
    }
}

pub fn unary_forward(x: &Tensor, op: Unary) -> Result<Tensor> {
    match x.storage() {
        Storage::Cpu(_) => {
            let (dev, xs) = (x.host(), x.cpu()?);
            // One loop per hot op, where `apply` inlines to a branch-free
            // body the compiler vectorizes, rather than a match per element.
            // The closures own their constants: a captured reference would
            // be reloaded per element (it might alias the output).
            x.same_shape(match op {
                Unary::Elu(a) => par_map(dev, xs, move |v| Unary::Elu(a).apply(v)),
                Unary::Relu => par_map(dev, xs, |v| Unary::Relu.apply(v)),
                Unary::Affine(a, b) => par_map(dev, xs, move |v| Unary::Affine(a, b).apply(v)),
                _ => par_map(dev, xs, move |v| op.apply(v)),
            })
        }
        Storage::Cuda(xs) => cuda::unary_forward(xs, x.shape(), op),
    }
}

/// Gradient of the input from the input, the output and the output gradient.
pub fn unary_backward(x: &Tensor, y: &Tensor, gy: &Tensor, op: Unary) -> Result<Tensor> {
    match x.storage() {
        Storage::Cpu(_) => {
            let (dev, xs) = (x.host(), [x.cpu()?, y.cpu()?, gy.cpu()?]);
            x.same_shape(match op {
                Unary::Elu(a) => par_map3(dev, xs, move |x, y, g| g * Unary::Elu(a).derivative(x, y)),
                _ => par_map3(dev, xs, move |x, y, g| g * op.derivative(x, y)),
            })
        }
        Storage::Cuda(xs) => cuda::unary_backward(xs, y.cuda()?, gy.cuda()?, x.shape(), op),
    }
}

/// Launchers of kernels/elementwise.cu.
pub(crate) mod cuda {
    use anyhow::Result;

    use super::{Binary, Unary};
    use crate::device::cuda::{grid, launch, CudaStorage, Dims};
    use crate::tensor::Tensor;

    pub(crate) fn unary_forward(x: &CudaStorage, shape: &[usize], op: Unary) -> Result<Tensor> {
        let (dev, n) = (x.device(), x.len());
        let mut y = dev.alloc(n)?;
        let (c, a, b) = op.kernel_code();
        let cfg = grid(n)?;
        launch!(
            &dev,
            "elementwise",
            "unary_forward",
            cfg,
            x.slice(),
            y.slice_mut(),
            &(n as i32),
            &c,
            &a,
            &b
        );
        Ok(Tensor::from_cuda(y, shape))
    }

    pub(crate) fn unary_backward(
        x: &CudaStorage,
        y: &CudaStorage,
        gy: &CudaStorage,
        shape: &[usize],
        op: Unary,
    ) -> Result<Tensor> {
        let (dev, n) = (x.device(), x.len());
        let mut gx = dev.alloc(n)?;
        let (c, a, _) = op.kernel_code();
        let cfg = grid(n)?;
        launch!(
            &dev,
            "elementwise",
            "unary_backward",
            cfg,
            x.slice(),
            y.slice(),
            gy.slice(),
            gx.slice_mut(),
            &(n as i32),
            &c,
            &a
        );
        Ok(Tensor::from_cuda(gx, shape))
    }

    pub(crate) fn binary_forward(
        a: &CudaStorage,
        b: &CudaStorage,
        shape: &[usize],
        dims: Dims,
        op: Binary,
    ) -> Result<Tensor> {
        let dev = a.device();
        let n: usize = shape.iter().product();
        let mut out = dev.alloc(n)?;
        let c = op as i32;
        let cfg = grid(n)?;
        launch!(
            &dev,
            "elementwise",
            "binary_forward",
            cfg,
            a.slice(),
            b.slice(),
            out.slice_mut(),
            &(n as i32),
            &c,
            &dims
        );
        Ok(Tensor::from_cuda(out, shape))
    }
}

/// Discriminants are the kernels' op codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    Add = 0,
    Sub = 1,
    Mul = 2,
    Div = 3,
}

impl Binary {
    /// The op's name in the profile.
    pub fn name(self) -> &'static str {
        match self {
            Binary::Add => "add",
            Binary::Sub => "sub",
            Binary::Mul => "mul",
            Binary::Div => "div",
        }
    }

    fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            Binary::Add => a + b,
            Binary::Sub => a - b,
            Binary::Mul => a * b,
            Binary::Div => a / b,
        }
    }
}

/// The NumPy broadcast of two shapes, or an error naming both.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
        let db = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => bail!(
                "shapes {} and {} do not broadcast (axis {i}: {da} vs {db})",
                fmt_shape(a),
                fmt_shape(b)
            ),
        };
    }
    Ok(out)
}

/// Strides of `shape` read in the index space of `out` (0 on broadcast axes).
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; out.len()];
    let off = out.len() - shape.len();
    let mut s = 1;
    for i in (0..shape.len()).rev() {
        if shape[i] != 1 {
            strides[i + off] = s;
        }
        s *= shape[i];
    }
    strides
}

pub fn binary_forward(a: &Tensor, b: &Tensor, op: Binary) -> Result<Tensor> {
    let shape = broadcast_shape(a.shape(), b.shape())?;
    match a.storage() {
        Storage::Cpu(_) => {
            let (xa, xb) = (a.cpu()?, b.cpu()?);
            let n: usize = shape.iter().product();
            let data = if a.shape() == b.shape() {
                par_fill(a.host(), n, |i| op.apply(xa[i], xb[i]))
            } else if b.numel() == 1 {
                par_fill(a.host(), n, |i| op.apply(xa[i], xb[0]))
            } else {
                let (sa, sb) = (
                    broadcast_strides(a.shape(), &shape),
                    broadcast_strides(b.shape(), &shape),
                );
                // Row by row along the last axis: the division into
                // coordinates once per row, not per element.
                let last = shape.len() - 1;
                let mut out = a.host().buffer(n);
                for_chunks(&mut out, shape[last].max(1), |row, o| {
                    let (mut rem, mut ia, mut ib) = (row, 0, 0);
                    for d in (0..last).rev() {
                        let k = rem % shape[d];
                        rem /= shape[d];
                        ia += k * sa[d];
                        ib += k * sb[d];
                    }
                    for (j, o) in o.iter_mut().enumerate() {
                        *o = op.apply(xa[ia + j * sa[last]], xb[ib + j * sb[last]]);
                    }
                });
                out
            };
            Tensor::from_vec(data, &shape, &a.device())
        }
        Storage::Cuda(xa) => {
            let dims = crate::device::cuda::Dims::new(
                &shape,
                &broadcast_strides(a.shape(), &shape),
                &broadcast_strides(b.shape(), &shape),
            )?;
            cuda::binary_forward(xa, b.cuda()?, &shape, dims, op)
        }
    }
}

/// Gradients of a broadcasting binary op with respect to both inputs.
pub fn binary_backward(a: &Tensor, b: &Tensor, gy: &Tensor, op: Binary) -> Result<(Tensor, Tensor)> {
    let (ga, gb) = match op {
        Binary::Add => (gy.clone(), gy.clone()),
        Binary::Sub => (gy.clone(), unary_forward(gy, Unary::Affine(-1.0, 0.0))?),
        Binary::Mul => (
            binary_forward(gy, b, Binary::Mul)?,
            binary_forward(gy, a, Binary::Mul)?,
        ),
        Binary::Div => {
            // d(a/b)/da = 1/b; d(a/b)/db = -(a/b)/b, so gb = -(gy/b) * (a/b).
            let ga = binary_forward(gy, b, Binary::Div)?;
            let ab = binary_forward(a, b, Binary::Div)?;
            let t = binary_forward(&ga, &ab, Binary::Mul)?;
            (ga, unary_forward(&t, Unary::Affine(-1.0, 0.0))?)
        }
    };
    Ok((sum_to_shape(&ga, a.shape())?, sum_to_shape(&gb, b.shape())?))
}

impl Graph {
    pub fn unary(&mut self, x: Var, op: Unary) -> Result<Var> {
        let xv = self.value(x).clone();
        let y = unary_forward(&xv, op)?;
        let yv = y.clone();
        Ok(self.record_as(op.name(), y, &[x], move |g| {
            Ok(vec![Some(unary_backward(&xv, &yv, g, op)?)])
        }))
    }

    pub fn relu(&mut self, x: Var) -> Result<Var> {
        self.unary(x, Unary::Relu)
    }
    pub fn elu(&mut self, x: Var) -> Result<Var> {
        self.unary(x, Unary::Elu(1.0))
    }
    pub fn selu(&mut self, x: Var) -> Result<Var> {
        self.unary(x, Unary::Selu)
    }
    pub fn sigmoid(&mut self, x: Var) -> Result<Var> {
        self.unary(x, Unary::Sigmoid)
    }
    pub fn tanh(&mut self, x: Var) -> Result<Var> {
        self.unary(x, Unary::Tanh)
    }
    pub fn softplus(&mut self, x: Var) -> Result<Var> {
        self.unary(x, Unary::Softplus)
    }
    pub fn exp(&mut self, x: Var) -> Result<Var> {
        self.unary(x, Unary::Exp)
    }
    pub fn log(&mut self, x: Var) -> Result<Var> {
        self.unary(x, Unary::Log)
    }
    /// `a * x + b` with constant `a`, `b`.
    pub fn affine(&mut self, x: Var, a: f32, b: f32) -> Result<Var> {
        self.unary(x, Unary::Affine(a, b))
    }

    pub fn binary(&mut self, a: Var, b: Var, op: Binary) -> Result<Var> {
        let (av, bv) = (self.value(a).clone(), self.value(b).clone());
        let y = binary_forward(&av, &bv, op)?;
        Ok(self.record_as(op.name(), y, &[a, b], move |g| {
            let (ga, gb) = binary_backward(&av, &bv, g, op)?;
            Ok(vec![Some(ga), Some(gb)])
        }))
    }

    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        self.binary(a, b, Binary::Add)
    }
    pub fn sub(&mut self, a: Var, b: Var) -> Result<Var> {
        self.binary(a, b, Binary::Sub)
    }
    pub fn mul(&mut self, a: Var, b: Var) -> Result<Var> {
        self.binary(a, b, Binary::Mul)
    }
    pub fn div(&mut self, a: Var, b: Var) -> Result<Var> {
        self.binary(a, b, Binary::Div)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_op, rand_tensor, Check};
    use crate::Device;

    fn check_unary(op: Unary, lo: f32, hi: f32) {
        let dev = Device::cpu();
        let x = Tensor::uniform(&[3, 7], lo, hi, &mut crate::gradcheck::rng(1), &dev);
        check_op(&[x], Check::default(), |g, v| g.unary(v[0], op)).unwrap();
    }

    #[test]
    fn gradcheck_relu() {
        // Keep away from the kink at 0 where finite differences are meaningless.
        let dev = Device::cpu();
        let mut xs = rand_tensor(&[4, 5], 2, &dev).to_vec().unwrap();
        xs.iter_mut().for_each(|v| *v += 0.2 * v.signum());
        let x = Tensor::from_vec(xs, &[4, 5], &dev).unwrap();
        check_op(&[x], Check::default(), |g, v| g.relu(v[0])).unwrap();
    }

    #[test]
    fn gradcheck_elu() {
        check_unary(Unary::Elu(1.0), -3.0, -0.05);
        check_unary(Unary::Elu(0.7), 0.05, 3.0);
    }

    #[test]
    fn gradcheck_selu() {
        check_unary(Unary::Selu, -3.0, -0.05);
        check_unary(Unary::Selu, 0.05, 3.0);
    }

    #[test]
    fn gradcheck_sigmoid_tanh_softplus_exp_log_affine() {
        check_unary(Unary::Sigmoid, -4.0, 4.0);
        check_unary(Unary::Tanh, -2.0, 2.0);
        check_unary(Unary::Softplus, -5.0, 5.0);
        check_unary(Unary::Exp, -2.0, 2.0);
        check_unary(Unary::Log, 0.3, 3.0);
        check_unary(Unary::Affine(-1.5, 0.25), -2.0, 2.0);
    }

    #[test]
    fn gradcheck_binary_broadcasting() {
        let dev = Device::cpu();
        for op in [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div] {
            for (sa, sb) in [
                (vec![2, 3, 4], vec![2, 3, 4]),
                (vec![2, 3, 4], vec![4]),
                (vec![2, 1, 4], vec![3, 1]),
                (vec![1], vec![2, 3]),
                (vec![2, 3, 5, 5], vec![1, 3, 1, 1]),
            ] {
                let a = rand_tensor(&sa, 3, &dev);
                // Divisors away from zero.
                let b = Tensor::uniform(&sb, 0.5, 2.0, &mut crate::gradcheck::rng(4), &dev);
                check_op(&[a, b], Check::default(), |g, v| g.binary(v[0], v[1], op))
                    .unwrap_or_else(|e| panic!("{op:?} {sa:?} {sb:?}: {e}"));
            }
        }
    }

    #[test]
    fn broadcast_matches_reference_loop_and_rejects_mismatch() {
        let dev = Device::cpu();
        let a = rand_tensor(&[2, 1, 4], 5, &dev);
        let b = rand_tensor(&[3, 1], 6, &dev);
        let y = binary_forward(&a, &b, Binary::Sub).unwrap();
        assert_eq!(y.shape(), &[2, 3, 4]);
        let (av, bv, yv) = (a.to_vec().unwrap(), b.to_vec().unwrap(), y.to_vec().unwrap());
        for i in 0..2 {
            for j in 0..3 {
                for k in 0..4 {
                    assert_eq!(yv[(i * 3 + j) * 4 + k], av[i * 4 + k] - bv[j]);
                }
            }
        }
        let e = binary_forward(&a, &rand_tensor(&[5], 1, &dev), Binary::Add).unwrap_err();
        assert!(e.to_string().contains("do not broadcast"), "{e}");
    }

    #[test]
    fn activations_match_closed_forms() {
        let u = |op: Unary, x: f32| op.apply(x);
        assert_eq!(u(Unary::Relu, -1.0), 0.0);
        assert!((u(Unary::Elu(1.0), -1.0) - ((-1.0f32).exp() - 1.0)).abs() < 1e-7);
        assert!((u(Unary::Selu, 1.0) - 1.050_701).abs() < 1e-6);
        assert!((u(Unary::Softplus, 50.0) - 50.0).abs() < 1e-6);
        assert!((u(Unary::Softplus, -50.0)).abs() < 1e-20);
        assert!((u(Unary::Sigmoid, -100.0)).abs() < 1e-30);
    }
}
