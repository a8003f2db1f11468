//! The new-flow stage: `xdp_nat` decides that a packet starts a session, writes the decision to
//! the per-CPU `NEW_FLOW` slot and tail-calls `xdp_nat_new_flow`, which allocates the external
//! endpoint, inserts the session and translates the packet.
//!
//! Why a separate program: allocation (a bounded probe loop with map inserts) on top of rule
//! evaluation exceeds what the verifier can explore in one program, and established flows
//! should not carry its code.

use aya_ebpf::programs::XdpContext;
use nat_common::{conntrack::FlowKey, maps::NEW_FLOW_SLOT, stats::Reason};

use crate::{
    conntrack::{self, same_key},
    maps::{NEW_FLOW, PROGRAMS},
    parse::{parse_ipv4, read_l4},
    snat::SnatChoice,
};

/// The decision handed to the new-flow program.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NewFlow {
    /// The packet's tuple as it arrived (the session key).
    pub key: FlowKey,
    /// The tuple after destination NAT (equal to `key` without DNAT).
    pub to: FlowKey,
    /// DNAT rule counter slot, when `has_dnat`.
    pub dnat_rule: u32,
    /// SNAT rule counter slot, when `has_snat`.
    pub snat_rule: u32,
    /// SNAT pool id, when `has_snat`.
    pub snat_pool: u32,
    /// MASQUERADE source, when `masquerade`.
    pub masquerade_src: [u8; 4],
    /// 1 when a DNAT rule made this flow.
    pub has_dnat: u8,
    /// 1 when the source is translated.
    pub has_snat: u8,
    /// 1 when `masquerade_src` is the external address.
    pub masquerade: u8,
    /// Zero.
    pub _pad: u8,
}

/// Hands the packet to the new-flow program. Returns only if the tail call failed.
#[inline(always)]
pub fn hand_over(
    ctx: &XdpContext,
    key: &FlowKey,
    to: &FlowKey,
    dnat_rule: Option<u32>,
    snat: Option<SnatChoice>,
) -> Reason {
    let Some(slot) = NEW_FLOW.get_ptr_mut(0) else {
        return Reason::NewFlowUnavailable;
    };
    // SAFETY: per-CPU slot from a successful lookup; only this CPU touches it.
    let slot = unsafe { &mut *slot };
    slot.key = *key;
    slot.to = *to;
    slot.has_dnat = dnat_rule.is_some() as u8;
    slot.dnat_rule = dnat_rule.unwrap_or(0);
    slot.has_snat = snat.is_some() as u8;
    if let Some(choice) = snat {
        slot.snat_rule = choice.rule_slot;
        slot.snat_pool = choice.pool;
        slot.masquerade = choice.masquerade_src.is_some() as u8;
        slot.masquerade_src = choice.masquerade_src.unwrap_or([0; 4]);
    }
    // SAFETY: tail_call either does not return or returns on failure; nothing is held across.
    unsafe { PROGRAMS.tail_call(ctx, NEW_FLOW_SLOT) };
    Reason::NewFlowUnavailable
}

/// Body of `xdp_nat_new_flow`.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> Result<Reason, Reason> {
    let pkt = parse_ipv4(ctx)?;
    let l4 = read_l4(ctx, &pkt);
    let Some(slot) = NEW_FLOW.get_ptr(0) else {
        return Err(Reason::NewFlowUnavailable);
    };
    // SAFETY: per-CPU slot from a successful lookup, written by xdp_nat just before.
    let flow = unsafe { *slot };
    let key = l4.flow_key(&pkt);
    // Only reachable by tail call from xdp_nat on this CPU for this packet; check anyway so a
    // stale slot can never translate the wrong packet.
    if !same_key(&key, &flow.key) {
        return Err(Reason::NewFlowUnavailable);
    }
    let dnat_rule = if flow.has_dnat != 0 {
        Some(flow.dnat_rule)
    } else {
        None
    };
    let snat = if flow.has_snat != 0 {
        Some(SnatChoice {
            rule_slot: flow.snat_rule,
            pool: flow.snat_pool,
            masquerade_src: if flow.masquerade != 0 {
                Some(flow.masquerade_src)
            } else {
                None
            },
        })
    } else {
        None
    };
    conntrack::create(ctx, &pkt, &l4, &key, flow.to, dnat_rule, snat)
}
