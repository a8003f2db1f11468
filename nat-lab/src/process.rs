//! Running commands (bounded in time, with errors that show the command line and its stderr)
//! and guarding long-running processes so they die with the test that started them.

use std::{
    ffi::OsStr,
    fs::{self, File, OpenOptions},
    io::{Read, Seek, SeekFrom},
    os::unix::process::{CommandExt, ExitStatusExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

/// How long [`run`] and [`run_in`] let a command take before killing it. Lab commands are
/// local and quick; anything slower is hung (a curl to a black hole, a wedged tool).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The command line as a shell user would type it, for error messages.
pub fn command_line(cmd: &Command) -> String {
    let mut parts = vec![quote(cmd.get_program())];
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

fn quote(arg: &OsStr) -> String {
    let s = arg.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A command that runs `program` inside the network namespace `ns` (`ip netns exec`).
///
/// `ip netns exec` execs the program, so the child's pid is the program's pid.
pub fn netns_command(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

/// Starts the inline Python server `script` in namespace `ns` with `ports` as its arguments
/// (the echo servers of this crate). `label` names it in errors and logs.
pub fn spawn_python_server(
    ns: &str,
    script: &str,
    ports: &[u16],
    label: &str,
) -> Result<ChildGuard> {
    if ports.is_empty() {
        bail!("{label} needs at least one port");
    }
    let mut cmd = netns_command(ns, "python3");
    // -I: isolated mode, so nothing from the environment or the working directory is imported.
    cmd.args(["-I", "-c", script]);
    cmd.args(ports.iter().map(u16::to_string));
    spawn(cmd, SpawnOptions::new(label))
        .with_context(|| format!("starting the {label} in namespace {ns}"))
}

/// Runs `cmd` to completion within `timeout` and returns its output; fails, with the command
/// line, exit status and stderr, when it cannot start, exits non-zero or times out (then it is
/// killed with its whole process group).
pub fn run_output(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let line = command_line(cmd);
    // Own process group: a timeout kills helpers the command forked, too.
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{line}` (is it installed?)"))?;
    // Drain both pipes in threads so a chatty command cannot block on a full pipe.
    let mut stdout = child.stdout.take().context("stdout was piped")?;
    let mut stderr = child.stderr.take().context("stderr was piped")?;
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for `{line}`"))?
        {
            break Some(status);
        }
        if Instant::now() >= deadline {
            kill_group(child.id(), libc::SIGKILL);
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    let Some(status) = status else {
        bail!(
            "`{line}` did not finish within {timeout:?} and was killed; stderr: {}",
            String::from_utf8_lossy(&stderr).trim()
        );
    };
    if !status.success() {
        bail!(
            "`{line}` failed ({status}); stderr: {}",
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs `program args..` in the current namespace (bounded by [`DEFAULT_COMMAND_TIMEOUT`]) and
/// returns its stdout; see [`run_output`] for the errors.
pub fn run<I, S>(program: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    let out = run_output(&mut cmd, DEFAULT_COMMAND_TIMEOUT)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args..` inside the namespace `ns` (bounded by [`DEFAULT_COMMAND_TIMEOUT`])
/// and returns its stdout; see [`run_output`] for the errors.
pub fn run_in<I, S>(ns: &str, program: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = netns_command(ns, program);
    cmd.args(args);
    let out = run_output(&mut cmd, DEFAULT_COMMAND_TIMEOUT)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Sends `signal` to the process group led by `pid`; errors (group already gone) are ignored
/// because every caller only wants the group to be dead.
fn kill_group(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill has no memory-safety preconditions; a negative pid addresses the group.
    unsafe {
        libc::kill(-pid, signal);
    }
}

fn kill_pid(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Where a spawned process's stdout and stderr go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChildOutput {
    /// Shares the caller's terminal (the demo shows the agent's log this way).
    Inherit,
    /// Discarded.
    Null,
    /// Both go to a fresh file in the temp directory, readable with [`ChildGuard::log_tail`]
    /// for error messages and removed when the guard drops.
    #[default]
    LogFile,
}

/// How [`spawn`] starts a process and how its guard stops it.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// A short name for messages ("http-echo", "nat-agent").
    pub label: String,
    /// Where stdout and stderr go.
    pub output: ChildOutput,
    /// The signal sent to the process first when the guard stops it.
    pub stop_signal: libc::c_int,
    /// How long to wait after `stop_signal` before the whole process group gets SIGKILL.
    pub stop_grace: Duration,
    /// A signal the kernel sends the child when the spawning *thread* exits (PR_SET_PDEATHSIG),
    /// so it does not outlive a crashed parent. Leave `None` when spawning from a thread that
    /// may end before the guard does (thread pools): the child would be killed early.
    pub parent_death_signal: Option<libc::c_int>,
}

impl SpawnOptions {
    /// Output to a log file, stopped with SIGKILL at once, no parent-death signal.
    pub fn new(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            output: ChildOutput::LogFile,
            stop_signal: libc::SIGKILL,
            stop_grace: Duration::ZERO,
            parent_death_signal: None,
        }
    }
}

/// A running process that is stopped (and its process group killed) when the guard drops.
///
/// The process runs in its own process group, so a terminal's Ctrl-C reaches only the parent,
/// which then stops its children in order; and helpers the process forks die with it.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    label: String,
    command: String,
    log: Option<PathBuf>,
    exit: Option<ExitStatus>,
    stop_signal: libc::c_int,
    stop_grace: Duration,
}

static LOG_COUNTER: AtomicU32 = AtomicU32::new(0);

fn new_log_file(label: &str) -> Result<(PathBuf, File)> {
    let safe: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(32)
        .collect();
    let path = std::env::temp_dir().join(format!(
        "xnl-{}-{}-{safe}.log",
        std::process::id(),
        LOG_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("cannot create log file {}", path.display()))?;
    Ok((path, file))
}

/// The owner pid of a log file name made by [`new_log_file`] (`xnl-<pid>-<n>-<label>.log`).
fn log_owner_pid(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix("xnl-")?.strip_suffix(".log")?;
    let (pid, rest) = rest.split_once('-')?;
    let (counter, _label) = rest.split_once('-')?;
    if counter.is_empty() || !counter.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Removes log files of guarded processes whose owning process is dead (a crashed run never
/// dropped its guards). Returns how many it removed.
pub fn cleanup_stale_logs(pid_alive: impl Fn(u32) -> bool) -> usize {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = log_owner_pid(&name.to_string_lossy()) else {
            continue;
        };
        if !pid_alive(pid) && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Starts `cmd` as a guarded long-running process (see [`ChildGuard`]).
pub fn spawn(mut cmd: Command, opts: SpawnOptions) -> Result<ChildGuard> {
    let line = command_line(&cmd);
    let mut log = None;
    match opts.output {
        ChildOutput::Inherit => {
            cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
        }
        ChildOutput::Null => {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        ChildOutput::LogFile => {
            let (path, file) = new_log_file(&opts.label)?;
            let err = file
                .try_clone()
                .with_context(|| format!("cannot duplicate {}", path.display()))?;
            cmd.stdout(file).stderr(err);
            log = Some(path);
        }
    }
    cmd.stdin(Stdio::null()).process_group(0);
    if let Some(signal) = opts.parent_death_signal {
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // functions (prctl, getppid), touching no memory shared with the parent.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl: then nobody would ever signal us.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("parent exited during spawn"));
                }
                Ok(())
            });
        }
    }
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            if let Some(path) = &log {
                let _ = fs::remove_file(path);
            }
            return Err(e).with_context(|| format!("cannot start `{line}` ({})", opts.label));
        }
    };
    Ok(ChildGuard {
        child,
        label: opts.label,
        command: line,
        log,
        exit: None,
        stop_signal: opts.stop_signal,
        stop_grace: opts.stop_grace,
    })
}

impl ChildGuard {
    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The label given in [`SpawnOptions`].
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The log file, when the output goes to one.
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// The last `max_bytes` of the log file (empty without one), for error messages.
    pub fn log_tail(&self, max_bytes: u64) -> String {
        let Some(path) = &self.log else {
            return String::new();
        };
        let Ok(mut file) = File::open(path) else {
            return String::new();
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(max_bytes)));
        let mut buf = Vec::new();
        let _ = file.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// The exit status if the process has exited, without blocking.
    pub fn try_exited(&mut self) -> Result<Option<ExitStatus>> {
        if self.exit.is_none() {
            self.exit = self
                .child
                .try_wait()
                .with_context(|| format!("cannot poll {} (`{}`)", self.label, self.command))?;
        }
        Ok(self.exit)
    }

    /// Fails, with the exit status and the end of the log, if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.try_exited()? {
            bail!(
                "{} exited unexpectedly ({}); command `{}`{}",
                self.label,
                describe_status(status),
                self.command,
                self.log_suffix()
            );
        }
        Ok(())
    }

    fn log_suffix(&self) -> String {
        let tail = self.log_tail(2000);
        if tail.trim().is_empty() {
            String::new()
        } else {
            format!("; its output ends with:\n{}", tail.trim_end())
        }
    }

    /// Stops the process: the configured stop signal to the process, up to `grace` for it to
    /// exit, then SIGKILL to its whole process group. Returns how it exited.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if self.try_exited()?.is_none() {
            kill_pid(self.pid(), self.stop_signal);
            let deadline = Instant::now() + grace;
            while self.try_exited()?.is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
        // Also when the leader is gone: helpers it forked may still hold the group.
        kill_group(self.pid(), libc::SIGKILL);
        if self.exit.is_none() {
            let status = self
                .child
                .wait()
                .with_context(|| format!("cannot wait for {}", self.label))?;
            self.exit = Some(status);
        }
        self.exit
            .ok_or_else(|| anyhow!("{} has no exit status", self.label))
    }
}

/// "exit status 3" or "killed by signal 9", for messages.
pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.stop(self.stop_grace) {
            eprintln!("nat-lab: stopping {}: {e:#}", self.label);
        }
        if let Some(path) = &self.log {
            let _ = fs::remove_file(path);
        }
    }
}

/// One poll of a condition for [`wait_until`].
#[derive(Debug)]
pub enum Check<T> {
    /// The condition holds; the wait returns this value.
    Done(T),
    /// Not yet, and why (reported if the wait times out).
    NotYet(String),
}

/// Polls `check` until it returns [`Check::Done`] or `timeout` elapses. An `Err` from `check`
/// ends the wait at once (something that will not get better, such as a server that exited);
/// a timeout error names `what` and the last [`Check::NotYet`] reason.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Check<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        let last = match check().with_context(|| format!("while waiting for {what}"))? {
            Check::Done(value) => return Ok(value),
            Check::NotYet(reason) => reason,
        };
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}; last state: {last}");
        }
        thread::sleep(pause.min(timeout - elapsed));
        // Quick at first (most waits are short), then gentle on the CPU.
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Like [`wait_until`] for checks that fail until the condition holds: every `Err` means
/// "not yet", and the last one is reported if `timeout` elapses.
pub fn wait_until_ok<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T>,
) -> Result<T> {
    wait_until(what, timeout, || {
        Ok(match check() {
            Ok(value) => Check::Done(value),
            Err(e) => Check::NotYet(format!("{e:#}")),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_quotes_what_a_shell_would_split() {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "http://198.18.100.10/", "it's here", ""]);
        assert_eq!(
            command_line(&cmd),
            r"curl -s http://198.18.100.10/ 'it'\''s here' ''"
        );
    }

    #[test]
    fn failure_names_command_status_and_stderr() {
        let err = run("sh", ["-c", "echo oops >&2; exit 3"]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("sh -c"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("oops"), "{msg}");
    }

    #[test]
    fn missing_program_is_a_clear_error() {
        let err = run("no-such-program-xnl", ["x"]).unwrap_err();
        assert!(format!("{err:#}").contains("cannot start `no-such-program-xnl x`"));
    }

    #[test]
    fn stdout_is_returned() {
        assert_eq!(run("sh", ["-c", "echo hi"]).unwrap(), "hi\n");
    }

    #[test]
    fn timeout_kills_the_process_group() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30 & sleep 30"]);
        let start = Instant::now();
        let err = run_output(&mut cmd, Duration::from_millis(200)).unwrap_err();
        assert!(err.to_string().contains("did not finish"), "{err:#}");
        // The background sleep holds the pipes: returning at all proves the group died.
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn guard_kills_on_drop_and_reports_exit() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo started; exec sleep 30"]);
        let mut guard = spawn(cmd, SpawnOptions::new("sleeper")).unwrap();
        let pid = guard.pid();
        guard.ensure_running().unwrap();
        let log = guard.log_path().unwrap().to_path_buf();
        wait_until_ok("log line", Duration::from_secs(5), || {
            if guard.log_tail(100).contains("started") {
                Ok(())
            } else {
                bail!("no output yet")
            }
        })
        .unwrap();
        drop(guard);
        assert!(!log.exists(), "log file removed");
        // SAFETY: signal 0 only checks existence.
        let alive = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
        assert!(!alive, "child {pid} still alive");
    }

    #[test]
    fn exited_child_is_reported_with_its_output() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo bad config >&2; exit 2"]);
        let mut guard = spawn(cmd, SpawnOptions::new("agent")).unwrap();
        let err = wait_until("agent to exit", Duration::from_secs(5), || {
            guard.ensure_running()?;
            Ok(Check::<()>::NotYet("running".into()))
        })
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("exit status 2"), "{msg}");
        assert!(msg.contains("bad config"), "{msg}");
    }

    #[test]
    fn graceful_stop_uses_the_stop_signal() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap 'exit 7' TERM; while :; do sleep 0.05; done"]);
        let mut opts = SpawnOptions::new("graceful");
        opts.stop_signal = libc::SIGTERM;
        opts.parent_death_signal = Some(libc::SIGTERM);
        let mut guard = spawn(cmd, opts).unwrap();
        thread::sleep(Duration::from_millis(100));
        let status = guard.stop(Duration::from_secs(5)).unwrap();
        assert_eq!(status.code(), Some(7));
    }

    #[test]
    fn log_file_names_carry_the_owner_pid() {
        assert_eq!(log_owner_pid("xnl-28298-0-http_echo.log"), Some(28298));
        assert_eq!(log_owner_pid("xnl-7-12-nat_agent.log"), Some(7));
        for other in [
            "xnl-28298-0-http_echo.txt",
            "xnl-nft-12-ns-c.nft",
            "xnl-x-0-a.log",
            "xnl-12-a-b.log",
            "xnl12-0",
            "other.log",
        ] {
            assert_eq!(log_owner_pid(other), None, "{other}");
        }
    }

    #[test]
    fn stale_logs_of_dead_owners_are_removed() {
        let (live, _file) = new_log_file("live").unwrap();
        // pid 0 is never a process: a stand-in for a dead owner.
        let dead = std::env::temp_dir().join("xnl-0-0-dead.log");
        fs::write(&dead, "x").unwrap();
        let me = std::process::id();
        cleanup_stale_logs(|pid| pid == me);
        assert!(!dead.exists());
        assert!(live.exists());
        fs::remove_file(live).unwrap();
    }

    #[test]
    fn wait_until_times_out_with_last_reason() {
        let err = wait_until("the moon", Duration::from_millis(50), || {
            Ok(Check::<()>::NotYet("still cheese".into()))
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("the moon") && msg.contains("still cheese"),
            "{msg}"
        );
    }

    #[test]
    fn wait_until_ok_returns_value() {
        let mut n = 0;
        let v = wait_until_ok("third try", Duration::from_secs(5), || {
            n += 1;
            if n < 3 {
                bail!("try {n}")
            }
            Ok(n)
        })
        .unwrap();
        assert_eq!(v, 3);
    }
}
