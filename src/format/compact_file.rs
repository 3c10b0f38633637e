//! The compact compressed-model file, format version 3 (see `docs/format.md` for the byte-level
//! specification and a reader in Python).
//!
//! A safetensors file whose header metadata holds `fips.format_version = "3"` and a JSON
//! [`ManifestV2`] under `fips.manifest`. Every stored value (the shared basis `U`, the kept values
//! of every sparse factor, biases, the low-rank and collapsed forms' factors) is in the source
//! checkpoint's own dtype (`F32`, `F16` or `BF16`); each sparse factor's pattern is in its smallest
//! exact encoding ([`crate::repr::compact`]). Tensor names follow fixed conventions (never read from the
//! manifest), so no name in a file can point at another block's data:
//!
//! | tensor | dtype | shape |
//! |---|---|---|
//! | `group.{g}.basis` | group dtype | `[d, r]` |
//! | `group.{g}.matrix.{j}.values` | group dtype | `[nnz]` |
//! | `group.{g}.matrix.{j}.mask` (bitmask) | `U8` | `[rows · ⌈cols/8⌉]` |
//! | `group.{g}.matrix.{j}.counts`, `.gaps` (row-gaps) | `U32`, `U16` | `[rows]`, `[nnz]` |
//! | `group.{g}.matrix.{j}.bias` (when stored) | group dtype | `[out]` |
//! | `group.{g}.basis.{u}`, `group.{g}.matrix.{j}.left` (low rank) | group dtype | `[k, in]`, `[out, k]` |
//! | `group.{g}.block.{b}.weight` or `.left`/`.right`, `.bias` (collapsed) | group dtype | |
//!
//! where matrix `j` of a shared-basis group stores `S_j = V_jᵀ` (`I × r`) for up projections and
//! `S_j = V_j` (`r × I`) for down projections ([`crate::repr::sparse_mlp`]).
//!
//! An **MLP-only** file holds just these; biases equal (bit for bit, in the source dtype) to the
//! original checkpoint's are not stored but marked `original`. A **self-contained** file also
//! holds every tensor of the original checkpoint that compression leaves in use, copied under its
//! own name, so it loads without the original.
//!
//! Reading checks every count, shape, dtype and name of the manifest against the file's tensors
//! (whose byte ranges the safetensors header validation has checked against the file's length)
//! before reading or allocating anything sized by them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2, ArrayD, ArrayView2};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::format::checkpoint::{Checkpoint, TensorData, TensorSource, write_safetensors_from};
use crate::format::compressed::{
    COMPRESSED_FORMAT, CompressedModel, GroupManifest, MANIFEST_KEY, insert_rebuilt,
};
use crate::foundation::activation::Activation;
use crate::foundation::error::{FipsError, Result};
use crate::foundation::mlp::{MatrixRole, MlpKind};
use crate::repr::CompressedBlocks;
use crate::repr::collapsed::{CollapsedBlock, CollapsedGroup, CollapsedMap};
use crate::repr::compact::{
    CompactMatrix, PatternEncoding, SparsePattern, StorageDtype, StorageFloat,
};
use crate::repr::low_rank::{LowRankGroup, LowRankMatrix};
use crate::repr::shared_basis::CompressedGroup;
use crate::repr::sparse_mlp::{CompactGroup, ForwardBuffers};

/// The header metadata key holding the format version (`"3"`).
pub const FORMAT_VERSION_KEY: &str = "fips.format_version";
/// The version this module writes and reads.
pub const FORMAT_VERSION: u32 = 3;
/// Prefix of every tensor the format defines (original tensors may not use it).
pub const INTERNAL_PREFIX: &str = "group.";

/// What a version-3 file holds and how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestV2 {
    /// Always `fips-compressed`.
    pub format: String,
    /// Always 2.
    pub format_version: u32,
    /// Version of the crate that wrote the file.
    pub crate_version: String,
    /// Compression method.
    pub method: String,
    /// The method's parameters.
    pub parameters: serde_json::Value,
    /// The checkpoint that was compressed.
    pub source: Option<String>,
    /// Its MLP naming scheme.
    pub scheme: Option<String>,
    /// Whether the calibration data was synthetic.
    pub data_free: bool,
    /// Whether the file holds every tensor of the model (else only the compressed MLPs).
    pub self_contained: bool,
    /// The BLAS thread count the factors were computed with (absent: the backend's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blas_threads: Option<usize>,
    /// The end-to-end distillation the groups went through after their block-wise fits
    /// (absent: none; informative, no reader needs it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distillation: Option<serde_json::Value>,
    /// One entry per group.
    pub groups: Vec<GroupV2>,
}

/// One compressed group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupV2 {
    /// The blocks of the group, in order.
    pub blocks: Vec<usize>,
    /// `shared-basis`, `low-rank` or `collapsed`.
    pub representation: String,
    /// `standard` or `gated`.
    pub kind: String,
    /// The activation's name.
    pub activation: String,
    /// Width d.
    pub width: usize,
    /// MLP width I.
    pub intermediate: usize,
    /// Dtype of every stored value of the group (`F32`, `F16`, `BF16`).
    pub dtype: String,
    /// Rank r of the shared basis (`shared-basis`; else 0).
    pub rank: usize,
    /// `{"bases": [u | null per matrix]}` for `low-rank`, `{"slopes", "converged", "factored"}`
    /// for `collapsed`, `null` otherwise.
    pub structure: serde_json::Value,
    /// Every matrix of the group, module order.
    pub matrices: Vec<MatrixV2>,
}

/// One original matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatrixV2 {
    /// Its block.
    pub block: usize,
    /// Its role (`fc1`, `fc2`, `gate`, `up`, `down`).
    pub role: String,
    /// The weight's tensor name in the original checkpoint.
    pub weight: String,
    /// Its original shape `[out, in]`.
    pub shape: Vec<usize>,
    /// Its original dtype.
    pub dtype: String,
    /// The bias's tensor name in the original checkpoint, if it has one.
    pub bias: Option<String>,
    /// Where the compressed form's bias is: `none`, `stored` (`group.{g}.matrix.{j}.bias`) or
    /// `original` (the original tensor `bias`, unchanged).
    pub bias_source: String,
    /// The sparse factor (`shared-basis` only).
    pub factor: Option<FactorV2>,
}

/// One sparse factor `S_j`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FactorV2 {
    /// Rows (`I` for up projections, `r` for down projections).
    pub rows: usize,
    /// Columns (`r` for up projections, `I` for down projections).
    pub cols: usize,
    /// Kept entries.
    pub nnz: usize,
    /// `full`, `bitmask` or `row-gaps`.
    pub encoding: String,
}

/// A shared-basis group in one of the storage types.
#[derive(Debug, Clone, PartialEq)]
pub enum AnyCompactGroup {
    /// `f32` storage.
    F32(CompactGroup<f32>),
    /// `f16` storage.
    F16(CompactGroup<half::f16>),
    /// `bf16` storage.
    Bf16(CompactGroup<half::bf16>),
}

macro_rules! each {
    ($self:expr, $g:ident => $body:expr) => {
        match $self {
            AnyCompactGroup::F32($g) => $body,
            AnyCompactGroup::F16($g) => $body,
            AnyCompactGroup::Bf16($g) => $body,
        }
    };
}

impl AnyCompactGroup {
    /// The compact form of `group` stored as `dtype`.
    pub fn from_group(group: &CompressedGroup<f32>, dtype: StorageDtype) -> Result<Self> {
        Ok(match dtype {
            StorageDtype::F32 => Self::F32(CompactGroup::from_group(group)?),
            StorageDtype::F16 => Self::F16(CompactGroup::from_group(group)?),
            StorageDtype::Bf16 => Self::Bf16(CompactGroup::from_group(group)?),
        })
    }

    /// The storage dtype.
    pub fn dtype(&self) -> StorageDtype {
        match self {
            Self::F32(_) => StorageDtype::F32,
            Self::F16(_) => StorageDtype::F16,
            Self::Bf16(_) => StorageDtype::Bf16,
        }
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        each!(self, g => g.blocks())
    }

    /// Width d.
    pub fn width(&self) -> usize {
        each!(self, g => g.width())
    }

    /// Rank r of the shared basis.
    pub fn rank(&self) -> usize {
        each!(self, g => g.rank())
    }

    /// Bytes of the stored form.
    pub fn stored_bytes(&self) -> usize {
        each!(self, g => g.stored_bytes())
    }

    /// Block `block`'s output for `x` (`[tokens, d]`), from the compact form.
    pub fn forward(&self, block: usize, x: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        each!(self, g => g.forward(block, x))
    }

    /// Sparse factors held in the tiled layout (see [`CompactGroup::tiled_factor_count`]).
    pub fn tiled_factor_count(&self) -> usize {
        each!(self, g => g.tiled_factor_count())
    }

    /// Sparse factors.
    pub fn factor_count(&self) -> usize {
        each!(self, g => g.factor_count())
    }

    /// [`AnyCompactGroup::forward`] reusing `buffers` (see [`CompactGroup::forward_with`]).
    pub fn forward_with(
        &self,
        block: usize,
        x: ArrayView2<'_, f32>,
        buffers: &mut ForwardBuffers,
    ) -> Result<Array2<f32>> {
        each!(self, g => g.forward_with(block, x, buffers))
    }

    /// The group widened to `f32` (exact).
    pub fn to_group(&self) -> Result<CompressedGroup<f32>> {
        each!(self, g => g.to_group())
    }

    /// Stored weight parameters of block `block`: the kept entries of its factors, plus the
    /// basis (`d·r`) on block 0 (so that a sum over the blocks counts it once).
    pub fn block_weight_count(&self, block: usize) -> usize {
        each!(self, g => {
            let f = g.kind().matrices_per_block();
            let factors: usize = (block * f..(block + 1) * f)
                .filter_map(|j| g.factor_shape(j))
                .map(|(_, _, nnz)| nnz)
                .sum();
            factors + if block == 0 { g.basis().len() } else { 0 }
        })
    }

    /// Stored bias parameters of block `block`.
    pub fn block_bias_count(&self, block: usize) -> usize {
        each!(self, g => {
            let f = g.kind().matrices_per_block();
            g.biases()
                .iter()
                .skip(block * f)
                .take(f)
                .flatten()
                .map(Vec::len)
                .sum()
        })
    }

    /// Uses at most `threads` threads.
    pub fn with_threads(self, threads: usize) -> Self {
        match self {
            Self::F32(g) => Self::F32(g.with_threads(threads)),
            Self::F16(g) => Self::F16(g.with_threads(threads)),
            Self::Bf16(g) => Self::Bf16(g.with_threads(threads)),
        }
    }
}

/// One group of a compact model.
#[derive(Debug, Clone, PartialEq)]
pub enum CompactBlocks {
    /// FiPS, in compact form.
    SharedBasis(AnyCompactGroup),
    /// Low-rank or collapsed, values held in `f32` (exactly the stored source-dtype values).
    Other(CompressedBlocks<f32>),
}

/// A dense layer: weight `[out, in]` and optional bias.
pub type DenseLayer = (Array2<f32>, Option<Array1<f32>>);

impl CompactBlocks {
    /// Block `block` rebuilt as a dense MLP of the original architecture (exact).
    pub fn to_dense_mlp(&self, block: usize) -> Result<crate::foundation::mlp::DenseMlp<f32>> {
        match self {
            Self::SharedBasis(g) => g.to_group()?.to_dense_mlp(block),
            Self::Other(g) => g.to_dense_mlp(block),
        }
    }

    /// Block `block` rebuilt as dense layers in module order.
    pub fn dense_layers(&self, block: usize) -> Result<Vec<DenseLayer>> {
        let mlp = match self {
            Self::SharedBasis(g) => g.to_group()?.to_dense_mlp(block)?,
            Self::Other(g) => g.to_dense_mlp(block)?,
        };
        Ok(mlp
            .layers()
            .iter()
            .map(|l| (l.weight().clone(), l.bias().cloned()))
            .collect())
    }
}

/// A compressed model in format 2: manifest and groups.
#[derive(Debug, Clone, PartialEq)]
pub struct CompactModel {
    /// What the file holds.
    pub manifest: ManifestV2,
    /// The groups, in manifest order.
    pub groups: Vec<CompactBlocks>,
}

fn matrix_name(g: usize, j: usize, part: &str) -> String {
    format!("group.{g}.matrix.{j}.{part}")
}

fn group_name(g: usize, part: &str) -> String {
    format!("group.{g}.{part}")
}

fn block_name(g: usize, b: usize, part: &str) -> String {
    format!("group.{g}.block.{b}.{part}")
}

/// The storage dtype for an original dtype name (`F64` and others are stored as `F32`).
fn storage_for(dtype: &str) -> StorageDtype {
    match dtype {
        "F16" => StorageDtype::F16,
        "BF16" => StorageDtype::Bf16,
        _ => StorageDtype::F32,
    }
}

fn parse_dtype(name: &str) -> Option<StorageDtype> {
    match name {
        "F32" => Some(StorageDtype::F32),
        "F16" => Some(StorageDtype::F16),
        "BF16" => Some(StorageDtype::Bf16),
        _ => None,
    }
}

fn parse_kind(name: &str) -> Option<MlpKind> {
    match name {
        "standard" => Some(MlpKind::Standard),
        "gated" => Some(MlpKind::Gated),
        _ => None,
    }
}

/// `x` rounded to `dtype` and back (exact for `F32`).
fn round_to(dtype: StorageDtype, x: f32) -> f32 {
    match dtype {
        StorageDtype::F32 => x,
        StorageDtype::F16 => half::f16::from_f32(x).to_f32(),
        StorageDtype::Bf16 => <half::bf16 as StorageFloat>::to_f32(half::bf16::from_f32(x)),
    }
}

fn rounded_array<D: ndarray::Dimension>(
    a: &ndarray::Array<f32, D>,
    dtype: StorageDtype,
) -> ndarray::Array<f32, D> {
    a.mapv(|x| round_to(dtype, x))
}

/// Low-rank or collapsed blocks with every value rounded to `dtype`.
fn round_blocks(
    blocks: &CompressedBlocks<f32>,
    dtype: StorageDtype,
) -> Result<CompressedBlocks<f32>> {
    Ok(match blocks {
        CompressedBlocks::SharedBasis(g) => CompressedBlocks::SharedBasis(g.clone()),
        CompressedBlocks::LowRank(g) => CompressedBlocks::LowRank(LowRankGroup::new(
            g.kind(),
            g.activation(),
            (g.width(), g.intermediate()),
            g.bases().iter().map(|b| rounded_array(b, dtype)).collect(),
            g.matrices()
                .iter()
                .map(|m| LowRankMatrix {
                    left: rounded_array(&m.left, dtype),
                    basis: m.basis,
                    bias: m.bias.as_ref().map(|b| rounded_array(b, dtype)),
                })
                .collect(),
        )?),
        CompressedBlocks::Collapsed(g) => {
            let blocks = (0..g.blocks())
                .map(|b| {
                    let block = g.block(b)?;
                    Ok(CollapsedBlock {
                        map: match &block.map {
                            CollapsedMap::Full(m) => CollapsedMap::Full(rounded_array(m, dtype)),
                            CollapsedMap::Factored { left, right } => CollapsedMap::Factored {
                                left: rounded_array(left, dtype),
                                right: rounded_array(right, dtype),
                            },
                        },
                        bias: rounded_array(&block.bias, dtype),
                        slope: block.slope,
                        converged: block.converged,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            CompressedBlocks::Collapsed(CollapsedGroup::new(
                g.width(),
                g.intermediate(),
                g.activation(),
                blocks,
            )?)
        }
    })
}

/// Whether `values`, rounded to the original tensor's dtype, equal its bytes exactly.
fn equals_original(original: &Checkpoint, name: &str, values: &Array1<f32>) -> bool {
    let Ok(info) = original.info(name) else {
        return false;
    };
    if info.shape != [values.len()] {
        return false;
    }
    let (Ok(bytes), Ok(encoded)) = (
        original.read_bytes(name),
        TensorData::from_floats(values.iter().copied(), info.shape.clone(), info.dtype),
    ) else {
        return false;
    };
    bytes == encoded.bytes
}

/// The first all-digit dotted component of a tensor name (`blocks.3.mlp.fc1.weight` → 3).
fn block_of_name(name: &str) -> Option<usize> {
    name.split('.')
        .find(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|c| c.parse().ok())
}

impl CompactModel {
    /// The compact form of a compressed model: each group stored in its original matrices'
    /// dtype, biases marked `original` where `original` holds them bit for bit.
    pub fn from_model(model: &CompressedModel, original: Option<&Checkpoint>) -> Result<Self> {
        let m = &model.manifest;
        if m.groups.len() != model.groups.len() {
            return Err(FipsError::InvalidParameter {
                name: "manifest",
                reason: format!(
                    "{} groups described, {} given",
                    m.groups.len(),
                    model.groups.len()
                ),
            });
        }
        let mut groups = Vec::with_capacity(model.groups.len());
        let mut described = Vec::with_capacity(model.groups.len());
        for (gm, group) in m.groups.iter().zip(&model.groups) {
            let dtype = gm
                .matrices
                .first()
                .map_or(StorageDtype::F32, |x| storage_for(&x.dtype));
            let (blocks, rank, biases): (CompactBlocks, usize, Vec<Option<Array1<f32>>>) =
                match group {
                    CompressedBlocks::SharedBasis(g) => (
                        CompactBlocks::SharedBasis(AnyCompactGroup::from_group(g, dtype)?),
                        g.rank(),
                        g.biases().to_vec(),
                    ),
                    CompressedBlocks::LowRank(g) => (
                        CompactBlocks::Other(round_blocks(group, dtype)?),
                        0,
                        g.matrices().iter().map(|x| x.bias.clone()).collect(),
                    ),
                    CompressedBlocks::Collapsed(_) => (
                        CompactBlocks::Other(round_blocks(group, dtype)?),
                        0,
                        vec![None; gm.matrices.len()],
                    ),
                };
            described.push(describe(gm, &blocks, dtype, rank, &biases, original)?);
            groups.push(blocks);
        }
        let model = Self {
            manifest: ManifestV2 {
                format: COMPRESSED_FORMAT.into(),
                format_version: FORMAT_VERSION,
                crate_version: env!("CARGO_PKG_VERSION").into(),
                method: m.method.clone(),
                parameters: m.parameters.clone(),
                source: m.source.clone(),
                scheme: m.scheme.clone(),
                data_free: m.data_free,
                self_contained: false,
                blas_threads: m.blas_threads,
                distillation: m.distillation.clone(),
                groups: described,
            },
            groups,
        };
        model.check_names()?;
        Ok(model)
    }

    /// Checks the manifest's original tensor names: unique, and naming the matrix's own block.
    fn check_names(&self) -> Result<()> {
        let mut seen = BTreeSet::new();
        for (g, gm) in self.manifest.groups.iter().enumerate() {
            for (j, m) in gm.matrices.iter().enumerate() {
                for name in std::iter::once(&m.weight).chain(m.bias.as_ref()) {
                    if name.starts_with(INTERNAL_PREFIX) {
                        return Err(crate::repr::compact::corrupt(
                            "manifest",
                            format!(
                                "group {g} matrix {j}: original name {name:?} uses the reserved prefix"
                            ),
                        ));
                    }
                    if !seen.insert(name.clone()) {
                        return Err(crate::repr::compact::corrupt(
                            "manifest",
                            format!("group {g} matrix {j}: tensor {name:?} is named twice"),
                        ));
                    }
                    if let Some(b) = block_of_name(name)
                        && b != m.block
                    {
                        return Err(crate::repr::compact::corrupt(
                            "manifest",
                            format!(
                                "group {g} matrix {j} (block {}): tensor {name:?} names block {b}",
                                m.block
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The stored tensors of the compressed groups, by name.
    fn tensors(&self) -> Result<BTreeMap<String, TensorData>> {
        let mut out = BTreeMap::new();
        for (g, (gm, group)) in self.manifest.groups.iter().zip(&self.groups).enumerate() {
            let dtype = parse_dtype(&gm.dtype).unwrap_or(StorageDtype::F32);
            let float = |a: &[f32], shape: Vec<usize>| {
                TensorData::from_floats(a.iter().copied(), shape, dtype.safetensors())
            };
            let array = |a: &ndarray::ArrayD<f32>| {
                TensorData::from_floats(a.iter().copied(), a.shape().to_vec(), dtype.safetensors())
            };
            match group {
                CompactBlocks::SharedBasis(c) => {
                    each!(c, c => write_shared(&mut out, g, gm, c)?);
                }
                CompactBlocks::Other(CompressedBlocks::LowRank(lr)) => {
                    for (u, b) in lr.bases().iter().enumerate() {
                        out.insert(
                            group_name(g, &format!("basis.{u}")),
                            array(&b.clone().into_dyn())?,
                        );
                    }
                    for (j, m) in lr.matrices().iter().enumerate() {
                        out.insert(
                            matrix_name(g, j, "left"),
                            array(&m.left.clone().into_dyn())?,
                        );
                        if let (Some(b), "stored") = (&m.bias, gm.matrices[j].bias_source.as_str())
                        {
                            out.insert(
                                matrix_name(g, j, "bias"),
                                float(&b.to_vec(), vec![b.len()])?,
                            );
                        }
                    }
                }
                CompactBlocks::Other(CompressedBlocks::Collapsed(c)) => {
                    for b in 0..c.blocks() {
                        let block = c.block(b)?;
                        match &block.map {
                            CollapsedMap::Full(w) => {
                                out.insert(
                                    block_name(g, b, "weight"),
                                    array(&w.clone().into_dyn())?,
                                );
                            }
                            CollapsedMap::Factored { left, right } => {
                                out.insert(
                                    block_name(g, b, "left"),
                                    array(&left.clone().into_dyn())?,
                                );
                                out.insert(
                                    block_name(g, b, "right"),
                                    array(&right.clone().into_dyn())?,
                                );
                            }
                        }
                        out.insert(
                            block_name(g, b, "bias"),
                            float(&block.bias.to_vec(), vec![block.bias.len()])?,
                        );
                    }
                }
                CompactBlocks::Other(CompressedBlocks::SharedBasis(_)) => {
                    return Err(FipsError::InvalidParameter {
                        name: "compact model",
                        reason: format!("group {g}: a shared-basis group must be in compact form"),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Writes the MLP-only file (the original checkpoint is needed beside it), atomically.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        self.write_with(path.as_ref(), None)
    }

    /// Writes a self-contained file: the compressed groups plus every tensor of `original` the
    /// compressed model still uses (all but the compressed weights and the biases it replaces),
    /// copied byte for byte, atomically.
    pub fn write_self_contained(
        &self,
        path: impl AsRef<Path>,
        original: &Checkpoint,
    ) -> Result<()> {
        self.write_with(path.as_ref(), Some(original))
    }

    fn write_with(&self, path: &Path, original: Option<&Checkpoint>) -> Result<()> {
        self.check_names()?;
        let tensors = self.tensors()?;
        let mut manifest = self.manifest.clone();
        manifest.self_contained = original.is_some();
        let mut sources: BTreeMap<String, TensorSource<'_>> = tensors
            .iter()
            .map(|(k, v)| (k.clone(), TensorSource::Data(v)))
            .collect();
        if let Some(original) = original {
            let replaced = self.replaced_names();
            for name in original.names() {
                if name.starts_with(INTERNAL_PREFIX) {
                    return Err(FipsError::Format {
                        path: original.path().to_path_buf(),
                        reason: format!(
                            "tensor {name:?} uses the prefix {INTERNAL_PREFIX:?} reserved by the compact format"
                        ),
                    });
                }
                if !replaced.contains(name) {
                    sources.insert(name.to_string(), TensorSource::Copy(original, name));
                }
            }
            for gm in &manifest.groups {
                for m in &gm.matrices {
                    if let (Some(b), "original") = (&m.bias, m.bias_source.as_str())
                        && !original.contains(b)
                    {
                        return Err(FipsError::MissingTensor {
                            path: original.path().to_path_buf(),
                            name: b.clone(),
                        });
                    }
                }
            }
        }
        let text = serde_json::to_string(&manifest).map_err(|e| FipsError::Format {
            path: path.to_path_buf(),
            reason: format!("cannot serialise the manifest: {e}"),
        })?;
        let metadata = HashMap::from([
            (MANIFEST_KEY.to_string(), text),
            (FORMAT_VERSION_KEY.to_string(), FORMAT_VERSION.to_string()),
        ]);
        write_safetensors_from(path, sources, metadata)
    }

    /// Original tensor names the compressed model replaces: every compressed weight, and the
    /// biases it stores or drops.
    fn replaced_names(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for gm in &self.manifest.groups {
            for m in &gm.matrices {
                out.insert(m.weight.clone());
                if let Some(b) = &m.bias
                    && m.bias_source != "original"
                {
                    out.insert(b.clone());
                }
            }
        }
        out
    }

    /// Reads a version-3 file. Biases marked `original` come from the file itself when it is
    /// self-contained, else from `original` (an error if it is not given).
    pub fn read(path: impl AsRef<Path>, original: Option<&Checkpoint>) -> Result<Self> {
        let file = Checkpoint::open(path)?;
        Self::read_from(&file, original)
    }

    /// Reads from an open file (see [`CompactModel::read`]).
    pub fn read_from(file: &Checkpoint, original: Option<&Checkpoint>) -> Result<Self> {
        let manifest = read_manifest(file)?;
        let ctx = Reader {
            file,
            path: file.path().to_path_buf(),
            biases_from: if manifest.self_contained {
                Some(file)
            } else {
                original
            },
        };
        let mut expected = BTreeSet::new();
        let groups = manifest
            .groups
            .iter()
            .enumerate()
            .map(|(g, gm)| ctx.group(g, gm, &mut expected))
            .collect::<Result<Vec<_>>>()?;
        // Every internal tensor must be accounted for; an MLP-only file holds nothing else.
        for name in file.names() {
            let internal = name.starts_with(INTERNAL_PREFIX);
            if (internal || !manifest.self_contained) && !expected.contains(name) {
                return Err(ctx.format(format!("unexpected tensor {name:?}")));
            }
        }
        let model = Self { manifest, groups };
        model.check_names().map_err(|e| ctx.format(e.to_string()))?;
        Ok(model)
    }

    /// The dense tensors that replace the originals, keyed by original name: every compressed
    /// weight rebuilt in its original layout, and every bias the compressed form stores.
    pub fn dense_tensors(&self) -> Result<BTreeMap<String, ArrayD<f32>>> {
        let mut out = BTreeMap::new();
        for (gm, group) in self.manifest.groups.iter().zip(&self.groups) {
            let f = parse_kind(&gm.kind)
                .map(MlpKind::matrices_per_block)
                .unwrap_or(2);
            for position in 0..gm.blocks.len() {
                for (k, (w, b)) in group.dense_layers(position)?.into_iter().enumerate() {
                    let m = &gm.matrices[position * f + k];
                    // An `original` bias is unchanged: the source's tensor stays.
                    insert_rebuilt(
                        &mut out,
                        (&m.weight, &m.shape, m.bias.as_deref()),
                        m.bias_source == "original",
                        w,
                        b,
                    )?;
                }
            }
        }
        Ok(out)
    }

    /// Writes a dense checkpoint: every tensor of `source` (the original checkpoint, or this
    /// model's own self-contained file) except the compact format's own, with every compressed
    /// tensor replaced by its dense rebuild in the original dtype, atomically.
    pub fn densify(&self, source: &Checkpoint, path: impl AsRef<Path>) -> Result<()> {
        let replacements = self.dense_tensors()?;
        let mut dtypes = BTreeMap::new();
        for gm in &self.manifest.groups {
            for m in &gm.matrices {
                let dtype = match m.dtype.as_str() {
                    "F16" => Dtype::F16,
                    "BF16" => Dtype::BF16,
                    "F64" => Dtype::F64,
                    _ => Dtype::F32,
                };
                dtypes.insert(m.weight.clone(), dtype);
                if let Some(b) = &m.bias {
                    let bias_dtype = source.info(b).map_or(dtype, |i| i.dtype);
                    dtypes.insert(b.clone(), bias_dtype);
                }
            }
        }
        let mut encoded = BTreeMap::new();
        for (name, values) in &replacements {
            let dtype = dtypes.get(name).copied().unwrap_or(Dtype::F32);
            encoded.insert(
                name.clone(),
                TensorData::from_floats(values.iter().copied(), values.shape().to_vec(), dtype)?,
            );
        }
        let mut sources: BTreeMap<String, TensorSource<'_>> = source
            .names()
            .filter(|n| !n.starts_with(INTERNAL_PREFIX) && !encoded.contains_key(*n))
            .map(|n| (n.to_string(), TensorSource::Copy(source, n)))
            .collect();
        for (name, data) in &encoded {
            if let Ok(info) = source.info(name)
                && info.shape != data.shape
            {
                return Err(FipsError::ShapeMismatch {
                    what: format!("{name} in {}", source.path().display()),
                    expected: data.shape.clone(),
                    got: info.shape.clone(),
                });
            }
            sources.insert(name.clone(), TensorSource::Data(data));
        }
        let mut metadata: HashMap<String, String> = source
            .metadata()
            .iter()
            .filter(|(k, _)| !k.starts_with("fips."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        metadata.insert(
            "fips.densified".into(),
            format!(
                "{} MLP tensors rebuilt from a {} compression by fips {}",
                encoded.len(),
                self.manifest.method,
                env!("CARGO_PKG_VERSION")
            ),
        );
        write_safetensors_from(path, sources, metadata)
    }

    /// Bytes of the dense MLP weights this model replaces, in their original dtypes.
    pub fn dense_weight_bytes(&self) -> usize {
        self.manifest.dense_weight_bytes()
    }

    /// Bytes of the stored groups (values, patterns, biases), without header or copied tensors.
    pub fn stored_bytes(&self) -> Result<usize> {
        Ok(self.tensors()?.values().map(|t| t.bytes.len()).sum())
    }
}

/// Describes one group in manifest form.
fn describe(
    gm: &GroupManifest,
    blocks: &CompactBlocks,
    dtype: StorageDtype,
    rank: usize,
    biases: &[Option<Array1<f32>>],
    original: Option<&Checkpoint>,
) -> Result<GroupV2> {
    let factors: Vec<Option<FactorV2>> = match blocks {
        CompactBlocks::SharedBasis(c) => each!(c, c => (0..c.factor_count())
            .map(|j| {
                let encoding = c.factor_encoding(j).unwrap_or(PatternEncoding::Bitmask);
                c.factor_shape(j).map(|(rows, cols, nnz)| FactorV2 {
                    rows,
                    cols,
                    nnz,
                    encoding: encoding.name().into(),
                })
            })
            .collect()),
        CompactBlocks::Other(_) => vec![None; gm.matrices.len()],
    };
    if factors.len() != gm.matrices.len() || biases.len() != gm.matrices.len() {
        return Err(FipsError::ShapeMismatch {
            what: "matrices of a group and its description".into(),
            expected: vec![gm.matrices.len()],
            got: vec![factors.len()],
        });
    }
    let matrices = gm
        .matrices
        .iter()
        .zip(factors)
        .zip(biases)
        .map(|((m, factor), bias)| {
            let bias_source = match (bias, &m.bias, original) {
                (None, ..) => "none",
                (Some(b), Some(name), Some(ck)) => {
                    // Compare with the value the file would hold (rounded to the group dtype).
                    let rounded = b.mapv(|x| round_to(dtype, x));
                    if equals_original(ck, name, &rounded) {
                        "original"
                    } else {
                        "stored"
                    }
                }
                _ => "stored",
            };
            MatrixV2 {
                block: m.block,
                role: m.role.clone(),
                weight: m.weight.clone(),
                shape: m.shape.clone(),
                dtype: m.dtype.clone(),
                bias: m.bias.clone(),
                bias_source: bias_source.into(),
                factor,
            }
        })
        .collect();
    let structure = match blocks {
        CompactBlocks::Other(CompressedBlocks::Collapsed(c)) => {
            let mut s = serde_json::to_value(&gm.structure).unwrap_or(serde_json::Value::Null);
            let factored: Vec<bool> = (0..c.blocks())
                .map(|b| {
                    c.block(b)
                        .is_ok_and(|x| matches!(x.map, CollapsedMap::Factored { .. }))
                })
                .collect();
            if let Some(obj) = s.as_object_mut() {
                obj.insert("factored".into(), serde_json::json!(factored));
            }
            s
        }
        _ => serde_json::to_value(&gm.structure).unwrap_or(serde_json::Value::Null),
    };
    Ok(GroupV2 {
        blocks: gm.blocks.clone(),
        representation: gm.representation.name().into(),
        kind: serde_name(&gm.kind),
        activation: serde_name(&gm.activation),
        width: gm.width,
        intermediate: gm.intermediate,
        dtype: dtype.name().into(),
        rank,
        structure,
        matrices,
    })
}

/// The name a unit-like enum serialises to (`"gated"`, `"gelu"`, …).
fn serde_name<T: Serialize>(t: &T) -> String {
    match serde_json::to_value(t) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

fn write_shared<S: StorageFloat>(
    out: &mut BTreeMap<String, TensorData>,
    g: usize,
    gm: &GroupV2,
    c: &CompactGroup<S>,
) -> Result<()> {
    let dtype = S::DTYPE.safetensors();
    let bytes = |v: &[S]| {
        let mut b = Vec::new();
        S::extend_le_bytes(v, &mut b);
        b
    };
    out.insert(
        group_name(g, "basis"),
        TensorData::new(dtype, vec![c.width(), c.rank()], bytes(c.basis()))?,
    );
    for j in 0..c.factor_count() {
        let m = c.compact_factor(j)?;
        out.insert(
            matrix_name(g, j, "values"),
            TensorData::new(dtype, vec![m.nnz()], m.value_bytes())?,
        );
        let p = m.pattern();
        if let Some(mask) = p.bitmask() {
            out.insert(
                matrix_name(g, j, "mask"),
                TensorData::new(Dtype::U8, vec![mask.len()], mask.to_vec())?,
            );
        }
        if let Some((counts, gaps)) = p.row_gaps() {
            out.insert(
                matrix_name(g, j, "counts"),
                TensorData::from_u32(counts, vec![counts.len()])?,
            );
            out.insert(
                matrix_name(g, j, "gaps"),
                TensorData::new(
                    Dtype::U16,
                    vec![gaps.len()],
                    gaps.iter().flat_map(|x| x.to_le_bytes()).collect(),
                )?,
            );
        }
        if let (Some(b), Some(m)) = (&c.biases()[j], gm.matrices.get(j))
            && m.bias_source == "stored"
        {
            out.insert(
                matrix_name(g, j, "bias"),
                TensorData::new(dtype, vec![b.len()], bytes(b))?,
            );
        }
    }
    Ok(())
}

impl ManifestV2 {
    /// Bytes of the dense MLP weights this model replaces, in their original dtypes.
    pub fn dense_weight_bytes(&self) -> usize {
        self.groups
            .iter()
            .flat_map(|g| &g.matrices)
            .map(|m| {
                let width = match m.dtype.as_str() {
                    "F16" | "BF16" => 2,
                    "F64" => 8,
                    _ => 4,
                };
                width * m.shape.iter().product::<usize>()
            })
            .sum()
    }
}

/// Whether `file` is a compact compressed model (it carries [`FORMAT_VERSION_KEY`]; the older
/// layouts of [`crate::format::compressed`] do not).
pub fn is_compact(file: &Checkpoint) -> bool {
    file.metadata().contains_key(FORMAT_VERSION_KEY)
}

/// Where the bytes of a compact file go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SizeBreakdown {
    /// Stored values: bases, kept values of the sparse factors, low-rank and collapsed factors,
    /// biases.
    pub values: usize,
    /// Sparsity patterns (bitmasks, row counts and column gaps).
    pub patterns: usize,
    /// Tensors copied unchanged from the original (self-contained files only).
    pub copied: usize,
    /// Everything else: the safetensors header with the manifest, and alignment padding.
    pub header: usize,
    /// The whole file.
    pub file: usize,
}

/// The size breakdown of the compact file at `path`.
pub fn size_breakdown(path: impl AsRef<Path>) -> Result<SizeBreakdown> {
    let path = path.as_ref();
    let file = Checkpoint::open(path)?;
    let total = std::fs::metadata(path)
        .map_err(|source| FipsError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut out = SizeBreakdown {
        file: usize::try_from(total).unwrap_or(usize::MAX),
        ..SizeBreakdown::default()
    };
    for t in file.tensors() {
        let bytes = file.read_bytes(&t.name)?.len();
        if !t.name.starts_with(INTERNAL_PREFIX) {
            out.copied += bytes;
        } else if [".mask", ".counts", ".gaps"]
            .iter()
            .any(|e| t.name.ends_with(e))
        {
            out.patterns += bytes;
        } else {
            out.values += bytes;
        }
    }
    out.header = out
        .file
        .saturating_sub(out.values + out.patterns + out.copied);
    Ok(out)
}

/// Parses and checks the header metadata of a version-3 file (the manifest alone; a typed
/// version error for any other version).
pub fn read_manifest(file: &Checkpoint) -> Result<ManifestV2> {
    let path = file.path().to_path_buf();
    let format = |reason: String| FipsError::Format {
        path: path.clone(),
        reason,
    };
    let text = file.metadata().get(MANIFEST_KEY).ok_or_else(|| {
        format(format!(
            "no {MANIFEST_KEY} metadata: not a fips compressed checkpoint"
        ))
    })?;
    let version = match file.metadata().get(FORMAT_VERSION_KEY) {
        Some(v) => v
            .trim()
            .parse::<u32>()
            .map_err(|_| format(format!("unreadable {FORMAT_VERSION_KEY} {v:?}")))?,
        // Files of version 1 carry the version only inside the manifest.
        None => serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v.get("format_version")?.as_u64())
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(0),
    };
    if version != FORMAT_VERSION {
        return Err(FipsError::UnsupportedVersion {
            path,
            format: COMPRESSED_FORMAT.into(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let manifest: ManifestV2 =
        serde_json::from_str(text).map_err(|e| format(format!("unreadable manifest: {e}")))?;
    if manifest.format != COMPRESSED_FORMAT || manifest.format_version != FORMAT_VERSION {
        return Err(FipsError::UnsupportedVersion {
            path,
            format: manifest.format.clone(),
            found: manifest.format_version,
            supported: FORMAT_VERSION,
        });
    }
    Ok(manifest)
}

struct Reader<'a> {
    file: &'a Checkpoint,
    path: PathBuf,
    biases_from: Option<&'a Checkpoint>,
}

impl Reader<'_> {
    fn format(&self, reason: String) -> FipsError {
        FipsError::Format {
            path: self.path.clone(),
            reason,
        }
    }

    /// Checks that `name` exists with `dtype` and `shape` (before reading it).
    fn expect(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<()> {
        let info = self.file.info(name)?;
        if info.dtype != dtype || info.shape != shape {
            return Err(self.format(format!(
                "tensor {name:?} is {:?} {:?}, the manifest needs {dtype:?} {shape:?}",
                info.dtype, info.shape
            )));
        }
        Ok(())
    }

    fn group(
        &self,
        g: usize,
        gm: &GroupV2,
        expected: &mut BTreeSet<String>,
    ) -> Result<CompactBlocks> {
        let bad = |reason: String| self.format(format!("group {g}: {reason}"));
        let kind =
            parse_kind(&gm.kind).ok_or_else(|| bad(format!("unknown kind {:?}", gm.kind)))?;
        let activation: Activation = gm.activation.parse()?;
        let dtype =
            parse_dtype(&gm.dtype).ok_or_else(|| bad(format!("unknown dtype {:?}", gm.dtype)))?;
        let f = kind.matrices_per_block();
        let (d, i) = (gm.width, gm.intermediate);
        if d == 0 || i == 0 || gm.blocks.is_empty() {
            return Err(bad("empty width, MLP width or block list".into()));
        }
        if Some(gm.matrices.len()) != gm.blocks.len().checked_mul(f) {
            return Err(bad(format!(
                "{} matrices for {} {kind} blocks",
                gm.matrices.len(),
                gm.blocks.len()
            )));
        }
        for (j, m) in gm.matrices.iter().enumerate() {
            let want = match kind.matrix_roles()[j % f] {
                MatrixRole::Up => [i, d],
                MatrixRole::Down => [d, i],
            };
            if m.block != gm.blocks[j / f]
                || m.role != kind.matrix_names()[j % f]
                || m.shape != want
            {
                return Err(bad(format!(
                    "matrix {j} is {} of block {} with shape {:?}; expected {} of block {} with shape {want:?}",
                    m.role,
                    m.block,
                    m.shape,
                    kind.matrix_names()[j % f],
                    gm.blocks[j / f]
                )));
            }
            if !matches!(m.bias_source.as_str(), "none" | "stored" | "original")
                || (m.bias_source == "original" && m.bias.is_none())
            {
                return Err(bad(format!(
                    "matrix {j}: bias source {:?} with bias {:?}",
                    m.bias_source, m.bias
                )));
            }
        }
        let st = dtype.safetensors();
        match gm.representation.as_str() {
            "shared-basis" => {
                let r = gm.rank;
                if r == 0 {
                    return Err(bad("rank 0".into()));
                }
                let basis = group_name(g, "basis");
                self.expect(&basis, st, &[d, r])?;
                expected.insert(basis);
                Ok(CompactBlocks::SharedBasis(match dtype {
                    StorageDtype::F32 => {
                        AnyCompactGroup::F32(self.shared::<f32>(g, gm, kind, activation, expected)?)
                    }
                    StorageDtype::F16 => AnyCompactGroup::F16(
                        self.shared::<half::f16>(g, gm, kind, activation, expected)?,
                    ),
                    StorageDtype::Bf16 => AnyCompactGroup::Bf16(
                        self.shared::<half::bf16>(g, gm, kind, activation, expected)?,
                    ),
                }))
            }
            "low-rank" => {
                let uses: Vec<Option<usize>> =
                    serde_json::from_value(gm.structure["bases"].clone())
                        .map_err(|e| bad(format!("unreadable low-rank structure: {e}")))?;
                if uses.len() != gm.matrices.len() {
                    return Err(bad(format!(
                        "{} basis entries for {} matrices",
                        uses.len(),
                        gm.matrices.len()
                    )));
                }
                let count = uses.iter().flatten().map(|u| u + 1).max().unwrap_or(0);
                if count > uses.len() {
                    return Err(bad(format!("basis index {} out of range", count - 1)));
                }
                let read = |name: String, expected: &mut BTreeSet<String>| -> Result<Array2<f32>> {
                    let info = self.file.info(&name)?;
                    if info.dtype != st || info.shape.len() != 2 {
                        return Err(bad(format!("tensor {name:?} is not a {st:?} matrix")));
                    }
                    let a = self.file.read_matrix(&name)?;
                    expected.insert(name);
                    Ok(a)
                };
                let bases = (0..count)
                    .map(|u| read(group_name(g, &format!("basis.{u}")), expected))
                    .collect::<Result<Vec<_>>>()?;
                let matrices = uses
                    .iter()
                    .enumerate()
                    .map(|(j, &basis)| {
                        let out = gm.matrices[j].shape[0];
                        Ok(LowRankMatrix {
                            left: read(matrix_name(g, j, "left"), expected)?,
                            basis,
                            bias: self.bias_f32(g, j, &gm.matrices[j], st, out, expected)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(CompactBlocks::Other(CompressedBlocks::LowRank(
                    LowRankGroup::new(kind, activation, (d, i), bases, matrices)?,
                )))
            }
            "collapsed" => {
                let factored: Vec<bool> = serde_json::from_value(gm.structure["factored"].clone())
                    .map_err(|e| bad(format!("unreadable collapsed structure: {e}")))?;
                let slopes: Vec<f64> =
                    serde_json::from_value(gm.structure["slopes"].clone()).unwrap_or_default();
                let converged: Vec<bool> =
                    serde_json::from_value(gm.structure["converged"].clone()).unwrap_or_default();
                if factored.len() != gm.blocks.len() {
                    return Err(bad("one factored flag per block expected".into()));
                }
                let blocks = (0..gm.blocks.len())
                    .map(|b| {
                        let mut read = |part: &str, shape: [usize; 2]| -> Result<Array2<f32>> {
                            let name = block_name(g, b, part);
                            self.expect(&name, st, &shape)?;
                            let a = self.file.read_matrix(&name)?;
                            expected.insert(name);
                            Ok(a)
                        };
                        let map = if factored[b] {
                            CollapsedMap::Factored {
                                left: read("left", [d, i])?,
                                right: read("right", [i, d])?,
                            }
                        } else {
                            CollapsedMap::Full(read("weight", [d, d])?)
                        };
                        let name = block_name(g, b, "bias");
                        self.expect(&name, st, &[d])?;
                        let bias = self.file.read_vector(&name)?;
                        expected.insert(name);
                        Ok(CollapsedBlock {
                            map,
                            bias,
                            slope: slopes.get(b).copied().unwrap_or(f64::NAN),
                            converged: converged.get(b).copied().unwrap_or(false),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(CompactBlocks::Other(CompressedBlocks::Collapsed(
                    CollapsedGroup::new(d, i, activation, blocks)?,
                )))
            }
            other => Err(bad(format!("unknown representation {other:?}"))),
        }
    }

    /// A bias as `f32`: stored in the file, or the original tensor, or none.
    fn bias_f32(
        &self,
        g: usize,
        j: usize,
        m: &MatrixV2,
        st: Dtype,
        len: usize,
        expected: &mut BTreeSet<String>,
    ) -> Result<Option<Array1<f32>>> {
        match m.bias_source.as_str() {
            "stored" => {
                let name = matrix_name(g, j, "bias");
                self.expect(&name, st, &[len])?;
                let b = self.file.read_vector(&name)?;
                expected.insert(name);
                Ok(Some(b))
            }
            "original" => {
                let name = m.bias.clone().unwrap_or_default();
                let source = self.biases_from.ok_or_else(|| {
                    self.format(format!(
                        "group {g} matrix {j}: the bias is the original tensor {name:?}; give the original checkpoint"
                    ))
                })?;
                let info = source.info(&name)?;
                if info.shape != [len] {
                    return Err(self.format(format!(
                        "original bias {name:?} has shape {:?}, expected [{len}]",
                        info.shape
                    )));
                }
                if std::ptr::eq(source, self.file) {
                    expected.insert(name.clone());
                }
                Ok(Some(source.read_vector(&name)?))
            }
            _ => Ok(None),
        }
    }

    fn shared<S: StorageFloat>(
        &self,
        g: usize,
        gm: &GroupV2,
        kind: MlpKind,
        activation: Activation,
        expected: &mut BTreeSet<String>,
    ) -> Result<CompactGroup<S>> {
        let (d, r, i) = (gm.width, gm.rank, gm.intermediate);
        let st = S::DTYPE.safetensors();
        let f = kind.matrices_per_block();
        let bad = |reason: String| self.format(format!("group {g}: {reason}"));
        // The basis' shape was checked against [d, r]: its bytes exist.
        let basis = S::from_le_bytes(&self.file.read_bytes(&group_name(g, "basis"))?);
        let mut factors = Vec::with_capacity(gm.matrices.len());
        let mut biases = Vec::with_capacity(gm.matrices.len());
        for (j, m) in gm.matrices.iter().enumerate() {
            let role = kind.matrix_roles()[j % f];
            let (rows, cols) = match role {
                MatrixRole::Up => (i, r),
                MatrixRole::Down => (r, i),
            };
            let fm = m
                .factor
                .as_ref()
                .ok_or_else(|| bad(format!("matrix {j} has no factor")))?;
            if (fm.rows, fm.cols) != (rows, cols) {
                return Err(bad(format!(
                    "matrix {j}: factor {} × {}, expected {rows} × {cols}",
                    fm.rows, fm.cols
                )));
            }
            let encoding: PatternEncoding = fm.encoding.parse()?;
            let values = matrix_name(g, j, "values");
            self.expect(&values, st, &[fm.nnz])?;
            expected.insert(values.clone());
            let pattern = match encoding {
                PatternEncoding::Full => {
                    if Some(fm.nnz) != rows.checked_mul(cols) {
                        return Err(bad(format!(
                            "matrix {j}: full pattern with {} of {rows} × {cols} entries",
                            fm.nnz
                        )));
                    }
                    SparsePattern::full(rows, cols)?
                }
                PatternEncoding::Bitmask => {
                    let name = matrix_name(g, j, "mask");
                    let len = rows
                        .checked_mul(cols.div_ceil(8))
                        .ok_or_else(|| bad(format!("matrix {j}: mask size overflows")))?;
                    self.expect(&name, Dtype::U8, &[len])?;
                    expected.insert(name.clone());
                    SparsePattern::from_bitmask(rows, cols, self.file.read_bytes(&name)?)?
                }
                PatternEncoding::RowGaps => {
                    let counts = matrix_name(g, j, "counts");
                    let gaps = matrix_name(g, j, "gaps");
                    self.expect(&counts, Dtype::U32, &[rows])?;
                    self.expect(&gaps, Dtype::U16, &[fm.nnz])?;
                    expected.insert(counts.clone());
                    expected.insert(gaps.clone());
                    SparsePattern::from_row_gaps_bytes(
                        rows,
                        cols,
                        &self.file.read_bytes(&counts)?,
                        &self.file.read_bytes(&gaps)?,
                    )?
                }
            };
            if pattern.nnz() != fm.nnz {
                return Err(bad(format!(
                    "matrix {j}: the pattern keeps {} entries, the manifest says {}",
                    pattern.nnz(),
                    fm.nnz
                )));
            }
            factors.push(CompactMatrix::from_value_bytes(
                pattern,
                &self.file.read_bytes(&values)?,
            )?);
            let len = match role {
                MatrixRole::Up => i,
                MatrixRole::Down => d,
            };
            let bias = match m.bias_source.as_str() {
                "stored" => {
                    let name = matrix_name(g, j, "bias");
                    self.expect(&name, st, &[len])?;
                    expected.insert(name.clone());
                    Some(S::from_le_bytes(&self.file.read_bytes(&name)?))
                }
                "original" => self
                    .bias_f32(g, j, m, st, len, expected)?
                    .map(|b| b.iter().map(|&x| S::from_f32(x)).collect()),
                _ => None,
            };
            biases.push(bias);
        }
        CompactGroup::new(kind, activation, (d, r), basis, factors, biases)
    }
}
