//! Compaction, snapshots and retention on a local-directory replica; the result still restores
//! with the real `litestream restore`.

use blockmap::compaction::{compact_level, enforce_retention, snapshot};
use blockmap::replica::{Layout, PageMap, Replica};
use ltx::{Encoder, HEADER_FLAG_NO_CHECKSUM, Header, RestoreTarget};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use std::sync::Arc;

mod common;
use common::litestream_restore;

const PAGE: usize = 4096;

/// A database image after each transaction: page counts grow and shrink, contents change.
fn history(transactions: u64) -> Vec<Vec<Vec<u8>>> {
    let mut images: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut pages: Vec<Vec<u8>> = vec![vec![1u8; PAGE]; 3];
    for t in 1..=transactions {
        if t > 1 {
            let n = pages.len();
            pages[(t as usize * 7) % n] = vec![t as u8; PAGE];
            if t % 3 == 0 {
                pages.push(vec![(t as u8) ^ 0x5a; PAGE]);
            }
            if t % 5 == 0 && pages.len() > 2 {
                pages.pop();
            }
        }
        images.push(pages.clone());
    }
    images
}

fn l0_file(images: &[Vec<Vec<u8>>], txid: u64) -> bytes::Bytes {
    let now = &images[txid as usize - 1];
    let header = Header {
        flags: HEADER_FLAG_NO_CHECKSUM,
        page_size: PAGE as u32,
        commit: now.len() as u32,
        min_txid: txid,
        max_txid: txid,
        timestamp: 1_700_000_000_000 + txid as i64,
        ..Header::default()
    };
    let mut enc = Encoder::new(Vec::new(), header).expect("header");
    for (i, page) in now.iter().enumerate() {
        let before = (txid > 1)
            .then(|| images[txid as usize - 2].get(i))
            .flatten();
        if before != Some(page) {
            enc.encode_page(i as u32 + 1, page).expect("page");
        }
    }
    bytes::Bytes::from(enc.finish(0).expect("finish").0)
}

async fn read_image(replica: &Replica, target: RestoreTarget) -> Vec<u8> {
    let map = PageMap::open(replica, target).await.expect("open");
    let mut image = Vec::new();
    for pgno in 1..=map.commit {
        image.extend(map.read_page(replica, pgno).await.expect("page"));
    }
    image
}

#[tokio::test]
async fn compaction_snapshots_and_retention_keep_every_state_readable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).expect("store"));
    let replica = Replica::new(store, Path::from(""), Layout::File);
    let images = history(15);
    let flat = |t: usize| images[t - 1].concat();

    for t in 1..=12 {
        replica
            .publish(0, l0_file(&images, t))
            .await
            .expect("publish");
    }
    let l1 = compact_level(&replica, 0, 1)
        .await
        .expect("compact")
        .expect("new file");
    assert_eq!((l1.name.min_txid, l1.name.max_txid), (1, 12));
    assert!(
        compact_level(&replica, 0, 1)
            .await
            .expect("compact")
            .is_none()
    );
    for t in 13..=15 {
        replica
            .publish(0, l0_file(&images, t))
            .await
            .expect("publish");
    }
    let l1b = compact_level(&replica, 0, 1)
        .await
        .expect("compact")
        .expect("new file");
    assert_eq!((l1b.name.min_txid, l1b.name.max_txid), (13, 15));
    for t in [5, 12, 15] {
        assert_eq!(
            read_image(&replica, RestoreTarget::Txid(t as u64)).await,
            flat(t),
            "TXID {t}"
        );
    }

    let snap = snapshot(&replica)
        .await
        .expect("snapshot")
        .expect("new snapshot");
    assert_eq!((snap.name.min_txid, snap.name.max_txid), (1, 15));
    assert!(
        snapshot(&replica).await.expect("snapshot").is_none(),
        "already current"
    );

    let deleted = enforce_retention(&replica, 1).await.expect("retention");
    assert_eq!(
        deleted.len(),
        15 + 2,
        "every L0 and L1 file is covered by the snapshot"
    );
    assert_eq!(replica.list().await.expect("list").len(), 1);
    assert_eq!(read_image(&replica, RestoreTarget::Latest).await, flat(15));

    // The real Litestream restores the compacted replica.
    let out = dir.path().join("restored.db");
    litestream_restore(dir.path(), &out);
    assert_eq!(std::fs::read(&out).expect("restored"), flat(15));
}
