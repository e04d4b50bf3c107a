//! Page state of one database behind the VFS, shared by all its connections.
//!
//! SQLite writes the main database file only while it holds the EXCLUSIVE lock, so at any time
//! there is at most one writer's *pending* pages. When the writer drops the lock the pending
//! pages become *committed*: visible to every connection and queued for the next upload. The
//! database size is derived from page counts, never from what was last uploaded, so it cannot
//! shrink under a reader after a sync.
//!
//! A TXID is one upload (a group of SQLite commits), and every L0 file holds exactly one TXID.
//! Two writers that race for the same TXID therefore race for the same object name, and the
//! create-only PUT lets exactly one of them win: that is what fences a stale writer.

use ltx::{Encoder, HEADER_FLAG_NO_CHECKSUM, Header};
use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// Where pages not changed since the last sync come from: the replica through its page index,
/// or the hydrated local copy.
pub trait PageSource: Send + Sync {
    fn page_size(&self) -> u32;
    /// Database size in pages at `txid()`.
    fn commit(&self) -> u32;
    fn txid(&self) -> u64;
    /// One page (1-based, ≤ `commit()`).
    fn read_page(&self, pgno: u32) -> io::Result<Vec<u8>>;
}

/// Databases replicated by Litestream are in WAL mode (header bytes 18 and 19 are 2). This VFS
/// has no WAL: reads show such databases as rollback-journal databases (1 and 1), as the
/// Litestream VFS does, and SQLite writes them back that way on the next change of page 1.
fn present_as_rollback_journal(offset: u64, buf: &mut [u8]) {
    for field in [18u64, 19] {
        if let Some(i) = field.checked_sub(offset).map(|i| i as usize) {
            if i < buf.len() && buf[i] == 2 {
                buf[i] = 1;
            }
        }
    }
}

/// An L0 file ready to publish, and the TXID it brings the replica to.
pub struct PendingUpload {
    pub bytes: Vec<u8>,
    pub max_txid: u64,
    /// The last commit this upload carries.
    commit_seq: u64,
}

struct Inner {
    page_size: u32,
    base: Option<Arc<dyn PageSource>>,
    /// Every page committed since the database was opened (newest content). Pages stay here
    /// after upload: the base source still describes the state at open.
    committed: BTreeMap<u32, Arc<Vec<u8>>>,
    /// Pages committed but not uploaded yet, with the commit that last changed each.
    unsynced: BTreeMap<u32, u64>,
    /// Commits so far, and the last one already uploaded.
    commit_seq: u64,
    uploaded_seq: u64,
    /// Database size in pages as of the last commit.
    commit_pages: u32,
    /// The TXID the replica holds: everything up to it is uploaded.
    txid: u64,
    /// The current writer's pages and size, not yet committed.
    pending: BTreeMap<u32, Vec<u8>>,
    pending_pages: Option<u32>,
}

pub struct DatabaseState {
    inner: Mutex<Inner>,
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

impl DatabaseState {
    /// A database continuing `base` (or a new, empty one with `page_size`).
    pub fn new(base: Option<Arc<dyn PageSource>>, page_size: u32) -> io::Result<Self> {
        let page_size = base.as_ref().map_or(page_size, |b| b.page_size());
        if !ltx::header::is_valid_page_size(page_size) {
            return Err(invalid(format!("invalid page size {page_size}")));
        }
        let (commit_pages, txid) = base.as_ref().map_or((0, 0), |b| (b.commit(), b.txid()));
        Ok(DatabaseState {
            inner: Mutex::new(Inner {
                page_size,
                base,
                committed: BTreeMap::new(),
                unsynced: BTreeMap::new(),
                commit_seq: 0,
                uploaded_seq: 0,
                commit_pages,
                txid,
                pending: BTreeMap::new(),
                pending_pages: None,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave pages half-written: every update below
        // is a single map insert. Keep serving rather than poisoning every connection.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the base with another source holding the same state (the hydrated local copy
    /// of what the replica held at open). Refused if it describes a different state.
    pub fn replace_base(&self, new_base: Arc<dyn PageSource>) -> io::Result<()> {
        let mut inner = self.lock();
        let same = match &inner.base {
            Some(old) => {
                (old.page_size(), old.commit(), old.txid())
                    == (new_base.page_size(), new_base.commit(), new_base.txid())
            }
            None => false,
        };
        if !same {
            return Err(invalid(format!(
                "the new base (TXID {}, {} pages) is not the state this database was opened at",
                new_base.txid(),
                new_base.commit()
            )));
        }
        inner.base = Some(new_base);
        Ok(())
    }

    pub fn page_size(&self) -> u32 {
        self.lock().page_size
    }

    /// The TXID the replica holds (the last upload, or the base's at open).
    pub fn txid(&self) -> u64 {
        self.lock().txid
    }

    /// File size as SQLite must see it: the writer's size while it writes, else the committed
    /// size. Never derived from uploads.
    pub fn file_size(&self) -> u64 {
        let inner = self.lock();
        let pages = inner.pending_pages.unwrap_or(inner.commit_pages);
        u64::from(pages) * u64::from(inner.page_size)
    }

    /// Reads `buf.len()` bytes at `offset` (within one page, as SQLite reads). Bytes past the
    /// end read as zeros; returns how many bytes were inside the file.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let inner = self.lock();
        let ps = u64::from(inner.page_size);
        let pgno =
            u32::try_from(offset / ps + 1).map_err(|_| invalid("offset too large".into()))?;
        let within = (offset % ps) as usize;
        if within + buf.len() > ps as usize {
            return Err(invalid(format!(
                "read of {} bytes at {offset} crosses a page",
                buf.len()
            )));
        }
        let pages = inner.pending_pages.unwrap_or(inner.commit_pages);
        if pgno > pages {
            buf.fill(0);
            return Ok(0);
        }
        if let Some(page) = inner.pending.get(&pgno) {
            buf.copy_from_slice(&page[within..within + buf.len()]);
        } else if let Some(page) = inner.committed.get(&pgno) {
            buf.copy_from_slice(&page[within..within + buf.len()]);
        } else if let Some(base) = inner.base.as_ref().filter(|b| pgno <= b.commit()) {
            let base = Arc::clone(base);
            drop(inner); // never hold the state lock across a fetch from the store
            let page = base.read_page(pgno)?;
            buf.copy_from_slice(&page[within..within + buf.len()]);
        } else {
            buf.fill(0); // a page past the base that was never written
        }
        if pgno == 1 {
            present_as_rollback_journal(offset, buf);
        }
        Ok(buf.len())
    }

    /// Writes within one page for the current writer (read-modify-write for partial pages).
    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let ps = u64::from(self.page_size());
        let pgno =
            u32::try_from(offset / ps + 1).map_err(|_| invalid("offset too large".into()))?;
        let within = (offset % ps) as usize;
        if within + data.len() > ps as usize {
            return Err(invalid(format!(
                "write of {} bytes at {offset} crosses a page",
                data.len()
            )));
        }
        let mut page = if within == 0 && data.len() == ps as usize {
            Vec::new()
        } else {
            let mut existing = vec![0u8; ps as usize];
            self.read(offset - within as u64, &mut existing)?;
            existing
        };
        if page.is_empty() {
            page = data.to_vec();
        } else {
            page[within..within + data.len()].copy_from_slice(data);
        }
        let mut inner = self.lock();
        let pages = inner.pending_pages.unwrap_or(inner.commit_pages).max(pgno);
        inner.pending_pages = Some(pages);
        inner.pending.insert(pgno, page);
        Ok(())
    }

    /// Sets the writer's file size (whole pages).
    pub fn truncate(&self, size: u64) -> io::Result<()> {
        let mut inner = self.lock();
        let ps = u64::from(inner.page_size);
        if size % ps != 0 {
            return Err(invalid(format!(
                "truncate to {size}, not a multiple of the page size"
            )));
        }
        let pages = u32::try_from(size / ps).map_err(|_| invalid("size too large".into()))?;
        inner.pending.retain(|p, _| *p <= pages);
        inner.pending_pages = Some(pages);
        Ok(())
    }

    /// The writer released the database: its pages become one committed transaction. Returns
    /// the commit's sequence number, or `None` if it wrote nothing.
    pub fn commit(&self) -> Option<u64> {
        let mut inner = self.lock();
        let pages = inner.pending_pages.take()?;
        let seq = inner.commit_seq + 1;
        let pending = std::mem::take(&mut inner.pending);
        for (pgno, page) in pending {
            inner.committed.insert(pgno, Arc::new(page));
            inner.unsynced.insert(pgno, seq);
        }
        inner.committed.retain(|p, _| *p <= pages);
        inner.unsynced.retain(|p, _| *p <= pages);
        inner.commit_pages = pages;
        inner.commit_seq = seq;
        Some(seq)
    }

    /// Encodes everything committed since the last upload as one L0 file for TXID `txid()+1`.
    /// `None` when nothing was committed since. Call [`Self::uploaded`] once the file is safely in
    /// the store.
    pub fn prepare_upload(&self, timestamp_ms: i64) -> io::Result<Option<PendingUpload>> {
        let inner = self.lock();
        if inner.commit_seq == inner.uploaded_seq {
            return Ok(None);
        }
        let header = Header {
            flags: HEADER_FLAG_NO_CHECKSUM,
            page_size: inner.page_size,
            commit: inner.commit_pages,
            min_txid: inner.txid + 1,
            max_txid: inner.txid + 1,
            timestamp: timestamp_ms,
            ..Header::default()
        };
        let lock_pgno = ltx::lock_pgno(inner.page_size);
        let snapshot = header.is_snapshot();
        let changed: Vec<(u32, Arc<Vec<u8>>)> = inner
            .unsynced
            .keys()
            .filter_map(|p| inner.committed.get(p).map(|page| (*p, Arc::clone(page))))
            .collect();
        let committed = inner.committed.clone();
        let base = inner.base.clone();
        let commit_seq = inner.commit_seq;
        drop(inner);
        let to_io = |e: ltx::Error| io::Error::other(e.to_string());
        let mut encoder = Encoder::new(Vec::new(), header).map_err(to_io)?;
        if snapshot {
            // The first file of a history must hold every page.
            for pgno in (1..=header.commit).filter(|p| *p != lock_pgno) {
                let page = match committed.get(&pgno) {
                    Some(p) => p.as_ref().clone(),
                    None => match &base {
                        Some(b) if pgno <= b.commit() => b.read_page(pgno)?,
                        _ => vec![0u8; header.page_size as usize],
                    },
                };
                encoder.encode_page(pgno, &page).map_err(to_io)?;
            }
        } else {
            for (pgno, page) in changed.iter().filter(|(p, _)| *p != lock_pgno) {
                encoder.encode_page(*pgno, page).map_err(to_io)?;
            }
        }
        let (bytes, _) = encoder.finish(0).map_err(to_io)?;
        Ok(Some(PendingUpload {
            bytes,
            max_txid: header.max_txid,
            commit_seq,
        }))
    }

    /// Applies a transaction another writer published (read-only followers): its pages become
    /// committed content, the database takes its size and TXID. Only call with no reader inside
    /// a transaction (see `ffi::with_quiet_database`).
    pub fn apply_remote(
        &self,
        pages: Vec<(u32, Vec<u8>)>,
        commit: u32,
        txid: u64,
    ) -> io::Result<()> {
        let mut inner = self.lock();
        if inner.pending_pages.is_some() {
            return Err(invalid("a follower cannot have local writes".into()));
        }
        if txid <= inner.txid {
            return Err(invalid(format!("TXID {txid} is not after {}", inner.txid)));
        }
        for (pgno, page) in pages {
            if page.len() != inner.page_size as usize {
                return Err(invalid(format!("page {pgno} has the wrong size")));
            }
            inner.committed.insert(pgno, Arc::new(page));
        }
        inner.committed.retain(|p, _| *p <= commit);
        inner.commit_pages = commit;
        inner.txid = txid;
        Ok(())
    }

    /// `upload` is durable in the store: the replica is at its TXID, and its pages no longer
    /// need uploading unless a later commit changed them again.
    pub fn uploaded(&self, upload: &PendingUpload) {
        let mut inner = self.lock();
        inner.txid = inner.txid.max(upload.max_txid);
        inner.uploaded_seq = inner.uploaded_seq.max(upload.commit_seq);
        inner
            .unsynced
            .retain(|_, changed_at| *changed_at > upload.commit_seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: u32 = 4096;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PS as usize]
    }

    fn read_page(state: &DatabaseState, pgno: u32) -> Vec<u8> {
        let mut buf = page(0xee);
        state
            .read(u64::from(pgno - 1) * u64::from(PS), &mut buf)
            .expect("read");
        buf
    }

    fn decode(bytes: &[u8]) -> (Header, BTreeMap<u32, Vec<u8>>) {
        let mut d = ltx::Decoder::new(bytes).expect("decoder");
        let h = *d.header();
        let mut buf = page(0);
        let mut pages = BTreeMap::new();
        while let Some(p) = d.next_page(&mut buf).expect("page") {
            pages.insert(p, buf.clone());
        }
        d.finish().expect("verify");
        (h, pages)
    }

    struct Base(Vec<Vec<u8>>);

    impl PageSource for Base {
        fn page_size(&self) -> u32 {
            PS
        }
        fn commit(&self) -> u32 {
            self.0.len() as u32
        }
        fn txid(&self) -> u64 {
            9
        }
        fn read_page(&self, pgno: u32) -> io::Result<Vec<u8>> {
            Ok(self.0[pgno as usize - 1].clone())
        }
    }

    #[test]
    fn writes_commit_and_become_l0_files() {
        let s = DatabaseState::new(None, PS).expect("state");
        assert_eq!(s.file_size(), 0);
        s.write(0, &page(1)).expect("write");
        s.write(u64::from(PS), &page(2)).expect("write");
        assert_eq!(
            s.file_size(),
            2 * u64::from(PS),
            "the writer sees its own size"
        );
        assert_eq!(s.commit(), Some(1));
        assert_eq!(s.commit(), None, "nothing pending");
        assert_eq!(read_page(&s, 2), page(2));

        let up = s
            .prepare_upload(1)
            .expect("prepare")
            .expect("something to upload");
        let (h, pages) = decode(&up.bytes);
        assert_eq!((h.min_txid, h.max_txid, h.commit), (1, 1, 2));
        assert_eq!(pages.len(), 2, "the first file is a snapshot");
        s.uploaded(&up);
        assert!(s.prepare_upload(2).expect("prepare").is_none());

        // A partial write changes only its bytes; the next L0 carries only that page.
        s.write(u64::from(PS) + 10, b"hello").expect("write");
        assert_eq!(s.commit(), Some(2));
        let up = s.prepare_upload(3).expect("prepare").expect("upload");
        let (h, pages) = decode(&up.bytes);
        assert_eq!((h.min_txid, h.max_txid), (2, 2));
        assert_eq!(pages.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(&pages[&2][10..15], b"hello");
        assert_eq!(pages[&2][9], 2);
    }

    #[test]
    fn a_commit_during_an_upload_stays_queued() {
        let s = DatabaseState::new(None, PS).expect("state");
        s.write(0, &page(1)).expect("write");
        s.commit();
        let up = s.prepare_upload(1).expect("prepare").expect("upload");
        s.write(0, &page(7)).expect("write");
        s.commit();
        s.uploaded(&up);
        let up = s
            .prepare_upload(2)
            .expect("prepare")
            .expect("page 1 changed again");
        let (h, pages) = decode(&up.bytes);
        assert_eq!((h.min_txid, h.max_txid), (2, 2));
        assert_eq!(pages[&1], page(7));
    }

    #[test]
    fn base_pages_overlay_and_size_never_shrinks_after_upload() {
        let base = Arc::new(Base(vec![page(1), page(2), page(3)]));
        let s = DatabaseState::new(Some(base), PS).expect("state");
        assert_eq!((s.txid(), s.file_size()), (9, 3 * u64::from(PS)));
        assert_eq!(read_page(&s, 3), page(3));
        s.write(u64::from(PS), &page(20)).expect("write");
        s.write(3 * u64::from(PS), &page(40)).expect("grow");
        assert_eq!(s.commit(), Some(1));
        let up = s.prepare_upload(1).expect("prepare").expect("upload");
        let (h, pages) = decode(&up.bytes);
        assert_eq!((h.min_txid, h.commit), (10, 4));
        assert_eq!(pages.keys().copied().collect::<Vec<_>>(), vec![2, 4]);
        s.uploaded(&up);
        // After the upload the base still describes TXID 9: reads must not fall back to it.
        assert_eq!(read_page(&s, 2), page(20));
        assert_eq!(s.file_size(), 4 * u64::from(PS));
    }

    #[test]
    fn truncation_and_bad_ranges() {
        let s = DatabaseState::new(None, PS).expect("state");
        for i in 0..3 {
            s.write(u64::from(i * PS), &page(i as u8 + 1))
                .expect("write");
        }
        s.commit();
        s.truncate(u64::from(PS)).expect("truncate");
        s.commit();
        assert_eq!(s.file_size(), u64::from(PS));
        let mut buf = page(9);
        assert_eq!(
            s.read(2 * u64::from(PS), &mut buf).expect("read past end"),
            0
        );
        assert_eq!(buf, page(0));
        assert!(
            s.read(u64::from(PS) - 2, &mut [0u8; 4]).is_err(),
            "crosses a page"
        );
        assert!(s.truncate(100).is_err());
        let up = s.prepare_upload(1).expect("prepare").expect("upload");
        assert_eq!(decode(&up.bytes).0.commit, 1);
        assert!(DatabaseState::new(None, 1000).is_err());
    }
}
