//! `writes`: the 1M sequential write floor, like with like. Every subject starts empty and
//! takes one fio job of 1 MiB sequential writes at QD8 over `--size` (4 GiB) that ends with
//! `--end_fsync=1`, so each job ends only when the subject has the data where it promises
//! durability: the raw file's disk for qemu-nbd, `nbdkit file` and bucketdisk's local-file
//! engine, the local journal for the object engine (`--durability local`), the store for
//! `--durability remote`.
//!
//! The object engine on S3 is also timed until its uploads have settled (nothing dirty, no
//! upload lag): that, and the `--durability remote` job, are store-durable throughputs, held
//! against what moto itself absorbs — PUTs of chunk-sized objects from a Rust S3 client through
//! the same latency proxy, measured in every repeat. Subjects run round-robin within a repeat.
//! Floors: the object engine on the local-directory store ≥ 0.9× the local-file engine; store-
//! durable on moto ≥ 0.9× moto's PUT ceiling.

use crate::cpu_account::{CpuClock, CpuSeconds};
use crate::fio;
use crate::latency_proxy::Traffic;
use crate::machine;
use crate::moto::Moto;
use crate::process::check_interrupted;
use crate::progress::Progress;
use crate::report::notes_section;
use crate::run_info::RunInfo;
use crate::stats::{Summary, show};
use crate::store_ceiling::{Measured, PutCeiling, StoreProbe};
use crate::store_subjects::{self, Env, Kind, Session};
use crate::units::parse_size;
use crate::workspace::{Places, bucketdisk_binary, workspace_root};
use anyhow::{Context, Result, ensure};
use serde::Serialize;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

const FLOOR: f64 = 0.9;
const MIB: f64 = 1_048_576.0;
/// The object size of the PUT ceiling: bucketdisk's default chunk size.
const CEILING_PUT_BYTES: u64 = 24 << 20;
/// PUTs in flight for each ceiling (bucketdisk keeps two chunk PUTs in flight; the ceiling is
/// the better of the two, so it is what moto can absorb, not what one client asks of it).
const CEILING_IN_FLIGHT: [usize; 2] = [2, 8];
/// How long the uploads of one job may take to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(1200);
/// The object-storage prefix bucketdisk-s3 keeps its disk under.
const S3_PREFIX: &str = "bucketdisk";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Subject {
    QemuNbd,
    NbdkitFile,
    /// bucketdisk's local-file engine.
    BucketdiskFile,
    /// The object engine on the local-directory store.
    BucketdiskLocal,
    /// The object engine on moto, `--durability local` (FLUSH waits for the journal).
    BucketdiskS3,
    /// The object engine on moto, `--durability remote` (FLUSH waits for the store).
    BucketdiskS3Remote,
}

const SUBJECTS: [Subject; 6] = [
    Subject::QemuNbd,
    Subject::NbdkitFile,
    Subject::BucketdiskFile,
    Subject::BucketdiskLocal,
    Subject::BucketdiskS3,
    Subject::BucketdiskS3Remote,
];

impl Subject {
    fn name(self) -> &'static str {
        match self {
            Subject::QemuNbd => "qemu-nbd",
            Subject::NbdkitFile => "nbdkit-file",
            Subject::BucketdiskFile => "bucketdisk-file",
            Subject::BucketdiskLocal => "bucketdisk-local",
            Subject::BucketdiskS3 => "bucketdisk-s3",
            Subject::BucketdiskS3Remote => "bucketdisk-s3-remote",
        }
    }

    fn kind(self) -> Kind {
        match self {
            Subject::QemuNbd => Kind::QemuNbd,
            Subject::NbdkitFile => Kind::NbdkitFile,
            Subject::BucketdiskFile => Kind::BucketdiskFile,
            Subject::BucketdiskLocal => Kind::BucketdiskLocal,
            Subject::BucketdiskS3 | Subject::BucketdiskS3Remote => Kind::BucketdiskS3Warm,
        }
    }

    fn extra_args(self) -> &'static [&'static str] {
        match self {
            Subject::BucketdiskS3Remote => &["--durability", "remote"],
            _ => &[],
        }
    }

    fn on_s3(self) -> bool {
        matches!(self, Subject::BucketdiskS3 | Subject::BucketdiskS3Remote)
    }

    /// The object engine: it has uploads to wait for after the job.
    fn uploads(self) -> bool {
        matches!(
            self,
            Subject::BucketdiskLocal | Subject::BucketdiskS3 | Subject::BucketdiskS3Remote
        )
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Bytes each job writes (1 MiB requests, sequential, from offset 0).
    #[arg(long, value_parser = parse_size, default_value = "4G")]
    size: u64,
    /// First-byte delay the latency proxy adds to every S3 response, in ms.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// Seconds per PUT ceiling measurement.
    #[arg(long, default_value_t = 10)]
    ceiling_secs: u64,
    /// Repeats of everything, interleaved.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Subjects (comma-separated) [qemu-nbd,nbdkit-file,bucketdisk-file,bucketdisk-local,
    /// bucketdisk-s3,bucketdisk-s3-remote].
    #[arg(long, value_delimiter = ',')]
    subjects: Option<Vec<String>>,
    #[command(flatten)]
    places: Places,
}

/// One PUT ceiling measurement and the CPU it took.
pub type CeilingRun = Measured<PutCeiling>;

/// One job of one subject.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub subject: Subject,
    pub repeat: usize,
    /// fio's bandwidth; its runtime includes the final fsync.
    pub fio_mib_per_sec: f64,
    /// From fio's start to its exit, measured here.
    pub fio_seconds: f64,
    /// After fio's exit, until nothing written waits for upload (object engine).
    pub settle_seconds: f64,
    /// Bytes written ÷ (fio + settle): durable in the store (bucketdisk-s3); the same as the
    /// fio figure with `--durability remote`, up to the settle check.
    pub until_uploaded_mib_per_sec: Option<f64>,
    /// CPU over the job and the settling.
    #[serde(flatten)]
    pub cpu: CpuSeconds,
    /// Store traffic over the job and the settling (S3 subjects).
    pub store: Traffic,
}

#[derive(Debug, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub run: RunInfo,
    pub size_bytes: u64,
    pub latency_ms: u64,
    pub repeats: usize,
    pub subjects: Vec<(String, String)>,
    pub ceilings: Vec<CeilingRun>,
    pub measurements: Vec<Measurement>,
    pub notes: Vec<String>,
}

pub fn run(args: Args, command: String) -> Result<()> {
    let chosen = crate::choose::by_name(
        &SUBJECTS,
        args.subjects.as_deref(),
        Subject::name,
        "subject",
    )?;
    ensure!(args.repeats > 0, "--repeats must be at least 1");
    let workspace = workspace_root();
    let bin = bucketdisk_binary(args.places.bucketdisk.as_deref(), &workspace)?;
    let tmp = args.places.scratch("bucketdisk-writes-")?;
    let mut run = RunInfo::begin(command, &bin, &workspace, tmp.path())?;
    // One job's data, its journal and its chunks (object engine), and moto's spooled copy.
    let need = 3 * args.size + (2 << 30);
    let free = machine::free_bytes(tmp.path())?;
    ensure!(
        free >= need,
        "{} has {} GiB free; one job needs {} GiB",
        tmp.path().display(),
        free >> 30,
        need >> 30
    );
    let (env, mut moto, proxy) = Env::on_moto(bin, tmp.path())?;
    proxy.set_delay(Duration::from_millis(args.latency_ms));
    let probe = StoreProbe::connect(&proxy.endpoint(), store_subjects::BUCKET)?;
    let steps = (args.repeats * (CEILING_IN_FLIGHT.len() + chosen.len())) as u64;
    let mut progress = Progress::new(steps);
    let mut notes = Vec::new();
    let mut subjects: Vec<(String, String)> = Vec::new();
    let mut ceilings = Vec::new();
    let mut measurements = Vec::new();

    for repeat in 0..args.repeats {
        for in_flight in CEILING_IN_FLIGHT {
            check_interrupted()?;
            progress.step(&format!(
                "repeat {} · moto PUT ceiling, {} MiB objects, {in_flight} in flight",
                repeat + 1,
                CEILING_PUT_BYTES >> 20
            ));
            let time = Duration::from_secs(args.ceiling_secs);
            ceilings.push(Measured::run(repeat, moto.pid(), || {
                probe.measure_puts(CEILING_PUT_BYTES, in_flight, time)
            })?);
            progress.step_done();
        }
        for &subject in &chosen {
            check_interrupted()?;
            progress.step(&format!(
                "repeat {} · {} · {} MiB of 1M writes, end_fsync",
                repeat + 1,
                subject.name(),
                args.size >> 20
            ));
            moto.ensure_running()?;
            reset(subject, &env, &probe)?;
            machine::flush_page_cache();
            let mut session = store_subjects::spawn(subject.kind(), &env, 0, subject.extra_args())?;
            session
                .wait_serving()
                .with_context(|| format!("starting {}", subject.name()))?;
            if subjects.iter().all(|(name, _)| name != subject.name()) {
                subjects.push((subject.name().to_string(), session.command_line.clone()));
            }
            let m = measure(
                subject,
                repeat,
                &mut session,
                &env,
                args.size,
                &proxy,
                &moto,
            )?;
            let (_, session_notes) = session.stop()?;
            notes.extend(session_notes);
            measurements.push(m);
            reset(subject, &env, &probe)?;
            progress.step_done();
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
        ceilings,
        measurements,
        notes,
    };
    let out_dir = args.places.out_dir(&workspace);
    let stem = report.run.stem("writes");
    let md = markdown(&report, &stem);
    crate::report::write_md_json(&out_dir, &stem, &md, &report)?;
    print!("{md}");
    Ok(())
}

/// One synced write job, then (object engine) the wait until its uploads settle.
fn measure(
    subject: Subject,
    repeat: usize,
    session: &mut Session,
    env: &Env,
    size: u64,
    proxy: &crate::latency_proxy::LatencyProxy,
    moto: &Moto,
) -> Result<Measurement> {
    let out = env.work.join(format!("{}-{repeat}.json", subject.name()));
    let before = proxy.traffic();
    let clock = CpuClock::start(session, moto.pid());
    let started = Instant::now();
    let fio = fio::synced_write_pass(size, &session.uri, &out)
        .with_context(|| format!("{}: the write job", subject.name()))?;
    let fio_seconds = started.elapsed().as_secs_f64();
    session.ensure_running()?;
    let settle_seconds = if subject.uploads() {
        session.wait_uploads_settled(SETTLE_TIMEOUT)?
    } else {
        0.0
    };
    let store = proxy.traffic().since(&before);
    let cpu = clock.stop(session, &fio, fio_seconds);
    let until_uploaded_mib_per_sec = subject
        .on_s3()
        .then(|| size as f64 / MIB / (fio_seconds + settle_seconds));
    Ok(Measurement {
        subject,
        repeat,
        fio_mib_per_sec: fio.bw_bytes / MIB,
        fio_seconds,
        settle_seconds,
        until_uploaded_mib_per_sec,
        cpu,
        store,
    })
}

/// Removes what a subject keeps, so its next job starts on an empty disk.
fn reset(subject: Subject, env: &Env, probe: &StoreProbe) -> Result<()> {
    match subject {
        Subject::QemuNbd | Subject::NbdkitFile => {
            let raw = env.raw_file();
            let file = std::fs::File::create(&raw)
                .with_context(|| format!("creating {}", raw.display()))?;
            file.set_len(store_subjects::DISK_BYTES)
                .with_context(|| format!("sizing {}", raw.display()))?;
        }
        Subject::BucketdiskFile => {
            machine::remove_dir(&env.work.join("file-store"))?;
            machine::remove_dir(&env.work.join("file-cache"))?;
        }
        Subject::BucketdiskLocal => {
            machine::remove_dir(&env.work.join("local-store"))?;
            machine::remove_dir(&env.work.join("local-cache"))?;
        }
        Subject::BucketdiskS3 | Subject::BucketdiskS3Remote => {
            machine::remove_dir(&env.warm_cache())?;
            probe.delete_prefix(S3_PREFIX)?;
        }
    }
    Ok(())
}

fn values(r: &Report, subject: Subject, f: fn(&Measurement) -> Option<f64>) -> Option<Summary> {
    Summary::of_iter(
        r.measurements
            .iter()
            .filter(|m| m.subject == subject)
            .filter_map(f),
    )
}

/// The better PUT ceiling of one repeat.
fn ceiling(r: &Report, repeat: usize) -> Option<f64> {
    r.ceilings
        .iter()
        .filter(|c| c.repeat == repeat)
        .map(|c| c.ceiling.mib_per_sec)
        .reduce(f64::max)
}

/// Per-repeat ratios of a subject's figure to a reference from the same repeat.
fn ratios(
    r: &Report,
    subject: Subject,
    figure: fn(&Measurement) -> Option<f64>,
    reference: impl Fn(usize) -> Option<f64>,
) -> Option<Summary> {
    Summary::of_iter(
        r.measurements
            .iter()
            .filter(|m| m.subject == subject)
            .filter_map(|m| Some(figure(m)? / reference(m.repeat)?)),
    )
}

fn fio_figure(m: &Measurement) -> Option<f64> {
    Some(m.fio_mib_per_sec)
}

fn uploaded_figure(m: &Measurement) -> Option<f64> {
    m.until_uploaded_mib_per_sec
}

fn subject_fio(r: &Report, subject: Subject, repeat: usize) -> Option<f64> {
    r.measurements
        .iter()
        .find(|m| m.subject == subject && m.repeat == repeat)
        .map(|m| m.fio_mib_per_sec)
}

/// A summary of totals as a summary per `unit`.
fn per(s: Summary, unit: f64) -> Summary {
    Summary {
        median: s.median / unit,
        min: s.min / unit,
        max: s.max / unit,
        n: s.n,
    }
}

fn markdown(r: &Report, stem: &str) -> String {
    let mut o = String::new();
    r.run.header(
        &mut o,
        "writes: the 1M sequential write floor",
        &[
            ("fio", r.run.tools.fio.clone()),
            ("qemu-nbd", r.run.tools.qemu_nbd.clone()),
            ("nbdkit", r.run.tools.nbdkit.clone()),
            ("bucketdisk", r.run.tools.bucketdisk_line()),
        ],
    );
    let _ = writeln!(
        o,
        "Every subject exports a 100 GiB disk, empty at the start of each job. One job: fio's nbd \
         engine writes the first {} MiB once in 1 MiB requests at QD8 (`--rw=write --bs=1M \
         --iodepth=8 --end_fsync=1`), so the job ends with an NBD FLUSH and its time includes \
         it. `sync` runs before each job. The object engine is then watched until nothing \
         written waits for upload (its metrics: no dirty bytes, no upload lag); for \
         bucketdisk-s3 the bytes ÷ (job + that wait) is its store-durable throughput. S3 \
         subjects use one moto behind a proxy adding {} ms to every response's first byte; \
         the PUT ceiling is a Rust S3 client PUTting {} MiB objects through the same proxy. \
         {} repeats, subjects round-robin; median (min–max); ratios are per repeat.\n",
        r.size_bytes >> 20,
        r.latency_ms,
        CEILING_PUT_BYTES >> 20,
        r.repeats
    );
    for (name, line) in &r.subjects {
        let _ = writeln!(o, "- **{name}**: `{line}`");
    }
    let _ = writeln!(o, "\n## Moto's PUT ceiling\n");
    let _ = writeln!(
        o,
        "| PUT size | in flight | MiB/s | moto CPU s per GiB | client + proxy CPU s per GiB |\n|---:|---:|---:|---:|---:|"
    );
    for in_flight in CEILING_IN_FLIGHT {
        let runs: Vec<&CeilingRun> = r
            .ceilings
            .iter()
            .filter(|c| c.ceiling.in_flight == in_flight)
            .collect();
        let per_gib = |f: fn(&CeilingRun) -> f64| {
            Summary::of_iter(runs.iter().map(|c| {
                let gib = (c.ceiling.puts * c.ceiling.put_bytes) as f64 / f64::from(1u32 << 30);
                f(c) / gib
            }))
        };
        let _ = writeln!(
            o,
            "| {} MiB | {in_flight} | {} | {} | {} |",
            CEILING_PUT_BYTES >> 20,
            show(
                Summary::of_iter(runs.iter().map(|c| c.ceiling.mib_per_sec)),
                0
            ),
            show(per_gib(|c| c.moto_cpu_seconds), 2),
            show(per_gib(|c| c.client_cpu_seconds), 2)
        );
    }

    let _ = writeln!(o, "\n## Floors\n");
    let _ = writeln!(
        o,
        "| measurement | result | floor | met |\n|---|---:|---|---|"
    );
    let met = |s: Option<Summary>| match s {
        Some(s) if s.min >= FLOOR => "yes",
        Some(s) if s.median >= FLOOR => "median only",
        Some(_) => "**no**",
        None => "not measured",
    };
    let local = ratios(r, Subject::BucketdiskLocal, fio_figure, |rep| {
        subject_fio(r, Subject::BucketdiskFile, rep)
    });
    let settled = ratios(r, Subject::BucketdiskS3, uploaded_figure, |rep| {
        ceiling(r, rep)
    });
    let remote = ratios(r, Subject::BucketdiskS3Remote, fio_figure, |rep| {
        ceiling(r, rep)
    });
    for (what, s) in [
        (
            "object engine, local-directory store ÷ local-file engine",
            local,
        ),
        ("bucketdisk-s3 until uploaded ÷ moto's PUT ceiling", settled),
        (
            "bucketdisk-s3 `--durability remote` ÷ moto's PUT ceiling",
            remote,
        ),
    ] {
        let _ = writeln!(o, "| {what} | {} | ≥ {FLOOR} | {} |", show(s, 2), met(s));
    }

    let _ = writeln!(o, "\n## Jobs\n");
    let _ = writeln!(
        o,
        "| subject | MiB/s to end_fsync | job s | then uploads settle s | MiB/s until uploaded | ÷ local-file engine | server CPU s | store PUTs | store MiB sent per GiB written |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let gib = r.size_bytes as f64 / f64::from(1u32 << 30);
    for (name, _) in &r.subjects {
        let Some(subject) = SUBJECTS.into_iter().find(|s| s.name() == name) else {
            continue;
        };
        let vs_file = ratios(r, subject, fio_figure, |rep| {
            subject_fio(r, Subject::BucketdiskFile, rep)
        });
        let _ = writeln!(
            o,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} |",
            show(values(r, subject, fio_figure), 0),
            show(values(r, subject, |m| Some(m.fio_seconds)), 1),
            show(values(r, subject, |m| Some(m.settle_seconds)), 1),
            show(values(r, subject, uploaded_figure), 0),
            show(vs_file, 2),
            show(values(r, subject, |m| Some(m.cpu.server_cpu_seconds)), 1),
            show(values(r, subject, |m| Some(m.store.puts as f64)), 0),
            show(
                values(r, subject, |m| Some(m.store.request_bytes as f64 / MIB))
                    .map(|s| per(s, gib)),
                0
            ),
        );
    }
    let cores = r.run.machine.nproc;
    crate::cpu_account::table_head(&mut o, cores, "written", "subject");
    for (name, _) in &r.subjects {
        let runs: Vec<(CpuSeconds, u64)> = r
            .measurements
            .iter()
            .filter(|m| m.subject.name() == name)
            .map(|m| (m.cpu, r.size_bytes))
            .collect();
        let cells = crate::cpu_account::row_cells(&runs, cores);
        let _ = writeln!(o, "| {name} | {cells} |");
    }
    let _ = writeln!(o);
    notes_section(&mut o, &r.notes);
    let _ = writeln!(o, "Raw numbers: `{stem}.json` beside this file.");
    o
}
