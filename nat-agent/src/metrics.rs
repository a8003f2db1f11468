//! Prometheus metrics, rendered from a counter snapshot at scrape time.
//!
//! The kernel keeps the authoritative counters in per-CPU maps; the agent only reads them when
//! scraped, so there is no per-packet cost in user space and nothing to drift. Names follow one
//! prefix (`xdpnat_`), base units and `_total` on counters; no per-flow labels.

use std::time::Duration;

use anyhow::{Context, Result};
use prometheus::{
    Encoder, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::{
    dataplane::StatsSnapshot,
    gc::{protocol_name, PortUse, ProtoCounts},
    model::Hook,
};
use nat_common::{
    route_cache::RouteCacheResult,
    stats::{ForwardResult, Reason},
};

pub use crate::ruleset::RuleKind;

/// A configured rule and its counter slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    /// Rule name (the `rule` label).
    pub name: String,
    /// `RULE_COUNTERS` slot.
    pub slot: u32,
    /// DNAT or SNAT.
    pub kind: RuleKind,
}

/// Connection-tracking figures, from the expiry sweep.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConntrackView {
    /// Sessions in use (counted by the last complete sweep pass).
    pub sessions: u64,
    /// Session table capacity.
    pub capacity: u64,
    /// Ports in use and capacity per external address and protocol.
    pub ports: Vec<PortUse>,
    /// Sessions expired since start, by protocol.
    pub expiries: ProtoCounts,
    /// Sweep runs since start.
    pub gc_runs: u64,
    /// Duration of the last sweep run.
    pub gc_last_duration: Duration,
    /// Slots of the session filter counting at least one session-table key (see
    /// `nat_common::session_filter`); 0 for an object without the filter.
    pub filter_slots_in_use: u64,
}

/// Everything a scrape reports, gathered by the task that owns the maps.
#[derive(Debug, Clone, Default)]
pub struct ScrapeView {
    /// Counter values.
    pub stats: StatsSnapshot,
    /// Every configured rule.
    pub rules: Vec<RuleInfo>,
    /// (interface, hook and XDP mode actually attached).
    pub attachments: Vec<(String, Hook)>,
    /// Generation of the config in force (1 for the first applied).
    pub generation: u64,
    /// Connection tracking; `None` when the loaded object has none.
    pub conntrack: Option<ConntrackView>,
    /// Rule changes applied and refused, by source.
    pub applies: Vec<crate::status::ApplyCount>,
    /// Event log records dropped (ring or queue full); `None` when the event log is off.
    pub events_dropped: Option<u64>,
}

/// The registered metric families.
pub struct Metrics {
    registry: Registry,
    packets: IntCounterVec,
    forward: IntCounterVec,
    route_cache: IntCounterVec,
    rule_packets: IntCounterVec,
    rule_bytes: IntCounterVec,
    rules: IntGaugeVec,
    attached: IntGaugeVec,
    generation: IntGauge,
    applies: IntCounterVec,
    events_dropped: IntCounter,
    sessions: IntGauge,
    sessions_capacity: IntGauge,
    filter_slots_in_use: IntGauge,
    ports_in_use: IntGaugeVec,
    ports_capacity: IntGaugeVec,
    allocation_failures: IntCounter,
    refused: IntCounterVec,
    expiries: IntCounterVec,
    gc_runs: IntCounter,
    gc_last_duration: Gauge,
}

/// Reasons a new flow is refused for lack of room, and their `reason` label.
const REFUSALS: [(Reason, &str); 2] = [
    (Reason::TableFull, "table_full"),
    (Reason::SessionClash, "session_clash"),
];

impl Metrics {
    /// Registers the metric families.
    pub fn new() -> Result<Self> {
        let registry = Registry::new();
        let packets = IntCounterVec::new(
            Opts::new(
                "xdpnat_packets_total",
                "Packets seen by the XDP program, by exit reason and the action it took",
            ),
            &["reason", "action"],
        )?;
        let forward = IntCounterVec::new(
            Opts::new(
                "xdpnat_forward_total",
                "Translated packets by what happened next: left from XDP (redirected, \
                 transmitted) or handed to the kernel, and why",
            ),
            &["result"],
        )?;
        let route_cache = IntCounterVec::new(
            Opts::new(
                "xdpnat_route_cache_total",
                "Packets forwarded from XDP by where their route came from: the route cache \
                 (hit) or a FIB lookup whose answer was remembered (filled)",
            ),
            &["result"],
        )?;
        let rule_packets = IntCounterVec::new(
            Opts::new("xdpnat_rule_packets_total", "Packets translated by a rule"),
            &["rule", "direction"],
        )?;
        let rule_bytes = IntCounterVec::new(
            Opts::new(
                "xdpnat_rule_bytes_total",
                "Bytes (whole frames) translated by a rule",
            ),
            &["rule", "direction"],
        )?;
        let rules = IntGaugeVec::new(Opts::new("xdpnat_rules", "Rules in force"), &["kind"])?;
        let attached = IntGaugeVec::new(
            Opts::new(
                "xdpnat_interface_attached",
                "1 for each interface the program is attached to, with the mode it got",
            ),
            &["interface", "mode"],
        )?;
        let generation = IntGauge::new(
            "xdpnat_config_generation",
            "Generation number of the config in force",
        )?;
        let applies = IntCounterVec::new(
            Opts::new(
                "xdpnat_config_applies_total",
                "Rule changes by source (file at start, api, sighup) and result (applied, \
                 refused; a refused change leaves the rules in force untouched)",
            ),
            &["source", "result"],
        )?;
        let events_dropped = IntCounter::new(
            "xdpnat_events_dropped_total",
            "NAT event log records dropped because the kernel ring or the agent's queue was \
             full (0 when the event log is off)",
        )?;
        let info = IntGaugeVec::new(
            Opts::new("xdpnat_build_info", "Agent build information"),
            &["version"],
        )?;
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let sessions = IntGauge::new("xdpnat_sessions", "Sessions in use")?;
        let sessions_capacity = IntGauge::new(
            "xdpnat_sessions_capacity",
            "Sessions the table can hold (max_sessions)",
        )?;
        let filter_slots_in_use = IntGauge::new(
            "xdpnat_session_filter_slots_in_use",
            "Slots of the session filter (of 65536) counting at least one session key: a packet \
             whose slot is empty skips the session lookups",
        )?;
        let ports_in_use = IntGaugeVec::new(
            Opts::new(
                "xdpnat_snat_ports_in_use",
                "External ports claimed, per external address and protocol",
            ),
            &["address", "protocol"],
        )?;
        let ports_capacity = IntGaugeVec::new(
            Opts::new(
                "xdpnat_snat_ports_capacity",
                "External ports the SNAT rules can hand out, per external address and protocol",
            ),
            &["address", "protocol"],
        )?;
        let allocation_failures = IntCounter::new(
            "xdpnat_snat_allocation_failures_total",
            "New flows refused for want of an external port (packets_total reasons no_port, \
             ports_contended, no_port_probed)",
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "xdpnat_sessions_refused_total",
                "New flows refused a session: table full, or reply tuple already taken",
            ),
            &["reason"],
        )?;
        let expiries = IntCounterVec::new(
            Opts::new(
                "xdpnat_session_expiries_total",
                "Sessions deleted by the expiry sweep after their idle timeout",
            ),
            &["protocol"],
        )?;
        let gc_runs = IntCounter::new(
            "xdpnat_gc_runs_total",
            "Runs of the expiry sweep (each visits a bounded number of entries)",
        )?;
        let gc_last_duration = Gauge::new(
            "xdpnat_gc_last_duration_seconds",
            "Duration of the last expiry sweep run",
        )?;
        for c in [
            &packets,
            &forward,
            &route_cache,
            &rule_packets,
            &rule_bytes,
            &refused,
            &expiries,
            &applies,
        ] {
            registry.register(Box::new(c.clone()))?;
        }
        for g in [&rules, &attached, &info, &ports_in_use, &ports_capacity] {
            registry.register(Box::new(g.clone()))?;
        }
        for g in [
            &generation,
            &sessions,
            &sessions_capacity,
            &filter_slots_in_use,
        ] {
            registry.register(Box::new(g.clone()))?;
        }
        for c in [&allocation_failures, &gc_runs, &events_dropped] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(gc_last_duration.clone()))?;
        Ok(Self {
            registry,
            packets,
            forward,
            route_cache,
            rule_packets,
            rule_bytes,
            rules,
            attached,
            generation,
            applies,
            events_dropped,
            sessions,
            sessions_capacity,
            filter_slots_in_use,
            ports_in_use,
            ports_capacity,
            allocation_failures,
            refused,
            expiries,
            gc_runs,
            gc_last_duration,
        })
    }

    /// Renders `view` in the Prometheus text format. Families are reset first so rules and
    /// interfaces that went away disappear.
    pub fn render(&self, view: &ScrapeView) -> Result<String> {
        set_by_index(
            &self.forward,
            ForwardResult::ALL.map(|r| (r as usize, r.name())),
            &view.stats.forward,
        );
        set_by_index(
            &self.route_cache,
            RouteCacheResult::ALL.map(|r| (r as usize, r.name())),
            &view.stats.route_cache,
        );
        self.packets.reset();
        for reason in Reason::ALL {
            let value = view
                .stats
                .reasons
                .get(reason as usize)
                .copied()
                .unwrap_or(0);
            self.packets
                .with_label_values(&[reason.name(), reason.action().name()])
                .inc_by(value);
        }
        self.rule_packets.reset();
        self.rule_bytes.reset();
        for RuleInfo { name, slot, .. } in &view.rules {
            let c = view.stats.rules.get(slot).copied().unwrap_or_default();
            for (direction, packets, bytes) in [
                ("original", c.orig_packets, c.orig_bytes),
                ("reply", c.reply_packets, c.reply_bytes),
            ] {
                self.rule_packets
                    .with_label_values(&[name.as_str(), direction])
                    .inc_by(packets);
                self.rule_bytes
                    .with_label_values(&[name.as_str(), direction])
                    .inc_by(bytes);
            }
        }
        self.rules.reset();
        for kind in [RuleKind::Dnat, RuleKind::Snat] {
            let n = view.rules.iter().filter(|r| r.kind == kind).count();
            self.rules.with_label_values(&[kind.as_str()]).set(n as i64);
        }
        self.attached.reset();
        for (iface, hook) in &view.attachments {
            self.attached
                .with_label_values(&[iface.as_str(), hook.mode()])
                .set(1);
        }
        self.generation.set(view.generation as i64);
        self.events_dropped.reset();
        self.events_dropped.inc_by(view.events_dropped.unwrap_or(0));
        self.applies.reset();
        for a in &view.applies {
            self.applies
                .with_label_values(&[a.source.as_str(), a.result.as_str()])
                .inc_by(a.count);
        }
        self.render_conntrack(view);

        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .context("encoding metrics")?;
        String::from_utf8(out).context("metrics are not UTF-8")
    }
}

impl Metrics {
    fn render_conntrack(&self, view: &ScrapeView) {
        let reason = |r: Reason| view.stats.reasons.get(r as usize).copied().unwrap_or(0);
        self.allocation_failures.reset();
        self.allocation_failures.inc_by(
            Reason::PORT_ALLOCATION_FAILURES
                .iter()
                .map(|&r| reason(r))
                .sum(),
        );
        self.refused.reset();
        for (r, label) in REFUSALS {
            self.refused.with_label_values(&[label]).inc_by(reason(r));
        }
        self.ports_in_use.reset();
        self.ports_capacity.reset();
        self.expiries.reset();
        self.gc_runs.reset();
        let Some(ct) = &view.conntrack else {
            self.sessions.set(0);
            self.sessions_capacity.set(0);
            self.filter_slots_in_use.set(0);
            self.gc_last_duration.set(0.0);
            return;
        };
        self.sessions.set(clamp_i64(ct.sessions));
        self.sessions_capacity.set(clamp_i64(ct.capacity));
        self.filter_slots_in_use
            .set(clamp_i64(ct.filter_slots_in_use));
        for p in &ct.ports {
            let labels = [p.address.to_string(), protocol_name(p.protocol).to_string()];
            let labels = [labels[0].as_str(), labels[1].as_str()];
            self.ports_in_use
                .with_label_values(&labels)
                .set(clamp_i64(p.in_use));
            self.ports_capacity
                .with_label_values(&labels)
                .set(clamp_i64(p.capacity));
        }
        for (protocol, n) in ct.expiries.labelled() {
            self.expiries.with_label_values(&[protocol]).inc_by(n);
        }
        self.gc_runs.inc_by(ct.gc_runs);
        self.gc_last_duration.set(ct.gc_last_duration.as_secs_f64());
    }
}

/// Gauges are i64; counts never get near the limit, but never wrap either.
fn clamp_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Resets a one-label counter family and sets it from per-index counts: label `name` gets
/// `counts[index]` for each `(index, name)` (a count the snapshot lacks reads 0).
fn set_by_index(
    family: &IntCounterVec,
    labels: impl IntoIterator<Item = (usize, &'static str)>,
    counts: &[u64],
) {
    family.reset();
    for (index, name) in labels {
        family
            .with_label_values(&[name])
            .inc_by(counts.get(index).copied().unwrap_or(0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::XdpMode;
    use nat_common::stats::RuleCounters;

    #[test]
    fn renders_rule_and_reason_counters() {
        let m = Metrics::new().unwrap();
        let mut view = ScrapeView {
            rules: vec![RuleInfo {
                name: "web".into(),
                slot: 3,
                kind: RuleKind::Dnat,
            }],
            attachments: vec![
                ("n0".into(), Hook::Xdp(XdpMode::Native)),
                ("n1".into(), Hook::Tc),
            ],
            generation: 1,
            ..Default::default()
        };
        view.stats.reasons = vec![0; Reason::COUNT as usize];
        view.stats.reasons[Reason::NoMatch as usize] = 42;
        view.stats.rules.insert(
            3,
            RuleCounters {
                orig_packets: 5,
                orig_bytes: 500,
                reply_packets: 4,
                reply_bytes: 400,
            },
        );
        let text = m.render(&view).unwrap();
        assert!(
            text.contains("xdpnat_packets_total{action=\"pass\",reason=\"no_match\"} 42"),
            "{text}"
        );
        assert!(text.contains("xdpnat_rule_packets_total{direction=\"original\",rule=\"web\"} 5"));
        assert!(text.contains("xdpnat_rule_bytes_total{direction=\"reply\",rule=\"web\"} 400"));
        assert!(text.contains("xdpnat_interface_attached{interface=\"n0\",mode=\"native\"} 1"));
        assert!(text.contains("xdpnat_interface_attached{interface=\"n1\",mode=\"tc\"} 1"));
        // A second render after the rule is gone drops its series.
        view.rules.clear();
        let text = m.render(&view).unwrap();
        assert!(!text.contains("rule=\"web\""));
    }

    #[test]
    fn renders_connection_tracking() {
        use std::net::Ipv4Addr;
        let m = Metrics::new().unwrap();
        let mut view = ScrapeView {
            rules: vec![
                RuleInfo {
                    name: "web".into(),
                    slot: 0,
                    kind: RuleKind::Dnat,
                },
                RuleInfo {
                    name: "private-out".into(),
                    slot: 1,
                    kind: RuleKind::Snat,
                },
            ],
            conntrack: Some(ConntrackView {
                sessions: 12,
                capacity: 262_144,
                ports: vec![PortUse {
                    address: Ipv4Addr::new(203, 0, 113, 1),
                    protocol: 17,
                    in_use: 5,
                    capacity: 64_512,
                }],
                expiries: ProtoCounts {
                    tcp: 1,
                    udp: 2,
                    icmp: 3,
                    other: 0,
                },
                gc_runs: 9,
                gc_last_duration: Duration::from_millis(250),
                filter_slots_in_use: 17,
            }),
            ..Default::default()
        };
        view.stats.reasons = vec![0; Reason::COUNT as usize];
        view.stats.reasons[Reason::NoPort as usize] = 2;
        view.stats.reasons[Reason::PortsContended as usize] = 1;
        view.stats.reasons[Reason::NoPortProbed as usize] = 1;
        view.stats.reasons[Reason::TableFull as usize] = 6;
        view.stats.reasons[Reason::SessionClash as usize] = 7;
        let text = m.render(&view).unwrap();
        for line in [
            "xdpnat_sessions 12",
            "xdpnat_sessions_capacity 262144",
            "xdpnat_session_filter_slots_in_use 17",
            "xdpnat_snat_ports_in_use{address=\"203.0.113.1\",protocol=\"udp\"} 5",
            "xdpnat_snat_ports_capacity{address=\"203.0.113.1\",protocol=\"udp\"} 64512",
            "xdpnat_snat_allocation_failures_total 4",
            "xdpnat_sessions_refused_total{reason=\"table_full\"} 6",
            "xdpnat_sessions_refused_total{reason=\"session_clash\"} 7",
            "xdpnat_session_expiries_total{protocol=\"icmp\"} 3",
            "xdpnat_gc_runs_total 9",
            "xdpnat_gc_last_duration_seconds 0.25",
            "xdpnat_rules{kind=\"dnat\"} 1",
            "xdpnat_rules{kind=\"snat\"} 1",
            "xdpnat_rule_packets_total{direction=\"original\",rule=\"private-out\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
        // Counters are rendered from the snapshot, not accumulated across scrapes.
        let again = m.render(&view).unwrap();
        assert!(again.lines().any(|l| l == "xdpnat_gc_runs_total 9"));
        view.conntrack = None;
        let text = m.render(&view).unwrap();
        assert!(!text.contains("xdpnat_snat_ports_in_use{"), "{text}");
    }
}
