//! Compiles validated DNAT rules into the kernel's two longest-prefix-match tables.
//!
//! For every prefix that some rule names, the set holds that rule and every rule of a shorter
//! prefix covering it, in config order. A longest-prefix lookup then yields all rules that can
//! apply to the packet's address, and the kernel takes the first that matches protocol and
//! port: the same answer as walking the config top to bottom.

use std::collections::{BTreeMap, HashMap};

use ipnet::Ipv4Net;
use nat_common::rules::{
    NatRule, NatRuleSet, MAX_RULES_PER_SET, RULE_MATCH_PORT, RULE_REWRITE_PORT,
};

use crate::model::{DnatRule, PortRange, Problem};

/// The contents of `DNAT_FORWARD`, `DNAT_REVERSE` and the counter slot of every rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompiledDnat {
    /// Destination prefix -> rule set (VIP -> backend).
    pub forward: BTreeMap<Ipv4Net, NatRuleSet>,
    /// Backend source prefix -> rule set (backend -> VIP).
    pub reverse: BTreeMap<Ipv4Net, NatRuleSet>,
    /// Rule id -> `RULE_COUNTERS` slot.
    pub slots: BTreeMap<u32, u32>,
}

/// Compiles `rules`. Rule ids keep the counter slot they had in `previous` (so counters carry
/// on across reloads); new ids take the lowest free slots.
pub fn compile(
    rules: &[DnatRule],
    previous: &BTreeMap<u32, u32>,
) -> Result<CompiledDnat, Vec<Problem>> {
    let slots = assign_slots(rules, previous);
    let forward = build_sets(rules, |r| r.destination, |r| forward_rule(r, slots[&r.id]))?;
    let reverse = build_sets(rules, |r| r.to_address, |r| reverse_rule(r, slots[&r.id]))?;
    Ok(CompiledDnat {
        forward,
        reverse,
        slots,
    })
}

fn assign_slots(rules: &[DnatRule], previous: &BTreeMap<u32, u32>) -> BTreeMap<u32, u32> {
    let mut slots = BTreeMap::new();
    let mut used = std::collections::BTreeSet::new();
    for r in rules {
        if let Some(&slot) = previous.get(&r.id) {
            slots.insert(r.id, slot);
            used.insert(slot);
        }
    }
    let mut next = 0u32;
    for r in rules {
        if slots.contains_key(&r.id) {
            continue;
        }
        while used.contains(&next) {
            next += 1;
        }
        slots.insert(r.id, next);
        used.insert(next);
    }
    slots
}

fn mask_bytes(net: Ipv4Net) -> [u8; 4] {
    net.netmask().octets()
}

fn port_fields(matched: Option<PortRange>, written: Option<PortRange>) -> (u16, u16, u16, u8) {
    let mut flags = 0;
    let (min, max) = matched.map_or((0, 0), |p| {
        flags |= RULE_MATCH_PORT;
        (p.min, p.max)
    });
    let to_min = written.map_or(0, |p| {
        flags |= RULE_REWRITE_PORT;
        p.min
    });
    (min, max, to_min, flags)
}

/// VIP side -> backend side: match the destination, write the backend.
fn forward_rule(r: &DnatRule, slot: u32) -> NatRule {
    let (port_min, port_max, to_port_min, flags) = port_fields(r.port, r.to_port);
    NatRule {
        counter_index: slot,
        addr_mask: mask_bytes(r.destination),
        to_addr: r.to_address.network().octets(),
        port_min,
        port_max,
        to_port_min,
        proto: r.protocol.unwrap_or(0),
        flags,
    }
}

/// Backend side -> VIP side: match the reply's source, write the VIP back.
fn reverse_rule(r: &DnatRule, slot: u32) -> NatRule {
    let written_back = r.to_port.and(r.port);
    let (port_min, port_max, to_port_min, flags) = port_fields(r.backend_ports(), written_back);
    NatRule {
        counter_index: slot,
        addr_mask: mask_bytes(r.to_address),
        to_addr: r.destination.network().octets(),
        port_min,
        port_max,
        to_port_min,
        proto: r.protocol.unwrap_or(0),
        flags,
    }
}

/// Builds one trie's contents: for each distinct prefix, the rules whose prefix covers it.
fn build_sets(
    rules: &[DnatRule],
    prefix_of: impl Fn(&DnatRule) -> Ipv4Net,
    entry_of: impl Fn(&DnatRule) -> NatRule,
) -> Result<BTreeMap<Ipv4Net, NatRuleSet>, Vec<Problem>> {
    let mut sets: BTreeMap<Ipv4Net, NatRuleSet> = BTreeMap::new();
    let mut overfull: HashMap<Ipv4Net, usize> = HashMap::new();
    let prefixes: Vec<Ipv4Net> = rules.iter().map(&prefix_of).collect();
    for key in &prefixes {
        if sets.contains_key(key) {
            continue;
        }
        let mut set = NatRuleSet::default();
        let covering = rules.iter().filter(|r| prefix_of(r).contains(key));
        for (n, rule) in covering.enumerate() {
            if n < MAX_RULES_PER_SET {
                set.rules[n] = entry_of(rule);
                set.len = (n + 1) as u32;
            } else {
                *overfull.entry(*key).or_default() = n + 1;
            }
        }
        sets.insert(*key, set);
    }
    if overfull.is_empty() {
        return Ok(sets);
    }
    let mut problems: Vec<Problem> = overfull
        .into_iter()
        .map(|(prefix, n)| Problem {
            place: format!("prefix {prefix}"),
            field: None,
            message: format!(
                "{n} rules apply to addresses in this prefix; at most {MAX_RULES_PER_SET} can"
            ),
        })
        .collect();
    problems.sort_by(|a, b| a.place.cmp(&b.place));
    Err(problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nat_common::{ipv4::proto, rules::SetMatch};

    fn rule(id: u32, dst: &str, p: Option<(u16, u16)>, to: &str, to_port: Option<u16>) -> DnatRule {
        let port = p.map(|(min, max)| PortRange { min, max });
        DnatRule {
            id,
            name: format!("r{id}"),
            destination: dst.parse().unwrap(),
            protocol: p.map(|_| proto::TCP),
            port,
            to_address: to.parse().unwrap(),
            to_port: to_port.zip(port).map(|(t, p)| PortRange {
                min: t,
                max: t + (p.max - p.min),
            }),
        }
    }

    /// Simulates the kernel: longest prefix containing `addr`, then first match in its set.
    fn lookup(
        map: &BTreeMap<Ipv4Net, NatRuleSet>,
        addr: [u8; 4],
        port: Option<u16>,
    ) -> Option<NatRule> {
        let a = std::net::Ipv4Addr::from(addr);
        let (_, set) = map
            .iter()
            .filter(|(k, _)| k.contains(&a))
            .max_by_key(|(k, _)| k.prefix_len())?;
        match set.find(proto::TCP, port) {
            SetMatch::Rule(i) => Some(set.rules[i]),
            _ => None,
        }
    }

    #[test]
    fn covering_prefix_rules_are_inherited_in_order() {
        let rules = vec![
            rule(
                1,
                "198.18.100.10/32",
                Some((80, 80)),
                "198.18.1.2/32",
                Some(8080),
            ),
            rule(2, "198.18.100.0/24", None, "198.18.9.0/24", None),
        ];
        let c = compile(&rules, &BTreeMap::new()).unwrap();
        let hit = lookup(&c.forward, [198, 18, 100, 10], Some(80)).unwrap();
        assert_eq!(
            (hit.to_addr, hit.translate_port(80)),
            ([198, 18, 1, 2], 8080)
        );
        // Port 81 on the /32 falls through to the /24 NETMAP rule.
        let hit = lookup(&c.forward, [198, 18, 100, 10], Some(81)).unwrap();
        assert_eq!(hit.translate_addr([198, 18, 100, 10]), [198, 18, 9, 10]);
        assert_eq!(c.forward[&"198.18.100.10/32".parse().unwrap()].len, 2);
    }

    #[test]
    fn reverse_restores_vip_and_port() {
        let rules = vec![rule(
            7,
            "198.18.100.11/32",
            Some((22, 22)),
            "198.18.1.3/32",
            Some(80),
        )];
        let c = compile(&rules, &BTreeMap::new()).unwrap();
        let back = lookup(&c.reverse, [198, 18, 1, 3], Some(80)).unwrap();
        assert_eq!(back.translate_addr([198, 18, 1, 3]), [198, 18, 100, 11]);
        assert_eq!(back.translate_port(80), 22);
        assert!(lookup(&c.reverse, [198, 18, 1, 3], Some(81)).is_none());
    }

    #[test]
    fn slots_are_stable_across_recompiles() {
        let a = rule(1, "198.18.100.1/32", None, "198.18.1.1/32", None);
        let b = rule(2, "198.18.100.2/32", None, "198.18.1.2/32", None);
        let c = rule(3, "198.18.100.3/32", None, "198.18.1.3/32", None);
        let first = compile(&[a.clone(), b, c.clone()], &BTreeMap::new()).unwrap();
        let second = compile(&[c, a], &first.slots).unwrap();
        assert_eq!(second.slots[&1], first.slots[&1]);
        assert_eq!(second.slots[&3], first.slots[&3]);
    }

    #[test]
    fn too_many_rules_for_one_address_is_reported() {
        let rules: Vec<_> = (0..17u16)
            .map(|i| {
                rule(
                    u32::from(i) + 1,
                    "198.18.100.10/32",
                    Some((1000 + i, 1000 + i)),
                    &format!("198.18.1.{}/32", i + 1),
                    None,
                )
            })
            .collect();
        let err = compile(&rules, &BTreeMap::new()).unwrap_err();
        assert!(err[0].message.contains("17 rules"), "{err:?}");
    }
}
