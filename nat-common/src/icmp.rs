//! ICMP errors about translated flows (pure, host-tested): which errors are translated, how a
//! quoted datagram is read, and where the error's outer addresses go.
//!
//! An ICMP error quotes the datagram that caused it as that datagram was *seen* by the router
//! or host reporting it: a packet that left the NAT translated is quoted translated. The error
//! travels back towards the quoted packet's sender, so it moves in the opposite direction of
//! the quoted packet. The kernel program therefore looks the error up by the quoted tuple
//! reversed ([`error_direction_key`]): that is the tuple of a packet travelling the way the
//! error travels, and the session and DNAT tables answer for it exactly as for such a packet.
//! The inner header then becomes the translated tuple reversed back, and the outer addresses
//! follow ([`outer_addresses`]).

use crate::{conntrack::FlowKey, stats::Reason};

/// Length of the ICMP header before an error's quoted datagram (type, code, checksum and the
/// 4 bytes of unused / pointer / next-hop MTU).
pub const ICMP_HEADER_LEN: usize = 8;

/// L4 bytes an error must quote (RFC 792: "the internet header plus the first 64 bits of the
/// original datagram's data"): enough for both ports, the UDP checksum, or an echo's id.
pub const QUOTED_L4_MIN: usize = 8;

/// Offset of the checksum field in a TCP header; the field is quoted only when at least
/// `TCP_CHECKSUM_OFFSET + 2` bytes of TCP header are.
pub const TCP_CHECKSUM_OFFSET: usize = 16;
/// Offset of the checksum field in a UDP header (always inside the 8 quoted bytes).
pub const UDP_CHECKSUM_OFFSET: usize = 6;
/// Offset of the checksum field in an ICMP header.
pub const ICMP_CHECKSUM_OFFSET: usize = 2;
/// Offset of an ICMP echo's identifier.
pub const ICMP_ECHO_ID_OFFSET: usize = 4;

/// ICMP error types whose quote is translated: destination unreachable (fragmentation needed
/// among its codes), source quench, time exceeded and parameter problem. Redirects (5) are
/// not: they only make sense on the link they were sent on, and a NAT never forwards one.
pub const fn is_translatable_error(icmp_type: u8) -> bool {
    matches!(icmp_type, 3 | 4 | 11 | 12)
}

/// What the fixed header of a quoted datagram says, checked against the bytes quoted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotedHeader {
    /// Header length in bytes (20..=60), options included; all of it lies in the quote.
    pub header_len: usize,
    /// L4 bytes of the quoted datagram present in the quote: what follows the header in the
    /// quote, but never more than the datagram's own total length says it had.
    pub l4_len: usize,
    /// The quoted datagram is a fragment (MF set or offset non-zero).
    pub is_fragment: bool,
    /// The quoted datagram is a fragment after the first: it carries no L4 header.
    pub is_later_fragment: bool,
}

/// Checks the fixed fields of a quoted IPv4 header. `vihl`, `total_len` and `frag_word` are
/// the quoted header's first byte and host-order total-length and flags/offset words;
/// `quote_len` the bytes of the error after its ICMP header (within the error's datagram).
///
/// Unlike a datagram on the wire, a quote is normally shorter than its total length says
/// (routers quote the header and 8 bytes, RFC 792), so only the header itself must fit.
pub const fn parse_quoted_header(
    vihl: u8,
    total_len: u16,
    frag_word: u16,
    quote_len: usize,
) -> Result<QuotedHeader, Reason> {
    if vihl >> 4 != 4 {
        return Err(Reason::IcmpErrorMalformed);
    }
    let header_len = ((vihl & 0x0f) as usize) * 4;
    let total_len = total_len as usize;
    if header_len < 20 || header_len > quote_len || total_len < header_len {
        return Err(Reason::IcmpErrorMalformed);
    }
    let quoted = if quote_len < total_len {
        quote_len
    } else {
        total_len
    };
    let offset = frag_word & crate::ipv4::IP_OFFSET_MASK;
    Ok(QuotedHeader {
        header_len,
        l4_len: quoted - header_len,
        is_fragment: offset != 0 || frag_word & crate::ipv4::IP_MF != 0,
        is_later_fragment: offset != 0,
    })
}

/// The tuple the tables are asked about for an error quoting `quoted`: the quoted packet's
/// tuple reversed, i.e. a packet travelling the way the error does. For ICMP echo this turns
/// a quoted request (`sport = id`) into the reply form (`dport = id`) and back, matching the
/// keys sessions use.
#[inline(always)]
pub const fn error_direction_key(quoted: &FlowKey) -> FlowKey {
    quoted.reversed()
}

/// The error's new outer (source, destination) when its quote changes from `quoted` (as on the
/// wire) to `restored`.
///
/// The error goes back to the quoted packet's sender, so where the quoted source address was
/// translated, the outer destination becomes the restored source (an error from outside
/// reaches the inside host, not the external address). Where the quoted destination address
/// was translated, the outer source becomes the restored destination: the error then comes
/// from the address the sender knows (the VIP, the external address), whoever reported it; this
/// is what Linux's NAT does too, and it never shows an address the NAT hides. A side whose
/// address the flow does not translate keeps its outer address (a router on the way stays
/// visible, as traceroute needs).
#[inline(always)]
pub const fn outer_addresses(
    outer_src: [u8; 4],
    outer_dst: [u8; 4],
    quoted: &FlowKey,
    restored: &FlowKey,
) -> ([u8; 4], [u8; 4]) {
    let dst = if u32::from_ne_bytes(quoted.src) != u32::from_ne_bytes(restored.src) {
        restored.src
    } else {
        outer_dst
    };
    let src = if u32::from_ne_bytes(quoted.dst) != u32::from_ne_bytes(restored.dst) {
        restored.dst
    } else {
        outer_src
    };
    (src, dst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> FlowKey {
        FlowKey {
            src,
            dst,
            sport: sport.to_be_bytes(),
            dport: dport.to_be_bytes(),
            proto: 17,
            _pad: [0; 3],
        }
    }

    #[test]
    fn translatable_types() {
        for t in [3, 4, 11, 12] {
            assert!(is_translatable_error(t));
        }
        for t in [0, 5, 8, 13, 14, 255] {
            assert!(!is_translatable_error(t));
        }
    }

    #[test]
    fn rfc792_quote_of_header_and_8_bytes() {
        let q = parse_quoted_header(0x45, 1500, 0x4000, 28).unwrap();
        assert_eq!(q.header_len, 20);
        assert_eq!(q.l4_len, 8);
        assert!(!q.is_fragment);
    }

    #[test]
    fn quote_longer_than_the_datagram_counts_only_the_datagram() {
        // RFC 4884 extensions or padding after a short datagram are not its L4 bytes.
        let q = parse_quoted_header(0x46, 32, 0, 128).unwrap();
        assert_eq!((q.header_len, q.l4_len), (24, 8));
    }

    #[test]
    fn malformed_quotes() {
        assert_eq!(
            parse_quoted_header(0x65, 40, 0, 28),
            Err(Reason::IcmpErrorMalformed)
        );
        assert_eq!(
            parse_quoted_header(0x44, 40, 0, 28),
            Err(Reason::IcmpErrorMalformed)
        );
        // Header longer than the quote.
        assert_eq!(
            parse_quoted_header(0x4f, 100, 0, 56),
            Err(Reason::IcmpErrorMalformed)
        );
        // Total length below the header length.
        assert_eq!(
            parse_quoted_header(0x45, 19, 0, 28),
            Err(Reason::IcmpErrorMalformed)
        );
    }

    #[test]
    fn fragments() {
        let first = parse_quoted_header(0x45, 1500, 0x2000, 28).unwrap();
        assert!(first.is_fragment && !first.is_later_fragment);
        let later = parse_quoted_header(0x45, 1500, 185, 28).unwrap();
        assert!(later.is_fragment && later.is_later_fragment);
    }

    #[test]
    fn snat_error_from_outside_reaches_the_inside_host() {
        // Inside 198.18.0.2:5000 left as 203.0.113.1:1024 towards 198.51.100.53:53; a router
        // 198.51.100.1 reports time exceeded to the external address.
        let quoted = key([203, 0, 113, 1], 1024, [198, 51, 100, 53], 53);
        let restored = key([198, 18, 0, 2], 5000, [198, 51, 100, 53], 53);
        let (src, dst) = outer_addresses([198, 51, 100, 1], [203, 0, 113, 1], &quoted, &restored);
        assert_eq!((src, dst), ([198, 51, 100, 1], [198, 18, 0, 2]));
    }

    #[test]
    fn dnat_error_from_the_backend_side_comes_from_the_vip() {
        // Client 198.51.100.7 -> VIP 198.18.100.10:80 went to 198.18.1.10:8080; a router on the
        // backend's side reports it.
        let quoted = key([198, 51, 100, 7], 40000, [198, 18, 1, 10], 8080);
        let restored = key([198, 51, 100, 7], 40000, [198, 18, 100, 10], 80);
        let (src, dst) = outer_addresses([198, 18, 1, 1], [198, 51, 100, 7], &quoted, &restored);
        assert_eq!((src, dst), ([198, 18, 100, 10], [198, 51, 100, 7]));
    }

    fn addr() -> impl Strategy<Value = [u8; 4]> {
        any::<[u8; 4]>()
    }

    proptest! {
        /// An error sent by the quoted packet's own destination (outer = quoted reversed)
        /// ends up exactly as the restored flow's destination answering its source.
        #[test]
        fn error_from_the_quoted_destination_follows_the_flow(
            qs in addr(), qd in addr(), rs in addr(), rd in addr(),
            sp in any::<u16>(), dp in any::<u16>(),
        ) {
            let quoted = key(qs, sp, qd, dp);
            let restored = key(rs, sp, rd, dp);
            let (src, dst) = outer_addresses(qd, qs, &quoted, &restored);
            prop_assert_eq!((src, dst), (rd, rs));
        }

        /// Nothing translated, nothing moves; and the lookup key is an involution.
        #[test]
        fn identity_and_involution(
            os in addr(), od in addr(), qs in addr(), qd in addr(),
            sp in any::<u16>(), dp in any::<u16>(),
        ) {
            let quoted = key(qs, sp, qd, dp);
            prop_assert_eq!(outer_addresses(os, od, &quoted, &quoted), (os, od));
            prop_assert_eq!(error_direction_key(&error_direction_key(&quoted)), quoted);
        }

        /// Whatever the bytes, an accepted quote's header and L4 bytes lie within the quote.
        #[test]
        fn accepted_quotes_are_in_bounds(
            vihl in any::<u8>(), tl in any::<u16>(), fw in any::<u16>(), ql in 0usize..2000,
        ) {
            if let Ok(q) = parse_quoted_header(vihl, tl, fw, ql) {
                prop_assert!(q.header_len >= 20 && q.header_len <= 60);
                prop_assert!(q.header_len + q.l4_len <= ql);
                prop_assert!(q.header_len + q.l4_len <= tl as usize);
            }
        }
    }
}
