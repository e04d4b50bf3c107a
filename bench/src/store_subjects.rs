//! The subjects of the `quick`/`full` comparison: bucketdisk on a local-directory store and on
//! S3 (moto behind the latency proxy), the local limit (qemu-nbd and `nbdkit file` on a raw
//! file), and two S3-backed peers (s3backer's FUSE file exported with `nbdkit file`, and
//! nbdkit's S3 plugin). Each is started on a free loopback port and stopped by its guard.
//!
//! Every S3-backed subject uses 64 KiB objects/blocks (bucketdisk's default block size) and a
//! 100 GiB disk, and talks to the store only through the proxy, so all see the same latency.

use crate::latency_proxy::LatencyProxy;
use crate::moto;
use crate::process::{Memory, RssSampler, ServerProcess, free_loopback_port};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer NBD (nbdkit's S3 plugin imports boto3 first).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// A clean stop uploads what is journaled or dirty; at 50 ms per request that takes a while.
const STOP_GRACE: Duration = Duration::from_secs(600);

pub const DISK_SIZE: &str = "100G";
pub const DISK_BYTES: u64 = 100 << 30;
const BLOCK: &str = "64K";
/// The bucket every S3-backed subject stores its disk in, each under its own prefix.
pub const BUCKET: &str = "bench";
const VOLUME: &str = "disk";
/// Where bucketdisk-s3's block map replica (Litestream's layout) lives in [`BUCKET`].
pub const BUCKETDISK_MAP_REPLICA: &str = "bucketdisk/disk/blockmap";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// `qemu-nbd` on the raw file: the local limit.
    QemuNbd,
    /// `nbdkit file` on the raw file: the local limit.
    NbdkitFile,
    /// bucketdisk, object engine, local-directory store, warm cache.
    BucketdiskLocal,
    /// bucketdisk's local-file engine (one sparse file per volume): not in [`ALL`], the
    /// `writes` suite holds the object engine against it.
    BucketdiskFile,
    /// bucketdisk on S3, a fresh `--cache-dir` for every workload.
    BucketdiskS3Cold,
    /// bucketdisk on S3, its cache warmed by a read pass first.
    BucketdiskS3Warm,
    /// s3backer (FUSE, 64 KiB blocks) and `nbdkit file` on its file.
    S3backer,
    /// `nbdkit S3` (Python, boto3) with 64 KiB objects behind nbdkit's blocksize filter.
    NbdkitS3,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::QemuNbd => "qemu-nbd",
            Kind::NbdkitFile => "nbdkit-file",
            Kind::BucketdiskLocal => "bucketdisk-local",
            Kind::BucketdiskFile => "bucketdisk-file",
            Kind::BucketdiskS3Cold => "bucketdisk-s3-cold",
            Kind::BucketdiskS3Warm => "bucketdisk-s3-warm",
            Kind::S3backer => "s3backer",
            Kind::NbdkitS3 => "nbdkit-s3",
        }
    }

    /// Talks to the object store, so it runs at every latency setting.
    pub fn uses_s3(self) -> bool {
        matches!(
            self,
            Kind::BucketdiskS3Cold | Kind::BucketdiskS3Warm | Kind::S3backer | Kind::NbdkitS3
        )
    }

    pub fn is_local_limit(self) -> bool {
        matches!(self, Kind::QemuNbd | Kind::NbdkitFile)
    }

    pub fn is_s3_peer(self) -> bool {
        matches!(self, Kind::S3backer | Kind::NbdkitS3)
    }
}

pub const ALL: [Kind; 7] = [
    Kind::QemuNbd,
    Kind::NbdkitFile,
    Kind::BucketdiskLocal,
    Kind::BucketdiskS3Cold,
    Kind::BucketdiskS3Warm,
    Kind::S3backer,
    Kind::NbdkitS3,
];

/// What subjects need to start: binaries, directories, the proxy's endpoint.
pub struct Env {
    pub bucketdisk: PathBuf,
    /// Scratch directory: raw file, local store, caches, mount points, logs.
    pub work: PathBuf,
    /// `http://127.0.0.1:PORT` of the latency proxy in front of moto.
    pub s3_endpoint: String,
}

impl Env {
    /// Moto in `work` with the subjects' bucket, the latency proxy in front of it (no delay
    /// yet), and the environment that points the subjects at the proxy.
    pub fn on_moto(bucketdisk: PathBuf, work: &Path) -> Result<(Env, moto::Moto, LatencyProxy)> {
        let moto = moto::Moto::start(&work.join("moto.log"))?;
        moto.create_bucket(BUCKET)?;
        let proxy = LatencyProxy::start(moto.addr, Duration::ZERO)?;
        let env = Env {
            bucketdisk,
            work: work.to_path_buf(),
            s3_endpoint: proxy.endpoint(),
        };
        Ok((env, moto, proxy))
    }

    /// The raw file the local-limit subjects serve.
    pub fn raw_file(&self) -> PathBuf {
        self.work.join("limit.raw")
    }

    /// bucketdisk-s3-warm's cache, kept across its sessions.
    pub fn warm_cache(&self) -> PathBuf {
        self.work.join("s3-warm-cache")
    }

    fn logs(&self) -> PathBuf {
        self.work.join("logs")
    }
}

/// A started subject. Fields drop in order: the NBD server stops before s3backer unmounts.
pub struct Session {
    nbd: Option<ServerProcess>,
    s3backer: Option<S3backerMount>,
    samplers: Vec<RssSampler>,
    /// A cold session's cache, deleted at stop.
    scratch_cache: Option<PathBuf>,
    pub uri: String,
    pub addr: SocketAddr,
    pub command_line: String,
    /// The NBD server's log (bucketdisk's says when its map and disk are hydrated).
    pub log: PathBuf,
    /// bucketdisk's metrics endpoint (`--metrics`), to see when its uploads have settled.
    pub metrics: Option<SocketAddr>,
}

impl Session {
    /// CPU time (user + system) of the processes serving this subject.
    pub fn cpu_time(&self) -> Duration {
        let nbd = self.nbd.as_ref().and_then(ServerProcess::cpu_time);
        let fuse = self
            .s3backer
            .as_ref()
            .and_then(|m| m.process.as_ref()?.cpu_time());
        nbd.unwrap_or_default() + fuse.unwrap_or_default()
    }

    /// Waits until the NBD server answers (after [`spawn`]).
    pub fn wait_serving(&mut self) -> Result<()> {
        let addr = self.addr;
        match self.nbd.as_mut() {
            Some(server) => server.wait_until_serving(addr, START_TIMEOUT),
            None => bail!("the session has no server"),
        }
    }

    /// For bucketdisk: waits (outside any timed part) until nothing written is waiting for
    /// upload — no dirty bytes, no upload lag — so the next run does not share the machine with
    /// an upload of the previous one's writes. Returns the seconds waited (0 for the peers).
    pub fn wait_uploads_settled(&mut self, timeout: Duration) -> Result<f64> {
        let Some(addr) = self.metrics else {
            return Ok(0.0);
        };
        let started = Instant::now();
        loop {
            self.ensure_running()?;
            let scrape = crate::server_metrics::scrape(addr)?;
            let dirty = scrape.get("bucketdisk_dirty_bytes").unwrap_or(0.0);
            let lag = scrape.get("bucketdisk_upload_lag_records").unwrap_or(0.0);
            if dirty == 0.0 && lag == 0.0 {
                return Ok(started.elapsed().as_secs_f64());
            }
            if started.elapsed() > timeout {
                bail!("uploads did not settle within {timeout:?} ({dirty} bytes dirty)");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Fails if a process of the subject has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(s) = self.nbd.as_mut() {
            s.ensure_running()?;
        }
        if let Some(p) = self.s3backer.as_mut().and_then(|m| m.process.as_mut()) {
            p.ensure_running()?;
        }
        Ok(())
    }

    /// Stops everything (uploads included) and returns the peak resident memory summed over the
    /// subject's processes, and any unclean exit.
    pub fn stop(mut self) -> Result<(Memory, Vec<String>)> {
        let mut notes = Vec::new();
        let mut peak = Memory::default();
        for m in std::mem::take(&mut self.samplers)
            .into_iter()
            .map(RssSampler::finish)
        {
            peak.hwm += m.hwm;
            peak.anon += m.anon;
            peak.file += m.file;
        }
        if let Some(server) = self.nbd.take() {
            let status = server.stop_within(STOP_GRACE)?;
            note_exit(&mut notes, &self.command_line, status);
        }
        if let Some(mount) = self.s3backer.take() {
            let status = mount.unmount()?;
            note_exit(&mut notes, "s3backer", status);
        }
        if let Some(dir) = self.scratch_cache.take() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        Ok((peak, notes))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // On an error path: stop the NBD server before unmounting what it serves.
        drop(self.nbd.take());
        drop(self.s3backer.take());
        if let Some(dir) = self.scratch_cache.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn note_exit(notes: &mut Vec<String>, what: &str, status: ExitStatus) {
    // nbdkit and qemu-nbd exit on SIGTERM by the signal; only bucketdisk promises exit 0.
    if !status.success() && what.contains("bucketdisk") {
        notes.push(format!("`{what}` exited with {status} after SIGTERM"));
    }
}

/// Starts `kind` and waits until it answers NBD. `cold_index` names a cold session's fresh
/// cache directory.
pub fn start(kind: Kind, env: &Env, cold_index: usize) -> Result<Session> {
    let mut session = spawn(kind, env, cold_index, &[])?;
    session
        .wait_serving()
        .with_context(|| format!("starting {}", kind.name()))?;
    Ok(session)
}

/// Starts `kind` without waiting for it to serve (for clocks that start at process start).
/// `extra` goes to bucketdisk's command line (ignored by the other subjects).
pub fn spawn(kind: Kind, env: &Env, cold_index: usize, extra: &[&str]) -> Result<Session> {
    std::fs::create_dir_all(env.logs())?;
    let port = free_loopback_port()?;
    let log = env.logs().join(format!("{}-{port}.log", kind.name()));
    let mut scratch_cache = None;
    let mut s3backer = None;
    let mut metrics = None;
    let mut cmd = match kind {
        Kind::QemuNbd => {
            let mut cmd = Command::new("qemu-nbd");
            cmd.args(["-f", "raw", "--persistent", "--export-name="])
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--shared=4", "--cache=writeback", "--aio=threads"])
                // Trims punch holes in the raw file instead of being ignored (mkfs discards).
                .arg("--discard=unmap")
                .arg(env.raw_file());
            cmd
        }
        Kind::NbdkitFile => nbdkit_file(port, &env.raw_file()),
        Kind::BucketdiskLocal => {
            let mut cmd = bucketdisk(env, port, &env.work.join("local-cache"), "object");
            cmd.arg("--store")
                .arg(format!("file://{}", env.work.join("local-store").display()));
            cmd
        }
        Kind::BucketdiskFile => {
            let mut cmd = bucketdisk(env, port, &env.work.join("file-cache"), "file");
            cmd.arg("--store").arg(env.work.join("file-store"));
            cmd
        }
        Kind::BucketdiskS3Warm => bucketdisk_s3(env, port, &env.warm_cache()),
        Kind::BucketdiskS3Cold => {
            let cache = env.work.join(format!("s3-cold-cache-{cold_index}"));
            let cmd = bucketdisk_s3(env, port, &cache);
            scratch_cache = Some(cache);
            cmd
        }
        Kind::S3backer => {
            let mount = S3backerMount::start(env)?;
            let cmd = nbdkit_file(port, &mount.file());
            s3backer = Some(mount);
            cmd
        }
        Kind::NbdkitS3 => {
            let mut cmd = Command::new("nbdkit");
            cmd.args(["--foreground", "--exit-with-parent", "-i", "127.0.0.1"])
                .args(["-p", &port.to_string()])
                // The plugin advertises 64 KiB as its minimum block size and libnbd (fio)
                // refuses smaller requests; the filter does the read-modify-write instead.
                .arg("--filter=blocksize")
                .arg("S3")
                .arg(format!("endpoint-url={}", env.s3_endpoint))
                .arg(format!("bucket={BUCKET}"))
                .arg("key=nbdkit-s3")
                .arg(format!("size={DISK_SIZE}"))
                .arg("object-size=64k")
                .arg(format!("access-key={}", moto::ACCESS_KEY))
                .arg(format!("secret-key={}", moto::SECRET_KEY))
                .env("AWS_DEFAULT_REGION", moto::REGION);
            cmd
        }
    };
    if matches!(
        kind,
        Kind::BucketdiskS3Cold
            | Kind::BucketdiskS3Warm
            | Kind::BucketdiskLocal
            | Kind::BucketdiskFile
    ) {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()?));
        cmd.arg("--metrics").arg(addr.to_string()).args(extra);
        metrics = Some(addr);
    }
    let command_line = describe(&cmd);
    let server = ServerProcess::spawn(kind.name(), cmd, &log)?;
    let mut samplers: Vec<RssSampler> = server.pid().into_iter().map(RssSampler::start).collect();
    if let Some(pid) = s3backer.as_ref().and_then(S3backerMount::pid) {
        samplers.push(RssSampler::start(pid));
    }
    let command_line = match &s3backer {
        Some(m) => format!("{} + {command_line}", m.command_line),
        None => command_line,
    };
    Ok(Session {
        nbd: Some(server),
        s3backer,
        samplers,
        scratch_cache,
        uri: format!("nbd://127.0.0.1:{port}/"),
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        command_line,
        log,
        metrics,
    })
}

fn nbdkit_file(port: u16, file: &Path) -> Command {
    let mut cmd = Command::new("nbdkit");
    cmd.args(["--foreground", "--exit-with-parent", "-i", "127.0.0.1"])
        .args(["-p", &port.to_string()])
        .arg("file")
        .arg(file);
    cmd
}

fn bucketdisk(env: &Env, port: u16, cache: &Path, engine: &str) -> Command {
    let mut cmd = Command::new(&env.bucketdisk);
    cmd.arg("serve")
        .args(["--engine", engine, "--volume", VOLUME])
        .args(["--size", DISK_SIZE, "--block-size", BLOCK])
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--cache-dir")
        .arg(cache)
        .env("BUCKETDISK_LOG", "info");
    cmd
}

fn bucketdisk_s3(env: &Env, port: u16, cache: &Path) -> Command {
    bucketdisk_s3_at(env, "bucketdisk", port, cache)
}

/// `bucketdisk serve` of the 100 GiB disk stored under `prefix` of [`BUCKET`] (through the
/// proxy), with its cache in `cache`.
pub fn bucketdisk_s3_at(env: &Env, prefix: &str, port: u16, cache: &Path) -> Command {
    let mut cmd = bucketdisk(env, port, cache, "object");
    on_moto_store(&mut cmd, env, prefix);
    cmd
}

/// `cmd` (a `bucketdisk` command) pointed at the volumes under `prefix` of [`BUCKET`], through
/// the proxy: `--store` and the AWS_* environment.
pub fn on_moto_store<'a>(cmd: &'a mut Command, env: &Env, prefix: &str) -> &'a mut Command {
    cmd.arg("--store")
        .arg(format!("s3://{BUCKET}/{prefix}"))
        .env("AWS_ENDPOINT_URL", &env.s3_endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", moto::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", moto::SECRET_KEY)
        .env("AWS_REGION", moto::REGION)
}

pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// s3backer in the foreground, its FUSE mount holding one file: the 100 GiB disk.
struct S3backerMount {
    process: Option<ServerProcess>,
    mountpoint: PathBuf,
    command_line: String,
}

impl S3backerMount {
    fn start(env: &Env) -> Result<S3backerMount> {
        let mountpoint = env.work.join("s3backer-mnt");
        std::fs::create_dir_all(&mountpoint)?;
        let mut cmd = Command::new("s3backer");
        // Path-style URLs (no --vhost, no --region: either would put the bucket in the host
        // name, which moto on 127.0.0.1 cannot serve). Defaults otherwise: 1000-block memory
        // cache, 20 threads, write-back.
        cmd.arg("-f")
            .arg(format!("--baseURL={}/", env.s3_endpoint))
            .arg(format!("--accessId={}", moto::ACCESS_KEY))
            .arg(format!("--accessKey={}", moto::SECRET_KEY))
            .arg(format!("--blockSize={}", BLOCK.to_lowercase()))
            .arg(format!("--size={DISK_SIZE}"))
            .arg("--prefix=s3backer/")
            .arg(BUCKET)
            .arg(&mountpoint);
        let command_line = describe(&cmd);
        let log = env.logs().join("s3backer.log");
        let mut mount = S3backerMount {
            process: Some(ServerProcess::spawn("s3backer", cmd, &log)?),
            mountpoint,
            command_line,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while !std::fs::metadata(mount.file()).is_ok_and(|m| m.len() == DISK_BYTES) {
            if let Some(p) = mount.process.as_mut() {
                p.ensure_running()?;
            }
            if Instant::now() >= deadline {
                bail!("s3backer did not mount within {START_TIMEOUT:?}");
            }
            // Polled often: the boot clock includes this wait, and must not round it up.
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(mount)
    }

    fn file(&self) -> PathBuf {
        self.mountpoint.join("file")
    }

    fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(ServerProcess::pid)
    }

    /// Unmounts; s3backer then writes back its dirty blocks and exits by itself (a SIGTERM
    /// now could cut the write-back short, so it only comes after the grace period).
    fn unmount(mut self) -> Result<ExitStatus> {
        umount(&self.mountpoint)?;
        let process = self.process.take().context("s3backer already stopped")?;
        process.wait_exit(STOP_GRACE)
    }
}

impl Drop for S3backerMount {
    fn drop(&mut self) {
        let _ = umount(&self.mountpoint);
        // The process guard then stops s3backer if unmounting did not.
    }
}

/// Unmounts a FUSE mount if it is mounted (root: plain umount(8)).
fn umount(mountpoint: &Path) -> Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&*mountpoint.to_string_lossy()));
    if !mounted {
        return Ok(());
    }
    let status = Command::new("umount")
        .arg(mountpoint)
        .stdin(Stdio::null())
        .status()
        .context("running umount")?;
    if !status.success() {
        bail!("umount {} failed ({status})", mountpoint.display());
    }
    Ok(())
}
