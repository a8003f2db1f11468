//! Fragments: the first fragment of a datagram carries the L4 header and is translated like
//! any packet (sessions, rules); its new addresses are remembered in `FRAGMENTS` under the
//! datagram's identity as it arrived, and later fragments get the same addresses from there
//! (see `nat_common::frag` for why the L4 checksum needs nothing more).
//!
//! A later fragment whose first fragment is not remembered (it came first, the entry was
//! evicted or is older than `FRAG_MAX_AGE_NS`) takes the normal path, where nothing can
//! rewrite it with made-up ports: address-only stateless rules still apply (they need no
//! ports), a port rule passes it (`fragment_unmatched`), SNAT drops it (`snat_fragment`).

use core::mem::MaybeUninit;

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_boot_ns};
use nat_common::{
    conntrack::{FlowKey, NO_RULE},
    frag::{frag_entry_fresh, FragEntry, FragKey, FRAG_REPLY},
    stats::Reason,
};

use crate::{
    maps::FRAGMENTS,
    packet::Frame,
    parse::{Ipv4Packet, L4},
    rewrite::rewrite,
    stats::{count_rule, Direction},
    zero::zero_fill,
};

#[inline(always)]
fn key_of(pkt: &Ipv4Packet) -> FragKey {
    FragKey {
        src: pkt.src,
        dst: pkt.dst,
        id: pkt.ident,
        proto: pkt.proto,
        _pad: 0,
    }
}

/// After `pkt` was translated to `to`: if it is a first fragment, remembers the new addresses
/// (and the rules to count later fragments in) for its later fragments.
#[inline(always)]
pub fn remember(pkt: &Ipv4Packet, to: &FlowKey, rule: u32, rule2: u32, direction: Direction) {
    if !pkt.info.is_fragment || pkt.info.is_later_fragment {
        return;
    }
    let mut slot = MaybeUninit::uninit();
    // SAFETY: all-zero is a valid FragEntry. Filled in place (see `zero`).
    let entry: &mut FragEntry = unsafe { zero_fill(&mut slot) };
    entry.src = to.src;
    entry.dst = to.dst;
    entry.rule = rule;
    entry.rule2 = rule2;
    // SAFETY: helper without arguments.
    entry.created_ns = unsafe { bpf_ktime_get_boot_ns() };
    if direction == Direction::Reply {
        entry.flags = FRAG_REPLY;
    }
    // An LRU insert only fails on allocation trouble; then the later fragments go the
    // unmatched way, which is safe.
    let _ = FRAGMENTS.insert(&key_of(pkt), entry, BPF_ANY as u64);
}

/// Translates a later fragment whose first fragment was translated a moment ago. `Ok(None)`:
/// nothing (fresh) is remembered for its datagram.
#[inline(always)]
pub fn translate_later<C: Frame>(
    ctx: &C,
    pkt: &Ipv4Packet,
    l4: &L4,
) -> Result<Option<Reason>, Reason> {
    let key = key_of(pkt);
    let Some(entry) = FRAGMENTS.get_ptr(&key) else {
        return Ok(None);
    };
    // SAFETY: pointer from a successful lookup; copied out at once.
    let entry = unsafe { *entry };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if !frag_entry_fresh(entry.created_ns, now) {
        return Ok(None);
    }
    let from = l4.flow_key(pkt);
    let mut to = from;
    to.src = entry.src;
    to.dst = entry.dst;
    rewrite(ctx, pkt, l4, &from, &to)?;
    let direction = if entry.flags & FRAG_REPLY != 0 {
        Direction::Reply
    } else {
        Direction::Original
    };
    let bytes = ctx.packet_len() as u64;
    if entry.rule != NO_RULE {
        count_rule(ctx, entry.rule, direction, bytes);
    }
    if entry.rule2 != NO_RULE {
        count_rule(ctx, entry.rule2, direction, bytes);
    }
    Ok(Some(Reason::FragmentTranslated))
}
