//! `verify`: what `bucketdisk verify` costs, on moto.
//!
//! - **memory on a 100 GiB volume**: a 100 GiB disk whose map has a row for every 64 KiB block
//!   (1.64 M rows, built directly; see `synthetic`), checked with `verify` and `verify --deep`;
//!   the command's peak RSS and time. (The built rows all point into one chunk, so `--deep`
//!   here reads little: this part is about the map walk.)
//! - **`--deep` against the store's GET ceiling**: `--region-gib` written through a server
//!   (fio, 1M sequential, incompressible), stopped cleanly (everything uploaded), then
//!   `verify --deep` reads every chunk back; its rate (chunk bytes in the store ÷ time) against
//!   the ceiling of GETs of the same size, kept 16 in flight (as `--deep` keeps them) on
//!   objects of the same size, measured in the same run, interleaved with the verify repeats.

use crate::moto;
use crate::process::{
    RssSampler, ServerProcess, check_interrupted, cpu_seconds, free_loopback_port,
};
use crate::progress::Progress;
use crate::run_info::RunInfo;
use crate::stats::{Summary, show};
use crate::store_ceiling::{Ceiling, Measured, StoreProbe};
use crate::store_subjects::{self, BUCKET, DISK_BYTES, Env};
use crate::synthetic::{self, Built};
use crate::workspace::{Places, bucketdisk_binary, workspace_root};
use anyhow::{Context, Result, bail};
use blockmap::replica::Layout;
use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use serde::Serialize;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;
const VOLUME: &str = "disk";
const BIG_PREFIX: &str = "verify-100g";
const REAL_PREFIX: &str = "verify-written";
/// GETs `verify --deep` keeps in flight.
const DEEP_IN_FLIGHT: usize = 16;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// GiB written through a server for the `--deep` rate (enough that the command's start,
    /// its map and its last few GETs are a small part of its time).
    #[arg(long, default_value_t = 4)]
    region_gib: u64,
    /// Repeats of `verify --deep` and of the ceiling, interleaved.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Seconds each ceiling measurement lasts.
    #[arg(long, default_value_t = 10)]
    ceiling_secs: u64,
    #[command(flatten)]
    places: Places,
}

/// One `bucketdisk verify` run.
#[derive(Debug, Clone, Serialize)]
struct Run {
    deep: bool,
    seconds: f64,
    peak_rss_bytes: u64,
    blocks: u64,
    chunks: u64,
    blocks_read: u64,
    /// CPU seconds (user + system) the command used, and moto meanwhile.
    cpu_seconds: f64,
    moto_cpu_seconds: f64,
}

/// CPU seconds (user + system) of this process's children waited for so far.
fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given; zeroed is a valid rusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

#[derive(Debug, Serialize)]
struct Report {
    #[serde(flatten)]
    run: RunInfo,
    built: Built,
    big: Vec<Run>,
    written_bytes: u64,
    chunk_objects: u64,
    chunk_bytes: u64,
    deep: Vec<Run>,
    ceilings: Vec<Measured<Ceiling>>,
}

fn verify_command(env: &Env, prefix: &str, deep: bool) -> Command {
    let mut cmd = Command::new(&env.bucketdisk);
    cmd.args(["verify", VOLUME, "--json"]);
    store_subjects::on_moto_store(&mut cmd, env, prefix)
        .env("BUCKETDISK_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if deep {
        cmd.arg("--deep");
    }
    cmd
}

/// Runs `verify` (with `--deep` if asked) on the volume under `prefix`: time, peak RSS and
/// what it checked; fails if it found damage.
fn verify(env: &Env, prefix: &str, deep: bool, moto_pid: Option<u32>) -> Result<Run> {
    let (cpu_before, moto_before) = (children_cpu_seconds(), cpu_seconds(moto_pid));
    let started = Instant::now();
    let child = verify_command(env, prefix, deep)
        .spawn()
        .context("starting bucketdisk verify")?;
    let sampler = RssSampler::start(child.id());
    let out = child.wait_with_output().context("waiting for verify")?;
    let seconds = started.elapsed().as_secs_f64();
    let (cpu_seconds, moto_cpu_seconds) = (
        children_cpu_seconds() - cpu_before,
        cpu_seconds(moto_pid) - moto_before,
    );
    let memory = sampler.finish();
    if !out.status.success() {
        bail!(
            "verify failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing verify --json")?;
    let state = &report["states"][0];
    let field = |name: &str| state[name].as_u64().unwrap_or(0);
    Ok(Run {
        deep,
        seconds,
        peak_rss_bytes: memory.hwm,
        blocks: field("blocks"),
        chunks: field("chunks"),
        blocks_read: field("blocks_read"),
        cpu_seconds,
        moto_cpu_seconds,
    })
}

/// The volume under `prefix` written with `bytes` through a server (1M sequential), stopped
/// cleanly so that every block is in the store.
fn write_through_server(env: &Env, prefix: &str, bytes: u64) -> Result<()> {
    let port = free_loopback_port()?;
    let cache = env.work.join("writer-cache");
    let cmd = store_subjects::bucketdisk_s3_at(env, prefix, port, &cache);
    let mut server = ServerProcess::spawn("bucketdisk", cmd, &env.work.join("writer.log"))?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    server.wait_until_serving(addr, Duration::from_secs(60))?;
    crate::fio::pass(
        "write",
        bytes,
        &format!("nbd://{addr}/"),
        &env.work.join("write.json"),
    )?;
    let status = server.stop_within(Duration::from_secs(600))?;
    if !status.success() {
        bail!("the writer did not stop cleanly: {status}");
    }
    Ok(())
}

/// The volume's chunk objects: how many, and their bytes.
fn chunk_objects(store: &Arc<dyn object_store::ObjectStore>, prefix: &str) -> Result<(u64, u64)> {
    let runtime = tokio::runtime::Runtime::new()?;
    let dir = StorePath::from(format!("{prefix}/{VOLUME}/chunks"));
    let objects: Vec<_> = runtime.block_on(store.list(Some(&dir)).try_collect())?;
    Ok((objects.len() as u64, objects.iter().map(|o| o.size).sum()))
}

pub fn run(args: Args, command: String) -> Result<()> {
    let workspace = workspace_root();
    let bin = bucketdisk_binary(args.places.bucketdisk.as_deref(), &workspace)?;
    let tmp = args.places.scratch("bucketdisk-verify-")?;
    let mut run = RunInfo::begin(command, &bin, &workspace, tmp.path())?;
    let (mut env, moto, proxy) = Env::on_moto(bin, tmp.path())?;
    // Straight to moto: a relay (even without delay) is one more hop whose cost the command
    // (a process of its own, new connections) and the in-process GET probe need not share alike.
    drop(proxy);
    env.s3_endpoint = format!("http://{}", moto.addr);
    let store = moto::client(&format!("http://{}", moto.addr), BUCKET)?;
    let mut progress = Progress::new(4 + 2 * args.repeats as u64);

    progress.step("building a 100 GiB volume with every block in its map");
    let rows = DISK_BYTES / u64::from(synthetic::BLOCK);
    let built = synthetic::build_volume_in(
        Arc::clone(&store),
        &StorePath::from(BIG_PREFIX),
        Layout::ObjectStore,
        VOLUME,
        DISK_BYTES,
        rows,
    )?;
    progress.step_done();
    progress.step("verify and verify --deep of the 100 GiB map");
    let moto_pid = moto.pid();
    let big = vec![
        verify(&env, BIG_PREFIX, false, moto_pid)?,
        verify(&env, BIG_PREFIX, true, moto_pid)?,
    ];
    for r in &big {
        eprintln!(
            "verify: 100 GiB map, deep {} — {:.1} s, peak RSS {:.0} MiB, {} blocks",
            r.deep,
            r.seconds,
            r.peak_rss_bytes as f64 / 1048576.0,
            r.blocks
        );
    }
    progress.step_done();

    progress.step(&format!("writing {} GiB through a server", args.region_gib));
    write_through_server(&env, REAL_PREFIX, args.region_gib * GIB)?;
    let (objects, chunk_bytes) = chunk_objects(&store, REAL_PREFIX)?;
    progress.step_done();
    progress.step("the GET ceiling's objects");
    // The ceiling's GETs are shaped like `--deep`'s: objects of the mean chunk's size, ranges
    // of the mean span of blocks in one (a chunk without its header, index and trailer).
    let object_bytes = chunk_bytes / objects.max(1);
    let blocks = args.region_gib * GIB / u64::from(synthetic::BLOCK);
    let framing = engine::chunk::framing_bytes(objects, blocks);
    let span_bytes = chunk_bytes.saturating_sub(framing) / objects.max(1);
    let probe = StoreProbe::new(&env.s3_endpoint, BUCKET, object_bytes)?;
    progress.step_done();
    let mut deep = Vec::new();
    let mut ceilings = Vec::new();
    for repeat in 0..args.repeats {
        check_interrupted()?;
        progress.step(&format!("repeat {}: verify --deep", repeat + 1));
        let r = verify(&env, REAL_PREFIX, true, moto_pid)?;
        eprintln!(
            "verify --deep: {:.1} s for {:.0} MiB of chunks ({:.0} MiB/s), CPU {:.1} s, moto {:.1} s",
            r.seconds,
            chunk_bytes as f64 / 1048576.0,
            chunk_bytes as f64 / 1048576.0 / r.seconds,
            r.cpu_seconds,
            r.moto_cpu_seconds
        );
        deep.push(r);
        progress.step_done();
        progress.step(&format!("repeat {}: the GET ceiling", repeat + 1));
        let c = Measured::run(repeat, moto_pid, || {
            probe.measure_from(
                engine::chunk::HEADER_BYTES,
                span_bytes,
                DEEP_IN_FLIGHT,
                Duration::from_secs(args.ceiling_secs),
            )
        })?;
        eprintln!(
            "ceiling: {:.0} MiB/s, CPU {:.1} s, moto {:.1} s",
            c.ceiling.mib_per_sec, c.client_cpu_seconds, c.moto_cpu_seconds
        );
        ceilings.push(c);
        progress.step_done();
    }
    progress.finish();
    run.finish();
    let report = Report {
        run,
        built,
        big,
        written_bytes: args.region_gib * GIB,
        chunk_objects: objects,
        chunk_bytes,
        deep,
        ceilings,
    };
    let out_dir = args.places.out_dir(&workspace);
    let stem = report.run.stem("verify");
    let md = markdown(&report);
    crate::report::write_md_json(&out_dir, &stem, &md, &report)?;
    print!("{md}");
    Ok(())
}

fn markdown(r: &Report) -> String {
    let mut md = String::new();
    r.run.header(
        &mut md,
        "verify: memory on a 100 GiB map, --deep against the store's GET ceiling",
        &[
            ("moto", moto::version_line()),
            ("bucketdisk", r.run.tools.bucketdisk_line()),
        ],
    );
    let _ = writeln!(
        md,
        "moto, no added latency. **The 100 GiB map**: a 100 GiB disk whose block map has a row \
         for each of its {} blocks (built directly; the rows point into one real chunk), \
         checked by `bucketdisk verify disk --json` and with `--deep`; peak RSS is the \
         command's VmHWM.\n",
        r.built.rows
    );
    let _ = writeln!(
        md,
        "| command | time | peak RSS | blocks checked | blocks read |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    for b in &r.big {
        let _ = writeln!(
            md,
            "| verify{} | {:.1} s | {:.0} MiB | {} | {} |",
            if b.deep { " --deep" } else { "" },
            b.seconds,
            b.peak_rss_bytes as f64 / 1048576.0,
            b.blocks,
            b.blocks_read
        );
    }
    let mib = r.chunk_bytes as f64 / 1048576.0;
    let rates: Vec<f64> = r.deep.iter().map(|d| mib / d.seconds).collect();
    let ceilings: Vec<f64> = r.ceilings.iter().map(|c| c.ceiling.mib_per_sec).collect();
    let ratios: Vec<f64> = rates.iter().zip(&ceilings).map(|(a, b)| a / b).collect();
    let (rate, ceiling, ratio) = (
        Summary::of(&rates),
        Summary::of(&ceilings),
        Summary::of(&ratios),
    );
    let _ = writeln!(
        md,
        "\n**`--deep` against the ceiling**: {} GiB written through a server (fio, 1M \
         sequential, incompressible), stopped cleanly: {} chunk objects, {mib:.0} MiB. \
         `verify --deep` reads every chunk back (one ranged GET each, {DEEP_IN_FLIGHT} in \
         flight) and checks every block's CRC; the ceiling is {DEEP_IN_FLIGHT} GETs shaped \
         like those kept in flight for the same run, interleaved with the verify repeats: \
         ranges of {:.2} MiB (a chunk's mean span of blocks) starting {} bytes into \
         objects of {:.2} MiB (the mean chunk). (Moto answers a range that is a whole object \
         without copying it, one that is not with a copy: a probe of whole objects would be \
         cheaper for moto than the reads it is held against.) Medians (min–max) of {} \
         repeats.\n",
        r.written_bytes / GIB,
        r.chunk_objects,
        r.ceilings
            .first()
            .map_or(0.0, |c| c.ceiling.get_bytes as f64 / 1048576.0),
        engine::chunk::HEADER_BYTES,
        mib / r.chunk_objects.max(1) as f64,
        r.deep.len()
    );
    let _ = writeln!(md, "| | MiB/s |\n|---|---:|");
    let _ = writeln!(md, "| `verify --deep` | {} |", show(rate, 0));
    let _ = writeln!(md, "| store GET ceiling | {} |", show(ceiling, 0));
    let _ = writeln!(md, "| ratio (per repeat) | {} |", show(ratio, 2));
    // Where the CPU goes: per GiB moved, the client's and moto's, and the cores busy.
    let gib = r.chunk_bytes as f64 / GIB as f64;
    let per_gib = |own: Vec<f64>, moto: Vec<f64>, busy: Vec<f64>| {
        format!(
            "{} | {} | {}",
            show(Summary::of(&own), 2),
            show(Summary::of(&moto), 2),
            show(Summary::of(&busy), 2)
        )
    };
    let _ = writeln!(
        md,
        "\nCPU seconds per GiB moved (the client's own and moto's) and cores busy over the \
         wall time (the machine has {}; moto shares them):\n\n| | client CPU s/GiB | moto \
         CPU s/GiB | cores busy |\n|---|---:|---:|---:|",
        r.run.machine.nproc
    );
    let _ = writeln!(
        md,
        "| `verify --deep` | {} |",
        per_gib(
            r.deep.iter().map(|d| d.cpu_seconds / gib).collect(),
            r.deep.iter().map(|d| d.moto_cpu_seconds / gib).collect(),
            r.deep
                .iter()
                .map(|d| (d.cpu_seconds + d.moto_cpu_seconds) / d.seconds)
                .collect(),
        )
    );
    let moved = |c: &Measured<Ceiling>| c.ceiling.mib_per_sec * c.ceiling.seconds / 1024.0;
    let _ = writeln!(
        md,
        "| GET ceiling | {} |",
        per_gib(
            r.ceilings
                .iter()
                .map(|c| c.client_cpu_seconds / moved(c))
                .collect(),
            r.ceilings
                .iter()
                .map(|c| c.moto_cpu_seconds / moved(c))
                .collect(),
            r.ceilings
                .iter()
                .map(|c| (c.client_cpu_seconds + c.moto_cpu_seconds) / c.ceiling.seconds)
                .collect(),
        )
    );
    let peak = r.deep.iter().map(|d| d.peak_rss_bytes).max().unwrap_or(0);
    let _ = writeln!(
        md,
        "\n`verify --deep` peak RSS on this volume: {:.0} MiB.",
        peak as f64 / 1048576.0
    );
    md
}
