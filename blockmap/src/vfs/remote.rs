//! Glue between the VFS state and a replica: the replica as the base [`PageSource`] of a
//! database (pages fetched on demand with ranged GETs), and the upload of committed
//! transactions as create-only L0 files.
//!
//! SQLite's callbacks are synchronous; object storage is async. Reads run on the given tokio
//! runtime and the calling thread waits for them (with `futures`' executor, so this also works
//! on a thread that belongs to another runtime).

use super::state::{DatabaseState, PageSource};
use crate::open_hint::OpenHint;
use crate::replica::{PageMap, Replica, ReplicaError, ReplicaFile, ReplicaResult};
use ltx::RestoreTarget;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::runtime::Handle;

/// Pages kept in memory by default (16 MiB of 4 KiB pages).
pub const DEFAULT_CACHE_PAGES: usize = 4096;
/// Pages fetched in parallel at open.
const WARM_PAGES: u32 = 16;
/// Pages recorded as a boot's first reads at most (a boot's first lookups read a handful).
const FIRST_READS_MAX: usize = 64;

pub struct RemoteSource {
    replica: Arc<Replica>,
    map: Arc<PageMap>,
    runtime: Handle,
    cache: Mutex<PageCache>,
    /// Pages asked for since the open, until [`RemoteSource::take_first_reads`] or
    /// [`FIRST_READS_MAX`]: what a boot reads first, for the next open hint.
    first_reads: Mutex<Vec<u32>>,
    /// Whether `first_reads` still records: checked without the lock, so that once it is done
    /// (for good after the open) a page read costs nothing for it.
    recording: AtomicBool,
}

/// A bounded page cache shared by every connection to the database. Eviction is first-in
/// first-out: SQLite's own per-connection cache already keeps the hottest pages, so this one
/// mostly saves repeat fetches across connections and after SQLite evicts.
struct PageCache {
    capacity: usize,
    pages: HashMap<u32, Arc<Vec<u8>>>,
    order: VecDeque<u32>,
}

impl PageCache {
    fn get(&self, pgno: u32) -> Option<Arc<Vec<u8>>> {
        self.pages.get(&pgno).cloned()
    }

    fn insert(&mut self, pgno: u32, page: Arc<Vec<u8>>) {
        if self.capacity == 0 || self.pages.insert(pgno, page).is_some() {
            return;
        }
        self.order.push_back(pgno);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.pages.remove(&old);
            }
        }
    }
}

impl RemoteSource {
    /// Opens the replica at `target`: lists it and fetches every planned file's index.
    pub async fn open(
        replica: Arc<Replica>,
        target: RestoreTarget,
        runtime: Handle,
    ) -> ReplicaResult<Self> {
        let map = PageMap::open(&replica, target).await?;
        Self::from_map(replica, map, runtime).await
    }

    /// Opens planned `files` (oldest first) of a listing the caller already made; what `hint`
    /// holds costs no request.
    pub async fn open_files(
        replica: Arc<Replica>,
        files: Vec<ReplicaFile>,
        runtime: Handle,
        hint: Option<&OpenHint>,
    ) -> ReplicaResult<Self> {
        let map = PageMap::open_files(&replica, files, hint).await?;
        Self::from_map(replica, map, runtime).await
    }

    /// Also fetches the first pages in parallel: the schema and the tables' root pages, which
    /// every first query reads one after the other (a round trip each, otherwise).
    async fn from_map(replica: Arc<Replica>, map: PageMap, runtime: Handle) -> ReplicaResult<Self> {
        let map = Arc::new(map);
        let first_pages: Vec<u32> = (1..=map.commit.min(WARM_PAGES)).collect();
        let warm = map.read_pages(&replica, &first_pages).await?;
        let source = RemoteSource {
            replica,
            map,
            runtime,
            cache: Mutex::new(PageCache {
                capacity: DEFAULT_CACHE_PAGES,
                pages: HashMap::new(),
                order: VecDeque::new(),
            }),
            first_reads: Mutex::new(first_pages.clone()),
            recording: AtomicBool::new(true),
        };
        {
            let mut cache = source.cache();
            for (pgno, page) in warm {
                cache.insert(pgno, Arc::new(page));
            }
        }
        Ok(source)
    }

    /// Drops the file heads the open read (see [`PageMap::forget_heads`]); only while no
    /// reader shares the page map yet.
    pub fn without_open_heads(mut self) -> Self {
        if let Some(map) = Arc::get_mut(&mut self.map) {
            map.forget_heads();
        }
        self
    }

    /// Sets how many pages the shared cache holds (0 disables it).
    pub fn with_cache_pages(self, pages: usize) -> Self {
        {
            let mut cache = self.cache();
            cache.capacity = pages;
            while cache.order.len() > pages {
                if let Some(old) = cache.order.pop_front() {
                    cache.pages.remove(&old);
                }
            }
        }
        self
    }

    fn cache(&self) -> MutexGuard<'_, PageCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pages read since the open (the first pages and the first queries'), in order;
    /// stops recording.
    pub fn take_first_reads(&self) -> Vec<u32> {
        self.recording.store(false, Ordering::Relaxed);
        let mut pages =
            std::mem::take(&mut *self.first_reads.lock().unwrap_or_else(|e| e.into_inner()));
        let mut seen = std::collections::HashSet::new();
        pages.retain(|p| seen.insert(*p));
        pages
    }

    /// Where the state's pages live.
    pub fn page_map(&self) -> &PageMap {
        &self.map
    }
}

impl PageSource for RemoteSource {
    fn page_size(&self) -> u32 {
        self.map.page_size
    }

    fn commit(&self) -> u32 {
        self.map.commit
    }

    fn txid(&self) -> u64 {
        self.map.txid
    }

    fn read_page(&self, pgno: u32) -> io::Result<Vec<u8>> {
        if self.recording.load(Ordering::Relaxed) {
            let mut reads = self.first_reads.lock().unwrap_or_else(|e| e.into_inner());
            reads.push(pgno);
            if reads.len() >= FIRST_READS_MAX {
                self.recording.store(false, Ordering::Relaxed);
            }
        }
        if let Some(page) = self.cache().get(pgno) {
            return Ok(page.as_ref().clone());
        }
        let page = self.fetch(pgno)?;
        self.cache().insert(pgno, Arc::new(page.clone()));
        Ok(page)
    }
}

impl RemoteSource {
    fn fetch(&self, pgno: u32) -> io::Result<Vec<u8>> {
        let (replica, map) = (Arc::clone(&self.replica), Arc::clone(&self.map));
        let task = self
            .runtime
            .spawn(async move { map.read_page(&replica, pgno).await });
        futures::executor::block_on(task)
            .map_err(|e| io::Error::other(format!("page {pgno}: fetch task failed: {e}")))?
            .map_err(|e| io::Error::other(format!("page {pgno}: {e}")))
    }
}

/// Uploads everything committed since the last upload as one create-only L0 file. Returns the
/// TXID the replica now holds, or `None` if there was nothing to upload. `Conflict` means
/// another writer published that TXID first: this writer has been fenced and must stop.
pub async fn sync_once(
    state: &DatabaseState,
    replica: &Replica,
    timestamp_ms: i64,
) -> ReplicaResult<Option<u64>> {
    let Some(mut upload) = state
        .prepare_upload(timestamp_ms)
        .map_err(|e| ReplicaError::Invalid(format!("cannot encode L0: {e}")))?
    else {
        return Ok(None);
    };
    let bytes = bytes::Bytes::from(std::mem::take(&mut upload.bytes));
    replica.publish(0, bytes).await?;
    state.uploaded(&upload);
    Ok(Some(upload.max_txid))
}
