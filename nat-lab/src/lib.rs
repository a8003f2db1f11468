//! Network-namespace labs for the XDP NAT: end-to-end tests, the `cargo xtask lab` demo and
//! benchmarks build their hosts from these pieces.
//!
//! Everything here runs as root and only ever touches namespaces it created itself:
//! - [`netns`]: the [`Netns`] guard (unique names, removal on drop, stale cleanup) and
//!   [`in_netns`] to run Rust code (sockets) inside a namespace;
//! - [`process`]: bounded command execution and [`ChildGuard`] for long-running processes;
//! - [`topology`]: [`DnatLab`], the client — nat — backend topology (optionally with a
//!   backend that has no route back, for DNAT plus MASQUERADE);
//! - [`snat`]: [`SnatLab`], the private — nat — public topology of the SNAT scenarios;
//! - [`chrony`]: chronyd as NTP server and client inside namespaces (never steering the
//!   clock), and the wait for a selected source;
//! - [`sockets`]: Rust TCP/UDP servers that report the source address and port they saw, and
//!   clients that bind chosen source ports and keep their sockets across waits;
//! - [`scratch`]: private temporary directories for daemons' files and sockets;
//! - [`http_echo`] and [`udp_echo`]: servers that tell who talked to whom, and clients for them;
//! - [`nft`]: nftables packet counters used as ground truth for the NAT's own counters;
//! - [`tools`]: checks that the external tools exist, so tests fail loudly instead of skipping.
//!
//! No traffic leaves the namespaces: the lab uses 198.18.0.0/15 (RFC 2544) for its networks
//! and VIPs, TEST-NET-2 and TEST-NET-3 (198.51.100.0/24, 203.0.113.0/24) for "public" hosts
//! assigned inside its own namespaces, and has no route to anything else.

pub mod chrony;
pub mod frr;
pub mod http_echo;
pub mod netns;
pub mod nft;
pub mod process;
pub mod scratch;
pub mod snat;
pub mod sockets;
pub mod tools;
pub mod topology;
pub mod udp_echo;

pub use chrony::{ChronySource, NtpClient, NtpClientOptions, NtpServer, CHRONY_TOOLS};
pub use frr::{bgp_config, Frr};
pub use http_echo::{http_get, wait_tcp_ports, EchoReply, HttpEcho};
pub use netns::{cleanup_stale, in_netns, remove_namespace, Netns};
pub use nft::{install_counter, read_counter, CounterReading, Hook};
pub use process::{
    run, run_in, spawn, wait_until, wait_until_ok, Check, ChildGuard, ChildOutput, SpawnOptions,
};
pub use scratch::ScratchDir;
pub use snat::{SnatLab, SnatLabOptions};
pub use sockets::{
    established_tcp, tcp_connect, tcp_connect_all, tcp_roundtrip, udp_bind, udp_peer_roundtrip,
    TcpConn, TcpEchoServer, UdpPeerEcho,
};
pub use tools::{require_root, require_tools, LAB_TOOLS};
pub use topology::{veth_pair, DnatLab, DnatLabOptions};
pub use udp_echo::{udp_exchange, udp_exchange_from, UdpEcho, UdpExchange};
