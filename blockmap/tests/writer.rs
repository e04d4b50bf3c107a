//! Two writers on one replicated map (local-directory store: create-only puts only): the second
//! takes the lease and claims the history; the first is fenced at its next sync and its late
//! write never reaches the replica.

use blockmap::lease::LeaseError;
use blockmap::replica::{Layout, PageMap, Replica};
use blockmap::writer::{MapWriter, WriterError};
use blockmap::{BlockLocation, BlockMap, MapChange};
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use std::sync::Arc;
use stores::faulty::FaultyStore;

fn loc(i: u64) -> BlockLocation {
    BlockLocation {
        chunk: 1,
        offset: i,
        length: 10,
        checksum: 0,
    }
}

/// A local-directory store whose requests are counted, and volume `vol`'s map replica on it.
fn counted_replica(
    dir: &std::path::Path,
) -> (Arc<FaultyStore>, Arc<dyn ObjectStore>, Arc<Replica>) {
    let local: Arc<dyn ObjectStore> =
        Arc::new(LocalFileSystem::new_with_prefix(dir).expect("store"));
    let counted = Arc::new(FaultyStore::new(local));
    let store: Arc<dyn ObjectStore> = Arc::clone(&counted) as _;
    let replica = Arc::new(Replica::new(
        Arc::clone(&store),
        Path::from("vol/blockmap"),
        Layout::File,
    ));
    (counted, store, replica)
}

/// Takes volume `vol`'s map as writer `name`.
async fn open_writer(
    store: &Arc<dyn ObjectStore>,
    replica: &Arc<Replica>,
    name: &str,
    holder: &str,
) -> Result<MapWriter, WriterError> {
    MapWriter::open(
        Arc::clone(store),
        Arc::clone(replica),
        Path::from("vol"),
        name,
        holder,
        tokio::runtime::Handle::current(),
    )
    .await
}

/// What opening the latest map costs: the files its restore plan reads, the store requests
/// the open makes, and the TXID it reaches.
async fn open_cost(counted: &FaultyStore, replica: &Replica) -> (usize, u64, u64) {
    let files = replica
        .plan(ltx::RestoreTarget::Latest)
        .await
        .expect("plan");
    let before = counted.requests();
    let map = PageMap::open(replica, ltx::RestoreTarget::Latest)
        .await
        .expect("open");
    (files.len(), counted.requests() - before, map.txid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_writer_fences_the_old_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalFileSystem::new_with_prefix(dir.path()).expect("store"));
    let replica = Arc::new(Replica::new(
        Arc::clone(&store),
        Path::from("vol/blockmap"),
        Layout::File,
    ));
    let open = |name: &'static str, holder: &'static str| {
        MapWriter::open(
            Arc::clone(&store),
            Arc::clone(&replica),
            Path::from("vol"),
            name,
            holder,
            tokio::runtime::Handle::current(),
        )
    };

    let w1 = open("writer-test-1", "host-1").await.expect("open w1");
    assert_eq!(w1.lease().epoch, 1);
    let mut map1 = BlockMap::new(w1.connection().expect("conn")).expect("map");
    let puts: Vec<MapChange> = (0..500)
        .map(|i| MapChange::Put {
            block: i,
            location: loc(i),
        })
        .collect();
    map1.apply(&[(1, 1 << 20)], &puts).expect("apply");
    w1.sync().await.expect("sync").expect("uploaded");

    let w2 = open("writer-test-2", "host-2").await.expect("open w2");
    assert_eq!(w2.lease().epoch, 2);
    assert!(w2.txid() > w1.txid(), "w2 claimed the next TXID");
    let mut map2 = BlockMap::new(w2.connection().expect("conn")).expect("map");
    assert_eq!(map2.get(499).expect("get"), Some(loc(499)));

    map1.apply(
        &[],
        &[MapChange::Delete {
            first: 0,
            count: 100,
        }],
    )
    .expect("late write on w1");
    let err = w1.sync().await.expect_err("w1 must be fenced");
    assert!(
        matches!(
            err,
            WriterError::Lease(LeaseError::Fenced {
                held: 1,
                current: 2
            })
        ),
        "{err}"
    );

    map2.apply(
        &[],
        &[MapChange::Delete {
            first: 400,
            count: 100,
        }],
    )
    .expect("write on w2");
    drop(map2);
    w2.close().await.expect("close w2");

    let w3 = open("writer-test-3", "host-3").await.expect("open w3");
    let map3 = BlockMap::new(w3.connection().expect("conn")).expect("map");
    assert_eq!(
        map3.get(450).expect("get"),
        None,
        "w2's trim is in the replica"
    );
    assert_eq!(
        map3.get(50).expect("get"),
        Some(loc(50)),
        "w1's late trim is not"
    );
}

/// A new writer reads the map, then claims the next TXID. If the writer it replaces publishes
/// in between (here: the new writer's PUTs to the replica are held until the old writer has
/// synced), the new writer's claim collides, it reads the map again and serves the old
/// writer's last sync; the old writer is fenced at its next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_between_the_new_writers_read_and_its_claim_is_not_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (faulty, store, replica) = counted_replica(dir.path());
    // The old writer reaches the same directory without the held gate.
    let (_, plain_store, plain_replica) = counted_replica(dir.path());
    let w1 = open_writer(&plain_store, &plain_replica, "race-writer-1", "host-1")
        .await
        .expect("open w1");
    let mut map1 = BlockMap::new(w1.connection().expect("conn")).expect("map");
    let put = |block: u64| MapChange::Put {
        block,
        location: loc(block),
    };
    map1.apply(&[(1, 1 << 20)], &[put(1)]).expect("apply");
    w1.sync().await.expect("sync").expect("uploaded");

    faulty.hold_puts("vol/blockmap/");
    let opening = open_writer(&store, &replica, "race-writer-2", "host-2");
    let meanwhile = async {
        // w2 reads the map (a local store answers in microseconds) and waits on its claim;
        // w1 syncs once more. Had w2's claim landed first, this sync would be fenced.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        map1.apply(&[], &[put(2)]).expect("apply");
        w1.sync()
            .await
            .expect("nothing has collided with w1 yet")
            .expect("uploaded");
        faulty.release_puts();
    };
    let (w2, ()) = tokio::join!(opening, meanwhile);
    let w2 = w2.expect("open w2 after a collision");
    assert_eq!(w2.lease().epoch, 2);
    assert!(w2.txid() > w1.txid(), "w2 claimed after w1's last sync");
    let map2 = BlockMap::new(w2.connection().expect("conn")).expect("map");
    assert_eq!(
        map2.get(2).expect("get"),
        Some(loc(2)),
        "w1's last sync is served"
    );

    map1.apply(&[], &[put(3)]).expect("late write on w1");
    let err = w1.sync().await.expect_err("w1 must be fenced");
    assert!(
        matches!(err, WriterError::Lease(LeaseError::Fenced { .. })),
        "{err}"
    );
}

/// After many syncs and a maintenance pass, opening the map costs a handful of requests, not
/// one per transaction ever written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_keeps_the_open_cheap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (counted, store, replica) = counted_replica(dir.path());
    let w = open_writer(&store, &replica, "writer-test-maintain", "host")
        .await
        .expect("open");
    let mut map = BlockMap::new(w.connection().expect("conn")).expect("map");
    map.apply(&[(1, 1 << 20)], &[]).expect("chunk");
    for i in 0..60u64 {
        map.apply(
            &[],
            &[MapChange::Put {
                block: i,
                location: loc(i),
            }],
        )
        .expect("apply");
        w.sync().await.expect("sync");
    }
    let (_, before, txid) = open_cost(&counted, &replica).await;
    w.maintain().await.expect("maintain");
    let (_, after, txid_after) = open_cost(&counted, &replica).await;
    assert_eq!(txid, txid_after);
    assert!(before > 60, "60 L0 files cost {before} requests to open");
    assert!(
        after <= 14,
        "after maintenance the open costs {after} requests"
    );
    let w2 = open_writer(&store, &replica, "writer-test-maintain-2", "host2")
        .await
        .expect("reopen");
    let map2 = BlockMap::new(w2.connection().expect("conn")).expect("map");
    assert_eq!(map2.get(59).expect("get"), Some(loc(59)));
}

/// A writer that goes idle (or closes) many times tidies each time: however many sessions
/// came before, opening reads a snapshot and a few level-1 files, not one file per transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tidying_keeps_the_open_cheap_across_many_sessions() {
    use blockmap::writer::TIDY_SNAPSHOT_AFTER;
    let dir = tempfile::tempdir().expect("tempdir");
    let (counted, store, replica) = counted_replica(dir.path());
    // A snapshot, the level-1 files after it (one fewer than trigger the next snapshot), and
    // the level-1 file just compacted.
    let bound = 1 + TIDY_SNAPSHOT_AFTER;
    let mut block = 0u64;
    for session in 0..2 * TIDY_SNAPSHOT_AFTER {
        let w = open_writer(
            &store,
            &replica,
            &format!("writer-test-tidy-{session}"),
            "host",
        )
        .await
        .expect("open");
        let mut map = BlockMap::new(w.connection().expect("conn")).expect("map");
        map.apply(&[(session as u64 + 1, 1 << 20)], &[])
            .expect("chunk");
        for _ in 0..20 {
            map.apply(
                &[],
                &[MapChange::Put {
                    block,
                    location: loc(block),
                }],
            )
            .expect("apply");
            block += 1;
            w.sync().await.expect("sync");
        }
        let (untidy_files, untidy_requests, txid) = open_cost(&counted, &replica).await;
        assert!(
            untidy_files >= 20,
            "20 new transactions, {untidy_files} files"
        );
        w.tidy().await.expect("tidy");
        let (files, requests, txid_after) = open_cost(&counted, &replica).await;
        assert_eq!(txid, txid_after, "tidying changes no content");
        assert!(
            files <= bound && requests < untidy_requests,
            "session {session}: after tidying an open reads {files} files (bound {bound}) \
             in {requests} requests (before: {untidy_requests})"
        );
        drop(map);
        w.close().await.expect("close");
    }
    let w = open_writer(&store, &replica, "writer-test-tidy-last", "host")
        .await
        .expect("reopen");
    let map = BlockMap::new(w.connection().expect("conn")).expect("map");
    for b in [0, block / 2, block - 1] {
        assert_eq!(map.get(b).expect("get"), Some(loc(b)));
    }
    assert_eq!(map.get(block).expect("get"), None);
}

/// A writer that opened an existing replica reads pages through the files present at open, so
/// retention must leave them alone until it has hydrated; after that, it may delete them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_waits_for_the_writer_to_hydrate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalFileSystem::new_with_prefix(dir.path()).expect("store"));
    let replica = Arc::new(Replica::new(
        Arc::clone(&store),
        Path::from("vol/blockmap"),
        Layout::File,
    ));
    let open = |name: &'static str| {
        MapWriter::open(
            Arc::clone(&store),
            Arc::clone(&replica),
            Path::from("vol"),
            name,
            "host",
            tokio::runtime::Handle::current(),
        )
    };
    let w1 = open("retention-1").await.expect("open");
    {
        let mut map = BlockMap::new(w1.connection().expect("conn")).expect("map");
        map.apply(&[(1, 1 << 20)], &[]).expect("chunk");
        for i in 0..2000u64 {
            map.apply(
                &[],
                &[MapChange::Put {
                    block: i * 7,
                    location: loc(i),
                }],
            )
            .expect("apply");
        }
    }
    w1.close().await.expect("close");

    let w2 = open("retention-2")
        .await
        .expect("reopen on the existing replica");
    let map = BlockMap::new(w2.connection().expect("conn")).expect("map");
    for round in 0..3u64 {
        map.connection()
            .execute(
                "INSERT OR REPLACE INTO meta VALUES ('round', ?1)",
                [round.to_string()],
            )
            .expect("write");
        w2.sync().await.expect("sync");
        w2.maintain().await.expect("maintain before hydration");
    }
    // Every page is still readable, though none was read before maintenance ran.
    let fresh = BlockMap::new(w2.connection().expect("conn")).expect("map");
    for i in (0..2000u64).step_by(97) {
        assert_eq!(
            fresh.get(i * 7).expect("get"),
            Some(loc(i)),
            "block {}",
            i * 7
        );
    }
    w2.hydrate(&dir.path().join("hydrated.db"))
        .await
        .expect("hydrate");
    for round in 3..6u64 {
        map.connection()
            .execute(
                "INSERT OR REPLACE INTO meta VALUES ('round', ?1)",
                [round.to_string()],
            )
            .expect("write");
        w2.sync().await.expect("sync");
        w2.maintain().await.expect("maintain after hydration");
    }
    let snapshots = replica.list_level(9).await.expect("list");
    assert!(
        snapshots.len() <= 2,
        "retention ran after hydration: {snapshots:?}"
    );
    let fresh = BlockMap::new(w2.connection().expect("conn")).expect("map");
    for i in 0..2000u64 {
        assert_eq!(
            fresh.get(i * 7).expect("get"),
            Some(loc(i)),
            "block {}",
            i * 7
        );
    }
    assert_eq!(fresh.meta("round").expect("meta").as_deref(), Some("5"));
}

/// An open reads each file's first bytes with its index, so the pages every first query reads
/// (the schema, the tables' root pages) cost no further request, even from a snapshot too
/// large to be read whole; a page in the middle (neither in the head nor in the tail read for
/// the index) costs one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_pages_come_with_the_open() {
    use blockmap::replica::{HEAD_GUESS, INDEX_TAIL_GUESS};
    let dir = tempfile::tempdir().expect("tempdir");
    let (counted, store, replica) = counted_replica(dir.path());
    let w = open_writer(&store, &replica, "writer-test-first-pages", "host")
        .await
        .expect("open");
    let mut map = BlockMap::new(w.connection().expect("conn")).expect("map");
    map.apply(&[(1, 1 << 20)], &[]).expect("chunk");
    let changes: Vec<MapChange> = (0..120_000u64)
        .map(|i| MapChange::Put {
            block: i * 7,
            location: loc(i),
        })
        .collect();
    map.apply(&[], &changes).expect("apply");
    w.sync().await.expect("sync");
    w.maintain().await.expect("maintain");
    let plan = replica
        .plan(ltx::RestoreTarget::Latest)
        .await
        .expect("plan");
    assert_eq!(plan.len(), 1, "a snapshot alone: {plan:?}");
    assert!(
        plan[0].size > 2 * (HEAD_GUESS + INDEX_TAIL_GUESS),
        "the snapshot ({} bytes) must be far too large to be read whole",
        plan[0].size
    );
    let before = counted.requests();
    let pages = PageMap::open(&replica, ltx::RestoreTarget::Latest)
        .await
        .expect("open");
    let opened = counted.requests() - before;
    let first: Vec<u32> = (1..=8).collect();
    let read = pages
        .read_pages(&replica, &first)
        .await
        .expect("first pages");
    assert_eq!(read.len(), 8);
    assert_eq!(
        counted.requests() - before,
        opened,
        "the first pages cost requests of their own"
    );
    pages
        .read_page(&replica, pages.commit / 2)
        .await
        .expect("middle page");
    assert_eq!(counted.requests() - before, opened + 1);
}

/// A writer that tidies after every few transactions and never pauses long enough for a
/// snapshot leaves, between snapshots, one level-2 file and a few level-1 files: the open
/// reads a handful of files however long it ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tidying_folds_level_one_into_level_two() {
    use blockmap::writer::{FOLD_AFTER, TIDY_SNAPSHOT_AFTER};
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, store, replica) = counted_replica(dir.path());
    let w = open_writer(&store, &replica, "writer-test-level2", "host")
        .await
        .expect("open");
    let mut map = BlockMap::new(w.connection().expect("conn")).expect("map");
    map.apply(&[(1, 1 << 20)], &[]).expect("chunk");
    w.sync().await.expect("sync");
    w.maintain().await.expect("snapshot");
    let mut most = 0;
    for block in 0..(4 * (TIDY_SNAPSHOT_AFTER as u64 - 1)) {
        map.apply(
            &[],
            &[MapChange::Put {
                block,
                location: loc(block),
            }],
        )
        .expect("apply");
        w.sync().await.expect("sync");
        if block % 4 == 3 {
            w.tidy().await.expect("tidy");
            let plan = replica
                .plan(ltx::RestoreTarget::Latest)
                .await
                .expect("plan");
            most = most.max(plan.len());
        }
    }
    let plan = replica
        .plan(ltx::RestoreTarget::Latest)
        .await
        .expect("plan");
    assert!(
        plan.iter().any(|f| f.level == 2),
        "no level-2 file in {plan:?}"
    );
    // A snapshot, one level-2 file, and the level-1 files since it.
    assert!(most <= 2 + FOLD_AFTER, "an open read up to {most} files");
    let w2 = open_writer(&store, &replica, "writer-test-level2-b", "host2")
        .await
        .expect("reopen");
    let map2 = BlockMap::new(w2.connection().expect("conn")).expect("map");
    for b in 0..(4 * (TIDY_SNAPSHOT_AFTER as u64 - 1)) {
        assert_eq!(map2.get(b).expect("get"), Some(loc(b)));
    }
}
