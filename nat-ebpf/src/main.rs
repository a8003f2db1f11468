//! XDP NAT: the kernel half of the appliance.
//!
//! The same translation runs at two hooks: XDP (`xdp_nat` and its stages) and TC ingress
//! (`tc_nat` and its stages, for interfaces whose hook is `tc`); the code is written once over
//! `packet::Frame`. Every packet takes exactly one exit, named by a [`Reason`] that is counted
//! per CPU and decides the program's action. `nat` orders the stages: sessions (conntrack),
//! DNAT rules (stateless or stateful), SNAT rules; ICMP errors go to `icmp`. Translated
//! packets leave from the program (`forward`) or go to the kernel, which forwards them.
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

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use nat_common::stats::{Action, Reason};
use packet::{pull_headers, Frame, TC_HEADERS};

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

/// Benchmark floor of a stateful translation: parse and one `SESSIONS` lookup (see
/// `baseline`). Never attached by the agent.
#[xdp]
pub fn xdp_bench_session_lookup(ctx: XdpContext) -> u32 {
    baseline::session_lookup_only(&ctx)
}

/// Benchmark floor of a stateless translation: parse and one DNAT rule lookup (see
/// `baseline`). Never attached by the agent.
#[xdp]
pub fn xdp_bench_rule_lookup(ctx: XdpContext) -> u32 {
    baseline::rule_lookup_only(&ctx)
}

/// Benchmark floor of a new SNAT flow: parse and the four inserts (see `baseline`). Never
/// attached by the agent.
#[xdp]
pub fn xdp_bench_new_flow_inserts(ctx: XdpContext) -> u32 {
    baseline::new_flow_inserts_only(&ctx)
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

/// TC twin of [`xdp_nat`], attached at ingress (TCX) to interfaces whose hook is `tc`.
#[classifier]
pub fn tc_nat(ctx: TcContext) -> i32 {
    pull_headers(&ctx, TC_HEADERS);
    finish(&ctx, nat::try_translate(&ctx)) as i32
}

/// TC twin of [`xdp_nat_rules`].
#[classifier]
pub fn tc_nat_rules(ctx: TcContext) -> i32 {
    finish(&ctx, nat::try_rules(&ctx)) as i32
}

/// TC twin of [`xdp_nat_new_flow`].
#[classifier]
pub fn tc_nat_new_flow(ctx: TcContext) -> i32 {
    finish(&ctx, newflow::run(&ctx)) as i32
}

/// TC twin of [`xdp_nat_icmp_error`]: reads further into the packet than `tc_nat` made
/// directly accessible (the quoted datagram).
#[classifier]
pub fn tc_nat_icmp_error(ctx: TcContext) -> i32 {
    pull_headers(&ctx, icmp::HEADERS);
    finish(&ctx, icmp::run(&ctx)) as i32
}

/// TC twin of [`xdp_nat_claim`].
#[classifier]
pub fn tc_nat_claim(ctx: TcContext) -> i32 {
    finish(&ctx, newflow::claim(&ctx)) as i32
}

/// TC twin of [`xdp_nat_too_big`].
#[classifier]
pub fn tc_nat_too_big(ctx: TcContext) -> i32 {
    finish(&ctx, toobig::run(&ctx)) as i32
}

/// Every NAT program ends here: count the exit reason, take its action.
#[inline(always)]
fn finish<C: Frame>(ctx: &C, result: Result<Reason, Reason>) -> u32 {
    let reason = match result {
        Ok(reason) | Err(reason) => reason,
    };
    stats::count_reason(reason);
    action_for(ctx, reason)
}

#[inline(always)]
fn action_for<C: Frame>(ctx: &C, reason: Reason) -> u32 {
    match reason.action() {
        // Translated packets leave from the program where the interface says so, else the
        // kernel forwards them.
        Action::Translated => forward::send(ctx),
        Action::Pass => C::PASS,
        Action::Drop => C::DROP,
        // The program built an answer in the packet: back to the neighbour it came from.
        Action::Reply => ctx.back_out(),
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
