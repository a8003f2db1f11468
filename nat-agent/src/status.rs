//! What the local API reports about the agent as a whole: `GET /v1/status`, `GET /v1/stats`,
//! and the outcome of rule changes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ruleset::{RuleDiff, RuleKind};

/// Where a rule change came from (the `source` label of `xdpnat_config_applies_total`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ApplySource {
    /// The config file read at start-up.
    File,
    /// The local API (and so the CLI).
    Api,
    /// The config file re-read on SIGHUP.
    Sighup,
}

impl ApplySource {
    /// Every source, in label order.
    pub const ALL: [ApplySource; 3] = [ApplySource::File, ApplySource::Api, ApplySource::Sighup];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ApplySource::File => "file",
            ApplySource::Api => "api",
            ApplySource::Sighup => "sighup",
        }
    }
}

/// What a rule change did (or, for a dry run, would do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApplyReport {
    /// True when nothing was applied because only a report was asked for.
    pub dry_run: bool,
    /// True when the dataplane now runs the changed rules. False for a dry run and for a
    /// change that changes nothing.
    pub applied: bool,
    /// The generation of the rules in force after the request.
    pub generation: u64,
    /// The rules added, removed, changed and moved.
    pub changes: RuleDiff,
}

/// The last rule change that was applied or refused (dry runs are not recorded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LastApply {
    /// Where it came from.
    pub source: ApplySource,
    /// Whether it was applied.
    pub applied: bool,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Seconds since the Unix epoch.
    pub unix_time: u64,
}

/// An interface the program is attached to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InterfaceStatus {
    /// Kernel name.
    pub name: String,
    /// `native` or `generic`: the XDP mode actually attached; `tc` for an interface on the
    /// TC hook (`hook = "tc"`).
    pub xdp_mode: String,
}

/// Session table use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SessionsStatus {
    /// Sessions in the table, as of the last expiry sweep pass.
    pub in_use: u64,
    /// Capacity.
    pub capacity: u64,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Status {
    /// The agent's version.
    pub version: String,
    /// The config file the agent started from (and re-reads on SIGHUP).
    pub config: String,
    /// Seconds since the agent started.
    pub uptime_seconds: f64,
    /// Generation of the rules in force: 1 for the file read at start-up, one more for each
    /// change applied since.
    pub generation: u64,
    /// DNAT rules in force.
    pub dnat_rules: usize,
    /// SNAT rules in force.
    pub snat_rules: usize,
    /// Interfaces the program is attached to.
    pub interfaces: Vec<InterfaceStatus>,
    /// Session table use; absent when the program has no connection tracking.
    pub sessions: Option<SessionsStatus>,
    /// Rule changes applied and refused since start, by source.
    pub applies: Vec<ApplyCount>,
    /// The last rule change applied or refused.
    pub last_apply: Option<LastApply>,
}

/// Rule changes from one source with one outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApplyCount {
    /// Where they came from.
    pub source: ApplySource,
    /// `applied` or `refused`.
    pub result: String,
    /// How many.
    pub count: u64,
}

/// Counters of one rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RuleStats {
    /// The rule's name.
    pub name: String,
    /// Its table.
    pub kind: RuleKind,
    /// Packets in the original direction.
    pub original_packets: u64,
    /// Bytes (whole frames) in the original direction.
    pub original_bytes: u64,
    /// Packets in the reply direction.
    pub reply_packets: u64,
    /// Bytes in the reply direction.
    pub reply_bytes: u64,
}

/// `GET /v1/stats`: the dataplane's counters, summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Stats {
    /// Packets by exit reason (the `reason` label of `xdpnat_packets_total`).
    pub reasons: BTreeMap<String, u64>,
    /// Translated packets by forwarding result.
    pub forward: BTreeMap<String, u64>,
    /// Packets forwarded from XDP by where their route came from (the `result` label of
    /// `xdpnat_route_cache_total`: `hit`, `filled`).
    pub route_cache: BTreeMap<String, u64>,
    /// Counters of every rule in force, DNAT then SNAT, in priority order.
    pub rules: Vec<RuleStats>,
}

/// Applies and refusals counted by (source, applied).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyCounts(BTreeMap<(ApplySource, bool), u64>);

impl ApplyCounts {
    /// Counts one outcome.
    pub fn record(&mut self, source: ApplySource, applied: bool) {
        *self.0.entry((source, applied)).or_default() += 1;
    }

    /// Every (source, result label, count), zeros included, so the series exist from the
    /// start and alerts on `increase()` see the first refusal.
    pub fn all(&self) -> Vec<ApplyCount> {
        let mut out = Vec::new();
        for source in ApplySource::ALL {
            for applied in [true, false] {
                out.push(ApplyCount {
                    source,
                    result: if applied { "applied" } else { "refused" }.to_string(),
                    count: self.0.get(&(source, applied)).copied().unwrap_or(0),
                });
            }
        }
        out
    }
}
