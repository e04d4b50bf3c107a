//! Write a block map through the VFS, sync it to a replica in object storage, open it again
//! elsewhere straight from the replica, and check that the first writer is fenced once the
//! second one publishes.

use blockmap::replica::{Layout, Replica, ReplicaError};
use blockmap::vfs::ffi::{attach, open_connection};
use blockmap::vfs::remote::{RemoteSource, sync_once};
use blockmap::vfs::state::DatabaseState;
use blockmap::{BlockLocation, BlockMap, MapChange};
use ltx::RestoreTarget;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use std::sync::Arc;

mod common;
use common::runtime;

fn loc(i: u64) -> BlockLocation {
    BlockLocation {
        chunk: 1,
        offset: i * 100,
        length: 100,
        checksum: i as u32,
    }
}

#[test]
fn reopen_from_the_replica_and_fence_the_old_writer() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).expect("store"));
    let replica = Arc::new(Replica::new(
        store,
        Path::from("vol/blockmap"),
        Layout::File,
    ));

    // Host A creates the map and syncs it.
    let a = Arc::new(DatabaseState::new(None, 4096).expect("state"));
    attach("replica-host-a", Arc::clone(&a));
    let mut map_a = BlockMap::new(open_connection("replica-host-a").expect("open")).expect("map");
    let puts: Vec<MapChange> = (0..3000)
        .map(|i| MapChange::Put {
            block: i,
            location: loc(i),
        })
        .collect();
    map_a.apply(&[(1, 1 << 30)], &puts).expect("apply");
    let synced = rt
        .block_on(sync_once(&a, &replica, 1))
        .expect("sync")
        .expect("uploaded");
    map_a
        .apply(
            &[],
            &[MapChange::Delete {
                first: 0,
                count: 10,
            }],
        )
        .expect("trim");
    let synced = rt
        .block_on(sync_once(&a, &replica, 2))
        .expect("sync")
        .expect("uploaded")
        .max(synced);
    assert_eq!(
        rt.block_on(sync_once(&a, &replica, 3)).expect("sync"),
        None,
        "nothing new"
    );

    // Host B opens the same map straight from the replica.
    let source = rt
        .block_on(RemoteSource::open(
            Arc::clone(&replica),
            RestoreTarget::Latest,
            rt.handle().clone(),
        ))
        .expect("open replica");
    let b = Arc::new(DatabaseState::new(Some(Arc::new(source)), 4096).expect("state"));
    assert_eq!(b.txid(), synced);
    attach("replica-host-b", Arc::clone(&b));
    let mut map_b = BlockMap::new(open_connection("replica-host-b").expect("open")).expect("map");
    assert_eq!(map_b.get(5).expect("get"), None, "trimmed on A");
    assert_eq!(map_b.get(2999).expect("get"), Some(loc(2999)));
    assert_eq!(map_b.usage().expect("usage"), map_a.usage().expect("usage"));

    // B writes and publishes the next TXID; A, still writing, is fenced at its next sync.
    map_b
        .apply(
            &[],
            &[MapChange::Delete {
                first: 2000,
                count: 1000,
            }],
        )
        .expect("trim on B");
    rt.block_on(sync_once(&b, &replica, 4))
        .expect("sync B")
        .expect("uploaded");
    map_a
        .apply(
            &[],
            &[MapChange::Delete {
                first: 100,
                count: 1,
            }],
        )
        .expect("write on A");
    let err = rt
        .block_on(sync_once(&a, &replica, 5))
        .expect_err("A must be fenced");
    assert!(matches!(err, ReplicaError::Conflict(_)), "{err}");

    // The replica holds B's history: a third host sees B's trim, not A's late write.
    let source = rt
        .block_on(RemoteSource::open(
            Arc::clone(&replica),
            RestoreTarget::Latest,
            rt.handle().clone(),
        ))
        .expect("open replica");
    let c = Arc::new(DatabaseState::new(Some(Arc::new(source)), 4096).expect("state"));
    attach("replica-host-c", c);
    let map_c = BlockMap::new(open_connection("replica-host-c").expect("open")).expect("map");
    assert_eq!(map_c.get(2500).expect("get"), None);
    assert_eq!(map_c.get(100).expect("get"), Some(loc(100)));
}

#[test]
fn hydration_switches_reads_to_a_verified_local_copy_without_losing_new_commits() {
    use blockmap::vfs::hydrate::{Progress, hydrate};
    use blockmap::vfs::state::PageSource;
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).expect("store"));
    let replica = Arc::new(Replica::new(
        store,
        Path::from("vol/blockmap"),
        Layout::File,
    ));

    let a = Arc::new(DatabaseState::new(None, 4096).expect("state"));
    attach("hydrate-host-a", Arc::clone(&a));
    let mut map_a = BlockMap::new(open_connection("hydrate-host-a").expect("open")).expect("map");
    let puts: Vec<MapChange> = (0..5000)
        .map(|i| MapChange::Put {
            block: i,
            location: loc(i),
        })
        .collect();
    map_a.apply(&[(1, 1 << 30)], &puts).expect("apply");
    rt.block_on(sync_once(&a, &replica, 1))
        .expect("sync")
        .expect("uploaded");
    drop(map_a);

    let source = rt
        .block_on(RemoteSource::open(
            Arc::clone(&replica),
            RestoreTarget::Latest,
            rt.handle().clone(),
        ))
        .expect("open replica");
    let opened_at = source.txid();
    let b = Arc::new(DatabaseState::new(Some(Arc::new(source)), 4096).expect("state"));
    attach("hydrate-host-b", Arc::clone(&b));
    let mut map_b = BlockMap::new(open_connection("hydrate-host-b").expect("open")).expect("map");
    // Commits made while hydration runs stay in the overlay.
    map_b
        .apply(
            &[],
            &[MapChange::Delete {
                first: 4000,
                count: 1000,
            }],
        )
        .expect("trim");

    let progress = Progress::default();
    let local = rt
        .block_on(hydrate(
            &replica,
            opened_at,
            &dir.path().join("hydrated.db"),
            &progress,
        ))
        .expect("hydrate");
    assert_eq!(progress.fraction(), 1.0);
    b.replace_base(Arc::new(local))
        .expect("switch to the local copy");
    map_b
        .apply(&[], &[MapChange::Delete { first: 0, count: 1 }])
        .expect("write after the switch");

    assert_eq!(
        map_b.get(4500).expect("get"),
        None,
        "the trim made during hydration survives"
    );
    assert_eq!(map_b.get(0).expect("get"), None);
    assert_eq!(map_b.get(3999).expect("get"), Some(loc(3999)));
    assert_eq!(map_b.usage().expect("usage"), (3999, 3999 * 100));
    let check: String = map_b
        .connection()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("check");
    assert_eq!(check, "ok");

    // A copy of some other state is refused.
    rt.block_on(sync_once(&b, &replica, 2))
        .expect("sync")
        .expect("uploaded");
    let newer = rt
        .block_on(hydrate(
            &replica,
            opened_at + 1,
            &dir.path().join("newer.db"),
            &Progress::default(),
        ))
        .expect("hydrate newer");
    assert!(b.replace_base(Arc::new(newer)).is_err());
}
