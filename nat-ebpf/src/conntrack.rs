//! Sessions: translating packets of known flows in either direction, and creating a session
//! (with its reply entry) for the first packet of a new one.

use core::mem::MaybeUninit;

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_boot_ns};
use nat_common::{
    conntrack::{Dir, Endpoint, FlowKey, Session, TcpState, NO_RULE, SESSION_DNAT, SESSION_SNAT},
    session_filter::{self, Counted},
    stats::Reason,
};

use crate::{
    frag,
    maps::{PATH_MTU_FLOOR, REPLIES, SESSIONS, SESSION_FILTER},
    packet::Frame,
    parse::{Ipv4Packet, L4Kind, L4},
    rewrite::rewrite,
    snat::{self, SnatChoice},
    stats::{count_rule, Direction},
    zero::zero_fill,
};

/// `-EEXIST` as returned by map updates with `BPF_NOEXIST`.
pub const EEXIST: i32 = -17;

/// Field-wise equality without a `memcmp` call (which BPF has no libc for).
#[inline(always)]
pub fn same_key(a: &FlowKey, b: &FlowKey) -> bool {
    u32::from_ne_bytes(a.src) == u32::from_ne_bytes(b.src)
        && u32::from_ne_bytes(a.dst) == u32::from_ne_bytes(b.dst)
        && u16::from_ne_bytes(a.sport) == u16::from_ne_bytes(b.sport)
        && u16::from_ne_bytes(a.dport) == u16::from_ne_bytes(b.dport)
        && a.proto == b.proto
}

/// See [`same_key`].
#[inline(always)]
pub fn same_endpoint(a: &Endpoint, b: &Endpoint) -> bool {
    u32::from_ne_bytes(a.addr) == u32::from_ne_bytes(b.addr)
        && u16::from_ne_bytes(a.port) == u16::from_ne_bytes(b.port)
        && a.proto == b.proto
}

/// The filter counter of `key`'s slot: how many `SESSIONS` and `REPLIES` keys fall in it (see
/// `nat_common::session_filter`). All ones (both tables "maybe") if it cannot be read.
#[inline(always)]
fn filter_counter(key: &FlowKey) -> u64 {
    match SESSION_FILTER.get(session_filter::slot(key)) {
        Some(&counter) => counter,
        None => u64::MAX,
    }
}

/// Counts `key` in the filter for `table`, about to be inserted into it. `false` when it could
/// not (the entry must then not be inserted: a key the filter does not count would never be
/// found).
#[inline(always)]
fn count_key(key: &FlowKey, table: Counted) -> bool {
    match SESSION_FILTER.get_ptr_mut(session_filter::slot(key)) {
        Some(counter) => {
            // SAFETY: pointer from a successful lookup into an array, which is never freed.
            atomic_add(unsafe { &mut *counter }, table.unit());
            true
        }
        None => false,
    }
}

/// Takes back what [`count_key`] added, once the insert failed or the entry was removed.
#[inline(always)]
fn uncount_key(key: &FlowKey, table: Counted) {
    if let Some(counter) = SESSION_FILTER.get_ptr_mut(session_filter::slot(key)) {
        // SAFETY: as in `count_key`. Adding the two's complement subtracts; the half was
        // counted, so nothing borrows from the other half.
        atomic_add(unsafe { &mut *counter }, table.unit().wrapping_neg());
    }
}

/// Where a tuple stands in the session tables.
pub enum Tracked {
    /// It is a session's key (the flow's original direction).
    Original(*mut Session),
    /// It is the reply tuple of the session keyed by the `FlowKey`.
    Reply(FlowKey, *mut Session),
}

/// Looks `key` up as conntrack does, before any rule: as a session's key, then as a reply
/// tuple (and its session). Each table is asked only if the session filter counts keys of it
/// in `key`'s slot: nearly every packet of stateless DNAT (and every packet nothing matches)
/// skips both lookups, an SNAT reply skips the `SESSIONS` miss before its `REPLIES` hit.
///
/// The pointers stay valid for this program run: entries are freed only after an RCU grace
/// period, even if the agent deletes the session now.
#[inline(always)]
pub fn find(key: &FlowKey) -> Option<Tracked> {
    let counter = filter_counter(key);
    if Counted::Sessions.count_in(counter) != 0 {
        if let Some(session) = SESSIONS.get_ptr_mut(key) {
            return Some(Tracked::Original(session));
        }
    }
    if Counted::Replies.count_in(counter) == 0 {
        return None;
    }
    // SAFETY: pointer from a successful lookup; copied out at once.
    let orig = unsafe { *REPLIES.get_ptr(key)? };
    // No session for a reply entry: the agent is deleting this flow (session first, reply
    // entry next), not ours any more.
    let session = SESSIONS.get_ptr_mut(&orig)?;
    Some(Tracked::Reply(orig, session))
}

/// Translates a packet of a known flow. `Ok(None)`: the packet belongs to no session.
#[inline(always)]
pub fn translate_existing<C: Frame>(
    ctx: &C,
    pkt: &Ipv4Packet,
    l4: &L4,
    key: &FlowKey,
) -> Result<Option<Reason>, Reason> {
    // Two arms with a body each, on purpose: one body fed by a tuple from both arms measured
    // 10-17 ns slower per packet on the reply and no-session paths in back-to-back runs of
    // `bench kernel`; this shape measured the same as before `find` was shared.
    match find(key) {
        None => Ok(None),
        Some(Tracked::Original(session)) => {
            // SAFETY: pointer from `find`, valid for this run.
            let session = unsafe { &mut *session };
            let to = session.translated;
            translate_tracked(ctx, pkt, l4, key, session, &to, Dir::Original)?;
            Ok(Some(Reason::SessionOrig))
        }
        Some(Tracked::Reply(orig, session)) => {
            // SAFETY: as above.
            let session = unsafe { &mut *session };
            translate_tracked(ctx, pkt, l4, key, session, &orig.reversed(), Dir::Reply)?;
            Ok(Some(Reason::SessionReply))
        }
    }
}

/// Translates a packet of `session` to `to`, travelling `dir`, and refreshes the session.
#[inline(always)]
fn translate_tracked<C: Frame>(
    ctx: &C,
    pkt: &Ipv4Packet,
    l4: &L4,
    key: &FlowKey,
    session: &mut Session,
    to: &FlowKey,
    dir: Dir,
) -> Result<(), Reason> {
    if let Some(reason) = too_big(ctx, pkt, key, to) {
        return Err(reason);
    }
    rewrite(ctx, pkt, l4, key, to)?;
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    refresh(ctx, session, l4, dir, now);
    let direction = match dir {
        Dir::Original => Direction::Original,
        Dir::Reply => Direction::Reply,
    };
    frag::remember(pkt, to, session.dnat_rule, session.snat_rule, direction);
    Ok(())
}

/// What to do with a "don't fragment" packet too big for the route its translation `to` takes
/// (`None`: it fits, or may be fragmented, and is translated as usual). Only packets longer
/// than the smallest MTU of this host's interfaces pay for the route lookup.
///
/// - The flow's destination stays as it is (SNAT, MASQUERADE): the packet goes to the kernel
///   untranslated, which routes it the same way and sends "fragmentation needed" to the real
///   sender. (Translated, the kernel would send the error to this host's own external address,
///   where it is lost: a path-MTU black hole.)
/// - The destination is translated (DNAT; a reply to an inside host): untranslated it would not
///   route like this, so the program answers the sender itself (`toobig`).
#[inline(always)]
pub fn too_big<C: Frame>(ctx: &C, pkt: &Ipv4Packet, key: &FlowKey, to: &FlowKey) -> Option<Reason> {
    // A GSO super-packet is as long as its segments together: the forwarding stage has each
    // segment checked against the route's MTU by the kernel instead.
    if !pkt.info.dont_fragment || ctx.is_gso() {
        return None;
    }
    let floor = match PATH_MTU_FLOOR.get(0) {
        Some(&mtu) if mtu != 0 => mtu,
        _ => return None,
    };
    let len = pkt.info.total_len as u32;
    if len <= floor || len > 0xffff {
        return None;
    }
    let mtu = crate::fib::frag_needed(ctx, to, len as u16)?;
    Some(if to.dst == key.dst {
        Reason::MtuHandoff
    } else {
        crate::toobig::hand_over(ctx, mtu)
    })
}

/// `*counter += value` as one BPF atomic instruction. The target's `core` offers no atomic
/// read-modify-write, but the instruction set has `lock add` (BPF_ATOMIC | BPF_ADD).
#[inline(always)]
fn atomic_add(counter: &mut u64, value: u64) {
    // SAFETY: `counter` is a valid, 8-byte aligned u64 inside a map value; the instruction
    // only adds to it.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({ptr} + 0) += {val}",
            ptr = in(reg) counter as *mut u64,
            val = in(reg) value,
        );
    }
}

/// Updates a session for one packet: last seen (`now`), TCP state, its counters and its
/// rules'.
#[inline(always)]
fn refresh<C: Frame>(ctx: &C, session: &mut Session, l4: &L4, dir: Dir, now: u64) {
    session.last_seen_ns = now;
    if l4.kind == L4Kind::Tcp {
        let state = TcpState::from_u8(session.tcp_state);
        let next = state.next(dir, l4.tcp_flags);
        if next != state {
            session.tcp_state = next as u8;
        }
    }
    let bytes = ctx.packet_len() as u64;
    // Several CPUs may carry packets of one flow at once: add atomically.
    let (packets, total, direction) = match dir {
        Dir::Original => (
            &mut session.orig_packets,
            &mut session.orig_bytes,
            Direction::Original,
        ),
        Dir::Reply => (
            &mut session.reply_packets,
            &mut session.reply_bytes,
            Direction::Reply,
        ),
    };
    atomic_add(packets, 1);
    atomic_add(total, bytes);
    if session.dnat_rule != NO_RULE {
        count_rule(ctx, session.dnat_rule, direction, bytes);
    }
    if session.snat_rule != NO_RULE {
        count_rule(ctx, session.snat_rule, direction, bytes);
    }
}

/// Creates the session for the first packet of a flow and translates the packet. `to` is the
/// packet after destination NAT (equal to `key` when there is none); `snat`, when given,
/// translates its source too, to `allocation` (claimed by the new-flow stage). `now` is the
/// clock as read at hand-over: the session's creation and last-seen time.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn create<C: Frame>(
    ctx: &C,
    pkt: &Ipv4Packet,
    l4: &L4,
    key: &FlowKey,
    mut to: FlowKey,
    dnat_rule: Option<u32>,
    snat: Option<SnatChoice>,
    allocation: Option<snat::Allocation>,
    now: u64,
) -> Result<Reason, Reason> {
    let inside = to.source();
    let tcp_state = if l4.kind == L4Kind::Tcp {
        match TcpState::initial(l4.tcp_flags) {
            Some(state) => state as u8,
            None => {
                if let Some(claimed) = &allocation {
                    snat::release(&inside, claimed);
                }
                return Err(Reason::RstNoSession);
            }
        }
    } else {
        0
    };
    let mut flags = 0;
    if dnat_rule.is_some() {
        flags |= SESSION_DNAT;
    }
    if let Some(claimed) = &allocation {
        to.src = claimed.external.addr;
        to.sport = claimed.external.port;
        flags |= SESSION_SNAT;
    }
    // On refusal from here on, a port claimed just now goes back to the pool.
    let refuse = |reason: Reason| {
        if let Some(claimed) = &allocation {
            snat::release(&inside, claimed);
        }
        reason
    };

    // The reply entry first: inserting it if absent is what makes the reply tuple ours. Each
    // entry is counted in the session filter before it can be found, and the count is taken
    // back whenever the insert does not add an entry.
    let reply_key = to.reversed();
    if !count_key(&reply_key, Counted::Replies) {
        return Err(refuse(Reason::TableFull));
    }
    match REPLIES.insert(&reply_key, key, BPF_NOEXIST as u64) {
        Ok(()) => {}
        Err(e) if e == EEXIST => {
            uncount_key(&reply_key, Counted::Replies);
            match REPLIES.get_ptr(&reply_key) {
                // SAFETY: pointer from a successful lookup.
                Some(owner) if same_key(unsafe { &*owner }, key) => {}
                _ => return Err(refuse(Reason::SessionClash)),
            }
        }
        Err(_) => {
            uncount_key(&reply_key, Counted::Replies);
            return Err(refuse(Reason::TableFull));
        }
    }
    let mut slot = MaybeUninit::uninit();
    // SAFETY: an all-zero Session is a valid, empty one (no packets, no rules, no flags).
    // Filled in place: a literal with `..Session::default()` costs a byte-wise `memset`.
    let session: &mut Session = unsafe { zero_fill(&mut slot) };
    session.translated = to;
    session.dnat_rule = dnat_rule.unwrap_or(NO_RULE);
    session.snat_rule = match (&snat, &allocation) {
        (Some(c), Some(_)) => c.rule_slot,
        _ => NO_RULE,
    };
    session.created_ns = now;
    session.last_seen_ns = now;
    session.tcp_state = tcp_state;
    session.flags = flags;
    if !count_key(key, Counted::Sessions) {
        if REPLIES.remove(&reply_key).is_ok() {
            uncount_key(&reply_key, Counted::Replies);
        }
        return Err(refuse(Reason::TableFull));
    }
    let created = match SESSIONS.insert(key, &*session, BPF_NOEXIST as u64) {
        Ok(()) => true,
        // Another CPU created this flow's session a moment ago: use that one.
        Err(e) if e == EEXIST => {
            uncount_key(key, Counted::Sessions);
            false
        }
        Err(_) => {
            uncount_key(key, Counted::Sessions);
            if REPLIES.remove(&reply_key).is_ok() {
                uncount_key(&reply_key, Counted::Replies);
            }
            return Err(refuse(Reason::TableFull));
        }
    };
    if created {
        crate::events::session_created(key, session);
    }
    let Some(stored) = SESSIONS.get_ptr_mut(key) else {
        return Err(Reason::TableFull);
    };
    // SAFETY: pointer from a successful lookup.
    let stored = unsafe { &mut *stored };
    let to = stored.translated;
    rewrite(ctx, pkt, l4, key, &to)?;
    refresh(ctx, stored, l4, Dir::Original, now);
    frag::remember(
        pkt,
        &to,
        stored.dnat_rule,
        stored.snat_rule,
        Direction::Original,
    );
    Ok(if created {
        Reason::SessionNew
    } else {
        Reason::SessionOrig
    })
}
