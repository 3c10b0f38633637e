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
use std::path::Path;

use ndarray::{Array2, ArrayView2};
use safetensors::Dtype;

use crate::format::checkpoint::{Checkpoint, TensorData, write_safetensors};
use crate::foundation::error::{FipsError, Result};
use crate::foundation::float::Float;
use crate::math::calibration::Calibration;

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

/// An open MLP-input file.
#[derive(Debug)]
pub struct MlpInputs {
    file: Checkpoint,
    shapes: BTreeMap<usize, (usize, usize)>,
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
            let block = info
                .name
                .strip_prefix("blocks.")
                .and_then(|rest| rest.strip_suffix(".mlp_input"))
                .and_then(|b| b.parse::<usize>().ok())
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
        Ok(Self { file, shapes })
    }

    /// The block indices present, ascending.
    pub fn blocks(&self) -> Vec<usize> {
        self.shapes.keys().copied().collect()
    }

    /// `(tokens, d)` of a block, if present.
    pub fn shape(&self, block: usize) -> Option<(usize, usize)> {
        self.shapes.get(&block).copied()
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
}
