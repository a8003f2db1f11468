//! The new-flow stage: `xdp_nat` decides that a packet starts a session, writes the decision to
//! the per-CPU `NEW_FLOW` slot and tail-calls `xdp_nat_new_flow`, which allocates the external
//! endpoint, inserts the session and translates the packet.
//!
//! Why a separate program: allocation (a bounded probe loop with map inserts) on top of rule
//! evaluation exceeds what the verifier can explore in one program, and established flows
//! should not carry its code.
//!
//! A flow whose inside endpoint needs a new external port takes one more hop: the new-flow
//! program tail-calls `xdp_nat_claim` ([`claim`]), which claims the port and the mapping,
//! records them in the slot and tail-calls the new-flow program again, which then creates the
//! session. The claim (free-port index search, inserts, the endpoint-mapping race) on top of
//! session creation would not fit one 512-byte BPF stack.

use nat_common::{
    conntrack::{Endpoint, FlowKey, TcpState},
    maps::{CLAIM_SLOT, NEW_FLOW_SLOT},
    ports::MAX_CLAIM_TRIES,
    stats::Reason,
};

use crate::{
    conntrack::{self, same_key},
    maps::NEW_FLOW,
    packet::Frame,
    parse::{parse_ipv4, read_l4, L4Kind},
    snat::{self, Allocation, SnatChoice},
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
    /// 1 when the claim program has claimed `claimed_external` for this packet.
    pub claimed: u8,
    /// The external endpoint the claim program handed out, when `claimed`.
    pub claimed_external: Endpoint,
    /// 1 when that claim is new (given back if the flow is refused after all).
    pub claimed_fresh: u8,
    /// Claim program runs so far for this packet (each searches the free-port index once).
    pub claim_tries: u8,
    /// Zero.
    pub _pad: [u8; 2],
    /// The clock (`bpf_ktime_get_boot_ns`) read once at hand-over: the mapping's and the
    /// session's timestamps for this packet. One read instead of one per program and step
    /// (the clock is a few percent of a new flow's cost on a virtual machine).
    pub now_ns: u64,
}

/// Hands the packet to the new-flow program. Returns only if the tail call failed.
#[inline(always)]
pub fn hand_over<C: Frame>(
    ctx: &C,
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
    slot.claimed = 0;
    slot.claim_tries = 0;
    // SAFETY: helper without arguments.
    slot.now_ns = unsafe { aya_ebpf::helpers::bpf_ktime_get_boot_ns() };
    if let Some(choice) = snat {
        slot.snat_rule = choice.rule_slot;
        slot.snat_pool = choice.pool;
        slot.masquerade = choice.masquerade_src.is_some() as u8;
        slot.masquerade_src = choice.masquerade_src.unwrap_or([0; 4]);
    }
    // SAFETY: tail_call either does not return or returns on failure; nothing is held across.
    unsafe { C::programs().tail_call(ctx, NEW_FLOW_SLOT) };
    Reason::NewFlowUnavailable
}

/// The decision in the per-CPU slot, if it was made for this packet (`key`).
#[inline(always)]
fn decision(key: &FlowKey) -> Result<(*mut NewFlow, NewFlow), Reason> {
    let Some(slot) = NEW_FLOW.get_ptr_mut(0) else {
        return Err(Reason::NewFlowUnavailable);
    };
    // SAFETY: per-CPU slot from a successful lookup, written by xdp_nat just before.
    let flow = unsafe { *slot };
    // Only reachable by tail call from xdp_nat on this CPU for this packet; check anyway so a
    // stale slot can never translate the wrong packet.
    if !same_key(key, &flow.key) {
        return Err(Reason::NewFlowUnavailable);
    }
    Ok((slot, flow))
}

/// The SNAT choice recorded in the slot.
#[inline(always)]
fn snat_choice(flow: &NewFlow) -> Option<SnatChoice> {
    if flow.has_snat == 0 {
        return None;
    }
    Some(SnatChoice {
        rule_slot: flow.snat_rule,
        pool: flow.snat_pool,
        masquerade_src: if flow.masquerade != 0 {
            Some(flow.masquerade_src)
        } else {
            None
        },
    })
}

/// The inside endpoint of a flow: the source after destination NAT.
#[inline(always)]
fn inside_of(to: &FlowKey) -> Endpoint {
    to.source()
}

/// Body of `xdp_nat_new_flow`.
#[inline(always)]
pub fn run<C: Frame>(ctx: &C) -> Result<Reason, Reason> {
    let pkt = parse_ipv4(ctx)?;
    let l4 = read_l4(ctx, &pkt);
    let key = l4.flow_key(&pkt);
    let (_, flow) = decision(&key)?;
    let dnat_rule = if flow.has_dnat != 0 {
        Some(flow.dnat_rule)
    } else {
        None
    };
    let snat = snat_choice(&flow);
    // A RST starts no session (`create` refuses it): never claim a port for one.
    if l4.kind == L4Kind::Tcp && TcpState::initial(l4.tcp_flags).is_none() {
        return Err(Reason::RstNoSession);
    }
    let mut allocation = None;
    if let Some(choice) = &snat {
        if flow.claimed != 0 {
            allocation = Some(Allocation {
                external: flow.claimed_external,
                fresh: flow.claimed_fresh != 0,
            });
        } else {
            match snat::reuse(&inside_of(&flow.to), choice, flow.now_ns)? {
                Some(reused) => allocation = Some(reused),
                None => {
                    // SAFETY: tail_call either does not return or returns on failure.
                    unsafe { C::programs().tail_call(ctx, CLAIM_SLOT) };
                    return Err(Reason::NewFlowUnavailable);
                }
            }
        }
    }
    conntrack::create(
        ctx,
        &pkt,
        &l4,
        &key,
        flow.to,
        dnat_rule,
        snat,
        allocation,
        flow.now_ns,
    )
}

/// Body of `xdp_nat_claim`: claims a new external endpoint for the flow in the slot, records
/// it there and goes back to the new-flow program.
#[inline(always)]
pub fn claim<C: Frame>(ctx: &C) -> Result<Reason, Reason> {
    let pkt = parse_ipv4(ctx)?;
    let l4 = read_l4(ctx, &pkt);
    let key = l4.flow_key(&pkt);
    let (slot, flow) = decision(&key)?;
    let Some(choice) = snat_choice(&flow) else {
        return Err(Reason::NewFlowUnavailable);
    };
    let inside = inside_of(&flow.to);
    let first = flow.claim_tries == 0;
    let Some(claimed) = snat::claim_new(&inside, &choice, flow.now_ns, first)? else {
        // The index's port was taken after all (now marked): search again in a fresh run of
        // this program, a bounded number of times.
        if u32::from(flow.claim_tries) + 1 >= MAX_CLAIM_TRIES {
            return Err(Reason::PortsContended);
        }
        // SAFETY: the per-CPU slot from `decision`; only this CPU touches it.
        unsafe { (*slot).claim_tries = flow.claim_tries + 1 };
        // SAFETY: tail_call either does not return or returns on failure.
        unsafe { C::programs().tail_call(ctx, CLAIM_SLOT) };
        return Err(Reason::NewFlowUnavailable);
    };
    {
        // SAFETY: the per-CPU slot from `decision`; only this CPU touches it.
        let slot = unsafe { &mut *slot };
        slot.claimed = 1;
        slot.claimed_external = claimed.external;
        slot.claimed_fresh = claimed.fresh as u8;
    }
    // SAFETY: tail_call either does not return or returns on failure.
    unsafe { C::programs().tail_call(ctx, NEW_FLOW_SLOT) };
    // The session cannot be created: give the claim back rather than leave it to the sweep.
    snat::release(&inside, &claimed);
    Err(Reason::NewFlowUnavailable)
}
