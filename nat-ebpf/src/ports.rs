//! The kernel's side of the free-port index (`nat_common::ports`): finding the bitmap of an
//! external address and protocol, reading it, and setting and clearing bits with BPF atomics
//! (other CPUs and the agent write the same words concurrently).

use nat_common::ports::{
    bit_of, is_full, word_of, PortBitmap, PortBits, PortSpace, PORT_WORDS, SUMMARY_WORDS,
};

use crate::maps::{PORT_BITMAPS, PORT_SPACES};

/// `*word |= bits` as one BPF atomic instruction (BPF_ATOMIC | BPF_OR, no fetch).
#[inline(always)]
fn atomic_or(word: *mut u64, bits: u64) {
    // SAFETY: `word` points at an 8-byte aligned u64 inside a map value (see the callers);
    // the instruction only ORs into it.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({ptr} + 0) |= {val}",
            ptr = in(reg) word,
            val = in(reg) bits,
        );
    }
}

/// `*word &= bits` as one BPF atomic instruction (BPF_ATOMIC | BPF_AND, no fetch).
#[inline(always)]
fn atomic_and(word: *mut u64, bits: u64) {
    // SAFETY: as in `atomic_or`.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({ptr} + 0) &= {val}",
            ptr = in(reg) word,
            val = in(reg) bits,
        );
    }
}

/// The free-port index of one external address and protocol.
#[derive(Clone, Copy)]
pub struct PortIndex {
    bitmap: *mut PortBitmap,
}

impl PortIndex {
    /// The index of `addr` (network order) and `proto`, when the agent created one.
    #[inline(always)]
    pub fn of(addr: [u8; 4], proto: u8) -> Option<PortIndex> {
        let slot = PORT_SPACES.get_ptr(&PortSpace::new(addr, proto))?;
        // SAFETY: pointer from a successful lookup; read once.
        let slot = unsafe { *slot };
        let bitmap = PORT_BITMAPS.get_ptr_mut(slot)?;
        Some(PortIndex { bitmap })
    }

    /// Port word `w` (masked into the bitmap, which also tells the verifier the bound).
    #[inline(always)]
    fn word_ptr(&self, w: u32) -> *mut u64 {
        // black_box: LLVM proves the index in range from how callers computed it and drops the
        // mask, but the verifier loses that proof on the way (spills, 16-bit arithmetic); the
        // mask it then sees is what bounds the access for it.
        let i = core::hint::black_box(w as usize) & (PORT_WORDS - 1);
        // SAFETY: `bitmap` is a map value of PortBitmap size; `i` is within `words`.
        unsafe {
            core::ptr::addr_of_mut!((*self.bitmap).words)
                .cast::<u64>()
                .add(i)
        }
    }

    #[inline(always)]
    fn summary_ptr(&self, s: u32) -> *mut u64 {
        let i = core::hint::black_box(s as usize) & (SUMMARY_WORDS - 1);
        // SAFETY: as in `word_ptr`, within `summary`.
        unsafe {
            core::ptr::addr_of_mut!((*self.bitmap).summary)
                .cast::<u64>()
                .add(i)
        }
    }

    #[inline(always)]
    fn top_ptr(&self) -> *mut u64 {
        // SAFETY: as in `word_ptr`, the `top` field.
        unsafe { core::ptr::addr_of_mut!((*self.bitmap).top) }
    }

    /// Whether `port` is marked claimed.
    #[inline(always)]
    pub fn is_set(&self, port: u16) -> bool {
        self.word(word_of(port)) & bit_of(port) != 0
    }

    /// Marks `port` claimed, its word full in the summary when it now is, and the summary word
    /// full in the top word when that now is. The read after each OR sees every bit set before
    /// it, so of CPUs setting a word's last bits at once the last one always sees it full.
    #[inline(always)]
    pub fn set(&self, port: u16) {
        let w = word_of(port);
        let word = self.word_ptr(w);
        atomic_or(word, bit_of(port));
        // SAFETY: valid, aligned pointer into the map value.
        if !is_full(unsafe { core::ptr::read_volatile(word) }) {
            return;
        }
        let summary = self.summary_ptr(w >> 6);
        atomic_or(summary, 1u64 << (w & 63));
        // SAFETY: as above.
        if is_full(unsafe { core::ptr::read_volatile(summary) }) {
            atomic_or(self.top_ptr(), 1u64 << ((w >> 6) & 15));
        }
    }

    /// Marks `port` free (a claim given back): the port bit, then its word's summary bit, then
    /// the top bit. A CPU filling the word in between may leave a summary marking a word with
    /// a free port full: that port stays hidden until the agent's sweep repairs the summary.
    #[inline(always)]
    pub fn clear(&self, port: u16) {
        let w = word_of(port);
        atomic_and(self.word_ptr(w), !bit_of(port));
        atomic_and(self.summary_ptr(w >> 6), !(1u64 << (w & 63)));
        atomic_and(self.top_ptr(), !(1u64 << ((w >> 6) & 15)));
    }
}

impl PortBits for PortIndex {
    #[inline(always)]
    fn word(&self, w: u32) -> u64 {
        // SAFETY: valid, aligned pointer into the map value; other CPUs write it atomically.
        unsafe { core::ptr::read_volatile(self.word_ptr(w)) }
    }

    #[inline(always)]
    fn summary(&self, s: u32) -> u64 {
        // SAFETY: as in `word`.
        unsafe { core::ptr::read_volatile(self.summary_ptr(s)) }
    }

    #[inline(always)]
    fn top(&self) -> u64 {
        // SAFETY: as in `word`.
        unsafe { core::ptr::read_volatile(self.top_ptr()) }
    }
}
