//! An `ObjectStore` wrapper that adds first-byte latency and injected failures, and counts
//! requests: for fault tests and for benchmarks against a "remote" store on one machine.

use crate::forward::{Around, Request, Wrapped};
use async_trait::async_trait;
use object_store::Result;
use object_store::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// The store inside, with injected latency and failures (see [`Faults`]).
pub type FaultyStore = Wrapped<Faults>;

/// What a [`FaultyStore`] injects, set while it runs; it also counts the requests it sees.
#[derive(Debug, Default)]
pub struct Faults {
    latency_us: AtomicU64,
    failures_left: AtomicU32,
    outage: AtomicU8,
    requests: AtomicU64,
    /// The process kills itself (SIGKILL) instead of making this change to the store (counted
    /// from 1; 0: never). See [`Faults::crash_before_change`].
    crash_at_change: AtomicU64,
    changes: AtomicU64,
    /// PUTs to paths containing this text wait until the gate closes (see [`Faults::hold_puts`]).
    held_puts: std::sync::Mutex<Option<(String, Arc<tokio::sync::Semaphore>)>>,
}

/// A lasting failure of every request, until it is set back to `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    None = 0,
    /// Requests fail as if the store did not answer (transient: worth retrying).
    Unreachable = 1,
    /// Requests are refused (credentials or bucket policy): retrying does not help.
    Denied = 2,
}

fn outage_error(outage: u8) -> Option<object_store::Error> {
    match outage {
        0 => None,
        2 => Some(object_store::Error::PermissionDenied {
            path: String::new(),
            source: "injected outage: access denied".into(),
        }),
        _ => Some(object_store::Error::Generic {
            store: "faulty",
            source: "injected outage: store unreachable".into(),
        }),
    }
}

impl Faults {
    /// Delay added before every request is answered.
    pub fn set_latency(&self, latency: Duration) {
        self.latency_us
            .store(latency.as_micros() as u64, Ordering::Relaxed);
    }

    /// The next `n` requests fail with a transient error.
    pub fn fail_next(&self, n: u32) {
        self.failures_left.store(n, Ordering::Relaxed);
    }

    /// Every request fails this way from now on, until `Outage::None`.
    pub fn set_outage(&self, outage: Outage) {
        self.outage.store(outage as u8, Ordering::Relaxed);
    }

    /// PUTs to paths containing `fragment` wait (before reaching the store) until
    /// [`Faults::release_puts`]: to put another writer's step in between two of a test
    /// subject's.
    pub fn hold_puts(&self, fragment: &str) {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        *self.held_puts.lock().unwrap_or_else(|e| e.into_inner()) = Some((fragment.into(), gate));
    }

    /// Lets held PUTs (and later ones) through.
    pub fn release_puts(&self) {
        if let Some((_, gate)) = self
            .held_puts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            gate.close();
        }
    }

    async fn wait_if_held(&self, location: &Path) {
        let gate = self
            .held_puts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|(fragment, _)| location.as_ref().contains(fragment.as_str()))
            .map(|(_, gate)| Arc::clone(gate));
        if let Some(gate) = gate {
            // Closed is the release: nothing is ever granted.
            let _ = gate.acquire().await;
        }
    }

    /// The process dies by SIGKILL just before the `n`th change it would make to the store (a
    /// PUT, a multipart step, a copy or rename, each object of a delete): crash tests run a verb
    /// once per `n` to leave the store in every state the verb passes through.
    pub fn crash_before_change(&self, n: u64) {
        self.crash_at_change.store(n, Ordering::Relaxed);
    }

    fn change(&self) {
        let n = self.changes.fetch_add(1, Ordering::Relaxed) + 1;
        if n == self.crash_at_change.load(Ordering::Relaxed) {
            tracing::warn!("injected crash before store change {n}");
            // SAFETY: kill(2) on this process's own id; no memory is involved.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }

    /// Requests seen so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    async fn enter(&self) -> Result<()> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let latency = self.latency_us.load(Ordering::Relaxed);
        if latency > 0 {
            tokio::time::sleep(Duration::from_micros(latency)).await;
        }
        if let Some(e) = outage_error(self.outage.load(Ordering::Relaxed)) {
            return Err(e);
        }
        let failing = self
            .failures_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(object_store::Error::Generic {
                store: "faulty",
                source: "injected failure".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Around for Faults {
    const NAME: &'static str = "FaultyStore";

    async fn before(&self, request: Request<'_>) -> Result<()> {
        match request {
            // A bulk delete is counted, and fails only in an outage: no latency, and it does
            // not use up failures meant for the requests a test is about.
            Request::Delete => {
                self.requests.fetch_add(1, Ordering::Relaxed);
                outage_error(self.outage.load(Ordering::Relaxed)).map_or(Ok(()), Err)
            }
            Request::Put { location, .. } => {
                self.wait_if_held(location).await;
                self.change();
                self.enter().await
            }
            Request::MultipartStart { .. }
            | Request::MultipartPart { .. }
            | Request::MultipartComplete
            | Request::Copy { .. }
            | Request::Rename { .. } => {
                self.change();
                self.enter().await
            }
            _ => self.enter().await,
        }
    }

    fn deleting(&self, _location: &Path) {
        self.change();
    }
}
