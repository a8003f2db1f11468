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
    conntrack::{FlowKey, Mapping, Session},
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

/// The tuple of a parsed packet, or `None` when it does not parse (the floors then abort).
#[inline(always)]
fn tuple(ctx: &XdpContext) -> Option<FlowKey> {
    let pkt = parse_ipv4(ctx).ok()?;
    Some(read_l4(ctx, &pkt).flow_key(&pkt))
}

/// A floor's verdict: `XDP_PASS` when it did all it was meant to (so the benchmark can check
/// that it measured the hit or the inserts it meant to), `XDP_DROP` when not, `XDP_ABORTED`
/// for a packet that did not parse.
#[inline(always)]
fn floor_verdict(done: Option<bool>) -> u32 {
    match done {
        Some(true) => xdp_action::XDP_PASS,
        Some(false) => xdp_action::XDP_DROP,
        None => xdp_action::XDP_ABORTED,
    }
}

/// Parses the packet and looks its tuple up in `SESSIONS`, nothing more: the least any
/// stateful translation does (it must at least find its session). Passes on a hit.
#[inline(always)]
pub fn session_lookup_only(ctx: &XdpContext) -> u32 {
    floor_verdict(tuple(ctx).map(|key| SESSIONS.get_ptr(&key).is_some()))
}

/// Parses the packet and looks its destination up in the DNAT rule trie, nothing more: the
/// least a stateless rule translation does. Passes on a hit.
#[inline(always)]
pub fn rule_lookup_only(ctx: &XdpContext) -> u32 {
    floor_verdict(tuple(ctx).map(|key| {
        rule_lookup(
            &DNAT_FORWARD,
            FilterTable::DnatForward,
            rule_bank(),
            key.dst,
        )
        .is_some()
    }))
}

/// Parses the packet and inserts, keyed by its tuple, the four entries a new SNAT flow creates:
/// `SESSIONS` (the tuple), `REPLIES` (the reversed tuple), `MAPPINGS` and `BINDINGS` (its
/// source endpoint), each with an all-zero value, if absent. Nothing else: no rule, no port
/// search, no rewrite, no session filter. The entries are junk the benchmark deletes at once
/// (a zero session translates nothing). Passes when all four were inserted.
#[inline(always)]
pub fn new_flow_inserts_only(ctx: &XdpContext) -> u32 {
    floor_verdict(tuple(ctx).map(|key| insert_four(&key)))
}

/// The four inserts of [`new_flow_inserts_only`]; true when all went in.
#[inline(always)]
fn insert_four(key: &FlowKey) -> bool {
    let endpoint = key.source();
    let mut session = MaybeUninit::uninit();
    let mut mapping = MaybeUninit::uninit();
    // SAFETY: all-zero `Session` and `Mapping` are valid plain data.
    let (session, mapping): (&mut Session, &mut Mapping) =
        unsafe { (zero_fill(&mut session), zero_fill(&mut mapping)) };
    let flags = BPF_NOEXIST as u64;
    SESSIONS.insert(key, &*session, flags).is_ok()
        && REPLIES.insert(&key.reversed(), key, flags).is_ok()
        && MAPPINGS.insert(&endpoint, &*mapping, flags).is_ok()
        && BINDINGS.insert(&endpoint, &endpoint, flags).is_ok()
}
