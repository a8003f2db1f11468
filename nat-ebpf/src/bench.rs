//! Benchmark-only programs (`cargo xtask bench topology`), never attached by the agent: the
//! traffic generator, a bare redirect forwarder and a dropping sink. Kept apart from the NAT:
//! they share only the forwarding stage (so the bare forwarder does exactly the NAT's
//! forwarding work, nothing more) and the bounds-checked packet access.

use aya_ebpf::{
    bindings::xdp_action,
    macros::map,
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use nat_common::{
    bench::{GenConfig, GEN_FRAME_LEN, GEN_IP_CHECK, GEN_IP_SRC, GEN_UDP_CHECK, GEN_UDP_SPORT},
    checksum,
    stats::ForwardResult,
};

use crate::{forward, packet::ptr_at};

/// What the generator sends (see `nat_common::bench::GenConfig`); written by the benchmark.
#[map(name = "BENCH_GEN")]
static BENCH_GEN: Array<GenConfig> = Array::with_max_entries(1, 0);

/// Frames built so far on each CPU: the generator's sequence number.
#[map(name = "BENCH_GEN_SEQ")]
static BENCH_GEN_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Builds the next frame over whatever the recycled page holds, and transmits it.
#[inline(always)]
pub fn generate(ctx: &XdpContext) -> u32 {
    let (Some(cfg), Some(seq)) = (BENCH_GEN.get(0), BENCH_GEN_SEQ.get_ptr_mut(0)) else {
        return xdp_action::XDP_ABORTED;
    };
    let Ok(frame) = ptr_at::<[u8; GEN_FRAME_LEN], _>(ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: per-CPU slot from a successful lookup; the frame is bounds-checked by ptr_at.
    let (n, frame) = unsafe {
        let n = *seq;
        *seq = n + 1;
        (n, &mut *frame)
    };
    *frame = cfg.frame;
    let (src, sport) = cfg.source(cfg.flow(n));
    let at = |i: usize| u16::from_be_bytes([cfg.frame[i], cfg.frame[i + 1]]);
    let old_src = [
        cfg.frame[GEN_IP_SRC],
        cfg.frame[GEN_IP_SRC + 1],
        cfg.frame[GEN_IP_SRC + 2],
        cfg.frame[GEN_IP_SRC + 3],
    ];
    let ip_check = checksum::update_addr(at(GEN_IP_CHECK), old_src, src);
    let udp_check = checksum::udp_update_u16(
        checksum::udp_update_addr(at(GEN_UDP_CHECK), old_src, src),
        at(GEN_UDP_SPORT),
        sport,
    );
    frame[GEN_IP_SRC..GEN_IP_SRC + 4].copy_from_slice(&src);
    frame[GEN_IP_CHECK..GEN_IP_CHECK + 2].copy_from_slice(&ip_check.to_be_bytes());
    frame[GEN_UDP_SPORT..GEN_UDP_SPORT + 2].copy_from_slice(&sport.to_be_bytes());
    frame[GEN_UDP_CHECK..GEN_UDP_CHECK + 2].copy_from_slice(&udp_check.to_be_bytes());
    xdp_action::XDP_TX
}

/// The NAT's forwarding stage alone: FIB lookup, MAC rewrite, TTL decrement, redirect or
/// XDP_TX; anything it cannot finish goes to the kernel, as in the NAT.
#[inline(always)]
pub fn redirect(ctx: &XdpContext) -> u32 {
    match forward::route(ctx) {
        ForwardResult::Redirected => xdp_action::XDP_REDIRECT,
        ForwardResult::Transmitted => xdp_action::XDP_TX,
        _ => xdp_action::XDP_PASS,
    }
}
