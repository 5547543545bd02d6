//! Branch-free f32 transcendentals for the CPU loops. libm's `expf`,
//! `log1pf` and `tanhf` are scalar calls, so a loop over them stays scalar;
//! these are polynomials and selects that the loop vectorizer turns into
//! 8-lane code (ELU, the GRU gates and the BCE loss spent most of their time
//! in libm). Each is within a few ulp of libm over its whole domain (tests
//! below); BENCHMARKS.md's numerics section lists where results differ.

/// `(s, p)` with `e^x = s * (1 + p)`, for `x` in `[-87, 0]`: Cody-Waite
/// reduction `x = k ln2 + r`, `|r| <= ln2 / 2`, `s = 2^k`, and a degree-8
/// Taylor polynomial `p = expm1(r)`.
#[inline(always)]
fn exp_parts(x: f32) -> (f32, f32) {
    const LN2_HI: f32 = 0.693_359_4; // few mantissa bits: k * LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding then subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let k = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let p = r + r
        * r
        * (1.0 / 2.0
            + r * (1.0 / 6.0
                + r * (1.0 / 24.0
                    + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0 + r * (1.0 / 40320.0)))))));
    // 2^k from the low mantissa bits of ROUND + 127 + k (k in -126..=0).
    let s = f32::from_bits((k + (ROUND + 127.0)).to_bits() << 23);
    (s, p)
}

/// `e^x - 1` for `x <= 0` (NaN stays NaN): `2^k expm1(r) + (2^k - 1)`;
/// below -87 the result is -1 in f32 anyway.
#[inline(always)]
pub(crate) fn expm1_neg(x: f32) -> f32 {
    let (s, p) = exp_parts(if x < -87.0 { -87.0 } else { x });
    s * p + (s - 1.0)
}

/// `e^x` for `x <= 0` (NaN stays NaN); 0 below -87, where `e^x` is under
/// 1.7e-38 (libm returns subnormals there).
#[inline(always)]
pub(crate) fn exp_neg(x: f32) -> f32 {
    let under = x < -87.0;
    let (s, p) = exp_parts(if under { -87.0 } else { x });
    if under {
        0.0
    } else {
        s * p + s
    }
}

/// `ln(1 + u)` for `u` in `[0, 1]`. `w = 1 + u` is split as `2^e m` with
/// `m` in `[sqrt(1/2), sqrt(2))`; `ln m = 2 atanh(s)`, `s = f / (2 + f)`,
/// `f = m - 1` (exact), written as fdlibm does, `f - (f^2/2 - s (f^2/2 +
/// R(s^2)))`, so that the exact `f` carries the leading bits and the odd
/// series `R` (four terms for `|s| <= 0.172`) only a correction;
/// `(u - (w - 1)) / w` restores what rounding `1 + u` lost, so tiny
/// `u` come out as `u`.
#[inline(always)]
pub(crate) fn log1p_unit(u: f32) -> f32 {
    let w = 1.0 + u;
    let big = w >= std::f32::consts::SQRT_2;
    let m = if big { 0.5 * w } else { w };
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let r = z * (2.0 / 3.0 + z * (2.0 / 5.0 + z * (2.0 / 7.0 + z * (2.0 / 9.0))));
    let hfsq = 0.5 * f * f;
    let ln_m = f - (hfsq - s * (hfsq + r));
    let c = (u - (w - 1.0)) / w;
    (if big { std::f32::consts::LN_2 } else { 0.0 }) + (ln_m + c)
}

/// `1 / (1 + e^-x)`, from `e^-|x|` so that nothing overflows.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    let e = exp_neg(-x.abs());
    let r = 1.0 / (1.0 + e);
    if x >= 0.0 {
        r
    } else {
        e * r
    }
}

/// `tanh x = -expm1(-2|x|) / (2 + expm1(-2|x|))` with the sign of `x`:
/// `expm1` keeps the precision of small `|x|` that `1 - e^-2|x|` would lose.
#[inline(always)]
pub(crate) fn tanh(x: f32) -> f32 {
    let em = expm1_neg(-2.0 * x.abs());
    (-em / (2.0 + em)).copysign(x)
}

/// `ln(1 + e^x)` without overflow: `max(x, 0) + ln(1 + e^-|x|)`.
#[inline(always)]
pub(crate) fn softplus(x: f32) -> f32 {
    x.max(0.0) + log1p_unit(exp_neg(-x.abs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in ulp; zeros of either sign compare equal.
    fn ulps(a: f32, b: f32) -> i64 {
        if a == b {
            0
        } else {
            (a.to_bits() as i64 - b.to_bits() as i64).abs()
        }
    }

    /// Worst ulp distance of `f` from `reference` over 2M points spread
    /// densely near 0 (`x = -(i 1e-5)^2 * scale`, out to `-4e6 * scale`)
    /// and the given edge points.
    fn worst_ulps(scale: f32, edges: &[f32], f: impl Fn(f32) -> f32, reference: impl Fn(f32) -> f32) -> i64 {
        let points = (0..2_000_000).map(|i| -(i as f32 * 1e-5).powi(2) * scale);
        points
            .chain(edges.iter().copied())
            .map(|x| ulps(f(x), reference(x)))
            .max()
            .unwrap()
    }

    /// [`worst_ulps`] over both signs, `|x|` out to 62.5, plus `edges`.
    fn worst_ulps_both_signs(edges: &[f32], f: impl Fn(f32) -> f32, reference: impl Fn(f32) -> f32) -> i64 {
        let neg = worst_ulps(1.0 / 64.0, edges, &f, &reference);
        neg.max(worst_ulps(-1.0 / 64.0, &[], &f, &reference))
    }

    #[test]
    fn expm1_neg_is_within_two_ulp_of_libm() {
        let edges = [0.0, -0.0, -1e-30, -87.0, -100.0, f32::NEG_INFINITY];
        let worst = worst_ulps(1.0, &edges, expm1_neg, f32::exp_m1);
        assert!(worst <= 2, "{worst} ulp");
        assert!(expm1_neg(f32::NAN).is_nan());
    }

    #[test]
    fn exp_neg_is_within_two_ulp_of_libm_and_zero_below_its_range() {
        let x87 = |x: f32| if x < -87.0 { 0.0 } else { x.exp() };
        let edges = [0.0, -0.0, -1e-30, -87.0];
        let worst = worst_ulps(1.0 / 64.0, &edges, exp_neg, x87);
        assert!(worst <= 2, "{worst} ulp");
        for x in [-87.01, -100.0, f32::NEG_INFINITY] {
            assert_eq!(exp_neg(x), 0.0);
        }
        assert!(exp_neg(f32::NAN).is_nan());
    }

    #[test]
    fn log1p_unit_is_within_two_ulp_of_libm() {
        let edges = [0.0, 1e-30, 1e-7, 0.414_213_5, 0.414_213_6, 1.0];
        // u = -x in [0, 1], dense near 0.
        let worst = worst_ulps(1.0 / 400.0, &edges, |x| log1p_unit(x.abs()), |x| x.abs().ln_1p());
        assert!(worst <= 2, "{worst} ulp");
        assert!(log1p_unit(f32::NAN).is_nan());
    }

    #[test]
    fn sigmoid_tanh_softplus_are_within_a_few_ulp_of_libm() {
        let edges = [
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            100.0,
            -100.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        let libm_sigmoid = |x: f32| {
            if x >= 0.0 {
                1.0 / (1.0 + (-x).exp())
            } else {
                x.exp() / (1.0 + x.exp())
            }
        };
        let libm_softplus = |x: f32| x.max(0.0) + (-x.abs()).exp().ln_1p();
        // Below -87 sigmoid and softplus flush to 0 where libm gives subnormals.
        let flushed = |f: &dyn Fn(f32) -> f32, x: f32| if x < -87.0 { 0.0 } else { f(x) };
        let worst = [
            worst_ulps_both_signs(&edges, sigmoid, |x| flushed(&libm_sigmoid, x)),
            worst_ulps_both_signs(&edges, tanh, f32::tanh),
            worst_ulps_both_signs(&edges, softplus, |x| flushed(&libm_softplus, x)),
        ];
        assert!(
            worst.iter().all(|&w| w <= 4),
            "sigmoid, tanh, softplus: {worst:?} ulp"
        );
        assert!([sigmoid(f32::NAN), tanh(f32::NAN), softplus(f32::NAN)]
            .iter()
            .all(|v| v.is_nan()));
    }
}
