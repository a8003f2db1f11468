//! Announcing the DNAT VIP prefixes through the host's routing daemon.
//!
//! With `[announce] vip_routes = true`, the agent keeps one kernel route per DNAT destination
//! prefix in the main table of its network namespace: a blackhole route with protocol
//! [`ROUTE_PROTOCOL`] (`xdpnat`). The XDP program translates VIP traffic before the kernel
//! routes it, so the route is never used for forwarding; it exists to be redistributed. A
//! routing daemon beside the agent (FRR: `redistribute kernel` with a prefix list, see
//! `deploy/bgp/`) announces each prefix with this host as next hop, and withdraws it when the
//! route goes.
//!
//! The routes follow translation: installed once the program is attached with the rules,
//! changed with every rule change, removed when the agent detaches the program (a stop
//! without `[agent] state_dir`, or `nat-agent state detach|clear`). With pinned state a
//! stopped or killed agent leaves the program translating, and the routes stay announced.

use std::{collections::BTreeSet, net::Ipv4Addr};

use anyhow::{Context, Result};
use futures_util::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::{
    packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType},
    Handle, RouteMessageBuilder,
};
use tracing::{info, warn};

use crate::model::Model;

/// The routing protocol number of the VIP routes (`ip route ... proto 250`); the package names
/// it `xdpnat` in `/etc/iproute2/rt_protos.d/`. Routes of this protocol belong to the agent:
/// it removes any it does not want.
pub const ROUTE_PROTOCOL: u8 = 250;

/// The prefixes to announce for `model`: every DNAT rule's destination.
pub fn vip_prefixes(model: &Model) -> BTreeSet<Ipv4Net> {
    if !model.announce_vips {
        return BTreeSet::new();
    }
    model.dnat.iter().map(|r| r.destination.trunc()).collect()
}

/// A netlink connection for the VIP routes.
pub struct VipRoutes {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl VipRoutes {
    /// Opens a route netlink socket in the current network namespace.
    pub fn connect() -> Result<Self> {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("opening a route netlink socket")?;
        let task = tokio::spawn(connection);
        Ok(VipRoutes { handle, task })
    }

    fn message(prefix: Ipv4Net) -> RouteMessage {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(prefix.network(), prefix.prefix_len())
            .kind(RouteType::BlackHole)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .build()
    }

    /// The VIP routes present now (main table, our protocol).
    pub async fn installed(&self) -> Result<BTreeSet<Ipv4Net>> {
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let mut out = BTreeSet::new();
        while let Some(route) = routes.try_next().await.context("listing routes")? {
            if route.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
                continue;
            }
            let destination = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(addr)) => Some(*addr),
                _ => None,
            });
            let addr = destination.unwrap_or(Ipv4Addr::UNSPECIFIED);
            if let Ok(net) = Ipv4Net::new(addr, route.header.destination_prefix_length) {
                out.insert(net);
            }
        }
        Ok(out)
    }

    /// Makes the VIP routes exactly `want`: adds the missing, removes the rest.
    pub async fn reconcile(&self, want: &BTreeSet<Ipv4Net>) -> Result<()> {
        let have = self.installed().await?;
        for prefix in want.difference(&have) {
            self.handle
                .route()
                .add(Self::message(*prefix))
                .replace()
                .execute()
                .await
                .with_context(|| format!("adding the VIP route {prefix}"))?;
            info!(%prefix, "VIP route installed (announced by the routing daemon)");
        }
        for prefix in have.difference(want) {
            self.handle
                .route()
                .del(Self::message(*prefix))
                .execute()
                .await
                .with_context(|| format!("removing the VIP route {prefix}"))?;
            info!(%prefix, "VIP route removed (withdrawn by the routing daemon)");
        }
        Ok(())
    }

    /// Removes every VIP route.
    pub async fn withdraw_all(&self) -> Result<()> {
        self.reconcile(&BTreeSet::new()).await
    }
}

impl Drop for VipRoutes {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Keeps the VIP routes equal to what `wanted` says until it closes, then withdraws them if
/// `withdraw_at_end` (the program is being detached). Errors are logged and retried with the
/// next change, never fatal: translation does not depend on announcements.
pub async fn follow(
    routes: VipRoutes,
    mut wanted: tokio::sync::watch::Receiver<BTreeSet<Ipv4Net>>,
    withdraw_at_end: bool,
) {
    loop {
        let want = wanted.borrow_and_update().clone();
        if let Err(e) = routes.reconcile(&want).await {
            warn!("updating the VIP routes: {e:#}");
        }
        if wanted.changed().await.is_err() {
            break;
        }
    }
    if withdraw_at_end {
        if let Err(e) = routes.withdraw_all().await {
            warn!("withdrawing the VIP routes: {e:#}");
        }
    }
}

/// Withdraws every VIP route of this network namespace (for `nat-agent state detach|clear`).
pub async fn withdraw_all() -> Result<usize> {
    let routes = VipRoutes::connect()?;
    let n = routes.installed().await?.len();
    routes.withdraw_all().await?;
    Ok(n)
}
