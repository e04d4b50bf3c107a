//! The uploader (DESIGN.md §3): every sync interval, or sooner when enough is dirty, it takes
//! the journal position `p`, builds the content of every dirty block as of `p` (so the store
//! always holds exactly a prefix of the write history, I1), packs the blocks into chunks, PUTs
//! them (I3: before any map row points at them), commits one block-map transaction that also
//! records `p`, syncs the map to the store, and only then forgets the journal range.
//!
//! Garbage collection runs here too, after block-map maintenance: a chunk none of whose blocks
//! is live is deleted once no block-map state that can still be restored refers to it.

use super::read::{fetch_block, stored_blocks};
use super::{META_JOURNAL_OWNER, META_JOURNAL_SEQ, MapRole, Shared, blocking, lock, other};
use crate::cache::{CacheInsert, CacheKey};
use crate::chunk::ChunkBuilder;
use blockmap::writer::WriterError;
use blockmap::{BlockLocation, MapChange};
use bytes::Bytes;
use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Level of LTX snapshots in a Litestream replica.
const SNAPSHOT_LEVEL: u8 = 9;

/// Bytes of block content materialised at a time.
const MATERIALIZE_BYTES: u64 = 8 << 20;
/// Chunk PUTs in flight per upload.
const PUT_CONCURRENCY: usize = 2;
/// Block-map maintenance (compaction, snapshot, retention) and GC every this many uploads.
const MAINTAIN_EVERY: u64 = 60;
/// Uploads idle this long: tidy the map replica (cheap; a busy writer never waits for it).
const TIDY_WHEN_IDLE_FOR: Duration = Duration::from_secs(5);

pub(super) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut uploads = 0u64;
    // When the last upload finished, while the map replica has files an idle tidy would fold.
    let mut untidy_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(shared.config.sync_interval) => {}
            _ = shared.upload_now.notified() => {}
            _ = stop.changed() => return,
        }
        if lock(&shared.failure).is_some() {
            return;
        }
        match boxed(upload_once(&shared)).await {
            Ok(false) => {
                if untidy_since.is_some_and(|t| t.elapsed() >= TIDY_WHEN_IDLE_FOR) {
                    untidy_since = None;
                    if let Err(e) = boxed(tidy(&shared)).await {
                        tracing::warn!(volume = %shared.meta.name, "block map tidy failed: {e}");
                    }
                }
                continue;
            }
            Ok(true) => {
                uploads += 1;
                untidy_since = Some(Instant::now());
            }
            Err(e) => {
                tracing::warn!(volume = %shared.meta.name, "upload failed, will retry: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        }
        if uploads % MAINTAIN_EVERY == 0 {
            if let Err(e) = boxed(maintain(&shared)).await {
                tracing::warn!(volume = %shared.meta.name, "maintenance failed, will retry: {e}");
            }
        }
    }
}

/// Folds the map replica's recent transaction files together (see `MapWriter::tidy`), so the
/// next open of the volume, here or elsewhere, reads a few files instead of one per upload.
/// Runs when uploads go idle and at clean close; serialised with uploads and maintenance.
pub(super) async fn tidy(shared: &Arc<Shared>) -> io::Result<()> {
    let _serialised = shared.maintenance.lock().await;
    if let MapRole::Writer(writer) = &shared.map {
        boxed(writer.tidy())
            .await
            .map_err(|e| other("block map tidy", e))?;
    }
    Ok(())
}

/// What one maintenance pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    /// Sparse chunks whose live blocks were moved into new chunks.
    pub chunks_rewritten: u64,
    /// Dead chunks deleted from the store.
    pub chunks_deleted: u64,
    /// Chunks no map state ever referred to (a writer died between PUT and commit), deleted.
    pub orphans_deleted: u64,
}

/// State kept across maintenance passes; its lock also serialises uploads with maintenance.
#[derive(Default)]
pub(super) struct Maintenance {
    /// Dead chunk → the map TXID at which it was first seen dead.
    dead_seen: HashMap<u64, u64>,
}

/// Block-map maintenance (compaction, snapshot, retention), then GC: rewrite sparse chunks,
/// delete dead ones that no restorable map state refers to.
pub(super) async fn maintain(shared: &Arc<Shared>) -> io::Result<GcReport> {
    let mut state = shared.maintenance.lock().await;
    if let MapRole::Writer(writer) = &shared.map {
        boxed(writer.maintain())
            .await
            .map_err(|e| other("block map maintenance", e))?;
    }
    let chunks_rewritten = boxed(rewrite_sparse_chunks(shared)).await?;
    let chunks_deleted = boxed(collect_garbage(shared, &mut state.dead_seen)).await?;
    let orphans_deleted = boxed(sweep_orphans(shared)).await?;
    Ok(GcReport {
        chunks_rewritten,
        chunks_deleted,
        orphans_deleted,
    })
}

/// Pins a future as `Send` at its concrete lifetime: without this, rustc fails to prove the
/// uploader's future `Send` for every lifetime when it is spawned (a known compiler limitation).
pub(super) fn boxed<'a, T>(
    f: impl std::future::Future<Output = T> + Send + 'a,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>> {
    Box::pin(f)
}

/// Uploads until everything journaled is stored (clean shutdown).
pub(super) async fn upload_all(shared: &Arc<Shared>) -> io::Result<()> {
    for _ in 0..10 {
        if !upload_once(shared).await? {
            return Ok(());
        }
    }
    Ok(())
}

fn next_chunk_id(shared: &Shared) -> u64 {
    // Unique across writers and restarts: the writer's lease epoch is never reused.
    (shared.chunk_epoch << 32) | shared.next_chunk.fetch_add(1, Ordering::Relaxed)
}

/// One upload of everything journaled so far. `Ok(false)` if there was nothing to do.
pub(super) async fn upload_once(shared: &Arc<Shared>) -> io::Result<bool> {
    let _serialised = shared.maintenance.lock().await;
    let through = shared.journaled_through();
    if through <= *shared.uploaded.borrow() {
        return Ok(false);
    }
    let work = shared.overlay().pending_through(through);
    let mut changes: Vec<MapChange> = work
        .zero_ranges
        .iter()
        .map(|&(first, end)| MapChange::Delete {
            first,
            count: end - first,
        })
        .collect();
    let mut new_chunks: Vec<(u64, u64)> = Vec::new();
    let mut puts: JoinSet<io::Result<()>> = JoinSet::new();
    let mut packer = Packer::new(shared);
    // Blocks materialised at a time: bounded memory whatever the chunk size.
    let batch = ((MATERIALIZE_BYTES / shared.block_size()).max(1)) as usize;
    for start in (0..work.blocks.len()).step_by(batch) {
        let blocks: Vec<u64> = work.blocks[start..(start + batch).min(work.blocks.len())].to_vec();
        let needs_base: Vec<u64> = {
            let overlay = shared.overlay();
            blocks
                .iter()
                .copied()
                .filter(|&b| overlay.needs_base(b, through))
                .collect()
        };
        let mut bases = stored_blocks(shared, needs_base).await?;
        // Materialising reads the journal, packing compresses and writes the cache: all on the
        // low-priority background thread, so serving requests comes first.
        let s = Arc::clone(shared);
        packer = shared
            .background
            .run(move || {
                let bs = s.meta.block_size as usize;
                // The overlay is locked per block, not per batch: writers wait for one block's
                // materialisation at most, even when this thread is preempted.
                let contents: Vec<(u64, Option<Vec<u8>>)> = blocks
                    .iter()
                    .map(|&b| {
                        let base = bases.remove(&b);
                        s.overlay()
                            .materialize_through(b, through, || {
                                Ok(base.map_or_else(|| vec![0u8; bs], |d: Bytes| d.to_vec()))
                            })
                            .map(|data| (b, data))
                    })
                    .collect::<io::Result<_>>()?;
                let mut to_cache = Vec::with_capacity(contents.len());
                for (block, data) in &contents {
                    if let Some(data) = data {
                        if let Some(insert) = packer.add(&s, *block, data)? {
                            to_cache.push(insert);
                        }
                    }
                }
                // Just written means likely read soon: keep the batch in the cache, in one go.
                if let Err(e) = s.cache.insert_batch(&to_cache) {
                    tracing::debug!("cannot cache uploaded blocks: {e}");
                }
                Ok(packer)
            })
            .await?;
        changes.extend(packer.holes.drain(..).map(|block| MapChange::Delete {
            first: block,
            count: 1,
        }));
        for (id, full) in std::mem::take(&mut packer.sealed) {
            seal(shared, id, full, &mut changes, &mut new_chunks, &mut puts).await?;
        }
    }
    let retired = std::mem::take(&mut packer.retired);
    if !packer.builder.is_empty() {
        seal(
            shared,
            packer.chunk_id,
            packer.builder,
            &mut changes,
            &mut new_chunks,
            &mut puts,
        )
        .await?;
    }
    while let Some(done) = puts.join_next().await {
        done.map_err(|e| other("chunk upload task", e))??;
    }
    commit(shared, Some(through), new_chunks, changes).await?;
    sync_map(shared).await?;
    {
        let mut overlay = shared.overlay_mut();
        overlay.drop_through(through);
        shared.overlay_generation.fetch_add(1, Ordering::Release);
        shared
            .dirty_bytes
            .store(overlay.data_bytes() as u64, Ordering::Relaxed);
    }
    shared.uploaded.send_replace(through);
    lock(&shared.stats).uploads += 1;
    // Their slots are reused by the next upload: rewriting pages the page cache holds.
    shared.cache.forget(&retired);
    let s = Arc::clone(shared);
    blocking(move || match lock(&s.journal).as_mut() {
        Some(journal) => journal.release(through),
        None => Ok(()),
    })
    .await?;
    Ok(true)
}

/// Packs materialised blocks into chunks of the configured size.
struct Packer {
    builder: ChunkBuilder,
    chunk_id: u64,
    /// Chunks that reached the target size, to be PUT.
    sealed: Vec<(u64, ChunkBuilder)>,
    /// Blocks whose content is all zeros: not stored, they become holes.
    holes: Vec<u64>,
    /// Cache keys of the packed blocks' previous versions: dead once this upload commits.
    retired: Vec<CacheKey>,
}

impl Packer {
    fn new(shared: &Shared) -> Self {
        Packer {
            builder: ChunkBuilder::new(shared.meta.block_size),
            chunk_id: next_chunk_id(shared),
            sealed: Vec::new(),
            holes: Vec::new(),
            retired: Vec::new(),
        }
    }

    /// Packs one block; what to write into the cache for it (`None`: all zeros, a hole).
    fn add<'a>(
        &mut self,
        shared: &Shared,
        block: u64,
        data: &'a [u8],
    ) -> io::Result<Option<CacheInsert<'a>>> {
        // The block's previous version (if cached) is dead once this upload commits. It stays
        // in the cache until then: a read that merges an edit not yet uploaded with the stored
        // block needs it, and a miss would cost a store round trip per read.
        if let Some(old) = shared
            .locations
            .get_range(block, 1)
            .and_then(|found| found.first().copied().flatten())
        {
            self.retired.push(CacheKey::of(&old));
        }
        if data.iter().all(|&b| b == 0) {
            self.holes.push(block);
            return Ok(None);
        }
        let entry = self
            .builder
            .add(block, data)
            .map_err(|e| other("building a chunk", e))?;
        // The chunk key is valid for the cache as soon as the chunk exists, and harmless before
        // (chunk ids are never reused).
        let insert = CacheInsert {
            key: CacheKey {
                chunk: self.chunk_id,
                offset: entry.offset,
            },
            checksum: entry.checksum,
            data,
        };
        if self.builder.len() >= shared.config.chunk_bytes {
            let full =
                std::mem::replace(&mut self.builder, ChunkBuilder::new(shared.meta.block_size));
            let id = std::mem::replace(&mut self.chunk_id, next_chunk_id(shared));
            self.sealed.push((id, full));
        }
        Ok(Some(insert))
    }
}

/// Finishes a chunk and starts its PUT (waiting if `PUT_CONCURRENCY` are in flight).
async fn seal(
    shared: &Arc<Shared>,
    id: u64,
    builder: ChunkBuilder,
    changes: &mut Vec<MapChange>,
    new_chunks: &mut Vec<(u64, u64)>,
    puts: &mut JoinSet<io::Result<()>>,
) -> io::Result<()> {
    let (bytes, entries) = builder.finish();
    new_chunks.push((id, bytes.len() as u64));
    changes.extend(entries.iter().map(|e| MapChange::Put {
        block: e.block,
        location: BlockLocation {
            chunk: id,
            offset: e.offset,
            length: e.length,
            checksum: e.checksum,
        },
    }));
    while puts.len() >= PUT_CONCURRENCY {
        if let Some(done) = puts.join_next().await {
            done.map_err(|e| other("chunk upload task", e))??;
        }
    }
    let shared = Arc::clone(shared);
    puts.spawn(async move { shared.chunks.put(id, bytes).await });
    Ok(())
}

/// One block-map transaction; for an upload, it records the journal position it covers.
async fn commit(
    shared: &Arc<Shared>,
    through: Option<u64>,
    new_chunks: Vec<(u64, u64)>,
    changes: Vec<MapChange>,
) -> io::Result<()> {
    let s = Arc::clone(shared);
    blocking(move || {
        let updates = s
            .updates
            .as_ref()
            .ok_or_else(|| io::Error::other("read-only volume"))?;
        let seq = through.map(|t| t.to_string());
        let meta: Vec<(&str, &str)> = match &seq {
            Some(seq) => vec![
                (META_JOURNAL_SEQ, seq.as_str()),
                (META_JOURNAL_OWNER, s.instance.as_str()),
            ],
            None => Vec::new(),
        };
        lock(updates)
            .apply_with_meta(&new_chunks, &changes, &meta)
            .map_err(|e| other("block map transaction", e))?;
        // Before the overlay forgets these edits, so a read never sees neither.
        s.locations.apply(&changes);
        Ok(())
    })
    .await
}

/// Chunks at most this full are rewritten.
const SPARSE_FRACTION: f64 = 0.25;
/// Live bytes moved per maintenance pass at most, so a pass stays short.
const REWRITE_BUDGET: u64 = 64 << 20;

/// Moves the live blocks of sparse chunks into new chunks, so that the old ones die and their
/// space can be reclaimed. Content does not change, only where it lives.
async fn rewrite_sparse_chunks(shared: &Arc<Shared>) -> io::Result<u64> {
    let s = Arc::clone(shared);
    let victims: Vec<(u64, Vec<(u64, BlockLocation)>)> = blocking(move || {
        let map = lock(&s.lookups);
        let mut picked = Vec::new();
        let mut budget = REWRITE_BUDGET;
        for chunk in map
            .chunks_at_most_live(SPARSE_FRACTION)
            .map_err(|e| other("block map", e))?
        {
            if chunk.live_blocks == 0 || chunk.live_bytes > budget {
                continue;
            }
            budget -= chunk.live_bytes;
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
    let mut changes = Vec::new();
    let mut new_chunks = Vec::new();
    let mut puts: JoinSet<io::Result<()>> = JoinSet::new();
    let mut builder = ChunkBuilder::new(shared.meta.block_size);
    let mut chunk_id = next_chunk_id(shared);
    for (_, blocks) in &victims {
        for &(block, location) in blocks {
            if shared.overlay().touches(block) {
                continue; // the next upload replaces it anyway
            }
            let data = fetch_block(shared, location).await?;
            builder
                .add(block, &data)
                .map_err(|e| other("building a chunk", e))?;
            if builder.len() >= shared.config.chunk_bytes {
                let full =
                    std::mem::replace(&mut builder, ChunkBuilder::new(shared.meta.block_size));
                let id = std::mem::replace(&mut chunk_id, next_chunk_id(shared));
                seal(shared, id, full, &mut changes, &mut new_chunks, &mut puts).await?;
            }
        }
    }
    if !builder.is_empty() {
        seal(
            shared,
            chunk_id,
            builder,
            &mut changes,
            &mut new_chunks,
            &mut puts,
        )
        .await?;
    }
    while let Some(done) = puts.join_next().await {
        done.map_err(|e| other("chunk upload task", e))??;
    }
    commit(shared, None, new_chunks, changes).await?;
    sync_map(shared).await?;
    let count = victims.len() as u64;
    lock(&shared.stats).chunks_rewritten += count;
    tracing::info!(volume = %shared.meta.name, chunks = count, "rewrote sparse chunks");
    Ok(count)
}

/// Syncs the block map to the store, retrying transient failures until it works. Being fenced
/// (another writer took the volume) stops this volume's writes for good.
async fn sync_map(shared: &Shared) -> io::Result<()> {
    let MapRole::Writer(writer) = &shared.map else {
        return Err(io::Error::other("read-only volume"));
    };
    let mut delay = Duration::from_millis(200);
    loop {
        match writer.sync().await {
            Ok(_) => return Ok(()),
            Err(
                e @ (WriterError::Lease(_)
                | WriterError::Replica(blockmap::replica::ReplicaError::Conflict(_))),
            ) => {
                let why = format!("another writer took volume {}: {e}", shared.meta.name);
                shared.fail(why.clone());
                return Err(io::Error::other(why));
            }
            Err(e) => {
                tracing::warn!(volume = %shared.meta.name, "block map sync failed, retrying in {delay:?}: {e}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Deletes chunks with no live block once no restorable block-map state can refer to them.
/// `dead_seen` remembers the map TXID at which each dead chunk was first seen dead: states from
/// that TXID on do not use it (chunk ids are never reused), so it may go once the oldest
/// restorable state is at least that new.
async fn collect_garbage(
    shared: &Arc<Shared>,
    dead_seen: &mut HashMap<u64, u64>,
) -> io::Result<u64> {
    let MapRole::Writer(writer) = &shared.map else {
        return Ok(0);
    };
    let txid = writer.txid();
    let s = Arc::clone(shared);
    let dead: Vec<u64> = blocking(move || {
        let map = lock(&s.lookups);
        Ok(map
            .chunks_at_most_live(0.0)
            .map_err(|e| other("block map", e))?
            .into_iter()
            .filter(|c| c.live_blocks == 0)
            .map(|c| c.chunk)
            .collect())
    })
    .await?;
    for chunk in &dead {
        dead_seen.entry(*chunk).or_insert(txid);
    }
    dead_seen.retain(|chunk, _| dead.contains(chunk));
    let oldest = oldest_restorable_txid(shared).await?;
    let deletable: Vec<u64> = dead_seen
        .iter()
        .filter(|&(_, &seen)| seen <= oldest)
        .map(|(&chunk, _)| chunk)
        .collect();
    if deletable.is_empty() {
        return Ok(0);
    }
    for &chunk in &deletable {
        shared.chunks.delete(chunk).await?;
    }
    let s = Arc::clone(shared);
    let removed = deletable.clone();
    blocking(move || {
        let updates = s
            .updates
            .as_ref()
            .ok_or_else(|| io::Error::other("read-only volume"))?;
        let mut map = lock(updates);
        for chunk in removed {
            map.remove_chunk(chunk).map_err(|e| other("block map", e))?;
        }
        Ok(())
    })
    .await?;
    sync_map(shared).await?;
    for chunk in &deletable {
        dead_seen.remove(chunk);
    }
    lock(&shared.stats).chunks_deleted += deletable.len() as u64;
    tracing::info!(volume = %shared.meta.name, chunks = deletable.len(), "deleted dead chunks");
    Ok(deletable.len() as u64)
}

/// Deletes chunks that no block-map state refers to: uploaded by an earlier writer (an older
/// lease epoch, so never one of this writer's uploads in flight) that died or was fenced
/// before committing them. Chunks leave the map's chunk table only after GC deleted them, so a
/// chunk of an older epoch missing from the table was never committed by anyone.
async fn sweep_orphans(shared: &Arc<Shared>) -> io::Result<u64> {
    let objects = shared.chunks.list().await?;
    let s = Arc::clone(shared);
    let known: std::collections::HashSet<u64> = blocking(move || {
        let map = lock(&s.lookups);
        let mut stmt = map
            .connection()
            .prepare("SELECT chunk FROM chunks")
            .map_err(|e| other("block map", e))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, i64>(0))
            .map_err(|e| other("block map", e))?;
        rows.map(|r| r.map(|c| c as u64).map_err(|e| other("block map", e)))
            .collect()
    })
    .await?;
    let orphans: Vec<u64> = objects
        .into_iter()
        .filter(|id| id >> 32 < shared.chunk_epoch && !known.contains(id))
        .collect();
    for &chunk in &orphans {
        shared.chunks.delete(chunk).await?;
    }
    if !orphans.is_empty() {
        tracing::info!(volume = %shared.meta.name, chunks = orphans.len(), "deleted orphaned chunks");
    }
    Ok(orphans.len() as u64)
}

/// The oldest block-map TXID a restore can still reach: the older retained snapshot, or 1 while
/// a history from the beginning is still in the store.
async fn oldest_restorable_txid(shared: &Shared) -> io::Result<u64> {
    let files = shared
        .replica
        .list()
        .await
        .map_err(|e| other("listing the block map", e))?;
    // Snapshots always start at TXID 1; other levels do only while the whole history is kept.
    if files
        .iter()
        .any(|f| f.level != SNAPSHOT_LEVEL && f.name.min_txid == 1)
    {
        return Ok(1);
    }
    Ok(files
        .iter()
        .filter(|f| f.level == SNAPSHOT_LEVEL)
        .map(|f| f.name.max_txid)
        .min()
        .unwrap_or(1))
}
