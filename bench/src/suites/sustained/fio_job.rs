//! fio jobs that run for minutes while the suite samples the server: started in the
//! background, polled, and read afterwards. Unlike [`crate::fio::run`], a failed job is a
//! result here (the suite's floors are about whether fio saw an error), so the outcome keeps
//! fio's exit status, its error code and the tail of its stderr instead of failing.

use crate::process::die_with_parent;
use anyhow::{Context, Result};
use serde::Serialize;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

/// Lines of fio's stderr kept in the report (its I/O errors name offset and errno).
const STDERR_LINES: usize = 12;

/// One side (read or write) of a finished job.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Side {
    pub ios: u64,
    pub io_bytes: u64,
    pub iops: f64,
    pub bw_bytes: f64,
    pub clat_mean_us: f64,
    pub clat_p99_us: f64,
    pub clat_max_us: f64,
}

/// What one fio run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    /// Exit status 0, no job error, and its JSON read.
    pub ok: bool,
    pub exit: String,
    /// fio's job error (an errno: 5 is EIO), 0 if none.
    pub error: i64,
    /// The last lines of fio's stderr, where it prints I/O errors.
    pub stderr_tail: String,
    pub wall_secs: f64,
    pub read: Option<Side>,
    pub write: Option<Side>,
    /// Why the JSON could not be read, if it could not.
    pub parse_error: Option<String>,
}

impl Outcome {
    /// One line for the report: "ok" or what went wrong.
    pub fn verdict(&self) -> String {
        if self.ok {
            return "ok".into();
        }
        let mut why = format!("failed ({}", self.exit);
        if self.error != 0 {
            why.push_str(&format!(", fio error {}", self.error));
        }
        why.push(')');
        if let Some(line) = self.stderr_tail.lines().find(|l| !l.trim().is_empty()) {
            why.push_str(": ");
            why.push_str(line.trim());
        } else if let Some(e) = &self.parse_error {
            why.push_str(": ");
            why.push_str(e);
        }
        why
    }
}

/// A fio process running in the background; dropping it kills fio.
pub struct Running {
    child: Option<Child>,
    json: PathBuf,
    stderr: PathBuf,
    started: Instant,
    /// When [`Running::finished`] first saw fio gone: its wall time, however late the caller
    /// gets to [`Running::finish`] (the stall part waits out the stall first).
    exited: Option<Instant>,
}

/// The full command line, for the report.
pub fn describe(args: &[String]) -> String {
    std::iter::once("fio".to_string())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

impl Running {
    /// Starts `fio ARGS --output-format=json --output=DIR/NAME.json`, stderr to
    /// `DIR/NAME.stderr` (a file, not a pipe: a long run's messages must not block fio).
    pub fn spawn(args: &[String], dir: &Path, name: &str) -> Result<Running> {
        let json = dir.join(format!("{name}.json"));
        let stderr = dir.join(format!("{name}.stderr"));
        let err =
            File::create(&stderr).with_context(|| format!("creating {}", stderr.display()))?;
        let mut cmd = Command::new("fio");
        cmd.args(args)
            .arg("--output-format=json")
            .arg(format!("--output={}", json.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().context("starting fio (is it installed?)")?;
        Ok(Running {
            child: Some(child),
            json,
            stderr,
            started: Instant::now(),
            exited: None,
        })
    }

    /// True once fio has exited.
    pub fn finished(&mut self) -> Result<bool> {
        let done = match self.child.as_mut() {
            Some(child) => child.try_wait().context("checking on fio")?.is_some(),
            None => true,
        };
        if done && self.exited.is_none() {
            self.exited = Some(Instant::now());
        }
        Ok(done)
    }

    /// Asks fio to stop early (SIGTERM: it still writes its results).
    pub fn terminate(&self) {
        if let Some(pid) = self
            .child
            .as_ref()
            .and_then(|c| libc::pid_t::try_from(c.id()).ok())
        {
            // SAFETY: kill(2) on our own child, not yet reaped, so the pid is still ours.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }

    /// Waits for fio to exit and reads what it did.
    pub fn finish(mut self) -> Result<Outcome> {
        let mut child = self.child.take().context("fio already finished")?;
        let status = child.wait().context("waiting for fio")?;
        let exited = self.exited.unwrap_or_else(Instant::now);
        let wall_secs = exited.duration_since(self.started).as_secs_f64();
        let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let mut out = Outcome {
            exit: status.to_string(),
            stderr_tail: tail(&stderr, STDERR_LINES),
            wall_secs,
            ..Outcome::default()
        };
        match std::fs::read_to_string(&self.json)
            .with_context(|| format!("reading {}", self.json.display()))
            .and_then(|text| parse_job(&text))
        {
            Ok((error, read, write)) => {
                out.error = error;
                out.read = read;
                out.write = write;
                out.ok = status.success() && error == 0;
            }
            Err(e) => out.parse_error = Some(format!("{e:#}")),
        }
        Ok(out)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The first job's error code and its read and write sides (a side that moved no data is
/// `None`). fio may print notes before the JSON; they are skipped.
fn parse_job(text: &str) -> Result<(i64, Option<Side>, Option<Side>)> {
    let start = text.find('{').context("no JSON object in fio output")?;
    let doc: serde_json::Value =
        serde_json::from_str(&text[start..]).context("fio output is not valid JSON")?;
    let job = doc
        .get("jobs")
        .and_then(|j| j.get(0))
        .context("fio output has no jobs")?;
    let error = job.get("error").and_then(serde_json::Value::as_i64);
    Ok((error.unwrap_or(0), side(job, "read"), side(job, "write")))
}

fn side(job: &serde_json::Value, name: &str) -> Option<Side> {
    let s = job.get(name)?;
    let num = |path: &[&str]| -> f64 {
        path.iter()
            .try_fold(s, |v, k| v.get(k))
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
    };
    let side = Side {
        ios: num(&["total_ios"]) as u64,
        io_bytes: num(&["io_bytes"]) as u64,
        iops: num(&["iops"]),
        bw_bytes: num(&["bw_bytes"]),
        clat_mean_us: num(&["clat_ns", "mean"]) / 1000.0,
        clat_p99_us: num(&["clat_ns", "percentile", "99.000000"]) / 1000.0,
        clat_max_us: num(&["clat_ns", "max"]) / 1000.0,
    };
    (side.io_bytes > 0).then_some(side)
}

/// fio's `--write_iops_log` with `--log_avg_msec=1000`: (seconds since the job started, I/Os
/// in that second) per line "msec, value, direction, bs, offset[, prio]".
pub fn iops_log(path: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(',').map(str::trim);
            let ms: f64 = f.next()?.parse().ok()?;
            let v: f64 = f.next()?.parse().ok()?;
            Some((ms / 1000.0, v))
        })
        .collect()
}

/// Where fio writes the IOPS log for `--write_iops_log=PREFIX` (one job).
pub fn iops_log_path(prefix: &Path) -> PathBuf {
    let mut name = prefix.as_os_str().to_owned();
    name.push("_iops.1.log");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sides_and_error() {
        let text = r#"note: first
{"jobs":[{"error":5,"write":{"total_ios":10,"io_bytes":40960,"iops":2.5,"bw_bytes":100,
 "clat_ns":{"mean":2000,"max":9000000,"percentile":{"99.000000":5000}}},
 "read":{"total_ios":0,"io_bytes":0,"iops":0,"bw_bytes":0,"clat_ns":{"mean":0}}}]}"#;
        let (error, read, write) = parse_job(text).expect("parse");
        assert_eq!(error, 5);
        assert!(read.is_none());
        let w = write.expect("write side");
        assert_eq!((w.ios, w.io_bytes), (10, 40960));
        assert!((w.clat_max_us - 9000.0).abs() < 1e-9);
        assert!((w.clat_p99_us - 5.0).abs() < 1e-9);
    }

    #[test]
    fn reads_iops_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x_iops.1.log");
        std::fs::write(&p, "1000, 250, 1, 0, 0\n2000, 300, 1, 0, 0\n").expect("write");
        assert_eq!(iops_log(&p), vec![(1.0, 250.0), (2.0, 300.0)]);
        assert_eq!(iops_log_path(&dir.path().join("x")), p);
    }
}
