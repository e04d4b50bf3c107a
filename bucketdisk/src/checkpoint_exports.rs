//! Checkpoints served read-only: `serve --volume disk@NAME` opens one at start, and a server
//! serving `disk` answers the export name `disk@NAME` for each of its checkpoints (listed by
//! NBD_OPT_LIST), opened when a client first asks. Each has a local folder of its own
//! (`<cache-dir>/disk@NAME`) for its block cache.

use crate::store_args::on_own_thread;
use anyhow::{Context, Result};
use async_trait::async_trait;
use engine::object_volume::{ObjectVolume, checkpoints};
use engine::sealing::VolumeKey;
use nbd_server::exports::{Export, ExportSource};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use stores::url::StoreLocation;

/// Opens checkpoint `checkpoint` of `volume` read-only.
pub(crate) async fn open(
    location: &StoreLocation,
    volume: &str,
    checkpoint: &str,
    cache_dir: &Path,
    key: Option<Arc<VolumeKey>>,
) -> Result<ObjectVolume> {
    let local = format!("{volume}@{checkpoint}");
    let config = crate::store_args::volume_config(cache_dir, &local, key);
    ObjectVolume::open_checkpoint(
        Arc::clone(&location.store),
        &location.prefix,
        location.layout,
        volume,
        checkpoint,
        config,
    )
    .await
    .with_context(|| format!("opening checkpoint {checkpoint} of volume {volume}"))
}

/// The checkpoints of the volumes a server serves, as exports.
pub(crate) struct CheckpointExports {
    location: StoreLocation,
    cache_dir: PathBuf,
    volumes: Vec<String>,
    /// The key of encrypted volumes (their checkpoints are encrypted too).
    key: Option<Arc<VolumeKey>>,
}

impl CheckpointExports {
    pub(crate) fn new(
        location: StoreLocation,
        cache_dir: PathBuf,
        volumes: Vec<String>,
        key: Option<Arc<VolumeKey>>,
    ) -> Self {
        CheckpointExports {
            location,
            cache_dir,
            volumes,
            key,
        }
    }
}

#[async_trait]
impl ExportSource for CheckpointExports {
    async fn names(&self) -> Vec<(String, String)> {
        let mut names = Vec::new();
        for volume in &self.volumes {
            let store = self.location.store.as_ref();
            match checkpoints::list(store, &self.location.prefix, volume).await {
                Ok(list) => names.extend(list.into_iter().map(|c| {
                    (
                        format!("{volume}@{}", c.name),
                        format!(
                            "checkpoint {} of bucketdisk volume {volume} (read-only)",
                            c.name
                        ),
                    )
                })),
                Err(e) => tracing::warn!(volume, "listing checkpoints for NBD_OPT_LIST: {e}"),
            }
        }
        names
    }

    async fn open(&self, name: &str) -> Option<Export> {
        let (volume, checkpoint) = name.split_once('@')?;
        if !self.volumes.iter().any(|v| v == volume)
            || checkpoints::validate_name(checkpoint).is_err()
        {
            return None;
        }
        // A handshake task needs `Send`, which the volume's open cannot prove.
        let (location, cache_dir) = (self.location.clone(), self.cache_dir.clone());
        let key = self.key.clone();
        let (volume_name, checkpoint_name) = (volume.to_string(), checkpoint.to_string());
        let opened = on_own_thread(move |runtime| {
            runtime.block_on(open(
                &location,
                &volume_name,
                &checkpoint_name,
                &cache_dir,
                key,
            ))
        })
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("the open task failed: {e}")));
        match opened {
            Ok(device) => {
                tracing::info!(export = name, "serving a checkpoint read-only");
                Some(Export::new(
                    name.to_string(),
                    format!("checkpoint {checkpoint} of bucketdisk volume {volume} (read-only)"),
                    Arc::new(device),
                ))
            }
            Err(e) => {
                tracing::info!(export = name, "no such export: {e:#}");
                None
            }
        }
    }
}
