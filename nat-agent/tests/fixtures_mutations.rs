//! Malformed and mangled packets through the real object (BPF_PROG_TEST_RUN), generated: a
//! property test of "bad input is never mistranslated".
//!
//! Well-formed frames of every kind the program translates (stateless DNAT both ways, a new
//! SNAT flow over TCP, UDP and ICMP echo, an established SNAT reply, ICMP errors about an SNAT
//! and a DNAT flow, a first and a later fragment, a VLAN tag, IP options) are mangled at random:
//! bytes overwritten (mostly in the headers), the frame cut short, bytes appended. Every
//! mangled frame is run once, and whatever the program does must hold to this:
//! - exactly one exit reason is counted, once (every outcome is named and counted);
//! - a frame the program changed (and did not drop) was well-formed where the program reads
//!   it, by a parser of this test's own: IPv4 with a valid version, header length and total
//!   length, and the TCP/UDP/ICMP header (for ICMP errors, the quoted header and the 8 bytes
//!   after it) inside the datagram. A malformed frame goes on byte for byte or is dropped;
//! - only the bytes a translation may change did change (MAC addresses, TTL, addresses, ports,
//!   echo id, checksums, and their twins in an ICMP error's quote), and the frame kept its
//!   length;
//! - the addresses it carries are the input's own or the config's (VIPs, backends, the
//!   external address, hosts of the SNAT source prefix): nothing read from the wrong place is
//!   written;
//! - every checksum that was right before is right after, recomputed from scratch (IPv4
//!   header, TCP/UDP/ICMP over the whole datagram, and an ICMP error's quoted header);
//! - a frame the program forwards itself (second test: `forwarding = "xdp"` in a namespace
//!   whose next hops are known) leaves with a TTL one less than it came with.
//!
//! The generator is seeded, so a run is reproducible, and a failure is shrunk to the smallest
//! mangling that still breaks a rule, printed with the frame. Needs root. Never skips.

mod common;

use std::{
    cell::{Cell, RefCell},
    collections::BTreeSet,
    net::Ipv4Addr,
};

use anyhow::Context;
use common::{
    lab::two_leg_lab,
    packet::{
        addr, hex, options_ihl6, parse_ipv4, verify_checksums, verify_icmp_error_checksums, Packet,
        ICMP_DEST_UNREACH, ICMP_HLEN, ICMP_TIME_EXCEEDED, IP_MF, TCP_HLEN, UDP_HLEN,
    },
    xdp::{Fixture, RunOutput, XDP_DROP, XDP_TX},
};
use nat_agent::dataplane::interface_index;
use nat_common::{
    ipv4::{icmp_is_error, proto},
    maps::{FORWARD_XDP, IFACE_KNOWN},
    stats::{ForwardResult, Reason},
};
use nat_lab::Netns;
use proptest::prelude::*;

/// Inside host, the external address, a remote server and a router on its side.
const H1: &str = "198.18.0.2";
const EXT: &str = "203.0.113.1";
const SRV: &str = "198.51.100.53";
const OUTSIDE_ROUTER: &str = "198.51.100.1";
/// A DNAT client, the VIPs and their backends.
const CLIENT: &str = "198.51.100.7";
const VIP_WEB: &str = "198.18.100.10";
const BACKEND_WEB: &str = "198.18.1.10";
const VIP_WHOLE: &str = "198.18.100.20";
const BACKEND_WHOLE: &str = "198.18.1.20";

/// Stateless DNAT (a port rule and a whole-address rule) and SNAT onto one address, with a
/// port range no inside port is in (every SNAT flow's port changes), and a table big enough
/// for every new flow the mangled frames start; `interfaces` goes first.
fn config(interfaces: &str) -> String {
    format!(
        r#"{interfaces}
[conntrack]
max_sessions = 16384

[[dnat]]
id = 10
name = "web"
destination = "{VIP_WEB}"
protocol = "tcp"
port = 80
to_address = "{BACKEND_WEB}"
to_port = 8080

[[dnat]]
id = 20
name = "whole"
destination = "{VIP_WHOLE}"
to_address = "{BACKEND_WHOLE}"

[[snat]]
id = 1
name = "out"
source = "198.18.0.0/24"
to_address = "{EXT}"
port_range = "20000-29999"
"#
    )
}

/// `XDP_REDIRECT`: the program forwarded the frame out of another interface.
const XDP_REDIRECT: u32 = 4;

/// Mangled frames run per hook. Each costs a run and two counter snapshots: well under a
/// second for all of them.
const CASES: u32 = 3000;

/// Offsets the byte edits pick from, most of them: the Ethernet, VLAN and IPv4 headers
/// (options included), the L4 header, and an ICMP error's quoted headers all lie in the first
/// 80 bytes of the base frames.
const HEADER_BYTES: usize = 80;

/// A well-formed frame to mangle.
struct Base {
    name: &'static str,
    frame: Vec<u8>,
    /// Sent by a host on the outside (it arrives on the outside interface when the program
    /// forwards).
    from_outside: bool,
}

/// One mangling of a base frame.
#[derive(Debug, Clone)]
struct Mangling {
    /// Which base frame.
    base: usize,
    /// Bytes overwritten: (offset, taken modulo the frame length; value).
    edits: Vec<(usize, u8)>,
    /// Cut the frame to this many bytes (modulo its length + 1), when given.
    cut: Option<usize>,
    /// Appended after the edits and the cut.
    tail: Vec<u8>,
}

impl Mangling {
    fn apply(&self, bases: &[Base]) -> Vec<u8> {
        let mut frame = bases[self.base].frame.clone();
        for &(offset, value) in &self.edits {
            let at = offset % frame.len();
            frame[at] = value;
        }
        if let Some(cut) = self.cut {
            frame.truncate(cut % (frame.len() + 1));
        }
        frame.extend_from_slice(&self.tail);
        frame
    }
}

fn manglings(bases: usize) -> impl Strategy<Value = Mangling> {
    let offset = prop_oneof![4 => 0..HEADER_BYTES, 1 => 0..usize::MAX / 2];
    (
        0..bases,
        prop::collection::vec((offset, any::<u8>()), 0..4),
        prop::option::weighted(0.3, any::<usize>()),
        prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(any::<u8>(), 1..24)],
    )
        .prop_map(|(base, edits, cut, tail)| Mangling {
            base,
            edits,
            cut,
            tail,
        })
}

/// The base frames, well-formed, after the flows they belong to were started: the SNAT reply
/// and the ICMP error about the SNAT flow need the external port the program chose.
fn base_frames(fixture: &Fixture) -> Vec<Base> {
    let outbound = Packet::udp(H1, 5000, SRV, 53);
    let out = fixture.run(&outbound.build());
    let translated = parse_ipv4(&out.frame).expect("the SNAT flow's first packet translated");
    let port = u16::from_be_bytes([translated.payload[0], translated.payload[1]]);
    assert!(
        (20000..30000).contains(&port),
        "the SNAT flow got port {port}: {}",
        hex(&out.frame)
    );
    let echo = fixture.run(&Packet::icmp_echo(H1, SRV).build());
    let echoed = parse_ipv4(&echo.frame).expect("the echo request translated");
    let echo_id = u16::from_be_bytes([echoed.payload[4], echoed.payload[5]]);
    // What the remote side saw, as an error quotes it (header and 8 bytes).
    let seen_outside = [translated.header, &translated.payload[..8]].concat();
    let to_backend = Packet::tcp(CLIENT, 40000, BACKEND_WEB, 8080);
    let to_backend_quote = to_backend.datagram()[..to_backend.ip_header_len() + 8].to_vec();

    let base = |name, frame, from_outside| Base {
        name,
        frame,
        from_outside,
    };
    vec![
        base(
            "dnat forward",
            Packet::tcp(CLIENT, 40000, VIP_WEB, 80).build(),
            true,
        ),
        base(
            "dnat reply",
            Packet::tcp(BACKEND_WEB, 8080, CLIENT, 40000).build(),
            false,
        ),
        base(
            "dnat whole-address udp",
            Packet::udp(CLIENT, 40001, VIP_WHOLE, 53).build(),
            true,
        ),
        base(
            "snat new tcp",
            Packet::tcp(H1, 5001, SRV, 443).build(),
            false,
        ),
        base(
            "snat new udp",
            Packet::udp(H1, 5002, SRV, 123).build(),
            false,
        ),
        base("snat new echo", Packet::icmp_echo(H1, SRV).build(), false),
        base("snat reply", Packet::udp(SRV, 53, EXT, port).build(), true),
        base(
            "icmp error about the snat flow",
            Packet::icmp(OUTSIDE_ROUTER, EXT, ICMP_DEST_UNREACH, 3, [0; 4])
                .with_payload(seen_outside)
                .build(),
            true,
        ),
        base(
            "icmp error about a dnat flow",
            Packet::icmp(BACKEND_WEB, CLIENT, ICMP_TIME_EXCEEDED, 0, [0; 4])
                .with_payload(to_backend_quote)
                .build(),
            false,
        ),
        base(
            "first fragment",
            Packet::udp(H1, 5003, SRV, 53)
                .with_payload(vec![7; 64])
                .with_ident(0x1234)
                .with_frag(IP_MF)
                .build(),
            false,
        ),
        base(
            "later fragment",
            Packet::raw(H1, SRV, 17, vec![9; 40])
                .with_ident(0x1234)
                .with_frag(3)
                .build(),
            false,
        ),
        base(
            "vlan tagged dnat",
            Packet::udp(CLIENT, 40002, VIP_WHOLE, 53)
                .with_vlan(7)
                .build(),
            true,
        ),
        base(
            "ip options snat",
            Packet::tcp(H1, 5004, SRV, 22)
                .with_options(&options_ihl6())
                .build(),
            false,
        ),
        base(
            "echo reply to snat",
            Packet::icmp_echo_reply(SRV, EXT)
                .with_echo_id(echo_id)
                .build(),
            true,
        ),
    ]
}

/// Where a frame's headers are, by this test's own reading, and which bytes a translation of
/// it may change. `None`: not a frame the program may rewrite (not IPv4, a bad header, a
/// truncated TCP, UDP or ICMP header, a truncated quote). Other protocols have no L4 header
/// the program reads: whole-address DNAT changes their addresses only.
fn rewritable_bytes(frame: &[u8]) -> Option<BTreeSet<usize>> {
    let ip = parse_ipv4(frame).ok()?;
    let l3 = ip.header.as_ptr() as usize - frame.as_ptr() as usize;
    let l4 = l3 + ip.header.len();
    let mut may = BTreeSet::new();
    // MAC addresses (forwarding and XDP_TX rewrite them), TTL, header checksum, addresses.
    may.extend(0..12);
    may.extend([l3 + 8, l3 + 10, l3 + 11]);
    may.extend(l3 + 12..l3 + 20);
    if ip.frag & 0x1fff != 0 {
        // A later fragment: no L4 header, only the addresses.
        return Some(may);
    }
    let seg = ip.payload;
    match ip.proto {
        proto::TCP if seg.len() >= TCP_HLEN => may.extend((l4..l4 + 4).chain(l4 + 16..l4 + 18)),
        proto::UDP if seg.len() >= UDP_HLEN => may.extend((l4..l4 + 4).chain(l4 + 6..l4 + 8)),
        proto::ICMP if seg.len() >= ICMP_HLEN => {
            may.extend(l4 + 2..l4 + 6);
            if icmp_is_error(seg[0]) {
                may.extend(quote_bytes(seg, l4 + ICMP_HLEN)?);
            }
        }
        proto::TCP | proto::UDP | proto::ICMP => return None,
        // Any other protocol: a whole-address DNAT rule translates the addresses alone.
        _ => {}
    }
    Some(may)
}

/// For the quote of an ICMP error message `message` (its ICMP header at `message[0]`, the
/// quote at frame offset `at`): the bytes its translation may change. `None` when the quote is
/// not an IPv4 header and 8 bytes inside the message.
fn quote_bytes(message: &[u8], at: usize) -> Option<Vec<usize>> {
    let quote = &message[ICMP_HLEN..];
    let vihl = *quote.first()?;
    let hlen = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || hlen < 20 || quote.len() < hlen + 8 {
        return None;
    }
    let inner = at + hlen;
    let mut may: Vec<usize> = vec![at + 10, at + 11];
    may.extend(at + 12..at + 20);
    // Ports (or echo id), and the UDP, TCP or ICMP checksum when quoted.
    may.extend(inner..inner + 8);
    may.extend(inner + 16..inner + 18);
    Some(may)
}

/// Whether `a` is in the SNAT rule's source prefix (198.18.0.0/24): a reply is translated to
/// an inside host, and mangled new flows start sessions from any of them.
fn is_inside(a: &Ipv4Addr) -> bool {
    a.octets()[..3] == [198, 18, 0]
}

/// The addresses in the frame's IPv4 header (and an ICMP error's quoted header, when there).
fn addresses(frame: &[u8]) -> Vec<Ipv4Addr> {
    let Ok(ip) = parse_ipv4(frame) else {
        return Vec::new();
    };
    let mut out = vec![Ipv4Addr::from(ip.src), Ipv4Addr::from(ip.dst)];
    if ip.proto == proto::ICMP && ip.payload.len() >= ICMP_HLEN + 20 {
        let q = &ip.payload[ICMP_HLEN..];
        out.push(Ipv4Addr::new(q[12], q[13], q[14], q[15]));
        out.push(Ipv4Addr::new(q[16], q[17], q[18], q[19]));
    }
    out
}

/// The checksums of a frame, recomputed from scratch: `Ok` with what was checked, `Err` when
/// one is wrong (or the frame cannot be checked).
fn checksums(frame: &[u8]) -> Result<String, String> {
    let ip = parse_ipv4(frame)?;
    let is_error = ip.proto == proto::ICMP
        && ip.frag & 0x1fff == 0
        && ip.payload.first().is_some_and(|t| icmp_is_error(*t));
    if is_error {
        verify_icmp_error_checksums(frame).map(|q| format!("{q:?}"))
    } else {
        verify_checksums(frame).map(|c| format!("{c:?}"))
    }
}

/// Checks one run of `input` against the rules in the module doc.
fn check(
    input: &[u8],
    out: &RunOutput,
    reasons: &[(Reason, u64)],
    known: &BTreeSet<Ipv4Addr>,
) -> Result<(), String> {
    if !matches!(reasons, [(_, 1)]) {
        return Err(format!(
            "exit reasons counted: {reasons:?} (exactly one, once)"
        ));
    }
    if out.action == XDP_DROP || out.frame == input {
        return Ok(());
    }
    let reason = reasons[0].0;
    let Some(may) = rewritable_bytes(input) else {
        return Err(format!(
            "a malformed frame was rewritten (reason {reason:?})\n   out: {}",
            hex(&out.frame)
        ));
    };
    if out.frame.len() != input.len() {
        return Err(format!(
            "the frame changed length {} -> {} (reason {reason:?})",
            input.len(),
            out.frame.len()
        ));
    }
    let changed: Vec<usize> = (0..input.len())
        .filter(|&i| input[i] != out.frame[i] && !may.contains(&i))
        .collect();
    if !changed.is_empty() {
        return Err(format!(
            "bytes no translation changes were changed at offsets {changed:?} (reason \
             {reason:?})\n   out: {}",
            hex(&out.frame)
        ));
    }
    let inputs: BTreeSet<Ipv4Addr> = addresses(input).into_iter().collect();
    if let Some(stray) = addresses(&out.frame)
        .into_iter()
        .find(|a| !inputs.contains(a) && !known.contains(a) && !is_inside(a))
    {
        return Err(format!(
            "address {stray} is neither the input's nor the config's (reason {reason:?})\n   \
             out: {}",
            hex(&out.frame)
        ));
    }
    if matches!(out.action, XDP_TX | XDP_REDIRECT) {
        // When the program forwards, it is the router: one hop less to live.
        let ttl = |frame: &[u8]| parse_ipv4(frame).map(|ip| ip.header[8]);
        let (before, after) = (ttl(input)?, ttl(&out.frame)?);
        if before < 2 || after != before - 1 {
            return Err(format!(
                "forwarded with TTL {before} -> {after} (reason {reason:?})\n   out: {}",
                hex(&out.frame)
            ));
        }
    }
    if let Ok(before) = checksums(input) {
        if let Err(after) = checksums(&out.frame) {
            return Err(format!(
                "checksums right before ({before}) are wrong after: {after} (reason \
                 {reason:?})\n   out: {}",
                hex(&out.frame)
            ));
        }
    }
    Ok(())
}

/// The interfaces a forwarding fixture's frames arrive on.
#[derive(Clone, Copy)]
struct Ingress {
    inside: u32,
    outside: u32,
}

/// Runs the base frames, then [`CASES`] manglings of them, through `fixture`, each checked
/// with [`check`]. With `ingress`, each frame arrives on the interface of its side.
fn mangle_and_check(fixture: &RefCell<Fixture>, ingress: Option<Ingress>) {
    let arrive = |base: &Base| {
        if let Some(ingress) = ingress {
            let ifindex = if base.from_outside {
                ingress.outside
            } else {
                ingress.inside
            };
            fixture.borrow_mut().set_ingress_ifindex(Some(ifindex));
        }
    };
    let bases = base_frames(&fixture.borrow());
    let known: BTreeSet<Ipv4Addr> = [EXT, VIP_WEB, BACKEND_WEB, VIP_WHOLE, BACKEND_WHOLE]
        .iter()
        .map(|a| addr(a))
        .collect();
    // The base frames themselves first: each must be translated (or the mangling of it tests
    // nothing), and pass the checks.
    for base in &bases {
        arrive(base);
        let observed = fixture.borrow().observe(&base.frame);
        assert_ne!(
            observed.out.frame,
            base.frame,
            "{}: the base frame was not translated (reasons {:?})",
            base.name,
            observed.reasons()
        );
        if let Err(e) = check(&base.frame, &observed.out, &observed.reasons(), &known) {
            panic!("{}: {e}\n    in: {}", base.name, hex(&base.frame));
        }
    }

    let mut runner = common::props::seeded_runner(CASES);
    let (ran, refused, rewritten) = (Cell::new(0u32), Cell::new(0u32), Cell::new(0u32));
    let result = runner.run(&manglings(bases.len()), |mangling| {
        let input = mangling.apply(&bases);
        arrive(&bases[mangling.base]);
        let fixture = fixture.borrow();
        if fixture.kernel_refuses(&input) {
            refused.set(refused.get() + 1);
            return Ok(());
        }
        ran.set(ran.get() + 1);
        let observed = fixture.observe(&input);
        if observed.out.action != XDP_DROP && observed.out.frame != input {
            rewritten.set(rewritten.get() + 1);
        }
        check(&input, &observed.out, &observed.reasons(), &known).map_err(|e| {
            TestCaseError::fail(format!(
                "{} mangled: {e}\n    in: {}",
                bases[mangling.base].name,
                hex(&input)
            ))
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let (ran, refused, rewritten) = (ran.get(), refused.get(), rewritten.get());
    // Test runs take no frame shorter than an Ethernet header (and on the TC hook, none
    // shorter than the IPv4 header its EtherType announces); most cases must run.
    assert!(
        ran >= CASES * 3 / 4,
        "only {ran} of {} mangled frames ran ({refused} refused by the kernel)",
        ran + refused
    );
    // Many manglings keep a frame translatable (a payload byte, a TTL, a port): the rules
    // must have been tested on translations, not only on frames left alone.
    assert!(
        rewritten >= ran / 5,
        "only {rewritten} of {ran} mangled frames were translated"
    );
}

/// Translated frames go to the kernel (no interface forwards from the program).
#[test]
fn mangled_frames_are_never_mistranslated() {
    common::pin_to_cpu(0);
    let fixture = Fixture::load(&config("[[interfaces]]\nname = \"nat0\"\n"));
    mangle_and_check(&RefCell::new(fixture), None);
}

/// The program forwards translated frames itself (`forwarding = "xdp"`, next hops known): the
/// same rules, and a forwarded frame leaves with its TTL one less than it came with.
#[test]
fn mangled_frames_forwarded_by_the_program_are_never_mistranslated() {
    let ns = forwarding_lab();
    ns.enter(|| {
        common::pin_to_cpu(0);
        let interfaces = "[[interfaces]]\nname = \"n0\"\nforwarding = \"xdp\"\n\n\
                          [[interfaces]]\nname = \"n1\"\nforwarding = \"xdp\"\n";
        let mut fixture = Fixture::load(&config(interfaces));
        let ingress = Ingress {
            inside: interface_index("n0").context("n0's index")?,
            outside: interface_index("n1").context("n1's index")?,
        };
        for ifindex in [ingress.inside, ingress.outside] {
            fixture.set_interface_flags(ifindex, IFACE_KNOWN | FORWARD_XDP);
        }
        let fixture = RefCell::new(fixture);
        mangle_and_check(&fixture, Some(ingress));
        // Frames really were forwarded: the TTL rule was tested.
        let forwarded = fixture.borrow().counters().forward;
        let sent = forwarded[ForwardResult::Redirected as usize]
            + forwarded[ForwardResult::Transmitted as usize];
        anyhow::ensure!(
            sent > u64::from(CASES / 10),
            "too few frames were forwarded: {forwarded:?}"
        );
        Ok(())
    })
    .expect("the forwarding lab");
}

/// The fixtures' two-leg namespace (n0 inside, n1 outside with the external address) with the
/// backends routed behind 198.18.0.254 and the remote hosts behind 203.0.113.254, every next
/// hop a permanent neighbour so the FIB answers the program.
fn forwarding_lab() -> Netns {
    let ns = two_leg_lab();
    let ip = |args: &[&str]| {
        ns.run("ip", args)
            .unwrap_or_else(|e| panic!("ip {args:?}: {e:#}"));
    };
    ip(&[
        "route",
        "add",
        "198.18.1.0/24",
        "via",
        "198.18.0.254",
        "dev",
        "n0",
    ]);
    ip(&[
        "route",
        "add",
        "198.51.100.0/24",
        "via",
        "203.0.113.254",
        "dev",
        "n1",
    ]);
    for (neighbour, dev, mac) in [
        (H1, "n0", "02:00:00:00:00:02"),
        ("198.18.0.254", "n0", "02:00:00:00:00:fe"),
        ("203.0.113.254", "n1", "02:00:00:00:01:fe"),
    ] {
        ip(&[
            "neigh",
            "replace",
            neighbour,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
    }
    ns
}
