//! The kernel's routing table, asked from XDP: which interface a packet would leave by, which
//! source address the kernel would give it (what MASQUERADE needs), whether it fits the route's
//! MTU, and whether it is addressed to this host.
//!
//! Every question is one `bpf_fib_lookup` from this program's ingress interface, built by
//! [`request`] (addresses only) or [`flow_request`] (the whole tuple, and a length to check the
//! MTU against). Route-only questions skip the neighbour table (`SKIP_NEIGH`): whether the next
//! hop's MAC is known does not change the answer. (The forwarding stage, `forward`, asks its own
//! question: it needs the neighbour.)

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_FIB_LOOKUP_SRC,
    },
    helpers::bpf_fib_lookup,
};
use nat_common::conntrack::FlowKey;

use crate::{packet::Frame, zero::zero_fill};

const AF_INET: u8 = 2;

/// The length a question without a packet length of its own states: the smallest. With none
/// (0), the skb flavour of the lookup (TC) checks the whole skb against the route's MTU
/// instead, so a route question asked for a big packet would come back "fragmentation needed".
const NO_LENGTH: u16 = 1;

/// Where the FIB sends a packet.
#[derive(Clone, Copy)]
pub struct Egress {
    /// Egress interface index.
    pub ifindex: u32,
    /// The source address the kernel would choose on that route (network order).
    pub src: [u8; 4],
}

/// A route question for `src` -> `dst` arriving on this program's interface, written into
/// `slot` in place (see `zero`: a request built and returned by value costs a byte-wise
/// `memset`).
#[inline(always)]
fn request<'a, C: Frame>(
    ctx: &C,
    slot: &'a mut MaybeUninit<FibParams>,
    src: [u8; 4],
    dst: [u8; 4],
) -> &'a mut FibParams {
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request; the fields used are set
    // below.
    let params = unsafe { zero_fill(slot) };
    params.family = AF_INET;
    params.ifindex = ctx.ingress_ifindex();
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    params.__bindgen_anon_1.tot_len = NO_LENGTH;
    params
}

/// A route question for a packet with tuple `key` and total length `tot_len` (the kernel
/// compares it with the route's MTU; 0 only for this very skb, see `Frame::fib_len`), written
/// into `slot`.
#[inline(always)]
fn flow_request<'a, C: Frame>(
    ctx: &C,
    slot: &'a mut MaybeUninit<FibParams>,
    key: &FlowKey,
    tot_len: u16,
) -> &'a mut FibParams {
    let params = request(ctx, slot, key.src, key.dst);
    params.l4_protocol = key.proto;
    params.sport = u16::from_ne_bytes(key.sport);
    params.dport = u16::from_ne_bytes(key.dport);
    params.__bindgen_anon_1.tot_len = tot_len;
    params
}

/// Asks the kernel; the answer's fields are written into `params`. Returns its code.
#[inline(always)]
fn lookup<C: Frame>(ctx: &C, params: &mut FibParams, flags: u32) -> i64 {
    // SAFETY: params is a valid, correctly sized bpf_fib_lookup on the stack.
    unsafe {
        bpf_fib_lookup(
            ctx.as_ptr() as *mut _,
            params,
            core::mem::size_of::<FibParams>() as i32,
            flags,
        )
    }
}

/// The egress interface and preferred source of the route `params` asks for; `None` when the
/// kernel has no usable route (unreachable, blackhole, forwarding off).
#[inline(always)]
fn route_with_source<C: Frame>(ctx: &C, params: &mut FibParams) -> Option<Egress> {
    // SRC: fill in the preferred source address of the route (kernel 6.7+).
    if lookup(ctx, params, BPF_FIB_LOOKUP_SRC | BPF_FIB_LOOKUP_SKIP_NEIGH)
        != BPF_FIB_LKUP_RET_SUCCESS as i64
    {
        return None;
    }
    // SAFETY: the kernel wrote the IPv4 source for an AF_INET lookup.
    let src = unsafe { params.__bindgen_anon_3.ipv4_src };
    Some(Egress {
        ifindex: params.ifindex,
        src: src.to_ne_bytes(),
    })
}

/// Looks up the route of a packet with tuple `key` that arrived on this program's interface.
/// `None` when the kernel has no usable route (unreachable, blackhole, forwarding off).
#[inline(always)]
pub fn egress<C: Frame>(ctx: &C, key: &FlowKey, tot_len: u16) -> Option<Egress> {
    let mut slot = MaybeUninit::uninit();
    route_with_source(ctx, flow_request(ctx, &mut slot, key, ctx.fib_len(tot_len)))
}

/// The address this host would send from towards `dst` (the route's preferred source): the
/// source of an answer the program builds itself.
#[inline(always)]
pub fn source_towards<C: Frame>(ctx: &C, dst: [u8; 4]) -> Option<[u8; 4]> {
    let mut slot = MaybeUninit::uninit();
    route_with_source(ctx, request(ctx, &mut slot, [0; 4], dst)).map(|route| route.src)
}

/// The MTU of the route of a packet with tuple `key`, arriving on this program's interface, when
/// it is smaller than the packet's `tot_len` (the kernel would answer "fragmentation needed");
/// `None` when the packet fits or there is no route.
#[inline(always)]
pub fn frag_needed<C: Frame>(ctx: &C, key: &FlowKey, tot_len: u16) -> Option<u32> {
    let mut slot = MaybeUninit::uninit();
    let params = flow_request(ctx, &mut slot, key, tot_len);
    if lookup(ctx, params, BPF_FIB_LOOKUP_SKIP_NEIGH) != BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        return None;
    }
    // SAFETY: the kernel wrote the route's MTU for a FRAG_NEEDED answer.
    Some(u32::from(unsafe { params.__bindgen_anon_1.mtu_result }))
}

/// Whether a packet from `src` to `dst` arriving on this program's interface is addressed to
/// this host (a local, broadcast or multicast route: the FIB says "not forwarded").
#[inline(always)]
pub fn is_local<C: Frame>(ctx: &C, src: [u8; 4], dst: [u8; 4]) -> bool {
    let mut slot = MaybeUninit::uninit();
    let params = request(ctx, &mut slot, src, dst);
    lookup(ctx, params, BPF_FIB_LOOKUP_SKIP_NEIGH) == BPF_FIB_LKUP_RET_NOT_FWDED as i64
}
