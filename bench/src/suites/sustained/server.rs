//! `bucketdisk serve` for this suite: on S3 (moto behind the latency proxy) or on a local
//! directory, always with `--metrics`, its log kept for the report; plus the small things the
//! parts share around it (the volume's `info`, free disk and memory, stopping moto).

use crate::moto;
use crate::process::{ServerProcess, free_loopback_port};
use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

/// The volume every server exports (also the default export "").
pub const VOLUME: &str = "disk";
/// The bucket of the S3 parts, and the prefix the volumes live under in it.
pub const BUCKET: &str = "sustained";
const S3_URL: &str = "s3://sustained/vols";
/// How long a server may take to answer NBD.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a server keeps its volume.
#[derive(Debug, Clone)]
pub enum Store {
    /// moto, reached through the latency proxy at `endpoint` (`http://127.0.0.1:PORT`).
    S3 { endpoint: String },
    /// A local directory (the embedded local-directory store).
    Dir(PathBuf),
}

impl Store {
    /// The `--store` argument.
    pub fn url(&self) -> String {
        match self {
            Store::S3 { .. } => S3_URL.to_string(),
            Store::Dir(dir) => format!("file://{}", dir.display()),
        }
    }

    /// Adds the AWS_* environment the S3 store is configured by (what the other S3 suites
    /// give bucketdisk; moto takes any credentials).
    fn configure(&self, cmd: &mut Command) {
        if let Store::S3 { endpoint } = self {
            cmd.env("AWS_ENDPOINT_URL", endpoint)
                .env("AWS_ALLOW_HTTP", "true")
                .env("AWS_ACCESS_KEY_ID", moto::ACCESS_KEY)
                .env("AWS_SECRET_ACCESS_KEY", moto::SECRET_KEY)
                .env("AWS_REGION", moto::REGION);
        }
    }
}

/// How to start one server.
pub struct ServeSpec<'a> {
    pub bin: &'a Path,
    pub store: &'a Store,
    pub cache: &'a Path,
    /// `--size` of the volume created on first start.
    pub size: u64,
    /// More `serve` flags (e.g. `--no-gc`).
    pub extra: &'a [&'a str],
    pub log: &'a Path,
}

/// A running `bucketdisk serve`.
pub struct Server {
    process: ServerProcess,
    pub nbd: SocketAddr,
    pub metrics: SocketAddr,
    pub command_line: String,
    pub spawned: Instant,
}

impl Server {
    /// Starts the server without waiting for it (for clocks that start at process start).
    pub fn spawn(spec: &ServeSpec<'_>) -> Result<Server> {
        if let Some(parent) = spec.log.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let nbd = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()?));
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()?));
        let mut cmd = Command::new(spec.bin);
        cmd.arg("serve")
            .arg("--store")
            .arg(spec.store.url())
            .arg("--cache-dir")
            .arg(spec.cache)
            .arg("--listen")
            .arg(nbd.to_string())
            .arg("--metrics")
            .arg(metrics.to_string())
            .args(["--volume", VOLUME])
            .arg("--size")
            .arg(spec.size.to_string())
            .args(spec.extra)
            .env("BUCKETDISK_LOG", "info");
        spec.store.configure(&mut cmd);
        let command_line = describe(&cmd);
        let spawned = Instant::now();
        let process = ServerProcess::spawn("bucketdisk", cmd, spec.log)?;
        Ok(Server {
            process,
            nbd,
            metrics,
            command_line,
            spawned,
        })
    }

    /// Starts the server and waits until it answers NBD.
    pub fn start(spec: &ServeSpec<'_>) -> Result<Server> {
        let mut server = Server::spawn(spec)?;
        let nbd = server.nbd;
        server
            .process
            .wait_until_serving(nbd, START_TIMEOUT)
            .with_context(|| format!("starting {}", server.command_line))?;
        Ok(server)
    }

    pub fn uri(&self) -> String {
        format!("nbd://{}/", self.nbd)
    }

    /// Fails if the server has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.process.ensure_running()
    }

    /// SIGTERM (a clean stop uploads everything journaled), waiting up to `grace`; returns how
    /// long the stop took and the exit status.
    pub fn stop(self, grace: Duration) -> Result<Stopped> {
        let t = Instant::now();
        let status = self.process.stop_within(grace)?;
        Ok(Stopped {
            secs: t.elapsed().as_secs_f64(),
            clean: status.success(),
            status: describe_status(status),
        })
    }
}

/// How a server's clean stop went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stopped {
    pub secs: f64,
    pub clean: bool,
    pub status: String,
}

fn describe_status(status: ExitStatus) -> String {
    status.to_string()
}

fn describe(cmd: &Command) -> String {
    let env: Vec<String> = cmd
        .get_envs()
        .filter(|(k, _)| *k != "BUCKETDISK_LOG")
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy())))
        .collect();
    env.into_iter()
        .chain(std::iter::once(
            cmd.get_program().to_string_lossy().into_owned(),
        ))
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the server logged at WARN and ERROR: counts and the first few distinct messages.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LogProblems {
    pub log: String,
    pub warnings: usize,
    pub errors: usize,
    /// Up to [`KEPT_LINES`] distinct messages (timestamps cut), first seen first.
    pub first: Vec<String>,
}

const KEPT_LINES: usize = 8;

impl LogProblems {
    /// Reads a tracing log ("<timestamp>  WARN target: message").
    pub fn scan(log: &Path) -> LogProblems {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let mut out = LogProblems {
            log: log.display().to_string(),
            ..LogProblems::default()
        };
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let (first, level) = (words.next(), words.next());
            // The last line of a failed run is "bucketdisk: <error chain>", untimestamped.
            match (first, level) {
                (Some("bucketdisk:"), _) | (_, Some("ERROR")) => out.errors += 1,
                (_, Some("WARN")) => out.warnings += 1,
                _ => continue,
            }
            // Timestamps differ on every line; without them repeats collapse.
            let message: String = match first {
                Some("bucketdisk:") => line,
                _ => line
                    .split_once(char::is_whitespace)
                    .map_or(line, |(_, rest)| rest),
            }
            .trim()
            .chars()
            .take(300)
            .collect();
            if out.first.len() < KEPT_LINES && !out.first.contains(&message) {
                out.first.push(message);
            }
        }
        out
    }

    pub fn is_clean(&self) -> bool {
        self.warnings == 0 && self.errors == 0
    }
}

/// `bucketdisk info VOLUME --store … --json` (opens the volume read-only).
pub fn info(bin: &Path, store: &Store, scratch: &Path) -> Result<serde_json::Value> {
    let mut cmd = Command::new(bin);
    cmd.args(["info", VOLUME, "--json", "--store"])
        .arg(store.url())
        // Its journal report reads this directory; an empty one keeps it off the cwd.
        .arg("--cache-dir")
        .arg(scratch)
        .env("BUCKETDISK_LOG", "warn");
    store.configure(&mut cmd);
    let out = cmd
        .output()
        .with_context(|| format!("running {}", describe(&cmd)))?;
    ensure!(
        out.status.success(),
        "bucketdisk info failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("bucketdisk info printed {text:?}"))
}

/// `MemAvailable` from /proc/meminfo, in bytes.
pub fn available_memory() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .context("no MemAvailable in /proc/meminfo")
}

/// Total size of the files under `dir` (their lengths), recursively: the local store's usage.
pub fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// A process and every process below it (moto may run its server in a child).
fn process_tree(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            // Field 4 (ppid) follows the command name, which may contain spaces.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

/// Sends `signal` to `root` and its descendants.
fn signal_tree(root: u32, signal: libc::c_int) -> Result<()> {
    for pid in process_tree(root) {
        let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
        // SAFETY: kill(2); moto and its children are our own (the root is our child, alive).
        if unsafe { libc::kill(pid, signal) } != 0 {
            bail!("kill({pid}, {signal}): {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The store stalled: moto stopped with SIGSTOP until [`Stall::resume`] or drop (so an error
/// path never leaves moto frozen).
pub struct Stall {
    pid: Option<u32>,
}

impl Stall {
    pub fn begin(moto_pid: u32) -> Result<Stall> {
        signal_tree(moto_pid, libc::SIGSTOP).context("stopping moto (SIGSTOP)")?;
        Ok(Stall {
            pid: Some(moto_pid),
        })
    }

    pub fn resume(mut self) -> Result<()> {
        match self.pid.take() {
            Some(pid) => signal_tree(pid, libc::SIGCONT).context("resuming moto (SIGCONT)"),
            None => Ok(()),
        }
    }
}

impl Drop for Stall {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = signal_tree(pid, libc::SIGCONT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_warnings_and_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("serve.log");
        std::fs::write(
            &log,
            "2026-01-01T00:00:00.1Z  INFO nbd_server: serving\n\
             2026-01-01T00:00:01.1Z  WARN engine: upload failed, retrying\n\
             2026-01-01T00:00:02.1Z  WARN engine: upload failed, retrying\n\
             2026-01-01T00:00:03.1Z ERROR nbd_server: write failed: EIO\n",
        )
        .expect("write log");
        let p = LogProblems::scan(&log);
        assert_eq!((p.warnings, p.errors), (2, 1));
        assert_eq!(
            p.first,
            vec![
                "WARN engine: upload failed, retrying",
                "ERROR nbd_server: write failed: EIO"
            ]
        );
    }

    #[test]
    fn finds_this_process_in_its_tree() {
        let me = std::process::id();
        assert_eq!(process_tree(me).first(), Some(&me));
    }

    #[test]
    fn sums_a_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
        std::fs::write(dir.path().join("a/x"), [0u8; 10]).expect("write");
        std::fs::write(dir.path().join("a/b/y"), [0u8; 5]).expect("write");
        assert_eq!(tree_bytes(dir.path()), 15);
    }
}
