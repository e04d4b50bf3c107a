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
//! The modules, one job each, most around a small state of their own that [`Shared`] holds:
//! `open` (taking the volume, replaying the journal, starting the background), `block_device`
//! (the NBD-facing operations), `write_log` (journal, overlay, dirty bytes), `map_access` (the
//! block map's connections and lookup cache, with `locations`), `read`, `fetch` and `readahead`
//! (the read path), `upload`, `upload_progress`, `upload_policy`, `upload_health` and
//! `chunk_writer` (uploads), `gc`, `metrics`, `catalog` (`volume.json`), `inspect` (a volume described from the store alone), `local_state` (the local
//! folder), `helpers` (what they all use). This file holds the volume's configuration, the
//! shared state and the write path's two steps (journal, then durable).

mod block_device;
pub mod catalog;
pub mod checkpoints;
mod chunk_writer;
mod clone;
mod fetch;
mod gc;
mod helpers;
mod inspect;
mod journal_claim;
mod lifecycle;
pub mod lines;
mod local_state;
mod locations;
mod map_access;
mod metrics;
mod open;
mod read;
mod readahead;
mod restore;
mod upload;
mod upload_health;
mod upload_policy;
mod upload_progress;
mod verify;
mod write_log;

pub use clone::{clone_volume, dependents as clones_of, release_parent};
pub use gc::GcReport;
pub use inspect::{Holder, VolumeReport, holder, inspect};
pub use restore::{RestoreReport, RestoreRequest, RestoredMap, restore, restore_keeping_map};
pub use upload_health::UploadStall;
pub use verify::{DamagedBlock, OrphanChunk, StateReport, VerifyOptions, VerifyReport, verify};

use crate::chunk_store::ChunkStore;
use crate::device::{DeviceError, DeviceResult, check_range};
use crate::metadata::VolumeMetadata;
use crate::shared_cache::CacheHandle;
use blockmap::replica::Layout;
use chunk_writer::ChunkIds;
use helpers::{blocking, lock, other};
pub use local_state::{LocalUsage, usage as local_usage};
use map_access::MapAccess;
use object_store::ObjectStore;
use object_store::path::Path;
use read::ReadState;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stores::counting::CountingStore;
use stores::low_priority::LowPriorityThreads;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use upload_progress::UploadProgress;
use write_log::{Change, WriteLog};

/// Block-map metadata key: the last journal seq whose writes the map holds.
const META_JOURNAL_SEQ: &str = "journal_seq";
/// Block-map metadata key: the instance id of the local directory that uploaded it.
const META_JOURNAL_OWNER: &str = "journal_owner";
/// Block-map metadata key: the volume's size since its last resize (volume.json keeps the size
/// it was created with). In the map, so a checkpoint or a clone carries the size of its state.
const META_VOLUME_SIZE: &str = "volume_size";

/// The size `map` records (`None`: never resized, volume.json's size holds).
fn recorded_size(map: &blockmap::BlockMap) -> Result<Option<u64>, blockmap::Error> {
    Ok(map
        .meta(META_VOLUME_SIZE)?
        .and_then(|s| s.parse::<u64>().ok()))
}

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
    /// A block cache folder shared with the other volumes this process opens there (see
    /// `shared_cache`); `None`, or when another process uses it: one in `local_dir`.
    pub shared_cache_dir: Option<PathBuf>,
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
    /// Serve this checkpoint's map state instead of the latest; read-only.
    pub checkpoint: Option<checkpoints::Checkpoint>,
    /// The key of an encrypted volume (required to open one; unused for a plain one).
    pub key: Option<Arc<crate::sealing::VolumeKey>>,
}

impl VolumeConfig {
    pub fn new(local_dir: PathBuf) -> Self {
        VolumeConfig {
            local_dir,
            cache_bytes: 8 << 30,
            shared_cache_dir: None,
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
            checkpoint: None,
            key: None,
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

/// State shared by the device, the uploader and background tasks: the volume's identity and
/// configuration, and one small state per job (each in its own module).
pub(crate) struct Shared {
    meta: VolumeMetadata,
    config: VolumeConfig,
    /// The id of this local directory, recorded with each upload (see `local_state`).
    instance: String,
    /// The store (as this volume counts it) and the prefix volumes live under.
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// The volume's size now (see `META_VOLUME_SIZE`; `resize` changes it).
    size: AtomicU64,
    /// Journal, overlay and dirty accounting (see [`write_log`]).
    log: WriteLog,
    /// The block map's connections and lookup cache (see [`map_access`]).
    map: MapAccess,
    chunks: ChunkStore,
    /// Ids for the chunks this process writes (see [`chunk_writer`]).
    chunk_ids: ChunkIds,
    /// Used by reads (hits, fetched blocks) and uploads (blocks they store).
    cache: Arc<CacheHandle>,
    /// In-flight fetches, readahead and read counters (see [`read`]).
    reads: ReadState,
    /// What is stored, who waits for it, the store's health, fencing (see [`upload_progress`]).
    uploads: UploadProgress,
    /// Where the uploader's CPU-heavy work runs, below the priority of serving requests.
    background: LowPriorityThreads,
    /// Held by each upload step and collection pass: one map writer at a time.
    maintenance: tokio::sync::Mutex<gc::Collector>,
    /// Whether the map names this directory's journal yet (FLUSH waits for it).
    journal_claim: journal_claim::JournalClaim,
    stats: Mutex<VolumeStats>,
    /// The store as this volume sees it, counting requests and bytes.
    store_counts: Arc<CountingStore>,
}

impl Shared {
    /// Where everything of this volume lives in the store.
    fn root(&self) -> Path {
        catalog::volume_root(&self.prefix, &self.meta.name)
    }

    fn block_size(&self) -> u64 {
        u64::from(self.meta.block_size)
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn check_writable(&self) -> DeviceResult<()> {
        if self.config.read_only {
            return Err(DeviceError::ReadOnly);
        }
        self.uploads.check_not_fenced()
    }

    /// Another writer took the volume: this one refuses writes from now on.
    fn fence(&self, why: String) {
        self.uploads.fence(&self.meta.name, why);
    }

    /// Waits until everything through `seq` is in object storage.
    async fn wait_uploaded(&self, seq: u64) -> DeviceResult<()> {
        self.uploads.wait_uploaded(seq, &self.meta.name).await
    }

    /// Back-pressure: waits while `max_dirty_bytes` of journaled data wait for upload.
    async fn wait_for_room(&self) -> DeviceResult<()> {
        let limit = self.config.max_dirty_bytes;
        self.uploads
            .wait_for_room(|| self.log.dirty_bytes(), limit, &self.meta.name)
            .await
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
        Self::create_with(store, prefix, name, size, block_size, None).await
    }

    /// [`Self::create`], of a volume whose blocks are sealed with `key` when one is given (see
    /// `sealing`).
    pub async fn create_with_key(
        store: &dyn ObjectStore,
        prefix: &Path,
        name: &str,
        size: u64,
        block_size: u32,
        key: Option<&crate::sealing::VolumeKey>,
    ) -> io::Result<VolumeMetadata> {
        let encryption = key
            .map(crate::sealing::Encryption::new)
            .transpose()
            .map_err(io::Error::other)?;
        Self::create_with(store, prefix, name, size, block_size, encryption).await
    }

    async fn create_with(
        store: &dyn ObjectStore,
        prefix: &Path,
        name: &str,
        size: u64,
        block_size: u32,
        encryption: Option<crate::sealing::Encryption>,
    ) -> io::Result<VolumeMetadata> {
        crate::file_volume::validate_volume_name(name)?;
        catalog::validate_geometry(size, block_size)?;
        let meta = VolumeMetadata {
            name: name.to_string(),
            size,
            block_size,
            format: catalog::format_for(encryption.is_some()).to_string(),
            uuid: crate::metadata::random_id()?,
            parent: None,
            inherits: Vec::new(),
            encryption,
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

    /// Opens a volume [`restore_keeping_map`] just restored, adopting its map: the volume
    /// serves the restored state without taking it again (a served volume's restore then costs
    /// the switch alone).
    pub async fn open_restored(
        prefix: &Path,
        layout: Layout,
        config: VolumeConfig,
        restored: RestoredMap,
    ) -> io::Result<ObjectVolume> {
        open::open_restored(prefix, layout, config, restored).await
    }

    pub fn metadata(&self) -> &VolumeMetadata {
        &self.shared.meta
    }

    /// A snapshot of the volume's counters (queries the block map).
    pub async fn stats(&self) -> io::Result<VolumeStats> {
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            let mut stats = lock(&shared.stats).clone();
            stats.uploaded_seq = shared.uploads.uploaded();
            if let Some(j) = shared.log.journal().as_ref() {
                stats.journal_next_seq = j.next_seq();
                stats.journal_bytes = j.size_bytes()?;
            }
            stats.dirty_bytes = shared.log.dirty_bytes();
            stats.cached_blocks = shared.cache.len() as u64;
            stats.map_txid = shared.map.txid();
            let map = shared.map.lookups();
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
        let through = self.shared.log.journaled_through();
        Ok(self.shared.wait_uploaded(through).await?)
    }

    fn check(&self, offset: u64, length: u64) -> DeviceResult<()> {
        check_range(offset, length, self.shared.size())
    }

    /// Appends a change to the journal and the overlay (see [`WriteLog::append`]); returns
    /// its seq. Waits for room first (back-pressure).
    async fn journal_change(&self, change: Change) -> DeviceResult<u64> {
        self.shared.check_writable()?;
        self.shared.wait_for_room().await?;
        // Small appends cost microseconds (the page cache absorbs them): not worth a hand-off.
        if change.len() <= 64 * 1024 {
            return Ok(self.shared.log.append(change)?);
        }
        let shared = Arc::clone(&self.shared);
        Ok(blocking(move || shared.log.append(change)).await?)
    }

    async fn durable(&self, seq: u64) -> DeviceResult<()> {
        self.shared.log.sync().await?;
        self.shared.journal_claim.wait().await?;
        if self.shared.config.durability == Durability::Remote {
            self.shared.wait_uploaded(seq).await?;
        }
        Ok(())
    }
}
