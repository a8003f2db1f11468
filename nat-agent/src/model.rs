//! The validated model: what the operator asked for, checked field by field.
//!
//! Validation collects every problem with the file, the rule and the field named, one line
//! each, so an operator fixes a config in one pass. Nothing here touches the kernel.
//!
//! DNAT and interfaces live here; `[conntrack]` and `[[snat]]` in their own submodules, which
//! share the field parsers below.

mod bypass;
mod conntrack;
mod snat;

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    ops::RangeInclusive,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use nat_common::{ipv4::proto, maps::MAX_RULES};

use crate::config::{ConfigFile, DnatEntry, InterfaceEntry, PortSpec};

pub use bypass::BypassRule;
pub use conntrack::{Conntrack, Timeouts};
pub use snat::{SnatAction, SnatRule, DEFAULT_SNAT_PORTS};

/// Where the local API listens when `[agent] api_socket` is not given.
pub const DEFAULT_API_SOCKET: &str = "/run/xdp-nat/agent.sock";

/// How the XDP program is attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    /// Native (driver) mode, falling back to generic with a warning when the driver refuses.
    Auto,
    /// Native (driver) mode only; failing to attach is an error.
    Native,
    /// Generic (skb) mode: works everywhere, slower.
    Generic,
}

impl XdpMode {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        }
    }
}

/// The kernel hook that runs the translation on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// XDP in the given mode: the earliest hook, the cheapest per packet.
    Xdp(XdpMode),
    /// TC ingress (`cls_bpf` through a TCX link): runs on socket buffers, so GSO/GRO
    /// super-packets are translated once each, and attaching it leaves the peer of a veth its
    /// segmentation offload (attaching XDP to a veth takes it away).
    Tc,
}

impl Hook {
    /// The config spelling (`hook = ...`).
    pub fn name(self) -> &'static str {
        match self {
            Hook::Xdp(_) => "xdp",
            Hook::Tc => "tc",
        }
    }

    /// How status and metrics show the attachment: the XDP mode (`native`, `generic`: the
    /// mode it got, or for a link taken over from an earlier run the one the kernel reports), or
    /// `tc`.
    pub fn mode(self) -> &'static str {
        match self {
            Hook::Xdp(mode) => mode.as_str(),
            Hook::Tc => "tc",
        }
    }
}

/// An interface to attach to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Kernel interface name.
    pub name: String,
    /// The hook, and for XDP its attach mode.
    pub hook: Hook,
    /// Who forwards translated packets arriving on this interface.
    pub forwarding: Forwarding,
}

/// Who forwards a translated packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarding {
    /// The kernel (XDP_PASS after translation): its routing, netfilter and qdiscs apply.
    Kernel,
    /// The program itself (FIB lookup, MAC rewrite, TTL decrement, then XDP redirect or
    /// XDP_TX, or on the TC hook `bpf_redirect`); what it cannot finish still goes to the
    /// kernel.
    Xdp,
}

impl Forwarding {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Forwarding::Kernel => "kernel",
            Forwarding::Xdp => "xdp",
        }
    }
}

/// An inclusive port range, `min <= max`, both non-zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub min: u16,
    /// Last port.
    pub max: u16,
}

impl PortRange {
    /// Number of ports in the range.
    pub fn len(&self) -> u32 {
        u32::from(self.max - self.min) + 1
    }

    /// Always false: a range holds at least one port. (Present for clippy's `len` convention.)
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The range as a std range.
    pub fn range(&self) -> RangeInclusive<u16> {
        self.min..=self.max
    }

    /// Whether the two ranges share a port.
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.min <= other.max && other.min <= self.max
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

/// A validated DNAT rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnatRule {
    /// Stable id from the config.
    pub id: u32,
    /// Unique name (metrics label).
    pub name: String,
    /// Destination prefix matched (host bits zero).
    pub destination: Ipv4Net,
    /// Protocol matched; `None` for any.
    pub protocol: Option<u8>,
    /// Destination ports matched (TCP/UDP only).
    pub port: Option<PortRange>,
    /// Prefix written as destination; same length as `destination`.
    pub to_address: Ipv4Net,
    /// Ports written; same size as `port`.
    pub to_port: Option<PortRange>,
}

impl DnatRule {
    /// The ports a backend's replies come from: the rewritten range, or the matched range when
    /// the port is kept.
    pub fn backend_ports(&self) -> Option<PortRange> {
        self.to_port.or(self.port)
    }
}

/// The validated config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    /// Metrics listener address.
    pub metrics_listen: Option<SocketAddr>,
    /// Health-probe listener address.
    pub health_listen: Option<SocketAddr>,
    /// The local API's unix socket.
    pub api_socket: PathBuf,
    /// The operator group allowed on the API socket: (name, gid).
    pub api_group: Option<(String, u32)>,
    /// Where state that outlives the agent is pinned (a bpffs directory); `None`: nothing.
    pub state_dir: Option<PathBuf>,
    /// Interfaces, in config order.
    pub interfaces: Vec<Interface>,
    /// DNAT rules, in priority order.
    pub dnat: Vec<DnatRule>,
    /// SNAT rules, in priority order.
    pub snat: Vec<SnatRule>,
    /// Bypass entries, in config order (any match bypasses).
    pub bypass: Vec<BypassRule>,
    /// Session table size, timeouts and sweep interval.
    pub conntrack: Conntrack,
    /// Whether the DNAT destination prefixes are installed as routes to announce.
    pub announce_vips: bool,
    /// Whether XDP forwarding reuses FIB answers between routing changes (`[agent]
    /// route_cache`, on by default).
    pub route_cache: bool,
    /// Where the NAT event log goes; `None`: off.
    pub event_log: Option<crate::events::EventLog>,
}

impl Model {
    /// The name of the rule with config id `id`, DNAT or SNAT.
    pub fn rule_name(&self, id: u32) -> Option<&str> {
        self.dnat
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.name.as_str())
            .or_else(|| {
                self.snat
                    .iter()
                    .find(|r| r.id == id)
                    .map(|r| r.name.as_str())
            })
    }
}

/// One problem with a config, located as precisely as possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Which part of the file: `dnat rule "web" (id 10)`, `interface "eth0"`, `[agent]`.
    pub place: String,
    /// The field, when one field is at fault.
    pub field: Option<&'static str>,
    /// What is wrong and, where it helps, what to write instead.
    pub message: String,
}

/// Every problem found in a config file, one per line when displayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    /// The file.
    pub file: String,
    /// The problems, in file order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {}", self.file, p.place)?;
            if let Some(field) = p.field {
                write!(f, ": field `{field}`")?;
            }
            write!(f, ": {}", p.message)?;
        }
        Ok(())
    }
}

/// Validates a parsed config file; `file` names it in errors.
pub fn validate(file: &str, config: &ConfigFile) -> Result<Model, ValidationError> {
    let mut problems = Vec::new();

    let metrics_listen = parse_listen(
        config.agent.metrics_listen.as_deref(),
        "metrics_listen",
        "127.0.0.1:9469",
        &mut problems,
    );
    let health_listen = parse_listen(
        config.agent.health_listen.as_deref(),
        "health_listen",
        "0.0.0.0:8080",
        &mut problems,
    );
    let api_socket = validate_api_socket(config.agent.api_socket.as_deref(), &mut problems);
    let api_group = validate_api_group(config.agent.api_group.as_deref(), &mut problems);
    let state_dir = validate_state_dir(config.agent.state_dir.as_deref(), &mut problems);
    let event_log = validate_event_log(config.events.log.as_deref(), &mut problems);

    let interfaces = validate_interfaces(&config.interfaces, &mut problems);

    // DNAT and SNAT rules share one id space and one name space: they share the counter slots
    // and the `rule` label of the metrics.
    let mut ids = HashSet::new();
    let mut names = HashSet::new();
    let mut unique = |place: String, id: u32, name: &str, problems: &mut Vec<Problem>| {
        if !ids.insert(id) {
            problems.push(Problem {
                place: place.clone(),
                field: Some("id"),
                message: format!("id {id} is used by an earlier rule"),
            });
        }
        if !names.insert(name.to_string()) {
            problems.push(Problem {
                place,
                field: Some("name"),
                message: format!("name {name:?} is used by an earlier rule"),
            });
        }
    };

    let mut dnat = Vec::new();
    for (index, entry) in config.dnat.iter().enumerate() {
        if let Some(rule) = validate_dnat(index, entry, &mut problems) {
            unique(
                rule_place("dnat", index, &entry.name, entry.id),
                rule.id,
                &rule.name,
                &mut problems,
            );
            dnat.push(rule);
        }
    }
    let mut snat = Vec::new();
    for (index, entry) in config.snat.iter().enumerate() {
        if let Some(rule) = snat::validate_snat(index, entry, &mut problems) {
            unique(
                rule_place("snat", index, &entry.name, entry.id),
                rule.id,
                &rule.name,
                &mut problems,
            );
            snat.push(rule);
        }
    }
    if config.dnat.len() > MAX_RULES as usize {
        problems.push(Problem {
            place: "[[dnat]]".into(),
            field: None,
            message: format!(
                "{} rules; at most {MAX_RULES} are supported",
                config.dnat.len()
            ),
        });
    } else if config.dnat.len() + config.snat.len() > MAX_RULES as usize {
        problems.push(Problem {
            place: "[[snat]]".into(),
            field: None,
            message: format!(
                "{} dnat and {} snat rules; together at most {MAX_RULES} are supported (they share the counter slots)",
                config.dnat.len(),
                config.snat.len()
            ),
        });
    }
    snat::check_rule_count(config.snat.len(), &mut problems);
    let bypass = config
        .bypass
        .iter()
        .enumerate()
        .filter_map(|(index, entry)| bypass::validate_bypass(index, entry, &mut problems))
        .collect();

    let conntrack = conntrack::validate_conntrack(&config.conntrack, &mut problems);

    if problems.is_empty() {
        Ok(Model {
            metrics_listen,
            health_listen,
            api_socket,
            api_group,
            state_dir,
            interfaces,
            dnat,
            snat,
            bypass,
            conntrack,
            announce_vips: config.announce.vip_routes.unwrap_or(false),
            route_cache: config.agent.route_cache.unwrap_or(true),
            event_log,
        })
    } else {
        Err(ValidationError {
            file: file.to_string(),
            problems,
        })
    }
}

/// The unix socket path: absolute (the daemon's working directory is nobody's business) and
/// short enough for `sun_path` (108 bytes with its terminating NUL).
fn validate_api_socket(value: Option<&str>, problems: &mut Vec<Problem>) -> PathBuf {
    let Some(s) = value else {
        return PathBuf::from(DEFAULT_API_SOCKET);
    };
    let message = if !Path::new(s).is_absolute() {
        Some(format!("{s:?} is not an absolute path"))
    } else if s.len() > 107 {
        Some(format!(
            "{s:?} is {} bytes long; a unix socket path holds at most 107",
            s.len()
        ))
    } else if s.ends_with('/') || s.contains('\0') {
        Some(format!("{s:?} is not a file path"))
    } else {
        None
    };
    if let Some(message) = message {
        problems.push(Problem {
            place: "[agent]".into(),
            field: Some("api_socket"),
            message,
        });
    }
    PathBuf::from(s)
}

/// `[events] log`: `stdout` or an absolute file path.
fn validate_event_log(
    value: Option<&str>,
    problems: &mut Vec<Problem>,
) -> Option<crate::events::EventLog> {
    match value? {
        "stdout" => Some(crate::events::EventLog::Stdout),
        path if Path::new(path).is_absolute() && !path.ends_with('/') => {
            Some(crate::events::EventLog::File(PathBuf::from(path)))
        }
        other => {
            problems.push(Problem {
                place: "[events]".into(),
                field: Some("log"),
                message: format!("{other:?}: give \"stdout\" or an absolute file path"),
            });
            None
        }
    }
}

/// The state directory: an absolute path (whether it is on bpffs is checked at start).
fn validate_state_dir(value: Option<&str>, problems: &mut Vec<Problem>) -> Option<PathBuf> {
    let s = value?;
    if !Path::new(s).is_absolute() || s.contains('\0') {
        problems.push(Problem {
            place: "[agent]".into(),
            field: Some("state_dir"),
            message: format!("{s:?} is not an absolute directory path"),
        });
        return None;
    }
    Some(PathBuf::from(s))
}

/// The operator group: it must exist on this host, since the socket is handed to its gid.
fn validate_api_group(value: Option<&str>, problems: &mut Vec<Problem>) -> Option<(String, u32)> {
    let name = value?;
    let mut problem = |message: String| {
        problems.push(Problem {
            place: "[agent]".into(),
            field: Some("api_group"),
            message,
        })
    };
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Some((name.to_string(), group.gid.as_raw())),
        Ok(None) => {
            problem(format!(
                "no group {name:?} on this host (create it, e.g. `groupadd --system {name}`)"
            ));
            None
        }
        Err(e) => {
            problem(format!("looking up group {name:?}: {e}"));
            None
        }
    }
}

fn validate_interfaces(entries: &[InterfaceEntry], problems: &mut Vec<Problem>) -> Vec<Interface> {
    if entries.is_empty() {
        problems.push(Problem {
            place: "[[interfaces]]".into(),
            field: None,
            message: "no interface to attach to; add at least one [[interfaces]] with a name"
                .into(),
        });
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for entry in entries {
        let place = format!("interface {:?}", entry.name);
        let name_ok = is_interface_name(&entry.name);
        if !name_ok {
            problems.push(Problem {
                place: place.clone(),
                field: Some("name"),
                message: INTERFACE_NAME_RULE.into(),
            });
        }
        if !seen.insert(entry.name.clone()) {
            problems.push(Problem {
                place: place.clone(),
                field: Some("name"),
                message: "listed twice".into(),
            });
        }
        let hook = interface_hook(entry, &place, problems);
        let forwarding = match entry.forwarding.as_deref() {
            None | Some("kernel") => Forwarding::Kernel,
            Some("xdp") => Forwarding::Xdp,
            Some(other) => {
                problems.push(Problem {
                    place: place.clone(),
                    field: Some("forwarding"),
                    message: format!("{other:?} is not one of \"kernel\", \"xdp\""),
                });
                Forwarding::Kernel
            }
        };
        if let (true, Some(hook)) = (name_ok, hook) {
            out.push(Interface {
                name: entry.name.clone(),
                hook,
                forwarding,
            });
        }
    }
    out
}

/// An interface's `hook` and, for XDP, its `xdp_mode`; `None` (with the problems recorded)
/// when either is wrong.
fn interface_hook(
    entry: &InterfaceEntry,
    place: &str,
    problems: &mut Vec<Problem>,
) -> Option<Hook> {
    let mut problem = |field, message| {
        problems.push(Problem {
            place: place.to_string(),
            field: Some(field),
            message,
        })
    };
    let tc = match entry.hook.as_deref() {
        None | Some("xdp") => Some(false),
        Some("tc") => Some(true),
        Some(other) => {
            problem("hook", format!("{other:?} is not one of \"xdp\", \"tc\""));
            None
        }
    };
    if tc == Some(true) {
        if entry.xdp_mode.is_some() {
            // Whatever its value: it would silently mean nothing.
            problem(
                "xdp_mode",
                "applies to hook = \"xdp\" only; leave it out with hook = \"tc\"".into(),
            );
            return None;
        }
        return Some(Hook::Tc);
    }
    let mode = match entry.xdp_mode.as_deref() {
        None | Some("auto") => Some(XdpMode::Auto),
        Some("native") => Some(XdpMode::Native),
        Some("generic") => Some(XdpMode::Generic),
        Some(other) => {
            problem(
                "xdp_mode",
                format!("{other:?} is not one of \"auto\", \"native\", \"generic\""),
            );
            None
        }
    };
    tc.and(mode).map(Hook::Xdp)
}

/// What the kernel accepts as an interface name (IFNAMSIZ, no path or alias characters).
pub(crate) fn is_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

const INTERFACE_NAME_RULE: &str =
    "not a valid interface name (1 to 15 printable characters, no '/' or ':')";

/// `dnat rule "web" (id 10)`, or as much of it as the entry gives.
fn rule_place(kind: &str, index: usize, name: &Option<String>, id: Option<i64>) -> String {
    match (name, id) {
        (Some(name), Some(id)) => format!("{kind} rule {name:?} (id {id})"),
        (Some(name), None) => format!("{kind} rule {name:?}"),
        (None, Some(id)) => format!("{kind} rule #{} (id {id})", index + 1),
        (None, None) => format!("{kind} rule #{}", index + 1),
    }
}

/// A rule's `id`: present, 1..=u32::MAX.
fn rule_id(id: Option<i64>, problem: &mut impl FnMut(&'static str, String)) -> Option<u32> {
    match id {
        None => {
            problem("id", "missing; every rule needs a stable numeric id".into());
            None
        }
        Some(id) => match u32::try_from(id) {
            Ok(id) if id > 0 => Some(id),
            _ => {
                problem("id", format!("{id} is out of range 1..=4294967295"));
                None
            }
        },
    }
}

/// A rule's `name`: present, short, and safe as a metrics label value.
fn rule_name(
    name: &Option<String>,
    problem: &mut impl FnMut(&'static str, String),
) -> Option<String> {
    match name {
        None => {
            problem("name", "missing".into());
            None
        }
        Some(n) if n.is_empty() || n.len() > 64 => {
            problem("name", "must be 1 to 64 characters".into());
            None
        }
        Some(n)
            if !n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) =>
        {
            problem(
                "name",
                format!("{n:?}: use letters, digits, '-', '_' and '.' only"),
            );
            None
        }
        Some(n) => Some(n.clone()),
    }
}

/// `tcp`, `udp` or `icmp`; `Err(())` after reporting anything else.
fn rule_protocol(
    value: Option<&str>,
    problem: &mut impl FnMut(&'static str, String),
) -> Result<Option<u8>, ()> {
    match value {
        None => Ok(None),
        Some("tcp") => Ok(Some(proto::TCP)),
        Some("udp") => Ok(Some(proto::UDP)),
        Some("icmp") => Ok(Some(proto::ICMP)),
        Some(other) => {
            problem(
                "protocol",
                format!("{other:?} is not one of \"tcp\", \"udp\", \"icmp\" (omit it for any)"),
            );
            Err(())
        }
    }
}

/// An optional `address:port` field of `[agent]`; `example` shows the expected form.
fn parse_listen(
    value: Option<&str>,
    field: &'static str,
    example: &str,
    problems: &mut Vec<Problem>,
) -> Option<SocketAddr> {
    let text = value?;
    match text.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            problems.push(Problem {
                place: "[agent]".into(),
                field: Some(field),
                message: format!("{text:?} is not an address:port (e.g. \"{example}\")"),
            });
            None
        }
    }
}

/// Validates one `[[dnat]]` entry, pushing a problem per faulty field.
fn validate_dnat(index: usize, e: &DnatEntry, problems: &mut Vec<Problem>) -> Option<DnatRule> {
    let place = rule_place("dnat", index, &e.name, e.id);
    let before = problems.len();
    let mut problem = |field: &'static str, message: String| {
        problems.push(Problem {
            place: place.clone(),
            field: Some(field),
            message,
        })
    };

    let id = rule_id(e.id, &mut problem);
    let name = rule_name(&e.name, &mut problem);
    let destination = match &e.destination {
        None => {
            problem(
                "destination",
                "missing; the VIP address or prefix to match".into(),
            );
            None
        }
        Some(s) => parse_prefix(s).map_err(|m| problem("destination", m)).ok(),
    };
    let Ok(protocol) = rule_protocol(e.protocol.as_deref(), &mut problem) else {
        return None;
    };
    let port = e
        .port
        .as_ref()
        .and_then(|p| parse_ports(p).map_err(|m| problem("port", m)).ok());
    if e.port.is_some() && !matches!(protocol, Some(proto::TCP) | Some(proto::UDP)) {
        problem(
            "port",
            "a port match needs protocol = \"tcp\" or \"udp\"".into(),
        );
    }
    let to_address = match &e.to_address {
        None => {
            problem(
                "to_address",
                "missing; the backend address or prefix".into(),
            );
            None
        }
        Some(s) => parse_prefix(s).map_err(|m| problem("to_address", m)).ok(),
    };
    if let (Some(d), Some(t)) = (destination, to_address) {
        if d.prefix_len() != t.prefix_len() {
            problem(
                "to_address",
                format!(
                    "{t} is a /{} but destination {d} is a /{}: a prefix maps onto a prefix of the same size",
                    t.prefix_len(),
                    d.prefix_len()
                ),
            );
        }
    }
    let to_port = match (&e.to_port, port) {
        (None, _) => None,
        (Some(_), None) if e.port.is_none() => {
            problem(
                "to_port",
                "rewriting the port needs a `port` match (the reverse of \"any port onto one\" would be ambiguous)".into(),
            );
            None
        }
        (Some(_), None) => None,
        (Some(spec), Some(matched)) => match parse_ports_or_start(spec, matched.len()) {
            Ok(r) if r.len() == matched.len() => Some(r),
            Ok(r) => {
                problem(
                    "to_port",
                    format!(
                        "{r} is {} ports but port {matched} is {}: a range maps onto a range of the same size",
                        r.len(),
                        matched.len()
                    ),
                );
                None
            }
            Err(m) => {
                problem("to_port", m);
                None
            }
        },
    };

    if problems.len() != before {
        return None;
    }
    Some(DnatRule {
        id: id?,
        name: name?,
        destination: destination?,
        protocol,
        port,
        to_address: to_address?,
        to_port,
    })
}

/// `198.18.0.5` (a /32) or `198.18.0.0/24` with host bits zero.
pub(crate) fn parse_prefix(s: &str) -> Result<Ipv4Net, String> {
    let net = if s.contains('/') {
        s.parse::<Ipv4Net>()
            .map_err(|_| format!("{s:?} is not an IPv4 address or prefix"))?
    } else {
        let addr = s
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 address or prefix"))?;
        Ipv4Net::new(addr, 32).expect("32 is a valid IPv4 prefix length")
    };
    if net.addr() != net.network() {
        return Err(format!(
            "{s:?} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

fn parse_port_number(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(format!("{s:?} is not a port in 1..=65535")),
    }
}

/// `80`, `"80"` or `"8000-8009"`.
pub(crate) fn parse_ports(spec: &PortSpec) -> Result<PortRange, String> {
    match spec {
        PortSpec::Number(n) => {
            let p = parse_port_number(&n.to_string())?;
            Ok(PortRange { min: p, max: p })
        }
        PortSpec::Text(s) => {
            let (min, max) = match s.split_once('-') {
                Some((a, b)) => (parse_port_number(a)?, parse_port_number(b)?),
                None => {
                    let p = parse_port_number(s)?;
                    (p, p)
                }
            };
            if min > max {
                return Err(format!("{s:?}: the range is backwards"));
            }
            Ok(PortRange { min, max })
        }
    }
}

/// Like [`parse_ports`], but a single port names the start of a range of `len` ports.
fn parse_ports_or_start(spec: &PortSpec, len: u32) -> Result<PortRange, String> {
    let r = parse_ports(spec)?;
    if r.min != r.max || len == 1 {
        return Ok(r);
    }
    let max = u32::from(r.min) + len - 1;
    if max > 65535 {
        return Err(format!(
            "{spec}: a range of {len} ports starting at {} runs past 65535",
            r.min
        ));
    }
    Ok(PortRange {
        min: r.min,
        max: max as u16,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        hook: Option<&str>,
        xdp_mode: Option<&str>,
        forwarding: Option<&str>,
    ) -> InterfaceEntry {
        InterfaceEntry {
            name: "nat0".into(),
            hook: hook.map(Into::into),
            xdp_mode: xdp_mode.map(Into::into),
            forwarding: forwarding.map(Into::into),
        }
    }

    fn check(entry: InterfaceEntry) -> (Vec<Interface>, Vec<Problem>) {
        let mut problems = Vec::new();
        let out = validate_interfaces(&[entry], &mut problems);
        (out, problems)
    }

    #[test]
    fn hook_defaults_to_xdp_auto() {
        let (out, problems) = check(entry(None, None, None));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(out[0].hook, Hook::Xdp(XdpMode::Auto));
        assert_eq!(out[0].forwarding, Forwarding::Kernel);
        let (out, _) = check(entry(Some("xdp"), Some("generic"), None));
        assert_eq!(out[0].hook, Hook::Xdp(XdpMode::Generic));
    }

    #[test]
    fn tc_hook_keeps_forwarding() {
        for (forwarding, want) in [
            (None, Forwarding::Kernel),
            (Some("kernel"), Forwarding::Kernel),
            (Some("xdp"), Forwarding::Xdp),
        ] {
            let (out, problems) = check(entry(Some("tc"), None, forwarding));
            assert!(problems.is_empty(), "{problems:?}");
            assert_eq!(out[0].hook, Hook::Tc);
            assert_eq!(out[0].forwarding, want);
        }
        assert_eq!(Hook::Tc.mode(), "tc");
        assert_eq!(Hook::Tc.name(), "tc");
        assert_eq!(Hook::Xdp(XdpMode::Native).mode(), "native");
    }

    #[test]
    fn unknown_hook_is_a_problem() {
        let (out, problems) = check(entry(Some("tcx"), None, None));
        assert!(out.is_empty());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].place, "interface \"nat0\"");
        assert_eq!(problems[0].field, Some("hook"));
        assert!(
            problems[0].message.contains("\"tcx\""),
            "{}",
            problems[0].message
        );
    }

    #[test]
    fn xdp_mode_with_tc_hook_is_a_problem() {
        for mode in ["auto", "native", "generic", "turbo"] {
            let (out, problems) = check(entry(Some("tc"), Some(mode), None));
            assert!(out.is_empty(), "{mode}");
            // One problem whatever the value: the field does not belong with this hook.
            assert_eq!(problems.len(), 1, "{mode}: {problems:?}");
            assert_eq!(problems[0].field, Some("xdp_mode"));
            assert!(problems[0].message.contains("hook = \"tc\""));
        }
    }

    #[test]
    fn unknown_hook_and_bad_mode_are_both_reported() {
        let (out, problems) = check(entry(Some("ebpf"), Some("turbo"), Some("fast")));
        assert!(out.is_empty());
        let fields: Vec<_> = problems.iter().map(|p| p.field.unwrap()).collect();
        assert_eq!(fields, ["hook", "xdp_mode", "forwarding"]);
    }
}
