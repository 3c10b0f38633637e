//! Compact storage of sparse factors: kept values in the checkpoint's own dtype and the sparsity
//! pattern in the smallest exact encoding.
//!
//! A sparse matrix `S` (`rows × cols`) is stored as
//! - its **kept values** in row-major order (row by row, columns increasing), `nnz` of them, in a
//!   [`StorageDtype`] (`f32`, `f16` or `bf16`: the dtype of the checkpoint it came from);
//! - its **pattern** in one of three exact encodings, chosen per matrix as the smallest
//!   ([`PatternEncoding`]):
//!   - `full`: every entry is kept; 0 bytes (only possible when `nnz = rows · cols`);
//!   - `bitmask`: `rows · ⌈cols / 8⌉` bytes; entry `(i, c)` is kept when bit `c mod 8` (least
//!     significant bit first) of byte `i ⌈cols/8⌉ + ⌊c/8⌋` is set. Each row starts on a byte boundary
//!     and its padding bits are zero;
//!   - `row-gaps`: `counts` (`u32` per row: the kept entries of the row) and `gaps` (`u16` per kept
//!     entry): within a row the first kept column is `gaps[0]` and each next one is
//!     `previous + 1 + gap`. Possible only when every gap fits in 16 bits (always when
//!     `cols ≤ 65 536`). It takes `4 rows + 2 nnz` bytes, smaller than the bitmask below a density of
//!     about 1/16.
//!
//! Ties go to the earlier encoding of that list. Encoding and decoding are exact (bit-identical
//! values and pattern), and every decoder checks each count and length against the bytes it is
//! given before allocating anything sized by them.

use std::fmt::{self, Debug};
use std::ops::Range;
use std::str::FromStr;

use ndarray::{Array2, ArrayView2};

use crate::foundation::error::{FipsError, Result};

/// The element type of stored values: the checkpoint's own float type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StorageDtype {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (the upper 16 bits of a binary32).
    Bf16,
}

impl StorageDtype {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }

    /// The safetensors dtype.
    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            Self::F32 => safetensors::Dtype::F32,
            Self::F16 => safetensors::Dtype::F16,
            Self::Bf16 => safetensors::Dtype::BF16,
        }
    }

    /// The storage dtype for a safetensors dtype, if it is one.
    pub fn from_safetensors(dtype: safetensors::Dtype) -> Option<Self> {
        match dtype {
            safetensors::Dtype::F32 => Some(Self::F32),
            safetensors::Dtype::F16 => Some(Self::F16),
            safetensors::Dtype::BF16 => Some(Self::Bf16),
            _ => None,
        }
    }

    /// The name used in manifests (`F32`, `F16`, `BF16`, as safetensors spells them).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Bf16 => "BF16",
        }
    }
}

impl fmt::Display for StorageDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A stored value type: `f32`, [`half::f16`] or [`half::bf16`]. Every value converts to `f32`
/// exactly; `f32` converts to the type by rounding to nearest, ties to even.
pub trait StorageFloat:
    Copy + Default + PartialEq + Debug + Send + Sync + sealed::Sealed + 'static
{
    /// The dtype tag.
    const DTYPE: StorageDtype;
    /// `x` rounded to this type.
    fn from_f32(x: f32) -> Self;
    /// The exact `f32` value.
    fn to_f32(self) -> f32;
    /// Whether the value is finite.
    fn is_finite_value(self) -> bool;
    /// Appends the little-endian bytes of `values` to `out`.
    fn extend_le_bytes(values: &[Self], out: &mut Vec<u8>);
    /// Decodes little-endian bytes (`bytes.len()` a multiple of the size; a remainder is ignored).
    fn from_le_bytes(bytes: &[u8]) -> Vec<Self>;
    /// `dst[i] = src[i]` as `f32`, for the shorter of the two lengths.
    fn widen(src: &[Self], dst: &mut [f32]);
    /// The values as `f32` without conversion, when the type is `f32`.
    fn as_f32_slice(values: &[Self]) -> Option<&[f32]>;
}

impl StorageFloat for f32 {
    const DTYPE: StorageDtype = StorageDtype::F32;
    #[inline]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn is_finite_value(self) -> bool {
        self.is_finite()
    }
    fn extend_le_bytes(values: &[Self], out: &mut Vec<u8>) {
        out.reserve(values.len() * 4);
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    fn from_le_bytes(bytes: &[u8]) -> Vec<Self> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
    #[inline]
    fn widen(src: &[Self], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        dst[..n].copy_from_slice(&src[..n]);
    }
    #[inline]
    fn as_f32_slice(values: &[Self]) -> Option<&[f32]> {
        Some(values)
    }
}

impl StorageFloat for half::bf16 {
    const DTYPE: StorageDtype = StorageDtype::Bf16;
    #[inline]
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
    #[inline]
    fn to_f32(self) -> f32 {
        // A bf16 is the upper half of the binary32 with the same value.
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    #[inline]
    fn is_finite_value(self) -> bool {
        self.is_finite()
    }
    fn extend_le_bytes(values: &[Self], out: &mut Vec<u8>) {
        out.reserve(values.len() * 2);
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    fn from_le_bytes(bytes: &[u8]) -> Vec<Self> {
        bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
            .collect()
    }
    #[inline]
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits(u32::from(s.to_bits()) << 16);
        }
    }
    #[inline]
    fn as_f32_slice(_: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl StorageFloat for half::f16 {
    const DTYPE: StorageDtype = StorageDtype::F16;
    #[inline]
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    #[inline]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[inline]
    fn is_finite_value(self) -> bool {
        self.is_finite()
    }
    fn extend_le_bytes(values: &[Self], out: &mut Vec<u8>) {
        out.reserve(values.len() * 2);
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    fn from_le_bytes(bytes: &[u8]) -> Vec<Self> {
        bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
            .collect()
    }
    #[inline]
    fn widen(src: &[Self], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let (src, dst) = (&src[..n], &mut dst[..n]);
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = pulp::x86::V4::try_new() {
            simd.vectorize(WidenF16 { simd, src, dst });
            return;
        }
        // F16C, 8 values per call, where the processor has it.
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
    #[inline]
    fn as_f32_slice(_: &[Self]) -> Option<&[f32]> {
        None
    }
}

/// `f16` values widened 16 at a time by AVX-512's `vcvtph2ps` (exact: every `f16` is an `f32`).
/// `half`'s slice conversion calls an F16C function per 8 values: on Llama-7B's basis in `f16`
/// (16 tokens, `basis_product`) the products took 1.4–1.9× their time in `bf16`, now 1.0–1.5×.
#[cfg(target_arch = "x86_64")]
struct WidenF16<'a> {
    simd: pulp::x86::V4,
    src: &'a [half::f16],
    dst: &'a mut [f32],
}

#[cfg(target_arch = "x86_64")]
impl pulp::NullaryFnOnce for WidenF16<'_> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        let mut src = self.src.chunks_exact(16);
        let mut dst = self.dst.chunks_exact_mut(16);
        for (s, d) in (&mut src).zip(&mut dst) {
            let bits: [u16; 16] = std::array::from_fn(|i| s[i].to_bits());
            let wide = self.simd.avx512f._mm512_cvtph_ps(pulp::cast(bits));
            d.copy_from_slice(&pulp::cast::<_, [f32; 16]>(wide));
        }
        for (s, d) in src.remainder().iter().zip(dst.into_remainder()) {
            *d = s.to_f32();
        }
    }
}

/// How a sparsity pattern is encoded (see the module documentation for the byte layouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PatternEncoding {
    /// Every entry kept: no bytes.
    Full,
    /// One bit per entry, rows padded to whole bytes.
    Bitmask,
    /// Per-row counts (`u32`) and column gaps (`u16`).
    RowGaps,
}

impl PatternEncoding {
    /// All encodings, in tie-break order.
    pub const ALL: [PatternEncoding; 3] = [Self::Full, Self::Bitmask, Self::RowGaps];

    /// The name used in manifests.
    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Bitmask => "bitmask",
            Self::RowGaps => "row-gaps",
        }
    }

    /// Bytes this encoding takes for a `rows × cols` pattern with `nnz` kept entries, or `None`
    /// when it cannot represent it (`full` with a dropped entry, `row-gaps` with `cols > 65 536`)
    /// or the size overflows.
    pub fn encoded_bytes(self, rows: usize, cols: usize, nnz: usize) -> Option<usize> {
        match self {
            Self::Full => (Some(nnz) == rows.checked_mul(cols)).then_some(0),
            Self::Bitmask => rows.checked_mul(cols.div_ceil(8)),
            Self::RowGaps => {
                if cols > 1 << 16 {
                    return None;
                }
                rows.checked_mul(4)?.checked_add(nnz.checked_mul(2)?)
            }
        }
    }

    /// The smallest encoding for these counts (the bitmask always works).
    pub fn smallest(rows: usize, cols: usize, nnz: usize) -> Self {
        Self::ALL
            .into_iter()
            .filter_map(|e| e.encoded_bytes(rows, cols, nnz).map(|b| (b, e)))
            .min_by_key(|&(b, _)| b)
            .map_or(Self::Bitmask, |(_, e)| e)
    }
}

impl fmt::Display for PatternEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PatternEncoding {
    type Err = FipsError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| corrupt("pattern encoding", format!("unknown encoding {s:?}")))
    }
}

/// A decoding error: `what` is inconsistent with its declared sizes.
pub(crate) fn corrupt(what: &str, reason: impl Into<String>) -> FipsError {
    FipsError::Corrupt {
        what: what.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PatternData {
    Full,
    Bitmask(Vec<u8>),
    RowGaps { counts: Vec<u32>, gaps: Vec<u16> },
}

/// The sparsity pattern of a `rows × cols` matrix in one exact encoding, with the position of
/// each row's first kept value (derived on construction, not stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparsePattern {
    rows: usize,
    cols: usize,
    data: PatternData,
    /// `offsets[i]`: kept entries before row `i`; `rows + 1` of them.
    offsets: Vec<usize>,
}

fn check_dims(rows: usize, cols: usize) -> Result<usize> {
    if rows == 0 || cols == 0 {
        return Err(FipsError::ShapeMismatch {
            what: "sparse pattern".into(),
            expected: vec![1, 1],
            got: vec![rows, cols],
        });
    }
    rows.checked_mul(cols).ok_or_else(|| {
        corrupt(
            "sparse pattern",
            format!("{rows} × {cols} entries overflow"),
        )
    })
}

impl SparsePattern {
    /// The pattern of `mask` in its smallest encoding.
    pub fn from_mask(mask: ArrayView2<'_, bool>) -> Result<Self> {
        let (offsets, columns) = mask_to_csr(mask);
        Self::from_csr(mask.nrows(), mask.ncols(), &offsets, &columns, None)
    }

    /// The pattern of a CSR structure (`offsets`: `rows + 1` non-decreasing positions starting at
    /// 0; `columns`: strictly increasing column indices within each row, all below `cols`), in
    /// `encoding` or, for `None`, the smallest encoding.
    pub fn from_csr(
        rows: usize,
        cols: usize,
        offsets: &[usize],
        columns: &[u32],
        encoding: Option<PatternEncoding>,
    ) -> Result<Self> {
        check_dims(rows, cols)?;
        if offsets.len() != rows + 1 || offsets[0] != 0 || offsets[rows] != columns.len() {
            return Err(corrupt(
                "CSR pattern",
                format!(
                    "{} row offsets ending at {:?} for {rows} rows and {} columns",
                    offsets.len(),
                    offsets.last(),
                    columns.len()
                ),
            ));
        }
        for i in 0..rows {
            let (a, b) = (offsets[i], offsets[i + 1]);
            if a > b {
                return Err(corrupt(
                    "CSR pattern",
                    format!("row {i} ends before it starts"),
                ));
            }
            let row = &columns[a..b];
            if row.windows(2).any(|w| w[0] >= w[1])
                || row.last().is_some_and(|&c| c as usize >= cols)
            {
                return Err(corrupt(
                    "CSR pattern",
                    format!("row {i}: columns not strictly increasing below {cols}"),
                ));
            }
        }
        let nnz = columns.len();
        let encoding = encoding.unwrap_or_else(|| PatternEncoding::smallest(rows, cols, nnz));
        if encoding.encoded_bytes(rows, cols, nnz).is_none() {
            return Err(FipsError::InvalidParameter {
                name: "pattern encoding",
                reason: format!(
                    "{encoding} cannot represent a {rows} × {cols} pattern with {nnz} kept entries"
                ),
            });
        }
        let data = match encoding {
            PatternEncoding::Full => PatternData::Full,
            PatternEncoding::Bitmask => {
                let row_bytes = cols.div_ceil(8);
                let mut bits = vec![0u8; rows * row_bytes];
                for i in 0..rows {
                    let row = &mut bits[i * row_bytes..(i + 1) * row_bytes];
                    for &c in &columns[offsets[i]..offsets[i + 1]] {
                        row[c as usize / 8] |= 1 << (c % 8);
                    }
                }
                PatternData::Bitmask(bits)
            }
            PatternEncoding::RowGaps => {
                let mut counts = Vec::with_capacity(rows);
                let mut gaps = Vec::with_capacity(nnz);
                for i in 0..rows {
                    let row = &columns[offsets[i]..offsets[i + 1]];
                    counts.push(row.len() as u32);
                    let mut next = 0u32;
                    for &c in row {
                        // c ≥ next and c − next < cols ≤ 65 536.
                        gaps.push((c - next) as u16);
                        next = c + 1;
                    }
                }
                PatternData::RowGaps { counts, gaps }
            }
        };
        Ok(Self {
            rows,
            cols,
            data,
            offsets: offsets.to_vec(),
        })
    }

    /// The pattern with every entry kept.
    pub fn full(rows: usize, cols: usize) -> Result<Self> {
        check_dims(rows, cols)?;
        Ok(Self {
            rows,
            cols,
            data: PatternData::Full,
            offsets: (0..=rows).map(|i| i * cols).collect(),
        })
    }

    /// Decodes a bitmask of `rows · ⌈cols/8⌉` bytes, checking its length and that padding bits
    /// are zero.
    pub fn from_bitmask(rows: usize, cols: usize, bytes: Vec<u8>) -> Result<Self> {
        check_dims(rows, cols)?;
        let row_bytes = cols.div_ceil(8);
        let expected = rows
            .checked_mul(row_bytes)
            .ok_or_else(|| corrupt("bitmask", "size overflows"))?;
        if bytes.len() != expected {
            return Err(corrupt(
                "bitmask",
                format!(
                    "{} bytes for a {rows} × {cols} pattern (expected {expected})",
                    bytes.len()
                ),
            ));
        }
        let pad_mask: u8 = if cols.is_multiple_of(8) {
            0
        } else {
            !((1u8 << (cols % 8)) - 1)
        };
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0usize);
        let mut total = 0usize;
        for (i, row) in bytes.chunks_exact(row_bytes).enumerate() {
            if row[row_bytes - 1] & pad_mask != 0 {
                return Err(corrupt(
                    "bitmask",
                    format!("row {i} has padding bits set past column {cols}"),
                ));
            }
            total += popcount(row);
            offsets.push(total);
        }
        Ok(Self {
            rows,
            cols,
            data: PatternData::Bitmask(bytes),
            offsets,
        })
    }

    /// Decodes row-gaps from little-endian bytes: `counts` (`4 rows` bytes) and `gaps`
    /// (`2 nnz` bytes), checking every length, count and column before allocating.
    pub fn from_row_gaps_bytes(
        rows: usize,
        cols: usize,
        counts: &[u8],
        gaps: &[u8],
    ) -> Result<Self> {
        check_dims(rows, cols)?;
        if Some(counts.len()) != rows.checked_mul(4) {
            return Err(corrupt(
                "row-gaps counts",
                format!(
                    "{} bytes for {rows} rows (expected 4 per row)",
                    counts.len()
                ),
            ));
        }
        if !gaps.len().is_multiple_of(2) {
            return Err(corrupt(
                "row-gaps gaps",
                format!("odd length {}", gaps.len()),
            ));
        }
        let counts: Vec<u32> = counts
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let gaps: Vec<u16> = gaps
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        Self::from_row_gaps(rows, cols, counts, gaps)
    }

    /// Row-gaps from decoded counts and gaps, checked: counts sum to the number of gaps and every
    /// column lands below `cols`.
    pub fn from_row_gaps(
        rows: usize,
        cols: usize,
        counts: Vec<u32>,
        gaps: Vec<u16>,
    ) -> Result<Self> {
        check_dims(rows, cols)?;
        if counts.len() != rows {
            return Err(corrupt(
                "row-gaps counts",
                format!("{} counts for {rows} rows", counts.len()),
            ));
        }
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0usize);
        let mut total = 0usize;
        for (i, &n) in counts.iter().enumerate() {
            let n = n as usize;
            if n > cols || total + n > gaps.len() {
                return Err(corrupt(
                    "row-gaps",
                    format!(
                        "row {i} claims {n} entries ({total} before it, {} gaps, {cols} columns)",
                        gaps.len()
                    ),
                ));
            }
            let mut next = 0usize;
            for &g in &gaps[total..total + n] {
                let c = next + g as usize;
                if c >= cols {
                    return Err(corrupt(
                        "row-gaps",
                        format!("row {i}: column {c} out of range (there are {cols})"),
                    ));
                }
                next = c + 1;
            }
            total += n;
            offsets.push(total);
        }
        if total != gaps.len() {
            return Err(corrupt(
                "row-gaps",
                format!("counts sum to {total}, {} gaps given", gaps.len()),
            ));
        }
        Ok(Self {
            rows,
            cols,
            data: PatternData::RowGaps { counts, gaps },
            offsets,
        })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Kept entries.
    pub fn nnz(&self) -> usize {
        self.offsets[self.rows]
    }

    /// The encoding in use.
    pub fn encoding(&self) -> PatternEncoding {
        match self.data {
            PatternData::Full => PatternEncoding::Full,
            PatternData::Bitmask(_) => PatternEncoding::Bitmask,
            PatternData::RowGaps { .. } => PatternEncoding::RowGaps,
        }
    }

    /// Bytes of the encoded pattern.
    pub fn encoded_bytes(&self) -> usize {
        match &self.data {
            PatternData::Full => 0,
            PatternData::Bitmask(b) => b.len(),
            PatternData::RowGaps { counts, gaps } => 4 * counts.len() + 2 * gaps.len(),
        }
    }

    /// The bitmask bytes, when that is the encoding.
    pub fn bitmask(&self) -> Option<&[u8]> {
        match &self.data {
            PatternData::Bitmask(b) => Some(b),
            _ => None,
        }
    }

    /// The bitmask bytes of row `i` (`⌈cols/8⌉` of them), when that is the encoding.
    pub(crate) fn bitmask_row(&self, i: usize) -> Option<&[u8]> {
        let rb = self.cols.div_ceil(8);
        self.bitmask().map(|b| &b[i * rb..(i + 1) * rb])
    }

    /// `(counts, gaps)`, when row-gaps is the encoding.
    pub fn row_gaps(&self) -> Option<(&[u32], &[u16])> {
        match &self.data {
            PatternData::RowGaps { counts, gaps } => Some((counts, gaps)),
            _ => None,
        }
    }

    /// The positions of row `i`'s kept values among all kept values.
    pub fn row_range(&self, i: usize) -> Range<usize> {
        self.offsets[i]..self.offsets[i + 1]
    }

    /// The `rows + 1` row offsets of the CSR form.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// Replaces `out` by the kept columns of row `i`, increasing.
    pub fn row_columns(&self, i: usize, out: &mut Vec<u32>) {
        out.clear();
        match &self.data {
            PatternData::Full => out.extend(0..self.cols as u32),
            PatternData::Bitmask(_) => {
                if let Some(row) = self.bitmask_row(i) {
                    push_set_bits(row, out);
                }
            }
            PatternData::RowGaps { gaps, .. } => {
                let mut next = 0u32;
                for &g in &gaps[self.row_range(i)] {
                    let c = next + u32::from(g);
                    out.push(c);
                    next = c + 1;
                }
            }
        }
    }

    /// All kept columns in row-major order (the CSR column array).
    pub fn columns(&self) -> Vec<u32> {
        let mut all = Vec::with_capacity(self.nnz());
        let mut row = Vec::new();
        for i in 0..self.rows {
            self.row_columns(i, &mut row);
            all.extend_from_slice(&row);
        }
        all
    }

    /// The pattern as a boolean `rows × cols` mask.
    pub fn to_mask(&self) -> Array2<bool> {
        let mut mask = Array2::from_elem((self.rows, self.cols), false);
        let mut row = Vec::new();
        for i in 0..self.rows {
            self.row_columns(i, &mut row);
            for &c in &row {
                mask[[i, c as usize]] = true;
            }
        }
        mask
    }

    /// The same pattern in another encoding.
    pub fn reencode(&self, encoding: PatternEncoding) -> Result<Self> {
        Self::from_csr(
            self.rows,
            self.cols,
            &self.offsets,
            &self.columns(),
            Some(encoding),
        )
    }
}

/// Number of set bits of a byte slice.
fn popcount(bytes: &[u8]) -> usize {
    let mut words = bytes.chunks_exact(8);
    let mut n = 0usize;
    for w in &mut words {
        let w = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        n += w.count_ones() as usize;
    }
    n + words
        .remainder()
        .iter()
        .map(|b| b.count_ones() as usize)
        .sum::<usize>()
}

/// Appends the indices of the set bits of `row` (bit `c mod 8` of byte `⌊c/8⌋`), increasing.
pub(crate) fn push_set_bits(row: &[u8], out: &mut Vec<u32>) {
    for (k, chunk) in row.chunks(8).enumerate() {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        let mut w = u64::from_le_bytes(word);
        let base = (k * 64) as u32;
        while w != 0 {
            out.push(base + w.trailing_zeros());
            w &= w - 1;
        }
    }
}

/// The CSR structure (offsets, columns) of a boolean mask.
fn mask_to_csr(mask: ArrayView2<'_, bool>) -> (Vec<usize>, Vec<u32>) {
    let mut offsets = Vec::with_capacity(mask.nrows() + 1);
    let mut columns = Vec::new();
    offsets.push(0);
    for row in mask.rows() {
        columns.extend(
            row.iter()
                .enumerate()
                .filter(|&(_, &k)| k)
                .map(|(c, _)| c as u32),
        );
        offsets.push(columns.len());
    }
    (offsets, columns)
}

/// A sparse matrix in compact form: a [`SparsePattern`] and its kept values, row-major, in the
/// storage type `S`.
#[derive(Debug, Clone, PartialEq)]
pub struct CompactMatrix<S> {
    pattern: SparsePattern,
    values: Vec<S>,
}

impl<S: StorageFloat> CompactMatrix<S> {
    /// A matrix from its pattern and `nnz` finite values.
    pub fn new(pattern: SparsePattern, values: Vec<S>) -> Result<Self> {
        if values.len() != pattern.nnz() {
            return Err(corrupt(
                "compact matrix",
                format!("{} values for {} kept entries", values.len(), pattern.nnz()),
            ));
        }
        if let Some(k) = values.iter().position(|v| !v.is_finite_value()) {
            return Err(FipsError::NonFinite {
                what: "compact matrix values".into(),
                index: vec![k],
            });
        }
        Ok(Self { pattern, values })
    }

    /// The kept entries of `values` under `mask` (entries outside it are dropped), rounded to `S`,
    /// with the pattern in its smallest encoding.
    pub fn from_dense(values: ArrayView2<'_, f32>, mask: ArrayView2<'_, bool>) -> Result<Self> {
        if values.dim() != mask.dim() {
            return Err(FipsError::ShapeMismatch {
                what: "compact matrix mask".into(),
                expected: values.shape().to_vec(),
                got: mask.shape().to_vec(),
            });
        }
        let pattern = SparsePattern::from_mask(mask)?;
        let kept = values
            .iter()
            .zip(mask.iter())
            .filter(|&(_, &k)| k)
            .map(|(&v, _)| S::from_f32(v))
            .collect();
        Self::new(pattern, kept)
    }

    /// A matrix from its pattern and the little-endian bytes of its values, checking the byte
    /// count (`nnz × size`) before decoding.
    pub fn from_value_bytes(pattern: SparsePattern, bytes: &[u8]) -> Result<Self> {
        let expected = pattern.nnz().checked_mul(S::DTYPE.size());
        if Some(bytes.len()) != expected {
            return Err(corrupt(
                "compact matrix values",
                format!(
                    "{} bytes for {} {} values",
                    bytes.len(),
                    pattern.nnz(),
                    S::DTYPE
                ),
            ));
        }
        Self::new(pattern, S::from_le_bytes(bytes))
    }

    /// The pattern.
    pub fn pattern(&self) -> &SparsePattern {
        &self.pattern
    }

    /// The kept values, row-major.
    pub fn values(&self) -> &[S] {
        &self.values
    }

    /// The kept values of row `i`.
    pub fn row_values(&self, i: usize) -> &[S] {
        &self.values[self.pattern.row_range(i)]
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.pattern.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.pattern.cols
    }

    /// Kept entries.
    pub fn nnz(&self) -> usize {
        self.pattern.nnz()
    }

    /// The values' little-endian bytes.
    pub fn value_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        S::extend_le_bytes(&self.values, &mut out);
        out
    }

    /// Bytes of the values plus the encoded pattern.
    pub fn stored_bytes(&self) -> usize {
        self.values.len() * S::DTYPE.size() + self.pattern.encoded_bytes()
    }

    /// The dense `rows × cols` matrix in `f32` (zeros outside the pattern; exact).
    pub fn to_dense(&self) -> Array2<f32> {
        let mut out = Array2::zeros((self.rows(), self.cols()));
        let mut cols = Vec::new();
        for i in 0..self.rows() {
            self.pattern.row_columns(i, &mut cols);
            for (&c, v) in cols.iter().zip(self.row_values(i)) {
                out[[i, c as usize]] = v.to_f32();
            }
        }
        out
    }

    /// The transpose (`cols × rows`), pattern in its smallest encoding.
    pub fn transpose(&self) -> Result<Self> {
        let (rows, cols) = (self.rows(), self.cols());
        let mut counts = vec![0usize; cols + 1];
        let columns = self.pattern.columns();
        for &c in &columns {
            counts[c as usize + 1] += 1;
        }
        for c in 0..cols {
            counts[c + 1] += counts[c];
        }
        let offsets = counts.clone();
        let mut next = counts;
        let mut t_columns = vec![0u32; columns.len()];
        let mut t_values = vec![S::default(); columns.len()];
        for i in 0..rows {
            for p in self.pattern.row_range(i) {
                let c = columns[p] as usize;
                t_columns[next[c]] = i as u32;
                t_values[next[c]] = self.values[p];
                next[c] += 1;
            }
        }
        let pattern = SparsePattern::from_csr(cols, rows, &offsets, &t_columns, None)?;
        Self::new(pattern, t_values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_mask(rng: &mut ChaCha8Rng, rows: usize, cols: usize, density: f64) -> Array2<bool> {
        Array2::from_shape_simple_fn((rows, cols), || rng.random_bool(density))
    }

    fn random_values(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Array2<f32> {
        Array2::from_shape_simple_fn((rows, cols), || rng.random_range(-3.0f32..3.0))
    }

    /// Round trip through every applicable encoding and every storage type: bytes back to the
    /// same pattern and values, bit for bit.
    fn check_round_trip<S: StorageFloat>(values: &Array2<f32>, mask: &Array2<bool>) {
        let m = CompactMatrix::<S>::from_dense(values.view(), mask.view()).unwrap();
        let (rows, cols) = mask.dim();
        let nnz = mask.iter().filter(|&&k| k).count();
        assert_eq!(m.nnz(), nnz);
        assert_eq!(m.pattern().to_mask(), *mask);
        // The chosen encoding is the smallest that applies.
        let best = PatternEncoding::ALL
            .iter()
            .filter_map(|e| e.encoded_bytes(rows, cols, nnz))
            .min()
            .unwrap();
        assert_eq!(m.pattern().encoded_bytes(), best);
        assert_eq!(
            Some(best),
            m.pattern().encoding().encoded_bytes(rows, cols, nnz)
        );
        for enc in PatternEncoding::ALL {
            let Ok(p) = m.pattern().reencode(enc) else {
                assert!(enc.encoded_bytes(rows, cols, nnz).is_none());
                continue;
            };
            assert_eq!(Some(p.encoded_bytes()), enc.encoded_bytes(rows, cols, nnz));
            let decoded = match enc {
                PatternEncoding::Full => SparsePattern::full(rows, cols).unwrap(),
                PatternEncoding::Bitmask => {
                    SparsePattern::from_bitmask(rows, cols, p.bitmask().unwrap().to_vec()).unwrap()
                }
                PatternEncoding::RowGaps => {
                    let (c, g) = p.row_gaps().unwrap();
                    let cb: Vec<u8> = c.iter().flat_map(|x| x.to_le_bytes()).collect();
                    let gb: Vec<u8> = g.iter().flat_map(|x| x.to_le_bytes()).collect();
                    SparsePattern::from_row_gaps_bytes(rows, cols, &cb, &gb).unwrap()
                }
            };
            assert_eq!(decoded, p);
            assert_eq!(decoded.to_mask(), *mask);
            assert_eq!(decoded.offsets(), m.pattern().offsets());
            let back = CompactMatrix::<S>::from_value_bytes(decoded, &m.value_bytes()).unwrap();
            let bits = |x: &CompactMatrix<S>| -> Vec<u32> {
                x.values().iter().map(|v| v.to_f32().to_bits()).collect()
            };
            assert_eq!(bits(&back), bits(&m));
        }
        // Dense values: exact for f32, rounded for the half types, zero outside the mask.
        let dense = m.to_dense();
        for ((&d, &v), &k) in dense.iter().zip(values.iter()).zip(mask.iter()) {
            if k {
                assert_eq!(d.to_bits(), S::from_f32(v).to_f32().to_bits());
            } else {
                assert_eq!(d, 0.0);
            }
        }
        // The transpose holds the same entries.
        let t = m.transpose().unwrap();
        assert_eq!(t.to_dense(), dense.t());
        assert_eq!(t.transpose().unwrap().to_dense(), dense);
    }

    #[test]
    fn every_f16_widens_to_its_exact_value() {
        // All 65 536 bit patterns, from an offset so that both the 16-value vectors and the
        // remainder run (fails if a lane, a vector or the remainder is misplaced).
        let all: Vec<half::f16> = (0..=u16::MAX).map(half::f16::from_bits).collect();
        for offset in [0, 3] {
            let src = &all[offset..];
            let mut dst = vec![0.0f32; src.len() + 2];
            <half::f16 as StorageFloat>::widen(src, &mut dst);
            for (i, (&h, &w)) in src.iter().zip(&dst).enumerate() {
                // The exact value: sign, then significand times a power of two.
                let bits = h.to_bits();
                let (sign, exp, man) = (bits >> 15, (bits >> 10) & 0x1f, bits & 0x3ff);
                let magnitude = match exp {
                    0 => f64::from(man) * 2f64.powi(-24),
                    31 if man == 0 => f64::INFINITY,
                    31 => f64::NAN,
                    e => f64::from(man | 0x400) * 2f64.powi(i32::from(e) - 25),
                };
                let want = if sign == 1 { -magnitude } else { magnitude };
                if want.is_nan() {
                    assert!(w.is_nan(), "{bits:#06x} at {i}");
                } else {
                    assert_eq!(f64::from(w).to_bits(), want.to_bits(), "{bits:#06x} at {i}");
                }
            }
            assert_eq!(&dst[src.len()..], &[0.0, 0.0]);
        }
    }

    #[test]
    fn randomized_round_trips_are_bit_exact() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let shapes = [
            (1, 1),
            (1, 37),
            (37, 1),
            (5, 8),
            (9, 64),
            (13, 100),
            (64, 65),
            (3, 700),
        ];
        for &(rows, cols) in &shapes {
            for density in [0.0, 0.01, 0.05, 0.25, 0.5, 0.9, 1.0] {
                let mask = random_mask(&mut rng, rows, cols, density);
                let values = random_values(&mut rng, rows, cols);
                check_round_trip::<f32>(&values, &mask);
                check_round_trip::<half::bf16>(&values, &mask);
                check_round_trip::<half::f16>(&values, &mask);
            }
        }
        for seed in 0..40 {
            let mut rng = ChaCha8Rng::seed_from_u64(1000 + seed);
            let rows = rng.random_range(1..40);
            let cols = rng.random_range(1..300);
            let density = rng.random_range(0.0..1.0);
            let mut mask = random_mask(&mut rng, rows, cols, density);
            // Empty and full rows.
            mask.row_mut(0).fill(false);
            mask.row_mut(rows - 1).fill(true);
            let values = random_values(&mut rng, rows, cols);
            check_round_trip::<f32>(&values, &mask);
            check_round_trip::<half::bf16>(&values, &mask);
        }
    }

    #[test]
    fn encoding_choice_follows_density() {
        // Density 1: no pattern bytes at all; 25 %: bitmask; 1 %: row gaps; 0: row gaps (counts only).
        assert_eq!(
            PatternEncoding::smallest(10, 800, 8000),
            PatternEncoding::Full
        );
        assert_eq!(
            PatternEncoding::smallest(10, 800, 2000),
            PatternEncoding::Bitmask
        );
        assert_eq!(
            PatternEncoding::smallest(10, 800, 80),
            PatternEncoding::RowGaps
        );
        assert_eq!(
            PatternEncoding::smallest(10, 800, 0),
            PatternEncoding::RowGaps
        );
        assert_eq!(
            PatternEncoding::smallest(10, 8, 0),
            PatternEncoding::Bitmask
        );
        // More than 65 536 columns: gaps may not fit in 16 bits.
        assert_eq!(PatternEncoding::RowGaps.encoded_bytes(1, 65_537, 1), None);
        assert_eq!(
            PatternEncoding::smallest(1, 1 << 20, 1),
            PatternEncoding::Bitmask
        );
        // A gap of exactly 65 535 still fits.
        let p = SparsePattern::from_csr(
            1,
            65_536,
            &[0, 1],
            &[65_535],
            Some(PatternEncoding::RowGaps),
        )
        .unwrap();
        assert_eq!(p.columns(), vec![65_535]);
    }

    #[test]
    fn corrupt_inputs_are_typed_errors() {
        let is_corrupt = |r: Result<SparsePattern>| matches!(r, Err(FipsError::Corrupt { .. }));
        // Bitmask too short, too long, padding bits set.
        assert!(is_corrupt(SparsePattern::from_bitmask(3, 10, vec![0; 5])));
        assert!(is_corrupt(SparsePattern::from_bitmask(3, 10, vec![0; 7])));
        assert!(is_corrupt(SparsePattern::from_bitmask(
            1,
            10,
            vec![0, 0b0000_0100]
        )));
        assert!(SparsePattern::from_bitmask(1, 10, vec![0xff, 0b0000_0011]).is_ok());
        // Huge declared shapes with few bytes: rejected before any allocation.
        assert!(is_corrupt(SparsePattern::from_bitmask(
            1 << 40,
            1 << 40,
            vec![0; 8]
        )));
        assert!(is_corrupt(SparsePattern::from_bitmask(
            1 << 40,
            8,
            vec![0; 8]
        )));
        assert!(is_corrupt(SparsePattern::from_row_gaps_bytes(
            1 << 40,
            8,
            &[0; 8],
            &[]
        )));
        // Row gaps: counts too short, count beyond the gaps, column out of range, leftover gaps.
        let le32 = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let le16 = |v: &[u16]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        assert!(is_corrupt(SparsePattern::from_row_gaps_bytes(
            2,
            8,
            &le32(&[1]),
            &le16(&[0])
        )));
        assert!(is_corrupt(SparsePattern::from_row_gaps_bytes(
            2,
            8,
            &le32(&[1, 2]),
            &le16(&[0, 1])
        )));
        assert!(is_corrupt(SparsePattern::from_row_gaps_bytes(
            1,
            8,
            &le32(&[2]),
            &le16(&[3, 4])
        )));
        assert!(is_corrupt(SparsePattern::from_row_gaps_bytes(
            1,
            8,
            &le32(&[1]),
            &le16(&[0, 0])
        )));
        assert!(is_corrupt(SparsePattern::from_row_gaps_bytes(
            1,
            8,
            &le32(&[9]),
            &le16(&[0; 9])
        )));
        assert!(is_corrupt(SparsePattern::from_row_gaps_bytes(
            1,
            8,
            &le32(&[1]),
            &[0]
        )));
        assert!(
            SparsePattern::from_row_gaps_bytes(1, 8, &le32(&[2]), &le16(&[3, 3])).is_ok(),
            "columns 3 and 7"
        );
        // Values: wrong byte count, non-finite.
        let p = SparsePattern::full(2, 2).unwrap();
        assert!(matches!(
            CompactMatrix::<f32>::from_value_bytes(p.clone(), &[0; 15]),
            Err(FipsError::Corrupt { .. })
        ));
        let nan: Vec<u8> = [1.0f32, f32::NAN, 0.0, 2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert!(matches!(
            CompactMatrix::<f32>::from_value_bytes(p, &nan),
            Err(FipsError::NonFinite { .. })
        ));
        // Bad CSR and impossible encodings.
        assert!(SparsePattern::from_csr(1, 4, &[0, 2], &[2, 1], None).is_err());
        assert!(SparsePattern::from_csr(1, 4, &[0, 1], &[4], None).is_err());
        assert!(SparsePattern::from_csr(1, 4, &[0, 1], &[1], Some(PatternEncoding::Full)).is_err());
        assert!(SparsePattern::full(0, 3).is_err());
    }
}
