//! Host tests of the sweep against [`MemStore`], including interleaved "kernel" activity.

use super::*;
use crate::dataplane::MemStore;
use nat_common::conntrack::{Mapping, SESSION_DNAT};
use proptest::prelude::*;

const SEC: u64 = 1_000_000_000;

fn timeouts() -> Timeouts {
    Timeouts {
        udp: Duration::from_secs(300),
        tcp_established: Duration::from_secs(7440),
        tcp_transitory: Duration::from_secs(240),
        tcp_closed: Duration::from_secs(10),
        icmp: Duration::from_secs(60),
    }
}

fn config(max_visits: usize) -> GcConfig {
    GcConfig {
        timeouts: timeouts(),
        max_sessions: 1024,
        max_visits,
        ports: PortCapacity::default(),
    }
}

fn inside(host: u8, port: u16, p: u8) -> Endpoint {
    Endpoint {
        addr: [198, 18, 0, host],
        port: port.to_be_bytes(),
        proto: p,
        _pad: 0,
    }
}

fn external(port: u16, p: u8) -> Endpoint {
    Endpoint {
        addr: [203, 0, 113, 1],
        port: port.to_be_bytes(),
        proto: p,
        _pad: 0,
    }
}

/// An SNAT session of `inside` towards `remote`:`rport`, through `ext`.
fn snat_session(
    inside: Endpoint,
    ext: Endpoint,
    remote: u8,
    rport: u16,
    last_seen: u64,
) -> (FlowKey, Session) {
    let key = FlowKey {
        src: inside.addr,
        dst: [192, 0, 2, remote],
        sport: inside.port,
        dport: rport.to_be_bytes(),
        proto: inside.proto,
        _pad: [0; 3],
    };
    let session = Session {
        translated: FlowKey {
            src: ext.addr,
            sport: ext.port,
            ..key
        },
        last_seen_ns: last_seen,
        created_ns: last_seen,
        tcp_state: if inside.proto == proto::TCP {
            TcpState::Established as u8
        } else {
            0
        },
        flags: SESSION_SNAT,
        ..Default::default()
    };
    (key, session)
}

/// Runs until a pass completes (bounded), returning the reports.
fn complete_pass(gc: &mut Gc, store: &mut MemStore, now: u64) -> Vec<RunReport> {
    let mut reports = Vec::new();
    for _ in 0..10_000 {
        let r = gc.run(store, now).unwrap();
        let done = r.pass_completed;
        reports.push(r);
        if done {
            return reports;
        }
    }
    panic!("no pass completed in 10000 runs");
}

#[test]
fn timeouts_follow_protocol_and_tcp_state() {
    let t = timeouts();
    assert_eq!(
        timeout_for(proto::TCP, TcpState::Established as u8, &t),
        t.tcp_established
    );
    assert_eq!(
        timeout_for(proto::TCP, TcpState::Closed as u8, &t),
        t.tcp_closed
    );
    for s in [
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::FinOrig,
        TcpState::FinReply,
        TcpState::TimeWait,
    ] {
        assert_eq!(
            timeout_for(proto::TCP, s as u8, &t),
            t.tcp_transitory,
            "{s:?}"
        );
    }
    assert_eq!(timeout_for(proto::UDP, 0, &t), t.udp);
    assert_eq!(timeout_for(proto::ICMP, 0, &t), t.icmp);
}

#[test]
fn expiry_is_strictly_after_the_timeout() {
    let t = timeouts();
    let (key, mut s) = snat_session(
        inside(2, 4000, proto::UDP),
        external(4000, proto::UDP),
        5,
        53,
        100 * SEC,
    );
    assert!(!is_expired(&key, &s, 400 * SEC, &t), "exactly 300 s idle");
    assert!(is_expired(&key, &s, 400 * SEC + 1, &t));
    s.last_seen_ns = 500 * SEC;
    assert!(
        !is_expired(&key, &s, 400 * SEC, &t),
        "refreshed after the clock was read"
    );
}

#[test]
fn sweep_expires_sessions_with_their_replies_and_keeps_live_ones() {
    let mut store = MemStore::default();
    let now = 10_000 * SEC;
    let a = inside(2, 4000, proto::UDP);
    let b = inside(3, 5000, proto::TCP);
    let (k_old, s_old) = snat_session(a, external(4000, proto::UDP), 5, 53, now - 301 * SEC);
    let (k_new, s_new) = snat_session(a, external(4000, proto::UDP), 6, 53, now - 10 * SEC);
    let (k_tcp, s_tcp) = snat_session(b, external(5000, proto::TCP), 5, 443, now - 7000 * SEC);
    for (k, s) in [(k_old, s_old), (k_new, s_new), (k_tcp, s_tcp)] {
        store.insert_session(k, s);
    }
    let mut gc = Gc::new(config(MAX_VISITS_PER_RUN));
    let reports = complete_pass(&mut gc, &mut store, now);
    assert_eq!(reports.len(), 1, "a small table takes one run");
    assert_eq!(reports[0].expired.udp, 1);
    assert_eq!(reports[0].expired.total(), 1);
    assert!(!store.sessions.contains_key(&k_old));
    assert!(!store.replies.contains_key(&s_old.translated.reversed()));
    assert!(store.sessions.contains_key(&k_new) && store.sessions.contains_key(&k_tcp));
    assert_eq!(store.replies.len(), 2);
    assert_eq!(gc.status().sessions_in_use, 2);
    assert_eq!(gc.status().expiries.udp, 1);
}

#[test]
fn mappings_live_while_used_or_recently_picked_up() {
    let mut store = MemStore::default();
    let now = 10_000 * SEC;
    let used = inside(2, 4000, proto::UDP);
    let idle = inside(3, 4001, proto::UDP);
    let recent = inside(4, 4002, proto::UDP);
    for (ep, port, last_used) in [(used, 4000, 0), (idle, 4001, 0), (recent, 4002, now)] {
        store.insert_mapping(
            ep,
            Mapping {
                external: external(port, proto::UDP),
                last_used_ns: last_used,
            },
        );
    }
    let (k, s) = snat_session(used, external(4000, proto::UDP), 5, 53, now);
    store.insert_session(k, s);
    // A DNAT-only session of the idle host does not hold its SNAT mapping.
    let (k2, mut s2) = snat_session(idle, external(4001, proto::UDP), 6, 53, now);
    s2.flags = SESSION_DNAT;
    store.insert_session(k2, s2);

    let mut gc = Gc::new(config(MAX_VISITS_PER_RUN));
    complete_pass(&mut gc, &mut store, now);
    assert!(store.mappings.contains_key(&used));
    assert!(!store.mappings.contains_key(&idle));
    assert!(
        !store.bindings.contains_key(&external(4001, proto::UDP)),
        "its port claim goes with it"
    );
    assert!(
        store.mappings.contains_key(&recent),
        "picked up at the pass start"
    );
    assert_eq!(gc.status().mappings_expired, 1);
}

#[test]
fn orphans_go_only_after_the_grace_and_a_second_look() {
    let mut store = MemStore::default();
    let now = 10_000 * SEC;
    let (k, s) = snat_session(
        inside(2, 4000, proto::UDP),
        external(4000, proto::UDP),
        5,
        53,
        now,
    );
    // The kernel wrote the reply entry and the port claim, but not the session or mapping.
    store.replies.insert(s.translated.reversed(), k);
    store
        .bindings
        .insert(external(4000, proto::UDP), inside(2, 4000, proto::UDP));
    let mut gc = Gc::new(config(MAX_VISITS_PER_RUN));
    complete_pass(&mut gc, &mut store, now);
    assert_eq!(store.replies.len(), 1, "first sight: only suspected");
    assert_eq!(store.bindings.len(), 1);
    assert_eq!(gc.status().ports[0].in_use, 1);
    complete_pass(&mut gc, &mut store, now + SEC);
    assert_eq!(store.replies.len(), 1, "within the grace");
    // The kernel finished the session in the meantime: not an orphan any more.
    store.sessions.insert(k, s);
    complete_pass(&mut gc, &mut store, now + 3 * SEC);
    assert_eq!(store.replies.len(), 1);
    assert_eq!(
        store.bindings.len(),
        0,
        "the claim without a mapping is gone"
    );
    assert_eq!(gc.status().orphans_removed, 1);
    assert!(gc.status().ports.is_empty());
}

/// A session table whose "kernel" refreshes every session right after a page is read: the
/// page then holds stale timestamps.
struct RefreshedAfterRead {
    table: std::cell::RefCell<BTreeMap<FlowKey, Session>>,
    refresh_to: u64,
}

impl crate::dataplane::KvTable<FlowKey, Session> for RefreshedAfterRead {
    fn get(&self, key: &FlowKey) -> Result<Option<Session>> {
        Ok(self.table.borrow().get(key).copied())
    }
    fn remove(&mut self, key: &FlowKey) -> Result<bool> {
        Ok(self.table.borrow_mut().remove(key).is_some())
    }
    fn walk(&self, from: Option<&FlowKey>, limit: usize) -> Result<Walk<FlowKey, Session>> {
        let page = crate::dataplane::KvTable::walk(&*self.table.borrow(), from, limit)?;
        for s in self.table.borrow_mut().values_mut() {
            s.last_seen_ns = self.refresh_to;
        }
        Ok(page)
    }
}

struct RacyStore {
    sessions: RefreshedAfterRead,
    rest: MemStore,
}

impl SessionStore for RacyStore {
    fn sessions(&mut self) -> &mut dyn crate::dataplane::KvTable<FlowKey, Session> {
        &mut self.sessions
    }
    fn replies(&mut self) -> &mut dyn crate::dataplane::KvTable<FlowKey, FlowKey> {
        &mut self.rest.replies
    }
    fn mappings(&mut self) -> &mut dyn crate::dataplane::KvTable<Endpoint, Mapping> {
        &mut self.rest.mappings
    }
    fn bindings(&mut self) -> &mut dyn crate::dataplane::KvTable<Endpoint, Endpoint> {
        &mut self.rest.bindings
    }
}

#[test]
fn a_session_refreshed_after_its_page_was_read_is_kept() {
    let now = 10_000 * SEC;
    let mut rest = MemStore::default();
    for i in 0..10u16 {
        let (k, s) = snat_session(
            inside(1, 100 + i, proto::UDP),
            external(100 + i, proto::UDP),
            5,
            53,
            now - 400 * SEC,
        );
        rest.insert_session(k, s);
    }
    let mut store = RacyStore {
        sessions: RefreshedAfterRead {
            table: std::cell::RefCell::new(std::mem::take(&mut rest.sessions)),
            refresh_to: now,
        },
        rest,
    };
    let mut gc = Gc::new(config(MAX_VISITS_PER_RUN));
    let r = gc.run(&mut store, now).unwrap();
    assert_eq!(r.expired.total(), 0);
    assert_eq!(store.sessions.table.borrow().len(), 10);
    assert_eq!(store.rest.replies.len(), 10);
}

#[test]
fn runs_are_bounded_and_resume_where_they_stopped() {
    let mut store = MemStore::default();
    let now = 10_000 * SEC;
    for i in 0..200u16 {
        let ep = inside((i % 50) as u8 + 1, 10_000 + i, proto::UDP);
        let last = if i % 2 == 0 { now - 400 * SEC } else { now };
        let (k, s) = snat_session(ep, external(10_000 + i, proto::UDP), 5, 53, last);
        store.insert_session(k, s);
        store.insert_mapping(
            ep,
            Mapping {
                external: external(10_000 + i, proto::UDP),
                last_used_ns: 0,
            },
        );
    }
    let mut gc = Gc::new(config(25));
    let reports = complete_pass(&mut gc, &mut store, now);
    assert!(reports.len() > 10, "{} runs", reports.len());
    // A run may overshoot by the few lookups of its last entries, never by a page.
    assert!(reports.iter().all(|r| r.visited <= 25 + 3), "{reports:?}");
    assert_eq!(store.sessions.len(), 100);
    assert_eq!(store.replies.len(), 100);
    assert_eq!(store.mappings.len(), 100);
    assert_eq!(store.bindings.len(), 100);
    assert_eq!(gc.status().sessions_in_use, 100);
}

#[test]
fn a_lost_cursor_restarts_the_pass() {
    let mut store = MemStore::default();
    let now = 10_000 * SEC;
    for i in 0..20u16 {
        let (k, s) = snat_session(
            inside(1, 1000 + i, proto::UDP),
            external(1000 + i, proto::UDP),
            5,
            53,
            now - 400 * SEC,
        );
        store.insert_session(k, s);
    }
    let mut gc = Gc::new(config(5));
    gc.run(&mut store, now).unwrap();
    // Someone (the sessions API) deletes everything, cursor included.
    let keys: Vec<_> = store.sessions.keys().copied().collect();
    for k in keys {
        let s = store.sessions[&k];
        store.delete_session(&k, &s).unwrap();
    }
    let (k, s) = snat_session(
        inside(9, 9, proto::UDP),
        external(9, proto::UDP),
        5,
        53,
        now,
    );
    store.insert_session(k, s);
    complete_pass(&mut gc, &mut store, now);
    assert_eq!(gc.status().sessions_in_use, 1);
    assert_eq!(store.sessions.len(), 1);
}

#[test]
fn pressure_from_sessions_and_from_ports() {
    let now = 10_000 * SEC;
    let mut store = MemStore::default();
    for i in 0..930u16 {
        let (k, s) = snat_session(
            inside(1, i + 1, proto::UDP),
            external(i + 1, proto::UDP),
            5,
            53,
            now,
        );
        store.insert_session(k, s);
    }
    let mut gc = Gc::new(config(MAX_VISITS_PER_RUN));
    let r = gc.run(&mut store, now).unwrap();
    assert!(r.pass_completed);
    assert_eq!(
        r.pressure,
        Some(Pressure::Sessions {
            in_use: 930,
            capacity: 1024
        })
    );
    assert!(r.pressure_began);
    assert_eq!(next_delay(&r, Duration::from_secs(5)), Duration::ZERO);
    let r = gc.run(&mut store, now).unwrap();
    assert!(!r.pressure_began, "logged and reported once");
    assert_eq!(
        next_delay(&r, Duration::from_secs(5)),
        Duration::from_secs(1)
    );

    // Ports: 10 ports on one address, 10 claimed.
    let rule = SnatRule {
        id: 1,
        name: "s".into(),
        source: "198.18.0.0/24".parse().unwrap(),
        destination: Default::default(),
        protocol: Some(proto::UDP),
        out_interface: None,
        action: SnatAction::ToAddresses {
            addresses: vec![Ipv4Addr::new(203, 0, 113, 1)],
            ports: PortRange {
                min: 2000,
                max: 2009,
            },
        },
    };
    let mut store = MemStore::default();
    for i in 0..10u16 {
        let ep = inside(1, i + 1, proto::UDP);
        store.insert_mapping(
            ep,
            Mapping {
                external: external(2000 + i, proto::UDP),
                last_used_ns: now,
            },
        );
    }
    let mut gc = Gc::new(GcConfig {
        ports: PortCapacity::from_rules(&[rule]),
        ..config(MAX_VISITS_PER_RUN)
    });
    let r = gc.run(&mut store, now).unwrap();
    let Some(Pressure::Ports(p)) = &r.pressure else {
        panic!("{r:?}")
    };
    assert_eq!((p.in_use, p.capacity), (10, 10));
    assert_eq!(
        r.pressure.as_ref().unwrap().to_string(),
        "203.0.113.1 udp ports 10 of 10 in use"
    );
}

#[test]
fn port_capacity_unions_ranges_and_falls_back_to_masquerade() {
    let rule = |id, protocol, action| SnatRule {
        id,
        name: format!("r{id}"),
        source: "198.18.0.0/24".parse().unwrap(),
        destination: Default::default(),
        protocol,
        out_interface: None,
        action,
    };
    let a = Ipv4Addr::new(203, 0, 113, 1);
    let rules = [
        rule(
            1,
            None,
            SnatAction::ToAddresses {
                addresses: vec![a],
                ports: PortRange {
                    min: 1000,
                    max: 1999,
                },
            },
        ),
        rule(
            2,
            Some(proto::TCP),
            SnatAction::ToAddresses {
                addresses: vec![a],
                ports: PortRange {
                    min: 1500,
                    max: 2499,
                },
            },
        ),
        rule(
            3,
            None,
            SnatAction::Masquerade {
                ports: PortRange {
                    min: 1024,
                    max: 65535,
                },
            },
        ),
        rule(4, None, SnatAction::NoNat),
    ];
    let c = PortCapacity::from_rules(&rules);
    assert_eq!(c.capacity(a, proto::TCP), 1500);
    assert_eq!(c.capacity(a, proto::UDP), 1000);
    assert_eq!(
        c.capacity(Ipv4Addr::new(198, 51, 100, 9), proto::UDP),
        64512
    );
    let usage = c.usage(&BTreeMap::from([(
        (Ipv4Addr::new(198, 51, 100, 9), proto::UDP),
        3,
    )]));
    let rows: Vec<(String, &str, u64, u64)> = usage
        .iter()
        .map(|u| {
            (
                u.address.to_string(),
                protocol_name(u.protocol),
                u.in_use,
                u.capacity,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("198.51.100.9".to_string(), "udp", 3, 64512),
            ("203.0.113.1".to_string(), "icmp", 0, 1000),
            ("203.0.113.1".to_string(), "tcp", 0, 1500),
            ("203.0.113.1".to_string(), "udp", 0, 1000),
        ]
    );
    assert_eq!(union_len(vec![]), 0);
    assert_eq!(
        union_len(vec![
            PortRange { min: 1, max: 65535 },
            PortRange { min: 5, max: 6 }
        ]),
        65535
    );
}

#[test]
fn delays_between_runs() {
    let i = Duration::from_secs(5);
    let done = RunReport {
        pass_completed: true,
        ..Default::default()
    };
    assert_eq!(next_delay(&done, i), i);
    assert_eq!(next_delay(&RunReport::default(), i), Duration::from_secs(1));
    assert_eq!(
        next_delay(&RunReport::default(), Duration::from_secs(1)),
        Duration::from_millis(200)
    );
}

#[test]
fn boottime_moves_forward() {
    let a = boottime_ns();
    let b = boottime_ns();
    assert!(a > 0 && b >= a);
}

/// One generated flow: inside host and port, remote, protocol, idle seconds, whether SNAT.
type FlowSpec = (u8, u16, u8, u8, u64, bool);

fn proto_of(i: u8) -> u8 {
    [proto::TCP, proto::UDP, proto::ICMP][usize::from(i % 3)]
}

/// Builds a consistent store from specs (a mapping per inside endpoint of SNAT flows, with
/// `last_used` idle seconds ago).
fn build(specs: &[FlowSpec], now: u64, mapping_idle: &[u64]) -> MemStore {
    let mut store = MemStore::default();
    for (i, &(host, port, remote, p, idle, snat)) in specs.iter().enumerate() {
        let ep = inside(host % 8 + 1, port % 64 + 1000, proto_of(p));
        let ext = external(u16::from(host % 8) * 100 + port % 64 + 1000, ep.proto);
        let (k, mut s) = snat_session(ep, ext, remote % 4, 53, now - idle * SEC);
        if !snat {
            s.flags = SESSION_DNAT;
        }
        if store.sessions.contains_key(&k) || store.replies.contains_key(&s.translated.reversed()) {
            continue;
        }
        store.insert_session(k, s);
        if snat && !store.mappings.contains_key(&ep) {
            let idle = mapping_idle.get(i).copied().unwrap_or(0);
            store.insert_mapping(
                ep,
                Mapping {
                    external: ext,
                    last_used_ns: now - idle * SEC,
                },
            );
        }
    }
    store
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// A pass deletes exactly the expired sessions, each with its reply entry, never a mapping
    /// that a remaining session uses, and leaves the tables consistent; whatever the budget.
    #[test]
    fn a_pass_deletes_exactly_the_expired(
        specs in prop::collection::vec((any::<u8>(), any::<u16>(), any::<u8>(), any::<u8>(), 0u64..8000, any::<bool>()), 0..120),
        mapping_idle in prop::collection::vec(0u64..1000, 0..120),
        budget in 1usize..64,
    ) {
        let now = 100_000 * SEC;
        let mut store = build(&specs, now, &mapping_idle);
        let before = store.clone();
        let mut gc = Gc::new(config(budget));
        complete_pass(&mut gc, &mut store, now);
        let t = timeouts();
        for (k, s) in &before.sessions {
            let expired = is_expired(k, s, now, &t);
            prop_assert_eq!(store.sessions.contains_key(k), !expired, "session {:?}", k);
            // Reply entries live and die with their session.
            prop_assert_eq!(store.replies.contains_key(&s.translated.reversed()), !expired);
        }
        for (k, s) in &store.sessions {
            if let Some(ep) = inside_endpoint(k, s) {
                prop_assert_eq!(store.mappings.get(&ep), before.mappings.get(&ep), "mapping of a live session");
            }
        }
        for (ep, m) in &store.mappings {
            prop_assert_eq!(store.bindings.get(&m.external), Some(ep));
        }
        prop_assert_eq!(store.bindings.len(), store.mappings.len());
        prop_assert_eq!(gc.status().sessions_in_use, store.sessions.len() as u64);
    }

    /// With the "kernel" creating and refreshing sessions between runs, a session seen less
    /// than its timeout ago is never deleted, and a mapping any session uses is never deleted.
    #[test]
    fn concurrent_activity_never_loses_live_state(
        specs in prop::collection::vec((any::<u8>(), any::<u16>(), any::<u8>(), any::<u8>(), 0u64..8000, any::<bool>()), 1..80),
        activity in prop::collection::vec((any::<u8>(), any::<u16>(), any::<u8>(), any::<u8>(), any::<bool>()), 0..80),
        budget in 1usize..32,
        passes in 1usize..4,
    ) {
        let mut now = 100_000 * SEC;
        let mut store = build(&specs, now, &[]);
        let mut gc = Gc::new(config(budget));
        let mut activity = activity.into_iter();
        let t = timeouts();
        for _ in 0..passes {
            loop {
                let before = store.clone();
                let report = gc.run(&mut store, now).unwrap();
                // Nothing seen within its timeout at `now` disappeared.
                for (k, s) in &before.sessions {
                    if !is_expired(k, s, now, &t) {
                        prop_assert!(store.sessions.contains_key(k));
                    }
                }
                // Kernel activity between runs, at a later time.
                now += SEC;
                if let Some((host, port, remote, p, refresh)) = activity.next() {
                    let ep = inside(host % 8 + 1, port % 64 + 1000, proto_of(p));
                    if refresh {
                        if let Some((k, _)) = store.sessions.iter().nth(usize::from(host) % store.sessions.len().max(1)).map(|(k, s)| (*k, *s)) {
                            store.sessions.get_mut(&k).unwrap().last_seen_ns = now;
                        }
                    } else {
                        // New session: reuse the inside endpoint's mapping (refreshing its
                        // last use) or create one, as the kernel does.
                        let ext = match store.mappings.get_mut(&ep) {
                            Some(m) => {
                                m.last_used_ns = now;
                                Some(m.external)
                            }
                            None => {
                                let ext = external(u16::from(host % 8) * 100 + port % 64 + 1000, ep.proto);
                                // A claimed port is a failed allocation: no session.
                                (!store.bindings.contains_key(&ext)).then(|| {
                                    store.insert_mapping(ep, Mapping { external: ext, last_used_ns: now });
                                    ext
                                })
                            }
                        };
                        if let Some(ext) = ext {
                            let (k, s) = snat_session(ep, ext, remote % 4 + 10, 53, now);
                            if !store.sessions.contains_key(&k) && !store.replies.contains_key(&s.translated.reversed()) {
                                store.insert_session(k, s);
                            }
                        }
                    }
                }
                now += SEC;
                // Every live SNAT session still has its mapping.
                for (k, s) in &store.sessions {
                    if let Some(ep) = inside_endpoint(k, s) {
                        if before.mappings.contains_key(&ep) || store.mappings.contains_key(&ep) {
                            prop_assert!(store.mappings.contains_key(&ep), "mapping of {:?} lost", ep);
                        }
                    }
                }
                if report.pass_completed {
                    break;
                }
            }
        }
    }
}
