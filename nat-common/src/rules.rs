//! Stateless translation rules as the kernel program sees them.
//!
//! The agent compiles its DNAT rules into two longest-prefix-match tables:
//! - `DNAT_FORWARD`, keyed by destination address: rewrite the destination (VIP -> backend);
//! - `DNAT_REVERSE`, keyed by source address: rewrite the source of replies (backend -> VIP).
//!
//! Both hold a [`NatRuleSet`]: the rules that can apply to an address in that prefix, in
//! priority order, including the rules of every shorter (covering) prefix. The longest-prefix
//! lookup therefore returns everything that can match, and the first rule in the set that
//! matches protocol and port wins, exactly as the config's order says.
//!
//! A [`NatRule`] is direction-neutral: it matches a protocol and a port range on the side being
//! rewritten (destination port forward, source port reverse) and rewrites that side's address
//! and port. The reverse rule of a DNAT rule is the same rule with the two sides swapped.

/// Most rules one prefix's set can hold (the kernel walks them in a bounded loop). The agent
/// refuses configs that need more for one address.
pub const MAX_RULES_PER_SET: usize = 16;

/// [`NatRule::flags`]: the rule matches only ports in `port_min..=port_max` (TCP/UDP).
pub const RULE_MATCH_PORT: u8 = 1 << 0;
/// [`NatRule::flags`]: the rule rewrites the port to `to_port_min + (port - port_min)`.
pub const RULE_REWRITE_PORT: u8 = 1 << 1;

/// [`NatRule::flags`] (forward table only): every flow of this rule gets a session, because its
/// reverse cannot be derived statelessly (several VIPs onto one backend endpoint). Such rules
/// are absent from the reverse table.
pub const RULE_STATEFUL: u8 = 1 << 2;
/// [`NatRule::flags`] (forward table only): after the destination is translated, the SNAT rules
/// are consulted too; if one applies, the flow gets a session translating both sides
/// (DNAT + MASQUERADE, scenario 3). Set by the agent when SNAT rules exist.
pub const RULE_SNAT_CHECK: u8 = 1 << 3;

/// One translation, as stored in a [`NatRuleSet`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NatRule {
    /// Index into `RULE_COUNTERS` (the agent's slot for this rule).
    pub counter_index: u32,
    /// Network order. Bits set here come from `to_addr`, the others are kept from the packet:
    /// all ones maps one address onto one address, a /24 mask maps a /24 onto a /24 (NETMAP).
    pub addr_mask: [u8; 4],
    /// Network order. The address (or prefix base) written into the packet.
    pub to_addr: [u8; 4],
    /// Host order. First port matched, when [`RULE_MATCH_PORT`] is set.
    pub port_min: u16,
    /// Host order. Last port matched, when [`RULE_MATCH_PORT`] is set.
    pub port_max: u16,
    /// Host order. Port written for `port_min`, when [`RULE_REWRITE_PORT`] is set; the range
    /// maps onto a range of the same size.
    pub to_port_min: u16,
    /// IP protocol matched, 0 for any.
    pub proto: u8,
    /// `RULE_*` flags.
    pub flags: u8,
}

const _: () = assert!(core::mem::size_of::<NatRule>() == 20);

impl NatRule {
    /// Whether this rule needs the L4 port to decide (and so cannot judge a later fragment).
    #[inline(always)]
    pub const fn needs_port(&self) -> bool {
        self.flags & (RULE_MATCH_PORT | RULE_REWRITE_PORT) != 0
    }

    /// Whether flows of this rule always get a session.
    #[inline(always)]
    pub const fn is_stateful(&self) -> bool {
        self.flags & RULE_STATEFUL != 0
    }

    /// Whether the rule applies to protocol `proto`. Port rules are validated by the agent to
    /// name TCP or UDP.
    #[inline(always)]
    pub const fn matches_proto(&self, proto: u8) -> bool {
        self.proto == 0 || self.proto == proto
    }

    /// Whether the rule applies to port `port` (host order); always true without a port match.
    #[inline(always)]
    pub const fn matches_port(&self, port: u16) -> bool {
        self.flags & RULE_MATCH_PORT == 0 || (port >= self.port_min && port <= self.port_max)
    }

    /// The address this rule writes in place of `addr`.
    #[inline(always)]
    pub const fn translate_addr(&self, addr: [u8; 4]) -> [u8; 4] {
        let m = self.addr_mask;
        let t = self.to_addr;
        [
            (t[0] & m[0]) | (addr[0] & !m[0]),
            (t[1] & m[1]) | (addr[1] & !m[1]),
            (t[2] & m[2]) | (addr[2] & !m[2]),
            (t[3] & m[3]) | (addr[3] & !m[3]),
        ]
    }

    /// The port this rule writes in place of `port` (host order).
    #[inline(always)]
    pub const fn translate_port(&self, port: u16) -> u16 {
        if self.flags & RULE_REWRITE_PORT == 0 {
            return port;
        }
        // The agent guarantees the target range is as large as the matched range, so this
        // cannot overflow for a matched port; wrapping keeps the kernel program panic-free.
        self.to_port_min
            .wrapping_add(port.wrapping_sub(self.port_min))
    }
}

/// The value of `DNAT_FORWARD` and `DNAT_REVERSE`: candidate rules for one prefix in priority
/// order. Only the first `len` entries are meaningful.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NatRuleSet {
    /// Number of valid entries in `rules` (at most [`MAX_RULES_PER_SET`]).
    pub len: u32,
    /// The rules, first match wins.
    pub rules: [NatRule; MAX_RULES_PER_SET],
}

const _: () = assert!(core::mem::size_of::<NatRuleSet>() == 4 + 20 * MAX_RULES_PER_SET);

/// What a rule set decided for one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetMatch {
    /// Rule at this index applies.
    Rule(usize),
    /// No rule applies.
    None,
    /// A port-matching rule comes first and the packet carries no ports (a later fragment): the
    /// outcome cannot be decided without guessing.
    NeedsPorts,
}

impl NatRuleSet {
    /// Whether some rule for `proto` needs the port to decide, so the L4 header must be read
    /// before [`NatRuleSet::find`]. Packets no port rule is interested in are never required
    /// to carry a complete L4 header.
    #[inline(always)]
    pub fn needs_port_for(&self, proto: u8) -> bool {
        let mut i = 0;
        while i < MAX_RULES_PER_SET {
            if i as u32 >= self.len {
                break;
            }
            let rule = &self.rules[i];
            if rule.matches_proto(proto) && rule.needs_port() {
                return true;
            }
            i += 1;
        }
        false
    }

    /// Finds the first rule that applies to `proto` and `port`. `port` is `None` when the packet
    /// has no L4 ports to look at: a later fragment, or a protocol without ports.
    #[inline(always)]
    pub fn find(&self, proto: u8, port: Option<u16>) -> SetMatch {
        let mut i = 0;
        while i < MAX_RULES_PER_SET {
            if i as u32 >= self.len {
                break;
            }
            let rule = &self.rules[i];
            if rule.matches_proto(proto) {
                if !rule.needs_port() {
                    return SetMatch::Rule(i);
                }
                match port {
                    Some(p) if rule.matches_port(p) => return SetMatch::Rule(i),
                    Some(_) => {}
                    None => return SetMatch::NeedsPorts,
                }
            }
            i += 1;
        }
        SetMatch::None
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), explicit layout without implicit padding (size asserted), any bit pattern valid.
unsafe impl aya::Pod for NatRule {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for NatRuleSet {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn port_rule(proto: u8, lo: u16, hi: u16, to: u16) -> NatRule {
        NatRule {
            counter_index: 1,
            addr_mask: [255; 4],
            to_addr: [198, 18, 2, 10],
            port_min: lo,
            port_max: hi,
            to_port_min: to,
            proto,
            flags: RULE_MATCH_PORT | RULE_REWRITE_PORT,
        }
    }

    fn set(rules: &[NatRule]) -> NatRuleSet {
        let mut s = NatRuleSet {
            len: rules.len() as u32,
            ..Default::default()
        };
        s.rules[..rules.len()].copy_from_slice(rules);
        s
    }

    #[test]
    fn netmap_keeps_host_bits() {
        let r = NatRule {
            addr_mask: [255, 255, 255, 0],
            to_addr: [198, 18, 9, 0],
            ..Default::default()
        };
        assert_eq!(r.translate_addr([203, 0, 113, 77]), [198, 18, 9, 77]);
    }

    #[test]
    fn port_range_maps_onto_range() {
        let r = port_rule(6, 8000, 8009, 9000);
        assert_eq!(r.translate_port(8000), 9000);
        assert_eq!(r.translate_port(8009), 9009);
        assert!(r.matches_port(8005) && !r.matches_port(8010) && !r.matches_port(7999));
    }

    #[test]
    fn first_match_wins_and_proto_filters() {
        let tcp80 = port_rule(6, 80, 80, 8080);
        let whole = NatRule {
            addr_mask: [255; 4],
            to_addr: [198, 18, 2, 11],
            ..Default::default()
        };
        let s = set(&[tcp80, whole]);
        assert_eq!(s.find(6, Some(80)), SetMatch::Rule(0));
        assert_eq!(s.find(6, Some(81)), SetMatch::Rule(1));
        assert_eq!(s.find(17, Some(80)), SetMatch::Rule(1));
        assert_eq!(s.find(1, None), SetMatch::Rule(1));
        // A later fragment cannot pass the port rule without knowing its port.
        assert_eq!(s.find(6, None), SetMatch::NeedsPorts);
        // ... but a UDP fragment skips the TCP rule by protocol and reaches the 1:1 rule.
        assert_eq!(s.find(17, None), SetMatch::Rule(1));
        assert_eq!(set(&[tcp80]).find(17, Some(80)), SetMatch::None);
    }

    #[test]
    fn needs_port_only_for_protocols_a_port_rule_names() {
        let s = set(&[port_rule(6, 80, 80, 8080)]);
        assert!(s.needs_port_for(6));
        assert!(!s.needs_port_for(17));
        assert!(!s.needs_port_for(1));
    }

    #[test]
    fn len_bounds_the_walk() {
        let mut s = set(&[port_rule(6, 1, 1, 1)]);
        s.rules[1] = NatRule::default(); // would match anything if walked
        assert_eq!(s.find(17, Some(5)), SetMatch::None);
    }

    proptest! {
        /// A matched port always lands inside the target range of the same size.
        #[test]
        fn translated_port_stays_in_target_range(lo in 0u16..=60000, span in 0u16..1000, to in 0u16..=60000, off in 0u16..1000) {
            let hi = lo.saturating_add(span);
            let to = to.min(u16::MAX - (hi - lo));
            let r = port_rule(17, lo, hi, to);
            let p = lo.saturating_add(off).min(hi);
            let t = r.translate_port(p);
            prop_assert!(t >= to && t <= to + (hi - lo));
            prop_assert_eq!(t - to, p - lo);
        }

        /// Forward then reverse (sides swapped) restores the original address.
        #[test]
        fn netmap_round_trip(plen in 0u32..=32, vip in any::<[u8;4]>(), backend in any::<[u8;4]>(), host in any::<u32>()) {
            let mask = if plen == 0 { 0 } else { u32::MAX << (32 - plen) };
            let m = mask.to_be_bytes();
            let vip_base = (u32::from_be_bytes(vip) & mask).to_be_bytes();
            let be_base = (u32::from_be_bytes(backend) & mask).to_be_bytes();
            let addr = (u32::from_be_bytes(vip_base) | (host & !mask)).to_be_bytes();
            let fwd = NatRule { addr_mask: m, to_addr: be_base, ..Default::default() };
            let rev = NatRule { addr_mask: m, to_addr: vip_base, ..Default::default() };
            prop_assert_eq!(rev.translate_addr(fwd.translate_addr(addr)), addr);
        }
    }
}
