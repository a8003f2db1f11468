//! FRR (Debian's `frr` package) in a lab namespace: zebra and bgpd with a private runtime
//! directory, so several instances run side by side and none touches the host's FRR.
//!
//! The daemons run in the foreground under [`ChildGuard`]s, so they stop with the test; they
//! run as the `frr` user the package creates (root is refused by FRR's privilege checks unless
//! it is in the `frrvty` group, which the lab does not change on the host).

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{
    process::{run_output, ChildGuard, SpawnOptions},
    Netns, ScratchDir,
};

/// Where Debian installs the FRR daemons.
const FRR_LIBEXEC: &str = "/usr/lib/frr";

/// One FRR instance: zebra + bgpd in one namespace.
pub struct Frr {
    // Declared first so the daemons stop before their directory goes.
    _bgpd: ChildGuard,
    _zebra: ChildGuard,
    dir: PathBuf,
    ns: String,
    _scratch: ScratchDir,
}

fn require_frr() -> Result<(u32, u32)> {
    for daemon in ["zebra", "bgpd"] {
        let path = Path::new(FRR_LIBEXEC).join(daemon);
        if !path.exists() {
            bail!(
                "{} is missing: install Debian's frr package (scripts/bootstrap.sh does)",
                path.display()
            );
        }
    }
    if crate::tools::find_tool("vtysh").is_none() {
        bail!("vtysh is missing: install Debian's frr package (scripts/bootstrap.sh does)");
    }
    let user = nix::unistd::User::from_name("frr")
        .context("looking up the frr user")?
        .context("no user frr: install Debian's frr package, which creates it")?;
    Ok((user.uid.as_raw(), user.gid.as_raw()))
}

impl Frr {
    /// Starts zebra and bgpd in `ns` with `config` (an frr.conf for bgpd) and waits until
    /// vtysh answers.
    pub fn start(ns: &Netns, label: &str, config: &str) -> Result<Self> {
        let (uid, gid) = require_frr()?;
        let scratch = ScratchDir::new(&format!("frr-{label}"))?;
        let dir = scratch.join("run");
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("bgpd.conf");
        std::fs::write(&conf, config)?;
        for path in [scratch.path(), dir.as_path(), conf.as_path()] {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("giving {} to frr", path.display()))?;
        }
        std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755))?;
        let zserv = dir.join("zserv.api").display().to_string();
        let vty = dir.display().to_string();
        let common = |pid: &str| -> Vec<String> {
            [
                "-u",
                "frr",
                "-g",
                "frr",
                "-z",
                &zserv,
                "--vty_socket",
                &vty,
                "-P",
                "0",
                "-i",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain([dir.join(pid).display().to_string()])
            .collect()
        };
        let spawn = |daemon: &str, mut args: Vec<String>| -> Result<ChildGuard> {
            let mut opts = SpawnOptions::new(format!("{daemon}-{label}"));
            opts.stop_signal = libc::SIGTERM;
            opts.stop_grace = Duration::from_secs(3);
            let program = Path::new(FRR_LIBEXEC).join(daemon).display().to_string();
            args.shrink_to_fit();
            ns.spawn(&program, args, opts)
        };
        let mut zebra_args = common("zebra.pid");
        zebra_args.extend(["-f".to_string(), "/dev/null".to_string()]);
        let zebra = spawn("zebra", zebra_args)?;
        // bgpd connects to zebra's socket: wait for it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !Path::new(&zserv).exists() {
            if std::time::Instant::now() > deadline {
                bail!(
                    "zebra in {} did not create {zserv}: {}",
                    ns.name(),
                    zebra.log_tail(2000)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut bgpd_args = common("bgpd.pid");
        bgpd_args.extend(["-f".to_string(), conf.display().to_string()]);
        let bgpd = spawn("bgpd", bgpd_args)?;
        let frr = Frr {
            _bgpd: bgpd,
            _zebra: zebra,
            dir,
            ns: ns.name().to_string(),
            _scratch: scratch,
        };
        crate::wait_until("bgpd's vty", Duration::from_secs(10), || {
            Ok(match frr.vtysh("show bgp summary") {
                Ok(_) => crate::Check::Done(()),
                Err(e) => crate::Check::NotYet(format!("{e:#}")),
            })
        })?;
        Ok(frr)
    }

    /// Runs one vtysh command against this instance and returns its output.
    pub fn vtysh(&self, command: &str) -> Result<String> {
        let mut cmd = crate::process::netns_command(&self.ns, "vtysh");
        cmd.arg("--vty_socket").arg(&self.dir).args(["-c", command]);
        let out = run_output(&mut cmd, Duration::from_secs(10))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A minimal eBGP speaker config: `local_as` with `router_id`, one neighbour, fast timers (lab
/// sessions come up in seconds), and, when `redistribute_prefixes` is given, the kernel
/// routes inside those prefixes (the agent's VIP routes) redistributed.
pub fn bgp_config(
    router_id: &str,
    local_as: u32,
    neighbor: &str,
    remote_as: u32,
    redistribute_prefixes: &[&str],
) -> String {
    let mut c = format!("frr defaults traditional\nhostname as{local_as}\n");
    for (i, p) in redistribute_prefixes.iter().enumerate() {
        c.push_str(&format!(
            "ip prefix-list XDPNAT-VIPS seq {} permit {p} le 32\n",
            (i + 1) * 5
        ));
    }
    if !redistribute_prefixes.is_empty() {
        c.push_str("route-map XDPNAT-VIPS permit 10\n match ip address prefix-list XDPNAT-VIPS\n");
    }
    c.push_str(&format!(
        "router bgp {local_as}\n bgp router-id {router_id}\n no bgp ebgp-requires-policy\n \
         neighbor {neighbor} remote-as {remote_as}\n neighbor {neighbor} timers 1 3\n \
         neighbor {neighbor} timers connect 1\n neighbor {neighbor} advertisement-interval 0\n"
    ));
    if !redistribute_prefixes.is_empty() {
        c.push_str(
            " address-family ipv4 unicast\n  redistribute kernel route-map XDPNAT-VIPS\n \
             exit-address-family\n",
        );
    }
    c
}
