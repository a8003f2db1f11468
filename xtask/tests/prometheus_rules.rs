//! The Prometheus alert rules and the dashboard's queries, checked by promtool:
//! `promtool check rules` (syntax, PromQL, templates), `promtool test rules` (the unit tests
//! beside the rules: each alert fires and stays quiet where it should), and every PromQL
//! expression of the Grafana dashboard parsed by promtool as a recording rule.
//!
//! promtool is Debian's (package `prometheus`), unpacked into .tools/bin by
//! scripts/bootstrap.sh without installing the server; the test fails, never skips, without it.
//! Which metric names the rules and the dashboard may use is checked against docs/metrics.md by
//! `nat-agent/tests/metrics_doc.rs`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .to_path_buf()
}

/// .tools/bin/promtool (bootstrap), else one in PATH.
fn promtool() -> PathBuf {
    let local = workspace().join(".tools/bin/promtool");
    if local.is_file() {
        return local;
    }
    nat_lab::tools::find_tool("promtool").unwrap_or_else(|| {
        panic!(
            "promtool not found (neither {} nor in PATH): run scripts/bootstrap.sh as root, \
             which unpacks it from Debian's prometheus package",
            local.display()
        )
    })
}

/// Runs promtool with `args` in `dir`; panics with its output unless it succeeds.
fn promtool_ok(dir: &Path, args: &[&str]) -> String {
    let output = Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running promtool: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool {} failed:\n{text}",
        args.join(" ")
    );
    text
}

#[test]
fn alert_rules_pass_promtool_check() {
    let dir = workspace().join("deploy/prometheus");
    let out = promtool_ok(&dir, &["check", "rules", "xdp-nat-alerts.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    let dir = workspace().join("deploy/prometheus");
    let out = promtool_ok(&dir, &["test", "rules", "xdp-nat-alerts.test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
    // Every alert in the rules file has at least one firing and one quiet case.
    let rules = fs::read_to_string(dir.join("xdp-nat-alerts.yml")).unwrap();
    let tests = fs::read_to_string(dir.join("xdp-nat-alerts.test.yml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 9, "only {} alerts", alerts.len());
    for alert in alerts {
        let cases: Vec<&str> = tests
            .split("alertname: ")
            .skip(1)
            .filter(|case| case.starts_with(&format!("{alert}\n")))
            .collect();
        assert!(
            cases.iter().any(|c| c.contains("exp_alerts: []")),
            "{alert}: no unit test where it stays quiet"
        );
        assert!(
            cases.iter().any(|c| c.contains("exp_labels:")),
            "{alert}: no unit test where it fires"
        );
    }
}

/// Every `expr` of the dashboard (template variable queries are Grafana's, not PromQL).
fn dashboard_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

#[test]
fn dashboard_queries_are_valid_promql() {
    let text = fs::read_to_string(workspace().join("deploy/grafana/xdp-nat-dashboard.json"))
        .expect("reading the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 12, "only {} queries", exprs.len());
    // Grafana's variables, replaced by what Grafana would put there.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h")
            .replace("$instance", ".*");
        assert!(
            !expr.contains('$'),
            "a Grafana variable this test does not know: {expr}"
        );
        let quoted = serde_json::to_string(&expr).unwrap();
        rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {quoted}\n"
        ));
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-promql");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("dashboard.rules.yml"), rules).unwrap();
    let out = promtool_ok(&dir, &["check", "rules", "dashboard.rules.yml"]);
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "{out}"
    );
}
