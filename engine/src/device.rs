//! The contract between a protocol front end and a volume implementation.

use async_trait::async_trait;
use bytes::Bytes;

/// Why a device operation failed. The NBD layer maps each variant to the protocol error the spec
/// asks for, so implementations say *what* went wrong and never pick wire error numbers.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The operation cannot be done (or cannot be done quickly, for `ZeroMode::fast_only`).
    #[error("not supported: {0}")]
    NotSupported(&'static str),
    /// The volume was opened read-only.
    #[error("volume is read-only")]
    ReadOnly,
    /// The request reaches past the end of the volume, or the backing storage is full.
    #[error("no space: {0}")]
    NoSpace(String),
    /// The request itself is malformed (range, alignment).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The backing storage failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

pub type DeviceResult<T> = Result<T, DeviceError>;

/// Whether a device metric only grows (a counter) or goes up and down (a gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
}

/// One of a device's own metrics, as exported to Prometheus (labelled with the export name).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceMetric {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: MetricKind,
    pub value: f64,
}

/// One piece of a read: real bytes, or a run known to read as zeros (a hole or zeroed range).
/// Implementations report zero runs so the protocol layer can send them without their bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadSegment {
    Data(Bytes),
    Zero(u64),
}

impl ReadSegment {
    pub fn len(&self) -> u64 {
        match self {
            ReadSegment::Data(b) => b.len() as u64,
            ReadSegment::Zero(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Allocation state of a byte range, as block status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated; contents unknown (may or may not be zero).
    Data,
    /// Not allocated; reads as zeros.
    Hole,
    /// Allocated but known to read as zeros.
    Zero,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub kind: ExtentKind,
}

/// How a write-zeroes request may be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroMode {
    /// The range may be deallocated (punched) instead of written.
    pub may_trim: bool,
    /// Fail with `NotSupported` rather than fall back to something as slow as a write.
    pub fast_only: bool,
}

/// The largest READ or WRITE payload a device accepts in one request (NBD's default maximum,
/// advertised as the block-size maximum; the protocol layer refuses larger requests).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// What a device can do; the protocol layer advertises exactly this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub read_only: bool,
    pub flush: bool,
    pub fua: bool,
    pub trim: bool,
    pub write_zeroes: bool,
    pub fast_zero: bool,
    pub cache: bool,
    pub block_status: bool,
    /// Every connection sees every other connection's completed writes, and one flush makes all
    /// of them durable. Only then may several clients share the device safely.
    pub multi_conn: bool,
    pub rotational: bool,
}

impl Capabilities {
    /// A disk with every operation (both engines): writes, flushes, trims and zeroing unless
    /// read-only; safe for several connections at once; not rotational.
    pub fn disk(writable: bool) -> Self {
        Capabilities {
            read_only: !writable,
            flush: writable,
            fua: writable,
            trim: writable,
            write_zeroes: writable,
            fast_zero: writable,
            cache: true,
            block_status: true,
            multi_conn: true,
            rotational: false,
        }
    }
}

/// I/O size constraints (NBD_INFO_BLOCK_SIZE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl Default for BlockSizes {
    /// Any byte-aligned request up to [`MAX_PAYLOAD`]; 4 KiB preferred (smaller writes cost a
    /// read-modify-write of a page or a block).
    fn default() -> Self {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: MAX_PAYLOAD,
        }
    }
}

/// A virtual disk. Every method may be called concurrently from many connections.
///
/// Ranges passed in are already validated by the caller against `size()`; implementations still
/// refuse out-of-range requests rather than trust that.
#[async_trait]
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    fn capabilities(&self) -> Capabilities;
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes::default()
    }

    /// Reads `length` bytes at `offset`. The segments cover the range exactly, in order.
    async fn read(&self, offset: u64, length: u32) -> DeviceResult<Vec<ReadSegment>>;
    /// Writes `data` at `offset`; with `fua`, it is durable when this returns.
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceResult<()>;
    /// Makes every completed write durable.
    async fn flush(&self) -> DeviceResult<()>;
    /// Discards a range: its contents become unspecified (this implementation: zeros).
    async fn trim(&self, offset: u64, length: u64, fua: bool) -> DeviceResult<()>;
    /// Makes a range read as zeros.
    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> DeviceResult<()>;
    /// Allocation map of a range. May describe less than `length` (at least one extent), never
    /// more; the extents are contiguous from `offset`.
    async fn block_status(&self, offset: u64, length: u64) -> DeviceResult<Vec<Extent>>;
    /// Hints that a range will be read soon.
    async fn cache(&self, offset: u64, length: u64) -> DeviceResult<()>;
    /// The device's own metrics (journal, cache, store), for monitoring. None by default.
    async fn metrics(&self) -> Vec<DeviceMetric> {
        Vec::new()
    }

    /// Clean shutdown: stops background work and makes every completed write durable.
    async fn close(&self) -> DeviceResult<()> {
        if self.capabilities().read_only {
            Ok(())
        } else {
            self.flush().await
        }
    }
}

/// Refuses a range that does not lie inside a device of `size` bytes.
pub fn check_range(offset: u64, length: u64, size: u64) -> DeviceResult<()> {
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DeviceError::NoSpace(format!(
            "range {offset}+{length} exceeds the volume size {size}"
        ))),
    }
}
