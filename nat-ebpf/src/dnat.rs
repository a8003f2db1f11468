//! Stateless DNAT: find the rule for a packet and rewrite it, checksums included.

use aya_ebpf::{maps::lpm_trie::Key, programs::XdpContext};
use nat_common::{
    checksum,
    ipv4::{icmp_is_error, proto},
    rules::{NatRule, NatRuleSet, SetMatch, MAX_RULES_PER_SET},
    stats::Reason,
};
use network_types::{icmp::Icmpv4Hdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{
    maps::{DNAT_FORWARD, DNAT_REVERSE},
    packet::{frame_len, ptr_at},
    parse::{parse_ipv4, Ipv4Packet},
    stats::{count_rule, Direction},
};

/// Which address and port of the packet a rule rewrites.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Original direction: destination (VIP -> backend).
    Destination,
    /// Reply direction: source (backend -> VIP).
    Source,
}

/// Parses the packet and applies the first DNAT rule that matches it, forward or reverse.
/// `Ok` and `Err` both carry the exit reason; `Err` means "left the fast path early".
#[inline(always)]
pub fn try_translate(ctx: &XdpContext) -> Result<Reason, Reason> {
    let pkt = parse_ipv4(ctx)?;
    if let Some(set) = DNAT_FORWARD.get(Key::new(32, pkt.dst)) {
        if apply_set(ctx, &pkt, set, Side::Destination)? {
            return Ok(Reason::DnatTranslated);
        }
    }
    if let Some(set) = DNAT_REVERSE.get(Key::new(32, pkt.src)) {
        if apply_set(ctx, &pkt, set, Side::Source)? {
            return Ok(Reason::DnatReplyTranslated);
        }
    }
    Err(Reason::NoMatch)
}

/// The port on the rewritten side, read only when some rule for this protocol needs it.
#[inline(always)]
fn l4_port(
    ctx: &XdpContext,
    pkt: &Ipv4Packet,
    set: &NatRuleSet,
    side: Side,
) -> Result<Option<u16>, Reason> {
    // Every fragment of a datagram must be translated alike, and later fragments carry no
    // ports: so for fragments nothing may depend on ports (see SetMatch::NeedsPorts).
    if pkt.info.is_fragment || !set.needs_port_for(pkt.proto) {
        return Ok(None);
    }
    match pkt.proto {
        proto::TCP => {
            let tcp: *const TcpHdr = l4_header(ctx, pkt)?;
            // SAFETY: bounds-checked by l4_header.
            let tcp = unsafe { &*tcp };
            Ok(Some(u16::from_be_bytes(match side {
                Side::Destination => tcp.dest,
                Side::Source => tcp.source,
            })))
        }
        proto::UDP => {
            let udp: *const UdpHdr = l4_header(ctx, pkt)?;
            // SAFETY: bounds-checked by l4_header.
            let udp = unsafe { &*udp };
            Ok(Some(u16::from_be_bytes(match side {
                Side::Destination => udp.dst,
                Side::Source => udp.src,
            })))
        }
        // Port rules only name TCP or UDP (validated by the agent).
        _ => Ok(None),
    }
}

/// ICMP errors quote another packet's header; rewriting only the outer header would leave the
/// quote inconsistent, so until they are translated properly they go to the kernel untouched.
#[inline(always)]
fn refuse_icmp_error(ctx: &XdpContext, pkt: &Ipv4Packet) -> Result<(), Reason> {
    if pkt.proto != proto::ICMP || pkt.info.is_later_fragment {
        return Ok(());
    }
    let icmp: *const Icmpv4Hdr = l4_header(ctx, pkt)?;
    // SAFETY: bounds-checked by l4_header.
    if icmp_is_error(unsafe { (*icmp).type_ }) {
        return Err(Reason::IcmpErrorPassed);
    }
    Ok(())
}

/// Pointer to the L4 header `T`, which must lie inside both the frame and the datagram's
/// total length (a frame may carry Ethernet padding past the datagram).
#[inline(always)]
fn l4_header<T>(ctx: &XdpContext, pkt: &Ipv4Packet) -> Result<*mut T, Reason> {
    if pkt.info.header_len + core::mem::size_of::<T>() > pkt.info.total_len {
        return Err(Reason::TruncatedL4);
    }
    ptr_at(ctx, pkt.l4_offset()).map_err(|_| Reason::TruncatedL4)
}

/// Applies the first matching rule of `set`. `Ok(false)`: no rule matched.
#[inline(always)]
fn apply_set(
    ctx: &XdpContext,
    pkt: &Ipv4Packet,
    set: &NatRuleSet,
    side: Side,
) -> Result<bool, Reason> {
    let port = l4_port(ctx, pkt, set, side)?;
    let index = match set.find(pkt.proto, port) {
        SetMatch::None => return Ok(false),
        SetMatch::NeedsPorts => return Err(Reason::FragmentUnmatched),
        SetMatch::Rule(i) => i,
    };
    if index >= MAX_RULES_PER_SET {
        return Ok(false);
    }
    let rule = &set.rules[index];
    if pkt.proto == proto::DCCP || pkt.proto == proto::UDPLITE {
        return Err(Reason::ProtoUnsupported);
    }
    refuse_icmp_error(ctx, pkt)?;
    rewrite(ctx, pkt, rule, side)?;
    let direction = match side {
        Side::Destination => Direction::Original,
        Side::Source => Direction::Reply,
    };
    count_rule(ctx, rule.counter_index, direction, frame_len(ctx) as u64);
    Ok(true)
}

/// Rewrites one side's address (and port, if the rule says so) with incremental checksums.
#[inline(always)]
fn rewrite(ctx: &XdpContext, pkt: &Ipv4Packet, rule: &NatRule, side: Side) -> Result<(), Reason> {
    let old_addr = match side {
        Side::Destination => pkt.dst,
        Side::Source => pkt.src,
    };
    let new_addr = rule.translate_addr(old_addr);

    // Validate the L4 header before touching anything, so a failure leaves the packet intact.
    let l4_present = !pkt.info.is_later_fragment;
    if l4_present && (pkt.proto == proto::TCP || pkt.proto == proto::UDP) {
        let _: *mut UdpHdr = l4_header(ctx, pkt)?;
        if pkt.proto == proto::TCP {
            let _: *mut TcpHdr = l4_header(ctx, pkt)?;
        }
    }

    let ip: *mut Ipv4Hdr = ptr_at(ctx, pkt.l3_offset).map_err(|_| Reason::MalformedIpv4)?;
    // SAFETY: bounds-checked by ptr_at; XDP owns the frame.
    let ip = unsafe { &mut *ip };
    match side {
        Side::Destination => ip.dst_addr = new_addr,
        Side::Source => ip.src_addr = new_addr,
    }
    ip.check =
        checksum::update_addr(u16::from_be_bytes(ip.check), old_addr, new_addr).to_be_bytes();

    if !l4_present {
        return Ok(());
    }
    match pkt.proto {
        proto::TCP => {
            let tcp: *mut TcpHdr = l4_header(ctx, pkt)?;
            // SAFETY: bounds-checked by l4_header.
            let tcp = unsafe { &mut *tcp };
            let mut check =
                checksum::update_addr(u16::from_be_bytes(tcp.check), old_addr, new_addr);
            let port = match side {
                Side::Destination => &mut tcp.dest,
                Side::Source => &mut tcp.source,
            };
            let old_port = u16::from_be_bytes(*port);
            let new_port = rule.translate_port(old_port);
            if new_port != old_port {
                *port = new_port.to_be_bytes();
                check = checksum::update_u16(check, old_port, new_port);
            }
            tcp.check = check.to_be_bytes();
        }
        proto::UDP => {
            let udp: *mut UdpHdr = l4_header(ctx, pkt)?;
            // SAFETY: bounds-checked by l4_header.
            let udp = unsafe { &mut *udp };
            let mut check =
                checksum::udp_update_addr(u16::from_be_bytes(udp.check), old_addr, new_addr);
            let port = match side {
                Side::Destination => &mut udp.dst,
                Side::Source => &mut udp.src,
            };
            let old_port = u16::from_be_bytes(*port);
            let new_port = rule.translate_port(old_port);
            if new_port != old_port {
                *port = new_port.to_be_bytes();
                check = checksum::udp_update_u16(check, old_port, new_port);
            }
            udp.check = check.to_be_bytes();
        }
        // ICMP's checksum does not cover the IP pseudo-header: nothing else to fix.
        _ => {}
    }
    Ok(())
}
