//! systemd integration: readiness and the watchdog (`Type=notify`, `WatchdogSec=`).
//!
//! Both are no-ops when the agent does not run under systemd (no `NOTIFY_SOCKET`).

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::owner::Request;

/// Tells systemd the agent is up: rules applied, program attached, listeners serving.
pub fn ready() {
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready]) {
        warn!(error = %e, "could not tell systemd the agent is ready");
    }
}

/// Tells systemd the agent is stopping (detaching).
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// When systemd asks for a watchdog, pings it at half the interval, but only while the task
/// that owns the maps still answers: a wedged dataplane owner must lead to a restart, not to
/// a healthy-looking process.
pub(crate) fn start_watchdog(owner: mpsc::Sender<Request>) -> Option<tokio::task::JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()?;
    let period = interval / 2;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let (tx, rx) = oneshot::channel();
            if owner.send(Request::Scrape(tx)).await.is_err() {
                break;
            }
            match tokio::time::timeout(period.max(Duration::from_millis(100)), rx).await {
                Ok(Ok(Ok(_))) => {
                    if let Err(e) = sd_notify::notify(&[NotifyState::Watchdog]) {
                        warn!(error = %e, "watchdog ping failed");
                    } else {
                        debug!("watchdog ping");
                    }
                }
                // No answer: withhold the ping and let systemd act.
                _ => warn!("the dataplane task did not answer; withholding the watchdog ping"),
            }
        }
    }))
}
