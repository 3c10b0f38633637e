//! Helpers shared by the examples and the inference benchmark (not an example itself): this
//! process's memory, random dense blocks and compact factors, and a compact group's storage
//! dtype changed.
#![allow(dead_code)]

use fips::repr::compact::{CompactMatrix, SparsePattern, StorageFloat};
use fips::repr::sparse_mlp::CompactGroup;
use fips::{Activation, DenseMlp, FipsError, Linear};
use ndarray::Array2;
use rand::{Rng, RngCore};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// A `rows × cols` matrix of `N(0, 1/cols)` entries.
pub fn randn(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Array2<f32> {
    let scale = 1.0 / (cols as f32).sqrt();
    Array2::from_shape_simple_fn((rows, cols), || {
        let z: f32 = StandardNormal.sample(rng);
        scale * z
    })
}

/// `n` gated SiLU blocks of width `d` and intermediate size `i` with [`randn`] weights, no biases.
pub fn random_gated_blocks(
    rng: &mut ChaCha8Rng,
    n: usize,
    d: usize,
    i: usize,
) -> fips::Result<Vec<DenseMlp<f32>>> {
    (0..n)
        .map(|_| {
            DenseMlp::gated(
                Linear::new(randn(rng, i, d), None)?,
                Linear::new(randn(rng, i, d), None)?,
                Linear::new(randn(rng, d, i), None)?,
                Activation::Silu,
            )
        })
        .collect()
}

/// The same compact group with its basis, values and biases rounded to the storage type `S`.
pub fn to_storage<S: StorageFloat>(g: &CompactGroup<f32>) -> fips::Result<CompactGroup<S>> {
    let conv = |v: &[f32]| v.iter().map(|&x| S::from_f32(x)).collect::<Vec<S>>();
    let factors = (0..g.factor_count())
        .map(|j| {
            let m = g.compact_factor(j)?;
            CompactMatrix::new(m.pattern().clone(), conv(m.values()))
        })
        .collect::<fips::Result<Vec<_>>>()?;
    let biases = g.biases().iter().map(|b| b.as_deref().map(conv)).collect();
    CompactGroup::new(
        g.kind(),
        g.activation(),
        (g.width(), g.rank()),
        conv(g.basis()),
        factors,
        biases,
    )
}

/// `VmRSS` and `VmHWM` of this process, in KiB (Linux; zeros elsewhere).
pub fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `n` values uniform in `[−scale, scale)`, stored as `S`.
pub fn random_values<S: StorageFloat>(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<S> {
    (0..n)
        .map(|_| S::from_f32(scale * rng.random_range(-1.0f32..1.0)))
        .collect()
}

/// A `rows × cols` compact matrix keeping each entry with probability 1/4 (two random words
/// ANDed), values uniform in `±1/√rows`.
pub fn random_quarter<S: StorageFloat>(
    rng: &mut ChaCha8Rng,
    rows: usize,
    cols: usize,
) -> Result<CompactMatrix<S>, FipsError> {
    let row_bytes = cols.div_ceil(8);
    let mut bits = vec![0u8; rows * row_bytes];
    for row in bits.chunks_exact_mut(row_bytes) {
        for chunk in row.chunks_mut(8) {
            let w = (rng.next_u64() & rng.next_u64()).to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
        if !cols.is_multiple_of(8) {
            row[row_bytes - 1] &= (1u8 << (cols % 8)) - 1;
        }
    }
    with_random_values(rng, rows, cols, bits)
}

/// A `rows × cols` compact matrix keeping whole 2×2 tiles (rows `2p, 2p + 1`, columns
/// `2q, 2q + 1`) each with probability 1/4, values uniform in `±1/√rows`: the pattern FiPS
/// trains with 2×2 mask tiles.
pub fn random_quarter_tiles<S: StorageFloat>(
    rng: &mut ChaCha8Rng,
    rows: usize,
    cols: usize,
) -> Result<CompactMatrix<S>, FipsError> {
    let row_bytes = cols.div_ceil(8);
    let mut bits = vec![0u8; rows * row_bytes];
    for p in 0..rows.div_ceil(2) {
        let mut row = vec![0u8; row_bytes];
        for q in 0..cols.div_ceil(2) {
            if rng.next_u32() & 3 == 0 {
                for c in 2 * q..(2 * q + 2).min(cols) {
                    row[c / 8] |= 1 << (c % 8);
                }
            }
        }
        for i in 2 * p..(2 * p + 2).min(rows) {
            bits[i * row_bytes..(i + 1) * row_bytes].copy_from_slice(&row);
        }
    }
    with_random_values(rng, rows, cols, bits)
}

/// The compact matrix of a row-major bitmask, values uniform in `±1/√rows`.
fn with_random_values<S: StorageFloat>(
    rng: &mut ChaCha8Rng,
    rows: usize,
    cols: usize,
    bits: Vec<u8>,
) -> Result<CompactMatrix<S>, FipsError> {
    let pattern = SparsePattern::from_bitmask(rows, cols, bits)?;
    let values = random_values(rng, pattern.nnz(), 1.0 / (rows as f32).sqrt());
    CompactMatrix::new(pattern, values)
}
