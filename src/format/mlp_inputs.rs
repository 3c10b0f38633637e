//! MLP-input files: calibration activations handed over from another framework, or dumped by fips.
//!
//! A safetensors file with one 2-D tensor per block, named `blocks.{b}.mlp_input`, of shape
//! `[tokens, d]` (`F32`, `F16`, `BF16` or `F64`): the input of block `b`'s MLP for each
//! calibration token (for a ViT, the output of `norm2`; for Llama, of `post_attention_layernorm`).
//! Row `t` of every block must come from the same calibration token. The header's metadata carries
//! `format = "fips-mlp-inputs"` and `version = "1"`; other keys are free.
//!
//! From PyTorch, register a forward pre-hook on each MLP module that appends its input (flattened
//! to `[tokens, d]`), then `safetensors.torch.save_file({f"blocks.{b}.mlp_input": x, …},
//! path, metadata={"format": "fips-mlp-inputs", "version": "1"})`.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;

use ndarray::{Array2, ArrayView2};
use safetensors::Dtype;

use crate::format::checkpoint::{
    Checkpoint, TensorData, decode_floats_into, float_bytes, write_safetensors,
};
use crate::foundation::error::{FipsError, Result};
use crate::foundation::float::{Float, ensure_finite};
use crate::math::calibration::{Calibration, CalibrationReader};

/// The `format` metadata value of an MLP-input file.
pub const MLP_INPUTS_FORMAT: &str = "fips-mlp-inputs";

/// The tensor name of block `b`'s MLP inputs.
pub fn mlp_input_name(block: usize) -> String {
    format!("blocks.{block}.mlp_input")
}

/// Writes the MLP inputs of the given blocks (`(block index, [tokens, d])`) in `dtype`, atomically.
pub fn write_mlp_inputs<F: Float>(
    path: impl AsRef<Path>,
    inputs: &[(usize, ArrayView2<'_, F>)],
    dtype: Dtype,
    mut metadata: HashMap<String, String>,
) -> Result<()> {
    let mut tensors = BTreeMap::new();
    for (b, z) in inputs {
        let data = TensorData::from_floats(z.iter().copied(), z.shape().to_vec(), dtype)?;
        if tensors.insert(mlp_input_name(*b), data).is_some() {
            return Err(FipsError::InvalidParameter {
                name: "inputs",
                reason: format!("block {b} is given twice"),
            });
        }
    }
    metadata.insert("format".into(), MLP_INPUTS_FORMAT.into());
    metadata.insert("version".into(), "1".into());
    write_safetensors(path, &tensors, metadata)
}

/// The memory a group's calibration may take, by default, to be read whole from an MLP-input
/// file: 1 GiB. Small models' groups fit (DeiT-tiny, 4 blocks × 49,250 tokens × 192: 303 MB;
/// stories260k, 4 × 121,237 × 64: 248 MB) and keep the faster in-memory trainer (targets
/// computed once); a 7B group (4 blocks, d 4096) fits at most 8,192 tokens, so a real 7B
/// calibration (45k tokens: 5.5 GiB) streams. Any machine that trains a group spares 1 GiB.
pub const DEFAULT_CALIBRATION_MEMORY: u64 = 1 << 30;

/// How a group's calibration is taken from an MLP-input file (both give the same bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalibrationRoute {
    /// Read whole: inputs and targets held in memory, `8 n T d` bytes (fastest).
    Whole,
    /// Streamed a batch and a chunk at a time ([`MlpInputs::stream`]): memory independent of `T`,
    /// but each batch's targets are recomputed by the dense blocks.
    Stream,
}

impl CalibrationRoute {
    /// The bytes a group of `blocks` blocks, `tokens` tokens and width `width` takes held whole
    /// in f32, inputs and targets: `8 n T d`; `None` when that overflows `u64`.
    pub fn whole_bytes(blocks: usize, tokens: usize, width: usize) -> Option<u64> {
        [blocks, tokens, width]
            .into_iter()
            .try_fold(8u64, |acc, x| acc.checked_mul(u64::try_from(x).ok()?))
    }

    /// [`Self::Whole`] when [`Self::whole_bytes`] is at most `budget` bytes; [`Self::Stream`]
    /// when it is larger, overflows, or `budget` is 0 (0 always streams). Nothing is read or
    /// allocated to decide.
    pub fn choose(blocks: usize, tokens: usize, width: usize, budget: u64) -> Self {
        match Self::whole_bytes(blocks, tokens, width) {
            Some(bytes) if budget > 0 && bytes <= budget => Self::Whole,
            _ => Self::Stream,
        }
    }
}

/// An open MLP-input file, with the memory budget that decides whether a group's calibration is
/// read whole or streamed ([`MlpInputs::route`]).
#[derive(Debug)]
pub struct MlpInputs {
    file: Checkpoint,
    shapes: BTreeMap<usize, (usize, usize)>,
    memory_budget: u64,
}

impl MlpInputs {
    /// Opens and checks a file: every tensor must be a 2-D `blocks.{b}.mlp_input`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let file = Checkpoint::open(path)?;
        let format = |reason: String| FipsError::Format {
            path: file.path().to_path_buf(),
            reason,
        };
        let mut shapes = BTreeMap::new();
        for info in file.tensors() {
            // Only the canonical spelling: `blocks.01.mlp_input` would shadow `blocks.1.mlp_input`.
            let block = info
                .name
                .strip_prefix("blocks.")
                .and_then(|rest| rest.strip_suffix(".mlp_input"))
                .and_then(|b| b.parse::<usize>().ok().filter(|n| n.to_string() == b))
                .ok_or_else(|| {
                    format(format!(
                        "unexpected tensor {:?}: an MLP-input file holds only blocks.{{b}}.mlp_input",
                        info.name
                    ))
                })?;
            let &[tokens, d] = info.shape.as_slice() else {
                return Err(format(format!(
                    "tensor {:?} has shape {:?}, expected [tokens, d]",
                    info.name, info.shape
                )));
            };
            if !matches!(
                info.dtype,
                Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64
            ) {
                return Err(format(format!(
                    "tensor {:?} has dtype {:?}, expected F32, F16, BF16 or F64",
                    info.name, info.dtype
                )));
            }
            if tokens == 0 || d == 0 {
                return Err(format(format!(
                    "tensor {:?} is empty: shape {:?}",
                    info.name, info.shape
                )));
            }
            shapes.insert(block, (tokens, d));
        }
        if shapes.is_empty() {
            return Err(format("no blocks.{b}.mlp_input tensors".into()));
        }
        if let Some(f) = file.metadata().get("format")
            && f != MLP_INPUTS_FORMAT
        {
            return Err(format(format!(
                "format is {f:?}, expected {MLP_INPUTS_FORMAT:?}"
            )));
        }
        Ok(Self {
            file,
            shapes,
            memory_budget: DEFAULT_CALIBRATION_MEMORY,
        })
    }

    /// The same file with another memory budget in bytes (default
    /// [`DEFAULT_CALIBRATION_MEMORY`]; 0 always streams). It changes only the route, never the
    /// bits.
    pub fn with_memory_budget(mut self, bytes: u64) -> Self {
        self.memory_budget = bytes;
        self
    }

    /// The memory budget in bytes.
    pub fn memory_budget(&self) -> u64 {
        self.memory_budget
    }

    /// How the calibration of `blocks` is taken ([`CalibrationRoute::choose`] on the budget),
    /// from the header alone; the largest token count and width among `blocks` bound the
    /// estimate. A block missing from the file streams (the stream reports it as an error).
    pub fn route(&self, blocks: &[usize]) -> CalibrationRoute {
        let mut bound = Some((0, 0));
        for &b in blocks {
            bound = match (bound, self.shape(b)) {
                (Some((t0, d0)), Some((t, d))) => Some((t0.max(t), d0.max(d))),
                _ => None,
            };
        }
        match bound {
            Some((tokens, width)) => {
                CalibrationRoute::choose(blocks.len(), tokens, width, self.memory_budget)
            }
            None => CalibrationRoute::Stream,
        }
    }

    /// The block indices present, ascending.
    pub fn blocks(&self) -> Vec<usize> {
        self.shapes.keys().copied().collect()
    }

    /// `(tokens, d)` of a block, if present.
    pub fn shape(&self, block: usize) -> Option<(usize, usize)> {
        self.shapes.get(&block).copied()
    }

    /// Checks, before any work, that every block of `groups` is in the file with the model's width
    /// (`shapes[b].0`, as `(d, I)` per block) and that all of them have the same number of tokens
    /// (row `t` of every block is the same calibration token). Nothing is read but the header.
    pub fn check_groups(&self, groups: &[Vec<usize>], shapes: &[(usize, usize)]) -> Result<()> {
        let mut tokens: Option<(usize, usize)> = None;
        for &b in groups.iter().flatten() {
            let (t, d) = self.shape(b).ok_or_else(|| FipsError::MissingTensor {
                path: self.file.path().to_path_buf(),
                name: mlp_input_name(b),
            })?;
            let width = shapes
                .get(b)
                .map(|s| s.0)
                .ok_or(FipsError::IndexOutOfRange {
                    what: "block",
                    index: b,
                    len: shapes.len(),
                })?;
            if d != width {
                return Err(FipsError::ShapeMismatch {
                    what: format!("{} in {}", mlp_input_name(b), self.file.path().display()),
                    expected: vec![t, width],
                    got: vec![t, d],
                });
            }
            match tokens {
                Some((first, t0)) if t0 != t => {
                    return Err(FipsError::Format {
                        path: self.file.path().to_path_buf(),
                        reason: format!(
                            "block {b} has {t} tokens, block {first} has {t0}: every block must hold the same calibration tokens"
                        ),
                    });
                }
                None => tokens = Some((b, t)),
                _ => {}
            }
        }
        Ok(())
    }

    /// The file's metadata.
    pub fn metadata(&self) -> &HashMap<String, String> {
        self.file.metadata()
    }

    /// Block `b`'s inputs `[tokens, d]`.
    pub fn read<F: Float>(&self, block: usize) -> Result<Array2<F>> {
        self.file.read_matrix(&mlp_input_name(block))
    }

    /// The calibration of a group: the inputs of `blocks`, which must all be present with one
    /// token count.
    pub fn calibration<F: Float>(&self, blocks: &[usize]) -> Result<Calibration<F>> {
        let inputs = blocks
            .iter()
            .map(|&b| self.read(b))
            .collect::<Result<Vec<_>>>()?;
        Calibration::new(inputs)
    }
}

impl MlpInputs {
    /// The calibration of a group read from the file a few rows at a time (positioned reads):
    /// the inputs of `blocks`, which must all be present with one shape. Only the header is read
    /// here; see [`StreamedCalibration`].
    pub fn stream(&self, blocks: &[usize]) -> Result<StreamedCalibration<'_>> {
        let path = self.file.path();
        let format = |reason: String| FipsError::Format {
            path: path.to_path_buf(),
            reason,
        };
        let Some(&first) = blocks.first() else {
            return Err(FipsError::EmptyCalibration {
                reason: "no blocks were given".into(),
            });
        };
        let shape_of = |b: usize| {
            self.shape(b).ok_or_else(|| FipsError::MissingTensor {
                path: path.to_path_buf(),
                name: mlp_input_name(b),
            })
        };
        let (tokens, width) = shape_of(first)?;
        let len = self.file.current_len()?;
        let mut extents = Vec::with_capacity(blocks.len());
        let mut end_max = 0u64;
        for &b in blocks {
            let name = mlp_input_name(b);
            let (t, d) = shape_of(b)?;
            if (t, d) != (tokens, width) {
                return Err(FipsError::ShapeMismatch {
                    what: format!("{name} in {}", path.display()),
                    expected: vec![tokens, width],
                    got: vec![t, d],
                });
            }
            let dtype = self.file.info(&name)?.dtype;
            let size = float_bytes(dtype).map(|s| s as u64).ok_or_else(|| {
                format(format!(
                    "tensor {name:?} has dtype {dtype:?}, expected a float"
                ))
            })?;
            let (begin, end) = self.file.tensor_range(&name)?;
            let expected = (tokens as u64)
                .checked_mul(width as u64)
                .and_then(|e| e.checked_mul(size));
            if expected != Some(end - begin) || end > len {
                return Err(format(format!(
                    "tensor {name:?} of shape [{tokens}, {width}] {dtype:?} spans bytes {begin}..{end} of a {len}-byte file"
                )));
            }
            end_max = end_max.max(end);
            extents.push(BlockExtent {
                id: b,
                begin,
                dtype,
                size,
            });
        }
        Ok(StreamedCalibration {
            file: &self.file,
            extents,
            tokens,
            width,
            end: end_max,
        })
    }
}

/// Where one block's `[tokens, d]` inputs lie in the file.
#[derive(Debug, Clone, Copy)]
struct BlockExtent {
    /// The block's index in the file.
    id: usize,
    /// Absolute offset of row 0.
    begin: u64,
    dtype: Dtype,
    /// Bytes per element.
    size: u64,
}

/// The calibration inputs of a group read from an MLP-input file on demand: a trainer given this
/// [`CalibrationReader`] reads each mini-batch's rows (one positioned read per row and block) and
/// each evaluation chunk (one read per chunk), and recomputes each batch's targets from the dense
/// blocks, so the calibration is never held whole: memory for it is a batch and a chunk, not
/// `n T d`.
///
/// Every read is checked before anything is allocated: the block and token indices against the
/// header's shape, and the file's current length against the tensors' extents (a file truncated
/// after it was opened is a typed error, not a short read). Values are checked to be finite as
/// they are read.
#[derive(Debug)]
pub struct StreamedCalibration<'f> {
    file: &'f Checkpoint,
    extents: Vec<BlockExtent>,
    tokens: usize,
    width: usize,
    /// The largest end of the blocks' extents.
    end: u64,
}

impl StreamedCalibration<'_> {
    /// Checks that the file still holds every block's bytes.
    fn check_len(&self) -> Result<()> {
        let len = self.file.current_len()?;
        if len < self.end {
            return Err(FipsError::Format {
                path: self.file.path().to_path_buf(),
                reason: format!(
                    "the file shrank to {len} bytes since it was opened; its tensors need {}",
                    self.end
                ),
            });
        }
        Ok(())
    }

    fn row_bytes(&self, e: &BlockExtent) -> u64 {
        self.width as u64 * e.size
    }

    fn what(&self, block: usize) -> impl FnOnce() -> String + '_ {
        move || {
            format!(
                "calibration inputs of block {block} in {}",
                self.file.path().display()
            )
        }
    }
}

impl<F: Float> CalibrationReader<F> for StreamedCalibration<'_> {
    fn blocks(&self) -> usize {
        self.extents.len()
    }

    fn tokens(&self) -> usize {
        self.tokens
    }

    fn width(&self) -> usize {
        self.width
    }

    fn gather_valid(&self, block: usize, indices: &[usize], dst: &mut Array2<F>) -> Result<()> {
        self.check_len()?;
        let e = self.extents[block];
        let name = mlp_input_name(e.id);
        let mut bytes = vec![0u8; self.row_bytes(&e) as usize];
        let mut row = vec![F::zero(); self.width];
        for (k, &t) in indices.iter().enumerate() {
            self.file
                .read_at(e.begin + t as u64 * self.row_bytes(&e), &mut bytes)?;
            decode_floats_into(&name, e.dtype, &bytes, &mut row)?;
            for (o, &v) in dst.row_mut(k).iter_mut().zip(&row) {
                *o = v;
            }
        }
        ensure_finite(
            &dst.slice(crate::foundation::slicing::s![..indices.len(), ..]),
            self.what(e.id),
        )
    }

    fn rows_valid(&self, block: usize, range: Range<usize>) -> Result<Array2<F>> {
        let (start, rows) = (range.start, range.len());
        self.check_len()?;
        let e = self.extents[block];
        let mut bytes = vec![0u8; rows * self.row_bytes(&e) as usize];
        self.file
            .read_at(e.begin + start as u64 * self.row_bytes(&e), &mut bytes)?;
        let mut out = Array2::zeros((rows, self.width));
        let slice = out
            .as_slice_mut()
            .ok_or_else(|| FipsError::Numerical("a fresh array is not contiguous".into()))?;
        decode_floats_into(&mlp_input_name(e.id), e.dtype, &bytes, slice)?;
        ensure_finite(&out, self.what(e.id))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let dir = std::env::temp_dir().join(format!("fips-acts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("acts.safetensors");
        let z0 = Array2::from_shape_fn((5, 3), |(i, j)| (i * 3 + j) as f32 * 0.5);
        let z2 = z0.mapv(|x| -x);
        write_mlp_inputs(
            &path,
            &[(0, z0.view()), (2, z2.view())],
            Dtype::F32,
            HashMap::new(),
        )
        .unwrap();
        let file = MlpInputs::open(&path).unwrap();
        assert_eq!(file.blocks(), vec![0, 2]);
        assert_eq!(file.shape(2), Some((5, 3)));
        assert_eq!(file.read::<f32>(2).unwrap(), z2);
        let calib = file.calibration::<f64>(&[0, 2]).unwrap();
        assert_eq!(calib.blocks(), 2);
        assert!(matches!(
            file.calibration::<f32>(&[1]),
            Err(FipsError::MissingTensor { .. })
        ));
        assert!(
            write_mlp_inputs(
                &path,
                &[(0, z0.view()), (0, z0.view())],
                Dtype::F32,
                HashMap::new()
            )
            .is_err()
        );
        // A file with other tensors is not an MLP-input file.
        let other = dir.join("other.safetensors");
        let t = BTreeMap::from([(
            "weight".to_string(),
            TensorData::from_floats([1.0f32], vec![1, 1], Dtype::F32).unwrap(),
        )]);
        write_safetensors(&other, &t, HashMap::new()).unwrap();
        assert!(matches!(
            MlpInputs::open(&other),
            Err(FipsError::Format { .. })
        ));
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn the_route_reads_whole_what_fits_the_budget() {
        use CalibrationRoute::{Stream, Whole};
        let (n, t, d) = (4usize, 49_250usize, 192usize);
        let bytes = 8 * (n as u64) * (t as u64) * (d as u64);
        assert_eq!(CalibrationRoute::whole_bytes(n, t, d), Some(bytes));
        assert_eq!(CalibrationRoute::choose(n, t, d, bytes - 1), Stream);
        assert_eq!(CalibrationRoute::choose(n, t, d, bytes), Whole);
        assert_eq!(CalibrationRoute::choose(n, t, d, bytes + 1), Whole);
        assert_eq!(CalibrationRoute::choose(n, t, d, 0), Stream);
        assert_eq!(CalibrationRoute::choose(1, 1, 1, 0), Stream);
        assert_eq!(CalibrationRoute::choose(1, 1, 1, 8), Whole);
        // 8 n T d past u64: streamed, never a wrapped small number.
        let big = usize::MAX;
        assert_eq!(CalibrationRoute::whole_bytes(big, 2, 1), None);
        assert_eq!(
            CalibrationRoute::whole_bytes(1 << 20, 1 << 20, 1 << 21),
            None
        );
        assert_eq!(CalibrationRoute::choose(big, 2, 1, u64::MAX), Stream);
        assert_eq!(
            CalibrationRoute::choose(1 << 20, 1 << 20, 1 << 21, u64::MAX),
            Stream
        );
        // A 7B group (4 blocks, d 4096) at the default budget: whole up to 8,192 tokens (exactly
        // 1 GiB), streamed above and at 45k tokens; DeiT-tiny's group: whole.
        let llama = |t| CalibrationRoute::choose(4, t, 4096, DEFAULT_CALIBRATION_MEMORY);
        assert_eq!(llama(8192), Whole);
        assert_eq!(llama(8193), Stream);
        assert_eq!(llama(45_000), Stream);
        assert_eq!(
            CalibrationRoute::choose(n, t, d, DEFAULT_CALIBRATION_MEMORY),
            Whole
        );

        // From a file's header: the budget the file carries decides.
        let dir = std::env::temp_dir().join(format!("fips-route-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("acts.safetensors");
        let z = Array2::from_shape_fn((5, 3), |(i, j)| (i + j) as f32);
        write_mlp_inputs(
            &path,
            &[(0, z.view()), (1, z.view())],
            Dtype::F32,
            HashMap::new(),
        )
        .unwrap();
        let file = MlpInputs::open(&path).unwrap();
        assert_eq!(file.memory_budget(), DEFAULT_CALIBRATION_MEMORY);
        assert_eq!(file.route(&[0, 1]), Whole);
        let file = file.with_memory_budget(8 * 2 * 5 * 3 - 1);
        assert_eq!(file.route(&[0, 1]), Stream);
        assert_eq!(file.route(&[0]), Whole);
        assert_eq!(file.route(&[0, 7]), Stream, "a missing block streams");
        assert_eq!(file.with_memory_budget(0).route(&[0]), Stream);
        std::fs::remove_dir_all(dir).ok();
    }
}
