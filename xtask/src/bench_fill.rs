//! Synthetic SNAT state: the sessions, reply entries, endpoint mappings and port claims a NAT
//! holds after a while, written straight into the kernel's maps so a table reaches 90% of
//! millions of entries in seconds.
//!
//! Why from user space and not by sending packets: the packets' way is a syscall per flow
//! plus the program's own probe loop, which at 90% port-pool use refuses a few percent of
//! flows (bounded probing), so the fill level would be a random walk instead of a given.
//! Here the level is exact and the layout is the kernel's own types (`nat_common::conntrack`),
//! and every population is checked against the program before it is measured
//! (`bench_kernel`): a synthetic session translates both ways, and a synthetic
//! mapping is reused by a new flow of its inside endpoint.
//!
//! The shape: `endpoints` inside endpoints, each with `per_endpoint` sessions (one per remote
//! destination) sharing its mapping, spread evenly over the pool's addresses (the program
//! maps a host to one address, RFC 4787 paired pooling, so hosts are picked per address) on
//! ports drawn at random from the pool's range.
//!
//! Addresses (test ranges only): synthetic inside hosts in 198.18.128.0/17, each carrying up to
//! `PORTS_PER_HOST` endpoints (inside ports), so even 16Mi sessions need only a few thousand
//! hosts; the measured new flows of `bench_kernel` come from 198.19.128.0/17, which the fill
//! never uses; pool addresses 203.0.113.1-64; remote destinations 198.51.100.x.

use std::{ops::Range, os::fd::AsFd};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{MapData, MapType};
use nat_agent::dataplane::{ports::PortIndex, session_filter::SessionFilter};
use nat_common::{
    conntrack::{pool_index_for, Endpoint, FlowKey, Mapping, Session, NO_RULE, SESSION_SNAT},
    ipv4::proto,
    maps::{BINDINGS, MAPPINGS, REPLIES, SESSIONS, SESSION_FILTER},
    session_filter::Counted,
};

use crate::{bench_packet::udp_key, bench_sys};

/// Ports of one address a pool can hold with the default range 1024-65535.
pub const PORTS_PER_ADDRESS: u32 = 64_512;
/// First port of every benchmark pool (the product's default range starts there).
pub const POOL_PORT_MIN: u16 = 1024;
/// Most addresses of a pool (`nat_common::conntrack::MAX_POOL_ADDRS`).
pub const MAX_POOL_ADDRESSES: u32 = 64;
/// Inside ports a synthetic host uses before the next host is taken.
const PORTS_PER_HOST: u32 = 1024;
/// First inside port of a synthetic host.
const HOST_PORT0: u16 = 30_000;
/// Synthetic inside hosts count up from 198.18.128.1 and stay below [`FILL_HOST_END`];
/// measured new flows come from [`MEASURED_HOSTS`] (198.19.128.0/17), so they can never hit a
/// synthetic mapping.
const FILL_HOST_BASE: u32 = u32::from_be_bytes([198, 18, 128, 1]);
/// End (exclusive) of the synthetic hosts: some 32000 candidates in 198.18.128.0/17, far more
/// than a pool of `MAX_POOL_ADDRESSES` x `PORTS_PER_ADDRESS` endpoints needs at
/// `PORTS_PER_HOST` endpoints per host (4032 hosts, plus one partial host per address).
const FILL_HOST_END: u32 = u32::from_be_bytes([198, 19, 0, 0]);
/// The inside hosts measured new flows come from (198.19.128.0/17): disjoint from the fill's
/// hosts, and from the fixed addresses of the benchmark's other configurations.
pub const MEASURED_HOSTS: Range<u32> =
    u32::from_be_bytes([198, 19, 128, 0])..u32::from_be_bytes([198, 20, 0, 0]);
const _: () = assert!(FILL_HOST_BASE < FILL_HOST_END && FILL_HOST_END <= MEASURED_HOSTS.start);
/// Remote destinations of synthetic sessions: 198.51.100.1, .2, ... port 443.
const REMOTE_BASE: [u8; 4] = [198, 51, 100, 1];
/// Most sessions per endpoint: one remote address each, 198.51.100.1 to .128.
pub const MAX_PER_ENDPOINT: u32 = 128;
const REMOTE_PORT: u16 = 443;
/// Entries per batch syscall: large enough to amortise the syscall, small enough to keep the
/// buffers in cache.
const BATCH: usize = 8192;

/// The SNAT pool a population lives in: `addresses` addresses from 203.0.113.1 up (at most
/// `MAX_POOL_ADDRESSES`, so 203.0.113.64 at most), each with ports `POOL_PORT_MIN..=port_max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolShape {
    /// Number of external addresses (1..=64).
    pub addresses: u32,
    /// Ports per address.
    pub ports: u32,
}

impl PoolShape {
    /// The smallest pool of whole addresses holding at least `ports` ports, spread evenly.
    pub fn holding(ports: u64) -> Result<Self> {
        let per = u64::from(PORTS_PER_ADDRESS);
        let addresses = ports.div_ceil(per).max(1);
        if addresses > u64::from(MAX_POOL_ADDRESSES) {
            bail!(
                "a pool of {ports} ports needs {addresses} addresses; a pool holds at most \
                 {MAX_POOL_ADDRESSES} x {PORTS_PER_ADDRESS}"
            );
        }
        let ports_each = ports.div_ceil(addresses).max(1);
        Ok(Self {
            addresses: addresses as u32,
            ports: ports_each as u32,
        })
    }

    /// Last port of the range.
    pub fn port_max(&self) -> u16 {
        POOL_PORT_MIN + (self.ports - 1) as u16
    }

    /// Ports in the whole pool.
    pub fn capacity(&self) -> u64 {
        u64::from(self.addresses) * u64::from(self.ports)
    }

    /// External address number `i`.
    pub fn address(&self, i: u32) -> [u8; 4] {
        (u32::from_be_bytes([203, 0, 113, 1]) + i).to_be_bytes()
    }

    /// The `[[snat]] to_address` list, as TOML.
    pub fn toml_addresses(&self) -> String {
        let list: Vec<String> = (0..self.addresses)
            .map(|i| {
                let [a, b, c, d] = self.address(i);
                format!("\"{a}.{b}.{c}.{d}\"")
            })
            .collect();
        format!("[{}]", list.join(", "))
    }
}

/// What to put in the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillSpec {
    /// Sessions to write.
    pub sessions: u64,
    /// Sessions per inside endpoint (remote destinations sharing one mapping).
    pub per_endpoint: u32,
    /// The pool the mappings take their ports from.
    pub pool: PoolShape,
}

impl FillSpec {
    /// Inside endpoints (= mappings = port claims).
    pub fn endpoints(&self) -> u64 {
        self.sessions.div_ceil(u64::from(self.per_endpoint))
    }
}

/// Deterministic pseudo-random numbers (SplitMix64): the same population every run, and no
/// dependency for it.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias is far below the benchmark's noise).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// One synthetic session, as the program would have written it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticFlow {
    /// The inside endpoint.
    pub inside: Endpoint,
    /// Its external endpoint.
    pub external: Endpoint,
    /// Original direction as it arrives (the `SESSIONS` key).
    pub key: FlowKey,
    /// Original direction after translation.
    pub translated: FlowKey,
}

/// A population's layout, kept so any of its sessions can be named again without storing
/// millions of keys: endpoint `g` lives on address `g % addresses` as that address's
/// `g / addresses`-th endpoint.
#[derive(Debug)]
pub struct Population {
    /// What was asked for.
    pub spec: FillSpec,
    /// Per pool address: the inside hosts it serves (each with up to `PORTS_PER_HOST` ports).
    hosts: Vec<Vec<[u8; 4]>>,
    /// Per pool address: its ports in random order; endpoint `k` of the address has `ports[k]`.
    ports: Vec<Vec<u16>>,
}

impl Population {
    /// Lays out `spec` (nothing touches the kernel yet).
    pub fn plan(spec: FillSpec, rng: &mut Rng) -> Result<Self> {
        let pool = spec.pool;
        let endpoints = spec.endpoints();
        if spec.per_endpoint == 0 || pool.addresses == 0 {
            bail!("bench bug: empty fill spec {spec:?}");
        }
        if spec.per_endpoint > MAX_PER_ENDPOINT || pool.addresses > MAX_POOL_ADDRESSES {
            bail!(
                "bench bug: fill spec {spec:?} leaves the benchmark's address ranges (at most \
                 {MAX_PER_ENDPOINT} sessions per endpoint, {MAX_POOL_ADDRESSES} pool addresses)"
            );
        }
        if endpoints > pool.capacity() {
            bail!(
                "{endpoints} endpoints do not fit a pool of {} ports",
                pool.capacity()
            );
        }
        let per_address = |a: u32| {
            (endpoints + u64::from(pool.addresses) - 1 - u64::from(a)) / u64::from(pool.addresses)
        };
        // Hosts: walk 198.18.128.1 upwards and give each host to the address the program's
        // paired pooling maps it to, until every address has hosts for all its endpoints.
        let need: Vec<u64> = (0..pool.addresses)
            .map(|a| per_address(a).div_ceil(u64::from(PORTS_PER_HOST)))
            .collect();
        let mut hosts: Vec<Vec<[u8; 4]>> = vec![Vec::new(); pool.addresses as usize];
        let mut missing: u64 = need.iter().sum();
        let mut candidate = FILL_HOST_BASE;
        while missing > 0 {
            let addr = candidate.to_be_bytes();
            candidate += 1;
            if candidate >= FILL_HOST_END {
                bail!("bench bug: ran out of synthetic host addresses");
            }
            let a = pool_index_for(addr, pool.addresses) as usize;
            if (hosts[a].len() as u64) < need[a] {
                hosts[a].push(addr);
                missing -= 1;
            }
        }
        // Ports: a random subset of each address's range, as a NAT that has run for a while
        // holds them (not a contiguous block, which would make probing look worse or better).
        let ports = (0..pool.addresses)
            .map(|a| {
                let mut range: Vec<u16> =
                    (0..pool.ports).map(|i| POOL_PORT_MIN + i as u16).collect();
                let take = per_address(a) as usize;
                // Partial Fisher-Yates: only the first `take` places are needed.
                for i in 0..take {
                    let j = i + rng.below((range.len() - i) as u64) as usize;
                    range.swap(i, j);
                }
                range.truncate(take);
                range
            })
            .collect();
        Ok(Self { spec, hosts, ports })
    }

    /// Session number `s` (`s < spec.sessions`).
    pub fn flow(&self, s: u64) -> SyntheticFlow {
        let pool = self.spec.pool;
        let g = s / u64::from(self.spec.per_endpoint);
        let j = (s % u64::from(self.spec.per_endpoint)) as u32;
        let a = (g % u64::from(pool.addresses)) as u32;
        let k = (g / u64::from(pool.addresses)) as usize;
        let host = self.hosts[a as usize][k / PORTS_PER_HOST as usize];
        let inside_port = HOST_PORT0 + (k % PORTS_PER_HOST as usize) as u16;
        let external_port = self.ports[a as usize][k];
        let remote = (u32::from_be_bytes(REMOTE_BASE) + j).to_be_bytes();
        let key = udp_key(host, inside_port, remote, REMOTE_PORT);
        let translated = udp_key(pool.address(a), external_port, remote, REMOTE_PORT);
        SyntheticFlow {
            inside: Endpoint {
                addr: host,
                port: inside_port.to_be_bytes(),
                proto: proto::UDP,
                _pad: 0,
            },
            external: Endpoint {
                addr: translated.src,
                port: translated.sport,
                proto: proto::UDP,
                _pad: 0,
            },
            key,
            translated,
        }
    }

    /// Whether session `s` is the first of its endpoint (the one that writes the mapping).
    fn first_of_endpoint(&self, s: u64) -> bool {
        s.is_multiple_of(u64::from(self.spec.per_endpoint))
    }

    /// Writes sessions `range` with their reply entries, mappings and port claims, and marks
    /// the claims in the free-port index (`index`, the agent's), as the program does after
    /// every claim. `snat_slot` is the counter slot of the SNAT rule the sessions claim to
    /// come from.
    ///
    /// Any prefix `0..n` of a population is itself a population at a lower fill level (the
    /// ports in use stay a random subset), which is how one table serves every fill level.
    pub fn write(
        &self,
        maps: &ConntrackMaps,
        range: Range<u64>,
        snat_slot: u32,
        index: Option<&PortIndex>,
    ) -> Result<()> {
        self.check_range(&range)?;
        let now = bench_sys::boottime_ns()?;
        let mut batch = Batch::default();
        for s in range {
            let f = self.flow(s);
            if self.first_of_endpoint(s) {
                batch.inside.push(f.inside);
                batch.mappings.push(Mapping {
                    external: f.external,
                    last_used_ns: now,
                });
                batch.external.push(f.external);
                batch.bindings.push(f.inside);
                if let Some(index) = index {
                    index.mark(&f.external);
                }
            }
            batch.session_keys.push(f.key);
            batch.sessions.push(Session {
                translated: f.translated,
                dnat_rule: NO_RULE,
                snat_rule: snat_slot,
                created_ns: now,
                last_seen_ns: now,
                flags: SESSION_SNAT,
                ..Session::default()
            });
            batch.reply_keys.push(f.translated.reversed());
            batch.replies.push(f.key);
            if batch.session_keys.len() == BATCH {
                batch.flush(maps)?;
            }
        }
        batch.flush(maps)
    }

    /// Deletes sessions `range` and everything [`Population::write`] wrote for them, in the
    /// agent's order: sessions first, then reply entries, mappings, port claims and their
    /// bits in the free-port index.
    pub fn delete(
        &self,
        maps: &ConntrackMaps,
        range: Range<u64>,
        index: Option<&PortIndex>,
    ) -> Result<()> {
        self.check_range(&range)?;
        let mut start = range.start;
        while start < range.end {
            let end = (start + BATCH as u64).min(range.end);
            let flows: Vec<SyntheticFlow> = (start..end).map(|s| self.flow(s)).collect();
            let firsts = (start..end).filter(|&s| self.first_of_endpoint(s));
            let endpoints: Vec<&SyntheticFlow> =
                firsts.map(|s| &flows[(s - start) as usize]).collect();
            let keys: Vec<FlowKey> = flows.iter().map(|f| f.key).collect();
            remove(&maps.sessions, SESSIONS, &keys)?;
            keys.iter()
                .for_each(|k| maps.filter.uncount(k, Counted::Sessions));
            let keys: Vec<FlowKey> = flows.iter().map(|f| f.translated.reversed()).collect();
            remove(&maps.replies, REPLIES, &keys)?;
            keys.iter()
                .for_each(|k| maps.filter.uncount(k, Counted::Replies));
            let keys: Vec<Endpoint> = endpoints.iter().map(|f| f.inside).collect();
            remove(&maps.mappings, MAPPINGS, &keys)?;
            let keys: Vec<Endpoint> = endpoints.iter().map(|f| f.external).collect();
            remove(&maps.bindings, BINDINGS, &keys)?;
            if let Some(index) = index {
                for external in &keys {
                    index.release(external);
                }
            }
            start = end;
        }
        Ok(())
    }

    /// A range must lie within the population and cut no endpoint's sessions apart (its
    /// mapping is written with its first session and deleted with it).
    fn check_range(&self, range: &Range<u64>) -> Result<()> {
        let aligned = |s: u64| self.first_of_endpoint(s) || s == self.spec.sessions;
        if range.end > self.spec.sessions || !aligned(range.start) || !aligned(range.end) {
            bail!(
                "bench bug: sessions {range:?} of a population of {} with {} per endpoint",
                self.spec.sessions,
                self.spec.per_endpoint
            );
        }
        Ok(())
    }
}

/// Entries waiting for their batch syscalls.
#[derive(Default)]
struct Batch {
    session_keys: Vec<FlowKey>,
    sessions: Vec<Session>,
    reply_keys: Vec<FlowKey>,
    replies: Vec<FlowKey>,
    inside: Vec<Endpoint>,
    mappings: Vec<Mapping>,
    external: Vec<Endpoint>,
    bindings: Vec<Endpoint>,
}

impl Batch {
    /// Writes and empties the buffers, in the order the program writes: the port claim, the
    /// mapping, the reply entry, then the session, each table's keys counted in the session
    /// filter before they are inserted (as the program counts them).
    fn flush(&mut self, maps: &ConntrackMaps) -> Result<()> {
        insert(
            &maps.bindings,
            BINDINGS,
            &mut self.external,
            &mut self.bindings,
        )?;
        insert(
            &maps.mappings,
            MAPPINGS,
            &mut self.inside,
            &mut self.mappings,
        )?;
        self.reply_keys
            .iter()
            .for_each(|k| maps.filter.count(k, Counted::Replies));
        insert(
            &maps.replies,
            REPLIES,
            &mut self.reply_keys,
            &mut self.replies,
        )?;
        self.session_keys
            .iter()
            .for_each(|k| maps.filter.count(k, Counted::Sessions));
        insert(
            &maps.sessions,
            SESSIONS,
            &mut self.session_keys,
            &mut self.sessions,
        )
    }
}

/// Inserts and empties `keys`/`values`. The keys are distinct by construction (the unit tests
/// check it), and a fresh map holds nothing to overwrite.
fn insert<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    name: &str,
    keys: &mut Vec<K>,
    values: &mut Vec<V>,
) -> Result<()> {
    bench_sys::update_batch(map.fd().as_fd(), keys, values)
        .with_context(|| format!("batch insert of {} entries into {name}", keys.len()))?;
    keys.clear();
    values.clear();
    Ok(())
}

/// The four connection-tracking maps of a loaded object and the session filter counting the
/// keys of two of them, opened by id from the new-flow program's own list of maps (so they are
/// this object's, whatever else is loaded), for batch writes and memory accounting. Reads and
/// deletes go through the agent's own `KernelSessions`.
pub struct ConntrackMaps {
    /// `SESSIONS`.
    pub sessions: MapData,
    /// `REPLIES`.
    pub replies: MapData,
    /// `MAPPINGS`.
    pub mappings: MapData,
    /// `BINDINGS`.
    pub bindings: MapData,
    /// `SESSION_FILTER`: every key written into or deleted from `SESSIONS` and `REPLIES` from
    /// here is counted or taken back in it, or the program would skip the sessions written.
    pub filter: SessionFilter,
}

impl ConntrackMaps {
    /// Opens the maps named in `map_ids` (a program's info) and checks their layouts.
    pub fn open(map_ids: &[u32]) -> Result<Self> {
        let mut found: [Option<MapData>; 5] = [None, None, None, None, None];
        let names = [SESSIONS, REPLIES, MAPPINGS, BINDINGS, SESSION_FILTER];
        for &id in map_ids {
            let map = MapData::from_id(id).with_context(|| format!("opening BPF map id {id}"))?;
            let info = map
                .info()
                .with_context(|| format!("BPF map id {id}: info"))?;
            if let Some(i) = names.iter().position(|n| info.name_as_str() == Some(*n)) {
                found[i] = Some(map);
            }
        }
        let [sessions, replies, mappings, bindings, filter] = found;
        let take = |m: Option<MapData>, name: &str| {
            m.ok_or_else(|| anyhow!("the new-flow program does not use a map named {name}"))
        };
        let maps = Self {
            sessions: take(sessions, SESSIONS)?,
            replies: take(replies, REPLIES)?,
            mappings: take(mappings, MAPPINGS)?,
            bindings: take(bindings, BINDINGS)?,
            filter: SessionFilter::new(aya::maps::Map::Array(take(filter, SESSION_FILTER)?))?,
        };
        // aya checks key and value sizes against the types: the batch writes rely on them.
        check_layout::<FlowKey, Session>(&maps.sessions, SESSIONS)?;
        check_layout::<FlowKey, FlowKey>(&maps.replies, REPLIES)?;
        check_layout::<Endpoint, Mapping>(&maps.mappings, MAPPINGS)?;
        check_layout::<Endpoint, Endpoint>(&maps.bindings, BINDINGS)?;
        Ok(maps)
    }

    /// Kernel memory of the four maps, bytes (`memlock` of each; preallocated, so it is the
    /// cost of the capacity, however full).
    pub fn memlock_bytes(&self) -> Result<u64> {
        let mut total = 0;
        for (map, name) in [
            (&self.sessions, SESSIONS),
            (&self.replies, REPLIES),
            (&self.mappings, MAPPINGS),
            (&self.bindings, BINDINGS),
        ] {
            total += bench_sys::memlock_bytes(map.fd().as_fd())
                .with_context(|| format!("memory of {name}"))?;
        }
        Ok(total)
    }

    /// Deletes what the new-flow insert floor (`xdp_bench_new_flow_inserts`) wrote for `keys`:
    /// each key in `SESSIONS`, its reverse in `REPLIES`, its source endpoint in `MAPPINGS` and
    /// `BINDINGS`. The floor counts nothing in the session filter, so nothing is taken back.
    pub fn remove_insert_floor(&self, keys: &[FlowKey]) -> Result<()> {
        let replies: Vec<FlowKey> = keys.iter().map(FlowKey::reversed).collect();
        let endpoints: Vec<Endpoint> = keys.iter().map(FlowKey::source).collect();
        remove(&self.sessions, SESSIONS, keys)?;
        remove(&self.replies, REPLIES, &replies)?;
        remove(&self.mappings, MAPPINGS, &endpoints)?;
        remove(&self.bindings, BINDINGS, &endpoints)
    }
}

/// Deletes `keys`, which must all be present.
fn remove<K: aya::Pod>(map: &MapData, name: &str, keys: &[K]) -> Result<()> {
    bench_sys::delete_batch(map.fd().as_fd(), keys)
        .with_context(|| format!("batch delete of {} entries from {name}", keys.len()))
}

fn check_layout<K: aya::Pod, V: aya::Pod>(map: &MapData, name: &str) -> Result<()> {
    let info = map.info().with_context(|| format!("{name}: info"))?;
    let (k, v) = (info.key_size(), info.value_size());
    if k as usize != size_of::<K>() || v as usize != size_of::<V>() {
        bail!(
            "{name} has {k}-byte keys and {v}-byte values; the benchmark writes {} and {}",
            size_of::<K>(),
            size_of::<V>()
        );
    }
    // A per-CPU or LRU map would take other value layouts or evict behind our back.
    let kind = info
        .map_type()
        .with_context(|| format!("{name}: map type"))?;
    if kind != MapType::Hash {
        bail!("{name} is a {kind:?} map; the benchmark writes a plain hash map");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn population(sessions: u64, per_endpoint: u32, pool_ports: u64) -> Population {
        let spec = FillSpec {
            sessions,
            per_endpoint,
            pool: PoolShape::holding(pool_ports).unwrap(),
        };
        Population::plan(spec, &mut Rng::new(7)).unwrap()
    }

    #[test]
    fn pools_are_whole_addresses_of_at_most_the_default_range() {
        assert_eq!(
            PoolShape::holding(64_512).unwrap(),
            PoolShape {
                addresses: 1,
                ports: 64_512
            }
        );
        let p = PoolShape::holding(4_000_000).unwrap();
        assert_eq!(p.addresses, 63);
        assert!(p.capacity() >= 4_000_000);
        assert!(u32::from(POOL_PORT_MIN) + p.ports - 1 <= 65_535);
        assert!(PoolShape::holding(64 * 64_512 + 1).is_err());
        assert_eq!(PoolShape::holding(4096).unwrap().port_max(), 5119);
    }

    #[test]
    fn flows_are_distinct_consistent_and_follow_paired_pooling() {
        let p = population(3000, 3, 4000);
        let (mut keys, mut replies, mut externals) =
            (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        let mut mapping_of = std::collections::BTreeMap::new();
        for s in 0..p.spec.sessions {
            let f = p.flow(s);
            assert!(keys.insert(f.key), "session key repeated: {f:?}");
            assert!(
                replies.insert(f.translated.reversed()),
                "reply key repeated"
            );
            // Endpoint-independent: every session of an inside endpoint has its one mapping.
            let prev = mapping_of.insert(f.inside, f.external);
            assert!(prev.is_none() || prev == Some(f.external));
            if p.first_of_endpoint(s) {
                assert!(externals.insert(f.external), "port claimed twice");
            }
            let a = pool_index_for(f.inside.addr, p.spec.pool.addresses);
            assert_eq!(f.external.addr, p.spec.pool.address(a));
            let port = u16::from_be_bytes(f.external.port);
            assert!((POOL_PORT_MIN..=p.spec.pool.port_max()).contains(&port));
            assert_eq!(f.translated.dst, f.key.dst);
        }
        assert_eq!(externals.len() as u64, p.spec.endpoints());
    }

    /// The project's address rule: inside hosts in 198.18.0.0/15, external and remote ones in
    /// 203.0.113.0/24 and 198.51.100.0/24; and the measured new flows' hosts are never the
    /// fill's. Checked on the biggest population the benchmark writes (16Mi scale point).
    #[test]
    fn addresses_stay_in_the_test_ranges_and_off_the_measured_hosts() {
        let in24 = |a: [u8; 4], net: [u8; 3]| a[..3] == net;
        let sessions = (16u64 << 20) * 90 / 100;
        let p = population(sessions, 8, 2 * sessions.div_ceil(8));
        assert_eq!(p.spec.pool.addresses, 59);
        let hosts: BTreeSet<[u8; 4]> = p.hosts.iter().flatten().copied().collect();
        assert!(hosts.len() < 2_000, "{} hosts", hosts.len());
        for h in &hosts {
            let n = u32::from_be_bytes(*h);
            assert!((FILL_HOST_BASE..FILL_HOST_END).contains(&n), "{h:?}");
            assert!(!MEASURED_HOSTS.contains(&n), "{h:?}");
            assert!(h[..2] == [198, 18] || h[..2] == [198, 19], "{h:?}");
        }
        for s in (0..p.spec.sessions)
            .step_by(997)
            .chain([p.spec.sessions - 1])
        {
            let f = p.flow(s);
            assert!(hosts.contains(&f.key.src), "{f:?}");
            assert!(in24(f.translated.src, [203, 0, 113]), "{f:?}");
            assert!(in24(f.key.dst, [198, 51, 100]), "{f:?}");
        }
        // The largest pool and fill: still room for the hosts.
        let full = population(64 * 64_512, 1, 64 * 64_512);
        let last = full.flow(full.spec.sessions - 1);
        assert!(in24(last.translated.src, [203, 0, 113]), "{last:?}");
        assert_eq!(
            (MEASURED_HOSTS.start.to_be_bytes(), MEASURED_HOSTS.end - 1),
            ([198, 19, 128, 0], u32::from_be_bytes([198, 19, 255, 255]))
        );
    }

    #[test]
    fn multi_address_pools_are_used_evenly() {
        let p = population(200_000, 1, 260_000);
        assert_eq!(p.spec.pool.addresses, 5);
        let mut per_address = [0u64; 5];
        for s in 0..p.spec.sessions {
            let f = p.flow(s);
            let a = (0..5).position(|i| p.spec.pool.address(i) == f.external.addr);
            per_address[a.unwrap()] += 1;
        }
        assert!(per_address.iter().all(|&n| n == 40_000), "{per_address:?}");
    }
}
