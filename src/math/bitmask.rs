//! A mask of one bit per entry: the sparsity mask of `V` while training (`E/8` bytes instead of
//! the `E` of one `bool` per entry).

/// A mask of `len` entries, one bit each: entry `k` is bit `k mod 64` of word `⌊k / 64⌋`; the bits
/// past `len` are zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BitMask {
    words: Vec<u64>,
    len: usize,
}

impl BitMask {
    /// The mask of `mask`.
    pub(crate) fn from_bools(mask: &[bool]) -> Self {
        let mut words = vec![0u64; mask.len().div_ceil(64)];
        for (word, chunk) in words.iter_mut().zip(mask.chunks(64)) {
            for (b, &m) in chunk.iter().enumerate() {
                *word |= u64::from(m) << b;
            }
        }
        Self {
            words,
            len: mask.len(),
        }
    }

    /// A mask of `len` entries, none kept.
    pub(crate) fn zeros(len: usize) -> Self {
        Self {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }

    /// One `bool` per entry (tests).
    #[cfg(test)]
    pub(crate) fn to_bools(&self) -> Vec<bool> {
        (0..self.len).map(|k| self.get(k)).collect()
    }

    /// Entries.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether entry `k` is kept (`false` past the end).
    #[inline(always)]
    pub(crate) fn get(&self, k: usize) -> bool {
        self.words
            .get(k >> 6)
            .is_some_and(|w| (w >> (k & 63)) & 1 == 1)
    }

    /// Sets entry `k` (nothing past the end).
    #[inline(always)]
    pub(crate) fn set(&mut self, k: usize, keep: bool) {
        if k < self.len
            && let Some(w) = self.words.get_mut(k >> 6)
        {
            let bit = 1u64 << (k & 63);
            if keep {
                *w |= bit;
            } else {
                *w &= !bit;
            }
        }
    }

    /// Kept entries among `start..end` (clamped to the mask).
    pub(crate) fn count_range(&self, start: usize, end: usize) -> usize {
        let end = end.min(self.len);
        if start >= end {
            return 0;
        }
        let (first, last) = (start >> 6, (end - 1) >> 6);
        let low = u64::MAX << (start & 63);
        let high = u64::MAX >> (63 - ((end - 1) & 63));
        let word = |i: usize| self.words.get(i).copied().unwrap_or(0);
        if first == last {
            return (word(first) & low & high).count_ones() as usize;
        }
        let middle: usize = (first + 1..last)
            .map(|i| word(i).count_ones() as usize)
            .sum();
        (word(first) & low).count_ones() as usize
            + middle
            + (word(last) & high).count_ones() as usize
    }

    /// Kept entries in all.
    pub(crate) fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The kept positions, ascending.
    pub(crate) fn ones(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let b = w.trailing_zeros() as usize;
                    w &= w - 1;
                    i * 64 + b
                })
            })
        })
    }

    /// The kept positions in `start..end` (clamped to the mask), ascending: a pass over the
    /// words of the range, one step per kept position.
    pub(crate) fn ones_in(&self, start: usize, end: usize) -> impl Iterator<Item = usize> + '_ {
        let end = end.min(self.len);
        let words = if start < end {
            start >> 6..((end - 1) >> 6) + 1
        } else {
            0..0
        };
        words.flat_map(move |i| {
            let mut w = self.words.get(i).copied().unwrap_or(0);
            if i == start >> 6 {
                w &= u64::MAX << (start & 63);
            }
            if i == (end - 1) >> 6 {
                w &= u64::MAX >> (63 - ((end - 1) & 63));
            }
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let b = w.trailing_zeros() as usize;
                    w &= w - 1;
                    i * 64 + b
                })
            })
        })
    }

    /// Bytes held (tests).
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.words.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operation agrees with one `bool` per entry, across word boundaries.
    #[test]
    fn bits_agree_with_bools() {
        for len in [0, 1, 63, 64, 65, 130, 1000] {
            let bools: Vec<bool> = (0..len).map(|k| (k * 7 + k / 5) % 3 == 0).collect();
            let mut bits = BitMask::from_bools(&bools);
            assert_eq!(bits.len(), len);
            assert_eq!(bits.to_bools(), bools);
            assert_eq!(BitMask::zeros(len), BitMask::from_bools(&vec![false; len]));
            assert_eq!(bits.count(), bools.iter().filter(|&&b| b).count());
            let ones: Vec<usize> = (0..len).filter(|&k| bools[k]).collect();
            assert_eq!(bits.ones().collect::<Vec<_>>(), ones);
            for start in (0..len).step_by(13) {
                for end in (start..=len + 3).step_by(17) {
                    let expected = bools[start..end.min(len)].iter().filter(|&&b| b).count();
                    assert_eq!(
                        bits.count_range(start, end),
                        expected,
                        "{len} {start}..{end}"
                    );
                    let ones_in: Vec<usize> = (start..end.min(len)).filter(|&k| bools[k]).collect();
                    assert_eq!(bits.ones_in(start, end).collect::<Vec<_>>(), ones_in);
                }
            }
            assert!(!bits.get(len));
            let mut flipped = bools.clone();
            for k in (0..len).step_by(3) {
                flipped[k] = !flipped[k];
                bits.set(k, flipped[k]);
            }
            bits.set(len, true);
            assert_eq!(bits.to_bools(), flipped);
            assert_eq!(bits.count(), flipped.iter().filter(|&&b| b).count());
            assert!(bits.bytes() <= len.div_ceil(64) * 8);
        }
    }
}
