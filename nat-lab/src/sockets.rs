//! TCP and UDP endpoints written in Rust with std sockets, created inside lab namespaces, that
//! report the addresses they see: the server side of every NAT test needs to know which
//! source address and port a connection really arrived from.
//!
//! A socket keeps the network namespace it was created in, so the servers here create their
//! socket with [`in_netns`] and then serve it from an ordinary thread, and the client helpers
//! hand back connected sockets the test can keep using (for minutes, in the idle-mapping
//! tests) from its own thread.
//!
//! Everything is bounded: connection and datagram counts have hard caps, every read and
//! connect has a timeout, and dropping a server stops its threads within a fraction of a
//! second.

use std::{
    io::{ErrorKind, Read, Write},
    mem,
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{netns::in_netns, process::run_in};

/// The most connections a [`TcpEchoServer`] serves and [`tcp_connect_all`] opens: tests stay
/// bounded.
pub const MAX_CONNECTIONS: usize = 4096;

/// The most peers a [`UdpPeerEcho`] remembers (it keeps answering beyond that).
pub const MAX_RECORDED_DATAGRAMS: usize = 100_000;

/// The largest datagram a [`UdpPeerEcho`] answers.
pub const MAX_DATAGRAM: usize = 1024;

/// How often server threads look at their stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

/// Stack size of the server's per-connection threads: they only copy bytes.
const CONNECTION_STACK: usize = 64 * 1024;

fn v4(addr: SocketAddr) -> Result<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(a) => bail!("{a} is not IPv4 (the lab is IPv4 only)"),
    }
}

/// A TCP server that echoes every byte back and remembers the peer address of every
/// connection it accepted. Dropping it stops accepting and closes every connection.
#[derive(Debug)]
pub struct TcpEchoServer {
    local: SocketAddrV4,
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddrV4>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl TcpEchoServer {
    /// Listens on `bind` in namespace `ns` (port 0 picks one; see [`Self::local_addr`]) and
    /// serves from a background thread. At most [`MAX_CONNECTIONS`] connections are served;
    /// later ones are closed at once.
    pub fn start(ns: &str, bind: SocketAddrV4) -> Result<Self> {
        let listener = in_netns(ns, || {
            TcpListener::bind(bind).with_context(|| format!("cannot listen on {bind} in {ns}"))
        })?;
        listener
            .set_nonblocking(true)
            .context("cannot make the listener non-blocking")?;
        let local = v4(listener.local_addr().context("listener address")?)?;
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let stop = Arc::clone(&stop);
            let peers = Arc::clone(&peers);
            thread::Builder::new()
                .name(format!("tcp-echo-{}", local.port()))
                .spawn(move || accept_loop(&listener, &stop, &peers))
                .context("cannot start the TCP echo thread")?
        };
        Ok(Self {
            local,
            stop,
            peers,
            acceptor: Some(acceptor),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// The peer address of every connection accepted so far, in accept order: the source
    /// address and port the connection arrived with (after any NAT on the way).
    pub fn peers(&self) -> Vec<SocketAddrV4> {
        self.peers.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

impl Drop for TcpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, stop: &Arc<AtomicBool>, peers: &Mutex<Vec<SocketAddrV4>>) {
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, SocketAddr::V4(peer))) => {
                {
                    let Ok(mut peers) = peers.lock() else { break };
                    if peers.len() >= MAX_CONNECTIONS {
                        // Over the bound: dropping the stream closes it; the client sees it.
                        continue;
                    }
                    peers.push(peer);
                }
                let stop = Arc::clone(stop);
                let spawned = thread::Builder::new()
                    .name("tcp-echo-conn".into())
                    .stack_size(CONNECTION_STACK)
                    .spawn(move || echo_connection(stream, &stop));
                if let Ok(handle) = spawned {
                    connections.push(handle);
                }
            }
            // Not IPv4: the lab has no IPv6, so this cannot happen; close it.
            Ok(_) => {}
            // Nothing pending (WouldBlock) or a connection reset before accept: poll again.
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
    for handle in connections {
        let _ = handle.join();
    }
}

fn echo_connection(mut stream: TcpStream, stop: &AtomicBool) {
    // Accepted sockets do not reliably inherit the listener's blocking mode.
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(STOP_POLL)).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// A UDP server that answers every datagram with `peer=<IP:PORT> ` followed by the datagram
/// itself, where the address is the source the datagram arrived with: the client learns which
/// external address and port the NAT gave it. Remembers every peer it saw. Dropping it stops
/// it.
#[derive(Debug)]
pub struct UdpPeerEcho {
    local: SocketAddrV4,
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddrV4>>>,
    worker: Option<JoinHandle<()>>,
}

impl UdpPeerEcho {
    /// Binds `bind` in namespace `ns` (port 0 picks one; see [`Self::local_addr`]) and
    /// answers from a background thread. The reply leaves from the bound address, so bind a
    /// specific address (not 0.0.0.0) on hosts with several.
    pub fn start(ns: &str, bind: SocketAddrV4) -> Result<Self> {
        let socket = in_netns(ns, || {
            UdpSocket::bind(bind).with_context(|| format!("cannot bind UDP {bind} in {ns}"))
        })?;
        socket
            .set_read_timeout(Some(STOP_POLL))
            .context("cannot set the UDP socket timeout")?;
        let local = v4(socket.local_addr().context("UDP socket address")?)?;
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let worker = {
            let stop = Arc::clone(&stop);
            let peers = Arc::clone(&peers);
            thread::Builder::new()
                .name(format!("udp-peer-echo-{}", local.port()))
                .spawn(move || udp_peer_loop(&socket, &stop, &peers))
                .context("cannot start the UDP echo thread")?
        };
        Ok(Self {
            local,
            stop,
            peers,
            worker: Some(worker),
        })
    }

    /// The address it is bound to.
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// The source of every datagram received so far, in arrival order (at most
    /// [`MAX_RECORDED_DATAGRAMS`]).
    pub fn peers(&self) -> Vec<SocketAddrV4> {
        self.peers.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

impl Drop for UdpPeerEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

fn udp_peer_loop(socket: &UdpSocket, stop: &AtomicBool, peers: &Mutex<Vec<SocketAddrV4>>) {
    let mut buf = [0u8; MAX_DATAGRAM + 1];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, SocketAddr::V4(peer))) = socket.recv_from(&mut buf) else {
            continue;
        };
        if n > MAX_DATAGRAM {
            continue;
        }
        if let Ok(mut peers) = peers.lock() {
            if peers.len() < MAX_RECORDED_DATAGRAMS {
                peers.push(peer);
            }
        }
        let mut reply = format!("peer={peer} ").into_bytes();
        reply.extend_from_slice(&buf[..n]);
        let _ = socket.send_to(&reply, peer);
    }
}

/// A UDP socket bound to `addr` inside namespace `ns`, for use from any thread (it stays in
/// `ns`). Bind port 0 for an ephemeral port.
pub fn udp_bind(ns: &str, addr: SocketAddrV4) -> Result<UdpSocket> {
    in_netns(ns, || {
        UdpSocket::bind(addr).with_context(|| format!("cannot bind UDP {addr} in {ns}"))
    })
}

static PROBE_SEQ: AtomicU64 = AtomicU64::new(0);

/// Sends one probe from `socket` to a [`UdpPeerEcho`] at `target` and waits up to `timeout`
/// for its answer; returns the source address and port the server saw. Answers to earlier
/// probes are skipped; an answer from any address other than `target` (a broken reverse
/// translation) is never accepted and is named in the error.
pub fn udp_peer_roundtrip(
    socket: &UdpSocket,
    target: SocketAddrV4,
    timeout: Duration,
) -> Result<SocketAddrV4> {
    let nonce = format!(
        "xnl-peer-probe {} {}",
        std::process::id(),
        PROBE_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    socket
        .send_to(nonce.as_bytes(), target)
        .with_context(|| format!("cannot send a UDP probe to {target}"))?;
    let deadline = Instant::now() + timeout;
    let mut strangers = Vec::new();
    let mut buf = [0u8; MAX_DATAGRAM + 64];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let local = socket.local_addr().ok();
            let extra = if strangers.is_empty() {
                String::new()
            } else {
                format!("; answers arrived from the wrong address(es) {strangers:?}")
            };
            bail!("no UDP reply from {target} to {local:?} within {timeout:?}{extra}");
        }
        socket
            .set_read_timeout(Some(left))
            .context("cannot set the UDP socket timeout")?;
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            // ICMP errors surface as ECONNREFUSED etc. on Linux: keep waiting until the
            // deadline, the error names the timeout.
            Err(_) => continue,
        };
        if from != SocketAddr::V4(target) {
            if strangers.len() < 8 {
                strangers.push(from);
            }
            continue;
        }
        let reply = &buf[..n];
        if !reply.ends_with(nonce.as_bytes()) {
            continue;
        }
        return parse_peer_reply(&reply[..n - nonce.len()]);
    }
}

/// Parses the `peer=IP:PORT ` prefix of a [`UdpPeerEcho`] answer.
fn parse_peer_reply(prefix: &[u8]) -> Result<SocketAddrV4> {
    let text = std::str::from_utf8(prefix).context("UDP echo prefix is not UTF-8")?;
    let addr = text
        .trim_end()
        .strip_prefix("peer=")
        .with_context(|| format!("UDP echo prefix {text:?} lacks peer="))?;
    addr.parse()
        .with_context(|| format!("UDP echo peer {addr:?} is not IPv4:port"))
}

/// Connects from namespace `ns` to `target`, from the local `source` address and port when
/// given (bound with SO_REUSEADDR, so one local port can reach several destinations), within
/// `timeout`.
pub fn tcp_connect(
    ns: &str,
    source: Option<SocketAddrV4>,
    target: SocketAddrV4,
    timeout: Duration,
) -> Result<TcpStream> {
    in_netns(ns, || connect_here(source, target, timeout))
}

/// Opens every `(source, target)` connection of `flows` from namespace `ns`, one after the
/// other, each within `timeout`, and returns them all open (at most [`MAX_CONNECTIONS`]).
/// Fails on the first that cannot connect, naming it and how many succeeded before.
pub fn tcp_connect_all(
    ns: &str,
    flows: &[(Option<SocketAddrV4>, SocketAddrV4)],
    timeout: Duration,
) -> Result<Vec<TcpStream>> {
    if flows.len() > MAX_CONNECTIONS {
        bail!(
            "{} connections exceed the bound {MAX_CONNECTIONS}",
            flows.len()
        );
    }
    in_netns(ns, || {
        let mut streams = Vec::with_capacity(flows.len());
        for (i, &(source, target)) in flows.iter().enumerate() {
            let stream = connect_here(source, target, timeout).with_context(|| {
                format!("connection {i} of {} ({} already open)", flows.len(), i)
            })?;
            streams.push(stream);
        }
        Ok(streams)
    })
}

/// Connects a TCP socket in the current thread's namespace.
fn connect_here(
    source: Option<SocketAddrV4>,
    target: SocketAddrV4,
    timeout: Duration,
) -> Result<TcpStream> {
    let what = match source {
        Some(source) => format!("{source} -> {target}"),
        None => format!("-> {target}"),
    };
    let Some(source) = source else {
        return TcpStream::connect_timeout(&SocketAddr::V4(target), timeout)
            .with_context(|| format!("TCP connect {what} within {timeout:?}"));
    };
    // std cannot bind before connecting, so build the socket by hand.
    // SAFETY: socket has no memory preconditions; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("cannot create a TCP socket");
    }
    // SAFETY: `raw` is a fresh, valid descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let one: libc::c_int = 1;
    setsockopt(&fd, libc::SO_REUSEADDR, &one).context("SO_REUSEADDR")?;
    // connect() gives up with EINPROGRESS when the send timeout expires (socket(7)).
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros().max(1)),
    };
    setsockopt(&fd, libc::SO_SNDTIMEO, &tv).context("SO_SNDTIMEO")?;
    let local = sockaddr_in(source);
    // SAFETY: `local` is a valid sockaddr_in and the length matches it.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&local as *const libc::sockaddr_in).cast(),
            sockaddr_in_len(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("bind {source}"));
    }
    let remote = sockaddr_in(target);
    // SAFETY: as for bind.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&remote as *const libc::sockaddr_in).cast(),
            sockaddr_in_len(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINPROGRESS) {
            bail!("TCP connect {what}: no answer within {timeout:?}");
        }
        return Err(err).with_context(|| format!("TCP connect {what}"));
    }
    let stream = TcpStream::from(fd);
    // Back to "no timeout" for writes, like a std stream.
    stream
        .set_write_timeout(None)
        .context("clearing the send timeout")?;
    Ok(stream)
}

fn setsockopt<T>(fd: &OwnedFd, option: libc::c_int, value: &T) -> Result<()> {
    let len = libc::socklen_t::try_from(mem::size_of::<T>()).context("option size")?;
    // SAFETY: `value` points to a live T of `len` bytes for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            // s_addr is in network order: the octets as they are.
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

fn sockaddr_in_len() -> libc::socklen_t {
    // 16 bytes: always fits.
    mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
}

/// Writes `payload` on `stream` and reads until the same bytes came back (from a
/// [`TcpEchoServer`]), within `timeout` overall.
pub fn tcp_roundtrip(stream: &mut TcpStream, payload: &[u8], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let peer = stream.peer_addr().ok();
    stream
        .set_write_timeout(Some(timeout))
        .context("cannot set the write timeout")?;
    stream
        .write_all(payload)
        .with_context(|| format!("TCP write to {peer:?}"))?;
    let mut got = vec![0u8; payload.len()];
    let mut filled = 0;
    while filled < got.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "TCP echo from {peer:?}: {filled} of {} bytes within {timeout:?}",
                payload.len()
            );
        }
        stream
            .set_read_timeout(Some(left))
            .context("cannot set the read timeout")?;
        match stream.read(&mut got[filled..]) {
            Ok(0) => bail!("TCP connection to {peer:?} closed by the other side"),
            Ok(n) => filled += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("TCP read from {peer:?}")),
        }
    }
    if got != payload {
        bail!("TCP echo from {peer:?} differs from what was sent");
    }
    Ok(())
}

/// An established TCP connection as `ss` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TcpConn {
    /// This end.
    pub local: SocketAddrV4,
    /// The other end.
    pub peer: SocketAddrV4,
}

/// The established IPv4 TCP connections in namespace `ns` whose local port is `local_port`
/// (`ss -Htn state established`): on a server, the peers are the sources the connections
/// arrived from.
pub fn established_tcp(ns: &str, local_port: u16) -> Result<Vec<TcpConn>> {
    let filter = format!("( sport = :{local_port} )");
    let out = run_in(ns, "ss", ["-Htn", "state", "established", filter.as_str()])?;
    Ok(parse_ss_established(&out))
}

/// Parses `ss -H -t -n` lines (with or without the State column): the last two fields are
/// the local and peer address. Non-IPv4 lines are skipped.
pub fn parse_ss_established(text: &str) -> Vec<TcpConn> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [.., local, peer] = fields[..] else {
                return None;
            };
            Some(TcpConn {
                local: local.parse().ok()?,
                peer: peer.parse().ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ss_with_and_without_state_column() {
        let text = "0      0      203.0.113.10:7000  203.0.113.1:20001\n\
                    ESTAB 0      0      203.0.113.10:7000 203.0.113.1:1024\n\
                    0 0 [::1]:7000 [::1]:5000\n";
        let conns = parse_ss_established(text);
        assert_eq!(
            conns,
            vec![
                TcpConn {
                    local: "203.0.113.10:7000".parse().unwrap(),
                    peer: "203.0.113.1:20001".parse().unwrap(),
                },
                TcpConn {
                    local: "203.0.113.10:7000".parse().unwrap(),
                    peer: "203.0.113.1:1024".parse().unwrap(),
                },
            ]
        );
    }

    #[test]
    fn parses_peer_replies() {
        assert_eq!(
            parse_peer_reply(b"peer=203.0.113.1:4242 ").unwrap(),
            "203.0.113.1:4242".parse().unwrap()
        );
        assert!(parse_peer_reply(b"nope").is_err());
        assert!(parse_peer_reply(b"peer=203.0.113.1 ").is_err());
    }

    #[test]
    fn sockaddr_is_network_order() {
        let sa = sockaddr_in("198.18.0.2:1123".parse().unwrap());
        assert_eq!(sa.sin_port.to_ne_bytes(), 1123u16.to_be_bytes());
        assert_eq!(sa.sin_addr.s_addr.to_ne_bytes(), [198, 18, 0, 2]);
    }

    #[test]
    fn unbounded_connection_counts_are_refused() {
        let target: SocketAddrV4 = "203.0.113.10:7".parse().unwrap();
        let flows = vec![(None, target); MAX_CONNECTIONS + 1];
        let err = tcp_connect_all("any", &flows, Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("exceed"), "{err:#}");
    }
}
