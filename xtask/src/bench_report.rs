//! What `bench kernel` measured, as a plain-text table for the terminal and as Markdown for
//! `docs/benchmarks.md`, where only the block between [`BEGIN_MARKER`] and [`END_MARKER`] is
//! rewritten, so the hand-written method and noise notes around it stay.

use std::{fmt::Write as _, fs, path::Path};

use anyhow::{bail, Context, Result};

/// How a row was timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timing {
    /// One BPF_PROG_TEST_RUN with `repeat` runs; the kernel reports the average.
    Repeat(u32),
    /// `n` BPF_PROG_TEST_RUN calls of one run each (a new 5-tuple, or a different session,
    /// per packet); the kernel-reported durations are averaged.
    Single(u32),
}

impl Timing {
    fn describe(self) -> String {
        match self {
            Timing::Repeat(n) => format!("repeat {n}"),
            Timing::Single(n) => format!("{n} single runs"),
        }
    }
}

/// One measured configuration: a value per repetition.
#[derive(Debug, Clone)]
pub struct Row {
    /// Stable identifier (what the test and a reader grep for).
    pub key: String,
    /// What was measured.
    pub label: String,
    /// How it was timed.
    pub timing: Timing,
    /// Nanoseconds per packet, one per repetition.
    pub samples: Vec<f64>,
    /// The row's own value divided by its baseline's in the same repetition; empty for a
    /// baseline.
    pub ratios: Vec<f64>,
    /// The row's own value minus its baseline's in the same repetition; empty for a baseline.
    pub over: Vec<f64>,
    /// Extra facts (refusals, fill level).
    pub note: String,
}

impl Row {
    /// A row without samples yet.
    pub fn new(key: impl Into<String>, label: impl Into<String>, timing: Timing) -> Self {
        Self {
            key: key.into(),
            label: label.into(),
            timing,
            samples: Vec::new(),
            ratios: Vec::new(),
            over: Vec::new(),
            note: String::new(),
        }
    }

    /// Adds one repetition's value and its baseline in that repetition.
    pub fn push(&mut self, ns: f64, baseline: f64) {
        self.samples.push(ns);
        self.ratios.push(ns / baseline);
        self.over.push(ns - baseline);
    }

    /// Smallest sample.
    pub fn min(&self) -> f64 {
        self.samples.iter().copied().fold(f64::INFINITY, f64::min)
    }

    /// Largest sample.
    pub fn max(&self) -> f64 {
        self.samples
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max)
    }

    /// Median sample.
    pub fn median(&self) -> f64 {
        median(&self.samples)
    }

    /// Median of the per-repetition ratios to the baseline, if this row has one.
    pub fn ratio(&self) -> Option<f64> {
        (!self.ratios.is_empty()).then(|| median(&self.ratios))
    }

    /// Median of the per-repetition differences to the baseline: the NAT's own work, with
    /// the harness's overhead taken out.
    pub fn over_baseline(&self) -> Option<f64> {
        (!self.over.is_empty()).then(|| median(&self.over))
    }

    /// `(max - min) / median` in percent: how much the repetitions disagree.
    pub fn spread_pct(&self) -> f64 {
        100.0 * (self.max() - self.min()) / self.median()
    }
}

/// Median of `values` (mean of the middle two for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One table size of the scale measurement.
#[derive(Debug, Clone)]
pub struct ScalePoint {
    /// Short name, e.g. `16Mi`.
    pub name: String,
    /// `max_sessions` of the four tables.
    pub capacity: u32,
    /// Sessions in the table while measuring.
    pub sessions: u64,
    /// Inside endpoints (mappings and port claims) among them.
    pub endpoints: u64,
    /// External addresses x ports of the pool.
    pub pool: String,
    /// Kernel memory of the four tables (memlock), bytes.
    pub memory_bytes: u64,
    /// Seconds the synthetic fill took.
    pub fill_secs: f64,
    /// Its measurements.
    pub rows: Vec<Row>,
}

/// A goal of the issues, with what was measured against it.
#[derive(Debug, Clone)]
pub struct Goal {
    /// The goal as the issue states it.
    pub text: String,
    /// The measured figure.
    pub measured: String,
    /// Met, missed, or not applicable (informational).
    pub verdict: Option<bool>,
}

/// Everything one run of `bench kernel` produced.
#[derive(Debug, Clone)]
pub struct Report {
    /// Machine facts: CPUs, kernel, CPU model.
    pub machine: Vec<(String, String)>,
    /// The run's settings, one line.
    pub settings: String,
    /// The alternated main rows.
    pub rows: Vec<Row>,
    /// The scale points measured.
    pub scale: Vec<ScalePoint>,
    /// Scale points left out, with why.
    pub scale_skipped: Vec<String>,
    /// The goals, next to the numbers.
    pub goals: Vec<Goal>,
}

/// What the columns mean (printed above the table, in both renderings).
const LEGEND: &str = "Kernel-timed ns per packet (BPF_PROG_TEST_RUN: the XDP programs only, no \
driver, no stack); min/median/max over repetitions; spread = (max - min) / median; x base = \
median of per-repetition ratios to the parse-and-pass baseline timed the same way (repeat or \
single runs) in the same repetition; +ns = median of per-repetition differences to it.";

const HEADER: [&str; 8] = [
    "row", "min ns", "median", "max", "spread", "x base", "+ns", "what",
];

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "base".to_owned(), |r| format!("{r:.2}x"))
}

fn row_cells(r: &Row) -> [String; 8] {
    let mut what = format!("{} ({})", r.label, r.timing.describe());
    if !r.note.is_empty() {
        let _ = write!(what, "; {}", r.note);
    }
    [
        r.key.clone(),
        format!("{:.1}", r.min()),
        format!("{:.1}", r.median()),
        format!("{:.1}", r.max()),
        format!("{:.0}%", r.spread_pct()),
        fmt_ratio(r.ratio()),
        r.over_baseline()
            .map_or_else(|| "-".to_owned(), |d| format!("{d:.0}")),
        what,
    ]
}

/// Left-aligned first and last columns, right-aligned numbers.
pub fn text_table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let cols = header.len();
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == 0 || i == cols - 1 {
                let _ = write!(s, "{c:<w$}", w = width[i]);
            } else {
                let _ = write!(s, "{c:>w$}", w = width[i]);
            }
            if i + 1 < cols {
                s.push_str("  ");
            }
        }
        s.trim_end().to_owned()
    };
    let head: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    let _ = writeln!(out, "{}", line(&head));
    for r in rows {
        let _ = writeln!(out, "{}", line(r));
    }
}

/// The first lines of a terminal report: the machine in one line, then the settings.
pub fn text_header(out: &mut String, machine: &[(String, String)], settings: &str) {
    let machine: Vec<String> = machine.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let _ = writeln!(out, "machine: {}", machine.join("; "));
    let _ = writeln!(out, "settings: {settings}");
}

/// The first lines of a generated Markdown block: which command wrote it, the machine as a
/// list, then the settings.
pub fn md_header(out: &mut String, command: &str, machine: &[(String, String)], settings: &str) {
    let _ = writeln!(out, "Generated by `{command}`; do not edit by hand.\n");
    for (k, v) in machine {
        let _ = writeln!(out, "- {k}: {v}");
    }
    let _ = writeln!(out, "- settings: {settings}\n");
}

/// Opens a chart: the `<svg>` element of `width` x `height`, a white background and `title`
/// at (`x`, `y`). The caller closes it with `</svg>`.
pub fn svg_open(out: &mut String, width: f64, height: f64, (x, y): (f64, f64), title: &str) {
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{x}" y="{y}" font-size="13">{title}</text>"#
    );
}

pub fn md_table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let align: Vec<&str> = (0..header.len())
        .map(|i| {
            if i == 0 || i == header.len() - 1 {
                "---"
            } else {
                "---:"
            }
        })
        .collect();
    let _ = writeln!(out, "|{}|", align.join("|"));
    for r in rows {
        let cells: Vec<String> = r.iter().map(|c| c.replace('|', "\\|")).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
}

const SCALE_HEADER: [&str; 7] = [
    "point",
    "capacity",
    "sessions",
    "endpoints",
    "memory MiB",
    "B/slot",
    "pool; fill time",
];

fn scale_cells(p: &ScalePoint) -> Vec<String> {
    vec![
        p.name.clone(),
        p.capacity.to_string(),
        p.sessions.to_string(),
        p.endpoints.to_string(),
        format!("{:.1}", p.memory_bytes as f64 / (1024.0 * 1024.0)),
        format!("{:.0}", p.memory_bytes as f64 / f64::from(p.capacity)),
        format!("{}; {:.1} s", p.pool, p.fill_secs),
    ]
}

fn goal_line(g: &Goal) -> String {
    let verdict = match g.verdict {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "info",
    };
    format!("[{verdict}] {}: {}", g.text, g.measured)
}

impl Report {
    fn main_cells(&self) -> Vec<Vec<String>> {
        self.rows.iter().map(|r| row_cells(r).to_vec()).collect()
    }

    fn scale_row_cells(&self) -> Vec<Vec<String>> {
        self.scale
            .iter()
            .flat_map(|p| p.rows.iter().map(|r| row_cells(r).to_vec()))
            .collect()
    }

    /// The terminal rendering.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        text_header(&mut out, &self.machine, &self.settings);
        let _ = writeln!(out, "\n{}", LEGEND);
        text_table(&mut out, &HEADER, &self.main_cells());
        if !self.scale.is_empty() {
            let _ = writeln!(out, "\nScale: tables at 90% of capacity");
            let cells: Vec<Vec<String>> = self.scale.iter().map(scale_cells).collect();
            text_table(&mut out, &SCALE_HEADER, &cells);
            let _ = writeln!(out);
            text_table(&mut out, &HEADER, &self.scale_row_cells());
        }
        for s in &self.scale_skipped {
            let _ = writeln!(out, "scale: skipped {s}");
        }
        let _ = writeln!(out, "\nGoals (tracked, not asserted):");
        for g in &self.goals {
            let _ = writeln!(out, "  {}", goal_line(g));
        }
        out
    }

    /// The Markdown block that goes between the markers of `docs/benchmarks.md`.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        md_header(
            &mut out,
            "cargo xtask bench kernel",
            &self.machine,
            &self.settings,
        );
        let _ = writeln!(out, "### Cost per packet\n\n{LEGEND}\n");
        md_table(&mut out, &HEADER, &self.main_cells());
        let _ = writeln!(out, "\n### Goals\n");
        for g in &self.goals {
            let _ = writeln!(out, "- {}", goal_line(g));
        }
        if !self.scale.is_empty() || !self.scale_skipped.is_empty() {
            let _ = writeln!(out, "\n### Scale\n");
        }
        if !self.scale.is_empty() {
            md_table(
                &mut out,
                &SCALE_HEADER,
                &self.scale.iter().map(scale_cells).collect::<Vec<_>>(),
            );
            let _ = writeln!(out);
            md_table(&mut out, &HEADER, &self.scale_row_cells());
            if self.scale.len() >= crate::bench_scale_chart::MIN_POINTS {
                let _ = writeln!(
                    out,
                    "\n![in-kernel cost by table size]({})",
                    crate::bench_scale_chart::SVG_NAME
                );
            }
        }
        for s in &self.scale_skipped {
            let _ = writeln!(out, "\nSkipped: {s}");
        }
        out
    }
}

/// Start of the generated block in `docs/benchmarks.md`.
pub const BEGIN_MARKER: &str =
    "<!-- BEGIN bench kernel (generated by `cargo xtask bench kernel`; replaced on every run) -->";
/// End of the generated block.
pub const END_MARKER: &str = "<!-- END bench kernel -->";

/// The page written when `docs/benchmarks.md` does not exist yet: the method and noise
/// notes, and the markers the results go between.
pub const TEMPLATE: &str = include_str!("bench_template.md");

/// `text` with the block between the markers replaced by `block`.
pub fn splice(text: &str, block: &str) -> Result<String> {
    splice_block(text, BEGIN_MARKER, END_MARKER, block)
}

/// `text` with the block between `begin_marker` and `end_marker` replaced by `block`: each
/// generator of the page owns one block, the prose around them stays.
pub fn splice_block(
    text: &str,
    begin_marker: &str,
    end_marker: &str,
    block: &str,
) -> Result<String> {
    let (Some(begin), Some(end)) = (text.find(begin_marker), text.find(end_marker)) else {
        bail!(
            "the markers are missing (they must be on lines of their own):\n  {begin_marker}\n  \
             {end_marker}\nput them back, or delete the file to have it written from the template"
        );
    };
    if end < begin {
        bail!("the end marker comes before the begin marker");
    }
    let head = &text[..begin + begin_marker.len()];
    let tail = &text[end..];
    Ok(format!("{head}\n{}\n{tail}", block.trim_end()))
}

/// Writes `report` into the page at `path` (created from [`TEMPLATE`] if absent), and the
/// scale chart next to it when there are scale points to draw.
pub fn write_docs(path: &Path, report: &Report) -> Result<()> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => TEMPLATE.to_owned(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let new =
        splice(&text, &report.to_markdown()).with_context(|| format!("in {}", path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(path, new).with_context(|| format!("writing {}", path.display()))?;
    if let Some(svg) = crate::bench_scale_chart::to_svg(&report.scale) {
        let chart = path.with_file_name(crate::bench_scale_chart::SVG_NAME);
        fs::write(&chart, svg).with_context(|| format!("writing {}", chart.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, samples: &[f64], ratios: &[f64]) -> Row {
        Row {
            samples: samples.to_vec(),
            ratios: ratios.to_vec(),
            over: ratios.iter().zip(samples).map(|(r, s)| s - s / r).collect(),
            ..Row::new(key, "label", Timing::Repeat(10))
        }
    }

    #[test]
    fn statistics() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let r = row("x", &[10.0, 12.0, 11.0], &[1.1, 1.3, 1.2]);
        assert_eq!((r.min(), r.median(), r.max()), (10.0, 11.0, 12.0));
        assert_eq!(r.ratio(), Some(1.2));
        assert!((r.spread_pct() - 100.0 * 2.0 / 11.0).abs() < 1e-9);
        assert_eq!(row("b", &[1.0], &[]).ratio(), None);
    }

    #[test]
    fn splice_replaces_only_the_block_and_is_idempotent() {
        let text = format!("# T\n\nintro\n{BEGIN_MARKER}\nold\n{END_MARKER}\n\n## Method\nkept\n");
        let once = splice(&text, "new 1").unwrap();
        assert!(
            once.contains("new 1") && !once.contains("old") && once.contains("## Method\nkept")
        );
        let twice = splice(&once, "new 2").unwrap();
        assert_eq!(twice, once.replace("new 1", "new 2"));
        assert!(splice("no markers", "x").is_err());
    }

    #[test]
    fn template_has_the_markers_and_the_prose_sections() {
        for needle in [BEGIN_MARKER, END_MARKER, "## Method", "## Noise"] {
            assert!(TEMPLATE.contains(needle), "{needle}");
        }
    }

    #[test]
    fn tables_have_one_line_per_row() {
        let report = Report {
            machine: vec![("CPUs".into(), "2".into())],
            settings: "s".into(),
            rows: vec![row("base", &[10.0], &[]), row("other", &[15.0], &[1.5])],
            scale: vec![],
            scale_skipped: vec!["16Mi: needs memory".into()],
            goals: vec![Goal {
                text: "g".into(),
                measured: "1.5x".into(),
                verdict: Some(true),
            }],
        };
        let text = report.to_text();
        assert!(text
            .lines()
            .any(|l| l.starts_with("base ") && l.contains("base")));
        assert!(text
            .lines()
            .any(|l| l.starts_with("other ") && l.contains("1.50x")));
        assert!(text.contains("[met] g: 1.5x"));
        let md = report.to_markdown();
        assert!(md.contains("| other | 15.0 | 15.0 | 15.0 | 0% | 1.50x | 5 |"));
        assert!(md.contains("Skipped: 16Mi"));
    }
}
