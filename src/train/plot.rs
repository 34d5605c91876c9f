//! Training curves, drawn from OUT/metrics.jsonl: `curves.svg` (loss, validation loss, learning rate,
//! with axes and labels) and `curves.png` (the same lines on a plain grid, no text). Both are written
//! by hand: SVG is text, and the PNG encoder below stores uncompressed deflate blocks.

use anyhow::{Context, Result};
use std::path::Path;

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

const W: usize = 720;
const PANEL_H: usize = 240;
const H: usize = 2 * PANEL_H + 40;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;

/// Bounds of all points, padded so a flat series still has height.
fn bounds(series: &[&Series]) -> Option<(f64, f64, f64, f64)> {
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.1.is_finite())
        .collect();
    if pts.is_empty() {
        return None;
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(y1.abs() * 1e-3).max(1e-12);
    Some((x0, x1, y0 - pad, y1 + pad))
}

/// Pixel coordinates of the series of one panel whose top is at `top`.
fn project(series: &[&Series], top: f64) -> Vec<Vec<(f64, f64)>> {
    let Some((x0, x1, y0, y1)) = bounds(series) else {
        return vec![vec![]; series.len()];
    };
    let (pw, ph) = (W as f64 - LEFT - RIGHT, PANEL_H as f64 - 50.0);
    series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .filter(|p| p.1.is_finite())
                .map(|&(x, y)| {
                    (
                        LEFT + (x - x0) / (x1 - x0) * pw,
                        top + 20.0 + (1.0 - (y - y0) / (y1 - y0)) * ph,
                    )
                })
                .collect()
        })
        .collect()
}

/// `curves.svg`: losses above, learning rate below, with axis ranges and a legend.
pub fn svg(losses: &[Series], lr: &Series) -> String {
    let mut out = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    let panels: [(Vec<&Series>, f64); 2] = [(losses.iter().collect(), 10.0), (vec![lr], PANEL_H as f64 + 30.0)];
    for (series, top) in panels {
        let ph = PANEL_H as f64 - 50.0;
        out += &format!(
            "<rect x=\"{LEFT}\" y=\"{}\" width=\"{}\" height=\"{ph}\" fill=\"none\" stroke=\"#999\"/>\n",
            top + 20.0,
            W as f64 - LEFT - RIGHT
        );
        if let Some((x0, x1, y0, y1)) = bounds(&series) {
            out += &format!("<text x=\"4\" y=\"{}\">{y1:.3e}</text>\n", top + 30.0);
            out += &format!("<text x=\"4\" y=\"{}\">{y0:.3e}</text>\n", top + 20.0 + ph);
            out += &format!("<text x=\"{LEFT}\" y=\"{}\">step {x0}</text>\n", top + ph + 36.0);
            out += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">step {x1}</text>\n",
                W as f64 - RIGHT,
                top + ph + 36.0
            );
        }
        let mut legend_x = LEFT;
        for (s, pts) in series.iter().zip(project(&series, top)) {
            let (r, g, b) = s.color;
            if !pts.is_empty() {
                let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
                out += &format!(
                    "<polyline fill=\"none\" stroke=\"rgb({r},{g},{b})\" stroke-width=\"1.5\" points=\"{}\"/>\n",
                    path.join(" ")
                );
            }
            out += &format!(
                "<text x=\"{legend_x}\" y=\"{}\" fill=\"rgb({r},{g},{b})\">{}</text>\n",
                top + 14.0,
                s.name
            );
            legend_x += 140.0;
        }
    }
    out + "</svg>\n"
}

/// `curves.png`: the same panels and lines as RGB pixels on a light grid (no text).
pub fn png(losses: &[Series], lr: &Series) -> Vec<u8> {
    let mut px = vec![255u8; W * H * 3];
    let mut set = |x: i64, y: i64, c: (u8, u8, u8)| {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            let i = (y as usize * W + x as usize) * 3;
            px[i..i + 3].copy_from_slice(&[c.0, c.1, c.2]);
        }
    };
    let panels: [(Vec<&Series>, f64); 2] = [(losses.iter().collect(), 10.0), (vec![lr], PANEL_H as f64 + 30.0)];
    for (series, top) in panels {
        let (y_top, y_bot) = ((top + 20.0) as i64, (top + PANEL_H as f64 - 30.0) as i64);
        for k in 0..=4 {
            let y = y_top + (y_bot - y_top) * k / 4;
            for x in LEFT as i64..(W as f64 - RIGHT) as i64 {
                set(x, y, (220, 220, 220));
            }
        }
        for y in y_top..=y_bot {
            set(LEFT as i64, y, (150, 150, 150));
        }
        for (s, pts) in series.iter().zip(project(&series, top)) {
            for w in pts.windows(2) {
                // Step along the longer axis, one pixel at a time (2 px thick).
                let (dx, dy) = (w[1].0 - w[0].0, w[1].1 - w[0].1);
                let n = dx.abs().max(dy.abs()).ceil().max(1.0) as usize;
                for k in 0..=n {
                    let t = k as f64 / n as f64;
                    let (x, y) = ((w[0].0 + t * dx) as i64, (w[0].1 + t * dy) as i64);
                    set(x, y, s.color);
                    set(x, y + 1, s.color);
                }
            }
        }
    }
    encode_png(&px, W, H)
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG of 8-bit RGB pixels: IHDR, one IDAT holding a zlib stream of stored (uncompressed) deflate
/// blocks, IEND.
fn encode_png(rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
    let mut raw = Vec::with_capacity((w * 3 + 1) * h);
    for row in rgb.chunks(w * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, b) in blocks.iter().enumerate() {
        z.push((i + 1 == blocks.len()) as u8);
        z.extend((b.len() as u16).to_le_bytes());
        z.extend((!(b.len() as u16)).to_le_bytes());
        z.extend_from_slice(b);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &raw {
        a = (a + x as u32) % 65_521;
        b = (b + a) % 65_521;
    }
    z.extend(((b << 16) | a).to_be_bytes());
    let chunk = |out: &mut Vec<u8>, kind: &[u8], data: &[u8]| {
        out.extend((data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend(crc32(&body).to_be_bytes());
    };
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = (w as u32).to_be_bytes().to_vec();
    ihdr.extend((h as u32).to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit, RGB, deflate, no filter method, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// Write `curves.svg` and `curves.png` into `out` from `out/metrics.jsonl`.
pub fn write_curves(out: &Path) -> Result<()> {
    let (losses, lr) = read_metrics(&out.join("metrics.jsonl"))?;
    crate::load::weights::write_atomic(&out.join("curves.svg"), svg(&losses, &lr).as_bytes())?;
    crate::load::weights::write_atomic(&out.join("curves.png"), &png(&losses, &lr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_and_png_structure() {
        assert_eq!(
            crc32(b"IEND"),
            0xAE42_6082,
            "the CRC of an empty IEND chunk, as in every PNG"
        );
        let p = encode_png(&[255, 0, 0, 0, 255, 0], 2, 1);
        assert_eq!(&p[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&p[p.len() - 8..p.len() - 4], b"IEND");
    }
}
