//! Compiles SNAT rules into `SNAT_RULES` (source prefix -> rule set) and `SNAT_POOLS`.
//!
//! One pool per rule, at the rule's position, so a rule's pool index never depends on other
//! rules' contents. Egress interfaces stay names here: their indexes belong to the network
//! namespace the agent runs in and can change while it runs, so the dataplane resolves them
//! when it writes the sets ([`CompiledSnat::resolved_sets`]).

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use nat_common::conntrack::{
    Pool, SnatRule as KernelSnatRule, SnatRuleSet, MAX_SNAT_RULES_PER_SET, SNAT_MASQUERADE,
    SNAT_NONE, SNAT_TO_POOL,
};

use super::covering_sets;
use crate::model::{Problem, SnatAction, SnatRule};

/// `out_ifindex` of a rule whose interface does not exist: no FIB result carries it, so the
/// rule matches nothing until the interface appears.
pub const IFINDEX_MISSING: u32 = u32::MAX;

/// The SNAT side of a compiled config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompiledSnat {
    /// Source prefix -> rule set, with `out_ifindex` 0 everywhere (see `out_interfaces`).
    pub sets: BTreeMap<Ipv4Net, SnatRuleSet>,
    /// Pool of each rule, indexed by rule position (= `SnatRule::pool`).
    pub pools: Vec<Pool>,
    /// The egress interface each rule requires, indexed like `pools`.
    pub out_interfaces: Vec<Option<String>>,
}

impl CompiledSnat {
    /// The interface names the rules refer to.
    pub fn interface_names(&self) -> BTreeSet<&str> {
        self.out_interfaces
            .iter()
            .flatten()
            .map(String::as_str)
            .collect()
    }

    /// The sets with every rule's `out_ifindex` filled from `ifindex` (name -> index); a name
    /// absent from it gets [`IFINDEX_MISSING`].
    pub fn resolved_sets(&self, ifindex: &BTreeMap<String, u32>) -> BTreeMap<Ipv4Net, SnatRuleSet> {
        let mut sets = self.sets.clone();
        for set in sets.values_mut() {
            let len = (set.len as usize).min(MAX_SNAT_RULES_PER_SET);
            for rule in &mut set.rules[..len] {
                let name = self
                    .out_interfaces
                    .get(rule.pool as usize)
                    .and_then(Option::as_ref);
                rule.out_ifindex = match name {
                    None => 0,
                    Some(name) => ifindex.get(name).copied().unwrap_or(IFINDEX_MISSING),
                };
            }
        }
        sets
    }
}

/// Compiles `rules` (in priority order) with their counter `slots`.
pub fn compile_snat(
    rules: &[SnatRule],
    slots: &BTreeMap<u32, u32>,
) -> Result<CompiledSnat, Vec<Problem>> {
    let entries: Vec<KernelSnatRule> = rules
        .iter()
        .enumerate()
        .map(|(position, r)| KernelSnatRule {
            counter_index: slots[&r.id],
            dst_addr: r.destination.network().octets(),
            dst_mask: r.destination.netmask().octets(),
            out_ifindex: 0,
            // Positions are bounded by MAX_POOLS in validation.
            pool: position as u32,
            proto: r.protocol.unwrap_or(0),
            action: match r.action {
                SnatAction::ToAddresses { .. } => SNAT_TO_POOL,
                SnatAction::Masquerade { .. } => SNAT_MASQUERADE,
                SnatAction::NoNat => SNAT_NONE,
            },
            _pad: [0; 2],
        })
        .collect();
    let mut sets = BTreeMap::new();
    let mut problems = Vec::new();
    for (prefix, members) in covering_sets(rules, |r| r.source) {
        if members.len() > MAX_SNAT_RULES_PER_SET {
            problems.push(Problem {
                place: format!("snat source prefix {prefix}"),
                field: None,
                message: format!(
                    "{} snat rules apply to sources in this prefix; at most \
                     {MAX_SNAT_RULES_PER_SET} can",
                    members.len()
                ),
            });
            continue;
        }
        let mut set = SnatRuleSet {
            len: members.len() as u32,
            ..Default::default()
        };
        for (slot, &i) in set.rules.iter_mut().zip(&members) {
            *slot = entries[i];
        }
        sets.insert(prefix, set);
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(CompiledSnat {
        sets,
        pools: rules.iter().map(pool_of).collect(),
        out_interfaces: rules.iter().map(|r| r.out_interface.clone()).collect(),
    })
}

/// The pool of one rule: its addresses (none for MASQUERADE and no_nat) and port range, host
/// order.
fn pool_of(rule: &SnatRule) -> Pool {
    let mut pool = Pool::default();
    if let Some(ports) = rule.action.ports() {
        pool.port_min = ports.min;
        pool.port_max = ports.max;
    }
    if let SnatAction::ToAddresses { addresses, .. } = &rule.action {
        // Validation bounds the pool to MAX_POOL_ADDRS; `zip` would stop there anyway.
        for (slot, addr) in pool.addrs.iter_mut().zip(addresses) {
            *slot = addr.octets();
        }
        pool.len = addresses.len().min(pool.addrs.len()) as u32;
    }
    pool
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PortRange, DEFAULT_SNAT_PORTS};
    use nat_common::ipv4::proto;
    use std::net::Ipv4Addr;

    fn rule(id: u32, source: &str, action: SnatAction) -> SnatRule {
        SnatRule {
            id,
            name: format!("s{id}"),
            source: source.parse().unwrap(),
            destination: Ipv4Net::default(),
            protocol: None,
            out_interface: None,
            action,
        }
    }

    fn slots(rules: &[SnatRule]) -> BTreeMap<u32, u32> {
        rules.iter().map(|r| (r.id, r.id + 100)).collect()
    }

    /// Simulates the kernel: longest prefix holding `src`, then the first rule matching.
    fn lookup(
        sets: &BTreeMap<Ipv4Net, SnatRuleSet>,
        src: [u8; 4],
        proto: u8,
        dst: [u8; 4],
        out_ifindex: u32,
    ) -> Option<KernelSnatRule> {
        let a = Ipv4Addr::from(src);
        let (_, set) = sets
            .iter()
            .filter(|(k, _)| k.contains(&a))
            .max_by_key(|(k, _)| k.prefix_len())?;
        set.rules[..set.len as usize]
            .iter()
            .find(|r| r.matches(proto, dst) && (r.out_ifindex == 0 || r.out_ifindex == out_ifindex))
            .copied()
    }

    #[test]
    fn first_match_across_covering_prefixes_and_pools_by_position() {
        let exempt = SnatRule {
            destination: "203.0.113.0/24".parse().unwrap(),
            ..rule(10, "198.18.0.0/16", SnatAction::NoNat)
        };
        let host = SnatRule {
            protocol: Some(proto::UDP),
            ..rule(
                11,
                "198.18.0.5/32",
                SnatAction::ToAddresses {
                    addresses: vec![Ipv4Addr::new(198, 51, 100, 7)],
                    ports: PortRange {
                        min: 2000,
                        max: 2999,
                    },
                },
            )
        };
        let masq = rule(
            12,
            "198.18.0.0/16",
            SnatAction::Masquerade {
                ports: DEFAULT_SNAT_PORTS,
            },
        );
        let rules = vec![exempt, host, masq];
        let c = compile_snat(&rules, &slots(&rules)).unwrap();
        let sets = c.resolved_sets(&BTreeMap::new());
        // The /32 inherits the /16 rules, in config order around its own.
        let set = &sets[&"198.18.0.5/32".parse().unwrap()];
        let pools: Vec<u32> = set.rules[..set.len as usize]
            .iter()
            .map(|r| r.pool)
            .collect();
        assert_eq!(pools, [0, 1, 2]);
        let hit = |src, p, dst| lookup(&sets, src, p, dst, 7).map(|r| (r.action, r.pool));
        assert_eq!(
            hit([198, 18, 0, 5], proto::UDP, [203, 0, 113, 9]),
            Some((SNAT_NONE, 0))
        );
        assert_eq!(
            hit([198, 18, 0, 5], proto::UDP, [198, 51, 100, 9]),
            Some((SNAT_TO_POOL, 1))
        );
        assert_eq!(
            hit([198, 18, 0, 5], proto::TCP, [198, 51, 100, 9]),
            Some((SNAT_MASQUERADE, 2))
        );
        assert_eq!(
            hit([198, 18, 7, 7], proto::UDP, [198, 51, 100, 9]),
            Some((SNAT_MASQUERADE, 2))
        );
        assert_eq!(hit([198, 19, 0, 1], proto::UDP, [198, 51, 100, 9]), None);
        // Pools by position, host-order ports; MASQUERADE and no_nat pools hold no address.
        assert_eq!(c.pools.len(), 3);
        assert_eq!(c.pools[1].len, 1);
        assert_eq!(c.pools[1].addrs[0], [198, 51, 100, 7]);
        assert_eq!((c.pools[1].port_min, c.pools[1].port_max), (2000, 2999));
        assert_eq!((c.pools[2].len, c.pools[2].port_min), (0, 1024));
        assert_eq!(set.rules[1].counter_index, 111);
    }

    #[test]
    fn interfaces_resolve_by_name_and_missing_ones_never_match() {
        let mut a = rule(
            1,
            "198.18.0.0/24",
            SnatAction::Masquerade {
                ports: DEFAULT_SNAT_PORTS,
            },
        );
        a.out_interface = Some("eth1".into());
        let mut b = rule(
            2,
            "198.18.0.0/24",
            SnatAction::Masquerade {
                ports: DEFAULT_SNAT_PORTS,
            },
        );
        b.out_interface = Some("gone0".into());
        let c3 = rule(3, "198.18.0.0/24", SnatAction::NoNat);
        let rules = vec![a, b, c3];
        let c = compile_snat(&rules, &slots(&rules)).unwrap();
        assert_eq!(
            c.interface_names().into_iter().collect::<Vec<_>>(),
            ["eth1", "gone0"]
        );
        let sets = c.resolved_sets(&BTreeMap::from([("eth1".to_string(), 4)]));
        let set = &sets[&"198.18.0.0/24".parse().unwrap()];
        let idx: Vec<u32> = set.rules[..3].iter().map(|r| r.out_ifindex).collect();
        assert_eq!(idx, [4, IFINDEX_MISSING, 0]);
    }

    #[test]
    fn too_many_rules_for_one_source_is_reported() {
        let rules: Vec<_> = (0..17)
            .map(|i| rule(i + 1, "198.18.0.0/24", SnatAction::NoNat))
            .collect();
        let err = compile_snat(&rules, &slots(&rules)).unwrap_err();
        assert_eq!(err.len(), 1);
        assert_eq!(err[0].place, "snat source prefix 198.18.0.0/24");
        assert!(err[0].message.contains("17 snat rules"), "{err:?}");
    }
}
