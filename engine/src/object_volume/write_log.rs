//! The write log (docs/ARCHITECTURE.md §3): the journal on local disk, the overlay that says
//! which journal record holds the newest content of each block, and how much journaled data
//! waits for upload. Writers append here; the uploader drains it; reads look here first.

use super::helpers::lock;
use crate::journal::Journal;
use crate::overlay::Overlay;
use bytes::Bytes;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// One change a client made, as the journal records it.
pub(super) enum Change {
    Write { offset: u64, data: Bytes },
    Zero { offset: u64, length: u64 },
}

impl Change {
    /// Payload bytes (zeroing carries none).
    pub(super) fn len(&self) -> usize {
        match self {
            Change::Write { data, .. } => data.len(),
            Change::Zero { .. } => 0,
        }
    }
}

pub(super) struct WriteLog {
    /// `None` for a read-only volume. The overlay is updated while this lock is held, so both
    /// see changes in the same (seq) order.
    journal: Mutex<Option<Journal>>,
    overlay: RwLock<Overlay>,
    /// Bumped whenever uploaded edits leave the overlay: a read that combined an overlay edit
    /// with a stored base looked up before that moment must start over.
    generation: AtomicU64,
    /// Journaled bytes the overlay still points at (not uploaded yet).
    dirty_bytes: AtomicU64,
}

impl WriteLog {
    pub(super) fn new(journal: Option<Journal>, overlay: Overlay) -> Self {
        let dirty = overlay.data_bytes() as u64;
        WriteLog {
            journal: Mutex::new(journal),
            overlay: RwLock::new(overlay),
            generation: AtomicU64::new(0),
            dirty_bytes: AtomicU64::new(dirty),
        }
    }

    pub(super) fn overlay(&self) -> RwLockReadGuard<'_, Overlay> {
        self.overlay.read().unwrap_or_else(|e| e.into_inner())
    }

    fn overlay_mut(&self) -> RwLockWriteGuard<'_, Overlay> {
        self.overlay.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn journal(&self) -> MutexGuard<'_, Option<Journal>> {
        lock(&self.journal)
    }

    pub(super) fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes.load(Ordering::Relaxed)
    }

    /// See [`WriteLog::generation`]; read before a lookup in the block map.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Appends a change to the journal and the overlay under one lock; returns its seq.
    /// The data is checksummed before the lock, so concurrent writers do that in parallel.
    pub(super) fn append(&self, change: Change) -> io::Result<u64> {
        let data_crc = match &change {
            Change::Write { data, .. } => crate::checksum::crc32c(data),
            Change::Zero { .. } => 0,
        };
        let mut journal = self.journal();
        let journal = journal
            .as_mut()
            .ok_or_else(|| io::Error::other("volume is read-only"))?;
        match change {
            Change::Write { offset, data } => {
                // The overlay points into the journal: the payload's memory is freed now.
                let (seq, at) = journal.append_write_located(offset, &data, data_crc)?;
                let len = data.len() as u64;
                self.dirty_bytes.fetch_add(len, Ordering::Relaxed);
                self.overlay_mut().write_journaled(seq, offset, len, at);
                Ok(seq)
            }
            Change::Zero { offset, length } => {
                let seq = journal.append_zero(offset, length)?;
                self.overlay_mut().zero(seq, offset, length);
                Ok(seq)
            }
        }
    }

    /// The seq of the last change appended to the journal.
    pub(super) fn journaled_through(&self) -> u64 {
        self.journal()
            .as_ref()
            .map_or(0, |j| j.next_seq().saturating_sub(1))
    }

    /// Makes every appended change durable on local disk (without holding the journal's lock
    /// while the disk works).
    pub(super) async fn sync(&self) -> io::Result<()> {
        let handle = match self.journal().as_ref() {
            Some(j) => j.sync_handle()?,
            None => return Ok(()),
        };
        super::helpers::blocking(move || handle.run()).await
    }

    /// The uploader stored everything through `end`: the overlay forgets those edits (reads
    /// in flight are told to start over). Returns the journaled bytes released.
    pub(super) fn uploaded_through(&self, end: u64) -> u64 {
        let mut overlay = self.overlay_mut();
        let before = overlay.data_bytes() as u64;
        overlay.drop_through(end);
        self.generation.fetch_add(1, Ordering::Release);
        let after = overlay.data_bytes() as u64;
        self.dirty_bytes.store(after, Ordering::Relaxed);
        before - after
    }

    /// Frees the journal's space up to `end` (after [`WriteLog::uploaded_through`]).
    pub(super) fn release_journal(&self, end: u64) -> io::Result<()> {
        match self.journal().as_mut() {
            Some(journal) => journal.release(end),
            None => Ok(()),
        }
    }
}
