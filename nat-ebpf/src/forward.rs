//! Forwarding straight out of XDP: after translation, the kernel's FIB (routes and neighbours
//! stay the single source of truth) names the egress interface and next hop; the program
//! rewrites the MACs, decrements TTL like a router and sends the frame. Whatever XDP cannot
//! finish (unknown neighbour, oversize, no route, VLAN) goes to the kernel, which resolves the
//! neighbour or answers with ICMP; the next packets then take the fast path.
//!
//! The FIB's answers are reused from a per-CPU route cache while the agent reports no routing
//! change (see `nat_common::route_cache`): the FIB lookup is the dearest step of a forwarded
//! packet.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_fib_lookup, bpf_redirect},
};
use nat_common::{
    checksum,
    maps::{FORWARD_XDP, IFACE_KNOWN},
    route_cache::{self, RouteCacheEntry, RouteCacheResult, ENTRY_USES, GENERATION_OFF},
    stats::ForwardResult,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

use crate::{
    maps::{
        FORWARD_COUNTERS, IFACE_FLAGS, IFACE_FORWARD, ROUTE_CACHE, ROUTE_CACHE_GEN, ROUTE_COUNTERS,
    },
    packet::{ptr_at, Frame},
    stats::increment,
    zero::zero_fill,
};

const AF_INET: u8 = 2;

/// Whether translated packets arriving on this interface are forwarded from XDP.
#[inline(always)]
pub fn enabled<C: Frame>(ctx: &C) -> bool {
    let ifindex = ctx.ingress_ifindex();
    // The array first (an inlined lookup); the hash only for an entry the agent has not
    // written (see `nat_common::maps::IFACE_FLAGS`).
    if let Some(&flags) = IFACE_FLAGS.get(ifindex) {
        if flags & IFACE_KNOWN != 0 {
            return flags & FORWARD_XDP != 0;
        }
    }
    // SAFETY: plain value read from a successful lookup.
    matches!(IFACE_FORWARD.get_ptr(&ifindex), Some(flags) if unsafe { *flags } & FORWARD_XDP != 0)
}

/// Sends a translated packet on its way; returns the program's return code.
#[inline(always)]
pub fn send<C: Frame>(ctx: &C) -> u32 {
    let result = if enabled(ctx) {
        route_with(ctx, current_generation())
    } else {
        ForwardResult::KernelForwards
    };
    count(result);
    match result {
        ForwardResult::Redirected => C::REDIRECTED,
        ForwardResult::Transmitted => ctx.back_out(),
        _ => C::PASS,
    }
}

#[inline(always)]
fn count(result: ForwardResult) {
    increment(&FORWARD_COUNTERS, result as u32);
}

#[inline(always)]
fn count_route(result: RouteCacheResult) {
    increment(&ROUTE_COUNTERS, result as u32);
}

/// The route cache's generation as the agent last wrote it (`GENERATION_OFF`: no agent
/// listening to routing changes, so every packet asks the FIB).
#[inline(always)]
fn current_generation() -> u32 {
    match ROUTE_CACHE_GEN.get(0) {
        Some(&generation) => generation,
        None => GENERATION_OFF,
    }
}

/// FIB lookup, MAC rewrite, TTL decrement and redirect, always asking the FIB (the benchmark's
/// bare forwarder, which must not be helped by the NAT's cache); any failure leaves the frame
/// intact.
#[inline(always)]
pub(crate) fn route<C: Frame>(ctx: &C) -> ForwardResult {
    route_with(ctx, GENERATION_OFF)
}

/// [`route`], answered from the route cache where it holds this question under `generation`
/// (see `nat_common::route_cache`); a FIB answer is remembered unless `generation` is
/// `GENERATION_OFF`.
#[inline(always)]
fn route_with<C: Frame>(ctx: &C, generation: u32) -> ForwardResult {
    let Ok(eth) = ptr_at::<EthHdr, _>(ctx, 0) else {
        return ForwardResult::NoRoute;
    };
    // SAFETY: bounds-checked by ptr_at.
    let eth = unsafe { &mut *eth };
    if eth.ether_type != EtherType::Ipv4 as u16 {
        // Tagged: the VLAN device, not this interface, is where the kernel routes from.
        return ForwardResult::Vlan;
    }
    let Ok(ip) = ptr_at::<Ipv4Hdr, _>(ctx, EthHdr::LEN) else {
        return ForwardResult::NoRoute;
    };
    // SAFETY: bounds-checked by ptr_at.
    let ip = unsafe { &mut *ip };
    if ip.ttl <= 1 {
        return ForwardResult::TtlExpiring;
    }

    let ingress = ctx.ingress_ifindex();
    let src = u32::from_ne_bytes(ip.src_addr);
    let dst = u32::from_ne_bytes(ip.dst_addr);
    let tot_len = u16::from_be_bytes(ip.tot_len);
    // A GSO super-packet (see `Frame::fib_len`) neither asks nor fills the cache, whose
    // entries hold a length that fitted: one FIB lookup per 64 KB costs nothing worth saving.
    let gso = ctx.is_gso();
    let mut cached: Option<&mut RouteCacheEntry> = None;
    if generation != GENERATION_OFF && !gso {
        let slot = route_cache::slot(ingress, src, dst, ip.tos, ip.proto);
        if let Some(entry) = ROUTE_CACHE.get_ptr_mut(slot) {
            // SAFETY: this CPU's entry from a successful lookup; only this run uses it.
            let entry = unsafe { &mut *entry };
            if entry.generation == generation
                && entry.ingress == ingress
                && u32::from_ne_bytes(entry.src) == src
                && u32::from_ne_bytes(entry.dst) == dst
                && entry.tos == ip.tos
                && entry.proto == ip.proto
                && tot_len <= entry.fits_len
                && entry.uses_left != 0
            {
                entry.uses_left -= 1;
                count_route(RouteCacheResult::Hit);
                let (egress, dmac, smac) = (entry.egress, entry.dmac, entry.smac);
                return leave::<C>(eth, ip, ingress, egress, dmac, smac);
            }
            cached = Some(entry);
        }
    }

    let mut slot = MaybeUninit::uninit();
    // SAFETY: an all-zero bpf_fib_lookup is a valid empty request; used fields are set below.
    let params: &mut FibParams = unsafe { zero_fill(&mut slot) };
    params.family = AF_INET;
    params.l4_protocol = ip.proto;
    params.__bindgen_anon_1.tot_len = ctx.fib_len(tot_len);
    params.__bindgen_anon_2.tos = ip.tos;
    params.ifindex = ingress;
    params.__bindgen_anon_3.ipv4_src = src;
    params.__bindgen_anon_4.ipv4_dst = dst;
    // SAFETY: params is a valid, correctly sized bpf_fib_lookup on the stack.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr() as *mut _,
            params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_NO_NEIGH => return ForwardResult::NoNeighbour,
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return ForwardResult::MtuExceeded,
        _ => return ForwardResult::NoRoute,
    }
    if let Some(entry) = cached {
        // Stamped with the generation read before the question: a routing change racing it
        // has bumped the generation already or will, and either way this entry is not used.
        entry.generation = generation;
        entry.ingress = ingress;
        entry.src = ip.src_addr;
        entry.dst = ip.dst_addr;
        entry.egress = params.ifindex;
        entry.tos = ip.tos;
        entry.proto = ip.proto;
        entry.fits_len = tot_len;
        entry.uses_left = ENTRY_USES;
        entry.dmac = params.dmac;
        entry.smac = params.smac;
        entry._pad = 0;
        count_route(RouteCacheResult::Filled);
    }
    leave::<C>(eth, ip, ingress, params.ifindex, params.dmac, params.smac)
}

/// Rewrites the frame for the next hop (TTL, MACs) and sends it out of `egress`.
#[inline(always)]
fn leave<C: Frame>(
    eth: &mut EthHdr,
    ip: &mut Ipv4Hdr,
    ingress: u32,
    egress: u32,
    dmac: [u8; 6],
    smac: [u8; 6],
) -> ForwardResult {
    // A router decrements TTL; the checksum word holding TTL is (ttl << 8) | protocol.
    let old = u16::from_be_bytes([ip.ttl, ip.proto]);
    ip.ttl -= 1;
    let new = u16::from_be_bytes([ip.ttl, ip.proto]);
    ip.check = checksum::update_u16(u16::from_be_bytes(ip.check), old, new).to_be_bytes();
    eth.dst_addr = dmac;
    eth.src_addr = smac;

    if egress == ingress {
        return ForwardResult::Transmitted;
    }
    // SAFETY: helper call with plain values.
    let rc = unsafe { bpf_redirect(egress, 0) };
    if rc as u32 == C::REDIRECTED {
        ForwardResult::Redirected
    } else {
        // Cannot happen for a valid ifindex; the frame is already rewritten for the next hop,
        // which the kernel forwards just as well.
        ForwardResult::NoRoute
    }
}
