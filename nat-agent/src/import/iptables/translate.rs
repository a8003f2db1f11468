//! Translating one parsed nat-table rule into a config entry, or saying why not.
//!
//! PREROUTING holds the DNAT stage (DNAT, NETMAP), POSTROUTING the SNAT stage (SNAT,
//! MASQUERADE, and RETURN/ACCEPT as "no NAT"). A translation is exact unless it carries a
//! warning; anything the config cannot express faithfully is refused with the reason rather
//! than approximated.

use std::{collections::HashSet, net::Ipv4Addr};

use ipnet::Ipv4Net;
use nat_common::conntrack::MAX_POOL_ADDRS;

use super::{
    rule::Rule,
    target::{Target, TargetFlags},
    values::NatRange,
};
use crate::{
    config::{AddressList, DnatEntry, PortSpec, SnatEntry},
    import::Entry,
    model::PortRange,
};

/// A translated rule.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Translated {
    /// The entry (without id and name).
    pub entry: Entry,
    /// A DNAT rule's `-i`, which the config cannot keep.
    pub in_interface: Option<String>,
    /// Behaviour differences.
    pub warnings: Vec<String>,
    /// Remarks that change nothing.
    pub notes: Vec<String>,
}

/// What became of a rule.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Outcome {
    /// Translated; its warnings say where it differs from the input rule.
    Translated(Box<Translated>),
    /// The rule does nothing NAT-wise (no target): nothing to translate.
    NoEffect(String),
    /// Not translated, for these reasons.
    Unsupported(Vec<String>),
}

/// A rule of the PREROUTING chain.
pub(super) fn prerouting(rule: &Rule, user_chains: &HashSet<String>) -> Outcome {
    let mut problems = Vec::new();
    if let Some(source) = rule.source {
        problems.push(format!(
            "-s {source}: the config's DNAT rules match the destination only"
        ));
    }
    if rule.out_interface.is_some() {
        problems.push("-o is not valid in PREROUTING".to_string());
    }
    match &rule.target {
        None => no_target(),
        Some(Target::Dnat(to, flags)) => dnat(rule, to, *flags, problems),
        Some(Target::Netmap(to)) => netmap(rule, *to, problems),
        Some(Target::Accept | Target::Return) => {
            problems.push(
                "-j ACCEPT/RETURN in PREROUTING exempts traffic from the DNAT rules after it; \
                 the config has no DNAT exemption (narrow the later rules instead)"
                    .into(),
            );
            Outcome::Unsupported(problems)
        }
        Some(Target::Snat(..) | Target::Masquerade(..)) => {
            problems.push("source NAT is only valid in POSTROUTING".into());
            Outcome::Unsupported(problems)
        }
        Some(Target::Other(name)) => {
            problems.push(other_target(name, user_chains));
            Outcome::Unsupported(problems)
        }
    }
}

/// A rule of the POSTROUTING chain.
pub(super) fn postrouting(rule: &Rule, user_chains: &HashSet<String>) -> Outcome {
    let mut problems = Vec::new();
    if rule.in_interface.is_some() {
        problems.push("-i is not valid in POSTROUTING".to_string());
    }
    if let Some(ports) = rule.dport {
        problems.push(format!(
            "--dport {ports}: the config's SNAT rules do not match ports"
        ));
    }
    let mut warnings = Vec::new();
    let mut notes = Vec::new();
    let (to_address, masquerade, no_nat, port_range) = match &rule.target {
        None => return no_target(),
        Some(Target::Snat(to, flags)) => {
            snat_flags(*flags, &mut warnings, &mut notes);
            match snat_to(to) {
                Ok((addresses, ports)) => (Some(addresses), None, None, ports),
                Err(m) => {
                    problems.push(m);
                    (None, None, None, None)
                }
            }
        }
        Some(Target::Masquerade(ports, flags)) => {
            snat_flags(*flags, &mut warnings, &mut notes);
            (None, Some(true), None, ports.map(port_spec))
        }
        Some(Target::Accept | Target::Return) => (None, None, Some(true), None),
        Some(Target::Dnat(..)) => {
            problems.push("DNAT is only valid in PREROUTING (and OUTPUT)".into());
            (None, None, None, None)
        }
        Some(Target::Netmap(_)) => {
            problems.push(
                "NETMAP in POSTROUTING maps sources one to one by their host bits; the \
                 config's SNAT pools give each inside host any one address of the pool"
                    .into(),
            );
            (None, None, None, None)
        }
        Some(Target::Other(name)) => {
            problems.push(other_target(name, user_chains));
            (None, None, None, None)
        }
    };
    if !problems.is_empty() {
        return Outcome::Unsupported(problems);
    }
    Outcome::Translated(Box::new(Translated {
        entry: Entry::Snat(SnatEntry {
            id: None,
            name: None,
            source: Some(net_string(rule.source.unwrap_or_default())),
            destination: rule.destination.map(net_string),
            protocol: protocol(rule),
            out_interface: rule.out_interface.clone(),
            to_address,
            masquerade,
            no_nat,
            port_range,
        }),
        in_interface: None,
        warnings,
        notes,
    }))
}

fn no_target() -> Outcome {
    Outcome::NoEffect("rule without a target only counts packets; nothing to translate".into())
}

/// Why `-j name` is not translated.
fn other_target(name: &str, user_chains: &HashSet<String>) -> String {
    if user_chains.contains(name) {
        format!(
            "-j {name}: jumps into user-defined chains are not followed; move its rules into \
             the built-in chain"
        )
    } else {
        match name {
            "REDIRECT" => "-j REDIRECT delivers to the box itself; the appliance translates \
                           forwarded traffic only"
                .into(),
            "DROP" | "REJECT" => format!("-j {name} filters; the nat table is no place for it"),
            _ => format!("target {name} is not supported"),
        }
    }
}

fn dnat(rule: &Rule, to: &NatRange, flags: TargetFlags, mut problems: Vec<String>) -> Outcome {
    let mut notes = Vec::new();
    let mut warnings = Vec::new();
    let Some(destination) = rule.destination else {
        problems.push(
            "DNAT without -d matches every destination; the config needs the VIP \
             (-d ADDRESS or PREFIX)"
                .into(),
        );
        return Outcome::Unsupported(problems);
    };
    // `--to-destination :PORT` keeps the address: the same prefix onto itself.
    let to_address = match to.addresses {
        None => Some(destination),
        Some((first, last)) if first != last => {
            problems.push(format!(
                "--to-destination {first}-{last} spreads connections over several backends; \
                 the config maps onto one address"
            ));
            None
        }
        Some((addr, _)) if destination.prefix_len() != 32 => {
            problems.push(format!(
                "-d {destination} onto the single address {addr}: many addresses onto one \
                 cannot be reversed (use NETMAP, or one rule per address)"
            ));
            None
        }
        Some((addr, _)) => Some(Ipv4Net::from(addr)),
    };
    let to_port = dnat_ports(rule.dport, to, &mut problems, &mut warnings);
    if flags.random || flags.persistent {
        notes.push("--random/--persistent have no effect here: the config maps one to one".into());
    }
    if !problems.is_empty() {
        return Outcome::Unsupported(problems);
    }
    Outcome::Translated(Box::new(Translated {
        entry: Entry::Dnat(DnatEntry {
            id: None,
            name: None,
            destination: Some(net_string(destination)),
            protocol: protocol(rule),
            port: rule.dport.map(port_spec),
            to_address: to_address.map(net_string),
            to_port: to_port.map(port_spec),
        }),
        in_interface: rule.in_interface.clone(),
        warnings,
        notes,
    }))
}

/// The config's `to_port` for `--dport matched` and the port part of `to`.
fn dnat_ports(
    matched: Option<PortRange>,
    to: &NatRange,
    problems: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Option<PortRange> {
    let written = to.ports?;
    let Some(matched) = matched else {
        problems.push(format!(
            "--to-destination port {written} without a --dport match: any port onto one \
             cannot be reversed"
        ));
        return None;
    };
    if let Some(base) = to.base {
        // `P-Q/BASE`: port BASE goes to P, BASE+1 to P+1, ... (iptables 1.8.6+).
        let start = i64::from(written.min) + i64::from(matched.min) - i64::from(base);
        let end = start + i64::from(matched.max - matched.min);
        if start < i64::from(written.min) || end > i64::from(written.max) {
            problems.push(format!(
                "--dport {matched} shifted by /{base} falls outside {written}"
            ));
            return None;
        }
        // Both within `written`, hence within u16.
        return Some(PortRange {
            min: start as u16,
            max: end as u16,
        });
    }
    if written.len() == 1 && matched.len() == 1 {
        return Some(written);
    }
    if written.len() != matched.len() {
        problems.push(format!(
            "--dport {matched} ({} ports) onto {written} ({} ports): the config maps a range \
             onto a range of the same size, one to one",
            matched.len(),
            written.len()
        ));
        return None;
    }
    warnings.push(format!(
        "iptables spreads connections over ports {written}; the config maps {matched} onto \
         {written} one to one (port {} to {}); `/{}` in --to-destination says so in iptables",
        matched.min, written.min, matched.min
    ));
    Some(written)
}

/// NETMAP in PREROUTING: the `-d` prefix onto the `--to` prefix, host bits kept.
fn netmap(rule: &Rule, to: Ipv4Net, mut problems: Vec<String>) -> Outcome {
    let Some(destination) = rule.destination else {
        problems.push("NETMAP without -d: the config needs the prefix to map".into());
        return Outcome::Unsupported(problems);
    };
    if destination.prefix_len() < to.prefix_len() {
        problems.push(format!(
            "NETMAP of {destination} onto the longer prefix {to} maps several addresses onto \
             one"
        ));
    }
    if !problems.is_empty() {
        return Outcome::Unsupported(problems);
    }
    // NETMAP replaces the bits `to`'s mask covers and keeps the rest; for a -d prefix at least
    // as long, that maps the whole -d prefix onto one prefix of its own length.
    let mask = u32::from(to.netmask());
    let mapped = (u32::from(to.network()) & mask) | (u32::from(destination.network()) & !mask);
    let to_address = Ipv4Net::new(Ipv4Addr::from(mapped), destination.prefix_len())
        .unwrap_or(destination)
        .trunc();
    Outcome::Translated(Box::new(Translated {
        entry: Entry::Dnat(DnatEntry {
            id: None,
            name: None,
            destination: Some(net_string(destination)),
            protocol: protocol(rule),
            port: rule.dport.map(port_spec),
            to_address: Some(net_string(to_address)),
            to_port: None,
        }),
        in_interface: rule.in_interface.clone(),
        warnings: vec![],
        notes: vec![],
    }))
}

/// `to_address` and `port_range` of an SNAT rule.
fn snat_to(to: &NatRange) -> Result<(AddressList, Option<PortSpec>), String> {
    if to.base.is_some() {
        return Err("--to-source: /BASE port shifting is not valid for SNAT".into());
    }
    let Some((first, last)) = to.addresses else {
        return Err("--to-source names no address".into());
    };
    let count = u64::from(u32::from(last)) - u64::from(u32::from(first)) + 1;
    if count > MAX_POOL_ADDRS as u64 {
        return Err(format!(
            "--to-source {first}-{last} is {count} addresses; a pool holds at most \
             {MAX_POOL_ADDRS}"
        ));
    }
    let addresses = if first == last {
        AddressList::One(first.to_string())
    } else {
        AddressList::Many(
            (u32::from(first)..=u32::from(last))
                .map(|a| Ipv4Addr::from(a).to_string())
                .collect(),
        )
    };
    Ok((addresses, to.ports.map(port_spec)))
}

fn snat_flags(flags: TargetFlags, warnings: &mut Vec<String>, notes: &mut Vec<String>) {
    for (set, option) in [
        (flags.random, "--random"),
        (flags.random_fully, "--random-fully"),
    ] {
        if set {
            warnings.push(format!(
                "{option} is not kept: the appliance keeps the inside port when it is free \
                 and in range, and otherwise probes from a random port"
            ));
        }
    }
    if flags.persistent {
        notes.push(
            "--persistent is what the appliance does anyway: one inside host, one external \
             address"
                .into(),
        );
    }
}

fn protocol(rule: &Rule) -> Option<String> {
    rule.protocol
        .and_then(|p| p.config_name())
        .map(str::to_string)
}

/// `198.18.100.10` for a /32 (as the README writes VIPs), `198.18.0.0/24` otherwise.
fn net_string(net: Ipv4Net) -> String {
    if net.prefix_len() == 32 {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

/// A single port as a TOML integer, a range as `"P-Q"`.
fn port_spec(range: PortRange) -> PortSpec {
    if range.min == range.max {
        PortSpec::Number(i64::from(range.min))
    } else {
        PortSpec::Text(format!("{}-{}", range.min, range.max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::iptables::{lex, rule};

    fn outcome(chain: &str, line: &str) -> Outcome {
        let (rule, problems) = rule::parse(&lex::words(line).unwrap());
        assert!(problems.is_empty(), "{line}: {problems:?}");
        let chains = HashSet::from(["MYCHAIN".to_string()]);
        match chain {
            "PREROUTING" => prerouting(&rule, &chains),
            _ => postrouting(&rule, &chains),
        }
    }

    fn dnat_of(line: &str) -> (DnatEntry, Vec<String>) {
        match outcome("PREROUTING", line) {
            Outcome::Translated(t) => match t.entry {
                Entry::Dnat(e) => (e, t.warnings),
                other => panic!("{line}: {other:?}"),
            },
            other => panic!("{line}: {other:?}"),
        }
    }

    fn snat_of(line: &str) -> (SnatEntry, Vec<String>) {
        match outcome("POSTROUTING", line) {
            Outcome::Translated(t) => match t.entry {
                Entry::Snat(e) => (e, t.warnings),
                other => panic!("{line}: {other:?}"),
            },
            other => panic!("{line}: {other:?}"),
        }
    }

    fn refused(chain: &str, line: &str) -> String {
        match outcome(chain, line) {
            Outcome::Unsupported(reasons) => reasons.join("; "),
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn dnat_forms() {
        let (e, w) = dnat_of(
            "-d 198.18.100.10/32 -i n0 -p tcp -m tcp --dport 80 -j DNAT \
                              --to-destination 198.18.1.2:80",
        );
        assert!(w.is_empty());
        assert_eq!(e.destination.as_deref(), Some("198.18.100.10"));
        assert_eq!(e.protocol.as_deref(), Some("tcp"));
        assert_eq!(e.port, Some(PortSpec::Number(80)));
        assert_eq!(e.to_address.as_deref(), Some("198.18.1.2"));
        assert_eq!(e.to_port, Some(PortSpec::Number(80)));

        // :22 onto :80; the whole address (any protocol); ICMP; port kept.
        let (e, _) = dnat_of(
            "-d 198.18.100.10/32 -p tcp --dport 22 -j DNAT \
                              --to-destination 198.18.1.2:80",
        );
        assert_eq!(e.to_port, Some(PortSpec::Number(80)));
        let (e, _) = dnat_of("-d 198.18.100.20/32 -j DNAT --to-destination 198.18.1.20");
        assert_eq!((e.protocol, e.port, e.to_port), (None, None, None));
        let (e, _) = dnat_of("-d 198.18.100.12 -p icmp -j DNAT --to-destination 198.18.1.2");
        assert_eq!(e.protocol.as_deref(), Some("icmp"));
        let (e, _) = dnat_of(
            "-d 198.18.100.10 -p udp --dport 53 -j DNAT \
                              --to-destination 198.18.1.2",
        );
        assert_eq!((e.port, e.to_port), (Some(PortSpec::Number(53)), None));
        // Port only: the address stays.
        let (e, _) = dnat_of("-d 198.18.100.10 -p tcp --dport 80 -j DNAT --to-destination :8080");
        assert_eq!(e.to_address.as_deref(), Some("198.18.100.10"));
        assert_eq!(e.to_port, Some(PortSpec::Number(8080)));
    }

    #[test]
    fn dnat_port_ranges() {
        // Shifted mapping (/BASE) is exact.
        let (e, w) = dnat_of(
            "-d 198.18.100.10 -p tcp --dport 8000:8009 -j DNAT \
                              --to-destination 198.18.1.2:9000-9009/8000",
        );
        assert!(w.is_empty());
        assert_eq!(e.port, Some(PortSpec::Text("8000-8009".into())));
        assert_eq!(e.to_port, Some(PortSpec::Text("9000-9009".into())));
        let (e, _) = dnat_of(
            "-d 198.18.100.10 -p tcp --dport 8002:8003 -j DNAT \
                              --to-destination 198.18.1.2:9000-9009/8000",
        );
        assert_eq!(e.to_port, Some(PortSpec::Text("9002-9003".into())));
        // Same size without /BASE: iptables spreads, the config maps one to one: a warning.
        let (e, w) = dnat_of(
            "-d 198.18.100.10 -p udp --dport 8000:8009 -j DNAT \
                              --to-destination 198.18.1.2:9000-9009",
        );
        assert_eq!(e.to_port, Some(PortSpec::Text("9000-9009".into())));
        assert!(w[0].contains("one to one"), "{w:?}");
        for (line, needle) in [
            (
                "-d 198.18.100.10 -p tcp --dport 8000:8009 -j DNAT --to-destination 1.2.3.4:80",
                "same size",
            ),
            (
                "-d 198.18.100.10 -p tcp --dport 80 -j DNAT --to-destination 1.2.3.4:80-81",
                "same size",
            ),
            (
                "-d 198.18.100.10 -p tcp --dport 8000:8009 -j DNAT \
                 --to-destination 1.2.3.4:9000-9009/7000",
                "falls outside",
            ),
            (
                "-d 198.18.100.10 -p tcp -j DNAT --to-destination 1.2.3.4:80",
                "without a --dport",
            ),
        ] {
            assert!(refused("PREROUTING", line).contains(needle), "{line}");
        }
    }

    #[test]
    fn netmap_maps_prefixes() {
        let (e, _) = dnat_of("-d 198.18.101.0/24 -j NETMAP --to 198.18.9.0/24");
        assert_eq!(e.destination.as_deref(), Some("198.18.101.0/24"));
        assert_eq!(e.to_address.as_deref(), Some("198.18.9.0/24"));
        // A longer -d prefix keeps its bits below --to's mask.
        let (e, _) = dnat_of("-d 198.18.101.128/25 -j NETMAP --to 198.18.9.0/24");
        assert_eq!(e.to_address.as_deref(), Some("198.18.9.128/25"));
        let (e, _) = dnat_of("-d 198.18.101.7/32 -j NETMAP --to 198.18.9.0/24");
        assert_eq!(e.to_address.as_deref(), Some("198.18.9.7"));
        assert!(refused(
            "PREROUTING",
            "-d 198.18.0.0/16 -j NETMAP --to 198.18.9.0/24"
        )
        .contains("longer prefix"));
        assert!(refused("PREROUTING", "-j NETMAP --to 198.18.9.0/24").contains("without -d"));
        assert!(refused(
            "POSTROUTING",
            "-s 198.18.0.0/24 -j NETMAP --to 203.0.113.0/24"
        )
        .contains("one to one"));
    }

    #[test]
    fn dnat_refusals() {
        for (line, needle) in [
            (
                "-p tcp --dport 80 -j DNAT --to-destination 1.2.3.4",
                "without -d",
            ),
            (
                "-d 198.18.100.0/24 -j DNAT --to-destination 1.2.3.4",
                "many addresses onto one",
            ),
            (
                "-d 198.18.100.10 -j DNAT --to-destination 1.2.3.4-1.2.3.5",
                "several backends",
            ),
            (
                "-s 198.18.0.0/24 -d 198.18.100.10 -j DNAT --to-destination 1.2.3.4",
                "destination only",
            ),
            ("-d 198.18.100.10 -j ACCEPT", "no DNAT exemption"),
            ("-d 198.18.100.10 -j REDIRECT", "to the box itself"),
            ("-d 198.18.100.10 -j MYCHAIN", "user-defined chains"),
            ("-d 198.18.100.10 -j LOG", "target LOG is not supported"),
            (
                "-s 198.18.0.0/24 -j MASQUERADE",
                "only valid in POSTROUTING",
            ),
        ] {
            assert!(refused("PREROUTING", line).contains(needle), "{line}");
        }
        assert!(matches!(
            outcome("PREROUTING", "-d 198.18.100.10"),
            Outcome::NoEffect(_)
        ));
    }

    #[test]
    fn snat_forms() {
        let (e, w) = snat_of("-s 192.168.1.0/24 -o eth0 -j MASQUERADE");
        assert!(w.is_empty());
        assert_eq!(e.source.as_deref(), Some("192.168.1.0/24"));
        assert_eq!(e.out_interface.as_deref(), Some("eth0"));
        assert_eq!(e.masquerade, Some(true));
        assert_eq!(e.port_range, None);

        let (e, _) = snat_of("-o eth0 -j MASQUERADE --to-ports 1024-65535");
        assert_eq!(e.source.as_deref(), Some("0.0.0.0/0"));
        assert_eq!(e.port_range, Some(PortSpec::Text("1024-65535".into())));

        let (e, _) = snat_of(
            "-s 198.18.0.0/24 -d 203.0.113.0/24 -p udp -j SNAT \
                              --to-source 203.0.113.1:1024-2047",
        );
        assert_eq!(e.destination.as_deref(), Some("203.0.113.0/24"));
        assert_eq!(e.protocol.as_deref(), Some("udp"));
        assert_eq!(e.to_address, Some(AddressList::One("203.0.113.1".into())));
        assert_eq!(e.port_range, Some(PortSpec::Text("1024-2047".into())));

        let (e, _) = snat_of("-s 198.18.0.0/24 -j SNAT --to-source 203.0.113.1-203.0.113.3");
        assert_eq!(
            e.to_address,
            Some(AddressList::Many(vec![
                "203.0.113.1".into(),
                "203.0.113.2".into(),
                "203.0.113.3".into()
            ]))
        );

        for target in ["RETURN", "ACCEPT"] {
            let (e, _) = snat_of(&format!("-s 198.18.0.0/24 -d 203.0.113.250/32 -j {target}"));
            assert_eq!(e.no_nat, Some(true));
            assert_eq!(e.destination.as_deref(), Some("203.0.113.250"));
        }

        let (_, w) = snat_of("-s 198.18.0.0/24 -j MASQUERADE --random-fully");
        assert!(w[0].contains("--random-fully is not kept"), "{w:?}");
    }

    #[test]
    fn snat_refusals() {
        for (line, needle) in [
            ("-s 198.18.0.0/24 -i eth0 -j MASQUERADE", "-i is not valid"),
            (
                "-s 198.18.0.0/24 -p tcp --dport 80 -j MASQUERADE",
                "do not match ports",
            ),
            (
                "-s 198.18.0.0/24 -j SNAT --to-source 203.0.113.0-203.0.113.255",
                "at most 64",
            ),
            (
                "-d 198.18.100.10 -j DNAT --to-destination 1.2.3.4",
                "only valid in PREROUTING",
            ),
            ("-s 198.18.0.0/24 -j MYCHAIN", "user-defined chains"),
            (
                "-s 198.18.0.0/24 -j SNAT --to-source :1024-2047",
                "names no address",
            ),
            (
                "-s 198.18.0.0/24 -j SNAT --to-source 203.0.113.1:1024-2047/1024",
                "/BASE",
            ),
        ] {
            assert!(refused("POSTROUTING", line).contains(needle), "{line}");
        }
    }
}
