//! SIGINT / SIGTERM / SIGHUP turn into a flag the demo polls, so it leaves through its normal
//! path and every guard (agent, servers, namespaces) runs. A second signal while the first is
//! being handled gets the default action: the user insists, and the next run cleans up.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use anyhow::{bail, Result};

static STOP: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicI32 = AtomicI32::new(0);

const HANDLED: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

extern "C" fn on_signal(signal: libc::c_int) {
    // Only async-signal-safe work here: atomics, signal(), raise().
    if STOP.swap(true, Ordering::SeqCst) {
        // SAFETY: signal and raise are async-signal-safe; restoring the default action and
        // re-raising ends the process the way the signal normally would.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            libc::raise(signal);
        }
    }
    SIGNAL.store(signal, Ordering::SeqCst);
}

/// Installs the handlers.
pub fn install() -> Result<()> {
    for signal in HANDLED {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value, which is then
        // filled in; the handler only touches atomics and async-signal-safe calls.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            bail!(
                "cannot install a handler for signal {signal}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// The signal that asked us to stop, if one has.
pub fn stop_requested() -> Option<libc::c_int> {
    if STOP.load(Ordering::SeqCst) {
        Some(SIGNAL.load(Ordering::SeqCst))
    } else {
        None
    }
}

/// Fails with "interrupted" once a stop signal has arrived, so setup steps bail out early.
pub fn check_interrupted() -> Result<()> {
    if let Some(signal) = stop_requested() {
        bail!("interrupted by {}", name(signal));
    }
    Ok(())
}

/// A signal's name for messages.
pub fn name(signal: libc::c_int) -> String {
    match signal {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        other => format!("signal {other}"),
    }
}
