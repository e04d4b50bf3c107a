//! `quick` and `full`: bucketdisk on a local-directory store and on S3 (cold and warm cache),
//! against the local limit (qemu-nbd, `nbdkit file`) and S3-backed peers (s3backer, nbdkit's S3
//! plugin), all in one run on this machine, the S3-backed ones behind one latency proxy in front
//! of one moto server. The two suites differ only in their defaults (see [`Profile`]).

use crate::compare_report::{self, Report, Run, SessionTraffic, Settings, SubjectLine};
use crate::fio::{self, RunSettings, Workload};
use crate::latency_proxy::{LatencyProxy, Traffic};
use crate::machine::{self, Machine, Tools};
use crate::moto::Moto;
use crate::plots;
use crate::process::check_interrupted;
use crate::progress::Progress;
use crate::store_subjects::{self, Env, Kind, Session};
use crate::suites::compare_clocks::{self, BootRun, HydrationRun, LitestreamRun, MkfsRun};
use crate::units::parse_size;
use crate::volume;
use crate::workspace::{Places, bucketdisk_binary, workspace_root};
use anyhow::{Context, Result, ensure};
use std::time::{Duration, Instant};

pub const WORKLOADS: [Workload; 7] = [
    w("randread-4k-qd1", "randread", "4k", 1),
    w("randwrite-4k-qd1", "randwrite", "4k", 1),
    w("randread-4k-qd32", "randread", "4k", 32),
    w("randwrite-4k-qd32", "randwrite", "4k", 32),
    w("read-1m-qd8", "read", "1M", 8),
    w("write-1m-qd8", "write", "1M", 8),
    w("randrw70-4k-qd32", "randrw", "4k", 32),
];

const fn w(name: &'static str, rw: &'static str, bs: &'static str, iodepth: u32) -> Workload {
    Workload {
        name,
        rw,
        bs,
        iodepth,
    }
}

/// How long a workload may wait for bucketdisk's uploads of the previous one's writes.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(600);

/// The defaults of each suite. `quick` must fit in 5 minutes (CI), `full` in 30.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Quick,
    Full,
}

impl Profile {
    fn name(self) -> &'static str {
        match self {
            Profile::Quick => "quick",
            Profile::Full => "full",
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds measured per fio run [2].
    #[arg(long)]
    runtime: Option<u64>,
    /// Seconds of ramp before each measurement [1].
    #[arg(long)]
    ramp: Option<u64>,
    /// Repeats of every run [quick: 1, full: 3].
    #[arg(long)]
    repeats: Option<usize>,
    /// Bytes at the start of each disk that fio works over [quick: 64M, full: 256M].
    #[arg(long, value_parser = parse_size)]
    region: Option<u64>,
    /// Added object-store first-byte latencies in ms, comma-separated [quick: 20, full: 0,20,50].
    #[arg(long, value_delimiter = ',')]
    latencies: Option<Vec<u64>>,
    /// Subjects to run (comma-separated names, e.g. qemu-nbd,bucketdisk-s3-warm) [all].
    #[arg(long, value_delimiter = ',')]
    subjects: Option<Vec<String>>,
    /// Workloads to run (comma-separated names) [all seven].
    #[arg(long, value_delimiter = ',')]
    workloads: Option<Vec<String>>,
    #[command(flatten)]
    places: Places,
}

/// Everything one measurement loop needs.
struct Ctx {
    env: Env,
    proxy: LatencyProxy,
    moto: Moto,
    settings: RunSettings,
    workloads: Vec<Workload>,
    progress: Progress,
    runs: Vec<Run>,
    boots: Vec<BootRun>,
    hydrations: Vec<HydrationRun>,
    mkfs: Vec<MkfsRun>,
    litestream: Vec<LitestreamRun>,
    sessions: Vec<SessionTraffic>,
    notes: Vec<String>,
    command_lines: Vec<SubjectLine>,
    cold_sessions: usize,
}

pub fn run(profile: Profile, args: Args, command: String) -> Result<()> {
    let quick = profile == Profile::Quick;
    let settings = Settings {
        runtime_secs: args.runtime.unwrap_or(2),
        ramp_secs: args.ramp.unwrap_or(1),
        repeats: args.repeats.unwrap_or(if quick { 1 } else { 3 }),
        region_bytes: args
            .region
            .unwrap_or(if quick { 64 << 20 } else { 256 << 20 }),
        latencies_ms: args
            .latencies
            .clone()
            .unwrap_or_else(|| if quick { vec![20] } else { vec![0, 20, 50] }),
    };
    ensure!(settings.repeats > 0, "--repeats must be at least 1");
    ensure!(!settings.latencies_ms.is_empty(), "--latencies is empty");
    let kinds: Vec<Kind> = match &args.subjects {
        None => store_subjects::ALL.to_vec(),
        Some(names) => names
            .iter()
            .map(|n| {
                store_subjects::ALL
                    .into_iter()
                    .find(|k| k.name() == n)
                    .with_context(|| format!("unknown subject {n}"))
            })
            .collect::<Result<_>>()?,
    };
    let workloads: Vec<Workload> = match &args.workloads {
        None => WORKLOADS.to_vec(),
        Some(names) => names
            .iter()
            .map(|n| {
                WORKLOADS
                    .into_iter()
                    .find(|w| w.name == n)
                    .with_context(|| format!("unknown workload {n}"))
            })
            .collect::<Result<_>>()?,
    };

    let workspace = workspace_root();
    let bin = bucketdisk_binary(args.places.bucketdisk.as_deref(), &workspace)?;
    let tools = Tools::probe(&bin, &workspace)?;
    let peer_versions = vec![
        (
            "s3backer".into(),
            machine::version_line("s3backer", &["--version"]),
        ),
        ("moto".into(), crate::moto::version_line()),
        (
            "nbdkit S3 plugin".into(),
            machine::version_line("dpkg-query", &["-W", "nbdkit-plugin-python"]),
        ),
    ];
    let load_before = machine::load_average();
    let (date, started) = machine::utc_now();
    let tmp = args.places.scratch("bucketdisk-compare-")?;
    let machine = Machine::probe(tmp.path());
    let suite_start = Instant::now();

    let (env, moto, proxy) = Env::on_moto(bin, tmp.path())?;
    // Moto keeps every object in memory: its peak says how close a run came to the RAM limit.
    let moto_memory = moto.pid().map(crate::process::RssSampler::start);
    let order = plan(&kinds, &settings.latencies_ms);
    let hydrate = kinds
        .iter()
        .any(|k| matches!(k, Kind::BucketdiskS3Cold | Kind::BucketdiskS3Warm));
    let steps = (count_steps(&order, &workloads) + order.len() as u64) * settings.repeats as u64
        + if hydrate {
            settings.latencies_ms.len() as u64
        } else {
            0
        }
        + mkfs_rows(&order).len() as u64 * settings.repeats as u64
        + if hydrate {
            (settings.latencies_ms.len() * settings.repeats) as u64
        } else {
            0
        };
    let mut ctx = Ctx {
        env,
        proxy,
        moto,
        settings: RunSettings {
            runtime_secs: settings.runtime_secs,
            ramp_secs: settings.ramp_secs,
            size: settings.region_bytes,
        },
        workloads,
        progress: Progress::new(steps),
        runs: Vec::new(),
        boots: Vec::new(),
        hydrations: Vec::new(),
        mkfs: Vec::new(),
        litestream: Vec::new(),
        sessions: Vec::new(),
        notes: Vec::new(),
        command_lines: Vec::new(),
        cold_sessions: 0,
    };
    ctx.progress.note(&format!(
        "{} in {}: {} subject rows × {} workloads × {} repeat(s)",
        profile.name(),
        tmp.path().display(),
        order.len(),
        ctx.workloads.len(),
        settings.repeats
    ));
    fill_disks(&mut ctx, &kinds)?;
    for repeat in 0..settings.repeats {
        for &(kind, latency) in &order {
            check_interrupted()?;
            ctx.moto.ensure_running()?;
            ctx.proxy
                .set_delay(Duration::from_millis(latency.unwrap_or(0)));
            let r = measure_subject(&mut ctx, kind, latency, repeat);
            tolerate(&mut ctx, r)?;
        }
        for &(kind, latency) in &order {
            check_interrupted()?;
            let r = measure_boot(&mut ctx, kind, latency, repeat);
            tolerate(&mut ctx, r)?;
        }
        if hydrate {
            for &lat in &settings.latencies_ms {
                check_interrupted()?;
                let r = measure_litestream(&mut ctx, lat, repeat);
                tolerate(&mut ctx, r)?;
            }
        }
    }
    if hydrate {
        for &lat in &settings.latencies_ms {
            check_interrupted()?;
            let r = measure_hydration(&mut ctx, lat);
            tolerate(&mut ctx, r)?;
        }
    }
    // Last: mkfs overwrites the start of every disk.
    let mut timed_out: Vec<(Kind, Option<u64>)> = Vec::new();
    for repeat in 0..settings.repeats {
        for (kind, latency) in mkfs_rows(&order) {
            check_interrupted()?;
            if timed_out.contains(&(kind, latency)) {
                ctx.progress.step_done();
                continue;
            }
            let r = measure_mkfs(&mut ctx, kind, latency, repeat);
            let Some(run) = tolerate(&mut ctx, r)? else {
                continue;
            };
            if run.seconds.is_none() {
                timed_out.push((kind, latency));
                ctx.notes.push(format!(
                    "mkfs.ext4 on {} did not finish within {:?}; not repeated",
                    compare_report::label(kind, latency),
                    compare_clocks::MKFS_TIMEOUT
                ));
            }
            ctx.mkfs.push(run);
        }
    }
    ctx.progress.finish();
    if let Some(m) = moto_memory.map(crate::process::RssSampler::finish) {
        ctx.notes.push(format!(
            "moto (objects in memory) peaked at {} MiB resident",
            m.hwm >> 20
        ));
    }

    let rows = compare_report::summarize(&ctx.runs, &ctx.workloads, &order);
    let out_dir = args.places.out_dir(&workspace);
    std::fs::create_dir_all(&out_dir)?;
    let stem = crate::report::free_stem(&out_dir, &format!("{}-{date}", profile.name()), &started)?;
    let mut report = Report {
        suite: profile.name().into(),
        date,
        started,
        finished: machine::utc_now().1,
        command,
        machine,
        load_before,
        load_after: machine::load_average(),
        tools,
        peer_versions,
        settings,
        workloads: ctx.workloads.clone(),
        subjects: ctx.command_lines.clone(),
        rows,
        runs: ctx.runs,
        boots: ctx.boots,
        hydrations: ctx.hydrations,
        mkfs: ctx.mkfs,
        litestream: ctx.litestream,
        sessions: ctx.sessions,
        plots: Vec::new(),
        notes: ctx.notes,
    };
    match plots::draw_all(&report, &out_dir, &stem) {
        Ok(files) => report.plots = files,
        Err(e) => report.notes.push(format!("plots not drawn: {e:#}")),
    }
    let md = compare_report::markdown(&report, &stem);
    let md_path = out_dir.join(format!("{stem}.md"));
    let json_path = out_dir.join(format!("{stem}.json"));
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    let json = serde_json::to_string_pretty(&report)? + "\n";
    std::fs::write(&json_path, json).with_context(|| format!("writing {}", json_path.display()))?;
    eprintln!(
        "{}: wrote {} and {} ({:.0} s)",
        profile.name(),
        md_path.display(),
        json_path.display(),
        suite_start.elapsed().as_secs_f64()
    );
    print!("{md}");
    Ok(())
}

/// One subject failing is noted and the suite goes on (a 30-minute run should not be lost to
/// one peer); an interrupt still stops everything.
fn tolerate<T>(ctx: &mut Ctx, result: Result<T>) -> Result<Option<T>> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            check_interrupted()?;
            let note = format!("failed, skipped: {e:#}");
            ctx.progress.note(&note);
            ctx.notes.push(note);
            Ok(None)
        }
    }
}

/// (subject, latency) rows in run order: local subjects once, S3-backed ones per latency.
fn plan(kinds: &[Kind], latencies: &[u64]) -> Vec<(Kind, Option<u64>)> {
    let mut order: Vec<(Kind, Option<u64>)> = kinds
        .iter()
        .filter(|k| !k.uses_s3())
        .map(|&k| (k, None))
        .collect();
    for &lat in latencies {
        order.extend(
            kinds
                .iter()
                .filter(|k| k.uses_s3())
                .map(|&k| (k, Some(lat))),
        );
    }
    order
}

/// A cold cache is only interesting to workloads that read.
fn runs_workload(kind: Kind, w: &Workload) -> bool {
    kind != Kind::BucketdiskS3Cold || w.rw.contains("read") || w.is_mixed()
}

fn count_steps(order: &[(Kind, Option<u64>)], workloads: &[Workload]) -> u64 {
    order
        .iter()
        .map(|&(k, _)| workloads.iter().filter(|w| runs_workload(k, w)).count() as u64)
        .sum()
}

/// Writes the region of every disk once, at no added latency, so reads read real data.
fn fill_disks(ctx: &mut Ctx, kinds: &[Kind]) -> Result<()> {
    let region = ctx.settings.size;
    if kinds.iter().any(|k| k.is_local_limit()) {
        ctx.progress
            .note("filling the raw file for qemu-nbd and nbdkit-file");
        let raw = ctx.env.raw_file();
        std::fs::File::create(&raw).with_context(|| format!("creating {}", raw.display()))?;
        volume::fill(&raw, region)?;
        let file = std::fs::OpenOptions::new().write(true).open(&raw)?;
        file.set_len(store_subjects::DISK_BYTES)
            .with_context(|| format!("extending {}", raw.display()))?;
    }
    // Cold and warm bucketdisk-s3 share one volume: fill it once (through the warm cache).
    let mut to_fill: Vec<Kind> = kinds
        .iter()
        .copied()
        .filter(|k| !k.is_local_limit())
        .collect();
    if to_fill.contains(&Kind::BucketdiskS3Cold) && !to_fill.contains(&Kind::BucketdiskS3Warm) {
        to_fill.push(Kind::BucketdiskS3Warm);
    }
    to_fill.retain(|k| *k != Kind::BucketdiskS3Cold);
    ctx.proxy.set_delay(Duration::ZERO);
    for kind in to_fill {
        check_interrupted()?;
        ctx.progress
            .note(&format!("filling {} MiB of {}", region >> 20, kind.name()));
        let t = Instant::now();
        let session = store_subjects::start(kind, &ctx.env, 0)?;
        let out = ctx.env.work.join(format!("fill-{}.json", kind.name()));
        fio::pass("write", region, &session.uri, &out)
            .with_context(|| format!("filling {}", kind.name()))?;
        let (_, notes) = session.stop()?;
        ctx.notes.extend(notes);
        ctx.progress.note(&format!(
            "filled {} in {:.1} s (clean stop included)",
            kind.name(),
            t.elapsed().as_secs_f64()
        ));
    }
    Ok(())
}

/// One session of `kind` (one per workload for the cold subject) and its workloads.
fn measure_subject(ctx: &mut Ctx, kind: Kind, latency: Option<u64>, repeat: usize) -> Result<()> {
    let label = compare_report::label(kind, latency);
    let workloads: Vec<Workload> = ctx
        .workloads
        .iter()
        .copied()
        .filter(|w| runs_workload(kind, w))
        .collect();
    if kind == Kind::BucketdiskS3Cold {
        for w in &workloads {
            ctx.cold_sessions += 1;
            let mut session = start_session(ctx, kind, &label)?;
            let before = ctx.proxy.traffic();
            let run = measure_one(ctx, &mut session, kind, latency, repeat, w);
            finish_session(ctx, session, before, run.map(|r| vec![r]))?;
        }
        return Ok(());
    }
    let mut session = start_session(ctx, kind, &label)?;
    if kind != Kind::NbdkitS3 && !kind.is_local_limit() {
        // Warm the caches (bucketdisk's block cache; s3backer's blocks and the page cache of
        // its FUSE file) the way a disk in use would be. nbdkit S3 has no cache to warm.
        ctx.progress
            .note(&format!("{label}: read pass to warm the cache"));
        let out = ctx.env.work.join("warm-pass.json");
        fio::pass("read", ctx.settings.size, &session.uri, &out)
            .with_context(|| format!("warming {label}"))?;
    }
    let before = ctx.proxy.traffic();
    let mut runs = Vec::new();
    let mut failed = None;
    let mut settle_waits: Vec<f64> = Vec::new();
    for w in &workloads {
        // bucketdisk uploads what a workload wrote after it: the next workload starts once
        // that is done, so warm rows measure the engine and not a concurrent upload.
        match session.wait_uploads_settled(SETTLE_TIMEOUT) {
            Ok(waited) if session.metrics.is_some() => settle_waits.push(waited),
            Ok(_) => {}
            Err(e) => {
                failed = Some(e.context(format!("{label}: waiting for uploads to settle")));
                break;
            }
        }
        match measure_one(ctx, &mut session, kind, latency, repeat, w) {
            Ok(r) => runs.push(r),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    if !settle_waits.is_empty() {
        ctx.notes.push(format!(
            "{label}, repeat {}: each workload started once uploads had settled (no dirty \
             bytes, no upload lag); waited {:.1} s in all, at most {:.1} s",
            repeat + 1,
            settle_waits.iter().sum::<f64>(),
            settle_waits.iter().copied().fold(0.0, f64::max)
        ));
    }
    finish_session(ctx, session, before, failed.map_or(Ok(runs), Err))
}

/// One cold boot of a subject (see [`compare_clocks::boot_once`]).
fn measure_boot(ctx: &mut Ctx, kind: Kind, latency: Option<u64>, repeat: usize) -> Result<()> {
    ctx.proxy
        .set_delay(Duration::from_millis(latency.unwrap_or(0)));
    let label = compare_report::label(kind, latency);
    ctx.progress
        .step(&format!("repeat {} · {label} · cold boot", repeat + 1));
    ctx.cold_sessions += 1;
    let run = compare_clocks::boot_once(
        kind,
        &ctx.env,
        &ctx.proxy,
        latency,
        ctx.cold_sessions,
        repeat,
    )
    .with_context(|| format!("{label}: cold boot"))?;
    ctx.boots.push(run);
    ctx.progress.step_done();
    Ok(())
}

/// The block map's peer: litestream restore of bucketdisk-s3's map at `latency` ms.
fn measure_litestream(ctx: &mut Ctx, latency: u64, repeat: usize) -> Result<()> {
    ctx.proxy.set_delay(Duration::from_millis(latency));
    ctx.progress.step(&format!(
        "repeat {} · litestream restore @{latency}ms",
        repeat + 1
    ));
    let run = compare_clocks::litestream_once(&ctx.env, &ctx.proxy, latency, repeat)
        .with_context(|| format!("litestream restore at {latency} ms"))?;
    ctx.litestream.push(run);
    ctx.progress.step_done();
    Ok(())
}

/// bucketdisk-s3 hydrating a fresh cache at `latency` ms, once (it is the slowest part).
fn measure_hydration(ctx: &mut Ctx, latency: u64) -> Result<()> {
    ctx.proxy.set_delay(Duration::from_millis(latency));
    ctx.progress.step(&format!(
        "bucketdisk-s3 @{latency}ms · hydration with reads"
    ));
    ctx.cold_sessions += 1;
    let run = compare_clocks::hydration_once(
        &ctx.env,
        &ctx.proxy,
        &ctx.settings,
        latency,
        ctx.cold_sessions,
        0,
        &mut ctx.notes,
    )
    .with_context(|| format!("hydration at {latency} ms"))?;
    ctx.hydrations.push(run);
    ctx.progress.step_done();
    Ok(())
}

/// The rows mkfs runs for: the cold subject would repeat the warm one (mkfs reads little).
fn mkfs_rows(order: &[(Kind, Option<u64>)]) -> Vec<(Kind, Option<u64>)> {
    order
        .iter()
        .copied()
        .filter(|(k, _)| *k != Kind::BucketdiskS3Cold)
        .collect()
}

fn measure_mkfs(ctx: &mut Ctx, kind: Kind, latency: Option<u64>, repeat: usize) -> Result<MkfsRun> {
    ctx.proxy
        .set_delay(Duration::from_millis(latency.unwrap_or(0)));
    let label = compare_report::label(kind, latency);
    ctx.progress
        .step(&format!("repeat {} · {label} · mkfs.ext4", repeat + 1));
    ctx.cold_sessions += 1;
    let run = compare_clocks::mkfs_once(
        kind,
        &ctx.env,
        &ctx.proxy,
        latency,
        ctx.cold_sessions,
        repeat,
    )
    .with_context(|| format!("{label}: mkfs.ext4"))?;
    ctx.progress.step_done();
    Ok(run)
}

fn start_session(ctx: &mut Ctx, kind: Kind, label: &str) -> Result<Session> {
    let session = store_subjects::start(kind, &ctx.env, ctx.cold_sessions)
        .with_context(|| format!("starting {label}"))?;
    if !ctx.command_lines.iter().any(|c| c.subject == kind) {
        ctx.command_lines.push(SubjectLine {
            subject: kind,
            command_line: session.command_line.clone(),
        });
    }
    Ok(session)
}

/// Stops the session and files its runs with the session's peak memory, and for an S3-backed
/// subject the store traffic from `before` to the end of the stop (write-back included).
fn finish_session(
    ctx: &mut Ctx,
    session: Session,
    before: Traffic,
    runs: Result<Vec<Run>>,
) -> Result<()> {
    let (memory, notes) = session.stop()?;
    ctx.notes.extend(notes);
    let runs = runs?;
    if let Some(first) = runs.first().filter(|r| r.subject.uses_s3()) {
        ctx.sessions.push(SessionTraffic {
            subject: first.subject,
            latency_ms: first.latency_ms,
            repeat: first.repeat,
            fio_bytes: runs.iter().map(|r| r.fio.io_bytes).sum(),
            store: ctx.proxy.traffic().since(&before),
        });
    }
    for mut r in runs {
        r.session_peak_rss_bytes = memory.hwm;
        ctx.runs.push(r);
    }
    Ok(())
}

fn measure_one(
    ctx: &mut Ctx,
    session: &mut Session,
    kind: Kind,
    latency: Option<u64>,
    repeat: usize,
    w: &Workload,
) -> Result<Run> {
    check_interrupted()?;
    let label = compare_report::label(kind, latency);
    ctx.progress
        .step(&format!("repeat {} · {label} · {}", repeat + 1, w.name));
    let out = ctx
        .env
        .work
        .join(format!("{}-{}-{repeat}.json", kind.name(), w.name));
    let traffic_before = ctx.proxy.traffic();
    let cpu_before = session.cpu_time();
    let t = Instant::now();
    let target = fio::Target::Nbd {
        uri: session.uri.clone(),
    };
    let result = fio::run(w, &target, &ctx.settings, &out)
        .with_context(|| format!("{label}: {}", w.name))?;
    let wall = t.elapsed();
    session.ensure_running()?;
    ctx.progress.step_done();
    Ok(Run {
        subject: kind,
        latency_ms: latency,
        workload: w.name,
        repeat,
        fio: result,
        wall_secs: wall.as_secs_f64(),
        server_cpu_secs: session.cpu_time().saturating_sub(cpu_before).as_secs_f64(),
        store: kind
            .uses_s3()
            .then(|| ctx.proxy.traffic().since(&traffic_before)),
        session_peak_rss_bytes: 0,
    })
}
