//! A volume kept in one sparse local file: `<store>/<name>/disk.raw` beside `volume.json`.
//!
//! Holes are real filesystem holes (punched on trim, found with SEEK_DATA/SEEK_HOLE), so a
//! 100 GiB volume costs only the blocks written to it. Blocking file I/O runs on tokio's blocking
//! pool; the page cache does the caching. This is the local baseline that the object-storage
//! engine is compared against.

use crate::device::{
    BlockDevice, Capabilities, DeviceError, DeviceResult, Extent, ExtentKind, ReadSegment,
    ZeroMode, check_range,
};
use crate::metadata::VolumeMetadata;
use async_trait::async_trait;
use bytes::Bytes;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub const DATA_FILE: &str = "disk.raw";
pub const FORMAT: &str = "raw-file";

/// Reads at least this long look for holes first, so sparse regions are not sent as bytes.
/// Smaller reads skip the two extra `lseek`s: they would save little and cost latency.
const SPARSE_READ_THRESHOLD: u32 = 64 * 1024;

/// Reads and writes up to this size (without FUA) run inline on the async worker thread. A
/// page-cache hit costs a few microseconds, less than handing the request to a blocking-pool
/// thread and back, which measured as the largest cost of 4 KiB I/O. Larger I/O, FUA writes and
/// flushes, which can block for milliseconds, go to the blocking pool.
const INLINE_IO_MAX: u32 = 64 * 1024;

/// Zeroes are written in pieces of this size when the filesystem cannot zero a range itself.
const ZERO_FILL_CHUNK: u64 = 1024 * 1024;

pub struct FileVolume {
    file: Arc<File>,
    meta: VolumeMetadata,
    dir: PathBuf,
    read_only: bool,
    /// Cleared the first time the filesystem refuses to punch holes, so later trims are cheap no-ops.
    punch_supported: Arc<AtomicBool>,
}

/// Checks a volume name: it becomes a directory name and an export name.
pub fn validate_volume_name(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "invalid volume name {name:?}: use 1-128 of [A-Za-z0-9._-], not starting with '.'"
            ),
        ))
    }
}

impl FileVolume {
    /// Creates a new, empty (fully sparse) volume. Fails if it already exists.
    pub fn create(store: &Path, name: &str, size: u64, block_size: u32) -> io::Result<Self> {
        validate_volume_name(name)?;
        if size == 0 || size % 4096 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("volume size {size} must be a non-zero multiple of 4096"),
            ));
        }
        if !block_size.is_power_of_two() || !(4096..=4 << 20).contains(&block_size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("block size {block_size} must be a power of two from 4 KiB to 4 MiB"),
            ));
        }
        let dir = store.join(name);
        std::fs::create_dir_all(&dir)?;
        if dir.join(crate::metadata::METADATA_FILE).exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("volume {name} already exists in {}", store.display()),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join(DATA_FILE))?;
        file.set_len(size)?;
        file.sync_all()?;
        let meta = VolumeMetadata {
            name: name.to_string(),
            size,
            block_size,
            format: FORMAT.to_string(),
            uuid: crate::metadata::random_id()?,
            parent: None,
            inherits: Vec::new(),
            encryption: None,
        };
        // Metadata last: a volume without volume.json was never completely created.
        meta.store(&dir)?;
        drop(file);
        Self::open(store, name, false)
    }

    /// Opens an existing volume. A writable open takes an exclusive lock on the data file so two
    /// servers can never write one volume; read-only opens share the lock with each other.
    pub fn open(store: &Path, name: &str, read_only: bool) -> io::Result<Self> {
        validate_volume_name(name)?;
        let dir = store.join(name);
        let meta = VolumeMetadata::load(&dir)?;
        if meta.format != FORMAT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "volume {name} has format {:?}, expected {FORMAT:?}",
                    meta.format
                ),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(dir.join(DATA_FILE))?;
        lock_file(&file, read_only).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("volume {name} is in use by another process ({e})"),
            )
        })?;
        let actual = file.metadata()?.len();
        if actual != meta.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "volume {name}: data file is {actual} bytes but volume.json says {}",
                    meta.size
                ),
            ));
        }
        Ok(Self {
            file: Arc::new(file),
            meta,
            dir,
            read_only,
            punch_supported: Arc::new(AtomicBool::new(true)),
        })
    }

    /// Opens the volume, creating it with `size` if it does not exist yet.
    pub fn open_or_create(
        store: &Path,
        name: &str,
        size: u64,
        block_size: u32,
        read_only: bool,
    ) -> io::Result<Self> {
        if store
            .join(name)
            .join(crate::metadata::METADATA_FILE)
            .exists()
        {
            Self::open(store, name, read_only)
        } else if read_only {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("volume {name} does not exist and --read-only cannot create it"),
            ))
        } else {
            Self::create(store, name, size, block_size)
        }
    }

    pub fn metadata(&self) -> &VolumeMetadata {
        &self.meta
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes the data file really occupies on disk.
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }

    /// Runs blocking file work on tokio's blocking pool.
    async fn blocking<T, F>(&self, work: F) -> DeviceResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&File, &AtomicBool) -> DeviceResult<T> + Send + 'static,
    {
        let file = Arc::clone(&self.file);
        let punch = Arc::clone(&self.punch_supported);
        tokio::task::spawn_blocking(move || work(&file, &punch))
            .await
            .map_err(|e| DeviceError::Io(io::Error::other(format!("I/O task failed: {e}"))))?
    }

    fn writable(&self) -> DeviceResult<()> {
        if self.read_only {
            Err(DeviceError::ReadOnly)
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl BlockDevice for FileVolume {
    fn size(&self) -> u64 {
        self.meta.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::disk(!self.read_only)
    }

    async fn read(&self, offset: u64, length: u32) -> DeviceResult<Vec<ReadSegment>> {
        check_range(offset, u64::from(length), self.size())?;
        // Small reads skip the hole lookup and run inline (see INLINE_IO_MAX).
        const _: () = assert!(SPARSE_READ_THRESHOLD <= INLINE_IO_MAX);
        if length < SPARSE_READ_THRESHOLD {
            let data = read_bytes(&self.file, offset, length as usize)?;
            return Ok(vec![ReadSegment::Data(data)]);
        }
        self.blocking(move |file, _| {
            let mut segments = Vec::new();
            let mut pos = offset;
            for extent in map_extents(file, offset, u64::from(length))? {
                if extent.kind == ExtentKind::Data {
                    segments.push(ReadSegment::Data(read_bytes(
                        file,
                        pos,
                        extent.length as usize,
                    )?));
                } else {
                    segments.push(ReadSegment::Zero(extent.length));
                }
                pos += extent.length;
            }
            Ok(segments)
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceResult<()> {
        self.writable()?;
        check_range(offset, data.len() as u64, self.size())?;
        if !fua && data.len() <= INLINE_IO_MAX as usize {
            return self
                .file
                .write_all_at(&data, offset)
                .map_err(DeviceError::from);
        }
        self.blocking(move |file, _| {
            file.write_all_at(&data, offset)
                .map_err(DeviceError::from)?;
            if fua {
                file.sync_data().map_err(DeviceError::from)?;
            }
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> DeviceResult<()> {
        self.writable()?;
        self.blocking(|file, _| file.sync_data().map_err(DeviceError::from))
            .await
    }

    async fn trim(&self, offset: u64, length: u64, fua: bool) -> DeviceResult<()> {
        self.writable()?;
        check_range(offset, length, self.size())?;
        self.blocking(move |file, punch| {
            // Trim is advisory: where the filesystem cannot punch holes, doing nothing is correct.
            if punch.load(Ordering::Relaxed) && !punch_hole(file, offset, length)? {
                punch.store(false, Ordering::Relaxed);
            }
            if fua {
                file.sync_data().map_err(DeviceError::from)?;
            }
            Ok(())
        })
        .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> DeviceResult<()> {
        self.writable()?;
        check_range(offset, length, self.size())?;
        self.blocking(move |file, punch| {
            let mut done = false;
            if mode.may_trim && punch.load(Ordering::Relaxed) {
                done = punch_hole(file, offset, length)?;
                if !done {
                    punch.store(false, Ordering::Relaxed);
                }
            }
            if !done {
                done = zero_range(file, offset, length)?;
            }
            if !done {
                if mode.fast_only {
                    return Err(DeviceError::NotSupported(
                        "this filesystem cannot zero a range faster than writing it",
                    ));
                }
                write_zero_bytes(file, offset, length)?;
            }
            if fua {
                file.sync_data().map_err(DeviceError::from)?;
            }
            Ok(())
        })
        .await
    }

    async fn block_status(&self, offset: u64, length: u64) -> DeviceResult<Vec<Extent>> {
        check_range(offset, length, self.size())?;
        self.blocking(move |file, _| map_extents(file, offset, length))
            .await
    }

    async fn cache(&self, offset: u64, length: u64) -> DeviceResult<()> {
        check_range(offset, length, self.size())?;
        self.blocking(move |file, _| {
            // SAFETY: plain syscall on a valid open descriptor.
            let rc = unsafe {
                libc::posix_fadvise(
                    file.as_raw_fd(),
                    offset as libc::off_t,
                    length as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                )
            };
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc).into());
            }
            Ok(())
        })
        .await
    }
}

fn read_bytes(file: &File, offset: u64, length: usize) -> DeviceResult<Bytes> {
    let mut buf = vec![0u8; length];
    file.read_exact_at(&mut buf, offset)
        .map_err(DeviceError::from)?;
    Ok(Bytes::from(buf))
}

fn lock_file(file: &File, shared: bool) -> io::Result<()> {
    let op = if shared { libc::LOCK_SH } else { libc::LOCK_EX } | libc::LOCK_NB;
    // SAFETY: plain syscall on a valid open descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Deallocates a range. Returns false when the filesystem does not support punching holes.
fn punch_hole(file: &File, offset: u64, length: u64) -> DeviceResult<bool> {
    crate::fallocate::punch_hole(file, offset, length).map_err(DeviceError::from)
}

/// Zeroes a range in place (allocated). Returns false when the filesystem cannot.
fn zero_range(file: &File, offset: u64, length: u64) -> DeviceResult<bool> {
    crate::fallocate::zero_range(file, offset, length).map_err(DeviceError::from)
}

fn write_zero_bytes(file: &File, offset: u64, length: u64) -> DeviceResult<()> {
    let zeros = vec![0u8; ZERO_FILL_CHUNK.min(length) as usize];
    let mut pos = offset;
    let end = offset + length;
    while pos < end {
        let n = (end - pos).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], pos)
            .map_err(DeviceError::from)?;
        pos += n as u64;
    }
    Ok(())
}

/// Describes `[offset, offset+length)` as data and hole extents using SEEK_DATA/SEEK_HOLE.
/// Filesystems without hole reporting show everything as data, which is always correct.
fn map_extents(file: &File, offset: u64, length: u64) -> DeviceResult<Vec<Extent>> {
    let end = offset + length;
    let mut extents: Vec<Extent> = Vec::new();
    let mut push = |kind: ExtentKind, len: u64| {
        if len == 0 {
            return;
        }
        match extents.last_mut() {
            Some(last) if last.kind == kind => last.length += len,
            _ => extents.push(Extent { length: len, kind }),
        }
    };
    let mut pos = offset;
    while pos < end {
        match seek(file, pos, libc::SEEK_DATA)? {
            None => {
                // No data at or after pos: the rest is a hole.
                push(ExtentKind::Hole, end - pos);
                break;
            }
            Some(data) if data > pos => {
                let stop = data.min(end);
                push(ExtentKind::Hole, stop - pos);
                pos = stop;
            }
            Some(_) => {
                let hole = seek(file, pos, libc::SEEK_HOLE)?.unwrap_or(end);
                let stop = hole.clamp(pos + 1, end);
                push(ExtentKind::Data, stop - pos);
                pos = stop;
            }
        }
    }
    Ok(extents)
}

/// `lseek` with SEEK_DATA / SEEK_HOLE. `None` means ENXIO (no such region after `pos`).
/// A filesystem that rejects these whences reports `pos` itself for SEEK_DATA (all data).
fn seek(file: &File, pos: u64, whence: libc::c_int) -> DeviceResult<Option<u64>> {
    // SAFETY: plain syscall on a valid open descriptor; the file position is never used for I/O.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), pos as libc::off_t, whence) };
    if rc >= 0 {
        return Ok(Some(rc as u64));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        Some(libc::EINVAL) if whence == libc::SEEK_DATA => Ok(Some(pos)),
        Some(libc::EINVAL) => Ok(None),
        _ => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn volume(dir: &Path) -> FileVolume {
        FileVolume::create(dir, "v", 64 * MIB, 65536).expect("create")
    }

    fn concat(segments: &[ReadSegment]) -> Vec<u8> {
        let mut out = Vec::new();
        for s in segments {
            match s {
                ReadSegment::Data(b) => out.extend_from_slice(b),
                ReadSegment::Zero(n) => out.resize(out.len() + *n as usize, 0),
            }
        }
        out
    }

    #[tokio::test]
    async fn write_read_and_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = volume(dir.path());
        assert_eq!(
            v.block_status(0, 64 * MIB).await.expect("status"),
            vec![Extent {
                length: 64 * MIB,
                kind: ExtentKind::Hole
            }]
        );
        let data = Bytes::from(vec![0xab; 8192]);
        v.write(MIB, data.clone(), true).await.expect("write");
        let back = v.read(MIB, 8192).await.expect("read");
        assert_eq!(concat(&back), data.to_vec());

        // A large read spanning hole + data + hole reports the holes as zero runs.
        let segments = v.read(0, (4 * MIB) as u32).await.expect("read");
        assert!(segments.iter().any(|s| matches!(s, ReadSegment::Zero(_))));
        let all = concat(&segments);
        assert_eq!(all.len() as u64, 4 * MIB);
        assert_eq!(&all[MIB as usize..MIB as usize + 8192], &data[..]);
        assert!(all[..MIB as usize].iter().all(|&b| b == 0));

        let status = v.block_status(0, 4 * MIB).await.expect("status");
        assert_eq!(status.iter().map(|e| e.length).sum::<u64>(), 4 * MIB);
        assert_eq!(status[0].kind, ExtentKind::Hole);
        assert!(status.iter().any(|e| e.kind == ExtentKind::Data));
    }

    #[tokio::test]
    async fn trim_and_zero_make_zeros() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = volume(dir.path());
        v.write(0, Bytes::from(vec![7u8; 2 * MIB as usize]), false)
            .await
            .expect("write");
        v.trim(0, MIB, false).await.expect("trim");
        let z = ZeroMode {
            may_trim: false,
            fast_only: false,
        };
        v.write_zeroes(MIB, 4096, z, false).await.expect("zero");
        let all = concat(&v.read(0, 2 * MIB as u32).await.expect("read"));
        assert!(all[..MIB as usize + 4096].iter().all(|&b| b == 0));
        assert!(all[MIB as usize + 4096..].iter().all(|&b| b == 7));
    }

    #[tokio::test]
    async fn out_of_range_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = volume(dir.path());
        assert!(matches!(
            v.write(64 * MIB - 1, Bytes::from_static(b"ab"), false)
                .await,
            Err(DeviceError::OutOfRange { .. })
        ));
        assert!(v.read(u64::MAX, 1).await.is_err());
    }

    #[tokio::test]
    async fn second_writer_is_refused_and_reopen_keeps_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = volume(dir.path());
        v.write(4096, Bytes::from_static(b"hello"), true)
            .await
            .expect("write");
        let err = FileVolume::open(dir.path(), "v", false)
            .err()
            .expect("second writer must be refused");
        assert!(err.to_string().contains("in use"), "{err}");
        drop(v);
        let v = FileVolume::open(dir.path(), "v", true).expect("reopen");
        assert_eq!(concat(&v.read(4096, 5).await.expect("read")), b"hello");
        assert!(matches!(
            v.write(0, Bytes::from_static(b"x"), false).await,
            Err(DeviceError::ReadOnly)
        ));
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_volume_name("disk-1.a_b").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert!(validate_volume_name(bad).is_err(), "{bad:?}");
        }
    }
}
