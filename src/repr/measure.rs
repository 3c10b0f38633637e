//! One measurement for every form: the structure of a group of dense blocks, and the relative
//! errors `‖Ŷ_b − Y_b‖ / ‖Y_b‖` of rebuilt blocks against the original outputs.

use ndarray::Array2;

use crate::foundation::activation::Activation;
use crate::foundation::error::{FipsError, Result};
use crate::foundation::float::Float;
use crate::foundation::mlp::{DenseMlp, MlpKind};
use crate::math::budget::GroupShape;
use crate::math::calibration::{
    Calibration, CalibrationReader, forward_chunked, squared_error_chunked, squared_error_streamed,
};

/// The validated structure of a group of blocks: every block has block 0's kind, activation,
/// width and MLP width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupSpec {
    /// Standard or gated.
    pub kind: MlpKind,
    /// The blocks' activation.
    pub activation: Activation,
    /// `d`, `I`, `n`, `f`.
    pub shape: GroupShape,
}

/// Checks that `blocks` is non-empty and uniform, and — given a calibration set — that it holds
/// one input array per block of width `d`.
pub fn validate_group<F: Float>(
    blocks: &[DenseMlp<F>],
    calibration: Option<&Calibration<F>>,
) -> Result<GroupSpec> {
    let first = blocks.first().ok_or(FipsError::EmptyGroup)?;
    for (b, mlp) in blocks.iter().enumerate().skip(1) {
        let reason = if mlp.kind() != first.kind() {
            Some(format!("kind {} differs from {}", mlp.kind(), first.kind()))
        } else if mlp.activation() != first.activation() {
            Some(format!(
                "activation {} differs from {}",
                mlp.activation(),
                first.activation()
            ))
        } else if mlp.width() != first.width() || mlp.intermediate() != first.intermediate() {
            Some(format!(
                "d = {}, I = {} differ from d = {}, I = {}",
                mlp.width(),
                mlp.intermediate(),
                first.width(),
                first.intermediate()
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(FipsError::GroupMismatch { block: b, reason });
        }
    }
    let spec = GroupSpec {
        kind: first.kind(),
        activation: first.activation(),
        shape: GroupShape {
            width: first.width(),
            intermediate: first.intermediate(),
            blocks: blocks.len(),
            matrices_per_block: first.kind().matrices_per_block(),
        },
    };
    if let Some(calibration) = calibration {
        if calibration.blocks() != blocks.len() {
            return Err(FipsError::ShapeMismatch {
                what: "calibration (one input array per block)".into(),
                expected: vec![blocks.len()],
                got: vec![calibration.blocks()],
            });
        }
        if calibration.width() != first.width() {
            return Err(FipsError::ShapeMismatch {
                what: "calibration inputs".into(),
                expected: vec![calibration.tokens(), first.width()],
                got: vec![calibration.tokens(), calibration.width()],
            });
        }
    }
    Ok(spec)
}

/// The targets `Y_b = MLP_b(Z_b)` of every block on its calibration inputs (in chunks).
pub fn targets<F: Float>(
    blocks: &[DenseMlp<F>],
    calibration: &Calibration<F>,
) -> Result<Vec<Array2<F>>> {
    blocks
        .iter()
        .zip(calibration.inputs())
        .map(|(mlp, z)| forward_chunked(mlp, z.view()))
        .collect()
}

/// Squared errors `‖Ŷ_b − Y_b‖²` and squared target norms `‖Y_b‖²` per block, accumulated in
/// `f64`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockErrors {
    /// `‖Ŷ_b − Y_b‖²` per block.
    pub error2: Vec<f64>,
    /// `‖Y_b‖²` per block.
    pub norm2: Vec<f64>,
}

impl BlockErrors {
    /// `√(Σ_b ‖Ŷ_b − Y_b‖² / Σ_b ‖Y_b‖²)` (the absolute error if every target is zero).
    pub fn overall(&self) -> f64 {
        let e: f64 = self.error2.iter().sum();
        let n: f64 = self.norm2.iter().sum();
        relative(e, n)
    }

    /// `‖Ŷ_b − Y_b‖ / ‖Y_b‖` per block.
    pub fn per_block(&self) -> Vec<f64> {
        self.error2
            .iter()
            .zip(&self.norm2)
            .map(|(&e, &n)| relative(e, n))
            .collect()
    }
}

fn relative(error2: f64, norm2: f64) -> f64 {
    if norm2 > 0.0 {
        (error2 / norm2).sqrt()
    } else {
        error2.sqrt()
    }
}

/// The errors of `rebuilt` (one dense block per calibration block) against `targets` over the
/// whole calibration set, in chunks of 4096 tokens.
pub fn block_errors<F: Float>(
    rebuilt: &[DenseMlp<F>],
    calibration: &Calibration<F>,
    targets: &[Array2<F>],
) -> Result<BlockErrors> {
    let mut error2 = Vec::with_capacity(targets.len());
    let mut norm2 = Vec::with_capacity(targets.len());
    for (mlp, (z, y)) in rebuilt.iter().zip(calibration.inputs().iter().zip(targets)) {
        let (e, n) = squared_error_chunked(mlp, z, y)?;
        error2.push(e);
        norm2.push(n);
    }
    Ok(BlockErrors { error2, norm2 })
}

/// [`block_errors`] with one dense block at a time: `rebuild(b)` gives block `b`, which is
/// dropped once measured, so at most one block's dense weights exist at once.
pub(crate) fn block_errors_one_at_a_time<F: Float>(
    mut rebuild: impl FnMut(usize) -> Result<DenseMlp<F>>,
    calibration: &Calibration<F>,
    targets: &[Array2<F>],
) -> Result<BlockErrors> {
    let mut error2 = Vec::with_capacity(targets.len());
    let mut norm2 = Vec::with_capacity(targets.len());
    for (b, (z, y)) in calibration.inputs().iter().zip(targets).enumerate() {
        let (e, n) = squared_error_chunked(&rebuild(b)?, z, y)?;
        error2.push(e);
        norm2.push(n);
    }
    Ok(BlockErrors { error2, norm2 })
}

/// [`block_errors_one_at_a_time`] without held targets: block `b`'s inputs are read from
/// `calibration` in chunks and its targets recomputed per chunk by `originals[b]`, so neither the
/// inputs nor the targets are held whole. Bit-identical to [`block_errors_one_at_a_time`] on
/// [`targets`] of the same inputs (the same chunks, the same operations).
pub(crate) fn block_errors_streamed<F: Float>(
    mut rebuild: impl FnMut(usize) -> Result<DenseMlp<F>>,
    originals: &[DenseMlp<F>],
    calibration: &dyn CalibrationReader<F>,
) -> Result<BlockErrors> {
    let mut error2 = Vec::with_capacity(originals.len());
    let mut norm2 = Vec::with_capacity(originals.len());
    for (b, original) in originals.iter().enumerate() {
        let (e, n) = squared_error_streamed(&rebuild(b)?, original, calibration, b)?;
        error2.push(e);
        norm2.push(n);
    }
    Ok(BlockErrors { error2, norm2 })
}
