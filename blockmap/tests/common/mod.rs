//! Shared helpers: a real S3-protocol server (moto) on a free loopback port.
#![allow(dead_code)]

mod moto;
#[allow(unused_imports)] // each test binary uses a different subset
pub use moto::{Moto, create_bucket, start_moto, start_moto_serial};

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use std::process::Command;
use std::sync::Arc;

pub fn s3(port: u16, bucket: &str) -> Arc<dyn ObjectStore> {
    Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(format!("http://127.0.0.1:{port}"))
            .with_allow_http(true)
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .build()
            .expect("S3 store"),
    )
}

/// `testdata/ltx` in the workspace: real files written by Litestream 0.5.17 (made by
/// scripts/gen-ltx-fixtures.py; see its MANIFEST.md).
pub fn testdata() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/ltx");
    assert!(
        dir.join("MANIFEST.md").is_file(),
        "LTX test vectors not found at {}: run scripts/gen-ltx-fixtures.py",
        dir.display()
    );
    dir
}

/// A two-worker runtime for tests that call async code from synchronous SQLite callbacks.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs the real `litestream restore` of a file-layout replica into `out`; panics on failure.
pub fn litestream_restore(replica_dir: &std::path::Path, out: &std::path::Path) {
    let result = Command::new("litestream")
        .arg("restore")
        .arg("-o")
        .arg(out)
        .arg(format!("file://{}", replica_dir.display()))
        .output()
        .expect("litestream is not installed: run scripts/install-deps.sh");
    assert!(
        result.status.success(),
        "litestream restore failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
}
