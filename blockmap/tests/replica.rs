//! Reading Litestream's own replica (testdata/ltx/replica) through object_store, and
//! create-only publishing.

use blockmap::replica::{Layout, PageMap, Replica, ReplicaError};
use ltx::RestoreTarget;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use std::sync::Arc;

mod common;
use common::testdata;

fn replica_at(dir: &std::path::Path) -> Replica {
    let store = LocalFileSystem::new_with_prefix(dir).expect("local store");
    Replica::new(Arc::new(store), Path::from(""), Layout::File)
}

#[tokio::test]
async fn pages_read_through_the_index_rebuild_the_database() {
    let replica = replica_at(&testdata().join("replica"));
    let files = replica.list().await.expect("list");
    assert_eq!(files.len(), 18);
    let expected = std::fs::read(testdata().join("final_state.db")).expect("final_state.db");

    for target in [RestoreTarget::Latest, RestoreTarget::Txid(7)] {
        let map = PageMap::open(&replica, target).await.expect("open");
        assert_eq!(map.txid, 7);
        let mut image = Vec::new();
        for pgno in 1..=map.commit {
            image.extend(map.read_page(&replica, pgno).await.expect("page"));
        }
        assert_eq!(image, expected);
        assert!(matches!(
            map.read_page(&replica, map.commit + 1).await,
            Err(ReplicaError::MissingPage(_))
        ));
    }
    // An older state differs from the latest.
    let at4 = PageMap::open(&replica, RestoreTarget::Txid(4))
        .await
        .expect("open");
    assert_eq!(at4.txid, 4);
}

#[tokio::test]
async fn publishing_is_create_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let replica = replica_at(dir.path());
    let header = ltx::Header {
        flags: ltx::HEADER_FLAG_NO_CHECKSUM,
        page_size: 4096,
        commit: 1,
        min_txid: 1,
        max_txid: 1,
        timestamp: 1,
        ..ltx::Header::default()
    };
    let encode_at = |fill: u8, timestamp: i64| {
        let header = ltx::Header {
            timestamp,
            ..header
        };
        let mut enc = ltx::Encoder::new(Vec::new(), header).expect("header");
        enc.encode_page(1, &vec![fill; 4096]).expect("page");
        bytes::Bytes::from(enc.finish(0).expect("finish").0)
    };
    let encode = |fill: u8| encode_at(fill, 1);
    let path = replica.publish(0, encode(1)).await.expect("first writer");
    // The same change encoded again later (a retried sync after a lost reply) is the same.
    replica
        .publish(0, encode_at(1, 2))
        .await
        .expect("the same change, re-encoded");
    assert_eq!(
        path.to_string(),
        "ltx/0/0000000000000001-0000000000000001.ltx"
    );
    let err = replica
        .publish(0, encode(2))
        .await
        .expect_err("second writer must lose");
    assert!(matches!(err, ReplicaError::Conflict(_)), "{err}");
    // The first writer's page survives.
    let map = PageMap::open(&replica, RestoreTarget::Latest)
        .await
        .expect("open");
    assert_eq!(
        map.read_page(&replica, 1).await.expect("page"),
        vec![1u8; 4096]
    );
}

/// A one-page snapshot with checksums, as a writer encodes it at `timestamp`.
fn snapshot(fill: u8, timestamp: i64) -> bytes::Bytes {
    let header = ltx::Header {
        page_size: 4096,
        commit: 1,
        min_txid: 1,
        max_txid: 1,
        timestamp,
        ..ltx::Header::default()
    };
    let page = vec![fill; 4096];
    let mut enc = ltx::Encoder::new(Vec::new(), header).expect("header");
    enc.encode_page(1, &page).expect("page");
    let sum = ltx::DatabaseChecksum::of_database(&page, 4096);
    bytes::Bytes::from(enc.finish(sum).expect("finish").0)
}

#[tokio::test]
async fn a_publish_whose_reply_was_lost_is_this_writers_own_when_retried() {
    use stores::chaos::{FaultKind, FaultPlan};
    let dir = tempfile::tempdir().expect("tempdir");
    let inner = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).expect("store"));
    // Every PUT is stored and its reply lost.
    let plan = FaultPlan {
        kinds: vec![FaultKind::LostReply],
        ..FaultPlan::default().with_rate(1.0)
    };
    let (lossy, chaos) = stores::url::with_faults(inner.clone(), plan);
    let replica = Replica::new(lossy, Path::from(""), Layout::File);
    replica
        .publish(0, snapshot(1, 10))
        .await
        .expect("the retry finds its own file");
    assert!(chaos.counts().injected() >= 1);

    // A sync retried after its attempts ran out encodes the same change again, at another time.
    let plain = Replica::new(inner, Path::from(""), Layout::File);
    plain
        .publish(0, snapshot(1, 99))
        .await
        .expect("the same change, re-encoded");
    let err = plain
        .publish(0, snapshot(2, 10))
        .await
        .expect_err("another writer's change");
    assert!(matches!(err, ReplicaError::Conflict(_)), "{err}");
}
