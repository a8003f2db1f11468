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
}

/// `[agent]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// `address:port` of the Prometheus metrics listener; no listener when absent.
    pub metrics_listen: Option<String>,
}

/// `[[interfaces]]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InterfaceEntry {
    /// Kernel interface name.
    pub name: String,
    /// `auto` (native, falling back to generic), `native` or `generic`.
    #[serde(default)]
    pub xdp_mode: Option<String>,
}

/// A port or an inclusive port range: `80`, `"80"` or `"8000-8009"`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
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
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
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
