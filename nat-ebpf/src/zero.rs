//! All-zero values without `memset`.
//!
//! In this build, zeroing a struct (`core::mem::zeroed`, `Default`, a zero array field) becomes
//! a call to aya-ebpf's `memset`, a loop storing one byte per iteration: 64 iterations for a
//! FIB request, on every forwarded packet. [`zero_fill`] writes the value in place with one
//! store per 4 bytes instead. In place matters: a zeroed value returned by value is copied,
//! and LLVM turns the copy of known zeros back into a `memset` call.

use core::mem::{align_of, size_of, MaybeUninit};

/// Fills `slot` with zeros, 4 bytes per store, and returns it as a `T`. Only for plain-data
/// types 4-byte aligned and a multiple of 4 bytes long (checked when compiled).
///
/// # Safety
/// All-zero bytes must be a valid `T` (as for `core::mem::zeroed`).
#[inline(always)]
pub unsafe fn zero_fill<T>(slot: &mut MaybeUninit<T>) -> &mut T {
    const { assert!(align_of::<T>() >= 4 && size_of::<T>() % 4 == 0) };
    let words = slot.as_mut_ptr() as *mut u32;
    let mut i = 0;
    while i < size_of::<T>() / 4 {
        // SAFETY: `i` words lie inside the slot, which is 4-byte aligned (asserted above).
        // Volatile: a plain loop of zero stores is turned back into a `memset` call.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
        i += 1;
    }
    // SAFETY: every byte was written; the caller vouches that all-zero is a valid `T`.
    unsafe { slot.assume_init_mut() }
}
