//! ICMP errors about translated flows: `xdp_nat` hands every ICMP error it sees (destination
//! unreachable, source quench, time exceeded, parameter problem; see
//! `nat_common::icmp::is_translatable_error`) to `xdp_nat_icmp_error` by tail call, which
//! reads the quoted datagram, finds the flow it belongs to and translates the error.
//!
//! Why a separate program: reading a second IPv4 header and walking the DNAT and SNAT rules
//! for it on top of the main program would exceed what the verifier explores in one program,
//! and established traffic should not carry this code.
//!
//! The quoted datagram is what the reporting router saw, so a packet that left translated is
//! quoted translated. The error travels against the quoted packet, so it is looked up as a
//! packet travelling the error's way (the quoted tuple reversed): sessions first (either
//! direction), then stateless DNAT (forward and reverse), exactly as `nat` orders them for a
//! packet. The quote is restored to what its sender sent, the outer addresses follow
//! (`nat_common::icmp::outer_addresses`), and every checksum is updated incrementally: outer
//! IPv4, ICMP (it covers the whole quote), the quoted IPv4 header, and the quoted TCP/UDP
//! checksum or echo checksum where the quote holds it.
//!
//! An error never creates a session, never refreshes one and never changes its state: it is
//! not evidence that the flow is alive (anyone can send one), and it is not counted in rule
//! counters. What matches nothing is dropped only when it quotes traffic only the NAT could
//! carry (an SNAT rule translates it, its external endpoint is one the NAT holds, a stateful
//! DNAT rule would need a session for it), since passing it would show the quote's inside
//! addresses or a quote nobody can match. Errors about traffic no rule translates (routed or
//! exempt flows), or addressed to this host (its own tracepath, path MTU discovery), go to the
//! kernel untouched: dropping them would break those for traffic the NAT never touched.

use nat_common::{
    checksum,
    conntrack::{Endpoint, FlowKey},
    icmp::{
        error_direction_key, is_translatable_error, outer_addresses, parse_quoted_header,
        ICMP_CHECKSUM_OFFSET, ICMP_ECHO_ID_OFFSET, ICMP_HEADER_LEN, QUOTED_L4_MIN,
        TCP_CHECKSUM_OFFSET, UDP_CHECKSUM_OFFSET,
    },
    ipv4::{proto, HeaderInfo},
    maps::ICMP_ERROR_SLOT,
    prefilter::FilterTable,
    rules::RULE_SNAT_CHECK,
    stats::Reason,
};
use network_types::{icmp::Icmpv4Hdr, ip::Ipv4Hdr};

use crate::{
    conntrack::{self, Tracked},
    dnat::{self, Side},
    fib,
    maps::{rule_bank, rule_lookup, BINDINGS, DNAT_FORWARD, DNAT_REVERSE, SNAT_RULES},
    packet::{ptr_at, Frame},
    parse::{l4_header, parse_ipv4, read_l4, Ipv4Packet, L4Kind, L4},
    rewrite::{addr_delta, port_delta},
    snat::{self, SnatDecision},
};

/// How far into an skb the ICMP error stage reads: Ethernet, a VLAN tag, the error's IPv4
/// header with the most options, its ICMP header, and the quoted IPv4 header (options too)
/// with the 8 bytes of ports it always carries.
pub const HEADERS: usize = 14 + 4 + 60 + 8 + 60 + 8;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

/// Whether `xdp_nat` hands this packet to the ICMP error program.
#[inline(always)]
pub fn is_error(l4: &L4) -> bool {
    l4.kind == L4Kind::IcmpOther && is_translatable_error(l4.icmp_type)
}

/// Tail-calls `xdp_nat_icmp_error`; returns only if that failed.
#[inline(always)]
pub fn hand_over<C: Frame>(ctx: &C) -> Reason {
    // SAFETY: tail_call either does not return or returns on failure; nothing is held across.
    unsafe { C::programs().tail_call(ctx, ICMP_ERROR_SLOT) };
    Reason::IcmpErrorUnavailable
}

/// The quoted datagram of an error.
struct Quote {
    /// Offset of the quoted IPv4 header in the frame.
    l3_offset: usize,
    /// Offset of the quoted L4 header in the frame.
    l4_offset: usize,
    /// Quoted L4 bytes present (see `QuotedHeader::l4_len`).
    l4_len: usize,
    /// What the quoted L4 header is, as quoted (an echo request stays a request).
    kind: L4Kind,
    /// The quoted packet seen as a packet travelling the error's way (addresses, ports and
    /// echo kind swapped): what the tables are asked about.
    back: Ipv4Packet,
    /// The L4 facts of `back`.
    back_l4: L4,
}

/// Body of `xdp_nat_icmp_error`.
#[inline(always)]
pub fn run<C: Frame>(ctx: &C) -> Result<Reason, Reason> {
    let pkt = parse_ipv4(ctx)?;
    let l4 = read_l4(ctx, &pkt);
    if !is_error(&l4) {
        // Only reachable by tail call for such packets; a stale or wrong slot must still never
        // rewrite anything else.
        return Err(Reason::IcmpErrorMalformed);
    }
    let quote = read_quote(ctx, &pkt)?;
    let lookup = quote.back_l4.flow_key(&quote.back);
    // One rule bank for the whole decision, as in `nat` (see `maps::rule_bank`).
    let bank = rule_bank();
    let back_to = match find_translation(ctx, bank, &pkt, &quote, &lookup)? {
        Found::To(to) => to,
        Found::NoSession => return Err(unmatched(ctx, &pkt, true)),
        Found::Nothing => {
            let ours = nat_only(ctx, bank, &pkt, &quote, &lookup);
            return Err(unmatched(ctx, &pkt, ours));
        }
    };
    if pkt.info.is_fragment {
        // Later fragments of the error carry no ICMP header and would leave untranslated.
        return Err(Reason::IcmpErrorMalformed);
    }
    let from = error_direction_key(&lookup);
    let to = error_direction_key(&back_to);
    rewrite(ctx, &pkt, &quote, &from, &to)?;
    Ok(Reason::IcmpErrorTranslated)
}

/// Reads and checks the quoted IPv4 header and its first L4 bytes.
#[inline(always)]
fn read_quote<C: Frame>(ctx: &C, pkt: &Ipv4Packet) -> Result<Quote, Reason> {
    let l3_offset = pkt.l4_offset() + ICMP_HEADER_LEN;
    // `read_l4` found a whole ICMP header inside the datagram, so this cannot underflow.
    let quote_len = pkt.info.total_len - pkt.info.header_len - ICMP_HEADER_LEN;
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3_offset).map_err(|_| Reason::IcmpErrorMalformed)?;
    // SAFETY: bounds-checked by ptr_at (whether all of it lies in the quote is checked next).
    let ip = unsafe { &*ip };
    let h = parse_quoted_header(
        ip.vihl,
        u16::from_be_bytes(ip.tot_len),
        u16::from_be_bytes(ip.frags),
        quote_len,
    )?;
    let l4_offset = l3_offset + h.header_len;
    let mut kind = L4Kind::NoPorts;
    let mut sport = [0; 2];
    let mut dport = [0; 2];
    let quoted_proto = ip.proto;
    if !h.is_later_fragment
        && (quoted_proto == proto::TCP || quoted_proto == proto::UDP || quoted_proto == proto::ICMP)
    {
        // RFC 792 quotes at least 8 bytes: less is not an error anyone can match.
        if h.l4_len < QUOTED_L4_MIN {
            return Err(Reason::IcmpErrorMalformed);
        }
        let b: *const [u8; QUOTED_L4_MIN] =
            ptr_at(ctx, l4_offset).map_err(|_| Reason::IcmpErrorMalformed)?;
        // SAFETY: bounds-checked by ptr_at.
        let b = unsafe { &*b };
        if quoted_proto == proto::ICMP {
            let id = [b[ICMP_ECHO_ID_OFFSET], b[ICMP_ECHO_ID_OFFSET + 1]];
            if b[0] == ICMP_ECHO_REQUEST {
                kind = L4Kind::IcmpEchoRequest;
                sport = id;
            } else if b[0] == ICMP_ECHO_REPLY {
                kind = L4Kind::IcmpEchoReply;
                dport = id;
            }
        } else {
            kind = if quoted_proto == proto::TCP {
                L4Kind::Tcp
            } else {
                L4Kind::Udp
            };
            sport = [b[0], b[1]];
            dport = [b[2], b[3]];
        }
    }
    // The error's way: the quoted destination is the source, an echo request looks like the
    // reply it would get.
    let back_kind = match kind {
        L4Kind::IcmpEchoRequest => L4Kind::IcmpEchoReply,
        L4Kind::IcmpEchoReply => L4Kind::IcmpEchoRequest,
        k => k,
    };
    Ok(Quote {
        l3_offset,
        l4_offset,
        l4_len: h.l4_len,
        kind,
        back: Ipv4Packet {
            l3_offset,
            info: HeaderInfo {
                header_len: h.header_len,
                total_len: h.header_len + h.l4_len,
                is_fragment: h.is_fragment,
                is_later_fragment: h.is_later_fragment,
                // The quote is never forwarded as a datagram of its own.
                dont_fragment: false,
            },
            proto: quoted_proto,
            src: ip.dst_addr,
            dst: ip.src_addr,
            ttl: ip.ttl,
            ident: ip.id,
        },
        back_l4: L4 {
            kind: back_kind,
            sport: dport,
            dport: sport,
            tcp_flags: 0,
            icmp_type: 0,
        },
    })
}

/// What the tables say about a packet travelling the error's way with the quote's tuple.
enum Found {
    /// It becomes this tuple.
    To(FlowKey),
    /// Only a session could translate it (stateful DNAT, DNAT with SNAT), and there is none.
    NoSession,
    /// No session and no DNAT rule applies.
    Nothing,
}

/// Looks `lookup` (the quote's tuple reversed) up like `nat` looks up a packet: sessions in
/// either direction, then stateless DNAT forward and reverse. `Err` for a quote whose packet
/// the NAT would have passed untranslated (a fragment a port rule needs ports for, DCCP, a
/// stateful rule's untrackable packet): the error is the kernel's then too.
#[inline(always)]
fn find_translation<C: Frame>(
    ctx: &C,
    bank: u32,
    pkt: &Ipv4Packet,
    quote: &Quote,
    lookup: &FlowKey,
) -> Result<Found, Reason> {
    let trackable = quote.back_l4.trackable(&quote.back);
    if trackable {
        match conntrack::find(lookup) {
            // SAFETY: pointer from `find`, valid for this run; only read (an error changes
            // nothing).
            Some(Tracked::Original(session)) => {
                return Ok(Found::To(unsafe { (*session).translated }))
            }
            Some(Tracked::Reply(orig, _)) => return Ok(Found::To(orig.reversed())),
            None => {}
        }
    }
    if let Some(set) = rule_lookup(&DNAT_FORWARD, FilterTable::DnatForward, bank, lookup.dst) {
        let rule = dnat::find_rule(&quote.back, &quote.back_l4, set, Side::Destination)
            .map_err(|_| Reason::IcmpErrorPassed)?;
        if let Some(rule) = rule {
            if rule.is_stateful() {
                return if trackable {
                    Ok(Found::NoSession)
                } else {
                    Err(Reason::IcmpErrorPassed)
                };
            }
            let to = dnat::translated(&quote.back, lookup, &rule, Side::Destination);
            // As in `nat::try_rules`: when an SNAT rule translates the DNATed flow too, it
            // has a session, and that session is missing.
            if trackable
                && rule.flags & RULE_SNAT_CHECK != 0
                && rule_lookup(&SNAT_RULES, FilterTable::Snat, bank, to.src).is_some()
                && matches!(
                    snat::decide(ctx, bank, &to, pkt.info.total_len as u16),
                    SnatDecision::Translate(_)
                )
            {
                return Ok(Found::NoSession);
            }
            return Ok(Found::To(to));
        }
    }
    if let Some(set) = rule_lookup(&DNAT_REVERSE, FilterTable::DnatReverse, bank, lookup.src) {
        let rule = dnat::find_rule(&quote.back, &quote.back_l4, set, Side::Source)
            .map_err(|_| Reason::IcmpErrorPassed)?;
        if let Some(rule) = rule {
            return Ok(Found::To(dnat::translated(
                &quote.back,
                lookup,
                &rule,
                Side::Source,
            )));
        }
    }
    Ok(Found::Nothing)
}

/// Whether the quoted flow, which no session or stateless rule translates, is one only the
/// NAT could carry: an error from inside about a packet to an inside host whose flows an SNAT
/// rule translates, or an error from outside about a packet from an external endpoint the NAT
/// has handed out (its session gone, or a forged quote).
#[inline(always)]
fn nat_only<C: Frame>(
    ctx: &C,
    bank: u32,
    pkt: &Ipv4Packet,
    quote: &Quote,
    lookup: &FlowKey,
) -> bool {
    if !quote.back_l4.trackable(&quote.back) {
        return false;
    }
    let external = Endpoint {
        addr: lookup.dst,
        port: lookup.dport,
        proto: lookup.proto,
        _pad: 0,
    };
    if BINDINGS.get_ptr(&external).is_some() {
        return true;
    }
    // SNAT rules are asked last, as for packets: only a new flow would meet them.
    rule_lookup(&SNAT_RULES, FilterTable::Snat, bank, lookup.src).is_some()
        && matches!(
            snat::decide(ctx, bank, lookup, pkt.info.total_len as u16),
            SnatDecision::Translate(_)
        )
}

/// The exit of an error no session or stateless rule translates. `nat_only`: a translating
/// rule covers the quoted flow, so only the NAT could have carried it, and passing the error
/// would show its inside addresses or a quote its receiver cannot match: dropped. Otherwise
/// (the appliance's own traffic, routed or exempt flows) it is passed, and so is any error
/// addressed to this host, whose kernel matches it against its own sockets.
#[inline(always)]
fn unmatched<C: Frame>(ctx: &C, pkt: &Ipv4Packet, nat_only: bool) -> Reason {
    if !nat_only || fib::is_local(ctx, pkt.src, pkt.dst) {
        return Reason::IcmpErrorPassed;
    }
    Reason::IcmpErrorUnmatched
}

/// Rewrites the error: the quote from `from` (as quoted) to `to` (as its sender sent it), the
/// outer addresses after it, and every checksum. Every field is written unconditionally (an
/// RFC 1624 update with old == new changes nothing), which keeps the verifier's paths few.
#[inline(always)]
fn rewrite<C: Frame>(
    ctx: &C,
    pkt: &Ipv4Packet,
    quote: &Quote,
    from: &FlowKey,
    to: &FlowKey,
) -> Result<(), Reason> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, pkt.l3_offset).map_err(|_| Reason::MalformedIpv4)?;
    let icmp: *mut Icmpv4Hdr = l4_header(ctx, pkt).ok_or(Reason::IcmpErrorMalformed)?;
    let inner: *mut Ipv4Hdr =
        ptr_at(ctx, quote.l3_offset).map_err(|_| Reason::IcmpErrorMalformed)?;
    // Every pointer the L4 part needs is taken before anything is written: a failure must
    // leave the packet untouched.
    let has_ports = matches!(quote.kind, L4Kind::Tcp | L4Kind::Udp);
    let ports: *mut [u8; 4] = if has_ports {
        ptr_at(ctx, quote.l4_offset).map_err(|_| Reason::IcmpErrorMalformed)?
    } else {
        core::ptr::null_mut()
    };
    // Where the quoted L4 checksum sits, if the quote holds it.
    let l4_check_offset = match quote.kind {
        L4Kind::Tcp if quote.l4_len >= TCP_CHECKSUM_OFFSET + 2 => TCP_CHECKSUM_OFFSET,
        L4Kind::Udp => UDP_CHECKSUM_OFFSET,
        L4Kind::IcmpEchoRequest | L4Kind::IcmpEchoReply => ICMP_CHECKSUM_OFFSET,
        _ => 0,
    };
    let l4_check: *mut [u8; 2] = if l4_check_offset != 0 {
        ptr_at(ctx, quote.l4_offset + l4_check_offset).map_err(|_| Reason::IcmpErrorMalformed)?
    } else {
        core::ptr::null_mut()
    };
    let is_echo = matches!(quote.kind, L4Kind::IcmpEchoRequest | L4Kind::IcmpEchoReply);
    let echo_id: *mut [u8; 2] = if is_echo {
        ptr_at(ctx, quote.l4_offset + ICMP_ECHO_ID_OFFSET)
            .map_err(|_| Reason::IcmpErrorMalformed)?
    } else {
        core::ptr::null_mut()
    };

    // SAFETY: all bounds-checked by ptr_at / l4_header above; XDP owns the frame.
    let (ip, icmp, inner) = unsafe { (&mut *ip, &mut *icmp, &mut *inner) };

    // Outer header. Its addresses are not covered by the ICMP checksum (no pseudo-header).
    let (src, dst) = outer_addresses(ip.src_addr, ip.dst_addr, from, to);
    let c = checksum::update_addr(u16::from_be_bytes(ip.check), ip.src_addr, src);
    ip.check = checksum::update_addr(c, ip.dst_addr, dst).to_be_bytes();
    ip.src_addr = src;
    ip.dst_addr = dst;

    // The ICMP checksum covers every quoted byte: each word changed below is added to it.
    let mut icmp_check = u16::from_be_bytes(icmp.check);

    // Quoted IPv4 header.
    let old_inner_check = u16::from_be_bytes(inner.check);
    let new_inner_check = addr_delta(old_inner_check, from, to);
    inner.src_addr = to.src;
    inner.dst_addr = to.dst;
    inner.check = new_inner_check.to_be_bytes();
    icmp_check = addr_delta(icmp_check, from, to);
    icmp_check = checksum::update_u16(icmp_check, old_inner_check, new_inner_check);

    // Quoted ports and their checksum (TCP/UDP: pseudo-header addresses and ports).
    if has_ports {
        // SAFETY: non-null exactly when has_ports; bounds-checked above.
        let ports = unsafe { &mut *ports };
        ports[0] = to.sport[0];
        ports[1] = to.sport[1];
        ports[2] = to.dport[0];
        ports[3] = to.dport[1];
        icmp_check = port_delta(icmp_check, from, to);
        if !l4_check.is_null() {
            // SAFETY: non-null means bounds-checked above.
            let field = unsafe { &mut *l4_check };
            let old = u16::from_be_bytes(*field);
            let c = port_delta(addr_delta(old, from, to), from, to);
            // UDP: 0 means "no checksum" and stays 0; a computed 0 is sent as 0xffff. (TCP
            // never stores 0 from an RFC 1624 eqn 3 update unless the sum was 0 already.)
            let new = if quote.kind == L4Kind::Udp && old == 0 {
                0
            } else if quote.kind == L4Kind::Udp && c == 0 {
                0xffff
            } else {
                c
            };
            *field = new.to_be_bytes();
            icmp_check = checksum::update_u16(icmp_check, old, new);
        }
    }

    // Quoted echo: its id is the "port" of whichever side chose it, and its own checksum
    // covers the id but no pseudo-header.
    if is_echo {
        let (old_id, new_id) = if quote.kind == L4Kind::IcmpEchoRequest {
            (from.sport, to.sport)
        } else {
            (from.dport, to.dport)
        };
        let (old_id, new_id) = (u16::from_be_bytes(old_id), u16::from_be_bytes(new_id));
        // SAFETY: both non-null when is_echo; bounds-checked above.
        let (id, field) = unsafe { (&mut *echo_id, &mut *l4_check) };
        let old = u16::from_be_bytes(*field);
        let new = checksum::update_u16(old, old_id, new_id);
        *id = new_id.to_be_bytes();
        *field = new.to_be_bytes();
        icmp_check = checksum::update_u16(icmp_check, old_id, new_id);
        icmp_check = checksum::update_u16(icmp_check, old, new);
    }

    icmp.check = icmp_check.to_be_bytes();
    Ok(())
}
