//! Small helpers every part of an object volume uses.

use crate::device::DeviceError;
use std::io;
use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking the data over from a thread that panicked while holding it: the volume's
/// mutexes guard state that stays consistent between statements, and a panic is logged where
/// it happened, so refusing every later caller would only turn one failure into many.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An I/O error that says what was being done.
pub(super) fn other(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// A failed block-map query as the device reports it. Pages the map has not hydrated yet are
/// read from the store through the VFS, so an I/O error there means the store did not answer
/// (after the VFS's retries); a page that fails its checks is corrupt.
pub(super) fn map_error(what: &str, e: blockmap::Error) -> io::Error {
    use rusqlite::ErrorCode;
    let code = match &e {
        blockmap::Error::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => Some(f.code),
        _ => None,
    };
    match code {
        Some(ErrorCode::SystemIoFailure) => {
            DeviceError::StoreUnavailable(format!("{what}: {e}")).into_io()
        }
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
            DeviceError::Corrupt(format!("{what}: {e}")).into_io()
        }
        _ => other(what, e),
    }
}

/// Runs blocking work (SQLite, file I/O) off the async workers.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| other("blocking task failed", e))?
}
