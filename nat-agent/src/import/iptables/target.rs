//! A rule's target (`-j NAME`) and its options (`--to-destination`, `--to-source`,
//! `--to-ports`, `--to`, `--random`, `--random-fully`, `--persistent`).
//!
//! The options are collected while the rule is read and resolved against the target at the
//! end, since hand-written rules may give them before `-j`.

use ipnet::Ipv4Net;

use super::values::{self, NatRange};
use crate::model::PortRange;

/// `--random`, `--random-fully`, `--persistent`: port and address selection hints of the NAT
/// targets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct TargetFlags {
    /// `--random`.
    pub random: bool,
    /// `--random-fully`.
    pub random_fully: bool,
    /// `--persistent`.
    pub persistent: bool,
}

/// What a rule does (`-j`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    /// `-j DNAT --to-destination RANGE`.
    Dnat(NatRange, TargetFlags),
    /// `-j SNAT --to-source RANGE`.
    Snat(NatRange, TargetFlags),
    /// `-j MASQUERADE [--to-ports P[-Q]]`.
    Masquerade(Option<PortRange>, TargetFlags),
    /// `-j NETMAP --to PREFIX`.
    Netmap(Ipv4Net),
    /// `-j ACCEPT`.
    Accept,
    /// `-j RETURN`.
    Return,
    /// Any other target or a user-defined chain.
    Other(String),
}

/// The target options of a rule, as given.
#[derive(Debug, Default)]
pub(super) struct TargetOptions {
    /// `--to-destination` values.
    pub to_destination: Vec<String>,
    /// `--to-source` values.
    pub to_source: Vec<String>,
    /// `--to-ports` values.
    pub to_ports: Vec<String>,
    /// `--to` values (NETMAP).
    pub to: Vec<String>,
    /// The flags.
    pub flags: TargetFlags,
}

/// Targets whose own options the parser does not know (the translation reports the target).
pub(super) fn is_unsupported(name: &str) -> bool {
    !matches!(
        name,
        "DNAT" | "SNAT" | "MASQUERADE" | "NETMAP" | "ACCEPT" | "RETURN"
    )
}

impl TargetOptions {
    fn any_given(&self) -> bool {
        !(self.to_destination.is_empty()
            && self.to_source.is_empty()
            && self.to_ports.is_empty()
            && self.to.is_empty())
            || self.flags != TargetFlags::default()
    }

    /// The target `-j name` with these options; `None` (with the problems pushed) when there
    /// is no target or its options are wrong.
    pub(super) fn resolve(self, name: Option<&str>, problems: &mut Vec<String>) -> Option<Target> {
        let Some(name) = name else {
            if self.any_given() {
                problems.push("target options without a -j target".into());
            }
            return None;
        };
        self.check_belonging(name, problems);
        let flags = self.flags;
        match name {
            "DNAT" => one("--to-destination", &self.to_destination, problems)
                .and_then(|v| nat_range("--to-destination", v, problems))
                .map(|r| Target::Dnat(r, flags)),
            "SNAT" => one("--to-source", &self.to_source, problems)
                .and_then(|v| nat_range("--to-source", v, problems))
                .map(|r| Target::Snat(r, flags)),
            "MASQUERADE" => match self.to_ports.as_slice() {
                [] => Some(Target::Masquerade(None, flags)),
                [ports] => values::nat_ports(ports)
                    .map_err(|m| problems.push(format!("--to-ports: {m}")))
                    .ok()
                    .map(|p| Target::Masquerade(Some(p), flags)),
                _ => {
                    problems.push("--to-ports is given twice".into());
                    None
                }
            },
            "NETMAP" => one("--to", &self.to, problems).and_then(|v| {
                values::prefix(v)
                    .map_err(|m| problems.push(format!("--to: {m}")))
                    .ok()
                    .map(Target::Netmap)
            }),
            "ACCEPT" => Some(Target::Accept),
            "RETURN" => Some(Target::Return),
            other => Some(Target::Other(other.to_string())),
        }
    }

    /// Reports options given to a known target they do not belong to. Unknown targets'
    /// options are not judged: the target itself is reported.
    fn check_belonging(&self, name: &str, problems: &mut Vec<String>) {
        let belongs: &[&str] = match name {
            "DNAT" => &["--to-destination", "--random", "--persistent"],
            "SNAT" => &["--to-source", "--random", "--random-fully", "--persistent"],
            "MASQUERADE" => &["--to-ports", "--random", "--random-fully"],
            "NETMAP" => &["--to"],
            _ => &[],
        };
        for (option, given) in [
            ("--to-destination", !self.to_destination.is_empty()),
            ("--to-source", !self.to_source.is_empty()),
            ("--to-ports", !self.to_ports.is_empty()),
            ("--to", !self.to.is_empty()),
            ("--random", self.flags.random),
            ("--random-fully", self.flags.random_fully),
            ("--persistent", self.flags.persistent),
        ] {
            if given && !belongs.contains(&option) && !is_unsupported(name) {
                problems.push(format!("{option} does not belong to -j {name}"));
            }
        }
    }
}

/// The one value of a required target option.
fn one<'v>(option: &str, values: &'v [String], problems: &mut Vec<String>) -> Option<&'v str> {
    match values {
        [one] => Some(one),
        [] => {
            problems.push(format!("{option} is missing"));
            None
        }
        _ => {
            problems.push(format!(
                "{option} is given {} times; only one range is supported",
                values.len()
            ));
            None
        }
    }
}

fn nat_range(option: &str, value: &str, problems: &mut Vec<String>) -> Option<NatRange> {
    NatRange::parse(value)
        .map_err(|m| problems.push(format!("{option}: {m}")))
        .ok()
}
