//! The NBD-facing side of an [`ObjectVolume`]: each [`BlockDevice`] operation mapped onto the
//! journal (writes, trims, zeroes, flushes), the read path, the block map (block status) and
//! the background tasks (close).

use super::helpers::{blocking, lock};
use super::{Change, ObjectVolume, metrics, read, upload};
use crate::device::{
    BlockDevice, Capabilities, DeviceError, DeviceMetric, DeviceResult, Extent, ReadSegment,
    ZeroMode,
};
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;
use tokio::task::JoinHandle;

#[async_trait]
impl BlockDevice for ObjectVolume {
    fn size(&self) -> u64 {
        self.shared.size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::disk(!self.shared.config.read_only)
    }

    async fn read(&self, offset: u64, length: u32) -> DeviceResult<Vec<ReadSegment>> {
        self.check(offset, u64::from(length))?;
        if length == 0 {
            return Ok(Vec::new());
        }
        read::read(&self.shared, offset, length)
            .await
            .map_err(DeviceError::from)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceResult<()> {
        self.check(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let seq = self.journal_change(Change::Write { offset, data }).await?;
        if fua {
            self.durable(seq).await?;
        }
        Ok(())
    }

    async fn flush(&self) -> DeviceResult<()> {
        if self.shared.config.read_only {
            return Ok(());
        }
        let seq = self.shared.log.journaled_through();
        self.durable(seq).await
    }

    async fn trim(&self, offset: u64, length: u64, fua: bool) -> DeviceResult<()> {
        self.write_zeroes(offset, length, ZeroMode::default(), fua)
            .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        _mode: ZeroMode,
        fua: bool,
    ) -> DeviceResult<()> {
        // Zeros are never stored: the blocks lose their map rows. That is as fast as it gets,
        // so FAST_ZERO is always honoured, and NO_HOLE is satisfied (the range reads as zeros;
        // a thin volume provisions nothing either way).
        self.check(offset, length)?;
        if length == 0 {
            return Ok(());
        }
        let seq = self.journal_change(Change::Zero { offset, length }).await?;
        if fua {
            self.durable(seq).await?;
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, length: u64) -> DeviceResult<Vec<Extent>> {
        self.check(offset, length)?;
        read::block_status(&self.shared, offset, length)
            .await
            .map_err(DeviceError::from)
    }

    async fn cache(&self, offset: u64, length: u64) -> DeviceResult<()> {
        self.check(offset, length)?;
        read::prefetch(&self.shared, offset, length)
            .await
            .map_err(DeviceError::from)
    }

    async fn metrics(&self) -> Vec<DeviceMetric> {
        match self.stats().await {
            Ok(stats) => metrics::describe(&self.shared, &stats),
            Err(e) => {
                tracing::warn!(volume = %self.shared.meta.name, "cannot read volume stats: {e}");
                Vec::new()
            }
        }
    }

    async fn close(&self) -> DeviceResult<()> {
        let writable = !self.shared.config.read_only;
        // A fenced (or restored) volume has nothing more to make durable where it matters.
        if writable && !self.shared.uploads.is_fenced() {
            self.flush().await?;
        }
        let _ = self.stop.send(true);
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *lock(&self.tasks));
        for task in tasks {
            let _ = task.await;
        }
        if writable && !self.shared.uploads.is_fenced() {
            // Store everything, so the next start (anywhere) needs nothing local.
            upload::upload_all(&self.shared)
                .await
                .map_err(DeviceError::from)?;
            // Stored either way; a failed tidy only makes the next open read more files.
            if let Err(e) = upload::tidy(&self.shared).await {
                tracing::warn!(volume = %self.shared.meta.name, "block map tidy at close failed: {e}");
            }
            // Everything is stored: whoever opens the volume next fences no one. (Not
            // released, a lease only makes the next direct verb ask for --force.)
            if let Some(writer) = self.shared.map.writer()
                && let Err(e) = upload::boxed(writer.release_lease()).await
            {
                tracing::warn!(volume = %self.shared.meta.name, "releasing the writer lease failed: {e}");
            }
        }
        let shared = Arc::clone(&self.shared);
        blocking(move || shared.cache.release())
            .await
            .map_err(DeviceError::from)?;
        Ok(())
    }
}
