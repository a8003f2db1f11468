//! The kernel's routing table, asked from XDP: which interface a packet would leave by and
//! which source address the kernel would give it (what MASQUERADE needs).

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_FIB_LOOKUP_SRC,
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use nat_common::conntrack::FlowKey;

const AF_INET: u8 = 2;

/// Where the FIB sends a packet.
#[derive(Clone, Copy)]
pub struct Egress {
    /// Egress interface index.
    pub ifindex: u32,
    /// The source address the kernel would choose on that route (network order).
    pub src: [u8; 4],
}

/// Looks up the route of a packet with tuple `key` that arrived on this program's interface.
/// `None` when the kernel has no usable route (unreachable, blackhole, forwarding off).
#[inline(always)]
pub fn egress(ctx: &XdpContext, key: &FlowKey, tot_len: u16) -> Option<Egress> {
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request; the fields used are set
    // below.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = key.proto;
    params.sport = u16::from_ne_bytes(key.sport);
    params.dport = u16::from_ne_bytes(key.dport);
    params.__bindgen_anon_1.tot_len = tot_len;
    params.ifindex = ctx.ingress_ifindex() as u32;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(key.src);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(key.dst);
    // SKIP_NEIGH: only the route matters here, not whether the next hop's MAC is known.
    // SRC: fill in the preferred source address of the route (kernel 6.7+).
    let flags = BPF_FIB_LOOKUP_SRC | BPF_FIB_LOOKUP_SKIP_NEIGH;
    // SAFETY: params is a valid, correctly sized bpf_fib_lookup on the stack.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut params,
            core::mem::size_of::<FibParams>() as i32,
            flags,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return None;
    }
    // SAFETY: the kernel wrote the IPv4 source for an AF_INET lookup.
    let src = unsafe { params.__bindgen_anon_3.ipv4_src };
    Some(Egress {
        ifindex: params.ifindex,
        src: src.to_ne_bytes(),
    })
}

/// The MTU of the route of a packet with tuple `key`, arriving on this program's interface, when
/// it is smaller than the packet's `tot_len` (the kernel would answer "fragmentation needed");
/// `None` when the packet fits or there is no route.
#[inline(always)]
pub fn frag_needed(ctx: &XdpContext, key: &FlowKey, tot_len: u16) -> Option<u32> {
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request; the fields used are set
    // below.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = key.proto;
    params.sport = u16::from_ne_bytes(key.sport);
    params.dport = u16::from_ne_bytes(key.dport);
    // A non-zero length makes the kernel compare it with the route's MTU.
    params.__bindgen_anon_1.tot_len = tot_len;
    params.ifindex = ctx.ingress_ifindex() as u32;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(key.src);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(key.dst);
    // SAFETY: params is a valid, correctly sized bpf_fib_lookup on the stack.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut params,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    if rc != BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        return None;
    }
    // SAFETY: the kernel wrote the route's MTU for a FRAG_NEEDED answer.
    Some(u32::from(unsafe { params.__bindgen_anon_1.mtu_result }))
}

/// Whether a packet from `src` to `dst` arriving on this program's interface is addressed to
/// this host (a local, broadcast or multicast route: the FIB says "not forwarded").
#[inline(always)]
pub fn is_local(ctx: &XdpContext, src: [u8; 4], dst: [u8; 4]) -> bool {
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request; the fields used are set
    // below.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.ifindex = ctx.ingress_ifindex() as u32;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: params is a valid, correctly sized bpf_fib_lookup on the stack.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut params,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    rc == BPF_FIB_LKUP_RET_NOT_FWDED as i64
}
