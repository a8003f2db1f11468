//! Counter updates. Per-CPU maps need no atomics: each CPU owns its slot.

use aya_ebpf::maps::PerCpuArray;
use aya_log_ebpf::error;
use nat_common::stats::Reason;

use crate::{
    maps::{REASON_COUNTERS, RULE_COUNTERS},
    packet::Frame,
};

/// Adds one to slot `index` of the per-CPU counter array `counters` (an index beyond it counts
/// nothing: the agent sizes every counter array from the same enums).
#[inline(always)]
pub fn increment(counters: &PerCpuArray<u64>, index: u32) {
    if let Some(c) = counters.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a successful per-CPU lookup and is only used on this CPU.
        unsafe { *c += 1 };
    }
}

/// Counts one packet leaving by `reason`.
#[inline(always)]
pub fn count_reason(reason: Reason) {
    increment(&REASON_COUNTERS, reason as u32);
}

/// Direction of a translation, for the per-rule counters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Towards the backend (destination rewritten).
    Original,
    /// From the backend (source rewritten).
    Reply,
}

/// Adds one packet of `bytes` to rule slot `index`.
#[inline(always)]
pub fn count_rule<C: Frame>(ctx: &C, index: u32, direction: Direction, bytes: u64) {
    let Some(c) = RULE_COUNTERS.get_ptr_mut(index) else {
        // Only an agent bug (a slot beyond the map) gets here; worth a log line, not a branch
        // per packet in the metrics.
        error!(ctx, "rule counter slot {} out of range", index);
        return;
    };
    {
        // SAFETY: as in `increment`.
        let c = unsafe { &mut *c };
        match direction {
            Direction::Original => {
                c.orig_packets += 1;
                c.orig_bytes += bytes;
            }
            Direction::Reply => {
                c.reply_packets += 1;
                c.reply_bytes += bytes;
            }
        }
    }
}
