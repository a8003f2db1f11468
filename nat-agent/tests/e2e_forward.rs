//! End-to-end: translated packets leave straight from XDP (`forwarding = "xdp"`), with the
//! kernel's FIB as the source of routes and neighbours. Checked against the kernel's own
//! forwarding counter in the NAT namespace: XDP-forwarded packets never reach it.

use std::{net::SocketAddrV4, time::Duration};

use anyhow::{ensure, Context, Result};
use nat_lab::{
    http_get, sockets::TcpEchoServer, wait_until, Check, DnatLab, EchoReply, HttpEcho, Netns,
    SnatLab, UdpEcho,
};

#[path = "common/agent.rs"]
mod agent;

use agent::{
    attach_pass_through, ping_public_host, snat_lab_flow, snat_xdp_config,
    with_public_host_blackholed, Agent, API_SOCKET_PLACEHOLDER, METRICS_LISTEN,
};

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
    let mut agent = Agent::start(&lab.nat, &snat_xdp_config())?;
    let forwarded_before = kernel_forwarded(&lab.nat)?;

    // ICMP, then TCP with a bounded number of round trips. The very first packets meet an
    // empty neighbour table: they go through the kernel, which resolves the next hop; the
    // flow must not notice.
    ping_public_host(&lab, "through the NAT")?;
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
    let mut agent = Agent::start(&lab.nat, &snat_xdp_config())?;
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

/// ICMP errors from outside about translated flows reach the inside host translated (a UDP
/// socket sees "connection refused", tracepath sees the far hop answer), and errors about the
/// appliance's own traffic still reach its kernel (tracepath and ping from the NAT itself).
#[test]
fn icmp_errors_reach_inside_hosts_and_the_appliance() -> Result<()> {
    let lab = SnatLab::new()?;
    let mut agent = Agent::start(&lab.nat, &snat_xdp_config())?;
    let target = SnatLab::PUBLIC_ADDR.to_string();

    // Port 9 has no listener on the public host: its port unreachable, sent to the NAT's
    // address and quoting the translated datagram, must come back as ECONNREFUSED.
    let refused = lab.private.run(
        "python3",
        [
            "-c",
            &format!(
                "import socket\n\
                 s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
                 s.settimeout(3)\n\
                 s.connect(('{target}',9))\n\
                 s.send(b'x')\n\
                 try:\n\
                 \x20 s.recv(10)\n\
                 \x20 print('answered')\n\
                 except ConnectionRefusedError:\n\
                 \x20 print('refused')\n\
                 except socket.timeout:\n\
                 \x20 print('timeout')"
            ),
        ],
    )?;
    ensure!(
        refused.trim() == "refused",
        "the inside host's UDP socket saw {refused:?} instead of the translated port unreachable"
    );

    let from_inside = lab.private.run("tracepath", ["-n", "-m", "3", &target])?;
    ensure!(
        from_inside.contains(&format!("2:  {target}")) && from_inside.contains("reached"),
        "tracepath from inside did not reach the public host:\n{from_inside}"
    );

    // The appliance's own traffic: its errors quote its own sockets, not a NAT flow.
    let from_nat = lab.nat.run("tracepath", ["-n", "-m", "2", &target])?;
    ensure!(
        from_nat.contains(&format!("1:  {target}")) && from_nat.contains("reached"),
        "tracepath from the NAT itself did not reach the public host:\n{from_nat}"
    );
    let ping = lab
        .nat
        .run("ping", ["-c", "2", "-i", "0.2", "-W", "1", &target])?;
    ensure!(
        ping.contains(" 0% packet loss"),
        "ping from the NAT: {ping}"
    );

    wait_until(
        "the ICMP errors to be counted",
        Duration::from_secs(5),
        || {
            let m = agent.metrics()?;
            let translated = m.sum(
                "xdpnat_packets_total",
                &[
                    ("reason", "icmp_error_translated"),
                    ("action", "translated"),
                ],
            );
            let passed = m.sum(
                "xdpnat_packets_total",
                &[("reason", "icmp_error_passed"), ("action", "pass")],
            );
            Ok(if translated >= 2.0 && passed >= 1.0 {
                Check::Done(())
            } else {
                Check::NotYet(format!("translated {translated}, passed {passed}"))
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

/// Scenario 4, the one-arm appliance: client, NAT and backend share one L2 segment (a bridge in
/// its own namespace, standing in for the cloud's load balancer delivering everything to
/// eth0). The NAT has a single interface; DNAT plus MASQUERADE makes the backend answer the
/// NAT, and XDP sends every translated frame back out of the interface it came in on.
#[test]
fn one_arm_dnat_with_masquerade_transmits_back_out_of_the_same_interface() -> Result<()> {
    let switch = Netns::new()?;
    let client = Netns::new()?;
    let nat = Netns::new()?;
    let backend = Netns::new()?;
    switch.run("ip", ["link", "add", "br0", "type", "bridge"])?;
    switch.run("ip", ["link", "set", "br0", "up"])?;
    let hosts = [
        (&client, "c0", "198.18.0.2/24"),
        (&nat, "n0", "198.18.0.1/24"),
        (&backend, "b0", "198.18.0.3/24"),
    ];
    for (i, (host, dev, addr)) in hosts.iter().enumerate() {
        let port = format!("s{i}");
        switch.run(
            "ip",
            [
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                dev,
                "netns",
                host.name(),
            ],
        )?;
        switch.run("ip", ["link", "set", &port, "master", "br0", "up"])?;
        host.run("ip", ["addr", "add", addr, "dev", dev])?;
        host.run("ip", ["link", "set", dev, "up"])?;
        host.run("ip", ["link", "set", "lo", "up"])?;
        // Full checksums off the endpoints, as off a real wire.
        host.run("ethtool", ["-K", dev, "tx", "off"])?;
    }
    // s1 is the NAT's bridge port: it receives what XDP_TX sends back out of n0.
    let _peer_program = attach_pass_through(switch.name(), "s1")?;
    client.run(
        "ip",
        ["route", "add", "198.18.100.10/32", "via", "198.18.0.1"],
    )?;
    nat.sysctl("net.ipv4.ip_forward", "1")?;
    for iface in ["all", "default", "n0"] {
        nat.sysctl(&format!("net.ipv4.conf.{iface}.rp_filter"), "0")?;
        // One-arm: the kernel would otherwise tell the client to go direct.
        nat.sysctl(&format!("net.ipv4.conf.{iface}.send_redirects"), "0")?;
    }
    let _http = HttpEcho::start(backend.name(), &[80])?;
    let config = format!(
        r#"
[agent]
metrics_listen = "{METRICS_LISTEN}"
api_socket = "{API_SOCKET_PLACEHOLDER}"

[conntrack]
max_sessions = 4096

[[interfaces]]
name = "n0"
xdp_mode = "native"
forwarding = "xdp"

[[dnat]]
id = 1
name = "vip-web"
destination = "198.18.100.10"
protocol = "tcp"
port = 80
to_address = "198.18.0.3"
to_port = 80

[[snat]]
id = 2
name = "one-arm-masquerade"
source = "198.18.0.0/24"
destination = "198.18.0.3"
masquerade = true
"#
    );
    let mut agent = Agent::start(&nat, &config)?;
    for _ in 0..5 {
        let reply: EchoReply = http_get(client.name(), "http://198.18.100.10/")?.parse()?;
        ensure!(
            reply.server.to_string() == "198.18.0.3:80"
                && *reply.client.ip() == std::net::Ipv4Addr::new(198, 18, 0, 1),
            "one-arm: the backend must see the NAT's address: {reply:?}"
        );
    }
    let metrics = agent.metrics()?;
    let transmitted = metrics.require("xdpnat_forward_total", &[("result", "transmitted")])?;
    ensure!(
        transmitted >= 20.0,
        "only {transmitted} frames went back out of the same interface from XDP:\n{}",
        agent.log_tail(2000)
    );
    ensure!(
        metrics.sum("xdpnat_forward_total", &[("result", "redirected")]) == 0.0,
        "a one-arm appliance has nowhere else to redirect to"
    );
    Ok(())
}

/// The route cache follows the kernel: an established flow forwarded from XDP stops at once
/// when its route becomes a blackhole, and flows again when the route comes back, with the
/// agent hearing of each change from the kernel (nothing here tells it). With a cache that
/// did not follow, the flow would carry on over the old route for its entries' remaining uses.
#[test]
fn a_route_change_reaches_xdp_forwarding_at_once() -> Result<()> {
    let lab = SnatLab::new()?;
    let _echo = UdpEcho::start(lab.public.name(), &[5400])?;
    let mut agent = Agent::start(&lab.nat, &snat_xdp_config())?;
    // One flow throughout: the same session and the same question to the FIB (and the same
    // cache entry).
    let exchange = snat_lab_flow(&lab, 40_123, 5400);
    let before = exchange(20)?;
    ensure!(
        before.received >= 18,
        "the flow did not work to begin with: {before:?}"
    );
    let hits = agent
        .metrics()?
        .sum("xdpnat_route_cache_total", &[("result", "hit")]);
    ensure!(
        hits >= 10.0,
        "the route cache answered only {hits} packets: is it on?\n{}",
        agent.log_tail(2000)
    );

    let blocked = with_public_host_blackholed(&lab, || {
        // The notification reaches the agent in well under this.
        std::thread::sleep(Duration::from_millis(200));
        exchange(5)
    })?;
    ensure!(
        blocked.received == 0,
        "packets still got through a blackhole route: {blocked:?}"
    );
    let via_kernel = agent
        .metrics()?
        .sum("xdpnat_forward_total", &[("result", "no_route")]);
    ensure!(
        via_kernel >= 5.0,
        "XDP did not see the blackhole ({via_kernel} packets without a route)"
    );

    std::thread::sleep(Duration::from_millis(200));
    let after = exchange(10)?;
    ensure!(
        after.received >= 9,
        "the flow did not come back with its route: {after:?}"
    );
    Ok(())
}
