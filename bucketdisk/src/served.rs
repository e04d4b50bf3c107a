//! A served object volume whose open `ObjectVolume` can be replaced while the export stays:
//! restoring a served volume closes it, switches its map to the checkpoint and opens it again
//! under the same export (see `control`). Every device call goes to the volume open now.

use async_trait::async_trait;
use engine::device::DeviceMetric;
use engine::object_volume::{ObjectVolume, VolumeConfig};
use engine::{BlockDevice, BlockSizes, Capabilities, DeviceResult, Extent, ReadSegment, ZeroMode};
use std::sync::{Arc, RwLock};
use stores::url::StoreLocation;

pub(crate) struct ServedVolume {
    /// The volume's name in the store.
    pub(crate) name: String,
    /// How it was opened, to open it again after a restore.
    pub(crate) location: StoreLocation,
    pub(crate) config: VolumeConfig,
    current: RwLock<Arc<ObjectVolume>>,
}

impl ServedVolume {
    pub(crate) fn new(
        name: String,
        location: StoreLocation,
        config: VolumeConfig,
        volume: ObjectVolume,
    ) -> Self {
        ServedVolume {
            name,
            location,
            config,
            current: RwLock::new(Arc::new(volume)),
        }
    }

    /// The volume open now.
    pub(crate) fn current(&self) -> Arc<ObjectVolume> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Serves `volume` from now on.
    pub(crate) fn replace(&self, volume: ObjectVolume) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(volume);
    }

    /// Opens the volume again, as it was opened at start.
    pub(crate) async fn reopen(&self) -> std::io::Result<ObjectVolume> {
        ObjectVolume::open(
            Arc::clone(&self.location.store),
            &self.location.prefix,
            self.location.layout,
            &self.name,
            self.config.clone(),
        )
        .await
    }
}

#[async_trait]
impl BlockDevice for ServedVolume {
    fn size(&self) -> u64 {
        self.current().size()
    }

    fn capabilities(&self) -> Capabilities {
        self.current().capabilities()
    }

    fn block_sizes(&self) -> BlockSizes {
        self.current().block_sizes()
    }

    async fn read(&self, offset: u64, length: u32) -> DeviceResult<Vec<ReadSegment>> {
        self.current().read(offset, length).await
    }

    async fn write(&self, offset: u64, data: bytes::Bytes, fua: bool) -> DeviceResult<()> {
        self.current().write(offset, data, fua).await
    }

    async fn flush(&self) -> DeviceResult<()> {
        self.current().flush().await
    }

    async fn trim(&self, offset: u64, length: u64, fua: bool) -> DeviceResult<()> {
        self.current().trim(offset, length, fua).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> DeviceResult<()> {
        self.current().write_zeroes(offset, length, mode, fua).await
    }

    async fn block_status(&self, offset: u64, length: u64) -> DeviceResult<Vec<Extent>> {
        self.current().block_status(offset, length).await
    }

    async fn cache(&self, offset: u64, length: u64) -> DeviceResult<()> {
        self.current().cache(offset, length).await
    }

    async fn metrics(&self) -> Vec<DeviceMetric> {
        self.current().metrics().await
    }

    async fn close(&self) -> DeviceResult<()> {
        self.current().close().await
    }
}
