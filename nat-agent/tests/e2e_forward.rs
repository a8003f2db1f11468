//! End-to-end: translated packets leave straight from XDP (`forwarding = "xdp"`), with the
//! kernel's FIB as the source of routes and neighbours. Checked against the kernel's own
//! forwarding counter in the NAT namespace: XDP-forwarded packets never reach it.

use std::{net::SocketAddrV4, time::Duration};

use anyhow::{ensure, Context, Result};
use nat_lab::{
    http_get, sockets::TcpEchoServer, wait_until, Check, DnatLab, EchoReply, HttpEcho, Netns,
    SnatLab,
};

#[path = "common/agent.rs"]
mod agent;

use agent::{Agent, API_SOCKET_PLACEHOLDER, METRICS_LISTEN};

fn snat_config() -> String {
    format!(
        r#"
[agent]
metrics_listen = "{METRICS_LISTEN}"
api_socket = "{API_SOCKET_PLACEHOLDER}"

[conntrack]
max_sessions = 4096

[[interfaces]]
name = "{inside}"
xdp_mode = "native"
forwarding = "xdp"

[[interfaces]]
name = "{outside}"
xdp_mode = "native"
forwarding = "xdp"

[[snat]]
id = 100
name = "private-out"
source = "{private}"
masquerade = true
"#,
        inside = SnatLab::NAT_INSIDE_IF,
        outside = SnatLab::NAT_OUTSIDE_IF,
        private = SnatLab::PRIVATE_NET,
    )
}

/// `Ip: ForwDatagrams` of the namespace: packets the kernel forwarded.
fn kernel_forwarded(ns: &Netns) -> Result<u64> {
    let snmp = ns.run("cat", ["/proc/net/snmp"])?;
    let mut ip_lines = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (
        ip_lines.next().context("no Ip: header in /proc/net/snmp")?,
        ip_lines.next().context("no Ip: values in /proc/net/snmp")?,
    );
    let column = names
        .split_whitespace()
        .position(|n| n == "ForwDatagrams")
        .context("no ForwDatagrams column")?;
    values
        .split_whitespace()
        .nth(column)
        .context("short Ip: line")?
        .parse()
        .context("ForwDatagrams is not a number")
}

#[test]
fn snat_flows_leave_from_xdp_and_the_first_neighbour_is_learned() -> Result<()> {
    let lab = SnatLab::new()?;
    let server = TcpEchoServer::start(
        lab.public.name(),
        SocketAddrV4::new(SnatLab::PUBLIC_ADDR, 7000),
    )?;
    let mut agent = Agent::start(&lab.nat, &snat_config())?;
    let forwarded_before = kernel_forwarded(&lab.nat)?;

    // ICMP, then TCP with a bounded number of round trips. The very first packets meet an
    // empty neighbour table: they go through the kernel, which resolves the next hop; the
    // flow must not notice.
    let ping = lab.private.run(
        "ping",
        [
            "-c",
            "5",
            "-i",
            "0.2",
            "-W",
            "1",
            &SnatLab::PUBLIC_ADDR.to_string(),
        ],
    )?;
    ensure!(
        ping.contains(" 0% packet loss"),
        "ping through the NAT: {ping}"
    );
    let target = SnatLab::PUBLIC_ADDR.to_string();
    for round in 0..5 {
        let out = lab.private.run(
            "python3",
            [
                "-c",
                &format!(
                    "import socket\n\
                     s=socket.create_connection(('{target}',7000),timeout=3)\n\
                     for i in range(10):\n\
                     \x20 s.sendall(b'x'*100)\n\
                     \x20 got=b''\n\
                     \x20 while len(got)<100: got+=s.recv(100-len(got))\n\
                     print('ok')"
                ),
            ],
        )?;
        ensure!(
            out.trim() == "ok",
            "TCP round {round} through the NAT: {out}"
        );
    }
    ensure!(
        server
            .peers()
            .iter()
            .all(|p| *p.ip() == SnatLab::NAT_PUBLIC_ADDR),
        "the server saw other sources than the NAT's address: {:?}",
        server.peers()
    );

    let metrics = agent.metrics()?;
    let redirected = metrics.require("xdpnat_forward_total", &[("result", "redirected")])?;
    let via_kernel = [
        "no_neighbour",
        "no_route",
        "mtu_exceeded",
        "kernel_forwards",
    ]
    .iter()
    .map(|r| metrics.sum("xdpnat_forward_total", &[("result", r)]))
    .sum::<f64>();
    // 10 ICMP + 5 connections of (handshake, 10 exchanges, teardown) in both directions.
    ensure!(
        redirected >= 60.0,
        "only {redirected} packets left from XDP:\n{}",
        agent.log_tail(2000)
    );
    let kernel = kernel_forwarded(&lab.nat)? - forwarded_before;
    ensure!(
        kernel as f64 <= via_kernel,
        "the kernel forwarded {kernel} packets but XDP handed it only {via_kernel}"
    );
    ensure!(
        metrics.sum("xdpnat_forward_total", &[("result", "no_neighbour")]) >= 1.0,
        "no packet waited for a neighbour: the test did not start with an empty neighbour table"
    );
    Ok(())
}

#[test]
fn tracepath_shows_the_nat_hop_when_xdp_forwards() -> Result<()> {
    let lab = SnatLab::new()?;
    let mut agent = Agent::start(&lab.nat, &snat_config())?;
    let out = lab.private.run(
        "tracepath",
        ["-n", "-m", "2", &SnatLab::PUBLIC_ADDR.to_string()],
    );
    // tracepath exits non-zero when it does not reach the target within -m hops; what matters
    // is the first hop's answer: the NAT, answering for the TTL it saw expire.
    let text = match out {
        Ok(text) => text,
        Err(e) => format!("{e:#}"),
    };
    let hop = format!("1:  {}", SnatLab::NAT_INSIDE_ADDR);
    ensure!(
        text.contains(&hop),
        "tracepath did not show the NAT hop:\n{text}"
    );
    wait_until(
        "the TTL hand-off to be counted",
        Duration::from_secs(5),
        || {
            let m = agent.metrics()?;
            let n = m.sum(
                "xdpnat_packets_total",
                &[("reason", "ttl_expiring"), ("action", "pass")],
            );
            Ok(if n >= 1.0 {
                Check::Done(())
            } else {
                Check::NotYet("no ttl_expiring exit yet".into())
            })
        },
    )
}

#[test]
fn dnat_vips_answer_with_xdp_forwarding() -> Result<()> {
    let lab = DnatLab::new()?;
    let _http = HttpEcho::start(lab.backend.name(), &[80, 8080])?;
    let config = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/lab.toml"),
    )?
    .replace(
        "xdp_mode = \"auto\"",
        "xdp_mode = \"auto\"\nforwarding = \"xdp\"",
    )
    .replace(
        "[agent]",
        &format!("[agent]\napi_socket = \"{API_SOCKET_PLACEHOLDER}\""),
    );
    let mut agent = Agent::start(&lab.nat, &config)?;
    for (url, backend) in [
        ("http://198.18.100.10/", "198.18.1.2:80"),
        ("http://198.18.100.11/", "198.18.1.2:8080"),
        ("http://198.18.100.11:22/", "198.18.1.3:80"),
    ] {
        for _ in 0..3 {
            let reply: EchoReply = http_get(lab.client.name(), url)?.parse()?;
            ensure!(
                reply.server.to_string() == backend && *reply.client.ip() == DnatLab::CLIENT_ADDR,
                "{url}: {reply:?}"
            );
        }
    }
    let redirected = agent
        .metrics()?
        .require("xdpnat_forward_total", &[("result", "redirected")])?;
    ensure!(
        redirected >= 30.0,
        "only {redirected} packets left from XDP"
    );
    Ok(())
}
