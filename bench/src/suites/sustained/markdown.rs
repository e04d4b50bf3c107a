//! The suite's markdown report: floors next to their measurements, then each part's tables.

use super::Report;
use super::fill::{FillResult, Sample};
use super::overwrite::{self, Gc, GcCostResult, Session, SpaceResult};
use crate::stats::Summary;
use bucketdisk::units::format_size;
use std::fmt::Write as _;

const MIB: f64 = 1_048_576.0;
/// Rows of a sample table; longer series are thinned evenly (the JSON has them all).
const TABLE_ROWS: usize = 24;

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".into(), |x| format!("{x:.digits$}"))
}

fn mib(v: Option<f64>) -> String {
    opt(v.map(|b| b / MIB), 1)
}

fn met(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "not measured",
    }
}

fn range(s: &Option<Summary>, digits: usize) -> String {
    match s {
        Some(s) if s.n > 1 => format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = digits),
        Some(s) => format!("{:.d$}", s.median, d = digits),
        None => "–".into(),
    }
}

/// Every `n`th item so that at most `rows` remain, always with the last one.
fn thin<T>(items: &[T], rows: usize) -> Vec<&T> {
    let step = items.len().div_ceil(rows.max(1)).max(1);
    let mut out: Vec<&T> = items.iter().step_by(step).collect();
    if let Some(last) = items.last()
        && !std::ptr::eq(*out.last().unwrap_or(&last), last)
    {
        out.push(last);
    }
    out
}

pub fn render(r: &Report, stem: &str) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# sustained: bucketdisk under sustained load — {}\n",
        r.started
    );
    let _ = writeln!(o, "```\n{}\n```\n", r.command);
    machine(&mut o, r);
    floors(&mut o, r);
    for f in [&r.sparse_fill, &r.stall].into_iter().flatten() {
        fill(&mut o, r, f, stem);
    }
    if let Some(s) = &r.space {
        space(&mut o, s, stem);
    }
    if let Some(g) = &r.gc_cost {
        gc_cost(&mut o, g);
    }
    logs(&mut o, r);
    crate::report::notes_section(&mut o, &r.notes);
    let _ = writeln!(
        o,
        "Every sample of every part: `{stem}.json` beside this file."
    );
    o
}

fn machine(o: &mut String, r: &Report) {
    crate::report::machine_table(
        o,
        &r.machine,
        (&r.load_before, &r.load_after),
        &format!("{} → {} ({:.0} s)", r.started, r.finished, r.elapsed_secs),
        &[
            ("fio", r.tools.fio.clone()),
            ("moto", r.tools.moto.clone()),
            (
                "bucketdisk",
                format!("{} (commit {})", r.tools.bucketdisk, r.tools.commit),
            ),
        ],
    );
}

fn floors(o: &mut String, r: &Report) {
    let _ = writeln!(o, "## Floors\n");
    if r.floors.is_empty() {
        let _ = writeln!(o, "No part produced a measurement (see the notes).\n");
        return;
    }
    let _ = writeln!(o, "| part | measurement | value | floor | met |");
    let _ = writeln!(o, "|---|---|---|---|:---:|");
    for f in &r.floors {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} |",
            f.part.name(),
            f.measurement,
            f.value,
            f.floor,
            met(f.met)
        );
    }
    let _ = writeln!(o);
}

fn fill(o: &mut String, r: &Report, f: &FillResult, stem: &str) {
    let _ = writeln!(o, "## {}\n", f.part);
    let _ = writeln!(
        o,
        "A {} volume on S3 (moto; it keeps objects over 5 MiB in temporary files) behind the \
         latency proxy at +{} ms first byte; \
         fio writes 4 KiB at the start of every 64 KiB block ({} writes, crc32c verify headers), \
         queue depth 32, one NBD connection; the server's metrics are sampled every 5 s. Then \
         SIGTERM (a clean stop uploads the backlog), `bucketdisk info`, and a server on the same \
         store with an empty cache: first read, then fio `--verify_only` over three regions.\n",
        format_size(f.fill_bytes),
        f.latency_ms,
        f.blocks
    );
    let _ = writeln!(o, "- server: `{}`", f.server_command);
    let _ = writeln!(o, "- fio: `{}`\n", f.fio_command);
    let w = f.fio.write.clone().unwrap_or_default();
    let last = |g: fn(&Sample) -> Option<f64>| f.samples.iter().rev().find_map(g);
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(o, "| fio | {} |", f.fio.verdict());
    if !f.fio.ok && !f.fio.stderr_tail.is_empty() {
        let tail = f.fio.stderr_tail.replace('\n', " ⏎ ");
        let _ = writeln!(o, "| fio stderr | `{tail}` |");
    }
    let _ = writeln!(o, "| wall time | {:.1} s |", f.wall_secs);
    let _ = writeln!(
        o,
        "| write IOPS | {:.0} ({:.1} MiB/s) |",
        f.write_iops,
        w.bw_bytes / MIB
    );
    let _ = writeln!(
        o,
        "| completion latency mean / p99 / max | {:.0} µs / {:.0} µs / {:.1} ms |",
        w.clat_mean_us,
        w.clat_p99_us,
        w.clat_max_us / 1000.0
    );
    let _ = writeln!(
        o,
        "| dirty bytes, peak | {} MiB |",
        mib(f.max_of(|s| s.dirty_bytes))
    );
    let _ = writeln!(
        o,
        "| upload lag, max | {} s |",
        opt(f.max_of(|s| s.upload_lag_secs), 1)
    );
    let _ = writeln!(
        o,
        "| writes that waited for the journal | {} ({} s waited in total) |",
        opt(last(|s| s.write_waits_total), 0),
        opt(last(|s| s.write_wait_secs_total), 1)
    );
    let rates: Vec<f64> = f.upload_rate().iter().map(|p| p.1 / MIB).collect();
    let _ = writeln!(
        o,
        "| upload rate per 5 s (MiB/s of written data) | median {} |",
        range(&Summary::of(&rates), 2)
    );
    let _ = writeln!(
        o,
        "| uploads · store PUTs · bytes PUT (at the last sample) | {} · {} · {} MiB |",
        opt(last(|s| s.uploads_total), 0),
        opt(last(|s| s.store_put_requests_total), 0),
        mib(last(|s| s.store_written_bytes_total))
    );
    let _ = writeln!(
        o,
        "| clean stop | {:.1} s ({}) |",
        f.stop.secs, f.stop.status
    );
    let t = &f.store_traffic;
    let _ = writeln!(
        o,
        "| through the proxy, fio start → stop | {} requests ({} PUT, {} GET), {:.1} MiB sent |",
        t.requests,
        t.puts,
        t.gets,
        t.request_bytes as f64 / MIB
    );
    let _ = writeln!(
        o,
        "| moto peak RSS | {:.0} MiB |\n",
        f.moto_peak_rss_bytes as f64 / MIB
    );
    if let Some(s) = &f.stall {
        let _ = writeln!(o, "### The stall\n");
        let _ = writeln!(
            o,
            "moto SIGSTOPped once fio had written {:.0} % of its bytes (per the server's write \
             counter), SIGCONT after {} s. Journal limit: {}.\n",
            r.settings.stall_at * 100.0,
            s.requested_secs,
            r.settings.stall_journal_limit.map_or_else(
                || "the server's default (4 GiB)".to_string(),
                |b| format!("{} MiB (`--journal-limit`)", b >> 20)
            )
        );
        let _ = writeln!(o, "| | |\n|---|---|");
        let _ = writeln!(
            o,
            "| window (s after fio started) | {:.1} → {:.1}{} |",
            s.start_secs,
            s.end_secs,
            if s.fio_finished_during {
                " (fio finished inside it)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            o,
            "| writes that waited · seconds waited: during it · to 30 s after (a wait counts when \
             it ends) | {} · {} s ; {} · {} s |",
            opt(s.write_waits, 0),
            opt(s.write_wait_secs, 1),
            opt(s.write_waits_through, 0),
            opt(s.write_wait_secs_through, 1)
        );
        let _ = writeln!(
            o,
            "| during it: client MiB written · MiB uploaded | {} · {} |",
            mib(s.client_write_bytes),
            mib(s.uploaded_bytes)
        );
        let _ = writeln!(
            o,
            "| from its start to 30 s after: max upload lag · max dirty | {} s · {} MiB |",
            opt(s.max_upload_lag_secs, 1),
            mib(s.max_dirty_bytes)
        );
        let _ = writeln!(
            o,
            "| fio max completion latency | {:.1} ms |\n",
            w.clat_max_us / 1000.0
        );
    }
    fill_samples(o, f);
    cold(o, f);
    let png = format!("{stem}-{}.png", f.part);
    let _ = writeln!(o, "![{}]({png})\n", f.part);
}

fn fill_samples(o: &mut String, f: &FillResult) {
    let _ = writeln!(
        o,
        "Samples ({} in all{}):\n",
        f.samples.len(),
        if f.samples.len() > TABLE_ROWS {
            ", thinned here"
        } else {
            ""
        }
    );
    let _ = writeln!(
        o,
        "| s | | dirty MiB | lag s | waits | wait s | uploaded MiB | uploads | PUTs | PUT MiB | client MiB |"
    );
    let _ = writeln!(o, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in thin(&f.samples, TABLE_ROWS) {
        let _ = writeln!(
            o,
            "| {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.t_secs,
            s.tag.unwrap_or(if s.error.is_some() {
                "scrape failed"
            } else {
                ""
            }),
            mib(s.dirty_bytes),
            opt(s.upload_lag_secs, 1),
            opt(s.write_waits_total, 0),
            opt(s.write_wait_secs_total, 1),
            mib(s.upload_journal_bytes_total),
            opt(s.uploads_total, 0),
            opt(s.store_put_requests_total, 0),
            mib(s.store_written_bytes_total),
            mib(s.client_write_bytes_total)
        );
    }
    let _ = writeln!(o);
}

fn cold(o: &mut String, f: &FillResult) {
    let c = &f.cold;
    let _ = writeln!(o, "### Cold boot (empty cache, same store)\n");
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(
        o,
        "| `bucketdisk info` allocated blocks | {} of {} expected{} |",
        c.allocated_blocks
            .map_or_else(|| "?".to_string(), |b| b.to_string()),
        c.expected_blocks,
        c.info_error
            .as_ref()
            .map_or_else(String::new, |e| format!(" (info failed: {e})"))
    );
    let _ = writeln!(
        o,
        "| process start → listening · → first 4 KiB read | {} ms · {} ms |",
        opt(c.listening_ms, 0),
        opt(c.first_read_ms, 0)
    );
    let _ = writeln!(
        o,
        "| block 0 starts with fio's verify header | {} |",
        c.first_block_has_fio_header
            .map_or("–", |h| if h { "yes" } else { "**no**" })
    );
    let _ = writeln!(
        o,
        "| clean stop | {:.1} s ({}) |",
        c.stop.secs, c.stop.status
    );
    if let Some(e) = &c.error {
        let _ = writeln!(o, "| stopped early | {e} |");
    }
    let _ = writeln!(o);
    if !c.regions.is_empty() {
        let _ = writeln!(
            o,
            "| region | offset | MiB | fio --verify_only | blocks read | MiB/s |"
        );
        let _ = writeln!(o, "|---|---:|---:|---|---:|---:|");
        for g in &c.regions {
            let read = g.fio.read.clone().unwrap_or_default();
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {:.1} |",
                g.name,
                g.offset,
                g.bytes >> 20,
                g.fio.verdict(),
                read.ios,
                read.bw_bytes / MIB
            );
        }
        let _ = writeln!(o);
        if let Some(g) = c.regions.first() {
            let _ = writeln!(o, "Verify command (start region): `{}`\n", g.command);
        }
    }
}

fn space(o: &mut String, s: &SpaceResult, stem: &str) {
    let x = &s.session;
    let sum = &s.summary;
    let _ = writeln!(o, "## space\n");
    let _ = writeln!(
        o,
        "The local-directory store; 1 GiB written sequentially (1 MiB, QD8), then 4 KiB random \
         overwrites of that 1 GiB (QD16, fio's incompressible data) for {:.1} min, sampled every \
         second: stored = the size of every file under the store directory, live = \
         `bucketdisk_stored_bytes` (compressed bytes of the blocks in use). Headline: the 30 s \
         samples after the first {} s. Bytes PUT ÷ client bytes are the overwrite phase's, read \
         once the upload backlog had drained.\n",
        x.minutes,
        overwrite::SETTLE_SECS
    );
    session_commands(o, x);
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(o, "| fio | {} |", x.overwrite.verdict());
    if let Some(why) = &x.stopped_early {
        let _ = writeln!(o, "| stopped early | {why} |");
    }
    let _ = writeln!(
        o,
        "| stored ÷ live, 30 s samples after 2 min | max {} ; {} of {} above 1.5× |",
        opt(sum.max_ratio_30s, 2),
        sum.over_floor_30s,
        sum.ratio_30s.len()
    );
    let share = if sum.samples_1s > 0 {
        format!(
            "{:.1} %",
            100.0 * sum.over_floor_1s as f64 / sum.samples_1s as f64
        )
    } else {
        "–".into()
    };
    let _ = writeln!(
        o,
        "| stored ÷ live, 1 s samples after 2 min | max {} ; {share} of {} above 1.5× ; mean {} |",
        opt(sum.max_ratio_1s, 2),
        sum.samples_1s,
        opt(sum.mean_ratio_1s, 2)
    );
    let _ = writeln!(
        o,
        "| committed chunk bytes ÷ live (no upload in flight), 1 s samples after 2 min | max {} |",
        opt(sum.max_committed_ratio_1s, 2)
    );
    let _ = writeln!(
        o,
        "| bytes PUT ÷ client bytes: overwrites · whole session | {} · {} |",
        opt(sum.put_per_client, 2),
        opt(sum.put_per_client_session, 2)
    );
    let _ = writeln!(
        o,
        "| fio IOPS per second: median (min–max) | {} |",
        range(&sum.iops, 0)
    );
    let _ = writeln!(
        o,
        "| fio IOPS (whole run) · clat p99 · max | {:.0} · {:.0} µs · {:.1} ms |",
        x.iops().unwrap_or(0.0),
        x.overwrite.write.as_ref().map_or(0.0, |w| w.clat_p99_us),
        x.overwrite
            .write
            .as_ref()
            .map_or(0.0, |w| w.clat_max_us / 1000.0)
    );
    if let Some(why) = &x.drain_error {
        let _ = writeln!(o, "| backlog after fio | **did not drain**: {why} |");
    }
    if let Some(d) = &x.drained {
        let _ = writeln!(
            o,
            "| after the backlog drained ({} s) | stored {} MiB, live {} MiB, {} chunks deleted, {} rewritten |",
            opt(x.drain_secs, 1),
            mib(Some(d.store_bytes as f64)),
            mib(d.live_bytes),
            opt(d.chunks_deleted_total, 0),
            opt(d.chunks_rewritten_total, 0)
        );
    }
    let _ = writeln!(
        o,
        "| clean stop | {:.1} s ({}) |\n",
        x.stop.secs, x.stop.status
    );
    let thirty: Vec<&overwrite::Sample> = x
        .samples
        .iter()
        .filter(|s| s.tick % overwrite::HEADLINE_EVERY == 0)
        .collect();
    let _ = writeln!(o, "30 s samples:\n");
    let _ = writeln!(
        o,
        "| s | stored MiB | live MiB | stored ÷ live | PUT ÷ client so far | chunks deleted | rewritten | lag s |"
    );
    let _ = writeln!(o, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    let puts = x.put_ratio_series();
    for s in thirty {
        let put = puts
            .iter()
            .find(|p| (p.0 - s.t_secs).abs() < 1e-9)
            .map(|p| p.1);
        let _ = writeln!(
            o,
            "| {:.0} | {} | {} | {} | {} | {} | {} | {} |",
            s.t_secs,
            mib(Some(s.store_bytes as f64)),
            mib(s.live_bytes),
            opt(s.ratio(), 2),
            opt(put, 2),
            opt(s.chunks_deleted_total, 0),
            opt(s.chunks_rewritten_total, 0),
            opt(s.upload_lag_secs, 1)
        );
    }
    let _ = writeln!(o, "\n![space]({stem}-space.png)\n");
}

fn session_commands(o: &mut String, x: &Session) {
    let _ = writeln!(o, "- server: `{}`", x.server_command);
    let _ = writeln!(o, "- fill: `{}`", x.fill_command);
    let _ = writeln!(o, "- overwrites: `{}`\n", x.overwrite_command);
}

fn gc_cost(o: &mut String, g: &GcCostResult) {
    let _ = writeln!(o, "## gc-cost\n");
    let _ = writeln!(
        o,
        "The space part's overwrites for {:.1} min per run on a fresh volume each, garbage \
         collection on and off (`serve --no-gc`), interleaved (on, off, on, off, …); runs per \
         mode: {}. IOPS are fio's for the whole run.\n",
        g.minutes, g.repeats
    );
    if let Some(x) = g.runs.first() {
        session_commands(o, x);
    }
    let _ = writeln!(o, "| mode | IOPS median (min–max) |");
    let _ = writeln!(o, "|---|---:|");
    let _ = writeln!(o, "| {} | {} |", Gc::On.name(), range(&g.iops_on, 0));
    let _ = writeln!(o, "| {} | {} |", Gc::Off.name(), range(&g.iops_off, 0));
    let _ = writeln!(o, "| on ÷ off | {} |\n", opt(g.ratio, 2));
    let _ = writeln!(
        o,
        "| run | mode | fio | IOPS | clat p99 µs | stored MiB at the end | chunks deleted |"
    );
    let _ = writeln!(o, "|---:|---|---|---:|---:|---:|---:|");
    for x in &g.runs {
        let end = x.drained.as_ref().or(x.samples.last());
        let _ = writeln!(
            o,
            "| {} | {} | {} | {:.0} | {:.0} | {} | {} |",
            x.repeat,
            x.gc.map_or("?", Gc::name),
            x.overwrite.verdict(),
            x.iops().unwrap_or(0.0),
            x.overwrite.write.as_ref().map_or(0.0, |w| w.clat_p99_us),
            mib(end.map(|s| s.store_bytes as f64)),
            opt(end.and_then(|s| s.chunks_deleted_total), 0)
        );
    }
    let _ = writeln!(o);
}

fn logs(o: &mut String, r: &Report) {
    let _ = writeln!(o, "## Server logs\n");
    let _ = writeln!(
        o,
        "Kept in `{}`; WARN and ERROR lines counted per server.\n",
        r.logs_dir
    );
    let _ = writeln!(o, "| log | warnings | errors |");
    let _ = writeln!(o, "|---|---:|---:|");
    let mut all = Vec::new();
    for f in [&r.sparse_fill, &r.stall].into_iter().flatten() {
        all.push(&f.log);
        all.push(&f.cold.log);
    }
    if let Some(s) = &r.space {
        all.push(&s.session.log);
    }
    if let Some(g) = &r.gc_cost {
        all.extend(g.runs.iter().map(|x| &x.log));
    }
    for l in all.into_iter().filter(|l| !l.log.is_empty()) {
        let name = std::path::Path::new(&l.log)
            .file_name()
            .map_or_else(|| l.log.clone(), |n| n.to_string_lossy().into_owned());
        let _ = writeln!(o, "| {name} | {} | {} |", l.warnings, l.errors);
    }
    let _ = writeln!(o);
}

#[cfg(test)]
mod tests {
    use super::thin;

    #[test]
    fn thinning_keeps_the_last() {
        let v: Vec<u32> = (0..100).collect();
        let t = thin(&v, 24);
        assert!(t.len() <= 26);
        assert_eq!(*t[0], 0);
        assert_eq!(**t.last().expect("non-empty"), 99);
        let short = [1, 2, 3];
        assert_eq!(thin(&short, 24).len(), 3);
    }
}
