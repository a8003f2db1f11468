//! Names and sizes of the maps the kernel program declares; the agent opens them by these names.

/// LPM trie, key: destination prefix (network order), value: [`crate::rules::NatRuleSet`].
pub const DNAT_FORWARD: &str = "DNAT_FORWARD";
/// LPM trie, key: source prefix (network order), value: [`crate::rules::NatRuleSet`].
pub const DNAT_REVERSE: &str = "DNAT_REVERSE";
/// Per-CPU array indexed by rule counter slot, value: [`crate::stats::RuleCounters`].
pub const RULE_COUNTERS: &str = "RULE_COUNTERS";
/// Per-CPU array indexed by [`crate::stats::Reason`], value: packet count (u64).
pub const REASON_COUNTERS: &str = "REASON_COUNTERS";

/// Most distinct prefixes each DNAT trie holds.
pub const MAX_DNAT_PREFIXES: u32 = 16_384;
/// Rule counter slots: the most rules a config may have.
pub const MAX_RULES: u32 = 4_096;

/// The XDP program's name in the object.
pub const XDP_PROGRAM: &str = "xdp_nat";
