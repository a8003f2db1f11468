//! ICMP "fragmentation needed" built in XDP, for a "don't fragment" packet too big for the route
//! its translation would take, when the kernel could not answer for us: the flow's destination
//! is translated (DNAT, or a reply to an inside host), so untranslated the packet would not
//! route like the translated one, and translated the kernel's error would quote the translated
//! packet to the wrong address. A router answers with the packet as its sender sent it, which
//! is what the frame still holds here (nothing is rewritten before this check).
//!
//! Reached by tail call from `xdp_nat` (`hand_over`), with the route's MTU in a per-CPU slot.
//! The frame is turned in place into the answer: 28 bytes are added in front for the new IP
//! and ICMP headers, the original IP header and the first 8 bytes of its payload stay as the
//! quote, the rest is cut off, and the frame goes back out of the interface it came in on
//! (XDP_TX) to the neighbour that sent it.

use nat_common::{maps::TOO_BIG_SLOT, stats::Reason};

use crate::{
    fib::source_towards,
    maps::TOO_BIG_MTU,
    packet::{ptr_at, Frame},
    parse::parse_ipv4,
};

const ETH_HLEN: usize = 14;
/// The new IP (20) and ICMP (8) headers put in front of the quote.
const NEW_HEADERS: usize = 28;
/// The quote: the original IPv4 header (no options: see `run`) and 8 bytes of its payload.
const QUOTE: usize = 28;
/// The answer's whole frame.
const ANSWER_LEN: usize = ETH_HLEN + NEW_HEADERS + QUOTE;

/// Hands the packet to `xdp_nat_too_big` with the route's `mtu`; returns only if that failed.
#[inline(always)]
pub fn hand_over<C: Frame>(ctx: &C, mtu: u32) -> Reason {
    let Some(slot) = TOO_BIG_MTU.get_ptr_mut(0) else {
        return Reason::MtuTooBigUnanswered;
    };
    // SAFETY: per-CPU slot from a successful lookup; only this CPU touches it.
    unsafe { *slot = mtu };
    // SAFETY: tail_call either does not return or returns on failure; nothing is held across.
    unsafe { C::programs().tail_call(ctx, TOO_BIG_SLOT) };
    Reason::MtuTooBigUnanswered
}

/// Body of `xdp_nat_too_big`.
#[inline(always)]
pub fn run<C: Frame>(ctx: &C) -> Result<Reason, Reason> {
    let unanswered = Reason::MtuTooBigUnanswered;
    let pkt = parse_ipv4(ctx)?;
    // Only the plain layout: Ethernet without a tag, an IPv4 header without options (all the
    // fixed offsets below). Anything else is dropped, as by a router that cannot answer.
    if pkt.l3_offset != ETH_HLEN || pkt.info.header_len != 20 || ctx.packet_len() < ANSWER_LEN - 28
    {
        return Err(unanswered);
    }
    // SAFETY: per-CPU slot from a successful lookup, written by xdp_nat just before.
    let mtu = match TOO_BIG_MTU.get(0) {
        Some(&mtu) if mtu > 0 && mtu < 0x10000 => mtu as u16,
        _ => return Err(unanswered),
    };
    let Some(our_addr) = source_towards(ctx, pkt.src) else {
        return Err(unanswered);
    };
    // The Ethernet addresses swap: the answer goes back to the neighbour that sent the packet.
    let eth = ptr_at::<[u8; 12], _>(ctx, 0).map_err(|_| unanswered)?;
    // SAFETY: bounds-checked pointer into the frame.
    let macs = unsafe { *eth };

    ctx.reshape(NEW_HEADERS, ANSWER_LEN)
        .map_err(|_| unanswered)?;
    let frame = ptr_at::<[u8; ANSWER_LEN], _>(ctx, 0).map_err(|_| unanswered)?;
    // SAFETY: bounds-checked pointer covering the whole answer.
    let f = unsafe { &mut *frame };
    // Ethernet: to the sender's neighbour, from us (the packet's destination MAC).
    f[0..6].copy_from_slice(&macs[6..12]);
    f[6..12].copy_from_slice(&macs[0..6]);
    f[12] = 0x08;
    f[13] = 0x00;
    // IPv4: from our address towards the sender, to the sender.
    let total = (NEW_HEADERS + QUOTE) as u16;
    let ip: [u8; 20] = [
        0x45,
        0xc0, // precedence "internetwork control", as Linux sends its ICMP errors
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0,
        0,
        64,
        1,
        0,
        0,
        our_addr[0],
        our_addr[1],
        our_addr[2],
        our_addr[3],
        pkt.src[0],
        pkt.src[1],
        pkt.src[2],
        pkt.src[3],
    ];
    f[14..34].copy_from_slice(&ip);
    let ip_sum = fold(sum_words(&f[14..34]));
    f[24] = (ip_sum >> 8) as u8;
    f[25] = ip_sum as u8;
    // ICMP: type 3 code 4, unused, next-hop MTU (RFC 1191).
    let icmp: [u8; 8] = [3, 4, 0, 0, 0, 0, (mtu >> 8) as u8, mtu as u8];
    f[34..42].copy_from_slice(&icmp);
    let icmp_sum = fold(sum_words(&f[34..42]) + sum_words(&f[42..ANSWER_LEN]));
    f[36] = (icmp_sum >> 8) as u8;
    f[37] = icmp_sum as u8;
    Ok(Reason::MtuTooBigAnswered)
}

/// Sum of big-endian 16-bit words (even length).
#[inline(always)]
fn sum_words(bytes: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// The Internet checksum of a word sum: carries folded in, complemented.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
