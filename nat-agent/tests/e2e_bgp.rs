//! BGP announcement of the DNAT VIPs, end to end: FRR beside the agent (in the NAT namespace)
//! redistributes the agent's VIP routes to FRR in a "router" namespace. While the agent
//! translates, the router has each VIP prefix with the NAT as next hop; a rule added or
//! deleted live is announced or withdrawn; when the agent stops (and, without pinned state,
//! detaches the program) every VIP is withdrawn.
//!
//! Needs root and Debian's frr package (installed by scripts/bootstrap.sh). Never skips.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{ensure, Context, Result};
use nat_lab::{bgp_config, veth_pair, wait_until, Check, DnatLab, Frr, Netns};

#[path = "common/agent.rs"]
mod agent;

use agent::{Agent, AGENT, API_SOCKET_PLACEHOLDER};

const NAT_PEER: &str = "198.18.201.1";
const ROUTER_PEER: &str = "198.18.201.2";
const NAT_AS: u32 = 65001;
const ROUTER_AS: u32 = 65002;
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(30);

fn config() -> String {
    format!(
        r#"
[agent]
metrics_listen = "127.0.0.1:9469"
api_socket = "{API_SOCKET_PLACEHOLDER}"

[announce]
vip_routes = true

[[interfaces]]
name = "n0"
xdp_mode = "native"

[[interfaces]]
name = "n1"
xdp_mode = "native"

[[dnat]]
id = 1
name = "web"
destination = "198.18.100.10"
protocol = "tcp"
port = 80
to_address = "198.18.1.2"
to_port = 80

[[dnat]]
id = 2
name = "netmap"
destination = "198.18.110.0/28"
to_address = "198.18.1.0/28"
"#
    )
}

/// The BGP routes the router installed in its kernel table: "prefix via next-hop".
fn router_routes(router: &Netns) -> Result<Vec<String>> {
    let out = router.run("ip", ["-4", "route", "show", "proto", "bgp"])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let prefix = words.next()?;
            let via = l.split(" via ").nth(1)?.split_whitespace().next()?;
            Some(format!("{prefix} via {via}"))
        })
        .collect())
}

fn wait_for_routes(router: &Netns, want: &[&str]) -> Result<()> {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    wait_until(
        &format!("the router's BGP routes to be {want:?}"),
        ANNOUNCE_TIMEOUT,
        || {
            let mut have = router_routes(router)?;
            have.sort();
            Ok(if have == want {
                Check::Done(())
            } else {
                Check::NotYet(format!("{have:?}"))
            })
        },
    )
}

fn cli(socket: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(AGENT)
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()?;
    ensure!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn vips_are_announced_while_translating_and_withdrawn_after() -> Result<()> {
    let lab = DnatLab::new()?;
    let router = Netns::new()?;
    veth_pair(&lab.nat, "bgp0", &router, "up0")?;
    lab.nat.run(
        "ip",
        ["addr", "add", &format!("{NAT_PEER}/30"), "dev", "bgp0"],
    )?;
    lab.nat.run("ip", ["link", "set", "bgp0", "up"])?;
    router.run(
        "ip",
        ["addr", "add", &format!("{ROUTER_PEER}/30"), "dev", "up0"],
    )?;
    router.run("ip", ["link", "set", "up0", "up"])?;
    router.run("ip", ["link", "set", "lo", "up"])?;

    let _beside = Frr::start(
        &lab.nat,
        "nat",
        &bgp_config(
            NAT_PEER,
            NAT_AS,
            ROUTER_PEER,
            ROUTER_AS,
            &["198.18.100.0/22", "198.18.110.0/24"],
        ),
    )?;
    let router_frr = Frr::start(
        &router,
        "router",
        &bgp_config(ROUTER_PEER, ROUTER_AS, NAT_PEER, NAT_AS, &[]),
    )?;
    // Nothing is announced before the agent runs.
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        router_routes(&router)?.is_empty(),
        "announced before the agent started"
    );

    let mut agent = Agent::start(&lab.nat, &config())?;
    let first = [
        "198.18.100.10 via 198.18.201.1",
        "198.18.110.0/28 via 198.18.201.1",
    ];
    wait_for_routes(&router, &first).with_context(|| {
        router_frr
            .vtysh("show bgp summary")
            .unwrap_or_else(|e| format!("{e:#}"))
    })?;
    // The agent's own routes: blackholes of protocol 250, never used for forwarding.
    let own = lab.nat.run("ip", ["route", "show", "proto", "250"])?;
    ensure!(own.contains("blackhole 198.18.100.10"), "{own}");

    // Live rule changes are announced and withdrawn.
    let socket = agent.api_socket();
    let rule = socket.parent().context("dir")?.join("vip3.toml");
    std::fs::write(
        &rule,
        "[[dnat]]\nid = 3\nname = \"vip3\"\ndestination = \"198.18.100.12\"\nto_address = \"198.18.1.3\"\n",
    )?;
    cli(&socket, &["rules", "add", rule.to_str().context("path")?])?;
    let mut with_vip3 = first.to_vec();
    with_vip3.push("198.18.100.12 via 198.18.201.1");
    wait_for_routes(&router, &with_vip3)?;
    cli(&socket, &["rules", "del", "dnat", "netmap"])?;
    wait_for_routes(
        &router,
        &[
            "198.18.100.10 via 198.18.201.1",
            "198.18.100.12 via 198.18.201.1",
        ],
    )?;

    // Stopping without pinned state detaches the program: everything is withdrawn.
    agent.stop(Duration::from_secs(10))?;
    let own = lab.nat.run("ip", ["route", "show", "proto", "250"])?;
    ensure!(own.trim().is_empty(), "VIP routes left behind: {own}");
    wait_for_routes(&router, &[])?;
    Ok(())
}
