//! The few facts the demo needs from the agent's config: where metrics are served and which
//! VIPs to try. The agent owns the full format and its validation; this reads the file
//! loosely so the demo keeps working as the format grows.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
};

use anyhow::{bail, Context, Result};
use toml::{Table, Value};

/// What the demo takes from the agent config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoConfig {
    /// `[agent] metrics_listen`.
    pub metrics_listen: SocketAddr,
    /// `[[interfaces]] name`s.
    pub interfaces: Vec<String>,
    /// One check per TCP `[[dnat]]` rule.
    pub checks: Vec<VipCheck>,
}

/// A TCP DNAT rule the demo exercises with one HTTP GET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipCheck {
    /// The rule's name.
    pub name: String,
    /// Where the client connects (VIP and port).
    pub vip: SocketAddrV4,
    /// Where the connection must land (the echo server reports it).
    pub to: SocketAddrV4,
}

impl VipCheck {
    /// The URL the client GETs.
    pub fn url(&self) -> String {
        if self.vip.port() == 80 {
            format!("http://{}/", self.vip.ip())
        } else {
            format!("http://{}/", self.vip)
        }
    }
}

impl DemoConfig {
    /// Reads and parses the config file at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read agent config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in agent config {}", path.display()))
    }

    /// Parses config text.
    pub fn parse(text: &str) -> Result<Self> {
        let doc: Table = text.parse().context("not valid TOML")?;
        let listen = doc
            .get("agent")
            .and_then(|a| a.get("metrics_listen"))
            .and_then(Value::as_str)
            .context("[agent] metrics_listen is missing (the demo waits for metrics there)")?;
        let metrics_listen = listen
            .parse()
            .with_context(|| format!("[agent] metrics_listen {listen:?} is not IP:port"))?;

        let mut interfaces = Vec::new();
        for (i, iface) in array(&doc, "interfaces")?.iter().enumerate() {
            let name = iface
                .get("name")
                .and_then(Value::as_str)
                .with_context(|| format!("[[interfaces]] #{} has no name", i + 1))?;
            interfaces.push(name.to_owned());
        }

        let mut checks = Vec::new();
        for (i, rule) in array(&doc, "dnat")?.iter().enumerate() {
            let ctx = || format!("[[dnat]] #{}", i + 1);
            let protocol = rule.get("protocol").and_then(Value::as_str).unwrap_or("");
            if !protocol.eq_ignore_ascii_case("tcp") {
                continue; // The echo server speaks HTTP only.
            }
            let name = rule
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("unnamed")
                .to_owned();
            let vip = ipv4_field(rule, "destination").with_context(ctx)?;
            let port = port_field(rule, "port").with_context(ctx)?;
            let to_address = ipv4_field(rule, "to_address").with_context(ctx)?;
            // Like iptables' --to-destination without a port: the port stays.
            let to_port = match rule.get("to_port") {
                None => port,
                Some(_) => port_field(rule, "to_port").with_context(ctx)?,
            };
            checks.push(VipCheck {
                name,
                vip: SocketAddrV4::new(vip, port),
                to: SocketAddrV4::new(to_address, to_port),
            });
        }
        Ok(Self {
            metrics_listen,
            interfaces,
            checks,
        })
    }

    /// The URL to scrape from inside the agent's namespace: a wildcard listener is reached
    /// over loopback.
    pub fn metrics_url(&self) -> String {
        let ip = match self.metrics_listen.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            ip => ip,
        };
        format!(
            "http://{}/metrics",
            SocketAddr::new(ip, self.metrics_listen.port())
        )
    }
}

fn array<'a>(doc: &'a Table, key: &str) -> Result<&'a [Value]> {
    match doc.get(key) {
        None => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => bail!("{key} must be an array of tables ([[{key}]])"),
    }
}

fn ipv4_field(rule: &Value, key: &str) -> Result<Ipv4Addr> {
    let text = rule
        .get(key)
        .and_then(Value::as_str)
        .with_context(|| format!("{key} is missing"))?;
    text.parse()
        .with_context(|| format!("{key} {text:?} is not an IPv4 address"))
}

fn port_field(rule: &Value, key: &str) -> Result<u16> {
    let value = rule
        .get(key)
        .and_then(Value::as_integer)
        .with_context(|| format!("{key} is missing or not an integer"))?;
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => bail!("{key} {value} is not a port (1-65535)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nat_lab::DnatLab;

    const LAB_TOML: &str = include_str!("../../deploy/examples/lab.toml");

    #[test]
    fn example_config_matches_the_lab_topology() {
        let config = DemoConfig::parse(LAB_TOML).unwrap();
        assert_eq!(config.metrics_listen, "127.0.0.1:9469".parse().unwrap());
        assert_eq!(config.metrics_url(), "http://127.0.0.1:9469/metrics");
        assert_eq!(
            config.interfaces,
            [DnatLab::NAT_CLIENT_IF, DnatLab::NAT_BACKEND_IF]
        );
        let vip1 = |port| SocketAddrV4::new(DnatLab::VIP1, port);
        let vip2 = |port| SocketAddrV4::new(DnatLab::VIP2, port);
        let b1 = |port| SocketAddrV4::new(DnatLab::BACKEND_ADDR, port);
        let b2 = |port| SocketAddrV4::new(DnatLab::BACKEND_ADDR2, port);
        let got: Vec<_> = config
            .checks
            .iter()
            .map(|c| (c.name.as_str(), c.vip, c.to))
            .collect();
        assert_eq!(
            got,
            [
                ("vip1-http", vip1(80), b1(80)),
                ("vip2-http", vip2(80), b1(8080)),
                ("vip2-ssh-to-web", vip2(22), b2(80)),
            ]
        );
        assert_eq!(config.checks[0].url(), "http://198.18.100.10/");
        assert_eq!(config.checks[2].url(), "http://198.18.100.11:22/");
    }

    #[test]
    fn udp_rules_are_not_checked_and_to_port_defaults_to_port() {
        let config = DemoConfig::parse(
            r#"
            [agent]
            metrics_listen = "0.0.0.0:9000"
            [[dnat]]
            name = "ntp"
            protocol = "udp"
            destination = "198.18.100.12"
            port = 123
            to_address = "198.18.1.2"
            [[dnat]]
            name = "web"
            protocol = "TCP"
            destination = "198.18.100.12"
            port = 443
            to_address = "198.18.1.2"
            "#,
        )
        .unwrap();
        assert_eq!(config.metrics_url(), "http://127.0.0.1:9000/metrics");
        assert_eq!(config.checks.len(), 1);
        assert_eq!(config.checks[0].to.port(), 443);
        assert!(config.interfaces.is_empty());
    }

    #[test]
    fn bad_configs_are_errors_not_panics() {
        for bad in [
            "not toml [",
            "",
            "[agent]\nmetrics_listen = 5",
            "[agent]\nmetrics_listen = \"localhost\"",
            "dnat = 3\n[agent]\nmetrics_listen = \"127.0.0.1:1\"",
            "[agent]\nmetrics_listen = \"127.0.0.1:1\"\n[[interfaces]]\nxdp_mode = \"auto\"",
            "[agent]\nmetrics_listen = \"127.0.0.1:1\"\n[[dnat]]\nprotocol = \"tcp\"\ndestination = \"x\"\nport = 1\nto_address = \"198.18.1.2\"",
            "[agent]\nmetrics_listen = \"127.0.0.1:1\"\n[[dnat]]\nprotocol = \"tcp\"\ndestination = \"198.18.100.10\"\nport = 70000\nto_address = \"198.18.1.2\"",
            "[agent]\nmetrics_listen = \"127.0.0.1:1\"\n[[dnat]]\nprotocol = \"tcp\"\ndestination = \"198.18.100.10\"\nport = 0\nto_address = \"198.18.1.2\"",
            "[agent]\nmetrics_listen = \"127.0.0.1:1\"\n[[dnat]]\nprotocol = \"tcp\"\ndestination = \"198.18.100.10\"\nport = 80\nto_address = \"198.18.1.2\"\nto_port = -1",
        ] {
            assert!(DemoConfig::parse(bad).is_err(), "{bad:?}");
        }
    }
}
