//! A real S3-protocol server for the S3-backed subjects: moto (`pip install 'moto[server]'`)
//! on a free loopback port, stopped when dropped.
//!
//! Moto keeps objects in memory and does not check signatures, so any access key works. Every
//! subject reaches it through the [`crate::latency_proxy`], never directly.

use crate::process::{ServerProcess, free_loopback_port};
use anyhow::{Context, Result, bail, ensure};
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The credentials every S3 client in the benchmark uses (moto accepts anything).
pub const ACCESS_KEY: &str = "bench";
pub const SECRET_KEY: &str = "bench";
pub const REGION: &str = "us-east-1";

/// How long moto may take to start (it imports a lot of Python).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// An S3 client of `bucket` at `endpoint` (moto itself, or the proxy in front of it).
pub fn client(endpoint: &str, bucket: &str) -> Result<std::sync::Arc<dyn ObjectStore>> {
    let store = AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_bucket_name(bucket)
        .with_access_key_id(ACCESS_KEY)
        .with_secret_access_key(SECRET_KEY)
        .with_region(REGION)
        .with_allow_http(true)
        .build()
        .with_context(|| format!("an S3 client of {bucket} at {endpoint}"))?;
    Ok(std::sync::Arc::new(store))
}

pub struct Moto {
    server: ServerProcess,
    pub addr: SocketAddr,
}

impl Moto {
    pub fn start(log: &Path) -> Result<Moto> {
        Moto::start_spooling_to(log, None)
    }

    /// As [`Moto::start`], with moto's temporary files in `spool`: moto keeps objects over
    /// 5 MiB in (unlinked) temporary files rather than in memory, so a run that stores
    /// gigabytes fills TMPDIR's filesystem, and its free-space check must look there.
    pub fn start_spooling_to(log: &Path, spool: Option<&Path>) -> Result<Moto> {
        let port = free_loopback_port()?;
        let mut cmd = Command::new("moto_server");
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        if let Some(dir) = spool {
            cmd.env("TMPDIR", dir);
        }
        let mut server = ServerProcess::spawn("moto_server", cmd, log)
            .context("starting moto_server (pip install 'moto[server]')")?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect(addr).is_err() {
            server.ensure_running()?;
            if Instant::now() >= deadline {
                bail!("moto_server did not listen on {addr} within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Moto { server, addr })
    }

    /// Creates `bucket` with a plain HTTP PUT (path style, as moto serves it).
    pub fn create_bucket(&self, bucket: &str) -> Result<()> {
        let mut s = TcpStream::connect(self.addr).context("connecting to moto")?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "PUT /{bucket} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.addr
        )
        .context("sending CreateBucket")?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)
            .context("reading CreateBucket's reply")?;
        ensure!(
            reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200"),
            "moto refused bucket {bucket}: {}",
            reply.lines().next().unwrap_or_default()
        );
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Fails if moto has died.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.server.ensure_running()
    }
}

/// moto's version, for a report's tools table.
pub fn version_line() -> String {
    crate::machine::version_line(
        "python3",
        &["-c", "import moto; print('moto', moto.__version__)"],
    )
}
