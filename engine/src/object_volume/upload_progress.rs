//! How far uploads have got and who waits for them (docs/ARCHITECTURE.md §3): the journal seq
//! stored so far, the seq someone waits to see stored, the uploader's wake-up, the store's
//! health, and whether this volume was fenced. Writers, FLUSH with remote durability and
//! `sync_to_store` wait here; the uploader publishes here.

use super::helpers::lock;
use super::upload_health::UploadHealth;
use crate::device::{DeviceError, DeviceResult};
use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};

/// How often a writer waiting for the uploader re-checks that the store makes progress.
const STALL_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Writers wake the uploader at most this often (it decides itself whether to upload).
const NUDGE_EVERY_MS: u64 = 50;

pub(super) struct UploadProgress {
    /// Highest journal seq whose writes are in object storage.
    uploaded: watch::Sender<u64>,
    /// Highest journal seq someone waits to see stored (remote FLUSH, `sync_to_store`).
    wanted: AtomicU64,
    wake: Notify,
    /// When writers last woke the uploader, in milliseconds since `started`.
    last_nudge_ms: AtomicU64,
    started: Instant,
    /// Whether uploads progress; how long writers waited for them.
    pub(super) health: UploadHealth,
    /// Why this volume stopped accepting writes: another writer took it over.
    fenced: Mutex<Option<String>>,
}

impl UploadProgress {
    pub(super) fn new(uploaded: u64, stall_timeout: Duration) -> Self {
        UploadProgress {
            uploaded: watch::channel(uploaded).0,
            wanted: AtomicU64::new(0),
            wake: Notify::new(),
            last_nudge_ms: AtomicU64::new(0),
            started: Instant::now(),
            health: UploadHealth::new(stall_timeout),
            fenced: Mutex::new(None),
        }
    }

    /// The highest journal seq in object storage.
    pub(super) fn uploaded(&self) -> u64 {
        *self.uploaded.borrow()
    }

    /// The highest journal seq someone waits for.
    pub(super) fn wanted(&self) -> u64 {
        self.wanted.load(Ordering::Acquire)
    }

    /// The uploader stored everything through `seq`: wakes whoever waits for it.
    pub(super) fn publish(&self, seq: u64) {
        self.uploaded.send_replace(seq);
    }

    /// Resolves when a writer or a waiter wakes the uploader.
    pub(super) async fn woken(&self) {
        self.wake.notified().await
    }

    /// Wakes the uploader, at most every [`NUDGE_EVERY_MS`]: with a busy journal every write
    /// would, and each wake-up is a decision.
    pub(super) fn nudge(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_nudge_ms.load(Ordering::Relaxed);
        if now >= last + NUDGE_EVERY_MS
            && self
                .last_nudge_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.wake.notify_one();
        }
    }

    /// Another writer took the volume: refuse writes from now on, and wake everyone waiting
    /// for the uploader so that they see it.
    pub(super) fn fence(&self, volume: &str, why: String) {
        tracing::error!(volume, "{why}; refusing further writes");
        self.stop_writes(why);
    }

    /// Refuses writes from now on for a reason that is no failure (the volume is being
    /// restored), and wakes everyone waiting for the uploader.
    pub(super) fn stop_writes(&self, why: String) {
        *lock(&self.fenced) = Some(why);
        self.uploaded.send_modify(|_| {});
    }

    pub(super) fn is_fenced(&self) -> bool {
        lock(&self.fenced).is_some()
    }

    /// [`DeviceError::Fenced`] once this volume was fenced.
    pub(super) fn check_not_fenced(&self) -> DeviceResult<()> {
        match lock(&self.fenced).as_ref() {
            Some(why) => Err(DeviceError::Fenced(why.clone())),
            None => Ok(()),
        }
    }

    /// `Err` if waiting for the uploader is pointless: this volume was fenced, or the store
    /// stalled or refuses uploads. Logged once per stall.
    fn stopped(&self, volume: &str) -> DeviceResult<()> {
        self.check_not_fenced()?;
        self.health.check().map_err(|stall| {
            if self.health.first_report() {
                tracing::error!(volume, "failing writes that wait for the store: {stall}");
            }
            DeviceError::StoreUnavailable(stall.to_string())
        })
    }

    /// Waits until the uploader has stored everything through `seq`. Gives up when the store
    /// has stalled (see [`UploadHealth`]).
    pub(super) async fn wait_uploaded(&self, seq: u64, volume: &str) -> DeviceResult<()> {
        self.wanted.fetch_max(seq, Ordering::AcqRel);
        let mut rx = self.uploaded.subscribe();
        loop {
            if *rx.borrow_and_update() >= seq {
                return Ok(());
            }
            self.stopped(volume)?;
            self.wake.notify_one();
            self.wait_for_step(&mut rx).await?;
        }
    }

    /// Back-pressure: while `limit` bytes of journaled data wait for upload (`dirty` says how
    /// many), writers wait for the uploader to make room, for as long as the store makes
    /// progress.
    pub(super) async fn wait_for_room(
        &self,
        dirty: impl Fn() -> u64,
        limit: u64,
        volume: &str,
    ) -> DeviceResult<()> {
        let now = dirty();
        if now < limit {
            if now >= limit / 4 {
                self.nudge();
            }
            return Ok(());
        }
        let started = Instant::now();
        let mut rx = self.uploaded.subscribe();
        let outcome = loop {
            if dirty() < limit {
                break Ok(());
            }
            if let Err(e) = self.stopped(volume) {
                break Err(e);
            }
            self.nudge();
            if let Err(e) = self.wait_for_step(&mut rx).await {
                break Err(e);
            }
        };
        self.health.waited(started.elapsed());
        outcome
    }

    /// Until the uploader's next step, or [`STALL_CHECK_EVERY`] (to re-check the store's health).
    async fn wait_for_step(&self, rx: &mut watch::Receiver<u64>) -> DeviceResult<()> {
        match tokio::time::timeout(STALL_CHECK_EVERY, rx.changed()).await {
            Ok(Ok(())) | Err(_) => Ok(()),
            Ok(Err(_)) => Err(io::Error::other("the uploader stopped").into()),
        }
    }
}
