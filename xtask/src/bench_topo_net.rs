//! The topology of `bench topology`: generator — appliance — sink in three network namespaces,
//! and the two things measured on it: packets arriving at an interface, and CPU time of the
//! appliance's receive threads.
//!
//! ```text
//!  gen                                   nat                          sink
//!  g0 198.18.0.2/24 (DNAT/CPS client) -- n0 198.18.0.1/24
//!     198.18.0.3/24 (one-arm backend)    n1 198.18.1.1/24 ----------- s0 198.18.1.2/24
//!     198.18.0.4/24 (iperf3, SNATed)
//!  gi0 -- gi1 (idle: the generator program stays attached here)
//!                                                                     si0 -- si1 (idle: the
//!                                                                     reply generator's)
//! ```
//! Why it is built this way (BENCHMARKING.md):
//! - **Threaded NAPI.** Every veth runs its receive work in a NAPI kthread: the appliance's
//!   (`n0`, `n1`) pinned to one CPU, the generator's and sink's to the other. All the
//!   appliance does for a packet (XDP, GRO, forwarding, netfilter, handing the frame to the
//!   sink's queue) then runs in the appliance's threads, whose CPU time `schedstat` reports.
//! - **GRO on every veth** gives it NAPI whether or not an XDP program is attached, so frames
//!   sent into it by XDP are received, and switching configurations never deletes the NAPI
//!   threads (which would lose their pinning).
//! - **Static neighbours**: the sink's XDP program drops ARP too.
//! - **Interface names are unique per run** (`xb<pid>`...): the NAPI threads are found by
//!   name (`napi/<dev>-<id>`), and other labs on the machine use `n0`/`n1` too.

use std::{
    fs,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use nat_lab::netns::Netns;

/// Addresses (test ranges only: 198.18.0.0/15 for the networks and inside hosts, 203.0.113.0/24
/// for the SNAT pool).
pub mod addr {
    use std::net::Ipv4Addr;

    /// The generator's address on g0: DNAT clients and the TCP connections client.
    pub const GEN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    /// A second address on g0: the backend of one-arm DNAT (reached back out of n0).
    pub const ONE_ARM_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
    /// A third address on g0: the inside host of the iperf3 flow, under SNAT.
    pub const GEN_SNAT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
    /// The appliance on the generator's network.
    pub const NAT_IN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    /// The appliance on the sink's network.
    pub const NAT_OUT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
    /// The sink (the DNAT backend, the SNAT destination).
    pub const SINK: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
    /// The DNAT VIP (two-arm: onto the sink).
    pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);
    /// The one-arm VIP (onto [`ONE_ARM_BACKEND`], back out of the interface it came in on).
    pub const VIP_ONE_ARM: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 20);
    /// Generated DNAT clients: source addresses counted up from here (198.18.32.0/20).
    pub const DNAT_CLIENTS: Ipv4Addr = Ipv4Addr::new(198, 18, 32, 0);
    /// Generated SNAT inside hosts: counted up from here (198.18.64.0/18).
    pub const SNAT_HOSTS: Ipv4Addr = Ipv4Addr::new(198, 18, 64, 0);
    /// Prefix length of [`SNAT_HOSTS`].
    pub const SNAT_HOSTS_LEN: u8 = 18;
    /// The SNAT pool: 203.0.113.0/26.
    pub const POOL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 0);
    /// Prefix length of [`POOL`] (64 addresses, the most a pool may have).
    pub const POOL_LEN: u8 = 26;
}

/// Real-time priority of the appliance's NAPI threads.
const NAT_PRIORITY: i32 = 50;
/// Real-time priority of the endpoints' NAPI threads (the sinks): above the generator's.
const SINK_PRIORITY: i32 = 60;
/// Real-time priority of the thread that reads the counters: above everything on its CPU.
pub const METER_PRIORITY: i32 = 70;
/// Real-time priority of the generator's thread.
pub const GEN_PRIORITY: i32 = 40;

/// The three namespaces and their interfaces. Dropping it removes everything.
pub struct Topology {
    /// Generator (and TCP clients).
    pub gen: Netns,
    /// The appliance.
    pub nat: Netns,
    /// The sink (and TCP servers).
    pub sink: Netns,
    /// Interface names: g0, gi0 (idle, generator program), gi1, n0, n1, s0, si0 (idle, the
    /// reply generator's program), si1.
    pub dev: Devices,
    /// CPU of the appliance's NAPI threads.
    pub nat_cpu: usize,
    /// CPU of everything else (generator, endpoints, their NAPI threads).
    pub other_cpu: usize,
}

/// The run's interface names (unique per process, see the module docs).
#[derive(Debug, Clone)]
pub struct Devices {
    pub g0: String,
    pub gi0: String,
    pub gi1: String,
    pub n0: String,
    pub n1: String,
    pub s0: String,
    pub si0: String,
    pub si1: String,
}

impl Devices {
    fn new() -> Self {
        // Short enough that `napi/<dev>-` survives the kernel's 15-character thread names.
        let tag = format!("xb{:04x}", std::process::id() & 0xffff);
        let d = |role: &str| format!("{tag}{role}");
        Self {
            g0: d("g0"),
            gi0: d("i0"),
            gi1: d("i1"),
            n0: d("n0"),
            n1: d("n1"),
            s0: d("s0"),
            si0: d("j0"),
            si1: d("j1"),
        }
    }
}

impl Topology {
    /// Builds the topology with the appliance's receive work on `nat_cpu` and the rest on
    /// `other_cpu`.
    pub fn build(nat_cpu: usize, other_cpu: usize) -> Result<Self> {
        let topo = Self {
            gen: Netns::new()?,
            nat: Netns::new()?,
            sink: Netns::new()?,
            dev: Devices::new(),
            nat_cpu,
            other_cpu,
        };
        topo.configure().with_context(|| {
            format!(
                "building the benchmark topology in namespaces {}, {}, {}",
                topo.gen.name(),
                topo.nat.name(),
                topo.sink.name()
            )
        })?;
        Ok(topo)
    }

    fn configure(&self) -> Result<()> {
        let d = &self.dev;
        for ns in [&self.gen, &self.nat, &self.sink] {
            // IPv4 only: no stray IPv6 packets through the appliance or into the counters.
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        veth(&self.gen, &d.g0, &self.nat, &d.n0)?;
        veth(&self.sink, &d.s0, &self.nat, &d.n1)?;
        veth(&self.gen, &d.gi0, &self.gen, &d.gi1)?;
        veth(&self.sink, &d.si0, &self.sink, &d.si1)?;
        let ip = |ns: &Netns, args: &str| -> Result<()> {
            ns.run("ip", args.split(' '))
                .with_context(|| format!("ip {args} in {}", ns.name()))?;
            Ok(())
        };
        for a in [addr::GEN, addr::ONE_ARM_BACKEND, addr::GEN_SNAT] {
            ip(&self.gen, &format!("addr add {a}/24 dev {}", d.g0))?;
        }
        ip(
            &self.nat,
            &format!("addr add {}/24 dev {}", addr::NAT_IN, d.n0),
        )?;
        ip(
            &self.nat,
            &format!("addr add {}/24 dev {}", addr::NAT_OUT, d.n1),
        )?;
        ip(
            &self.sink,
            &format!("addr add {}/24 dev {}", addr::SINK, d.s0),
        )?;

        let nat = &self.nat;
        nat.sysctl("net.ipv4.ip_forward", "1")?;
        for iface in ["all", "default", &d.n0, &d.n1] {
            // Translated and generated sources are not on the interfaces' networks.
            nat.sysctl(&format!("net.ipv4.conf.{iface}.rp_filter"), "0")?;
            // One-arm forwarding goes back out of n0: no ICMP redirects for every packet.
            nat.sysctl(&format!("net.ipv4.conf.{iface}.send_redirects"), "0")?;
        }
        for (ns, dev) in [
            (&self.gen, &d.g0),
            (&self.gen, &d.gi0),
            (&self.gen, &d.gi1),
            (&self.nat, &d.n0),
            (&self.nat, &d.n1),
            (&self.sink, &d.s0),
            (&self.sink, &d.si0),
            (&self.sink, &d.si1),
        ] {
            ip(ns, &format!("link set {dev} up"))?;
            // GRO: NAPI on every veth, with or without an XDP program (see the module docs).
            ns.run("ethtool", ["-K", dev, "gro", "on"])?;
        }
        for (ns, dev) in [(&self.gen, &d.g0), (&self.sink, &d.s0)] {
            // Endpoints send full checksums, as off a wire (TOOLCHAIN.md); a queue keeps TCP
            // from being dropped by veth's default noqueue under load (BENCHMARKING.md).
            ns.run("ethtool", ["-K", dev, "tx", "off"])?;
            ns.run("tc", ["qdisc", "replace", "dev", dev, "root", "pfifo"])?;
        }
        ip(
            &self.gen,
            &format!("route add default via {} dev {}", addr::NAT_IN, d.g0),
        )?;
        ip(
            &self.sink,
            &format!("route add default via {} dev {}", addr::NAT_OUT, d.s0),
        )?;
        ip(
            &self.nat,
            &format!(
                "route add {}/{} via {} dev {}",
                addr::SNAT_HOSTS,
                addr::SNAT_HOSTS_LEN,
                addr::GEN,
                d.n0
            ),
        )?;
        // Static neighbours everywhere: the sinks drop ARP, and XDP's FIB lookup needs them.
        let mac = |ns: &Netns, dev: &str| mac_of(ns, dev);
        let (g0, n0, n1, s0) = (
            mac(&self.gen, &d.g0)?,
            mac(&self.nat, &d.n0)?,
            mac(&self.nat, &d.n1)?,
            mac(&self.sink, &d.s0)?,
        );
        for a in [addr::GEN, addr::ONE_ARM_BACKEND, addr::GEN_SNAT] {
            neigh(&self.nat, a, &g0, &d.n0)?;
        }
        neigh(&self.nat, addr::SINK, &s0, &d.n1)?;
        neigh(&self.gen, addr::NAT_IN, &n0, &d.g0)?;
        neigh(&self.sink, addr::NAT_OUT, &n1, &d.s0)?;

        for (ns, dev) in [
            (&self.gen, &d.g0),
            (&self.gen, &d.gi0),
            (&self.gen, &d.gi1),
            (&self.nat, &d.n0),
            (&self.nat, &d.n1),
            (&self.sink, &d.s0),
            (&self.sink, &d.si0),
            (&self.sink, &d.si1),
        ] {
            ns.run(
                "sh",
                ["-c", &format!("echo 1 > /sys/class/net/{dev}/threaded")],
            )
            .with_context(|| format!("threaded NAPI on {dev}"))?;
        }
        self.pin_napi_threads()
    }

    /// Pins the appliance's NAPI threads to its CPU and the others' to the other CPU, all
    /// real-time: on a shared machine the appliance's threads must get their CPU whenever they
    /// have packets, and the sinks' must preempt the generator (priority above
    /// [`GEN_PRIORITY`]) or frames the appliance forwarded would be lost uncounted at the
    /// sink. Run again before every measurement: cheap, and a re-created thread is caught.
    pub fn pin_napi_threads(&self) -> Result<()> {
        let d = &self.dev;
        for (dev, cpu, priority) in [
            (&d.n0, self.nat_cpu, NAT_PRIORITY),
            (&d.n1, self.nat_cpu, NAT_PRIORITY),
            (&d.g0, self.other_cpu, SINK_PRIORITY),
            (&d.gi0, self.other_cpu, SINK_PRIORITY),
            (&d.gi1, self.other_cpu, SINK_PRIORITY),
            (&d.s0, self.other_cpu, SINK_PRIORITY),
            (&d.si0, self.other_cpu, SINK_PRIORITY),
            (&d.si1, self.other_cpu, SINK_PRIORITY),
        ] {
            let pids = napi_threads(dev)?;
            if pids.is_empty() {
                bail!("no NAPI thread for {dev}: threaded NAPI did not take");
            }
            for pid in pids {
                crate::bench_sys::pin_pid_to_cpu(pid, cpu)
                    .with_context(|| format!("pinning the NAPI thread of {dev}"))?;
                crate::bench_sys::set_fifo(pid, priority)
                    .with_context(|| format!("real-time NAPI thread of {dev}"))?;
            }
        }
        Ok(())
    }

    /// The appliance's NAPI threads (n0's and n1's).
    pub fn nat_threads(&self) -> Result<Vec<i32>> {
        let mut pids = napi_threads(&self.dev.n0)?;
        pids.extend(napi_threads(&self.dev.n1)?);
        Ok(pids)
    }

    /// The ifindex of `dev` in `ns`.
    pub fn ifindex(ns: &Netns, dev: &str) -> Result<u32> {
        let text = ns.run("cat", [format!("/sys/class/net/{dev}/ifindex")])?;
        text.trim()
            .parse()
            .with_context(|| format!("ifindex of {dev}: {text:?}"))
    }

    /// The MAC address of `dev` in `ns`.
    pub fn mac(ns: &Netns, dev: &str) -> Result<[u8; 6]> {
        let text = mac_of(ns, dev)?;
        let mut mac = [0u8; 6];
        let parts: Vec<&str> = text.split(':').collect();
        if parts.len() != 6 {
            bail!("MAC of {dev}: {text:?}");
        }
        for (m, p) in mac.iter_mut().zip(parts) {
            *m = u8::from_str_radix(p, 16).with_context(|| format!("MAC of {dev}: {text:?}"))?;
        }
        Ok(mac)
    }
}

fn veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) -> Result<()> {
    let mut args = vec!["link", "add", a_dev, "type", "veth", "peer", "name", b_dev];
    if a.name() != b.name() {
        args.extend(["netns", b.name()]);
    }
    a.run("ip", &args)
        .with_context(|| format!("veth {a_dev} <-> {b_dev}"))?;
    Ok(())
}

fn mac_of(ns: &Netns, dev: &str) -> Result<String> {
    Ok(ns
        .run("cat", [format!("/sys/class/net/{dev}/address")])?
        .trim()
        .to_owned())
}

fn neigh(ns: &Netns, a: Ipv4Addr, mac: &str, dev: &str) -> Result<()> {
    ns.run(
        "ip",
        [
            "neigh",
            "replace",
            &a.to_string(),
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ],
    )?;
    Ok(())
}

/// Pids of the NAPI kthreads of `dev` (named `napi/<dev>-<napi id>`).
fn napi_threads(dev: &str) -> Result<Vec<i32>> {
    let prefix = format!("napi/{dev}-");
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").context("listing /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(comm) = fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        if comm.trim_end().starts_with(&prefix) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// Nanoseconds `pid` has spent on a CPU (`/proc/<pid>/schedstat`, first field).
fn cpu_ns(pid: i32) -> Result<u64> {
    let path = format!("/proc/{pid}/schedstat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("{path}: {text:?}"))
}

/// `/proc/net/dev` of one namespace, opened once from a thread inside it: procfs ties the
/// file to the opener's namespace, so later reads from any thread see that namespace's
/// interfaces, without a helper process (which would take milliseconds to start on a busy
/// machine, and skew the interval).
struct NetDev {
    file: fs::File,
    dev: String,
}

impl NetDev {
    fn open(ns: &Netns, dev: &str) -> Result<Self> {
        let file = ns.enter(|| {
            fs::File::open("/proc/thread-self/net/dev").context("opening /proc/thread-self/net/dev")
        })?;
        Ok(Self {
            file,
            dev: dev.to_owned(),
        })
    }

    /// `rx_packets` and `rx_bytes` now.
    fn rx(&self) -> Result<(u64, u64)> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; 64 * 1024];
        let mut len = 0;
        loop {
            let n = self.file.read_at(&mut buf[len..], len as u64)?;
            if n == 0 {
                break;
            }
            len += n;
            if len == buf.len() {
                buf.resize(buf.len() * 2, 0);
            }
        }
        let text = String::from_utf8_lossy(&buf[..len]);
        parse_net_dev(&text, &self.dev)
            .ok_or_else(|| anyhow!("no counters for {} in /proc/net/dev:\n{text}", self.dev))
    }
}

/// `(rx_packets, rx_bytes)` of `dev` in the text of `/proc/net/dev`.
fn parse_net_dev(text: &str, dev: &str) -> Option<(u64, u64)> {
    text.lines().find_map(|line| {
        let (name, rest) = line.split_once(':')?;
        if name.trim() != dev {
            return None;
        }
        let mut fields = rest.split_whitespace().map(|f| f.parse::<u64>().ok());
        let bytes = fields.next()??;
        let packets = fields.next()??;
        Some((packets, bytes))
    })
}

/// What the counters said at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    at: Instant,
    /// Packets received at the counted interface.
    pub delivered: u64,
    /// Bytes received there.
    pub delivered_bytes: u64,
    /// CPU time of the appliance's NAPI threads, ns.
    pub nat_cpu_ns: u64,
}

/// Where packets are counted and whose CPU time is the appliance's.
pub struct Meter {
    net_dev: NetDev,
    threads: Vec<i32>,
}

impl Meter {
    /// Counts packets arriving at `dev` in `ns` against the appliance's NAPI threads.
    pub fn new(topo: &Topology, ns: &Netns, dev: &str) -> Result<Self> {
        topo.pin_napi_threads()?;
        Ok(Self {
            net_dev: NetDev::open(ns, dev)?,
            threads: topo.nat_threads()?,
        })
    }

    /// Reads all counters now.
    pub fn read(&self) -> Result<Snapshot> {
        let cpu = || -> Result<u64> { self.threads.iter().map(|&pid| cpu_ns(pid)).sum() };
        let nat_cpu_ns = cpu()?;
        let (delivered, delivered_bytes) = self.net_dev.rx()?;
        Ok(Snapshot {
            at: Instant::now(),
            delivered,
            delivered_bytes,
            nat_cpu_ns,
        })
    }

    /// Reads all counters once `count` more units have been delivered since `start`, or when
    /// `limit` has passed since it, whichever comes first, looking every `poll`.
    pub fn read_when(
        &self,
        start: &Snapshot,
        count: u64,
        limit: Duration,
        poll: Duration,
    ) -> Result<Snapshot> {
        let deadline = start.at + limit;
        loop {
            let now = self.read()?;
            if now.delivered.saturating_sub(start.delivered) >= count || now.at >= deadline {
                return Ok(now);
            }
            std::thread::sleep(poll.min(deadline.saturating_duration_since(now.at)));
        }
    }
}

/// netfilter's connection-tracking limits (`nf_conntrack_max`, `nf_conntrack_buckets`),
/// global to the machine, raised for a benchmark run and put back when it is dropped.
pub struct ConntrackLimits {
    /// `nf_conntrack_max` in force.
    pub max: u64,
    /// `nf_conntrack_buckets` in force.
    pub buckets: u64,
    /// What to put back: (file, value before).
    restore: Vec<(&'static str, u64)>,
}

const CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
const CONNTRACK_BUCKETS: &str = "/proc/sys/net/netfilter/nf_conntrack_buckets";

impl ConntrackLimits {
    /// Raises both limits to at least `entries` (a table that holds them, one bucket per
    /// entry as the kernel sizes it by default), leaving larger values alone. Needs root in
    /// the initial network namespace. What was raised before a failure is put back.
    pub fn at_least(entries: u64) -> Result<Self> {
        let mut limits = Self {
            max: 0,
            buckets: 0,
            restore: Vec::new(),
        };
        limits.buckets = limits.raise(CONNTRACK_BUCKETS, entries)?;
        limits.max = limits.raise(CONNTRACK_MAX, entries)?;
        Ok(limits)
    }

    /// Raises the sysctl at `path` to at least `value`, noting what to put back; returns the
    /// value in force.
    fn raise(&mut self, path: &'static str, value: u64) -> Result<u64> {
        let text = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        let before: u64 = text
            .trim()
            .parse()
            .with_context(|| format!("{path} holds {:?}, not a number", text.trim()))?;
        if value <= before {
            return Ok(before);
        }
        fs::write(path, value.to_string())
            .with_context(|| format!("raising {path} from {before} to {value}"))?;
        self.restore.push((path, before));
        Ok(value)
    }
}

impl Drop for ConntrackLimits {
    fn drop(&mut self) {
        for (path, before) in self.restore.drain(..).rev() {
            if let Err(e) = fs::write(path, before.to_string()) {
                eprintln!("bench: could not put {path} back to {before}: {e}");
            }
        }
    }
}

/// Between two snapshots.
#[derive(Debug, Clone, Copy)]
pub struct Interval {
    /// Seconds of wall time.
    pub secs: f64,
    /// Packets delivered.
    pub delivered: u64,
    /// Bytes delivered.
    pub delivered_bytes: u64,
    /// Appliance CPU time, ns.
    pub nat_cpu_ns: u64,
}

impl Interval {
    /// From `a` to `b`.
    pub fn between(a: &Snapshot, b: &Snapshot) -> Self {
        Self {
            secs: b.at.duration_since(a.at).as_secs_f64(),
            delivered: b.delivered.saturating_sub(a.delivered),
            delivered_bytes: b.delivered_bytes.saturating_sub(a.delivered_bytes),
            nat_cpu_ns: b.nat_cpu_ns.saturating_sub(a.nat_cpu_ns),
        }
    }

    /// Share of one CPU the appliance's threads used, percent.
    pub fn busy_pct(&self) -> f64 {
        100.0 * self.nat_cpu_ns as f64 / (self.secs * 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_lines_parse() {
        let text = "Inter-|   Receive    |  Transmit\n face |bytes    packets errs\n    lo: 10 2 0 0 0 0 0 0 0 0 0 0 0 0 0 0\nxb12s0: 6400 100 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n";
        assert_eq!(parse_net_dev(text, "xb12s0"), Some((100, 6400)));
        assert_eq!(parse_net_dev(text, "lo"), Some((2, 10)));
        assert_eq!(parse_net_dev(text, "xb12"), None);
    }
}
