//! Outputs: the compressed checkpoint (factors plus a manifest) and the densified checkpoint.
//!
//! **Compressed checkpoint.** A safetensors file (all tensors F32, indices U32) holding for every
//! group `g`, by representation:
//! - `shared-basis` (FiPS): `group.{g}.basis` (`U`, `[d, r]`) and for every matrix `j` of the
//!   group in module order the CSR arrays of `V_j`: `group.{g}.matrix.{j}.values` (`[nnz]`),
//!   `.columns` (`[nnz]`) and `.row_offsets` (`[r + 1]`);
//! - `low-rank` (SVD, SVD-LLM, basis sharing, mixed rank): right factors `group.{g}.basis.{u}`
//!   (`[k, in]`, shared or not) and per matrix `group.{g}.matrix.{j}.left` (`[out, k]`, or the
//!   whole `[out, in]` weight of a matrix kept dense); which basis each matrix uses is in the
//!   manifest's `structure.bases`;
//! - `collapsed` (LayerCollapse): per block `group.{g}.block.{b}.weight` (`[d, d]`), or
//!   `.left`/`.right` when kept factored, and `.bias`;
//!
//! and the biases `group.{g}.matrix.{j}.bias`. The header metadata `fips.manifest` is a JSON
//! [`Manifest`]: method and parameters, each group's blocks, representation and structure, and
//! every matrix's original tensor names, shape and dtype.
//!
//! The file format knows the compressed forms ([`repr`](crate::repr)) and nothing of the methods
//! that make them: the method is a name and its parameters an opaque JSON record here.
//!
//! Format versions: 2 (written) types `kind`, `activation` and `representation` as enums and
//! leaves `rank`, `nnz` and `sparsity` out (`null`) where they do not apply; version-1 files
//! (0 for "not applicable") are still read.
//!
//! **Densified checkpoint.** The original file with every compressed MLP tensor replaced by the
//! exact dense equivalent of its block (same name, shape and dtype) and every other tensor copied
//! byte for byte, so any loader of the original architecture reads it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ndarray::{Array1, ArrayD};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use sprs::CsMat;

use crate::format::checkpoint::{
    Checkpoint, TensorData, TensorSource, write_safetensors, write_safetensors_from,
};
use crate::foundation::activation::Activation;
use crate::foundation::error::{FipsError, Result};
use crate::foundation::mlp::MlpKind;
use crate::repr::{
    CollapsedBlock, CollapsedGroup, CollapsedMap, CompressedBlocks, LowRankGroup, LowRankMatrix,
    Representation, SharedBasis, SharedBasisGroup, SparseFactor,
};

/// The `format` field of a compressed checkpoint's manifest.
pub const COMPRESSED_FORMAT: &str = "fips-compressed";
/// The header metadata key holding the manifest.
pub const MANIFEST_KEY: &str = "fips.manifest";
/// The version of the layout this crate writes.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest version this crate reads.
const OLDEST_READABLE_VERSION: u32 = 1;

/// What a compressed checkpoint holds and how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`COMPRESSED_FORMAT`].
    pub format: String,
    /// Version of this layout.
    pub format_version: u32,
    /// Version of the crate that wrote the file.
    pub crate_version: String,
    /// Compression method (`fips`, `svd`, …).
    pub method: String,
    /// The method's parameters as the method serialises them (opaque to the file format).
    pub parameters: serde_json::Value,
    /// The checkpoint that was compressed.
    pub source: Option<String>,
    /// Its MLP naming scheme.
    pub scheme: Option<String>,
    /// Whether the calibration data was synthetic (data-free).
    pub data_free: bool,
    /// The BLAS thread count the factors were computed with (`OPENBLAS_NUM_THREADS`; absent:
    /// the backend's default, all cores). Results are bit-identical for equal seeds and thread
    /// counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blas_threads: Option<usize>,
    /// The end-to-end distillation the groups went through after their block-wise fits, as the
    /// application records it (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distillation: Option<serde_json::Value>,
    /// One entry per group.
    pub groups: Vec<GroupManifest>,
}

/// One compressed group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupManifest {
    /// The blocks of the group, in order.
    pub blocks: Vec<usize>,
    /// The compressed form.
    pub representation: Representation,
    /// The original blocks' structure.
    pub kind: MlpKind,
    /// The activation.
    pub activation: Activation,
    /// Width d.
    pub width: usize,
    /// MLP width I.
    pub intermediate: usize,
    /// Rank of the shared basis (`shared-basis` only).
    pub rank: Option<usize>,
    /// Nonzeros of the sparse factors (`shared-basis` only).
    pub nnz: Option<usize>,
    /// Achieved sparsity of the factors (`shared-basis` only).
    pub sparsity: Option<f64>,
    /// Weight parameters kept by the group.
    pub kept_weights: usize,
    /// What the form needs beyond its tensors (`low-rank` and `collapsed`).
    pub structure: Option<GroupStructure>,
    /// Every matrix of the group, module order.
    pub matrices: Vec<MatrixManifest>,
}

/// The structure of a low-rank or collapsed group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GroupStructure {
    /// `low-rank`: which basis each matrix uses (`null`: kept dense).
    LowRank {
        /// One entry per matrix, module order.
        bases: Vec<Option<usize>>,
    },
    /// `collapsed`: each block's PReLU slope before the merge and whether it converged.
    Collapsed {
        /// One slope per block.
        slopes: Vec<f64>,
        /// One flag per block.
        converged: Vec<bool>,
    },
}

/// One original matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatrixManifest {
    /// Its block.
    pub block: usize,
    /// Its role in the block (`fc1`, `fc2`, `gate`, `up`, `down`).
    pub role: String,
    /// The weight's tensor name in the original checkpoint.
    pub weight: String,
    /// The bias's tensor name, if it has one.
    pub bias: Option<String>,
    /// The weight's original shape `[out, in]`.
    pub shape: Vec<usize>,
    /// The weight's original dtype (`F32`, `BF16`, …).
    pub dtype: String,
}

impl Manifest {
    /// A manifest for `method` with `parameters` (any serialisable settings), to which groups are
    /// added.
    pub fn new(method: &str, parameters: &impl Serialize) -> Result<Self> {
        let parameters = serde_json::to_value(parameters)
            .map_err(|e| FipsError::Numerical(format!("cannot serialise the parameters: {e}")))?;
        Ok(Self::with_parameters(method, parameters))
    }

    /// A manifest for `method` with parameters already in JSON.
    pub fn with_parameters(method: &str, parameters: serde_json::Value) -> Self {
        Self {
            format: COMPRESSED_FORMAT.into(),
            format_version: FORMAT_VERSION,
            crate_version: env!("CARGO_PKG_VERSION").into(),
            method: method.into(),
            parameters,
            source: None,
            scheme: None,
            data_free: false,
            blas_threads: crate::foundation::blas::configured_threads(),
            distillation: None,
            groups: Vec::new(),
        }
    }
}

impl GroupManifest {
    /// Describes `group` covering `blocks`, given the original tensors of each matrix (module
    /// order: `(weight name, bias name, shape, dtype)`).
    pub fn describe(
        group: &CompressedBlocks<f32>,
        blocks: &[usize],
        kind: MlpKind,
        originals: Vec<(String, Option<String>, Vec<usize>, Dtype)>,
    ) -> Result<Self> {
        let f = kind.matrices_per_block();
        if blocks.len() != group.blocks() || originals.len() != f * group.blocks() {
            return Err(FipsError::ShapeMismatch {
                what: "blocks and original tensors of a compressed group".into(),
                expected: vec![group.blocks(), f * group.blocks()],
                got: vec![blocks.len(), originals.len()],
            });
        }
        let matrices = originals
            .into_iter()
            .enumerate()
            .map(|(j, (weight, bias, shape, dtype))| MatrixManifest {
                block: blocks[j / f],
                role: kind.matrix_names()[j % f].into(),
                weight,
                bias,
                shape,
                dtype: format!("{dtype:?}"),
            })
            .collect();
        let (activation, width, intermediate, rank, nnz, sparsity, structure) = match group {
            CompressedBlocks::SharedBasis(g) => (
                g.activation(),
                g.width(),
                g.intermediate(),
                Some(g.rank()),
                Some(g.nnz()),
                Some(g.sparsity()),
                None,
            ),
            CompressedBlocks::LowRank(g) => (
                g.activation(),
                g.width(),
                g.intermediate(),
                None,
                None,
                None,
                Some(GroupStructure::LowRank {
                    bases: g.matrices().iter().map(|m| m.basis).collect(),
                }),
            ),
            CompressedBlocks::Collapsed(g) => {
                let blocks: Vec<_> = (0..g.blocks()).filter_map(|b| g.block(b).ok()).collect();
                (
                    g.activation(),
                    g.width(),
                    g.intermediate(),
                    None,
                    None,
                    None,
                    Some(GroupStructure::Collapsed {
                        slopes: blocks.iter().map(|b| b.slope).collect(),
                        converged: blocks.iter().map(|b| b.converged).collect(),
                    }),
                )
            }
        };
        Ok(Self {
            blocks: blocks.to_vec(),
            representation: group.representation(),
            kind,
            activation,
            width,
            intermediate,
            rank,
            nnz,
            sparsity,
            kept_weights: group.parameter_count().compressed_weights(),
            structure,
            matrices,
        })
    }

    /// Version-1 manifests wrote 0 for the shared-basis fields of other forms.
    fn upgrade_from_v1(&mut self) {
        if self.representation != Representation::SharedBasis {
            self.rank = None;
            self.nnz = None;
            self.sparsity = None;
        }
    }
}

/// A compressed model: its manifest and its groups.
#[derive(Debug, Clone, PartialEq)]
pub struct CompressedModel {
    /// What the file holds.
    pub manifest: Manifest,
    /// The groups, in manifest order.
    pub groups: Vec<CompressedBlocks<f32>>,
}

fn name(g: usize, part: &str) -> String {
    format!("group.{g}.{part}")
}

fn matrix_name(g: usize, j: usize, part: &str) -> String {
    format!("group.{g}.matrix.{j}.{part}")
}

fn block_name(g: usize, b: usize, part: &str) -> String {
    format!("group.{g}.block.{b}.{part}")
}

impl CompressedModel {
    /// Checks that the manifest describes the groups.
    fn check(&self) -> Result<()> {
        let mismatch = |reason: String| FipsError::InvalidParameter {
            name: "manifest",
            reason,
        };
        if self.manifest.groups.len() != self.groups.len() {
            return Err(mismatch(format!(
                "{} groups described, {} given",
                self.manifest.groups.len(),
                self.groups.len()
            )));
        }
        for (g, (m, group)) in self.manifest.groups.iter().zip(&self.groups).enumerate() {
            let f = m.kind.matrices_per_block();
            let rank_ok = match group {
                CompressedBlocks::SharedBasis(s) => Some(s.rank()) == m.rank,
                _ => m.rank.is_none(),
            };
            if !rank_ok
                || m.representation != group.representation()
                || m.blocks.len() != group.blocks()
                || m.matrices.len() != f * group.blocks()
            {
                return Err(mismatch(format!(
                    "group {g}'s description does not match its factors"
                )));
            }
        }
        Ok(())
    }

    /// Writes the compressed checkpoint atomically.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        self.check()?;
        let mut tensors = BTreeMap::new();
        let floats = |a: &ndarray::ArrayView2<'_, f32>| {
            TensorData::from_floats(a.iter().copied(), a.shape().to_vec(), Dtype::F32)
        };
        for (g, group) in self.groups.iter().enumerate() {
            let biases: Vec<Option<Array1<f32>>> = match group {
                CompressedBlocks::SharedBasis(sb) => {
                    tensors.insert(name(g, "basis"), floats(&sb.basis().view())?);
                    for (j, v) in sb.factors().iter().enumerate() {
                        let csr = v.to_csr();
                        let to_u32 = |x: &[usize]| x.iter().map(|&i| i as u32).collect::<Vec<_>>();
                        let offsets = to_u32(&csr.indptr().to_proper());
                        let (columns, values) = (to_u32(csr.indices()), csr.data());
                        tensors.insert(
                            matrix_name(g, j, "values"),
                            TensorData::from_floats(
                                values.iter().copied(),
                                vec![values.len()],
                                Dtype::F32,
                            )?,
                        );
                        tensors.insert(
                            matrix_name(g, j, "columns"),
                            TensorData::from_u32(&columns, vec![columns.len()])?,
                        );
                        tensors.insert(
                            matrix_name(g, j, "row_offsets"),
                            TensorData::from_u32(&offsets, vec![offsets.len()])?,
                        );
                    }
                    sb.biases().to_vec()
                }
                CompressedBlocks::LowRank(lr) => {
                    for (u, b) in lr.bases().iter().enumerate() {
                        tensors.insert(name(g, &format!("basis.{u}")), floats(&b.view())?);
                    }
                    for (j, m) in lr.matrices().iter().enumerate() {
                        tensors.insert(matrix_name(g, j, "left"), floats(&m.left.view())?);
                    }
                    lr.matrices().iter().map(|m| m.bias.clone()).collect()
                }
                CompressedBlocks::Collapsed(c) => {
                    for b in 0..c.blocks() {
                        let block = c.block(b)?;
                        match &block.map {
                            CollapsedMap::Full(w) => {
                                tensors.insert(block_name(g, b, "weight"), floats(&w.view())?);
                            }
                            CollapsedMap::Factored { left, right } => {
                                tensors.insert(block_name(g, b, "left"), floats(&left.view())?);
                                tensors.insert(block_name(g, b, "right"), floats(&right.view())?);
                            }
                        }
                        tensors.insert(
                            block_name(g, b, "bias"),
                            TensorData::from_floats(
                                block.bias.iter().copied(),
                                vec![block.bias.len()],
                                Dtype::F32,
                            )?,
                        );
                    }
                    Vec::new()
                }
            };
            for (j, b) in biases.iter().enumerate() {
                if let Some(b) = b {
                    tensors.insert(
                        matrix_name(g, j, "bias"),
                        TensorData::from_floats(b.iter().copied(), vec![b.len()], Dtype::F32)?,
                    );
                }
            }
        }
        let manifest = serde_json::to_string(&self.manifest).map_err(|e| FipsError::Format {
            path: path.as_ref().to_path_buf(),
            reason: format!("cannot serialise the manifest: {e}"),
        })?;
        write_safetensors(
            path,
            &tensors,
            HashMap::from([(MANIFEST_KEY.to_string(), manifest)]),
        )
    }

    /// Reads a compressed checkpoint written by [`CompressedModel::write`].
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let file = Checkpoint::open(path)?;
        let format = |reason: String| FipsError::Format {
            path: file.path().to_path_buf(),
            reason,
        };
        let text = file.metadata().get(MANIFEST_KEY).ok_or_else(|| {
            format(format!(
                "no {MANIFEST_KEY} metadata: not a fips compressed checkpoint"
            ))
        })?;
        let mut manifest: Manifest =
            serde_json::from_str(text).map_err(|e| format(format!("unreadable manifest: {e}")))?;
        if manifest.format != COMPRESSED_FORMAT
            || !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&manifest.format_version)
        {
            return Err(format(format!(
                "format {} version {} is not {COMPRESSED_FORMAT} version {OLDEST_READABLE_VERSION} to {FORMAT_VERSION}",
                manifest.format, manifest.format_version
            )));
        }
        if manifest.format_version == 1 {
            manifest
                .groups
                .iter_mut()
                .for_each(GroupManifest::upgrade_from_v1);
            manifest.format_version = FORMAT_VERSION;
        }
        let groups = manifest
            .groups
            .iter()
            .enumerate()
            .map(|(g, m)| read_group(&file, g, m))
            .collect::<Result<Vec<_>>>()?;
        let model = Self { manifest, groups };
        model.check().map_err(|e| format(e.to_string()))?;
        Ok(model)
    }

    /// The dense tensors that replace the originals, keyed by original tensor name: every
    /// compressed block's exact dense equivalent (weights in their original layout, and biases).
    pub fn dense_tensors(&self) -> Result<BTreeMap<String, ArrayD<f32>>> {
        self.check()?;
        let mut out = BTreeMap::new();
        for (m, group) in self.manifest.groups.iter().zip(&self.groups) {
            let f = m.kind.matrices_per_block();
            for position in 0..group.blocks() {
                let mlp = group.to_dense_mlp(position)?;
                for (k, layer) in mlp.layers().iter().enumerate() {
                    let matrix = &m.matrices[position * f + k];
                    insert_rebuilt(
                        &mut out,
                        (&matrix.weight, &matrix.shape, matrix.bias.as_deref()),
                        false,
                        layer.weight().clone(),
                        layer.bias().cloned(),
                    )?;
                }
            }
        }
        Ok(out)
    }

    /// Writes `original` with every compressed tensor replaced by its dense rebuild (in the
    /// original tensor's dtype and shape) and every other tensor copied unchanged, atomically.
    pub fn densify(&self, original: &Checkpoint, path: impl AsRef<Path>) -> Result<()> {
        let replacements = self.dense_tensors()?;
        let mut encoded = BTreeMap::new();
        for (name, values) in &replacements {
            let info = original.info(name)?;
            if info.shape != values.shape() {
                return Err(FipsError::ShapeMismatch {
                    what: format!("{name} in {}", original.path().display()),
                    expected: values.shape().to_vec(),
                    got: info.shape.clone(),
                });
            }
            encoded.insert(
                name.clone(),
                TensorData::from_floats(values.iter().copied(), info.shape.clone(), info.dtype)?,
            );
        }
        let sources = original
            .names()
            .map(|n| {
                let src = match encoded.get(n) {
                    Some(data) => TensorSource::Data(data),
                    None => TensorSource::Copy(original, n),
                };
                (n.to_string(), src)
            })
            .collect();
        let mut metadata = original.metadata().clone();
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
}

/// Adds one rebuilt matrix to the dense replacements of a densify: its weight under the original
/// name `weight` (checked to have the original `shape`) and its bias under the original bias name,
/// unless `keep_original_bias` (the original tensor stays). A nonzero bias for a matrix the
/// original has none for is an error.
pub(crate) fn insert_rebuilt(
    out: &mut BTreeMap<String, ArrayD<f32>>,
    (weight, shape, bias): (&str, &[usize], Option<&str>),
    keep_original_bias: bool,
    w: ndarray::Array2<f32>,
    b: Option<Array1<f32>>,
) -> Result<()> {
    if w.shape() != shape {
        return Err(FipsError::ShapeMismatch {
            what: format!("rebuilt {weight}"),
            expected: shape.to_vec(),
            got: w.shape().to_vec(),
        });
    }
    out.insert(weight.to_string(), w.into_dyn());
    match (bias, b) {
        (Some(name), Some(b)) if !keep_original_bias => {
            out.insert(name.to_string(), b.into_dyn());
        }
        (None, Some(b)) if b.iter().any(|&x| x != 0.0) => {
            return Err(FipsError::InvalidParameter {
                name: "densify",
                reason: format!("{weight} needs a bias the original checkpoint does not have"),
            });
        }
        _ => {}
    }
    Ok(())
}

fn read_group(file: &Checkpoint, g: usize, m: &GroupManifest) -> Result<CompressedBlocks<f32>> {
    let format = |reason: String| FipsError::Format {
        path: file.path().to_path_buf(),
        reason,
    };
    let (kind, activation) = (m.kind, m.activation);
    let bias = |j: usize| -> Result<Option<Array1<f32>>> {
        let bias_name = matrix_name(g, j, "bias");
        if file.contains(&bias_name) {
            Ok(Some(file.read_vector(&bias_name)?))
        } else {
            Ok(None)
        }
    };
    match m.representation {
        Representation::SharedBasis => {
            let basis = SharedBasis::new(file.read_matrix(&name(g, "basis"))?)?;
            let (rank, cols) = (basis.rank(), m.intermediate);
            let mut factors = Vec::with_capacity(m.matrices.len());
            let mut biases = Vec::with_capacity(m.matrices.len());
            for j in 0..m.matrices.len() {
                let values: Array1<f32> = file.read_vector(&matrix_name(g, j, "values"))?;
                let dense = rank.checked_mul(cols).filter(|&n| {
                    n <= values
                        .len()
                        .max(1)
                        .saturating_mul(crate::math::limits::MAX_DENSE_PER_NONZERO)
                });
                if dense.is_none() {
                    return Err(format(format!(
                        "group {g} matrix {j}: a {rank} × {cols} factor from {} stored values \
                         (intermediate {cols} in the manifest is not what the file holds)",
                        values.len()
                    )));
                }
                let index = |part: &str| -> Result<Vec<usize>> {
                    let raw = file.read_integers(&matrix_name(g, j, part))?;
                    raw.iter()
                        .map(|&x| {
                            usize::try_from(x).map_err(|_| {
                                format(format!("negative index in group {g} matrix {j}"))
                            })
                        })
                        .collect()
                };
                let csr = CsMat::try_new(
                    (rank, cols),
                    index("row_offsets")?,
                    index("columns")?,
                    values.to_vec(),
                )
                .map_err(|(.., e)| {
                    format(format!("group {g} matrix {j}: invalid CSR structure ({e})"))
                })?;
                factors.push(SparseFactor::from_csr(&csr)?);
                biases.push(bias(j)?);
            }
            Ok(CompressedBlocks::SharedBasis(SharedBasisGroup::new(
                kind, activation, basis, factors, biases,
            )?))
        }
        Representation::LowRank => {
            let Some(GroupStructure::LowRank { bases: uses }) = &m.structure else {
                return Err(format(format!(
                    "group {g}: a low-rank group needs its structure (bases)"
                )));
            };
            if uses.len() != m.matrices.len() {
                return Err(format(format!(
                    "group {g}: {} basis entries for {} matrices",
                    uses.len(),
                    m.matrices.len()
                )));
            }
            let count = uses.iter().flatten().map(|u| u + 1).max().unwrap_or(0);
            let bases = (0..count)
                .map(|u| file.read_matrix(&name(g, &format!("basis.{u}"))))
                .collect::<Result<Vec<_>>>()?;
            let matrices = uses
                .iter()
                .enumerate()
                .map(|(j, &basis)| {
                    Ok(LowRankMatrix {
                        left: file.read_matrix(&matrix_name(g, j, "left"))?,
                        basis,
                        bias: bias(j)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(CompressedBlocks::LowRank(LowRankGroup::new(
                kind,
                activation,
                (m.width, m.intermediate),
                bases,
                matrices,
            )?))
        }
        Representation::Collapsed => {
            let (slopes, converged) = match &m.structure {
                Some(GroupStructure::Collapsed { slopes, converged }) => {
                    (slopes.as_slice(), converged.as_slice())
                }
                _ => (&[][..], &[][..]),
            };
            let blocks = (0..m.blocks.len())
                .map(|b| {
                    let map = if file.contains(&block_name(g, b, "weight")) {
                        CollapsedMap::Full(file.read_matrix(&block_name(g, b, "weight"))?)
                    } else {
                        CollapsedMap::Factored {
                            left: file.read_matrix(&block_name(g, b, "left"))?,
                            right: file.read_matrix(&block_name(g, b, "right"))?,
                        }
                    };
                    Ok(CollapsedBlock {
                        map,
                        bias: file.read_vector(&block_name(g, b, "bias"))?,
                        slope: slopes.get(b).copied().unwrap_or(f64::NAN),
                        converged: converged.get(b).copied().unwrap_or(false),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(CompressedBlocks::Collapsed(CollapsedGroup::new(
                m.width,
                m.intermediate,
                activation,
                blocks,
            )?))
        }
    }
}
