//! The agent's systemd protocol, checked with a real notify socket: READY=1 once it serves,
//! WATCHDOG=1 pings while the map-owning task answers, STOPPING=1 on SIGTERM.

use std::{os::unix::net::UnixDatagram, time::Duration};

use anyhow::{ensure, Context, Result};
use nat_lab::{scratch::ScratchDir, DnatLab};

const AGENT: &str = env!("CARGO_BIN_EXE_nat-agent");

/// Reads notify datagrams until `wanted` has been seen `times` times, or the deadline passes.
fn wait_for(
    socket: &UnixDatagram,
    wanted: &str,
    times: usize,
    seen: &mut Vec<String>,
) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 512];
    while seen
        .iter()
        .filter(|m| m.lines().any(|l| l == wanted))
        .count()
        < times
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        ensure!(
            !left.is_zero(),
            "no {wanted} x{times} from the agent; got {seen:?}"
        );
        socket.set_read_timeout(Some(left))?;
        match socket.recv(&mut buf) {
            Ok(n) => seen.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e).context("reading the notify socket"),
        }
    }
    Ok(())
}

#[test]
fn agent_notifies_ready_pings_the_watchdog_and_says_stopping() -> Result<()> {
    let lab = DnatLab::new()?;
    let dir = ScratchDir::new("notify")?;
    let notify_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&notify_path).context("binding the notify socket")?;
    let config = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/lab.toml"),
    )?
    .replace(
        "[agent]",
        &format!(
            "[agent]\napi_socket = \"{}\"",
            dir.join("api.sock").display()
        ),
    );
    let config_path = dir.write("agent.toml", &config)?;

    let mut child = lab
        .nat
        .command(AGENT)
        .args(["run", "--config"])
        .arg(&config_path)
        .env("NOTIFY_SOCKET", &notify_path)
        // Half a second: pings every quarter second.
        .env("WATCHDOG_USEC", "500000")
        .env_remove("WATCHDOG_PID")
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting the agent")?;
    let result = (|| -> Result<()> {
        let mut seen = Vec::new();
        wait_for(&socket, "READY=1", 1, &mut seen)?;
        wait_for(&socket, "WATCHDOG=1", 3, &mut seen)?;
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        ensure!(rc == 0, "could not signal the agent");
        wait_for(&socket, "STOPPING=1", 1, &mut seen)?;
        let status = child.wait()?;
        ensure!(status.success(), "agent exited with {status}");
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// A load balancer probes the NAT VM on its own address (scenario 4): the probe crosses the
/// XDP program untranslated and `/readyz` answers while the dataplane is attached.
#[test]
fn health_probes_reach_the_nat_through_its_own_address() -> Result<()> {
    let lab = DnatLab::new()?;
    let dir = ScratchDir::new("health")?;
    let config = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/lab.toml"),
    )?
    .replace(
        "[agent]",
        &format!(
            "[agent]\napi_socket = \"{}\"\nhealth_listen = \"0.0.0.0:8080\"",
            dir.join("api.sock").display()
        ),
    );
    let config_path = dir.write("agent.toml", &config)?;
    let config_arg = config_path.display().to_string();
    let mut opts = nat_lab::SpawnOptions::new("nat-agent");
    opts.stop_signal = libc::SIGTERM;
    opts.stop_grace = Duration::from_secs(5);
    let mut agent = lab
        .nat
        .spawn(AGENT, ["run", "--config", config_arg.as_str()], opts)?;
    let probe = |path: &str| {
        lab.client.run(
            "curl",
            [
                "-s",
                "-w",
                " %{http_code}",
                "--max-time",
                "2",
                &format!("http://{}:8080{path}", DnatLab::NAT_CLIENT_ADDR),
            ],
        )
    };
    let ready = nat_lab::wait_until_ok("the readiness probe", Duration::from_secs(20), || {
        agent.ensure_running()?;
        let out = probe("/readyz")?;
        ensure!(out.ends_with(" 200"), "not ready yet: {out}");
        Ok(out)
    })?;
    ensure!(ready.starts_with("ready"), "readyz: {ready}");
    let health = probe("/healthz")?;
    ensure!(health == "ok\n 200", "healthz: {health:?}");
    let status = agent.stop(Duration::from_secs(10))?;
    ensure!(status.success(), "agent exited with {status}");
    Ok(())
}

#[test]
fn a_bad_health_listener_is_refused_by_check() -> Result<()> {
    let dir = ScratchDir::new("health-bad")?;
    let config = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/lab.toml"),
    )?
    .replace("[agent]", "[agent]\nhealth_listen = \"0.0.0.0\"");
    let path = dir.write("bad.toml", &config)?;
    let out = std::process::Command::new(AGENT)
        .args(["check", "--config"])
        .arg(&path)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(2), "expected exit 2: {stderr}");
    ensure!(
        stderr.trim()
            == format!(
                "error: {}: [agent]: field `health_listen`: \"0.0.0.0\" is not an address:port (e.g. \"0.0.0.0:8080\")",
                path.display()
            ),
        "one located error line expected: {stderr}"
    );
    Ok(())
}
