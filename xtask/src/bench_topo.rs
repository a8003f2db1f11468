//! `cargo xtask bench topology`: the appliance on a real topology (generator — appliance —
//! sink in network namespaces), against netfilter NAT, plain kernel forwarding and a bare XDP
//! redirect forwarder, all measured in the same run.
//!
//! Method (BENCHMARKING.md): what is compared is the appliance's **CPU time per delivered
//! packet** (or connection, or megabyte), not packets per second: the appliance's receive work
//! runs in NAPI threads pinned to one CPU, whose CPU time is read from `schedstat`; packets are
//! counted where they arrive (`rx_packets` of the sink's interface, whose XDP program drops
//! them). Every repetition measures every configuration once (A B C D E, A B C D E, ...), and
//! ratios are taken within a repetition, so a neighbour's burst hits all configurations alike.
//! The generator (XDP live frames) runs on the other CPU and sends far more than the appliance
//! can take, so the appliance is saturated and the rate is its own.
//!
//! `XDPNAT_BENCH_DEBUG=1` prints every packet measurement (frames sent, interval, counts).

use std::{
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Barrier,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use nat_common::{
    bench::{GenConfig, XDP_BENCH_DROP_PROGRAM, XDP_BENCH_REDIRECT_PROGRAM},
    conntrack::{Endpoint, FlowKey},
    route_cache::RouteCacheResult,
    stats::{ForwardResult, Reason},
};
use nat_lab::in_netns;

use crate::{
    bench_packet::{frame_key, udp_frame, udp_key, FRAME_LEN},
    bench_sys,
    bench_topo_net::{
        addr, ConntrackLimits, Interval, Meter, Topology, GEN_PRIORITY, METER_PRIORITY,
    },
    bench_topo_report::{Cell, Plot, TopoReport},
    bench_topo_tcp as tcp,
    bench_topo_xdp::{Appliance, Generator, Object},
    signals::check_interrupted,
};

/// What to measure and how long.
#[derive(Debug, Clone)]
pub struct TopoPlan {
    /// Repetitions.
    pub reps: u32,
    /// Warm-up before each measured interval (sessions created, queues full).
    pub warmup: Duration,
    /// Measured interval of the packet workloads.
    pub interval: Duration,
    /// New flows a new-flow measurement runs until it has delivered (each a session: the
    /// table then holds at least this many), issue 7's "until the table holds at least 1
    /// million sessions".
    pub new_flow_target: u64,
    /// The longest a new-flow measurement may take to get there; one that stops short says
    /// so in its row.
    pub new_flow_time_cap: Duration,
    /// "Many flows" of the established workloads.
    pub many_flows: u32,
    /// Session table capacity of the appliance.
    pub max_sessions: u32,
    /// Bytes per iperf3 run.
    pub iperf_bytes: u64,
    /// Measured interval of the connections-per-second workload.
    pub cps_interval: Duration,
    /// CPU of the appliance's receive threads.
    pub nat_cpu: usize,
    /// CPU of the generator and the endpoints.
    pub other_cpu: usize,
    /// The configurations measured (all of [`Config::ALL`] but when investigating one).
    pub configs: Vec<Config>,
    /// Keys of the workloads measured (empty: all of [`Workload::all`]).
    pub workloads: Vec<String>,
}

/// One of the configurations compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Config {
    /// This appliance, translating and forwarding from XDP (as deployed: with the route cache).
    XdpForward,
    /// The same with `[agent] route_cache = false`: a FIB lookup per packet, as the bare
    /// forwarder does. Shows what the route cache buys, and compares like with like.
    XdpFib,
    /// This appliance, translating and handing packets to the kernel to forward.
    XdpPass,
    /// This appliance's TC twin (`hook = "tc"`, `forwarding = "xdp"`: the skb is redirected
    /// from TC): on a veth it keeps segmentation offload and GRO, so it translates each GRO
    /// super-packet once, where XDP sees every 1500-byte frame.
    TcForward,
    /// nftables NAT with conntrack: the same translation.
    Netfilter,
    /// Plain kernel forwarding, no NAT.
    ForwardOnly,
    /// A bare XDP forwarder (FIB lookup and redirect, no NAT): the ceiling.
    XdpLimit,
}

impl Config {
    /// Every configuration, in the order measured within a repetition.
    pub const ALL: [Config; 7] = [
        Config::XdpForward,
        Config::XdpFib,
        Config::XdpPass,
        Config::TcForward,
        Config::Netfilter,
        Config::ForwardOnly,
        Config::XdpLimit,
    ];

    /// The key printed in the table.
    pub fn key(self) -> &'static str {
        match self {
            Config::XdpForward => "xdp-forward",
            Config::XdpFib => "xdp-fib",
            Config::XdpPass => "xdp-pass",
            Config::TcForward => "tc-forward",
            Config::Netfilter => "netfilter",
            Config::ForwardOnly => "forward-only",
            Config::XdpLimit => "xdp-limit",
        }
    }

    /// Whether it translates (the others are sent to the real addresses).
    pub fn translates(self) -> bool {
        matches!(
            self,
            Config::XdpForward
                | Config::XdpFib
                | Config::XdpPass
                | Config::TcForward
                | Config::Netfilter
        )
    }
}

/// What the generator sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    /// DNAT to the sink, established (stateless rule), `flows` flows.
    Dnat { flows: u32 },
    /// DNAT back out of the interface it came in on (one-arm), one flow.
    DnatOneArm,
    /// SNAT, established sessions, `flows` flows.
    Snat { flows: u32 },
    /// The reply direction of one established SNAT flow: sent from the sink's side to the
    /// flow's external endpoint, delivered to the inside host on the generator's side.
    SnatReply,
    /// SNAT, a new 5-tuple in every packet.
    NewFlows,
}

/// A workload: a row group of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Packets from the generator.
    Udp(Traffic),
    /// iperf3 through SNAT.
    Iperf,
    /// TCP connections per second through DNAT.
    Cps,
}

impl Workload {
    /// The workloads of a plan, in the order measured within a configuration.
    pub fn all(plan: &TopoPlan) -> Vec<Workload> {
        vec![
            Workload::Udp(Traffic::Dnat { flows: 1 }),
            Workload::Udp(Traffic::Dnat {
                flows: plan.many_flows,
            }),
            Workload::Udp(Traffic::DnatOneArm),
            Workload::Udp(Traffic::Snat { flows: 1 }),
            Workload::Udp(Traffic::Snat {
                flows: plan.many_flows,
            }),
            Workload::Udp(Traffic::SnatReply),
            Workload::Udp(Traffic::NewFlows),
            Workload::Iperf,
            Workload::Cps,
        ]
    }

    /// The workloads `plan.workloads` names (all when it names none); an unknown key is an
    /// error naming the known ones.
    pub fn selected(plan: &TopoPlan) -> Result<Vec<Workload>> {
        let all = Workload::all(plan);
        if plan.workloads.is_empty() {
            return Ok(all);
        }
        let mut chosen = Vec::new();
        for key in &plan.workloads {
            match all.iter().find(|w| &w.key() == key) {
                Some(w) => chosen.push(*w),
                None => bail!(
                    "--workloads {key}: not a workload (one of {})",
                    all.iter().map(|w| w.key()).collect::<Vec<_>>().join(", ")
                ),
            }
        }
        Ok(chosen)
    }

    /// The key printed in the table.
    pub fn key(self) -> String {
        match self {
            Workload::Udp(Traffic::Dnat { flows }) => format!("dnat-{}", flow_name(flows)),
            Workload::Udp(Traffic::DnatOneArm) => "dnat-one-arm".into(),
            Workload::Udp(Traffic::Snat { flows }) => format!("snat-{}", flow_name(flows)),
            Workload::Udp(Traffic::SnatReply) => "snat-reply".into(),
            Workload::Udp(Traffic::NewFlows) => "new-flows".into(),
            Workload::Iperf => "tcp-iperf3".into(),
            Workload::Cps => "tcp-cps".into(),
        }
    }

    /// What it is, for the table's legend.
    pub fn label(self) -> String {
        match self {
            Workload::Udp(Traffic::Dnat { flows }) => {
                format!("DNAT (stateless rule), established, {flows} UDP flow(s), 64-byte frames")
            }
            Workload::Udp(Traffic::DnatOneArm) => {
                "DNAT one-arm: out of the interface it came in on (XDP_TX), 1 UDP flow".into()
            }
            Workload::Udp(Traffic::Snat { flows }) => {
                format!("SNAT, established sessions, {flows} UDP flow(s), 64-byte frames")
            }
            Workload::Udp(Traffic::SnatReply) => {
                "SNAT reply direction (server to the external endpoint, delivered to the inside \
                 host), 1 established UDP flow, 64-byte frames"
                    .into()
            }
            Workload::Udp(Traffic::NewFlows) => {
                "SNAT, a new UDP 5-tuple in every packet (a session and a port per packet)".into()
            }
            Workload::Iperf => "one iperf3 TCP stream through SNAT (bulk, MTU 1500)".into(),
            Workload::Cps => "TCP connections through DNAT: connect, then close with RST".into(),
        }
    }

    /// The unit of the cost column.
    pub fn unit(self) -> &'static str {
        match self {
            Workload::Udp(Traffic::NewFlows) => "ns/flow",
            Workload::Udp(_) => "ns/pkt",
            Workload::Iperf => "ns/MB",
            Workload::Cps => "ns/conn",
        }
    }

    /// The unit of the rate column.
    pub fn rate_unit(self) -> &'static str {
        match self {
            Workload::Udp(Traffic::NewFlows) => "flows/s",
            Workload::Udp(_) => "pkt/s",
            Workload::Iperf => "Gbit/s",
            Workload::Cps => "conn/s",
        }
    }
}

fn flow_name(flows: u32) -> String {
    if flows == 1 {
        "1flow".into()
    } else if flows >= 1024 && flows.is_multiple_of(1024) {
        format!("{}kflows", flows / 1024)
    } else {
        format!("{flows}flows")
    }
}

/// The appliance's config: both arms, DNAT onto the sink and onto the one-arm backend, SNAT of
/// the generated inside hosts and of the iperf3 host into a 64-address pool.
/// The appliance's config: the interfaces attached at `hook` (`xdp`, native mode, or `tc`)
/// with `forwarding`, and the rules every workload uses.
fn appliance_config(plan: &TopoPlan, topo: &Topology, hook: &str, forwarding: &str) -> String {
    let d = &topo.dev;
    let attach = match hook {
        "tc" => "hook = \"tc\"",
        _ => "xdp_mode = \"native\"",
    };
    format!(
        r#"
[[interfaces]]
name = "{n0}"
{attach}
forwarding = "{forwarding}"

[[interfaces]]
name = "{n1}"
{attach}
forwarding = "{forwarding}"

[conntrack]
max_sessions = {max_sessions}

[[dnat]]
id = 1
name = "vip-udp"
destination = "{vip}"
protocol = "udp"
port = 53
to_address = "{sink}"
to_port = 53

[[dnat]]
id = 2
name = "vip-tcp"
destination = "{vip}"
protocol = "tcp"
port = 80
to_address = "{sink}"
to_port = 80

[[dnat]]
id = 3
name = "vip-one-arm"
destination = "{vip1}"
protocol = "udp"
port = 53
to_address = "{one_arm}"
to_port = 53

[[snat]]
id = 10
name = "inside-hosts"
source = "{hosts}/{hosts_len}"
to_address = "{pool}/{pool_len}"

[[snat]]
id = 11
name = "iperf-host"
source = "{iperf}"
to_address = "{pool}/{pool_len}"
"#,
        n0 = d.n0,
        n1 = d.n1,
        max_sessions = plan.max_sessions,
        vip = addr::VIP,
        vip1 = addr::VIP_ONE_ARM,
        sink = addr::SINK,
        one_arm = addr::ONE_ARM_BACKEND,
        hosts = addr::SNAT_HOSTS,
        hosts_len = addr::SNAT_HOSTS_LEN,
        pool = addr::POOL,
        pool_len = addr::POOL_LEN,
        iperf = addr::GEN_SNAT,
    )
}

/// The same translation in nftables (DNAT in prerouting, SNAT in postrouting; conntrack).
fn nft_ruleset(topo: &Topology) -> String {
    let pool_last = Ipv4Addr::from(u32::from(addr::POOL) + (1 << (32 - addr::POOL_LEN)) - 1);
    format!(
        r#"table ip {table} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {vip} udp dport 53 dnat to {sink}:53
        ip daddr {vip} tcp dport 80 dnat to {sink}:80
        ip daddr {vip1} udp dport 53 dnat to {one_arm}:53
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {{ {hosts}/{hosts_len}, {iperf} }} oifname "{n1}" snat to {pool}-{pool_last}
    }}
}}
"#,
        table = NFT_TABLE,
        vip = addr::VIP,
        vip1 = addr::VIP_ONE_ARM,
        sink = addr::SINK,
        one_arm = addr::ONE_ARM_BACKEND,
        hosts = addr::SNAT_HOSTS,
        hosts_len = addr::SNAT_HOSTS_LEN,
        iperf = addr::GEN_SNAT,
        n1 = topo.dev.n1,
        pool = addr::POOL,
    )
}

const NFT_TABLE: &str = "xdpnat_bench";

/// Everything loaded for the run.
struct Bench<'t> {
    plan: TopoPlan,
    topo: &'t Topology,
    gen: Generator,
    /// The generator of reply traffic, in the sink's namespace, sending out of s0.
    reply_gen: Generator,
    /// Drop programs on g0 (one-arm sink) and in the sink namespace on s0.
    gen_drop: Object,
    sink_drop: Object,
    /// The bare forwarder, in the appliance's namespace.
    limit: Object,
    forward: Appliance,
    /// `forward` without the route cache.
    fib: Appliance,
    pass: Appliance,
    tc: Appliance,
    nft_file: std::path::PathBuf,
    nft_on: bool,
    g0_mac: [u8; 6],
    n0_mac: [u8; 6],
    s0_mac: [u8; 6],
    n1_mac: [u8; 6],
    /// Flow number the next new-flow run starts at (tuples are never reused in a run).
    next_flow: u64,
}

impl<'t> Bench<'t> {
    fn setup(plan: &TopoPlan, topo: &'t Topology) -> Result<Self> {
        let d = &topo.dev;
        let g0_index = Topology::ifindex(&topo.gen, &d.g0)?;
        eprintln!("bench: loading the generator, the sinks and the bare forwarder");
        let gen = Generator::new(topo.gen.name(), &d.gi0, g0_index)?;
        let s0_index = Topology::ifindex(&topo.sink, &d.s0)?;
        let reply_gen = Generator::new(topo.sink.name(), &d.si0, s0_index)?;
        let gen_drop = Object::load(topo.gen.name())?;
        let sink_drop = Object::load(topo.sink.name())?;
        let limit = Object::load(topo.nat.name())?;
        eprintln!(
            "bench: loading the appliance four times (XDP forwarding with and without the \
             route cache, XDP passing to the kernel, TC forwarding), {} sessions each",
            plan.max_sessions
        );
        let forward = Appliance::load(
            topo.nat.name(),
            "xdp-forward",
            &appliance_config(plan, topo, "xdp", "xdp"),
        )?;
        let fib = Appliance::load(
            topo.nat.name(),
            "xdp-fib",
            &format!(
                "[agent]\nroute_cache = false\n{}",
                appliance_config(plan, topo, "xdp", "xdp")
            ),
        )?;
        let pass = Appliance::load(
            topo.nat.name(),
            "xdp-pass",
            &appliance_config(plan, topo, "xdp", "kernel"),
        )?;
        let tc = Appliance::load(
            topo.nat.name(),
            "tc-forward",
            &appliance_config(plan, topo, "tc", "xdp"),
        )?;
        let nft_file =
            std::env::temp_dir().join(format!("xdpnat-bench-{}.nft", std::process::id()));
        std::fs::write(&nft_file, nft_ruleset(topo))
            .with_context(|| format!("writing {}", nft_file.display()))?;
        let bench = Self {
            plan: plan.clone(),
            topo,
            gen,
            reply_gen,
            gen_drop,
            sink_drop,
            limit,
            forward,
            fib,
            pass,
            tc,
            nft_file,
            nft_on: false,
            g0_mac: Topology::mac(&topo.gen, &d.g0)?,
            n0_mac: Topology::mac(&topo.nat, &d.n0)?,
            s0_mac: Topology::mac(&topo.sink, &d.s0)?,
            n1_mac: Topology::mac(&topo.nat, &d.n1)?,
            next_flow: 0,
        };
        Ok(bench)
    }

    /// Takes every configuration off the appliance.
    fn clear_config(&mut self) -> Result<()> {
        self.forward.detach()?;
        self.fib.detach()?;
        self.pass.detach()?;
        self.tc.detach()?;
        self.limit.detach_all()?;
        if self.nft_on {
            self.topo
                .nat
                .run("nft", ["delete", "table", "ip", NFT_TABLE])?;
            self.nft_on = false;
        }
        Ok(())
    }

    /// Puts `config` on the appliance (alone).
    fn enter(&mut self, config: Config) -> Result<()> {
        self.clear_config()?;
        let d = &self.topo.dev;
        match config {
            Config::XdpForward => self.forward.attach()?,
            Config::XdpFib => self.fib.attach()?,
            Config::XdpPass => self.pass.attach()?,
            Config::TcForward => self.tc.attach()?,
            Config::Netfilter => {
                let file = self.nft_file.to_string_lossy().into_owned();
                self.topo.nat.run("nft", ["-f", &file])?;
                self.nft_on = true;
                flush_conntrack(self.topo)?;
            }
            Config::ForwardOnly => {}
            Config::XdpLimit => {
                let (n0, n1) = (d.n0.clone(), d.n1.clone());
                self.limit.attach(XDP_BENCH_REDIRECT_PROGRAM, &n0)?;
                self.limit.attach(XDP_BENCH_REDIRECT_PROGRAM, &n1)?;
            }
        }
        crate::bench_topo_xdp::settle();
        Ok(())
    }

    /// Sinks that drop (packet workloads) or endpoints with a stack (TCP workloads).
    fn sinks_drop(&mut self, on: bool) -> Result<()> {
        self.gen_drop.detach_all()?;
        self.sink_drop.detach_all()?;
        if on {
            let d = &self.topo.dev;
            let (g0, s0) = (d.g0.clone(), d.s0.clone());
            self.gen_drop.attach(XDP_BENCH_DROP_PROGRAM, &g0)?;
            self.sink_drop.attach(XDP_BENCH_DROP_PROGRAM, &s0)?;
        }
        crate::bench_topo_xdp::settle();
        Ok(())
    }

    /// The generator's config for `traffic` through `config`.
    fn gen_config(&self, config: Config, traffic: Traffic) -> GenConfig {
        let nat = config.translates();
        let (src, sport, dst, flows, hosts) = match traffic {
            Traffic::Dnat { flows } => (
                addr::DNAT_CLIENTS,
                1024,
                if nat { addr::VIP } else { addr::SINK },
                flows,
                flows.clamp(1, 256),
            ),
            Traffic::DnatOneArm => (
                addr::DNAT_CLIENTS,
                1024,
                if nat {
                    addr::VIP_ONE_ARM
                } else {
                    addr::ONE_ARM_BACKEND
                },
                1,
                1,
            ),
            Traffic::Snat { flows } => (
                addr::SNAT_HOSTS,
                1024,
                addr::SINK,
                flows,
                flows.clamp(1, 256),
            ),
            // Hosts first, then ports: 4096 hosts spread over the pool's 64 addresses, each
            // with fresh inside ports, so every packet needs a new mapping and port.
            Traffic::NewFlows => (addr::SNAT_HOSTS, 1024, addr::SINK, 0, NEW_FLOW_HOSTS),
            // The generator's part in the reply workload: the one flow whose replies the reply
            // generator sends (`reply_config`).
            Traffic::SnatReply => (addr::SNAT_HOSTS, 1024, addr::SINK, 1, 1),
        };
        let key = udp_key(src.octets(), sport, dst.octets(), 53);
        GenConfig {
            frame: ethernet_frame(&key, self.n0_mac, self.g0_mac),
            flows,
            hosts,
            first: self.next_flow,
        }
    }

    /// The reply generator's config for `config`: frames from the sink's port 53 to where the
    /// replies of the SNAT flow of [`Traffic::Snat`] with one flow go. The flow is started
    /// first (a few frames from the generator), and its external endpoint read back from the
    /// appliance that translated it (its `MAPPINGS`, or netfilter's conntrack table); without
    /// translation the replies go to the inside host itself.
    fn reply_config(&mut self, config: Config) -> Result<GenConfig> {
        let start = self.gen_config(config, Traffic::SnatReply);
        let inside = frame_key(&start.frame)?.source();
        self.gen.configure(&start)?;
        let (gen, gen_ns, other_cpu) = (&self.gen, self.topo.gen.name(), self.plan.other_cpu);
        let stop = AtomicBool::new(false);
        // Bounded: 64 frames, or one second.
        in_netns(gen_ns, || {
            bench_sys::pin_to_cpu(other_cpu)?;
            gen.run(
                &start.frame,
                &stop,
                Instant::now() + Duration::from_secs(1),
                64,
            )
        })
        .context("starting the SNAT flow whose replies are measured")?;
        crate::bench_topo_xdp::settle();
        let to = if let Some(app) = self.appliance_mut(config) {
            app.external_of(&inside)?.ok_or_else(|| {
                anyhow!(
                    "{}: no mapping for the SNAT flow after 64 frames",
                    config.key()
                )
            })?
        } else if config == Config::Netfilter {
            netfilter_reply_destination(self.topo, &inside)?
        } else {
            inside
        };
        let key = udp_key(
            addr::SINK.octets(),
            53,
            to.addr,
            u16::from_be_bytes(to.port),
        );
        Ok(GenConfig {
            frame: ethernet_frame(&key, self.n1_mac, self.s0_mac),
            flows: 1,
            hosts: 1,
            first: 0,
        })
    }

    /// One measurement of a packet workload in the configuration in force.
    fn measure_udp(&mut self, config: Config, traffic: Traffic) -> Result<Measured> {
        let one_arm = traffic == Traffic::DnatOneArm;
        let reply = traffic == Traffic::SnatReply;
        let new_flows = traffic == Traffic::NewFlows;
        let cfg = if reply {
            let cfg = self.reply_config(config)?;
            self.reply_gen.configure(&cfg)?;
            cfg
        } else {
            let cfg = self.gen_config(config, traffic);
            self.gen.configure(&cfg)?;
            cfg
        };
        let topo = self.topo;
        // Where the traffic is delivered, and where it comes from.
        let (count_ns, count_dev) = if one_arm || reply {
            (&topo.gen, topo.dev.g0.as_str())
        } else {
            (&topo.sink, topo.dev.s0.as_str())
        };
        let (gen, gen_ns) = if reply {
            (&self.reply_gen, topo.sink.name())
        } else {
            (&self.gen, topo.gen.name())
        };
        let meter = Meter::new(topo, count_ns, count_dev)?;
        // A new-flow measurement ends on a count (the table holding its target), the others on
        // time; both are bounded in time.
        let (interval, until) = if new_flows {
            (self.plan.new_flow_time_cap, Some(self.plan.new_flow_target))
        } else {
            (self.plan.interval, None)
        };
        // New flows fill the table from the first packet on: no more warm-up than it takes
        // the queues to fill, so the table holds the whole measurement.
        let warmup = if new_flows {
            self.plan.warmup.min(NEW_FLOW_WARMUP)
        } else {
            self.plan.warmup
        };
        let reasons_before = self.appliance(config).map(|a| a.reasons()).transpose()?;
        let forward_before = self
            .appliance(config)
            .map(|a| a.forward_results())
            .transpose()?;
        let route_before = self
            .appliance(config)
            .map(|a| a.route_cache_results())
            .transpose()?;
        let sent_before = gen.sent()?;
        let stop = AtomicBool::new(false);
        let budget = warmup + interval + Duration::from_secs(2);
        // Far above what the generator can send in the time: the time bounds the run, the count
        // bounds it too should the clock misbehave.
        let max_frames = (GEN_MAX_RATE * budget.as_secs_f64()) as u64;
        let frame = cfg.frame;
        let other_cpu = self.plan.other_cpu;
        // Both threads are real-time on the generator's CPU, and the appliance's threads
        // saturate the other: an ordinary thread could wait up to the kernel's real-time
        // throttling period for a CPU. So the measuring thread (above the generator) takes
        // its priority before the generator starts (the barrier) and stops it itself.
        let ready = Barrier::new(2);
        let (a, b, sent) = thread::scope(|s| -> Result<_> {
            let worker = s.spawn(|| {
                in_netns(gen_ns, || {
                    let prepared = bench_sys::pin_to_cpu(other_cpu)
                        .and_then(|()| bench_sys::set_fifo(0, GEN_PRIORITY));
                    ready.wait();
                    prepared?;
                    gen.run(&frame, &stop, Instant::now() + budget, max_frames)
                })
            });
            let measured = s
                .spawn(|| -> Result<_> {
                    let prepared = bench_sys::pin_to_cpu(other_cpu)
                        .and_then(|()| bench_sys::set_fifo(0, METER_PRIORITY));
                    ready.wait();
                    let result = prepared.and_then(|()| {
                        thread::sleep(warmup);
                        let a = meter.read()?;
                        let b = match until {
                            None => {
                                thread::sleep(interval);
                                meter.read()?
                            }
                            Some(target) => meter.read_when(&a, target, interval, NEW_FLOW_POLL)?,
                        };
                        Ok((a, b))
                    });
                    stop.store(true, Ordering::Relaxed);
                    result
                })
                .join()
                .expect("measuring thread panicked");
            stop.store(true, Ordering::Relaxed);
            let sent = worker.join().expect("generator thread panicked")?;
            let (a, b) = measured?;
            Ok((a, b, sent))
        })?;
        let iv = Interval::between(&a, &b);
        if std::env::var_os("XDPNAT_BENCH_DEBUG").is_some() {
            eprintln!(
                "bench: {} {}: {sent} frames sent, {:?} measured, {} delivered, {} ns CPU",
                Workload::Udp(traffic).key(),
                config.key(),
                iv.secs,
                iv.delivered,
                iv.nat_cpu_ns
            );
        }
        if iv.delivered == 0 {
            let reasons = match (self.appliance(config), &reasons_before) {
                (Some(app), Some(before)) => {
                    let after = app.reasons()?;
                    let moved: Vec<(Reason, u64)> = Reason::ALL
                        .iter()
                        .map(|&r| (r, after[r as usize] - before[r as usize]))
                        .filter(|&(_, n)| n > 0)
                        .collect();
                    format!("; the appliance's exit reasons: {moved:?}")
                }
                _ => String::new(),
            };
            bail!(
                "{} through {}: nothing arrived at {count_dev} ({sent} frames sent{reasons})",
                Workload::Udp(traffic).key(),
                config.key()
            );
        }
        let mut note = String::new();
        if let (Some(app), Some(before)) = (self.appliance(config), reasons_before) {
            // The appliance must really have translated what arrived (not merely forwarded).
            let after = app.reasons()?;
            let delta = |r: Reason| after[r as usize] - before[r as usize];
            let translated = delta(Reason::DnatTranslated)
                + delta(Reason::SessionOrig)
                + delta(Reason::SessionReply)
                + delta(Reason::SessionNew);
            let total: u64 = after.iter().sum::<u64>() - before.iter().sum::<u64>();
            if translated < total * 9 / 10 {
                bail!(
                    "{} through {}: only {translated} of {total} packets were translated",
                    Workload::Udp(traffic).key(),
                    config.key()
                );
            }
            // And xdp-forward must have sent them from XDP (tc-forward from TC), not left them
            // to the kernel; with the route cache answering (xdp-forward, tc-forward: these
            // packets are no GSO super-packets) or never (xdp-fib), as configured.
            if let (Config::XdpForward | Config::XdpFib | Config::TcForward, Some(fb), Some(rb)) =
                (config, forward_before, route_before)
            {
                let fa = app.forward_results()?;
                let d = |r: ForwardResult| fa[r as usize] - fb[r as usize];
                let from_xdp = d(ForwardResult::Redirected) + d(ForwardResult::Transmitted);
                if from_xdp < translated * 9 / 10 {
                    bail!(
                        "{} through {}: only {from_xdp} of {translated} translated packets left \
                         from XDP (forward results {fa:?})",
                        Workload::Udp(traffic).key(),
                        config.key()
                    );
                }
                let ra = app.route_cache_results()?;
                let hits = ra[RouteCacheResult::Hit as usize] - rb[RouteCacheResult::Hit as usize];
                let cached_as_configured = match config {
                    Config::XdpForward | Config::TcForward => hits >= from_xdp * 9 / 10,
                    _ => hits == 0,
                };
                if !cached_as_configured {
                    bail!(
                        "{} through {}: the route cache answered {hits} of {from_xdp} packets \
                         sent from XDP",
                        Workload::Udp(traffic).key(),
                        config.key()
                    );
                }
            }
            if new_flows && total > translated {
                note = format!(
                    "{} refused (table full or no free port)",
                    total - translated
                );
            }
        }
        if let Some(target) = until.filter(|&t| iv.delivered < t) {
            let short = format!(
                "stopped at {} of {target} new flows after {:.1} s",
                iv.delivered, iv.secs
            );
            note = if note.is_empty() {
                short
            } else {
                format!("{note}; {short}")
            };
        }
        if new_flows {
            self.next_flow += self.gen.sent()? - sent_before;
            self.reset_flows(config)?;
        }
        Ok(Measured {
            iv,
            units: iv.delivered as f64,
            note,
        })
    }

    fn appliance(&self, config: Config) -> Option<&Appliance> {
        match config {
            Config::XdpForward => Some(&self.forward),
            Config::XdpFib => Some(&self.fib),
            Config::XdpPass => Some(&self.pass),
            Config::TcForward => Some(&self.tc),
            _ => None,
        }
    }

    fn appliance_mut(&mut self, config: Config) -> Option<&mut Appliance> {
        match config {
            Config::XdpForward => Some(&mut self.forward),
            Config::XdpFib => Some(&mut self.fib),
            Config::XdpPass => Some(&mut self.pass),
            Config::TcForward => Some(&mut self.tc),
            _ => None,
        }
    }

    /// Empties the connection tables after a new-flow run, so every run starts alike.
    fn reset_flows(&mut self, config: Config) -> Result<()> {
        if let Some(app) = self.appliance_mut(config) {
            app.clear_sessions()?;
        } else if config == Config::Netfilter {
            flush_conntrack(self.topo)?;
        }
        Ok(())
    }

    fn measure(&mut self, config: Config, workload: Workload) -> Result<Measured> {
        match workload {
            Workload::Udp(traffic) => self.measure_udp(config, traffic),
            Workload::Iperf => tcp::iperf(self.topo, config, self.plan.iperf_bytes),
            Workload::Cps => tcp::cps(self.topo, config, self.plan.cps_interval),
        }
    }
}

/// How often a new-flow measurement looks whether it has reached its count.
const NEW_FLOW_POLL: Duration = Duration::from_millis(10);
/// Warm-up of a new-flow measurement at most.
const NEW_FLOW_WARMUP: Duration = Duration::from_millis(10);
/// 4096 inside hosts for new flows (in 198.18.64.0/18).
const NEW_FLOW_HOSTS: u32 = 4096;
/// Frames per second the generator is assumed never to exceed (for its frame cap).
const GEN_MAX_RATE: f64 = 40e6;

/// The [`FRAME_LEN`]-byte frame carrying `key` from `src_mac` to `dst_mac`.
fn ethernet_frame(key: &FlowKey, dst_mac: [u8; 6], src_mac: [u8; 6]) -> [u8; FRAME_LEN] {
    let mut frame = [0u8; FRAME_LEN];
    frame.copy_from_slice(&udp_frame(key));
    frame[0..6].copy_from_slice(&dst_mac);
    frame[6..12].copy_from_slice(&src_mac);
    frame
}

/// Where netfilter sends the replies of the UDP flow from `inside` to the sink: the reply
/// tuple's destination in the appliance's conntrack table.
fn netfilter_reply_destination(topo: &Topology, inside: &Endpoint) -> Result<Endpoint> {
    let (addr, port) = (Ipv4Addr::from(inside.addr), u16::from_be_bytes(inside.port));
    let table = topo
        .nat
        .run(
            "conntrack",
            ["-L", "-p", "udp", "--orig-src", &addr.to_string()],
        )
        .context("reading netfilter's conntrack table")?;
    // `udp 17 29 src=I dst=S sport=1024 dport=53 [UNREPLIED] src=S dst=E sport=53 dport=P ...`:
    // the second dst= and dport= are the reply's.
    let sport = format!("sport={port} ");
    for line in table.lines().filter(|l| l.contains(&sport)) {
        let field = |name: &str| -> Vec<&str> {
            line.split_whitespace()
                .filter_map(|w| w.strip_prefix(name))
                .collect()
        };
        let (dsts, dports) = (field("dst="), field("dport="));
        if let (Some(dst), Some(dport)) = (dsts.get(1), dports.get(1)) {
            let dst: Ipv4Addr = dst
                .parse()
                .with_context(|| format!("conntrack's reply address in {line:?}"))?;
            let dport: u16 = dport
                .parse()
                .with_context(|| format!("conntrack's reply port in {line:?}"))?;
            return Ok(Endpoint {
                addr: dst.octets(),
                port: dport.to_be_bytes(),
                proto: inside.proto,
                _pad: 0,
            });
        }
    }
    bail!("netfilter has no conntrack entry for {addr}:{port} (conntrack -L said {table:?})")
}

/// Empties the appliance namespace's conntrack table (`conntrack -F`).
fn flush_conntrack(topo: &Topology) -> Result<()> {
    match topo.nat.run("conntrack", ["-F"]) {
        Ok(_) => Ok(()),
        // An empty table is reported as an error by some versions.
        Err(e) if format!("{e:#}").contains("0 flow entries") => Ok(()),
        Err(e) => Err(e).context("flushing conntrack in the appliance's namespace"),
    }
}

/// One measurement: what was delivered, in the workload's unit, over an interval.
pub struct Measured {
    /// Counters over the measured interval.
    pub iv: Interval,
    /// Units delivered (packets, new flows, megabytes, connections).
    pub units: f64,
    /// Anything unusual.
    pub note: String,
}

/// Runs the benchmark.
pub fn run(plan: &TopoPlan, machine: Vec<(String, String)>) -> Result<TopoReport> {
    // netfilter's table must hold what a new-flow run fills it to, like the appliance's. Its
    // limits are global to the machine: raised for the run, put back when it ends.
    let conntrack = ConntrackLimits::at_least(u64::from(plan.max_sessions))?;
    let topo = Topology::build(plan.nat_cpu, plan.other_cpu)?;
    let mut bench = Bench::setup(plan, &topo)?;
    let workloads = Workload::selected(plan)?;
    let mut cells: Vec<Cell> = Vec::new();
    for w in &workloads {
        for &c in &plan.configs {
            cells.push(Cell::new(*w, c));
        }
    }
    let result = (|| -> Result<()> {
        for rep in 0..plan.reps {
            eprintln!("bench: repetition {} of {}", rep + 1, plan.reps);
            for &config in &plan.configs {
                check_interrupted()?;
                bench.enter(config)?;
                let mut drop_on = None;
                for w in &workloads {
                    let udp = matches!(w, Workload::Udp(_));
                    if drop_on != Some(udp) {
                        bench.sinks_drop(udp)?;
                        drop_on = Some(udp);
                    }
                    let m = bench
                        .measure(config, *w)
                        .with_context(|| format!("{} through {}", w.key(), config.key()))?;
                    let cell = cells
                        .iter_mut()
                        .find(|c| c.workload == *w && c.config == config)
                        .expect("every cell exists");
                    cell.push(&m, *w);
                }
            }
            // Ratios within the repetition just measured.
            for w in &workloads {
                let cost = |c: Config| {
                    cells
                        .iter()
                        .find(|x| x.workload == *w && x.config == c)
                        .and_then(|x| x.cost.last().copied())
                };
                let (nf, limit) = (cost(Config::Netfilter), cost(Config::XdpLimit));
                for cell in cells.iter_mut().filter(|x| x.workload == *w) {
                    let own = cell.cost.last().copied();
                    if let (Some(own), Some(nf)) = (own, nf) {
                        cell.vs_netfilter.push(own / nf);
                    }
                    if let (Some(own), Some(limit)) = (own, limit) {
                        cell.vs_limit.push(own / limit);
                    }
                }
            }
        }
        Ok(())
    })();
    // Off the interfaces before anything is dropped, whatever happened.
    let _ = bench.clear_config();
    let _ = bench.sinks_drop(false);
    let _ = std::fs::remove_file(&bench.nft_file);
    result?;
    let labels = workloads
        .iter()
        .map(|w| (w.key(), w.label(), w.unit(), w.rate_unit()))
        .collect();
    let settings = format!(
        "{} repetitions, configurations alternated within each; per measurement {:.0} ms \
         warm-up, {:.0} ms measured (new flows: until {} have arrived, at most {:.0} s), {} \
         flows for \"many\", iperf3 {} MB per run, {:.0} ms of connections; appliance NAPI \
         threads on CPU {}, generator and endpoints on CPU {}; session table {} (XDP), \
         conntrack max {} and buckets {} (global, during the run)",
        plan.reps,
        plan.warmup.as_secs_f64() * 1e3,
        plan.interval.as_secs_f64() * 1e3,
        plan.new_flow_target,
        plan.new_flow_time_cap.as_secs_f64(),
        plan.many_flows,
        plan.iperf_bytes / 1_000_000,
        plan.cps_interval.as_secs_f64() * 1e3,
        plan.nat_cpu,
        plan.other_cpu,
        plan.max_sessions,
        conntrack.max,
        conntrack.buckets,
    );
    Ok(TopoReport::new(
        machine,
        settings,
        labels,
        cells,
        Plot::default(),
    ))
}
