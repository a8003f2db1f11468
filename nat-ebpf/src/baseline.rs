//! Reference program for benchmarks: parses exactly what `xdp_nat` parses (Ethernet, VLAN,
//! IPv4, L4) and passes the packet. Measured beside the NAT in the same run, it gives the floor
//! that translation costs are expressed against. Never attached by the agent.

use aya_ebpf::programs::XdpContext;
use nat_common::stats::Reason;

use crate::parse::{parse_ipv4, read_l4, L4Kind};

/// Parses the packet; the reason only keeps the work from being optimised away.
#[inline(always)]
pub fn parse_only(ctx: &XdpContext) -> Reason {
    match parse_ipv4(ctx) {
        Ok(pkt) => {
            if read_l4(ctx, &pkt).kind == L4Kind::Truncated {
                Reason::TruncatedL4
            } else {
                Reason::NoMatch
            }
        }
        Err(reason) => reason,
    }
}
