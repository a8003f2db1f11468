//! Importing NAT rules written for other tools into this agent's config.
//!
//! An importer reads a foreign rule set and produces [`ImportedRule`]s (config entries still
//! without ids and names, each remembering the input line it came from) plus [`Finding`]s for
//! everything it could not translate exactly. [`finish`] then does the format-independent
//! part: it checks every rule with the agent's own validation, assigns ids and names, picks the
//! interfaces, checks the whole config the way `nat-agent check` does, and [`emit`] writes it
//! as a commented TOML file.
//!
//! The contract with the operator: every input rule is either in the output or reported with
//! its line number and the reason, never dropped silently; the output is a complete config
//! that `nat-agent check` accepts (unless a finding without a line says why not).

pub mod cli;
pub mod emit;
pub mod iptables;
mod naming;
mod verify;

use std::fmt;

use crate::config::{ConfigFile, DnatEntry, InterfaceEntry, SnatEntry};

/// How serious a [`Finding`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Information: something was skipped or assumed without changing what the rules do.
    Note,
    /// A rule was translated, but does not behave exactly as the input rule did.
    Warning,
    /// An input line was not translated; the output lacks it.
    NotTranslated,
}

impl Severity {
    /// How the report spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Note => "note",
            Severity::Warning => "warning",
            Severity::NotTranslated => "not translated",
        }
    }
}

/// One reported line (or, without a line, a remark about the whole input or output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// 1-based input line, when the finding concerns one.
    pub line: Option<usize>,
    /// How serious it is.
    pub severity: Severity,
    /// The reason, in words an operator can act on.
    pub message: String,
}

impl Finding {
    /// A finding about input line `line`.
    pub fn at(line: usize, severity: Severity, message: impl Into<String>) -> Self {
        Self {
            line: Some(line),
            severity,
            message: message.into(),
        }
    }

    /// A finding about the input or output as a whole.
    pub fn global(severity: Severity, message: impl Into<String>) -> Self {
        Self {
            line: None,
            severity,
            message: message.into(),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        write!(f, "{}: {}", self.severity.as_str(), self.message)
    }
}

/// A translated config entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// A `[[dnat]]` rule.
    Dnat(DnatEntry),
    /// A `[[snat]]` rule.
    Snat(SnatEntry),
}

/// One translated input rule with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedRule {
    /// 1-based input line.
    pub line: usize,
    /// The input line as written (trimmed), for the comment above the rule.
    pub text: String,
    /// The rule's own comment (`-m comment --comment`), a name candidate.
    pub comment: Option<String>,
    /// The inbound interface the input rule matched; the config cannot express it, so
    /// [`finish`] warns unless it is the only interface attached.
    pub in_interface: Option<String>,
    /// The entry; `id` and `name` are filled in by [`finish`].
    pub entry: Entry,
    /// Differences from the input rule, shown at the rule and on stderr.
    pub warnings: Vec<String>,
    /// Remarks for the comment above the rule only (e.g. why a comment was not the name).
    pub notes: Vec<String>,
}

impl ImportedRule {
    /// The interfaces the rule names (`-i`, then `-o`).
    fn interfaces(&self) -> impl Iterator<Item = &str> {
        let out = match &self.entry {
            Entry::Snat(e) => e.out_interface.as_deref(),
            Entry::Dnat(_) => None,
        };
        self.in_interface.as_deref().into_iter().chain(out)
    }
}

/// What an importer found, before [`finish`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Translation {
    /// Translated rules in input order (first match wins, as in the input).
    pub rules: Vec<ImportedRule>,
    /// Everything reported so far.
    pub findings: Vec<Finding>,
    /// Input lines read.
    pub lines: usize,
}

/// How [`finish`] completes a translation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Interfaces to attach to (`--interface`); when empty, those the rules name.
    pub interfaces: Vec<String>,
}

/// A finished import: the config to write and the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Imported {
    /// `[[interfaces]]`, in order.
    pub interfaces: Vec<String>,
    /// Rules with ids and names, in input order.
    pub rules: Vec<ImportedRule>,
    /// Every finding, in input line order (findings without a line last).
    pub findings: Vec<Finding>,
    /// Input lines read.
    pub lines: usize,
}

impl Imported {
    /// Whether any input line (or the config as a whole) was reported as not translated.
    pub fn is_partial(&self) -> bool {
        self.findings
            .iter()
            .any(|f| f.severity == Severity::NotTranslated)
    }

    /// Number of findings of `severity`.
    pub fn count(&self, severity: Severity) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == severity)
            .count()
    }

    /// Numbers of DNAT and SNAT rules translated.
    pub fn rule_counts(&self) -> (usize, usize) {
        let dnat = self
            .rules
            .iter()
            .filter(|r| matches!(r.entry, Entry::Dnat(_)))
            .count();
        (dnat, self.rules.len() - dnat)
    }

    /// The config the output file holds.
    pub fn config(&self) -> ConfigFile {
        config_of(&self.interfaces, &self.rules)
    }
}

/// The config for `interfaces` and `rules` (agent and conntrack sections at their defaults).
fn config_of(interfaces: &[String], rules: &[ImportedRule]) -> ConfigFile {
    let mut config = ConfigFile {
        interfaces: interfaces
            .iter()
            .map(|name| InterfaceEntry {
                name: name.clone(),
                hook: None,
                xdp_mode: Some("auto".into()),
                // The agent's default (the kernel forwards); an operator opts into XDP.
                forwarding: None,
            })
            .collect(),
        ..ConfigFile::default()
    };
    for rule in rules {
        match &rule.entry {
            Entry::Dnat(e) => config.dnat.push(e.clone()),
            Entry::Snat(e) => config.snat.push(e.clone()),
        }
    }
    config
}

/// Completes a translation: drops (and reports) rules the agent would refuse, assigns ids from
/// 1 and names, chooses the interfaces, warns about `-i` matches the config cannot keep, and
/// checks the whole config as `nat-agent check` would.
pub fn finish(translation: Translation, options: &Options) -> Imported {
    let Translation {
        rules,
        mut findings,
        lines,
    } = translation;

    // Rules the agent's validation refuses on their own are reported at their line rather than
    // left in the output to make `check` fail.
    let mut kept = Vec::new();
    for rule in rules {
        match verify::rule_problems(&rule.entry) {
            None => kept.push(rule),
            Some(problems) => findings.push(Finding::at(
                rule.line,
                Severity::NotTranslated,
                format!("the agent would refuse the translated rule: {problems}"),
            )),
        }
    }
    let mut rules = kept;
    naming::assign(&mut rules);

    let interfaces = choose_interfaces(&options.interfaces, &rules);
    for rule in &mut rules {
        if let Some(warning) = in_interface_warning(rule.in_interface.as_deref(), &interfaces) {
            rule.warnings.push(warning);
        }
    }
    for rule in &rules {
        for warning in &rule.warnings {
            findings.push(Finding::at(rule.line, Severity::Warning, warning.clone()));
        }
    }
    if interfaces.is_empty() {
        findings.push(Finding::global(
            Severity::NotTranslated,
            "no interface to attach to: the translated rules name none (-i/-o); pass \
             --interface NAME",
        ));
    }
    findings.extend(verify::config_problems(&config_of(&interfaces, &rules)));
    // Stable: findings of one line keep the order they were found in.
    findings.sort_by_key(|f| f.line.unwrap_or(usize::MAX));
    Imported {
        interfaces,
        rules,
        findings,
        lines,
    }
}

/// `--interface` names as given (without repeats), else those the rules name, in order of
/// first appearance.
fn choose_interfaces(explicit: &[String], rules: &[ImportedRule]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let named = rules.iter().flat_map(ImportedRule::interfaces);
    let candidates: Box<dyn Iterator<Item = &str>> = if explicit.is_empty() {
        Box::new(named)
    } else {
        Box::new(explicit.iter().map(String::as_str))
    };
    for name in candidates {
        if !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
    }
    out
}

/// Why a DNAT rule's `-i NAME` is not kept, unless NAME is the only interface attached (the
/// XDP program then sees nothing else, which is the same match).
fn in_interface_warning(in_interface: Option<&str>, interfaces: &[String]) -> Option<String> {
    let name = in_interface?;
    if interfaces.len() == 1 && interfaces[0] == name {
        return None;
    }
    let attached = interfaces.join(", ");
    Some(if interfaces.iter().any(|i| i == name) {
        format!(
            "-i {name} is not kept: the config has no inbound-interface match, so the rule \
             applies to packets arriving on every attached interface ({attached})"
        )
    } else {
        format!(
            "-i {name} is not kept and {name} is not among the interfaces ({attached}): the \
             rule applies to packets arriving on those instead"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dnat_rule(line: usize, in_interface: Option<&str>) -> ImportedRule {
        ImportedRule {
            line,
            text: String::new(),
            comment: None,
            in_interface: in_interface.map(str::to_string),
            entry: Entry::Dnat(DnatEntry {
                id: None,
                name: None,
                destination: Some(format!("198.18.100.{line}")),
                protocol: None,
                port: None,
                to_address: Some(format!("198.18.1.{line}")),
                to_port: None,
            }),
            warnings: vec![],
            notes: vec![],
        }
    }

    #[test]
    fn the_only_interface_keeps_an_in_interface_match_exact() {
        let t = Translation {
            rules: vec![dnat_rule(1, Some("eth0"))],
            findings: vec![],
            lines: 1,
        };
        let done = finish(t, &Options::default());
        assert_eq!(done.interfaces, ["eth0"]);
        assert!(done.findings.is_empty(), "{:?}", done.findings);
        assert!(!done.is_partial());
    }

    #[test]
    fn an_in_interface_among_several_is_a_warning() {
        let t = Translation {
            rules: vec![dnat_rule(1, Some("n0"))],
            findings: vec![],
            lines: 1,
        };
        let done = finish(
            t,
            &Options {
                interfaces: vec!["n0".into(), "n1".into(), "n0".into()],
            },
        );
        assert_eq!(done.interfaces, ["n0", "n1"]);
        assert_eq!(done.findings.len(), 1);
        assert_eq!(done.findings[0].severity, Severity::Warning);
        assert!(done.findings[0].message.contains("-i n0 is not kept"));
        assert!(!done.is_partial());
    }

    #[test]
    fn no_interface_at_all_is_reported() {
        let t = Translation {
            rules: vec![dnat_rule(3, None)],
            findings: vec![],
            lines: 3,
        };
        let done = finish(t, &Options::default());
        assert!(done.is_partial());
        assert!(done
            .findings
            .iter()
            .any(|f| f.line.is_none() && f.message.contains("--interface")));
    }

    #[test]
    fn rules_the_agent_refuses_are_reported_at_their_line() {
        let mut bad = dnat_rule(4, None);
        if let Entry::Dnat(e) = &mut bad.entry {
            e.to_address = Some("198.18.1.0/24".into());
        }
        let t = Translation {
            rules: vec![dnat_rule(2, None), bad],
            findings: vec![],
            lines: 4,
        };
        let done = finish(
            t,
            &Options {
                interfaces: vec!["eth0".into()],
            },
        );
        assert_eq!(done.rules.len(), 1);
        let f = &done.findings[0];
        assert_eq!(f.line, Some(4));
        assert_eq!(f.severity, Severity::NotTranslated);
        assert!(f.message.contains("to_address"), "{}", f.message);
        // Ids stay dense: the refused rule took none.
        assert!(matches!(&done.rules[0].entry, Entry::Dnat(e) if e.id == Some(1)));
    }
}
