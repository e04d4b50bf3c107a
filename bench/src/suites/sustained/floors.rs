//! The report's verdicts: each floor next to its measurement, and notes on what went wrong
//! around the measurements (warnings in the server logs, a backlog that did not drain).

use super::{Floor, Part, Report, overwrite};
use bucketdisk::units::format_size;

/// Warnings and errors in the server logs, one note per session that had any.
pub fn log_notes(r: &Report) -> Vec<String> {
    let mut logs = Vec::new();
    for f in [&r.sparse_fill, &r.stall].into_iter().flatten() {
        logs.push((format!("{} server", f.part), &f.log));
        logs.push((format!("{} cold-boot server", f.part), &f.cold.log));
    }
    let sessions = r
        .space
        .iter()
        .map(|s| &s.session)
        .chain(r.gc_cost.iter().flat_map(|g| g.runs.iter()));
    for s in sessions {
        logs.push((format!("{} server", s.name), &s.log));
    }
    logs.into_iter()
        .filter(|(_, l)| !l.is_clean())
        .map(|(what, l)| {
            format!(
                "{what}: {} warnings, {} errors in its log; first: {}",
                l.warnings,
                l.errors,
                l.first.join(" | ")
            )
        })
        .collect()
}

/// Overwrite sessions whose upload backlog did not drain after fio.
pub fn drain_notes(r: &Report) -> Vec<String> {
    r.space
        .iter()
        .map(|s| &s.session)
        .chain(r.gc_cost.iter().flat_map(|g| g.runs.iter()))
        .filter_map(|s| {
            let why = s.drain_error.as_ref()?;
            Some(format!(
                "{} ({}): {why}; the clean stop then took {:.1} s ({})",
                s.name,
                s.gc.map_or("?", overwrite::Gc::name),
                s.stop.secs,
                s.stop.status
            ))
        })
        .collect()
}

pub fn floors(r: &Report) -> Vec<Floor> {
    let mut out = Vec::new();
    for (part, f) in [(Part::SparseFill, &r.sparse_fill), (Part::Stall, &r.stall)] {
        let Some(f) = f else { continue };
        let value = format!(
            "fio {}; {} of {} blocks in the map; {} of {} regions verified",
            if f.fio.ok {
                "no error".to_string()
            } else {
                f.fio.verdict()
            },
            f.cold
                .allocated_blocks
                .map_or_else(|| "?".to_string(), |b| b.to_string()),
            f.cold.expected_blocks,
            f.cold.regions_verified(),
            f.cold.regions.len()
        );
        out.push(Floor {
            part,
            measurement: format!(
                "{} sparse fill at +{} ms{}, then a cold boot",
                format_size(f.fill_bytes),
                f.latency_ms,
                if part == Part::Stall {
                    format!(", store stalled {} s", r.settings.stall_secs)
                } else {
                    String::new()
                }
            ),
            value,
            floor: "no EIO, every block present after a cold boot".into(),
            met: Some(f.floor_met()),
        });
    }
    if let Some(s) = &r.space {
        let sum = &s.summary;
        out.push(Floor {
            part: Part::Space,
            measurement: "stored ÷ live, every 30 s sample after 2 min".into(),
            value: match sum.max_ratio_30s {
                Some(m) => format!(
                    "max {m:.2}×; {} of {} samples above 1.5×",
                    sum.over_floor_30s,
                    sum.ratio_30s.len()
                ),
                None => "no samples after 2 min".into(),
            },
            floor: "stored ≤ 1.5× live at every 30 s sample after 2 min".into(),
            met: sum.ratio_floor_met(),
        });
        out.push(Floor {
            part: Part::Space,
            measurement: "bytes PUT ÷ client bytes written (overwrites, backlog drained)".into(),
            value: match (sum.put_per_client, s.session.put_per_client_so_far()) {
                (Some(q), _) => format!("{q:.2}×"),
                (None, Some(q)) => format!(
                    "not measured: the backlog did not drain (up to fio's end, not counting \
                     what was still dirty: {q:.2}×)"
                ),
                (None, None) => "not measured".into(),
            },
            floor: "bytes PUT ≤ 2× client bytes".into(),
            met: sum.put_floor_met(),
        });
    }
    if let Some(g) = &r.gc_cost {
        out.push(Floor {
            part: Part::GcCost,
            measurement: "median IOPS with GC ÷ without".into(),
            value: g
                .ratio
                .map_or_else(|| "not measured".into(), |q| format!("{q:.2}")),
            floor: "IOPS with GC within 20 % of without (≥ 0.80)".into(),
            met: g.floor_met(),
        });
    }
    out
}
