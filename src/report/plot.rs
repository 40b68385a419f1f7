//! Line plots (PNG) of training curves and sweeps, for reports people look at rather than read.
//! Text is drawn with a DejaVu Sans subset embedded in the binary (assets/fonts, plotters'
//! `ab_glyph` backend), so plotting needs no system font libraries.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::error::{LeashError, Result};

/// One named line of (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// The embedded font (Bitstream Vera licence: assets/fonts/LICENSE).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-leash.ttf");

/// Registers the embedded font as plotters' "sans-serif" once per process.
fn register_font() -> std::result::Result<(), String> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    ok.then_some(())
        .ok_or_else(|| "the embedded font failed to load".to_string())
}

/// Tick labels that read as the numbers they are: integers without ".0" (steps), a fixed
/// number of decimals that resolves the axis span, scientific for very small or large values.
pub fn tick_label(value: f64, span: f64, integral: bool) -> String {
    if integral {
        // Steps are whole: a tick between two steps gets no label rather than a repeated one.
        return if (value - value.round()).abs() < 1e-9 {
            format!("{:.0}", value.round())
        } else {
            String::new()
        };
    }
    let magnitude = value.abs().max(span.abs());
    if magnitude != 0.0 && !(1e-3..1e5).contains(&magnitude) {
        return format!("{value:.2e}");
    }
    let decimals = if span > 0.0 {
        (2.0 - span.log10().floor()).clamp(0.0, 6.0) as usize
    } else {
        3
    };
    let text = format!("{value:.decimals$}");
    // "-0.00" is zero.
    if text
        .trim_start_matches('-')
        .chars()
        .all(|c| c == '0' || c == '.')
    {
        text.trim_start_matches('-').to_string()
    } else {
        text
    }
}

/// Draws `series` into a 800×480 PNG at `path`, with both axes labelled.
pub fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    let fail = |e: String| {
        LeashError::file(
            path,
            format!("cannot draw plot: {e}"),
            "the numbers are still in metrics.jsonl",
        )
    };
    register_font().map_err(fail)?;
    let points = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    let mut integral_x = true;
    for &(x, y) in points {
        if x.is_finite() && y.is_finite() {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
            integral_x &= x.fract() == 0.0;
        }
    }
    if x0 > x1 {
        return Err(fail("no finite points".into()));
    }
    if x1 - x0 < 1e-12 {
        (x0, x1) = (x0 - 0.5, x1 + 0.5);
    }
    let pad = ((y1 - y0) * 0.05)
        .max(y1.abs().max(y0.abs()) * 0.05)
        .max(1e-12);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let (x_span, y_span) = (x1 - x0, y1 - y0);
    let x_fmt = move |x: &f64| tick_label(*x, x_span, integral_x);
    let y_fmt = move |y: &f64| tick_label(*y, y_span, false);
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(84)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| fail(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_labels(if integral_x {
            (x_span as usize + 1).clamp(2, 10)
        } else {
            10
        })
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
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
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 15))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_read_as_numbers() {
        assert_eq!(tick_label(10.0, 40.0, true), "10");
        assert_eq!(tick_label(2.5, 3.0, true), "");
        assert_eq!(tick_label(-0.25, 1.5, false), "-0.25");
        assert_eq!(tick_label(-0.0001, 0.5, false), "0.000");
        assert_eq!(tick_label(2e-6, 1e-6, false), "2.00e-6");
        assert_eq!(tick_label(-153.2, 40.0, false), "-153.2");
    }
}
