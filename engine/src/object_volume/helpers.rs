//! Small helpers every part of an object volume uses.

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

/// Runs blocking work (SQLite, file I/O) off the async workers.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| other("blocking task failed", e))?
}
