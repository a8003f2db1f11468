//! Prometheus metrics, rendered from a counter snapshot at scrape time.
//!
//! The kernel keeps the authoritative counters in per-CPU maps; the agent only reads them when
//! scraped, so there is no per-packet cost in user space and nothing to drift. Names follow one
//! prefix (`xdpnat_`), base units and `_total` on counters; no per-flow labels.

use anyhow::{Context, Result};
use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::{dataplane::StatsSnapshot, model::XdpMode};
use nat_common::stats::Reason;

/// Everything a scrape reports, gathered by the task that owns the maps.
#[derive(Debug, Clone, Default)]
pub struct ScrapeView {
    /// Counter values.
    pub stats: StatsSnapshot,
    /// (rule name, counter slot) of every configured rule.
    pub rules: Vec<(String, u32)>,
    /// (interface, mode actually attached).
    pub attachments: Vec<(String, XdpMode)>,
    /// Generation of the config in force (1 for the first applied).
    pub generation: u64,
}

/// The registered metric families.
pub struct Metrics {
    registry: Registry,
    packets: IntCounterVec,
    rule_packets: IntCounterVec,
    rule_bytes: IntCounterVec,
    rules: IntGaugeVec,
    attached: IntGaugeVec,
    generation: IntGauge,
}

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
        let info = IntGaugeVec::new(
            Opts::new("xdpnat_build_info", "Agent build information"),
            &["version"],
        )?;
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for c in [&packets, &rule_packets, &rule_bytes] {
            registry.register(Box::new(c.clone()))?;
        }
        for g in [&rules, &attached, &info] {
            registry.register(Box::new(g.clone()))?;
        }
        registry.register(Box::new(generation.clone()))?;
        Ok(Self {
            registry,
            packets,
            rule_packets,
            rule_bytes,
            rules,
            attached,
            generation,
        })
    }

    /// Renders `view` in the Prometheus text format. Families are reset first so rules and
    /// interfaces that went away disappear.
    pub fn render(&self, view: &ScrapeView) -> Result<String> {
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
        for (name, slot) in &view.rules {
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
        self.rules
            .with_label_values(&["dnat"])
            .set(view.rules.len() as i64);
        self.attached.reset();
        for (iface, mode) in &view.attachments {
            self.attached
                .with_label_values(&[iface.as_str(), mode.as_str()])
                .set(1);
        }
        self.generation.set(view.generation as i64);

        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .context("encoding metrics")?;
        String::from_utf8(out).context("metrics are not UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nat_common::stats::RuleCounters;

    #[test]
    fn renders_rule_and_reason_counters() {
        let m = Metrics::new().unwrap();
        let mut view = ScrapeView {
            rules: vec![("web".into(), 3)],
            attachments: vec![("n0".into(), XdpMode::Native)],
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
        // A second render after the rule is gone drops its series.
        view.rules.clear();
        let text = m.render(&view).unwrap();
        assert!(!text.contains("rule=\"web\""));
    }
}
