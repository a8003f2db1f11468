//! `nat-agent import iptables` through the real binary: the seed rule sets of DESIGN.md
//! scenarios 2 and 3 (mapped into the lab ranges, `deploy/examples/iptables/`) are imported,
//! accepted by `nat-agent check`, then applied by the real agent in a namespace lab and
//! exercised with curl; unsupported lines are reported with their line number and reason and
//! exit code 3; unreadable input exits 2.
//!
//! The lab tests need root (namespaces, XDP) and fail rather than skip without it. Traffic
//! stays between the namespaces the labs create, on lab addresses only, in bounded loops.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use nat_lab::{
    http_get, install_counter, read_counter, tcp_connect, DnatLab, DnatLabOptions, EchoReply, Hook,
    HttpEcho, ScratchDir,
};

#[path = "common/agent.rs"]
mod agent;

use agent::{xdp_attached, Agent, AGENT};

/// Exit code when some lines were not translated.
const EXIT_PARTIAL: i32 = 3;
/// Exit code when the input cannot be read.
const EXIT_UNREADABLE: i32 = 2;

/// The seed rule sets, mapped into the lab ranges.
fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples/iptables")
        .join(name)
}

const SCENARIO2: &str = "scenario2-dnat.rules";
const SCENARIO3: &str = "scenario3-dnat-masquerade.rules";

/// Runs `nat-agent import iptables <args>` with `stdin` as its standard input.
fn import(args: &[&str], stdin: &str) -> Result<Output> {
    use std::io::Write;
    let mut child = Command::new(AGENT)
        .args(["import", "iptables"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting nat-agent import iptables")?;
    let mut input = child.stdin.take().context("no stdin")?;
    input.write_all(stdin.as_bytes())?;
    // Closing stdin ends the input.
    drop(input);
    child
        .wait_with_output()
        .context("waiting for nat-agent import iptables")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `nat-agent check --config <path>`; fails with its output unless it accepts the file.
fn check(path: &Path) -> Result<String> {
    let out = Command::new(AGENT)
        .args(["check", "--config"])
        .arg(path)
        .output()
        .context("running nat-agent check")?;
    ensure!(
        out.status.success(),
        "check refused {} ({}): {}",
        path.display(),
        out.status,
        text(&out.stderr)
    );
    Ok(text(&out.stdout))
}

/// Imports an example into `dir` and checks it; returns the config text.
fn import_example(dir: &ScratchDir, name: &str, interfaces: &[&str]) -> Result<String> {
    let input = example(name).display().to_string();
    let output = dir.join("imported.toml").display().to_string();
    let mut args = vec!["--input", input.as_str(), "--output", output.as_str()];
    for iface in interfaces {
        args.extend(["--interface", iface]);
    }
    let out = import(&args, "")?;
    let stderr = text(&out.stderr);
    ensure!(
        out.status.code() == Some(0),
        "import of {name} exited with {}: {stderr}",
        out.status
    );
    ensure!(
        out.stdout.is_empty(),
        "--output given, yet stdout: {}",
        text(&out.stdout)
    );
    // The DNAT rules say `-i n0`, and the lab attaches to n0 and n1: each is a warning with
    // its line, never silent.
    let rules = std::fs::read_to_string(example(name))?;
    let with_in_interface: Vec<usize> = rules
        .lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with("-A") && l.contains(" -i n0 "))
        .map(|(i, _)| i + 1)
        .collect();
    ensure!(!with_in_interface.is_empty(), "{name} has no -i rule");
    for line in with_in_interface {
        let warning = format!("{input}:{line}: warning: -i n0 is not kept");
        ensure!(stderr.contains(&warning), "no {warning:?} in: {stderr}");
    }
    ensure!(
        !stderr.contains("not translated:"),
        "lines reported as not translated: {stderr}"
    );
    check(Path::new(&output))?;
    std::fs::read_to_string(&output).with_context(|| format!("reading {output}"))
}

/// The imported config with the agent settings the lab harness needs (metrics on the nat
/// namespace's loopback, a private API socket); the import leaves `[agent]` at its defaults.
fn agent_config(imported: &str) -> String {
    format!(
        "[agent]\nmetrics_listen = \"{}\"\napi_socket = \"{}\"\n\n{imported}",
        agent::METRICS_LISTEN,
        agent::API_SOCKET_PLACEHOLDER
    )
}

/// One VIP:port of the seed rule sets and the backend socket that must answer it.
#[derive(Debug, Clone, Copy)]
struct Case {
    vip: Ipv4Addr,
    port: u16,
    backend: SocketAddrV4,
}

const fn case(vip_last: u8, port: u16, backend: Ipv4Addr, backend_port: u16) -> Case {
    Case {
        vip: Ipv4Addr::new(198, 18, 100, vip_last),
        port,
        backend: SocketAddrV4::new(backend, backend_port),
    }
}

/// Scenario 2: two VIPs onto the backend's :80, two onto the on-prem host's :22, and a VIP's
/// :22 onto the backend's :80 (see the example's address map).
const SCENARIO2_CASES: [Case; 5] = [
    case(10, 80, DnatLab::BACKEND_ADDR, 80),
    case(11, 80, DnatLab::BACKEND_ADDR, 80),
    case(12, 22, DnatLab::BACKEND_ADDR2, 22),
    case(13, 22, DnatLab::BACKEND_ADDR2, 22),
    case(14, 22, DnatLab::BACKEND_ADDR, 80),
];

/// Scenario 3: the first four of scenario 2, with MASQUERADE towards the backends.
const SCENARIO3_CASES: [Case; 4] = [
    SCENARIO2_CASES[0],
    SCENARIO2_CASES[1],
    SCENARIO2_CASES[2],
    SCENARIO2_CASES[3],
];

/// GETs every case a few times from the client: each VIP must be answered by its backend,
/// and the backend must have seen `expected_client`.
fn exercise(lab: &DnatLab, cases: &[Case], expected_client: Ipv4Addr) -> Result<()> {
    for round in 0..3 {
        for c in cases {
            let url = format!("http://{}:{}/", c.vip, c.port);
            let body = http_get(lab.client.name(), &url)
                .with_context(|| format!("no answer through the NAT (round {round}): GET {url}"))?;
            let reply: EchoReply = body.parse()?;
            ensure!(
                reply.server == c.backend,
                "{url} was answered by {} instead of {}",
                reply.server,
                c.backend
            );
            ensure!(
                *reply.client.ip() == expected_client,
                "{url}: the backend saw the client as {}, expected {expected_client}",
                reply.client
            );
        }
    }
    Ok(())
}

/// Counters on the client: replies must come from the VIPs, never from a backend address,
/// and the client must never reset a connection (it would, for a reply from the wrong VIP).
fn install_client_counters(lab: &DnatLab) -> Result<()> {
    let client = lab.client.name();
    install_counter(client, "from_vips", Hook::Input, "ip saddr 198.18.100.0/24")?;
    install_counter(
        client,
        "from_backends",
        Hook::Input,
        "ip saddr 198.18.1.0/24",
    )?;
    install_counter(
        client,
        "client_resets",
        Hook::Output,
        "tcp flags & rst == rst",
    )
}

fn check_client_counters(lab: &DnatLab) -> Result<()> {
    let client = lab.client.name();
    ensure!(
        read_counter(client, "from_vips")?.packets > 0,
        "no reply came from a VIP"
    );
    let leaked = read_counter(client, "from_backends")?.packets;
    ensure!(
        leaked == 0,
        "{leaked} replies reached the client from a backend address"
    );
    let resets = read_counter(client, "client_resets")?.packets;
    ensure!(resets == 0, "the client sent {resets} TCP resets");
    Ok(())
}

fn start_agent(lab: &DnatLab, config: &str) -> Result<Agent> {
    let agent = Agent::start(&lab.nat, &agent_config(config))?;
    for iface in [DnatLab::NAT_CLIENT_IF, DnatLab::NAT_BACKEND_IF] {
        ensure!(
            xdp_attached(&lab.nat, iface)?,
            "no XDP program on {iface} after the agent started"
        );
    }
    Ok(agent)
}

/// Scenario 2's seed rules, imported and applied: every VIP answers from the expected backend
/// and the backend sees the real client.
#[test]
fn scenario2_seed_rules_imported_and_applied_answer_from_the_expected_backends() -> Result<()> {
    let dir = ScratchDir::new("import-iptables")?;
    // The rules name only n0; replies come back through n1, so both are attached.
    let imported = import_example(
        &dir,
        SCENARIO2,
        &[DnatLab::NAT_CLIENT_IF, DnatLab::NAT_BACKEND_IF],
    )?;
    ensure!(
        imported.matches("[[dnat]]").count() == 5 && !imported.contains("[[snat]]"),
        "expected 5 dnat rules: {imported}"
    );

    let lab = DnatLab::new()?;
    let _http = HttpEcho::start(lab.backend.name(), &[80, 22])?;
    install_client_counters(&lab)?;
    let mut agent = start_agent(&lab, &imported)?;
    exercise(&lab, &SCENARIO2_CASES, DnatLab::CLIENT_ADDR)?;
    check_client_counters(&lab)?;
    agent.ensure_running()?;
    Ok(())
}

/// Scenario 3's seed rules (DNAT plus `-s CLIENTS -o BACKEND-SIDE -j MASQUERADE`), imported
/// and applied towards a backend without a route back: every VIP answers, and the backend
/// sees the NAT's address.
#[test]
fn scenario3_seed_rules_imported_and_applied_backend_sees_the_nat_address() -> Result<()> {
    let dir = ScratchDir::new("import-iptables")?;
    // -i n0 and -o n1 name both interfaces: no --interface needed.
    let imported = import_example(&dir, SCENARIO3, &[])?;
    ensure!(
        imported.contains("name = \"n0\"") && imported.contains("name = \"n1\""),
        "interfaces not derived from -i/-o: {imported}"
    );
    ensure!(
        imported.contains("masquerade = true") && imported.contains("out_interface = \"n1\""),
        "MASQUERADE not imported: {imported}"
    );

    let lab = DnatLab::with_options(DnatLabOptions {
        backend_default_route: false,
    })?;
    let _http = HttpEcho::start(lab.backend.name(), &[80, 22])?;
    // Precondition: without NAT the backend cannot answer the client at all.
    let direct = SocketAddrV4::new(DnatLab::BACKEND_ADDR, 80);
    ensure!(
        tcp_connect(lab.client.name(), None, direct, Duration::from_secs(1)).is_err(),
        "the client reached {direct} without NAT: the lab is not scenario 3"
    );
    let nat_addr = DnatLab::NAT_BACKEND_ADDR;
    install_counter(
        lab.backend.name(),
        "from_elsewhere",
        Hook::Input,
        &format!("ip saddr != {nat_addr} tcp dport {{ 22, 80 }}"),
    )?;
    install_client_counters(&lab)?;
    let mut agent = start_agent(&lab, &imported)?;
    exercise(&lab, &SCENARIO3_CASES, nat_addr)?;
    let other = read_counter(lab.backend.name(), "from_elsewhere")?.packets;
    ensure!(
        other == 0,
        "the backend received {other} packets from an address other than {nat_addr}"
    );
    check_client_counters(&lab)?;
    agent.ensure_running()?;
    Ok(())
}

/// Lines the config cannot express are reported on stderr as `INPUT:LINE: not translated:
/// REASON`, the exit code is 3, and the output (stdout by default) still holds every rule
/// that did translate, as a config `check` accepts.
#[test]
fn unsupported_lines_are_reported_with_line_and_reason_and_exit_3() -> Result<()> {
    let input = "\
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:MYCHAIN - [0:0]
-A PREROUTING -d 198.18.100.10/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 198.18.1.2:80
-A PREROUTING -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 80
-A PREROUTING -d 198.18.100.11/32 -p tcp -m multiport --dports 80,443 -j DNAT --to-destination 198.18.1.2
-A PREROUTING ! -d 198.18.100.0/24 -j DNAT --to-destination 198.18.1.3
-A PREROUTING -j MYCHAIN
-A MYCHAIN -d 198.18.100.12/32 -j DNAT --to-destination 198.18.1.3
-A OUTPUT -d 198.18.100.10/32 -j DNAT --to-destination 198.18.1.2
-A POSTROUTING -s 198.18.0.0/24 -m state --state NEW -o n1 -j MASQUERADE
-A POSTROUTING -s 198.18.0.0/24 -o n1 -j MASQUERADE
COMMIT
";
    let out = import(&["--interface", "n0", "--interface", "n1"], input)?;
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    ensure!(
        out.status.code() == Some(EXIT_PARTIAL),
        "exit {} (expected {EXIT_PARTIAL}): {stderr}",
        out.status
    );
    for (line, reason) in [
        (6, "-j REDIRECT delivers to the box itself"),
        (7, "match -m multiport is not supported"),
        (
            8,
            "negated match `! -d 198.18.100.0/24` cannot be expressed",
        ),
        (
            9,
            "-j MYCHAIN: jumps into user-defined chains are not followed",
        ),
        (
            10,
            "-A MYCHAIN: rules of user-defined chains are not imported",
        ),
        (
            11,
            "-A OUTPUT: NAT of the box's own outgoing traffic is not translated",
        ),
        (12, "match -m state is not supported"),
    ] {
        let expected = format!("standard input:{line}: not translated: {reason}");
        ensure!(
            stderr.contains(&expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    ensure!(
        stderr.matches(": not translated: ").count() == 7,
        "exactly the 7 unsupported lines are reported:\n{stderr}"
    );
    ensure!(
        stderr.contains("standard input: 2 rules translated (1 dnat, 1 snat)"),
        "summary: {stderr}"
    );
    // The output names the unsupported lines in its header too, and holds the two others.
    ensure!(
        stdout.contains("#   line 6: -j REDIRECT"),
        "header lacks the report: {stdout}"
    );
    ensure!(
        stdout.matches("[[dnat]]").count() == 1 && stdout.matches("[[snat]]").count() == 1,
        "translated rules missing: {stdout}"
    );
    let dir = ScratchDir::new("import-iptables")?;
    let path = dir.write("partial.toml", &stdout)?;
    let summary = check(&path)?;
    ensure!(
        summary.contains("OK (1 dnat rules, 1 snat rules, 2 interfaces)"),
        "check: {summary}"
    );
    Ok(())
}

/// An input that cannot be read exits 2 and writes nothing.
#[test]
fn unreadable_input_exits_2() -> Result<()> {
    let dir = ScratchDir::new("import-iptables")?;
    let missing = dir.join("missing.rules").display().to_string();
    let output = dir.join("out.toml");
    let out = import(
        &[
            "--input",
            &missing,
            "--output",
            &output.display().to_string(),
        ],
        "",
    )?;
    let stderr = text(&out.stderr);
    ensure!(
        out.status.code() == Some(EXIT_UNREADABLE),
        "exit {}: {stderr}",
        out.status
    );
    ensure!(
        stderr.contains(&format!("{missing}: cannot read")),
        "stderr: {stderr}"
    );
    ensure!(
        out.stdout.is_empty() && !output.exists(),
        "something was written"
    );

    // A directory is unreadable as a file too.
    let out = import(&["--input", &dir.path().display().to_string()], "")?;
    ensure!(out.status.code() == Some(EXIT_UNREADABLE), "{}", out.status);
    Ok(())
}

/// Everything translated: exit 0, and the seed's original (unmapped) one-arm rule set from
/// standard input needs no warning, since eth0 is its only interface.
///
/// The seed text is quoted verbatim and is parser input only: it is imported and validated
/// with `nat-agent check` (no kernel, no namespace) and never applied; the lab tests above
/// apply the examples mapped into the lab ranges.
#[test]
fn seed_rule_set_from_stdin_translates_with_exit_0() -> Result<()> {
    let seed = "\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -d 172.16.2.65/32 -i eth0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 172.16.3.5:80
-A PREROUTING -d 172.16.20.5/32 -i eth0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 172.16.3.5:80
-A POSTROUTING -s 192.168.1.0/24 -o eth0 -j MASQUERADE
COMMIT
";
    let out = import(&[], seed)?;
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    ensure!(out.status.success(), "exit {}: {stderr}", out.status);
    ensure!(
        !stderr.contains(": warning:"),
        "unexpected warnings: {stderr}"
    );
    ensure!(
        stdout.starts_with("# xdp-nat config imported from iptables-save output"),
        "header: {stdout}"
    );
    let dir = ScratchDir::new("import-iptables")?;
    let summary = check(&dir.write("seed.toml", &stdout)?)?;
    ensure!(
        summary.contains("OK (2 dnat rules, 1 snat rules, 1 interfaces)"),
        "check: {summary}"
    );
    Ok(())
}
