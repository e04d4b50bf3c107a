//! Results of the `quick`/`full` comparison: raw runs, per-row summaries with ratios to the
//! local limit and to the best S3 peer, and the markdown written beside the JSON.

use crate::fio::{FioResult, Workload};
use crate::latency_proxy::Traffic;
use crate::machine::{Machine, Tools};
use crate::stats::Summary;
use crate::store_subjects::Kind;
use crate::suites::compare_clocks::{BootRun, HydrationRun, LitestreamRun, MkfsRun};
use serde::Serialize;
use std::fmt::Write as _;

const GIB: f64 = 1_073_741_824.0;
const MIB: f64 = 1_048_576.0;

/// One fio run of one workload against one subject at one latency setting.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub subject: Kind,
    /// Added first-byte latency of the object store; none for subjects that do not use it.
    pub latency_ms: Option<u64>,
    pub workload: &'static str,
    pub repeat: usize,
    pub fio: FioResult,
    pub wall_secs: f64,
    /// CPU (user + system) of the subject's processes over the run, ramp included.
    pub server_cpu_secs: f64,
    /// What went through the latency proxy during the run (S3-backed subjects).
    pub store: Option<Traffic>,
    /// Peak resident memory of the subject's processes over the session the run was part of.
    pub session_peak_rss_bytes: u64,
}

impl Run {
    /// Store requests per GiB that fio moved. Uploads that happen after the run (write-back,
    /// a clean stop) are not in it.
    fn per_gib(&self, f: impl Fn(&Traffic) -> u64) -> Option<f64> {
        let t = self.store.as_ref()?;
        let gib = self.fio.io_bytes as f64 / GIB;
        (gib > 0.0).then(|| f(t) as f64 / gib)
    }
}

/// Store traffic of one whole server session (all its workloads, and the write-back until the
/// server had stopped), against the bytes fio moved in it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionTraffic {
    pub subject: Kind,
    pub latency_ms: Option<u64>,
    pub repeat: usize,
    pub fio_bytes: u64,
    pub store: Traffic,
}

/// The repeats of one (workload, subject, latency), summarised.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub workload: &'static str,
    pub subject: Kind,
    pub latency_ms: Option<u64>,
    pub iops: Summary,
    pub mib_per_sec: Summary,
    pub clat_p50_us: Option<Summary>,
    pub clat_p99_us: Summary,
    pub server_cores: Option<Summary>,
    pub store_requests_per_gib: Option<Summary>,
    pub store_mib_per_gib: Option<Summary>,
    pub peak_rss_mib: Summary,
    /// Median IOPS over the best local-limit subject's median (qemu-nbd, nbdkit file).
    pub vs_local_limit: Option<f64>,
    /// Median IOPS over the best S3 peer's median at the same latency.
    pub vs_best_s3_peer: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SubjectLine {
    pub subject: Kind,
    pub command_line: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub runtime_secs: u64,
    pub ramp_secs: u64,
    pub repeats: usize,
    /// Bytes at the start of each 100 GiB disk that fio works over, written before measuring.
    pub region_bytes: u64,
    pub latencies_ms: Vec<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub suite: String,
    pub date: String,
    pub started: String,
    pub finished: String,
    pub command: String,
    pub machine: Machine,
    pub load_before: String,
    pub load_after: String,
    pub tools: Tools,
    pub peer_versions: Vec<(String, String)>,
    pub settings: Settings,
    pub workloads: Vec<Workload>,
    pub subjects: Vec<SubjectLine>,
    pub rows: Vec<Row>,
    pub runs: Vec<Run>,
    pub boots: Vec<BootRun>,
    pub hydrations: Vec<HydrationRun>,
    pub mkfs: Vec<MkfsRun>,
    pub litestream: Vec<LitestreamRun>,
    pub sessions: Vec<SessionTraffic>,
    /// Plot files written beside the report (names only).
    pub plots: Vec<String>,
    pub notes: Vec<String>,
}

fn clat_p50(r: &FioResult) -> Option<f64> {
    r.clat_percentiles_us
        .iter()
        .find(|(p, _)| (*p - 50.0).abs() < 1e-9)
        .map(|&(_, us)| us)
}

/// One row per (workload, subject, latency) that has runs, in the given orders.
pub fn summarize(runs: &[Run], workloads: &[Workload], order: &[(Kind, Option<u64>)]) -> Vec<Row> {
    let mut rows = Vec::new();
    for w in workloads {
        let median_iops = |k: Kind, lat: Option<u64>| {
            let v: Vec<f64> = runs
                .iter()
                .filter(|r| r.workload == w.name && r.subject == k && r.latency_ms == lat)
                .map(|r| r.fio.iops)
                .collect();
            Summary::of(&v).map(|s| s.median)
        };
        let best = |ms: Vec<Option<f64>>| ms.into_iter().flatten().reduce(f64::max);
        let limit = best(
            order
                .iter()
                .filter(|(k, _)| k.is_local_limit())
                .map(|&(k, lat)| median_iops(k, lat))
                .collect(),
        );
        for &(kind, lat) in order {
            let rs: Vec<&Run> = runs
                .iter()
                .filter(|r| r.workload == w.name && r.subject == kind && r.latency_ms == lat)
                .collect();
            let of = |f: &dyn Fn(&Run) -> Option<f64>| {
                Summary::of(&rs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
            };
            let Some(iops) = of(&|r| Some(r.fio.iops)) else {
                continue;
            };
            let peer = best(
                order
                    .iter()
                    .filter(|(k, l)| k.is_s3_peer() && *l == lat)
                    .map(|&(k, l)| median_iops(k, l))
                    .collect(),
            );
            let ratio = |base: Option<f64>| base.filter(|&b| b > 0.0).map(|b| iops.median / b);
            rows.push(Row {
                workload: w.name,
                subject: kind,
                latency_ms: lat,
                iops,
                mib_per_sec: of(&|r| Some(r.fio.bw_bytes / MIB)).unwrap_or(iops),
                clat_p50_us: of(&|r| clat_p50(&r.fio)),
                clat_p99_us: of(&|r| Some(r.fio.clat_p99_ns / 1000.0)).unwrap_or(iops),
                server_cores: of(&|r| (r.wall_secs > 0.0).then(|| r.server_cpu_secs / r.wall_secs)),
                store_requests_per_gib: of(&|r| r.per_gib(|t| t.requests)),
                store_mib_per_gib: of(&|r| {
                    r.per_gib(|t| t.request_bytes + t.response_bytes)
                        .map(|b| b / MIB)
                }),
                peak_rss_mib: of(&|r| Some(r.session_peak_rss_bytes as f64 / MIB)).unwrap_or(iops),
                vs_local_limit: ratio(limit),
                vs_best_s3_peer: if kind.is_local_limit() {
                    None
                } else {
                    ratio(peer)
                },
            });
        }
    }
    rows
}

/// "bucketdisk-s3-warm @20ms" or "qemu-nbd".
pub fn label(kind: Kind, latency_ms: Option<u64>) -> String {
    match latency_ms {
        Some(ms) => format!("{} @{ms}ms", kind.name()),
        None => kind.name().to_string(),
    }
}

fn cell(s: &Summary, digits: usize) -> String {
    if s.n > 1 {
        format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = digits)
    } else {
        format!("{:.d$}", s.median, d = digits)
    }
}

fn opt_cell(s: Option<&Summary>, digits: usize) -> String {
    s.map_or_else(|| "–".into(), |s| cell(s, digits))
}

fn ratio(q: Option<f64>) -> String {
    q.map_or_else(|| "–".into(), |q| format!("{q:.2}"))
}

/// Headline number of a workload: MiB/s for 1 MiB requests, IOPS otherwise.
pub fn headline(w: &Workload, row: &Row) -> Summary {
    if w.bs == "4k" {
        row.iops
    } else {
        row.mib_per_sec
    }
}

pub fn headline_unit(w: &Workload) -> &'static str {
    if w.bs == "4k" { "IOPS" } else { "MiB/s" }
}

pub fn markdown(r: &Report, stem: &str) -> String {
    let mut o = String::new();
    let s = &r.settings;
    let _ = writeln!(
        o,
        "# {}: bucketdisk vs the local limit and S3-backed peers — {}\n",
        r.suite, r.date
    );
    let _ = writeln!(o, "```\n{}\n```\n", r.command);
    let _ = writeln!(o, "## Machine and tools\n\n| | |\n|---|---|");
    let _ = writeln!(o, "| CPU | {} × {} |", r.machine.nproc, r.machine.cpu_model);
    let _ = writeln!(
        o,
        "| memory | {:.1} GiB |",
        r.machine.memory_bytes as f64 / GIB
    );
    let _ = writeln!(o, "| kernel | {} |", r.machine.kernel);
    let _ = writeln!(o, "| scratch filesystem | {} |", r.machine.filesystem);
    let _ = writeln!(
        o,
        "| load average (1/5/15 min) | before {} · after {} |",
        r.load_before, r.load_after
    );
    let _ = writeln!(o, "| run | {} → {} |", r.started, r.finished);
    let _ = writeln!(o, "| fio | {} |", r.tools.fio);
    let _ = writeln!(o, "| qemu-nbd | {} |", r.tools.qemu_nbd);
    let _ = writeln!(o, "| nbdkit | {} |", r.tools.nbdkit);
    for (name, version) in &r.peer_versions {
        let _ = writeln!(o, "| {name} | {version} |");
    }
    let _ = writeln!(
        o,
        "| bucketdisk | {} (commit {}) |\n",
        r.tools.bucketdisk, r.tools.bucketdisk_commit
    );

    let _ = writeln!(o, "## Setup\n");
    let _ = writeln!(
        o,
        "Every subject exports a 100 GiB disk over NBD on 127.0.0.1; fio's nbd engine (one job, \
         one connection, `--norandommap`) works over its first {} MiB, written once before \
         anything is measured. Each run: {} s after a {} s ramp; {} repeat(s), subjects \
         round-robin within a repeat; tables show the median and (min–max). The S3-backed \
         subjects share one moto server and reach it only through a proxy that delays the \
         first byte of every response by the latency shown ({}), and that counts their \
         requests and bytes (request lines, headers and bodies both ways; per GiB fio moved, \
         during the run only — write-back after it is not counted). \"÷ limit\" is the \
         median IOPS over the better of qemu-nbd and nbdkit-file on a raw file on the same \
         disk; \"÷ best S3 peer\" over the better of s3backer and nbdkit-s3 at the same \
         latency. `bucketdisk-s3-cold` starts with an empty cache for every workload and runs \
         only workloads that read. bucketdisk's warm subjects start each workload once the \
         previous one's writes are uploaded (its metrics show no dirty bytes and no upload \
         lag; the notes say how long that took), so a read row never shares the machine with \
         an upload. Peak RSS is per server session (s3backer: s3backer + nbdkit).\n",
        s.region_bytes >> 20,
        s.runtime_secs,
        s.ramp_secs,
        s.repeats,
        s.latencies_ms
            .iter()
            .map(|l| format!("{l} ms"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for sl in &r.subjects {
        let _ = writeln!(o, "- **{}**: `{}`", sl.subject.name(), sl.command_line);
    }
    let _ = writeln!(o);

    let _ = writeln!(o, "## Summary (median IOPS; MiB/s for 1M workloads)\n");
    let _ = write!(o, "| subject |");
    for w in &r.workloads {
        let _ = write!(o, " {} |", w.name);
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "|---|{}", "---:|".repeat(r.workloads.len()));
    let mut seen: Vec<(Kind, Option<u64>)> = Vec::new();
    for row in &r.rows {
        if !seen.contains(&(row.subject, row.latency_ms)) {
            seen.push((row.subject, row.latency_ms));
        }
    }
    for &(k, lat) in &seen {
        let _ = write!(o, "| {} |", label(k, lat));
        for w in &r.workloads {
            match r
                .rows
                .iter()
                .find(|x| x.workload == w.name && x.subject == k && x.latency_ms == lat)
            {
                Some(x) => {
                    let _ = write!(o, " {:.0} |", headline(w, x).median);
                }
                None => {
                    let _ = write!(o, " – |");
                }
            }
        }
        let _ = writeln!(o);
    }
    let _ = writeln!(o);

    let _ = writeln!(o, "## Per workload\n");
    for w in &r.workloads {
        let _ = writeln!(
            o,
            "### {} (`--rw={} --bs={} --iodepth={}`{})\n",
            w.name,
            w.rw,
            w.bs,
            w.iodepth,
            if w.is_mixed() {
                " `--rwmixread=70`"
            } else {
                ""
            }
        );
        if let Some(p) = r
            .plots
            .iter()
            .find(|p| p.contains(&format!("bars-{}", w.name)))
        {
            let _ = writeln!(o, "![{}]({p})\n", w.name);
        }
        let cdfs: Vec<&String> = r
            .plots
            .iter()
            .filter(|p| p.contains(&format!("cdf-{}-", w.name)))
            .collect();
        if !cdfs.is_empty() {
            let links: Vec<String> = cdfs.iter().map(|p| format!("[{p}]({p})")).collect();
            let _ = writeln!(o, "Latency CDFs: {}\n", links.join(" · "));
        }
        let _ = writeln!(
            o,
            "| subject | IOPS | MiB/s | clat p50 µs | clat p99 µs | ÷ limit | ÷ best S3 peer | \
             store req/GiB | store MiB/GiB | server CPU (cores) | peak RSS MiB |"
        );
        let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for x in r.rows.iter().filter(|x| x.workload == w.name) {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                label(x.subject, x.latency_ms),
                cell(&x.iops, 0),
                cell(&x.mib_per_sec, 1),
                opt_cell(x.clat_p50_us.as_ref(), 0),
                cell(&x.clat_p99_us, 0),
                ratio(x.vs_local_limit),
                ratio(x.vs_best_s3_peer),
                opt_cell(x.store_requests_per_gib.as_ref(), 0),
                opt_cell(x.store_mib_per_gib.as_ref(), 0),
                opt_cell(x.server_cores.as_ref(), 2),
                cell(&x.peak_rss_mib, 0),
            );
        }
        let _ = writeln!(o);
    }
    session_section(&mut o, r, &seen);
    boot_section(&mut o, r, &seen);
    block_map_section(&mut o, r);
    hydration_section(&mut o, r);
    mkfs_section(&mut o, r, &seen);
    crate::report::notes_section(&mut o, &r.notes);
    let _ = writeln!(
        o,
        "Raw numbers for every run: [`{stem}.json`]({stem}.json) beside this file."
    );
    o
}

fn boot_section(o: &mut String, r: &Report, order: &[(Kind, Option<u64>)]) {
    if r.boots.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "## Cold boot: process start → first 4 KiB read answered\n\n\
         Our own NBD client (handshake, one read of offset 0) connects as soon as the port \
         accepts. s3backer's clock includes its mount; bucketdisk-s3-cold starts with an empty \
         `--cache-dir`, bucketdisk-s3-warm and bucketdisk-local with the cache they kept. \
         \"map hydrated\" is bucketdisk's log (\"block map hydrated\", background, after the \
         volume opened).\n"
    );
    if let Some(p) = r.plots.iter().find(|p| p.contains("bars-cold-boot")) {
        let _ = writeln!(o, "![cold boot]({p})\n");
    }
    let _ = writeln!(
        o,
        "| subject | first read ms | listening ms | map hydrated s | store requests | peak RSS MiB |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|");
    for &(k, lat) in order {
        let rs: Vec<&BootRun> = r
            .boots
            .iter()
            .filter(|b| b.subject == k && b.latency_ms == lat)
            .collect();
        let of = |f: &dyn Fn(&BootRun) -> Option<f64>| {
            Summary::of(&rs.iter().filter_map(|b| f(b)).collect::<Vec<_>>())
        };
        let Some(first) = of(&|b| Some(b.first_read_ms)) else {
            continue;
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} |",
            label(k, lat),
            cell(&first, 0),
            opt_cell(of(&|b| Some(b.listening_ms)).as_ref(), 0),
            opt_cell(of(&|b| b.map_hydrated_secs).as_ref(), 2),
            opt_cell(of(&|b| b.store.map(|t| t.requests as f64)).as_ref(), 0),
            opt_cell(of(&|b| Some(b.peak_rss_bytes as f64 / MIB)).as_ref(), 0),
        );
    }
    let _ = writeln!(o);
}

fn hydration_section(o: &mut String, r: &Report) {
    if r.hydrations.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "## Disk hydration (bucketdisk on S3, `--hydrate`, empty cache)\n\n\
         Once per latency. From the moment the server answers, fio runs 4 KiB QD1 random reads \
         for {} s while the background pull fetches every stored block; the rate is the \
         server's own (\"disk hydration complete\": blocks × 64 KiB ÷ seconds). Compare the \
         foreground p99 with bucketdisk-s3-cold's randread-4k-qd1 above (no hydration).\n",
        r.settings.runtime_secs + r.settings.ramp_secs
    );
    let _ = writeln!(
        o,
        "| latency | blocks | seconds | MiB/s | foreground IOPS | foreground clat p99 µs | store requests |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|");
    for h in &r.hydrations {
        let num = |v: Option<f64>, d: usize| v.map_or_else(|| "–".into(), |v| format!("{v:.d$}"));
        let _ = writeln!(
            o,
            "| {} ms | {} | {} | {} | {:.0} | {:.0} | {} |",
            h.latency_ms,
            num(h.blocks.map(|b| b as f64), 0),
            num(h.seconds, 1),
            num(h.mib_per_sec, 1),
            h.foreground.iops,
            h.foreground.clat_p99_ns / 1000.0,
            h.store.requests
        );
    }
    let _ = writeln!(o);
}

fn mkfs_section(o: &mut String, r: &Report, order: &[(Kind, Option<u64>)]) {
    if r.mkfs.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "## mkfs.ext4 of the 100 GiB disk\n\n\
         `mkfs.ext4 -F -q -E nodiscard,lazy_itable_init=1,lazy_journal_init=1 /dev/loopN` \
         (metadata only: without the lazy options mke2fs zeroes inode tables and journal, which \
         qemu turns into allocated zeroes, filling the local limit's raw file), the loop device on qemu-storage-daemon's FUSE export of \
         the subject's NBD server (`discard=unmap`), run last (it overwrites the disks). \
         \"timed out\" is over {} s.\n",
        crate::suites::compare_clocks::MKFS_TIMEOUT.as_secs()
    );
    let _ = writeln!(o, "| subject | seconds | store requests | store MiB |");
    let _ = writeln!(o, "|---|---:|---:|---:|");
    for &(k, lat) in order {
        let rs: Vec<&MkfsRun> = r
            .mkfs
            .iter()
            .filter(|m| m.subject == k && m.latency_ms == lat)
            .collect();
        if rs.is_empty() {
            continue;
        }
        let secs = Summary::of(&rs.iter().filter_map(|m| m.seconds).collect::<Vec<_>>());
        let timed_out = rs.iter().any(|m| m.seconds.is_none());
        let of = |f: &dyn Fn(&Traffic) -> f64| {
            Summary::of(
                &rs.iter()
                    .filter_map(|m| m.store.as_ref().map(f))
                    .collect::<Vec<_>>(),
            )
        };
        let secs = match (secs, timed_out) {
            (Some(s), false) => cell(&s, 2),
            (Some(s), true) => format!("{} (and timed out)", cell(&s, 2)),
            (None, _) => "timed out".into(),
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} |",
            label(k, lat),
            secs,
            opt_cell(of(&|t| t.requests as f64).as_ref(), 0),
            opt_cell(
                of(&|t| (t.request_bytes + t.response_bytes) as f64 / MIB).as_ref(),
                1
            ),
        );
    }
    let _ = writeln!(o);
}

fn block_map_section(o: &mut String, r: &Report) {
    if r.litestream.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "## Block map: bucketdisk's VFS vs `litestream restore`\n\n\
         bucketdisk-s3-cold's boot opens the map straight from the store through its SQLite \
         VFS and answers a 4 KiB read (table above; it also fetches the data block). The peer \
         restores the same replica with `litestream restore` (through the same proxy), opens \
         it with SQLite and looks up block 0. Both maps are small here (only the filled region \
         has rows); the `blockmap` suite measures a full 1.6 M-row map.\n"
    );
    let _ = writeln!(
        o,
        "| latency | bucketdisk cold boot → first read ms | bucketdisk map hydrated s | litestream restore + open + lookup ms | its store requests | restored MiB |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|");
    for &lat in &r.settings.latencies_ms {
        let lt: Vec<&LitestreamRun> = r
            .litestream
            .iter()
            .filter(|l| l.latency_ms == lat)
            .collect();
        let boots: Vec<&BootRun> = r
            .boots
            .iter()
            .filter(|b| b.subject == Kind::BucketdiskS3Cold && b.latency_ms == Some(lat))
            .collect();
        let s = |v: Vec<f64>, d: usize| opt_cell(Summary::of(&v).as_ref(), d);
        let _ = writeln!(
            o,
            "| {lat} ms | {} | {} | {} | {} | {} |",
            s(boots.iter().map(|b| b.first_read_ms).collect(), 0),
            s(
                boots.iter().filter_map(|b| b.map_hydrated_secs).collect(),
                2
            ),
            s(lt.iter().map(|l| l.restore_open_lookup_ms).collect(), 0),
            s(lt.iter().map(|l| l.store.requests as f64).collect(), 0),
            s(
                lt.iter()
                    .map(|l| l.restored_db_bytes as f64 / MIB)
                    .collect(),
                2
            ),
        );
    }
    let _ = writeln!(o);
}

fn session_section(o: &mut String, r: &Report, order: &[(Kind, Option<u64>)]) {
    if r.sessions.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "## Store traffic per GiB of fio I/O, whole sessions\n\n\
         From after the warm-up pass to the end of the clean stop, so uploads and write-back \
         that happen after a run are in (unlike the per-workload columns above). One session \
         runs every workload once (bucketdisk-s3-cold: one session per reading workload).\n"
    );
    let _ = writeln!(
        o,
        "| subject | fio GiB | requests/GiB | GETs/GiB | PUTs/GiB | other/GiB | store MiB/GiB |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|");
    for &(k, lat) in order {
        let ss: Vec<&SessionTraffic> = r
            .sessions
            .iter()
            .filter(|s| s.subject == k && s.latency_ms == lat)
            .collect();
        let gib: f64 = ss.iter().map(|s| s.fio_bytes as f64).sum::<f64>() / GIB;
        if ss.is_empty() || gib <= 0.0 {
            continue;
        }
        let total =
            |f: &dyn Fn(&Traffic) -> u64| ss.iter().map(|s| f(&s.store) as f64).sum::<f64>();
        let requests = total(&|t| t.requests);
        let gets = total(&|t| t.gets);
        let puts = total(&|t| t.puts);
        let _ = writeln!(
            o,
            "| {} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            label(k, lat),
            gib,
            requests / gib,
            gets / gib,
            puts / gib,
            (requests - gets - puts) / gib,
            total(&|t| t.request_bytes + t.response_bytes) / MIB / gib,
        );
    }
    let _ = writeln!(o);
}
