//! The NAT event log: one record per session created (written by the XDP program into a ring
//! buffer) or deleted (written by the agent, which alone deletes sessions). Off by default.

use crate::conntrack::FlowKey;

/// [`SessionEvent::kind`]: the program created the session.
pub const EVENT_CREATED: u8 = 1;

/// `EVENT_CONFIG[0]` value that turns the kernel's create events on (anything else: off).
pub const EVENTS_ON: u32 = 1;

/// Bytes of the `SESSION_EVENTS` ring buffer: 4096 events of 48 bytes (plus the ring's 8-byte
/// record headers) before the reader must catch up; beyond that events are dropped and counted,
/// never waited for, so the cost per new flow stays bounded.
pub const EVENT_RING_BYTES: u32 = 256 * 1024;

/// A session event as the program writes it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionEvent {
    /// The original-direction tuple as it arrived (the session's key).
    pub key: FlowKey,
    /// That tuple after translation.
    pub translated: FlowKey,
    /// DNAT rule slot or `conntrack::NO_RULE`.
    pub dnat_rule: u32,
    /// SNAT rule slot or `conntrack::NO_RULE`.
    pub snat_rule: u32,
    /// `EVENT_*`.
    pub kind: u8,
    /// Zero.
    pub _pad: [u8; 7],
}

const _: () = assert!(core::mem::size_of::<SessionEvent>() == 48);

#[cfg(feature = "user")]
// SAFETY: plain old data, `repr(C)`, explicit padding.
unsafe impl aya::Pod for SessionEvent {}
