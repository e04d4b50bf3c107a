//! Reads on a host whose cache is empty: neighbouring blocks of a chunk come in one ranged GET,
//! a sequential reader gets readahead that grows, a reader that jumps away drops what was
//! queued for it, and concurrent readers of one block share one GET. Every read is checked
//! against what was written.

use engine::BlockDevice;
use engine::object_volume::VolumeConfig;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::{Fixture, MIB, metric, read};

const BLOCK: u64 = 65536;

/// A volume with `blocks` distinct 64 KiB blocks written from offset 0 and uploaded, in
/// chunks large enough to hold long runs.
async fn written(blocks: u64) -> Fixture {
    let f = Fixture::new(256 * MIB, BLOCK as u32).await;
    let mut config = f.config("writer");
    config.chunk_bytes = 16 * MIB as usize;
    config.sync_interval = Duration::from_secs(3600); // one upload, at close: one chunk
    let v = f.open(config).await;
    for b in 0..blocks {
        v.write(b * BLOCK, block_content(b), false)
            .await
            .expect("write");
    }
    v.close().await.expect("close");
    f
}

/// Block `b`'s content: incompressible, so a 4 MiB GET spans 64 blocks, as with real data.
fn block_content(b: u64) -> bytes::Bytes {
    let mut x = b.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..BLOCK / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

fn expected(from_block: u64, blocks: u64) -> Vec<u8> {
    (from_block..from_block + blocks)
        .flat_map(|b| block_content(b).to_vec())
        .collect()
}

fn cold_config(f: &Fixture, name: &str) -> VolumeConfig {
    let mut config = f.config(name);
    config.read_only = true;
    config.cache_bytes = 512 * MIB;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_read_fetches_its_blocks_in_one_get() {
    let f = written(64).await;
    let mut config = cold_config(&f, "cold");
    config.readahead_bytes = 0;
    let v = f.open(config).await;
    for i in 0..4u64 {
        assert_eq!(read(&v, i * MIB, MIB as u32).await, expected(i * 16, 16));
    }
    assert_eq!(
        metric(&v, "bucketdisk_store_block_fetches_total").await,
        64.0
    );
    assert_eq!(
        metric(&v, "bucketdisk_store_block_gets_total").await,
        4.0,
        "one ranged GET per 1 MiB read of neighbouring blocks"
    );
    v.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_reader_is_served_from_readahead_in_large_gets() {
    let f = written(1024).await; // 64 MiB
    let slow = stores::url::with_latency(Arc::clone(&f.store), Duration::from_millis(20));
    let v = f.open_on(slow, cold_config(&f, "cold")).await;
    for i in 0..64u64 {
        assert_eq!(read(&v, i * MIB, MIB as u32).await, expected(i * 16, 16));
    }
    let gets = metric(&v, "bucketdisk_store_block_gets_total").await;
    let fetched = metric(&v, "bucketdisk_store_block_fetches_total").await;
    assert_eq!(fetched, 1024.0, "every block fetched once");
    assert!(
        gets <= 64.0,
        "1024 blocks in {gets} GETs: readahead fetched runs, not blocks"
    );
    v.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readahead_for_a_reader_that_jumped_away_is_dropped() {
    let f = written(1024).await;
    let slow = stores::url::with_latency(Arc::clone(&f.store), Duration::from_millis(100));
    let mut config = cold_config(&f, "cold");
    config.prefetch_gets = 1; // one GET at a time: most of the window waits in the queue
    let v = f.open_on(slow, config).await;
    for i in 0..6u64 {
        assert_eq!(read(&v, i * MIB, MIB as u32).await, expected(i * 16, 16));
    }
    // Four random readers beyond its window replace the sequential stream.
    for b in [1000u64, 600, 900, 700] {
        assert_eq!(read(&v, b * BLOCK, 4096).await, expected(b, 1)[..4096]);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&v, "bucketdisk_readahead_cancelled_blocks_total").await == 0.0 {
        assert!(
            Instant::now() < deadline,
            "queued readahead was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    v.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_of_one_block_share_one_get() {
    let f = written(16).await;
    let slow = stores::url::with_latency(Arc::clone(&f.store), Duration::from_millis(100));
    let mut config = cold_config(&f, "cold");
    config.readahead_bytes = 0;
    let v = Arc::new(f.open_on(slow, config).await);
    let readers: Vec<_> = (0..8u64)
        .map(|i| {
            let v = Arc::clone(&v);
            tokio::spawn(async move { read(&v, 5 * BLOCK + i * 4096, 4096).await })
        })
        .collect();
    for (i, reader) in readers.into_iter().enumerate() {
        let start = i * 4096;
        assert_eq!(
            reader.await.expect("join"),
            expected(5, 1)[start..start + 4096]
        );
    }
    assert_eq!(metric(&v, "bucketdisk_store_block_gets_total").await, 1.0);
    match Arc::try_unwrap(v) {
        Ok(v) => v.close().await.expect("close"),
        Err(_) => panic!("volume still shared"),
    }
}

/// The block cache damaged on disk while the volume was closed — bits flipped in one slot, the
/// file cut to half — costs refetches, never wrong bytes: every block reads back exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_cache_file_costs_refetches_never_wrong_data() {
    use std::os::unix::fs::FileExt;
    const BLOCKS: u64 = 64;
    let f = written(BLOCKS).await;
    let shared = f.dir.path().join("shared-cache");
    let config = || {
        let mut c = f.config("reader");
        c.shared_cache_dir = Some(shared.clone());
        c
    };
    // Warm the cache through a volume that closes cleanly (its index is saved and trusted).
    let v = f.open(config()).await;
    assert_eq!(
        read(&v, 0, (BLOCKS * BLOCK) as u32).await,
        expected(0, BLOCKS)
    );
    v.close().await.expect("close");
    drop(v);
    let data = shared.join("blocks.cache");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&data)
        .expect("cache file");
    // Flip bits in every slot that holds data, then cut the file to half its data.
    let len = file.metadata().expect("metadata").len();
    for slot in 0..(len / BLOCK).min(4096) {
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, slot * BLOCK + 100)
            .expect("read");
        if byte[0] != 0 {
            file.write_all_at(&[byte[0] ^ 0x40], slot * BLOCK + 100)
                .expect("flip");
        }
    }
    drop(file);
    let v = f.open(config()).await;
    assert!(
        read(&v, 0, (BLOCKS * BLOCK) as u32).await == expected(0, BLOCKS),
        "damaged slots were served"
    );
    assert!(
        metric(&v, "bucketdisk_store_block_fetches_total").await >= BLOCKS as f64,
        "every damaged block was fetched again"
    );
    // A partial read of a refetched block, then of every block: still exact.
    assert!(read(&v, 100, 4096).await == expected(0, 1)[100..4196]);
    v.close().await.expect("close");
    drop(v);
    // Truncated to half: the cut slots are misses.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .expect("cache file");
    file.set_len(len / 2).expect("truncate");
    drop(file);
    let v = f.open(config()).await;
    assert!(
        read(&v, 0, (BLOCKS * BLOCK) as u32).await == expected(0, BLOCKS),
        "a truncated cache served wrong bytes"
    );
    v.close().await.expect("close");
}
