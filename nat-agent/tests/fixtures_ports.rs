//! The free-port index through the real XDP object (BPF_PROG_TEST_RUN): allocation when the
//! pool is nearly and entirely used, an index stale in either direction healing, a refused flow
//! giving its port and bit back, the agent's expiry sweep clearing bits, and two CPUs racing to
//! map one inside endpoint (endpoint-independent mapping must survive).
//!
//! Each test loads its own program instance with maps filled from a TOML config by the agent's
//! own path (which creates the indexes of the pool's addresses), and reads the index back
//! through the agent's mapping of `PORT_BITMAPS`. Needs root; never skips.
//!
//! Addresses: inside hosts 198.18.0.0/16, pool 203.0.113.1, remote servers 198.51.100.x.

mod common;

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    sync::{Arc, Barrier},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use common::{
    packet::{addr, Packet},
    pin_to_cpu,
    xdp::{Expect, Fixture, XDP_DROP, XDP_PASS},
};
use nat_agent::{
    dataplane::{MemStore, SessionStore},
    gc::{Gc, GcConfig, PortCapacity, MAX_VISITS_PER_RUN},
};
use nat_common::{
    conntrack::{Endpoint, FlowKey},
    ipv4::proto,
    ports::{PortSpace, PORT_WORDS},
    stats::Reason,
};

const EXT: &str = "203.0.113.1";
const SRV: &str = "198.51.100.53";

/// One /16 of inside hosts leaving as one address, ports `range`.
fn config(range: &str) -> String {
    format!(
        r#"
[[interfaces]]
name = "nat0"

[conntrack]
max_sessions = 1024

[[snat]]
id = 1
name = "out"
source = "198.18.0.0/16"
to_address = "203.0.113.1"
port_range = "{range}"
"#
    )
}

fn endpoint(address: &str, port: u16, protocol: u8) -> Endpoint {
    Endpoint {
        addr: addr(address).octets(),
        port: port.to_be_bytes(),
        proto: protocol,
        _pad: 0,
    }
}

/// Inside host number `i` (198.18.x.y).
fn host(i: u32) -> String {
    let [_, _, c, d] = (i + 2).to_be_bytes();
    format!("198.18.{c}.{d}")
}

/// A UDP flow from host `i`, inside port 80 (below every range here: never preserved).
fn flow(i: u32) -> Packet {
    Packet::udp(&host(i), 80, SRV, 123)
}

fn inside_of(p: &Packet) -> Endpoint {
    Endpoint {
        addr: p.src.octets(),
        port: 80u16.to_be_bytes(),
        proto: proto::UDP,
        _pad: 0,
    }
}

/// Runs the first packet of `p`'s flow and returns the reason and, when created, the
/// external endpoint of its mapping.
fn new_flow(fx: &mut Fixture, p: &Packet) -> (Reason, Option<Endpoint>) {
    let observed = fx.observe(&p.build());
    let reasons = observed.reasons();
    assert_eq!(reasons.len(), 1, "one exit per packet: {reasons:?}");
    let reason = reasons[0].0;
    let mapping = fx
        .conntrack()
        .mappings()
        .get(&inside_of(p))
        .expect("reading MAPPINGS");
    match reason {
        Reason::SessionNew => {
            assert_eq!(observed.out.action, XDP_PASS);
            (
                reason,
                Some(mapping.expect("a new flow has its mapping").external),
            )
        }
        _ => {
            assert_eq!(observed.out.action, XDP_DROP, "{reason:?}");
            assert_eq!(
                observed.out.frame,
                p.build(),
                "a refused frame is untouched"
            );
            (reason, None)
        }
    }
}

/// Whether the index marks `e`'s port claimed (the index must exist).
fn marked(fx: &mut Fixture, e: &Endpoint) -> bool {
    fx.conntrack()
        .ports()
        .expect("the object has free-port indexes")
        .is_marked(e)
        .expect("the pool address has an index")
}

/// Every port marked claimed in the index of the pool address, for `protocol`.
fn marked_ports(fx: &mut Fixture, protocol: u8) -> BTreeSet<u16> {
    let b = fx
        .conntrack()
        .ports()
        .expect("the object has free-port indexes")
        .bitmap(&PortSpace::new(addr(EXT).octets(), protocol))
        .expect("the pool address has an index");
    (0..PORT_WORDS)
        .flat_map(|w| (0..64).map(move |b| (w, b)))
        .filter(|&(w, bit)| b.words[w] & (1 << bit) != 0)
        .map(|(w, bit)| (w * 64 + bit) as u16)
        .collect()
}

/// The claimed ports in `BINDINGS` for `protocol`.
fn bound_ports(state: &MemStore, protocol: u8) -> BTreeSet<u16> {
    state
        .bindings
        .keys()
        .filter(|e| e.proto == protocol)
        .map(|e| u16::from_be_bytes(e.port))
        .collect()
}

/// The agent's expiry sweep over the fixture's real tables, one complete pass at `now_ns`.
fn sweep(fx: &mut Fixture, now_ns: u64) -> Gc {
    let mut gc = Gc::new(GcConfig {
        timeouts: fx.model.conntrack.timeouts,
        max_sessions: fx.model.conntrack.max_sessions,
        max_visits: MAX_VISITS_PER_RUN,
        ports: PortCapacity::from_rules(&fx.model.snat),
    });
    let report = gc.run(fx.conntrack(), now_ns).expect("sweep run");
    assert!(report.pass_completed, "one run covers these small tables");
    gc
}

fn boottime_ns() -> u64 {
    nat_agent::gc::boottime_ns()
}

#[test]
fn the_last_free_port_is_found_and_a_full_range_is_refused_with_no_port() {
    let mut fx = Fixture::load(&config("1024-1279"));
    // 255 of the 256 ports through the program, each new flow from a new host.
    let mut ports = BTreeSet::new();
    for i in 0..255 {
        let (reason, ext) = new_flow(&mut fx, &flow(i));
        assert_eq!(reason, Reason::SessionNew, "flow {i}");
        let ext = ext.unwrap();
        assert_eq!(Ipv4Addr::from(ext.addr), addr(EXT));
        let port = u16::from_be_bytes(ext.port);
        assert!((1024..=1279).contains(&port), "flow {i}: {port}");
        assert!(ports.insert(port), "flow {i}: port {port} handed out twice");
    }
    let free: Vec<u16> = (1024..=1279).filter(|p| !ports.contains(p)).collect();
    assert_eq!(free.len(), 1);
    assert_eq!(
        marked_ports(&mut fx, proto::UDP),
        ports,
        "the index marks exactly the claims"
    );

    // Exactly one port is left: the next flow must get it, whatever its random start.
    let (reason, ext) = new_flow(&mut fx, &flow(255));
    assert_eq!(
        reason,
        Reason::SessionNew,
        "the last free port must be found"
    );
    assert_eq!(u16::from_be_bytes(ext.unwrap().port), free[0]);

    // Full: refused as pool exhaustion, nothing claimed, and every time.
    let before = fx.conntrack_snapshot();
    for i in 256..260 {
        let p = flow(i);
        fx.check(
            &format!("flow {i}, range full"),
            &p.build(),
            &Expect::drop_unchanged(Reason::NoPort, &p.build()),
        );
    }
    assert_eq!(
        fx.conntrack_snapshot(),
        before,
        "refused flows leave no state"
    );

    // A port freed by the agent (its mapping deleted, as the sweep does) is found again.
    let victim = flow(17);
    let inside = inside_of(&victim);
    let mapping = fx.conntrack().mappings().get(&inside).unwrap().unwrap();
    let key = FlowKey {
        src: victim.src.octets(),
        dst: addr(SRV).octets(),
        sport: 80u16.to_be_bytes(),
        dport: 123u16.to_be_bytes(),
        proto: proto::UDP,
        _pad: [0; 3],
    };
    let session = fx.conntrack().sessions().get(&key).unwrap().unwrap();
    assert!(fx.conntrack().delete_session(&key, &session).unwrap());
    assert!(fx.conntrack().delete_mapping(&inside, &mapping).unwrap());
    assert!(
        !marked(&mut fx, &mapping.external),
        "the agent cleared the bit"
    );
    let (reason, ext) = new_flow(&mut fx, &flow(300));
    assert_eq!(reason, Reason::SessionNew);
    assert_eq!(ext.unwrap().port, mapping.external.port);
}

#[test]
fn a_stale_index_heals_in_both_directions() {
    let mut fx = Fixture::load(&config("2000-2003"));
    let mut claimed = Vec::new();
    for i in 0..3 {
        let (reason, ext) = new_flow(&mut fx, &flow(i));
        assert_eq!(reason, Reason::SessionNew);
        claimed.push(ext.unwrap());
    }
    let taken: BTreeSet<u16> = claimed.iter().map(|e| u16::from_be_bytes(e.port)).collect();
    let last = (2000..=2003).find(|p| !taken.contains(p)).unwrap();
    let last_ext = endpoint(EXT, last, proto::UDP);

    // Clear bit for a taken port: the last port claimed behind the index's back (a binding
    // without its bit). The search finds it, the insert fails, the kernel sets the bit and
    // searches again: nothing left, so pool exhaustion.
    let mut bindings: BpfHashMap<MapData, Endpoint, Endpoint> =
        BpfHashMap::try_from(fx.program_hash_map("BINDINGS")).expect("BINDINGS");
    let squatter = endpoint("198.18.200.1", 80, proto::UDP);
    bindings.insert(last_ext, squatter, 0).unwrap();
    assert!(!marked(&mut fx, &last_ext), "stale: taken but not marked");
    let (reason, _) = new_flow(&mut fx, &flow(10));
    assert_eq!(
        reason,
        Reason::NoPort,
        "after one failed claim the index shows the range full"
    );
    assert!(
        marked(&mut fx, &last_ext),
        "the failed insert marked the port"
    );

    // Set bit for a free port: the binding goes without the agent clearing the bit. The port
    // is hidden (refused as exhausted) until the sweep repairs the index.
    bindings.remove(&last_ext).unwrap();
    assert!(marked(&mut fx, &last_ext), "stale: free but marked");
    let (reason, _) = new_flow(&mut fx, &flow(11));
    assert_eq!(reason, Reason::NoPort, "a stale set bit hides its port");
    let gc = sweep(&mut fx, boottime_ns());
    assert_eq!(gc.status().index_repairs.cleared, 1, "{:?}", gc.status());
    assert!(
        !marked(&mut fx, &last_ext),
        "the sweep cleared the stale bit"
    );
    let (reason, ext) = new_flow(&mut fx, &flow(12));
    assert_eq!(reason, Reason::SessionNew);
    assert_eq!(ext.unwrap(), last_ext);
    assert_eq!(marked_ports(&mut fx, proto::UDP), (2000..=2003).collect());
}

#[test]
fn the_sweep_marks_claims_the_index_missed() {
    let mut fx = Fixture::load(&config("3000-3999"));
    // A claim written from user space (as state kept across a restart would be): no bit.
    let mut bindings: BpfHashMap<MapData, Endpoint, Endpoint> =
        BpfHashMap::try_from(fx.program_hash_map("BINDINGS")).expect("BINDINGS");
    let ext = endpoint(EXT, 3500, proto::UDP);
    bindings
        .insert(ext, endpoint("198.18.200.1", 80, proto::UDP), 0)
        .unwrap();
    assert!(!marked(&mut fx, &ext));
    let gc = sweep(&mut fx, boottime_ns());
    assert_eq!(gc.status().index_repairs.set, 1, "{:?}", gc.status());
    assert!(marked(&mut fx, &ext), "the sweep marked the claim");
}

#[test]
fn a_flow_refused_after_its_claim_gives_back_the_port_and_its_bit() {
    let mut fx = Fixture::load(&config("1024-65535"));
    // The reply tuple the new flow would need is taken by another session: the flow claims
    // 40000 (its own port, preserved), then fails on REPLIES and must give the port back.
    let p = Packet::udp(&host(1), 40000, SRV, 123);
    let mut replies: BpfHashMap<MapData, FlowKey, FlowKey> =
        BpfHashMap::try_from(fx.program_hash_map("REPLIES")).expect("REPLIES");
    let reply_key = FlowKey {
        src: addr(SRV).octets(),
        dst: addr(EXT).octets(),
        sport: 123u16.to_be_bytes(),
        dport: 40000u16.to_be_bytes(),
        proto: proto::UDP,
        _pad: [0; 3],
    };
    let someone_else = FlowKey {
        src: addr("198.18.9.9").octets(),
        ..reply_key.reversed()
    };
    // Counted in the session filter as the program counts its own entries.
    fx.conntrack()
        .filter()
        .expect("the loaded object has no session filter")
        .count(&reply_key, nat_common::session_filter::Counted::Replies);
    replies.insert(reply_key, someone_else, 0).unwrap();
    fx.check(
        "reply tuple taken",
        &p.build(),
        &Expect::drop_unchanged(Reason::SessionClash, &p.build()),
    );
    let state = fx.conntrack_snapshot();
    assert!(
        state.bindings.is_empty(),
        "claim given back: {:?}",
        state.bindings
    );
    assert!(
        state.mappings.is_empty(),
        "mapping given back: {:?}",
        state.mappings
    );
    assert!(
        marked_ports(&mut fx, proto::UDP).is_empty(),
        "the released claim's bit is clear"
    );
    fx.assert_session_filter_exact("a flow refused for a taken reply tuple");
}

#[test]
fn the_expiry_sweep_clears_the_bits_of_the_mappings_it_frees() {
    let mut fx = Fixture::load(&config("1024-65535"));
    let mut exts = Vec::new();
    for i in 0..20 {
        let (reason, ext) = new_flow(&mut fx, &flow(i));
        assert_eq!(reason, Reason::SessionNew);
        exts.push(ext.unwrap());
    }
    let want: BTreeSet<u16> = exts.iter().map(|e| u16::from_be_bytes(e.port)).collect();
    assert_eq!(marked_ports(&mut fx, proto::UDP), want);
    // An hour later every UDP session has expired: the sweep deletes sessions, then mappings
    // with their claims, and clears their bits.
    let later = boottime_ns() + 3_600_000_000_000;
    let gc = sweep(&mut fx, later);
    assert_eq!(gc.status().expiries.udp, 20);
    assert_eq!(gc.status().mappings_expired, 20);
    let state = fx.conntrack_snapshot();
    assert!(state.bindings.is_empty());
    assert!(
        marked_ports(&mut fx, proto::UDP).is_empty(),
        "every bit cleared"
    );
}

/// Two CPUs start flows of the same inside endpoint (to two servers) at the same moment, many
/// times over. The inside port is out of range, so each CPU claims a random port; whichever
/// inserts the mapping first wins and the other must take the winner's mapping and give its
/// own claim (binding and bit) back. Whether a round really overlapped is up to the
/// scheduler; over hundreds of rounds on two CPUs many do, and every round must end with one
/// mapping, one claim, one bit, and both sessions translating to the same external endpoint.
#[test]
fn two_cpus_mapping_one_endpoint_at_once_agree_on_one_external_port() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cpus >= 2,
        "the race needs two CPUs, this machine has {cpus}"
    );
    let mut fx = Fixture::load(&config("1024-65535"));
    const ROUNDS: u32 = 400;
    let servers = ["198.51.100.1", "198.51.100.2"];
    for round in 0..ROUNDS {
        let inside_host = host(round);
        let packets: Vec<Vec<u8>> = servers
            .iter()
            .map(|s| Packet::udp(&inside_host, 80, s, 123).build())
            .collect();
        let barrier = Arc::new(Barrier::new(2));
        let fx_ref = &fx;
        std::thread::scope(|scope| {
            for (cpu, frame) in packets.iter().enumerate() {
                let barrier = Arc::clone(&barrier);
                scope.spawn(move || {
                    pin_to_cpu(cpu);
                    barrier.wait();
                    let out = fx_ref.run(frame);
                    assert_eq!(out.action, XDP_PASS, "round {round}, CPU {cpu}");
                });
            }
        });
        let inside = endpoint(&inside_host, 80, proto::UDP);
        let mapping = fx
            .conntrack()
            .mappings()
            .get(&inside)
            .unwrap()
            .unwrap_or_else(|| panic!("round {round}: no mapping"));
        for s in servers {
            let key = FlowKey {
                src: inside.addr,
                dst: addr(s).octets(),
                sport: inside.port,
                dport: 123u16.to_be_bytes(),
                proto: proto::UDP,
                _pad: [0; 3],
            };
            let session = fx
                .conntrack()
                .sessions()
                .get(&key)
                .unwrap()
                .unwrap_or_else(|| panic!("round {round}: no session to {s}"));
            assert_eq!(
                (session.translated.src, session.translated.sport),
                (mapping.external.addr, mapping.external.port),
                "round {round}: the session to {s} left from another port than the mapping's"
            );
        }
    }
    let state = fx.conntrack_snapshot();
    assert_eq!(state.mappings.len(), ROUNDS as usize);
    assert_eq!(
        state.bindings.len(),
        ROUNDS as usize,
        "every losing claim was given back"
    );
    assert_eq!(
        marked_ports(&mut fx, proto::UDP),
        bound_ports(&state, proto::UDP),
        "the index marks exactly the claims that remain"
    );
}
