//! The one place that turns packet offsets into pointers, always bounds-checked against
//! `data_end` so the verifier accepts every access that follows; and [`Frame`], what the
//! translation needs from the context it runs in.
//!
//! The NAT runs at two hooks with one body of code: XDP (a frame in a page, before the kernel
//! builds a socket buffer) and TC ingress (a socket buffer, `tc_nat`). Everything from parsing
//! to choosing the exit is generic over [`Frame`]; only the handful of things the two contexts
//! really do differently live in its implementations:
//! - how long the packet is (an skb's bytes need not all be in its linear part);
//! - how a TCP/UDP checksum follows a rewrite: an skb may carry a *partial* checksum (only the
//!   pseudo-header sum, to be completed by the NIC or by software at transmit: every GSO
//!   super-packet does), which only the skb helpers can update correctly;
//! - which tail-call table the program's stages live in;
//! - the return codes, and how a packet goes back out of the interface it came in on;
//! - how a frame is grown and cut (the "fragmentation needed" answer).

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action, TC_ACT_REDIRECT, TC_ACT_SHOT,
        TC_ACT_UNSPEC,
    },
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    maps::ProgramArray,
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use nat_common::checksum::Delta;

use crate::maps::{PROGRAMS, TC_PROGRAMS};

/// `bpf_l4_csum_replace` flag: the change is in the pseudo-header (addresses), so a partial
/// checksum follows it and a complete one (`skb->csum`) is corrected too.
const BPF_F_PSEUDO_HDR: u64 = 16;
/// `bpf_l4_csum_replace` flag: UDP, where a zero checksum means "none" and stays zero, and a
/// computed zero is sent as `0xffff`.
const BPF_F_MARK_MANGLED_0: u64 = 32;

/// What a NAT program needs from its context; see the module documentation.
pub trait Frame: EbpfContext {
    /// The return code that passes the packet on to the kernel.
    const PASS: u32;
    /// The return code that drops the packet.
    const DROP: u32;
    /// What `bpf_redirect` returns when it accepted the egress interface.
    const REDIRECTED: u32;

    /// Address of the first byte (the Ethernet header).
    fn data(&self) -> usize;
    /// Address one past the last directly readable byte.
    fn data_end(&self) -> usize;
    /// Length of the whole packet in bytes, Ethernet header included.
    fn packet_len(&self) -> usize;
    /// Index of the interface the packet arrived on.
    fn ingress_ifindex(&self) -> u32;
    /// Whether the packet is a GSO super-packet (several wire packets in one skb, each of the
    /// size the skb says, and each translated like this one when it is segmented).
    fn is_gso(&self) -> bool;
    /// The length a FIB question about this packet states for the MTU check: its IP total
    /// length `tot_len`, or none (0) for a GSO super-packet, whose IP length is its segments'
    /// together: the kernel then checks the skb itself, segment by segment.
    #[inline(always)]
    fn fib_len(&self, tot_len: u16) -> u16 {
        if self.is_gso() {
            0
        } else {
            tot_len
        }
    }
    /// The tail-call table holding this hook's stages, at the slots of `nat_common::maps`.
    fn programs() -> &'static ProgramArray;
    /// The return code that sends the packet back out of the interface it came in on.
    fn back_out(&self) -> u32;
    /// Adjusts the TCP or UDP checksum at `offset` (whose bytes are `check`) after a rewrite
    /// that changed pseudo-header fields (addresses) by `pseudo` and the L4 header's own fields
    /// (ports) by `own`. `udp`: keep a zero (no checksum) zero. Packet pointers held before
    /// this call must not be used after it.
    fn update_l4_checksum(
        &self,
        offset: usize,
        check: &mut [u8; 2],
        pseudo: Delta,
        own: Delta,
        udp: bool,
    );
    /// Inserts `grow` bytes after the Ethernet header and cuts the packet to `len` bytes;
    /// `len` bytes are directly accessible afterwards. Packet pointers must be derived again.
    fn reshape(&self, grow: usize, len: usize) -> Result<(), ()>;
}

impl Frame for XdpContext {
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;
    const REDIRECTED: u32 = xdp_action::XDP_REDIRECT;

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn packet_len(&self) -> usize {
        XdpContext::data_end(self) - XdpContext::data(self)
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        XdpContext::ingress_ifindex(self) as u32
    }

    #[inline(always)]
    fn is_gso(&self) -> bool {
        false
    }

    #[inline(always)]
    fn programs() -> &'static ProgramArray {
        &PROGRAMS
    }

    #[inline(always)]
    fn back_out(&self) -> u32 {
        xdp_action::XDP_TX
    }

    #[inline(always)]
    fn update_l4_checksum(
        &self,
        _offset: usize,
        check: &mut [u8; 2],
        pseudo: Delta,
        own: Delta,
        udp: bool,
    ) {
        // A frame off the wire carries complete checksums: one incremental update (RFC 1624)
        // covers both kinds of change.
        let old = u16::from_be_bytes(*check);
        let new = pseudo.add(own).apply(old);
        let new = if !udp {
            new
        } else if old == 0 {
            // UDP: 0 means "no checksum" and stays 0; a computed 0 is sent as 0xffff.
            0
        } else if new == 0 {
            0xffff
        } else {
            new
        };
        *check = new.to_be_bytes();
    }

    #[inline(always)]
    fn reshape(&self, grow: usize, len: usize) -> Result<(), ()> {
        // SAFETY: growing the head; every pointer is derived again after.
        if unsafe { bpf_xdp_adjust_head(self.ctx, -(grow as i32)) } != 0 {
            return Err(());
        }
        let cut = self.packet_len() as i32 - len as i32;
        // SAFETY: shrinking the tail to `len` (checked not to grow it).
        if cut < 0 || unsafe { bpf_xdp_adjust_tail(self.ctx, -cut) } != 0 {
            return Err(());
        }
        Ok(())
    }
}

impl Frame for TcContext {
    // "Next": the kernel goes on with the packet as if this program were not there (another
    // TCX program attached after this one still sees it).
    const PASS: u32 = TC_ACT_UNSPEC as u32;
    const DROP: u32 = TC_ACT_SHOT as u32;
    const REDIRECTED: u32 = TC_ACT_REDIRECT as u32;

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn packet_len(&self) -> usize {
        self.len() as usize
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: plain read of the context the kernel handed in.
        unsafe { (*self.skb.skb).ingress_ifindex }
    }

    #[inline(always)]
    fn is_gso(&self) -> bool {
        // SAFETY: as above.
        unsafe { (*self.skb.skb).gso_size != 0 }
    }

    #[inline(always)]
    fn programs() -> &'static ProgramArray {
        &TC_PROGRAMS
    }

    #[inline(always)]
    fn back_out(&self) -> u32 {
        // Out of the ingress interface's egress: what XDP_TX is for a frame.
        // SAFETY: helper call with plain values.
        unsafe { bpf_redirect(Frame::ingress_ifindex(self), 0) as u32 }
    }

    #[inline(always)]
    fn update_l4_checksum(
        &self,
        offset: usize,
        _check: &mut [u8; 2],
        pseudo: Delta,
        own: Delta,
        udp: bool,
    ) {
        // The helper knows the skb's checksum state: with a complete checksum it applies the
        // change (and corrects `skb->csum` for the pseudo-header part); with a partial one it
        // applies only the pseudo-header part, since the ports are summed when the checksum is
        // completed. Size 0 in the flags: `to` is a precomputed difference.
        let mangled = if udp { BPF_F_MARK_MANGLED_0 } else { 0 };
        // Failures (an offset outside the packet) leave the checksum as it was; the offset
        // comes from a header the program has just read, so they do not happen.
        let _ = self.l4_csum_replace(offset, 0, wsum(pseudo), BPF_F_PSEUDO_HDR | mangled);
        let _ = self.l4_csum_replace(offset, 0, wsum(own), mangled);
    }

    #[inline(always)]
    fn reshape(&self, grow: usize, len: usize) -> Result<(), ()> {
        self.adjust_room(grow as i32, BPF_ADJ_ROOM_MAC, 0)
            .map_err(|_| ())?;
        // SAFETY: helper call on this program's own skb.
        if unsafe { bpf_skb_change_tail(self.skb.skb, len as u32, 0) } != 0 {
            return Err(());
        }
        self.pull_data(len as u32).map_err(|_| ())
    }
}

/// A checksum difference as the skb helpers take it: a 32-bit one's complement sum in the
/// byte order of memory. [`Delta`] sums big-endian words; a one's complement sum is the same
/// number byte-swapped whichever order it is taken in (RFC 1071, "byte order independence").
#[inline(always)]
fn wsum(delta: Delta) -> u64 {
    u64::from(delta.folded().swap_bytes())
}

/// How much of an skb the NAT reads and writes directly: Ethernet, a VLAN tag, an IPv4 header
/// with the most options and the first 20 bytes after it (the TCP header up to its flags).
pub const TC_HEADERS: usize = 14 + 4 + 60 + 20;

/// Makes the first `want` bytes of an skb (fewer if it is shorter) directly accessible (and
/// private to this program, so it may write them). GSO super-packets and skbs built from pages
/// keep only some headers in their linear part.
#[inline(always)]
pub fn pull_headers(ctx: &TcContext, want: usize) {
    let want = want.min(ctx.len() as usize);
    if TcContext::data_end(ctx) - TcContext::data(ctx) < want {
        // A failure (no memory) leaves the linear part as it is: parsing then finds the
        // headers cut short and passes the packet untranslated, counted.
        let _ = ctx.pull_data(want as u32);
    }
}

/// Pointer to a `T` at `offset` bytes into the frame, or `Err` if it does not fit.
#[inline(always)]
pub fn ptr_at<T, C: Frame>(ctx: &C, offset: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *mut T)
}
