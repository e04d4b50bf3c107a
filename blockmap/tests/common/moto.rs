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
    for _attempt in 0..3 {
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
        let mut moto = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let why = match request(port, "GET / HTTP/1.1") {
                Ok(reply) if reply.starts_with("HTTP/1.1 ") => return moto,
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
    assert!(reply.starts_with("HTTP/1.1 200"), "create bucket: {reply}");
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
