//! Hairpinning through the real XDP object (BPF_PROG_TEST_RUN): an inside host reaches another
//! inside host through the NAT's external side, and the destination sees the sender's external
//! address and port, so its answers come back through the NAT (RFC 4787 REQ-9, RFC 5382
//! REQ-8).
//!
//! - Through an SNAT mapping: the destination is an external endpoint `BINDINGS` holds for
//!   another inside endpoint; the session translates the destination to that endpoint and the
//!   source by the sender's SNAT rule.
//! - Through a DNAT VIP whose backend is inside: the DNAT + SNAT session of scenario 3, which
//!   needs nothing more than an SNAT rule that covers the inside sender for the backend.
//!
//! Expected frames are built from scratch with fresh checksums. Needs root. Never skips.

mod common;

use common::{
    packet::{addr, Packet},
    xdp::{Dir, Expect, Fixture},
};
use nat_agent::dataplane::SessionStore;
use nat_common::{
    conntrack::{tcp_flags::*, Endpoint, FlowKey, SESSION_DNAT, SESSION_SNAT},
    ipv4::proto,
    stats::Reason,
};

const H1: &str = "198.18.0.2";
const H2: &str = "198.18.0.3";
const SRV: &str = "198.51.100.53";
const EXT: &str = "203.0.113.1";

/// One subnet behind one external address, no egress interface (a hairpinned packet goes
/// back inside, so an `out_interface` naming the public side would not cover it).
const POOL: &str = common::xdp::SNAT_ONE_ADDRESS;

fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Packet {
    Packet::tcp(src, sport, dst, dport)
        .with_payload(Vec::new())
        .with_tcp_flags(flags)
}

fn endpoint(address: &str, port: u16, protocol: u8) -> Endpoint {
    Endpoint {
        addr: addr(address).octets(),
        port: port.to_be_bytes(),
        proto: protocol,
        _pad: 0,
    }
}

fn key(src: &str, sport: u16, dst: &str, dport: u16, protocol: u8) -> FlowKey {
    FlowKey {
        src: addr(src).octets(),
        dst: addr(dst).octets(),
        sport: sport.to_be_bytes(),
        dport: dport.to_be_bytes(),
        proto: protocol,
        _pad: [0; 3],
    }
}

/// H2 has a mapping (it talked to a server), H1 connects to that mapping: H2 sees EXT:40000
/// (H1's own mapping, its port kept) and its answers reach H1 from EXT:5000, exactly the
/// endpoint H1 addressed. Both TCP and UDP.
#[test]
fn an_inside_host_reaches_another_through_its_external_mapping() {
    let mut fx = Fixture::load(POOL);
    for (protocol, what) in [(proto::TCP, "TCP"), (proto::UDP, "UDP")] {
        let (p1, p2) = if protocol == proto::TCP {
            (40000, 5000)
        } else {
            (40001, 5001)
        };
        let make = |src: &str, sport: u16, dst: &str, dport: u16, flags: u8| {
            if protocol == proto::TCP {
                tcp(src, sport, dst, dport, flags)
            } else {
                Packet::udp(src, sport, dst, dport)
            }
        };
        // H2's flow out gives it the external endpoint EXT:p2 (port kept).
        let out = make(H2, p2, SRV, 9000, SYN);
        let o = fx.observe(&out.build());
        assert_eq!(o.reasons(), [(Reason::SessionNew, 1)], "{what}: H2 out");
        assert_eq!(
            fx.conntrack()
                .bindings()
                .get(&endpoint(EXT, p2, protocol))
                .unwrap(),
            Some(endpoint(H2, p2, protocol)),
            "{what}: H2 holds EXT:{p2}"
        );

        // H1 -> EXT:p2 is hairpinned to H2:p2 with H1's source translated.
        let request = make(H1, p1, EXT, p2, SYN);
        let at_h2 = make(EXT, p1, H2, p2, SYN);
        fx.check(
            &format!("{what}: H1 to H2's external endpoint"),
            &request.build(),
            &Expect::session(Reason::SessionNew, at_h2.build(), &[("out", Dir::Original)]),
        );
        let session = fx
            .conntrack()
            .sessions()
            .get(&key(H1, p1, EXT, p2, protocol))
            .unwrap()
            .unwrap_or_else(|| panic!("{what}: no hairpin session"));
        assert_eq!(session.translated, key(EXT, p1, H2, p2, protocol));
        assert_eq!(session.flags, SESSION_SNAT, "{what}: session flags");
        assert_eq!(
            fx.conntrack()
                .mappings()
                .get(&endpoint(H1, p1, protocol))
                .unwrap()
                .map(|m| m.external),
            Some(endpoint(EXT, p1, protocol)),
            "{what}: H1 mapped like any flow out"
        );

        // H2 answers the address it saw; H1 must see the endpoint it addressed.
        fx.check(
            &format!("{what}: H2's answer"),
            &make(H2, p2, EXT, p1, SYN | ACK).build(),
            &Expect::session(
                Reason::SessionReply,
                make(EXT, p2, H1, p1, SYN | ACK).build(),
                &[("out", Dir::Reply)],
            ),
        );
        fx.check(
            &format!("{what}: H1 again"),
            &make(H1, p1, EXT, p2, ACK).build(),
            &Expect::session(
                Reason::SessionOrig,
                make(EXT, p1, H2, p2, ACK).build(),
                &[("out", Dir::Original)],
            ),
        );
    }
}

/// Hairpinning needs the sender's source translated, or the destination would answer it
/// directly and the sender would drop an answer from an address it never addressed. With no
/// SNAT rule covering the sender for that inside destination, the packet is not translated
/// (`hairpin_no_snat`, passed untouched) and no session is made.
#[test]
fn hairpinning_without_an_snat_rule_for_the_inside_destination_is_not_translated() {
    let config = r#"
[[interfaces]]
name = "nat0"

[conntrack]
max_sessions = 1024

[[snat]]
id = 1
name = "internet-only"
source = "198.18.0.0/24"
destination = "198.51.100.0/24"
to_address = "203.0.113.1"
"#;
    let mut fx = Fixture::load(config);
    let out = tcp(H2, 5000, SRV, 9000, SYN);
    assert_eq!(
        fx.observe(&out.build()).reasons(),
        [(Reason::SessionNew, 1)]
    );
    let request = tcp(H1, 40000, EXT, 5000, SYN);
    fx.check(
        "H1 to H2's external endpoint",
        &request.build(),
        &Expect::pass_unchanged(Reason::HairpinNoSnat, &request.build()),
    );
    assert_eq!(
        fx.conntrack()
            .sessions()
            .get(&key(H1, 40000, EXT, 5000, proto::TCP))
            .unwrap(),
        None
    );
}

/// A DNAT VIP whose backend sits in the sender's own subnet: the DNAT + SNAT session
/// translates both sides (the backend sees EXT as the client), and the backend's answer is
/// restored to come from the VIP. An SNAT rule covering the inside sender (without an
/// `out_interface` that excludes the inside) is all it takes.
#[test]
fn an_inside_host_reaches_an_inside_backend_through_its_vip() {
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
to_address = "198.18.0.5"
to_port = 8080

[[snat]]
id = 1
name = "out"
source = "198.18.0.0/24"
to_address = "203.0.113.1"
"#;
    let mut fx = Fixture::load(config);
    let backend = "198.18.0.5";
    let rules_orig = [("web", Dir::Original), ("out", Dir::Original)];
    let rules_reply = [("web", Dir::Reply), ("out", Dir::Reply)];
    let request = tcp(H1, 40000, "198.18.100.10", 80, SYN);
    fx.check(
        "H1 to the VIP",
        &request.build(),
        &Expect::session(
            Reason::SessionNew,
            tcp(EXT, 40000, backend, 8080, SYN).build(),
            &rules_orig,
        ),
    );
    let session = fx
        .conntrack()
        .sessions()
        .get(&key(H1, 40000, "198.18.100.10", 80, proto::TCP))
        .unwrap()
        .expect("a DNAT + SNAT session");
    assert_eq!(session.flags, SESSION_DNAT | SESSION_SNAT);
    fx.check(
        "the backend's answer",
        &tcp(backend, 8080, EXT, 40000, SYN | ACK).build(),
        &Expect::session(
            Reason::SessionReply,
            tcp("198.18.100.10", 80, H1, 40000, SYN | ACK).build(),
            &rules_reply,
        ),
    );
    fx.check(
        "H1's ACK",
        &tcp(H1, 40000, "198.18.100.10", 80, ACK).build(),
        &Expect::session(
            Reason::SessionOrig,
            tcp(EXT, 40000, backend, 8080, ACK).build(),
            &rules_orig,
        ),
    );
}
