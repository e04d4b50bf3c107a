//! Results: raw runs, their summaries, and the markdown + JSON files written beside each other.

use crate::fio::{FioResult, RunSettings, Workload};
use crate::machine::{Machine, Tools};
use crate::stats::Summary;
use crate::subjects::Subject;
use anyhow::{Context, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One fio run of one workload against one subject.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub subject: Subject,
    pub workload: &'static str,
    pub repeat: usize,
    pub fio: FioResult,
    /// Server CPU time (user + system) during the run, ramp included; none for `local`.
    pub server_cpu_secs: Option<f64>,
    /// Wall time of the fio process, ramp included.
    pub wall_secs: f64,
}

impl RunRecord {
    /// Cores the server kept busy on average.
    pub fn server_cores(&self) -> Option<f64> {
        self.server_cpu_secs
            .filter(|_| self.wall_secs > 0.0)
            .map(|c| c / self.wall_secs)
    }
}

/// Repeats of one (workload, subject) pair, summarised.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub workload: &'static str,
    pub subject: Subject,
    pub iops: Summary,
    pub mib_per_sec: Summary,
    pub clat_mean_us: Summary,
    pub clat_p99_us: Summary,
    pub server_cores: Option<Summary>,
    /// Median IOPS of this subject over median IOPS of the baseline (qemu-nbd).
    pub iops_vs_baseline: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SubjectInfo {
    pub subject: Subject,
    pub command_line: String,
}

/// Everything a results file holds.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub suite: &'static str,
    pub date: String,
    pub started: String,
    pub finished: String,
    /// How to rerun it (`cargo run -p bench --release -- ...`).
    pub command: String,
    pub machine: Machine,
    pub load_before: String,
    pub load_after: String,
    pub tools: Tools,
    pub settings: RunSettings,
    pub repeats: usize,
    pub baseline: Subject,
    pub subjects: Vec<SubjectInfo>,
    pub workloads: Vec<Workload>,
    pub rows: Vec<Row>,
    pub runs: Vec<RunRecord>,
    /// Anything odd seen during the run (server exit codes, warnings).
    pub notes: Vec<String>,
}

/// Summarises `runs` per (workload, subject), in the given orders.
pub fn summarize(
    runs: &[RunRecord],
    workloads: &[Workload],
    subjects: &[Subject],
    baseline: Subject,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for w in workloads {
        let of = |s: Subject| -> Vec<&RunRecord> {
            runs.iter()
                .filter(|r| r.subject == s && r.workload == w.name)
                .collect()
        };
        let summary = |rs: &[&RunRecord], f: &dyn Fn(&RunRecord) -> f64| {
            Summary::of(&rs.iter().map(|r| f(r)).collect::<Vec<_>>())
        };
        let base_iops = summary(&of(baseline), &|r| r.fio.iops).map(|s| s.median);
        for &s in subjects {
            let rs = of(s);
            let Some(iops) = summary(&rs, &|r| r.fio.iops) else {
                continue;
            };
            let cores: Vec<f64> = rs.iter().filter_map(|r| r.server_cores()).collect();
            rows.push(Row {
                workload: w.name,
                subject: s,
                iops,
                mib_per_sec: summary(&rs, &|r| r.fio.bw_bytes / 1_048_576.0).unwrap_or(iops),
                clat_mean_us: summary(&rs, &|r| r.fio.clat_mean_ns / 1000.0).unwrap_or(iops),
                clat_p99_us: summary(&rs, &|r| r.fio.clat_p99_ns / 1000.0).unwrap_or(iops),
                server_cores: Summary::of(&cores),
                iops_vs_baseline: base_iops.filter(|&b| b > 0.0).map(|b| iops.median / b),
            });
        }
    }
    rows
}

/// Writes `<stem>.md` and `<stem>.json` into `dir`; returns both paths.
pub fn write_files(report: &Report, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let md = dir.join(format!("{stem}.md"));
    let json = dir.join(format!("{stem}.json"));
    std::fs::write(&md, markdown(report)).with_context(|| format!("writing {}", md.display()))?;
    let text = serde_json::to_string_pretty(report).context("serialising the report")?;
    std::fs::write(&json, text + "\n").with_context(|| format!("writing {}", json.display()))?;
    Ok((md, json))
}

fn range(s: &Summary, digits: usize) -> String {
    if s.n > 1 {
        format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = digits)
    } else {
        format!("{:.d$}", s.median, d = digits)
    }
}

/// The markdown report.
pub fn markdown(r: &Report) -> String {
    let mut o = String::new();
    let gib = r.machine.memory_bytes as f64 / f64::from(1u32 << 30);
    let _ = writeln!(
        o,
        "# {}: bucketdisk vs qemu-nbd vs nbdkit — {}\n",
        r.suite, r.date
    );
    let _ = writeln!(o, "```\n{}\n```\n", r.command);
    let _ = writeln!(o, "## Machine and tools\n");
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(o, "| CPU | {} × {} |", r.machine.nproc, r.machine.cpu_model);
    let _ = writeln!(o, "| memory | {gib:.1} GiB |");
    let _ = writeln!(o, "| kernel | {} |", r.machine.kernel);
    let _ = writeln!(o, "| volume filesystem | {} |", r.machine.filesystem);
    let _ = writeln!(
        o,
        "| load average (1/5/15 min) | before {} · after {} |",
        r.load_before, r.load_after
    );
    let _ = writeln!(o, "| run | {} → {} |", r.started, r.finished);
    let _ = writeln!(o, "| fio | {} |", r.tools.fio);
    let _ = writeln!(o, "| qemu-nbd | {} |", r.tools.qemu_nbd);
    let _ = writeln!(o, "| nbdkit | {} |", r.tools.nbdkit);
    let _ = writeln!(
        o,
        "| bucketdisk | {} (commit {}) |",
        r.tools.bucketdisk, r.tools.bucketdisk_commit
    );
    let _ = writeln!(o);

    let _ = writeln!(o, "## Setup\n");
    let _ = writeln!(
        o,
        "One {} MiB volume made with `bucketdisk create`, its `disk.raw` filled with pseudo-random \
         bytes, served in turn by each subject below (the same file, one server at a time, on a \
         loopback port). fio ({}) runs each workload for {} s after a {} s ramp over the whole \
         volume (`--size={}`, `--norandommap`), one job, one NBD connection. Repeats: {}, \
         interleaved round-robin across subjects; tables show the median and (min–max). \
         Dirty pages are synced between runs (outside the timed part). The file fits in the page \
         cache, so this measures each server's overhead above the page cache, not the disk. \
         fio and the server share the machine's CPUs; \"server CPU\" is the server's user + \
         system time over the run's wall time (ramp included). `local` is fio's io_uring \
         engine on the file itself, no NBD: a rough reference for the page cache's limit.\n",
        r.settings.size >> 20,
        r.tools.fio,
        r.settings.runtime_secs,
        r.settings.ramp_secs,
        r.settings.size,
        r.repeats
    );
    for s in &r.subjects {
        let _ = writeln!(o, "- **{}**: `{}`", s.subject.name(), s.command_line);
    }
    let _ = writeln!(o);

    let _ = writeln!(
        o,
        "## Summary: median IOPS (MiB/s for 1M rows), bucketdisk ÷ {}\n",
        r.baseline.name()
    );
    let _ = write!(o, "| workload |");
    for s in &r.subjects {
        let _ = write!(o, " {} |", s.subject.name());
    }
    let _ = writeln!(o, " bucketdisk ÷ {} | floor met |", r.baseline.name());
    let _ = write!(o, "|---|");
    for _ in &r.subjects {
        let _ = write!(o, "---:|");
    }
    let _ = writeln!(o, "---:|:---:|");
    for w in &r.workloads {
        let big = w.bs != "4k";
        let _ = write!(o, "| {} |", w.name);
        let mut ratio = None;
        for s in &r.subjects {
            let row = r
                .rows
                .iter()
                .find(|x| x.workload == w.name && x.subject == s.subject);
            match row {
                Some(x) if big => {
                    let _ = write!(o, " {:.0} |", x.mib_per_sec.median);
                }
                Some(x) => {
                    let _ = write!(o, " {:.0} |", x.iops.median);
                }
                None => {
                    let _ = write!(o, " – |");
                }
            }
            if let Some(x) = row.filter(|x| x.subject == Subject::Bucketdisk) {
                ratio = x.iops_vs_baseline;
            }
        }
        match ratio {
            Some(q) => {
                let met = if q >= 1.0 { "yes" } else { "**no**" };
                let _ = writeln!(o, " {q:.2} | {met} |");
            }
            None => {
                let _ = writeln!(o, " – | – |");
            }
        }
    }
    let _ = writeln!(o);

    let _ = writeln!(o, "## Per workload\n");
    for w in &r.workloads {
        let _ = writeln!(
            o,
            "### {} (`--rw={} --bs={} --iodepth={}`)\n",
            w.name, w.rw, w.bs, w.iodepth
        );
        let _ = writeln!(
            o,
            "| subject | IOPS | MiB/s | clat mean µs | clat p99 µs | server CPU (cores) | IOPS ÷ {} |",
            r.baseline.name()
        );
        let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|");
        for x in r.rows.iter().filter(|x| x.workload == w.name) {
            let cores = x
                .server_cores
                .as_ref()
                .map_or_else(|| "–".to_string(), |c| range(c, 2));
            let ratio = x
                .iops_vs_baseline
                .map_or_else(|| "–".to_string(), |q| format!("{q:.2}"));
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} |",
                x.subject.name(),
                range(&x.iops, 0),
                range(&x.mib_per_sec, 1),
                range(&x.clat_mean_us, 1),
                range(&x.clat_p99_us, 0),
                cores,
                ratio
            );
        }
        let _ = writeln!(o);
    }
    notes_section(&mut o, &r.notes);
    let _ = writeln!(
        o,
        "Raw numbers for every run: `{}.json` beside this file.",
        format_args!("{}-{}", r.suite, r.date)
    );
    o
}

/// A "Machine and tools" table: the machine, the load before and after, when the run was
/// (`run`, preformatted) and one row per tool.
pub fn machine_table(
    o: &mut String,
    m: &Machine,
    load: (&str, &str),
    run: &str,
    tools: &[(&str, String)],
) {
    let _ = writeln!(o, "## Machine and tools\n");
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(o, "| CPU | {} × {} |", m.nproc, m.cpu_model);
    let _ = writeln!(
        o,
        "| memory | {:.1} GiB |",
        m.memory_bytes as f64 / f64::from(1u32 << 30)
    );
    let _ = writeln!(o, "| kernel | {} |", m.kernel);
    let _ = writeln!(o, "| scratch filesystem | {} |", m.filesystem);
    let _ = writeln!(
        o,
        "| load average (1/5/15 min) | before {} · after {} |",
        load.0, load.1
    );
    let _ = writeln!(o, "| run | {run} |");
    for (name, version) in tools {
        let _ = writeln!(o, "| {name} | {version} |");
    }
    let _ = writeln!(o);
}

/// `stem`, or `stem-HHMM` (the UTC start time) if results by that name already exist: results
/// are never overwritten.
pub fn free_stem(out_dir: &Path, stem: &str, started: &str) -> Result<String> {
    let taken = |stem: &str| {
        out_dir.join(format!("{stem}.md")).exists() || out_dir.join(format!("{stem}.json")).exists()
    };
    if !taken(stem) {
        return Ok(stem.to_string());
    }
    let stem = format!("{stem}-{}", crate::machine::hhmm(started));
    anyhow::ensure!(
        !taken(&stem),
        "results {stem}.* already exist in {}",
        out_dir.display()
    );
    Ok(stem)
}

/// The report's "Notes from the run" section (nothing without notes).
/// Writes `<stem>.md` and `<stem>.json` (`data`, pretty) into `out_dir`, creating it.
pub fn write_md_json<T: Serialize>(out_dir: &Path, stem: &str, md: &str, data: &T) -> Result<()> {
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(out_dir.join(format!("{stem}.md")), md)?;
    std::fs::write(
        out_dir.join(format!("{stem}.json")),
        serde_json::to_string_pretty(data)? + "\n",
    )?;
    Ok(())
}

pub fn notes_section(o: &mut String, notes: &[String]) {
    if notes.is_empty() {
        return;
    }
    let _ = writeln!(o, "## Notes from the run\n");
    for n in notes {
        let _ = writeln!(o, "- {n}");
    }
    let _ = writeln!(o);
}
