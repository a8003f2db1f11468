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
    /// A fragment that a port-matching rule would need ports for: passed untouched, because
    /// rewriting it without the first fragment's ports would be guessing.
    FragmentUnmatched = 7,
    /// An ICMP error to or from a translated address: passed untouched until ICMP error
    /// translation (quoted header included) exists.
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
    /// No free external port after bounded probing: the new flow is refused.
    NoPort = 16,
    /// The new flow's reply tuple is already taken by another session: refused.
    SessionClash = 17,
    /// A fragment that needs source NAT: dropped until fragments are tracked, because passing
    /// it would leak the inside address.
    SnatFragment = 18,
    /// A protocol SNAT cannot translate (not TCP, UDP or ICMP echo): dropped rather than leaked.
    SnatProtoUnsupported = 19,
    /// A TCP RST that would start a new session: there is nothing to track, and passing it
    /// could leak the inside address, so it is dropped.
    RstNoSession = 20,
    /// The new-flow program could not be reached (not installed in `PROGRAMS`): the new flow
    /// is refused. Means the agent did not finish loading; never expected in operation.
    NewFlowUnavailable = 21,
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
}

impl Reason {
    /// Number of reasons; the size of the reason counter map.
    pub const COUNT: u32 = 22;

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
        }
    }

    /// The XDP action this exit takes.
    pub const fn action(self) -> Action {
        match self {
            Reason::DnatTranslated
            | Reason::DnatReplyTranslated
            | Reason::SessionNew
            | Reason::SessionOrig
            | Reason::SessionReply => Action::Translated,
            // Refused new flows: passing them would send the inside address out untranslated.
            Reason::TableFull
            | Reason::NoPort
            | Reason::SessionClash
            | Reason::SnatFragment
            | Reason::SnatProtoUnsupported
            | Reason::RstNoSession
            | Reason::NewFlowUnavailable => Action::Drop,
            // Malformed IPv4 and a cut-short L4 header the kernel would drop too; dropping here
            // makes sure nothing downstream sees a half-parsed packet.
            Reason::MalformedIpv4 | Reason::TruncatedL4 | Reason::TruncatedEthernet => Action::Drop,
            Reason::NotIpv4
            | Reason::NoMatch
            | Reason::FragmentUnmatched
            | Reason::IcmpErrorPassed
            | Reason::VlanStacked
            | Reason::ProtoUnsupported
            | Reason::SnatExempt => Action::Pass,
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

#[cfg(test)]
mod tests {
    use super::*;

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
