//! Exit reasons and counters shared by the XDP program and the agent's metrics.

/// Why the XDP program let a packet go the way it did. Every exit of the program is one of
/// these; the value indexes the per-CPU `REASON_COUNTERS` map, and [`Reason::action`] tells
/// which XDP action that exit takes.
///
/// Values are stable (they are map indices the agent reads while an older program may still be
/// attached): append new reasons, never renumber.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Destination translated by a DNAT rule (original direction).
    DnatTranslated = 0,
    /// Source of a reply translated back to the VIP (reverse of a DNAT rule, stateless).
    DnatReplyTranslated = 1,
    /// Not IPv4 (ARP, IPv6, ...): the kernel's business.
    NotIpv4 = 2,
    /// IPv4 that no rule translates.
    NoMatch = 3,
    /// Frame too short for its Ethernet or VLAN header.
    TruncatedEthernet = 4,
    /// IPv4 header invalid: version, IHL below 5, total length beyond the frame or below IHL.
    MalformedIpv4 = 5,
    /// A rule matched but the TCP/UDP/ICMP header is cut short: dropped, never rewritten.
    TruncatedL4 = 6,
    /// A later fragment that a port-matching rule would need ports for, and whose first
    /// fragment's translation is not remembered (it came first, was evicted or is too old):
    /// passed untouched, because rewriting it without the first fragment would be guessing.
    FragmentUnmatched = 7,
    /// An ICMP error passed untouched: it quotes traffic no rule translates (the appliance's
    /// own, routed traffic, an exempt flow), is addressed to this host, or is a redirect.
    IcmpErrorPassed = 8,
    /// Stacked VLAN tags (QinQ): not parsed, passed.
    VlanStacked = 9,
    /// A protocol whose checksum covers the pseudo-header but that the NAT cannot rewrite
    /// (DCCP, UDP-Lite): passed untouched rather than corrupted.
    ProtoUnsupported = 10,
    /// First packet of a flow: a session was created and the packet translated.
    SessionNew = 11,
    /// Original direction translated by an existing session.
    SessionOrig = 12,
    /// Reply direction translated by an existing session.
    SessionReply = 13,
    /// An SNAT rule with `no_nat` matched: passed untouched.
    SnatExempt = 14,
    /// The session table is full: the new flow is refused (existing flows are unaffected).
    TableFull = 15,
    /// Every port of the rule's range on the chosen external address is claimed (its
    /// free-port index shows none free): the new flow is refused. Pool exhaustion.
    NoPort = 16,
    /// The new flow's reply tuple is already taken by another session: refused.
    SessionClash = 17,
    /// A later fragment that needs source NAT and whose first fragment's translation is not
    /// remembered (it arrived before the first fragment, or the entry was evicted or is too
    /// old): dropped, because passing it would leak the inside address (and nobody could
    /// reassemble it with the translated first fragment anyway).
    SnatFragment = 18,
    /// A protocol SNAT cannot translate (not TCP, UDP or ICMP echo): dropped rather than leaked.
    SnatProtoUnsupported = 19,
    /// A TCP RST that would start a new session: there is nothing to track, and passing it
    /// could leak the inside address, so it is dropped.
    RstNoSession = 20,
    /// The new-flow program could not be reached (not installed in `PROGRAMS`): the new flow
    /// is refused. Means the agent did not finish loading; never expected in operation.
    NewFlowUnavailable = 21,
    /// TTL 1 or 0 on an interface that forwards from XDP: handed to the kernel untranslated,
    /// which answers with ICMP time exceeded to the real sender (what traceroute needs).
    TtlExpiring = 22,
    /// An ICMP error about a translated flow, translated: outer addresses, the quoted header
    /// and its ports or echo id, and every checksum involved.
    IcmpErrorTranslated = 23,
    /// An ICMP error quoting a flow only the NAT could carry (a translating rule applies to
    /// it) but no session or stateless rule knows: dropped, since passing it would show
    /// inside addresses or an untranslated quote. Never creates a session.
    IcmpErrorUnmatched = 24,
    /// An ICMP error whose quote cannot be read (shorter than a header and 8 bytes, bad
    /// version or IHL), or one about a translated flow that arrived fragmented: dropped,
    /// never rewritten.
    IcmpErrorMalformed = 25,
    /// The ICMP error program could not be reached (not installed in `PROGRAMS`): the error
    /// is dropped rather than passed untranslated. Never expected in operation.
    IcmpErrorUnavailable = 26,
    /// The SNAT rule's pool is missing, or holds no address for a rule that is not
    /// MASQUERADE: the new flow is refused. An agent bug; never expected.
    SnatPoolMissing = 27,
    /// MASQUERADE, but the route gave no source address to translate to: the new flow is
    /// refused rather than sent out from 0.0.0.0.
    NoExternalAddress = 28,
    /// The free-port index showed free ports, but every claim within the bounded tries found
    /// its port taken (other CPUs claiming the same ports at that moment, or a stale index):
    /// the new flow is refused although the pool is not exhausted.
    PortsContended = 29,
    /// No free-port index exists for the external address yet (the agent creates them), and
    /// bounded random probing found no free port: the new flow is refused; the pool may still
    /// have free ports.
    NoPortProbed = 30,
    /// A later fragment (offset > 0) translated like its first fragment, from the fragment
    /// cache: IP addresses and header checksum only.
    FragmentTranslated = 31,
    /// A configured `[[bypass]]` entry matched: the kernel's, passed untouched before sessions
    /// and rules are looked at.
    Bypass = 32,
    /// A packet addressed to this host (one of its addresses, a directed broadcast, multicast)
    /// that would otherwise start an SNAT session or get a stateless DNAT reply rewrite: the
    /// kernel's, passed untouched. Replies of translated flows to an external address are
    /// not this: sessions come first.
    LocalDestination = 33,
    /// Hairpinning (an inside host to another inside host's external endpoint) with no SNAT
    /// rule translating the sender for that inside destination: the destination would answer
    /// the sender directly, past the NAT, so the packet is not translated; the kernel gets it
    /// (addressed to one of its addresses, it answers as for a closed port).
    HairpinNoSnat = 34,
    /// A "don't fragment" packet of a flow whose destination is not translated, too big for
    /// the route it would take: handed to the kernel untranslated, so the ICMP "fragmentation
    /// needed" it sends reaches the real sender (translated, the error would be addressed to
    /// this host's own external address and lost: a path-MTU black hole).
    MtuHandoff = 35,
    /// A "don't fragment" packet too big for the route its translation takes, of a flow whose
    /// destination is translated (DNAT, or a reply to an inside host): answered from XDP with
    /// ICMP "fragmentation needed" quoting the packet as its sender sent it, so the sender
    /// lowers its path MTU. The packet itself is dropped.
    MtuTooBigAnswered = 36,
    /// As [`Reason::MtuTooBigAnswered`], but no answer could be built (IP options, a VLAN tag,
    /// no route back, the answering program missing): dropped, as a router would if it could
    /// not send the error.
    MtuTooBigUnanswered = 37,
}

/// What an exit does with the packet; reported as the `action` label of the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Translated, then handed on.
    Translated,
    /// Handed to the kernel untouched.
    Pass,
    /// Dropped.
    Drop,
    /// Answered by the program itself, back out of the interface the packet came in on (the
    /// frame now holds the answer).
    Reply,
}

impl Reason {
    /// The exits of a new flow refused for want of an external port (the allocation
    /// failures of the metrics): pool exhausted, claims contended, probing without an index.
    pub const PORT_ALLOCATION_FAILURES: [Reason; 3] =
        [Reason::NoPort, Reason::PortsContended, Reason::NoPortProbed];

    /// Number of reasons; the size of the reason counter map.
    pub const COUNT: u32 = 38;

    /// Every reason in index order.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::DnatTranslated,
        Reason::DnatReplyTranslated,
        Reason::NotIpv4,
        Reason::NoMatch,
        Reason::TruncatedEthernet,
        Reason::MalformedIpv4,
        Reason::TruncatedL4,
        Reason::FragmentUnmatched,
        Reason::IcmpErrorPassed,
        Reason::VlanStacked,
        Reason::ProtoUnsupported,
        Reason::SessionNew,
        Reason::SessionOrig,
        Reason::SessionReply,
        Reason::SnatExempt,
        Reason::TableFull,
        Reason::NoPort,
        Reason::SessionClash,
        Reason::SnatFragment,
        Reason::SnatProtoUnsupported,
        Reason::RstNoSession,
        Reason::NewFlowUnavailable,
        Reason::TtlExpiring,
        Reason::IcmpErrorTranslated,
        Reason::IcmpErrorUnmatched,
        Reason::IcmpErrorMalformed,
        Reason::IcmpErrorUnavailable,
        Reason::SnatPoolMissing,
        Reason::NoExternalAddress,
        Reason::PortsContended,
        Reason::NoPortProbed,
        Reason::FragmentTranslated,
        Reason::Bypass,
        Reason::LocalDestination,
        Reason::HairpinNoSnat,
        Reason::MtuHandoff,
        Reason::MtuTooBigAnswered,
        Reason::MtuTooBigUnanswered,
    ];

    /// The metrics label value.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::DnatTranslated => "dnat",
            Reason::DnatReplyTranslated => "dnat_reply",
            Reason::NotIpv4 => "not_ipv4",
            Reason::NoMatch => "no_match",
            Reason::TruncatedEthernet => "truncated_ethernet",
            Reason::MalformedIpv4 => "malformed_ipv4",
            Reason::TruncatedL4 => "truncated_l4",
            Reason::FragmentUnmatched => "fragment_unmatched",
            Reason::IcmpErrorPassed => "icmp_error_passed",
            Reason::VlanStacked => "vlan_stacked",
            Reason::ProtoUnsupported => "proto_unsupported",
            Reason::SessionNew => "session_new",
            Reason::SessionOrig => "session_orig",
            Reason::SessionReply => "session_reply",
            Reason::SnatExempt => "snat_exempt",
            Reason::TableFull => "table_full",
            Reason::NoPort => "no_port",
            Reason::SessionClash => "session_clash",
            Reason::SnatFragment => "snat_fragment",
            Reason::SnatProtoUnsupported => "snat_proto_unsupported",
            Reason::RstNoSession => "rst_no_session",
            Reason::NewFlowUnavailable => "new_flow_unavailable",
            Reason::TtlExpiring => "ttl_expiring",
            Reason::IcmpErrorTranslated => "icmp_error_translated",
            Reason::IcmpErrorUnmatched => "icmp_error_unmatched",
            Reason::IcmpErrorMalformed => "icmp_error_malformed",
            Reason::IcmpErrorUnavailable => "icmp_error_unavailable",
            Reason::SnatPoolMissing => "snat_pool_missing",
            Reason::NoExternalAddress => "no_external_address",
            Reason::PortsContended => "ports_contended",
            Reason::NoPortProbed => "no_port_probed",
            Reason::FragmentTranslated => "fragment_translated",
            Reason::Bypass => "bypass",
            Reason::LocalDestination => "local_destination",
            Reason::HairpinNoSnat => "hairpin_no_snat",
            Reason::MtuHandoff => "mtu_handoff",
            Reason::MtuTooBigAnswered => "mtu_too_big_answered",
            Reason::MtuTooBigUnanswered => "mtu_too_big_unanswered",
        }
    }

    /// The XDP action this exit takes.
    pub const fn action(self) -> Action {
        match self {
            Reason::DnatTranslated
            | Reason::DnatReplyTranslated
            | Reason::SessionNew
            | Reason::SessionOrig
            | Reason::SessionReply
            | Reason::IcmpErrorTranslated
            | Reason::FragmentTranslated => Action::Translated,
            // Refused new flows: passing them would send the inside address out untranslated.
            Reason::TableFull
            | Reason::NoPort
            | Reason::SessionClash
            | Reason::SnatFragment
            | Reason::SnatProtoUnsupported
            | Reason::RstNoSession
            | Reason::NewFlowUnavailable
            | Reason::SnatPoolMissing
            | Reason::NoExternalAddress
            | Reason::PortsContended
            | Reason::NoPortProbed => Action::Drop,
            // Errors about translated flows that cannot be translated: passing them would show
            // inside addresses or quotes the receiver cannot match.
            Reason::IcmpErrorUnmatched
            | Reason::IcmpErrorMalformed
            | Reason::IcmpErrorUnavailable => Action::Drop,
            // Malformed IPv4 and a cut-short L4 header the kernel would drop too; dropping here
            // makes sure nothing downstream sees a half-parsed packet.
            Reason::MalformedIpv4 | Reason::TruncatedL4 | Reason::TruncatedEthernet => Action::Drop,
            Reason::NotIpv4
            | Reason::NoMatch
            | Reason::FragmentUnmatched
            | Reason::IcmpErrorPassed
            | Reason::VlanStacked
            | Reason::ProtoUnsupported
            | Reason::SnatExempt
            | Reason::TtlExpiring
            | Reason::Bypass
            | Reason::LocalDestination
            | Reason::HairpinNoSnat
            | Reason::MtuHandoff => Action::Pass,
            Reason::MtuTooBigAnswered => Action::Reply,
            Reason::MtuTooBigUnanswered => Action::Drop,
        }
    }
}

impl Action {
    /// The metrics label value.
    pub const fn name(self) -> &'static str {
        match self {
            Action::Translated => "translated",
            Action::Pass => "pass",
            Action::Drop => "drop",
            Action::Reply => "reply",
        }
    }
}

/// What happened to a translated packet after translation: the second half of its exit. Indexes
/// the per-CPU `FORWARD_COUNTERS` map. Values are stable: append, never renumber.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForwardResult {
    /// Forwarding from XDP is off for the ingress interface: XDP_PASS, the kernel forwards.
    KernelForwards = 0,
    /// Sent out of another interface (XDP_REDIRECT).
    Redirected = 1,
    /// Sent back out of the ingress interface (XDP_TX, one-arm).
    Transmitted = 2,
    /// The next hop's MAC is not known yet: the kernel forwards this one and resolves it.
    NoNeighbour = 3,
    /// Larger than the egress MTU: the kernel fragments it or answers "fragmentation needed".
    MtuExceeded = 4,
    /// No usable route from XDP (unreachable, blackhole, a route XDP cannot take): the kernel
    /// decides, and answers with ICMP where it should.
    NoRoute = 5,
    /// A VLAN-tagged frame: left to the kernel, which owns the VLAN devices.
    Vlan = 6,
    /// TTL would expire here (defensive; such packets normally never get translated).
    TtlExpiring = 7,
}

impl ForwardResult {
    /// Number of results; the size of `FORWARD_COUNTERS`.
    pub const COUNT: u32 = 8;

    /// Every result in index order.
    pub const ALL: [ForwardResult; Self::COUNT as usize] = [
        ForwardResult::KernelForwards,
        ForwardResult::Redirected,
        ForwardResult::Transmitted,
        ForwardResult::NoNeighbour,
        ForwardResult::MtuExceeded,
        ForwardResult::NoRoute,
        ForwardResult::Vlan,
        ForwardResult::TtlExpiring,
    ];

    /// The metrics label value.
    pub const fn name(self) -> &'static str {
        match self {
            ForwardResult::KernelForwards => "kernel_forwards",
            ForwardResult::Redirected => "redirected",
            ForwardResult::Transmitted => "transmitted",
            ForwardResult::NoNeighbour => "no_neighbour",
            ForwardResult::MtuExceeded => "mtu_exceeded",
            ForwardResult::NoRoute => "no_route",
            ForwardResult::Vlan => "vlan",
            ForwardResult::TtlExpiring => "ttl_expiring",
        }
    }
}

/// Per-rule traffic counters, one per CPU per rule (value of `RULE_COUNTERS`). Bytes are whole
/// frames as XDP sees them (Ethernet header included).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleCounters {
    /// Packets translated in the original direction (towards the backend).
    pub orig_packets: u64,
    /// Bytes translated in the original direction.
    pub orig_bytes: u64,
    /// Replies translated back (from the backend).
    pub reply_packets: u64,
    /// Bytes of replies translated back.
    pub reply_bytes: u64,
}

const _: () = assert!(core::mem::size_of::<RuleCounters>() == 32);

#[cfg(feature = "user")]
// SAFETY: plain-old-data, repr(C), no padding, every bit pattern valid.
unsafe impl aya::Pod for RuleCounters {}

// The counter maps are sized with headroom (`maps::REASON_SLOTS`, `FORWARD_RESULT_SLOTS`) so
// that adding an exit keeps the pinned layout; running out of room is a build error.
const _: () = assert!(Reason::COUNT <= crate::maps::REASON_SLOTS);
const _: () = assert!(ForwardResult::COUNT <= crate::maps::FORWARD_RESULT_SLOTS);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_results_are_in_index_order_and_named_uniquely() {
        for (i, r) in ForwardResult::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32);
        }
        let mut names: Vec<_> = ForwardResult::ALL.iter().map(|r| r.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ForwardResult::COUNT as usize);
    }

    #[test]
    fn all_is_in_index_order_and_names_are_unique() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32);
        }
        let mut names: Vec<_> = Reason::ALL.iter().map(|r| r.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Reason::COUNT as usize);
    }
}
