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
//!    folder's next open. A crash between 2 and 3 leaves the owner the checkpoint recorded;
//!    running the restore again finishes it (the next line, same state).
//! 4. The old line's map files that no checkpoint pins are deleted (chunks only it used go with
//!    the next collection's orphan sweep).
//!
//! The caller has made sure no process serves the volume meanwhile.

use super::checkpoints::{self, not_found};
use super::helpers::other;
use super::lines::{self, MapLine};
use super::{META_JOURNAL_OWNER, ObjectVolume, VolumeConfig, catalog};
use blockmap::BlockMap;
use blockmap::replica::Layout;
use blockmap::writer::MapWriter;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::path::Path;
use std::io;
use std::sync::Arc;

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

/// Restores volume `name` to its checkpoint `checkpoint` (see the module's steps). `config` is
/// the volume's usual configuration (its local folder is where the journal a crash left is
/// replayed from, for `keep_current`). The caller has made sure no other process holds the
/// volume.
pub async fn restore(
    store: Arc<dyn ObjectStore>,
    prefix: &Path,
    layout: Layout,
    name: &str,
    checkpoint: &str,
    config: VolumeConfig,
    keep_current: bool,
) -> io::Result<RestoreReport> {
    checkpoints::validate_name(checkpoint)?;
    let root = catalog::volume_root(prefix, name);
    let kept_current = match keep_current {
        false => None,
        true => {
            let volume =
                ObjectVolume::open(Arc::clone(&store), prefix, layout, name, config.clone())
                    .await?;
            let kept = volume.create_checkpoint(None).await;
            crate::BlockDevice::close(&volume).await?;
            Some(kept?.name)
        }
    };
    let (meta, old_line, found) = tokio::join!(
        catalog::load(store.as_ref(), prefix, name),
        lines::current(store.as_ref(), &root),
        checkpoints::load(store.as_ref(), prefix, name, checkpoint)
    );
    let meta = catalog::require(meta?, name)?;
    let old_line = old_line?;
    let found = found?.ok_or_else(|| not_found(name, checkpoint))?;
    let next = old_line.as_ref().map_or(0, |l| l.line) + 1;
    let line = MapLine {
        line: next,
        dir: lines::replica_dir(next),
        base_txid: found.txid,
        base: found.map_files.clone(),
        checkpoint: checkpoint.to_string(),
    };
    lines::create(store.as_ref(), &root, &line).await?;
    own_journal_position(&store, &root, layout, &line, &meta.uuid, &config.holder).await?;
    if let Err(e) = drop_old_line(&store, &root, layout, old_line.as_ref(), prefix, name).await {
        tracing::warn!(
            volume = name,
            "deleting the replaced map line's files failed: {e}"
        );
    }
    Ok(RestoreReport {
        checkpoint: checkpoint.to_string(),
        txid: line.base_txid,
        line: line.line,
        kept_current,
    })
}

/// Step 3: the new line's first transaction names a journal owner no local folder has.
async fn own_journal_position(
    store: &Arc<dyn ObjectStore>,
    root: &Path,
    layout: Layout,
    line: &MapLine,
    uuid: &str,
    holder: &str,
) -> io::Result<()> {
    let replica = Arc::new(lines::replica(store, root, layout, Some(line))?);
    let db_name = format!("{root}#{uuid}#{}#restore", line.line);
    let writer = MapWriter::open(
        Arc::clone(store),
        replica,
        root.clone(),
        &db_name,
        holder,
        tokio::runtime::Handle::current(),
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
    let released = writer.release_lease().await;
    writer
        .close()
        .await
        .map_err(|e| other("closing the restored map", e))?;
    released.map_err(|e| other("releasing the writer lease", e))
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
