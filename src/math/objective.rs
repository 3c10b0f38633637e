//! The block-wise reconstruction loss of a FiPS group and its hand-written gradients.
//!
//! For blocks `b = 1..n` with mini-batch inputs `X_b` (`T × d`) and targets `Y_b`,
//! `L = Σ_b mean((MLP_b^c(X_b) − Y_b)²)`, where every matrix is `W_j = U V_j` (oriented `d × I`).
//! With `G = ∂L/∂Ŷ = 2 (Ŷ − Y) / (T d)`, a down projection `Ŷ = A W_dᵀ + b` gives
//! `∂W_d = Gᵀ A`, `∂A = G W_d`, `∂b = 1ᵀ G`; an up projection `H = X W_u + b` given `∂H` gives
//! `∂W_u = Xᵀ ∂H`, `∂b = 1ᵀ ∂H`. A standard MLP has `A = act(H)`, so `∂H = ∂A ⊙ act'(H)`; a gated
//! one has `A = act(H_g) ⊙ H_u`, so `∂H_g = ∂A ⊙ H_u ⊙ act'(H_g)` and `∂H_u = ∂A ⊙ act(H_g)`.
//! Finally `∂U = Σ_j ∂W_j V_jᵀ` and `∂V_j = Uᵀ ∂W_j`: the gradient with respect to the masked
//! factor, dense (RigL's regrowth score); the optimiser masks it.
//!
//! `V` and `∂V` are never held whole in the factors-first order: `V` lives in a store
//! (`FactorStore`, the trainer's kept entries) that decodes one matrix `V_j` into a one-matrix
//! buffer (`r × I`) right before a product reads it, and `∂V_j` is computed into the same buffer
//! after the products that read `V_j` and handed to the store right after the step's last read of
//! `V_j` (each `V_j` serves one block, so
//! `∂U` and the later blocks still see the values the loss was computed with), which may update
//! `V_j` then. The weights-first order (chosen only when its dense `W` and `∂W`, `8 d f n I` bytes,
//! are held anyway) decodes `V` whole into its `r × fnI` gradient buffer (`r < d`: less than `W`)
//! and forms `∂V` whole there, then hands it out one matrix at a time.
//!
//! Two contraction orders compute the same values:
//! - *weights first*: form `W = U V` (`d × fnI`) once per step, run the block on dense weights, and
//!   pull `∂W` back with two GEMMs over the whole group: `(2f + 1) T d I` multiply-adds per block plus
//!   `3 d r f n I`;
//! - *factors first*: never form `W`; evaluate `(X U) V_j` and `(A V_dᵀ) Uᵀ`:
//!   `T r (5 d + 3 f I)` multiply-adds per block.
//!
//! Every product is one BLAS GEMM into a buffer allocated once per training run.

use std::fmt;
use std::str::FromStr;

use ndarray::{Array1, Array2, ArrayView2, ArrayViewMut2, Axis, linalg::general_mat_mul};

use crate::foundation::activation::Activation;
use crate::foundation::error::{FipsError, Result, invalid};
use crate::foundation::float::Float;
use crate::foundation::kernels::{RowSplit, add_column_sums};
use crate::foundation::mlp::MlpKind;
use crate::foundation::slicing::s;
use crate::foundation::thread_plan::{block_workers, map_in_rounds, step_threads};

/// The contraction order of the training step.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ContractionOrder {
    /// Whichever of the two needs fewer multiply-adds for the shapes at hand (the default).
    #[default]
    Auto,
    /// `(X U) V_j`: never forms the dense weights.
    FactorsFirst,
    /// `X (U V_j)`: forms the group's dense weights once per step.
    WeightsFirst,
}

impl fmt::Display for ContractionOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::FactorsFirst => "factors-first",
            Self::WeightsFirst => "weights-first",
        })
    }
}

impl FromStr for ContractionOrder {
    type Err = FipsError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "factors-first" => Ok(Self::FactorsFirst),
            "weights-first" => Ok(Self::WeightsFirst),
            other => Err(invalid(
                "contraction",
                format!("unknown contraction order {other:?} (auto, factors-first, weights-first)"),
            )),
        }
    }
}

/// Dimensions of a group's training problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StepShape {
    /// Tokens per mini-batch, T.
    pub tokens: usize,
    /// Model width d.
    pub width: usize,
    /// MLP width I.
    pub intermediate: usize,
    /// Rank r.
    pub rank: usize,
    /// Blocks n.
    pub blocks: usize,
    /// Matrices per block f.
    pub matrices_per_block: usize,
}

impl StepShape {
    /// Floating-point operations (2 per multiply-add) of the GEMMs of one training step
    /// (forward and backward) in `order`; `Auto` resolves first.
    pub fn flops(&self, order: ContractionOrder) -> f64 {
        let [t, d, i, r, n, f] = [
            self.tokens,
            self.width,
            self.intermediate,
            self.rank,
            self.blocks,
            self.matrices_per_block,
        ]
        .map(|x| x as f64);
        let macs = match self.resolve(order) {
            ContractionOrder::FactorsFirst => n * t * r * (5.0 * d + 3.0 * f * i),
            _ => n * (2.0 * f + 1.0) * t * d * i + 3.0 * d * r * f * n * i,
        };
        2.0 * macs
    }

    /// The dense-equivalent FLOPs of a step: `3 · 2 · T d I f n` (forward plus two backward GEMMs
    /// per dense matrix).
    pub fn dense_equivalent_flops(&self) -> f64 {
        6.0 * (self.tokens * self.width * self.intermediate * self.matrices_per_block * self.blocks)
            as f64
    }

    /// `order`, with `Auto` replaced by the cheaper of the two.
    pub fn resolve(&self, order: ContractionOrder) -> ContractionOrder {
        match order {
            ContractionOrder::Auto => {
                if self.flops(ContractionOrder::FactorsFirst)
                    < self.flops(ContractionOrder::WeightsFirst)
                {
                    ContractionOrder::FactorsFirst
                } else {
                    ContractionOrder::WeightsFirst
                }
            }
            other => other,
        }
    }
}

/// Trainable parameters of a group with a dense `V` (and, with the same layout, their gradients):
/// the tests' reference layout (the trainer holds `V` as its kept entries).
#[cfg(test)]
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GroupParams<F> {
    /// Shared basis, `d × r`.
    pub u: Array2<F>,
    /// Concatenated factors `[V_1 | … | V_fn]`, `r × fnI` (zero outside the mask).
    pub v: Array2<F>,
    /// One bias slot per matrix, module order.
    pub biases: Vec<Option<Array1<F>>>,
}

#[cfg(test)]
impl<F: Float> GroupParams<F> {
    /// Zeros of the same shapes.
    pub(crate) fn zeros_like(&self) -> Self {
        Self {
            u: Array2::zeros(self.u.raw_dim()),
            v: Array2::zeros(self.v.raw_dim()),
            biases: self.gradients_like().biases,
        }
    }

    /// Zero gradients of `U` and the biases.
    pub(crate) fn gradients_like(&self) -> BasisGradients<F> {
        BasisGradients::zeros_like(&self.u, &self.biases)
    }
}

impl<F: Float> BasisGradients<F> {
    /// Zero gradients of `u` and `biases`.
    pub(crate) fn zeros_like(u: &Array2<F>, biases: &[Option<Array1<F>>]) -> Self {
        Self {
            u: Array2::zeros(u.raw_dim()),
            biases: biases
                .iter()
                .map(|b| b.as_ref().map(|b| Array1::zeros(b.raw_dim())))
                .collect(),
        }
    }
}

/// The gradients the objective holds whole: `∂U` and the biases' (`∂V` goes to a
/// [`FactorStore`] one matrix at a time).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BasisGradients<F> {
    /// `∂L/∂U`.
    pub u: Array2<F>,
    /// One slot per matrix, module order.
    pub biases: Vec<Option<Array1<F>>>,
}

/// Where the objective reads `V = [V_1 | … | V_fn]` and hands its gradient: `V_j` (`r × I`) is
/// decoded on demand, and `∂L/∂V_j` (`r × I`, rows contiguous) of every matrix `j` arrives once per
/// step, after the step's last read of `V_j`; the store may update `V_j` then.
pub(crate) trait FactorStore<F>: Sync {
    /// Writes `V_j` into `out` (`r × I`).
    fn decode(&self, j: usize, out: ArrayViewMut2<'_, F>) -> Result<()>;
    /// Consumes the gradient of matrix `j`.
    fn consume(&mut self, j: usize, grad: ArrayView2<'_, F>) -> Result<()>;
}

/// A dense `V` that collects the gradient of the whole of `V` (tests and reference paths).
#[cfg(test)]
pub(crate) struct DenseGradient<'g, F> {
    /// `V`.
    pub v: &'g Array2<F>,
    /// `∂V`, written.
    pub dv: &'g mut Array2<F>,
}

#[cfg(test)]
impl<F: Float> FactorStore<F> for DenseGradient<'_, F> {
    fn decode(&self, j: usize, mut out: ArrayViewMut2<'_, F>) -> Result<()> {
        let i = out.ncols();
        out.assign(&self.v.slice(s![.., j * i..(j + 1) * i]));
        Ok(())
    }

    fn consume(&mut self, j: usize, grad: ArrayView2<'_, F>) -> Result<()> {
        let i = grad.ncols();
        self.dv.slice_mut(s![.., j * i..(j + 1) * i]).assign(&grad);
        Ok(())
    }
}

/// The dense parameters the objective reads directly: `U` and the biases.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BasisParams<'p, F> {
    /// `U`, `d × r` (or `d × r f n`).
    pub u: &'p Array2<F>,
    /// One bias slot per matrix, module order.
    pub biases: &'p [Option<Array1<F>>],
}

/// Preallocated buffers of one training step (nothing large is allocated per step).
#[derive(Debug)]
pub(crate) struct Workspace<F> {
    /// Dense weights `U V` and their gradient, `d × fnI` (weights first only).
    w: Array2<F>,
    dw: Array2<F>,
    /// Factors first on one worker: `V_j` of one matrix, decoded from the store before the
    /// products that read it, then `∂V_j` (`r × I`). Weights first, or blocks in parallel: `V`,
    /// then `∂V`, whole (`r × fnI`).
    dv: Array2<F>,
    /// The matrix whose values `dv` holds (factors first on one worker), if any.
    decoded: Option<usize>,
    /// One set of block buffers per worker.
    blocks: Vec<BlockBuffers<F>>,
    /// `∂U` of every worker but the first (blocks in parallel), `d × r`.
    du: Vec<Array2<F>>,
}

/// The buffers one block's forward and backward pass run in (one set per worker).
#[derive(Debug)]
struct BlockBuffers<F> {
    /// `X U`, `A V_dᵀ` (later `G U`), `∂(X U)`: `T × r` (factors first only).
    xu: Array2<F>,
    c: Array2<F>,
    dxu: Array2<F>,
    /// Hidden state A, `∂A/∂H` (standard) or `act'(H_g) ⊙ H_u` (gated), and `∂A`: `T × I`.
    a: Array2<F>,
    dact: Array2<F>,
    da: Array2<F>,
    /// Gated only: `act(H_g)` and `H_u` (later `∂H_u`), `T × I`.
    gate: Array2<F>,
    up: Array2<F>,
    /// Block output, then `G`: `T × d`.
    yhat: Array2<F>,
}

/// `rows × cols` zeros, or an empty array when the buffer is not needed.
fn zeros_if<F: Float>(rows: usize, cols: usize, needed: bool) -> Array2<F> {
    if needed {
        Array2::zeros((rows, cols))
    } else {
        Array2::zeros((0, 0))
    }
}

impl<F: Float> BlockBuffers<F> {
    fn new(shape: &StepShape, kind: MlpKind, weights_first: bool) -> Self {
        let (t, d, i, r) = (shape.tokens, shape.width, shape.intermediate, shape.rank);
        let gated = kind == MlpKind::Gated;
        Self {
            xu: zeros_if(t, r, !weights_first),
            c: zeros_if(t, r, !weights_first),
            dxu: zeros_if(t, r, !weights_first),
            a: zeros_if(t, i, true),
            dact: zeros_if(t, i, true),
            da: zeros_if(t, i, true),
            gate: zeros_if(t, i, gated),
            up: zeros_if(t, i, gated),
            yhat: zeros_if(t, d, true),
        }
    }
}

impl<F: Float> Workspace<F> {
    fn new(shape: &StepShape, kind: MlpKind, order: ContractionOrder, workers: usize) -> Self {
        let StepShape {
            width: d,
            intermediate: i,
            rank: r,
            blocks: n,
            matrices_per_block: f,
            ..
        } = *shape;
        let weights_first = order == ContractionOrder::WeightsFirst;
        let whole_v = weights_first || workers > 1;
        Self {
            w: zeros_if(d, f * n * i, weights_first),
            dw: zeros_if(d, f * n * i, weights_first),
            dv: if whole_v {
                zeros_if(r, f * n * i, true)
            } else {
                zeros_if(r, i, true)
            },
            decoded: None,
            blocks: (0..workers.max(1))
                .map(|_| BlockBuffers::new(shape, kind, weights_first))
                .collect(),
            du: (1..workers.max(1)).map(|_| Array2::zeros((d, r))).collect(),
        }
    }
}

/// Loss and gradients of one group's reconstruction problem.
#[derive(Debug)]
pub(crate) struct Objective<F> {
    kind: MlpKind,
    activation: Activation,
    shape: StepShape,
    order: ContractionOrder,
    /// Every matrix has its own basis (`U` is `[U_1 | … | U_fn]`, `d × r f n`): the per-layer
    /// low-rank baseline; weights-first order only.
    per_matrix_bases: bool,
    split: RowSplit,
    ws: Workspace<F>,
}

/// What every block's pass reads besides its data: the problem's kind and shape, and the thread
/// split of its elementwise passes.
#[derive(Debug, Clone, Copy)]
struct Pass {
    kind: MlpKind,
    activation: Activation,
    shape: StepShape,
    split: RowSplit,
}

/// Where one block's pass reads its matrices and writes their gradients.
enum BlockMatrices<'a, F> {
    /// Weights first: the block's columns of `W` and of `∂W` (`d × f I`).
    Weights {
        w: ArrayView2<'a, F>,
        dw: ArrayViewMut2<'a, F>,
    },
    /// Factors first, one matrix at a time: `V_j` decoded from `store` into `buf` (`r × I`) before
    /// a product reads it, `∂V_j` computed into `buf` and handed to `store` after its last read.
    Decoded {
        buf: &'a mut Array2<F>,
        decoded: &'a mut Option<usize>,
        store: &'a mut dyn FactorStore<F>,
    },
    /// Factors first, the block's columns of `V` decoded beforehand (`r × f I`): each `∂V_j`
    /// overwrites its `V_j` after the last read, for the caller to hand to the store.
    Whole { v: ArrayViewMut2<'a, F> },
}

impl<F: Float> BlockMatrices<'_, F> {
    /// `V_j`, the block's matrix `m` (`j` overall), to read (factors first).
    fn v(&mut self, j: usize, m: usize, i: usize) -> Result<ArrayView2<'_, F>> {
        match self {
            Self::Decoded {
                buf,
                decoded,
                store,
            } => {
                if **decoded != Some(j) {
                    **decoded = None;
                    store.decode(j, buf.view_mut())?;
                    **decoded = Some(j);
                }
                Ok(buf.view())
            }
            Self::Whole { v } => Ok(v.slice(s![.., m * i..(m + 1) * i])),
            Self::Weights { .. } => Err(FipsError::Numerical(
                "internal: the weights-first order reads no factor".into(),
            )),
        }
    }

    /// The buffer `∂V_j` is written to (it may hold `V_j`, whose last read must be done).
    fn gradient(&mut self, m: usize, i: usize) -> ArrayViewMut2<'_, F> {
        match self {
            Self::Decoded { buf, decoded, .. } => {
                **decoded = None;
                buf.view_mut()
            }
            Self::Whole { v } => v.slice_mut(s![.., m * i..(m + 1) * i]),
            Self::Weights { dw, .. } => dw.slice_mut(s![.., m * i..(m + 1) * i]),
        }
    }

    /// `∂V_j` is complete: to the store now (one matrix at a time), or later by the caller.
    fn done(&mut self, j: usize) -> Result<()> {
        match self {
            Self::Decoded { buf, store, .. } => store.consume(j, buf.view()),
            _ => Ok(()),
        }
    }
}

/// `C ← α A B + β C`.
#[inline]
fn gemm<F: Float>(
    alpha: F,
    a: &ArrayView2<'_, F>,
    b: &ArrayView2<'_, F>,
    beta: F,
    c: &mut ArrayViewMut2<'_, F>,
) {
    general_mat_mul(alpha, a, b, beta, c);
}

fn flat<F>(a: &Array2<F>) -> Result<&[F]> {
    a.as_slice()
        .ok_or_else(|| FipsError::Numerical("internal buffer is not contiguous".into()))
}

fn flat_mut<F>(a: &mut Array2<F>) -> Result<&mut [F]> {
    a.as_slice_mut()
        .ok_or_else(|| FipsError::Numerical("internal buffer is not contiguous".into()))
}

/// A bias gradient, zeroed, as a slice to accumulate column sums into.
fn bias_slice<F: Float>(b: Option<&mut Array1<F>>) -> Result<Option<&mut [F]>> {
    b.map(|b| {
        b.fill(F::zero());
        b.as_slice_mut()
            .ok_or_else(|| FipsError::Numerical("bias gradient is not contiguous".into()))
    })
    .transpose()
}

/// One block's work in a step: its index, inputs, targets and bias gradients (its `f` slots).
struct BlockJob<'a, F> {
    b: usize,
    x: ArrayView2<'a, F>,
    y: &'a Array2<F>,
    bias_grads: &'a mut [Option<Array1<F>>],
}

impl<F: Float> Objective<F> {
    /// An objective for mini-batches of `shape.tokens` tokens; `order` resolves `Auto`; elementwise
    /// passes use at most `threads` threads, one for small shapes
    /// ([`crate::foundation::thread_plan::step_threads`]). With OpenBLAS on one thread
    /// ([`block_workers`]) the factors-first order runs the blocks on up to `threads` workers, and
    /// `Auto` counts that in.
    pub(crate) fn new(
        kind: MlpKind,
        activation: Activation,
        shape: StepShape,
        order: ContractionOrder,
        threads: usize,
    ) -> Self {
        let workers = block_workers(
            shape.tokens,
            shape.width,
            shape.intermediate,
            shape.blocks,
            threads,
        );
        let order = match order {
            // Blocks in parallel divide the factors-first order's time by the workers.
            ContractionOrder::Auto if workers > 1 => {
                if shape.flops(ContractionOrder::FactorsFirst) / (workers as f64)
                    < shape.flops(ContractionOrder::WeightsFirst)
                {
                    ContractionOrder::FactorsFirst
                } else {
                    ContractionOrder::WeightsFirst
                }
            }
            other => shape.resolve(other),
        };
        Self::with_workers(kind, activation, shape, order, threads, workers)
    }

    /// [`Self::new`] with the factors-first order's block workers given (one in the
    /// weights-first order).
    pub(crate) fn with_workers(
        kind: MlpKind,
        activation: Activation,
        shape: StepShape,
        order: ContractionOrder,
        threads: usize,
        workers: usize,
    ) -> Self {
        let order = shape.resolve(order);
        let workers = if order == ContractionOrder::FactorsFirst {
            workers.clamp(1, shape.blocks.max(1))
        } else {
            1
        };
        Self {
            kind,
            activation,
            shape,
            order,
            per_matrix_bases: false,
            split: RowSplit::new(step_threads(
                shape.tokens,
                shape.width,
                shape.intermediate,
                threads,
            )),
            ws: Workspace::new(&shape, kind, order, workers),
        }
    }

    /// The same objective with one basis per matrix (`U` is `d × r f n`); forces the weights-first
    /// order (and one worker).
    pub(crate) fn with_per_matrix_bases(mut self) -> Self {
        self.per_matrix_bases = true;
        if self.order != ContractionOrder::WeightsFirst {
            self.order = ContractionOrder::WeightsFirst;
            self.ws = Workspace::new(&self.shape, self.kind, self.order, 1);
        }
        self
    }

    /// The thread split of the elementwise passes (the optimiser uses it too).
    pub(crate) fn split(&self) -> RowSplit {
        self.split
    }

    /// Workers the blocks of a step run on (1: one after the other).
    pub(crate) fn workers(&self) -> usize {
        self.ws.blocks.len()
    }

    /// Elements of the buffer of `V_j` and `∂V_j` (or `V` and `∂V`), for tests.
    #[cfg(test)]
    pub(crate) fn factor_buffer(&self) -> usize {
        self.ws.dv.len()
    }

    /// The contraction order in use (never `Auto`).
    pub(crate) fn order(&self) -> ContractionOrder {
        self.order
    }

    /// The block passes' context, with the elementwise passes on `split`.
    fn pass(&self, split: RowSplit) -> Pass {
        Pass {
            kind: self.kind,
            activation: self.activation,
            shape: self.shape,
            split,
        }
    }

    /// `L` for the batch `xs[b]`, `ys[b]` (each `T × d`) with `U` and the biases `p` and `V` in
    /// `store`, writing `∂L/∂U` and the biases' gradients into `grads` and handing `∂L/∂V_j` of
    /// every matrix to `store` (which may update `V_j` as it goes; the loss and every gradient are
    /// those of `V` as the step began).
    pub(crate) fn loss_and_gradients(
        &mut self,
        p: BasisParams<'_, F>,
        store: &mut dyn FactorStore<F>,
        xs: &[Array2<F>],
        ys: &[Array2<F>],
        grads: &mut BasisGradients<F>,
    ) -> Result<f64> {
        let weights_first = self.order == ContractionOrder::WeightsFirst;
        let parallel = self.workers() > 1;
        let (f, i) = (self.shape.matrices_per_block, self.shape.intermediate);
        let matrices = self.shape.blocks * f;
        if xs.len() != self.shape.blocks || ys.len() != self.shape.blocks {
            return Err(FipsError::ShapeMismatch {
                what: "mini-batch blocks (inputs, targets)".into(),
                expected: vec![self.shape.blocks, self.shape.blocks],
                got: vec![xs.len(), ys.len()],
            });
        }
        self.ws.decoded = None;
        if weights_first {
            // V whole into the gradient buffer, then W = U V, one GEMM per basis over the
            // columns of the matrices it serves.
            for j in 0..matrices {
                store.decode(j, self.ws.dv.slice_mut(s![.., j * i..(j + 1) * i]))?;
            }
            for (u_cols, v_cols) in self.basis_blocks() {
                general_mat_mul(
                    F::one(),
                    &p.u.slice(s![.., u_cols]),
                    &self.ws.dv.slice(s![.., v_cols.clone()]),
                    F::zero(),
                    &mut self.ws.w.slice_mut(s![.., v_cols]),
                );
            }
        } else {
            grads.u.fill(F::zero());
        }
        let loss = if parallel {
            let loss = self.blocks_in_parallel(p, &*store, xs, ys, grads)?;
            // Every ∂V_j to the store, in the order one worker hands them over.
            for b in 0..self.shape.blocks {
                for m in std::iter::once(f - 1).chain(0..f - 1) {
                    let j = b * f + m;
                    store.consume(j, self.ws.dv.slice(s![.., j * i..(j + 1) * i]))?;
                }
            }
            loss
        } else {
            let pass = self.pass(self.split);
            let Workspace {
                w,
                dw,
                dv,
                decoded,
                blocks,
                ..
            } = &mut self.ws;
            let h = blocks.first_mut().ok_or_else(|| {
                FipsError::Numerical("internal: a step without block buffers".into())
            })?;
            let mut loss = 0.0;
            for (b, ((x, y), bias_grads)) in xs
                .iter()
                .zip(ys)
                .zip(grads.biases.chunks_mut(f))
                .enumerate()
            {
                let cols = s![.., b * f * i..(b + 1) * f * i];
                let mats = if weights_first {
                    BlockMatrices::Weights {
                        w: w.slice(cols),
                        dw: dw.slice_mut(cols),
                    }
                } else {
                    BlockMatrices::Decoded {
                        buf: &mut *dv,
                        decoded: &mut *decoded,
                        store: &mut *store,
                    }
                };
                let job = BlockJob {
                    b,
                    x: x.view(),
                    y,
                    bias_grads,
                };
                loss += pass.run(job, mats, p, h, &mut grads.u.view_mut())?;
            }
            loss
        };
        if weights_first {
            // ∂U_k = ∂W_k V_kᵀ, then ∂V_k = U_kᵀ ∂W_k over V_k's columns of the buffer, for every
            // basis k; V_k is read by nothing else, so its matrices go to the store right after.
            for (u_cols, v_cols) in self.basis_blocks() {
                let ws = &mut self.ws;
                let dw = ws.dw.slice(s![.., v_cols.clone()]);
                general_mat_mul(
                    F::one(),
                    &dw,
                    &ws.dv.slice(s![.., v_cols.clone()]).t(),
                    F::zero(),
                    &mut grads.u.slice_mut(s![.., u_cols.clone()]),
                );
                general_mat_mul(
                    F::one(),
                    &p.u.slice(s![.., u_cols]).t(),
                    &dw,
                    F::zero(),
                    &mut ws.dv.slice_mut(s![.., v_cols.clone()]),
                );
                for j in v_cols.start / i..v_cols.end / i {
                    store.consume(j, ws.dv.slice(s![.., j * i..(j + 1) * i]))?;
                }
            }
        }
        Ok(loss)
    }

    /// [`Self::loss_and_gradients`] with a dense `V` (`p.v`) and `∂V` collected whole into
    /// `grads.v` (tests).
    #[cfg(test)]
    pub(crate) fn loss_and_dense_gradients(
        &mut self,
        p: &GroupParams<F>,
        xs: &[Array2<F>],
        ys: &[Array2<F>],
        grads: &mut GroupParams<F>,
    ) -> Result<f64> {
        let mut basis = BasisGradients {
            u: std::mem::take(&mut grads.u),
            biases: std::mem::take(&mut grads.biases),
        };
        let loss = self.loss_and_gradients(
            BasisParams {
                u: &p.u,
                biases: &p.biases,
            },
            &mut DenseGradient {
                v: &p.v,
                dv: &mut grads.v,
            },
            xs,
            ys,
            &mut basis,
        );
        grads.u = basis.u;
        grads.biases = basis.biases;
        loss
    }

    /// Factors first, `V` whole in the buffer (each worker decodes its blocks' matrices from
    /// `store`): the blocks split into contiguous runs, one per worker
    /// ([`map_in_rounds`], one round), each with its own buffers and `∂U` (the first worker's is
    /// `grads.u`, the others are added to it in order) and its elementwise passes on its own
    /// thread. Each block's `∂V_j` overwrites its `V_j` in the buffer. Returns the loss, summed per
    /// worker in block order, then over the workers in order.
    fn blocks_in_parallel(
        &mut self,
        p: BasisParams<'_, F>,
        store: &dyn FactorStore<F>,
        xs: &[Array2<F>],
        ys: &[Array2<F>],
        grads: &mut BasisGradients<F>,
    ) -> Result<f64> {
        let (n, f, i) = (
            self.shape.blocks,
            self.shape.matrices_per_block,
            self.shape.intermediate,
        );
        let pass = self.pass(RowSplit::new(1));
        let Workspace { dv, blocks, du, .. } = &mut self.ws;
        let workers = blocks.len();
        let per_worker = n.div_ceil(workers);
        let mut jobs = xs
            .iter()
            .zip(ys)
            .zip(dv.axis_chunks_iter_mut(Axis(1), f * i))
            .zip(grads.biases.chunks_mut(f))
            .enumerate()
            .map(|(b, (((x, y), v), bias_grads))| {
                let job = BlockJob {
                    b,
                    x: x.view(),
                    y,
                    bias_grads,
                };
                (job, v)
            });
        for d in du.iter_mut() {
            d.fill(F::zero());
        }
        let dus = std::iter::once(grads.u.view_mut()).chain(du.iter_mut().map(|d| d.view_mut()));
        let runs: Vec<_> = blocks
            .iter_mut()
            .zip(dus)
            .map(|(h, du)| (h, du, jobs.by_ref().take(per_worker).collect::<Vec<_>>()))
            .collect();
        let mut loss = 0.0;
        map_in_rounds(
            runs,
            workers,
            |(h, mut du, run)| {
                run.into_iter()
                    .map(|(job, mut v)| {
                        for m in 0..f {
                            let j = job.b * f + m;
                            store.decode(j, v.slice_mut(s![.., m * i..(m + 1) * i]))?;
                        }
                        pass.run(job, BlockMatrices::Whole { v }, p, h, &mut du)
                    })
                    .sum::<Result<f64>>()
            },
            |part| {
                loss += part;
                Ok(())
            },
        )?;
        for d in du.iter() {
            grads.u += d;
        }
        Ok(loss)
    }

    /// For every basis, its columns in `U` and the columns in `V` (and `W`) of the matrices it
    /// serves: one basis for the whole group, or one per matrix.
    fn basis_blocks(&self) -> Vec<(std::ops::Range<usize>, std::ops::Range<usize>)> {
        let (r, i) = (self.shape.rank, self.shape.intermediate);
        let matrices = self.shape.blocks * self.shape.matrices_per_block;
        if self.per_matrix_bases {
            (0..matrices)
                .map(|j| (j * r..(j + 1) * r, j * i..(j + 1) * i))
                .collect()
        } else {
            vec![(0..r, 0..matrices * i)]
        }
    }
}

impl Pass {
    /// Block `job.b` forward, its loss and `G`, and backward: returns `mean((Ŷ − Y)²)`, writes the
    /// block's bias gradients, adds its share of `∂U` to `du` (factors first) and writes its `∂W` or
    /// `∂V_j` through `mats`.
    fn run<F: Float>(
        &self,
        job: BlockJob<'_, F>,
        mut mats: BlockMatrices<'_, F>,
        p: BasisParams<'_, F>,
        h: &mut BlockBuffers<F>,
        du: &mut ArrayViewMut2<'_, F>,
    ) -> Result<f64> {
        let f = self.shape.matrices_per_block;
        self.forward(job.b, p, &mut mats, job.x, h)?;
        let db = bias_slice(job.bias_grads[f - 1].as_mut())?;
        let loss = self.output_gradient(job.y, h, db)?;
        self.backward(job.b, p, &mut mats, job.x, h, du, job.bias_grads)?;
        Ok(loss)
    }

    /// Fills every row of `out` with `bias` and returns the GEMM β that adds the product to it (1),
    /// or 0 without a bias: the bias costs no pass of its own.
    fn prefill_bias<F: Float>(&self, out: &mut Array2<F>, bias: Option<&Array1<F>>) -> Result<F> {
        match bias {
            Some(b) => {
                let row = b
                    .as_slice()
                    .ok_or_else(|| FipsError::Numerical("bias is not contiguous".into()))?;
                self.split.fill_rows(flat_mut(out)?, row);
                Ok(F::one())
            }
            None => Ok(F::zero()),
        }
    }

    /// `out = X W_j + b_j` (or `(X U) V_j + b_j`) for the block's matrix `m` (`j` overall).
    #[allow(clippy::too_many_arguments)]
    fn up_forward<F: Float>(
        &self,
        j: usize,
        m: usize,
        p: BasisParams<'_, F>,
        mats: &mut BlockMatrices<'_, F>,
        x: ArrayView2<'_, F>,
        xu: &Array2<F>,
        out: &mut Array2<F>,
    ) -> Result<()> {
        let i = self.shape.intermediate;
        let beta = self.prefill_bias(out, p.biases[j].as_ref())?;
        match mats {
            BlockMatrices::Weights { w, .. } => general_mat_mul(
                F::one(),
                &x,
                &w.slice(s![.., m * i..(m + 1) * i]),
                beta,
                out,
            ),
            _ => general_mat_mul(F::one(), xu, &mats.v(j, m, i)?, beta, out),
        }
        Ok(())
    }

    /// Runs block `b` forward, leaving every intermediate the backward pass needs in `h`.
    fn forward<F: Float>(
        &self,
        b: usize,
        p: BasisParams<'_, F>,
        mats: &mut BlockMatrices<'_, F>,
        x: ArrayView2<'_, F>,
        h: &mut BlockBuffers<F>,
    ) -> Result<()> {
        let f = self.shape.matrices_per_block;
        let i = self.shape.intermediate;
        let base = b * f;
        let weights_first = matches!(mats, BlockMatrices::Weights { .. });
        if !weights_first {
            general_mat_mul(F::one(), &x, p.u, F::zero(), &mut h.xu);
        }
        let act = self.activation;
        match self.kind {
            MlpKind::Standard => {
                self.up_forward(base, 0, p, mats, x, &h.xu, &mut h.a)?;
                self.split
                    .activate(act, flat_mut(&mut h.a)?, flat_mut(&mut h.dact)?, i);
            }
            MlpKind::Gated => {
                self.up_forward(base, 0, p, mats, x, &h.xu, &mut h.gate)?;
                self.up_forward(base + 1, 1, p, mats, x, &h.xu, &mut h.up)?;
                self.split.activate_gated(
                    act,
                    flat_mut(&mut h.gate)?,
                    flat(&h.up)?,
                    flat_mut(&mut h.a)?,
                    flat_mut(&mut h.dact)?,
                    i,
                );
            }
        }
        let (md, jd) = (f - 1, base + f - 1);
        let beta = self.prefill_bias(&mut h.yhat, p.biases[jd].as_ref())?;
        match mats {
            BlockMatrices::Weights { w, .. } => {
                let wd = w.slice(s![.., md * i..(md + 1) * i]);
                general_mat_mul(F::one(), &h.a, &wd.t(), beta, &mut h.yhat);
            }
            _ => {
                general_mat_mul(F::one(), &h.a, &mats.v(jd, md, i)?.t(), F::zero(), &mut h.c);
                general_mat_mul(F::one(), &h.c, &p.u.t(), beta, &mut h.yhat);
            }
        }
        Ok(())
    }

    /// Turns the block output into `G = 2 (Ŷ − Y) / (T d)` in place, writes the down projection's
    /// bias gradient `1ᵀ G` into `db`, and returns `mean((Ŷ − Y)²)`.
    fn output_gradient<F: Float>(
        &self,
        y: &Array2<F>,
        h: &mut BlockBuffers<F>,
        db: Option<&mut [F]>,
    ) -> Result<f64> {
        let count = y.len() as f64;
        let sum = self.split.output_gradient(
            flat_mut(&mut h.yhat)?,
            flat(y)?,
            F::cast(2.0 / count),
            self.shape.width,
            db,
        );
        Ok(sum / count)
    }

    /// Back-propagates block `b` from `G` (in `h`): its bias gradients into `bias_grads` (its `f`
    /// slots), `∂W` or `∂V_j` through `mats` after each matrix's last read, and, factors first, its
    /// share of `∂U` added to `du`.
    #[allow(clippy::too_many_arguments)]
    fn backward<F: Float>(
        &self,
        b: usize,
        p: BasisParams<'_, F>,
        mats: &mut BlockMatrices<'_, F>,
        x: ArrayView2<'_, F>,
        h: &mut BlockBuffers<F>,
        du: &mut ArrayViewMut2<'_, F>,
        bias_grads: &mut [Option<Array1<F>>],
    ) -> Result<()> {
        let f = self.shape.matrices_per_block;
        let i = self.shape.intermediate;
        let base = b * f;
        let (md, jd) = (f - 1, base + f - 1);
        let cols = |m: usize| s![.., m * i..(m + 1) * i];
        let weights_first = matches!(mats, BlockMatrices::Weights { .. });
        let (one, zero) = (F::one(), F::zero());

        // Down projection.
        match mats {
            BlockMatrices::Weights { w, dw } => {
                gemm(
                    one,
                    &h.yhat.t(),
                    &h.a.view(),
                    zero,
                    &mut dw.slice_mut(cols(md)),
                );
                gemm(
                    one,
                    &h.yhat.view(),
                    &w.slice(cols(md)),
                    zero,
                    &mut h.da.view_mut(),
                );
            }
            _ => {
                // ∂U += Gᵀ C, then C ← G U (= ∂C), ∂A = ∂C V_d, ∂V_d = ∂Cᵀ A.
                gemm(one, &h.yhat.t(), &h.c.view(), one, du);
                gemm(one, &h.yhat.view(), &p.u.view(), zero, &mut h.c.view_mut());
                gemm(
                    one,
                    &h.c.view(),
                    &mats.v(jd, md, i)?,
                    zero,
                    &mut h.da.view_mut(),
                );
                gemm(one, &h.c.t(), &h.a.view(), zero, &mut mats.gradient(md, i));
                mats.done(jd)?;
            }
        }

        // Activation (and gate): ∂A → ∂H of each up projection, with the up biases' gradients.
        let ups: &[usize] = match self.kind {
            MlpKind::Standard => {
                let db = bias_slice(bias_grads[0].as_mut())?;
                self.split
                    .backprop_activation(flat_mut(&mut h.da)?, flat(&h.dact)?, i, db);
                &[0]
            }
            MlpKind::Gated => {
                // ∂H_u = ∂A ⊙ act(H_g) into `up`; ∂H_g = ∂A ⊙ act'(H_g) ⊙ H_u in place.
                self.split.backprop_gate(
                    flat_mut(&mut h.up)?,
                    flat_mut(&mut h.da)?,
                    flat(&h.gate)?,
                    flat(&h.dact)?,
                    i,
                );
                for (m, dh) in [(0, &h.da), (1, &h.up)] {
                    if let Some(db) = bias_slice(bias_grads[m].as_mut())? {
                        add_column_sums(flat(dh)?, i, db);
                    }
                }
                &[0, 1]
            }
        };

        // Up projections.
        for (k, &m) in ups.iter().enumerate() {
            let j = base + m;
            let dh = if m == 0 { &h.da } else { &h.up };
            if weights_first {
                gemm(one, &x.t(), &dh.view(), zero, &mut mats.gradient(m, i));
            } else {
                let beta = if k == 0 { zero } else { one };
                gemm(
                    one,
                    &dh.view(),
                    &mats.v(j, m, i)?.t(),
                    beta,
                    &mut h.dxu.view_mut(),
                );
                gemm(one, &h.xu.t(), &dh.view(), zero, &mut mats.gradient(m, i));
                mats.done(j)?;
            }
        }
        if !weights_first {
            gemm(one, &x.t(), &h.dxu.view(), one, du);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    struct Problem {
        kind: MlpKind,
        activation: Activation,
        shape: StepShape,
        per_matrix: bool,
        params: GroupParams<f64>,
        xs: Vec<Array2<f64>>,
        ys: Vec<Array2<f64>>,
    }

    fn randn(rng: &mut ChaCha8Rng, rows: usize, cols: usize, scale: f64) -> Array2<f64> {
        Array2::from_shape_simple_fn((rows, cols), || {
            let z: f64 = StandardNormal.sample(&mut *rng);
            scale * z
        })
    }

    fn problem(
        kind: MlpKind,
        activation: Activation,
        masked: bool,
        with_bias: bool,
        seed: u64,
        per_matrix: bool,
        blocks: usize,
    ) -> Problem {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let f = kind.matrices_per_block();
        let shape = StepShape {
            tokens: 7,
            width: 5,
            intermediate: 6,
            rank: 4,
            blocks,
            matrices_per_block: f,
        };
        let (t, d, i, r, n) = (
            shape.tokens,
            shape.width,
            shape.intermediate,
            shape.rank,
            shape.blocks,
        );
        let bases = if per_matrix { f * n } else { 1 };
        let u = randn(&mut rng, d, r * bases, 0.5);
        let mut v = randn(&mut rng, r, f * n * i, 0.5);
        if masked {
            v.mapv_inplace(|x| if rng.random_bool(0.5) { x } else { 0.0 });
        }
        let roles = kind.matrix_roles();
        let biases = (0..f * n)
            .map(|j| {
                let len = if roles[j % f] == crate::foundation::mlp::MatrixRole::Up {
                    i
                } else {
                    d
                };
                with_bias.then(|| {
                    Array1::from_shape_simple_fn(len, || {
                        let z: f64 = StandardNormal.sample(&mut rng);
                        0.3 * z
                    })
                })
            })
            .collect();
        let xs = (0..n).map(|_| randn(&mut rng, t, d, 1.0)).collect();
        let ys = (0..n).map(|_| randn(&mut rng, t, d, 1.0)).collect();
        Problem {
            kind,
            activation,
            shape,
            per_matrix,
            params: GroupParams { u, v, biases },
            xs,
            ys,
        }
    }

    /// The loss through an independent path: rebuild every dense weight `U_k V_j` in its original
    /// layout and run `DenseMlp`.
    fn reference_loss(pb: &Problem, p: &GroupParams<f64>) -> f64 {
        let (i, r, f) = (
            pb.shape.intermediate,
            pb.shape.rank,
            pb.shape.matrices_per_block,
        );
        (0..pb.shape.blocks)
            .map(|b| {
                let layers = (0..f)
                    .map(|m| {
                        let j = b * f + m;
                        let k = if pb.per_matrix { j } else { 0 };
                        let w =
                            p.u.slice(s![.., k * r..(k + 1) * r])
                                .dot(&p.v.slice(s![.., j * i..(j + 1) * i]));
                        let w = match pb.kind.matrix_roles()[m] {
                            crate::foundation::mlp::MatrixRole::Up => w.t().to_owned(),
                            crate::foundation::mlp::MatrixRole::Down => w,
                        };
                        crate::foundation::mlp::Linear::new(w, p.biases[j].clone()).unwrap()
                    })
                    .collect();
                let mlp =
                    crate::foundation::mlp::DenseMlp::from_layers(pb.kind, layers, pb.activation)
                        .unwrap();
                let yhat = mlp.forward(pb.xs[b].view()).unwrap();
                (&yhat - &pb.ys[b]).mapv(|e| e * e).mean().unwrap()
            })
            .sum()
    }

    /// Every parameter entry, as a mutable reference getter over a params struct.
    fn for_each_entry(
        p: &GroupParams<f64>,
        mut visit: impl FnMut(&dyn Fn(&mut GroupParams<f64>) -> &mut f64, String),
    ) {
        for idx in 0..p.u.len() {
            let (a, b) = (idx / p.u.ncols(), idx % p.u.ncols());
            visit(&move |q| &mut q.u[[a, b]], format!("U[{a},{b}]"));
        }
        for idx in 0..p.v.len() {
            let (a, b) = (idx / p.v.ncols(), idx % p.v.ncols());
            visit(&move |q| &mut q.v[[a, b]], format!("V[{a},{b}]"));
        }
        for (j, bias) in p.biases.iter().enumerate() {
            if let Some(bias) = bias {
                for k in 0..bias.len() {
                    visit(
                        &move |q| {
                            q.biases[j]
                                .as_mut()
                                .map(|b| &mut b[k])
                                .expect("bias exists")
                        },
                        format!("b{j}[{k}]"),
                    );
                }
            }
        }
    }

    fn check_gradients(
        kind: MlpKind,
        activation: Activation,
        order: ContractionOrder,
        masked: bool,
        with_bias: bool,
    ) {
        check_gradients_with_bases(kind, activation, order, masked, with_bias, false);
    }

    fn check_gradients_with_bases(
        kind: MlpKind,
        activation: Activation,
        order: ContractionOrder,
        masked: bool,
        with_bias: bool,
        per_matrix: bool,
    ) {
        let pb = problem(kind, activation, masked, with_bias, 11, per_matrix, 2);
        let mut objective = Objective::new(kind, activation, pb.shape, order, 2);
        if per_matrix {
            objective = objective.with_per_matrix_bases();
            assert_eq!(objective.order(), ContractionOrder::WeightsFirst);
        } else {
            assert_eq!(objective.order(), order);
        }
        let mut grads = pb.params.zeros_like();
        let loss = objective
            .loss_and_dense_gradients(&pb.params, &pb.xs, &pb.ys, &mut grads)
            .unwrap();
        let reference = reference_loss(&pb, &pb.params);
        assert!(
            (loss - reference).abs() <= 1e-12 * reference.max(1.0),
            "loss {loss} vs {reference}"
        );
        let h = 1e-6;
        let mut checked = 0;
        for_each_entry(&pb.params, |entry, name| {
            let mut plus = pb.params.clone();
            *entry(&mut plus) += h;
            let mut minus = pb.params.clone();
            *entry(&mut minus) -= h;
            let fd = (reference_loss(&pb, &plus) - reference_loss(&pb, &minus)) / (2.0 * h);
            let analytic = *entry(&mut grads);
            assert!(
                (analytic - fd).abs() <= 1e-6 * fd.abs().max(1e-2),
                "{kind} {activation} {order} masked={masked}: d/d{name} analytic {analytic} vs finite difference {fd}"
            );
            checked += 1;
        });
        assert!(checked > 100);
    }

    #[test]
    fn gradients_match_finite_differences_standard() {
        for act in Activation::ALL {
            for order in [
                ContractionOrder::WeightsFirst,
                ContractionOrder::FactorsFirst,
            ] {
                for masked in [false, true] {
                    check_gradients(MlpKind::Standard, act, order, masked, true);
                }
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences_gated() {
        for act in Activation::ALL {
            for order in [
                ContractionOrder::WeightsFirst,
                ContractionOrder::FactorsFirst,
            ] {
                for masked in [false, true] {
                    check_gradients(MlpKind::Gated, act, order, masked, false);
                }
            }
        }
        // Gated with biases too.
        check_gradients(
            MlpKind::Gated,
            Activation::Silu,
            ContractionOrder::FactorsFirst,
            true,
            true,
        );
        check_gradients(
            MlpKind::Gated,
            Activation::GeluTanh,
            ContractionOrder::WeightsFirst,
            false,
            true,
        );
    }

    #[test]
    fn gradients_match_finite_differences_with_a_basis_per_matrix() {
        for act in [Activation::Gelu, Activation::Silu] {
            for order in [
                ContractionOrder::WeightsFirst,
                ContractionOrder::FactorsFirst,
            ] {
                check_gradients_with_bases(MlpKind::Standard, act, order, false, true, true);
                check_gradients_with_bases(MlpKind::Gated, act, order, true, false, true);
            }
        }
    }

    /// A dense `V` that also records the order the gradients arrive in.
    struct RecordingStore<'g> {
        dense: DenseGradient<'g, f64>,
        order: Vec<usize>,
    }

    impl FactorStore<f64> for RecordingStore<'_> {
        fn decode(&self, j: usize, out: ArrayViewMut2<'_, f64>) -> Result<()> {
            self.dense.decode(j, out)
        }

        fn consume(&mut self, j: usize, grad: ArrayView2<'_, f64>) -> Result<()> {
            self.order.push(j);
            self.dense.consume(j, grad)
        }
    }

    #[test]
    fn blocks_in_parallel_give_the_loss_and_gradients_of_one_worker() {
        for (kind, activation) in [
            (MlpKind::Standard, Activation::Gelu),
            (MlpKind::Gated, Activation::Silu),
        ] {
            let pb = problem(kind, activation, true, true, 5, false, 5);
            let run = |workers: usize| {
                let mut objective = Objective::with_workers(
                    kind,
                    activation,
                    pb.shape,
                    ContractionOrder::FactorsFirst,
                    1,
                    workers,
                );
                assert_eq!(objective.workers(), workers.min(5));
                let mut dv = Array2::zeros(pb.params.v.raw_dim());
                let mut store = RecordingStore {
                    dense: DenseGradient {
                        v: &pb.params.v,
                        dv: &mut dv,
                    },
                    order: Vec::new(),
                };
                let mut grads = pb.params.gradients_like();
                let params = BasisParams {
                    u: &pb.params.u,
                    biases: &pb.params.biases,
                };
                let loss = objective
                    .loss_and_gradients(params, &mut store, &pb.xs, &pb.ys, &mut grads)
                    .unwrap();
                let order = store.order;
                (loss, grads, dv, order)
            };
            let (loss, grads, dv, order) = run(1);
            assert!(loss > 0.0 && grads.u.iter().any(|&g| g != 0.0));
            for workers in [2, 3, 8] {
                let (l, g, v, o) = run(workers);
                // Every block's numbers are its own (the loss summed in block order): the same
                // bits; ∂U is summed per worker first, so only its rounding may differ.
                assert_eq!(
                    l.to_bits(),
                    loss.to_bits(),
                    "{kind} {workers} workers: loss"
                );
                assert_eq!(v, dv, "{kind} {workers} workers: ∂V");
                assert_eq!(g.biases, grads.biases, "{kind} {workers} workers: biases");
                assert_eq!(o, order, "{kind} {workers} workers: hand-over order");
                let scale = grads.u.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                let worst = (&g.u - &grads.u).iter().fold(0.0f64, |m, x| m.max(x.abs()));
                assert!(
                    worst <= 1e-13 * scale,
                    "{kind} {workers} workers: ∂U off by {worst}"
                );
            }
        }
    }

    #[test]
    fn auto_order_picks_the_cheaper_and_flops_are_exact() {
        let deit_tiny = StepShape {
            tokens: 2048,
            width: 192,
            intermediate: 768,
            rank: 341,
            blocks: 4,
            matrices_per_block: 2,
        };
        assert_eq!(
            deit_tiny.resolve(ContractionOrder::Auto),
            ContractionOrder::WeightsFirst
        );
        let few_tokens = StepShape {
            tokens: 64,
            ..deit_tiny
        };
        assert_eq!(
            few_tokens.resolve(ContractionOrder::Auto),
            ContractionOrder::FactorsFirst
        );
        // 4 blocks × 5 T d I + 3 d r f n I multiply-adds, doubled.
        let expected =
            2.0 * (4.0 * 5.0 * 2048.0 * 192.0 * 768.0 + 3.0 * 192.0 * 341.0 * 8.0 * 768.0);
        assert_eq!(deit_tiny.flops(ContractionOrder::WeightsFirst), expected);
    }
}
