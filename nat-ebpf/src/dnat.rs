//! Destination NAT: the rule for a packet and its stateless rewrite. Rules that need a session
//! are taken on by `nat::try_rules`.

use nat_common::{
    conntrack::{FlowKey, NO_RULE},
    ipv4::{icmp_is_error, proto},
    rules::{NatRule, NatRuleSet, SetMatch, MAX_RULES_PER_SET},
    stats::Reason,
};

use crate::{
    frag,
    packet::Frame,
    parse::{Ipv4Packet, L4Kind, L4},
    rewrite::rewrite,
    stats::{count_rule, Direction},
};

/// Which side of the packet a rule rewrites.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Original direction: destination (VIP -> backend).
    Destination,
    /// Reply direction: source (backend -> VIP).
    Source,
}

/// The first rule of `set` that applies to the packet, or `None`.
///
/// Ports are consulted only when some rule for this protocol needs them, so packets no port
/// rule cares about need no complete L4 header. A first fragment has its ports and matches
/// like any packet (its later fragments follow it through `frag`); a later fragment has none,
/// and a port rule cannot judge it.
#[inline(always)]
pub fn find_rule(
    pkt: &Ipv4Packet,
    l4: &L4,
    set: &NatRuleSet,
    side: Side,
) -> Result<Option<NatRule>, Reason> {
    let port = if pkt.info.is_later_fragment || !set.needs_port_for(pkt.proto) {
        None
    } else {
        match l4.kind {
            L4Kind::Tcp | L4Kind::Udp => Some(u16::from_be_bytes(match side {
                Side::Destination => l4.dport,
                Side::Source => l4.sport,
            })),
            L4Kind::Truncated => return Err(Reason::TruncatedL4),
            _ => None,
        }
    };
    let index = match set.find(pkt.proto, port) {
        SetMatch::None => return Ok(None),
        SetMatch::NeedsPorts => return Err(Reason::FragmentUnmatched),
        SetMatch::Rule(i) => i,
    };
    if index >= MAX_RULES_PER_SET {
        return Ok(None);
    }
    if pkt.proto == proto::DCCP || pkt.proto == proto::UDPLITE {
        return Err(Reason::ProtoUnsupported);
    }
    match l4.kind {
        // ICMP errors quote another packet's header; rewriting only the outer header would
        // leave the quote inconsistent. The translatable ones never get here (`icmp` takes
        // them); what is left (redirects) goes to the kernel untouched.
        L4Kind::IcmpOther if icmp_is_error(l4.icmp_type) => Err(Reason::IcmpErrorPassed),
        L4Kind::Truncated => Err(Reason::TruncatedL4),
        _ => Ok(Some(set.rules[index])),
    }
}

/// The tuple `key` becomes under `rule` on `side`.
#[inline(always)]
pub fn translated(pkt: &Ipv4Packet, key: &FlowKey, rule: &NatRule, side: Side) -> FlowKey {
    let mut to = *key;
    // Later fragments carry no ports: only their addresses change.
    let ports = !pkt.info.is_later_fragment;
    match side {
        Side::Destination => {
            to.dst = rule.translate_addr(key.dst);
            if ports {
                to.dport = rule
                    .translate_port(u16::from_be_bytes(key.dport))
                    .to_be_bytes();
            }
        }
        Side::Source => {
            to.src = rule.translate_addr(key.src);
            if ports {
                to.sport = rule
                    .translate_port(u16::from_be_bytes(key.sport))
                    .to_be_bytes();
            }
        }
    }
    to
}

/// Applies a DNAT rule without a session: `Destination` for the original direction (VIP ->
/// backend), `Source` for a backend's reply (backend -> VIP).
#[inline(always)]
pub fn apply_stateless<C: Frame>(
    ctx: &C,
    pkt: &Ipv4Packet,
    l4: &L4,
    key: &FlowKey,
    rule: &NatRule,
    side: Side,
) -> Result<Reason, Reason> {
    let to = translated(pkt, key, rule, side);
    if let Some(reason) = crate::conntrack::too_big(ctx, pkt, key, &to) {
        return Err(reason);
    }
    rewrite(ctx, pkt, l4, key, &to)?;
    let (direction, reason) = match side {
        Side::Destination => (Direction::Original, Reason::DnatTranslated),
        Side::Source => (Direction::Reply, Reason::DnatReplyTranslated),
    };
    count_rule(ctx, rule.counter_index, direction, ctx.packet_len() as u64);
    frag::remember(pkt, &to, rule.counter_index, NO_RULE, direction);
    Ok(reason)
}
