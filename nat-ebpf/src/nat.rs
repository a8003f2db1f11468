//! The order in which a packet meets the NAT's tables, split over programs so each one stays
//! within the verifier's limits and established traffic runs the least code.
//!
//! `xdp_nat` (attached to the interfaces), [`try_translate`]:
//! 1. known flows (sessions, either direction): one or two hash lookups;
//! 2. stateless DNAT, forward (destination) and reverse (source of a backend's reply);
//! 3. anything that may start a session goes on to `xdp_nat_rules` by tail call.
//!
//! ICMP errors go to `xdp_nat_icmp_error` by tail call before any of this (`icmp`): they are
//! looked up by the datagram they quote, not by their own tuple.
//!
//! `xdp_nat_rules`, [`try_rules`]: DNAT rules that need a session (stateful, or SNAT applies
//! too) and SNAT rules; a new session goes on to `xdp_nat_new_flow` (`newflow`).

use aya_ebpf::programs::XdpContext;
use nat_common::{
    conntrack::FlowKey, ipv4::icmp_is_error, maps::RULES_SLOT, rules::RULE_SNAT_CHECK,
    stats::Reason,
};

use crate::{
    conntrack,
    dnat::{self, Side},
    forward, icmp,
    maps::{rule_bank, rule_lookup, DNAT_FORWARD, DNAT_REVERSE, PROGRAMS, SNAT_RULES},
    newflow,
    parse::{parse_ipv4, read_l4, Ipv4Packet, L4Kind, L4},
    snat::{self, SnatDecision},
};

/// Body of `xdp_nat`. `Ok` and `Err` both carry the exit reason.
#[inline(always)]
pub fn try_translate(ctx: &XdpContext) -> Result<Reason, Reason> {
    let pkt = parse_ipv4(ctx)?;
    // Where XDP forwards, it is the router: a packet whose TTL runs out here goes to the kernel
    // untranslated, which answers the real sender with ICMP time exceeded quoting what it sent.
    if pkt.ttl <= 1 && forward::enabled(ctx) {
        return Err(Reason::TtlExpiring);
    }
    let l4 = read_l4(ctx, &pkt);
    if icmp::is_error(&l4) {
        return Err(icmp::hand_over(ctx));
    }
    let key = l4.flow_key(&pkt);

    if l4.trackable(&pkt) {
        if let Some(reason) = conntrack::translate_existing(ctx, &pkt, &l4, &key)? {
            return Ok(reason);
        }
    }
    let bank = rule_bank();
    if let Some(set) = rule_lookup(&DNAT_FORWARD, bank, pkt.dst) {
        if let Some(rule) = dnat::find_rule(&pkt, &l4, set, Side::Destination)? {
            // An SNAT check can only find something if the source has SNAT rules at all
            // (destination NAT leaves the source as it is): one trie lookup here spares
            // stateless DNAT flows the tail call.
            let snat_possible = rule.flags & RULE_SNAT_CHECK != 0
                && rule_lookup(&SNAT_RULES, bank, pkt.src).is_some();
            if rule.is_stateful() || snat_possible {
                return Err(to_rules_program(ctx));
            }
            return dnat::apply_stateless(ctx, &pkt, &l4, &key, &rule, Side::Destination);
        }
    }
    if let Some(set) = rule_lookup(&DNAT_REVERSE, bank, pkt.src) {
        if let Some(rule) = dnat::find_rule(&pkt, &l4, set, Side::Source)? {
            return dnat::apply_stateless(ctx, &pkt, &l4, &key, &rule, Side::Source);
        }
    }
    if rule_lookup(&SNAT_RULES, bank, pkt.src).is_some() {
        return Err(to_rules_program(ctx));
    }
    Err(Reason::NoMatch)
}

/// Tail-calls `xdp_nat_rules`; returns only if that failed.
#[inline(always)]
fn to_rules_program(ctx: &XdpContext) -> Reason {
    // SAFETY: tail_call either does not return or returns on failure; nothing is held across.
    unsafe { PROGRAMS.tail_call(ctx, RULES_SLOT) };
    Reason::NewFlowUnavailable
}

/// Body of `xdp_nat_rules`: the packet matched no session, and either a DNAT rule that may
/// need one or no DNAT rule at all.
#[inline(always)]
pub fn try_rules(ctx: &XdpContext) -> Result<Reason, Reason> {
    let pkt = parse_ipv4(ctx)?;
    let l4 = read_l4(ctx, &pkt);
    let key = l4.flow_key(&pkt);
    let trackable = l4.trackable(&pkt);

    // The bank is read again rather than handed over: this program decides everything from
    // scratch, so whichever bank it reads, the decision comes from one complete rule set.
    let bank = rule_bank();
    // Destination first (PREROUTING), then source rules on the translated packet (POSTROUTING).
    let mut dnat_rule = None;
    if let Some(set) = rule_lookup(&DNAT_FORWARD, bank, pkt.dst) {
        dnat_rule = dnat::find_rule(&pkt, &l4, set, Side::Destination)?;
    }
    let (to, check_snat, stateful) = match &dnat_rule {
        Some(rule) => (
            dnat::translated(&pkt, &key, rule, Side::Destination),
            rule.flags & RULE_SNAT_CHECK != 0,
            rule.is_stateful(),
        ),
        None => (key, true, false),
    };
    let decision = if check_snat && trackable {
        snat::decide(ctx, bank, &to, pkt.info.total_len as u16)
    } else {
        SnatDecision::NoRule
    };

    if let Some(rule) = &dnat_rule {
        let snat = match decision {
            SnatDecision::Translate(choice) => Some(choice),
            SnatDecision::Exempt | SnatDecision::NoRule => None,
        };
        if trackable && (stateful || snat.is_some()) {
            return Err(newflow::hand_over(
                ctx,
                &key,
                &to,
                Some(rule.counter_index),
                snat,
            ));
        }
        if stateful {
            // No tuple to track (a fragment, or a protocol without ports): its replies could
            // not be restored, so leave it to the kernel rather than translate one way only.
            return Err(if pkt.info.is_fragment {
                Reason::FragmentUnmatched
            } else {
                Reason::ProtoUnsupported
            });
        }
        return dnat::apply_stateless(ctx, &pkt, &l4, &key, rule, Side::Destination);
    }

    let choice = match decision {
        SnatDecision::Translate(choice) => choice,
        SnatDecision::Exempt => return Err(Reason::SnatExempt),
        // Untrackable packets never reached `decide`: tell why they cannot be translated.
        SnatDecision::NoRule if trackable => return Err(Reason::NoMatch),
        SnatDecision::NoRule => {
            return Err(untrackable_reason(ctx, bank, &pkt, &l4, &key));
        }
    };
    Err(newflow::hand_over(ctx, &key, &key, None, Some(choice)))
}

/// Why a packet with SNAT rules for its source but no trackable tuple is not translated.
#[inline(always)]
fn untrackable_reason(
    ctx: &XdpContext,
    bank: u32,
    pkt: &Ipv4Packet,
    l4: &L4,
    key: &FlowKey,
) -> Reason {
    match snat::decide(ctx, bank, key, pkt.info.total_len as u16) {
        SnatDecision::NoRule => return Reason::NoMatch,
        // Exempt traffic (an IPsec bypass, say) passes whatever its protocol.
        SnatDecision::Exempt => return Reason::SnatExempt,
        SnatDecision::Translate(_) => {}
    }
    if pkt.info.is_fragment {
        return Reason::SnatFragment;
    }
    match l4.kind {
        L4Kind::Truncated => Reason::TruncatedL4,
        L4Kind::IcmpOther if icmp_is_error(l4.icmp_type) => Reason::IcmpErrorPassed,
        _ => Reason::SnatProtoUnsupported,
    }
}
