//! The forwarding stage's route cache, through the real program (BPF_PROG_TEST_RUN): a FIB
//! answer is reused only for the same question, under the same generation, for a packet no
//! longer than one the FIB said fits, and at most `ENTRY_USES` times; generation "off" asks the
//! FIB every time. Each change of the kernel's state below is made *without* telling the
//! program, so the frame the program sends shows whether the answer came from the cache or
//! from the FIB: the next hop's MAC address is the one the neighbour table held when the
//! answer was taken.
//!
//! The cache is per CPU, so the test thread is pinned to one CPU for the whole test.
//!
//! Needs root. Never skips.

mod common;

use std::time::{Duration, Instant};

use common::{
    packet::{verify_checksums, Packet},
    pin_to_cpu,
    xdp::{Expect, Fixture},
};
use nat_agent::{dataplane::interface_index, route_watch::RouteWatch};
use nat_common::{
    maps::{FORWARD_XDP, IFACE_KNOWN, ROUTE_CACHE_GEN},
    route_cache::{self, RouteCacheResult, ENTRY_USES, GENERATION_OFF},
    stats::{ForwardResult, Reason},
};
use nat_lab::Netns;

/// The next hop of 198.18.1.0/24 and of 198.18.3.0/24 (MTU 600).
const GATEWAY: &str = "198.18.0.9";
/// The next hop of 198.18.2.0/24.
const OTHER_GATEWAY: &str = "198.18.0.10";

/// A namespace whose n0 reaches three backend networks through two gateways, both with
/// permanent neighbour entries (so the FIB answers from XDP).
fn lab() -> Netns {
    let ns = Netns::new().expect("creating a network namespace (needs root)");
    let ip = |args: &[&str]| ns.run("ip", args).expect("ip");
    ip(&["link", "add", "n0", "type", "veth", "peer", "name", "n0p"]);
    ip(&["link", "set", "n0", "address", "02:00:00:00:00:f0"]);
    ip(&["addr", "add", "198.18.0.1/24", "dev", "n0"]);
    ip(&["link", "set", "n0", "up"]);
    ip(&["link", "set", "n0p", "up"]);
    ip(&["route", "add", "198.18.1.0/24", "via", GATEWAY, "dev", "n0"]);
    ip(&[
        "route",
        "add",
        "198.18.2.0/24",
        "via",
        OTHER_GATEWAY,
        "dev",
        "n0",
    ]);
    ip(&[
        "route",
        "add",
        "198.18.3.0/24",
        "via",
        GATEWAY,
        "dev",
        "n0",
        "mtu",
        "lock",
        "600",
    ]);
    set_neighbour(&ns, GATEWAY, 0x01);
    set_neighbour(&ns, OTHER_GATEWAY, 0xa1);
    ns.sysctl("net.ipv4.ip_forward", "1")
        .expect("enabling forwarding");
    ns
}

/// n0's MAC address, set by [`lab`]: the source of every frame sent from XDP.
const N0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xf0];
/// The first five bytes of every next hop's MAC ([`set_neighbour`] sets the last).
const NEXT_HOP_MAC_PREFIX: [u8; 5] = [0x02, 0, 0, 0, 0];
/// Untagged Ethernet header length: where the IPv4 header starts.
const ETH_LEN: usize = 14;

/// Points `addr`'s permanent neighbour entry at MAC 02:00:00:00:00:`last`.
fn set_neighbour(ns: &Netns, addr: &str, last: u8) {
    let mac = format!("02:00:00:00:00:{last:02x}");
    ns.run(
        "ip",
        [
            "neigh",
            "replace",
            addr,
            "lladdr",
            &mac,
            "dev",
            "n0",
            "nud",
            "permanent",
        ],
    )
    .expect("ip neigh replace");
}

/// A config with one stateless DNAT rule per backend: VIP 198.18.100.<i+1> -> `backends[i]`.
fn config(backends: &[String]) -> String {
    let mut text = String::from("[[interfaces]]\nname = \"n0\"\nforwarding = \"xdp\"\n");
    for (i, backend) in backends.iter().enumerate() {
        text += &format!(
            "\n[[dnat]]\nid = {}\nname = \"vip{i}\"\ndestination = \"198.18.100.{}\"\nto_address = \"{backend}\"\n",
            i + 1,
            i + 1
        );
    }
    text
}

/// Two questions, each to a backend behind another gateway, that share a cache slot: from
/// [`CLIENT`] to the first backend, and from the returned client to the second (both arriving
/// on `ingress`). Only the comparison of the whole question keeps one from getting the other's
/// answer. (The slot function spreads the hosts of one subnet evenly, so a collision needs
/// the client to vary too.)
fn colliding_questions(ingress: u32) -> (String, String, String) {
    let slot_of = |client: [u8; 4], backend: [u8; 4]| {
        route_cache::slot(
            ingress,
            u32::from_ne_bytes(client),
            u32::from_ne_bytes(backend),
            0,
            17,
        )
    };
    for a in 1..=254u8 {
        let first = slot_of(CLIENT_OCTETS, [198, 18, 1, a]);
        for client in 1..=254u8 {
            for b in 1..=254u8 {
                if slot_of([198, 51, 100, client], [198, 18, 2, b]) == first {
                    return (
                        format!("198.18.1.{a}"),
                        format!("198.51.100.{client}"),
                        format!("198.18.2.{b}"),
                    );
                }
            }
        }
    }
    panic!("no two questions share a slot: the slot function spreads nothing?");
}

const CLIENT: &str = "198.51.100.7";
const CLIENT_OCTETS: [u8; 4] = [198, 51, 100, 7];

/// One packet from [`CLIENT`] to VIP `vip` (1-based), `payload` bytes of UDP data.
fn to_vip(vip: u8, payload: usize) -> Vec<u8> {
    from_to_vip(CLIENT, vip, payload)
}

fn from_to_vip(client: &str, vip: u8, payload: usize) -> Vec<u8> {
    Packet::udp(client, 4000, &format!("198.18.100.{vip}"), 53)
        .with_payload(vec![0x5a; payload])
        .build()
}

/// What the program did with `frame`: the forwarding result, the last byte of the next hop's
/// MAC (when sent from XDP), and which route-cache counter moved (if any). A frame sent from
/// XDP is also checked whole, whichever way its route came: both MACs, TTL one lower, every
/// checksum right.
#[derive(Debug, PartialEq, Eq)]
struct Sent {
    result: ForwardResult,
    next_hop: Option<u8>,
    route: Option<RouteCacheResult>,
}

fn send(fx: &Fixture, frame: &[u8]) -> Sent {
    let before = fx.counters();
    let out = fx.run(frame);
    let after = fx.counters();
    let moved =
        |b: &[u64], a: &[u64]| -> Vec<usize> { (0..a.len()).filter(|&i| a[i] != b[i]).collect() };
    let forward = moved(&before.forward, &after.forward);
    assert_eq!(forward.len(), 1, "one forwarding result per packet");
    let result = ForwardResult::ALL[forward[0]];
    let route = moved(&before.route_cache, &after.route_cache);
    assert!(
        route.len() <= 1,
        "at most one route-cache outcome per packet"
    );
    let sent_from_xdp = matches!(
        result,
        ForwardResult::Transmitted | ForwardResult::Redirected
    );
    if sent_from_xdp {
        assert_eq!(out.frame[..5], NEXT_HOP_MAC_PREFIX, "next hop's MAC");
        assert_eq!(out.frame[6..12], N0_MAC, "the egress interface's MAC");
        assert_eq!(
            out.frame[ETH_LEN + 8],
            frame[ETH_LEN + 8] - 1,
            "TTL decremented"
        );
        verify_checksums(&out.frame).unwrap_or_else(|e| panic!("sent frame: {e}"));
    }
    Sent {
        result,
        next_hop: sent_from_xdp.then(|| out.frame[5]),
        route: route.first().map(|&i| RouteCacheResult::ALL[i]),
    }
}

fn hit(next_hop: u8) -> Sent {
    Sent {
        result: ForwardResult::Transmitted,
        next_hop: Some(next_hop),
        route: Some(RouteCacheResult::Hit),
    }
}

fn filled(next_hop: u8) -> Sent {
    Sent {
        result: ForwardResult::Transmitted,
        next_hop: Some(next_hop),
        route: Some(RouteCacheResult::Filled),
    }
}

fn uncached(next_hop: u8) -> Sent {
    Sent {
        result: ForwardResult::Transmitted,
        next_hop: Some(next_hop),
        route: None,
    }
}

fn set_generation(fx: &mut Fixture, generation: u32) {
    fx.program_array::<u32>(ROUTE_CACHE_GEN)
        .set(0, generation, 0)
        .expect("writing ROUTE_CACHE_GEN");
}

fn generation(fx: &mut Fixture) -> u32 {
    fx.program_array::<u32>(ROUTE_CACHE_GEN)
        .get(&0, 0)
        .expect("reading ROUTE_CACHE_GEN")
}

#[test]
fn fib_answers_are_reused_only_while_they_are_the_fibs() {
    pin_to_cpu(0);
    let ns = lab();
    ns.enter(|| {
        let n0 = interface_index("n0").expect("n0's index");
        let (near, other_client, far) = colliding_questions(n0);
        let backends = [near, far, "198.18.3.20".to_string()];
        let mut fx = Fixture::load(&config(&backends));
        fx.set_ingress_ifindex(Some(n0));
        fx.set_interface_flags(n0, IFACE_KNOWN | FORWARD_XDP);
        let small = to_vip(1, 18);

        // Off (a program whose agent is not listening): every packet asks the FIB and
        // follows the neighbour table at once.
        set_generation(&mut fx, GENERATION_OFF);
        assert_eq!(send(&fx, &small), uncached(0x01));
        set_neighbour(&ns, GATEWAY, 0x02);
        assert_eq!(send(&fx, &small), uncached(0x02));

        // On: the first packet asks and is remembered, the next ones reuse the answer even
        // though the neighbour changed (the agent has not reported it yet).
        set_generation(&mut fx, 7);
        assert_eq!(send(&fx, &small), filled(0x02));
        set_neighbour(&ns, GATEWAY, 0x03);
        assert_eq!(send(&fx, &small), hit(0x02));

        // A new generation (what the agent writes on a routing notification): asked again.
        set_generation(&mut fx, 8);
        assert_eq!(send(&fx, &small), filled(0x03));
        assert_eq!(send(&fx, &small), hit(0x03));

        // A longer packet than the FIB said fits asks again; a shorter one reuses.
        set_neighbour(&ns, GATEWAY, 0x04);
        assert_eq!(send(&fx, &to_vip(1, 400)), filled(0x04));
        assert_eq!(send(&fx, &small), hit(0x04));

        // Another client's question about the other backend lands in the same slot: its own
        // answer, never the first one's; and the first one's is asked again after.
        let other = from_to_vip(&other_client, 2, 18);
        assert_eq!(send(&fx, &other), filled(0xa1));
        assert_eq!(send(&fx, &other), hit(0xa1));
        assert_eq!(send(&fx, &small), filled(0x04));

        // The FIB's MTU check stays: a small packet fills the 600-byte route's entry, a packet
        // over its MTU is still handed to the kernel, not sent from the cache.
        let small_mtu = to_vip(3, 18);
        assert_eq!(send(&fx, &small_mtu), filled(0x04));
        assert_eq!(
            send(&fx, &to_vip(3, 900)),
            Sent {
                result: ForwardResult::MtuExceeded,
                next_hop: None,
                route: None,
            }
        );
        assert_eq!(send(&fx, &small_mtu), hit(0x04));

        // Without any notification, an answer is used ENTRY_USES times, then asked again.
        set_generation(&mut fx, 9);
        assert_eq!(send(&fx, &small), filled(0x04));
        set_neighbour(&ns, GATEWAY, 0x05);
        for use_ in 1..=ENTRY_USES {
            let sent = send(&fx, &small);
            assert_eq!(sent, hit(0x04), "use {use_} of {ENTRY_USES}");
        }
        assert_eq!(send(&fx, &small), filled(0x05));
        Ok(())
    })
    .expect("running in the namespace");
}

/// The agent's side: the cache is on only while someone listens to routing changes, only
/// where an interface forwards from XDP and `[agent] route_cache` is not false; a routing
/// change bumps the generation; stopping turns it off for good.
#[test]
fn the_agent_turns_the_cache_on_only_where_it_can_listen_and_is_wanted() {
    let ns = lab();
    ns.enter(|| {
        let backends = ["198.18.1.20".to_string()];
        let xdp = config(&backends);
        let mut fx = Fixture::load(&xdp);
        assert_eq!(
            generation(&mut fx),
            GENERATION_OFF,
            "a new program starts off"
        );
        let model = fx.model.clone();
        let watch = RouteWatch::for_config(&model, fx.dataplane())
            .expect("starting the route cache")
            .expect("the cache is on");
        assert_ne!(generation(&mut fx), GENERATION_OFF);

        // Routing changes the kernel reports: a new generation, soon, for each (a nexthop
        // object replaced in place, as FRR's zebra does, moves every route that uses it).
        let ip = |args: &[&str]| {
            ns.run("ip", args).expect("ip");
        };
        ip(&["nexthop", "add", "id", "7", "via", GATEWAY, "dev", "n0"]);
        ip(&["route", "add", "198.18.7.0/24", "nhid", "7"]);
        let changes: [(&str, &dyn Fn()); 2] = [
            ("a neighbour change", &|| set_neighbour(&ns, GATEWAY, 0x42)),
            ("a nexthop object replaced", &|| {
                ip(&[
                    "nexthop",
                    "replace",
                    "id",
                    "7",
                    "via",
                    OTHER_GATEWAY,
                    "dev",
                    "n0",
                ])
            }),
        ];
        for (what, change) in changes {
            let before = generation(&mut fx);
            change();
            let deadline = Instant::now() + Duration::from_secs(5);
            while generation(&mut fx) == before {
                assert!(Instant::now() < deadline, "no bump after {what}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }

        watch.stop().expect("stopping");
        assert_eq!(generation(&mut fx), GENERATION_OFF, "off once stopped");
        // Changes after the stop never turn it on again.
        set_neighbour(&ns, GATEWAY, 0x43);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(generation(&mut fx), GENERATION_OFF, "still off");
        drop(watch);

        for (what, text) in [
            (
                "route_cache = false",
                format!("[agent]\nroute_cache = false\n\n{xdp}"),
            ),
            (
                "kernel forwarding",
                xdp.replace("forwarding = \"xdp\"", "forwarding = \"kernel\""),
            ),
        ] {
            let mut fx = Fixture::load(&text);
            let model = fx.model.clone();
            assert!(
                RouteWatch::for_config(&model, fx.dataplane())
                    .expect("deciding on the route cache")
                    .is_none(),
                "{what}: no cache"
            );
            assert_eq!(generation(&mut fx), GENERATION_OFF, "{what}: off");
        }
        Ok(())
    })
    .expect("running in the namespace");
}

/// Where XDP forwards it is the router: a packet whose TTL would run out here (TTL 1) goes to
/// the kernel untranslated, so the kernel answers its real sender with "time exceeded" quoting
/// what it sent; TTL 2 is translated and leaves from XDP with TTL 1 and a header checksum
/// recomputed (checked from scratch, with the whole frame).
#[test]
fn ttl_1_goes_to_the_kernel_untranslated_and_ttl_2_leaves_from_xdp_with_ttl_1() {
    pin_to_cpu(0);
    let ns = lab();
    ns.enter(|| {
        let n0 = interface_index("n0").expect("n0's index");
        let mut fx = Fixture::load(&config(&["198.18.1.20".to_string()]));
        fx.set_ingress_ifindex(Some(n0));
        fx.set_interface_flags(n0, IFACE_KNOWN | FORWARD_XDP);
        let with_ttl = |dst: &str, ttl: u8| {
            let mut p = Packet::udp(CLIENT, 4000, dst, 53);
            p.ttl = ttl;
            p
        };

        let expiring = with_ttl("198.18.100.1", 1).build();
        fx.check(
            "TTL 1",
            &expiring,
            &Expect::pass_unchanged(Reason::TtlExpiring, &expiring),
        );

        let last_hop = with_ttl("198.18.100.1", 2).build();
        assert_eq!(send(&fx, &last_hop), uncached(0x01));
        let mut expected = with_ttl("198.18.1.20", 1).build();
        expected[..5].copy_from_slice(&NEXT_HOP_MAC_PREFIX);
        expected[5] = 0x01;
        expected[6..12].copy_from_slice(&N0_MAC);
        assert_eq!(
            fx.run(&last_hop).frame,
            expected,
            "TTL 2: the frame sent from XDP"
        );
        Ok(())
    })
    .expect("running in the namespace");
}
