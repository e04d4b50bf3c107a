//! Per-client limits: a client (here every loopback connection) holding
//! `--max-client-connections` gets its next connection closed at once, with a log line, and a
//! place that comes free is taken again; a client's requests share one memory budget
//! (`--client-memory`), which the engine's unit tests cover.

mod common;
use common::{Server, ServerOptions, bucketdisk_bin, run_output};
use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A connection that got the server's greeting (`true`) or was closed without one.
fn greeted(port: u16) -> (TcpStream, bool) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut greeting = [0u8; 18];
    let ok = s.read_exact(&mut greeting).is_ok();
    (s, ok)
}

#[test]
fn a_client_over_its_connection_limit_is_closed_and_others_go_on() {
    let server = Server::start_with(ServerOptions {
        extra_args: vec!["--max-client-connections".into(), "2".into()],
        ..ServerOptions::default()
    });
    let common::Endpoint::Tcp(port) = server.endpoint else {
        unreachable!("TCP")
    };
    // The harness's readiness probe was a connection too: wait until the server let it go.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (first, _second) = loop {
        let (first, ok1) = greeted(port);
        let (second, ok2) = greeted(port);
        if ok1 && ok2 {
            break (first, second);
        }
        assert!(
            Instant::now() < deadline,
            "two connections are never allowed"
        );
        drop((first, second));
        std::thread::sleep(Duration::from_millis(50));
    };
    let (_third, ok3) = greeted(port);
    assert!(!ok3, "the third is closed without a greeting");
    assert!(
        server
            .log_text()
            .contains("refusing a connection: 127.0.0.1 holds 2 already")
    );

    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_s, ok) = greeted(port);
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the freed place is never taken again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn client_memory_below_the_largest_request_is_refused() {
    let out = run_output(std::process::Command::new(bucketdisk_bin()).args([
        "serve",
        "--client-memory",
        "1M",
    ]));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("largest request"), "{stderr}");
}
