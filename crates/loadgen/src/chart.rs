//! `chart`: latency distributions from `--json` result files as one SVG. Two panels, added
//! delay and time to first token; in each, one percentile curve per (result file, transport):
//! x = percentile on a "nines" scale (50, 90, 99, 99.9, 99.99, then the max), y = ms.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use crate::cli::ChartArgs;

/// The part of a result file the chart reads (other fields are ignored).
#[derive(Debug, Deserialize)]
pub struct Input {
    pub label: Option<String>,
    #[serde(default)]
    pub by_transport: BTreeMap<String, InputTransport>,
}

#[derive(Debug, Deserialize)]
pub struct InputTransport {
    pub ttft_ms: Option<InputSummary>,
    pub added_delay_ms: Option<InputSummary>,
}

#[derive(Debug, Deserialize)]
pub struct InputSummary {
    #[serde(default)]
    pub quantiles: Vec<(f64, f64)>,
}

/// One curve.
struct Series {
    name: String,
    color: &'static str,
    points: Vec<(f64, f64)>,
}

const PALETTE: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// Where the max is drawn, past 99.99 % (x = 4).
const X_MAX_POS: f64 = 4.4;
const X_MIN_POS: f64 = std::f64::consts::LOG10_2;

/// Percentile → x position: −log10(1 − p/100); the max (100) sits at [`X_MAX_POS`].
fn nines(p: f64) -> f64 {
    if p >= 100.0 {
        X_MAX_POS
    } else {
        (-(1.0 - p / 100.0).log10()).clamp(X_MIN_POS, 4.0)
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" step for about `n` ticks over `range`.
fn nice_step(range: f64, n: f64) -> f64 {
    let raw = (range / n).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn fmt_ms(v: f64) -> String {
    if v >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

const WIDTH: f64 = 1000.0;
const PANEL_H: f64 = 400.0;
const TOP: f64 = 50.0;
const PLOT_L: f64 = 80.0;
const PLOT_R: f64 = 700.0;
const PLOT_T: f64 = 40.0;
const PLOT_B: f64 = 330.0;

fn panel(out: &mut String, y0: f64, title: &str, series: &[Series], log_y: bool) {
    let _ = writeln!(out, r#"<g transform="translate(0,{y0})">"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="24" font-size="16" font-weight="bold">{}</text>"#,
        PLOT_L,
        esc(title)
    );
    let _ = writeln!(
        out,
        r##"<rect x="{PLOT_L}" y="{PLOT_T}" width="{}" height="{}" fill="#fafafa" stroke="#999"/>"##,
        PLOT_R - PLOT_L,
        PLOT_B - PLOT_T
    );
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .collect();
    if ys.is_empty() {
        let _ = writeln!(
            out,
            r##"<text x="{}" y="{}" font-size="14" fill="#666" text-anchor="middle">no data</text>"##,
            (PLOT_L + PLOT_R) / 2.0,
            (PLOT_T + PLOT_B) / 2.0
        );
        let _ = writeln!(out, "</g>");
        return;
    }
    let max_y = ys.iter().copied().fold(0.0_f64, f64::max).max(1e-3);
    let min_pos = ys
        .iter()
        .copied()
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    // y scale: value → pixel.
    let (lo, hi, ticks): (f64, f64, Vec<f64>) = if log_y {
        let lo = 10f64.powf(min_pos.min(max_y).max(1e-3).log10().floor());
        let hi = 10f64.powf(max_y.log10().ceil()).max(lo * 10.0);
        let mut t = Vec::new();
        let mut v = lo;
        while v <= hi * 1.0001 {
            t.push(v);
            v *= 10.0;
        }
        (lo, hi, t)
    } else {
        let step = nice_step(max_y, 5.0);
        let hi = (max_y / step).ceil() * step;
        let t = (0..=((hi / step).round() as usize))
            .map(|i| i as f64 * step)
            .collect();
        (0.0, hi, t)
    };
    let py = |v: f64| -> f64 {
        let f = if log_y {
            (v.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10())
        } else {
            (v - lo) / (hi - lo)
        };
        PLOT_B - f.clamp(0.0, 1.0) * (PLOT_B - PLOT_T)
    };
    let px = |p: f64| PLOT_L + (nines(p) - X_MIN_POS) / (X_MAX_POS - X_MIN_POS) * (PLOT_R - PLOT_L);
    for t in &ticks {
        let y = py(*t);
        let _ = writeln!(
            out,
            r##"<line x1="{PLOT_L}" y1="{y:.1}" x2="{PLOT_R}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
            PLOT_L - 6.0,
            y + 4.0,
            fmt_ms(*t)
        );
    }
    for (p, label) in [
        (50.0, "50"),
        (90.0, "90"),
        (99.0, "99"),
        (99.9, "99.9"),
        (99.99, "99.99"),
        (100.0, "max"),
    ] {
        let x = px(p);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{PLOT_T}" x2="{x:.1}" y2="{PLOT_B}" stroke="#e0e0e0"/><text x="{x:.1}" y="{}" font-size="11" text-anchor="middle">{label}</text>"##,
            PLOT_B + 16.0
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" font-size="12" text-anchor="middle">percentile (%)</text>"#,
        (PLOT_L + PLOT_R) / 2.0,
        PLOT_B + 36.0
    );
    let _ = writeln!(
        out,
        r#"<text x="20" y="{}" font-size="12" text-anchor="middle" transform="rotate(-90 20 {})">ms{}</text>"#,
        (PLOT_T + PLOT_B) / 2.0,
        (PLOT_T + PLOT_B) / 2.0,
        if log_y { " (log)" } else { "" }
    );
    for s in series {
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|(p, v)| format!("{:.1},{:.1}", px(*p), py(*v)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"><title>{}</title></polyline>"#,
            s.color,
            pts.join(" "),
            esc(&s.name)
        );
    }
    // Legend, right of the plot.
    let lx = PLOT_R + 20.0;
    for (i, s) in series.iter().enumerate() {
        let y = PLOT_T + 10.0 + i as f64 * 20.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx}" y1="{y}" x2="{}" y2="{y}" stroke="{}" stroke-width="3"/><text x="{}" y="{}" font-size="12">{}</text>"#,
            lx + 24.0,
            s.color,
            lx + 30.0,
            y + 4.0,
            esc(&s.name)
        );
    }
    let _ = writeln!(out, "</g>");
}

/// The SVG of `inputs` (name of each, parsed file).
pub fn render(inputs: &[(String, Input)], title: &str, log_y: bool) -> String {
    let mut delay = Vec::new();
    let mut ttft = Vec::new();
    let mut color = 0usize;
    for (name, input) in inputs {
        let who = input.label.clone().unwrap_or_else(|| name.clone());
        for (transport, t) in &input.by_transport {
            let series_name = format!("{who} · {transport}");
            let c = PALETTE[color % PALETTE.len()];
            color += 1;
            if let Some(s) = t
                .added_delay_ms
                .as_ref()
                .filter(|s| !s.quantiles.is_empty())
            {
                delay.push(Series {
                    name: series_name.clone(),
                    color: c,
                    points: s.quantiles.clone(),
                });
            }
            if let Some(s) = t.ttft_ms.as_ref().filter(|s| !s.quantiles.is_empty()) {
                ttft.push(Series {
                    name: series_name,
                    color: c,
                    points: s.quantiles.clone(),
                });
            }
        }
    }
    let height = TOP + 2.0 * PANEL_H;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="30" font-size="20" text-anchor="middle">{}</text>"#,
        WIDTH / 2.0,
        esc(title)
    );
    panel(
        &mut out,
        TOP,
        "Added delay: client receipt − generator emit time (ms)",
        &delay,
        log_y,
    );
    panel(
        &mut out,
        TOP + PANEL_H,
        "Time to first token: first token receipt − request sent (ms)",
        &ttft,
        log_y,
    );
    let _ = writeln!(out, "</svg>");
    out
}

/// Reads the result files and writes the chart.
pub fn run(args: &ChartArgs) -> anyhow::Result<()> {
    let mut inputs = Vec::new();
    for path in &args.inputs {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let input: Input = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a tokenfan-loadgen result", path.display()))?;
        inputs.push((file_stem(path), input));
    }
    let svg = render(&inputs, &args.title, args.log_y);
    if !svg.contains("<polyline") {
        bail!("no latency series in the given files (were they written by --json?)");
    }
    std::fs::write(&args.out, svg).with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "chart of {} result files written to {}",
        inputs.len(),
        args.out.display()
    );
    Ok(())
}

fn file_stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales() {
        assert!((nines(50.0) - X_MIN_POS).abs() < 1e-4);
        assert!((nines(99.0) - 2.0).abs() < 1e-9);
        assert_eq!(nines(100.0), X_MAX_POS);
        assert_eq!(nice_step(87.0, 5.0), 20.0);
        assert_eq!(esc("a<b&c"), "a&lt;b&amp;c");
    }
}
