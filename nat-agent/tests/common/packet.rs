//! Hand-built frames for the XDP fixtures.
//!
//! Every frame is assembled byte by byte from a field-level description ([`Packet`]), and
//! every checksum is computed from scratch with `nat_common::checksum`. Expected outputs are
//! built the same way from the *translated* description, never by patching the program's
//! output, so a fixture compares the XDP program against an independent construction.
//!
//! The checkers ([`verify_checksums`], [`verify_reassembled_l4_checksum`]) re-parse a frame and
//! recompute its checksums over the bytes as they are, again independently of the builder.

use std::{fmt::Write as _, net::Ipv4Addr};

use nat_common::{
    checksum::{checksum, l4_checksum},
    ipv4::proto,
};

/// Ethernet header length (no tag).
pub const ETH_HLEN: usize = 14;
/// One 802.1Q / 802.1ad tag.
pub const VLAN_HLEN: usize = 4;
/// Fixed IPv4 header length (IHL 5).
pub const IPV4_HLEN: usize = 20;
/// TCP header without options.
pub const TCP_HLEN: usize = 20;
/// UDP header.
pub const UDP_HLEN: usize = 8;
/// ICMP header (type, code, checksum, 4 bytes of rest-of-header).
pub const ICMP_HLEN: usize = 8;
/// Shortest Ethernet frame on the wire without FCS; shorter frames get padded up to it.
pub const ETH_MIN_FRAME: usize = 60;

/// EtherTypes.
pub const ETH_P_IPV4: u16 = 0x0800;
/// ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// 802.1Q customer tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// 802.1ad service tag (the outer tag of QinQ).
pub const ETH_P_8021AD: u16 = 0x88a8;

/// IP protocol number of GRE: a protocol the NAT has no L4 logic for.
pub const PROTO_GRE: u8 = 47;

/// "More fragments" flag in the host-order flags/offset word.
pub const IP_MF: u16 = 0x2000;
/// "Don't fragment" flag in the host-order flags/offset word.
pub const IP_DF: u16 = 0x4000;

/// ICMP types used by the fixtures.
pub const ICMP_ECHO_REPLY: u8 = 0;
/// Destination unreachable (an error: quotes the offending header).
pub const ICMP_DEST_UNREACH: u8 = 3;
/// Echo request.
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// Time exceeded (an error).
pub const ICMP_TIME_EXCEEDED: u8 = 11;

/// TCP flags byte of [`Packet::tcp`]: PSH | ACK (a data segment of an open connection).
pub const TCP_PSH_ACK: u8 = 0x18;

/// IPv4 option kinds.
pub const IPOPT_EOL: u8 = 0;
/// No-operation option (one byte).
pub const IPOPT_NOP: u8 = 1;

/// MAC of the NAT's port and of the sender (locally administered, never real hardware).
const NAT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];

/// Byte used for Ethernet padding. Real padding is zero, but a recognisable non-zero pattern
/// shows that the program neither rewrites the padding nor counts it into a checksum.
pub const PAD_BYTE: u8 = 0x5a;

/// IPv4 options of IHL 6: three NOPs and an end-of-list (4 bytes).
pub fn options_ihl6() -> Vec<u8> {
    vec![IPOPT_NOP, IPOPT_NOP, IPOPT_NOP, IPOPT_EOL]
}

/// IPv4 options of IHL 15, the largest header: 39 NOPs then end-of-list (40 bytes).
pub fn options_ihl15() -> Vec<u8> {
    let mut o = vec![IPOPT_NOP; 39];
    o.push(IPOPT_EOL);
    o
}

/// The option variants every basic fixture runs with: IHL 5, 6 and 15.
pub fn ip_option_variants() -> [(&'static str, Vec<u8>); 3] {
    [
        ("IHL 5", Vec::new()),
        ("IHL 6", options_ihl6()),
        ("IHL 15", options_ihl15()),
    ]
}

/// Whether a UDP datagram carries a checksum (RFC 768 allows 0 = none over IPv4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpChecksum {
    /// The checksum is computed over pseudo-header and datagram.
    Computed,
    /// The checksum field is 0: "no checksum".
    Zero,
}

/// The part of an IPv4 datagram after the IP header.
#[derive(Clone, Debug)]
pub enum L4 {
    /// A TCP segment without options, checksum computed.
    Tcp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
        /// The flags byte (PSH|ACK unless a fixture says otherwise, see [`TCP_PSH_ACK`]).
        flags: u8,
        /// Data after the header.
        payload: Vec<u8>,
    },
    /// A UDP datagram.
    Udp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
        /// Data after the header.
        payload: Vec<u8>,
        /// Whether the checksum field is filled.
        checksum: UdpChecksum,
    },
    /// An ICMP message, checksum computed.
    Icmp {
        /// Type.
        icmp_type: u8,
        /// Code.
        code: u8,
        /// The 4 bytes after the checksum (id/sequence for echo, unused/MTU for errors).
        rest: [u8; 4],
        /// Data after the 8-byte header (for errors: the quoted datagram).
        payload: Vec<u8>,
    },
    /// Bytes taken as they are, with this protocol number: fragments' slices of a datagram and
    /// protocols the NAT has no L4 logic for.
    Raw {
        /// IP protocol.
        proto: u8,
        /// The IP payload.
        bytes: Vec<u8>,
    },
}

impl L4 {
    /// The IP protocol number.
    pub fn proto(&self) -> u8 {
        match self {
            L4::Tcp { .. } => proto::TCP,
            L4::Udp { .. } => proto::UDP,
            L4::Icmp { .. } => proto::ICMP,
            L4::Raw { proto, .. } => *proto,
        }
    }

    /// The L4 bytes with their checksum computed for a datagram from `src` to `dst` (the
    /// TCP/UDP checksum covers the IPv4 pseudo-header, so it depends on the addresses).
    pub fn bytes(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        match self {
            L4::Tcp {
                sport,
                dport,
                flags,
                payload,
            } => {
                let mut s = Vec::with_capacity(TCP_HLEN + payload.len());
                s.extend_from_slice(&sport.to_be_bytes());
                s.extend_from_slice(&dport.to_be_bytes());
                s.extend_from_slice(&0x1122_3344u32.to_be_bytes()); // sequence
                s.extend_from_slice(&0x5566_7788u32.to_be_bytes()); // acknowledgement
                s.push(((TCP_HLEN / 4) as u8) << 4); // data offset, no options
                s.push(*flags);
                s.extend_from_slice(&64240u16.to_be_bytes()); // window
                s.extend_from_slice(&[0, 0]); // checksum, filled below
                s.extend_from_slice(&[0, 0]); // urgent pointer
                s.extend_from_slice(payload);
                let c = l4_checksum(src.octets(), dst.octets(), proto::TCP, &s);
                s[16..18].copy_from_slice(&c.to_be_bytes());
                s
            }
            L4::Udp {
                sport,
                dport,
                payload,
                checksum: kind,
            } => {
                let mut s = Vec::with_capacity(UDP_HLEN + payload.len());
                s.extend_from_slice(&sport.to_be_bytes());
                s.extend_from_slice(&dport.to_be_bytes());
                s.extend_from_slice(&((UDP_HLEN + payload.len()) as u16).to_be_bytes());
                s.extend_from_slice(&[0, 0]);
                s.extend_from_slice(payload);
                if *kind == UdpChecksum::Computed {
                    // A computed 0 is sent as 0xffff: 0 on the wire means "no checksum".
                    let c = match l4_checksum(src.octets(), dst.octets(), proto::UDP, &s) {
                        0 => 0xffff,
                        c => c,
                    };
                    s[6..8].copy_from_slice(&c.to_be_bytes());
                }
                s
            }
            L4::Icmp {
                icmp_type,
                code,
                rest,
                payload,
            } => {
                let mut s = Vec::with_capacity(ICMP_HLEN + payload.len());
                s.push(*icmp_type);
                s.push(*code);
                s.extend_from_slice(&[0, 0]);
                s.extend_from_slice(rest);
                s.extend_from_slice(payload);
                // ICMP's checksum covers the message only, no pseudo-header.
                let c = checksum(&s);
                s[2..4].copy_from_slice(&c.to_be_bytes());
                s
            }
            L4::Raw { bytes, .. } => bytes.clone(),
        }
    }
}

/// Parses a dotted-quad lab address (the fixtures write addresses as text for readability).
pub fn addr(s: &str) -> Ipv4Addr {
    s.parse()
        .unwrap_or_else(|_| panic!("fixture bug: {s:?} is not an IPv4 address"))
}

/// Field-level description of one Ethernet + IPv4 frame. [`Packet::build`] turns it into bytes.
#[derive(Clone, Debug)]
pub struct Packet {
    /// VLAN id of a single 802.1Q tag, if tagged.
    pub vlan: Option<u16>,
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Time to live.
    pub ttl: u8,
    /// Identification.
    pub ident: u16,
    /// Flags and fragment offset (host order, offset in 8-byte units).
    pub frag: u16,
    /// IPv4 options, a multiple of 4 bytes, at most 40.
    pub options: Vec<u8>,
    /// Everything after the IP header.
    pub l4: L4,
    /// The frame is padded with [`PAD_BYTE`] up to this length (Ethernet padding).
    pub pad_to: usize,
    /// Replaces the version/IHL byte (malformed-header fixtures); the header checksum is still
    /// computed over the emitted header, so only the field under test is wrong.
    pub vihl_override: Option<u8>,
    /// Replaces the total length field (truncated-datagram fixtures).
    pub total_len_override: Option<u16>,
}

impl Packet {
    fn new(src: &str, dst: &str, l4: L4) -> Self {
        Packet {
            vlan: None,
            src: addr(src),
            dst: addr(dst),
            ttl: 64,
            ident: 0x4d2e,
            frag: IP_DF,
            options: Vec::new(),
            l4,
            pad_to: 0,
            vihl_override: None,
            total_len_override: None,
        }
    }

    /// A TCP segment with a short payload.
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self::new(
            src,
            dst,
            L4::Tcp {
                sport,
                dport,
                flags: TCP_PSH_ACK,
                payload: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
            },
        )
    }

    /// A UDP datagram with a checksum and a short payload.
    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self::new(
            src,
            dst,
            L4::Udp {
                sport,
                dport,
                payload: b"\x12\x34\x01\x00\x00\x01lab query".to_vec(),
                checksum: UdpChecksum::Computed,
            },
        )
    }

    /// An ICMP echo request.
    pub fn icmp_echo(src: &str, dst: &str) -> Self {
        Self::icmp(src, dst, ICMP_ECHO_REQUEST, 0, [0x0b, 0xad, 0x00, 0x07])
            .with_payload(b"abcdefghijklmnop".to_vec())
    }

    /// An ICMP echo reply (same id/sequence as [`Packet::icmp_echo`]).
    pub fn icmp_echo_reply(src: &str, dst: &str) -> Self {
        Self::icmp(src, dst, ICMP_ECHO_REPLY, 0, [0x0b, 0xad, 0x00, 0x07])
            .with_payload(b"abcdefghijklmnop".to_vec())
    }

    /// Any ICMP message with an empty payload.
    pub fn icmp(src: &str, dst: &str, icmp_type: u8, code: u8, rest: [u8; 4]) -> Self {
        Self::new(
            src,
            dst,
            L4::Icmp {
                icmp_type,
                code,
                rest,
                payload: Vec::new(),
            },
        )
    }

    /// A datagram of protocol `proto` whose payload is `bytes` as given.
    pub fn raw(src: &str, dst: &str, proto: u8, bytes: Vec<u8>) -> Self {
        Self::new(src, dst, L4::Raw { proto, bytes })
    }

    /// Tags the frame with one 802.1Q tag of VLAN `id`.
    pub fn with_vlan(mut self, id: u16) -> Self {
        self.vlan = Some(id);
        self
    }

    /// Sets the IPv4 options (a multiple of 4 bytes, at most 40).
    pub fn with_options(mut self, options: &[u8]) -> Self {
        assert!(
            options.len().is_multiple_of(4) && options.len() <= 40,
            "fixture bug: IPv4 options must be a multiple of 4 bytes, at most 40"
        );
        self.options = options.to_vec();
        self
    }

    /// Pads the frame with [`PAD_BYTE`] up to `len` bytes.
    pub fn padded_to(mut self, len: usize) -> Self {
        self.pad_to = len;
        self
    }

    /// Sets the flags/fragment-offset word (host order).
    pub fn with_frag(mut self, frag: u16) -> Self {
        self.frag = frag;
        self
    }

    /// Sets the IP identification (fragments of one datagram share it).
    pub fn with_ident(mut self, ident: u16) -> Self {
        self.ident = ident;
        self
    }

    /// Overrides the version/IHL byte.
    pub fn with_vihl(mut self, vihl: u8) -> Self {
        self.vihl_override = Some(vihl);
        self
    }

    /// Overrides the IPv4 total length.
    pub fn with_total_len(mut self, total_len: u16) -> Self {
        self.total_len_override = Some(total_len);
        self
    }

    /// Replaces the L4 payload (TCP/UDP/ICMP data).
    pub fn with_payload(mut self, data: Vec<u8>) -> Self {
        match &mut self.l4 {
            L4::Tcp { payload, .. } | L4::Udp { payload, .. } | L4::Icmp { payload, .. } => {
                *payload = data
            }
            L4::Raw { bytes, .. } => *bytes = data,
        }
        self
    }

    /// Sets the TCP flags byte (SYN, SYN|ACK, RST...; see `nat_common::conntrack::tcp_flags`).
    pub fn with_tcp_flags(mut self, value: u8) -> Self {
        match &mut self.l4 {
            L4::Tcp { flags, .. } => *flags = value,
            other => panic!("fixture bug: not TCP: {other:?}"),
        }
        self
    }

    /// Sets the identifier of an ICMP echo request or reply (the first two bytes after the
    /// checksum; the sequence number stays).
    pub fn with_echo_id(mut self, id: u16) -> Self {
        match &mut self.l4 {
            L4::Icmp {
                icmp_type: ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY,
                rest,
                ..
            } => rest[..2].copy_from_slice(&id.to_be_bytes()),
            other => panic!("fixture bug: not an ICMP echo: {other:?}"),
        }
        self
    }

    /// Sends the UDP datagram without a checksum (field 0).
    pub fn without_udp_checksum(mut self) -> Self {
        match &mut self.l4 {
            L4::Udp { checksum, .. } => *checksum = UdpChecksum::Zero,
            other => panic!("fixture bug: not UDP: {other:?}"),
        }
        self
    }

    /// The same datagram with another destination address: how an expected translation is
    /// described (the bytes are then built from scratch).
    pub fn with_dst(mut self, dst: &str) -> Self {
        self.dst = addr(dst);
        self
    }

    /// The same datagram with another source address.
    pub fn with_src(mut self, src: &str) -> Self {
        self.src = addr(src);
        self
    }

    /// The same datagram with another TCP/UDP destination port.
    pub fn with_dport(mut self, port: u16) -> Self {
        match &mut self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = port,
            other => panic!("fixture bug: no ports in {other:?}"),
        }
        self
    }

    /// The same datagram with another TCP/UDP source port.
    pub fn with_sport(mut self, port: u16) -> Self {
        match &mut self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => *sport = port,
            other => panic!("fixture bug: no ports in {other:?}"),
        }
        self
    }

    /// IPv4 header length this description emits (options included).
    pub fn ip_header_len(&self) -> usize {
        IPV4_HLEN + self.options.len()
    }

    /// Offset of the IPv4 header in the frame.
    pub fn l3_offset(&self) -> usize {
        ETH_HLEN + if self.vlan.is_some() { VLAN_HLEN } else { 0 }
    }

    /// The IPv4 datagram (header and payload), without Ethernet.
    pub fn datagram(&self) -> Vec<u8> {
        let payload = self.l4.bytes(self.src, self.dst);
        let hlen = self.ip_header_len();
        let total = self
            .total_len_override
            .unwrap_or((hlen + payload.len()) as u16);
        let mut h = Vec::with_capacity(hlen + payload.len());
        h.push(self.vihl_override.unwrap_or(0x40 | (hlen / 4) as u8));
        h.push(0); // DSCP/ECN
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&self.ident.to_be_bytes());
        h.extend_from_slice(&self.frag.to_be_bytes());
        h.push(self.ttl);
        h.push(self.l4.proto());
        h.extend_from_slice(&[0, 0]); // checksum, filled below
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h.extend_from_slice(&self.options);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(&payload);
        h
    }

    /// The whole frame.
    pub fn build(&self) -> Vec<u8> {
        let tags: Vec<(u16, u16)> = self.vlan.map(|id| (ETH_P_8021Q, id)).into_iter().collect();
        let mut frame = ethernet(&tags, ETH_P_IPV4, &self.datagram());
        if frame.len() < self.pad_to {
            frame.resize(self.pad_to, PAD_BYTE);
        }
        frame
    }

    /// Splits this (unfragmented) datagram into IP fragments at the IP-payload offsets `cuts`
    /// (ascending multiples of 8): every fragment but the last has MF set, each carries its
    /// offset. The L4 checksum inside the first fragment is the whole datagram's, as a real
    /// sender's fragmentation leaves it.
    pub fn fragments(&self, cuts: &[usize]) -> Vec<Packet> {
        let proto = self.l4.proto();
        let payload = self.l4.bytes(self.src, self.dst);
        let mut bounds = vec![0];
        bounds.extend_from_slice(cuts);
        bounds.push(payload.len());
        assert!(
            bounds.windows(2).all(|w| w[0] < w[1]) && cuts.iter().all(|c| c.is_multiple_of(8)),
            "fixture bug: fragment cuts must be ascending multiples of 8 inside the payload"
        );
        bounds
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                let mut f = self.clone();
                let more = if i + 2 < bounds.len() { IP_MF } else { 0 };
                f.frag = more | (w[0] / 8) as u16;
                f.l4 = L4::Raw {
                    proto,
                    bytes: payload[w[0]..w[1]].to_vec(),
                };
                f
            })
            .collect()
    }
}

/// An Ethernet frame: `tags` are (TPID, VLAN id) pairs outermost first, then `ethertype` and
/// `payload`. No padding.
pub fn ethernet(tags: &[(u16, u16)], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + VLAN_HLEN * tags.len() + payload.len());
    f.extend_from_slice(&NAT_MAC);
    f.extend_from_slice(&PEER_MAC);
    for (tpid, id) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&(id & 0x0fff).to_be_bytes()); // PCP 0, DEI 0
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An ARP request "who has `target`? tell `sender`" (28 bytes, unpadded frame).
pub fn arp_request(sender: &str, target: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(28);
    a.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    a.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
    a.push(6);
    a.push(4);
    a.extend_from_slice(&1u16.to_be_bytes()); // request
    a.extend_from_slice(&PEER_MAC);
    a.extend_from_slice(&addr(sender).octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&addr(target).octets());
    a
}

/// An IPv6 UDP datagram from 2001:db8::2 to 2001:db8::1 (documentation prefix).
pub fn ipv6_udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let src: std::net::Ipv6Addr = "2001:db8::2".parse().expect("literal");
    let dst: std::net::Ipv6Addr = "2001:db8::1".parse().expect("literal");
    let mut udp = Vec::new();
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&((UDP_HLEN + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    // IPv6 pseudo-header: addresses, upper-layer length (32 bits), 3 zero bytes, next header.
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(udp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto::UDP]);
    pseudo.extend_from_slice(&udp);
    let c = match checksum(&pseudo) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    let mut ip = Vec::new();
    ip.extend_from_slice(&[0x60, 0, 0, 0]);
    ip.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    ip.push(proto::UDP);
    ip.push(64);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(&udp);
    ip
}

/// An IPv4 header located in a frame, as a checker sees it (parsed independently of
/// [`Packet`]).
#[derive(Debug)]
pub struct Ipv4View<'a> {
    /// The header, options included.
    pub header: &'a [u8],
    /// The IP payload up to the total length (Ethernet padding excluded).
    pub payload: &'a [u8],
    /// Source address.
    pub src: [u8; 4],
    /// Destination address.
    pub dst: [u8; 4],
    /// Protocol.
    pub proto: u8,
    /// Flags/offset word.
    pub frag: u16,
    /// Identification.
    pub ident: u16,
}

/// Finds and slices the IPv4 datagram in `frame` (untagged or one 802.1Q tag).
pub fn parse_ipv4(frame: &[u8]) -> Result<Ipv4View<'_>, String> {
    let be16 = |at: usize| -> Result<u16, String> {
        frame
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| {
                format!(
                    "frame of {} bytes ends before offset {}",
                    frame.len(),
                    at + 2
                )
            })
    };
    let mut l3 = ETH_HLEN;
    let mut ethertype = be16(12)?;
    if ethertype == ETH_P_8021Q {
        ethertype = be16(16)?;
        l3 += VLAN_HLEN;
    }
    if ethertype != ETH_P_IPV4 {
        return Err(format!("EtherType {ethertype:#06x} is not IPv4"));
    }
    let vihl = *frame.get(l3).ok_or("no IPv4 header")?;
    if vihl >> 4 != 4 || vihl & 0x0f < 5 {
        return Err(format!(
            "version/IHL byte {vihl:#04x} is not a valid IPv4 header"
        ));
    }
    let hlen = usize::from(vihl & 0x0f) * 4;
    let total = usize::from(be16(l3 + 2)?);
    if total < hlen || l3 + total > frame.len() {
        return Err(format!(
            "total length {total} does not fit the frame ({} bytes after the link header)",
            frame.len() - l3
        ));
    }
    let header = &frame[l3..l3 + hlen];
    Ok(Ipv4View {
        header,
        payload: &frame[l3 + hlen..l3 + total],
        src: header[12..16].try_into().expect("4 bytes"),
        dst: header[16..20].try_into().expect("4 bytes"),
        proto: header[9],
        frag: u16::from_be_bytes([header[6], header[7]]),
        ident: u16::from_be_bytes([header[4], header[5]]),
    })
}

/// What the L4 checksum check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Check {
    /// TCP, UDP or ICMP checksum recomputed and equal to the field.
    Valid,
    /// UDP with checksum field 0 ("no checksum"), left as such.
    UdpNoChecksum,
    /// The first fragment of a datagram: its L4 checksum covers bytes in later fragments, see
    /// [`verify_reassembled_l4_checksum`].
    NeedsReassembly,
    /// A later fragment (no L4 header) or a protocol without a known checksum.
    NotApplicable,
}

/// Recomputes the IPv4 header checksum and, when the frame holds a whole datagram, the TCP,
/// UDP or ICMP checksum, over the bytes of `frame` as they are.
pub fn verify_checksums(frame: &[u8]) -> Result<L4Check, String> {
    let ip = parse_ipv4(frame)?;
    let mut header = ip.header.to_vec();
    let stored = u16::from_be_bytes([header[10], header[11]]);
    header[10..12].copy_from_slice(&[0, 0]);
    let fresh = checksum(&header);
    if fresh != stored {
        return Err(format!(
            "IPv4 header checksum is {stored:#06x}, recomputed {fresh:#06x}"
        ));
    }
    if ip.frag & 0x1fff != 0 {
        return Ok(L4Check::NotApplicable);
    }
    if ip.frag & IP_MF != 0 {
        return Ok(L4Check::NeedsReassembly);
    }
    l4_check(ip.proto, ip.src, ip.dst, ip.payload)
}

/// Checks the L4 checksum of a whole L4 message `seg`.
fn l4_check(proto_nr: u8, src: [u8; 4], dst: [u8; 4], seg: &[u8]) -> Result<L4Check, String> {
    let (field, fresh) = match proto_nr {
        proto::TCP => {
            if seg.len() < TCP_HLEN {
                return Err(format!("TCP segment of {} bytes", seg.len()));
            }
            let mut s = seg.to_vec();
            s[16..18].copy_from_slice(&[0, 0]);
            (
                u16::from_be_bytes([seg[16], seg[17]]),
                l4_checksum(src, dst, proto::TCP, &s),
            )
        }
        proto::UDP => {
            if seg.len() < UDP_HLEN {
                return Err(format!("UDP datagram of {} bytes", seg.len()));
            }
            let field = u16::from_be_bytes([seg[6], seg[7]]);
            if field == 0 {
                return Ok(L4Check::UdpNoChecksum);
            }
            let mut s = seg.to_vec();
            s[6..8].copy_from_slice(&[0, 0]);
            let fresh = match l4_checksum(src, dst, proto::UDP, &s) {
                0 => 0xffff,
                c => c,
            };
            (field, fresh)
        }
        proto::ICMP => {
            if seg.len() < ICMP_HLEN {
                return Err(format!("ICMP message of {} bytes", seg.len()));
            }
            let mut s = seg.to_vec();
            s[2..4].copy_from_slice(&[0, 0]);
            (u16::from_be_bytes([seg[2], seg[3]]), checksum(&s))
        }
        _ => return Ok(L4Check::NotApplicable),
    };
    if field == fresh {
        Ok(L4Check::Valid)
    } else {
        Err(format!(
            "protocol {proto_nr} checksum is {field:#06x}, recomputed {fresh:#06x}"
        ))
    }
}

/// What [`verify_icmp_error_checksums`] could check in the quoted datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuoteCheck {
    /// The whole quoted datagram is present: its header checksum and its TCP/UDP/ICMP checksum
    /// (over the quoted addresses) were recomputed and match.
    Whole(L4Check),
    /// Only part of the quoted datagram is present (RFC 792: header and 8 bytes): its header
    /// checksum was recomputed and matches; its L4 checksum cannot be recomputed.
    HeaderOnly,
}

/// For an ICMP error frame: [`verify_checksums`] (outer IPv4 header, ICMP checksum over the
/// whole message), then the quoted IPv4 header's checksum recomputed from scratch and, when
/// the quote holds the whole quoted datagram, its L4 checksum too.
pub fn verify_icmp_error_checksums(frame: &[u8]) -> Result<QuoteCheck, String> {
    if verify_checksums(frame)? != L4Check::Valid {
        return Err("the outer ICMP checksum could not be checked".into());
    }
    let ip = parse_ipv4(frame)?;
    if ip.proto != proto::ICMP {
        return Err(format!("protocol {} is not ICMP", ip.proto));
    }
    let quote = ip
        .payload
        .get(ICMP_HLEN..)
        .ok_or("ICMP message shorter than its header")?;
    let vihl = *quote.first().ok_or("empty quote")?;
    let hlen = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || hlen < IPV4_HLEN || quote.len() < hlen {
        return Err(format!(
            "quoted header {vihl:#04x} does not fit the {}-byte quote",
            quote.len()
        ));
    }
    let mut header = quote[..hlen].to_vec();
    let stored = u16::from_be_bytes([header[10], header[11]]);
    header[10..12].copy_from_slice(&[0, 0]);
    let fresh = checksum(&header);
    if fresh != stored {
        return Err(format!(
            "quoted IPv4 header checksum is {stored:#06x}, recomputed {fresh:#06x}"
        ));
    }
    let total = usize::from(u16::from_be_bytes([quote[2], quote[3]]));
    if total > quote.len() {
        return Ok(QuoteCheck::HeaderOnly);
    }
    let src: [u8; 4] = quote[12..16].try_into().expect("4 bytes");
    let dst: [u8; 4] = quote[16..20].try_into().expect("4 bytes");
    l4_check(quote[9], src, dst, &quote[hlen..total]).map(QuoteCheck::Whole)
}

/// Reassembles the fragments in `frames` (each a whole frame) and checks the L4 checksum of
/// the datagram against the addresses of the fragments, which must all agree.
pub fn verify_reassembled_l4_checksum(frames: &[&[u8]]) -> Result<L4Check, String> {
    let mut parts = Vec::new();
    let first = parse_ipv4(frames.first().ok_or("no fragments")?)?;
    for f in frames {
        verify_checksums(f)?;
        let ip = parse_ipv4(f)?;
        if (ip.src, ip.dst, ip.proto, ip.ident) != (first.src, first.dst, first.proto, first.ident)
        {
            return Err("fragments disagree on addresses, protocol or identification".into());
        }
        parts.push((
            usize::from(ip.frag & 0x1fff) * 8,
            ip.frag & IP_MF != 0,
            ip.payload,
        ));
    }
    parts.sort_by_key(|p| p.0);
    let mut datagram = Vec::new();
    for (i, (offset, more, payload)) in parts.iter().enumerate() {
        if *offset != datagram.len() {
            return Err(format!("fragment at {offset} leaves a hole or overlap"));
        }
        if *more != (i + 1 < parts.len()) {
            return Err("MF flags do not match the fragment order".into());
        }
        datagram.extend_from_slice(payload);
    }
    l4_check(first.proto, first.src, first.dst, &datagram)
}

/// Panics with both frames dumped and the first difference marked unless they are equal.
pub fn assert_frames_eq(actual: &[u8], expected: &[u8], what: &str) {
    if actual == expected {
        return;
    }
    let first_diff = actual
        .iter()
        .zip(expected)
        .position(|(a, e)| a != e)
        .unwrap_or(actual.len().min(expected.len()));
    panic!(
        "{what}: output differs from the expected frame at byte {first_diff} \
         (lengths {} vs {} expected)\n  actual:   {}\n  expected: {}",
        actual.len(),
        expected.len(),
        hex(actual),
        hex(expected)
    );
}

/// Hex dump grouped by 4 bytes, for failure messages.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 && i % 4 == 0 {
            s.push(' ');
        }
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    //! The builder and checkers against each other and against known values, so a fixture
    //! failure points at the program, not at the test tooling.
    use super::*;

    #[test]
    fn built_frames_pass_the_independent_checker() {
        let packets = [
            Packet::tcp("198.51.100.7", 40000, "198.18.100.10", 80),
            Packet::udp("198.51.100.7", 40000, "198.18.100.11", 53).with_options(&options_ihl15()),
            Packet::icmp_echo("203.0.113.9", "198.18.100.12").with_vlan(100),
        ];
        for p in packets {
            assert_eq!(verify_checksums(&p.build()), Ok(L4Check::Valid), "{p:?}");
        }
    }

    #[test]
    fn known_header_layout() {
        let f = Packet::udp("198.51.100.7", 1, "198.18.100.11", 2)
            .with_payload(Vec::new())
            .without_udp_checksum()
            .padded_to(ETH_MIN_FRAME)
            .build();
        assert_eq!(f.len(), 60);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(f[14], 0x45);
        assert_eq!(&f[16..18], &28u16.to_be_bytes());
        assert_eq!(&f[26..30], &[198, 51, 100, 7]);
        assert_eq!(&f[42..], &[PAD_BYTE; 18]);
        assert_eq!(verify_checksums(&f), Ok(L4Check::UdpNoChecksum));
    }

    #[test]
    fn tcp_flags_and_echo_ids_land_in_their_fields() {
        let syn = Packet::tcp("198.18.0.2", 40000, "198.51.100.53", 443)
            .with_tcp_flags(0x02)
            .build();
        assert_eq!(syn[ETH_HLEN + IPV4_HLEN + 13], 0x02);
        assert_eq!(verify_checksums(&syn), Ok(L4Check::Valid));
        let echo = Packet::icmp_echo("198.18.0.2", "198.51.100.53")
            .with_echo_id(0x1234)
            .build();
        assert_eq!(
            &echo[ETH_HLEN + IPV4_HLEN + 4..][..4],
            &[0x12, 0x34, 0x00, 0x07]
        );
        assert_eq!(verify_checksums(&echo), Ok(L4Check::Valid));
    }

    #[test]
    fn checker_catches_a_stale_checksum() {
        let mut f = Packet::tcp("198.51.100.7", 40000, "198.18.100.10", 80).build();
        f[30..34].copy_from_slice(&[198, 18, 1, 10]); // rewrite dst without fixing anything
        assert!(verify_checksums(&f).is_err());
    }

    #[test]
    fn fragments_reassemble_to_a_valid_datagram() {
        let p = Packet::tcp("198.51.100.7", 40000, "198.18.100.20", 443).with_payload(vec![7; 100]);
        let frames: Vec<Vec<u8>> = p.fragments(&[40, 80]).iter().map(Packet::build).collect();
        assert_eq!(verify_checksums(&frames[0]), Ok(L4Check::NeedsReassembly));
        assert_eq!(verify_checksums(&frames[1]), Ok(L4Check::NotApplicable));
        assert_eq!(verify_checksums(&frames[2]), Ok(L4Check::NotApplicable));
        let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        assert_eq!(verify_reassembled_l4_checksum(&refs), Ok(L4Check::Valid));
        // Losing the middle fragment must be noticed.
        assert!(verify_reassembled_l4_checksum(&[refs[0], refs[2]]).is_err());
    }
}
