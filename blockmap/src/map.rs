//! Typed access to the block map. Every change goes through [`BlockMap::apply`], one
//! transaction per batch, which keeps the per-chunk live accounting exact.

use crate::schema::{CREATE, SCHEMA_VERSION};
use rusqlite::{Connection, OptionalExtension, Transaction, params};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("block map database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("block map schema version {found} is newer than this program's {SCHEMA_VERSION}")]
    NewerSchema { found: i64 },
    #[error("block {block} would point at chunk {chunk}, which is not registered")]
    UnknownChunk { block: u64, chunk: u64 },
    #[error("chunk {chunk} still holds {live_blocks} live blocks")]
    ChunkInUse { chunk: u64, live_blocks: u64 },
    #[error("value {0} does not fit the block map's 63-bit integers")]
    OutOfRange(u64),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Where one block's current content lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLocation {
    pub chunk: u64,
    /// Byte offset of the block's compressed form inside the chunk object.
    pub offset: u64,
    /// Length of the compressed form.
    pub length: u32,
    /// Checksum of the block's uncompressed content, verified on every read from storage.
    pub checksum: u32,
}

/// One change in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapChange {
    /// The block now lives here (replacing any previous location).
    Put { block: u64, location: BlockLocation },
    /// Blocks `first..first+count` read as zeros from now on (TRIM, WRITE_ZEROES).
    Delete { first: u64, count: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkStats {
    pub chunk: u64,
    pub total_bytes: u64,
    pub live_bytes: u64,
    pub live_blocks: u64,
}

pub struct BlockMap {
    conn: Connection,
}

fn int(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::OutOfRange(v))
}

fn location(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<BlockLocation> {
    Ok(BlockLocation {
        chunk: row.get::<_, i64>(first)? as u64,
        offset: row.get::<_, i64>(first + 1)? as u64,
        length: row.get::<_, i64>(first + 2)? as u32,
        checksum: row.get::<_, i64>(first + 3)? as u32,
    })
}

impl BlockMap {
    /// Uses `conn` as the block map, creating the schema if needed.
    pub fn new(conn: Connection) -> Result<Self> {
        let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(Error::NewerSchema { found });
        }
        conn.execute_batch(CREATE)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(BlockMap { conn })
    }

    /// Uses `conn` as an existing map without writing to it (read-only views, followers).
    pub fn open_read_only(conn: Connection) -> Result<Self> {
        let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(Error::NewerSchema { found });
        }
        Ok(BlockMap { conn })
    }

    /// An in-memory map (tests, tools).
    pub fn in_memory() -> Result<Self> {
        Self::new(Connection::open_in_memory()?)
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn get(&self, block: u64) -> Result<Option<BlockLocation>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT chunk, offset, length, checksum FROM blocks WHERE block = ?1",
        )?;
        Ok(stmt
            .query_row([int(block)?], |r| location(r, 0))
            .optional()?)
    }

    /// Blocks present in `first..first+count`, in order.
    pub fn range(&self, first: u64, count: u64) -> Result<Vec<(u64, BlockLocation)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT block, chunk, offset, length, checksum FROM blocks
             WHERE block >= ?1 AND block < ?2 ORDER BY block",
        )?;
        let end = first.saturating_add(count);
        let rows = stmt.query_map([int(first)?, int(end)?], |r| {
            Ok((r.get::<_, i64>(0)? as u64, location(r, 1)?))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Runs `(start, len)` of consecutive present blocks within `first..first+count`.
    pub fn allocated_runs(&self, first: u64, count: u64) -> Result<Vec<(u64, u64)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT block FROM blocks WHERE block >= ?1 AND block < ?2 ORDER BY block",
        )?;
        let end = first.saturating_add(count);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut rows = stmt.query([int(first)?, int(end)?])?;
        while let Some(row) = rows.next()? {
            let block = row.get::<_, i64>(0)? as u64;
            match runs.last_mut() {
                Some((start, len)) if *start + *len == block => *len += 1,
                _ => runs.push((block, 1)),
            }
        }
        Ok(runs)
    }

    /// Applies one batch atomically: registers `new_chunks` as `(chunk, total_bytes)`, then the
    /// changes in order. Per-chunk live bytes and blocks stay exact.
    pub fn apply(&mut self, new_chunks: &[(u64, u64)], changes: &[MapChange]) -> Result<()> {
        self.apply_with_meta(new_chunks, changes, &[])
    }

    /// [`BlockMap::apply`] that also sets metadata keys in the same transaction (for example the
    /// journal position an upload covers, so recovery knows exactly what the map holds).
    pub fn apply_with_meta(
        &mut self,
        new_chunks: &[(u64, u64)],
        changes: &[MapChange],
        meta: &[(&str, &str)],
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        for (key, value) in meta {
            tx.prepare_cached(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?
            .execute([key, value])?;
        }
        for &(chunk, total) in new_chunks {
            tx.prepare_cached(
                "INSERT INTO chunks (chunk, total_bytes, live_bytes, live_blocks) VALUES (?1, ?2, 0, 0)",
            )?
            .execute([int(chunk)?, int(total)?])?;
        }
        for change in changes {
            match *change {
                MapChange::Put { block, location } => put(&tx, block, location)?,
                MapChange::Delete { first, count } => delete(&tx, first, count)?,
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn chunk(&self, chunk: u64) -> Result<Option<ChunkStats>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT chunk, total_bytes, live_bytes, live_blocks FROM chunks WHERE chunk = ?1",
        )?;
        Ok(stmt.query_row([int(chunk)?], chunk_stats).optional()?)
    }

    /// Chunks whose live bytes are at most `fraction` of their size (0.0: fully dead ones).
    pub fn chunks_at_most_live(&self, fraction: f64) -> Result<Vec<ChunkStats>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT chunk, total_bytes, live_bytes, live_blocks FROM chunks
             WHERE live_bytes <= total_bytes * ?1 ORDER BY live_bytes",
        )?;
        let rows = stmt.query_map([fraction], chunk_stats)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Blocks that still live in `chunk` (to rewrite it elsewhere).
    pub fn blocks_in_chunk(&self, chunk: u64) -> Result<Vec<(u64, BlockLocation)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT block, chunk, offset, length, checksum FROM blocks WHERE chunk = ?1 ORDER BY block",
        )?;
        let rows = stmt.query_map([int(chunk)?], |r| {
            Ok((r.get::<_, i64>(0)? as u64, location(r, 1)?))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Forgets a chunk that no block uses any more (after its object was deleted).
    pub fn remove_chunk(&mut self, chunk: u64) -> Result<()> {
        if let Some(stats) = self.chunk(chunk)? {
            if stats.live_blocks > 0 {
                return Err(Error::ChunkInUse {
                    chunk,
                    live_blocks: stats.live_blocks,
                });
            }
            self.conn
                .execute("DELETE FROM chunks WHERE chunk = ?1", [int(chunk)?])?;
        }
        Ok(())
    }

    /// Forgets chunks that no block uses any more, in one transaction (after GC deleted them).
    pub fn remove_chunks(&mut self, chunks: &[u64]) -> Result<()> {
        let tx = self.conn.transaction()?;
        for &chunk in chunks {
            let live: Option<i64> = tx
                .prepare_cached("SELECT live_blocks FROM chunks WHERE chunk = ?1")?
                .query_row([int(chunk)?], |r| r.get(0))
                .optional()?;
            if let Some(live) = live.filter(|&n| n > 0) {
                return Err(Error::ChunkInUse {
                    chunk,
                    live_blocks: live as u64,
                });
            }
            tx.prepare_cached("DELETE FROM chunks WHERE chunk = ?1")?
                .execute([int(chunk)?])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every chunk the map knows, dead or alive.
    pub fn chunk_ids(&self) -> Result<Vec<u64>> {
        let mut stmt = self.conn.prepare_cached("SELECT chunk FROM chunks")?;
        let rows = stmt.query_map([], |r| r.get::<_, i64>(0).map(|c| c as u64))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Live bytes, and the total size of the chunks holding them (dead chunks left out): the
    /// difference is what rewriting partly dead chunks can reclaim.
    pub fn live_and_stored_bytes(&self) -> Result<(u64, u64)> {
        Ok(self.conn.query_row(
            "SELECT COALESCE(SUM(live_bytes), 0), COALESCE(SUM(total_bytes), 0) FROM chunks
             WHERE live_blocks > 0",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?)
    }

    /// Every chunk at least one block lives in: what the current state references (a checkpoint
    /// of it pins these).
    pub fn live_chunk_ids(&self) -> Result<Vec<u64>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT chunk FROM chunks WHERE live_blocks > 0 ORDER BY chunk")?;
        let rows = stmt.query_map([], |r| r.get::<_, i64>(0).map(|n| n as u64))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every chunk some block points at, whether the `chunks` table knows it or not (checking the
    /// map: `verify`), in order.
    pub fn referenced_chunk_ids(&self) -> Result<Vec<u64>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT DISTINCT chunk FROM blocks ORDER BY chunk")?;
        let rows = stmt.query_map([], |r| r.get::<_, i64>(0).map(|n| n as u64))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Blocks stored at or past `block`: how many, and the first `limit` of them.
    pub fn blocks_from(&self, block: u64, limit: usize) -> Result<(u64, Vec<u64>)> {
        let block = i64::try_from(block).map_err(|_| Error::OutOfRange(block))?;
        let count: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM blocks WHERE block >= ?1",
            [block],
            |r| r.get(0),
        )?;
        let mut stmt = self
            .conn
            .prepare_cached("SELECT block FROM blocks WHERE block >= ?1 ORDER BY block LIMIT ?2")?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map([block, limit], |r| r.get::<_, i64>(0).map(|n| n as u64))?;
        Ok((count as u64, rows.collect::<rusqlite::Result<_>>()?))
    }

    /// SQLite's own check of the database (`PRAGMA integrity_check`): the problems it reports,
    /// none when the database is sound.
    pub fn integrity_problems(&self) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare("PRAGMA integrity_check")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        let found: Vec<String> = rows.collect::<rusqlite::Result<_>>()?;
        Ok(found.into_iter().filter(|line| line != "ok").collect())
    }

    /// Whether any block at or past `block` is stored (shrinking a volume must not cut data).
    pub fn any_from(&self, block: u64) -> Result<bool> {
        let block = i64::try_from(block).map_err(|_| Error::OutOfRange(block))?;
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM blocks WHERE block >= ?1 LIMIT 1",
                [block],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    pub fn chunk_count(&self) -> Result<u64> {
        Ok(self
            .conn
            .query_row("SELECT COUNT(*) FROM chunks", [], |r| {
                r.get::<_, i64>(0).map(|n| n as u64)
            })?)
    }

    pub fn chunk_bytes(&self) -> Result<u64> {
        Ok(self.conn.query_row(
            "SELECT COALESCE(SUM(total_bytes), 0) FROM chunks",
            [],
            |r| r.get::<_, i64>(0).map(|n| n as u64),
        )?)
    }

    /// Blocks in use and the bytes their compressed forms occupy.
    pub fn usage(&self) -> Result<(u64, u64)> {
        Ok(self.conn.query_row(
            "SELECT COALESCE(SUM(live_blocks), 0), COALESCE(SUM(live_bytes), 0) FROM chunks",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?)
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn set_meta(&mut self, key: &str, value: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [key, value],
        )?;
        Ok(())
    }
}

fn chunk_stats(r: &rusqlite::Row<'_>) -> rusqlite::Result<ChunkStats> {
    Ok(ChunkStats {
        chunk: r.get::<_, i64>(0)? as u64,
        total_bytes: r.get::<_, i64>(1)? as u64,
        live_bytes: r.get::<_, i64>(2)? as u64,
        live_blocks: r.get::<_, i64>(3)? as u64,
    })
}

fn adjust(tx: &Transaction<'_>, chunk: i64, bytes: i64, blocks: i64) -> rusqlite::Result<usize> {
    tx.prepare_cached(
        "UPDATE chunks SET live_bytes = live_bytes + ?2, live_blocks = live_blocks + ?3 WHERE chunk = ?1",
    )?
    .execute(params![chunk, bytes, blocks])
}

fn put(tx: &Transaction<'_>, block: u64, loc: BlockLocation) -> Result<()> {
    let (b, chunk) = (int(block)?, int(loc.chunk)?);
    let old: Option<(i64, i64)> = tx
        .prepare_cached("SELECT chunk, length FROM blocks WHERE block = ?1")?
        .query_row([b], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((old_chunk, old_len)) = old {
        adjust(tx, old_chunk, -old_len, -1)?;
    }
    if adjust(tx, chunk, i64::from(loc.length), 1)? == 0 {
        return Err(Error::UnknownChunk {
            block,
            chunk: loc.chunk,
        });
    }
    tx.prepare_cached(
        "INSERT OR REPLACE INTO blocks (block, chunk, offset, length, checksum) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![b, chunk, int(loc.offset)?, i64::from(loc.length), i64::from(loc.checksum)])?;
    Ok(())
}

fn delete(tx: &Transaction<'_>, first: u64, count: u64) -> Result<()> {
    let (start, end) = (int(first)?, int(first.saturating_add(count))?);
    let per_chunk: Vec<(i64, i64, i64)> = tx
        .prepare_cached(
            "SELECT chunk, SUM(length), COUNT(*) FROM blocks WHERE block >= ?1 AND block < ?2 GROUP BY chunk",
        )?
        .query_map([start, end], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (chunk, bytes, blocks) in per_chunk {
        adjust(tx, chunk, -bytes, -blocks)?;
    }
    tx.prepare_cached("DELETE FROM blocks WHERE block >= ?1 AND block < ?2")?
        .execute([start, end])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(chunk: u64, offset: u64, length: u32) -> BlockLocation {
        BlockLocation {
            chunk,
            offset,
            length,
            checksum: (offset as u32) ^ 0xabcd,
        }
    }

    #[test]
    fn put_get_replace_delete_and_accounting() {
        let mut map = BlockMap::in_memory().expect("map");
        map.apply(
            &[(1, 1000)],
            &[
                MapChange::Put {
                    block: 10,
                    location: loc(1, 0, 100),
                },
                MapChange::Put {
                    block: 11,
                    location: loc(1, 100, 200),
                },
                MapChange::Put {
                    block: 13,
                    location: loc(1, 300, 300),
                },
            ],
        )
        .expect("apply");
        assert_eq!(map.get(11).expect("get"), Some(loc(1, 100, 200)));
        assert_eq!(map.get(12).expect("get"), None);
        assert_eq!(
            map.allocated_runs(0, 100).expect("runs"),
            vec![(10, 2), (13, 1)]
        );
        assert_eq!(map.usage().expect("usage"), (3, 600));

        // Rewrite block 11 into chunk 2: chunk 1 loses it.
        map.apply(
            &[(2, 500)],
            &[MapChange::Put {
                block: 11,
                location: loc(2, 0, 50),
            }],
        )
        .expect("apply");
        let c1 = map.chunk(1).expect("chunk").expect("exists");
        assert_eq!((c1.live_blocks, c1.live_bytes), (2, 400));
        // Trim everything from 0 to 1<<40: all rows gone, chunks dead.
        map.apply(
            &[],
            &[MapChange::Delete {
                first: 0,
                count: 1 << 40,
            }],
        )
        .expect("trim");
        assert_eq!(map.usage().expect("usage"), (0, 0));
        let dead: Vec<u64> = map
            .chunks_at_most_live(0.0)
            .expect("dead")
            .iter()
            .map(|c| c.chunk)
            .collect();
        assert_eq!(dead, vec![1, 2]);
        map.remove_chunk(1).expect("remove");
        assert_eq!(map.chunk(1).expect("chunk"), None);
    }

    #[test]
    fn chunk_space_accounting_and_batch_removal() {
        let mut map = BlockMap::in_memory().expect("map");
        map.apply(
            &[(1, 1000), (2, 500)],
            &[
                MapChange::Put {
                    block: 1,
                    location: loc(1, 0, 300),
                },
                MapChange::Put {
                    block: 2,
                    location: loc(2, 0, 200),
                },
            ],
        )
        .expect("apply");
        // Block 2 moves into chunk 1's neighbour 3: chunk 2 dies.
        map.apply(
            &[(3, 400)],
            &[MapChange::Put {
                block: 2,
                location: loc(3, 0, 100),
            }],
        )
        .expect("apply");
        assert_eq!(map.live_and_stored_bytes().expect("bytes"), (400, 1400));
        assert_eq!(map.chunk_bytes().expect("bytes"), 1900);
        let mut ids = map.chunk_ids().expect("ids");
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 2, 3]);
        assert!(
            matches!(
                map.remove_chunks(&[2, 1]),
                Err(Error::ChunkInUse { chunk: 1, .. })
            ),
            "a live chunk stops the batch"
        );
        assert_eq!(
            map.chunk_ids().expect("ids").len(),
            3,
            "and nothing was removed"
        );
        map.remove_chunks(&[2]).expect("remove");
        assert_eq!(map.chunk(2).expect("chunk"), None);
    }

    #[test]
    fn unknown_chunks_and_live_chunks_are_refused() {
        let mut map = BlockMap::in_memory().expect("map");
        let err = map
            .apply(
                &[],
                &[MapChange::Put {
                    block: 1,
                    location: loc(9, 0, 10),
                }],
            )
            .expect_err("unregistered chunk");
        assert!(matches!(err, Error::UnknownChunk { chunk: 9, .. }));
        assert_eq!(
            map.get(1).expect("get"),
            None,
            "the failed batch left nothing behind"
        );
        map.apply(
            &[(9, 10)],
            &[MapChange::Put {
                block: 1,
                location: loc(9, 0, 10),
            }],
        )
        .expect("apply");
        assert!(matches!(map.remove_chunk(9), Err(Error::ChunkInUse { .. })));
        assert!(map.get(u64::MAX).is_err(), "out of range");
    }

    #[test]
    fn metadata_commits_with_the_batch_or_not_at_all() {
        let mut map = BlockMap::in_memory().expect("map");
        map.apply_with_meta(
            &[(1, 10)],
            &[MapChange::Put {
                block: 1,
                location: loc(1, 0, 10),
            }],
            &[("journal_seq", "7")],
        )
        .expect("apply");
        assert_eq!(map.meta("journal_seq").expect("meta").as_deref(), Some("7"));
        let failed = map.apply_with_meta(
            &[],
            &[MapChange::Put {
                block: 2,
                location: loc(99, 0, 10),
            }],
            &[("journal_seq", "8")],
        );
        assert!(failed.is_err(), "unknown chunk");
        assert_eq!(
            map.meta("journal_seq").expect("meta").as_deref(),
            Some("7"),
            "rolled back together"
        );
    }

    #[test]
    fn metadata_round_trips() {
        let mut map = BlockMap::in_memory().expect("map");
        assert_eq!(map.meta("size").expect("meta"), None);
        map.set_meta("size", "107374182400").expect("set");
        map.set_meta("size", "1").expect("set");
        assert_eq!(map.meta("size").expect("meta").as_deref(), Some("1"));
    }
}
