//! Packet fixtures for stateless DNAT, run through the real XDP object with
//! BPF_PROG_TEST_RUN.
//!
//! Each test loads its own program instance (own maps), fills the maps from a TOML config
//! exactly as an operator would write it, and for every frame asserts: the XDP action, the
//! exact output bytes against an expected frame built from scratch, the IP and L4 checksums of
//! translated output recomputed from scratch, the one reason counter that moved and the per-rule
//! counters. See `common/xdp.rs` for the harness and `common/packet.rs` for the builder.
//!
//! Needs root (loads BPF). Never skips: a missing capability fails every test.
//!
//! Addresses: VIPs 198.18.100.x, backends 198.18.1.x (NETMAP: 198.18.9.x), clients
//! 198.51.100.x and 203.0.113.x.

mod common;

use common::{
    packet::{
        arp_request, ethernet, ip_option_variants, ipv6_udp, options_ihl15, options_ihl6,
        verify_reassembled_l4_checksum, L4Check, Packet, ETH_HLEN, ETH_MIN_FRAME, ETH_P_8021AD,
        ETH_P_8021Q, ETH_P_ARP, ETH_P_IPV4, ETH_P_IPV6, ICMP_DEST_UNREACH, ICMP_HLEN, IPV4_HLEN,
        PROTO_GRE, TCP_HLEN, UDP_HLEN,
    },
    xdp::{Dir, Expect, Fixture},
};
use nat_common::{ipv4::proto, stats::Reason};

const CLIENT: &str = "198.51.100.7";
/// Redirect (an ICMP error type that is never translated).
const ICMP_REDIRECT: u8 = 5;
const CLIENT2: &str = "203.0.113.9";

/// Port rules on separate VIPs, one per protocol shape. No rule covers another VIP, so any
/// other 198.18.100.x address is "no rule".
const PORT_RULES: &str = r#"
[[interfaces]]
name = "nat0"

# TCP, one port onto another port: 198.18.100.10:80 -> 198.18.1.10:8080
[[dnat]]
id = 10
name = "web"
destination = "198.18.100.10"
protocol = "tcp"
port = 80
to_address = "198.18.1.10"
to_port = 8080

# UDP, one port onto another: 198.18.100.11:53 -> 198.18.1.11:5353
[[dnat]]
id = 11
name = "dns"
destination = "198.18.100.11"
protocol = "udp"
port = 53
to_address = "198.18.1.11"
to_port = 5353

# ICMP only (no ports): 198.18.100.12 -> 198.18.1.12
[[dnat]]
id = 12
name = "ping"
destination = "198.18.100.12"
protocol = "icmp"
to_address = "198.18.1.12"

# TCP, a range onto a range of the same size: 198.18.100.13:8000-8009 -> 198.18.1.13:9000-9009
[[dnat]]
id = 13
name = "range"
destination = "198.18.100.13"
protocol = "tcp"
port = "8000-8009"
to_address = "198.18.1.13"
to_port = 9000
"#;

/// A 1:1 whole-address rule: every protocol, ports kept.
const WHOLE_ADDRESS_RULE: &str = r#"
[[interfaces]]
name = "nat0"

[[dnat]]
id = 20
name = "whole"
destination = "198.18.100.20"
to_address = "198.18.1.20"
"#;

/// A /24 onto a /24 (NETMAP): host bits kept.
const NETMAP_RULE: &str = r#"
[[interfaces]]
name = "nat0"

[[dnat]]
id = 30
name = "netmap"
destination = "198.18.100.0/24"
to_address = "198.18.9.0/24"
"#;

/// A port rule on one address inside a NETMAP prefix: the config order decides.
const PORT_RULE_INSIDE_NETMAP: &str = r#"
[[interfaces]]
name = "nat0"

[[dnat]]
id = 1
name = "web"
destination = "198.18.100.10"
protocol = "tcp"
port = 80
to_address = "198.18.1.10"
to_port = 8080

[[dnat]]
id = 2
name = "netmap"
destination = "198.18.100.0/24"
to_address = "198.18.9.0/24"
"#;

/// Payload long enough to split into three fragments at 40 and 80 bytes of IP payload.
fn fragment_payload() -> Vec<u8> {
    (0..100u8).map(|i| i.wrapping_mul(37)).collect()
}

// ---------------------------------------------------------------------------------------------
// Basic translation, with and without IPv4 options
// ---------------------------------------------------------------------------------------------

#[test]
fn tcp_to_vip_port_is_translated_with_and_without_ip_options() {
    let fx = Fixture::load(PORT_RULES);
    for (label, opts) in ip_option_variants() {
        let input = Packet::tcp(CLIENT, 40000, "198.18.100.10", 80).with_options(&opts);
        let expected = Packet::tcp(CLIENT, 40000, "198.18.1.10", 8080).with_options(&opts);
        let got = fx.check(
            &format!("TCP to web, {label}"),
            &input.build(),
            &Expect::forward("web", expected.build()),
        );
        assert_eq!(got.l4, Some(L4Check::Valid), "{label}");
    }
}

#[test]
fn udp_to_vip_port_is_translated_with_and_without_ip_options() {
    let fx = Fixture::load(PORT_RULES);
    for (label, opts) in ip_option_variants() {
        let input = Packet::udp(CLIENT2, 33333, "198.18.100.11", 53).with_options(&opts);
        let expected = Packet::udp(CLIENT2, 33333, "198.18.1.11", 5353).with_options(&opts);
        let got = fx.check(
            &format!("UDP to dns, {label}"),
            &input.build(),
            &Expect::forward("dns", expected.build()),
        );
        assert_eq!(got.l4, Some(L4Check::Valid), "{label}");
    }
}

#[test]
fn icmp_echo_to_vip_is_translated_with_and_without_ip_options() {
    let fx = Fixture::load(PORT_RULES);
    for (label, opts) in ip_option_variants() {
        let input = Packet::icmp_echo(CLIENT, "198.18.100.12").with_options(&opts);
        let expected = Packet::icmp_echo(CLIENT, "198.18.1.12").with_options(&opts);
        let got = fx.check(
            &format!("ICMP echo to ping, {label}"),
            &input.build(),
            &Expect::forward("ping", expected.build()),
        );
        assert_eq!(got.l4, Some(L4Check::Valid), "{label}");
    }
}

#[test]
fn replies_from_backend_get_the_vip_back_with_and_without_ip_options() {
    let fx = Fixture::load(PORT_RULES);
    for (label, opts) in ip_option_variants() {
        let cases = [
            (
                "TCP reply from web backend",
                "web",
                Packet::tcp("198.18.1.10", 8080, CLIENT, 40000),
                Packet::tcp("198.18.100.10", 80, CLIENT, 40000),
            ),
            (
                "UDP reply from dns backend",
                "dns",
                Packet::udp("198.18.1.11", 5353, CLIENT2, 33333),
                Packet::udp("198.18.100.11", 53, CLIENT2, 33333),
            ),
            (
                "ICMP echo reply from ping backend",
                "ping",
                Packet::icmp_echo_reply("198.18.1.12", CLIENT),
                Packet::icmp_echo_reply("198.18.100.12", CLIENT),
            ),
        ];
        for (what, rule, input, expected) in cases {
            let got = fx.check(
                &format!("{what}, {label}"),
                &input.with_options(&opts).build(),
                &Expect::reply(rule, expected.with_options(&opts).build()),
            );
            assert_eq!(got.l4, Some(L4Check::Valid), "{what}, {label}");
        }
    }
}

#[test]
fn vlan_tagged_frames_are_translated_and_keep_their_tag() {
    let fx = Fixture::load(PORT_RULES);
    for opts in [Vec::new(), options_ihl6()] {
        let label = format!("VLAN 100, {} option bytes", opts.len());
        let cases = [
            (
                Packet::tcp(CLIENT, 40000, "198.18.100.10", 80),
                Expect::forward(
                    "web",
                    Packet::tcp(CLIENT, 40000, "198.18.1.10", 8080)
                        .with_vlan(100)
                        .with_options(&opts)
                        .build(),
                ),
            ),
            (
                Packet::udp(CLIENT, 40001, "198.18.100.11", 53),
                Expect::forward(
                    "dns",
                    Packet::udp(CLIENT, 40001, "198.18.1.11", 5353)
                        .with_vlan(100)
                        .with_options(&opts)
                        .build(),
                ),
            ),
            (
                Packet::icmp_echo(CLIENT, "198.18.100.12"),
                Expect::forward(
                    "ping",
                    Packet::icmp_echo(CLIENT, "198.18.1.12")
                        .with_vlan(100)
                        .with_options(&opts)
                        .build(),
                ),
            ),
            (
                Packet::tcp("198.18.1.10", 8080, CLIENT, 40000),
                Expect::reply(
                    "web",
                    Packet::tcp("198.18.100.10", 80, CLIENT, 40000)
                        .with_vlan(100)
                        .with_options(&opts)
                        .build(),
                ),
            ),
        ];
        for (input, expect) in cases {
            let input = input.with_vlan(100).with_options(&opts).build();
            // The tag itself, byte for byte, before the full comparison in `check`.
            assert_eq!(&input[12..16], &[0x81, 0x00, 0x00, 100]);
            let got = fx.check(&label, &input, &expect);
            assert_eq!(
                &got.frame[12..16],
                &[0x81, 0x00, 0x00, 100],
                "{label}: tag kept"
            );
            assert_eq!(got.l4, Some(L4Check::Valid), "{label}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Truncation and malformed headers
// ---------------------------------------------------------------------------------------------

/// The kernel's BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header (EINVAL
/// from `bpf_prog_test_run_xdp`), so for untagged frames `TruncatedEthernet` cannot be reached
/// through this interface; a VLAN-tagged frame cut inside its tag reaches it (see
/// `frames_cut_at_every_length_are_dropped_never_rewritten`). This pins the kernel behaviour
/// so the gap in coverage is visible rather than silent.
#[test]
fn frames_shorter_than_ethernet_are_refused_by_test_run() {
    let fx = Fixture::load(PORT_RULES);
    let full = Packet::tcp(CLIENT, 40000, "198.18.100.10", 80).build();
    for cut in 0..ETH_HLEN {
        match fx.try_run(&full[..cut]) {
            Err(aya::programs::ProgramError::SyscallError(e)) => assert_eq!(
                e.io_error.raw_os_error(),
                Some(libc::EINVAL),
                "{cut}-byte frame: {e}"
            ),
            other => panic!("{cut}-byte frame: the kernel ran the program: {other:?}"),
        }
    }
    // Nothing was counted for the refused runs.
    assert!(fx.counters().reasons.iter().all(|&n| n == 0));
}

/// A matching TCP frame cut at every byte length from the end of the Ethernet header to the
/// end of the TCP header. The IP total length still claims the whole datagram, so once the
/// IPv4 header is complete the datagram overruns the frame: MalformedIpv4 every time. Before
/// that: inside the VLAN tag TruncatedEthernet, inside the IPv4 header MalformedIpv4.
/// Whatever the verdict, the output must be the input: never a half-rewritten frame.
#[test]
fn frames_cut_at_every_length_are_dropped_never_rewritten() {
    let fx = Fixture::load(PORT_RULES);
    let variants = [
        ("untagged", Packet::tcp(CLIENT, 40000, "198.18.100.10", 80)),
        (
            "VLAN-tagged",
            Packet::tcp(CLIENT, 40000, "198.18.100.10", 80).with_vlan(100),
        ),
        (
            "IHL 6",
            Packet::tcp(CLIENT, 40000, "198.18.100.10", 80).with_options(&options_ihl6()),
        ),
        (
            "IHL 15",
            Packet::tcp(CLIENT, 40000, "198.18.100.10", 80).with_options(&options_ihl15()),
        ),
    ];
    for (label, packet) in variants {
        let full = packet.build();
        let l3 = packet.l3_offset();
        let l4_end = l3 + packet.ip_header_len() + TCP_HLEN;
        for cut in ETH_HLEN..=l4_end {
            let input = &full[..cut];
            let reason = if cut < l3 {
                Reason::TruncatedEthernet
            } else {
                // Either the fixed IPv4 header is incomplete, or the total length runs past
                // the frame.
                Reason::MalformedIpv4
            };
            fx.check(
                &format!("{label} frame cut to {cut} bytes"),
                input,
                &Expect::drop_unchanged(reason, input),
            );
        }
        // Control: the uncut frame is translated, so the drops above were about the cut.
        let expected = Packet::tcp(CLIENT, 40000, "198.18.1.10", 8080);
        let expected = Packet {
            vlan: packet.vlan,
            options: packet.options.clone(),
            ..expected
        };
        fx.check(
            &format!("{label} uncut"),
            &full,
            &Expect::forward("web", expected.build()),
        );
    }
}

/// Datagrams whose IP total length ends inside the L4 header of a matching packet (a
/// consistent, well-formed IPv4 header): TruncatedL4, dropped, never rewritten. Also with
/// Ethernet padding after the short datagram: padding is not L4 header.
#[test]
fn datagrams_ending_inside_the_tcp_or_udp_header_are_dropped() {
    let fx = Fixture::load(PORT_RULES);
    let cases = [
        (
            "TCP to web",
            Packet::tcp(CLIENT, 40000, "198.18.100.10", 80),
            TCP_HLEN,
        ),
        (
            "UDP to dns",
            Packet::udp(CLIENT, 40000, "198.18.100.11", 53),
            UDP_HLEN,
        ),
        (
            "TCP reply from web backend",
            Packet::tcp("198.18.1.10", 8080, CLIENT, 40000),
            TCP_HLEN,
        ),
        (
            "UDP reply from dns backend",
            Packet::udp("198.18.1.11", 5353, CLIENT, 40000),
            UDP_HLEN,
        ),
    ];
    for (what, whole, header_len) in cases {
        let l4 = whole.l4.bytes(whole.src, whole.dst);
        for keep in 0..header_len {
            for (shape, vlan, opts, pad) in [
                ("plain", None, Vec::new(), 0),
                ("VLAN + IHL 6", Some(7), options_ihl6(), 0),
                ("padded to 60", None, Vec::new(), ETH_MIN_FRAME),
            ] {
                let short = Packet {
                    vlan,
                    options: opts,
                    pad_to: pad,
                    ..Packet::raw(
                        &whole.src.to_string(),
                        &whole.dst.to_string(),
                        whole.l4.proto(),
                        l4[..keep].to_vec(),
                    )
                };
                let input = short.build();
                fx.check(
                    &format!("{what}, {shape}, {keep} of {header_len} L4 header bytes"),
                    &input,
                    &Expect::drop_unchanged(Reason::TruncatedL4, &input),
                );
            }
        }
    }
}

/// ICMP echo to an ICMP rule's VIP whose datagram ends inside the 8-byte ICMP header. Without
/// padding the frame ends there too; with padding the bytes after the datagram must not be
/// taken for the rest of the ICMP header (TruncatedL4 is documented for TCP/UDP/ICMP alike).
#[test]
fn datagrams_ending_inside_the_icmp_header_are_dropped() {
    let fx = Fixture::load(PORT_RULES);
    let whole = Packet::icmp_echo(CLIENT, "198.18.100.12");
    let l4 = whole.l4.bytes(whole.src, whole.dst);
    for pad in [0, ETH_MIN_FRAME] {
        for keep in 0..ICMP_HLEN {
            let input = Packet::raw(CLIENT, "198.18.100.12", proto::ICMP, l4[..keep].to_vec())
                .padded_to(pad)
                .build();
            fx.check(
                &format!(
                    "ICMP echo to ping, {keep} of 8 header bytes, frame {} bytes",
                    input.len()
                ),
                &input,
                &Expect::drop_unchanged(Reason::TruncatedL4, &input),
            );
        }
    }
}

/// A datagram whose L4 header is cut short, sent to a VIP whose rules all name *another*
/// protocol: no rule can match it, so by `Reason::TruncatedL4`'s contract ("a rule matched but
/// the header is cut short") and `NoMatch`'s it is "IPv4 that no rule translates": passed
/// untouched like the same packet whole (see `non_matching_traffic_passes_unchanged`).
#[test]
fn cut_short_l4_header_of_a_protocol_no_rule_names_is_no_match() {
    let fx = Fixture::load(PORT_RULES);
    let cases = [
        // dns is a UDP rule: 12 bytes of TCP header can never match it.
        (
            "TCP to the UDP-only dns VIP",
            Packet::tcp(CLIENT, 40000, "198.18.100.11", 53),
            12,
        ),
        // web is a TCP rule: a 4-byte ICMP header can never match it.
        (
            "ICMP to the TCP-only web VIP",
            Packet::icmp_echo(CLIENT, "198.18.100.10"),
            4,
        ),
    ];
    for (what, whole, keep) in cases {
        let l4 = whole.l4.bytes(whole.src, whole.dst);
        let input = Packet::raw(
            &whole.src.to_string(),
            &whole.dst.to_string(),
            whole.l4.proto(),
            l4[..keep].to_vec(),
        )
        .build();
        fx.check(
            what,
            &input,
            &Expect::pass_unchanged(Reason::NoMatch, &input),
        );
    }
}

#[test]
fn bad_version_or_ihl_is_dropped() {
    let fx = Fixture::load(PORT_RULES);
    // Matching traffic (web) and traffic to no rule alike: the header is judged first.
    for dst in ["198.18.100.10", "198.18.100.99"] {
        for (what, vihl) in [
            ("IHL 4", 0x44),
            ("IHL 0", 0x40),
            ("IHL 1", 0x41),
            ("version 6", 0x65),
            ("version 5", 0x55),
            ("version 0", 0x05),
            ("version 15", 0xf5),
        ] {
            let input = Packet::tcp(CLIENT, 40000, dst, 80).with_vihl(vihl).build();
            fx.check(
                &format!("{what} to {dst}"),
                &input,
                &Expect::drop_unchanged(Reason::MalformedIpv4, &input),
            );
        }
        // Total length shorter than the header it announces.
        for (what, packet) in [
            (
                "total length 19, IHL 5",
                Packet::tcp(CLIENT, 40000, dst, 80).with_total_len(19),
            ),
            (
                "total length 20, IHL 6",
                Packet::tcp(CLIENT, 40000, dst, 80)
                    .with_options(&options_ihl6())
                    .with_total_len(20),
            ),
            (
                "total length 0",
                Packet::tcp(CLIENT, 40000, dst, 80).with_total_len(0),
            ),
        ] {
            let input = packet.build();
            fx.check(
                &format!("{what} to {dst}"),
                &input,
                &Expect::drop_unchanged(Reason::MalformedIpv4, &input),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What must pass untouched
// ---------------------------------------------------------------------------------------------

#[test]
fn non_matching_traffic_passes_unchanged() {
    let fx = Fixture::load(PORT_RULES);
    let cases = [
        (
            "TCP to a VIP without rules",
            Packet::tcp(CLIENT, 40000, "198.18.100.99", 80),
        ),
        (
            "TCP to web on another port",
            Packet::tcp(CLIENT, 40000, "198.18.100.10", 81),
        ),
        (
            "UDP to web's TCP port",
            Packet::udp(CLIENT, 40000, "198.18.100.10", 80),
        ),
        (
            "ICMP echo to web (TCP rule)",
            Packet::icmp_echo(CLIENT, "198.18.100.10"),
        ),
        (
            "GRE to web (TCP rule)",
            Packet::raw(
                CLIENT,
                "198.18.100.10",
                PROTO_GRE,
                vec![0, 0, 0x08, 0, 1, 2, 3, 4],
            ),
        ),
        (
            "TCP to dns's UDP port",
            Packet::tcp(CLIENT, 40000, "198.18.100.11", 53),
        ),
        (
            "UDP to ping (ICMP rule)",
            Packet::udp(CLIENT, 40000, "198.18.100.12", 7),
        ),
        (
            "TCP straight to a backend",
            Packet::tcp(CLIENT, 40000, "198.18.1.10", 8080),
        ),
        (
            "reply from web backend, wrong source port",
            Packet::tcp("198.18.1.10", 9999, CLIENT, 40000),
        ),
        (
            "UDP from web backend's port (TCP rule)",
            Packet::udp("198.18.1.10", 8080, CLIENT, 40000),
        ),
        (
            "ICMP echo reply from web backend",
            Packet::icmp_echo_reply("198.18.1.10", CLIENT),
        ),
        (
            "TCP between clients",
            Packet::tcp(CLIENT, 40000, CLIENT2, 80),
        ),
    ];
    for (what, packet) in cases {
        for opts in [Vec::new(), options_ihl15()] {
            let input = packet.clone().with_options(&opts).build();
            fx.check(
                &format!("{what}, {} option bytes", opts.len()),
                &input,
                &Expect::pass_unchanged(Reason::NoMatch, &input),
            );
        }
    }
}

#[test]
fn non_ipv4_frames_pass_unchanged() {
    let fx = Fixture::load(WHOLE_ADDRESS_RULE);
    let mut arp = ethernet(&[], ETH_P_ARP, &arp_request(CLIENT, "198.18.100.20"));
    arp.resize(ETH_MIN_FRAME, 0);
    let cases = [
        ("ARP who-has VIP", arp),
        (
            "VLAN-tagged ARP",
            ethernet(
                &[(ETH_P_8021Q, 100)],
                ETH_P_ARP,
                &arp_request(CLIENT, "198.18.100.20"),
            ),
        ),
        (
            "IPv6 UDP",
            ethernet(&[], ETH_P_IPV6, &ipv6_udp(5000, 53, b"v6")),
        ),
        (
            "VLAN-tagged IPv6",
            ethernet(
                &[(ETH_P_8021Q, 100)],
                ETH_P_IPV6,
                &ipv6_udp(5000, 53, b"v6"),
            ),
        ),
        // An IPv4 datagram to the VIP labelled with another EtherType is not IPv4 to XDP.
        (
            "IPv4 bytes under EtherType IPv6",
            ethernet(
                &[],
                ETH_P_IPV6,
                &Packet::tcp(CLIENT, 40000, "198.18.100.20", 80).datagram(),
            ),
        ),
        // Exactly an Ethernet header and nothing else.
        ("bare Ethernet header, IPv6", ethernet(&[], ETH_P_IPV6, &[])),
    ];
    for (what, input) in cases {
        fx.check(
            what,
            &input,
            &Expect::pass_unchanged(Reason::NotIpv4, &input),
        );
    }
}

#[test]
fn stacked_vlan_tags_pass_unchanged() {
    let fx = Fixture::load(WHOLE_ADDRESS_RULE);
    let datagram = Packet::tcp(CLIENT, 40000, "198.18.100.20", 443).datagram();
    for tags in [
        vec![(ETH_P_8021AD, 10), (ETH_P_8021Q, 100)],
        vec![(ETH_P_8021Q, 10), (ETH_P_8021Q, 100)],
        vec![(ETH_P_8021Q, 10), (ETH_P_8021AD, 100)],
        // A lone 802.1ad tag: the program does not parse S-tags at all.
        vec![(ETH_P_8021AD, 10)],
    ] {
        let input = ethernet(&tags, ETH_P_IPV4, &datagram);
        fx.check(
            &format!("tags {tags:x?} around IPv4 to a 1:1 VIP"),
            &input,
            &Expect::pass_unchanged(Reason::VlanStacked, &input),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Rule shapes: port ranges, NETMAP, 1:1
// ---------------------------------------------------------------------------------------------

#[test]
fn port_range_maps_first_middle_last_and_nothing_outside() {
    let fx = Fixture::load(PORT_RULES);
    for (vip_port, backend_port) in [(8000, 9000), (8005, 9005), (8009, 9009)] {
        fx.check(
            &format!("TCP to range port {vip_port}"),
            &Packet::tcp(CLIENT, 41000, "198.18.100.13", vip_port).build(),
            &Expect::forward(
                "range",
                Packet::tcp(CLIENT, 41000, "198.18.1.13", backend_port).build(),
            ),
        );
        fx.check(
            &format!("reply from range backend port {backend_port}"),
            &Packet::tcp("198.18.1.13", backend_port, CLIENT, 41000).build(),
            &Expect::reply(
                "range",
                Packet::tcp("198.18.100.13", vip_port, CLIENT, 41000).build(),
            ),
        );
    }
    for port in [7999, 8010, 9000] {
        let input = Packet::tcp(CLIENT, 41000, "198.18.100.13", port).build();
        fx.check(
            &format!("TCP to range VIP port {port} (outside 8000-8009)"),
            &input,
            &Expect::pass_unchanged(Reason::NoMatch, &input),
        );
    }
    for port in [8999, 9010, 8005] {
        let input = Packet::tcp("198.18.1.13", port, CLIENT, 41000).build();
        fx.check(
            &format!("reply from range backend port {port} (outside 9000-9009)"),
            &input,
            &Expect::pass_unchanged(Reason::NoMatch, &input),
        );
    }
}

#[test]
fn netmap_prefix_rule_keeps_host_bits() {
    let fx = Fixture::load(NETMAP_RULE);
    for host in [0u8, 1, 77, 254, 255] {
        let vip = format!("198.18.100.{host}");
        let backend = format!("198.18.9.{host}");
        let forward = [
            (
                Packet::tcp(CLIENT, 40000, &vip, 443),
                Packet::tcp(CLIENT, 40000, &backend, 443),
            ),
            (
                Packet::udp(CLIENT2, 5000, &vip, 123),
                Packet::udp(CLIENT2, 5000, &backend, 123),
            ),
            (
                Packet::icmp_echo(CLIENT, &vip),
                Packet::icmp_echo(CLIENT, &backend),
            ),
        ];
        for (input, expected) in forward {
            let got = fx.check(
                &format!("{:?} to {vip}", input.l4.proto()),
                &input.build(),
                &Expect::forward("netmap", expected.build()),
            );
            assert_eq!(got.l4, Some(L4Check::Valid));
        }
        let replies = [
            (
                Packet::tcp(&backend, 443, CLIENT, 40000),
                Packet::tcp(&vip, 443, CLIENT, 40000),
            ),
            (
                Packet::udp(&backend, 123, CLIENT2, 5000),
                Packet::udp(&vip, 123, CLIENT2, 5000),
            ),
            (
                Packet::icmp_echo_reply(&backend, CLIENT),
                Packet::icmp_echo_reply(&vip, CLIENT),
            ),
        ];
        for (input, expected) in replies {
            let got = fx.check(
                &format!("{:?} reply from {backend}", input.l4.proto()),
                &input.build(),
                &Expect::reply("netmap", expected.build()),
            );
            assert_eq!(got.l4, Some(L4Check::Valid));
        }
    }
    for (what, input) in [
        (
            "TCP to the next /24",
            Packet::tcp(CLIENT, 40000, "198.18.101.77", 443),
        ),
        (
            "TCP to the previous /24",
            Packet::tcp(CLIENT, 40000, "198.18.99.77", 443),
        ),
        (
            "reply from outside the backend /24",
            Packet::tcp("198.18.10.77", 443, CLIENT, 40000),
        ),
    ] {
        let input = input.build();
        fx.check(
            what,
            &input,
            &Expect::pass_unchanged(Reason::NoMatch, &input),
        );
    }
}

#[test]
fn whole_address_rule_translates_every_protocol_and_keeps_ports() {
    let fx = Fixture::load(WHOLE_ADDRESS_RULE);
    let gre = vec![0, 0, 0x08, 0, 0x45, 0, 0, 20];
    let forward = [
        (
            Packet::tcp(CLIENT, 40000, "198.18.100.20", 443),
            Packet::tcp(CLIENT, 40000, "198.18.1.20", 443),
            L4Check::Valid,
        ),
        (
            Packet::udp(CLIENT2, 5000, "198.18.100.20", 123),
            Packet::udp(CLIENT2, 5000, "198.18.1.20", 123),
            L4Check::Valid,
        ),
        (
            Packet::icmp_echo(CLIENT, "198.18.100.20"),
            Packet::icmp_echo(CLIENT, "198.18.1.20"),
            L4Check::Valid,
        ),
        // A protocol without L4 handling: only the IP header changes.
        (
            Packet::raw(CLIENT, "198.18.100.20", PROTO_GRE, gre.clone()),
            Packet::raw(CLIENT, "198.18.1.20", PROTO_GRE, gre.clone()),
            L4Check::NotApplicable,
        ),
    ];
    for (input, expected, l4) in forward {
        for opts in [Vec::new(), options_ihl15()] {
            let what = format!(
                "protocol {} to 1:1 VIP, {} option bytes",
                input.l4.proto(),
                opts.len()
            );
            let got = fx.check(
                &what,
                &input.clone().with_options(&opts).build(),
                &Expect::forward("whole", expected.clone().with_options(&opts).build()),
            );
            assert_eq!(got.l4, Some(l4), "{what}");
        }
    }
    let replies = [
        (
            Packet::tcp("198.18.1.20", 443, CLIENT, 40000),
            Packet::tcp("198.18.100.20", 443, CLIENT, 40000),
        ),
        (
            Packet::udp("198.18.1.20", 123, CLIENT2, 5000),
            Packet::udp("198.18.100.20", 123, CLIENT2, 5000),
        ),
        (
            Packet::icmp_echo_reply("198.18.1.20", CLIENT),
            Packet::icmp_echo_reply("198.18.100.20", CLIENT),
        ),
        (
            Packet::raw("198.18.1.20", CLIENT, PROTO_GRE, gre.clone()),
            Packet::raw("198.18.100.20", CLIENT, PROTO_GRE, gre),
        ),
    ];
    for (input, expected) in replies {
        fx.check(
            &format!("protocol {} reply from 1:1 backend", input.l4.proto()),
            &input.build(),
            &Expect::reply("whole", expected.build()),
        );
    }
}

/// DCCP and UDP-Lite checksums cover the pseudo-header but the program does not rewrite them:
/// a 1:1 rule matches them, and they must pass untouched rather than be corrupted.
#[test]
fn dccp_and_udplite_to_a_whole_address_vip_pass_unchanged() {
    let fx = Fixture::load(WHOLE_ADDRESS_RULE);
    let body: Vec<u8> = (0..16).collect();
    for p in [proto::DCCP, proto::UDPLITE] {
        for input in [
            Packet::raw(CLIENT, "198.18.100.20", p, body.clone()),
            Packet::raw("198.18.1.20", CLIENT, p, body.clone()),
        ] {
            let input = input.build();
            fx.check(
                &format!("protocol {p}"),
                &input,
                &Expect::pass_unchanged(Reason::ProtoUnsupported, &input),
            );
        }
    }
}

/// The config order decides between a port rule and the NETMAP prefix covering its VIP: the
/// port rule for its port, the prefix for everything else, in both directions.
#[test]
fn port_rule_takes_priority_over_covering_netmap() {
    let fx = Fixture::load(PORT_RULE_INSIDE_NETMAP);
    fx.check(
        "TCP to web port",
        &Packet::tcp(CLIENT, 40000, "198.18.100.10", 80).build(),
        &Expect::forward(
            "web",
            Packet::tcp(CLIENT, 40000, "198.18.1.10", 8080).build(),
        ),
    );
    fx.check(
        "TCP to web VIP, other port: falls through to the prefix",
        &Packet::tcp(CLIENT, 40000, "198.18.100.10", 81).build(),
        &Expect::forward(
            "netmap",
            Packet::tcp(CLIENT, 40000, "198.18.9.10", 81).build(),
        ),
    );
    fx.check(
        "TCP to another address of the prefix",
        &Packet::tcp(CLIENT, 40000, "198.18.100.11", 80).build(),
        &Expect::forward(
            "netmap",
            Packet::tcp(CLIENT, 40000, "198.18.9.11", 80).build(),
        ),
    );
    fx.check(
        "reply from web backend",
        &Packet::tcp("198.18.1.10", 8080, CLIENT, 40000).build(),
        &Expect::reply(
            "web",
            Packet::tcp("198.18.100.10", 80, CLIENT, 40000).build(),
        ),
    );
    fx.check(
        "reply from the prefix backend of the web VIP",
        &Packet::tcp("198.18.9.10", 81, CLIENT, 40000).build(),
        &Expect::reply(
            "netmap",
            Packet::tcp("198.18.100.10", 81, CLIENT, 40000).build(),
        ),
    );
    // A first fragment has its port and decides between the two rules like any packet; its
    // later fragments follow it. A later fragment alone cannot choose: passed untouched.
    fragmented_like_its_first(
        &fx,
        "fragments to the web VIP",
        &Packet::tcp(CLIENT, 40000, "198.18.100.10", 80),
        &Packet::tcp(CLIENT, 40000, "198.18.1.10", 8080),
        ("web", Dir::Original),
    );
    fragmented_like_its_first(
        &fx,
        "fragments to the web VIP, other port",
        // Another datagram between the same hosts: another IP id.
        &Packet::tcp(CLIENT, 40001, "198.18.100.10", 81).with_ident(0x1001),
        &Packet::tcp(CLIENT, 40001, "198.18.9.10", 81).with_ident(0x1001),
        ("netmap", Dir::Original),
    );
}

#[test]
fn udp_without_checksum_keeps_a_zero_checksum() {
    let fx = Fixture::load(PORT_RULES);
    let cases = [
        (
            "UDP to dns (port rewritten)",
            Packet::udp(CLIENT, 40000, "198.18.100.11", 53),
            Expect::forward(
                "dns",
                Packet::udp(CLIENT, 40000, "198.18.1.11", 5353)
                    .without_udp_checksum()
                    .build(),
            ),
        ),
        (
            "UDP reply from dns backend",
            Packet::udp("198.18.1.11", 5353, CLIENT, 40000),
            Expect::reply(
                "dns",
                Packet::udp("198.18.100.11", 53, CLIENT, 40000)
                    .without_udp_checksum()
                    .build(),
            ),
        ),
    ];
    for (what, input, expect) in cases {
        let input = input.without_udp_checksum().build();
        let got = fx.check(what, &input, &expect);
        assert_eq!(got.l4, Some(L4Check::UdpNoChecksum), "{what}");
    }
    let whole = Fixture::load(WHOLE_ADDRESS_RULE);
    let got = whole.check(
        "UDP to 1:1 VIP",
        &Packet::udp(CLIENT, 40000, "198.18.100.20", 123)
            .without_udp_checksum()
            .build(),
        &Expect::forward(
            "whole",
            Packet::udp(CLIENT, 40000, "198.18.1.20", 123)
                .without_udp_checksum()
                .build(),
        ),
    );
    assert_eq!(got.l4, Some(L4Check::UdpNoChecksum));
}

/// A UDP checksum that computes to 0 is sent as 0xffff. Both edges must stay exact through
/// the incremental update: an input carrying 0xffff, and an output that must become 0xffff
/// (never 0, which would mean "no checksum").
#[test]
fn udp_checksum_ffff_edge_cases_stay_exact() {
    let fx = Fixture::load(PORT_RULES);
    let field = |p: &Packet| {
        let b = p.l4.bytes(p.src, p.dst);
        u16::from_be_bytes([b[6], b[7]])
    };
    // Searching the source port finds datagrams whose checksum lands on the edge.
    let forward = |sport| {
        (
            Packet::udp(CLIENT, sport, "198.18.100.11", 53),
            Packet::udp(CLIENT, sport, "198.18.1.11", 5353),
        )
    };
    let input_edge = (1..=u16::MAX)
        .find(|&s| field(&forward(s).0) == 0xffff)
        .expect("some source port gives an input checksum of 0xffff");
    let output_edge = (1..=u16::MAX)
        .find(|&s| field(&forward(s).1) == 0xffff)
        .expect("some source port gives a translated checksum of 0xffff");
    for (what, sport) in [("input 0xffff", input_edge), ("output 0xffff", output_edge)] {
        let (input, expected) = forward(sport);
        let got = fx.check(
            &format!("UDP to dns, {what} (source port {sport})"),
            &input.build(),
            &Expect::forward("dns", expected.build()),
        );
        assert_eq!(got.l4, Some(L4Check::Valid), "{what}");
    }
}

/// Frames shorter than 60 bytes arrive padded; the padding is not part of the datagram. It
/// must come out untouched (the pad byte is a non-zero pattern to make that visible), the
/// checksums must cover the datagram only, and the rule's byte counter counts the whole frame.
#[test]
fn ethernet_padding_is_left_untouched_and_counted() {
    let fx = Fixture::load(PORT_RULES);
    let short = b"hi".to_vec();
    let cases = [
        (
            Packet::udp(CLIENT, 40000, "198.18.100.11", 53).with_payload(short.clone()),
            Expect::forward(
                "dns",
                Packet::udp(CLIENT, 40000, "198.18.1.11", 5353)
                    .with_payload(short.clone())
                    .padded_to(ETH_MIN_FRAME)
                    .build(),
            ),
        ),
        (
            Packet::udp("198.18.1.11", 5353, CLIENT, 40000).with_payload(short.clone()),
            Expect::reply(
                "dns",
                Packet::udp("198.18.100.11", 53, CLIENT, 40000)
                    .with_payload(short.clone())
                    .padded_to(ETH_MIN_FRAME)
                    .build(),
            ),
        ),
        (
            Packet::tcp(CLIENT, 40000, "198.18.100.10", 80).with_payload(Vec::new()),
            Expect::forward(
                "web",
                Packet::tcp(CLIENT, 40000, "198.18.1.10", 8080)
                    .with_payload(Vec::new())
                    .padded_to(ETH_MIN_FRAME)
                    .build(),
            ),
        ),
        (
            Packet::icmp_echo(CLIENT, "198.18.100.12").with_payload(Vec::new()),
            Expect::forward(
                "ping",
                Packet::icmp_echo(CLIENT, "198.18.1.12")
                    .with_payload(Vec::new())
                    .padded_to(ETH_MIN_FRAME)
                    .build(),
            ),
        ),
    ];
    for (input, expect) in cases {
        let input = input.padded_to(ETH_MIN_FRAME).build();
        assert_eq!(input.len(), ETH_MIN_FRAME);
        let got = fx.check("padded frame", &input, &expect);
        assert_eq!(got.l4, Some(L4Check::Valid));
    }
    // Also with the zero checksum: nothing about the padding may leak into it.
    let input = Packet::udp(CLIENT, 40000, "198.18.100.11", 53)
        .with_payload(short.clone())
        .without_udp_checksum()
        .padded_to(ETH_MIN_FRAME)
        .build();
    let expected = Packet::udp(CLIENT, 40000, "198.18.1.11", 5353)
        .with_payload(short)
        .without_udp_checksum()
        .padded_to(ETH_MIN_FRAME)
        .build();
    let got = fx.check(
        "padded UDP without checksum",
        &input,
        &Expect::forward("dns", expected),
    );
    assert_eq!(got.l4, Some(L4Check::UdpNoChecksum));
}

// ---------------------------------------------------------------------------------------------
// Fragments and ICMP errors
// ---------------------------------------------------------------------------------------------

/// Sends the fragments of `input` (three, cut at 40 and 80 payload bytes) out of order: the
/// last one first, which no first fragment has announced (a port rule cannot judge it, so it
/// passes untouched as `fragment_unmatched`); then the first, translated by `rule` into the
/// first fragment of `expected`; then the later ones, which must get exactly the addresses of
/// `expected` (`fragment_translated`, counted by the same rule). The outputs must reassemble
/// into a datagram with a valid L4 checksum.
fn fragmented_like_its_first(
    fx: &Fixture,
    what: &str,
    input: &Packet,
    expected: &Packet,
    rule: (&'static str, Dir),
) {
    let inputs = input
        .clone()
        .with_payload(fragment_payload())
        .fragments(&[40, 80]);
    let wanted = expected
        .clone()
        .with_payload(fragment_payload())
        .fragments(&[40, 80]);
    let early = inputs[2].build();
    fx.check(
        &format!("{what}: last fragment before the first"),
        &early,
        &Expect::pass_unchanged(Reason::FragmentUnmatched, &early),
    );
    let first = match rule.1 {
        Dir::Original => Expect::forward(rule.0, wanted[0].build()),
        Dir::Reply => Expect::reply(rule.0, wanted[0].build()),
    };
    let mut outputs = vec![
        fx.check(
            &format!("{what}: first fragment"),
            &inputs[0].build(),
            &first,
        )
        .frame,
    ];
    for i in 1..inputs.len() {
        let got = fx.check(
            &format!("{what}: fragment {i} after the first"),
            &inputs[i].build(),
            &Expect::fragment(wanted[i].build(), &[rule]),
        );
        assert_eq!(got.l4, Some(L4Check::NotApplicable), "{what}: fragment {i}");
        outputs.push(got.frame);
    }
    let refs: Vec<&[u8]> = outputs.iter().map(Vec::as_slice).collect();
    assert_eq!(
        verify_reassembled_l4_checksum(&refs),
        Ok(L4Check::Valid),
        "{what}: the translated fragments reassemble to a valid datagram"
    );
}

/// Port rules and fragments: the first fragment carries the ports and is translated by the
/// port rule like an unfragmented packet (port included); later fragments get the same
/// addresses from the fragment cache. A later fragment whose first fragment was not seen
/// cannot be judged by a port rule and passes untouched.
#[test]
fn fragments_of_port_rule_flows_follow_their_first_fragment() {
    let fx = Fixture::load(PORT_RULES);
    let cases = [
        (
            Packet::tcp(CLIENT, 40000, "198.18.100.10", 80),
            Packet::tcp(CLIENT, 40000, "198.18.1.10", 8080),
            ("web", Dir::Original),
        ),
        (
            Packet::udp(CLIENT, 40000, "198.18.100.11", 53),
            Packet::udp(CLIENT, 40000, "198.18.1.11", 5353),
            ("dns", Dir::Original),
        ),
        (
            Packet::tcp(CLIENT, 40000, "198.18.100.13", 8005),
            Packet::tcp(CLIENT, 40000, "198.18.1.13", 9005),
            ("range", Dir::Original),
        ),
        (
            Packet::tcp("198.18.1.10", 8080, CLIENT, 40000),
            Packet::tcp("198.18.100.10", 80, CLIENT, 40000),
            ("web", Dir::Reply),
        ),
    ];
    for (input, expected, rule) in cases {
        let what = format!("{} {} -> {}", input.l4.proto(), input.src, input.dst);
        fragmented_like_its_first(&fx, &what, &input, &expected, rule);
    }
    // Protocol alone rules the port rule out, so no guessing is needed: no match.
    let udp_to_web = Packet::udp(CLIENT, 40000, "198.18.100.10", 80)
        .with_payload(fragment_payload())
        .fragments(&[40]);
    for f in udp_to_web {
        let input = f.build();
        fx.check(
            "UDP fragment to the TCP-only web VIP",
            &input,
            &Expect::pass_unchanged(Reason::NoMatch, &input),
        );
    }
}

/// Fragments of a datagram to a 1:1 VIP: every fragment gets the same new address; the first
/// also gets its L4 checksum adjusted (it covers the pseudo-header), later ones only their IP
/// header. Reassembling the outputs must give a datagram with a valid L4 checksum.
#[test]
fn fragments_of_a_whole_address_rule_are_translated_consistently() {
    let fx = Fixture::load(WHOLE_ADDRESS_RULE);
    let cases = [
        (
            "TCP to VIP",
            "forward",
            Packet::tcp(CLIENT, 40000, "198.18.100.20", 443),
            Packet::tcp(CLIENT, 40000, "198.18.1.20", 443),
        ),
        (
            "UDP to VIP",
            "forward",
            Packet::udp(CLIENT, 40000, "198.18.100.20", 4789),
            Packet::udp(CLIENT, 40000, "198.18.1.20", 4789),
        ),
        (
            "ICMP echo to VIP",
            "forward",
            Packet::icmp_echo(CLIENT, "198.18.100.20"),
            Packet::icmp_echo(CLIENT, "198.18.1.20"),
        ),
        (
            "TCP reply from backend",
            "reply",
            Packet::tcp("198.18.1.20", 443, CLIENT, 40000),
            Packet::tcp("198.18.100.20", 443, CLIENT, 40000),
        ),
    ];
    for (what, direction, input, expected) in cases {
        for opts in [Vec::new(), options_ihl6()] {
            let inputs = input
                .clone()
                .with_payload(fragment_payload())
                .with_options(&opts)
                .fragments(&[40, 80]);
            let expected = expected
                .clone()
                .with_payload(fragment_payload())
                .with_options(&opts)
                .fragments(&[40, 80]);
            let mut outputs = Vec::new();
            for (i, (f, e)) in inputs.iter().zip(&expected).enumerate() {
                let dir = if direction == "forward" {
                    Dir::Original
                } else {
                    Dir::Reply
                };
                // Later fragments get the first fragment's addresses from the fragment cache.
                let expect = match (i, dir) {
                    (0, Dir::Original) => Expect::forward("whole", e.build()),
                    (0, Dir::Reply) => Expect::reply("whole", e.build()),
                    _ => Expect::fragment(e.build(), &[("whole", dir)]),
                };
                let label = format!("{what}, {} option bytes, fragment {i}", opts.len());
                let got = fx.check(&label, &f.build(), &expect);
                let want = if i == 0 {
                    L4Check::NeedsReassembly
                } else {
                    L4Check::NotApplicable
                };
                assert_eq!(got.l4, Some(want), "{label}");
                outputs.push(got.frame);
            }
            let refs: Vec<&[u8]> = outputs.iter().map(Vec::as_slice).collect();
            assert_eq!(
                verify_reassembled_l4_checksum(&refs),
                Ok(L4Check::Valid),
                "{what}: the translated fragments reassemble to a valid datagram"
            );
        }
    }
}

/// A first fragment too short to hold the TCP checksum field cannot have it adjusted: dropped
/// before anything is rewritten (RFC 1858 tiny fragments), never half-translated.
#[test]
fn tiny_first_tcp_fragment_of_a_whole_address_rule_is_dropped() {
    let fx = Fixture::load(WHOLE_ADDRESS_RULE);
    for cut in [8, 16] {
        let frags = Packet::tcp(CLIENT, 40000, "198.18.100.20", 443)
            .with_payload(fragment_payload())
            .fragments(&[cut]);
        let input = frags[0].build();
        fx.check(
            &format!("first fragment with {cut} TCP bytes"),
            &input,
            &Expect::drop_unchanged(Reason::TruncatedL4, &input),
        );
    }
}

/// Redirects quote a datagram too, but only make sense on the link they were sent on: they are
/// never translated and pass untouched (the other ICMP errors are translated, see
/// `fixtures_icmp.rs`).
#[test]
fn icmp_redirects_to_or_from_a_whole_address_vip_pass_unchanged() {
    let fx = Fixture::load(WHOLE_ADDRESS_RULE);
    let quoted_to_client = Packet::udp("198.18.100.20", 123, CLIENT, 5000).datagram();
    let quoted_from_backend = Packet::tcp(CLIENT, 40000, "198.18.1.20", 443).datagram();
    let cases = [
        (
            "redirect to the VIP",
            Packet::icmp(CLIENT, "198.18.100.20", ICMP_REDIRECT, 1, [198, 51, 100, 1])
                .with_payload(quoted_to_client[..IPV4_HLEN + 8].to_vec()),
        ),
        (
            "redirect from the backend",
            Packet::icmp("198.18.1.20", CLIENT, ICMP_REDIRECT, 1, [198, 18, 1, 1])
                .with_payload(quoted_from_backend[..IPV4_HLEN + 8].to_vec()),
        ),
    ];
    for (what, packet) in cases {
        for opts in [Vec::new(), options_ihl6()] {
            let input = packet.clone().with_options(&opts).build();
            fx.check(
                &format!("{what}, {} option bytes", opts.len()),
                &input,
                &Expect::pass_unchanged(Reason::IcmpErrorPassed, &input),
            );
        }
    }
    // Control: a translatable error between addresses no rule names goes to the ICMP error
    // program, which finds nothing to translate and passes it.
    let between_clients = Packet::udp(CLIENT2, 123, CLIENT, 5000).datagram();
    let input = Packet::icmp(CLIENT, CLIENT2, ICMP_DEST_UNREACH, 3, [0; 4])
        .with_payload(between_clients[..IPV4_HLEN + 8].to_vec())
        .build();
    fx.check(
        "port unreachable between clients",
        &input,
        &Expect::pass_unchanged(Reason::IcmpErrorPassed, &input),
    );
}
