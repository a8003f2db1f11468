//! The DNAT lab: client — nat — backend, three namespaces joined by two veth pairs.
//!
//! ```text
//!  client                nat                      backend
//!  c0 198.18.0.2/24 ---- n0 198.18.0.1/24
//!                        n1 198.18.1.1/24 ------- b0 198.18.1.2/24, 198.18.1.3/24
//! ```
//! The client reaches the VIPs (198.18.100.10, .11; on no interface) through its default
//! route via nat; without a NAT program nat has no route for them, so only translated traffic
//! gets through. The nat namespace forwards, so the backend's real addresses are reachable
//! directly too (the no-NAT baseline).
//!
//! Scenario 3 of DESIGN.md (DNAT plus MASQUERADE) needs a backend that cannot answer the
//! client on its own: [`DnatLabOptions::backend_default_route`] set to `false` leaves the
//! backend with only its connected network, so replies to 198.18.0.0/24 are possible only when
//! the NAT also rewrites the source to its own address (198.18.1.1).

use std::net::Ipv4Addr;

use anyhow::{Context, Result};

use crate::{
    netns::Netns,
    tools::{require_root, require_tools, LAB_TOOLS},
};

/// How [`DnatLab::with_options`] builds the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnatLabOptions {
    /// Give the backend a default route via nat (198.18.1.1). `false` leaves it without any
    /// route to the client network (scenario 3: only source NAT makes replies possible).
    pub backend_default_route: bool,
}

impl Default for DnatLabOptions {
    /// The routed lab [`DnatLab::new`] builds: the backend has its default route.
    fn default() -> Self {
        Self {
            backend_default_route: true,
        }
    }
}

/// The three namespaces of the DNAT lab, configured as described in the module docs.
/// Dropping it removes them (and with them the veths).
#[derive(Debug)]
pub struct DnatLab {
    /// The client host: `c0`, 198.18.0.2/24, default route via nat.
    pub client: Netns,
    /// The NAT box: `n0` towards the client, `n1` towards the backend; forwards IPv4.
    pub nat: Netns,
    /// The backend host: `b0`, 198.18.1.2/24 and 198.18.1.3/24, default route via nat
    /// unless [`DnatLabOptions::backend_default_route`] was `false`.
    pub backend: Netns,
    options: DnatLabOptions,
}

impl DnatLab {
    /// The client's interface.
    pub const CLIENT_IF: &'static str = "c0";
    /// The nat namespace's interface towards the client.
    pub const NAT_CLIENT_IF: &'static str = "n0";
    /// The nat namespace's interface towards the backend.
    pub const NAT_BACKEND_IF: &'static str = "n1";
    /// The backend's interface.
    pub const BACKEND_IF: &'static str = "b0";

    /// Prefix length of both lab networks.
    pub const PREFIX_LEN: u8 = 24;
    /// The client's address.
    pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    /// The nat namespace's address on the client network (the client's gateway).
    pub const NAT_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    /// The nat namespace's address on the backend network (the backend's gateway).
    pub const NAT_BACKEND_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
    /// The backend's primary address.
    pub const BACKEND_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
    /// The backend's secondary address (a second "host" for VIP-port-to-other-host rules).
    pub const BACKEND_ADDR2: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 3);
    /// First virtual IP the DNAT rules translate (assigned to no interface).
    pub const VIP1: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);
    /// Second virtual IP the DNAT rules translate (assigned to no interface).
    pub const VIP2: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 11);

    /// Builds the lab in three namespaces with generated unique names (for tests that run
    /// concurrently). Fails, naming the cause, if not root or a tool is missing.
    pub fn new() -> Result<Self> {
        Self::with_options(DnatLabOptions::default())
    }

    /// Like [`DnatLab::new`], built as `options` say (e.g. a backend without a route back to
    /// the client for scenario 3).
    pub fn with_options(options: DnatLabOptions) -> Result<Self> {
        Self::preflight()?;
        let client = Netns::new()?;
        let nat = Netns::new()?;
        let backend = Netns::new()?;
        Self::build(client, nat, backend, options)
    }

    /// Builds the lab in namespaces with fixed names (the demo), which must not exist yet.
    pub fn with_names(client: &str, nat: &str, backend: &str) -> Result<Self> {
        Self::preflight()?;
        let client = Netns::create_named(client)?;
        let nat = Netns::create_named(nat)?;
        let backend = Netns::create_named(backend)?;
        Self::build(client, nat, backend, DnatLabOptions::default())
    }

    /// The options the lab was built with.
    pub fn options(&self) -> DnatLabOptions {
        self.options
    }

    /// The three namespace names: client, nat, backend.
    pub fn namespaces(&self) -> [&str; 3] {
        [self.client.name(), self.nat.name(), self.backend.name()]
    }

    fn preflight() -> Result<()> {
        require_root()?;
        require_tools(LAB_TOOLS)
    }

    fn build(client: Netns, nat: Netns, backend: Netns, options: DnatLabOptions) -> Result<Self> {
        // On error the guards drop here and take the half-built lab with them.
        let lab = Self {
            client,
            nat,
            backend,
            options,
        };
        lab.configure().with_context(|| {
            let [c, n, b] = lab.namespaces();
            format!("building the DNAT lab in namespaces {c}, {n}, {b}")
        })?;
        Ok(lab)
    }

    fn configure(&self) -> Result<()> {
        let plen = Self::PREFIX_LEN;
        for ns in [&self.client, &self.nat, &self.backend] {
            // IPv4 only: router solicitations, MLD and DAD would be extra packets through the
            // NAT program and spoil exact counter checks.
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        // Veths are created from inside one namespace with the peer placed straight into the
        // other, so no name ever appears in the root namespace (concurrent labs reuse them).
        veth_pair(
            &self.client,
            Self::CLIENT_IF,
            &self.nat,
            Self::NAT_CLIENT_IF,
        )?;
        veth_pair(
            &self.backend,
            Self::BACKEND_IF,
            &self.nat,
            Self::NAT_BACKEND_IF,
        )?;

        add_addr(&self.client, Self::CLIENT_IF, Self::CLIENT_ADDR, plen)?;
        add_addr(&self.nat, Self::NAT_CLIENT_IF, Self::NAT_CLIENT_ADDR, plen)?;
        add_addr(
            &self.nat,
            Self::NAT_BACKEND_IF,
            Self::NAT_BACKEND_ADDR,
            plen,
        )?;
        add_addr(&self.backend, Self::BACKEND_IF, Self::BACKEND_ADDR, plen)?;
        add_addr(&self.backend, Self::BACKEND_IF, Self::BACKEND_ADDR2, plen)?;

        let nat = &self.nat;
        nat.sysctl("net.ipv4.ip_forward", "1")?;
        // Translated packets arrive with addresses the reverse path check would reject.
        for iface in ["all", "default", Self::NAT_CLIENT_IF, Self::NAT_BACKEND_IF] {
            nat.sysctl(&format!("net.ipv4.conf.{iface}.rp_filter"), "0")?;
        }
        // accept_local is deliberately left at its default: source NAT at XDP ingress needs
        // it, and the agent must set it itself (the end-to-end tests catch it if it doesn't).

        // Sending sides carry full checksums, as frames off a real wire do: with TX offload a
        // wrong rewritten checksum would go unnoticed (TOOLCHAIN.md "Gotchas"). GRO gives the
        // receiving veth NAPI, without which frames the XDP program redirects into it vanish.
        for (ns, dev) in [
            (&self.client, Self::CLIENT_IF),
            (&self.backend, Self::BACKEND_IF),
        ] {
            ns.run("ethtool", ["-K", dev, "tx", "off", "gro", "on"])?;
        }

        for (ns, dev) in [
            (&self.client, Self::CLIENT_IF),
            (&self.nat, Self::NAT_CLIENT_IF),
            (&self.nat, Self::NAT_BACKEND_IF),
            (&self.backend, Self::BACKEND_IF),
        ] {
            ns.run("ip", ["link", "set", dev, "up"])?;
        }

        let via_client = Self::NAT_CLIENT_ADDR.to_string();
        self.client
            .run("ip", ["route", "add", "default", "via", &via_client])?;
        if self.options.backend_default_route {
            let via_backend = Self::NAT_BACKEND_ADDR.to_string();
            self.backend
                .run("ip", ["route", "add", "default", "via", &via_backend])?;
        }
        Ok(())
    }
}

/// Creates a veth pair from inside `a` with the peer placed straight into `b`, so the names
/// never appear in the root namespace (concurrent labs reuse them).
pub fn veth_pair(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) -> Result<()> {
    a.run(
        "ip",
        [
            "link",
            "add",
            a_dev,
            "type",
            "veth",
            "peer",
            "name",
            b_dev,
            "netns",
            b.name(),
        ],
    )
    .with_context(|| {
        format!(
            "cannot create veth {}:{a_dev} <-> {}:{b_dev}",
            a.name(),
            b.name()
        )
    })?;
    Ok(())
}

/// Adds `addr/plen` to `dev` in `ns`.
pub(crate) fn add_addr(ns: &Netns, dev: &str, addr: Ipv4Addr, plen: u8) -> Result<()> {
    ns.run("ip", ["addr", "add", &format!("{addr}/{plen}"), "dev", dev])?;
    Ok(())
}
