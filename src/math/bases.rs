//! Basis layouts: how the bases of a group's factorisation `W̃_j = U_j V_j` are arranged.
//!
//! The FiPS objective ([`objective`](super::objective)) trains `U` and `V = [V_1 | … | V_fn]` for
//! either layout:
//!
//! - [`BasisLayout::Shared`]: one basis `U` (`d × r`) for every matrix of the group (FiPS, §1 of
//!   `docs/design.md`);
//! - [`BasisLayout::PerMatrix`]: `U = [U_1 | … | U_fn]`, one `d × r` basis per matrix, so
//!   `W̃_j = U_j V_j` (a per-layer low-rank factorisation trained with the same loss).

use ndarray::{Array2, ArrayView2, Axis};

use crate::foundation::error::{FipsError, Result};
use crate::foundation::float::Float;
use crate::math::budget::GroupShape;
use crate::math::init::{InitMethod, shared_init};

/// How the bases of a group are arranged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BasisLayout {
    /// One basis shared by every matrix.
    #[default]
    Shared,
    /// One basis per matrix.
    PerMatrix,
}

impl BasisLayout {
    /// The shape a parameter budget applies to: the whole group, or (per-matrix bases) each
    /// matrix alone (`n = f = 1`).
    pub fn budget_shape(self, shape: GroupShape) -> GroupShape {
        match self {
            Self::Shared => shape,
            Self::PerMatrix => GroupShape {
                blocks: 1,
                matrices_per_block: 1,
                ..shape
            },
        }
    }

    /// The initial `(U, V)` of rank `rank` (per basis) for the oriented matrices `W̃_j`:
    /// [`shared_init`] of all of them, or of each alone, concatenated along columns.
    pub fn init<F: Float>(
        self,
        oriented: &[ArrayView2<'_, F>],
        rank: usize,
        tau: f64,
        method: InitMethod,
    ) -> Result<(Array2<F>, Array2<F>)> {
        match self {
            Self::Shared => {
                let init = shared_init(oriented, rank, tau, method)?;
                Ok((init.basis, init.factors))
            }
            Self::PerMatrix => {
                let inits = oriented
                    .iter()
                    .map(|w| shared_init(std::slice::from_ref(w), rank, tau, method))
                    .collect::<Result<Vec<_>>>()?;
                let us: Vec<_> = inits.iter().map(|i| i.basis.view()).collect();
                let vs: Vec<_> = inits.iter().map(|i| i.factors.view()).collect();
                // Concatenating along columns yields a column-major array: the objective needs
                // row-major.
                let cat = |parts: &[ArrayView2<'_, F>]| {
                    ndarray::concatenate(Axis(1), parts)
                        .map(|a| a.as_standard_layout().into_owned())
                        .map_err(|e| FipsError::Numerical(e.to_string()))
                };
                Ok((cat(&us)?, cat(&vs)?))
            }
        }
    }
}
