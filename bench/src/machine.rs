//! What the benchmark ran on: hardware, kernel, filesystem, load, and tool versions; and the
//! machine-wide chores between runs (the page cache written back, scratch directories removed).

use crate::process::output_of;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub nproc: usize,
    pub memory_bytes: u64,
    pub kernel: String,
    /// Filesystem type and device of the directory holding the volume.
    pub filesystem: String,
}

impl Machine {
    pub fn probe(data_dir: &Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_bytes = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Machine {
            cpu_model,
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_bytes,
            kernel,
            filesystem: filesystem_of(data_dir),
        }
    }
}

fn filesystem_of(dir: &Path) -> String {
    let target = dir.to_string_lossy();
    output_of(
        "findmnt",
        &["-n", "-o", "FSTYPE,SOURCE,TARGET", "--target", &target],
    )
    .or_else(|_| output_of("stat", &["-f", "-c", "%T", &target]))
    .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
    .unwrap_or_else(|_| "unknown".into())
}

/// `/proc/loadavg`'s first three fields.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

#[derive(Debug, Clone, Serialize)]
pub struct Tools {
    pub fio: String,
    pub qemu_nbd: String,
    pub nbdkit: String,
    pub bucketdisk: String,
    /// `git rev-parse HEAD` of the workspace, with "-dirty" if the tree has changes.
    pub bucketdisk_commit: String,
}

impl Tools {
    /// bucketdisk's version and the commit it was built from, as report tables show it.
    pub fn bucketdisk_line(&self) -> String {
        format!("{} (commit {})", self.bucketdisk, self.bucketdisk_commit)
    }

    pub fn probe(bucketdisk: &Path, workspace: &Path) -> Result<Tools> {
        let first_line = |s: String| s.lines().next().unwrap_or_default().to_string();
        let ws = workspace.to_string_lossy();
        let commit = output_of("git", &["-C", &ws, "rev-parse", "HEAD"])
            .context("reading the git commit")?;
        let dirty = output_of("git", &["-C", &ws, "status", "--porcelain"])
            .map(|s| !s.is_empty())
            .unwrap_or(false);
        Ok(Tools {
            fio: output_of("fio", &["--version"]).context("fio is required")?,
            qemu_nbd: first_line(
                output_of("qemu-nbd", &["--version"]).context("qemu-nbd is required")?,
            ),
            nbdkit: output_of("nbdkit", &["--version"]).context("nbdkit is required")?,
            bucketdisk: output_of(&bucketdisk.to_string_lossy(), &["--version"])
                .context("running bucketdisk --version")?,
            bucketdisk_commit: if dirty {
                format!("{commit}-dirty")
            } else {
                commit
            },
        })
    }
}

/// HHMM of an RFC 3339 timestamp from [`utc_now`] (what a second run of a day appends to its
/// results' names).
pub fn hhmm(started: &str) -> String {
    started
        .split('T')
        .nth(1)
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_digit)
        .take(4)
        .collect()
}

/// Bytes available to us on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).context("path with NUL")?;
    // SAFETY: a zeroed plain-data out-parameter of the right type.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and the out-parameter above.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    anyhow::ensure!(
        rc == 0,
        "statvfs {}: {}",
        dir.display(),
        std::io::Error::last_os_error()
    );
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Today's UTC date as YYYY-MM-DD and the time as an RFC 3339 timestamp.
pub fn utc_now() -> (String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let date = format!("{y:04}-{m:02}-{d:02}");
    let stamp = format!(
        "{date}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    (date, stamp)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The first line `program args` prints (its version), or why there is none.
pub fn version_line(program: &str, args: &[&str]) -> String {
    crate::process::output_of(program, args)
        .map(|s| s.lines().next().unwrap_or_default().to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// Writes back what earlier jobs left dirty in the page cache, so no job pays for another's.
pub fn flush_page_cache() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Removes `dir` and everything in it; a directory that is not there is fine (a subject's store
/// or cache reset before a run).
pub fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }
}
