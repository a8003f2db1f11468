//! Session events for the agent's optional event log. Off by default: then the cost is one
//! array lookup per new session. On: one ring-buffer write; a full ring drops the event and
//! counts it, never stalls the packet.

use nat_common::{
    conntrack::{FlowKey, Session},
    events::{SessionEvent, EVENTS_ON, EVENT_CREATED},
};

use crate::maps::{EVENT_CONFIG, EVENT_DROPS, SESSION_EVENTS};

/// Reports a session this program run created.
#[inline(always)]
pub fn session_created(key: &FlowKey, session: &Session) {
    match EVENT_CONFIG.get(0) {
        Some(&on) if on == EVENTS_ON => {}
        _ => return,
    }
    let event = SessionEvent {
        key: *key,
        translated: session.translated,
        dnat_rule: session.dnat_rule,
        snat_rule: session.snat_rule,
        kind: EVENT_CREATED,
        _pad: [0; 7],
    };
    if SESSION_EVENTS.output::<SessionEvent>(&event, 0).is_err() {
        if let Some(drops) = EVENT_DROPS.get_ptr_mut(0) {
            // SAFETY: per-CPU slot from a successful lookup; only this CPU writes it.
            unsafe { *drops += 1 };
        }
    }
}
