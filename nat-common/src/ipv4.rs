//! IPv4 header rules the parser applies before trusting a header (pure, host-tested).

use crate::stats::Reason;

/// IP protocol numbers the NAT understands.
pub mod proto {
    /// ICMP (RFC 792).
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// DCCP: its checksum covers the pseudo-header, and the NAT does not rewrite it.
    pub const DCCP: u8 = 33;
    /// UDP-Lite: its checksum covers the pseudo-header, and the NAT does not rewrite it.
    pub const UDPLITE: u8 = 136;
}

/// ICMP types that carry an error about another packet (its header is quoted inside). Those of
/// them that `crate::icmp::is_translatable_error` names are translated by the ICMP error
/// program; the rest (redirects) are passed untranslated wherever they meet a rule.
pub const fn icmp_is_error(icmp_type: u8) -> bool {
    matches!(icmp_type, 3 | 4 | 5 | 11 | 12)
}

/// What a validated IPv4 header says about where the payload is and whether it is a fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderInfo {
    /// Header length in bytes (20..=60), options included.
    pub header_len: usize,
    /// The datagram's total length from the header (header plus payload).
    pub total_len: usize,
    /// True for every fragment except an unfragmented datagram (MF set or offset non-zero).
    pub is_fragment: bool,
    /// True for fragments after the first (offset non-zero): they carry no L4 header.
    pub is_later_fragment: bool,
    /// The "don't fragment" flag: a router must not fragment it, and answers a datagram too
    /// big for the next link with ICMP "fragmentation needed" (path MTU discovery).
    pub dont_fragment: bool,
}

/// Flag bit "more fragments" in the host-order flags/offset word.
pub const IP_MF: u16 = 0x2000;
/// Flag bit "don't fragment" in the host-order flags/offset word.
pub const IP_DF: u16 = 0x4000;
/// Mask of the fragment offset in the host-order flags/offset word.
pub const IP_OFFSET_MASK: u16 = 0x1fff;

/// Checks the fixed fields of an IPv4 header against the bytes actually present.
///
/// `vihl` is the first header byte, `total_len` and `frag_word` the host-order values of the
/// total-length and flags/offset fields, `available` the bytes from the start of the IP header
/// to the end of the frame. Frames may be longer than the datagram (Ethernet padding), never
/// shorter.
pub const fn validate(
    vihl: u8,
    total_len: u16,
    frag_word: u16,
    available: usize,
) -> Result<HeaderInfo, Reason> {
    if vihl >> 4 != 4 {
        return Err(Reason::MalformedIpv4);
    }
    let header_len = ((vihl & 0x0f) as usize) * 4;
    if header_len < 20 {
        return Err(Reason::MalformedIpv4);
    }
    let total_len = total_len as usize;
    if total_len < header_len || total_len > available {
        return Err(Reason::MalformedIpv4);
    }
    let offset = frag_word & IP_OFFSET_MASK;
    Ok(HeaderInfo {
        header_len,
        total_len,
        is_fragment: offset != 0 || frag_word & IP_MF != 0,
        is_later_fragment: offset != 0,
        dont_fragment: frag_word & IP_DF != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_header() {
        let info = validate(0x45, 40, 0x4000, 40).unwrap();
        assert_eq!(info.header_len, 20);
        assert!(!info.is_fragment);
    }

    #[test]
    fn options_are_accepted() {
        assert_eq!(validate(0x4f, 60, 0, 60).unwrap().header_len, 60);
        assert_eq!(validate(0x46, 24, 0, 30).unwrap().header_len, 24);
    }

    #[test]
    fn bad_version_ihl_and_lengths_are_malformed() {
        assert_eq!(validate(0x65, 40, 0, 40), Err(Reason::MalformedIpv4));
        assert_eq!(validate(0x44, 40, 0, 40), Err(Reason::MalformedIpv4));
        assert_eq!(validate(0x46, 20, 0, 40), Err(Reason::MalformedIpv4));
        assert_eq!(validate(0x45, 41, 0, 40), Err(Reason::MalformedIpv4));
    }

    #[test]
    fn fragments() {
        let first = validate(0x45, 40, IP_MF, 40).unwrap();
        assert!(first.is_fragment && !first.is_later_fragment);
        let later = validate(0x45, 40, 185, 40).unwrap();
        assert!(later.is_fragment && later.is_later_fragment);
        // DF alone is not a fragment.
        assert!(!validate(0x45, 40, 0x4000, 40).unwrap().is_fragment);
        assert!(validate(0x45, 40, 0x4000, 40).unwrap().dont_fragment);
        assert!(!validate(0x45, 40, IP_MF, 40).unwrap().dont_fragment);
    }

    proptest! {
        /// Whatever the bytes, an accepted header lies within the frame and is 20..=60 long.
        #[test]
        fn accepted_headers_are_in_bounds(vihl in any::<u8>(), tl in any::<u16>(), fw in any::<u16>(), avail in 0usize..2000) {
            if let Ok(info) = validate(vihl, tl, fw, avail) {
                prop_assert!(info.header_len >= 20 && info.header_len <= 60);
                prop_assert!(info.header_len <= info.total_len && info.total_len <= avail);
            }
        }
    }
}
