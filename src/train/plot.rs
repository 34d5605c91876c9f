//! Training curves, drawn from OUT/metrics.jsonl with plotters: `curves.png` and `curves.svg`, the
//! same figure in both. A title; above, the training loss and the validation loss; below, the
//! learning rate; each panel with labelled axes, round tick values and a legend. The text is drawn
//! with DejaVu Sans, bundled in assets/fonts (no system font is looked up).

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

/// One named series of (step, value) points.
pub struct Series {
    pub name: &'static str,
    pub color: (u8, u8, u8),
    pub points: Vec<(f64, f64)>,
}

/// Read the series from a metrics file: training loss, validation loss, learning rate.
pub fn read_metrics(path: &Path) -> Result<(Vec<Series>, Series)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (mut loss, mut eval, mut lr) = (Vec::new(), Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v["step"].as_f64() else { continue };
        if let (Some(l), false) = (v["loss"].as_f64(), v["skipped"].as_bool().unwrap_or(false)) {
            loss.push((step, l));
        }
        if let Some(r) = v["lr"].as_f64() {
            lr.push((step, r));
        }
        if let Some(e) = v["eval_loss"].as_f64() {
            eval.push((step, e));
        }
    }
    let losses = vec![
        Series {
            name: "training loss",
            color: (31, 119, 180),
            points: loss,
        },
        Series {
            name: "validation loss",
            color: (214, 39, 40),
            points: eval,
        },
    ];
    Ok((
        losses,
        Series {
            name: "learning rate",
            color: (44, 160, 44),
            points: lr,
        },
    ))
}

/// Width and height of the figure, in pixels.
pub const SIZE: (u32, u32) = (900, 640);
/// Height of the title band at the top of the figure.
pub const TITLE_H: u32 = 44;
const FONT: &str = "sans-serif";
static DEJAVU: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut ok = true;
    ONCE.call_once(|| ok = plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU).is_ok());
    ok.then_some(())
        .ok_or_else(|| anyhow!("assets/fonts/DejaVuSans.ttf is not a font plotters can read"))
}

/// The y range of a panel: the finite values with 6% of their span above and below (a flat series
/// gets a band around its value); never below zero when `non_negative` (losses, learning rates).
pub fn y_range(series: &[&Series], non_negative: bool) -> (f64, f64) {
    let ys = || {
        series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .filter(|y| y.is_finite())
    };
    let (lo, hi) = ys().fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = if hi > lo {
        0.06 * (hi - lo)
    } else {
        (0.1 * hi.abs()).max(1e-6)
    };
    let lo = if non_negative { (lo - pad).max(0.0) } else { lo - pad };
    (lo, hi + pad)
}

/// The x range: step 0 to the last step.
fn x_range(series: &[&Series]) -> (f64, f64) {
    let last = (series.iter())
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(0f64, f64::max);
    (0.0, last.max(1.0))
}

/// A tick value as short as it can be written: `0`, `25`, `2.5`, `0.004`, `2.5e-4`.
pub fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a < 1e-12 {
        return "0".into();
    }
    let trim = |s: String| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if (1e-3..1e5).contains(&a) {
        let decimals = (3 - a.log10().floor() as i32).clamp(0, 7) as usize;
        trim(format!("{v:.decimals$}"))
    } else {
        let s = format!("{v:.2e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        format!("{}e{exp}", trim(mantissa.to_string()))
    }
}

/// One panel: its series as lines (points marked when there are few), axes with labels, and a
/// legend when there are several series (the caption names a single one).
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    y_desc: &str,
    series: &[&Series],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (x0, x1) = x_range(series);
    let (y0, y1) = y_range(series, true);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 18))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_desc)
        .x_labels((x1 as usize + 1).min(11))
        .y_labels(6)
        // Steps are whole numbers: a tick between two (a short run) gets no label.
        .x_label_formatter(&|v| match v.fract() == 0.0 {
            true => tick_label(*v),
            false => String::new(),
        })
        .y_label_formatter(&|v| tick_label(*v))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .light_line_style(RGBColor(238, 238, 238))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()?;
    let mut any = false;
    for s in series {
        let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(|p| p.1.is_finite()).collect();
        if pts.is_empty() {
            continue;
        }
        any = true;
        let (r, g, b) = s.color;
        let color = RGBColor(r, g, b);
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2)));
        if pts.len() <= 40 {
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    if any && series.len() > 1 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .draw()?;
    }
    Ok(())
}

/// The figure on any plotters backend: title, the loss panel, the learning-rate panel.
fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    losses: &[Series],
    lr: &Series,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let (top, body) = root.split_vertically(TITLE_H);
    top.draw(&Text::new(
        title.to_string(),
        (SIZE.0 as i32 / 2, TITLE_H as i32 / 2),
        TextStyle::from((FONT, 24).into_font()).pos(plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Center,
        )),
    ))?;
    let (upper, lower) = body.split_vertically((SIZE.1 - TITLE_H) * 3 / 5);
    panel(
        &upper,
        "loss per labelled token",
        "loss",
        &losses.iter().collect::<Vec<_>>(),
    )?;
    panel(&lower, "learning rate", "lr", &[lr])?;
    root.present()
}

/// The figure as RGB pixels (`SIZE`, row-major, 3 bytes a pixel).
pub fn rgb(title: &str, losses: &[Series], lr: &Series) -> Result<Vec<u8>> {
    register_font()?;
    let mut px = vec![255u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut px, SIZE).into_drawing_area();
        draw(root, title, losses, lr).map_err(|e| anyhow!("drawing the curves: {e}"))?;
    }
    Ok(px)
}

/// `curves.png`: the figure as an RGB PNG.
pub fn png(title: &str, losses: &[Series], lr: &Series) -> Result<Vec<u8>> {
    let px = rgb(title, losses, lr)?;
    let mut out = Vec::new();
    {
        let mut enc = ::png::Encoder::new(&mut out, SIZE.0, SIZE.1);
        enc.set_color(::png::ColorType::Rgb);
        enc.set_depth(::png::BitDepth::Eight);
        let mut w = enc.write_header().context("encoding the curves as PNG")?;
        w.write_image_data(&px).context("encoding the curves as PNG")?;
    }
    Ok(out)
}

/// `curves.svg`: the same figure as SVG (its text as `<text>` elements).
pub fn svg(title: &str, losses: &[Series], lr: &Series) -> Result<String> {
    register_font()?; // text is measured with it to lay out the axes
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
        draw(root, title, losses, lr).map_err(|e| anyhow!("drawing the curves: {e}"))?;
    }
    Ok(out)
}

/// Write `curves.svg` and `curves.png` into `out` from `out/metrics.jsonl`.
pub fn write_curves(out: &Path) -> Result<()> {
    let (losses, lr) = read_metrics(&out.join("metrics.jsonl"))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let title = format!("training curves: {name}");
    crate::load::weights::write_atomic(&out.join("curves.svg"), svg(&title, &losses, &lr)?.as_bytes())?;
    crate::load::weights::write_atomic(&out.join("curves.png"), &png(&title, &losses, &lr)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_written_short() {
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(25.0), "25");
        assert_eq!(tick_label(2.5), "2.5");
        assert_eq!(tick_label(0.004000000000000001), "0.004");
        assert_eq!(tick_label(0.00025), "2.5e-4");
        assert_eq!(tick_label(0.0001), "1e-4");
    }

    #[test]
    fn the_loss_axis_never_goes_below_zero() {
        let s = Series {
            name: "training loss",
            color: (0, 0, 0),
            points: vec![(1.0, 6.46), (2.0, 0.01)],
        };
        let (lo, hi) = y_range(&[&s], true);
        assert_eq!(lo, 0.0);
        assert!(hi > 6.46 && hi < 7.0, "{hi}");
        let flat = Series {
            points: vec![(1.0, 2.0)],
            ..s
        };
        let (lo, hi) = y_range(&[&flat], true);
        assert!(lo < 2.0 && hi > 2.0 && lo > 0.0, "{lo} {hi}");
    }
}
