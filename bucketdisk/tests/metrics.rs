//! `--metrics`: a Prometheus scrape after real I/O from qemu-io shows the requests, their
//! latency histogram and the volume's own state; with `--metrics-token-file` only scrapes that
//! carry the token get them.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

/// One HTTP GET; returns the status line and the body.
fn get(port: u16, path: &str) -> (String, String) {
    get_with(port, path, "")
}

/// One HTTP GET with `headers` (each ending in CRLF).
fn get_with(port: u16, path: &str, headers: &str) -> (String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n"
    )
    .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a complete response");
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, body.to_string())
}

/// The value of the sample whose name and labels are exactly `series`.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn a_scrape_shows_requests_latency_and_volume_state() {
    require_tool("qemu-io");
    let port = free_port();
    let mut server = Server::start_with(ServerOptions {
        extra_args: vec!["--metrics".into(), format!("127.0.0.1:{port}")],
        ..Default::default()
    });
    let output = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 1M",
        "-c",
        "read -P 0xab 0 64k",
        "-c",
        "flush",
        &server.uri(),
    ]));
    assert!(!output.contains("fail"), "qemu-io: {output}");

    // The volume's gauges follow the uploader: wait for the megabyte to be stored and the
    // upload step that stored it to be complete (its map transaction is visible, and so
    // counted as allocated, a moment before the step has uploaded the map and is counted).
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let (status, body) = get(port, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        let allocated = sample(&body, "bucketdisk_allocated_bytes{export=\"disk\"}");
        let uploads = sample(&body, "bucketdisk_uploads_total{export=\"disk\"}");
        if allocated == Some(1048576.0) && uploads.is_some_and(|u| u >= 1.0) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the megabyte never showed up as allocated and uploaded: {allocated:?}, \
             {uploads:?} uploads\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let series = |name: &str, command: &str| {
        sample(
            &body,
            &format!("{name}{{export=\"disk\",command=\"{command}\"}}"),
        )
        .unwrap_or_else(|| panic!("no {name} for {command} in\n{body}"))
    };
    assert!(series("bucketdisk_requests_total", "write") >= 1.0);
    assert!(series("bucketdisk_requests_total", "flush") >= 1.0);
    assert_eq!(series("bucketdisk_request_bytes_total", "write"), 1048576.0);
    assert!(series("bucketdisk_request_bytes_total", "read") >= 65536.0);
    assert_eq!(series("bucketdisk_request_errors_total", "write"), 0.0);
    let writes = series("bucketdisk_requests_total", "write");
    assert_eq!(
        series("bucketdisk_request_duration_seconds_count", "write"),
        writes,
        "every write is in the histogram"
    );
    let inf = sample(
        &body,
        "bucketdisk_request_duration_seconds_bucket{export=\"disk\",command=\"write\",le=\"+Inf\"}",
    );
    assert_eq!(inf, Some(writes));
    assert!(body.contains("# TYPE bucketdisk_request_duration_seconds histogram"));
    assert_eq!(
        sample(&body, "bucketdisk_volume_size_bytes{export=\"disk\"}"),
        Some(1073741824.0)
    );
    assert!(
        sample(
            &body,
            "bucketdisk_store_put_requests_total{export=\"disk\"}"
        )
        .is_some_and(|puts| puts >= 2.0),
        "a chunk and the map were uploaded: {body}"
    );
    let stored = sample(&body, "bucketdisk_stored_bytes{export=\"disk\"}").unwrap_or(0.0);
    assert!(stored > 0.0, "the pattern compresses, but not to nothing");
    assert!(
        sample(
            &body,
            "bucketdisk_store_written_bytes_total{export=\"disk\"}"
        )
        .is_some_and(|bytes| bytes > stored),
        "the chunk and the map went out: {body}"
    );
    assert!(body.contains("bucketdisk_cache_hits_total{export=\"disk\"}"));

    let (status, _) = get(port, "/");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    assert!(server.stop().success());
}

#[test]
fn a_token_file_keeps_scrapes_without_the_token_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("metrics.token");
    let token = "Zq8-metrics-token-7Rr";
    std::fs::write(&token_file, format!("{token}\n")).expect("token");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let port = free_port();
    let server = Server::start_with(ServerOptions {
        extra_args: vec![
            "--metrics".into(),
            port.to_string(),
            "--metrics-token-file".into(),
            token_file.display().to_string(),
        ],
        ..Default::default()
    });
    let (status, body) = get(port, "/metrics");
    assert_eq!(status, "HTTP/1.1 401 Unauthorized", "{body}");
    assert!(!body.contains("bucketdisk_"), "{body}");
    let (status, _) = get_with(port, "/metrics", "Authorization: Bearer wrong\r\n");
    assert_eq!(status, "HTTP/1.1 401 Unauthorized");
    let (status, body) = get_with(
        port,
        "/metrics",
        &format!("Authorization: Bearer {token}\r\n"),
    );
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("bucketdisk_"), "{body}");
    let log = server.log_text();
    assert!(log.contains("bearer token required"), "{log}");
    assert!(!log.contains(token), "the token is never logged:\n{log}");

    // A token file others can read is refused at start.
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = run_output(
        Command::new(bucketdisk_bin())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics",
                "0",
                "--metrics-token-file",
            ])
            .arg(&token_file)
            .arg("--store")
            .arg(dir.path().join("store")),
    );
    assert_fails_with(out, "chmod 600");
}
