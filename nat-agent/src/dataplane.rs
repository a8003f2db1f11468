//! The kernel side as the agent sees it: the loaded object, its attachments and its maps.
//!
//! Map writes go through [`RuleTables`], so the reconciler ([`reconcile`]) is plain logic that
//! the tests drive with an in-memory table.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{lpm_trie::Key, LpmTrie, MapData, PerCpuArray},
    programs::{xdp::XdpLinkId, Xdp, XdpMode as AyaXdpMode},
    Ebpf,
};
use ipnet::Ipv4Net;
use nat_common::{
    maps::{DNAT_FORWARD, DNAT_REVERSE, REASON_COUNTERS, RULE_COUNTERS, XDP_PROGRAM},
    rules::NatRuleSet,
    stats::{Reason, RuleCounters},
};
use tracing::{info, warn};

use crate::{
    compile::CompiledDnat,
    model::{Interface, XdpMode},
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

/// Brings the tries to `desired`: writes every desired set (an in-place replace is atomic per
/// prefix in the kernel) and then removes prefixes no longer wanted.
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
    /// Counters per rule slot that has ever counted.
    pub rules: BTreeMap<u32, RuleCounters>,
}

/// The loaded program and its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    attached: Vec<(String, XdpMode, XdpLinkId)>,
}

impl Dataplane {
    /// Loads the embedded object into the kernel (no attachment yet).
    pub fn load() -> Result<Self> {
        let mut ebpf = Ebpf::load(EBPF_OBJECT).context("loading the XDP object into the kernel")?;
        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or_else(|| anyhow!("the object has no program {XDP_PROGRAM}"))?
            .try_into()
            .context("program type")?;
        program
            .load()
            .context("the kernel verifier rejected the XDP program")?;
        Ok(Self {
            ebpf,
            attached: Vec::new(),
        })
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
        info!(interface = %iface.name, mode = mode.as_str(), "XDP program attached");
        self.attached.push((iface.name.clone(), mode, link));
        Ok(())
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

    /// Writes the compiled rules into the tries.
    pub fn apply(&mut self, compiled: &CompiledDnat) -> Result<()> {
        reconcile(
            &mut KernelTables {
                ebpf: &mut self.ebpf,
            },
            compiled,
        )
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
        Ok(StatsSnapshot { reasons, rules })
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

/// [`RuleTables`] over the real tries.
struct KernelTables<'a> {
    ebpf: &'a mut Ebpf,
}

impl KernelTables<'_> {
    fn trie(&mut self, table: Table) -> Result<LpmTrie<&mut MapData, [u8; 4], NatRuleSet>> {
        let name = match table {
            Table::Forward => DNAT_FORWARD,
            Table::Reverse => DNAT_REVERSE,
        };
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("missing map {name}"))?;
        LpmTrie::try_from(map).with_context(|| format!("opening {name}"))
    }
}

impl RuleTables for KernelTables<'_> {
    fn prefixes(&self, table: Table) -> Result<Vec<Ipv4Net>> {
        let name = match table {
            Table::Forward => DNAT_FORWARD,
            Table::Reverse => DNAT_REVERSE,
        };
        let map = self
            .ebpf
            .map(name)
            .ok_or_else(|| anyhow!("missing map {name}"))?;
        let trie: LpmTrie<&MapData, [u8; 4], NatRuleSet> = LpmTrie::try_from(map)?;
        trie.keys()
            .map(|k| {
                let k = k.with_context(|| format!("listing {name}"))?;
                Ipv4Net::new(k.data().into(), k.prefix_len() as u8)
                    .context("bad prefix length in trie")
            })
            .collect()
    }

    fn put(&mut self, table: Table, prefix: Ipv4Net, set: &NatRuleSet) -> Result<()> {
        let key = Key::new(u32::from(prefix.prefix_len()), prefix.network().octets());
        self.trie(table)?
            .insert(&key, set, 0)
            .with_context(|| format!("writing {prefix} into the {table:?} table"))
    }

    fn remove(&mut self, table: Table, prefix: Ipv4Net) -> Result<()> {
        let key = Key::new(u32::from(prefix.prefix_len()), prefix.network().octets());
        self.trie(table)?
            .remove(&key)
            .with_context(|| format!("removing {prefix} from the {table:?} table"))
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
