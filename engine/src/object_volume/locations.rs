//! An in-memory cache of block-map lookups, so that a read whose blocks are known never leaves
//! the async worker (a SQLite query through the VFS may fetch a page from the store, so it
//! runs on a blocking thread; handing each 4 KiB read to one cost more than the read itself).
//!
//! This process is the volume's only writer, so the cache is exact: the uploader applies each
//! map transaction here right after committing it. A lookup that raced with such a transaction
//! is not cached (the generation changed while it ran). Bounded: when full, it starts over.

use crate::fast_hash::FastHashMap;
use blockmap::{BlockLocation, MapChange};
use std::sync::Mutex;

/// Entries kept at most (about 40 bytes each).
const CAPACITY: usize = 512 * 1024;
/// Deleted ranges up to this many blocks are remembered as holes; longer ones are forgotten.
const REMEMBERED_DELETE: u64 = 4096;

#[derive(Default)]
struct Inner {
    /// `None`: the block has no row (a hole).
    blocks: FastHashMap<u64, Option<BlockLocation>>,
    generation: u64,
}

#[derive(Default)]
pub(super) struct Locations {
    inner: Mutex<Inner>,
}

impl Locations {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where every block of `first..first+count` lives, if all of them are known.
    pub fn get_range(&self, first: u64, count: u64) -> Option<Vec<Option<BlockLocation>>> {
        let inner = self.inner();
        (first..first + count)
            .map(|b| inner.blocks.get(&b).copied())
            .collect()
    }

    /// Read before a lookup and passed to [`Locations::fill`].
    pub fn generation(&self) -> u64 {
        self.inner().generation
    }

    /// Records the result of a lookup of `first..first+count` (`rows` are the blocks present),
    /// unless the map changed since `generation` was read.
    pub fn fill(&self, generation: u64, first: u64, count: u64, rows: &[(u64, BlockLocation)]) {
        let mut inner = self.inner();
        if inner.generation != generation {
            return;
        }
        if inner.blocks.len() + count as usize > CAPACITY {
            inner.blocks.clear();
        }
        for block in first..first + count {
            inner.blocks.insert(block, None);
        }
        for &(block, location) in rows {
            inner.blocks.insert(block, Some(location));
        }
    }

    /// Records blocks known to be at `rows` (a warm-up, not a range lookup: blocks between
    /// them stay unknown). `false` once the map changed since `generation` or the cache is
    /// half full: the caller stops warming.
    pub fn fill_rows(&self, generation: u64, rows: &[(u64, BlockLocation)]) -> bool {
        let mut inner = self.inner();
        if inner.generation != generation || inner.blocks.len() + rows.len() > CAPACITY / 2 {
            return false;
        }
        for &(block, location) in rows {
            inner.blocks.entry(block).or_insert(Some(location));
        }
        true
    }

    /// Applies a committed map transaction.
    pub fn apply(&self, changes: &[MapChange]) {
        let mut inner = self.inner();
        inner.generation += 1;
        for change in changes {
            match *change {
                MapChange::Put { block, location } => {
                    if inner.blocks.len() >= CAPACITY {
                        inner.blocks.clear();
                    }
                    inner.blocks.insert(block, Some(location));
                }
                MapChange::Delete { first, count } if count <= REMEMBERED_DELETE => {
                    for block in first..first + count {
                        if let Some(entry) = inner.blocks.get_mut(&block) {
                            *entry = None;
                        }
                    }
                }
                MapChange::Delete { first, count } => {
                    // Long deletes (trims of large ranges) are rare: one pass over the table.
                    let end = first.saturating_add(count);
                    inner
                        .blocks
                        .retain(|&block, _| block < first || block >= end);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(chunk: u64) -> BlockLocation {
        BlockLocation {
            chunk,
            offset: 8,
            length: 100,
            checksum: 7,
        }
    }

    #[test]
    fn lookups_are_cached_and_changes_applied() {
        let l = Locations::default();
        assert_eq!(l.get_range(0, 4), None);
        let g = l.generation();
        l.fill(g, 0, 4, &[(2, loc(1))]);
        assert_eq!(
            l.get_range(0, 4),
            Some(vec![None, None, Some(loc(1)), None])
        );
        l.apply(&[
            MapChange::Put {
                block: 0,
                location: loc(2),
            },
            MapChange::Delete { first: 2, count: 1 },
        ]);
        assert_eq!(l.get_range(0, 3), Some(vec![Some(loc(2)), None, None]));
        l.apply(&[MapChange::Delete {
            first: 1,
            count: 1 << 30,
        }]);
        assert_eq!(l.get_range(0, 1), Some(vec![Some(loc(2))]));
        assert_eq!(l.get_range(1, 1), None, "a long delete forgets the range");
    }

    #[test]
    fn warming_fills_single_blocks_until_the_map_changes() {
        let l = Locations::default();
        let g = l.generation();
        assert!(l.fill_rows(g, &[(3, loc(1)), (9, loc(2))]));
        assert_eq!(l.get_range(3, 1), Some(vec![Some(loc(1))]));
        assert_eq!(l.get_range(4, 1), None, "blocks between rows stay unknown");
        l.apply(&[MapChange::Put {
            block: 3,
            location: loc(5),
        }]);
        assert!(!l.fill_rows(g, &[(3, loc(1))]), "stale after a commit");
        assert_eq!(l.get_range(3, 1), Some(vec![Some(loc(5))]));
    }

    #[test]
    fn a_lookup_that_raced_with_a_commit_is_not_cached() {
        let l = Locations::default();
        let g = l.generation();
        l.apply(&[MapChange::Put {
            block: 5,
            location: loc(9),
        }]);
        l.fill(g, 5, 1, &[]); // looked up before the commit: stale
        assert_eq!(l.get_range(5, 1), Some(vec![Some(loc(9))]));
    }
}
