//! A real S3-protocol server (moto) on a free loopback port, for every crate's tests (std only,
//! so test harnesses without object_store can include it with `#[path]`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `moto_server`, stopped on drop.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    /// The moto process, for tests that pause the store (SIGSTOP) to stall it.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts moto and returns once it answers HTTP (it accepts connections a moment before it
/// answers them). Retried on a new port if moto exits: another process may take the port
/// between choosing it and moto's bind.
pub fn start_moto() -> Moto {
    start(|port| {
        let mut cmd = Command::new("moto_server");
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        cmd
    })
}

/// Moto answering one request at a time. moto_server serves requests on threads and checks a
/// conditional PUT's precondition apart from the write, so two create-only PUTs of one key
/// sent at the same instant can both succeed there; S3 decides them atomically. Tests of what
/// a race between writers does need that atomicity, and get it here.
#[allow(dead_code)] // not every test binary that includes this module races writers
pub fn start_moto_serial() -> Moto {
    const SERVE_SERIALLY: &str = "import sys\n\
from werkzeug.serving import run_simple\n\
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app\n\
run_simple('127.0.0.1', int(sys.argv[1]), DomainDispatcherApplication(create_backend_app), threaded=False)\n";
    start(|port| {
        let mut cmd = Command::new("python3");
        cmd.args(["-c", SERVE_SERIALLY, &port.to_string()]);
        cmd
    })
}

fn start(command: impl Fn(u16) -> Command) -> Moto {
    for _attempt in 0..3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = command(port)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server is not installed: run scripts/install-deps.sh");
        let mut moto = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let why = match request(port, "GET / HTTP/1.1") {
                // A serial server speaks HTTP/1.0 (werkzeug keeps HTTP/1.1 for threaded ones).
                Ok(reply) if reply.starts_with("HTTP/1.") => return moto,
                Ok(reply) => format!("unexpected reply: {reply}"),
                Err(e) => e,
            };
            if moto.child.try_wait().ok().flatten().is_some() {
                break; // the port was taken: try another
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not start: {why}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    panic!("moto_server exited three times at start");
}

/// Creates a bucket with a plain HTTP PUT (moto does not check signatures).
pub fn create_bucket(port: u16, bucket: &str) {
    let reply = request(port, &format!("PUT /{bucket} HTTP/1.1")).expect("create bucket");
    let status = reply.split(' ').nth(1);
    assert_eq!(status, Some("200"), "create bucket: {reply}");
}

/// One HTTP/1.1 request without a body; the whole reply.
fn request(port: u16, request_line: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    write!(
        s,
        "{request_line}\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .map_err(|e| format!("reply: {e}"))?;
    Ok(reply)
}
