//! `[conntrack]`: the session table's size, the idle timeouts and the expiry sweep.
//!
//! The timeouts guard the RFC floors (RFC 4787 for UDP, RFC 5382 for TCP, RFC 5508 for ICMP):
//! a NAT that forgets a mapping sooner than an application expects breaks it silently, so a
//! value below a floor is refused unless the operator says it is a lab.

use std::time::Duration;

use nat_common::maps::DEFAULT_MAX_SESSIONS;

use super::Problem;
use crate::config::ConntrackSection;

/// Smallest `max_sessions`: below this the table is a toy and pressure sweeps never rest.
pub const MIN_MAX_SESSIONS: u32 = 1_024;
/// Largest `max_sessions` (the four tables then take several GiB of kernel memory).
pub const MAX_MAX_SESSIONS: u32 = 16_777_216;
/// Longest timeout accepted, in seconds (30 days): longer is a leak, not a timeout.
pub const MAX_TIMEOUT_SECS: i64 = 30 * 24 * 3600;
/// Longest sweep interval, in seconds.
pub const MAX_GC_INTERVAL_SECS: i64 = 3_600;

/// Idle timeouts by protocol and TCP state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// UDP (RFC 4787 REQ-5: at least 120 s; default 300 s).
    pub udp: Duration,
    /// Established TCP (RFC 5382 REQ-5: at least 2 h 4 min).
    pub tcp_established: Duration,
    /// TCP opening or closing (RFC 5382: at least 4 min).
    pub tcp_transitory: Duration,
    /// TCP after a reset (no floor: nothing is left to keep).
    pub tcp_closed: Duration,
    /// ICMP echo (RFC 5508 REQ-1: at least 60 s).
    pub icmp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            udp: Duration::from_secs(300),
            tcp_established: Duration::from_secs(7_440),
            tcp_transitory: Duration::from_secs(240),
            tcp_closed: Duration::from_secs(10),
            icmp: Duration::from_secs(60),
        }
    }
}

/// Validated `[conntrack]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conntrack {
    /// Capacity of SESSIONS, REPLIES, MAPPINGS and BINDINGS.
    pub max_sessions: u32,
    /// Idle timeouts.
    pub timeouts: Timeouts,
    /// Time between expiry sweeps.
    pub gc_interval: Duration,
}

impl Default for Conntrack {
    fn default() -> Self {
        Conntrack {
            max_sessions: DEFAULT_MAX_SESSIONS,
            timeouts: Timeouts::default(),
            gc_interval: Duration::from_secs(5),
        }
    }
}

/// One timeout field: its name, the RFC floor (seconds, with the RFC named) if any, and where
/// the validated value goes.
struct TimeoutField {
    name: &'static str,
    floor: Option<(i64, &'static str)>,
    value: Option<i64>,
    slot: fn(&mut Timeouts) -> &mut Duration,
}

/// Validates `[conntrack]`, pushing a problem per faulty field; defaults fill what is absent.
pub(super) fn validate_conntrack(c: &ConntrackSection, problems: &mut Vec<Problem>) -> Conntrack {
    let mut out = Conntrack::default();
    let mut problem = |field: &'static str, message: String| {
        problems.push(Problem {
            place: "[conntrack]".into(),
            field: Some(field),
            message,
        })
    };
    if let Some(n) = c.max_sessions {
        match u32::try_from(n) {
            Ok(n) if (MIN_MAX_SESSIONS..=MAX_MAX_SESSIONS).contains(&n) => out.max_sessions = n,
            _ => problem(
                "max_sessions",
                format!("{n} is out of range {MIN_MAX_SESSIONS}..={MAX_MAX_SESSIONS}"),
            ),
        }
    }
    let allow_below = c.allow_below_rfc_floors.unwrap_or(false);
    let fields = [
        TimeoutField {
            name: "udp_timeout",
            floor: Some((120, "RFC 4787")),
            value: c.udp_timeout,
            slot: |t| &mut t.udp,
        },
        TimeoutField {
            name: "tcp_established_timeout",
            floor: Some((7_440, "RFC 5382")),
            value: c.tcp_established_timeout,
            slot: |t| &mut t.tcp_established,
        },
        TimeoutField {
            name: "tcp_transitory_timeout",
            floor: Some((240, "RFC 5382")),
            value: c.tcp_transitory_timeout,
            slot: |t| &mut t.tcp_transitory,
        },
        TimeoutField {
            name: "tcp_closed_timeout",
            floor: None,
            value: c.tcp_closed_timeout,
            slot: |t| &mut t.tcp_closed,
        },
        TimeoutField {
            name: "icmp_timeout",
            floor: Some((60, "RFC 5508")),
            value: c.icmp_timeout,
            slot: |t| &mut t.icmp,
        },
    ];
    for field in fields {
        let Some(secs) = field.value else { continue };
        if !(1..=MAX_TIMEOUT_SECS).contains(&secs) {
            problem(
                field.name,
                format!("{secs} is out of range 1..={MAX_TIMEOUT_SECS} seconds"),
            );
            continue;
        }
        if let Some((floor, rfc)) = field.floor {
            if secs < floor && !allow_below {
                problem(
                    field.name,
                    format!(
                        "{secs} s is below the {rfc} floor of {floor} s; applications would \
                         lose their mappings while idle (set allow_below_rfc_floors = true \
                         only for labs and tests)"
                    ),
                );
                continue;
            }
        }
        // In range 1..=MAX_TIMEOUT_SECS, so the cast is exact.
        *(field.slot)(&mut out.timeouts) = Duration::from_secs(secs as u64);
    }
    if let Some(secs) = c.gc_interval {
        if (1..=MAX_GC_INTERVAL_SECS).contains(&secs) {
            out.gc_interval = Duration::from_secs(secs as u64);
        } else {
            problem(
                "gc_interval",
                format!("{secs} is out of range 1..={MAX_GC_INTERVAL_SECS} seconds"),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(c: ConntrackSection) -> (Conntrack, Vec<Problem>) {
        let mut problems = Vec::new();
        let out = validate_conntrack(&c, &mut problems);
        (out, problems)
    }

    #[test]
    fn defaults_meet_the_rfc_floors() {
        let (c, problems) = check(ConntrackSection::default());
        assert!(problems.is_empty());
        assert_eq!(c.max_sessions, DEFAULT_MAX_SESSIONS);
        assert_eq!(c.timeouts.udp, Duration::from_secs(300));
        assert_eq!(c.timeouts.tcp_established, Duration::from_secs(7440));
        assert_eq!(c.timeouts.tcp_transitory, Duration::from_secs(240));
        assert_eq!(c.timeouts.tcp_closed, Duration::from_secs(10));
        assert_eq!(c.timeouts.icmp, Duration::from_secs(60));
        assert_eq!(c.gc_interval, Duration::from_secs(5));
    }

    #[test]
    fn below_floor_is_refused_unless_allowed() {
        let section = ConntrackSection {
            udp_timeout: Some(30),
            icmp_timeout: Some(59),
            tcp_closed_timeout: Some(1),
            ..Default::default()
        };
        let (_, problems) = check(section.clone());
        let fields: Vec<_> = problems.iter().map(|p| p.field.unwrap()).collect();
        assert_eq!(fields, ["udp_timeout", "icmp_timeout"]);
        assert!(problems[0].message.contains("RFC 4787 floor of 120 s"));
        let (c, problems) = check(ConntrackSection {
            allow_below_rfc_floors: Some(true),
            ..section
        });
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(c.timeouts.udp, Duration::from_secs(30));
        assert_eq!(c.timeouts.tcp_closed, Duration::from_secs(1));
    }

    #[test]
    fn ranges_are_enforced() {
        let (_, problems) = check(ConntrackSection {
            max_sessions: Some(100),
            tcp_established_timeout: Some(0),
            gc_interval: Some(-1),
            allow_below_rfc_floors: Some(true),
            ..Default::default()
        });
        let fields: Vec<_> = problems.iter().map(|p| p.field.unwrap()).collect();
        assert_eq!(
            fields,
            ["max_sessions", "tcp_established_timeout", "gc_interval"]
        );
        assert!(problems.iter().all(|p| p.place == "[conntrack]"));
    }
}
