//! The uploader (docs/ARCHITECTURE.md §4). When the [`UploadPolicy`] says so, it uploads
//! everything journaled so far in bounded steps. A step takes the journal position `p` that bounds it
//! (see [`Overlay::step_end`](crate::overlay::Overlay::step_end)), builds the content of every
//! block dirty up to `p` as of `p` (so the store always holds exactly a prefix of the write
//! history, I1), packs the blocks into chunks, PUTs them (I3: before any map row points at
//! them), commits one block-map transaction that also records `p`, syncs the map to the store,
//! and only then releases the journal up to `p`. So the journal drains step by step while
//! writes keep arriving, and writers that wait for room wait for one step, not for everything.
//!
//! Garbage collection ([`gc`](super::gc)) runs here too, after each step and when idle: it is
//! never beside an upload, and a dead chunk is known dead only once its map state is stored.

use super::chunk_writer::ChunkWriter;
use super::gc::{self, GcReport};
use super::helpers::{blocking, lock, other};
use super::read::stored_blocks;
use super::upload_policy::{self, Situation, UploadPolicy};
use super::{Durability, META_JOURNAL_OWNER, META_JOURNAL_SEQ, Shared};
use crate::device::DeviceError;
use blockmap::MapChange;
use blockmap::writer::WriterError;
use bytes::Bytes;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Bytes of block content materialised at a time.
const MATERIALIZE_BYTES: u64 = 8 << 20;
/// Block-map maintenance (compaction, snapshot, retention) every this many upload steps.
const MAINTAIN_EVERY: u64 = 60;
/// Uploads idle this long: tidy the map replica (cheap; a busy writer never waits for it).
const TIDY_WHEN_IDLE_FOR: Duration = Duration::from_secs(5);
/// A busy writer folds its map files every this many upload steps, beside the uploads: the
/// next open (here or on another host, after a crash too) reads about this many level-0
/// files and a few of each higher level, however long the writer ran without a pause.
const FOLD_EVERY_STEPS: u64 = 4;
/// Retry delays after a failed upload, doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);

pub(super) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut policy = UploadPolicy::new(
        shared.config.sync_interval,
        shared.config.max_upload_lag,
        shared.config.durability == Durability::Remote,
    );
    let mut steps_since_maintenance = 0u64;
    let mut steps_since_fold = 0u64;
    let mut busy_fold: Option<tokio::task::JoinHandle<()>> = None;
    // When the last upload finished, while the map replica has files an idle tidy would fold.
    let mut untidy_since: Option<Instant> = None;
    let mut last_collection = Instant::now();
    let mut retry_delay = RETRY_FIRST;
    let mut wait = true;
    // The checkpoints' pins, before anything is collected (retried by the first collection
    // if the store does not answer now).
    if let Err(e) = boxed(async {
        shared
            .maintenance
            .lock()
            .await
            .pins(&shared)
            .await
            .map(|_| ())
    })
    .await
    {
        tracing::warn!(volume = %shared.meta.name, "listing checkpoints failed, will retry: {e}");
    }
    loop {
        if wait {
            tokio::select! {
                _ = tokio::time::sleep(shared.config.sync_interval) => {}
                _ = shared.uploads.woken() => {}
                _ = stop.changed() => return,
            }
        }
        if shared.uploads.is_fenced() || *stop.borrow() {
            return;
        }
        let now = Instant::now();
        let situation = shared.situation();
        policy.tick(situation.journaled + 1, now);
        report_lag(&shared, &policy, &situation);
        let Some(reason) = policy.decide(&situation, now) else {
            shared.uploads.health.idle();
            wait = true;
            if situation.journaled <= situation.uploaded
                && untidy_since.is_some_and(|t| t.elapsed() >= TIDY_WHEN_IDLE_FOR)
            {
                untidy_since = None;
                if let Err(e) = boxed(tidy(&shared)).await {
                    tracing::warn!(volume = %shared.meta.name, "block map tidy failed: {e}");
                }
            }
            if last_collection.elapsed() >= gc::IDLE_PASS_EVERY {
                last_collection = Instant::now();
                if let Err(e) = boxed(collect(&shared)).await {
                    tracing::warn!(volume = %shared.meta.name, "garbage collection failed, will retry: {e}");
                }
            }
            continue;
        };
        tracing::trace!(volume = %shared.meta.name, ?reason, "uploading");
        match boxed(upload_through(&shared, situation.journaled, &mut policy)).await {
            Ok(steps) => {
                retry_delay = RETRY_FIRST;
                steps_since_maintenance += steps;
                steps_since_fold += steps;
                if steps_since_fold >= FOLD_EVERY_STEPS
                    && steps_since_maintenance < MAINTAIN_EVERY
                    && busy_fold.as_ref().is_none_or(|t| t.is_finished())
                {
                    steps_since_fold = 0;
                    busy_fold = Some(tokio::spawn(fold_beside_uploads(Arc::clone(&shared))));
                }
                untidy_since = Some(Instant::now());
                last_collection = Instant::now();
                policy.upload_done();
            }
            Err(e) => {
                shared.uploads.health.failed(&e);
                stores::retry::note_retry();
                tracing::warn!(volume = %shared.meta.name, "upload failed, retrying in {retry_delay:?}: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(retry_delay) => {}
                    // Someone waits: try again now (the store may be back).
                    _ = shared.uploads.woken() => {}
                    _ = stop.changed() => return,
                }
                retry_delay = (retry_delay * 2).min(RETRY_MAX);
                wait = false;
                continue;
            }
        }
        // More is waiting already (writers outran the upload, or someone waits): go on at once.
        let next = shared.situation();
        wait = !(next.wanted > next.uploaded || next.dirty_bytes >= next.journal_limit / 8);
        if steps_since_maintenance >= MAINTAIN_EVERY {
            steps_since_maintenance = 0;
            if let Err(e) = boxed(maintain(&shared)).await {
                tracing::warn!(volume = %shared.meta.name, "maintenance failed, will retry: {e}");
            }
        }
    }
}

impl Shared {
    /// What the upload policy decides on.
    fn situation(&self) -> Situation {
        Situation {
            journaled: self.log.journaled_through(),
            uploaded: self.uploads.uploaded(),
            wanted: self.uploads.wanted(),
            dirty_bytes: self.log.dirty_bytes(),
            journal_limit: self.config.max_dirty_bytes,
        }
    }
}

/// Publishes the uploader's view of the lag for the metrics endpoint.
fn report_lag(shared: &Shared, policy: &UploadPolicy, situation: &Situation) {
    let lag = policy
        .oldest_wait(situation, Instant::now())
        .unwrap_or_default();
    let health = &shared.uploads.health;
    health
        .lag_millis
        .store(lag.as_millis() as u64, Ordering::Relaxed);
    health
        .allowed_lag_millis
        .store(policy.allowed_lag().as_millis() as u64, Ordering::Relaxed);
}

/// Uploads everything journaled up to `target`, one bounded step at a time. Returns the steps.
async fn upload_through(
    shared: &Arc<Shared>,
    target: u64,
    policy: &mut UploadPolicy,
) -> io::Result<u64> {
    let mut steps = 0;
    while shared.uploads.uploaded() < target {
        shared.uploads.check_not_fenced()?;
        let mut collector = shared.maintenance.lock().await;
        let bound = shared.config.upload_step_blocks.unwrap_or_else(|| {
            upload_policy::step_blocks(shared.config.max_dirty_bytes, shared.meta.block_size)
        });
        let end = shared.log.overlay().step_end(target, bound.max(1));
        let blocks = upload_step(shared, end).await?;
        policy.step_done(&blocks);
        report_lag(shared, policy, &shared.situation());
        steps += 1;
        // The step is stored: a collection that fails (the store refusing a delete) is the
        // next pass's to finish, not this upload's failure.
        if let Err(e) = async {
            collector.note_dead(shared).await?;
            collector.collect(shared).await
        }
        .await
        {
            tracing::warn!(volume = %shared.meta.name, "garbage collection failed, will retry: {e}");
        }
    }
    Ok(steps)
}

/// Folds the map replica's recent transaction files together (see `MapWriter::tidy`), so the
/// next open of the volume, here or elsewhere, reads a few files instead of one per upload.
/// Runs when uploads go idle and at clean close; serialised with uploads and maintenance.
pub(super) async fn tidy(shared: &Arc<Shared>) -> io::Result<()> {
    let _serialised = shared.maintenance.lock().await;
    if let Some(writer) = shared.map.writer() {
        // Chunk rows GC removed since the last upload reach the store first.
        sync_map(shared).await?;
        boxed(writer.tidy())
            .await
            .map_err(|e| other("block map tidy", e))?;
    }
    Ok(())
}

/// [`MapWriter::fold`] from its own task, so uploads go on meanwhile (the map's own lock keeps
/// it apart from maintenance; a failure only leaves more files for the next open).
async fn fold_beside_uploads(shared: Arc<Shared>) {
    if let Some(writer) = shared.map.writer()
        && let Err(e) = boxed(writer.fold()).await
    {
        tracing::warn!(volume = %shared.meta.name, "block map fold failed: {e}");
    }
}

/// One garbage collection pass between uploads.
async fn collect(shared: &Arc<Shared>) -> io::Result<GcReport> {
    let mut collector = shared.maintenance.lock().await;
    collector.note_dead(shared).await?;
    collector.collect(shared).await
}

/// Block-map maintenance (compaction, snapshot, retention), then a full collection: dead and
/// partly dead chunks, and chunks orphaned by a writer that died between PUT and commit.
pub(super) async fn maintain(shared: &Arc<Shared>) -> io::Result<GcReport> {
    let mut collector = shared.maintenance.lock().await;
    if let Some(writer) = shared.map.writer() {
        sync_map(shared).await?;
        boxed(writer.maintain())
            .await
            .map_err(|e| other("block map maintenance", e))?;
    }
    collector.note_dead(shared).await?;
    let mut report = collector.collect(shared).await?;
    report.orphans_deleted = boxed(gc::sweep_orphans(shared, &mut collector)).await?;
    Ok(report)
}

/// Pins a future as `Send` at its concrete lifetime: without this, rustc fails to prove the
/// uploader's future `Send` for every lifetime when it is spawned (a known compiler limitation).
pub(super) fn boxed<'a, T>(
    f: impl std::future::Future<Output = T> + Send + 'a,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>> {
    Box::pin(f)
}

/// Uploads until everything journaled is stored (clean shutdown), then syncs what GC changed.
pub(super) async fn upload_all(shared: &Arc<Shared>) -> io::Result<()> {
    let mut policy = UploadPolicy::new(Duration::ZERO, Duration::ZERO, true);
    // A failed step is tried again, as the background uploader would, for as long as the
    // upload health says waiting can help (no refusal, progress within the stall timeout);
    // being fenced ends it at once.
    let mut delay = RETRY_FIRST;
    loop {
        let target = shared.log.journaled_through();
        if shared.uploads.uploaded() >= target {
            break;
        }
        match upload_through(shared, target, &mut policy).await {
            Ok(_) => delay = RETRY_FIRST,
            Err(e) => {
                shared.uploads.health.failed(&e);
                if shared.uploads.is_fenced() || shared.uploads.health.check().is_err() {
                    return Err(e);
                }
                stores::retry::note_retry();
                tracing::warn!(volume = %shared.meta.name, "upload failed, retrying in {delay:?}: {e}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
    let _serialised = shared.maintenance.lock().await;
    sync_map(shared).await
}

/// One bounded upload step: stores every block dirty up to journal position `end` as of `end`,
/// commits, and releases the journal up to `end`. Returns the blocks it stored, in order.
async fn upload_step(shared: &Arc<Shared>, end: u64) -> io::Result<Vec<u64>> {
    let work = shared.log.overlay().pending_through(end);
    let mut changes: Vec<MapChange> = work
        .zero_ranges
        .iter()
        .map(|&(first, end)| MapChange::Delete {
            first,
            count: end - first,
        })
        .collect();
    let mut writer = ChunkWriter::new(shared)?;
    // Blocks materialised at a time: bounded memory whatever the step and chunk size.
    let batch = ((MATERIALIZE_BYTES / shared.block_size()).max(1)) as usize;
    for blocks in work.blocks.chunks(batch) {
        let blocks = blocks.to_vec();
        let needs_base: Vec<u64> = {
            let overlay = shared.log.overlay();
            blocks
                .iter()
                .copied()
                .filter(|&b| overlay.needs_base(b, end))
                .collect()
        };
        let mut bases = stored_blocks(shared, needs_base).await?;
        let s = Arc::clone(shared);
        writer
            .add(shared, move || {
                let bs = s.meta.block_size as usize;
                // The overlay is locked per block, not per batch: writers wait for one block's
                // materialisation at most, even when this thread is preempted.
                blocks
                    .iter()
                    .map(|&b| {
                        let base = bases.remove(&b);
                        s.log
                            .overlay()
                            .materialize_through(b, end, || {
                                Ok(base.map_or_else(|| vec![0u8; bs], |d: Bytes| d.to_vec()))
                            })
                            .map(|data| (b, data))
                    })
                    .collect()
            })
            .await?;
    }
    let written = writer.finish(shared).await?;
    changes.extend(written.changes);
    commit(shared, Some(end), written.new_chunks, changes).await?;
    sync_map(shared).await?;
    let released = shared.log.uploaded_through(end);
    {
        let mut stats = lock(&shared.stats);
        stats.uploads += 1;
        stats.uploaded_journal_bytes += released;
        stats.uploaded_blocks += work.blocks.len() as u64;
        stats.uploaded_chunk_bytes += written.chunk_bytes;
    }
    // Their slots are reused by the next upload: rewriting pages the page cache holds.
    shared.cache.forget(&written.retired);
    let s = Arc::clone(shared);
    blocking(move || s.log.release_journal(end)).await?;
    // Last, so that whoever waited for it sees the step complete (counters, journal).
    shared.uploads.publish(end);
    Ok(work.blocks)
}

/// One block-map transaction; for an upload, it records the journal position it covers.
pub(super) async fn commit(
    shared: &Arc<Shared>,
    through: Option<u64>,
    new_chunks: Vec<(u64, u64)>,
    changes: Vec<MapChange>,
) -> io::Result<()> {
    let s = Arc::clone(shared);
    blocking(move || {
        let seq = through.map(|t| t.to_string());
        let meta: Vec<(&str, &str)> = match &seq {
            Some(seq) => vec![
                (META_JOURNAL_SEQ, seq.as_str()),
                (META_JOURNAL_OWNER, s.instance.as_str()),
            ],
            None => Vec::new(),
        };
        s.map
            .updates()?
            .apply_with_meta(&new_chunks, &changes, &meta)
            .map_err(|e| other("block map transaction", e))?;
        // Before the overlay forgets these edits, so a read never sees neither.
        s.map.locations.apply(&changes);
        Ok(())
    })
    .await
}

/// One block-map transaction that only sets metadata (`key`, `value`), synced to the store.
/// The caller holds the maintenance lock.
pub(super) async fn commit_meta(
    shared: &Arc<Shared>,
    key: &'static str,
    value: String,
) -> io::Result<()> {
    let s = Arc::clone(shared);
    blocking(move || {
        s.map
            .updates()?
            .apply_with_meta(&[], &[], &[(key, value.as_str())])
            .map_err(|e| other("block map transaction", e))
    })
    .await?;
    sync_map(shared).await
}

/// Syncs the block map to the store, retrying transient failures until it works. Being fenced
/// (another writer took the volume) stops this volume's writes for good.
pub(super) async fn sync_map(shared: &Shared) -> io::Result<()> {
    let Some(writer) = shared.map.writer() else {
        return Err(DeviceError::ReadOnly.into());
    };
    let mut delay = Duration::from_millis(200);
    loop {
        match writer.sync().await {
            Ok(_) => {
                shared.uploads.health.progress();
                return Ok(());
            }
            // A lease check that could not reach the store is retried like any failed sync.
            Err(
                e @ (WriterError::Lease(
                    blockmap::lease::LeaseError::Fenced { .. }
                    | blockmap::lease::LeaseError::Contended,
                )
                | WriterError::Replica(blockmap::replica::ReplicaError::Conflict(_))),
            ) => {
                let why = format!("another writer took volume {}: {e}", shared.meta.name);
                shared.fence(why.clone());
                return Err(DeviceError::Fenced(why).into());
            }
            Err(e) => {
                // Writers waiting for room learn from this whether to keep waiting.
                shared
                    .uploads
                    .health
                    .failed(&map_sync_error(e.to_string(), &e));
                stores::retry::note_retry();
                tracing::warn!(volume = %shared.meta.name, "block map sync failed, retrying in {delay:?}: {e}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// A failed map sync as an I/O error whose kind says whether retrying can help.
fn map_sync_error(message: String, e: &WriterError) -> io::Error {
    let kind = match e {
        WriterError::Replica(blockmap::replica::ReplicaError::Store(
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. },
        )) => io::ErrorKind::PermissionDenied,
        WriterError::Replica(blockmap::replica::ReplicaError::Store(
            object_store::Error::NotFound { .. },
        )) => io::ErrorKind::NotFound,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("block map sync: {message}"))
}
