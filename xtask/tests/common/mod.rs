//! What the benchmarks' quick-pass tests share: running `xtask bench <what> --quick` as a
//! child with a deadline, its output read while it runs.

use std::{
    io::Read,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// Runs `xtask bench <what> --quick --docs <docs>` and returns its standard output. Panics,
/// with both outputs, when it fails (it needs root and must not be skipped) or outlives
/// `timeout` (killed then).
pub fn run_quick(what: &str, docs: &Path, timeout: Duration) -> String {
    let command = format!("`xtask bench {what} --quick`");
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["bench", what, "--quick", "--docs"])
        .arg(docs)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting xtask");
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).map(|_| s)
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).map(|_| s)
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for xtask") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command} did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(100));
    };
    let stdout = out.join().expect("reader").expect("reading stdout");
    let stderr = err.join().expect("reader").expect("reading stderr");
    assert!(
        status.success(),
        "{command} failed ({status}); it needs root and must not be skipped.\n--- stdout\n\
         {stdout}\n--- stderr\n{stderr}"
    );
    eprintln!("quick pass took {:.1} s", start.elapsed().as_secs_f64());
    stdout
}
