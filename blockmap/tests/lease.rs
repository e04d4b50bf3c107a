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
