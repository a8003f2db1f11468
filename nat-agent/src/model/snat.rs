//! `[[snat]]`: source NAT rules (to fixed addresses or a pool, MASQUERADE, or "no NAT").

use std::{collections::HashSet, net::Ipv4Addr};

use ipnet::Ipv4Net;
use nat_common::{conntrack::MAX_POOL_ADDRS, maps::MAX_POOLS};

use super::{
    is_interface_name, parse_ports, parse_prefix, rule_id, rule_name, rule_place, rule_protocol,
    PortRange, Problem, INTERFACE_NAME_RULE,
};
use crate::config::{AddressList, SnatEntry};

/// External ports when a rule gives no `port_range`: the unprivileged range, which stateless
/// ACLs in front of cloud subnets typically admit replies to.
pub const DEFAULT_SNAT_PORTS: PortRange = PortRange {
    min: 1024,
    max: 65535,
};

/// What an SNAT rule does with a matching packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnatAction {
    /// Translate to one of these addresses (paired: one inside host, one address).
    ToAddresses {
        /// The pool, in config order, without duplicates; 1..=MAX_POOL_ADDRS of them.
        addresses: Vec<Ipv4Addr>,
        /// External ports.
        ports: PortRange,
    },
    /// Translate to the egress interface's address (follows address changes).
    Masquerade {
        /// External ports.
        ports: PortRange,
    },
    /// Leave the packet alone (an exempt destination or source).
    NoNat,
}

impl SnatAction {
    /// Whether the rule translates anything.
    pub fn translates(&self) -> bool {
        !matches!(self, SnatAction::NoNat)
    }

    /// The external port range, for translating rules.
    pub fn ports(&self) -> Option<PortRange> {
        match self {
            SnatAction::ToAddresses { ports, .. } | SnatAction::Masquerade { ports } => {
                Some(*ports)
            }
            SnatAction::NoNat => None,
        }
    }
}

/// A validated SNAT rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnatRule {
    /// Stable id from the config (unique across DNAT and SNAT).
    pub id: u32,
    /// Unique name (metrics label).
    pub name: String,
    /// Source prefix matched (host bits zero).
    pub source: Ipv4Net,
    /// Destination prefix matched; `0.0.0.0/0` when the config gives none.
    pub destination: Ipv4Net,
    /// Protocol matched; `None` for any of TCP, UDP and ICMP echo.
    pub protocol: Option<u8>,
    /// Egress interface the route lookup must pick; any when `None`.
    pub out_interface: Option<String>,
    /// What to do.
    pub action: SnatAction,
}

/// Validates one `[[snat]]` entry, pushing a problem per faulty field.
pub(super) fn validate_snat(
    index: usize,
    e: &SnatEntry,
    problems: &mut Vec<Problem>,
) -> Option<SnatRule> {
    let place = rule_place("snat", index, &e.name, e.id);
    let before = problems.len();
    let mut problem = |field: &'static str, message: String| {
        problems.push(Problem {
            place: place.clone(),
            field: Some(field),
            message,
        })
    };

    let id = rule_id(e.id, &mut problem);
    let name = rule_name(&e.name, &mut problem);
    let source = match &e.source {
        None => {
            problem(
                "source",
                "missing; the inside address or prefix whose traffic is translated".into(),
            );
            None
        }
        Some(s) => parse_prefix(s).map_err(|m| problem("source", m)).ok(),
    };
    let destination = match &e.destination {
        None => Some(Ipv4Net::default()),
        Some(s) => parse_prefix(s).map_err(|m| problem("destination", m)).ok(),
    };
    let protocol = rule_protocol(e.protocol.as_deref(), &mut problem);
    let out_interface = match &e.out_interface {
        Some(n) if !is_interface_name(n) => {
            problem("out_interface", INTERFACE_NAME_RULE.into());
            None
        }
        other => other.clone(),
    };

    // Exactly one action. `masquerade = false` and `no_nat = false` say "not this one".
    let masquerade = e.masquerade == Some(true);
    let no_nat = e.no_nat == Some(true);
    let given: Vec<&'static str> = [
        (e.to_address.is_some(), "to_address"),
        (masquerade, "masquerade"),
        (no_nat, "no_nat"),
    ]
    .into_iter()
    .filter_map(|(set, field)| set.then_some(field))
    .collect();
    let action_ok = match given.as_slice() {
        [] => {
            problem(
                "to_address",
                "missing; give exactly one of to_address, masquerade = true or no_nat = true"
                    .into(),
            );
            false
        }
        [_] => true,
        [first, second, ..] => {
            problem(
                second,
                format!("{first} and {second} exclude each other; give exactly one action"),
            );
            false
        }
    };
    let ports = match (&e.port_range, no_nat) {
        (Some(_), true) => {
            problem(
                "port_range",
                "a no_nat rule translates nothing; remove the port range".into(),
            );
            None
        }
        (Some(spec), false) => parse_ports(spec).map_err(|m| problem("port_range", m)).ok(),
        (None, _) => Some(DEFAULT_SNAT_PORTS),
    };
    let addresses = e.to_address.as_ref().and_then(|list| {
        pool_addresses(list)
            .map_err(|m| problem("to_address", m))
            .ok()
    });

    if problems.len() != before || !action_ok {
        return None;
    }
    let action = if no_nat {
        SnatAction::NoNat
    } else if masquerade {
        SnatAction::Masquerade { ports: ports? }
    } else {
        SnatAction::ToAddresses {
            addresses: addresses?,
            ports: ports?,
        }
    };
    Some(SnatRule {
        id: id?,
        name: name?,
        source: source?,
        destination: destination?,
        protocol: protocol.ok()?,
        out_interface,
        action,
    })
}

/// The addresses of `to_address`: each item an address or a prefix (every address of it,
/// network and broadcast included: list the addresses to leave those out).
fn pool_addresses(list: &AddressList) -> Result<Vec<Ipv4Addr>, String> {
    let items: Vec<&String> = match list {
        AddressList::One(s) => vec![s],
        AddressList::Many(v) if v.is_empty() => {
            return Err("the list is empty; give at least one address".into())
        }
        AddressList::Many(v) => v.iter().collect(),
    };
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for item in items {
        let net = parse_prefix(item)?;
        // Count before expanding: a /8 must not allocate 16 million addresses to refuse them.
        let count = 1u64 << (32 - u32::from(net.prefix_len()));
        if out.len() as u64 + count > MAX_POOL_ADDRS as u64 {
            return Err(format!(
                "more than {MAX_POOL_ADDRS} addresses (at {item:?}); a pool holds at most \
                 {MAX_POOL_ADDRS}"
            ));
        }
        for addr in all_addresses(net) {
            if addr.is_unspecified()
                || addr.is_broadcast()
                || addr.is_multicast()
                || addr.is_loopback()
            {
                return Err(format!("{addr} cannot be a source address"));
            }
            if !seen.insert(addr) {
                return Err(format!("{addr} is listed twice"));
            }
            out.push(addr);
        }
    }
    Ok(out)
}

/// Every address of a prefix, network and broadcast included.
fn all_addresses(net: Ipv4Net) -> impl Iterator<Item = Ipv4Addr> {
    (u32::from(net.network())..=u32::from(net.broadcast())).map(Ipv4Addr::from)
}

/// The SNAT rule count against the pool table (one pool per rule).
pub(super) fn check_rule_count(count: usize, problems: &mut Vec<Problem>) {
    if count > MAX_POOLS as usize {
        problems.push(Problem {
            place: "[[snat]]".into(),
            field: None,
            message: format!(
                "{count} rules; at most {MAX_POOLS} are supported (one address pool each)"
            ),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PortSpec;

    fn entry() -> SnatEntry {
        SnatEntry {
            id: Some(100),
            name: Some("out".into()),
            source: Some("198.18.0.0/24".into()),
            destination: None,
            protocol: None,
            out_interface: None,
            to_address: Some(AddressList::One("203.0.113.1".into())),
            masquerade: None,
            no_nat: None,
            port_range: None,
        }
    }

    fn check(e: SnatEntry) -> Result<SnatRule, Vec<Problem>> {
        let mut problems = Vec::new();
        match validate_snat(0, &e, &mut problems) {
            Some(r) if problems.is_empty() => Ok(r),
            _ => Err(problems),
        }
    }

    fn fields(e: SnatEntry) -> Vec<&'static str> {
        check(e)
            .unwrap_err()
            .iter()
            .map(|p| p.field.unwrap())
            .collect()
    }

    #[test]
    fn defaults_any_destination_and_unprivileged_ports() {
        let r = check(entry()).unwrap();
        assert_eq!(r.destination, Ipv4Net::default());
        assert_eq!(
            r.action,
            SnatAction::ToAddresses {
                addresses: vec![Ipv4Addr::new(203, 0, 113, 1)],
                ports: DEFAULT_SNAT_PORTS
            }
        );
    }

    #[test]
    fn prefix_and_list_pools_expand() {
        let r = check(SnatEntry {
            to_address: Some(AddressList::Many(vec![
                "203.0.113.8/30".into(),
                "203.0.113.1".into(),
            ])),
            port_range: Some(PortSpec::Text("2000-2999".into())),
            ..entry()
        })
        .unwrap();
        let SnatAction::ToAddresses { addresses, ports } = r.action else {
            panic!("{r:?}")
        };
        assert_eq!(addresses.len(), 5);
        assert_eq!(addresses[0], Ipv4Addr::new(203, 0, 113, 8));
        assert_eq!(addresses[4], Ipv4Addr::new(203, 0, 113, 1));
        assert_eq!((ports.min, ports.max), (2000, 2999));
    }

    #[test]
    fn pools_are_bounded_and_sane() {
        for bad in [
            AddressList::One("203.0.0.0/16".into()),
            AddressList::Many(vec![]),
            AddressList::Many(vec!["203.0.113.1".into(), "203.0.113.1".into()]),
            AddressList::One("127.0.0.1".into()),
            AddressList::One("nope".into()),
        ] {
            assert_eq!(
                fields(SnatEntry {
                    to_address: Some(bad.clone()),
                    ..entry()
                }),
                ["to_address"],
                "{bad:?}"
            );
        }
        // 64 addresses is the limit, not beyond it.
        assert!(check(SnatEntry {
            to_address: Some(AddressList::One("203.0.113.0/26".into())),
            ..entry()
        })
        .is_ok());
    }

    #[test]
    fn exactly_one_action() {
        assert_eq!(
            fields(SnatEntry {
                to_address: None,
                ..entry()
            }),
            ["to_address"]
        );
        assert_eq!(
            fields(SnatEntry {
                masquerade: Some(true),
                ..entry()
            }),
            ["masquerade"]
        );
        let r = check(SnatEntry {
            to_address: None,
            masquerade: Some(false),
            no_nat: Some(true),
            ..entry()
        })
        .unwrap();
        assert_eq!(r.action, SnatAction::NoNat);
        assert_eq!(
            fields(SnatEntry {
                to_address: None,
                no_nat: Some(true),
                port_range: Some(PortSpec::Number(80)),
                ..entry()
            }),
            ["port_range"]
        );
    }

    #[test]
    fn masquerade_keeps_its_port_range() {
        let r = check(SnatEntry {
            to_address: None,
            masquerade: Some(true),
            out_interface: Some("eth1".into()),
            port_range: Some(PortSpec::Text("1024-2047".into())),
            ..entry()
        })
        .unwrap();
        assert_eq!(
            r.action,
            SnatAction::Masquerade {
                ports: PortRange {
                    min: 1024,
                    max: 2047
                }
            }
        );
        assert_eq!(r.out_interface.as_deref(), Some("eth1"));
    }

    #[test]
    fn every_bad_field_is_named() {
        let e = SnatEntry {
            id: Some(0),
            name: Some("has space".into()),
            source: Some("198.18.0.1/24".into()),
            destination: Some("x".into()),
            protocol: Some("sctp".into()),
            out_interface: Some("a/b".into()),
            port_range: Some(PortSpec::Text("9-1".into())),
            ..entry()
        };
        assert_eq!(
            fields(e),
            [
                "id",
                "name",
                "source",
                "destination",
                "protocol",
                "out_interface",
                "port_range"
            ]
        );
    }
}
