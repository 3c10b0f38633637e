//! Outputs: the compressed checkpoint (factors plus a manifest) and the densified checkpoint.
//!
//! **Compressed checkpoint.** A safetensors file holding, for every group `g`:
//! `group.{g}.basis` (`U`, `[d, r]`, F32), for every matrix `j` of the group in module order the
//! CSR arrays of `V_j` — `group.{g}.matrix.{j}.values` (`[nnz]`, F32), `.columns` (`[nnz]`, U32)
//! and `.row_offsets` (`[r + 1]`, U32) — and its bias `group.{g}.matrix.{j}.bias` (F32) if it has
//! one. The header metadata `fips.manifest` is a JSON [`Manifest`]: method and parameters, the
//! groups' blocks, ranks and sparsity, and each matrix's original tensor names, shape and dtype.
//!
//! **Densified checkpoint.** The original file with every compressed MLP weight (and its trained
//! bias) replaced by the rebuilt dense tensor, same name, shape and dtype, and every other tensor
//! copied byte for byte, so any loader of the original architecture reads it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ndarray::{Array1, ArrayD};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use sprs::CsMat;

use crate::activation::Activation;
use crate::checkpoint::{
    Checkpoint, TensorData, TensorSource, write_safetensors, write_safetensors_from,
};
use crate::error::{FipsError, Result};
use crate::factors::{SharedBasis, SparseFactor};
use crate::group::CompressedGroup;
use crate::mlp::MlpKind;

/// The `format` field of a compressed checkpoint's manifest.
pub const COMPRESSED_FORMAT: &str = "fips-compressed";
/// The header metadata key holding the manifest.
pub const MANIFEST_KEY: &str = "fips.manifest";
const FORMAT_VERSION: u32 = 1;

/// What a compressed checkpoint holds and how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`COMPRESSED_FORMAT`].
    pub format: String,
    /// Version of this layout.
    pub format_version: u32,
    /// Version of the crate that wrote the file.
    pub crate_version: String,
    /// Compression method (`fips`).
    pub method: String,
    /// The method's parameters.
    pub parameters: serde_json::Value,
    /// The checkpoint that was compressed.
    pub source: Option<String>,
    /// Its MLP naming scheme.
    pub scheme: Option<String>,
    /// Whether the calibration data was synthetic (data-free).
    pub data_free: bool,
    /// One entry per group.
    pub groups: Vec<GroupManifest>,
}

/// One compressed group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupManifest {
    /// The blocks of the group, in order.
    pub blocks: Vec<usize>,
    /// `standard` or `gated`.
    pub kind: String,
    /// The activation's name.
    pub activation: String,
    /// Width d.
    pub width: usize,
    /// MLP width I.
    pub intermediate: usize,
    /// Rank r.
    pub rank: usize,
    /// Nonzeros of the factors.
    pub nnz: usize,
    /// Achieved sparsity of the factors.
    pub sparsity: f64,
    /// Every matrix of the group, module order.
    pub matrices: Vec<MatrixManifest>,
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
    /// A manifest for `method` with `parameters`, to which groups are added.
    pub fn new(method: &str, parameters: serde_json::Value) -> Self {
        Self {
            format: COMPRESSED_FORMAT.into(),
            format_version: FORMAT_VERSION,
            crate_version: env!("CARGO_PKG_VERSION").into(),
            method: method.into(),
            parameters,
            source: None,
            scheme: None,
            data_free: false,
            groups: Vec::new(),
        }
    }
}

impl GroupManifest {
    /// Describes `group` covering `blocks`, given the original tensors of each matrix (module
    /// order: `(weight name, bias name, shape, dtype)`).
    pub fn describe(
        group: &CompressedGroup<f32>,
        blocks: &[usize],
        originals: Vec<(String, Option<String>, Vec<usize>, Dtype)>,
    ) -> Result<Self> {
        let f = group.kind().matrices_per_block();
        if blocks.len() != group.blocks() || originals.len() != group.factors().len() {
            return Err(FipsError::ShapeMismatch {
                what: "blocks and original tensors of a compressed group".into(),
                expected: vec![group.blocks(), group.factors().len()],
                got: vec![blocks.len(), originals.len()],
            });
        }
        let matrices = originals
            .into_iter()
            .enumerate()
            .map(|(j, (weight, bias, shape, dtype))| MatrixManifest {
                block: blocks[j / f],
                role: group.kind().matrix_names()[j % f].into(),
                weight,
                bias,
                shape,
                dtype: format!("{dtype:?}"),
            })
            .collect();
        Ok(Self {
            blocks: blocks.to_vec(),
            kind: group.kind().name().into(),
            activation: group.activation().name().into(),
            width: group.width(),
            intermediate: group.intermediate(),
            rank: group.rank(),
            nnz: group.nnz(),
            sparsity: group.sparsity(),
            matrices,
        })
    }
}

/// A compressed model: its manifest and its groups.
#[derive(Debug, Clone, PartialEq)]
pub struct CompressedModel {
    /// What the file holds.
    pub manifest: Manifest,
    /// The groups, in manifest order.
    pub groups: Vec<CompressedGroup<f32>>,
}

fn name(g: usize, part: &str) -> String {
    format!("group.{g}.{part}")
}

fn matrix_name(g: usize, j: usize, part: &str) -> String {
    format!("group.{g}.matrix.{j}.{part}")
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
            if m.rank != group.rank()
                || m.blocks.len() != group.blocks()
                || m.matrices.len() != group.factors().len()
                || m.kind != group.kind().name()
                || m.activation != group.activation().name()
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
        for (g, group) in self.groups.iter().enumerate() {
            let u = group.basis().view();
            tensors.insert(
                name(g, "basis"),
                TensorData::from_floats(u.iter().copied(), u.shape().to_vec(), Dtype::F32)?,
            );
            for (j, v) in group.factors().iter().enumerate() {
                let csr = v.to_csr();
                let (offsets, columns, values) = (csr.indptr(), csr.indices(), csr.data());
                let to_u32 = |x: &[usize]| x.iter().map(|&i| i as u32).collect::<Vec<_>>();
                let offsets = to_u32(&offsets.to_proper());
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
                    TensorData::from_u32(&to_u32(columns), vec![columns.len()])?,
                );
                tensors.insert(
                    matrix_name(g, j, "row_offsets"),
                    TensorData::from_u32(&offsets, vec![offsets.len()])?,
                );
                if let Some(b) = &group.biases()[j] {
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
        let manifest: Manifest =
            serde_json::from_str(text).map_err(|e| format(format!("unreadable manifest: {e}")))?;
        if manifest.format != COMPRESSED_FORMAT || manifest.format_version != FORMAT_VERSION {
            return Err(format(format!(
                "format {} version {} is not {COMPRESSED_FORMAT} version {FORMAT_VERSION}",
                manifest.format, manifest.format_version
            )));
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

    /// The dense tensors that replace the originals: every compressed weight in its original layout
    /// and every bias, keyed by original tensor name.
    pub fn dense_tensors(&self) -> Result<BTreeMap<String, ArrayD<f32>>> {
        self.check()?;
        let mut out = BTreeMap::new();
        for (m, group) in self.manifest.groups.iter().zip(&self.groups) {
            let f = group.kind().matrices_per_block();
            for (j, matrix) in m.matrices.iter().enumerate() {
                let w = group.dense_weight(j / f, j % f)?;
                if w.shape() != matrix.shape.as_slice() {
                    return Err(FipsError::ShapeMismatch {
                        what: format!("rebuilt {}", matrix.weight),
                        expected: matrix.shape.clone(),
                        got: w.shape().to_vec(),
                    });
                }
                out.insert(matrix.weight.clone(), w.into_dyn());
                if let (Some(name), Some(b)) = (&matrix.bias, &group.biases()[j]) {
                    out.insert(name.clone(), b.clone().into_dyn());
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

fn read_group(file: &Checkpoint, g: usize, m: &GroupManifest) -> Result<CompressedGroup<f32>> {
    let format = |reason: String| FipsError::Format {
        path: file.path().to_path_buf(),
        reason,
    };
    let kind = match m.kind.as_str() {
        "standard" => MlpKind::Standard,
        "gated" => MlpKind::Gated,
        other => return Err(format(format!("group {g}: unknown block kind {other:?}"))),
    };
    let activation: Activation = m.activation.parse()?;
    let basis = SharedBasis::new(file.read_matrix(&name(g, "basis"))?)?;
    let (rank, cols) = (basis.rank(), m.intermediate);
    let mut factors = Vec::with_capacity(m.matrices.len());
    let mut biases = Vec::with_capacity(m.matrices.len());
    for j in 0..m.matrices.len() {
        let values: Array1<f32> = file.read_vector(&matrix_name(g, j, "values"))?;
        let index = |part: &str| -> Result<Vec<usize>> {
            let raw = file.read_integers(&matrix_name(g, j, part))?;
            raw.iter()
                .map(|&x| {
                    usize::try_from(x)
                        .map_err(|_| format(format!("negative index in group {g} matrix {j}")))
                })
                .collect()
        };
        let csr = CsMat::try_new(
            (rank, cols),
            index("row_offsets")?,
            index("columns")?,
            values.to_vec(),
        )
        .map_err(|(.., e)| format(format!("group {g} matrix {j}: invalid CSR structure ({e})")))?;
        factors.push(SparseFactor::from_csr(&csr)?);
        let bias_name = matrix_name(g, j, "bias");
        biases.push(if file.contains(&bias_name) {
            Some(file.read_vector(&bias_name)?)
        } else {
            None
        });
    }
    CompressedGroup::new(kind, activation, basis, factors, biases)
}
