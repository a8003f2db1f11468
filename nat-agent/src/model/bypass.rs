//! `[[bypass]]`: traffic that is not the NAT's business.

use ipnet::Ipv4Net;
use nat_common::ipv4::proto;

use super::{parse_ports, parse_prefix, rule_protocol, PortRange, Problem};
use crate::config::BypassEntry;

/// A validated bypass entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BypassRule {
    /// Where it is in the config, for messages: `bypass "probe"` or `bypass #2`.
    pub place: String,
    /// Source prefix matched; `0.0.0.0/0` when the config gives none.
    pub source: Ipv4Net,
    /// Destination prefix matched; `0.0.0.0/0` when the config gives none.
    pub destination: Ipv4Net,
    /// Protocol matched; any when `None`.
    pub protocol: Option<u8>,
    /// Destination ports matched (TCP/UDP); any when `None`.
    pub ports: Option<PortRange>,
}

/// Validates one `[[bypass]]` entry, pushing a problem per faulty field.
pub(super) fn validate_bypass(
    index: usize,
    e: &BypassEntry,
    problems: &mut Vec<Problem>,
) -> Option<BypassRule> {
    let place = match &e.name {
        Some(name) => format!("bypass {name:?}"),
        None => format!("bypass #{}", index + 1),
    };
    let before = problems.len();
    let mut problem = |field: Option<&'static str>, message: String| {
        problems.push(Problem {
            place: place.clone(),
            field,
            message,
        })
    };
    if e.source.is_none() && e.destination.is_none() {
        problem(
            None,
            "needs a source or a destination (or both); bypassing everything would switch the NAT off"
                .into(),
        );
    }
    let prefix =
        |value: &Option<String>, field, problem: &mut dyn FnMut(Option<&'static str>, String)| {
            match value {
                None => Some(Ipv4Net::default()),
                Some(s) => parse_prefix(s).map_err(|m| problem(Some(field), m)).ok(),
            }
        };
    let source = prefix(&e.source, "source", &mut problem);
    let destination = prefix(&e.destination, "destination", &mut problem);
    let protocol = rule_protocol(e.protocol.as_deref(), &mut |f, m| problem(Some(f), m));
    let ports = match &e.port {
        None => None,
        Some(spec) => match parse_ports(spec) {
            Ok(range) => {
                if !matches!(protocol, Ok(Some(proto::TCP | proto::UDP))) {
                    problem(
                        Some("port"),
                        "a port needs protocol = \"tcp\" or \"udp\"".into(),
                    );
                }
                Some(range)
            }
            Err(m) => {
                problem(Some("port"), m);
                None
            }
        },
    };
    if problems.len() != before {
        return None;
    }
    Some(BypassRule {
        place,
        source: source?,
        destination: destination?,
        protocol: protocol.ok()?,
        ports,
    })
}
