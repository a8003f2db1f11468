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
