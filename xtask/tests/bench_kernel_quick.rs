//! `cargo xtask bench kernel --quick` end to end, so the benchmark cannot rot: it loads the
//! real XDP object, fills tables, runs every configuration, prints the table and writes the
//! page and its chart. Needs root (BPF, a network namespace) and fails rather than skips
//! without it: a benchmark nobody runs is the one that breaks.

mod common;

use std::time::Duration;

/// Far above the ~20 s the quick pass takes, so only a hang trips it.
const TIMEOUT: Duration = Duration::from_secs(150);

/// Every row the quick pass must print, by key.
const ROWS: &[&str] = &[
    "parse-pass",
    "no-match",
    "dnat-forward",
    "dnat-reply",
    "dnat-forward-snat",
    "snat-orig",
    "snat-reply",
    "session-floor",
    "rule-floor",
    "parse-pass-1",
    "new-flow-10",
    "new-flow-50",
    "new-flow-90",
    "inserts-10",
    "inserts-50",
    "inserts-90",
    "1Ki/parse-pass",
    "1Ki/parse-pass-1",
    "1Ki/established",
    "1Ki/new-flow",
    "1Ki/inserts",
    "16Ki/parse-pass",
    "16Ki/parse-pass-1",
    "16Ki/established",
    "16Ki/new-flow",
    "16Ki/inserts",
];

/// Runs the quick pass; returns stdout, panicking with stderr on failure or timeout.
fn positive(field: &str, what: &str) -> f64 {
    let v: f64 = field
        .trim_end_matches(['x', '%'])
        .parse()
        .unwrap_or_else(|_| panic!("{what}: {field:?} is not a number"));
    assert!(v.is_finite() && v > 0.0, "{what}: {v} is not positive");
    v
}

#[test]
fn quick_pass_prints_every_row_with_positive_numbers_and_writes_the_page() {
    // A directory of its own: the chart is written next to the page.
    let dir = std::env::temp_dir().join(format!("xdpnat-bench-kernel-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let docs = dir.join("benchmarks.md");
    let stdout = common::run_quick("kernel", &docs, TIMEOUT);

    for key in ROWS {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("no row {key:?} in:\n{stdout}"));
        // row, min, median, max, spread, x base, +ns, what...
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() >= 8, "row {key:?} is short: {line}");
        let (min, median, max) = (
            positive(f[1], key),
            positive(f[2], key),
            positive(f[3], key),
        );
        assert!(min <= median && median <= max, "row {key:?}: {line}");
        if f[5] != "base" {
            positive(f[5], key);
            // Everything the NAT does, and every floor (one lookup, four inserts), costs more
            // than parsing alone.
            positive(f[6], key);
        }
    }
    for point in ["1Ki", "16Ki"] {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(point))
            .unwrap_or_else(|| panic!("no scale point {point:?} in:\n{stdout}"));
        let f: Vec<&str> = line.split_whitespace().collect();
        for (i, what) in [
            (1, "capacity"),
            (2, "sessions"),
            (4, "memory"),
            (5, "bytes/slot"),
        ] {
            positive(f[i], &format!("{point} {what}"));
        }
    }
    assert!(
        stdout.contains("Goals (tracked, not asserted):"),
        "{stdout}"
    );
    // The floors are reported beside the goals they bound.
    for needle in [
        "the least a stateful translation",
        "the least a stateless translation",
        "the four inserts alone against a whole new flow at 90% fill",
    ] {
        assert!(stdout.contains(needle), "no {needle:?} in:\n{stdout}");
    }

    let page = std::fs::read_to_string(&docs).expect("the page was written");
    let chart = std::fs::read_to_string(dir.join("benchmarks-kernel.svg")).expect("the chart");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"),
        "{chart}"
    );
    // One line per series through both scale points.
    assert_eq!(chart.matches("<polyline").count(), 4, "{chart}");
    for needle in [
        "## Method",
        "## Noise",
        "| new-flow-90 |",
        "| inserts-90 |",
        "| session-floor |",
        "benchmarks-kernel.svg",
        "| 16Ki/new-flow |",
    ] {
        assert!(page.contains(needle), "page lacks {needle:?}:\n{page}");
    }
}
