//! Helpers shared by the integration tests: hand-built packets ([`packet`]) and the
//! BPF_PROG_TEST_RUN harness around the real XDP object ([`xdp`]).
//!
//! Each integration test file is its own crate and uses a subset of these helpers, so unused
//! ones are expected in any single crate.
#![allow(dead_code)]

pub mod packet;
pub mod xdp;
