//! The fragment cache: how later fragments of a datagram get the translation its first
//! fragment got.
//!
//! Only the first fragment (offset 0) carries the TCP/UDP/ICMP header, so only it can be
//! looked up in the sessions and rules. When it is translated, the program remembers the new
//! addresses under the datagram's identity as it arrived (source, destination, protocol, IP
//! id); later fragments (offset > 0) look that up and get the same addresses. They carry no L4
//! header, so only the IP addresses and the IP header checksum change: the L4 checksum lives in
//! the first fragment, whose incremental update already accounts for the new pseudo-header of
//! the whole datagram.
//!
//! The cache is an LRU hash: eviction under a flood only means a later fragment finds nothing
//! and takes the path an unmatched fragment takes (never a guess). Entries older than
//! [`FRAG_MAX_AGE_NS`] are ignored: IP ids wrap, and a stale entry must not translate a new
//! datagram that happens to reuse the id.

/// Key of `FRAGMENTS`: a datagram as it arrived.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    /// Source address, network order.
    pub src: [u8; 4],
    /// Destination address, network order.
    pub dst: [u8; 4],
    /// IP identification, network order.
    pub id: [u8; 2],
    /// IP protocol.
    pub proto: u8,
    /// Zero.
    pub _pad: u8,
}

const _: () = assert!(core::mem::size_of::<FragKey>() == 12);

/// [`FragEntry::flags`]: the first fragment travelled in the reply direction of its flow (rule
/// counters count later fragments in the same direction).
pub const FRAG_REPLY: u8 = 1 << 0;

/// Value of `FRAGMENTS`: what the first fragment of a datagram became.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FragEntry {
    /// New source address, network order.
    pub src: [u8; 4],
    /// New destination address, network order.
    pub dst: [u8; 4],
    /// Counter slot of the first rule that translated the first fragment, or
    /// `conntrack::NO_RULE`.
    pub rule: u32,
    /// Counter slot of a second rule (DNAT + SNAT sessions), or `conntrack::NO_RULE`.
    pub rule2: u32,
    /// `bpf_ktime_get_boot_ns` when the first fragment was translated.
    pub created_ns: u64,
    /// `FRAG_*` flags.
    pub flags: u8,
    /// Zero.
    pub _pad: [u8; 7],
}

const _: () = assert!(core::mem::size_of::<FragEntry>() == 32);

/// How long a remembered first fragment translates later fragments: a datagram's fragments
/// arrive within microseconds of each other on any sane path; the kernel's own reassembly
/// gives up after 30 s (`ipfrag_time`), far longer than a cache keyed by a 16-bit id should
/// trust an entry.
pub const FRAG_MAX_AGE_NS: u64 = 5_000_000_000;

/// Whether an entry created at `created_ns` still translates at `now_ns`.
#[inline(always)]
pub const fn frag_entry_fresh(created_ns: u64, now_ns: u64) -> bool {
    now_ns >= created_ns && now_ns - created_ns <= FRAG_MAX_AGE_NS
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C), explicit padding, size asserted, every bit pattern valid.
    unsafe impl aya::Pod for FragKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FragEntry {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_after_the_max_age_and_never_count_as_fresh_from_the_future() {
        assert!(frag_entry_fresh(10, 10));
        assert!(frag_entry_fresh(10, 10 + FRAG_MAX_AGE_NS));
        assert!(!frag_entry_fresh(10, 11 + FRAG_MAX_AGE_NS));
        assert!(!frag_entry_fresh(20, 10));
    }
}
