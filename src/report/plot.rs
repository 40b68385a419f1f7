//! Line plots (PNG) of training curves and sweeps, for reports people look at rather than read.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{LeashError, Result};

/// One named line of (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Draws `series` into a 800×480 PNG at `path`.
pub fn line_plot(path: &Path, title: &str, x_label: &str, series: &[Series]) -> Result<()> {
    let fail = |e: String| {
        LeashError::file(path, format!("cannot draw plot: {e}"), "the numbers are still in metrics.jsonl; install a TrueType font (e.g. fonts-dejavu) for plots")
    };
    let points = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        if x.is_finite() && y.is_finite() {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
    }
    if x0 > x1 {
        return Err(fail("no finite points".into()));
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1.max(x0 + 1e-9), (y0 - pad)..(y1 + pad))
        .map_err(|e| fail(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .draw()
        .map_err(|e| fail(e.to_string()))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| fail(e.to_string()))?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(e.to_string()))?;
    root.present().map_err(|e| fail(e.to_string()))
}

/// Series of `keys` against `step` from a metrics.jsonl file (rows lacking a key are skipped).
pub fn metric_series(metrics: &Path, keys: &[&str]) -> Result<Vec<Series>> {
    let text = crate::error::read_text(metrics)?;
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    Ok(keys
        .iter()
        .map(|k| Series {
            name: k.to_string(),
            points: rows
                .iter()
                .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(*k)?.as_f64()?)))
                .collect(),
        })
        .filter(|s| !s.points.is_empty())
        .collect())
}
