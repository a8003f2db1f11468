//! The socket workloads of `bench topology`, where a real TCP stack is the point: bulk
//! throughput with iperf3 through SNAT, and connections per second through DNAT. The
//! generator and sinks' XDP programs are off for these (the endpoints need their stacks);
//! clients and servers run on the generator's CPU, the appliance's work is measured as for
//! packets: CPU time of its NAPI threads per megabyte or per connection.

use std::{
    collections::VecDeque,
    io,
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nat_lab::{in_netns, wait_tcp_ports, SpawnOptions};

use crate::{
    bench_sys,
    bench_topo::{Config, Measured},
    bench_topo_net::{addr, Interval, Meter, Topology},
};

const IPERF_PORT: u16 = 5201;
const CPS_PORT: u16 = 80;
/// Most connections one measurement makes, whatever the clock says.
const CPS_MAX: u64 = 2_000_000;
/// Accepted connections the CPS server keeps before dropping them (see `cps`).
const HELD_CONNECTIONS: usize = 4096;

/// One iperf3 stream of `bytes` from the SNATed inside host to the sink.
pub fn iperf(topo: &Topology, _config: Config, bytes: u64) -> Result<Measured> {
    let cpu = topo.other_cpu.to_string();
    let sink = addr::SINK.to_string();
    let port = IPERF_PORT.to_string();
    let _server = topo.sink.spawn(
        "taskset",
        ["-c", &cpu, "iperf3", "-s", "-p", &port],
        SpawnOptions::new("iperf3 server"),
    )?;
    wait_tcp_ports(topo.sink.name(), &[IPERF_PORT], Duration::from_secs(10))?;
    let meter = Meter::new(topo, &topo.sink, &topo.dev.s0)?;
    let a = meter.read()?;
    topo.gen
        .run(
            "taskset",
            [
                "-c",
                &cpu,
                "iperf3",
                "-c",
                &sink,
                "-B",
                &addr::GEN_SNAT.to_string(),
                "-p",
                &port,
                "-n",
                &bytes.to_string(),
            ],
        )
        .context("iperf3 client")?;
    let b = meter.read()?;
    let iv = Interval::between(&a, &b);
    // iperf3 ends the test when the client has written its bytes, some still in flight: the
    // cost is taken over what arrived, which must be most of it.
    if iv.delivered_bytes < bytes / 2 {
        bail!(
            "iperf3: only {} of {bytes} bytes arrived at the sink",
            iv.delivered_bytes
        );
    }
    Ok(Measured {
        iv,
        units: iv.delivered_bytes as f64 / 1e6,
        note: String::new(),
    })
}

/// Closes with RST (SO_LINGER 0): no TIME_WAIT, so a client can open connections at full rate
/// for as long as the measurement lasts without running out of ports.
fn linger_zero(stream: &TcpStream) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized linger value for the call's duration.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Accept-queue room the CPS server asks for (the namespace's `somaxconn`, 4096 by default,
/// caps it).
const CPS_BACKLOG: i32 = 4096;

/// Gives `listener` a longer accept queue than the 128 the standard library listens with. At
/// ~10k connections per second a server thread that is off the CPU for a dozen milliseconds
/// lets 128 fill: the kernel then drops a SYN (`ListenOverflows` in the sink's namespace), and
/// the client's connect times out (500 ms, less than TCP's 1 s SYN retransmission), a failure
/// the table reported against the configuration measured at the time although no appliance
/// dropped anything. Linux takes a second `listen` on a listening socket as a new backlog.
fn widen_backlog(listener: &TcpListener) -> Result<()> {
    // SAFETY: a valid listening socket fd, owned by `listener` for the call's duration.
    if unsafe { libc::listen(listener.as_raw_fd(), CPS_BACKLOG) } != 0 {
        return Err(io::Error::last_os_error()).context("widening the CPS server's backlog");
    }
    Ok(())
}

/// Connections through DNAT (to the VIP; to the sink itself where nothing translates) for
/// `interval`: connect, then close with RST; the server accepts and closes.
pub fn cps(topo: &Topology, config: Config, interval: Duration) -> Result<Measured> {
    let target = if config.translates() {
        addr::VIP
    } else {
        addr::SINK
    };
    let target = SocketAddr::V4(SocketAddrV4::new(target, CPS_PORT));
    let cpu = topo.other_cpu;
    let stop = AtomicBool::new(false);
    let listener = in_netns(topo.sink.name(), || {
        let listener =
            TcpListener::bind(SocketAddrV4::new(addr::SINK, CPS_PORT)).context("CPS server")?;
        widen_backlog(&listener)?;
        Ok(listener)
    })?;
    let meter = Meter::new(topo, &topo.sink, &topo.dev.s0)?;
    let (iv, made, failures) = thread::scope(|s| -> Result<_> {
        let server = s.spawn(|| -> Result<()> {
            bench_sys::pin_to_cpu(cpu)?;
            // Non-blocking: the handshake completes in the kernel whether or not the server
            // has accepted yet, so polling costs the client nothing, and the stop is seen.
            listener.set_nonblocking(true)?;
            // Accepted connections are kept a while and then dropped, never closed at once:
            // the client's RST must end each one. A server that resets first races the
            // client's connect(): when its RST arrives before the client has read the
            // connect result, a handshake that went through is reported as a failed connect
            // (14% of them did on this machine, with or without NAT).
            let mut held = VecDeque::with_capacity(HELD_CONNECTIONS);
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        // One dropped per one accepted: a batch of closes would stall accept()
                        // long enough for the backlog to overflow and a SYN to be lost.
                        if held.len() == HELD_CONNECTIONS {
                            held.pop_front();
                        }
                        held.push_back(conn);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_micros(200));
                    }
                    Err(e) => return Err(e).context("CPS server accept"),
                }
            }
            Ok(())
        });
        let client: Result<(Interval, u64, ConnectFailures)> = in_netns(topo.gen.name(), || {
            bench_sys::pin_to_cpu(cpu)?;
            let a = meter.read()?;
            let deadline = Instant::now() + interval;
            let mut made = 0u64;
            let mut failures = ConnectFailures::default();
            while Instant::now() < deadline && made < CPS_MAX {
                match TcpStream::connect_timeout(&target, Duration::from_millis(500)) {
                    Ok(conn) => {
                        linger_zero(&conn)?;
                        made += 1;
                    }
                    Err(e) => {
                        // Counted by kind and reported; a configuration that fails most
                        // attempts is broken, not slow.
                        failures.count(&e);
                        let failed = failures.total();
                        if failed > 100 && failed > made {
                            return Err(e).context(format!(
                                "connecting to {target}: {failed} attempts failed, {made} \
                                     succeeded"
                            ));
                        }
                    }
                }
            }
            let b = meter.read()?;
            Ok((Interval::between(&a, &b), made, failures))
        });
        stop.store(true, Ordering::Relaxed);
        server.join().expect("CPS server thread panicked")?;
        client
    })?;
    if made == 0 {
        bail!("no TCP connection through {}", config.key());
    }
    Ok(Measured {
        iv,
        units: made as f64,
        note: failures.describe(made),
    })
}

/// Failed connects of one measurement, by what the client was told.
#[derive(Debug, Default, Clone, Copy)]
struct ConnectFailures {
    /// The SYN was answered with RST (ECONNREFUSED).
    refused: u64,
    /// Reset after the handshake, before connect() returned (ECONNRESET).
    reset: u64,
    /// No answer within the connect timeout (the SYN or its answer was lost).
    timed_out: u64,
    /// Anything else (no port left, no route).
    other: u64,
}

impl ConnectFailures {
    fn count(&mut self, e: &io::Error) {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => self.refused += 1,
            io::ErrorKind::ConnectionReset => self.reset += 1,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => self.timed_out += 1,
            _ => self.other += 1,
        }
    }

    fn total(&self) -> u64 {
        self.refused + self.reset + self.timed_out + self.other
    }

    /// The table note: empty without failures.
    fn describe(&self, made: u64) -> String {
        let failed = self.total();
        if failed == 0 {
            return String::new();
        }
        let kinds: Vec<String> = [
            (self.refused, "refused"),
            (self.reset, "reset"),
            (self.timed_out, "timed out"),
            (self.other, "other"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        format!(
            "{failed} of {} connects failed ({})",
            made + failed,
            kinds.join(", ")
        )
    }
}
