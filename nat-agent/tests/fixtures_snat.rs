//! Packet fixtures for connection-tracked SNAT, MASQUERADE and stateful DNAT, run through the
//! real XDP object (`xdp_nat` -> `xdp_nat_rules` -> `xdp_nat_new_flow`, joined by tail calls,
//! which BPF_PROG_TEST_RUN follows) with BPF_PROG_TEST_RUN.
//!
//! Each test loads its own program instance (own maps, `max_sessions = 1024` to keep loading
//! cheap), fills the maps from a TOML config as an operator would write it, and for every frame
//! asserts: the XDP action, the one exit reason counter that moved, the per-rule counters, the
//! exact output bytes against an expected frame built from scratch (fresh checksums), and the
//! IP and L4 checksums of translated output recomputed from scratch. Where the program chooses
//! something (an external port), the choice is read back from `MAPPINGS`, checked against the
//! rule (range, distinctness), and the expected frame is then built with it. The session,
//! reply, mapping and binding tables are read back through the agent's own `SessionStore` and
//! checked entry by entry.
//!
//! MASQUERADE and `out_interface` need the kernel's FIB: those tests run on a thread inside a
//! fresh network namespace with two veths (n0 198.18.0.1/24, n1 203.0.113.1/24, forwarding on)
//! and pass n0 (or n1 for replies) as the ingress interface in the run's `xdp_md` context.
//!
//! Needs root (loads BPF, creates namespaces). Never skips: a missing capability fails every
//! test.
//!
//! Addresses: inside hosts 198.18.0.x (synthetic table fillers 198.19.x.x), external (pool)
//! addresses 203.0.113.x, remote servers 198.51.100.x (and 203.0.113.10 behind n1 in the FIB
//! lab), VIPs 198.18.100.x, backends 198.18.1.x.

mod common;

use std::{collections::BTreeSet, net::Ipv4Addr};

use aya::maps::{HashMap as BpfHashMap, MapData};
use common::{
    lab::two_leg_lab,
    packet::{
        addr, verify_icmp_error_checksums, Packet, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, L4,
        PROTO_GRE, UDP_HLEN,
    },
    xdp::{Dir, Expect, Fixture, XDP_PASS, XDP_TX},
};
use nat_agent::dataplane::{interface_index, MemStore, SessionStore};
use nat_common::{
    conntrack::{
        pool_index_for, tcp_flags::*, Endpoint, FlowKey, Session, TcpState, NO_RULE, SESSION_DNAT,
        SESSION_SNAT,
    },
    ipv4::proto,
    session_filter::Counted,
    stats::Reason,
};

/// Inside hosts.
const H1: &str = "198.18.0.2";
const H2: &str = "198.18.0.3";
const H3: &str = "198.18.0.4";
const H4: &str = "198.18.0.5";
const H5: &str = "198.18.0.6";
/// The one external address of [`POOL`].
const EXT: &str = "203.0.113.1";
/// Remote servers.
const SRV: &str = "198.51.100.53";
const SRV2: &str = "198.51.100.54";

/// The default external port range, spelled out in the configs.
const PORT_MIN: u16 = 1024;
const PORT_MAX: u16 = 65535;

/// One subnet leaving as one address, default port range.
const POOL: &str = common::xdp::SNAT_ONE_ADDRESS;

// ---------------------------------------------------------------------------------------------
// Helpers: tuples of packets, expected frames, tables
// ---------------------------------------------------------------------------------------------

/// The echo identifier of an ICMP echo description.
fn echo_id(rest: &[u8; 4]) -> u16 {
    u16::from_be_bytes([rest[0], rest[1]])
}

/// The connection-tracking key of a packet description, built independently of the program:
/// TCP/UDP ports; ICMP echo request `sport = id, dport = 0`, reply `sport = 0, dport = id`.
fn flow_key(p: &Packet) -> FlowKey {
    let (sport, dport) = match &p.l4 {
        L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport, .. } => (*sport, *dport),
        L4::Icmp {
            icmp_type: ICMP_ECHO_REQUEST,
            rest,
            ..
        } => (echo_id(rest), 0),
        L4::Icmp {
            icmp_type: ICMP_ECHO_REPLY,
            rest,
            ..
        } => (0, echo_id(rest)),
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

fn endpoint(address: &str, port: u16, protocol: u8) -> Endpoint {
    Endpoint {
        addr: addr(address).octets(),
        port: port.to_be_bytes(),
        proto: protocol,
        _pad: 0,
    }
}

/// The inside endpoint (source address and port / echo id) of an original-direction packet.
fn source_endpoint(p: &Packet) -> Endpoint {
    let k = flow_key(p);
    Endpoint {
        addr: k.src,
        port: k.sport,
        proto: k.proto,
        _pad: 0,
    }
}

fn port(e: &Endpoint) -> u16 {
    u16::from_be_bytes(e.port)
}

fn ip(e: &Endpoint) -> Ipv4Addr {
    Ipv4Addr::from(e.addr)
}

/// `p` with its source address and port (echo id of a request) replaced by `e`.
fn with_source(p: &Packet, e: &Endpoint) -> Packet {
    let mut q = p.clone();
    q.src = ip(e);
    match &q.l4 {
        L4::Icmp { .. } => q.with_echo_id(port(e)),
        _ => q.with_sport(port(e)),
    }
}

/// `p` with its destination address and port replaced.
fn with_destination(p: &Packet, address: &str, dport: u16) -> Packet {
    p.clone().with_dst(address).with_dport(dport)
}

/// The packet the other side sends back: addresses and ports swapped, an echo request turned
/// into its reply (same id and data). TCP flags and payload stay; callers set them.
fn answer(p: &Packet) -> Packet {
    let mut q = p.clone();
    std::mem::swap(&mut q.src, &mut q.dst);
    q.l4 = match q.l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
            payload,
        } => L4::Tcp {
            sport: dport,
            dport: sport,
            flags,
            payload,
        },
        L4::Udp {
            sport,
            dport,
            payload,
            checksum,
        } => L4::Udp {
            sport: dport,
            dport: sport,
            payload,
            checksum,
        },
        L4::Icmp {
            icmp_type: ICMP_ECHO_REQUEST,
            code,
            rest,
            payload,
        } => L4::Icmp {
            icmp_type: ICMP_ECHO_REPLY,
            code,
            rest,
            payload,
        },
        other => panic!("fixture bug: no answer to {other:?}"),
    };
    q
}

/// A TCP segment without data and with `flags` (handshake and teardown segments).
fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Packet {
    Packet::tcp(src, sport, dst, dport)
        .with_payload(Vec::new())
        .with_tcp_flags(flags)
}

/// Runs the first packet of a new SNAT flow: it must create a session (`session_new`), counted
/// by `rule`. The external endpoint the program chose is read back from `MAPPINGS` (which must
/// map the packet's inside endpoint), and the output must then be exactly `input` with that
/// source. Returns the external endpoint.
fn start(fx: &mut Fixture, what: &str, input: &Packet, rule: &'static str) -> Endpoint {
    let observed = fx.observe(&input.build());
    assert_eq!(
        observed.reasons(),
        [(Reason::SessionNew, 1)],
        "{what}: the first packet of a flow must create a session"
    );
    let inside = source_endpoint(input);
    let mapping = fx
        .conntrack()
        .mappings()
        .get(&inside)
        .expect("reading MAPPINGS")
        .unwrap_or_else(|| panic!("{what}: no MAPPINGS entry for the inside endpoint"));
    let ext = mapping.external;
    assert_eq!(ext.proto, inside.proto, "{what}: mapping protocol");
    let expected = with_source(input, &ext);
    fx.verify(
        what,
        &observed,
        &Expect::session(
            Reason::SessionNew,
            expected.build(),
            &[(rule, Dir::Original)],
        ),
    );
    ext
}

/// Checks one packet of an existing SNAT flow in the original direction (`session_orig`).
fn orig(fx: &Fixture, what: &str, input: &Packet, ext: &Endpoint, rule: &'static str) {
    fx.check(
        what,
        &input.build(),
        &Expect::session(
            Reason::SessionOrig,
            with_source(input, ext).build(),
            &[(rule, Dir::Original)],
        ),
    );
}

/// Checks the reply to `original` (an untranslated original-direction packet whose flow was
/// given `ext`): the remote answers `ext`, and the NAT must restore the inside endpoint
/// exactly (`session_reply`).
fn reply(fx: &Fixture, what: &str, original: &Packet, ext: &Endpoint, rule: &'static str) {
    let input = answer(&with_source(original, ext));
    let expected = answer(original);
    fx.check(
        what,
        &input.build(),
        &Expect::session(
            Reason::SessionReply,
            expected.build(),
            &[(rule, Dir::Reply)],
        ),
    );
}

/// An SNAT-only session as the kernel should have stored it (timestamps and counters are the
/// caller's business).
fn snat_session(fx: &Fixture, rule: &str, translated: FlowKey) -> Session {
    Session {
        translated,
        dnat_rule: NO_RULE,
        snat_rule: fx.slot(rule),
        flags: SESSION_SNAT,
        ..Default::default()
    }
}

/// Asserts the session stored under `key` equals `want` in every field but the timestamps
/// (which must be set and ordered), and that its reply entry points back at `key`. Returns
/// the stored session.
fn assert_session(what: &str, key: &FlowKey, mut want: Session, fx: &mut Fixture) -> Session {
    let got = fx
        .conntrack()
        .sessions()
        .get(key)
        .expect("reading SESSIONS")
        .unwrap_or_else(|| panic!("{what}: no session for {key:?}"));
    assert!(
        got.created_ns > 0 && got.last_seen_ns >= got.created_ns,
        "{what}: timestamps created {} last seen {}",
        got.created_ns,
        got.last_seen_ns
    );
    want.created_ns = got.created_ns;
    want.last_seen_ns = got.last_seen_ns;
    assert_eq!(got, want, "{what}: session");
    let back = fx
        .conntrack()
        .replies()
        .get(&got.translated.reversed())
        .expect("reading REPLIES");
    assert_eq!(back, Some(*key), "{what}: reply entry of the session");
    got
}

/// Table-wide invariants: every session has its reply entry and every reply entry its
/// session; every mapping its port claim and every claim its mapping; every SNAT session's
/// inside endpoint is mapped to exactly the source the session translates to.
/// Counts a synthetic entry about to be written into `SESSIONS` from the test, as the program
/// counts its own.
fn count_in_session_filter(fx: &mut Fixture, key: &FlowKey) {
    fx.conntrack()
        .filter()
        .expect("the loaded object has no session filter")
        .count(key, Counted::Sessions);
}

fn assert_consistent(state: &MemStore, what: &str) {
    for (key, s) in &state.sessions {
        assert_eq!(
            state.replies.get(&s.translated.reversed()),
            Some(key),
            "{what}: session {key:?} without its reply entry"
        );
        if s.flags & SESSION_SNAT != 0 {
            let inside = Endpoint {
                addr: key.src,
                port: key.sport,
                proto: key.proto,
                _pad: 0,
            };
            let m = state
                .mappings
                .get(&inside)
                .unwrap_or_else(|| panic!("{what}: SNAT session {key:?} without a mapping"));
            assert_eq!(
                (m.external.addr, m.external.port),
                (s.translated.src, s.translated.sport),
                "{what}: mapping of {inside:?} disagrees with session {key:?}"
            );
        }
    }
    for (reply_key, key) in &state.replies {
        let s = state
            .sessions
            .get(key)
            .unwrap_or_else(|| panic!("{what}: reply entry {reply_key:?} without a session"));
        assert_eq!(s.translated.reversed(), *reply_key, "{what}: reply entry");
    }
    for (inside, m) in &state.mappings {
        assert_eq!(m.external.proto, inside.proto, "{what}: mapping protocol");
        assert_eq!(
            state.bindings.get(&m.external),
            Some(inside),
            "{what}: mapping {inside:?} without its port claim"
        );
    }
    for (external, inside) in &state.bindings {
        assert_eq!(
            state.mappings.get(inside).map(|m| m.external),
            Some(*external),
            "{what}: port claim {external:?} without its mapping"
        );
    }
}

/// The number of entries in each table: (sessions, replies, mappings, bindings).
fn sizes(state: &MemStore) -> (usize, usize, usize, usize) {
    (
        state.sessions.len(),
        state.replies.len(),
        state.mappings.len(),
        state.bindings.len(),
    )
}

fn in_range(p: u16, min: u16, max: u16) -> bool {
    (min..=max).contains(&p)
}

// ---------------------------------------------------------------------------------------------
// First packet, replies, next packets
// ---------------------------------------------------------------------------------------------

#[test]
fn udp_first_packet_creates_the_session_reply_is_restored_next_packet_uses_it() {
    let mut fx = Fixture::load(POOL);
    let first = Packet::udp(H1, 40000, SRV, 123);
    let translated = Packet::udp(EXT, 40000, SRV, 123);
    let len = first.build().len() as u64;

    // Exact rewrite: source to the pool address, the free in-range port kept.
    fx.check(
        "first UDP packet",
        &first.build(),
        &Expect::session(
            Reason::SessionNew,
            translated.build(),
            &[("out", Dir::Original)],
        ),
    );
    let state = fx.conntrack_snapshot();
    assert_eq!(sizes(&state), (1, 1, 1, 1), "one entry per table");
    let key = flow_key(&first);
    let s = assert_session(
        "after the first packet",
        &key,
        Session {
            orig_packets: 1,
            orig_bytes: len,
            ..snat_session(&fx, "out", flow_key(&translated))
        },
        &mut fx,
    );
    let inside = endpoint(H1, 40000, proto::UDP);
    let external = endpoint(EXT, 40000, proto::UDP);
    let m = state.mappings[&inside];
    assert_eq!(m.external, external, "mapping");
    // Stamped when the port was claimed, just before the session was created.
    assert!(
        m.last_used_ns > 0 && m.last_used_ns <= s.created_ns,
        "mapping stamped at creation: {} against session {}",
        m.last_used_ns,
        s.created_ns
    );
    assert_eq!(state.bindings[&external], inside, "port claim");

    // The reply (public -> external ip:port) is restored exactly.
    let reply_in = Packet::udp(SRV, 123, EXT, 40000);
    let reply_out = Packet::udp(SRV, 123, H1, 40000);
    fx.check(
        "reply",
        &reply_in.build(),
        &Expect::session(
            Reason::SessionReply,
            reply_out.build(),
            &[("out", Dir::Reply)],
        ),
    );
    let after_reply = assert_session(
        "after the reply",
        &key,
        Session {
            orig_packets: 1,
            orig_bytes: len,
            reply_packets: 1,
            reply_bytes: len,
            ..snat_session(&fx, "out", flow_key(&translated))
        },
        &mut fx,
    );
    assert_eq!(after_reply.created_ns, s.created_ns);

    // The next original packet goes through the session.
    fx.check(
        "second original packet",
        &first.build(),
        &Expect::session(
            Reason::SessionOrig,
            translated.build(),
            &[("out", Dir::Original)],
        ),
    );
    let last = assert_session(
        "after the second packet",
        &key,
        Session {
            orig_packets: 2,
            orig_bytes: 2 * len,
            reply_packets: 1,
            reply_bytes: len,
            ..snat_session(&fx, "out", flow_key(&translated))
        },
        &mut fx,
    );
    assert!(last.last_seen_ns >= after_reply.last_seen_ns);
    let state = fx.conntrack_snapshot();
    assert_eq!(
        sizes(&state),
        (1, 1, 1, 1),
        "no new entries for known packets"
    );
    assert_consistent(&state, "end");
    fx.assert_session_filter_exact("end");
}

#[test]
fn new_flows_with_ip_options_vlan_tags_padding_and_no_udp_checksum_are_exact() {
    let mut fx = Fixture::load(POOL);
    let cases = [
        (
            "IHL 15",
            Packet::udp(H1, 41000, SRV, 123).with_options(&common::packet::options_ihl15()),
        ),
        (
            "VLAN 100 + IHL 6",
            Packet::tcp(H1, 41001, SRV, 443)
                .with_vlan(100)
                .with_options(&common::packet::options_ihl6()),
        ),
        (
            "UDP without checksum",
            Packet::udp(H1, 41002, SRV, 123).without_udp_checksum(),
        ),
        (
            "padded to 60 bytes",
            Packet::udp(H1, 41003, SRV, 123)
                .with_payload(vec![1, 2])
                .padded_to(common::packet::ETH_MIN_FRAME),
        ),
        (
            "ICMP echo, VLAN 7",
            Packet::icmp_echo(H1, SRV).with_echo_id(41004).with_vlan(7),
        ),
    ];
    for (what, input) in cases {
        let ext = start(&mut fx, &format!("{what}: first packet"), &input, "out");
        assert_eq!(
            ext,
            Endpoint {
                addr: addr(EXT).octets(),
                ..source_endpoint(&input)
            },
            "{what}: free in-range port kept"
        );
        reply(&fx, &format!("{what}: reply"), &input, &ext, "out");
        orig(&fx, &format!("{what}: next packet"), &input, &ext, "out");
    }
    let state = fx.conntrack_snapshot();
    assert_eq!(sizes(&state), (5, 5, 5, 5));
    assert_consistent(&state, "end");
    fx.assert_session_filter_exact("end");
}

#[test]
fn tcp_syn_creates_syn_sent_and_the_handshake_and_teardown_advance_the_state() {
    let mut fx = Fixture::load(POOL);
    let syn = tcp(H1, 40100, SRV, 443, SYN);
    let key = flow_key(&syn);
    let ext = endpoint(EXT, 40100, proto::TCP);
    let translated = flow_key(&with_source(&syn, &ext));
    let len = syn.build().len() as u64;
    let state_of = |fx: &mut Fixture| {
        let s = fx.conntrack().sessions().get(&key).unwrap().unwrap();
        TcpState::from_u8(s.tcp_state)
    };

    let got = start(&mut fx, "SYN", &syn, "out");
    assert_eq!(got, ext, "free in-range port kept");
    assert_session(
        "after SYN",
        &key,
        Session {
            tcp_state: TcpState::SynSent as u8,
            orig_packets: 1,
            orig_bytes: len,
            ..snat_session(&fx, "out", translated)
        },
        &mut fx,
    );

    // (what, direction, flags, state after)
    let steps = [
        ("SYN-ACK", Dir::Reply, SYN | ACK, TcpState::SynRecv),
        ("ACK", Dir::Original, ACK, TcpState::Established),
        ("data", Dir::Original, ACK | 0x08, TcpState::Established),
        ("data back", Dir::Reply, ACK | 0x08, TcpState::Established),
        (
            "FIN from the inside",
            Dir::Original,
            FIN | ACK,
            TcpState::FinOrig,
        ),
        ("ACK of it", Dir::Reply, ACK, TcpState::FinOrig),
        (
            "FIN from the remote",
            Dir::Reply,
            FIN | ACK,
            TcpState::TimeWait,
        ),
        ("last ACK", Dir::Original, ACK, TcpState::TimeWait),
        (
            "new SYN on the tuple",
            Dir::Original,
            SYN,
            TcpState::SynSent,
        ),
        (
            "RST from the remote",
            Dir::Reply,
            RST | ACK,
            TcpState::Closed,
        ),
    ];
    let (mut origs, mut replies) = (1u64, 0u64);
    for (what, dir, flags, after) in steps {
        let original = syn.clone().with_tcp_flags(flags);
        match dir {
            Dir::Original => {
                orig(&fx, what, &original, &ext, "out");
                origs += 1;
            }
            Dir::Reply => {
                reply(&fx, what, &original, &ext, "out");
                replies += 1;
            }
        }
        assert_eq!(state_of(&mut fx), after, "state after {what}");
    }
    assert_session(
        "end",
        &key,
        Session {
            tcp_state: TcpState::Closed as u8,
            orig_packets: origs,
            orig_bytes: origs * len,
            reply_packets: replies,
            reply_bytes: replies * len,
            ..snat_session(&fx, "out", translated)
        },
        &mut fx,
    );
    assert_consistent(&fx.conntrack_snapshot(), "end");
    fx.assert_session_filter_exact("end");
}

#[test]
fn tcp_picked_up_mid_stream_starts_established() {
    let mut fx = Fixture::load(POOL);
    let ack = tcp(H1, 40200, SRV, 443, ACK);
    let ext = start(&mut fx, "ACK as first packet", &ack, "out");
    let s = fx
        .conntrack()
        .sessions()
        .get(&flow_key(&ack))
        .unwrap()
        .unwrap();
    assert_eq!(TcpState::from_u8(s.tcp_state), TcpState::Established);
    reply(&fx, "reply", &ack, &ext, "out");
}

// ---------------------------------------------------------------------------------------------
// Endpoint-independent mapping, port preservation and collisions
// ---------------------------------------------------------------------------------------------

#[test]
fn a_second_flow_from_the_same_inside_endpoint_reuses_the_external_endpoint() {
    let mut fx = Fixture::load(POOL);
    // Port 40000 is kept (free, in range); port 123 must be moved into 1024-65535 at a random
    // place, so reuse there cannot be mistaken for port preservation.
    for (label, sport) in [("preserved port", 40000), ("allocated port", 123)] {
        for (pname, to_srv, to_srv2) in [
            (
                "UDP",
                Packet::udp(H1, sport, SRV, 123),
                Packet::udp(H1, sport, SRV2, 5353),
            ),
            (
                "TCP",
                tcp(H1, sport, SRV, 443, SYN),
                tcp(H1, sport, SRV2, 8443, SYN),
            ),
        ] {
            let what = format!("{pname}, {label}");
            let ext = start(&mut fx, &format!("{what}: flow to {SRV}"), &to_srv, "out");
            assert_eq!(ip(&ext), addr(EXT));
            if sport == 40000 {
                assert_eq!(port(&ext), 40000, "{what}: free in-range port kept");
            } else {
                assert!(in_range(port(&ext), PORT_MIN, PORT_MAX), "{what}: {ext:?}");
            }
            let ext2 = start(&mut fx, &format!("{what}: flow to {SRV2}"), &to_srv2, "out");
            assert_eq!(
                ext2, ext,
                "{what}: same external endpoint towards another host"
            );
            // Both flows are sessions of their own, with their own replies.
            reply(
                &fx,
                &format!("{what}: reply from {SRV}"),
                &to_srv,
                &ext,
                "out",
            );
            reply(
                &fx,
                &format!("{what}: reply from {SRV2}"),
                &to_srv2,
                &ext,
                "out",
            );
        }
    }
    let state = fx.conntrack_snapshot();
    // 8 flows over 4 inside endpoints (2 ports x 2 protocols).
    assert_eq!(sizes(&state), (8, 8, 4, 4));
    assert_consistent(&state, "end");
    fx.assert_session_filter_exact("end");
}

#[test]
fn port_collision_falls_back_to_another_port_in_range() {
    let mut fx = Fixture::load(POOL);
    let mut flows = Vec::new();
    let mut ports = BTreeSet::new();
    for host in [H1, H2, H3, H4] {
        let p = Packet::udp(host, 40000, SRV, 123);
        let ext = start(&mut fx, &format!("{host}:40000"), &p, "out");
        assert_eq!(ip(&ext), addr(EXT));
        if host == H1 {
            assert_eq!(port(&ext), 40000, "the first host keeps its port");
        } else {
            assert_ne!(port(&ext), 40000, "{host}: port 40000 is taken");
            assert!(in_range(port(&ext), PORT_MIN, PORT_MAX), "{host}: {ext:?}");
        }
        assert!(ports.insert(port(&ext)), "{host}: {ext:?} handed out twice");
        flows.push((p, ext));
    }
    // Every reply goes back to its own host, through its own port.
    for (p, ext) in &flows {
        reply(&fx, &format!("reply to {}", p.src), p, ext, "out");
    }
    // Port spaces are per protocol: TCP 40000 is still free for the second host.
    let t = tcp(H2, 40000, SRV, 443, SYN);
    let ext = start(&mut fx, "TCP from the second host", &t, "out");
    assert_eq!(ext, endpoint(EXT, 40000, proto::TCP));

    let state = fx.conntrack_snapshot();
    let claimed: BTreeSet<u16> = state
        .bindings
        .keys()
        .filter(|e| e.proto == proto::UDP)
        .map(port)
        .collect();
    assert_eq!(
        claimed, ports,
        "exactly the handed-out UDP ports are claimed"
    );
    assert_eq!(sizes(&state), (5, 5, 5, 5));
    assert_consistent(&state, "end");
    fx.assert_session_filter_exact("end");
}

#[test]
fn inside_port_outside_the_range_is_moved_into_it() {
    let config = r#"
[[interfaces]]
name = "nat0"

[conntrack]
max_sessions = 1024

[[snat]]
id = 1
name = "narrow"
source = "198.18.0.0/24"
to_address = "203.0.113.1"
port_range = "20000-20099"

[[snat]]
id = 2
name = "wide"
source = "198.18.1.0/24"
to_address = "203.0.113.2"
"#;
    let mut fx = Fixture::load(config);
    // Default range 1024-65535: a privileged source port is moved up.
    let p = Packet::udp("198.18.1.9", 123, SRV, 123);
    let ext = start(&mut fx, "port 123, default range", &p, "wide");
    assert_eq!(ip(&ext), addr("203.0.113.2"));
    assert!(in_range(port(&ext), PORT_MIN, PORT_MAX), "{ext:?}");
    reply(&fx, "reply to port 123", &p, &ext, "wide");

    // A narrow range: ports inside it are kept, ports above and below it are moved in. The
    // kept ones go first: a moved port lands anywhere in the range and could take one of them.
    for (sport, kept) in [(20050, true), (20099, true), (40000, false), (123, false)] {
        let p = Packet::udp(H1, sport, SRV, 123);
        let ext = start(
            &mut fx,
            &format!("port {sport}, range 20000-20099"),
            &p,
            "narrow",
        );
        assert_eq!(ip(&ext), addr(EXT));
        assert!(in_range(port(&ext), 20000, 20099), "{sport}: {ext:?}");
        if kept {
            assert_eq!(port(&ext), sport);
        }
        reply(&fx, &format!("reply to port {sport}"), &p, &ext, "narrow");
    }
    // ICMP echo ids follow the same range.
    let ping = Packet::icmp_echo(H1, SRV).with_echo_id(7);
    let ext = start(&mut fx, "echo id 7, range 20000-20099", &ping, "narrow");
    assert!(in_range(port(&ext), 20000, 20099), "{ext:?}");
    reply(&fx, "echo reply", &ping, &ext, "narrow");
    assert_consistent(&fx.conntrack_snapshot(), "end");
    fx.assert_session_filter_exact("end");
}

// ---------------------------------------------------------------------------------------------
// Exhaustion and capacity
// ---------------------------------------------------------------------------------------------

#[test]
fn pool_exhaustion_refuses_new_endpoints_with_no_port_and_existing_flows_keep_translating() {
    let config = r#"
[[interfaces]]
name = "nat0"

[conntrack]
max_sessions = 1024

[[snat]]
id = 1
name = "tiny"
source = "198.18.0.0/24"
to_address = "203.0.113.1"
port_range = "2000-2003"
"#;
    let mut fx = Fixture::load(config);
    let mut flows = Vec::new();
    for host in [H1, H2, H3, H4] {
        let p = Packet::udp(host, 40000, SRV, 123);
        let ext = start(&mut fx, &format!("{host}:40000"), &p, "tiny");
        flows.push((p, ext));
    }
    let ports: BTreeSet<u16> = flows.iter().map(|(_, e)| port(e)).collect();
    assert_eq!(
        ports,
        (2000..=2003).collect(),
        "the 4 endpoints get the 4 ports"
    );
    assert!(flows.iter().all(|(_, e)| ip(e) == addr(EXT)));
    let before = fx.conntrack_snapshot();

    // A fifth endpoint: no port left. Refused (dropped, not leaked untranslated), counted,
    // and nothing is created.
    let fifth = Packet::udp(H5, 40000, SRV, 123);
    for attempt in 1..=3 {
        fx.check(
            &format!("fifth endpoint, attempt {attempt}"),
            &fifth.build(),
            &Expect::drop_unchanged(Reason::NoPort, &fifth.build()),
        );
    }
    let other_port = Packet::udp(H1, 40001, SRV, 123);
    fx.check(
        "a new port of a mapped host",
        &other_port.build(),
        &Expect::drop_unchanged(Reason::NoPort, &other_port.build()),
    );
    assert_eq!(
        fx.conntrack_snapshot(),
        before,
        "refused flows leave no state"
    );

    // Existing flows keep translating both ways.
    for (p, ext) in &flows {
        orig(&fx, &format!("{} again", p.src), p, ext, "tiny");
        reply(&fx, &format!("reply to {}", p.src), p, ext, "tiny");
    }
    // An already mapped endpoint may still open flows to other destinations: its mapping is
    // reused, no port is needed.
    let to_srv2 = Packet::udp(H1, 40000, SRV2, 123);
    let ext = start(
        &mut fx,
        "mapped endpoint to another server",
        &to_srv2,
        "tiny",
    );
    assert_eq!(ext, flows[0].1);
    reply(&fx, "reply from the other server", &to_srv2, &ext, "tiny");
    // Port spaces are per protocol: TCP still has all four ports.
    let t = tcp(H5, 40000, SRV, 443, SYN);
    let ext = start(&mut fx, "TCP from the fifth host", &t, "tiny");
    assert!(in_range(port(&ext), 2000, 2003), "{ext:?}");

    let state = fx.conntrack_snapshot();
    assert_eq!(sizes(&state), (6, 6, 5, 5));
    assert_consistent(&state, "end");
    fx.assert_session_filter_exact("end");
}

/// The capacity in [`POOL`] (the validator's minimum, `MIN_MAX_SESSIONS`): the
/// table-full fixtures fill it.
const CAPACITY: usize = 1024;

#[test]
fn full_table_refuses_new_flows_while_an_established_flow_still_translates() {
    let mut fx = Fixture::load(POOL);
    let established = Packet::udp(H1, 40000, SRV, 123);
    let ext = start(&mut fx, "the established flow", &established, "out");
    reply(&fx, "its reply", &established, &ext, "out");

    // Fill the table through the program: one inside endpoint to CAPACITY - 1 destinations
    // (one mapping, CAPACITY - 1 sessions).
    let fill = |i: usize| {
        Packet::udp(
            H2,
            50000,
            &format!("198.51.100.{}", 100 + i / 1000),
            1 + (i % 1000) as u16,
        )
    };
    let before = fx.counters();
    for i in 0..CAPACITY - 1 {
        let out = fx.run(&fill(i).build());
        assert_eq!(out.action, XDP_PASS, "filler flow {i} refused");
    }
    let after = fx.counters();
    assert_eq!(
        after.reasons[Reason::SessionNew as usize] - before.reasons[Reason::SessionNew as usize],
        (CAPACITY - 1) as u64,
        "every filler flow created a session"
    );
    let full = fx.conntrack_snapshot();
    assert_eq!(
        (full.sessions.len(), full.replies.len()),
        (CAPACITY, CAPACITY)
    );

    // New flows are refused, counted and dropped: from a new endpoint, and from the
    // established flow's own endpoint to another server.
    let newcomer = Packet::udp(H3, 40000, SRV, 123);
    let same_endpoint = Packet::udp(H1, 40000, SRV2, 123);
    for (what, p) in [
        ("new endpoint", &newcomer),
        ("established endpoint, new server", &same_endpoint),
        ("new endpoint, TCP", &tcp(H3, 40000, SRV, 443, SYN)),
    ] {
        fx.check(
            &format!("table full: {what}"),
            &p.build(),
            &Expect::drop_unchanged(Reason::TableFull, &p.build()),
        );
    }
    let state = fx.conntrack_snapshot();
    assert_eq!(state.sessions, full.sessions, "no session added or changed");
    assert_eq!(state.replies, full.replies, "no reply entry left behind");
    assert!(!state.sessions.contains_key(&flow_key(&newcomer)));
    eprintln!(
        "PROBE mappings {:?} bindings {:?}",
        state.mappings, state.bindings
    );

    // The established flow still translates both ways.
    orig(
        &fx,
        "established flow, table full",
        &established,
        &ext,
        "out",
    );
    reply(&fx, "its reply, table full", &established, &ext, "out");
    // And so do the filler flows.
    orig(
        &fx,
        "a filler flow, table full",
        &fill(7),
        &endpoint(EXT, 50000, proto::UDP),
        "out",
    );
    assert_consistent(&fx.conntrack_snapshot(), "end");
    fx.assert_session_filter_exact("end");
}

#[test]
fn full_session_map_undoes_the_reply_entry_of_a_refused_flow() {
    let mut fx = Fixture::load(POOL);
    let established = Packet::udp(H1, 40000, SRV, 123);
    let ext = start(&mut fx, "the established flow", &established, "out");

    // Fill SESSIONS alone with synthetic sessions (REPLIES keeps room), so a new flow gets
    // its reply entry in and then fails on the session: the reply entry must be taken back.
    let mut sessions: BpfHashMap<MapData, FlowKey, Session> =
        BpfHashMap::try_from(fx.program_hash_map("SESSIONS")).expect("SESSIONS as a hash map");
    let synthetic = |i: usize| FlowKey {
        src: [198, 19, (i >> 8) as u8, i as u8],
        dst: addr(SRV).octets(),
        sport: 1000u16.to_be_bytes(),
        dport: 123u16.to_be_bytes(),
        proto: proto::UDP,
        _pad: [0; 3],
    };
    for i in 0..CAPACITY - 1 {
        let key = synthetic(i);
        let s = Session {
            translated: FlowKey {
                src: [203, 0, 113, 99],
                ..key
            },
            snat_rule: fx.slot("out"),
            dnat_rule: NO_RULE,
            flags: SESSION_SNAT,
            ..Default::default()
        };
        // Counted in the session filter as the program counts its own (see
        // `nat_common::session_filter`): the end of the test checks the counts are exact.
        count_in_session_filter(&mut fx, &key);
        sessions
            .insert(key, s, 0)
            .unwrap_or_else(|e| panic!("synthetic session {i}: {e}"));
    }
    let extra = synthetic(CAPACITY);
    assert!(
        sessions.insert(extra, Session::default(), 0).is_err(),
        "SESSIONS holds exactly max_sessions"
    );
    let full = fx.conntrack_snapshot();
    assert_eq!(full.sessions.len(), CAPACITY);
    assert_eq!(full.replies.len(), 1);

    let newcomer = Packet::udp(H3, 40000, SRV, 123);
    fx.check(
        "sessions full",
        &newcomer.build(),
        &Expect::drop_unchanged(Reason::TableFull, &newcomer.build()),
    );
    let state = fx.conntrack_snapshot();
    assert_eq!(state.sessions, full.sessions, "no session added");
    assert_eq!(
        state.replies, full.replies,
        "the refused flow's reply entry was removed again"
    );
    fx.assert_session_filter_exact("a flow refused for a full SESSIONS");
    orig(
        &fx,
        "established flow, sessions full",
        &established,
        &ext,
        "out",
    );
    reply(&fx, "its reply, sessions full", &established, &ext, "out");

    // Room again: the same flow now gets its session.
    sessions
        .remove(&synthetic(0))
        .expect("removing a synthetic session");
    fx.conntrack()
        .filter()
        .expect("the loaded object has no session filter")
        .uncount(&synthetic(0), Counted::Sessions);
    let ext3 = start(&mut fx, "after one session left", &newcomer, "out");
    reply(&fx, "its reply", &newcomer, &ext3, "out");
    fx.assert_session_filter_exact("end");
}

// ---------------------------------------------------------------------------------------------
// ICMP echo
// ---------------------------------------------------------------------------------------------

#[test]
fn icmp_echo_both_ways_with_ids_kept_translated_and_restored() {
    let mut fx = Fixture::load(POOL);
    // H1's id 0x0bad is free and in range: kept.
    let ping1 = Packet::icmp_echo(H1, SRV).with_echo_id(0x0bad);
    let len = ping1.build().len() as u64;
    fx.check(
        "echo request from H1",
        &ping1.build(),
        &Expect::session(
            Reason::SessionNew,
            Packet::icmp_echo(EXT, SRV).with_echo_id(0x0bad).build(),
            &[("out", Dir::Original)],
        ),
    );
    fx.check(
        "echo reply to H1",
        &Packet::icmp_echo_reply(SRV, EXT)
            .with_echo_id(0x0bad)
            .build(),
        &Expect::session(
            Reason::SessionReply,
            Packet::icmp_echo_reply(SRV, H1)
                .with_echo_id(0x0bad)
                .build(),
            &[("out", Dir::Reply)],
        ),
    );
    // The session's keys: a request carries the id as its source "port", a reply as its
    // destination "port".
    let key = flow_key(&ping1);
    assert_eq!((key.sport, key.dport), (0x0badu16.to_be_bytes(), [0, 0]));
    let translated = FlowKey {
        src: addr(EXT).octets(),
        ..key
    };
    assert_session(
        "echo session",
        &key,
        Session {
            orig_packets: 1,
            orig_bytes: len,
            reply_packets: 1,
            reply_bytes: len,
            ..snat_session(&fx, "out", translated)
        },
        &mut fx,
    );

    // H2 uses the same id: it must get another one, and its reply its own id and address.
    let ping2 = Packet::icmp_echo(H2, SRV).with_echo_id(0x0bad);
    let ext2 = start(&mut fx, "echo request from H2, same id", &ping2, "out");
    assert_ne!(port(&ext2), 0x0bad, "id taken by H1");
    assert!(in_range(port(&ext2), PORT_MIN, PORT_MAX), "{ext2:?}");
    reply(&fx, "echo reply to H2", &ping2, &ext2, "out");
    // H1 again: the same session.
    orig(
        &fx,
        "second echo request from H1",
        &ping1,
        &endpoint(EXT, 0x0bad, proto::ICMP),
        "out",
    );
    // An id below the range is moved into it.
    let ping3 = Packet::icmp_echo(H3, SRV).with_echo_id(7);
    let ext3 = start(&mut fx, "echo request with id 7", &ping3, "out");
    assert!(in_range(port(&ext3), PORT_MIN, PORT_MAX), "{ext3:?}");
    reply(&fx, "echo reply for id 7", &ping3, &ext3, "out");

    // ICMP ids and UDP ports are separate spaces: UDP 2989 (= 0x0bad) from H2 is kept.
    let udp = Packet::udp(H2, 0x0bad, SRV, 123);
    let ext = start(&mut fx, "UDP port 0x0bad", &udp, "out");
    assert_eq!(port(&ext), 0x0bad);
    assert_consistent(&fx.conntrack_snapshot(), "end");
    fx.assert_session_filter_exact("end");
}

// ---------------------------------------------------------------------------------------------
// Pools of several addresses
// ---------------------------------------------------------------------------------------------

#[test]
fn paired_pooling_keeps_every_flow_of_a_host_on_one_address() {
    let config = r#"
[[interfaces]]
name = "nat0"

[conntrack]
max_sessions = 1024

[[snat]]
id = 1
name = "pool"
source = "198.18.0.0/24"
to_address = ["203.0.113.1", "203.0.113.2", "203.0.113.3", "203.0.113.4"]
"#;
    let pool: Vec<Ipv4Addr> = (1..=4).map(|i| Ipv4Addr::new(203, 0, 113, i)).collect();
    let mut fx = Fixture::load(config);
    let mut used = BTreeSet::new();
    for n in 10..26u8 {
        let host = format!("198.18.0.{n}");
        // Distinct ports per host, so that hosts sharing an address never collide and every
        // port is kept: the address is the only choice the program makes here.
        let base = 30000 + 10 * u16::from(n);
        let flows = [
            Packet::udp(&host, base, SRV, 123),
            Packet::udp(&host, base + 1, SRV2, 53),
            tcp(&host, base + 2, SRV, 443, SYN),
            Packet::icmp_echo(&host, SRV2).with_echo_id(base + 3),
        ];
        let mut addrs = BTreeSet::new();
        for p in &flows {
            let ext = start(&mut fx, &format!("{host}: {:?}", flow_key(p)), p, "pool");
            assert_eq!(
                port(&ext),
                port(&source_endpoint(p)),
                "{host}: free port kept"
            );
            reply(&fx, &format!("{host}: reply"), p, &ext, "pool");
            addrs.insert(ip(&ext));
        }
        assert_eq!(addrs.len(), 1, "{host}: flows spread over {addrs:?}");
        let a = *addrs.first().expect("one address");
        assert!(pool.contains(&a), "{host}: {a} is not in the pool");
        // The documented member choice (FNV-1a of the host address modulo the pool size).
        assert_eq!(
            a,
            pool[pool_index_for(addr(&host).octets(), 4) as usize],
            "{host}"
        );
        used.insert(a);
    }
    assert!(
        used.len() > 1,
        "16 hosts all on one pool address {used:?}: the pool is not used"
    );
    assert_consistent(&fx.conntrack_snapshot(), "end");
    fx.assert_session_filter_exact("end");
}

// ---------------------------------------------------------------------------------------------
// Rule selection
// ---------------------------------------------------------------------------------------------

#[test]
fn no_nat_destination_protocol_and_priority_decide_the_rule() {
    let config = r#"
[[interfaces]]
name = "nat0"

[conntrack]
max_sessions = 1024

[[snat]]
id = 1
name = "exempt"
source = "198.18.0.0/24"
destination = "198.51.100.250"
no_nat = true

[[snat]]
id = 2
name = "dns-only"
source = "198.18.0.0/24"
destination = "198.51.100.53"
protocol = "udp"
to_address = "203.0.113.53"

[[snat]]
id = 3
name = "near"
source = "198.18.0.0/24"
destination = "198.51.100.0/25"
to_address = "203.0.113.2"

[[snat]]
id = 4
name = "host7"
source = "198.18.0.7"
to_address = "203.0.113.7"

[[snat]]
id = 5
name = "rest"
source = "198.18.0.0/24"
to_address = "203.0.113.1"
"#;
    let mut fx = Fixture::load(config);

    // no_nat before translating rules: untouched, every protocol, no state.
    for (what, p) in [
        ("UDP", Packet::udp(H1, 40000, "198.51.100.250", 53)),
        ("TCP", tcp(H1, 40000, "198.51.100.250", 443, SYN)),
        ("ICMP echo", Packet::icmp_echo(H1, "198.51.100.250")),
        (
            "host7 UDP",
            Packet::udp("198.18.0.7", 40000, "198.51.100.250", 53),
        ),
    ] {
        fx.check(
            &format!("{what} to the exempt destination"),
            &p.build(),
            &Expect::pass_unchanged(Reason::SnatExempt, &p.build()),
        );
    }
    assert_eq!(sizes(&fx.conntrack_snapshot()), (0, 0, 0, 0));

    // (what, packet, rule, external address)
    let cases = [
        (
            "UDP to .53: protocol- and destination-restricted rule",
            Packet::udp(H1, 40000, SRV, 53),
            "dns-only",
            "203.0.113.53",
        ),
        (
            "TCP to .53: not UDP, next rule (destination /25)",
            tcp(H1, 40000, SRV, 53, SYN),
            "near",
            "203.0.113.2",
        ),
        (
            "ICMP to .53: not UDP, next rule",
            Packet::icmp_echo(H1, SRV),
            "near",
            "203.0.113.2",
        ),
        (
            "UDP to .200: outside the /25, catch-all",
            Packet::udp(H1, 40001, "198.51.100.200", 53),
            "rest",
            "203.0.113.1",
        ),
        (
            "host7 UDP to .53: the earlier rule wins over the more specific source",
            Packet::udp("198.18.0.7", 40000, SRV, 53),
            "dns-only",
            "203.0.113.53",
        ),
        (
            "host7 UDP to .200: its own rule before the catch-all",
            Packet::udp("198.18.0.7", 40001, "198.51.100.200", 53),
            "host7",
            "203.0.113.7",
        ),
    ];
    for (what, p, rule, external) in cases {
        let ext = start(&mut fx, what, &p, rule);
        assert_eq!(ip(&ext), addr(external), "{what}");
        reply(&fx, &format!("{what}: reply"), &p, &ext, rule);
    }

    // A source no rule covers is none of the NAT's business.
    let stranger = Packet::udp("198.18.9.9", 40000, SRV, 53);
    fx.check(
        "source without SNAT rules",
        &stranger.build(),
        &Expect::pass_unchanged(Reason::NoMatch, &stranger.build()),
    );
    let state = fx.conntrack_snapshot();
    assert_eq!(sizes(&state), (6, 6, 6, 6));
    assert_consistent(&state, "end");
    fx.assert_session_filter_exact("end");
}

// ---------------------------------------------------------------------------------------------
// Packets that must never be translated half-way
// ---------------------------------------------------------------------------------------------

#[test]
fn rst_unannounced_fragments_and_unsupported_protocols_from_snat_sources_are_dropped() {
    let mut fx = Fixture::load(POOL);
    for (what, flags) in [("RST", RST), ("RST|ACK", RST | ACK)] {
        let p = tcp(H1, 40000, SRV, 443, flags);
        fx.check(
            &format!("{what} as first packet"),
            &p.build(),
            &Expect::drop_unchanged(Reason::RstNoSession, &p.build()),
        );
    }
    let big = Packet::udp(H1, 40000, SRV, 123).with_payload((0..100u8).collect());
    // Later fragments whose first fragment was never seen: no ports to translate them with
    // (fixtures_frag.rs has fragments that follow their first fragment).
    let pieces = big.fragments(&[40, 80]);
    for (i, f) in pieces.iter().enumerate().skip(1) {
        fx.check(
            &format!("UDP fragment {i} without its first"),
            &f.build(),
            &Expect::drop_unchanged(Reason::SnatFragment, &f.build()),
        );
    }
    let gre = Packet::raw(H1, SRV, PROTO_GRE, vec![0, 0, 0x08, 0, 1, 2, 3, 4]);
    fx.check(
        "GRE",
        &gre.build(),
        &Expect::drop_unchanged(Reason::SnatProtoUnsupported, &gre.build()),
    );
    let short_udp = Packet::raw(H1, SRV, proto::UDP, vec![0x9c, 0x40, 0, 123, 0, 8]);
    assert!(short_udp.build().len() < 14 + 20 + UDP_HLEN);
    fx.check(
        "UDP header cut short",
        &short_udp.build(),
        &Expect::drop_unchanged(Reason::TruncatedL4, &short_udp.build()),
    );
    assert_eq!(
        sizes(&fx.conntrack_snapshot()),
        (0, 0, 0, 0),
        "nothing was tracked"
    );
    // Control: the same tuple unfragmented starts a flow, and a RST inside it is translated.
    let ext = start(&mut fx, "control: unfragmented", &big, "out");
    assert_eq!(ext, endpoint(EXT, 40000, proto::UDP));
    let syn = tcp(H1, 40000, SRV, 443, SYN);
    let ext = start(&mut fx, "control: SYN", &syn, "out");
    orig(
        &fx,
        "RST inside a session",
        &syn.clone().with_tcp_flags(RST),
        &ext,
        "out",
    );
}

/// Packets a no_nat rule exempts need no translation, so having no tuple (fragments, protocols
/// without ports) is no reason to drop them: like the tracked protocols, they are the kernel's
/// (passed untouched, `snat_exempt`). Only packets that *need* SNAT must be dropped.
#[test]
fn untrackable_packets_to_a_no_nat_destination_pass_as_exempt() {
    let config = r#"
[[interfaces]]
name = "nat0"

[conntrack]
max_sessions = 1024

[[snat]]
id = 1
name = "exempt"
source = "198.18.0.0/24"
destination = "198.51.100.250"
no_nat = true

[[snat]]
id = 2
name = "out"
source = "198.18.0.0/24"
to_address = "203.0.113.1"
"#;
    let fx = Fixture::load(config);
    let big = Packet::udp(H1, 40000, "198.51.100.250", 4500).with_payload((0..100u8).collect());
    let mut cases: Vec<(String, Packet)> = big
        .fragments(&[40, 80])
        .into_iter()
        .enumerate()
        .map(|(i, f)| (format!("UDP fragment {i}"), f))
        .collect();
    cases.push((
        "GRE".into(),
        Packet::raw(
            H1,
            "198.51.100.250",
            PROTO_GRE,
            vec![0, 0, 0x08, 0, 1, 2, 3, 4],
        ),
    ));
    // All outcomes first, so a failure names every case at once.
    let observed: Vec<_> = cases.iter().map(|(_, p)| fx.observe(&p.build())).collect();
    let reasons: Vec<(&str, Vec<(Reason, u64)>)> = cases
        .iter()
        .zip(&observed)
        .map(|((what, _), o)| (what.as_str(), o.reasons()))
        .collect();
    let want: Vec<(&str, Vec<(Reason, u64)>)> = cases
        .iter()
        .map(|(what, _)| (what.as_str(), vec![(Reason::SnatExempt, 1)]))
        .collect();
    assert_eq!(reasons, want, "exit reasons to the exempt destination");
    for ((what, p), o) in cases.iter().zip(&observed) {
        fx.verify(
            &format!("{what} to the exempt destination"),
            o,
            &Expect::pass_unchanged(Reason::SnatExempt, &p.build()),
        );
    }
    // Control: to any other destination they need SNAT, and are dropped.
    let other = Packet::raw(H1, SRV, PROTO_GRE, vec![0, 0, 0x08, 0, 1, 2, 3, 4]);
    fx.check(
        "GRE to a translated destination",
        &other.build(),
        &Expect::drop_unchanged(Reason::SnatProtoUnsupported, &other.build()),
    );
}

/// A flow the table refuses must not keep what allocation claimed for it: no mapping and no
/// external port held for a flow that does not exist (while the table stays full, every
/// refused new endpoint would otherwise take a port of the pool and an entry of MAPPINGS and
/// BINDINGS until the expiry sweep finds it unused).
#[test]
fn a_flow_refused_for_a_full_table_claims_no_external_port() {
    let mut fx = Fixture::load(POOL);
    let established = Packet::udp(H1, 40000, SRV, 123);
    start(&mut fx, "the established flow", &established, "out");
    let mut sessions: BpfHashMap<MapData, FlowKey, Session> =
        BpfHashMap::try_from(fx.program_hash_map("SESSIONS")).expect("SESSIONS as a hash map");
    for i in 0..CAPACITY - 1 {
        let key = FlowKey {
            src: [198, 19, (i >> 8) as u8, i as u8],
            ..flow_key(&established)
        };
        count_in_session_filter(&mut fx, &key);
        sessions
            .insert(key, Session::default(), 0)
            .unwrap_or_else(|e| panic!("synthetic session {i}: {e}"));
    }
    let before = fx.conntrack_snapshot();
    for p in [
        Packet::udp(H3, 40000, SRV, 123),
        tcp(H3, 40000, SRV, 443, SYN),
        Packet::icmp_echo(H3, SRV),
    ] {
        fx.check(
            &format!("table full: {:?}", flow_key(&p)),
            &p.build(),
            &Expect::drop_unchanged(Reason::TableFull, &p.build()),
        );
    }
    let after = fx.conntrack_snapshot();
    assert_eq!(after.replies, before.replies, "reply entries");
    assert_eq!(
        (after.mappings, after.bindings),
        (before.mappings, before.bindings),
        "mappings and port claims after three refused flows"
    );
    fx.assert_session_filter_exact("after three refused flows");
}

// ---------------------------------------------------------------------------------------------
// DNAT with sessions
// ---------------------------------------------------------------------------------------------

#[test]
fn dnat_plus_snat_rewrites_both_sides_and_the_reply_restores_both() {
    let config = r#"
[[interfaces]]
name = "nat0"

[conntrack]
max_sessions = 1024

[[dnat]]
id = 10
name = "web"
destination = "198.18.100.10"
protocol = "tcp"
port = 80
to_address = "198.18.1.2"
to_port = 8080

# Whole address, every protocol (ICMP echo and UDP here).
[[dnat]]
id = 11
name = "one-to-one"
destination = "198.18.100.20"
to_address = "198.18.1.20"

[[snat]]
id = 20
name = "to-backends"
source = "198.51.100.0/24"
destination = "198.18.1.0/24"
to_address = "198.18.1.1"
"#;
    let mut fx = Fixture::load(config);
    let rules_orig = [("web", Dir::Original), ("to-backends", Dir::Original)];
    let rules_reply = [("web", Dir::Reply), ("to-backends", Dir::Reply)];

    let mut flows = Vec::new();
    for client in ["198.51.100.7", "198.51.100.8"] {
        let request = tcp(client, 40000, "198.18.100.10", 80, SYN);
        let observed = fx.observe(&request.build());
        assert_eq!(observed.reasons(), [(Reason::SessionNew, 1)], "{client}");
        let ext = fx
            .conntrack()
            .mappings()
            .get(&source_endpoint(&request))
            .unwrap()
            .unwrap_or_else(|| panic!("{client}: no mapping"))
            .external;
        assert_eq!(ip(&ext), addr("198.18.1.1"), "{client}");
        assert!(in_range(port(&ext), PORT_MIN, PORT_MAX));
        // Both sides rewritten: backend as destination, the NAT's address as source.
        let at_backend = with_source(&with_destination(&request, "198.18.1.2", 8080), &ext);
        fx.verify(
            &format!("{client}: first packet"),
            &observed,
            &Expect::session(Reason::SessionNew, at_backend.build(), &rules_orig),
        );
        let len = request.build().len() as u64;
        assert_session(
            &format!("{client}: session"),
            &flow_key(&request),
            Session {
                translated: flow_key(&at_backend),
                dnat_rule: fx.slot("web"),
                snat_rule: fx.slot("to-backends"),
                flags: SESSION_DNAT | SESSION_SNAT,
                tcp_state: TcpState::SynSent as u8,
                orig_packets: 1,
                orig_bytes: len,
                ..Default::default()
            },
            &mut fx,
        );
        flows.push((request, at_backend, ext));
    }
    assert_eq!(port(&flows[0].2), 40000, "first client keeps its port");
    assert_ne!(port(&flows[1].2), 40000, "second client: port taken");

    for (request, at_backend, _) in &flows {
        // The backend answers the NAT; the client must see the VIP answer it.
        let from_backend = answer(at_backend).with_tcp_flags(SYN | ACK);
        let to_client = answer(request).with_tcp_flags(SYN | ACK);
        fx.check(
            &format!("reply to {}", request.src),
            &from_backend.build(),
            &Expect::session(Reason::SessionReply, to_client.build(), &rules_reply),
        );
        let ack = request.clone().with_tcp_flags(ACK);
        fx.check(
            &format!("ACK from {}", request.src),
            &ack.build(),
            &Expect::session(
                Reason::SessionOrig,
                at_backend.clone().with_tcp_flags(ACK).build(),
                &rules_orig,
            ),
        );
        let s = fx
            .conntrack()
            .sessions()
            .get(&flow_key(request))
            .unwrap()
            .unwrap();
        assert_eq!(TcpState::from_u8(s.tcp_state), TcpState::Established);
    }

    // A client outside the SNAT rule's source: plain stateless DNAT both ways.
    let outsider = Packet::tcp("203.0.113.9", 40000, "198.18.100.10", 80);
    fx.check(
        "client without SNAT",
        &outsider.build(),
        &Expect::forward(
            "web",
            with_destination(&outsider, "198.18.1.2", 8080).build(),
        ),
    );
    fx.check(
        "its reply",
        &answer(&with_destination(&outsider, "198.18.1.2", 8080)).build(),
        &Expect::reply("web", answer(&outsider).build()),
    );

    // ICMP echo and UDP through a whole-address rule: the echo id and the UDP port are the
    // translated "source ports".
    let rules_orig = [
        ("one-to-one", Dir::Original),
        ("to-backends", Dir::Original),
    ];
    let rules_reply = [("one-to-one", Dir::Reply), ("to-backends", Dir::Reply)];
    for request in [
        Packet::icmp_echo("198.51.100.7", "198.18.100.20").with_echo_id(0x0bad),
        Packet::udp("198.51.100.7", 40000, "198.18.100.20", 53),
    ] {
        let what = format!("{:?}", flow_key(&request));
        let observed = fx.observe(&request.build());
        assert_eq!(observed.reasons(), [(Reason::SessionNew, 1)], "{what}");
        let ext = fx
            .conntrack()
            .mappings()
            .get(&source_endpoint(&request))
            .unwrap()
            .unwrap_or_else(|| panic!("{what}: no mapping"))
            .external;
        assert_eq!(
            ext,
            Endpoint {
                addr: addr("198.18.1.1").octets(),
                ..source_endpoint(&request)
            },
            "{what}: free port kept"
        );
        let mut at_backend = with_source(&request, &ext);
        at_backend.dst = addr("198.18.1.20");
        fx.verify(
            &format!("{what}: first packet"),
            &observed,
            &Expect::session(Reason::SessionNew, at_backend.build(), &rules_orig),
        );
        fx.check(
            &format!("{what}: reply"),
            &answer(&at_backend).build(),
            &Expect::session(Reason::SessionReply, answer(&request).build(), &rules_reply),
        );
    }
    let state = fx.conntrack_snapshot();
    assert_eq!(sizes(&state), (4, 4, 4, 4));
    assert_consistent(&state, "end");
    fx.assert_session_filter_exact("end");
}

#[test]
fn two_vips_onto_one_backend_port_restore_replies_to_the_right_vip() {
    let config = r#"
[[interfaces]]
name = "nat0"

[conntrack]
max_sessions = 1024

[[dnat]]
id = 1
name = "vip1"
destination = "198.18.100.10"
protocol = "tcp"
port = 80
to_address = "198.18.1.2"
to_port = 80

[[dnat]]
id = 2
name = "vip2"
destination = "198.18.100.11"
protocol = "tcp"
port = 80
to_address = "198.18.1.2"
to_port = 80
"#;
    let mut fx = Fixture::load(config);
    assert_eq!(fx.compiled.stateful.len(), 2, "both rules are stateful");
    // (rule, client, port, VIP)
    let flows = [
        ("vip1", "198.51.100.7", 40000, "198.18.100.10"),
        ("vip2", "198.51.100.7", 40001, "198.18.100.11"),
        ("vip2", "203.0.113.9", 40000, "198.18.100.11"),
    ];
    for (rule, client, sport, vip) in flows {
        let request = tcp(client, sport, vip, 80, SYN);
        let at_backend = with_destination(&request, "198.18.1.2", 80);
        fx.check(
            &format!("{client}:{sport} -> {vip}"),
            &request.build(),
            &Expect::session(
                Reason::SessionNew,
                at_backend.build(),
                &[(rule, Dir::Original)],
            ),
        );
        assert_session(
            &format!("{client}:{sport} -> {vip}: session"),
            &flow_key(&request),
            Session {
                translated: flow_key(&at_backend),
                dnat_rule: fx.slot(rule),
                snat_rule: NO_RULE,
                flags: SESSION_DNAT,
                tcp_state: TcpState::SynSent as u8,
                orig_packets: 1,
                orig_bytes: request.build().len() as u64,
                ..Default::default()
            },
            &mut fx,
        );
    }
    // Replies from the one backend port, each restored to the VIP its flow used.
    for (rule, client, sport, vip) in flows {
        let from_backend = tcp("198.18.1.2", 80, client, sport, SYN | ACK);
        let to_client = tcp(vip, 80, client, sport, SYN | ACK);
        fx.check(
            &format!("reply to {client}:{sport} from {vip}"),
            &from_backend.build(),
            &Expect::session(
                Reason::SessionReply,
                to_client.build(),
                &[(rule, Dir::Reply)],
            ),
        );
    }
    // The same client port to the other VIP would make the same backend-side tuple: refused
    // rather than leaving the reply ambiguous.
    let clash = tcp("198.51.100.7", 40000, "198.18.100.11", 80, SYN);
    fx.check(
        "same client port to the other VIP",
        &clash.build(),
        &Expect::drop_unchanged(Reason::SessionClash, &clash.build()),
    );
    // A reply without a session is not guessed (no stateless reverse for these rules).
    let stray = tcp("198.18.1.2", 80, "198.51.100.99", 1234, SYN | ACK);
    fx.check(
        "backend packet without a session",
        &stray.build(),
        &Expect::pass_unchanged(Reason::NoMatch, &stray.build()),
    );
    let state = fx.conntrack_snapshot();
    assert_eq!(
        sizes(&state),
        (3, 3, 0, 0),
        "DNAT-only sessions map no ports"
    );
    assert_consistent(&state, "end");
    fx.assert_session_filter_exact("end");
}

// ---------------------------------------------------------------------------------------------
// The FIB: MASQUERADE and out_interface, in a namespace of their own
// ---------------------------------------------------------------------------------------------

/// The index of `name` in the calling thread's namespace.
fn ifindex(name: &str) -> u32 {
    interface_index(name).unwrap_or_else(|| panic!("no interface {name} in this namespace"))
}

#[test]
fn a_df_packet_too_big_for_its_route_goes_to_the_kernel_untranslated() {
    let config = r#"
[[interfaces]]
name = "n0"

[conntrack]
max_sessions = 1024

[[snat]]
id = 20
name = "masq"
source = "198.18.0.0/24"
out_interface = "n1"
masquerade = true
"#;
    let ns = two_leg_lab();
    // The egress link is narrower than the inside one (a tunnel, say).
    ns.run("ip", ["link", "set", "n1", "mtu", "1280"])
        .expect("lowering n1's MTU");
    ns.enter(|| {
        let mut fx = Fixture::load(config);
        fx.set_ingress_ifindex(Some(ifindex("n0")));
        let out = [("masq", Dir::Original)];
        let sized =
            |len: usize| Packet::udp(H1, 40000, "203.0.113.10", 53).with_payload(vec![7; len - 28]);
        let translated = |p: Packet| p.with_src("203.0.113.1");
        fx.check(
            "first packet, small",
            &sized(100).build(),
            &Expect::session(Reason::SessionNew, translated(sized(100)).build(), &out),
        );
        // DF and 1400 bytes for a 1280-byte route: untranslated to the kernel, which sends the
        // inside host "fragmentation needed" (translated, the error would go to n1's own
        // address and be lost).
        let big = sized(1400);
        fx.check(
            "1400 bytes with DF",
            &big.build(),
            &Expect::pass_unchanged(Reason::MtuHandoff, &big.build()),
        );
        // Without DF the kernel may fragment it: translated as usual.
        let big_no_df = sized(1400).with_frag(0);
        fx.check(
            "1400 bytes without DF",
            &big_no_df.build(),
            &Expect::session(
                Reason::SessionOrig,
                translated(sized(1400).with_frag(0)).build(),
                &out,
            ),
        );
        // Exactly the route's MTU fits.
        fx.check(
            "1280 bytes with DF",
            &sized(1280).build(),
            &Expect::session(Reason::SessionOrig, translated(sized(1280)).build(), &out),
        );
        Ok(())
    })
    .expect("running in the namespace");
}

/// Sum of big-endian 16-bit words folded and complemented: the Internet checksum, computed
/// here independently of the program.
fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The "fragmentation needed" a router sends back for `frame` (as its sender sent it): from
/// `from` to the frame's source, quoting its IP header and first 8 payload bytes, with the
/// Ethernet addresses swapped, every checksum computed here from scratch.
fn frag_needed_answer(frame: &[u8], from: &str, mtu: u16) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&frame[6..12]);
    out.extend_from_slice(&frame[0..6]);
    out.extend_from_slice(&[0x08, 0x00]);
    let quote = &frame[14..14 + 28];
    let mut ip = vec![0x45, 0xc0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0];
    ip.extend_from_slice(&addr(from).octets());
    ip.extend_from_slice(&frame[14 + 12..14 + 16]);
    let ip_sum = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(quote);
    let icmp_sum = internet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&icmp_sum.to_be_bytes());
    out.extend_from_slice(&ip);
    out.extend_from_slice(&icmp);
    out
}

#[test]
fn a_df_packet_too_big_after_its_destination_is_translated_is_answered_from_xdp() {
    let config = r#"
[[interfaces]]
name = "n0"

[conntrack]
max_sessions = 1024

# DNAT to a backend behind the narrow link.
[[dnat]]
id = 10
name = "web"
destination = "198.18.100.10"
protocol = "udp"
port = 53
to_address = "203.0.113.10"
to_port = 5353

# And SNAT towards it, so the backend's replies come back to the NAT.
[[snat]]
id = 20
name = "masq"
source = "198.18.0.0/24"
out_interface = "n1"
masquerade = true
"#;
    let ns = two_leg_lab();
    ns.run("ip", ["link", "set", "n1", "mtu", "1280"])
        .expect("lowering n1's MTU");
    // The inside link is narrow too, for the replies.
    ns.run("ip", ["link", "set", "n0", "mtu", "1280"])
        .expect("lowering n0's MTU");
    ns.enter(|| {
        let mut fx = Fixture::load(config);
        let (n0, n1) = (ifindex("n0"), ifindex("n1"));
        let sized = |len: usize| {
            Packet::udp(H1, 40000, "198.18.100.10", 53).with_payload(vec![7; len - 28])
        };
        let at_backend = |len: usize| {
            Packet::udp("203.0.113.1", 40000, "203.0.113.10", 5353).with_payload(vec![7; len - 28])
        };
        let both = [("web", Dir::Original), ("masq", Dir::Original)];
        fx.set_ingress_ifindex(Some(n0));
        fx.check(
            "first packet, small",
            &sized(100).build(),
            &Expect::session(Reason::SessionNew, at_backend(100).build(), &both),
        );
        // 1400 bytes with DF towards the 1280-byte backend link: the VIP's sender is told,
        // from the NAT's address on its side, quoting what it sent (to the VIP).
        let big = sized(1400).build();
        let checked = fx.check(
            "1400 bytes with DF to the VIP",
            &big,
            &Expect {
                action: XDP_TX,
                reason: Reason::MtuTooBigAnswered,
                output: frag_needed_answer(&big, "198.18.0.1", 1280),
                rule: None,
                also: vec![],
            },
        );
        verify_icmp_error_checksums(&checked.frame).expect("the answer's checksums");
        // A reply too big for the inside link: the backend is told, from the NAT's outside
        // address, quoting its packet to the external address.
        fx.set_ingress_ifindex(Some(n1));
        let reply = Packet::udp("203.0.113.10", 5353, "203.0.113.1", 40000)
            .with_payload(vec![9; 1400 - 28])
            .build();
        let checked = fx.check(
            "1400-byte reply with DF",
            &reply,
            &Expect {
                action: XDP_TX,
                reason: Reason::MtuTooBigAnswered,
                output: frag_needed_answer(&reply, "203.0.113.1", 1280),
                rule: None,
                also: vec![],
            },
        );
        verify_icmp_error_checksums(&checked.frame).expect("the answer's checksums");
        // What fits is translated as before.
        fx.set_ingress_ifindex(Some(n0));
        fx.check(
            "1280 bytes with DF to the VIP",
            &sized(1280).build(),
            &Expect::session(Reason::SessionOrig, at_backend(1280).build(), &both),
        );
        Ok(())
    })
    .expect("running in the namespace");
}

#[test]
fn masquerade_takes_the_egress_interface_address_from_the_fib() {
    let config = r#"
[[interfaces]]
name = "n0"

[conntrack]
max_sessions = 1024

[[snat]]
id = 1
name = "masq"
source = "198.18.0.0/24"
masquerade = true
"#;
    let ns = two_leg_lab();
    ns.enter(|| {
        let mut fx = Fixture::load(config);
        let (n0, n1) = (ifindex("n0"), ifindex("n1"));
        let flows = [
            Packet::udp(H1, 40000, "203.0.113.10", 123),
            tcp(H1, 40000, "203.0.113.10", 443, SYN),
            Packet::icmp_echo(H1, "203.0.113.10").with_echo_id(0x0bad),
        ];
        for p in &flows {
            let what = format!("{:?}", flow_key(p));
            fx.set_ingress_ifindex(Some(n0));
            let ext = start(&mut fx, &format!("{what}: first packet"), p, "masq");
            assert_eq!(
                ext,
                Endpoint {
                    addr: [203, 0, 113, 1],
                    ..source_endpoint(p)
                },
                "{what}: n1's address, port kept"
            );
            fx.set_ingress_ifindex(Some(n1));
            reply(&fx, &format!("{what}: reply"), p, &ext, "masq");
        }

        // No route: MASQUERADE has no address to use, so the rule does not apply.
        fx.set_ingress_ifindex(Some(n0));
        let unroutable = Packet::udp(H1, 40001, "198.51.100.9", 123);
        fx.check(
            "no route to the destination",
            &unroutable.build(),
            &Expect::pass_unchanged(Reason::NoMatch, &unroutable.build()),
        );

        // The address changes: new flows follow it (the existing mapping of the same inside
        // endpoint is for the old address, so it gets a new one on the new address).
        ns.run("ip", ["addr", "del", "203.0.113.1/24", "dev", "n1"])
            .expect("removing n1's address");
        ns.run("ip", ["addr", "add", "203.0.113.2/24", "dev", "n1"])
            .expect("giving n1 another address");
        for p in [
            Packet::udp(H1, 40000, "203.0.113.11", 123),
            Packet::udp(H1, 40002, "203.0.113.10", 123),
        ] {
            let what = format!("after the address change: {:?}", flow_key(&p));
            let ext = start(&mut fx, &what, &p, "masq");
            assert_eq!(
                ext,
                Endpoint {
                    addr: [203, 0, 113, 2],
                    ..source_endpoint(&p)
                },
                "{what}"
            );
            reply(&fx, &format!("{what}: reply"), &p, &ext, "masq");
        }
        // The flow started before the change keeps its session (and its old address).
        fx.set_ingress_ifindex(Some(n0));
        orig(
            &fx,
            "old flow after the address change",
            &flows[0],
            &endpoint("203.0.113.1", 40000, proto::UDP),
            "masq",
        );
        // H1:40000/udp now holds ports on both addresses; the old claim is the sweep's to free
        // once no session uses it.
        let state = fx.conntrack_snapshot();
        let inside = endpoint(H1, 40000, proto::UDP);
        assert_eq!(
            state.mappings[&inside].external,
            endpoint("203.0.113.2", 40000, proto::UDP)
        );
        for a in ["203.0.113.1", "203.0.113.2"] {
            assert_eq!(
                state.bindings.get(&endpoint(a, 40000, proto::UDP)),
                Some(&inside),
                "claim on {a}"
            );
        }
        Ok(())
    })
    .expect("running in the namespace");
}

#[test]
fn out_interface_rules_match_the_fib_egress_interface_only() {
    let config = r#"
[[interfaces]]
name = "n0"

[conntrack]
max_sessions = 1024

[[snat]]
id = 1
name = "via-n0"
source = "198.18.0.0/24"
out_interface = "n0"
to_address = "203.0.113.21"

[[snat]]
id = 2
name = "via-missing"
source = "198.18.0.0/24"
out_interface = "gone0"
to_address = "203.0.113.23"

[[snat]]
id = 3
name = "via-n1"
source = "198.18.0.0/24"
out_interface = "n1"
to_address = "203.0.113.22"
"#;
    let ns = two_leg_lab();
    ns.enter(|| {
        let mut fx = Fixture::load(config);
        fx.set_ingress_ifindex(Some(ifindex("n0")));
        // (what, packet, rule, external address)
        let cases = [
            (
                "leaves by n1",
                Packet::udp(H1, 40000, "203.0.113.10", 123),
                "via-n1",
                "203.0.113.22",
            ),
            (
                "leaves by n0 (hairpin)",
                Packet::udp(H1, 40001, "198.18.0.50", 123),
                "via-n0",
                "203.0.113.21",
            ),
        ];
        for (what, p, rule, external) in cases {
            let ext = start(&mut fx, what, &p, rule);
            assert_eq!(
                ext,
                Endpoint {
                    addr: addr(external).octets(),
                    ..source_endpoint(&p)
                },
                "{what}"
            );
            reply(&fx, &format!("{what}: reply"), &p, &ext, rule);
        }
        assert_consistent(&fx.conntrack_snapshot(), "end");
        fx.assert_session_filter_exact("end");
        Ok(())
    })
    .expect("running in the namespace");
}

/// An `out_interface` that does not exist must match nothing (the agent writes
/// `IFINDEX_MISSING` for it) — also for a packet the FIB cannot route, for which the program
/// uses an egress index "no rule uses".
#[test]
fn unroutable_destination_matches_no_rule_of_a_missing_interface() {
    let config = r#"
[[interfaces]]
name = "n0"

[conntrack]
max_sessions = 1024

[[snat]]
id = 1
name = "via-missing"
source = "198.18.0.0/24"
out_interface = "gone0"
to_address = "203.0.113.23"

[[snat]]
id = 2
name = "via-n1"
source = "198.18.0.0/24"
out_interface = "n1"
to_address = "203.0.113.22"
"#;
    let ns = two_leg_lab();
    ns.enter(|| {
        let mut fx = Fixture::load(config);
        fx.set_ingress_ifindex(Some(ifindex("n0")));
        // Control: a routable destination takes the n1 rule.
        let routable = Packet::udp(H1, 40000, "203.0.113.10", 123);
        let ext = start(&mut fx, "routable via n1", &routable, "via-n1");
        assert_eq!(ip(&ext), addr("203.0.113.22"));
        let unroutable = Packet::udp(H1, 40002, "198.51.100.9", 123);
        let observed = fx.observe(&unroutable.build());
        if observed.reasons() != [(Reason::NoMatch, 1)] {
            let mapping = fx
                .conntrack()
                .mappings()
                .get(&source_endpoint(&unroutable))
                .unwrap();
            panic!(
                "an unroutable destination took reasons {:?}; mapping made: {mapping:?} \
                 (203.0.113.23 is the pool of the rule for the missing interface gone0)",
                observed.reasons()
            );
        }
        fx.verify(
            "no route: no interface rule applies, the missing interface's neither",
            &observed,
            &Expect::pass_unchanged(Reason::NoMatch, &unroutable.build()),
        );
        assert_eq!(sizes(&fx.conntrack_snapshot()), (1, 1, 1, 1));
        Ok(())
    })
    .expect("running in the namespace");
}

/// A rule with neither an egress interface nor MASQUERADE needs no route, and the program
/// asks the FIB only once it reaches a rule that does: behind an interface rule, such a rule
/// translates a flow to a destination the FIB cannot route, and a routable one still takes the
/// interface rule first.
#[test]
fn a_rule_that_needs_no_route_translates_an_unroutable_destination() {
    let config = r#"
[[interfaces]]
name = "n0"

[conntrack]
max_sessions = 1024

[[snat]]
id = 1
name = "via-n1"
source = "198.18.0.0/24"
out_interface = "n1"
to_address = "203.0.113.22"

[[snat]]
id = 2
name = "anywhere"
source = "198.18.0.0/24"
to_address = "203.0.113.24"
"#;
    let ns = two_leg_lab();
    ns.enter(|| {
        let mut fx = Fixture::load(config);
        fx.set_ingress_ifindex(Some(ifindex("n0")));
        let routable = Packet::udp(H1, 40000, "203.0.113.10", 123);
        let ext = start(&mut fx, "routable via n1", &routable, "via-n1");
        assert_eq!(ip(&ext), addr("203.0.113.22"));
        reply(&fx, "routable via n1: reply", &routable, &ext, "via-n1");
        let unroutable = Packet::udp(H1, 40002, "198.51.100.9", 123);
        let ext = start(&mut fx, "unroutable", &unroutable, "anywhere");
        assert_eq!(ip(&ext), addr("203.0.113.24"));
        reply(&fx, "unroutable: reply", &unroutable, &ext, "anywhere");
        assert_consistent(&fx.conntrack_snapshot(), "end");
        fx.assert_session_filter_exact("end");
        Ok(())
    })
    .expect("running in the namespace");
}

#[test]
fn dnat_plus_masquerade_rewrites_both_sides_and_restores_both() {
    let config = r#"
[[interfaces]]
name = "n0"

[conntrack]
max_sessions = 1024

[[dnat]]
id = 10
name = "web"
destination = "198.18.100.10"
protocol = "tcp"
port = 80
to_address = "203.0.113.10"
to_port = 8080

[[snat]]
id = 20
name = "masq"
source = "198.18.0.0/24"
out_interface = "n1"
masquerade = true
"#;
    let ns = two_leg_lab();
    ns.enter(|| {
        let mut fx = Fixture::load(config);
        let (n0, n1) = (ifindex("n0"), ifindex("n1"));
        let rules_orig = [("web", Dir::Original), ("masq", Dir::Original)];
        let rules_reply = [("web", Dir::Reply), ("masq", Dir::Reply)];
        let request = tcp(H1, 40000, "198.18.100.10", 80, SYN);
        // The FIB is asked about the translated destination (n1), and n1's address is the
        // new source.
        let at_backend = tcp("203.0.113.1", 40000, "203.0.113.10", 8080, SYN);
        fx.set_ingress_ifindex(Some(n0));
        fx.check(
            "first packet",
            &request.build(),
            &Expect::session(Reason::SessionNew, at_backend.build(), &rules_orig),
        );
        assert_session(
            "session",
            &flow_key(&request),
            Session {
                translated: flow_key(&at_backend),
                dnat_rule: fx.slot("web"),
                snat_rule: fx.slot("masq"),
                flags: SESSION_DNAT | SESSION_SNAT,
                tcp_state: TcpState::SynSent as u8,
                orig_packets: 1,
                orig_bytes: request.build().len() as u64,
                ..Default::default()
            },
            &mut fx,
        );
        fx.set_ingress_ifindex(Some(n1));
        fx.check(
            "reply",
            &answer(&at_backend).with_tcp_flags(SYN | ACK).build(),
            &Expect::session(
                Reason::SessionReply,
                answer(&request).with_tcp_flags(SYN | ACK).build(),
                &rules_reply,
            ),
        );
        fx.set_ingress_ifindex(Some(n0));
        fx.check(
            "ACK",
            &request.clone().with_tcp_flags(ACK).build(),
            &Expect::session(
                Reason::SessionOrig,
                at_backend.clone().with_tcp_flags(ACK).build(),
                &rules_orig,
            ),
        );
        assert_consistent(&fx.conntrack_snapshot(), "end");
        fx.assert_session_filter_exact("end");
        Ok(())
    })
    .expect("running in the namespace");
}
