//! Writes an [`Imported`] config as TOML, with comments that say where every rule came from.
//!
//! Written by hand rather than through serde so that each rule carries its input line and any
//! warning right above it; scalars are quoted by the `toml` crate, and the tests read the text
//! back to prove it is the same config.

use std::fmt::Write as _;

use super::{Entry, Imported, Severity};
use crate::config::{AddressList, DnatEntry, PortSpec, SnatEntry};

/// What the header says about the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The input format (`iptables-save`).
    pub format: &'static str,
    /// The file, or `standard input`.
    pub name: String,
}

/// The whole config file.
pub fn to_toml(imported: &Imported, source: &Source) -> String {
    let mut out = String::new();
    header(&mut out, imported, source);
    for name in &imported.interfaces {
        out.push_str("\n[[interfaces]]\n");
        field(&mut out, "name", &string(name));
        field(&mut out, "xdp_mode", &string("auto"));
    }
    for rule in &imported.rules {
        out.push('\n');
        comment(&mut out, &format!("line {}: {}", rule.line, rule.text));
        for warning in &rule.warnings {
            comment(&mut out, &format!("warning: {warning}"));
        }
        for note in &rule.notes {
            comment(&mut out, &format!("note: {note}"));
        }
        match &rule.entry {
            Entry::Dnat(e) => dnat(&mut out, e),
            Entry::Snat(e) => snat(&mut out, e),
        }
    }
    out
}

fn header(out: &mut String, imported: &Imported, source: &Source) {
    let (dnat, snat) = imported.rule_counts();
    comment(
        out,
        &format!(
            "xdp-nat config imported from {} output by `nat-agent import iptables` (nat-agent {}).",
            source.format,
            env!("CARGO_PKG_VERSION")
        ),
    );
    comment(
        out,
        &format!("Source: {} ({} lines).", source.name, imported.lines),
    );
    let not_translated = imported.count(Severity::NotTranslated);
    comment(
        out,
        &format!(
            "Translated: {dnat} dnat and {snat} snat rules, in input order (first match wins). \
             Not translated: {not_translated}. Warnings: {}.",
            imported.count(Severity::Warning)
        ),
    );
    for (title, severity) in [
        (
            "Not translated (the rules below do not include these):",
            Severity::NotTranslated,
        ),
        ("Notes:", Severity::Note),
    ] {
        let findings: Vec<_> = imported
            .findings
            .iter()
            .filter(|f| f.severity == severity)
            .collect();
        if findings.is_empty() {
            continue;
        }
        comment(out, "");
        comment(out, title);
        for f in findings {
            match f.line {
                Some(line) => comment(out, &format!("  line {line}: {}", f.message)),
                None => comment(out, &format!("  {}", f.message)),
            }
        }
    }
    comment(out, "");
    comment(
        out,
        "[agent] and [conntrack] are left at their defaults (see README.md, \"Config format\").",
    );
}

fn dnat(out: &mut String, e: &DnatEntry) {
    out.push_str("[[dnat]]\n");
    opt(out, "id", e.id.map(|v| v.to_string()));
    opt(out, "name", e.name.as_deref().map(string));
    opt(out, "destination", e.destination.as_deref().map(string));
    opt(out, "protocol", e.protocol.as_deref().map(string));
    opt(out, "port", e.port.as_ref().map(port));
    opt(out, "to_address", e.to_address.as_deref().map(string));
    opt(out, "to_port", e.to_port.as_ref().map(port));
}

fn snat(out: &mut String, e: &SnatEntry) {
    out.push_str("[[snat]]\n");
    opt(out, "id", e.id.map(|v| v.to_string()));
    opt(out, "name", e.name.as_deref().map(string));
    opt(out, "source", e.source.as_deref().map(string));
    opt(out, "destination", e.destination.as_deref().map(string));
    opt(out, "protocol", e.protocol.as_deref().map(string));
    opt(out, "out_interface", e.out_interface.as_deref().map(string));
    opt(out, "to_address", e.to_address.as_ref().map(addresses));
    opt(out, "masquerade", e.masquerade.map(|v| v.to_string()));
    opt(out, "no_nat", e.no_nat.map(|v| v.to_string()));
    opt(out, "port_range", e.port_range.as_ref().map(port));
}

fn opt(out: &mut String, key: &str, value: Option<String>) {
    if let Some(value) = value {
        field(out, key, &value);
    }
}

fn field(out: &mut String, key: &str, value: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "{key} = {value}");
}

/// A TOML basic string, quoted and escaped by the `toml` crate.
fn string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn port(p: &PortSpec) -> String {
    match p {
        PortSpec::Number(n) => n.to_string(),
        PortSpec::Text(s) => string(s),
    }
}

fn addresses(list: &AddressList) -> String {
    match list {
        AddressList::One(s) => string(s),
        AddressList::Many(v) => {
            let items: Vec<String> = v.iter().map(|s| string(s)).collect();
            format!("[{}]", items.join(", "))
        }
    }
}

/// A `# ...` line. TOML comments may not hold control characters (input lines can), so those
/// are written escaped; the comment can then never end early or make the file unreadable.
fn comment(out: &mut String, text: &str) {
    out.push('#');
    if !text.is_empty() {
        out.push(' ');
    }
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::ConfigFile,
        import::{Finding, ImportedRule},
    };

    fn imported() -> Imported {
        let rule = |line, entry| ImportedRule {
            line,
            text: format!("-A X line {line}\u{7}\r"),
            comment: None,
            in_interface: None,
            entry,
            warnings: vec!["differs \"a bit\"".into()],
            notes: vec![],
        };
        Imported {
            interfaces: vec!["n0".into(), "we\"ird".into()],
            rules: vec![
                rule(
                    3,
                    Entry::Dnat(DnatEntry {
                        id: Some(1),
                        name: Some("a".into()),
                        destination: Some("198.18.100.10".into()),
                        protocol: Some("tcp".into()),
                        port: Some(PortSpec::Text("8000-8009".into())),
                        to_address: Some("198.18.1.2".into()),
                        to_port: Some(PortSpec::Number(9000)),
                    }),
                ),
                rule(
                    4,
                    Entry::Snat(SnatEntry {
                        id: Some(2),
                        name: Some("b".into()),
                        source: Some("198.18.0.0/24".into()),
                        destination: Some("203.0.113.0/24".into()),
                        protocol: Some("udp".into()),
                        out_interface: Some("n1".into()),
                        to_address: Some(AddressList::Many(vec![
                            "203.0.113.1".into(),
                            "203.0.113.2".into(),
                        ])),
                        masquerade: None,
                        no_nat: None,
                        port_range: Some(PortSpec::Text("1024-2047".into())),
                    }),
                ),
            ],
            findings: vec![Finding::at(9, Severity::NotTranslated, "why\nnot")],
            lines: 10,
        }
    }

    #[test]
    fn output_reads_back_as_the_same_config() {
        let imported = imported();
        let text = to_toml(
            &imported,
            &Source {
                format: "iptables-save",
                name: "rules.txt".into(),
            },
        );
        let parsed = ConfigFile::parse("out.toml", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(parsed, imported.config(), "{text}");
        assert!(text.contains("#   line 9: why\\nnot\n"), "{text}");
        assert!(text.contains("# line 3: -A X line 3\\u{7}\\r\n"), "{text}");
        assert!(text.contains("# warning: differs \"a bit\"\n"), "{text}");
        assert!(text.contains("Source: rules.txt (10 lines)."), "{text}");
    }
}
