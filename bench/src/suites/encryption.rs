//! `encryption`: what encryption at rest costs. The object engine serves a 100 GiB disk plain
//! and encrypted (`--key-file`, AES-256-GCM per block), on the local-directory store (the
//! fastest store, where sealing and opening weigh most) and on moto; subjects interleaved in
//! every repeat. Each run starts empty:
//!
//! 1. **write**: fio writes `--size` in 1 MiB requests at QD8 ending with an fsync; then the
//!    uploads are waited for (every block sealed and stored): bytes ÷ (job + wait) is the
//!    throughput until stored.
//! 2. **cold read**: the server stops, its cache directory is deleted, it starts again and fio
//!    reads the same bytes back in 1 MiB requests at QD8: every block is fetched from its chunk
//!    and (encrypted) opened.
//!
//! Floor: encrypted ≥ 0.8× plain on every 1M row.

use crate::cpu_account::{CpuClock, CpuSeconds};
use crate::fio;
use crate::machine;
use crate::moto::Moto;
use crate::process::check_interrupted;
use crate::progress::Progress;
use crate::report::notes_section;
use crate::run_info::RunInfo;
use crate::stats::{Summary, show};
use crate::store_ceiling::StoreProbe;
use crate::store_subjects::{self, Env, Kind, Session};
use crate::units::parse_size;
use crate::workspace::{Places, bucketdisk_binary, workspace_root};
use anyhow::{Context, Result, ensure};
use serde::Serialize;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const FLOOR: f64 = 0.8;
const MIB: f64 = 1_048_576.0;
const SETTLE_TIMEOUT: Duration = Duration::from_secs(1200);
/// The object-storage prefix bucketdisk on moto keeps its disk under.
const S3_PREFIX: &str = "bucketdisk";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Store {
    /// The local-directory store.
    Local,
    /// moto, through the latency proxy.
    S3,
}

const STORES: [Store; 2] = [Store::Local, Store::S3];

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::Local => "local",
            Store::S3 => "s3",
        }
    }

    fn kind(self) -> Kind {
        match self {
            Store::Local => Kind::BucketdiskLocal,
            Store::S3 => Kind::BucketdiskS3Warm,
        }
    }

    /// The cache directory a session of this store uses (deleted for a cold read).
    fn cache(self, env: &Env) -> PathBuf {
        match self {
            Store::Local => env.work.join("local-cache"),
            Store::S3 => env.warm_cache(),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Bytes each run writes and reads back.
    #[arg(long, value_parser = parse_size, default_value = "2G")]
    size: u64,
    /// Stores (comma-separated) [local,s3].
    #[arg(long, value_delimiter = ',')]
    stores: Option<Vec<String>>,
    /// First-byte delay the latency proxy adds to every S3 response, in ms.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Repeats of everything, interleaved.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    #[command(flatten)]
    places: Places,
}

/// One run: a write and a cold read of one store, plain or encrypted.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub store: Store,
    pub encrypted: bool,
    pub repeat: usize,
    /// fio's bandwidth; its runtime includes the final fsync.
    pub write_mib_per_sec: f64,
    pub write_seconds: f64,
    /// After fio's exit, until nothing written waits for upload.
    pub settle_seconds: f64,
    /// Bytes ÷ (write + settle): sealed and in the store.
    pub until_stored_mib_per_sec: f64,
    pub read_cold_mib_per_sec: f64,
    #[serde(rename = "write_cpu")]
    pub write_cpu: CpuSeconds,
    #[serde(rename = "read_cpu")]
    pub read_cpu: CpuSeconds,
}

#[derive(Debug, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub run: RunInfo,
    pub size_bytes: u64,
    pub latency_ms: u64,
    pub repeats: usize,
    pub subjects: Vec<(String, String)>,
    pub measurements: Vec<Measurement>,
    pub notes: Vec<String>,
}

fn subject_name(store: Store, encrypted: bool) -> String {
    format!(
        "bucketdisk-{}{}",
        store.name(),
        if encrypted { "-encrypted" } else { "" }
    )
}

pub fn run(args: Args, command: String) -> Result<()> {
    let stores = crate::choose::by_name(&STORES, args.stores.as_deref(), Store::name, "store")?;
    ensure!(args.repeats > 0, "--repeats must be at least 1");
    let workspace = workspace_root();
    let bin = bucketdisk_binary(args.places.bucketdisk.as_deref(), &workspace)?;
    let tmp = args.places.scratch("bucketdisk-encryption-")?;
    let mut run = RunInfo::begin(command, &bin, &workspace, tmp.path())?;
    // One run's journal and chunks, and moto's spooled copy.
    let need = 3 * args.size + (2 << 30);
    let free = machine::free_bytes(tmp.path())?;
    ensure!(
        free >= need,
        "{} has {} GiB free; one run needs {} GiB",
        tmp.path().display(),
        free >> 30,
        need >> 30
    );
    let (env, mut moto, proxy) = Env::on_moto(bin, tmp.path())?;
    proxy.set_delay(Duration::from_millis(args.latency_ms));
    let probe = StoreProbe::connect(&proxy.endpoint(), store_subjects::BUCKET)?;
    let key = key_file(tmp.path())?;
    let key_args = ["--key-file", key.to_str().context("scratch path")?];
    let mut progress = Progress::new((args.repeats * stores.len() * 2) as u64);
    let (mut subjects, mut measurements, mut notes) = (Vec::new(), Vec::new(), Vec::new());
    for repeat in 0..args.repeats {
        for &store in &stores {
            for encrypted in [false, true] {
                check_interrupted()?;
                let name = subject_name(store, encrypted);
                progress.step(&format!(
                    "repeat {} · {name} · {} MiB written, then read cold",
                    repeat + 1,
                    args.size >> 20
                ));
                moto.ensure_running()?;
                reset(store, &env, &probe)?;
                let extra: &[&str] = if encrypted { &key_args } else { &[] };
                let (m, line, run_notes) =
                    measure(store, encrypted, repeat, &env, extra, args.size, &moto)?;
                if subjects.iter().all(|(n, _)| n != &name) {
                    subjects.push((name, line));
                }
                notes.extend(run_notes);
                measurements.push(m);
                reset(store, &env, &probe)?;
                progress.step_done();
            }
        }
    }
    progress.finish();
    run.finish();
    let report = Report {
        run,
        size_bytes: args.size,
        latency_ms: args.latency_ms,
        repeats: args.repeats,
        subjects,
        measurements,
        notes,
    };
    let out_dir = args.places.out_dir(&workspace);
    let stem = report.run.stem("encryption");
    let md = markdown(&report, &stem);
    crate::report::write_md_json(&out_dir, &stem, &md, &report)?;
    print!("{md}");
    Ok(())
}

/// A key file for the encrypted subjects (owner-only, as bucketdisk requires).
fn key_file(dir: &Path) -> Result<PathBuf> {
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
        .context("reading /dev/urandom")?;
    let path = dir.join("volume.key");
    std::fs::write(&path, engine::hex::encode(&key)).context("writing the key file")?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .context("chmod 600 on the key file")?;
    Ok(path)
}

fn start(store: Store, env: &Env, extra: &[&str]) -> Result<Session> {
    let mut session = store_subjects::spawn(store.kind(), env, 0, extra)?;
    session
        .wait_serving()
        .with_context(|| format!("starting bucketdisk on {}", store.name()))?;
    Ok(session)
}

/// One write (until stored) and one cold read of the same bytes.
fn measure(
    store: Store,
    encrypted: bool,
    repeat: usize,
    env: &Env,
    extra: &[&str],
    size: u64,
    moto: &Moto,
) -> Result<(Measurement, String, Vec<String>)> {
    let name = subject_name(store, encrypted);
    let moto_pid = (store == Store::S3).then(|| moto.pid()).flatten();
    let mut notes = Vec::new();

    machine::flush_page_cache();
    let mut session = start(store, env, extra)?;
    let line = session.command_line.clone();
    let clock = CpuClock::start(&session, moto_pid);
    let started = Instant::now();
    let out = env.work.join(format!("{name}-write-{repeat}.json"));
    let write = fio::synced_write_pass(size, &session.uri, &out)
        .with_context(|| format!("{name}: the write job"))?;
    let write_seconds = started.elapsed().as_secs_f64();
    let settle_seconds = session.wait_uploads_settled(SETTLE_TIMEOUT)?;
    let write_cpu = clock.stop(&session, &write, write_seconds);
    notes.extend(session.stop()?.1);

    machine::remove_dir(&store.cache(env))?;
    machine::flush_page_cache();
    let mut session = start(store, env, extra)?;
    let clock = CpuClock::start(&session, moto_pid);
    let started = Instant::now();
    let out = env.work.join(format!("{name}-read-{repeat}.json"));
    let read = fio::pass_with("read", "1M", 8, size, &session.uri, &out)
        .with_context(|| format!("{name}: the cold read job"))?;
    let read_cpu = clock.stop(&session, &read, started.elapsed().as_secs_f64());
    session.ensure_running()?;
    notes.extend(session.stop()?.1);

    let m = Measurement {
        store,
        encrypted,
        repeat,
        write_mib_per_sec: write.bw_bytes / MIB,
        write_seconds,
        settle_seconds,
        until_stored_mib_per_sec: size as f64 / MIB / (write_seconds + settle_seconds),
        read_cold_mib_per_sec: read.bw_bytes / MIB,
        write_cpu,
        read_cpu,
    };
    Ok((m, line, notes))
}

/// Removes what a run leaves, so the next starts on an empty disk.
fn reset(store: Store, env: &Env, probe: &StoreProbe) -> Result<()> {
    machine::remove_dir(&store.cache(env))?;
    match store {
        Store::Local => machine::remove_dir(&env.work.join("local-store")),
        Store::S3 => probe.delete_prefix(S3_PREFIX),
    }
}

type Figure = fn(&Measurement) -> f64;

const ROWS: [(&str, Figure); 3] = [
    ("1M write QD8, to end_fsync", |m| m.write_mib_per_sec),
    ("1M write QD8, until sealed and stored", |m| {
        m.until_stored_mib_per_sec
    }),
    ("1M read QD8, cold cache", |m| m.read_cold_mib_per_sec),
];

fn values(
    r: &Report,
    store: Store,
    encrypted: bool,
    f: impl Fn(&Measurement) -> f64,
) -> Option<Summary> {
    Summary::of_iter(
        r.measurements
            .iter()
            .filter(|m| m.store == store && m.encrypted == encrypted)
            .map(f),
    )
}

/// Per-repeat ratios encrypted ÷ plain.
fn ratios(r: &Report, store: Store, f: Figure) -> Option<Summary> {
    Summary::of_iter(
        r.measurements
            .iter()
            .filter(|m| m.store == store && m.encrypted)
            .filter_map(|e| {
                let plain = r
                    .measurements
                    .iter()
                    .find(|p| p.store == store && !p.encrypted && p.repeat == e.repeat)?;
                Some(f(e) / f(plain))
            }),
    )
}

fn markdown(r: &Report, stem: &str) -> String {
    let mut o = String::new();
    r.run.header(
        &mut o,
        "encryption: encrypted volumes against plain ones",
        &[
            ("fio", r.run.tools.fio.clone()),
            ("bucketdisk", r.run.tools.bucketdisk_line()),
        ],
    );
    let _ = writeln!(
        o,
        "The object engine serves a 100 GiB disk (64 KiB blocks), plain or encrypted \
         (`--key-file`: AES-256-GCM per block), empty at the start of each run. A run: fio's \
         nbd engine writes the first {} MiB in 1 MiB requests at QD8 with `--end_fsync=1`; the \
         server's metrics are watched until nothing waits for upload (bytes ÷ (job + wait) is \
         the throughput until sealed and stored); the server stops, its cache directory is \
         deleted, it starts again and fio reads the same bytes at QD8 (every block fetched from \
         its chunk, and opened when encrypted). `sync` before each job. moto sits behind a \
         proxy adding {} ms. {} repeats, plain and encrypted interleaved; median (min–max); \
         ratios are per repeat.\n",
        r.size_bytes >> 20,
        r.latency_ms,
        r.repeats
    );
    for (name, line) in &r.subjects {
        let _ = writeln!(o, "- **{name}**: `{line}`");
    }
    let stores: Vec<Store> = STORES
        .into_iter()
        .filter(|s| r.measurements.iter().any(|m| m.store == *s))
        .collect();
    let _ = writeln!(o, "\n## Encrypted ÷ plain\n");
    let _ = writeln!(
        o,
        "| store | row | plain MiB/s | encrypted MiB/s | encrypted ÷ plain | floor | met |\n|---|---|---:|---:|---:|---|---|"
    );
    for &store in &stores {
        for (row, f) in ROWS {
            let ratio = ratios(r, store, f);
            let met = match ratio {
                Some(s) if s.min >= FLOOR => "yes",
                Some(s) if s.median >= FLOOR => "median only",
                Some(_) => "**no**",
                None => "not measured",
            };
            let _ = writeln!(
                o,
                "| {} | {row} | {} | {} | {} | ≥ {FLOOR} | {met} |",
                store.name(),
                show(values(r, store, false, f), 0),
                show(values(r, store, true, f), 0),
                show(ratio, 2)
            );
        }
    }
    let _ = writeln!(o, "\n## Server CPU seconds per GiB\n");
    let _ = writeln!(
        o,
        "| store | job | plain | encrypted |\n|---|---|---:|---:|"
    );
    let gib = r.size_bytes as f64 / f64::from(1u32 << 30);
    for &store in &stores {
        for (job, cpu) in [
            (
                "write (until stored)",
                (|m: &Measurement| m.write_cpu.server_cpu_seconds) as Figure,
            ),
            ("cold read", |m: &Measurement| m.read_cpu.server_cpu_seconds),
        ] {
            let per_gib = |encrypted| {
                values(r, store, encrypted, cpu).map(|s| Summary {
                    median: s.median / gib,
                    min: s.min / gib,
                    max: s.max / gib,
                    n: s.n,
                })
            };
            let _ = writeln!(
                o,
                "| {} | {job} | {} | {} |",
                store.name(),
                show(per_gib(false), 2),
                show(per_gib(true), 2)
            );
        }
    }
    let _ = writeln!(o);
    notes_section(&mut o, &r.notes);
    let _ = writeln!(o, "Raw numbers: `{stem}.json` beside this file.");
    o
}
