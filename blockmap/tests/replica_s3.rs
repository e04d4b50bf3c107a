//! The replica over the S3 protocol, against a real S3 server (moto, started here): Litestream's
//! replica copied in with the S3 layout reads back page for page, and concurrent create-only
//! publishes of one TXID always leave exactly one winner.

use blockmap::replica::{Layout, PageMap, Replica, ReplicaError};
use ltx::RestoreTarget;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Moto {
    child: Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_moto() -> Moto {
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
fn create_bucket(port: u16, bucket: &str) {
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

fn s3(port: u16, bucket: &str) -> Arc<dyn ObjectStore> {
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

fn testdata() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/ltx")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_over_s3() {
    let moto = start_moto();
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
