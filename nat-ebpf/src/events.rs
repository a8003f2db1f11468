//! Session events for the agent's optional event log. Off by default: then the cost is one
//! array lookup per new session. On: one ring-buffer write; a full ring drops the event and
//! counts it, never stalls the packet.

use core::mem::MaybeUninit;

use nat_common::{
    conntrack::{FlowKey, Session},
    events::{SessionEvent, EVENTS_ON, EVENT_CREATED},
};

use crate::{
    maps::{EVENT_CONFIG, EVENT_DROPS, SESSION_EVENTS},
    stats::increment,
    zero::zero_fill,
};

/// Reports a session this program run created.
#[inline(always)]
pub fn session_created(key: &FlowKey, session: &Session) {
    match EVENT_CONFIG.get(0) {
        Some(&on) if on == EVENTS_ON => {}
        _ => return,
    }
    let mut slot = MaybeUninit::uninit();
    // SAFETY: all-zero is a valid SessionEvent. Filled in place (see `zero`).
    let event: &mut SessionEvent = unsafe { zero_fill(&mut slot) };
    event.key = *key;
    event.translated = session.translated;
    event.dnat_rule = session.dnat_rule;
    event.snat_rule = session.snat_rule;
    event.kind = EVENT_CREATED;
    if SESSION_EVENTS.output::<SessionEvent>(event, 0).is_err() {
        increment(&EVENT_DROPS, 0);
    }
}
