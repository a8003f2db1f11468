//! Root tests of the SNAT lab and its helpers, with no NAT program: the nat namespace only
//! routes. They prove the tools (chrony, the peer-reporting servers, source-port binding) and
//! the topology's key property, that without a route back nothing answers the private hosts,
//! so the NAT end-to-end tests can trust a success to mean "the NAT did it".
//!
//! They need root, chrony and the lab tools, and fail (never skip) without them.

use std::{net::SocketAddrV4, time::Duration};

use nat_lab::{
    established_tcp, http_get, install_counter,
    netns::{self},
    read_counter, tcp_connect, tcp_connect_all, tcp_roundtrip, udp_bind, udp_peer_roundtrip,
    DnatLab, DnatLabOptions, EchoReply, Hook, HttpEcho, NtpClient, NtpClientOptions, NtpServer,
    SnatLab, SnatLabOptions, TcpEchoServer, UdpPeerEcho,
};

/// Generous: with 62.5 ms polling chrony selects its source in about a second.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

fn routed_lab() -> SnatLab {
    SnatLab::with_options(SnatLabOptions {
        public_route_to_private: true,
        ..SnatLabOptions::default()
    })
    .expect("build the SNAT lab with a route back")
}

#[test]
fn chrony_syncs_by_plain_routing_when_the_public_side_has_a_route_back() {
    let lab = routed_lab();
    let public = lab.public.name();
    install_counter(
        public,
        "ntp_from_private",
        Hook::Input,
        "ip saddr 198.18.0.2 udp dport 123",
    )
    .unwrap();
    let _server = NtpServer::start(public, SnatLab::PUBLIC_ADDR).expect("NTP server");
    let mut client = NtpClient::start(
        lab.private.name(),
        SnatLab::PUBLIC_ADDR,
        NtpClientOptions::default(),
    )
    .expect("NTP client");
    let source = client.wait_selected(SYNC_TIMEOUT).expect("chrony syncs");
    assert_eq!(source.name, "203.0.113.10");
    assert_eq!(source.mode, '^');
    assert_eq!(source.stratum, 8, "the server serves its local clock");
    assert!(source.reach > 0);
    let seen = read_counter(public, "ntp_from_private").unwrap();
    assert!(seen.packets > 0, "the server saw no NTP request");
    assert!(
        _server
            .client_addresses()
            .unwrap()
            .contains(&SnatLab::PRIVATE_ADDR),
        "chronyc clients on the server lists the private host"
    );
}

#[test]
fn chrony_acquisitionport_fixes_the_client_source_port() {
    let lab = routed_lab();
    let public = lab.public.name();
    install_counter(
        public,
        "ntp_sport_1123",
        Hook::Input,
        "ip saddr 198.18.0.2 udp sport 1123 udp dport 123",
    )
    .unwrap();
    install_counter(
        public,
        "ntp_other_sport",
        Hook::Input,
        "udp dport 123 udp sport != 1123",
    )
    .unwrap();
    let _server = NtpServer::start(public, SnatLab::PUBLIC_ADDR).expect("NTP server");
    let mut client = NtpClient::start(
        lab.private.name(),
        SnatLab::PUBLIC_ADDR,
        NtpClientOptions {
            acquisition_port: Some(1123),
        },
    )
    .expect("NTP client");
    client.wait_selected(SYNC_TIMEOUT).expect("chrony syncs");
    assert!(read_counter(public, "ntp_sport_1123").unwrap().packets > 0);
    assert_eq!(read_counter(public, "ntp_other_sport").unwrap().packets, 0);
}

#[test]
fn without_a_route_back_the_private_hosts_get_no_answers() {
    let lab = SnatLab::new().expect("build the SNAT lab");
    let public = lab.public.name();
    let private = lab.private.name();
    let route = lab.public.run("ip", ["route", "get", "198.18.0.2"]);
    assert!(
        route.is_err(),
        "the public side must have no route to the private network: {route:?}"
    );
    assert_eq!(
        lab.public
            .run("ip", ["route", "show", "default"])
            .unwrap()
            .trim(),
        ""
    );
    install_counter(
        public,
        "from_private",
        Hook::Input,
        "ip saddr 198.18.0.0/24",
    )
    .unwrap();

    let udp = UdpPeerEcho::start(public, SocketAddrV4::new(SnatLab::PUBLIC_ADDR, 5300)).unwrap();
    let socket = udp_bind(private, SocketAddrV4::new(SnatLab::PRIVATE_ADDR, 0)).unwrap();
    let err = udp_peer_roundtrip(&socket, udp.local_addr(), Duration::from_secs(1)).unwrap_err();
    assert!(format!("{err:#}").contains("no UDP reply"), "{err:#}");
    assert_eq!(udp.peers().len(), 1, "the datagram itself got through");
    assert_eq!(*udp.peers()[0].ip(), SnatLab::PRIVATE_ADDR);

    let tcp = TcpEchoServer::start(public, SocketAddrV4::new(SnatLab::PUBLIC_ADDR, 7000)).unwrap();
    let err = tcp_connect(private, None, tcp.local_addr(), Duration::from_secs(1)).unwrap_err();
    assert!(format!("{err:#}").contains("TCP connect"), "{err:#}");
    assert!(tcp.peers().is_empty());

    let _server = NtpServer::start(public, SnatLab::PUBLIC_ADDR).expect("NTP server");
    let mut client = NtpClient::start(private, SnatLab::PUBLIC_ADDR, NtpClientOptions::default())
        .expect("NTP client");
    // A few dozen polls at 62.5 ms: a reachable server would be selected long before.
    let err = client.wait_selected(Duration::from_secs(4)).unwrap_err();
    assert!(format!("{err:#}").contains("timed out"), "{err:#}");
    assert!(
        read_counter(public, "from_private").unwrap().packets >= 3,
        "requests reached the public side; only the answers had no way back"
    );
}

#[test]
fn servers_report_the_source_addresses_and_ports_they_see() {
    let lab = routed_lab();
    let public = lab.public.name();
    let private = lab.private.name();
    let near = TcpEchoServer::start(public, SocketAddrV4::new(SnatLab::PUBLIC_ADDR, 7000)).unwrap();
    let far =
        TcpEchoServer::start(public, SocketAddrV4::new(SnatLab::PUBLIC_FAR_ADDR, 7000)).unwrap();
    let a = SocketAddrV4::new(SnatLab::PRIVATE_ADDR, 20000);
    let b = SocketAddrV4::new(SnatLab::PRIVATE_ADDR2, 20000);
    let low = SocketAddrV4::new(SnatLab::PRIVATE_ADDR, 600);
    // The same local port towards two destinations needs SO_REUSEADDR: it is set.
    let flows = [
        (Some(a), near.local_addr()),
        (Some(b), near.local_addr()),
        (Some(low), near.local_addr()),
        (Some(a), far.local_addr()),
        (None, far.local_addr()),
    ];
    let mut streams = tcp_connect_all(private, &flows, Duration::from_secs(2)).unwrap();
    for (i, stream) in streams.iter_mut().enumerate() {
        tcp_roundtrip(
            stream,
            format!("hello {i}").as_bytes(),
            Duration::from_secs(2),
        )
        .unwrap();
    }
    assert_eq!(near.peers(), vec![a, b, low]);
    let far_peers = far.peers();
    assert_eq!(far_peers.len(), 2);
    assert_eq!(far_peers[0], a);
    assert_eq!(*far_peers[1].ip(), SnatLab::PRIVATE_ADDR);

    let mut seen: Vec<SocketAddrV4> = established_tcp(public, 7000)
        .unwrap()
        .into_iter()
        .filter(|c| c.local == near.local_addr())
        .map(|c| c.peer)
        .collect();
    seen.sort();
    let mut want = vec![a, b, low];
    want.sort();
    assert_eq!(seen, want);

    let udp =
        UdpPeerEcho::start(public, SocketAddrV4::new(SnatLab::PUBLIC_FAR_ADDR, 5300)).unwrap();
    let source = SocketAddrV4::new(SnatLab::PRIVATE_ADDR2, 700);
    let socket = udp_bind(private, source).unwrap();
    for _ in 0..3 {
        let peer = udp_peer_roundtrip(&socket, udp.local_addr(), Duration::from_secs(2)).unwrap();
        assert_eq!(peer, source);
    }
    assert_eq!(udp.peers(), vec![source; 3]);
}

#[test]
fn snat_lab_is_configured_and_removed() {
    let lab = routed_lab();
    let names: Vec<String> = lab.namespaces().iter().map(|s| s.to_string()).collect();
    for (ns, dev) in [
        (&lab.private, SnatLab::PRIVATE_IF),
        (&lab.public, SnatLab::PUBLIC_IF),
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
    let accept_local = lab
        .nat
        .run("sysctl", ["-n", "net.ipv4.conf.n0.accept_local"])
        .expect("sysctl");
    // Left at its default on purpose: the agent must set it (the end-to-end tests catch it).
    assert_eq!(
        accept_local.trim(),
        "0",
        "the lab must not do the agent's job of enabling accept_local"
    );
    let addrs = lab
        .nat
        .run(
            "ip",
            ["-4", "-o", "addr", "show", "dev", SnatLab::NAT_OUTSIDE_IF],
        )
        .unwrap();
    assert!(addrs.contains("203.0.113.1/24"), "{addrs}");
    drop(lab);
    for name in &names {
        assert!(
            !netns::exists(name),
            "namespace {name} removed with the lab"
        );
    }
}

#[test]
fn dnat_lab_backend_without_a_route_cannot_answer_the_client() {
    let lab = DnatLab::with_options(DnatLabOptions {
        backend_default_route: false,
    })
    .expect("build the DNAT lab without a backend route");
    assert!(!lab.options().backend_default_route);
    assert_eq!(
        lab.backend
            .run("ip", ["route", "show", "default"])
            .unwrap()
            .trim(),
        ""
    );
    let _echo = HttpEcho::start(lab.backend.name(), &[80]).expect("HTTP echo");
    let target = SocketAddrV4::new(DnatLab::BACKEND_ADDR, 80);
    let err = tcp_connect(lab.client.name(), None, target, Duration::from_secs(1)).unwrap_err();
    assert!(format!("{err:#}").contains("TCP connect"), "{err:#}");
    // The NAT's own address is on the backend's network: that is what MASQUERADE relies on.
    let body = http_get(lab.nat.name(), "http://198.18.1.2/").expect("GET from nat");
    let reply: EchoReply = body.parse().unwrap();
    assert_eq!(*reply.client.ip(), DnatLab::NAT_BACKEND_ADDR);
}
