//! `docs/metrics.md` against what the agent exports, and the dashboard and alert rules against
//! `docs/metrics.md`.
//!
//! The agent's metrics are rendered by the real `Metrics::render` from a `ScrapeView` that
//! exercises every family (DNAT and SNAT rules, conntrack with ports of every protocol, three
//! attachments in every mode). Then, family by family: it is documented, with the same type,
//! the same label names and, where the doc lists a label's values, the same values; and the doc
//! lists nothing the agent does not export. The `Reasons` section's examples must still be
//! reasons with the action the doc gives them (the list itself is `Reason::ALL`, not the doc).
//!
//! The PromQL in `deploy/grafana/xdp-nat-dashboard.json` and
//! `deploy/prometheus/xdp-nat-alerts.yml` may only name documented metrics (plus Prometheus's
//! own `up`). Their syntax is checked by promtool in `xtask/tests/prometheus_rules.rs`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use nat_agent::{
    dataplane::StatsSnapshot,
    gc::{PortUse, ProtoCounts},
    metrics::{ConntrackView, Metrics, RuleInfo, RuleKind, ScrapeView},
    model::{Hook, XdpMode},
    status::ApplyCounts,
};
use nat_common::{
    ipv4::proto,
    route_cache::RouteCacheResult,
    stats::{ForwardResult, Reason, RuleCounters},
};

/// Metric names the dashboard and alert rules may use without the agent exporting them.
const PROMETHEUS_OWN: &[&str] = &["up"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("nat-agent has a parent")
        .to_path_buf()
}

fn read(relative: &str) -> String {
    let path = workspace().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A family as the doc or the exposition describes it.
#[derive(Debug, Default, Clone, PartialEq)]
struct Family {
    kind: String,
    /// Label name -> values (empty: free-form, values not checked).
    labels: BTreeMap<String, BTreeSet<String>>,
}

/// The backticked spans of `s`, in order.
fn code_spans(s: &str) -> Vec<String> {
    s.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, span)| span.to_string())
        .collect()
}

/// The families table of docs/metrics.md: rows whose first cell is a backticked `xdpnat_` name.
fn documented_families(doc: &str) -> BTreeMap<String, Family> {
    let mut out = BTreeMap::new();
    for line in doc.lines().filter(|l| l.trim_start().starts_with('|')) {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').collect();
        let Some(name) = cells.first().map(|c| code_spans(c)) else {
            continue;
        };
        let [name] = name.as_slice() else { continue };
        if !name.starts_with("xdpnat_") {
            continue;
        }
        assert!(
            cells.len() >= 5,
            "docs/metrics.md: the row of {name} needs name, type, labels, meaning, source: {line}"
        );
        let mut labels = BTreeMap::new();
        for part in cells[2].split(';').filter(|p| !p.trim().is_empty()) {
            let spans = code_spans(part);
            let (label, values) = spans
                .split_first()
                .unwrap_or_else(|| panic!("docs/metrics.md: {name}: label without a name: {part}"));
            labels.insert(label.clone(), values.iter().cloned().collect());
        }
        let family = Family {
            kind: cells[1].trim().to_string(),
            labels,
        };
        assert!(
            out.insert(name.clone(), family).is_none(),
            "docs/metrics.md lists {name} twice"
        );
    }
    assert!(!out.is_empty(), "docs/metrics.md has no families table");
    out
}

/// Families of a Prometheus text exposition, with every label value seen.
fn exported_families(text: &str) -> BTreeMap<String, Family> {
    let mut out: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE line has a type");
            out.entry(name.to_string()).or_default().kind = kind.to_string();
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let series = line.rsplit_once(' ').expect("sample has a value").0;
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        let family = out
            .get_mut(name)
            .unwrap_or_else(|| panic!("sample of {name} before its TYPE line"));
        // Label values here never contain `,` or `"` (names, addresses, fixed words).
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let (label, value) = pair.split_once('=').expect("label=value");
            family
                .labels
                .entry(label.to_string())
                .or_default()
                .insert(value.trim_matches('"').to_string());
        }
    }
    out
}

/// A view in which every family has samples and every fixed label value appears.
fn representative_view() -> ScrapeView {
    let mut stats = StatsSnapshot {
        reasons: (1..=u64::from(Reason::COUNT)).collect(),
        forward: (1..=u64::from(ForwardResult::COUNT)).collect(),
        route_cache: (1..=u64::from(RouteCacheResult::COUNT)).collect(),
        ..Default::default()
    };
    for slot in [0, 1, 2] {
        stats.rules.insert(
            slot,
            RuleCounters {
                orig_packets: 10,
                orig_bytes: 1000,
                reply_packets: 9,
                reply_bytes: 900,
            },
        );
    }
    let rule = |name: &str, slot, kind| RuleInfo {
        name: name.into(),
        slot,
        kind,
    };
    let external = Ipv4Addr::new(203, 0, 113, 10);
    let ports = [proto::TCP, proto::UDP, proto::ICMP]
        .into_iter()
        .map(|protocol| PortUse {
            address: external,
            protocol,
            in_use: 100,
            capacity: 64_512,
        })
        .collect();
    ScrapeView {
        stats,
        rules: vec![
            rule("vip-http", 0, RuleKind::Dnat),
            rule("private-out", 1, RuleKind::Snat),
            rule("platform-exempt", 2, RuleKind::Snat),
        ],
        attachments: vec![
            ("eth0".into(), Hook::Xdp(XdpMode::Native)),
            ("eth1".into(), Hook::Xdp(XdpMode::Generic)),
            ("veth0".into(), Hook::Tc),
        ],
        generation: 3,
        applies: ApplyCounts::default().all(),
        events_dropped: Some(2),
        conntrack: Some(ConntrackView {
            sessions: 1234,
            capacity: 262_144,
            ports,
            expiries: ProtoCounts {
                tcp: 1,
                udp: 2,
                icmp: 3,
                other: 4,
            },
            gc_runs: 42,
            gc_last_duration: Duration::from_millis(12),
            filter_slots_in_use: 99,
        }),
    }
}

fn rendered() -> BTreeMap<String, Family> {
    let text = Metrics::new()
        .expect("registering metrics")
        .render(&representative_view())
        .expect("rendering metrics");
    exported_families(&text)
}

#[test]
fn every_exported_family_is_documented_and_nothing_else() {
    let doc = documented_families(&read("docs/metrics.md"));
    let exported = rendered();
    let mut problems = Vec::new();

    for (name, got) in &exported {
        let Some(want) = doc.get(name) else {
            problems.push(format!("{name} is exported but not in docs/metrics.md"));
            continue;
        };
        if want.kind != got.kind {
            problems.push(format!(
                "{name}: docs/metrics.md says {}, the agent exports a {}",
                want.kind, got.kind
            ));
        }
        let want_labels: BTreeSet<_> = want.labels.keys().collect();
        let got_labels: BTreeSet<_> = got.labels.keys().collect();
        if want_labels != got_labels {
            problems.push(format!(
                "{name}: docs/metrics.md has labels {want_labels:?}, the agent {got_labels:?}"
            ));
        }
        for (label, values) in &want.labels {
            let got_values = got.labels.get(label).cloned().unwrap_or_default();
            if !values.is_empty() && *values != got_values {
                problems.push(format!(
                    "{name}: label {label}: docs/metrics.md lists {values:?}, the agent \
                     exports {got_values:?}"
                ));
            }
        }
    }
    for name in doc.keys().filter(|n| !exported.contains_key(*n)) {
        problems.push(format!(
            "{name} is in docs/metrics.md but the agent does not export it"
        ));
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn every_reason_is_exported_and_the_doc_examples_are_reasons() {
    let exported = rendered();
    let packets = &exported["xdpnat_packets_total"];
    let names: BTreeSet<String> = Reason::ALL.iter().map(|r| r.name().to_string()).collect();
    assert_eq!(packets.labels["reason"], names, "one series per Reason");

    let doc = read("docs/metrics.md");
    let section = doc
        .split("<!-- reasons:begin -->")
        .nth(1)
        .and_then(|s| s.split("<!-- reasons:end -->").next())
        .expect("docs/metrics.md has a reasons:begin/end section");
    let mut seen = 0;
    for line in section.lines().filter(|l| l.starts_with("- `")) {
        let name = &code_spans(line)[0];
        let action = line
            .split_once('(')
            .and_then(|(_, rest)| rest.split_once(')'))
            .map(|(a, _)| a)
            .unwrap_or_else(|| panic!("docs/metrics.md: no (action) in {line}"));
        let reason = Reason::ALL
            .iter()
            .find(|r| r.name() == name)
            .unwrap_or_else(|| panic!("docs/metrics.md names reason {name}, not in Reason::ALL"));
        assert_eq!(
            reason.action().name(),
            action,
            "docs/metrics.md gives {name} the wrong action"
        );
        seen += 1;
    }
    assert!(seen > 0, "no reasons listed between the markers");
}

/// Metric names in a PromQL expression: identifiers outside label matchers, grouping lists,
/// ranges and strings that are not functions, keywords or aggregation modifiers.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
        // Aggregations may put `by (...)` between their name and their parenthesis.
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    // Blank out "..." strings and {...}, [...] contents first.
    let mut cleaned = String::with_capacity(expr.len());
    let mut closer = None;
    for c in expr.chars() {
        match (closer, c) {
            (None, '"') => closer = Some('"'),
            (None, '{') => closer = Some('}'),
            (None, '[') => closer = Some(']'),
            (Some(end), c) if c == end => {
                closer = None;
                cleaned.push(' ');
                continue;
            }
            _ => {}
        }
        cleaned.push(if closer.is_some() { ' ' } else { c });
    }
    let chars: Vec<char> = cleaned.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut skip_group = false;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() {
            // A number or a duration (0.8, 1e3, 5m): not a name.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == '$' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:$".contains(chars[i]))
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            let lower = word.to_ascii_lowercase();
            if matches!(
                lower.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            ) {
                // The label list that follows is not metric names.
                skip_group = next == Some(&'(');
            } else if next == Some(&'(') || KEYWORDS.contains(&lower.as_str()) {
                // A function or aggregation.
            } else if word.starts_with('$') {
                // A Grafana variable.
            } else {
                names.insert(word);
            }
            continue;
        }
        if c == '(' && skip_group {
            while i < chars.len() && chars[i] != ')' {
                i += 1;
            }
            skip_group = false;
        }
        i += 1;
    }
    names
}

fn check_names(what: &str, exprs: &[String], problems: &mut Vec<String>) {
    let doc = documented_families(&read("docs/metrics.md"));
    for expr in exprs {
        for name in metric_names(expr) {
            if !doc.contains_key(&name) && !PROMETHEUS_OWN.contains(&name.as_str()) {
                problems.push(format!(
                    "{what}: `{expr}` uses {name}, not in docs/metrics.md"
                ));
            }
        }
    }
}

#[test]
fn metric_name_extraction() {
    let names = metric_names(
        r#"sum by (instance, reason) (rate(xdpnat_packets_total{action="drop", reason!~"a|b"}[$__rate_interval])) / on (instance) group_left xdpnat_sessions_capacity > 0.8 and up == 1 offset 5m"#,
    );
    let want: BTreeSet<String> = ["xdpnat_packets_total", "xdpnat_sessions_capacity", "up"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(names, want);
}

/// Every `expr` in the dashboard (panel targets and template variable queries).
fn dashboard_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::Object(q)) => {
                        if let Some(serde_json::Value::String(s)) = q.get("query") {
                            out.push(s.clone());
                        }
                    }
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

#[test]
fn dashboard_parses_and_uses_documented_metrics_only() {
    let text = read("deploy/grafana/xdp-nat-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).expect("deploy/grafana/xdp-nat-dashboard.json is JSON");
    let inputs = dashboard["__inputs"]
        .as_array()
        .expect("the dashboard declares __inputs");
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "the dashboard needs a DS_PROMETHEUS Prometheus input"
    );
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 12, "only {} expressions", exprs.len());
    // Template variable queries, label_values(METRIC{...}, LABEL), are Grafana's, not PromQL:
    // only their metric is checked.
    let exprs: Vec<String> = exprs
        .into_iter()
        .map(|e| match e.strip_prefix("label_values(") {
            Some(args) => {
                let selector = args.split([',', ')']).next().unwrap_or(args);
                selector
                    .split('{')
                    .next()
                    .unwrap_or(selector)
                    .trim()
                    .to_string()
            }
            None => e,
        })
        .collect();
    let mut problems = Vec::new();
    check_names("dashboard", &exprs, &mut problems);
    // Every panel's data source is the input, never a hard-coded one.
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            continue;
        }
        if panel["datasource"]["uid"] != "${DS_PROMETHEUS}" {
            problems.push(format!(
                "panel {:?} does not use ${{DS_PROMETHEUS}}",
                panel["title"]
            ));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// The `expr:` values of a Prometheus rules file (one line, or a `|`/`>` block).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let Some(value) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let indent = line.len() - trimmed.len();
            let block: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            out.push(block.join(" "));
        } else {
            out.push(value.trim_matches('\'').to_string());
        }
    }
    out
}

#[test]
fn alert_rules_use_documented_metrics_only() {
    let mut problems = Vec::new();
    let rules = rule_exprs(&read("deploy/prometheus/xdp-nat-alerts.yml"));
    assert!(rules.len() >= 9, "only {} alert expressions", rules.len());
    check_names("alert rules", &rules, &mut problems);
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}
