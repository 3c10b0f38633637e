//! Grouping blocks: which consecutive blocks share one basis.

use std::fmt;

use crate::foundation::error::{FipsError, Result, invalid};

/// The reference group size (DeiT-B: blocks 0–3, 4–7, 8–11).
pub const DEFAULT_GROUP_SIZE: usize = 4;

/// Groups of consecutive block indices; every block is in at most one group and every group holds
/// blocks of one shape. Blocks in no group stay uncompressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockGroups {
    groups: Vec<Vec<usize>>,
}

impl BlockGroups {
    /// Consecutive runs of equal-shaped blocks cut into groups of `size` (the last group of a run
    /// may be smaller). `shapes[b]` is block `b`'s `(d, I)`; a group never spans a change of shape.
    pub fn consecutive(shapes: &[(usize, usize)], size: usize) -> Result<Self> {
        if size == 0 {
            return Err(invalid("group_size", "must be at least 1"));
        }
        if shapes.is_empty() {
            return Err(FipsError::EmptyGroup);
        }
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (b, shape) in shapes.iter().enumerate() {
            let extend = groups
                .last()
                .is_some_and(|g| g.len() < size && shapes[g[0]] == *shape);
            match groups.last_mut() {
                Some(g) if extend => g.push(b),
                _ => groups.push(vec![b]),
            }
        }
        Ok(Self { groups })
    }

    /// Parses an explicit grouping such as `0-3,4-7,8-11` or `0-5,6,7-11` (inclusive ranges,
    /// one group per comma-separated item) and checks it against the blocks' shapes.
    pub fn parse(spec: &str, shapes: &[(usize, usize)]) -> Result<Self> {
        let mut groups = Vec::new();
        for item in spec.split(',').map(str::trim) {
            let bad = || {
                invalid(
                    "groups",
                    format!("{item:?} is not a block index or an inclusive range a-b"),
                )
            };
            let (first, last) = match item.split_once('-') {
                Some((a, b)) => (
                    a.trim().parse::<usize>().map_err(|_| bad())?,
                    b.trim().parse::<usize>().map_err(|_| bad())?,
                ),
                None => {
                    let b = item.parse::<usize>().map_err(|_| bad())?;
                    (b, b)
                }
            };
            if last < first {
                return Err(invalid(
                    "groups",
                    format!("range {item:?} is empty (ends before it starts)"),
                ));
            }
            groups.push((first..=last).collect());
        }
        let out = Self { groups };
        out.check(shapes)?;
        Ok(out)
    }

    /// Checks that indices exist, no block is in two groups, and no group mixes shapes.
    pub fn check(&self, shapes: &[(usize, usize)]) -> Result<()> {
        let mut owner = vec![None; shapes.len()];
        for (g, blocks) in self.groups.iter().enumerate() {
            if blocks.is_empty() {
                return Err(FipsError::EmptyGroup);
            }
            for &b in blocks {
                let slot = owner.get_mut(b).ok_or(FipsError::IndexOutOfRange {
                    what: "block",
                    index: b,
                    len: shapes.len(),
                })?;
                if let Some(other) = *slot {
                    return Err(invalid(
                        "groups",
                        format!("block {b} is in group {other} and in group {g}"),
                    ));
                }
                *slot = Some(g);
                if shapes[b] != shapes[blocks[0]] {
                    return Err(FipsError::GroupMismatch {
                        block: b,
                        reason: format!(
                            "group {g} mixes shapes: block {} has (d, I) = {:?}, block {b} has {:?}",
                            blocks[0], shapes[blocks[0]], shapes[b]
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// The groups, each a list of block indices.
    pub fn groups(&self) -> &[Vec<usize>] {
        &self.groups
    }

    /// Number of groups.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// Whether there are no groups.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

impl fmt::Display for BlockGroups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self
            .groups
            .iter()
            .map(|g| match (g.first(), g.last()) {
                (Some(a), Some(b)) if a == b => a.to_string(),
                (Some(a), Some(b)) => format!("{a}-{b}"),
                _ => String::new(),
            })
            .collect();
        f.write_str(&items.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_groups_respect_size_and_shape_changes() {
        let deit = vec![(192, 768); 12];
        let g = BlockGroups::consecutive(&deit, 4).unwrap();
        assert_eq!(g.to_string(), "0-3,4-7,8-11");
        let swin = [
            vec![(192, 768); 2],
            vec![(384, 1536); 2],
            vec![(768, 3072); 6],
        ]
        .concat();
        let g = BlockGroups::consecutive(&swin, 4).unwrap();
        assert_eq!(g.to_string(), "0-1,2-3,4-7,8-9");
        assert!(BlockGroups::consecutive(&swin, 0).is_err());
    }

    #[test]
    fn explicit_groups_parse_and_validate() {
        let shapes = vec![(8, 16); 12];
        let g = BlockGroups::parse("0-3, 4-7,8-11", &shapes).unwrap();
        assert_eq!(g.groups()[1], vec![4, 5, 6, 7]);
        assert_eq!(BlockGroups::parse("0-5,6,7-11", &shapes).unwrap().len(), 3);
        // Blocks may be left out.
        assert_eq!(BlockGroups::parse("8-11", &shapes).unwrap().len(), 1);
        for bad in ["0-3,3-5", "0-12", "a-b", "3-1", "", "0-3,,4"] {
            assert!(
                BlockGroups::parse(bad, &shapes).is_err(),
                "{bad:?} must be rejected"
            );
        }
        let mixed = [vec![(8, 16); 2], vec![(8, 32); 2]].concat();
        assert!(matches!(
            BlockGroups::parse("0-3", &mixed),
            Err(FipsError::GroupMismatch { block: 2, .. })
        ));
    }
}
