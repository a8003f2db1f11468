//! The frames the kernel benchmark feeds to the programs: 64-byte Ethernet + IPv4 + UDP frames
//! built from a [`FlowKey`], with both checksums computed, and the reverse (a frame's tuple).
//!
//! Every row of the benchmark uses the same frame size, so rows differ only in the path the
//! program takes.

use anyhow::{bail, Result};
use nat_common::{
    checksum::{checksum, l4_checksum},
    conntrack::FlowKey,
    ipv4::proto,
};

/// Length of every benchmark frame as handed to XDP (no FCS): the classic 64-byte packet.
pub const FRAME_LEN: usize = 64;

const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ETH_P_IPV4: u16 = 0x0800;
/// Locally administered MACs: never real hardware.
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// "Don't fragment", as a socket sends UDP: the program must see an unfragmented datagram.
const IP_DF: u16 = 0x4000;

/// A UDP tuple; addresses as octets, ports in host order (converted to the network order a
/// [`FlowKey`] holds).
pub fn udp_key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> FlowKey {
    FlowKey {
        src,
        dst,
        sport: sport.to_be_bytes(),
        dport: dport.to_be_bytes(),
        proto: proto::UDP,
        _pad: [0; 3],
    }
}

/// The [`FRAME_LEN`]-byte UDP frame carrying `key` (which must be UDP).
pub fn udp_frame(key: &FlowKey) -> Vec<u8> {
    debug_assert_eq!(key.proto, proto::UDP);
    let udp_len = FRAME_LEN - ETH_HLEN - IPV4_HLEN;
    let mut f = Vec::with_capacity(FRAME_LEN);
    f.extend_from_slice(&DST_MAC);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&ETH_P_IPV4.to_be_bytes());

    let ip_start = f.len();
    f.push(0x45); // version 4, IHL 5
    f.push(0); // DSCP/ECN
    f.extend_from_slice(&((IPV4_HLEN + udp_len) as u16).to_be_bytes());
    f.extend_from_slice(&0x4d2eu16.to_be_bytes()); // identification
    f.extend_from_slice(&IP_DF.to_be_bytes());
    f.push(64); // TTL
    f.push(proto::UDP);
    f.extend_from_slice(&[0, 0]); // header checksum, below
    f.extend_from_slice(&key.src);
    f.extend_from_slice(&key.dst);
    let c = checksum(&f[ip_start..ip_start + IPV4_HLEN]);
    f[ip_start + 10..ip_start + 12].copy_from_slice(&c.to_be_bytes());

    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&key.sport);
    udp.extend_from_slice(&key.dport);
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]); // checksum, below
    udp.resize(udp_len, 0xab); // payload
                               // A computed 0 goes on the wire as 0xffff: 0 means "no checksum" (RFC 768).
    let c = match l4_checksum(key.src, key.dst, proto::UDP, &udp) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&udp);
    debug_assert_eq!(f.len(), FRAME_LEN);
    f
}

/// The tuple of a frame built by [`udp_frame`] (after the program rewrote it, typically).
pub fn frame_key(frame: &[u8]) -> Result<FlowKey> {
    if frame.len() < ETH_HLEN + IPV4_HLEN + UDP_HLEN {
        bail!(
            "a {}-byte frame is too short for Ethernet + IPv4 + UDP",
            frame.len()
        );
    }
    let ip = &frame[ETH_HLEN..];
    if ip[0] != 0x45 || ip[9] != proto::UDP {
        bail!(
            "not an option-less IPv4 UDP frame (version/IHL {:#04x}, protocol {})",
            ip[0],
            ip[9]
        );
    }
    let udp = &ip[IPV4_HLEN..];
    let octets = |s: &[u8]| [s[0], s[1], s[2], s[3]];
    Ok(FlowKey {
        src: octets(&ip[12..16]),
        dst: octets(&ip[16..20]),
        sport: [udp[0], udp[1]],
        dport: [udp[2], udp[3]],
        proto: proto::UDP,
        _pad: [0; 3],
    })
}

/// `a.b.c.d:port -> e.f.g.h:port` for messages.
pub fn show(key: &FlowKey) -> String {
    let [a, b, c, d] = key.src;
    let [e, f, g, h] = key.dst;
    format!(
        "{a}.{b}.{c}.{d}:{} -> {e}.{f}.{g}.{h}:{}",
        u16::from_be_bytes(key.sport),
        u16::from_be_bytes(key.dport)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_carry_valid_checksums() {
        let key = udp_key([198, 18, 0, 2], 40000, [198, 51, 100, 7], 53);
        let f = udp_frame(&key);
        assert_eq!(f.len(), FRAME_LEN);
        assert_eq!(frame_key(&f).unwrap(), key);
        // A header with a correct checksum sums to zero (RFC 1071).
        assert_eq!(checksum(&f[ETH_HLEN..ETH_HLEN + IPV4_HLEN]), 0);
        let udp = &f[ETH_HLEN + IPV4_HLEN..];
        assert_eq!(l4_checksum(key.src, key.dst, proto::UDP, udp), 0);
    }

    #[test]
    fn short_or_foreign_frames_are_refused() {
        assert!(frame_key(&[0u8; 20]).is_err());
        let mut f = udp_frame(&udp_key([198, 18, 0, 3], 1, [198, 51, 100, 8], 2));
        f[ETH_HLEN + 9] = proto::TCP;
        assert!(frame_key(&f).is_err());
    }
}
