//! Leases on the local-directory store (create-only puts, no If-Match): concurrent writers get
//! distinct epochs, and every writer but the newest finds itself fenced.

use blockmap::lease::{self, LeaseError};
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_get_distinct_epochs_and_older_ones_are_fenced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalFileSystem::new_with_prefix(dir.path()).expect("store"));
    let root = Path::from("vol");
    assert_eq!(
        lease::current_epoch(store.as_ref(), &root)
            .await
            .expect("epoch"),
        0
    );

    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = Arc::clone(&store);
            let root = root.clone();
            tokio::spawn(async move { lease::acquire(&store, &root, &format!("writer-{i}")).await })
        })
        .collect();
    let mut leases = Vec::new();
    for t in tasks {
        leases.push(t.await.expect("task").expect("acquire"));
    }
    let mut epochs: Vec<u64> = leases.iter().map(|l| l.epoch).collect();
    epochs.sort();
    assert_eq!(
        epochs,
        (1..=8).collect::<Vec<_>>(),
        "every writer got its own epoch"
    );

    for l in &leases {
        let checked = l.check(store.as_ref(), &root).await;
        if l.epoch == 8 {
            checked.expect("the newest writer holds the volume");
        } else {
            assert!(
                matches!(checked, Err(LeaseError::Fenced { current: 8, .. })),
                "epoch {} must be fenced",
                l.epoch
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_reply_was_lost_is_taken_not_skipped() {
    use stores::chaos::{FaultKind, FaultPlan};
    let dir = tempfile::tempdir().expect("tempdir");
    let inner: Arc<dyn ObjectStore> =
        Arc::new(LocalFileSystem::new_with_prefix(dir.path()).expect("store"));
    let root = Path::from("vol");
    // Every PUT is stored and its reply lost: the retry meets the lease its first attempt took.
    let plan = FaultPlan {
        kinds: vec![FaultKind::LostReply],
        ..FaultPlan::default().with_rate(1.0)
    };
    let (lossy, _) = stores::url::with_faults(Arc::clone(&inner), plan);
    let first = lease::acquire(&lossy, &root, "same-holder")
        .await
        .expect("acquire");
    assert_eq!(first.epoch, 1, "its own epoch, not the next one");
    // Another writer with the same holder text, whose replies are lost too, is told apart.
    let second = lease::acquire(&lossy, &root, "same-holder")
        .await
        .expect("acquire");
    assert_eq!(second.epoch, 2);
    first
        .release(lossy.as_ref(), &root)
        .await
        .expect("a release whose reply was lost is done");
    assert_eq!(
        lease::current_epoch(inner.as_ref(), &root)
            .await
            .expect("epoch"),
        2
    );
}
