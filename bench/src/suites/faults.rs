//! `faults`: what a client sees while the object store misbehaves. One `bucketdisk serve` on
//! moto with `--inject-faults` (a share of store requests answered with 500/503/SlowDown,
//! timed out, stalled, GET bodies closed, cut short or bit-flipped, PUT replies lost) and an
//! outage window (every store request fails), and three fio passes over the same region:
//!
//! - **write pass** (faulty server): random writes of 4k–256k, each block once, crc32c verify
//!   headers, every 64 writes read back and checked (`--verify_backlog`), a FLUSH every 16
//!   writes. Its write rate is capped at region ÷ `--minutes` so that the pass spans the outage
//!   and a minute after it, and the server's journal is small (`--journal-limit`), so that
//!   writes wait on uploads: the outage reaches the client as waiting writes instead of
//!   vanishing into a 4 GiB local journal (a store slower than the cap makes the pass longer);
//! - **read-back under faults** (same server, once its journal drained): `--verify_only`, so
//!   nearly every block comes from the store through the faults (the cache is 64 MiB);
//! - **verify-only on a clean server**: the faulty server stopped cleanly (SIGTERM: it uploads
//!   everything), a new server without faults on a new empty cache, `--verify_only` again. A
//!   block that fails here and whose write was acknowledged is lost data.
//!
//! fio regenerates the same write sequence in both verify-only passes (same options, fio's
//! default seeds; no `--verify_backlog`, see [`verify_options`]); a block whose write fio saw
//! fail (EIO) was never acknowledged, so a verification failure there is expected and counted
//! apart. Reads may fail with EIO; they must never return wrong bytes.

use crate::process::{
    ServerProcess, check_interrupted, die_with_parent, free_loopback_port, wait_with_timeout,
};
use crate::progress::Progress;
use crate::run_info::RunInfo;
use crate::server_metrics::{self, Sampler, Scrape};
use crate::store_subjects::{self, Env};
use crate::workspace::{Places, bucketdisk_binary, fresh_dir, workspace_root};
use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The store's prefix in the suites' bucket.
const PREFIX: &str = "faults";
const VOLUME: &str = "disk";
const GIB: u64 = 1 << 30;
const MIB: f64 = 1_048_576.0;
/// Small, so that reads of blocks uploaded and evicted go to the store.
const CACHE_SIZE: &str = "64M";
/// Faults the plan injects besides errors: how late a stalled answer comes, how long a
/// timed-out request waits before its error.
const STALL: &str = "2s";
const TIMEOUT: &str = "5s";
/// The faulty store may fail the server's first requests; it retries them.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// A clean stop uploads what the journal holds, through whatever the store still does.
const STOP_GRACE: Duration = Duration::from_secs(600);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);
/// A verify-only pass reads the region once; far longer than that is a hang.
const READ_PASS_TIMEOUT: Duration = Duration::from_secs(3600);
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
const TIMELINE_STEP_SECS: f64 = 10.0;
const TIMELINE_ROWS: f64 = 60.0;
/// How long the write pass must keep going after the outage ends, to show it resumed.
const AFTER_OUTAGE_SECS: u64 = 60;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How long the write pass lasts at least: fio's write rate is capped at region ÷ this (a
    /// store slower than that makes it longer).
    #[arg(long, default_value_t = 6)]
    minutes: u64,
    /// Share of object-store requests that get a fault.
    #[arg(long, default_value_t = 0.1)]
    rate: f64,
    /// Seed of the fault schedule.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Seconds after the server starts when every store request starts failing.
    #[arg(long, default_value_t = 90)]
    outage_at: u64,
    /// Seconds the outage lasts.
    #[arg(long, default_value_t = 30)]
    outage_secs: u64,
    /// GiB fio writes, once each, in random order.
    #[arg(long, default_value_t = 2)]
    region: u64,
    /// The faulty server's --journal-limit: written data waiting for upload beyond this makes
    /// writes wait for the store (the server's default, 4G, would hold the whole region).
    #[arg(long, default_value = "64M")]
    journal_limit: String,
    #[command(flatten)]
    places: Places,
}

/// A started `bucketdisk serve`.
struct Server {
    process: ServerProcess,
    uri: String,
    metrics: SocketAddr,
    command_line: String,
    log: PathBuf,
}

/// `bucketdisk serve` of the volume under [`PREFIX`] with a small cache and its metrics on a
/// free port, faults injected by `plan` if given; waits until it serves.
fn serve(
    env: &Env,
    cache: &Path,
    log: &Path,
    journal_limit: &str,
    plan: Option<&str>,
) -> Result<Server> {
    let port = free_loopback_port()?;
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()?));
    let mut cmd = store_subjects::bucketdisk_s3_at(env, PREFIX, port, cache);
    cmd.args(["--cache-size", CACHE_SIZE, "--journal-limit", journal_limit])
        .arg("--metrics")
        .arg(metrics.to_string());
    if let Some(plan) = plan {
        cmd.arg("--inject-faults").arg(plan);
    }
    let command_line =
        store_subjects::describe(&cmd).replace(&env.work.display().to_string(), "WORK");
    let mut process = ServerProcess::spawn("bucketdisk", cmd, log)?;
    process.wait_until_serving(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), START_TIMEOUT)?;
    Ok(Server {
        process,
        uri: format!("nbd://127.0.0.1:{port}/{VOLUME}"),
        metrics,
        command_line,
        log: log.to_path_buf(),
    })
}

/// What every pass shares: the verify-only passes must regenerate the write pass's exact
/// sequence of offsets, sizes and contents (same options, fio's default seeds). Errors do not
/// stop fio; `--error_dump=1` makes it print each one with its offset, which tells the write
/// errors apart from the acknowledged writes.
fn common_options(region_bytes: u64) -> Vec<String> {
    [
        "--name=faults",
        "--ioengine=nbd",
        "--rw=randwrite",
        "--bsrange=4k-256k",
        "--iodepth=8",
        "--numjobs=1",
        "--verify=crc32c",
        "--do_verify=1",
        "--fsync=16",
        "--continue_on_error=all",
        "--verify_fatal=0",
        "--error_dump=1",
        "--output-format=json",
    ]
    .into_iter()
    .map(String::from)
    .chain([format!("--size={region_bytes}")])
    .collect()
}

/// The write pass: every 64 writes read back and checked, the write rate capped.
fn write_options(region_bytes: u64, rate: u64) -> Vec<String> {
    let mut options = common_options(region_bytes);
    options.extend(["--verify_backlog=64".to_string(), format!("--rate=,{rate}")]);
    options
}

/// A verify-only pass: the writes are replayed without I/O, then every block is read and
/// checked. Without `--verify_backlog`: in fio 3.33's dry run the backlog's reads are "done"
/// without I/O too and take their blocks out of the history, so only the last few dozen
/// blocks would really be read.
fn verify_options(region_bytes: u64) -> Vec<String> {
    let mut options = common_options(region_bytes);
    options.push("--verify_only".to_string());
    options
}

/// One side (read, write or sync) of a fio job.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Side {
    /// Requests issued, failed ones included.
    ios: u64,
    /// Bytes moved by the requests that succeeded.
    bytes: u64,
    /// The longest submission → completion time of one request.
    max_latency_ms: f64,
}

/// Requests fio saw fail, by direction (from its error dump).
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct IoErrors {
    read: u64,
    write: u64,
    sync: u64,
    other: u64,
}

impl IoErrors {
    fn total(&self) -> u64 {
        self.read + self.write + self.sync + self.other
    }
}

/// One fio run.
#[derive(Debug, Clone, Serialize)]
struct FioPass {
    command: String,
    /// Seconds after the faulty server started (the outage's clock) when fio started and
    /// ended; for the clean server's pass, after that server started.
    started_secs: f64,
    ended_secs: f64,
    exit: String,
    /// fio's `total_err` (I/O errors and verification failures) and its first error's errno.
    total_err: u64,
    first_error: i64,
    read: Side,
    write: Side,
    sync: Side,
    io_errors: IoErrors,
    /// Distinct blocks whose verification failed (fio's "requested block" of each failure).
    verify_failed_blocks: u64,
    /// Lines that say a verification failed without naming a block (each counts as one).
    unattributed_verify_lines: u64,
    /// The first verification failure lines, as fio printed them.
    verify_failure_lines: Vec<String>,
    #[serde(skip)]
    failed_writes: BTreeSet<u64>,
    #[serde(skip)]
    failed_verifies: BTreeSet<u64>,
}

impl FioPass {
    fn wall_secs(&self) -> f64 {
        self.ended_secs - self.started_secs
    }

    /// Verification failures in blocks whose write was acknowledged (fio saw no error for it
    /// in `failed_writes`), and in blocks whose write failed.
    fn wrong_bytes(&self, failed_writes: &BTreeSet<u64>) -> WrongBytes {
        let unacknowledged = self.failed_verifies.intersection(failed_writes).count() as u64;
        WrongBytes {
            acknowledged: self.failed_verifies.len() as u64 - unacknowledged
                + self.unattributed_verify_lines,
            unacknowledged,
        }
    }
}

/// Verification failures, split by whether the client had been told the write succeeded.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct WrongBytes {
    /// Wrong bytes where a write was acknowledged: data lost or corrupted.
    acknowledged: u64,
    /// Blocks whose write failed with an error: their content is undefined, no loss.
    unacknowledged: u64,
}

/// Runs fio with `args` (JSON on stdout into `<name>.json`, errors on stderr into
/// `<name>.err`: fio's `--output` would interleave the two), killing it after `timeout`.
fn run_fio(
    args: &[String],
    dir: &Path,
    name: &str,
    t0: Instant,
    timeout: Duration,
) -> Result<FioPass> {
    let json_path = dir.join(format!("{name}.json"));
    let err_path = dir.join(format!("{name}.err"));
    let stdout =
        File::create(&json_path).with_context(|| format!("creating {}", json_path.display()))?;
    let stderr =
        File::create(&err_path).with_context(|| format!("creating {}", err_path.display()))?;
    let mut cmd = Command::new("fio");
    // fio leaves its verify state files (`<job>-<n>-verify.state`) in its working directory.
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    die_with_parent(&mut cmd);
    let started_secs = t0.elapsed().as_secs_f64();
    let mut child = cmd.spawn().context("starting fio (is it installed?)")?;
    let status = wait_with_timeout(&mut child, &format!("fio {name}"), timeout)?;
    let ended_secs = t0.elapsed().as_secs_f64();
    let json = std::fs::read_to_string(&json_path)
        .with_context(|| format!("reading {}", json_path.display()))?;
    let errors = std::fs::read_to_string(&err_path)
        .with_context(|| format!("reading {}", err_path.display()))?;
    let mut pass = parse_json(&json)
        .with_context(|| format!("fio {name} ({status}): {}", tail(&errors, 10)))?;
    parse_errors(&errors, &mut pass);
    pass.command = describe_fio(args);
    pass.started_secs = started_secs;
    pass.ended_secs = ended_secs;
    pass.exit = status.to_string();
    Ok(pass)
}

fn describe_fio(args: &[String]) -> String {
    std::iter::once("fio")
        .chain(args.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ")
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// fio's JSON (after any notes it prints first, e.g. "fio: connected to NBD server").
fn parse_json(text: &str) -> Result<FioPass> {
    let start = text
        .lines()
        .position(|l| l.starts_with('{'))
        .context("no JSON in fio's output")?;
    let json = text.lines().skip(start).collect::<Vec<_>>().join("\n");
    let doc: serde_json::Value = serde_json::from_str(&json).context("fio's JSON")?;
    let job = doc
        .get("jobs")
        .and_then(|j| j.get(0))
        .context("fio output has no jobs")?;
    let num = |v: &serde_json::Value, path: &[&str]| -> f64 {
        path.iter()
            .try_fold(v, |v, k| v.get(k))
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
    };
    let side = |name: &str| -> Side {
        let s = job.get(name).unwrap_or(&serde_json::Value::Null);
        Side {
            ios: num(s, &["total_ios"]) as u64,
            bytes: num(s, &["io_bytes"]) as u64,
            max_latency_ms: num(s, &["lat_ns", "max"]) / 1e6,
        }
    };
    Ok(FioPass {
        command: String::new(),
        started_secs: 0.0,
        ended_secs: 0.0,
        exit: String::new(),
        total_err: num(job, &["total_err"]) as u64,
        first_error: num(job, &["first_error"]) as i64,
        read: side("read"),
        write: side("write"),
        sync: side("sync"),
        io_errors: IoErrors::default(),
        verify_failed_blocks: 0,
        unattributed_verify_lines: 0,
        verify_failure_lines: Vec::new(),
        failed_writes: BTreeSet::new(),
        failed_verifies: BTreeSet::new(),
    })
}

/// The number after `key` in `line` (`offset=123,` → 123).
fn number_after(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// A line of fio's that says a verification failed: `verify: bad magic header …`,
/// `verify: bad header …`, `crc32c: verify failed at …` (its "Expected/Received CRC" lines
/// that follow are not counted again).
fn is_verify_failure(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    l.contains("verify") && (l.contains("bad") || l.contains("failed") || l.contains("mismatch"))
}

/// Counts fio's error dump (`fio: io_u error on file F: Input/output error: write
/// offset=N, buflen=L`) by direction, noting the failed writes' offsets, and its verification
/// failures by block.
fn parse_errors(text: &str, pass: &mut FioPass) {
    for line in text.lines() {
        // A verification failure is an EILSEQ to fio; it is counted below, by block.
        if line.contains("io_u error") && !line.contains("multibyte") {
            let direction = line
                .find(" offset=")
                .and_then(|at| line[..at].split_whitespace().last())
                .unwrap_or("");
            match direction {
                "read" => pass.io_errors.read += 1,
                "write" => {
                    pass.io_errors.write += 1;
                    if let Some(offset) = number_after(line, " offset=") {
                        pass.failed_writes.insert(offset);
                    }
                }
                "sync" | "datasync" => pass.io_errors.sync += 1,
                _ => pass.io_errors.other += 1,
            }
        } else if is_verify_failure(line) {
            match number_after(line, "requested block: offset=") {
                Some(offset) => {
                    pass.failed_verifies.insert(offset);
                }
                None => pass.unattributed_verify_lines += 1,
            }
            if pass.verify_failure_lines.len() < 20 {
                pass.verify_failure_lines.push(line.trim().to_string());
            }
        }
    }
    pass.verify_failed_blocks = pass.failed_verifies.len() as u64;
}

/// Counters from one scrape of the server's metrics (0 for a series it does not export).
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Counters {
    reads: u64,
    writes: u64,
    flushes: u64,
    read_errors: u64,
    write_errors: u64,
    flush_errors: u64,
    store_retries: u64,
    damaged_refetches: u64,
    block_fetches: u64,
    block_gets: u64,
    uploaded_bytes: u64,
    /// A gauge: written bytes not yet uploaded, at the scrape.
    dirty_bytes: u64,
}

impl Counters {
    fn of(s: &Scrape) -> Counters {
        let get = |name: &str| s.get(name).unwrap_or(0.0) as u64;
        let by = |name: &str, command: &str| {
            s.labeled(name, &format!("command=\"{command}\""))
                .unwrap_or(0.0) as u64
        };
        Counters {
            reads: by("bucketdisk_requests_total", "read"),
            writes: by("bucketdisk_requests_total", "write"),
            flushes: by("bucketdisk_requests_total", "flush"),
            read_errors: by("bucketdisk_request_errors_total", "read"),
            write_errors: by("bucketdisk_request_errors_total", "write"),
            flush_errors: by("bucketdisk_request_errors_total", "flush"),
            store_retries: get("bucketdisk_store_retries_total"),
            damaged_refetches: get("bucketdisk_store_damaged_block_refetches_total"),
            block_fetches: get("bucketdisk_store_block_fetches_total"),
            block_gets: get("bucketdisk_store_block_gets_total"),
            uploaded_bytes: get("bucketdisk_upload_journal_bytes_total"),
            dirty_bytes: get("bucketdisk_dirty_bytes"),
        }
    }

    fn scrape(addr: SocketAddr) -> Result<Counters> {
        Ok(Counters::of(&server_metrics::scrape(addr)?))
    }

    /// What the counters gained since `before` (the gauge as it is now).
    fn since(&self, before: &Counters) -> Counters {
        Counters {
            reads: self.reads.saturating_sub(before.reads),
            writes: self.writes.saturating_sub(before.writes),
            flushes: self.flushes.saturating_sub(before.flushes),
            read_errors: self.read_errors.saturating_sub(before.read_errors),
            write_errors: self.write_errors.saturating_sub(before.write_errors),
            flush_errors: self.flush_errors.saturating_sub(before.flush_errors),
            store_retries: self.store_retries.saturating_sub(before.store_retries),
            damaged_refetches: self
                .damaged_refetches
                .saturating_sub(before.damaged_refetches),
            block_fetches: self.block_fetches.saturating_sub(before.block_fetches),
            block_gets: self.block_gets.saturating_sub(before.block_gets),
            uploaded_bytes: self.uploaded_bytes.saturating_sub(before.uploaded_bytes),
            dirty_bytes: self.dirty_bytes,
        }
    }

    fn errors(&self) -> u64 {
        self.read_errors + self.write_errors + self.flush_errors
    }
}

/// One scrape of the faulty server, seconds after its start.
#[derive(Debug, Clone, Copy, Serialize)]
struct Sample {
    t_secs: f64,
    /// False when the scrape failed (the counters are then zero and skipped).
    scraped: bool,
    counters: Counters,
}

fn sample(addr: SocketAddr, t0: Instant) -> Sample {
    let scraped = Counters::scrape(addr);
    Sample {
        t_secs: t0.elapsed().as_secs_f64(),
        scraped: scraped.is_ok(),
        counters: scraped.unwrap_or_default(),
    }
}

/// The last successful scrape at or before `t` seconds.
fn at(samples: &[Sample], t: f64) -> Option<&Sample> {
    samples.iter().rev().find(|s| s.scraped && s.t_secs <= t)
}

/// Waits until nothing written waits for upload (no dirty bytes, no upload lag).
fn wait_drained(server: &mut Server) -> Result<()> {
    let started = Instant::now();
    loop {
        check_interrupted()?;
        server.process.ensure_running()?;
        let scrape = server_metrics::scrape(server.metrics)?;
        let dirty = scrape.get("bucketdisk_dirty_bytes").unwrap_or(0.0);
        let lag = scrape.get("bucketdisk_upload_lag_records").unwrap_or(0.0);
        if dirty == 0.0 && lag == 0.0 {
            return Ok(());
        }
        if started.elapsed() > DRAIN_TIMEOUT {
            bail!("the journal did not drain within {DRAIN_TIMEOUT:?} ({dirty} bytes dirty)");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The server's last words: `injected store faults: requests=N outage=N 500=N … retried=N`.
#[derive(Debug, Clone, Default, Serialize)]
struct Injected {
    requests: u64,
    outage_failures: u64,
    /// Faults by kind, as the server names them, in its order.
    by_kind: Vec<(String, u64)>,
    /// Store requests the server's retry layer retried.
    retried: u64,
}

impl Injected {
    fn total(&self) -> u64 {
        self.by_kind.iter().map(|(_, n)| n).sum()
    }
}

fn parse_injected(log: &str) -> Option<Injected> {
    const MARK: &str = "injected store faults:";
    let line = log.lines().rev().find(|l| l.contains(MARK))?;
    let mut injected = Injected::default();
    for (key, value) in line[line.find(MARK)? + MARK.len()..]
        .split_whitespace()
        .filter_map(|word| word.split_once('='))
    {
        let Ok(n) = value.parse::<u64>() else {
            continue;
        };
        match key {
            "requests" => injected.requests = n,
            "outage" => injected.outage_failures = n,
            "retried" => injected.retried = n,
            kind => injected.by_kind.push((kind.to_string(), n)),
        }
    }
    Some(injected)
}

/// Whether the server came back by itself after the outage, from its metrics.
#[derive(Debug, Clone, Default, Serialize)]
struct Resumption {
    /// The outage, in seconds after the faulty server started.
    outage_start_secs: f64,
    outage_end_secs: f64,
    /// Client writes answered during the outage (the journal takes them until it is full).
    writes_during_outage: u64,
    /// Client writes answered from the outage's end to the write pass's end.
    writes_after_outage: u64,
    /// Seconds the write pass went on after the outage ended.
    write_pass_after_outage_secs: f64,
    /// Seconds from the outage's end to the first upload that completed after it.
    first_upload_after_outage_secs: Option<f64>,
    /// Written bytes uploaded from the outage's end to the clean stop.
    uploaded_after_outage_bytes: u64,
    /// Seconds after the server started when its journal had drained, after the write pass.
    drained_at_secs: f64,
    resumed: bool,
}

fn resumption(
    samples: &[Sample],
    args: &Args,
    write_pass: &FioPass,
    drained_at: f64,
) -> Resumption {
    let start = args.outage_at as f64;
    let end = start + args.outage_secs as f64;
    let counter = |t: f64, f: fn(&Counters) -> u64| at(samples, t).map_or(0, |s| f(&s.counters));
    let writes = |t: f64| counter(t, |c| c.writes);
    let uploaded = |t: f64| counter(t, |c| c.uploaded_bytes);
    let at_end = uploaded(end);
    let first_upload = samples
        .iter()
        .find(|s| s.scraped && s.t_secs >= end && s.counters.uploaded_bytes > at_end)
        .map(|s| s.t_secs - end);
    let last = samples.iter().rev().find(|s| s.scraped);
    let uploaded_after = last.map_or(0, |s| s.counters.uploaded_bytes.saturating_sub(at_end));
    let writes_after = writes(write_pass.ended_secs).saturating_sub(writes(end));
    let after_secs = (write_pass.ended_secs - end).max(0.0);
    Resumption {
        outage_start_secs: start,
        outage_end_secs: end,
        writes_during_outage: writes(end).saturating_sub(writes(start)),
        writes_after_outage: writes_after,
        write_pass_after_outage_secs: after_secs,
        first_upload_after_outage_secs: first_upload,
        uploaded_after_outage_bytes: uploaded_after,
        drained_at_secs: drained_at,
        resumed: first_upload.is_some() && writes_after > 0,
    }
}

/// One line of the verdict: a claim, what the run measured, and whether it holds.
#[derive(Debug, Clone, Serialize)]
struct Check {
    claim: String,
    value: String,
    met: bool,
}

/// Metric deltas per phase of the faulty server, and of the clean one.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct PhaseCounters {
    write_pass: Counters,
    read_back: Counters,
    /// The faulty server from its start to its stop.
    faulty_total: Counters,
    clean_verify: Counters,
}

#[derive(Debug, Serialize)]
struct Report {
    #[serde(flatten)]
    run: RunInfo,
    plan: String,
    region_bytes: u64,
    write_rate_bytes_per_sec: u64,
    journal_limit: String,
    cache_size: &'static str,
    faulty_server: String,
    clean_server: String,
    write_job: String,
    verify_job: String,
    write_pass: FioPass,
    read_back: FioPass,
    clean_verify: FioPass,
    wrong_bytes_write_pass: WrongBytes,
    wrong_bytes_read_back: WrongBytes,
    wrong_bytes_clean_verify: WrongBytes,
    counters: PhaseCounters,
    injected: Option<Injected>,
    drain_secs: f64,
    stop_secs: f64,
    stop_status: String,
    resumption: Resumption,
    checks: Vec<Check>,
    samples: Vec<Sample>,
}

/// The plan handed to `--inject-faults`.
fn plan(args: &Args) -> String {
    format!(
        "seed={},rate={},stall={STALL},timeout={TIMEOUT},outage={}s+{}s",
        args.seed, args.rate, args.outage_at, args.outage_secs
    )
}

fn check_args(args: &Args) -> Result<()> {
    ensure!(
        (0.0..=1.0).contains(&args.rate),
        "--rate is a share of requests, between 0 and 1"
    );
    ensure!(
        args.region > 0 && args.minutes > 0,
        "--region and --minutes must be positive"
    );
    let needed = args.outage_at + args.outage_secs + AFTER_OUTAGE_SECS;
    ensure!(
        args.minutes * 60 >= needed,
        "the write pass ({} s) must span the outage's end and {AFTER_OUTAGE_SECS} s after it \
         ({needed} s): raise --minutes or move the outage",
        args.minutes * 60
    );
    Ok(())
}

pub fn run(args: Args, command: String) -> Result<()> {
    check_args(&args)?;
    let workspace = workspace_root();
    let bin = bucketdisk_binary(args.places.bucketdisk.as_deref(), &workspace)?;
    let tmp = args.places.scratch("bucketdisk-faults-")?;
    let mut run = RunInfo::begin(command, &bin, &workspace, tmp.path())?;
    let (env, mut moto, _proxy) = Env::on_moto(bin, tmp.path())?;
    let work = env.work.clone();
    let region_bytes = args.region * GIB;
    let write_rate = (region_bytes / (args.minutes * 60)).max(1);
    let plan = plan(&args);
    let write_job = write_options(region_bytes, write_rate);
    let verify_job = verify_options(region_bytes);
    let mut progress = Progress::new(5);

    progress.note(&format!("starting the faulty server ({plan})"));
    let cache = fresh_dir(&work, "faulty-cache")?;
    // The outage's clock starts when the server wraps its store, right after its start.
    let t0 = Instant::now();
    let mut server = serve(
        &env,
        &cache,
        &work.join("faulty-server.log"),
        &args.journal_limit,
        Some(&plan),
    )?;
    let metrics = server.metrics;
    let sampler = Sampler::start(SAMPLE_EVERY, move |_, _| sample(metrics, t0));
    let at_start = Counters::scrape(metrics)?;

    progress.step(&format!(
        "write pass: {} GiB at ≤ {:.1} MiB/s, outage at {} s for {} s",
        args.region,
        write_rate as f64 / MIB,
        args.outage_at,
        args.outage_secs
    ));
    let mut write_args = write_job.clone();
    write_args.push(format!("--uri={}", server.uri));
    let write_timeout =
        Duration::from_secs(3 * args.minutes * 60 + args.outage_at + args.outage_secs + 600);
    let write_pass = run_fio(&write_args, &work, "write-pass", t0, write_timeout)?;
    server.process.ensure_running()?;
    let after_write = Counters::scrape(metrics)?;
    progress.step_done();
    eprintln!(
        "faults: write pass {:.0} s, {} write errors, {} read errors, {} blocks failed \
         verification",
        write_pass.wall_secs(),
        write_pass.io_errors.write,
        write_pass.io_errors.read,
        write_pass.verify_failed_blocks
    );

    check_interrupted()?;
    progress.step("waiting for the journal to drain");
    let drain_started = Instant::now();
    wait_drained(&mut server)?;
    let drain_secs = drain_started.elapsed().as_secs_f64();
    let drained_at = t0.elapsed().as_secs_f64();
    progress.step_done();

    check_interrupted()?;
    progress.step("read-back under faults (verify-only, journal drained)");
    let mut read_args = verify_job.clone();
    read_args.push(format!("--uri={}", server.uri));
    let read_back = run_fio(&read_args, &work, "read-back", t0, READ_PASS_TIMEOUT)?;
    server.process.ensure_running()?;
    let after_read = Counters::scrape(metrics)?;
    progress.step_done();

    progress.step("clean stop of the faulty server (uploads everything)");
    let samples = sampler.finish();
    let faulty_server = server.command_line.clone();
    let log = server.log.clone();
    let stop_started = Instant::now();
    let stop_status = server.process.stop_within(STOP_GRACE)?;
    let stop_secs = stop_started.elapsed().as_secs_f64();
    let log_text =
        std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
    let injected = parse_injected(&log_text);
    progress.step_done();

    check_interrupted()?;
    moto.ensure_running()?;
    progress.step("verify-only on a clean server, empty cache, no faults");
    let clean_cache = fresh_dir(&work, "clean-cache")?;
    let t1 = Instant::now();
    let mut clean = serve(
        &env,
        &clean_cache,
        &work.join("clean-server.log"),
        &args.journal_limit,
        None,
    )?;
    let clean_before = Counters::scrape(clean.metrics)?;
    let mut verify_args = verify_job.clone();
    verify_args.push(format!("--uri={}", clean.uri));
    let clean_verify = run_fio(&verify_args, &work, "clean-verify", t1, READ_PASS_TIMEOUT)?;
    clean.process.ensure_running()?;
    let clean_counters = Counters::scrape(clean.metrics)?.since(&clean_before);
    let clean_server = clean.command_line.clone();
    clean.process.stop_within(STOP_GRACE)?;
    progress.step_done();
    progress.finish();
    run.finish();

    let failed_writes = &write_pass.failed_writes;
    let counters = PhaseCounters {
        write_pass: after_write.since(&at_start),
        read_back: after_read.since(&after_write),
        faulty_total: after_read.since(&Counters::default()),
        clean_verify: clean_counters,
    };
    let resumption = resumption(&samples, &args, &write_pass, drained_at);
    let mut report = Report {
        run,
        plan,
        region_bytes,
        write_rate_bytes_per_sec: write_rate,
        journal_limit: args.journal_limit.clone(),
        cache_size: CACHE_SIZE,
        faulty_server,
        clean_server,
        write_job: describe_fio(&write_job),
        verify_job: describe_fio(&verify_job),
        wrong_bytes_write_pass: write_pass.wrong_bytes(failed_writes),
        wrong_bytes_read_back: read_back.wrong_bytes(failed_writes),
        wrong_bytes_clean_verify: clean_verify.wrong_bytes(failed_writes),
        write_pass,
        read_back,
        clean_verify,
        counters,
        injected,
        drain_secs,
        stop_secs,
        stop_status: stop_status.to_string(),
        resumption,
        checks: Vec::new(),
        samples,
    };
    report.checks = checks(&report, stop_status.success());
    let out_dir = args.places.out_dir(&workspace);
    let stem = report.run.stem("faults");
    let md = markdown(&report, &stem);
    crate::report::write_md_json(&out_dir, &stem, &md, &report)?;
    print!("{md}");
    let failed: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| !c.met)
        .map(|c| c.claim.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("claims not met: {}", failed.join("; "));
    }
    Ok(())
}

/// The claims the run stands for, each with what it measured.
fn checks(r: &Report, clean_stop: bool) -> Vec<Check> {
    let w = &r.write_pass;
    let c = &r.clean_verify;
    let res = &r.resumption;
    vec![
        Check {
            claim: "no wrong bytes returned during the write pass".into(),
            value: format!(
                "{} blocks failed verification of {} read back",
                r.wrong_bytes_write_pass.acknowledged + r.wrong_bytes_write_pass.unacknowledged,
                w.read.ios
            ),
            met: r.wrong_bytes_write_pass.acknowledged + r.wrong_bytes_write_pass.unacknowledged
                == 0,
        },
        Check {
            claim: "no wrong bytes returned by the read-back under faults".into(),
            value: format!(
                "{} acknowledged blocks failed verification of {} read ({} EIO)",
                r.wrong_bytes_read_back.acknowledged,
                r.read_back.read.ios,
                r.read_back.io_errors.read
            ),
            met: r.wrong_bytes_read_back.acknowledged == 0,
        },
        Check {
            claim: "nothing acknowledged lost: verify-only on a clean server reads every \
                    acknowledged block back right"
                .into(),
            value: format!(
                "{} acknowledged blocks wrong, {} read errors, of {} read",
                r.wrong_bytes_clean_verify.acknowledged,
                c.io_errors.total(),
                c.read.ios
            ),
            met: r.wrong_bytes_clean_verify.acknowledged == 0 && c.io_errors.total() == 0,
        },
        Check {
            claim: "the verify-only passes read every block (server's reads ≥ fio's)".into(),
            value: format!(
                "read-back: {} answered for fio's {}; clean verify: {} for {}",
                r.counters.read_back.reads,
                r.read_back.read.ios,
                r.counters.clean_verify.reads,
                c.read.ios
            ),
            met: r.read_back.read.ios > 0
                && r.counters.read_back.reads >= r.read_back.read.ios
                && r.counters.clean_verify.reads >= c.read.ios,
        },
        Check {
            claim: "no client request hangs: every pass ends by itself".into(),
            value: format!(
                "longest request {:.1} s; passes took {:.0} s, {:.0} s, {:.0} s",
                [w.write, w.read, w.sync, r.read_back.read]
                    .iter()
                    .map(|s| s.max_latency_ms)
                    .fold(0.0, f64::max)
                    / 1000.0,
                w.wall_secs(),
                r.read_back.wall_secs(),
                c.wall_secs()
            ),
            met: true,
        },
        Check {
            claim: "the server resumes by itself after the outage".into(),
            value: format!(
                "first upload {} after the outage ended; {} client writes answered in the {:.0} s \
                 after it; journal drained {:.0} s after the write pass",
                res.first_upload_after_outage_secs
                    .map_or_else(|| "never".to_string(), |s| format!("{s:.1} s")),
                res.writes_after_outage,
                res.write_pass_after_outage_secs,
                r.drain_secs
            ),
            met: res.resumed,
        },
        Check {
            claim: "clean stop (SIGTERM) with the fault count logged".into(),
            value: format!("{} after {:.1} s", r.stop_status, r.stop_secs),
            met: clean_stop && r.injected.is_some(),
        },
    ]
}

fn markdown(r: &Report, stem: &str) -> String {
    let mut md = String::new();
    r.run.header(
        &mut md,
        "faults: fio verify through injected store faults and an outage",
        &[
            ("fio", r.run.tools.fio.clone()),
            ("moto", crate::moto::version_line()),
            ("bucketdisk", r.run.tools.bucketdisk_line()),
        ],
    );
    let _ = writeln!(
        md,
        "## Verdict\n\n| claim | measured | met |\n|---|---|:---:|"
    );
    for c in &r.checks {
        let met = if c.met { "yes" } else { "**no**" };
        let _ = writeln!(md, "| {} | {} | {met} |", c.claim, c.value);
    }
    setup(&mut md, r);
    table(&mut md, r);
    timeline(&mut md, r);
    failure_lines(&mut md, r);
    let _ = writeln!(
        md,
        "\nRaw numbers, every metrics sample included: `{stem}.json` beside this file."
    );
    md
}

fn setup(md: &mut String, r: &Report) {
    let _ = writeln!(
        md,
        "\n## Setup\n\n\
         moto (no added latency), store `s3://{}/{PREFIX}`, a 100 GiB volume created on the \
         first start. Fault plan: `{}` — that share of every kind of store request gets one \
         fault (500, 503, SlowDown, a timeout, a stall, and for GETs a body closed midway, cut \
         short or with a bit flipped, for PUTs a lost reply), and every request fails during \
         the outage window, whose clock starts when the server starts.\n\n\
         - faulty server (cache {CACHE_SIZE}; journal limit {}: written data beyond it waits \
           for uploads, so the outage and slow uploads reach the client as waiting writes): \
           `{}`\n\
         - clean server (no faults, new empty cache): `{}`\n\
         - write pass: `{} --uri=…`\n\
         - verify-only passes: `{} --uri=…`\n\n\
         1. **write pass** on the faulty server, its write rate capped at {:.2} MiB/s (the \
            region over {:.0} s; the store may make it slower): every block written once in \
            random order, each 64 writes read back and checked, a FLUSH every 16 writes;\n\
         2. the journal drains (nothing dirty, no upload lag);\n\
         3. **read-back under faults** on the same server, verify-only: everything read once \
            and checked; with a {CACHE_SIZE} cache nearly every block comes from the store;\n\
         4. SIGTERM: a clean stop uploads everything and logs what was injected;\n\
         5. **verify-only on a clean server**.\n\n\
         A verify-only pass replays the write pass's sequence without I/O, then reads every \
         block and checks it. It runs without `--verify_backlog`: with it, fio 3.33's replay \
         \"completes\" the backlog's reads without I/O and drops those blocks, and only the \
         last few dozen would be read (the server's read count is checked against fio's). A \
         block whose write fio saw fail was never acknowledged: a verification failure there is \
         counted apart, not as loss. EIO is an allowed answer; wrong bytes are not.",
        store_subjects::BUCKET,
        r.plan,
        r.journal_limit,
        r.faulty_server,
        r.clean_server,
        r.write_job,
        r.verify_job,
        r.write_rate_bytes_per_sec as f64 / MIB,
        r.region_bytes as f64 / r.write_rate_bytes_per_sec as f64,
    );
}

fn ms(side: &Side) -> String {
    format!("{:.0} ms", side.max_latency_ms)
}

fn table(md: &mut String, r: &Report) {
    let w = &r.write_pass;
    let b = &r.read_back;
    let c = &r.clean_verify;
    let k = &r.counters;
    let res = &r.resumption;
    let _ = writeln!(md, "\n## Results\n\n| | |\n|---|---|");
    let mut row = |what: &str, value: String| {
        let _ = writeln!(md, "| {what} | {value} |");
    };
    match &r.injected {
        Some(inj) => {
            row(
                "store requests through the fault injector",
                inj.requests.to_string(),
            );
            row(
                "faults injected (total)",
                format!(
                    "{} ({:.1} % of requests)",
                    inj.total(),
                    100.0 * inj.total() as f64 / inj.requests.max(1) as f64
                ),
            );
            for (kind, n) in &inj.by_kind {
                row(&format!("· {kind}"), n.to_string());
            }
            row(
                "requests failed by the outage",
                format!(
                    "{} ({:.0} → {:.0} s after the server started)",
                    inj.outage_failures, res.outage_start_secs, res.outage_end_secs
                ),
            );
            row(
                "store requests retried",
                format!(
                    "{} (server's retry count; `bucketdisk_store_retries_total` {})",
                    inj.retried, k.faulty_total.store_retries
                ),
            );
        }
        None => row(
            "faults injected",
            "**the server did not log its fault count**".into(),
        ),
    }
    row(
        "damaged blocks refetched",
        format!(
            "{} (write pass {}, read-back {})",
            k.faulty_total.damaged_refetches,
            k.write_pass.damaged_refetches,
            k.read_back.damaged_refetches
        ),
    );
    row(
        "blocks fetched from the store (GETs)",
        format!(
            "write pass {} ({}), read-back {} ({})",
            k.write_pass.block_fetches,
            k.write_pass.block_gets,
            k.read_back.block_fetches,
            k.read_back.block_gets
        ),
    );
    row(
        "EIOs returned to the client (server's `bucketdisk_request_errors_total`)",
        format!(
            "write pass: {} read, {} write, {} flush · read-back: {} read",
            k.write_pass.read_errors,
            k.write_pass.write_errors,
            k.write_pass.flush_errors,
            k.read_back.read_errors
        ),
    );
    row(
        "EIOs fio saw",
        format!(
            "write pass: {} read, {} write, {} flush · read-back: {} read · clean verify: {} read",
            w.io_errors.read,
            w.io_errors.write,
            w.io_errors.sync,
            b.io_errors.read,
            c.io_errors.read
        ),
    );
    row(
        "wrong bytes returned (blocks failing verification)",
        format!(
            "write pass: {} · read-back: {} (+{} whose write had failed) · clean verify: {} \
             (+{} whose write had failed)",
            r.wrong_bytes_write_pass.acknowledged + r.wrong_bytes_write_pass.unacknowledged,
            r.wrong_bytes_read_back.acknowledged,
            r.wrong_bytes_read_back.unacknowledged,
            r.wrong_bytes_clean_verify.acknowledged,
            r.wrong_bytes_clean_verify.unacknowledged
        ),
    );
    row(
        "fio's total_err (EIOs + verification failures)",
        format!(
            "write pass {} · read-back {} · clean verify {}",
            w.total_err, b.total_err, c.total_err
        ),
    );
    row(
        "longest client request (submission → completion)",
        format!(
            "write pass: write {}, read {}, flush {} · read-back: read {}",
            ms(&w.write),
            ms(&w.read),
            ms(&w.sync),
            ms(&b.read)
        ),
    );
    row(
        "write pass",
        format!(
            "{:.2} GiB written by {} writes ({} reads back, {} FLUSHes) in {:.0} s ({:.0} → {:.0} \
             s after the server started)",
            w.write.bytes as f64 / GIB as f64,
            w.write.ios,
            w.read.ios,
            w.sync.ios,
            w.wall_secs(),
            w.started_secs,
            w.ended_secs
        ),
    );
    row(
        "read-back under faults",
        format!(
            "{:.2} GiB in {} reads, {:.0} s",
            b.read.bytes as f64 / GIB as f64,
            b.read.ios,
            b.wall_secs()
        ),
    );
    row(
        "clean verify",
        format!(
            "{:.2} GiB in {} reads, {:.0} s",
            c.read.bytes as f64 / GIB as f64,
            c.read.ios,
            c.wall_secs()
        ),
    );
    row(
        "resumed by itself after the outage",
        format!(
            "{}: {} client writes answered during the outage, {} in the {:.0} s of the write \
             pass after it; first upload {} after it ended; {:.1} MiB uploaded after it; journal \
             drained at {:.0} s ({:.0} s after the write pass)",
            if res.resumed { "yes" } else { "**no**" },
            res.writes_during_outage,
            res.writes_after_outage,
            res.write_pass_after_outage_secs,
            res.first_upload_after_outage_secs
                .map_or_else(|| "never".to_string(), |s| format!("{s:.1} s")),
            res.uploaded_after_outage_bytes as f64 / MIB,
            res.drained_at_secs,
            r.drain_secs
        ),
    );
    row(
        "clean stop",
        format!("{} after {:.1} s", r.stop_status, r.stop_secs),
    );
}

/// The faulty server's metrics per interval (10 s, longer for long runs: at most
/// [`TIMELINE_ROWS`] rows): what the client got answered and what was uploaded, around the
/// outage.
fn timeline(md: &mut String, r: &Report) {
    let Some(last) = r.samples.iter().rev().find(|s| s.scraped) else {
        return;
    };
    let step = TIMELINE_STEP_SECS
        * (last.t_secs / (TIMELINE_STEP_SECS * TIMELINE_ROWS))
            .ceil()
            .max(1.0);
    let _ = writeln!(
        md,
        "\n## Timeline of the faulty server\n\nPer {step:.0} s, from its metrics (scraped every \
         {} s); t is seconds since the server started, when the outage's clock started.\n\n\
         | t (s) | | client writes answered | reads answered | EIOs | store retries | MiB \
         uploaded | MiB dirty (end) |\n|---|---|---:|---:|---:|---:|---:|---:|",
        SAMPLE_EVERY.as_secs()
    );
    let res = &r.resumption;
    let events = [
        (r.write_pass.started_secs, "write pass starts"),
        (res.outage_start_secs, "outage starts"),
        (res.outage_end_secs, "outage ends"),
        (r.write_pass.ended_secs, "write pass ends"),
        (res.drained_at_secs, "journal drained"),
        (r.read_back.started_secs, "read-back starts"),
        (r.read_back.ended_secs, "read-back ends"),
    ];
    let mut previous = Counters::default();
    let mut t = 0.0;
    while t <= last.t_secs {
        let end = t + step;
        let now = at(&r.samples, end).map_or(previous, |s| s.counters);
        let d = now.since(&previous);
        let mut notes: Vec<&str> = events
            .iter()
            .filter(|(at, _)| *at >= t && *at < end)
            .map(|(_, what)| *what)
            .collect();
        if notes.is_empty() && t >= res.outage_start_secs && t < res.outage_end_secs {
            notes.push("outage");
        }
        let _ = writeln!(
            md,
            "| {t:.0}–{end:.0} | {} | {} | {} | {} | {} | {:.1} | {:.1} |",
            notes.join(", "),
            d.writes,
            d.reads,
            d.errors(),
            d.store_retries,
            d.uploaded_bytes as f64 / MIB,
            now.dirty_bytes as f64 / MIB
        );
        previous = now;
        t = end;
    }
}

/// fio's first verification failure lines of each pass, if any.
fn failure_lines(md: &mut String, r: &Report) {
    for (name, pass) in [
        ("write pass", &r.write_pass),
        ("read-back under faults", &r.read_back),
        ("clean verify", &r.clean_verify),
    ] {
        if pass.verify_failure_lines.is_empty() {
            continue;
        }
        let _ = writeln!(
            md,
            "\n### Verification failures: {name} (first {})\n\n```",
            pass.verify_failure_lines.len()
        );
        for line in &pass.verify_failure_lines {
            let _ = writeln!(md, "{line}");
        }
        let _ = writeln!(md, "```");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_errors_and_verify_failures() {
        let text = "fio: io_u error on file faults.0.0: Input/output error: write \
                    offset=91414528, buflen=159744\n\
                    fio: io_u error on file faults.0.0: Input/output error: read offset=4096, \
                    buflen=4096\n\
                    verify: bad magic header 0, wanted acca at file faults.0.0 offset 91414528, \
                    length 4096 (requested block: offset=91414528, length=159744)\n\
                    crc32c: verify failed at file faults.0.0 offset 8192, length 4096 \
                    (requested block: offset=8192, length=8192, flags=88)\n       \
                    Expected CRC: 1\n       Received CRC: 2\n";
        let mut pass = parse_json("fio: connected to NBD server\n{\"jobs\":[{\"total_err\":4}]}")
            .expect("json");
        parse_errors(text, &mut pass);
        assert_eq!(pass.total_err, 4);
        assert_eq!(pass.io_errors.write, 1);
        assert_eq!(pass.io_errors.read, 1);
        assert_eq!(pass.verify_failed_blocks, 2);
        let wrong = pass.wrong_bytes(&pass.failed_writes.clone());
        assert_eq!((wrong.acknowledged, wrong.unacknowledged), (1, 1));
    }

    #[test]
    fn parses_the_fault_count() {
        let log = "2026-12-06T12:25:50Z  INFO bucketdisk::serve: injected store faults: \
                   requests=168 outage=3 500=1 503=1 lost-reply=1 retried=11\n";
        let i = parse_injected(log).expect("line");
        assert_eq!((i.requests, i.outage_failures, i.retried), (168, 3, 11));
        assert_eq!(i.total(), 3);
        assert_eq!(i.by_kind[2], ("lost-reply".to_string(), 1));
    }
}
