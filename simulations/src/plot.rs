//! SVG plots of a run (plotters): divergent nodes over time, bytes per
//! second over time, and the CDF of write visibility latency.

use plotters::prelude::*;
use std::path::Path;

use crate::report::Report;

/// Writes `divergence.svg`, `bytes.svg` and `visibility.svg` into `dir`.
pub fn write_all(report: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let t_max = report.series.last().map_or(1.0, |s| s.0).max(1.0);
    let divergent: Vec<(f64, f64)> = report.series.iter().map(|s| (s.0, s.1 as f64)).collect();
    line(
        &dir.join("divergence.svg"),
        &format!("{} (seed {}): nodes off the common root", report.scenario, report.seed),
        "seconds",
        "divergent nodes",
        &divergent,
        t_max,
        report.nodes as f64,
    )?;
    let bytes: Vec<(f64, f64)> = report.series.iter().map(|s| (s.0, s.2 as f64 * 10.0)).collect();
    let b_max = bytes.iter().map(|b| b.1).fold(1.0, f64::max);
    line(
        &dir.join("bytes.svg"),
        &format!("{} (seed {}): bytes sent per second", report.scenario, report.seed),
        "seconds",
        "bytes/s",
        &bytes,
        t_max,
        b_max,
    )?;
    let v = &report.visibility_samples;
    let cdf: Vec<(f64, f64)> = v
        .iter()
        .enumerate()
        .map(|(i, ms)| (*ms, (i + 1) as f64 / v.len() as f64))
        .collect();
    line(
        &dir.join("visibility.svg"),
        &format!(
            "{} (seed {}): write visibility latency CDF",
            report.scenario, report.seed
        ),
        "ms",
        "fraction of (write, node)",
        &cdf,
        v.last().copied().unwrap_or(1.0).max(1.0),
        1.0,
    )?;
    Ok(())
}

fn line(
    path: &Path,
    title: &str,
    x: &str,
    y: &str,
    points: &[(f64, f64)],
    x_max: f64,
    y_max: f64,
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (800, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..(y_max * 1.05).max(1e-9))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc(x)
        .y_desc(y)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .draw_series(LineSeries::new(points.iter().copied(), &BLUE))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(())
}
