//! Bounded parsing: Ethernet, one optional 802.1Q tag, IPv4 with options.

use aya_ebpf::programs::XdpContext;
use nat_common::{
    ipv4::{self, HeaderInfo},
    stats::Reason,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    vlan::VlanHdr,
};

use crate::packet::{frame_len, ptr_at};

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
pub fn parse_ipv4(ctx: &XdpContext) -> Result<Ipv4Packet, Reason> {
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
    let info = ipv4::validate(
        ip.vihl,
        u16::from_be_bytes(ip.tot_len),
        u16::from_be_bytes(ip.frags),
        frame_len(ctx) - l3_offset,
    )?;
    Ok(Ipv4Packet {
        l3_offset,
        info,
        proto: ip.proto,
        src: ip.src_addr,
        dst: ip.dst_addr,
    })
}
