//! The real agent binary in a lab namespace, for the end-to-end tests: a config file of its
//! own, a private API socket path, the metrics scraped over the namespace's loopback, and a
//! guard that stops it with SIGTERM (then SIGKILL) when the test ends, passing or not.
//!
//! Included with `#[path = "common/agent.rs"] mod agent;` by the end-to-end test crates, which
//! need none of the packet-fixture helpers in `common/`. Each crate uses a subset, so unused
//! items are expected.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use nat_lab::{
    process::run_output, wait_until, Check, ChildGuard, Netns, ScratchDir, SpawnOptions,
};
use serde_json::Value;

/// The agent binary cargo built for this test run.
pub const AGENT: &str = env!("CARGO_BIN_EXE_nat-agent");

/// Where the lab configs put the metrics listener (inside the nat namespace, whose loopback
/// belongs to that namespace alone, so concurrent labs do not collide).
pub const METRICS_LISTEN: &str = "127.0.0.1:9469";

/// The metrics URL for [`METRICS_LISTEN`].
pub const METRICS_URL: &str = "http://127.0.0.1:9469/metrics";

/// The placeholder [`Agent::start`] replaces with the test's own API socket path.
pub const API_SOCKET_PLACEHOLDER: &str = "@API_SOCKET@";

/// How long the agent may take to load, attach and serve metrics.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Writes a config where the agent can read it; removed on drop.
pub struct TempConfig(pub PathBuf);

impl TempConfig {
    /// Writes `text` to a fresh file in the temp directory.
    pub fn new(text: &str) -> Result<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("xdpnat-e2e-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self(path))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn spawn_options() -> SpawnOptions {
    let mut opts = SpawnOptions::new("nat-agent");
    // SIGTERM first: the agent detaches its programs on a clean exit.
    opts.stop_signal = libc::SIGTERM;
    opts.stop_grace = Duration::from_secs(5);
    opts
}

/// Starts `nat-agent run --config <config>` in `ns` and waits until its metrics endpoint
/// answers; fails with the agent's exit status and log when it exits first (a refused config).
pub fn start_agent(ns: &Netns, config: &TempConfig) -> Result<ChildGuard> {
    let config_path = config.0.display().to_string();
    let mut agent = ns.spawn(
        AGENT,
        ["run", "--config", config_path.as_str()],
        spawn_options(),
    )?;
    wait_for_metrics(ns, &mut agent)?;
    Ok(agent)
}

/// Waits (bounded by [`START_TIMEOUT`]) until the agent in `ns` serves metrics. An agent
/// that exits (a refused config) ends the wait at once, with its exit status and log.
fn wait_for_metrics(ns: &Netns, agent: &mut ChildGuard) -> Result<()> {
    wait_until("the agent's metrics endpoint", START_TIMEOUT, || {
        agent.ensure_running()?;
        Ok(
            match ns.run("curl", ["-sf", "--max-time", "2", METRICS_URL]) {
                Ok(_) => Check::Done(()),
                Err(e) => Check::NotYet(format!("{e:#}")),
            },
        )
    })
}

/// A running agent with its own scratch directory (config file, API socket).
pub struct Agent {
    child: ChildGuard,
    ns: String,
    dir: ScratchDir,
    config: PathBuf,
}

impl Agent {
    /// Writes `config` (with [`API_SOCKET_PLACEHOLDER`] replaced by a socket path private to
    /// this agent) and starts the agent in `ns` as [`start_agent`] does.
    pub fn start(ns: &Netns, config: &str) -> Result<Self> {
        Self::start_binary(ns, config, AGENT)
    }

    /// [`Agent::start`] with another build of the agent (an upgrade).
    pub fn start_binary(ns: &Netns, config: &str, binary: &str) -> Result<Self> {
        let dir = ScratchDir::new("nat-agent")?;
        let socket = dir.join("api.sock");
        let text = config.replace(API_SOCKET_PLACEHOLDER, &socket.display().to_string());
        let config = dir.write("agent.toml", &text)?;
        let config_arg = config.display().to_string();
        let mut child = ns.spawn(
            binary,
            ["run", "--config", config_arg.as_str()],
            spawn_options(),
        )?;
        wait_for_metrics(ns, &mut child).context("the agent did not come up")?;
        Ok(Self {
            child,
            ns: ns.name().to_owned(),
            dir,
            config,
        })
    }

    /// Its process id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Its API socket (what [`API_SOCKET_PLACEHOLDER`] became).
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    /// Its config file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Scrapes its metrics.
    pub fn metrics(&mut self) -> Result<Metrics> {
        self.child.ensure_running()?;
        scrape_metrics(&self.ns)
    }

    /// `nat-agent sessions list --json --socket <api socket> <filters..>` in its namespace,
    /// parsed. `filters` are the CLI's own (`--protocol udp`, `--address A`, `--port N`,
    /// `--rule NAME`); see [`session_entries`] for the shape.
    pub fn sessions_list(&self, filters: &[&str]) -> Result<Value> {
        let socket = self.api_socket();
        let mut cmd = nat_lab::process::netns_command(&self.ns, AGENT);
        cmd.args(["sessions", "list", "--json", "--socket"])
            .arg(&socket)
            .args(filters);
        let out = run_output(&mut cmd, Duration::from_secs(10))?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "`nat-agent sessions list --json` printed no JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `nat-agent status --json --socket <api socket>` in its namespace, parsed.
    pub fn status(&self) -> Result<Value> {
        let socket = self.api_socket();
        let mut cmd = nat_lab::process::netns_command(&self.ns, AGENT);
        cmd.args(["status", "--json", "--socket"]).arg(&socket);
        let out = run_output(&mut cmd, Duration::from_secs(10))?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "`nat-agent status --json` printed no JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Fails if the agent has exited (with its log).
    pub fn ensure_running(&mut self) -> Result<()> {
        self.child.ensure_running()
    }

    /// The end of its log.
    pub fn log_tail(&self, max_bytes: u64) -> String {
        self.child.log_tail(max_bytes)
    }

    /// Kills it with SIGKILL (no clean-up of any kind) and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        let pid = i32::try_from(self.child.pid()).context("pid")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .context("sending SIGKILL")?;
        self.child.stop(Duration::from_secs(5))?;
        Ok(())
    }

    /// Stops it (SIGTERM, then SIGKILL after `grace`) and returns how it exited.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        self.child.stop(grace)
    }
}

/// The session entries of a `sessions list --json` answer (`{"sessions": [..], "matched": N,
/// "truncated": bool}`; each entry has `protocol`, `original` and `reply` tuples of
/// `src`/`sport`/`dst`/`dport`, `snat_rule`, `dnat_rule`, `state` and counters).
pub fn session_entries(list: &Value) -> Result<&Vec<Value>> {
    list.get("sessions")
        .and_then(Value::as_array)
        .with_context(|| format!("sessions list has no \"sessions\" array: {list}"))
}

/// One Prometheus sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// A parsed scrape (Prometheus text format).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Every sample, in exposition order.
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses the text exposition format (comments skipped).
    pub fn parse(text: &str) -> Result<Self> {
        let mut samples = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            samples.push(parse_sample(line).with_context(|| format!("metrics line {line:?}"))?);
        }
        Ok(Self { samples })
    }

    /// Samples of `name` whose labels include every `(key, value)` of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum over [`Self::matching`] samples; 0 when there are none (a labelled counter
    /// appears only once something counted).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// The value of the one sample of `name` with exactly these labels among its labels;
    /// fails, listing what exists, when none matches.
    pub fn require(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let found: Vec<&Sample> = self.matching(name, labels).collect();
        match found[..] {
            [one] => Ok(one.value),
            [] => {
                let existing: Vec<String> = self
                    .samples
                    .iter()
                    .filter(|s| s.name == name)
                    .map(|s| format!("{:?}", s.labels))
                    .collect();
                bail!("no {name} sample with labels {labels:?} (have: {existing:?})")
            }
            _ => bail!(
                "{} samples of {name} match {labels:?}; name more labels",
                found.len()
            ),
        }
    }

    /// `name{k="v",..}` (labels as exposed) -> value truncated to an integer, the form the
    /// DNAT end-to-end test compares.
    pub fn series(&self) -> BTreeMap<String, u64> {
        self.samples
            .iter()
            .map(|s| {
                let labels: Vec<String> = s
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{v}\""))
                    .collect();
                let key = if labels.is_empty() {
                    s.name.clone()
                } else {
                    format!("{}{{{}}}", s.name, labels.join(","))
                };
                (key, s.value as u64)
            })
            .collect()
    }
}

fn parse_sample(line: &str) -> Result<Sample> {
    let (series, value) = line.rsplit_once(' ').context("no value after the series")?;
    let value: f64 = value.parse().context("value is not a number")?;
    let (name, labels) = match series.split_once('{') {
        None => (series.to_owned(), BTreeMap::new()),
        Some((name, rest)) => {
            let body = rest.strip_suffix('}').context("unterminated label set")?;
            (name.to_owned(), parse_labels(body)?)
        }
    };
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"` with the format's escapes (`\\`, `\"`, `\n`).
fn parse_labels(body: &str) -> Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").context("label without =\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => bail!("dangling escape in label {key}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => bail!("unterminated value of label {key}"),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    Ok(labels)
}

/// Scrapes the agent in namespace `ns`.
pub fn scrape_metrics(ns: &str) -> Result<Metrics> {
    let text = nat_lab::run_in(ns, "curl", ["-sf", "--max-time", "2", METRICS_URL])?;
    Metrics::parse(&text)
}

/// The mode of the XDP program on `iface` in namespace `ns`, as the kernel reports it through
/// iproute2 (`ip -j link`'s `xdp.mode`): `native` (driver), `generic` (skb), or `none`.
pub fn xdp_mode(ns: &Netns, iface: &str) -> Result<&'static str> {
    let out = ns.run("ip", ["-j", "-d", "link", "show", "dev", iface])?;
    let links: Value = serde_json::from_str(&out).with_context(|| format!("ip -j link: {out}"))?;
    Ok(match links[0]["xdp"]["mode"].as_u64() {
        None => "none",
        Some(1) => "native",
        Some(2) => "generic",
        Some(other) => bail!("{iface} has XDP in mode {other}"),
    })
}

/// Whether an XDP program is attached to `iface` in namespace `ns`.
pub fn xdp_attached(ns: &Netns, iface: &str) -> Result<bool> {
    Ok(xdp_mode(ns, iface)? != "none")
}

/// Attaches the object's parse-and-pass program to `device` in namespace `ns`, in driver mode.
/// Frames an XDP program sends into a veth (XDP_TX, redirect) are only received by a peer with
/// NAPI, which a driver-mode XDP program provides (TOOLCHAIN.md); the program passes every
/// well-formed frame, so the peer behaves as before. Detached when the returned object drops.
pub fn attach_pass_through(ns: &str, device: &str) -> Result<aya::Ebpf> {
    let device = device.to_owned();
    nat_lab::in_netns(ns, move || {
        let mut loader = aya::EbpfLoader::new();
        // Only the program is needed; keep the connection-tracking maps small.
        for map in ["SESSIONS", "REPLIES", "MAPPINGS", "BINDINGS"] {
            loader.map_max_entries(map, 1024);
        }
        let mut ebpf = loader
            .load(nat_agent::dataplane::EBPF_OBJECT)
            .context("loading the object")?;
        let program: &mut aya::programs::Xdp = ebpf
            .program_mut(nat_common::maps::XDP_PARSE_PASS_PROGRAM)
            .context("no parse-and-pass program")?
            .try_into()?;
        program.load().context("loading xdp_parse_pass")?;
        program
            .attach(&device, aya::programs::XdpMode::Driver)
            .with_context(|| format!("attaching xdp_parse_pass to {device}"))?;
        Ok(ebpf)
    })
}

/// One HTTP exchange with the agent over its API socket, made with curl (a client that is not
/// ours): (status, body as JSON, or as a JSON string when it is not JSON).
pub fn api_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value)> {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "--max-time",
        "10",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "-X",
        method,
    ])
    .arg("--unix-socket")
    .arg(socket);
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "--data-binary"])
            .arg(b.to_string());
    }
    cmd.arg(format!("http://localhost{path}"));
    let out = cmd.output().context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text
        .rsplit_once('\n')
        .with_context(|| format!("curl printed no status: {text:?}"))?;
    let status: u16 = code
        .trim()
        .parse()
        .with_context(|| format!("status {code:?}"))?;
    let value = serde_json::from_str(body).unwrap_or(Value::String(body.to_string()));
    Ok((status, value))
}

/// Which backend answers `vip`:80 from the client, by the echo's `served_by`; `None` when no
/// answer comes (no translation).
pub fn served_by(lab: &nat_lab::DnatLab, vip: std::net::Ipv4Addr) -> Result<Option<String>> {
    match nat_lab::http_get(lab.client.name(), &format!("http://{vip}:80/")) {
        Ok(body) => Ok(Some(body.parse::<nat_lab::EchoReply>()?.server.to_string())),
        Err(_) => Ok(None),
    }
}

/// `config` (with an `[agent]` table) with pinned state in `state_dir`.
pub fn with_state(config: &str, state_dir: &Path) -> String {
    config.replace(
        "[agent]\n",
        &format!("[agent]\nstate_dir = \"{}\"\n", state_dir.display()),
    )
}

/// The SNAT lab's agent config with XDP forwarding on both interfaces: MASQUERADE of the
/// private network, a private API socket, metrics on [`METRICS_LISTEN`].
pub fn snat_xdp_config() -> String {
    format!(
        r#"
[agent]
metrics_listen = "{METRICS_LISTEN}"
api_socket = "{API_SOCKET_PLACEHOLDER}"

[conntrack]
max_sessions = 4096

[[interfaces]]
name = "{inside}"
xdp_mode = "native"
forwarding = "xdp"

[[interfaces]]
name = "{outside}"
xdp_mode = "native"
forwarding = "xdp"

[[snat]]
id = 100
name = "private-out"
source = "{private}"
masquerade = true
"#,
        inside = nat_lab::SnatLab::NAT_INSIDE_IF,
        outside = nat_lab::SnatLab::NAT_OUTSIDE_IF,
        private = nat_lab::SnatLab::PRIVATE_NET,
    )
}

/// Lock-step UDP exchanges of one flow through the SNAT lab, `count` datagrams per call: from
/// the private host's fixed `source_port` to the public host's UDP echo on `port`, so every
/// call is the same session and asks the FIB the same question.
pub fn snat_lab_flow(
    lab: &nat_lab::SnatLab,
    source_port: u16,
    port: u16,
) -> impl Fn(u32) -> Result<nat_lab::UdpExchange> + '_ {
    use std::net::SocketAddrV4;
    let source = SocketAddrV4::new(nat_lab::SnatLab::PRIVATE_ADDR, source_port);
    let target = SocketAddrV4::new(nat_lab::SnatLab::PUBLIC_ADDR, port);
    move |count| {
        nat_lab::udp_exchange_from(
            lab.private.name(),
            source,
            target,
            count,
            Duration::from_millis(500),
        )
    }
}

/// Runs `f` while the SNAT lab's NAT namespace routes the public host into a blackhole; the
/// route is removed again whatever `f` returns.
pub fn with_public_host_blackholed<T>(
    lab: &nat_lab::SnatLab,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let blackhole = format!("{}/32", nat_lab::SnatLab::PUBLIC_ADDR);
    lab.nat
        .run("ip", ["route", "add", "blackhole", &blackhole])?;
    let result = f();
    lab.nat
        .run("ip", ["route", "del", "blackhole", &blackhole])?;
    result
}

/// Five pings from the SNAT lab's private host to its first public host, 0.2 s apart, each
/// waiting at most a second; fails, naming `what`, unless every one is answered.
pub fn ping_public_host(lab: &nat_lab::SnatLab, what: &str) -> Result<()> {
    let target = nat_lab::SnatLab::PUBLIC_ADDR.to_string();
    let ping = lab
        .private
        .run("ping", ["-c", "5", "-i", "0.2", "-W", "1", &target])?;
    ensure!(ping.contains(" 0% packet loss"), "ping {what}: {ping}");
    Ok(())
}

/// A bpf filesystem mounted for one test; unmounted on drop (which drops every pin in it,
/// detaching pinned links).
pub struct Bpffs(pub PathBuf);

impl Bpffs {
    /// Mounts a new bpf filesystem at `at` (created if missing).
    pub fn mount(at: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&at)?;
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&at)
            .output()
            .context("running mount")?;
        ensure!(
            out.status.success(),
            "cannot mount a bpf filesystem at {}: {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Bpffs(at))
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exposition_text() {
        let text = "# HELP xdpnat_sessions Sessions in use.\n\
                    # TYPE xdpnat_sessions gauge\n\
                    xdpnat_sessions 3\n\
                    xdpnat_packets_total{action=\"translated\",reason=\"session_new\"} 7\n\
                    xdpnat_packets_total{reason=\"session_new\",action=\"passed\"} 2\n\
                    xdpnat_snat_ports_in_use{address=\"203.0.113.1\",protocol=\"udp\"} 1\n\
                    odd{l=\"a\\\"b,c\"} 1e3\n";
        let m = Metrics::parse(text).unwrap();
        assert_eq!(m.require("xdpnat_sessions", &[]).unwrap(), 3.0);
        assert_eq!(
            m.sum("xdpnat_packets_total", &[("reason", "session_new")]),
            9.0
        );
        assert!(m
            .require("xdpnat_packets_total", &[("reason", "session_new")])
            .is_err());
        assert_eq!(
            m.require(
                "xdpnat_snat_ports_in_use",
                &[("address", "203.0.113.1"), ("protocol", "udp")]
            )
            .unwrap(),
            1.0
        );
        assert_eq!(m.sum("xdpnat_session_expiries_total", &[]), 0.0);
        assert_eq!(m.require("odd", &[("l", "a\"b,c")]).unwrap(), 1000.0);
        let series = m.series();
        assert_eq!(
            series["xdpnat_packets_total{action=\"passed\",reason=\"session_new\"}"],
            2
        );
    }
}
