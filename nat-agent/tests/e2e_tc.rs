//! End-to-end: the TC hook (`hook = "tc"`), the translation as a TC ingress program on socket
//! buffers, through the two-arm SNAT lab with translated packets redirected from TC
//! (`forwarding = "xdp"`).
//!
//! What only this hook meets is checked with the offloads that produce it:
//! - the inside and public hosts send with TSO, so the NAT receives GSO super-packets (up to
//!   64 KB of TCP in one skb) carrying *partial* checksums (only the pseudo-header sum: the
//!   rest is summed when the packet is segmented). Translating one rewrites the addresses in
//!   that partial sum;
//! - the NAT's own interfaces send without checksum offload, so every super-packet it forwards
//!   is segmented and its checksums completed in software on the way out, from the partial sum
//!   the translation left. A wrong partial sum makes every segment's checksum wrong, and the
//!   receiving stack, which verifies (the segments arrive without offload), drops them and
//!   counts `InCsumErrors`.
//!
//! Also: with pinned state, the TCX links outlive a killed agent and take the next agent's
//! program, and an interface moves between the hooks across restarts.
//!
//! Then the same with full checksums everywhere (no offload on the hosts, as frames off a real
//! wire), so both checksum states the skb helpers distinguish are crossed. Every transfer is
//! bounded in bytes and time; the namespaces go with the lab.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use aya::programs::{tc::TcAttachType, SchedClassifier};
use nat_lab::{
    process::{netns_command, run_output, spawn_python_server},
    require_tools, Netns, ScratchDir, SnatLab, UdpEcho,
};

#[path = "common/agent.rs"]
mod agent;

use agent::{
    ping_public_host, snat_lab_flow, snat_xdp_config, with_state, xdp_attached, Agent, Bpffs,
};

/// Bytes each way per transfer: 8 MB, about 5800 full-size segments.
const TRANSFER_BYTES: usize = 8 << 20;
/// TCP payload of one 1500-byte frame (timestamps on).
const SEGMENT_PAYLOAD: usize = 1448;

/// MASQUERADE of the private network, both interfaces on the TC hook, forwarding from TC: the
/// XDP lab config with its interfaces moved.
fn snat_tc_config() -> String {
    let xdp = snat_xdp_config();
    let tc = xdp.replace("xdp_mode = \"native\"", "hook = \"tc\"");
    assert_eq!(
        tc.matches("hook = \"tc\"").count(),
        2,
        "the XDP lab config no longer names its two interfaces' XDP mode:\n{xdp}"
    );
    tc
}

/// The server side of [`transfer`] (`BYTES` replaced by the count): reads `n` bytes of the pattern `i % 251` from one
/// connection, answers `"<bytes> intact|corrupt\n"`, then sends `n` bytes of the same pattern.
const BULK_SERVER: &str = "import socket, sys\n\
n = BYTES\n\
pattern = bytes(i % 251 for i in range(251)) * (n // 251 + 1)\n\
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen(4)\n\
while True:\n\
\x20   c, _ = s.accept()\n\
\x20   c.settimeout(20)\n\
\x20   got = bytearray()\n\
\x20   try:\n\
\x20       while len(got) < n:\n\
\x20           chunk = c.recv(1 << 20)\n\
\x20           if not chunk: break\n\
\x20           got += chunk\n\
\x20       ok = bytes(got) == pattern[:n]\n\
\x20       c.sendall(b'%d %s\\n' % (len(got), b'intact' if ok else b'corrupt'))\n\
\x20       c.sendall(pattern[:n])\n\
\x20   except OSError:\n\
\x20       pass\n\
\x20   c.close()\n";

/// The client side of [`transfer`]: prints the server's verdict on the upload and its own on
/// the download.
const BULK_CLIENT: &str = "import socket, sys\n\
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n\
pattern = bytes(i % 251 for i in range(251)) * (n // 251 + 1)\n\
c = socket.create_connection((host, port), timeout=20)\n\
c.sendall(pattern[:n])\n\
f = c.makefile('rb')\n\
print(f.readline().decode().strip())\n\
got = f.read(n)\n\
print('%d %s' % (len(got), 'intact' if got == pattern[:n] else 'corrupt'))\n";

/// Uploads and downloads [`TRANSFER_BYTES`] between the private host and a server on the
/// public host, through the NAT, and checks both arrived whole and unchanged.
fn transfer(lab: &SnatLab, port: u16) -> Result<()> {
    let n = TRANSFER_BYTES.to_string();
    let server = BULK_SERVER.replace("BYTES", &n);
    let _server = spawn_python_server(lab.public.name(), &server, &[port], "bulk server")?;
    nat_lab::wait_tcp_ports(lab.public.name(), &[port], Duration::from_secs(5))?;
    let mut cmd = netns_command(lab.private.name(), "python3");
    cmd.args([
        "-I",
        "-c",
        BULK_CLIENT,
        &SnatLab::PUBLIC_ADDR.to_string(),
        &port.to_string(),
        &n,
    ]);
    let out = run_output(&mut cmd, Duration::from_secs(60)).context("the bulk transfer")?;
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let expected = format!("{n} intact\n{n} intact");
    ensure!(
        out.trim() == expected,
        "bulk transfer through the TC hook: upload, download verdicts {out:?}, want {expected:?}"
    );
    Ok(())
}

/// `InCsumErrors` of `proto` (`Tcp` or `Udp`) in namespace `ns`: segments the stack dropped
/// for a wrong checksum.
fn checksum_errors(ns: &Netns, proto: &str) -> Result<u64> {
    let snmp = ns.run("cat", ["/proc/net/snmp"])?;
    let prefix = format!("{proto}:");
    let mut lines = snmp.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = (
        lines
            .next()
            .with_context(|| format!("no {proto}: header"))?,
        lines
            .next()
            .with_context(|| format!("no {proto}: values"))?,
    );
    let column = names
        .split_whitespace()
        .position(|n| n == "InCsumErrors")
        .context("no InCsumErrors column")?;
    values
        .split_whitespace()
        .nth(column)
        .context("short line")?
        .parse()
        .context("InCsumErrors is not a number")
}

/// Sets offloads: the hosts send with TSO and checksum offload (`host_offload`) or without; the
/// NAT's interfaces always without, so its output is segmented and checksummed in software.
fn set_offloads(lab: &SnatLab, host_offload: bool) -> Result<()> {
    let on = if host_offload { "on" } else { "off" };
    for (ns, dev) in [
        (&lab.private, SnatLab::PRIVATE_IF),
        (&lab.public, SnatLab::PUBLIC_IF),
    ] {
        ns.run("ethtool", ["-K", dev, "tx", on, "tso", on, "gso", on])?;
    }
    for dev in [SnatLab::NAT_INSIDE_IF, SnatLab::NAT_OUTSIDE_IF] {
        lab.nat.run("ethtool", ["-K", dev, "tx", "off"])?;
    }
    Ok(())
}

/// Packets the agent counted for `reason`, translated.
fn translated(agent: &mut Agent, reason: &str) -> Result<f64> {
    Ok(agent.metrics()?.sum(
        "xdpnat_packets_total",
        &[("reason", reason), ("action", "translated")],
    ))
}

#[test]
fn tcp_bulk_through_the_tc_hook_arrives_intact_from_gso_super_packets_with_partial_checksums(
) -> Result<()> {
    require_tools(&["ethtool", "python3"])?;
    let lab = SnatLab::new()?;
    set_offloads(&lab, true)?;
    // External ports outside Linux's ephemeral range, so every port is translated too: a
    // kept port would hide a port change applied to a partial checksum (which must not be).
    let config = snat_tc_config().replace(
        "masquerade = true",
        "masquerade = true\nport_range = \"20000-20999\"",
    );
    let mut agent = Agent::start(&lab.nat, &config)?;
    let errors_before = (
        checksum_errors(&lab.public, "Tcp")?,
        checksum_errors(&lab.private, "Tcp")?,
    );

    transfer(&lab, 7100)?;

    let errors = (
        checksum_errors(&lab.public, "Tcp")? - errors_before.0,
        checksum_errors(&lab.private, "Tcp")? - errors_before.1,
    );
    ensure!(
        errors == (0, 0),
        "segments with a wrong checksum (public, private): {errors:?}"
    );
    // The super-packets were translated as such: far fewer packets than segments.
    let orig = translated(&mut agent, "session_orig")?;
    let segments = (TRANSFER_BYTES / SEGMENT_PAYLOAD) as f64;
    ensure!(
        orig >= 1.0 && orig < segments / 2.0,
        "{orig} packets translated on the way out for {segments} segments: GSO super-packets \
         did not reach the TC program as such"
    );
    let metrics = agent.metrics()?;
    ensure!(
        metrics.require("xdpnat_forward_total", &[("result", "redirected")])? >= orig,
        "translated packets were not redirected from TC:\n{}",
        agent.log_tail(2000)
    );
    Ok(())
}

#[test]
fn tcp_udp_and_ping_through_the_tc_hook_with_full_checksums() -> Result<()> {
    require_tools(&["ethtool", "python3", "ping"])?;
    let lab = SnatLab::new()?;
    set_offloads(&lab, false)?;
    let mut agent = Agent::start(&lab.nat, &snat_tc_config())?;
    let errors_before = (
        checksum_errors(&lab.public, "Tcp")? + checksum_errors(&lab.public, "Udp")?,
        checksum_errors(&lab.private, "Tcp")? + checksum_errors(&lab.private, "Udp")?,
    );

    transfer(&lab, 7200)?;

    // ICMP echo (the id is translated like a port) and a UDP flow, both ways.
    ping_public_host(&lab, "through the TC hook")?;
    let _echo = UdpEcho::start(lab.public.name(), &[5400])?;
    let exchange = snat_lab_flow(&lab, 40_321, 5400)(20)?;
    ensure!(
        exchange.received == exchange.sent,
        "UDP through the TC hook: {exchange:?}"
    );

    let errors = (
        checksum_errors(&lab.public, "Tcp")? + checksum_errors(&lab.public, "Udp")?,
        checksum_errors(&lab.private, "Tcp")? + checksum_errors(&lab.private, "Udp")?,
    );
    ensure!(
        errors == errors_before,
        "datagrams with a wrong checksum (public, private): before {errors_before:?}, after \
         {errors:?}"
    );
    for reason in ["session_new", "session_orig", "session_reply"] {
        ensure!(
            translated(&mut agent, reason)? >= 1.0,
            "nothing counted as {reason} through the TC hook"
        );
    }
    Ok(())
}

/// Whether `iface` in `ns` has `tc_nat` attached at TCX ingress, as the kernel reports it
/// (Debian's bpftool predates TCX and cannot say).
fn tcx_attached(ns: &Netns, iface: &str) -> Result<bool> {
    let iface = iface.to_owned();
    nat_lab::in_netns(ns.name(), move || {
        let (_, programs) = SchedClassifier::query_tcx(&iface, TcAttachType::Ingress)
            .with_context(|| format!("querying the TCX programs of {iface}"))?;
        Ok(programs
            .iter()
            .any(|p| p.name_as_str() == Some(nat_common::maps::TC_PROGRAM)))
    })
}

#[test]
fn tc_links_outlive_a_killed_agent_and_interfaces_move_between_the_hooks() -> Result<()> {
    let scratch = ScratchDir::new("tc-restart")?;
    let bpffs = Bpffs::mount(scratch.join("bpffs"))?;
    let state_dir = bpffs.0.join("xdp-nat");
    let lab = SnatLab::new()?;
    let _echo = UdpEcho::start(lab.public.name(), &[5400])?;
    let tc = with_state(&snat_tc_config(), &state_dir);
    let xdp = with_state(&snat_xdp_config(), &state_dir);
    let exchange = snat_lab_flow(&lab, 40_555, 5400);
    let inside = SnatLab::NAT_INSIDE_IF;
    let attached = |hook: &str| -> Result<()> {
        let (on_tc, on_xdp) = (
            tcx_attached(&lab.nat, inside)?,
            xdp_attached(&lab.nat, inside)?,
        );
        let want = (hook == "tc", hook == "xdp");
        ensure!(
            (on_tc, on_xdp) == want,
            "{inside} after switching to {hook}: TCX attached {on_tc}, XDP attached {on_xdp}"
        );
        Ok(())
    };

    let mut agent = Agent::start(&lab.nat, &tc)?;
    attached("tc")?;
    let first = exchange(20)?;
    ensure!(
        first.received == first.sent,
        "the flow through TC: {first:?}"
    );
    agent.kill()?;
    // Nobody runs: the pinned TCX links and their program (and its pinned tail-call table)
    // go on translating the flow.
    let alone = exchange(10)?;
    ensure!(
        alone.received == alone.sent,
        "the flow stopped with the agent: {alone:?}"
    );
    attached("tc")?;

    // The next agent swaps its program into the same links, then the interfaces move to XDP
    // and back, each move a restart with the changed config.
    for (config, hook) in [(&tc, "tc"), (&xdp, "xdp"), (&tc, "tc")] {
        drop(agent);
        agent = Agent::start(&lab.nat, config)?;
        attached(hook)?;
        let after = exchange(10)?;
        ensure!(
            after.received == after.sent,
            "the flow after restarting with hook {hook}: {after:?}\n{}",
            agent.log_tail(2000)
        );
    }
    drop(agent);
    // The namespaces (and their attachments) go first, then the pins.
    drop(exchange);
    drop(lab);
    drop(bpffs);
    Ok(())
}
