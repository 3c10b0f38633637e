//! Calibration activations: the MLP inputs `Z_b` of every block of a group.

use ndarray::{Array2, ArrayView2, Axis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::foundation::error::{FipsError, Result};
use crate::foundation::float::{Float, ensure_finite};
use crate::foundation::mlp::DenseMlp;
use crate::foundation::slicing::s;

/// The MLP inputs of each block of a group, `Z_b` of shape `[tokens, d]`, one per block.
///
/// Every block holds the same number of tokens (token `t` of every block comes from the same
/// calibration position), so that a mini-batch can draw the same token indices for every block.
#[derive(Debug, Clone)]
pub struct Calibration<F> {
    inputs: Vec<Array2<F>>,
    data_free: bool,
}

impl<F: Float> Calibration<F> {
    /// Calibration from captured MLP inputs, one `[tokens, d]` array per block.
    ///
    /// Errors: no blocks, no tokens, blocks with different shapes, non-finite values.
    pub fn new(inputs: Vec<Array2<F>>) -> Result<Self> {
        let Some(first) = inputs.first() else {
            return Err(FipsError::EmptyCalibration {
                reason: "no blocks were given".into(),
            });
        };
        let shape = first.dim();
        if shape.0 == 0 || shape.1 == 0 {
            return Err(FipsError::EmptyCalibration {
                reason: format!("block 0 has shape {:?}", [shape.0, shape.1]),
            });
        }
        for (b, z) in inputs.iter().enumerate() {
            if z.dim() != shape {
                return Err(FipsError::ShapeMismatch {
                    what: format!("calibration inputs of block {b}"),
                    expected: vec![shape.0, shape.1],
                    got: z.shape().to_vec(),
                });
            }
            ensure_finite(z, || format!("calibration inputs of block {b}"))?;
        }
        Ok(Self {
            inputs,
            data_free: false,
        })
    }

    /// Data-free calibration: i.i.d. standard Gaussian inputs, the same draw for every block.
    ///
    /// Reports label results obtained this way as data-free: a real model's MLP inputs are
    /// LayerNorm outputs with structure that Gaussian noise does not have.
    pub fn gaussian(blocks: usize, tokens: usize, width: usize, seed: u64) -> Result<Self> {
        if blocks == 0 || tokens == 0 || width == 0 {
            return Err(FipsError::EmptyCalibration {
                reason: format!("asked for {blocks} blocks of {tokens} tokens of width {width}"),
            });
        }
        crate::math::limits::check_generated(blocks, tokens, width)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let z = Array2::from_shape_simple_fn((tokens, width), || {
            let x: f64 = StandardNormal.sample(&mut rng);
            F::cast(x)
        });
        Ok(Self {
            inputs: vec![z; blocks],
            data_free: true,
        })
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.inputs.len()
    }

    /// Tokens per block.
    pub fn tokens(&self) -> usize {
        self.inputs[0].nrows()
    }

    /// Width d.
    pub fn width(&self) -> usize {
        self.inputs[0].ncols()
    }

    /// Block `b`'s inputs `[tokens, d]`.
    pub fn input(&self, b: usize) -> Result<ArrayView2<'_, F>> {
        self.inputs
            .get(b)
            .map(|z| z.view())
            .ok_or(FipsError::IndexOutOfRange {
                what: "calibration block",
                index: b,
                len: self.inputs.len(),
            })
    }

    /// All blocks' inputs.
    pub fn inputs(&self) -> &[Array2<F>] {
        &self.inputs
    }

    /// The per-block input matrices, taking the set apart.
    pub fn into_inputs(self) -> Vec<Array2<F>> {
        self.inputs
    }

    /// Whether the inputs are synthetic Gaussian noise rather than captured activations.
    pub fn is_data_free(&self) -> bool {
        self.data_free
    }
}

/// Tokens per chunk when running a whole calibration set through a block.
pub(crate) const CHUNK_TOKENS: usize = 4096;

/// `mlp(z)` computed in chunks of [`CHUNK_TOKENS`] rows, so the `[tokens, I]` hidden state is never
/// held whole.
pub(crate) fn forward_chunked<F: Float>(
    mlp: &DenseMlp<F>,
    z: ArrayView2<'_, F>,
) -> Result<Array2<F>> {
    let mut y = Array2::zeros((z.nrows(), mlp.width()));
    for (zc, mut yc) in z
        .axis_chunks_iter(Axis(0), CHUNK_TOKENS)
        .zip(y.axis_chunks_iter_mut(Axis(0), CHUNK_TOKENS))
    {
        yc.assign(&mlp.forward(zc)?);
    }
    Ok(y)
}

/// `(‖mlp(z) − y‖², ‖y‖²)` in `f64`, `mlp(z)` computed in chunks of [`CHUNK_TOKENS`] rows (no
/// `[tokens, I]` hidden state, no copy of `z` or `y`).
pub(crate) fn squared_error_chunked<F: Float>(
    mlp: &DenseMlp<F>,
    z: &Array2<F>,
    y: &Array2<F>,
) -> Result<(f64, f64)> {
    let (mut e, mut n) = (0.0f64, 0.0f64);
    for (zc, yc) in z
        .axis_chunks_iter(Axis(0), CHUNK_TOKENS)
        .zip(y.axis_chunks_iter(Axis(0), CHUNK_TOKENS))
    {
        let yhat = mlp.forward(zc)?;
        ndarray::Zip::from(&yhat).and(&yc).for_each(|&p, &t| {
            let (p, t) = (p.as_f64(), t.as_f64());
            e += (p - t) * (p - t);
            n += t * t;
        });
    }
    Ok((e, n))
}

/// Copies rows `indices` of `src` into the first `indices.len()` rows of `dst`.
pub(crate) fn gather_rows<F: Float>(
    src: ArrayView2<'_, F>,
    indices: &[usize],
    dst: &mut Array2<F>,
) {
    let width = src.ncols();
    if let (Some(from), Some(to)) = (src.as_slice(), dst.as_slice_mut()) {
        // Row-major on both sides (the trainer's case): one memcpy per row.
        for (row, &i) in to.chunks_exact_mut(width).zip(indices) {
            row.copy_from_slice(&from[i * width..(i + 1) * width]);
        }
        return;
    }
    for (k, &i) in indices.iter().enumerate() {
        dst.slice_mut(s![k, ..]).assign(&src.row(i));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_ragged_and_nonfinite() {
        assert!(matches!(
            Calibration::<f32>::new(vec![]),
            Err(FipsError::EmptyCalibration { .. })
        ));
        assert!(matches!(
            Calibration::<f32>::new(vec![Array2::zeros((0, 4))]),
            Err(FipsError::EmptyCalibration { .. })
        ));
        assert!(matches!(
            Calibration::<f32>::new(vec![Array2::zeros((3, 4)), Array2::zeros((2, 4))]),
            Err(FipsError::ShapeMismatch { .. })
        ));
        let mut z = Array2::<f64>::zeros((3, 4));
        z[[2, 1]] = f64::INFINITY;
        assert!(matches!(
            Calibration::new(vec![Array2::zeros((3, 4)), z]),
            Err(FipsError::NonFinite { .. })
        ));
    }

    #[test]
    fn gaussian_is_seeded_and_labelled() {
        let a = Calibration::<f32>::gaussian(2, 64, 8, 7).unwrap();
        let b = Calibration::<f32>::gaussian(2, 64, 8, 7).unwrap();
        let c = Calibration::<f32>::gaussian(2, 64, 8, 8).unwrap();
        assert!(a.is_data_free());
        assert_eq!(a.inputs()[0], b.inputs()[0]);
        assert_ne!(a.inputs()[0], c.inputs()[0]);
        let mean = a.inputs()[0].mean().unwrap();
        assert!(mean.abs() < 0.2, "mean {mean}");
    }
}
