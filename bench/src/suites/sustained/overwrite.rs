//! `space` and `gc-cost`: 4 KiB random overwrites of a 1 GiB region on the local-directory
//! store. `space` watches what the store holds against what the volume uses (garbage
//! collection must keep up) and what is PUT against what the client wrote; `gc-cost` compares
//! the foreground's IOPS with garbage collection on and off (`serve --no-gc`).

use super::fio_job::{self, Outcome};
use super::server::{self, LogProblems, ServeSpec, Server, Stopped, Store};
use super::{Ctx, GIB};
use crate::process::check_interrupted;
use crate::server_metrics::{self as metrics, Sampler};
use crate::stats::Summary;
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// The region written once and then overwritten.
pub const REGION_BYTES: u64 = GIB;
/// The volume (a 1 GiB hot region on a disk of the usual size).
const VOLUME_BYTES: u64 = 100 * GIB;
/// The headline samples of `space` are every 30th one-second sample …
pub const HEADLINE_EVERY: u64 = 30;
/// … after the first two minutes (garbage collection needs garbage before it can keep up).
pub const SETTLE_SECS: f64 = 120.0;
pub const RATIO_FLOOR: f64 = 1.5;
pub const PUT_FLOOR: f64 = 2.0;
/// fio is stopped early when the scratch filesystem gets this low (GC off, or GC not keeping
/// up, grows the store without bound).
const MIN_FREE: u64 = 3 * GIB;
/// After fio, the upload backlog must drain within this: four times --max-upload-lag (30 s),
/// the longest the engine lets the store lag under overwrites.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// A clean stop uploads whatever is still journaled.
const STOP_GRACE: Duration = Duration::from_secs(600);
const POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Gc {
    On,
    Off,
}

impl Gc {
    pub fn name(self) -> &'static str {
        match self {
            Gc::On => "GC on",
            Gc::Off => "GC off (--no-gc)",
        }
    }
}

/// The store and the server's counters at one moment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    /// Samples are one `period` apart on a fixed clock: tick k is at k × period.
    pub tick: u64,
    pub t_secs: f64,
    /// Total size of all files under the store directory (chunks, dead or alive, and map).
    pub store_bytes: u64,
    /// `bucketdisk_stored_bytes`: compressed bytes of the blocks in use.
    pub live_bytes: Option<f64>,
    pub allocated_bytes: Option<f64>,
    /// `bucketdisk_chunk_bytes`: chunks the block map knows (committed, dead ones awaiting
    /// deletion included; uploads in flight are not in it).
    pub committed_chunk_bytes: Option<f64>,
    /// `bucketdisk_store_written_bytes_total`.
    pub put_bytes_total: Option<f64>,
    /// Payload bytes of NBD writes answered (`bucketdisk_request_bytes_total{command="write"}`).
    pub client_bytes_total: Option<f64>,
    pub chunks_deleted_total: Option<f64>,
    pub chunks_rewritten_total: Option<f64>,
    pub upload_lag_secs: Option<f64>,
    pub dirty_bytes: Option<f64>,
    /// `bucketdisk_upload_lag_records`: journal records not yet in the store.
    pub upload_lag_records: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Sample {
    /// Stored ÷ live.
    pub fn ratio(&self) -> Option<f64> {
        let live = self.live_bytes.filter(|&l| l > 0.0)?;
        Some(self.store_bytes as f64 / live)
    }

    /// Committed chunk bytes ÷ live: the store without the upload in flight.
    pub fn committed_ratio(&self) -> Option<f64> {
        let live = self.live_bytes.filter(|&l| l > 0.0)?;
        Some(self.committed_chunk_bytes? / live)
    }
}

fn sample(store: &Path, addr: SocketAddr, tick: u64, t_secs: f64) -> Sample {
    let store_bytes = server::tree_bytes(store);
    match metrics::scrape(addr) {
        Ok(m) => Sample {
            tick,
            t_secs,
            store_bytes,
            live_bytes: m.get("bucketdisk_stored_bytes"),
            allocated_bytes: m.get("bucketdisk_allocated_bytes"),
            committed_chunk_bytes: m.get("bucketdisk_chunk_bytes"),
            put_bytes_total: m.get("bucketdisk_store_written_bytes_total"),
            client_bytes_total: m.labeled("bucketdisk_request_bytes_total", "command=\"write\""),
            chunks_deleted_total: m.get("bucketdisk_chunks_deleted_total"),
            chunks_rewritten_total: m.get("bucketdisk_chunks_rewritten_total"),
            upload_lag_secs: m.get("bucketdisk_upload_lag_seconds"),
            dirty_bytes: m.get("bucketdisk_dirty_bytes"),
            upload_lag_records: m.get("bucketdisk_upload_lag_records"),
            error: None,
        },
        Err(e) => Sample {
            tick,
            t_secs,
            store_bytes,
            error: Some(format!("{e:#}")),
            ..Sample::default()
        },
    }
}

/// One server session: a sequential fill of the region, then random overwrites.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Session {
    /// "space", "gc-cost-on-1", …: also its scratch directory and its log's name.
    pub name: String,
    pub gc: Option<Gc>,
    pub repeat: usize,
    pub minutes: f64,
    pub server_command: String,
    pub fill_command: String,
    pub fill: Outcome,
    pub overwrite_command: String,
    pub overwrite: Outcome,
    pub sample_every_secs: f64,
    /// Seconds since the overwrites started.
    pub samples: Vec<Sample>,
    /// fio's write IOPS per second.
    pub iops_log: Vec<(f64, f64)>,
    /// Right before the overwrites, and once the upload backlog had drained after them.
    pub start: Sample,
    pub drained: Option<Sample>,
    pub drain_secs: Option<f64>,
    /// Why the backlog did not drain, if it did not (the clean stop then uploads it).
    pub drain_error: Option<String>,
    pub stop: Stopped,
    pub log: LogProblems,
    /// Why fio was stopped before its time, if it was.
    pub stopped_early: Option<String>,
}

impl Session {
    /// Bytes PUT ÷ client bytes written during the overwrites, once the backlog had drained.
    pub fn put_per_client(&self) -> Option<f64> {
        let end = self.drained.as_ref()?;
        let put = end.put_bytes_total? - self.start.put_bytes_total?;
        let client = end.client_bytes_total? - self.start.client_bytes_total?;
        (client > 0.0).then(|| put / client)
    }

    /// The same over the whole session (the sequential fill included).
    pub fn put_per_client_session(&self) -> Option<f64> {
        let end = self.drained.as_ref()?;
        let (put, client) = (end.put_bytes_total?, end.client_bytes_total?);
        (client > 0.0).then(|| put / client)
    }

    /// PUT ÷ client bytes of the overwrites up to the last sample taken while fio ran (an
    /// underestimate when the backlog then did not drain: what was still dirty is not in it).
    pub fn put_per_client_so_far(&self) -> Option<f64> {
        self.put_ratio_series().last().map(|p| p.1)
    }

    /// PUT ÷ client bytes since the overwrites started, at every sample that has both.
    pub fn put_ratio_series(&self) -> Vec<(f64, f64)> {
        let (Some(p0), Some(c0)) = (self.start.put_bytes_total, self.start.client_bytes_total)
        else {
            return Vec::new();
        };
        self.samples
            .iter()
            .filter_map(|s| {
                let (put, client) = (s.put_bytes_total? - p0, s.client_bytes_total? - c0);
                (client > 0.0).then(|| (s.t_secs, put / client))
            })
            .collect()
    }

    pub fn iops(&self) -> Option<f64> {
        self.overwrite.write.as_ref().map(|w| w.iops)
    }
}

/// What a session runs.
struct SessionPlan<'a> {
    name: String,
    gc: Gc,
    repeat: usize,
    minutes: f64,
    sample_every: Duration,
    extra: &'a [&'a str],
}

fn fill_args(uri: &str) -> Vec<String> {
    vec![
        "--name=fill".into(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--rw=write".into(),
        "--bs=1M".into(),
        "--iodepth=8".into(),
        "--numjobs=1".into(),
        format!("--size={REGION_BYTES}"),
    ]
}

fn overwrite_args(uri: &str, minutes: f64, iops_log: &Path) -> Vec<String> {
    vec![
        "--name=overwrite".into(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        "--iodepth=16".into(),
        "--numjobs=1".into(),
        format!("--size={REGION_BYTES}"),
        "--time_based".into(),
        format!("--runtime={}s", (minutes * 60.0).round() as u64),
        "--norandommap".into(),
        format!("--write_iops_log={}", iops_log.display()),
        "--log_avg_msec=1000".into(),
    ]
}

/// Runs one session in its own scratch directory, deleted afterwards.
fn session(ctx: &Ctx, plan: &SessionPlan<'_>) -> Result<Session> {
    let dir = ctx.work.join(&plan.name);
    let result = session_in(ctx, plan, &dir);
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    result
}

fn session_in(ctx: &Ctx, plan: &SessionPlan<'_>, dir: &Path) -> Result<Session> {
    let store_dir = dir.join("store");
    std::fs::create_dir_all(&store_dir)
        .with_context(|| format!("creating {}", store_dir.display()))?;
    let log = ctx.logs.join(format!("{}-serve.log", plan.name));
    let mut server = Server::start(&ServeSpec {
        bin: &ctx.bin,
        store: &Store::Dir(store_dir.clone()),
        cache: &dir.join("cache"),
        size: VOLUME_BYTES,
        extra: plan.extra,
        log: &log,
    })?;
    let mut out = Session {
        name: plan.name.clone(),
        gc: Some(plan.gc),
        repeat: plan.repeat,
        minutes: plan.minutes,
        server_command: server.command_line.clone(),
        sample_every_secs: plan.sample_every.as_secs_f64(),
        ..Session::default()
    };
    let fill = fill_args(&server.uri());
    out.fill_command = fio_job::describe(&fill);
    out.fill = fio_job::Running::spawn(&fill, dir, "fill")?.finish()?;
    if !out.fill.ok {
        bail!(
            "{}: the sequential fill failed: {}",
            plan.name,
            out.fill.verdict()
        );
    }
    out.start = sample(&store_dir, server.metrics, 0, 0.0);
    let iops_prefix = dir.join("overwrite");
    let args = overwrite_args(&server.uri(), plan.minutes, &iops_prefix);
    out.overwrite_command = fio_job::describe(&args);
    eprintln!(
        "sustained: [{}] {} for {:.1} min: {}",
        plan.name,
        plan.gc.name(),
        plan.minutes,
        out.overwrite_command
    );
    let addr = server.metrics;
    let watched = store_dir.clone();
    let sampler = Sampler::start(plan.sample_every, move |tick, t| {
        sample(&watched, addr, tick, t)
    });
    let mut fio = fio_job::Running::spawn(&args, dir, "overwrite")?;
    while !fio.finished()? {
        check_interrupted()?;
        server.ensure_running()?;
        if out.stopped_early.is_none() {
            out.stopped_early = guard_disk(&ctx.work)?;
            if out.stopped_early.is_some() {
                fio.terminate();
            }
        }
        std::thread::sleep(POLL);
    }
    out.overwrite = fio.finish()?;
    out.samples = sampler.finish();
    out.iops_log = fio_job::iops_log(&fio_job::iops_log_path(&iops_prefix));
    eprintln!(
        "sustained: [{}] overwrites {}: {:.0} IOPS",
        plan.name,
        out.overwrite.verdict(),
        out.iops().unwrap_or(0.0)
    );
    let t = Instant::now();
    match drain(&mut server, &store_dir) {
        Ok(s) => {
            out.drain_secs = Some(t.elapsed().as_secs_f64());
            out.drained = Some(s);
        }
        Err(e) => {
            eprintln!("sustained: [{}] {e:#}", plan.name);
            out.drain_error = Some(format!("{e:#}"));
        }
    }
    out.stop = server.stop(STOP_GRACE)?;
    out.log = LogProblems::scan(&log);
    Ok(out)
}

/// `Some(why)` once the scratch filesystem is nearly full.
fn guard_disk(work: &Path) -> Result<Option<String>> {
    let free = crate::machine::free_bytes(work)?;
    Ok((free < MIN_FREE).then(|| {
        let why = format!(
            "fio stopped early: {:.1} GiB left free in {}",
            free as f64 / GIB as f64,
            work.display()
        );
        eprintln!("sustained: {why}");
        why
    }))
}

/// Waits until nothing written is waiting for upload; returns the sample that says so.
fn drain(server: &mut Server, store: &Path) -> Result<Sample> {
    let t = Instant::now();
    loop {
        server.ensure_running()?;
        check_interrupted()?;
        let s = sample(store, server.metrics, 0, 0.0);
        let idle = s.error.is_none()
            && s.dirty_bytes.unwrap_or(0.0) == 0.0
            && s.upload_lag_secs.unwrap_or(0.0) == 0.0;
        if idle {
            return Ok(s);
        }
        if t.elapsed() > DRAIN_TIMEOUT {
            bail!(
                "the upload backlog did not drain within {DRAIN_TIMEOUT:?} after fio: {} MiB \
                 dirty, {} journal records not uploaded, upload lag gauge {} s",
                s.dirty_bytes.map_or(-1.0, |b| b / 1_048_576.0).round(),
                s.upload_lag_records.unwrap_or(-1.0),
                s.upload_lag_secs.unwrap_or(-1.0)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The space part's headline numbers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SpaceSummary {
    /// Stored ÷ live at every 30 s sample after the first two minutes: (seconds, ratio).
    pub ratio_30s: Vec<(f64, f64)>,
    pub max_ratio_30s: Option<f64>,
    pub over_floor_30s: usize,
    /// The same over every 1 s sample after two minutes.
    pub samples_1s: usize,
    pub max_ratio_1s: Option<f64>,
    pub over_floor_1s: usize,
    /// Mean of the 1 s samples (time-weighted, as they are evenly spaced).
    pub mean_ratio_1s: Option<f64>,
    /// Committed chunk bytes ÷ live over the 1 s samples: what the store holds apart from the
    /// chunks of the upload in flight, which cannot replace the old ones before it commits.
    pub max_committed_ratio_1s: Option<f64>,
    pub put_per_client: Option<f64>,
    pub put_per_client_session: Option<f64>,
    /// fio's per-second write IOPS.
    pub iops: Option<Summary>,
}

impl SpaceSummary {
    pub fn of(s: &Session) -> SpaceSummary {
        let settled: Vec<&Sample> = s
            .samples
            .iter()
            .filter(|x| x.tick as f64 * s.sample_every_secs >= SETTLE_SECS)
            .collect();
        let ratios = |keep: &dyn Fn(&Sample) -> bool| -> Vec<(f64, f64)> {
            settled
                .iter()
                .filter(|x| keep(x))
                .filter_map(|x| Some((x.t_secs, x.ratio()?)))
                .collect()
        };
        let every = (HEADLINE_EVERY as f64 / s.sample_every_secs)
            .round()
            .max(1.0) as u64;
        let ratio_30s = ratios(&|x| x.tick % every == 0);
        let ratio_1s = ratios(&|_| true);
        let max = |v: &[(f64, f64)]| v.iter().map(|p| p.1).reduce(f64::max);
        let over = |v: &[(f64, f64)]| v.iter().filter(|p| p.1 > RATIO_FLOOR).count();
        let iops: Vec<f64> = s.iops_log.iter().map(|p| p.1).collect();
        let mean_ratio_1s = (!ratio_1s.is_empty())
            .then(|| ratio_1s.iter().map(|p| p.1).sum::<f64>() / ratio_1s.len() as f64);
        let max_committed_ratio_1s = settled
            .iter()
            .filter_map(|x| x.committed_ratio())
            .reduce(f64::max);
        SpaceSummary {
            mean_ratio_1s,
            max_committed_ratio_1s,
            max_ratio_30s: max(&ratio_30s),
            over_floor_30s: over(&ratio_30s),
            samples_1s: ratio_1s.len(),
            max_ratio_1s: max(&ratio_1s),
            over_floor_1s: over(&ratio_1s),
            ratio_30s,
            put_per_client: s.put_per_client(),
            put_per_client_session: s.put_per_client_session(),
            iops: Summary::of(&iops),
        }
    }

    /// Stored ≤ 1.5 × live at every 30 s sample after two minutes; `None` without such samples.
    pub fn ratio_floor_met(&self) -> Option<bool> {
        (!self.ratio_30s.is_empty()).then_some(self.over_floor_30s == 0)
    }

    pub fn put_floor_met(&self) -> Option<bool> {
        self.put_per_client.map(|q| q <= PUT_FLOOR)
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SpaceResult {
    pub session: Session,
    pub summary: SpaceSummary,
}

/// `space`: one session with garbage collection on, sampled every second.
pub fn space(ctx: &Ctx, minutes: f64) -> Result<SpaceResult> {
    let session = session(
        ctx,
        &SessionPlan {
            name: "space".into(),
            gc: Gc::On,
            repeat: 1,
            minutes,
            sample_every: Duration::from_secs(1),
            extra: &[],
        },
    )?;
    let summary = SpaceSummary::of(&session);
    Ok(SpaceResult { session, summary })
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GcCostResult {
    pub minutes: f64,
    pub repeats: usize,
    pub runs: Vec<Session>,
    pub iops_on: Option<Summary>,
    pub iops_off: Option<Summary>,
    /// Median IOPS with GC ÷ median IOPS without.
    pub ratio: Option<f64>,
}

/// GC costs at most this share of the foreground's IOPS.
pub const GC_COST_FLOOR: f64 = 0.8;

impl GcCostResult {
    pub fn floor_met(&self) -> Option<bool> {
        self.ratio.map(|q| q >= GC_COST_FLOOR)
    }

    /// Runs of `gc` that completed without a fio error.
    pub fn iops_of(&self, gc: Gc) -> Vec<f64> {
        self.runs
            .iter()
            .filter(|r| r.gc == Some(gc) && r.overwrite.ok)
            .filter_map(Session::iops)
            .collect()
    }
}

/// `gc-cost`: on, off, on, off, … each a fresh volume; samples every 5 s (for the store size).
pub fn gc_cost(ctx: &Ctx, minutes: f64, repeats: usize) -> Result<GcCostResult> {
    let mut result = GcCostResult {
        minutes,
        repeats,
        ..GcCostResult::default()
    };
    for repeat in 1..=repeats {
        for gc in [Gc::On, Gc::Off] {
            check_interrupted()?;
            let extra: &[&str] = match gc {
                Gc::On => &[],
                Gc::Off => &["--no-gc"],
            };
            let name = match gc {
                Gc::On => format!("gc-cost-on-{repeat}"),
                Gc::Off => format!("gc-cost-off-{repeat}"),
            };
            let run = session(
                ctx,
                &SessionPlan {
                    name,
                    gc,
                    repeat,
                    minutes,
                    sample_every: Duration::from_secs(5),
                    extra,
                },
            )?;
            result.runs.push(run);
        }
    }
    result.iops_on = Summary::of(&result.iops_of(Gc::On));
    result.iops_off = Summary::of(&result.iops_of(Gc::Off));
    result.ratio = match (&result.iops_on, &result.iops_off) {
        (Some(on), Some(off)) if off.median > 0.0 => Some(on.median / off.median),
        _ => None,
    };
    Ok(result)
}

/// Scratch space a session may need: the journal limit, the region in the cache, and a store
/// several times the region (more with GC off; the disk guard stops fio before the end).
pub fn space_needed() -> u64 {
    4 * GIB + 2 * REGION_BYTES + 6 * REGION_BYTES + MIN_FREE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(tick: u64, store: u64, live: f64, put: f64, client: f64) -> Sample {
        Sample {
            tick,
            t_secs: tick as f64,
            store_bytes: store,
            live_bytes: Some(live),
            put_bytes_total: Some(put),
            client_bytes_total: Some(client),
            ..Sample::default()
        }
    }

    #[test]
    fn summary_counts_headline_samples_after_two_minutes() {
        let mut session = Session {
            sample_every_secs: 1.0,
            start: s(0, 0, 1.0, 100.0, 100.0),
            ..Session::default()
        };
        for tick in 0..=240 {
            // 2.0 × at tick 150 (not a 30 s tick) and at tick 180 (one).
            let store = if tick == 150 || tick == 180 { 200 } else { 120 };
            session.samples.push(s(tick, store, 100.0, 0.0, 0.0));
        }
        session.drained = Some(s(0, 0, 1.0, 400.0, 250.0));
        let sum = SpaceSummary::of(&session);
        assert_eq!(sum.ratio_30s.len(), 5, "120, 150, 180, 210, 240");
        assert_eq!(sum.over_floor_30s, 2);
        assert_eq!(sum.samples_1s, 121);
        assert_eq!(sum.over_floor_1s, 2);
        assert_eq!(sum.max_ratio_1s, Some(2.0));
        assert_eq!(sum.put_per_client, Some(2.0));
        assert_eq!(sum.put_floor_met(), Some(true));
        assert_eq!(sum.ratio_floor_met(), Some(false));
    }

    #[test]
    fn no_headline_before_two_minutes() {
        let session = Session {
            sample_every_secs: 1.0,
            samples: (0..60).map(|t| s(t, 100, 100.0, 0.0, 0.0)).collect(),
            ..Session::default()
        };
        assert_eq!(SpaceSummary::of(&session).ratio_floor_met(), None);
    }
}
