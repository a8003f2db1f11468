//! Helpers shared by the integration tests: hand-built packets ([`packet`]) and the
//! BPF_PROG_TEST_RUN harness around the real XDP object ([`xdp`]).
//!
//! Each integration test file is its own crate and uses a subset of these helpers, so unused
//! ones are expected in any single crate.
#![allow(dead_code)]

pub mod lab;
pub mod packet;
pub mod props;
pub mod xdp;

/// Pins the calling thread to `cpu`: for fixtures whose program state is per CPU (a test
/// thread that migrates would meet another CPU's slots).
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it; the call reads it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(rc, 0, "pinning the test thread to CPU {cpu}");
}
