//! Keeps the XDP route cache a faithful copy of the kernel's FIB (see
//! `nat_common::route_cache`): a thread listens to the kernel's routing notifications and bumps
//! the cache's generation on every one, which makes every cached answer stale at once.
//!
//! No notification is parsed: links, addresses, routes, nexthop objects, policy rules,
//! neighbours and forwarding settings are all inputs of a FIB answer, and telling which change could affect
//! which answer is not worth the risk of getting it wrong. Re-asking costs one FIB lookup per
//! route per CPU.
//!
//! The order of things is what makes it safe:
//! - the socket subscribes *before* the cache is turned on, so no change can fall between the
//!   cache's first entries and the first notification heard;
//! - a lost notification (the socket's buffer overran: `ENOBUFS`) bumps like any other;
//! - if listening fails for good, the cache is turned off (every packet asks the FIB);
//! - when the agent stops, the cache is turned off before the pinned program (if any) goes on
//!   without it; a crashed agent leaves each entry at most `ENTRY_USES` packets of staleness.

use std::{
    io,
    sync::{Arc, Mutex},
    thread,
};

use anyhow::{Context, Result};
use aya::maps::{Array, MapData};
use nat_common::{
    maps::ROUTE_CACHE_GEN,
    route_cache::{next_generation, GENERATION_OFF},
};
use rtnetlink::{
    constants::{
        RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV4_RULE, RTMGRP_LINK, RTMGRP_NEIGH,
    },
    sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr},
};
use tracing::{debug, warn};

use crate::{
    dataplane::Dataplane,
    model::{Forwarding, Model},
};

/// `RTNLGRP_IPV4_NETCONF` (include/uapi/linux/rtnetlink.h): per-interface forwarding settings,
/// which decide whether the FIB forwards at all. Beyond the legacy group bitmask, so joined
/// with `NETLINK_ADD_MEMBERSHIP`, as is the next one.
const RTNLGRP_IPV4_NETCONF: u32 = 24;
/// `RTNLGRP_NEXTHOP`: nexthop objects (`ip nexthop`, what FRR's zebra installs routes with).
/// The kernel also re-announces the routes a replaced object serves; listening to the objects
/// themselves does not depend on that.
const RTNLGRP_NEXTHOP: u32 = 32;

/// Receive buffer asked for: room for a burst (a routing daemon installing a full table)
/// before the kernel has to drop notifications, which then costs only a bump.
const RECEIVE_BUFFER: usize = 4 << 20;

/// The generation the program reads, and whether it may still be turned on.
struct Generation {
    map: Array<MapData, u32>,
    current: u32,
    /// Set when the agent stops: no bump may turn the cache on again after that.
    stopped: bool,
}

impl Generation {
    fn write(&mut self, value: u32) -> Result<()> {
        self.map
            .set(0, value, 0)
            .with_context(|| format!("writing {ROUTE_CACHE_GEN}"))?;
        self.current = value;
        Ok(())
    }

    /// Makes every cached answer stale (and turns the cache on, if it was off).
    fn bump(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.write(next_generation(self.current))
    }

    fn turn_off(&mut self) -> Result<()> {
        self.write(GENERATION_OFF)
    }
}

/// The running follower; [`RouteWatch::stop`] turns the cache off.
pub struct RouteWatch {
    generation: Arc<Mutex<Generation>>,
}

impl RouteWatch {
    /// Starts following routing changes where the config wants the route cache and some
    /// interface forwards from XDP; `Ok(None)` where it does not.
    pub fn for_config(model: &Model, dataplane: &Dataplane) -> Result<Option<RouteWatch>> {
        let forwards_from_xdp = model
            .interfaces
            .iter()
            .any(|i| i.forwarding == Forwarding::Xdp);
        if !model.route_cache || !forwards_from_xdp {
            return Ok(None);
        }
        dataplane
            .route_generation_map()
            .and_then(RouteWatch::start)
            .map(Some)
    }

    /// Subscribes to the routing notifications of the calling thread's network namespace,
    /// turns the cache on (the program's `ROUTE_CACHE_GEN`, opened as `map`) and starts the
    /// thread that bumps it on every notification.
    pub fn start(map: MapData) -> Result<RouteWatch> {
        let map = Array::try_from(aya::maps::Map::Array(map))
            .with_context(|| format!("opening {ROUTE_CACHE_GEN}"))?;
        let socket = subscribe().context("subscribing to routing notifications")?;
        let generation = Arc::new(Mutex::new(Generation {
            map,
            current: GENERATION_OFF,
            stopped: false,
        }));
        lock(&generation)
            .bump()
            .context("turning the route cache on")?;
        let follower = Arc::clone(&generation);
        thread::Builder::new()
            .name("route-watch".into())
            .spawn(move || follow(&socket, &follower))
            .context("starting the routing-notification thread")?;
        Ok(RouteWatch { generation })
    }

    /// Turns the cache off for good: from now on every packet asks the FIB. Called when the
    /// agent stops (a pinned program goes on translating without anyone listening).
    pub fn stop(&self) -> Result<()> {
        let mut generation = lock(&self.generation);
        generation.stopped = true;
        generation.turn_off()
    }
}

impl Drop for RouteWatch {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            warn!("turning the route cache off: {e:#}");
        }
    }
}

/// The generation, even if a thread panicked holding it (its value is still a plain u32).
fn lock(generation: &Mutex<Generation>) -> std::sync::MutexGuard<'_, Generation> {
    generation
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A route netlink socket joined to every group whose changes can change a FIB answer.
fn subscribe() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind(&SocketAddr::new(
        0,
        RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_RULE,
    ))?;
    socket.add_membership(RTNLGRP_IPV4_NETCONF)?;
    socket.add_membership(RTNLGRP_NEXTHOP)?;
    if let Err(e) = socket.set_rx_buf_sz(RECEIVE_BUFFER) {
        // The default buffer still works; an overrun only costs a bump.
        debug!("enlarging the routing-notification buffer: {e}");
    }
    Ok(socket)
}

/// Bumps the generation on every datagram (and on every lost one) until the socket fails;
/// then turns the cache off, because changes would go unnoticed.
fn follow(socket: &Socket, generation: &Mutex<Generation>) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let heard = match socket.recv(&mut &mut buffer[..], 0) {
            Ok(_) => true,
            // The kernel dropped notifications: something changed, unknown what.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
            Err(e) => {
                warn!("routing notifications failed ({e}); the route cache is off from now on");
                let mut generation = lock(generation);
                generation.stopped = true;
                if let Err(e) = generation.turn_off() {
                    warn!("turning the route cache off: {e:#}");
                }
                return;
            }
        };
        if heard {
            let mut generation = lock(generation);
            if generation.stopped {
                return;
            }
            if let Err(e) = generation.bump() {
                warn!("bumping the route cache generation: {e:#}");
            }
        }
    }
}
