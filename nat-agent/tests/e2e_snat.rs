//! End-to-end SNAT and MASQUERADE: the real agent binary attached in the nat namespace of a
//! lab, real clients and servers (chronyd, curl, Rust TCP/UDP sockets), and the public side's
//! own view (nftables counters, `ss`, the servers' record of who talked to them) as ground
//! truth for what the NAT did.
//!
//! The labs are built so that only the NAT can make a conversation work: in [`SnatLab`] the
//! public namespace has no route to 198.18.0.0/24, and in the scenario-3 [`DnatLab`] the
//! backend has no route to the client. A reply that arrives at all therefore went through the
//! NAT's session, and the tests fail with "no reply through the NAT" when it does not.
//!
//! Where a test needs to tell "the session survived" from "a new session happened to get the
//! same port", the inside host uses a source port below 1024: the NAT must then allocate an
//! external port (random start), so a re-created session would almost surely show a different
//! one, and the session counters are checked as well.
//!
//! `idle_udp_mapping_survives_two_minutes_of_silence_with_default_timeouts` takes about
//! 130 seconds by nature (RFC 4787's two minutes plus margin).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use nat_lab::{
    established_tcp, http_get, install_counter, read_counter, tcp_connect, tcp_connect_all,
    tcp_roundtrip, udp_bind, udp_peer_roundtrip, wait_until, Check, DnatLab, DnatLabOptions,
    EchoReply, Hook, HttpEcho, NtpClient, NtpClientOptions, NtpServer, SnatLab, TcpEchoServer,
    UdpPeerEcho,
};

#[path = "common/agent.rs"]
mod agent;

use agent::{session_entries, xdp_attached, Agent, Metrics, AGENT, API_SOCKET_PLACEHOLDER};

/// The external port range every rule here uses (the default, spelled out).
const PORT_MIN: u16 = 1024;
const PORT_MAX: u16 = 65535;

/// chrony polls every 62.5 ms in the lab: it selects a reachable source within seconds.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// Per-connection and per-datagram patience: everything is local.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Scenario 1's NAT: everything from the private network leaving by the public interface is
/// masqueraded to that interface's address. The `[conntrack]` section is the RFC-floor
/// defaults written out.
const SNAT_CONFIG: &str = r#"
[agent]
metrics_listen = "127.0.0.1:9469"
api_socket = "@API_SOCKET@"

[conntrack]
max_sessions = 65536
udp_timeout = 300
tcp_established_timeout = 7440
tcp_transitory_timeout = 240
tcp_closed_timeout = 10
icmp_timeout = 60
gc_interval = 5
allow_below_rfc_floors = false

[[interfaces]]
name = "n0"
xdp_mode = "native"

[[interfaces]]
name = "n1"
xdp_mode = "native"

# iptables: -s 198.18.0.0/24 -o n1 -j MASQUERADE --to-ports 1024-65535
[[snat]]
id = 100
name = "private-out"
source = "198.18.0.0/24"
out_interface = "n1"
masquerade = true
port_range = "1024-65535"
"#;

/// [`SNAT_CONFIG`] without its `[conntrack]` section: every timeout at the agent's default.
fn snat_config_with_default_conntrack() -> String {
    let start = SNAT_CONFIG.find("[conntrack]").expect("section present");
    let end = SNAT_CONFIG.find("[[interfaces]]").expect("section present");
    format!("{}{}", &SNAT_CONFIG[..start], &SNAT_CONFIG[end..])
}

/// [`SNAT_CONFIG`] with a `[conntrack]` section of the caller's.
fn snat_config_with_conntrack(conntrack: &str) -> String {
    let start = SNAT_CONFIG.find("[conntrack]").expect("section present");
    let end = SNAT_CONFIG.find("[[interfaces]]").expect("section present");
    format!(
        "{}{conntrack}\n{}",
        &SNAT_CONFIG[..start],
        &SNAT_CONFIG[end..]
    )
}

/// Starts the agent in the lab's nat namespace and checks it attached to both interfaces.
fn start_agent(nat: &nat_lab::Netns, config: &str) -> Result<Agent> {
    let agent = Agent::start(nat, config)?;
    for iface in ["n0", "n1"] {
        ensure!(
            xdp_attached(nat, iface)?,
            "no XDP program on {iface} after the agent started"
        );
    }
    Ok(agent)
}

/// How long the sweep-refreshed gauges (sessions, ports in use) may lag: the agent counts
/// them during its expiry sweep, every `gc_interval` (5 s in these configs).
const GAUGE_LAG: Duration = Duration::from_secs(12);

/// Scrapes until `ready` accepts the metrics (bounded by [`GAUGE_LAG`]) and returns them;
/// `ready` says why not yet with `Err(String)`.
fn wait_for_gauges(
    agent: &mut Agent,
    what: &str,
    ready: impl Fn(&Metrics) -> Result<std::result::Result<(), String>>,
) -> Result<Metrics> {
    wait_until(&format!("the agent to report {what}"), GAUGE_LAG, || {
        let m = agent.metrics()?;
        Ok(match ready(&m)? {
            Ok(()) => Check::Done(m),
            Err(why) => Check::NotYet(why),
        })
    })
}

fn in_port_range(port: u16) -> bool {
    (PORT_MIN..=PORT_MAX).contains(&port)
}

/// Sum of `xdpnat_packets_total` over actions for one reason.
fn packets_with_reason(m: &Metrics, reason: &str) -> f64 {
    m.sum("xdpnat_packets_total", &[("reason", reason)])
}

fn expiries(m: &Metrics, protocol: &str) -> f64 {
    m.sum("xdpnat_session_expiries_total", &[("protocol", protocol)])
}

// ---------------------------------------------------------------------------------------------
// Scenario 1: chrony through MASQUERADE
// ---------------------------------------------------------------------------------------------

/// What the NTP server must see as the client's source port.
enum ExpectedSourcePort {
    /// Anything in 1024-65535 (chrony's ephemeral ports are in range already; the NAT may
    /// keep them).
    InRange,
    /// Exactly this port (chrony's `acquisitionport`, in range, so the NAT keeps it).
    Exactly(u16),
    /// In 1024-65535 and not this out-of-range client port (the NAT must move it).
    MovedFrom(u16),
}

fn scenario1(acquisition_port: Option<u16>, expect: ExpectedSourcePort) -> Result<()> {
    let lab = SnatLab::new()?;
    let public = lab.public.name();
    let nat_addr = SnatLab::NAT_PUBLIC_ADDR;

    // The server's view, installed before any traffic: every NTP request it receives must
    // come from the NAT's address with an in-range port, and none from anywhere else.
    install_counter(
        public,
        "ntp_from_nat_in_range",
        Hook::Input,
        &format!("ip saddr {nat_addr} udp sport {PORT_MIN}-{PORT_MAX} udp dport 123"),
    )?;
    install_counter(
        public,
        "ntp_from_other_address",
        Hook::Input,
        &format!("udp dport 123 ip saddr != {nat_addr}"),
    )?;
    install_counter(
        public,
        "ntp_low_source_port",
        Hook::Input,
        &format!("udp dport 123 udp sport 0-{}", PORT_MIN - 1),
    )?;
    if let ExpectedSourcePort::Exactly(port) = expect {
        install_counter(
            public,
            "ntp_expected_port",
            Hook::Input,
            &format!("ip saddr {nat_addr} udp sport {port} udp dport 123"),
        )?;
        install_counter(
            public,
            "ntp_other_port",
            Hook::Input,
            &format!("udp dport 123 udp sport != {port}"),
        )?;
    }
    if let ExpectedSourcePort::MovedFrom(port) = expect {
        install_counter(
            public,
            "ntp_unmoved_port",
            Hook::Input,
            &format!("udp dport 123 udp sport {port}"),
        )?;
    }

    let mut agent = start_agent(&lab.nat, SNAT_CONFIG)?;
    let server = NtpServer::start(public, SnatLab::PUBLIC_ADDR)?;
    let mut client = NtpClient::start(
        lab.private.name(),
        SnatLab::PUBLIC_ADDR,
        NtpClientOptions { acquisition_port },
    )?;
    let selected = client
        .wait_selected(SYNC_TIMEOUT)
        .context("no reply through the NAT: chronyd in the private namespace selected no source")?;
    ensure!(
        selected.name == SnatLab::PUBLIC_ADDR.to_string(),
        "chronyd selected {selected:?}, not the lab server"
    );

    let from_nat = read_counter(public, "ntp_from_nat_in_range")?.packets;
    let from_other = read_counter(public, "ntp_from_other_address")?.packets;
    let low = read_counter(public, "ntp_low_source_port")?.packets;
    ensure!(
        from_nat > 0,
        "the server counted no request from {nat_addr} with a source port in {PORT_MIN}-{PORT_MAX}"
    );
    ensure!(
        from_other == 0,
        "the server saw {from_other} NTP requests from an address other than {nat_addr}"
    );
    ensure!(
        low == 0,
        "the server saw {low} NTP requests from a source port below {PORT_MIN}"
    );
    match expect {
        ExpectedSourcePort::InRange => {}
        ExpectedSourcePort::Exactly(port) => {
            let kept = read_counter(public, "ntp_expected_port")?.packets;
            let other = read_counter(public, "ntp_other_port")?.packets;
            ensure!(
                kept > 0 && other == 0,
                "acquisitionport {port}: the server saw {kept} requests from {nat_addr}:{port} \
                 and {other} from other ports; an in-range source port must be kept"
            );
        }
        ExpectedSourcePort::MovedFrom(port) => {
            let unmoved = read_counter(public, "ntp_unmoved_port")?.packets;
            ensure!(
                unmoved == 0,
                "the server saw {unmoved} requests still from port {port}"
            );
        }
    }
    let clients = server.client_addresses()?;
    ensure!(
        clients == [nat_addr],
        "chronyc clients on the server lists {clients:?}, expected only {nat_addr}"
    );

    let m = wait_for_gauges(&mut agent, "sessions and UDP ports in use", |m| {
        let sessions = m.require("xdpnat_sessions", &[])?;
        let ports = m.sum(
            "xdpnat_snat_ports_in_use",
            &[("address", "203.0.113.1"), ("protocol", "udp")],
        );
        Ok((sessions >= 1.0 && ports >= 1.0)
            .then_some(())
            .ok_or(format!("{sessions} sessions, {ports} UDP ports in use")))
    })?;
    ensure!(
        m.require("xdpnat_sessions_capacity", &[])? == 65536.0,
        "sessions capacity is not the configured max_sessions"
    );
    ensure!(
        packets_with_reason(&m, "session_new") >= 1.0,
        "no session_new packet counted"
    );
    ensure!(
        packets_with_reason(&m, "session_reply") >= 1.0,
        "no session_reply packet counted"
    );
    Ok(())
}

#[test]
fn scenario1_chrony_syncs_through_masquerade_from_ephemeral_ports() -> Result<()> {
    scenario1(None, ExpectedSourcePort::InRange)
}

#[test]
fn scenario1_chrony_acquisitionport_1123_is_kept_through_masquerade() -> Result<()> {
    scenario1(Some(1123), ExpectedSourcePort::Exactly(1123))
}

/// ntpd-style clients send from port 123; the public ACL only admits replies to 1024-65535.
#[test]
fn scenario1_chrony_client_port_123_is_moved_into_1024_65535() -> Result<()> {
    scenario1(Some(123), ExpectedSourcePort::MovedFrom(123))
}

// ---------------------------------------------------------------------------------------------
// Scenarios 2 and 3: DNAT with several VIPs onto one backend port, and DNAT plus MASQUERADE
// ---------------------------------------------------------------------------------------------

/// The exact rules of scenario 2 (DESIGN.md) mapped into the lab: 172.16.3.5 is the backend
/// 198.18.1.2, the on-prem 192.168.1.5 is 198.18.1.3. Three VIP ports land on the same
/// backend port, so the reverse translation needs sessions.
const SCENARIO2_RULES: &str = r#"
# -d VIP1/32 -p tcp --dport 80 -j DNAT --to-destination BACKEND:80
[[dnat]]
id = 1
name = "vip1-http"
destination = "198.18.100.10"
protocol = "tcp"
port = 80
to_address = "198.18.1.2"
to_port = 80

# A second VIP onto the same backend port.
[[dnat]]
id = 2
name = "vip2-http"
destination = "198.18.100.11"
protocol = "tcp"
port = 80
to_address = "198.18.1.2"
to_port = 80

# A VIP port onto another port (:22 onto :80), the same backend port again.
[[dnat]]
id = 3
name = "vip1-ssh-to-web"
destination = "198.18.100.10"
protocol = "tcp"
port = 22
to_address = "198.18.1.2"
to_port = 80

# A VIP onto a host "on-prem" (:22 onto the on-prem host's :22).
[[dnat]]
id = 4
name = "vip2-ssh-onprem"
destination = "198.18.100.11"
protocol = "tcp"
port = 22
to_address = "198.18.1.3"
to_port = 22
"#;

const DNAT_LAB_HEAD: &str = r#"
[agent]
metrics_listen = "127.0.0.1:9469"
api_socket = "@API_SOCKET@"

[[interfaces]]
name = "n0"
xdp_mode = "native"

[[interfaces]]
name = "n1"
xdp_mode = "native"
"#;

/// Scenario 3's source NAT: `-s 198.18.0.0/24 -o n1 -j MASQUERADE`.
const MASQUERADE_TO_BACKENDS: &str = r#"
[[snat]]
id = 100
name = "clients-to-backends"
source = "198.18.0.0/24"
out_interface = "n1"
masquerade = true
"#;

/// One VIP:port of [`SCENARIO2_RULES`] and who must answer it.
#[derive(Clone, Copy)]
struct VipCase {
    vip: Ipv4Addr,
    port: u16,
    backend: SocketAddrV4,
}

const SCENARIO2_CASES: [VipCase; 4] = [
    VipCase {
        vip: DnatLab::VIP1,
        port: 80,
        backend: SocketAddrV4::new(DnatLab::BACKEND_ADDR, 80),
    },
    VipCase {
        vip: DnatLab::VIP2,
        port: 80,
        backend: SocketAddrV4::new(DnatLab::BACKEND_ADDR, 80),
    },
    VipCase {
        vip: DnatLab::VIP1,
        port: 22,
        backend: SocketAddrV4::new(DnatLab::BACKEND_ADDR, 80),
    },
    VipCase {
        vip: DnatLab::VIP2,
        port: 22,
        backend: SocketAddrV4::new(DnatLab::BACKEND_ADDR2, 22),
    },
];

/// GETs `case` from the client and checks who answered and whom the backend saw.
fn get_through_vip(lab: &DnatLab, case: VipCase, expected_client: Ipv4Addr) -> Result<()> {
    let url = format!("http://{}:{}/", case.vip, case.port);
    let body = http_get(lab.client.name(), &url)
        .with_context(|| format!("no reply through the NAT: GET {url}"))?;
    let reply: EchoReply = body.parse()?;
    ensure!(
        reply.server == case.backend,
        "{url} was answered by {} instead of {}",
        reply.server,
        case.backend
    );
    ensure!(
        *reply.client.ip() == expected_client,
        "{url}: the backend saw the client as {}, expected {expected_client}",
        reply.client
    );
    Ok(())
}

/// Counters on the client that prove every reply came from the VIP the client talked to:
/// one per VIP:port that must count, one for replies with a backend source that must not,
/// and the client's own resets (it resets a SYN-ACK from the wrong VIP) that must not.
fn install_vip_reply_counters(lab: &DnatLab) -> Result<()> {
    let client = lab.client.name();
    for (i, case) in SCENARIO2_CASES.iter().enumerate() {
        install_counter(
            client,
            &format!("reply_from_vip_{i}"),
            Hook::Input,
            &format!("ip saddr {} tcp sport {}", case.vip, case.port),
        )?;
    }
    install_counter(
        client,
        "reply_from_backend_net",
        Hook::Input,
        "ip saddr 198.18.1.0/24",
    )?;
    install_counter(
        client,
        "client_resets",
        Hook::Output,
        "tcp flags & rst == rst",
    )?;
    Ok(())
}

fn check_vip_reply_counters(lab: &DnatLab) -> Result<()> {
    let client = lab.client.name();
    for (i, case) in SCENARIO2_CASES.iter().enumerate() {
        let n = read_counter(client, &format!("reply_from_vip_{i}"))?.packets;
        ensure!(
            n > 0,
            "no reply came from {}:{} to the client",
            case.vip,
            case.port
        );
    }
    let leaked = read_counter(client, "reply_from_backend_net")?.packets;
    ensure!(
        leaked == 0,
        "{leaked} replies reached the client with an untranslated backend source"
    );
    let resets = read_counter(client, "client_resets")?.packets;
    ensure!(
        resets == 0,
        "the client sent {resets} TCP resets (a reply arrived from the wrong VIP or port)"
    );
    Ok(())
}

/// Every case several times in turn, then all of them at once (flows through different VIPs
/// onto the one backend port alive together).
fn exercise_scenario2(lab: &DnatLab, expected_client: Ipv4Addr) -> Result<()> {
    for _ in 0..3 {
        for case in SCENARIO2_CASES {
            get_through_vip(lab, case, expected_client)?;
        }
    }
    thread::scope(|scope| {
        let workers: Vec<_> = (0..3)
            .flat_map(|_| SCENARIO2_CASES)
            .map(|case| scope.spawn(move || get_through_vip(lab, case, expected_client)))
            .collect();
        for worker in workers {
            match worker.join() {
                Ok(result) => result?,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok::<(), anyhow::Error>(())
    })
}

/// Scenario 2's exact config on the routed lab: several VIPs (and a VIP's :22) onto one
/// backend port, replies restored to the right VIP, the backend sees the real client.
#[test]
fn scenario2_exact_config_two_vips_onto_one_backend_port() -> Result<()> {
    let lab = DnatLab::new()?;
    let _http = HttpEcho::start(lab.backend.name(), &[80, 22])?;
    install_vip_reply_counters(&lab)?;
    let config = format!("{DNAT_LAB_HEAD}{SCENARIO2_RULES}");
    let _agent = start_agent(&lab.nat, &config)?;
    exercise_scenario2(&lab, DnatLab::CLIENT_ADDR)?;
    check_vip_reply_counters(&lab)
}

/// Scenario 3: DNAT plus MASQUERADE towards a backend that has no route to the client.
#[test]
fn scenario3_dnat_plus_masquerade_backend_sees_the_nat_address() -> Result<()> {
    let lab = DnatLab::with_options(DnatLabOptions {
        backend_default_route: false,
    })?;
    let _http = HttpEcho::start(lab.backend.name(), &[80])?;
    // Precondition: without NAT the backend cannot answer the client at all.
    let direct = SocketAddrV4::new(DnatLab::BACKEND_ADDR, 80);
    ensure!(
        tcp_connect(lab.client.name(), None, direct, Duration::from_secs(1)).is_err(),
        "the client reached {direct} without NAT: the lab is not scenario 3"
    );
    let backend = lab.backend.name();
    let nat_addr = DnatLab::NAT_BACKEND_ADDR;
    install_counter(
        backend,
        "http_from_nat",
        Hook::Input,
        &format!("ip saddr {nat_addr} tcp dport 80"),
    )?;
    install_counter(
        backend,
        "http_from_elsewhere",
        Hook::Input,
        &format!("ip saddr != {nat_addr} tcp dport 80"),
    )?;
    install_vip_reply_counters(&lab)?;

    let rule = &SCENARIO2_RULES[..SCENARIO2_RULES.find("# A second VIP").expect("rule 2")];
    let config = format!("{DNAT_LAB_HEAD}{rule}{MASQUERADE_TO_BACKENDS}");
    let _agent = start_agent(&lab.nat, &config)?;
    for _ in 0..5 {
        get_through_vip(&lab, SCENARIO2_CASES[0], nat_addr)?;
    }
    ensure!(read_counter(backend, "http_from_nat")?.packets > 0);
    let other = read_counter(backend, "http_from_elsewhere")?.packets;
    ensure!(
        other == 0,
        "the backend received {other} packets for :80 from an address other than {nat_addr}"
    );
    ensure!(
        read_counter(lab.client.name(), "reply_from_vip_0")?.packets > 0,
        "no reply came from the VIP"
    );
    ensure!(read_counter(lab.client.name(), "reply_from_backend_net")?.packets == 0);
    ensure!(read_counter(lab.client.name(), "client_resets")?.packets == 0);
    Ok(())
}

/// Scenario 3 with scenario 2's exact rules: every VIP works, the backend sees the NAT.
#[test]
fn scenario3_two_vips_onto_one_backend_port_with_masquerade() -> Result<()> {
    let lab = DnatLab::with_options(DnatLabOptions {
        backend_default_route: false,
    })?;
    let _http = HttpEcho::start(lab.backend.name(), &[80, 22])?;
    install_vip_reply_counters(&lab)?;
    let config = format!("{DNAT_LAB_HEAD}{SCENARIO2_RULES}{MASQUERADE_TO_BACKENDS}");
    let _agent = start_agent(&lab.nat, &config)?;
    exercise_scenario2(&lab, DnatLab::NAT_BACKEND_ADDR)?;
    check_vip_reply_counters(&lab)
}

// ---------------------------------------------------------------------------------------------
// Many concurrent TCP connections through SNAT
// ---------------------------------------------------------------------------------------------

/// Inside endpoints of the concurrency test: two hosts using the same source ports (the NAT
/// must resolve every collision on its one public address) and a block of ports below the
/// range (the NAT must move them into it).
fn concurrent_sources() -> Vec<SocketAddrV4> {
    let mut sources = Vec::new();
    for host in [SnatLab::PRIVATE_ADDR, SnatLab::PRIVATE_ADDR2] {
        sources.extend((20000..20080).map(|port| SocketAddrV4::new(host, port)));
    }
    sources.extend((600..640).map(|port| SocketAddrV4::new(SnatLab::PRIVATE_ADDR, port)));
    sources
}

/// 250 TCP connections held open at once: 200 to one public server, 50 to another. The
/// servers must see every one from the NAT's address, each from a distinct port in
/// 1024-65535 per destination.
#[test]
fn many_concurrent_tcp_connections_get_unique_in_range_ports_per_destination() -> Result<()> {
    let lab = SnatLab::new()?;
    let public = lab.public.name();
    let near = TcpEchoServer::start(public, SocketAddrV4::new(SnatLab::PUBLIC_ADDR, 7000))?;
    let far = TcpEchoServer::start(public, SocketAddrV4::new(SnatLab::PUBLIC_FAR_ADDR, 7000))?;
    let mut agent = start_agent(&lab.nat, SNAT_CONFIG)?;

    let sources = concurrent_sources();
    let mut flows: Vec<(Option<SocketAddrV4>, SocketAddrV4)> = sources
        .iter()
        .map(|&s| (Some(s), near.local_addr()))
        .collect();
    // The far server gets the first 25 ports of each host (SO_REUSEADDR lets one inside
    // endpoint reach both servers).
    for host in [SnatLab::PRIVATE_ADDR, SnatLab::PRIVATE_ADDR2] {
        flows.extend((20000..20025).map(|p| (Some(SocketAddrV4::new(host, p)), far.local_addr())));
    }
    let mut streams = tcp_connect_all(lab.private.name(), &flows, IO_TIMEOUT)
        .context("no reply through the NAT")?;
    ensure!(streams.len() == 250);
    // All open at once; each still carries data both ways.
    for (i, stream) in streams.iter_mut().enumerate() {
        tcp_roundtrip(stream, format!("conn {i:03}").as_bytes(), IO_TIMEOUT)
            .with_context(|| format!("no reply through the NAT on connection {i}"))?;
    }

    let by_destination = wait_until(
        "the public side to list all 250 connections",
        Duration::from_secs(10),
        || {
            let mut by_dst: BTreeMap<SocketAddrV4, Vec<SocketAddrV4>> = BTreeMap::new();
            for conn in established_tcp(public, 7000)? {
                by_dst.entry(conn.local).or_default().push(conn.peer);
            }
            let counts: Vec<usize> = by_dst.values().map(Vec::len).collect();
            Ok(if counts.iter().sum::<usize>() >= 250 {
                Check::Done(by_dst)
            } else {
                Check::NotYet(format!("established per destination: {counts:?}"))
            })
        },
    )?;
    for (server, want) in [(&near, 200), (&far, 50)] {
        let dst = server.local_addr();
        let peers = by_destination.get(&dst).cloned().unwrap_or_default();
        ensure!(
            peers.len() == want,
            "{dst} has {} established connections, expected {want}",
            peers.len()
        );
        let strangers: Vec<_> = peers
            .iter()
            .filter(|p| *p.ip() != SnatLab::NAT_PUBLIC_ADDR)
            .collect();
        ensure!(
            strangers.is_empty(),
            "{dst} sees connections not from the NAT's address: {strangers:?}"
        );
        let out_of_range: Vec<u16> = peers
            .iter()
            .map(|p| p.port())
            .filter(|&p| !in_port_range(p))
            .collect();
        ensure!(
            out_of_range.is_empty(),
            "{dst} sees source ports outside {PORT_MIN}-{PORT_MAX}: {out_of_range:?}"
        );
        let unique: BTreeSet<u16> = peers.iter().map(|p| p.port()).collect();
        ensure!(
            unique.len() == peers.len(),
            "{dst}: {} connections share {} distinct source ports",
            peers.len(),
            unique.len()
        );
        // The server's own record agrees with ss.
        let mut accepted = server.peers();
        accepted.sort();
        let mut listed = peers;
        listed.sort();
        ensure!(
            accepted == listed,
            "{dst}: accepted peers differ from ss's list"
        );
    }

    // 200 distinct inside endpoints; the far server's flows reuse their mappings.
    let m = wait_for_gauges(&mut agent, "250 sessions and 200 TCP ports in use", |m| {
        let sessions = m.require("xdpnat_sessions", &[])?;
        let ports = m.sum(
            "xdpnat_snat_ports_in_use",
            &[("address", "203.0.113.1"), ("protocol", "tcp")],
        );
        Ok((sessions >= 250.0 && ports >= 200.0)
            .then_some(())
            .ok_or(format!("{sessions} sessions, {ports} TCP ports in use")))
    })?;
    ensure!(packets_with_reason(&m, "table_full") == 0.0);
    ensure!(packets_with_reason(&m, "no_port") == 0.0);
    // The session filter counts each session's two keys by destination endpoint: the two
    // servers' (original direction) and the 200 external endpoints (replies), give or take
    // a hash collision; never more slots than keys.
    let filter_slots = m.require("xdpnat_session_filter_slots_in_use", &[])?;
    let sessions = m.require("xdpnat_sessions", &[])?;
    ensure!(
        (190.0..=2.0 * sessions).contains(&filter_slots),
        "{filter_slots} session filter slots in use for {sessions} sessions"
    );
    let list = agent.sessions_list(&["--protocol", "tcp", "--address", "203.0.113.1"])?;
    let matched = list["matched"].as_u64().unwrap_or(0);
    ensure!(
        matched >= 250,
        "sessions list matched {matched} TCP sessions on 203.0.113.1, expected 250"
    );
    drop(streams);
    Ok(())
}

/// RFC 4787 REQ-1 (endpoint-independent mapping) for TCP and UDP: one inside endpoint keeps
/// its external endpoint towards any destination while the mapping lives.
#[test]
fn mappings_are_endpoint_independent_for_tcp_and_udp() -> Result<()> {
    let lab = SnatLab::new()?;
    let public = lab.public.name();
    let private = lab.private.name();
    let tcp_near = TcpEchoServer::start(public, SocketAddrV4::new(SnatLab::PUBLIC_ADDR, 7000))?;
    let tcp_far = TcpEchoServer::start(public, SocketAddrV4::new(SnatLab::PUBLIC_FAR_ADDR, 7000))?;
    let udp_near = UdpPeerEcho::start(public, SocketAddrV4::new(SnatLab::PUBLIC_ADDR, 5300))?;
    let udp_far = UdpPeerEcho::start(public, SocketAddrV4::new(SnatLab::PUBLIC_FAR_ADDR, 5300))?;
    let _agent = start_agent(&lab.nat, SNAT_CONFIG)?;

    // Below the range, so the external port is the NAT's choice, not a kept one.
    let tcp_source = SocketAddrV4::new(SnatLab::PRIVATE_ADDR, 705);
    let mut streams = tcp_connect_all(
        private,
        &[
            (Some(tcp_source), tcp_near.local_addr()),
            (Some(tcp_source), tcp_far.local_addr()),
        ],
        IO_TIMEOUT,
    )
    .context("no reply through the NAT")?;
    for stream in &mut streams {
        tcp_roundtrip(stream, b"eim", IO_TIMEOUT).context("no reply through the NAT")?;
    }
    let (near, far) = (tcp_near.peers(), tcp_far.peers());
    ensure!(near.len() == 1 && far.len() == 1);
    ensure!(
        near[0] == far[0],
        "TCP {tcp_source} appears as {} to one server and {} to the other",
        near[0],
        far[0]
    );

    let udp_source = SocketAddrV4::new(SnatLab::PRIVATE_ADDR, 704);
    let socket = udp_bind(private, udp_source)?;
    let near = udp_peer_roundtrip(&socket, udp_near.local_addr(), IO_TIMEOUT)
        .context("no reply through the NAT")?;
    let far = udp_peer_roundtrip(&socket, udp_far.local_addr(), IO_TIMEOUT)
        .context("no reply through the NAT")?;
    ensure!(
        near == far,
        "UDP {udp_source} appears as {near} to one server and {far} to the other"
    );
    ensure!(*near.ip() == SnatLab::NAT_PUBLIC_ADDR && in_port_range(near.port()));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Timeouts and the expiry sweep
// ---------------------------------------------------------------------------------------------

/// A sweep every second and a 2-second transitory timeout (below the RFC floor, allowed for
/// this test only); the established timeout stays at its default.
const FAST_SWEEP_CONNTRACK: &str = r#"[conntrack]
gc_interval = 1
tcp_transitory_timeout = 2
tcp_closed_timeout = 2
allow_below_rfc_floors = true
"#;

/// An idle established TCP connection outlives several sweeps and the transitory timeout:
/// only a session wrongly left in a transitory state would be swept.
#[test]
fn long_lived_tcp_connection_survives_the_expiry_sweep() -> Result<()> {
    let lab = SnatLab::new()?;
    let server = TcpEchoServer::start(
        lab.public.name(),
        SocketAddrV4::new(SnatLab::PUBLIC_ADDR, 7001),
    )?;
    let mut agent = start_agent(&lab.nat, &snat_config_with_conntrack(FAST_SWEEP_CONNTRACK))?;

    let source = SocketAddrV4::new(SnatLab::PRIVATE_ADDR, 701);
    let mut stream = tcp_connect(
        lab.private.name(),
        Some(source),
        server.local_addr(),
        IO_TIMEOUT,
    )
    .context("no reply through the NAT")?;
    tcp_roundtrip(&mut stream, b"before the idle period", IO_TIMEOUT)
        .context("no reply through the NAT")?;
    let peers = server.peers();
    ensure!(peers.len() == 1);
    let external = peers[0];
    ensure!(
        *external.ip() == SnatLab::NAT_PUBLIC_ADDR && in_port_range(external.port()),
        "the server sees {external}"
    );

    let before = agent.metrics()?;
    let gc_before = before.require("xdpnat_gc_runs_total", &[])?;
    let idle_start = Instant::now();
    // Idle: longer than the transitory timeout and more than three sweep intervals, and at
    // least three sweeps observed (bounded wait).
    thread::sleep(Duration::from_millis(4500));
    let after_idle = wait_until(
        "three expiry sweeps during the idle period",
        Duration::from_secs(10),
        || {
            let m = agent.metrics()?;
            let runs = m.require("xdpnat_gc_runs_total", &[])?;
            Ok(if runs >= gc_before + 3.0 {
                Check::Done(m)
            } else {
                Check::NotYet(format!("{} sweeps so far", runs - gc_before))
            })
        },
    )?;
    ensure!(idle_start.elapsed() >= Duration::from_secs(4));
    ensure!(
        expiries(&after_idle, "tcp") == expiries(&before, "tcp"),
        "the sweep expired a TCP session during the idle period"
    );

    tcp_roundtrip(&mut stream, b"after the idle period", IO_TIMEOUT)
        .context("no reply through the NAT after the idle period (session swept?)")?;
    ensure!(
        server.peers().len() == 1,
        "the server accepted another connection"
    );
    let conns = established_tcp(lab.public.name(), 7001)?;
    ensure!(
        conns.len() == 1 && conns[0].peer == external,
        "the server's connection changed: {conns:?}, was from {external}"
    );
    let after = agent.metrics()?;
    ensure!(
        packets_with_reason(&after, "session_new") == packets_with_reason(&before, "session_new"),
        "the exchange after the idle period created a new session"
    );
    ensure!(expiries(&after, "tcp") == expiries(&before, "tcp"));
    ensure!(after.require("xdpnat_sessions", &[])? >= 1.0);
    let list = agent.sessions_list(&["--protocol", "tcp"])?;
    let sessions = session_entries(&list)?;
    ensure!(
        sessions.len() == 1 && sessions[0]["state"] == "ESTABLISHED",
        "the one TCP session must be ESTABLISHED: {list}"
    );
    Ok(())
}

/// How long the UDP mapping stays silent: RFC 4787 REQ-5's two minutes, plus margin.
const UDP_SILENCE: Duration = Duration::from_secs(125);

/// An idle UDP mapping survives two minutes of silence with the agent's default timeouts
/// (the `[conntrack]` section omitted). Slow by nature: about 130 seconds.
#[test]
fn idle_udp_mapping_survives_two_minutes_of_silence_with_default_timeouts() -> Result<()> {
    let lab = SnatLab::new()?;
    let server = UdpPeerEcho::start(
        lab.public.name(),
        SocketAddrV4::new(SnatLab::PUBLIC_ADDR, 5300),
    )?;
    let mut agent = start_agent(&lab.nat, &snat_config_with_default_conntrack())?;

    let source = SocketAddrV4::new(SnatLab::PRIVATE_ADDR, 702);
    let socket = udp_bind(lab.private.name(), source)?;
    let first = udp_peer_roundtrip(&socket, server.local_addr(), IO_TIMEOUT)
        .context("no reply through the NAT")?;
    ensure!(
        *first.ip() == SnatLab::NAT_PUBLIC_ADDR && in_port_range(first.port()),
        "the server sees {first}"
    );
    let before = agent.metrics()?;
    let gc_before = before.require("xdpnat_gc_runs_total", &[])?;

    // Silence, bounded; the agent is checked now and then so a crash fails early.
    let silence_start = Instant::now();
    while silence_start.elapsed() < UDP_SILENCE {
        thread::sleep(Duration::from_secs(5).min(UDP_SILENCE - silence_start.elapsed()));
        agent.ensure_running()?;
    }

    let second =
        udp_peer_roundtrip(&socket, server.local_addr(), IO_TIMEOUT).with_context(|| {
            format!(
                "no reply through the NAT after {} s of silence",
                UDP_SILENCE.as_secs()
            )
        })?;
    ensure!(
        second == first,
        "after {} s of silence the server sees {second}, before it saw {first}",
        UDP_SILENCE.as_secs()
    );
    ensure!(server.peers() == [first, first]);
    let after = agent.metrics()?;
    ensure!(
        after.require("xdpnat_gc_runs_total", &[])? >= gc_before + 2.0,
        "the expiry sweep did not run during the silence"
    );
    ensure!(
        expiries(&after, "udp") == expiries(&before, "udp"),
        "a UDP session expired during the silence"
    );
    ensure!(
        packets_with_reason(&after, "session_new") == packets_with_reason(&before, "session_new"),
        "the datagram after the silence created a new session"
    );
    Ok(())
}

/// The defaults and floors of the conntrack timeouts. With the `[conntrack]` section omitted
/// (the config of the idle-UDP test), the agent's own config loading yields the RFC-floor
/// defaults the issue names (UDP 300 s, TCP established 7440 s, transitory 240 s, ICMP 60 s);
/// and `nat-agent check` accepts each timeout at its floor and refuses it one second below,
/// naming the field and the floor, unless the config says it is a lab.
#[test]
fn conntrack_defaults_are_the_rfc_defaults_and_floors_are_enforced() -> Result<()> {
    let socket = std::env::temp_dir().join("xnl-check-only-api.sock");
    let defaults = agent::TempConfig::new(
        &snat_config_with_default_conntrack()
            .replace(API_SOCKET_PLACEHOLDER, &socket.display().to_string()),
    )?;
    let (model, _) = nat_agent::load_config(defaults.path())
        .map_err(|e| anyhow::anyhow!("{}", e.0))
        .context("loading the config without [conntrack]")?;
    let t = model.conntrack.timeouts;
    let secs = |d: Duration| d.as_secs();
    ensure!(
        (
            secs(t.udp),
            secs(t.tcp_established),
            secs(t.tcp_transitory),
            secs(t.icmp)
        ) == (300, 7440, 240, 60),
        "default timeouts are not the RFC-floor defaults: {t:?}"
    );
    // The same through the binary: `check` prints the effective values, defaults included.
    let out = std::process::Command::new(AGENT)
        .args(["check", "--config"])
        .arg(defaults.path())
        .output()
        .context("running nat-agent check")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success()
            && stdout.contains(
                "udp_timeout=300s tcp_established_timeout=7440s tcp_transitory_timeout=240s \
                 tcp_closed_timeout=10s icmp_timeout=60s"
            ),
        "`nat-agent check` does not report the default timeouts: {stdout}"
    );

    let check = |conntrack: &str| -> Result<(Option<i32>, String)> {
        // `check` never creates the socket; it only has to be an absolute path.
        let socket = std::env::temp_dir().join("xnl-check-only-api.sock");
        let text = snat_config_with_conntrack(conntrack)
            .replace(API_SOCKET_PLACEHOLDER, &socket.display().to_string());
        let config = agent::TempConfig::new(&text)?;
        let out = std::process::Command::new(AGENT)
            .args(["check", "--config"])
            .arg(config.path())
            .output()
            .context("running nat-agent check")?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let (code, stderr) = check("")?;
    ensure!(
        code == Some(0),
        "a config without [conntrack] is refused: {stderr}"
    );
    for (field, floor) in [
        ("udp_timeout", 120),
        ("tcp_established_timeout", 7440),
        ("tcp_transitory_timeout", 240),
        ("icmp_timeout", 60),
    ] {
        let (code, stderr) = check(&format!("[conntrack]\n{field} = {floor}\n"))?;
        ensure!(
            code == Some(0),
            "{field} = {floor} (the floor) is refused: {stderr}"
        );
        let below = floor - 1;
        let (code, stderr) = check(&format!("[conntrack]\n{field} = {below}\n"))?;
        ensure!(
            code == Some(2),
            "{field} = {below} (below the floor) gave {code:?}, expected exit 2: {stderr}"
        );
        ensure!(
            stderr.contains(field) && stderr.contains(&floor.to_string()),
            "the refusal of {field} = {below} must name the field and the floor: {stderr}"
        );
        let (code, stderr) = check(&format!(
            "[conntrack]\n{field} = {below}\nallow_below_rfc_floors = true\n"
        ))?;
        ensure!(
            code == Some(0),
            "{field} = {below} with allow_below_rfc_floors is refused: {stderr}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The sessions CLI
// ---------------------------------------------------------------------------------------------

/// `nat-agent sessions list --json` shows a masqueraded UDP flow with both tuples, and its
/// filters select it.
#[test]
fn sessions_cli_lists_a_masqueraded_flow() -> Result<()> {
    let lab = SnatLab::new()?;
    let server = UdpPeerEcho::start(
        lab.public.name(),
        SocketAddrV4::new(SnatLab::PUBLIC_ADDR, 5300),
    )?;
    let agent = start_agent(&lab.nat, SNAT_CONFIG)?;
    let source = SocketAddrV4::new(SnatLab::PRIVATE_ADDR, 703);
    let socket = udp_bind(lab.private.name(), source)?;
    let external = udp_peer_roundtrip(&socket, server.local_addr(), IO_TIMEOUT)
        .context("no reply through the NAT")?;

    let list = agent.sessions_list(&["--protocol", "udp"])?;
    let entries = session_entries(&list)?;
    ensure!(
        entries.len() == 1,
        "expected exactly the one UDP session, got {list}"
    );
    let session = &entries[0];
    let tuple = |t: &serde_json::Value| {
        format!(
            "{}:{} -> {}:{}",
            t["src"].as_str().unwrap_or("?"),
            t["sport"],
            t["dst"].as_str().unwrap_or("?"),
            t["dport"]
        )
    };
    // As conntrack -L shows it: the original tuple as sent, the reply tuple as it arrives.
    ensure!(
        session["protocol"] == "udp" && session["snat_rule"] == "private-out",
        "session {session}"
    );
    ensure!(
        tuple(&session["original"]) == "198.18.0.2:703 -> 203.0.113.10:5300",
        "original tuple {} in {session}",
        tuple(&session["original"])
    );
    let reply = format!("203.0.113.10:5300 -> {external}");
    ensure!(
        tuple(&session["reply"]) == reply,
        "reply tuple {} in {session}, expected {reply}",
        tuple(&session["reply"])
    );
    ensure!(
        session["original_packets"] == 1 && session["reply_packets"] == 1,
        "one datagram each way: {session}"
    );
    let by_port = agent.sessions_list(&["--protocol", "udp", "--port", "5300"])?;
    ensure!(
        session_entries(&by_port)?.len() == 1,
        "--port 5300: {by_port}"
    );
    let other = agent.sessions_list(&["--address", "198.18.0.3"])?;
    ensure!(
        session_entries(&other)?.is_empty(),
        "--address 198.18.0.3 must match nothing: {other}"
    );
    let tcp = agent.sessions_list(&["--protocol", "tcp"])?;
    ensure!(session_entries(&tcp)?.is_empty(), "--protocol tcp: {tcp}");
    Ok(())
}
