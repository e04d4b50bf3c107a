//! A flaky store: transient failures are retried and invisible; a dead store is a clear error,
//! never garbage; service resumes when the store does.

use blockmap::replica::{Layout, PageMap, Replica};
use ltx::RestoreTarget;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use std::sync::Arc;
use stores::faulty::FaultyStore;

mod common;
use common::testdata;

#[tokio::test]
async fn transient_failures_are_retried_and_outages_are_errors() {
    let data = testdata();
    let local = Arc::new(LocalFileSystem::new_with_prefix(data.join("replica")).expect("store"));
    let faulty = Arc::new(FaultyStore::new(local));
    let replica = Replica::new(Arc::clone(&faulty) as _, Path::from(""), Layout::File);
    let expected = std::fs::read(data.join("final_state.db")).expect("final_state.db");

    faulty.fail_next(3);
    let mut map = PageMap::open(&replica, RestoreTarget::Latest)
        .await
        .expect("open despite failures");
    // These small files were read whole at open; every page read below goes to the store.
    map.forget_heads();
    faulty.fail_next(2);
    let mut image = Vec::new();
    for pgno in 1..=map.commit {
        image.extend(
            map.read_page(&replica, pgno)
                .await
                .expect("page despite failures"),
        );
    }
    assert_eq!(image, expected);

    faulty.fail_next(1000);
    let err = map
        .read_page(&replica, 1)
        .await
        .expect_err("the store is down");
    assert!(err.to_string().contains("injected failure"), "{err}");

    faulty.fail_next(0);
    assert_eq!(
        map.read_page(&replica, 1).await.expect("recovered"),
        expected[..4096].to_vec()
    );
}

#[test]
fn the_shared_page_cache_saves_repeat_fetches_and_stays_bounded() {
    use blockmap::vfs::remote::RemoteSource;
    use blockmap::vfs::state::PageSource;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let data = testdata();
    let local = Arc::new(LocalFileSystem::new_with_prefix(data.join("replica")).expect("store"));
    let faulty = Arc::new(FaultyStore::new(local));
    let replica = Arc::new(Replica::new(
        Arc::clone(&faulty) as _,
        Path::from(""),
        Layout::File,
    ));
    let source = rt
        .block_on(RemoteSource::open(
            replica,
            RestoreTarget::Latest,
            rt.handle().clone(),
        ))
        .expect("open")
        .without_open_heads()
        .with_cache_pages(0) // forget the pages fetched at open
        .with_cache_pages(2);
    let before = faulty.requests();
    let first = source.read_page(1).expect("page");
    assert_eq!(faulty.requests(), before + 1);
    assert_eq!(source.read_page(1).expect("cached"), first);
    assert_eq!(faulty.requests(), before + 1, "served from the cache");
    source.read_page(2).expect("page");
    source.read_page(3).expect("page"); // evicts page 1
    source.read_page(1).expect("page");
    assert_eq!(
        faulty.requests(),
        before + 4,
        "page 1 was evicted and fetched again"
    );
}
