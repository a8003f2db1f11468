//! The connection-tracking tables as the agent sees them: a [`SessionStore`] over
//! `SESSIONS`, `REPLIES`, `MAPPINGS` and `BINDINGS`.
//!
//! The kernel only ever inserts into these tables; the agent is the only one that deletes
//! (expiry, `sessions delete`, `sessions flush`). The composite deletions that keep the tables
//! consistent ([`SessionStore::delete_session`], [`SessionStore::delete_mapping`]) are
//! provided methods, so the in-memory [`MemStore`] the tests use runs exactly the same logic
//! as the kernel store.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::AsFd,
    sync::Arc,
};

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, IterableMap, Map, MapData, MapError};
use nat_common::{
    conntrack::{Endpoint, FlowKey, Mapping, Session},
    ports::{PortBitmap, PortSpace},
    session_filter::Counted,
};

use super::{
    ports::{Claimed, PortIndex, Repair},
    session_filter::SessionFilter,
    sys::map_next_key,
};

/// One step of a resumable walk over a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Walk<K, V> {
    /// The key to resume from is gone (deleted since): walk again from the first entry.
    Lost,
    /// Entries in table order, starting with the resume key when one was given.
    Page {
        /// Up to `limit` entries.
        entries: Vec<(K, V)>,
        /// The key to resume from (not among `entries`); `None` at the end of the table.
        next: Option<K>,
    },
}

/// Point access and resumable walks over one hash table.
pub trait KvTable<K, V> {
    /// The value under `key`.
    fn get(&self, key: &K) -> Result<Option<V>>;
    /// Deletes `key`; `false` when it was not there.
    fn remove(&mut self, key: &K) -> Result<bool>;
    /// Up to `limit` (at least 1) entries from `from` (inclusive; the first entry when `None`).
    fn walk(&self, from: Option<&K>, limit: usize) -> Result<Walk<K, V>>;
}

/// The four connection-tracking tables.
pub trait SessionStore {
    /// `SESSIONS`: original-direction key -> session.
    fn sessions(&mut self) -> &mut dyn KvTable<FlowKey, Session>;
    /// `REPLIES`: reply-direction key -> original-direction key.
    fn replies(&mut self) -> &mut dyn KvTable<FlowKey, FlowKey>;
    /// `MAPPINGS`: inside endpoint -> external mapping.
    fn mappings(&mut self) -> &mut dyn KvTable<Endpoint, Mapping>;
    /// `BINDINGS`: external endpoint -> inside endpoint (the port claims).
    fn bindings(&mut self) -> &mut dyn KvTable<Endpoint, Endpoint>;

    /// Deletes one session: the `SESSIONS` entry first (so no packet finds a session without
    /// its reply entry's counterpart going away right after), then its `REPLIES` entry, keyed
    /// by `session.translated.reversed()`, but only if that entry still points at this session
    /// (a newer session may own the reply tuple by now). `false` when the session was gone.
    fn delete_session(&mut self, key: &FlowKey, session: &Session) -> Result<bool> {
        let removed = self.sessions().remove(key)?;
        let reply_key = session.translated.reversed();
        if self.replies().get(&reply_key)? == Some(*key) {
            self.replies().remove(&reply_key)?;
        }
        if removed {
            self.session_deleted(key, session);
        }
        Ok(removed)
    }

    /// Called once per session [`SessionStore::delete_session`] removed (expired by the sweep
    /// or deleted through the API), with the session as last read: the event log's hook.
    fn session_deleted(&mut self, _key: &FlowKey, _session: &Session) {}

    /// Deletes one endpoint mapping: the `MAPPINGS` entry first (no new session can pick it up
    /// after that), then the port claim in `BINDINGS`, keyed by `mapping.external`, but only if
    /// it is still this inside endpoint's claim, and then the claim's bit in the free-port
    /// index. `false` when the mapping was gone.
    fn delete_mapping(&mut self, inside: &Endpoint, mapping: &Mapping) -> Result<bool> {
        let removed = self.mappings().remove(inside)?;
        if self.bindings().get(&mapping.external)? == Some(*inside) {
            self.bindings().remove(&mapping.external)?;
            self.port_released(&mapping.external);
        }
        Ok(removed)
    }

    /// A port claim in `BINDINGS` was just deleted: its bit in the free-port index goes (see
    /// `dataplane::ports`). Tables without an index do nothing.
    fn port_released(&mut self, _external: &Endpoint) {}

    /// Copies of the free-port indexes, taken when the sweep's bindings walk begins.
    fn port_snapshot(&mut self) -> BTreeMap<PortSpace, Box<PortBitmap>> {
        BTreeMap::new()
    }

    /// Repairs the free-port indexes after a complete bindings walk (see
    /// [`PortIndex::repair`]).
    fn repair_ports(
        &mut self,
        _before: &BTreeMap<PortSpace, Box<PortBitmap>>,
        _claimed: &Claimed,
    ) -> Result<Repair> {
        Ok(Repair::default())
    }
}

/// A kernel hash map with typed, resumable access.
pub struct BpfTable<K: aya::Pod, V: aya::Pod> {
    name: &'static str,
    map: BpfHashMap<MapData, K, V>,
}

impl<K: aya::Pod, V: aya::Pod> BpfTable<K, V> {
    /// Wraps a map taken from the loaded object (aya checks type and key/value sizes).
    pub fn new(name: &'static str, map: Map) -> Result<Self> {
        let map = BpfHashMap::try_from(map)
            .with_context(|| format!("{name} is not a hash map of the expected layout"))?;
        Ok(Self { name, map })
    }

    fn next_key(&self, key: Option<&K>) -> Result<Option<K>> {
        map_next_key(self.map.map().fd().as_fd(), key)
            .with_context(|| format!("walking {}", self.name))
    }
}

impl<K: aya::Pod, V: aya::Pod> KvTable<K, V> for BpfTable<K, V> {
    fn get(&self, key: &K) -> Result<Option<V>> {
        match self.map.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.name)),
        }
    }

    fn remove(&mut self, key: &K) -> Result<bool> {
        match self.map.remove(key) {
            Ok(()) => Ok(true),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(false)
            }
            Err(e) => Err(e).with_context(|| format!("deleting from {}", self.name)),
        }
    }

    fn walk(&self, from: Option<&K>, limit: usize) -> Result<Walk<K, V>> {
        let limit = limit.max(1);
        let mut entries = Vec::with_capacity(limit.min(4096));
        let mut key = match from {
            // GET_NEXT_KEY from a missing key silently restarts at the first key: check first.
            Some(k) => match self.get(k)? {
                Some(v) => {
                    entries.push((*k, v));
                    *k
                }
                None => return Ok(Walk::Lost),
            },
            None => match self.next_key(None)? {
                None => {
                    return Ok(Walk::Page {
                        entries,
                        next: None,
                    })
                }
                Some(first) => match self.get(&first)? {
                    Some(v) => {
                        entries.push((first, v));
                        first
                    }
                    // Deleted between the two calls: only the agent deletes, so some other
                    // process is at work; restarting is the safe answer.
                    None => return Ok(Walk::Lost),
                },
            },
        };
        loop {
            let Some(next) = self.next_key(Some(&key))? else {
                return Ok(Walk::Page {
                    entries,
                    next: None,
                });
            };
            if entries.len() == limit {
                return Ok(Walk::Page {
                    entries,
                    next: Some(next),
                });
            }
            match self.get(&next)? {
                Some(v) => entries.push((next, v)),
                None => return Ok(Walk::Lost),
            }
            key = next;
        }
    }
}

/// `SESSIONS` or `REPLIES`: a table whose keys the session filter counts, so every entry it
/// deletes takes its count back (see `nat_common::session_filter`).
pub struct FilteredTable<V: aya::Pod> {
    table: BpfTable<FlowKey, V>,
    /// `None` for an object without the filter.
    filter: Option<Arc<SessionFilter>>,
    /// Which half of the filter's counters this table's keys count in.
    counted: Counted,
}

impl<V: aya::Pod> KvTable<FlowKey, V> for FilteredTable<V> {
    fn get(&self, key: &FlowKey) -> Result<Option<V>> {
        self.table.get(key)
    }

    fn remove(&mut self, key: &FlowKey) -> Result<bool> {
        let removed = self.table.remove(key)?;
        // After the delete, never before: until then the entry may still be found.
        if let (true, Some(filter)) = (removed, &self.filter) {
            filter.uncount(key, self.counted);
        }
        Ok(removed)
    }

    fn walk(&self, from: Option<&FlowKey>, limit: usize) -> Result<Walk<FlowKey, V>> {
        self.table.walk(from, limit)
    }
}

/// [`SessionStore`] over the kernel's maps, taken from the loaded object.
pub struct KernelSessions {
    sessions: FilteredTable<Session>,
    replies: FilteredTable<FlowKey>,
    mappings: BpfTable<Endpoint, Mapping>,
    bindings: BpfTable<Endpoint, Endpoint>,
    /// Where deleted sessions are reported when the event log is on.
    deleted: Option<crate::events::DeletionSink>,
    /// The free-port indexes; `None` for an object without them (allocation then probes).
    ports: Option<PortIndex>,
}

impl KernelSessions {
    /// Wraps the four maps.
    pub fn new(sessions: Map, replies: Map, mappings: Map, bindings: Map) -> Result<Self> {
        use nat_common::maps::{BINDINGS, MAPPINGS, REPLIES, SESSIONS};
        Ok(Self {
            sessions: FilteredTable {
                table: BpfTable::new(SESSIONS, sessions)?,
                filter: None,
                counted: Counted::Sessions,
            },
            replies: FilteredTable {
                table: BpfTable::new(REPLIES, replies)?,
                filter: None,
                counted: Counted::Replies,
            },
            mappings: BpfTable::new(MAPPINGS, mappings)?,
            bindings: BpfTable::new(BINDINGS, bindings)?,
            deleted: None,
            ports: None,
        })
    }

    /// Reports every deleted session to `sink` from now on (the event log).
    pub fn report_deletions(&mut self, sink: crate::events::DeletionSink) {
        self.deleted = Some(sink);
    }

    /// Adds the session filter: from now on every session and reply entry deleted takes its
    /// count back.
    pub fn with_filter(mut self, filter: SessionFilter) -> Self {
        let filter = Arc::new(filter);
        self.sessions.filter = Some(Arc::clone(&filter));
        self.replies.filter = Some(filter);
        self
    }

    /// The session filter, when the object has one.
    pub fn filter(&self) -> Option<&SessionFilter> {
        self.sessions.filter.as_deref()
    }

    /// Adds the free-port indexes.
    pub fn with_ports(mut self, ports: PortIndex) -> Self {
        self.ports = Some(ports);
        self
    }

    /// The free-port indexes, when the object has them.
    pub fn ports(&self) -> Option<&PortIndex> {
        self.ports.as_ref()
    }

    /// Makes the indexed spaces exactly `desired` (see [`PortIndex::set_spaces`]).
    pub fn set_port_spaces(&mut self, desired: &BTreeSet<PortSpace>) -> Result<()> {
        match &mut self.ports {
            Some(ports) => ports.set_spaces(desired, &self.bindings),
            None => Ok(()),
        }
    }
}

impl SessionStore for KernelSessions {
    fn sessions(&mut self) -> &mut dyn KvTable<FlowKey, Session> {
        &mut self.sessions
    }
    fn replies(&mut self) -> &mut dyn KvTable<FlowKey, FlowKey> {
        &mut self.replies
    }
    fn mappings(&mut self) -> &mut dyn KvTable<Endpoint, Mapping> {
        &mut self.mappings
    }
    fn bindings(&mut self) -> &mut dyn KvTable<Endpoint, Endpoint> {
        &mut self.bindings
    }
    fn session_deleted(&mut self, key: &FlowKey, session: &Session) {
        if let Some(sink) = &self.deleted {
            sink.report(key, session);
        }
    }
    fn port_released(&mut self, external: &Endpoint) {
        if let Some(ports) = &self.ports {
            ports.release(external);
        }
    }
    fn port_snapshot(&mut self) -> BTreeMap<PortSpace, Box<PortBitmap>> {
        self.ports
            .as_ref()
            .map(PortIndex::snapshot)
            .unwrap_or_default()
    }
    fn repair_ports(
        &mut self,
        before: &BTreeMap<PortSpace, Box<PortBitmap>>,
        claimed: &Claimed,
    ) -> Result<Repair> {
        match &self.ports {
            Some(ports) => ports.repair(before, claimed, &self.bindings),
            None => Ok(Repair::default()),
        }
    }
}

impl<K: Ord + Copy, V: Copy> KvTable<K, V> for BTreeMap<K, V> {
    fn get(&self, key: &K) -> Result<Option<V>> {
        Ok(BTreeMap::get(self, key).copied())
    }

    fn remove(&mut self, key: &K) -> Result<bool> {
        Ok(BTreeMap::remove(self, key).is_some())
    }

    fn walk(&self, from: Option<&K>, limit: usize) -> Result<Walk<K, V>> {
        let limit = limit.max(1);
        let mut iter = match from {
            Some(k) if !self.contains_key(k) => return Ok(Walk::Lost),
            Some(k) => self.range(*k..),
            None => self.range(..),
        };
        let entries: Vec<(K, V)> = iter.by_ref().take(limit).map(|(k, v)| (*k, *v)).collect();
        let next = iter.next().map(|(k, _)| *k);
        Ok(Walk::Page { entries, next })
    }
}

/// An in-memory [`SessionStore`]: the tests' stand-in for the kernel tables, and a way to
/// reason about the sweep without a kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemStore {
    /// `SESSIONS`.
    pub sessions: BTreeMap<FlowKey, Session>,
    /// `REPLIES`.
    pub replies: BTreeMap<FlowKey, FlowKey>,
    /// `MAPPINGS`.
    pub mappings: BTreeMap<Endpoint, Mapping>,
    /// `BINDINGS`.
    pub bindings: BTreeMap<Endpoint, Endpoint>,
}

impl MemStore {
    /// Inserts a session and its reply entry, as the kernel does on a flow's first packet.
    pub fn insert_session(&mut self, key: FlowKey, session: Session) {
        self.sessions.insert(key, session);
        self.replies.insert(session.translated.reversed(), key);
    }

    /// Inserts a mapping and its port claim, as the kernel does on a new inside endpoint.
    pub fn insert_mapping(&mut self, inside: Endpoint, mapping: Mapping) {
        self.mappings.insert(inside, mapping);
        self.bindings.insert(mapping.external, inside);
    }
}

impl SessionStore for MemStore {
    fn sessions(&mut self) -> &mut dyn KvTable<FlowKey, Session> {
        &mut self.sessions
    }
    fn replies(&mut self) -> &mut dyn KvTable<FlowKey, FlowKey> {
        &mut self.replies
    }
    fn mappings(&mut self) -> &mut dyn KvTable<Endpoint, Mapping> {
        &mut self.mappings
    }
    fn bindings(&mut self) -> &mut dyn KvTable<Endpoint, Endpoint> {
        &mut self.bindings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> FlowKey {
        FlowKey {
            src: [198, 18, 0, n],
            dst: [203, 0, 113, 5],
            sport: [0, n],
            dport: [0, 53],
            proto: 17,
            _pad: [0; 3],
        }
    }

    fn session(n: u8) -> Session {
        Session {
            translated: FlowKey {
                src: [203, 0, 113, 1],
                ..key(n)
            },
            ..Default::default()
        }
    }

    #[test]
    fn walks_resume_and_detect_a_lost_cursor() {
        let mut table: BTreeMap<FlowKey, Session> = (1..=5).map(|n| (key(n), session(n))).collect();
        let Walk::Page { entries, next } = table.walk(None, 2).unwrap() else {
            panic!()
        };
        assert_eq!(entries.len(), 2);
        assert_eq!(next, Some(key(3)));
        let Walk::Page { entries, next } = table.walk(next.as_ref(), 10).unwrap() else {
            panic!()
        };
        assert_eq!(entries.len(), 3);
        assert_eq!(next, None);
        table.remove(&key(3)).unwrap();
        assert_eq!(table.walk(Some(&key(3)), 10).unwrap(), Walk::Lost);
    }

    #[test]
    fn deleting_a_session_removes_its_reply_entry_only_if_it_points_back() {
        let mut store = MemStore::default();
        store.insert_session(key(1), session(1));
        store.insert_session(key(2), session(2));
        assert!(store.delete_session(&key(1), &session(1)).unwrap());
        assert_eq!(store.sessions.len(), 1);
        assert_eq!(store.replies.len(), 1);
        // A reply tuple taken over by another session stays with its owner.
        let reply = session(2).translated.reversed();
        store.replies.insert(reply, key(9));
        assert!(store.delete_session(&key(2), &session(2)).unwrap());
        assert_eq!(store.replies.get(&reply), Some(&key(9)));
        assert!(!store.delete_session(&key(2), &session(2)).unwrap());
    }
}
