//! The network namespace the packet fixtures that need a FIB run in.

use nat_lab::Netns;

/// A namespace with the appliance's two legs: veth n0 198.18.0.1/24 (inside) and n1
/// 203.0.113.1/24 (outside), with broadcast addresses as DHCP and networkd configure them, both
/// up with their peers n0p/n1p, forwarding on, no default route. Removed when dropped.
pub fn two_leg_lab() -> Netns {
    let ns = Netns::new().expect("creating a network namespace (needs root)");
    for (dev, peer, cidr) in [
        ("n0", "n0p", "198.18.0.1/24"),
        ("n1", "n1p", "203.0.113.1/24"),
    ] {
        ns.run(
            "ip",
            ["link", "add", dev, "type", "veth", "peer", "name", peer],
        )
        .expect("ip link add");
        ns.run("ip", ["addr", "add", cidr, "brd", "+", "dev", dev])
            .expect("ip addr add");
        for d in [dev, peer] {
            ns.run("ip", ["link", "set", d, "up"])
                .expect("ip link set up");
        }
    }
    ns.sysctl("net.ipv4.ip_forward", "1")
        .expect("enabling forwarding");
    ns
}
