//! A Litestream-layout replica of a database in object storage: list its LTX files, publish new
//! ones create-only, and read single pages through the files' page indexes with ranged GETs.
//!
//! Opening costs one round trip per file, all files in parallel (the file's first
//! [`HEAD_GUESS`] bytes — header and first page frames — and its last [`INDEX_TAIL_GUESS`]
//! bytes, which hold the page index of any map up to ~100 MB; a longer index costs a second),
//! and nothing proportional to the database size: other pages are fetched when asked for.

use crate::open_hint::{KnownRanges, OpenHint};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use ltx::page_index::TAIL_LEN;
use ltx::{FileName, Header, IndexEntry, LtxFile, PageIndex, RestoreTarget, plan_restore};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use stores::retry::{Created, create_only, get_whole, with_retries};

/// How many index fetches run at once when opening a replica.
const OPEN_PARALLELISM: usize = 32;
/// Listings made again when a plan has a hole (see [`Replica::plan_or_relist`]): after 40, 80
/// and 160 ms.
const PLAN_RELISTS: u32 = 3;
/// Bytes read from the end of an LTX file at open, in the same request as its header: the
/// trailer, the index size and, almost always, the index itself (about 8 bytes per page), so
/// opening a file is one round trip instead of two.
pub const INDEX_TAIL_GUESS: u64 = 256 << 10;
/// Bytes read from the start of an LTX file at open, in the same request as its tail: the
/// header and the first page frames. Frames are in page order, so these hold the schema and
/// the tables' root pages that every first query reads (about 16 pages of a block map); they
/// are kept and served from memory, which saves the open a dependent round trip.
pub const HEAD_GUESS: u64 = 64 << 10;
/// Frames of wanted pages at most this far apart are read in one GET by
/// [`PageMap::read_pages`] (the pages between come along and are dropped).
const PAGE_RUN_GAP: u64 = 64 << 10;
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("{path}: {source}")]
    Ltx { path: String, source: ltx::Error },
    #[error("{0} already exists: another writer published this TXID first")]
    Conflict(String),
    #[error("page {0} is not in the replica")]
    MissingPage(u32),
    #[error("{0}")]
    Invalid(String),
}

impl ReplicaError {
    /// A restore plan with a hole in the history (see [`Replica::plan_or_relist`]).
    fn is_history_gap(&self) -> bool {
        matches!(
            self,
            ReplicaError::Ltx {
                source: ltx::Error::HistoryGap(_),
                ..
            }
        )
    }
}

pub type ReplicaResult<T> = std::result::Result<T, ReplicaError>;

/// Where levels live under the replica root (decided by the store: see [`stores::Layout`]).
pub use stores::Layout;

/// One LTX object in the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaFile {
    pub level: u8,
    pub name: FileName,
    pub size: u64,
    pub last_modified_ms: i64,
    pub path: Path,
    /// As the listing gave it (stores that have none leave it out).
    pub e_tag: Option<String>,
}

impl ReplicaFile {
    /// A file known by its key, level and size (recorded earlier, not listed now): `None` if the
    /// key is not named like an LTX file.
    pub fn stored(path: Path, level: u8, size: u64) -> Option<ReplicaFile> {
        let name = FileName::parse(path.filename()?)?;
        Some(ReplicaFile {
            level,
            name,
            size,
            last_modified_ms: 0,
            path,
            e_tag: None,
        })
    }

    /// A listed object that is a direct child of `level`'s directory, if it is named like an
    /// LTX file; anything else is not ours.
    fn from_listing(level: u8, meta: object_store::ObjectMeta) -> Option<ReplicaFile> {
        let name = FileName::parse(meta.location.filename()?)?;
        Some(ReplicaFile {
            level,
            name,
            size: meta.size,
            last_modified_ms: meta.last_modified.timestamp_millis(),
            path: meta.location,
            e_tag: meta.e_tag,
        })
    }

    pub fn as_ltx(&self) -> LtxFile {
        LtxFile {
            level: self.level,
            min_txid: self.name.min_txid,
            max_txid: self.name.max_txid,
            size: self.size,
            created_at_ms: self.last_modified_ms,
        }
    }
}

pub struct Replica {
    store: Arc<dyn ObjectStore>,
    root: Path,
    layout: Layout,
    /// Files of another replica (elsewhere in the store) that this one continues: a state up
    /// to some TXID, after which this replica's own files start. Listed with this replica's
    /// files, never deleted through it.
    base: Vec<ReplicaFile>,
}

impl Replica {
    pub fn new(store: Arc<dyn ObjectStore>, root: Path, layout: Layout) -> Self {
        Self::with_base(store, root, layout, Vec::new())
    }

    /// A replica whose history starts with `base` (the files that restore some state of
    /// another replica; see [`Replica::base`]).
    pub fn with_base(
        store: Arc<dyn ObjectStore>,
        root: Path,
        layout: Layout,
        base: Vec<ReplicaFile>,
    ) -> Self {
        Replica {
            store,
            root,
            layout,
            base,
        }
    }

    /// The other replica's files this one continues (see [`Replica::with_base`]).
    pub fn base(&self) -> &[ReplicaFile] {
        &self.base
    }

    pub(crate) fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Where the replica's open hint lives: beside its directory, where neither Litestream nor
    /// a listing of the replica sees it (see [`crate::open_hint`]).
    pub fn hint_path(&self) -> Path {
        Path::from(format!("{}.open-hint", self.root))
    }

    fn level_path(&self, level: u8) -> Path {
        let dir = ltx::level_dir(level, self.layout == Layout::ObjectStore);
        dir.split('/')
            .fold(self.root.clone(), |p, part| p.join(part))
    }

    /// Every LTX file of every level (0–9): one listing of the whole replica (a store pages it
    /// by 1,000 keys; retention keeps a replica far smaller), not one per level — on a store
    /// that answers listings slowly, ten in parallel cost several round trips.
    pub async fn list(&self) -> ReplicaResult<Vec<ReplicaFile>> {
        let levels: Vec<(Path, u8)> = (0..=ltx::naming::SNAPSHOT_LEVEL)
            .map(|level| (self.level_path(level), level))
            .collect();
        let objects: Vec<_> = with_retries("list LTX files", || {
            self.store.list(Some(&self.root)).try_collect::<Vec<_>>()
        })
        .await?;
        let mut files: Vec<ReplicaFile> = objects
            .into_iter()
            .filter_map(|meta| {
                let level = levels.iter().find_map(|(prefix, level)| {
                    (meta.location.prefix_match(prefix)?.count() == 1).then_some(*level)
                })?;
                ReplicaFile::from_listing(level, meta)
            })
            .collect();
        files.extend(self.base.iter().cloned());
        files.sort_by_key(|f| (f.level, f.name));
        Ok(files)
    }

    pub async fn list_level(&self, level: u8) -> ReplicaResult<Vec<ReplicaFile>> {
        let prefix = self.level_path(level);
        let objects: Vec<_> = with_retries("list LTX files", || {
            self.store.list(Some(&prefix)).try_collect::<Vec<_>>()
        })
        .await?;
        Ok(objects
            .into_iter()
            .filter(|meta| {
                meta.location
                    .prefix_match(&prefix)
                    .is_some_and(|rest| rest.count() == 1)
            })
            .filter_map(|meta| ReplicaFile::from_listing(level, meta))
            .collect())
    }

    /// The files that rebuild the database at `target`, oldest first (see `ltx::plan_restore`).
    pub async fn plan(&self, target: RestoreTarget) -> ReplicaResult<Vec<ReplicaFile>> {
        let listing = self.list().await?;
        self.plan_or_relist(&listing, target).await
    }

    /// [`Replica::plan_listing`] over `listing`, listing the replica again while the plan has a
    /// hole. A listing that raced with a writer folding files can miss a stretch of TXIDs: the
    /// fold writes its file, then deletes its sources, and a listing is not atomic (a directory
    /// store walks its levels one by one, an S3 LIST pages). Only a hole is listed again, a few
    /// times, before it is reported; any other failure to plan is reported at once.
    pub async fn plan_or_relist(
        &self,
        listing: &[ReplicaFile],
        target: RestoreTarget,
    ) -> ReplicaResult<Vec<ReplicaFile>> {
        let mut planned = Self::plan_listing(listing, target);
        for relist in 1..=PLAN_RELISTS {
            match &planned {
                Err(e) if e.is_history_gap() => {
                    tracing::debug!("listing the replica again: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(20 << relist)).await;
                    planned = Self::plan_listing(&self.list().await?, target);
                }
                _ => break,
            }
        }
        planned
    }

    /// [`Replica::plan`] over a listing already made (saves a round of LIST requests).
    pub fn plan_listing(
        listing: &[ReplicaFile],
        target: RestoreTarget,
    ) -> ReplicaResult<Vec<ReplicaFile>> {
        let infos: Vec<LtxFile> = listing.iter().map(ReplicaFile::as_ltx).collect();
        let plan = plan_restore(&infos, target).map_err(|source| ReplicaError::Ltx {
            path: "restore plan".into(),
            source,
        })?;
        Ok(plan
            .iter()
            .filter_map(|p| listing.iter().find(|f| f.as_ltx() == *p).cloned())
            .collect())
    }

    /// Publishes an LTX file create-only: if the key exists, another writer got there first and
    /// this one must stop (it has been fenced) — unless the file there is this one's: the same
    /// TXIDs leading to the same database (its post-apply checksum), stored by an attempt whose
    /// reply was lost (the retry re-encodes it, so its bytes may differ in the timestamp).
    pub async fn publish(&self, level: u8, bytes: Bytes) -> ReplicaResult<Path> {
        let header = ltx::Decoder::new(&bytes[..])
            .map_err(|source| ReplicaError::Ltx {
                path: "new file".into(),
                source,
            })?
            .header()
            .to_owned();
        let name = FileName {
            min_txid: header.min_txid,
            max_txid: header.max_txid,
        };
        let path = self.level_path(level).join(name.to_string());
        match create_only(
            self.store.as_ref(),
            &path,
            bytes.clone(),
            "publish an LTX file",
        )
        .await?
        {
            Created::Stored => Ok(path),
            Created::Taken | Created::TakenAfterFailure => {
                let there =
                    get_whole(self.store.as_ref(), &path, "read a published LTX file").await?;
                if same_outcome(&there, &bytes) {
                    tracing::info!("{path} was already published by this writer (a lost reply)");
                    Ok(path)
                } else {
                    Err(ReplicaError::Conflict(path.to_string()))
                }
            }
        }
    }

    /// A whole LTX file.
    pub async fn fetch(&self, file: &ReplicaFile) -> ReplicaResult<Bytes> {
        Ok(get_whole(self.store.as_ref(), &file.path, "fetch LTX file").await?)
    }

    /// Deletes one of this replica's own files; a base file (another replica's) is left alone.
    pub async fn delete(&self, file: &ReplicaFile) -> ReplicaResult<()> {
        if file.path.prefix_match(&self.root).is_none() {
            return Ok(());
        }
        match self.store.delete(&file.path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Header and page index of one file, and the byte ranges read on the way (its first
    /// [`HEAD_GUESS`] bytes and its tail): one request for the head and the file's last
    /// [`INDEX_TAIL_GUESS`] bytes (one GET when they are close), and a second only for an
    /// index longer than that. Ranges `hint` holds for this file cost no request.
    pub async fn read_index(
        &self,
        file: &ReplicaFile,
        hint: Option<&OpenHint>,
    ) -> ReplicaResult<(Header, PageIndex, KnownRanges)> {
        let ltx_err = |source| ReplicaError::Ltx {
            path: file.path.to_string(),
            source,
        };
        if file.size < (ltx::HEADER_SIZE + TAIL_LEN) as u64 {
            return Err(ltx_err(ltx::Error::Truncated(format!(
                "{} bytes",
                file.size
            ))));
        }
        let hinted = hint.filter(|h| h.describes(file)).map(|h| &h.ranges);
        let tail_start = file
            .size
            .saturating_sub(INDEX_TAIL_GUESS)
            .max(ltx::HEADER_SIZE as u64);
        // A file no longer than head and tail together is read whole, in one GET, and all of
        // it is the head; a longer one is two ranges (one request each on S3).
        let ranges: Vec<Range<u64>> = if file.size <= HEAD_GUESS + INDEX_TAIL_GUESS {
            std::iter::once(0..file.size).collect()
        } else {
            vec![0..HEAD_GUESS, tail_start..file.size]
        };
        let mut known = KnownRanges::default();
        for (range, bytes) in ranges
            .iter()
            .zip(self.read_ranges(file, &ranges, hinted).await?)
        {
            known.add(range.start, bytes);
        }
        let short =
            |what: &str| ReplicaError::Invalid(format!("{}: short read of {what}", file.path));
        let header_bytes = known
            .covering(0..ltx::HEADER_SIZE as u64)
            .ok_or_else(|| short("the header"))?;
        let header_bytes: &[u8; ltx::HEADER_SIZE] = header_bytes[..]
            .try_into()
            .map_err(|_| short("the header"))?;
        let header = Header::decode(header_bytes).map_err(ltx_err)?;
        header.validate().map_err(ltx_err)?;
        let trailer = known
            .covering(file.size - TAIL_LEN as u64..file.size)
            .ok_or_else(|| short("the file's tail"))?;
        let (start, len) = PageIndex::locate(file.size, &trailer).map_err(ltx_err)?;
        let index_range = start..start + len;
        let index_bytes = match known.covering(index_range.clone()) {
            Some(bytes) => bytes,
            None => {
                let wanted = [index_range.clone()];
                let bytes = self.read_ranges(file, &wanted, hinted).await?.remove(0);
                known.add(index_range.start, bytes.clone());
                bytes
            }
        };
        let index =
            PageIndex::decode(&index_bytes, PageIndex::frames_end(start)).map_err(ltx_err)?;
        Ok((header, index, known))
    }

    /// `ranges` of `file`, from `hinted` where it holds them and with one request for the rest;
    /// a short answer is an error.
    async fn read_ranges(
        &self,
        file: &ReplicaFile,
        ranges: &[Range<u64>],
        hinted: Option<&KnownRanges>,
    ) -> ReplicaResult<Vec<Bytes>> {
        let from_hint: Vec<Option<Bytes>> = ranges
            .iter()
            .map(|r| hinted.and_then(|h| h.covering(r.clone())))
            .collect();
        let missing: Vec<Range<u64>> = ranges
            .iter()
            .zip(&from_hint)
            .filter(|(_, hit)| hit.is_none())
            .map(|(r, _)| r.clone())
            .collect();
        let mut fetched = if missing.is_empty() {
            Vec::new()
        } else {
            with_retries("read LTX head and tail", || {
                self.store.get_ranges(&file.path, &missing)
            })
            .await?
        }
        .into_iter();
        ranges
            .iter()
            .zip(from_hint)
            .map(|(range, hit)| {
                let bytes = match hit {
                    Some(bytes) => bytes,
                    None => fetched.next().ok_or_else(|| {
                        ReplicaError::Invalid(format!("{}: fewer ranges than asked", file.path))
                    })?,
                };
                if bytes.len() as u64 != range.end - range.start {
                    return Err(ReplicaError::Invalid(format!(
                        "{}: short read of bytes {range:?}",
                        file.path
                    )));
                }
                Ok(bytes)
            })
            .collect()
    }
}

/// Where each page of one database state lives: built from the restore plan's indexes, newest
/// file winning. Reading a page is then one ranged GET.
pub struct PageMap {
    files: Vec<ReplicaFile>,
    /// Bytes of each file read with its index (or found in the open hint): frames inside are
    /// served from here.
    known: Vec<KnownRanges>,
    /// Ranged GETs of page frames so far from the oldest file (see [`Self::base_frame_gets`]).
    base_frame_gets: AtomicU64,
    pages: HashMap<u32, (usize, IndexEntry)>,
    pub page_size: u32,
    /// Database size in pages.
    pub commit: u32,
    pub txid: u64,
}

impl PageMap {
    /// Plans the files for `target` and fetches their indexes in parallel.
    pub async fn open(replica: &Replica, target: RestoreTarget) -> ReplicaResult<Self> {
        let files = replica.plan(target).await?;
        Self::open_files(replica, files, None).await
    }

    /// Builds the page map of planned `files` (oldest first), fetching their indexes (what
    /// `hint` holds costs no request).
    pub async fn open_files(
        replica: &Replica,
        files: Vec<ReplicaFile>,
        hint: Option<&OpenHint>,
    ) -> ReplicaResult<Self> {
        let indexes: Vec<(Header, PageIndex, KnownRanges)> = stream::iter(&files)
            .map(|f| async move {
                let (header, index, mut known) = replica.read_index(f, hint).await?;
                // The hint's frames of this file serve page reads too.
                if let Some(hint) = hint.filter(|h| h.describes(f)) {
                    for (start, bytes) in hint.ranges.iter() {
                        known.add(*start, bytes.clone());
                    }
                }
                Ok::<_, ReplicaError>((header, index, known))
            })
            .buffered(OPEN_PARALLELISM)
            .try_collect()
            .await?;
        let last = indexes
            .last()
            .map(|(h, _, _)| *h)
            .ok_or_else(|| ReplicaError::Invalid("empty plan".into()))?;
        let mut pages = HashMap::new();
        for (i, (header, index, _)) in indexes.iter().enumerate() {
            if header.page_size != last.page_size {
                return Err(ReplicaError::Invalid(format!(
                    "{}: page size differs",
                    files[i].path
                )));
            }
            for entry in &index.entries {
                if entry.pgno <= last.commit {
                    pages.insert(entry.pgno, (i, *entry)); // later (newer) files overwrite
                }
            }
        }
        Ok(PageMap {
            base_frame_gets: AtomicU64::new(0),
            files,
            known: indexes.into_iter().map(|(_, _, known)| known).collect(),
            pages,
            page_size: last.page_size,
            commit: last.commit,
            txid: last.max_txid,
        })
    }

    /// Drops the file heads read at open: their memory is freed, and every page is fetched
    /// from the store when asked for.
    pub fn forget_heads(&mut self) {
        for known in &mut self.known {
            known.clear();
        }
    }

    /// The oldest file of the plan (the snapshot, when the plan starts with one).
    pub fn base_file(&self) -> Option<&ReplicaFile> {
        self.files.first()
    }

    /// What is known of [`Self::base_file`]'s bytes without a GET (read at open, or from the
    /// open hint).
    pub fn base_known(&self) -> Option<&KnownRanges> {
        self.known.first()
    }

    /// Ranged GETs of page frames made so far from [`Self::base_file`].
    pub fn base_frame_gets(&self) -> u64 {
        self.base_frame_gets.load(Ordering::Relaxed)
    }

    /// Several pages, with one ranged GET per file for the frames of the pages it holds (the
    /// frames of neighbouring pages are adjacent in an LTX file, so a few pages at the start of
    /// a database are one small GET rather than one each). Pages the map does not hold are
    /// errors, as in [`Self::read_page`]; the lock page reads as zeros.
    pub async fn read_pages(
        &self,
        replica: &Replica,
        pgnos: &[u32],
    ) -> ReplicaResult<Vec<(u32, Vec<u8>)>> {
        let mut wanted: Vec<(usize, u32, IndexEntry)> = Vec::with_capacity(pgnos.len());
        let mut out = Vec::with_capacity(pgnos.len());
        for &pgno in pgnos {
            if pgno == ltx::lock_pgno(self.page_size) && pgno <= self.commit {
                out.push((pgno, vec![0u8; self.page_size as usize]));
                continue;
            }
            let (file, entry) = self
                .pages
                .get(&pgno)
                .ok_or(ReplicaError::MissingPage(pgno))?;
            wanted.push((*file, pgno, *entry));
        }
        // Runs of frames of one file no more than `PAGE_RUN_GAP` apart: one GET each.
        wanted.sort_by_key(|&(file, _, e)| (file, e.offset));
        let mut runs: Vec<(usize, Vec<(u32, IndexEntry)>)> = Vec::new();
        for (file, pgno, entry) in wanted {
            match runs.last_mut() {
                Some((f, run))
                    if *f == file
                        && run.last().is_some_and(|(_, last)| {
                            entry.offset <= last.offset + last.size + PAGE_RUN_GAP
                        }) =>
                {
                    run.push((pgno, entry))
                }
                _ => runs.push((file, vec![(pgno, entry)])),
            }
        }
        let fetches = runs.into_iter().map(|(file, entries)| async move {
            let path = &self.files[file].path;
            let start = entries.iter().map(|(_, e)| e.offset).min().unwrap_or(0);
            let end = entries
                .iter()
                .map(|(_, e)| e.offset + e.size)
                .max()
                .unwrap_or(0);
            let span = match self.known[file].covering(start..end) {
                Some(bytes) => bytes,
                None => {
                    if file == 0 {
                        self.base_frame_gets.fetch_add(1, Ordering::Relaxed);
                    }
                    with_retries("read page frames", || {
                        replica.store.get_range(path, start..end)
                    })
                    .await?
                }
            };
            entries
                .into_iter()
                .map(|(pgno, e)| {
                    let at = (e.offset - start) as usize;
                    let frame = span.get(at..at + e.size as usize).ok_or_else(|| {
                        ReplicaError::Invalid(format!("{path}: short read of page {pgno}"))
                    })?;
                    Ok((pgno, self.decode_page(path, pgno, frame)?))
                })
                .collect::<ReplicaResult<Vec<_>>>()
        });
        for pages in futures::future::try_join_all(fetches).await? {
            out.extend(pages);
        }
        Ok(out)
    }

    fn decode_page(&self, path: &Path, pgno: u32, frame: &[u8]) -> ReplicaResult<Vec<u8>> {
        let mut page = vec![0u8; self.page_size as usize];
        let found =
            ltx::frame::decode_frame(frame, &mut page).map_err(|source| ReplicaError::Ltx {
                path: path.to_string(),
                source,
            })?;
        if found != pgno {
            return Err(ReplicaError::Invalid(format!(
                "{path}: index says page {pgno}, frame holds {found}"
            )));
        }
        Ok(page)
    }

    /// One page, fetched with a ranged GET and decoded. The lock page reads as zeros.
    pub async fn read_page(&self, replica: &Replica, pgno: u32) -> ReplicaResult<Vec<u8>> {
        let mut pages = self.read_pages(replica, &[pgno]).await?;
        pages
            .pop()
            .map(|(_, page)| page)
            .ok_or(ReplicaError::MissingPage(pgno))
    }
}
/// Whether two encodings of an LTX file publish the same change: the same header but for its
/// timestamp, the same pages and index, and the same post-apply checksum — everything but
/// the encoding time and the file checksum that covers it.
fn same_outcome(a: &[u8], b: &[u8]) -> bool {
    if a == b {
        return true;
    }
    let header = |f: &[u8]| {
        let mut h = ltx::Decoder::new(f).ok()?.header().to_owned();
        h.timestamp = 0;
        Some(h)
    };
    // The pages, the index and the post-apply checksum; not the file checksum.
    fn content(f: &[u8]) -> Option<&[u8]> {
        let end = f.len().checked_sub(ltx::TRAILER_SIZE)?;
        f.get(ltx::HEADER_SIZE..end + 8)
    }
    let (ha, hb) = (header(a), header(b));
    ha.is_some() && ha == hb && content(a).is_some() && content(a) == content(b)
}
