//! The session store over real kernel hash maps: the agent's resumable walk (its own
//! `BPF_MAP_GET_NEXT_KEY`), point reads, deletes of absent keys, the composite deletions, and
//! one expiry pass. The maps are created here with the layouts of `nat_common::conntrack`, so
//! this runs whatever state the XDP program is in; it needs root (CAP_BPF) and fails rather
//! than skips without it.

use std::os::fd::{FromRawFd, OwnedFd};

use aya::maps::{HashMap, Map, MapData};
use nat_agent::{
    dataplane::{KernelSessions, SessionStore, Walk},
    gc::{Gc, GcConfig, PortCapacity},
    model::Timeouts,
};
use nat_common::conntrack::{Endpoint, FlowKey, Mapping, Session, SESSION_SNAT};

/// `BPF_MAP_CREATE` and `BPF_MAP_TYPE_HASH` (uapi, stable).
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_TYPE_HASH: u32 = 1;

#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// A new kernel hash map for `K` -> `V`, as two fds (one for the store under test, one for the
/// test to write through, as the XDP program would).
fn hash_map<K, V>(max_entries: u32) -> (Map, Map) {
    let attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_HASH,
        key_size: size_of::<K>() as u32,
        value_size: size_of::<V>() as u32,
        max_entries,
        map_flags: 0,
    };
    // SAFETY: a valid BPF_MAP_CREATE attribute, read by the kernel during the call only.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            std::ptr::from_ref(&attr),
            size_of::<MapCreateAttr>(),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE failed: {} (this test needs root / CAP_BPF)",
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let dup = fd.try_clone().expect("dup map fd");
    let wrap = |fd| Map::HashMap(MapData::from_fd(fd).expect("map info"));
    (wrap(fd), wrap(dup))
}

struct Tables {
    store: KernelSessions,
    sessions: HashMap<MapData, FlowKey, Session>,
    replies: HashMap<MapData, FlowKey, FlowKey>,
    mappings: HashMap<MapData, Endpoint, Mapping>,
    bindings: HashMap<MapData, Endpoint, Endpoint>,
}

fn tables() -> Tables {
    let (s, s2) = hash_map::<FlowKey, Session>(1024);
    let (r, r2) = hash_map::<FlowKey, FlowKey>(1024);
    let (m, m2) = hash_map::<Endpoint, Mapping>(1024);
    let (b, b2) = hash_map::<Endpoint, Endpoint>(1024);
    Tables {
        store: KernelSessions::new(s, r, m, b).expect("store"),
        sessions: HashMap::try_from(s2).unwrap(),
        replies: HashMap::try_from(r2).unwrap(),
        mappings: HashMap::try_from(m2).unwrap(),
        bindings: HashMap::try_from(b2).unwrap(),
    }
}

fn key(n: u16) -> FlowKey {
    FlowKey {
        src: [198, 18, 0, 2],
        dst: [203, 0, 113, 5],
        sport: n.to_be_bytes(),
        dport: 53u16.to_be_bytes(),
        proto: 17,
        _pad: [0; 3],
    }
}

fn inside(n: u16) -> Endpoint {
    Endpoint {
        addr: [198, 18, 0, 2],
        port: n.to_be_bytes(),
        proto: 17,
        _pad: 0,
    }
}

fn external(n: u16) -> Endpoint {
    Endpoint {
        addr: [203, 0, 113, 1],
        port: (n + 1000).to_be_bytes(),
        proto: 17,
        _pad: 0,
    }
}

fn session(n: u16, last_seen_ns: u64) -> Session {
    Session {
        translated: FlowKey {
            src: external(n).addr,
            sport: external(n).port,
            ..key(n)
        },
        last_seen_ns,
        flags: SESSION_SNAT,
        ..Default::default()
    }
}

/// Inserts a session as the kernel does: session, reply entry, mapping, port claim.
fn insert(t: &mut Tables, n: u16, last_seen_ns: u64) {
    let s = session(n, last_seen_ns);
    t.sessions.insert(key(n), s, 0).unwrap();
    t.replies
        .insert(s.translated.reversed(), key(n), 0)
        .unwrap();
    let m = Mapping {
        external: external(n),
        last_used_ns: 0,
    };
    t.mappings.insert(inside(n), m, 0).unwrap();
    t.bindings.insert(external(n), inside(n), 0).unwrap();
}

#[test]
fn walks_resume_from_a_cursor_and_notice_a_lost_one() {
    let mut t = tables();
    for n in 1..=100 {
        insert(&mut t, n, 1);
    }
    let sessions = t.store.sessions();
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let Walk::Page { entries, next } = sessions.walk(cursor.as_ref(), 7).unwrap() else {
            panic!("lost cursor without deletions")
        };
        assert!(entries.len() <= 7);
        seen.extend(entries.iter().map(|(k, _)| u16::from_be_bytes(k.sport)));
        match next {
            Some(k) => cursor = Some(k),
            None => break,
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        (1..=100).collect::<Vec<_>>(),
        "every key exactly once"
    );

    // A cursor deleted since is reported, not silently restarted from the first key.
    let Walk::Page { next, .. } = sessions.walk(None, 10).unwrap() else {
        panic!()
    };
    let cursor = next.expect("more than 10 keys");
    assert!(sessions.remove(&cursor).unwrap());
    assert!(
        !sessions.remove(&cursor).unwrap(),
        "absent key: false, not an error"
    );
    assert_eq!(sessions.walk(Some(&cursor), 10).unwrap(), Walk::Lost);
    assert_eq!(sessions.get(&cursor).unwrap(), None);
}

#[test]
fn composite_deletes_and_an_expiry_pass_on_kernel_maps() {
    let mut t = tables();
    let now = 1_000_000 * 1_000_000_000u64;
    for n in 1..=20 {
        // Odd ports idle for 400 s (past the 300 s UDP timeout), even ones fresh.
        let last = if n % 2 == 1 {
            now - 400_000_000_000
        } else {
            now
        };
        insert(&mut t, n, last);
    }
    assert!(t.store.delete_session(&key(2), &session(2, now)).unwrap());
    assert!(t
        .replies
        .get(&session(2, now).translated.reversed(), 0)
        .is_err());

    let mut gc = Gc::new(GcConfig {
        timeouts: Timeouts::default(),
        max_sessions: 1024,
        max_visits: 16,
        ports: PortCapacity::default(),
    });
    let mut runs = 0;
    loop {
        runs += 1;
        assert!(runs < 100, "no pass completed");
        if gc.run(&mut t.store, now).unwrap().pass_completed {
            break;
        }
    }
    assert!(runs > 1, "a budget of 16 takes several runs");
    let left: Vec<u16> = t
        .sessions
        .keys()
        .map(|k| u16::from_be_bytes(k.unwrap().sport))
        .collect();
    assert_eq!(left.len(), 9, "{left:?}");
    assert!(left.iter().all(|n| n % 2 == 0));
    assert_eq!(t.replies.keys().count(), 9);
    // Mappings of the expired sessions and of the deleted one went with their port claims.
    assert_eq!(t.mappings.keys().count(), 9);
    assert_eq!(t.bindings.keys().count(), 9);
    assert_eq!(gc.status().expiries.udp, 10);
    assert_eq!(gc.status().sessions_in_use, 9);
}
