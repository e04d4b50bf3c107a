//! PNG plots beside a comparison report: one bar chart per workload (median, min–max whisker)
//! and completion-latency CDFs per workload and latency setting (from fio's percentiles).
//!
//! Text is drawn with plotters' `ab_glyph` backend from a TTF file read at run time (Debian's
//! fonts-dejavu-core), so no fontconfig/freetype build dependency is needed.

use crate::compare_report::{Report, Row, headline, headline_unit, label};
use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];
pub const FONT: &str = "sans-serif";

/// Loads the font once for the process (plotters keeps fonts for the program's lifetime).
pub fn register_font() -> Result<()> {
    static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let bytes = FONT_PATHS
                .iter()
                .find_map(|p| std::fs::read(p).ok())
                .ok_or_else(|| {
                    format!("no font at {FONT_PATHS:?} (apt-get install fonts-dejavu-core)")
                })?;
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font(FONT, FontStyle::Normal, bytes)
                .map_err(|_| "DejaVuSans.ttf is not a usable font".to_string())
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Draws every plot into `dir`; returns the file names, for the report to link.
pub fn draw_all(report: &Report, dir: &Path, stem: &str) -> Result<Vec<String>> {
    register_font()?;
    let mut files = Vec::new();
    for w in &report.workloads {
        let rows: Vec<&Row> = report
            .rows
            .iter()
            .filter(|r| r.workload == w.name)
            .collect();
        if rows.is_empty() {
            continue;
        }
        let name = format!("{stem}-bars-{}.png", w.name);
        let bars: Vec<(String, f64, f64, f64)> = rows
            .iter()
            .map(|r| {
                let s = headline(w, r);
                (label(r.subject, r.latency_ms), s.median, s.min, s.max)
            })
            .collect();
        let title = format!("{} — median {} (min–max)", w.name, headline_unit(w));
        bar_chart(&dir.join(&name), &title, &bars).with_context(|| format!("drawing {name}"))?;
        files.push(name);

        let mut settings: Vec<Option<u64>> = rows.iter().map(|r| r.latency_ms).collect();
        settings.dedup();
        for lat in settings.into_iter().flatten() {
            // Local subjects (no latency) appear in every latency's chart, as the reference.
            let curves: Vec<(String, Vec<(f64, f64)>)> = rows
                .iter()
                .filter(|r| r.latency_ms.is_none() || r.latency_ms == Some(lat))
                .filter_map(|r| {
                    let run = median_run(report, r)?;
                    let pts = run
                        .fio
                        .clat_percentiles_us
                        .iter()
                        .map(|&(p, us)| (us.max(1.0), p))
                        .collect::<Vec<_>>();
                    (!pts.is_empty()).then(|| (label(r.subject, r.latency_ms), pts))
                })
                .collect();
            if curves.is_empty() {
                continue;
            }
            let name = format!("{stem}-cdf-{}-{lat}ms.png", w.name);
            let title = format!("{} — completion latency CDF, store +{lat} ms", w.name);
            cdf_chart(&dir.join(&name), &title, &curves)
                .with_context(|| format!("drawing {name}"))?;
            files.push(name);
        }
    }
    if let Some(name) = boot_bars(report, dir, stem)? {
        files.push(name);
    }
    Ok(files)
}

/// Cold boot: median first-read time per subject.
fn boot_bars(report: &Report, dir: &Path, stem: &str) -> Result<Option<String>> {
    let mut keys: Vec<(crate::store_subjects::Kind, Option<u64>)> = Vec::new();
    for b in &report.boots {
        if !keys.contains(&(b.subject, b.latency_ms)) {
            keys.push((b.subject, b.latency_ms));
        }
    }
    let bars: Vec<(String, f64, f64, f64)> = keys
        .iter()
        .filter_map(|&(k, lat)| {
            let v: Vec<f64> = report
                .boots
                .iter()
                .filter(|b| b.subject == k && b.latency_ms == lat)
                .map(|b| b.first_read_ms)
                .collect();
            let s = crate::stats::Summary::of(&v)?;
            Some((label(k, lat), s.median, s.min, s.max))
        })
        .collect();
    if bars.is_empty() {
        return Ok(None);
    }
    let name = format!("{stem}-bars-cold-boot.png");
    bar_chart(
        &dir.join(&name),
        "cold boot — process start to first 4 KiB read, median ms (min–max)",
        &bars,
    )
    .with_context(|| format!("drawing {name}"))?;
    Ok(Some(name))
}

/// The run whose IOPS is the row's median (or the nearest), for its percentiles.
fn median_run<'a>(report: &'a Report, row: &Row) -> Option<&'a crate::compare_report::Run> {
    report
        .runs
        .iter()
        .filter(|r| {
            r.workload == row.workload && r.subject == row.subject && r.latency_ms == row.latency_ms
        })
        .min_by(|a, b| {
            let d = |x: f64| (x - row.iops.median).abs();
            d(a.fio.iops).total_cmp(&d(b.fio.iops))
        })
}

pub fn chart_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("{e:?}")
}

/// Horizontal bars, one per subject, with a min–max whisker.
fn bar_chart(path: &Path, title: &str, bars: &[(String, f64, f64, f64)]) -> Result<()> {
    let height = 120 + 34 * bars.len() as u32;
    let root = BitMapBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    let max = bars
        .iter()
        .map(|b| b.3.max(b.1))
        .fold(0.0_f64, f64::max)
        .max(1.0)
        * 1.1;
    let n = bars.len() as i32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(230)
        .build_cartesian_2d(0.0..max, (0..n - 1).into_segmented())
        .map_err(chart_err)?;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(bars.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .label_style((FONT, 14))
        .draw()
        .map_err(chart_err)?;
    for (i, (_, median, min, max)) in bars.iter().enumerate() {
        let i = i as i32;
        let color = Palette99::pick(i as usize).mix(0.8);
        let mut bar = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (*median, SegmentValue::Exact(i + 1)),
            ],
            color.filled(),
        );
        bar.set_margin(4, 4, 0, 0);
        chart.draw_series(std::iter::once(bar)).map_err(chart_err)?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![
                    (*min, SegmentValue::CenterOf(i)),
                    (*max, SegmentValue::CenterOf(i)),
                ],
                BLACK.stroke_width(2),
            )))
            .map_err(chart_err)?;
    }
    root.present().map_err(chart_err)?;
    Ok(())
}

/// Percentile (y) against completion latency (x, log scale), one line per subject.
fn cdf_chart(path: &Path, title: &str, curves: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    let root = BitMapBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    draw_cdf(&root, title, curves)?;
    root.present().map_err(chart_err)?;
    Ok(())
}

fn draw_cdf(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    curves: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let all = curves.iter().flat_map(|c| c.1.iter().map(|p| p.0));
    let lo = all.clone().fold(f64::INFINITY, f64::min).max(1.0);
    let hi = all.fold(1.0_f64, f64::max) * 1.5;
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo * 0.8..hi).log_scale(), 0.0..100.0)
        .map_err(chart_err)?;
    chart
        .configure_mesh()
        .x_desc("completion latency (µs, log)")
        .y_desc("percentile")
        .label_style((FONT, 14))
        .draw()
        .map_err(chart_err)?;
    for (i, (name, pts)) in curves.iter().enumerate() {
        let color = Palette99::pick(i);
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(chart_err)?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 13))
        .draw()
        .map_err(chart_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_png(path: &Path) -> bool {
        std::fs::read(path).is_ok_and(|b| b.len() > 1000 && b.starts_with(b"\x89PNG"))
    }

    /// Catches a missing font or a plotters feature mismatch before a 30-minute run does.
    #[test]
    fn draws_bars_and_cdfs_with_text() {
        register_font().expect("font (apt-get install fonts-dejavu-core)");
        let dir = tempfile::tempdir().expect("tempdir");
        let bars = dir.path().join("bars.png");
        bar_chart(
            &bars,
            "bars",
            &[
                ("a".into(), 10.0, 8.0, 12.0),
                ("b @20ms".into(), 3.0, 3.0, 3.0),
            ],
        )
        .expect("bar chart");
        assert!(is_png(&bars));
        let cdf = dir.path().join("cdf.png");
        let curve = vec![(100.0, 1.0), (200.0, 50.0), (5000.0, 99.0)];
        cdf_chart(&cdf, "cdf", &[("a".into(), curve)]).expect("cdf chart");
        assert!(is_png(&cdf));
    }
}
