//! The one BPF map command the agent needs that aya 0.14 does not expose: `BPF_MAP_GET_NEXT_KEY`
//! from a key of the caller's choosing. aya's iterators always start at the first key; the
//! expiry sweep must resume where its previous run stopped so that each run's cost is bounded.

use std::{
    io,
    mem::{size_of, MaybeUninit},
    os::fd::{AsRawFd, BorrowedFd},
};

/// `enum bpf_cmd` value of `BPF_MAP_GET_NEXT_KEY` (include/uapi/linux/bpf.h; stable ABI).
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// The map-element member of `union bpf_attr`. The kernel accepts an attribute shorter than
/// the whole union (it zero-fills the rest), so only this member is declared.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}

/// The key after `key` in the map's iteration order (the first key when `key` is `None`);
/// `None` at the end. A `key` that is not in the map also yields the first key: callers that
/// resume must check the key still exists first.
///
/// `K` must be exactly the map's key size: callers pass the fd of an aya map opened with `K`
/// as its key type, which aya checked.
pub(crate) fn map_next_key<K: aya::Pod>(
    fd: BorrowedFd<'_>,
    key: Option<&K>,
) -> io::Result<Option<K>> {
    let mut next = MaybeUninit::<K>::uninit();
    let attr = MapElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key.map_or(0, |k| std::ptr::from_ref(k) as u64),
        next_key: next.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `attr` is a valid BPF_MAP_GET_NEXT_KEY attribute whose pointers refer to a live
    // key of the map's key size (or null) and to `next`, writable for the map's key size; the
    // kernel reads and writes nothing else, and only during the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_GET_NEXT_KEY,
            std::ptr::from_ref(&attr),
            size_of::<MapElemAttr>(),
        )
    };
    if ret == 0 {
        // SAFETY: on success the kernel wrote a whole key into `next`, and `K: Pod` accepts
        // any bit pattern.
        return Ok(Some(unsafe { next.assume_init() }));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOENT) {
        Ok(None)
    } else {
        Err(err)
    }
}
