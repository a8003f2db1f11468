//! The maps this program shares with the agent. Names and sizes come from `nat_common::maps`
//! so both sides agree; the agent fills the tries and reads the counters.

use aya_ebpf::{
    macros::map,
    maps::{LpmTrie, PerCpuArray},
};
use nat_common::{
    maps::{MAX_DNAT_PREFIXES, MAX_RULES},
    rules::NatRuleSet,
    stats::{Reason, RuleCounters},
};

/// Destination prefix (network order) -> DNAT rules that can apply to it, in priority order.
#[map(name = "DNAT_FORWARD")]
pub static DNAT_FORWARD: LpmTrie<[u8; 4], NatRuleSet> =
    LpmTrie::with_max_entries(MAX_DNAT_PREFIXES, 0);

/// Source prefix (network order) of backends -> reverse rules restoring the VIP on replies.
#[map(name = "DNAT_REVERSE")]
pub static DNAT_REVERSE: LpmTrie<[u8; 4], NatRuleSet> =
    LpmTrie::with_max_entries(MAX_DNAT_PREFIXES, 0);

/// Per-rule packet and byte counters, indexed by the rule's counter slot.
#[map(name = "RULE_COUNTERS")]
pub static RULE_COUNTERS: PerCpuArray<RuleCounters> = PerCpuArray::with_max_entries(MAX_RULES, 0);

/// Packets per exit [`Reason`].
#[map(name = "REASON_COUNTERS")]
pub static REASON_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);
