//! A held-out validation split of the calibration data, and the error of a group on it.
//!
//! Training settings (steps, learning rate, early stopping, augmentation) are chosen on data the
//! training never saw but that comes from the calibration source, never on the evaluation set:
//! [`holdout`] draws a seeded subset of items (images, paragraphs or tokens) to hold out, and a
//! [`ValidationSet`] measures `‖Ŷ − Y‖ / ‖Y‖` of a compressed group on the held-out inputs, where
//! `Y` are the original blocks' outputs (the same relative error the reports give for the
//! calibration set).

use ndarray::{Array2, Axis};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::calibration::Calibration;
use crate::error::{FipsError, Result, invalid};
use crate::float::Float;
use crate::group::CompressedGroup;
use crate::mlp::DenseMlp;

/// Splits `0..n` into `(kept, held_out)`, both sorted: `round(fraction · n)` items (at least one,
/// at most `n − 1`) drawn by a seeded shuffle are held out.
///
/// Errors: `n < 2`, or `fraction` outside `(0, 1)`.
pub fn holdout(n: usize, fraction: f64, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(invalid(
            "validation fraction",
            format!("must be in (0, 1), got {fraction}"),
        ));
    }
    if n < 2 {
        return Err(invalid(
            "validation fraction",
            format!("cannot hold out part of {n} items"),
        ));
    }
    let count = ((fraction * n as f64).round() as usize).clamp(1, n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let mut held = order[..count].to_vec();
    let mut kept = order[count..].to_vec();
    held.sort_unstable();
    kept.sort_unstable();
    Ok((kept, held))
}

/// Splits a calibration set by tokens: the same seeded [`holdout`] of token positions for every
/// block, returned as `(training, validation)`.
pub fn split_tokens<F: Float>(
    calibration: &Calibration<F>,
    fraction: f64,
    seed: u64,
) -> Result<(Calibration<F>, Calibration<F>)> {
    let (kept, held) = holdout(calibration.tokens(), fraction, seed)?;
    let take = |rows: &[usize]| {
        Calibration::new(
            calibration
                .inputs()
                .iter()
                .map(|z| z.select(Axis(0), rows))
                .collect(),
        )
    };
    Ok((take(&kept)?, take(&held)?))
}

/// Held-out inputs of every block of a group and the original blocks' outputs on them.
#[derive(Debug, Clone)]
pub struct ValidationSet<F> {
    inputs: Vec<Array2<F>>,
    targets: Vec<Array2<F>>,
}

impl<F: Float> ValidationSet<F> {
    /// The validation set of `blocks` on `inputs` (one `[tokens, d]` array per block).
    pub fn new(blocks: &[DenseMlp<F>], inputs: &Calibration<F>) -> Result<Self> {
        if blocks.len() != inputs.blocks() {
            return Err(FipsError::ShapeMismatch {
                what: "validation inputs (one array per block)".into(),
                expected: vec![blocks.len()],
                got: vec![inputs.blocks()],
            });
        }
        let targets = blocks
            .iter()
            .zip(inputs.inputs())
            .map(|(mlp, z)| mlp.forward(z.view()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            inputs: inputs.inputs().to_vec(),
            targets,
        })
    }

    /// Tokens per block.
    pub fn tokens(&self) -> usize {
        self.inputs.first().map_or(0, |z| z.nrows())
    }

    /// `‖Ŷ − Y‖ / ‖Y‖` over every block of `group` (each block's weights rebuilt dense once).
    pub fn relative_error(&self, group: &CompressedGroup<F>) -> Result<f64> {
        if group.blocks() != self.inputs.len() {
            return Err(FipsError::ShapeMismatch {
                what: "compressed group (blocks)".into(),
                expected: vec![self.inputs.len()],
                got: vec![group.blocks()],
            });
        }
        let (mut error2, mut norm2) = (0.0f64, 0.0f64);
        for (b, (z, y)) in self.inputs.iter().zip(&self.targets).enumerate() {
            let yhat = group.to_dense_mlp(b)?.forward(z.view())?;
            ndarray::Zip::from(&yhat).and(y).for_each(|&p, &t| {
                let (p, t) = (p.as_f64(), t.as_f64());
                error2 += (p - t) * (p - t);
                norm2 += t * t;
            });
        }
        Ok(if norm2 > 0.0 {
            (error2 / norm2).sqrt()
        } else {
            error2.sqrt()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activation::Activation;
    use crate::mlp::Linear;
    use crate::params::FipsParams;
    use rand_distr::{Distribution, StandardNormal};

    #[test]
    fn holdout_is_seeded_disjoint_and_complete() {
        let (kept, held) = holdout(250, 0.05, 7).unwrap();
        assert_eq!(held.len(), 13);
        assert_eq!(kept.len() + held.len(), 250);
        let mut all: Vec<usize> = kept.iter().chain(&held).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..250).collect::<Vec<_>>());
        assert_eq!(holdout(250, 0.05, 7).unwrap().1, held);
        assert_ne!(holdout(250, 0.05, 8).unwrap().1, held);
        assert_eq!(holdout(3, 0.01, 0).unwrap().1.len(), 1);
        assert_eq!(holdout(3, 0.99, 0).unwrap().1.len(), 2);
        assert!(holdout(1, 0.5, 0).is_err());
        assert!(holdout(10, 0.0, 0).is_err());
        assert!(holdout(10, 1.0, 0).is_err());
    }

    fn blocks(rng: &mut ChaCha8Rng, n: usize, d: usize, i: usize) -> Vec<DenseMlp<f64>> {
        let mut randn = |r: usize, c: usize| {
            Array2::from_shape_simple_fn((r, c), || {
                let z: f64 = StandardNormal.sample(rng);
                z / (c as f64).sqrt()
            })
        };
        (0..n)
            .map(|_| {
                DenseMlp::standard(
                    Linear::new(randn(i, d), None).unwrap(),
                    Linear::new(randn(d, i), None).unwrap(),
                    Activation::Gelu,
                )
                .unwrap()
            })
            .collect()
    }

    /// A snapshot evaluated on the calibration set itself gives the error the report gives for
    /// the same state, before and after training.
    #[test]
    fn snapshot_error_on_the_calibration_set_equals_the_reported_error() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let group = blocks(&mut rng, 2, 8, 16);
        let calibration = Calibration::gaussian(2, 300, 8, 5).unwrap();
        let same = ValidationSet::new(&group, &calibration).unwrap();
        assert_eq!(same.tokens(), 300);
        for steps in [0, 30] {
            let compressor = FipsParams::new()
                .sparsity(0.5)
                .steps(steps)
                .batch_tokens(64)
                .learning_rate(1e-2)
                .build()
                .unwrap();
            let mut trainer = compressor.trainer(&group, &calibration).unwrap();
            while trainer.step().unwrap().is_some() {}
            let snapshot = same.relative_error(&trainer.snapshot().unwrap()).unwrap();
            let report = trainer.finish().unwrap().report;
            assert!(
                (snapshot - report.rel_error_final).abs() <= 1e-12,
                "{steps} steps: snapshot {snapshot} vs report {}",
                report.rel_error_final
            );
        }
    }

    #[test]
    fn token_split_keeps_rows_aligned_across_blocks() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let z: Array2<f64> =
            Array2::from_shape_simple_fn((50, 3), || StandardNormal.sample(&mut rng));
        let calibration = Calibration::new(vec![z.clone(), z.mapv(|x| 2.0 * x)]).unwrap();
        let (train, val) = split_tokens(&calibration, 0.2, 4).unwrap();
        assert_eq!((train.tokens(), val.tokens()), (40, 10));
        assert_eq!(val.inputs()[1], val.inputs()[0].mapv(|x| 2.0 * x));
        let (_, held) = holdout(50, 0.2, 4).unwrap();
        assert_eq!(val.inputs()[0].row(0), z.row(held[0]));
    }
}
