//! The SNAT lab: private — nat — public, three namespaces joined by two veth pairs.
//!
//! ```text
//!  private                 nat                          public
//!  h0 198.18.0.2/24 ------ n0 198.18.0.1/24
//!     198.18.0.3/24        n1 203.0.113.1/24 ---------- p0 203.0.113.10/24, 203.0.113.11/24,
//!                                                          198.51.100.10/24
//! ```
//! The private hosts (two addresses, so that two inside hosts can use the same source port
//! and force the NAT to resolve the collision) have a default route via nat. The nat
//! namespace forwards (reverse-path filter off; `accept_local`, which source NAT at XDP
//! ingress needs, is left for the agent to set) and reaches 198.51.100.0/24 via 203.0.113.10, a second "internet"
//! network behind the first public host. The public namespace has, by default, no route to
//! 198.18.0.0/24 at all: a private host's packets arrive there with their private source and
//! the answers have nowhere to go, so only a NAT that rewrites the source to 203.0.113.1 makes
//! a conversation possible (scenario 1 of DESIGN.md). [`SnatLabOptions`] adds the route back
//! for tests of the lab itself (plain routing, no NAT).
//!
//! Every address is a lab address: 198.18.0.0/15 for the private side, TEST-NET-2 and
//! TEST-NET-3 for the "public" hosts, all assigned inside the lab's own namespaces.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};

use crate::{
    netns::Netns,
    tools::{require_root, require_tools, LAB_TOOLS},
    topology::{add_addr, veth_pair},
};

/// How [`SnatLab::with_options`] builds the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnatLabOptions {
    /// Give the public namespace a route to 198.18.0.0/24 via 203.0.113.1: the private hosts
    /// are then reachable by plain routing, without NAT (for testing the lab's own tools).
    pub public_route_to_private: bool,
    /// Give the public namespace a default route via 203.0.113.1 (only for tests that need
    /// the public hosts to reach addresses beyond their own networks).
    pub public_default_route: bool,
}

/// The three namespaces of the SNAT lab, configured as described in the module docs.
/// Dropping it removes them (and with them the veths).
#[derive(Debug)]
pub struct SnatLab {
    /// The private hosts: `h0`, 198.18.0.2/24 and 198.18.0.3/24, default route via nat.
    pub private: Netns,
    /// The NAT box: `n0` inside, `n1` outside with the public address 203.0.113.1; forwards.
    pub nat: Netns,
    /// The public hosts: `p0`, 203.0.113.10/24, 203.0.113.11/24 and 198.51.100.10/24.
    pub public: Netns,
    options: SnatLabOptions,
}

impl SnatLab {
    /// The private hosts' interface.
    pub const PRIVATE_IF: &'static str = "h0";
    /// The nat namespace's inside interface (towards the private hosts).
    pub const NAT_INSIDE_IF: &'static str = "n0";
    /// The nat namespace's outside interface (towards the public hosts).
    pub const NAT_OUTSIDE_IF: &'static str = "n1";
    /// The public hosts' interface.
    pub const PUBLIC_IF: &'static str = "p0";

    /// Prefix length of every lab network.
    pub const PREFIX_LEN: u8 = 24;
    /// The private network, as SNAT rules match it.
    pub const PRIVATE_NET: &'static str = "198.18.0.0/24";
    /// The first private host.
    pub const PRIVATE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    /// The second private host (same interface; shares the NAT's public address).
    pub const PRIVATE_ADDR2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
    /// The nat namespace's inside address (the private hosts' gateway).
    pub const NAT_INSIDE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    /// The nat namespace's public address on `n1`: what MASQUERADE writes as source.
    pub const NAT_PUBLIC_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
    /// The first public host (the NTP server's address in scenario 1).
    pub const PUBLIC_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
    /// A second public host on the same network.
    pub const PUBLIC_ADDR2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
    /// A public host on another network (198.51.100.0/24), routed by nat via
    /// [`SnatLab::PUBLIC_ADDR`].
    pub const PUBLIC_FAR_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
    /// The network of [`SnatLab::PUBLIC_FAR_ADDR`].
    pub const PUBLIC_FAR_NET: &'static str = "198.51.100.0/24";

    /// Builds the lab with the default options (no route back from the public side) in three
    /// namespaces with generated unique names. Fails, naming the cause, if not root or a tool
    /// is missing.
    pub fn new() -> Result<Self> {
        Self::with_options(SnatLabOptions::default())
    }

    /// Builds the lab as `options` say.
    pub fn with_options(options: SnatLabOptions) -> Result<Self> {
        require_root()?;
        require_tools(LAB_TOOLS)?;
        let private = Netns::new()?;
        let nat = Netns::new()?;
        let public = Netns::new()?;
        // On error the guards drop here and take the half-built lab with them.
        let lab = Self {
            private,
            nat,
            public,
            options,
        };
        lab.configure().with_context(|| {
            let [p, n, o] = lab.namespaces();
            format!("building the SNAT lab in namespaces {p}, {n}, {o}")
        })?;
        Ok(lab)
    }

    /// The three namespace names: private, nat, public.
    pub fn namespaces(&self) -> [&str; 3] {
        [self.private.name(), self.nat.name(), self.public.name()]
    }

    /// The options the lab was built with.
    pub fn options(&self) -> SnatLabOptions {
        self.options
    }

    fn configure(&self) -> Result<()> {
        let plen = Self::PREFIX_LEN;
        for ns in [&self.private, &self.nat, &self.public] {
            // IPv4 only: router solicitations, MLD and DAD would be extra packets through the
            // NAT program and spoil exact counter checks.
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        veth_pair(
            &self.private,
            Self::PRIVATE_IF,
            &self.nat,
            Self::NAT_INSIDE_IF,
        )?;
        veth_pair(
            &self.public,
            Self::PUBLIC_IF,
            &self.nat,
            Self::NAT_OUTSIDE_IF,
        )?;

        add_addr(&self.private, Self::PRIVATE_IF, Self::PRIVATE_ADDR, plen)?;
        add_addr(&self.private, Self::PRIVATE_IF, Self::PRIVATE_ADDR2, plen)?;
        add_addr(&self.nat, Self::NAT_INSIDE_IF, Self::NAT_INSIDE_ADDR, plen)?;
        add_addr(&self.nat, Self::NAT_OUTSIDE_IF, Self::NAT_PUBLIC_ADDR, plen)?;
        for addr in [Self::PUBLIC_ADDR, Self::PUBLIC_ADDR2, Self::PUBLIC_FAR_ADDR] {
            add_addr(&self.public, Self::PUBLIC_IF, addr, plen)?;
        }

        let nat = &self.nat;
        // The XDP program's FIB lookups report "forwarding disabled" without it.
        nat.sysctl("net.ipv4.ip_forward", "1")?;
        // Translated packets arrive with addresses the reverse path check would reject.
        for iface in ["all", "default", Self::NAT_INSIDE_IF, Self::NAT_OUTSIDE_IF] {
            nat.sysctl(&format!("net.ipv4.conf.{iface}.rp_filter"), "0")?;
        }
        // accept_local is deliberately left at its default: source NAT at XDP ingress needs
        // it, and the agent must set it itself (the end-to-end tests catch it if it doesn't).

        // Sending sides carry full checksums, as frames off a real wire do; GRO gives the
        // receiving veth NAPI, without which frames an XDP program redirects into it vanish
        // (TOOLCHAIN.md "Gotchas").
        for (ns, dev) in [
            (&self.private, Self::PRIVATE_IF),
            (&self.public, Self::PUBLIC_IF),
        ] {
            ns.run("ethtool", ["-K", dev, "tx", "off", "gro", "on"])?;
        }

        for (ns, dev) in [
            (&self.private, Self::PRIVATE_IF),
            (&self.nat, Self::NAT_INSIDE_IF),
            (&self.nat, Self::NAT_OUTSIDE_IF),
            (&self.public, Self::PUBLIC_IF),
        ] {
            ns.run("ip", ["link", "set", dev, "up"])?;
        }

        let via_inside = Self::NAT_INSIDE_ADDR.to_string();
        self.private
            .run("ip", ["route", "add", "default", "via", &via_inside])?;
        let via_public = Self::PUBLIC_ADDR.to_string();
        self.nat.run(
            "ip",
            ["route", "add", Self::PUBLIC_FAR_NET, "via", &via_public],
        )?;
        let via_nat = Self::NAT_PUBLIC_ADDR.to_string();
        if self.options.public_route_to_private {
            self.public
                .run("ip", ["route", "add", Self::PRIVATE_NET, "via", &via_nat])?;
        }
        if self.options.public_default_route {
            self.public
                .run("ip", ["route", "add", "default", "via", &via_nat])?;
        }
        Ok(())
    }
}
