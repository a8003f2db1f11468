//! The free-port index: a two-level bitmap of the ports claimed on one external address for
//! one protocol, so a new flow finds a free port in a bounded, nearly constant number of steps
//! whatever the pool's use (issue 3), instead of probing `BINDINGS` at random.
//!
//! Layout ([`PortBitmap`]): bit `p & 63` of `words[p >> 6]` is set when port `p` is claimed;
//! bit `w & 63` of `summary[w >> 6]` is set when word `w` is full (all 64 ports claimed); bit
//! `s` of `top` is set when summary word `s` is full (4096 ports). A search reads the top word,
//! a few summary words and a few port words, with no loop longer than three steps: the
//! verifier walks it cheaply.
//!
//! `BINDINGS` stays the single source of truth: a port is claimed only by inserting its
//! binding if absent. The bitmap is a hint that may be stale either way, and heals:
//! - a set bit for a free port hides the port until the agent's sweep clears it (capacity lost
//!   for a while, never a wrong translation);
//! - a clear bit for a taken port costs one failed insert, after which the kernel sets it.
//!
//! Who writes: the kernel sets bits (atomic OR) after every claim and every insert that found
//! the port taken, and clears the bit of a claim it gives back (atomic AND); the agent creates
//! the bitmaps (the kernel cannot allocate 8 KiB), clears the bit of every binding it deletes,
//! and reconciles every bitmap with `BINDINGS` once per sweep pass. See
//! `nat-agent/src/dataplane/ports.rs` for the race analysis.
//!
//! The search logic here is pure and generic over [`PortBits`], so the host tests check it
//! exhaustively and the kernel runs the same code on its map memory.

/// 64-bit words holding one bit per port (65536 ports).
pub const PORT_WORDS: usize = 1024;
/// 64-bit summary words holding one bit per port word ("this word is full").
pub const SUMMARY_WORDS: usize = 16;

/// Most free-port index slots (`PORT_BITMAPS` entries): external address and protocol pairs
/// with an index. A pool of 64 addresses takes 192 (TCP, UDP, ICMP); pairs beyond this fall
/// back to probing. 8320 bytes each, preallocated: 4.1 MiB.
pub const MAX_PORT_SPACES: u32 = 512;

/// Most index searches (each followed by one claim) one new flow makes before it gives up
/// (`Reason::PortsContended`): each failed claim sets the bit it found stale, so this many
/// failures in a row means other CPUs are claiming the same ports right now. The kernel
/// retries by tail-calling its claim program again: one search per program run keeps the
/// verifier's work small.
pub const MAX_CLAIM_TRIES: u32 = 8;

/// Key of `PORT_SPACES`: one external address and protocol, the unit ports are claimed in.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortSpace {
    /// External address, network order.
    pub addr: [u8; 4],
    /// IP protocol.
    pub proto: u8,
    /// Zero.
    pub _pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<PortSpace>() == 8);

impl PortSpace {
    /// The space of `addr` (network order) and `proto`.
    #[inline(always)]
    pub const fn new(addr: [u8; 4], proto: u8) -> Self {
        // Two words rather than a literal: see `FlowKey::new` (no `memset` call in BPF).
        let words = [
            u32::from_ne_bytes(addr),
            u32::from_ne_bytes([proto, 0, 0, 0]),
        ];
        // SAFETY: PortSpace is repr(C), 8 bytes without implicit padding (asserted above), any
        // bit pattern valid; the words hold its fields in declaration order.
        unsafe { core::mem::transmute::<[u32; 2], PortSpace>(words) }
    }
}

/// Value of `PORT_BITMAPS` (an mmapable array): the claimed ports of one [`PortSpace`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortBitmap {
    /// Bit `p & 63` of word `p >> 6`: port `p` is claimed.
    pub words: [u64; PORT_WORDS],
    /// Bit `w & 63` of word `w >> 6`: port word `w` is full.
    pub summary: [u64; SUMMARY_WORDS],
    /// Bit `s`: summary word `s` is full (its 64 port words are).
    pub top: u64,
}

const _: () = assert!(core::mem::size_of::<PortBitmap>() == 8 * (PORT_WORDS + SUMMARY_WORDS + 1));

impl Default for PortBitmap {
    fn default() -> Self {
        PortBitmap {
            words: [0; PORT_WORDS],
            summary: [0; SUMMARY_WORDS],
            top: 0,
        }
    }
}

/// Read access to a bitmap; indexes are masked by the callers' own bounds.
pub trait PortBits {
    /// Port word `w` (`w < PORT_WORDS`).
    fn word(&self, w: u32) -> u64;
    /// Summary word `s` (`s < SUMMARY_WORDS`).
    fn summary(&self, s: u32) -> u64;
    /// The top word (bit `s`: summary word `s` is full).
    fn top(&self) -> u64;
}

impl PortBits for PortBitmap {
    #[inline(always)]
    fn word(&self, w: u32) -> u64 {
        self.words[(w as usize) & (PORT_WORDS - 1)]
    }
    #[inline(always)]
    fn summary(&self, s: u32) -> u64 {
        self.summary[(s as usize) & (SUMMARY_WORDS - 1)]
    }
    #[inline(always)]
    fn top(&self) -> u64 {
        self.top
    }
}

/// The word of port `p`.
#[inline(always)]
pub const fn word_of(port: u16) -> u32 {
    (port >> 6) as u32
}

/// The bit of port `p` in its word.
#[inline(always)]
pub const fn bit_of(port: u16) -> u64 {
    1u64 << (port & 63)
}

/// The bits `0..n` (all 64 when `n >= 64`). Shifts by 64 are avoided: they are undefined in
/// BPF and wrap in Rust release builds.
#[inline(always)]
const fn low_bits(n: u32) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

/// Index of the lowest set bit of `x` (`x != 0`). Done by hand as a population count of the
/// bits below it: the BPF backend has no count-trailing-zeros instruction, and LLVM's
/// expansion may use a lookup table in a constant pool, which BPF cannot load.
#[inline(always)]
pub const fn lowest_bit(x: u64) -> u32 {
    let mut v = (x & x.wrapping_neg()).wrapping_sub(1);
    v = v - ((v >> 1) & 0x5555_5555_5555_5555);
    v = (v & 0x3333_3333_3333_3333) + ((v >> 2) & 0x3333_3333_3333_3333);
    v = (v + (v >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    (v.wrapping_mul(0x0101_0101_0101_0101) >> 56) as u32
}

/// The first clear bit of word `w` for a port in `from..=max` (and at or above `min`).
#[inline(always)]
fn free_in_word<B: PortBits + ?Sized>(
    bits: &B,
    w: u32,
    min: u16,
    max: u16,
    from: u16,
) -> Option<u16> {
    let base = w << 6;
    let lo = if (from as u32) > base {
        from as u32
    } else {
        base
    };
    let lo = if (min as u32) > lo { min as u32 } else { lo };
    let hi = if (max as u32) < base + 63 {
        max as u32
    } else {
        base + 63
    };
    if lo > hi {
        return None;
    }
    let mask = low_bits(hi - base + 1) & !low_bits(lo - base);
    let free = !bits.word(w) & mask;
    if free == 0 {
        return None;
    }
    Some((base + (lowest_bit(free) & 63)) as u16)
}

/// The first free port of summary word `s`, through its non-full words among
/// `interior..interior_end` (words wholly inside the window) and `allowed` (a mask over the
/// summary word's 64 words). A full word the summary does not mark (transient, see the
/// module docs) costs one more read; a second one ends the look at this summary word.
#[inline(always)]
fn free_in_summary<B: PortBits + ?Sized>(
    bits: &B,
    s: u32,
    interior: u32,
    interior_end: u32,
    allowed: u64,
) -> Option<u16> {
    let base = s << 6;
    let lo = interior.saturating_sub(base);
    let hi = if interior_end < base + 64 {
        interior_end.saturating_sub(base)
    } else {
        64
    };
    if lo >= hi {
        return None;
    }
    let candidates = !bits.summary(s) & low_bits(hi) & !low_bits(lo) & allowed;
    if candidates == 0 {
        return None;
    }
    let w = base + (lowest_bit(candidates) & 63);
    let free = !bits.word(w);
    if free != 0 {
        return Some(((w << 6) + (lowest_bit(free) & 63)) as u16);
    }
    let rest = candidates & candidates.wrapping_sub(1);
    if rest == 0 {
        return None;
    }
    let w = base + (lowest_bit(rest) & 63);
    let free = !bits.word(w);
    if free != 0 {
        return Some(((w << 6) + (lowest_bit(free) & 63)) as u16);
    }
    None
}

/// A free port in `min..=max` by the bitmap, searched from `start` upwards and wrapping
/// (`start` outside the window counts as `min`); `None` when the bitmap shows every port of
/// the window claimed. With consistent summaries (a summary bit set exactly for full words, a
/// top bit exactly for full summary words) it finds a clear bit if and only if one exists in
/// the window.
///
/// Order: the start's word from the start up; the following words of the start's summary
/// word; the next summary words the top word shows non-full (the first after the start's,
/// wrapping); the start's summary word below the start; the partial edge words of the window;
/// the start's word below the start. Words wholly inside the window are found through the
/// summaries; the (at most two) partial edge words, which can be non-full without a free port
/// inside the window, are read directly so a summary never misleads. Summary words that
/// reach past the window can be non-full without a free word inside it: there are at most
/// two, so three tries reach a summary word wholly inside it.
#[inline(always)]
pub fn find_free<B: PortBits + ?Sized>(bits: &B, min: u16, max: u16, start: u16) -> Option<u16> {
    if min > max {
        return None;
    }
    let start = if start < min || start > max {
        min
    } else {
        start
    };
    let ws = word_of(start);
    if let Some(p) = free_in_word(bits, ws, min, max, start) {
        return Some(p);
    }
    let wmin = word_of(min);
    let wmax = word_of(max);
    // Words wholly inside the window: interior..interior_end.
    let interior = wmin + (min & 63 != 0) as u32;
    let interior_end = wmax + (max & 63 == 63) as u32;
    let s0 = ws >> 6;
    let above_ws = !low_bits((ws & 63) + 1);
    if let Some(p) = free_in_summary(bits, s0, interior, interior_end, above_ws) {
        return Some(p);
    }
    // Summary words meeting the interior, other than the start's.
    let smin = interior >> 6;
    let send = (interior_end + 63) >> 6;
    let mut others = !bits.top() & low_bits(send) & !low_bits(smin) & !(1u64 << s0);
    let after_s0 = !low_bits(s0 + 1);
    let mut tries = 0;
    while tries < 3 {
        tries += 1;
        let later = others & after_s0;
        let pick = if later != 0 { later } else { others };
        if pick == 0 {
            break;
        }
        let s = lowest_bit(pick) & (SUMMARY_WORDS as u32 - 1);
        if let Some(p) = free_in_summary(bits, s, interior, interior_end, u64::MAX) {
            return Some(p);
        }
        others &= !(1u64 << s);
    }
    if let Some(p) = free_in_summary(bits, s0, interior, interior_end, low_bits(ws & 63)) {
        return Some(p);
    }
    if let Some(p) = free_in_word(bits, wmin, min, max, min) {
        return Some(p);
    }
    if let Some(p) = free_in_word(bits, wmax, min, max, min) {
        return Some(p);
    }
    free_in_word(bits, ws, min, max, min)
}

/// Whether port word `word` is full.
#[inline(always)]
pub const fn is_full(word: u64) -> bool {
    word == u64::MAX
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C), explicit padding, size asserted, any bit pattern valid.
    unsafe impl aya::Pod for PortSpace {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortBitmap {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A bitmap built from a set of claimed ports, with a consistent summary.
    fn bitmap(claimed: impl IntoIterator<Item = u16>) -> PortBitmap {
        let mut b = PortBitmap::default();
        for p in claimed {
            b.words[word_of(p) as usize] |= bit_of(p);
        }
        for w in 0..PORT_WORDS {
            if is_full(b.words[w]) {
                b.summary[w >> 6] |= 1 << (w & 63);
            }
        }
        for s in 0..SUMMARY_WORDS {
            if is_full(b.summary[s]) {
                b.top |= 1 << s;
            }
        }
        b
    }

    fn is_claimed(b: &PortBitmap, p: u16) -> bool {
        b.words[word_of(p) as usize] & bit_of(p) != 0
    }

    #[test]
    fn lowest_bit_of_every_single_bit_and_mixtures() {
        for i in 0..64 {
            assert_eq!(lowest_bit(1 << i), i);
            assert_eq!(lowest_bit(u64::MAX << i), i);
        }
        assert_eq!(lowest_bit(0b1011_0000), 4);
    }

    #[test]
    fn empty_bitmap_gives_the_start() {
        let b = PortBitmap::default();
        assert_eq!(find_free(&b, 1024, 65535, 40000), Some(40000));
        assert_eq!(find_free(&b, 1024, 65535, 5), Some(1024));
        assert_eq!(find_free(&b, 0, 65535, 65535), Some(65535));
    }

    #[test]
    fn the_one_free_port_of_a_small_range_is_found_from_every_start() {
        for free in 1024..=1279u16 {
            let b = bitmap((1024..=1279).filter(|&p| p != free));
            for start in (1024..=1279).step_by(17) {
                assert_eq!(find_free(&b, 1024, 1279, start), Some(free));
            }
        }
        let full = bitmap(1024..=1279);
        assert_eq!(find_free(&full, 1024, 1279, 1100), None);
    }

    #[test]
    fn the_one_free_port_of_the_default_range_is_found() {
        for free in [1024u16, 1087, 1088, 30000, 65472, 65535] {
            let b = bitmap((1024..=65535).filter(|&p| p != free));
            for start in [1024u16, 2000, 40000, 65535] {
                assert_eq!(
                    find_free(&b, 1024, 65535, start),
                    Some(free),
                    "free {free} start {start}"
                );
            }
        }
        assert_eq!(find_free(&bitmap(1024..=65535), 1024, 65535, 2000), None);
    }

    #[test]
    fn ports_outside_the_window_are_never_returned() {
        // Everything in the window claimed, everything around it free.
        let b = bitmap(2000..=2100);
        assert_eq!(find_free(&b, 2000, 2100, 2050), None);
        assert_eq!(find_free(&b, 1990, 2100, 2050), Some(1990));
        assert_eq!(find_free(&b, 2000, 2101, 2050), Some(2101));
    }

    #[test]
    fn search_goes_upwards_from_the_start_and_wraps() {
        let b = bitmap([40000u16, 40001]);
        assert_eq!(find_free(&b, 1024, 65535, 40000), Some(40002));
        let b = bitmap(40000..=65535);
        assert_eq!(find_free(&b, 1024, 65535, 50000), Some(1024));
    }

    #[test]
    fn a_stale_summary_costs_capacity_never_a_claimed_port() {
        // Words 100..=103 (ports 6400..=6655): 101 empty but marked full, the others full.
        let mut b = bitmap((6400..=6463).chain(6528..=6655));
        b.summary[1] |= 1 << (101 - 64);
        assert_eq!(find_free(&b, 6400, 6655, 6400), None, "word 101 is hidden");
        // Once repaired, its ports are found again.
        b.summary[1] &= !(1 << (101 - 64));
        assert_eq!(find_free(&b, 6400, 6655, 6400), Some(6464));
        // Word 101 full but not marked full: the search reads it and goes on.
        let mut stale = bitmap((6400..=6527).chain(6529..=6655));
        stale.summary[1] &= !(1 << (101 - 64));
        assert_eq!(find_free(&stale, 6400, 6655, 6400), Some(6528));
    }

    proptest! {
        /// With a consistent summary, the search finds a port iff the window has a free one,
        /// and what it finds is free and inside the window.
        #[test]
        fn finds_a_free_port_iff_one_exists(
            min in any::<u16>(),
            span in prop_oneof![0u16..300, 0u16..=u16::MAX],
            start in any::<u16>(),
            density in 0u32..=100,
            seed in any::<u64>(),
            holes in proptest::collection::vec(any::<u16>(), 0..3),
        ) {
            let max = min.saturating_add(span);
            // Claim ports in and around the window with the given density (deterministic).
            let lo = min.saturating_sub(70);
            let hi = max.saturating_add(70);
            let mut x = seed | 1;
            let mut claimed = Vec::new();
            for p in lo..=hi {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                if (x % 100) < density as u64 {
                    claimed.push(p);
                }
            }
            let mut b = bitmap(claimed);
            // Punch a few holes anywhere so nearly-full windows are common too.
            for h in holes {
                let p = min.saturating_add(h % span.saturating_add(1).max(1));
                b.words[word_of(p) as usize] &= !bit_of(p);
                b.summary[(word_of(p) >> 6) as usize] &= !(1 << (word_of(p) & 63));
                b.top &= !(1 << (word_of(p) >> 6));
            }
            let exists = (min..=max).any(|p| !is_claimed(&b, p));
            match find_free(&b, min, max, start) {
                Some(p) => {
                    prop_assert!(p >= min && p <= max, "{} outside {}..={}", p, min, max);
                    prop_assert!(!is_claimed(&b, p), "{} is claimed", p);
                }
                None => prop_assert!(!exists, "a free port exists in {}..={}", min, max),
            }
        }

        /// Without claims in the window, the start itself is returned.
        #[test]
        fn an_empty_window_returns_the_start(min in any::<u16>(), span in any::<u16>(), start in any::<u16>()) {
            let max = min.saturating_add(span);
            let b = PortBitmap::default();
            let want = if start < min || start > max { min } else { start };
            prop_assert_eq!(find_free(&b, min, max, start), Some(want));
        }
    }
}
