//! What checking every cached slot once after a restart costs (`cache.rs`: a slot a previous
//! process left is read whole and checked against its CRC at its first read, so bits that
//! rotted while the server was down cost a refetch, never wrong data).
//!
//! A cache of `CACHE_RESTART_MIB` MiB (default 1024) of 64 KiB random blocks is filled and closed
//! cleanly, then opened again and every block read once with a 4 KiB `read_at` at a random
//! offset inside it, in random order: the first pass checks each slot (a 64 KiB read and its
//! CRC), the second reads 4 KiB only. Two cases: the cache file still in the page cache (a
//! server restart) and dropped from it before each pass (a host reboot: the reads go to disk;
//! needs root to drop caches, else that case is skipped and says so).
//!
//! `cargo bench -p engine --bench cache_restart`. Without `--bench` (a test run) it does a
//! short pass on 16 MiB, the page cache left alone.

use engine::cache::{BlockCache, CacheKey};
use std::time::{Duration, Instant};

const BLOCK: u32 = 64 << 10;
const READ: usize = 4 << 10;

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn key(i: u64) -> CacheKey {
    CacheKey {
        owner: 1,
        chunk: i / 384,
        offset: (i % 384) * u64::from(BLOCK),
        block: i,
    }
}

fn drop_page_cache() -> bool {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Every block read once (4 KiB at a random offset in it, random order): total time.
fn pass(cache: &BlockCache, checksums: &[u32], rng: &mut XorShift) -> Duration {
    let mut order: Vec<u64> = (0..checksums.len() as u64).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    let mut buf = vec![0u8; READ];
    let started = Instant::now();
    for &i in &order {
        let at = (rng.next() % u64::from(BLOCK / READ as u32)) as usize * READ;
        let hit = cache
            .read_at(key(i), checksums[i as usize], at, &mut buf)
            .expect("read_at");
        assert!(hit, "block {i} is cached");
    }
    started.elapsed()
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let mib: u64 = std::env::var("CACHE_RESTART_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benching { 1024 } else { 16 });
    let blocks = mib * (1 << 20) / u64::from(BLOCK);
    let dir = tempfile::tempdir_in(std::env::var("CACHE_RESTART_DIR").unwrap_or("/tmp".into()))
        .expect("tempdir");
    let capacity = blocks * u64::from(BLOCK) * 2;
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut checksums = Vec::with_capacity(blocks as usize);
    {
        let cache = BlockCache::open(dir.path(), BLOCK, capacity).expect("open");
        let mut data = vec![0u8; BLOCK as usize];
        for i in 0..blocks {
            for word in data.chunks_mut(8) {
                word.copy_from_slice(&rng.next().to_le_bytes());
            }
            checksums.push(engine::chunk::block_checksum(&data));
            cache.insert(key(i), &data).expect("insert");
        }
        cache.save_index().expect("save index");
    }
    println!(
        "cache of {mib} MiB ({blocks} blocks of {} KiB), 4 KiB reads, one per block",
        BLOCK >> 10
    );
    println!(
        "| case | first pass after restart (checks each slot) | second pass | extra per block |"
    );
    println!("|---|---:|---:|---:|");
    for cold in [false, true] {
        let cache = BlockCache::open(dir.path(), BLOCK, capacity).expect("reopen");
        assert_eq!(cache.len() as u64, blocks, "the index was kept");
        if cold && !benching {
            continue;
        }
        if cold && !drop_page_cache() {
            println!("| page cache dropped | skipped: dropping caches needs root | | |");
            continue;
        }
        let first = pass(&cache, &checksums, &mut rng);
        if cold {
            drop_page_cache();
        }
        let second = pass(&cache, &checksums, &mut rng);
        let per = |d: Duration| d.as_secs_f64() * 1e6 / blocks as f64;
        println!(
            "| {} | {:.2} s ({:.1} µs/read) | {:.2} s ({:.1} µs/read) | {:.1} µs |",
            if cold {
                "page cache dropped (host reboot)"
            } else {
                "file in the page cache (server restart)"
            },
            first.as_secs_f64(),
            per(first),
            second.as_secs_f64(),
            per(second),
            per(first) - per(second)
        );
        cache.save_index().expect("save index");
    }
}
