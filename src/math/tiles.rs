//! Tile-structured masks of the factors `V`: entries kept or dropped together in tiles of 2×2,
//! 1×2 or 2×1 entries, so that an inference kernel can reuse each loaded input value for several
//! multiply-adds (the tiled inference layout serves 2×2 tiles; the pair shapes are kept for
//! experiments, see `docs/results.md`).
//!
//! `V` is `r × M·I` (row-major; matrix `j` in columns `j·I..(j+1)·I`). With tiles of height `h`
//! and width `w`, tile `(a, j, b)` holds the entries of rows `h·a .. h·a + h` and columns
//! `j·I + w·b .. j·I + w·b + w`, cut at the last row and at the matrix's last column: tiles never
//! cross a matrix boundary, and the edge tiles are smaller. Selections rank tiles by the sum over
//! their entries of the score the entry-wise selection uses, ties broken by the tile's index, and
//! count kept entries by weight (a tile of `n` entries counts `n` in the radix selection).

use std::fmt;
use std::str::FromStr;

use crate::foundation::error::{FipsError, invalid};
use crate::foundation::float::Float;
use crate::math::bitmask::BitMask;
use crate::math::select::weighted_kth_smallest;

/// How the mask of FiPS's sparse factors is structured.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum MaskTiles {
    /// Every entry is kept or dropped on its own (the default).
    #[default]
    #[serde(rename = "entries")]
    Entries,
    /// Entries are kept or dropped in 2×2 tiles of `V` (rows `2a, 2a+1` × columns `2b, 2b+1` of
    /// one matrix). The kept count is whole tiles: `target − 3 ≤ nnz ≤ target` (edge tiles of odd
    /// `r` or `I` hold fewer entries), and the reported sparsity is the actual one. Training holds
    /// one score per tile (`E/4` values) during a mask update besides today's buffers.
    #[serde(rename = "2x2")]
    Square2,
    /// Entries are kept or dropped in pairs along a row of `V`: row `k` × columns `2b, 2b+1` of
    /// one matrix (two neighbouring hidden units share their rank rows).
    #[serde(rename = "1x2")]
    Wide2,
    /// Entries are kept or dropped in pairs along a column of `V`: rows `2a, 2a+1` × column `c`.
    #[serde(rename = "2x1")]
    Tall2,
}

impl MaskTiles {
    /// Whether this is the entry-wise default (left out of serialised settings).
    pub fn is_entries(&self) -> bool {
        matches!(self, Self::Entries)
    }
}

impl fmt::Display for MaskTiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Entries => "entries",
            Self::Square2 => "2x2",
            Self::Wide2 => "1x2",
            Self::Tall2 => "2x1",
        })
    }
}

impl FromStr for MaskTiles {
    type Err = FipsError;
    fn from_str(s: &str) -> Result<Self, FipsError> {
        match s {
            "entries" => Ok(Self::Entries),
            "2x2" => Ok(Self::Square2),
            "1x2" => Ok(Self::Wide2),
            "2x1" => Ok(Self::Tall2),
            other => Err(invalid(
                "mask_tiles",
                format!("unknown mask tiles {other:?} (entries, 2x2, 1x2, 2x1)"),
            )),
        }
    }
}

/// The tiles of an `r × M·I` factor. Tile `t = (a·M + j)·B + b` with `B = ⌈I/w⌉`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TileGrid {
    rows: usize,
    matrices: usize,
    width: usize,
    /// Tile height and width (1 or 2).
    th: usize,
    tw: usize,
}

impl TileGrid {
    /// The tiles of `tiles` over an `rows × matrices · width` factor (`None` for entry-wise masks).
    pub(crate) fn of(tiles: MaskTiles, rows: usize, matrices: usize, width: usize) -> Option<Self> {
        let (th, tw) = match tiles {
            MaskTiles::Entries => return None,
            MaskTiles::Square2 => (2, 2),
            MaskTiles::Wide2 => (1, 2),
            MaskTiles::Tall2 => (2, 1),
        };
        Some(Self {
            rows,
            matrices,
            width,
            th,
            tw,
        })
    }

    /// Entries of the factor.
    pub(crate) fn entries(&self) -> usize {
        self.rows * self.matrices * self.width
    }

    fn tile_cols(&self) -> usize {
        self.width.div_ceil(self.tw)
    }

    /// Tiles in all.
    pub(crate) fn len(&self) -> usize {
        self.rows.div_ceil(self.th) * self.matrices * self.tile_cols()
    }

    /// The tile of entry `pos`.
    #[inline]
    pub(crate) fn tile_of(&self, pos: usize) -> usize {
        let columns = self.matrices * self.width;
        let (k, col) = (pos / columns, pos % columns);
        let (j, c) = (col / self.width, col % self.width);
        ((k / self.th) * self.matrices + j) * self.tile_cols() + c / self.tw
    }

    /// Tile `t`'s first row, its matrix, its first column within the matrix, its height and
    /// width.
    fn geometry(&self, t: usize) -> (usize, usize, usize, usize, usize) {
        let b = t % self.tile_cols();
        let aj = t / self.tile_cols();
        let (a, j) = (aj / self.matrices, aj % self.matrices);
        let (row, col) = (self.th * a, self.tw * b);
        (
            row,
            j,
            col,
            (self.rows - row).min(self.th),
            (self.width - col).min(self.tw),
        )
    }

    /// Entries of tile `t`.
    pub(crate) fn weight(&self, t: usize) -> usize {
        let (_, _, _, h, w) = self.geometry(t);
        h * w
    }

    /// The positions of tile `t`'s entries, ascending.
    pub(crate) fn positions(&self, t: usize) -> impl Iterator<Item = usize> {
        let (row, j, col, h, w) = self.geometry(t);
        let columns = self.matrices * self.width;
        (row..row + h)
            .flat_map(move |k| (0..w).map(move |c| k * columns + j * self.width + col + c))
    }

    /// The tiles of matrix `j`, with their rows and columns within the matrix:
    /// `(t, rows, columns)`.
    pub(crate) fn tiles_of_matrix(
        &self,
        j: usize,
    ) -> impl Iterator<Item = (usize, std::ops::Range<usize>, std::ops::Range<usize>)> + '_ {
        let tile_cols = self.tile_cols();
        (0..self.rows.div_ceil(self.th)).flat_map(move |a| {
            (0..tile_cols).map(move |b| {
                let t = (a * self.matrices + j) * tile_cols + b;
                let (row, _, col, h, w) = self.geometry(t);
                (t, row..row + h, col..col + w)
            })
        })
    }

    /// Whether tile `t` is kept by a mask read through `kept_entry` (its first entry: masks of
    /// a tiled schedule are tile-closed).
    #[inline]
    pub(crate) fn kept_by(&self, t: usize, kept_entry: impl Fn(usize) -> bool) -> bool {
        self.positions(t).next().is_some_and(kept_entry)
    }

    /// Whether tile `t` is kept by `mask` ([`Self::kept_by`]).
    #[inline]
    pub(crate) fn kept(&self, mask: &BitMask, t: usize) -> bool {
        self.kept_by(t, |k| mask.get(k))
    }

    /// Whether every tile of `mask` is wholly kept or wholly dropped.
    #[cfg(test)]
    pub(crate) fn closed(&self, mask: &BitMask) -> bool {
        (0..self.len()).all(|t| {
            let kept = self.kept(mask, t);
            self.positions(t).all(|k| mask.get(k) == kept)
        })
    }

    /// The score `Σ |x|` of every tile over the given `(position, value)` pairs (tiles with
    /// none score 0): one value per tile, `E/4`.
    pub(crate) fn scores<F: Float>(&self, entries: impl Iterator<Item = (usize, F)>) -> Vec<F> {
        let mut scores = vec![F::zero(); self.len()];
        for (k, x) in entries {
            if let Some(s) = scores.get_mut(self.tile_of(k)) {
                *s += x.abs_();
            }
        }
        scores
    }

    /// The kept tiles (by `active`) to drop so that at most `keep` entries stay: the fewest tiles
    /// of smallest `(score, index)` whose entries reach `active weight − keep`. The staying
    /// count is then `keep − 3 ≤ nnz ≤ keep` (the last tile dropped holds at most 4 entries).
    /// Returns the dropped tiles and their entries, or `None` if nothing needs to go.
    pub(crate) fn drop_to<F: Float>(
        &self,
        scores: &[F],
        active: impl Fn(usize) -> bool,
        keep: usize,
    ) -> Option<(BitMask, usize)> {
        let total: usize = (0..self.len())
            .filter(|&t| active(t))
            .map(|t| self.weight(t))
            .sum();
        if total <= keep {
            return None;
        }
        let key = |t: usize| scores.get(t).map_or(0, |x| x.magnitude_key());
        let at = weighted_kth_smallest(self.len(), total - keep - 1, F::KEY_BITS, |t| {
            active(t).then(|| (key(t), self.weight(t)))
        })?;
        let mut dropped = BitMask::zeros(self.len());
        let mut weight = 0;
        for t in (0..self.len()).filter(|&t| active(t) && (key(t), t) <= at) {
            dropped.set(t, true);
            weight += self.weight(t);
        }
        Some((dropped, weight))
    }
}

/// The candidates for regrowth with the largest tile score `Σ |∂L/∂V|` seen so far, each with
/// its entries' gradients, to grow at most `budget` entries as whole tiles: the longest run of
/// the order (largest score, then the lower tile) whose weight stays within `budget`. A buffer
/// cut back to that run (and the tile just past it) whenever it doubles.
#[derive(Debug)]
pub(crate) struct BestTiles<F> {
    grid: TileGrid,
    budget: usize,
    items: Vec<(u32, F, [F; 4])>,
    /// The tile just past the run at the last cut: nothing ranked after it can be grown.
    bound: Option<(u64, u32)>,
    room: usize,
}

impl<F: Float> BestTiles<F> {
    pub(crate) fn new(grid: TileGrid, budget: usize) -> Self {
        let room = 2 * (budget / 4 + 1);
        Self {
            grid,
            budget,
            items: Vec::with_capacity(room),
            bound: None,
            room,
        }
    }

    /// The grid of the tiles.
    pub(crate) fn grid(&self) -> &TileGrid {
        &self.grid
    }

    #[inline]
    fn rank(&(t, score, _): &(u32, F, [F; 4])) -> (u64, u32) {
        let flip = u64::MAX >> (64 - F::KEY_BITS);
        (score.magnitude_key() ^ flip, t)
    }

    /// Offers tile `t` (below `u32::MAX`) of score `score` and its entries' gradients (in the
    /// order of [`TileGrid::positions`]).
    pub(crate) fn offer(&mut self, t: usize, score: F, gradients: [F; 4]) {
        let item = (t as u32, score, gradients);
        if self.bound.is_some_and(|b| Self::rank(&item) > b) {
            return;
        }
        self.items.push(item);
        if self.items.len() >= self.room {
            let _ = self.cut();
            self.room = self.room.max(2 * self.items.len());
        }
    }

    /// Sorts by rank and keeps the run within the budget and the tile just past it; returns
    /// whether there is such a tile (then the last item).
    fn cut(&mut self) -> bool {
        self.items.sort_unstable_by_key(Self::rank);
        let mut weight = 0;
        let mut end = self.items.len();
        for (i, item) in self.items.iter().enumerate() {
            weight += self.grid.weight(item.0 as usize);
            if weight > self.budget {
                end = i + 1;
                self.bound = Some(Self::rank(item));
                break;
            }
        }
        let crossed = weight > self.budget;
        self.items.truncate(end);
        crossed
    }

    /// The entries of the tiles to grow, as `(position, gradient)` in ascending position.
    pub(crate) fn into_entries(mut self) -> Vec<(usize, F)> {
        if self.cut() {
            self.items.pop();
        }
        let mut grown: Vec<(usize, F)> = self
            .items
            .iter()
            .flat_map(|&(t, _, g)| self.grid.positions(t as usize).zip(g))
            .collect();
        grown.sort_unstable_by_key(|&(k, _)| k);
        grown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tiles cover every entry once, never cross a matrix boundary, and have the edge sizes.
    #[test]
    fn tiles_partition_the_factor() {
        let shapes = [(4, 2, 6), (5, 3, 7), (1, 1, 1), (3, 2, 1)];
        let kinds = [MaskTiles::Square2, MaskTiles::Wide2, MaskTiles::Tall2];
        for ((r, m, i), kind) in shapes.into_iter().flat_map(|s| kinds.map(|k| (s, k))) {
            let (th, tw) = match kind {
                MaskTiles::Wide2 => (1, 2),
                MaskTiles::Tall2 => (2, 1),
                _ => (2, 2),
            };
            let grid = TileGrid::of(kind, r, m, i).unwrap();
            assert_eq!(grid.len(), r.div_ceil(th) * m * i.div_ceil(tw), "{kind}");
            let mut seen = vec![0usize; grid.entries()];
            for t in 0..grid.len() {
                let positions: Vec<usize> = grid.positions(t).collect();
                assert_eq!(positions.len(), grid.weight(t));
                assert!((1..=th * tw).contains(&positions.len()));
                let matrix = |k: usize| (k % (m * i)) / i;
                for &k in &positions {
                    seen[k] += 1;
                    assert_eq!(grid.tile_of(k), t);
                    assert_eq!(matrix(k), matrix(positions[0]), "{r} {m} {i} tile {t}");
                    // Same row band and column band as the tile's first entry.
                    let (k0, c0) = (positions[0] / (m * i), positions[0] % i);
                    assert_eq!((k / (m * i)) / th, k0 / th, "{kind} tile {t}");
                    assert_eq!((k % i) / tw, c0 / tw, "{kind} tile {t}");
                }
            }
            assert!(seen.iter().all(|&n| n == 1));
            let by_matrix: usize = (0..m).map(|j| grid.tiles_of_matrix(j).count()).sum();
            assert_eq!(by_matrix, grid.len());
            for j in 0..m {
                for (t, rows, cols) in grid.tiles_of_matrix(j) {
                    let expected: Vec<usize> = rows
                        .flat_map(|k| cols.clone().map(move |c| k * m * i + j * i + c))
                        .collect();
                    assert_eq!(grid.positions(t).collect::<Vec<_>>(), expected);
                }
            }
        }
    }

    /// The weighted selection agrees with a full sort and a running sum.
    #[test]
    fn weighted_selection_matches_a_sort() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..50 {
            let len = rng.random_range(1..300);
            let items: Vec<Option<(u64, usize)>> = (0..len)
                .map(|_| {
                    rng.random_bool(0.8).then(|| {
                        (
                            rng.random_range(0..20u64) << 20 | rng.random_range(0..3u64),
                            rng.random_range(1..=4),
                        )
                    })
                })
                .collect();
            let mut order: Vec<(u64, usize, usize)> = items
                .iter()
                .enumerate()
                .filter_map(|(k, x)| x.map(|(x, w)| (x, k, w)))
                .collect();
            order.sort_unstable();
            let total: usize = order.iter().map(|o| o.2).sum();
            for rank in 0..total + 2 {
                let got = weighted_kth_smallest(len, rank, 48, |k| items[k]);
                let mut below = 0;
                let expected = order.iter().find_map(|&(x, k, w)| {
                    let hit = rank < below + w;
                    below += w;
                    hit.then_some((x, k))
                });
                assert_eq!(got, expected, "rank {rank}");
            }
        }
    }

    /// A tile of two large entries outranks a tile of one larger entry when its sum is larger,
    /// and the kept count stays within 3 entries below the target.
    #[test]
    fn tile_sums_decide() {
        // r = 2, one matrix, I = 4: tiles {0, 1, 4, 5} and {2, 3, 6, 7}.
        let grid = TileGrid::of(MaskTiles::Square2, 2, 1, 4).unwrap();
        let values = [3.0f32, 3.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let scores = grid.scores(values.iter().copied().enumerate());
        assert_eq!(scores, vec![6.0, 5.0]);
        // Keep 4 of 8: the tile of 3 + 3 stays, the tile holding 5 goes.
        let (dropped, weight) = grid.drop_to(&scores, |_| true, 4).unwrap();
        assert_eq!((dropped.get(0), dropped.get(1), weight), (false, true, 4));
        // Keep 5 or 7: still one tile (4 entries), never more than the target.
        for keep in [5, 7] {
            let (_, weight) = grid.drop_to(&scores, |_| true, keep).unwrap();
            assert_eq!(weight, 4, "{keep}");
        }
        // With the single entry larger than the pair's sum the other tile stays.
        let values = [3.0f32, 3.0, 7.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let scores = grid.scores(values.iter().copied().enumerate());
        let (dropped, _) = grid.drop_to(&scores, |_| true, 4).unwrap();
        assert_eq!((dropped.get(0), dropped.get(1)), (true, false));
        assert!(grid.drop_to(&scores, |_| true, 8).is_none());
    }

    /// Growth keeps the longest run of the order (largest score, lower tile) within the budget,
    /// whatever the order of the offers, and returns its entries with their gradients.
    #[test]
    fn best_tiles_are_the_run_within_the_budget() {
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        // r = 5, two matrices, I = 3: tiles of 4, 2 and 1 entries.
        let grid = TileGrid::of(MaskTiles::Square2, 5, 2, 3).unwrap();
        let scores: Vec<f32> = (0..grid.len()).map(|t| ((t * 7) % 5) as f32).collect();
        let mut order: Vec<usize> = (0..grid.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        for budget in [0, 1, 3, 4, 7, 10, 25, 100] {
            let mut offers = order.clone();
            offers.shuffle(&mut rng);
            let mut best = BestTiles::new(grid, budget);
            for &t in &offers {
                let g = [t as f32, t as f32 + 0.25, t as f32 + 0.5, t as f32 + 0.75];
                best.offer(t, scores[t], g);
            }
            let mut expected = Vec::new();
            let mut weight = 0;
            for &t in &order {
                if weight + grid.weight(t) > budget {
                    break;
                }
                weight += grid.weight(t);
                expected.extend(
                    grid.positions(t)
                        .zip([0.0, 0.25, 0.5, 0.75])
                        .map(|(k, d)| (k, t as f32 + d)),
                );
            }
            expected.sort_by_key(|&(k, _)| k);
            let got = best.into_entries();
            assert_eq!(got, expected, "budget {budget}");
            assert!(got.len() <= budget);
            assert!(
                budget.min(grid.entries()) - got.len() < 4,
                "budget {budget}"
            );
        }
    }
}
