//! Basis sharing across layers (Basis Sharing style): the matrices of one type (fc1, fc2; or gate,
//! up, down) in a group of `g` consecutive blocks share one whitened input basis.
//!
//! For a type with weights `W_i` (`[m, n]`, `i = 1..g`), stack `W = [W_1; …; W_g]` (`[g m, n]`),
//! pool the input statistics `G = Σ_i X_iᵀ X_i = L Lᵀ`, and take the whitened SVD
//! `W L = U Σ Vᵀ`. With `k = ⌊n m g p / (n + m g)⌋` the shared basis is `B = Σ_k^{1/2} V_kᵀ L⁻¹`
//! (`[k, n]`) and layer `i`'s coefficients are its rows of `U_k Σ_k^{1/2}` (`[m, k]`), so the type
//! costs `k n + g k m` parameters. The stacked output error is `Σ_{j>k} σ_j²` for the pooled inputs.

use std::ops::ControlFlow;
use std::time::Instant;

use ndarray::{Axis, concatenate};

use crate::foundation::error::{FipsError, Result};
use crate::foundation::float::Float;
use crate::foundation::mlp::{DenseMlp, MatrixRole};
use crate::foundation::slicing::s;
use crate::math::budget::Budget;
use crate::math::calibration::{Calibration, CalibrationReader};
use crate::math::subset::read_whole;
use crate::math::whitening::{Gram, WhitenedSvd, block_input_grams, cholesky_with_jitter};
use crate::methods::compressor::{Compressor, MethodOutput, Run};
use crate::methods::params::{BasisSharingValidParams, MethodParams};
use crate::methods::report::{BasisSharingDetails, Method, MethodDetails, Progress};
use crate::repr::{CompressedBlocks, LowRankGroup, LowRankMatrix, validate_group};

/// The shared rank `k = ⌊n m g p / (n + m g)⌋` of `g` matrices `[m, n]` sharing an input basis.
pub fn shared_rank(m: usize, n: usize, g: usize, p: f64) -> Result<usize> {
    Budget::Fraction(p).check()?;
    let k =
        (n as f64 * m as f64 * g as f64 * p / (n + m * g) as f64 * (1.0 + 1e-12)).floor() as usize;
    if k == 0 {
        return Err(FipsError::ZeroRank {
            budget: p,
            sparsity: 0.0,
            d: n,
            intermediate: m,
            matrices: g,
        });
    }
    Ok(k)
}

impl<F: Float> Compressor<F> for BasisSharingValidParams {
    fn method(&self) -> Method {
        Method::BasisSharing
    }

    fn parameters(&self) -> MethodParams {
        MethodParams::BasisSharing(*self.params())
    }

    fn compress(
        &self,
        blocks: &[DenseMlp<F>],
        calibration: &dyn CalibrationReader<F>,
        _on_step: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<MethodOutput<F>> {
        // Every token in memory at once (see `Compressor::compress`).
        crate::math::calibration::refuse_targets(calibration, "basis sharing")?;
        let whole = read_whole(calibration)?;
        let calibration: &Calibration<F> = &whole;
        let start = Instant::now();
        let spec = validate_group(blocks, Some(calibration))?;
        let first = &blocks[0];
        let (d, i, g) = (first.width(), first.intermediate(), blocks.len());
        let kind = first.kind();
        let f = kind.matrices_per_block();
        // Pooled input statistics of the up-type inputs (d × d) and the down inputs (I × I).
        let (mut up_gram, mut down_gram) = (Gram::new(d), Gram::new(i));
        for (mlp, z) in blocks.iter().zip(calibration.inputs()) {
            let (up, down) = block_input_grams(mlp, z.view())?;
            up_gram.merge(&up)?;
            down_gram.merge(&down)?;
        }
        let up_l = cholesky_with_jitter(up_gram.matrix().view())?;
        let down_l = cholesky_with_jitter(down_gram.matrix().view())?;

        let mut bases = Vec::with_capacity(f);
        let mut lefts: Vec<Option<LowRankMatrix<F>>> = vec![None; f * g];
        let mut ranks = Vec::with_capacity(f);
        for (m, role) in kind.matrix_roles().iter().enumerate() {
            let (out, input, (l, jitter)) = match role {
                MatrixRole::Up => (i, d, &up_l),
                MatrixRole::Down => (d, i, &down_l),
            };
            let k = match self.budget() {
                Budget::Fraction(p) => shared_rank(out, input, g, p)?,
                Budget::Rank(r) => {
                    // The shared basis spans the rows of the g stacked [out, in] matrices.
                    crate::math::limits::check_low_rank("rank", r, g * out, input)?;
                    r
                }
            };
            let stacked_parts: Vec<_> = blocks
                .iter()
                .map(|b| b.layers()[m].weight().view())
                .collect();
            let stacked = concatenate(Axis(0), &stacked_parts)
                .map_err(|e| FipsError::Numerical(e.to_string()))?;
            let svd = WhitenedSvd::with_cholesky(stacked.view(), l.clone(), *jitter)?;
            let (a, basis) = svd.factors::<F>(k)?;
            for (b, mlp) in blocks.iter().enumerate() {
                lefts[b * f + m] = Some(LowRankMatrix {
                    left: a.slice(s![b * out..(b + 1) * out, ..]).to_owned(),
                    basis: Some(bases.len()),
                    bias: mlp.layers()[m].bias().cloned(),
                });
            }
            bases.push(basis);
            ranks.push(k);
        }
        let matrices = lefts
            .into_iter()
            .map(|m| m.ok_or_else(|| FipsError::Numerical("a matrix was not factorised".into())))
            .collect::<Result<Vec<_>>>()?;
        let group = LowRankGroup::new(kind, first.activation(), (d, i), bases, matrices)?;
        let run = Run {
            method: Method::BasisSharing,
            spec,
            start,
            steps: 0,
            loss_curve: Vec::new(),
            details: MethodDetails::BasisSharing(BasisSharingDetails {
                shared_ranks: ranks,
                group_size: g,
            }),
        };
        MethodOutput::measured(run, blocks, CompressedBlocks::LowRank(group), calibration)
    }
}
