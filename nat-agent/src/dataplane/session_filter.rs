//! The agent's side of the session filter (`nat_common::session_filter`): taking back the
//! count of every `SESSIONS` and `REPLIES` entry it deletes, and reading how full the filter
//! is.
//!
//! `SESSION_FILTER` is a `BPF_F_MMAPABLE` array of counters (see [`MappedArray`]), each with a
//! half per table ([`Counted`]): the kernel adds with BPF atomics, the agent subtracts with
//! `AtomicU64::fetch_update` on the same words.
//! A count is taken back only after its entry was deleted, so between the two a packet pays a
//! lookup that misses; never the other way round.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Result};
use aya::maps::Map;
use nat_common::{
    conntrack::FlowKey,
    maps::SESSION_FILTER,
    session_filter::{slot, Counted, SESSION_FILTER_SLOTS},
};
use tracing::warn;

use super::mapped::MappedArray;

/// `SESSION_FILTER`, mapped.
pub struct SessionFilter {
    mapped: MappedArray,
    /// Deletes that found their slot at zero already (see [`SessionFilter::uncount`]).
    underflows: AtomicU64,
}

impl SessionFilter {
    /// Wraps the map taken from the loaded object.
    pub fn new(map: Map) -> Result<Self> {
        let mapped = MappedArray::new(map, SESSION_FILTER, 8)?;
        if mapped.slots() != SESSION_FILTER_SLOTS {
            bail!(
                "{SESSION_FILTER} has {} slots, the agent expects {SESSION_FILTER_SLOTS}",
                mapped.slots()
            );
        }
        Ok(SessionFilter {
            mapped,
            underflows: AtomicU64::new(0),
        })
    }

    fn counter(&self, key: &FlowKey) -> &AtomicU64 {
        &self.mapped.entry(slot(key))[0]
    }

    /// Counts `key` for `table`, about to be inserted into it from user space (a benchmark
    /// filling the tables).
    pub fn count(&self, key: &FlowKey, table: Counted) {
        self.counter(key).fetch_add(table.unit(), Ordering::SeqCst);
    }

    /// Takes back the count of `key` in `table`, whose entry was just deleted.
    ///
    /// A half already at zero stays at zero and the event is counted: some entry was inserted
    /// without being counted (only a tool writing the tables behind the program's back can do
    /// that). Subtracting anyway would borrow from the other table's half, or turn the next
    /// count back into a zero for a slot whose entry exists.
    pub fn uncount(&self, key: &FlowKey, table: Counted) {
        let result = self
            .counter(key)
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (table.count_in(n) != 0).then(|| n - table.unit())
            });
        if result.is_err() && self.underflows.fetch_add(1, Ordering::Relaxed) == 0 {
            warn!(
                "{SESSION_FILTER}: a deleted session-table entry had not been counted; \
                 something writes the tables behind the program's back"
            );
        }
    }

    /// Slots counting at least one entry: at [`SESSION_FILTER_SLOTS`], nothing is skipped any
    /// more.
    pub fn slots_in_use(&self) -> u32 {
        (0..self.mapped.slots())
            .filter(|&s| self.count_at(s) != 0)
            .count() as u32
    }

    /// The counter of `slot`, both halves (see [`Counted::count_in`]).
    ///
    /// # Panics
    /// When `slot` is not below [`SESSION_FILTER_SLOTS`].
    pub fn count_at(&self, slot: u32) -> u64 {
        self.mapped.entry(slot)[0].load(Ordering::SeqCst)
    }

    /// Deletes that found their slot at zero already.
    pub fn underflows(&self) -> u64 {
        self.underflows.load(Ordering::Relaxed)
    }
}
