//! Checks imported rules with the agent's own validation and compiler, so that what the
//! importer writes is what `nat-agent check` accepts, and anything it would refuse is reported
//! at the input line instead.

use std::collections::BTreeMap;

use super::{Entry, Finding, Severity};
use crate::{
    compile,
    config::{ConfigFile, InterfaceEntry},
    model::{self, Problem},
};

/// The problems `nat-agent check` would have with `entry` alone, one string; `None` when it
/// accepts it. Id and name are placeholders here: they are assigned after this check, so that
/// refused rules take no id.
pub(super) fn rule_problems(entry: &Entry) -> Option<String> {
    let mut config = ConfigFile {
        // Any valid name: interfaces are checked with the whole config.
        interfaces: vec![InterfaceEntry {
            name: "lo".into(),
            hook: None,
            xdp_mode: None,
            forwarding: None,
        }],
        ..ConfigFile::default()
    };
    match entry.clone() {
        Entry::Dnat(mut e) => {
            e.id = Some(1);
            e.name = Some("imported".into());
            config.dnat.push(e);
        }
        Entry::Snat(mut e) => {
            e.id = Some(1);
            e.name = Some("imported".into());
            config.snat.push(e);
        }
    }
    let problems = check(&config);
    (!problems.is_empty()).then(|| {
        problems
            .iter()
            .map(describe_field)
            .collect::<Vec<_>>()
            .join("; ")
    })
}

/// What `nat-agent check` would say about the whole `config`, as findings without a line
/// (limits on rule counts, rules per prefix). A missing interface is reported by the caller
/// in importer terms, so the agent's own wording of it is left out.
pub(super) fn config_problems(config: &ConfigFile) -> Vec<Finding> {
    check(config)
        .into_iter()
        .filter(|p| !(p.place == "[[interfaces]]" && config.interfaces.is_empty()))
        .map(|p| {
            Finding::global(
                Severity::NotTranslated,
                format!(
                    "`nat-agent check` would refuse the output: {}: {}",
                    p.place,
                    describe_field(&p)
                ),
            )
        })
        .collect()
}

/// Validation, then compilation: exactly the steps of `nat-agent check`.
fn check(config: &ConfigFile) -> Vec<Problem> {
    match model::validate("import", config) {
        Err(e) => e.problems,
        Ok(model) => compile::compile(&model, &BTreeMap::new())
            .err()
            .unwrap_or_default(),
    }
}

fn describe_field(p: &Problem) -> String {
    match p.field {
        Some(field) => format!("field `{field}`: {}", p.message),
        None => p.message.clone(),
    }
}
