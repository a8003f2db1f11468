//! Named network namespaces that remove themselves, and running code inside them.
//!
//! Generated names are `xnl<pid>-<n>`: the pid makes them unique across processes (and lets
//! [`cleanup_stale`] tell whether their owner is dead), the per-process counter makes them
//! unique across the threads of one test binary.

use std::{
    fs::{self, File},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicU32, Ordering},
        Once,
    },
    thread,
};

use anyhow::{bail, Context, Result};

use crate::process::{self, netns_command, ChildGuard, SpawnOptions};

/// Prefix of generated namespace names ("xdp nat lab").
pub const LAB_PREFIX: &str = "xnl";

/// Where `ip netns` keeps its bind-mounted namespace handles.
pub const NETNS_DIR: &str = "/run/netns";

static NEXT_ID: AtomicU32 = AtomicU32::new(0);
static STALE_CLEANUP: Once = Once::new();

/// A fresh namespace name, unique within this process and across processes.
pub fn unique_name() -> String {
    format!(
        "{LAB_PREFIX}{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// The pid encoded in a generated name, or `None` for names this crate did not generate.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(LAB_PREFIX)?;
    let (pid, counter) = rest.split_once('-')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(pid) || !all_digits(counter) {
        return None;
    }
    pid.parse().ok()
}

/// Whether a process with this pid exists (alive or a zombie not yet reaped).
pub(crate) fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 sends nothing; kill only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    // EPERM means it exists but belongs to someone else: alive.
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Whether a namespace called `name` exists (as `ip netns list` would show it).
pub fn exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// The names of all namespaces `ip netns` knows.
pub fn list() -> Result<Vec<String>> {
    let entries = match fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {NETNS_DIR}")),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {NETNS_DIR}"))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        bail!("invalid namespace name {name:?}: use 1-64 of [A-Za-z0-9._-], not starting with '.'");
    }
    Ok(())
}

/// Removes the namespace `name` if it exists, first killing every process still inside it
/// (servers left by a crashed run would otherwise keep it alive). Returns whether it existed.
pub fn remove_namespace(name: &str) -> Result<bool> {
    validate_name(name)?;
    if !exists(name) {
        return Ok(false);
    }
    let pids = match process::run("ip", ["netns", "pids", name]) {
        Ok(pids) => pids,
        Err(_) if !exists(name) => return Ok(false),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot list the processes in namespace {name}"))
        }
    };
    let me = std::process::id();
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
    {
        if pid == me {
            continue;
        }
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    if let Err(e) = process::run("ip", ["netns", "del", name]) {
        // Someone else (a concurrent cleanup) removed it first: the goal is reached.
        if !exists(name) {
            return Ok(false);
        }
        return Err(e).with_context(|| format!("cannot delete namespace {name}"));
    }
    Ok(true)
}

/// Removes lab namespaces (generated names) whose owning process is dead: leftovers of a test
/// run that crashed or was killed, with the processes still inside them; also their log files
/// (see [`process::cleanup_stale_logs`]). Returns the namespace names removed. [`Netns::new`]
/// calls it once per process, so every run starts clean.
pub fn cleanup_stale() -> Result<Vec<String>> {
    process::cleanup_stale_logs(pid_alive);
    let mut removed = Vec::new();
    for name in list()? {
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if pid_alive(pid) {
            continue;
        }
        if remove_namespace(&name).with_context(|| format!("removing stale namespace {name}"))? {
            removed.push(name);
        }
    }
    Ok(removed)
}

/// A network namespace that exists as long as this guard: dropping it kills the processes
/// left inside and deletes it (its veths go with it).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with a generated unique name (after removing stale ones once per
    /// process, see [`cleanup_stale`]).
    pub fn new() -> Result<Self> {
        STALE_CLEANUP.call_once(|| {
            if let Err(e) = cleanup_stale() {
                // Not fatal: our own names are unique anyway.
                eprintln!("nat-lab: cleaning up stale namespaces: {e:#}");
            }
        });
        Self::create_named(&unique_name())
    }

    /// Creates a namespace with a fixed name (the demo's recognisable names); fails if it
    /// already exists, so remove leftovers first with [`remove_namespace`].
    pub fn create_named(name: &str) -> Result<Self> {
        validate_name(name)?;
        if exists(name) {
            bail!("namespace {name} already exists (left over from an earlier run?)");
        }
        process::run("ip", ["netns", "add", name])
            .with_context(|| format!("cannot create namespace {name}"))?;
        let ns = Self {
            name: name.to_owned(),
        };
        // Loopback up everywhere: servers are probed over it, and tools expect it.
        ns.run("ip", ["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns exec` takes it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        netns_command(&self.name, program)
    }

    /// Runs `program args..` inside this namespace and returns its stdout (see
    /// [`process::run_in`]).
    pub fn run<I, S>(&self, program: &str, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        process::run_in(&self.name, program, args)
    }

    /// Starts `program args..` inside this namespace as a guarded process.
    pub fn spawn<I, S>(&self, program: &str, args: I, opts: SpawnOptions) -> Result<ChildGuard>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = self.command(program);
        cmd.args(args);
        process::spawn(cmd, opts)
    }

    /// Sets the sysctl `key` (e.g. `net.ipv4.ip_forward`) to `value` in this namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run("sysctl", ["-qw", &format!("{key}={value}")])
            .with_context(|| format!("cannot set {key}={value} in namespace {}", self.name))?;
        Ok(())
    }

    /// Runs `f` on a thread that has entered this namespace (see [`in_netns`]).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        in_netns(&self.name, f)
    }
}

impl AsRef<str> for Netns {
    fn as_ref(&self) -> &str {
        &self.name
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = remove_namespace(&self.name) {
            eprintln!("nat-lab: {e:#}");
        }
    }
}

/// Runs `f` on a new thread that has joined the network namespace `ns`, and returns its
/// result. Sockets `f` creates live in `ns`, so tests can send bounded traffic from Rust
/// without a helper process. Only the network namespace changes (setns is per thread); a
/// panic in `f` resumes in the caller.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    validate_name(ns)?;
    let path = netns_path(ns);
    let handle =
        File::open(&path).with_context(|| format!("cannot open namespace {}", path.display()))?;
    thread::scope(|scope| {
        let worker = scope.spawn(|| {
            // SAFETY: the fd is a valid open namespace file for the whole call; setns changes
            // only this thread's network namespace, and this thread ends after `f`.
            let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("cannot enter namespace {ns}"));
            }
            f()
        });
        match worker.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_are_unique_short_and_carry_the_pid() {
        let a = unique_name();
        let b = unique_name();
        assert_ne!(a, b);
        assert!(a.len() <= 15, "{a}");
        assert_eq!(owner_pid(&a), Some(std::process::id()));
    }

    #[test]
    fn foreign_names_have_no_owner() {
        for name in [
            "xdpnat-nat",
            "xnl",
            "xnl-1",
            "xnl12-",
            "xnl12",
            "xnlab-1",
            "xnl12-3x",
            "other",
        ] {
            assert_eq!(owner_pid(name), None, "{name}");
        }
        assert_eq!(owner_pid("xnl4194304-17"), Some(4_194_304));
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("xdpnat-client").is_ok());
        for bad in ["", "a/b", "..", ".x", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn own_pid_is_alive() {
        assert!(pid_alive(std::process::id()));
    }
}
