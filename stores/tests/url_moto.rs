//! `open_store("s3://bucket/prefix")` against a real S3-protocol server (moto), configured only
//! through the AWS_* environment as `bucketdisk --store s3://…` is: objects land under the prefix.
//!
//! This file holds a single test because it sets process-wide environment variables.

use bytes::Bytes;
use object_store::ObjectStoreExt;
use object_store::path::Path;
use stores::url::open_store;

#[path = "../../blockmap/tests/common/mod.rs"]
mod s3_server;

/// Whether `moto_server` can be started at all; the test is skipped (loudly) if not.
fn moto_installed() -> bool {
    std::process::Command::new("moto_server")
        .arg("--help")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn store_url_s3_from_environment_reaches_moto_under_the_prefix() {
    if !moto_installed() {
        println!("SKIPPED: moto_server is not installed (run scripts/install-deps.sh)");
        return;
    }
    let moto = s3_server::start_moto();
    s3_server::create_bucket(moto.port, "bucket");
    // SAFETY: this test binary has one test and sets the environment before any other thread
    // (the runtime below) exists.
    unsafe {
        std::env::set_var(
            "AWS_ENDPOINT_URL",
            format!("http://127.0.0.1:{}", moto.port),
        );
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        std::env::set_var("AWS_ALLOW_HTTP", "true");
        std::env::remove_var("AWS_REGION");
        std::env::remove_var("AWS_DEFAULT_REGION");
        std::env::remove_var("AWS_ENDPOINT");
    }

    let location = open_store("s3://bucket/some/prefix").expect("open s3 store");
    assert_eq!(location.prefix, Path::from("some/prefix"));
    let key = location.prefix.clone().join("hello");

    let runtime = s3_server::runtime();
    runtime.block_on(async {
        let store = &location.store;
        store
            .put(&key, Bytes::from_static(b"world").into())
            .await
            .expect("put");
        let got = store.get(&key).await.expect("get");
        assert_eq!(got.bytes().await.expect("body").as_ref(), b"world");
        // Seen from a store opened on the bare bucket, the object is under the prefix.
        let bare = s3_server::s3(moto.port, "bucket");
        let meta = bare
            .head(&Path::from("some/prefix/hello"))
            .await
            .expect("object under the prefix");
        assert_eq!(meta.size, 5);
    });
}
