//! Ids and names for imported rules.
//!
//! Ids count from 1 in input order across DNAT and SNAT rules (they share one id space). A
//! rule's own comment becomes its name when it is a valid, unused name; otherwise the name is
//! derived from what the rule matches (`dnat-1-198.18.100.10-80`), so that metrics labels say
//! something without looking the id up.

use std::collections::HashSet;

use super::{Entry, ImportedRule};
use crate::config::PortSpec;

/// The longest name the config accepts.
const MAX_NAME_LEN: usize = 64;

/// Whether the config accepts `name` as a rule name (letters, digits, `-`, `_`, `.`).
pub(super) fn is_rule_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Fills in `id` and `name` of every rule, in order.
pub(super) fn assign(rules: &mut [ImportedRule]) {
    // Comments claim their names first, in input order, so a derived name can never take a
    // name a later rule's comment asks for.
    let mut taken = HashSet::new();
    let mut from_comment = vec![false; rules.len()];
    for (i, rule) in rules.iter_mut().enumerate() {
        match rule.comment.as_deref() {
            Some(c) if is_rule_name(c) && taken.insert(c.to_string()) => from_comment[i] = true,
            Some(c) if is_rule_name(c) => rule.notes.push(format!(
                "comment {c:?} names an earlier rule too; named after the match instead"
            )),
            Some(c) => rule.notes.push(format!(
                "comment {c:?} is not a valid rule name (1 to {MAX_NAME_LEN} letters, digits, \
                 '-', '_', '.'); named after the match instead"
            )),
            None => {}
        }
    }
    for (i, rule) in rules.iter_mut().enumerate() {
        let id = i as i64 + 1;
        let name = if from_comment[i] {
            rule.comment.clone().unwrap_or_default()
        } else {
            unique(derived_name(id, &rule.entry), &mut taken)
        };
        match &mut rule.entry {
            Entry::Dnat(e) => {
                e.id = Some(id);
                e.name = Some(name);
            }
            Entry::Snat(e) => {
                e.id = Some(id);
                e.name = Some(name);
            }
        }
    }
}

/// `base`, or `base-2`, `base-3`, ... when taken (only when a comment already took the
/// derived name). Bounded: there are fewer taken names than rules.
fn unique(base: String, taken: &mut HashSet<String>) -> String {
    let mut name = base.clone();
    let mut n = 2usize;
    while !taken.insert(name.clone()) {
        let suffix = format!("-{n}");
        let keep = base.len().min(MAX_NAME_LEN - suffix.len());
        name = format!("{}{suffix}", &base[..keep]);
        n += 1;
    }
    name
}

/// `dnat-ID-VIP[-PORT]` or `snat-ID-SOURCE-ACTION`, with `/` (not allowed in names) as `_`.
fn derived_name(id: i64, entry: &Entry) -> String {
    let name = match entry {
        Entry::Dnat(e) => {
            let mut name = format!("dnat-{id}-{}", e.destination.as_deref().unwrap_or("any"));
            match &e.port {
                Some(PortSpec::Number(p)) => name.push_str(&format!("-{p}")),
                Some(PortSpec::Text(p)) => name.push_str(&format!("-{p}")),
                None => {}
            }
            name
        }
        Entry::Snat(e) => {
            let action = if e.masquerade == Some(true) {
                "masquerade"
            } else if e.no_nat == Some(true) {
                "no-nat"
            } else {
                "snat"
            };
            format!(
                "snat-{id}-{}-{action}",
                e.source.as_deref().unwrap_or("any")
            )
        }
    };
    let name: String = name
        .chars()
        .map(|c| if c == '/' { '_' } else { c })
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    // Addresses and ports keep it far below the limit; cut anyway rather than trust that.
    name.chars().take(MAX_NAME_LEN).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DnatEntry, SnatEntry};

    fn dnat(dest: &str, port: Option<PortSpec>, comment: Option<&str>) -> ImportedRule {
        ImportedRule {
            line: 1,
            text: String::new(),
            comment: comment.map(str::to_string),
            in_interface: None,
            entry: Entry::Dnat(DnatEntry {
                id: None,
                name: None,
                destination: Some(dest.into()),
                protocol: None,
                port,
                to_address: None,
                to_port: None,
            }),
            warnings: vec![],
            notes: vec![],
        }
    }

    fn masquerade(source: &str) -> ImportedRule {
        ImportedRule {
            entry: Entry::Snat(SnatEntry {
                id: None,
                name: None,
                source: Some(source.into()),
                destination: None,
                protocol: None,
                out_interface: None,
                to_address: None,
                masquerade: Some(true),
                no_nat: None,
                port_range: None,
            }),
            ..dnat("x", None, None)
        }
    }

    fn names(rules: &[ImportedRule]) -> Vec<(i64, String)> {
        rules
            .iter()
            .map(|r| match &r.entry {
                Entry::Dnat(e) => (e.id.unwrap(), e.name.clone().unwrap()),
                Entry::Snat(e) => (e.id.unwrap(), e.name.clone().unwrap()),
            })
            .collect()
    }

    #[test]
    fn ids_count_from_one_and_names_follow_the_match() {
        let mut rules = vec![
            dnat("198.18.100.10", Some(PortSpec::Number(80)), None),
            dnat(
                "198.18.101.0/24",
                Some(PortSpec::Text("8000-8009".into())),
                None,
            ),
            masquerade("198.18.0.0/24"),
        ];
        assign(&mut rules);
        assert_eq!(
            names(&rules),
            [
                (1, "dnat-1-198.18.100.10-80".to_string()),
                (2, "dnat-2-198.18.101.0_24-8000-8009".to_string()),
                (3, "snat-3-198.18.0.0_24-masquerade".to_string()),
            ]
        );
    }

    #[test]
    fn valid_unused_comments_become_names() {
        let mut rules = vec![
            dnat("198.18.100.10", None, None),
            dnat("198.18.100.11", None, Some("web")),
            dnat("198.18.100.12", None, Some("has space")),
            // A comment that claims the name rule 1 would derive: the derived one moves.
            dnat("198.18.100.13", None, Some("dnat-1-198.18.100.10")),
        ];
        assign(&mut rules);
        let got = names(&rules);
        assert_eq!(got[0].1, "dnat-1-198.18.100.10-2");
        assert_eq!(got[1].1, "web");
        assert_eq!(got[2].1, "dnat-3-198.18.100.12");
        assert_eq!(got[3].1, "dnat-1-198.18.100.10");
        assert!(rules[2].notes[0].contains("not a valid rule name"));
    }

    #[test]
    fn a_repeated_comment_names_only_the_first_rule() {
        let mut rules = vec![
            dnat("198.18.100.10", None, Some("web")),
            dnat("198.18.100.11", None, Some("web")),
        ];
        assign(&mut rules);
        let got = names(&rules);
        assert_eq!(got[0].1, "web");
        assert_eq!(got[1].1, "dnat-2-198.18.100.11");
        assert!(rules[1].notes[0].contains("earlier rule"));
    }

    #[test]
    fn name_rule_matches_the_config() {
        assert!(is_rule_name("vip1-http_2.a"));
        assert!(!is_rule_name(""));
        assert!(!is_rule_name("a b"));
        assert!(!is_rule_name(&"a".repeat(65)));
        assert!(is_rule_name(&"a".repeat(64)));
    }
}
