//! Clones (docs/ARCHITECTURE.md §8): a new volume whose first state is a checkpoint of another,
//! sharing that volume's chunks — nothing is copied, and writes to either never show in the
//! other.
//!
//! - The clone's map is line 1 of its own, based on the checkpoint's files in the source's
//!   replica (`MapFile::volume` names it).
//! - Its chunk ids must never collide with the source's: its lease directory starts at the
//!   source's newest epoch E (a released lease), so its writers' chunks are E + 1 and up, and
//!   every id of epoch ≤ E is the source's — read from the source's `chunks/` (and, for a clone
//!   of a clone, from its ancestors', as `VolumeMetadata::inherits` says). A clone never deletes
//!   an inherited chunk.
//! - The checkpoint keeps everything the clone inherits, and cannot be deleted while a clone
//!   depends on it: `checkpoints/<name>.clones/<clone>` in the source says so.
//!
//! Creation is ordered so a crash leaves nothing served half-made: the dependency marker, the
//! lease directory and the map line first, `volume.json` (create-only) last. Until then the
//! clone does not exist; a marker whose clone has no `volume.json` is stale and is ignored (and
//! removed) by `checkpoint delete`.

use super::catalog;
use super::checkpoints::{self, MapFile, not_found};
use super::lines::{self, MapLine};
use crate::metadata::{Inherited, Parent, VolumeMetadata, random_id};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use std::io;

/// Where a clone's dependency on a checkpoint is recorded, in the source volume.
pub(super) fn marker(prefix: &Path, source: &str, checkpoint: &str, clone: &str) -> Path {
    catalog::volume_root(prefix, source)
        .join("checkpoints")
        .join(format!("{checkpoint}.clones"))
        .join(clone)
}

/// Creates volume `clone` from checkpoint `checkpoint` of volume `source`.
pub async fn clone_volume(
    store: &dyn ObjectStore,
    prefix: &Path,
    source: &str,
    checkpoint: &str,
    clone: &str,
) -> io::Result<VolumeMetadata> {
    crate::file_volume::validate_volume_name(clone)?;
    let source_root = catalog::volume_root(prefix, source);
    let (source_meta, found, existing, epoch) = tokio::join!(
        catalog::load(store, prefix, source),
        checkpoints::load(store, prefix, source, checkpoint),
        catalog::load(store, prefix, clone),
        blockmap::lease::current_epoch(store, &source_root)
    );
    let source_meta = catalog::require(source_meta?, source)?;
    let found = found?.ok_or_else(|| not_found(source, checkpoint))?;
    if existing?.is_some() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("volume {clone} already exists"),
        ));
    }
    let epoch = epoch.map_err(|e| io::Error::other(format!("reading {source}'s leases: {e}")))?;
    let mut inherits = source_meta.inherits.clone();
    inherits.push(Inherited {
        volume: source.to_string(),
        through_epoch: epoch,
        uuid: source_meta.uuid.clone(),
    });
    let meta = VolumeMetadata {
        name: clone.to_string(),
        size: found.size,
        block_size: source_meta.block_size,
        format: catalog::format_for(source_meta.encryption.is_some()).to_string(),
        uuid: random_id()?,
        parent: Some(Parent {
            volume: source.to_string(),
            checkpoint: checkpoint.to_string(),
        }),
        inherits,
        // The clone reads its source's sealed chunks: same key, same record.
        encryption: source_meta.encryption.clone(),
    };
    let root = catalog::volume_root(prefix, clone);
    // 1. The dependency, so the checkpoint cannot go while the clone is being made.
    catalog::put_new(
        store,
        &marker(prefix, source, checkpoint, clone),
        Vec::new(),
    )
    .await?;
    // 2. The lease directory at the source's epoch, released: the clone's first writer takes
    //    the next epoch, above every id it inherits.
    let lease = root.clone().join("lease");
    let body = format!("{{\"epoch\":{epoch},\"holder\":\"cloned from {source}@{checkpoint}\"}}\n");
    catalog::put_new(
        store,
        &lease.clone().join(format!("{epoch:016x}")),
        body.into_bytes(),
    )
    .await?;
    catalog::put_new(
        store,
        &lease.join(format!("{epoch:016x}.released")),
        Vec::new(),
    )
    .await?;
    // 3. The map: line 1, based on the checkpoint's files where they are.
    let base: Vec<MapFile> = found
        .map_files
        .iter()
        .map(|f| MapFile {
            volume: Some(f.volume.clone().unwrap_or_else(|| source.to_string())),
            ..f.clone()
        })
        .collect();
    let line = MapLine {
        line: 1,
        dir: lines::replica_dir(1),
        base_txid: found.txid,
        base,
        checkpoint: format!("{source}@{checkpoint}"),
        stale_owner: found.journal_owner.clone(),
    };
    match lines::create(store, &root, &line).await {
        Ok(()) => {}
        // A crashed earlier attempt made it: the same line, made the same way.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    // 4. The volume exists from here on.
    catalog::create(store, prefix, &meta).await?;
    Ok(meta)
}

/// The clones that depend on checkpoint `checkpoint` of `volume` and exist; markers of clones
/// never finished (or deleted without cleaning up) are removed.
pub async fn dependents(
    store: &dyn ObjectStore,
    prefix: &Path,
    volume: &str,
    checkpoint: &str,
) -> io::Result<Vec<String>> {
    let dir = catalog::volume_root(prefix, volume)
        .join("checkpoints")
        .join(format!("{checkpoint}.clones"));
    let markers = catalog::list_keys(store, &dir, "list a checkpoint's clones").await?;
    let mut live = Vec::new();
    for path in markers {
        let Some(clone) = path.filename().map(String::from) else {
            continue;
        };
        if catalog::load(store, prefix, &clone).await?.is_some() {
            live.push(clone);
        } else {
            let _ = store.delete(&path).await;
        }
    }
    live.sort();
    Ok(live)
}

/// Forgets `clone`'s dependency on its parent's checkpoint (when the clone is deleted).
pub async fn release_parent(
    store: &dyn ObjectStore,
    prefix: &Path,
    clone: &VolumeMetadata,
) -> io::Result<()> {
    let Some(parent) = &clone.parent else {
        return Ok(());
    };
    let path = marker(prefix, &parent.volume, &parent.checkpoint, &clone.name);
    match store.delete(&path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(io::Error::other(format!("deleting {path}: {e}"))),
    }
}
