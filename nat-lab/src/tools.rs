//! Presence checks for the external tools the lab drives.
//!
//! Lab tests must fail with the reason when a tool is missing, never skip silently: a skipped
//! end-to-end test looks exactly like a passing one in CI.

use std::{
    env,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Result};

/// Every tool the lab helpers run, checked by [`crate::DnatLab`] before it builds anything.
pub const LAB_TOOLS: &[&str] = &["ip", "ethtool", "sysctl", "ss", "curl", "python3", "nft"];

/// The Debian package that ships `tool`, so the error can say what to install.
fn debian_package(tool: &str) -> Option<&'static str> {
    Some(match tool {
        "ip" | "ss" => "iproute2",
        "ethtool" => "ethtool",
        "sysctl" => "procps",
        "curl" => "curl",
        "python3" => "python3",
        "nft" => "nftables",
        "tcpdump" => "tcpdump",
        "chronyd" | "chronyc" => "chrony",
        "iperf3" => "iperf3",
        _ => return None,
    })
}

/// Looks `tool` up in `PATH` the way a shell would; `None` when it is not an executable file.
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Fails, naming every missing tool and its Debian package, unless all of `tools` are in
/// `PATH`.
pub fn require_tools(tools: &[&str]) -> Result<()> {
    let missing: Vec<String> = tools
        .iter()
        .filter(|tool| find_tool(tool).is_none())
        .map(|tool| match debian_package(tool) {
            Some(package) => format!("{tool} (Debian package {package})"),
            None => (*tool).to_owned(),
        })
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing tools needed by the lab: {}; run scripts/bootstrap.sh (as root) to install them",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Fails unless the process runs as root: namespaces, veths and nftables need it.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!("the lab needs root (network namespaces, veths, nftables); run it with sudo");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_is_named_with_its_package() {
        let err = require_tools(&["sh", "no-such-tool-xnl"]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("no-such-tool-xnl"), "{msg}");
        assert!(!msg.contains(": sh"), "{msg}");
        assert!(msg.contains("bootstrap.sh"), "{msg}");
    }

    #[test]
    fn known_tools_name_their_package() {
        for tool in LAB_TOOLS.iter().chain(crate::chrony::CHRONY_TOOLS) {
            assert!(debian_package(tool).is_some(), "{tool}");
        }
    }

    #[test]
    fn present_tool_is_found() {
        assert!(find_tool("sh").is_some());
        require_tools(&["sh"]).unwrap();
    }
}
