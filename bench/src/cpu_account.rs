//! What a measurement costs the machine: CPU seconds of the subject's servers, moto, fio and
//! this benchmark (the latency proxy every S3 byte passes through), and the rate the cores
//! allow at that cost per GiB moved.

use crate::fio::FioResult;
use crate::process::cpu_seconds;
use crate::stats::{Summary, show};
use crate::store_subjects::Session;
use serde::Serialize;
use std::fmt::Write as _;

const GIB: f64 = 1_073_741_824.0;

/// CPU seconds over one measurement (flattened into a measurement's JSON).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuSeconds {
    pub server_cpu_seconds: f64,
    pub moto_cpu_seconds: f64,
    /// fio's usr + sys share of its run.
    pub fio_cpu_seconds: f64,
    pub proxy_cpu_seconds: f64,
}

impl CpuSeconds {
    pub fn total(&self) -> f64 {
        self.server_cpu_seconds
            + self.moto_cpu_seconds
            + self.fio_cpu_seconds
            + self.proxy_cpu_seconds
    }
}

/// The CPU clocks at the start of a measurement.
pub struct CpuClock {
    server: f64,
    moto: f64,
    own: f64,
    moto_pid: Option<u32>,
}

impl CpuClock {
    pub fn start(session: &Session, moto_pid: Option<u32>) -> CpuClock {
        CpuClock {
            server: session.cpu_time().as_secs_f64(),
            moto: cpu_seconds(moto_pid),
            own: cpu_seconds(Some(std::process::id())),
            moto_pid,
        }
    }

    /// What was spent since the start; fio's share from its report over its `fio_seconds`.
    pub fn stop(&self, session: &Session, fio: &FioResult, fio_seconds: f64) -> CpuSeconds {
        CpuSeconds {
            server_cpu_seconds: session.cpu_time().as_secs_f64() - self.server,
            moto_cpu_seconds: cpu_seconds(self.moto_pid) - self.moto,
            fio_cpu_seconds: (fio.fio_usr_cpu + fio.fio_sys_cpu) / 100.0 * fio_seconds,
            proxy_cpu_seconds: cpu_seconds(Some(std::process::id())) - self.own,
        }
    }
}

/// The paragraph and table head of a "CPU per GiB" section; rows come from [`row_cells`].
/// `what` names the table's leading columns, e.g. `"subject"` or `"subject | workload"`.
pub fn table_head(o: &mut String, cores: usize, moved: &str, what: &str) {
    let _ = writeln!(o, "\n## CPU per GiB {moved} (core-seconds)\n");
    let _ = writeln!(
        o,
        "The machine has {cores} cores; a run whose processes together need C core-seconds per \
         GiB cannot go faster than {cores} ÷ C GiB/s however the work is arranged.\n"
    );
    let leading = "|---".repeat(what.split('|').count());
    let _ = writeln!(
        o,
        "| {what} | server | moto | fio | proxy | all | CPU-bound limit MiB/s |\n{leading}|---:|---:|---:|---:|---:|---:|"
    );
}

/// `server | moto | fio | proxy | all | limit` per GiB of runs given as (CPU, bytes moved).
pub fn row_cells(runs: &[(CpuSeconds, u64)], cores: usize) -> String {
    let per_gib = |f: &dyn Fn(&CpuSeconds) -> f64| {
        Summary::of_iter(
            runs.iter()
                .filter(|(_, bytes)| *bytes > 0)
                .map(|(cpu, bytes)| f(cpu) / (*bytes as f64 / GIB)),
        )
    };
    let all = per_gib(&|c| c.total());
    let limit = all.map_or("–".into(), |s| {
        format!("{:.0}", cores as f64 * 1024.0 / s.median)
    });
    format!(
        "{} | {} | {} | {} | {} | {limit}",
        show(per_gib(&|c| c.server_cpu_seconds), 2),
        show(per_gib(&|c| c.moto_cpu_seconds), 2),
        show(per_gib(&|c| c.fio_cpu_seconds), 2),
        show(per_gib(&|c| c.proxy_cpu_seconds), 2),
        show(all, 2),
    )
}
