//! Rule changes as transactions on the desired state.
//!
//! The config file and the local API share one schema: the `[[dnat]]` and `[[snat]]` entries
//! of [`ConfigFile`] (TOML on disk, JSON over the API). A change (replace everything, or add,
//! change or delete one rule) is an edit of the running [`ConfigFile`]; the result is then
//! validated and compiled exactly like a file at start-up, and applied only if all of that
//! succeeds. This module holds the pure part: the edits, the check that a re-read file changes
//! nothing but rules, and the difference between two rule sets that dry runs report.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::{ConfigFile, DnatEntry, SnatEntry};

/// Which table a rule lives in (the `kind` label of the metrics, and the API's path segment).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum RuleKind {
    /// `[[dnat]]`.
    Dnat,
    /// `[[snat]]`.
    Snat,
}

impl RuleKind {
    /// The label value and path segment.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Dnat => "dnat",
            RuleKind::Snat => "snat",
        }
    }

    /// Parses a path segment.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "dnat" => Some(RuleKind::Dnat),
            "snat" => Some(RuleKind::Snat),
            _ => None,
        }
    }
}

/// The rules of the desired state: what `GET /v1/rules` answers and `PUT /v1/rules` takes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleDocument {
    /// In an answer: the generation of the rules in force. In a replacement: the generation
    /// the new rules were based on; if the rules changed since, the replacement is refused as
    /// stale. Absent: replace whatever is in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// Destination NAT rules, in priority order (first match wins).
    #[serde(default)]
    pub dnat: Vec<DnatEntry>,
    /// Source NAT rules, in priority order (first match wins).
    #[serde(default)]
    pub snat: Vec<SnatEntry>,
}

impl RuleDocument {
    /// The rules of `config` at `generation`.
    pub fn of(config: &ConfigFile, generation: u64) -> Self {
        RuleDocument {
            generation: Some(generation),
            dnat: config.dnat.clone(),
            snat: config.snat.clone(),
        }
    }
}

/// One rule of either kind.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleEntry {
    /// A `[[dnat]]` entry.
    Dnat(DnatEntry),
    /// A `[[snat]]` entry.
    Snat(SnatEntry),
}

impl RuleEntry {
    fn kind(&self) -> RuleKind {
        match self {
            RuleEntry::Dnat(_) => RuleKind::Dnat,
            RuleEntry::Snat(_) => RuleKind::Snat,
        }
    }

    fn name(&self) -> Option<&str> {
        match self {
            RuleEntry::Dnat(e) => e.name.as_deref(),
            RuleEntry::Snat(e) => e.name.as_deref(),
        }
    }
}

/// A change to the rules.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleChange {
    /// Replace every rule.
    Replace {
        /// The new DNAT rules.
        dnat: Vec<DnatEntry>,
        /// The new SNAT rules.
        snat: Vec<SnatEntry>,
    },
    /// Add one rule, at `position` among the rules of its kind (0: first, highest priority;
    /// `None`: last).
    Add {
        /// The rule.
        entry: RuleEntry,
        /// Where.
        position: Option<usize>,
    },
    /// Replace the rule named `name` (of the entry's kind) in place, keeping its priority.
    Update {
        /// The rule's current name.
        name: String,
        /// Its new definition (it may rename the rule).
        entry: RuleEntry,
    },
    /// Delete the rule `name` of `kind`.
    Delete {
        /// Which table.
        kind: RuleKind,
        /// Which rule.
        name: String,
    },
}

/// Why a change cannot even be formed (validation of the result comes later).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    /// The rule to change or delete does not exist (404).
    #[error("{kind} rule {name:?} does not exist", kind = .0.as_str(), name = .1)]
    NotFound(RuleKind, String),
    /// The rule to add exists already (409).
    #[error("{kind} rule {name:?} exists already; change it with PUT or delete it first", kind = .0.as_str(), name = .1)]
    Exists(RuleKind, String),
    /// The request itself is wrong (400).
    #[error("{0}")]
    Invalid(String),
}

/// The rules of `current` with `change` made; every other section stays as it is.
pub fn edit(current: &ConfigFile, change: RuleChange) -> Result<ConfigFile, EditError> {
    let mut next = current.clone();
    match change {
        RuleChange::Replace { dnat, snat } => {
            next.dnat = dnat;
            next.snat = snat;
        }
        RuleChange::Add { entry, position } => {
            let kind = entry.kind();
            let name = entry
                .name()
                .ok_or_else(|| {
                    EditError::Invalid(format!("the new {} rule has no name", kind.as_str()))
                })?
                .to_string();
            if index_of(&next, kind, &name).is_some() {
                return Err(EditError::Exists(kind, name));
            }
            let len = count(&next, kind);
            let at = position.unwrap_or(len);
            if at > len {
                return Err(EditError::Invalid(format!(
                    "position {at} is past the end: there are {len} {} rules",
                    kind.as_str()
                )));
            }
            match entry {
                RuleEntry::Dnat(e) => next.dnat.insert(at, e),
                RuleEntry::Snat(e) => next.snat.insert(at, e),
            }
        }
        RuleChange::Update { name, entry } => {
            let kind = entry.kind();
            let at = index_of(&next, kind, &name).ok_or(EditError::NotFound(kind, name))?;
            match entry {
                RuleEntry::Dnat(e) => next.dnat[at] = e,
                RuleEntry::Snat(e) => next.snat[at] = e,
            }
        }
        RuleChange::Delete { kind, name } => {
            let at = index_of(&next, kind, &name).ok_or(EditError::NotFound(kind, name))?;
            match kind {
                RuleKind::Dnat => {
                    next.dnat.remove(at);
                }
                RuleKind::Snat => {
                    next.snat.remove(at);
                }
            }
        }
    }
    Ok(next)
}

fn count(config: &ConfigFile, kind: RuleKind) -> usize {
    match kind {
        RuleKind::Dnat => config.dnat.len(),
        RuleKind::Snat => config.snat.len(),
    }
}

fn index_of(config: &ConfigFile, kind: RuleKind, name: &str) -> Option<usize> {
    match kind {
        RuleKind::Dnat => config
            .dnat
            .iter()
            .position(|e| e.name.as_deref() == Some(name)),
        RuleKind::Snat => config
            .snat
            .iter()
            .position(|e| e.name.as_deref() == Some(name)),
    }
}

/// The sections of a re-read file that differ from the running config, other than the rules:
/// those need a restart (they size maps, bind listeners or attach programs), so a reload that
/// changes them is refused as a whole.
pub fn restart_only_differences(running: &ConfigFile, file: &ConfigFile) -> Vec<&'static str> {
    let mut out = Vec::new();
    if running.agent != file.agent {
        out.push("[agent]");
    }
    if running.interfaces != file.interfaces {
        out.push("[[interfaces]]");
    }
    if running.conntrack != file.conntrack {
        out.push("[conntrack]");
    }
    if running.announce != file.announce {
        out.push("[announce]");
    }
    if running.events != file.events {
        out.push("[events]");
    }
    out
}

/// A rule named in a [`RuleDiff`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
pub struct RuleRef {
    /// Which table.
    pub kind: RuleKind,
    /// The rule's name.
    pub name: String,
}

/// What a change does to the rules, by rule name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RuleDiff {
    /// Rules that are new.
    pub added: Vec<RuleRef>,
    /// Rules that go away.
    pub removed: Vec<RuleRef>,
    /// Rules whose definition changes.
    pub changed: Vec<RuleRef>,
    /// Rules whose definition stays but whose priority (order among the rules that stay)
    /// changes.
    pub moved: Vec<RuleRef>,
    /// Rules that stay exactly as they are.
    pub unchanged: usize,
}

impl RuleDiff {
    /// Whether the change changes nothing.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.moved.is_empty()
    }
}

/// The difference between the rules of `old` and `new`.
pub fn diff(old: &ConfigFile, new: &ConfigFile) -> RuleDiff {
    let mut d = RuleDiff::default();
    diff_kind(
        RuleKind::Dnat,
        &old.dnat,
        &new.dnat,
        |e| e.name.as_deref(),
        &mut d,
    );
    diff_kind(
        RuleKind::Snat,
        &old.snat,
        &new.snat,
        |e| e.name.as_deref(),
        &mut d,
    );
    d
}

fn diff_kind<E: PartialEq>(
    kind: RuleKind,
    old: &[E],
    new: &[E],
    name: impl Fn(&E) -> Option<&str>,
    d: &mut RuleDiff,
) {
    let r = |n: &str| RuleRef {
        kind,
        name: n.to_string(),
    };
    // Unnamed entries cannot validate; they are ignored here and refused by validation.
    let old_by_name: BTreeMap<&str, &E> = old.iter().filter_map(|e| Some((name(e)?, e))).collect();
    let new_by_name: BTreeMap<&str, &E> = new.iter().filter_map(|e| Some((name(e)?, e))).collect();
    for (n, e) in &new_by_name {
        match old_by_name.get(n) {
            None => d.added.push(r(n)),
            Some(o) if o != e => d.changed.push(r(n)),
            Some(_) => {}
        }
    }
    for n in old_by_name.keys() {
        if !new_by_name.contains_key(n) {
            d.removed.push(r(n));
        }
    }
    // Priority: the order of the rules present on both sides.
    let kept = |list: &[E]| -> Vec<String> {
        list.iter()
            .filter_map(&name)
            .filter(|n| old_by_name.contains_key(n) && new_by_name.contains_key(n))
            .map(str::to_string)
            .collect()
    };
    let (before, after) = (kept(old), kept(new));
    for (i, n) in after.iter().enumerate() {
        if before.get(i) != Some(n) && !d.changed.iter().any(|c| c.kind == kind && &c.name == n) {
            d.moved.push(r(n));
        }
    }
    d.unchanged += after
        .iter()
        .enumerate()
        .filter(|(i, n)| {
            before.get(*i) == Some(*n) && old_by_name.get(n.as_str()) == new_by_name.get(n.as_str())
        })
        .count();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dnat(name: &str, to: &str) -> DnatEntry {
        DnatEntry {
            id: Some(1),
            name: Some(name.into()),
            destination: Some("198.18.100.10".into()),
            protocol: None,
            port: None,
            to_address: Some(to.into()),
            to_port: None,
        }
    }

    fn config(names: &[(&str, &str)]) -> ConfigFile {
        ConfigFile {
            dnat: names.iter().map(|(n, to)| dnat(n, to)).collect(),
            ..Default::default()
        }
    }

    fn refs(names: &[&str]) -> Vec<RuleRef> {
        names
            .iter()
            .map(|n| RuleRef {
                kind: RuleKind::Dnat,
                name: n.to_string(),
            })
            .collect()
    }

    #[test]
    fn add_update_delete_edit_only_the_named_rule() {
        let c = config(&[("a", "198.18.1.1"), ("b", "198.18.1.2")]);
        let added = edit(
            &c,
            RuleChange::Add {
                entry: RuleEntry::Dnat(dnat("c", "198.18.1.3")),
                position: Some(1),
            },
        )
        .unwrap();
        let names: Vec<_> = added.dnat.iter().map(|e| e.name.clone().unwrap()).collect();
        assert_eq!(names, ["a", "c", "b"]);

        let updated = edit(
            &added,
            RuleChange::Update {
                name: "b".into(),
                entry: RuleEntry::Dnat(dnat("b", "198.18.1.9")),
            },
        )
        .unwrap();
        assert_eq!(updated.dnat[2].to_address.as_deref(), Some("198.18.1.9"));
        assert_eq!(updated.dnat[..2], added.dnat[..2]);

        let deleted = edit(
            &updated,
            RuleChange::Delete {
                kind: RuleKind::Dnat,
                name: "a".into(),
            },
        )
        .unwrap();
        assert_eq!(deleted.dnat, updated.dnat[1..]);
    }

    #[test]
    fn edits_of_absent_or_existing_rules_are_refused() {
        let c = config(&[("a", "198.18.1.1")]);
        assert_eq!(
            edit(
                &c,
                RuleChange::Delete {
                    kind: RuleKind::Snat,
                    name: "a".into()
                }
            ),
            Err(EditError::NotFound(RuleKind::Snat, "a".into()))
        );
        assert_eq!(
            edit(
                &c,
                RuleChange::Add {
                    entry: RuleEntry::Dnat(dnat("a", "198.18.1.2")),
                    position: None
                }
            ),
            Err(EditError::Exists(RuleKind::Dnat, "a".into()))
        );
        assert!(matches!(
            edit(
                &c,
                RuleChange::Add {
                    entry: RuleEntry::Dnat(dnat("b", "198.18.1.2")),
                    position: Some(5)
                }
            ),
            Err(EditError::Invalid(_))
        ));
    }

    #[test]
    fn diff_names_added_removed_changed_and_moved_rules() {
        let old = config(&[
            ("a", "198.18.1.1"),
            ("b", "198.18.1.2"),
            ("c", "198.18.1.3"),
        ]);
        let new = config(&[
            ("c", "198.18.1.3"),
            ("a", "198.18.1.1"),
            ("d", "198.18.1.4"),
        ]);
        let d = diff(&old, &new);
        assert_eq!(d.added, refs(&["d"]));
        assert_eq!(d.removed, refs(&["b"]));
        assert!(d.changed.is_empty());
        assert_eq!(d.moved, refs(&["c", "a"]));
        assert_eq!(d.unchanged, 0);

        let same = diff(&old, &old);
        assert!(same.is_empty());
        assert_eq!(same.unchanged, 3);

        let changed = diff(
            &old,
            &config(&[
                ("a", "198.18.1.9"),
                ("b", "198.18.1.2"),
                ("c", "198.18.1.3"),
            ]),
        );
        assert_eq!(changed.changed, refs(&["a"]));
        assert!(changed.moved.is_empty());
        assert_eq!(changed.unchanged, 2);
    }

    #[test]
    fn only_rule_sections_may_differ_on_reload() {
        let running = config(&[("a", "198.18.1.1")]);
        let mut file = config(&[("b", "198.18.1.2")]);
        assert!(restart_only_differences(&running, &file).is_empty());
        file.conntrack.max_sessions = Some(1024);
        file.agent.metrics_listen = Some("127.0.0.1:1".into());
        assert_eq!(
            restart_only_differences(&running, &file),
            ["[agent]", "[conntrack]"]
        );
    }

    proptest! {
        /// Whatever the two rule lists, every rule of either side is accounted for exactly
        /// once, and a diff is empty exactly when the lists are equal.
        #[test]
        fn diff_accounts_for_every_rule(
            old in proptest::collection::btree_map("[a-e]", 0u8..3, 0..5),
            new in proptest::collection::btree_map("[a-e]", 0u8..3, 0..5),
            shuffle in any::<bool>(),
        ) {
            let build = |m: &BTreeMap<String, u8>, rev: bool| {
                let mut v: Vec<(String, String)> =
                    m.iter().map(|(n, t)| (n.clone(), format!("198.18.1.{t}"))).collect();
                if rev { v.reverse(); }
                ConfigFile {
                    dnat: v.iter().map(|(n, t)| dnat(n, t)).collect(),
                    ..Default::default()
                }
            };
            let (o, n) = (build(&old, false), build(&new, shuffle));
            let d = diff(&o, &n);
            let changed_or_moved: std::collections::BTreeSet<_> =
                d.changed.iter().chain(&d.moved).map(|r| r.name.clone()).collect();
            prop_assert_eq!(d.added.len() + changed_or_moved.len() + d.unchanged, new.len());
            prop_assert_eq!(d.removed.len() + changed_or_moved.len() + d.unchanged, old.len());
            prop_assert_eq!(d.is_empty(), o.dnat == n.dnat);
        }
    }
}
