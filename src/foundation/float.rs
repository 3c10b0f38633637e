//! The real scalar types the crate computes in: `f32` and `f64`.

use std::fmt::{Debug, Display, LowerExp};
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

use ndarray::{Array, ArrayBase, Data, Dimension, LinalgScalar, ScalarOperand};
use ndarray_linalg::Lapack;

use crate::foundation::error::{FipsError, Result};

/// A real floating-point scalar with BLAS/LAPACK support: implemented for `f32` and `f64`.
///
/// The trait is sealed; the conversions are lossy casts (`f64` to `f32` rounds).
pub trait Float:
    Lapack<Real = Self>
    + LinalgScalar
    + ScalarOperand
    + PartialOrd
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
    + Default
    + Debug
    + Display
    + LowerExp
    + Send
    + Sync
    + sealed::Sealed
    + 'static
{
    /// The value `x` rounded to this type.
    fn cast(x: f64) -> Self;
    /// The value widened (or kept) as `f64`.
    fn as_f64(self) -> f64;
    /// |x|.
    fn abs_(self) -> Self;
    /// √x.
    fn sqrt_(self) -> Self;
    /// Whether x is neither NaN nor infinite.
    fn is_finite_(self) -> bool;
    /// The larger of `self` and `other` (NaN-ignoring, as `f64::max`).
    fn max_(self, other: Self) -> Self;
    /// Total order comparison of `self` and `other` (as `f64::total_cmp`).
    fn total_cmp_(&self, other: &Self) -> std::cmp::Ordering;
    /// e^x for activations: in `f32` a branch-free polynomial that vectorises (relative error
    /// below 2e-7), in `f64` the standard library's.
    fn exp_act(self) -> Self;
    /// Exact GELU `x Φ(x)` and its derivative `Φ(x) + x φ(x)`. In `f32`, erf comes from
    /// Abramowitz–Stegun 7.1.26 (absolute error ≤ 1.5e-7, the size of `f32` rounding) sharing one
    /// [`Float::exp_act`] with `φ`; in `f64`, from libm.
    fn gelu_with_derivative(self) -> (Self, Self);
    /// Width in bits of [`Float::magnitude_key`] (32 for `f32`, 64 for `f64`).
    const KEY_BITS: u32;
    /// The bit pattern of `|x|` as an unsigned integer: with the sign bit clear, integer order
    /// is [`Float::total_cmp_`]'s order of the magnitudes (NaN above +∞).
    fn magnitude_key(self) -> u64;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

macro_rules! impl_float {
    ($t:ty, $exp:path, $gelu:path, $bits:expr) => {
        impl Float for $t {
            #[inline]
            fn cast(x: f64) -> Self {
                x as $t
            }
            #[inline]
            fn as_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn abs_(self) -> Self {
                self.abs()
            }
            #[inline]
            fn sqrt_(self) -> Self {
                self.sqrt()
            }
            #[inline]
            fn is_finite_(self) -> bool {
                self.is_finite()
            }
            #[inline]
            fn max_(self, other: Self) -> Self {
                self.max(other)
            }
            #[inline]
            fn total_cmp_(&self, other: &Self) -> std::cmp::Ordering {
                self.total_cmp(other)
            }
            #[inline]
            fn exp_act(self) -> Self {
                $exp(self)
            }
            #[inline]
            fn gelu_with_derivative(self) -> (Self, Self) {
                $gelu(self)
            }
            const KEY_BITS: u32 = $bits;
            #[inline]
            fn magnitude_key(self) -> u64 {
                u64::from(self.abs().to_bits())
            }
        }
    };
}

impl_float!(f32, exp_f32, gelu_f32, 32);
impl_float!(f64, f64::exp, gelu_f64, 64);

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// GELU and its derivative in `f64` with libm's erf.
#[inline]
fn gelu_f64(x: f64) -> (f64, f64) {
    let cdf = 0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2));
    let pdf = FRAC_1_SQRT_2PI * (-0.5 * x * x).exp();
    (x * cdf, cdf + x * pdf)
}

/// e^x in `f32` without branches or library calls, so loops over it vectorise: `x = n ln 2 + r`
/// with `|r| ≤ ln 2 / 2`, `e^r` by a degree-6 Taylor polynomial, `2^n` built from the exponent bits.
/// Inputs below −87 give 0-ish subnormal-free results (clamped), above 88 clamp to `f32::MAX`-ish.
#[inline]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 · 2²³: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    // t = 1.5·2²³ + n exactly (the ulp is 1 there), so n is also t's mantissa bits minus ROUND's:
    // integer arithmetic that vectorises, unlike a saturating `as i32` cast.
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    p * scale
}

/// GELU and its derivative in `f32`: A&S 7.1.26 for erf, one exponential shared with φ.
#[inline]
fn gelu_f32(x: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_7;
    const A4: f32 = -1.453_152;
    const A5: f32 = 1.061_405_4;
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let e = exp_f32(-z * z); // e^{-x²/2}
    let t = 1.0 / (1.0 + P * z);
    let erf_abs = 1.0 - t * (A1 + t * (A2 + t * (A3 + t * (A4 + t * A5)))) * e;
    let erf = erf_abs.copysign(x);
    let cdf = 0.5 * (1.0 + erf);
    let pdf = FRAC_1_SQRT_2PI as f32 * e;
    (x * cdf, cdf + x * pdf)
}

/// Returns an error naming `what` and the index of the first non-finite entry, if any.
pub(crate) fn ensure_finite<F, S, D>(
    a: &ArrayBase<S, D>,
    what: impl FnOnce() -> String,
) -> Result<()>
where
    F: Float,
    S: Data<Elem = F>,
    D: Dimension,
{
    let Some(flat) = a.iter().position(|x| !x.is_finite_()) else {
        return Ok(());
    };
    // `iter` walks in logical (row-major) order: unravel the flat position.
    let mut index = vec![0; a.ndim()];
    let mut rest = flat;
    for (k, &len) in a.shape().iter().enumerate().rev() {
        index[k] = rest % len;
        rest /= len;
    }
    Err(FipsError::NonFinite {
        what: what(),
        index,
    })
}

/// Casts an array of one float type to another.
pub(crate) fn cast_array<A: Float, B: Float, S, D>(a: &ArrayBase<S, D>) -> Array<B, D>
where
    S: Data<Elem = A>,
    D: Dimension,
{
    a.mapv(|x| B::cast(x.as_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_f32_exp_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = -80.0f64;
        while x < 80.0 {
            let exact = (x as f32 as f64).exp();
            let got = exp_f32(x as f32) as f64;
            worst = worst.max(((got - exact) / exact).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert!(exp_f32(-200.0) < 1e-37);
        assert!(exp_f32(200.0).is_finite());
    }

    #[test]
    fn fast_f32_gelu_matches_f64_libm() {
        let (mut worst_v, mut worst_d) = (0.0f64, 0.0f64);
        let mut x = -12.0f64;
        while x < 12.0 {
            let (v64, d64) = gelu_f64(x);
            let (v32, d32) = gelu_f32(x as f32);
            worst_v = worst_v.max((v32 as f64 - v64).abs() / x.abs().max(1.0));
            worst_d = worst_d.max((d32 as f64 - d64).abs());
            x += 0.00731;
        }
        assert!(worst_v < 4e-7, "GELU error {worst_v}");
        assert!(worst_d < 1e-6, "GELU' error {worst_d}");
    }
}
