//! `boot`: process start → the first verified 4 KiB read of a 100 GiB disk whose block map is
//! fully written (one row per block), on a host that has never seen it (empty cache), with
//! moto behind the latency proxy — in each state a volume is left in:
//!
//! - **clean-stop**: written to, then stopped with SIGTERM (uploads and a tidy at close);
//! - **killed-during-writes**: killed with SIGKILL while random writes were being uploaded
//!   (the map's level-0 files since the last maintenance left as they were, no tidy);
//! - **after-1000-uploads**: 1,000 uploads back to back (`--durability remote`, a FLUSH after
//!   every write) with no idle period, then SIGKILL;
//! - **snapshot-far-behind**: several servers in a row, each killed after fewer uploads than
//!   start a maintenance, so every transaction since the base snapshot is still a level-0 file.
//!
//! Each state is prepared once (no added latency) under its own prefix of one bucket; every
//! timed boot runs on a server-side copy of it (a boot takes the lease and changes the state).
//! s3backer, the peer, boots in the same run, interleaved, on the same proxy. The store
//! requests and round trips on the critical path (spawn → read answered) come from the proxy.

use crate::latency_proxy::{LatencyProxy, Traffic, round_trips};
use crate::machine;
use crate::nbd_client::NbdClient;
use crate::process::{ServerProcess, check_interrupted, die_with_parent, free_loopback_port};
use crate::progress::Progress;
use crate::report::notes_section;
use crate::run_info::RunInfo;
use crate::stats::{Summary, show};
use crate::store_subjects::{self, BUCKET, DISK_BYTES, Env, Kind};
use crate::suites::compare_clocks;
use crate::synthetic::{self, Built};
use crate::workspace::{Places, bucketdisk_binary, workspace_root};
use crate::{moto, server_metrics};
use anyhow::{Context, Result, anyhow, bail, ensure};
use blockmap::replica::{Layout, Replica};
use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::Serialize;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The volume's name under every prefix (the subjects' `--volume`).
const VOLUME: &str = "disk";
/// Prefix of the built volume every state starts from.
const BASE: &str = "boot-base";
/// One row per 64 KiB block of 100 GiB: a fully written map.
const FULL_ROWS: u64 = DISK_BYTES / synthetic::BLOCK as u64;
const FLOOR_MS: f64 = 240.0;
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// The state workloads write at or past this offset, so block 0 keeps the built content the
/// timed read checks.
const WRITES_FROM: &str = "1g";
const WRITES_SPAN: &str = "99g";
/// Random writes while a state is prepared: a steady trickle over the whole disk (every write
/// dirties its own 64 KiB block, so this bounds what the store has to hold) that keeps the
/// uploader busy every sync interval.
const TRICKLE_IOPS: &str = "200";
/// Uploads per server in the snapshot-far-behind state: fewer than start a maintenance (60).
const UPLOADS_PER_CRASH: u64 = 50;
const CRASHES: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum State {
    CleanStop,
    KilledDuringWrites,
    After1000Uploads,
    SnapshotFarBehind,
}

const STATES: [State; 4] = [
    State::CleanStop,
    State::KilledDuringWrites,
    State::After1000Uploads,
    State::SnapshotFarBehind,
];

impl State {
    fn name(self) -> &'static str {
        match self {
            State::CleanStop => "clean-stop",
            State::KilledDuringWrites => "killed-during-writes",
            State::After1000Uploads => "after-1000-uploads",
            State::SnapshotFarBehind => "snapshot-far-behind",
        }
    }

    fn prefix(self) -> String {
        format!("boot-state-{}", self.name())
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// First-byte delay the latency proxy adds to every S3 response during the timed boots, in ms.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// Rows of the built block map (default: every block of the 100 GiB disk).
    #[arg(long, default_value_t = FULL_ROWS)]
    rows: u64,
    /// Timed boots per state (and of s3backer), interleaved.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Seconds of random writes before the killed-during-writes state's SIGKILL.
    #[arg(long, default_value_t = 45)]
    write_secs: u64,
    /// States to prepare and boot (comma-separated) [all four].
    #[arg(long, value_delimiter = ',')]
    states: Option<Vec<String>>,
    /// `BUCKETDISK_LOG` of the timed servers; at `debug` their open phases are echoed here.
    #[arg(long, default_value = "info")]
    server_log: String,
    #[command(flatten)]
    places: Places,
}

/// What a prepared state's map replica looks like.
#[derive(Debug, Clone, Serialize)]
struct StateShape {
    state: State,
    /// What was done to the base volume, in words.
    history: String,
    /// Uploads the servers reported (from their metrics), summed.
    uploads: u64,
    level0_files: usize,
    level1_files: usize,
    other_files: usize,
    replica_bytes: u64,
    /// Transactions since the newest snapshot.
    txids_after_snapshot: u64,
    /// The files an open reads (the restore plan of the latest state), as `level:TXIDs`.
    plan: Vec<String>,
    prepare_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Boot {
    subject: String,
    repeat: usize,
    /// Process start → the first 4 KiB read answered (and, for bucketdisk, checked).
    first_read_ms: f64,
    listening_ms: f64,
    /// Store requests sent between the start and the read's answer.
    store: Traffic,
    /// Of those, round trips one after another (overlapping requests count once).
    round_trips: Option<usize>,
}

#[derive(Debug, Serialize)]
struct Report {
    #[serde(flatten)]
    run: RunInfo,
    latency_ms: u64,
    built: Built,
    states: Vec<StateShape>,
    server_command: String,
    s3backer_command: String,
    boots: Vec<Boot>,
    /// What one 4 KiB ranged GET costs through the proxy, by the size of the object it reads.
    ranged_gets: Vec<RangedGet>,
    notes: Vec<String>,
}

/// Sequential 4 KiB ranged GETs of one object through the proxy: moto reads a whole object to
/// answer a range of it, so its cost grows with the object (S3's does not).
#[derive(Debug, Clone, Serialize)]
struct RangedGet {
    what: String,
    object_bytes: u64,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
}

/// The bench's own view of the bucket: straight to moto (preparation, copies) and the runtime
/// its calls run on.
struct Bucket {
    store: Arc<dyn ObjectStore>,
    runtime: tokio::runtime::Runtime,
}

impl Bucket {
    fn prefix_objects(&self, prefix: &str) -> Result<Vec<(StorePath, u64)>> {
        let prefix = StorePath::from(prefix);
        self.runtime.block_on(async {
            let objects: Vec<_> = self
                .store
                .list(Some(&prefix))
                .try_collect()
                .await
                .with_context(|| format!("listing {prefix}"))?;
            Ok(objects.into_iter().map(|m| (m.location, m.size)).collect())
        })
    }

    /// Server-side copies of every object under `from` to the same key under `to`.
    fn copy_prefix(&self, from: &str, to: &str) -> Result<usize> {
        let objects = self.prefix_objects(from)?;
        let count = objects.len();
        self.runtime.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for (i, (path, _)) in objects.into_iter().enumerate() {
                let rest = path
                    .as_ref()
                    .strip_prefix(from)
                    .ok_or_else(|| anyhow!("{path} is not under {from}"))?
                    .trim_start_matches('/')
                    .to_string();
                let dest = StorePath::from(format!("{to}/{rest}"));
                let store = Arc::clone(&self.store);
                tasks.spawn(async move { store.copy(&path, &dest).await });
                if i % 16 == 15
                    && let Some(done) = tasks.join_next().await
                {
                    done??;
                }
            }
            while let Some(done) = tasks.join_next().await {
                done??;
            }
            Ok::<_, anyhow::Error>(())
        })?;
        Ok(count)
    }

    /// `count` sequential 4 KiB ranged GETs from the middle of `path` through `via`.
    fn time_ranged_gets(
        &self,
        via: &Arc<dyn ObjectStore>,
        what: &str,
        path: &StorePath,
        size: u64,
        count: usize,
    ) -> Result<RangedGet> {
        let mut ms = Vec::with_capacity(count);
        for _ in 0..count {
            let at = size / 2 / 4096 * 4096;
            let t = Instant::now();
            self.runtime
                .block_on(via.get_range(path, at..(at + 4096).min(size)))
                .with_context(|| format!("ranged GET of {path}"))?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let s = Summary::of(&ms).context("no GETs")?;
        Ok(RangedGet {
            what: what.to_string(),
            object_bytes: size,
            median_ms: s.median,
            min_ms: s.min,
            max_ms: s.max,
        })
    }

    fn delete_prefix(&self, prefix: &str) -> Result<()> {
        let objects = self.prefix_objects(prefix)?;
        self.runtime.block_on(async {
            for (path, _) in objects {
                self.store.delete(&path).await?;
            }
            Ok(())
        })
    }

    fn shape(&self, state: State, history: String, uploads: u64, secs: f64) -> Result<StateShape> {
        let replica = Replica::new(
            Arc::clone(&self.store),
            StorePath::from(format!("{}/{VOLUME}/blockmap", state.prefix())),
            Layout::ObjectStore,
        );
        let files = self
            .runtime
            .block_on(replica.list())
            .map_err(|e| anyhow!("listing the {} replica: {e}", state.name()))?;
        let snapshot = files
            .iter()
            .filter(|f| f.level == ltx::naming::SNAPSHOT_LEVEL)
            .map(|f| f.name.max_txid)
            .max()
            .unwrap_or(0);
        let latest = files.iter().map(|f| f.name.max_txid).max().unwrap_or(0);
        let at = |level: u8| files.iter().filter(|f| f.level == level).count();
        let plan = Replica::plan_listing(&files, ltx::RestoreTarget::Latest)
            .map_err(|e| anyhow!("planning the {} replica: {e}", state.name()))?
            .iter()
            .map(|f| format!("{}:{:x}-{:x}", f.level, f.name.min_txid, f.name.max_txid))
            .collect();
        Ok(StateShape {
            state,
            history,
            uploads,
            level0_files: at(0),
            level1_files: at(1),
            other_files: files.len() - at(0) - at(1),
            replica_bytes: files.iter().map(|f| f.size).sum(),
            txids_after_snapshot: latest.saturating_sub(snapshot),
            plan,
            prepare_secs: secs,
        })
    }
}

pub fn run(args: Args, command: String) -> Result<()> {
    let workspace = workspace_root();
    let bin = bucketdisk_binary(args.places.bucketdisk.as_deref(), &workspace)?;
    let tmp = args.places.scratch("bucketdisk-boot-")?;
    let mut run = RunInfo::begin(command, &bin, &workspace, tmp.path())?;
    let (env, moto, proxy) = Env::on_moto(bin, tmp.path())?;
    let bucket = Bucket {
        store: moto::client(&format!("http://{}", moto.addr), BUCKET)?,
        runtime: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?,
    };
    let chosen = crate::choose::by_name(&STATES, args.states.as_deref(), State::name, "state")?;
    let steps = (2 + chosen.len() + args.repeats * (chosen.len() + 1)) as u64;
    let mut progress = Progress::new(steps);
    let mut notes = Vec::new();

    progress.step(&format!(
        "building a 100 GiB volume, {} map rows",
        args.rows
    ));
    let built = synthetic::build_volume_in(
        Arc::clone(&bucket.store),
        &StorePath::from(BASE),
        Layout::ObjectStore,
        VOLUME,
        DISK_BYTES,
        args.rows,
    )?;
    progress.step_done();

    let mut states = Vec::new();
    for &state in &chosen {
        check_interrupted()?;
        progress.step(&format!("preparing {}", state.name()));
        let t = Instant::now();
        bucket.copy_prefix(BASE, &state.prefix())?;
        let (history, uploads) =
            prepare(state, &env, &args).with_context(|| format!("preparing {}", state.name()))?;
        let shape = bucket.shape(state, history, uploads, t.elapsed().as_secs_f64())?;
        eprintln!(
            "boot: {} — {} level-0, {} level-1 files, {} transactions after the snapshot; \
             an open reads {}",
            state.name(),
            shape.level0_files,
            shape.level1_files,
            shape.txids_after_snapshot,
            shape.plan.join(" ")
        );
        states.push(shape);
        progress.step_done();
    }

    // s3backer's block 0 holds data too, so its first read is a real GET of a real object.
    progress.step("writing s3backer's first MiB");
    let session = store_subjects::start(Kind::S3backer, &env, 0)?;
    let s3backer_command = session.command_line.clone();
    crate::fio::pass(
        "write",
        1 << 20,
        &session.uri,
        &env.work.join("s3backer-fill.json"),
    )?;
    let (_, stop_notes) = session.stop()?;
    notes.extend(stop_notes);
    progress.step_done();

    proxy.set_delay(Duration::from_millis(args.latency_ms));
    let expected = synthetic::content(0)[..4096].to_vec();
    let mut boots = Vec::new();
    let mut server_command = String::new();
    for repeat in 0..args.repeats {
        for &state in &chosen {
            check_interrupted()?;
            progress.step(&format!(
                "repeat {} · boot after {}",
                repeat + 1,
                state.name()
            ));
            let run_prefix = format!("boot-run-{}-{repeat}", state.name());
            bucket.copy_prefix(&state.prefix(), &run_prefix)?;
            let (boot, line) = boot_bucketdisk(
                &env,
                &proxy,
                (state, repeat),
                &run_prefix,
                &expected,
                &args.server_log,
            )
            .with_context(|| format!("booting after {}", state.name()))?;
            server_command = line;
            eprintln!(
                "boot: {} — first read {:.0} ms, {} requests, {} round trips",
                state.name(),
                boot.first_read_ms,
                boot.store.requests,
                boot.round_trips.unwrap_or(0)
            );
            boots.push(boot);
            bucket.delete_prefix(&run_prefix)?;
            progress.step_done();
        }
        check_interrupted()?;
        progress.step(&format!("repeat {} · boot s3backer", repeat + 1));
        let run = compare_clocks::boot_once(
            Kind::S3backer,
            &env,
            &proxy,
            Some(args.latency_ms),
            0,
            repeat,
        )?;
        eprintln!("boot: s3backer — first read {:.0} ms", run.first_read_ms);
        boots.push(Boot {
            subject: Kind::S3backer.name().to_string(),
            repeat,
            first_read_ms: run.first_read_ms,
            listening_ms: run.listening_ms,
            store: run.store.unwrap_or_default(),
            round_trips: None,
        });
        progress.step_done();
    }
    // What the store charges per ranged GET, by object size, at the boots' latency.
    let via_proxy = moto::client(&proxy.endpoint(), BUCKET)?;
    let base_objects = bucket.prefix_objects(BASE)?;
    let largest = |dir: &str| {
        base_objects
            .iter()
            .filter(|(p, _)| p.as_ref().contains(dir))
            .max_by_key(|(_, size)| *size)
            .cloned()
    };
    let mut ranged_gets = Vec::new();
    for (what, dir) in [
        ("the map's snapshot (level 9)", "/blockmap/0009/"),
        ("the volume's chunk", "/chunks/"),
        ("volume.json", "/volume.json"),
    ] {
        if let Some((path, size)) = largest(dir) {
            ranged_gets.push(bucket.time_ranged_gets(&via_proxy, what, &path, size, 10)?);
        }
    }
    progress.finish();

    run.finish();
    let report = Report {
        run,
        latency_ms: args.latency_ms,
        built,
        states,
        server_command: server_command
            .replace(&env.work.display().to_string(), "WORK")
            .replace(&proxy.endpoint(), "PROXY"),
        s3backer_command: s3backer_command
            .replace(&env.work.display().to_string(), "WORK")
            .replace(&proxy.endpoint(), "PROXY"),
        boots,
        ranged_gets,
        notes,
    };
    let out_dir = args.places.out_dir(&workspace);
    let stem = report.run.stem("boot");
    let md = markdown(&report, &stem);
    crate::report::write_md_json(&out_dir, &stem, &md, &report)?;
    print!("{md}");
    Ok(())
}

/// A bucketdisk server on the volume under `prefix`, with a fresh cache and its metrics.
struct Server {
    process: ServerProcess,
    log: std::path::PathBuf,
    addr: SocketAddr,
    metrics: SocketAddr,
    command_line: String,
}

impl Server {
    fn spawn(env: &Env, prefix: &str, extra: &[&str]) -> Result<Server> {
        Server::spawn_logging(env, prefix, extra, "info")
    }

    fn spawn_logging(env: &Env, prefix: &str, extra: &[&str], level: &str) -> Result<Server> {
        let port = free_loopback_port()?;
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()?));
        let cache = env.work.join(format!("cache-{port}"));
        let mut cmd = store_subjects::bucketdisk_s3_at(env, prefix, port, &cache);
        cmd.arg("--metrics")
            .arg(metrics.to_string())
            .args(extra)
            .env("BUCKETDISK_LOG", level);
        let command_line = store_subjects::describe(&cmd);
        std::fs::create_dir_all(env.work.join("logs"))?;
        let log = env
            .work
            .join("logs")
            .join(format!("boot-{prefix}-{port}.log"));
        Ok(Server {
            log: log.clone(),
            process: ServerProcess::spawn("bucketdisk", cmd, &log)?,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            metrics,
            command_line,
        })
    }

    fn uri(&self) -> String {
        format!("nbd://{}/", self.addr)
    }

    fn uploads(&self) -> Result<u64> {
        let scrape = server_metrics::scrape(self.metrics)?;
        Ok(scrape.get("bucketdisk_uploads_total").unwrap_or(0.0) as u64)
    }
}

/// fio writing 4 KiB blocks at random offsets past [`WRITES_FROM`], with `extra` options.
fn fio_writes(uri: &str, extra: &[String]) -> Command {
    let mut cmd = Command::new("fio");
    cmd.arg("--name=boot-state")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .args(["--rw=randwrite", "--bs=4k", "--norandommap"])
        // Jobs as threads of one process: killing it (when its server dies) stops them all,
        // where a forked job process would spin on, reconnecting.
        .arg("--thread")
        .arg(format!("--offset={WRITES_FROM}"))
        .arg(format!("--size={WRITES_SPAN}"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    die_with_parent(&mut cmd);
    cmd
}

fn wait_ok(mut child: Child, what: &str) -> Result<()> {
    let status = crate::process::wait_with_timeout(&mut child, what, Duration::from_secs(900))?;
    ensure!(status.success(), "{what} failed ({status})");
    Ok(())
}

/// Brings the copy of the base volume under the state's prefix into the state. Returns the
/// history in words and the uploads the servers reported.
fn prepare(state: State, env: &Env, args: &Args) -> Result<(String, u64)> {
    let prefix = state.prefix();
    match state {
        State::CleanStop => {
            let mut server = Server::spawn(env, &prefix, &[])?;
            server
                .process
                .wait_until_serving(server.addr, BOOT_TIMEOUT)?;
            let fio = fio_writes(
                &server.uri(),
                &[
                    "--iodepth=32".into(),
                    format!("--rate_iops={TRICKLE_IOPS}"),
                    "--time_based".into(),
                    "--runtime=10".into(),
                ],
            )
            .spawn()?;
            wait_ok(fio, "fio")?;
            let uploads = server.uploads()?;
            server.process.stop()?;
            Ok((
                format!(
                    "10 s of 4 KiB random writes at {TRICKLE_IOPS} IOPS, then SIGTERM (uploads \
                     what is journaled, tidies the map)"
                ),
                uploads,
            ))
        }
        State::KilledDuringWrites => {
            let mut server = Server::spawn(env, &prefix, &[])?;
            server
                .process
                .wait_until_serving(server.addr, BOOT_TIMEOUT)?;
            let mut fio = fio_writes(
                &server.uri(),
                &[
                    "--iodepth=32".into(),
                    format!("--rate_iops={TRICKLE_IOPS}"),
                    "--time_based".into(),
                    format!("--runtime={}", args.write_secs + 60),
                ],
            )
            .spawn()?;
            std::thread::sleep(Duration::from_secs(args.write_secs));
            server.process.ensure_running()?;
            let uploads = server.uploads()?;
            server.process.kill()?;
            let _ = fio.kill();
            let _ = fio.wait();
            Ok((
                format!(
                    "{} s of 4 KiB random writes at {TRICKLE_IOPS} IOPS (uploaded every second), \
                     SIGKILL while they ran",
                    args.write_secs
                ),
                uploads,
            ))
        }
        State::After1000Uploads => {
            let uploads = uploads_then_kill(env, &prefix, 1000)?;
            Ok((
                "1,000 writes of 4 KiB, each followed by a FLUSH that waits for its upload \
                 (`--durability remote`), then SIGKILL: no idle period, so no tidy"
                    .into(),
                uploads,
            ))
        }
        State::SnapshotFarBehind => {
            let mut uploads = 0;
            for _ in 0..CRASHES {
                uploads += uploads_then_kill(env, &prefix, UPLOADS_PER_CRASH)?;
            }
            Ok((
                format!(
                    "{CRASHES} servers in a row, each: {UPLOADS_PER_CRASH} writes + FLUSH with \
                     `--durability remote` (fewer uploads than start a maintenance), then SIGKILL"
                ),
                uploads,
            ))
        }
    }
}

/// A server with `--durability remote`; 4 KiB writes each followed by a FLUSH (one upload
/// each, though a FLUSH that finds its write already uploaded makes none) until it has
/// reported `uploads` uploads; SIGKILL. Returns the uploads it reported.
fn uploads_then_kill(env: &Env, prefix: &str, uploads: u64) -> Result<u64> {
    let mut server = Server::spawn(env, prefix, &["--durability", "remote"])?;
    server
        .process
        .wait_until_serving(server.addr, BOOT_TIMEOUT)?;
    let mut done = 0;
    for _ in 0..5 {
        let fio = fio_writes(
            &server.uri(),
            &[
                "--iodepth=1".into(),
                "--fsync=1".into(),
                format!("--number_ios={}", uploads - done),
            ],
        )
        .spawn()?;
        wait_ok(fio, "fio")?;
        done = server.uploads()?;
        if done >= uploads {
            server.process.kill()?;
            return Ok(done);
        }
    }
    bail!("flushed writes made only {done} of {uploads} uploads")
}

/// One timed boot (`repeat` of `state`) of the volume under `prefix`: spawn with an empty
/// cache → connect → handshake → read block 0's first 4 KiB → check it. Returns the boot and
/// the server's command line.
fn boot_bucketdisk(
    env: &Env,
    proxy: &LatencyProxy,
    (state, repeat): (State, usize),
    prefix: &str,
    expected: &[u8],
    log_level: &str,
) -> Result<(Boot, String)> {
    let before = proxy.traffic();
    proxy.start_recording();
    let start = Instant::now();
    let mut server = Server::spawn_logging(env, prefix, &[], log_level)?;
    let stream = loop {
        match TcpStream::connect(server.addr) {
            Ok(s) => break s,
            Err(e) => {
                if start.elapsed() > BOOT_TIMEOUT {
                    bail!("the server never listened: {e}");
                }
                server.process.ensure_running()?;
                std::thread::sleep(Duration::from_micros(500));
            }
        }
    };
    let listening = start.elapsed();
    let mut client = NbdClient::handshake(stream)?;
    let data = client.read(0, 4096)?;
    let answered = Instant::now();
    let first_read = answered - start;
    let store = proxy.traffic().since(&before);
    let spans: Vec<_> = proxy
        .take_recording()
        .into_iter()
        .filter(|s| s.end <= answered)
        .collect();
    ensure!(client.size == DISK_BYTES, "export size {}", client.size);
    ensure!(
        data == expected,
        "block 0 read back different bytes from the built block"
    );
    client.disconnect()?;
    let command_line = server.command_line.clone();
    server.process.stop()?;
    if log_level != "info" {
        let text = std::fs::read_to_string(&server.log).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("open")) {
            eprintln!("  {line}");
        }
        let mut sorted: Vec<_> = spans.iter().collect();
        sorted.sort_by_key(|s| s.start);
        for s in sorted {
            eprintln!(
                "  {:>6.1} → {:>6.1} ms  {}",
                (s.start - start).as_secs_f64() * 1000.0,
                (s.end - start).as_secs_f64() * 1000.0,
                s.what
            );
        }
        eprintln!(
            "  {:>6.1} ms port accepts, {:>6.1} ms read answered",
            listening.as_secs_f64() * 1000.0,
            first_read.as_secs_f64() * 1000.0
        );
    }
    Ok((
        Boot {
            subject: state.name().to_string(),
            repeat,
            first_read_ms: first_read.as_secs_f64() * 1000.0,
            listening_ms: listening.as_secs_f64() * 1000.0,
            store,
            round_trips: Some(round_trips(&spans)),
        },
        command_line,
    ))
}

fn markdown(r: &Report, stem: &str) -> String {
    let mut o = String::new();
    r.run.header(
        &mut o,
        "boot: start → first read, cold, in every state",
        &[
            (
                "s3backer",
                machine::version_line("s3backer", &["--version"]),
            ),
            ("moto", moto::version_line()),
            ("bucketdisk", r.run.tools.bucketdisk_line()),
        ],
    );
    let _ = writeln!(
        o,
        "A 100 GiB volume with a block map of {} rows (one per 64 KiB block: fully written; \
         {:.1} MB of SQLite pages, snapshot {:.1} MB), pointing into one real chunk of 64 \
         distinct blocks, built straight into moto in {:.1} s. Each state below starts from a \
         copy of it and is prepared at no added latency. Every timed boot runs on a fresh \
         server-side copy of its state, with an empty `--cache-dir` and {} ms added to the first \
         byte of every store response: process start → port accepts → NBD handshake → one 4 KiB \
         read at offset 0 with our own client, checked against the built block. Requests and \
         round trips are counted by the proxy from the spawn to the read's answer (requests \
         whose lifetimes overlap count as one round trip). s3backer boots interleaved on the \
         same proxy (its clock includes mounting its FUSE file and starting `nbdkit file` on it; \
         its block 0 holds data).\n",
        r.built.rows,
        r.built.map_bytes as f64 / 1e6,
        r.built.snapshot_bytes as f64 / 1e6,
        r.built.build_secs,
        r.latency_ms
    );
    let _ = writeln!(o, "- bucketdisk: `{}`", r.server_command);
    let _ = writeln!(o, "- s3backer: `{}`\n", r.s3backer_command);

    let s3backer = Summary::of_iter(
        r.boots
            .iter()
            .filter(|b| b.subject == Kind::S3backer.name())
            .map(|b| b.first_read_ms),
    );
    let _ = writeln!(o, "## Floors\n");
    let _ = writeln!(
        o,
        "| state | start → first read, ms | ≤ {FLOOR_MS:.0} ms | below s3backer ({}) | store requests | round trips |\n|---|---:|:---:|:---:|---:|---:|",
        show(s3backer, 0)
    );
    for shape in &r.states {
        let boots: Vec<&Boot> = r
            .boots
            .iter()
            .filter(|b| b.subject == shape.state.name())
            .collect();
        let ms = Summary::of_iter(boots.iter().map(|b| b.first_read_ms));
        let under = |s: Option<Summary>, limit: f64| match s {
            Some(s) if s.max <= limit => "yes",
            Some(s) if s.median <= limit => "median only",
            Some(_) => "**no**",
            None => "–",
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} |",
            shape.state.name(),
            show(ms, 0),
            under(ms, FLOOR_MS),
            under(ms, s3backer.map_or(0.0, |s| s.median)),
            show(
                Summary::of_iter(boots.iter().map(|b| b.store.requests as f64)),
                0
            ),
            show(
                Summary::of_iter(boots.iter().filter_map(|b| b.round_trips.map(|n| n as f64))),
                0
            ),
        );
    }
    let _ = writeln!(
        o,
        "| s3backer (peer) | {} | | | {} | |",
        show(s3backer, 0),
        show(
            Summary::of_iter(
                r.boots
                    .iter()
                    .filter(|b| b.subject == Kind::S3backer.name())
                    .map(|b| b.store.requests as f64)
            ),
            0
        )
    );

    let _ = writeln!(o, "\n## The states\n");
    let _ = writeln!(
        o,
        "| state | how it was made | uploads | level-0 files | level-1 files | other files | replica MB | transactions after the snapshot | files an open reads |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for s in &r.states {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {:.1} | {} | {} |",
            s.state.name(),
            s.history,
            s.uploads,
            s.level0_files,
            s.level1_files,
            s.other_files,
            s.replica_bytes as f64 / 1e6,
            s.txids_after_snapshot,
            s.plan.len()
        );
    }
    let _ = writeln!(o, "\n## What one ranged GET costs here\n");
    let _ = writeln!(
        o,
        "Ten sequential 4 KiB ranged GETs of each object through the same proxy ({} ms added), \
         after the boots. Moto reads the whole object to answer a range of it, so a GET of the \
         map's snapshot costs more than the added latency; S3's first byte does not depend on \
         the object's size.\n",
        r.latency_ms
    );
    let _ = writeln!(
        o,
        "| object | size | median ms (min–max) |\n|---|---:|---:|"
    );
    for g in &r.ranged_gets {
        let _ = writeln!(
            o,
            "| {} | {:.1} MB | {:.1} ({:.1}–{:.1}) |",
            g.what,
            g.object_bytes as f64 / 1e6,
            g.median_ms,
            g.min_ms,
            g.max_ms
        );
    }
    let _ = writeln!(o, "\n## Every boot\n");
    let _ = writeln!(
        o,
        "| subject | repeat | first read, ms | port accepts, ms | requests (GET/PUT/other) | round trips |\n|---|---:|---:|---:|---|---:|"
    );
    for b in &r.boots {
        let t = &b.store;
        let _ = writeln!(
            o,
            "| {} | {} | {:.0} | {:.0} | {} ({}/{}/{}) | {} |",
            b.subject,
            b.repeat + 1,
            b.first_read_ms,
            b.listening_ms,
            t.requests,
            t.gets,
            t.puts,
            t.requests - t.gets - t.puts,
            b.round_trips.map_or("–".into(), |n| n.to_string())
        );
    }
    let _ = writeln!(o);
    notes_section(&mut o, &r.notes);
    let _ = writeln!(o, "Raw numbers: `{stem}.json` beside this file.");
    o
}
