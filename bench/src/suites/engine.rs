//! `engine`: the object-storage engine (`bucketdisk serve`, the default engine) measured against
//! its floors, with peers from the same run:
//!
//! 1. cold boot on a 100 GiB volume with a block map of ~25 MB, an empty cache and 20 ms of
//!    injected store latency: process start → first 4 KiB of block 0 answered over NBD (peer:
//!    `litestream restore` of the same map + open, no latency);
//! 2. warm fio (the nbd-local workloads) against the local-file engine and qemu-nbd;
//! 3. cold 1M sequential reads from the store at 20 ms per request, empty cache;
//! 4. sustained 1M sequential writes until uploaded, store PUTs per GiB, peak RSS;
//! 5. mkfs.ext4 on 100 GiB through qemu-storage-daemon's FUSE export and a loop device;
//! 6. peak RSS serving a fully written 100 GiB volume (a map of 1,638,400 rows).
//!
//! Every server runs on loopback; the store is a local directory. Large maps are built directly
//! ([`crate::synthetic`]), so no part writes 100 GiB of data.

use crate::fio::{self, FioResult, RunSettings, Target};
use crate::fuse_loop::FuseLoop;
use crate::machine::{self, Machine, Tools};
use crate::nbd_client::NbdClient;
use crate::process::{
    Memory, RssSampler, ServerProcess, check_interrupted, free_loopback_port, memory, output_of,
    peak_rss,
};
use crate::stats::Summary;
use crate::store_watch::StoreWatch;
use crate::subjects::{self, Subject, Volume};
use crate::suites::nbd_local::WORKLOADS;
use crate::synthetic::{self, BLOCK, Built, DISTINCT};
use crate::workspace::{Places, bucketdisk_binary, workspace_root};
use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

pub const SUITE: &str = "engine";

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Every volume is this big (the default of `bucketdisk serve`).
const VOLUME_BYTES: u64 = 100 * GIB;
/// The volume name every server exports.
const VOLUME: &str = "disk";
/// Injected first-byte latency of the "remote" store.
const LATENCY: &str = "20ms";
/// A clean stop uploads the backlog; give it time.
const STOP_GRACE: Duration = Duration::from_secs(600);
/// Rows of the cold-boot map (~25 MB) and of a fully written 100 GiB volume at 64 KiB blocks.
const BOOT_ROWS: u64 = 600_000;
const FULL_ROWS: u64 = 1_638_400;

/// The parts of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Part {
    Boot,
    Warm,
    ColdRead,
    Sustained,
    Mkfs,
    Memory,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Smaller everything: a smoke run of about three minutes (results go to
    /// engine-quick-<date>.*).
    #[arg(long)]
    pub quick: bool,
    /// Runs of every measurement (medians and min–max are reported). Default 3 (1 with
    /// --quick).
    #[arg(long)]
    pub repeats: Option<usize>,
    /// Seconds of measured I/O per warm fio run (after the ramp). Default 10 (3 with --quick).
    #[arg(long)]
    pub runtime: Option<u64>,
    /// Parts to run, in this order (results of a subset go to engine-partial-<date>.*).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "boot,warm,cold-read,sustained,mkfs,memory"
    )]
    pub parts: Vec<Part>,
    #[command(flatten)]
    pub places: Places,
}

/// Sizes of one run of the suite.
#[derive(Debug, Clone, Serialize)]
struct Sizes {
    boot_rows: u64,
    warm_bytes: u64,
    warm_runtime_secs: u64,
    warm_ramp_secs: u64,
    cold_read_bytes: u64,
    sustained_bytes: u64,
    full_rows: u64,
    random_reads: u64,
}

impl Sizes {
    fn new(args: &Args) -> Sizes {
        if args.quick {
            Sizes {
                boot_rows: 100_000,
                warm_bytes: 256 * MIB,
                warm_runtime_secs: args.runtime.unwrap_or(3),
                warm_ramp_secs: 1,
                cold_read_bytes: 256 * MIB,
                sustained_bytes: 512 * MIB,
                full_rows: 200_000,
                random_reads: 1000,
            }
        } else {
            Sizes {
                boot_rows: BOOT_ROWS,
                warm_bytes: 2 * GIB,
                warm_runtime_secs: args.runtime.unwrap_or(10),
                warm_ramp_secs: 2,
                cold_read_bytes: GIB,
                sustained_bytes: 4 * GIB,
                full_rows: FULL_ROWS,
                random_reads: 4000,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------------------------

/// Which engine a `bucketdisk serve` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Engine {
    Object,
    File,
}

/// A running server and how to reach it.
struct Served {
    server: ServerProcess,
    port: u16,
    command_line: String,
}

impl Served {
    fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/", self.port)
    }
}

/// `bucketdisk serve` for `engine` on `store` (and `cache`, object engine only) on `port`.
fn bucketdisk_command(
    bin: &Path,
    engine: Engine,
    store: &Path,
    cache: &Path,
    port: u16,
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--store")
        .arg(format!("file://{}", store.display()))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(["--size", "100G", "--volume", VOLUME]);
    match engine {
        Engine::Object => {
            cmd.args(["--engine", "object"])
                .arg("--cache-dir")
                .arg(cache);
        }
        Engine::File => {
            cmd.args(["--engine", "file"]);
        }
    }
    cmd.args(extra).env("BUCKETDISK_LOG", "info");
    cmd
}

/// Starts `bucketdisk serve` and waits until it answers NBD.
fn serve(
    bin: &Path,
    engine: Engine,
    store: &Path,
    cache: &Path,
    extra: &[&str],
    log: &Path,
) -> Result<Served> {
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let port = free_loopback_port()?;
    let cmd = bucketdisk_command(bin, engine, store, cache, port, extra);
    let command_line = crate::store_subjects::describe(&cmd);
    let mut server = ServerProcess::spawn("bucketdisk", cmd, log)?;
    server
        .wait_until_serving(
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            Duration::from_secs(60),
        )
        .with_context(|| format!("starting {command_line}"))?;
    Ok(Served {
        server,
        port,
        command_line,
    })
}

/// Stops a server with SIGTERM (it uploads what is journaled) and checks it exited cleanly.
fn stop(served: Served, notes: &mut Vec<String>, what: &str) -> Result<Duration> {
    let t = Instant::now();
    let tail = served.server.log_tail();
    let status = served.server.stop_within(STOP_GRACE)?;
    if !status.success() {
        let note = format!("{what}: the server exited with {status} after SIGTERM");
        eprintln!("engine: note: {note}\n{tail}");
        notes.push(note);
    }
    Ok(t.elapsed())
}

/// True once the object engine's local journal holds no record that is not yet in the store.
///
/// Reads the journal's on-disk layout (engine/src/journal.rs): segments
/// `journal-<first seq as %016x>.log` of records that start with "BDJ1" and their seq (u64 LE),
/// plus a recycled `journal-spare.log`. Once an upload has been committed to the map and the
/// map synced to the store, the engine releases the journal: older segments are recycled and
/// the current one is renamed after the next seq and rewritten from offset 0 (its stale
/// records have lower seqs). So: drained ⟺ one segment whose first record is not the one its
/// name announces. (Directory sizes do not work: released files are kept for reuse.)
fn journal_drained(cache: &Path) -> bool {
    let dir = cache.join(VOLUME).join("journal");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return false;
    };
    let segments: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let hex = name.strip_prefix("journal-")?.strip_suffix(".log")?;
            Some((u64::from_str_radix(hex, 16).ok()?, e.path()))
        })
        .collect();
    let [(first_seq, path)] = segments.as_slice() else {
        return false;
    };
    let mut head = [0u8; 12];
    let live = std::fs::File::open(path)
        .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0))
        .is_ok()
        && &head[..4] == b"BDJ1"
        && u64::from_le_bytes(head[4..12].try_into().unwrap_or_default()) == *first_seq;
    !live
}

/// Waits until the object engine's journal is drained (everything uploaded, map synced).
fn wait_uploaded(cache: &Path, served: &mut Served, timeout: Duration) -> Result<Duration> {
    let t = Instant::now();
    while !journal_drained(cache) {
        served.server.ensure_running()?;
        check_interrupted()?;
        if t.elapsed() > timeout {
            bail!("the journal still holds unuploaded writes after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(t.elapsed())
}

/// `bucketdisk info --json` of the volume (reads the store-side map; safe while serving).
fn info(bin: &Path, store: &Path) -> Result<serde_json::Value> {
    let text = output_of(
        &bin.to_string_lossy(),
        &[
            "info",
            VOLUME,
            "--store",
            &format!("file://{}", store.display()),
            "--json",
        ],
    )?;
    Ok(serde_json::from_str(&text)?)
}

/// Fails unless the filesystem holding `dir` has `need` bytes free: a full disk stalls the
/// object engine's uploads (it retries) and hurts everyone else on the machine.
fn ensure_space(dir: &Path, need: u64, what: &str) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: statvfs fills the struct we own from a valid NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        bail!(
            "statvfs {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    ensure!(
        free >= need,
        "{what} needs about {} GiB free in {}, there are {:.1} GiB",
        need >> 30,
        dir.display(),
        free as f64 / GIB as f64
    );
    Ok(())
}

/// Busy and total CPU ticks of the whole machine (/proc/stat, all CPUs).
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    // idle and iowait are fields 4 and 5.
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// Cores kept busy between two [`cpu_ticks`] readings.
fn busy_cores(before: (u64, u64), after: (u64, u64)) -> f64 {
    let total = after.1.saturating_sub(before.1);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    if total == 0 {
        return 0.0;
    }
    after.0.saturating_sub(before.0) as f64 / total as f64 * cpus
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

fn summary(values: &[f64]) -> Summary {
    Summary::of(values).unwrap_or(Summary {
        median: f64::NAN,
        min: f64::NAN,
        max: f64::NAN,
        n: 0,
    })
}

/// "median (min–max)" with `digits` decimals, or just the value for one run.
fn cell(s: &Summary, digits: usize) -> String {
    if s.n > 1 {
        format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = digits)
    } else {
        format!("{:.d$}", s.median, d = digits)
    }
}

#[derive(Debug, Clone, Serialize)]
struct Floor {
    part: Part,
    measurement: String,
    /// The median the floor is checked against.
    value: f64,
    unit: String,
    floor: String,
    met: bool,
}

#[derive(Debug, Clone, Serialize)]
struct BootRun {
    total_ms: f64,
    /// First accepted TCP connection, on the benchmark's clock.
    listening_ms: f64,
    /// Listening → handshake done and the read answered.
    listening_to_read_ms: f64,
    /// From the server's log (its wall-clock timestamps against the spawn time).
    log_volume_ready_ms: Option<f64>,
    log_serving_ms: Option<f64>,
    /// How long the server's background map hydration took, as it logged it (if it finished).
    log_map_hydrated_secs: Option<f64>,
    peak_rss_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
struct PeerRestoreRun {
    restore_open_lookup_ms: f64,
    restored_db_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
struct BootResult {
    map: Built,
    server_command: String,
    runs: Vec<BootRun>,
    total_ms: Summary,
    listening_ms: Summary,
    listening_to_read_ms: Summary,
    peer_command: String,
    peer_runs: Vec<PeerRestoreRun>,
    peer_ms: Summary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum WarmSubject {
    Object,
    File,
    QemuNbd,
}

impl WarmSubject {
    fn name(self) -> &'static str {
        match self {
            WarmSubject::Object => "object engine",
            WarmSubject::File => "local-file engine",
            WarmSubject::QemuNbd => "qemu-nbd",
        }
    }
}

const WARM_SUBJECTS: [WarmSubject; 3] =
    [WarmSubject::Object, WarmSubject::File, WarmSubject::QemuNbd];

#[derive(Debug, Clone, Serialize)]
struct WarmRun {
    subject: WarmSubject,
    workload: &'static str,
    repeat: usize,
    fio: FioResult,
    server_cpu_secs: Option<f64>,
    wall_secs: f64,
    /// After a write workload: time until the object engine's journal was empty (everything
    /// uploaded), or the fsync of the peers' file. Outside the timed part.
    settle_secs: Option<f64>,
    /// Cores busy on the whole machine during the run (/proc/stat), and what is left after the
    /// server and fio: other people's work, which this machine shares.
    machine_busy_cores: f64,
    other_cores: f64,
    load_before: String,
}

#[derive(Debug, Clone, Serialize)]
struct WarmRow {
    workload: &'static str,
    subject: WarmSubject,
    iops: Summary,
    mib_per_sec: Summary,
    clat_p99_us: Summary,
    server_cores: Summary,
    other_cores: Summary,
    settle_secs: Option<Summary>,
}

#[derive(Debug, Clone, Serialize)]
struct WarmResult {
    settings: RunSettings,
    commands: BTreeMap<String, String>,
    fill_secs: BTreeMap<String, f64>,
    rows: Vec<WarmRow>,
    runs: Vec<WarmRun>,
}

#[derive(Debug, Clone, Serialize)]
struct ColdReadRun {
    mb_per_sec: f64,
    /// The same cold read with no injected latency (what the local store alone allows).
    no_latency_mb_per_sec: f64,
}

#[derive(Debug, Clone, Serialize)]
struct ColdReadResult {
    bytes: u64,
    fill_mb_per_sec: f64,
    fill_stop_secs: f64,
    runs: Vec<ColdReadRun>,
    mb_per_sec: Summary,
    no_latency_mb_per_sec: Summary,
}

#[derive(Debug, Clone, Serialize)]
struct SustainedRun {
    fio_secs: f64,
    /// fio finished → journal empty (everything uploaded, map synced).
    catch_up_secs: f64,
    /// Clean stop (SIGTERM → exit) after that.
    stop_secs: f64,
    fio_mb_per_sec: f64,
    write_and_upload_mb_per_sec: f64,
    /// Objects created in the store during the run (inotify), per first-level directory.
    objects_created: BTreeMap<String, u64>,
    puts_per_gib: f64,
    /// Files under chunks/ and blockmap/ after minus before (misses objects deleted again).
    file_count_delta: i64,
    /// What `bucketdisk info --json` reported allocated once the journal had drained.
    store_allocated_bytes: u64,
    peak_rss_bytes: u64,
    /// VmHWM and the highest anonymous and file-backed RSS sampled.
    memory: Memory,
}

#[derive(Debug, Clone, Serialize)]
struct SustainedResult {
    bytes: u64,
    server_command: String,
    runs: Vec<SustainedRun>,
    write_and_upload_mb_per_sec: Summary,
    fio_mb_per_sec: Summary,
    puts_per_gib: Summary,
    peak_rss_mib: Summary,
}

#[derive(Debug, Clone, Serialize)]
struct MkfsRun {
    engine: Engine,
    repeat: usize,
    mkfs_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
struct MkfsResult {
    command: String,
    runs: Vec<MkfsRun>,
    object_secs: Summary,
    file_secs: Summary,
}

#[derive(Debug, Clone, Serialize)]
struct MemoryResult {
    map: Built,
    server_command: String,
    rss_after_boot_bytes: u64,
    random_reads: u64,
    random_reads_secs: f64,
    block_status_secs: f64,
    block_status_totals: String,
    peak_rss_bytes: u64,
    /// VmHWM and the highest anonymous and file-backed RSS sampled.
    memory: Memory,
}

#[derive(Debug, Clone, Serialize)]
struct ExtraTools {
    litestream: String,
    qemu_storage_daemon: String,
    mke2fs: String,
}

#[derive(Debug, Clone, Serialize)]
struct EngineReport {
    suite: &'static str,
    date: String,
    started: String,
    finished: String,
    command: String,
    machine: Machine,
    load_before: String,
    load_after: String,
    tools: Tools,
    extra_tools: ExtraTools,
    quick: bool,
    repeats: usize,
    sizes: Sizes,
    floors: Vec<Floor>,
    boot: Option<BootResult>,
    warm: Option<WarmResult>,
    cold_read: Option<ColdReadResult>,
    sustained: Option<SustainedResult>,
    mkfs: Option<MkfsResult>,
    memory: Option<MemoryResult>,
    notes: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// 1. Cold boot
// ---------------------------------------------------------------------------------------------

/// Seconds since the Unix epoch of a log line's RFC 3339 timestamp
/// ("2026-11-26T21:10:04.868074Z ...").
fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min, s) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

/// Milliseconds from `start` to the first log line containing `needle`.
fn log_offset_ms(log: &str, needle: &str, start: SystemTime) -> Option<f64> {
    let start = start
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?
        .as_secs_f64();
    let line = log.lines().find(|l| l.contains(needle))?;
    Some((log_time(line)? - start) * 1000.0)
}

fn cold_boot_once(bin: &Path, store: &Path, dir: &Path, expected: &[u8]) -> Result<BootRun> {
    let cache = dir.join("cache");
    ensure!(!cache.exists(), "the cache directory must start empty");
    let port = free_loopback_port()?;
    let log = dir.join("serve.log");
    let cmd = bucketdisk_command(
        bin,
        Engine::Object,
        store,
        &cache,
        port,
        &["--inject-latency", LATENCY],
    );
    let wall_start = SystemTime::now();
    let start = Instant::now();
    let mut server = ServerProcess::spawn("bucketdisk", cmd, &log)?;
    let stream = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) => {
                if start.elapsed() > Duration::from_secs(30) {
                    bail!("the server never listened: {e}\n{}", server.log_tail());
                }
                server.ensure_running()?;
                std::thread::sleep(Duration::from_micros(500));
            }
        }
    };
    let listening = start.elapsed();
    let mut client = NbdClient::handshake(stream)?;
    let data = client.read(0, 4096)?;
    let total = start.elapsed();
    ensure!(client.size == VOLUME_BYTES, "export size {}", client.size);
    ensure!(
        data == expected,
        "block 0 read back different bytes from the map's block"
    );
    client.disconnect()?;
    // Let the background map hydration finish (or not) for the log's sake; not timed.
    std::thread::sleep(Duration::from_millis(300));
    let rss = server.pid().map(peak_rss).transpose()?.unwrap_or(0);
    server.stop()?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let hydrated = text
        .lines()
        .find(|l| l.contains("block map hydrated"))
        .and_then(|l| l.split("seconds=").nth(1))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok());
    Ok(BootRun {
        total_ms: total.as_secs_f64() * 1000.0,
        listening_ms: listening.as_secs_f64() * 1000.0,
        listening_to_read_ms: (total - listening).as_secs_f64() * 1000.0,
        log_volume_ready_ms: log_offset_ms(&text, "volume ready", wall_start),
        log_serving_ms: log_offset_ms(&text, "serving NBD on", wall_start),
        log_map_hydrated_secs: hydrated,
        peak_rss_bytes: rss,
    })
}

/// The peer: `litestream restore` of the map replica, then an ordinary SQLite open and the
/// lookup of block 0.
fn litestream_restore_once(store: &Path, out: &Path) -> Result<PeerRestoreRun> {
    let start = Instant::now();
    let replica = format!("file://{}", store.join(VOLUME).join("blockmap").display());
    output_of(
        "litestream",
        &["restore", "-o", &out.to_string_lossy(), &replica],
    )?;
    let conn = rusqlite::Connection::open(out)?;
    let chunk: i64 =
        conn.query_row("SELECT chunk FROM blocks WHERE block = 0", [], |r| r.get(0))?;
    let elapsed = start.elapsed();
    ensure!(chunk > 0, "no chunk for block 0");
    Ok(PeerRestoreRun {
        restore_open_lookup_ms: elapsed.as_secs_f64() * 1000.0,
        restored_db_bytes: std::fs::metadata(out)?.len(),
    })
}

fn part_boot(ctx: &Ctx, sizes: &Sizes) -> Result<BootResult> {
    let dir = ctx.work.join("boot");
    let pristine = dir.join("pristine");
    eprintln!(
        "engine: [boot] building a 100 GiB volume with a {}-row block map",
        sizes.boot_rows
    );
    let map = synthetic::build_volume(&pristine, VOLUME, VOLUME_BYTES, sizes.boot_rows)?;
    eprintln!(
        "engine: [boot] map {:.1} MB ({} replica files, snapshot {:.1} MB), built in {:.1} s",
        map.map_bytes as f64 / 1e6,
        map.replica_files,
        map.snapshot_bytes as f64 / 1e6,
        map.build_secs
    );
    let expected = synthetic::content(0)[..4096].to_vec();
    let mut runs = Vec::new();
    let mut peer_runs = Vec::new();
    for repeat in 1..=ctx.repeats {
        check_interrupted()?;
        // Every boot starts from the same store state (a boot takes the lease and claims a
        // TXID, which changes the replica).
        let run_dir = dir.join(format!("run-{repeat}"));
        let store = run_dir.join("store");
        synthetic::copy_tree(&pristine, &store)?;
        let run = cold_boot_once(&ctx.bin, &store, &run_dir, &expected)?;
        eprintln!(
            "engine: [boot {repeat}/{}] start → read answered {:.0} ms (listening {:.0} ms, \
             then {:.0} ms), peak RSS {} MiB",
            ctx.repeats,
            run.total_ms,
            run.listening_ms,
            run.listening_to_read_ms,
            run.peak_rss_bytes >> 20
        );
        runs.push(run);
        std::fs::remove_dir_all(&run_dir).ok();
        let peer = litestream_restore_once(&pristine, &dir.join(format!("restored-{repeat}.db")))?;
        eprintln!(
            "engine: [boot {repeat}/{}] peer: litestream restore + open + lookup {:.0} ms",
            ctx.repeats, peer.restore_open_lookup_ms
        );
        peer_runs.push(peer);
    }
    let server_command = crate::store_subjects::describe(&bucketdisk_command(
        &ctx.bin,
        Engine::Object,
        Path::new("STORE"),
        Path::new("EMPTY_CACHE"),
        0,
        &["--inject-latency", LATENCY],
    ))
    .replace("127.0.0.1:0", "127.0.0.1:PORT");
    let of = |f: &dyn Fn(&BootRun) -> f64| summary(&runs.iter().map(f).collect::<Vec<_>>());
    Ok(BootResult {
        total_ms: of(&|r| r.total_ms),
        listening_ms: of(&|r| r.listening_ms),
        listening_to_read_ms: of(&|r| r.listening_to_read_ms),
        peer_ms: summary(
            &peer_runs
                .iter()
                .map(|r| r.restore_open_lookup_ms)
                .collect::<Vec<_>>(),
        ),
        map,
        server_command,
        runs,
        peer_command: "litestream restore -o OUT.db file://STORE/disk/blockmap; then \
                       sqlite open + SELECT chunk FROM blocks WHERE block = 0"
            .into(),
        peer_runs,
    })
}

// ---------------------------------------------------------------------------------------------
// 2. Warm fio
// ---------------------------------------------------------------------------------------------

struct WarmServer {
    served: Option<Served>,
    qemu: Option<subjects::Running>,
    uri: String,
    /// The file to fsync between runs (peers), or the cache directory (object engine).
    file: Option<PathBuf>,
    cache: Option<PathBuf>,
    command_line: String,
}

impl WarmServer {
    fn server(&self) -> Option<&ServerProcess> {
        self.served
            .as_ref()
            .map(|s| &s.server)
            .or_else(|| self.qemu.as_ref().and_then(|r| r.server.as_ref()))
    }

    /// Outside the timed part: wait for the object engine's uploads, or fsync the peers' file.
    fn settle(&mut self) -> Result<f64> {
        let t = Instant::now();
        if let (Some(cache), Some(served)) = (&self.cache, self.served.as_mut()) {
            wait_uploaded(cache, served, Duration::from_secs(300))?;
        }
        if let Some(file) = &self.file {
            std::fs::OpenOptions::new()
                .write(true)
                .open(file)?
                .sync_data()?;
        }
        Ok(t.elapsed().as_secs_f64())
    }

    fn stop(self, notes: &mut Vec<String>, what: &str) -> Result<()> {
        if let Some(served) = self.served {
            stop(served, notes, what)?;
        }
        if let Some(server) = self.qemu.and_then(|r| r.server) {
            let status = server.stop()?;
            if !status.success() {
                notes.push(format!("{what}: qemu-nbd exited with {status}"));
            }
        }
        Ok(())
    }
}

fn start_warm(ctx: &Ctx, subject: WarmSubject, dir: &Path) -> Result<WarmServer> {
    std::fs::create_dir_all(dir)?;
    let log = dir.join(format!("serve-{}.log", free_loopback_port()?));
    match subject {
        WarmSubject::Object | WarmSubject::File => {
            let engine = if subject == WarmSubject::Object {
                Engine::Object
            } else {
                Engine::File
            };
            let cache = dir.join("cache");
            // A cache twice the working region: enough to stay warm, and bounded disk use.
            let cache_size = format!("{}M", (2 * ctx.warm_bytes) >> 20);
            let extra: &[&str] = if engine == Engine::Object {
                &["--cache-size", &cache_size]
            } else {
                &[]
            };
            let served = serve(&ctx.bin, engine, &dir.join("store"), &cache, extra, &log)?;
            let command_line = served.command_line.clone();
            Ok(WarmServer {
                uri: served.uri(),
                served: Some(served),
                qemu: None,
                file: (engine == Engine::File)
                    .then(|| dir.join("store").join(VOLUME).join("disk.raw")),
                cache: (engine == Engine::Object).then_some(cache),
                command_line,
            })
        }
        WarmSubject::QemuNbd => {
            let file = dir.join("disk.raw");
            if !file.exists() {
                std::fs::File::create(&file)?.set_len(VOLUME_BYTES)?;
            }
            let volume = Volume {
                store: dir.to_path_buf(),
                name: VOLUME.into(),
                file: file.clone(),
            };
            let running = subjects::start(Subject::QemuNbd, &volume, &ctx.bin, dir)?;
            let uri = match &running.target {
                Target::Nbd { uri } => uri.clone(),
                Target::File { .. } | Target::NbdTls { .. } => {
                    bail!("qemu-nbd here serves NBD in clear")
                }
            };
            Ok(WarmServer {
                uri,
                command_line: running.command_line.clone(),
                served: None,
                qemu: Some(running),
                file: Some(file),
                cache: None,
            })
        }
    }
}

fn part_warm(ctx: &mut Ctx, sizes: &Sizes) -> Result<WarmResult> {
    let settings = RunSettings {
        runtime_secs: sizes.warm_runtime_secs,
        ramp_secs: sizes.warm_ramp_secs,
        size: sizes.warm_bytes,
    };
    let mut runs = Vec::new();
    let mut commands = BTreeMap::new();
    let mut fill_secs = BTreeMap::new();
    for repeat in 1..=ctx.repeats {
        for subject in WARM_SUBJECTS {
            check_interrupted()?;
            let dir = ctx
                .work
                .join("warm")
                .join(format!("{subject:?}").to_lowercase());
            let mut server = start_warm(ctx, subject, &dir)?;
            commands.insert(subject.name().to_string(), server.command_line.clone());
            if repeat == 1 {
                // Fill the region and read it once: the object engine's cache is then warm.
                eprintln!(
                    "engine: [warm] {}: filling {} MiB, then reading it once",
                    subject.name(),
                    sizes.warm_bytes >> 20
                );
                let t = Instant::now();
                let size = sizes.warm_bytes;
                let out = dir.join("fill.json");
                fio::pass_with("write", "1M", 8, size, &server.uri, &out)?;
                server.settle()?;
                fio::pass_with("read", "1M", 8, size, &server.uri, &out)?;
                fill_secs.insert(subject.name().to_string(), t.elapsed().as_secs_f64());
            }
            for w in &WORKLOADS {
                check_interrupted()?;
                let out = dir.join(format!("fio-{}-{repeat}.json", w.name));
                let load_before = machine::load_average();
                let busy_before = cpu_ticks();
                let cpu_before = server.server().and_then(|s| s.cpu_time());
                let t = Instant::now();
                let target = Target::Nbd {
                    uri: server.uri.clone(),
                };
                let result = fio::run(w, &target, &settings, &out).with_context(|| {
                    let tail = server.server().map(|s| s.log_tail()).unwrap_or_default();
                    format!("{} {}: server log tail:\n{tail}", subject.name(), w.name)
                })?;
                let wall = t.elapsed().as_secs_f64();
                let cpu_after = server.server().and_then(|s| s.cpu_time());
                let busy_after = cpu_ticks();
                let server_cpu_secs = cpu_before
                    .zip(cpu_after)
                    .map(|(a, b)| b.saturating_sub(a).as_secs_f64());
                let machine_busy_cores = busy_cores(busy_before, busy_after);
                let other_cores = (machine_busy_cores
                    - server_cpu_secs.unwrap_or(0.0) / wall
                    - (result.fio_usr_cpu + result.fio_sys_cpu) / 100.0)
                    .max(0.0);
                let settle_secs = if w.is_write() {
                    Some(server.settle()?)
                } else {
                    None
                };
                eprintln!(
                    "engine: [warm {repeat}/{}] {:<17} {:<18} {:>8.0} IOPS {:>7.1} MiB/s \
                     p99 {:>6.0} µs server {:.2} cores, others {:.2}{}",
                    ctx.repeats,
                    subject.name(),
                    w.name,
                    result.iops,
                    result.bw_bytes / MIB as f64,
                    result.clat_p99_ns / 1000.0,
                    server_cpu_secs.unwrap_or(0.0) / wall,
                    other_cores,
                    settle_secs
                        .map(|s| format!(", settled in {s:.1} s"))
                        .unwrap_or_default()
                );
                runs.push(WarmRun {
                    subject,
                    workload: w.name,
                    repeat,
                    fio: result,
                    server_cpu_secs,
                    wall_secs: wall,
                    settle_secs,
                    machine_busy_cores,
                    other_cores,
                    load_before,
                });
            }
            server.stop(&mut ctx.notes, &format!("warm {}", subject.name()))?;
            if repeat == ctx.repeats {
                // Random writes churn through chunks faster than GC reclaims them (tens of GB
                // over three repeats): free the disk for the parts that follow.
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing {}", dir.display()))?;
            }
        }
    }
    let mut rows = Vec::new();
    for w in &WORKLOADS {
        for subject in WARM_SUBJECTS {
            let rs: Vec<&WarmRun> = runs
                .iter()
                .filter(|r| r.subject == subject && r.workload == w.name)
                .collect();
            let of =
                |f: &dyn Fn(&WarmRun) -> f64| summary(&rs.iter().map(|r| f(r)).collect::<Vec<_>>());
            let settles: Vec<f64> = rs.iter().filter_map(|r| r.settle_secs).collect();
            rows.push(WarmRow {
                workload: w.name,
                subject,
                iops: of(&|r| r.fio.iops),
                mib_per_sec: of(&|r| r.fio.bw_bytes / MIB as f64),
                clat_p99_us: of(&|r| r.fio.clat_p99_ns / 1000.0),
                server_cores: of(&|r| r.server_cpu_secs.unwrap_or(0.0) / r.wall_secs),
                other_cores: of(&|r| r.other_cores),
                settle_secs: Summary::of(&settles),
            });
        }
    }
    Ok(WarmResult {
        settings,
        commands,
        fill_secs,
        rows,
        runs,
    })
}

// ---------------------------------------------------------------------------------------------
// 3. Cold sequential read
// ---------------------------------------------------------------------------------------------

fn part_cold_read(ctx: &mut Ctx, sizes: &Sizes) -> Result<ColdReadResult> {
    let dir = ctx.work.join("cold-read");
    let store = dir.join("store");
    let bytes = sizes.cold_read_bytes;
    eprintln!(
        "engine: [cold read] writing {} MiB, then a clean stop",
        bytes >> 20
    );
    let fill_cache = dir.join("fill-cache");
    let served = serve(
        &ctx.bin,
        Engine::Object,
        &store,
        &fill_cache,
        &[],
        &dir.join("fill.log"),
    )?;
    let fill = fio::pass_with(
        "write",
        "1M",
        8,
        bytes,
        &served.uri(),
        &dir.join("fill.json"),
    )?;
    let fill_stop = stop(served, &mut ctx.notes, "cold-read fill")?;
    std::fs::remove_dir_all(&fill_cache)?;
    let mut runs = Vec::new();
    for repeat in 1..=ctx.repeats {
        let mut one = |latency: bool| -> Result<f64> {
            check_interrupted()?;
            let cache = dir.join(format!("cache-{repeat}-{latency}"));
            let extra: &[&str] = if latency {
                &["--inject-latency", LATENCY]
            } else {
                &[]
            };
            let served = serve(
                &ctx.bin,
                Engine::Object,
                &store,
                &cache,
                extra,
                &dir.join(format!("read-{repeat}-{latency}.log")),
            )?;
            let r = fio::pass_with(
                "read",
                "1M",
                8,
                bytes,
                &served.uri(),
                &dir.join(format!("read-{repeat}-{latency}.json")),
            )?;
            ensure!(
                r.io_bytes == bytes,
                "fio read {} of {bytes} bytes",
                r.io_bytes
            );
            stop(served, &mut ctx.notes, "cold read")?;
            std::fs::remove_dir_all(&cache)?;
            Ok(r.bw_bytes / 1e6)
        };
        let mb_per_sec = one(true)?;
        let no_latency_mb_per_sec = one(false)?;
        eprintln!(
            "engine: [cold read {repeat}/{}] {mb_per_sec:.0} MB/s at {LATENCY} per request \
             ({no_latency_mb_per_sec:.0} MB/s with none)",
            ctx.repeats
        );
        runs.push(ColdReadRun {
            mb_per_sec,
            no_latency_mb_per_sec,
        });
    }
    std::fs::remove_dir_all(&dir).ok();
    Ok(ColdReadResult {
        bytes,
        fill_mb_per_sec: fill.bw_bytes / 1e6,
        fill_stop_secs: fill_stop.as_secs_f64(),
        mb_per_sec: summary(&runs.iter().map(|r| r.mb_per_sec).collect::<Vec<_>>()),
        no_latency_mb_per_sec: summary(
            &runs
                .iter()
                .map(|r| r.no_latency_mb_per_sec)
                .collect::<Vec<_>>(),
        ),
        runs,
    })
}

// ---------------------------------------------------------------------------------------------
// 4. Sustained writes
// ---------------------------------------------------------------------------------------------

fn data_files(store: &Path) -> i64 {
    let mut files = Vec::new();
    synthetic::list_files(&store.join(VOLUME).join("chunks"), &mut files);
    synthetic::list_files(&store.join(VOLUME).join("blockmap"), &mut files);
    files.len() as i64
}

fn part_sustained(ctx: &mut Ctx, sizes: &Sizes) -> Result<SustainedResult> {
    let bytes = sizes.sustained_bytes;
    let gib = bytes as f64 / GIB as f64;
    let mut runs = Vec::new();
    let mut server_command = String::new();
    for repeat in 1..=ctx.repeats {
        check_interrupted()?;
        let dir = ctx.work.join(format!("sustained-{repeat}"));
        let store = dir.join("store");
        let cache = dir.join("cache");
        let mut served = serve(
            &ctx.bin,
            Engine::Object,
            &store,
            &cache,
            &["--sync-interval", "1s"],
            &dir.join("serve.log"),
        )?;
        server_command = served.command_line.clone();
        let pid = served.server.pid().context("no server pid")?;
        let rss = RssSampler::start(pid);
        let watch = StoreWatch::start(&store)?;
        let before = data_files(&store);
        let t0 = Instant::now();
        let r = fio::pass_with(
            "write",
            "1M",
            8,
            bytes,
            &served.uri(),
            &dir.join("fio.json"),
        )?;
        let fio_secs = t0.elapsed().as_secs_f64();
        let catch_up = wait_uploaded(&cache, &mut served, Duration::from_secs(900))?;
        let total = t0.elapsed().as_secs_f64();
        // Cross-check, untimed: the store-side map must hold every block written.
        let store_allocated_bytes = info(&ctx.bin, &store)?["allocated"]
            .as_u64()
            .context("bucketdisk info --json has no allocated")?;
        if store_allocated_bytes != bytes {
            let note = format!(
                "sustained run {repeat}: journal drained but the store's map holds \
                 {store_allocated_bytes} of {bytes} bytes"
            );
            eprintln!("engine: note: {note}");
            ctx.notes.push(note);
        }
        let stop_secs = stop(served, &mut ctx.notes, "sustained write")?.as_secs_f64();
        let mem = rss.finish();
        let objects_created = watch.finish();
        let after = data_files(&store);
        let puts: u64 = objects_created
            .iter()
            .filter(|(k, _)| *k == "chunks" || *k == "blockmap")
            .map(|(_, v)| v)
            .sum();
        let run = SustainedRun {
            fio_secs,
            catch_up_secs: catch_up.as_secs_f64(),
            stop_secs,
            fio_mb_per_sec: r.bw_bytes / 1e6,
            write_and_upload_mb_per_sec: bytes as f64 / total / 1e6,
            puts_per_gib: puts as f64 / gib,
            objects_created,
            file_count_delta: after - before,
            store_allocated_bytes,
            peak_rss_bytes: mem.hwm,
            memory: mem,
        };
        eprintln!(
            "engine: [sustained {repeat}/{}] {:.0} MB/s written+uploaded (fio {:.1} s at {:.0} \
             MB/s, then {:.1} s to upload, clean stop {:.1} s), {:.1} PUTs/GiB {:?}, peak RSS \
             {} MiB",
            ctx.repeats,
            run.write_and_upload_mb_per_sec,
            run.fio_secs,
            run.fio_mb_per_sec,
            run.catch_up_secs,
            run.stop_secs,
            run.puts_per_gib,
            run.objects_created,
            run.peak_rss_bytes >> 20
        );
        runs.push(run);
        std::fs::remove_dir_all(&dir).ok();
    }
    let of = |f: &dyn Fn(&SustainedRun) -> f64| summary(&runs.iter().map(f).collect::<Vec<_>>());
    Ok(SustainedResult {
        bytes,
        server_command,
        write_and_upload_mb_per_sec: of(&|r| r.write_and_upload_mb_per_sec),
        fio_mb_per_sec: of(&|r| r.fio_mb_per_sec),
        puts_per_gib: of(&|r| r.puts_per_gib),
        peak_rss_mib: of(&|r| r.peak_rss_bytes as f64 / MIB as f64),
        runs,
    })
}

// ---------------------------------------------------------------------------------------------
// 5. mkfs.ext4
// ---------------------------------------------------------------------------------------------

fn part_mkfs(ctx: &mut Ctx) -> Result<MkfsResult> {
    let mut runs = Vec::new();
    for repeat in 1..=ctx.repeats {
        for engine in [Engine::Object, Engine::File] {
            check_interrupted()?;
            let dir = ctx
                .work
                .join(format!("mkfs-{engine:?}-{repeat}").to_lowercase());
            let served = serve(
                &ctx.bin,
                engine,
                &dir.join("store"),
                &dir.join("cache"),
                &[],
                &dir.join("serve.log"),
            )?;
            let stack = FuseLoop::up(&dir.join("fuse"), served.port, VOLUME_BYTES)?;
            let t = Instant::now();
            output_of("mkfs.ext4", &["-F", "-q", stack.device()])?;
            let mkfs_secs = t.elapsed().as_secs_f64();
            stack.down()?;
            stop(served, &mut ctx.notes, "mkfs")?;
            eprintln!(
                "engine: [mkfs {repeat}/{}] {engine:?} engine: mkfs.ext4 of 100 GiB {mkfs_secs:.2} s",
                ctx.repeats
            );
            runs.push(MkfsRun {
                engine,
                repeat,
                mkfs_secs,
            });
            std::fs::remove_dir_all(&dir).ok();
        }
    }
    let of = |e: Engine| {
        summary(
            &runs
                .iter()
                .filter(|r| r.engine == e)
                .map(|r| r.mkfs_secs)
                .collect::<Vec<_>>(),
        )
    };
    Ok(MkfsResult {
        command: "bucketdisk serve … ; qemu-storage-daemon --blockdev driver=nbd,…,discard=unmap \
                  --export type=fuse,…,writable=on,allow-other=off ; losetup --find --show ; \
                  time mkfs.ext4 -F -q /dev/loopN"
            .into(),
        object_secs: of(Engine::Object),
        file_secs: of(Engine::File),
        runs,
    })
}

// ---------------------------------------------------------------------------------------------
// 6. Memory of a fully written volume
// ---------------------------------------------------------------------------------------------

fn part_memory(ctx: &mut Ctx, sizes: &Sizes) -> Result<MemoryResult> {
    let dir = ctx.work.join("memory");
    let store = dir.join("store");
    eprintln!(
        "engine: [memory] building a 100 GiB volume with a {}-row block map",
        sizes.full_rows
    );
    let map = synthetic::build_volume(&store, VOLUME, VOLUME_BYTES, sizes.full_rows)?;
    eprintln!(
        "engine: [memory] map {:.1} MB, built in {:.1} s",
        map.map_bytes as f64 / 1e6,
        map.build_secs
    );
    let served = serve(
        &ctx.bin,
        Engine::Object,
        &store,
        &dir.join("cache"),
        &[],
        &dir.join("serve.log"),
    )?;
    let server_command = served.command_line.clone();
    let pid = served.server.pid().context("no server pid")?;
    let rss = RssSampler::start(pid);
    let rss_after_boot_bytes = peak_rss(pid)?;

    // Random 4 KiB reads of random blocks, each checked against the block's content.
    let blocks = VOLUME_BYTES / u64::from(BLOCK);
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let picks: Vec<(u64, u64)> = (0..sizes.random_reads)
        .map(|_| {
            let row = next() % map.rows;
            let page = next() % (u64::from(BLOCK) / 4096);
            (row, page)
        })
        .collect();
    let ranges: Vec<(u64, u32)> = picks
        .iter()
        .map(|&(row, page)| {
            let block = synthetic::block_of_row(row, map.rows, blocks);
            (block * u64::from(BLOCK) + page * 4096, 4096)
        })
        .collect();
    let t = Instant::now();
    let mut client = NbdClient::handshake(TcpStream::connect(("127.0.0.1", served.port))?)?;
    let data = client.read_many(&ranges, 16)?;
    client.disconnect()?;
    let random_reads_secs = t.elapsed().as_secs_f64();
    let contents: Vec<Vec<u8>> = (0..DISTINCT).map(synthetic::content).collect();
    for ((row, page), got) in picks.iter().zip(&data) {
        let want = &contents[(row % DISTINCT) as usize][(page * 4096) as usize..][..4096];
        ensure!(got == want, "row {row} page {page} read back wrong");
    }
    eprintln!(
        "engine: [memory] {} random 4 KiB reads verified in {random_reads_secs:.1} s",
        sizes.random_reads
    );

    // Block status of the whole disk.
    let t = Instant::now();
    let totals = output_of("nbdinfo", &["--map", "--totals", &served.uri()])?;
    let block_status_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "engine: [memory] nbdinfo --map --totals over 100 GiB in {block_status_secs:.1} s: {}",
        totals.replace('\n', " | ")
    );
    let now = memory(pid)?;
    stop(served, &mut ctx.notes, "memory")?;
    // The sampler ran until the process exited: its clean stop is included.
    let mem = now.max(rss.finish());
    let peak_rss_bytes = mem.hwm;
    eprintln!(
        "engine: [memory] peak RSS {} MiB (anonymous up to {} MiB, file-backed up to {} MiB)",
        mem.hwm >> 20,
        mem.anon >> 20,
        mem.file >> 20
    );
    std::fs::remove_dir_all(&dir).ok();
    Ok(MemoryResult {
        map,
        server_command,
        rss_after_boot_bytes,
        random_reads: sizes.random_reads,
        random_reads_secs,
        block_status_secs,
        block_status_totals: totals,
        peak_rss_bytes,
        memory: mem,
    })
}

// ---------------------------------------------------------------------------------------------
// The run and the report
// ---------------------------------------------------------------------------------------------

struct Ctx {
    bin: PathBuf,
    work: PathBuf,
    repeats: usize,
    warm_bytes: u64,
    notes: Vec<String>,
}

/// First line of a tool's version output (stdout or stderr).
fn version_of(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("unknown")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|_| "not installed".into())
}

pub fn run(args: Args, command: String) -> Result<()> {
    let repeats = args.repeats.unwrap_or(if args.quick { 1 } else { 3 });
    ensure!(repeats > 0, "--repeats must be at least 1");
    let sizes = Sizes::new(&args);
    let workspace = workspace_root();
    let bin = bucketdisk_binary(args.places.bucketdisk.as_deref(), &workspace)?;
    let tools = Tools::probe(&bin, &workspace)?;
    let extra_tools = ExtraTools {
        litestream: version_of("litestream", &["version"]),
        qemu_storage_daemon: version_of("qemu-storage-daemon", &["--version"]),
        mke2fs: version_of("mke2fs", &["-V"]),
    };
    let load_before = machine::load_average();
    let (date, started) = machine::utc_now();
    let tmp = args.places.scratch("bucketdisk-engine-bench-")?;
    let machine = Machine::probe(tmp.path());
    eprintln!(
        "engine: working in {} ({}), load {load_before}",
        tmp.path().display(),
        machine.filesystem
    );
    let mut ctx = Ctx {
        bin,
        work: tmp.path().to_path_buf(),
        repeats,
        warm_bytes: sizes.warm_bytes,
        notes: Vec::new(),
    };
    let mut report = EngineReport {
        suite: SUITE,
        date: date.clone(),
        started,
        finished: String::new(),
        command,
        machine,
        load_before,
        load_after: String::new(),
        tools,
        extra_tools,
        quick: args.quick,
        repeats,
        sizes: sizes.clone(),
        floors: Vec::new(),
        boot: None,
        warm: None,
        cold_read: None,
        sustained: None,
        mkfs: None,
        memory: None,
        notes: Vec::new(),
    };
    let suite_start = Instant::now();
    for part in &args.parts {
        let t = Instant::now();
        let need = match part {
            Part::Warm => 6 * sizes.warm_bytes + 2 * GIB,
            Part::ColdRead => 3 * sizes.cold_read_bytes + GIB,
            Part::Sustained => 3 * sizes.sustained_bytes + GIB,
            Part::Boot | Part::Mkfs | Part::Memory => GIB,
        };
        ensure_space(&ctx.work, need, &format!("{part:?}"))?;
        match part {
            Part::Boot => report.boot = Some(part_boot(&ctx, &sizes)?),
            Part::Warm => report.warm = Some(part_warm(&mut ctx, &sizes)?),
            Part::ColdRead => report.cold_read = Some(part_cold_read(&mut ctx, &sizes)?),
            Part::Sustained => report.sustained = Some(part_sustained(&mut ctx, &sizes)?),
            Part::Mkfs => report.mkfs = Some(part_mkfs(&mut ctx)?),
            Part::Memory => report.memory = Some(part_memory(&mut ctx, &sizes)?),
        }
        eprintln!(
            "engine: {part:?} took {:.0} s ({:.0} s so far)",
            t.elapsed().as_secs_f64(),
            suite_start.elapsed().as_secs_f64()
        );
    }
    report.notes = std::mem::take(&mut ctx.notes);
    report.load_after = machine::load_average();
    report.finished = machine::utc_now().1;
    report.floors = floors(&report);

    let all = [
        Part::Boot,
        Part::Warm,
        Part::ColdRead,
        Part::Sustained,
        Part::Mkfs,
        Part::Memory,
    ]
    .iter()
    .all(|p| args.parts.contains(p));
    let stem = if args.quick {
        format!("{SUITE}-quick-{date}")
    } else if !all {
        format!("{SUITE}-partial-{date}")
    } else {
        format!("{SUITE}-{date}")
    };
    let out_dir = args.places.out_dir(&workspace);
    std::fs::create_dir_all(&out_dir)?;
    // Results already written today are never overwritten: a second run gets its start time.
    let stem = crate::report::free_stem(&out_dir, &stem, &report.started)?;
    let md_path = out_dir.join(format!("{stem}.md"));
    let json_path = out_dir.join(format!("{stem}.json"));
    let md = markdown(&report, &stem);
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    let json = serde_json::to_string_pretty(&report)? + "\n";
    std::fs::write(&json_path, json).with_context(|| format!("writing {}", json_path.display()))?;
    eprintln!(
        "engine: wrote {} and {} ({:.0} s)",
        md_path.display(),
        json_path.display(),
        suite_start.elapsed().as_secs_f64()
    );
    print!("{md}");
    Ok(())
}

fn floors(r: &EngineReport) -> Vec<Floor> {
    let mut out = Vec::new();
    let mut add = |part, measurement: String, value: f64, unit: &str, floor: &str, met: bool| {
        out.push(Floor {
            part,
            measurement,
            value,
            unit: unit.into(),
            floor: floor.into(),
            met,
        });
    };
    if let Some(b) = &r.boot {
        add(
            Part::Boot,
            "cold boot: process start → first read of block 0 answered".into(),
            b.total_ms.median,
            "ms",
            "< 1000 (aim 300)",
            b.total_ms.median < 1000.0,
        );
    }
    if let Some(w) = &r.warm {
        for wl in &WORKLOADS {
            let get = |s| {
                w.rows
                    .iter()
                    .find(|x| x.workload == wl.name && x.subject == s)
                    .map(|x| x.iops.median)
            };
            if let (Some(o), Some(f)) = (get(WarmSubject::Object), get(WarmSubject::File)) {
                let q = o / f;
                add(
                    Part::Warm,
                    format!("warm {}: object ÷ local-file engine", wl.name),
                    q,
                    "×",
                    "≥ 0.9",
                    q >= 0.9,
                );
            }
        }
    }
    if let Some(c) = &r.cold_read {
        add(
            Part::ColdRead,
            format!(
                "cold 1M sequential read of {} MiB at {LATENCY}/request",
                c.bytes >> 20
            ),
            c.mb_per_sec.median,
            "MB/s",
            "≥ 200",
            c.mb_per_sec.median >= 200.0,
        );
    }
    if let Some(s) = &r.sustained {
        add(
            Part::Sustained,
            format!(
                "sustained 1M sequential write of {} GiB, until uploaded",
                s.bytes / GIB
            ),
            s.write_and_upload_mb_per_sec.median,
            "MB/s",
            "≥ 150",
            s.write_and_upload_mb_per_sec.median >= 150.0,
        );
        add(
            Part::Sustained,
            "store PUTs (chunks + map files) per GiB written".into(),
            s.puts_per_gib.median,
            "/GiB",
            "≤ 64",
            s.puts_per_gib.median <= 64.0,
        );
    }
    if let Some(m) = &r.mkfs {
        add(
            Part::Mkfs,
            "mkfs.ext4 of 100 GiB (FUSE + loop)".into(),
            m.object_secs.median,
            "s",
            "< 5",
            m.object_secs.median < 5.0,
        );
    }
    if let Some(m) = &r.memory {
        add(
            Part::Memory,
            format!(
                "peak RSS serving a fully written 100 GiB volume ({} rows)",
                m.map.rows
            ),
            m.peak_rss_bytes as f64 / MIB as f64,
            "MiB",
            "≤ 256",
            m.peak_rss_bytes <= 256 * MIB,
        );
    }
    out
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn markdown(r: &EngineReport, stem: &str) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# {}: the object-storage engine against its floors — {}\n",
        r.suite, r.date
    );
    let _ = writeln!(o, "```\n{}\n```\n", r.command);
    if r.quick {
        let _ = writeln!(
            o,
            "**Quick smoke run**: sizes shrunk (see `sizes` in the JSON); not the measurement \
             the floors are about.\n"
        );
    }
    let _ = writeln!(o, "## Machine and tools\n");
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(o, "| CPU | {} × {} |", r.machine.nproc, r.machine.cpu_model);
    let _ = writeln!(
        o,
        "| memory | {:.1} GiB |",
        r.machine.memory_bytes as f64 / GIB as f64
    );
    let _ = writeln!(o, "| kernel | {} |", r.machine.kernel);
    let _ = writeln!(
        o,
        "| store, cache, journal filesystem | {} |",
        r.machine.filesystem
    );
    let _ = writeln!(
        o,
        "| load average (1/5/15 min) | before {} · after {} |",
        r.load_before, r.load_after
    );
    let _ = writeln!(o, "| run | {} → {} |", r.started, r.finished);
    let _ = writeln!(o, "| fio | {} |", r.tools.fio);
    let _ = writeln!(o, "| qemu-nbd | {} |", r.tools.qemu_nbd);
    let _ = writeln!(
        o,
        "| qemu-storage-daemon | {} |",
        r.extra_tools.qemu_storage_daemon
    );
    let _ = writeln!(o, "| litestream | {} |", r.extra_tools.litestream);
    let _ = writeln!(o, "| mke2fs | {} |", r.extra_tools.mke2fs);
    let _ = writeln!(
        o,
        "| bucketdisk | {} (commit {}) |",
        r.tools.bucketdisk, r.tools.bucketdisk_commit
    );
    let _ = writeln!(o);

    let _ = writeln!(o, "## Floors\n");
    let _ = writeln!(
        o,
        "Medians of {} runs; every number below comes from this run.\n",
        r.repeats
    );
    let _ = writeln!(
        o,
        "| measurement | median | floor | met |\n|---|---:|---|:---:|"
    );
    for f in &r.floors {
        let digits = match f.value.abs() {
            v if v < 10.0 => 2,
            v if v < 100.0 => 1,
            _ => 0,
        };
        let _ = writeln!(
            o,
            "| {} | {:.d$} {} | {} | {} |",
            f.measurement,
            f.value,
            f.unit,
            f.floor,
            if f.met { "yes" } else { "**no**" },
            d = digits
        );
    }
    let _ = writeln!(o);

    if let Some(b) = &r.boot {
        let _ = writeln!(o, "## 1. Cold boot\n");
        let _ = writeln!(
            o,
            "A 100 GiB volume whose block map has {} rows ({} as SQLite pages; the replica \
             holds {} files, {} in all, the newest snapshot {}) spread over the whole disk, \
             pointing into one real {} chunk of {DISTINCT} distinct 64 KiB blocks; built once, \
             outside the timed part, in {:.1} s. Each run copies that store afresh, then starts \
             `bucketdisk serve` with an empty `--cache-dir` and {LATENCY} added to every \
             object-store request, connects as soon as the port accepts, does the NBD \
             handshake (NBD_OPT_GO) and one 4 KiB NBD_CMD_READ at offset 0 by hand (no client \
             start-up counted), and checks the bytes against the block's content.\n",
            b.map.rows,
            mb(b.map.map_bytes),
            b.map.replica_files,
            mb(b.map.replica_bytes),
            mb(b.map.snapshot_bytes),
            mb(b.map.chunk_bytes),
            b.map.build_secs
        );
        let _ = writeln!(o, "- server: `{}`", b.server_command);
        let _ = writeln!(o, "- peer: `{}`\n", b.peer_command);
        let _ = writeln!(o, "| measurement | median (min–max), ms |\n|---|---:|");
        let _ = writeln!(
            o,
            "| process start → first read answered | {} |",
            cell(&b.total_ms, 0)
        );
        let _ = writeln!(
            o,
            "| process start → port accepts | {} |",
            cell(&b.listening_ms, 0)
        );
        let _ = writeln!(
            o,
            "| port accepts → handshake + read answered | {} |",
            cell(&b.listening_to_read_ms, 0)
        );
        let _ = writeln!(
            o,
            "| peer: litestream restore + open + lookup of block 0 (no added latency) | {} |\n",
            cell(&b.peer_ms, 0)
        );
        let _ = writeln!(
            o,
            "Per run (ms; \"log\" columns are the server's own timestamps against the spawn time):\n"
        );
        let _ = writeln!(
            o,
            "| run | total | port accepts | → read answered | log: volume ready | log: serving | map hydrated in background (s) | peak RSS (MiB) |\n|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let opt = |v: Option<f64>, d: usize| v.map_or("–".to_string(), |v| format!("{v:.d$}"));
        for (i, run) in b.runs.iter().enumerate() {
            let _ = writeln!(
                o,
                "| {} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} |",
                i + 1,
                run.total_ms,
                run.listening_ms,
                run.listening_to_read_ms,
                opt(run.log_volume_ready_ms, 0),
                opt(run.log_serving_ms, 0),
                opt(run.log_map_hydrated_secs, 2),
                run.peak_rss_bytes >> 20
            );
        }
        let restored = b.peer_runs.first().map_or(0, |p| p.restored_db_bytes);
        let _ = writeln!(
            o,
            "\nThe peer restores the whole map first ({} database) and pays no latency.\n",
            mb(restored)
        );
    }

    if let Some(w) = &r.warm {
        let _ = writeln!(o, "## 2. Warm fio\n");
        let _ = writeln!(
            o,
            "fio's nbd engine, one connection, over the first {} MiB of a 100 GiB volume; each \
             subject's region was filled with 1M writes and read once first (so the object \
             engine's cache is warm). {} s per run after a {} s ramp, {} repeats interleaved \
             round-robin across subjects (servers restarted between repeats; the object \
             engine's cache survives a clean restart). After each write workload, outside the \
             timed part, the object engine's journal is drained (everything uploaded) and the \
             peers' file is fsynced.\n",
            w.settings.size >> 20,
            w.settings.runtime_secs,
            w.settings.ramp_secs,
            r.repeats
        );
        for (name, cmd) in &w.commands {
            let _ = writeln!(o, "- {name}: `{cmd}`");
        }
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "| workload | object engine | local-file engine | qemu-nbd | object ÷ file | floor ≥ 0.9 |\n|---|---:|---:|---:|---:|:---:|"
        );
        for wl in &WORKLOADS {
            let row = |s| {
                w.rows
                    .iter()
                    .find(|x| x.workload == wl.name && x.subject == s)
            };
            let big = wl.bs != "4k";
            let val = |s| {
                row(s).map_or("–".into(), |x| {
                    if big {
                        format!("{} MiB/s", cell(&x.mib_per_sec, 0))
                    } else {
                        format!("{} IOPS", cell(&x.iops, 0))
                    }
                })
            };
            let ratio = row(WarmSubject::Object)
                .zip(row(WarmSubject::File))
                .map(|(a, b)| a.iops.median / b.iops.median);
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} |",
                wl.name,
                val(WarmSubject::Object),
                val(WarmSubject::File),
                val(WarmSubject::QemuNbd),
                ratio.map_or("–".into(), |q| format!("{q:.2}")),
                ratio.map_or("–", |q| if q >= 0.9 { "yes" } else { "**no**" })
            );
        }
        let _ = writeln!(o, "\nDetails (medians):\n");
        let _ = writeln!(
            o,
            "| workload | subject | IOPS | MiB/s | clat p99 µs | server CPU (cores) | other processes (cores) | settle after (s) |\n|---|---|---:|---:|---:|---:|---:|---:|"
        );
        for x in &w.rows {
            let _ = writeln!(
                o,
                "| {} | {} | {:.0} | {:.1} | {:.0} | {:.2} | {:.2} | {} |",
                x.workload,
                x.subject.name(),
                x.iops.median,
                x.mib_per_sec.median,
                x.clat_p99_us.median,
                x.server_cores.median,
                x.other_cores.median,
                x.settle_secs
                    .as_ref()
                    .map_or("–".into(), |s| format!("{:.1}", s.median))
            );
        }
        let _ = writeln!(o);
    }

    if let Some(c) = &r.cold_read {
        let _ = writeln!(o, "## 3. Cold sequential read from the store\n");
        let _ = writeln!(
            o,
            "{} MiB written with 1M sequential writes (fio, {:.0} MB/s acknowledged), then a clean \
             stop ({:.1} s: it uploads everything). Each run restarts the server with an empty \
             cache and reads the {} MiB once, 1M sequential QD8; MB/s = 10⁶ bytes/s.\n",
            c.bytes >> 20,
            c.fill_mb_per_sec,
            c.fill_stop_secs,
            c.bytes >> 20
        );
        let _ = writeln!(o, "| store latency | MB/s, median (min–max) |\n|---|---:|");
        let _ = writeln!(
            o,
            "| {LATENCY} per request (floor ≥ 200) | {} |",
            cell(&c.mb_per_sec, 0)
        );
        let _ = writeln!(
            o,
            "| none (the local store alone) | {} |\n",
            cell(&c.no_latency_mb_per_sec, 0)
        );
    }

    if let Some(s) = &r.sustained {
        let _ = writeln!(o, "## 4. Sustained sequential write with uploads\n");
        let _ = writeln!(
            o,
            "A fresh volume per run; fio writes {} GiB with 1M sequential writes at QD8; the \
             run ends when the local journal is empty (every chunk and the map uploaded), \
             then the server is stopped cleanly. PUTs are the objects created in the store \
             during the run, counted with inotify (objects later deleted by compaction count \
             too). Peak RSS is the server's VmHWM, sampled every 50 ms until it exits.\n",
            s.bytes / GIB
        );
        let _ = writeln!(o, "- server: `{}`\n", s.server_command);
        let _ = writeln!(o, "| measurement | median (min–max) |\n|---|---:|");
        let _ = writeln!(
            o,
            "| written + uploaded, MB/s (floor ≥ 150) | {} |",
            cell(&s.write_and_upload_mb_per_sec, 0)
        );
        let _ = writeln!(
            o,
            "| acknowledged by NBD (fio alone), MB/s | {} |",
            cell(&s.fio_mb_per_sec, 0)
        );
        let _ = writeln!(
            o,
            "| PUTs (chunks + map files) per GiB (floor ≤ 64) | {} |",
            cell(&s.puts_per_gib, 1)
        );
        let _ = writeln!(
            o,
            "| server peak RSS, MiB | {} |\n",
            cell(&s.peak_rss_mib, 0)
        );
        let _ = writeln!(
            o,
            "| run | fio (s) | upload catch-up (s) | clean stop (s) | objects created | files after − before | peak RSS: VmHWM / anon / file-backed (MiB) |\n|---:|---:|---:|---:|---|---:|---:|"
        );
        for (i, run) in s.runs.iter().enumerate() {
            let objects = run
                .objects_created
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                o,
                "| {} | {:.1} | {:.1} | {:.1} | {objects} | {} | {} / {} / {} |",
                i + 1,
                run.fio_secs,
                run.catch_up_secs,
                run.stop_secs,
                run.file_count_delta,
                run.memory.hwm >> 20,
                run.memory.anon >> 20,
                run.memory.file >> 20
            );
        }
        let _ = writeln!(o);
    }

    if let Some(m) = &r.mkfs {
        let _ = writeln!(o, "## 5. mkfs.ext4 on 100 GiB\n");
        let _ = writeln!(
            o,
            "A fresh 100 GiB volume per run, exported by qemu-storage-daemon as a FUSE file with \
             a loop device on it (no nbd kernel module here); only `mkfs.ext4 -F -q` is timed. \
             Peer: the same stack on `--engine file`.\n"
        );
        let _ = writeln!(o, "- `{}`\n", m.command);
        let _ = writeln!(o, "| engine | seconds, median (min–max) |\n|---|---:|");
        let _ = writeln!(o, "| object (floor < 5) | {} |", cell(&m.object_secs, 2));
        let _ = writeln!(o, "| local file | {} |\n", cell(&m.file_secs, 2));
    }

    if let Some(m) = &r.memory {
        let _ = writeln!(o, "## 6. Memory with a fully written 100 GiB volume\n");
        let _ = writeln!(
            o,
            "A map of {} rows (every 64 KiB block of 100 GiB; {} as SQLite pages, built in \
             {:.1} s), served with no added latency: {} random 4 KiB reads of random blocks \
             ({:.1} s, 16 in flight, each verified), then `nbdinfo --map --totals` over the whole \
             disk ({:.1} s: `{}`).\n",
            m.map.rows,
            mb(m.map.map_bytes),
            m.map.build_secs,
            m.random_reads,
            m.random_reads_secs,
            m.block_status_secs,
            m.block_status_totals.replace('\n', " / ")
        );
        let _ = writeln!(o, "- server: `{}`\n", m.server_command);
        let _ = writeln!(o, "| measurement | MiB |\n|---|---:|");
        let _ = writeln!(o, "| RSS after start | {} |", m.rss_after_boot_bytes >> 20);
        let _ = writeln!(
            o,
            "| peak RSS, VmHWM (floor ≤ 256) | {} |",
            m.peak_rss_bytes >> 20
        );
        let _ = writeln!(
            o,
            "| highest anonymous / file-backed RSS sampled | {} / {} |\n",
            m.memory.anon >> 20,
            m.memory.file >> 20
        );
    }

    crate::report::notes_section(&mut o, &r.notes);
    let _ = writeln!(
        o,
        "Raw numbers for every run: `{stem}.json` beside this file."
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_timestamps() {
        let t = log_time("2026-11-26T21:10:04.868074Z  INFO bucketdisk: x").expect("parses");
        // 2026-11-26 is day 20_783 since the epoch.
        let want = 20_783.0 * 86_400.0 + 21.0 * 3600.0 + 10.0 * 60.0 + 4.868074;
        assert!((t - want).abs() < 1e-6, "{t} vs {want}");
        assert!(log_time("garbage").is_none());
    }
}
