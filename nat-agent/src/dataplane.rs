//! The kernel side as the agent sees it: the loaded object, its attachments and its maps.
//!
//! Map writes go through [`RuleTables`] and [`SnatTables`], and session access through
//! [`SessionStore`], so the reconcilers and the expiry sweep are plain logic that the tests
//! drive with in-memory tables.

mod attach;
mod bank;
mod mapped;
pub mod pinned;
pub mod ports;
pub mod session_filter;
mod sessions;
mod snat;
mod sys;
mod xdp_query;

pub use bank::BANK_GRACE;

pub use sessions::{BpfTable, KernelSessions, KvTable, MemStore, SessionStore, Walk};
pub use snat::{reconcile_snat, SnatTables};

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    net::Ipv4Addr,
    path::PathBuf,
    time::Instant,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, LpmTrie, MapData, PerCpuArray, ProgramArray},
    programs::{ProgramFd, SchedClassifier, Xdp},
    Ebpf, EbpfLoader,
};
use ipnet::Ipv4Net;
use nat_common::{
    bypass::BypassSet,
    maps::{
        BankedPrefix, EVENT_CONFIG, EVENT_DROPS, FORWARD_COUNTERS, MAX_POOLS, MAX_RULES, RULE_BANK,
        RULE_BANKS, SESSION_EVENTS,
    },
    maps::{
        BINDINGS, CLAIM_SLOT, DEFAULT_MAX_SESSIONS, DNAT_FORWARD, DNAT_REVERSE, ICMP_ERROR_SLOT,
        MAPPINGS, NEW_FLOW_SLOT, PROGRAMS, REASON_COUNTERS, REPLIES, RULES_SLOT, RULE_COUNTERS,
        SESSIONS, SESSION_FILTER, SNAT_POOLS, SNAT_RULES, TOO_BIG_SLOT, XDP_CLAIM_PROGRAM,
        XDP_ICMP_ERROR_PROGRAM, XDP_NEW_FLOW_PROGRAM, XDP_PROGRAM, XDP_RULES_PROGRAM,
        XDP_TOO_BIG_PROGRAM,
    },
    maps::{BYPASS, LOCAL_ADDRS, MAX_LOCAL_ADDRS, PATH_MTU_FLOOR},
    maps::{LOCAL_FILTER, PORT_BITMAPS, PORT_SPACES, RULE_FILTERS},
    maps::{ROUTE_CACHE_GEN, ROUTE_COUNTERS},
    maps::{
        TC_CLAIM_PROGRAM, TC_ICMP_ERROR_PROGRAM, TC_NEW_FLOW_PROGRAM, TC_PROGRAM, TC_PROGRAMS,
        TC_RULES_PROGRAM, TC_TOO_BIG_PROGRAM,
    },
    prefilter::{BankFilters, PrefixFilter},
    route_cache::RouteCacheResult,
    rules::NatRuleSet,
    stats::{ForwardResult, Reason, RuleCounters},
};
use tracing::{debug, info, warn};

use crate::compile::{Compiled, CompiledDnat, CompiledSnat};

/// The XDP object built by `build.rs` from `nat-ebpf`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nat-ebpf.o"));

/// Which of the two DNAT tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `DNAT_FORWARD`.
    Forward,
    /// `DNAT_REVERSE`.
    Reverse,
}

/// Write access to the DNAT tries.
pub trait RuleTables {
    /// The prefixes currently present.
    fn prefixes(&self, table: Table) -> Result<Vec<Ipv4Net>>;
    /// Inserts or replaces the set of one prefix.
    fn put(&mut self, table: Table, prefix: Ipv4Net, set: &NatRuleSet) -> Result<()>;
    /// Removes one prefix.
    fn remove(&mut self, table: Table, prefix: Ipv4Net) -> Result<()>;
}

/// Brings the DNAT tries to `desired`: writes every desired set (an in-place replace is atomic
/// per prefix in the kernel) and then removes prefixes no longer wanted.
pub fn reconcile(tables: &mut impl RuleTables, desired: &CompiledDnat) -> Result<()> {
    for (table, sets) in [
        (Table::Forward, &desired.forward),
        (Table::Reverse, &desired.reverse),
    ] {
        for (prefix, set) in sets {
            tables.put(table, *prefix, set)?;
        }
        for stale in tables.prefixes(table)? {
            if !sets.contains_key(&stale) {
                tables.remove(table, stale)?;
            }
        }
    }
    Ok(())
}

/// Counters read from the per-CPU maps, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Packets per exit reason, indexed by `Reason as usize`.
    pub reasons: Vec<u64>,
    /// Translated packets per forwarding result, indexed by `ForwardResult as usize`.
    pub forward: Vec<u64>,
    /// Forwarding-stage route questions per outcome, indexed by `RouteCacheResult as usize`.
    pub route_cache: Vec<u64>,
    /// Counters per rule slot that has ever counted.
    pub rules: BTreeMap<u32, RuleCounters>,
}

/// How to load the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Capacity of `SESSIONS`, `REPLIES`, `MAPPINGS` and `BINDINGS` (all four hold one entry
    /// per session at most, so they are sized alike).
    pub max_sessions: u32,
    /// A directory on a bpf filesystem to pin the maps and links in, so translation and
    /// sessions outlive the agent (see [`pinned`]); `None`: nothing survives the agent.
    pub state_dir: Option<PathBuf>,
    /// Load (and verify) the XDP programs at once, as the agent does. `false` defers them to
    /// [`Dataplane::load_xdp`], which attaching an interface with `hook = "xdp"` calls: for a
    /// dataplane that runs only the TC hook (the verifier takes seconds over each set).
    pub load_xdp: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_sessions: DEFAULT_MAX_SESSIONS,
            state_dir: None,
            load_xdp: true,
        }
    }
}

/// Whether a map error says the key was not there. aya 0.14 reports a failed delete of an
/// absent key as the syscall's ENOENT rather than `KeyNotFound`.
fn is_absent_key(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(err) => err.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// The programs of the object by type: each hook's programs are loaded as their own type,
/// and a tail call only reaches programs of its caller's type.
#[derive(Debug, Clone, Copy)]
enum ProgramKind {
    /// XDP (`xdp_*`).
    Xdp,
    /// TC, `cls_bpf` (`tc_*`).
    Tc,
}

/// The programs `xdp_nat` reaches by tail call, with their slots in `PROGRAMS`.
const XDP_TAIL_CALLS: [(&str, u32); 5] = [
    (XDP_CLAIM_PROGRAM, CLAIM_SLOT),
    (XDP_RULES_PROGRAM, RULES_SLOT),
    (XDP_NEW_FLOW_PROGRAM, NEW_FLOW_SLOT),
    (XDP_ICMP_ERROR_PROGRAM, ICMP_ERROR_SLOT),
    (XDP_TOO_BIG_PROGRAM, TOO_BIG_SLOT),
];

/// The TC twins of [`XDP_TAIL_CALLS`], at the same slots of `TC_PROGRAMS`.
const TC_TAIL_CALLS: [(&str, u32); 5] = [
    (TC_CLAIM_PROGRAM, CLAIM_SLOT),
    (TC_RULES_PROGRAM, RULES_SLOT),
    (TC_NEW_FLOW_PROGRAM, NEW_FLOW_SLOT),
    (TC_ICMP_ERROR_PROGRAM, ICMP_ERROR_SLOT),
    (TC_TOO_BIG_PROGRAM, TOO_BIG_SLOT),
];

/// Loads program `name` of `kind` into the kernel (the verifier runs here); `Ok(false)` when
/// the object has no such program.
fn load_program(ebpf: &mut Ebpf, name: &str, kind: ProgramKind) -> Result<bool> {
    let Some(program) = ebpf.program_mut(name) else {
        return Ok(false);
    };
    match kind {
        ProgramKind::Xdp => {
            let program: &mut Xdp = program
                .try_into()
                .with_context(|| format!("{name}: program type"))?;
            program
                .load()
                .with_context(|| format!("the kernel verifier rejected the XDP program {name}"))?;
        }
        ProgramKind::Tc => {
            let program: &mut SchedClassifier = program
                .try_into()
                .with_context(|| format!("{name}: program type"))?;
            program
                .load()
                .with_context(|| format!("the kernel verifier rejected the TC program {name}"))?;
        }
    }
    Ok(true)
}

/// A file descriptor of the loaded program `name` of its own (to put in a program array while
/// the object is borrowed mutably).
fn program_fd(ebpf: &Ebpf, name: &str) -> Result<ProgramFd> {
    ebpf.program(name)
        .ok_or_else(|| anyhow!("the object has no program {name}"))?
        .fd()
        .with_context(|| format!("{name}: program file descriptor"))?
        .try_clone()
        .with_context(|| format!("{name}: duplicating the program fd"))
}

/// Loads `xdp_nat`, which the object must have, and the programs it reaches by tail call,
/// which go into `PROGRAMS`. Until they are there, packets that would start a session are
/// refused (`new_flow_unavailable`) and ICMP errors dropped (`icmp_error_unavailable`), never
/// passed untranslated.
fn load_xdp_programs(ebpf: &mut Ebpf) -> Result<()> {
    if !load_program(ebpf, XDP_PROGRAM, ProgramKind::Xdp)? {
        bail!("the object has no program {XDP_PROGRAM}");
    }
    install_chain(ebpf, ProgramKind::Xdp, PROGRAMS, &XDP_TAIL_CALLS)
}

/// Loads `tc_nat` and its TC twins of the tail-called programs, which go into `TC_PROGRAMS`.
/// `Ok(false)` when the object has no `tc_nat`.
fn load_tc_programs(ebpf: &mut Ebpf) -> Result<bool> {
    if !load_program(ebpf, TC_PROGRAM, ProgramKind::Tc)? {
        return Ok(false);
    }
    install_chain(ebpf, ProgramKind::Tc, TC_PROGRAMS, &TC_TAIL_CALLS)?;
    Ok(true)
}

/// Loads each program of `chain` the object has and puts it in the program array `array` at
/// its slot. An object without connection tracking has none of them, one without the TC hook
/// none of the TC ones: those are skipped.
fn install_chain(
    ebpf: &mut Ebpf,
    kind: ProgramKind,
    array: &str,
    chain: &[(&str, u32)],
) -> Result<()> {
    for &(name, slot) in chain {
        if !load_program(ebpf, name, kind)? {
            continue;
        }
        let fd = program_fd(ebpf, name)?;
        let map = ebpf
            .map_mut(array)
            .ok_or_else(|| anyhow!("the object has {name} but no {array} map"))?;
        let mut programs: ProgramArray<&mut MapData> =
            ProgramArray::try_from(map).with_context(|| format!("opening {array}"))?;
        programs
            .set(slot, &fd, 0)
            .with_context(|| format!("installing {name} in {array}[{slot}]"))?;
    }
    Ok(())
}

/// The connection-tracking maps, in the order they are sized and taken.
const CONNTRACK_MAPS: [&str; 4] = [SESSIONS, REPLIES, MAPPINGS, BINDINGS];

/// What the SNAT tables hold now, so interface changes can be written without the config.
#[derive(Debug, Default)]
struct SnatState {
    compiled: CompiledSnat,
    /// Interface name -> index as last resolved (absent: the interface did not exist).
    ifindex: BTreeMap<String, u32>,
    /// Pools written into each bank by its last write.
    pools_written: [usize; RULE_BANKS as usize],
}

/// The loaded program and its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    attached: Vec<attach::Attachment>,
    /// Where the state that outlives the agent is pinned; `None`: nothing is pinned and the
    /// program is detached when the agent stops.
    state: Option<pinned::StateDir>,
    /// Counter slot -> rule id, pinned with the state.
    slot_table: Option<Array<MapData, u32>>,
    /// Where this program generation's tail-call tables (`PROGRAMS`, and `TC_PROGRAMS` when
    /// the object has it) are pinned; empty without pinned state.
    programs_pins: Vec<PathBuf>,
    /// Whether the XDP programs are loaded (see [`LoadOptions::load_xdp`]).
    xdp_loaded: bool,
    /// Whether the TC programs are loaded (see [`Dataplane::load_tc`]).
    tc_loaded: bool,
    /// The connection-tracking tables; `None` when the object has none (a build without
    /// connection tracking): then stateful and SNAT rules are refused.
    sessions: Option<KernelSessions>,
    max_sessions: u32,
    snat: SnatState,
    /// Which rule bank is live.
    bank: bank::BankState,
    /// The rule set in force (what the live bank holds).
    applied: Compiled,
}

impl Dataplane {
    /// Loads the embedded object with default options (no attachment yet).
    pub fn load() -> Result<Self> {
        Self::load_with(&LoadOptions::default())
    }

    /// Loads the embedded object into the kernel with `options` (no attachment yet).
    pub fn load_with(options: &LoadOptions) -> Result<Self> {
        let state = match &options.state_dir {
            Some(root) => Some(pinned::StateDir::open(
                root,
                &pinned::expected_shapes(EBPF_OBJECT, options.max_sessions)?,
            )?),
            None => None,
        };
        let mut loader = EbpfLoader::new();
        // Sizes are fixed at map creation, so they are set before the object is loaded; names
        // the object lacks are ignored by aya.
        for name in CONNTRACK_MAPS {
            loader.map_max_entries(name, options.max_sessions);
        }
        // Pinned maps are reused when their pin exists (checked by `StateDir::open`), else
        // created and pinned. Each load gets its own tail-call tables (see `pinned`); a name
        // the object lacks is ignored by aya, so no table is pinned for it.
        let mut programs_pins = Vec::new();
        if let Some(state) = &state {
            for name in pinned::PINNED_MAPS {
                loader.map_pin_path(name, state.map_path(name));
            }
            let tag = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
                .to_string();
            let path = state.programs_path(&tag);
            loader.map_pin_path(PROGRAMS, path.clone());
            programs_pins.push(path);
            let path = state.tc_programs_path(&tag);
            loader.map_pin_path(TC_PROGRAMS, path.clone());
            programs_pins.push(path);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the XDP object into the kernel")?;
        // The TC programs are loaded when an interface first asks for them
        // (`Dataplane::load_tc`): the verifier takes seconds over them, which an agent with
        // only XDP interfaces should not spend at every start.
        if options.load_xdp {
            load_xdp_programs(&mut ebpf)?;
        }
        let sessions = take_conntrack_maps(&mut ebpf)?;
        if sessions.is_none() {
            info!("the XDP object has no connection tracking maps; SNAT and stateful DNAT are unavailable");
        }
        let slot_table = state.as_ref().map(|s| s.rule_slots()).transpose()?;
        let mut dataplane = Self {
            ebpf,
            attached: Vec::new(),
            sessions,
            max_sessions: options.max_sessions,
            snat: SnatState::default(),
            bank: bank::BankState::default(),
            applied: Compiled::default(),
            state,
            slot_table,
            programs_pins,
            xdp_loaded: options.load_xdp,
            tc_loaded: false,
        };
        if dataplane.state.as_ref().is_some_and(|s| s.reused) {
            dataplane.adopt_pinned_rules()?;
        }
        Ok(dataplane)
    }

    /// Takes over the rule banks of an earlier run: the bank in force stays in force until
    /// the first apply writes the other one, and pools that run may have written anywhere
    /// are cleared by that apply.
    fn adopt_pinned_rules(&mut self) -> Result<()> {
        let map = self
            .ebpf
            .map(RULE_BANK)
            .ok_or_else(|| anyhow!("the object has no map {RULE_BANK}"))?;
        let banks: Array<&MapData, u32> = Array::try_from(map)?;
        let active = banks.get(&0, 0).context("reading the pinned rule bank")?;
        self.bank = bank::BankState {
            active: active.min(RULE_BANKS - 1),
            written: true,
            flipped_at: None,
        };
        self.snat.pools_written = [MAX_POOLS as usize; RULE_BANKS as usize];
        info!(
            bank = active,
            "reusing pinned state: sessions, counters and rules of the last run"
        );
        Ok(())
    }

    /// Turns the program's session events on and hands the agent's deletions to the event
    /// log too; returns the running log.
    pub fn start_event_log(
        &mut self,
        log: &crate::events::EventLog,
        names: tokio::sync::watch::Receiver<BTreeMap<u32, String>>,
    ) -> Result<crate::events::EventLogger> {
        let ring = self
            .ebpf
            .take_map(SESSION_EVENTS)
            .ok_or_else(|| anyhow!("the object has no map {SESSION_EVENTS}"))?;
        let ring = aya::maps::RingBuf::try_from(ring).context("opening the event ring")?;
        let logger = crate::events::EventLogger::start(log, ring, names)?;
        if let Some(sessions) = self.sessions.as_mut() {
            sessions.report_deletions(logger.deletions.clone());
        }
        let map = self
            .ebpf
            .map_mut(EVENT_CONFIG)
            .ok_or_else(|| anyhow!("the object has no map {EVENT_CONFIG}"))?;
        let mut config: Array<&mut MapData, u32> = Array::try_from(map)?;
        config
            .set(0, nat_common::events::EVENTS_ON, 0)
            .context("turning the session events on")?;
        info!(log = ?log, "NAT event log on");
        Ok(logger)
    }

    /// Session events the program dropped because the ring was full (summed over CPUs).
    pub fn kernel_event_drops(&self) -> Result<u64> {
        let Some(map) = self.ebpf.map(EVENT_DROPS) else {
            return Ok(0);
        };
        let drops: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        Ok(drops
            .get(&0, 0)
            .context("reading EVENT_DROPS")?
            .iter()
            .sum())
    }

    /// Whether maps and links are pinned (translation outlives the agent).
    pub fn is_persistent(&self) -> bool {
        self.state.is_some()
    }

    /// Rule id -> counter slot as the pinned slot table has it (empty without pinned state):
    /// the counters of an earlier run stay with their rules.
    pub fn slot_history(&self) -> Result<BTreeMap<u32, u32>> {
        let Some(table) = &self.slot_table else {
            return Ok(BTreeMap::new());
        };
        let mut history = BTreeMap::new();
        for slot in 0..MAX_RULES {
            let id = table.get(&slot, 0).context("reading the slot table")?;
            if id != 0 {
                history.insert(id, slot);
            }
        }
        Ok(history)
    }

    /// Whether the object has connection tracking (sessions, SNAT rules and pools).
    pub fn has_conntrack(&self) -> bool {
        self.sessions.is_some()
            && self.ebpf.map(SNAT_RULES).is_some()
            && self.ebpf.map(SNAT_POOLS).is_some()
    }

    /// The capacity the connection-tracking maps were created with.
    pub fn max_sessions(&self) -> u32 {
        self.max_sessions
    }

    /// The session filter (for its gauge); `None` without connection tracking or without
    /// the filter.
    pub fn session_filter(&self) -> Option<&session_filter::SessionFilter> {
        self.sessions.as_ref().and_then(KernelSessions::filter)
    }

    /// The session tables, for the expiry sweep and the sessions API; `None` without
    /// connection tracking.
    pub fn sessions(&mut self) -> Option<&mut KernelSessions> {
        self.sessions.as_mut()
    }

    /// Forwards the program's aya-log records to `tracing` (via the `log` bridge).
    pub fn start_log_forwarding(&mut self) {
        match aya_log::EbpfLogger::init(&mut self.ebpf) {
            Ok(logger) => {
                // SAFETY: the logger owns its buffer's fd, and the AsyncFd owns the logger, so
                // the fd stays open and unchanged for the AsyncFd's whole life.
                let fd = unsafe {
                    tokio::io::unix::AsyncFd::register_with_interest(
                        logger,
                        tokio::io::Interest::READABLE,
                    )
                };
                match fd {
                    Ok(mut fd) => {
                        tokio::spawn(async move {
                            loop {
                                let Ok(mut guard) = fd.readable_mut().await else {
                                    break;
                                };
                                guard.get_inner_mut().flush();
                                guard.clear_ready();
                            }
                        });
                    }
                    Err(e) => warn!("cannot poll the eBPF log buffer: {e}"),
                }
            }
            // The program logs nothing at default level unless something is wrong; an object
            // without log statements has no log map, which is not an error.
            Err(e) => info!("eBPF log forwarding not active: {e}"),
        }
    }

    /// The loaded XDP program (for BPF_PROG_TEST_RUN in tests and benchmarks).
    pub fn program(&self) -> Result<&Xdp> {
        self.ebpf
            .program(XDP_PROGRAM)
            .ok_or_else(|| anyhow!("the object has no program {XDP_PROGRAM}"))?
            .try_into()
            .context("program type")
    }

    /// Loads the XDP programs (`xdp_nat` and its stages, into `PROGRAMS`) unless they are
    /// loaded already (see [`LoadOptions::load_xdp`]).
    pub fn load_xdp(&mut self) -> Result<()> {
        if !self.xdp_loaded {
            load_xdp_programs(&mut self.ebpf)?;
            self.xdp_loaded = true;
        }
        Ok(())
    }

    /// Loads the TC programs (`tc_nat` and its stages, into `TC_PROGRAMS`) unless they are
    /// loaded already. Fails when the object has none, or the verifier rejects one.
    pub fn load_tc(&mut self) -> Result<()> {
        if self.tc_loaded {
            return Ok(());
        }
        if !load_tc_programs(&mut self.ebpf)? {
            bail!(
                "the TC hook is unavailable: this build's eBPF object has no program \
                 {TC_PROGRAM}; use hook = \"xdp\""
            );
        }
        self.tc_loaded = true;
        Ok(())
    }

    /// The loaded TC twin of [`Dataplane::program`] (`tc_nat`), for test runs (after
    /// [`Dataplane::load_tc`]).
    pub fn classifier(&self) -> Result<&SchedClassifier> {
        self.ebpf
            .program(TC_PROGRAM)
            .ok_or_else(|| anyhow!("the object has no program {TC_PROGRAM}"))?
            .try_into()
            .context("program type")
    }

    /// The object's XDP program `name`, loaded into the kernel first if it is not yet. For
    /// benchmarks only: `xdp_parse_pass` (the parse-and-pass baseline) is never loaded
    /// otherwise, and the tail-called programs' info names the maps they use. A program
    /// loaded here is neither attached nor put in `PROGRAMS`.
    pub fn loaded_program(&mut self, name: &str) -> Result<&Xdp> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("the object has no program {name}"))?
            .try_into()
            .with_context(|| format!("{name}: program type"))?;
        if program.fd().is_err() {
            program
                .load()
                .with_context(|| format!("the kernel verifier rejected the XDP program {name}"))?;
        }
        self.ebpf
            .program(name)
            .ok_or_else(|| anyhow!("the object has no program {name}"))?
            .try_into()
            .with_context(|| format!("{name}: program type"))
    }

    /// Makes `compiled` the rule set in force: writes it into the rule bank the program is
    /// not using (SNAT pools and rules first, then the DNAT tries) and flips `RULE_BANK`, so
    /// the program switches from one complete rule set to the other at one point in time.
    /// Egress interfaces are resolved here, in the agent's network namespace.
    ///
    /// On error the bank in use is untouched: the rules in force stay exactly as they were.
    pub fn apply(&mut self, compiled: &Compiled) -> Result<()> {
        let needs_conntrack = !compiled.snat.pools.is_empty() || !compiled.stateful.is_empty();
        if needs_conntrack && !self.has_conntrack() {
            bail!(
                "the loaded XDP object has no connection tracking (maps {SESSIONS}, \
                 {SNAT_RULES}, {SNAT_POOLS}), which [[snat]] rules and stateful DNAT rules need"
            );
        }
        let ifindex = resolve_interfaces(compiled.snat.interface_names(), interface_index);
        for name in compiled.snat.interface_names() {
            if !ifindex.contains_key(name) {
                warn!(interface = name, "out_interface does not exist (yet): its SNAT rules match nothing until it appears");
            }
        }
        self.write_bank(compiled, ifindex)?;
        self.refresh_local_addresses()?;
        self.refresh_path_mtu_floor()?;
        Ok(())
    }

    /// Writes this host's current addresses (and directed broadcasts) into `LOCAL_ADDRS`, so
    /// that packets addressed to the appliance itself never start an SNAT session. Run with
    /// every rule change and every expiry sweep (addresses change: DHCP, an operator); returns
    /// whether anything changed.
    pub fn refresh_local_addresses(&mut self) -> Result<bool> {
        if self.ebpf.map(LOCAL_ADDRS).is_none() {
            return Ok(false);
        }
        let desired = local_addresses().context("listing this host's addresses")?;
        let present: BTreeSet<[u8; 4]> = local_addrs_table(&mut self.ebpf)?
            .keys()
            .collect::<Result<_, _>>()
            .with_context(|| format!("listing {LOCAL_ADDRS}"))?;
        let changed = desired != present;
        if changed {
            // While the table changes, the program must ask it for every address: an address
            // being added may lie outside the filter written for the old set.
            write_local_filter(&mut self.ebpf, &PrefixFilter::always())?;
            let mut table = local_addrs_table(&mut self.ebpf)?;
            for addr in desired.difference(&present) {
                table.insert(addr, 1, 0).with_context(|| {
                    format!("adding {} to {LOCAL_ADDRS}", Ipv4Addr::from(*addr))
                })?;
            }
            for addr in present.difference(&desired) {
                table.remove(addr).with_context(|| {
                    format!("removing {} from {LOCAL_ADDRS}", Ipv4Addr::from(*addr))
                })?;
            }
            debug!(addresses = desired.len(), "local addresses updated");
        }
        // Also when nothing changed: a new program generation starts without a filter.
        let hosts: Vec<Ipv4Net> = desired
            .iter()
            .map(|a| Ipv4Net::from(Ipv4Addr::from(*a)))
            .collect();
        write_local_filter(&mut self.ebpf, &crate::compile::cover::filter_of(&hosts))?;
        Ok(changed)
    }

    /// Writes the smallest MTU of this host's interfaces (loopback aside) into
    /// `PATH_MTU_FLOOR`: DF packets longer than it are checked against their route's MTU (see
    /// the program's `conntrack::exceeds_path_mtu`). Returns the value written.
    pub fn refresh_path_mtu_floor(&mut self) -> Result<u32> {
        let floor = path_mtu_floor().context("reading the interfaces' MTUs")?;
        let Some(map) = self.ebpf.map_mut(PATH_MTU_FLOOR) else {
            return Ok(0);
        };
        let mut table: Array<&mut MapData, u32> =
            Array::try_from(map).with_context(|| format!("opening {PATH_MTU_FLOOR}"))?;
        if table.get(&0, 0).ok() != Some(floor) {
            table
                .set(0, floor, 0)
                .with_context(|| format!("writing {PATH_MTU_FLOOR}"))?;
            debug!(mtu = floor, "path MTU floor updated");
        }
        Ok(floor)
    }

    /// The rule bank the program reads now.
    pub fn active_bank(&self) -> u32 {
        self.bank.active
    }

    fn write_bank(&mut self, compiled: &Compiled, ifindex: BTreeMap<String, u32>) -> Result<()> {
        let target = self.bank.target();
        let wait = self.bank.wait_before_write(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        if self.has_conntrack() {
            reconcile_snat(
                &mut snat::KernelSnatTables {
                    ebpf: &mut self.ebpf,
                    bank: target,
                },
                &compiled.snat.resolved_sets(&ifindex),
                &compiled.snat.pools,
                self.snat.pools_written[target as usize],
            )
            .with_context(|| format!("writing the SNAT rules into rule bank {target}"))?;
            self.snat.pools_written[target as usize] = compiled.snat.pools.len();
        }
        reconcile(
            &mut KernelTables {
                ebpf: &mut self.ebpf,
                bank: target,
            },
            &compiled.dnat,
        )
        .with_context(|| format!("writing the DNAT rules into rule bank {target}"))?;
        write_bypass(&mut self.ebpf, target, &compiled.bypass)
            .with_context(|| format!("writing the bypass entries into rule bank {target}"))?;
        write_filters(&mut self.ebpf, target, &compiled.filters())
            .with_context(|| format!("writing the trie prefilters of rule bank {target}"))?;
        let map = self
            .ebpf
            .map_mut(RULE_BANK)
            .ok_or_else(|| anyhow!("the object has no map {RULE_BANK}"))?;
        let mut active: Array<&mut MapData, u32> =
            Array::try_from(map).with_context(|| format!("opening {RULE_BANK}"))?;
        active
            .set(0, target, 0)
            .with_context(|| format!("switching {RULE_BANK} to bank {target}"))?;
        debug!(bank = target, "rule bank switched");
        self.bank = bank::BankState {
            active: target,
            written: true,
            flipped_at: Some(Instant::now()),
        };
        self.snat.compiled = compiled.snat.clone();
        self.snat.ifindex = ifindex;
        self.applied = compiled.clone();
        if let Some(table) = self.slot_table.as_mut() {
            // Slot -> id; a slot taken over by another rule gets the new id, which is exactly
            // `compile::slot_history_after` seen from the slot side.
            for (id, slot) in &compiled.slots {
                table
                    .set(*slot, *id, 0)
                    .with_context(|| format!("recording slot {slot} for rule {id}"))?;
            }
        }
        // The rules are in force now; an index that cannot be made only slows allocation down
        // (it probes instead), so it is no reason to report the change as failed.
        if let Err(e) = self.refresh_port_spaces() {
            warn!("updating the free-port indexes: {e:#}");
        }
        Ok(())
    }

    /// Gives every external address and protocol the SNAT rules in force can hand out ports
    /// on a free-port index, and drops the indexes of the others. MASQUERADE follows its
    /// egress interface's addresses as they are now, so this runs again on the sweep timer.
    /// Without an index a space is allocated by probing, so a failure here costs speed, not
    /// correctness.
    pub fn refresh_port_spaces(&mut self) -> Result<()> {
        let Some(store) = self.sessions.as_mut() else {
            return Ok(());
        };
        if store.ports().is_none() {
            return Ok(());
        }
        let snat = &self.snat.compiled;
        let has_masquerade = snat.sets.values().any(|set| {
            set.rules[..(set.len as usize).min(set.rules.len())]
                .iter()
                .any(|r| r.action == nat_common::conntrack::SNAT_MASQUERADE)
        });
        let addresses = if has_masquerade {
            ports::interface_addresses()?
        } else {
            Vec::new()
        };
        let desired =
            ports::desired_spaces(&snat.sets, &snat.pools, &snat.out_interfaces, &addresses);
        store
            .set_port_spaces(&desired)
            .context("updating the free-port indexes")
    }

    /// Resolves the SNAT rules' egress interfaces again and, if an index changed (an interface
    /// created, deleted or recreated since), writes the rule set again with the new indexes
    /// (through the other bank, like any change). Returns whether it did.
    pub fn refresh_snat_interfaces(&mut self) -> Result<bool> {
        if self
            .snat
            .compiled
            .out_interfaces
            .iter()
            .all(Option::is_none)
        {
            return Ok(false);
        }
        let ifindex = resolve_interfaces(self.snat.compiled.interface_names(), interface_index);
        if ifindex == self.snat.ifindex {
            return Ok(false);
        }
        for name in self.snat.compiled.interface_names() {
            let (old, new) = (self.snat.ifindex.get(name), ifindex.get(name));
            if old != new {
                match new {
                    Some(index) => info!(
                        interface = name,
                        ifindex = index,
                        "SNAT out_interface resolved; its rules match from now on"
                    ),
                    None => warn!(
                        interface = name,
                        "SNAT out_interface disappeared; its rules match nothing until it is back"
                    ),
                }
            }
        }
        let compiled = self.applied.clone();
        self.write_bank(&compiled, ifindex)?;
        Ok(true)
    }

    /// Reads all counters.
    pub fn snapshot(&self, slots: impl IntoIterator<Item = u32>) -> Result<StatsSnapshot> {
        let reasons = self.sum_counters(
            REASON_COUNTERS,
            Reason::ALL.iter().map(|r| (*r as u32, r.name())),
        )?;
        let rules_map: PerCpuArray<&MapData, RuleCounters> = PerCpuArray::try_from(
            self.ebpf
                .map(RULE_COUNTERS)
                .ok_or_else(|| anyhow!("missing map {RULE_COUNTERS}"))?,
        )?;
        let mut rules = BTreeMap::new();
        for slot in slots {
            let per_cpu = rules_map
                .get(&slot, 0)
                .with_context(|| format!("reading {RULE_COUNTERS}[{slot}]"))?;
            let mut total = RuleCounters::default();
            for c in per_cpu.iter() {
                total.orig_packets += c.orig_packets;
                total.orig_bytes += c.orig_bytes;
                total.reply_packets += c.reply_packets;
                total.reply_bytes += c.reply_bytes;
            }
            rules.insert(slot, total);
        }
        let forward = self.sum_counters(
            FORWARD_COUNTERS,
            ForwardResult::ALL.iter().map(|r| (*r as u32, r.name())),
        )?;
        let route_cache = self.sum_counters(
            ROUTE_COUNTERS,
            RouteCacheResult::ALL.iter().map(|r| (*r as u32, r.name())),
        )?;
        Ok(StatsSnapshot {
            reasons,
            forward,
            route_cache,
            rules,
        })
    }

    /// A second handle on this program generation's `ROUTE_CACHE_GEN`, for whoever follows
    /// the kernel's routing changes (`crate::route_watch`) apart from the dataplane's owner.
    pub fn route_generation_map(&self) -> Result<MapData> {
        let Some(aya::maps::Map::Array(map)) = self.ebpf.map(ROUTE_CACHE_GEN) else {
            bail!("the object has no array {ROUTE_CACHE_GEN}");
        };
        let id = map
            .info()
            .with_context(|| format!("reading {ROUTE_CACHE_GEN}'s info"))?
            .id();
        MapData::from_id(id).with_context(|| format!("opening {ROUTE_CACHE_GEN} (map id {id})"))
    }

    /// The named slots of the per-CPU u64 counter array `map`, each summed over CPUs.
    fn sum_counters<'n>(
        &self,
        map: &str,
        slots: impl Iterator<Item = (u32, &'n str)>,
    ) -> Result<Vec<u64>> {
        let counters: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(map)
                .ok_or_else(|| anyhow!("missing map {map}"))?,
        )?;
        slots
            .map(|(index, name)| {
                let per_cpu = counters
                    .get(&index, 0)
                    .with_context(|| format!("reading {map}[{name}]"))?;
                Ok(per_cpu.iter().sum())
            })
            .collect()
    }

    /// Zeroes a rule slot's counters (a slot handed to a new rule starts from zero).
    pub fn reset_rule_counters(&mut self, slot: u32) -> Result<()> {
        let mut map: PerCpuArray<&mut MapData, RuleCounters> = PerCpuArray::try_from(
            self.ebpf
                .map_mut(RULE_COUNTERS)
                .ok_or_else(|| anyhow!("missing map {RULE_COUNTERS}"))?,
        )?;
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .context("counting CPUs")?;
        let zeros = aya::maps::PerCpuValues::try_from(vec![RuleCounters::default(); cpus])?;
        map.set(slot, zeros, 0)
            .with_context(|| format!("zeroing {RULE_COUNTERS}[{slot}]"))
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.detach_all();
    }
}

/// Takes the four connection-tracking maps out of the object (the program keeps its own
/// references), or `None` when the object has none of them.
fn take_conntrack_maps(ebpf: &mut Ebpf) -> Result<Option<KernelSessions>> {
    let present = CONNTRACK_MAPS.map(|name| ebpf.map(name).is_some());
    if present.iter().all(|p| !p) {
        return Ok(None);
    }
    if let Some(i) = present.iter().position(|p| !p) {
        bail!(
            "the XDP object has some connection tracking maps but not {}",
            CONNTRACK_MAPS[i]
        );
    }
    let mut take = |name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| anyhow!("missing map {name}"))
    };
    let (sessions, replies, mappings, bindings) = (
        take(SESSIONS)?,
        take(REPLIES)?,
        take(MAPPINGS)?,
        take(BINDINGS)?,
    );
    let mut store = KernelSessions::new(sessions, replies, mappings, bindings)?;
    // The session filter: optional, an object without it looks every packet up.
    if let Some(filter) = ebpf.take_map(SESSION_FILTER) {
        store = store.with_filter(session_filter::SessionFilter::new(filter)?);
    }
    // The free-port indexes: optional, an object without them allocates by probing.
    if let (Some(spaces), Some(bitmaps)) = (ebpf.take_map(PORT_SPACES), ebpf.take_map(PORT_BITMAPS))
    {
        store = store.with_ports(ports::PortIndex::new(spaces, bitmaps)?);
    }
    Ok(Some(store))
}

/// `LOCAL_ADDRS`, opened for reading and writing.
fn local_addrs_table(ebpf: &mut Ebpf) -> Result<aya::maps::HashMap<&mut MapData, [u8; 4], u32>> {
    let map = ebpf
        .map_mut(LOCAL_ADDRS)
        .ok_or_else(|| anyhow!("the object has no map {LOCAL_ADDRS}"))?;
    aya::maps::HashMap::try_from(map).with_context(|| format!("opening {LOCAL_ADDRS}"))
}

/// Writes `filter` into `LOCAL_FILTER` unless it holds it already. An object without the map
/// always looks `LOCAL_ADDRS` up.
fn write_local_filter(ebpf: &mut Ebpf, filter: &PrefixFilter) -> Result<()> {
    let Some(map) = ebpf.map_mut(LOCAL_FILTER) else {
        return Ok(());
    };
    let mut slot: Array<&mut MapData, PrefixFilter> =
        Array::try_from(map).with_context(|| format!("opening {LOCAL_FILTER}"))?;
    if slot.get(&0, 0).ok().as_ref() == Some(filter) {
        return Ok(());
    }
    slot.set(0, *filter, 0)
        .with_context(|| format!("writing {LOCAL_FILTER}"))
}

/// Writes the prefilters of one bank's rule tries (after the tries, before the flip). An
/// object without `RULE_FILTERS` looks every address up.
fn write_filters(ebpf: &mut Ebpf, bank: u32, filters: &BankFilters) -> Result<()> {
    let Some(map) = ebpf.map_mut(RULE_FILTERS) else {
        return Ok(());
    };
    let mut table: Array<&mut MapData, BankFilters> =
        Array::try_from(map).with_context(|| format!("opening {RULE_FILTERS}"))?;
    table
        .set(bank, *filters, 0)
        .with_context(|| format!("writing {RULE_FILTERS}[{bank}]"))
}

/// Brings one bank of `BYPASS` to `desired`: every desired set written (in place), then the
/// prefixes no longer wanted removed. An object without the map takes no bypass entries.
fn write_bypass(ebpf: &mut Ebpf, bank: u32, desired: &BTreeMap<Ipv4Net, BypassSet>) -> Result<()> {
    let Some(map) = ebpf.map_mut(BYPASS) else {
        if desired.is_empty() {
            return Ok(());
        }
        bail!("the loaded XDP object has no {BYPASS} map, which [[bypass]] entries need");
    };
    let mut trie: LpmTrie<&mut MapData, BankedPrefix, BypassSet> =
        LpmTrie::try_from(map).with_context(|| format!("opening {BYPASS}"))?;
    for (prefix, set) in desired {
        trie.insert(&bank::key(bank, *prefix), set, 0)
            .with_context(|| format!("writing {prefix} into bank {bank} of {BYPASS}"))?;
    }
    let present = bank::prefixes_in(bank, trie.keys(), BYPASS)?;
    for stale in present {
        if !desired.contains_key(&stale) {
            trie.remove(&bank::key(bank, stale))
                .with_context(|| format!("removing {stale} from bank {bank} of {BYPASS}"))?;
        }
    }
    Ok(())
}

/// This host's IPv4 addresses and the directed broadcast addresses of its subnets, in the
/// agent's network namespace (network order), at most `MAX_LOCAL_ADDRS`.
fn local_addresses() -> Result<BTreeSet<[u8; 4]>> {
    let mut out = BTreeSet::new();
    for ifa in nix::ifaddrs::getifaddrs().context("getifaddrs")? {
        for sa in [ifa.address, ifa.broadcast].into_iter().flatten() {
            if let Some(sin) = sa.as_sockaddr_in() {
                out.insert(sin.ip().octets());
            }
        }
    }
    if out.len() > MAX_LOCAL_ADDRS as usize {
        warn!(
            addresses = out.len(),
            "more local addresses than {LOCAL_ADDRS} holds ({MAX_LOCAL_ADDRS}); the rest may be translated like remote ones"
        );
        out = out.into_iter().take(MAX_LOCAL_ADDRS as usize).collect();
    }
    Ok(out)
}

/// The smallest MTU among this network namespace's interfaces other than loopback (0 when
/// there is none). Asked with `SIOCGIFMTU` on a socket, which belongs to the calling thread's
/// network namespace (sysfs would show the namespace it was mounted in).
fn path_mtu_floor() -> Result<u32> {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").context("opening a socket")?;
    let mut floor = 0u32;
    for iface in nix::net::if_::if_nameindex()
        .context("listing interfaces")?
        .iter()
    {
        let name = iface.name().to_bytes();
        if name == b"lo" || name.len() >= libc::IFNAMSIZ {
            continue;
        }
        // SAFETY: an all-zero ifreq is valid; the name (shorter than IFNAMSIZ, checked above)
        // is copied in with its terminating NUL from the zeroing.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name) {
            *dst = *src as libc::c_char;
        }
        // SAFETY: SIOCGIFMTU reads ifr_name and writes ifr_mtu of a valid ifreq.
        let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFMTU, &mut req) };
        if rc != 0 {
            // Gone since the listing.
            continue;
        }
        // SAFETY: the kernel filled the MTU member of the union.
        let mtu = unsafe { req.ifr_ifru.ifru_mtu };
        let Ok(mtu) = u32::try_from(mtu) else {
            continue;
        };
        if floor == 0 || mtu < floor {
            floor = mtu;
        }
    }
    Ok(floor)
}

/// The kernel's index of `interface` in this network namespace; the error names the
/// interface and says why (no such interface, a NUL byte in the name).
pub fn ifindex(interface: &str) -> Result<u32> {
    let name = CString::new(interface)
        .with_context(|| format!("interface name {interface:?} contains a NUL byte"))?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call;
    // if_nametoindex only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("looking up interface {interface}"));
    }
    Ok(index)
}

/// The index of interface `name` in this network namespace, if it exists (see [`ifindex`]
/// for the reason when it does not).
pub fn interface_index(name: &str) -> Option<u32> {
    ifindex(name).ok()
}

/// Resolves `names` with `lookup`; names that do not resolve are left out.
pub fn resolve_interfaces<'a>(
    names: impl IntoIterator<Item = &'a str>,
    lookup: impl Fn(&str) -> Option<u32>,
) -> BTreeMap<String, u32> {
    names
        .into_iter()
        .filter_map(|n| lookup(n).map(|i| (n.to_string(), i)))
        .collect()
}

/// [`RuleTables`] over one bank of the real tries.
struct KernelTables<'a> {
    ebpf: &'a mut Ebpf,
    bank: u32,
}

fn trie_name(table: Table) -> &'static str {
    match table {
        Table::Forward => DNAT_FORWARD,
        Table::Reverse => DNAT_REVERSE,
    }
}

impl KernelTables<'_> {
    fn trie(&mut self, table: Table) -> Result<LpmTrie<&mut MapData, BankedPrefix, NatRuleSet>> {
        let name = trie_name(table);
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("missing map {name}"))?;
        LpmTrie::try_from(map).with_context(|| format!("opening {name}"))
    }
}

impl RuleTables for KernelTables<'_> {
    fn prefixes(&self, table: Table) -> Result<Vec<Ipv4Net>> {
        let name = trie_name(table);
        let map = self
            .ebpf
            .map(name)
            .ok_or_else(|| anyhow!("missing map {name}"))?;
        let trie: LpmTrie<&MapData, BankedPrefix, NatRuleSet> = LpmTrie::try_from(map)?;
        bank::prefixes_in(self.bank, trie.keys(), name)
    }

    fn put(&mut self, table: Table, prefix: Ipv4Net, set: &NatRuleSet) -> Result<()> {
        let key = bank::key(self.bank, prefix);
        let bank = self.bank;
        self.trie(table)?
            .insert(&key, set, 0)
            .with_context(|| format!("writing {prefix} into bank {bank} of the {table:?} table"))
    }

    fn remove(&mut self, table: Table, prefix: Ipv4Net) -> Result<()> {
        let key = bank::key(self.bank, prefix);
        let bank = self.bank;
        self.trie(table)?
            .remove(&key)
            .with_context(|| format!("removing {prefix} from bank {bank} of the {table:?} table"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct FakeTables {
        forward: BTreeMap<Ipv4Net, NatRuleSet>,
        reverse: BTreeMap<Ipv4Net, NatRuleSet>,
    }

    impl FakeTables {
        fn map(&mut self, t: Table) -> &mut BTreeMap<Ipv4Net, NatRuleSet> {
            match t {
                Table::Forward => &mut self.forward,
                Table::Reverse => &mut self.reverse,
            }
        }
    }

    impl RuleTables for FakeTables {
        fn prefixes(&self, t: Table) -> Result<Vec<Ipv4Net>> {
            Ok(match t {
                Table::Forward => self.forward.keys().copied().collect(),
                Table::Reverse => self.reverse.keys().copied().collect(),
            })
        }
        fn put(&mut self, t: Table, p: Ipv4Net, s: &NatRuleSet) -> Result<()> {
            self.map(t).insert(p, *s);
            Ok(())
        }
        fn remove(&mut self, t: Table, p: Ipv4Net) -> Result<()> {
            self.map(t).remove(&p);
            Ok(())
        }
    }

    #[test]
    fn reconcile_converges_and_removes_stale_prefixes() {
        let mut tables = FakeTables::default();
        let stale: Ipv4Net = "198.18.200.0/24".parse().unwrap();
        tables.forward.insert(stale, NatRuleSet::default());
        let mut desired = CompiledDnat::default();
        let p: Ipv4Net = "198.18.100.10/32".parse().unwrap();
        let set = NatRuleSet {
            len: 1,
            ..Default::default()
        };
        desired.forward.insert(p, set);
        desired
            .reverse
            .insert("198.18.1.2/32".parse().unwrap(), set);
        reconcile(&mut tables, &desired).unwrap();
        assert_eq!(tables.forward, desired.forward);
        assert_eq!(tables.reverse, desired.reverse);
    }
}
