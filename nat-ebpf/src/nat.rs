//! The order in which a packet meets the NAT's tables, split over programs so each one stays
//! within the verifier's limits and established traffic runs the least code.
//!
//! `xdp_nat` (attached to the interfaces), [`try_translate`]:
//! 0. traffic that is not ours: `[[bypass]]` entries (one trie lookup), straight to the kernel;
//!    later fragments whose first fragment was translated get its addresses (`frag`);
//! 1. known flows (sessions, either direction): one or two hash lookups;
//! 2. stateless DNAT, forward (destination) and reverse (source of a backend's reply);
//! 3. anything that may start a session goes on to `xdp_nat_rules` by tail call.
//!
//! ICMP errors go to `xdp_nat_icmp_error` by tail call before any of this (`icmp`): they are
//! looked up by the datagram they quote, not by their own tuple.
//!
//! `xdp_nat_rules`, [`try_rules`]: DNAT rules that need a session (stateful, or SNAT applies
//! too), hairpinning (an inside host to another inside host's external endpoint) and SNAT
//! rules; a new session goes on to `xdp_nat_new_flow` (`newflow`). A packet that would start
//! an SNAT session but is addressed to this host is never translated (`local_destination`).

use nat_common::{
    conntrack::FlowKey,
    ipv4::{icmp_is_error, proto},
    maps::RULES_SLOT,
    prefilter::FilterTable,
    rules::RULE_SNAT_CHECK,
    stats::Reason,
};

use crate::{
    conntrack::{self, same_endpoint},
    dnat::{self, Side},
    forward, frag, icmp,
    maps::{rule_bank, rule_lookup, BINDINGS, BYPASS, DNAT_FORWARD, DNAT_REVERSE, SNAT_RULES},
    newflow,
    packet::Frame,
    parse::{parse_ipv4, read_l4, Ipv4Packet, L4Kind, L4},
    snat::{self, SnatDecision},
};

/// Body of `xdp_nat`. `Ok` and `Err` both carry the exit reason.
#[inline(always)]
pub fn try_translate<C: Frame>(ctx: &C) -> Result<Reason, Reason> {
    let pkt = parse_ipv4(ctx)?;
    let l4 = read_l4(ctx, &pkt);
    let bank = rule_bank();
    // Not ours, whatever else matches: health probes, management, exempt destinations.
    if let Some(set) = rule_lookup(&BYPASS, FilterTable::Bypass, bank, pkt.dst) {
        let dport = match l4.kind {
            L4Kind::Tcp | L4Kind::Udp => Some(u16::from_be_bytes(l4.dport)),
            _ => None,
        };
        if set.matches(pkt.src, pkt.proto, dport) {
            return Err(Reason::Bypass);
        }
    }
    // Where XDP forwards, it is the router: a packet whose TTL runs out here goes to the kernel
    // untranslated, which answers the real sender with ICMP time exceeded quoting what it sent.
    if pkt.ttl <= 1 && forward::enabled(ctx) {
        return Err(Reason::TtlExpiring);
    }
    if pkt.info.is_later_fragment {
        if let Some(reason) = frag::translate_later(ctx, &pkt, &l4)? {
            return Ok(reason);
        }
    }
    if icmp::is_error(&l4) {
        return Err(icmp::hand_over(ctx));
    }
    let key = l4.flow_key(&pkt);

    if l4.trackable(&pkt) {
        if let Some(reason) = conntrack::translate_existing(ctx, &pkt, &l4, &key)? {
            return Ok(reason);
        }
    }
    if let Some(set) = rule_lookup(&DNAT_FORWARD, FilterTable::DnatForward, bank, pkt.dst) {
        if let Some(rule) = dnat::find_rule(&pkt, &l4, set, Side::Destination)? {
            // An SNAT check can only find something if the source has SNAT rules at all
            // (destination NAT leaves the source as it is): one trie lookup here spares
            // stateless DNAT flows the tail call.
            let snat_possible = rule.flags & RULE_SNAT_CHECK != 0
                && rule_lookup(&SNAT_RULES, FilterTable::Snat, bank, pkt.src).is_some();
            if rule.is_stateful() || snat_possible {
                return Err(to_rules_program(ctx));
            }
            return dnat::apply_stateless(ctx, &pkt, &l4, &key, &rule, Side::Destination);
        }
    }
    if let Some(set) = rule_lookup(&DNAT_REVERSE, FilterTable::DnatReverse, bank, pkt.src) {
        if let Some(rule) = dnat::find_rule(&pkt, &l4, set, Side::Source)? {
            // A backend talking to the appliance itself (its DNS, a health check the box
            // runs) is not a reply through the NAT: the box must see the backend's address.
            if snat::is_local(pkt.dst) {
                return Err(Reason::LocalDestination);
            }
            return dnat::apply_stateless(ctx, &pkt, &l4, &key, &rule, Side::Source);
        }
    }
    if rule_lookup(&SNAT_RULES, FilterTable::Snat, bank, pkt.src).is_some() {
        return Err(to_rules_program(ctx));
    }
    Err(Reason::NoMatch)
}

/// Tail-calls `xdp_nat_rules`; returns only if that failed.
#[inline(always)]
fn to_rules_program<C: Frame>(ctx: &C) -> Reason {
    // SAFETY: tail_call either does not return or returns on failure; nothing is held across.
    unsafe { C::programs().tail_call(ctx, RULES_SLOT) };
    Reason::NewFlowUnavailable
}

/// Body of `xdp_nat_rules`: the packet matched no session, and either a DNAT rule that may
/// need one or no DNAT rule at all.
#[inline(always)]
pub fn try_rules<C: Frame>(ctx: &C) -> Result<Reason, Reason> {
    let pkt = parse_ipv4(ctx)?;
    let l4 = read_l4(ctx, &pkt);
    let key = l4.flow_key(&pkt);
    let trackable = l4.trackable(&pkt);

    // The bank is read again rather than handed over: this program decides everything from
    // scratch, so whichever bank it reads, the decision comes from one complete rule set.
    let bank = rule_bank();
    // Destination first (PREROUTING), then source rules on the translated packet (POSTROUTING).
    let mut dnat_rule = None;
    if let Some(set) = rule_lookup(&DNAT_FORWARD, FilterTable::DnatForward, bank, pkt.dst) {
        dnat_rule = dnat::find_rule(&pkt, &l4, set, Side::Destination)?;
    }
    // Hairpinning: no DNAT rule, and the destination is an external endpoint the NAT holds for
    // an inside endpoint. The flow then goes to that inside endpoint, with the sender's source
    // translated by its SNAT rule, so the destination sees (and answers) the sender's external
    // endpoint, as RFC 4787 REQ-9 and RFC 5382 REQ-8 ask.
    let hairpin = if dnat_rule.is_none() && trackable {
        hairpin_target(&key)
    } else {
        None
    };
    let (to, check_snat, stateful) = match (&dnat_rule, hairpin) {
        (Some(rule), _) => (
            dnat::translated(&pkt, &key, rule, Side::Destination),
            rule.flags & RULE_SNAT_CHECK != 0,
            rule.is_stateful(),
        ),
        (None, Some(inside)) => (inside, true, false),
        (None, None) => (key, true, false),
    };
    // One call site for the SNAT walk (DNAT, hairpin or plain): each inlined copy of its
    // bounded loop would cost the verifier as much again.
    let decision = if check_snat && trackable {
        snat::decide(ctx, bank, &to, pkt.info.total_len as u16)
    } else {
        SnatDecision::NoRule
    };

    if hairpin.is_some() {
        return Err(match decision {
            SnatDecision::Translate(choice) => {
                newflow::hand_over(ctx, &key, &to, None, Some(choice))
            }
            _ => Reason::HairpinNoSnat,
        });
    }

    if let Some(rule) = &dnat_rule {
        let snat = match decision {
            SnatDecision::Translate(choice) => Some(choice),
            SnatDecision::Exempt | SnatDecision::NoRule | SnatDecision::Local => None,
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
            return Err(if pkt.info.is_later_fragment {
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
        SnatDecision::Local => return Err(Reason::LocalDestination),
        // Untrackable packets never reached `decide`: tell why they cannot be translated.
        SnatDecision::NoRule if trackable => return Err(Reason::NoMatch),
        SnatDecision::NoRule => {
            return Err(untrackable_reason(ctx, bank, &pkt, &l4, &key));
        }
    };
    Err(newflow::hand_over(ctx, &key, &key, None, Some(choice)))
}

/// The tuple a hairpinned packet goes on with: its destination replaced by the inside
/// endpoint that holds the external endpoint it is addressed to. `None` when the destination
/// is no external endpoint of the NAT (or, degenerately, is the sender's own).
#[inline(always)]
fn hairpin_target(key: &FlowKey) -> Option<FlowKey> {
    if key.proto != proto::TCP && key.proto != proto::UDP {
        return None;
    }
    // SAFETY: pointer from a successful lookup; copied out at once.
    let inside = unsafe { *BINDINGS.get_ptr(&key.destination())? };
    if same_endpoint(&inside, &key.source()) {
        return None;
    }
    let mut to = *key;
    to.dst = inside.addr;
    to.dport = inside.port;
    Some(to)
}

/// Why a packet with SNAT rules for its source but no trackable tuple is not translated.
#[inline(always)]
fn untrackable_reason<C: Frame>(
    ctx: &C,
    bank: u32,
    pkt: &Ipv4Packet,
    l4: &L4,
    key: &FlowKey,
) -> Reason {
    match snat::decide(ctx, bank, key, pkt.info.total_len as u16) {
        SnatDecision::NoRule => return Reason::NoMatch,
        // Exempt traffic (an IPsec bypass, say) passes whatever its protocol.
        SnatDecision::Exempt => return Reason::SnatExempt,
        SnatDecision::Local => return Reason::LocalDestination,
        SnatDecision::Translate(_) => {}
    }
    if pkt.info.is_later_fragment {
        return Reason::SnatFragment;
    }
    match l4.kind {
        L4Kind::Truncated => Reason::TruncatedL4,
        L4Kind::IcmpOther if icmp_is_error(l4.icmp_type) => Reason::IcmpErrorPassed,
        _ => Reason::SnatProtoUnsupported,
    }
}
