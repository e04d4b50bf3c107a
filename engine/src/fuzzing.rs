//! Entry points for the fuzz targets in `fuzz/` (and their regression tests): whatever bytes
//! are found where the engine keeps its state — a journal segment, a cache index, a
//! `volume.json`, a checkpoint, a map line — opening them gives data or an error, never a panic.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Replays every committed input of `targets` under `fuzz_dir` (`corpus/<target>/`: seeds and
/// what fuzzing kept; `regressions/<target>/`: inputs that once crashed) through `run`; how many.
/// The fuzz-input tests of each crate call this with their own targets.
pub fn replay_committed(fuzz_dir: &Path, targets: &[&str], run: impl Fn(&str, &[u8])) -> usize {
    let mut replayed = 0;
    for target in targets {
        for kind in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(fuzz_dir.join(kind).join(target)) else {
                continue;
            };
            for entry in entries.flatten() {
                let input = std::fs::read(entry.path()).expect("read a fuzz input");
                run(target, &input);
                replayed += 1;
            }
        }
    }
    replayed
}

/// Writes `seeds` (`(target, name, bytes)`) as `corpus/<target>/seed-<name>` under `fuzz_dir`.
pub fn write_seeds(fuzz_dir: &Path, seeds: Vec<(&'static str, String, Vec<u8>)>) {
    for (target, name, bytes) in seeds {
        let dir = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
    }
}

/// A fresh directory for one input (removed by the caller).
fn scratch(what: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("bucketdisk-fuzz-{what}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("fuzz scratch directory");
    dir
}

/// `input` as the only journal segment: replay yields records in sequence order, or an error.
pub fn journal_segment(input: &[u8]) {
    let dir = scratch("journal");
    std::fs::write(dir.join("journal-0000000000000001.log"), input).expect("segment");
    let mut last = 0u64;
    let replayed = crate::journal::Journal::open_located(&dir, |record, _| {
        assert!(record.seq() > last, "records replay in sequence order");
        last = record.seq();
        Ok(())
    });
    if let Ok(journal) = replayed {
        assert!(journal.next_seq() > last);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `input` as a saved cache index: whatever it says, the cache opens, and no slot is given to
/// two blocks or lies outside the file.
pub fn cache_index(input: &[u8]) {
    const SLOTS: u32 = 16;
    let dir = scratch("cache");
    std::fs::write(dir.join("blocks.index"), input).expect("index");
    if let Ok(cache) = crate::cache::BlockCache::open(&dir, 4096, u64::from(SLOTS) * 4096) {
        assert!(cache.len() <= SLOTS as usize, "more entries than slots");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `input` as the JSON the engine reads from a store: parsed, and for a checkpoint its names
/// checked, without panicking.
pub fn stored_json(input: &[u8]) {
    let _ = serde_json::from_slice::<crate::metadata::VolumeMetadata>(input);
    let _ = serde_json::from_slice::<crate::object_volume::lines::MapLine>(input);
    if let Ok(checkpoint) =
        serde_json::from_slice::<crate::object_volume::checkpoints::Checkpoint>(input)
    {
        let _ = crate::object_volume::checkpoints::check_names(&checkpoint);
    }
}

/// Seed inputs for the targets above, made by the engine's own code: `(target, name, bytes)`.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut seeds = Vec::new();
    // A journal with writes of several sizes and a zeroed range, synced.
    let dir = scratch("seed-journal");
    {
        let mut journal =
            crate::journal::Journal::open_located(&dir, |_, _| Ok(())).expect("journal for seeds");
        let mut write = |offset: u64, data: &[u8]| {
            let crc = crate::checksum::crc32c(data);
            journal
                .append_write_located(offset, data, crc)
                .expect("append");
        };
        write(0, &[7u8; 4096]);
        write(65536, &[1u8; 100]);
        write(1 << 30, &[0u8; 512]);
        journal.append_zero(8192, 1 << 20).expect("append");
        journal
            .sync_handle()
            .expect("sync handle")
            .run()
            .expect("sync");
    }
    for entry in std::fs::read_dir(&dir).expect("journal dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("journal-0") {
            let bytes = std::fs::read(entry.path()).expect("segment");
            seeds.push(("journal_segment", "three-writes-one-zero".into(), bytes));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    // A cache index saved after a few inserts.
    let dir = scratch("seed-cache");
    {
        let cache = crate::cache::BlockCache::open(&dir, 4096, 16 * 4096).expect("cache");
        for n in 0..5u64 {
            let key = crate::cache::CacheKey {
                owner: 3,
                chunk: n / 2,
                offset: n * 4096,
                block: n,
            };
            cache.insert(key, &[n as u8; 4096]).expect("insert");
        }
        cache.save_index().expect("save");
    }
    let index = std::fs::read(dir.join("blocks.index")).expect("index");
    seeds.push(("cache_index", "five-blocks".into(), index));
    let _ = std::fs::remove_dir_all(&dir);
    // What a store holds: a clone's volume.json, a checkpoint, a map line.
    let meta = serde_json::json!({
        "name": "twin", "size": 1073741824u64, "block_size": 65536, "format": "object-v1",
        "uuid": "0123456789abcdef0123456789abcdef",
        "parent": {"volume": "disk", "checkpoint": "base"},
        "inherits": [{"volume": "disk", "through_epoch": 3, "uuid": "fedcba9876543210fedcba9876543210"}]
    });
    let map_file = serde_json::json!({"volume": "disk", "path": "blockmap/ltx/9/0000000000000001-0000000000000007.ltx", "level": 9, "size": 8192});
    let checkpoint = serde_json::json!({
        "name": "base", "txid": 7, "created_ms": 1765000000000i64, "size": 1073741824u64,
        "allocated_blocks": 12, "stored_bytes": 700000, "map_files": [map_file.clone()],
        "chunks": [4294967296u64, 4294967297u64], "journal_owner": "abc"
    });
    let line = serde_json::json!({
        "line": 1, "dir": "blockmap-1", "base_txid": 7, "base": [map_file],
        "checkpoint": "base", "stale_owner": "abc"
    });
    for (name, value) in [
        ("volume", meta),
        ("checkpoint", checkpoint),
        ("map-line", line),
    ] {
        let bytes = serde_json::to_vec_pretty(&value).expect("json");
        seeds.push(("stored_json", name.into(), bytes));
    }
    seeds
}
