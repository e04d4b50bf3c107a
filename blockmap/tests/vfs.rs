//! A block map written through the bucketdisk VFS: connections share one state, commits become
//! L0 LTX files, and the real `litestream restore` rebuilds the same database from them.

use blockmap::vfs::ffi::{attach, open_connection};
use blockmap::vfs::state::DatabaseState;
use blockmap::{BlockLocation, BlockMap, MapChange};
use std::path::Path;
use std::sync::Arc;

mod common;
use common::litestream_restore;

fn upload(state: &DatabaseState, replica: &Path) -> u64 {
    let up = state
        .prepare_upload(1_700_000_000_000)
        .expect("prepare")
        .expect("new commits");
    let header = *ltx::Decoder::new(&up.bytes[..]).expect("decode").header();
    let dir = replica.join("ltx/0");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let name = ltx::FileName {
        min_txid: header.min_txid,
        max_txid: header.max_txid,
    };
    std::fs::write(dir.join(name.to_string()), &up.bytes).expect("write L0");
    state.uploaded(&up);
    up.max_txid
}

fn restore_and_check(replica: &Path, out: &Path) -> rusqlite::Connection {
    litestream_restore(replica, out);
    let conn = rusqlite::Connection::open(out).expect("open restored");
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("check");
    assert_eq!(check, "ok");
    conn
}

fn loc(i: u64) -> BlockLocation {
    BlockLocation {
        chunk: 1 + i / 100,
        offset: (i % 100) * 70_000,
        length: 65_536,
        checksum: i as u32,
    }
}

#[test]
fn a_block_map_written_through_the_vfs_restores_with_litestream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let replica = dir.path().join("replica");
    let state = Arc::new(DatabaseState::new(None, 4096).expect("state"));
    attach("vfs-test-map", Arc::clone(&state));

    let mut map = BlockMap::new(open_connection("vfs-test-map").expect("open")).expect("map");
    let chunks: Vec<(u64, u64)> = (1..=20).map(|c| (c, 7_000_000)).collect();
    let puts: Vec<MapChange> = (0..2000)
        .map(|i| MapChange::Put {
            block: i,
            location: loc(i),
        })
        .collect();
    map.apply(&chunks, &puts).expect("apply");
    map.set_meta("size", "107374182400").expect("meta");

    // Another connection sees the committed state.
    let other = BlockMap::new(open_connection("vfs-test-map").expect("open")).expect("map");
    assert_eq!(other.get(1234).expect("get"), Some(loc(1234)));
    let first = upload(&state, &replica);

    // More changes: a trim of a range and rewrites, uploaded as a second, incremental file.
    map.apply(
        &[(21, 1_000_000)],
        &[MapChange::Delete {
            first: 100,
            count: 500,
        }],
    )
    .expect("trim");
    let moved = BlockLocation {
        chunk: 21,
        offset: 0,
        length: 4000,
        checksum: 7,
    };
    map.apply(
        &[],
        &[MapChange::Put {
            block: 5,
            location: moved,
        }],
    )
    .expect("rewrite");
    let second = upload(&state, &replica);
    assert!(second > first);

    let restored = restore_and_check(&replica, &dir.path().join("restored.db"));
    let restored = BlockMap::new(restored).expect("restored map");
    assert_eq!(restored.get(5).expect("get"), Some(moved));
    assert_eq!(restored.get(150).expect("get"), None);
    assert_eq!(restored.get(1999).expect("get"), Some(loc(1999)));
    assert_eq!(
        restored.usage().expect("usage"),
        map.usage().expect("usage")
    );
    assert_eq!(
        restored.meta("size").expect("meta").as_deref(),
        Some("107374182400")
    );
    assert_eq!(
        restored.allocated_runs(0, 1 << 20).expect("runs"),
        map.allocated_runs(0, 1 << 20).expect("runs")
    );
}

#[test]
fn rollbacks_and_competing_writers_keep_the_database_consistent() {
    let state = Arc::new(DatabaseState::new(None, 4096).expect("state"));
    attach("vfs-test-locks", Arc::clone(&state));
    let a = open_connection("vfs-test-locks").expect("open");
    let b = open_connection("vfs-test-locks").expect("open");
    a.execute_batch("CREATE TABLE t (v INTEGER); INSERT INTO t VALUES (1);")
        .expect("setup");

    // A rolled-back transaction leaves nothing behind, even after spilling pages.
    a.execute_batch(
        "BEGIN; WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 5000)
         INSERT INTO t SELECT i FROM n; ROLLBACK;",
    )
    .expect("rollback");
    let count: i64 = b
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .expect("count");
    assert_eq!(count, 1);

    // While `a` holds a write transaction, `b` cannot write (BUSY), and sees the old data.
    a.execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (2);")
        .expect("begin");
    b.busy_timeout(std::time::Duration::from_millis(50))
        .expect("busy timeout");
    let err = b
        .execute("INSERT INTO t VALUES (3)", [])
        .expect_err("b must be refused");
    assert!(
        err.to_string().contains("locked") || err.to_string().contains("busy"),
        "{err}"
    );
    a.execute_batch("COMMIT").expect("commit");
    b.execute("INSERT INTO t VALUES (3)", [])
        .expect("now b can write");
    let sum: i64 = a
        .query_row("SELECT sum(v) FROM t", [], |r| r.get(0))
        .expect("sum");
    assert_eq!(sum, 6);
    let check: String = b
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("check");
    assert_eq!(check, "ok");
}
