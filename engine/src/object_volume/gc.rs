//! Garbage collection of chunks, driven by space.
//!
//! A chunk dies when the last block that lived in it is rewritten, moved or trimmed. It may be
//! deleted once no map state that can still be restored refers to it: the current state does
//! not (it is dead), and past states stay restorable for the restore window
//! (`VolumeConfig::restore_window`), counted from the moment the store's map stopped using the
//! chunk. With the default window of zero a dead chunk goes right after the upload that killed
//! it; a longer window keeps every chunk overwritten within it, so that any map state of the
//! last few minutes can be restored whole.
//!
//! Chunks partly dead are rewritten (their live blocks moved into new chunks, so the old ones
//! die) at a rate driven by the dead share of the store: nothing while dead bytes in live
//! chunks stay under [`DEAD_SHARE_TARGET`] of the live bytes, and more per pass the further
//! above it the store is, emptiest chunks first. Collection runs in the uploader's task between
//! upload steps (never beside one), its CPU work on the uploader's low-priority thread, so it
//! takes what requests being served leave.

use super::Shared;
use super::checkpoints::{self, Pins};
use super::chunk_writer::ChunkWriter;
use super::fetch::fetch_blocks;
use super::helpers::{blocking, lock, other};
use super::upload::{commit, sync_map};
use crate::chunk_store::StoredBlock;
use blockmap::BlockLocation;
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Dead bytes inside live chunks tolerated, as a share of the live bytes, before rewriting.
pub const DEAD_SHARE_TARGET: f64 = 0.2;
/// Live bytes moved per pass at the target; more above it (see [`rewrite_budget`]).
const REWRITE_PASS_BYTES: u64 = 64 << 20;
/// Chunks at least this live are never worth rewriting: moving them frees little.
const MAX_LIVE_FRACTION: f64 = 0.9;
/// Blocks rewritten per background job.
const REWRITE_BATCH: usize = 128;

/// What one collection did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    /// Partly dead chunks whose live blocks were moved into new chunks.
    pub chunks_rewritten: u64,
    /// Dead chunks deleted from the store.
    pub chunks_deleted: u64,
    /// Chunks no map state ever referred to (a writer died between PUT and commit), deleted.
    pub orphans_deleted: u64,
}

/// Garbage collection state; its lock also serialises uploads with collection (and with
/// checkpoints, which change the pins).
#[derive(Default)]
pub(super) struct Collector {
    /// Dead chunk → when the store's map stopped referring to it.
    dead_since: HashMap<u64, Instant>,
    /// What the volume's checkpoints keep; `None` until listed from the store, and until
    /// then nothing is deleted (neither chunks nor map files).
    pins: Option<Pins>,
}

impl Collector {
    /// The checkpoints' pins, listed from the store the first time (see [`Collector::pins`]);
    /// hands the map writer the files they keep.
    pub(super) async fn pins(&mut self, shared: &Arc<Shared>) -> io::Result<&mut Pins> {
        if self.pins.is_none() {
            let listed =
                checkpoints::list(shared.store.as_ref(), &shared.prefix, &shared.meta.name).await?;
            self.pins = Some(Pins::new(listed));
            self.pins_changed(shared);
        }
        self.pins
            .as_mut()
            .ok_or_else(|| io::Error::other("internal: pins not loaded"))
    }

    /// Tells the map writer which replica files the checkpoints keep now.
    pub(super) fn pins_changed(&self, shared: &Shared) {
        if let (Some(pins), Some(writer)) = (&self.pins, shared.map.writer()) {
            writer.set_pinned(pins.map_files(&shared.root()));
        }
    }

    /// Notes chunks that became dead with the map state just synced to the store.
    pub async fn note_dead(&mut self, shared: &Arc<Shared>) -> io::Result<()> {
        let s = Arc::clone(shared);
        let dead: Vec<u64> = blocking(move || {
            s.map
                .lookups()
                .chunks_at_most_live(0.0)
                .map(|chunks| {
                    chunks
                        .into_iter()
                        .filter(|c| c.live_blocks == 0)
                        .map(|c| c.chunk)
                        .collect()
                })
                .map_err(|e| other("block map", e))
        })
        .await?;
        let now = Instant::now();
        let dead_set: HashSet<u64> = dead.iter().copied().collect();
        self.dead_since.retain(|chunk, _| dead_set.contains(chunk));
        for chunk in dead {
            self.dead_since.entry(chunk).or_insert(now);
        }
        Ok(())
    }

    /// Deletes dead chunks older than the restore window, then rewrites partly dead ones if the
    /// store holds too much dead data. The map changes this makes are committed locally and
    /// reach the store with the next sync.
    pub async fn collect(&mut self, shared: &Arc<Shared>) -> io::Result<GcReport> {
        if !shared.config.collect_garbage {
            return Ok(GcReport::default());
        }
        let mut report = GcReport {
            chunks_deleted: self.delete_expired(shared).await?,
            ..GcReport::default()
        };
        let rewritten = rewrite_partly_dead(shared).await?;
        if rewritten > 0 {
            report.chunks_rewritten = rewritten;
            self.note_dead(shared).await?;
            report.chunks_deleted += self.delete_expired(shared).await?;
        }
        Ok(report)
    }

    async fn delete_expired(&mut self, shared: &Arc<Shared>) -> io::Result<u64> {
        let window = shared.config.restore_window;
        let pinned = self.pins(shared).await?.chunks();
        let expired: Vec<u64> = self
            .dead_since
            .iter()
            .filter(|&(chunk, &since)| {
                since.elapsed() >= window
                    && !pinned.contains(chunk)
                    && !shared.chunks.is_inherited(*chunk)
            })
            .map(|(&chunk, _)| chunk)
            .collect();
        if expired.is_empty() {
            return Ok(0);
        }
        let deletions = futures::stream::iter(expired.iter().copied())
            .map(|chunk| async move { shared.chunks.delete(chunk).await })
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await;
        deletions.into_iter().collect::<io::Result<()>>()?;
        let s = Arc::clone(shared);
        let removed = expired.clone();
        blocking(move || {
            s.map
                .updates()?
                .remove_chunks(&removed)
                .map_err(|e| other("block map", e))
        })
        .await?;
        for chunk in &expired {
            self.dead_since.remove(chunk);
        }
        lock(&shared.stats).chunks_deleted += expired.len() as u64;
        tracing::debug!(volume = %shared.meta.name, chunks = expired.len(), "deleted dead chunks");
        Ok(expired.len() as u64)
    }
}

/// Live bytes to move in one pass: none at or below the target dead share, then in proportion
/// to how far above it the store is.
fn rewrite_budget(live_bytes: u64, dead_bytes: u64) -> u64 {
    let allowed = (live_bytes as f64 * DEAD_SHARE_TARGET) as u64;
    if dead_bytes <= allowed || live_bytes == 0 {
        return 0;
    }
    let over = dead_bytes as f64 / allowed.max(1) as f64;
    (REWRITE_PASS_BYTES as f64 * over.min(8.0)) as u64
}

/// Picks the chunks to rewrite: emptiest first (by live fraction), until enough dead bytes
/// would be freed to be at half the target (so passes do not hover at the threshold) or the
/// pass's budget of live bytes to move is spent.
fn pick_victims(
    chunks: &[blockmap::ChunkStats],
    live_bytes: u64,
    dead_bytes: u64,
) -> Vec<blockmap::ChunkStats> {
    let mut budget = rewrite_budget(live_bytes, dead_bytes);
    let mut to_free = dead_bytes.saturating_sub((live_bytes as f64 * DEAD_SHARE_TARGET) as u64 / 2);
    let mut by_fraction: Vec<&blockmap::ChunkStats> = chunks.iter().collect();
    by_fraction.sort_by(|a, b| {
        let fraction = |c: &blockmap::ChunkStats| c.live_bytes as f64 / c.total_bytes.max(1) as f64;
        fraction(a).total_cmp(&fraction(b))
    });
    let mut picked = Vec::new();
    for chunk in by_fraction {
        if budget == 0 || to_free == 0 {
            break;
        }
        if chunk.live_blocks == 0
            || chunk.live_bytes as f64 > chunk.total_bytes as f64 * MAX_LIVE_FRACTION
            || chunk.live_bytes > budget
        {
            continue;
        }
        budget -= chunk.live_bytes;
        to_free = to_free.saturating_sub(chunk.total_bytes - chunk.live_bytes);
        picked.push(*chunk);
    }
    picked
}

/// Moves the live blocks of the emptiest chunks into new chunks, if the store holds more dead
/// bytes than the target allows. Content does not change, only where it lives.
async fn rewrite_partly_dead(shared: &Arc<Shared>) -> io::Result<u64> {
    let s = Arc::clone(shared);
    let victims: Vec<(u64, Vec<(u64, BlockLocation)>)> = blocking(move || {
        let map = s.map.lookups();
        let candidates = map
            .chunks_at_most_live(MAX_LIVE_FRACTION)
            .map_err(|e| other("block map", e))?;
        let (live, stored) = map
            .live_and_stored_bytes()
            .map_err(|e| other("block map", e))?;
        let mut picked = Vec::new();
        for chunk in pick_victims(&candidates, live, stored.saturating_sub(live)) {
            let blocks = map
                .blocks_in_chunk(chunk.chunk)
                .map_err(|e| other("block map", e))?;
            picked.push((chunk.chunk, blocks));
        }
        Ok(picked)
    })
    .await?;
    if victims.is_empty() {
        return Ok(0);
    }
    // Blocks with edits waiting are moved too: under a backlog larger than one upload step
    // the next upload of them may be many steps away, and skipping them would leave every
    // chunk partly alive (measured: 4 KiB random writes over 8 GiB piled up 5.7x the live
    // data in the store without a single chunk dying).
    let moving: Vec<(u64, BlockLocation)> = victims
        .iter()
        .flat_map(|(_, blocks)| blocks.iter().copied())
        .collect();
    let mut writer = ChunkWriter::new(shared)?;
    for batch in moving.chunks(REWRITE_BATCH) {
        // Neighbours in a victim come in one ranged GET each (see `fetch`).
        let stored: Vec<StoredBlock> = batch
            .iter()
            .map(|&(block, location)| StoredBlock { block, location })
            .collect();
        let fetched = fetch_blocks(shared, &stored).await;
        let contents = batch
            .iter()
            .zip(fetched)
            .map(|(&(block, _), data)| data.map(|d| (block, Some(d.to_vec()))))
            .collect::<io::Result<Vec<_>>>()?;
        writer.add(shared, move || Ok(contents)).await?;
    }
    let written = writer.finish(shared).await?;
    commit(shared, None, written.new_chunks, written.changes).await?;
    sync_map(shared).await?;
    shared.cache.forget(&written.retired);
    let count = victims.len() as u64;
    lock(&shared.stats).chunks_rewritten += count;
    tracing::debug!(volume = %shared.meta.name, chunks = count, "rewrote partly dead chunks");
    Ok(count)
}

/// Deletes chunks that no block-map state refers to: uploaded by an earlier writer (an older
/// lease epoch, so never one of this writer's uploads in flight) that died or was fenced
/// before committing them. Chunks leave the map's chunk table only after GC deleted them, so a
/// chunk of an older epoch missing from the table was never committed by anyone — unless a
/// checkpoint references it (a state the map was later restored from), and then it stays.
pub(super) async fn sweep_orphans(
    shared: &Arc<Shared>,
    collector: &mut Collector,
) -> io::Result<u64> {
    let pinned = collector.pins(shared).await?.chunks();
    let objects = shared.chunks.list().await?;
    let s = Arc::clone(shared);
    let known: HashSet<u64> = blocking(move || {
        s.map
            .lookups()
            .chunk_ids()
            .map_err(|e| other("block map", e))
    })
    .await?
    .into_iter()
    .collect();
    let orphans: Vec<u64> = objects
        .into_iter()
        .filter(|&id| {
            shared.chunk_ids.is_older(id) && !known.contains(&id) && !pinned.contains(&id)
        })
        .collect();
    for &chunk in &orphans {
        shared.chunks.delete(chunk).await?;
    }
    if !orphans.is_empty() {
        tracing::info!(volume = %shared.meta.name, chunks = orphans.len(), "deleted orphaned chunks");
    }
    Ok(orphans.len() as u64)
}

/// How long collection may wait between passes when uploads are idle.
pub const IDLE_PASS_EVERY: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;
    use blockmap::ChunkStats;

    fn chunk(chunk: u64, total: u64, live: u64) -> ChunkStats {
        ChunkStats {
            chunk,
            total_bytes: total,
            live_bytes: live,
            live_blocks: u64::from(live > 0),
        }
    }

    #[test]
    fn nothing_is_rewritten_at_or_below_the_target() {
        assert_eq!(rewrite_budget(100 << 20, 20 << 20), 0);
        let chunks = [chunk(1, 10 << 20, 1 << 20)];
        assert!(pick_victims(&chunks, 100 << 20, 20 << 20).is_empty());
    }

    #[test]
    fn more_dead_data_moves_more_per_pass() {
        let light = rewrite_budget(1 << 30, 400 << 20);
        let heavy = rewrite_budget(1 << 30, 1 << 30);
        assert!(light > 0 && heavy > light, "{light} {heavy}");
    }

    #[test]
    fn emptiest_chunks_go_first_and_full_ones_never() {
        let chunks = [
            chunk(3, 24 << 20, 23 << 20),
            chunk(2, 24 << 20, 6 << 20),
            chunk(4, 2 << 20, 1 << 20),
            chunk(1, 24 << 20, 1 << 20),
        ];
        let picked: Vec<u64> = pick_victims(&chunks, 200 << 20, 200 << 20)
            .iter()
            .map(|c| c.chunk)
            .collect();
        assert_eq!(picked, vec![1, 2, 4]);
    }
}
