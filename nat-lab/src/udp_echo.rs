//! A UDP echo server and a lock-step client, for tests that count packets exactly.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    netns::in_netns,
    process::{self, run_in, wait_until, Check, ChildGuard},
};

/// The server, run as `python3 -I -c UDP_ECHO_SCRIPT PORT...`: one socket per port on
/// 0.0.0.0, each sending every datagram's payload back to its sender.
///
/// The reply leaves from the address the datagram was sent to (IP_PKTINFO), not from the
/// interface's primary address: otherwise a datagram to the backend's secondary address would
/// be answered from the primary one and a NAT would rightly refuse to match it.
pub const UDP_ECHO_SCRIPT: &str = r#"
import socket, struct, sys, threading

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)

def serve(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    s.bind(("0.0.0.0", port))
    while True:
        data, anc, _flags, peer = s.recvmsg(65535, socket.CMSG_SPACE(12))
        reply_anc = []
        for level, kind, info in anc:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(info) >= 12:
                # in_pktinfo: ifindex, spec_dst, addr (the header's destination).
                reply_anc = [(level, kind, struct.pack("=i4s4s", 0, info[8:12], b"\0" * 4))]
        try:
            s.sendmsg([data], reply_anc, 0, peer)
        except OSError:
            pass

ports = [int(p) for p in sys.argv[1:]]
for p in ports[1:]:
    threading.Thread(target=serve, args=(p,), daemon=True).start()
print("udp-echo listening on", ports, flush=True)
serve(ports[0])
"#;

/// How long [`UdpEcho::start`] waits for the sockets.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The most datagrams one [`udp_exchange`] sends: traffic loops stay bounded.
pub const MAX_EXCHANGE_COUNT: u32 = 100_000;

/// A running UDP echo server; dropping it stops the server.
#[derive(Debug)]
pub struct UdpEcho {
    child: ChildGuard,
    ports: Vec<u16>,
}

impl UdpEcho {
    /// Starts the server in namespace `ns` on `ports` and waits (bounded by
    /// [`START_TIMEOUT`]) until every port is bound. Readiness is read from `ss`, so no probe
    /// datagram disturbs packet counters.
    pub fn start(ns: &str, ports: &[u16]) -> Result<Self> {
        let mut child =
            process::spawn_python_server(ns, UDP_ECHO_SCRIPT, ports, "udp echo server")?;
        wait_until(
            &format!("the UDP echo server in {ns} to bind {ports:?}"),
            START_TIMEOUT,
            || {
                child.ensure_running()?;
                let bound = parse_ss_local_ports(&run_in(ns, "ss", ["-Hlun"])?);
                let missing: Vec<u16> = ports
                    .iter()
                    .copied()
                    .filter(|p| !bound.contains(p))
                    .collect();
                Ok(if missing.is_empty() {
                    Check::Done(())
                } else {
                    Check::NotYet(format!("ports {missing:?} not bound yet"))
                })
            },
        )?;
        Ok(Self {
            child,
            ports: ports.to_vec(),
        })
    }

    /// The ports it listens on.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// Fails if the server has died (with its output).
    pub fn ensure_running(&mut self) -> Result<()> {
        self.child.ensure_running()
    }
}

/// The local ports in `ss -H -l -n` output for one protocol
/// (`State Recv-Q Send-Q Local:Port Peer:Port` per line).
pub fn parse_ss_local_ports(output: &str) -> BTreeSet<u16> {
    output
        .lines()
        .filter_map(|line| line.split_whitespace().nth(3))
        .filter_map(|local| local.rsplit_once(':'))
        .filter_map(|(_, port)| port.parse().ok())
        .collect()
}

/// What a [`udp_exchange`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpExchange {
    /// Datagrams sent.
    pub sent: u32,
    /// Matching replies received (same payload, from the target).
    pub received: u32,
}

/// Sends `count` datagrams from namespace `ns` to `target`, one at a time, each waiting up to
/// `reply_timeout` for its echo. Lock-step keeps the packet counts exact and the loop bounded
/// (at most `count` × `reply_timeout`); lost datagrams are counted, not retried. The socket
/// is connected, so replies from any other address (a broken reverse translation) are not
/// counted.
pub fn udp_exchange(
    ns: &str,
    target: SocketAddrV4,
    count: u32,
    reply_timeout: Duration,
) -> Result<UdpExchange> {
    udp_exchange_from(
        ns,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
        target,
        count,
        reply_timeout,
    )
}

/// [`udp_exchange`] from a chosen local address and port (for tests where the client pins its
/// source port, as chrony's `acquisitionport` does).
pub fn udp_exchange_from(
    ns: &str,
    source: SocketAddrV4,
    target: SocketAddrV4,
    count: u32,
    reply_timeout: Duration,
) -> Result<UdpExchange> {
    if count > MAX_EXCHANGE_COUNT {
        bail!("udp_exchange count {count} exceeds the bound {MAX_EXCHANGE_COUNT}");
    }
    if reply_timeout.is_zero() {
        bail!("udp_exchange reply_timeout must be positive");
    }
    in_netns(ns, || {
        let sock = UdpSocket::bind(source).with_context(|| format!("cannot bind {source}"))?;
        sock.connect(target)
            .with_context(|| format!("cannot connect UDP socket to {target}"))?;
        let mut result = UdpExchange {
            sent: 0,
            received: 0,
        };
        let mut buf = [0u8; 2048];
        for seq in 0..count {
            let payload = payload(seq);
            sock.send(&payload)
                .with_context(|| format!("cannot send datagram {seq} to {target}"))?;
            result.sent += 1;
            let deadline = Instant::now() + reply_timeout;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                sock.set_read_timeout(Some(left))
                    .context("cannot set the socket timeout")?;
                match sock.recv(&mut buf) {
                    Ok(n) if buf[..n] == payload[..] => {
                        result.received += 1;
                        break;
                    }
                    // A late echo of an earlier datagram: keep waiting for ours.
                    Ok(_) => {}
                    // Timeout, or ICMP port unreachable surfacing as ECONNREFUSED: lost.
                    Err(_) => break,
                }
            }
        }
        Ok(result)
    })
}

/// A recognisable payload carrying its sequence number.
fn payload(seq: u32) -> [u8; 32] {
    let mut p = *b"xnl-udp-echo....................";
    p[12..16].copy_from_slice(&seq.to_be_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ss_listening_ports() {
        let out = "UNCONN 0      0            0.0.0.0:7000      0.0.0.0:*\n\
                   UNCONN 0      0          127.0.0.1:53        0.0.0.0:*\n\
                   UNCONN 0      0               [::]:9000         [::]:*\n\
                   garbage\n";
        let ports = parse_ss_local_ports(out);
        assert_eq!(ports.into_iter().collect::<Vec<_>>(), vec![53, 7000, 9000]);
    }

    #[test]
    fn payloads_differ_per_sequence() {
        assert_ne!(payload(1), payload(2));
        assert_eq!(payload(7).len(), 32);
    }

    #[test]
    fn script_is_valid_python() {
        let check = "import sys; compile(sys.argv[1], 'udp_echo', 'exec')";
        process::run("python3", ["-I", "-c", check, UDP_ECHO_SCRIPT]).unwrap();
    }

    #[test]
    fn unbounded_exchange_is_refused() {
        let target = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 2), 7);
        let err = udp_exchange(
            "any",
            target,
            MAX_EXCHANGE_COUNT + 1,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err:#}");
    }
}
