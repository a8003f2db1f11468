//! `cargo xtask lab`: the demo. Builds the DNAT lab under fixed, recognisable namespace names,
//! runs the real agent in the nat namespace, shows the VIPs working, and keeps the lab up for
//! poking until Ctrl-C / SIGTERM or `--duration`.
//!
//! Fixed names (unlike the tests' generated ones) let a second run, or `--down`, remove what a
//! crashed run left behind.

use std::{
    collections::BTreeSet,
    env,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nat_lab::{
    cleanup_stale, http_get,
    netns::{self, remove_namespace},
    process::{describe_status, netns_command},
    require_root, require_tools, spawn, wait_until, Check, ChildGuard, ChildOutput, DnatLab,
    EchoReply, HttpEcho, SpawnOptions, LAB_TOOLS,
};

use crate::{
    config::{DemoConfig, VipCheck},
    signals::{self, check_interrupted},
    LabArgs,
};

/// Demo namespace: the client host.
pub const DEMO_CLIENT: &str = "xdpnat-client";
/// Demo namespace: the NAT box, where the agent runs.
pub const DEMO_NAT: &str = "xdpnat-nat";
/// Demo namespace: the backend host.
pub const DEMO_BACKEND: &str = "xdpnat-backend";
const DEMO_NAMESPACES: [&str; 3] = [DEMO_CLIENT, DEMO_NAT, DEMO_BACKEND];

/// Ports the backend's echo server always serves, besides the rules' targets.
const ECHO_PORTS: [u16; 2] = [80, 8080];

/// How long the agent gets to serve metrics after it starts (it loads and attaches XDP).
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the agent gets to exit after SIGTERM before it is killed.
const AGENT_STOP_GRACE: Duration = Duration::from_secs(10);

/// Entry point of `cargo xtask lab`.
pub fn lab(args: &LabArgs) -> Result<()> {
    signals::install()?;
    require_root()?;
    if args.down {
        return down();
    }
    require_tools(LAB_TOOLS)?;
    let root = workspace_root()?;
    let config_path = match &args.config {
        Some(path) => path.clone(),
        None => root.join("deploy/examples/lab.toml"),
    };
    // Absolute, because the agent gets it on its command line.
    let config_path = config_path
        .canonicalize()
        .with_context(|| format!("agent config {} not found", config_path.display()))?;
    let config = DemoConfig::load(&config_path)?;
    warn_about_interfaces(&config);

    let agent_bin = match &args.agent_bin {
        Some(path) => path.clone(),
        None => build_agent(&root, args.release)?,
    };
    if !agent_bin.is_file() {
        bail!("agent binary {} does not exist", agent_bin.display());
    }
    check_interrupted()?;

    let result = demo(args, &config, &config_path, &agent_bin);
    // Every guard has dropped by now; say whether that really removed the lab.
    let left: Vec<&str> = DEMO_NAMESPACES
        .into_iter()
        .filter(|ns| netns::exists(ns))
        .collect();
    if left.is_empty() {
        println!("lab removed");
    } else {
        eprintln!(
            "xtask: namespaces {} are still there; `cargo xtask lab --down` removes them",
            left.join(", ")
        );
    }
    result
}

/// `--down`: remove what an earlier run left.
fn down() -> Result<()> {
    let removed = remove_demo_namespaces()?;
    if removed.is_empty() {
        println!("no demo namespaces to remove");
    } else {
        println!("removed namespaces: {}", removed.join(", "));
    }
    Ok(())
}

fn remove_demo_namespaces() -> Result<Vec<&'static str>> {
    let mut removed = Vec::new();
    for ns in DEMO_NAMESPACES {
        if remove_namespace(ns)? {
            removed.push(ns);
        }
    }
    Ok(removed)
}

/// The workspace root, known at compile time (xtask lives one level below it), so the task
/// works from any directory.
fn workspace_root() -> Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .with_context(|| format!("{} has no parent directory", manifest.display()))
}

/// Runs `cargo build -p nat-agent` and returns the binary's path.
fn build_agent(root: &Path, release: bool) -> Result<PathBuf> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(root).args(["build", "-p", "nat-agent"]);
    if release {
        cmd.arg("--release");
    }
    println!(
        "building the agent: cargo build -p nat-agent{}",
        if release { " --release" } else { "" }
    );
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", Path::new(&cargo).display()))?;
    check_interrupted()?;
    if !status.success() {
        bail!(
            "`cargo build -p nat-agent` failed ({})",
            describe_status(status)
        );
    }
    // Cargo resolves a relative CARGO_TARGET_DIR against its working directory: the root.
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(|dir| root.join(dir))
        .unwrap_or_else(|| root.join("target"));
    Ok(target
        .join(if release { "release" } else { "debug" })
        .join("nat-agent"))
}

fn warn_about_interfaces(config: &DemoConfig) {
    let lab_ifaces = [DnatLab::NAT_CLIENT_IF, DnatLab::NAT_BACKEND_IF];
    for iface in &config.interfaces {
        if !lab_ifaces.contains(&iface.as_str()) {
            eprintln!(
                "xtask: warning: the config names interface {iface:?}, but the lab's nat \
                 namespace has only {lab_ifaces:?}"
            );
        }
    }
}

/// The part that owns guards: whatever way it returns, they drop in reverse order (agent,
/// then echo server, then namespaces).
fn demo(args: &LabArgs, config: &DemoConfig, config_path: &Path, agent_bin: &Path) -> Result<()> {
    // Also the leftovers of crashed test runs (their owners are dead): good hygiene, not needed.
    if let Err(e) = cleanup_stale() {
        eprintln!("xtask: warning: cleaning up stale test namespaces: {e:#}");
    }
    let removed = remove_demo_namespaces()?;
    if !removed.is_empty() {
        println!(
            "removed namespaces left by an earlier run: {}",
            removed.join(", ")
        );
    }
    println!("building the lab: {DEMO_CLIENT} -- {DEMO_NAT} -- {DEMO_BACKEND}");
    let lab = DnatLab::with_names(DEMO_CLIENT, DEMO_NAT, DEMO_BACKEND)?;
    check_interrupted()?;

    let ports = echo_ports(config);
    let mut echo = HttpEcho::start(lab.backend.name(), &ports)?;
    println!(
        "HTTP echo server on {} and {} ports {ports:?}",
        DnatLab::BACKEND_ADDR,
        DnatLab::BACKEND_ADDR2
    );
    check_interrupted()?;

    let mut agent = start_agent(&lab, agent_bin, config_path)?;
    wait_for_metrics(&lab, &mut agent, config)?;
    println!("agent is up (metrics answer at {})", config.metrics_url());

    let failures = run_checks(&lab, config);
    print_instructions(&lab, &agent, agent_bin, config, args.duration);

    let end = wait_for_end(&mut agent, &mut echo, args.duration);
    println!("stopping the agent (SIGTERM)");
    let status = agent.stop(AGENT_STOP_GRACE)?;
    println!("agent exited ({})", describe_status(status));
    drop(agent);
    drop(echo);
    drop(lab);
    let reason = end?;
    println!("{reason}");
    if failures > 0 {
        bail!(
            "{failures} of {} VIP checks failed (see above)",
            config.checks.len()
        );
    }
    Ok(())
}

/// The echo server's ports: the fixed demo ports plus every rule's target port on a backend
/// address.
fn echo_ports(config: &DemoConfig) -> Vec<u16> {
    let backend = [DnatLab::BACKEND_ADDR, DnatLab::BACKEND_ADDR2];
    let mut ports: BTreeSet<u16> = ECHO_PORTS.into_iter().collect();
    ports.extend(
        config
            .checks
            .iter()
            .filter(|c| backend.contains(c.to.ip()))
            .map(|c| c.to.port()),
    );
    ports.into_iter().collect()
}

fn start_agent(lab: &DnatLab, agent_bin: &Path, config_path: &Path) -> Result<ChildGuard> {
    let mut cmd = netns_command(lab.nat.name(), agent_bin);
    cmd.arg("run").arg("--config").arg(config_path);
    let mut opts = SpawnOptions::new("nat-agent");
    // The agent's log belongs on the demo's terminal.
    opts.output = ChildOutput::Inherit;
    // SIGTERM lets it detach and save state; it runs in its own process group, so a
    // terminal's Ctrl-C reaches only xtask, which then stops it in order.
    opts.stop_signal = libc::SIGTERM;
    opts.stop_grace = AGENT_STOP_GRACE;
    // If xtask itself is killed outright, the agent still gets its SIGTERM.
    opts.parent_death_signal = Some(libc::SIGTERM);
    println!(
        "starting the agent: ip netns exec {} {} run --config {}",
        lab.nat.name(),
        agent_bin.display(),
        config_path.display()
    );
    spawn(cmd, opts)
}

fn wait_for_metrics(lab: &DnatLab, agent: &mut ChildGuard, config: &DemoConfig) -> Result<()> {
    let url = config.metrics_url();
    wait_until(
        &format!("the agent's metrics at {url}"),
        AGENT_READY_TIMEOUT,
        || {
            check_interrupted()?;
            agent.ensure_running()?;
            Ok(match http_get(lab.nat.name(), &url) {
                Ok(_) => Check::Done(()),
                Err(e) => Check::NotYet(format!("{e:#}")),
            })
        },
    )
}

/// GETs every VIP from the client and prints what came back; returns how many failed.
fn run_checks(lab: &DnatLab, config: &DemoConfig) -> usize {
    println!();
    println!("from {} ({}):", lab.client.name(), DnatLab::CLIENT_ADDR);
    let mut failures = 0;
    for check in &config.checks {
        let url = check.url();
        match verify(lab, check) {
            Ok(body) => println!("  ok      GET {url:<28} [{}] -> {body}", check.name),
            Err(e) => {
                failures += 1;
                println!("  FAILED  GET {url:<28} [{}] -> {e:#}", check.name);
            }
        }
    }
    println!();
    failures
}

fn verify(lab: &DnatLab, check: &VipCheck) -> Result<String> {
    let body = http_get(lab.client.name(), &check.url())?;
    let body = body.trim().to_owned();
    let reply: EchoReply = body.parse()?;
    if *reply.client.ip() != DnatLab::CLIENT_ADDR {
        bail!(
            "{body}: the backend saw {} instead of the client {}",
            reply.client.ip(),
            DnatLab::CLIENT_ADDR
        );
    }
    if reply.server != check.to {
        bail!("{body}: reached {} instead of {}", reply.server, check.to);
    }
    Ok(body)
}

fn print_instructions(
    lab: &DnatLab,
    agent: &ChildGuard,
    agent_bin: &Path,
    config: &DemoConfig,
    duration: Option<u64>,
) {
    let client = lab.client.name();
    let nat = lab.nat.name();
    let backend = lab.backend.name();
    println!(
        "The lab is up; the agent (pid {}) runs in namespace {nat}.",
        agent.pid()
    );
    println!("Poke it from another terminal (as root):");
    for check in &config.checks {
        println!(
            "  ip netns exec {client} curl -s {:<28} # {} -> {}",
            check.url(),
            check.name,
            check.to
        );
    }
    println!("Metrics:");
    println!(
        "  ip netns exec {nat} curl -s {} | grep '^xdpnat_'",
        config.metrics_url()
    );
    // The API socket is a file, not a network endpoint: no namespace needed.
    let cli = agent_bin.display();
    println!("Rules, sessions and status through the local API (default socket):");
    println!("  {cli} status");
    println!("  {cli} rules list");
    println!("  {cli} rules diff deploy/examples/lab.toml      # what a replace would change");
    println!("  {cli} sessions list");
    println!("Packets (XDP-redirected frames are not seen on the nat side; watch the ends):");
    println!(
        "  ip netns exec {client} tcpdump -ni {} tcp",
        DnatLab::CLIENT_IF
    );
    println!(
        "  ip netns exec {backend} tcpdump -ni {} tcp",
        DnatLab::BACKEND_IF
    );
    println!("A shell on a host: ip netns exec {client} bash");
    match duration {
        Some(secs) => {
            println!("Stopping by itself in {secs} s (--duration); Ctrl-C stops it earlier.")
        }
        None => println!(
            "Ctrl-C (or kill -TERM {}) stops the agent and removes the lab.",
            std::process::id()
        ),
    }
    println!("After a crash, `sudo scripts/run-lab.sh --down` removes the namespaces.");
    println!();
}

/// Blocks until a stop signal, the end of `duration`, or the death of the agent or the echo
/// server; returns why it stopped, or an error when something died.
fn wait_for_end(
    agent: &mut ChildGuard,
    echo: &mut HttpEcho,
    duration: Option<u64>,
) -> Result<String> {
    let start = Instant::now();
    // No deadline when absent or too far away to represent: then only a signal ends it.
    let deadline = duration.and_then(|secs| start.checked_add(Duration::from_secs(secs)));
    loop {
        if let Some(signal) = signals::stop_requested() {
            return Ok(format!("stopped by {}", signals::name(signal)));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(format!(
                "stopped after {} s (--duration)",
                start.elapsed().as_secs()
            ));
        }
        agent.ensure_running()?;
        echo.ensure_running()?;
        thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_names_are_valid_and_distinct() {
        let set: BTreeSet<_> = DEMO_NAMESPACES.into_iter().collect();
        assert_eq!(set.len(), 3);
        for ns in DEMO_NAMESPACES {
            // Never taken for a stale generated test namespace (those start with "xnl").
            assert!(netns::owner_pid(ns).is_none(), "{ns}");
        }
    }

    #[test]
    fn echo_ports_cover_the_example_rules() {
        let config = DemoConfig::parse(include_str!("../../deploy/examples/lab.toml")).unwrap();
        assert_eq!(echo_ports(&config), [80, 8080]);
    }

    #[test]
    fn workspace_root_holds_the_example_config() {
        let root = workspace_root().unwrap();
        assert!(root.join("deploy/examples/lab.toml").is_file());
        assert!(root.join("Cargo.toml").is_file());
    }
}
