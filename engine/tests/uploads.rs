//! Uploads under load, against a real local-directory store: bounded steps that fold rewrites,
//! back-pressure that waits while the store makes progress and fails only when it has made
//! none for the stall timeout (or refuses uploads), a store that lags only as far as allowed
//! under overwrites, and garbage collection that keeps exactly the restore window.

use engine::object_volume::{Durability, ObjectVolume, VolumeConfig};
use engine::{BlockDevice, DeviceError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use stores::faulty::{FaultyStore, Outage};

mod common;
use common::{Fixture, MIB, chunk_files, metric, pattern, read, restore_state};

const BLOCK: u64 = 65536;

/// A volume whose uploads happen only when asked (or when the journal fills).
fn quiet(f: &Fixture, local: &str) -> VolumeConfig {
    let mut c = f.config(local);
    c.sync_interval = Duration::from_secs(3600);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_go_in_bounded_steps_and_fold_rewrites() {
    let f = Fixture::new(64 * MIB, BLOCK as u32).await;
    let mut config = quiet(&f, "local");
    config.upload_step_blocks = Some(16);
    let v = f.open(config).await;
    // 100 blocks written once each: at most 16 per step, so at least 7 steps.
    for b in 0..100u64 {
        v.write(b * BLOCK, pattern(4096, b as u8), false)
            .await
            .expect("write");
    }
    v.sync_to_store().await.expect("upload");
    let stats = v.stats().await.expect("stats");
    assert_eq!(stats.uploaded_blocks, 100, "{stats:?}");
    assert!(stats.uploads >= 7, "{stats:?}");
    assert_eq!(stats.journal_bytes, 0, "every step released its journal");
    // Let the uploader see that nothing is left (a wake-up from the sync may be pending).
    tokio::time::sleep(Duration::from_millis(300)).await;
    // 8 blocks rewritten 50 times each between two uploads: each is stored once.
    for round in 0..50u64 {
        for b in 0..8u64 {
            v.write(b * BLOCK + round * 512, pattern(512, round as u8), false)
                .await
                .expect("write");
        }
    }
    v.sync_to_store().await.expect("upload");
    let after = v.stats().await.expect("stats");
    assert_eq!(
        after.uploaded_blocks - stats.uploaded_blocks,
        8,
        "{after:?}"
    );
    assert_eq!(after.uploads - stats.uploads, 1, "{after:?}");
    assert_eq!(
        after.uploaded_journal_bytes - stats.uploaded_journal_bytes,
        400 * 512
    );
    let expected: Vec<u8> = {
        let mut block = pattern(4096, 0).to_vec();
        block.resize(BLOCK as usize, 0);
        for round in 0..50usize {
            block[round * 512..(round + 1) * 512].copy_from_slice(&pattern(512, round as u8));
        }
        block
    };
    v.close().await.expect("close");
    let fresh = f.open(f.config("fresh")).await;
    assert_eq!(read(&fresh, 0, BLOCK as u32).await, expected);
    fresh.close().await.expect("close");
}

/// A volume on a store that can be made to fail, with a 1 MiB journal.
async fn small_journal(f: &Fixture, stall_timeout: Duration) -> (ObjectVolume, Arc<FaultyStore>) {
    let faulty = Arc::new(FaultyStore::new(Arc::clone(&f.store)));
    let mut config = f.config("local");
    config.max_dirty_bytes = MIB;
    config.stall_timeout = stall_timeout;
    let v = f.open_on(Arc::clone(&faulty) as _, config).await;
    (v, faulty)
}

/// Writes until one write has to wait for the uploader (the store is down): returns that
/// write, still running.
async fn fill_until_a_write_waits(
    v: &Arc<ObjectVolume>,
) -> tokio::task::JoinHandle<engine::DeviceResult<()>> {
    for b in 0..64u64 {
        let v = Arc::clone(v);
        let write = tokio::spawn(async move { v.write(b * BLOCK, pattern(65536, 1), false).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        if !write.is_finished() {
            return write;
        }
        write
            .await
            .expect("task")
            .expect("write before the journal is full");
    }
    panic!("64 MiB written into a 1 MiB journal without waiting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_wait_while_the_store_is_down_and_go_on_when_it_is_back() {
    let f = Fixture::new(64 * MIB, BLOCK as u32).await;
    let (v, faulty) = small_journal(&f, Duration::from_secs(60)).await;
    let v = Arc::new(v);
    faulty.set_outage(Outage::Unreachable);
    let waiting = fill_until_a_write_waits(&v).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !waiting.is_finished(),
        "the write neither failed nor went through"
    );
    faulty.set_outage(Outage::None);
    tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the write goes on once the store is back")
        .expect("task")
        .expect("and succeeds");
    assert!(metric(&v, "bucketdisk_write_waits_total").await >= 1.0);
    assert!(metric(&v, "bucketdisk_write_wait_seconds_total").await >= 3.0);
    v.sync_to_store().await.expect("upload");
    v.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_progress_fails_writes_after_the_stall_timeout_not_before() {
    let f = Fixture::new(64 * MIB, BLOCK as u32).await;
    let timeout = Duration::from_secs(4);
    let (v, faulty) = small_journal(&f, timeout).await;
    let v = Arc::new(v);
    faulty.set_outage(Outage::Unreachable);
    let started = Instant::now();
    let waiting = fill_until_a_write_waits(&v).await;
    let failed = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the write gives up")
        .expect("task")
        .expect_err("with an error");
    let after = started.elapsed();
    assert!(
        after >= timeout,
        "failed after {after:?}, before the timeout"
    );
    assert!(
        after < timeout + Duration::from_secs(5),
        "failed only after {after:?}"
    );
    assert!(
        matches!(failed, DeviceError::StoreUnavailable(ref why) if why.contains("no progress")),
        "the error says why: {failed}"
    );
    // Nothing acknowledged is lost: once the store is back, everything uploads. Until the
    // uploader's next retry has made progress, waiting still fails at once.
    faulty.set_outage(Outage::None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = v.sync_to_store().await {
        assert!(Instant::now() < deadline, "no recovery: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    v.write(0, pattern(4096, 9), true)
        .await
        .expect("writes work again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_refuses_uploads_fails_waiting_writes_at_once() {
    let f = Fixture::new(64 * MIB, BLOCK as u32).await;
    let (v, faulty) = small_journal(&f, Duration::from_secs(300)).await;
    let v = Arc::new(v);
    faulty.set_outage(Outage::Denied);
    let waiting = fill_until_a_write_waits(&v).await;
    let failed = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the write fails long before the stall timeout")
        .expect("task")
        .expect_err("with an error");
    assert!(
        matches!(failed, DeviceError::StoreUnavailable(ref why) if why.contains("refuses")),
        "{failed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_rewrites_the_store_lags_no_further_than_allowed() {
    let f = Fixture::new(64 * MIB, BLOCK as u32).await;
    let mut config = f.config("local");
    config.sync_interval = Duration::from_millis(200);
    config.max_upload_lag = Duration::from_secs(3);
    let v = f.open(config).await;
    let started = Instant::now();
    let mut worst_lag = 0f64;
    let mut round = 0u64;
    while started.elapsed() < Duration::from_secs(10) {
        for b in 0..4u64 {
            v.write(
                b * BLOCK + (round % 16) * 4096,
                pattern(4096, round as u8),
                false,
            )
            .await
            .expect("write");
        }
        round += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        worst_lag = worst_lag.max(metric(&v, "bucketdisk_upload_lag_seconds").await);
    }
    let stats = v.stats().await.expect("stats");
    assert!(
        metric(&v, "bucketdisk_upload_lag_allowed_seconds").await >= 3.0,
        "rewrites of the same blocks let the store lag"
    );
    // Every 200 ms for 10 s would be 50 uploads; lagging up to 3 s makes a handful.
    assert!(stats.uploads <= 8, "{stats:?}");
    assert!(worst_lag <= 3.0 + 1.0, "the store lagged {worst_lag} s");
    // With the writes stopped, the lag runs out and everything reaches the store unasked.
    let last = v.stats().await.expect("stats").journal_next_seq - 1;
    let deadline = Instant::now() + Duration::from_secs(6);
    while v.stats().await.expect("stats").uploaded_seq < last {
        assert!(Instant::now() < deadline, "the tail was not uploaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    v.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_durability_uploads_every_flush_even_under_rewrites() {
    let f = Fixture::new(64 * MIB, BLOCK as u32).await;
    let mut config = f.config("local");
    config.durability = Durability::Remote;
    config.max_upload_lag = Duration::from_secs(60);
    let v = f.open(config).await;
    for round in 0..20u64 {
        v.write(0, pattern(4096, round as u8), false)
            .await
            .expect("write");
        tokio::time::timeout(Duration::from_secs(10), v.flush())
            .await
            .expect("a flush does not wait for the lag")
            .expect("flush");
        let stats = v.stats().await.expect("stats");
        assert_eq!(stats.uploaded_seq, stats.journal_next_seq - 1);
    }
    v.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_inside_the_restore_window_restores_and_one_outside_is_gone() {
    let f = Fixture::new(64 * MIB, BLOCK as u32).await;
    let mut config = quiet(&f, "local");
    let window = Duration::from_secs(3);
    config.restore_window = window;
    let v = f.open(config).await;
    // State A: 16 blocks, one 1 MiB chunk.
    for b in 0..16u64 {
        v.write(b * BLOCK, pattern(BLOCK as usize, b as u8), false)
            .await
            .expect("write");
    }
    v.sync_to_store().await.expect("upload");
    let state_a = v.stats().await.expect("stats").map_txid;
    let chunks_a = chunk_files(&f);
    // State B: every block rewritten, so A's chunk is dead from B on.
    for b in 0..16u64 {
        v.write(b * BLOCK, pattern(BLOCK as usize, 100 + b as u8), false)
            .await
            .expect("write");
    }
    v.sync_to_store().await.expect("upload");
    let dead_since = Instant::now();
    let state_b = v.stats().await.expect("stats").map_txid;
    v.maintain_now().await.expect("collect");
    // Inside the window: A restores whole, from the store alone.
    let restored = restore_state(&f, state_a, BLOCK as u32)
        .await
        .expect("state A restores inside the window");
    assert!(dead_since.elapsed() < window, "the check ran too late");
    assert_eq!(restored.len(), 16);
    for (block, data) in restored {
        assert_eq!(data, pattern(BLOCK as usize, block as u8), "block {block}");
    }
    // Outside the window: A's chunk is deleted, A is gone; B restores.
    tokio::time::sleep(window.saturating_sub(dead_since.elapsed()) + Duration::from_millis(200))
        .await;
    let report = v.maintain_now().await.expect("collect");
    assert!(report.chunks_deleted >= 1, "{report:?}");
    assert!(chunks_a.iter().any(|c| !chunk_files(&f).contains(c)));
    let gone = restore_state(&f, state_a, BLOCK as u32).await;
    assert!(gone.is_err(), "state A outside the window still restores");
    let restored = restore_state(&f, state_b, BLOCK as u32)
        .await
        .expect("state B restores");
    assert_eq!(restored.len(), 16);
    for (block, data) in restored {
        assert_eq!(
            data,
            pattern(BLOCK as usize, 100 + block as u8),
            "block {block}"
        );
    }
    v.close().await.expect("close");
}

/// A writer that never pauses (a FLUSH after every write, each an upload) still folds its
/// map's transaction files every few uploads, so a crash leaves an open on any host a handful
/// of files to read, not one per upload since the last pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_writer_keeps_the_map_cheap_to_open() {
    use blockmap::replica::Replica;
    use object_store::path::Path;
    let f = Fixture::new(64 * MIB, BLOCK as u32).await;
    let mut config = f.config("local");
    config.durability = Durability::Remote;
    let v = f.open(config).await;
    for round in 0..40u64 {
        v.write(round * BLOCK, pattern(4096, round as u8), false)
            .await
            .expect("write");
        v.flush().await.expect("flush");
    }
    // The tidies run beside the uploads: give the last one a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let replica = Replica::new(Arc::clone(&f.store), Path::from("disk/blockmap"), f.layout);
    let plan = replica
        .plan(ltx::RestoreTarget::Latest)
        .await
        .expect("plan");
    let level0 = plan.iter().filter(|f| f.level == 0).count();
    assert!(
        plan.len() <= 12 && level0 <= 9,
        "after 40 uploads without a pause an open reads {} files, {level0} of level 0",
        plan.len()
    );
    // Dropped without a close: what a crash leaves.
    drop(v);
    let fresh = f.open(f.config("fresh")).await;
    for round in [0u64, 20, 39] {
        assert_eq!(
            read(&fresh, round * BLOCK, 4096).await,
            pattern(4096, round as u8).to_vec()
        );
    }
    fresh.close().await.expect("close");
}
