//! XDP NAT: the kernel half of the appliance.
//!
//! Every packet takes exactly one exit, named by a [`Reason`] that is counted per CPU and
//! decides the XDP action. `nat` orders the stages: sessions (conntrack), DNAT rules (stateless
//! or stateful), SNAT rules; ICMP errors go to `icmp`. Translated packets leave from XDP
//! (`forward`) or go to the kernel (XDP_PASS), which forwards them.
#![no_std]
#![no_main]
// BPF atomics (`lock add`) are reachable only through inline assembly on this target.
#![feature(asm_experimental_arch)]

mod baseline;
mod bench;
mod conntrack;
mod dnat;
mod events;
mod fib;
mod forward;
mod frag;
mod icmp;
mod maps;
mod nat;
mod newflow;
mod packet;
mod parse;
mod ports;
mod rewrite;
mod snat;
mod stats;
mod toobig;
mod zero;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use nat_common::stats::{Action, Reason};

/// Entry point attached to each NAT interface.
#[xdp]
pub fn xdp_nat(ctx: XdpContext) -> u32 {
    finish(&ctx, nat::try_translate(&ctx))
}

/// Rules that may start a session; reached only by tail call from [`xdp_nat`] (see `nat`).
#[xdp]
pub fn xdp_nat_rules(ctx: XdpContext) -> u32 {
    finish(&ctx, nat::try_rules(&ctx))
}

/// Creates sessions; reached only by tail call from [`xdp_nat`] (see `newflow`).
#[xdp]
pub fn xdp_nat_new_flow(ctx: XdpContext) -> u32 {
    finish(&ctx, newflow::run(&ctx))
}

/// Translates ICMP errors (quote included); reached only by tail call from [`xdp_nat`] (see
/// `icmp`).
#[xdp]
pub fn xdp_nat_icmp_error(ctx: XdpContext) -> u32 {
    finish(&ctx, icmp::run(&ctx))
}

/// Claims a new external port for a new flow; reached only by tail call from
/// [`xdp_nat_new_flow`], which it calls again (see `newflow`).
#[xdp]
pub fn xdp_nat_claim(ctx: XdpContext) -> u32 {
    finish(&ctx, newflow::claim(&ctx))
}

/// Answers a packet too big for its translated route with ICMP "fragmentation needed";
/// reached only by tail call from [`xdp_nat`] (see `toobig`).
#[xdp]
pub fn xdp_nat_too_big(ctx: XdpContext) -> u32 {
    finish(&ctx, toobig::run(&ctx))
}

/// Benchmark baseline: parse and pass (see `baseline`). Counts nothing.
#[xdp]
pub fn xdp_parse_pass(ctx: XdpContext) -> u32 {
    match baseline::parse_only(&ctx).action() {
        Action::Drop => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

/// Benchmark traffic generator, run with XDP live frames (see `bench`). Never attached to a
/// NAT interface.
#[xdp]
pub fn xdp_bench_gen(ctx: XdpContext) -> u32 {
    bench::generate(&ctx)
}

/// Benchmark ceiling: the forwarding stage without NAT (see `bench`). Never attached by the
/// agent.
#[xdp]
pub fn xdp_bench_redirect(ctx: XdpContext) -> u32 {
    bench::redirect(&ctx)
}

/// Benchmark sink: drops everything (its interface counts what arrived). Never attached by
/// the agent.
#[xdp]
pub fn xdp_bench_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// Every NAT program ends here: count the exit reason, take its action.
#[inline(always)]
fn finish(ctx: &XdpContext, result: Result<Reason, Reason>) -> u32 {
    let reason = match result {
        Ok(reason) | Err(reason) => reason,
    };
    stats::count_reason(reason);
    action_for(ctx, reason)
}

#[inline(always)]
fn action_for(ctx: &XdpContext, reason: Reason) -> u32 {
    match reason.action() {
        // Translated packets leave from XDP where the interface says so, else the kernel
        // forwards them.
        Action::Translated => forward::send(ctx),
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
        // The program built an answer in the frame: back to the neighbour it came from.
        Action::Reply => xdp_action::XDP_TX,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never executed.
    loop {}
}

/// The kernel only loads programs that declare a GPL-compatible licence when they use
/// GPL-only helpers (the FIB lookup the forwarding stage needs is one).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
