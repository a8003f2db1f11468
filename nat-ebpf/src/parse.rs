//! Bounded parsing: Ethernet, one optional 802.1Q tag, IPv4 with options, the L4 header.

use nat_common::{
    conntrack::FlowKey,
    ipv4::{self, proto, HeaderInfo},
    stats::Reason,
};
use network_types::{
    eth::{EthHdr, EtherType},
    icmp::Icmpv4Hdr,
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

use crate::packet::{ptr_at, Frame};

/// 802.1ad service tag (outer tag of QinQ), in wire order like `EthHdr::ether_type`.
const ETH_P_8021AD: u16 = 0x88a8_u16.to_be();

/// Where the IPv4 header is and what it says.
pub struct Ipv4Packet {
    /// Byte offset of the IPv4 header in the frame.
    pub l3_offset: usize,
    /// Validated header facts (length, fragment state).
    pub info: HeaderInfo,
    /// IP protocol.
    pub proto: u8,
    /// Source address, network order.
    pub src: [u8; 4],
    /// Destination address, network order.
    pub dst: [u8; 4],
    /// Time to live.
    pub ttl: u8,
    /// Identification (network order): with the addresses and protocol, the datagram a
    /// fragment belongs to.
    pub ident: [u8; 2],
}

impl Ipv4Packet {
    /// Byte offset of the L4 header (after IP options).
    #[inline(always)]
    pub fn l4_offset(&self) -> usize {
        self.l3_offset + self.info.header_len
    }
}

/// Parses up to the IPv4 header. `Err` carries the exit reason for anything that is not a
/// well-formed IPv4 packet.
#[inline(always)]
pub fn parse_ipv4<C: Frame>(ctx: &C) -> Result<Ipv4Packet, Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0).map_err(|_| Reason::TruncatedEthernet)?;
    // SAFETY: bounds-checked by ptr_at.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3_offset = EthHdr::LEN;
    if ether_type == EtherType::Ieee8021q as u16 {
        let vlan: *const VlanHdr = ptr_at(ctx, l3_offset).map_err(|_| Reason::TruncatedEthernet)?;
        // SAFETY: bounds-checked by ptr_at.
        ether_type = unsafe { (*vlan).ether_type };
        l3_offset += VlanHdr::LEN;
        if ether_type == EtherType::Ieee8021q as u16 || ether_type == ETH_P_8021AD {
            return Err(Reason::VlanStacked);
        }
    } else if ether_type == ETH_P_8021AD {
        return Err(Reason::VlanStacked);
    }
    if ether_type != EtherType::Ipv4 as u16 {
        return Err(Reason::NotIpv4);
    }

    let ip: *const Ipv4Hdr = ptr_at(ctx, l3_offset).map_err(|_| Reason::MalformedIpv4)?;
    // SAFETY: bounds-checked by ptr_at.
    let ip = unsafe { &*ip };
    // black_box: otherwise LLVM derives "total_len fits the frame" from this check and deletes
    // later packet bounds checks as redundant, which the verifier cannot follow.
    let available = core::hint::black_box(ctx.packet_len() - l3_offset);
    let info = ipv4::validate(
        ip.vihl,
        u16::from_be_bytes(ip.tot_len),
        u16::from_be_bytes(ip.frags),
        available,
    )?;
    Ok(Ipv4Packet {
        l3_offset,
        info,
        proto: ip.proto,
        src: ip.src_addr,
        dst: ip.dst_addr,
        ttl: ip.ttl,
        ident: ip.id,
    })
}

/// What sits after the IPv4 header, as far as translation cares.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L4Kind {
    /// A complete TCP header.
    Tcp,
    /// A complete UDP header.
    Udp,
    /// A complete ICMP echo request (the id is the source "port").
    IcmpEchoRequest,
    /// A complete ICMP echo reply (the id is the destination "port").
    IcmpEchoReply,
    /// A complete ICMP header of another type (errors among them).
    IcmpOther,
    /// A protocol without ports, or a later fragment: only the IP header can be rewritten.
    NoPorts,
    /// TCP, UDP or ICMP whose header is cut short inside the datagram.
    Truncated,
}

/// The L4 facts of a packet: kind, ports (network order, zero where the kind has none) and TCP
/// flags.
#[derive(Clone, Copy)]
pub struct L4 {
    /// See [`L4Kind`].
    pub kind: L4Kind,
    /// Source port, or the echo id of a request.
    pub sport: [u8; 2],
    /// Destination port, or the echo id of a reply.
    pub dport: [u8; 2],
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// The ICMP type, for `IcmpOther`.
    pub icmp_type: u8,
}

impl L4 {
    /// The packet's tuple, the key of its session if it has one.
    #[inline(always)]
    pub fn flow_key(&self, pkt: &Ipv4Packet) -> FlowKey {
        FlowKey::new(pkt.src, pkt.dst, self.sport, self.dport, pkt.proto)
    }

    /// Whether the packet has a tuple connection tracking can key on: a TCP, UDP or ICMP echo
    /// packet with its L4 header, unfragmented or the first fragment (whose translation the
    /// later fragments then get from the fragment cache, see `frag`).
    #[inline(always)]
    pub fn trackable(&self, pkt: &Ipv4Packet) -> bool {
        !pkt.info.is_later_fragment
            && matches!(
                self.kind,
                L4Kind::Tcp | L4Kind::Udp | L4Kind::IcmpEchoRequest | L4Kind::IcmpEchoReply
            )
    }
}

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
/// Byte offset of the flags byte in the TCP header.
const TCP_FLAGS_OFFSET: usize = 13;

/// Reads the L4 header the packet claims to have. A header must lie within the datagram's total
/// length as well as the frame (a frame may carry Ethernet padding).
#[inline(always)]
pub fn read_l4<C: Frame>(ctx: &C, pkt: &Ipv4Packet) -> L4 {
    let mut l4 = L4 {
        kind: L4Kind::NoPorts,
        sport: [0; 2],
        dport: [0; 2],
        tcp_flags: 0,
        icmp_type: 0,
    };
    if pkt.info.is_later_fragment {
        return l4;
    }
    match pkt.proto {
        proto::TCP => match l4_header::<TcpHdr, _>(ctx, pkt) {
            Some(tcp) => {
                // SAFETY: bounds-checked by l4_header.
                let tcp = unsafe { &*tcp };
                l4.kind = L4Kind::Tcp;
                l4.sport = tcp.source;
                l4.dport = tcp.dest;
                // SAFETY: the flags byte lies inside the checked TcpHdr.
                l4.tcp_flags =
                    unsafe { *((tcp as *const TcpHdr as *const u8).add(TCP_FLAGS_OFFSET)) };
            }
            None => l4.kind = L4Kind::Truncated,
        },
        proto::UDP => match l4_header::<UdpHdr, _>(ctx, pkt) {
            Some(udp) => {
                // SAFETY: bounds-checked by l4_header.
                let udp = unsafe { &*udp };
                l4.kind = L4Kind::Udp;
                l4.sport = udp.src;
                l4.dport = udp.dst;
            }
            None => l4.kind = L4Kind::Truncated,
        },
        proto::ICMP => match l4_header::<Icmpv4Hdr, _>(ctx, pkt) {
            Some(icmp) => {
                // SAFETY: bounds-checked by l4_header.
                let icmp = unsafe { &*icmp };
                let id = [icmp.data[0], icmp.data[1]];
                match icmp.type_ {
                    ICMP_ECHO_REQUEST => {
                        l4.kind = L4Kind::IcmpEchoRequest;
                        l4.sport = id;
                    }
                    ICMP_ECHO_REPLY => {
                        l4.kind = L4Kind::IcmpEchoReply;
                        l4.dport = id;
                    }
                    t => {
                        l4.kind = L4Kind::IcmpOther;
                        l4.icmp_type = t;
                    }
                }
            }
            None => l4.kind = L4Kind::Truncated,
        },
        _ => {}
    }
    l4
}

/// Pointer to the L4 header `T` if it lies inside both the frame and the datagram.
#[inline(always)]
pub fn l4_header<T, C: Frame>(ctx: &C, pkt: &Ipv4Packet) -> Option<*mut T> {
    if pkt.info.header_len + core::mem::size_of::<T>() > pkt.info.total_len {
        return None;
    }
    ptr_at(ctx, pkt.l4_offset()).ok()
}
