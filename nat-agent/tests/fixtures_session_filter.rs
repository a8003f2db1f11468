//! Packet fixtures for the session filter (`nat_common::session_filter`), run through the real
//! XDP object with BPF_PROG_TEST_RUN: a packet whose filter slot counts nothing skips the
//! session tables; a counted slot is looked up, so an established flow still outranks a rule
//! added after it; and the counts follow every entry the program inserts and the agent deletes,
//! exactly.
//!
//! Needs root (loads BPF). Never skips: a missing capability fails every test.
//!
//! Addresses: clients 198.51.100.x, inside hosts 198.18.0.x, external address 203.0.113.1,
//! VIPs 198.18.100.x, backends 198.18.1.x.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use common::{
    packet::{addr, Packet},
    xdp::{Dir, Expect, Fixture},
};
use nat_agent::dataplane::{session_filter::SessionFilter, KernelSessions, SessionStore, Walk};
use nat_common::{
    conntrack::{tcp_flags, Endpoint, FlowKey, Session, NO_RULE, SESSION_DNAT},
    ipv4::proto,
    session_filter::{Counted, SESSION_FILTER_SLOTS},
    stats::Reason,
};

const CLIENT: &str = "198.51.100.7";
const VIP: &str = "198.18.100.11";
const BACKEND: &str = "198.18.1.11";
/// An address no rule names: where the synthetic session sends the flow.
const ELSEWHERE: &str = "198.18.1.99";
const H1: &str = "198.18.0.2";
const SRV: &str = "198.51.100.53";
const EXT: &str = "203.0.113.1";
const FORWARDED: &str = "198.18.1.20";

/// One stateless UDP port rule: VIP:53 -> BACKEND:5353.
const DNS_RULE: &str = r#"
[[interfaces]]
name = "nat0"

[conntrack]
max_sessions = 1024

[[dnat]]
id = 11
name = "dns"
destination = "198.18.100.11"
protocol = "udp"
port = 53
to_address = "198.18.1.11"
to_port = 5353
"#;

/// SNAT for the inside subnet onto one address.
const SNAT_ONLY: &str = common::xdp::SNAT_ONE_ADDRESS;

fn key_of(src: &str, sport: u16, dst: &str, dport: u16) -> FlowKey {
    FlowKey::new(
        addr(src).octets(),
        addr(dst).octets(),
        sport.to_be_bytes(),
        dport.to_be_bytes(),
        proto::UDP,
    )
}

/// The same SNAT rule, plus a stateless port forward of `EXT:port` (UDP) to `FORWARDED`: the
/// rule an operator adds for an external port an inside host's flow already holds.
fn snat_with_forward_of(port: u16) -> String {
    format!(
        r#"{SNAT_ONLY}
[[dnat]]
id = 2
name = "forward"
destination = "{EXT}"
protocol = "udp"
port = {port}
to_address = "{FORWARDED}"
"#
    )
}

/// The external endpoint the program mapped `inside` to, read back from `MAPPINGS`.
fn external_of(fx: &mut Fixture, inside: &FlowKey) -> Endpoint {
    let endpoint = Endpoint {
        addr: inside.src,
        port: inside.sport,
        proto: inside.proto,
        _pad: 0,
    };
    fx.conntrack()
        .mappings()
        .get(&endpoint)
        .expect("reading MAPPINGS")
        .expect("no mapping for the inside endpoint")
        .external
}

fn session_filter(fx: &mut Fixture) -> &SessionFilter {
    fx.conntrack().filter().expect("no session filter")
}

/// Proof by a session the program could only find by looking: one written from the test
/// without its count sends the flow elsewhere only while it is counted.
#[test]
fn a_packet_whose_slot_counts_nothing_skips_the_session_tables() {
    let mut fx = Fixture::load(DNS_RULE);
    let input = Packet::udp(CLIENT, 40000, VIP, 53);
    let by_rule = Packet::udp(CLIENT, 40000, BACKEND, 5353);
    let by_session = Packet::udp(CLIENT, 40000, ELSEWHERE, 5353);
    fx.check(
        "no session: the stateless rule",
        &input.build(),
        &Expect::forward("dns", by_rule.build()),
    );

    let key = key_of(CLIENT, 40000, VIP, 53);
    let session = Session {
        translated: key_of(CLIENT, 40000, ELSEWHERE, 5353),
        dnat_rule: fx.slot("dns"),
        snat_rule: NO_RULE,
        flags: SESSION_DNAT,
        ..Session::default()
    };
    let mut sessions: BpfHashMap<MapData, FlowKey, Session> =
        BpfHashMap::try_from(fx.program_hash_map("SESSIONS")).expect("SESSIONS as a hash map");
    sessions
        .insert(key, session, 0)
        .expect("writing the session");
    fx.check(
        "a session the filter does not count is never looked up",
        &input.build(),
        &Expect::forward("dns", by_rule.build()),
    );

    // Counted as a reply key, it is still not looked up in SESSIONS: each table has its half.
    session_filter(&mut fx).count(&key, Counted::Replies);
    fx.check(
        "counted for REPLIES only: SESSIONS is still skipped",
        &input.build(),
        &Expect::forward("dns", by_rule.build()),
    );
    session_filter(&mut fx).uncount(&key, Counted::Replies);
    session_filter(&mut fx).count(&key, Counted::Sessions);
    fx.check(
        "counted, the session is found and outranks the rule",
        &input.build(),
        &Expect::session(
            Reason::SessionOrig,
            by_session.build(),
            &[("dns", Dir::Original)],
        ),
    );
    session_filter(&mut fx).uncount(&key, Counted::Sessions);
    fx.check(
        "uncounted again, skipped again",
        &input.build(),
        &Expect::forward("dns", by_rule.build()),
    );
    assert_eq!(session_filter(&mut fx).underflows(), 0);
}

/// An established SNAT flow holds an external port; a port forward of that very port is added
/// later. The flow's replies still reach the inside host (its reply entry is counted, so the
/// lookups are made), until the flow is deleted through the agent, which takes the counts back:
/// then the forward applies.
#[test]
fn an_established_flow_outranks_a_forward_of_its_port_until_it_is_deleted() {
    let mut fx = Fixture::load(SNAT_ONLY);
    let first = Packet::udp(H1, 40000, SRV, 123);
    let observed = fx.observe(&first.build());
    assert_eq!(observed.reasons(), [(Reason::SessionNew, 1)]);
    let key = key_of(H1, 40000, SRV, 123);
    let ext = external_of(&mut fx, &key);
    let ext_port = u16::from_be_bytes(ext.port);
    assert_eq!(ext.addr, addr(EXT).octets());
    fx.assert_session_filter_exact("one flow");

    fx.reload(&snat_with_forward_of(ext_port));
    let reply = Packet::udp(SRV, 123, EXT, ext_port);
    fx.check(
        "the flow's reply, a forward of its port now configured",
        &reply.build(),
        &Expect::session(
            Reason::SessionReply,
            Packet::udp(SRV, 123, H1, 40000).build(),
            &[("out", Dir::Reply)],
        ),
    );

    let session = fx
        .conntrack()
        .sessions()
        .get(&key)
        .expect("reading SESSIONS")
        .expect("the flow's session");
    assert!(fx
        .conntrack()
        .delete_session(&key, &session)
        .expect("deleting the session"));
    fx.assert_session_filter_exact("flow deleted");
    fx.check(
        "the same packet once the flow is gone: the forward",
        &reply.build(),
        &Expect::forward(
            "forward",
            Packet::udp(SRV, 123, FORWARDED, ext_port).build(),
        ),
    );
}

/// Flows of every kind the program tracks, and refusals, keep the counts exact; deleting them
/// all through the agent leaves every slot at zero.
#[test]
fn counts_follow_every_entry_the_program_inserts_and_the_agent_deletes() {
    let mut fx = Fixture::load(SNAT_ONLY);
    let mut flows = Vec::new();
    for i in 0..40u16 {
        let host = format!("198.18.0.{}", 2 + i % 20);
        flows.push(Packet::udp(&host, 40000 + i, SRV, 53));
        flows.push(
            Packet::tcp(&host, 41000 + i, SRV, 443)
                .with_payload(Vec::new())
                .with_tcp_flags(tcp_flags::SYN),
        );
        flows.push(Packet::icmp_echo(&host, SRV));
    }
    for p in &flows {
        let reasons = fx.observe(&p.build()).reasons();
        assert!(
            reasons == [(Reason::SessionNew, 1)] || reasons == [(Reason::SessionOrig, 1)],
            "{reasons:?}"
        );
    }
    fx.assert_session_filter_exact("120 packets of flows");
    let state = fx.conntrack_snapshot();
    assert!(state.sessions.len() >= 100, "{}", state.sessions.len());

    for (key, session) in &state.sessions {
        fx.conntrack()
            .delete_session(key, session)
            .expect("deleting a session");
    }
    fx.assert_session_filter_exact("all deleted");
    assert_eq!(
        session_filter(&mut fx).slots_in_use(),
        0,
        "of {SESSION_FILTER_SLOTS} slots"
    );
}

/// The counts stay exact when both CPUs create flows at once (the same flows from both, so
/// that inserts race and lose with `EEXIST`; more flows than the table holds, so that inserts
/// fail for room) while the agent's delete path removes sessions under them: the kernel's BPF
/// atomics and the agent's `fetch_update` on the mapped counters never lose a change.
#[test]
fn counts_stay_exact_while_both_cpus_create_and_the_agent_deletes() {
    const FLOWS: u16 = 1500; // of a table of 1024
    let mut fx = Fixture::load(SNAT_ONLY);
    // The deleter's own store over the same maps: the agent's delete path, with its own
    // mapping of the filter (the same memory).
    let mut deleter = KernelSessions::new(
        Map::HashMap(fx.program_map("SESSIONS")),
        Map::HashMap(fx.program_map("REPLIES")),
        Map::HashMap(fx.program_map("MAPPINGS")),
        Map::HashMap(fx.program_map("BINDINGS")),
    )
    .expect("a second store over the session tables")
    .with_filter(
        SessionFilter::new(Map::Array(fx.program_map("SESSION_FILTER")))
            .expect("a second mapping of the session filter"),
    );
    let frames: Vec<Vec<u8>> = (0..FLOWS)
        .map(|i| {
            let host = format!("198.18.0.{}", 2 + i % 200);
            Packet::udp(&host, 20000 + i, SRV, 53).build()
        })
        .collect();
    let creating = AtomicUsize::new(2);
    let deleted = std::thread::scope(|scope| {
        for cpu in 0..2 {
            let (fx, frames, creating) = (&fx, &frames, &creating);
            scope.spawn(move || {
                common::pin_to_cpu(cpu);
                // Each CPU runs every flow, in opposite orders, three times over.
                for round in 0..3 {
                    for n in 0..frames.len() {
                        let i = if (cpu + round) % 2 == 0 {
                            n
                        } else {
                            frames.len() - 1 - n
                        };
                        fx.run(&frames[i]);
                    }
                }
                creating.fetch_sub(1, Ordering::SeqCst);
            });
        }
        let mut deleted = 0u64;
        // Bounded: the creators finish in well under a second; this stops with them, or
        // after 100000 deletions at the most.
        while creating.load(Ordering::SeqCst) > 0 && deleted < 100_000 {
            let Walk::Page { entries, .. } = deleter.sessions().walk(None, 64).expect("walking")
            else {
                continue;
            };
            for (key, session) in entries {
                if deleter.delete_session(&key, &session).expect("deleting") {
                    deleted += 1;
                }
            }
        }
        deleted
    });
    assert!(deleted > 0, "the deleter never ran alongside the creators");
    let reasons = fx.counters().reasons;
    let count = |r: Reason| reasons.get(r as usize).copied().unwrap_or(0);
    let outcomes = [Reason::SessionNew, Reason::SessionOrig, Reason::TableFull];
    eprintln!("deleted {deleted}; {:?}", outcomes.map(|r| (r, count(r))));
    // Every packet created its flow, found it, or was refused for room: nothing else.
    assert_eq!(
        outcomes.iter().map(|&r| count(r)).sum::<u64>(),
        2 * 3 * u64::from(FLOWS)
    );
    assert_eq!(deleter.filter().map(SessionFilter::underflows), Some(0));
    fx.assert_session_filter_exact("after concurrent creation and deletion");

    let state = fx.conntrack_snapshot();
    for (key, session) in &state.sessions {
        fx.conntrack()
            .delete_session(key, session)
            .expect("deleting");
    }
    fx.assert_session_filter_exact("all deleted");
    assert_eq!(session_filter(&mut fx).slots_in_use(), 0);
}
