//! Traffic that is not the NAT's, through the real XDP object (BPF_PROG_TEST_RUN): configured
//! `[[bypass]]` entries (checked before sessions and rules), packets addressed to the appliance
//! itself (never translated, whatever SNAT or reverse-DNAT rule covers their source), and
//! non-IPv4. All of it goes to the kernel byte for byte as it came.
//!
//! The tests run inside a fresh network namespace (the appliance's addresses are those of its
//! veths: n0 198.18.0.1/24, n1 203.0.113.1/24), where the agent's code fills `LOCAL_ADDRS`.
//!
//! Needs root. Never skips.

mod common;

use common::{
    lab::two_leg_lab,
    packet::{arp_request, ethernet, ipv6_udp, Packet, ETH_P_ARP, ETH_P_IPV6},
    xdp::{Dir, Expect, Fixture},
};
use nat_agent::dataplane::{interface_index, SessionStore};
use nat_common::{conntrack::tcp_flags::*, stats::Reason};

const H1: &str = "198.18.0.2";
const PROBE: &str = "168.63.129.16";
const VIP: &str = "198.18.100.20";
const LICENCE: &str = "198.51.100.200";

const BASE: &str = r#"
[[interfaces]]
name = "n0"

[conntrack]
max_sessions = 1024

[[dnat]]
id = 10
name = "whole"
destination = "198.18.100.20"
to_address = "198.18.0.20"

[[snat]]
id = 1
name = "out"
source = "198.18.0.0/24"
to_address = "203.0.113.1"
"#;

const BYPASS: &str = r#"
# The platform's health probes reach the appliance's own services.
[[bypass]]
name = "platform-probe"
source = "168.63.129.16"

# Management: ssh to the VIP's address is the appliance's, not the backend's.
[[bypass]]
name = "ssh"
destination = "198.18.100.20"
protocol = "tcp"
port = 22

# A destination the NAT must not touch (routed, untranslated).
[[bypass]]
name = "licence"
destination = "198.51.100.200"
"#;

fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Packet {
    Packet::tcp(src, sport, dst, dport)
        .with_payload(Vec::new())
        .with_tcp_flags(flags)
}

fn pass(fx: &Fixture, what: &str, reason: Reason, p: &Packet) {
    let frame = p.build();
    fx.check(what, &frame, &Expect::pass_unchanged(reason, &frame));
}

/// Bypass entries win over DNAT, SNAT and even established sessions; what they do not match
/// is translated as before. Changing them is a rule-bank write like any rule change.
#[test]
fn bypass_entries_pass_matching_traffic_before_sessions_and_rules() {
    let ns = two_leg_lab();
    ns.enter(|| {
        let mut fx = Fixture::load(&format!("{BASE}{BYPASS}"));
        fx.set_ingress_ifindex(interface_index("n0"));
        pass(
            &fx,
            "probe to the VIP (DNAT would translate it)",
            Reason::Bypass,
            &tcp(PROBE, 50000, VIP, 80, SYN),
        );
        pass(
            &fx,
            "probe to the appliance",
            Reason::Bypass,
            &Packet::udp(PROBE, 50000, "198.18.0.1", 9),
        );
        pass(
            &fx,
            "ssh to the VIP",
            Reason::Bypass,
            &tcp("198.51.100.7", 50000, VIP, 22, SYN),
        );
        fx.check(
            "another port of the VIP is still DNAT",
            &Packet::tcp("198.51.100.7", 50000, VIP, 23).build(),
            &Expect::forward(
                "whole",
                Packet::tcp("198.51.100.7", 50000, "198.18.0.20", 23).build(),
            ),
        );
        pass(
            &fx,
            "inside host to the licence server (SNAT would translate it)",
            Reason::Bypass,
            &Packet::udp(H1, 40000, LICENCE, 27000),
        );
        let fragments = Packet::udp(H1, 40000, LICENCE, 27000)
            .with_payload(vec![7; 100])
            .fragments(&[48]);
        pass(
            &fx,
            "a later fragment to the licence server",
            Reason::Bypass,
            &fragments[1],
        );

        // An established flow whose destination becomes bypassed: the bypass comes first.
        let flow = Packet::udp(H1, 40001, "198.51.100.201", 53);
        let o = fx.observe(&flow.build());
        assert_eq!(o.reasons(), [(Reason::SessionNew, 1)]);
        fx.reload(&format!(
            "{BASE}{BYPASS}\n[[bypass]]\nname = \"resolver\"\ndestination = \"198.51.100.201\"\n"
        ));
        pass(&fx, "established flow, now bypassed", Reason::Bypass, &flow);
        // ... and the session is still there, for when the entry goes again.
        fx.reload(&format!("{BASE}{BYPASS}"));
        fx.check(
            "established flow, bypass removed",
            &flow.build(),
            &Expect::session(
                Reason::SessionOrig,
                flow.clone().with_src("203.0.113.1").build(),
                &[("out", Dir::Original)],
            ),
        );

        for (what, frame) in [
            (
                "ARP",
                ethernet(&[], ETH_P_ARP, &arp_request(H1, "198.18.0.1")),
            ),
            (
                "IPv6",
                ethernet(&[], ETH_P_IPV6, &ipv6_udp(40000, 53, b"query")),
            ),
        ] {
            fx.check(
                what,
                &frame,
                &Expect::pass_unchanged(Reason::NotIpv4, &frame),
            );
        }
        Ok(())
    })
    .expect("running in the namespace");
}

/// Packets addressed to the appliance itself (its addresses, a directed broadcast, multicast)
/// go to the kernel untouched even when an SNAT rule covers their source (an inside host's
/// ssh or DNS to the box) or a reverse DNAT rule covers it (a backend talking to the box), and
/// an address added later is picked up by the agent's refresh.
#[test]
fn packets_to_the_appliance_itself_are_never_translated() {
    let ns = two_leg_lab();
    ns.enter(|| {
        let mut fx = Fixture::load(BASE);
        fx.set_ingress_ifindex(interface_index("n0"));
        for (what, p) in [
            (
                "ssh to the inside address",
                tcp(H1, 40000, "198.18.0.1", 22, SYN),
            ),
            (
                "to the outside address",
                tcp(H1, 40000, "203.0.113.1", 443, SYN),
            ),
            (
                "directed broadcast",
                Packet::udp(H1, 40000, "198.18.0.255", 137),
            ),
            ("multicast", Packet::udp(H1, 5353, "224.0.0.251", 5353)),
            (
                "limited broadcast",
                Packet::udp(H1, 68, "255.255.255.255", 67),
            ),
            ("echo to the appliance", Packet::icmp_echo(H1, "198.18.0.1")),
            (
                "the DNAT backend to the appliance",
                Packet::icmp_echo("198.18.0.20", "198.18.0.1"),
            ),
        ] {
            pass(&fx, what, Reason::LocalDestination, &p);
        }
        let state = fx.conntrack_snapshot();
        assert!(state.sessions.is_empty(), "no session for local traffic");

        // An address added while running: local once the agent has refreshed.
        ns.run("ip", ["addr", "add", "198.18.0.99/24", "dev", "n0"])
            .expect("adding an address");
        assert!(fx
            .dataplane()
            .refresh_local_addresses()
            .expect("refreshing LOCAL_ADDRS"));
        pass(
            &fx,
            "to the new address",
            Reason::LocalDestination,
            &tcp(H1, 40000, "198.18.0.99", 22, SYN),
        );

        // Control: the same host to a remote address is translated.
        let remote = tcp(H1, 40000, "203.0.113.10", 443, SYN);
        fx.check(
            "to a remote host",
            &remote.build(),
            &Expect::session(
                Reason::SessionNew,
                remote.clone().with_src("203.0.113.1").build(),
                &[("out", Dir::Original)],
            ),
        );
        assert!(fx
            .conntrack()
            .sessions()
            .get(&nat_common::conntrack::FlowKey {
                src: [198, 18, 0, 2],
                dst: [203, 0, 113, 10],
                sport: 40000u16.to_be_bytes(),
                dport: 443u16.to_be_bytes(),
                proto: 6,
                _pad: [0; 3],
            })
            .expect("reading SESSIONS")
            .is_some());
        Ok(())
    })
    .expect("running in the namespace");
}
