//! A volume's life beyond reads and writes (docs/ARCHITECTURE.md §8): taking, listing and
//! deleting checkpoints. Each runs under the maintenance lock, so no upload or collection
//! commits a map transaction meanwhile and the pins GC and retention obey change in one place.

use super::META_VOLUME_SIZE;
use super::ObjectVolume;
use super::checkpoints::{
    self, Checkpoint, MapFile, already_exists, generated_name, not_found, validate_name,
};
use super::helpers::{blocking, other};
use super::upload::{boxed, commit_meta, sync_map};
use crate::device::DeviceError;
use object_store::path::Path;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl ObjectVolume {
    /// Opens checkpoint `checkpoint` of volume `name` read-only: the volume as it was when the
    /// checkpoint was taken, whatever its writer does meanwhile (what the checkpoint pins is
    /// never deleted while it exists). `config.local_dir` must not be the volume's own folder.
    pub async fn open_checkpoint(
        store: Arc<dyn object_store::ObjectStore>,
        prefix: &Path,
        layout: blockmap::replica::Layout,
        name: &str,
        checkpoint: &str,
        mut config: super::VolumeConfig,
    ) -> io::Result<ObjectVolume> {
        let found = checkpoints::load(store.as_ref(), prefix, name, checkpoint)
            .await?
            .ok_or_else(|| not_found(name, checkpoint))?;
        config.read_only = true;
        config.hydrate = false;
        config.checkpoint = Some(found.clone());
        let volume = super::open::open(store, prefix, layout, name, config).await?;
        if volume.shared.map.txid() != found.txid {
            return Err(io::Error::other(format!(
                "checkpoint {checkpoint} of volume {name} is TXID {}, the map opened at {}",
                found.txid,
                volume.shared.map.txid()
            )));
        }
        Ok(volume)
    }

    /// Takes a checkpoint named `name` (or `ckpt-<UTC time>`): uploads everything written so
    /// far, then records the map state the store holds and pins it. Writes go on meanwhile
    /// (those that land before the upload ends may be in it as well). Nothing is copied.
    pub async fn create_checkpoint(&self, name: Option<&str>) -> io::Result<Checkpoint> {
        let shared = &self.shared;
        shared.check_writable()?;
        let created_ms = now_ms();
        let name = match name {
            Some(name) => {
                validate_name(name)?;
                name.to_string()
            }
            None => generated_name(created_ms),
        };
        self.sync_to_store().await?;
        let mut collector = shared.maintenance.lock().await;
        if collector.pins(shared).await?.get(&name).is_some() {
            return Err(already_exists(&shared.meta.name, &name));
        }
        // GC may have committed since the upload; the checkpoint is of a state in the store.
        boxed(sync_map(shared)).await?;
        let writer = shared.map.writer().ok_or(DeviceError::ReadOnly)?;
        let txid = writer.txid();
        let files = boxed(writer.latest_files())
            .await
            .map_err(|e| other("listing the block map", e))?;
        let planned_to = files.iter().map(|f| f.name.max_txid).max().unwrap_or(0);
        if planned_to != txid {
            return Err(io::Error::other(format!(
                "internal: the store's map ends at TXID {planned_to}, this writer's at {txid}"
            )));
        }
        let root = shared.root();
        let map_files = files
            .iter()
            .map(|f| {
                MapFile::at(&root, &f.path, f.level, f.size).ok_or_else(|| {
                    io::Error::other(format!(
                        "internal: {} is not under the store's prefix",
                        f.path
                    ))
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        let s = Arc::clone(shared);
        let (chunks, (allocated_blocks, stored_bytes), journal_owner) = blocking(move || {
            let map = s.map.lookups();
            let query = |e| other("block map", e);
            Ok((
                map.live_chunk_ids().map_err(query)?,
                map.usage().map_err(query)?,
                map.meta(super::META_JOURNAL_OWNER).map_err(query)?,
            ))
        })
        .await?;
        let checkpoint = Checkpoint {
            name,
            txid,
            created_ms,
            size: shared.size(),
            allocated_blocks,
            stored_bytes,
            map_files,
            chunks,
            journal_owner,
        };
        checkpoints::create(
            shared.store.as_ref(),
            &shared.prefix,
            &shared.meta.name,
            &checkpoint,
        )
        .await?;
        collector.pins(shared).await?.add(checkpoint.clone());
        collector.pins_changed(shared);
        tracing::info!(volume = %shared.meta.name, checkpoint = %checkpoint.name, txid, "checkpoint taken");
        Ok(checkpoint)
    }

    /// Changes the volume's size to `new_size` (a multiple of 4 KiB); returns the size before.
    /// Growing takes effect at once. Shrinking needs a multiple of the block size and is
    /// refused while data lies past the new end, unless `force`, which discards it first.
    /// Connected NBD clients keep the size they were given; new connections see the new one.
    pub async fn resize(&self, new_size: u64, force: bool) -> io::Result<u64> {
        let shared = &self.shared;
        shared.check_writable()?;
        super::catalog::validate_geometry(new_size, shared.meta.block_size)?;
        let old = shared.size();
        let block = shared.block_size();
        if new_size < old {
            if new_size % block != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a volume shrinks to a multiple of its block size ({block} bytes)"),
                ));
            }
            if force {
                self.journal_change(super::write_log::Change::Zero {
                    offset: new_size,
                    length: old - new_size,
                })
                .await?;
            }
            // Writes past the new end are refused from here on; everything before is stored.
            shared.size.store(new_size, Ordering::Release);
            let stored = async {
                self.sync_to_store().await?;
                let s = Arc::clone(shared);
                let first = new_size / block;
                blocking(move || {
                    s.map
                        .lookups()
                        .any_from(first)
                        .map_err(|e| other("block map", e))
                })
                .await
            }
            .await;
            match stored {
                Ok(false) => {}
                Ok(true) => {
                    shared.size.store(old, Ordering::Release);
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "volume {} holds data past {new_size} bytes: trim it first, or pass \
                             --force to discard it",
                            shared.meta.name
                        ),
                    ));
                }
                Err(e) => {
                    shared.size.store(old, Ordering::Release);
                    return Err(e);
                }
            }
        }
        let _serialised = shared.maintenance.lock().await;
        if let Err(e) = commit_meta(shared, META_VOLUME_SIZE, new_size.to_string()).await {
            shared.size.store(old, Ordering::Release);
            return Err(e);
        }
        shared.size.store(new_size, Ordering::Release);
        tracing::info!(volume = %shared.meta.name, old, new = new_size, "resized");
        Ok(old)
    }

    /// Stops this volume without storing what is journaled and not uploaded (a restore is about
    /// to replace its state): it refuses writes from now on; close follows. Cheaper than a
    /// clean close by the uploads and map upkeep that would be thrown away.
    pub async fn abandon(&self) -> io::Result<()> {
        tracing::info!(volume = %self.shared.meta.name, "stopping for a restore");
        self.shared.uploads.stop_writes(format!(
            "volume {} is being restored; it serves again once restored",
            self.shared.meta.name
        ));
        Ok(crate::BlockDevice::close(self).await?)
    }

    /// The volume's checkpoints, oldest first.
    pub async fn checkpoints(&self) -> io::Result<Vec<Checkpoint>> {
        let shared = &self.shared;
        if shared.map.writer().is_none() {
            return checkpoints::list(shared.store.as_ref(), &shared.prefix, &shared.meta.name)
                .await;
        }
        let mut collector = shared.maintenance.lock().await;
        Ok(collector.pins(shared).await?.checkpoints().to_vec())
    }

    /// Deletes checkpoint `name`. What only it kept (chunks, map files) is freed by the next
    /// collection and map maintenance.
    pub async fn delete_checkpoint(&self, name: &str) -> io::Result<()> {
        let shared = &self.shared;
        shared.check_writable()?;
        validate_name(name)?;
        let mut collector = shared.maintenance.lock().await;
        if collector.pins(shared).await?.get(name).is_none() {
            return Err(not_found(&shared.meta.name, name));
        }
        let clones = super::clone::dependents(
            shared.store.as_ref(),
            &shared.prefix,
            &shared.meta.name,
            name,
        )
        .await?;
        if !clones.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "checkpoint {name} of volume {} has clones ({}): delete them first",
                    shared.meta.name,
                    clones.join(", ")
                ),
            ));
        }
        checkpoints::delete(
            shared.store.as_ref(),
            &shared.prefix,
            &shared.meta.name,
            name,
        )
        .await?;
        collector.pins(shared).await?.remove(name);
        collector.pins_changed(shared);
        tracing::info!(volume = %shared.meta.name, checkpoint = name, "checkpoint deleted");
        Ok(())
    }
}
