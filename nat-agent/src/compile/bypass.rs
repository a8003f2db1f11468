//! Compiles `[[bypass]]` entries into `BYPASS` (destination prefix -> the entries that can
//! apply to it). Entries without a destination sit at `0.0.0.0/0`, which covers every other
//! prefix, so they are in every set.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;
use nat_common::{
    bypass::{BypassEntry, BypassSet, BYPASS_MATCH_PORT, MAX_BYPASS_PER_SET},
    maps::MAX_BYPASS_PREFIXES,
};

use super::covering_sets;
use crate::model::{BypassRule, Problem};

fn entry_of(rule: &BypassRule) -> BypassEntry {
    BypassEntry {
        src_addr: rule.source.network().octets(),
        src_mask: rule.source.netmask().octets(),
        port_min: rule.ports.map_or(0, |p| p.min),
        port_max: rule.ports.map_or(0, |p| p.max),
        proto: rule.protocol.unwrap_or(0),
        flags: if rule.ports.is_some() {
            BYPASS_MATCH_PORT
        } else {
            0
        },
        _pad: [0; 2],
    }
}

/// The contents of one bank of `BYPASS`.
pub fn compile_bypass(rules: &[BypassRule]) -> Result<BTreeMap<Ipv4Net, BypassSet>, Vec<Problem>> {
    let mut sets = BTreeMap::new();
    let mut problems = Vec::new();
    let covering = covering_sets(rules, |r| r.destination);
    if covering.len() > MAX_BYPASS_PREFIXES as usize {
        problems.push(Problem {
            place: "[[bypass]]".into(),
            field: None,
            message: format!(
                "{} distinct destinations; at most {MAX_BYPASS_PREFIXES} are supported",
                covering.len()
            ),
        });
    }
    for (prefix, members) in covering {
        if members.len() > MAX_BYPASS_PER_SET {
            problems.push(Problem {
                place: format!("[[bypass]] destination {prefix}"),
                field: None,
                message: format!(
                    "{} bypass entries apply to addresses in this prefix (entries without a \
                     destination apply everywhere); at most {MAX_BYPASS_PER_SET} can",
                    members.len()
                ),
            });
            continue;
        }
        let mut set = BypassSet {
            len: members.len() as u32,
            ..Default::default()
        };
        for (slot, i) in members.into_iter().enumerate() {
            set.entries[slot] = entry_of(&rules[i]);
        }
        sets.insert(prefix, set);
    }
    if problems.is_empty() {
        Ok(sets)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PortRange;
    use nat_common::ipv4::proto;

    fn rule(
        source: &str,
        destination: &str,
        protocol: Option<u8>,
        ports: Option<PortRange>,
    ) -> BypassRule {
        BypassRule {
            place: "bypass".into(),
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
            protocol,
            ports,
        }
    }

    #[test]
    fn entries_without_destination_apply_under_every_prefix() {
        let probe = rule("168.63.129.16/32", "0.0.0.0/0", None, None);
        let ssh = rule(
            "0.0.0.0/0",
            "198.18.0.1/32",
            Some(proto::TCP),
            Some(PortRange { min: 22, max: 22 }),
        );
        let sets = compile_bypass(&[probe, ssh]).unwrap();
        assert_eq!(sets.len(), 2);
        let any = &sets[&"0.0.0.0/0".parse().unwrap()];
        assert_eq!(any.len, 1);
        assert!(any.matches([168, 63, 129, 16], proto::TCP, Some(80)));
        let host = &sets[&"198.18.0.1/32".parse().unwrap()];
        assert_eq!(host.len, 2);
        assert!(host.matches([198, 18, 0, 2], proto::TCP, Some(22)));
        assert!(host.matches([168, 63, 129, 16], proto::UDP, None));
        assert!(!host.matches([198, 18, 0, 2], proto::TCP, Some(80)));
    }

    #[test]
    fn too_many_entries_for_one_prefix_are_refused() {
        let rules: Vec<_> = (0..=MAX_BYPASS_PER_SET)
            .map(|i| rule(&format!("10.0.0.{i}/32"), "0.0.0.0/0", None, None))
            .collect();
        assert!(compile_bypass(&rules).is_err());
    }
}
