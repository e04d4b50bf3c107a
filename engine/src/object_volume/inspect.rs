//! A volume described from the store alone (`bucketdisk info`): its metadata and what its
//! latest block map says, read through a follower of the map's replica. Takes no lease, needs
//! no local folder and does not disturb a running writer.

use super::helpers::{blocking, other};
use super::{catalog, lines};
use crate::metadata::VolumeMetadata;
use blockmap::replica::{Layout, Replica};
use blockmap::vfs::follower::Follower;
use blockmap::{BlockMap, RestoreTarget};
use object_store::ObjectStore;
use object_store::path::Path;
use std::io;
use std::sync::Arc;

/// What the store holds of a volume, as of its latest block-map state.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VolumeReport {
    pub meta: VolumeMetadata,
    /// The block map's latest transaction (0: nothing was ever uploaded).
    pub map_txid: u64,
    /// Blocks with a row in the map (the rest read as zeros).
    pub allocated_blocks: u64,
    /// Their size in the store, compressed.
    pub allocated_stored_bytes: u64,
    /// Chunk objects the map knows, and their total size (dead blocks included).
    pub chunks: u64,
    pub chunk_bytes: u64,
}

/// Reads volume `name`'s metadata and latest map state from the store.
pub async fn inspect(
    store: Arc<dyn ObjectStore>,
    prefix: &Path,
    layout: Layout,
    name: &str,
) -> io::Result<VolumeReport> {
    let root = catalog::volume_root(prefix, name);
    let (meta, line) = tokio::join!(
        catalog::load(store.as_ref(), prefix, name),
        lines::current(store.as_ref(), &root)
    );
    let meta = catalog::require(meta?, name)?;
    let line = line?;
    let replica = Arc::new(lines::replica(&store, &root, layout, line.as_ref())?);
    let mut report = VolumeReport {
        meta,
        map_txid: 0,
        allocated_blocks: 0,
        allocated_stored_bytes: 0,
        chunks: 0,
        chunk_bytes: 0,
    };
    // Its own VFS database name: a volume this process also serves keeps its own.
    let db_name = format!(
        "{root}#{}#{}#inspect",
        report.meta.uuid,
        line.as_ref().map_or(0, |l| l.line)
    );
    let Some(view) = MapView::open(replica, &db_name, RestoreTarget::Latest).await? else {
        return Ok(report);
    };
    report.map_txid = view.txid;
    blocking(move || {
        let map = &view.map;
        let query = |e| other("querying the block map", e);
        let (blocks, bytes) = map.usage().map_err(query)?;
        report.allocated_blocks = blocks;
        report.allocated_stored_bytes = bytes;
        report.chunks = map.chunk_count().map_err(query)?;
        report.chunk_bytes = map.chunk_bytes().map_err(query)?;
        // A resized volume's size is the map's.
        if let Some(size) = super::recorded_size(map).map_err(query)? {
            report.meta.size = size;
        }
        drop(view);
        Ok(report)
    })
    .await
}

/// How a [`MapView`] reads the map's pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reading {
    /// A ranged GET for the pages a query needs (`info`: a few queries).
    PagesAsNeeded,
    /// Every map file downloaded whole first (`verify`: walks every row).
    Whole,
}

/// A read-only view of one map state: a follower of a replica and a connection to it. (Fields
/// drop in order: the connection before its follower.)
pub(super) struct MapView {
    pub(super) map: BlockMap,
    _follower: Follower,
    pub(super) txid: u64,
}

impl MapView {
    /// The state of `replica` at `target`, its database named `db_name`; `None` when the
    /// replica holds nothing (nothing was ever uploaded).
    pub(super) async fn open(
        replica: Arc<Replica>,
        db_name: &str,
        target: RestoreTarget,
    ) -> io::Result<Option<MapView>> {
        Self::open_reading(replica, db_name, target, Reading::PagesAsNeeded).await
    }

    /// [`MapView::open`], reading the map as `reading` says.
    pub(super) async fn open_reading(
        replica: Arc<Replica>,
        db_name: &str,
        target: RestoreTarget,
        reading: Reading,
    ) -> io::Result<Option<MapView>> {
        let listing = replica.list().await;
        if listing
            .map_err(|e| other("listing the block map", e))?
            .is_empty()
        {
            return Ok(None);
        }
        let follower =
            Follower::open_at(replica, db_name, tokio::runtime::Handle::current(), target)
                .await
                .map_err(|e| other("opening the block map", e))?;
        if reading == Reading::Whole {
            // A temporary file, unlinked at once: the follower keeps it open.
            let id = crate::metadata::random_id()?;
            let path = std::env::temp_dir().join(format!("bucketdisk-map-{id}.db"));
            let hydrated = follower.hydrate(&path).await;
            let _ = std::fs::remove_file(&path);
            hydrated.map_err(|e| other("reading the block map", e))?;
        }
        let txid = follower.txid();
        blocking(move || {
            let conn = follower
                .connection()
                .map_err(|e| other("opening the block map", e))?;
            let map =
                BlockMap::open_read_only(conn).map_err(|e| other("opening the block map", e))?;
            Ok(Some(MapView {
                map,
                _follower: follower,
                txid,
            }))
        })
        .await
    }
}

pub use blockmap::lease::Holder;

/// Who holds volume `name` (see [`Holder`]): a command that would take the volume from a
/// server still running elsewhere asks first.
pub async fn holder(store: &dyn ObjectStore, prefix: &Path, name: &str) -> io::Result<Holder> {
    blockmap::lease::current_holder(store, &catalog::volume_root(prefix, name))
        .await
        .map_err(|e| other("reading the writer lease", e))
}
