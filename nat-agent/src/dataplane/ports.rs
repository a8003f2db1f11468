//! The agent's side of the free-port index (`nat_common::ports`): creating an index for every
//! external address and protocol the SNAT rules can hand out ports on, clearing the bit of
//! every port claim the agent deletes, and repairing the index from `BINDINGS` once per sweep
//! pass.
//!
//! # Who writes what, and the races
//!
//! `PORT_BITMAPS` is a `BPF_F_MMAPABLE` array: the agent maps it into its own memory and
//! changes words with the CPU's atomic read-modify-write instructions (`AtomicU64::fetch_and`,
//! `fetch_or`), the very memory the kernel changes with BPF atomics (`lock or`, `lock and`,
//! which are the same locked x86 instructions). Neither side ever writes a whole word, so no
//! write is lost: a bit the kernel sets while the agent clears another in the same word
//! survives. (The alternatives were worse: a map update from user space replaces the whole
//! 8 KiB value and loses the kernel's bits set meanwhile; a rebuild from `BINDINGS` alone
//! would leave stale bits for a whole sweep interval.)
//!
//! The orders that keep the index a hint and never a lie about `BINDINGS` for long:
//! - a claim: the kernel inserts the binding (if absent), then sets the bit. In between the bit
//!   reads free for a taken port: another CPU's insert fails, and that CPU sets the bit;
//! - a deletion: the agent deletes the binding, then clears the bit. In between the bit reads
//!   taken for a free port: the port is skipped for microseconds;
//! - a race the orders cannot exclude: the agent clears a bit right after the kernel set it
//!   again for a new claim of the same port (the port freed and claimed again between the
//!   agent's delete and its clear). The bit then reads free for a taken port, which costs one
//!   failed insert, after which the kernel sets it again. Nothing is ever translated wrongly:
//!   only the insert-if-absent into `BINDINGS` claims a port.
//!
//! The sweep's repair ([`PortIndex::repair`]) catches what the orders leave: bits set for
//! ports without a binding (a kernel release that lost a race, a stale summary), and claims
//! whose bit is missing. A bit is cleared only if it was set before the bindings walk began,
//! the walk did not see its binding, and a point lookup right before clearing still finds
//! none; so a claim made during the walk keeps its bit.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError};
use nat_common::{
    conntrack::{Endpoint, Pool, SnatRuleSet, MAX_SNAT_RULES_PER_SET, SNAT_MASQUERADE},
    ipv4::proto,
    maps::PORT_BITMAPS,
    ports::{bit_of, is_full, word_of, PortBitmap, PortSpace, PORT_WORDS, SUMMARY_WORDS},
};
use tracing::{debug, warn};

use super::{mapped::MappedArray, sessions::KvTable};

/// Words of one bitmap: ports, summary, top.
const BITMAP_WORDS: usize = PORT_WORDS + SUMMARY_WORDS + 1;
const _: () = assert!(std::mem::size_of::<PortBitmap>() == BITMAP_WORDS * 8);
/// Index of the top word in a bitmap.
const TOP: usize = PORT_WORDS + SUMMARY_WORDS;

/// How long an unlinked slot waits before it is reused: far longer than a program run that
/// found it in `PORT_SPACES` just before can still write into it.
const SLOT_GRACE: Duration = Duration::from_secs(1);

/// Most stale bits one repair checks against `BINDINGS` (one lookup each): bounded work per
/// pass; more wait for the next pass.
const MAX_REPAIR_LOOKUPS: usize = 65_536;

/// The protocols SNAT hands out ports (echo ids) for.
pub const SNAT_PROTOCOLS: [u8; 3] = [proto::TCP, proto::UDP, proto::ICMP];

/// Sets `port` in a bitmap, and its summary and top bits when they become full.
fn set_bit(b: &[AtomicU64], port: u16) {
    let w = word_of(port) as usize;
    let word = b[w].fetch_or(bit_of(port), Ordering::SeqCst) | bit_of(port);
    if is_full(word) {
        let s = PORT_WORDS + (w >> 6);
        let summary = b[s].fetch_or(1 << (w & 63), Ordering::SeqCst) | 1 << (w & 63);
        if is_full(summary) {
            b[TOP].fetch_or(1 << (w >> 6), Ordering::SeqCst);
        }
    }
}

/// Clears `port` in a bitmap, with its summary and top bits.
fn clear_bit(b: &[AtomicU64], port: u16) {
    let w = word_of(port) as usize;
    b[w].fetch_and(!bit_of(port), Ordering::SeqCst);
    b[PORT_WORDS + (w >> 6)].fetch_and(!(1 << (w & 63)), Ordering::SeqCst);
    b[TOP].fetch_and(!(1 << (w >> 6)), Ordering::SeqCst);
}

/// A copy of a bitmap.
fn copy(b: &[AtomicU64]) -> Box<PortBitmap> {
    let mut out = Box::new(PortBitmap::default());
    for (i, w) in out.words.iter_mut().enumerate() {
        *w = b[i].load(Ordering::SeqCst);
    }
    for (i, s) in out.summary.iter_mut().enumerate() {
        *s = b[PORT_WORDS + i].load(Ordering::SeqCst);
    }
    out.top = b[TOP].load(Ordering::SeqCst);
    out
}

/// Claimed ports per space, as seen by one walk of `BINDINGS` (the sweep's bindings phase).
pub type Claimed = BTreeMap<PortSpace, Box<[u64; PORT_WORDS]>>;

/// Records `external` in `claimed`.
pub fn note_claim(claimed: &mut Claimed, external: &Endpoint) {
    let port = u16::from_be_bytes(external.port);
    let words = claimed
        .entry(PortSpace::new(external.addr, external.proto))
        .or_insert_with(|| Box::new([0; PORT_WORDS]));
    words[word_of(port) as usize] |= bit_of(port);
}

/// What one repair changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Repair {
    /// Bits set for claims the index had missed.
    pub set: u64,
    /// Bits cleared for ports without a claim.
    pub cleared: u64,
}

/// The free-port indexes: `PORT_SPACES` and the mapped `PORT_BITMAPS`.
pub struct PortIndex {
    spaces: BpfHashMap<MapData, PortSpace, u32>,
    mapped: MappedArray,
    /// Space -> slot, as written into `PORT_SPACES`.
    slots: BTreeMap<PortSpace, u32>,
    /// Slots never used or free again.
    free: Vec<u32>,
    /// Slots unlinked, with when: reusable after [`SLOT_GRACE`].
    retired: Vec<(u32, Instant)>,
}

impl PortIndex {
    /// Wraps the two maps taken from the loaded object.
    pub fn new(spaces: Map, bitmaps: Map) -> Result<Self> {
        let spaces = BpfHashMap::try_from(spaces)
            .context("PORT_SPACES is not a hash map of the expected layout")?;
        let mapped = MappedArray::new(bitmaps, PORT_BITMAPS, std::mem::size_of::<PortBitmap>())?;
        let free = (0..mapped.slots()).rev().collect();
        Ok(PortIndex {
            spaces,
            mapped,
            slots: BTreeMap::new(),
            free,
            retired: Vec::new(),
        })
    }

    /// The spaces with an index now.
    pub fn spaces(&self) -> impl Iterator<Item = &PortSpace> {
        self.slots.keys()
    }

    /// A copy of the bitmap of `space`, if it has an index.
    pub fn bitmap(&self, space: &PortSpace) -> Option<Box<PortBitmap>> {
        let slot = *self.slots.get(space)?;
        Some(copy(self.mapped.entry(slot)))
    }

    /// Whether `external`'s port is marked claimed; `None` without an index for its space.
    pub fn is_marked(&self, external: &Endpoint) -> Option<bool> {
        let slot = *self
            .slots
            .get(&PortSpace::new(external.addr, external.proto))?;
        let port = u16::from_be_bytes(external.port);
        let word = self.mapped.entry(slot)[word_of(port) as usize].load(Ordering::SeqCst);
        Some(word & bit_of(port) != 0)
    }

    /// Marks `external`'s port claimed (what the kernel does after a claim; for state written
    /// from user space, such as the benchmark's synthetic sessions). No-op without an index.
    pub fn mark(&self, external: &Endpoint) {
        if let Some(&slot) = self
            .slots
            .get(&PortSpace::new(external.addr, external.proto))
        {
            set_bit(self.mapped.entry(slot), u16::from_be_bytes(external.port));
        }
    }

    /// Marks `external`'s port free: called right after its binding was deleted.
    pub fn release(&self, external: &Endpoint) {
        if let Some(&slot) = self
            .slots
            .get(&PortSpace::new(external.addr, external.proto))
        {
            clear_bit(self.mapped.entry(slot), u16::from_be_bytes(external.port));
        }
    }

    /// Makes the indexed spaces exactly `desired`: a new space gets a slot, its bits from
    /// `BINDINGS` (one walk, only when there is a new space), and then its `PORT_SPACES`
    /// entry, so the kernel never sees it half filled; a space no longer wanted loses its
    /// entry first and its slot is reused only after [`SLOT_GRACE`]. Spaces beyond the slots
    /// are left to probing, with a warning.
    pub fn set_spaces(
        &mut self,
        desired: &BTreeSet<PortSpace>,
        bindings: &dyn KvTable<Endpoint, Endpoint>,
    ) -> Result<()> {
        let stale: Vec<PortSpace> = self
            .slots
            .keys()
            .filter(|s| !desired.contains(s))
            .copied()
            .collect();
        for space in stale {
            match self.spaces.remove(&space) {
                Ok(()) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e).context("removing a PORT_SPACES entry"),
            }
            if let Some(slot) = self.slots.remove(&space) {
                self.retired.push((slot, Instant::now()));
            }
        }
        let now = Instant::now();
        let (ready, waiting): (Vec<_>, Vec<_>) = self
            .retired
            .drain(..)
            .partition(|(_, at)| now.duration_since(*at) >= SLOT_GRACE);
        self.retired = waiting;
        self.free.extend(ready.into_iter().map(|(slot, _)| slot));

        let new: Vec<PortSpace> = desired
            .iter()
            .filter(|s| !self.slots.contains_key(s))
            .copied()
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let mut placed = Vec::new();
        for space in new {
            let Some(slot) = self.free.pop() else {
                warn!(
                    address = %Ipv4Addr::from(space.addr),
                    protocol = space.proto,
                    "no free-port index slot left: ports on this address are found by probing"
                );
                continue;
            };
            for w in self.mapped.entry(slot) {
                w.store(0, Ordering::SeqCst);
            }
            placed.push((space, slot));
        }
        // Claims that already exist (state kept across an agent restart, or made by probing
        // before the index existed).
        let mut from = None;
        loop {
            let page = bindings.walk(from.as_ref(), 65_536)?;
            let super::sessions::Walk::Page { entries, next } = page else {
                // Deleted under the walk: only this agent deletes, so this is a concurrent
                // sessions command; the repair of the next sweep pass fills any gap.
                break;
            };
            for (external, _) in entries {
                let space = PortSpace::new(external.addr, external.proto);
                if let Some((_, slot)) = placed.iter().find(|(s, _)| *s == space) {
                    set_bit(self.mapped.entry(*slot), u16::from_be_bytes(external.port));
                }
            }
            match next {
                Some(n) => from = Some(n),
                None => break,
            }
        }
        for (space, slot) in placed {
            self.spaces
                .insert(space, slot, 0)
                .context("writing a PORT_SPACES entry")?;
            self.slots.insert(space, slot);
            debug!(address = %Ipv4Addr::from(space.addr), protocol = space.proto, slot, "free-port index created");
        }
        Ok(())
    }

    /// Snapshots of every index, taken when the sweep's bindings walk begins.
    pub fn snapshot(&self) -> BTreeMap<PortSpace, Box<PortBitmap>> {
        self.slots
            .iter()
            .map(|(space, &slot)| (*space, copy(self.mapped.entry(slot))))
            .collect()
    }

    /// Repairs every index after a complete bindings walk: `before` is the snapshot taken when
    /// the walk began, `claimed` what the walk saw. Sets the bits of claims the index missed;
    /// clears bits that were set before the walk, whose port the walk found unclaimed and
    /// `bindings` still has no claim for; recomputes summaries and top words. See the module
    /// docs for why that order is safe against concurrent claims.
    pub fn repair(
        &self,
        before: &BTreeMap<PortSpace, Box<PortBitmap>>,
        claimed: &Claimed,
        bindings: &dyn KvTable<Endpoint, Endpoint>,
    ) -> Result<Repair> {
        let mut report = Repair::default();
        let mut lookups = 0;
        let empty = [0u64; PORT_WORDS];
        for (space, &slot) in &self.slots {
            let b = self.mapped.entry(slot);
            let seen = claimed.get(space).map_or(&empty, |c| &**c);
            for w in 0..PORT_WORDS {
                let missing = seen[w] & !b[w].load(Ordering::SeqCst);
                if missing != 0 {
                    b[w].fetch_or(missing, Ordering::SeqCst);
                    report.set += u64::from(missing.count_ones());
                }
                let Some(old) = before.get(space) else {
                    continue;
                };
                let mut suspects = old.words[w] & !seen[w] & b[w].load(Ordering::SeqCst);
                while suspects != 0 && lookups < MAX_REPAIR_LOOKUPS {
                    let bit = suspects.trailing_zeros();
                    suspects &= suspects - 1;
                    let port = ((w as u32) << 6 | bit) as u16;
                    let external = Endpoint {
                        addr: space.addr,
                        port: port.to_be_bytes(),
                        proto: space.proto,
                        _pad: 0,
                    };
                    lookups += 1;
                    if bindings.get(&external)?.is_none() {
                        b[w].fetch_and(!(1u64 << bit), Ordering::SeqCst);
                        report.cleared += 1;
                    }
                }
            }
            // Summaries and the top word from the words as they are now. A word filled by the
            // kernel right after this read is marked by the kernel itself.
            for s in 0..SUMMARY_WORDS {
                let mut full = 0u64;
                for i in 0..64 {
                    if is_full(b[s * 64 + i].load(Ordering::SeqCst)) {
                        full |= 1 << i;
                    }
                }
                let summary = &b[PORT_WORDS + s];
                let now = summary.load(Ordering::SeqCst);
                if now & !full != 0 {
                    summary.fetch_and(full | !now, Ordering::SeqCst);
                }
                if full & !now != 0 {
                    summary.fetch_or(full, Ordering::SeqCst);
                }
                let top_bit = 1u64 << s;
                if is_full(summary.load(Ordering::SeqCst)) {
                    b[TOP].fetch_or(top_bit, Ordering::SeqCst);
                } else {
                    b[TOP].fetch_and(!top_bit, Ordering::SeqCst);
                }
            }
        }
        Ok(report)
    }
}

/// The spaces the SNAT rules hand out ports in: every pool address, and for MASQUERADE rules
/// the addresses of their egress interface (of every interface when the rule names none), each
/// with TCP, UDP and ICMP. `interface_addresses` is (interface name, address).
pub fn desired_spaces(
    sets: &BTreeMap<ipnet::Ipv4Net, SnatRuleSet>,
    pools: &[Pool],
    out_interfaces: &[Option<String>],
    interface_addresses: &[(String, Ipv4Addr)],
) -> BTreeSet<PortSpace> {
    let mut masquerade = BTreeSet::new();
    for set in sets.values() {
        let len = (set.len as usize).min(MAX_SNAT_RULES_PER_SET);
        for rule in &set.rules[..len] {
            if rule.action == SNAT_MASQUERADE {
                masquerade.insert(rule.pool as usize);
            }
        }
    }
    let mut addresses = BTreeSet::new();
    for (i, pool) in pools.iter().enumerate() {
        let n = (pool.len as usize).min(pool.addrs.len());
        addresses.extend(pool.addrs[..n].iter().copied());
        if masquerade.contains(&i) {
            let wanted = out_interfaces.get(i).and_then(Option::as_ref);
            for (name, addr) in interface_addresses {
                if wanted.is_none_or(|w| w == name) && !addr.is_loopback() {
                    addresses.insert(addr.octets());
                }
            }
        }
    }
    addresses
        .into_iter()
        .flat_map(|a| SNAT_PROTOCOLS.map(|p| PortSpace::new(a, p)))
        .collect()
}

/// The IPv4 addresses of this network namespace's interfaces: (name, address).
pub fn interface_addresses() -> Result<Vec<(String, Ipv4Addr)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error()).context("listing interface addresses");
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a valid sockaddr of the list; its family says how to read it.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET sockaddr is a sockaddr_in.
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        let addr = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        // SAFETY: a NUL-terminated name of the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        out.push((name, addr));
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nat_common::conntrack::SnatRule;

    #[test]
    fn pool_addresses_and_masquerade_interfaces_get_every_protocol() {
        let mut pool = Pool {
            len: 2,
            ..Default::default()
        };
        pool.addrs[0] = [203, 0, 113, 1];
        pool.addrs[1] = [203, 0, 113, 2];
        let masq = Pool::default();
        let mut set = SnatRuleSet {
            len: 2,
            ..Default::default()
        };
        set.rules[0] = SnatRule {
            pool: 0,
            ..Default::default()
        };
        set.rules[1] = SnatRule {
            pool: 1,
            action: SNAT_MASQUERADE,
            ..Default::default()
        };
        let sets = BTreeMap::from([("198.18.0.0/24".parse().unwrap(), set)]);
        let ifaces = vec![
            ("n1".to_string(), Ipv4Addr::new(203, 0, 113, 9)),
            ("n0".to_string(), Ipv4Addr::new(198, 18, 0, 1)),
            ("lo".to_string(), Ipv4Addr::LOCALHOST),
        ];
        let got = desired_spaces(&sets, &[pool, masq], &[None, Some("n1".into())], &ifaces);
        let addrs: BTreeSet<[u8; 4]> = got.iter().map(|s| s.addr).collect();
        assert_eq!(
            addrs,
            BTreeSet::from([[203, 0, 113, 1], [203, 0, 113, 2], [203, 0, 113, 9]])
        );
        assert_eq!(got.len(), 9);
        // Without an out_interface, every interface's address but loopback.
        let got = desired_spaces(&sets, &[pool, masq], &[None, None], &ifaces);
        assert_eq!(got.len(), 12);
    }

    #[test]
    fn atomics_keep_summary_and_top_exact() {
        let words: Vec<AtomicU64> = (0..BITMAP_WORDS).map(|_| AtomicU64::new(0)).collect();
        for p in 0..4096u16 {
            set_bit(&words, p);
        }
        assert_eq!(words[PORT_WORDS].load(Ordering::SeqCst), u64::MAX);
        assert_eq!(words[TOP].load(Ordering::SeqCst), 1);
        clear_bit(&words, 100);
        assert_eq!(words[TOP].load(Ordering::SeqCst), 0);
        assert_eq!(words[PORT_WORDS].load(Ordering::SeqCst), !(1 << 1));
        assert_eq!(words[1].load(Ordering::SeqCst), !(1 << (100 - 64)));
    }
}
