//! The session filter: which packets cannot belong to any session, decided without asking the
//! session tables.
//!
//! Every trackable packet first asks whether it belongs to a known flow (sessions before rules,
//! as conntrack does): a `SESSIONS` lookup and, on a miss, a `REPLIES` lookup. For traffic that
//! is nearly never a session's (stateless DNAT both ways, packets nothing matches) both lookups
//! miss, and they were the largest cost left on a forwarded DNAT packet.
//!
//! The filter is a counting filter over the destination endpoint (address, port or echo id,
//! protocol) of every key in the two tables: `SESSION_FILTER` holds, per [`slot`], how many
//! `SESSIONS` entries and how many `REPLIES` entries have a key that falls in it, in the two
//! halves of one 64-bit word ([`Counted`]). A packet skips each lookup whose table counts zero
//! in its slot: stateless DNAT and unmatched traffic skip both; the reply of an SNAT flow, whose
//! destination is the NAT's external endpoint (never a session's original destination), skips
//! the `SESSIONS` miss that used to come before its `REPLIES` hit. A slot shared with some
//! other key only costs the lookups, as before. With many sessions (an SNAT box with a busy
//! pool) every slot is in use and the filter changes nothing.
//!
//! The counts must never be lower than the entries, so every writer keeps them:
//! - the program adds one to a key's slot (in its table's half) **before** inserting the
//!   entry, and takes it back when the insert fails. A packet that reads the count before the add misses the entry it
//!   would also have missed a moment earlier, and goes on to create the flow, which finds it;
//! - whoever deletes an entry (the agent's sweep and API, a benchmark's clean-up) takes one
//!   from its slot **after** a successful delete;
//! - both sides change a count only with atomic adds on the same memory (the array is mmapable,
//!   see `nat-agent/src/dataplane/session_filter.rs`), and the map is pinned with the tables it
//!   counts, so the counts survive a restart with them.
//!
//! A count higher than its entries (a delete whose decrement was lost to a crash) only costs
//! lookups.

use crate::conntrack::FlowKey;

/// Bits of a slot number.
pub const SESSION_FILTER_BITS: u32 = 16;
/// Slots in `SESSION_FILTER` (a power of two: the slot is the top bits of a hash).
pub const SESSION_FILTER_SLOTS: u32 = 1 << SESSION_FILTER_BITS;

/// Which table a count stands for: each has its half of the slot's 64-bit counter, so one
/// read answers for both tables. A half never overflows (a table holds fewer than 2^32
/// entries) and never goes below zero (only what was added is taken back), so adding to one
/// half never carries into the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// `SESSIONS` keys: the low half.
    Sessions,
    /// `REPLIES` keys: the high half.
    Replies,
}

impl Counted {
    /// What one key of this table adds to its slot's counter.
    #[inline(always)]
    pub const fn unit(self) -> u64 {
        match self {
            Counted::Sessions => 1,
            Counted::Replies => 1 << 32,
        }
    }

    /// This table's count in a slot's counter.
    #[inline(always)]
    pub const fn count_in(self, counter: u64) -> u32 {
        match self {
            Counted::Sessions => counter as u32,
            Counted::Replies => (counter >> 32) as u32,
        }
    }
}

/// The filter slot of a session-table key: a hash of its destination address, destination port
/// (or echo id) and protocol. The source is left out on purpose: stateless DNAT traffic to one
/// VIP and port comes from everywhere, and must find its one slot empty.
#[inline(always)]
pub fn slot(key: &FlowKey) -> u32 {
    let addr = u32::from_be_bytes(key.dst) as u64;
    let port = u16::from_be_bytes(key.dport) as u64;
    let word = (addr << 32) | (port << 8) | key.proto as u64;
    // The finaliser of SplitMix64: every input bit reaches every output bit, so VIPs that
    // differ in one octet and ports that differ in one bit land far apart. (A single
    // multiplicative step left whole runs of neighbouring VIPs on shared slots.)
    let mut x = word;
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    (x >> (64 - SESSION_FILTER_BITS)) as u32
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::BTreeSet;

    use super::*;
    use crate::ipv4::proto;
    use proptest::prelude::*;

    fn key(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, protocol: u8) -> FlowKey {
        FlowKey::new(src, dst, sport.to_be_bytes(), dport.to_be_bytes(), protocol)
    }

    proptest! {
        /// The source never moves a key to another slot, and every slot is in range.
        #[test]
        fn the_slot_depends_on_the_destination_only(
            src_a in any::<[u8; 4]>(),
            src_b in any::<[u8; 4]>(),
            sport_a in any::<u16>(),
            sport_b in any::<u16>(),
            dst in any::<[u8; 4]>(),
            dport in any::<u16>(),
        ) {
            let a = slot(&key(src_a, dst, sport_a, dport, proto::UDP));
            let b = slot(&key(src_b, dst, sport_b, dport, proto::UDP));
            prop_assert_eq!(a, b);
            prop_assert!(a < SESSION_FILTER_SLOTS);
        }
    }

    /// The destinations stateless DNAT sees (a few VIPs, well-known ports, both protocols)
    /// spread over distinct slots, so one VIP's sessions do not cost another VIP its skip.
    #[test]
    fn neighbouring_vips_and_ports_spread() {
        let mut slots = BTreeSet::new();
        let mut keys = 0;
        for last in 0..=255u8 {
            for port in [53u16, 80, 443, 8080] {
                for protocol in [proto::TCP, proto::UDP] {
                    slots.insert(slot(&key([0; 4], [203, 0, 113, last], 0, port, protocol)));
                    keys += 1;
                }
            }
        }
        // 2048 keys into 65536 slots: a uniform hash collides about 31 times.
        assert!(
            slots.len() >= keys - 64,
            "{} distinct slots for {keys} keys",
            slots.len()
        );
    }

    proptest! {
        /// Adding and taking back units in any order keeps each table's count in its half.
        #[test]
        fn the_two_halves_count_apart(sessions in 0u32..100_000, replies in 0u32..100_000) {
            let counter = sessions as u64 * Counted::Sessions.unit()
                + replies as u64 * Counted::Replies.unit();
            prop_assert_eq!(Counted::Sessions.count_in(counter), sessions);
            prop_assert_eq!(Counted::Replies.count_in(counter), replies);
            if sessions > 0 {
                let less = counter.wrapping_add(Counted::Sessions.unit().wrapping_neg());
                prop_assert_eq!(Counted::Sessions.count_in(less), sessions - 1);
                prop_assert_eq!(Counted::Replies.count_in(less), replies);
            }
            if replies > 0 {
                let less = counter.wrapping_add(Counted::Replies.unit().wrapping_neg());
                prop_assert_eq!(Counted::Sessions.count_in(less), sessions);
                prop_assert_eq!(Counted::Replies.count_in(less), replies - 1);
            }
        }
    }

    /// One external address's ports (the reply keys of an SNAT pool) spread too.
    #[test]
    fn the_ports_of_one_address_spread() {
        let slots: BTreeSet<u32> = (1024..=u16::MAX)
            .map(|port| slot(&key([0; 4], [198, 51, 100, 7], 0, port, proto::UDP)))
            .collect();
        assert!(slots.len() > 35_000, "{} distinct slots", slots.len());
    }
}
