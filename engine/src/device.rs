//! The contract between a protocol front end and a volume implementation.

use async_trait::async_trait;
use bytes::Bytes;

/// Why a device operation failed: the engine's one error type. The NBD layer maps each variant
/// to the protocol error the spec asks for (in one place, `nbd-server`'s transmission phase), so
/// implementations say *what* went wrong and never pick wire error numbers.
///
/// Engine internals that return `io::Result` carry these inside an `io::Error`
/// ([`DeviceError::into_io`]); converting back with `From<io::Error>` recovers the variant.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The operation cannot be done (or cannot be done quickly, for `ZeroMode::fast_only`).
    #[error("not supported: {0}")]
    NotSupported(&'static str),
    /// The volume was opened read-only.
    #[error("volume is read-only")]
    ReadOnly,
    /// Another process took the volume over (its writer lease or a newer map state): this one
    /// must not write to it again.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The request reaches past the end of the volume.
    #[error("range {offset}+{length} exceeds the volume size {size}")]
    OutOfRange { offset: u64, length: u64, size: u64 },
    /// The backing storage (a local file, the journal's disk) is full.
    #[error("no space: {0}")]
    NoSpace(String),
    /// The request itself is malformed (alignment, an unknown command).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Object storage made no progress or refuses the volume's requests, beyond what retrying
    /// and waiting were allowed to cover.
    #[error("object storage unavailable: {0}")]
    StoreUnavailable(String),
    /// Data failed verification: a stored block's checksum or a chunk's framing.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// Any other I/O failure.
    #[error("I/O error: {0}")]
    Io(std::io::Error),
}

impl DeviceError {
    /// This error as an `io::Error` that carries it (see the type's documentation).
    pub fn into_io(self) -> std::io::Error {
        use std::io::ErrorKind;
        let kind = match &self {
            DeviceError::Io(_) => ErrorKind::Other,
            DeviceError::NotSupported(_) => ErrorKind::Unsupported,
            DeviceError::ReadOnly | DeviceError::Fenced(_) => ErrorKind::PermissionDenied,
            DeviceError::OutOfRange { .. } | DeviceError::Invalid(_) => ErrorKind::InvalidInput,
            DeviceError::NoSpace(_) => ErrorKind::StorageFull,
            DeviceError::StoreUnavailable(_) => ErrorKind::TimedOut,
            DeviceError::Corrupt(_) => ErrorKind::InvalidData,
        };
        match self {
            DeviceError::Io(e) => e,
            other => std::io::Error::new(kind, other),
        }
    }
}

impl From<std::io::Error> for DeviceError {
    /// Recovers a carried [`DeviceError`]; a full disk is [`DeviceError::NoSpace`] (ENOSPC to
    /// the client, as the NBD spec asks); anything else is [`DeviceError::Io`].
    fn from(e: std::io::Error) -> Self {
        if e.get_ref().is_some_and(|inner| inner.is::<DeviceError>()) {
            let kind = e.kind();
            return match e.into_inner().map(|inner| inner.downcast::<DeviceError>()) {
                Some(Ok(carried)) => *carried,
                Some(Err(inner)) => DeviceError::Io(std::io::Error::new(kind, inner)),
                None => DeviceError::Io(kind.into()),
            };
        }
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => {
                DeviceError::NoSpace(format!("backing storage is full: {e}"))
            }
            _ => DeviceError::Io(e),
        }
    }
}

impl From<DeviceError> for std::io::Error {
    fn from(e: DeviceError) -> Self {
        e.into_io()
    }
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
        _ => Err(DeviceError::OutOfRange {
            offset,
            length,
            size,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn a_carried_error_comes_back_as_itself() {
        let carried = DeviceError::Fenced("another writer took volume v".into()).into_io();
        assert_eq!(carried.kind(), io::ErrorKind::PermissionDenied);
        assert!(carried.to_string().contains("another writer"));
        assert!(
            matches!(DeviceError::from(carried), DeviceError::Fenced(why) if why.contains("another writer"))
        );
        let corrupt = io::Error::from(DeviceError::Corrupt("block 7".into()));
        assert!(matches!(
            DeviceError::from(corrupt),
            DeviceError::Corrupt(_)
        ));
    }

    #[test]
    fn a_full_disk_is_no_space_and_other_errors_stay_io() {
        let full = io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(matches!(DeviceError::from(full), DeviceError::NoSpace(_)));
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert!(
            matches!(DeviceError::from(reset), DeviceError::Io(e) if e.kind() == io::ErrorKind::ConnectionReset)
        );
        let plain = DeviceError::Io(io::Error::other("x")).into_io();
        assert!(matches!(DeviceError::from(plain), DeviceError::Io(_)));
    }

    #[test]
    fn ranges_past_the_end_are_out_of_range() {
        assert!(check_range(0, 4096, 4096).is_ok());
        assert!(matches!(
            check_range(1, 4096, 4096),
            Err(DeviceError::OutOfRange {
                offset: 1,
                length: 4096,
                size: 4096
            })
        ));
        assert!(matches!(
            check_range(u64::MAX, 2, 4096),
            Err(DeviceError::OutOfRange { .. })
        ));
    }
}
