//! Restarts without loss, end to end: with `[agent] state_dir` on a bpf filesystem, the maps
//! and XDP links are pinned, so the program keeps translating while no agent runs, and a new
//! agent reuses the sessions, rules and counters and swaps its program in atomically.
//!
//! Bounded UDP and TCP streams run through SNAT (MASQUERADE), DNAT and DNAT+SNAT while the
//! agent is killed with SIGKILL and started again, and while it is stopped and replaced by
//! another binary (a copy of this build: an upgrade in form, same code inside). Every probe
//! must be answered, every flow must keep its translation (same external port), the sessions
//! from before must still be listed, and counters must only grow. `nat-agent state clear`
//! then detaches everything. Also: pinned state of another schema or of another table size
//! is refused with the explicit way out named.
//!
//! Each test mounts its own bpf filesystem in a scratch directory (unmounted at the end,
//! passing or not), so nothing is left pinned on the host. Needs root. Never skips.

use std::{
    io::Write,
    net::{SocketAddrV4, TcpStream},
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use nat_lab::{
    tcp_connect, tcp_roundtrip, udp_bind, udp_peer_roundtrip, DnatLab, ScratchDir, SnatLab,
    TcpEchoServer, UdpEcho, UdpPeerEcho,
};

#[path = "common/agent.rs"]
mod agent;

use agent::{
    snat_lab_flow, snat_xdp_config, with_public_host_blackholed, with_state, xdp_attached,
    xdp_mode, Agent, Bpffs, AGENT, API_SOCKET_PLACEHOLDER,
};

fn config(state_dir: &Path, max_sessions: u32) -> String {
    format!(
        r#"
[agent]
metrics_listen = "127.0.0.1:9469"
api_socket = "{API_SOCKET_PLACEHOLDER}"
state_dir = "{state}"

[conntrack]
max_sessions = {max_sessions}

[[interfaces]]
name = "n0"
xdp_mode = "native"

[[interfaces]]
name = "n1"
xdp_mode = "native"

# DNAT + MASQUERADE (scenario 3): VIP1:80 -> backend:8080, source -> n1's address.
[[dnat]]
id = 1
name = "web"
destination = "198.18.100.10"
protocol = "tcp"
port = 80
to_address = "198.18.1.2"
to_port = 8080

# DNAT only (stateless) for UDP: VIP2:5353 -> backend2:5301. The backend answers the
# client directly through the NAT, which restores the VIP.
[[dnat]]
id = 2
name = "dns"
destination = "198.18.100.11"
protocol = "udp"
port = 5353
to_address = "198.18.1.3"
to_port = 5301

# Clients reaching the backends directly are masqueraded behind n1.
[[snat]]
id = 3
name = "masq"
source = "198.18.0.0/24"
destination = "198.18.1.2"
out_interface = "n1"
masquerade = true
"#,
        state = state_dir.display()
    )
}

const PROBE_GAP: Duration = Duration::from_millis(20);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_PROBES: u32 = 2_000;

/// What one stream saw.
#[derive(Debug, Default)]
struct Stream {
    answered: u32,
    /// The source each answer says the server saw (UDP streams): must never change.
    peers: Vec<SocketAddrV4>,
}

/// Lock-step UDP probes to `target` until `stop` (at most [`MAX_PROBES`]); fails at the first
/// unanswered one.
fn udp_stream(client: &str, target: SocketAddrV4, stop: &AtomicBool) -> Result<Stream> {
    let socket = udp_bind(client, SocketAddrV4::new(DnatLab::CLIENT_ADDR, 0))?;
    let mut s = Stream::default();
    while s.answered < MAX_PROBES && !stop.load(Ordering::Relaxed) {
        let peer = udp_peer_roundtrip(&socket, target, PROBE_TIMEOUT)
            .with_context(|| format!("UDP probe {} to {target}", s.answered + 1))?;
        if s.peers.last() != Some(&peer) {
            s.peers.push(peer);
        }
        s.answered += 1;
        thread::sleep(PROBE_GAP);
    }
    Ok(s)
}

/// One TCP connection to `target`, with an echoed message every [`PROBE_GAP`] until `stop`.
fn tcp_stream(client: &str, target: SocketAddrV4, stop: &AtomicBool) -> Result<Stream> {
    let mut conn: TcpStream = tcp_connect(client, None, target, PROBE_TIMEOUT)?;
    let mut s = Stream::default();
    while s.answered < MAX_PROBES && !stop.load(Ordering::Relaxed) {
        let msg = format!("probe {:06}\n", s.answered);
        tcp_roundtrip(&mut conn, msg.as_bytes(), PROBE_TIMEOUT)
            .with_context(|| format!("TCP message {} to {target}", s.answered + 1))?;
        s.answered += 1;
        thread::sleep(PROBE_GAP);
    }
    let _ = conn.flush();
    Ok(s)
}

fn counter(agent: &mut Agent, rule: &str) -> Result<f64> {
    agent.metrics()?.require(
        "xdpnat_rule_packets_total",
        &[("rule", rule), ("direction", "original")],
    )
}

/// (original src port, reply dst port) of every TCP/UDP session, to compare across restarts.
fn session_tuples(agent: &Agent) -> Result<Vec<String>> {
    let list = agent.sessions_list(&[])?;
    let mut out: Vec<String> = agent::session_entries(&list)?
        .iter()
        .map(|s| format!("{} {} -> {}", s["protocol"], s["original"], s["reply"]))
        .collect();
    out.sort();
    Ok(out)
}

#[test]
fn flows_survive_sigkill_restart_and_upgrade() -> Result<()> {
    let scratch = ScratchDir::new("restart")?;
    let bpffs = Bpffs::mount(scratch.join("bpffs"))?;
    let state_dir = bpffs.0.join("xdp-nat");
    let lab = DnatLab::new()?;
    let backend = lab.backend.name();
    let web = TcpEchoServer::start(backend, SocketAddrV4::new(DnatLab::BACKEND_ADDR, 8080))?;
    let _dns = UdpPeerEcho::start(backend, SocketAddrV4::new(DnatLab::BACKEND_ADDR2, 5301))?;
    let _direct = UdpPeerEcho::start(backend, SocketAddrV4::new(DnatLab::BACKEND_ADDR, 5300))?;
    let cfg = config(&state_dir, 65_536);

    let mut agent = Agent::start(&lab.nat, &cfg)?;
    let stop = Arc::new(AtomicBool::new(false));
    let client = lab.client.name().to_string();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let spawn =
        |name: &'static str, f: fn(&str, SocketAddrV4, &AtomicBool) -> Result<Stream>, target| {
            let (stop, client, errors) = (Arc::clone(&stop), client.clone(), Arc::clone(&errors));
            thread::spawn(move || match f(&client, target, &stop) {
                Ok(s) => Some(s),
                Err(e) => {
                    // Stop everything at the first loss: the assertion below names it.
                    stop.store(true, Ordering::Relaxed);
                    errors.lock().unwrap().push(format!("{name}: {e:#}"));
                    None
                }
            })
        };
    let streams = vec![
        (
            "tcp dnat+snat",
            spawn(
                "tcp dnat+snat",
                tcp_stream,
                SocketAddrV4::new(DnatLab::VIP1, 80),
            ),
        ),
        (
            "udp dnat",
            spawn(
                "udp dnat",
                udp_stream,
                SocketAddrV4::new(DnatLab::VIP2, 5353),
            ),
        ),
        (
            "udp snat",
            spawn(
                "udp snat",
                udp_stream,
                SocketAddrV4::new(DnatLab::BACKEND_ADDR, 5300),
            ),
        ),
    ];
    let phase = Duration::from_millis(1500);
    let outcome = (|| -> Result<()> {
        thread::sleep(phase);
        let before = session_tuples(&agent)?;
        ensure!(
            before.len() >= 2,
            "expected the SNAT sessions, got {before:?}"
        );
        let web_before = counter(&mut agent, "web")?;

        // SIGKILL: no clean-up at all. The pinned program keeps translating meanwhile.
        agent.kill()?;
        for iface in ["n0", "n1"] {
            ensure!(
                xdp_attached(&lab.nat, iface)?,
                "{iface} lost its program with the agent"
            );
        }
        thread::sleep(phase);
        let mut agent = Agent::start(&lab.nat, &cfg)?;
        thread::sleep(phase);
        let after = session_tuples(&agent)?;
        for s in &before {
            ensure!(
                after.contains(s),
                "session {s} was lost across the restart: {after:?}"
            );
        }
        let web_after = counter(&mut agent, "web")?;
        ensure!(
            web_after > web_before,
            "web counter {web_before} -> {web_after}"
        );

        // Upgrade: a clean stop leaves the program attached; another binary takes over.
        agent.stop(Duration::from_secs(10))?;
        for iface in ["n0", "n1"] {
            ensure!(
                xdp_attached(&lab.nat, iface)?,
                "{iface} detached on a clean stop"
            );
        }
        let upgraded = scratch.join("nat-agent-upgraded");
        std::fs::copy(AGENT, &upgraded).context("copying the agent binary")?;
        thread::sleep(phase);
        let mut agent = Agent::start_binary(&lab.nat, &cfg, upgraded.to_str().context("path")?)?;
        thread::sleep(phase);
        let upgraded_sessions = session_tuples(&agent)?;
        for s in &before {
            ensure!(
                upgraded_sessions.contains(s),
                "session {s} lost across the upgrade"
            );
        }
        ensure!(
            counter(&mut agent, "web")? > web_after,
            "web counter after the upgrade"
        );
        agent.ensure_running()?;
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let mut results = Vec::new();
    for (name, handle) in streams {
        results.push((name, handle.join().expect("stream thread panicked")));
    }
    let errors = errors.lock().unwrap().clone();
    ensure!(errors.is_empty(), "flows were interrupted: {errors:?}");
    outcome?;
    for (name, result) in &results {
        let s = result.as_ref().context("stream without result")?;
        eprintln!(
            "{name}: {} probes answered, peers seen {:?}",
            s.answered, s.peers
        );
        ensure!(s.answered > 100, "{name}: only {} probes", s.answered);
        // Every answer named the same source: the flow kept its translation throughout.
        if name.starts_with("udp") {
            ensure!(
                s.peers.len() == 1,
                "{name}: the translation changed: {:?}",
                s.peers
            );
        }
    }
    // The TCP flow is one connection, accepted once, from the masquerading address.
    let accepted = web.peers();
    ensure!(
        accepted.len() == 1 && *accepted[0].ip() == std::net::Ipv4Addr::new(198, 18, 1, 1),
        "the web backend accepted {accepted:?}"
    );

    // The explicit way out: detach and remove everything.
    let out = Command::new(AGENT)
        .args(["state", "clear", "--state-dir"])
        .arg(&state_dir)
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for iface in ["n0", "n1"] {
        ensure!(
            !xdp_attached(&lab.nat, iface)?,
            "{iface} still attached after state clear"
        );
    }
    ensure!(
        std::fs::read_dir(&state_dir)?.next().is_none(),
        "state clear left pins behind"
    );
    drop(bpffs);
    Ok(())
}

#[test]
fn incompatible_pinned_state_is_refused_with_the_way_out() -> Result<()> {
    let scratch = ScratchDir::new("restart-schema")?;
    let bpffs = Bpffs::mount(scratch.join("bpffs"))?;
    let state_dir = bpffs.0.join("xdp-nat");
    let lab = DnatLab::new()?;

    // State written with one table size...
    let mut agent = Agent::start(&lab.nat, &config(&state_dir, 65_536))?;
    agent.stop(Duration::from_secs(10))?;
    // ...is not reused with another: the agent refuses to start and says how to proceed.
    let refused = match Agent::start(&lab.nat, &config(&state_dir, 131_072)) {
        Ok(_) => bail!("an agent started on pinned maps of another size"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        refused.contains("does not match") && refused.contains("nat-agent state clear"),
        "{refused}"
    );
    // The old program still translates: refusing touched nothing.
    ensure!(xdp_attached(&lab.nat, "n0")?);

    // State of another schema version: refused too.
    std::fs::create_dir_all(state_dir.join("v999"))?;
    let refused = match Agent::start(&lab.nat, &config(&state_dir, 65_536)) {
        Ok(_) => bail!("an agent started beside state of another schema"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        refused.contains("schema v999") && refused.contains("state clear"),
        "{refused}"
    );

    // `state clear` removes every version; then a start works afresh.
    let out = Command::new(AGENT)
        .args(["state", "clear", "--state-dir"])
        .arg(&state_dir)
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(!xdp_attached(&lab.nat, "n0")?);
    let mut agent = Agent::start(&lab.nat, &config(&state_dir, 131_072))?;
    agent.ensure_running()?;
    agent.stop(Duration::from_secs(10))?;
    drop(bpffs);
    Ok(())
}

/// A clean stop with pinned state leaves the program forwarding from XDP with nobody listening
/// to routing changes: the agent turns the route cache off on its way out, so a route change
/// made while no agent runs is followed at once (a cache left on would carry the flow over
/// the old route for its entries' remaining uses).
#[test]
fn a_stopped_agent_leaves_the_route_cache_off() -> Result<()> {
    let scratch = ScratchDir::new("route-cache")?;
    let bpffs = Bpffs::mount(scratch.join("bpffs"))?;
    let state_dir = bpffs.0.join("xdp-nat");
    let lab = SnatLab::new()?;
    let _echo = UdpEcho::start(lab.public.name(), &[5400])?;
    let config = with_state(&snat_xdp_config(), &state_dir);
    let exchange = snat_lab_flow(&lab, 40_321, 5400);

    let mut agent = Agent::start(&lab.nat, &config)?;
    let first = exchange(20)?;
    ensure!(first.received >= 18, "the flow did not work: {first:?}");
    let hits = agent
        .metrics()?
        .sum("xdpnat_route_cache_total", &[("result", "hit")]);
    ensure!(hits >= 10.0, "the route cache answered only {hits} packets");
    agent.stop(Duration::from_secs(10))?;

    // The pinned program goes on forwarding the flow from XDP...
    let alone = exchange(10)?;
    ensure!(
        alone.received >= 9,
        "the flow stopped with the agent: {alone:?}"
    );
    // ... and follows a route change nobody reports to it.
    let blocked = with_public_host_blackholed(&lab, || exchange(5))?;
    ensure!(
        blocked.received == 0,
        "packets got through a blackhole route after the agent stopped: {blocked:?}"
    );
    // The namespaces (and their attachments) go first, then the pins.
    drop(exchange);
    drop(lab);
    drop(bpffs);
    Ok(())
}

/// A pinned XDP link is taken over in the mode it runs in, which status and metrics report, and
/// a config that asks for another mode gets it at the next start: `generic` -> `auto` (taken
/// over, still generic) -> `native` (attached afresh) -> `native` (taken over). Before, a link
/// taken over reported the configured `auto`, and a changed `xdp_mode` was silently ignored.
#[test]
fn a_changed_xdp_mode_applies_at_the_next_start_and_status_reports_the_real_one() -> Result<()> {
    let scratch = ScratchDir::new("xdp-mode")?;
    let bpffs = Bpffs::mount(scratch.join("bpffs"))?;
    let state_dir = bpffs.0.join("xdp-nat");
    let lab = SnatLab::new()?;
    let _echo = UdpEcho::start(lab.public.name(), &[5400])?;
    let with_mode = |mode: &str| {
        let config =
            snat_xdp_config().replace("xdp_mode = \"native\"", &format!("xdp_mode = \"{mode}\""));
        with_state(&config, &state_dir)
    };
    let exchange = snat_lab_flow(&lab, 40_777, 5400);
    let interfaces = [SnatLab::NAT_INSIDE_IF, SnatLab::NAT_OUTSIDE_IF];

    let mut agent: Option<Agent> = None;
    for (configured, expected, how) in [
        ("generic", "generic", "attached"),
        ("auto", "generic", "taken over"),
        ("native", "native", "attached afresh"),
        ("native", "native", "taken over"),
    ] {
        if let Some(mut previous) = agent.take() {
            previous.kill()?;
        }
        let mut started = Agent::start(&lab.nat, &with_mode(configured))?;
        let context = || format!("xdp_mode = {configured:?}, {how}");
        let status = started.status()?;
        let metrics = started.metrics()?;
        for iface in interfaces {
            let kernel = xdp_mode(&lab.nat, iface)?;
            ensure!(
                kernel == expected,
                "{}: the kernel runs {iface} in {kernel}, not {expected}\n{}",
                context(),
                started.log_tail(2000)
            );
            let reported = status["interfaces"]
                .as_array()
                .context("status without interfaces")?
                .iter()
                .find(|i| i["name"] == iface)
                .with_context(|| format!("{iface} missing from status: {status}"))?["xdp_mode"]
                .clone();
            ensure!(
                reported == expected,
                "{}: status says {iface} runs in {reported}, the kernel {kernel}",
                context()
            );
            metrics
                .require(
                    "xdpnat_interface_attached",
                    &[("interface", iface), ("mode", expected)],
                )
                .with_context(context)?;
        }
        let flow = exchange(10)?;
        ensure!(flow.received == flow.sent, "{}: {flow:?}", context());
        agent = Some(started);
    }
    drop(agent);
    // The namespaces (and their attachments) go first, then the pins.
    drop(exchange);
    drop(lab);
    drop(bpffs);
    Ok(())
}
