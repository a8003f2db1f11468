//! Source NAT: which SNAT rule applies to a new flow, and the external endpoint it gets.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
    programs::XdpContext,
};
use nat_common::conntrack::{
    pool_index_for, probe_port, Endpoint, FlowKey, Mapping, Pool, MAX_POOL_ADDRS, MAX_PORT_PROBES,
    MAX_SNAT_RULES_PER_SET, SNAT_MASQUERADE, SNAT_NONE,
};
use nat_common::stats::Reason;

use crate::{
    conntrack::{same_endpoint, EEXIST},
    fib,
    maps::{rule_lookup, BINDINGS, LOCAL_ADDRS, MAPPINGS, SNAT_POOLS, SNAT_RULES},
};

/// The SNAT rule chosen for a flow.
#[derive(Clone, Copy)]
pub struct SnatChoice {
    /// The rule's counter slot.
    pub rule_slot: u32,
    /// Its pool id (port range, and addresses unless masquerading).
    pub pool: u32,
    /// The egress interface's address for MASQUERADE, or `None` for a pool.
    pub masquerade_src: Option<[u8; 4]>,
}

/// What the SNAT rules say about a flow.
pub enum SnatDecision {
    /// No rule applies.
    NoRule,
    /// A `no_nat` rule applies: leave the source alone.
    Exempt,
    /// The destination is this host (see [`is_local`]): never translated, whatever the rules
    /// say; the appliance's own services see the real sender.
    Local,
    /// Translate the source.
    Translate(SnatChoice),
}

/// Evaluates the SNAT rules of rule `bank` for a packet whose (possibly DNAT-translated) tuple
/// is `key`. The chosen pool id is already the bank's (the agent writes banked pool ids).
///
/// The route is looked up once, before the walk, whenever the source has SNAT rules at all:
/// this code only runs for packets that start a flow, and a loop without per-iteration
/// lookup state keeps the verifier's path count small.
#[inline(always)]
pub fn decide(ctx: &XdpContext, bank: u32, key: &FlowKey, tot_len: u16) -> SnatDecision {
    let Some(set) = rule_lookup(&SNAT_RULES, bank, key.src) else {
        return SnatDecision::NoRule;
    };
    if is_local(key.dst) {
        return SnatDecision::Local;
    }
    let route = fib::egress(ctx, key, tot_len);
    // An interface index no rule uses (0 means "any interface" in a rule) when unroutable.
    let (egress_ifindex, egress_src) = match route {
        Some(r) => (r.ifindex, r.src),
        None => (u32::MAX, [0; 4]),
    };
    let routed = route.is_some();
    let mut i = 0;
    while i < MAX_SNAT_RULES_PER_SET {
        if i as u32 >= set.len {
            break;
        }
        let rule = &set.rules[i];
        i += 1;
        // Without a route there is no egress interface: only rules without one can match (an
        // absent interface is also stored as u32::MAX, so "routed" must be checked).
        let interface_ok = rule.out_ifindex == 0 || (routed && rule.out_ifindex == egress_ifindex);
        let route_ok = routed || rule.action != SNAT_MASQUERADE;
        if !(rule.matches(key.proto, key.dst) && interface_ok && route_ok) {
            continue;
        }
        return match rule.action {
            SNAT_NONE => SnatDecision::Exempt,
            action => SnatDecision::Translate(SnatChoice {
                rule_slot: rule.counter_index,
                pool: rule.pool,
                masquerade_src: if action == SNAT_MASQUERADE {
                    Some(egress_src)
                } else {
                    None
                },
            }),
        };
    }
    SnatDecision::NoRule
}

/// Whether `dst` is this host: one of its addresses or directed broadcasts (`LOCAL_ADDRS`,
/// kept by the agent), or multicast, reserved or the limited broadcast (224.0.0.0 and up).
///
/// Not the FIB: its "not forwarded" answer is the same for a local route and for no route
/// at all, and an unroutable destination must still meet the rules that need no route.
#[inline(always)]
pub fn is_local(dst: [u8; 4]) -> bool {
    dst[0] >= 224 || LOCAL_ADDRS.get_ptr(&dst).is_some()
}

/// The external address a host gets from `choice` (paired pooling: always the same member).
#[inline(always)]
fn external_addr(inside: &Endpoint, pool: &Pool, choice: &SnatChoice) -> Option<[u8; 4]> {
    if let Some(src) = choice.masquerade_src {
        return Some(src);
    }
    if pool.len == 0 {
        return None;
    }
    let index = pool_index_for(inside.addr, pool.len) as usize;
    if index >= MAX_POOL_ADDRS {
        return None;
    }
    Some(pool.addrs[index])
}

/// An external endpoint handed out by [`allocate`].
#[derive(Clone, Copy)]
pub struct Allocation {
    /// The external endpoint.
    pub external: Endpoint,
    /// True when this call claimed it (a new binding and mapping), so a refusal further on
    /// must give it back; false when an existing mapping was reused.
    pub fresh: bool,
}

/// The external endpoint for `inside`: its existing mapping if it still fits the rule
/// (endpoint-independent mapping), otherwise a newly claimed port, trying the inside port
/// first and then a bounded walk from a random start.
#[inline(always)]
pub fn allocate(inside: &Endpoint, choice: &SnatChoice, now: u64) -> Result<Allocation, Reason> {
    let Some(pool) = SNAT_POOLS.get(choice.pool) else {
        return Err(Reason::NoPort);
    };
    let Some(addr) = external_addr(inside, pool, choice) else {
        return Err(Reason::NoPort);
    };
    if let Some(m) = MAPPINGS.get_ptr_mut(inside) {
        // SAFETY: pointer from a successful lookup; the entry outlives this program run.
        let m = unsafe { &mut *m };
        let port = u16::from_be_bytes(m.external.port);
        if m.external.addr == addr && port >= pool.port_min && port <= pool.port_max {
            m.last_used_ns = now;
            return Ok(Allocation {
                external: m.external,
                fresh: false,
            });
        }
    }
    // SAFETY: helper without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    let inside_port = u16::from_be_bytes(inside.port);
    let mut attempt = 0;
    while attempt < MAX_PORT_PROBES {
        let port = probe_port(inside_port, random, attempt, pool.port_min, pool.port_max);
        attempt += 1;
        let external = Endpoint {
            addr,
            port: port.to_be_bytes(),
            proto: inside.proto,
            _pad: 0,
        };
        let fresh = match BINDINGS.insert(&external, inside, BPF_NOEXIST as u64) {
            Ok(()) => true,
            Err(e) if e == EEXIST => {
                // Taken. It may be ours already (a mapping lost while its binding lived on):
                // then it is reused, not claimed, and must never be released on refusal.
                match BINDINGS.get_ptr(&external) {
                    // SAFETY: pointer from a successful lookup.
                    Some(owner) if same_endpoint(unsafe { &*owner }, inside) => false,
                    _ => continue,
                }
            }
            Err(_) => return Err(Reason::TableFull),
        };
        let mapping = Mapping {
            external,
            last_used_ns: now,
        };
        // A failure here only loses endpoint independence for later flows; this flow is fine.
        let _ = MAPPINGS.insert(inside, &mapping, BPF_ANY as u64);
        return Ok(Allocation { external, fresh });
    }
    Err(Reason::NoPort)
}

/// Gives back a port [`allocate`] claimed for a flow that was then refused, so a full table does
/// not also drain the port pool.
#[inline(always)]
pub fn release(inside: &Endpoint, allocation: &Allocation) {
    if allocation.fresh {
        let _ = MAPPINGS.remove(inside);
        let _ = BINDINGS.remove(&allocation.external);
    }
}
