//! The replica over the S3 protocol, against a real S3 server (moto, started here): Litestream's
//! replica copied in with the S3 layout reads back page for page, and concurrent create-only
//! publishes of one TXID always leave exactly one winner.

use blockmap::replica::{Layout, PageMap, Replica, ReplicaError};
use ltx::RestoreTarget;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use std::sync::Arc;

mod common;
use common::{create_bucket, s3, start_moto, start_moto_serial, testdata};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_over_s3() {
    let moto = start_moto_serial();
    create_bucket(moto.port, "bucketdisk");
    let store = s3(moto.port, "bucketdisk");

    // Litestream's file-layout replica, copied to the S3 layout (<level as %04x>/).
    let source = testdata().join("replica/ltx");
    for level in std::fs::read_dir(&source).expect("levels") {
        let level = level.expect("entry").path();
        let n: u8 = level
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .expect("level");
        for file in std::fs::read_dir(&level).expect("files") {
            let file = file.expect("entry").path();
            let key = format!(
                "vol/blockmap/{n:04x}/{}",
                file.file_name().and_then(|f| f.to_str()).expect("name")
            );
            let bytes = std::fs::read(&file).expect("read");
            store
                .put(&Path::from(key), PutPayload::from(bytes))
                .await
                .expect("put");
        }
    }
    let replica = Replica::new(
        Arc::clone(&store),
        Path::from("vol/blockmap"),
        Layout::ObjectStore,
    );
    assert_eq!(replica.list().await.expect("list").len(), 18);
    let map = PageMap::open(&replica, RestoreTarget::Latest)
        .await
        .expect("open");
    let mut image = Vec::new();
    for pgno in 1..=map.commit {
        image.extend(map.read_page(&replica, pgno).await.expect("page"));
    }
    assert_eq!(
        image,
        std::fs::read(testdata().join("final_state.db")).expect("final_state.db")
    );

    // Two writers racing for the same TXID: exactly one wins, every time.
    let racer = Arc::new(Replica::new(store, Path::from("race"), Layout::ObjectStore));
    for txid in 1..=20u64 {
        let file = |fill: u8| {
            let header = ltx::Header {
                flags: ltx::HEADER_FLAG_NO_CHECKSUM,
                page_size: 4096,
                commit: 1,
                min_txid: txid,
                max_txid: txid,
                timestamp: 1,
                ..ltx::Header::default()
            };
            let mut enc = ltx::Encoder::new(Vec::new(), header).expect("header");
            enc.encode_page(1, &vec![fill; 4096]).expect("page");
            bytes::Bytes::from(enc.finish(0).expect("finish").0)
        };
        let (a, b) = (Arc::clone(&racer), Arc::clone(&racer));
        let (fa, fb) = (file(1), file(2));
        let (ra, rb) = tokio::join!(
            tokio::spawn(async move { a.publish(0, fa).await }),
            tokio::spawn(async move { b.publish(0, fb).await })
        );
        let results = [ra.expect("task"), rb.expect("task")];
        let wins = results.iter().filter(|r| r.is_ok()).count();
        let conflicts = results
            .iter()
            .filter(|r| matches!(r, Err(ReplicaError::Conflict(_))))
            .count();
        assert_eq!((wins, conflicts), (1, 1), "TXID {txid}: {results:?}");
    }
}

/// Two writers on one S3 map: distinct lease epochs, and the older one is fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_over_s3_fence_each_other() {
    use blockmap::lease::LeaseError;
    use blockmap::writer::{MapWriter, WriterError};
    use blockmap::{BlockLocation, BlockMap, MapChange};
    let moto = start_moto();
    create_bucket(moto.port, "fencing");
    let store = s3(moto.port, "fencing");
    let replica = Arc::new(Replica::new(
        Arc::clone(&store),
        Path::from("vol/blockmap"),
        Layout::ObjectStore,
    ));
    let open = |name: &'static str| {
        MapWriter::open(
            Arc::clone(&store),
            Arc::clone(&replica),
            Path::from("vol"),
            name,
            name,
            tokio::runtime::Handle::current(),
        )
    };
    let loc = BlockLocation {
        chunk: 1,
        offset: 0,
        length: 1,
        checksum: 0,
    };
    let w1 = open("s3-writer-1").await.expect("w1");
    let mut m1 = BlockMap::new(w1.connection().expect("conn")).expect("map");
    m1.apply(
        &[(1, 10)],
        &[MapChange::Put {
            block: 1,
            location: loc,
        }],
    )
    .expect("apply");
    w1.sync().await.expect("sync");
    let w2 = open("s3-writer-2").await.expect("w2");
    assert_eq!((w1.lease().epoch, w2.lease().epoch), (1, 2));
    let m2 = BlockMap::new(w2.connection().expect("conn")).expect("map");
    assert_eq!(m2.get(1).expect("get"), Some(loc));
    m1.apply(
        &[],
        &[MapChange::Delete {
            first: 0,
            count: 10,
        }],
    )
    .expect("late write");
    let err = w1.sync().await.expect_err("fenced");
    assert!(
        matches!(err, WriterError::Lease(LeaseError::Fenced { .. })),
        "{err}"
    );
}
