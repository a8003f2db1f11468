//! Connection tracking: the session layout shared by the kernel and the agent, the TCP state
//! machine and the port-allocation arithmetic (pure, host-tested).
//!
//! One logical session per flow lives in two entries of non-LRU hash maps:
//! - `SESSIONS`: the original direction's packet tuple -> [`Session`] (the translated tuple,
//!   protocol state, timestamps, counters);
//! - `REPLIES`: the reply direction's packet tuple -> the original tuple.
//!
//! Only the agent deletes them (session first, then reply entry), so eviction can never split a
//! flow's two directions; a full table refuses new flows while existing ones keep working.
//! Endpoint-independent mapping (RFC 4787 REQ-1) comes from `MAPPINGS` (inside endpoint ->
//! external endpoint) and `BINDINGS` (external endpoint -> inside endpoint), the latter being
//! the race-free claim of an external port (insert-if-absent).

/// A packet's identity as it arrives: addresses and ports in network order exactly as on the
/// wire. For ICMP echo the identifier takes the port of the side that chose it: a request has
/// `sport = id, dport = 0`, a reply `sport = 0, dport = id`, so the reply key of a flow is always
/// its translated original key with both sides swapped.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// Source address.
    pub src: [u8; 4],
    /// Destination address.
    pub dst: [u8; 4],
    /// Source port (TCP/UDP) or echo id (ICMP request).
    pub sport: [u8; 2],
    /// Destination port (TCP/UDP) or echo id (ICMP reply).
    pub dport: [u8; 2],
    /// IP protocol.
    pub proto: u8,
    /// Zero.
    pub _pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);

impl FlowKey {
    /// A tuple from its fields (addresses and ports in network order), pad zero.
    ///
    /// Built from four 32-bit words on purpose: written as a struct literal, the three zero pad
    /// bytes become a call to the BPF build's byte-by-byte `memset`, on every packet.
    #[inline(always)]
    pub const fn new(
        src: [u8; 4],
        dst: [u8; 4],
        sport: [u8; 2],
        dport: [u8; 2],
        proto: u8,
    ) -> Self {
        let words = [
            u32::from_ne_bytes(src),
            u32::from_ne_bytes(dst),
            u32::from_ne_bytes([sport[0], sport[1], dport[0], dport[1]]),
            u32::from_ne_bytes([proto, 0, 0, 0]),
        ];
        // SAFETY: FlowKey is repr(C), 16 bytes without implicit padding (asserted above), and
        // every bit pattern is valid; the words hold its fields in declaration order.
        unsafe { core::mem::transmute::<[u32; 4], FlowKey>(words) }
    }

    /// The tuple of a packet travelling the other way.
    #[inline(always)]
    pub const fn reversed(&self) -> FlowKey {
        FlowKey::new(self.dst, self.src, self.dport, self.sport, self.proto)
    }

    /// The sender's endpoint: source address and port (echo id), with the protocol.
    #[inline(always)]
    pub const fn source(&self) -> Endpoint {
        Endpoint {
            addr: self.src,
            port: self.sport,
            proto: self.proto,
            _pad: 0,
        }
    }

    /// The endpoint addressed: destination address and port (echo id), with the protocol.
    #[inline(always)]
    pub const fn destination(&self) -> Endpoint {
        Endpoint {
            addr: self.dst,
            port: self.dport,
            proto: self.proto,
            _pad: 0,
        }
    }
}

/// An address and port (or echo id) of one protocol: key and value of `MAPPINGS` and
/// `BINDINGS`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    /// Address, network order.
    pub addr: [u8; 4],
    /// Port or echo id, network order.
    pub port: [u8; 2],
    /// IP protocol.
    pub proto: u8,
    /// Zero.
    pub _pad: u8,
}

const _: () = assert!(core::mem::size_of::<Endpoint>() == 8);

/// Value of `MAPPINGS`: the external endpoint an inside endpoint is mapped to.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mapping {
    /// The external endpoint (its `proto` equals the inside one's).
    pub external: Endpoint,
    /// `bpf_ktime_get_boot_ns` when a session last started using this mapping; the agent
    /// keeps a mapping that was used since its last sweep began.
    pub last_used_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Mapping>() == 16);

/// [`Session::flags`]: the source was translated (SNAT / MASQUERADE).
pub const SESSION_SNAT: u8 = 1 << 0;
/// [`Session::flags`]: the destination was translated (stateful DNAT).
pub const SESSION_DNAT: u8 = 1 << 1;

/// No rule: the counter slot value of a session without a DNAT or SNAT part.
pub const NO_RULE: u32 = u32::MAX;

/// Value of `SESSIONS` (key: the original direction's [`FlowKey`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Session {
    /// The original-direction packet after translation. Its [`FlowKey::reversed`] is the key of
    /// the flow's `REPLIES` entry.
    pub translated: FlowKey,
    /// Counter slot of the DNAT rule that made the session, or [`NO_RULE`].
    pub dnat_rule: u32,
    /// Counter slot of the SNAT rule that made the session, or [`NO_RULE`].
    pub snat_rule: u32,
    /// `bpf_ktime_get_boot_ns` at creation.
    pub created_ns: u64,
    /// `bpf_ktime_get_boot_ns` of the last packet, either direction.
    pub last_seen_ns: u64,
    /// Packets in the original direction.
    pub orig_packets: u64,
    /// Bytes (whole frames) in the original direction.
    pub orig_bytes: u64,
    /// Packets in the reply direction.
    pub reply_packets: u64,
    /// Bytes in the reply direction.
    pub reply_bytes: u64,
    /// [`TcpState`] value for TCP; 0 otherwise.
    pub tcp_state: u8,
    /// `SESSION_*` flags.
    pub flags: u8,
    /// Zero.
    pub _pad: [u8; 6],
}

const _: () = assert!(core::mem::size_of::<Session>() == 80);

/// Direction of a packet within its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// From the initiator.
    Original,
    /// From the responder.
    Reply,
}

/// TCP connection states, coarse like netfilter's (RFC 5382 timeouts need only "established"
/// versus "transitory"). Stored as `u8` in [`Session::tcp_state`]; values are stable.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    /// Initiator's SYN seen.
    SynSent = 1,
    /// Responder's SYN-ACK seen.
    SynRecv = 2,
    /// Handshake complete, or picked up mid-stream.
    Established = 3,
    /// The initiator sent FIN.
    FinOrig = 4,
    /// The responder sent FIN.
    FinReply = 5,
    /// Both sides sent FIN.
    TimeWait = 6,
    /// Reset.
    Closed = 7,
}

/// TCP header flag bits (byte 13 of the header).
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

impl TcpState {
    /// Decodes a stored state; unknown values read as `Established` (the longest-lived, so a
    /// corrupted value never expires a live flow early).
    pub const fn from_u8(v: u8) -> TcpState {
        match v {
            1 => TcpState::SynSent,
            2 => TcpState::SynRecv,
            4 => TcpState::FinOrig,
            5 => TcpState::FinReply,
            6 => TcpState::TimeWait,
            7 => TcpState::Closed,
            _ => TcpState::Established,
        }
    }

    /// The state a new session starts in, from its first packet's flags; `None` when the packet
    /// must not create a session (a RST: there is nothing to keep).
    pub const fn initial(flags: u8) -> Option<TcpState> {
        if flags & tcp_flags::RST != 0 {
            None
        } else if flags & tcp_flags::SYN != 0 && flags & tcp_flags::ACK == 0 {
            Some(TcpState::SynSent)
        } else {
            // Mid-stream pickup (e.g. sessions lost with a reboot): like netfilter's loose mode.
            Some(TcpState::Established)
        }
    }

    /// The state after a packet with `flags` travelling in `dir`.
    pub const fn next(self, dir: Dir, flags: u8) -> TcpState {
        if flags & tcp_flags::RST != 0 {
            return TcpState::Closed;
        }
        let fin = flags & tcp_flags::FIN != 0;
        match (self, dir) {
            (TcpState::SynSent, Dir::Reply)
                if flags & tcp_flags::SYN != 0 && flags & tcp_flags::ACK != 0 =>
            {
                TcpState::SynRecv
            }
            (TcpState::SynRecv, Dir::Original) if flags & tcp_flags::ACK != 0 && !fin => {
                TcpState::Established
            }
            (TcpState::SynRecv | TcpState::Established, Dir::Original) if fin => TcpState::FinOrig,
            (TcpState::SynRecv | TcpState::Established, Dir::Reply) if fin => TcpState::FinReply,
            (TcpState::FinOrig, Dir::Reply) if fin => TcpState::TimeWait,
            (TcpState::FinReply, Dir::Original) if fin => TcpState::TimeWait,
            // A new SYN on a closed or finishing tuple starts over (port reuse).
            (TcpState::Closed | TcpState::TimeWait, Dir::Original)
                if flags & tcp_flags::SYN != 0 && flags & tcp_flags::ACK == 0 =>
            {
                TcpState::SynSent
            }
            (s, _) => s,
        }
    }

    /// Whether the connection counts as established for timeouts.
    pub const fn is_established(self) -> bool {
        matches!(self, TcpState::Established)
    }

    /// Name for listings.
    pub const fn name(self) -> &'static str {
        match self {
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::Established => "ESTABLISHED",
            TcpState::FinOrig | TcpState::FinReply => "FIN_WAIT",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Closed => "CLOSE",
        }
    }
}

/// Most addresses an SNAT pool holds.
pub const MAX_POOL_ADDRS: usize = 64;

/// Value of `SNAT_POOLS` (an array indexed by pool id): the external addresses of an SNAT
/// rule and its port range. MASQUERADE pools have `len == 0`: the address comes from the FIB.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    /// Number of valid `addrs`.
    pub len: u32,
    /// First external port (host order).
    pub port_min: u16,
    /// Last external port (host order).
    pub port_max: u16,
    /// External addresses, network order.
    pub addrs: [[u8; 4]; MAX_POOL_ADDRS],
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            len: 0,
            port_min: 1024,
            port_max: 65535,
            addrs: [[0; 4]; MAX_POOL_ADDRS],
        }
    }
}

const _: () = assert!(core::mem::size_of::<Pool>() == 8 + 4 * MAX_POOL_ADDRS);

/// Most ports tried for one new mapping before the allocation fails (bounded work per packet).
pub const MAX_PORT_PROBES: u32 = 32;

/// Paired pooling (RFC 4787 REQ-2): the pool member for an inside address, the same for every
/// flow of that host. `len` must be non-zero.
#[inline(always)]
pub const fn pool_index_for(inside: [u8; 4], len: u32) -> u32 {
    // FNV-1a over the four bytes: cheap, and spreads consecutive host addresses.
    let mut h: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < 4 {
        h ^= inside[i] as u32;
        h = h.wrapping_mul(0x0100_0193);
        i += 1;
    }
    h % len
}

/// The `attempt`-th port to try (host order) in `min..=max`. Attempt 0 keeps the inside port
/// when it is in range (port preservation, RFC 4787 REQ-3 style); later attempts walk the
/// range from `random`. The kernel passes a fresh random number for every attempt, so its
/// probes are independent: a walk that starts inside a run of claimed ports (port
/// preservation hands out runs) could spend every probe in it. Used only for addresses without
/// a free-port index (`crate::ports`).
#[inline(always)]
pub const fn probe_port(inside_port: u16, random: u32, attempt: u32, min: u16, max: u16) -> u16 {
    if attempt == 0 && inside_port >= min && inside_port <= max {
        return inside_port;
    }
    // Kept in 32 bits on purpose: a 64-bit remainder makes LLVM's BPF backend emit a library
    // call the kernel cannot run. `max >= min` is the agent's guarantee; wrapping keeps it total.
    let span: u32 = max.wrapping_sub(min) as u32 + 1;
    let offset: u32 = random.wrapping_add(attempt) % span;
    min.wrapping_add(offset as u16)
}

/// [`SnatRule::action`]: translate the source to the rule's pool.
pub const SNAT_TO_POOL: u8 = 0;
/// [`SnatRule::action`]: translate the source to the egress interface's address.
pub const SNAT_MASQUERADE: u8 = 1;
/// [`SnatRule::action`]: do not translate (exempt destination or source).
pub const SNAT_NONE: u8 = 2;

/// One SNAT rule in a [`SnatRuleSet`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnatRule {
    /// Index into `RULE_COUNTERS`.
    pub counter_index: u32,
    /// Destination prefix base the packet must be in (network order); all-zero mask: any.
    pub dst_addr: [u8; 4],
    /// Destination prefix mask (network order).
    pub dst_mask: [u8; 4],
    /// Egress interface index the FIB must choose; 0: any.
    pub out_ifindex: u32,
    /// Index into `SNAT_POOLS`.
    pub pool: u32,
    /// IP protocol, 0 for any (TCP, UDP and ICMP echo are translated; others never match).
    pub proto: u8,
    /// `SNAT_*`.
    pub action: u8,
    /// Zero.
    pub _pad: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<SnatRule>() == 24);

impl SnatRule {
    /// Whether protocol and destination match (the egress interface is checked separately,
    /// because it needs a FIB lookup).
    #[inline(always)]
    pub const fn matches(&self, proto: u8, dst: [u8; 4]) -> bool {
        // One 32-bit comparison rather than four byte branches: this runs in a verifier-bounded
        // loop, where every branch multiplies the paths to explore.
        let masked = u32::from_ne_bytes(dst) & u32::from_ne_bytes(self.dst_mask);
        (self.proto == 0 || self.proto == proto) && masked == u32::from_ne_bytes(self.dst_addr)
    }
}

/// Most SNAT rules that can apply to one source prefix.
pub const MAX_SNAT_RULES_PER_SET: usize = 16;

/// Value of `SNAT_RULES` (LPM trie keyed by source prefix): the SNAT rules whose source prefix
/// covers the key, in priority order.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnatRuleSet {
    /// Valid entries in `rules`.
    pub len: u32,
    /// The rules, first match wins.
    pub rules: [SnatRule; MAX_SNAT_RULES_PER_SET],
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C), explicit padding, size asserted, any bit pattern valid.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Endpoint {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Mapping {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Session {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Pool {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SnatRule {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SnatRuleSet {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tcp_flags::*;

    #[test]
    fn handshake_and_orderly_close() {
        let s = TcpState::initial(SYN).unwrap();
        assert_eq!(s, TcpState::SynSent);
        let s = s.next(Dir::Reply, SYN | ACK);
        assert_eq!(s, TcpState::SynRecv);
        let s = s.next(Dir::Original, ACK);
        assert_eq!(s, TcpState::Established);
        let s = s.next(Dir::Original, ACK);
        assert_eq!(s, TcpState::Established);
        let s = s.next(Dir::Original, FIN | ACK);
        assert_eq!(s, TcpState::FinOrig);
        let s = s.next(Dir::Reply, ACK);
        assert_eq!(s, TcpState::FinOrig);
        let s = s.next(Dir::Reply, FIN | ACK);
        assert_eq!(s, TcpState::TimeWait);
    }

    #[test]
    fn reset_closes_and_syn_reopens() {
        let s = TcpState::Established.next(Dir::Reply, RST);
        assert_eq!(s, TcpState::Closed);
        assert_eq!(s.next(Dir::Original, SYN), TcpState::SynSent);
        assert_eq!(TcpState::initial(RST | ACK), None);
        assert_eq!(TcpState::initial(ACK), Some(TcpState::Established));
    }

    #[test]
    fn reply_key_is_swapped_translated_key() {
        let k = FlowKey {
            src: [198, 18, 0, 2],
            dst: [203, 0, 113, 5],
            sport: 40000u16.to_be_bytes(),
            dport: 123u16.to_be_bytes(),
            proto: 17,
            _pad: [0; 3],
        };
        let r = k.reversed();
        assert_eq!(
            (r.src, r.dst, r.sport, r.dport),
            (k.dst, k.src, k.dport, k.sport)
        );
        assert_eq!(r.reversed(), k);
    }

    #[test]
    fn snat_rule_destination_and_protocol() {
        let r = SnatRule {
            dst_addr: [203, 0, 113, 0],
            dst_mask: [255, 255, 255, 0],
            proto: 17,
            ..Default::default()
        };
        assert!(r.matches(17, [203, 0, 113, 9]));
        assert!(!r.matches(6, [203, 0, 113, 9]));
        assert!(!r.matches(17, [198, 51, 100, 9]));
        assert!(SnatRule::default().matches(6, [1, 2, 3, 4]));
    }

    proptest! {
        /// Every probed port lies in the range, and the first probe preserves an in-range port.
        #[test]
        fn probes_stay_in_range(inside in any::<u16>(), random in any::<u32>(), attempt in 0u32..64, min in 1u16..=65535, span in 0u16..=65535) {
            let max = min.saturating_add(span);
            let p = probe_port(inside, random, attempt, min, max);
            prop_assert!(p >= min && p <= max);
            if attempt == 0 && inside >= min && inside <= max {
                prop_assert_eq!(p, inside);
            }
        }

        /// Successive probes from one start are distinct until the range wraps.
        #[test]
        fn probes_are_distinct(random in any::<u32>(), min in 1024u16..60000) {
            let max = min + 100;
            let ports: std::collections::BTreeSet<u16> =
                (1..=MAX_PORT_PROBES).map(|a| probe_port(0, random, a, min, max)).collect();
            prop_assert_eq!(ports.len(), MAX_PORT_PROBES as usize);
        }

        /// A host always lands on the same pool member, and within the pool.
        #[test]
        fn paired_pooling_is_stable(addr in any::<[u8; 4]>(), len in 1u32..=64) {
            let i = pool_index_for(addr, len);
            prop_assert!(i < len);
            prop_assert_eq!(i, pool_index_for(addr, len));
        }

        /// No packet flags move a state outside the enum, and RST always closes.
        #[test]
        fn transitions_are_total(state in 1u8..=7, flags in any::<u8>(), reply in any::<bool>()) {
            let dir = if reply { Dir::Reply } else { Dir::Original };
            let next = TcpState::from_u8(state).next(dir, flags);
            prop_assert_eq!(TcpState::from_u8(next as u8), next);
            if flags & RST != 0 {
                prop_assert_eq!(next, TcpState::Closed);
            }
        }
    }
}
