//! Reference program for benchmarks: parses exactly what `xdp_nat` parses (Ethernet, VLAN,
//! IPv4, L4) and passes the packet. Measured beside the NAT in the same run, it gives the floor
//! that translation costs are expressed against. Never attached by the agent.
//!
//! Two more references put a floor under the translation rows: the parse plus the one map
//! lookup a translation cannot do without (its session, or its rule), and nothing else; and
//! the parse plus the four inserts a new SNAT flow makes (session, reply tuple, mapping,
//! binding), and nothing else.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{xdp_action, BPF_NOEXIST},
    programs::XdpContext,
};
use nat_common::{
    conntrack::{Mapping, Session},
    prefilter::FilterTable,
    stats::Reason,
};

use crate::{
    maps::{rule_bank, rule_lookup, BINDINGS, DNAT_FORWARD, MAPPINGS, REPLIES, SESSIONS},
    parse::{parse_ipv4, read_l4, L4Kind},
    zero::zero_fill,
};

/// Parses the packet; the reason only keeps the work from being optimised away.
#[inline(always)]
pub fn parse_only(ctx: &XdpContext) -> Reason {
    match parse_ipv4(ctx) {
        Ok(pkt) => {
            if read_l4(ctx, &pkt).kind == L4Kind::Truncated {
                Reason::TruncatedL4
            } else {
                Reason::NoMatch
            }
        }
        Err(reason) => reason,
    }
}

/// Parses the packet and looks its tuple up in `SESSIONS`, nothing more: the least any
/// stateful translation does (it must at least find its session). Passes on a hit and drops on
/// a miss, so the benchmark can check that it measured the hit it meant to.
#[inline(always)]
pub fn session_lookup_only(ctx: &XdpContext) -> u32 {
    let Ok(pkt) = parse_ipv4(ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    let key = read_l4(ctx, &pkt).flow_key(&pkt);
    if SESSIONS.get_ptr(&key).is_some() {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// Parses the packet and looks its destination up in the DNAT rule trie, nothing more: the
/// least a stateless rule translation does. Passes on a hit and drops on a miss.
#[inline(always)]
pub fn rule_lookup_only(ctx: &XdpContext) -> u32 {
    let Ok(pkt) = parse_ipv4(ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    let key = read_l4(ctx, &pkt).flow_key(&pkt);
    if rule_lookup(
        &DNAT_FORWARD,
        FilterTable::DnatForward,
        rule_bank(),
        key.dst,
    )
    .is_some()
    {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// Parses the packet and inserts, keyed by its tuple, the four entries a new SNAT flow creates:
/// `SESSIONS` (the tuple), `REPLIES` (the reversed tuple), `MAPPINGS` and `BINDINGS` (its
/// source endpoint), each with an all-zero value, if absent. Nothing else: no rule, no port
/// search, no rewrite, no session filter. The entries are junk the benchmark deletes at once
/// (a zero session translates nothing). Passes when all four were inserted, drops otherwise.
#[inline(always)]
pub fn new_flow_inserts_only(ctx: &XdpContext) -> u32 {
    let Ok(pkt) = parse_ipv4(ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    let key = read_l4(ctx, &pkt).flow_key(&pkt);
    let endpoint = key.source();
    let mut session = MaybeUninit::uninit();
    let mut mapping = MaybeUninit::uninit();
    // SAFETY: all-zero `Session` and `Mapping` are valid plain data.
    let (session, mapping): (&mut Session, &mut Mapping) =
        unsafe { (zero_fill(&mut session), zero_fill(&mut mapping)) };
    let flags = BPF_NOEXIST as u64;
    let inserted = SESSIONS.insert(&key, &*session, flags).is_ok()
        && REPLIES.insert(&key.reversed(), &key, flags).is_ok()
        && MAPPINGS.insert(&endpoint, &*mapping, flags).is_ok()
        && BINDINGS.insert(&endpoint, &endpoint, flags).is_ok();
    if inserted {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}
