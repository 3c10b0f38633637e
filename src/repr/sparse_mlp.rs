//! Inference straight from the compressed form: MLP blocks evaluated from the shared basis `U` and
//! the compact sparse factors, never materialising a dense `V_j` or `W_j`.
//!
//! A group of `n` blocks holds `U` (`d × r`, row-major) and one sparse matrix `S_j` per weight,
//! stored in the orientation in which its product reads it row by row:
//!
//! ```text
//! up projection   (fc1, gate, up):  W_j = (U V_j)ᵀ = S_j Uᵀ   with S_j = V_jᵀ  (I × r)
//! down projection (fc2, down):      W_j =  U V_j   = U S_j    with S_j = V_j   (r × I)
//! ```
//!
//! so that for inputs `x` (`T × d`), with every intermediate kept **token-minor** (`[rows, T]`):
//!
//! ```text
//! Zᵀ = Uᵀ xᵀ                 (r × T)   BLAS sgemm / sgemv; 16 or 32 tokens: basis_product
//! Hᵀ_j = S_j Zᵀ + b_j        (I × T)   sparse: Hᵀ[i, :] = Σ_{k ∈ row i of S_j} S_j[i, k] Zᵀ[k, :]
//! Aᵀ = act(Hᵀ_fc1)  or  act(Hᵀ_gate) ⊙ Hᵀ_up
//! Cᵀ = S_down Aᵀ             (r × T)   sparse, same kernel
//! y  = C Uᵀ + b_down         (T × d)   BLAS
//! ```
//!
//! The sparse products do `nnz · T` multiply-adds. Bitmask-encoded factors are held in the
//! blocked column-major layout of [`crate::repr::sparse_blocked`] (same bits and values, another order):
//! a block of 128 output rows keeps its accumulators for 32 (or 16) tokens in the first-level
//! cache while the inputs stream by column. Row-gap and full factors keep the row-major form and a
//! kernel that decodes a batch of rows and accumulates 16-token tiles in registers. Output rows are
//! split into contiguous ranges of equal `nnz` over at most the configured number of threads (each
//! range its own slice of the output, so the result does not depend on the thread count). The
//! loops are compiled for the processor's vector extensions chosen at run time (`pulp`). `bf16`
//! values are widened per entry, `f16` a block at a time; all accumulation is in `f32`. With
//! `f16`/`bf16` storage the basis is widened in panels multiplied by BLAS (one `bf16` token:
//! streamed and widened on the fly). See `docs/inference.md`.

use std::ops::Range;

use ndarray::{
    Array2, ArrayView1, ArrayView2, ArrayViewMut2, Axis, Slice, linalg::general_mat_mul,
    linalg::general_mat_vec_mul,
};

use crate::foundation::activation::Activation;
use crate::foundation::error::{FipsError, Result};
use crate::foundation::kernels::RowSplit;
use crate::foundation::mlp::{MatrixRole, MlpKind};
use crate::repr::basis_product::{BasisSide, basis_times, basis_times_pays};
use crate::repr::compact::{CompactMatrix, PatternEncoding, StorageDtype, StorageFloat};
use crate::repr::factors::{SharedBasis, SparseFactor};
use crate::repr::shared_basis::CompressedGroup;
use crate::repr::sparse_blocked::{
    BLOCK_ROWS, BlockedMatrix, KernelChoice, TILE_TOKENS, blocked_rows, many_tokens,
    many_tokens_pay, tile_major, tile_major_len,
};
#[cfg(target_arch = "x86_64")]
use crate::repr::sparse_blocked::{
    column_walk_v4, column_walk_v4_pays, one_token_v3, one_token_v4, slabs_pay, slabs_v4,
};
use crate::repr::sparse_tiled::{TiledMatrix, tiled_rows, window_major};

/// Below this many multiply-adds per thread a sparse product stays on one thread (a scoped
/// thread costs tens of µs to start: DeiT-tiny at 16 tokens, 1 M multiply-adds, ran slower on
/// two threads than on one). Small in tests, so that they cross threads.
const MIN_WORK_PER_THREAD: usize = if cfg!(test) { 1 << 17 } else { 1 << 21 };
/// Kept entries decoded at a time by the several-token kernel (indices and values: 4 MiB).
const BLOCK_ENTRIES: usize = if cfg!(test) { 1000 } else { 1 << 19 };
/// Elements of `f32` scratch per panel when widening a half-precision basis.
const PANEL_ELEMENTS: usize = 1 << 20;

/// A compressed group in compact form, ready for inference: `U` and the sparse `S_j` stored in
/// `S` (`f32`, `f16` or `bf16`), biases in `S`.
#[derive(Debug, Clone, PartialEq)]
pub struct CompactGroup<S> {
    kind: MlpKind,
    activation: Activation,
    width: usize,
    rank: usize,
    intermediate: usize,
    basis: Vec<S>,
    factors: Vec<Factor<S>>,
    biases: Vec<Option<Vec<S>>>,
    threads: usize,
    kernel: KernelChoice,
}

/// A factor in the layout inference reads: bitmask-encoded factors in the blocked column-major
/// layout ([`crate::repr::sparse_blocked`]), the others (row gaps, full) as they are.
#[derive(Debug, Clone, PartialEq)]
enum Factor<S> {
    Rows(CompactMatrix<S>),
    Blocked(BlockedMatrix<S>, usize),
    Tiled(TiledMatrix<S>, usize),
}

impl<S: StorageFloat> Factor<S> {
    fn new(m: CompactMatrix<S>) -> Self {
        if m.pattern().encoding() == PatternEncoding::Bitmask {
            if let Some(t) = TiledMatrix::from_compact(&m) {
                return Self::Tiled(t, m.stored_bytes());
            }
            Self::Blocked(BlockedMatrix::from_compact(&m), m.stored_bytes())
        } else {
            Self::Rows(m)
        }
    }

    fn compact(&self) -> Result<std::borrow::Cow<'_, CompactMatrix<S>>> {
        Ok(match self {
            Self::Rows(m) => std::borrow::Cow::Borrowed(m),
            Self::Blocked(b, _) => std::borrow::Cow::Owned(b.to_compact()?),
            Self::Tiled(t, _) => std::borrow::Cow::Owned(t.to_compact()?),
        })
    }

    fn nnz(&self) -> usize {
        match self {
            Self::Rows(m) => m.nnz(),
            Self::Blocked(b, _) => b.block_nnz(0..b.blocks()),
            Self::Tiled(t, _) => t.nnz(),
        }
    }

    /// Bytes of the compact (file) form.
    fn stored_bytes(&self) -> usize {
        match self {
            Self::Rows(m) => m.stored_bytes(),
            Self::Blocked(_, bytes) | Self::Tiled(_, bytes) => *bytes,
        }
    }
}

fn shape_error(what: impl Into<String>, expected: Vec<usize>, got: Vec<usize>) -> FipsError {
    FipsError::ShapeMismatch {
        what: what.into(),
        expected,
        got,
    }
}

impl<S: StorageFloat> CompactGroup<S> {
    /// Assembles a group, checking every shape: `basis` holds `d × r` values row-major; factor
    /// `j` is `I × r` for up projections and `r × I` for down projections (`I` from factor 0);
    /// biases are `I` (up) or `d` (down) long; everything finite.
    pub fn new(
        kind: MlpKind,
        activation: Activation,
        (width, rank): (usize, usize),
        basis: Vec<S>,
        factors: Vec<CompactMatrix<S>>,
        biases: Vec<Option<Vec<S>>>,
    ) -> Result<Self> {
        let f = kind.matrices_per_block();
        if width == 0 || rank == 0 || width.checked_mul(rank) != Some(basis.len()) {
            return Err(shape_error(
                "compact shared basis",
                vec![width, rank],
                vec![basis.len()],
            ));
        }
        if let Some(k) = basis.iter().position(|v| !v.is_finite_value()) {
            return Err(FipsError::NonFinite {
                what: "compact shared basis".into(),
                index: vec![k / rank, k % rank],
            });
        }
        if factors.is_empty() || !factors.len().is_multiple_of(f) {
            return Err(shape_error(
                format!("number of factors of a {kind} group (a positive multiple of {f})"),
                vec![f * (factors.len() / f).max(1)],
                vec![factors.len()],
            ));
        }
        if biases.len() != factors.len() {
            return Err(shape_error(
                "number of bias slots (one per factor)",
                vec![factors.len()],
                vec![biases.len()],
            ));
        }
        let intermediate = factors[0].rows();
        let roles = kind.matrix_roles();
        for (j, m) in factors.iter().enumerate() {
            let expected = match roles[j % f] {
                MatrixRole::Up => [intermediate, rank],
                MatrixRole::Down => [rank, intermediate],
            };
            if [m.rows(), m.cols()] != expected {
                return Err(shape_error(
                    format!("compact factor {j}"),
                    expected.to_vec(),
                    vec![m.rows(), m.cols()],
                ));
            }
        }
        for (j, b) in biases.iter().enumerate() {
            if let Some(b) = b {
                let expected = match roles[j % f] {
                    MatrixRole::Up => intermediate,
                    MatrixRole::Down => width,
                };
                if b.len() != expected {
                    return Err(shape_error(
                        format!("bias {j}"),
                        vec![expected],
                        vec![b.len()],
                    ));
                }
                if let Some(k) = b.iter().position(|v| !v.is_finite_value()) {
                    return Err(FipsError::NonFinite {
                        what: format!("bias {j}"),
                        index: vec![k],
                    });
                }
            }
        }
        Ok(Self {
            kind,
            activation,
            width,
            rank,
            intermediate,
            basis,
            factors: factors.into_iter().map(Factor::new).collect(),
            biases,
            threads: crate::foundation::thread_plan::available_threads(),
            kernel: KernelChoice::Auto,
        })
    }

    /// The compact form of a trained group, values rounded to `S` (exact for `f32`).
    pub fn from_group(group: &CompressedGroup<f32>) -> Result<Self> {
        let basis = group
            .basis()
            .view()
            .iter()
            .map(|&v| S::from_f32(v))
            .collect();
        let roles = group.kind().matrix_roles();
        let f = roles.len();
        let factors = group
            .factors()
            .iter()
            .enumerate()
            .map(|(j, v)| match roles[j % f] {
                MatrixRole::Up => CompactMatrix::from_dense(v.values().t(), v.mask().t()),
                MatrixRole::Down => CompactMatrix::from_dense(v.values(), v.mask()),
            })
            .collect::<Result<Vec<_>>>()?;
        let biases = group
            .biases()
            .iter()
            .map(|b| {
                b.as_ref()
                    .map(|b| b.iter().map(|&v| S::from_f32(v)).collect())
            })
            .collect();
        Self::new(
            group.kind(),
            group.activation(),
            (group.width(), group.rank()),
            basis,
            factors,
            biases,
        )
    }

    /// Uses at most `threads` threads (at least 1) in the sparse products.
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Runs one-token products with `kernel` instead of the best available (tests and
    /// benchmarks: the AVX2 or generic kernel on a processor with AVX-512).
    #[doc(hidden)]
    pub fn with_kernel(mut self, kernel: KernelChoice) -> Self {
        self.kernel = kernel;
        self
    }

    /// Standard or gated.
    pub fn kind(&self) -> MlpKind {
        self.kind
    }

    /// The activation.
    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// Model width d.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Rank r.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// MLP width I.
    pub fn intermediate(&self) -> usize {
        self.intermediate
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.factors.len() / self.kind.matrices_per_block()
    }

    /// The basis values, `d × r` row-major.
    pub fn basis(&self) -> &[S] {
        &self.basis
    }

    /// Sparse factor `j` (module order: `Vᵀ` for up projections, `V` for down projections) in
    /// compact form; bitmask-encoded factors are held in the blocked inference layout and
    /// converted back (exactly) here.
    pub fn compact_factor(&self, j: usize) -> Result<std::borrow::Cow<'_, CompactMatrix<S>>> {
        self.factors
            .get(j)
            .ok_or(FipsError::IndexOutOfRange {
                what: "factor",
                index: j,
                len: self.factors.len(),
            })?
            .compact()
    }

    /// The pattern encoding factor `j` has in compact form (what [`CompactGroup::compact_factor`]
    /// returns).
    pub fn factor_encoding(&self, j: usize) -> Option<PatternEncoding> {
        let (rows, cols, nnz) = self.factor_shape(j)?;
        Some(match &self.factors[j] {
            Factor::Rows(m) => m.pattern().encoding(),
            Factor::Blocked(..) | Factor::Tiled(..) => PatternEncoding::smallest(rows, cols, nnz),
        })
    }

    /// Number of sparse factors held in the tiled layout ([`crate::repr::sparse_tiled`]): those
    /// whose kept entries form whole 2×2 tiles (FiPS trained with [`crate::MaskTiles::Square2`]).
    pub fn tiled_factor_count(&self) -> usize {
        self.factors
            .iter()
            .filter(|f| matches!(f, Factor::Tiled(..)))
            .count()
    }

    /// Number of sparse factors.
    pub fn factor_count(&self) -> usize {
        self.factors.len()
    }

    /// `(rows, cols, nnz)` of factor `j`.
    pub fn factor_shape(&self, j: usize) -> Option<(usize, usize, usize)> {
        let f = self.kind.matrices_per_block();
        let (i, r) = (self.intermediate, self.rank);
        self.factors.get(j).map(|m| {
            let (rows, cols) = match self.kind.matrix_roles()[j % f] {
                MatrixRole::Up => (i, r),
                MatrixRole::Down => (r, i),
            };
            (rows, cols, m.nnz())
        })
    }

    /// The bias slots in module order.
    pub fn biases(&self) -> &[Option<Vec<S>>] {
        &self.biases
    }

    /// Total kept entries of the factors.
    pub fn nnz(&self) -> usize {
        self.factors.iter().map(Factor::nnz).sum()
    }

    /// Bytes of the stored form: basis, values, patterns and biases.
    pub fn stored_bytes(&self) -> usize {
        let size = S::DTYPE.size();
        self.basis.len() * size
            + self.factors.iter().map(Factor::stored_bytes).sum::<usize>()
            + self
                .biases
                .iter()
                .flatten()
                .map(|b| b.len() * size)
                .sum::<usize>()
    }

    /// Bytes one block's forward pass reads: the basis twice (`Uᵀ x` and `C Uᵀ`), the block's
    /// factors (values and patterns) and biases.
    pub fn block_bytes_read(&self) -> usize {
        let f = self.kind.matrices_per_block();
        let size = S::DTYPE.size();
        2 * self.basis.len() * size
            + self.factors[..f]
                .iter()
                .map(Factor::stored_bytes)
                .sum::<usize>()
            + self.biases[..f]
                .iter()
                .flatten()
                .map(|b| b.len() * size)
                .sum::<usize>()
    }

    fn index(&self, block: usize, matrix: usize) -> Result<usize> {
        let f = self.kind.matrices_per_block();
        if block >= self.blocks() {
            return Err(FipsError::IndexOutOfRange {
                what: "block",
                index: block,
                len: self.blocks(),
            });
        }
        if matrix >= f {
            return Err(FipsError::IndexOutOfRange {
                what: "matrix",
                index: matrix,
                len: f,
            });
        }
        Ok(block * f + matrix)
    }

    fn basis_f32(&self) -> Array2<f32> {
        Array2::from_shape_fn((self.width, self.rank), |(i, k)| {
            self.basis[i * self.rank + k].to_f32()
        })
    }

    /// `V_j` (`r × I`) of factor `j` as a dense `f32` array (exact).
    fn factor_dense(&self, j: usize) -> Result<Array2<f32>> {
        let m = self.compact_factor(j)?.to_dense();
        Ok(
            match self.kind.matrix_roles()[j % self.kind.matrices_per_block()] {
                MatrixRole::Up => m.reversed_axes().as_standard_layout().into_owned(),
                MatrixRole::Down => m,
            },
        )
    }

    /// The group with every value widened to `f32` (exact), in the training representation.
    pub fn to_group(&self) -> Result<CompressedGroup<f32>> {
        let roles = self.kind.matrix_roles();
        let f = roles.len();
        let factors = (0..self.factors.len())
            .map(|j| {
                let mask = self.compact_factor(j)?.pattern().to_mask();
                let mask = match roles[j % f] {
                    MatrixRole::Up => mask.reversed_axes().as_standard_layout().into_owned(),
                    MatrixRole::Down => mask,
                };
                SparseFactor::new(self.factor_dense(j)?, mask)
            })
            .collect::<Result<Vec<_>>>()?;
        let biases = self
            .biases
            .iter()
            .map(|b| b.as_ref().map(|b| b.iter().map(|v| v.to_f32()).collect()))
            .collect();
        CompressedGroup::new(
            self.kind,
            self.activation,
            SharedBasis::new(self.basis_f32())?,
            factors,
            biases,
        )
    }

    /// The rebuilt dense weight of one matrix in its original layout (`[I, d]` for up
    /// projections, `[d, I]` for down projections), computed as [`CompressedGroup::dense_weight`]
    /// does (bit-identical to it on [`CompactGroup::to_group`]).
    pub fn dense_weight(&self, block: usize, matrix: usize) -> Result<Array2<f32>> {
        let j = self.index(block, matrix)?;
        let w = self.basis_f32().dot(&self.factor_dense(j)?);
        Ok(match self.kind.matrix_roles()[matrix] {
            MatrixRole::Up => w.reversed_axes().as_standard_layout().into_owned(),
            MatrixRole::Down => w,
        })
    }

    /// The bias of one matrix widened to `f32`, if it has one.
    pub fn dense_bias(&self, block: usize, matrix: usize) -> Result<Option<Vec<f32>>> {
        let j = self.index(block, matrix)?;
        Ok(self.biases[j]
            .as_ref()
            .map(|b| b.iter().map(|v| v.to_f32()).collect()))
    }

    /// Block `block`'s output for inputs `x` (`[tokens, d]`), from the compact form. Allocates
    /// its scratch; [`CompactGroup::forward_with`] reuses it across calls.
    pub fn forward(&self, block: usize, x: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        self.forward_with(block, x, &mut ForwardBuffers::default())
    }

    /// [`CompactGroup::forward`] with its token-minor scratch (`(2r + f I + max(r, I)) T'`
    /// floats, `T'` the tokens rounded up to 16) kept in `buffers`, which grow to the largest
    /// call and are reused: allocating and first touching a fresh megabyte-sized scratch per
    /// call (page faults, zeroing) cost DeiT-tiny at 197 tokens about 0.4 of the dense block's
    /// time.
    pub fn forward_with(
        &self,
        block: usize,
        x: ArrayView2<'_, f32>,
        buffers: &mut ForwardBuffers,
    ) -> Result<Array2<f32>> {
        self.index(block, 0)?;
        let (d, r, i) = (self.width, self.rank, self.intermediate);
        if x.ncols() != d {
            return Err(shape_error(
                "MLP input",
                vec![x.nrows(), d],
                x.shape().to_vec(),
            ));
        }
        let t = x.nrows();
        if t == 0 {
            return Ok(Array2::zeros((0, d)));
        }
        // Token-minor buffers; more than one token is padded to a multiple of 16 (padding
        // columns are zero inputs, computed and ignored; token columns never mix).
        let tp = if t == 1 { 1 } else { t.next_multiple_of(16) };
        let f = self.kind.matrices_per_block();
        let base = block * f;
        let ForwardBuffers {
            basis_inputs,
            gate,
            up,
            down,
            inputs,
            panel,
            basis_rows,
        } = buffers;

        // 16 or 32 tokens: `U` read in place, in its storage type, without BLAS's packing.
        let direct = basis_times_pays(tp);
        let zt = sized(basis_inputs, r * tp);
        if direct {
            let xt = &mut sized(panel, d * tp)[..d * tp];
            xt.fill(0.0);
            for (l, token) in x.rows().into_iter().enumerate() {
                for (v, &xv) in xt[l..].iter_mut().step_by(tp).zip(token) {
                    *v = xv;
                }
            }
            basis_times(
                &self.basis,
                (d, r),
                BasisSide::Transposed,
                xt,
                tp,
                zt,
                basis_rows,
            );
        } else {
            let mut view = ArrayViewMut2::from_shape((r, tp), &mut zt[..])
                .map_err(|e| FipsError::Numerical(format!("token-minor buffer: {e}")))?;
            view.slice_axis_mut(Axis(1), Slice::from(t..)).fill(0.0);
            self.basis_t_times(x, view.slice_axis_mut(Axis(1), Slice::from(..t)), panel);
        }
        let zt = &zt[..];
        let mut up_product = |j: usize, h: &mut Vec<f32>| {
            let h = sized(h, i * tp);
            let bias = self.biases[j].as_deref();
            self.product(j, zt, tp, h, bias, inputs);
        };
        let split = RowSplit::new(self.threads);
        let act = self.activation;
        match self.kind {
            MlpKind::Standard => {
                up_product(base, gate);
                split.activate_values(act, sized(gate, i * tp), tp);
            }
            MlpKind::Gated => {
                up_product(base, gate);
                up_product(base + 1, up);
                split.activate_gated_values(act, sized(gate, i * tp), sized(up, i * tp), tp);
            }
        }
        let jd = base + f - 1;
        let ct = sized(down, r * tp);
        self.product(jd, sized(gate, i * tp), tp, ct, None, inputs);
        let mut y = Array2::<f32>::zeros((t, d));
        if direct {
            let yt = sized(panel, d * tp);
            basis_times(
                &self.basis,
                (d, r),
                BasisSide::AsStored,
                ct,
                tp,
                yt,
                basis_rows,
            );
            for (l, mut token) in y.rows_mut().into_iter().enumerate() {
                for (y, &v) in token.iter_mut().zip(yt[l..].iter().step_by(tp)) {
                    *y = v;
                }
            }
        } else {
            let ct = ArrayView2::from_shape((r, tp), &ct[..])
                .map_err(|e| FipsError::Numerical(format!("token-minor buffer: {e}")))?;
            self.times_basis_t(
                ct.slice_axis(Axis(1), Slice::from(..t)),
                y.view_mut(),
                panel,
            );
        }
        if let Some(b) = &self.biases[jd] {
            for mut row in y.rows_mut() {
                for (y, b) in row.iter_mut().zip(b) {
                    *y += b.to_f32();
                }
            }
        }
        Ok(y)
    }

    fn plan(&self) -> KernelPlan {
        KernelPlan {
            threads: self.threads,
            kernel: self.kernel,
        }
    }

    /// `out = S_j x (+ bias)` in the best layout available.
    fn product(
        &self,
        j: usize,
        x: &[f32],
        tp: usize,
        out: &mut [f32],
        bias: Option<&[S]>,
        inputs: &mut Vec<f32>,
    ) {
        let plan = self.plan();
        match &self.factors[j] {
            Factor::Blocked(b, _) => split_product(b, x, tp, out, bias, plan, inputs),
            Factor::Tiled(m, _) => split_product(m, x, tp, out, bias, plan, inputs),
            Factor::Rows(m) => split_product(m, x, tp, out, bias, plan, inputs),
        }
    }

    /// `out = Uᵀ xᵀ` (`r × T`, any strides).
    fn basis_t_times(
        &self,
        x: ArrayView2<'_, f32>,
        mut out: ArrayViewMut2<'_, f32>,
        panel: &mut Vec<f32>,
    ) {
        let (d, r) = (self.width, self.rank);
        let single = x.nrows() == 1;
        let mut product = |u: ArrayView2<'_, f32>, x: ArrayView2<'_, f32>, beta: f32| {
            if single {
                general_mat_vec_mul(1.0, &u.t(), &x.row(0), beta, &mut out.column_mut(0));
            } else {
                general_mat_mul(1.0, &u.t(), &x.t(), beta, &mut out);
            }
        };
        match S::as_f32_slice(&self.basis) {
            Some(u) => {
                if let Ok(u) = ArrayView2::from_shape((d, r), u) {
                    product(u, x, 0.0);
                }
            }
            None if single && S::DTYPE == StorageDtype::Bf16 => {
                let xs: Vec<f32> = x.row(0).to_vec();
                let mut z = vec![0.0f32; r];
                basis_t_vec(&self.basis, (d, r), &xs, &mut z, self.threads);
                for (o, z) in out.column_mut(0).iter_mut().zip(z) {
                    *o = z;
                }
            }
            None => {
                let rows = (PANEL_ELEMENTS / r).clamp(1, d);
                let panel = sized(panel, rows * r);
                for p0 in (0..d).step_by(rows) {
                    let p1 = (p0 + rows).min(d);
                    let n = (p1 - p0) * r;
                    widen_panel(&self.basis[p0 * r..p1 * r], &mut panel[..n]);
                    if let Ok(u) = ArrayView2::from_shape((p1 - p0, r), &panel[..n]) {
                        let beta = if p0 == 0 { 0.0 } else { 1.0 };
                        product(u, x.slice_axis(Axis(1), Slice::from(p0..p1)), beta);
                    }
                }
            }
        }
    }

    /// `y = C Uᵀ` for `ct = Cᵀ` (`r × T`).
    fn times_basis_t(
        &self,
        ct: ArrayView2<'_, f32>,
        mut y: ArrayViewMut2<'_, f32>,
        panel: &mut Vec<f32>,
    ) {
        let (d, r) = (self.width, self.rank);
        let single = ct.ncols() == 1;
        let product = |u: ArrayView2<'_, f32>, mut y: ArrayViewMut2<'_, f32>| {
            if single {
                let c: ArrayView1<'_, f32> = ct.column(0);
                general_mat_vec_mul(1.0, &u, &c, 0.0, &mut y.row_mut(0));
            } else {
                general_mat_mul(1.0, &ct.t(), &u.t(), 0.0, &mut y);
            }
        };
        match S::as_f32_slice(&self.basis) {
            Some(u) => {
                if let Ok(u) = ArrayView2::from_shape((d, r), u) {
                    product(u, y);
                }
            }
            None if single && S::DTYPE == StorageDtype::Bf16 => {
                let c: Vec<f32> = ct.column(0).to_vec();
                let mut out = vec![0.0f32; d];
                basis_vec(&self.basis, (d, r), &c, &mut out, self.threads);
                for (y, o) in y.row_mut(0).iter_mut().zip(out) {
                    *y = o;
                }
            }
            None => {
                let rows = (PANEL_ELEMENTS / r).clamp(1, d);
                let panel = sized(panel, rows * r);
                for p0 in (0..d).step_by(rows) {
                    let p1 = (p0 + rows).min(d);
                    let n = (p1 - p0) * r;
                    widen_panel(&self.basis[p0 * r..p1 * r], &mut panel[..n]);
                    if let Ok(u) = ArrayView2::from_shape((p1 - p0, r), &panel[..n]) {
                        product(u, y.slice_axis_mut(Axis(1), Slice::from(p0..p1)));
                    }
                }
            }
        }
    }
}

/// How a sparse product runs: at most `threads` threads, kernel `kernel`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KernelPlan {
    threads: usize,
    kernel: KernelChoice,
}

/// Reusable scratch of [`CompactGroup::forward_with`]: the token-minor intermediates of one
/// block (basis inputs `Uᵀxᵀ`, the up projections, the down projection's `Cᵀ`), the
/// rearranged inputs of a sparse product, a half-precision basis panel and (16 or 32 tokens) a
/// half-precision basis's rows widened a few at a time. Starts empty; each buffer grows to the
/// largest call it serves and keeps its size.
#[derive(Debug, Clone, Default)]
pub struct ForwardBuffers {
    basis_inputs: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
    inputs: Vec<f32>,
    panel: Vec<f32>,
    basis_rows: Vec<f32>,
}

impl ForwardBuffers {
    /// Floats held.
    pub fn len(&self) -> usize {
        [
            &self.basis_inputs,
            &self.gate,
            &self.up,
            &self.down,
            &self.inputs,
            &self.panel,
            &self.basis_rows,
        ]
        .iter()
        .map(|b| b.len())
        .sum()
    }

    /// Whether nothing is held yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `len` floats of `buf` (grown, never shrunk), with whatever values a previous call left (every
/// user overwrites or zeroes what it reads), starting on a 64-byte boundary: token-minor rows
/// are multiples of 16 floats, so no vector load or store of a row then splits a cache line
/// (large allocations start 16 bytes past one). Asked again for no more than it holds, the same
/// floats: callers take a filled buffer again with it.
fn sized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    let need = len + 16;
    if buf.len() < need {
        buf.resize(need, 0.0);
    }
    let skip = buf.as_ptr().align_offset(64).min(16);
    &mut buf[skip..skip + len]
}

/// `dst = src` widened to `f32`, compiled for the vector extensions `pulp` detects (baseline
/// code converts four values per instruction at best).
fn widen_panel<S: StorageFloat>(src: &[S], dst: &mut [f32]) {
    pulp::Arch::new().dispatch(|| S::widen(src, dst));
}

/// A sparse layout whose products split over threads by contiguous units of output rows (rows,
/// 128-row blocks, row pairs), each part writing its own rows.
trait SplitProduct<S: StorageFloat>: Sync {
    /// Units of output rows.
    fn units(&self) -> usize;
    /// Output rows of units `0..k`.
    fn rows_before(&self, k: usize) -> usize;
    /// Kept entries (multiply-adds per token) of units `0..k`, non-decreasing in `k`.
    fn nnz_before(&self, k: usize) -> usize;
    /// The inputs as the kernels read them: `x` itself, or a copy rearranged into `inputs`.
    fn arrange<'a>(&self, x: &'a [f32], tp: usize, inputs: &'a mut Vec<f32>) -> &'a [f32];
    /// `out = bias + m x` for the rows of `part.units`, with fused multiply-adds when `FUSED`
    /// (called inside `pulp`'s dispatch: plain ones only for the scalar fallback).
    fn product<const FUSED: bool>(&self, part: Part<'_, S>);
}

/// One thread's share of a sparse product.
struct Part<'a, S> {
    /// Inputs as [`SplitProduct::arrange`] gave them.
    x: &'a [f32],
    tp: usize,
    /// The rows of `units`, token-minor.
    out: &'a mut [f32],
    bias: Option<&'a [S]>,
    units: Range<usize>,
    kernel: KernelChoice,
}

/// `out[i, :] = bias[i] + Σ_k m[i, k] x[k, :]` for token-minor `x` (`cols × tp`) and `out`
/// (`rows × tp`), `tp` = 1 or a multiple of 16: units split over at most `plan.threads` threads
/// (parts of equal kept entries, none below [`MIN_WORK_PER_THREAD`] multiply-adds), each part
/// compiled for the vector extensions `pulp` detects. The bits do not depend on the split.
fn split_product<S: StorageFloat, L: SplitProduct<S>>(
    m: &L,
    x: &[f32],
    tp: usize,
    out: &mut [f32],
    bias: Option<&[S]>,
    plan: KernelPlan,
    inputs: &mut Vec<f32>,
) {
    let units = m.units();
    let nnz = m.nnz_before(units);
    let work = nnz.saturating_mul(tp).max(m.rows_before(units) * tp);
    let parts = plan
        .threads
        .min(work / MIN_WORK_PER_THREAD)
        .clamp(1, units.max(1));
    let mut bounds = vec![0usize];
    for p in 1..parts {
        // The first unit at which the kept entries before it reach the part's share.
        let target = nnz / parts * p;
        let (mut lo, mut hi) = (*bounds.last().unwrap_or(&0), units);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if m.nnz_before(mid) < target {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        bounds.push(lo);
    }
    bounds.push(units);
    let mut chunks = Vec::with_capacity(parts);
    let mut rest = out;
    for w in bounds.windows(2) {
        let rows = m.rows_before(w[1]) - m.rows_before(w[0]);
        let (head, tail) = rest.split_at_mut(rows * tp);
        chunks.push((w[0]..w[1], head));
        rest = tail;
    }
    let x = m.arrange(x, tp, inputs);
    run_parts(chunks, |(units, out)| {
        pulp::Arch::new().dispatch(Dispatch {
            m,
            part: Part {
                x,
                tp,
                out,
                bias,
                units,
                kernel: plan.kernel,
            },
        });
    });
}

/// [`SplitProduct::product`] inside `pulp`'s dispatch.
struct Dispatch<'a, S, L> {
    m: &'a L,
    part: Part<'a, S>,
}

impl<S: StorageFloat, L: SplitProduct<S>> pulp::WithSimd for Dispatch<'_, S, L> {
    type Output = ();

    #[inline(always)]
    fn with_simd<V: pulp::Simd>(self, _simd: V) {
        // Fused multiply-adds wherever the dispatch found vector FMA; plain ones otherwise.
        if std::any::TypeId::of::<V>() == std::any::TypeId::of::<pulp::Scalar>() {
            self.m.product::<false>(self.part);
        } else {
            self.m.product::<true>(self.part);
        }
    }
}

impl<S: StorageFloat> SplitProduct<S> for CompactMatrix<S> {
    fn units(&self) -> usize {
        self.rows()
    }

    fn rows_before(&self, k: usize) -> usize {
        k
    }

    fn nnz_before(&self, k: usize) -> usize {
        self.pattern().offsets()[k]
    }

    fn arrange<'a>(&self, x: &'a [f32], _tp: usize, _inputs: &'a mut Vec<f32>) -> &'a [f32] {
        x
    }

    #[inline(always)]
    fn product<const FUSED: bool>(&self, part: Part<'_, S>) {
        rows_kernel::<S, FUSED>(self, part);
    }
}

/// Runs `work` on every part: the first on the calling thread, the others on scoped threads.
fn run_parts<T: Send>(parts: Vec<T>, work: impl Fn(T) + Sync) {
    let mut parts = parts.into_iter();
    let Some(first) = parts.next() else {
        return;
    };
    if parts.len() == 0 {
        work(first);
        return;
    }
    let work = &work;
    std::thread::scope(|scope| {
        for part in parts {
            scope.spawn(move || work(part));
        }
        work(first);
    });
}

/// Splits `0..len` into at most `parts` contiguous ranges of whole multiples of 16.
fn split_ranges(len: usize, parts: usize) -> Vec<Range<usize>> {
    let step = len.div_ceil(parts.max(1)).next_multiple_of(16).max(16);
    (0..len)
        .step_by(step)
        .map(|a| a..(a + step).min(len))
        .collect()
}

/// `z = Uᵀ x` for a half-precision `U` (`d × r`, row-major) and one token: every row of `U`
/// streamed once, widened on the fly; columns of `z` split over threads.
fn basis_t_vec<S: StorageFloat>(
    u: &[S],
    (d, r): (usize, usize),
    x: &[f32],
    z: &mut [f32],
    threads: usize,
) {
    let parts = threads.min(d * r / MIN_WORK_PER_THREAD).max(1);
    let ranges = split_ranges(r, parts);
    let mut chunks = Vec::with_capacity(ranges.len());
    let mut rest = z;
    for range in ranges {
        let (head, tail) = rest.split_at_mut(range.len());
        chunks.push((range, head));
        rest = tail;
    }
    let run = |(range, z): (Range<usize>, &mut [f32])| {
        pulp::Arch::new().dispatch(AxpyRows {
            u,
            r,
            rows: d,
            x,
            z,
            cols: range,
        })
    };
    run_parts(chunks, run);
}

struct AxpyRows<'a, S> {
    u: &'a [S],
    r: usize,
    rows: usize,
    x: &'a [f32],
    z: &'a mut [f32],
    cols: Range<usize>,
}

impl<S: StorageFloat> pulp::WithSimd for AxpyRows<'_, S> {
    type Output = ();

    #[inline(always)]
    fn with_simd<V: pulp::Simd>(self, _simd: V) {
        let AxpyRows {
            u,
            r,
            rows,
            x,
            z,
            cols,
        } = self;
        for (i, &xi) in x.iter().enumerate().take(rows) {
            let row = &u[i * r + cols.start..i * r + cols.end];
            for (zk, uk) in z.iter_mut().zip(row) {
                *zk += xi * uk.to_f32();
            }
        }
    }
}

/// `y = U c` for a half-precision `U` (`d × r`, row-major) and one token: rows split over
/// threads, each a dot product widened on the fly.
fn basis_vec<S: StorageFloat>(
    u: &[S],
    (d, r): (usize, usize),
    c: &[f32],
    y: &mut [f32],
    threads: usize,
) {
    let parts = threads.min(d * r / MIN_WORK_PER_THREAD).max(1);
    let ranges = split_ranges(d, parts);
    let mut chunks = Vec::with_capacity(ranges.len());
    let mut rest = y;
    for range in ranges {
        let (head, tail) = rest.split_at_mut(range.len());
        chunks.push((range, head));
        rest = tail;
    }
    let run = |(range, y): (Range<usize>, &mut [f32])| {
        pulp::Arch::new().dispatch(DotRows {
            u,
            r,
            c,
            y,
            rows: range,
        })
    };
    run_parts(chunks, run);
}

struct DotRows<'a, S> {
    u: &'a [S],
    r: usize,
    c: &'a [f32],
    y: &'a mut [f32],
    rows: Range<usize>,
}

impl<S: StorageFloat> pulp::WithSimd for DotRows<'_, S> {
    type Output = ();

    #[inline(always)]
    fn with_simd<V: pulp::Simd>(self, _simd: V) {
        let DotRows { u, r, c, y, rows } = self;
        for (yi, i) in y.iter_mut().zip(rows) {
            let row = &u[i * r..(i + 1) * r];
            let mut acc = [0.0f32; 16];
            let mut row16 = row.chunks_exact(16);
            let mut c16 = c.chunks_exact(16);
            for (a, b) in (&mut row16).zip(&mut c16) {
                for l in 0..16 {
                    acc[l] += a[l].to_f32() * b[l];
                }
            }
            let tail: f32 = row16
                .remainder()
                .iter()
                .zip(c16.remainder())
                .map(|(a, b)| a.to_f32() * b)
                .sum();
            *yi = acc.iter().sum::<f32>() + tail;
        }
    }
}

/// The blocked layout splits by 128-row blocks; one token takes the kernel `kernel` selects
/// (AVX-512, else AVX2 + FMA, else the generic walk).
impl<S: StorageFloat> SplitProduct<S> for BlockedMatrix<S> {
    fn units(&self) -> usize {
        self.blocks()
    }

    fn rows_before(&self, k: usize) -> usize {
        (k * BLOCK_ROWS).min(self.rows())
    }

    fn nnz_before(&self, k: usize) -> usize {
        self.block_nnz(0..k)
    }

    fn arrange<'a>(&self, x: &'a [f32], tp: usize, inputs: &'a mut Vec<f32>) -> &'a [f32] {
        if tp > TILE_TOKENS || many_tokens_pay(self.cols(), tp) {
            // On a 64-byte boundary (`sized`), so that no vector load of the register kernel
            // splits a cache line (also when one tile holds all the tokens).
            let tiles = sized(inputs, tile_major_len(self.cols(), tp));
            tile_major(x, self.cols(), tp, tiles);
            tiles
        } else {
            x
        }
    }

    #[inline(always)]
    fn product<const FUSED: bool>(&self, part: Part<'_, S>) {
        let Part {
            x,
            tp,
            out,
            bias,
            units,
            kernel,
        } = part;
        // One token: the expand kernels (accumulators in registers, no scatter); from 128
        // tokens on, the register kernel (rows' accumulators in registers). AVX-512 first.
        #[cfg(target_arch = "x86_64")]
        if FUSED
            && (tp == 1
                || many_tokens_pay(self.cols(), tp)
                || slabs_pay(self, tp)
                || column_walk_v4_pays(tp))
        {
            if kernel == KernelChoice::Auto
                && let Some(simd) = pulp::x86::V4::try_new()
            {
                simd.vectorize(VectorKernel {
                    simd,
                    m: self,
                    x,
                    tp,
                    out,
                    bias,
                    units,
                });
                return;
            }
            if kernel != KernelChoice::Generic
                && (tp == 1 || many_tokens_pay(self.cols(), tp))
                && let Some(simd) = pulp::x86::V3::try_new()
            {
                simd.vectorize(VectorKernel {
                    simd,
                    m: self,
                    x,
                    tp,
                    out,
                    bias,
                    units,
                });
                return;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = kernel;
        blocked_rows::<S, FUSED>(self, x, tp, out, bias, units);
    }
}

/// A vector kernel call (one token, or many with [`many_tokens`]) handed to `pulp`'s
/// `vectorize`. Its `call` is `#[inline(always)]`, so the kernel is compiled inside
/// `vectorize`'s target-feature function. (A closure there is not always inlined: compiled on
/// its own, without the features, every AVX2 intrinsic of the V3 kernel became a function call,
/// 35× slower.)
#[cfg(target_arch = "x86_64")]
struct VectorKernel<'a, S, Isa> {
    simd: Isa,
    m: &'a BlockedMatrix<S>,
    x: &'a [f32],
    tp: usize,
    out: &'a mut [f32],
    bias: Option<&'a [S]>,
    units: Range<usize>,
}

#[cfg(target_arch = "x86_64")]
impl<S: StorageFloat> pulp::NullaryFnOnce for VectorKernel<'_, S, pulp::x86::V4> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        let Self {
            simd,
            m,
            x,
            tp,
            out,
            bias,
            units,
        } = self;
        if tp == 1 {
            one_token_v4(simd, m, x, out, bias, units);
        } else if slabs_pay(m, tp) {
            slabs_v4(simd, m, x, tp, out, bias, units);
        } else if column_walk_v4_pays(tp) {
            column_walk_v4(simd, m, x, tp, out, bias, units);
        } else {
            many_tokens(simd, m, x, tp, out, bias, units);
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl<S: StorageFloat> pulp::NullaryFnOnce for VectorKernel<'_, S, pulp::x86::V3> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        let Self {
            simd,
            m,
            x,
            tp,
            out,
            bias,
            units,
        } = self;
        if tp == 1 {
            one_token_v3(simd, m, x, out, bias, units);
        } else {
            many_tokens(simd, m, x, tp, out, bias, units);
        }
    }
}

/// The tiled layout splits by row pairs.
impl<S: StorageFloat> SplitProduct<S> for TiledMatrix<S> {
    fn units(&self) -> usize {
        self.pairs()
    }

    fn rows_before(&self, k: usize) -> usize {
        (2 * k).min(self.rows())
    }

    fn nnz_before(&self, k: usize) -> usize {
        4 * self.pair_tiles(0..k)
    }

    fn arrange<'a>(&self, x: &'a [f32], tp: usize, inputs: &'a mut Vec<f32>) -> &'a [f32] {
        let windows = sized(inputs, self.cols().next_multiple_of(2) * tp);
        window_major(x, self.cols(), tp, windows);
        windows
    }

    #[inline(always)]
    fn product<const FUSED: bool>(&self, p: Part<'_, S>) {
        tiled_rows::<S, FUSED>(self, p.x, p.tp, p.out, p.bias, p.units, p.kernel);
    }
}

/// `a b + c`, fused when `FUSED`.
#[inline(always)]
fn madd<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FUSED { a.mul_add(b, c) } else { a * b + c }
}

#[inline(always)]
fn rows_kernel<S: StorageFloat, const FUSED: bool>(m: &CompactMatrix<S>, part: Part<'_, S>) {
    let Part {
        x,
        tp,
        out,
        bias,
        units: range,
        ..
    } = part;
    let start = range.start;
    let pattern = m.pattern();
    let mut columns: Vec<u32> = Vec::new();
    let mut widened: Vec<f32> = Vec::new();
    if tp == 1 {
        for i in range {
            let b = bias.map_or(0.0, |b| b[i].to_f32());
            let stored = m.row_values(i);
            let values: &[f32] = match S::as_f32_slice(stored) {
                Some(v) => v,
                None => {
                    widened.resize(stored.len(), 0.0);
                    S::widen(stored, &mut widened);
                    &widened
                }
            };
            // One token: walk the bits directly (decoding first costs as much as the product).
            out[i - start] = b + match pattern.bitmask_row(i) {
                Some(bits) => bitmask_dot::<FUSED>(bits, values, x),
                None => {
                    pattern.row_columns(i, &mut columns);
                    gather_dot::<FUSED>(&columns, values, x)
                }
            };
        }
        return;
    }
    // Several tokens: decode a block of rows once, then sweep it once per tile of 16 tokens, so
    // the tile's inputs (`cols` rows of 64 bytes) stay in the core's cache while the block's
    // indices and values come from the shared cache.
    let offsets = pattern.offsets();
    let mut row = range.start;
    let mut row_columns = Vec::new();
    while row < range.end {
        let first = offsets[row];
        let mut last_row = row + 1;
        while last_row < range.end && offsets[last_row + 1] - first <= BLOCK_ENTRIES {
            last_row += 1;
        }
        let block = row..last_row;
        let entries = offsets[last_row] - first;
        columns.resize(entries + 8, 0);
        for i in block.clone() {
            let (a, z) = (offsets[i] - first, offsets[i + 1] - first);
            match pattern.bitmask_row(i) {
                Some(bits) => fill_set_bits(bits, &mut columns[a..z + 8]),
                None => {
                    pattern.row_columns(i, &mut row_columns);
                    columns[a..z].copy_from_slice(&row_columns);
                }
            }
        }
        let stored = &m.values()[first..first + entries];
        let values: &[f32] = match S::as_f32_slice(stored) {
            Some(v) => v,
            None => {
                widened.resize(entries, 0.0);
                S::widen(stored, &mut widened);
                &widened
            }
        };
        for t in 0..tp / 16 {
            for i in block.clone() {
                let b = bias.map_or(0.0, |b| b[i].to_f32());
                let (a, z) = (offsets[i] - first, offsets[i + 1] - first);
                let o = &mut out[(i - start) * tp + t * 16..(i - start) * tp + t * 16 + 16];
                tile::<16, FUSED>(&columns[a..z], &values[a..z], x, tp, t * 16, o, b);
            }
        }
        row = last_row;
    }
}

/// For every byte value, the positions of its set bits (least significant first), padded with 0.
const BIT_POSITIONS: [[u8; 8]; 256] = {
    let mut table = [[0u8; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let mut n = 0;
        let mut bit = 0;
        while bit < 8 {
            if b & (1 << bit) != 0 {
                table[b][n] = bit as u8;
                n += 1;
            }
            bit += 1;
        }
        b += 1;
    }
    table
};

/// Writes the indices of the set bits of a bitmask row into `out`, increasing; `out` must have
/// room for the set bits plus 8 (a byte's 8 candidate slots are written before advancing by its
/// popcount). Branch-free: one table look-up and 8 stores per byte.
#[inline(always)]
fn fill_set_bits(row: &[u8], out: &mut [u32]) {
    let mut p = 0usize;
    for (k, &byte) in row.iter().enumerate() {
        let base = (k * 8) as u32;
        let positions = &BIT_POSITIONS[byte as usize];
        if let Some(slots) = out.get_mut(p..p + 8) {
            for (slot, &pos) in slots.iter_mut().zip(positions) {
                *slot = base + u32::from(pos);
            }
        }
        p += byte.count_ones() as usize;
    }
}

/// `Σ_p values[p] x[c_p]` over the set bits `c_p` of a bitmask row, in order.
#[inline(always)]
fn bitmask_dot<const FUSED: bool>(bits: &[u8], values: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 4];
    let mut p = 0usize;
    let mut words = bits.chunks_exact(8);
    let mut base = 0usize;
    let mut visit = |mut w: u64, base: usize| {
        while w != 0 {
            let c = base + w.trailing_zeros() as usize;
            w &= w - 1;
            acc[p & 3] = madd::<FUSED>(values[p], x[c], acc[p & 3]);
            p += 1;
        }
    };
    for chunk in &mut words {
        let w = u64::from_le_bytes([
            chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], chunk[5], chunk[6], chunk[7],
        ]);
        visit(w, base);
        base += 64;
    }
    let rem = words.remainder();
    if !rem.is_empty() {
        let mut word = [0u8; 8];
        word[..rem.len()].copy_from_slice(rem);
        visit(u64::from_le_bytes(word), base);
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// `Σ_p values[p] x[columns[p]]`.
#[inline(always)]
fn gather_dot<const FUSED: bool>(columns: &[u32], values: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 4];
    let n4 = columns.len() / 4 * 4;
    for (c, v) in columns[..n4]
        .chunks_exact(4)
        .zip(values[..n4].chunks_exact(4))
    {
        for l in 0..4 {
            acc[l] = madd::<FUSED>(v[l], x[c[l] as usize], acc[l]);
        }
    }
    for (c, v) in columns[n4..].iter().zip(&values[n4..]) {
        acc[0] = madd::<FUSED>(*v, x[*c as usize], acc[0]);
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// `out[l] = b + Σ_p values[p] x[columns[p] tp + t0 + l]` for `l < L`, four entries at a time
/// into independent accumulators.
#[inline(always)]
fn tile<const L: usize, const FUSED: bool>(
    columns: &[u32],
    values: &[f32],
    x: &[f32],
    tp: usize,
    t0: usize,
    out: &mut [f32],
    b: f32,
) {
    let mut a0 = [b; L];
    let mut a1 = [0.0f32; L];
    let mut a2 = [0.0f32; L];
    let mut a3 = [0.0f32; L];
    let row = |c: u32| -> &[f32] {
        let s = c as usize * tp + t0;
        &x[s..s + L]
    };
    let n4 = columns.len() / 4 * 4;
    for (c, v) in columns[..n4]
        .chunks_exact(4)
        .zip(values[..n4].chunks_exact(4))
    {
        let (x0, x1, x2, x3) = (row(c[0]), row(c[1]), row(c[2]), row(c[3]));
        for l in 0..L {
            a0[l] = madd::<FUSED>(v[0], x0[l], a0[l]);
            a1[l] = madd::<FUSED>(v[1], x1[l], a1[l]);
            a2[l] = madd::<FUSED>(v[2], x2[l], a2[l]);
            a3[l] = madd::<FUSED>(v[3], x3[l], a3[l]);
        }
    }
    for (&c, &v) in columns[n4..].iter().zip(&values[n4..]) {
        let x0 = row(c);
        for l in 0..L {
            a0[l] = madd::<FUSED>(v, x0[l], a0[l]);
        }
    }
    for (l, o) in out.iter_mut().enumerate().take(L) {
        *o = (a0[l] + a1[l]) + (a2[l] + a3[l]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repr::factors::{SharedBasis, SparseFactor};
    use ndarray::Array1;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn sized_buffers_start_on_a_cache_line_and_keep_their_place() {
        let mut buf = Vec::new();
        for len in [0usize, 1, 5, 16, 1000, 70_000, 3] {
            let s = sized(&mut buf, len);
            assert_eq!(s.len(), len);
            assert_eq!(s.as_ptr().align_offset(64), 0, "len {len}");
            s.fill(len as f32);
            // Asked again for no more, the same place: what a previous call left is there.
            let again = sized(&mut buf, len);
            assert!(again.iter().all(|&v| v == len as f32));
        }
    }

    /// A random group with masks of the given density (some rows and columns emptied).
    fn random_group(
        kind: MlpKind,
        act: Activation,
        (d, r, i, n): (usize, usize, usize, usize),
        density: f64,
        seed: u64,
    ) -> CompressedGroup<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut randn = |rows, cols, scale: f32| {
            Array2::from_shape_simple_fn((rows, cols), || scale * rng.random_range(-1.0f32..1.0))
        };
        let u = randn(d, r, 1.0 / (d as f32).sqrt());
        let f = kind.matrices_per_block();
        let mut rng2 = ChaCha8Rng::seed_from_u64(seed + 1);
        let factors: Vec<_> = (0..f * n)
            .map(|_| {
                let v = randn(r, i, 1.0);
                let mut mask = Array2::from_shape_simple_fn((r, i), || rng2.random_bool(density));
                if r > 2 && i > 2 {
                    mask.row_mut(1).fill(false);
                    mask.column_mut(2).fill(false);
                    mask.row_mut(0).fill(true);
                }
                SparseFactor::new(v, mask).unwrap()
            })
            .collect();
        let biases = (0..f * n)
            .map(|j| {
                let len = match kind.matrix_roles()[j % f] {
                    MatrixRole::Up => i,
                    MatrixRole::Down => d,
                };
                (j % 3 != 1).then(|| Array1::from_shape_fn(len, |k| (k as f32 * 0.37).sin()))
            })
            .collect();
        CompressedGroup::new(kind, act, SharedBasis::new(u).unwrap(), factors, biases).unwrap()
    }

    fn max_rel(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
        a.iter()
            .zip(b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    fn check_forward<S: StorageFloat>(g: &CompressedGroup<f32>, tol: f32) {
        let compact = CompactGroup::<S>::from_group(g).unwrap();
        // The reference is the dense rebuild of the stored (rounded) values.
        let reference = compact.to_group().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let kernels = [KernelChoice::Auto, KernelChoice::V3, KernelChoice::Generic];
        for (threads, kernel) in [1, 3].into_iter().flat_map(|n| kernels.map(|k| (n, k))) {
            let compact = compact.clone().with_threads(threads).with_kernel(kernel);
            for t in [1, 3, 17, 40, 70] {
                let x =
                    Array2::from_shape_simple_fn((t, g.width()), || rng.random_range(-1.0f32..1.0));
                for b in 0..g.blocks() {
                    let dense = reference.to_dense_mlp(b).unwrap();
                    let want = dense.forward(x.view()).unwrap();
                    let got = compact.forward(b, x.view()).unwrap();
                    let err = max_rel(&got, &want);
                    assert!(
                        err < tol,
                        "{:?} {} t={t} block {b} threads {threads} {kernel:?}: {err}",
                        S::DTYPE,
                        g.kind()
                    );
                }
            }
        }
    }

    #[test]
    fn forward_matches_the_dense_rebuild() {
        for (kind, act) in [
            (MlpKind::Standard, Activation::Gelu),
            (MlpKind::Gated, Activation::Silu),
            (MlpKind::Standard, Activation::Relu),
        ] {
            for (dims, density) in [
                ((24, 37, 50, 2), 0.25),
                ((16, 9, 70, 1), 0.03),
                ((8, 5, 12, 2), 1.0),
                ((1, 1, 1, 1), 1.0),
                ((12, 30, 140, 1), 0.6),
            ] {
                let g = random_group(kind, act, dims, density, 3);
                check_forward::<f32>(&g, 1e-5);
                check_forward::<half::bf16>(&g, 1e-5);
                check_forward::<half::f16>(&g, 1e-5);
            }
        }
    }

    #[test]
    fn forward_with_whole_tile_factors_uses_the_tiled_layout_and_matches() {
        for (kind, act) in [
            (MlpKind::Standard, Activation::Gelu),
            (MlpKind::Gated, Activation::Silu),
        ] {
            for (d, r, i, n) in [(24usize, 37usize, 50usize, 2usize), (16, 10, 71, 1)] {
                let mut rng = ChaCha8Rng::seed_from_u64(5);
                let u = Array2::from_shape_simple_fn((d, r), || rng.random_range(-0.2f32..0.2));
                let f = kind.matrices_per_block();
                let factors: Vec<_> = (0..f * n)
                    .map(|_| {
                        let keep =
                            Array2::from_shape_simple_fn((r.div_ceil(2), i.div_ceil(2)), || {
                                rng.random_bool(0.25)
                            });
                        let mask = Array2::from_shape_fn((r, i), |(a, b)| keep[[a / 2, b / 2]]);
                        let v =
                            Array2::from_shape_simple_fn((r, i), || rng.random_range(-1.0f32..1.0));
                        SparseFactor::new(v, mask).unwrap()
                    })
                    .collect();
                let biases = (0..f * n).map(|_| None).collect();
                let g =
                    CompressedGroup::new(kind, act, SharedBasis::new(u).unwrap(), factors, biases)
                        .unwrap();
                let compact = CompactGroup::<f32>::from_group(&g).unwrap();
                assert!(
                    compact
                        .factors
                        .iter()
                        .all(|f| matches!(f, Factor::Tiled(..))),
                    "whole 2×2 tiles take the tiled layout"
                );
                assert_eq!(compact.to_group().unwrap(), g, "exact round trip");
                let mut buffers = ForwardBuffers::default();
                for t in [200, 1, 33] {
                    let x = Array2::from_shape_simple_fn((t, d), || rng.random_range(-1.0f32..1.0));
                    assert_eq!(
                        compact.forward_with(0, x.view(), &mut buffers).unwrap(),
                        compact.forward(0, x.view()).unwrap()
                    );
                }
                check_forward::<f32>(&g, 1e-5);
                check_forward::<half::bf16>(&g, 1e-5);
            }
        }
    }

    /// A random `rows × cols` matrix keeping each entry with probability `density`, with an
    /// empty row (1), an empty column (2) and a full row (0) where the shape allows.
    fn random_sparse<S: StorageFloat>(
        rows: usize,
        cols: usize,
        density: f64,
        rng: &mut ChaCha8Rng,
    ) -> CompactMatrix<S> {
        let mut mask = Array2::from_shape_simple_fn((rows, cols), || rng.random_bool(density));
        if rows > 2 && cols > 2 {
            mask.row_mut(1).fill(false);
            mask.column_mut(2).fill(false);
            mask.row_mut(0).fill(true);
        }
        let values = Array2::from_shape_simple_fn((rows, cols), || rng.random_range(-1.0f32..1.0));
        CompactMatrix::<S>::from_dense(values.view(), mask.view()).unwrap()
    }

    /// Same bits everywhere (either sign of zero counting as the same).
    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(a, b)| a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0))
    }

    /// `split_product` on the blocked layout (every kernel: one token, 16- and 32-token tiles, threads) against the
    /// dense product in f64, on random patterns with an empty row, an empty column and a full row.
    fn check_products<S: StorageFloat>(rows: usize, cols: usize, density: f64, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let m = random_sparse::<S>(rows, cols, density, &mut rng);
        let dense = m.to_dense();
        let b = BlockedMatrix::from_compact(&m);
        let bias: Vec<S> = (0..rows)
            .map(|i| S::from_f32((i as f32 * 0.37).sin()))
            .collect();
        for t in [1usize, 15, 16, 17, 120, 197] {
            let tp = if t == 1 { 1 } else { t.next_multiple_of(16) };
            let x: Vec<f32> = (0..cols * tp)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let kernels = [KernelChoice::Auto, KernelChoice::V3, KernelChoice::Generic];
            for (threads, kernel) in [1, 3].into_iter().flat_map(|n| kernels.map(|k| (n, k))) {
                let mut out = vec![f32::NAN; rows * tp];
                split_product(
                    &b,
                    &x,
                    tp,
                    &mut out,
                    Some(&bias),
                    KernelPlan { threads, kernel },
                    &mut vec![f32::NAN; 7],
                );
                for i in 0..rows {
                    for l in 0..t {
                        let want = f64::from(bias[i].to_f32())
                            + (0..cols)
                                .map(|c| f64::from(dense[[i, c]]) * f64::from(x[c * tp + l]))
                                .sum::<f64>();
                        let got = f64::from(out[i * tp + l]);
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{:?} {rows}×{cols} density {density} t={t} threads {threads} \
                             {kernel:?} row {i} token {l}: {got} vs {want}",
                            S::DTYPE
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn blocked_products_match_the_dense_product() {
        for (rows, cols, density, seed) in [
            (1, 1, 1.0, 1),
            (3, 5, 0.5, 2),
            (130, 37, 0.25, 3),
            (257, 9, 0.0, 4),
            (200, 21, 0.9, 5),
        ] {
            check_products::<f32>(rows, cols, density, seed);
        }
        check_products::<f32>(300, 200, 0.25, 8);
        check_products::<half::bf16>(130, 37, 0.25, 6);
        check_products::<half::bf16>(300, 200, 0.25, 9);
        check_products::<half::f16>(130, 37, 0.25, 7);
    }

    /// The one-token kernels (AVX-512 expand, AVX2 permute, generic walk) add the same terms
    /// in the same order (bias, then each kept entry by increasing column, fused): bit-identical
    /// results, on shapes with ragged last blocks, several 64-column panels, empty rows and
    /// columns, a full row, an empty matrix, for every storage type.
    fn check_one_token_kernels<S: StorageFloat>(rows: usize, cols: usize, density: f64, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let m = random_sparse::<S>(rows, cols, density, &mut rng);
        let b = BlockedMatrix::from_compact(&m);
        let bias: Vec<S> = (0..rows).map(|i| S::from_f32((i as f32).cos())).collect();
        let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        for bias in [Some(&bias[..]), None] {
            let run = |kernel| {
                let mut out = vec![f32::NAN; rows];
                split_product(
                    &b,
                    &x,
                    1,
                    &mut out,
                    bias,
                    KernelPlan { threads: 1, kernel },
                    &mut Vec::new(),
                );
                out
            };
            let generic = run(KernelChoice::Generic);
            for kernel in [KernelChoice::Auto, KernelChoice::V3] {
                let got = run(kernel);
                let same = same_bits(&got, &generic);
                assert!(
                    same,
                    "{:?} {rows}×{cols} density {density} {kernel:?}: {got:?} vs {generic:?}",
                    S::DTYPE
                );
            }
        }
    }

    #[test]
    fn one_token_kernels_agree_exactly() {
        #[cfg(target_arch = "x86_64")]
        {
            let v4 = pulp::x86::V4::try_new().is_some();
            let v3 = pulp::x86::V3::try_new().is_some();
            if !v3 {
                eprintln!(
                    "one_token_kernels_agree_exactly: no AVX2 + FMA here, only the generic kernel runs"
                );
            } else if !v4 {
                eprintln!(
                    "one_token_kernels_agree_exactly: no AVX-512 here, Auto is the AVX2 kernel"
                );
            }
        }
        for (rows, cols, density, seed) in [
            (1, 1, 1.0, 1),
            (3, 5, 0.5, 2),
            (130, 37, 0.25, 3),
            (257, 9, 0.0, 4),
            (200, 21, 0.9, 5),
            (128, 64, 0.25, 6),
            (129, 65, 0.25, 7),
            (300, 200, 0.25, 8),
            (384, 130, 0.05, 9),
            // Last blocks of every chunk count from 1 to 8 (the AVX-512 kernel skips the
            // chunks past a block's last row).
            (144, 17, 0.4, 10),
            (176, 17, 0.4, 11),
            (192, 33, 0.4, 12),
            (208, 17, 0.4, 13),
            (240, 17, 0.4, 14),
            (255, 17, 0.4, 15),
        ] {
            check_one_token_kernels::<f32>(rows, cols, density, seed);
            check_one_token_kernels::<half::bf16>(rows, cols, density, seed);
            check_one_token_kernels::<half::f16>(rows, cols, density, seed);
        }
    }

    /// The many-token kernels (vector registers from 128 tokens on, AVX-512 or AVX2, and the
    /// generic column walk) add the same terms in the same order: bit-identical results on one
    /// and on three threads, for whole and ragged last tiles of tokens, several 128-column
    /// segments, ragged last blocks, empty rows and columns and a full row.
    fn check_many_token_kernels<S: StorageFloat>(
        rows: usize,
        cols: usize,
        density: f64,
        seed: u64,
    ) {
        check_vector_kernels::<S>(rows, cols, density, seed, &[128, 144, 208]);
    }

    /// The vector kernel for `tps` tokens (the register kernel from 128 tokens, the 16-token
    /// slabs for dense enough factors) against the generic column walk, bit for bit.
    fn check_vector_kernels<S: StorageFloat>(
        rows: usize,
        cols: usize,
        density: f64,
        seed: u64,
        tps: &[usize],
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let m = random_sparse::<S>(rows, cols, density, &mut rng);
        let b = BlockedMatrix::from_compact(&m);
        let bias: Vec<S> = (0..rows).map(|i| S::from_f32((i as f32).sin())).collect();
        for &tp in tps {
            assert!(
                crate::repr::sparse_blocked::many_tokens_pay(cols, tp)
                    || crate::repr::sparse_blocked::slabs_pay(&b, tp)
                    || column_walk_v4_pays(tp)
            );
            let x: Vec<f32> = (0..cols * tp)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            for bias in [Some(&bias[..]), None] {
                let run = |kernel, threads| {
                    let mut out = vec![f32::NAN; rows * tp];
                    split_product(
                        &b,
                        &x,
                        tp,
                        &mut out,
                        bias,
                        KernelPlan { threads, kernel },
                        &mut vec![f32::NAN; 5],
                    );
                    out
                };
                let generic = run(KernelChoice::Generic, 1);
                for (kernel, threads) in [
                    (KernelChoice::Auto, 1),
                    (KernelChoice::V3, 1),
                    (KernelChoice::Auto, 3),
                    (KernelChoice::Generic, 3),
                ] {
                    let got = run(kernel, threads);
                    let same = same_bits(&got, &generic);
                    assert!(
                        same,
                        "{:?} {rows}×{cols} density {density} tp {tp} {kernel:?} threads {threads}",
                        S::DTYPE
                    );
                }
            }
        }
    }

    #[test]
    fn many_token_kernels_agree_exactly() {
        for (rows, cols, density, seed) in [
            (3, 5, 0.5, 1),
            (130, 37, 0.25, 2),
            (257, 300, 0.25, 3),
            (200, 129, 0.9, 4),
            (128, 256, 0.0, 5),
        ] {
            check_many_token_kernels::<f32>(rows, cols, density, seed);
            check_many_token_kernels::<half::bf16>(rows, cols, density, seed);
        }
        check_many_token_kernels::<half::f16>(130, 200, 0.25, 6);
    }

    /// 16 to 112 tokens on factors dense enough for the slab kernel: ragged last blocks (every
    /// chunk count), several blocks, one column, a full matrix; f32, bf16 and f16.
    #[test]
    fn token_slabs_agree_exactly() {
        for (rows, cols, density, seed) in [
            (3, 5, 0.5, 1),
            (130, 37, 0.4, 2),
            (257, 300, 0.35, 3),
            (200, 129, 0.9, 4),
            (192, 1, 1.0, 5),
            (240, 64, 0.5, 6),
        ] {
            check_vector_kernels::<f32>(rows, cols, density, seed, &[16, 48, 112]);
            check_vector_kernels::<half::bf16>(rows, cols, density, seed, &[16, 32]);
            check_vector_kernels::<half::f16>(rows, cols, density, seed, &[16, 32]);
        }
    }

    #[test]
    fn column_walk_with_listed_rows_agrees_exactly() {
        // Below the slabs' density: the walk over each column's rows listed by `vpcompressd`
        // (with AVX-512), against the generic walk. Ragged last blocks, empty columns.
        for (rows, cols, density, seed) in [
            (3, 5, 0.25, 11),
            (130, 37, 0.05, 12),
            (257, 300, 0.25, 13),
            (200, 129, 0.29, 14),
            (128, 1, 0.2, 15),
            (240, 64, 0.0, 16),
        ] {
            check_vector_kernels::<f32>(rows, cols, density, seed, &[16]);
            check_vector_kernels::<half::bf16>(rows, cols, density, seed, &[16]);
            check_vector_kernels::<half::f16>(rows, cols, density, seed, &[16]);
        }
    }

    #[test]
    fn multithreaded_large_products_match() {
        // Large enough for the sparse products to split over threads.
        let g = random_group(MlpKind::Gated, Activation::Silu, (64, 300, 700, 1), 0.25, 5);
        check_forward::<f32>(&g, 1e-5);
        check_forward::<half::bf16>(&g, 1e-5);
    }

    #[test]
    fn tiled_products_split_over_threads_give_the_same_bits() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let (rows, cols) = (701usize, 300usize);
        let keep =
            Array2::from_shape_simple_fn((rows.div_ceil(2), cols / 2), || rng.random_bool(0.25));
        let mask = Array2::from_shape_fn((rows, cols), |(i, c)| keep[[i / 2, c / 2]]);
        let v = Array2::from_shape_simple_fn((rows, cols), || rng.random_range(-1.0f32..1.0));
        let m = CompactMatrix::<f32>::from_dense(v.view(), mask.view()).unwrap();
        let t = TiledMatrix::from_compact(&m).unwrap();
        for tp in [1, 80] {
            let x: Vec<f32> = (0..cols * tp)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let bias: Vec<f32> = (0..rows).map(|i| i as f32 * 0.01).collect();
            let run = |threads: usize| {
                let mut out = vec![f32::NAN; rows * tp];
                let mut inputs = Vec::new();
                split_product(
                    &t,
                    &x,
                    tp,
                    &mut out,
                    Some(&bias),
                    KernelPlan {
                        threads,
                        kernel: KernelChoice::Auto,
                    },
                    &mut inputs,
                );
                out
            };
            let one = run(1);
            assert!(one.iter().all(|v| v.is_finite()));
            assert_eq!(one, run(3), "{tp} tokens");
        }
    }

    #[test]
    fn reused_buffers_give_the_bits_of_fresh_ones() {
        // Buffers grown by a large call and left holding its values serve smaller and larger
        // calls, blocked and tiled, f32 and bf16, exactly as fresh scratch does.
        let g = random_group(MlpKind::Gated, Activation::Silu, (24, 37, 50, 2), 0.25, 8);
        let c32 = CompactGroup::<f32>::from_group(&g).unwrap();
        let cbf = CompactGroup::<half::bf16>::from_group(&g).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let mut b32 = ForwardBuffers::default();
        let mut bbf = ForwardBuffers::default();
        assert!(b32.is_empty());
        for (t, block) in [(70, 0), (1, 1), (17, 0), (208, 1), (3, 1), (64, 0)] {
            let x = Array2::from_shape_simple_fn((t, 24), || rng.random_range(-1.0f32..1.0));
            assert_eq!(
                c32.forward_with(block, x.view(), &mut b32).unwrap(),
                c32.forward(block, x.view()).unwrap(),
                "f32, {t} tokens"
            );
            assert_eq!(
                cbf.forward_with(block, x.view(), &mut bbf).unwrap(),
                cbf.forward(block, x.view()).unwrap(),
                "bf16, {t} tokens"
            );
        }
        assert!(!b32.is_empty());
    }

    #[test]
    fn round_trip_to_group_is_exact_and_dense_weights_agree() {
        let g = random_group(
            MlpKind::Standard,
            Activation::Gelu,
            (24, 37, 50, 2),
            0.25,
            9,
        );
        let c = CompactGroup::<f32>::from_group(&g).unwrap();
        assert_eq!(c.to_group().unwrap(), g);
        for b in 0..2 {
            for m in 0..2 {
                let a = c.dense_weight(b, m).unwrap();
                let w = g.dense_weight(b, m).unwrap();
                assert!(a.iter().zip(&w).all(|(x, y)| x.to_bits() == y.to_bits()));
            }
        }
        assert!(c.forward(2, Array2::zeros((1, 24)).view()).is_err());
        assert!(c.forward(0, Array2::zeros((1, 23)).view()).is_err());
        // bf16: the round trip is exact on the rounded values.
        let h = CompactGroup::<half::bf16>::from_group(&g).unwrap();
        let back = h.to_group().unwrap();
        assert_eq!(CompactGroup::<half::bf16>::from_group(&back).unwrap(), h);
    }
}
