//! Checks of a compressed checkpoint's manifest against the original checkpoint, before any factor
//! is read.
//!
//! The manifest is JSON in the file's header: every number and name in it is whatever the file
//! says. Reading the factors trusts it (a manifest claiming `intermediate = 2^40` makes the reader
//! allocate dense factors of that width), and densifying writes each rebuilt matrix under the
//! tensor name the manifest gives (a manifest whose names point at another block silently writes
//! block 0's weights into block 5). Where the original checkpoint is at hand (`densify`, `eval`),
//! [`check_against_original`] compares the manifest with the original's MLP layout first: every
//! group's blocks exist and are used once, its kind, width and MLP width are the original's, and
//! every matrix's block, role, weight and bias names and shape are exactly the original tensors of
//! that block and role. Allocation is then bounded by the original's real shapes.

use crate::format::checkpoint::Checkpoint;
use crate::format::compressed::{MANIFEST_KEY, Manifest};
use crate::format::layout::MlpLayout;
use crate::foundation::error::{FipsError, Result};

/// The manifest of a compressed checkpoint, parsed from its header (no tensor is read).
pub fn read_manifest(compressed: &Checkpoint) -> Result<Manifest> {
    let format = |reason: String| FipsError::Format {
        path: compressed.path().to_path_buf(),
        reason,
    };
    let text = compressed.metadata().get(MANIFEST_KEY).ok_or_else(|| {
        format(format!(
            "no {MANIFEST_KEY} metadata: not a fips compressed checkpoint"
        ))
    })?;
    serde_json::from_str(text).map_err(|e| format(format!("unreadable manifest: {e}")))
}

/// Checks the manifest of `compressed` against the MLP layout of `original` (see the module
/// documentation). Errors are [`FipsError::Format`] naming the compressed file and the first
/// mismatch.
pub fn check_against_original(compressed: &Checkpoint, original: &Checkpoint) -> Result<()> {
    let manifest = read_manifest(compressed)?;
    let layout = MlpLayout::detect(original)?;
    check_manifest(&manifest, &layout, original).map_err(|reason| FipsError::Format {
        path: compressed.path().to_path_buf(),
        reason: format!(
            "the manifest does not match the original checkpoint {}: {reason}",
            original.path().display()
        ),
    })
}

fn check_manifest(
    manifest: &Manifest,
    layout: &MlpLayout,
    original: &Checkpoint,
) -> std::result::Result<(), String> {
    let kind = layout.kind();
    let f = kind.matrices_per_block();
    let mut used = vec![false; layout.blocks()];
    for (g, group) in manifest.groups.iter().enumerate() {
        if group.kind != kind {
            return Err(format!(
                "group {g} is of kind {}, the original's blocks are {}",
                group.kind.name(),
                kind.name()
            ));
        }
        if group.blocks.is_empty() {
            return Err(format!("group {g} has no blocks"));
        }
        if group.matrices.len() != f * group.blocks.len() {
            return Err(format!(
                "group {g} lists {} matrices for {} blocks of {f}",
                group.matrices.len(),
                group.blocks.len()
            ));
        }
        for (position, &b) in group.blocks.iter().enumerate() {
            let slot = used.get_mut(b).ok_or_else(|| {
                format!(
                    "group {g} names block {b}; the original has {}",
                    layout.blocks()
                )
            })?;
            if std::mem::replace(slot, true) {
                return Err(format!("block {b} is in more than one group"));
            }
            let tensors = layout.block(b).map_err(|e| e.to_string())?;
            if (group.width, group.intermediate) != (tensors.width, tensors.intermediate) {
                return Err(format!(
                    "group {g} has (d, I) = ({}, {}), block {b} of the original has ({}, {})",
                    group.width, group.intermediate, tensors.width, tensors.intermediate
                ));
            }
            for k in 0..f {
                let m = &group.matrices[position * f + k];
                let role = kind.matrix_names()[k];
                let expected_shape = original
                    .info(&tensors.weights[k])
                    .map_err(|e| e.to_string())?
                    .shape
                    .clone();
                if m.block != b
                    || m.role != role
                    || m.weight != tensors.weights[k]
                    || m.bias != tensors.biases[k]
                    || m.shape != expected_shape
                {
                    return Err(format!(
                        "group {g} matrix {}: block {}, role {:?}, weight {:?}, bias {:?}, shape {:?}; \
                         the original's block {b} {role} is {:?}, bias {:?}, shape {:?}",
                        position * f + k,
                        m.block,
                        m.role,
                        m.weight,
                        m.bias,
                        m.shape,
                        tensors.weights[k],
                        tensors.biases[k],
                        expected_shape
                    ));
                }
            }
        }
    }
    Ok(())
}
