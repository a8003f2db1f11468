//! Rewrites a packet's addresses and ports from one tuple to another, fixing every checksum
//! incrementally (RFC 1624). Stateless DNAT and session translation both end here.

use nat_common::{
    checksum::{self, Delta},
    conntrack::FlowKey,
    stats::Reason,
};
use network_types::{icmp::Icmpv4Hdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

/// Offset of the checksum in a TCP header.
const TCP_CHECK: usize = 16;
/// Offset of the checksum in a UDP header.
const UDP_CHECK: usize = 6;

use crate::{
    packet::{ptr_at, Frame},
    parse::{l4_header, Ipv4Packet, L4Kind, L4},
};

/// Rewrites the packet described by `from` (its current addresses and ports) to `to`. Ports
/// are only touched where the packet has them; for a later fragment or a protocol without
/// ports only the IP header changes.
///
/// Fails, leaving the packet untouched, when the L4 header that would need a checksum update
/// is cut short.
#[inline(always)]
pub fn rewrite<C: Frame>(
    ctx: &C,
    pkt: &Ipv4Packet,
    l4: &L4,
    from: &FlowKey,
    to: &FlowKey,
) -> Result<(), Reason> {
    if l4.kind == L4Kind::Truncated {
        return Err(Reason::TruncatedL4);
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, pkt.l3_offset).map_err(|_| Reason::MalformedIpv4)?;
    // SAFETY: bounds-checked by ptr_at; XDP owns the frame.
    let ip = unsafe { &mut *ip };
    // Every field is written and every checksum adjusted unconditionally: an RFC 1624 update
    // with old == new leaves a valid checksum unchanged, and straight-line code keeps the
    // verifier from exploring every combination of "this field changed".
    // The address change is summed once and folded into each checksum that covers it (the
    // IP header's, and TCP's or UDP's through the pseudo-header).
    let addrs = addrs_changed(from, to);
    ip.src_addr = to.src;
    ip.dst_addr = to.dst;
    ip.check = addrs.apply(u16::from_be_bytes(ip.check)).to_be_bytes();

    // Ports change only where the packet carries them: not in later fragments. A first
    // fragment's L4 checksum covers the whole datagram, and an incremental update stays right
    // for it without the bytes in later fragments.
    let ports = !pkt.info.is_later_fragment;
    let own = if ports {
        ports_changed(Delta::NONE, from, to)
    } else {
        Delta::NONE
    };
    // Where the TCP or UDP checksum sits, once its header is rewritten (updated last, by the
    // context: an skb's checksum may be partial, see `packet::Frame`).
    let check_offset = pkt.l4_offset();
    match l4.kind {
        L4Kind::Tcp => {
            let Some(tcp) = l4_header::<TcpHdr, C>(ctx, pkt) else {
                return Err(Reason::TruncatedL4);
            };
            // SAFETY: bounds-checked by l4_header.
            let tcp = unsafe { &mut *tcp };
            if ports {
                tcp.source = to.sport;
                tcp.dest = to.dport;
            }
            ctx.update_l4_checksum(check_offset + TCP_CHECK, &mut tcp.check, addrs, own, false);
        }
        L4Kind::Udp => {
            let Some(udp) = l4_header::<UdpHdr, C>(ctx, pkt) else {
                return Err(Reason::TruncatedL4);
            };
            // SAFETY: bounds-checked by l4_header.
            let udp = unsafe { &mut *udp };
            if ports {
                udp.src = to.sport;
                udp.dst = to.dport;
            }
            ctx.update_l4_checksum(check_offset + UDP_CHECK, &mut udp.check, addrs, own, true);
        }
        L4Kind::IcmpEchoRequest | L4Kind::IcmpEchoReply if ports => {
            // The echo id is the "port" of whichever side chose it; the ICMP checksum covers
            // it but not the IP pseudo-header.
            let (old_id, new_id) = if l4.kind == L4Kind::IcmpEchoRequest {
                (from.sport, to.sport)
            } else {
                (from.dport, to.dport)
            };
            let Some(icmp) = l4_header::<Icmpv4Hdr, _>(ctx, pkt) else {
                return Err(Reason::TruncatedL4);
            };
            // SAFETY: bounds-checked by l4_header.
            let icmp = unsafe { &mut *icmp };
            icmp.data[0] = new_id[0];
            icmp.data[1] = new_id[1];
            icmp.check = checksum::update_u16(
                u16::from_be_bytes(icmp.check),
                u16::from_be_bytes(old_id),
                u16::from_be_bytes(new_id),
            )
            .to_be_bytes();
        }
        // ICMP's checksum does not cover the pseudo-header; other protocols carry no ports.
        _ => {}
    }
    Ok(())
}

/// The checksum change of both addresses changing from `from` to `to`.
#[inline(always)]
fn addrs_changed(from: &FlowKey, to: &FlowKey) -> Delta {
    Delta::NONE.addr(from.src, to.src).addr(from.dst, to.dst)
}

/// `delta` plus the change of both ports from `from` to `to`.
#[inline(always)]
fn ports_changed(delta: Delta, from: &FlowKey, to: &FlowKey) -> Delta {
    delta
        .word(u16::from_be_bytes(from.sport), u16::from_be_bytes(to.sport))
        .word(u16::from_be_bytes(from.dport), u16::from_be_bytes(to.dport))
}

/// `check` adjusted for both addresses changing from `from` to `to`.
#[inline(always)]
pub(crate) fn addr_delta(check: u16, from: &FlowKey, to: &FlowKey) -> u16 {
    addrs_changed(from, to).apply(check)
}

/// `check` adjusted for both ports changing from `from` to `to`.
#[inline(always)]
pub(crate) fn port_delta(check: u16, from: &FlowKey, to: &FlowKey) -> u16 {
    ports_changed(Delta::NONE, from, to).apply(check)
}
