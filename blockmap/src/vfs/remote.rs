//! Glue between the VFS state and a replica: the replica as the base [`PageSource`] of a
//! database (pages fetched on demand with ranged GETs), and the upload of committed
//! transactions as create-only L0 files.
//!
//! SQLite's callbacks are synchronous; object storage is async. Reads run on the given tokio
//! runtime and the calling thread waits for them (with `futures`' executor, so this also works
//! on a thread that belongs to another runtime).

use super::state::{DatabaseState, PageSource};
use crate::replica::{PageMap, Replica, ReplicaError, ReplicaResult};
use ltx::RestoreTarget;
use std::io;
use std::sync::Arc;
use tokio::runtime::Handle;

pub struct RemoteSource {
    replica: Arc<Replica>,
    map: Arc<PageMap>,
    runtime: Handle,
}

impl RemoteSource {
    /// Opens the replica at `target`: lists it and fetches every planned file's index.
    pub async fn open(
        replica: Arc<Replica>,
        target: RestoreTarget,
        runtime: Handle,
    ) -> ReplicaResult<Self> {
        let map = PageMap::open(&replica, target).await?;
        Ok(RemoteSource {
            replica,
            map: Arc::new(map),
            runtime,
        })
    }
}

impl PageSource for RemoteSource {
    fn page_size(&self) -> u32 {
        self.map.page_size
    }

    fn commit(&self) -> u32 {
        self.map.commit
    }

    fn txid(&self) -> u64 {
        self.map.txid
    }

    fn read_page(&self, pgno: u32) -> io::Result<Vec<u8>> {
        let (replica, map) = (Arc::clone(&self.replica), Arc::clone(&self.map));
        let task = self
            .runtime
            .spawn(async move { map.read_page(&replica, pgno).await });
        futures::executor::block_on(task)
            .map_err(|e| io::Error::other(format!("page {pgno}: fetch task failed: {e}")))?
            .map_err(|e| io::Error::other(format!("page {pgno}: {e}")))
    }
}

/// Uploads everything committed since the last upload as one create-only L0 file. Returns the
/// TXID the replica now holds, or `None` if there was nothing to upload. `Conflict` means
/// another writer published that TXID first: this writer has been fenced and must stop.
pub async fn sync_once(
    state: &DatabaseState,
    replica: &Replica,
    timestamp_ms: i64,
) -> ReplicaResult<Option<u64>> {
    let Some(mut upload) = state
        .prepare_upload(timestamp_ms)
        .map_err(|e| ReplicaError::Invalid(format!("cannot encode L0: {e}")))?
    else {
        return Ok(None);
    };
    let bytes = bytes::Bytes::from(std::mem::take(&mut upload.bytes));
    replica.publish(0, bytes).await?;
    state.uploaded(&upload);
    Ok(Some(upload.max_txid))
}
