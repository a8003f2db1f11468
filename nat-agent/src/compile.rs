//! Compiles the validated model into map contents: the DNAT longest-prefix-match tables, the
//! SNAT table and pools, and the counter slot of every rule.
//!
//! For every prefix that some rule names, the set holds that rule and every rule of a shorter
//! prefix covering it, in config order. A longest-prefix lookup then yields all rules that can
//! apply to the packet's address, and the kernel takes the first that matches protocol and
//! port: the same answer as walking the config top to bottom.

mod bypass;
pub mod cover;
pub mod snat;
mod stateful;

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use nat_common::maps::MAX_RULES;
use nat_common::prefilter::{BankFilters, FilterTable};
use nat_common::rules::{
    NatRule, NatRuleSet, MAX_RULES_PER_SET, RULE_MATCH_PORT, RULE_REWRITE_PORT, RULE_SNAT_CHECK,
    RULE_STATEFUL,
};

use crate::model::{DnatRule, Model, PortRange, Problem};

pub use snat::CompiledSnat;
pub use stateful::{stateful_rules, StatefulRule};

/// The contents of `DNAT_FORWARD` and `DNAT_REVERSE`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompiledDnat {
    /// Destination prefix -> rule set (VIP -> backend).
    pub forward: BTreeMap<Ipv4Net, NatRuleSet>,
    /// Backend source prefix -> rule set (backend -> VIP), stateless rules only.
    pub reverse: BTreeMap<Ipv4Net, NatRuleSet>,
}

/// Everything the agent writes into the kernel for one config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    /// The DNAT tries.
    pub dnat: CompiledDnat,
    /// The SNAT trie and pools (egress interfaces still by name).
    pub snat: CompiledSnat,
    /// Rule id (DNAT or SNAT) -> `RULE_COUNTERS` slot.
    pub slots: BTreeMap<u32, u32>,
    /// DNAT rules that get a session per flow because their replies are ambiguous, in config
    /// order.
    pub stateful: Vec<StatefulRule>,
    /// The bypass trie: destination prefix -> entries that can apply to it.
    pub bypass: BTreeMap<Ipv4Net, nat_common::bypass::BypassSet>,
}

impl Compiled {
    /// The prefilters of the rule tries this rule set fills (see `nat_common::prefilter`),
    /// written with them into the same bank.
    pub fn filters(&self) -> BankFilters {
        let mut filters = BankFilters::default();
        filters.tables[FilterTable::Bypass as usize] = cover::filter_of(self.bypass.keys());
        filters.tables[FilterTable::DnatForward as usize] =
            cover::filter_of(self.dnat.forward.keys());
        filters.tables[FilterTable::DnatReverse as usize] =
            cover::filter_of(self.dnat.reverse.keys());
        filters.tables[FilterTable::Snat as usize] = cover::filter_of(self.snat.sets.keys());
        filters
    }
}

/// Compiles `model`. Rule ids keep the counter slot they have in `history` (so counters carry
/// on across changes, and a rule deleted and added again continues its counters); new ids
/// take slots no rule has held yet, and only when none is left, slots of deleted rules. Keep
/// `history` with [`slot_history_after`].
pub fn compile(model: &Model, previous: &BTreeMap<u32, u32>) -> Result<Compiled, Vec<Problem>> {
    let ids: Vec<u32> = model
        .dnat
        .iter()
        .map(|r| r.id)
        .chain(model.snat.iter().map(|r| r.id))
        .collect();
    let slots = assign_slots(&ids, previous);
    let stateful = stateful_rules(&model.dnat);
    let stateful_ids: BTreeSet<u32> = stateful.iter().map(|r| r.id).collect();
    // DNAT + SNAT together (scenario 3) needs the kernel to look at the SNAT rules after a DNAT
    // hit; skip that lookup entirely when no SNAT rule could translate anything.
    let snat_check = model.snat.iter().any(|r| r.action.translates());
    let mut problems = Vec::new();
    let dnat = compile_dnat(&model.dnat, &slots, &stateful_ids, snat_check)
        .map_err(|p| problems.extend(p))
        .ok();
    let snat = snat::compile_snat(&model.snat, &slots)
        .map_err(|p| problems.extend(p))
        .ok();
    let bypass = bypass::compile_bypass(&model.bypass)
        .map_err(|p| problems.extend(p))
        .ok();
    match (dnat, snat, bypass) {
        (Some(dnat), Some(snat), Some(bypass)) if problems.is_empty() => Ok(Compiled {
            dnat,
            snat,
            slots,
            stateful,
            bypass,
        }),
        _ => Err(problems),
    }
}

fn assign_slots(ids: &[u32], history: &BTreeMap<u32, u32>) -> BTreeMap<u32, u32> {
    let mut slots = BTreeMap::new();
    let mut used = BTreeSet::new();
    for id in ids {
        if let Some(&slot) = history.get(id) {
            if used.insert(slot) {
                slots.insert(*id, slot);
            }
        }
    }
    // A slot a deleted rule held may still be counted into by that rule's sessions; a new
    // rule gets a slot nobody had, while there is one.
    let held: BTreeSet<u32> = history.values().copied().collect();
    let mut fresh = (0..MAX_RULES).filter(|s| !held.contains(s));
    let mut retired = held.iter().copied().filter(|s| !used.contains(s));
    for id in ids {
        if slots.contains_key(id) {
            continue;
        }
        // Validation caps the rules at MAX_RULES, so one of the two always has a slot left.
        if let Some(slot) = fresh.next().or_else(|| retired.next()) {
            slots.insert(*id, slot);
        }
    }
    slots
}

/// The slot history after `slots` came into force: every id's latest slot, minus ids whose
/// slot a newer rule took over.
pub fn slot_history_after(
    history: &BTreeMap<u32, u32>,
    slots: &BTreeMap<u32, u32>,
) -> BTreeMap<u32, u32> {
    let taken: BTreeSet<u32> = slots.values().copied().collect();
    let mut next: BTreeMap<u32, u32> = history
        .iter()
        .filter(|(id, slot)| !taken.contains(slot) || slots.get(id) == Some(slot))
        .map(|(id, slot)| (*id, *slot))
        .collect();
    next.extend(slots.iter().map(|(id, slot)| (*id, *slot)));
    next
}

/// The DNAT tries. Stateful rules are marked in the forward table and left out of the reverse
/// table: their replies are restored by sessions, and a stateless reverse entry would guess.
fn compile_dnat(
    rules: &[DnatRule],
    slots: &BTreeMap<u32, u32>,
    stateful: &BTreeSet<u32>,
    snat_check: bool,
) -> Result<CompiledDnat, Vec<Problem>> {
    let forward = build_dnat_sets(
        rules,
        |r| r.destination,
        |r| {
            let mut rule = forward_rule(r, slots[&r.id]);
            if stateful.contains(&r.id) {
                rule.flags |= RULE_STATEFUL;
            }
            if snat_check {
                rule.flags |= RULE_SNAT_CHECK;
            }
            rule
        },
    );
    let stateless: Vec<DnatRule> = rules
        .iter()
        .filter(|r| !stateful.contains(&r.id))
        .cloned()
        .collect();
    let reverse = build_dnat_sets(
        &stateless,
        |r| r.to_address,
        |r| reverse_rule(r, slots[&r.id]),
    );
    match (forward, reverse) {
        (Ok(forward), Ok(reverse)) => Ok(CompiledDnat { forward, reverse }),
        (forward, reverse) => {
            let mut problems = forward.err().unwrap_or_default();
            for p in reverse.err().unwrap_or_default() {
                if !problems.contains(&p) {
                    problems.push(p);
                }
            }
            Err(problems)
        }
    }
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

/// For each distinct prefix among `rules`, the positions of the rules whose prefix covers it,
/// in config order (shared by the DNAT and SNAT tries).
pub(crate) fn covering_sets<R>(
    rules: &[R],
    prefix_of: impl Fn(&R) -> Ipv4Net,
) -> BTreeMap<Ipv4Net, Vec<usize>> {
    let mut sets = BTreeMap::new();
    for rule in rules {
        let key = prefix_of(rule);
        sets.entry(key).or_insert_with(|| {
            rules
                .iter()
                .enumerate()
                .filter(|(_, r)| prefix_of(r).contains(&key))
                .map(|(i, _)| i)
                .collect()
        });
    }
    sets
}

/// Builds one DNAT trie's contents: for each distinct prefix, the rules whose prefix covers it.
fn build_dnat_sets(
    rules: &[DnatRule],
    prefix_of: impl Fn(&DnatRule) -> Ipv4Net,
    entry_of: impl Fn(&DnatRule) -> NatRule,
) -> Result<BTreeMap<Ipv4Net, NatRuleSet>, Vec<Problem>> {
    let mut sets = BTreeMap::new();
    let mut problems = Vec::new();
    for (prefix, members) in covering_sets(rules, prefix_of) {
        if members.len() > MAX_RULES_PER_SET {
            problems.push(Problem {
                place: format!("prefix {prefix}"),
                field: None,
                message: format!(
                    "{} rules apply to addresses in this prefix; at most {MAX_RULES_PER_SET} can",
                    members.len()
                ),
            });
            continue;
        }
        let mut set = NatRuleSet {
            len: members.len() as u32,
            ..Default::default()
        };
        for (slot, &i) in set.rules.iter_mut().zip(&members) {
            *slot = entry_of(&rules[i]);
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
    use crate::model::{Conntrack, SnatAction, SnatRule, DEFAULT_SNAT_PORTS};
    use nat_common::{ipv4::proto, rules::SetMatch};

    fn model(dnat: Vec<DnatRule>, snat: Vec<SnatRule>) -> Model {
        Model {
            metrics_listen: None,
            health_listen: None,
            api_socket: "/run/t.sock".into(),
            api_group: None,
            state_dir: None,
            announce_vips: false,
            route_cache: true,
            event_log: None,
            interfaces: Vec::new(),
            dnat,
            snat,
            bypass: Vec::new(),
            conntrack: Conntrack::default(),
        }
    }

    fn compile_dnat_only(
        rules: &[DnatRule],
        previous: &BTreeMap<u32, u32>,
    ) -> Result<Compiled, Vec<Problem>> {
        compile(&model(rules.to_vec(), Vec::new()), previous)
    }

    fn masquerade(id: u32, source: &str) -> SnatRule {
        SnatRule {
            id,
            name: format!("s{id}"),
            source: source.parse().unwrap(),
            destination: Ipv4Net::default(),
            protocol: None,
            out_interface: None,
            action: SnatAction::Masquerade {
                ports: DEFAULT_SNAT_PORTS,
            },
        }
    }

    #[test]
    fn prefilters_list_each_tries_prefixes() {
        let compiled = compile(
            &model(
                vec![rule(
                    1,
                    "203.0.113.10/32",
                    Some((80, 80)),
                    "198.18.1.10/32",
                    None,
                )],
                vec![masquerade(20, "198.18.64.0/18")],
            ),
            &BTreeMap::new(),
        )
        .unwrap();
        let filters = compiled.filters();
        let table = |t: FilterTable| filters.tables[t as usize];
        assert!(table(FilterTable::DnatForward).may_match([203, 0, 113, 10]));
        assert!(!table(FilterTable::DnatForward).may_match([203, 0, 113, 11]));
        // Reverse entries exist exactly for the stateless rule's backend.
        assert_eq!(
            table(FilterTable::DnatReverse).may_match([198, 18, 1, 10]),
            compiled
                .dnat
                .reverse
                .keys()
                .any(|p| p.contains(&"198.18.1.10".parse::<std::net::Ipv4Addr>().unwrap()))
        );
        assert!(table(FilterTable::Snat).may_match([198, 18, 100, 1]));
        assert!(!table(FilterTable::Snat).may_match([198, 51, 100, 1]));
        // No bypass entries: the bypass trie is never asked.
        assert!(!table(FilterTable::Bypass).may_match([198, 18, 100, 1]));
    }

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
        let c = compile_dnat_only(&rules, &BTreeMap::new()).unwrap();
        let hit = lookup(&c.dnat.forward, [198, 18, 100, 10], Some(80)).unwrap();
        assert_eq!(
            (hit.to_addr, hit.translate_port(80)),
            ([198, 18, 1, 2], 8080)
        );
        // Port 81 on the /32 falls through to the /24 NETMAP rule.
        let hit = lookup(&c.dnat.forward, [198, 18, 100, 10], Some(81)).unwrap();
        assert_eq!(hit.translate_addr([198, 18, 100, 10]), [198, 18, 9, 10]);
        assert_eq!(c.dnat.forward[&"198.18.100.10/32".parse().unwrap()].len, 2);
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
        let c = compile_dnat_only(&rules, &BTreeMap::new()).unwrap();
        let back = lookup(&c.dnat.reverse, [198, 18, 1, 3], Some(80)).unwrap();
        assert_eq!(back.translate_addr([198, 18, 1, 3]), [198, 18, 100, 11]);
        assert_eq!(back.translate_port(80), 22);
        assert!(lookup(&c.dnat.reverse, [198, 18, 1, 3], Some(81)).is_none());
    }

    #[test]
    fn slots_are_stable_across_recompiles() {
        let a = rule(1, "198.18.100.1/32", None, "198.18.1.1/32", None);
        let b = rule(2, "198.18.100.2/32", None, "198.18.1.2/32", None);
        let c = rule(3, "198.18.100.3/32", None, "198.18.1.3/32", None);
        let first = compile_dnat_only(&[a.clone(), b, c.clone()], &BTreeMap::new()).unwrap();
        let second = compile_dnat_only(&[c, a], &first.slots).unwrap();
        assert_eq!(second.slots[&1], first.slots[&1]);
        assert_eq!(second.slots[&3], first.slots[&3]);
    }

    #[test]
    fn new_rules_never_take_the_slot_of_a_rule_just_deleted() {
        let a = rule(1, "198.18.100.1/32", None, "198.18.1.1/32", None);
        let b = rule(2, "198.18.100.2/32", None, "198.18.1.2/32", None);
        let c = rule(3, "198.18.100.3/32", None, "198.18.1.3/32", None);
        let first = compile_dnat_only(&[a.clone(), b.clone()], &BTreeMap::new()).unwrap();
        let history = slot_history_after(&BTreeMap::new(), &first.slots);
        // b deleted, c added: c must not inherit b's slot (b's sessions still count there).
        let second = compile_dnat_only(&[a.clone(), c.clone()], &history).unwrap();
        assert_eq!(second.slots[&1], first.slots[&1]);
        assert_ne!(second.slots[&3], first.slots[&2]);
        let history = slot_history_after(&history, &second.slots);
        // b back: its old slot again, so its counters continue.
        let third = compile_dnat_only(&[a, b, c], &history).unwrap();
        assert_eq!(third.slots[&2], first.slots[&2]);
        let distinct: BTreeSet<u32> = third.slots.values().copied().collect();
        assert_eq!(distinct.len(), 3);
    }

    #[test]
    fn slot_history_forgets_ids_whose_slot_was_taken_over() {
        let history = BTreeMap::from([(1, 0), (2, 1)]);
        let next = slot_history_after(&history, &BTreeMap::from([(3, 1)]));
        assert_eq!(next, BTreeMap::from([(1, 0), (3, 1)]));
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
        let err = compile_dnat_only(&rules, &BTreeMap::new()).unwrap_err();
        assert!(err[0].message.contains("17 rules"), "{err:?}");
    }

    #[test]
    fn ambiguous_rules_are_stateful_and_left_out_of_the_reverse_table() {
        let rules = vec![
            rule(
                1,
                "198.18.100.10/32",
                Some((80, 80)),
                "198.18.1.2/32",
                Some(80),
            ),
            rule(
                2,
                "198.18.100.11/32",
                Some((80, 80)),
                "198.18.1.2/32",
                Some(80),
            ),
            rule(
                3,
                "198.18.100.11/32",
                Some((22, 22)),
                "198.18.1.3/32",
                Some(80),
            ),
        ];
        let c = compile_dnat_only(&rules, &BTreeMap::new()).unwrap();
        let ids: Vec<u32> = c.stateful.iter().map(|r| r.id).collect();
        assert_eq!(ids, [1, 2]);
        let vip1 = c.dnat.forward[&"198.18.100.10/32".parse().unwrap()];
        assert_ne!(vip1.rules[0].flags & RULE_STATEFUL, 0);
        let vip2 = c.dnat.forward[&"198.18.100.11/32".parse().unwrap()];
        assert_eq!(vip2.len, 2);
        assert_ne!(vip2.rules[0].flags & RULE_STATEFUL, 0);
        assert_eq!(vip2.rules[1].flags & RULE_STATEFUL, 0);
        // Only the unambiguous rule keeps its stateless reverse.
        let reverse: Vec<String> = c.dnat.reverse.keys().map(|k| k.to_string()).collect();
        assert_eq!(reverse, ["198.18.1.3/32"]);
        assert!(lookup(&c.dnat.reverse, [198, 18, 1, 2], Some(80)).is_none());
        // No SNAT rules: no SNAT check anywhere.
        assert!(c.dnat.forward.values().all(|s| s.rules[..s.len as usize]
            .iter()
            .all(|r| r.flags & RULE_SNAT_CHECK == 0)));
    }

    #[test]
    fn snat_rules_turn_on_the_snat_check_and_share_slots() {
        let dnat = vec![rule(1, "198.18.100.10/32", None, "198.18.1.2/32", None)];
        let mut no_nat = masquerade(3, "198.18.5.0/24");
        no_nat.action = SnatAction::NoNat;
        // Only a no_nat rule: the check would never translate anything.
        let c = compile(&model(dnat.clone(), vec![no_nat.clone()]), &BTreeMap::new()).unwrap();
        let set = c.dnat.forward[&"198.18.100.10/32".parse().unwrap()];
        assert_eq!(set.rules[0].flags & RULE_SNAT_CHECK, 0);
        let c = compile(
            &model(dnat, vec![no_nat, masquerade(2, "198.18.0.0/16")]),
            &BTreeMap::new(),
        )
        .unwrap();
        let set = c.dnat.forward[&"198.18.100.10/32".parse().unwrap()];
        assert_ne!(set.rules[0].flags & RULE_SNAT_CHECK, 0);
        assert_eq!(c.slots.len(), 3);
        let mut slots: Vec<u32> = c.slots.values().copied().collect();
        slots.sort();
        assert_eq!(slots, [0, 1, 2]);
    }
}
