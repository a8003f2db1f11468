//! Fragments through connection-tracked SNAT, run through the real XDP object with
//! BPF_PROG_TEST_RUN: the first fragment (it carries the ports) is translated by its session
//! and remembered by datagram id in `FRAGMENTS`; later fragments get the same addresses from
//! there (`fragment_translated`). Later fragments whose first fragment is not remembered (out
//! of order, evicted, expired) are never rewritten with made-up ports.
//!
//! Every expected frame is built from scratch (fresh checksums) from the translated
//! description of the whole datagram, then cut into the same fragments; the translated
//! fragments must reassemble into a datagram whose L4 checksum is valid.
//!
//! Needs root (loads BPF). Never skips.

mod common;

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use common::{
    packet::{addr, verify_reassembled_l4_checksum, L4Check, Packet, L4},
    xdp::{Dir, Expect, Fixture, XDP_PASS},
};
use nat_agent::dataplane::SessionStore;
use nat_common::{
    conntrack::Endpoint,
    frag::{FragEntry, FragKey},
    ipv4::proto,
    maps::{FRAGMENTS, MAX_FRAGMENTS},
    stats::Reason,
};

const H1: &str = "198.18.0.2";
const SRV: &str = "198.51.100.53";
const EXT: &str = "203.0.113.1";

const POOL: &str = common::xdp::SNAT_ONE_ADDRESS;

/// Where the fragments are cut (IP payload offsets): three fragments.
const CUTS: [usize; 2] = [40, 80];

fn payload() -> Vec<u8> {
    (0..120u8).map(|i| i.wrapping_mul(29)).collect()
}

/// The external endpoint `MAPPINGS` holds for an inside endpoint.
fn mapped(fx: &mut Fixture, inside: Endpoint) -> Endpoint {
    fx.conntrack()
        .mappings()
        .get(&inside)
        .expect("reading MAPPINGS")
        .unwrap_or_else(|| panic!("no mapping for {inside:?}"))
        .external
}

fn endpoint(address: &str, port: u16, protocol: u8) -> Endpoint {
    Endpoint {
        addr: addr(address).octets(),
        port: port.to_be_bytes(),
        proto: protocol,
        _pad: 0,
    }
}

/// Checks the later fragments of `inputs` (index 1 on) against those of `wanted`: each must be
/// translated from the cache and counted by `rule`; returns the outputs.
fn later_fragments(
    fx: &Fixture,
    what: &str,
    inputs: &[Packet],
    wanted: &[Packet],
    rule: (&'static str, Dir),
) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for i in 1..inputs.len() {
        let got = fx.check(
            &format!("{what}: fragment {i}"),
            &inputs[i].build(),
            &Expect::fragment(wanted[i].build(), &[rule]),
        );
        assert_eq!(got.l4, Some(L4Check::NotApplicable), "{what}: fragment {i}");
        out.push(got.frame);
    }
    out
}

fn assert_reassembles(what: &str, frames: &[Vec<u8>]) {
    let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    assert_eq!(
        verify_reassembled_l4_checksum(&refs),
        Ok(L4Check::Valid),
        "{what}: the translated fragments reassemble into a valid datagram"
    );
}

/// A UDP datagram and an ICMP echo, both fragmented, leave through SNAT and their fragmented
/// replies come back: the first fragment creates (or uses) the session, the later ones follow
/// it in both directions, and every set reassembles with a valid checksum.
#[test]
fn snat_fragments_in_order_follow_their_first_fragment_both_ways() {
    let mut fx = Fixture::load(POOL);
    let udp = Packet::udp(H1, 40000, SRV, 9000)
        .with_payload(payload())
        .with_ident(0x0101);
    let echo = Packet::icmp_echo(H1, SRV)
        .with_payload(payload())
        .with_ident(0x0102);
    for (what, whole) in [("UDP", udp), ("ICMP echo", echo)] {
        let inputs = whole.fragments(&CUTS);
        let observed = fx.observe(&inputs[0].build());
        assert_eq!(
            observed.reasons(),
            [(Reason::SessionNew, 1)],
            "{what}: the first fragment starts the flow"
        );
        let inside = match &whole.l4 {
            L4::Udp { sport, .. } => endpoint(H1, *sport, proto::UDP),
            L4::Icmp { rest, .. } => {
                endpoint(H1, u16::from_be_bytes([rest[0], rest[1]]), proto::ICMP)
            }
            other => panic!("fixture bug: {other:?}"),
        };
        let ext = mapped(&mut fx, inside);
        assert_eq!(
            ext,
            endpoint(EXT, u16::from_be_bytes(inside.port), inside.proto)
        );
        // The whole datagram as it must leave: only the source changes (port and echo id
        // are free, so kept).
        let translated = whole.clone().with_src(EXT);
        let wanted = translated.fragments(&CUTS);
        let first = fx.verify(
            &format!("{what}: first fragment"),
            &observed,
            &Expect::session(
                Reason::SessionNew,
                wanted[0].build(),
                &[("out", Dir::Original)],
            ),
        );
        assert_eq!(first.l4, Some(L4Check::NeedsReassembly));
        let mut frames = vec![first.frame];
        frames.extend(later_fragments(
            &fx,
            what,
            &inputs,
            &wanted,
            ("out", Dir::Original),
        ));
        assert_reassembles(what, &frames);

        // The answer, fragmented too, to the external endpoint.
        let answer = match &whole.l4 {
            L4::Udp { .. } => Packet::udp(SRV, 9000, EXT, 40000).with_payload(payload()),
            _ => Packet::icmp_echo_reply(SRV, EXT).with_payload(payload()),
        }
        .with_ident(0x0201);
        let back = answer.clone().with_dst(H1);
        let inputs = answer.fragments(&CUTS);
        let wanted = back.fragments(&CUTS);
        let first = fx.check(
            &format!("{what}: first fragment of the reply"),
            &inputs[0].build(),
            &Expect::session(
                Reason::SessionReply,
                wanted[0].build(),
                &[("out", Dir::Reply)],
            ),
        );
        let mut frames = vec![first.frame];
        frames.extend(later_fragments(
            &fx,
            &format!("{what} reply"),
            &inputs,
            &wanted,
            ("out", Dir::Reply),
        ));
        assert_reassembles(&format!("{what} reply"), &frames);
    }
}

/// Out of order: a later fragment that arrives before its first fragment has nothing to be
/// translated with. Leaving an inside host it is dropped (`snat_fragment`: passing it would
/// show the inside address); arriving for the external address it goes to the kernel
/// untouched (`no_match`). Once the first fragment has been translated, the rest follow.
#[test]
fn snat_fragments_out_of_order_are_never_guessed() {
    let mut fx = Fixture::load(POOL);
    let whole = Packet::udp(H1, 40000, SRV, 9000)
        .with_payload(payload())
        .with_ident(0x0301);
    let inputs = whole.fragments(&CUTS);
    let wanted = whole.clone().with_src(EXT).fragments(&CUTS);
    let early = inputs[2].build();
    fx.check(
        "last fragment first",
        &early,
        &Expect::drop_unchanged(Reason::SnatFragment, &early),
    );
    let first = fx.observe(&inputs[0].build());
    assert_eq!(first.reasons(), [(Reason::SessionNew, 1)]);
    assert_eq!(
        mapped(&mut fx, endpoint(H1, 40000, proto::UDP)),
        endpoint(EXT, 40000, proto::UDP)
    );
    fx.verify(
        "first fragment",
        &first,
        &Expect::session(
            Reason::SessionNew,
            wanted[0].build(),
            &[("out", Dir::Original)],
        ),
    );
    let frames = later_fragments(
        &fx,
        "in order now",
        &inputs,
        &wanted,
        ("out", Dir::Original),
    );
    assert_eq!(frames.len(), 2);

    // A reply's later fragment before its first: addressed to the NAT's external address,
    // which only the kernel can make sense of.
    let reply = Packet::udp(SRV, 9000, EXT, 40000)
        .with_payload(payload())
        .with_ident(0x0302)
        .fragments(&CUTS);
    let early = reply[1].build();
    fx.check(
        "reply fragment before its first",
        &early,
        &Expect::pass_unchanged(Reason::NoMatch, &early),
    );
}

/// An entry older than `FRAG_MAX_AGE_NS` translates nothing: IP ids wrap, and a datagram that
/// reuses one must not get another datagram's addresses. The entry is written with a creation
/// time long past (boot time 1 ns), as if its first fragment had come long ago.
#[test]
fn an_expired_fragment_entry_translates_nothing() {
    let mut fx = Fixture::load(POOL);
    let whole = Packet::udp(H1, 40000, SRV, 9000)
        .with_payload(payload())
        .with_ident(0x0401);
    let inputs = whole.fragments(&CUTS);
    let mut cache: BpfHashMap<MapData, FragKey, FragEntry> =
        BpfHashMap::try_from(Map::LruHashMap(fx.program_map(FRAGMENTS))).expect("FRAGMENTS");
    let key = FragKey {
        src: addr(H1).octets(),
        dst: addr(SRV).octets(),
        id: 0x0401u16.to_be_bytes(),
        proto: proto::UDP,
        _pad: 0,
    };
    let stale = FragEntry {
        src: addr(EXT).octets(),
        dst: addr(SRV).octets(),
        rule: fx.slot("out"),
        rule2: u32::MAX,
        created_ns: 1,
        flags: 0,
        _pad: [0; 7],
    };
    cache.insert(key, stale, 0).expect("writing FRAGMENTS");
    let later = inputs[1].build();
    fx.check(
        "later fragment with an expired entry",
        &later,
        &Expect::drop_unchanged(Reason::SnatFragment, &later),
    );
    // Control: the same entry made fresh by the first fragment translates it.
    let first = fx.observe(&inputs[0].build());
    assert_eq!(first.reasons(), [(Reason::SessionNew, 1)]);
    let wanted = whole.clone().with_src(EXT).fragments(&CUTS);
    fx.check(
        "later fragment after the first",
        &later,
        &Expect::fragment(wanted[1].build(), &[("out", Dir::Original)]),
    );
}

/// A flood of first fragments (distinct datagrams of one flow, twice the cache's capacity):
/// the cache stays bounded, the newest datagrams' later fragments still translate, and the
/// oldest ones, evicted, are dropped by name (`snat_fragment`), never mistranslated. The
/// session itself is untouched by the flood.
#[test]
fn a_fragment_flood_fills_the_cache_which_stays_bounded_and_evicts_the_oldest() {
    let mut fx = Fixture::load(POOL);
    let datagram = |id: u16| {
        Packet::udp(H1, 40000, SRV, 9000)
            .with_payload(payload())
            .with_ident(id)
    };
    let flood = 2 * MAX_FRAGMENTS;
    for i in 0..flood {
        let first = datagram(i as u16).fragments(&CUTS)[0].build();
        let out = fx.run(&first);
        assert_eq!(out.action, XDP_PASS, "first fragment {i}");
    }
    let cache: BpfHashMap<MapData, FragKey, FragEntry> =
        BpfHashMap::try_from(Map::LruHashMap(fx.program_map(FRAGMENTS))).expect("FRAGMENTS");
    let held = cache.keys().count();
    assert!(
        held as u32 <= MAX_FRAGMENTS,
        "FRAGMENTS holds {held} entries, capacity {MAX_FRAGMENTS}"
    );
    let counters = fx.counters();
    assert_eq!(
        counters.reasons[Reason::SessionNew as usize]
            + counters.reasons[Reason::SessionOrig as usize],
        u64::from(flood),
        "every first fragment was translated by the one session"
    );
    assert_eq!(
        mapped(&mut fx, endpoint(H1, 40000, proto::UDP)),
        endpoint(EXT, 40000, proto::UDP)
    );

    let newest = datagram((flood - 1) as u16);
    let wanted = newest.clone().with_src(EXT).fragments(&CUTS);
    fx.check(
        "later fragment of the newest datagram",
        &newest.fragments(&CUTS)[1].build(),
        &Expect::fragment(wanted[1].build(), &[("out", Dir::Original)]),
    );
    let oldest = datagram(0).fragments(&CUTS)[1].build();
    fx.check(
        "later fragment of the oldest (evicted) datagram",
        &oldest,
        &Expect::drop_unchanged(Reason::SnatFragment, &oldest),
    );
}
