//! Bypass entries: traffic that is not the NAT's business (a cloud platform's health probes,
//! management access, licence servers) goes to the kernel untouched, before sessions and rules
//! are looked at.
//!
//! The agent compiles `[[bypass]]` entries into one longest-prefix-match trie keyed by
//! destination prefix (`0.0.0.0/0` for entries without a destination), banked like the other
//! rule tables. Each prefix's [`BypassSet`] holds its own entries and those of every shorter
//! prefix covering it, so one lookup yields every entry that can match; the kernel then checks
//! source prefix, protocol and destination port of each in a bounded loop.

/// Most entries one destination prefix's set can hold (the kernel walks them in a bounded
/// loop). The agent refuses configs that need more for one address.
pub const MAX_BYPASS_PER_SET: usize = 16;

/// [`BypassEntry::flags`]: the entry matches only destination ports in
/// `port_min..=port_max` (TCP/UDP; later fragments, which carry no ports, never match).
pub const BYPASS_MATCH_PORT: u8 = 1 << 0;

/// One bypass entry as the kernel sees it (its destination prefix is the trie key).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BypassEntry {
    /// Source prefix base (network order); with an all-zero mask: any source.
    pub src_addr: [u8; 4],
    /// Source prefix mask (network order).
    pub src_mask: [u8; 4],
    /// Host order. First destination port matched, with [`BYPASS_MATCH_PORT`].
    pub port_min: u16,
    /// Host order. Last destination port matched, with [`BYPASS_MATCH_PORT`].
    pub port_max: u16,
    /// IP protocol, 0 for any.
    pub proto: u8,
    /// `BYPASS_*` flags.
    pub flags: u8,
    /// Zero.
    pub _pad: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<BypassEntry>() == 16);

impl BypassEntry {
    /// Whether a packet from `src` of protocol `proto` to destination port `dport` (`None`:
    /// the packet carries no ports) matches. The destination was matched by the trie.
    #[inline(always)]
    pub const fn matches(&self, src: [u8; 4], proto: u8, dport: Option<u16>) -> bool {
        // 32-bit compares: this runs in a verifier-bounded loop, where every branch counts.
        let masked = u32::from_ne_bytes(src) & u32::from_ne_bytes(self.src_mask);
        if masked != u32::from_ne_bytes(self.src_addr) {
            return false;
        }
        if self.proto != 0 && self.proto != proto {
            return false;
        }
        if self.flags & BYPASS_MATCH_PORT == 0 {
            return true;
        }
        match dport {
            Some(p) => p >= self.port_min && p <= self.port_max,
            None => false,
        }
    }
}

/// Value of `BYPASS`: the entries that can apply to one destination prefix. Only the first
/// `len` are meaningful.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BypassSet {
    /// Number of valid entries.
    pub len: u32,
    /// The entries; any match bypasses (their order does not matter).
    pub entries: [BypassEntry; MAX_BYPASS_PER_SET],
}

const _: () = assert!(core::mem::size_of::<BypassSet>() == 4 + 16 * MAX_BYPASS_PER_SET);

impl BypassSet {
    /// Whether some entry matches (see [`BypassEntry::matches`]).
    #[inline(always)]
    pub fn matches(&self, src: [u8; 4], proto: u8, dport: Option<u16>) -> bool {
        let mut i = 0;
        while i < MAX_BYPASS_PER_SET {
            if i as u32 >= self.len {
                break;
            }
            if self.entries[i].matches(src, proto, dport) {
                return true;
            }
            i += 1;
        }
        false
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C), explicit padding, size asserted, every bit pattern valid.
    unsafe impl aya::Pod for BypassEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BypassSet {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(src: [u8; 4], mask: [u8; 4], proto: u8, ports: Option<(u16, u16)>) -> BypassEntry {
        BypassEntry {
            src_addr: src,
            src_mask: mask,
            port_min: ports.map_or(0, |p| p.0),
            port_max: ports.map_or(0, |p| p.1),
            proto,
            flags: if ports.is_some() {
                BYPASS_MATCH_PORT
            } else {
                0
            },
            _pad: [0; 2],
        }
    }

    #[test]
    fn source_protocol_and_port_all_must_match() {
        let probe = entry([168, 63, 129, 16], [255; 4], 0, None);
        assert!(probe.matches([168, 63, 129, 16], 6, Some(80)));
        assert!(probe.matches([168, 63, 129, 16], 47, None));
        assert!(!probe.matches([168, 63, 129, 17], 6, Some(80)));
        let ssh = entry([0; 4], [0; 4], 6, Some((22, 22)));
        assert!(ssh.matches([198, 18, 0, 2], 6, Some(22)));
        assert!(!ssh.matches([198, 18, 0, 2], 17, Some(22)));
        assert!(!ssh.matches([198, 18, 0, 2], 6, Some(23)));
        // Without ports (a later fragment) a port entry cannot decide, so it does not match.
        assert!(!ssh.matches([198, 18, 0, 2], 6, None));
    }

    #[test]
    fn len_bounds_the_walk() {
        let mut set = BypassSet {
            len: 1,
            ..Default::default()
        };
        set.entries[0] = entry([10, 0, 0, 0], [255, 0, 0, 0], 0, None);
        // entries[1] is all zero: would match anything if walked.
        assert!(!set.matches([198, 18, 0, 2], 6, Some(1)));
        assert!(set.matches([10, 1, 2, 3], 6, Some(1)));
    }
}
