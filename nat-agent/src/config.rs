//! The config file as written by the operator (TOML), before validation.
//!
//! These types mirror the file one to one so that serde reports unknown or mistyped fields with
//! their location; [`crate::model`] turns them into the validated model the dataplane uses.

use std::{fmt, path::Path};

use serde::{Deserialize, Serialize};

/// The whole config file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Agent-wide settings.
    #[serde(default)]
    pub agent: AgentSection,
    /// Interfaces the XDP program is attached to.
    #[serde(default)]
    pub interfaces: Vec<InterfaceEntry>,
    /// Destination NAT rules, in priority order (first match wins).
    #[serde(default)]
    pub dnat: Vec<DnatEntry>,
    /// Source NAT rules, in priority order (first match wins).
    #[serde(default)]
    pub snat: Vec<SnatEntry>,
    /// Traffic passed to the kernel untouched before sessions and rules (health probes,
    /// management access).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bypass: Vec<BypassEntry>,
    /// Connection tracking: table size, timeouts, expiry sweep.
    #[serde(default)]
    pub conntrack: ConntrackSection,
    /// Announcing the VIPs through the host's routing daemon.
    #[serde(default)]
    pub announce: AnnounceSection,
    /// The NAT event log.
    #[serde(default)]
    pub events: EventsSection,
}

/// `[events]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EventsSection {
    /// `"stdout"` or an absolute file path: one JSON line per session created or deleted.
    /// Off when absent.
    pub log: Option<String>,
}

/// `[announce]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AnnounceSection {
    /// Keep a kernel route (blackhole, protocol 250 `xdpnat`) per DNAT destination prefix while
    /// the program translates, for a routing daemon to redistribute (see `announce.rs`).
    pub vip_routes: Option<bool>,
}

/// `[agent]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// `address:port` of the Prometheus metrics listener; no listener when absent.
    pub metrics_listen: Option<String>,
    /// Path of the local API's unix socket; a default when absent.
    pub api_socket: Option<String>,
    /// Group (name) that may use the local API besides root: the socket is given to it with
    /// mode 0660. Only root when absent.
    pub api_group: Option<String>,
    /// Directory on a bpf filesystem where maps and links are pinned so that translation and
    /// sessions outlive the agent (restarts, upgrades); nothing is pinned when absent.
    pub state_dir: Option<String>,
    /// `address:port` for load-balancer health probes (`/healthz`, `/readyz`); none when absent.
    pub health_listen: Option<String>,
    /// Whether XDP forwarding reuses FIB answers while no routing change is reported (see
    /// `nat_common::route_cache`); on when absent.
    pub route_cache: Option<bool>,
}

/// `[conntrack]`. Every field is optional; integers stay `i64` so that validation, not serde,
/// reports out-of-range values with the field named.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConntrackSection {
    /// Capacity of the session table (and of the mapping and binding tables).
    pub max_sessions: Option<i64>,
    /// Seconds a UDP session lives without traffic.
    pub udp_timeout: Option<i64>,
    /// Seconds an established TCP session lives without traffic.
    pub tcp_established_timeout: Option<i64>,
    /// Seconds a TCP session lives without traffic while opening or closing.
    pub tcp_transitory_timeout: Option<i64>,
    /// Seconds a TCP session lives after a reset.
    pub tcp_closed_timeout: Option<i64>,
    /// Seconds an ICMP echo session lives without traffic.
    pub icmp_timeout: Option<i64>,
    /// Seconds between expiry sweeps.
    pub gc_interval: Option<i64>,
    /// Accept timeouts below the RFC floors (labs and tests only).
    pub allow_below_rfc_floors: Option<bool>,
}

/// One address or prefix, or a list of them: `"203.0.113.1"`, `"203.0.113.0/30"` or
/// `["203.0.113.1", "203.0.113.7"]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(untagged)]
pub enum AddressList {
    /// A single address or prefix.
    One(String),
    /// Several addresses or prefixes.
    Many(Vec<String>),
}

/// `[[snat]]`: rewrite the source of matching packets to an external address and port, with
/// a session so that replies are restored.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnatEntry {
    /// Stable rule id, unique across DNAT and SNAT rules.
    pub id: Option<i64>,
    /// Human name, unique across DNAT and SNAT rules; the `rule` label of the metrics.
    pub name: Option<String>,
    /// Source address or prefix matched (the inside hosts).
    pub source: Option<String>,
    /// Destination address or prefix matched; any when absent.
    pub destination: Option<String>,
    /// `tcp`, `udp` or `icmp`; any of them when absent.
    pub protocol: Option<String>,
    /// The egress interface (as the kernel's route lookup picks it) the rule requires.
    pub out_interface: Option<String>,
    /// External addresses: an address, a list, or a prefix.
    pub to_address: Option<AddressList>,
    /// `true`: use the egress interface's own address.
    pub masquerade: Option<bool>,
    /// `true`: do not translate matching packets.
    pub no_nat: Option<bool>,
    /// External ports, `"1024-65535"` by default.
    pub port_range: Option<PortSpec>,
}

/// `[[bypass]]`: packets matching it are the kernel's, never translated (a cloud platform's
/// health probes, management access to the appliance, destinations exempt from the NAT).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BypassEntry {
    /// Name for messages (optional; bypass entries have no counters of their own).
    pub name: Option<String>,
    /// Source address or prefix matched; any when absent.
    pub source: Option<String>,
    /// Destination address or prefix matched; any when absent.
    pub destination: Option<String>,
    /// `tcp`, `udp` or `icmp`; any protocol when absent.
    pub protocol: Option<String>,
    /// Destination port or range matched (needs `tcp` or `udp`).
    pub port: Option<PortSpec>,
}

/// `[[interfaces]]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InterfaceEntry {
    /// Kernel interface name.
    pub name: String,
    /// The kernel hook that translates: `xdp` (default) or `tc` (TC ingress through TCX).
    #[serde(default)]
    pub hook: Option<String>,
    /// `auto` (native, falling back to generic), `native` or `generic`; XDP only.
    #[serde(default)]
    pub xdp_mode: Option<String>,
    /// Who forwards translated packets that arrive here: `kernel` (default) or `xdp` (the
    /// program itself, on either hook).
    #[serde(default)]
    pub forwarding: Option<String>,
}

/// A port or an inclusive port range: `80`, `"80"` or `"8000-8009"`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(untagged)]
pub enum PortSpec {
    /// A single port as a TOML integer.
    Number(i64),
    /// A port or range as a string.
    Text(String),
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSpec::Number(n) => write!(f, "{n}"),
            PortSpec::Text(s) => write!(f, "{s:?}"),
        }
    }
}

/// `[[dnat]]`: rewrite the destination of matching packets (and restore it on replies).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DnatEntry {
    /// Stable rule id (1..=4294967295), unique in the file.
    pub id: Option<i64>,
    /// Human name, unique; the `rule` label of the metrics.
    pub name: Option<String>,
    /// Destination address or prefix matched (the VIP).
    pub destination: Option<String>,
    /// `tcp`, `udp` or `icmp`; any protocol when absent.
    pub protocol: Option<String>,
    /// Destination port or range matched (TCP/UDP only).
    pub port: Option<PortSpec>,
    /// Address written as destination; a prefix of the same length as `destination` maps a
    /// prefix onto a prefix (NETMAP).
    pub to_address: Option<String>,
    /// Port written as destination: the first port of a range as large as `port`.
    pub to_port: Option<PortSpec>,
}

/// A config file that could not be read or parsed, with its location.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Io {
        /// The file.
        file: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown or mistyped fields.
    #[error("{file}: {location}{message}")]
    Parse {
        /// The file.
        file: String,
        /// `line L, column C: ` when known.
        location: String,
        /// serde's message, first line only.
        message: String,
    },
}

impl ConfigFile {
    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<Self, ReadError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ReadError::Io {
            file: file.clone(),
            source,
        })?;
        Self::parse(&file, &text)
    }

    /// Parses `text`; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ReadError> {
        toml::from_str(text).map_err(|e| {
            let location = e
                .span()
                .map(|span| {
                    let (line, column) = line_column(text, span.start);
                    format!("line {line}, column {column}: ")
                })
                .unwrap_or_default();
            ReadError::Parse {
                file: file.to_string(),
                location,
                message: e
                    .message()
                    .lines()
                    .next()
                    .unwrap_or("invalid TOML")
                    .to_string(),
            }
        })
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_example_shapes() {
        let c = ConfigFile::parse(
            "t.toml",
            r#"
[agent]
metrics_listen = "127.0.0.1:9469"
[[interfaces]]
name = "eth0"
[[dnat]]
id = 1
name = "a"
destination = "198.18.100.10"
port = "8000-8009"
to_address = "198.18.1.2"
to_port = 9000
"#,
        )
        .unwrap();
        assert_eq!(c.dnat[0].port, Some(PortSpec::Text("8000-8009".into())));
        assert_eq!(c.dnat[0].to_port, Some(PortSpec::Number(9000)));
    }

    #[test]
    fn parses_snat_and_conntrack_shapes() {
        let c = ConfigFile::parse(
            "t.toml",
            r#"
[agent]
api_socket = "/run/x.sock"
[conntrack]
max_sessions = 4096
udp_timeout = 300
allow_below_rfc_floors = true
[[snat]]
id = 100
name = "out"
source = "198.18.0.0/24"
to_address = ["203.0.113.1", "203.0.113.2"]
port_range = "2000-3000"
[[snat]]
id = 101
name = "masq"
source = "198.18.0.0/24"
masquerade = true
"#,
        )
        .unwrap();
        assert_eq!(c.agent.api_socket.as_deref(), Some("/run/x.sock"));
        assert_eq!(c.conntrack.max_sessions, Some(4096));
        assert_eq!(c.conntrack.allow_below_rfc_floors, Some(true));
        assert_eq!(
            c.snat[0].to_address,
            Some(AddressList::Many(vec![
                "203.0.113.1".into(),
                "203.0.113.2".into()
            ]))
        );
        assert_eq!(c.snat[1].masquerade, Some(true));
    }

    #[test]
    fn parses_interface_hook() {
        let c = ConfigFile::parse(
            "t.toml",
            r#"
[[interfaces]]
name = "veth0"
hook = "tc"
forwarding = "xdp"
[[interfaces]]
name = "eth0"
"#,
        )
        .unwrap();
        assert_eq!(c.interfaces[0].hook.as_deref(), Some("tc"));
        assert_eq!(c.interfaces[0].forwarding.as_deref(), Some("xdp"));
        assert_eq!(c.interfaces[1].hook, None);
    }

    #[test]
    fn unknown_conntrack_field_is_located() {
        let err = ConfigFile::parse("t.toml", "[conntrack]\nudp_timout = 5\n").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("t.toml: line 2, column 1: unknown field `udp_timout`"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_field_is_located() {
        let err =
            ConfigFile::parse("t.toml", "[[dnat]]\nid = 1\ndestnation = \"x\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("t.toml: line 3, column 1: unknown field `destnation`"),
            "{msg}"
        );
        assert_eq!(msg.lines().count(), 1);
    }
}
