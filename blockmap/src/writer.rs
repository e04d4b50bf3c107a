//! The writer side of a replicated block map: take the lease, open the map from its replica
//! (or start a new one), claim the next TXID so no older writer can publish again, and sync
//! committed transactions to the replica.

use crate::lease::{self, Lease, LeaseError};
use crate::replica::{Replica, ReplicaError, ReplicaFile};
use crate::vfs::ffi::{attach, detach, open_connection};
use crate::vfs::remote::{RemoteSource, sync_once};
use crate::vfs::state::{DatabaseState, PageSource};
use ltx::RestoreTarget;
use object_store::ObjectStore;
use object_store::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::runtime::Handle;

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
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
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
        Self::open_listed(store, replica, lease_root, name, holder, runtime, None).await
    }

    /// [`MapWriter::open`] with the replica's listing already made (by a caller that listed it
    /// while fetching something else): saves the open a round trip. The listing may be older
    /// than the lease; the claim catches a writer that published since, as it does for a
    /// listing made during the lease.
    pub async fn open_listed(
        store: Arc<dyn ObjectStore>,
        replica: Arc<Replica>,
        lease_root: Path,
        name: &str,
        holder: &str,
        runtime: Handle,
        listing: Option<Vec<ReplicaFile>>,
    ) -> Result<Self, WriterError> {
        let started = std::time::Instant::now();
        let ms = |t: std::time::Instant| t.elapsed().as_millis() as u64;
        // The lease and the map's latest state are fetched at once (each is a few round
        // trips). Reading the map before the lease is safe because of the claim below: a
        // writer we replace that publishes after our listing takes the TXID we claim, the
        // claim collides, and the state is read again.
        let (lease, mut latest) = tokio::join!(
            lease::acquire(&store, &lease_root, holder),
            Self::latest_state(&replica, &runtime, listing)
        );
        let lease = lease?;
        tracing::debug!(
            ms = ms(started),
            epoch = lease.epoch,
            "map open: lease taken, state read"
        );
        let mut attempts = 0;
        loop {
            let (state, base_txid, open_files) = latest?;
            let state = Arc::new(state);
            attach(name, Arc::clone(&state));
            let writer = MapWriter {
                name: name.to_string(),
                state,
                replica: Arc::clone(&replica),
                store: Arc::clone(&store),
                lease_root: lease_root.clone(),
                lease: lease.clone(),
                independent_of_open_files: AtomicBool::new(base_txid.is_none()),
                open_files,
                base_txid,
                restore_window_ms: AtomicU64::new(0),
                compacting: tokio::sync::Mutex::new(()),
            };
            match writer.claim().await {
                Ok(()) => {
                    tracing::debug!(ms = ms(started), "map open: next TXID claimed");
                    return Ok(writer);
                }
                Err(WriterError::Replica(ReplicaError::Conflict(path))) if attempts < 3 => {
                    attempts += 1;
                    tracing::info!(
                        "the previous writer published {path} after this one read the map; \
                         reading it again"
                    );
                    detach(name);
                    latest = Self::latest_state(&replica, &runtime, None).await;
                }
                Err(e) => {
                    detach(name);
                    return Err(e);
                }
            }
        }
    }

    /// The replica's latest state as a page source (no base for an empty replica), and its TXID.
    async fn latest_state(
        replica: &Arc<Replica>,
        runtime: &Handle,
        listing: Option<Vec<ReplicaFile>>,
    ) -> Result<(DatabaseState, Option<u64>, Vec<Path>), WriterError> {
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
            return Ok((DatabaseState::new(None, PAGE_SIZE)?, None, Vec::new()));
        }
        let files = Replica::plan_listing(&listing, RestoreTarget::Latest)?;
        let planned = files.len();
        let paths = files.iter().map(|f| f.path.clone()).collect();
        let source = RemoteSource::open_files(Arc::clone(replica), files, runtime.clone()).await?;
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            files = planned,
            "map open: files and first pages read"
        );
        let txid = source.txid();
        let base = Arc::new(source) as Arc<dyn PageSource>;
        Ok((
            DatabaseState::new(Some(base), PAGE_SIZE)?,
            Some(txid),
            paths,
        ))
    }

    /// Publishes page 1 unchanged as the next TXID (nothing to claim in an empty database: the
    /// first upload then races for TXID 1 and create-only settles it).
    async fn claim(&self) -> Result<(), WriterError> {
        if self.state.file_size() == 0 {
            return Ok(());
        }
        let task = {
            let state = Arc::clone(&self.state);
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let mut page = vec![0u8; state.page_size() as usize];
                state.read(0, &mut page)?;
                state.write(0, &page)?;
                state.commit();
                Ok(())
            })
        };
        task.await
            .map_err(|e| std::io::Error::other(format!("claim task failed: {e}")))??;
        self.sync().await?;
        Ok(())
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
        crate::compaction::snapshot(&self.replica).await?;
        crate::compaction::enforce_retention_keeping(
            &self.replica,
            2,
            self.restorable_since_ms(),
            self.files_still_read(),
        )
        .await?;
        Ok(())
    }

    /// States committed since then (Unix ms) stay restorable: the restore window.
    fn restorable_since_ms(&self) -> i64 {
        now_ms() - self.restore_window_ms.load(Ordering::Relaxed) as i64
    }

    /// Replica files reads still depend on: the open's, until hydration.
    fn files_still_read(&self) -> &[Path] {
        if self.independent_of_open_files.load(Ordering::Acquire) {
            &[]
        } else {
            &self.open_files
        }
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
        crate::compaction::drop_covered(
            &self.replica,
            &listing,
            self.restorable_since_ms(),
            self.files_still_read(),
        )
        .await?;
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

    /// Final sync, then the database is detached from the VFS.
    pub async fn close(self) -> Result<(), WriterError> {
        let result = self.sync().await.map(|_| ());
        detach(&self.name);
        result
    }
}
