//! The writer side of a replicated block map: take the lease, open the map from its replica
//! (or start a new one), claim the next TXID so no older writer can publish again, and sync
//! committed transactions to the replica.

use crate::BlockLocation;
use crate::lease::{self, Lease, LeaseError};
use crate::open_hint::OpenHint;
use crate::replica::{Replica, ReplicaError, ReplicaFile};
use crate::vfs::ffi::{attach, detach, open_connection};
use crate::vfs::remote::{RemoteSource, sync_once};
use crate::vfs::state::{DatabaseState, PageSource};
use ltx::RestoreTarget;
use ltx::naming::SNAPSHOT_LEVEL;
use object_store::ObjectStore;
use object_store::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::runtime::Handle;

/// How long after an open the open hint it found lacking is rewritten.
const HINT_WRITE_DELAY: Duration = Duration::from_secs(2);
/// Page size of new block maps.
pub const PAGE_SIZE: u32 = 4096;
/// [`MapWriter::tidy`] takes a snapshot once this many level-1 files follow the latest one.
pub const TIDY_SNAPSHOT_AFTER: usize = 8;
/// [`MapWriter::fold`] folds a level's files into one file of the next level once this many
/// follow the next level's newest file (or the snapshot).
pub const FOLD_AFTER: usize = 3;
/// The highest level [`MapWriter::fold`] writes.
pub const FOLD_TOP_LEVEL: u8 = 4;

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("block map state: {0}")]
    Io(#[from] std::io::Error),
}

pub struct MapWriter {
    name: String,
    state: Arc<DatabaseState>,
    replica: Arc<Replica>,
    store: Arc<dyn ObjectStore>,
    lease_root: Path,
    lease: Lease,
    /// The TXID the base was opened at (`None` for a new database): hydration restores it.
    base_txid: Option<u64>,
    /// Reads no longer depend on the replica files present at open, so retention may delete
    /// them (until then, the open page map points into them).
    independent_of_open_files: AtomicBool,
    /// The files the open read its state from: until hydration, retention keeps them.
    open_files: Vec<Path>,
    /// States committed this recently stay restorable: retention keeps their files.
    restore_window_ms: AtomicU64,
    /// Held by [`MapWriter::maintain`] and [`MapWriter::tidy`], which may run from different
    /// tasks: two compactions of the same level at once would publish the same file twice.
    compacting: tokio::sync::Mutex<()>,
    /// The pages this writer's open and first lookups read: the open hint written with each
    /// new snapshot holds their frames.
    boot_pages: std::sync::Mutex<Vec<u32>>,
    /// Files retention must keep because a pinned state (a checkpoint) is restored from them;
    /// `None` while the owner has not said yet, and then retention deletes nothing.
    pinned: std::sync::Mutex<Option<Vec<Path>>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Where the map says the first lookups' blocks are (`None`: not stored), for
/// [`OpenAhead::first_located`].
pub type FirstLocated = tokio::sync::oneshot::Sender<Vec<(u64, Option<BlockLocation>)>>;

/// What a caller of [`MapWriter::open_ahead`] knows before the open starts.
#[derive(Debug, Default)]
pub struct OpenAhead {
    /// The replica's listing, made while the caller fetched something else.
    pub listing: Option<Vec<ReplicaFile>>,
    /// The replica's open hint, fetched beside the listing ([`crate::open_hint::load`]).
    pub hint: Option<OpenHint>,
    /// The highest lease epoch, listed beside the listing ([`lease::current_epoch`]).
    pub lease_epoch: Option<u64>,
    /// Blocks the first reads will look up (a boot reads block 0 first, a partition scan the
    /// last block too): the map pages on their paths are fetched while the lease and the
    /// claim are in flight, so those reads find them in memory.
    pub first_lookups: Vec<u64>,
    /// Told where the first lookups' blocks are as soon as that is known (before the claim
    /// lands), so the caller can start reading them.
    pub first_located: Option<FirstLocated>,
}

/// A state attached to the VFS: the state, the TXID of its base, the files the base reads
/// from, and the base's page source (`None` for a new database).
type OpenedState = (
    Arc<DatabaseState>,
    Option<u64>,
    Vec<Path>,
    Option<Arc<RemoteSource>>,
);

/// Looks `blocks` up in database `name` on a connection of its own, which fetches the pages on
/// their paths into the state's shared page cache. Only a head start: a failure is logged, and
/// the lookup is made again when the block is read.
async fn look_up_first(name: &str, blocks: Option<&[u64]>) -> Vec<(u64, Option<BlockLocation>)> {
    let Some(blocks) = blocks.filter(|b| !b.is_empty()) else {
        return Vec::new();
    };
    let started = std::time::Instant::now();
    let (db, wanted) = (name.to_string(), blocks.to_vec());
    let looked_up = tokio::task::spawn_blocking(move || -> crate::Result<Vec<_>> {
        let map = crate::BlockMap::open_read_only(open_connection(&db)?)?;
        wanted
            .into_iter()
            .map(|block| Ok((block, map.get(block)?)))
            .collect()
    })
    .await;
    match looked_up {
        Ok(Ok(found)) => {
            tracing::debug!(
                ms = started.elapsed().as_millis() as u64,
                blocks = blocks.len(),
                "map open: first lookups' pages fetched"
            );
            found
        }
        Ok(Err(e)) => {
            tracing::debug!("map open: first lookups failed: {e}");
            Vec::new()
        }
        Err(e) => {
            tracing::debug!("map open: first lookups' task failed: {e}");
            Vec::new()
        }
    }
}

/// Publishes page 1 unchanged as the next TXID, so that a previous writer's next upload
/// collides (nothing to claim in an empty database: the first upload then races for TXID 1 and
/// create-only settles it).
async fn claim_next_txid(state: &Arc<DatabaseState>, replica: &Replica) -> Result<(), WriterError> {
    if state.file_size() == 0 {
        return Ok(());
    }
    let rewrite = {
        let state = Arc::clone(state);
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut page = vec![0u8; state.page_size() as usize];
            state.read(0, &mut page)?;
            state.write(0, &page)?;
            state.commit();
            Ok(())
        })
    };
    rewrite
        .await
        .map_err(|e| std::io::Error::other(format!("claim task failed: {e}")))??;
    sync_once(state, replica, now_ms()).await?;
    Ok(())
}

impl MapWriter {
    /// Takes the lease under `lease_root`, opens the replica's latest state through the VFS as
    /// database `name`, and claims the next TXID with a no-op transaction so a previous writer's
    /// next upload collides and fails.
    pub async fn open(
        store: Arc<dyn ObjectStore>,
        replica: Arc<Replica>,
        lease_root: Path,
        name: &str,
        holder: &str,
        runtime: Handle,
    ) -> Result<Self, WriterError> {
        let ahead = OpenAhead::default();
        Self::open_ahead(store, replica, lease_root, name, holder, runtime, ahead).await
    }

    /// [`MapWriter::open`] with what the caller knows ahead (see [`OpenAhead`]): each item saves
    /// a boot a round trip.
    pub async fn open_ahead(
        store: Arc<dyn ObjectStore>,
        replica: Arc<Replica>,
        lease_root: Path,
        name: &str,
        holder: &str,
        runtime: Handle,
        ahead: OpenAhead,
    ) -> Result<Self, WriterError> {
        let started = std::time::Instant::now();
        let ms = |t: std::time::Instant| t.elapsed().as_millis() as u64;
        // The lease is taken while the map's latest state is read and the next TXID claimed
        // (each a round trip or two). Reading the map before the lease is safe because of the
        // claim: a writer we replace that publishes after our listing takes the TXID we claim,
        // the claim collides, and the state is read again. Claiming before the lease lands is
        // safe because taking the lease never waits for or yields to a holder (it takes the
        // next epoch): the claim only fences a writer this open replaces, and is a no-op
        // transaction (page 1 unchanged) should the lease fail after all. Nothing is served
        // before both land; the first lookups made meanwhile only fetch pages.
        let OpenAhead {
            listing,
            hint,
            lease_epoch,
            first_lookups,
            first_located,
        } = ahead;
        let (lease, claimed) = tokio::join!(
            lease::acquire_after(&store, &lease_root, holder, lease_epoch),
            Self::claim_latest(
                &replica,
                &runtime,
                name,
                listing,
                hint.as_ref(),
                &first_lookups,
                first_located
            )
        );
        let (lease, (state, base_txid, open_files, source)) = match (lease, claimed) {
            (Ok(lease), Ok(claimed)) => (lease, claimed),
            (Err(e), _) => {
                detach(name);
                return Err(e.into());
            }
            (_, Err(e)) => {
                detach(name);
                return Err(e);
            }
        };
        tracing::debug!(
            ms = ms(started),
            epoch = lease.epoch,
            "map open: lease taken, next TXID claimed"
        );
        let writer = MapWriter {
            name: name.to_string(),
            state,
            replica: Arc::clone(&replica),
            store: Arc::clone(&store),
            lease_root: lease_root.clone(),
            lease,
            independent_of_open_files: AtomicBool::new(base_txid.is_none()),
            open_files,
            pinned: std::sync::Mutex::new(Some(Vec::new())),
            base_txid,
            restore_window_ms: AtomicU64::new(0),
            compacting: tokio::sync::Mutex::new(()),
            boot_pages: std::sync::Mutex::new(Vec::new()),
        };
        if let Some(source) = source {
            writer.keep_boot_pages(&source, hint.as_ref(), &runtime);
        }
        Ok(writer)
    }

    /// Attaches the replica's latest state as `name` and claims the next TXID; a writer that
    /// published meanwhile makes the claim collide, and the state is read again (three times
    /// at most). The first lookups' pages are fetched while the claim is in flight.
    async fn claim_latest(
        replica: &Arc<Replica>,
        runtime: &Handle,
        name: &str,
        mut listing: Option<Vec<ReplicaFile>>,
        hint: Option<&OpenHint>,
        first_lookups: &[u64],
        mut first_located: Option<FirstLocated>,
    ) -> Result<OpenedState, WriterError> {
        let mut attempts = 0;
        loop {
            let opened = Self::attach_latest(replica, runtime, name, listing.take(), hint).await?;
            let lookups = opened.3.is_some().then_some(first_lookups);
            let (claimed, ()) = tokio::join!(claim_next_txid(&opened.0, replica), async {
                let found = look_up_first(name, lookups).await;
                // Said once, for the first state read: should the claim collide, the blocks
                // may have moved, and the caller's early reads are only a head start.
                if let Some(tell) = first_located.take() {
                    let _ = tell.send(found);
                }
            });
            match claimed {
                Ok(()) => return Ok(opened),
                Err(WriterError::Replica(ReplicaError::Conflict(path))) if attempts < 3 => {
                    attempts += 1;
                    tracing::info!(
                        "the previous writer published {path} after this one read the map; \
                         reading it again"
                    );
                    detach(name);
                }
                Err(e) => {
                    detach(name);
                    return Err(e);
                }
            }
        }
    }

    /// Remembers the pages the open read, and when the open hint did not hold all of them
    /// from the snapshot the open started from, writes a new one in the background.
    fn keep_boot_pages(&self, source: &RemoteSource, hint: Option<&OpenHint>, runtime: &Handle) {
        let pages = source.take_first_reads();
        *self.boot_pages.lock().unwrap_or_else(|e| e.into_inner()) = pages.clone();
        let map = source.page_map();
        let Some(base) = map.base_file().filter(|f| f.level == SNAPSHOT_LEVEL) else {
            return;
        };
        let current = hint.is_some_and(|h| h.describes(base)) && map.base_frame_gets() == 0;
        if current {
            return;
        }
        let (replica, base, known) = (
            Arc::clone(&self.replica),
            base.clone(),
            map.base_known().cloned(),
        );
        runtime.spawn(async move {
            // After the boot's first reads, beside which its frame GETs and PUT would share the
            // store and the link.
            tokio::time::sleep(HINT_WRITE_DELAY).await;
            match crate::open_hint::write(&replica, &base, &pages, known.as_ref()).await {
                Ok(()) => tracing::debug!(snapshot = %base.path, "open hint written"),
                Err(e) => tracing::info!("open hint not written (the next open reads more): {e}"),
            }
        });
    }

    /// The replica's latest state attached to the VFS as `name`, and the source of its pages.
    async fn attach_latest(
        replica: &Arc<Replica>,
        runtime: &Handle,
        name: &str,
        listing: Option<Vec<ReplicaFile>>,
        hint: Option<&OpenHint>,
    ) -> Result<OpenedState, WriterError> {
        let (state, base_txid, open_files, source) =
            Self::latest_state(replica, runtime, listing, hint).await?;
        let state = Arc::new(state);
        attach(name, Arc::clone(&state));
        Ok((state, base_txid, open_files, source))
    }

    /// The replica's latest state as a page source (no base for an empty replica), and its TXID.
    async fn latest_state(
        replica: &Arc<Replica>,
        runtime: &Handle,
        listing: Option<Vec<ReplicaFile>>,
        hint: Option<&OpenHint>,
    ) -> Result<
        (
            DatabaseState,
            Option<u64>,
            Vec<Path>,
            Option<Arc<RemoteSource>>,
        ),
        WriterError,
    > {
        let started = std::time::Instant::now();
        let listing = match listing {
            Some(listing) => listing,
            None => replica.list().await?,
        };
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            files = listing.len(),
            "map open: replica listed"
        );
        if listing.is_empty() {
            return Ok((DatabaseState::new(None, PAGE_SIZE)?, None, Vec::new(), None));
        }
        // A listing made while another writer folded files can miss a stretch of TXIDs: then
        // (only then) the replica is listed again.
        let files = replica
            .plan_or_relist(&listing, RestoreTarget::Latest)
            .await?;
        let planned = files.len();
        let paths = files.iter().map(|f| f.path.clone()).collect();
        let source =
            RemoteSource::open_files(Arc::clone(replica), files, runtime.clone(), hint).await?;
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            files = planned,
            "map open: files and first pages read"
        );
        let txid = source.txid();
        let source = Arc::new(source);
        let base = Arc::clone(&source) as Arc<dyn PageSource>;
        Ok((
            DatabaseState::new(Some(base), PAGE_SIZE)?,
            Some(txid),
            paths,
            Some(source),
        ))
    }

    /// A new connection to the map (SQLite, through the VFS).
    pub fn connection(&self) -> rusqlite::Result<rusqlite::Connection> {
        open_connection(&self.name)
    }

    /// Keeps every state committed within `window` restorable: retention (in
    /// [`MapWriter::maintain`] and [`MapWriter::tidy`]) deletes only files older states need.
    pub fn set_restore_window(&self, window: Duration) {
        self.restore_window_ms
            .store(window.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The TXID the replica holds for this writer.
    pub fn txid(&self) -> u64 {
        self.state.txid()
    }

    /// Uploads what was committed since the last sync. A collision means another writer took
    /// the volume: the lease check then reports `Fenced`, and this writer must stop.
    pub async fn sync(&self) -> Result<Option<u64>, WriterError> {
        match sync_once(&self.state, &self.replica, now_ms()).await {
            Err(ReplicaError::Conflict(path)) => {
                self.lease
                    .check(self.store.as_ref(), &self.lease_root)
                    .await?;
                Err(ReplicaError::Conflict(path).into())
            }
            other => Ok(other?),
        }
    }

    /// Restores the state this writer opened into the local file `path` (verified) and reads
    /// from it from then on: lookups stop costing GETs, and the replica files present at open
    /// may be deleted by retention. Commits made meanwhile are kept.
    pub async fn hydrate(&self, path: &std::path::Path) -> Result<(), WriterError> {
        if let Some(txid) = self.base_txid {
            let progress = crate::vfs::hydrate::Progress::default();
            let local = crate::vfs::hydrate::hydrate(&self.replica, txid, path, &progress).await?;
            self.state.replace_base(Arc::new(local))?;
        }
        self.independent_of_open_files
            .store(true, Ordering::Release);
        Ok(())
    }

    /// Keeps the replica cheap to open: compacts level 0 into level 1, writes a snapshot of the
    /// latest state, and drops what the older of the two newest snapshots makes unnecessary —
    /// the last step only once [`MapWriter::hydrate`] has made reads independent of the files
    /// that were there at open.
    pub async fn maintain(&self) -> Result<(), WriterError> {
        let _one_at_a_time = self.compacting.lock().await;
        crate::compaction::compact_level(&self.replica, 0, 1).await?;
        self.snapshot_and_retain().await
    }

    /// Writes a snapshot, then deletes what neither the older of the two newest snapshots nor
    /// the restore window needs — except, until reads no longer depend on them (hydration),
    /// the files the open read from. (Keeping only those, not everything, matters to a writer
    /// killed again and again before it hydrates: its replica would grow without end, and
    /// every open would list it all.)
    async fn snapshot_and_retain(&self) -> Result<(), WriterError> {
        if let Some(snapshot) = crate::compaction::snapshot(&self.replica).await? {
            let pages = self
                .boot_pages
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            // Best effort: without a current hint, the next open reads the snapshot itself.
            if let Err(e) = crate::open_hint::write(&self.replica, &snapshot, &pages, None).await {
                tracing::info!("open hint for {} not written: {e}", snapshot.path);
            }
        }
        if let Some(kept) = self.files_kept() {
            crate::compaction::enforce_retention_keeping(
                &self.replica,
                2,
                self.restorable_since_ms(),
                &kept,
            )
            .await?;
        }
        Ok(())
    }

    /// States committed since then (Unix ms) stay restorable: the restore window.
    fn restorable_since_ms(&self) -> i64 {
        now_ms() - self.restore_window_ms.load(Ordering::Relaxed) as i64
    }

    /// Replica files retention must not delete: those reads still depend on (the open's, until
    /// hydration) and the pinned ones. `None`: the pins are not known yet, delete nothing.
    fn files_kept(&self) -> Option<Vec<Path>> {
        let mut kept = self
            .pinned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        if !self.independent_of_open_files.load(Ordering::Acquire) {
            kept.extend(self.open_files.iter().cloned());
        }
        Some(kept)
    }

    /// Until [`MapWriter::set_pinned`], retention deletes nothing: for an owner that learns
    /// its pinned states after the open (the checkpoints are listed in the background).
    pub fn hold_deletions(&self) {
        *self.pinned.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The files pinned states (checkpoints) are restored from: retention keeps them.
    pub fn set_pinned(&self, files: Vec<Path>) {
        *self.pinned.lock().unwrap_or_else(|e| e.into_inner()) = Some(files);
    }

    /// The files a restore of the latest synced state reads (what a checkpoint pins).
    pub async fn latest_files(&self) -> Result<Vec<ReplicaFile>, WriterError> {
        Ok(self.replica.plan(RestoreTarget::Latest).await?)
    }

    /// Syncs every `interval`, and runs [`Self::maintain`] every `maintain_every` syncs, until a
    /// sync fails (for example because this writer was fenced). Maintenance failures are logged
    /// and retried next time: they never stop the syncs.
    pub async fn sync_every(&self, interval: Duration, maintain_every: u32) -> WriterError {
        let mut syncs = 0u32;
        loop {
            tokio::time::sleep(interval).await;
            if let Err(e) = self.sync().await {
                return e;
            }
            syncs += 1;
            if maintain_every > 0 && syncs % maintain_every == 0 {
                if let Err(e) = self.maintain().await {
                    tracing::warn!("block map maintenance failed, will retry: {e}");
                }
            }
        }
    }

    /// Light upkeep for when the writer goes idle or closes: [`MapWriter::fold`], and once
    /// [`TIDY_SNAPSHOT_AFTER`] level-1 files have piled up after the latest snapshot, a
    /// snapshot. The next open then reads a handful of files instead of one per transaction
    /// since the last [`MapWriter::maintain`] (each a store request).
    pub async fn tidy(&self) -> Result<(), WriterError> {
        let _one_at_a_time = self.compacting.lock().await;
        let snapshot_txid = self.fold_levels().await?;
        let level1_after = self
            .replica
            .list_level(1)
            .await?
            .iter()
            .filter(|f| f.name.max_txid > snapshot_txid)
            .count();
        if level1_after >= TIDY_SNAPSHOT_AFTER {
            self.snapshot_and_retain().await?;
        }
        Ok(())
    }

    /// The cheap part of [`MapWriter::tidy`], for a writer that never pauses (it publishes
    /// beside uploads and never blocks them): level 0 folded into one level-1 file, and every
    /// [`FOLD_AFTER`] files of a level since the next level's newest into one file of the next
    /// level, up to level [`FOLD_TOP_LEVEL`]; when that level has [`FOLD_AFTER`] files too, a
    /// snapshot. However long the writer runs, and however often it is killed, an open reads a
    /// snapshot and a few files of each level.
    pub async fn fold(&self) -> Result<(), WriterError> {
        let _one_at_a_time = self.compacting.lock().await;
        self.fold_levels().await.map(|_| ())
    }

    /// Returns the newest snapshot's TXID (0 without one).
    async fn fold_levels(&self) -> Result<u64, WriterError> {
        let (snapshot_txid, listing) = self.fold_levels_only().await?;
        // Files folded into a higher level are deleted once outside the restore window (those
        // the open still reads from stay until hydration).
        if let Some(kept) = self.files_kept() {
            crate::compaction::drop_covered(
                &self.replica,
                &listing,
                self.restorable_since_ms(),
                &kept,
            )
            .await?;
        }
        Ok(snapshot_txid)
    }

    /// Returns the newest snapshot's TXID and the listing made after the last fold.
    async fn fold_levels_only(&self) -> Result<(u64, Vec<ReplicaFile>), WriterError> {
        // One listing, kept current with what each fold publishes: levels above 0 change only
        // under `compacting`, which this holds, so listing again after each fold would only
        // repeat requests.
        let mut listing = self.replica.list().await?;
        let fold = async |listing: &mut Vec<ReplicaFile>, from: u8| {
            let published =
                crate::compaction::compact_level_listed(&self.replica, listing, from, from + 1)
                    .await?;
            listing.extend(published);
            Ok::<(), WriterError>(())
        };
        fold(&mut listing, 0).await?;
        // The end of everything above `level` (snapshots included): files of `level` up to
        // there are folded already.
        let end_above = |listing: &[ReplicaFile], level: u8| {
            listing
                .iter()
                .filter(|f| f.level > level)
                .map(|f| f.name.max_txid)
                .max()
                .unwrap_or(0)
        };
        let waiting = |listing: &[ReplicaFile], level: u8| {
            let end = end_above(listing, level);
            listing
                .iter()
                .filter(|f| f.level == level && f.name.max_txid > end)
                .count()
        };
        for level in 1..FOLD_TOP_LEVEL {
            if waiting(&listing, level) < FOLD_AFTER {
                break;
            }
            fold(&mut listing, level).await?;
        }
        let snapshot_txid = end_above(&listing, ltx::naming::SNAPSHOT_LEVEL - 1);
        // The top level filled up too (a writer that never pauses and never lives long enough
        // for maintenance, such as one in a crash loop): a snapshot starts the levels afresh.
        if waiting(&listing, FOLD_TOP_LEVEL) >= FOLD_AFTER {
            self.snapshot_and_retain().await?;
        }
        Ok((snapshot_txid, listing))
    }

    /// Marks this writer's lease released (after its last sync): the next writer, here or on
    /// another host, takes the volume without fencing anyone. Nothing may be written after.
    pub async fn release_lease(&self) -> Result<(), WriterError> {
        Ok(self
            .lease
            .release(self.store.as_ref(), &self.lease_root)
            .await?)
    }

    /// Final sync, then the database is detached from the VFS.
    pub async fn close(self) -> Result<(), WriterError> {
        let result = self.sync().await.map(|_| ());
        detach(&self.name);
        result
    }
}
