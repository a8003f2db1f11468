//! The Debian package, end to end: `cargo xtask package` builds it, it holds what it should,
//! it unpacks into a scratch root, its unit passes `systemd-analyze verify` there, the
//! unpacked binary and configs behave, the sysctl drop-in applies, and the agent runs with
//! exactly the privileges the unit grants it.
//!
//! The package is built from the dev profile (the binary the test suite has already built):
//! a release build would add about three minutes of compiling to every run for the same
//! files and scripts; `cargo xtask package` (release) differs only in the optimiser.
//!
//! Needs root (network namespaces, BPF) and the tools scripts/bootstrap.sh installs; fails,
//! never skips, without them.

use std::{
    collections::BTreeSet,
    ffi::OsStr,
    fs,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
    time::Duration,
};

use nat_lab::{
    process::{run_output, SpawnOptions},
    tools::find_tool,
    wait_until, Check, Netns,
};

/// A no-op `cargo build` plus stripping and xz take ~10 s; a cold build of the agent (the
/// test run on its own) several minutes.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
const QUICK: Duration = Duration::from_secs(60);
/// The unit's overall exposure as `systemd-analyze security` scores it (0 best, 10 worst).
/// 2.3 today; what remains is inherent to an XDP daemon (host network, CAP_NET_ADMIN, ...).
const MAX_EXPOSURE: f64 = 3.0;

const UNIT: &str = "lib/systemd/system/xdp-nat.service";
const SYSCTL: &str = "usr/lib/sysctl.d/90-xdp-nat.conf";
const CONFIG: &str = "etc/xdp-nat/nat.toml";
const BINARY: &str = "usr/sbin/nat-agent";
const MAN: &str = "usr/share/man/man8/nat-agent.8.gz";
const DOC: &str = "usr/share/doc/xdp-nat";

/// Tools this test runs, with their Debian packages.
const TOOLS: &[(&str, &str)] = &[
    ("dpkg-deb", "dpkg"),
    ("dpkg-shlibdeps", "dpkg-dev"),
    ("systemd-analyze", "systemd"),
    ("man", "man-db"),
    ("setpriv", "util-linux"),
    ("strace", "strace"),
    ("ip", "iproute2"),
    ("sysctl", "procps"),
];

/// The package, built once for all tests here.
struct Built {
    deb: PathBuf,
    /// `dpkg -x` of the package, untouched.
    root: PathBuf,
    /// Another `dpkg -x`, plus the host's systemd units (targets the unit depends on).
    verify_root: PathBuf,
}

fn built() -> &'static Built {
    static BUILT: OnceLock<Result<Built, String>> = OnceLock::new();
    match BUILT.get_or_init(|| build().map_err(|e| format!("{e:#}"))) {
        Ok(b) => b,
        Err(e) => panic!("building the package failed: {e}"),
    }
}

fn build() -> anyhow::Result<Built> {
    nat_lab::require_root()?;
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(tool, _)| find_tool(tool).is_none())
        .map(|(tool, package)| format!("{tool} (Debian package {package})"))
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "missing tools: {}; run scripts/bootstrap.sh",
        missing.join(", ")
    );
    // Under target/tmp: reused (emptied) by the next run instead of piling up in /tmp.
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("xdp-nat-package");
    if base.exists() {
        fs::remove_dir_all(&base)?;
    }
    let out = base.join("out");
    let started = std::time::Instant::now();
    let output = run_output(
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["package", "--profile", "dev", "--out-dir"])
            .arg(&out),
        BUILD_TIMEOUT,
    )?;
    eprintln!("package built in {:.1?}", started.elapsed());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let deb = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    anyhow::ensure!(
        deb.is_file() && deb.starts_with(&out),
        "xtask package printed {stdout:?}, not the path of a .deb in {}",
        out.display()
    );
    let root = base.join("root");
    let verify_root = base.join("verify-root");
    for dir in [&root, &verify_root] {
        run_output(Command::new("dpkg").arg("-x").arg(&deb).arg(dir), QUICK)?;
    }
    // `systemd-analyze verify --root` resolves everything inside the root: ExecStart= paths
    // (so the binary must be where the unit says, which is the point) and also the targets
    // every service depends on by default (sysinit.target, ...), which a real root has from
    // the systemd package. Those come from the host's.
    let units = verify_root.join("usr/lib/systemd/system");
    fs::create_dir_all(&units)?;
    run_output(
        Command::new("cp")
            .args(["-an", "/usr/lib/systemd/system/."])
            .arg(&units),
        QUICK,
    )?;
    // ExecReload= runs /bin/kill (procps, priority important: on every Debian system).
    fs::create_dir_all(verify_root.join("bin"))?;
    fs::copy("/bin/kill", verify_root.join("bin/kill"))?;
    Ok(Built {
        deb,
        root,
        verify_root,
    })
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .to_path_buf()
}

/// Runs `cmd` to completion (quick commands only) and returns its output, whatever its status.
fn output_of(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Stdout of `cmd`, which must succeed.
fn stdout_ok(cmd: &mut Command) -> String {
    let out = output_of(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every value assigned to `key` in the unit file, split on whitespace, in order.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
        .collect()
}

#[test]
fn control_fields_and_file_list() {
    let b = built();
    let info = stdout_ok(Command::new("dpkg-deb").arg("-f").arg(&b.deb));
    let field = |name: &str| -> String {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in the control file:\n{info}"))
            .to_owned()
    };
    assert_eq!(field("Package"), "xdp-nat");
    assert_eq!(field("Version"), format!("{}-1", env!("CARGO_PKG_VERSION")));
    assert_eq!(
        field("Architecture"),
        stdout_ok(Command::new("dpkg").arg("--print-architecture")).trim()
    );
    let depends = field("Depends");
    for dep in ["libc6", "init-system-helpers"] {
        assert!(depends.contains(dep), "Depends lacks {dep}: {depends}");
    }

    // Control area: the conffile, and maintainer scripts that at least parse.
    let control = b.root.with_file_name("control");
    run_output(
        Command::new("dpkg-deb")
            .arg("--control")
            .arg(&b.deb)
            .arg(&control),
        QUICK,
    )
    .unwrap();
    assert_eq!(
        fs::read_to_string(control.join("conffiles")).unwrap(),
        "/etc/xdp-nat/nat.toml\n"
    );
    for script in ["postinst", "prerm", "postrm"] {
        stdout_ok(Command::new("sh").arg("-n").arg(control.join(script)));
    }

    // The listing: every expected file with its mode, and everything owned by root.
    let listing = stdout_ok(Command::new("dpkg-deb").arg("-c").arg(&b.deb));
    let entries: Vec<(String, String, String)> = listing
        .lines()
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (
                cols[0].to_owned(),
                cols[1].to_owned(),
                cols.last().unwrap().trim_start_matches("./").to_owned(),
            )
        })
        .collect();
    for (_, owner, path) in &entries {
        assert_eq!(owner, "root/root", "{path} is owned by {owner}");
    }
    let expected = [
        (BINARY, "-rwxr-xr-x"),
        (UNIT, "-rw-r--r--"),
        (SYSCTL, "-rw-r--r--"),
        (CONFIG, "-rw-r--r--"),
        (MAN, "-rw-r--r--"),
        ("usr/share/doc/xdp-nat/copyright", "-rw-r--r--"),
        ("usr/share/doc/xdp-nat/changelog.Debian.gz", "-rw-r--r--"),
        ("usr/share/doc/xdp-nat/README.md.gz", "-rw-r--r--"),
        ("usr/share/doc/xdp-nat/examples/lab.toml", "-rw-r--r--"),
        (
            "usr/share/doc/xdp-nat/examples/snat-egress.toml",
            "-rw-r--r--",
        ),
        (
            "usr/share/doc/xdp-nat/examples/dnat-masquerade.toml",
            "-rw-r--r--",
        ),
    ];
    for (path, mode) in expected {
        let found = entries.iter().find(|(_, _, p)| p == path);
        assert_eq!(
            found.map(|(m, _, _)| m.as_str()),
            Some(mode),
            "{path} in\n{listing}"
        );
    }

    // Shipped as written in deploy/.
    let ws = workspace();
    for (packaged, source) in [
        (UNIT, "deploy/systemd/xdp-nat.service"),
        (SYSCTL, "deploy/sysctl/90-xdp-nat.conf"),
        (CONFIG, "deploy/packaging/nat.toml"),
    ] {
        assert_eq!(
            fs::read(b.root.join(packaged)).unwrap(),
            fs::read(ws.join(source)).unwrap(),
            "{packaged} differs from {source}"
        );
    }
}

/// `systemd-analyze verify` on the unpacked unit, inside the unpacked root: ExecStart= and
/// ExecStartPre= must name the packaged binary, `man:nat-agent(8)` must resolve to the
/// packaged man page, and any warning (an unknown or misspelt setting only warns) fails.
#[test]
fn unit_passes_systemd_analyze_verify() {
    let b = built();
    let verify = |unit: &str| -> Output {
        output_of(
            Command::new("systemd-analyze")
                .arg("verify")
                .arg(format!("--root={}", b.verify_root.display()))
                .arg(unit)
                // The Documentation= check runs `man`: let it find the packaged page.
                .env("MANPATH", b.verify_root.join("usr/share/man"))
                .env("SYSTEMD_LOG_COLOR", "0"),
        )
    };
    let out = verify("xdp-nat.service");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify ({}):\n{said}",
        out.status
    );

    // The check has teeth: the same unit naming a binary the package lacks is refused.
    let unit = fs::read_to_string(b.verify_root.join(UNIT)).unwrap();
    let broken = unit.replace(
        "ExecStart=/usr/sbin/nat-agent ",
        "ExecStart=/usr/sbin/nat-agentx ",
    );
    assert_ne!(
        broken, unit,
        "the unit has no ExecStart=/usr/sbin/nat-agent"
    );
    fs::write(
        b.verify_root
            .join("lib/systemd/system/xdp-nat-broken.service"),
        broken,
    )
    .unwrap();
    let out = verify("xdp-nat-broken.service");
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("nat-agentx"),
        "verify accepted a unit whose binary does not exist: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Hardening does not regress: systemd's own exposure score.
    let text = stdout_ok(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(format!("--root={}", b.verify_root.display()))
            .arg("xdp-nat.service"),
    );
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for xdp-nat.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(
        score <= MAX_EXPOSURE,
        "exposure {score} > {MAX_EXPOSURE}:\n{text}"
    );
}

#[test]
fn unpacked_binary_and_shipped_configs() {
    let b = built();
    let bin = b.root.join(BINARY);
    assert_eq!(
        stdout_ok(Command::new(&bin).arg("--version")).trim(),
        format!("nat-agent {}", env!("CARGO_PKG_VERSION"))
    );

    // The default config is refused, with the reason, until an interface is added (exit 2:
    // the service's ExecStartPre fails with this message in the journal).
    let config = b.root.join(CONFIG);
    let out = output_of(Command::new(&bin).arg("check").arg("--config").arg(&config));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "check of the default: {stderr}");
    assert!(
        stderr.contains("[[interfaces]]") && stderr.contains("no interface to attach to"),
        "{stderr}"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "the default should have exactly one problem: {stderr}"
    );

    // Its commented-out settings ("#" directly followed by text) are a valid config once
    // uncommented, so the template cannot rot as the format changes.
    let template = fs::read_to_string(&config).unwrap();
    let uncommented: String = template
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if !rest.is_empty() && !rest.starts_with([' ', '#']) => rest,
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let edited = b.root.with_file_name("nat-uncommented.toml");
    fs::write(&edited, uncommented).unwrap();
    let out = stdout_ok(Command::new(&bin).arg("check").arg("--config").arg(&edited));
    assert!(
        out.contains("OK (1 dnat rules, 1 snat rules, 1 interfaces)"),
        "{out}"
    );

    // Every shipped example validates.
    let examples = b.root.join(DOC).join("examples");
    let mut checked = 0;
    for entry in fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = stdout_ok(Command::new(&bin).arg("check").arg("--config").arg(&path));
            assert!(out.contains(": OK ("), "{}: {out}", path.display());
            checked += 1;
        }
    }
    assert!(
        checked >= 3,
        "only {checked} examples in {}",
        examples.display()
    );

    // The man page renders without warnings and documents every command.
    let out = output_of(
        Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l"])
            .arg(b.root.join(MAN))
            .env("MANWIDTH", "80")
            .env("LC_ALL", "C.UTF-8"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "man: {stderr}"
    );
    let page = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "nat-agent run",
        "nat-agent check",
        "nat-agent sessions list",
        "nat-agent sessions delete",
        "nat-agent sessions flush",
        "nat-agent import iptables",
        "EXIT STATUS",
        "/etc/xdp-nat/nat.toml",
    ] {
        assert!(page.contains(needle), "the man page lacks {needle:?}");
    }
}

/// The drop-in, applied by systemd-sysctl (as at boot) inside a fresh namespace, gives the
/// settings it promises: also on an interface that existed before and whose own value said
/// otherwise (send_redirects is all OR interface).
#[test]
fn sysctl_dropin_applies() {
    let b = built();
    let ns = Netns::new().unwrap();
    ns.run(
        "ip",
        ["link", "add", "s0", "type", "veth", "peer", "name", "s1"],
    )
    .unwrap();
    ns.sysctl("net.ipv4.conf.s0.send_redirects", "1").unwrap();
    ns.sysctl("net.ipv4.conf.s0.rp_filter", "1").unwrap();
    let file = b.root.join(SYSCTL);
    ns.run("/lib/systemd/systemd-sysctl", [&file]).unwrap();
    for (key, want) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.send_redirects", "0"),
        ("net.ipv4.conf.default.send_redirects", "0"),
        ("net.ipv4.conf.s0.send_redirects", "0"),
        ("net.ipv4.conf.all.accept_redirects", "0"),
        ("net.ipv4.conf.all.rp_filter", "2"),
        ("net.ipv4.conf.default.rp_filter", "2"),
    ] {
        let got = ns.run("sysctl", ["-n", key]).unwrap();
        assert_eq!(got.trim(), want, "{key}");
    }
    // procps reads the same file (the postinst's fallback without systemd).
    let ns = Netns::new().unwrap();
    ns.run(
        "sysctl",
        [OsStr::new("-q"), OsStr::new("-p"), file.as_os_str()],
    )
    .unwrap();
    assert_eq!(
        ns.run("sysctl", ["-n", "net.ipv4.ip_forward"])
            .unwrap()
            .trim(),
        "1"
    );
}

/// The agent from the package, run in a namespace with the privileges the unit gives it
/// (bounding and ambient capabilities, no_new_privs; by setpriv, since there is no systemd
/// to do it here) and a notify socket: it says READY=1 with the program attached and
/// accept_local set, pings the watchdog, and detaches on SIGTERM; every system call
/// it makes is inside the unit's SystemCallFilter= and every socket inside
/// RestrictAddressFamilies= (traced with strace); and without any one of its capabilities
/// it cannot start, so the set is also minimal. The mount sandbox (ProtectSystem= and
/// friends) is not reproduced here.
#[test]
fn agent_runs_with_exactly_the_units_privileges() {
    let b = built();
    let unit = fs::read_to_string(b.root.join(UNIT)).unwrap();
    let caps = unit_values(&unit, "CapabilityBoundingSet");
    assert_eq!(
        caps,
        unit_values(&unit, "AmbientCapabilities"),
        "bounding and ambient sets differ"
    );
    assert_eq!(unit_values(&unit, "NoNewPrivileges"), ["yes"]);
    assert!(!caps.is_empty());

    let dir = b.root.with_file_name("agent-run");
    fs::create_dir_all(&dir).unwrap();
    let ns = Netns::new().unwrap();
    ns.run(
        "ip",
        ["link", "add", "a0", "type", "veth", "peer", "name", "a1"],
    )
    .unwrap();
    ns.run("ip", ["addr", "add", "198.18.50.1/24", "dev", "a0"])
        .unwrap();
    for link in ["a0", "a1"] {
        ns.run("ip", ["link", "set", link, "up"]).unwrap();
    }
    ns.sysctl("net.ipv4.conf.a0.accept_local", "0").unwrap();
    let socket = dir.join("agent.sock");
    // DNAT, SNAT to an address (accept_local) and MASQUERADE (follows a0's address).
    let config = dir.join("nat.toml");
    fs::write(
        &config,
        format!(
            r#"[agent]
metrics_listen = "127.0.0.1:9469"
health_listen = "127.0.0.1:8080"
api_socket = "{}"
# Handing the socket to an operator group is what needs CAP_CHOWN.
api_group = "nogroup"

[conntrack]
max_sessions = 1024

[[interfaces]]
name = "a0"
xdp_mode = "generic"

[[dnat]]
id = 1
name = "vip"
destination = "198.18.51.10"
protocol = "tcp"
port = 80
to_address = "198.18.50.2"
to_port = 80

[[snat]]
id = 100
name = "out"
source = "198.18.60.0/24"
to_address = "198.18.50.1"

[[snat]]
id = 101
name = "masq"
source = "198.18.61.0/24"
out_interface = "a0"
masquerade = true
"#,
            socket.display()
        ),
    )
    .unwrap();

    let setpriv = |caps: &[String]| -> Vec<String> {
        let list: String = caps
            .iter()
            .map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect();
        vec![
            "setpriv".into(),
            format!("--bounding-set=-all{list}"),
            format!("--inh-caps=-all{list}"),
            format!("--ambient-caps=-all{list}"),
            "--no-new-privs".into(),
        ]
    };
    let bin = b.root.join(BINARY);
    let xdp_attached = || -> bool {
        ns.run("ip", ["-d", "link", "show", "dev", "a0"])
            .map(|s| s.contains("prog/xdp"))
            .unwrap_or(false)
    };

    // With the unit's privileges, traced, talking to a notify socket as systemd's would be.
    assert_eq!(unit_values(&unit, "Type"), ["notify"]);
    assert_eq!(unit_values(&unit, "WatchdogSec").len(), 1);
    let notify_path = dir.join("notify.sock");
    let _ = fs::remove_file(&notify_path);
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let trace = dir.join("strace.log");
    let mut cmd = ns.command("strace");
    cmd.args(["-f", "-qq", "-o"])
        .arg(&trace)
        .args(setpriv(&caps))
        .arg(&bin)
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        // A one-second watchdog (the unit's is longer): pings every half second.
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID");
    let mut agent = nat_lab::spawn(
        cmd,
        SpawnOptions {
            stop_grace: Duration::from_secs(10),
            ..SpawnOptions::new("nat-agent")
        },
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut await_message = |agent: &mut nat_lab::ChildGuard, wanted: &str, times: usize| {
        let mut buf = [0u8; 512];
        wait_until(
            &format!("{wanted} x{times} from the agent"),
            Duration::from_secs(60),
            || {
                let count = |seen: &Vec<String>| {
                    seen.iter()
                        .filter(|m| m.lines().any(|l| l == wanted))
                        .count()
                };
                if count(&seen) >= times {
                    return Ok(Check::Done(()));
                }
                if let Ok(n) = notify.recv(&mut buf) {
                    seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                } else if wanted != "STOPPING=1" {
                    agent.ensure_running()?;
                }
                Ok(Check::NotYet(format!("received {seen:?}")))
            },
        )
        .unwrap();
    };
    await_message(&mut agent, "READY=1", 1);
    // READY=1 promises translation is in place.
    assert!(xdp_attached(), "READY=1, but no XDP program on a0");
    assert!(socket.exists(), "READY=1, but no API socket");
    assert_eq!(
        ns.run("sysctl", ["-n", "net.ipv4.conf.a0.accept_local"])
            .unwrap()
            .trim(),
        "1",
        "the agent did not set accept_local"
    );
    await_message(&mut agent, "WATCHDOG=1", 2);
    // SIGTERM to the agent (strace's child), as systemd's KillSignal= would.
    let children = fs::read_to_string(format!(
        "/proc/{pid}/task/{pid}/children",
        pid = agent.pid()
    ))
    .unwrap();
    let agent_pid: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    // SAFETY: kill has no memory-safety preconditions; the pid is our own child's child.
    unsafe { libc::kill(agent_pid, libc::SIGTERM) };
    await_message(&mut agent, "STOPPING=1", 1);
    let status = wait_until("the agent to exit", Duration::from_secs(30), || {
        Ok(match agent.try_exited()? {
            Some(status) => Check::Done(status),
            None => Check::NotYet("running".into()),
        })
    })
    .unwrap();
    assert!(
        status.success(),
        "agent exited with {status}: {}",
        agent.log_tail(4000)
    );
    assert!(
        !xdp_attached(),
        "the program is still attached after SIGTERM"
    );

    // System calls and socket families, from the agent's execve on (what came before is
    // setpriv's; systemd applies the filter at that execve).
    let trace = fs::read_to_string(&trace).unwrap();
    // strace prints the path argument whole (only other strings are cut short).
    let exec = format!("execve(\"{}\"", bin.display());
    let start = trace
        .lines()
        .position(|l| l.contains(&exec))
        .unwrap_or_else(|| panic!("no {exec} in the trace"));
    let mut used = BTreeSet::new();
    let mut families = BTreeSet::new();
    for line in trace.lines().skip(start) {
        let Some((_pid, call)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        let call = call.trim_start();
        let Some((name, rest)) = call.split_once('(') else {
            continue;
        };
        if name.is_empty()
            || !name
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
        {
            continue;
        }
        used.insert(name.to_owned());
        if name == "socket" {
            families.insert(rest.split(',').next().unwrap().to_owned());
        }
    }
    let mut allowed = BTreeSet::new();
    for item in unit_values(&unit, "SystemCallFilter") {
        expand_syscalls(&item, &mut allowed);
    }
    let outside: Vec<&String> = used.difference(&allowed).collect();
    assert!(
        outside.is_empty(),
        "system calls outside SystemCallFilter=: {outside:?}"
    );
    assert!(used.contains("bpf"), "no bpf(2) in the trace: {used:?}");
    let permitted: BTreeSet<String> = unit_values(&unit, "RestrictAddressFamilies")
        .into_iter()
        .collect();
    let outside: Vec<&String> = families.difference(&permitted).collect();
    assert!(
        outside.is_empty(),
        "socket families outside RestrictAddressFamilies=: {outside:?}"
    );

    // Minimal: without any one of the capabilities the agent cannot start.
    for dropped in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != dropped).cloned().collect();
        let mut args = setpriv(&fewer);
        let program = args.remove(0);
        args.extend([
            bin.display().to_string(),
            "run".into(),
            "--config".into(),
            config.display().to_string(),
        ]);
        let mut agent = ns
            .spawn(&program, &args, SpawnOptions::new("nat-agent"))
            .unwrap();
        let status = wait_until(
            &format!("the agent without {dropped} to give up"),
            Duration::from_secs(30),
            || {
                Ok(match agent.try_exited()? {
                    Some(status) => Check::Done(status),
                    None if xdp_attached() => {
                        anyhow::bail!("it attached without {dropped}: the unit could drop it")
                    }
                    None => Check::NotYet("running".into()),
                })
            },
        )
        .unwrap();
        assert!(
            !status.success(),
            "the agent exited 0 without {dropped}: {}",
            agent.log_tail(2000)
        );
        assert!(!xdp_attached(), "attached without {dropped}");
    }
}

/// Adds the system calls `item` of SystemCallFilter= stands for (a name, or a @group as
/// this systemd defines it, nested groups included).
fn expand_syscalls(item: &str, out: &mut BTreeSet<String>) {
    if !item.starts_with('@') {
        out.insert(item.to_owned());
        return;
    }
    let listing = stdout_ok(Command::new("systemd-analyze").args(["syscall-filter", item]));
    for line in listing.lines().skip(1) {
        let entry = line.trim();
        if entry.is_empty() || entry.starts_with('#') {
            continue;
        }
        expand_syscalls(entry, out);
    }
}

/// What the maintainer scripts ask of systemd and dpkg's helpers in each situation dpkg runs
/// them in, with those helpers replaced by stubs that log their arguments. Each script runs
/// in a private mount namespace, where a tmpfs on /run stands for a host booted with systemd
/// (`/run/systemd/system` exists) or not, and the stub stands in for systemd-sysctl: nothing
/// on the host is enabled, started, reloaded or changed.
#[test]
fn maintainer_scripts_do_what_the_readme_says() {
    let b = built();
    let control = b.root.with_file_name("scripts");
    let _ = fs::remove_dir_all(&control);
    run_output(
        Command::new("dpkg-deb")
            .arg("--control")
            .arg(&b.deb)
            .arg(&control),
        QUICK,
    )
    .unwrap();
    let stubs = control.join("stubs");
    fs::create_dir_all(&stubs).unwrap();
    let stub = "#!/bin/sh\n\
                echo \"$(basename \"$0\") $*\" >> \"$STUB_LOG\"\n\
                case \"$(basename \"$0\") $1\" in\n\
                \"deb-systemd-helper debian-installed\") [ \"$DSH_INSTALLED\" = 1 ] ;;\n\
                \"deb-systemd-helper --quiet\") [ \"$DSH_WAS_ENABLED\" = 1 ] ;;\n\
                *) exit 0 ;;\n\
                esac\n";
    for name in [
        "deb-systemd-helper",
        "deb-systemd-invoke",
        "systemctl",
        "systemd-sysctl",
    ] {
        let path = stubs.join(name);
        fs::write(&path, stub).unwrap();
        stdout_ok(Command::new("chmod").arg("755").arg(&path));
    }
    let log = control.join("calls.log");
    // (script, arguments, systemd running, unit installed before, enabled before)
    let run = |script: &str, args: &[&str], systemd: bool, installed: bool, enabled: bool| {
        let _ = fs::remove_file(&log);
        fs::write(&log, "").unwrap();
        let setup = format!(
            "mount -t tmpfs tmpfs /run && {} \
             mount --bind \"$STUBS/systemd-sysctl\" /lib/systemd/systemd-sysctl && \
             exec sh \"$SCRIPT\" \"$@\"",
            if systemd {
                "mkdir -p /run/systemd/system &&"
            } else {
                ""
            }
        );
        let path = format!("{}:{}", stubs.display(), std::env::var("PATH").unwrap());
        let out = output_of(
            Command::new("unshare")
                .args([
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-ec",
                    &setup,
                    "sh",
                ])
                .args(args)
                .env("PATH", path)
                .env("STUBS", &stubs)
                .env("SCRIPT", control.join(script))
                .env("STUB_LOG", &log)
                .env("DSH_INSTALLED", if installed { "1" } else { "0" })
                .env("DSH_WAS_ENABLED", if enabled { "1" } else { "0" }),
        );
        assert!(
            out.status.success(),
            "{script} {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        fs::read_to_string(&log).unwrap()
    };
    let sysctl = "systemd-sysctl 90-xdp-nat.conf\n";

    // Fresh install: sysctls applied, unit recorded but neither enabled nor started.
    assert_eq!(
        run("postinst", &["configure", ""], true, false, false),
        format!(
            "{sysctl}deb-systemd-helper debian-installed xdp-nat.service\n\
             deb-systemd-helper update-state xdp-nat.service\n\
             systemctl --system daemon-reload\n"
        )
    );
    // The same without systemd running: nothing asked of systemctl.
    assert_eq!(
        run("postinst", &["configure", ""], false, false, false),
        format!(
            "{sysctl}deb-systemd-helper debian-installed xdp-nat.service\n\
             deb-systemd-helper update-state xdp-nat.service\n"
        )
    );
    // Upgrade of an enabled unit: stays enabled, a running agent restarts onto the new binary.
    assert_eq!(
        run("postinst", &["configure", "0.0.1-1"], true, true, true),
        format!(
            "{sysctl}deb-systemd-helper debian-installed xdp-nat.service\n\
             deb-systemd-helper --quiet was-enabled xdp-nat.service\n\
             deb-systemd-helper enable xdp-nat.service\n\
             deb-systemd-helper update-state xdp-nat.service\n\
             systemctl --system daemon-reload\n\
             deb-systemd-invoke try-restart xdp-nat.service\n"
        )
    );
    // Removal stops the agent (detaching the program); an upgrade does not stop it first.
    assert_eq!(
        run("prerm", &["remove"], true, true, true),
        "deb-systemd-invoke stop xdp-nat.service\n"
    );
    assert_eq!(run("prerm", &["upgrade", "0.2.0-1"], true, true, true), "");
    assert_eq!(
        run("postrm", &["remove"], true, true, true),
        "systemctl --system daemon-reload\n"
    );
    assert_eq!(
        run("postrm", &["purge"], true, true, true),
        "deb-systemd-helper purge xdp-nat.service\n"
    );
}
