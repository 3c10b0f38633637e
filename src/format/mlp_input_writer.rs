//! Writing an MLP-input file (see [`crate::format::mlp_inputs`]) as the activations are produced.
//!
//! The sizes are known up front (`tokens × d` per block), so the safetensors header is written
//! first and each block's region is filled in row order with positioned writes as rows arrive:
//! memory stays at one batch of rows, however many tokens the file holds. The file is written
//! under a temporary name beside the destination (created exclusively under an unpredictable
//! name, never through a link: [`crate::foundation::safe_io`]), synced, and renamed into place by
//! [`MlpInputWriter::finish`] once every block's region is full; dropping an unfinished writer
//! removes the temporary file, so a failed or interrupted capture leaves no file behind.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::{Metadata, TensorInfo};

use crate::format::mlp_inputs::{MLP_INPUTS_FORMAT, mlp_input_name};
use crate::foundation::error::{FipsError, Result};
use crate::foundation::safe_io::{create_temporary_for, install_temporary};

/// An MLP-input file being written block region by block region.
#[derive(Debug)]
pub struct MlpInputWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    dtype: Dtype,
    tokens: usize,
    width: usize,
    /// `(block index, byte offset of its region, rows written)`.
    regions: Vec<(usize, u64, usize)>,
    scratch: Vec<u8>,
}

impl MlpInputWriter {
    /// Starts `path` for `blocks` (distinct block indices), each with `tokens` rows of width `d`,
    /// stored as `dtype` (`F32`, `F16` or `BF16`). `metadata` is added to the header beside
    /// `format` and `version`.
    pub fn create(
        path: impl AsRef<Path>,
        blocks: &[usize],
        tokens: usize,
        d: usize,
        dtype: Dtype,
        mut metadata: HashMap<String, String>,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if blocks.is_empty() || tokens == 0 || d == 0 {
            return Err(FipsError::InvalidParameter {
                name: "blocks",
                reason: format!(
                    "an MLP-input file needs blocks, tokens and width: got {} blocks, {tokens} tokens, d = {d}",
                    blocks.len()
                ),
            });
        }
        if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(FipsError::UnsupportedDtype {
                name: path.display().to_string(),
                dtype: dtype.to_string(),
                expected: "F32, F16 or BF16",
            });
        }
        let mut sorted = blocks.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != blocks.len() {
            return Err(FipsError::InvalidParameter {
                name: "blocks",
                reason: format!("block indices repeat: {blocks:?}"),
            });
        }
        let region = (tokens * d * dtype.bitsize() / 8) as u64;
        let infos: Vec<(String, TensorInfo)> = blocks
            .iter()
            .enumerate()
            .map(|(k, &b)| {
                let start = k * region as usize;
                (
                    mlp_input_name(b),
                    TensorInfo {
                        dtype,
                        shape: vec![tokens, d],
                        data_offsets: (start, start + region as usize),
                    },
                )
            })
            .collect();
        metadata.insert("format".into(), MLP_INPUTS_FORMAT.into());
        metadata.insert("version".into(), "1".into());
        let format = |reason: String| FipsError::Format {
            path: path.clone(),
            reason,
        };
        let header = Metadata::new(Some(metadata), infos)
            .map_err(|e| format(format!("cannot describe tensors: {e}")))?;
        let mut header = serde_json::to_vec(&header)
            .map_err(|e| format(format!("cannot serialise header: {e}")))?;
        header.resize(header.len().next_multiple_of(8), b' ');
        let data_start = 8 + header.len() as u64;
        let (mut file, tmp) = create_temporary_for(&path)?;
        let io = |source| FipsError::Io {
            path: tmp.clone(),
            source,
        };
        let written = file
            .write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|_| file.write_all(&header))
            .and_then(|_| file.set_len(data_start + region * blocks.len() as u64));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        let regions = blocks
            .iter()
            .enumerate()
            .map(|(k, &b)| (b, data_start + k as u64 * region, 0))
            .collect();
        Ok(Self {
            path,
            tmp,
            file: Some(file),
            dtype,
            tokens,
            width: d,
            regions,
            scratch: Vec::new(),
        })
    }

    /// Rows per block the file holds.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Rows written so far for `block`.
    pub fn written(&self, block: usize) -> Option<usize> {
        self.regions.iter().find(|r| r.0 == block).map(|r| r.2)
    }

    /// Appends rows (`rows.len()` a multiple of d, row-major) to `block`'s region.
    pub fn append(&mut self, block: usize, rows: &[f32]) -> Result<()> {
        let d = self.width;
        if !rows.len().is_multiple_of(d) {
            return Err(FipsError::ShapeMismatch {
                what: format!("rows for block {block}"),
                expected: vec![rows.len() / d, d],
                got: vec![rows.len()],
            });
        }
        let count = rows.len() / d;
        let element = self.dtype.bitsize() / 8;
        let tokens = self.tokens;
        let region =
            self.regions
                .iter_mut()
                .find(|r| r.0 == block)
                .ok_or(FipsError::IndexOutOfRange {
                    what: "block of the MLP-input file",
                    index: block,
                    len: self.tokens,
                })?;
        if region.2 + count > tokens {
            return Err(FipsError::InvalidParameter {
                name: "rows",
                reason: format!(
                    "block {block} would get {} rows, the file holds {tokens}",
                    region.2 + count
                ),
            });
        }
        self.scratch.clear();
        for &x in rows {
            match self.dtype {
                Dtype::F16 => self
                    .scratch
                    .extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                Dtype::BF16 => self
                    .scratch
                    .extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                _ => self.scratch.extend_from_slice(&x.to_le_bytes()),
            }
        }
        let offset = region.1 + (region.2 * d * element) as u64;
        let file = self.file.as_mut().ok_or_else(|| FipsError::Format {
            path: self.path.clone(),
            reason: "the writer is closed".into(),
        })?;
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.write_all(&self.scratch))
            .map_err(|source| FipsError::Io {
                path: self.tmp.clone(),
                source,
            })?;
        region.2 += count;
        Ok(())
    }

    /// Checks that every block's region is full, syncs the file and renames it into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        if let Some(&(block, _, rows)) = self.regions.iter().find(|r| r.2 != self.tokens) {
            return Err(FipsError::InvalidParameter {
                name: "rows",
                reason: format!(
                    "block {block} has {rows} rows of the {} the file was created for",
                    self.tokens
                ),
            });
        }
        if let Some(file) = self.file.take()
            && let Err(e) = install_temporary(file, &self.tmp, &self.path)
        {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(e);
        }
        Ok(self.path.clone())
    }
}

impl Drop for MlpInputWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::mlp_inputs::MlpInputs;
    use ndarray::Array2;

    #[test]
    fn streamed_rows_read_back_exactly_and_unfinished_files_vanish() {
        let dir = std::env::temp_dir().join(format!("fips-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("inputs.safetensors");
        let (tokens, d) = (7, 3);
        let z = |b: usize| {
            Array2::from_shape_fn((tokens, d), |(t, j)| (b * 100 + t * d + j) as f32 * 0.25)
        };
        let mut w =
            MlpInputWriter::create(&path, &[0, 2], tokens, d, Dtype::F32, HashMap::new()).unwrap();
        // Interleaved batches of uneven sizes, as a capture produces them.
        for (start, end) in [(0, 2), (2, 3), (3, 7)] {
            for b in [2, 0] {
                let rows = z(b)
                    .slice(crate::foundation::slicing::s![start..end, ..])
                    .to_owned();
                w.append(b, rows.as_slice().unwrap()).unwrap();
            }
        }
        assert!(w.append(0, &[1.0; 3]).is_err(), "overfull region");
        assert!(w.append(1, &[1.0; 3]).is_err(), "unknown block");
        w.finish().unwrap();
        let file = MlpInputs::open(&path).unwrap();
        assert_eq!(file.blocks(), vec![0, 2]);
        for b in [0, 2] {
            assert_eq!(file.read::<f32>(b).unwrap(), z(b));
        }
        // The safetensors crate accepts the file too.
        let bytes = std::fs::read(&path).unwrap();
        assert!(safetensors::SafeTensors::deserialize(&bytes).is_ok());

        // Half precision rounds; an unfinished writer leaves nothing behind.
        let half_path = dir.join("half.safetensors");
        let mut w =
            MlpInputWriter::create(&half_path, &[0], 2, 2, Dtype::BF16, HashMap::new()).unwrap();
        w.append(0, &[1.0, 2.0, 3.0, 4.0]).unwrap();
        w.finish().unwrap();
        assert_eq!(
            MlpInputs::open(&half_path).unwrap().read::<f32>(0).unwrap()[[1, 1]],
            4.0
        );
        let partial = dir.join("partial.safetensors");
        let mut w =
            MlpInputWriter::create(&partial, &[0], 2, 2, Dtype::F32, HashMap::new()).unwrap();
        w.append(0, &[1.0, 2.0]).unwrap();
        assert!(w.finish().is_err());
        assert!(!partial.exists());
        let leftovers = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with("tmp"))
            .count();
        assert_eq!(leftovers, 0);
        std::fs::remove_dir_all(dir).ok();
    }

    /// Issue 13: a link planted at the old predictable temporary name, or at the destination, is
    /// never written through.
    #[cfg(unix)]
    #[test]
    fn planted_links_are_never_written_through() {
        let dir = std::env::temp_dir().join(format!("fips-stream-links-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim.bin");
        std::fs::write(&victim, b"precious").unwrap();
        let path = dir.join("inputs.safetensors");
        let planted = dir.join(format!(".inputs.safetensors.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let mut w = MlpInputWriter::create(&path, &[0], 1, 2, Dtype::F32, HashMap::new()).unwrap();
        w.append(0, &[1.0, 2.0]).unwrap();
        w.finish().unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(
            MlpInputs::open(&path).unwrap().read::<f32>(0).unwrap()[[0, 1]],
            2.0
        );

        let linked = dir.join("linked.safetensors");
        std::os::unix::fs::symlink(&victim, &linked).unwrap();
        let err = MlpInputWriter::create(&linked, &[0], 1, 2, Dtype::F32, HashMap::new());
        assert!(
            matches!(err, Err(FipsError::UnsafeOutput { .. })),
            "{err:?}"
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        std::fs::remove_dir_all(dir).ok();
    }
}
