//! A volume whose blocks live in object storage (docs/ARCHITECTURE.md §2–§6).
//!
//! - Writes are appended to a local journal and recorded in an in-memory [`Overlay`]; FLUSH
//!   and FUA fdatasync the journal (`Durability::Local`) or also wait for the upload
//!   (`Durability::Remote`).
//! - An uploader ([`upload`]) regularly packs the latest content of dirty blocks into
//!   immutable chunks, PUTs them, commits one block-map transaction for the journal range and
//!   syncs the map to the store as LTX; only then does it release the journal range.
//! - Reads ([`read`]) see the overlay first, then the block map: a cached block, a ranged GET of
//!   the one compressed block (verified), or zeros for a block that has no row.
//! - On open, the journal is replayed on top of what the block map says was uploaded, so a
//!   kill -9 loses nothing acknowledged (I2); with an empty local directory the volume is served
//!   from the store alone, as of the last upload (I1).
//!
//! Everything that touches SQLite runs on blocking threads: a block-map page that is not local
//! yet is fetched from the store by the calling thread.
//!
//! The modules, one job each: `open` (taking the volume, replaying the journal, starting the
//! background), `block_device` (the NBD-facing operations), `read`, `fetch`, `readahead` and
//! `locations` (the read path), `upload`, `upload_policy`, `upload_health` and `chunk_writer`
//! (uploads), `gc`, `metrics`, `catalog` (`volume.json`), `local_state` (the local folder),
//! `helpers` (what they all use). This file holds the volume's configuration, its shared state
//! and the journal-facing steps of a write.

mod block_device;
pub mod catalog;
mod chunk_writer;
mod fetch;
mod gc;
mod helpers;
mod local_state;
mod locations;
mod metrics;
mod open;
mod read;
mod readahead;
mod upload;
mod upload_health;
mod upload_policy;

pub use gc::GcReport;
pub use upload_health::UploadStall;

use crate::cache::{BlockCache, CacheKey};
use crate::chunk_store::ChunkStore;
use crate::device::{DeviceError, DeviceResult, check_range};
use crate::journal::Journal;
use crate::metadata::VolumeMetadata;
use crate::overlay::Overlay;
use blockmap::BlockMap;
use blockmap::replica::Layout;
use blockmap::vfs::follower::Follower;
use blockmap::writer::MapWriter;
use bytes::Bytes;
use helpers::{blocking, lock, other};
pub use local_state::{LocalUsage, usage as local_usage};
use object_store::ObjectStore;
use object_store::path::Path;
use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;
use stores::counting::CountingStore;
use stores::low_priority::LowPriorityThreads;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinHandle;

/// Block-map metadata key: the last journal seq whose writes the map holds.
const META_JOURNAL_SEQ: &str = "journal_seq";
/// Block-map metadata key: the instance id of the local directory that uploaded it.
const META_JOURNAL_OWNER: &str = "journal_owner";

/// What FLUSH and FUA wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The local journal is on disk (I2). Losing the host loses at most the un-uploaded tail.
    Local,
    /// Chunks and block map are in object storage (I4).
    Remote,
}

/// How an object volume runs on this host.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// This volume's local directory: journal, block cache, identity files.
    pub local_dir: PathBuf,
    /// Size limit of the block cache.
    pub cache_bytes: u64,
    /// How often dirty data is uploaded.
    pub sync_interval: Duration,
    pub durability: Durability,
    pub read_only: bool,
    /// Target size of a chunk object (4–32 MiB). 24 MiB keeps store requests under 64 per GiB
    /// written (map files included) with two chunks in flight.
    pub chunk_bytes: usize,
    /// Journaled data not yet uploaded above which writers wait for the uploader. It lives in
    /// the journal on local disk (the overlay only points at it), so this bounds disk use.
    pub max_dirty_bytes: u64,
    /// How far the store may lag behind the journal when the load keeps rewriting the same
    /// blocks (each rewrite between two uploads is folded into one). Never with remote
    /// durability; other loads are uploaded every `sync_interval`.
    pub max_upload_lag: Duration,
    /// Writers waiting for room in the journal fail once the store has made no progress at all
    /// for this long (while it makes progress, however slowly, they wait).
    pub stall_timeout: Duration,
    /// Blocks one upload step stores at most; `None`: as many as the journal limit holds
    /// (see `upload_policy::step_blocks`).
    pub upload_step_blocks: Option<usize>,
    /// Garbage collection on (the default). Off only to measure what it costs.
    pub collect_garbage: bool,
    /// How long past map states stay restorable: a chunk the map stopped using is deleted once
    /// this long has passed (zero: right after the upload that replaced its blocks).
    pub restore_window: Duration,
    /// Pull every block into the cache in the background.
    pub hydrate: bool,
    /// How far ahead of a sequential reader blocks are fetched, at most (0: no readahead).
    pub readahead_bytes: u64,
    /// Ranged GETs that readahead and `NBD_CMD_CACHE` keep in flight at most (reads
    /// a client waits for are never held back by them).
    pub prefetch_gets: usize,
    /// Name of this process in the writer lease (host and pid).
    pub holder: String,
}

impl VolumeConfig {
    pub fn new(local_dir: PathBuf) -> Self {
        VolumeConfig {
            local_dir,
            cache_bytes: 8 << 30,
            sync_interval: Duration::from_secs(1),
            durability: Durability::Local,
            read_only: false,
            chunk_bytes: 24 << 20,
            max_dirty_bytes: 4 << 30,
            max_upload_lag: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(300),
            restore_window: Duration::ZERO,
            upload_step_blocks: None,
            collect_garbage: true,
            hydrate: false,
            readahead_bytes: 64 << 20,
            prefetch_gets: 16,
            holder: format!("pid {}", std::process::id()),
        }
    }
}

/// Counters for `info` and metrics.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VolumeStats {
    pub uploaded_seq: u64,
    pub journal_next_seq: u64,
    pub journal_bytes: u64,
    pub dirty_bytes: u64,
    pub cached_blocks: u64,
    pub map_txid: u64,
    pub allocated_blocks: u64,
    pub allocated_stored_bytes: u64,
    pub chunks: u64,
    /// Upload steps committed.
    pub uploads: u64,
    /// Journaled (client) bytes the uploads stored, blocks they stored (each rewrite of a block
    /// between two uploads folded into one), and bytes of chunks they PUT.
    pub uploaded_journal_bytes: u64,
    pub uploaded_blocks: u64,
    pub uploaded_chunk_bytes: u64,
    pub chunks_rewritten: u64,
    pub chunks_deleted: u64,
    /// Bytes of every chunk in the store, dead ones waiting for deletion included.
    pub chunk_bytes: u64,
}

/// The block map, as this process holds it.
enum MapRole {
    /// The single writer: took the lease, uploads.
    Writer(MapWriter),
    /// A read-only view of the latest replicated state (does not fence the writer).
    Follower(#[allow(dead_code)] Follower),
    /// Read-only and nothing was ever uploaded: every block is a hole.
    Empty,
}

/// State shared by the device, the uploader and background tasks.
pub(crate) struct Shared {
    meta: VolumeMetadata,
    config: VolumeConfig,
    instance: String,
    /// The journal; the overlay is updated while this lock is held so that both see changes
    /// in the same (seq) order.
    journal: Mutex<Option<Journal>>,
    overlay: RwLock<Overlay>,
    /// Bumped whenever uploaded edits leave the overlay: a read that combined an overlay edit
    /// with a stored base looked up before that moment must start over.
    overlay_generation: AtomicU64,
    dirty_bytes: AtomicU64,
    /// Connection for lookups (reads, block status).
    lookups: Mutex<BlockMap>,
    /// Lookups remembered, kept exact by the uploader.
    locations: locations::Locations,
    /// Connection for the uploader's transactions (writers only).
    updates: Option<Mutex<BlockMap>>,
    map: MapRole,
    chunks: ChunkStore,
    cache: BlockCache,
    /// Where the uploader's CPU-heavy work runs, below the priority of serving requests.
    background: LowPriorityThreads,
    /// Blocks being fetched from the store, for others who want them meanwhile (see `fetch`).
    fetches: Mutex<HashMap<CacheKey, fetch::BlockFetch>>,
    /// Highest journal seq whose writes are in object storage.
    uploaded: watch::Sender<u64>,
    /// Highest journal seq someone waits to see stored (remote FLUSH, `sync_to_store`).
    upload_wanted: AtomicU64,
    upload_now: Notify,
    /// When writers last woke the uploader, in milliseconds since `started`.
    last_nudge_ms: AtomicU64,
    started: std::time::Instant,
    /// Whether uploads progress; how long writers waited for them.
    health: upload_health::UploadHealth,
    /// Held by each upload step and collection pass: one map writer at a time.
    maintenance: tokio::sync::Mutex<gc::Collector>,
    /// Set when this volume must stop accepting writes (fenced by another writer).
    failure: Mutex<Option<String>>,
    next_chunk: AtomicU64,
    chunk_epoch: u64,
    readahead: readahead::Readahead,
    /// GETs readahead and `NBD_CMD_CACHE` may have in flight (hydration has its own few).
    prefetch_slots: Arc<Semaphore>,
    stats: Mutex<VolumeStats>,
    counters: ReadCounters,
    /// The store as this volume sees it, counting requests and bytes.
    store_counts: Arc<CountingStore>,
}

/// Read-path counters for the metrics endpoint.
#[derive(Default)]
struct ReadCounters {
    /// Block pieces of reads answered from the local cache.
    cache_hits: AtomicU64,
    /// Blocks fetched from the store (reads, readahead and hydration alike).
    store_fetches: AtomicU64,
    /// Ranged GETs of blocks (each brings one or more neighbouring blocks).
    store_gets: AtomicU64,
    /// Blocks readahead had planned and dropped because their stream was no longer read.
    readahead_cancelled: AtomicU64,
    /// Disk hydration: blocks of the disk scanned so far (`--hydrate`).
    hydration_scanned: AtomicU64,
}

impl Shared {
    fn overlay(&self) -> RwLockReadGuard<'_, Overlay> {
        self.overlay.read().unwrap_or_else(|e| e.into_inner())
    }

    fn overlay_mut(&self) -> RwLockWriteGuard<'_, Overlay> {
        self.overlay.write().unwrap_or_else(|e| e.into_inner())
    }

    fn block_size(&self) -> u64 {
        u64::from(self.meta.block_size)
    }

    fn check_writable(&self) -> DeviceResult<()> {
        if self.config.read_only {
            return Err(DeviceError::ReadOnly);
        }
        if let Some(why) = lock(&self.failure).as_ref() {
            return Err(DeviceError::Io(io::Error::other(why.clone())));
        }
        Ok(())
    }

    fn fail(&self, why: String) {
        tracing::error!(volume = %self.meta.name, "{why}; refusing further writes");
        *lock(&self.failure) = Some(why);
        // Wake writers waiting for the uploader so that they see the failure.
        self.uploaded.send_modify(|_| {});
    }
}

pub struct ObjectVolume {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl ObjectVolume {
    /// Creates a new volume in the store (fails if it exists).
    pub async fn create(
        store: &dyn ObjectStore,
        prefix: &Path,
        name: &str,
        size: u64,
        block_size: u32,
    ) -> io::Result<VolumeMetadata> {
        crate::file_volume::validate_volume_name(name)?;
        catalog::validate_geometry(size, block_size)?;
        let meta = VolumeMetadata {
            name: name.to_string(),
            size,
            block_size,
            format: catalog::FORMAT.to_string(),
            uuid: crate::metadata::random_id()?,
        };
        catalog::create(store, prefix, &meta).await?;
        Ok(meta)
    }

    /// Opens volume `name`: takes the writer lease (unless read-only), opens the block map
    /// through the VFS, replays the local journal and starts the uploader (see [`open`]).
    pub async fn open(
        store: Arc<dyn ObjectStore>,
        prefix: &Path,
        layout: Layout,
        name: &str,
        config: VolumeConfig,
    ) -> io::Result<ObjectVolume> {
        open::open(store, prefix, layout, name, config).await
    }

    pub fn metadata(&self) -> &VolumeMetadata {
        &self.shared.meta
    }

    /// A snapshot of the volume's counters (queries the block map).
    pub async fn stats(&self) -> io::Result<VolumeStats> {
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            let mut stats = lock(&shared.stats).clone();
            stats.uploaded_seq = *shared.uploaded.borrow();
            if let Some(j) = lock(&shared.journal).as_ref() {
                stats.journal_next_seq = j.next_seq();
                stats.journal_bytes = j.size_bytes()?;
            }
            stats.dirty_bytes = shared.dirty_bytes.load(Ordering::Relaxed);
            stats.cached_blocks = shared.cache.len() as u64;
            stats.map_txid = match &shared.map {
                MapRole::Writer(w) => w.txid(),
                MapRole::Follower(f) => f.txid(),
                MapRole::Empty => 0,
            };
            let map = lock(&shared.lookups);
            let (blocks, bytes) = map.usage().map_err(|e| other("block map", e))?;
            stats.allocated_blocks = blocks;
            stats.allocated_stored_bytes = bytes;
            stats.chunks = map.chunk_count().map_err(|e| other("block map", e))?;
            stats.chunk_bytes = map.chunk_bytes().map_err(|e| other("block map", e))?;
            Ok(stats)
        })
        .await
    }

    /// Runs block-map maintenance and a full garbage collection now (normally every 60
    /// upload steps; dead chunks are collected after every step).
    pub async fn maintain_now(&self) -> io::Result<GcReport> {
        if self.shared.config.read_only {
            return Ok(GcReport::default());
        }
        upload::maintain(&self.shared).await
    }

    /// Uploads everything journaled so far and waits for it (tests, tools).
    pub async fn sync_to_store(&self) -> io::Result<()> {
        let through = self.shared.journaled_through();
        self.shared.wait_uploaded(through).await
    }

    fn check(&self, offset: u64, length: u64) -> DeviceResult<()> {
        check_range(offset, length, self.shared.meta.size)
    }

    /// Appends a change to the journal and the overlay under one lock; returns its seq.
    async fn journal_change(&self, change: Change) -> DeviceResult<u64> {
        self.shared.check_writable()?;
        self.shared.wait_for_room().await?;
        let shared = Arc::clone(&self.shared);
        let small = change.len() <= 64 * 1024;
        let append = move || -> io::Result<u64> {
            // Checksummed before the lock: concurrent writers do this part in parallel.
            let data_crc = match &change {
                Change::Write { data, .. } => crate::checksum::crc32c(data),
                Change::Zero { .. } => 0,
            };
            let mut journal = lock(&shared.journal);
            let journal = journal
                .as_mut()
                .ok_or_else(|| io::Error::other("volume is read-only"))?;
            match change {
                Change::Write { offset, data } => {
                    // The overlay points into the journal: the payload's memory is freed now.
                    let (seq, at) = journal.append_write_located(offset, &data, data_crc)?;
                    let len = data.len() as u64;
                    shared.dirty_bytes.fetch_add(len, Ordering::Relaxed);
                    shared.overlay_mut().write_journaled(seq, offset, len, at);
                    Ok(seq)
                }
                Change::Zero { offset, length } => {
                    let seq = journal.append_zero(offset, length)?;
                    shared.overlay_mut().zero(seq, offset, length);
                    Ok(seq)
                }
            }
        };
        // Small appends cost microseconds (the page cache absorbs them): not worth a hand-off.
        let seq = if small {
            append()
        } else {
            blocking(append).await
        };
        seq.map_err(device_error)
    }

    async fn durable(&self, seq: u64) -> DeviceResult<()> {
        self.shared.sync_journal().await.map_err(device_error)?;
        if self.shared.config.durability == Durability::Remote {
            self.shared.wait_uploaded(seq).await.map_err(device_error)?;
        }
        Ok(())
    }
}

enum Change {
    Write { offset: u64, data: Bytes },
    Zero { offset: u64, length: u64 },
}

impl Change {
    fn len(&self) -> usize {
        match self {
            Change::Write { data, .. } => data.len(),
            Change::Zero { .. } => 0,
        }
    }
}

/// Full disk → ENOSPC; everything else is an I/O error.
fn device_error(e: io::Error) -> DeviceError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => DeviceError::NoSpace(e.to_string()),
        _ => DeviceError::Io(e),
    }
}

impl Shared {
    /// The seq of the last change appended to the journal.
    fn journaled_through(&self) -> u64 {
        lock(&self.journal)
            .as_ref()
            .map_or(0, |j| j.next_seq().saturating_sub(1))
    }

    async fn sync_journal(&self) -> io::Result<()> {
        let handle = match lock(&self.journal).as_ref() {
            Some(j) => j.sync_handle()?,
            None => return Ok(()),
        };
        blocking(move || handle.run()).await
    }

    /// Waits until the uploader has stored everything through `seq`. Gives up when the store
    /// has stalled (see [`upload_health`]).
    async fn wait_uploaded(&self, seq: u64) -> io::Result<()> {
        self.upload_wanted.fetch_max(seq, Ordering::AcqRel);
        let mut rx = self.uploaded.subscribe();
        loop {
            if *rx.borrow_and_update() >= seq {
                return Ok(());
            }
            self.stopped_uploading()?;
            self.upload_now.notify_one();
            // Woken by each step; the timeout re-checks the store's health meanwhile.
            match tokio::time::timeout(STALL_CHECK_EVERY, rx.changed()).await {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(_)) => return Err(io::Error::other("the uploader stopped")),
            }
        }
    }

    /// `Err` if waiting for the uploader is pointless: this volume was fenced or failed, or the
    /// store stalled or refuses uploads. Logged once per stall, saying which.
    fn stopped_uploading(&self) -> io::Result<()> {
        if let Some(why) = lock(&self.failure).as_ref() {
            return Err(io::Error::other(why.clone()));
        }
        self.health.check().map_err(|stall| {
            if self.health.first_report() {
                tracing::error!(volume = %self.meta.name, "failing writes that wait for room: {stall}");
            }
            io::Error::other(stall.to_string())
        })
    }

    /// Back-pressure: while `max_dirty_bytes` of journaled data wait for upload, writers wait
    /// for the uploader to make room, for as long as the store makes progress.
    async fn wait_for_room(&self) -> DeviceResult<()> {
        let limit = self.config.max_dirty_bytes;
        let dirty = self.dirty_bytes.load(Ordering::Relaxed);
        if dirty < limit {
            if dirty >= limit / 4 {
                self.nudge_uploader();
            }
            return Ok(());
        }
        let started = std::time::Instant::now();
        let mut rx = self.uploaded.subscribe();
        let outcome = loop {
            if self.dirty_bytes.load(Ordering::Relaxed) < limit {
                break Ok(());
            }
            if let Err(e) = self.stopped_uploading() {
                break Err(DeviceError::Io(e));
            }
            self.nudge_uploader();
            match tokio::time::timeout(STALL_CHECK_EVERY, rx.changed()).await {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(_)) => {
                    break Err(DeviceError::Io(io::Error::other("the uploader stopped")));
                }
            }
        };
        self.health.waited(started.elapsed());
        outcome
    }
}

/// How often a writer waiting for the uploader re-checks that the store makes progress.
const STALL_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Writers wake the uploader at most this often (it decides itself whether to upload).
const NUDGE_EVERY_MS: u64 = 50;

impl Shared {
    /// Wakes the uploader, at most every [`NUDGE_EVERY_MS`]: with a busy journal every write
    /// would, and each wake-up is a decision.
    fn nudge_uploader(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_nudge_ms.load(Ordering::Relaxed);
        if now >= last + NUDGE_EVERY_MS
            && self
                .last_nudge_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.upload_now.notify_one();
        }
    }
}
