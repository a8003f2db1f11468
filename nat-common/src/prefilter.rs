//! Prefilters for the rule tries: which addresses can match anything in a table at all.
//!
//! An LPM trie lookup is the dearest single step of a packet that matches nothing there (about
//! 25 ns on the reference machine, a third of what a stateless DNAT costs in the kernel). Most
//! lookups do match nothing: the SNAT check of every DNAT packet from the internet, the bypass
//! table, the reverse DNAT table for forward traffic. So each bank of each rule table has a
//! [`PrefixFilter`]: the table's prefixes themselves when there are at most [`FILTER_PREFIXES`],
//! checked with a few masked compares before the trie is asked. A table with more prefixes, or a
//! filter the agent has not written, always asks the trie: the filter may only ever skip a
//! lookup that would have found nothing.

/// Prefixes a filter lists; a table with more is always looked up.
pub const FILTER_PREFIXES: usize = 8;

/// A filter nothing has been written to (a new program generation, a bank not yet filled):
/// look the address up.
pub const FILTER_UNKNOWN: u32 = 0;
/// Look the address up only when one of the listed prefixes contains it.
pub const FILTER_LISTED: u32 = 1;
/// More prefixes than a filter holds: look every address up.
pub const FILTER_ALWAYS: u32 = 2;

/// The rule tables that have a filter, indexing [`BankFilters::tables`].
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterTable {
    /// `BYPASS`, by destination.
    Bypass = 0,
    /// `DNAT_FORWARD`, by destination.
    DnatForward = 1,
    /// `DNAT_REVERSE`, by source.
    DnatReverse = 2,
    /// `SNAT_RULES`, by source.
    Snat = 3,
}

/// Number of [`FilterTable`]s.
pub const FILTER_TABLES: usize = 4;

/// One prefix as the program compares it: `addr & mask == net`, all three as the address bytes
/// in network order read as a native `u32` (so no byte swapping is needed either side).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilterPrefix {
    /// The network address, host bits zero.
    pub net: u32,
    /// The netmask.
    pub mask: u32,
}

/// Which addresses can match anything in one bank of one rule table.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixFilter {
    /// [`FILTER_UNKNOWN`], [`FILTER_LISTED`] or [`FILTER_ALWAYS`].
    pub mode: u32,
    /// Prefixes in use in `prefixes` (at most [`FILTER_PREFIXES`]).
    pub len: u32,
    /// The table's prefixes, when `mode` is [`FILTER_LISTED`].
    pub prefixes: [FilterPrefix; FILTER_PREFIXES],
}

const _: () = assert!(core::mem::size_of::<PrefixFilter>() == 8 + 8 * FILTER_PREFIXES);
const _: () =
    assert!(core::mem::size_of::<BankFilters>() == FILTER_TABLES * (8 + 8 * FILTER_PREFIXES));

/// Value of `RULE_FILTERS` (an array indexed by bank): the filters of one bank's tables.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BankFilters {
    /// Indexed by [`FilterTable`].
    pub tables: [PrefixFilter; FILTER_TABLES],
}

impl PrefixFilter {
    /// A filter that sends every address to the table.
    pub const fn always() -> Self {
        PrefixFilter {
            mode: FILTER_ALWAYS,
            len: 0,
            prefixes: [FilterPrefix { net: 0, mask: 0 }; FILTER_PREFIXES],
        }
    }

    /// The filter of a table holding `prefixes` (address in network order, prefix length
    /// 0-32; longer lengths are taken as 32).
    pub fn of(prefixes: impl IntoIterator<Item = ([u8; 4], u8)>) -> Self {
        let mut filter = PrefixFilter {
            mode: FILTER_LISTED,
            ..PrefixFilter::default()
        };
        for (addr, len) in prefixes {
            if filter.len as usize == FILTER_PREFIXES {
                return PrefixFilter::always();
            }
            let mask = mask_of(len);
            filter.prefixes[filter.len as usize] = FilterPrefix {
                net: u32::from_ne_bytes(addr) & mask,
                mask,
            };
            filter.len += 1;
        }
        filter
    }

    /// Whether the table may hold a prefix containing `addr`: false only when it certainly
    /// does not.
    #[inline(always)]
    pub fn may_match(&self, addr: [u8; 4]) -> bool {
        if self.mode != FILTER_LISTED {
            return true;
        }
        let addr = u32::from_ne_bytes(addr);
        let mut i = 0;
        while i < FILTER_PREFIXES {
            if i as u32 >= self.len {
                break;
            }
            let p = &self.prefixes[i];
            if addr & p.mask == p.net {
                return true;
            }
            i += 1;
        }
        false
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), no implicit padding (sizes asserted), every bit pattern valid.
unsafe impl aya::Pod for BankFilters {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for PrefixFilter {}

/// The netmask of a prefix length, as a native `u32` of network-order bytes.
fn mask_of(len: u8) -> u32 {
    let bits = u32::from(len.min(32));
    let host_order = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    u32::from_ne_bytes(host_order.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn contains(addr: [u8; 4], net: [u8; 4], len: u8) -> bool {
        let bits = u32::from(len.min(32));
        let mask = if bits == 0 {
            0
        } else {
            u32::MAX << (32 - bits)
        };
        u32::from_be_bytes(addr) & mask == u32::from_be_bytes(net) & mask
    }

    #[test]
    fn an_empty_table_never_needs_a_lookup() {
        let f = PrefixFilter::of([]);
        assert!(!f.may_match([0, 0, 0, 0]));
        assert!(!f.may_match([198, 51, 100, 7]));
    }

    #[test]
    fn an_unwritten_filter_always_asks_the_trie() {
        assert!(PrefixFilter::default().may_match([203, 0, 113, 1]));
    }

    #[test]
    fn a_default_route_matches_everything() {
        let f = PrefixFilter::of([([0, 0, 0, 0], 0)]);
        assert!(f.may_match([203, 0, 113, 1]));
        assert!(f.may_match([255, 255, 255, 255]));
    }

    #[test]
    fn host_bits_of_a_listed_prefix_are_ignored() {
        let f = PrefixFilter::of([([198, 18, 7, 99], 24)]);
        assert!(f.may_match([198, 18, 7, 1]));
        assert!(!f.may_match([198, 18, 8, 1]));
    }

    #[test]
    fn more_prefixes_than_it_holds_means_always_look_up() {
        let f = PrefixFilter::of((0..=FILTER_PREFIXES as u8).map(|i| ([198, 18, i, 0], 24)));
        assert_eq!(f.mode, FILTER_ALWAYS);
        assert!(f.may_match([8, 8, 8, 8]));
    }

    proptest! {
        /// No false negatives, and for a listed table no false positives either: the filter
        /// answers exactly "some prefix contains the address".
        #[test]
        fn listed_filters_answer_exactly(
            prefixes in proptest::collection::vec((any::<[u8; 4]>(), 0u8..=32), 0..=FILTER_PREFIXES + 2),
            probes in proptest::collection::vec(any::<[u8; 4]>(), 1..32),
        ) {
            let f = PrefixFilter::of(prefixes.iter().copied());
            // Probes inside each prefix as well as random ones.
            let inside = prefixes.iter().map(|(net, _)| *net);
            for addr in probes.into_iter().chain(inside) {
                let truth = prefixes.iter().any(|&(net, len)| contains(addr, net, len));
                if truth {
                    prop_assert!(f.may_match(addr));
                }
                if prefixes.len() <= FILTER_PREFIXES {
                    prop_assert_eq!(f.may_match(addr), truth);
                }
            }
        }
    }
}
