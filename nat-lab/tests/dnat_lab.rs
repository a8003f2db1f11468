//! Root tests of the lab itself, with no NAT program: the nat namespace only routes.
//!
//! They need root and the lab tools, and fail (never skip) without them, so a CI machine that
//! lost a package shows up red instead of quietly testing nothing.

use std::{
    net::SocketAddrV4,
    process::{Child, Command},
    time::{Duration, Instant},
};

use nat_lab::{
    http_get, install_counter,
    netns::{self, Netns},
    read_counter, udp_exchange, DnatLab, EchoReply, Hook, HttpEcho, UdpEcho,
};

#[test]
fn client_reaches_backend_through_routing_nat_namespace_and_lab_is_removed() {
    let lab = DnatLab::new().expect("build the DNAT lab");
    let names: Vec<String> = lab.namespaces().iter().map(|s| s.to_string()).collect();
    for name in &names {
        assert!(
            netns::exists(name),
            "namespace {name} exists while the lab lives"
        );
    }
    let echo = HttpEcho::start(lab.backend.name(), &[80, 8080]).expect("start HTTP echo");

    let body = http_get(lab.client.name(), "http://198.18.1.2:80/").expect("GET backend :80");
    let reply: EchoReply = body.parse().expect("echo body");
    assert_eq!(*reply.client.ip(), DnatLab::CLIENT_ADDR, "body: {body}");
    assert_eq!(reply.server, SocketAddrV4::new(DnatLab::BACKEND_ADDR, 80));
    assert!(body.starts_with("client=198.18.0.2:"), "body: {body}");

    // The secondary address and the second port are served by the same process.
    let body = http_get(lab.client.name(), "http://198.18.1.3:8080/").expect("GET .3:8080");
    let reply: EchoReply = body.parse().expect("echo body");
    assert_eq!(
        reply.server,
        SocketAddrV4::new(DnatLab::BACKEND_ADDR2, 8080)
    );

    // Without a NAT program the VIPs lead nowhere: nat has no route for them.
    let err = http_get(lab.client.name(), "http://198.18.100.10/").unwrap_err();
    assert!(format!("{err:#}").contains("curl"), "{err:#}");

    drop(echo);
    drop(lab);
    for name in &names {
        assert!(
            !netns::exists(name),
            "namespace {name} removed with the lab"
        );
    }
}

#[test]
fn checksum_offload_is_off_on_sending_veths() {
    let lab = DnatLab::new().expect("build the DNAT lab");
    for (ns, dev) in [
        (&lab.client, DnatLab::CLIENT_IF),
        (&lab.backend, DnatLab::BACKEND_IF),
    ] {
        let features = ns.run("ethtool", ["-k", dev]).expect("ethtool -k");
        assert!(
            features.contains("tx-checksumming: off"),
            "{dev}: {features}"
        );
        assert!(
            features.contains("generic-receive-offload: on"),
            "{dev}: {features}"
        );
    }
    let forward = lab
        .nat
        .run("sysctl", ["-n", "net.ipv4.ip_forward"])
        .expect("sysctl");
    assert_eq!(forward.trim(), "1");
}

#[test]
fn udp_echo_and_nft_counters_agree_with_traffic_sent() {
    const COUNT: u32 = 20;
    let lab = DnatLab::new().expect("build the DNAT lab");
    let _echo = UdpEcho::start(lab.backend.name(), &[7000]).expect("start UDP echo");
    install_counter(
        lab.client.name(),
        "to_backend",
        Hook::Output,
        "ip daddr 198.18.1.3 udp dport 7000",
    )
    .expect("client counter");
    install_counter(
        lab.backend.name(),
        "from_client",
        Hook::Input,
        "ip saddr 198.18.0.2 udp dport 7000",
    )
    .expect("backend counter");
    // Installing the same name twice would double count.
    assert!(install_counter(lab.client.name(), "to_backend", Hook::Output, "").is_err());

    // To the secondary address: the reply must come from it, or the connected socket drops it.
    let target = SocketAddrV4::new(DnatLab::BACKEND_ADDR2, 7000);
    let result = udp_exchange(lab.client.name(), target, COUNT, Duration::from_secs(2))
        .expect("UDP exchange");
    assert_eq!(result.sent, COUNT);
    assert_eq!(result.received, COUNT);

    let sent = read_counter(lab.client.name(), "to_backend").expect("read client counter");
    let seen = read_counter(lab.backend.name(), "from_client").expect("read backend counter");
    assert_eq!(sent.packets, u64::from(COUNT));
    assert_eq!(seen.packets, u64::from(COUNT));
    // 20 IP + 8 UDP + 32 payload bytes each.
    assert_eq!(sent.bytes, u64::from(COUNT) * 60);
    assert_eq!(seen.bytes, sent.bytes);
    assert!(read_counter(lab.client.name(), "nope").is_err());
}

#[test]
fn namespace_of_a_dead_owner_is_removed_with_its_processes() {
    // First, so this process's automatic once-only cleanup is over and cannot race ours.
    let live = Netns::new().expect("live namespace");
    // A pid that just exited stands in for a crashed test run.
    let mut child = Command::new("true").spawn().expect("spawn true");
    let dead_pid = child.id();
    child.wait().expect("wait true");
    let stale = format!("xnl{dead_pid}-0");
    nat_lab::run("ip", ["netns", "add", &stale]).expect("create stale namespace");
    // A leftover server inside it, as a crashed run would leave behind.
    let mut sleeper = Command::new("ip")
        .args(["netns", "exec", &stale, "sleep", "60"])
        .spawn()
        .expect("spawn sleeper");
    wait_inside(&stale);

    let removed = nat_lab::cleanup_stale().expect("cleanup_stale");
    let gone = !netns::exists(&stale);
    // Clean up before asserting so a failure leaves nothing behind.
    let _ = netns::remove_namespace(&stale);
    // Another test process running its own cleanup may have removed it first; either way it
    // must be gone, and if this call removed it, it must say so.
    assert!(
        gone,
        "stale namespace {stale} removed (this call removed {removed:?})"
    );
    assert!(netns::exists(live.name()), "live namespace kept");

    assert_killed(&mut sleeper);
}

/// Waits until some process has entered namespace `ns` (`ip netns exec` has done its setns).
fn wait_inside(ns: &str) {
    nat_lab::wait_until_ok(
        "a process inside the namespace",
        Duration::from_secs(5),
        || {
            let pids = nat_lab::run("ip", ["netns", "pids", ns])?;
            anyhow::ensure!(!pids.trim().is_empty(), "no pids yet");
            Ok(())
        },
    )
    .expect("process entered the namespace");
}

/// Asserts that `child` dies soon by a signal; kills it itself otherwise, so a failing test
/// leaves nothing running.
fn assert_killed(child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("poll child") {
            assert!(!status.success(), "killed, not exited ({status})");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("process {} survived the namespace cleanup", child.id());
}

#[test]
fn netns_drop_kills_processes_left_inside() {
    let ns = Netns::new().expect("namespace");
    let mut sleeper = Command::new("ip")
        .args(["netns", "exec", ns.name(), "sleep", "60"])
        .spawn()
        .expect("spawn sleeper");
    wait_inside(ns.name());
    let name = ns.name().to_string();
    drop(ns);
    assert!(!netns::exists(&name));
    assert_killed(&mut sleeper);
}

#[test]
fn run_in_reports_failures_with_command_and_stderr() {
    let ns = Netns::new().expect("namespace");
    let err = ns
        .run("ip", ["route", "add", "default", "via", "198.18.9.9"])
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("ip netns exec"), "{msg}");
    assert!(msg.contains("route add default via 198.18.9.9"), "{msg}");
    assert!(msg.contains("stderr:"), "{msg}");
}
