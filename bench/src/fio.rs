//! fio: workload definitions, running one job, and reading its JSON output.

use crate::process::{die_with_parent, wait_with_timeout};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One fio job shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// Short name used in tables and JSON, e.g. "randread-4k-qd32".
    pub name: &'static str,
    /// fio's `--rw`.
    pub rw: &'static str,
    /// fio's `--bs`.
    pub bs: &'static str,
    pub iodepth: u32,
}

/// Read share of the mixed workload (`--rw=randrw`), in percent.
pub const MIXED_READ_PERCENT: u32 = 70;

impl Workload {
    pub fn is_write(&self) -> bool {
        self.rw.contains("write")
    }

    /// Reads and writes in one job (`randrw`/`readwrite`): results add both sides.
    pub fn is_mixed(&self) -> bool {
        self.rw.ends_with("rw") || self.rw == "readwrite"
    }
}

/// Where fio sends its I/O.
#[derive(Debug, Clone)]
pub enum Target {
    /// An NBD server, through fio's nbd engine (libnbd, one connection).
    Nbd { uri: String },
    /// An NBD server over TLS (`nbds://`): fio's nbd engine may not name local files in its
    /// URI, so libnbd finds the CA where it looks by default, `$HOME/.pki/libnbd/`, with
    /// `HOME` set to `home` for fio.
    NbdTls { uri: String, home: PathBuf },
    /// A local file through io_uring (page cache, no NBD): the local limit.
    File { path: PathBuf },
}

/// Everything about a run that is not the workload or the target.
#[derive(Debug, Clone, Serialize)]
pub struct RunSettings {
    pub runtime_secs: u64,
    pub ramp_secs: u64,
    /// Bytes of the device fio spreads its I/O over.
    pub size: u64,
}

/// The numbers kept from one fio run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FioResult {
    pub iops: f64,
    pub bw_bytes: f64,
    pub clat_mean_ns: f64,
    pub clat_p99_ns: f64,
    pub lat_mean_ns: f64,
    /// fio's own CPU use (percent of one core) - fio shares the machine with the server.
    pub fio_usr_cpu: f64,
    pub fio_sys_cpu: f64,
    pub io_bytes: u64,
    /// fio's completion-latency percentiles as (percent, µs), ascending: a coarse CDF. For a
    /// mixed workload, the read side's.
    #[serde(default)]
    pub clat_percentiles_us: Vec<(f64, f64)>,
}

/// The fio command line for `workload` against `target`, writing JSON to `output`.
pub fn command(
    workload: &Workload,
    target: &Target,
    settings: &RunSettings,
    output: &Path,
) -> Command {
    let mut cmd = Command::new("fio");
    cmd.arg(format!("--name={}", workload.name));
    match target {
        Target::Nbd { uri } => {
            cmd.arg("--ioengine=nbd").arg(format!("--uri={uri}"));
        }
        Target::NbdTls { uri, home } => {
            cmd.arg("--ioengine=nbd")
                .arg(format!("--uri={uri}"))
                .env("HOME", home);
        }
        Target::File { path } => {
            cmd.arg("--ioengine=io_uring")
                .arg("--direct=0")
                .arg(format!("--filename={}", path.display()));
        }
    }
    if workload.is_mixed() {
        cmd.arg(format!("--rwmixread={MIXED_READ_PERCENT}"));
    }
    cmd.arg(format!("--rw={}", workload.rw))
        .arg(format!("--bs={}", workload.bs))
        .arg(format!("--iodepth={}", workload.iodepth))
        .arg(format!("--size={}", settings.size))
        .arg("--numjobs=1")
        .arg("--time_based")
        .arg(format!("--runtime={}", settings.runtime_secs))
        .arg(format!("--ramp_time={}", settings.ramp_secs))
        // No random map: less client CPU, and every offset stays equally likely.
        .arg("--norandommap")
        .arg("--output-format=json")
        .arg(format!("--output={}", output.display()));
    cmd
}

/// Runs one fio job and parses its result.
pub fn run(
    workload: &Workload,
    target: &Target,
    settings: &RunSettings,
    output: &Path,
) -> Result<FioResult> {
    let mut cmd = command(workload, target, settings, output);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting fio (is it installed?)")?;
    let timeout = Duration::from_secs(settings.runtime_secs + settings.ramp_secs + 120);
    let status = wait_with_timeout(&mut child, "fio", timeout)?;
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        use std::io::Read;
        // fio writes little to stderr; reading after exit cannot deadlock for small outputs.
        let _ = pipe.read_to_string(&mut stderr);
    }
    let text = std::fs::read_to_string(output)
        .with_context(|| format!("reading fio output {}", output.display()))?;
    if !status.success() {
        bail!(
            "fio {} failed after {:.1}s ({status}): {}\n{}",
            workload.name,
            started.elapsed().as_secs_f64(),
            stderr.trim(),
            text.trim()
        );
    }
    let parsed = if workload.is_mixed() {
        parse_mixed(&text)
    } else {
        parse(&text, workload.is_write())
    };
    parsed.with_context(|| format!("parsing fio output {}", output.display()))
}

/// Runs one untimed pass of `rw` (e.g. `write` to fill, `read` to warm a cache) over the first
/// `size` bytes of an NBD export, every byte once, 1 MiB requests at queue depth 32 (deep, so
/// that servers that fetch or store per block over a slow store do so in parallel).
pub fn pass(rw: &str, size: u64, uri: &str, output: &Path) -> Result<FioResult> {
    pass_with(rw, "1M", 32, size, uri, output)
}

/// [`pass`] with a chosen request size and queue depth.
pub fn pass_with(
    rw: &str,
    bs: &str,
    iodepth: u32,
    size: u64,
    uri: &str,
    output: &Path,
) -> Result<FioResult> {
    pass_with_options(rw, bs, iodepth, size, uri, output, &[])
}

/// One 1 MiB sequential write pass at QD8 that ends with an fsync (NBD FLUSH), so the job ends
/// when the server has the data where it promises durability: the write floor's job.
pub fn synced_write_pass(size: u64, uri: &str, output: &Path) -> Result<FioResult> {
    pass_with_options("write", "1M", 8, size, uri, output, &["--end_fsync=1"])
}

fn pass_with_options(
    rw: &str,
    bs: &str,
    iodepth: u32,
    size: u64,
    uri: &str,
    output: &Path,
    options: &[&str],
) -> Result<FioResult> {
    let mut cmd = Command::new("fio");
    cmd.arg(format!("--name=pass-{rw}"))
        .args(options)
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={iodepth}"))
        .arg("--numjobs=1")
        .arg(format!("--size={size}"))
        .arg("--output-format=json")
        .arg(format!("--output={}", output.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().context("starting fio")?;
    let status = wait_with_timeout(&mut child, "fio", Duration::from_secs(1800))?;
    let text =
        std::fs::read_to_string(output).with_context(|| format!("reading {}", output.display()))?;
    if !status.success() {
        bail!("fio pass-{rw} failed ({status}): {text}");
    }
    parse(&text, rw.contains("write"))
}

/// Parses fio's `--output-format=json`. fio may print notes before the JSON; they are skipped.
pub fn parse(text: &str, write: bool) -> Result<FioResult> {
    let job = first_job(text)?;
    let result = side(&job, if write { "write" } else { "read" })?;
    if result.io_bytes == 0 {
        bail!("fio moved no data");
    }
    Ok(result)
}

/// Parses a mixed job: IOPS, bandwidth and bytes add up; mean latency is weighted by I/Os;
/// p99 is the worse side's; percentiles are the read side's.
pub fn parse_mixed(text: &str) -> Result<FioResult> {
    let job = first_job(text)?;
    let r = side(&job, "read")?;
    let w = side(&job, "write")?;
    let (ri, wi) = (r.iops, w.iops);
    let weighted = |a: f64, b: f64| {
        if ri + wi > 0.0 {
            (a * ri + b * wi) / (ri + wi)
        } else {
            0.0
        }
    };
    let result = FioResult {
        iops: ri + wi,
        bw_bytes: r.bw_bytes + w.bw_bytes,
        clat_mean_ns: weighted(r.clat_mean_ns, w.clat_mean_ns),
        clat_p99_ns: r.clat_p99_ns.max(w.clat_p99_ns),
        lat_mean_ns: weighted(r.lat_mean_ns, w.lat_mean_ns),
        fio_usr_cpu: r.fio_usr_cpu,
        fio_sys_cpu: r.fio_sys_cpu,
        io_bytes: r.io_bytes + w.io_bytes,
        clat_percentiles_us: r.clat_percentiles_us,
    };
    if result.io_bytes == 0 {
        bail!("fio moved no data");
    }
    Ok(result)
}

fn first_job(text: &str) -> Result<serde_json::Value> {
    let start = text.find('{').context("no JSON object in fio output")?;
    let mut doc: serde_json::Value =
        serde_json::from_str(&text[start..]).context("fio output is not valid JSON")?;
    let job = doc
        .get_mut("jobs")
        .and_then(|j| j.get_mut(0))
        .context("fio output has no jobs")?
        .take();
    let error = job.get("error").and_then(|e| e.as_i64()).unwrap_or(0);
    if error != 0 {
        bail!("fio job reported error {error}");
    }
    Ok(job)
}

/// One side ("read" or "write") of a job. A side with no I/O has no percentiles.
fn side(job: &serde_json::Value, name: &str) -> Result<FioResult> {
    let side = job.get(name).context("fio job has no read/write section")?;
    let num = |v: &serde_json::Value, path: &[&str]| -> Result<f64> {
        let mut cur = v;
        for key in path {
            cur = cur
                .get(key)
                .with_context(|| format!("fio output lacks {}", path.join(".")))?;
        }
        cur.as_f64()
            .with_context(|| format!("fio output {} is not a number", path.join(".")))
    };
    let io_bytes = num(side, &["io_bytes"])? as u64;
    let mut clat_percentiles_us: Vec<(f64, f64)> = side
        .get("clat_ns")
        .and_then(|c| c.get("percentile"))
        .and_then(|p| p.as_object())
        .map(|p| {
            p.iter()
                .filter_map(|(k, v)| Some((k.parse::<f64>().ok()?, v.as_f64()? / 1000.0)))
                .collect()
        })
        .unwrap_or_default();
    clat_percentiles_us.sort_by(|a, b| a.0.total_cmp(&b.0));
    let p99 = if io_bytes == 0 {
        0.0
    } else {
        num(side, &["clat_ns", "percentile", "99.000000"])?
    };
    Ok(FioResult {
        iops: num(side, &["iops"])?,
        bw_bytes: num(side, &["bw_bytes"])?,
        clat_mean_ns: num(side, &["clat_ns", "mean"])?,
        clat_p99_ns: p99,
        lat_mean_ns: num(side, &["lat_ns", "mean"])?,
        fio_usr_cpu: num(job, &["usr_cpu"])?,
        fio_sys_cpu: num(job, &["sys_cpu"])?,
        io_bytes,
        clat_percentiles_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"note: a line fio sometimes prints first
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "t", "error" : 0, "usr_cpu" : 10.5, "sys_cpu" : 20.25,
      "read" : {
        "io_bytes" : 4096000, "bw_bytes" : 369202918, "iops" : 90137.43,
        "clat_ns" : { "mean" : 347895.27, "percentile" : { "99.000000" : 3063808 } },
        "lat_ns" : { "mean" : 350000.0 }
      },
      "write" : {
        "io_bytes" : 0, "bw_bytes" : 0, "iops" : 0.0,
        "clat_ns" : { "mean" : 0.0 }, "lat_ns" : { "mean" : 0.0 }
      }
    }
  ]
}"#;

    #[test]
    fn parses_read_side() {
        let r = parse(SAMPLE, false).expect("parse");
        assert_eq!(r.io_bytes, 4_096_000);
        assert!((r.iops - 90137.43).abs() < 1e-6);
        assert!((r.clat_p99_ns - 3_063_808.0).abs() < 1e-6);
        assert!((r.fio_sys_cpu - 20.25).abs() < 1e-9);
    }

    #[test]
    fn rejects_idle_side() {
        assert!(parse(SAMPLE, true).is_err());
    }

    #[test]
    fn mixed_adds_sides() {
        let r = parse_mixed(SAMPLE).expect("parse");
        assert_eq!(r.io_bytes, 4_096_000);
        assert!((r.iops - 90137.43).abs() < 1e-6);
        assert_eq!(r.clat_percentiles_us, vec![(99.0, 3063.808)]);
    }
}
