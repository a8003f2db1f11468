//! Which DNAT rules need sessions.
//!
//! Stateless DNAT restores a reply's source from the backend address and port alone. When two
//! rules send traffic to overlapping backend address/protocol/port spaces, a reply from there
//! could belong to either VIP: such rules get a session per flow (the reply is restored from
//! the session, never guessed), and every other rule stays stateless.

use std::fmt;

use crate::model::DnatRule;

/// A DNAT rule made stateful, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatefulRule {
    /// The rule's id.
    pub id: u32,
    /// The rule's name.
    pub name: String,
    /// Where its replies come from: `198.18.1.2/32 port 80`.
    pub replies_from: String,
    /// (name, id) of the other rules whose replies come from the same place.
    pub shares_with: Vec<(String, u32)>,
}

impl fmt::Display for StatefulRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dnat rule {:?} (id {}): stateful: replies from {} could also belong to ",
            self.name, self.id, self.replies_from
        )?;
        for (i, (name, id)) in self.shares_with.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "rule {name:?} (id {id})")?;
        }
        write!(f, "; its flows get sessions")
    }
}

/// Whether replies of `a` and `b` can come from the same backend address, protocol and port.
fn replies_overlap(a: &DnatRule, b: &DnatRule) -> bool {
    let addrs = a.to_address.contains(&b.to_address.network())
        || b.to_address.contains(&a.to_address.network());
    let protos = match (a.protocol, b.protocol) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    };
    let ports = match (a.backend_ports(), b.backend_ports()) {
        (Some(x), Some(y)) => x.overlaps(&y),
        _ => true,
    };
    addrs && protos && ports
}

/// The rules whose replies overlap another rule's, in config order. Overlap is symmetric, so
/// the rules left out are pairwise unambiguous and keep a correct stateless reverse.
pub fn stateful_rules(rules: &[DnatRule]) -> Vec<StatefulRule> {
    rules
        .iter()
        .enumerate()
        .filter_map(|(i, rule)| {
            let shares_with: Vec<(String, u32)> = rules
                .iter()
                .enumerate()
                .filter(|&(j, other)| j != i && replies_overlap(rule, other))
                .map(|(_, other)| (other.name.clone(), other.id))
                .collect();
            (!shares_with.is_empty()).then(|| StatefulRule {
                id: rule.id,
                name: rule.name.clone(),
                replies_from: format!(
                    "{}{}",
                    rule.to_address,
                    rule.backend_ports()
                        .map(|p| format!(" port {p}"))
                        .unwrap_or_default()
                ),
                shares_with,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PortRange;
    use nat_common::ipv4::proto;

    fn rule(id: u32, to: &str, protocol: Option<u8>, port: Option<u16>) -> DnatRule {
        DnatRule {
            id,
            name: format!("r{id}"),
            destination: format!("198.18.100.{id}/32").parse().unwrap(),
            protocol,
            port: port.map(|p| PortRange { min: p, max: p }),
            to_address: to.parse().unwrap(),
            to_port: None,
        }
    }

    #[test]
    fn two_vips_onto_one_backend_port_are_both_stateful() {
        let rules = [
            rule(1, "198.18.1.2/32", Some(proto::TCP), Some(80)),
            rule(2, "198.18.1.2/32", Some(proto::TCP), Some(80)),
            rule(3, "198.18.1.2/32", Some(proto::TCP), Some(81)),
            rule(4, "198.18.1.2/32", Some(proto::UDP), Some(80)),
        ];
        let s = stateful_rules(&rules);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].shares_with, [("r2".to_string(), 2)]);
        assert_eq!(
            s[1].to_string(),
            "dnat rule \"r2\" (id 2): stateful: replies from 198.18.1.2/32 port 80 could also \
             belong to rule \"r1\" (id 1); its flows get sessions"
        );
    }

    #[test]
    fn a_prefix_overlaps_the_addresses_inside_it() {
        let rules = [
            rule(1, "198.18.9.0/24", None, None),
            rule(2, "198.18.9.7/32", Some(proto::UDP), Some(53)),
            rule(3, "198.18.10.7/32", None, None),
        ];
        let ids: Vec<u32> = stateful_rules(&rules).iter().map(|r| r.id).collect();
        assert_eq!(ids, [1, 2]);
    }
}
