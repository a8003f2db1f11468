//! The kernel side as the agent sees it: the loaded object, its attachments and its maps.
//!
//! Map writes go through [`RuleTables`] and [`SnatTables`], and session access through
//! [`SessionStore`], so the reconcilers and the expiry sweep are plain logic that the tests
//! drive with in-memory tables.

mod bank;
pub mod ports;
mod sessions;
mod snat;
mod sys;

pub use bank::BANK_GRACE;

pub use sessions::{BpfTable, KernelSessions, KvTable, MemStore, SessionStore, Walk};
pub use snat::{reconcile_snat, SnatTables};

use std::{collections::BTreeMap, ffi::CString, time::Instant};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, HashMap as AyaHashMap, LpmTrie, MapData, PerCpuArray, ProgramArray},
    programs::{xdp::XdpLinkId, Xdp, XdpMode as AyaXdpMode},
    Ebpf, EbpfLoader,
};
use ipnet::Ipv4Net;
use nat_common::{
    maps::{BankedPrefix, FORWARD_COUNTERS, FORWARD_XDP, IFACE_FORWARD, RULE_BANK, RULE_BANKS},
    maps::{
        BINDINGS, CLAIM_SLOT, DEFAULT_MAX_SESSIONS, DNAT_FORWARD, DNAT_REVERSE, MAPPINGS,
        NEW_FLOW_SLOT, PROGRAMS, REASON_COUNTERS, REPLIES, RULES_SLOT, RULE_COUNTERS, SESSIONS,
        SNAT_POOLS, SNAT_RULES, XDP_CLAIM_PROGRAM, XDP_NEW_FLOW_PROGRAM, XDP_PROGRAM,
        XDP_RULES_PROGRAM,
    },
    maps::{PORT_BITMAPS, PORT_SPACES},
    rules::NatRuleSet,
    stats::{ForwardResult, Reason, RuleCounters},
};
use tracing::{debug, info, warn};

use crate::{
    compile::{Compiled, CompiledDnat, CompiledSnat},
    model::{Forwarding, Interface, XdpMode},
};

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
    /// Counters per rule slot that has ever counted.
    pub rules: BTreeMap<u32, RuleCounters>,
}

/// How to load the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Capacity of `SESSIONS`, `REPLIES`, `MAPPINGS` and `BINDINGS` (all four hold one entry
    /// per session at most, so they are sized alike).
    pub max_sessions: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_sessions: DEFAULT_MAX_SESSIONS,
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

/// Loads the programs `xdp_nat` reaches by tail call and puts them in `PROGRAMS`. Until they
/// are there, packets that would start a session are refused (`new_flow_unavailable`), never
/// passed untranslated.
fn install_tail_call_programs(ebpf: &mut Ebpf) -> Result<()> {
    for (name, slot) in [
        (XDP_CLAIM_PROGRAM, CLAIM_SLOT),
        (XDP_RULES_PROGRAM, RULES_SLOT),
        (XDP_NEW_FLOW_PROGRAM, NEW_FLOW_SLOT),
    ] {
        let Some(program) = ebpf.program_mut(name) else {
            // An object without connection tracking has no such programs.
            continue;
        };
        let program: &mut Xdp = program
            .try_into()
            .with_context(|| format!("{name}: program type"))?;
        program
            .load()
            .with_context(|| format!("the kernel verifier rejected the XDP program {name}"))?;
        let fd = program
            .fd()
            .with_context(|| format!("{name}: program file descriptor"))?
            .try_clone()
            .with_context(|| format!("{name}: duplicating the program fd"))?;
        let map = ebpf
            .map_mut(PROGRAMS)
            .ok_or_else(|| anyhow!("the object has {name} but no {PROGRAMS} map"))?;
        let mut programs: ProgramArray<&mut MapData> =
            ProgramArray::try_from(map).context("opening the program array")?;
        programs
            .set(slot, &fd, 0)
            .with_context(|| format!("installing {name} in {PROGRAMS}[{slot}]"))?;
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
    attached: Vec<(String, XdpMode, XdpLinkId)>,
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
        let mut loader = EbpfLoader::new();
        // Sizes are fixed at map creation, so they are set before the object is loaded; names
        // the object lacks are ignored by aya.
        for name in CONNTRACK_MAPS {
            loader.map_max_entries(name, options.max_sessions);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the XDP object into the kernel")?;
        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or_else(|| anyhow!("the object has no program {XDP_PROGRAM}"))?
            .try_into()
            .context("program type")?;
        program
            .load()
            .context("the kernel verifier rejected the XDP program")?;
        install_tail_call_programs(&mut ebpf)?;
        let sessions = take_conntrack_maps(&mut ebpf)?;
        if sessions.is_none() {
            info!("the XDP object has no connection tracking maps; SNAT and stateful DNAT are unavailable");
        }
        Ok(Self {
            ebpf,
            attached: Vec::new(),
            sessions,
            max_sessions: options.max_sessions,
            snat: SnatState::default(),
            bank: bank::BankState::default(),
            applied: Compiled::default(),
        })
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

    /// Attaches to every interface, honouring each one's mode. On failure, what was attached
    /// is detached again so nothing is left half done.
    pub fn attach_all(&mut self, interfaces: &[Interface]) -> Result<()> {
        for iface in interfaces {
            if let Err(e) = self.attach(iface) {
                self.detach_all();
                return Err(e);
            }
        }
        Ok(())
    }

    fn attach(&mut self, iface: &Interface) -> Result<()> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or_else(|| anyhow!("the object has no program {XDP_PROGRAM}"))?
            .try_into()?;
        let (link, mode) = match iface.mode {
            XdpMode::Native => (
                program
                    .attach(&iface.name, AyaXdpMode::Driver)
                    .with_context(|| format!("attaching to {} in native mode", iface.name))?,
                XdpMode::Native,
            ),
            XdpMode::Generic => (
                program
                    .attach(&iface.name, AyaXdpMode::Skb)
                    .with_context(|| format!("attaching to {} in generic mode", iface.name))?,
                XdpMode::Generic,
            ),
            XdpMode::Auto => match program.attach(&iface.name, AyaXdpMode::Driver) {
                Ok(link) => (link, XdpMode::Native),
                Err(native_err) => {
                    warn!(interface = %iface.name, error = %native_err, "native XDP refused; falling back to generic mode");
                    let link = program
                        .attach(&iface.name, AyaXdpMode::Skb)
                        .with_context(|| {
                            format!(
                                "attaching to {} (native: {native_err}; generic)",
                                iface.name
                            )
                        })?;
                    (link, XdpMode::Generic)
                }
            },
        };
        info!(interface = %iface.name, mode = mode.as_str(), forwarding = iface.forwarding.as_str(), "XDP program attached");
        self.attached.push((iface.name.clone(), mode, link));
        self.set_forwarding(iface)
    }

    /// Tells the program who forwards translated packets arriving on `iface`.
    fn set_forwarding(&mut self, iface: &Interface) -> Result<()> {
        let ifindex = crate::sysctl::ifindex(&iface.name)?;
        let map = self
            .ebpf
            .map_mut(IFACE_FORWARD)
            .ok_or_else(|| anyhow!("missing map {IFACE_FORWARD}"))?;
        let mut table: AyaHashMap<&mut MapData, u32, u32> =
            AyaHashMap::try_from(map).context("opening the interface table")?;
        match iface.forwarding {
            Forwarding::Xdp => table
                .insert(ifindex, FORWARD_XDP, 0)
                .with_context(|| format!("enabling XDP forwarding on {}", iface.name)),
            // Absent means "the kernel forwards"; a stale entry from a reused index must go.
            Forwarding::Kernel => match table.remove(&ifindex) {
                Ok(()) => Ok(()),
                Err(e) if is_absent_key(&e) => Ok(()),
                Err(e) => Err(e).with_context(|| format!("clearing forwarding on {}", iface.name)),
            },
        }
    }

    /// Interfaces attached and the mode each one actually got.
    pub fn attachments(&self) -> impl Iterator<Item = (&str, XdpMode)> {
        self.attached.iter().map(|(n, m, _)| (n.as_str(), *m))
    }

    /// Detaches from every interface (logged, never fails: used on shutdown and error paths).
    pub fn detach_all(&mut self) {
        let Some(Ok(program)) = self.ebpf.program_mut(XDP_PROGRAM).map(<&mut Xdp>::try_from) else {
            return;
        };
        for (name, _, link) in self.attached.drain(..) {
            match program.detach(link) {
                Ok(()) => info!(interface = %name, "XDP program detached"),
                Err(e) => warn!(interface = %name, error = %e, "detaching failed"),
            }
        }
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
        self.write_bank(compiled, ifindex)
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
        let reasons_map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(REASON_COUNTERS)
                .ok_or_else(|| anyhow!("missing map {REASON_COUNTERS}"))?,
        )?;
        let mut reasons = Vec::with_capacity(Reason::COUNT as usize);
        for r in Reason::ALL {
            let per_cpu = reasons_map
                .get(&(r as u32), 0)
                .with_context(|| format!("reading {REASON_COUNTERS}[{}]", r.name()))?;
            reasons.push(per_cpu.iter().sum());
        }
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
        let forward_map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(FORWARD_COUNTERS)
                .ok_or_else(|| anyhow!("missing map {FORWARD_COUNTERS}"))?,
        )?;
        let mut forward = Vec::with_capacity(ForwardResult::COUNT as usize);
        for r in ForwardResult::ALL {
            let per_cpu = forward_map
                .get(&(r as u32), 0)
                .with_context(|| format!("reading {FORWARD_COUNTERS}[{}]", r.name()))?;
            forward.push(per_cpu.iter().sum());
        }
        Ok(StatsSnapshot {
            reasons,
            forward,
            rules,
        })
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
    // The free-port indexes: optional, an object without them allocates by probing.
    if let (Some(spaces), Some(bitmaps)) = (ebpf.take_map(PORT_SPACES), ebpf.take_map(PORT_BITMAPS))
    {
        store = store.with_ports(ports::PortIndex::new(spaces, bitmaps)?);
    }
    Ok(Some(store))
}

/// The index of interface `name` in this network namespace, if it exists.
pub fn interface_index(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; if_nametoindex
    // only reads it.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
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
