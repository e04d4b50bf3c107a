//! The Litestream VFS defects docs/ARCHITECTURE.md §7 lists, each shown impossible here.
//! (Fencing without check-then-PUT is shown in writer.rs and replica_s3.rs; hydration racing
//! new commits in vfs_replica.rs.)

use blockmap::replica::{Layout, Replica};
use blockmap::vfs::ffi::{attach, open_connection};
use blockmap::vfs::hydrate::{Progress, hydrate};
use blockmap::vfs::state::DatabaseState;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use std::sync::Arc;

mod common;
use common::testdata;

/// Two connections writing alternately share one state and produce one well-formed L0 file.
#[test]
fn two_connections_never_corrupt_one_l0_file() {
    let state = Arc::new(DatabaseState::new(None, 4096).expect("state"));
    attach("defect-two-conns", Arc::clone(&state));
    let a = open_connection("defect-two-conns").expect("open");
    let b = open_connection("defect-two-conns").expect("open");
    a.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
        .expect("create");
    for i in 0..200 {
        let conn = if i % 2 == 0 { &a } else { &b };
        conn.execute("INSERT INTO t VALUES (?1, randomblob(300))", [i])
            .expect("insert");
    }
    let upload = state.prepare_upload(1).expect("prepare").expect("upload");
    let summary = ltx::Decoder::verify(&upload.bytes[..]).expect("the L0 verifies");
    assert_eq!(summary.header.min_txid, 1);
    let mut image = Vec::new();
    ltx::compactor::write_database(vec![&upload.bytes[..]], &mut image).expect("restore");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("r.db"), &image).expect("write");
    let restored = rusqlite::Connection::open(dir.path().join("r.db")).expect("open");
    let n: i64 = restored
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 200);
    let check: String = restored
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("check");
    assert_eq!(check, "ok");
}

/// The database size comes from committed page counts: it never shrinks after an upload.
#[test]
fn file_size_never_shrinks_after_a_growing_sync() {
    let state = Arc::new(DatabaseState::new(None, 4096).expect("state"));
    attach("defect-size", Arc::clone(&state));
    let conn = open_connection("defect-size").expect("open");
    conn.execute_batch("CREATE TABLE t (v BLOB); INSERT INTO t VALUES (randomblob(100000));")
        .expect("grow");
    let size = state.file_size();
    let upload = state.prepare_upload(1).expect("prepare").expect("upload");
    state.uploaded(&upload);
    assert_eq!(state.file_size(), size);
    let n: i64 = conn
        .query_row("SELECT length(v) FROM t", [], |r| r.get(0))
        .expect("read");
    assert_eq!(n, 100_000);
}

/// Hydration verifies what it downloads: a flipped byte in the replica is an error, not a
/// silently different local copy.
#[tokio::test]
async fn hydration_verifies_checksums() {
    let data = testdata().join("replica");
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("replica");
    for entry in walk(&data) {
        let target = copy.join(entry.strip_prefix(&data).expect("prefix"));
        std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
        std::fs::copy(&entry, &target).expect("copy");
    }
    let snapshot = copy.join("ltx/9/0000000000000001-0000000000000007.ltx");
    let mut bytes = std::fs::read(&snapshot).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&snapshot, bytes).expect("corrupt");

    let store = Arc::new(LocalFileSystem::new_with_prefix(&copy).expect("store"));
    let replica = Replica::new(store, Path::from(""), Layout::File);
    let progress = Progress::default();
    let result = hydrate(&replica, 7, &dir.path().join("h.db"), &progress).await;
    let err = result.err().expect("a corrupt snapshot must not hydrate");
    eprintln!("corrupt snapshot: {err}");
    assert!(!progress.complete.load(std::sync::atomic::Ordering::Relaxed));
    assert!(
        !dir.path().join("h.db").exists(),
        "no local copy is left behind"
    );
    assert!(
        !dir.path().join("h.hydrating").exists(),
        "nor a partial one"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
