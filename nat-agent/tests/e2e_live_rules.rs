//! Live rule changes under traffic, end to end: two UDP flows run through two DNAT rules
//! while other rules (one on the same VIP, so the trie entry the flows use is rewritten every
//! time) are added, changed, replaced and deleted over and over through the CLI. The flows
//! whose rules never change must lose nothing and never be mistranslated (each backend gets
//! exactly its own flow's probes, every reply comes back from the VIP the client asked), and
//! their rule counters only ever go up and end at exactly what was sent.
//!
//! Bounded: each flow sends at most `MAX_PROBES` lock-step probes and stops when the churn
//! ends; the churn runs `CHURN_ROUNDS` rounds. Needs root. Never skips.

use std::{
    net::SocketAddrV4,
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use nat_lab::{udp_bind, udp_peer_roundtrip, DnatLab, UdpPeerEcho};

#[path = "common/agent.rs"]
mod agent;

use agent::{Agent, AGENT, API_SOCKET_PLACEHOLDER};

const MAX_PROBES: u32 = 20_000;
const CHURN_ROUNDS: u32 = 15;
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Between probes: enough flows per change to matter, few enough to stay light.
const PROBE_GAP: Duration = Duration::from_micros(500);

const STEADY: &str = r#"
[[dnat]]
id = 1
name = "steady-a"
destination = "198.18.100.10"
protocol = "udp"
port = 5353
to_address = "198.18.1.2"
to_port = 5300

[[dnat]]
id = 2
name = "steady-b"
destination = "198.18.100.11"
protocol = "udp"
port = 5353
to_address = "198.18.1.3"
to_port = 5301
"#;

fn config() -> String {
    format!(
        r#"
[agent]
metrics_listen = "127.0.0.1:9469"
api_socket = "{API_SOCKET_PLACEHOLDER}"

[[interfaces]]
name = "n0"
xdp_mode = "native"

[[interfaces]]
name = "n1"
xdp_mode = "native"
{STEADY}"#
    )
}

/// A churning rule on steady-a's VIP (another port): its changes rewrite the prefix entry
/// steady-a's packets are looked up in.
fn churn_rule(id: u32, name: &str, port: u16, backend_port: u16) -> String {
    format!(
        r#"
[[dnat]]
id = {id}
name = "{name}"
destination = "198.18.100.10"
protocol = "udp"
port = {port}
to_address = "198.18.1.3"
to_port = {backend_port}
"#
    )
}

fn cli(socket: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(AGENT)
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .context("running the CLI")?;
    ensure!(
        out.status.success(),
        "nat-agent {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Sends lock-step probes to `vip` until `stop` (at most [`MAX_PROBES`]); returns how many
/// were answered, failing at the first probe that is not (loss or a reply from elsewhere).
fn probe_until(client_ns: &str, vip: SocketAddrV4, stop: &AtomicBool) -> Result<u32> {
    let socket = udp_bind(client_ns, SocketAddrV4::new(DnatLab::CLIENT_ADDR, 0))?;
    let mut answered = 0;
    while answered < MAX_PROBES && !stop.load(Ordering::Relaxed) {
        udp_peer_roundtrip(&socket, vip, PROBE_TIMEOUT)
            .with_context(|| format!("probe {} to {vip}", answered + 1))?;
        answered += 1;
        thread::sleep(PROBE_GAP);
    }
    Ok(answered)
}

#[test]
fn unaffected_flows_lose_nothing_while_rules_change() -> Result<()> {
    let lab = DnatLab::new()?;
    let server_a = UdpPeerEcho::start(
        lab.backend.name(),
        SocketAddrV4::new(DnatLab::BACKEND_ADDR, 5300),
    )?;
    let server_b = UdpPeerEcho::start(
        lab.backend.name(),
        SocketAddrV4::new(DnatLab::BACKEND_ADDR2, 5301),
    )?;
    let mut agent = Agent::start(&lab.nat, &config())?;
    let socket = agent.api_socket();
    let scratch = socket.parent().context("socket dir")?.join("churn");
    std::fs::create_dir_all(&scratch)?;
    let write = |name: &str, text: &str| -> Result<String> {
        let path = scratch.join(name);
        std::fs::write(&path, text)?;
        Ok(path.display().to_string())
    };
    let extra = write("extra.toml", &churn_rule(10, "churn", 6000, 6000))?;
    let extra_moved = write("extra-moved.toml", &churn_rule(10, "churn", 6001, 6002))?;
    let second = write("second.toml", &churn_rule(11, "churn-2", 7000, 7000))?;
    let with_extra = write(
        "with-extra.toml",
        &format!("{}{}", config(), churn_rule(12, "replaced", 8000, 8000)),
    )?;
    let without_extra = write("without-extra.toml", &config())?;

    let stop = Arc::new(AtomicBool::new(false));
    let client = lab.client.name().to_string();
    let flows: Vec<_> = [DnatLab::VIP1, DnatLab::VIP2]
        .into_iter()
        .map(|vip| {
            let (stop, client) = (Arc::clone(&stop), client.clone());
            thread::spawn(move || probe_until(&client, SocketAddrV4::new(vip, 5353), &stop))
        })
        .collect();

    let counted = |agent: &mut Agent, rule: &str| -> Result<f64> {
        agent.metrics()?.require(
            "xdpnat_rule_packets_total",
            &[("rule", rule), ("direction", "original")],
        )
    };
    let churn = (|| -> Result<u32> {
        let mut last = (0.0, 0.0);
        let mut changes = 0;
        for _ in 0..CHURN_ROUNDS {
            for args in [
                vec!["rules", "add", extra.as_str()],
                vec!["rules", "add", second.as_str(), "--position", "0"],
                vec!["rules", "change", "churn", extra_moved.as_str()],
                vec!["rules", "del", "dnat", "churn"],
                vec!["rules", "del", "dnat", "churn-2"],
                vec!["rules", "replace", with_extra.as_str()],
                vec!["rules", "replace", without_extra.as_str()],
            ] {
                let out = cli(&socket, &args)?;
                ensure!(out.starts_with("applied"), "{args:?}: {out}");
                changes += 1;
                // Counters of the steady rules never go back.
                let now = (
                    counted(&mut agent, "steady-a")?,
                    counted(&mut agent, "steady-b")?,
                );
                ensure!(
                    now.0 >= last.0 && now.1 >= last.1,
                    "counters went back: {last:?} -> {now:?}"
                );
                last = now;
            }
        }
        Ok(changes)
    })();
    stop.store(true, Ordering::Relaxed);
    let mut answered = Vec::new();
    for flow in flows {
        answered.push(flow.join().expect("probe thread panicked")?);
    }
    let changes = churn?;
    ensure!(changes == CHURN_ROUNDS * 7);

    // Nothing lost, nothing sent to the wrong backend.
    let (a, b) = (answered[0], answered[1]);
    eprintln!("{changes} rule changes applied while {a} + {b} probes were answered");
    ensure!(
        a > 100 && b > 100,
        "too little traffic during the churn: {a}, {b}"
    );
    ensure!(
        server_a.peers().len() as u32 == a,
        "backend A saw {} probes for {a} answered",
        server_a.peers().len()
    );
    ensure!(
        server_b.peers().len() as u32 == b,
        "backend B saw {} probes for {b} answered",
        server_b.peers().len()
    );
    // Every probe counted once each way by its own rule.
    ensure!(counted(&mut agent, "steady-a")? == f64::from(a));
    ensure!(counted(&mut agent, "steady-b")? == f64::from(b));
    let generation = agent.metrics()?.require("xdpnat_config_generation", &[])?;
    ensure!(
        generation == f64::from(1 + changes),
        "generation {generation}"
    );
    agent.ensure_running()?;
    Ok(())
}
