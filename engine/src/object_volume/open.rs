//! Opening a volume (docs/ARCHITECTURE.md §5, §6): volume.json, the map's listing, its open
//! hint and the lease's epoch in one round trip; the map taken (lease, state, claim) while the
//! local folder is made ready and block 0 is fetched; SQLite opened on the map; the local journal
//! replayed; the cache opened; the background tasks started (uploader, map hydration, disk
//! hydration).

use super::chunk_writer::ChunkIds;
use super::helpers::{blocking, other};
use super::journal_claim::{self, JournalClaim};
use super::map_access::{MapAccess, MapRole};
use super::read::ReadState;
use super::restore::RestoredMap;
use super::upload_progress::UploadProgress;
use super::write_log::WriteLog;
use super::{
    META_JOURNAL_OWNER, META_JOURNAL_SEQ, ObjectVolume, Shared, VolumeConfig, VolumeStats, catalog,
    fetch, gc, lines, local_state, read, upload,
};
use crate::chunk_store::{ChunkStore, StoredBlock};
use crate::journal::{Journal, Record};
use crate::metadata::VolumeMetadata;
use crate::overlay::Overlay;
use crate::sealing::{BlockSealer, VolumeKey};
use crate::shared_cache::CacheHandle;
use blockmap::RestoreTarget;
use blockmap::lease;
use blockmap::open_hint::OpenHint;
use blockmap::replica::{Layout, Replica, ReplicaFile};
use blockmap::vfs::follower::Follower;
use blockmap::writer::{FirstLocated, MapWriter, OpenAhead};
use blockmap::{BlockLocation, BlockMap};
use bytes::Bytes;
use object_store::ObjectStore;
use object_store::path::Path;
use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stores::counting::CountingStore;
use stores::low_priority::LowPriorityThreads;
use tokio::sync::watch;

/// Opens volume `name` (see [`ObjectVolume::open`]).
pub(super) async fn open(
    store: Arc<dyn ObjectStore>,
    prefix: &Path,
    layout: Layout,
    name: &str,
    config: VolumeConfig,
) -> io::Result<ObjectVolume> {
    // Every request this volume makes is counted, for the metrics endpoint.
    let counted = Arc::new(CountingStore::new(store));
    open_with(counted, prefix, layout, name, config, None).await
}

/// Opens a volume just restored, adopting the map its restore took (see
/// [`super::restore::RestoredMap`]): no store request before the volume serves.
pub(super) async fn open_restored(
    prefix: &Path,
    layout: Layout,
    config: VolumeConfig,
    restored: RestoredMap,
) -> io::Result<ObjectVolume> {
    if config.read_only {
        // A follower has no use for the writer: give the lease back rather than leak it.
        let released = restored.writer.release_lease().await;
        let _ = restored.writer.close().await;
        released.map_err(|e| other("releasing the writer lease", e))?;
        return Err(crate::DeviceError::ReadOnly.into_io());
    }
    let counted = Arc::clone(&restored.counted);
    let name = restored.meta.name.clone();
    open_with(counted, prefix, layout, &name, config, Some(restored)).await
}

async fn open_with(
    counted: Arc<CountingStore>,
    prefix: &Path,
    layout: Layout,
    name: &str,
    config: VolumeConfig,
    adopted: Option<RestoredMap>,
) -> io::Result<ObjectVolume> {
    let opening = std::time::Instant::now();
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
    let (located, adopted_writer, adopted_db) = match adopted {
        Some(a) => {
            let located = Located {
                meta: a.meta,
                line: Some(a.line),
                listing: a.replica.base().to_vec(),
                replica: a.replica,
                hint: None,
                lease_epoch: None,
            };
            (located, Some(a.writer), Some(a.db_name))
        }
        None => (
            locate(&store, prefix, layout, name, &config).await?,
            None,
            None,
        ),
    };
    let Located {
        meta,
        line,
        replica,
        listing,
        hint,
        lease_epoch,
    } = located;
    // A wrong or missing key is told now, before anything is read or written.
    let sealer = sealer_for(&meta, config.key.as_deref())?;
    phase("volume.json read, block map listed");
    let dir = config.local_dir.clone();
    let uuid = meta.uuid.clone();
    let (shared_cache, cache_bytes) = (config.shared_cache_dir.clone(), config.cache_bytes);
    let block_size = meta.block_size;
    let (cache_opened, cache_for_early) = tokio::sync::oneshot::channel();
    // The local folder and the cache are made ready while the map opens (a dozen ms of
    // directory work beside round trips to the store).
    let local = blocking(move || {
        let instance = local_state::prepare(&dir, &uuid)?;
        let cache = Arc::new(CacheHandle::open(
            shared_cache.as_deref(),
            &local_state::cache_dir(&dir),
            block_size,
            cache_bytes,
        )?);
        let _ = cache_opened.send(Arc::clone(&cache));
        Ok((instance, cache))
    });
    // One VFS database per volume and process (and per checkpoint served).
    let line_number = line.as_ref().map_or(0, |l| l.line);
    let db_name = match (&config.checkpoint, adopted_db) {
        (_, Some(adopted)) => adopted,
        (None, None) => format!("{root}#{}#{line_number}", meta.uuid),
        (Some(checkpoint), None) => format!(
            "{root}#{}@{}@{}",
            meta.uuid, checkpoint.name, checkpoint.txid
        ),
    };
    let at_txid = config.checkpoint.as_ref().map(|c| c.txid);
    let runtime = tokio::runtime::Handle::current();
    let (first_located, early_fetch) = early_first_reads(
        chunk_store(&store, prefix, &meta, sealer.clone()),
        cache_for_early,
    );
    let map = async {
        if config.read_only {
            // Nothing stored yet (or a checkpoint of a volume that had nothing).
            if listing.is_empty() || at_txid == Some(0) {
                return Ok(MapRole::Empty);
            }
            let target = match at_txid {
                Some(txid) => RestoreTarget::Txid(txid),
                None => RestoreTarget::Latest,
            };
            Follower::open_at(Arc::clone(&replica), &db_name, runtime, target)
                .await
                .map(MapRole::Follower)
                .map_err(|e| other("opening the block map", e))
        } else if let Some(writer) = adopted_writer {
            Ok(MapRole::Writer(Box::new(writer)))
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
            .map(|w| MapRole::Writer(Box::new(w)))
            .map_err(|e| other("taking the volume", e))
        }
    };
    let (local, map) = tokio::join!(local, map);
    let ((instance, cache), map) = (local?, map?);
    // Found while the claim was in flight (or never, for a new or read-only map).
    let early_fetch = early_fetch.await.ok().flatten();
    phase("block map opened (lease, listing, files, claim)");
    let chunk_epoch = match &map {
        MapRole::Writer(w) => {
            w.set_restore_window(config.restore_window);
            // Map files checkpoints pin are not known until they are listed (by the uploader,
            // in the background): retention waits for that.
            w.hold_deletions();
            w.lease().epoch
        }
        _ => 0,
    };
    let (lookups, updates, uploaded_seq, owner, resized) = {
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
            // A resized volume's size is the map's (volume.json keeps the size at creation).
            let resized = super::recorded_size(&lookups).map_err(read)?;
            Ok((lookups, updates, seq, owner, resized))
        })
        .await?
    };

    phase("SQLite opened");
    // A restored volume whose new line has no owner of its own yet replays no journal.
    let owner = match &line {
        Some(line) => line.effective_owner(owner),
        None => owner,
    };
    let (owner_at_open, claim_instance) = (owner.clone(), instance.clone());
    // Replay the journal on top of what the map holds.
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
    let background = LowPriorityThreads::start(&format!("upload-{name}"), 1)?;
    let size = resized.unwrap_or(meta.size);
    let total_blocks = size.div_ceil(u64::from(block_size));
    let shared = Arc::new(Shared {
        chunks: chunk_store(&store, prefix, &meta, sealer),
        store: Arc::clone(&store),
        prefix: prefix.clone(),
        size: AtomicU64::new(size),
        meta,
        instance,
        log: WriteLog::new(journal, overlay),
        map: MapAccess::new(map, lookups, updates),
        chunk_ids: ChunkIds::new(chunk_epoch),
        cache,
        reads: ReadState::new(
            u64::from(block_size),
            total_blocks,
            // Blocks fetched ahead must still be cached when the reader gets there.
            config.readahead_bytes.min(config.cache_bytes / 4),
            config.prefetch_gets,
        ),
        uploads: UploadProgress::new(uploaded_seq, config.stall_timeout),
        background,
        maintenance: tokio::sync::Mutex::new(gc::Collector::default()),
        journal_claim: JournalClaim::new(
            if config.read_only {
                None
            } else {
                owner_at_open.as_deref()
            },
            &claim_instance,
        ),
        stats: Mutex::new(VolumeStats::default()),
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
    if shared.journal_claim.pending() {
        tasks.push(tokio::spawn(journal_claim::record(Arc::clone(&shared))));
    }
    if let Some(early) = early_fetch {
        fetch::adopt_early(&shared, early);
    }
    if shared.map.writer().is_some() {
        tasks.push(tokio::spawn(hydrate_map(
            Arc::clone(&shared),
            stop_rx.clone(),
        )));
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

/// How long after the open the block map's download starts.
const MAP_HYDRATION_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// Restores the block map into a local file in the background (docs/ARCHITECTURE.md §4): until
/// then, lookups that miss the page cache are ranged GETs; after, they are local reads.
async fn hydrate_map(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let Some(writer) = shared.map.writer() else {
        return;
    };
    // The first reads after a boot look their blocks up with ranged GETs of map pages; the
    // download of the whole map (tens of MB for a full 100 GiB volume) would share the store
    // and the link with them, so it waits until those first reads are done. A volume closed
    // before then (opened for a verb) never downloads it.
    tokio::select! {
        _ = tokio::time::sleep(MAP_HYDRATION_DELAY) => {}
        _ = stop.changed() => return,
    }
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

/// What an open reads before anything else: volume.json, the current map line, the replica to
/// open (the line's, or a checkpoint's files) and its listing, and for a writer the map's open
/// hint and the lease's newest epoch.
struct Located {
    meta: VolumeMetadata,
    line: Option<lines::MapLine>,
    replica: Arc<Replica>,
    listing: Vec<ReplicaFile>,
    hint: Option<OpenHint>,
    lease_epoch: Option<u64>,
}

/// Reads [`Located`] in as few round trips as it can.
async fn locate(
    store: &Arc<dyn ObjectStore>,
    prefix: &Path,
    layout: Layout,
    name: &str,
    config: &VolumeConfig,
) -> io::Result<Located> {
    let root = catalog::volume_root(prefix, name);
    // Line 0's replica; a restored volume's map is a later line (see `lines`), found in the
    // same round trip.
    let replica = Arc::new(lines::replica(store, &root, layout, None)?);
    // volume.json and the map's listing are both needed before anything else and neither
    // depends on the other: one round trip for the two; and for a writer (a follower uses
    // neither) the map's open hint and the lease's epoch too: every request of an open
    // that depends on nothing else goes in this round trip. (Opening a volume that turns
    // out not to exist costs these read-only requests.)
    let writer = !config.read_only;
    let (meta, line, listing, hint, lease_epoch) = tokio::join!(
        catalog::load(store.as_ref(), prefix, name),
        lines::current(store.as_ref(), &root),
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
    let meta = catalog::require(meta?, name)?;
    let line = line?;
    let (replica, listing, hint) = match (&config.checkpoint, &line) {
        (Some(checkpoint), _) => {
            // A checkpoint's state: the files it records, whichever line holds them (the
            // current line may have been restored from another checkpoint since).
            let replica = Arc::new(lines::checkpoint_replica(store, &root, layout, checkpoint)?);
            let listing = replica.list().await;
            (replica, listing, None)
        }
        (None, None) => (replica, listing, hint),
        (None, Some(line)) => {
            // A restored volume: its line's replica, one round trip more.
            let replica = Arc::new(lines::replica(store, &root, layout, Some(line))?);
            let (listing, hint) = tokio::join!(replica.list(), async {
                match writer {
                    true => blockmap::open_hint::load(&replica).await,
                    false => None,
                }
            });
            (replica, listing, hint)
        }
    };
    let listing = listing.map_err(|e| other("listing the block map", e))?;
    Ok(Located {
        meta,
        line,
        replica,
        listing,
        hint,
        lease_epoch,
    })
}

/// Loads where the blocks already in the local cache live (one indexed query per cached
/// chunk), so that after a restart the first read of a cached block is as cheap as the next
/// instead of a SQLite query on a blocking thread. Stops as soon as the map changes.
fn warm_locations(shared: &Shared) -> io::Result<()> {
    let generation = shared.map.locations.generation();
    let mut warmed = 0usize;
    let ours = shared
        .cache
        .cached_chunks()
        .into_iter()
        .filter(|&(owner, chunk)| shared.chunks.owner_of(chunk) == owner);
    for (_, chunk) in ours {
        let rows = shared
            .map
            .lookups()
            .blocks_in_chunk(chunk)
            .map_err(|e| other("block map", e))?;
        let cached: Vec<(u64, BlockLocation)> = rows
            .into_iter()
            .filter(|&(block, location)| {
                let stored = StoredBlock { block, location };
                shared.cache.contains(shared.chunks.cache_key(&stored))
            })
            .collect();
        if !shared.map.locations.fill_rows(generation, &cached) {
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
/// the fetch to adopt, or `None` when block 0 is not stored (never written, or a new map) or
/// is in the cache.
fn early_first_reads(
    chunks: ChunkStore,
    cache: tokio::sync::oneshot::Receiver<Arc<CacheHandle>>,
) -> (
    FirstLocated,
    tokio::task::JoinHandle<Option<fetch::EarlyFetch>>,
) {
    let (tell, located) = tokio::sync::oneshot::channel::<Vec<(u64, Option<BlockLocation>)>>();
    let task = tokio::spawn(async move {
        let found = located.await.ok()?;
        let location = found.into_iter().find(|(block, _)| *block == 0)?.1?;
        let block = StoredBlock { block: 0, location };
        // Not when the block is cached already (a restart, or a clone on its source's host).
        // The cache is open by now unless its index is large, and then block 0 is likely in
        // it: waiting for it beats a GET that may be wasted (measured: no cost on a boot).
        if let Ok(cache) = cache.await
            && cache.contains(chunks.cache_key(&block))
        {
            return None;
        }
        let span = tokio::spawn(async move { chunks.read_span(&[block]).await });
        Some(fetch::EarlyFetch { block, span })
    });
    (tell, task)
}

/// The sealer of an encrypted volume's blocks (`None` for a plain one); an error if `key` is
/// not the volume's. A key given for a plain volume is not used.
pub(super) fn sealer_for(
    meta: &VolumeMetadata,
    key: Option<&VolumeKey>,
) -> io::Result<Option<Arc<BlockSealer>>> {
    let Some(encryption) = &meta.encryption else {
        if key.is_some() {
            tracing::warn!(
                volume = %meta.name,
                "the volume is not encrypted: the key given is not used, its blocks are stored \
                 in clear (create --encrypt makes an encrypted volume)"
            );
        }
        return Ok(None);
    };
    let sealer = encryption
        .sealer(&meta.name, key)
        .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e))?;
    Ok(Some(Arc::new(sealer)))
}

/// The volume's chunks; a clone's inherited ones read from its ancestors (see `clone`).
pub(super) fn chunk_store(
    store: &Arc<dyn ObjectStore>,
    prefix: &Path,
    meta: &VolumeMetadata,
    sealer: Option<Arc<BlockSealer>>,
) -> ChunkStore {
    let root = catalog::volume_root(prefix, &meta.name);
    ChunkStore::new(Arc::clone(store), &root, meta.block_size)
        .owned_by(meta.owner_tag(root.as_ref()))
        .inheriting(
            meta.inherits
                .iter()
                .map(|i| {
                    let root = catalog::volume_root(prefix, &i.volume);
                    let owner = i.owner_tag(root.as_ref());
                    (root, i.through_epoch, owner)
                })
                .collect(),
        )
        .sealed_by(sealer)
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
