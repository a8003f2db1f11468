//! Project tasks, run as `cargo xtask <task>` (an alias in `.cargo/config.toml`).
//!
//! - `lab`: the demo — a client, the NAT agent and a backend in network namespaces.
//! - `bench kernel`: in-kernel cost per packet (BPF_PROG_TEST_RUN), written to
//!   `docs/benchmarks.md`.
//! - `bench topology`: the appliance against netfilter, kernel forwarding and a bare XDP
//!   forwarder on a generator — appliance — sink topology, written to the same page.
//! - `package`: the `xdp-nat` Debian package in `target/debian/`.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};

mod bench;
mod bench_fill;
mod bench_kernel;
mod bench_packet;
mod bench_report;
mod bench_scale_chart;
mod bench_sys;
mod bench_topo;
mod bench_topo_net;
mod bench_topo_report;
mod bench_topo_tcp;
mod bench_topo_xdp;
mod config;
mod lab;
mod package;
mod signals;

/// Project tasks for the XDP NAT.
#[derive(Debug, Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Run the demo: client -> nat (the agent) -> backend in network namespaces, curl the
    /// VIPs, then keep the lab up until Ctrl-C / SIGTERM (or --duration). Needs root.
    Lab(LabArgs),
    /// Benchmarks (`bench kernel`: in-kernel cost per packet; `bench topology`: on a
    /// namespace topology against netfilter). Needs root.
    Bench(bench::BenchArgs),
    /// Build the Debian package (release build) into target/debian/xdp-nat_*.deb.
    Package(package::PackageArgs),
}

/// Options of `cargo xtask lab`.
#[derive(Debug, Args)]
pub struct LabArgs {
    /// Build and run the release agent (target/release/nat-agent).
    #[arg(long)]
    release: bool,

    /// Stop and remove the lab after this many seconds instead of waiting for Ctrl-C.
    #[arg(long, value_name = "SECS")]
    duration: Option<u64>,

    /// Only remove namespaces left by an earlier demo run, then exit.
    #[arg(long, conflicts_with_all = ["release", "duration", "config", "agent_bin"])]
    down: bool,

    /// Agent configuration [default: deploy/examples/lab.toml in the workspace].
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,

    /// Run this agent binary instead of building nat-agent (it gets `run --config PATH`).
    #[arg(long, value_name = "PATH")]
    agent_bin: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Lab(args) => lab::lab(&args),
        Task::Bench(args) => bench::bench(&args),
        Task::Package(args) => package::package(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
