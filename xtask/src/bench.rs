//! `cargo xtask bench`: benchmarks.
//!
//! `bench kernel` times the XDP programs inside the kernel (BPF_PROG_TEST_RUN) and writes the
//! results into `docs/benchmarks.md`; see `bench_kernel` for the method. It runs in a
//! network namespace of its own whose routing table has a default route, so the FIB lookup a
//! new flow makes succeeds as it does on an appliance, whatever the host's routes are.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use nat_lab::{netns::Netns, require_tools};

use crate::{
    bench_kernel::{self, Plan},
    bench_report, bench_sys,
    bench_topo::{self, Config, TopoPlan},
    bench_topo_report, signals,
};

/// Options of `cargo xtask bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Debug, Subcommand)]
enum BenchWhat {
    /// In-kernel cost per packet (BPF_PROG_TEST_RUN): established DNAT and SNAT, a
    /// non-matching packet, new SNAT flows at 10/50/90% table fill, and table scale, each
    /// beside the parse-and-pass baseline. Needs root.
    Kernel(KernelArgs),
    /// The appliance on a generator -> appliance -> sink topology of network namespaces,
    /// against netfilter NAT, kernel forwarding and a bare XDP redirect forwarder: appliance
    /// CPU per packet, flow, megabyte and connection. Needs root.
    Topology(TopologyArgs),
}

/// Options of `cargo xtask bench topology`.
#[derive(Debug, Args)]
pub struct TopologyArgs {
    /// A pass of a few seconds for iteration and the test suite: 2 repetitions of short
    /// intervals, small tables. Writes no page unless --docs is given.
    #[arg(long)]
    quick: bool,

    /// Repetitions [default: 5; --quick: 2].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    reps: Option<u32>,

    /// Write the results into this page (it must have the topology markers), and the chart
    /// next to it [default: docs/benchmarks.md, not with --quick].
    #[arg(long, value_name = "PATH", conflicts_with = "no_docs")]
    docs: Option<PathBuf>,

    /// Write no page, only print.
    #[arg(long)]
    no_docs: bool,

    /// Measure only these configurations (comma-separated keys, e.g. xdp-pass,netfilter);
    /// ratios need netfilter and xdp-limit among them. For investigating one configuration.
    #[arg(long, value_name = "KEYS", value_delimiter = ',')]
    only: Vec<String>,

    /// Measure only these workloads (comma-separated keys as printed, e.g.
    /// dnat-1flow,snat-1flow). For investigating one workload.
    #[arg(long, value_name = "KEYS", value_delimiter = ',')]
    workloads: Vec<String>,

    /// The CPU of the appliance's receive threads [default: the last one]; everything else
    /// runs on another.
    #[arg(long, value_name = "CPU")]
    cpu: Option<usize>,
}

/// Options of `cargo xtask bench kernel`.
#[derive(Debug, Args)]
pub struct KernelArgs {
    /// A short pass for iteration and the test suite: 3 repetitions, small tables, scale at
    /// 1Ki and 16Ki sessions. Writes no page unless --docs is given.
    #[arg(long)]
    quick: bool,

    /// Capacity of the fill-level tables, also the size of their port pool [default: 64512,
    /// the ports 1024-65535 of one address; --quick: 4096]. Above 64512 the pool gets more
    /// addresses.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1024..=4_128_768))]
    max_sessions: Option<u32>,

    /// Also measure 4Mi and 16Mi sessions, each only if its tables take at most half the
    /// memory left (slow: filling 16Mi sessions takes a while).
    #[arg(long)]
    scale: bool,

    /// Repetitions [default: 7; --quick: 3].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    reps: Option<u32>,

    /// Write the results into this page [default: docs/benchmarks.md, not with --quick].
    #[arg(long, value_name = "PATH", conflicts_with = "no_docs")]
    docs: Option<PathBuf>,

    /// Write no page, only print.
    #[arg(long)]
    no_docs: bool,

    /// The CPU to run on [default: the last one].
    #[arg(long, value_name = "CPU")]
    cpu: Option<usize>,
}

/// Entry point of `cargo xtask bench`.
pub fn bench(args: &BenchArgs) -> Result<()> {
    match &args.what {
        BenchWhat::Kernel(k) => kernel(k),
        BenchWhat::Topology(t) => topology(t),
    }
}

/// New flows a full topology run measures per configuration: the table then holds at least a
/// million sessions (2^20).
const NEW_FLOW_TARGET: u64 = 1 << 20;

fn topo_plan(args: &TopologyArgs, cpus: usize) -> Result<TopoPlan> {
    if cpus < 2 {
        bail!("bench topology needs 2 CPUs: one for the appliance, one for the rest");
    }
    let nat_cpu = args.cpu.unwrap_or(cpus - 1);
    if nat_cpu >= cpus {
        bail!("--cpu {nat_cpu}: this machine has CPUs 0 to {}", cpus - 1);
    }
    let other_cpu = if nat_cpu == 0 { 1 } else { 0 };
    let ms = Duration::from_millis;
    let plan = if args.quick {
        TopoPlan {
            reps: 2,
            warmup: ms(30),
            interval: ms(80),
            new_flow_target: 8_192,
            new_flow_time_cap: ms(2_000),
            many_flows: 1024,
            max_sessions: 65_536,
            iperf_bytes: 50_000_000,
            cps_interval: ms(150),
            nat_cpu,
            other_cpu,
            configs: Vec::new(),
            workloads: Vec::new(),
        }
    } else {
        TopoPlan {
            reps: 5,
            warmup: ms(150),
            interval: ms(600),
            // Issue 7: new flows until the table holds at least a million sessions; room for
            // a quarter more, so the flows still in flight when the count is reached (and
            // those of the warm-up) never find it full.
            new_flow_target: NEW_FLOW_TARGET,
            new_flow_time_cap: ms(30_000),
            many_flows: 16_384,
            max_sessions: (NEW_FLOW_TARGET + NEW_FLOW_TARGET / 4) as u32,
            iperf_bytes: 1_000_000_000,
            cps_interval: ms(1000),
            nat_cpu,
            other_cpu,
            configs: Vec::new(),
            workloads: Vec::new(),
        }
    };
    let mut configs = Vec::new();
    for key in &args.only {
        match Config::ALL.iter().find(|c| c.key() == key) {
            Some(c) => configs.push(*c),
            None => bail!(
                "--only {key}: not a configuration (one of {})",
                Config::ALL.map(Config::key).join(", ")
            ),
        }
    }
    if configs.is_empty() {
        configs = Config::ALL.to_vec();
    }
    Ok(TopoPlan {
        reps: args.reps.unwrap_or(plan.reps),
        configs,
        workloads: args.workloads.clone(),
        ..plan
    })
}

fn topology(args: &TopologyArgs) -> Result<()> {
    signals::install()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench topology needs root: it creates network namespaces and loads XDP programs");
    }
    require_tools(&[
        "ip",
        "sysctl",
        "ethtool",
        "tc",
        "nft",
        "conntrack",
        "iperf3",
        "taskset",
    ])?;
    let cpus = bench_sys::online_cpus();
    let plan = topo_plan(args, cpus)?;
    let docs = match (&args.docs, args.no_docs, args.quick) {
        (Some(path), _, _) => Some(path.clone()),
        (None, false, false) => Some(workspace_root()?.join("docs/benchmarks.md")),
        _ => None,
    };
    let report = bench_topo::run(&plan, machine_facts(cpus))?;
    print!("{}", report.to_text());
    match docs {
        Some(path) => {
            bench_topo_report::write_docs(&path, &report)?;
            println!("\nwrote {}", path.display());
        }
        None => println!("\n(no page written: --quick or --no-docs)"),
    }
    Ok(())
}

fn plan(args: &KernelArgs, cpus: usize) -> Result<Plan> {
    let cpu = args.cpu.unwrap_or(cpus - 1);
    if cpu >= cpus {
        bail!("--cpu {cpu}: this machine has CPUs 0 to {}", cpus - 1);
    }
    let (reps, repeat, single_runs, max_sessions, scale) = if args.quick {
        (3, 20_000, 200, 4096, vec![1 << 10, 16 << 10])
    } else {
        (7, 1_000_000, 2000, 64_512, vec![1 << 10, 1 << 20])
    };
    Ok(Plan {
        reps: args.reps.unwrap_or(reps),
        repeat,
        single_runs,
        max_sessions: args.max_sessions.unwrap_or(max_sessions),
        fill_levels: vec![10, 50, 90],
        scale,
        scale_if_memory: if args.scale {
            vec![4 << 20, 16 << 20]
        } else {
            Vec::new()
        },
        cpu,
    })
}

fn kernel(args: &KernelArgs) -> Result<()> {
    signals::install()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench kernel needs root: it loads BPF programs and creates a network namespace");
    }
    require_tools(&["ip", "sysctl"])?;
    let cpus = bench_sys::online_cpus();
    let plan = plan(args, cpus)?;
    let docs = match (&args.docs, args.no_docs, args.quick) {
        (Some(path), _, _) => Some(path.clone()),
        (None, false, false) => Some(workspace_root()?.join("docs/benchmarks.md")),
        _ => None,
    };
    let machine = machine_facts(cpus);

    let ns = Netns::new().context("creating the benchmark's network namespace")?;
    route_namespace(&ns)?;
    let report = ns.enter(|| {
        bench_sys::pin_to_cpu(plan.cpu)?;
        bench_kernel::run(&plan, machine)
    })?;
    drop(ns);

    print!("{}", report.to_text());
    match docs {
        Some(path) => {
            bench_report::write_docs(&path, &report)?;
            println!("\nwrote {}", path.display());
        }
        None => println!("\n(no page written: --quick or --no-docs)"),
    }
    Ok(())
}

/// A default route out of a veth, and forwarding on: new flows' FIB lookups then succeed
/// (XDP test runs arrive on the namespace's loopback).
fn route_namespace(ns: &Netns) -> Result<()> {
    let dotted = |a: [u8; 4]| std::net::Ipv4Addr::from(a).to_string();
    let address = format!("{}/24", dotted(bench_kernel::ROUTE_SRC));
    let gateway = dotted(bench_kernel::ROUTE_GATEWAY);
    let veth = "link add bench0 type veth peer name bench1";
    let addr = format!("addr add {address} dev bench0");
    let route = format!("route add default via {gateway} dev bench0");
    let steps = [
        veth,
        &addr,
        "link set bench0 up",
        "link set bench1 up",
        &route,
    ];
    for args in steps {
        ns.run("ip", args.split(' '))
            .with_context(|| format!("setting up the benchmark namespace: ip {args}"))?;
    }
    ns.sysctl("net.ipv4.ip_forward", "1")
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .with_context(|| format!("{} has no parent directory", manifest.display()))
}

/// What the numbers were measured on.
fn machine_facts(cpus: usize) -> Vec<(String, String)> {
    let mut facts = vec![
        ("CPUs (nproc)".to_owned(), cpus.to_string()),
        ("CPU".to_owned(), bench_sys::cpu_model()),
        ("kernel".to_owned(), bench_sys::kernel_release()),
    ];
    let git = |args: &[&str]| -> Option<String> {
        let root = workspace_root().ok()?;
        let out = Command::new("git")
            .current_dir(root)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    if let Some(commit) = git(&["rev-parse", "--short", "HEAD"]) {
        let dirty =
            git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
        facts.push((
            "commit".to_owned(),
            format!(
                "{commit}{}",
                if dirty { " (with local changes)" } else { "" }
            ),
        ));
    }
    if let Some(date) = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .filter(|o| o.status.success())
    {
        facts.push((
            "date".to_owned(),
            String::from_utf8_lossy(&date.stdout).trim().to_owned(),
        ));
    }
    facts
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: KernelArgs,
    }

    #[test]
    fn quick_is_smaller_and_writes_no_page_by_default() {
        let quick = Cli::parse_from(["x", "--quick"]).args;
        let full = Cli::parse_from(["x"]).args;
        let (q, f) = (plan(&quick, 2).unwrap(), plan(&full, 2).unwrap());
        assert!(q.reps < f.reps && q.reps >= 1 && f.reps >= 5);
        assert!(q.max_sessions < f.max_sessions);
        assert_eq!(f.max_sessions, 64_512);
        assert_eq!(q.cpu, 1);
        assert!(!q.scale.is_empty() && q.scale_if_memory.is_empty());
        let scaled = plan(&Cli::parse_from(["x", "--scale"]).args, 2).unwrap();
        assert_eq!(scaled.scale_if_memory, [4 << 20, 16 << 20]);
    }

    #[test]
    fn bad_options_are_refused() {
        assert!(Cli::try_parse_from(["x", "--max-sessions", "100"]).is_err());
        assert!(Cli::try_parse_from(["x", "--reps", "0"]).is_err());
        assert!(Cli::try_parse_from(["x", "--docs", "a", "--no-docs"]).is_err());
        let cpu = Cli::parse_from(["x", "--cpu", "5"]).args;
        assert!(plan(&cpu, 2).is_err());
    }
}
