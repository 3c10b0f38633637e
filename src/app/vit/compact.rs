//! A ViT whose compressed MLPs run straight from a compact file (format 3): each compressed
//! block's MLP is evaluated from the shared basis `U` and the compact sparse factors
//! ([`crate::repr::sparse_mlp`]), never from a rebuilt dense weight.

use std::collections::BTreeMap;
use std::sync::Arc;

use ndarray::{Array2, ArrayView2, Axis};

use super::VisionTransformer;
use crate::format::checkpoint::Checkpoint;
use crate::format::compact_file::{AnyCompactGroup, CompactBlocks, CompactModel};
use crate::foundation::activation::Activation;
use crate::foundation::error::{FipsError, Result, invalid};
use crate::foundation::mlp::DenseMlp;
use crate::repr::sparse_mlp::ForwardBuffers;

/// Tokens per call of a compact block's forward pass (a compact block's input is split into
/// chunks of this many rows, bounding its scratch to about `(2r + f I) · 512` floats).
pub const COMPACT_TOKENS: usize = 512;

/// The MLP of one block: dense, or one block of a compact shared-basis group.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockMlp {
    /// A dense MLP (original, or a compressed block rebuilt dense).
    Dense(DenseMlp<f32>),
    /// Block `position` of a compact group, evaluated from its compressed form.
    Compact {
        /// The group (shared by its blocks).
        group: Arc<AnyCompactGroup>,
        /// The block's position in the group.
        position: usize,
    },
}

impl BlockMlp {
    /// The block's output for inputs `x` (`[tokens, d]`).
    pub fn forward(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        match self {
            Self::Dense(m) => m.forward(x),
            Self::Compact { group, position } => {
                if x.nrows() <= COMPACT_TOKENS {
                    return group.forward(*position, x);
                }
                // Bounded scratch: the compact forward holds about `(2r + 2 f I)` floats per
                // token, reused from chunk to chunk.
                let mut out = Array2::zeros(x.raw_dim());
                let mut buffers = ForwardBuffers::default();
                for (xc, mut oc) in x
                    .axis_chunks_iter(Axis(0), COMPACT_TOKENS)
                    .zip(out.axis_chunks_iter_mut(Axis(0), COMPACT_TOKENS))
                {
                    oc.assign(&group.forward_with(*position, xc, &mut buffers)?);
                }
                Ok(out)
            }
        }
    }

    /// Stored weight parameters: every weight of a dense MLP; for a compact block the kept
    /// entries of its sparse factors, plus the group's basis `U` (`d·r`) on the group's first
    /// block (so that a sum over blocks counts it once).
    pub fn weight_count(&self) -> usize {
        match self {
            Self::Dense(m) => m.weight_count(),
            Self::Compact { group, position } => group.block_weight_count(*position),
        }
    }

    /// Stored bias parameters.
    pub fn bias_count(&self) -> usize {
        match self {
            Self::Dense(m) => m.bias_count(),
            Self::Compact { group, position } => group.block_bias_count(*position),
        }
    }
}

/// Blocks of a timm ViT: the number of `blocks.{b}.norm1.weight` tensors, which must be
/// `0..depth` (the MLP tensors of compressed blocks are not in a compact file).
fn depth(ck: &Checkpoint) -> Result<usize> {
    let mut found = Vec::new();
    for name in ck.names() {
        if let Some(b) = name
            .strip_prefix("blocks.")
            .and_then(|rest| rest.strip_suffix(".norm1.weight"))
            .and_then(|b| b.parse::<usize>().ok())
        {
            found.push(b);
        }
    }
    found.sort_unstable();
    if found.is_empty() || found.iter().enumerate().any(|(k, &b)| k != b) {
        return Err(invalid(
            "checkpoint",
            format!(
                "{}: the blocks.{{b}}.norm1.weight tensors are not blocks 0..n",
                ck.path().display()
            ),
        ));
    }
    Ok(found.len())
}

impl VisionTransformer {
    /// Loads a ViT from a compact compressed file (format 3): every compressed shared-basis
    /// (FiPS) block runs from its compressed form; low-rank and collapsed blocks are rebuilt dense
    /// (they hold exactly their parameters); every other tensor comes from the file itself when it
    /// is self-contained, else from `original` (an error when it is not given). Only the compact
    /// groups and the uncompressed tensors are held in memory.
    pub fn from_compact(
        file: &Checkpoint,
        original: Option<&Checkpoint>,
        heads: Option<usize>,
    ) -> Result<Self> {
        let model = CompactModel::read_from(file, original)?;
        let source = if model.manifest.self_contained {
            file
        } else {
            original.ok_or_else(|| FipsError::InvalidParameter {
                name: "original",
                reason: format!(
                    "{} holds only the compressed MLPs: give the original checkpoint",
                    file.path().display()
                ),
            })?
        };
        let depth = depth(source)?;
        let width = source
            .info("patch_embed.proj.weight")?
            .shape
            .first()
            .copied()
            .unwrap_or(0);
        let mut compressed: BTreeMap<usize, BlockMlp> = BTreeMap::new();
        let CompactModel { manifest, groups } = model;
        for (gm, group) in manifest.groups.iter().zip(groups) {
            let (shared, other) = match group {
                CompactBlocks::SharedBasis(g) => (Some(Arc::new(g)), None),
                other => (None, Some(other)),
            };
            for (position, &b) in gm.blocks.iter().enumerate() {
                let mlp = match (&shared, &other) {
                    (Some(group), _) => BlockMlp::Compact {
                        group: Arc::clone(group),
                        position,
                    },
                    (None, Some(group)) => BlockMlp::Dense(group.to_dense_mlp(position)?),
                    (None, None) => return Err(invalid("group", "no compressed form")),
                };
                let mlp_width = match &mlp {
                    BlockMlp::Dense(m) => m.width(),
                    BlockMlp::Compact { group, .. } => group.width(),
                };
                if mlp_width != width {
                    return Err(FipsError::Format {
                        path: file.path().to_path_buf(),
                        reason: format!(
                            "block {b}'s compressed MLP has width {mlp_width}, the model {width}"
                        ),
                    });
                }
                if b >= depth || compressed.insert(b, mlp).is_some() {
                    return Err(FipsError::Format {
                        path: file.path().to_path_buf(),
                        reason: format!(
                            "block {b} is not one of the model's {depth} blocks, or is in two groups"
                        ),
                    });
                }
            }
        }
        // The uncompressed blocks' MLPs, by their timm names (the layout of the whole model
        // cannot be detected: the compressed blocks' tensors are not in the file).
        let activation = manifest
            .groups
            .first()
            .and_then(|g| g.activation.parse::<Activation>().ok())
            .unwrap_or(Activation::Gelu);
        Self::load(source, heads, depth, |b| match compressed.remove(&b) {
            Some(mlp) => Ok(mlp),
            None => {
                let prefix = format!("blocks.{b}.mlp");
                let fc1 = format!("{prefix}.fc1.weight");
                let i = source.info(&fc1)?.shape.first().copied().unwrap_or(0);
                Ok(BlockMlp::Dense(DenseMlp::standard(
                    super::linear(source, &format!("{prefix}.fc1"), i, width)?,
                    super::linear(source, &format!("{prefix}.fc2"), width, i)?,
                    activation,
                )?))
            }
        })
    }
}
