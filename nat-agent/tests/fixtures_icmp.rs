//! Packet fixtures for ICMP error translation, run through the real XDP object (`xdp_nat` ->
//! `xdp_nat_icmp_error` by tail call, which BPF_PROG_TEST_RUN follows).
//!
//! Each test loads its own program instance, fills the maps from a TOML config, creates the
//! flows the errors are about by running their packets through the program (SNAT and stateful
//! DNAT sessions; the external endpoint the program chose is read back from `SESSIONS`), and
//! then sends errors about them. For every error it asserts the XDP action, the one exit
//! reason counter that moved, that no rule counter moved, and the exact output bytes against an
//! expected error built from scratch: the expected quote is the *restored* packet description
//! built and truncated like the input's quote, so every checksum in it (quoted IPv4 header,
//! quoted TCP/UDP/echo checksum, ICMP, outer IPv4) is computed fresh, never patched. Each
//! translated output is also re-parsed and its checksums recomputed from scratch (outer IPv4,
//! ICMP, quoted IPv4 header, and the quoted L4 checksum when the whole datagram is quoted).
//! The session tables are compared before and after: errors never create, refresh or change
//! a session.
//!
//! Needs root (loads BPF). Never skips.
//!
//! Addresses: inside hosts 198.18.0.x, an inside router 198.18.0.254, the external address
//! 203.0.113.1, remote servers 198.51.100.53/54 and a router on the way 198.51.100.1; VIPs
//! 198.18.100.x, backends 198.18.1.x and a router on their side 198.18.1.254; DNAT clients
//! 198.51.100.7 and 203.0.113.9 and a router on their side 203.0.113.254.

mod common;

use std::net::Ipv4Addr;

use common::{
    packet::{
        options_ihl15, options_ihl6, verify_icmp_error_checksums, L4Check, Packet, QuoteCheck,
        ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_TIME_EXCEEDED, IP_MF, L4,
    },
    xdp::{Expect, Fixture, XDP_PASS},
};
use nat_common::{conntrack::FlowKey, stats::Reason};

/// Parameter problem (an error; `rest[0]` points at the offending byte of the quote).
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// Redirect: an error type that is never translated.
const ICMP_REDIRECT: u8 = 5;
/// Destination unreachable codes.
const CODE_HOST_UNREACH: u8 = 1;
const CODE_PORT_UNREACH: u8 = 3;
const CODE_FRAG_NEEDED: u8 = 4;
/// Rest-of-header of "fragmentation needed" with next-hop MTU 1400.
const MTU_1400: [u8; 4] = [0, 0, 0x05, 0x78];

/// Inside hosts and an inside router.
const H1: &str = "198.18.0.2";
const INSIDE_ROUTER: &str = "198.18.0.254";
/// The external address.
const EXT: &str = "203.0.113.1";
/// Remote servers and a router on the way to them.
const SRV: &str = "198.51.100.53";
const SRV2: &str = "198.51.100.54";
const OUTSIDE_ROUTER: &str = "198.51.100.1";

/// SNAT onto one address with a port range no inside port of the fixtures is in, so every
/// flow's port (or echo id) changes and the quote's ports must be rewritten.
const SNAT: &str = r#"
[[interfaces]]
name = "nat0"

[conntrack]
max_sessions = 1024

[[snat]]
id = 1
name = "out"
source = "198.18.0.0/24"
to_address = "203.0.113.1"
port_range = "20000-20999"
"#;

/// DNAT clients and the routers on either side.
const CLIENT: &str = "198.51.100.7";
const CLIENT2: &str = "203.0.113.9";
const CLIENT_ROUTER: &str = "203.0.113.254";
const BACKEND_ROUTER: &str = "198.18.1.254";

/// Stateless DNAT: port rules (TCP and UDP, ports rewritten) and a whole-address rule.
const DNAT: &str = r#"
[[interfaces]]
name = "nat0"

[[dnat]]
id = 10
name = "web"
destination = "198.18.100.10"
protocol = "tcp"
port = 80
to_address = "198.18.1.10"
to_port = 8080

[[dnat]]
id = 11
name = "dns"
destination = "198.18.100.11"
protocol = "udp"
port = 53
to_address = "198.18.1.11"
to_port = 5353

[[dnat]]
id = 20
name = "whole"
destination = "198.18.100.20"
to_address = "198.18.1.20"
"#;

/// Two VIPs onto one backend port: ambiguous in reverse, so both rules are stateful.
const STATEFUL_DNAT: &str = r#"
[[interfaces]]
name = "nat0"

[conntrack]
max_sessions = 1024

[[dnat]]
id = 1
name = "vip-a"
destination = "198.18.100.30"
protocol = "tcp"
port = 80
to_address = "198.18.1.30"
to_port = 80

[[dnat]]
id = 2
name = "vip-b"
destination = "198.18.100.31"
protocol = "tcp"
port = 80
to_address = "198.18.1.30"
to_port = 80
"#;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// How much of the offending datagram an error quotes.
#[derive(Clone, Copy, Debug)]
enum Quote {
    /// The IPv4 header and 8 bytes (RFC 792): ports, UDP checksum or echo id; no TCP checksum.
    Rfc792,
    /// The whole datagram (RFC 1812 routers quote as much as fits).
    Whole,
}

const QUOTES: [Quote; 2] = [Quote::Rfc792, Quote::Whole];

/// The bytes an error quotes of `p`, cut from its from-scratch datagram.
fn quote(p: &Packet, how: Quote) -> Vec<u8> {
    let d = p.datagram();
    match how {
        Quote::Rfc792 => d[..p.ip_header_len() + 8].to_vec(),
        Quote::Whole => d,
    }
}

/// An ICMP error from `src` to `dst` quoting `quoted`.
fn error(src: &str, dst: &str, icmp_type: u8, code: u8, rest: [u8; 4], quoted: Vec<u8>) -> Packet {
    Packet::icmp(src, dst, icmp_type, code, rest).with_payload(quoted)
}

/// The connection-tracking key of a packet description (TCP/UDP ports; echo request
/// `sport = id`, reply `dport = id`), built independently of the program.
fn flow_key(p: &Packet) -> FlowKey {
    let (sport, dport) = match &p.l4 {
        L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport, .. } => (*sport, *dport),
        L4::Icmp {
            icmp_type: ICMP_ECHO_REQUEST,
            rest,
            ..
        } => (u16::from_be_bytes([rest[0], rest[1]]), 0),
        L4::Icmp {
            icmp_type: ICMP_ECHO_REPLY,
            rest,
            ..
        } => (0, u16::from_be_bytes([rest[0], rest[1]])),
        other => panic!("fixture bug: no tuple for {other:?}"),
    };
    FlowKey {
        src: p.src.octets(),
        dst: p.dst.octets(),
        sport: sport.to_be_bytes(),
        dport: dport.to_be_bytes(),
        proto: p.l4.proto(),
        _pad: [0; 3],
    }
}

/// `p` as the tuple `k` describes it (addresses, ports or echo id); everything else kept.
fn as_tuple(p: &Packet, k: &FlowKey) -> Packet {
    let mut q = p.clone();
    q.src = Ipv4Addr::from(k.src);
    q.dst = Ipv4Addr::from(k.dst);
    let (sport, dport) = (u16::from_be_bytes(k.sport), u16::from_be_bytes(k.dport));
    match &mut q.l4 {
        L4::Tcp {
            sport: s, dport: d, ..
        }
        | L4::Udp {
            sport: s, dport: d, ..
        } => {
            *s = sport;
            *d = dport;
        }
        L4::Icmp {
            icmp_type: ICMP_ECHO_REQUEST,
            rest,
            ..
        } => rest[..2].copy_from_slice(&sport.to_be_bytes()),
        L4::Icmp {
            icmp_type: ICMP_ECHO_REPLY,
            rest,
            ..
        } => rest[..2].copy_from_slice(&dport.to_be_bytes()),
        other => panic!("fixture bug: no tuple in {other:?}"),
    }
    q
}

/// The packet the other side sends back: addresses and ports swapped, an echo request turned
/// into its reply.
fn answer(p: &Packet) -> Packet {
    let mut q = p.clone();
    std::mem::swap(&mut q.src, &mut q.dst);
    match &mut q.l4 {
        L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport, .. } => std::mem::swap(sport, dport),
        L4::Icmp { icmp_type, .. } if *icmp_type == ICMP_ECHO_REQUEST => {
            *icmp_type = ICMP_ECHO_REPLY
        }
        other => panic!("fixture bug: no answer to {other:?}"),
    }
    q
}

/// Runs the first packet of a flow, which must create a session, and returns the packet as
/// it left (built from scratch from the tuple the session holds).
fn open_flow(fx: &mut Fixture, p: &Packet) -> Packet {
    let observed = fx.observe(&p.build());
    assert_eq!(
        observed.reasons(),
        vec![(Reason::SessionNew, 1)],
        "opening {p:?}"
    );
    let sessions = fx.conntrack_snapshot().sessions;
    let session = sessions
        .get(&flow_key(p))
        .unwrap_or_else(|| panic!("no session for {p:?}"));
    let sent = as_tuple(p, &session.translated);
    assert_eq!(observed.out.frame, sent.build(), "translation of {p:?}");
    sent
}

/// Checks that `input` comes out as exactly `expected`, counted `icmp_error_translated` and by
/// no rule, with every checksum of the output recomputed from scratch.
fn check_translated(fx: &Fixture, what: &str, input: &Packet, expected: &Packet, how: Quote) {
    let input = input.build();
    verify_icmp_error_checksums(&input)
        .unwrap_or_else(|e| panic!("fixture bug: {what}: input is inconsistent: {e}"));
    let expect = Expect {
        action: XDP_PASS,
        reason: Reason::IcmpErrorTranslated,
        output: expected.build(),
        rule: None,
        also: Vec::new(),
    };
    let checked = fx.check(what, &input, &expect);
    let found = verify_icmp_error_checksums(&checked.frame)
        .unwrap_or_else(|e| panic!("{what}: translated error has a bad checksum: {e}"));
    match how {
        Quote::Rfc792 => assert_eq!(found, QuoteCheck::HeaderOnly, "{what}"),
        Quote::Whole => assert!(
            matches!(
                found,
                QuoteCheck::Whole(L4Check::Valid | L4Check::UdpNoChecksum)
            ),
            "{what}: {found:?}"
        ),
    }
}

/// The error kinds sent about each flow: (name, type, code, rest of header).
fn error_kinds() -> [(&'static str, u8, u8, [u8; 4]); 4] {
    [
        ("time exceeded", ICMP_TIME_EXCEEDED, 0, [0; 4]),
        (
            "fragmentation needed",
            ICMP_DEST_UNREACH,
            CODE_FRAG_NEEDED,
            MTU_1400,
        ),
        (
            "host unreachable",
            ICMP_DEST_UNREACH,
            CODE_HOST_UNREACH,
            [0; 4],
        ),
        // Pointer 9: the quoted header's protocol byte.
        ("parameter problem", ICMP_PARAMETER_PROBLEM, 0, [9, 0, 0, 0]),
    ]
}

/// (inner options, outer options) combinations: none, options in the quote only, both.
fn option_combinations() -> [(&'static str, Vec<u8>, Vec<u8>); 3] {
    [
        ("no options", Vec::new(), Vec::new()),
        ("quoted IHL 6", options_ihl6(), Vec::new()),
        (
            "quoted IHL 15, outer IHL 6",
            options_ihl15(),
            options_ihl6(),
        ),
    ]
}

/// The inside flows of the SNAT tests: TCP, UDP and echo from H1 to SRV.
fn snat_flows() -> [(&'static str, Packet); 3] {
    [
        ("TCP", Packet::tcp(H1, 40000, SRV, 443)),
        ("UDP", Packet::udp(H1, 5000, SRV, 53)),
        ("echo", Packet::icmp_echo(H1, SRV)),
    ]
}

// ---------------------------------------------------------------------------------------------
// SNAT sessions
// ---------------------------------------------------------------------------------------------

/// Errors from outside quote the packet as it left (external address and port); they must reach
/// the inside host with the quote restored, from whoever reported them.
#[test]
fn snat_errors_from_outside_reach_the_inside_host() {
    let mut fx = Fixture::load(SNAT);
    let flows: Vec<(&str, Packet, Packet)> = snat_flows()
        .into_iter()
        .map(|(name, p)| {
            let sent = open_flow(&mut fx, &p);
            (name, p, sent)
        })
        .collect();
    let before = fx.conntrack_snapshot();

    for (flow, orig, sent) in &flows {
        assert_ne!(
            flow_key(orig).sport,
            flow_key(sent).sport,
            "{flow}: port kept"
        );
        for (kind, t, code, rest) in error_kinds() {
            for reporter in [OUTSIDE_ROUTER, SRV] {
                for how in QUOTES {
                    for (opts, inner, outer) in option_combinations() {
                        let what = format!("{flow}: {kind} from {reporter}, {how:?}, {opts}");
                        let sent = sent.clone().with_options(&inner);
                        let orig = orig.clone().with_options(&inner);
                        let input = error(reporter, EXT, t, code, rest, quote(&sent, how))
                            .with_options(&outer);
                        let expected = error(reporter, H1, t, code, rest, quote(&orig, how))
                            .with_options(&outer);
                        check_translated(&fx, &what, &input, &expected, how);
                    }
                }
            }
        }
    }
    assert_eq!(
        fx.conntrack_snapshot(),
        before,
        "errors changed the session tables"
    );
}

/// Errors from inside quote a reply as the inside host got it; they must leave as the external
/// address with the quote showing the reply as it arrived, inside router or host alike.
#[test]
fn snat_errors_from_inside_leave_as_the_external_address() {
    let mut fx = Fixture::load(SNAT);
    let mut flows: Vec<(String, Packet, Packet)> = Vec::new();
    for (name, p) in snat_flows() {
        let sent = open_flow(&mut fx, &p);
        flows.push((name.to_string(), p, sent));
    }
    // A UDP flow whose datagrams carry no checksum: the quoted 0 must stay 0.
    let no_sum = Packet::udp(H1, 5001, SRV, 123).without_udp_checksum();
    let sent = open_flow(&mut fx, &no_sum);
    flows.push(("UDP without checksum".into(), no_sum, sent));
    let before = fx.conntrack_snapshot();

    for (flow, orig, sent) in &flows {
        // What the inside host received, and what arrived from the server.
        let received = answer(orig);
        let arrived = answer(sent);
        let kinds = [
            (
                "port unreachable",
                ICMP_DEST_UNREACH,
                CODE_PORT_UNREACH,
                [0; 4],
            ),
            ("time exceeded", ICMP_TIME_EXCEEDED, 0, [0; 4]),
            (
                "parameter problem",
                ICMP_PARAMETER_PROBLEM,
                0,
                [20, 0, 0, 0],
            ),
        ];
        for (kind, t, code, rest) in kinds {
            for reporter in [H1, INSIDE_ROUTER] {
                for how in QUOTES {
                    for (opts, inner, outer) in option_combinations() {
                        let what = format!("{flow}: {kind} from {reporter}, {how:?}, {opts}");
                        let received = received.clone().with_options(&inner);
                        let arrived = arrived.clone().with_options(&inner);
                        let input = error(reporter, SRV, t, code, rest, quote(&received, how))
                            .with_options(&outer);
                        // The outer source becomes the external address whoever reported it:
                        // an inside address must never leave.
                        let expected = error(EXT, SRV, t, code, rest, quote(&arrived, how))
                            .with_options(&outer);
                        check_translated(&fx, &what, &input, &expected, how);
                    }
                }
            }
        }
    }
    assert_eq!(
        fx.conntrack_snapshot(),
        before,
        "errors changed the session tables"
    );
}

/// An error about no known flow never creates a session. Quoting a flow only the NAT could
/// carry (a reply to an inside host, an external port the NAT handed out) it is dropped and
/// counted; about anything else (an external port nobody holds) it is the kernel's.
#[test]
fn snat_errors_about_unknown_flows_are_dropped_or_passed_never_translated() {
    let mut fx = Fixture::load(SNAT);
    let udp = Packet::udp(H1, 5000, SRV, 53);
    let sent = open_flow(&mut fx, &udp);
    let before = fx.conntrack_snapshot();

    // From inside, about a reply no session knows (another inside port).
    let unknown_reply = Packet::udp(SRV, 53, H1, 6000);
    let input = error(
        H1,
        SRV,
        ICMP_DEST_UNREACH,
        CODE_PORT_UNREACH,
        [0; 4],
        quote(&unknown_reply, Quote::Rfc792),
    )
    .build();
    fx.check(
        "port unreachable from inside about an unknown reply",
        &input,
        &Expect::drop_unchanged(Reason::IcmpErrorUnmatched, &input),
    );

    // From outside, about the external port the UDP flow holds but towards another server (a
    // session that does not exist: forged, or long gone).
    let other_server = sent.clone().with_dst(SRV2);
    for how in QUOTES {
        let input = error(
            OUTSIDE_ROUTER,
            EXT,
            ICMP_TIME_EXCEEDED,
            0,
            [0; 4],
            quote(&other_server, how),
        )
        .build();
        fx.check(
            &format!("time exceeded about a held external port, unknown flow, {how:?}"),
            &input,
            &Expect::drop_unchanged(Reason::IcmpErrorUnmatched, &input),
        );
    }

    // From outside, about an external port no mapping holds: not NAT traffic as far as the NAT
    // can tell (the appliance's own, say), so the kernel gets it untouched.
    let unheld = sent.clone().with_sport(20999);
    let input = error(
        SRV,
        EXT,
        ICMP_DEST_UNREACH,
        CODE_PORT_UNREACH,
        [0; 4],
        quote(&unheld, Quote::Rfc792),
    )
    .build();
    fx.check(
        "port unreachable about an external port nobody holds",
        &input,
        &Expect::pass_unchanged(Reason::IcmpErrorPassed, &input),
    );

    assert_eq!(
        fx.conntrack_snapshot(),
        before,
        "an error created or changed a session"
    );
}

// ---------------------------------------------------------------------------------------------
// Stateless DNAT
// ---------------------------------------------------------------------------------------------

/// A backend, or a router on its side, reports a packet the NAT sent it (client -> backend):
/// the client gets the error from the VIP, quoting what it sent to the VIP.
#[test]
fn dnat_errors_from_the_backend_side_come_from_the_vip() {
    let fx = Fixture::load(DNAT);
    // (flow, client's packet, the packet the backend got).
    let flows = [
        (
            "TCP port rule",
            Packet::tcp(CLIENT, 40000, "198.18.100.10", 80),
            Packet::tcp(CLIENT, 40000, "198.18.1.10", 8080),
        ),
        (
            "UDP port rule",
            Packet::udp(CLIENT2, 5000, "198.18.100.11", 53),
            Packet::udp(CLIENT2, 5000, "198.18.1.11", 5353),
        ),
        (
            "echo, whole address",
            Packet::icmp_echo(CLIENT, "198.18.100.20"),
            Packet::icmp_echo(CLIENT, "198.18.1.20"),
        ),
    ];
    for (flow, orig, got) in &flows {
        let vip = orig.dst.to_string();
        let backend = got.dst.to_string();
        let client = orig.src.to_string();
        for (kind, t, code, rest) in error_kinds() {
            for reporter in [backend.as_str(), BACKEND_ROUTER] {
                for how in QUOTES {
                    for (opts, inner, outer) in option_combinations() {
                        let what = format!("{flow}: {kind} from {reporter}, {how:?}, {opts}");
                        let got = got.clone().with_options(&inner);
                        let orig = orig.clone().with_options(&inner);
                        let input = error(reporter, &client, t, code, rest, quote(&got, how))
                            .with_options(&outer);
                        let expected = error(&vip, &client, t, code, rest, quote(&orig, how))
                            .with_options(&outer);
                        check_translated(&fx, &what, &input, &expected, how);
                    }
                }
            }
        }
    }
}

/// A router on the client's side reports a reply the NAT sent from the VIP: the backend gets
/// the error, quoting the reply as it sent it; the router stays visible.
#[test]
fn dnat_errors_from_the_client_side_reach_the_backend() {
    let fx = Fixture::load(DNAT);
    // (flow, the backend's reply, the reply as it left the NAT).
    let flows = [
        (
            "TCP port rule",
            Packet::tcp("198.18.1.10", 8080, CLIENT, 40000),
            Packet::tcp("198.18.100.10", 80, CLIENT, 40000),
        ),
        (
            "UDP port rule",
            Packet::udp("198.18.1.11", 5353, CLIENT2, 5000),
            Packet::udp("198.18.100.11", 53, CLIENT2, 5000),
        ),
        (
            "echo reply, whole address",
            Packet::icmp_echo_reply("198.18.1.20", CLIENT),
            Packet::icmp_echo_reply("198.18.100.20", CLIENT),
        ),
    ];
    for (flow, reply, left) in &flows {
        let vip = left.src.to_string();
        let backend = reply.src.to_string();
        for (kind, t, code, rest) in error_kinds() {
            for how in QUOTES {
                for (opts, inner, outer) in option_combinations() {
                    let what = format!("{flow}: {kind}, {how:?}, {opts}");
                    let left = left.clone().with_options(&inner);
                    let reply = reply.clone().with_options(&inner);
                    let input = error(CLIENT_ROUTER, &vip, t, code, rest, quote(&left, how))
                        .with_options(&outer);
                    let expected =
                        error(CLIENT_ROUTER, &backend, t, code, rest, quote(&reply, how))
                            .with_options(&outer);
                    check_translated(&fx, &what, &input, &expected, how);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Stateful DNAT
// ---------------------------------------------------------------------------------------------

/// Sessions of stateful DNAT rules restore the VIP the client used; an error about a flow such
/// a rule would need a session for, without one, is dropped and counted.
#[test]
fn stateful_dnat_errors_follow_the_session() {
    let mut fx = Fixture::load(STATEFUL_DNAT);
    let orig = Packet::tcp(CLIENT, 40000, "198.18.100.31", 80).with_tcp_flags(0x02);
    let got = open_flow(&mut fx, &orig);
    assert_eq!(got.dst.to_string(), "198.18.1.30");
    let before = fx.conntrack_snapshot();

    for how in QUOTES {
        let what = format!("time exceeded from the backend's side, {how:?}");
        let input = error(
            BACKEND_ROUTER,
            CLIENT,
            ICMP_TIME_EXCEEDED,
            0,
            [0; 4],
            quote(&got, how),
        );
        let expected = error(
            "198.18.100.31",
            CLIENT,
            ICMP_TIME_EXCEEDED,
            0,
            [0; 4],
            quote(&orig, how),
        );
        check_translated(&fx, &what, &input, &expected, how);

        let what = format!("fragmentation needed from the client's side, {how:?}");
        let reply = answer(&got).with_tcp_flags(0x12);
        let left = answer(&orig).with_tcp_flags(0x12);
        let input = error(
            CLIENT_ROUTER,
            "198.18.100.31",
            ICMP_DEST_UNREACH,
            CODE_FRAG_NEEDED,
            MTU_1400,
            quote(&left, how),
        );
        let expected = error(
            CLIENT_ROUTER,
            "198.18.1.30",
            ICMP_DEST_UNREACH,
            CODE_FRAG_NEEDED,
            MTU_1400,
            quote(&reply, how),
        );
        check_translated(&fx, &what, &input, &expected, how);
    }

    // The other VIP's reply to another client: the rule is stateful and there is no session.
    let unknown = Packet::tcp("198.18.100.30", 80, CLIENT2, 40001);
    let input = error(
        CLIENT_ROUTER,
        "198.18.100.30",
        ICMP_TIME_EXCEEDED,
        0,
        [0; 4],
        quote(&unknown, Quote::Rfc792),
    )
    .build();
    fx.check(
        "time exceeded about a stateful rule's flow without a session",
        &input,
        &Expect::drop_unchanged(Reason::IcmpErrorUnmatched, &input),
    );
    assert_eq!(
        fx.conntrack_snapshot(),
        before,
        "errors changed the session tables"
    );
}

// ---------------------------------------------------------------------------------------------
// What is not translated
// ---------------------------------------------------------------------------------------------

/// Errors whose quote cannot be read are dropped and counted, never rewritten; so is an error
/// about a known flow that arrives fragmented (its later fragments could not follow).
#[test]
fn malformed_errors_are_dropped_untouched() {
    let mut fx = Fixture::load(SNAT);
    let sent = open_flow(&mut fx, &Packet::udp(H1, 5000, SRV, 53));
    let before = fx.conntrack_snapshot();
    let whole = sent.datagram();
    let hlen = sent.ip_header_len();

    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("quote of a header and 4 bytes", whole[..hlen + 4].to_vec()),
        ("quote shorter than a header", whole[..12].to_vec()),
        ("empty quote", Vec::new()),
    ];
    let mut bad_ihl = whole[..hlen + 8].to_vec();
    bad_ihl[0] = 0x44;
    cases.push(("quoted IHL 4", bad_ihl));
    let mut bad_version = whole[..hlen + 8].to_vec();
    bad_version[0] = 0x65;
    cases.push(("quoted version 6", bad_version));
    // IHL 15 claims 60 header bytes; the quote has 28.
    let mut long_header = whole[..hlen + 8].to_vec();
    long_header[0] = 0x4f;
    cases.push(("quoted IHL beyond the quote", long_header));
    let mut short_total = whole[..hlen + 8].to_vec();
    short_total[2..4].copy_from_slice(&12u16.to_be_bytes());
    cases.push(("quoted total length below its header", short_total));

    for (what, quoted) in cases {
        let input = error(OUTSIDE_ROUTER, EXT, ICMP_TIME_EXCEEDED, 0, [0; 4], quoted).build();
        fx.check(
            what,
            &input,
            &Expect::drop_unchanged(Reason::IcmpErrorMalformed, &input),
        );
    }

    let input = error(
        OUTSIDE_ROUTER,
        EXT,
        ICMP_TIME_EXCEEDED,
        0,
        [0; 4],
        quote(&sent, Quote::Whole),
    )
    .with_frag(IP_MF)
    .build();
    fx.check(
        "first fragment of an error about a known flow",
        &input,
        &Expect::drop_unchanged(Reason::IcmpErrorMalformed, &input),
    );
    assert_eq!(fx.conntrack_snapshot(), before);
}

/// Errors about traffic no rule translates (routed through, or the appliance's own) and
/// redirects reach the kernel untouched.
#[test]
fn errors_about_untranslated_traffic_pass_untouched() {
    let fx = Fixture::load(DNAT);
    let routed = Packet::udp(CLIENT, 5000, CLIENT2, 53);
    let input = error(
        CLIENT2,
        CLIENT,
        ICMP_DEST_UNREACH,
        CODE_PORT_UNREACH,
        [0; 4],
        quote(&routed, Quote::Rfc792),
    )
    .build();
    fx.check(
        "port unreachable between clients",
        &input,
        &Expect::pass_unchanged(Reason::IcmpErrorPassed, &input),
    );

    // A UDP quote from the TCP-only VIP: no rule matches the quoted packet.
    let other_proto = Packet::udp("198.18.100.10", 80, CLIENT, 40000);
    let input = error(
        CLIENT_ROUTER,
        "198.18.100.10",
        ICMP_TIME_EXCEEDED,
        0,
        [0; 4],
        quote(&other_proto, Quote::Rfc792),
    )
    .build();
    fx.check(
        "time exceeded quoting a protocol the VIP's rule does not take",
        &input,
        &Expect::pass_unchanged(Reason::IcmpErrorPassed, &input),
    );

    // Redirects only make sense on their own link: never translated (as before: the
    // whole-address rule matches the ICMP packet, which is passed).
    let reply = Packet::icmp_echo_reply("198.18.100.20", CLIENT);
    let input = error(
        CLIENT_ROUTER,
        "198.18.100.20",
        ICMP_REDIRECT,
        1,
        [198, 51, 100, 1],
        quote(&reply, Quote::Rfc792),
    )
    .build();
    fx.check(
        "redirect to a VIP",
        &input,
        &Expect::pass_unchanged(Reason::IcmpErrorPassed, &input),
    );
}
