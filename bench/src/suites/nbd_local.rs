//! `nbd-local`: fio through the NBD engine against bucketdisk (local-file volume), qemu-nbd and
//! nbdkit, all serving the same file in the same run.

use crate::fio::{self, RunSettings, Workload};
use crate::machine::{self, Machine, Tools};
use crate::process::check_interrupted;
use crate::report::{self, Report, RunRecord, SubjectInfo};
use crate::subjects::{self, Subject};
use crate::units::parse_size;
use crate::volume;
use crate::workspace::{bucketdisk_binary, workspace_root};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::time::Instant;

pub const SUITE: &str = "nbd-local";

/// The four rows the requirement names.
pub const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "randread-4k-qd32",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
    },
    Workload {
        name: "randwrite-4k-qd32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
    },
    Workload {
        name: "read-1m-qd8",
        rw: "read",
        bs: "1M",
        iodepth: 8,
    },
    Workload {
        name: "write-1m-qd8",
        rw: "write",
        bs: "1M",
        iodepth: 8,
    },
];

/// The subject every ratio is taken against.
const BASELINE: Subject = Subject::QemuNbd;
const VOLUME_NAME: &str = "bench";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds of measured I/O per run (after the ramp).
    #[arg(long, default_value_t = 15)]
    pub runtime: u64,
    /// Seconds of unmeasured warm-up per run.
    #[arg(long, default_value_t = 2)]
    pub ramp: u64,
    /// Runs of every workload per subject, interleaved round-robin across subjects.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Volume size (K/M/G suffixes, powers of 1024).
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    pub size: u64,
    /// The bucketdisk binary. Default: build it (`cargo build --release -p bucketdisk`) and use
    /// target/release/bucketdisk of this workspace.
    #[arg(long)]
    pub bucketdisk: Option<PathBuf>,
    /// Subjects to run, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "bucketdisk,qemu-nbd,nbdkit,qemu-nbd-io_uring,local"
    )]
    pub subjects: Vec<Subject>,
    /// Where the temporary volume is made (its filesystem is recorded).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    pub dir: PathBuf,
    /// Where the results go. Default: bench/results of this workspace.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: Args, command: String) -> Result<()> {
    if args.repeats == 0 || args.runtime == 0 {
        bail!("--repeats and --runtime must be at least 1");
    }
    if !args.subjects.contains(&Subject::Bucketdisk) || !args.subjects.contains(&BASELINE) {
        bail!("--subjects must include bucketdisk and {}", BASELINE.name());
    }
    let workspace = workspace_root();
    let bucketdisk = bucketdisk_binary(args.bucketdisk.as_deref(), &workspace)?;
    let tools = Tools::probe(&bucketdisk, &workspace)?;
    let load_before = machine::load_average();
    let (date, started) = machine::utc_now();

    let tmp = tempfile::Builder::new()
        .prefix("bucketdisk-bench-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("creating a temporary directory in {}", args.dir.display()))?;
    let machine = Machine::probe(tmp.path());
    eprintln!(
        "bench: {} MiB volume in {} ({}), load {load_before}",
        args.size >> 20,
        tmp.path().display(),
        machine.filesystem
    );
    let vol = volume::create_filled(&bucketdisk, tmp.path(), VOLUME_NAME, args.size)?;
    let settings = RunSettings {
        runtime_secs: args.runtime,
        ramp_secs: args.ramp,
        size: args.size,
    };

    let mut runs = Vec::new();
    let mut notes = Vec::new();
    let mut command_lines: Vec<SubjectInfo> = Vec::new();
    for repeat in 1..=args.repeats {
        for &subject in &args.subjects {
            check_interrupted()?;
            let running = subjects::start(subject, &vol, &bucketdisk, tmp.path())?;
            if !command_lines.iter().any(|c| c.subject == subject) {
                command_lines.push(SubjectInfo {
                    subject,
                    command_line: running.command_line.clone(),
                });
            }
            for w in &WORKLOADS {
                check_interrupted()?;
                let out =
                    tmp.path()
                        .join(format!("fio-{}-{}-{repeat}.json", subject.name(), w.name));
                let cpu_before = running.server.as_ref().and_then(|s| s.cpu_time());
                let t0 = Instant::now();
                let result = fio::run(w, &running.target, &settings, &out)
                    .with_context(|| format!("{} {} repeat {repeat}", subject.name(), w.name));
                let wall = t0.elapsed();
                let result = match result {
                    Ok(r) => r,
                    Err(e) => {
                        let tail = running
                            .server
                            .as_ref()
                            .map(|s| s.log_tail())
                            .unwrap_or_default();
                        return Err(e.context(format!("server log tail:\n{tail}")));
                    }
                };
                let cpu_after = running.server.as_ref().and_then(|s| s.cpu_time());
                let server_cpu_secs = cpu_before
                    .zip(cpu_after)
                    .map(|(a, b)| b.saturating_sub(a).as_secs_f64());
                volume::settle(&vol)?;
                eprintln!(
                    "bench: [{repeat}/{}] {:<18} {:<18} {:>9.0} IOPS {:>8.1} MiB/s  p99 {:>7.0} µs  server {}",
                    args.repeats,
                    subject.name(),
                    w.name,
                    result.iops,
                    result.bw_bytes / 1_048_576.0,
                    result.clat_p99_ns / 1000.0,
                    server_cpu_secs
                        .map(|c| format!("{:.2} cores", c / wall.as_secs_f64()))
                        .unwrap_or_else(|| "-".into()),
                );
                runs.push(RunRecord {
                    subject,
                    workload: w.name,
                    repeat,
                    fio: result,
                    server_cpu_secs,
                    wall_secs: wall.as_secs_f64(),
                });
            }
            if let Some(server) = running.server {
                let status = server.stop()?;
                if !status.success() {
                    let note = format!(
                        "{} exited with {status} after SIGTERM (repeat {repeat})",
                        subject.name()
                    );
                    eprintln!("bench: note: {note}");
                    if !notes.contains(&note) {
                        notes.push(note);
                    }
                }
            }
            volume::settle(&vol)?;
        }
    }

    let load_after = machine::load_average();
    let (_, finished) = machine::utc_now();
    let rows = report::summarize(&runs, &WORKLOADS, &args.subjects, BASELINE);
    let report = Report {
        suite: SUITE,
        date: date.clone(),
        started,
        finished,
        command,
        machine,
        load_before,
        load_after,
        tools,
        settings,
        repeats: args.repeats,
        baseline: BASELINE,
        subjects: command_lines,
        workloads: WORKLOADS.to_vec(),
        rows,
        runs,
        notes,
    };
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| workspace.join("bench").join("results"));
    let (md, json) = report::write_files(&report, &out_dir, &format!("{SUITE}-{date}"))?;
    eprintln!("bench: wrote {} and {}", md.display(), json.display());
    print!("{}", report::markdown(&report));
    Ok(())
}
