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

pub mod catalog;
mod fetch;
mod gc;
mod local_state;
mod locations;
mod read;
mod readahead;
mod upload;
mod upload_health;
mod upload_policy;

pub use gc::GcReport;
pub use upload_health::UploadStall;

use crate::cache::{BlockCache, CacheKey};
use crate::chunk_store::ChunkStore;
use crate::device::{
    BlockDevice, Capabilities, DeviceError, DeviceMetric, DeviceResult, Extent, MetricKind,
    ReadSegment, ZeroMode, check_range,
};
use crate::journal::{Journal, Record};
use crate::metadata::VolumeMetadata;
use crate::overlay::Overlay;
use async_trait::async_trait;
use blockmap::lease;
use blockmap::replica::{Layout, Replica};
use blockmap::vfs::follower::Follower;
use blockmap::writer::{FirstLocated, MapWriter, OpenAhead};
use blockmap::{BlockLocation, BlockMap};
use bytes::Bytes;
use object_store::ObjectStore;
use object_store::path::Path;
use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
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

/// The SQLite connections a [`MapRole`] needs (see [`open_maps`]).
#[derive(Debug, Clone, Copy)]
enum MapConnections {
    /// A lookup connection and an update connection, both through the VFS.
    LookupAndUpdate,
    /// One query-only lookup connection through the VFS.
    LookupOnly,
    /// Nothing stored: an empty in-memory map.
    InMemory,
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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

fn other(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// Runs blocking work (SQLite, file I/O) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| other("blocking task failed", e))?
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
    /// through the VFS, replays the local journal and starts the uploader.
    pub async fn open(
        store: Arc<dyn ObjectStore>,
        prefix: &Path,
        layout: Layout,
        name: &str,
        config: VolumeConfig,
    ) -> io::Result<ObjectVolume> {
        let opening = std::time::Instant::now();
        // Every request this volume makes is counted, for the metrics endpoint.
        let counted = Arc::new(CountingStore::new(store));
        let store: Arc<dyn ObjectStore> = Arc::clone(&counted) as Arc<dyn ObjectStore>;
        // Where an open's time goes (boot time is a floor): milliseconds and store requests
        // at the end of each phase.
        let phase = |what: &str| {
            let c = counted.counts();
            tracing::debug!(
                volume = name,
                ms = opening.elapsed().as_millis() as u64,
                requests = c.get_requests + c.put_requests + c.list_requests + c.head_requests,
                "open: {what}"
            );
        };
        let root = catalog::volume_root(prefix, name);
        let replica = Arc::new(Replica::new(
            Arc::clone(&store),
            root.clone().join("blockmap"),
            layout,
        ));
        // volume.json and the map's listing are both needed before anything else and neither
        // depends on the other: one round trip for the two; and for a writer (a follower uses
        // neither) the map's open hint and the lease's epoch too: every request of an open
        // that depends on nothing else goes in this round trip. (Opening a volume that turns
        // out not to exist costs these read-only requests.)
        let writer = !config.read_only;
        let (meta, listing, hint, lease_epoch) = tokio::join!(
            catalog::load(store.as_ref(), prefix, name),
            replica.list(),
            async {
                match writer {
                    true => blockmap::open_hint::load(&replica).await,
                    false => None,
                }
            },
            async {
                match writer {
                    // A failed listing is made again when the lease is taken.
                    true => lease::current_epoch(store.as_ref(), &root).await.ok(),
                    false => None,
                }
            }
        );
        let meta = meta?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no volume {name} in the store"),
            )
        })?;
        let listing = listing.map_err(|e| other("listing the block map", e))?;
        phase("volume.json read, block map listed");
        let dir = config.local_dir.clone();
        let uuid = meta.uuid.clone();
        // The local folder is made ready while the map opens (a dozen ms of directory work
        // beside round trips to the store).
        let local = blocking(move || local_state::prepare(&dir, &uuid));
        // One VFS database per volume and process.
        let db_name = format!("{root}#{}", meta.uuid);
        let runtime = tokio::runtime::Handle::current();
        let (first_located, early_fetch) = early_first_reads(&store, &root, meta.block_size);
        let map = async {
            if config.read_only {
                if listing.is_empty() {
                    return Ok(MapRole::Empty);
                }
                Follower::open(Arc::clone(&replica), &db_name, runtime)
                    .await
                    .map(MapRole::Follower)
                    .map_err(|e| other("opening the block map", e))
            } else {
                MapWriter::open_ahead(
                    Arc::clone(&store),
                    Arc::clone(&replica),
                    root.clone(),
                    &db_name,
                    &config.holder,
                    runtime,
                    OpenAhead {
                        listing: Some(listing),
                        hint,
                        lease_epoch,
                        first_lookups: FIRST_LOOKUPS.to_vec(),
                        first_located: Some(first_located),
                    },
                )
                .await
                .map(MapRole::Writer)
                .map_err(|e| other("taking the volume", e))
            }
        };
        let (instance, map) = tokio::join!(local, map);
        let (instance, map) = (instance?, map?);
        // Found while the claim was in flight (or never, for a new or read-only map).
        let early_fetch = early_fetch.await.ok().flatten();
        phase("block map opened (lease, listing, files, claim)");
        let chunk_epoch = match &map {
            MapRole::Writer(w) => {
                w.set_restore_window(config.restore_window);
                w.lease().epoch
            }
            _ => 0,
        };
        let (lookups, updates, uploaded_seq, owner) = {
            let name = db_name.clone();
            let connections = match &map {
                MapRole::Writer(_) => MapConnections::LookupAndUpdate,
                MapRole::Follower(_) => MapConnections::LookupOnly,
                MapRole::Empty => MapConnections::InMemory,
            };
            blocking(move || {
                let (lookups, updates) = open_maps(&name, connections)?;
                let read = |e| other("reading the block map", e);
                let seq = lookups
                    .meta(META_JOURNAL_SEQ)
                    .map_err(read)?
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0);
                let owner = lookups.meta(META_JOURNAL_OWNER).map_err(read)?;
                Ok((lookups, updates, seq, owner))
            })
            .await?
        };

        phase("SQLite opened");
        // Replay the journal on top of what the map holds.
        let block_size = meta.block_size;
        let max_dirty_bytes = config.max_dirty_bytes;
        let (journal, overlay) = if config.read_only {
            (None, Overlay::new(block_size))
        } else {
            let dir = config.local_dir.clone();
            let instance = instance.clone();
            blocking(move || {
                local_state::check_journal_owner(&dir, &instance, owner.as_deref())?;
                let mut overlay = Overlay::new(block_size);
                let mut replayed = 0u64;
                let journal_dir = local_state::journal_dir(&dir);
                let mut journal = Journal::open_located(&journal_dir, |record, at| {
                    if record.seq() > uploaded_seq {
                        replayed += 1;
                        match (record, at) {
                            (Record::Write { seq, offset, data }, Some(at)) => {
                                overlay.write_journaled(seq, offset, data.len() as u64, at)
                            }
                            (Record::Write { seq, offset, data }, None) => {
                                overlay.write(seq, offset, Bytes::from(data))
                            }
                            (
                                Record::Zero {
                                    seq,
                                    offset,
                                    length,
                                },
                                _,
                            ) => overlay.zero(seq, offset, length),
                        }
                    }
                    Ok(())
                })?;
                journal.skip_to(uploaded_seq + 1)?;
                // A journal that filled up to its limit once will likely do it again.
                journal.keep_spares(max_dirty_bytes);
                if replayed > 0 {
                    tracing::info!(
                        "replayed {replayed} journal records after seq {uploaded_seq}; \
                         they will be uploaded"
                    );
                }
                Ok((Some(journal), overlay))
            })
            .await?
        };
        phase("journal replayed");
        let cache_dir = local_state::cache_dir(&config.local_dir);
        let cache_bytes = config.cache_bytes;
        let cache = blocking(move || BlockCache::open(&cache_dir, block_size, cache_bytes)).await?;
        phase("cache opened");
        let background = LowPriorityThreads::start(&format!("upload-{name}"), 1)?;
        let dirty = overlay.data_bytes() as u64;
        let (uploaded, _) = watch::channel(uploaded_seq);
        let total_blocks = meta.size.div_ceil(u64::from(block_size));
        let shared = Arc::new(Shared {
            chunks: ChunkStore::new(Arc::clone(&store), &root, block_size),
            meta,
            instance,
            journal: Mutex::new(journal),
            overlay: RwLock::new(overlay),
            overlay_generation: AtomicU64::new(0),
            dirty_bytes: AtomicU64::new(dirty),
            lookups: Mutex::new(lookups),
            locations: locations::Locations::default(),
            updates: updates.map(Mutex::new),
            map,
            cache,
            background,
            fetches: Mutex::new(HashMap::new()),
            uploaded,
            upload_wanted: AtomicU64::new(0),
            upload_now: Notify::new(),
            last_nudge_ms: AtomicU64::new(0),
            started: std::time::Instant::now(),
            health: upload_health::UploadHealth::new(config.stall_timeout),
            maintenance: tokio::sync::Mutex::new(gc::Collector::default()),
            failure: Mutex::new(None),
            next_chunk: AtomicU64::new(0),
            chunk_epoch,
            readahead: readahead::Readahead::new(
                u64::from(block_size),
                // Blocks fetched ahead must still be cached when the reader gets there.
                config.readahead_bytes.min(config.cache_bytes / 4),
                total_blocks,
            ),
            prefetch_slots: Arc::new(Semaphore::new(config.prefetch_gets.max(1))),
            stats: Mutex::new(VolumeStats::default()),
            counters: ReadCounters::default(),
            store_counts: counted,
            config,
        });
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        if !shared.config.read_only {
            tasks.push(tokio::spawn(upload::run(
                Arc::clone(&shared),
                stop_rx.clone(),
            )));
        }
        if let Some(early) = early_fetch {
            fetch::adopt_early(&shared, early);
        }
        if let MapRole::Writer(_) = &shared.map {
            tasks.push(tokio::spawn(hydrate_map(Arc::clone(&shared))));
        }
        if shared.config.hydrate {
            tasks.push(tokio::spawn(read::hydrate(Arc::clone(&shared), stop_rx)));
        }
        Ok(ObjectVolume {
            shared,
            stop,
            tasks: Mutex::new(tasks),
        })
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

/// How long after the open the block map's download starts.
const MAP_HYDRATION_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// Restores the block map into a local file in the background (docs/ARCHITECTURE.md §4): until
/// then, lookups that miss the page cache are ranged GETs; after, they are local reads.
async fn hydrate_map(shared: Arc<Shared>) {
    let MapRole::Writer(writer) = &shared.map else {
        return;
    };
    // The first reads after a boot look their blocks up with ranged GETs of map pages; the
    // download of the whole map (tens of MB for a full 100 GiB volume) would share the store
    // and the link with them, so it waits until those first reads are done.
    tokio::time::sleep(MAP_HYDRATION_DELAY).await;
    let path = shared.config.local_dir.join("blockmap.db");
    let started = std::time::Instant::now();
    match upload::boxed(writer.hydrate(&path)).await {
        Ok(()) => {
            tracing::info!(
                volume = %shared.meta.name,
                seconds = started.elapsed().as_secs_f64(),
                "block map hydrated"
            );
            let s = Arc::clone(&shared);
            if let Err(e) = blocking(move || warm_locations(&s)).await {
                tracing::debug!(volume = %shared.meta.name, "lookup warm-up stopped: {e}");
            }
        }
        Err(e) => tracing::warn!(
            volume = %shared.meta.name,
            "block map hydration failed, lookups stay remote: {e}"
        ),
    }
}

/// Loads where the blocks already in the local cache live (one indexed query per cached
/// chunk), so that after a restart the first read of a cached block is as cheap as the next
/// instead of a SQLite query on a blocking thread. Stops as soon as the map changes.
fn warm_locations(shared: &Shared) -> io::Result<()> {
    let generation = shared.locations.generation();
    let mut warmed = 0usize;
    for chunk in shared.cache.cached_chunks() {
        let rows = lock(&shared.lookups)
            .blocks_in_chunk(chunk)
            .map_err(|e| other("block map", e))?;
        let cached: Vec<(u64, BlockLocation)> = rows
            .into_iter()
            .filter(|(_, loc)| shared.cache.contains(CacheKey::of(loc)))
            .collect();
        if !shared.locations.fill_rows(generation, &cached) {
            break;
        }
        warmed += cached.len();
    }
    tracing::debug!(volume = %shared.meta.name, blocks = warmed, "lookups warmed from the cache");
    Ok(())
}

/// The blocks a boot reads first: block 0 (boot sector, partition table, superblock). (The
/// last block, which a GPT partition scan reads next, is not worth it: its lookup path shares
/// no page with block 0's below the root, so it would add round trips to every open.)
const FIRST_LOOKUPS: [u64; 1] = [0];

/// A sender for the map's open to say where block 0 is, and a task that starts block 0's GET
/// as soon as it does (while the claim is in flight): a boot's first read is block 0, and its
/// GET then overlaps the open's last round trip instead of following it. The task ends with
/// the fetch to adopt, or `None` when block 0 is not stored (never written, or a new map).
fn early_first_reads(
    store: &Arc<dyn ObjectStore>,
    root: &Path,
    block_size: u32,
) -> (
    FirstLocated,
    tokio::task::JoinHandle<Option<fetch::EarlyFetch>>,
) {
    let (tell, located) = tokio::sync::oneshot::channel::<Vec<(u64, Option<BlockLocation>)>>();
    let chunks = ChunkStore::new(Arc::clone(store), root, block_size);
    let task = tokio::spawn(async move {
        let found = located.await.ok()?;
        let location = found.into_iter().find(|(block, _)| *block == 0)?.1?;
        let span = tokio::spawn(async move { chunks.read_span(&[location]).await });
        Some(fetch::EarlyFetch { location, span })
    });
    (tell, task)
}

/// Full disk → ENOSPC; everything else is an I/O error.
fn device_error(e: io::Error) -> DeviceError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => DeviceError::NoSpace(e.to_string()),
        _ => DeviceError::Io(e),
    }
}

/// Opens the lookup connection and, for a writer, the update connection.
fn open_maps(name: &str, connections: MapConnections) -> io::Result<(BlockMap, Option<BlockMap>)> {
    let sql = |e: rusqlite::Error| other("opening the block map", e);
    let map = |e: blockmap::Error| other("opening the block map", e);
    match connections {
        MapConnections::LookupAndUpdate => {
            let conn = blockmap::vfs::ffi::open_connection(name).map_err(sql)?;
            conn.busy_timeout(Duration::from_secs(60)).map_err(sql)?;
            // The uploader's transactions touch many pages; keep them in memory until commit.
            conn.pragma_update(None, "cache_size", -32768)
                .map_err(sql)?;
            let updates = BlockMap::new(conn).map_err(map)?;
            let conn = blockmap::vfs::ffi::open_connection(name).map_err(sql)?;
            conn.busy_timeout(Duration::from_secs(60)).map_err(sql)?;
            Ok((BlockMap::new(conn).map_err(map)?, Some(updates)))
        }
        MapConnections::LookupOnly => {
            let conn = blockmap::vfs::ffi::open_connection(name).map_err(sql)?;
            conn.busy_timeout(Duration::from_secs(60)).map_err(sql)?;
            conn.pragma_update(None, "query_only", true).map_err(sql)?;
            Ok((BlockMap::open_read_only(conn).map_err(map)?, None))
        }
        MapConnections::InMemory => Ok((BlockMap::in_memory().map_err(map)?, None)),
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

#[async_trait]
impl BlockDevice for ObjectVolume {
    fn size(&self) -> u64 {
        self.shared.meta.size
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
            .map_err(DeviceError::Io)
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
        let seq = self.shared.journaled_through();
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
            .map_err(DeviceError::Io)
    }

    async fn cache(&self, offset: u64, length: u64) -> DeviceResult<()> {
        self.check(offset, length)?;
        read::prefetch(&self.shared, offset, length)
            .await
            .map_err(DeviceError::Io)
    }

    async fn metrics(&self) -> Vec<DeviceMetric> {
        let stats = match self.stats().await {
            Ok(stats) => stats,
            Err(e) => {
                tracing::warn!(volume = %self.shared.meta.name, "cannot read volume stats: {e}");
                return Vec::new();
            }
        };
        let block_size = self.shared.meta.block_size as f64;
        let store = self.shared.store_counts.counts();
        let metric = |name, kind, help, value: f64| DeviceMetric {
            name,
            help,
            kind,
            value,
        };
        use MetricKind::{Counter, Gauge};
        let mut metrics = vec![
            metric(
                "bucketdisk_volume_size_bytes",
                Gauge,
                "Size of the virtual disk.",
                self.shared.meta.size as f64,
            ),
            metric(
                "bucketdisk_allocated_bytes",
                Gauge,
                "Bytes of blocks in use (stored in chunks), uncompressed.",
                stats.allocated_blocks as f64 * block_size,
            ),
            metric(
                "bucketdisk_stored_bytes",
                Gauge,
                "Bytes the blocks in use take in object storage (compressed).",
                stats.allocated_stored_bytes as f64,
            ),
            metric(
                "bucketdisk_chunks",
                Gauge,
                "Chunk objects the block map knows.",
                stats.chunks as f64,
            ),
            metric(
                "bucketdisk_map_txid",
                Gauge,
                "Latest block-map transaction ID.",
                stats.map_txid as f64,
            ),
            metric(
                "bucketdisk_journal_bytes",
                Gauge,
                "Bytes of records in the local journal.",
                stats.journal_bytes as f64,
            ),
            metric(
                "bucketdisk_dirty_bytes",
                Gauge,
                "Written bytes waiting for upload (writes wait beyond --journal-limit).",
                stats.dirty_bytes as f64,
            ),
            metric(
                "bucketdisk_upload_lag_records",
                Gauge,
                "Journal records written but not yet in object storage.",
                stats
                    .journal_next_seq
                    .saturating_sub(1)
                    .saturating_sub(stats.uploaded_seq) as f64,
            ),
            metric(
                "bucketdisk_cached_bytes",
                Gauge,
                "Bytes of blocks in the local cache.",
                stats.cached_blocks as f64 * block_size,
            ),
            metric(
                "bucketdisk_cache_hits_total",
                Counter,
                "Block pieces of reads answered from the local cache.",
                self.shared.counters.cache_hits.load(Ordering::Relaxed) as f64,
            ),
            metric(
                "bucketdisk_store_block_fetches_total",
                Counter,
                "Blocks fetched from object storage (cache misses, readahead, hydration).",
                self.shared.counters.store_fetches.load(Ordering::Relaxed) as f64,
            ),
            metric(
                "bucketdisk_store_block_gets_total",
                Counter,
                "Ranged GETs of blocks (neighbouring blocks of one chunk come in one).",
                self.shared.counters.store_gets.load(Ordering::Relaxed) as f64,
            ),
            metric(
                "bucketdisk_readahead_cancelled_blocks_total",
                Counter,
                "Blocks readahead planned and dropped because their reader moved elsewhere.",
                self.shared
                    .counters
                    .readahead_cancelled
                    .load(Ordering::Relaxed) as f64,
            ),
            metric(
                "bucketdisk_store_get_requests_total",
                Counter,
                "GET requests to object storage.",
                store.get_requests as f64,
            ),
            metric(
                "bucketdisk_store_put_requests_total",
                Counter,
                "PUT requests to object storage.",
                store.put_requests as f64,
            ),
            metric(
                "bucketdisk_store_list_requests_total",
                Counter,
                "LIST requests to object storage.",
                store.list_requests as f64,
            ),
            metric(
                "bucketdisk_store_delete_requests_total",
                Counter,
                "Objects deleted from object storage.",
                store.delete_requests as f64,
            ),
            metric(
                "bucketdisk_store_read_bytes_total",
                Counter,
                "Bytes received from object storage.",
                store.bytes_read as f64,
            ),
            metric(
                "bucketdisk_store_written_bytes_total",
                Counter,
                "Bytes sent to object storage.",
                store.bytes_written as f64,
            ),
            metric(
                "bucketdisk_uploads_total",
                Counter,
                "Uploads committed (chunks PUT, one block-map transaction each).",
                stats.uploads as f64,
            ),
            metric(
                "bucketdisk_upload_journal_bytes_total",
                Counter,
                "Written bytes the uploads stored (its rate is the upload throughput).",
                stats.uploaded_journal_bytes as f64,
            ),
            metric(
                "bucketdisk_upload_blocks_total",
                Counter,
                "Blocks the uploads stored (rewrites of a block between uploads count once).",
                stats.uploaded_blocks as f64,
            ),
            metric(
                "bucketdisk_upload_chunk_bytes_total",
                Counter,
                "Bytes of chunks the uploads PUT (compressed).",
                stats.uploaded_chunk_bytes as f64,
            ),
            metric(
                "bucketdisk_upload_lag_seconds",
                Gauge,
                "How long the oldest write not yet in object storage has waited.",
                self.shared.health.lag_millis.load(Ordering::Relaxed) as f64 / 1000.0,
            ),
            metric(
                "bucketdisk_upload_lag_allowed_seconds",
                Gauge,
                "How far the store may lag now (--max-upload-lag under overwrite-heavy load, else --sync-interval).",
                self.shared
                    .health
                    .allowed_lag_millis
                    .load(Ordering::Relaxed) as f64
                    / 1000.0,
            ),
            metric(
                "bucketdisk_write_wait_seconds_total",
                Counter,
                "Time writers spent waiting for room in the journal (back-pressure).",
                self.shared.health.wait_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            ),
            metric(
                "bucketdisk_write_waits_total",
                Counter,
                "Writes that waited for room in the journal.",
                self.shared.health.waits.load(Ordering::Relaxed) as f64,
            ),
            metric(
                "bucketdisk_chunk_bytes",
                Gauge,
                "Bytes of all chunks in object storage, dead ones awaiting deletion included.",
                stats.chunk_bytes as f64,
            ),
            metric(
                "bucketdisk_chunks_rewritten_total",
                Counter,
                "Sparse chunks whose live blocks garbage collection moved.",
                stats.chunks_rewritten as f64,
            ),
            metric(
                "bucketdisk_chunks_deleted_total",
                Counter,
                "Dead chunks garbage collection deleted.",
                stats.chunks_deleted as f64,
            ),
        ];
        if self.shared.config.hydrate {
            let total = self
                .shared
                .meta
                .size
                .div_ceil(self.shared.meta.block_size as u64);
            let scanned = self
                .shared
                .counters
                .hydration_scanned
                .load(Ordering::Relaxed);
            metrics.push(metric(
                "bucketdisk_hydration_progress_ratio",
                Gauge,
                "Fraction of the disk --hydrate has pulled into the cache (1: done).",
                scanned as f64 / total.max(1) as f64,
            ));
        }
        metrics
    }

    async fn close(&self) -> DeviceResult<()> {
        let writable = !self.shared.config.read_only;
        if writable {
            self.flush().await?;
        }
        let _ = self.stop.send(true);
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *lock(&self.tasks));
        for task in tasks {
            let _ = task.await;
        }
        if writable && lock(&self.shared.failure).is_none() {
            // Store everything, so the next start (anywhere) needs nothing local.
            upload::upload_all(&self.shared)
                .await
                .map_err(DeviceError::Io)?;
            // Stored either way; a failed tidy only makes the next open read more files.
            if let Err(e) = upload::tidy(&self.shared).await {
                tracing::warn!(volume = %self.shared.meta.name, "block map tidy at close failed: {e}");
            }
        }
        let shared = Arc::clone(&self.shared);
        blocking(move || shared.cache.save_index())
            .await
            .map_err(DeviceError::Io)?;
        Ok(())
    }
}
