//! `nat-agent rules ...` and `nat-agent status`: the rule and status routes of the local API,
//! rendered as tables or JSON.

use std::{fmt::Write as _, path::Path};

use hyper::Method;

use super::{parse, pretty, request, request_with_body, ClientError};
use crate::{
    config::{AddressList, ConfigFile, DnatEntry, PortSpec, SnatEntry},
    ruleset::{RuleDiff, RuleDocument, RuleKind, RuleRef},
    status::{ApplyReport, Status},
};

/// A rules command, with the rules already read from their file.
#[derive(Debug, Clone, PartialEq)]
pub enum RulesCommand {
    /// Show the rules in force.
    List,
    /// Add the one rule of a file.
    Add {
        /// The rule (a `[[dnat]]` or `[[snat]]` entry).
        rule: OneRule,
        /// Index among its table's rules.
        position: Option<usize>,
        /// Change options.
        options: ChangeOptions,
    },
    /// Replace the rule of the same name with the one rule of a file.
    Change {
        /// The rule's current name.
        name: String,
        /// Its new definition.
        rule: OneRule,
        /// Change options.
        options: ChangeOptions,
    },
    /// Delete a rule.
    Delete {
        /// Its table.
        kind: RuleKind,
        /// Its name.
        name: String,
        /// Change options.
        options: ChangeOptions,
    },
    /// Replace every rule with the rules of a config file.
    Replace {
        /// The new rules.
        rules: RuleDocument,
        /// Change options.
        options: ChangeOptions,
    },
    /// What replacing the rules with those of a config file would change.
    Diff {
        /// The rules to compare with those in force.
        rules: RuleDocument,
    },
}

/// Options every change takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChangeOptions {
    /// Report only.
    pub dry_run: bool,
    /// Refuse unless the rules in force are at this generation.
    pub generation: Option<u64>,
}

/// One rule read from a file.
#[derive(Debug, Clone, PartialEq)]
pub enum OneRule {
    /// A `[[dnat]]` entry.
    Dnat(DnatEntry),
    /// A `[[snat]]` entry.
    Snat(SnatEntry),
}

impl OneRule {
    /// The one rule of a TOML text holding exactly one `[[dnat]]` or `[[snat]]` entry.
    pub fn parse(file: &str, text: &str) -> Result<Self, String> {
        let config = ConfigFile::parse(file, text).map_err(|e| e.to_string())?;
        match (config.dnat.as_slice(), config.snat.as_slice()) {
            ([one], []) => Ok(OneRule::Dnat(one.clone())),
            ([], [one]) => Ok(OneRule::Snat(one.clone())),
            (d, s) => Err(format!(
                "{file}: holds {} [[dnat]] and {} [[snat]] entries; give exactly one rule",
                d.len(),
                s.len()
            )),
        }
    }

    fn kind(&self) -> RuleKind {
        match self {
            OneRule::Dnat(_) => RuleKind::Dnat,
            OneRule::Snat(_) => RuleKind::Snat,
        }
    }

    fn name(&self) -> Option<&str> {
        match self {
            OneRule::Dnat(e) => e.name.as_deref(),
            OneRule::Snat(e) => e.name.as_deref(),
        }
    }

    fn json(&self) -> Result<Vec<u8>, ClientError> {
        match self {
            OneRule::Dnat(e) => serde_json::to_vec(e),
            OneRule::Snat(e) => serde_json::to_vec(e),
        }
        .map_err(|e| ClientError::Other(format!("encoding the rule: {e}")))
    }
}

/// The rules of a config file (every other section is ignored), as a replacement.
pub fn rules_of_file(file: &str, text: &str) -> Result<RuleDocument, String> {
    let config = ConfigFile::parse(file, text).map_err(|e| e.to_string())?;
    Ok(RuleDocument {
        generation: None,
        dnat: config.dnat,
        snat: config.snat,
    })
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn query(options: &ChangeOptions, position: Option<usize>) -> String {
    let mut parts = Vec::new();
    if options.dry_run {
        parts.push("dry_run=true".to_string());
    }
    if let Some(g) = options.generation {
        parts.push(format!("generation={g}"));
    }
    if let Some(p) = position {
        parts.push(format!("position={p}"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// The request of a command: method, path with query, JSON body.
pub fn route(command: &RulesCommand) -> Result<(Method, String, Option<Vec<u8>>), ClientError> {
    let encode = |doc: &RuleDocument| {
        serde_json::to_vec(doc).map_err(|e| ClientError::Other(format!("encoding the rules: {e}")))
    };
    Ok(match command {
        RulesCommand::List => (Method::GET, "/v1/rules".into(), None),
        RulesCommand::Add {
            rule,
            position,
            options,
        } => (
            Method::POST,
            format!(
                "/v1/rules/{}{}",
                rule.kind().as_str(),
                query(options, *position)
            ),
            Some(rule.json()?),
        ),
        RulesCommand::Change {
            name,
            rule,
            options,
        } => (
            Method::PUT,
            format!(
                "/v1/rules/{}/{}{}",
                rule.kind().as_str(),
                percent_encode(name),
                query(options, None)
            ),
            Some(rule.json()?),
        ),
        RulesCommand::Delete {
            kind,
            name,
            options,
        } => (
            Method::DELETE,
            format!(
                "/v1/rules/{}/{}{}",
                kind.as_str(),
                percent_encode(name),
                query(options, None)
            ),
            None,
        ),
        RulesCommand::Replace { rules, options } => (
            Method::PUT,
            format!("/v1/rules{}", query(options, None)),
            Some(encode(rules)?),
        ),
        RulesCommand::Diff { rules } => (
            Method::PUT,
            "/v1/rules?dry_run=true".into(),
            Some(encode(rules)?),
        ),
    })
}

/// Runs a rules command against the agent at `socket` and returns what to print.
pub async fn run_rules(
    socket: &Path,
    command: &RulesCommand,
    json: bool,
) -> Result<String, ClientError> {
    if let RulesCommand::Add { rule, .. } = command {
        if rule.name().is_none() {
            return Err(ClientError::Other(
                "the rule has no name; every rule needs one".into(),
            ));
        }
    }
    let (method, path, body) = route(command)?;
    let answer = request_with_body(socket, method, &path, body).await?;
    if let RulesCommand::List = command {
        let doc: RuleDocument = parse(&answer)?;
        return if json {
            pretty(&doc)
        } else {
            Ok(render_rules(&doc))
        };
    }
    let report: ApplyReport = parse(&answer)?;
    if json {
        pretty(&report)
    } else {
        Ok(render_report(&report))
    }
}

/// Runs `status` against the agent at `socket`.
pub async fn run_status(socket: &Path, json: bool) -> Result<String, ClientError> {
    let answer = request(socket, Method::GET, "/v1/status").await?;
    let status: Status = parse(&answer)?;
    if json {
        pretty(&status)
    } else {
        Ok(render_status(&status))
    }
}

fn ports(p: &Option<PortSpec>) -> Option<String> {
    p.as_ref().map(|p| match p {
        PortSpec::Number(n) => n.to_string(),
        PortSpec::Text(t) => t.clone(),
    })
}

fn addresses(a: &AddressList) -> String {
    match a {
        AddressList::One(s) => s.clone(),
        AddressList::Many(v) => v.join(","),
    }
}

fn dnat_row(e: &DnatEntry) -> [String; 5] {
    let proto = e.protocol.clone().unwrap_or_else(|| "any".into());
    let dst = e.destination.clone().unwrap_or_default();
    let matched = match ports(&e.port) {
        Some(p) => format!("{proto} to {dst}:{p}"),
        None => format!("{proto} to {dst}"),
    };
    let to = e.to_address.clone().unwrap_or_default();
    let action = match ports(&e.to_port) {
        Some(p) => format!("dnat to {to}:{p}"),
        None => format!("dnat to {to}"),
    };
    [
        "dnat".into(),
        e.name.clone().unwrap_or_default(),
        e.id.map(|i| i.to_string()).unwrap_or_default(),
        matched,
        action,
    ]
}

fn snat_row(e: &SnatEntry) -> [String; 5] {
    let mut matched = format!(
        "{} from {} to {}",
        e.protocol.as_deref().unwrap_or("any"),
        e.source.as_deref().unwrap_or("?"),
        e.destination.as_deref().unwrap_or("any")
    );
    if let Some(out) = &e.out_interface {
        let _ = write!(matched, " out {out}");
    }
    let mut action = if e.no_nat == Some(true) {
        "no nat".to_string()
    } else if e.masquerade == Some(true) {
        "masquerade".to_string()
    } else {
        format!(
            "snat to {}",
            e.to_address.as_ref().map(addresses).unwrap_or_default()
        )
    };
    if let Some(p) = ports(&e.port_range) {
        let _ = write!(action, " ports {p}");
    }
    [
        "snat".into(),
        e.name.clone().unwrap_or_default(),
        e.id.map(|i| i.to_string()).unwrap_or_default(),
        matched,
        action,
    ]
}

/// The rules as a table, in priority order per table.
pub fn render_rules(doc: &RuleDocument) -> String {
    let mut rows = vec![[
        "KIND".to_string(),
        "NAME".into(),
        "ID".into(),
        "MATCH".into(),
        "ACTION".into(),
    ]];
    rows.extend(doc.dnat.iter().map(dnat_row));
    rows.extend(doc.snat.iter().map(snat_row));
    let mut widths = [0usize; 5];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    let _ = writeln!(
        out,
        "{} dnat and {} snat rules, generation {}",
        doc.dnat.len(),
        doc.snat.len(),
        doc.generation.unwrap_or(0)
    );
    out
}

fn list_refs(out: &mut String, mark: &str, refs: &[RuleRef], what: &str) {
    for r in refs {
        let _ = writeln!(out, "  {mark} {} {}{what}", r.kind.as_str(), r.name);
    }
}

/// What a change did, one line per rule.
pub fn render_report(report: &ApplyReport) -> String {
    let mut out = String::new();
    let RuleDiff {
        added,
        removed,
        changed,
        moved,
        unchanged,
    } = &report.changes;
    let head = if report.changes.is_empty() {
        format!("no change (generation {})", report.generation)
    } else if report.dry_run {
        format!(
            "dry run: nothing applied; the change would do (generation stays {}):",
            report.generation
        )
    } else {
        format!("applied: generation {}", report.generation)
    };
    let _ = writeln!(out, "{head}");
    list_refs(&mut out, "+", added, "");
    list_refs(&mut out, "-", removed, "");
    list_refs(&mut out, "~", changed, " (changed)");
    list_refs(&mut out, "^", moved, " (priority changed)");
    let _ = writeln!(out, "  {unchanged} rules unchanged");
    out
}

/// The status as a few lines.
pub fn render_status(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "agent       {} (up {:.0}s)",
        s.version, s.uptime_seconds
    );
    let _ = writeln!(out, "config      {}", s.config);
    let _ = writeln!(
        out,
        "rules       {} dnat, {} snat, generation {}",
        s.dnat_rules, s.snat_rules, s.generation
    );
    let ifaces: Vec<String> = s
        .interfaces
        .iter()
        .map(|i| format!("{} ({})", i.name, i.xdp_mode))
        .collect();
    let _ = writeln!(out, "interfaces  {}", ifaces.join(", "));
    match &s.sessions {
        Some(x) => {
            let _ = writeln!(out, "sessions    {} of {}", x.in_use, x.capacity);
        }
        None => {
            let _ = writeln!(out, "sessions    no connection tracking");
        }
    }
    if let Some(last) = &s.last_apply {
        let outcome = if last.applied { "applied" } else { "refused" };
        let _ = write!(out, "last change {outcome} ({})", last.source.as_str());
        if let Some(e) = &last.error {
            let _ = write!(out, ": {}", e.lines().next().unwrap_or_default());
        }
        let _ = writeln!(out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE_DNAT: &str = r#"
[[dnat]]
id = 5
name = "web"
destination = "198.18.100.10"
protocol = "tcp"
port = 80
to_address = "198.18.1.10"
to_port = 8080
"#;

    #[test]
    fn one_rule_files_must_hold_exactly_one_rule() {
        let rule = OneRule::parse("r.toml", ONE_DNAT).unwrap();
        assert_eq!(rule.kind(), RuleKind::Dnat);
        let two = format!("{ONE_DNAT}{}", ONE_DNAT.replace("web", "web2"));
        let err = OneRule::parse("r.toml", &two).unwrap_err();
        assert!(err.contains("2 [[dnat]]"), "{err}");
        assert!(OneRule::parse("r.toml", "").is_err());
    }

    #[test]
    fn routes_carry_kind_name_and_options() {
        let rule = OneRule::parse("r.toml", ONE_DNAT).unwrap();
        let options = ChangeOptions {
            dry_run: true,
            generation: Some(3),
        };
        let (m, p, body) = route(&RulesCommand::Add {
            rule: rule.clone(),
            position: Some(0),
            options,
        })
        .unwrap();
        assert_eq!(
            (m, p.as_str()),
            (
                Method::POST,
                "/v1/rules/dnat?dry_run=true&generation=3&position=0"
            )
        );
        let sent: DnatEntry = serde_json::from_slice(&body.unwrap()).unwrap();
        assert_eq!(sent.name.as_deref(), Some("web"));
        let (m, p, body) = route(&RulesCommand::Delete {
            kind: RuleKind::Snat,
            name: "a b".into(),
            options: ChangeOptions::default(),
        })
        .unwrap();
        assert_eq!(
            (m, p.as_str(), body),
            (Method::DELETE, "/v1/rules/snat/a%20b", None)
        );
    }

    #[test]
    fn the_table_shows_every_rule_and_the_generation() {
        let mut doc = rules_of_file("c.toml", ONE_DNAT).unwrap();
        doc.generation = Some(4);
        doc.snat.push(SnatEntry {
            id: Some(6),
            name: Some("out".into()),
            source: Some("198.18.0.0/24".into()),
            destination: None,
            protocol: None,
            out_interface: Some("eth1".into()),
            to_address: None,
            masquerade: Some(true),
            no_nat: None,
            port_range: None,
        });
        let table = render_rules(&doc);
        assert!(table.contains("tcp to 198.18.100.10:80"), "{table}");
        assert!(table.contains("dnat to 198.18.1.10:8080"), "{table}");
        assert!(table.contains("masquerade"), "{table}");
        assert!(
            table.ends_with("1 dnat and 1 snat rules, generation 4\n"),
            "{table}"
        );
    }
}
