//! The chart of `cargo xtask bench kernel`'s scale points: in-kernel cost per packet against
//! table size, for established translation, a new flow and its insert floor, with the flatness
//! goal drawn in. A picture of what the scale table says: how far from flat the costs are, and
//! how much of the new flow's rise is its four inserts.

use std::fmt::Write as _;

use crate::bench_report::{svg_open, Row, ScalePoint};

/// The chart's file name, next to the page.
pub const SVG_NAME: &str = "benchmarks-kernel.svg";

/// A line of the chart: the scale rows whose key ends with `suffix`.
struct Series {
    suffix: &'static str,
    label: &'static str,
    colour: &'static str,
}

const SERIES: [Series; 4] = [
    Series {
        suffix: "/new-flow",
        label: "new SNAT flow",
        colour: "#d95f02",
    },
    Series {
        suffix: "/inserts",
        label: "its four inserts alone",
        colour: "#7570b3",
    },
    Series {
        suffix: "/established",
        label: "established, random session",
        colour: "#1b9e77",
    },
    Series {
        suffix: "/parse-pass-1",
        label: "parse-and-pass (single runs)",
        colour: "#999999",
    },
];

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 380.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 48.0;

/// Where on the y axis the grid lines go: a step giving 4-8 lines up to `top`.
fn grid_step(top: f64) -> f64 {
    [100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0]
        .into_iter()
        .find(|step| top / step <= 8.0)
        .unwrap_or(10_000.0)
}

/// `n` in three significant figures with a k or M suffix (the axis has room for little).
fn short_count(n: u64) -> String {
    let n = n as f64;
    let (value, suffix) = if n >= 1e6 {
        (n / 1e6, "M")
    } else if n >= 1e3 {
        (n / 1e3, "k")
    } else {
        (n, "")
    };
    let digits = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    format!("{value:.digits$}{suffix}")
}

/// Scale points a chart needs: a line goes through two at least.
pub const MIN_POINTS: usize = 2;

/// The row of `point` whose key ends with `suffix`, if it was measured there.
fn row<'a>(point: &'a ScalePoint, suffix: &str) -> Option<&'a Row> {
    point.rows.iter().find(|r| r.key.ends_with(suffix))
}

/// The SVG, or `None` with fewer than [`MIN_POINTS`] scale points.
pub fn to_svg(points: &[ScalePoint]) -> Option<String> {
    if points.len() < MIN_POINTS {
        return None;
    }
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let flat_goal = row(&points[0], "/new-flow").map(|r| 1.5 * r.median());
    let highest = points
        .iter()
        .flat_map(|p| SERIES.iter().filter_map(move |s| row(p, s.suffix)))
        .map(Row::max)
        .chain(flat_goal)
        .fold(0.0f64, f64::max);
    let step = grid_step(highest);
    let y_top = (highest / step).ceil().max(1.0) * step;
    let y = |ns: f64| TOP + plot_h * (1.0 - ns / y_top);
    // Table sizes grow by powers of two to sixteen: a log axis spaces them evenly.
    let logs: Vec<f64> = points
        .iter()
        .map(|p| (p.sessions.max(1) as f64).log2())
        .collect();
    let (lo, hi) = (logs[0], logs[logs.len() - 1]);
    let x = |l: f64| LEFT + 20.0 + (plot_w - 40.0) * (l - lo) / (hi - lo).max(1e-9);

    let mut s = String::new();
    svg_open(
        &mut s,
        WIDTH,
        HEIGHT,
        (LEFT, 18.0),
        "In-kernel ns per packet by sessions in the table (median; bars: min to max over \
         repetitions)",
    );
    let mut tick = 0.0;
    while tick <= y_top + 1e-9 {
        let ty = y(tick);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" x2="{:.1}" y1="{ty:.1}" y2="{ty:.1}" stroke="#dddddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{tick:.0}</text>"##,
            LEFT + plot_w,
            LEFT - 4.0,
            ty + 4.0
        );
        tick += step;
    }
    for (p, &l) in points.iter().zip(&logs) {
        let px = x(l);
        let _ = writeln!(
            s,
            r##"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text><text x="{px:.1}" y="{:.1}" text-anchor="middle" fill="#666666">{}</text>"##,
            TOP + plot_h + 16.0,
            p.name,
            TOP + plot_h + 30.0,
            short_count(p.sessions)
        );
    }
    if let Some(goal) = flat_goal {
        let gy = y(goal);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" x2="{:.1}" y1="{gy:.1}" y2="{gy:.1}" stroke="#d95f02" stroke-dasharray="6 4"/>"##,
            LEFT + plot_w,
        );
        // Its legend entry, under the series'.
        let lx = LEFT + plot_w + 14.0;
        let ly = TOP + 10.0 + SERIES.len() as f64 * 18.0;
        let _ = writeln!(
            s,
            r##"<line x1="{lx:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#d95f02" stroke-dasharray="4 2"/><text x="{:.1}" y="{ly:.1}">goal: flat within 1.5x</text><text x="{:.1}" y="{:.1}" fill="#666666">of the smallest table</text>"##,
            lx + 10.0,
            ly - 4.0,
            ly - 4.0,
            lx + 14.0,
            lx + 14.0,
            ly + 14.0
        );
    }
    for series in &SERIES {
        let measured: Vec<(f64, &Row)> = points
            .iter()
            .zip(&logs)
            .filter_map(|(p, &l)| row(p, series.suffix).map(|r| (x(l), r)))
            .collect();
        let line: Vec<String> = measured
            .iter()
            .map(|(px, r)| format!("{px:.1},{:.1}", y(r.median())))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
            line.join(" "),
            series.colour
        );
        for (px, r) in &measured {
            let _ = writeln!(
                s,
                r#"<line x1="{px:.1}" x2="{px:.1}" y1="{:.1}" y2="{:.1}" stroke="{}"/><circle cx="{px:.1}" cy="{:.1}" r="3" fill="{}"><title>{}: {:.0} ns (min {:.0}, max {:.0})</title></circle>"#,
                y(r.min()),
                y(r.max()),
                series.colour,
                y(r.median()),
                series.colour,
                r.key,
                r.median(),
                r.min(),
                r.max()
            );
        }
    }
    for (i, series) in SERIES.iter().enumerate() {
        let lx = LEFT + plot_w + 14.0;
        let ly = TOP + 10.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="10" height="10" fill="{}"/><text x="{:.1}" y="{ly:.1}">{}</text>"#,
            ly - 9.0,
            series.colour,
            lx + 14.0,
            series.label
        );
    }
    let _ = writeln!(s, "</svg>");
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench_report::Timing;

    fn point(name: &str, sessions: u64, new_flow: f64) -> ScalePoint {
        let mut rows = Vec::new();
        for (suffix, ns) in [
            ("new-flow", new_flow),
            ("inserts", new_flow / 2.0),
            ("established", new_flow / 4.0),
            ("parse-pass-1", 120.0),
        ] {
            let mut r = Row::new(format!("{name}/{suffix}"), "label", Timing::Single(10));
            r.samples = vec![ns * 0.9, ns, ns * 1.1];
            rows.push(r);
        }
        ScalePoint {
            name: name.into(),
            capacity: sessions as u32,
            sessions,
            endpoints: sessions,
            pool: String::new(),
            memory_bytes: 0,
            fill_secs: 0.0,
            rows,
        }
    }

    #[test]
    fn one_point_draws_nothing() {
        assert!(to_svg(&[point("1Ki", 921, 1500.0)]).is_none());
    }

    #[test]
    fn every_series_and_point_is_drawn_inside_the_canvas_with_the_goal_line() {
        let svg = to_svg(&[
            point("1Ki", 921, 1500.0),
            point("1Mi", 943_718, 2800.0),
            point("16Mi", 15_099_494, 4200.0),
        ])
        .expect("a chart");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), SERIES.len());
        assert_eq!(svg.matches("<circle").count(), 3 * SERIES.len());
        assert!(svg.contains("goal: flat within 1.5x"));
        // Every coordinate lies on the canvas.
        for attr in [" cx=\"", " cy=\"", " y1=\"", " y2=\""] {
            for part in svg.split(attr).skip(1) {
                let v: f64 = part[..part.find('"').unwrap()].parse().unwrap();
                assert!((0.0..=WIDTH.max(HEIGHT)).contains(&v), "{attr}{v}");
            }
        }
        // The largest value (1.1 x 4200) sits below the top grid line, not above the plot.
        assert!(svg.contains(">5000</text>"), "{svg}");
    }

    #[test]
    fn counts_are_short() {
        assert_eq!(short_count(921), "921");
        assert_eq!(short_count(14_745), "14.7k");
        assert_eq!(short_count(943_718), "944k");
        assert_eq!(short_count(15_099_494), "15.1M");
    }

    #[test]
    fn grid_steps_give_at_most_eight_lines() {
        for top in [90.0, 450.0, 1300.0, 4620.0, 12_000.0, 60_000.0] {
            assert!(top / grid_step(top) <= 8.0, "{top}");
        }
    }
}
