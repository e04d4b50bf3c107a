//! Keeping a replica cheap to open: compaction of one level into the next, full snapshots at
//! level 9, and retention.
//!
//! Compacted files are published create-only like everything else, so two compactors racing
//! on one replica cannot overwrite each other; the loser gets `Conflict` and can simply list
//! again.

use crate::replica::{Replica, ReplicaError, ReplicaFile, ReplicaResult};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use ltx::naming::SNAPSHOT_LEVEL;
use ltx::{CompactOptions, RestoreTarget};
use object_store::path::Path;

/// Downloads of source files running at once.
const FETCH_PARALLELISM: usize = 16;

async fn fetch_all(replica: &Replica, files: &[ReplicaFile]) -> ReplicaResult<Vec<Bytes>> {
    // Owned items: a closure over `&ReplicaFile` makes callers' futures fail rustc's `Send`
    // check when they are spawned.
    stream::iter(files.to_vec())
        .map(|f| async move { replica.fetch(&f).await })
        .buffered(FETCH_PARALLELISM)
        .try_collect()
        .await
}

fn merge(replica_inputs: Vec<Bytes>) -> ReplicaResult<Bytes> {
    let readers: Vec<&[u8]> = replica_inputs.iter().map(|b| &b[..]).collect();
    let (out, _) =
        ltx::compact(readers, Vec::new(), CompactOptions::default()).map_err(|source| {
            ReplicaError::Ltx {
                path: "compaction".into(),
                source,
            }
        })?;
    Ok(Bytes::from(out))
}

/// Compacts the files of `from` that come after everything in `to` into one new file in `to`.
/// Returns `None` when there is nothing new. The source files must continue `to` without a gap.
pub async fn compact_level(
    replica: &Replica,
    from: u8,
    to: u8,
) -> ReplicaResult<Option<ReplicaFile>> {
    compact_level_listed(replica, &replica.list().await?, from, to).await
}

/// [`compact_level`] with the replica's listing already made (by a caller that compacts several
/// levels in a row and keeps its listing up to date with what each step published).
pub async fn compact_level_listed(
    replica: &Replica,
    listing: &[ReplicaFile],
    from: u8,
    to: u8,
) -> ReplicaResult<Option<ReplicaFile>> {
    // What `to` or any level above it (snapshots included) holds needs no compaction:
    // starting after all of it keeps the merged files contiguous where files those levels
    // made unnecessary have been deleted.
    let done = listing
        .iter()
        .filter(|f| f.level >= to)
        .map(|f| f.name.max_txid)
        .max()
        .unwrap_or(0);
    let mut sources: Vec<ReplicaFile> = listing
        .iter()
        .filter(|f| f.level == from && f.name.max_txid > done)
        .cloned()
        .collect();
    sources.sort_by_key(|f| f.name);
    let Some(first) = sources.first() else {
        return Ok(None);
    };
    if first.name.min_txid > done + 1 && done > 0 {
        return Err(ReplicaError::Invalid(format!(
            "level {to} ends at TXID {done:016x} but level {from} resumes at {:016x}",
            first.name.min_txid
        )));
    }
    let merged = merge(fetch_all(replica, &sources).await?)?;
    let path = replica.publish(to, merged).await?;
    Ok(replica
        .list_level(to)
        .await?
        .into_iter()
        .find(|f| f.path == path))
}

/// Writes a full snapshot (level 9) of the latest state, unless the newest snapshot is current.
pub async fn snapshot(replica: &Replica) -> ReplicaResult<Option<ReplicaFile>> {
    let files = replica.plan(RestoreTarget::Latest).await?;
    if files.len() == 1 && files[0].level == SNAPSHOT_LEVEL {
        return Ok(None);
    }
    let merged = merge(fetch_all(replica, &files).await?)?;
    let path = replica.publish(SNAPSHOT_LEVEL, merged).await?;
    Ok(replica
        .list_level(SNAPSHOT_LEVEL)
        .await?
        .into_iter()
        .find(|f| f.path == path))
}

/// Keeps the newest `keep_snapshots` snapshots (at least one) and every file still needed to
/// restore any TXID after the oldest of them; deletes the rest. Returns what was deleted.
pub async fn enforce_retention(
    replica: &Replica,
    keep_snapshots: usize,
) -> ReplicaResult<Vec<ReplicaFile>> {
    enforce_retention_keeping(replica, keep_snapshots, i64::MAX, &[]).await
}

/// [`enforce_retention`] that also keeps every state since `since_ms` (Unix milliseconds)
/// restorable — the snapshots written since then, the newest one written before, and every
/// file after that one — and never deletes the files at `reading` (those a reader still reads
/// pages from).
pub async fn enforce_retention_keeping(
    replica: &Replica,
    keep_snapshots: usize,
    since_ms: i64,
    reading: &[Path],
) -> ReplicaResult<Vec<ReplicaFile>> {
    let listing = replica.list().await?;
    let mut snapshots: Vec<&ReplicaFile> = listing
        .iter()
        .filter(|f| f.level == SNAPSHOT_LEVEL)
        .collect();
    snapshots.sort_by_key(|f| std::cmp::Reverse(f.name.max_txid));
    // The newest snapshot written before `since_ms` holds a state at or before every state
    // since then; without one, everything is still needed.
    let Some(window_start) = snapshots.iter().position(|f| f.last_modified_ms < since_ms) else {
        return Ok(Vec::new());
    };
    let keep = keep_snapshots.max(1).max(window_start + 1);
    let Some(oldest_kept) = snapshots.get(keep - 1).or(snapshots.last()) else {
        return Ok(Vec::new()); // no snapshot: everything is still needed
    };
    let horizon = oldest_kept.name.max_txid;
    let doomed: Vec<ReplicaFile> = listing
        .iter()
        .filter(|f| !reading.contains(&f.path))
        .filter(|f| {
            if f.level == SNAPSHOT_LEVEL {
                f.name.max_txid < horizon
            } else {
                f.name.max_txid <= horizon
            }
        })
        .cloned()
        .collect();
    for f in &doomed {
        replica.delete(f).await?;
    }
    Ok(doomed)
}

/// Deletes, of `listing` (the replica's, recent), the level-0 to level-8 files whose
/// transactions a file of a higher level (below the snapshots) holds as well, once they are older than `since_ms` (outside the restore window)
/// and not at `reading`. Restores of the latest state and of any state in the window plan
/// the same files as before; a state inside a folded range and outside the window is no
/// longer restorable on its own, as with Litestream's level-0 retention. Keeps the replica —
/// and so every open's listing of it — small while a writer folds often. Returns how many
/// files were deleted.
pub async fn drop_covered(
    replica: &Replica,
    listing: &[ReplicaFile],
    since_ms: i64,
    reading: &[Path],
) -> ReplicaResult<usize> {
    let levels: Vec<&ReplicaFile> = listing
        .iter()
        .filter(|f| f.level < SNAPSHOT_LEVEL)
        .collect();
    let covered: Vec<&ReplicaFile> = levels
        .iter()
        .copied()
        .filter(|f| f.last_modified_ms < since_ms && !reading.contains(&f.path))
        .filter(|f| {
            levels.iter().any(|g| {
                g.level > f.level
                    && g.name.min_txid <= f.name.min_txid
                    && g.name.max_txid >= f.name.max_txid
            })
        })
        .collect();
    for f in &covered {
        replica.delete(f).await?;
    }
    Ok(covered.len())
}
