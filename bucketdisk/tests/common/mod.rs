//! Shared harness for the integration tests: runs the real `bucketdisk` binary and real clients.
//!
//! Tests that need an external tool call [`require_tool`], which fails loudly when the tool is
//! missing: `scripts/install-deps.sh` installs them all, and a silently skipped test proves nothing.
#![allow(dead_code)] // each test binary uses a different subset of these helpers

#[path = "../../../blockmap/tests/common/moto.rs"]
mod moto;
pub mod nbd_client;
pub mod pki;
pub use moto::{Moto, create_bucket, start_moto};

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const GIB: u64 = 1 << 30;
pub const MIB: u64 = 1 << 20;

/// Path of the binary under test (built by cargo for integration tests).
pub fn bucketdisk_bin() -> &'static str {
    env!("CARGO_BIN_EXE_bucketdisk")
}

/// Panics with an install hint when a client tool is not on PATH.
pub fn require_tool(tool: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| panic!("{tool} is not installed: run scripts/install-deps.sh"))
}

/// A free TCP port on loopback, for peers that cannot report the port they bound. The port is
/// released before the peer binds it, so prefer letting a server choose (port 0) where it can.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// Where a server listens.
#[derive(Clone, Debug)]
pub enum Endpoint {
    Tcp(u16),
    Unix(PathBuf),
}

/// A running `bucketdisk serve` with its own store directory. Stopped (SIGTERM, then SIGKILL)
/// on drop; its log is printed if the test panicked, to explain the failure.
pub struct Server {
    pub child: Option<Child>,
    pub endpoint: Endpoint,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
    pub extra_args: Vec<String>,
    /// With `BUCKETDISK_TEST_STORE=s3`, the S3 server (moto) holding this server's volumes.
    pub s3: Option<Moto>,
}

/// Starts moto (see [`start_moto`]) with the "volumes" bucket the servers use.
fn start_moto_with_volumes() -> Moto {
    require_tool("moto_server");
    let moto = start_moto();
    create_bucket(moto.port, "volumes");
    moto
}

/// `BUCKETDISK_TEST_STORE=s3` runs servers on moto instead of a local directory store.
pub fn testing_on_s3() -> bool {
    std::env::var("BUCKETDISK_TEST_STORE").is_ok_and(|v| v == "s3")
}

pub struct ServerOptions {
    pub unix_socket: bool,
    pub size: &'static str,
    pub volumes: Vec<&'static str>,
    pub read_only: bool,
    pub extra_args: Vec<String>,
    /// On moto whatever `BUCKETDISK_TEST_STORE` says (tests of S3 behaviour).
    pub on_s3: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            unix_socket: false,
            size: "1G",
            volumes: vec![],
            read_only: false,
            extra_args: vec![],
            on_s3: false,
        }
    }
}

impl Server {
    /// Starts a server on a fresh store with a 1 GiB default volume, over TCP.
    pub fn start() -> Self {
        Self::start_with(ServerOptions::default())
    }

    pub fn start_with(options: ServerOptions) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let endpoint = if options.unix_socket {
            Endpoint::Unix(dir.path().join("nbd.sock"))
        } else {
            // Port 0: the server picks a free port and logs it, so tests never race for ports.
            Endpoint::Tcp(0)
        };
        let mut args: Vec<String> = vec!["--size".into(), options.size.into()];
        for v in &options.volumes {
            args.push("--volume".into());
            args.push((*v).into());
        }
        if options.read_only {
            args.push("--read-only".into());
        }
        args.extend(options.extra_args);
        let mut server = Server {
            child: None,
            endpoint,
            log: dir.path().join("server.log"),
            dir,
            extra_args: args,
            s3: (options.on_s3 || testing_on_s3()).then(start_moto_with_volumes),
        };
        server.spawn();
        server
    }

    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The server's local directory (journal, cache); deleting it simulates a lost host disk.
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// `bucketdisk <subcommand> --store <this server's store>`, with the S3 environment when
    /// the store is moto.
    pub fn cli(&self, subcommand: &str) -> Command {
        let mut cmd = Command::new(bucketdisk_bin());
        // "checkpoint create": the store options belong to the innermost subcommand.
        cmd.args(subcommand.split_whitespace());
        match &self.s3 {
            Some(moto) => {
                cmd.arg("--store")
                    .arg("s3://volumes/test")
                    .env(
                        "AWS_ENDPOINT_URL",
                        format!("http://127.0.0.1:{}", moto.port),
                    )
                    .env("AWS_ALLOW_HTTP", "true")
                    .env("AWS_ACCESS_KEY_ID", "test")
                    .env("AWS_SECRET_ACCESS_KEY", "test")
                    .env("AWS_REGION", "us-east-1");
            }
            None => {
                cmd.arg("--store")
                    .arg(format!("file://{}", self.store_dir().display()));
            }
        }
        cmd
    }

    /// The volumes the next [`Server::spawn`] serves, instead of those it was started with.
    pub fn set_volumes(&mut self, volumes: &[&str]) {
        let mut args = Vec::new();
        let mut old = self.extra_args.iter();
        while let Some(arg) = old.next() {
            if arg == "--volume" {
                old.next();
            } else {
                args.push(arg.clone());
            }
        }
        for v in volumes {
            args.push("--volume".into());
            args.push((*v).into());
        }
        self.extra_args = args;
    }

    /// (Re)starts the process on the same store and endpoint.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let mut cmd = self.cli("serve");
        cmd.arg("--cache-dir").arg(self.cache_dir());
        match &self.endpoint {
            Endpoint::Tcp(port) => cmd.arg("--listen").arg(format!("127.0.0.1:{port}")),
            Endpoint::Unix(path) => cmd.arg("--socket").arg(path),
        };
        cmd.args(&self.extra_args);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open server log");
        cmd.env("BUCKETDISK_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log);
        let log_start = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        self.child = Some(cmd.spawn().expect("spawn bucketdisk"));
        self.wait_ready(log_start as usize);
    }

    /// The port this run of the server announced in its log (after byte `log_start`).
    fn announced_port(&self, log_start: usize) -> Option<u16> {
        let text = self.log_text();
        let line = text
            .get(log_start..)?
            .lines()
            .find(|l| l.contains("serving NBD on "))?;
        let address = line.split("serving NBD on ").nth(1)?.trim();
        address.rsplit(':').next()?.parse().ok()
    }

    fn wait_ready(&mut self, log_start: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Endpoint::Tcp(0) = self.endpoint {
                if let Some(port) = self.announced_port(log_start) {
                    // Restarts reuse the port, so URIs taken before a restart stay valid.
                    self.endpoint = Endpoint::Tcp(port);
                }
            }
            let up = match &self.endpoint {
                Endpoint::Tcp(0) => false,
                Endpoint::Tcp(port) => std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok(),
                Endpoint::Unix(path) => std::os::unix::net::UnixStream::connect(path).is_ok(),
            };
            if up {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("bucketdisk exited early ({status}):\n{}", self.log_text());
                }
            }
            assert!(
                Instant::now() < deadline,
                "bucketdisk did not start listening:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// NBD URI of the default export (or of `export`).
    pub fn uri(&self) -> String {
        self.uri_for("")
    }

    pub fn uri_for(&self, export: &str) -> String {
        match &self.endpoint {
            Endpoint::Tcp(port) => format!("nbd://127.0.0.1:{port}/{export}"),
            Endpoint::Unix(path) => format!("nbd+unix:///{export}?socket={}", path.display()),
        }
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server running");
        signal(&child, libc_sigterm());
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("bucketdisk ignored SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, no chance to flush.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// True while the process is alive (used to prove a bad client did not crash it).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- bucketdisk log ----\n{}", self.log_text());
        }
        if let Some(child) = self.child.as_ref() {
            signal(child, libc_sigterm());
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Some(c) = self.child.as_mut() {
                    if let Ok(Some(_)) = c.try_wait() {
                        self.child = None;
                        return;
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }
}

fn libc_sigterm() -> i32 {
    15
}

fn signal(child: &Child, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status();
}

/// Runs a command, panicking with its output if it fails. Returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let output = run_output(cmd);
    assert!(
        output.status.success(),
        "command failed: {cmd:?}\nstatus: {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a command and returns its output whatever the exit status.
/// A command that failed the way the tools promise: non-zero exit, one line on stderr, and
/// that line contains `expected`.
pub fn assert_fails_with(out: Output, expected: &str) {
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(expected), "{stderr}");
}

pub fn run_output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// xorshift64*: a tiny seeded generator, so failing runs reproduce. Good enough to defeat
/// dedup and compression; not for anything else.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// `len` bytes of deterministic, incompressible-looking data.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut data = vec![0u8; len];
    for chunk in data.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next().to_le_bytes()[..chunk.len()]);
    }
    data
}

/// Writes [`pattern`] data to `path`.
pub fn write_pattern_file(path: &Path, len: usize, seed: u64) {
    std::fs::write(path, pattern(len, seed)).expect("write pattern file");
}
