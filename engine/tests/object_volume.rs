//! The object-storage volume against a real local-directory object store: reads see writes at
//! once, the journal survives a crash, the store alone holds a prefix of the history, zeros are
//! map deletions, and a second writer fences the first.

use engine::object_volume::{Durability, ObjectVolume};
use engine::{BlockDevice, DeviceError, ExtentKind, ZeroMode};
use object_store::ObjectStore;
use object_store::path::Path;
use std::sync::Arc;
use std::time::Duration;
use stores::faulty::FaultyStore;

mod common;
use common::{Fixture, MIB, assert_state_is_complete, chunk_files, metric, pattern, read};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_see_writes_before_and_after_upload() {
    let f = Fixture::new(64 * MIB, 65536).await;
    let v = f.open(f.config("local")).await;
    assert_eq!(
        read(&v, 0, 4096).await,
        vec![0u8; 4096],
        "new volume reads zeros"
    );
    v.write(1000, pattern(5000, 1), false).await.expect("write");
    v.write(65536 * 3 + 10, pattern(200_000, 2), false)
        .await
        .expect("write");
    assert_eq!(read(&v, 1000, 5000).await, pattern(5000, 1));
    v.sync_to_store().await.expect("upload");
    assert_eq!(read(&v, 1000, 5000).await, pattern(5000, 1), "after upload");
    assert_eq!(read(&v, 65536 * 3 + 10, 200_000).await, pattern(200_000, 2));
    // A partial overwrite of an uploaded block merges with the stored base.
    v.write(65536 * 3 + 100, pattern(10, 3), false)
        .await
        .expect("write");
    let mut expected = pattern(200_000, 2).to_vec();
    expected[90..100].copy_from_slice(&pattern(10, 3));
    assert_eq!(read(&v, 65536 * 3 + 10, 200_000).await, expected);
    v.sync_to_store().await.expect("upload");
    assert_eq!(read(&v, 65536 * 3 + 10, 200_000).await, expected);
    let stats = v.stats().await.expect("stats");
    assert!(stats.allocated_blocks >= 5, "{stats:?}");
    v.close().await.expect("close");

    // Another host: nothing local, everything from the store.
    let other = f.open(f.config("elsewhere")).await;
    assert_eq!(read(&other, 1000, 5000).await, pattern(5000, 1));
    assert_eq!(read(&other, 65536 * 3 + 10, 200_000).await, expected);
    other.close().await.expect("close");
}

/// Blocks fetched from the store so far, from the volume's own metrics.
async fn store_fetches(v: &ObjectVolume) -> f64 {
    metric(v, "bucketdisk_store_block_fetches_total").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_during_an_upload_keep_using_the_cached_base() {
    let f = Fixture::new(64 * MIB, 65536).await;
    let slow = stores::url::with_latency(Arc::clone(&f.store), Duration::from_millis(100));
    let mut config = f.config("local");
    config.sync_interval = Duration::from_secs(3600);
    let v = Arc::new(f.open_on(slow, config).await);
    v.write(0, pattern(65536, 1), false).await.expect("write");
    v.sync_to_store().await.expect("upload"); // the block is now stored and cached
    // A partial edit: reads merge it with the stored block until the next upload commits.
    v.write(4096, pattern(4096, 2), false).await.expect("write");
    let mut expected = pattern(65536, 1).to_vec();
    expected[4096..8192].copy_from_slice(&pattern(4096, 2));
    let before = store_fetches(&v).await;
    let uploader = {
        let v = Arc::clone(&v);
        tokio::spawn(async move { v.sync_to_store().await })
    };
    let mut reads = 0;
    while !uploader.is_finished() {
        assert_eq!(read(&v, 0, 65536).await, expected);
        reads += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    uploader.await.expect("join").expect("upload");
    assert!(
        reads >= 5,
        "the upload took long enough to read during it ({reads} reads)"
    );
    assert_eq!(
        store_fetches(&v).await,
        before,
        "reads during the upload fetched the base from the store"
    );
    assert_eq!(read(&v, 0, 65536).await, expected);
    assert_eq!(store_fetches(&v).await, before, "the new version is cached");
    v.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_replay_restores_flushed_writes_after_a_crash() {
    let f = Fixture::new(64 * MIB, 65536).await;
    let mut config = f.config("local");
    config.sync_interval = Duration::from_secs(3600); // nothing reaches the store
    {
        let v = f.open(config.clone()).await;
        v.write(0, pattern(65536, 7), false).await.expect("write");
        v.write(70_000, pattern(3000, 8), false)
            .await
            .expect("write");
        v.write_zeroes(10_000, 5000, ZeroMode::default(), false)
            .await
            .expect("zero");
        v.flush().await.expect("flush");
        // Dropped without close: the uploader never ran, like a kill -9.
    }
    let v = f.open(config).await;
    let mut expected = pattern(65536, 7).to_vec();
    expected[10_000..15_000].fill(0);
    assert_eq!(read(&v, 0, 65536).await, expected);
    assert_eq!(read(&v, 70_000, 3000).await, pattern(3000, 8));
    v.sync_to_store().await.expect("upload the replayed writes");
    v.close().await.expect("close");
    let fresh = f.open(f.config("fresh")).await;
    assert_eq!(read(&fresh, 0, 65536).await, expected);
    fresh.close().await.expect("close");
}

/// A directory that takes over a volume another directory uploaded last (another host, or
/// this one after losing its cache) and crashes before its first upload: its flushed writes
/// are replayed at the next open, not moved aside as another history's (found by the crash
/// soak: the map still named the old directory's journal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_writes_survive_a_crash_before_the_first_upload_from_a_new_directory() {
    let f = Fixture::new(64 * MIB, 65536).await;
    {
        let first = f.open(f.config("first-host")).await;
        first
            .write(0, pattern(4096, 1), false)
            .await
            .expect("write");
        first
            .close()
            .await
            .expect("close: uploaded, the map names this directory");
    }
    let mut config = f.config("second-host");
    config.sync_interval = Duration::from_secs(3600); // no upload before the crash
    {
        let v = f.open(config.clone()).await;
        v.write(65536, pattern(4096, 2), false)
            .await
            .expect("write");
        v.flush().await.expect("flush");
        // Dropped without close, like a kill -9.
    }
    let v = f.open(config).await;
    assert_eq!(
        read(&v, 65536, 4096).await,
        pattern(4096, 2),
        "flushed write lost"
    );
    assert_eq!(read(&v, 0, 4096).await, pattern(4096, 1));
    v.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_the_whole_disk_is_quick_and_leaves_holes() {
    let size = 100u64 << 30;
    let f = Fixture::new(size, 65536).await;
    let v = f.open(f.config("local")).await;
    for i in 0..64u64 {
        v.write(i * 3 * MIB, pattern(65536, i as u8), false)
            .await
            .expect("write");
    }
    v.sync_to_store().await.expect("upload");
    let status = v.block_status(0, 4 * MIB).await.expect("status");
    assert_eq!(status[0].kind, ExtentKind::Data);
    let started = std::time::Instant::now();
    v.trim(0, size, false).await.expect("trim");
    v.sync_to_store().await.expect("upload");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "whole-disk trim took {took:?}"
    );
    assert_eq!(read(&v, 3 * MIB, 65536).await, vec![0u8; 65536]);
    let status = v.block_status(0, 1 << 30).await.expect("status");
    assert!(
        status.iter().all(|e| e.kind == ExtentKind::Hole),
        "{status:?}"
    );
    assert_eq!(v.stats().await.expect("stats").allocated_blocks, 0);
    v.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_fences_the_first() {
    let f = Fixture::new(64 * MIB, 65536).await;
    let first = f.open(f.config("a")).await;
    first
        .write(0, pattern(4096, 1), false)
        .await
        .expect("write");
    first.sync_to_store().await.expect("upload");
    let second = f.open(f.config("b")).await;
    assert_eq!(read(&second, 0, 4096).await, pattern(4096, 1));
    second
        .write(0, pattern(4096, 2), false)
        .await
        .expect("write");
    second.sync_to_store().await.expect("upload");
    // The first writer's next upload collides; it stops accepting writes.
    let _ = first.write(8192, pattern(4096, 3), false).await;
    let fenced = tokio::time::timeout(Duration::from_secs(10), first.sync_to_store())
        .await
        .expect("no hang");
    assert!(fenced.is_err(), "the stale writer must not upload");
    let refused = first.write(0, pattern(4096, 4), false).await;
    assert!(
        matches!(refused, Err(DeviceError::Fenced(ref why)) if why.contains("another writer")),
        "a fenced volume says so: {refused:?}"
    );
    second.close().await.expect("close");
    let third = f.open(f.config("c")).await;
    assert_eq!(
        read(&third, 0, 4096).await,
        pattern(4096, 2),
        "no interleaving"
    );
    assert_eq!(read(&third, 8192, 4096).await, vec![0u8; 4096]);
    third.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_and_missing_chunks_are_reported_as_corrupt() {
    let f = Fixture::new(64 * MIB, 65536).await;
    let writer = f.open(f.config("a")).await;
    writer
        .write(0, pattern(65536, 1), false)
        .await
        .expect("write");
    writer.sync_to_store().await.expect("upload");
    writer
        .write(MIB, pattern(65536, 2), false)
        .await
        .expect("write");
    writer.close().await.expect("close");
    let chunks = chunk_files(&f);
    assert_eq!(chunks.len(), 2, "one chunk per upload: {chunks:?}");
    let dir = f.dir.path().join("store/disk/chunks");
    // The first chunk damaged in many places, the second one gone.
    let first = dir.join(&chunks[0]);
    let mut bytes = std::fs::read(&first).expect("chunk");
    for i in (0..bytes.len()).step_by(97) {
        bytes[i] ^= 0x5a;
    }
    std::fs::write(&first, bytes).expect("damage");
    std::fs::remove_file(dir.join(&chunks[1])).expect("remove");
    // A new local folder: nothing cached, every read goes to the store.
    let reader = f.open(f.config("b")).await;
    let damaged = reader.read(0, 4096).await;
    assert!(
        matches!(damaged, Err(DeviceError::Corrupt(_))),
        "a damaged block is corrupt, never data: {damaged:?}"
    );
    let missing = reader.read(MIB, 4096).await;
    assert!(
        matches!(missing, Err(DeviceError::Corrupt(ref why)) if why.contains("missing")),
        "a chunk the map points at and the store lacks is corrupt: {missing:?}"
    );
    assert_eq!(
        read(&reader, 2 * MIB, 4096).await,
        vec![0u8; 4096],
        "holes still read"
    );
    reader.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outages_delay_uploads_but_lose_nothing() {
    let f = Fixture::new(64 * MIB, 65536).await;
    let faulty = Arc::new(FaultyStore::new(Arc::clone(&f.store)));
    let mut config = f.config("local");
    config.durability = Durability::Local;
    let v = f
        .open_on(Arc::clone(&faulty) as Arc<dyn ObjectStore>, config)
        .await;
    faulty.fail_next(40); // more than one request's retries: uploads fail for a while
    faulty.set_latency(Duration::from_millis(1500)); // and every request stalls
    let started = std::time::Instant::now();
    for i in 0..16u64 {
        v.write(i * 65536, pattern(65536, i as u8), false)
            .await
            .expect("writes are journaled whatever the store does");
    }
    v.flush()
        .await
        .expect("local durability does not need the store");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "writes and FLUSH waited for a stalled store: {:?}",
        started.elapsed()
    );
    for i in 0..16u64 {
        assert_eq!(read(&v, i * 65536, 65536).await, pattern(65536, i as u8));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    faulty.set_latency(Duration::ZERO); // the store recovers
    tokio::time::timeout(Duration::from_secs(60), v.sync_to_store())
        .await
        .expect("uploads resume by themselves")
        .expect("upload");
    for i in 0..16u64 {
        assert_eq!(read(&v, i * 65536, 65536).await, pattern(65536, i as u8));
    }
    v.close().await.expect("close");
    let fresh = f.open(f.config("fresh")).await;
    for i in 0..16u64 {
        assert_eq!(
            read(&fresh, i * 65536, 65536).await,
            pattern(65536, i as u8)
        );
    }
    fresh.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_s3_writes_reach_another_host_and_a_new_writer_fences_the_old() {
    let f = Fixture::on_s3(64 * MIB, 65536).await;
    let first = f.open(f.config("a")).await;
    first
        .write(5000, pattern(300_000, 9), false)
        .await
        .expect("write");
    first.trim(65536 * 2, 65536, false).await.expect("trim");
    let mut expected = pattern(300_000, 9).to_vec();
    expected[65536 * 2 - 5000..65536 * 3 - 5000].fill(0);
    first.sync_to_store().await.expect("upload");
    assert_eq!(read(&first, 5000, 300_000).await, expected);
    let second = f.open(f.config("b")).await;
    assert_eq!(
        read(&second, 5000, 300_000).await,
        expected,
        "from S3 alone"
    );
    second
        .write(0, pattern(4096, 1), false)
        .await
        .expect("write");
    second.sync_to_store().await.expect("upload");
    let _ = first.write(0, pattern(4096, 2), false).await;
    let fenced = tokio::time::timeout(Duration::from_secs(20), first.sync_to_store())
        .await
        .expect("no hang");
    assert!(fenced.is_err(), "the stale writer must not upload");
    second.close().await.expect("close");
    let third = f.open(f.config("c")).await;
    assert_eq!(read(&third, 0, 4096).await, pattern(4096, 1));
    third.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_rewrites_sparse_chunks_and_deletes_dead_ones() {
    let f = Fixture::new(64 * MIB, 65536).await;
    let v = f.open(f.config("local")).await; // 1 MiB chunks: 16 blocks each
    for i in 0..16u64 {
        v.write(i * 65536, pattern(65536, i as u8), false)
            .await
            .expect("write");
    }
    v.sync_to_store().await.expect("upload");
    let first_chunk = chunk_files(&f)[0].clone();
    // Overwrite 14 of its 16 blocks: the first chunk keeps 2 live blocks (12.5 %).
    for i in 0..14u64 {
        v.write(i * 65536, pattern(65536, 100 + i as u8), false)
            .await
            .expect("write");
    }
    v.sync_to_store().await.expect("upload");
    // Collection runs after every upload step: the first chunk, 2 of 16 blocks live, was
    // rewritten, and with the default restore window of zero deleted at once.
    v.maintain_now().await.expect("maintain");
    let stats = v.stats().await.expect("stats");
    assert!(stats.chunks_rewritten >= 1, "{stats:?}");
    assert!(stats.chunks_deleted >= 1, "{stats:?}");
    assert!(
        !chunk_files(&f).contains(&first_chunk),
        "{first_chunk} still in {:?}",
        chunk_files(&f)
    );
    assert_eq!(
        stats.chunks, 2,
        "the overwriting chunk and the rewritten one, nothing dead: {stats:?}"
    );
    v.close().await.expect("close");
    assert_state_is_complete(&f, None).await;
    let fresh = f.open(f.config("fresh")).await;
    for i in 0..16u64 {
        let seed = if i < 14 { 100 + i as u8 } else { i as u8 };
        assert_eq!(
            read(&fresh, i * 65536, 65536).await,
            pattern(65536, seed),
            "block {i}"
        );
    }
    fresh.close().await.expect("close");
}

/// Restores every block-map state the replica can still reach and checks that each chunk it
/// refers to exists: GC must never delete what a restorable state uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hydration_pulls_every_stored_block_into_the_cache() {
    let f = Fixture::new(256 * MIB, 65536).await;
    let v = f.open(f.config("writer")).await;
    for i in 0..40u64 {
        v.write(i * 5 * 65536, pattern(65536, i as u8), false)
            .await
            .expect("write");
    }
    v.close().await.expect("close");
    let mut config = f.config("fresh");
    config.hydrate = true;
    let fresh = f.open(config).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let stats = fresh.stats().await.expect("stats");
        if stats.cached_blocks >= 40 {
            assert_eq!(stats.allocated_blocks, 40);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "hydration stalled: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Served from the cache now, even with the store gone.
    std::fs::remove_dir_all(f.dir.path().join("store/disk/chunks")).expect("drop chunks");
    for i in 0..40u64 {
        assert_eq!(
            read(&fresh, i * 5 * 65536, 65536).await,
            pattern(65536, i as u8)
        );
    }
    fresh.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_durability_flush_waits_for_the_store() {
    let f = Fixture::new(64 * MIB, 65536).await;
    let mut config = f.config("local");
    config.durability = Durability::Remote;
    config.sync_interval = Duration::from_secs(3600); // only FLUSH makes uploads happen
    let v = f.open(config).await;
    v.write(0, pattern(100_000, 5), false).await.expect("write");
    v.write(200_000, pattern(4096, 6), true)
        .await
        .expect("FUA write");
    // The FUA write is in the store now, and so is everything before it.
    let seen = ObjectVolume::open(Arc::clone(&f.store), &Path::from(""), f.layout, "disk", {
        let mut c = f.config("reader");
        c.read_only = true;
        c
    })
    .await
    .expect("open a read-only view");
    assert_eq!(read(&seen, 0, 100_000).await, pattern(100_000, 5));
    assert_eq!(read(&seen, 200_000, 4096).await, pattern(4096, 6));
    v.write(300_000, pattern(4096, 7), false)
        .await
        .expect("write");
    v.flush().await.expect("flush");
    let seen = ObjectVolume::open(Arc::clone(&f.store), &Path::from(""), f.layout, "disk", {
        let mut c = f.config("reader2");
        c.read_only = true;
        c
    })
    .await
    .expect("open a read-only view");
    assert_eq!(read(&seen, 300_000, 4096).await, pattern(4096, 7));
    v.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_a_dead_writer_never_committed_are_swept() {
    use object_store::{ObjectStoreExt, PutPayload};
    let f = Fixture::new(64 * MIB, 65536).await;
    let first = f.open(f.config("a")).await;
    first
        .write(0, pattern(65536, 1), false)
        .await
        .expect("write");
    first.sync_to_store().await.expect("upload");
    drop(first); // a writer that dies...
    // ...after uploading a chunk it never committed (its epoch's id space, unknown to the map).
    let orphan = Path::from(format!("disk/chunks/{:016x}", (1u64 << 32) | 999));
    f.store
        .put(&orphan, PutPayload::from_static(b"never committed"))
        .await
        .expect("put");
    let second = f.open(f.config("b")).await;
    let report = second.maintain_now().await.expect("maintain");
    assert_eq!(report.orphans_deleted, 1, "{report:?}");
    assert!(f.store.head(&orphan).await.is_err(), "orphan still there");
    assert_eq!(
        read(&second, 0, 65536).await,
        pattern(65536, 1),
        "live data kept"
    );
    second.close().await.expect("close");
}

/// Files an open of the volume's map reads (one store round trip each).
async fn map_files_to_open(f: &Fixture) -> usize {
    let replica = blockmap::replica::Replica::new(
        Arc::clone(&f.store),
        Path::from("disk/blockmap"),
        f.layout,
    );
    replica
        .plan(ltx::RestoreTarget::Latest)
        .await
        .expect("plan")
        .len()
}

/// Every upload adds a transaction file to the map replica; a volume that is written and
/// closed many times must not leave the next open reading all of them: idle uploads and clean
/// closes fold them together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_closed_volumes_leave_their_map_cheap_to_open() {
    let f = Fixture::new(64 * MIB, 65536).await;
    for session in 0..3u8 {
        let v = f.open(f.config("local")).await;
        for i in 0..12u64 {
            v.write(i * 65536, pattern(65536, session + i as u8), false)
                .await
                .expect("write");
            v.sync_to_store().await.expect("upload");
        }
        // Folded beside the uploads every few of them: a handful of files, not 12.
        let busy = map_files_to_open(&f).await;
        assert!(busy <= 8, "after 12 uploads an open reads {busy} files");
        if session == 0 {
            // Uploads idle: the uploader tidies by itself.
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while map_files_to_open(&f).await > 1 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "idle uploads never tidied the map"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        v.close().await.expect("close");
        let closed = map_files_to_open(&f).await;
        // A few folded files (level 0 into 1, three of a level into one of the next).
        assert!(
            closed <= 4,
            "after {} clean closes an open reads {closed} files",
            session + 1
        );
    }
    let fresh = f.open(f.config("elsewhere")).await;
    for i in 0..12u64 {
        assert_eq!(
            read(&fresh, i * 65536, 65536).await,
            pattern(65536, 2 + i as u8)
        );
    }
    fresh.close().await.expect("close");
}
