//! Hydration: restore the database a VFS state was opened at into a local file in the
//! background, verified, then make that file the state's base so reads stop going to the store.
//!
//! Pages committed while hydration runs live in the state's overlay, which always wins over the
//! base, so switching the base cannot lose them. Every downloaded file is verified in full
//! (page order, index, CRC-64 file checksum) before the switch.

use super::state::PageSource;
use crate::replica::{Replica, ReplicaError, ReplicaResult};
use ltx::RestoreTarget;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Observable progress of one hydration.
#[derive(Debug, Default)]
pub struct Progress {
    pub downloaded_bytes: AtomicU64,
    pub total_bytes: AtomicU64,
    pub complete: AtomicBool,
}

impl Progress {
    /// Fraction done, 0.0–1.0.
    pub fn fraction(&self) -> f64 {
        let total = self.total_bytes.load(Ordering::Relaxed);
        if self.complete.load(Ordering::Relaxed) {
            1.0
        } else if total == 0 {
            0.0
        } else {
            self.downloaded_bytes.load(Ordering::Relaxed) as f64 / total as f64
        }
    }
}

/// A database image in a local file.
pub struct LocalSource {
    file: File,
    page_size: u32,
    commit: u32,
    txid: u64,
}

impl PageSource for LocalSource {
    fn page_size(&self) -> u32 {
        self.page_size
    }

    fn commit(&self) -> u32 {
        self.commit
    }

    fn txid(&self) -> u64 {
        self.txid
    }

    fn read_page(&self, pgno: u32) -> io::Result<Vec<u8>> {
        let mut page = vec![0u8; self.page_size as usize];
        let offset = u64::from(pgno - 1) * u64::from(self.page_size);
        self.file.read_exact_at(&mut page, offset)?;
        Ok(page)
    }
}

/// Restores the replica at `txid` into `path` (written to a temporary name, synced, renamed).
pub async fn hydrate(
    replica: &Replica,
    txid: u64,
    path: &Path,
    progress: &Progress,
) -> ReplicaResult<LocalSource> {
    let files = replica.plan(RestoreTarget::Txid(txid)).await?;
    progress
        .total_bytes
        .store(files.iter().map(|f| f.size).sum(), Ordering::Relaxed);
    let mut downloaded = Vec::with_capacity(files.len());
    for f in &files {
        let bytes = replica.fetch(f).await?;
        progress
            .downloaded_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        downloaded.push(bytes);
    }
    let tmp = path.with_extension("hydrating");
    let io_err = |e: io::Error| ReplicaError::Invalid(format!("{}: {e}", tmp.display()));
    let out = File::create(&tmp).map_err(io_err)?;
    let readers: Vec<&[u8]> = downloaded.iter().map(|b| &b[..]).collect();
    let header = match ltx::compactor::write_database(readers, io::BufWriter::new(&out)) {
        Ok(header) => header,
        Err(source) => {
            // Never leave a half-written or unverified copy behind.
            let _ = std::fs::remove_file(&tmp);
            return Err(ReplicaError::Ltx {
                path: "hydration".into(),
                source,
            });
        }
    };
    out.sync_all().map_err(io_err)?;
    std::fs::rename(&tmp, path).map_err(io_err)?;
    let file = File::open(path).map_err(io_err)?;
    progress.complete.store(true, Ordering::Relaxed);
    Ok(LocalSource {
        file,
        page_size: header.page_size,
        commit: header.commit,
        txid: header.max_txid,
    })
}
