//! Shared helpers: a real S3-protocol server (moto) on a free loopback port.
#![allow(dead_code)]

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_moto() -> Moto {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server is not installed: run scripts/install-deps.sh");
    let moto = Moto { child, port };
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    moto
}

/// Creates a bucket with a plain HTTP PUT (moto does not check signatures).
pub fn create_bucket(port: u16, bucket: &str) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        s,
        "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("reply");
    assert!(reply.starts_with("HTTP/1.1 200"), "create bucket: {reply}");
}

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

/// `shared/testdata/ltx` beside the checkout: real files written by Litestream 0.5.17.
pub fn testdata() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/ltx");
    assert!(
        dir.join("MANIFEST.md").is_file(),
        "LTX test vectors not found at {}",
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
