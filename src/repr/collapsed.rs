//! The collapsed form (LayerCollapse): one linear map `y = M x + b` per block.
//!
//! At PReLU slope 1 a standard MLP is linear and collapses exactly: `M = W₂ W₁` (`d × d`),
//! `b = W₂ b₁ + b₂`; when `I < d` the product is kept factored. A linear map fits the original
//! architecture exactly when `I ≥ 2d`, because every supported activation satisfies
//! `act(z) − act(−z) = z` (GELU, tanh GELU, ReLU and SiLU are `z g(z)` with `g(z) + g(−z) = 1`):
//! `fc1 = [I_d; −I_d; 0]`, `fc2 = [M, −M, 0]`, `b₂ = b`.

use ndarray::{Array1, Array2, ArrayView2};

use crate::foundation::activation::Activation;
use crate::foundation::error::{FipsError, Result, invalid};
use crate::foundation::float::{Float, ensure_finite};
use crate::foundation::mlp::{DenseMlp, Linear};
use crate::foundation::slicing::s;
use crate::math::budget::ParameterCount;

/// One collapsed block's linear map `y = M x + b`.
#[derive(Debug, Clone, PartialEq)]
pub enum CollapsedMap<F> {
    /// `M` as one `[d, d]` matrix (when `I ≥ d`).
    Full(Array2<F>),
    /// `M = left · right` (`[d, I] · [I, d]`, when `I < d`: fewer parameters than `d²`).
    Factored {
        /// `W₂`, `[d, I]`.
        left: Array2<F>,
        /// `W₁`, `[I, d]`.
        right: Array2<F>,
    },
}

/// A collapsed block.
#[derive(Debug, Clone, PartialEq)]
pub struct CollapsedBlock<F> {
    /// The linear map.
    pub map: CollapsedMap<F>,
    /// Its bias `W₂ b₁ + b₂`, `[d]`.
    pub bias: Array1<F>,
    /// The PReLU slope reached before the merge (the merge sets it to 1).
    pub slope: f64,
    /// Whether the slope came within the tolerance of 1.
    pub converged: bool,
}

impl<F: Float> CollapsedBlock<F> {
    /// `M` as a `[d, d]` matrix.
    pub fn matrix(&self) -> Array2<F> {
        match &self.map {
            CollapsedMap::Full(m) => m.clone(),
            CollapsedMap::Factored { left, right } => left.dot(right),
        }
    }

    fn weight_count(&self) -> usize {
        match &self.map {
            CollapsedMap::Full(m) => m.len(),
            CollapsedMap::Factored { left, right } => left.len() + right.len(),
        }
    }
}

/// A group of collapsed blocks of width `d` (originally MLP width `I`).
#[derive(Debug, Clone, PartialEq)]
pub struct CollapsedGroup<F> {
    width: usize,
    intermediate: usize,
    activation: Activation,
    blocks: Vec<CollapsedBlock<F>>,
}

impl<F: Float> CollapsedGroup<F> {
    /// A group from its blocks (checked against `d` and `I`).
    pub fn new(
        width: usize,
        intermediate: usize,
        activation: Activation,
        blocks: Vec<CollapsedBlock<F>>,
    ) -> Result<Self> {
        if blocks.is_empty() {
            return Err(FipsError::EmptyGroup);
        }
        for (b, block) in blocks.iter().enumerate() {
            let ok = match &block.map {
                CollapsedMap::Full(m) => m.dim() == (width, width),
                CollapsedMap::Factored { left, right } => {
                    left.dim() == (width, intermediate) && right.dim() == (intermediate, width)
                }
            };
            if !ok || block.bias.len() != width {
                return Err(FipsError::ShapeMismatch {
                    what: format!("collapsed block {b}"),
                    expected: vec![width, width],
                    got: vec![
                        block.matrix().nrows(),
                        block.matrix().ncols(),
                        block.bias.len(),
                    ],
                });
            }
            ensure_finite(&block.matrix(), || format!("collapsed block {b}"))?;
        }
        Ok(Self {
            width,
            intermediate,
            activation,
            blocks,
        })
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Model width d.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The original MLP width I.
    pub fn intermediate(&self) -> usize {
        self.intermediate
    }

    /// The original activation (used by the densified form).
    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// Block `b`.
    pub fn block(&self, b: usize) -> Result<&CollapsedBlock<F>> {
        self.blocks.get(b).ok_or(FipsError::IndexOutOfRange {
            what: "block",
            index: b,
            len: self.blocks.len(),
        })
    }

    /// `d² ` (or `2 d I`) per block against `2 d I`; biases `d` per block.
    pub fn parameter_count(&self) -> ParameterCount {
        ParameterCount {
            dense_weights: 2 * self.width * self.intermediate * self.blocks.len(),
            basis: 0,
            factor_nonzeros: self.blocks.iter().map(CollapsedBlock::weight_count).sum(),
            biases: self.width * self.blocks.len(),
        }
    }

    /// Block `b`'s output `x Mᵀ + b` for inputs `[tokens, d]`.
    pub fn forward(&self, b: usize, x: ArrayView2<'_, F>) -> Result<Array2<F>> {
        let block = self.block(b)?;
        if x.ncols() != self.width {
            return Err(FipsError::ShapeMismatch {
                what: "collapsed block input".into(),
                expected: vec![x.nrows(), self.width],
                got: x.shape().to_vec(),
            });
        }
        let mut y = match &block.map {
            CollapsedMap::Full(m) => x.dot(&m.t()),
            CollapsedMap::Factored { left, right } => x.dot(&right.t()).dot(&left.t()),
        };
        y += &block.bias;
        Ok(y)
    }

    /// Block `b` in the original architecture, exactly: `fc1 = [I_d; −I_d; 0]`,
    /// `fc2 = [M, −M, 0]`, `b₂ = b` (needs `I ≥ 2d`).
    pub fn to_dense_mlp(&self, b: usize) -> Result<DenseMlp<F>> {
        let block = self.block(b)?;
        let (d, i) = (self.width, self.intermediate);
        if i < 2 * d {
            return Err(invalid(
                "layer-collapse",
                format!(
                    "a collapsed block fits the original architecture only when I ≥ 2d (I = {i}, d = {d})"
                ),
            ));
        }
        let m = block.matrix();
        let mut fc1 = Array2::zeros((i, d));
        let mut fc2 = Array2::zeros((d, i));
        for k in 0..d {
            fc1[[k, k]] = F::one();
            fc1[[d + k, k]] = -F::one();
        }
        fc2.slice_mut(s![.., ..d]).assign(&m);
        fc2.slice_mut(s![.., d..2 * d]).assign(&m.mapv(|x| -x));
        DenseMlp::standard(
            Linear::new(fc1, Some(Array1::zeros(i)))?,
            Linear::new(fc2, Some(block.bias.clone()))?,
            self.activation,
        )
    }
}
