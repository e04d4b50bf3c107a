//! A read-only follower tracks a live writer through the replica, applying each transaction
//! whole and never under a reader's feet.

use blockmap::replica::{Layout, Replica};
use blockmap::vfs::follower::Follower;
use blockmap::writer::MapWriter;
use blockmap::{BlockLocation, BlockMap, MapChange};
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use std::sync::Arc;

fn loc(i: u64) -> BlockLocation {
    BlockLocation {
        chunk: 1,
        offset: i,
        length: 10,
        checksum: 0,
    }
}

fn count(conn: &rusqlite::Connection) -> i64 {
    conn.query_row("SELECT count(*) FROM blocks", [], |r| r.get(0))
        .expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_sees_the_writers_transactions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalFileSystem::new_with_prefix(dir.path()).expect("store"));
    let replica = Arc::new(Replica::new(
        Arc::clone(&store),
        Path::from("vol/blockmap"),
        Layout::File,
    ));
    let writer = MapWriter::open(
        Arc::clone(&store),
        Arc::clone(&replica),
        Path::from("vol"),
        "follower-test-writer",
        "writer",
        tokio::runtime::Handle::current(),
    )
    .await
    .expect("writer");
    let mut map = BlockMap::new(writer.connection().expect("conn")).expect("map");
    let puts = |range: std::ops::Range<u64>| -> Vec<MapChange> {
        range
            .map(|i| MapChange::Put {
                block: i,
                location: loc(i),
            })
            .collect()
    };
    map.apply(&[(1, 1 << 20)], &puts(0..100)).expect("apply");
    writer.sync().await.expect("sync");

    let follower = Follower::open(
        Arc::clone(&replica),
        "follower-test-reader",
        tokio::runtime::Handle::current(),
    )
    .await
    .expect("follower");
    let reader = follower.connection().expect("conn");
    assert_eq!(count(&reader), 100);
    assert!(
        reader.execute("DELETE FROM blocks", []).is_err(),
        "followers are read-only"
    );

    map.apply(&[], &puts(100..300)).expect("apply");
    writer.sync().await.expect("sync");
    map.apply(
        &[],
        &[MapChange::Delete {
            first: 0,
            count: 50,
        }],
    )
    .expect("trim");
    writer.sync().await.expect("sync");

    // A reader inside a transaction holds the follower back; its snapshot stays consistent.
    reader.execute_batch("BEGIN").expect("begin");
    assert_eq!(count(&reader), 100);
    let held = follower.txid();
    assert_eq!(
        follower.poll().await.expect("poll"),
        held,
        "nothing applied under a reader"
    );
    assert_eq!(count(&reader), 100);
    reader.execute_batch("COMMIT").expect("commit");

    assert_eq!(follower.poll().await.expect("poll"), writer.txid());
    assert_eq!(count(&reader), 250);
    let check: String = reader
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("check");
    assert_eq!(check, "ok");
}
