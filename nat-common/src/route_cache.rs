//! The forwarding stage's route cache: the kernel's FIB answers, remembered per CPU.
//!
//! Asking the FIB (`bpf_fib_lookup`: route, neighbour, MTU) is the dearest step of a forwarded
//! packet: about 100 ns on the reference machine, a quarter of everything the appliance spends
//! on a translated DNAT packet. Its answer depends only on the question (ingress interface,
//! source, destination, TOS, protocol, length) and on the kernel's routing state. So the program
//! keeps the last successful answer per question in a small direct-mapped table per CPU
//! ([`RouteCacheEntry`], map `ROUTE_CACHE`) and reuses it while the routing state has not
//! changed.
//!
//! The FIB stays the single source of truth; the cache is only ever a copy of its answer:
//! - The agent listens to the kernel's routing notifications (links, addresses, routes, rules,
//!   neighbours, forwarding settings) and bumps the **generation** (`ROUTE_CACHE_GEN`) on each.
//!   An entry is used only while it carries the current generation, and an entry is stamped with
//!   the generation read *before* its FIB question was asked, so a change racing the question
//!   invalidates it.
//! - Generation [`GENERATION_OFF`] (a program whose agent has not started listening, or has
//!   stopped) turns the cache off: every packet asks the FIB, as before the cache existed.
//! - Each entry is used at most [`ENTRY_USES`] times before the FIB is asked again: a bound on
//!   staleness for whatever the notifications do not cover (a path-MTU exception learned by the
//!   kernel, an agent that died without turning the cache off).
//! - A packet longer than the longest the FIB said fits this route asks again (the MTU check
//!   is part of the answer).

/// Entries per CPU in `ROUTE_CACHE` (a power of two: the slot is a masked hash).
pub const ROUTE_CACHE_SLOTS: u32 = 4_096;

/// Times an entry is used before the FIB is asked again, whatever the generation says.
pub const ENTRY_USES: u16 = 1_024;

/// The generation meaning "cache off".
pub const GENERATION_OFF: u32 = 0;

/// What the forwarding stage's route question came to, indexing the per-CPU counters
/// `ROUTE_COUNTERS` (packets forwarded from XDP or handed on; others never ask).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteCacheResult {
    /// Answered from the cache: no FIB lookup.
    Hit = 0,
    /// Asked the FIB and remembered its answer.
    Filled = 1,
}

impl RouteCacheResult {
    /// Number of results; the size of `ROUTE_COUNTERS`.
    pub const COUNT: u32 = 2;

    /// Every result in index order.
    pub const ALL: [RouteCacheResult; Self::COUNT as usize] =
        [RouteCacheResult::Hit, RouteCacheResult::Filled];

    /// The metrics label value.
    pub const fn name(self) -> &'static str {
        match self {
            RouteCacheResult::Hit => "hit",
            RouteCacheResult::Filled => "filled",
        }
    }
}

/// One remembered FIB answer (value of the per-CPU array `ROUTE_CACHE`). The question is
/// compared field by field, so two questions sharing a slot never share an answer.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteCacheEntry {
    /// The generation the answer was asked under ([`GENERATION_OFF`]: empty).
    pub generation: u32,
    /// Question: the ingress interface index.
    pub ingress: u32,
    /// Question: source address (network order, as in the packet).
    pub src: [u8; 4],
    /// Question: destination address (network order).
    pub dst: [u8; 4],
    /// Answer: the egress interface index.
    pub egress: u32,
    /// Question: the IPv4 TOS byte.
    pub tos: u8,
    /// Question: the IP protocol.
    pub proto: u8,
    /// The longest IPv4 total length the FIB said fits this route (its MTU check passed).
    pub fits_len: u16,
    /// Uses left before the FIB is asked again.
    pub uses_left: u16,
    /// Answer: the next hop's MAC address.
    pub dmac: [u8; 6],
    /// Answer: the egress interface's MAC address.
    pub smac: [u8; 6],
    /// Explicit padding (keeps the size a multiple of 4 with no implicit holes).
    pub _pad: u16,
}

const _: () = assert!(core::mem::size_of::<RouteCacheEntry>() == 40);

#[cfg(feature = "user")]
// SAFETY: repr(C), only integers and byte arrays, no implicit padding (size asserted).
unsafe impl aya::Pod for RouteCacheEntry {}

/// The slot of a question: a multiplicative hash of its fields, masked to
/// [`ROUTE_CACHE_SLOTS`] by keeping the top bits. Addresses are the packet's bytes read as native `u32`s (what the
/// program has at hand); the slot only spreads questions, the entry's fields decide.
#[inline(always)]
pub fn slot(ingress: u32, src: u32, dst: u32, tos: u8, proto: u8) -> u32 {
    // Fibonacci hashing: the top bits of a product with an odd 64-bit constant depend on
    // every bit of the input, so hosts of one subnet (which differ in the low bits of the
    // address, the high bits of its native-order u32) land in distinct slots.
    const K1: u64 = 0x9e37_79b9_7f4a_7c15;
    const K2: u64 = 0xbf58_476d_1ce4_e5b9;
    let rest = (u64::from(ingress) << 16 | u64::from(tos) << 8 | u64::from(proto)).wrapping_mul(K2);
    let mixed = ((u64::from(src) << 32 | u64::from(dst)) ^ rest).wrapping_mul(K1);
    (mixed >> (64 - ROUTE_CACHE_SLOTS.trailing_zeros())) as u32
}

/// The generation after `current`: never [`GENERATION_OFF`], which would turn the cache off.
pub const fn next_generation(current: u32) -> u32 {
    match current.wrapping_add(1) {
        GENERATION_OFF => GENERATION_OFF + 1,
        next => next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn the_generation_never_wraps_to_off() {
        assert_eq!(next_generation(GENERATION_OFF), 1);
        assert_eq!(next_generation(41), 42);
        assert_eq!(next_generation(u32::MAX), 1);
    }

    #[test]
    fn slots_are_powers_of_two_masks() {
        assert!(ROUTE_CACHE_SLOTS.is_power_of_two());
    }

    /// The hosts of one /20 towards one gateway (the common shape: many clients of one
    /// subnet) must not pile up in a few slots, or the cache would thrash where it is needed.
    #[test]
    fn one_subnet_spreads_over_the_slots() {
        let used: BTreeSet<u32> = (0u32..4096)
            .map(|host| {
                let src = u32::from_be_bytes([198, 18, 0, 0]) | host;
                slot(3, src.to_be(), u32::from_ne_bytes([198, 51, 100, 7]), 0, 17)
            })
            .collect();
        // A uniform hash of 4096 keys into 4096 slots fills about 63% of them.
        assert!(used.len() > 2_400, "only {} of 4096 slots used", used.len());
    }

    proptest! {
        #[test]
        fn a_slot_is_always_in_range(ingress: u32, src: u32, dst: u32, tos: u8, proto: u8) {
            prop_assert!(slot(ingress, src, dst, tos, proto) < ROUTE_CACHE_SLOTS);
        }

        #[test]
        fn the_generation_after_any_is_not_off(current: u32) {
            prop_assert_ne!(next_generation(current), GENERATION_OFF);
            prop_assert_ne!(next_generation(current), current);
        }
    }
}
