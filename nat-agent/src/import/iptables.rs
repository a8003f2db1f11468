//! `iptables-save` output (the `*nat` table) to config entries.
//!
//! The document is read line by line: `*table` headers, `:CHAIN POLICY [P:B]` chain headers,
//! `-A CHAIN ...` rules (optionally after `[P:B]` counters from `iptables-save -c`), `COMMIT`,
//! `#` comments. Fragments without a `*nat` line (as blog posts and `iptables -t nat -S`
//! print them, with `-P`/`-N` lines) are read as the nat table, with a note. Tables other than
//! `*nat` are skipped with a note. Each rule line of the nat table is translated, or reported
//! with its line number and the reason; see [`translate`] for what maps onto what.

mod lex;
mod rule;
mod target;
mod translate;
mod values;

use std::collections::HashSet;

use super::{finish, Entry, Finding, Imported, ImportedRule, Options, Severity, Translation};
use translate::Outcome;

/// The nat table's built-in chains.
const BUILTIN_CHAINS: [&str; 4] = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];

/// Reads `text` and finishes the import (ids, names, interfaces, checks).
pub fn import(text: &str, options: &Options) -> Imported {
    finish(read(text), options)
}

/// Reads `text` into translated rules and findings, before [`finish`].
pub fn read(text: &str) -> Translation {
    let mut reader = Reader {
        table: Table::Implicit,
        implicit_noted: false,
        saw_nat: false,
        saw_other_table: false,
        user_chains: user_chains(text),
        out: Translation {
            lines: text.lines().count(),
            ..Translation::default()
        },
    };
    for (index, raw) in text.lines().enumerate() {
        reader.line(index + 1, raw.trim());
    }
    reader.finish()
}

/// Where in the document the reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    /// Before any `*table` line: a fragment, read as the nat table.
    Implicit,
    /// Inside `*nat`.
    Nat,
    /// Inside another table, skipped.
    Other,
    /// After `COMMIT`, before the next `*table`.
    Between,
}

struct Reader {
    table: Table,
    implicit_noted: bool,
    saw_nat: bool,
    saw_other_table: bool,
    user_chains: HashSet<String>,
    out: Translation,
}

impl Reader {
    fn report(&mut self, line: usize, severity: Severity, message: impl Into<String>) {
        self.out.findings.push(Finding::at(line, severity, message));
    }

    fn line(&mut self, line: usize, text: &str) {
        if text.is_empty() || text.starts_with('#') {
            return;
        }
        if let Some(name) = text.strip_prefix('*') {
            return self.table_header(line, name.trim());
        }
        if text == "COMMIT" {
            if self.table == Table::Between {
                self.report(line, Severity::Note, "COMMIT outside a table; ignored");
            }
            self.table = Table::Between;
            return;
        }
        match self.table {
            Table::Other => return,
            Table::Between => {
                return self.report(
                    line,
                    Severity::NotTranslated,
                    "outside any table (after COMMIT, before the next *table line)",
                )
            }
            Table::Implicit if !self.implicit_noted => {
                self.implicit_noted = true;
                self.report(
                    line,
                    Severity::Note,
                    "no *nat line before the rules: reading them as the nat table",
                );
            }
            Table::Implicit | Table::Nat => {}
        }
        if let Some(header) = text.strip_prefix(':') {
            return self.chain_header(line, header);
        }
        match lex::words(text) {
            Err(message) => self.report(line, Severity::NotTranslated, message),
            Ok(words) => self.command(line, text, &words),
        }
    }

    fn table_header(&mut self, line: usize, name: &str) {
        if name == "nat" {
            self.saw_nat = true;
            self.table = Table::Nat;
        } else {
            self.saw_other_table = true;
            self.table = Table::Other;
            self.report(
                line,
                Severity::Note,
                format!("table *{name} ignored: only the *nat table is imported"),
            );
        }
    }

    /// `:CHAIN POLICY [P:B]` (the `:` already stripped).
    fn chain_header(&mut self, line: usize, header: &str) {
        let words: Vec<&str> = header.split_whitespace().collect();
        let (name, policy, counters) = match words.as_slice() {
            [name, policy] => (*name, *policy, None),
            [name, policy, counters] => (*name, *policy, Some(*counters)),
            _ => {
                return self.report(
                    line,
                    Severity::NotTranslated,
                    "malformed chain header (expected `:CHAIN POLICY [PACKETS:BYTES]`)",
                )
            }
        };
        if counters.is_some_and(|c| !lex::is_counters(c)) {
            return self.report(
                line,
                Severity::NotTranslated,
                format!(
                    "malformed counters {:?} in the chain header (expected [PACKETS:BYTES])",
                    counters.unwrap_or_default()
                ),
            );
        }
        self.policy(line, name, policy);
    }

    /// A built-in chain's policy; anything but ACCEPT has no equivalent (the nat table does
    /// not filter). User-defined chains have the policy `-`.
    fn policy(&mut self, line: usize, chain: &str, policy: &str) {
        let builtin = BUILTIN_CHAINS.contains(&chain);
        if (builtin && policy != "ACCEPT") || (!builtin && policy != "-") {
            self.report(
                line,
                Severity::NotTranslated,
                format!("policy {policy} of chain {chain} cannot be expressed"),
            );
        }
    }

    fn command(&mut self, line: usize, text: &str, words: &[String]) {
        // `iptables-save -c` puts the rule's counters first.
        let words = match words.first() {
            Some(first) if lex::is_counters(first) => &words[1..],
            _ => words,
        };
        let Some(command) = words.first() else {
            return self.report(line, Severity::NotTranslated, "counters without a rule");
        };
        match command.as_str() {
            "-A" | "--append" => match words.get(1) {
                Some(chain) => self.rule(line, text, chain, &words[2..]),
                None => self.report(line, Severity::NotTranslated, "-A needs a chain"),
            },
            // `iptables -t nat -S` style: a policy, a chain declaration.
            "-P" | "--policy" => match words {
                [_, chain, policy] => self.policy(line, chain, policy),
                _ => self.report(line, Severity::NotTranslated, "malformed -P line"),
            },
            "-N" | "--new-chain" if words.len() == 2 => {}
            other if other.contains("iptables") || other == "sudo" => self.report(
                line,
                Severity::NotTranslated,
                "an iptables command line, not iptables-save output; run the commands and \
                 feed `iptables-save -t nat` (or `iptables -t nat -S`) to the import",
            ),
            other => self.report(
                line,
                Severity::NotTranslated,
                format!(
                    "`{other}` is not an iptables-save line (expected -A CHAIN, :CHAIN, \
                     *TABLE or COMMIT)"
                ),
            ),
        }
    }

    fn rule(&mut self, line: usize, text: &str, chain: &str, words: &[String]) {
        let stage = match chain {
            "PREROUTING" => translate::prerouting,
            "POSTROUTING" => translate::postrouting,
            "OUTPUT" => {
                return self.report(
                    line,
                    Severity::NotTranslated,
                    "-A OUTPUT: NAT of the box's own outgoing traffic is not translated (only \
                     PREROUTING and POSTROUTING are imported)",
                )
            }
            "INPUT" => {
                return self.report(
                    line,
                    Severity::NotTranslated,
                    "-A INPUT: NAT of traffic to the box itself is not translated (only \
                     PREROUTING and POSTROUTING are imported)",
                )
            }
            other => {
                return self.report(
                    line,
                    Severity::NotTranslated,
                    format!(
                        "-A {other}: rules of user-defined chains are not imported (jumps are \
                         not followed; move them into PREROUTING or POSTROUTING)"
                    ),
                )
            }
        };
        let (rule, problems) = rule::parse(words);
        if !problems.is_empty() {
            return self.report(line, Severity::NotTranslated, problems.join("; "));
        }
        match stage(&rule, &self.user_chains) {
            Outcome::Translated(t) => self.out.rules.push(ImportedRule {
                line,
                text: text.to_string(),
                comment: rule.comment.clone(),
                in_interface: t.in_interface,
                entry: t.entry,
                warnings: t.warnings,
                notes: t.notes,
            }),
            Outcome::NoEffect(message) => self.report(line, Severity::Note, message),
            Outcome::Unsupported(reasons) => {
                self.report(line, Severity::NotTranslated, reasons.join("; "))
            }
        }
    }

    fn finish(mut self) -> Translation {
        if self.saw_other_table && !self.saw_nat && self.out.rules.is_empty() {
            self.out.findings.push(Finding::global(
                Severity::Note,
                "the input has no *nat table (run `iptables-save -t nat`)",
            ));
        }
        let defaults_ports = self.out.rules.iter().any(
            |r| matches!(&r.entry, Entry::Snat(e) if e.no_nat.is_none() && e.port_range.is_none()),
        );
        if defaults_ports {
            self.out.findings.push(Finding::global(
                Severity::Note,
                "SNAT/MASQUERADE rules without a port range get external ports 1024-65535 \
                 (iptables maps a source port below 1024 to one below 1024), and translate \
                 tcp, udp and icmp echo only (other protocols pass to the kernel untranslated)",
            ));
        }
        self.out
    }
}

/// User-defined chain names: declared (`:NAME -`, `-N NAME`) or appended to. Collected up
/// front so a jump reads as a jump even before its chain's declaration.
fn user_chains(text: &str) -> HashSet<String> {
    let mut chains = HashSet::new();
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        let name = match words.next() {
            Some(w) if w.starts_with(':') => Some(&w[1..]),
            Some("-N" | "--new-chain" | "-A" | "--append") => words.next(),
            Some(w) if lex::is_counters(w) => match words.next() {
                Some("-A" | "--append") => words.next(),
                _ => None,
            },
            _ => None,
        };
        if let Some(name) = name.filter(|n| !n.is_empty() && !BUILTIN_CHAINS.contains(n)) {
            chains.insert(name.to_string());
        }
    }
    chains
}

#[cfg(test)]
mod tests;
