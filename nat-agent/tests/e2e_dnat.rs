//! End-to-end: the real agent binary attached to a client -- NAT -- backend lab, real clients
//! (curl, UDP sockets) and servers, and the NAT's counters checked against nftables counters
//! in the client namespace as ground truth.
//!
//! The rules are the unambiguous part of scenario 2 (DESIGN.md) mapped into the lab ranges:
//! two VIPs onto two different backend ports, and a VIP's :22 onto another backend's :80.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use nat_lab::{
    http_get, install_counter, read_counter, udp_exchange, wait_until, Check, DnatLab, EchoReply,
    Hook, HttpEcho, UdpEcho,
};

#[path = "common/agent.rs"]
mod agent;

use agent::{scrape_metrics, start_agent, xdp_attached, TempConfig, AGENT};

/// Ethernet header bytes the NAT counts on top of the IP length nftables counts.
const ETH_LEN: u64 = 14;

const CONFIG: &str = r#"
[agent]
metrics_listen = "127.0.0.1:9469"

[[interfaces]]
name = "n0"
xdp_mode = "native"

[[interfaces]]
name = "n1"
xdp_mode = "native"

[[dnat]]
id = 1
name = "vip1-http"
destination = "198.18.100.10"
protocol = "tcp"
port = 80
to_address = "198.18.1.2"
to_port = 80

[[dnat]]
id = 2
name = "vip2-http"
destination = "198.18.100.11"
protocol = "tcp"
port = 80
to_address = "198.18.1.2"
to_port = 8080

[[dnat]]
id = 3
name = "vip2-ssh-to-web"
destination = "198.18.100.11"
protocol = "tcp"
port = 22
to_address = "198.18.1.3"
to_port = 80

[[dnat]]
id = 4
name = "vip1-udp"
destination = "198.18.100.10"
protocol = "udp"
port = 5353
to_address = "198.18.1.2"
to_port = 5300
"#;

/// A TCP rule exercised with curl: where the client connects and who must answer.
struct HttpCase {
    rule: &'static str,
    vip: Ipv4Addr,
    vip_port: u16,
    backend: SocketAddrV4,
}

const HTTP_CASES: [HttpCase; 3] = [
    HttpCase {
        rule: "vip1-http",
        vip: DnatLab::VIP1,
        vip_port: 80,
        backend: SocketAddrV4::new(DnatLab::BACKEND_ADDR, 80),
    },
    HttpCase {
        rule: "vip2-http",
        vip: DnatLab::VIP2,
        vip_port: 80,
        backend: SocketAddrV4::new(DnatLab::BACKEND_ADDR, 8080),
    },
    HttpCase {
        rule: "vip2-ssh-to-web",
        vip: DnatLab::VIP2,
        vip_port: 22,
        backend: SocketAddrV4::new(DnatLab::BACKEND_ADDR2, 80),
    },
];

/// Parses the Prometheus text format into `name{labels}` -> value.
fn scrape(lab: &DnatLab) -> Result<BTreeMap<String, u64>> {
    Ok(scrape_metrics(lab.nat.name())?.series())
}

fn rule_series(metric: &str, rule: &str, direction: &str) -> String {
    format!("{metric}{{direction=\"{direction}\",rule=\"{rule}\"}}")
}

fn metric(metrics: &BTreeMap<String, u64>, series: &str) -> Result<u64> {
    metrics
        .get(series)
        .copied()
        .with_context(|| format!("series {series} missing from the metrics"))
}

#[test]
fn scenario2_dnat_through_two_vips_with_exact_counters() -> Result<()> {
    let lab = DnatLab::new()?;
    let _http = HttpEcho::start(lab.backend.name(), &[80, 8080])?;
    let _udp = UdpEcho::start(lab.backend.name(), &[5300])?;
    let config = TempConfig::new(CONFIG)?;

    // Ground truth: what the client sent to and received from each VIP:port.
    let client = lab.client.name();
    for case in &HTTP_CASES {
        let (vip, port) = (case.vip, case.vip_port);
        install_counter(
            client,
            &format!("to_{}", case.rule.replace('-', "_")),
            Hook::Output,
            &format!("ip daddr {vip} tcp dport {port}"),
        )?;
        install_counter(
            client,
            &format!("from_{}", case.rule.replace('-', "_")),
            Hook::Input,
            &format!("ip saddr {vip} tcp sport {port}"),
        )?;
    }

    let mut agent = start_agent(&lab.nat, &config)?;
    for iface in [DnatLab::NAT_CLIENT_IF, DnatLab::NAT_BACKEND_IF] {
        ensure!(xdp_attached(&lab.nat, iface)?, "no XDP program on {iface}");
    }

    // Each VIP reaches its own backend; the backend sees the client's real address; the
    // connection completing at all means the replies came back from the VIP the client used
    // (a SYN-ACK from the backend address would have been reset), and the `from_*` counters
    // below prove it packet by packet.
    for case in &HTTP_CASES {
        for _ in 0..3 {
            let url = format!("http://{}:{}/", case.vip, case.vip_port);
            let body = http_get(client, &url).with_context(|| format!("curl {url}"))?;
            let reply: EchoReply = body.parse()?;
            ensure!(
                *reply.client.ip() == DnatLab::CLIENT_ADDR,
                "{url}: backend saw {} instead of the client's address",
                reply.client
            );
            ensure!(
                reply.server == case.backend,
                "{url}: answered by {} instead of {}",
                reply.server,
                case.backend
            );
        }
    }

    // UDP: a known number of datagrams, so the counters must match exactly.
    let sent = 25;
    let exchange = udp_exchange(
        client,
        SocketAddrV4::new(DnatLab::VIP1, 5353),
        sent,
        Duration::from_secs(2),
    )?;
    ensure!(
        exchange.received == sent,
        "UDP through the VIP: {} of {sent} replies",
        exchange.received
    );

    // The NAT's per-rule counters equal what the client's stack sent and received (plus the
    // Ethernet header per frame). TCP teardown packets may still be in flight, so wait for the
    // numbers to settle rather than reading once.
    wait_until(
        "NAT counters to match the client's",
        Duration::from_secs(10),
        || {
            let metrics = scrape(&lab)?;
            let mut mismatches = Vec::new();
            for case in &HTTP_CASES {
                let key = case.rule.replace('-', "_");
                for (direction, counter) in [
                    ("original", format!("to_{key}")),
                    ("reply", format!("from_{key}")),
                ] {
                    let truth = read_counter(client, &counter)?;
                    let packets = metric(
                        &metrics,
                        &rule_series("xdpnat_rule_packets_total", case.rule, direction),
                    )?;
                    let bytes = metric(
                        &metrics,
                        &rule_series("xdpnat_rule_bytes_total", case.rule, direction),
                    )?;
                    if truth.packets == 0 {
                        bail!("client counter {counter} saw no packets");
                    }
                    if packets != truth.packets || bytes != truth.bytes + ETH_LEN * truth.packets {
                        mismatches.push(format!(
                            "{} {direction}: NAT {packets} pkts/{bytes} B, client {} pkts/{} B",
                            case.rule, truth.packets, truth.bytes
                        ));
                    }
                }
            }
            // 25 UDP datagrams each way of 14 + 20 + 8 + payload bytes; the payload length is the
            // echo tool's, so check packets exactly and bytes per packet for consistency.
            for direction in ["original", "reply"] {
                let packets = metric(
                    &metrics,
                    &rule_series("xdpnat_rule_packets_total", "vip1-udp", direction),
                )?;
                if packets != u64::from(sent) {
                    mismatches.push(format!(
                        "vip1-udp {direction}: {packets} packets, sent {sent}"
                    ));
                }
            }
            Ok(if mismatches.is_empty() {
                Check::Done(())
            } else {
                Check::NotYet(mismatches.join("; "))
            })
        },
    )?;

    // Totals by reason agree with the per-rule sums.
    let metrics = scrape(&lab)?;
    let sum = |direction: &str| -> Result<u64> {
        let mut total = 0;
        for rule in ["vip1-http", "vip2-http", "vip2-ssh-to-web", "vip1-udp"] {
            total += metric(
                &metrics,
                &rule_series("xdpnat_rule_packets_total", rule, direction),
            )?;
        }
        Ok(total)
    };
    ensure!(
        metric(
            &metrics,
            "xdpnat_packets_total{action=\"translated\",reason=\"dnat\"}"
        )? == sum("original")?,
        "dnat reason total differs from the per-rule sum"
    );
    ensure!(
        metric(
            &metrics,
            "xdpnat_packets_total{action=\"translated\",reason=\"dnat_reply\"}"
        )? == sum("reply")?,
        "dnat_reply reason total differs from the per-rule sum"
    );

    // SIGTERM: clean exit, program detached from both interfaces.
    let status = agent.stop(Duration::from_secs(10))?;
    ensure!(
        status.success(),
        "agent exited with {status} on SIGTERM:\n{}",
        agent.log_tail(4000)
    );
    for iface in [DnatLab::NAT_CLIENT_IF, DnatLab::NAT_BACKEND_IF] {
        ensure!(
            !xdp_attached(&lab.nat, iface)?,
            "XDP program still attached to {iface} after SIGTERM"
        );
    }
    Ok(())
}

/// Two VIPs onto one backend port (scenario 2's exact shape) used to be refused: stateless
/// DNAT cannot tell whose reply is whose. With connection tracking `check` accepts it and
/// names both rules as stateful (their flows get sessions); every other rule stays stateless.
/// `check` touches no kernel state, so no lab is needed; the traffic test lives with SNAT.
#[test]
fn ambiguous_vips_onto_one_backend_port_are_accepted_as_stateful() -> Result<()> {
    // vip2-http now lands on the same backend port as vip1-http.
    let config = TempConfig::new(&CONFIG.replace("to_port = 8080", "to_port = 80"))?;
    let out = std::process::Command::new(AGENT)
        .args(["check", "--config"])
        .arg(config.path())
        .output()
        .context("running nat-agent check")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && stderr.is_empty(),
        "check refused the config ({}): {stderr}",
        out.status
    );
    let file = config.path().display().to_string();
    let lines: Vec<&str> = stdout.lines().collect();
    ensure!(
        lines.first()
            == Some(&format!("{file}: OK (4 dnat rules, 0 snat rules, 2 interfaces)").as_str()),
        "summary line: {stdout}"
    );
    // One line per stateful rule, naming the other rule and the shared backend port (the
    // conntrack settings line that follows is checked by the SNAT tests).
    let stateful: Vec<&str> = lines[1..]
        .iter()
        .copied()
        .filter(|l| !l.starts_with(&format!("{file}: conntrack ")))
        .collect();
    ensure!(stateful.len() == 2, "two stateful rules expected: {stdout}");
    for (line, (rule, other)) in stateful
        .iter()
        .zip([("vip1-http", "vip2-http"), ("vip2-http", "vip1-http")])
    {
        ensure!(
            line.starts_with(&format!("{file}: dnat rule \"{rule}\""))
                && line.contains("stateful")
                && line.contains("198.18.1.2/32 port 80")
                && line.contains(&format!("\"{other}\"")),
            "stateful line for {rule}: {line}"
        );
    }
    ensure!(
        !stdout.contains("vip2-ssh-to-web") && !stdout.contains("vip1-udp"),
        "unambiguous rules must stay stateless: {stdout}"
    );
    Ok(())
}
