//! chronyd as an NTP server and as an NTP client inside lab namespaces (scenario 1 of
//! DESIGN.md: a private host syncs its clock against a public NTP server through the NAT).
//!
//! Network namespaces do not isolate the clock: a chronyd allowed to steer it would steer the
//! host's. So every chronyd started here runs with `-x` (never touch the system clock), with
//! an explicit config file (`-f`, never the system one), only ever inside a lab namespace, and
//! a client only ever points at one lab address (`server <addr> iburst`, no pools). Startup
//! fails unless chronyd's log confirms that clock control is disabled.
//!
//! Both daemons keep every file (config, pid, drift, command socket) in their own
//! [`ScratchDir`]; the server's command socket is there too rather than at the compiled-in
//! `/run/chrony/chronyd.sock`, which belongs to the host's chronyd.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};

use crate::{
    netns,
    process::{netns_command, run_in, spawn, wait_until, Check, ChildGuard, SpawnOptions},
    scratch::ScratchDir,
    tools::{require_root, require_tools},
};

/// The tools this module runs.
pub const CHRONY_TOOLS: &[&str] = &["chronyd", "chronyc"];

/// The NTP port the lab server listens on.
pub const NTP_PORT: u16 = 123;

/// How long [`NtpServer::start`] and [`NtpClient::start`] wait for the daemon to be ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Polling interval of the lab client, as chrony's log2 seconds: 2^-4 s = 62.5 ms, so a
/// client selects its source within a second or two instead of minutes.
pub const CLIENT_POLL_LOG2: i8 = -4;

/// The line chronyd logs at startup when `-x` took effect.
const CLOCK_CONTROL_DISABLED: &str = "Disabled control of system clock";

/// Whether `addr` is one of the lab's own addresses (198.18.0.0/15, 198.51.100.0/24,
/// 203.0.113.0/24): the only addresses a lab chronyd may serve on or be pointed at.
pub fn is_lab_address(addr: Ipv4Addr) -> bool {
    let [a, b, c, _] = addr.octets();
    (a == 198 && (b == 18 || b == 19)) || (a, b, c) == (198, 51, 100) || (a, b, c) == (203, 0, 113)
}

fn preflight(ns: &str, addr: Ipv4Addr, role: &str) -> Result<()> {
    // The address check first: it needs nothing, and a wrong address must never get further.
    ensure!(
        is_lab_address(addr),
        "refusing to run a chronyd {role} with {addr}: not a lab address \
         (198.18.0.0/15, 198.51.100.0/24, 203.0.113.0/24)"
    );
    require_root()?;
    require_tools(CHRONY_TOOLS)?;
    // Never in the root namespace: `ip netns exec` needs a named namespace, and only lab
    // namespaces are given here.
    ensure!(
        netns::exists(ns),
        "refusing to run chronyd outside a lab namespace: namespace {ns:?} does not exist"
    );
    Ok(())
}

/// Runs `chronyc -h <socket> -n -c <args>` in `ns` (CSV output, no name lookups).
fn chronyc(ns: &str, socket: &Path, args: &[&str]) -> Result<String> {
    let mut argv: Vec<&std::ffi::OsStr> = vec!["-h".as_ref(), socket.as_os_str()];
    argv.extend(["-n", "-c"].iter().chain(args).map(std::ffi::OsStr::new));
    run_in(ns, "chronyc", argv)
}

/// The server's config: serve the local clock at stratum 8 on `addr`:123 to anyone (the lab
/// is closed), no command port, every file in `dir`.
pub fn server_config(addr: Ipv4Addr, dir: &Path) -> String {
    let d = dir.display();
    format!(
        "# nat-lab NTP server; runs with -x, never steers the clock\n\
         local stratum 8\n\
         allow all\n\
         port {NTP_PORT}\n\
         bindaddress {addr}\n\
         cmdport 0\n\
         bindcmdaddress {d}/chronyd.sock\n\
         pidfile {d}/chronyd.pid\n\
         driftfile {d}/chronyd.drift\n"
    )
}

/// How [`NtpClient::start`] configures the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NtpClientOptions {
    /// chrony's `acquisitionport`: send every request from this fixed local port. `None`
    /// (chrony's default) opens a new socket with an ephemeral port for every request.
    pub acquisition_port: Option<u16>,
}

/// The client's config: the one lab server, polled fast; no NTP service of its own; the
/// command socket in `dir` so `chronyc -h` can ask it which source it selected.
pub fn client_config(server: Ipv4Addr, options: &NtpClientOptions, dir: &Path) -> String {
    let d = dir.display();
    let poll = CLIENT_POLL_LOG2;
    let mut config = format!(
        "# nat-lab NTP client; runs with -x, never steers the clock\n\
         server {server} iburst minpoll {poll} maxpoll {poll}\n\
         port 0\n\
         cmdport 0\n\
         bindcmdaddress {d}/chronyd.sock\n\
         pidfile {d}/chronyd.pid\n\
         driftfile {d}/chronyd.drift\n"
    );
    if let Some(port) = options.acquisition_port {
        config.push_str(&format!("acquisitionport {port}\n"));
    }
    config
}

/// Starts chronyd with `config` in `ns` and waits until its log confirms that it will not
/// touch the clock and `ready` holds.
fn start_chronyd(
    ns: &str,
    label: &str,
    dir: &ScratchDir,
    config: &str,
    mut ready: impl FnMut() -> Result<Check<()>>,
) -> Result<ChildGuard> {
    let config_path = dir.write("chrony.conf", config)?;
    let mut opts = SpawnOptions::new(label);
    // SIGTERM lets chronyd remove its pid file and socket before the directory goes.
    opts.stop_signal = libc::SIGTERM;
    opts.stop_grace = Duration::from_secs(2);
    // -x: never steer the clock; -d: foreground, log to stderr (the guard's log file);
    // -4: IPv4 only; -u root: no privilege drop, so it can use the root-owned 0700 directory;
    // -f: this config and no other.
    let mut cmd = netns_command(ns, "chronyd");
    cmd.args(["-x", "-d", "-4", "-u", "root", "-f"])
        .arg(&config_path);
    let mut child =
        spawn(cmd, opts).with_context(|| format!("starting {label} in namespace {ns}"))?;
    let what = format!("{label} in namespace {ns} to start");
    wait_until(&what, START_TIMEOUT, || {
        child.ensure_running()?;
        if !child.log_tail(64 * 1024).contains(CLOCK_CONTROL_DISABLED) {
            return Ok(Check::NotYet(format!(
                "no {CLOCK_CONTROL_DISABLED:?} in its log yet"
            )));
        }
        ready()
    })
    .with_context(|| format!("its log: {}", child.log_tail(2000).trim_end()))?;
    Ok(child)
}

/// chronyd serving NTP on one lab address; dropping it stops the daemon and removes its files.
#[derive(Debug)]
pub struct NtpServer {
    child: ChildGuard,
    dir: ScratchDir,
    ns: String,
    addr: Ipv4Addr,
}

impl NtpServer {
    /// Starts the server in namespace `ns` on `addr`:123 (an address of that namespace) and
    /// waits (bounded by [`START_TIMEOUT`]) until the port is bound.
    pub fn start(ns: &str, addr: Ipv4Addr) -> Result<Self> {
        preflight(ns, addr, "server")?;
        let dir = ScratchDir::new("chrony-server")?;
        let config = server_config(addr, dir.path());
        let child = start_chronyd(ns, "chronyd-server", &dir, &config, || {
            let bound = run_in(ns, "ss", ["-Hlun"])?;
            let want = format!("{addr}:{NTP_PORT}");
            Ok(
                if bound
                    .lines()
                    .any(|l| l.split_whitespace().nth(3) == Some(want.as_str()))
                {
                    Check::Done(())
                } else {
                    Check::NotYet(format!("{want} not bound yet"))
                },
            )
        })?;
        Ok(Self {
            child,
            dir,
            ns: ns.to_owned(),
            addr,
        })
    }

    /// The address it serves on.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Its command socket, for `chronyc -h`.
    pub fn command_socket(&self) -> PathBuf {
        self.dir.join("chronyd.sock")
    }

    /// The client addresses the server has answered (`chronyc clients`): who it saw asking.
    pub fn client_addresses(&self) -> Result<Vec<Ipv4Addr>> {
        let out = chronyc(&self.ns, &self.command_socket(), &["clients"])?;
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let first = l.split(',').next().unwrap_or_default();
                first
                    .parse()
                    .with_context(|| format!("chronyc clients line {l:?}"))
            })
            .collect()
    }

    /// Fails if the daemon has died (with its output).
    pub fn ensure_running(&mut self) -> Result<()> {
        self.child.ensure_running()
    }

    /// The end of its log, for error messages.
    pub fn log_tail(&self) -> String {
        self.child.log_tail(4000)
    }
}

/// One line of `chronyc -c sources`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChronySource {
    /// `^` server, `=` peer, `#` reference clock.
    pub mode: char,
    /// `*` selected (synchronised to), `+` combined, `-` not combined, `?` unusable,
    /// `x` falseticker, `~` too variable.
    pub state: char,
    /// Its address (with `-n`) or name.
    pub name: String,
    /// Its stratum.
    pub stratum: u32,
    /// Reachability register (the last eight polls, one bit each).
    pub reach: u32,
}

impl ChronySource {
    /// Whether chronyd has selected this source to synchronise to (`^*` in `chronyc
    /// sources`).
    pub fn is_selected(&self) -> bool {
        self.state == '*'
    }
}

/// Parses `chronyc -c sources` (comma-separated: mode, state, name, stratum, poll, reach
/// (octal), last rx, ...).
pub fn parse_sources_csv(text: &str) -> Result<Vec<ChronySource>> {
    let mut sources = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split(',').collect();
        let [mode, state, name, stratum, _poll, reach, ..] = fields[..] else {
            bail!("chronyc sources line {line:?} has too few fields");
        };
        let single = |s: &str, what: &str| -> Result<char> {
            let mut chars = s.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => Ok(c),
                _ => bail!("chronyc sources line {line:?}: {what} {s:?} is not one character"),
            }
        };
        sources.push(ChronySource {
            mode: single(mode, "mode")?,
            state: single(state, "state")?,
            name: name.to_owned(),
            stratum: stratum
                .parse()
                .with_context(|| format!("chronyc sources line {line:?}: stratum"))?,
            reach: u32::from_str_radix(reach, 8)
                .with_context(|| format!("chronyc sources line {line:?}: reach"))?,
        });
    }
    Ok(sources)
}

/// chronyd as an NTP client of one lab server; dropping it stops the daemon and removes its
/// files.
#[derive(Debug)]
pub struct NtpClient {
    child: ChildGuard,
    dir: ScratchDir,
    ns: String,
    server: Ipv4Addr,
}

impl NtpClient {
    /// Starts the client in namespace `ns`, pointed at the lab server `server` only, and
    /// waits (bounded by [`START_TIMEOUT`]) until its command socket answers. It polls every
    /// 2^[`CLIENT_POLL_LOG2`] seconds from the start.
    pub fn start(ns: &str, server: Ipv4Addr, options: NtpClientOptions) -> Result<Self> {
        preflight(ns, server, "client")?;
        let dir = ScratchDir::new("chrony-client")?;
        let config = client_config(server, &options, dir.path());
        let socket = dir.join("chronyd.sock");
        let child = start_chronyd(ns, "chronyd-client", &dir, &config, || {
            Ok(match query_sources(ns, &socket) {
                Ok(_) => Check::Done(()),
                Err(e) => Check::NotYet(format!("{e:#}")),
            })
        })?;
        Ok(Self {
            child,
            dir,
            ns: ns.to_owned(),
            server,
        })
    }

    /// The server it was pointed at.
    pub fn server(&self) -> Ipv4Addr {
        self.server
    }

    /// Its command socket, for `chronyc -h`.
    pub fn command_socket(&self) -> PathBuf {
        self.dir.join("chronyd.sock")
    }

    /// Its sources as `chronyc sources` reports them now.
    pub fn sources(&self) -> Result<Vec<ChronySource>> {
        query_sources(&self.ns, &self.command_socket())
    }

    /// Waits, bounded by `timeout`, until chronyd has selected a source (`^*`); fails with
    /// the last `chronyc sources` state and the end of its log otherwise.
    pub fn wait_selected(&mut self, timeout: Duration) -> Result<ChronySource> {
        let server = self.server;
        let ns = self.ns.clone();
        let socket = self.command_socket();
        let child = &mut self.child;
        let result = wait_until(
            &format!("chronyd in {ns} to select {server} as its source"),
            timeout,
            || {
                child.ensure_running()?;
                let sources = query_sources(&ns, &socket)?;
                Ok(match sources.iter().find(|s| s.is_selected()) {
                    Some(selected) => Check::Done(selected.clone()),
                    None => Check::NotYet(format!("sources: {sources:?}")),
                })
            },
        );
        result.with_context(|| format!("chronyd log: {}", self.child.log_tail(2000).trim_end()))
    }

    /// Fails if the daemon has died (with its output).
    pub fn ensure_running(&mut self) -> Result<()> {
        self.child.ensure_running()
    }

    /// The end of its log, for error messages.
    pub fn log_tail(&self) -> String {
        self.child.log_tail(4000)
    }
}

fn query_sources(ns: &str, socket: &Path) -> Result<Vec<ChronySource>> {
    parse_sources_csv(&chronyc(ns, socket, &["sources"])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_addresses_only() {
        for ok in [
            "198.18.0.2",
            "198.19.255.1",
            "198.51.100.10",
            "203.0.113.10",
        ] {
            assert!(is_lab_address(ok.parse().unwrap()), "{ok}");
        }
        for bad in [
            "198.17.0.1",
            "198.20.0.1",
            "8.8.8.8",
            "127.0.0.1",
            "203.0.114.1",
        ] {
            assert!(!is_lab_address(bad.parse().unwrap()), "{bad}");
        }
    }

    #[test]
    fn server_config_serves_one_address_and_keeps_files_private() {
        let c = server_config(Ipv4Addr::new(203, 0, 113, 10), Path::new("/tmp/x"));
        assert!(c.contains("\nlocal stratum 8\n"));
        assert!(c.contains("\nallow all\n"));
        assert!(c.contains("\nbindaddress 203.0.113.10\n"));
        assert!(c.contains("\ncmdport 0\n"));
        assert!(c.contains("\nbindcmdaddress /tmp/x/chronyd.sock\n"));
        assert!(c.contains("\npidfile /tmp/x/chronyd.pid\n"));
        assert!(!c.contains("pool"));
    }

    #[test]
    fn client_config_names_only_the_lab_server() {
        let dir = Path::new("/tmp/y");
        let server = Ipv4Addr::new(203, 0, 113, 10);
        let c = client_config(server, &NtpClientOptions::default(), dir);
        let servers: Vec<&str> = c
            .lines()
            .filter(|l| l.starts_with("server") || l.starts_with("pool") || l.starts_with("peer"))
            .collect();
        assert_eq!(
            servers,
            ["server 203.0.113.10 iburst minpoll -4 maxpoll -4"]
        );
        assert!(!c.contains("acquisitionport"));
        assert!(c.contains("\nport 0\n"));
        let c = client_config(
            server,
            &NtpClientOptions {
                acquisition_port: Some(1123),
            },
            dir,
        );
        assert!(c.ends_with("acquisitionport 1123\n"));
    }

    #[test]
    fn parses_chronyc_sources_csv() {
        let text = "^,*,203.0.113.10,8,-4,377,0,-0.000000056,-0.000000072,0.000003814\n\
                    ^,?,198.51.100.10,0,-4,0,-,0.0,0.0,0.0\n";
        let sources = parse_sources_csv(text).unwrap();
        assert_eq!(sources.len(), 2);
        assert!(sources[0].is_selected());
        assert_eq!(sources[0].mode, '^');
        assert_eq!(sources[0].name, "203.0.113.10");
        assert_eq!(sources[0].stratum, 8);
        assert_eq!(sources[0].reach, 0o377);
        assert!(!sources[1].is_selected());
        assert_eq!(sources[1].reach, 0);
        assert!(parse_sources_csv("").unwrap().is_empty());
        assert!(parse_sources_csv("^,*,x").is_err());
        assert!(parse_sources_csv("^^,*,a,1,2,3").is_err());
    }

    #[test]
    fn refuses_non_lab_addresses_and_missing_namespaces() {
        let err = preflight("xnl-no-such-ns", Ipv4Addr::new(192, 0, 2, 1), "client").unwrap_err();
        assert!(format!("{err:#}").contains("not a lab address"), "{err:#}");
        let err =
            preflight("xnl-no-such-ns", Ipv4Addr::new(203, 0, 113, 10), "client").unwrap_err();
        let msg = format!("{err:#}");
        // Without root or chrony an earlier check fires; either way nothing starts.
        assert!(
            msg.contains("does not exist") || msg.contains("root") || msg.contains("missing"),
            "{msg}"
        );
    }
}
