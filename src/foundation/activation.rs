//! Elementwise MLP activations and their derivatives.

use std::fmt;
use std::str::FromStr;

use crate::foundation::error::{FipsError, invalid};
use crate::foundation::float::Float;

/// The activation between an MLP's projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact GELU, `x Φ(x) = x (1 + erf(x/√2)) / 2` (ViT, DeiT, BERT).
    Gelu,
    /// GELU with the tanh approximation, `x (1 + tanh(√(2/π)(x + 0.044715 x³))) / 2` (GPT-2, Gemma).
    GeluTanh,
    /// `max(0, x)`.
    Relu,
    /// SiLU / swish, `x σ(x)` (Llama, Mistral, Qwen).
    Silu,
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_TANH_C: f64 = 0.044_715;

impl Activation {
    /// All activations, in declaration order.
    pub const ALL: [Activation; 4] = [Self::Gelu, Self::GeluTanh, Self::Relu, Self::Silu];

    /// The activation's value at `x`.
    #[inline]
    pub fn apply<F: Float>(self, x: F) -> F {
        self.apply_with_derivative(x).0
    }

    /// The derivative of the activation at `x`.
    #[inline]
    pub fn derivative<F: Float>(self, x: F) -> F {
        self.apply_with_derivative(x).1
    }

    /// The value and the derivative at `x`, sharing the transcendental evaluations.
    #[inline]
    pub fn apply_with_derivative<F: Float>(self, x: F) -> (F, F) {
        let half = F::cast(0.5);
        let one = F::one();
        match self {
            // Φ(x) = (1 + erf(x/√2))/2, φ(x) = e^{-x²/2}/√(2π); d/dx x Φ(x) = Φ(x) + x φ(x).
            Self::Gelu => x.gelu_with_derivative(),
            Self::GeluTanh => {
                let k = F::cast(SQRT_2_OVER_PI);
                let c = F::cast(GELU_TANH_C);
                let x2 = x * x;
                // tanh(y) = 1 − 2 / (e^{2y} + 1), with the vectorisable exponential.
                let y = k * x * (one + c * x2);
                let t = one - F::cast(2.0) / ((y + y).exp_act() + one);
                let inner_deriv = k * (one + F::cast(3.0) * c * x2);
                (
                    half * x * (one + t),
                    half * (one + t) + half * x * (one - t * t) * inner_deriv,
                )
            }
            Self::Relu => {
                if x > F::zero() {
                    (x, one)
                } else {
                    (F::zero(), F::zero())
                }
            }
            Self::Silu => {
                let s = one / (one + (-x).exp_act());
                (x * s, s * (one + x * (one - s)))
            }
        }
    }

    /// Replaces every `x` by `act(x)` (value only: the derivative's extra work is optimised away).
    #[inline(always)]
    pub(crate) fn apply_slice<F: Float>(self, xs: &mut [F]) {
        #[inline(always)]
        fn run<F: Float>(xs: &mut [F], k: impl Fn(F) -> (F, F)) {
            for x in xs.iter_mut() {
                *x = k(*x).0;
            }
        }
        match self {
            Self::Gelu => run(xs, |x| Self::Gelu.apply_with_derivative(x)),
            Self::GeluTanh => run(xs, |x| Self::GeluTanh.apply_with_derivative(x)),
            Self::Relu => run(xs, |x| Self::Relu.apply_with_derivative(x)),
            Self::Silu => run(xs, |x| Self::Silu.apply_with_derivative(x)),
        }
    }

    /// Gated hidden state: `gate ← act(gate) ⊙ up` (value only).
    #[inline(always)]
    pub(crate) fn apply_gated_slice<F: Float>(self, gate: &mut [F], up: &[F]) {
        #[inline(always)]
        fn run<F: Float>(gate: &mut [F], up: &[F], k: impl Fn(F) -> (F, F)) {
            for (g, &u) in gate.iter_mut().zip(up) {
                *g = k(*g).0 * u;
            }
        }
        match self {
            Self::Gelu => run(gate, up, |x| Self::Gelu.apply_with_derivative(x)),
            Self::GeluTanh => run(gate, up, |x| Self::GeluTanh.apply_with_derivative(x)),
            Self::Relu => run(gate, up, |x| Self::Relu.apply_with_derivative(x)),
            Self::Silu => run(gate, up, |x| Self::Silu.apply_with_derivative(x)),
        }
    }

    /// Replaces every pre-activation `h` by `act(h)` and writes `act'(h)` into `slope`.
    #[inline(always)]
    pub(crate) fn forward_slices<F: Float>(self, h: &mut [F], slope: &mut [F]) {
        // One monomorphised loop per activation, so the loop body is branch-free and vectorises.
        #[inline(always)]
        fn run<F: Float>(h: &mut [F], slope: &mut [F], k: impl Fn(F) -> (F, F)) {
            for (x, s) in h.iter_mut().zip(slope.iter_mut()) {
                (*x, *s) = k(*x);
            }
        }
        match self {
            Self::Gelu => run(h, slope, |x| Self::Gelu.apply_with_derivative(x)),
            Self::GeluTanh => run(h, slope, |x| Self::GeluTanh.apply_with_derivative(x)),
            Self::Relu => run(h, slope, |x| Self::Relu.apply_with_derivative(x)),
            Self::Silu => run(h, slope, |x| Self::Silu.apply_with_derivative(x)),
        }
    }

    /// Gated forward: `gate ← act(gate)`, `a = act(gate) ⊙ up`, `slope = act'(gate) ⊙ up`.
    #[inline(always)]
    pub(crate) fn gated_slices<F: Float>(
        self,
        gate: &mut [F],
        up: &[F],
        a: &mut [F],
        slope: &mut [F],
    ) {
        #[inline(always)]
        fn run<F: Float>(
            gate: &mut [F],
            up: &[F],
            a: &mut [F],
            slope: &mut [F],
            k: impl Fn(F) -> (F, F),
        ) {
            for (((g, &u), a), s) in gate
                .iter_mut()
                .zip(up)
                .zip(a.iter_mut())
                .zip(slope.iter_mut())
            {
                let (value, d) = k(*g);
                *g = value;
                *a = value * u;
                *s = d * u;
            }
        }
        match self {
            Self::Gelu => run(gate, up, a, slope, |x| Self::Gelu.apply_with_derivative(x)),
            Self::GeluTanh => run(gate, up, a, slope, |x| {
                Self::GeluTanh.apply_with_derivative(x)
            }),
            Self::Relu => run(gate, up, a, slope, |x| Self::Relu.apply_with_derivative(x)),
            Self::Silu => run(gate, up, a, slope, |x| Self::Silu.apply_with_derivative(x)),
        }
    }

    /// The name used in manifests and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gelu => "gelu",
            Self::GeluTanh => "gelu_tanh",
            Self::Relu => "relu",
            Self::Silu => "silu",
        }
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Activation {
    type Err = FipsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "gelu" | "gelu_erf" => Ok(Self::Gelu),
            "gelu_tanh" | "gelu_pytorch_tanh" | "gelu_new" => Ok(Self::GeluTanh),
            "relu" => Ok(Self::Relu),
            "silu" | "swish" => Ok(Self::Silu),
            other => Err(invalid(
                "activation",
                format!("unknown activation {other:?} (expected gelu, gelu_tanh, relu or silu)"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_abs_diff_eq;

    #[test]
    fn derivatives_match_central_differences() {
        let h = 1e-6;
        for act in Activation::ALL {
            for &x in &[-3.1, -1.3, -0.2, 0.37, 0.9, 2.4] {
                let fd = (act.apply(x + h) - act.apply(x - h)) / (2.0 * h);
                assert_abs_diff_eq!(act.derivative(x), fd, epsilon = 1e-7);
            }
        }
    }

    #[test]
    fn known_values() {
        // GELU(1) = Φ(1) = 0.8413447460685429.
        assert_abs_diff_eq!(
            Activation::Gelu.apply(1.0f64),
            0.841_344_746_068_542_9,
            epsilon = 1e-12
        );
        assert_abs_diff_eq!(Activation::Silu.apply(0.0f64), 0.0, epsilon = 0.0);
        assert_abs_diff_eq!(Activation::Relu.apply(-2.0f64), 0.0, epsilon = 0.0);
        assert_abs_diff_eq!(
            Activation::GeluTanh.apply(1.0f64),
            0.841_191_990_608_276_8,
            epsilon = 1e-12
        );
        assert_abs_diff_eq!(Activation::Gelu.apply(1.0f32), 0.841_344_7, epsilon = 1e-6);
    }

    #[test]
    fn names_round_trip() {
        for act in Activation::ALL {
            assert_eq!(act.name().parse::<Activation>().unwrap(), act);
        }
        assert!("tanhh".parse::<Activation>().is_err());
    }
}
