//! `cold`: reads on a host that has never seen the disk, against what the store itself serves.
//! One moto behind the latency proxy holds every S3-backed subject's disk; a region of each is
//! written once (at no added latency), then every repeat measures, interleaved:
//! - the store's ceilings: ranged GETs straight from a Rust S3 client through the same proxy
//!   (1 MiB and 4 MiB with 8 in flight — the large-GET ceiling is the better of the two — and
//!   4 KiB with 32 in flight);
//! - for each subject, started with nothing cached: one 1M sequential read pass of the region
//!   at QD8, and 4k random reads at QD32 for a fixed time, in fresh sessions.
//!
//! bucketdisk must reach 0.9× the large-GET ceiling on the pass and 0.9× the small-GET ceiling
//! on the random reads, and be ahead of nbdkit's S3 plugin.

use crate::cpu_account::{CpuClock, CpuSeconds};
use crate::fio::{self, RunSettings, Workload};
use crate::latency_proxy::Traffic;
use crate::process::check_interrupted;
use crate::progress::Progress;
use crate::report::notes_section;
use crate::run_info::RunInfo;
use crate::stats::{Summary, show};
use crate::store_ceiling::{Ceiling, Measured, StoreProbe};
use crate::store_subjects::{self, Env, Kind};
use crate::units::parse_size;
use crate::workspace::{Places, bucketdisk_binary, workspace_root};
use anyhow::{Context, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

const SUBJECTS: [Kind; 3] = [Kind::BucketdiskS3Cold, Kind::NbdkitS3, Kind::S3backer];
const RANDOM: Workload = Workload {
    name: "randread-4k-qd32",
    rw: "randread",
    bs: "4k",
    iodepth: 32,
};
/// (GET size, in flight) of each ceiling.
const LARGE_CEILINGS: [(u64, usize); 2] = [(1 << 20, 8), (4 << 20, 8)];
const SMALL_CEILING: (u64, usize) = (4096, 32);
/// The size of the objects the GET ceilings read: bucketdisk's chunk size (`--chunk-size`
/// default), the objects its cold reads GET ranges of.
const CEILING_OBJECT_BYTES: u64 = 24 << 20;
const FLOOR: f64 = 0.9;
const MIB: f64 = 1_048_576.0;
const GIB: f64 = 1_073_741_824.0;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// First-byte delay the latency proxy adds to every S3 response, in ms.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// Bytes at the start of each disk that are written, then read cold.
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    region: u64,
    /// Seconds of 4k random reads per subject and repeat.
    #[arg(long, default_value_t = 15)]
    random_secs: u64,
    /// Seconds per store ceiling measurement.
    #[arg(long, default_value_t = 5)]
    ceiling_secs: u64,
    /// Repeats of everything, interleaved.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Subjects (comma-separated) [bucketdisk-s3-cold,nbdkit-s3,s3backer].
    #[arg(long, value_delimiter = ',')]
    subjects: Option<Vec<String>>,
    #[command(flatten)]
    places: Places,
}

/// One measurement of one subject.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub subject: &'static str,
    pub workload: &'static str,
    pub repeat: usize,
    /// MiB/s for the pass, IOPS for random reads.
    pub value: f64,
    pub seconds: f64,
    pub bytes_read: u64,
    pub store: Traffic,
    /// CPU over the measurement.
    #[serde(flatten)]
    pub cpu: CpuSeconds,
}

#[derive(Debug, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub run: RunInfo,
    pub latency_ms: u64,
    pub region_bytes: u64,
    pub random_secs: u64,
    pub repeats: usize,
    pub subjects: Vec<(String, String)>,
    pub ceilings: Vec<Measured<Ceiling>>,
    pub measurements: Vec<Measurement>,
    pub notes: Vec<String>,
}

pub fn run(args: Args, command: String) -> Result<()> {
    let kinds = crate::choose::by_name(&SUBJECTS, args.subjects.as_deref(), Kind::name, "subject")?;
    let workspace = workspace_root();
    let bin = bucketdisk_binary(args.places.bucketdisk.as_deref(), &workspace)?;
    let tmp = args.places.scratch("bucketdisk-cold-")?;
    let mut run = RunInfo::begin(command, &bin, &workspace, tmp.path())?;
    let (env, moto, proxy) = Env::on_moto(bin, tmp.path())?;
    let steps = (args.repeats * (LARGE_CEILINGS.len() + 1 + 2 * kinds.len()) + kinds.len()) as u64;
    let mut progress = Progress::new(steps);
    let mut notes = Vec::new();
    let mut subjects = Vec::new();

    for &kind in &kinds {
        check_interrupted()?;
        // The cold subject reads the volume the warm one writes (one volume, fresh caches).
        let filler = if kind == Kind::BucketdiskS3Cold {
            Kind::BucketdiskS3Warm
        } else {
            kind
        };
        progress.step(&format!(
            "filling {} MiB of {}",
            args.region >> 20,
            kind.name()
        ));
        let session = store_subjects::start(filler, &env, 0)?;
        let out = env.work.join(format!("fill-{}.json", kind.name()));
        fio::pass("write", args.region, &session.uri, &out)
            .with_context(|| format!("filling {}", kind.name()))?;
        let (_, session_notes) = session.stop()?;
        notes.extend(session_notes);
        progress.step_done();
    }

    proxy.set_delay(Duration::from_millis(args.latency_ms));
    let probe = StoreProbe::new(
        &proxy.endpoint(),
        store_subjects::BUCKET,
        CEILING_OBJECT_BYTES,
    )?;
    let mut ceilings = Vec::new();
    let mut measurements = Vec::new();
    let mut cold_index = 0;
    let random_settings = RunSettings {
        runtime_secs: args.random_secs,
        ramp_secs: 0,
        size: args.region,
    };
    for repeat in 0..args.repeats {
        for (bytes, in_flight) in LARGE_CEILINGS.into_iter().chain([SMALL_CEILING]) {
            check_interrupted()?;
            progress.step(&format!(
                "repeat {} · store ceiling: {} KiB GETs, {in_flight} in flight",
                repeat + 1,
                bytes >> 10
            ));
            let time = Duration::from_secs(args.ceiling_secs);
            ceilings.push(Measured::run(repeat, moto.pid(), || {
                probe.measure(bytes, in_flight, time)
            })?);
            progress.step_done();
        }
        for &kind in &kinds {
            for workload in ["read-1m-qd8-pass", RANDOM.name] {
                check_interrupted()?;
                progress.step(&format!(
                    "repeat {} · {} · {workload} (cold)",
                    repeat + 1,
                    kind.name()
                ));
                cold_index += 1;
                let mut session = store_subjects::start(kind, &env, cold_index)?;
                if subjects
                    .iter()
                    .all(|(k, _): &(String, String)| k != kind.name())
                {
                    subjects.push((kind.name().to_string(), session.command_line.clone()));
                }
                let out = env
                    .work
                    .join(format!("{}-{workload}-{repeat}.json", kind.name()));
                let before = proxy.traffic();
                let clock = CpuClock::start(&session, moto.pid());
                let t = Instant::now();
                let r = if workload == RANDOM.name {
                    let target = fio::Target::Nbd {
                        uri: session.uri.clone(),
                    };
                    fio::run(&RANDOM, &target, &random_settings, &out)?
                } else {
                    fio::pass_with("read", "1M", 8, args.region, &session.uri, &out)?
                };
                let seconds = t.elapsed().as_secs_f64();
                let (value, bytes_read) = if workload == RANDOM.name {
                    (r.iops, r.io_bytes)
                } else {
                    (r.bw_bytes / MIB, r.io_bytes)
                };
                let store = proxy.traffic().since(&before);
                let cpu = clock.stop(&session, &r, seconds);
                session.ensure_running()?;
                let (_, session_notes) = session.stop()?;
                notes.extend(session_notes);
                measurements.push(Measurement {
                    subject: kind.name(),
                    workload: if workload == RANDOM.name {
                        RANDOM.name
                    } else {
                        "read-1m-qd8-pass"
                    },
                    repeat,
                    value,
                    seconds,
                    bytes_read,
                    store,
                    cpu,
                });
                progress.step_done();
            }
        }
    }
    progress.finish();

    run.finish();
    let report = Report {
        run,
        latency_ms: args.latency_ms,
        region_bytes: args.region,
        random_secs: args.random_secs,
        repeats: args.repeats,
        subjects,
        ceilings,
        measurements,
        notes,
    };
    let out_dir = args.places.out_dir(&workspace);
    let stem = report.run.stem("cold");
    let md = markdown(&report, &stem);
    crate::report::write_md_json(&out_dir, &stem, &md, &report)?;
    print!("{md}");
    Ok(())
}

/// Per-repeat ratios of a subject's value to a per-repeat reference (same repeat: the two ran
/// minutes apart at most).
fn ratios(
    r: &Report,
    subject: &str,
    workload: &str,
    reference: impl Fn(usize) -> Option<f64>,
) -> Option<Summary> {
    Summary::of_iter(
        r.measurements
            .iter()
            .filter(|m| m.subject == subject && m.workload == workload)
            .filter_map(|m| reference(m.repeat).map(|x| m.value / x)),
    )
}

fn large_ceiling(r: &Report, repeat: usize) -> Option<f64> {
    r.ceilings
        .iter()
        .filter(|m| m.repeat == repeat && m.ceiling.get_bytes > SMALL_CEILING.0)
        .map(|m| m.ceiling.mib_per_sec)
        .reduce(f64::max)
}

fn small_ceiling(r: &Report, repeat: usize) -> Option<f64> {
    r.ceilings
        .iter()
        .find(|m| m.repeat == repeat && m.ceiling.get_bytes == SMALL_CEILING.0)
        .map(|m| m.ceiling.gets_per_sec)
}

fn subject_value(r: &Report, subject: &str, workload: &str, repeat: usize) -> Option<f64> {
    r.measurements
        .iter()
        .find(|m| m.subject == subject && m.workload == workload && m.repeat == repeat)
        .map(|m| m.value)
}

/// What each GiB read cost every process, and the rate the cores allow at that cost.
fn cpu_section(o: &mut String, r: &Report) {
    let cores = r.run.machine.nproc;
    crate::cpu_account::table_head(o, cores, "read", "subject | workload");
    for (subject, _) in &r.subjects {
        for workload in ["read-1m-qd8-pass", RANDOM.name] {
            let runs: Vec<(CpuSeconds, u64)> = r
                .measurements
                .iter()
                .filter(|m| m.subject == subject && m.workload == workload)
                .map(|m| (m.cpu, m.bytes_read))
                .collect();
            let cells = crate::cpu_account::row_cells(&runs, cores);
            let _ = writeln!(o, "| {subject} | {workload} | {cells} |");
        }
    }
    let _ = writeln!(o);
}

fn markdown(r: &Report, stem: &str) -> String {
    let mut o = String::new();
    r.run.header(
        &mut o,
        "cold: reads with nothing cached",
        &[
            ("fio", r.run.tools.fio.clone()),
            ("nbdkit", r.run.tools.nbdkit.clone()),
            ("bucketdisk", r.run.tools.bucketdisk_line()),
        ],
    );
    let _ = writeln!(
        o,
        "Every subject exports a 100 GiB disk whose first {} MiB were written once (1M writes, no \
         added latency); the store is one moto behind a proxy that delays the first byte of \
         every response by {} ms. Each measurement starts the subject with nothing cached: \
         `read-1m-qd8-pass` reads the region once in 1 MiB requests at QD8 (MiB/s); \
         `randread-4k-qd32` reads 4 KiB at random offsets of the region for {} s at QD32 \
         (IOPS). The store ceilings are ranged GETs from a Rust S3 client through the same \
         proxy, from {} MiB objects (bucketdisk's chunk size: moto reads a whole object to \
         answer a range, so GETs from larger objects cost it more). {} repeats, interleaved; median (min–max); ratios are per repeat.\n",
        r.region_bytes >> 20,
        r.latency_ms,
        r.random_secs,
        CEILING_OBJECT_BYTES >> 20,
        r.repeats
    );
    for (name, line) in &r.subjects {
        let _ = writeln!(o, "- **{name}**: `{line}`");
    }
    let _ = writeln!(o, "\n## Store ceilings\n");
    let _ = writeln!(
        o,
        "| GET size | in flight | GETs/s | MiB/s | moto CPU s per GiB | client + proxy CPU s per GiB |\n|---:|---:|---:|---:|---:|---:|"
    );
    for (bytes, in_flight) in LARGE_CEILINGS.into_iter().chain([SMALL_CEILING]) {
        let runs: Vec<&Measured<Ceiling>> = r
            .ceilings
            .iter()
            .filter(|m| m.ceiling.get_bytes == bytes && m.ceiling.in_flight == in_flight)
            .collect();
        let of =
            |f: &dyn Fn(&Measured<Ceiling>) -> f64| Summary::of_iter(runs.iter().map(|m| f(m)));
        let gib = |m: &Measured<Ceiling>| (m.ceiling.gets * bytes) as f64 / GIB;
        let _ = writeln!(
            o,
            "| {} KiB | {in_flight} | {} | {} | {} | {} |",
            bytes >> 10,
            show(of(&|m| m.ceiling.gets_per_sec), 0),
            show(of(&|m| m.ceiling.mib_per_sec), 1),
            show(of(&|m| m.moto_cpu_seconds / gib(m)), 2),
            show(of(&|m| m.client_cpu_seconds / gib(m)), 2)
        );
    }
    let _ = writeln!(o, "\n## Floors\n");
    let _ = writeln!(
        o,
        "| measurement | result | floor | met |\n|---|---:|---|---|"
    );
    let bd = Kind::BucketdiskS3Cold.name();
    let seq = ratios(r, bd, "read-1m-qd8-pass", |rep| large_ceiling(r, rep));
    let rnd = ratios(r, bd, RANDOM.name, |rep| small_ceiling(r, rep));
    let vs_nbdkit = ratios(r, bd, "read-1m-qd8-pass", |rep| {
        subject_value(r, Kind::NbdkitS3.name(), "read-1m-qd8-pass", rep)
    });
    let met = |s: Option<Summary>, floor: f64| match s {
        Some(s) if s.min >= floor => "yes",
        Some(s) if s.median >= floor => "median only",
        Some(_) => "**no**",
        None => "not measured",
    };
    let _ = writeln!(
        o,
        "| cold 1M sequential read QD8 ÷ large-GET ceiling | {} | ≥ {FLOOR} | {} |",
        show(seq, 2),
        met(seq, FLOOR)
    );
    let _ = writeln!(
        o,
        "| cold 4k random read QD32 ÷ small-GET ceiling | {} | ≥ {FLOOR} | {} |",
        show(rnd, 2),
        met(rnd, FLOOR)
    );
    let _ = writeln!(
        o,
        "| cold 1M sequential read ÷ nbdkit's S3 plugin | {} | > 1 | {} |",
        show(vs_nbdkit, 1),
        met(vs_nbdkit, 1.0)
    );
    for (workload, unit) in [("read-1m-qd8-pass", "MiB/s"), (RANDOM.name, "IOPS")] {
        let _ = writeln!(o, "\n## {workload} ({unit})\n");
        let _ = writeln!(
            o,
            "| subject | {unit} | ÷ ceiling | store GETs per GiB read | store MiB per GiB read |\n|---|---:|---:|---:|---:|"
        );
        for (subject, _) in &r.subjects {
            let rows: Vec<&Measurement> = r
                .measurements
                .iter()
                .filter(|m| m.subject == subject && m.workload == workload)
                .collect();
            let per_gib = |f: fn(&Traffic) -> f64| {
                Summary::of_iter(
                    rows.iter()
                        .filter(|m| m.bytes_read > 0)
                        .map(|m| f(&m.store) / (m.bytes_read as f64 / GIB)),
                )
            };
            let ceiling = ratios(r, subject, workload, |rep| {
                if workload == RANDOM.name {
                    small_ceiling(r, rep)
                } else {
                    large_ceiling(r, rep)
                }
            });
            let _ = writeln!(
                o,
                "| {subject} | {} | {} | {} | {} |",
                show(Summary::of_iter(rows.iter().map(|m| m.value)), 1),
                show(ceiling, 2),
                show(per_gib(|t| t.gets as f64), 0),
                show(per_gib(|t| t.response_bytes as f64 / MIB), 0)
            );
        }
    }
    cpu_section(&mut o, r);
    notes_section(&mut o, &r.notes);
    let _ = writeln!(o, "Raw numbers: `{stem}.json` beside this file.");
    o
}
