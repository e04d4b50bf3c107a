//! Restoring a volume to a checkpoint (docs/ARCHITECTURE.md §8): a new map line whose base is
//! the checkpoint's files, so nothing is copied and the cost does not grow with the volume.
//!
//! The steps, each safe to be interrupted by a crash:
//! 1. With `keep_current`, the volume is opened (its journal replayed and uploaded) and the
//!    current state checkpointed, then closed.
//! 2. Line n + 1 is created (create-only: two restores cannot both win). From here on every
//!    open serves the checkpoint's state.
//! 3. A map writer on the new line (it takes the writer lease) commits a new journal owner that
//!    names no folder, so no journal left anywhere — here, or by the host that wrote the
//!    checkpoint — is ever replayed on top of the restored state: each is moved aside at its
//!    folder's next open. A crash between 2 and 3 is covered too: the line names the owner the
//!    checkpoint recorded as stale, and while the map still records it no journal is replayed
//!    (`MapLine::effective_owner`).
//! 4. The old line's map files that no checkpoint pins are deleted (chunks only it used go with
//!    the next collection's orphan sweep).
//!
//! The caller has made sure no process serves the volume meanwhile.

use super::checkpoints::{self, not_found};
use super::helpers::other;
use super::inspect::{self, Holder};
use super::lines::{self, MapLine};
use super::{META_JOURNAL_OWNER, ObjectVolume, VolumeConfig, catalog};
use crate::metadata::VolumeMetadata;
use blockmap::BlockMap;
use blockmap::replica::{Layout, Replica};
use blockmap::writer::{MapWriter, OpenAhead};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::path::Path;
use std::io;
use std::sync::Arc;
use stores::counting::CountingStore;

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RestoreReport {
    pub checkpoint: String,
    /// The map state now served.
    pub txid: u64,
    /// The volume's map line from now on.
    pub line: u64,
    /// The checkpoint of the state replaced, with `keep_current`.
    pub kept_current: Option<String>,
}

/// What to restore.
#[derive(Debug, Clone, Copy)]
pub struct RestoreRequest<'a> {
    pub volume: &'a str,
    pub checkpoint: &'a str,
    /// Checkpoint the current state first (the volume is opened: its journal replayed and
    /// uploaded).
    pub keep_current: bool,
}

/// Restores a volume to one of its checkpoints (see the module's steps). `config` is the
/// volume's usual configuration (its local folder is where a crash's journal is replayed from,
/// for `keep_current`; its holder names this process in the lease). `may_take` sees who holds
/// the volume now and refuses to go on when that process may still be serving it.
pub async fn restore(
    store: Arc<dyn ObjectStore>,
    prefix: &Path,
    layout: Layout,
    request: RestoreRequest<'_>,
    config: VolumeConfig,
    may_take: impl FnOnce(&Holder) -> io::Result<()>,
) -> io::Result<RestoreReport> {
    let (report, _) = switch(store, prefix, layout, request, config, may_take, false).await?;
    Ok(report)
}

/// A restored volume's map, still taken by the restore (its lease held, its first transaction
/// stored), for the open that serves the volume next to adopt instead of taking it again
/// (`ObjectVolume::open_restored`): a served volume's restore then costs the switch alone.
pub struct RestoredMap {
    pub(super) writer: MapWriter,
    pub(super) replica: Arc<Replica>,
    pub(super) db_name: String,
    pub(super) meta: VolumeMetadata,
    pub(super) line: MapLine,
    /// The store as the restore used it, counting requests: the volume's metrics go on from it.
    pub(super) counted: Arc<CountingStore>,
}

/// [`restore`], keeping the map taken for [`ObjectVolume::open_restored`]; the caller opens the
/// volume with it (or drops it: the lease then lapses as a crashed writer's would, and the next
/// open takes it over).
pub async fn restore_keeping_map(
    store: Arc<dyn ObjectStore>,
    prefix: &Path,
    layout: Layout,
    request: RestoreRequest<'_>,
    config: VolumeConfig,
) -> io::Result<(RestoreReport, RestoredMap)> {
    let counted = Arc::new(CountingStore::new(store));
    let store = Arc::clone(&counted) as Arc<dyn ObjectStore>;
    let (report, kept) = switch(store, prefix, layout, request, config, |_| Ok(()), true).await?;
    let (writer, replica, db_name, meta, line) =
        kept.ok_or_else(|| io::Error::other("internal: the restore kept no map"))?;
    Ok((
        report,
        RestoredMap {
            writer,
            replica,
            db_name,
            meta,
            line,
            counted,
        },
    ))
}

/// What a restore that keeps its map hands over.
type KeptMap = (MapWriter, Arc<Replica>, String, VolumeMetadata, MapLine);

/// The steps of the module's doc; with `keep_map`, step 3's writer is returned still open.
async fn switch(
    store: Arc<dyn ObjectStore>,
    prefix: &Path,
    layout: Layout,
    request: RestoreRequest<'_>,
    config: VolumeConfig,
    may_take: impl FnOnce(&Holder) -> io::Result<()>,
    keep_map: bool,
) -> io::Result<(RestoreReport, Option<KeptMap>)> {
    let RestoreRequest {
        volume: name,
        checkpoint,
        keep_current,
    } = request;
    checkpoints::validate_name(checkpoint)?;
    let root = catalog::volume_root(prefix, name);
    let mut may_take = Some(may_take);
    let kept_current = match keep_current {
        false => None,
        true => {
            // Opening the volume takes it: ask first.
            if let Some(check) = may_take.take() {
                check(&inspect::holder(store.as_ref(), prefix, name).await?)?;
            }
            let volume =
                ObjectVolume::open(Arc::clone(&store), prefix, layout, name, config.clone())
                    .await?;
            let kept = volume.create_checkpoint(None).await;
            crate::BlockDevice::close(&volume).await?;
            Some(kept?.name)
        }
    };
    // Everything the switch needs, in one round trip (two requests deep).
    let (meta, old_line, found, holder) = tokio::join!(
        catalog::load(store.as_ref(), prefix, name),
        lines::current(store.as_ref(), &root),
        checkpoints::load(store.as_ref(), prefix, name, checkpoint),
        inspect::holder(store.as_ref(), prefix, name)
    );
    let meta = catalog::require(meta?, name)?;
    let holder = holder?;
    if let Some(check) = may_take {
        check(&holder)?;
    }
    let old_line = old_line?;
    let found = found?.ok_or_else(|| not_found(name, checkpoint))?;
    let next = old_line.as_ref().map_or(0, |l| l.line) + 1;
    let line = MapLine {
        line: next,
        dir: lines::replica_dir(next),
        base_txid: found.txid,
        base: found.map_files.clone(),
        checkpoint: checkpoint.to_string(),
        stale_owner: found.journal_owner.clone(),
    };
    lines::create(store.as_ref(), &root, &line).await?;
    let epoch = match &holder {
        Holder::Nobody => 0,
        Holder::Released(lease) | Holder::Held(lease) => lease.epoch,
    };
    let taking = Taking {
        line: &line,
        uuid: &meta.uuid,
        holder: &config.holder,
        lease_epoch: epoch,
    };
    // The old line's files go while the new line is taken: neither needs the other.
    let (owned, dropped) = tokio::join!(
        own_journal_position(&store, &root, layout, taking),
        drop_old_line(&store, &root, layout, old_line.as_ref(), prefix, name)
    );
    let (writer, replica, db_name) = owned?;
    if let Err(e) = dropped {
        tracing::warn!(
            volume = name,
            "deleting the replaced map line's files failed: {e}"
        );
    }
    let report = RestoreReport {
        checkpoint: checkpoint.to_string(),
        txid: line.base_txid,
        line: line.line,
        kept_current,
    };
    if keep_map {
        return Ok((report, Some((writer, replica, db_name, meta, line))));
    }
    let released = writer.release_lease().await;
    writer
        .close()
        .await
        .map_err(|e| other("closing the restored map", e))?;
    released.map_err(|e| other("releasing the writer lease", e))?;
    Ok((report, None))
}

/// The new line, and what taking it needs.
#[derive(Clone, Copy)]
struct Taking<'a> {
    line: &'a MapLine,
    uuid: &'a str,
    /// This process, as the lease names it.
    holder: &'a str,
    /// The lease's newest epoch, read with the rest.
    lease_epoch: u64,
}

/// Step 3: the new line's first transaction names a journal owner no local folder has. The
/// line's replica holds nothing of its own yet (its listing is its base) and the lease's newest
/// epoch is known: the writer's open is two round trips. Returns the writer (lease held, the
/// transaction stored), its replica and its database's name.
async fn own_journal_position(
    store: &Arc<dyn ObjectStore>,
    root: &Path,
    layout: Layout,
    taking: Taking<'_>,
) -> io::Result<(MapWriter, Arc<Replica>, String)> {
    let replica = Arc::new(lines::replica(store, root, layout, Some(taking.line))?);
    let listing = replica.base().to_vec();
    let db_name = format!("{root}#{}#{}#restore", taking.uuid, taking.line.line);
    let writer = MapWriter::open_ahead(
        Arc::clone(store),
        Arc::clone(&replica),
        root.clone(),
        &db_name,
        taking.holder,
        tokio::runtime::Handle::current(),
        OpenAhead {
            listing: Some(listing),
            lease_epoch: Some(taking.lease_epoch),
            ..OpenAhead::default()
        },
    )
    .await
    .map_err(|e| other("taking the restored volume", e))?;
    let owner = format!("restored-{}", crate::metadata::random_id()?);
    let committed = {
        let conn = writer
            .connection()
            .map_err(|e| other("opening the restored map", e))?;
        let mut map = BlockMap::new(conn).map_err(|e| other("opening the restored map", e))?;
        let meta = [(META_JOURNAL_OWNER, owner.as_str())];
        map.apply_with_meta(&[], &[], &meta)
            .map_err(|e| other("recording the restore in the map", e))
    };
    let synced = match committed {
        Ok(()) => writer.sync().await.map(|_| ()),
        Err(e) => {
            let _ = writer.close().await;
            return Err(e);
        }
    };
    if let Err(e) = synced {
        let _ = writer.close().await;
        return Err(other("storing the restored map", e));
    }
    Ok((writer, replica, db_name))
}

/// Step 4: the replaced line's own map files that no checkpoint restores from.
async fn drop_old_line(
    store: &Arc<dyn ObjectStore>,
    root: &Path,
    layout: Layout,
    old: Option<&MapLine>,
    prefix: &Path,
    name: &str,
) -> io::Result<()> {
    let replica = lines::replica(store, root, layout, old)?;
    let (pinned, files) = tokio::join!(
        checkpoints::list(store.as_ref(), prefix, name),
        replica.list()
    );
    let kept: Vec<Path> = pinned?
        .iter()
        .flat_map(|c| c.map_files.iter().map(|f| f.key(root)))
        .collect();
    let files =
        files.map_err(|e| io::Error::other(format!("listing the replaced map line: {e}")))?;
    // Base files are another line's: `delete` leaves them alone.
    let doomed: Vec<_> = files.iter().filter(|f| !kept.contains(&f.path)).collect();
    futures::stream::iter(doomed)
        .map(|file| async {
            replica
                .delete(file)
                .await
                .map_err(|e| io::Error::other(format!("deleting {}: {e}", file.path)))
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}
