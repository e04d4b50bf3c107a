//! `sustained`: bucketdisk under loads that run long enough for the store to matter.
//!
//! 1. `sparse-fill` — one 4 KiB write in every 64 KiB block of a large volume on S3 (moto
//!    behind the latency proxy), the server's upload metrics sampled every 5 s; a clean stop,
//!    then a cold boot from the store alone: every block present, sample regions verified.
//! 2. `stall` — the same with the store frozen (moto SIGSTOPped) part-way through: writers
//!    may wait, but must not fail.
//! 3. `space` — 4 KiB random overwrites of 1 GiB on the local-directory store: stored bytes
//!    against live bytes (garbage collection keeping up), bytes PUT against bytes written.
//! 4. `gc-cost` — the same overwrites with garbage collection on and off (`serve --no-gc`).
//!
//! Each part runs in its own scratch directory (deleted afterwards); the servers' logs are
//! kept in a directory beside it and scanned for warnings and errors.

mod cold;
mod fill;
mod fio_job;
mod floors;
mod markdown;
mod overwrite;
mod plot;
mod server;

use crate::machine::{self, Machine};
use crate::process::{check_interrupted, output_of};
use crate::units::parse_size;
use crate::workspace::{Places, bucketdisk_binary, workspace_root};
use anyhow::{Context, Result, ensure};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const SUITE: &str = "sustained";
const KIB: u64 = 1 << 10;
const GIB: u64 = 1 << 30;

/// The parts of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Part {
    SparseFill,
    Stall,
    Space,
    GcCost,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Part::SparseFill => "sparse-fill",
            Part::Stall => "stall",
            Part::Space => "space",
            Part::GcCost => "gc-cost",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Parts to run, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "sparse-fill,stall,space,gc-cost"
    )]
    parts: Vec<Part>,
    /// Volume size the sparse fill covers, one 4 KiB write per 64 KiB block.
    #[arg(long, value_parser = parse_size, default_value = "100G")]
    fill_size: u64,
    /// Volume size of the stall part's fill.
    #[arg(long, value_parser = parse_size, default_value = "20G")]
    stall_fill_size: u64,
    /// First-byte delay the latency proxy adds to every S3 response, in ms.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// Bytes of each of the three regions (start, middle, end) verified after the cold boot.
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    verify_region: u64,
    /// How long the store stays stalled (moto SIGSTOPped), in seconds.
    #[arg(long, default_value_t = 30)]
    stall_secs: u64,
    /// When the stall starts: once fio has written this share of the fill (0–1).
    #[arg(long, default_value_t = 0.4)]
    stall_at: f64,
    /// `serve --journal-limit` for the stall part's server. Writers only wait for a stalled
    /// store once this much written data is journaled (default 4 GiB, more than a 20 GiB sparse
    /// fill writes); a smaller limit makes them wait during the stall.
    #[arg(long, value_parser = parse_size)]
    stall_journal_limit: Option<u64>,
    /// Minutes of random overwrites in the space part.
    #[arg(long, default_value_t = 20.0)]
    space_minutes: f64,
    /// Minutes of random overwrites per gc-cost run.
    #[arg(long, default_value_t = 3.0)]
    gc_cost_minutes: f64,
    /// gc-cost runs per mode (GC on, GC off), interleaved.
    #[arg(long, default_value_t = 2)]
    repeats: usize,
    #[command(flatten)]
    places: Places,
}

/// The settings of a run, as the report records them.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub parts: Vec<Part>,
    pub fill_bytes: u64,
    pub stall_fill_bytes: u64,
    pub latency_ms: u64,
    pub verify_region_bytes: u64,
    pub stall_secs: u64,
    pub stall_at: f64,
    pub stall_journal_limit: Option<u64>,
    pub space_minutes: f64,
    pub gc_cost_minutes: f64,
    pub repeats: usize,
}

/// What every part needs.
pub struct Ctx {
    bin: PathBuf,
    /// Scratch directory of this run; each part works in a subdirectory it deletes.
    work: PathBuf,
    /// Server and moto logs, kept after the run.
    logs: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct Tools {
    pub fio: String,
    pub moto: String,
    pub bucketdisk: String,
    /// `git rev-parse HEAD` of the workspace, "-dirty" if the tree has changes.
    pub commit: String,
}

/// One floor next to its measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Floor {
    pub part: Part,
    pub measurement: String,
    pub value: String,
    pub floor: String,
    /// `None`: not measured (e.g. a space run shorter than the settling time).
    pub met: Option<bool>,
}

/// Everything a results file holds.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub suite: &'static str,
    pub started: String,
    pub finished: String,
    pub elapsed_secs: f64,
    pub command: String,
    pub machine: Machine,
    pub load_before: String,
    pub load_after: String,
    pub tools: Tools,
    pub settings: Settings,
    pub floors: Vec<Floor>,
    pub sparse_fill: Option<fill::FillResult>,
    pub stall: Option<fill::FillResult>,
    pub space: Option<overwrite::SpaceResult>,
    pub gc_cost: Option<overwrite::GcCostResult>,
    /// PNG files beside the report.
    pub plots: Vec<String>,
    /// Where the servers' logs were kept.
    pub logs_dir: String,
    /// Anything odd: failed parts, unclean stops, warnings in the server logs.
    pub notes: Vec<String>,
}

pub fn run(args: Args, command: String) -> Result<()> {
    validate(&args)?;
    let settings = Settings {
        parts: args.parts.clone(),
        fill_bytes: args.fill_size,
        stall_fill_bytes: args.stall_fill_size,
        latency_ms: args.latency_ms,
        verify_region_bytes: args.verify_region,
        stall_secs: args.stall_secs,
        stall_at: args.stall_at,
        stall_journal_limit: args.stall_journal_limit,
        space_minutes: args.space_minutes,
        gc_cost_minutes: args.gc_cost_minutes,
        repeats: args.repeats,
    };
    let workspace = workspace_root();
    let bin = bucketdisk_binary(args.places.bucketdisk.as_deref(), &workspace)?;
    let tools = probe_tools(&bin, &workspace)?;
    let load_before = machine::load_average();
    let (_, started) = machine::utc_now();
    let stamp = stamp_of(&started);
    let tmp = args.places.scratch("bucketdisk-sustained-")?;
    let logs = args.places.dir.join(format!(
        "bucketdisk-sustained-logs-{stamp}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let machine = Machine::probe(tmp.path());
    eprintln!(
        "sustained: working in {} ({}), logs in {}, load {load_before}",
        tmp.path().display(),
        machine.filesystem,
        logs.display()
    );
    let ctx = Ctx {
        bin,
        work: tmp.path().to_path_buf(),
        logs: logs.clone(),
    };
    let suite_start = Instant::now();
    let mut report = Report {
        suite: SUITE,
        started,
        finished: String::new(),
        elapsed_secs: 0.0,
        command,
        machine,
        load_before,
        load_after: String::new(),
        tools,
        settings,
        floors: Vec::new(),
        sparse_fill: None,
        stall: None,
        space: None,
        gc_cost: None,
        plots: Vec::new(),
        logs_dir: logs.display().to_string(),
        notes: Vec::new(),
    };
    for &part in &args.parts {
        check_interrupted()?;
        let t = Instant::now();
        match run_part(&ctx, &args, part, &mut report) {
            Ok(()) => {}
            Err(e) => {
                check_interrupted()?;
                let note = format!("{} failed: {e:#}", part.name());
                eprintln!("sustained: {note}");
                report.notes.push(note);
            }
        }
        let scratch = ctx.work.join(part.name());
        if scratch.exists() {
            std::fs::remove_dir_all(&scratch)
                .with_context(|| format!("removing {}", scratch.display()))?;
        }
        eprintln!(
            "sustained: {} took {:.0} s ({:.0} s so far)",
            part.name(),
            t.elapsed().as_secs_f64(),
            suite_start.elapsed().as_secs_f64()
        );
    }
    report.notes.extend(floors::log_notes(&report));
    report.notes.extend(floors::drain_notes(&report));
    report.load_after = machine::load_average();
    report.finished = machine::utc_now().1;
    report.elapsed_secs = suite_start.elapsed().as_secs_f64();
    report.floors = floors::floors(&report);
    write_results(&mut report, &args, &workspace, &stamp)
}

fn validate(args: &Args) -> Result<()> {
    ensure!(!args.parts.is_empty(), "--parts is empty");
    ensure!(args.repeats > 0, "--repeats must be at least 1");
    ensure!(
        args.stall_at > 0.0 && args.stall_at < 1.0,
        "--stall-at is a share of the fill, between 0 and 1"
    );
    ensure!(
        args.space_minutes > 0.0 && args.gc_cost_minutes > 0.0,
        "--space-minutes and --gc-cost-minutes must be positive"
    );
    for (name, size) in [
        ("--fill-size", args.fill_size),
        ("--stall-fill-size", args.stall_fill_size),
    ] {
        ensure!(
            size % fill::BLOCK_BYTES == 0 && size >= 3 * fill::BLOCK_BYTES,
            "{name} must be a multiple of 64 KiB, at least 192 KiB"
        );
    }
    Ok(())
}

fn run_part(ctx: &Ctx, args: &Args, part: Part, report: &mut Report) -> Result<()> {
    match part {
        Part::SparseFill | Part::Stall => {
            let plan = fill_plan(args, part);
            ensure_fits(
                &ctx.work,
                part,
                fill_disk(plan.fill_bytes),
                fill_memory(plan.fill_bytes),
            )?;
            let result = fill::run(ctx, &plan)?;
            if part == Part::SparseFill {
                report.sparse_fill = Some(result);
            } else {
                report.stall = Some(result);
            }
        }
        Part::Space => {
            ensure_fits(&ctx.work, part, overwrite::space_needed(), 0)?;
            report.space = Some(overwrite::space(ctx, args.space_minutes)?);
        }
        Part::GcCost => {
            ensure_fits(&ctx.work, part, overwrite::space_needed(), 0)?;
            report.gc_cost = Some(overwrite::gc_cost(ctx, args.gc_cost_minutes, args.repeats)?);
        }
    }
    Ok(())
}

fn fill_plan(args: &Args, part: Part) -> fill::Plan {
    let stall = part == Part::Stall;
    fill::Plan {
        part: part.name(),
        fill_bytes: if stall {
            args.stall_fill_size
        } else {
            args.fill_size
        },
        latency_ms: args.latency_ms,
        verify_region_bytes: args.verify_region,
        stall: stall.then_some(fill::StallPlan {
            secs: args.stall_secs,
            at_fraction: args.stall_at,
        }),
        journal_limit: if stall {
            args.stall_journal_limit
        } else {
            None
        },
    }
}

/// Scratch disk a fill may use: moto's spool files (it keeps every chunk over 5 MiB in a
/// temporary file; each 4 KiB-written block compresses to a little over 4 KiB, so the store
/// holds about a sixteenth of the fill, taken as an eighth), the journal (at most its 4 GiB
/// limit), the block cache (at most its 8 GiB default; mostly holes, as its blocks are mostly
/// zeros), and a margin.
fn fill_disk(fill: u64) -> u64 {
    fill / 8 + (fill / 8).min(4 * GIB) + (fill / 8).min(8 * GIB) + 2 * GIB
}

/// Memory moto may hold while chunks stream through it (measured: peak RSS 1.3 GiB for a
/// 2 GiB fill, 1.6 GiB for 6 GiB), with a margin.
fn fill_memory(fill: u64) -> u64 {
    fill / 16 + 2 * GIB
}

/// Refuses a part that cannot fit in the scratch filesystem or in memory.
fn ensure_fits(work: &Path, part: Part, disk: u64, memory: u64) -> Result<()> {
    let free = crate::machine::free_bytes(work)?;
    ensure!(
        free >= disk,
        "{} needs about {:.1} GiB free in {}, there are {:.1} GiB",
        part.name(),
        disk as f64 / GIB as f64,
        work.display(),
        free as f64 / GIB as f64
    );
    let available = server::available_memory()?;
    ensure!(
        available >= memory,
        "{} needs about {:.1} GiB of available memory (moto keeps the store in RAM), there \
         are {:.1} GiB",
        part.name(),
        memory as f64 / GIB as f64,
        available as f64 / GIB as f64
    );
    Ok(())
}

fn probe_tools(bin: &Path, workspace: &Path) -> Result<Tools> {
    let ws = workspace.to_string_lossy();
    let commit = output_of("git", &["-C", &ws, "rev-parse", "HEAD"]).unwrap_or_default();
    let dirty = output_of("git", &["-C", &ws, "status", "--porcelain"])
        .map(|s| !s.is_empty())
        .unwrap_or(false);
    Ok(Tools {
        fio: output_of("fio", &["--version"]).context("fio is required (apt-get install fio)")?,
        moto: crate::machine::version_line(
            "python3",
            &["-c", "import moto; print(moto.__version__)"],
        ),
        bucketdisk: output_of(&bin.to_string_lossy(), &["--version"])
            .context("running bucketdisk --version")?,
        commit: if dirty {
            format!("{commit}-dirty")
        } else {
            commit
        },
    })
}

/// "2026-12-05T16:52:20Z" → "2026-12-05-1652".
fn stamp_of(started: &str) -> String {
    let date = started.split_once('T').map_or(started, |(date, _)| date);
    format!("{date}-{}", machine::hhmm(started))
}

/// `<stem>.md`, `<stem>.json` and the PNGs into `--out`; results are never overwritten.
fn write_results(report: &mut Report, args: &Args, workspace: &Path, stamp: &str) -> Result<()> {
    let out_dir = args.places.out_dir(workspace);
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let stem = free_stem(&out_dir, &format!("{SUITE}-{stamp}"));
    report.plots = draw_plots(report, &out_dir, &stem);
    let md_path = out_dir.join(format!("{stem}.md"));
    let json_path = out_dir.join(format!("{stem}.json"));
    let md = markdown::render(report, &stem);
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    let json = serde_json::to_string_pretty(report).context("serialising the report")? + "\n";
    std::fs::write(&json_path, json).with_context(|| format!("writing {}", json_path.display()))?;
    eprintln!(
        "sustained: wrote {} and {} ({:.0} s)",
        md_path.display(),
        json_path.display(),
        report.elapsed_secs
    );
    print!("{md}");
    Ok(())
}

/// `stem`, or `stem-2`, `stem-3`, … if results by that name exist.
fn free_stem(out_dir: &Path, stem: &str) -> String {
    let taken = |s: &str| {
        out_dir.join(format!("{s}.md")).exists() || out_dir.join(format!("{s}.json")).exists()
    };
    let mut candidate = stem.to_string();
    let mut n = 2;
    while taken(&candidate) {
        candidate = format!("{stem}-{n}");
        n += 1;
    }
    candidate
}

/// Draws what there is to draw; a plot that fails becomes a note, not a lost report.
fn draw_plots(report: &mut Report, dir: &Path, stem: &str) -> Vec<String> {
    let mut files = Vec::new();
    let mut failed = Vec::new();
    for f in [&report.sparse_fill, &report.stall].into_iter().flatten() {
        let name = format!("{stem}-{}.png", f.part);
        match plot::fill(f, &dir.join(&name)) {
            Ok(()) => files.push(name),
            Err(e) => failed.push(format!("plot {name}: {e:#}")),
        }
    }
    if let Some(s) = &report.space {
        let name = format!("{stem}-space.png");
        match plot::space(s, &dir.join(&name)) {
            Ok(()) => files.push(name),
            Err(e) => failed.push(format!("plot {name}: {e:#}")),
        }
    }
    report.notes.extend(failed);
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_and_stems() {
        assert_eq!(stamp_of("2026-12-05T16:52:20Z"), "2026-12-05-1652");
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(free_stem(dir.path(), "s"), "s");
        std::fs::write(dir.path().join("s.md"), "").expect("write");
        assert_eq!(free_stem(dir.path(), "s"), "s-2");
    }

    #[test]
    fn fill_needs_scale_with_the_fill() {
        // The store holds about a sixteenth of the fill (measured: 6.9 GB for 100 GiB).
        let need = fill_disk(100 * GIB);
        assert!(need > 100 * GIB / 8 && need < 64 * GIB, "{need}");
        assert!(fill_memory(100 * GIB) > 8 * GIB);
        assert!(fill_disk(2 * GIB) < 8 * GIB);
    }
}
