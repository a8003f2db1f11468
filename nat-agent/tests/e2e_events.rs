//! The NAT event log, end to end: with `[events] log` set, a UDP flow through MASQUERADE and a
//! TCP flow through DNAT+MASQUERADE each write one `created` line with the translation, and a
//! flush writes one `deleted` line per session with its counters. Without `[events]`, nothing
//! is written and the dropped counter stays 0.
//!
//! Needs root. Never skips.

use std::{net::SocketAddrV4, time::Duration};

use anyhow::{ensure, Context, Result};
use nat_lab::{
    tcp_connect, tcp_roundtrip, udp_bind, udp_peer_roundtrip, wait_until, Check, DnatLab,
    ScratchDir, TcpEchoServer, UdpPeerEcho,
};
use serde_json::Value;

#[path = "common/agent.rs"]
mod agent;

use agent::{Agent, AGENT, API_SOCKET_PLACEHOLDER};

fn config(log: &str) -> String {
    format!(
        r#"
[agent]
metrics_listen = "127.0.0.1:9469"
api_socket = "{API_SOCKET_PLACEHOLDER}"

{log}

[[interfaces]]
name = "n0"
xdp_mode = "native"

[[interfaces]]
name = "n1"
xdp_mode = "native"

[[dnat]]
id = 1
name = "web"
destination = "198.18.100.10"
protocol = "tcp"
port = 80
to_address = "198.18.1.2"
to_port = 8080

[[snat]]
id = 2
name = "masq"
source = "198.18.0.0/24"
out_interface = "n1"
masquerade = true
"#
    )
}

fn lines(path: &std::path::Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l:?}")))
        .collect()
}

#[test]
fn sessions_created_and_deleted_are_logged_as_json_lines() -> Result<()> {
    let scratch = ScratchDir::new("events")?;
    let log = scratch.join("events.jsonl");
    let lab = DnatLab::new()?;
    let backend = lab.backend.name();
    let _web = TcpEchoServer::start(backend, SocketAddrV4::new(DnatLab::BACKEND_ADDR, 8080))?;
    let udp = UdpPeerEcho::start(backend, SocketAddrV4::new(DnatLab::BACKEND_ADDR, 5300))?;
    let mut agent = Agent::start(
        &lab.nat,
        &config(&format!("[events]\nlog = \"{}\"", log.display())),
    )?;

    let socket = udp_bind(
        lab.client.name(),
        SocketAddrV4::new(DnatLab::CLIENT_ADDR, 40123),
    )?;
    let seen = udp_peer_roundtrip(&socket, udp.local_addr(), Duration::from_secs(2))?;
    let mut conn = tcp_connect(
        lab.client.name(),
        None,
        SocketAddrV4::new(DnatLab::VIP1, 80),
        Duration::from_secs(2),
    )?;
    tcp_roundtrip(&mut conn, b"hello\n", Duration::from_secs(2))?;

    wait_until("two created events", Duration::from_secs(10), || {
        let n = lines(&log)?
            .iter()
            .filter(|e| e["event"] == "created")
            .count();
        Ok(if n >= 2 {
            Check::Done(())
        } else {
            Check::NotYet(format!("{n}"))
        })
    })?;
    let events = lines(&log)?;
    let udp_event = events
        .iter()
        .find(|e| e["protocol"] == "udp")
        .context("no udp event")?;
    ensure!(udp_event["event"] == "created", "{udp_event}");
    ensure!(udp_event["original"]["src"] == "198.18.0.2", "{udp_event}");
    ensure!(udp_event["original"]["sport"] == 40123, "{udp_event}");
    ensure!(udp_event["snat_rule"] == "masq", "{udp_event}");
    // The translation logged is the one the server saw.
    ensure!(
        udp_event["translated"]["src"] == seen.ip().to_string()
            && udp_event["translated"]["sport"] == seen.port(),
        "{udp_event} vs server saw {seen}"
    );
    let tcp_event = events
        .iter()
        .find(|e| e["protocol"] == "tcp")
        .context("no tcp event")?;
    ensure!(
        tcp_event["dnat_rule"] == "web" && tcp_event["snat_rule"] == "masq",
        "{tcp_event}"
    );
    ensure!(
        tcp_event["translated"]["dst"] == "198.18.1.2",
        "{tcp_event}"
    );
    ensure!(tcp_event["translated"]["dport"] == 8080, "{tcp_event}");
    drop(conn);

    // Deleting the sessions logs each with its counters.
    let out = std::process::Command::new(AGENT)
        .args(["sessions", "flush", "--socket"])
        .arg(agent.api_socket())
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("two deleted events", Duration::from_secs(10), || {
        let n = lines(&log)?
            .iter()
            .filter(|e| e["event"] == "deleted")
            .count();
        Ok(if n >= 2 {
            Check::Done(())
        } else {
            Check::NotYet(format!("{n}"))
        })
    })?;
    let deleted = lines(&log)?
        .into_iter()
        .find(|e| e["event"] == "deleted" && e["protocol"] == "udp")
        .context("no udp deletion")?;
    ensure!(deleted["counters"]["original_packets"] == 1, "{deleted}");
    ensure!(deleted["counters"]["reply_packets"] == 1, "{deleted}");
    let dropped = agent
        .metrics()?
        .require("xdpnat_events_dropped_total", &[])?;
    ensure!(dropped == 0.0);
    agent.stop(Duration::from_secs(10))?;

    // Off by default: a new session, and no event on the agent's output.
    let mut agent = Agent::start(&lab.nat, &config(""))?;
    let socket = udp_bind(
        lab.client.name(),
        SocketAddrV4::new(DnatLab::CLIENT_ADDR, 40124),
    )?;
    udp_peer_roundtrip(&socket, udp.local_addr(), Duration::from_secs(2))?;
    let listed = agent.sessions_list(&["--port", "40124"])?;
    ensure!(
        agent::session_entries(&listed)?.len() == 1,
        "the flow made no session: {listed}"
    );
    ensure!(agent.log_tail(100_000).matches("\"event\":").count() == 0);
    agent.stop(Duration::from_secs(10))?;
    Ok(())
}
