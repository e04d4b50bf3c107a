//! The open hint on a real (local-directory) store: a current hint makes an open read nothing
//! from the snapshot; a stale or damaged one is ignored; a writer whose first lookups had to
//! read the snapshot writes a hint that spares the next open those reads.

use blockmap::open_hint::{self, OpenHint};
use blockmap::replica::{Layout, PageMap, Replica};
use blockmap::writer::{MapWriter, OpenAhead};
use blockmap::{BlockLocation, BlockMap, MapChange};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use std::sync::Arc;
use std::time::Duration;
use stores::faulty::FaultyStore;

fn loc(i: u64) -> BlockLocation {
    BlockLocation {
        chunk: 1,
        offset: i,
        length: 10,
        // Rows that compress poorly: a snapshot of few rows is then large enough.
        checksum: (i.wrapping_mul(0x9E37_79B9) >> 7) as u32,
    }
}

fn puts(blocks: impl Iterator<Item = u64>) -> Vec<MapChange> {
    blocks
        .map(|block| MapChange::Put {
            block,
            location: loc(block),
        })
        .collect()
}

struct Fixture {
    /// Names the test's databases: the VFS registry is shared by the tests of this process.
    test: &'static str,
    _dir: tempfile::TempDir,
    counted: Arc<FaultyStore>,
    store: Arc<dyn ObjectStore>,
    replica: Arc<Replica>,
}

impl Fixture {
    fn new(test: &'static str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let local: Arc<dyn ObjectStore> =
            Arc::new(LocalFileSystem::new_with_prefix(dir.path()).expect("store"));
        let counted = Arc::new(FaultyStore::new(local));
        let store: Arc<dyn ObjectStore> = Arc::clone(&counted) as _;
        let replica = Arc::new(Replica::new(
            Arc::clone(&store),
            Path::from("vol/blockmap"),
            Layout::File,
        ));
        Fixture {
            test,
            _dir: dir,
            counted,
            store,
            replica,
        }
    }

    async fn open(&self, db: &str, ahead: OpenAhead) -> MapWriter {
        MapWriter::open_ahead(
            Arc::clone(&self.store),
            Arc::clone(&self.replica),
            Path::from("vol"),
            &format!("{}-{db}", self.test),
            "host",
            tokio::runtime::Handle::current(),
            ahead,
        )
        .await
        .expect("open")
    }

    /// A map whose snapshot is several times larger than what an open reads of it anyway, with
    /// block 0's leaf page in the middle of it: rows after it were inserted first, rows after
    /// them last, so its page was allocated between the two.
    async fn build_snapshot(&self) {
        let w = self.open("hint-build", OpenAhead::default()).await;
        let mut map = BlockMap::new(w.connection().expect("conn")).expect("map");
        map.apply(&[(1, 1 << 20)], &[]).expect("chunk");
        map.apply(&[], &puts(100_000..130_000)).expect("first rows");
        map.apply(&[], &puts(0..50)).expect("block 0's rows");
        map.apply(&[], &puts(130_000..250_000)).expect("last rows");
        w.sync().await.expect("sync");
        w.maintain().await.expect("snapshot");
        drop(map);
        w.close().await.expect("close");
    }

    async fn hint_bytes(&self) -> Option<bytes::Bytes> {
        match self.store.get(&self.replica.hint_path()).await {
            Ok(got) => Some(got.bytes().await.expect("hint body")),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("reading the hint: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_current_hint_spares_the_open_every_read_of_the_snapshot() {
    let f = Fixture::new("current");
    f.build_snapshot().await;
    let plan = f
        .replica
        .plan(ltx::RestoreTarget::Latest)
        .await
        .expect("plan");
    assert_eq!(plan.len(), 1, "a snapshot alone: {plan:?}");
    let hint = open_hint::load(&f.replica)
        .await
        .expect("a hint beside the snapshot");
    assert!(hint.describes(&plan[0]));

    let before = f.counted.requests();
    let with_hint = PageMap::open_files(&f.replica, plan.clone(), Some(&hint))
        .await
        .expect("open with the hint");
    let first: Vec<u32> = (1..=8).collect();
    with_hint
        .read_pages(&f.replica, &first)
        .await
        .expect("first pages");
    assert_eq!(f.counted.requests(), before, "the hint held all of it");

    // The same pages as without a hint.
    let without = PageMap::open_files(&f.replica, plan.clone(), None)
        .await
        .expect("open without");
    assert_eq!(
        without.read_pages(&f.replica, &first).await.expect("pages"),
        with_hint
            .read_pages(&f.replica, &first)
            .await
            .expect("pages")
    );
    assert_eq!(
        (without.commit, without.txid),
        (with_hint.commit, with_hint.txid)
    );

    // A hint for another object (here: another size) is not used.
    let mut stale = hint.clone();
    stale.size += 1;
    let before = f.counted.requests();
    PageMap::open_files(&f.replica, plan, Some(&stale))
        .await
        .expect("open with a stale hint");
    assert!(f.counted.requests() > before, "a stale hint was used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_hint_is_ignored() {
    let f = Fixture::new("damaged");
    f.build_snapshot().await;
    let mut bytes = f.hint_bytes().await.expect("hint").to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    assert!(OpenHint::decode(&bytes).is_err());
    f.store
        .put(&f.replica.hint_path(), bytes.into())
        .await
        .expect("damage the hint");
    assert!(open_hint::load(&f.replica).await.is_none());
    // The open reads the snapshot instead, and works.
    let w = f.open("hint-damaged", OpenAhead::default()).await;
    let map = BlockMap::open_read_only(w.connection().expect("conn")).expect("map");
    assert_eq!(map.get(0).expect("lookup"), Some(loc(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boot_that_read_the_snapshot_leaves_a_hint_that_spares_the_next_one() {
    let f = Fixture::new("rewrite");
    f.build_snapshot().await;
    let written_with_snapshot = f.hint_bytes().await.expect("hint");
    // The snapshot's writer had opened an empty map: its hint holds head and index only, and
    // block 0's lookup reads pages from the middle of the snapshot.
    let ahead = |hint| OpenAhead {
        hint,
        first_lookups: vec![0],
        ..OpenAhead::default()
    };
    // Each open adds a file (its claim) that the next one reads the index of: costs are
    // compared without those reads.
    let newer_files = async || {
        let plan = f
            .replica
            .plan(ltx::RestoreTarget::Latest)
            .await
            .expect("plan");
        plan.len() as u64 - 1
    };
    let newer_before_second = newer_files().await;
    let before = f.counted.requests();
    let second = f
        .open("hint-second", ahead(open_hint::load(&f.replica).await))
        .await;
    let second_cost = f.counted.requests() - before - newer_before_second;
    let mut rewritten = None;
    for _ in 0..100 {
        match f.hint_bytes().await {
            Some(bytes) if bytes != written_with_snapshot => {
                rewritten = Some(bytes);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let rewritten = rewritten.expect("the second open rewrote the hint");
    assert!(rewritten.len() > written_with_snapshot.len());
    second.close().await.expect("close");

    let newer_before_third = newer_files().await;
    assert!(newer_before_third > newer_before_second);
    let before = f.counted.requests();
    let (tell, located) = tokio::sync::oneshot::channel();
    let third = f
        .open(
            "hint-third",
            OpenAhead {
                first_located: Some(tell),
                ..ahead(open_hint::load(&f.replica).await)
            },
        )
        .await;
    let third_cost = f.counted.requests() - before - newer_before_third;
    assert!(
        third_cost < second_cost,
        "the third open cost {third_cost} requests, the second {second_cost}"
    );
    assert_eq!(
        located.await.expect("first lookups told"),
        vec![(0, Some(loc(0)))]
    );
    // Block 0 is looked up from memory now: no request.
    let before = f.counted.requests();
    let map = BlockMap::open_read_only(third.connection().expect("conn")).expect("map");
    assert_eq!(map.get(0).expect("lookup"), Some(loc(0)));
    assert_eq!(f.counted.requests(), before);
    // And the hint stays as it is: nothing was missing from it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(f.hint_bytes().await.as_ref(), Some(&rewritten));
}
