//! nftables packet counters inside a namespace: the independent ground truth that the NAT's
//! own per-rule counters are checked against.
//!
//! Counters live in one table per namespace ([`LAB_TABLE`], family `inet`) with one base
//! chain per hook, policy accept: they count and never change a packet's fate. Note that
//! nothing in netfilter sees packets an XDP program redirects, so count on the client and
//! backend, not in the nat namespace.

use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::process::{run_in, run_output, DEFAULT_COMMAND_TIMEOUT};

/// The nftables table (family `inet`) holding the lab's counters.
pub const LAB_TABLE: &str = "xnl_lab";

/// The netfilter hook whose traffic a counter sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Packets for this namespace's own sockets.
    Input,
    /// Packets this namespace's sockets send.
    Output,
    /// Packets this namespace routes (kernel forwarding, not XDP redirects).
    Forward,
    /// Every packet arriving, before routing.
    Prerouting,
    /// Every packet leaving, after routing.
    Postrouting,
}

impl Hook {
    /// The hook's (and its chain's) name in nft syntax.
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Input => "input",
            Hook::Output => "output",
            Hook::Forward => "forward",
            Hook::Prerouting => "prerouting",
            Hook::Postrouting => "postrouting",
        }
    }
}

/// A counter's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CounterReading {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted (whole IP packets, as netfilter sees them).
    pub bytes: u64,
}

/// A named counter as `nft -j list counters` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedCounter {
    /// Address family of its table ("inet").
    pub family: String,
    /// Its table.
    pub table: String,
    /// Its name.
    pub name: String,
    /// Its value.
    pub value: CounterReading,
}

fn validate_counter_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = name.len() <= 64
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        bail!("invalid counter name {name:?}: use [A-Za-z_][A-Za-z0-9_]*, at most 64 chars");
    }
    Ok(())
}

/// The nft script that adds counter `name` and a rule feeding it at `hook`.
fn counter_script(name: &str, hook: Hook, match_expr: &str) -> String {
    let chain = hook.as_str();
    format!(
        "add table inet {LAB_TABLE}\n\
         add chain inet {LAB_TABLE} {chain} {{ type filter hook {chain} priority 0; policy accept; }}\n\
         add counter inet {LAB_TABLE} {name}\n\
         add rule inet {LAB_TABLE} {chain} {match_expr} counter name {name}\n"
    )
}

/// Creates counter `name` in namespace `ns`, counting packets at `hook` that match
/// `match_expr` (nft syntax, e.g. `ip daddr 198.18.100.10 tcp dport 80`; empty counts all).
/// Fails if the counter already exists, since a second rule would count packets twice.
pub fn install_counter(ns: &str, name: &str, hook: Hook, match_expr: &str) -> Result<()> {
    validate_counter_name(name)?;
    if match_expr.contains(['\n', '\r', ';']) {
        bail!("counter match {match_expr:?} must be a single nft expression (no newline or ';')");
    }
    if read_counters(ns)?
        .iter()
        .any(|c| c.table == LAB_TABLE && c.name == name)
    {
        bail!("counter {name} already exists in namespace {ns}");
    }
    let script = counter_script(name, hook, match_expr);
    // Passed as a file argument rather than stdin: run_output keeps stdin closed.
    let dir = std::env::temp_dir();
    let path = dir.join(format!("xnl-nft-{}-{ns}-{name}.nft", std::process::id()));
    std::fs::write(&path, &script).with_context(|| format!("cannot write {}", path.display()))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "nft", "-f"]).arg(&path);
    let result = run_output(&mut cmd, DEFAULT_COMMAND_TIMEOUT);
    let _ = std::fs::remove_file(&path);
    result.with_context(|| {
        format!("cannot install counter {name} ({hook:?}, {match_expr:?}) in namespace {ns}")
    })?;
    Ok(())
}

/// Every named counter in namespace `ns` (`nft -j list counters`).
pub fn read_counters(ns: &str) -> Result<Vec<NamedCounter>> {
    let json = run_in(ns, "nft", ["-j", "list", "counters"])
        .with_context(|| format!("cannot list nft counters in namespace {ns}"))?;
    parse_counters(&json).with_context(|| format!("parsing nft counters of namespace {ns}"))
}

/// The value of the lab counter `name` in namespace `ns`.
pub fn read_counter(ns: &str, name: &str) -> Result<CounterReading> {
    read_counters(ns)?
        .into_iter()
        .find(|c| c.table == LAB_TABLE && c.name == name)
        .map(|c| c.value)
        .with_context(|| format!("no counter {name} in table {LAB_TABLE} of namespace {ns}"))
}

/// Parses `nft -j list counters` output: `{"nftables": [{"metainfo": ..}, {"counter":
/// {"family", "name", "table", "handle", "packets", "bytes"}}, ..]}`.
pub fn parse_counters(json: &str) -> Result<Vec<NamedCounter>> {
    let doc: Value = serde_json::from_str(json).context("nft output is not JSON")?;
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .context("nft JSON has no \"nftables\" array")?;
    let mut counters = Vec::new();
    for counter in items.iter().filter_map(|item| item.get("counter")) {
        let text = |key: &str| -> Result<String> {
            counter
                .get(key)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .with_context(|| format!("counter without string {key:?}: {counter}"))
        };
        let number = |key: &str| -> Result<u64> {
            counter
                .get(key)
                .and_then(Value::as_u64)
                .with_context(|| format!("counter without number {key:?}: {counter}"))
        };
        counters.push(NamedCounter {
            family: text("family")?,
            table: text("table")?,
            name: text("name")?,
            value: CounterReading {
                packets: number("packets")?,
                bytes: number("bytes")?,
            },
        });
    }
    Ok(counters)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"counter": {"family": "inet", "name": "c1", "table": "xnl_lab", "handle": 2, "packets": 20, "bytes": 1200}}, {"counter": {"family": "ip", "name": "other", "table": "t", "handle": 3, "packets": 0, "bytes": 0}}]}"#;

    #[test]
    fn parses_nft_counters() {
        let counters = parse_counters(SAMPLE).unwrap();
        assert_eq!(counters.len(), 2);
        assert_eq!(counters[0].name, "c1");
        assert_eq!(counters[0].table, LAB_TABLE);
        assert_eq!(counters[0].family, "inet");
        assert_eq!(
            counters[0].value,
            CounterReading {
                packets: 20,
                bytes: 1200
            }
        );
        assert_eq!(counters[1].table, "t");
    }

    #[test]
    fn empty_ruleset_has_no_counters() {
        let json =
            r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}]}"#;
        assert!(parse_counters(json).unwrap().is_empty());
    }

    #[test]
    fn malformed_output_is_an_error() {
        for bad in [
            "",
            "not json",
            "{}",
            r#"{"nftables": {}}"#,
            r#"{"nftables": [{"counter": {"name": "x"}}]}"#,
            r#"{"nftables": [{"counter": {"family": "inet", "name": "c", "table": "t", "packets": -1, "bytes": 0}}]}"#,
        ] {
            assert!(parse_counters(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn script_adds_table_chain_counter_and_rule() {
        let s = counter_script("vip1", Hook::Output, "ip daddr 198.18.100.10 tcp dport 80");
        assert!(s.contains("add table inet xnl_lab\n"));
        assert!(s.contains(
            "add chain inet xnl_lab output { type filter hook output priority 0; policy accept; }"
        ));
        assert!(s.contains("add counter inet xnl_lab vip1\n"));
        assert!(s.contains(
            "add rule inet xnl_lab output ip daddr 198.18.100.10 tcp dport 80 counter name vip1\n"
        ));
    }

    #[test]
    fn counter_names_are_validated() {
        assert!(validate_counter_name("vip1_http").is_ok());
        for bad in ["", "1x", "a-b", "a b", "x;y", &"x".repeat(65)] {
            assert!(validate_counter_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn multi_statement_matches_are_refused() {
        let err = install_counter(
            "any",
            "c",
            Hook::Input,
            "ip daddr 198.18.100.10; flush ruleset",
        )
        .unwrap_err();
        assert!(err.to_string().contains("single nft expression"), "{err:#}");
    }
}
