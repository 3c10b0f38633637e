//! Safetensors files: reading only the tensors needed, and writing atomically.
//!
//! A [`Checkpoint`] parses and validates the header, then reads each requested tensor's byte range
//! with a positioned read, so only the tensors used are ever loaded. (The files are not memory
//! mapped: mapping is `unsafe` in Rust, because another process may change a mapped file, and this
//! crate has no `unsafe` code. Positioned reads give the same memory profile.) `f32`, `f16`,
//! `bf16` and `f64` tensors convert to either float type on reading.
//!
//! [`write_safetensors`] and [`write_safetensors_from`] stream to a temporary file in the
//! destination's directory, sync it, and rename it over the destination: a crash leaves the old file
//! or the new one, never half of one.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2, ArrayD, IxDyn};
use safetensors::tensor::{Dtype, Metadata};

use crate::foundation::error::{FipsError, Result};
use crate::foundation::float::Float;

/// Largest header accepted (the safetensors format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Name, dtype and shape of one tensor of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Its element type, as safetensors spells it (`F32`, `BF16`, …).
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
}

impl TensorInfo {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An open safetensors file whose header has been validated.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    file: File,
    data_start: u64,
    tensors: BTreeMap<String, (TensorInfo, (usize, usize))>,
    metadata: HashMap<String, String>,
}

impl Checkpoint {
    /// Opens `path` and validates its header against the file's length (so a truncated file is
    /// reported here, not when a tensor is read).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| FipsError::Io {
            path: path.clone(),
            source,
        };
        let format = |reason: String| FipsError::Format {
            path: path.clone(),
            reason,
        };
        let mut file = File::open(&path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes)
            .map_err(|_| format(format!("not a safetensors file: only {file_len} bytes")))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES || header_len + 8 > file_len {
            return Err(format(format!(
                "not a safetensors file: header length {header_len} does not fit in {file_len} bytes"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(io)?;
        crate::math::limits::check_header_entries(&header, &path)?;
        let parsed: Metadata = serde_json::from_slice(&header)
            .map_err(|e| format(format!("corrupted safetensors header: {e}")))?;
        let data_start = 8 + header_len;
        let data_len = parsed.data_len() as u64;
        if data_start + data_len != file_len {
            return Err(format(format!(
                "truncated or padded file: the header describes {} data bytes, the file holds {}",
                data_len,
                file_len - data_start
            )));
        }
        let tensors = parsed
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let entry = TensorInfo {
                    name: name.clone(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                };
                (name, (entry, info.data_offsets))
            })
            .collect::<BTreeMap<_, _>>();
        crate::math::limits::check_extents(
            tensors
                .iter()
                .map(|(name, (info, _))| (name.as_str(), info.shape.as_slice())),
            data_len,
            &path,
        )?;
        Ok(Self {
            metadata: parsed.metadata().clone().unwrap_or_default(),
            path,
            file,
            data_start,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor, sorted by name.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.tensors.values().map(|(info, _)| info)
    }

    /// The tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// One tensor's description.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .map(|(info, _)| info)
            .ok_or_else(|| FipsError::MissingTensor {
                path: self.path.clone(),
                name: name.into(),
            })
    }

    /// The free-form string metadata of the header (`__metadata__`).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The raw little-endian bytes of one tensor.
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let (begin, end) = self.tensor_range(name)?;
        // The range was checked against the file's length at open: it fits in memory's indices.
        let mut bytes = vec![0u8; (end - begin) as usize];
        let mut file = &self.file;
        file.seek(SeekFrom::Start(begin))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|source| FipsError::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok(bytes)
    }

    /// The absolute byte range `[begin, end)` of one tensor's data in the file (checked against
    /// the file's length when it was opened).
    pub(crate) fn tensor_range(&self, name: &str) -> Result<(u64, u64)> {
        let (_, (begin, end)) = self
            .tensors
            .get(name)
            .ok_or_else(|| FipsError::MissingTensor {
                path: self.path.clone(),
                name: name.into(),
            })?;
        Ok((
            self.data_start + *begin as u64,
            self.data_start + *end as u64,
        ))
    }

    /// The file's length now (it may have changed since it was opened).
    pub(crate) fn current_len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|source| FipsError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Fills `buf` from absolute byte `offset` with one positioned read (no shared cursor, so
    /// concurrent readers do not disturb each other). The caller checks the range first.
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        #[cfg(unix)]
        let read = {
            use std::os::unix::fs::FileExt;
            self.file.read_exact_at(buf, offset)
        };
        #[cfg(not(unix))]
        let read = {
            let mut file = &self.file;
            file.seek(SeekFrom::Start(offset))
                .and_then(|_| file.read_exact(buf))
        };
        read.map_err(|source| FipsError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// A floating-point tensor (`F32`, `F16`, `BF16` or `F64` on disk), converted to `F`.
    pub fn read<F: Float>(&self, name: &str) -> Result<ArrayD<F>> {
        let info = self.info(name)?.clone();
        let bytes = self.read_bytes(name)?;
        let values = decode_floats::<F>(&info, &bytes)?;
        ArrayD::from_shape_vec(IxDyn(&info.shape), values).map_err(|e| FipsError::Format {
            path: self.path.clone(),
            reason: format!("tensor {name:?}: {e}"),
        })
    }

    /// A floating-point matrix, checked to be 2-D.
    pub fn read_matrix<F: Float>(&self, name: &str) -> Result<Array2<F>> {
        let a = self.read::<F>(name)?;
        let shape = a.shape().to_vec();
        a.into_dimensionality()
            .map_err(|_| FipsError::ShapeMismatch {
                what: format!("tensor {name:?} (a matrix)"),
                expected: vec![0, 0],
                got: shape,
            })
    }

    /// A floating-point vector, checked to be 1-D.
    pub fn read_vector<F: Float>(&self, name: &str) -> Result<Array1<F>> {
        let a = self.read::<F>(name)?;
        let shape = a.shape().to_vec();
        a.into_dimensionality()
            .map_err(|_| FipsError::ShapeMismatch {
                what: format!("tensor {name:?} (a vector)"),
                expected: vec![0],
                got: shape,
            })
    }

    /// An integer tensor (`U8`, `I32`, `I64`, `U32`) as `i64`.
    pub fn read_integers(&self, name: &str) -> Result<ArrayD<i64>> {
        let info = self.info(name)?.clone();
        let bytes = self.read_bytes(name)?;
        let values: Vec<i64> = match info.dtype {
            Dtype::U8 => bytes.iter().map(|&b| i64::from(b)).collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
            Dtype::U32 => bytes
                .chunks_exact(4)
                .map(|c| i64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
            other => {
                return Err(FipsError::UnsupportedDtype {
                    name: name.into(),
                    dtype: format!("{other:?}"),
                    expected: "U8, I32, U32 or I64",
                });
            }
        };
        ArrayD::from_shape_vec(IxDyn(&info.shape), values).map_err(|e| FipsError::Format {
            path: self.path.clone(),
            reason: format!("tensor {name:?}: {e}"),
        })
    }
}

/// Bytes per element of the float dtypes the crate reads (`F32`, `F64`, `F16`, `BF16`); `None`
/// for any other dtype.
pub(crate) fn float_bytes(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 => Some(4),
        Dtype::F64 => Some(8),
        Dtype::F16 | Dtype::BF16 => Some(2),
        _ => None,
    }
}

/// Decodes little-endian floats of `info.dtype` into `F`.
fn decode_floats<F: Float>(info: &TensorInfo, bytes: &[u8]) -> Result<Vec<F>> {
    // Another dtype decodes nothing: `decode_floats_into` rejects it below.
    let len = float_bytes(info.dtype).map_or(0, |size| bytes.len() / size);
    let mut out = vec![F::zero(); len];
    decode_floats_into(&info.name, info.dtype, bytes, &mut out)?;
    Ok(out)
}

/// Decodes little-endian floats of `dtype` (`F32`, `F16`, `BF16` or `F64`) into `out`, one value
/// per element of `out` (`bytes` holds at least `out.len()` of them; the caller sizes both).
pub(crate) fn decode_floats_into<F: Float>(
    name: &str,
    dtype: Dtype,
    bytes: &[u8],
    out: &mut [F],
) -> Result<()> {
    match dtype {
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = F::cast(f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
            }
        }
        Dtype::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = F::cast(f64::from_le_bytes([
                    c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
                ]));
            }
        }
        Dtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = F::cast(half::f16::from_le_bytes([c[0], c[1]]).to_f64());
            }
        }
        Dtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = F::cast(half::bf16::from_le_bytes([c[0], c[1]]).to_f64());
            }
        }
        other => {
            return Err(FipsError::UnsupportedDtype {
                name: name.into(),
                dtype: format!("{other:?}"),
                expected: "F32, F16, BF16 or F64",
            });
        }
    }
    Ok(())
}

/// A tensor to write: dtype, shape and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes, `shape.product() × dtype size` of them.
    pub bytes: Vec<u8>,
}

impl TensorData {
    /// Encodes floats into `dtype` (`F32`, `F16`, `BF16` or `F64`), rounding to nearest.
    pub fn from_floats<F: Float>(
        values: impl IntoIterator<Item = F>,
        shape: Vec<usize>,
        dtype: Dtype,
    ) -> Result<Self> {
        let mut bytes = Vec::new();
        for v in values {
            let x = v.as_f64();
            match dtype {
                Dtype::F32 => bytes.extend_from_slice(&(x as f32).to_le_bytes()),
                Dtype::F64 => bytes.extend_from_slice(&x.to_le_bytes()),
                Dtype::F16 => bytes.extend_from_slice(&half::f16::from_f64(x).to_le_bytes()),
                Dtype::BF16 => bytes.extend_from_slice(&half::bf16::from_f64(x).to_le_bytes()),
                other => {
                    return Err(FipsError::UnsupportedDtype {
                        name: String::new(),
                        dtype: format!("{other:?}"),
                        expected: "F32, F16, BF16 or F64",
                    });
                }
            }
        }
        Self::new(dtype, shape, bytes)
    }

    /// A `U32` tensor (CSR indices).
    pub fn from_u32(values: &[u32], shape: Vec<usize>) -> Result<Self> {
        Self::new(
            Dtype::U32,
            shape,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    /// Raw bytes, checked against the shape and dtype.
    pub fn new(dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) -> Result<Self> {
        let expected = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        if bytes.len() != expected {
            return Err(FipsError::ShapeMismatch {
                what: format!("bytes of a {dtype:?} tensor of shape {shape:?}"),
                expected: vec![expected],
                got: vec![bytes.len()],
            });
        }
        Ok(Self {
            dtype,
            shape,
            bytes,
        })
    }
}

/// Where the bytes of a tensor to write come from.
#[derive(Debug, Clone, Copy)]
pub enum TensorSource<'a> {
    /// Bytes in memory.
    Data(&'a TensorData),
    /// A tensor of an open checkpoint, copied unchanged (read only when it is written).
    Copy(&'a Checkpoint, &'a str),
}

impl TensorSource<'_> {
    fn dtype_and_shape(&self) -> Result<(Dtype, Vec<usize>)> {
        match self {
            Self::Data(t) => Ok((t.dtype, t.shape.clone())),
            Self::Copy(ck, name) => {
                let info = ck.info(name)?;
                Ok((info.dtype, info.shape.clone()))
            }
        }
    }
}

/// Writes `tensors` (and string `metadata`) as a safetensors file at `path`, atomically.
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &BTreeMap<String, TensorData>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let sources = tensors
        .iter()
        .map(|(k, v)| (k.clone(), TensorSource::Data(v)))
        .collect();
    write_safetensors_from(path, sources, metadata)
}

/// Writes a safetensors file whose tensors come from memory or are copied from open checkpoints,
/// streaming one tensor at a time (memory stays bounded by the largest tensor), atomically.
///
/// Tensors are laid out by decreasing element size, then name, after a header padded to a
/// multiple of 8 bytes, so every tensor is aligned to its element size (as the safetensors crate
/// does).
pub fn write_safetensors_from(
    path: impl AsRef<Path>,
    tensors: BTreeMap<String, TensorSource<'_>>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let format = |reason: String| FipsError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let mut entries = tensors
        .into_iter()
        .map(|(name, src)| {
            src.dtype_and_shape()
                .map(|(dtype, shape)| (name, dtype, shape, src))
        })
        .collect::<Result<Vec<_>>>()?;
    entries.sort_by(|a, b| {
        b.1.bitsize()
            .cmp(&a.1.bitsize())
            .then_with(|| a.0.cmp(&b.0))
    });
    let mut offset = 0;
    let mut infos = Vec::with_capacity(entries.len());
    for (name, dtype, shape, _) in &entries {
        let len = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        infos.push((
            name.clone(),
            safetensors::tensor::TensorInfo {
                dtype: *dtype,
                shape: shape.clone(),
                data_offsets: (offset, offset + len),
            },
        ));
        offset += len;
    }
    // Validated by the safetensors crate, serialised here with sorted metadata keys: its own
    // serialiser writes the metadata `HashMap` in a random order, so identical runs gave files
    // differing by a few bytes.
    Metadata::new(None, infos.clone())
        .map_err(|e| format(format!("cannot describe tensors: {e}")))?;
    let mut header = header_json(&metadata.into_iter().collect(), &infos)
        .map_err(|e| format(format!("cannot serialise header: {e}")))?;
    header.resize(header.len().next_multiple_of(8), b' ');
    write_atomically_with(path, |out| {
        out.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|_| out.write_all(&header))
            .map_err(|source| FipsError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        for (name, dtype, shape, src) in &entries {
            let expected = shape.iter().product::<usize>() * dtype.bitsize() / 8;
            let copied;
            let bytes: &[u8] = match src {
                TensorSource::Data(t) => &t.bytes,
                TensorSource::Copy(ck, n) => {
                    copied = ck.read_bytes(n)?;
                    &copied
                }
            };
            if bytes.len() != expected {
                return Err(format(format!(
                    "tensor {name:?} has {} bytes, expected {expected}",
                    bytes.len()
                )));
            }
            out.write_all(bytes).map_err(|source| FipsError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(())
    })
}

/// The header JSON: `__metadata__` first with its keys sorted, then the tensors in data order,
/// so equal inputs give byte-identical files.
fn header_json(
    metadata: &BTreeMap<String, String>,
    infos: &[(String, safetensors::tensor::TensorInfo)],
) -> serde_json::Result<Vec<u8>> {
    let mut out = b"{".to_vec();
    let mut first = true;
    if !metadata.is_empty() {
        out.extend_from_slice(b"\"__metadata__\":");
        serde_json::to_writer(&mut out, metadata)?;
        first = false;
    }
    for (name, info) in infos {
        if !first {
            out.push(b',');
        }
        first = false;
        serde_json::to_writer(&mut out, name)?;
        out.push(b':');
        serde_json::to_writer(&mut out, info)?;
    }
    out.push(b'}');
    Ok(out)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, and renames it into place (see
/// [`crate::foundation::safe_io`]).
pub fn write_atomically(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    crate::foundation::safe_io::write_atomically(path, bytes)
}

/// Runs `write` on a buffered temporary file beside `path`; on success syncs it and renames it over
/// `path`, on failure removes it. A crash at any point leaves either the old file or the new one.
/// The temporary is created exclusively under an unpredictable name, and a destination that is a
/// symbolic link is refused: see [`crate::foundation::safe_io::write_atomically_with`].
pub fn write_atomically_with(
    path: impl AsRef<Path>,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    crate::foundation::safe_io::write_atomically_with(path, write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fips-ckpt-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn round_trip_every_float_dtype() {
        let dir = temp_dir("dtypes");
        let path = dir.join("t.safetensors");
        let values = [1.0f64, -2.5, 0.333_333_333_333, 65504.0, 1e-3, 7.0];
        let mut tensors = BTreeMap::new();
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64] {
            tensors.insert(
                format!("{dtype:?}"),
                TensorData::from_floats(values.iter().copied(), vec![2, 3], dtype).unwrap(),
            );
        }
        tensors.insert(
            "idx".into(),
            TensorData::from_u32(&[1, 2, 3], vec![3]).unwrap(),
        );
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        write_safetensors(&path, &tensors, meta).unwrap();
        let ck = Checkpoint::open(&path).unwrap();
        assert_eq!(ck.metadata().get("k").map(String::as_str), Some("v"));
        for (dtype, tol) in [
            (Dtype::F32, 1e-7),
            (Dtype::F16, 1e-3),
            (Dtype::BF16, 1e-2),
            (Dtype::F64, 0.0),
        ] {
            let a: Array2<f64> = ck.read_matrix(&format!("{dtype:?}")).unwrap();
            for (x, y) in a.iter().zip(values) {
                assert!((x - y).abs() <= tol * y.abs(), "{dtype:?}: {x} vs {y}");
            }
        }
        assert_eq!(
            ck.read_integers("idx").unwrap().into_raw_vec_and_offset().0,
            vec![1, 2, 3]
        );
        assert!(matches!(
            ck.read::<f32>("nope"),
            Err(FipsError::MissingTensor { .. })
        ));
        assert!(matches!(
            ck.read::<f32>("idx"),
            Err(FipsError::UnsupportedDtype { .. })
        ));
        assert!(matches!(
            ck.read_vector::<f32>("F32"),
            Err(FipsError::ShapeMismatch { .. })
        ));
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn streamed_copies_match_and_the_safetensors_crate_reads_them() {
        let dir = temp_dir("stream");
        let src = dir.join("src.safetensors");
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "a".into(),
            TensorData::from_floats([1.0f32, 2.0], vec![2], Dtype::BF16).unwrap(),
        );
        tensors.insert(
            "b".into(),
            TensorData::from_floats([3.0f32; 6], vec![2, 3], Dtype::F32).unwrap(),
        );
        write_safetensors(&src, &tensors, HashMap::new()).unwrap();
        let ck = Checkpoint::open(&src).unwrap();
        let replacement = TensorData::from_floats([9.0f32; 6], vec![2, 3], Dtype::F32).unwrap();
        let dst = dir.join("dst.safetensors");
        let sources = BTreeMap::from([
            ("a".to_string(), TensorSource::Copy(&ck, "a")),
            ("b".to_string(), TensorSource::Data(&replacement)),
        ]);
        write_safetensors_from(&dst, sources, HashMap::from([("m".into(), "1".into())])).unwrap();
        let bytes = std::fs::read(&dst).unwrap();
        let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(
            parsed.tensor("a").unwrap().data(),
            ck.read_bytes("a").unwrap().as_slice()
        );
        assert_eq!(
            parsed.tensor("b").unwrap().data(),
            replacement.bytes.as_slice()
        );
        // Bad sources are errors and leave no file behind.
        let wrong = TensorData {
            dtype: Dtype::F32,
            shape: vec![5],
            bytes: vec![0; 4],
        };
        let bad = dir.join("bad.safetensors");
        let sources = BTreeMap::from([("w".to_string(), TensorSource::Data(&wrong))]);
        assert!(write_safetensors_from(&bad, sources, HashMap::new()).is_err());
        assert!(!bad.exists());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn corrupted_and_truncated_files_are_format_errors() {
        let dir = temp_dir("bad");
        let good = dir.join("good.safetensors");
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "w".into(),
            TensorData::from_floats((0..12).map(|x| x as f32), vec![3, 4], Dtype::F32).unwrap(),
        );
        write_safetensors(&good, &tensors, HashMap::new()).unwrap();
        let bytes = std::fs::read(&good).unwrap();

        let truncated = dir.join("truncated.safetensors");
        std::fs::write(&truncated, &bytes[..bytes.len() - 5]).unwrap();
        assert!(matches!(
            Checkpoint::open(&truncated),
            Err(FipsError::Format { .. })
        ));

        let mut corrupt = bytes.clone();
        corrupt[8] = b'#'; // the header's opening brace
        let corrupted = dir.join("corrupted.safetensors");
        std::fs::write(&corrupted, &corrupt).unwrap();
        assert!(matches!(
            Checkpoint::open(&corrupted),
            Err(FipsError::Format { .. })
        ));

        let tiny = dir.join("tiny.safetensors");
        std::fs::write(&tiny, b"abc").unwrap();
        assert!(matches!(
            Checkpoint::open(&tiny),
            Err(FipsError::Format { .. })
        ));

        let huge_header = dir.join("huge.safetensors");
        std::fs::write(&huge_header, u64::MAX.to_le_bytes()).unwrap();
        assert!(matches!(
            Checkpoint::open(&huge_header),
            Err(FipsError::Format { .. })
        ));

        assert!(matches!(
            Checkpoint::open(dir.join("missing")),
            Err(FipsError::Io { .. })
        ));
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn atomic_write_replaces_whole_files_and_leaves_no_temporaries() {
        let dir = temp_dir("atomic");
        let path = dir.join("out.bin");
        write_atomically(&path, b"first").unwrap();
        write_atomically(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        // A destination in a missing directory fails cleanly.
        assert!(matches!(
            write_atomically(dir.join("no/such/dir/x"), b"x"),
            Err(FipsError::Io { .. })
        ));
        std::fs::remove_dir_all(dir).ok();
    }
}
