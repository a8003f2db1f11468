//! What `bench topology` measured: a plain-text table for the terminal, a Markdown block for
//! `docs/benchmarks.md` (between its own markers, so the in-kernel section stays), and an SVG
//! bar chart of every configuration's cost relative to netfilter, drawn by hand (no plotting
//! dependency).

use std::{fmt::Write as _, fs, path::Path};

use anyhow::{Context, Result};

use crate::{
    bench_report::{median, splice_block},
    bench_topo::{Config, Measured, Workload},
};

/// One workload through one configuration, a value per repetition.
#[derive(Debug, Clone)]
pub struct Cell {
    /// The workload.
    pub workload: Workload,
    /// The configuration.
    pub config: Config,
    /// Appliance CPU ns per unit (packet, flow, MB, connection).
    pub cost: Vec<f64>,
    /// Units per second delivered.
    pub rate: Vec<f64>,
    /// Appliance CPU busy, percent of one CPU.
    pub busy: Vec<f64>,
    /// Cost over netfilter's in the same repetition.
    pub vs_netfilter: Vec<f64>,
    /// Cost over the bare forwarder's in the same repetition.
    pub vs_limit: Vec<f64>,
    /// Notes of the repetitions (distinct).
    pub notes: Vec<String>,
}

impl Cell {
    /// A cell without measurements.
    pub fn new(workload: Workload, config: Config) -> Self {
        Self {
            workload,
            config,
            cost: Vec::new(),
            rate: Vec::new(),
            busy: Vec::new(),
            vs_netfilter: Vec::new(),
            vs_limit: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Adds one repetition's measurement.
    pub fn push(&mut self, m: &Measured, w: Workload) {
        let secs = m.iv.secs.max(1e-9);
        self.cost.push(m.iv.nat_cpu_ns as f64 / m.units.max(1e-9));
        let per_sec = m.units / secs;
        self.rate.push(match w {
            // Megabytes per second -> Gbit/s.
            Workload::Iperf => per_sec * 8.0 / 1e3,
            _ => per_sec,
        });
        self.busy.push(m.iv.busy_pct());
        if !m.note.is_empty() && !self.notes.contains(&m.note) {
            self.notes.push(m.note.clone());
        }
    }

    fn min(&self) -> f64 {
        self.cost.iter().copied().fold(f64::INFINITY, f64::min)
    }

    fn max(&self) -> f64 {
        self.cost.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }

    /// Median cost.
    pub fn median(&self) -> f64 {
        median(&self.cost)
    }
}

/// The chart's size (pixels); the defaults fit a documentation page.
#[derive(Debug, Clone, Copy)]
pub struct Plot {
    /// Width.
    pub width: f64,
    /// Height.
    pub height: f64,
}

impl Default for Plot {
    fn default() -> Self {
        Self {
            width: 820.0,
            height: 340.0,
        }
    }
}

/// Everything one run produced.
#[derive(Debug, Clone)]
pub struct TopoReport {
    machine: Vec<(String, String)>,
    settings: String,
    /// Workload key, label, cost unit, rate unit (table order).
    workloads: Vec<(String, String, &'static str, &'static str)>,
    /// Workload-major, configurations in [`Config::ALL`] order.
    pub cells: Vec<Cell>,
    plot: Plot,
}

const HEADER: [&str; 11] = [
    "workload",
    "config",
    "min",
    "median",
    "max",
    "spread",
    "rate",
    "busy",
    "x nf",
    "x limit",
    "unit; note",
];

const LEGEND: &str = "Appliance CPU time per unit delivered (its NAPI threads' CPU time over \
the sink's count: packets, new flows, megabytes or connections); min/median/max over \
repetitions; spread = (max - min) / median; rate = median units per second at the sink \
(Gbit/s for iperf3); busy = median share of one CPU the appliance's threads used (a rate is \
the appliance's own only near 100%); x nf, x limit = median of per-repetition ratios of the \
cost to netfilter's and to the bare XDP forwarder's in the same repetition (below 1: cheaper).";

fn fmt_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.2}")
    }
}

fn fmt_ratio(v: &[f64]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        format!("{:.2}x", median(v))
    }
}

fn goal_line(text: &str, measured: String, met: Option<bool>) -> String {
    let verdict = match met {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "info",
    };
    format!("[{verdict}] {text}: {measured}")
}

impl TopoReport {
    /// Assembles the report.
    pub fn new(
        machine: Vec<(String, String)>,
        settings: String,
        workloads: Vec<(String, String, &'static str, &'static str)>,
        cells: Vec<Cell>,
        plot: Plot,
    ) -> Self {
        Self {
            machine,
            settings,
            workloads,
            cells,
            plot,
        }
    }

    fn unit(&self, key: &str) -> (&'static str, &'static str) {
        self.workloads
            .iter()
            .find(|w| w.0 == key)
            .map_or(("", ""), |w| (w.2, w.3))
    }

    fn rows(&self) -> Vec<Vec<String>> {
        self.cells
            .iter()
            .map(|c| {
                let key = c.workload.key();
                let (unit, rate_unit) = self.unit(&key);
                let mut note = format!("{unit}, {rate_unit}");
                for n in &c.notes {
                    let _ = write!(note, "; {n}");
                }
                vec![
                    key,
                    c.config.key().to_owned(),
                    format!("{:.0}", c.min()),
                    format!("{:.0}", c.median()),
                    format!("{:.0}", c.max()),
                    format!("{:.0}%", 100.0 * (c.max() - c.min()) / c.median()),
                    fmt_rate(median(&c.rate)),
                    format!("{:.0}%", median(&c.busy)),
                    fmt_ratio(&c.vs_netfilter),
                    fmt_ratio(&c.vs_limit),
                    note,
                ]
            })
            .collect()
    }

    fn cell(&self, workload: &str, config: Config) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.workload.key() == workload && c.config == config)
    }

    /// The goals of issue 7, next to the numbers (tracked, never asserted).
    pub fn goals(&self) -> Vec<String> {
        let mut goals = Vec::new();
        if let Some(c) = self.cell("dnat-1flow", Config::XdpForward) {
            if !c.vs_limit.is_empty() {
                let r = median(&c.vs_limit);
                goals.push(goal_line(
                    "two-arm XDP forwarding (xdp-forward, dnat-1flow) within 1.15x of the bare \
                     redirect forwarder's cost per packet",
                    format!("{r:.2}x"),
                    Some(r <= 1.15),
                ));
            }
        }
        if let Some(c) = self.cell("dnat-1flow", Config::XdpFib) {
            if !c.vs_limit.is_empty() {
                let r = median(&c.vs_limit);
                goals.push(goal_line(
                    "the same without the route cache (xdp-fib, dnat-1flow: a FIB lookup per \
                     packet, like the bare forwarder) against the bare forwarder",
                    format!("{r:.2}x"),
                    None,
                ));
            }
        }
        for (workload, config, text, want) in [
            (
                "dnat-one-arm",
                Config::XdpForward,
                "one-arm XDP_TX (xdp-forward, dnat-one-arm) at least 4x cheaper than netfilter NAT",
                4.0,
            ),
            (
                "new-flows",
                Config::XdpForward,
                "a new flow (xdp-forward) at least 3x cheaper than a new netfilter NAT flow",
                3.0,
            ),
            (
                "dnat-1flow",
                Config::XdpPass,
                "translating and passing to the kernel (xdp-pass, dnat-1flow) against netfilter",
                0.0,
            ),
        ] {
            if let Some(c) = self
                .cell(workload, config)
                .filter(|c| !c.vs_netfilter.is_empty())
            {
                let x = 1.0 / median(&c.vs_netfilter);
                let met = (want > 0.0).then_some(x >= want);
                goals.push(goal_line(text, format!("{x:.2}x cheaper"), met));
            }
        }
        // TCP bulk: bytes per NAT CPU-second at least netfilter's, i.e. a cost per megabyte at
        // most netfilter's. Through the hook built for it (TC keeps GSO/GRO on a veth), with
        // XDP forwarding beside it for the record.
        for (config, text, want) in [
            (
                Config::TcForward,
                "TCP bulk (tc-forward, tcp-iperf3): cost per MB at most netfilter's",
                Some(1.0),
            ),
            (
                Config::XdpForward,
                "TCP bulk through XDP forwarding (xdp-forward, tcp-iperf3) against netfilter",
                None,
            ),
        ] {
            if let Some(c) = self
                .cell("tcp-iperf3", config)
                .filter(|c| !c.vs_netfilter.is_empty())
            {
                let r = median(&c.vs_netfilter);
                goals.push(goal_line(
                    text,
                    format!("{r:.2}x netfilter's cost"),
                    want.map(|w| r <= w),
                ));
            }
        }
        goals
    }

    /// The terminal rendering.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        crate::bench_report::text_header(&mut out, &self.machine, &self.settings);
        let _ = writeln!(out, "\n{LEGEND}");
        crate::bench_report::text_table(&mut out, &HEADER, &self.rows());
        let _ = writeln!(out, "\nGoals (tracked, not asserted):");
        for g in self.goals() {
            let _ = writeln!(out, "  {g}");
        }
        out
    }

    /// The Markdown block between the topology markers; `svg` is the chart's file name next
    /// to the page.
    pub fn to_markdown(&self, svg: &str) -> String {
        let mut out = String::new();
        crate::bench_report::md_header(
            &mut out,
            "cargo xtask bench topology",
            &self.machine,
            &self.settings,
        );
        let _ = writeln!(out, "Workloads:\n");
        for (key, label, _, _) in &self.workloads {
            let _ = writeln!(out, "- `{key}`: {label}");
        }
        let _ = writeln!(out, "\n{LEGEND}\n");
        crate::bench_report::md_table(&mut out, &HEADER, &self.rows());
        let _ = writeln!(out, "\n![cost relative to netfilter]({svg})\n");
        let _ = writeln!(out, "Goals (tracked, not asserted):\n");
        for g in self.goals() {
            let _ = writeln!(out, "- {g}");
        }
        out
    }

    /// The chart: per workload, each configuration's median cost relative to netfilter's.
    pub fn to_svg(&self) -> String {
        let Plot { width, height } = self.plot;
        let (left, right, top, bottom) = (50.0, 10.0, 30.0, 60.0);
        let plot_w = width - left - right;
        let plot_h = height - top - bottom;
        // One colour per configuration, in `Config::ALL` order (the type keeps them in step).
        let colours: [&str; Config::ALL.len()] = [
            "#1b9e77", "#a6d854", "#66a61e", "#e7298a", "#d95f02", "#7570b3", "#999999",
        ];
        let groups: Vec<&(String, String, &str, &str)> = self.workloads.iter().collect();
        let ratio = |c: &Cell| (!c.vs_netfilter.is_empty()).then(|| median(&c.vs_netfilter));
        let top_value = self
            .cells
            .iter()
            .filter_map(ratio)
            .fold(1.0f64, f64::max)
            .min(3.0)
            .ceil();
        let y = |v: f64| top + plot_h * (1.0 - v.min(top_value) / top_value);
        let mut s = String::new();
        crate::bench_report::svg_open(
            &mut s,
            width,
            height,
            (left, 16.0),
            "Appliance CPU cost relative to netfilter NAT (median of per-repetition ratios; \
             lower is cheaper)",
        );
        let mut tick = 0.0;
        while tick <= top_value + 1e-9 {
            let ty = y(tick);
            let _ = writeln!(
                s,
                r##"<line x1="{left}" x2="{}" y1="{ty:.1}" y2="{ty:.1}" stroke="{}"/><text x="{}" y="{:.1}" text-anchor="end">{tick:.1}x</text>"##,
                width - right,
                if (tick - 1.0).abs() < 1e-9 {
                    "#d95f02"
                } else {
                    "#dddddd"
                },
                left - 4.0,
                ty + 4.0
            );
            tick += 0.5;
        }
        let group_w = plot_w / groups.len().max(1) as f64;
        let bar_w = group_w * 0.8 / Config::ALL.len() as f64;
        for (gi, (key, _, _, _)) in groups.iter().enumerate() {
            let gx = left + gi as f64 * group_w + group_w * 0.1;
            for (ci, config) in Config::ALL.iter().enumerate() {
                let Some(v) = self.cell(key, *config).and_then(ratio) else {
                    continue;
                };
                let x = gx + ci as f64 * bar_w;
                let _ = writeln!(
                    s,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{key} {}: {v:.2}x</title></rect>"#,
                    y(v),
                    bar_w * 0.9,
                    y(0.0) - y(v),
                    colours[ci],
                    config.key()
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{key}</text>"#,
                gx + group_w * 0.4,
                top + plot_h + 14.0
            );
        }
        for (ci, config) in Config::ALL.iter().enumerate() {
            let x = left + ci as f64 * 115.0;
            let ly = height - 18.0;
            let _ = writeln!(
                s,
                r#"<rect x="{x}" y="{:.1}" width="10" height="10" fill="{}"/><text x="{}" y="{ly:.1}">{}</text>"#,
                ly - 9.0,
                colours[ci],
                x + 14.0,
                config.key()
            );
        }
        let _ = writeln!(s, "</svg>");
        s
    }
}

/// Start of the generated topology block in `docs/benchmarks.md`.
pub const BEGIN_MARKER: &str = "<!-- BEGIN bench topology (generated by `cargo xtask bench topology`; replaced on every run) -->";
/// End of the generated topology block.
pub const END_MARKER: &str = "<!-- END bench topology -->";
/// The chart's file name, next to the page.
pub const SVG_NAME: &str = "benchmarks-topology.svg";

/// Writes the block into the page at `path` (which must have the markers) and the chart next
/// to it.
pub fn write_docs(path: &Path, report: &TopoReport) -> Result<()> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let new = splice_block(
        &text,
        BEGIN_MARKER,
        END_MARKER,
        &report.to_markdown(SVG_NAME),
    )
    .with_context(|| format!("in {}", path.display()))?;
    fs::write(path, new).with_context(|| format!("writing {}", path.display()))?;
    let svg = path.with_file_name(SVG_NAME);
    fs::write(&svg, report.to_svg()).with_context(|| format!("writing {}", svg.display()))
}
