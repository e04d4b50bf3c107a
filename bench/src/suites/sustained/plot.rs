//! Time-series PNGs for the suite: stacked panels sharing one time axis, with limit lines (the
//! floors) and a shaded window (the stall). Fonts come from [`crate::plots`].

use super::fill::FillResult;
use super::overwrite::{PUT_FLOOR, RATIO_FLOOR, SpaceResult};
use crate::plots::{FONT, chart_err, register_font};
use anyhow::{Context, Result};
use bucketdisk::units::format_size;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

const MIB: f64 = 1_048_576.0;
const GIB: f64 = 1_073_741_824.0;

/// One line of a panel.
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart of a figure.
pub struct Panel {
    pub title: String,
    pub y_desc: String,
    pub lines: Vec<Line>,
    /// Horizontal limit lines (label, value), drawn dashed.
    pub limits: Vec<(String, f64)>,
    /// A shaded time window (start, end), e.g. the stall.
    pub shade: Option<(f64, f64)>,
}

/// fio logs no `--log_avg_msec` window in which nothing completed (a stall): without zeros
/// in such gaps the line would be drawn straight across them, as if I/O had gone on.
fn zero_gaps(points: &[(f64, f64)], period: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len());
    for (i, &p) in points.iter().enumerate() {
        if let Some(&prev) = i.checked_sub(1).and_then(|j| points.get(j))
            && p.0 - prev.0 > 1.5 * period
        {
            out.push((prev.0 + period, 0.0));
            out.push((p.0 - period, 0.0));
        }
        out.push(p);
    }
    out
}

fn line(label: &str, points: Vec<(f64, f64)>) -> Line {
    Line {
        label: label.to_string(),
        points,
    }
}

/// The space part: stored ÷ live and PUT ÷ client bytes, IOPS, and the sizes behind the ratio.
pub fn space(result: &SpaceResult, path: &Path) -> Result<()> {
    let s = &result.session;
    let stored_over_live: Vec<(f64, f64)> = s
        .samples
        .iter()
        .filter_map(|x| Some((x.t_secs, x.ratio()?)))
        .collect();
    let gib = |f: fn(&super::overwrite::Sample) -> Option<f64>| -> Vec<(f64, f64)> {
        s.samples
            .iter()
            .filter_map(|x| Some((x.t_secs, f(x)? / GIB)))
            .collect()
    };
    let panels = [
        Panel {
            title: "store space and write amplification".into(),
            y_desc: "ratio".into(),
            lines: vec![
                line("stored ÷ live", stored_over_live),
                line(
                    "bytes PUT ÷ client bytes (cumulative)",
                    s.put_ratio_series(),
                ),
            ],
            limits: vec![
                (format!("stored floor {RATIO_FLOOR}×"), RATIO_FLOOR),
                (format!("PUT floor {PUT_FLOOR}×"), PUT_FLOOR),
            ],
            shade: None,
        },
        Panel {
            title: "sizes".into(),
            y_desc: "GiB".into(),
            lines: vec![
                line(
                    "stored (files in the store)",
                    gib(|x| Some(x.store_bytes as f64)),
                ),
                line("live (bucketdisk_stored_bytes)", gib(|x| x.live_bytes)),
            ],
            limits: Vec::new(),
            shade: None,
        },
        Panel {
            title: "fio 4 KiB random-write IOPS (1 s averages)".into(),
            y_desc: "IOPS".into(),
            lines: vec![line("IOPS", zero_gaps(&s.iops_log, 1.0))],
            limits: Vec::new(),
            shade: None,
        },
    ];
    figure(
        path,
        "space — 4 KiB random overwrites of 1 GiB, local store",
        &panels,
    )
}

/// A fill part: fio's IOPS, the upload rate and the backlog, the stall shaded.
pub fn fill(result: &FillResult, path: &Path) -> Result<()> {
    let shade = result.stall.as_ref().map(|w| (w.start_secs, w.end_secs));
    let upload: Vec<(f64, f64)> = result
        .upload_rate()
        .into_iter()
        .map(|(t, r)| (t, r / MIB))
        .collect();
    let dirty: Vec<(f64, f64)> = result
        .samples
        .iter()
        .filter_map(|s| Some((s.t_secs, s.dirty_bytes? / MIB)))
        .collect();
    let lag: Vec<(f64, f64)> = result
        .samples
        .iter()
        .filter_map(|s| Some((s.t_secs, s.upload_lag_secs?)))
        .collect();
    let panels = [
        Panel {
            title: "fio sparse 4 KiB writes (1 s averages)".into(),
            y_desc: "IOPS".into(),
            lines: vec![line("write IOPS", zero_gaps(&result.iops_log, 1.0))],
            limits: Vec::new(),
            shade,
        },
        Panel {
            title: "uploads (journaled bytes stored per second)".into(),
            y_desc: "MiB/s".into(),
            lines: vec![line("upload rate", upload)],
            limits: Vec::new(),
            shade,
        },
        Panel {
            title: "backlog".into(),
            y_desc: "MiB · s".into(),
            lines: vec![line("dirty MiB", dirty), line("upload lag (s)", lag)],
            limits: Vec::new(),
            shade,
        },
    ];
    let title = format!(
        "{} — {} sparse fill, store +{} ms",
        result.part,
        format_size(result.fill_bytes),
        result.latency_ms
    );
    figure(path, &title, &panels)
}

/// Panels stacked vertically, one shared time range.
fn figure(path: &Path, title: &str, panels: &[Panel]) -> Result<()> {
    register_font()?;
    let height = 60 + 300 * panels.len() as u32;
    let root = BitMapBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    let root = root.titled(title, (FONT, 22)).map_err(chart_err)?;
    let x_max = panels
        .iter()
        .flat_map(|p| p.lines.iter().flat_map(|l| l.points.iter().map(|q| q.0)))
        .fold(1.0_f64, f64::max);
    for (area, panel) in root.split_evenly((panels.len(), 1)).iter().zip(panels) {
        draw_panel(area, panel, x_max).with_context(|| format!("panel {}", panel.title))?;
    }
    root.present().map_err(chart_err)?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    panel: &Panel,
    x_max: f64,
) -> Result<()> {
    let empty = panel.lines.iter().all(|l| l.points.is_empty());
    let y_max = panel
        .lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .chain(panel.limits.iter().map(|l| l.1))
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max)
        .max(1e-9)
        * 1.12;
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT, 16))
        .margin(10)
        .x_label_area_size(34)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(chart_err)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(&panel.y_desc)
        .label_style((FONT, 13))
        .draw()
        .map_err(chart_err)?;
    if empty {
        // A run shorter than one sample interval leaves nothing to draw: say so.
        chart
            .draw_series(std::iter::once(Text::new(
                "no data (the run was shorter than one sample)",
                (x_max * 0.3, y_max * 0.5),
                (FONT, 16),
            )))
            .map_err(chart_err)?;
    }
    if let Some((a, b)) = panel.shade {
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(a, 0.0), (b, y_max)],
                RGBColor(255, 200, 120).mix(0.35).filled(),
            )))
            .map_err(chart_err)?
            .label("store stalled")
            .legend(|(x, y)| {
                Rectangle::new(
                    [(x, y - 5), (x + 18, y + 5)],
                    RGBColor(255, 200, 120).filled(),
                )
            });
    }
    for (i, l) in panel.lines.iter().enumerate() {
        let color = Palette99::pick(i);
        chart
            .draw_series(LineSeries::new(
                l.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(chart_err)?
            .label(l.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    // Each limit in the colour of the line it bounds (the first limit, the first line).
    for (i, (label, value)) in panel.limits.iter().enumerate() {
        let color = Palette99::pick(i);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, *value), (x_max, *value)],
                8,
                5,
                color.stroke_width(1),
            ))
            .map_err(chart_err)?
            .label(label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(1))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 12))
        .draw()
        .map_err(chart_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_become_zeros() {
        let pts = [(1.0, 5.0), (2.0, 5.0), (7.0, 4.0)];
        assert_eq!(
            zero_gaps(&pts, 1.0),
            vec![(1.0, 5.0), (2.0, 5.0), (3.0, 0.0), (6.0, 0.0), (7.0, 4.0)]
        );
    }

    #[test]
    fn draws_a_figure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f.png");
        let panels = [Panel {
            title: "t".into(),
            y_desc: "y".into(),
            lines: vec![line("a", vec![(0.0, 1.0), (10.0, 2.0)])],
            limits: vec![("floor".into(), 1.5)],
            shade: Some((2.0, 4.0)),
        }];
        figure(&path, "figure", &panels).expect("figure");
        let bytes = std::fs::read(&path).expect("png");
        assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 1000);
    }
}
