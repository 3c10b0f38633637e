//! Calibration activations: the MLP inputs `Z_b` of every block of a group.

use std::ops::Range;

use ndarray::{Array2, ArrayView2, Axis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::foundation::error::{FipsError, Result};
use crate::foundation::float::{Float, ensure_finite};
use crate::foundation::mlp::DenseMlp;
use crate::foundation::slicing::s;
use crate::foundation::thread_plan::{map_in_rounds, pass_workers};

/// The MLP inputs of each block of a group, `Z_b` of shape `[tokens, d]`, one per block.
///
/// Every block holds the same number of tokens (token `t` of every block comes from the same
/// calibration position), so that a mini-batch can draw the same token indices for every block.
#[derive(Debug, Clone)]
pub struct Calibration<F> {
    inputs: Vec<Array2<F>>,
    /// Explicit per-block targets `[tokens, d]` (default: the dense blocks' outputs `MLP_b(Z_b)`).
    targets: Option<Vec<Array2<F>>>,
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
            targets: None,
            data_free: false,
        })
    }

    /// The same inputs with explicit targets `Y_b` (`[tokens, d]` per block) for the blocks to
    /// reproduce instead of the dense blocks' own outputs `MLP_b(Z_b)` (e.g. a teacher's outputs,
    /// or the original model's residual stream less the compressed model's). FiPS and trained SVD
    /// train toward them and report their errors against them; the closed-form baselines refuse
    /// them. (On DeiT-tiny, residual-correcting targets made the whole model worse:
    /// `docs/results.md`, "Calibration levers scored end to end".)
    ///
    /// Errors: a block count or shape that differs from the inputs', non-finite values.
    pub fn with_targets(self, targets: Vec<Array2<F>>) -> Result<Self> {
        if targets.len() != self.inputs.len() {
            return Err(FipsError::ShapeMismatch {
                what: "calibration targets (blocks)".into(),
                expected: vec![self.inputs.len()],
                got: vec![targets.len()],
            });
        }
        for (b, (y, z)) in targets.iter().zip(&self.inputs).enumerate() {
            if y.dim() != z.dim() {
                return Err(FipsError::ShapeMismatch {
                    what: format!("calibration targets of block {b}"),
                    expected: z.shape().to_vec(),
                    got: y.shape().to_vec(),
                });
            }
            ensure_finite(y, || format!("calibration targets of block {b}"))?;
        }
        Ok(Self {
            targets: Some(targets),
            ..self
        })
    }

    /// The same set with the rows `rows` of every block (and of the targets) appended `extra`
    /// more times, after the original rows and in the order given: in the mean squared error
    /// over the set, and in mini-batches drawn uniformly from it, each such row then weighs
    /// `1 + extra` (e.g. a ViT's class tokens, the only rows its head reads).
    ///
    /// Errors: a row past the set's tokens; more new values than
    /// [`MAX_GENERATED_ELEMENTS`](crate::math::limits::MAX_GENERATED_ELEMENTS).
    pub fn with_repeated_rows(self, rows: &[usize], extra: usize) -> Result<Self> {
        if rows.is_empty() || extra == 0 {
            return Ok(self);
        }
        let tokens = self.tokens();
        if let Some(&bad) = rows.iter().find(|&&r| r >= tokens) {
            return Err(FipsError::IndexOutOfRange {
                what: "repeated calibration row",
                index: bad,
                len: tokens,
            });
        }
        let added = rows
            .len()
            .checked_mul(extra)
            .ok_or_else(|| FipsError::InvalidParameter {
                name: "repeated rows",
                reason: format!("{} rows repeated {extra} times overflow", rows.len()),
            })?;
        // The copies are new values: bounded like generated inputs (targets included).
        let arrays = self.inputs.len() * if self.targets.is_some() { 2 } else { 1 };
        crate::math::limits::check_generated(arrays, added, self.width())?;
        let mut order = Vec::with_capacity(tokens + added);
        order.extend(0..tokens);
        for _ in 0..extra {
            order.extend_from_slice(rows);
        }
        let repeat = |arrays: Vec<Array2<F>>| -> Vec<Array2<F>> {
            arrays
                .into_iter()
                .map(|z| z.select(Axis(0), &order))
                .collect()
        };
        Ok(Self {
            inputs: repeat(self.inputs),
            targets: self.targets.map(repeat),
            data_free: self.data_free,
        })
    }

    /// The explicit targets, if [`Self::with_targets`] set them.
    pub fn targets(&self) -> Option<&[Array2<F>]> {
        self.targets.as_deref()
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
            targets: None,
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

    /// The inputs and the explicit targets, if any, taking the set apart.
    pub fn into_parts(self) -> (Vec<Array2<F>>, Option<Vec<Array2<F>>>) {
        (self.inputs, self.targets)
    }

    /// Whether the inputs are synthetic Gaussian noise rather than captured activations.
    pub fn is_data_free(&self) -> bool {
        self.data_free
    }

    /// The same inputs labelled data-free (rows read back from a data-free reader).
    pub(crate) fn labelled_data_free(self) -> Self {
        Self {
            data_free: true,
            ..self
        }
    }
}

/// Where a trainer reads calibration inputs from: held in memory ([`Calibration`]) or read a few
/// rows at a time from a file (`format::mlp_inputs::StreamedCalibration`).
///
/// Row `t` of every block is the same calibration token (a mini-batch draws the same token indices
/// for every block). Reads take `&self`: a file-backed reader uses positioned reads, no cursor.
pub trait CalibrationReader<F: Float>: std::fmt::Debug + Send + Sync {
    /// Number of blocks.
    fn blocks(&self) -> usize;

    /// Tokens per block.
    fn tokens(&self) -> usize;

    /// Width d.
    fn width(&self) -> usize;

    /// Whether the inputs are synthetic Gaussian noise rather than captured activations.
    fn is_data_free(&self) -> bool {
        false
    }

    /// Copies rows `indices` of block `block` into the first `indices.len()` rows of `dst`
    /// (`[≥ indices.len(), d]`). Errors: a block or token out of range, a wrong `dst`, an
    /// unreadable or non-finite row. Checks the request against the reader's shape, then reads
    /// it with [`Self::gather_valid`]; implement that one, not this.
    fn gather(&self, block: usize, indices: &[usize], dst: &mut Array2<F>) -> Result<()> {
        check_request(
            self,
            block,
            indices.iter().copied(),
            indices.len(),
            dst.dim(),
        )?;
        self.gather_valid(block, indices, dst)
    }

    /// Rows `start .. start + rows` of block `block`, `[rows, d]`. Checks the request against
    /// the reader's shape, then reads it with [`Self::rows_valid`]; implement that one, not this.
    fn rows(&self, block: usize, start: usize, rows: usize) -> Result<Array2<F>> {
        let end = check_rows(self, block, start, rows)?;
        self.rows_valid(block, start..end)
    }

    /// [`Self::gather`] of a request already checked: `block < blocks`, every index `< tokens`,
    /// `dst` at least `[indices.len(), d]`. Errors: an unreadable or non-finite row.
    fn gather_valid(&self, block: usize, indices: &[usize], dst: &mut Array2<F>) -> Result<()>;

    /// [`Self::rows`] of a request already checked: `block < blocks`, `range` within the tokens.
    /// Errors: an unreadable or non-finite row.
    fn rows_valid(&self, block: usize, range: Range<usize>) -> Result<Array2<F>>;

    /// The whole set, if it is held in memory: a trainer then computes every target once and
    /// keeps it, instead of recomputing each batch's targets from the dense blocks.
    fn in_memory(&self) -> Option<&Calibration<F>> {
        None
    }
}

/// Refuses a calibration with explicit targets ([`Calibration::with_targets`]) for `method`,
/// which fits the original blocks' own outputs in closed form (only the trained methods, FiPS and
/// trained SVD, reproduce given targets).
pub(crate) fn refuse_targets<F: Float>(
    reader: &dyn CalibrationReader<F>,
    method: &str,
) -> Result<()> {
    match reader.in_memory().and_then(Calibration::targets) {
        Some(_) => Err(FipsError::InvalidParameter {
            name: "targets",
            reason: format!(
                "{method} fits the original blocks' own outputs: explicit calibration targets \
                 are for the trained methods (FiPS, trained SVD)"
            ),
        }),
        None => Ok(()),
    }
}

/// Checks a gather or chunk request against a reader's shape: `block < blocks`, every index
/// `< tokens`, `dst` wide enough and tall enough.
fn check_request<F: Float, R: CalibrationReader<F> + ?Sized>(
    reader: &R,
    block: usize,
    indices: impl IntoIterator<Item = usize>,
    rows: usize,
    dst: (usize, usize),
) -> Result<()> {
    if block >= reader.blocks() {
        return Err(FipsError::IndexOutOfRange {
            what: "calibration block",
            index: block,
            len: reader.blocks(),
        });
    }
    if dst.1 != reader.width() || dst.0 < rows {
        return Err(FipsError::ShapeMismatch {
            what: "calibration batch buffer".into(),
            expected: vec![rows, reader.width()],
            got: vec![dst.0, dst.1],
        });
    }
    let tokens = reader.tokens();
    if let Some(bad) = indices.into_iter().find(|&t| t >= tokens) {
        return Err(FipsError::IndexOutOfRange {
            what: "calibration token",
            index: bad,
            len: tokens,
        });
    }
    Ok(())
}

/// Checks a request for rows `start .. start + rows` of block `block` and returns its end.
fn check_rows<F: Float, R: CalibrationReader<F> + ?Sized>(
    reader: &R,
    block: usize,
    start: usize,
    rows: usize,
) -> Result<usize> {
    let end = start
        .checked_add(rows)
        .filter(|&end| end <= reader.tokens())
        .ok_or(FipsError::IndexOutOfRange {
            what: "calibration token",
            index: start.saturating_add(rows),
            len: reader.tokens(),
        })?;
    check_request(reader, block, None, rows, (rows, reader.width()))?;
    Ok(end)
}

impl<F: Float> CalibrationReader<F> for Calibration<F> {
    fn blocks(&self) -> usize {
        self.inputs.len()
    }

    fn tokens(&self) -> usize {
        Calibration::tokens(self)
    }

    fn width(&self) -> usize {
        Calibration::width(self)
    }

    fn is_data_free(&self) -> bool {
        self.data_free
    }

    fn gather_valid(&self, block: usize, indices: &[usize], dst: &mut Array2<F>) -> Result<()> {
        gather_rows(self.inputs[block].view(), indices, dst);
        Ok(())
    }

    fn rows_valid(&self, block: usize, range: Range<usize>) -> Result<Array2<F>> {
        Ok(self.inputs[block].slice(s![range, ..]).to_owned())
    }

    fn in_memory(&self) -> Option<&Calibration<F>> {
        Some(self)
    }
}

/// Tokens per chunk when running a whole calibration set through a block.
pub(crate) const CHUNK_TOKENS: usize = 4096;

/// `mlp(z)` computed in chunks of [`CHUNK_TOKENS`] rows, so the `[tokens, I]` hidden state is never
/// held whole (one chunk per core at once with OpenBLAS on one thread, [`pass_workers`]).
pub(crate) fn forward_chunked<F: Float>(
    mlp: &DenseMlp<F>,
    z: ArrayView2<'_, F>,
) -> Result<Array2<F>> {
    let mut y = Array2::zeros((z.nrows(), mlp.width()));
    let mut out = y.axis_chunks_iter_mut(Axis(0), CHUNK_TOKENS);
    forward_each_chunk(mlp, z, |yhat| {
        if let Some(mut yc) = out.next() {
            yc.assign(&yhat);
        }
    })?;
    Ok(y)
}

/// `mlp` on every chunk of [`CHUNK_TOKENS`] rows of `z`, one chunk per core at once with OpenBLAS
/// on one thread ([`pass_workers`]); `each` gets the outputs in chunk order.
fn forward_each_chunk<F: Float>(
    mlp: &DenseMlp<F>,
    z: ArrayView2<'_, F>,
    mut each: impl FnMut(Array2<F>),
) -> Result<()> {
    map_in_rounds(
        z.axis_chunks_iter(Axis(0), CHUNK_TOKENS),
        pass_workers(),
        |zc| mlp.forward(zc),
        |yhat| {
            each(yhat);
            Ok(())
        },
    )
}

/// `(‖mlp(z) − y‖², ‖y‖²)` in `f64`, `mlp(z)` computed in chunks of [`CHUNK_TOKENS`] rows (no
/// `[tokens, I]` hidden state, no copy of `z` or `y`; one chunk per core at once with OpenBLAS on
/// one thread, [`pass_workers`], accumulated in chunk order: the same bits either way).
pub(crate) fn squared_error_chunked<F: Float>(
    mlp: &DenseMlp<F>,
    z: &Array2<F>,
    y: &Array2<F>,
) -> Result<(f64, f64)> {
    let (mut e, mut n) = (0.0f64, 0.0f64);
    let mut targets = y.axis_chunks_iter(Axis(0), CHUNK_TOKENS);
    forward_each_chunk(mlp, z.view(), |yhat| {
        if let Some(yc) = targets.next() {
            add_squared_error(&mut e, &mut n, yhat.view(), yc);
        }
    })?;
    Ok((e, n))
}

/// Adds `‖ŷ − y‖²` to `e` and `‖y‖²` to `n`, in `f64`, element by element in `ŷ`'s order (the one
/// accumulation of [`squared_error_chunked`] and [`squared_error_streamed`]).
fn add_squared_error<F: Float>(
    e: &mut f64,
    n: &mut f64,
    yhat: ArrayView2<'_, F>,
    y: ArrayView2<'_, F>,
) {
    ndarray::Zip::from(yhat).and(y).for_each(|&p, &t| {
        let (p, t) = (p.as_f64(), t.as_f64());
        *e += (p - t) * (p - t);
        *n += t * t;
    });
}

/// `(‖mlp(z) − original(z)‖², ‖original(z)‖²)` in `f64` over every token of block `block` of
/// `reader`, in chunks of [`CHUNK_TOKENS`] rows read one at a time: the targets `original(z)` are
/// computed per chunk and never held whole. The same chunks and the same order of operations as
/// [`squared_error_chunked`] on targets from [`forward_chunked`], so the same bits.
pub(crate) fn squared_error_streamed<F: Float>(
    mlp: &DenseMlp<F>,
    original: &DenseMlp<F>,
    reader: &dyn CalibrationReader<F>,
    block: usize,
) -> Result<(f64, f64)> {
    let (mut e, mut n) = (0.0f64, 0.0f64);
    let tokens = reader.tokens();
    let mut start = 0;
    while start < tokens {
        let rows = CHUNK_TOKENS.min(tokens - start);
        let zc = reader.rows(block, start, rows)?;
        let yc = original.forward(zc.view())?;
        let yhat = mlp.forward(zc.view())?;
        add_squared_error(&mut e, &mut n, yhat.view(), yc.view());
        start += rows;
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

    /// Repeated rows are appended, in order, `extra` times to inputs and targets alike; the
    /// original rows are untouched; a row past the set is a typed error.
    #[test]
    fn repeated_rows_are_appended_to_inputs_and_targets() {
        let z = Array2::from_shape_fn((5, 2), |(t, j)| (10 * t + j) as f64);
        let y = z.mapv(|v| -v);
        let cal = Calibration::new(vec![z.clone(), z.clone() + 1.0])
            .unwrap()
            .with_targets(vec![y.clone(), y.clone()])
            .unwrap();
        let out = cal.clone().with_repeated_rows(&[0, 3], 2).unwrap();
        assert_eq!(out.tokens(), 5 + 2 * 2);
        let order = [0, 1, 2, 3, 4, 0, 3, 0, 3];
        for (b, shift) in [(0, 0.0), (1, 1.0)] {
            assert_eq!(out.input(b).unwrap(), z.select(Axis(0), &order) + shift);
            assert_eq!(out.targets().unwrap()[b], y.select(Axis(0), &order));
        }
        assert_eq!(cal.clone().with_repeated_rows(&[2], 0).unwrap().tokens(), 5);
        // Counts that would overflow or ask for more than the generated-values bound are
        // typed errors before anything is allocated.
        for extra in [usize::MAX / 2, 1 << 28] {
            assert!(matches!(
                cal.clone().with_repeated_rows(&[0, 1], extra),
                Err(FipsError::InvalidParameter { .. })
            ));
        }
        assert!(matches!(
            cal.with_repeated_rows(&[5], 1),
            Err(FipsError::IndexOutOfRange {
                index: 5,
                len: 5,
                ..
            })
        ));
    }

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
    fn explicit_targets_are_checked_and_kept() {
        let z = Array2::from_shape_fn((4, 3), |(i, j)| (i + j) as f64);
        let calibration = Calibration::new(vec![z.clone(), z.clone()]).unwrap();
        assert!(calibration.targets().is_none());
        let shape = |r: Result<Calibration<f64>>| matches!(r, Err(FipsError::ShapeMismatch { .. }));
        assert!(shape(calibration.clone().with_targets(vec![z.clone()])));
        assert!(shape(
            calibration
                .clone()
                .with_targets(vec![z.clone(), Array2::zeros((4, 2))])
        ));
        let mut bad = z.clone();
        bad[[1, 1]] = f64::NAN;
        assert!(matches!(
            calibration.clone().with_targets(vec![z.clone(), bad]),
            Err(FipsError::NonFinite { .. })
        ));
        let given = calibration
            .clone()
            .with_targets(vec![-z.clone(), 2.0 * &z])
            .unwrap();
        assert_eq!(given.targets().unwrap(), &[-z.clone(), 2.0 * &z][..]);
        assert_eq!(given.inputs(), calibration.inputs());
        assert!(refuse_targets(&calibration, "m").is_ok());
        assert!(matches!(
            refuse_targets(&given, "m"),
            Err(FipsError::InvalidParameter {
                name: "targets",
                ..
            })
        ));
    }

    /// The in-memory reader gives the held rows and checks its requests.
    #[test]
    fn in_memory_reader_reads_the_held_rows_and_checks_requests() {
        let z = Array2::from_shape_fn((7, 3), |(i, j)| (i * 3 + j) as f64);
        let calibration = Calibration::new(vec![z.clone(), -z.clone()]).unwrap();
        let reader: &dyn CalibrationReader<f64> = &calibration;
        assert!(reader.in_memory().is_some());
        assert_eq!(
            (reader.blocks(), reader.tokens(), reader.width()),
            (2, 7, 3)
        );
        assert_eq!(
            reader.rows(1, 2, 3).unwrap(),
            -z.slice(s![2..5, ..]).to_owned()
        );
        let mut dst = Array2::zeros((3, 3));
        reader.gather(0, &[6, 1], &mut dst).unwrap();
        assert_eq!(dst.row(0), z.row(6));
        assert_eq!(dst.row(1), z.row(1));
        assert!(matches!(
            reader.gather(0, &[7], &mut dst),
            Err(FipsError::IndexOutOfRange { .. })
        ));
        assert!(matches!(
            reader.gather(2, &[0], &mut dst),
            Err(FipsError::IndexOutOfRange { .. })
        ));
        assert!(matches!(
            reader.gather(0, &[0, 1, 2, 3], &mut dst),
            Err(FipsError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            reader.rows(0, 5, 3),
            Err(FipsError::IndexOutOfRange { .. })
        ));
        assert_eq!(reader.rows(0, 7, 0).unwrap().nrows(), 0);
        assert!(reader.rows(0, 8, 0).is_err());
        assert!(reader.rows(0, usize::MAX, 2).is_err());
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
