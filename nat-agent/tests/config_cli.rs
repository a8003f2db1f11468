//! Config validation through the real binary: `nat-agent check --config <file>` and
//! `nat-agent run --config <file>` on a good config and on one bad config per kind of mistake.
//!
//! The contract under test (see `src/main.rs` and `model.rs`): a bad config exits with code 2,
//! prints nothing on stdout and exactly one `error: <file>: ...` line per problem on stderr,
//! naming the rule (or section) and the field; `run` refuses it the same way before touching
//! the kernel. The `run` test needs root (it creates a network namespace and checks that no
//! XDP program gets attached); it fails rather than skips without it.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_nat-agent");

/// Exit code of `check` and `run` for a config that does not validate.
const EXIT_CONFIG: i32 = 2;

/// A config using every rule shape once: DNAT port, range, ICMP, 1:1 and NETMAP; SNAT to a
/// pool, MASQUERADE and no_nat; every `[conntrack]` field.
const GOOD: &str = r#"
[agent]
metrics_listen = "127.0.0.1:9469"
api_socket = "/run/xdp-nat-test/agent.sock"

[conntrack]
max_sessions = 1048576
udp_timeout = 300
tcp_established_timeout = 7440
tcp_transitory_timeout = 240
tcp_closed_timeout = 10
icmp_timeout = 60
gc_interval = 5
allow_below_rfc_floors = false

[[interfaces]]
name = "nat0"

[[interfaces]]
name = "nat1"
xdp_mode = "generic"

[[dnat]]
id = 10
name = "web"
destination = "198.18.100.10"
protocol = "tcp"
port = 80
to_address = "198.18.1.10"
to_port = 8080

[[dnat]]
id = 11
name = "range"
destination = "198.18.100.11"
protocol = "udp"
port = "8000-8009"
to_address = "198.18.1.11"
to_port = "9000-9009"

[[dnat]]
id = 12
name = "ping"
destination = "198.18.100.12"
protocol = "icmp"
to_address = "198.18.1.12"

[[dnat]]
id = 13
name = "whole"
destination = "198.18.100.13"
to_address = "198.18.1.13"

[[dnat]]
id = 14
name = "netmap"
destination = "198.18.200.0/24"
to_address = "198.18.9.0/24"

[[snat]]
id = 100
name = "platform-exempt"
source = "198.18.0.0/24"
destination = "203.0.113.250"
no_nat = true

[[snat]]
id = 101
name = "private-out"
source = "198.18.0.0/24"
protocol = "udp"
out_interface = "nat1"
to_address = ["203.0.113.1", "203.0.113.8/30"]
port_range = "1024-65535"

[[snat]]
id = 102
name = "masquerade"
source = "198.18.0.0/16"
masquerade = true
"#;

/// A config file in the temp directory, removed when dropped.
struct TempConfig {
    path: PathBuf,
}

impl TempConfig {
    fn new(label: &str, text: &str) -> Self {
        // pid + counter: unique across parallel tests and concurrent test processes.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "nat-agent-config-cli-{}-{n}-{label}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        TempConfig { path }
    }

    fn display(&self) -> String {
        self.path.display().to_string()
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn nat_agent(args: &[&str], config: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"))
}

/// One expected problem line: every fragment must appear in it (the place, the field, a word
/// of the message).
type Problem = &'static [&'static str];

/// A bad config and the problems it must produce, in file order.
struct BadCase {
    label: &'static str,
    text: String,
    problems: Vec<Problem>,
}

/// A minimal valid config around `dnat` (one interface).
fn with_rules(dnat: &str) -> String {
    format!("[[interfaces]]\nname = \"nat0\"\n\n{dnat}")
}

/// An SNAT rule with id, name and source; the action and the rest are `extra` lines.
fn snat(id: u32, name: &str, source: &str, extra: &str) -> String {
    format!("[[snat]]\nid = {id}\nname = \"{name}\"\nsource = \"{source}\"\n{extra}")
}

/// A DNAT rule with every field given; `extra` lines are appended.
fn rule(id: u32, name: &str, destination: &str, to_address: &str) -> String {
    format!(
        "[[dnat]]\nid = {id}\nname = \"{name}\"\ndestination = \"{destination}\"\nto_address = \"{to_address}\"\n"
    )
}

fn bad_cases() -> Vec<BadCase> {
    let mut cases = vec![
        BadCase {
            label: "unknown-field",
            // The misspelt field is on line 7 (two interface lines, a blank, three rule lines).
            text: with_rules(
                "[[dnat]]\nid = 10\nname = \"web\"\ndestnation = \"198.18.100.10\"\nto_address = \"198.18.1.10\"\n",
            ),
            problems: vec![&["line 7, column 1", "unknown field `destnation`"]],
        },
        BadCase {
            label: "bad-address",
            text: with_rules(&rule(10, "web", "198.18.100.300", "198.18.1.10")),
            problems: vec![&[
                "dnat rule \"web\" (id 10)",
                "field `destination`",
                "\"198.18.100.300\" is not an IPv4 address",
            ]],
        },
        BadCase {
            label: "host-bits",
            text: with_rules(&rule(10, "web", "198.18.100.1/24", "198.18.1.0/24")),
            problems: vec![&[
                "dnat rule \"web\" (id 10)",
                "field `destination`",
                "host bits set",
                "198.18.100.0/24",
            ]],
        },
        BadCase {
            label: "prefix-size-mismatch",
            text: with_rules(&rule(10, "web", "198.18.100.0/24", "198.18.1.0/25")),
            problems: vec![&["dnat rule \"web\" (id 10)", "field `to_address`", "/25", "/24"]],
        },
        BadCase {
            label: "port-without-protocol",
            text: with_rules(&format!(
                "{}port = 80\n",
                rule(10, "web", "198.18.100.10", "198.18.1.10")
            )),
            problems: vec![&["dnat rule \"web\" (id 10)", "field `port`", "protocol"]],
        },
        BadCase {
            label: "to-port-without-port",
            text: with_rules(&format!(
                "{}protocol = \"tcp\"\nto_port = 8080\n",
                rule(10, "web", "198.18.100.10", "198.18.1.10")
            )),
            problems: vec![&["dnat rule \"web\" (id 10)", "field `to_port`", "`port`"]],
        },
        BadCase {
            label: "range-size-mismatch",
            text: with_rules(&format!(
                "{}protocol = \"tcp\"\nport = \"8000-8009\"\nto_port = \"9000-9004\"\n",
                rule(10, "web", "198.18.100.10", "198.18.1.10")
            )),
            problems: vec![&["dnat rule \"web\" (id 10)", "field `to_port`", "5 ports", "10"]],
        },
        BadCase {
            label: "duplicate-id",
            text: with_rules(&format!(
                "{}\n{}",
                rule(10, "web", "198.18.100.10", "198.18.1.10"),
                rule(10, "mail", "198.18.100.11", "198.18.1.11")
            )),
            problems: vec![&["dnat rule \"mail\" (id 10)", "field `id`", "earlier rule"]],
        },
        BadCase {
            label: "duplicate-name",
            text: with_rules(&format!(
                "{}\n{}",
                rule(10, "web", "198.18.100.10", "198.18.1.10"),
                rule(11, "web", "198.18.100.11", "198.18.1.11")
            )),
            problems: vec![&["dnat rule \"web\" (id 11)", "field `name`", "earlier rule"]],
        },
        BadCase {
            label: "bad-xdp-mode",
            text: format!(
                "[[interfaces]]\nname = \"nat0\"\nxdp_mode = \"turbo\"\n\n{}",
                rule(10, "web", "198.18.100.10", "198.18.1.10")
            ),
            problems: vec![&["interface \"nat0\"", "field `xdp_mode`", "\"turbo\""]],
        },
        BadCase {
            label: "bad-hook",
            text: format!(
                "[[interfaces]]\nname = \"nat0\"\nhook = \"tcx\"\n\n{}",
                rule(10, "web", "198.18.100.10", "198.18.1.10")
            ),
            problems: vec![&["interface \"nat0\"", "field `hook`", "\"tcx\""]],
        },
        BadCase {
            label: "xdp-mode-with-tc-hook",
            text: format!(
                "[[interfaces]]\nname = \"nat0\"\nhook = \"tc\"\nxdp_mode = \"native\"\n\n{}",
                rule(10, "web", "198.18.100.10", "198.18.1.10")
            ),
            problems: vec![&["interface \"nat0\"", "field `xdp_mode`", "hook = \"tc\""]],
        },
        BadCase {
            label: "no-interfaces",
            text: rule(10, "web", "198.18.100.10", "198.18.1.10"),
            problems: vec![&["[[interfaces]]", "no interface"]],
        },
        BadCase {
            label: "several-problems",
            text: with_rules(&format!(
                "{}port = 80\n\n{}",
                rule(10, "web", "198.18.100.1/24", "198.18.1.0/24"),
                rule(11, "dns", "198.18.100.11", "not-an-address")
            )),
            problems: vec![
                &["dnat rule \"web\" (id 10)", "field `destination`"],
                &["dnat rule \"web\" (id 10)", "field `port`"],
                &["dnat rule \"dns\" (id 11)", "field `to_address`"],
            ],
        },
    ];
    cases.extend(snat_and_conntrack_cases());
    // 17 rules for one address (distinct ports and backends, so nothing else is wrong): one
    // more than a kernel rule set holds.
    let many: String = (1..=17u16)
        .map(|i| {
            format!(
                "{}protocol = \"tcp\"\nport = {}\n\n",
                rule(
                    u32::from(i),
                    &format!("r{i}"),
                    "198.18.100.10",
                    &format!("198.18.1.{i}")
                ),
                1000 + i
            )
        })
        .collect();
    cases.push(BadCase {
        label: "seventeen-rules-one-address",
        text: with_rules(&many),
        problems: vec![&["prefix 198.18.100.10/32", "17 rules", "at most 16"]],
    });
    cases
}

/// The `[[snat]]`, `[conntrack]` and `[agent] api_socket` mistakes.
fn snat_and_conntrack_cases() -> Vec<BadCase> {
    let dnat = rule(10, "web", "198.18.100.10", "198.18.1.10");
    let seventeen: String = (1..=17u32)
        .map(|i| {
            snat(
                100 + i,
                &format!("s{i}"),
                "198.18.0.0/24",
                "no_nat = true\n",
            ) + "\n"
        })
        .collect();
    vec![
        BadCase {
            label: "snat-without-action",
            text: with_rules(&snat(100, "out", "198.18.0.0/24", "")),
            problems: vec![&[
                "snat rule \"out\" (id 100)",
                "field `to_address`",
                "exactly one of",
            ]],
        },
        BadCase {
            label: "snat-two-actions",
            text: with_rules(&snat(
                100,
                "out",
                "198.18.0.0/24",
                "to_address = \"203.0.113.1\"\nmasquerade = true\n",
            )),
            problems: vec![&[
                "snat rule \"out\" (id 100)",
                "field `masquerade`",
                "exclude each other",
            ]],
        },
        BadCase {
            label: "snat-pool-too-large",
            text: with_rules(&snat(
                100,
                "out",
                "198.18.0.0/24",
                "to_address = \"203.0.113.0/24\"\n",
            )),
            problems: vec![&[
                "snat rule \"out\" (id 100)",
                "field `to_address`",
                "at most 64",
            ]],
        },
        BadCase {
            label: "snat-no-nat-with-ports",
            text: with_rules(&snat(
                100,
                "out",
                "198.18.0.0/24",
                "no_nat = true\nport_range = \"2000-3000\"\n",
            )),
            problems: vec![&["snat rule \"out\" (id 100)", "field `port_range`", "no_nat"]],
        },
        BadCase {
            label: "snat-id-shared-with-dnat",
            text: with_rules(&format!(
                "{dnat}\n{}",
                snat(10, "out", "198.18.0.0/24", "masquerade = true\n")
            )),
            problems: vec![&["snat rule \"out\" (id 10)", "field `id`", "earlier rule"]],
        },
        BadCase {
            label: "snat-name-shared-with-dnat",
            text: with_rules(&format!(
                "{dnat}\n{}",
                snat(100, "web", "198.18.0.0/24", "masquerade = true\n")
            )),
            problems: vec![&["snat rule \"web\" (id 100)", "field `name`", "earlier rule"]],
        },
        BadCase {
            label: "seventeen-snat-rules-one-source",
            text: with_rules(&seventeen),
            problems: vec![&[
                "snat source prefix 198.18.0.0/24",
                "17 snat rules",
                "at most 16",
            ]],
        },
        BadCase {
            label: "udp-timeout-below-floor",
            text: with_rules(&format!("{dnat}\n[conntrack]\nudp_timeout = 30\n")),
            problems: vec![&[
                "[conntrack]",
                "field `udp_timeout`",
                "RFC 4787 floor of 120 s",
                "allow_below_rfc_floors",
            ]],
        },
        BadCase {
            label: "max-sessions-out-of-range",
            text: with_rules(&format!("{dnat}\n[conntrack]\nmax_sessions = 100\n")),
            problems: vec![&["[conntrack]", "field `max_sessions`", "1024..=16777216"]],
        },
        BadCase {
            label: "relative-api-socket",
            text: format!(
                "[agent]\napi_socket = \"agent.sock\"\n\n{}",
                with_rules(&dnat)
            ),
            problems: vec![&["[agent]", "field `api_socket`", "absolute"]],
        },
    ]
}

/// Checks a refused config's output: exit 2, silent stdout, one `error: <file>: ` line per
/// expected problem, each containing its fragments.
fn assert_refused(command: &str, case: &BadCase, file: &str, out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let label = case.label;
    assert_eq!(
        out.status.code(),
        Some(EXIT_CONFIG),
        "{command} {label}: exit status; stderr:\n{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "{command} {label}: stdout must be empty, got:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        case.problems.len(),
        "{command} {label}: one stderr line per problem, got:\n{stderr}"
    );
    let prefix = format!("error: {file}: ");
    for (line, fragments) in lines.iter().zip(&case.problems) {
        assert!(
            line.starts_with(&prefix),
            "{command} {label}: line does not start with {prefix:?}: {line}"
        );
        for fragment in *fragments {
            assert!(
                line.contains(fragment),
                "{command} {label}: line does not mention {fragment:?}: {line}"
            );
        }
    }
}

#[test]
fn check_accepts_the_good_config() {
    let config = TempConfig::new("good", GOOD);
    let out = nat_agent(&["check"], &config.path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    assert!(stderr.is_empty(), "stderr:\n{stderr}");
    let file = config.display();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "{file}: OK (5 dnat rules, 3 snat rules, 2 interfaces)\n\
             {file}: conntrack max_sessions=1048576 udp_timeout=300s \
             tcp_established_timeout=7440s tcp_transitory_timeout=240s tcp_closed_timeout=10s \
             icmp_timeout=60s gc_interval=5s\n"
        )
    );
}

/// Every shipped example validates, so the examples cannot rot.
#[test]
fn check_accepts_every_example_config() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let mut examples: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 3, "examples found: {examples:?}");
    for example in examples {
        let out = nat_agent(&["check"], &example);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            example.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `nat-agent sessions`: filters are checked before anything is sent (exit 2, the same
/// messages as the agent's), `delete` needs a filter, and an absent agent is one clear line
/// naming the socket (exit 1).
#[test]
fn sessions_cli_checks_filters_and_reports_an_absent_agent() {
    let socket = std::env::temp_dir().join(format!(
        "nat-agent-config-cli-{}-absent.sock",
        std::process::id()
    ));
    let socket = socket.display().to_string();
    let sessions = |args: &[&str]| {
        Command::new(BIN)
            .arg("sessions")
            .args(args)
            .args(["--socket", &socket])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"))
    };
    for (args, needle) in [
        (&["list", "--protocol", "sctp"][..], "protocol \"sctp\""),
        (
            &["list", "--address", "198.18.0.300"][..],
            "not an IPv4 address",
        ),
        (&["delete", "--port", "http"][..], "port \"http\""),
        (&["delete"][..], "at least one of"),
    ] {
        let out = sessions(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    for args in [&["list"][..], &["flush", "--json"][..]] {
        let out = sessions(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty());
        assert!(
            stderr.starts_with(&format!("error: cannot reach the agent at {socket}")),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn check_refuses_each_bad_config_with_one_line_per_problem() {
    for case in bad_cases() {
        let config = TempConfig::new(case.label, &case.text);
        let out = nat_agent(&["check"], &config.path);
        assert_refused("check", &case, &config.display(), &out);
    }
}

#[test]
fn check_reports_an_unreadable_file_on_one_line() {
    let missing = std::env::temp_dir().join(format!(
        "nat-agent-config-cli-{}-does-not-exist.toml",
        std::process::id()
    ));
    let out = nat_agent(&["check"], &missing);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "stderr:\n{stderr}");
    assert_eq!(stderr.lines().count(), 1, "stderr:\n{stderr}");
    assert!(
        stderr.starts_with(&format!("error: {}: cannot read", missing.display())),
        "stderr:\n{stderr}"
    );
}

/// `run` validates before loading anything: every bad config gives the same exit code and
/// the same lines as `check`, promptly.
#[test]
fn run_refuses_each_bad_config_like_check() {
    for case in bad_cases() {
        let config = TempConfig::new(case.label, &case.text);
        let started = Instant::now();
        let out = nat_agent(&["run"], &config.path);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "run {}: took {:?} to refuse a bad config",
            case.label,
            started.elapsed()
        );
        assert_refused("run", &case, &config.display(), &out);
        let check = nat_agent(&["check"], &config.path);
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&check.stderr),
            "run {}: same message as check",
            case.label
        );
    }
}

/// A network namespace with one veth pair, deleted (with its links) when dropped.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("natcli-{tag}-{}", std::process::id());
        let ns = Netns { name };
        ns.ip(&["netns", "add", &ns.name]);
        ns.ip(&[
            "-n", &ns.name, "link", "add", "natcli0", "type", "veth", "peer", "name", "natcli1",
        ]);
        ns.ip(&["-n", &ns.name, "link", "set", "natcli0", "up"]);
        ns.ip(&["-n", &ns.name, "link", "set", "natcli1", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run ip {args:?}: {e}"));
        assert!(
            out.status.success(),
            "ip {args:?} failed (these tests need root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip -d link show` of the veth end the configs attach to.
    fn link(&self) -> String {
        self.ip(&["-n", &self.name, "-d", "link", "show", "dev", "natcli0"])
    }

    fn has_xdp(&self) -> bool {
        self.link().contains("xdp")
    }

    /// `nat-agent <args>` inside the namespace.
    fn nat_agent(&self, args: &[&str], config: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, BIN])
            .args(args)
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null());
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// `run` with a bad config naming a real interface leaves that interface without XDP. The
/// same interface with a good config does get the program (so the check can see one), and
/// loses it again on SIGTERM.
#[test]
fn run_with_a_bad_config_attaches_nothing() {
    let ns = Netns::new("run");
    assert!(!ns.has_xdp(), "fresh veth already has XDP:\n{}", ns.link());

    let interface = "[[interfaces]]\nname = \"natcli0\"\nxdp_mode = \"generic\"\n\n";
    // The control's agent gets a socket of its own, so it never collides with another agent.
    let api = format!(
        "[agent]\napi_socket = \"{}\"\n\n",
        std::env::temp_dir()
            .join(format!("nat-agent-config-cli-{}.sock", std::process::id()))
            .display()
    );
    let bad = BadCase {
        label: "bad-rule-real-interface",
        text: format!(
            "{interface}{}port = 80\n",
            rule(10, "web", "198.18.100.10", "198.18.1.10")
        ),
        problems: vec![&["dnat rule \"web\" (id 10)", "field `port`"]],
    };
    let config = TempConfig::new(bad.label, &bad.text);
    let out = ns
        .nat_agent(&["run"], &config.path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN} in {}: {e}", ns.name));
    assert_refused("run (in netns)", &bad, &config.display(), &out);
    assert!(
        !ns.has_xdp(),
        "a refused config attached XDP:\n{}",
        ns.link()
    );

    // Positive control: the same interface, a good config.
    let good = TempConfig::new(
        "good-real-interface",
        &format!(
            "{api}{interface}{}",
            rule(10, "web", "198.18.100.10", "198.18.1.10")
        ),
    );
    let mut daemon = ns
        .nat_agent(&["run"], &good.path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let attached = loop {
        if ns.has_xdp() {
            break true;
        }
        if Instant::now() > deadline || daemon.try_wait().ok().flatten().is_some() {
            break false;
        }
        thread::sleep(Duration::from_millis(50));
    };
    // Stop the daemon we started, by its pid (`ip netns exec` execs it in place); SIGKILL it
    // if it ignores SIGTERM so a broken shutdown fails the test instead of hanging it.
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    let ignored_sigterm = daemon.try_wait().ok().flatten().is_none();
    if ignored_sigterm {
        let _ = daemon.kill();
    }
    let stopped = daemon
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {BIN}: {e}"));
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert!(
        attached,
        "control: a good config never attached XDP to natcli0; daemon stderr:\n{stderr}"
    );
    assert!(
        !ignored_sigterm,
        "control: daemon ignored SIGTERM; stderr:\n{stderr}"
    );
    assert!(
        stopped.status.success(),
        "control: daemon exit after SIGTERM: {:?}; stderr:\n{stderr}",
        stopped.status
    );
    assert!(
        !ns.has_xdp(),
        "control: XDP still attached after SIGTERM:\n{}",
        ns.link()
    );
}

/// The published API description (`docs/openapi.json`) is what the code generates: a changed
/// route or type without a regenerated document fails here.
#[test]
fn published_openapi_document_is_current() {
    let out = Command::new(BIN).arg("openapi").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let published: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(
        generated == published,
        "docs/openapi.json is stale: regenerate it with `target/debug/nat-agent openapi > docs/openapi.json`"
    );
    for path in [
        "/v1/rules",
        "/v1/rules/{kind}/{name}",
        "/v1/sessions",
        "/v1/status",
    ] {
        assert!(
            generated["paths"].get(path).is_some(),
            "{path} undocumented"
        );
    }
}

/// `check --json`: the summary as JSON, and a refused config as JSON with its problems and
/// the same exit code.
#[test]
fn check_json_reports_success_and_problems() {
    let dir = std::env::temp_dir().join(format!("nat-agent-check-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, GOOD).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--json", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert!(v["dnat_rules"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["conntrack"]["udp_timeout"], 300);

    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        GOOD.replacen("to_address = \"", "to_address = \"x", 1),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--json", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(EXIT_CONFIG));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    let problems = v["problems"].as_array().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.as_str().unwrap().contains("to_address")),
        "{v}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
