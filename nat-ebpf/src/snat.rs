//! Source NAT: which SNAT rule applies to a new flow, and the external endpoint it gets.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
};
use nat_common::conntrack::{
    pool_index_for, probe_port, Endpoint, FlowKey, Mapping, Pool, MAX_POOL_ADDRS, MAX_PORT_PROBES,
    MAX_SNAT_RULES_PER_SET, SNAT_MASQUERADE, SNAT_NONE,
};
use nat_common::ports::find_free;
use nat_common::prefilter::FilterTable;
use nat_common::stats::Reason;

use crate::{
    conntrack::{same_endpoint, EEXIST},
    fib,
    maps::{rule_lookup, BINDINGS, LOCAL_ADDRS, LOCAL_FILTER, MAPPINGS, SNAT_POOLS, SNAT_RULES},
    packet::Frame,
    ports::PortIndex,
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
pub fn decide<C: Frame>(ctx: &C, bank: u32, key: &FlowKey, tot_len: u16) -> SnatDecision {
    let Some(set) = rule_lookup(&SNAT_RULES, FilterTable::Snat, bank, key.src) else {
        return SnatDecision::NoRule;
    };
    if is_local(key.dst) {
        return SnatDecision::Local;
    }
    // The route is asked for only once a rule that depends on it is reached (one with an
    // egress interface, or MASQUERADE, which takes the route's source): a set of rules that
    // translate to a fixed address whatever the route spares every new flow the FIB lookup.
    // Plain scalars on purpose: an `Option<Option<Egress>>` carried through the loop was packed
    // by the compiler into shifted registers next to map pointers, which the verifier refuses.
    let mut asked = false;
    // Meaningful once `asked`: the route's egress interface (u32::MAX, which no rule uses:
    // no usable route) and source.
    let mut egress_ifindex = u32::MAX;
    let mut egress_src = 0u32;
    let mut i = 0;
    while i < MAX_SNAT_RULES_PER_SET {
        if i as u32 >= set.len {
            break;
        }
        let rule = &set.rules[i];
        i += 1;
        if !rule.matches(key.proto, key.dst) {
            continue;
        }
        let masquerade = rule.action == SNAT_MASQUERADE;
        if rule.out_ifindex != 0 || masquerade {
            if !asked {
                asked = true;
                if let Some(route) = fib::egress(ctx, key, tot_len) {
                    egress_ifindex = route.ifindex;
                    egress_src = u32::from_ne_bytes(route.src);
                }
            }
            // Without a route there is no egress interface and no source: only rules that
            // need neither can match.
            if egress_ifindex == u32::MAX {
                continue;
            }
            if rule.out_ifindex != 0 && rule.out_ifindex != egress_ifindex {
                continue;
            }
        }
        return match rule.action {
            SNAT_NONE => SnatDecision::Exempt,
            _ => SnatDecision::Translate(SnatChoice {
                rule_slot: rule.counter_index,
                pool: rule.pool,
                masquerade_src: if masquerade {
                    Some(egress_src.to_ne_bytes())
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
    if dst[0] >= 224 {
        return true;
    }
    // Most destinations are remote: the filter says so without the hash lookup.
    if let Some(filter) = LOCAL_FILTER.get(0) {
        if !filter.may_match(dst) {
            return false;
        }
    }
    LOCAL_ADDRS.get_ptr(&dst).is_some()
}

/// The external address a host gets from `choice` (paired pooling: always the same member).
#[inline(always)]
fn external_addr(inside: &Endpoint, pool: &Pool, choice: &SnatChoice) -> Result<[u8; 4], Reason> {
    if let Some(src) = choice.masquerade_src {
        // The FIB reports success only with a source address, but an all-zero one must never
        // become a packet's source.
        if u32::from_ne_bytes(src) == 0 {
            return Err(Reason::NoExternalAddress);
        }
        return Ok(src);
    }
    if pool.len == 0 {
        return Err(Reason::SnatPoolMissing);
    }
    let index = pool_index_for(inside.addr, pool.len) as usize;
    if index >= MAX_POOL_ADDRS {
        return Err(Reason::SnatPoolMissing);
    }
    Ok(pool.addrs[index])
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

/// What one insert-if-absent into `BINDINGS` found.
enum Claim {
    /// The port is ours now.
    Claimed,
    /// The port was already this inside endpoint's (a mapping lost while its binding lived
    /// on): reused, never released on refusal.
    Ours,
    /// Another endpoint holds it.
    Taken,
}

/// Tries to claim `external` for `inside`: the race-free part (insert-if-absent).
#[inline(always)]
fn claim(external: &Endpoint, inside: &Endpoint) -> Result<Claim, Reason> {
    match BINDINGS.insert(external, inside, BPF_NOEXIST as u64) {
        Ok(()) => Ok(Claim::Claimed),
        Err(e) if e == EEXIST => match BINDINGS.get_ptr(external) {
            // SAFETY: pointer from a successful lookup.
            Some(owner) if same_endpoint(unsafe { &*owner }, inside) => Ok(Claim::Ours),
            _ => Ok(Claim::Taken),
        },
        Err(_) => Err(Reason::TableFull),
    }
}

/// Whether an existing mapping still fits the rule: same external address, port in range.
#[inline(always)]
fn fits(m: &Mapping, addr: [u8; 4], pool: &Pool) -> bool {
    let port = u16::from_be_bytes(m.external.port);
    u32::from_ne_bytes(m.external.addr) == u32::from_ne_bytes(addr)
        && port >= pool.port_min
        && port <= pool.port_max
}

/// The existing mapping of `inside`, if it still fits the rule (endpoint-independent
/// mapping): refreshed and returned. `Ok(None)`: a port must be claimed ([`claim_new`], in
/// the claim program).
#[inline(always)]
pub fn reuse(
    inside: &Endpoint,
    choice: &SnatChoice,
    now: u64,
) -> Result<Option<Allocation>, Reason> {
    let Some(pool) = SNAT_POOLS.get(choice.pool) else {
        return Err(Reason::SnatPoolMissing);
    };
    let addr = external_addr(inside, pool, choice)?;
    let Some(m) = MAPPINGS.get_ptr_mut(inside) else {
        return Ok(None);
    };
    // SAFETY: pointer from a successful lookup; the entry outlives this program run.
    let m = unsafe { &mut *m };
    if !fits(m, addr, pool) {
        return Ok(None);
    }
    m.last_used_ns = now;
    Ok(Some(Allocation {
        external: m.external,
        fresh: false,
    }))
}

/// A new external endpoint for `inside` (which [`reuse`] found without a fitting mapping): the
/// inside port when it is in range and free, else a free port from the free-port index
/// (searched from a random start), or, for an address the agent has not indexed yet, a
/// bounded random probe; then the mapping, inserted if absent. `Ok(None)`: the index's port
/// was taken after all (now marked); the caller searches again, up to `MAX_CLAIM_TRIES`
/// times. `first` is false on those later tries (port preservation was tried already).
#[inline(always)]
pub fn claim_new(
    inside: &Endpoint,
    choice: &SnatChoice,
    now: u64,
    first: bool,
) -> Result<Option<Allocation>, Reason> {
    let Some(pool) = SNAT_POOLS.get(choice.pool) else {
        return Err(Reason::SnatPoolMissing);
    };
    let addr = external_addr(inside, pool, choice)?;
    if let Some(m) = MAPPINGS.get_ptr(inside) {
        // SAFETY: pointer from a successful lookup.
        if !fits(unsafe { &*m }, addr, pool) {
            // A mapping made under an earlier rule (another address or range). It goes, so
            // the mapping below can be inserted if absent; its binding, now without a
            // mapping, is freed by the agent's sweep, and its sessions keep their own
            // translation.
            let _ = MAPPINGS.remove(inside);
        }
    }
    let (external, claimed) = match PortIndex::of(addr, inside.proto) {
        Some(index) => match claim_indexed(inside, addr, pool, &index, first)? {
            Some(claimed) => claimed,
            None => return Ok(None),
        },
        None => claim_probed(inside, addr, pool)?,
    };
    let fresh = matches!(claimed, Claim::Claimed);
    let mapping = Mapping {
        external,
        last_used_ns: now,
    };
    // Insert if absent: two CPUs creating flows of one inside endpoint at once may each have
    // claimed a port; the first mapping wins and the other CPU takes it and gives its own
    // claim back, so the endpoint keeps one external endpoint (RFC 4787 REQ-1).
    match MAPPINGS.insert(inside, &mapping, BPF_NOEXIST as u64) {
        Ok(()) => Ok(Some(Allocation { external, fresh })),
        Err(e) if e == EEXIST => {
            if let Some(winner) = MAPPINGS.get_ptr_mut(inside) {
                // SAFETY: pointer from a successful lookup.
                let winner = unsafe { &mut *winner };
                if fits(winner, addr, pool) {
                    if fresh && !same_endpoint(&winner.external, &external) {
                        release_claim(&external);
                    }
                    winner.last_used_ns = now;
                    return Ok(Some(Allocation {
                        external: winner.external,
                        fresh: false,
                    }));
                }
            }
            // The winner was made under another rule set (a rule change at this very
            // moment) or is gone again: this flow's rule decides.
            match MAPPINGS.insert(inside, &mapping, BPF_ANY as u64) {
                Ok(()) => Ok(Some(Allocation { external, fresh })),
                Err(_) => Err(refuse_claim(&external, fresh)),
            }
        }
        // No room for the mapping: refuse rather than leave a claim without a mapping.
        Err(_) => Err(refuse_claim(&external, fresh)),
    }
}

/// Gives back a fresh claim of a flow refused for want of room for its mapping.
#[inline(always)]
fn refuse_claim(external: &Endpoint, fresh: bool) -> Reason {
    if fresh {
        release_claim(external);
    }
    Reason::TableFull
}

/// Claims a port with the free-port index: on the first try the inside port when it is in
/// range and not marked claimed, then one free port of the index, searched from a random
/// start. An insert that finds its port taken marks it (the index was stale), so the next
/// search skips it; `Ok(None)` then asks for another try.
#[inline(always)]
fn claim_indexed(
    inside: &Endpoint,
    addr: [u8; 4],
    pool: &Pool,
    index: &PortIndex,
    first: bool,
) -> Result<Option<(Endpoint, Claim)>, Reason> {
    let (min, max) = (pool.port_min, pool.port_max);
    let endpoint = |port: u16| Endpoint {
        addr,
        port: port.to_be_bytes(),
        proto: inside.proto,
        _pad: 0,
    };
    let inside_port = u16::from_be_bytes(inside.port);
    if first && inside_port >= min && inside_port <= max && !index.is_set(inside_port) {
        let external = endpoint(inside_port);
        let claimed = claim(&external, inside)?;
        index.set(inside_port);
        if !matches!(claimed, Claim::Taken) {
            return Ok(Some((external, claimed)));
        }
    }
    // SAFETY: helper without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    // 32-bit remainder on purpose (a 64-bit one becomes a libcall the kernel cannot run);
    // `max >= min` is the agent's guarantee, wrapping keeps it total.
    let span: u32 = max.wrapping_sub(min) as u32 + 1;
    let start = min.wrapping_add((random % span) as u16);
    let Some(port) = find_free(index, min, max, start) else {
        return Err(Reason::NoPort);
    };
    let external = endpoint(port);
    let claimed = claim(&external, inside)?;
    index.set(port);
    Ok(match claimed {
        Claim::Taken => None,
        claimed => Some((external, claimed)),
    })
}

/// Claims a port without an index (the agent has not created one for this address yet):
/// the inside port first, then independent random ports, at most `MAX_PORT_PROBES` inserts.
/// Random rather than consecutive ports: claimed ports come in runs (port preservation hands
/// out runs of inside ports), and a walk that starts in a run can spend every probe in it.
#[inline(always)]
fn claim_probed(
    inside: &Endpoint,
    addr: [u8; 4],
    pool: &Pool,
) -> Result<(Endpoint, Claim), Reason> {
    let inside_port = u16::from_be_bytes(inside.port);
    let mut attempt = 0;
    while attempt < MAX_PORT_PROBES {
        // SAFETY: helper without arguments.
        let random = unsafe { bpf_get_prandom_u32() };
        let port = probe_port(inside_port, random, attempt, pool.port_min, pool.port_max);
        attempt += 1;
        let external = Endpoint {
            addr,
            port: port.to_be_bytes(),
            proto: inside.proto,
            _pad: 0,
        };
        match claim(&external, inside)? {
            Claim::Taken => continue,
            claimed => return Ok((external, claimed)),
        }
    }
    Err(Reason::NoPortProbed)
}

/// Gives back a claimed port: the binding, then its bit in the index (in this order, so the
/// port never reads free while still bound).
#[inline(always)]
fn release_claim(external: &Endpoint) {
    let _ = BINDINGS.remove(external);
    if let Some(index) = PortIndex::of(external.addr, external.proto) {
        index.clear(u16::from_be_bytes(external.port));
    }
}

/// Gives back a port [`allocate`] claimed for a flow that was then refused, so a full table does
/// not also drain the port pool.
#[inline(always)]
pub fn release(inside: &Endpoint, allocation: &Allocation) {
    if allocation.fresh {
        let _ = MAPPINGS.remove(inside);
        release_claim(&allocation.external);
    }
}
