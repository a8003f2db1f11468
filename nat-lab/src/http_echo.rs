//! An HTTP server that answers who it talked to, and a bounded HTTP client.
//!
//! The body names the peer and the local address of the accepted socket, so one GET proves
//! both halves of a translation: which address the backend saw as the client (DNAT keeps it,
//! SNAT replaces it) and which address and port the connection really reached.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    str::FromStr,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{
    netns::in_netns,
    process::{self, netns_command, wait_until, Check, ChildGuard},
};

/// The server, run as `python3 -I -c HTTP_ECHO_SCRIPT PORT...`: one listener per port on
/// 0.0.0.0, each answering every GET with `client=IP:PORT server=IP:PORT\n`.
///
/// socketserver rather than http.server.HTTPServer, whose bind does a reverse DNS lookup;
/// handler threads time out so a stalled client cannot pin one forever. Python's default
/// SIGTERM/SIGKILL handling ends it.
pub const HTTP_ECHO_SCRIPT: &str = r#"
import socketserver, sys, threading
from http.server import BaseHTTPRequestHandler

class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    timeout = 10

    def do_GET(self):
        peer = self.client_address
        local = self.connection.getsockname()
        body = ("client=%s:%d server=%s:%d\n" % (peer[0], peer[1], local[0], local[1])).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128

servers = [Server(("0.0.0.0", int(p)), Echo) for p in sys.argv[1:]]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("http-echo listening on", sys.argv[1:], flush=True)
servers[0].serve_forever()
"#;

/// How long [`HttpEcho::start`] waits for the listeners.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`http_get`] lets one request take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A running HTTP echo server; dropping it stops the server.
#[derive(Debug)]
pub struct HttpEcho {
    child: ChildGuard,
    ports: Vec<u16>,
}

impl HttpEcho {
    /// Starts the server in namespace `ns` on `ports` and waits (bounded by
    /// [`START_TIMEOUT`]) until every port accepts connections. The readiness probe makes one
    /// connection per port over loopback, before the caller sends anything.
    pub fn start(ns: &str, ports: &[u16]) -> Result<Self> {
        let mut child =
            process::spawn_python_server(ns, HTTP_ECHO_SCRIPT, ports, "http echo server")?;
        wait_until(
            &format!("the HTTP echo server in {ns} to listen on {ports:?}"),
            START_TIMEOUT,
            || {
                child.ensure_running()?;
                Ok(match probe_tcp_ports(ns, ports)? {
                    None => Check::Done(()),
                    Some(reason) => Check::NotYet(reason),
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

/// Tries one loopback connection per port inside `ns`; `None` when all connect, else why not.
fn probe_tcp_ports(ns: &str, ports: &[u16]) -> Result<Option<String>> {
    in_netns(ns, || {
        for &port in ports {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            if let Err(e) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                return Ok(Some(format!("connect to {addr}: {e}")));
            }
        }
        Ok(None)
    })
}

/// Waits (bounded by `timeout`) until every one of `ports` on 127.0.0.1 in namespace `ns`
/// accepts a TCP connection.
pub fn wait_tcp_ports(ns: &str, ports: &[u16], timeout: Duration) -> Result<()> {
    wait_until(
        &format!("TCP ports {ports:?} in namespace {ns}"),
        timeout,
        || {
            Ok(match probe_tcp_ports(ns, ports)? {
                None => Check::Done(()),
                Some(reason) => Check::NotYet(reason),
            })
        },
    )
}

/// GETs `url` with curl from inside namespace `ns` (bounded by [`REQUEST_TIMEOUT`], proxies
/// ignored) and returns the body; fails on connection errors and HTTP error statuses.
pub fn http_get(ns: &str, url: &str) -> Result<String> {
    let secs = REQUEST_TIMEOUT.as_secs().to_string();
    let mut cmd = netns_command(ns, "curl");
    // --noproxy: an inherited http_proxy must never send lab traffic anywhere else.
    cmd.args([
        "-sS",
        "--fail",
        "--noproxy",
        "*",
        "--max-time",
        &secs,
        "--connect-timeout",
        &secs,
        url,
    ]);
    let out = process::run_output(&mut cmd, REQUEST_TIMEOUT + Duration::from_secs(5))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A parsed echo server answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EchoReply {
    /// The peer the server saw (the client, or the NAT's address after SNAT).
    pub client: SocketAddrV4,
    /// The local address and port of the accepted socket (where the connection really went).
    pub server: SocketAddrV4,
}

impl FromStr for EchoReply {
    type Err = anyhow::Error;

    /// Parses `client=IP:PORT server=IP:PORT` (surrounding whitespace allowed).
    fn from_str(body: &str) -> Result<Self> {
        let mut client = None;
        let mut server = None;
        for field in body.split_whitespace() {
            let (key, value) = field
                .split_once('=')
                .ok_or_else(|| anyhow!("echo reply field {field:?} is not key=value"))?;
            let addr: SocketAddrV4 = value
                .parse()
                .with_context(|| format!("echo reply {key} {value:?} is not IPv4:port"))?;
            match key {
                "client" => client = Some(addr),
                "server" => server = Some(addr),
                _ => bail!("unknown echo reply field {key:?}"),
            }
        }
        match (client, server) {
            (Some(client), Some(server)) => Ok(Self { client, server }),
            _ => bail!("echo reply {body:?} lacks client= or server="),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_echo_body() {
        let r: EchoReply = "client=198.18.0.2:41234 server=198.18.1.2:80\n"
            .parse()
            .unwrap();
        assert_eq!(r.client, "198.18.0.2:41234".parse().unwrap());
        assert_eq!(r.server, "198.18.1.2:80".parse().unwrap());
    }

    #[test]
    fn rejects_malformed_bodies() {
        for bad in [
            "",
            "client=198.18.0.2:1",
            "client=198.18.0.2 server=198.18.1.2:80",
            "hello world",
            "client=198.18.0.2:1 server=198.18.1.2:2 extra=198.18.1.2:3",
            "<html>404</html>",
        ] {
            assert!(bad.parse::<EchoReply>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn script_is_valid_python() {
        // Compiling without running catches syntax errors without root or namespaces.
        let check = "import sys; compile(sys.argv[1], 'http_echo', 'exec')";
        process::run("python3", ["-I", "-c", check, HTTP_ECHO_SCRIPT]).unwrap();
    }
}
