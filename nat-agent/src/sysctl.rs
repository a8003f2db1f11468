//! Kernel settings the dataplane depends on, applied to the interfaces the agent attaches to.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tracing::info;

/// Lets packets whose source is one of the box's own addresses in on `interface`.
///
/// Source NAT happens at XDP ingress, before the kernel routes the packet: a translated packet
/// then carries the NAT's external address as its source, and without `accept_local` the
/// kernel drops it as a martian instead of forwarding it.
pub fn enable_accept_local(interface: &str) -> Result<()> {
    let path = PathBuf::from(format!("/proc/sys/net/ipv4/conf/{interface}/accept_local"));
    let current =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    if current.trim() == "1" {
        return Ok(());
    }
    std::fs::write(&path, "1").with_context(|| format!("writing 1 to {}", path.display()))?;
    info!(%interface, "set net.ipv4.conf.{interface}.accept_local=1 (source NAT at XDP ingress needs it)");
    Ok(())
}
