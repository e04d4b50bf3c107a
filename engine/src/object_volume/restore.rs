//! Restoring a volume to a checkpoint (docs/ARCHITECTURE.md §8): a new map line whose base is
//! the checkpoint's files, so nothing is copied and the cost does not grow with the volume.
//!
//! The steps, each safe to be interrupted by a crash:
//! 1. The volume is opened (its journal replayed and uploaded if `keep_current` checkpoints the
//!    current state first).
//! 2. Under the maintenance lock, line n + 1 is created (create-only: the switch is atomic);
//!    this process stops writing at once. From here on every open serves the checkpoint.
//! 3. The new line is opened from a scratch folder, which records itself as the map's journal
//!    owner: no journal left anywhere (here, or by the host that wrote the checkpoint) is ever
//!    replayed on top of the restored state — at their next open they are moved aside. A crash
//!    before this step leaves the owner the checkpoint recorded; the restore is then repeated
//!    by running it again (the volume already shows the checkpoint's state, and step 2 makes
//!    the next line).
//! 4. The old line's map files that no checkpoint pins are deleted (chunks only it used go with
//!    the next collection's orphan sweep).

use super::checkpoints::{self, not_found};
use super::lines::{self, MapLine};
use super::upload::{boxed, commit, sync_map};
use super::{ObjectVolume, VolumeConfig};
use blockmap::replica::Layout;
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

impl ObjectVolume {
    /// Step 2: switches the volume's map to checkpoint `name` and stops this process's use of
    /// it (writes fail from now on; close it). Writes not uploaded are dropped: restoring means
    /// that.
    async fn switch_to_checkpoint(&self, name: &str) -> io::Result<MapLine> {
        let shared = &self.shared;
        shared.check_writable()?;
        let mut collector = shared.maintenance.lock().await;
        let checkpoint = collector
            .pins(shared)
            .await?
            .get(name)
            .cloned()
            .ok_or_else(|| not_found(&shared.meta.name, name))?;
        let next = shared.map.line + 1;
        let line = MapLine {
            line: next,
            dir: lines::replica_dir(next),
            base_txid: checkpoint.txid,
            base: checkpoint.map_files.clone(),
            checkpoint: name.to_string(),
        };
        lines::create(shared.store.as_ref(), &shared.root(), &line).await?;
        shared.fence(format!(
            "volume {} was restored to checkpoint {name}; open it again",
            shared.meta.name
        ));
        Ok(line)
    }

    /// Step 3: records this process's (scratch) folder as the owner of the journal position,
    /// so that no other folder's journal is replayed on top of the state it opened.
    async fn own_journal_position(&self) -> io::Result<()> {
        let shared = &self.shared;
        let _serialised = shared.maintenance.lock().await;
        commit(
            shared,
            Some(shared.log.journaled_through()),
            Vec::new(),
            Vec::new(),
        )
        .await?;
        boxed(sync_map(shared)).await
    }
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
    let root = super::catalog::volume_root(prefix, name);
    let old_line = lines::current(store.as_ref(), &root).await?;
    let volume =
        ObjectVolume::open(Arc::clone(&store), prefix, layout, name, config.clone()).await?;
    let switched = async {
        let kept = match keep_current {
            true => Some(volume.create_checkpoint(None).await?.name),
            false => None,
        };
        let line = volume.switch_to_checkpoint(checkpoint).await?;
        Ok::<_, io::Error>((kept, line))
    }
    .await;
    // Fenced by the switch: the close uploads nothing. (Any error is the switch's to report.)
    let _ = crate::BlockDevice::close(&volume).await;
    let (kept_current, line) = switched?;

    let scratch = config.local_dir.with_file_name(format!(
        "{}.restoring-{}",
        config
            .local_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        crate::metadata::random_id()?
    ));
    let mut fresh_config = config;
    fresh_config.local_dir = scratch.clone();
    fresh_config.hydrate = false;
    let fresh = ObjectVolume::open(Arc::clone(&store), prefix, layout, name, fresh_config).await?;
    let owned = fresh.own_journal_position().await;
    let closed = crate::BlockDevice::close(&fresh).await;
    owned?;
    closed?;
    let _ = std::fs::remove_dir_all(&scratch);

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

/// Step 4: the replaced line's own map files that no checkpoint restores from.
async fn drop_old_line(
    store: &Arc<dyn ObjectStore>,
    root: &Path,
    layout: Layout,
    old: Option<&MapLine>,
    prefix: &Path,
    name: &str,
) -> io::Result<()> {
    let pinned = checkpoints::list(store.as_ref(), prefix, name).await?;
    let kept: Vec<Path> = pinned
        .iter()
        .flat_map(|c| c.map_files.iter().map(|f| f.key(root)))
        .collect();
    let replica = lines::replica(store, root, layout, old)?;
    let files = replica
        .list()
        .await
        .map_err(|e| io::Error::other(format!("listing the replaced map line: {e}")))?;
    for file in files.iter().filter(|f| !kept.contains(&f.path)) {
        // Base files are another line's: `delete` leaves them alone.
        replica
            .delete(file)
            .await
            .map_err(|e| io::Error::other(format!("deleting {}: {e}", file.path)))?;
    }
    Ok(())
}
