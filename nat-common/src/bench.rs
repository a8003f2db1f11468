//! The benchmark-only programs of the object (`cargo xtask bench topology`): a traffic
//! generator run with XDP live frames, a bare redirect forwarder (the ceiling a NAT is measured
//! against) and a sink that drops. None of them is ever attached by the agent.
//!
//! The generator cannot rely on the frame it was given: with live frames the kernel recycles
//! the frame pages, and on veth a page comes back holding whatever the receiving side's program
//! wrote into it (a translated header). So it writes the whole template for every frame and
//! then varies the flow, keeping both checksums valid incrementally.

/// The generator program (`BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES`; returns
/// `XDP_TX`, which live frames turn into a transmit out of the run's ingress interface).
pub const XDP_BENCH_GEN_PROGRAM: &str = "xdp_bench_gen";
/// FIB lookup, MAC rewrite, TTL decrement and redirect (or XDP_TX), with no NAT: what a bare
/// XDP forwarder costs on the same topology.
pub const XDP_BENCH_REDIRECT_PROGRAM: &str = "xdp_bench_redirect";
/// Drops every frame: the sink, counted by its interface's `rx_packets`.
pub const XDP_BENCH_DROP_PROGRAM: &str = "xdp_bench_drop";
/// Array of one [`GenConfig`]: what the generator sends.
pub const BENCH_GEN: &str = "BENCH_GEN";
/// Per-CPU array of one `u64`: frames the generator has built on each CPU (its sequence).
pub const BENCH_GEN_SEQ: &str = "BENCH_GEN_SEQ";

/// Bytes of the generator's template frame: Ethernet + IPv4 (no options) + UDP + payload, the
/// classic 64-byte packet without FCS.
pub const GEN_FRAME_LEN: usize = 64;
/// Offset of the IPv4 header checksum in the frame.
pub const GEN_IP_CHECK: usize = 14 + 10;
/// Offset of the IPv4 source address in the frame.
pub const GEN_IP_SRC: usize = 14 + 12;
/// Offset of the UDP source port in the frame.
pub const GEN_UDP_SPORT: usize = 14 + 20;
/// Offset of the UDP checksum in the frame.
pub const GEN_UDP_CHECK: usize = 14 + 20 + 6;

/// What the generator sends. Flow `i` of a frame is the template with `hosts`-many source
/// addresses counted up from the template's and the source port counted up by `i / hosts`:
/// `src = template_src + i % hosts`, `sport = template_sport + i / hosts`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenConfig {
    /// The frame of flow 0, both checksums valid.
    pub frame: [u8; GEN_FRAME_LEN],
    /// Flow number of frame `seq`: `seq % flows` when non-zero (established flows, a few or
    /// many); 0: `first + seq`, a new flow per frame.
    pub flows: u32,
    /// Source addresses the flows spread over (at least 1).
    pub hosts: u32,
    /// Flow number of the first frame when every frame is a new flow, so a run can carry on
    /// where the previous one stopped without reusing a tuple.
    pub first: u64,
}

const _: () = assert!(core::mem::size_of::<GenConfig>() == GEN_FRAME_LEN + 16);

impl GenConfig {
    /// The flow number frame `seq` carries.
    #[inline(always)]
    pub const fn flow(&self, seq: u64) -> u64 {
        if self.flows == 0 {
            self.first.wrapping_add(seq)
        } else {
            seq % self.flows as u64
        }
    }

    /// Source address and port of flow `flow`, as octets and host-order port.
    #[inline(always)]
    pub const fn source(&self, flow: u64) -> ([u8; 4], u16) {
        let hosts = if self.hosts == 0 {
            1
        } else {
            self.hosts as u64
        };
        let base = u32::from_be_bytes([
            self.frame[GEN_IP_SRC],
            self.frame[GEN_IP_SRC + 1],
            self.frame[GEN_IP_SRC + 2],
            self.frame[GEN_IP_SRC + 3],
        ]);
        let sport = u16::from_be_bytes([self.frame[GEN_UDP_SPORT], self.frame[GEN_UDP_SPORT + 1]]);
        let addr = base.wrapping_add((flow % hosts) as u32);
        let port = sport.wrapping_add((flow / hosts) as u16);
        (addr.to_be_bytes(), port)
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), no padding (size asserted), any bit pattern valid.
    unsafe impl aya::Pod for super::GenConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_count_hosts_first_then_ports() {
        let mut frame = [0u8; GEN_FRAME_LEN];
        frame[GEN_IP_SRC..GEN_IP_SRC + 4].copy_from_slice(&[198, 18, 16, 0]);
        frame[GEN_UDP_SPORT..GEN_UDP_SPORT + 2].copy_from_slice(&1024u16.to_be_bytes());
        let cfg = GenConfig {
            frame,
            flows: 0,
            hosts: 256,
            first: 10,
        };
        assert_eq!(cfg.flow(5), 15);
        assert_eq!(cfg.source(0), ([198, 18, 16, 0], 1024));
        assert_eq!(cfg.source(257), ([198, 18, 16, 1], 1025));
        let few = GenConfig { flows: 4, ..cfg };
        assert_eq!(few.flow(9), 1);
    }
}
