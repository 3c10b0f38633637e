//! Radix selection: the element of a given rank among keyed candidates, without sorting or a
//! buffer of the candidates' size (the pruning and regrowth decisions of
//! [`crate::math::sparsity`] and [`crate::math::tiles`]).

/// Bits of the key decided per pass (a histogram of `2^16` sums).
const RADIX_BITS: u32 = 16;

/// The element of 0-based rank `rank` among the candidates `k ∈ 0..len` (those with
/// `key(k) = Some(x)`), ordered by `(x, k)`: returns that `(x, k)`, or `None` if there are at
/// most `rank` candidates. The candidates of rank `≤ rank` are then exactly those with
/// `(x, k) ≤` the result. [`weighted_kth_smallest`] with every weight 1.
pub(crate) fn kth_smallest(
    len: usize,
    rank: usize,
    key_bits: u32,
    key: impl Fn(usize) -> Option<u64>,
) -> Option<(u64, usize)> {
    weighted_kth_smallest(len, rank, key_bits, |k| key(k).map(|x| (x, 1)))
}

/// The candidate holding weight-rank `rank` among the candidates `k ∈ 0..len` (those with
/// `key(k) = Some((x, w))`, `w` entries each), ordered by `(x, k)`: the one whose cumulative
/// weight range `[below, below + w)` contains `rank`, returned as `(x, k)`; `None` if the
/// candidates' weights sum to at most `rank`. The candidates `≤` the result hold at least
/// `rank + 1` and less than `rank + 1 + w` entries; those `<` it hold at most `rank`.
///
/// Radix selection over `key_bits`-bit keys, [`RADIX_BITS`] bits per pass: each pass sums the
/// weights of the candidates sharing the prefix decided so far by their next digit and descends
/// into the digit holding the rank; a last pass finds the candidate among those with exactly
/// that key. `⌈key_bits / 16⌉ + 1` passes over the candidates (O(len) time), `2^16` sums of
/// memory.
pub(crate) fn weighted_kth_smallest(
    len: usize,
    rank: usize,
    key_bits: u32,
    key: impl Fn(usize) -> Option<(u64, usize)>,
) -> Option<(u64, usize)> {
    let mut rank = rank;
    let mut prefix = 0u64;
    let mut decided = 0u32;
    let mut sums = vec![0usize; 1 << RADIX_BITS];
    while decided < key_bits {
        let width = RADIX_BITS.min(key_bits - decided);
        let shift = key_bits - decided - width;
        let digits = &mut sums[..1 << width];
        digits.fill(0);
        let digit_mask = (1u64 << width) - 1;
        for (x, w) in (0..len).filter_map(&key) {
            let high = x >> shift;
            if high >> width == prefix {
                digits[(high & digit_mask) as usize] += w;
            }
        }
        let mut below = 0usize;
        let mut found = None;
        for (digit, &n) in digits.iter().enumerate() {
            if rank < below + n {
                found = Some(digit as u64);
                break;
            }
            below += n;
        }
        let digit = found?;
        rank -= below;
        prefix = (prefix << width) | digit;
        decided += width;
    }
    let mut below = 0usize;
    for k in 0..len {
        if let Some((x, w)) = key(k)
            && x == prefix
        {
            if rank < below + w {
                return Some((prefix, k));
            }
            below += w;
        }
    }
    None
}
