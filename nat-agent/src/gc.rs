//! Session expiry: the agent is the only one that deletes from the connection-tracking tables.
//!
//! A *pass* walks the four tables once, in order:
//! 1. `SESSIONS`: delete sessions idle longer than their timeout (protocol and TCP state),
//!    each with its `REPLIES` entry, and remember which inside endpoints the remaining SNAT
//!    sessions use;
//! 2. `REPLIES`: delete reply entries whose session is gone (left by a kernel insert that
//!    failed half-way), after they have looked orphaned for [`ORPHAN_GRACE`];
//! 3. `MAPPINGS`: delete endpoint mappings no remaining session uses and that no session
//!    started using since the pass began, each with its port claim in `BINDINGS`;
//! 4. `BINDINGS`: count ports in use per external address and protocol, and delete claims
//!    whose mapping is gone (after the same grace); at the end, repair the free-port indexes
//!    from what the walk saw (`dataplane::ports`).
//!
//! A *run* visits at most [`GcConfig::max_visits`] entries and resumes from a cursor, so each
//! run's cost is bounded whatever the table size; a pass may take several runs. The kernel
//! inserts concurrently: sessions it creates behind the cursor are seen by the next pass, and
//! the mapping rule above (`last_used_ns` older than the pass start) keeps mappings such
//! sessions picked up. Entries about to be deleted are read again first, so a packet that
//! refreshed a session a moment ago keeps it (the remaining window is the microseconds between
//! that read and the delete).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::Result;
use nat_common::{
    conntrack::{Endpoint, FlowKey, Session, TcpState, SESSION_SNAT},
    ipv4::proto,
    ports::{PortBitmap, PortSpace},
};
use tracing::{debug, info, warn};

use crate::{
    dataplane::{
        ports::{note_claim, Claimed, Repair},
        SessionStore, Walk,
    },
    model::{PortRange, SnatAction, SnatRule, Timeouts},
};

/// Most entries one run visits (each table entry read and each point lookup counts as one).
pub const MAX_VISITS_PER_RUN: usize = 65_536;
/// How long an entry must look orphaned before it is deleted: far longer than the kernel needs
/// to finish inserting a session or a mapping whose first half it already wrote.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(2);
/// Most suspected orphans remembered per table (bounded memory; more wait for later passes).
pub const MAX_SUSPECTS: usize = 65_536;
/// Use above this percentage of a capacity is pressure.
pub const PRESSURE_PERCENT: u64 = 90;

/// The idle timeout of a session of protocol `proto` in TCP state `tcp_state`.
pub fn timeout_for(proto: u8, tcp_state: u8, t: &Timeouts) -> Duration {
    match proto {
        proto::TCP => match TcpState::from_u8(tcp_state) {
            TcpState::Established => t.tcp_established,
            TcpState::Closed => t.tcp_closed,
            _ => t.tcp_transitory,
        },
        proto::UDP => t.udp,
        proto::ICMP => t.icmp,
        // Only TCP, UDP and ICMP get sessions today; anything else is treated like UDP.
        _ => t.udp,
    }
}

/// Whether `session` has been idle for longer than its timeout at `now_ns` (CLOCK_BOOTTIME,
/// the clock of `bpf_ktime_get_boot_ns`). A `last_seen_ns` after `now_ns` (a packet since the
/// clock was read) is not idle at all.
pub fn is_expired(key: &FlowKey, session: &Session, now_ns: u64, t: &Timeouts) -> bool {
    let idle = now_ns.saturating_sub(session.last_seen_ns);
    let timeout = timeout_for(key.proto, session.tcp_state, t);
    u128::from(idle) > timeout.as_nanos()
}

/// The inside endpoint an SNAT session uses (the `MAPPINGS` key): the original direction's
/// source address and port (echo id for ICMP). `None` for sessions without source NAT.
pub fn inside_endpoint(key: &FlowKey, session: &Session) -> Option<Endpoint> {
    (session.flags & SESSION_SNAT != 0).then_some(key.source())
}

/// Counts by protocol (the `protocol` label of the expiry metric).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProtoCounts {
    /// TCP.
    pub tcp: u64,
    /// UDP.
    pub udp: u64,
    /// ICMP.
    pub icmp: u64,
    /// Anything else.
    pub other: u64,
}

impl ProtoCounts {
    fn add(&mut self, proto: u8, n: u64) {
        match proto {
            proto::TCP => self.tcp += n,
            proto::UDP => self.udp += n,
            proto::ICMP => self.icmp += n,
            _ => self.other += n,
        }
    }

    fn add_all(&mut self, other: &ProtoCounts) {
        self.tcp += other.tcp;
        self.udp += other.udp;
        self.icmp += other.icmp;
        self.other += other.other;
    }

    /// The sum.
    pub fn total(&self) -> u64 {
        self.tcp + self.udp + self.icmp + self.other
    }

    /// (label, count) pairs.
    pub fn labelled(&self) -> [(&'static str, u64); 4] {
        [
            ("tcp", self.tcp),
            ("udp", self.udp),
            ("icmp", self.icmp),
            ("other", self.other),
        ]
    }
}

/// The metrics label of an IP protocol number.
pub fn protocol_name(p: u8) -> &'static str {
    match p {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        proto::ICMP => "icmp",
        _ => "other",
    }
}

/// Ports in use against capacity for one external address and protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortUse {
    /// External address.
    pub address: Ipv4Addr,
    /// IP protocol.
    pub protocol: u8,
    /// Port claims in `BINDINGS`.
    pub in_use: u64,
    /// Ports the rules can hand out on this address for this protocol.
    pub capacity: u64,
}

/// The port capacity of external addresses, from the SNAT rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortCapacity {
    pools: Vec<PoolPorts>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PoolPorts {
    protocols: Vec<u8>,
    /// `None`: MASQUERADE (whatever address the egress interface has).
    addresses: Option<Vec<Ipv4Addr>>,
    ports: PortRange,
}

const TRANSLATED_PROTOCOLS: [u8; 3] = [proto::TCP, proto::UDP, proto::ICMP];

impl PortCapacity {
    /// Capacity per address from the translating rules.
    pub fn from_rules(rules: &[SnatRule]) -> Self {
        let pools = rules
            .iter()
            .filter_map(|r| {
                let protocols = match r.protocol {
                    Some(p) => vec![p],
                    None => TRANSLATED_PROTOCOLS.to_vec(),
                };
                match &r.action {
                    SnatAction::ToAddresses { addresses, ports } => Some(PoolPorts {
                        protocols,
                        addresses: Some(addresses.clone()),
                        ports: *ports,
                    }),
                    SnatAction::Masquerade { ports } => Some(PoolPorts {
                        protocols,
                        addresses: None,
                        ports: *ports,
                    }),
                    SnatAction::NoNat => None,
                }
            })
            .collect();
        PortCapacity { pools }
    }

    /// Ports the rules can use on `address` for `protocol`: the union of the ranges of the
    /// pools holding the address, or, for an address no pool holds (an interface address
    /// MASQUERADE picked), of the MASQUERADE rules' ranges.
    pub fn capacity(&self, address: Ipv4Addr, protocol: u8) -> u64 {
        let for_proto = || {
            self.pools
                .iter()
                .filter(|p| p.protocols.contains(&protocol))
        };
        let mut ranges: Vec<PortRange> = for_proto()
            .filter(|p| p.addresses.as_ref().is_some_and(|a| a.contains(&address)))
            .map(|p| p.ports)
            .collect();
        if ranges.is_empty() {
            ranges = for_proto()
                .filter(|p| p.addresses.is_none())
                .map(|p| p.ports)
                .collect();
        }
        union_len(ranges)
    }

    /// Use and capacity of every pool address and protocol, and of every other address seen
    /// in use, sorted.
    pub fn usage(&self, in_use: &BTreeMap<(Ipv4Addr, u8), u64>) -> Vec<PortUse> {
        let mut keys: Vec<(Ipv4Addr, u8)> = in_use.keys().copied().collect();
        for pool in &self.pools {
            for addr in pool.addresses.iter().flatten() {
                keys.extend(pool.protocols.iter().map(|p| (*addr, *p)));
            }
        }
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .map(|(address, protocol)| PortUse {
                address,
                protocol,
                in_use: in_use.get(&(address, protocol)).copied().unwrap_or(0),
                capacity: self.capacity(address, protocol),
            })
            .collect()
    }
}

/// Number of distinct ports in the union of `ranges`.
fn union_len(mut ranges: Vec<PortRange>) -> u64 {
    ranges.sort_by_key(|r| r.min);
    let mut total = 0u64;
    let mut covered_to: Option<u16> = None;
    for r in ranges {
        let start = match covered_to {
            Some(end) if r.max <= end => continue,
            Some(end) if r.min <= end => end + 1,
            _ => r.min,
        };
        total += u64::from(r.max - start) + 1;
        covered_to = Some(r.max);
    }
    total
}

/// What pushes the sweep to run early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pressure {
    /// The session table is nearly full.
    Sessions {
        /// Sessions in use.
        in_use: u64,
        /// `max_sessions`.
        capacity: u64,
    },
    /// An external address is running out of ports.
    Ports(PortUse),
}

impl fmt::Display for Pressure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pressure::Sessions { in_use, capacity } => {
                write!(f, "session table {in_use} of {capacity} in use")
            }
            Pressure::Ports(p) => write!(
                f,
                "{} {} ports {} of {} in use",
                p.address,
                protocol_name(p.protocol),
                p.in_use,
                p.capacity
            ),
        }
    }
}

fn over_threshold(in_use: u64, capacity: u64) -> bool {
    capacity > 0 && in_use.saturating_mul(100) > capacity.saturating_mul(PRESSURE_PERCENT)
}

/// The sweep's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcConfig {
    /// Idle timeouts.
    pub timeouts: Timeouts,
    /// Session table capacity (for pressure).
    pub max_sessions: u32,
    /// Most entries visited per run.
    pub max_visits: usize,
    /// Port capacity per external address (for the metrics and for pressure).
    pub ports: PortCapacity,
}

/// What the sweep has done so far, for metrics and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcStatus {
    /// Runs so far.
    pub runs: u64,
    /// Complete passes so far.
    pub passes: u64,
    /// Wall-clock time of the last run.
    pub last_duration: Duration,
    /// Sessions expired, by protocol, since start.
    pub expiries: ProtoCounts,
    /// Endpoint mappings deleted since start.
    pub mappings_expired: u64,
    /// Orphaned reply entries and port claims deleted since start.
    pub orphans_removed: u64,
    /// Sessions found in use by the last complete pass.
    pub sessions_in_use: u64,
    /// Ports in use per external address by the last complete pass.
    pub ports: Vec<PortUse>,
    /// The pressure found by the last run, if any.
    pub pressure: Option<Pressure>,
    /// Free-port index bits the sweep's repairs set and cleared since start.
    pub index_repairs: Repair,
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Entries visited.
    pub visited: usize,
    /// Sessions expired, by protocol.
    pub expired: ProtoCounts,
    /// Whether this run finished a pass (the next run starts a new one).
    pub pass_completed: bool,
    /// Pressure after this run.
    pub pressure: Option<Pressure>,
    /// Whether the pressure began with this run (the caller sweeps again at once).
    pub pressure_began: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Sessions,
    Replies,
    Mappings,
    Bindings,
}

/// The state of the pass in progress.
#[derive(Debug)]
struct Pass {
    id: u64,
    /// CLOCK_BOOTTIME when the pass (its sessions walk) began.
    started_ns: u64,
    phase: Phase,
    flow_cursor: Option<FlowKey>,
    endpoint_cursor: Option<Endpoint>,
    /// Inside endpoints of the SNAT sessions kept so far, packed (see [`pack`]).
    in_use: HashSet<u64>,
    sessions_kept: u64,
    ports: BTreeMap<(Ipv4Addr, u8), u64>,
    /// The free-port indexes as they were when the bindings walk began.
    index_before: Option<BTreeMap<PortSpace, Box<PortBitmap>>>,
    /// The claims the bindings walk saw, per space.
    claimed: Claimed,
}

impl Pass {
    fn new(id: u64, now_ns: u64) -> Self {
        Pass {
            id,
            started_ns: now_ns,
            phase: Phase::Sessions,
            flow_cursor: None,
            endpoint_cursor: None,
            in_use: HashSet::new(),
            sessions_kept: 0,
            ports: BTreeMap::new(),
            index_before: None,
            claimed: Claimed::new(),
        }
    }
}

/// An endpoint as one integer: smaller sets for tables of millions.
fn pack(e: &Endpoint) -> u64 {
    (u64::from(u32::from_be_bytes(e.addr)) << 24)
        | (u64::from(u16::from_be_bytes(e.port)) << 8)
        | u64::from(e.proto)
}

/// Entries that looked orphaned: when first seen, and in which pass last.
#[derive(Debug, Default)]
struct Suspects<K> {
    seen: HashMap<K, (u64, u64)>,
}

impl<K: std::hash::Hash + Eq + Copy> Suspects<K> {
    /// Records `key` as orphaned now; returns whether it has been for at least the grace.
    fn observe(&mut self, key: K, now_ns: u64, pass: u64) -> bool {
        if let Some((first, last_pass)) = self.seen.get_mut(&key) {
            *last_pass = pass;
            return u128::from(now_ns.saturating_sub(*first)) >= ORPHAN_GRACE.as_nanos();
        }
        if self.seen.len() < MAX_SUSPECTS {
            self.seen.insert(key, (now_ns, pass));
        }
        false
    }

    fn clear(&mut self, key: &K) {
        self.seen.remove(key);
    }

    /// Forgets suspects not seen orphaned in pass `pass` (they were fine after all, or gone).
    fn retain_pass(&mut self, pass: u64) {
        self.seen.retain(|_, (_, last)| *last == pass);
    }
}

/// Per-run bookkeeping.
struct Budget {
    left: usize,
    visited: usize,
}

impl Budget {
    fn spend(&mut self, n: usize) {
        self.left = self.left.saturating_sub(n);
        self.visited += n;
    }

    /// How many entries a page may hold when each can cost up to `cost` visits (the entry,
    /// then re-reads and lookups), so a run stays within its budget.
    fn page(&self, cost: usize) -> usize {
        (self.left / cost).max(1)
    }
}

/// The expiry sweep, resumable across runs.
#[derive(Debug)]
pub struct Gc {
    config: GcConfig,
    pass: Option<Pass>,
    next_pass_id: u64,
    status: GcStatus,
    reply_suspects: Suspects<FlowKey>,
    binding_suspects: Suspects<Endpoint>,
}

impl Gc {
    /// A sweep with `config`; nothing runs until [`Gc::run`].
    pub fn new(config: GcConfig) -> Self {
        Gc {
            config,
            pass: None,
            next_pass_id: 1,
            status: GcStatus::default(),
            reply_suspects: Suspects::default(),
            binding_suspects: Suspects::default(),
        }
    }

    /// What the sweep has done so far.
    pub fn status(&self) -> &GcStatus {
        &self.status
    }

    /// The settings.
    pub fn config(&self) -> &GcConfig {
        &self.config
    }

    /// Takes the port capacity of a changed rule set (for the metrics and for pressure).
    pub fn set_ports(&mut self, ports: PortCapacity) {
        self.config.ports = ports;
    }

    /// One bounded run at `now_ns` (CLOCK_BOOTTIME): continues the pass in progress (or starts
    /// one) until the pass ends or the visit budget is spent.
    pub fn run(&mut self, store: &mut dyn SessionStore, now_ns: u64) -> Result<RunReport> {
        let started = Instant::now();
        let mut budget = Budget {
            left: self.config.max_visits.max(1),
            visited: 0,
        };
        let mut report = RunReport::default();
        let result = self.run_phases(store, now_ns, &mut budget, &mut report);
        // Whatever happened, account for what was done (deletions are not undone by an error).
        self.status.runs += 1;
        self.status.last_duration = started.elapsed();
        self.status.expiries.add_all(&report.expired);
        report.visited = budget.visited;
        result?;
        let pressure = self.pressure();
        report.pressure_began = pressure.is_some() && self.status.pressure.is_none();
        match (&pressure, &self.status.pressure) {
            (Some(p), None) => {
                warn!(pressure = %p, "connection tracking under pressure: sweeping early")
            }
            (None, Some(_)) => info!("connection tracking pressure is over"),
            _ => {}
        }
        self.status.pressure = pressure.clone();
        report.pressure = pressure;
        Ok(report)
    }

    fn run_phases(
        &mut self,
        store: &mut dyn SessionStore,
        now_ns: u64,
        budget: &mut Budget,
        report: &mut RunReport,
    ) -> Result<()> {
        let mut pass = match self.pass.take() {
            Some(p) => p,
            None => self.new_pass(now_ns),
        };
        let result = loop {
            if budget.left == 0 {
                break Ok(());
            }
            let step = match pass.phase {
                Phase::Sessions => self.sessions_step(store, &mut pass, now_ns, budget, report),
                Phase::Replies => self.replies_step(store, &mut pass, now_ns, budget),
                Phase::Mappings => self.mappings_step(store, &mut pass, budget),
                Phase::Bindings => self.bindings_step(store, &mut pass, now_ns, budget),
            };
            match step {
                Err(e) => break Err(e),
                Ok(Step::Continue) => {}
                Ok(Step::RestartPass) => pass = self.new_pass(now_ns),
                Ok(Step::PassDone) => {
                    self.finish_pass(pass);
                    report.pass_completed = true;
                    return Ok(());
                }
            }
        };
        // Out of budget or failed: keep the pass for the next run. After an error its cursor
        // may be stale; the next walk then reports it lost and starts over, which is safe.
        self.pass = Some(pass);
        result
    }

    fn new_pass(&mut self, now_ns: u64) -> Pass {
        let id = self.next_pass_id;
        self.next_pass_id += 1;
        Pass::new(id, now_ns)
    }

    fn sessions_step(
        &mut self,
        store: &mut dyn SessionStore,
        pass: &mut Pass,
        now_ns: u64,
        budget: &mut Budget,
        report: &mut RunReport,
    ) -> Result<Step> {
        // Entry, plus a re-read when it looks expired.
        let walk = store
            .sessions()
            .walk(pass.flow_cursor.as_ref(), budget.page(2))?;
        let Walk::Page { entries, next } = walk else {
            budget.spend(1);
            return Ok(Step::RestartPass);
        };
        budget.spend(entries.len().max(1));
        let timeouts = self.config.timeouts;
        for (key, seen) in entries {
            let mut kept = Some(seen);
            if is_expired(&key, &seen, now_ns, &timeouts) {
                // Read again: a packet may have refreshed it since the page was read.
                budget.spend(1);
                kept = store.sessions().get(&key)?;
                if let Some(fresh) = kept {
                    if is_expired(&key, &fresh, now_ns, &timeouts) {
                        if store.delete_session(&key, &fresh)? {
                            report.expired.add(key.proto, 1);
                        }
                        kept = None;
                    }
                }
            }
            if let Some(session) = kept {
                pass.sessions_kept += 1;
                if let Some(inside) = inside_endpoint(&key, &session) {
                    pass.in_use.insert(pack(&inside));
                }
            }
        }
        pass.flow_cursor = next;
        if next.is_none() {
            pass.phase = Phase::Replies;
        }
        Ok(Step::Continue)
    }

    fn replies_step(
        &mut self,
        store: &mut dyn SessionStore,
        pass: &mut Pass,
        now_ns: u64,
        budget: &mut Budget,
    ) -> Result<Step> {
        // Entry, its session's lookup, and two more reads for a confirmed orphan.
        let limit = budget.page(4);
        let Walk::Page { entries, next } =
            store.replies().walk(pass.flow_cursor.as_ref(), limit)?
        else {
            budget.spend(1);
            pass.flow_cursor = None;
            return Ok(Step::Continue);
        };
        budget.spend(entries.len().max(1));
        for (reply_key, original) in entries {
            budget.spend(1);
            if reply_is_owned(store, &reply_key, &original)? {
                self.reply_suspects.clear(&reply_key);
                continue;
            }
            if self.reply_suspects.observe(reply_key, now_ns, pass.id) {
                // Still the same orphan? (The kernel may have completed the session since.)
                budget.spend(2);
                if store.replies().get(&reply_key)? == Some(original)
                    && !reply_is_owned(store, &reply_key, &original)?
                {
                    store.replies().remove(&reply_key)?;
                    self.status.orphans_removed += 1;
                }
                self.reply_suspects.clear(&reply_key);
            }
        }
        pass.flow_cursor = next;
        if next.is_none() {
            pass.phase = Phase::Mappings;
        }
        Ok(Step::Continue)
    }

    fn mappings_step(
        &mut self,
        store: &mut dyn SessionStore,
        pass: &mut Pass,
        budget: &mut Budget,
    ) -> Result<Step> {
        // Entry, plus a re-read when it looks unused.
        let Walk::Page { entries, next } = store
            .mappings()
            .walk(pass.endpoint_cursor.as_ref(), budget.page(2))?
        else {
            budget.spend(1);
            pass.endpoint_cursor = None;
            return Ok(Step::Continue);
        };
        budget.spend(entries.len().max(1));
        for (inside, mapping) in entries {
            if pass.in_use.contains(&pack(&inside)) || mapping.last_used_ns >= pass.started_ns {
                continue;
            }
            // Read again: a session may have started using it since the page was read.
            budget.spend(1);
            if let Some(fresh) = store.mappings().get(&inside)? {
                if fresh.last_used_ns < pass.started_ns && store.delete_mapping(&inside, &fresh)? {
                    self.status.mappings_expired += 1;
                }
            }
        }
        pass.endpoint_cursor = next;
        if next.is_none() {
            pass.phase = Phase::Bindings;
            // Only the mappings phase needs it; it can be millions of entries.
            pass.in_use = HashSet::new();
        }
        Ok(Step::Continue)
    }

    fn bindings_step(
        &mut self,
        store: &mut dyn SessionStore,
        pass: &mut Pass,
        now_ns: u64,
        budget: &mut Budget,
    ) -> Result<Step> {
        // Entry, its mapping's lookup, and two more reads for a confirmed orphan.
        let limit = budget.page(4);
        if pass.index_before.is_none() {
            pass.index_before = Some(store.port_snapshot());
        }
        let Walk::Page { entries, next } = store
            .bindings()
            .walk(pass.endpoint_cursor.as_ref(), limit)?
        else {
            budget.spend(1);
            pass.endpoint_cursor = None;
            pass.ports.clear();
            pass.claimed.clear();
            pass.index_before = Some(store.port_snapshot());
            return Ok(Step::Continue);
        };
        budget.spend(entries.len().max(1));
        for (external, inside) in entries {
            budget.spend(1);
            let mut counted = true;
            if binding_is_owned(store, &external, &inside)? {
                self.binding_suspects.clear(&external);
            } else if self.binding_suspects.observe(external, now_ns, pass.id) {
                budget.spend(2);
                if store.bindings().get(&external)? == Some(inside)
                    && !binding_is_owned(store, &external, &inside)?
                {
                    store.bindings().remove(&external)?;
                    store.port_released(&external);
                    self.status.orphans_removed += 1;
                    counted = false;
                }
                self.binding_suspects.clear(&external);
            }
            if counted {
                *pass
                    .ports
                    .entry((Ipv4Addr::from(external.addr), external.proto))
                    .or_default() += 1;
                note_claim(&mut pass.claimed, &external);
            }
        }
        pass.endpoint_cursor = next;
        if next.is_some() {
            return Ok(Step::Continue);
        }
        if let Some(before) = pass.index_before.take() {
            let repair = store.repair_ports(&before, &pass.claimed)?;
            if repair != Repair::default() {
                debug!(
                    set = repair.set,
                    cleared = repair.cleared,
                    "free-port indexes repaired"
                );
            }
            self.status.index_repairs.set += repair.set;
            self.status.index_repairs.cleared += repair.cleared;
        }
        Ok(Step::PassDone)
    }

    fn finish_pass(&mut self, pass: Pass) {
        self.status.passes += 1;
        self.status.sessions_in_use = pass.sessions_kept;
        self.status.ports = self.config.ports.usage(&pass.ports);
        self.reply_suspects.retain_pass(pass.id);
        self.binding_suspects.retain_pass(pass.id);
    }

    /// The worst pressure now: the session table (the larger of the last complete pass's count
    /// and the running count), or the fullest external address.
    fn pressure(&self) -> Option<Pressure> {
        let running = self.pass.as_ref().map_or(0, |p| p.sessions_kept);
        let in_use = self.status.sessions_in_use.max(running);
        let capacity = u64::from(self.config.max_sessions);
        if over_threshold(in_use, capacity) {
            return Some(Pressure::Sessions { in_use, capacity });
        }
        self.status
            .ports
            .iter()
            .filter(|p| over_threshold(p.in_use, p.capacity))
            .max_by(|a, b| {
                // Compare in_use/capacity without floating point.
                (u128::from(a.in_use) * u128::from(b.capacity))
                    .cmp(&(u128::from(b.in_use) * u128::from(a.capacity)))
            })
            .cloned()
            .map(Pressure::Ports)
    }
}

/// How a phase step ended.
enum Step {
    Continue,
    RestartPass,
    PassDone,
}

/// Whether the session `original` exists and `reply_key` is its reply tuple.
fn reply_is_owned(
    store: &mut dyn SessionStore,
    reply_key: &FlowKey,
    original: &FlowKey,
) -> Result<bool> {
    Ok(store
        .sessions()
        .get(original)?
        .is_some_and(|s| s.translated.reversed() == *reply_key))
}

/// Whether `inside` has a mapping and it is to `external`.
fn binding_is_owned(
    store: &mut dyn SessionStore,
    external: &Endpoint,
    inside: &Endpoint,
) -> Result<bool> {
    Ok(store
        .mappings()
        .get(inside)?
        .is_some_and(|m| m.external == *external))
}

/// The next delay of the sweep: `gc_interval` after a complete pass without pressure, at once
/// when pressure begins, and a fifth of it (100 ms to 1 s) while a pass is unfinished or the
/// pressure lasts.
pub fn next_delay(report: &RunReport, gc_interval: Duration) -> Duration {
    let short = (gc_interval / 5).clamp(Duration::from_millis(100), Duration::from_secs(1));
    if report.pressure_began {
        Duration::ZERO
    } else if report.pressure.is_some() || !report.pass_completed {
        short.min(gc_interval)
    } else {
        gc_interval
    }
}

/// CLOCK_BOOTTIME in nanoseconds: the clock of `bpf_ktime_get_boot_ns`, which keeps counting
/// across suspend like the kernel's session timestamps.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        // CLOCK_BOOTTIME exists on every kernel with BPF; 0 would only make nothing expire.
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests;
