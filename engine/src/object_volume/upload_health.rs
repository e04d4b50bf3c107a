//! Whether uploads are getting anywhere, for back-pressure: writers that wait for room in the
//! journal keep waiting while the store makes progress, however slowly, and fail only when it
//! has made none for the stall timeout or refuses uploads for good (a missing bucket, denied
//! credentials). Waiting is counted for the metrics endpoint.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Why writers waiting for the uploader are given up on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadStall {
    #[error(
        "object storage made no progress for {} s (the stall timeout); last error: {last_error}",
        .waited.as_secs()
    )]
    NoProgress {
        waited: Duration,
        last_error: String,
    },
    #[error("object storage refuses uploads: {0}")]
    Refused(String),
}

#[derive(Debug)]
pub struct UploadHealth {
    stall_timeout: Duration,
    /// The last successful store request of an upload (a chunk PUT, a map sync).
    last_progress: Mutex<Instant>,
    /// The last upload failure since that progress, and whether retrying can help.
    last_error: Mutex<Option<(String, bool)>>,
    /// Nanoseconds writers spent waiting for room in the journal, and how many waits.
    pub wait_nanos: AtomicU64,
    pub waits: AtomicU64,
    /// The uploader's view at its last tick: how long the oldest write not stored has waited,
    /// and how long the policy lets it wait now.
    pub lag_millis: AtomicU64,
    pub allowed_lag_millis: AtomicU64,
    /// The current stall was logged (once, not once per failed write).
    stall_logged: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Upload failures another try cannot fix: the store says the credentials are refused, or that
/// the bucket (or a chunk the upload builds on) is not there.
pub fn is_permanent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::PermissionDenied | io::ErrorKind::NotFound
    )
}

impl UploadHealth {
    pub fn new(stall_timeout: Duration) -> Self {
        UploadHealth {
            stall_timeout,
            last_progress: Mutex::new(Instant::now()),
            last_error: Mutex::new(None),
            wait_nanos: AtomicU64::new(0),
            waits: AtomicU64::new(0),
            lag_millis: AtomicU64::new(0),
            allowed_lag_millis: AtomicU64::new(0),
            stall_logged: AtomicBool::new(false),
        }
    }

    /// A store request of an upload succeeded.
    pub fn progress(&self) {
        *lock(&self.last_progress) = Instant::now();
        *lock(&self.last_error) = None;
        if self.stall_logged.swap(false, Ordering::Relaxed) {
            tracing::info!("object storage is making progress again; writes are accepted");
        }
    }

    /// Whether this is the first report of the current stall (log it then, not per write).
    pub fn first_report(&self) -> bool {
        !self.stall_logged.swap(true, Ordering::Relaxed)
    }

    /// An upload failed; it will be retried.
    pub fn failed(&self, e: &io::Error) {
        *lock(&self.last_error) = Some((e.to_string(), is_permanent(e)));
    }

    /// Nothing to upload: the store is not behind, so waiting writers (if any) are not stalled.
    pub fn idle(&self) {
        *lock(&self.last_progress) = Instant::now();
    }

    /// `Err` once waiting on the uploader is pointless.
    pub fn check(&self) -> Result<(), UploadStall> {
        if let Some((e, true)) = lock(&self.last_error).as_ref() {
            return Err(UploadStall::Refused(e.clone()));
        }
        let waited = lock(&self.last_progress).elapsed();
        if waited >= self.stall_timeout {
            let last_error = lock(&self.last_error).as_ref().map_or_else(
                || "none (requests did not finish)".to_string(),
                |e| e.0.clone(),
            );
            return Err(UploadStall::NoProgress { waited, last_error });
        }
        Ok(())
    }

    /// Counts one writer's wait.
    pub fn waited(&self, how_long: Duration) {
        self.waits.fetch_add(1, Ordering::Relaxed);
        self.wait_nanos
            .fetch_add(how_long.as_nanos() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalls_only_without_progress_or_on_refusal() {
        let h = UploadHealth::new(Duration::from_millis(50));
        assert_eq!(h.check(), Ok(()));
        h.failed(&io::Error::other("connection reset"));
        assert_eq!(h.check(), Ok(()), "a transient failure is retried");
        std::thread::sleep(Duration::from_millis(60));
        match h.check() {
            Err(UploadStall::NoProgress { last_error, .. }) => {
                assert_eq!(last_error, "connection reset")
            }
            other => panic!("expected a stall, got {other:?}"),
        }
        h.progress();
        assert_eq!(h.check(), Ok(()));
        h.failed(&io::Error::new(
            io::ErrorKind::PermissionDenied,
            "access denied",
        ));
        assert_eq!(h.check(), Err(UploadStall::Refused("access denied".into())));
    }
}
