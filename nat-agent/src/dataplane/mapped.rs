//! A `BPF_F_MMAPABLE` array mapped into the agent's memory, seen as 64-bit words.
//!
//! The kernel program changes such arrays with BPF atomics (`lock add`, `lock or`, ...), which
//! are the CPU's own locked instructions; the agent changes the same words with
//! `AtomicU64` read-modify-writes, so neither side ever loses the other's change. (A map
//! update from user space writes whole values and would.)

use std::{
    os::fd::{AsFd, AsRawFd},
    sync::atomic::AtomicU64,
};

use anyhow::{bail, Context, Result};
use aya::maps::{Map, MapData};

/// The array's memory, mapped shared; unmapped on drop. Owns the map, so the mapping never
/// outlives what it maps.
pub struct MappedArray {
    ptr: *mut AtomicU64,
    _map: MapData,
    /// Bytes mapped (whole pages).
    len: usize,
    /// Entries of the array.
    slots: u32,
    /// Words per entry.
    words_per_slot: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value for its whole life; every
// access goes through atomics.
unsafe impl Send for MappedArray {}
// SAFETY: as above.
unsafe impl Sync for MappedArray {}

impl MappedArray {
    /// Maps `map` (named `name` in errors), an array created with `BPF_F_MMAPABLE` whose values
    /// are `value_size` bytes, a multiple of 8.
    pub fn new(map: Map, name: &str, value_size: usize) -> Result<Self> {
        let map = match map {
            Map::Array(m) => m,
            other => bail!("{name} is not an array map: {other:?}"),
        };
        let info = map.info().with_context(|| format!("{name}: info"))?;
        if info.value_size() as usize != value_size || !value_size.is_multiple_of(8) {
            bail!(
                "{name} has {}-byte values, the agent expects {value_size}",
                info.value_size()
            );
        }
        let slots = info.max_entries();
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = (slots as usize * value_size).div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks size and flags.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mapping {name} (needs BPF_F_MMAPABLE)"));
        }
        Ok(MappedArray {
            ptr: ptr.cast(),
            _map: map,
            len,
            slots,
            words_per_slot: value_size / 8,
        })
    }

    /// Entries of the array.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// The words of entry `slot`.
    ///
    /// # Panics
    /// When `slot` is out of range: callers index with slots they computed for this array.
    pub fn entry(&self, slot: u32) -> &[AtomicU64] {
        assert!(slot < self.slots, "slot {slot} out of range");
        // SAFETY: the mapping holds `slots` entries of `words_per_slot` aligned u64 each (an
        // array's element size is its value size, a multiple of 8), alive as long as `self`.
        unsafe {
            std::slice::from_raw_parts(
                self.ptr.add(slot as usize * self.words_per_slot),
                self.words_per_slot,
            )
        }
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: the mapping this value created, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
