//! When the uploader starts uploading, and how far one step may go.
//!
//! An upload stores the journal up to some position `p` (a prefix of the write history). It
//! runs in bounded steps: each step takes at most [`step_blocks`] blocks (and so at most that
//! many block sizes of content), commits them and releases that part of the journal, so the
//! journal drains continuously however much is waiting.
//!
//! *When* to start is a trade-off between how far the store lags behind and how much is
//! uploaded: every edit of a block up to `p` is folded into one stored version, so a block
//! rewritten a hundred times between two uploads is stored once. Under a load that keeps
//! rewriting the same blocks (a database, a VM's hot files) waiting longer saves whole-block
//! rewrites and the store space they would take until collected; under a load that writes
//! new blocks (a copy, a sequential fill) waiting saves nothing. The policy tells the two apart
//! by what the previous upload and this one have in common: when at least
//! [`OVERWRITE_HEAVY_SHARE`] of an upload's blocks were also in the one before, the uploader
//! lets the store lag up to `max_lag`; otherwise it uploads every sync interval. It never lags
//! with remote durability, when someone waits for an upload (FLUSH with remote durability,
//! close), or once the journal is half full.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Blocks one upload step stores at most, unless configured: as many as the journal limit
/// holds in block content (65,536 at 64 KiB blocks and 4 GiB), within these bounds. A hot
/// working set up to the journal's size is then folded into one step (a step that split it
/// would upload its rewritten blocks once per step: 4 KiB random writes over 8 GiB with 2 GiB
/// steps PUT 8x the bytes written), while one step of a sparse fill (one short write per
/// block, the worst case for per-block work) stays a few seconds of work. Chunks are built,
/// PUT and cached as they fill, so memory does not grow with the step. The floor of 16,384:
/// on a sparse fill at +20 ms, steps of 4,096 blocks gave 15k IOPS and a 7 s drain at a 256 MiB
/// journal, 16,384 and more 17–22k and 4–5 s (`bench/results/upload-step-2026-12-05.md`).
pub const STEP_MIN_BLOCKS: u64 = 16 * 1024;
pub const STEP_MAX_BLOCKS: u64 = 256 * 1024;

/// The step bound for a journal limit and block size (see [`STEP_MIN_BLOCKS`]).
pub fn step_blocks(journal_limit: u64, block_size: u32) -> usize {
    (journal_limit / u64::from(block_size).max(1)).clamp(STEP_MIN_BLOCKS, STEP_MAX_BLOCKS) as usize
}

/// Share of an upload's blocks that were also in the previous upload from which the load
/// counts as overwrite-heavy. Roughly the share of block uploads that waiting saves, so it is
/// low: 4 KiB random writes over 8 GiB at 30k IOPS share ~20 % of their blocks from one
/// 1 s upload to the next, and lagging 30 s cuts their bytes PUT from 14x to 2.3x the bytes
/// written. Sequential writes and sparse fills share almost none.
pub const OVERWRITE_HEAVY_SHARE: f64 = 0.1;
/// Journal positions remembered with the time they were reached: at most one per
/// [`CLOCK_RESOLUTION`], so the samples span far more than any lag allowed however often the
/// uploader is woken.
const CLOCK_SAMPLES: usize = 4096;
const CLOCK_RESOLUTION: Duration = Duration::from_millis(100);

/// What the uploader knows when it decides.
#[derive(Debug, Clone, Copy)]
pub struct Situation {
    /// Last journal seq appended.
    pub journaled: u64,
    /// Last journal seq stored.
    pub uploaded: u64,
    /// Highest seq someone is waiting to see stored (FLUSH with remote durability, close).
    pub wanted: u64,
    /// Journaled bytes waiting for upload, and the limit at which writers wait.
    pub dirty_bytes: u64,
    pub journal_limit: u64,
}

/// Why an upload starts (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Someone waits for it.
    Wanted,
    /// Remote durability: the store keeps up with the journal.
    Remote,
    /// The journal is half full.
    JournalFilling,
    /// The oldest waiting write is older than the lag allowed now.
    Due,
}

#[derive(Debug)]
pub struct UploadPolicy {
    sync_interval: Duration,
    max_lag: Duration,
    remote: bool,
    /// `(seq, when)`: the journal's next seq at that moment (records from `seq` on came later).
    clock: VecDeque<(u64, Instant)>,
    /// Blocks of the previous upload, sorted.
    previous: Vec<u64>,
    /// Blocks of the upload in progress (all its steps), unsorted.
    current: Vec<u64>,
    overwrite_heavy: bool,
}

impl UploadPolicy {
    pub fn new(sync_interval: Duration, max_lag: Duration, remote: bool) -> Self {
        UploadPolicy {
            sync_interval,
            max_lag: max_lag.max(sync_interval),
            remote,
            clock: VecDeque::new(),
            previous: Vec::new(),
            current: Vec::new(),
            overwrite_heavy: false,
        }
    }

    /// Notes that at `now` the next journal record will get seq `next_seq`.
    pub fn tick(&mut self, next_seq: u64, now: Instant) {
        if self.clock.back().is_some_and(|&(seq, when)| {
            seq == next_seq || now.saturating_duration_since(when) < CLOCK_RESOLUTION
        }) {
            return;
        }
        self.clock.push_back((next_seq, now));
        if self.clock.len() > CLOCK_SAMPLES {
            self.clock.pop_front();
        }
    }

    /// How long the oldest write not yet stored has waited, at least (`None`: nothing waits).
    /// Known to the resolution of [`UploadPolicy::tick`].
    pub fn oldest_wait(&self, s: &Situation, now: Instant) -> Option<Duration> {
        if s.journaled <= s.uploaded {
            return None;
        }
        // The latest sample taken before record `uploaded + 1` was written; if that is older
        // than every sample kept (or than the first), at least as old as the oldest.
        let before = self
            .clock
            .iter()
            .rev()
            .find(|&&(next_seq, _)| next_seq <= s.uploaded + 1)
            .or(self.clock.front())
            .map(|&(_, when)| when);
        Some(before.map_or(Duration::ZERO, |when| now.saturating_duration_since(when)))
    }

    /// How far behind the store may be now.
    pub fn allowed_lag(&self) -> Duration {
        if self.overwrite_heavy && !self.remote {
            self.max_lag
        } else {
            self.sync_interval
        }
    }

    #[cfg(test)]
    pub fn overwrite_heavy(&self) -> bool {
        self.overwrite_heavy
    }

    /// Whether to upload everything journaled now, and why.
    pub fn decide(&self, s: &Situation, now: Instant) -> Option<Reason> {
        let age = self.oldest_wait(s, now)?;
        if s.wanted > s.uploaded {
            Some(Reason::Wanted)
        } else if self.remote {
            Some(Reason::Remote)
        } else if s.dirty_bytes >= s.journal_limit / 2 {
            Some(Reason::JournalFilling)
        } else if age >= self.allowed_lag() || !self.overwrite_heavy {
            // Without overwrites, the tick itself is the sync interval: upload at once.
            Some(Reason::Due)
        } else {
            None
        }
    }

    /// Notes the blocks one step stored.
    pub fn step_done(&mut self, blocks: &[u64]) {
        self.current.extend_from_slice(blocks);
    }

    /// Ends an upload (all its steps): compares its blocks with the previous upload's.
    pub fn upload_done(&mut self) {
        let mut current = std::mem::take(&mut self.current);
        current.sort_unstable();
        current.dedup();
        if current.is_empty() {
            return;
        }
        let shared = current
            .iter()
            .filter(|b| self.previous.binary_search(b).is_ok())
            .count();
        let heavy = shared as f64 >= OVERWRITE_HEAVY_SHARE * current.len() as f64;
        if heavy != self.overwrite_heavy {
            tracing::debug!(
                shared,
                blocks = current.len(),
                "uploads {} overwrite-heavy",
                if heavy { "became" } else { "are no longer" }
            );
        }
        self.overwrite_heavy = heavy;
        self.previous = current;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn situation(journaled: u64, uploaded: u64) -> Situation {
        Situation {
            journaled,
            uploaded,
            wanted: 0,
            dirty_bytes: 1 << 20,
            journal_limit: 4 << 30,
        }
    }

    #[test]
    fn steps_hold_the_journal_limit_in_blocks_within_bounds() {
        assert_eq!(step_blocks(4 << 30, 65536), 65536);
        assert_eq!(step_blocks(1 << 20, 65536), STEP_MIN_BLOCKS as usize);
        assert_eq!(step_blocks(64 << 30, 4096), STEP_MAX_BLOCKS as usize);
    }

    #[test]
    fn nothing_waiting_means_no_upload() {
        let p = UploadPolicy::new(Duration::from_secs(1), Duration::from_secs(30), false);
        assert_eq!(p.decide(&situation(5, 5), Instant::now()), None);
    }

    #[test]
    fn new_blocks_upload_every_tick_and_rewrites_let_the_store_lag() {
        let start = Instant::now();
        let mut p = UploadPolicy::new(Duration::from_secs(1), Duration::from_secs(30), false);
        p.tick(1, start);
        let at = |s| start + Duration::from_secs(s);
        assert_eq!(p.decide(&situation(10, 0), at(1)), Some(Reason::Due));
        // Two uploads of the same blocks: overwrite-heavy, so the store may lag 30 s.
        p.step_done(&[1, 2, 3, 4]);
        p.upload_done();
        p.step_done(&[4, 3, 2, 9]);
        p.upload_done();
        assert!(p.overwrite_heavy());
        p.tick(11, at(2));
        let s = situation(50, 10);
        assert_eq!(p.decide(&s, at(20)), None, "18 s old: within the lag");
        assert_eq!(p.decide(&s, at(32)), Some(Reason::Due));
        // The journal filling, a waiter and remote durability do not wait.
        let filling = Situation {
            dirty_bytes: 2 << 30,
            ..s
        };
        assert_eq!(p.decide(&filling, at(3)), Some(Reason::JournalFilling));
        let wanted = Situation { wanted: 12, ..s };
        assert_eq!(p.decide(&wanted, at(3)), Some(Reason::Wanted));
        // New blocks again: back to uploading every tick.
        p.step_done(&[100, 101, 102]);
        p.upload_done();
        assert!(!p.overwrite_heavy());
        assert_eq!(p.decide(&s, at(3)), Some(Reason::Due));
    }

    #[test]
    fn remote_durability_never_lags() {
        let mut p = UploadPolicy::new(Duration::from_secs(1), Duration::from_secs(30), true);
        p.step_done(&[1]);
        p.upload_done();
        p.step_done(&[1]);
        p.upload_done();
        assert_eq!(p.allowed_lag(), Duration::from_secs(1));
        assert_eq!(
            p.decide(&situation(3, 2), Instant::now()),
            Some(Reason::Remote)
        );
    }

    #[test]
    fn a_flood_of_ticks_does_not_lose_the_oldest_write() {
        let start = Instant::now();
        let mut p = UploadPolicy::new(Duration::from_secs(1), Duration::from_secs(30), false);
        // Woken by every write for a minute: one sample per 100 ms is kept, the oldest stays.
        for i in 0..600_000u64 {
            p.tick(i + 1, start + Duration::from_micros(i * 100));
        }
        let now = start + Duration::from_secs(60);
        let age = p.oldest_wait(&situation(600_000, 0), now).expect("waiting");
        assert!(age >= Duration::from_secs(59), "{age:?}");
    }

    #[test]
    fn the_oldest_wait_is_measured_from_the_tick_before_it() {
        let start = Instant::now();
        let mut p = UploadPolicy::new(Duration::from_secs(1), Duration::from_secs(30), false);
        p.tick(1, start);
        p.tick(5, start + Duration::from_secs(4));
        p.tick(9, start + Duration::from_secs(8));
        let now = start + Duration::from_secs(10);
        // Record 5 came after the tick at 4 s.
        assert_eq!(
            p.oldest_wait(&situation(12, 4), now),
            Some(Duration::from_secs(6))
        );
        assert_eq!(
            p.oldest_wait(&situation(12, 0), now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            p.oldest_wait(&situation(12, 8), now),
            Some(Duration::from_secs(2))
        );
    }
}
