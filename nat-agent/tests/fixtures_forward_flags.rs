//! Which interfaces forward from XDP, as the program reads it (BPF_PROG_TEST_RUN): the array
//! `IFACE_FLAGS` first, where its entry is marked known; the hash `IFACE_FORWARD` for an entry
//! not (yet) known, and for an interface index beyond the array. Checked through the
//! forwarding counters: "the kernel forwards" or an attempt from XDP (which, without a
//! neighbour for the backend, goes to the kernel as `no_neighbour`).
//!
//! Needs root. Never skips.

mod common;

use aya::maps::{HashMap as AyaHashMap, MapData};
use common::{packet::Packet, xdp::Fixture};
use nat_agent::dataplane::interface_index;
use nat_common::{
    maps::{FORWARD_XDP, IFACE_FLAG_SLOTS, IFACE_FORWARD, IFACE_KNOWN},
    stats::ForwardResult,
};
use nat_lab::Netns;

const CONFIG: &str = r#"
[[interfaces]]
name = "n0"

[[dnat]]
id = 10
name = "vip"
destination = "198.18.100.20"
to_address = "198.18.1.20"
"#;

/// An interface index beyond `IFACE_FLAGS` (indexes can be chosen when a link is made).
const BIG_INDEX: u32 = IFACE_FLAG_SLOTS + 904;

/// A namespace with a small-index leg (n0) and a big-index one (big0), both with a route to
/// the backend's network, so a FIB lookup from either finds the route (and no neighbour).
fn lab() -> Netns {
    let ns = Netns::new().expect("creating a network namespace (needs root)");
    let big = BIG_INDEX.to_string();
    let add = |args: &[&str]| ns.run("ip", args).expect("ip");
    add(&["link", "add", "n0", "type", "veth", "peer", "name", "n0p"]);
    add(&[
        "link", "add", "big0", "index", &big, "type", "veth", "peer", "name", "big0p",
    ]);
    add(&["addr", "add", "198.18.0.1/24", "dev", "n0"]);
    add(&["addr", "add", "198.18.2.1/24", "dev", "big0"]);
    for dev in ["n0", "n0p", "big0", "big0p"] {
        add(&["link", "set", dev, "up"]);
    }
    add(&[
        "route",
        "add",
        "198.18.1.0/24",
        "via",
        "198.18.0.9",
        "dev",
        "n0",
    ]);
    ns.sysctl("net.ipv4.ip_forward", "1")
        .expect("enabling forwarding");
    ns
}

/// What the forwarding stage did with one translated packet arriving on `ifindex`.
fn forward_result(fx: &mut Fixture, ifindex: u32) -> ForwardResult {
    fx.set_ingress_ifindex(Some(ifindex));
    let before = fx.counters().forward;
    let frame = Packet::udp("198.51.100.7", 4000, "198.18.100.20", 53).build();
    fx.run(&frame);
    let after = fx.counters().forward;
    let moved: Vec<ForwardResult> = ForwardResult::ALL
        .into_iter()
        .filter(|r| after[*r as usize] != before[*r as usize])
        .collect();
    assert_eq!(
        moved.len(),
        1,
        "exactly one forwarding result per translated packet, got {moved:?}"
    );
    moved[0]
}

fn set_hash(fx: &mut Fixture, ifindex: u32, flags: Option<u32>) {
    let mut table: AyaHashMap<MapData, u32, u32> =
        AyaHashMap::try_from(fx.program_hash_map(IFACE_FORWARD)).expect("IFACE_FORWARD");
    match flags {
        Some(f) => table.insert(ifindex, f, 0).expect("writing IFACE_FORWARD"),
        None => {
            let _ = table.remove(&ifindex);
        }
    }
}

#[test]
fn the_flags_array_decides_where_it_knows_and_the_hash_elsewhere() {
    let ns = lab();
    ns.enter(|| {
        let mut fx = Fixture::load(CONFIG);
        let small = interface_index("n0").expect("n0's index");
        assert!(small < IFACE_FLAG_SLOTS, "n0 got index {small}");
        assert_eq!(interface_index("big0"), Some(BIG_INDEX));

        // Nothing written anywhere: the kernel forwards.
        assert_eq!(
            forward_result(&mut fx, small),
            ForwardResult::KernelForwards
        );

        // Only the hash says XDP (a new program generation before its agent wrote the
        // array): the hash decides.
        set_hash(&mut fx, small, Some(FORWARD_XDP));
        assert_eq!(forward_result(&mut fx, small), ForwardResult::NoNeighbour);

        // The array, once known, decides, even against the hash.
        fx.set_interface_flags(small, IFACE_KNOWN);
        assert_eq!(
            forward_result(&mut fx, small),
            ForwardResult::KernelForwards
        );
        set_hash(&mut fx, small, None);
        fx.set_interface_flags(small, IFACE_KNOWN | FORWARD_XDP);
        assert_eq!(forward_result(&mut fx, small), ForwardResult::NoNeighbour);

        // Beyond the array: the hash alone.
        assert_eq!(
            forward_result(&mut fx, BIG_INDEX),
            ForwardResult::KernelForwards
        );
        set_hash(&mut fx, BIG_INDEX, Some(FORWARD_XDP));
        assert_ne!(
            forward_result(&mut fx, BIG_INDEX),
            ForwardResult::KernelForwards
        );
        Ok(())
    })
    .expect("running in the namespace");
}
