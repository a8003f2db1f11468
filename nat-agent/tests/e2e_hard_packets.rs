//! End-to-end, the packets that are not easy (issue 4), through the two-arm SNAT lab with
//! translated packets leaving straight from XDP (`forwarding = "xdp"`):
//! - bulk traffic: `iperf3` TCP and UDP (3 s each) and ping;
//! - a 4000-byte UDP datagram, fragmented by the sender, arrives whole and intact at the
//!   server, and its fragmented echo arrives whole back at the inside host;
//! - a path MTU drop beyond the NAT: the inside host's TCP learns the smaller MTU from the
//!   "fragmentation needed" error the far router sends to the NAT's address (translated back
//!   by the ICMP error program) and completes a 1 MB upload;
//! - the neighbour of the next hop is forgotten (neighbour table flushed): the first new
//!   connection still works, XDP handing its first packets to the kernel to resolve it.
//!
//! Every traffic loop is bounded in count and time; the namespaces go with the lab.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use nat_lab::{
    process::{netns_command, run_output, spawn_python_server},
    require_tools, Netns, SnatLab, SpawnOptions,
};

#[path = "common/agent.rs"]
mod agent;

use agent::{attach_pass_through, snat_xdp_config, Agent, API_SOCKET_PLACEHOLDER, METRICS_LISTEN};

/// MASQUERADE of the private network, both interfaces forwarding from XDP (as e2e_forward).
/// Runs `program args` in `ns`, bounded by `timeout`; its stdout.
fn run_bounded(ns: &Netns, timeout: Duration, program: &str, args: &[&str]) -> Result<String> {
    let mut cmd = netns_command(ns.name(), program);
    cmd.args(args);
    let out = run_output(&mut cmd, timeout)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A JSON number at `path` (object keys) of `json`.
fn json_number(json: &serde_json::Value, path: &[&str]) -> Result<f64> {
    let mut v = json;
    for key in path {
        v = v
            .get(key)
            .with_context(|| format!("no {key:?} in iperf3's JSON (path {path:?})"))?;
    }
    v.as_f64()
        .with_context(|| format!("{path:?} is not a number: {v}"))
}

#[test]
fn iperf3_tcp_and_udp_and_ping_through_the_nat_with_xdp_forwarding() -> Result<()> {
    require_tools(&["iperf3", "ping"])?;
    let lab = SnatLab::new()?;
    let mut agent = Agent::start(&lab.nat, &snat_xdp_config())?;
    let server_addr = SnatLab::PUBLIC_ADDR.to_string();
    let _server = lab.public.spawn(
        "iperf3",
        ["-s", "-p", "5201"],
        SpawnOptions::new("iperf3-server"),
    )?;
    nat_lab::wait_tcp_ports(lab.public.name(), &[5201], Duration::from_secs(5))?;

    let ping = run_bounded(
        &lab.private,
        Duration::from_secs(10),
        "ping",
        &["-c", "5", "-i", "0.2", "-W", "1", &server_addr],
    )?;
    ensure!(ping.contains(" 0% packet loss"), "ping: {ping}");

    let tcp = run_bounded(
        &lab.private,
        Duration::from_secs(20),
        "iperf3",
        &["-c", &server_addr, "-p", "5201", "-t", "3", "-J"],
    )?;
    let tcp: serde_json::Value = serde_json::from_str(&tcp).context("iperf3 TCP JSON")?;
    let received = json_number(&tcp, &["end", "sum_received", "bytes"])?;
    ensure!(
        received >= 1_000_000.0,
        "iperf3 TCP moved only {received} bytes"
    );
    eprintln!(
        "iperf3 TCP through the NAT: {:.0} Mbit/s",
        json_number(&tcp, &["end", "sum_received", "bits_per_second"])? / 1e6
    );

    let udp = run_bounded(
        &lab.private,
        Duration::from_secs(20),
        "iperf3",
        &[
            "-c",
            &server_addr,
            "-p",
            "5201",
            "-u",
            "-b",
            "50M",
            "-t",
            "3",
            "-J",
        ],
    )?;
    let udp: serde_json::Value = serde_json::from_str(&udp).context("iperf3 UDP JSON")?;
    let packets = json_number(&udp, &["end", "sum", "packets"])?;
    let lost = json_number(&udp, &["end", "sum", "lost_percent"])?;
    eprintln!("iperf3 UDP through the NAT: {packets} datagrams, {lost:.2} % lost");
    ensure!(
        packets >= 1000.0,
        "iperf3 UDP sent only {packets} datagrams"
    );
    // Two shared cores and veths: a little loss under a 50 Mbit/s blast is the lab, not the
    // NAT; a broken translation loses everything.
    ensure!(lost < 10.0, "iperf3 UDP lost {lost} % of its datagrams");

    let metrics = agent.metrics()?;
    ensure!(
        metrics.require("xdpnat_forward_total", &[("result", "redirected")])? >= 1000.0,
        "the bulk traffic did not leave from XDP"
    );
    Ok(())
}

/// The payload both ends agree on: 4000 bytes, so 3 fragments on a 1500-byte MTU.
const BIG_UDP_PAYLOAD: &str = "bytes((i * 7) % 251 for i in range(4000))";

#[test]
fn a_fragmented_4000_byte_udp_datagram_crosses_the_nat_whole_both_ways() -> Result<()> {
    let lab = SnatLab::new()?;
    let mut agent = Agent::start(&lab.nat, &snat_xdp_config())?;
    // The server answers with the datagram itself when it arrived whole and intact, with
    // "bad <length>" otherwise: length and content are checked where the datagram lands.
    let server = format!(
        "import socket, sys\n\
         want = {BIG_UDP_PAYLOAD}\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('0.0.0.0', int(sys.argv[1])))\n\
         while True:\n\
         \x20   got, peer = s.recvfrom(65535)\n\
         \x20   s.sendto(got if got == want else b'bad %d' % len(got), peer)\n"
    );
    let _server = spawn_python_server(lab.public.name(), &server, &[7100], "big-udp-echo")?;
    // The client retries (bounded: 20 attempts) while the server is still starting: until it
    // binds, the public host answers port unreachable, which the socket reports as refused.
    let client = format!(
        "import socket, time\n\
         data = {BIG_UDP_PAYLOAD}\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(1)\n\
         s.connect(('{server}', 7100))\n\
         got = b'no answer'\n\
         for attempt in range(20):\n\
         \x20   try:\n\
         \x20       s.send(data)\n\
         \x20       got = s.recv(65535)\n\
         \x20       break\n\
         \x20   except socket.timeout:\n\
         \x20       pass\n\
         \x20   except ConnectionRefusedError:\n\
         \x20       time.sleep(0.2)\n\
         print('whole' if got == data else 'got %r' % got[:40])\n",
        server = SnatLab::PUBLIC_ADDR
    );
    let out = run_bounded(
        &lab.private,
        Duration::from_secs(15),
        "python3",
        &["-c", &client],
    )?;
    ensure!(
        out.trim() == "whole",
        "the 4000-byte datagram or its echo did not arrive whole: {out}\n{}",
        agent.log_tail(2000)
    );
    let metrics = agent.metrics()?;
    let later = metrics.sum(
        "xdpnat_packets_total",
        &[("reason", "fragment_translated"), ("action", "translated")],
    );
    // Two later fragments each way per attempt.
    ensure!(
        later >= 4.0,
        "only {later} later fragments were translated from the fragment cache"
    );
    Ok(())
}

/// Adds a fourth namespace behind the public one: public routes 198.19.200.0/24 over a link
/// whose public-side MTU is 1280 to `far` (198.19.200.2, default route back via public). The
/// NAT reaches it via the public host. Returns the far namespace.
fn far_network_behind_a_small_mtu(lab: &SnatLab) -> Result<Netns> {
    let far = Netns::new()?;
    far.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
    lab.public.run(
        "ip",
        [
            "link",
            "add",
            "r0",
            "type",
            "veth",
            "peer",
            "name",
            "f0",
            "netns",
            far.name(),
        ],
    )?;
    lab.public
        .run("ip", ["addr", "add", "198.19.200.1/24", "dev", "r0"])?;
    // Only the router's side is small: the far host itself believes in 1500 and advertises
    // that MSS, so only path MTU discovery can save the sender.
    lab.public
        .run("ip", ["link", "set", "r0", "mtu", "1280", "up"])?;
    lab.public.sysctl("net.ipv4.ip_forward", "1")?;
    far.run("ip", ["addr", "add", "198.19.200.2/24", "dev", "f0"])?;
    far.run("ip", ["link", "set", "f0", "up"])?;
    far.run("ip", ["link", "set", "lo", "up"])?;
    far.run("ethtool", ["-K", "f0", "tx", "off"])?;
    far.run("ip", ["route", "add", "default", "via", "198.19.200.1"])?;
    lab.nat.run(
        "ip",
        [
            "route",
            "add",
            "198.19.200.0/24",
            "via",
            &SnatLab::PUBLIC_ADDR.to_string(),
        ],
    )?;
    Ok(far)
}

#[test]
fn a_path_mtu_drop_beyond_the_nat_is_learned_through_the_translated_icmp_error() -> Result<()> {
    require_tools(&["curl"])?;
    let lab = SnatLab::new()?;
    let far = far_network_behind_a_small_mtu(&lab)?;
    let mut agent = Agent::start(&lab.nat, &snat_xdp_config())?;
    upload_one_megabyte(&lab.private, &far, "198.19.200.2", &mut agent)?;
    // The inside host must have learned the MTU: its route cache says so.
    let cached = lab
        .private
        .run("ip", ["route", "get", "198.19.200.2"])
        .unwrap_or_default();
    ensure!(
        cached.contains("mtu 1280"),
        "the inside host did not learn the path MTU: {cached}"
    );
    let metrics = agent.metrics()?;
    ensure!(
        metrics.sum(
            "xdpnat_packets_total",
            &[
                ("reason", "icmp_error_translated"),
                ("action", "translated")
            ]
        ) >= 1.0,
        "no fragmentation-needed error was translated"
    );
    Ok(())
}

/// Posts 1 MB (i % 256) from `client` to an upload sink on `server_addr`:8000 in
/// `server_ns` and checks it arrived whole: TCP with DF (Linux sets it), so a path MTU smaller
/// than the inside link must be learned for the upload to complete.
fn upload_one_megabyte(
    client: &Netns,
    server_ns: &Netns,
    server_addr: &str,
    agent: &mut Agent,
) -> Result<()> {
    // The server reads a whole request body and answers with its length.
    let server = "import http.server, sys\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def do_POST(self):\n\
         \x20       n = int(self.headers['Content-Length'])\n\
         \x20       body = b''\n\
         \x20       while len(body) < n:\n\
         \x20           chunk = self.rfile.read(n - len(body))\n\
         \x20           if not chunk: break\n\
         \x20           body += chunk\n\
         \x20       ok = body == bytes(i % 256 for i in range(n))\n\
         \x20       reply = (b'%d %s' % (len(body), b'intact' if ok else b'corrupt'))\n\
         \x20       self.send_response(200)\n\
         \x20       self.send_header('Content-Length', str(len(reply)))\n\
         \x20       self.end_headers()\n\
         \x20       self.wfile.write(reply)\n\
         \x20   def log_message(self, *a): pass\n\
         http.server.HTTPServer(('0.0.0.0', int(sys.argv[1])), H).serve_forever()\n";
    let _server = spawn_python_server(server_ns.name(), server, &[8000], "upload-sink")?;
    nat_lab::wait_tcp_ports(server_ns.name(), &[8000], Duration::from_secs(5))?;
    // 1 MB of i % 256, written by the inside host, posted with DF (Linux sets it on TCP).
    // One file per upload: the tests of this file run in parallel in one process, and each
    // removes its file when done (a name per process let one test post another's removed or
    // half-written file: "0 intact").
    static UPLOADS: AtomicUsize = AtomicUsize::new(0);
    let body = std::env::temp_dir().join(format!(
        "xdp-nat-pmtu-body-{}-{}",
        std::process::id(),
        UPLOADS.fetch_add(1, Ordering::SeqCst)
    ));
    let body = body.to_str().context("temp dir path")?.to_owned();
    run_bounded(
        client,
        Duration::from_secs(10),
        "python3",
        &[
            "-c",
            &format!("open('{body}', 'wb').write(bytes(i % 256 for i in range(1 << 20)))"),
        ],
    )?;
    let out = run_bounded(
        client,
        Duration::from_secs(30),
        "curl",
        &[
            "-sS",
            "--max-time",
            "20",
            "--data-binary",
            &format!("@{body}"),
            "-H",
            "Content-Type: application/octet-stream",
            &format!("http://{server_addr}:8000/"),
        ],
    );
    let _ = std::fs::remove_file(&body);
    let out = out?;
    ensure!(
        out.trim() == "1048576 intact",
        "the 1 MB upload across the smaller MTU: {out:?}\n{}",
        agent.log_tail(2000)
    );
    Ok(())
}

#[test]
fn a_smaller_mtu_on_the_nats_own_egress_link_is_learned_by_the_inside_host() -> Result<()> {
    require_tools(&["curl"])?;
    let lab = SnatLab::new()?;
    // The NAT's own outgoing link is the narrow one (a tunnel, say): the kernel, not a router
    // beyond, must tell the inside host, so the packet must reach it untranslated.
    lab.nat.run(
        "ip",
        ["link", "set", SnatLab::NAT_OUTSIDE_IF, "mtu", "1280"],
    )?;
    // (The server's side keeps 1500, so it advertises an MSS of 1460, which the client's
    // segments then exceed on the NAT's link.)
    let mut agent = Agent::start(&lab.nat, &snat_xdp_config())?;
    let public = SnatLab::PUBLIC_ADDR.to_string();
    upload_one_megabyte(&lab.private, &lab.public, &public, &mut agent)?;
    let cached = lab
        .private
        .run("ip", ["route", "get", &public])
        .unwrap_or_default();
    ensure!(
        cached.contains("mtu 1280"),
        "the inside host did not learn the path MTU: {cached}"
    );
    let metrics = agent.metrics()?;
    ensure!(
        metrics.sum(
            "xdpnat_packets_total",
            &[("reason", "mtu_handoff"), ("action", "pass")]
        ) >= 1.0,
        "no too-big packet was handed to the kernel untranslated"
    );
    Ok(())
}

#[test]
fn a_smaller_mtu_towards_a_dnat_backend_is_learned_by_the_client_from_the_nats_answer() -> Result<()>
{
    require_tools(&["curl"])?;
    let lab = nat_lab::DnatLab::new()?;
    // The NAT's link towards the backends is the narrow one: the client talks to the VIP, so
    // only the NAT can tell it, quoting the packet as sent to the VIP.
    lab.nat.run(
        "ip",
        [
            "link",
            "set",
            nat_lab::DnatLab::NAT_BACKEND_IF,
            "mtu",
            "1280",
        ],
    )?;
    let config = format!(
        r#"
[agent]
metrics_listen = "{METRICS_LISTEN}"
api_socket = "{API_SOCKET_PLACEHOLDER}"

[[interfaces]]
name = "n0"
xdp_mode = "native"

[[interfaces]]
name = "n1"
xdp_mode = "native"

[[dnat]]
id = 1
name = "upload"
destination = "198.18.100.10"
protocol = "tcp"
port = 8000
to_address = "198.18.1.2"
to_port = 8000
"#
    );
    let mut agent = Agent::start(&lab.nat, &config)?;
    // The answer leaves by XDP_TX into the client's veth, which receives such frames only
    // with NAPI, as a real NIC always has (TOOLCHAIN.md).
    let _client_napi = attach_pass_through(lab.client.name(), nat_lab::DnatLab::CLIENT_IF)?;
    upload_one_megabyte(&lab.client, &lab.backend, "198.18.100.10", &mut agent)?;
    let cached = lab
        .client
        .run("ip", ["route", "get", "198.18.100.10"])
        .unwrap_or_default();
    ensure!(
        cached.contains("mtu 1280"),
        "the client did not learn the path MTU: {cached}"
    );
    let metrics = agent.metrics()?;
    ensure!(
        metrics.sum(
            "xdpnat_packets_total",
            &[("reason", "mtu_too_big_answered"), ("action", "reply")]
        ) >= 1.0,
        "no fragmentation-needed answer was sent from XDP"
    );
    Ok(())
}

#[test]
fn the_first_connection_after_the_neighbour_table_is_flushed_succeeds() -> Result<()> {
    let lab = SnatLab::new()?;
    let _http = nat_lab::HttpEcho::start(lab.public.name(), &[80])?;
    let mut agent = Agent::start(&lab.nat, &snat_xdp_config())?;
    let url = format!("http://{}/", SnatLab::PUBLIC_ADDR);
    nat_lab::http_get(lab.private.name(), &url).context("warm-up request")?;
    let before = agent
        .metrics()?
        .sum("xdpnat_forward_total", &[("result", "no_neighbour")]);
    lab.nat.run("ip", ["neigh", "flush", "all"])?;
    // The very first connection after the flush: its SYN meets no neighbour entry.
    nat_lab::http_get(lab.private.name(), &url).context("first request after the flush")?;
    for _ in 0..3 {
        nat_lab::http_get(lab.private.name(), &url)?;
    }
    let after = agent
        .metrics()?
        .sum("xdpnat_forward_total", &[("result", "no_neighbour")]);
    ensure!(
        after > before,
        "no packet waited for a neighbour after the flush ({before} -> {after})"
    );
    Ok(())
}
