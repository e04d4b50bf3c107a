//! `sparse-fill` and `stall`: one 4 KiB write in every 64 KiB block of a volume on S3 (moto
//! behind the latency proxy), fio verify headers in every write; for `stall` the store frozen
//! (SIGSTOP to moto) part-way through. Then a clean stop, and a cold boot from the store alone
//! (an empty cache directory): the block map must hold every block, and three sample regions
//! must pass fio's verification.

use super::cold::{self, ColdCheck};
use super::fio_job::{self, Outcome};
use super::server::{self, LogProblems, ServeSpec, Server, Stall, Stopped, Store};
use super::{Ctx, KIB};
use crate::latency_proxy::{LatencyProxy, Traffic};
use crate::moto::Moto;
use crate::process::{RssSampler, check_interrupted};
use crate::server_metrics::{self as metrics, Sampler, Scrape};
use anyhow::{Context, Result};
use bucketdisk::units::format_size;
use serde::Serialize;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// fio writes one block of this size …
pub const WRITE_BYTES: u64 = 4 * KIB;
/// … at the start of every block of this size (the volume's block size, bucketdisk's default).
pub const BLOCK_BYTES: u64 = 64 * KIB;
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How often the loop checks fio, the servers and the stall's clock …
const POLL: Duration = Duration::from_millis(100);
/// … and how often it reads the server's write counter for the stall's trigger (rendering
/// the metrics reads the block map's statistics: not something to do ten times a second).
const TRIGGER_CHECK: Duration = Duration::from_millis(250);
/// A clean stop uploads the whole backlog (up to the 4 GiB journal) at the added latency.
const STOP_GRACE: Duration = Duration::from_secs(3600);

/// What one fill part does.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub part: &'static str,
    pub fill_bytes: u64,
    pub latency_ms: u64,
    pub verify_region_bytes: u64,
    pub stall: Option<StallPlan>,
    /// `serve --journal-limit` for the filling server (its default otherwise).
    pub journal_limit: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct StallPlan {
    pub secs: u64,
    /// The store stops once fio has written this share of its bytes (from the server's write
    /// counter), so the stall always falls inside the run, whatever its speed.
    pub at_fraction: f64,
}

impl Plan {
    pub(super) fn blocks(&self) -> u64 {
        self.fill_bytes / BLOCK_BYTES
    }

    fn client_bytes(&self) -> u64 {
        self.blocks() * WRITE_BYTES
    }

    fn serve_flags(&self) -> Vec<String> {
        self.journal_limit
            .map(|b| vec!["--journal-limit".to_string(), b.to_string()])
            .unwrap_or_default()
    }
}

/// The server's metrics at one moment of the fill.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    pub t_secs: f64,
    /// "stall-start", "stall-end", "final" for the samples taken at those moments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<&'static str>,
    pub dirty_bytes: Option<f64>,
    pub upload_lag_secs: Option<f64>,
    pub write_wait_secs_total: Option<f64>,
    pub write_waits_total: Option<f64>,
    pub upload_journal_bytes_total: Option<f64>,
    pub uploads_total: Option<f64>,
    pub store_put_requests_total: Option<f64>,
    pub store_written_bytes_total: Option<f64>,
    /// Payload bytes of NBD writes the server answered.
    pub client_write_bytes_total: Option<f64>,
    /// Why the scrape failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn sample(addr: SocketAddr, t_secs: f64, tag: Option<&'static str>) -> Sample {
    match metrics::scrape(addr) {
        Ok(m) => Sample {
            t_secs,
            tag,
            dirty_bytes: m.get("bucketdisk_dirty_bytes"),
            upload_lag_secs: m.get("bucketdisk_upload_lag_seconds"),
            write_wait_secs_total: m.get("bucketdisk_write_wait_seconds_total"),
            write_waits_total: m.get("bucketdisk_write_waits_total"),
            upload_journal_bytes_total: m.get("bucketdisk_upload_journal_bytes_total"),
            uploads_total: m.get("bucketdisk_uploads_total"),
            store_put_requests_total: m.get("bucketdisk_store_put_requests_total"),
            store_written_bytes_total: m.get("bucketdisk_store_written_bytes_total"),
            client_write_bytes_total: client_write_bytes(&m),
            error: None,
        },
        Err(e) => Sample {
            t_secs,
            tag,
            error: Some(format!("{e:#}")),
            ..Sample::default()
        },
    }
}

fn client_write_bytes(m: &Scrape) -> Option<f64> {
    m.labeled("bucketdisk_request_bytes_total", "command=\"write\"")
}

/// The stall as it happened.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StallWindow {
    pub requested_secs: u64,
    /// Seconds after fio started.
    pub start_secs: f64,
    pub end_secs: f64,
    /// fio had already finished when the store came back.
    pub fio_finished_during: bool,
    /// Differences between the samples taken at SIGSTOP and right after SIGCONT. A write is
    /// counted when its wait ends, so writes held through the stall count in the next field.
    pub write_waits: Option<f64>,
    pub write_wait_secs: Option<f64>,
    /// The same from SIGSTOP to the last sample up to 30 s after SIGCONT.
    pub write_waits_through: Option<f64>,
    pub write_wait_secs_through: Option<f64>,
    pub client_write_bytes: Option<f64>,
    pub uploaded_bytes: Option<f64>,
    /// Highest upload lag and dirty bytes seen from the stall's start to 30 s after its end.
    pub max_upload_lag_secs: Option<f64>,
    pub max_dirty_bytes: Option<f64>,
}

/// Everything one fill part measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FillResult {
    pub part: &'static str,
    pub fill_bytes: u64,
    pub blocks: u64,
    pub latency_ms: u64,
    pub server_command: String,
    pub fio_command: String,
    pub fio: Outcome,
    /// fio's own clock: the run's wall time and write IOPS.
    pub wall_secs: f64,
    pub write_iops: f64,
    pub samples: Vec<Sample>,
    /// fio's write IOPS per second.
    pub iops_log: Vec<(f64, f64)>,
    pub stall: Option<StallWindow>,
    pub stop: Stopped,
    /// Everything that went through the latency proxy, fio start → clean stop.
    pub store_traffic: Traffic,
    pub moto_peak_rss_bytes: u64,
    pub log: LogProblems,
    pub cold: ColdCheck,
}

impl FillResult {
    /// The floor: no error from fio, and every block back after a cold boot.
    pub fn floor_met(&self) -> bool {
        self.fio.ok
            && self.cold.blocks_present()
            && !self.cold.regions.is_empty()
            && self.cold.regions_verified() == self.cold.regions.len()
    }

    pub fn max_of(&self, f: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
        self.samples.iter().filter_map(f).reduce(f64::max)
    }

    /// Upload throughput between samples: (seconds, bytes per second of journaled writes).
    pub fn upload_rate(&self) -> Vec<(f64, f64)> {
        rate(&self.samples, |s| s.upload_journal_bytes_total)
    }
}

/// Per-interval rate of a counter between consecutive samples that have it.
pub fn rate(samples: &[Sample], f: impl Fn(&Sample) -> Option<f64>) -> Vec<(f64, f64)> {
    let points: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| Some((s.t_secs, f(s)?)))
        .collect();
    points
        .windows(2)
        .filter(|w| w[1].0 > w[0].0)
        .map(|w| (w[1].0, (w[1].1 - w[0].1) / (w[1].0 - w[0].0)))
        .collect()
}

/// The fio job of the fill, or (with `verify`) its `--verify_only` replay of one region.
/// `--io_size` is one write per block: without it a `--verify_only` run wraps around its region
/// several times (the fill stops at the region's end either way).
pub(super) fn fio_args(
    uri: &str,
    offset: u64,
    bytes: u64,
    verify: bool,
    iops_log: Option<&Path>,
) -> Vec<String> {
    let mut args = vec![
        "--name=sparse-fill".to_string(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        format!("--rw=write:{}k", (BLOCK_BYTES - WRITE_BYTES) / KIB),
        format!("--bs={}k", WRITE_BYTES / KIB),
        "--iodepth=32".into(),
        "--numjobs=1".into(),
        format!("--offset={offset}"),
        format!("--size={bytes}"),
        format!("--io_size={}", bytes / BLOCK_BYTES * WRITE_BYTES),
        "--verify=crc32c".into(),
        // fio would otherwise leave `local-sparse-fill-0-verify.state` in the working directory.
        "--verify_state_save=0".into(),
    ];
    if verify {
        args.push("--verify_only".into());
    } else {
        args.push("--do_verify=0".into());
    }
    if let Some(prefix) = iops_log {
        args.push(format!("--write_iops_log={}", prefix.display()));
        args.push("--log_avg_msec=1000".into());
    }
    args
}

/// Runs one fill part: moto and the proxy for this part alone (moto's memory goes with it).
pub fn run(ctx: &Ctx, plan: &Plan) -> Result<FillResult> {
    let dir = ctx.work.join(plan.part);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Moto spools every chunk (over 5 MiB) to a temporary file: keep them in this part's
    // scratch directory, where the free-space check looked and which is deleted afterwards.
    let spool = dir.join("moto-spool");
    std::fs::create_dir_all(&spool).with_context(|| format!("creating {}", spool.display()))?;
    let mut moto = Moto::start_spooling_to(
        &ctx.logs.join(format!("{}-moto.log", plan.part)),
        Some(&spool),
    )?;
    moto.create_bucket(server::BUCKET)?;
    let moto_pid = moto.pid().context("moto has no pid")?;
    let moto_rss = RssSampler::start(moto_pid);
    let proxy = LatencyProxy::start(moto.addr, Duration::from_millis(plan.latency_ms))?;
    let store = Store::S3 {
        endpoint: proxy.endpoint(),
    };
    let before = proxy.traffic();
    let mut result = fill(ctx, plan, &store, &mut moto, &dir)?;
    result.store_traffic = proxy.traffic().since(&before);
    result.cold = cold::check(ctx, plan, &store, &dir);
    result.moto_peak_rss_bytes = moto_rss.finish().hwm;
    Ok(result)
}

/// Starts a server on an empty cache, fills, stops it cleanly.
fn fill(ctx: &Ctx, plan: &Plan, store: &Store, moto: &mut Moto, dir: &Path) -> Result<FillResult> {
    let log = ctx.logs.join(format!("{}-serve.log", plan.part));
    let flags = plan.serve_flags();
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut server = Server::start(&ServeSpec {
        bin: &ctx.bin,
        store,
        cache: &dir.join("cache"),
        size: plan.fill_bytes,
        extra: &extra,
        log: &log,
    })?;
    let iops_prefix = dir.join("fill");
    let args = fio_args(&server.uri(), 0, plan.fill_bytes, false, Some(&iops_prefix));
    eprintln!(
        "sustained: [{}] {} sparse fill at +{} ms: {}",
        plan.part,
        format_size(plan.fill_bytes),
        plan.latency_ms,
        fio_job::describe(&args)
    );
    let addr = server.metrics;
    // One clock for the sampler, the stall's samples and fio (started right after).
    let t0 = Instant::now();
    let sampler = Sampler::start(SAMPLE_EVERY, move |_, t| sample(addr, t, None));
    let mut fio = fio_job::Running::spawn(&args, dir, "fill")?;
    let mut stall = StallState::new(plan.stall);
    let mut marks = Vec::new();
    loop {
        check_interrupted()?;
        server.ensure_running()?;
        moto.ensure_running()?;
        let done = fio.finished()?;
        stall.advance(&server, moto, t0, done, plan.client_bytes(), &mut marks)?;
        if done && !stall.active() {
            break;
        }
        std::thread::sleep(POLL);
    }
    let fio_out = fio.finish()?;
    let mut samples = sampler.finish();
    samples.extend(marks);
    samples.push(sample(
        server.metrics,
        t0.elapsed().as_secs_f64(),
        Some("final"),
    ));
    samples.sort_by(|a, b| a.t_secs.total_cmp(&b.t_secs));
    eprintln!(
        "sustained: [{}] fio {} after {:.1} s; stopping the server (uploads the backlog)",
        plan.part,
        fio_out.verdict(),
        fio_out.wall_secs
    );
    let server_command = server.command_line.clone();
    let stop = server.stop(STOP_GRACE)?;
    eprintln!(
        "sustained: [{}] clean stop took {:.1} s ({})",
        plan.part, stop.secs, stop.status
    );
    let stall_window = stall.window(&samples);
    let write = fio_out.write.clone().unwrap_or_default();
    Ok(FillResult {
        part: plan.part,
        fill_bytes: plan.fill_bytes,
        blocks: plan.blocks(),
        latency_ms: plan.latency_ms,
        server_command,
        fio_command: fio_job::describe(&args),
        wall_secs: fio_out.wall_secs,
        write_iops: write.iops,
        fio: fio_out,
        samples,
        iops_log: fio_job::iops_log(&fio_job::iops_log_path(&iops_prefix)),
        stall: stall_window,
        stop,
        log: LogProblems::scan(&log),
        ..FillResult::default()
    })
}

/// The stall's progress through the run.
enum StallState {
    /// No stall in this part.
    None,
    /// Waiting for fio's progress; the server's write counter was last read at `checked`.
    Pending {
        plan: StallPlan,
        checked: Option<Instant>,
    },
    Active {
        plan: StallPlan,
        stall: Stall,
        since: Instant,
        start_secs: f64,
        fio_done: bool,
    },
    Done {
        plan: StallPlan,
        start_secs: f64,
        end_secs: f64,
        fio_finished_during: bool,
    },
}

impl StallState {
    fn new(plan: Option<StallPlan>) -> StallState {
        plan.map_or(StallState::None, |plan| StallState::Pending {
            plan,
            checked: None,
        })
    }

    fn active(&self) -> bool {
        matches!(self, StallState::Active { .. })
    }

    /// Starts the stall once fio has written its share, ends it after its time; the samples at
    /// both moments go to `marks`.
    fn advance(
        &mut self,
        server: &Server,
        moto: &Moto,
        t0: Instant,
        fio_done: bool,
        client_bytes: u64,
        marks: &mut Vec<Sample>,
    ) -> Result<()> {
        let state = std::mem::replace(self, StallState::None);
        *self = match state {
            StallState::Pending { plan, checked }
                if !fio_done && checked.is_some_and(|t| t.elapsed() < TRIGGER_CHECK) =>
            {
                StallState::Pending { plan, checked }
            }
            StallState::Pending { plan, .. } if !fio_done => {
                let target = plan.at_fraction * client_bytes as f64;
                let written = metrics::scrape(server.metrics)
                    .ok()
                    .and_then(|m| client_write_bytes(&m))
                    .unwrap_or(0.0);
                if written < target {
                    StallState::Pending {
                        plan,
                        checked: Some(Instant::now()),
                    }
                } else {
                    let stall = Stall::begin(moto.pid().context("moto has no pid")?)?;
                    let start_secs = t0.elapsed().as_secs_f64();
                    marks.push(sample(server.metrics, start_secs, Some("stall-start")));
                    eprintln!(
                        "sustained: store stalled (moto SIGSTOP) at {start_secs:.1} s for {} s",
                        plan.secs
                    );
                    StallState::Active {
                        plan,
                        stall,
                        since: Instant::now(),
                        start_secs,
                        fio_done: false,
                    }
                }
            }
            StallState::Active {
                plan,
                stall,
                since,
                start_secs,
                fio_done: was_done,
            } => {
                if since.elapsed() < Duration::from_secs(plan.secs) {
                    StallState::Active {
                        plan,
                        stall,
                        since,
                        start_secs,
                        fio_done: was_done || fio_done,
                    }
                } else {
                    stall.resume()?;
                    let end_secs = t0.elapsed().as_secs_f64();
                    marks.push(sample(server.metrics, end_secs, Some("stall-end")));
                    eprintln!("sustained: store resumed (moto SIGCONT) at {end_secs:.1} s");
                    StallState::Done {
                        plan,
                        start_secs,
                        end_secs,
                        fio_finished_during: was_done || fio_done,
                    }
                }
            }
            other => other,
        };
        Ok(())
    }

    /// The stall window with what the samples say about it.
    fn window(&self, samples: &[Sample]) -> Option<StallWindow> {
        let StallState::Done {
            plan,
            start_secs,
            end_secs,
            fio_finished_during,
        } = self
        else {
            return None;
        };
        let at = |tag| samples.iter().find(|s| s.tag == Some(tag));
        let (start, end) = (at("stall-start"), at("stall-end"));
        let delta = |f: fn(&Sample) -> Option<f64>| Some(f(end?)? - f(start?)?);
        let around: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.t_secs >= *start_secs && s.t_secs <= end_secs + 30.0)
            .collect();
        let after = around.last().copied();
        let through = |f: fn(&Sample) -> Option<f64>| Some(f(after?)? - f(start?)?);
        let max =
            |f: fn(&Sample) -> Option<f64>| around.iter().filter_map(|s| f(s)).reduce(f64::max);
        Some(StallWindow {
            requested_secs: plan.secs,
            start_secs: *start_secs,
            end_secs: *end_secs,
            fio_finished_during: *fio_finished_during,
            write_waits: delta(|s| s.write_waits_total),
            write_wait_secs: delta(|s| s.write_wait_secs_total),
            write_waits_through: through(|s| s.write_waits_total),
            write_wait_secs_through: through(|s| s.write_wait_secs_total),
            client_write_bytes: delta(|s| s.client_write_bytes_total),
            uploaded_bytes: delta(|s| s.upload_journal_bytes_total),
            max_upload_lag_secs: max(|s| s.upload_lag_secs),
            max_dirty_bytes: max(|s| s.dirty_bytes),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_job_writes_one_block_in_sixteen() {
        let args = fio_args("nbd://x/", 0, 1 << 30, false, None);
        assert!(args.contains(&"--rw=write:60k".to_string()));
        assert!(args.contains(&"--bs=4k".to_string()));
        assert!(args.contains(&format!("--io_size={}", (1u64 << 30) / 16)));
        assert!(args.contains(&"--do_verify=0".to_string()));
        let verify = fio_args("nbd://x/", 1 << 20, 1 << 20, true, None);
        assert!(verify.contains(&"--verify_only".to_string()));
        assert!(verify.contains(&"--offset=1048576".to_string()));
    }

    #[test]
    fn rates_between_samples() {
        let s = |t, v| Sample {
            t_secs: t,
            upload_journal_bytes_total: Some(v),
            ..Sample::default()
        };
        let r = rate(&[s(0.0, 0.0), s(5.0, 500.0), s(10.0, 500.0)], |x| {
            x.upload_journal_bytes_total
        });
        assert_eq!(r, vec![(5.0, 100.0), (10.0, 0.0)]);
    }
}
