//! Types and pure logic shared by the XDP program (`nat-ebpf`) and the agent (`nat-agent`).
//!
//! Everything here is `no_std` and allocation-free so the kernel program can use it, and it is
//! tested on the host (unit and property tests) so the kernel side only has to call it.
//!
//! Map value types are `#[repr(C)]` with explicit padding and size asserts: the agent and the
//! kernel program must agree on every byte.
#![cfg_attr(not(test), no_std)]

pub mod bench;
pub mod bypass;
pub mod checksum;
pub mod conntrack;
pub mod events;
pub mod frag;
pub mod icmp;
pub mod ipv4;
pub mod maps;
pub mod ports;
pub mod prefilter;
pub mod route_cache;
pub mod rules;
pub mod session_filter;
pub mod stats;
