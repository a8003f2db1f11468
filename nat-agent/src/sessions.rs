//! Listing, deleting and flushing sessions (`conntrack -L/-D/-F`), shared by the local API
//! (server side) and the CLI (filters, JSON shapes, the human table).
//!
//! A session is shown with both tuples as packets carry them: the original direction as it
//! arrived, and the reply direction as it arrives (the translated original, reversed).

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr};

use anyhow::Result;
use nat_common::{
    conntrack::{FlowKey, Session, TcpState, NO_RULE},
    ipv4::proto,
};
use serde::{Deserialize, Serialize};

use crate::{
    dataplane::{SessionStore, Walk},
    gc::protocol_name,
};

/// Sessions returned by a listing when the request names no limit.
pub const DEFAULT_LIST_LIMIT: usize = 10_000;
/// Most sessions one listing returns.
pub const MAX_LIST_LIMIT: usize = 1_000_000;
/// Entries read per walk step (memory bound while walking a large table).
const WALK_PAGE: usize = 4_096;

/// Which sessions a request is about. Every given criterion must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionFilter {
    /// IP protocol.
    pub protocol: Option<u8>,
    /// An address of either tuple (source or destination, original or reply).
    pub address: Option<Ipv4Addr>,
    /// A port (or ICMP echo id) of either tuple.
    pub port: Option<u16>,
    /// The name of the DNAT or SNAT rule that made the session.
    pub rule: Option<String>,
}

/// A listing request: a filter and a page (`offset` matching sessions skipped, then at most
/// `limit`).
///
/// Pages follow the session table's own order, which is stable while the table does not
/// change: sessions created or deleted between two pages can shift the next page by that
/// many entries (the same holds for `conntrack -L` reading a busy table).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Which sessions.
    pub filter: SessionFilter,
    /// How many at most.
    pub limit: usize,
    /// How many matching sessions to skip.
    pub offset: usize,
}

impl SessionFilter {
    /// Whether no criterion is given (matches everything).
    pub fn is_empty(&self) -> bool {
        self.protocol.is_none()
            && self.address.is_none()
            && self.port.is_none()
            && self.rule.is_none()
    }

    /// Parses query parameters (`protocol`, `address`, `port`, `rule`, and `limit` when
    /// `allow_limit`), each at most once; anything else is an error naming it.
    pub fn from_pairs(pairs: &[(String, String)], allow_limit: bool) -> Result<ListQuery, String> {
        let mut q = ListQuery {
            filter: SessionFilter::default(),
            limit: DEFAULT_LIST_LIMIT,
            offset: 0,
        };
        let mut seen: Vec<&str> = Vec::new();
        for (name, value) in pairs {
            if seen.contains(&name.as_str()) {
                return Err(format!("{name} is given twice"));
            }
            seen.push(name);
            match name.as_str() {
                "protocol" => q.filter.protocol = Some(parse_protocol(value)?),
                "address" => {
                    q.filter.address = Some(
                        value
                            .parse()
                            .map_err(|_| format!("address {value:?} is not an IPv4 address"))?,
                    )
                }
                "port" => {
                    q.filter.port = Some(
                        value
                            .parse()
                            .map_err(|_| format!("port {value:?} is not in 0..=65535"))?,
                    )
                }
                "rule" => {
                    if value.is_empty() {
                        return Err("rule is empty".into());
                    }
                    q.filter.rule = Some(value.clone());
                }
                "limit" if allow_limit => {
                    q.limit = match value.parse::<usize>() {
                        Ok(n) if (1..=MAX_LIST_LIMIT).contains(&n) => n,
                        _ => return Err(format!("limit {value:?} is not in 1..={MAX_LIST_LIMIT}")),
                    }
                }
                "offset" if allow_limit => {
                    q.offset = value
                        .parse::<usize>()
                        .map_err(|_| format!("offset {value:?} is not a number of sessions"))?;
                }
                other => {
                    let known = if allow_limit {
                        "protocol, address, port, rule, limit, offset"
                    } else {
                        "protocol, address, port, rule"
                    };
                    return Err(format!("unknown parameter {other:?} (known: {known})"));
                }
            }
        }
        Ok(q)
    }

    /// The query string for these criteria (and `limit` and `offset`, when given), for the
    /// client.
    pub fn to_query(&self, limit: Option<usize>, offset: Option<usize>) -> String {
        let mut parts = Vec::new();
        if let Some(p) = self.protocol {
            parts.push(format!("protocol={}", protocol_name(p)));
        }
        if let Some(a) = self.address {
            parts.push(format!("address={a}"));
        }
        if let Some(p) = self.port {
            parts.push(format!("port={p}"));
        }
        if let Some(r) = &self.rule {
            parts.push(format!("rule={}", percent_encode(r)));
        }
        if let Some(l) = limit {
            parts.push(format!("limit={l}"));
        }
        if let Some(o) = offset {
            parts.push(format!("offset={o}"));
        }
        parts.join("&")
    }

    /// Whether the session `key` -> `session` matches; `rules` names the counter slots.
    pub fn matches(&self, key: &FlowKey, session: &Session, rules: &RuleNames) -> bool {
        if self.protocol.is_some_and(|p| p != key.proto) {
            return false;
        }
        let reply = session.translated.reversed();
        if let Some(a) = self.address {
            let a = a.octets();
            if ![key.src, key.dst, reply.src, reply.dst].contains(&a) {
                return false;
            }
        }
        if let Some(p) = self.port {
            let p = p.to_be_bytes();
            if ![key.sport, key.dport, reply.sport, reply.dport].contains(&p) {
                return false;
            }
        }
        if let Some(name) = &self.rule {
            let named = |slot: u32| rules.name(slot).is_some_and(|n| n == name);
            if !named(session.dnat_rule) && !named(session.snat_rule) {
                return false;
            }
        }
        true
    }
}

/// `tcp`, `udp`, `icmp`, or a protocol number.
fn parse_protocol(value: &str) -> Result<u8, String> {
    match value {
        "tcp" => Ok(proto::TCP),
        "udp" => Ok(proto::UDP),
        "icmp" => Ok(proto::ICMP),
        _ => Err(format!(
            "protocol {value:?} is not one of \"tcp\", \"udp\", \"icmp\""
        )),
    }
}

/// Rule names are restricted to `[A-Za-z0-9._-]` by validation, but a client may send
/// anything: encode what is not unreserved.
fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Counter slot -> rule name, for the slots in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleNames(BTreeMap<u32, String>);

impl RuleNames {
    /// From (name, slot) pairs.
    pub fn new(rules: impl IntoIterator<Item = (String, u32)>) -> Self {
        RuleNames(rules.into_iter().map(|(n, s)| (s, n)).collect())
    }

    /// The names after a rule change that left `rules` (name, slot) in force: those, and the
    /// deleted rules' names whose slot no other rule took, so the sessions they made can still
    /// be listed and deleted by rule name.
    pub fn after(&self, rules: &[(String, u32)]) -> Self {
        let mut names: BTreeMap<u32, String> = self
            .0
            .iter()
            .filter(|(_, name)| !rules.iter().any(|(n, _)| n == *name))
            .map(|(slot, name)| (*slot, name.clone()))
            .collect();
        names.extend(rules.iter().map(|(n, s)| (*s, n.clone())));
        RuleNames(names)
    }

    /// Slot -> name.
    pub fn by_slot(&self) -> &BTreeMap<u32, String> {
        &self.0
    }

    /// The name of `slot`; `None` for [`NO_RULE`] or a slot no rule holds any more.
    pub fn name(&self, slot: u32) -> Option<&str> {
        if slot == NO_RULE {
            return None;
        }
        self.0.get(&slot).map(String::as_str)
    }

    /// Whether some rule has this name.
    pub fn contains(&self, name: &str) -> bool {
        self.0.values().any(|n| n == name)
    }

    /// How a slot appears in a listing: its rule's name, `#slot` for a slot whose rule is
    /// gone, nothing for no rule.
    fn label(&self, slot: u32) -> Option<String> {
        if slot == NO_RULE {
            return None;
        }
        Some(
            self.name(slot)
                .map_or_else(|| format!("#{slot}"), str::to_string),
        )
    }
}

/// One direction's packet tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Tuple {
    /// Source address.
    #[schema(value_type = String, format = "ipv4")]
    pub src: Ipv4Addr,
    /// Source port (ICMP: the echo id of a request, else 0).
    pub sport: u16,
    /// Destination address.
    #[schema(value_type = String, format = "ipv4")]
    pub dst: Ipv4Addr,
    /// Destination port (ICMP: the echo id of a reply, else 0).
    pub dport: u16,
}

impl From<&FlowKey> for Tuple {
    fn from(k: &FlowKey) -> Self {
        Tuple {
            src: Ipv4Addr::from(k.src),
            sport: u16::from_be_bytes(k.sport),
            dst: Ipv4Addr::from(k.dst),
            dport: u16::from_be_bytes(k.dport),
        }
    }
}

/// A session as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionView {
    /// `tcp`, `udp`, `icmp` or `other`.
    pub protocol: String,
    /// The original direction as it arrived.
    pub original: Tuple,
    /// The reply direction as it arrives.
    pub reply: Tuple,
    /// The DNAT rule that made it, if any.
    pub dnat_rule: Option<String>,
    /// The SNAT rule that made it, if any.
    pub snat_rule: Option<String>,
    /// TCP state (`ESTABLISHED`, ...); `null` for other protocols.
    pub state: Option<String>,
    /// Seconds since creation.
    pub age_seconds: f64,
    /// Seconds since the last packet.
    pub idle_seconds: f64,
    /// Packets in the original direction.
    pub original_packets: u64,
    /// Bytes (whole frames) in the original direction.
    pub original_bytes: u64,
    /// Packets in the reply direction.
    pub reply_packets: u64,
    /// Bytes in the reply direction.
    pub reply_bytes: u64,
}

impl SessionView {
    /// The view of `key` -> `session` at `now_ns` (CLOCK_BOOTTIME).
    pub fn new(key: &FlowKey, session: &Session, rules: &RuleNames, now_ns: u64) -> Self {
        let seconds = |since: u64| now_ns.saturating_sub(since) as f64 / 1e9;
        SessionView {
            protocol: protocol_name(key.proto).to_string(),
            original: Tuple::from(key),
            reply: Tuple::from(&session.translated.reversed()),
            dnat_rule: rules.label(session.dnat_rule),
            snat_rule: rules.label(session.snat_rule),
            state: (key.proto == proto::TCP)
                .then(|| TcpState::from_u8(session.tcp_state).name().to_string()),
            age_seconds: seconds(session.created_ns),
            idle_seconds: seconds(session.last_seen_ns),
            original_packets: session.orig_packets,
            original_bytes: session.orig_bytes,
            reply_packets: session.reply_packets,
            reply_bytes: session.reply_bytes,
        }
    }
}

/// The answer to a listing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionList {
    /// Matching sessions, at most the limit.
    pub sessions: Vec<SessionView>,
    /// How many sessions matched in all.
    pub matched: u64,
    /// Whether more matching sessions follow this page.
    pub truncated: bool,
    /// Matching sessions skipped before this page.
    #[serde(default)]
    pub offset: u64,
    /// The `offset` of the next page, when there is one.
    #[serde(default)]
    pub next_offset: Option<u64>,
}

/// The answer to a deletion or flush.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Deleted {
    /// Sessions deleted.
    pub deleted: u64,
}

/// Calls `f` on every session, in table order. The caller owns the store, so nothing else
/// deletes meanwhile; the kernel only inserts, which a walk tolerates.
fn for_each_session(
    store: &mut dyn SessionStore,
    mut f: impl FnMut(&FlowKey, &Session),
) -> Result<()> {
    let mut cursor: Option<FlowKey> = None;
    loop {
        match store.sessions().walk(cursor.as_ref(), WALK_PAGE)? {
            Walk::Page { entries, next } => {
                for (k, s) in &entries {
                    f(k, s);
                }
                match next {
                    Some(k) => cursor = Some(k),
                    None => return Ok(()),
                }
            }
            // Only possible if something else deletes; start over rather than skip.
            Walk::Lost => cursor = None,
        }
    }
}

/// Checks that a rule filter names a rule in force, so a typo is an error rather than an
/// empty answer (or, for deletion, a silent no-op).
pub fn check_rule(filter: &SessionFilter, rules: &RuleNames) -> Result<(), String> {
    match &filter.rule {
        Some(name) if !rules.contains(name) => Err(format!("no rule named {name:?}")),
        _ => Ok(()),
    }
}

/// Lists the sessions matching `query`.
pub fn list(
    store: &mut dyn SessionStore,
    query: &ListQuery,
    rules: &RuleNames,
    now_ns: u64,
) -> Result<SessionList> {
    let mut out = SessionList::default();
    for_each_session(store, |k, s| {
        if query.filter.matches(k, s, rules) {
            out.matched += 1;
            if out.matched > query.offset as u64 && out.sessions.len() < query.limit {
                out.sessions.push(SessionView::new(k, s, rules, now_ns));
            }
        }
    })?;
    out.offset = query.offset as u64;
    let shown_to = out.offset + out.sessions.len() as u64;
    out.truncated = out.matched > shown_to;
    out.next_offset = out.truncated.then_some(shown_to);
    Ok(out)
}

/// Deletes the sessions matching `filter` (every session for an empty filter), each with its
/// reply entry. Endpoint mappings are left to the expiry sweep, which frees them once no
/// session uses them: deleting a mapping the kernel might be handing to a new flow right now
/// could give one external port to two inside hosts.
pub fn delete(
    store: &mut dyn SessionStore,
    filter: &SessionFilter,
    rules: &RuleNames,
) -> Result<Deleted> {
    let mut doomed = Vec::new();
    for_each_session(store, |k, s| {
        if filter.matches(k, s, rules) {
            doomed.push((*k, *s));
        }
    })?;
    let mut deleted = 0;
    for (k, s) in doomed {
        if store.delete_session(&k, &s)? {
            deleted += 1;
        }
    }
    Ok(Deleted { deleted })
}

/// `12s`, `5m03s`, `2h04m`, `3d02h`.
pub fn human_duration(seconds: f64) -> String {
    let s = if seconds.is_finite() && seconds > 0.0 {
        seconds as u64
    } else {
        0
    };
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// `1.5k`, `12M`: compact counters for the table.
fn human_count(n: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1_000_000_000_000, "T"),
        (1_000_000_000, "G"),
        (1_000_000, "M"),
        (1_000, "k"),
    ];
    for (scale, unit) in UNITS {
        if n >= scale {
            let whole = n / scale;
            return if whole < 10 {
                format!("{whole}.{}{unit}", (n % scale) * 10 / scale)
            } else {
                format!("{whole}{unit}")
            };
        }
    }
    n.to_string()
}

fn endpoint(protocol: &str, addr: Ipv4Addr, port: u16) -> String {
    if protocol == "icmp" || protocol == "other" {
        addr.to_string()
    } else {
        format!("{addr}:{port}")
    }
}

fn tuple_text(protocol: &str, t: &Tuple) -> String {
    let mut s = format!(
        "{} > {}",
        endpoint(protocol, t.src, t.sport),
        endpoint(protocol, t.dst, t.dport)
    );
    if protocol == "icmp" {
        // The echo id rides in whichever port field its direction uses.
        let _ = write!(s, " id {}", t.sport.max(t.dport));
    }
    s
}

/// The human table of a listing, `conntrack -L` style: one line per session, then a summary.
pub fn render_table(list: &SessionList) -> String {
    const HEADERS: [&str; 8] = [
        "PROTO",
        "ORIGINAL",
        "REPLY",
        "STATE",
        "RULE",
        "AGE",
        "IDLE",
        "PACKETS/BYTES",
    ];
    let rows: Vec<[String; 8]> = list
        .sessions
        .iter()
        .map(|s| {
            let rule = match (&s.dnat_rule, &s.snat_rule) {
                (Some(d), Some(n)) => format!("{d}+{n}"),
                (Some(r), None) | (None, Some(r)) => r.clone(),
                (None, None) => "-".into(),
            };
            [
                s.protocol.clone(),
                tuple_text(&s.protocol, &s.original),
                tuple_text(&s.protocol, &s.reply),
                s.state.clone().unwrap_or_else(|| "-".into()),
                rule,
                human_duration(s.age_seconds),
                human_duration(s.idle_seconds),
                format!(
                    "{}/{} {}/{}",
                    human_count(s.original_packets),
                    human_count(s.reply_packets),
                    human_count(s.original_bytes),
                    human_count(s.reply_bytes)
                ),
            ]
        })
        .collect();
    let mut widths = HEADERS.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    if !rows.is_empty() {
        line(&HEADERS);
        for row in &rows {
            let cells: Vec<&str> = row.iter().map(String::as_str).collect();
            line(&cells);
        }
    }
    let noun = if list.matched == 1 {
        "session"
    } else {
        "sessions"
    };
    if list.truncated {
        let _ = writeln!(
            out,
            "{} of {} matching {noun} shown (raise --limit for more)",
            list.sessions.len(),
            list.matched
        );
    } else {
        let _ = writeln!(out, "{} {noun}", list.matched);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::MemStore;
    use nat_common::conntrack::SESSION_SNAT;

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    /// 198.18.0.2:40000 -> 203.0.113.5:123 UDP, SNATed to 198.51.100.1:40000 by slot 4.
    fn ntp() -> (FlowKey, Session) {
        let key = FlowKey {
            src: [198, 18, 0, 2],
            dst: [203, 0, 113, 5],
            sport: 40000u16.to_be_bytes(),
            dport: 123u16.to_be_bytes(),
            proto: proto::UDP,
            _pad: [0; 3],
        };
        let session = Session {
            translated: FlowKey {
                src: [198, 51, 100, 1],
                sport: 1123u16.to_be_bytes(),
                ..key
            },
            dnat_rule: NO_RULE,
            snat_rule: 4,
            created_ns: 100_000_000_000,
            last_seen_ns: 160_000_000_000,
            orig_packets: 3,
            orig_bytes: 270,
            reply_packets: 2,
            reply_bytes: 180,
            flags: SESSION_SNAT,
            ..Default::default()
        };
        (key, session)
    }

    fn names() -> RuleNames {
        RuleNames::new([("private-out".to_string(), 4), ("web".to_string(), 1)])
    }

    #[test]
    fn parses_every_filter_and_the_limit() {
        let q = SessionFilter::from_pairs(
            &pairs(&[
                ("protocol", "udp"),
                ("address", "198.18.0.2"),
                ("port", "123"),
                ("rule", "private-out"),
                ("limit", "5"),
            ]),
            true,
        )
        .unwrap();
        assert_eq!(q.limit, 5);
        assert_eq!(
            q.filter,
            SessionFilter {
                protocol: Some(proto::UDP),
                address: Some(Ipv4Addr::new(198, 18, 0, 2)),
                port: Some(123),
                rule: Some("private-out".into()),
            }
        );
        assert_eq!(
            q.filter.to_query(Some(5), None),
            "protocol=udp&address=198.18.0.2&port=123&rule=private-out&limit=5"
        );
        let q = SessionFilter::from_pairs(&[], true).unwrap();
        assert!(q.filter.is_empty());
        assert_eq!(q.limit, DEFAULT_LIST_LIMIT);
    }

    #[test]
    fn bad_filters_say_what_is_wrong() {
        for (q, needle) in [
            (vec![("protocol", "sctp")], "protocol \"sctp\""),
            (vec![("address", "198.18.0.300")], "not an IPv4 address"),
            (vec![("port", "70000")], "not in 0..=65535"),
            (vec![("rule", "")], "rule is empty"),
            (vec![("limit", "0")], "limit"),
            (vec![("port", "1"), ("port", "2")], "twice"),
            (vec![("prot", "tcp")], "unknown parameter \"prot\""),
        ] {
            let err = SessionFilter::from_pairs(&pairs(&q), true).unwrap_err();
            assert!(err.contains(needle), "{q:?}: {err}");
        }
        // Deletion takes no limit.
        let err = SessionFilter::from_pairs(&pairs(&[("limit", "5")]), false).unwrap_err();
        assert!(err.contains("unknown parameter \"limit\""), "{err}");
    }

    #[test]
    fn filters_match_either_tuple() {
        let (k, s) = ntp();
        let n = names();
        let m = |f: SessionFilter| f.matches(&k, &s, &n);
        assert!(m(SessionFilter::default()));
        assert!(m(SessionFilter {
            protocol: Some(proto::UDP),
            ..Default::default()
        }));
        assert!(!m(SessionFilter {
            protocol: Some(proto::TCP),
            ..Default::default()
        }));
        // The external address and port appear only in the reply tuple.
        for addr in [[198, 18, 0, 2], [203, 0, 113, 5], [198, 51, 100, 1]] {
            assert!(m(SessionFilter {
                address: Some(addr.into()),
                ..Default::default()
            }));
        }
        assert!(!m(SessionFilter {
            address: Some([198, 18, 0, 3].into()),
            ..Default::default()
        }));
        for port in [40000, 123, 1123] {
            assert!(m(SessionFilter {
                port: Some(port),
                ..Default::default()
            }));
        }
        assert!(!m(SessionFilter {
            port: Some(80),
            ..Default::default()
        }));
        assert!(m(SessionFilter {
            rule: Some("private-out".into()),
            ..Default::default()
        }));
        assert!(!m(SessionFilter {
            rule: Some("web".into()),
            port: Some(123),
            ..Default::default()
        }));
        assert_eq!(
            check_rule(
                &SessionFilter {
                    rule: Some("nope".into()),
                    ..Default::default()
                },
                &n
            ),
            Err("no rule named \"nope\"".into())
        );
    }

    #[test]
    fn deleted_rules_keep_their_name_until_their_slot_is_taken() {
        let n = RuleNames::default().after(&[("a".into(), 0), ("b".into(), 1)]);
        // b deleted, c added on a fresh slot: b's sessions still list as b.
        let n = n.after(&[("a".into(), 0), ("c".into(), 2)]);
        assert_eq!(n.name(1), Some("b"));
        assert!(n.contains("b") && n.contains("c"));
        // b's slot taken over by d: the name goes; a rule renamed on its slot keeps one name.
        let n = n.after(&[("a2".into(), 0), ("d".into(), 1)]);
        assert_eq!(n.name(1), Some("d"));
        assert_eq!(n.name(0), Some("a2"));
        assert!(!n.contains("b") && !n.contains("a"));
    }

    #[test]
    fn list_and_delete_over_a_store() {
        let mut store = MemStore::default();
        let (k, s) = ntp();
        store.insert_session(k, s);
        for i in 0..5u16 {
            let mut k2 = k;
            k2.sport = (50000 + i).to_be_bytes();
            let mut s2 = s;
            s2.translated.sport = (2000 + i).to_be_bytes();
            store.insert_session(k2, s2);
        }
        let n = names();
        let q = ListQuery {
            filter: SessionFilter::default(),
            limit: 2,
            offset: 0,
        };
        let l = list(&mut store, &q, &n, 170_000_000_000).unwrap();
        assert_eq!((l.sessions.len(), l.matched, l.truncated), (2, 6, true));
        // Paging by next_offset visits every session exactly once.
        let mut seen = l.sessions.clone();
        let mut next = l.next_offset;
        while let Some(offset) = next {
            let page = list(
                &mut store,
                &ListQuery {
                    offset: offset as usize,
                    ..q.clone()
                },
                &n,
                170_000_000_000,
            )
            .unwrap();
            assert_eq!(page.offset, offset);
            seen.extend(page.sessions);
            next = page.next_offset;
        }
        assert_eq!(seen.len(), 6);
        let mut ports: Vec<u16> = seen.iter().map(|v| v.original.sport).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 6, "no session listed twice");
        let by_port = SessionFilter {
            port: Some(1123),
            ..Default::default()
        };
        assert_eq!(delete(&mut store, &by_port, &n).unwrap().deleted, 1);
        assert_eq!((store.sessions.len(), store.replies.len()), (5, 5));
        assert_eq!(
            delete(&mut store, &SessionFilter::default(), &n)
                .unwrap()
                .deleted,
            5
        );
        assert!(store.sessions.is_empty() && store.replies.is_empty());
    }

    #[test]
    fn view_and_json_shape() {
        let (k, s) = ntp();
        let v = SessionView::new(&k, &s, &names(), 170_000_000_000);
        assert_eq!(v.reply.src, Ipv4Addr::new(203, 0, 113, 5));
        assert_eq!(v.reply.dst, Ipv4Addr::new(198, 51, 100, 1));
        assert_eq!(v.reply.dport, 1123);
        assert_eq!((v.age_seconds, v.idle_seconds), (70.0, 10.0));
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["snat_rule"], "private-out");
        assert_eq!(json["dnat_rule"], serde_json::Value::Null);
        assert_eq!(json["state"], serde_json::Value::Null);
        assert_eq!(json["original"]["sport"], 40000);
        let back: SessionView = serde_json::from_value(json).unwrap();
        assert_eq!(back, v);
        // A slot whose rule is gone still shows, by number.
        let v = SessionView::new(&k, &s, &RuleNames::default(), 170_000_000_000);
        assert_eq!(v.snat_rule.as_deref(), Some("#4"));
    }

    #[test]
    fn table_lines_up_and_summarises() {
        let (k, s) = ntp();
        let mut tcp_key = k;
        tcp_key.proto = proto::TCP;
        let mut tcp = s;
        tcp.translated.proto = proto::TCP;
        tcp.tcp_state = TcpState::Established as u8;
        tcp.dnat_rule = 1;
        tcp.orig_bytes = 1_234_567;
        let n = names();
        let now = 4_000_000_000_000;
        let list = SessionList {
            sessions: vec![
                SessionView::new(&k, &s, &n, now),
                SessionView::new(&tcp_key, &tcp, &n, now),
            ],
            matched: 2,
            truncated: false,
            ..Default::default()
        };
        let text = render_table(&list);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("PROTO  ORIGINAL"), "{text}");
        assert!(
            lines[1].starts_with(
                "udp    198.18.0.2:40000 > 203.0.113.5:123  203.0.113.5:123 > 198.51.100.1:1123  -            private-out      1h05m  1h04m  3/2 270/180"
            ),
            "{text}"
        );
        assert!(lines[2].contains("ESTABLISHED  web+private-out"), "{text}");
        assert!(lines[2].ends_with("3/2 1.2M/180"), "{text}");
        assert_eq!(lines[3], "2 sessions");
        // Columns line up: every row has its RULE column where the header has it.
        let col = lines[0].find("RULE").unwrap();
        assert_eq!(&lines[1][col..col + 11], "private-out");

        let truncated = SessionList {
            sessions: vec![SessionView::new(&k, &s, &n, now)],
            matched: 7,
            truncated: true,
            ..Default::default()
        };
        assert!(render_table(&truncated)
            .ends_with("1 of 7 matching sessions shown (raise --limit for more)\n"));
        assert_eq!(render_table(&SessionList::default()), "0 sessions\n");
    }

    #[test]
    fn icmp_shows_the_echo_id_and_durations_are_compact() {
        let key = FlowKey {
            src: [198, 18, 0, 2],
            dst: [203, 0, 113, 5],
            sport: 77u16.to_be_bytes(),
            dport: [0, 0],
            proto: proto::ICMP,
            _pad: [0; 3],
        };
        let s = Session {
            translated: FlowKey {
                src: [198, 51, 100, 1],
                sport: 1077u16.to_be_bytes(),
                ..key
            },
            dnat_rule: NO_RULE,
            snat_rule: NO_RULE,
            ..Default::default()
        };
        let v = SessionView::new(&key, &s, &RuleNames::default(), 0);
        assert_eq!(
            tuple_text("icmp", &v.original),
            "198.18.0.2 > 203.0.113.5 id 77"
        );
        assert_eq!(
            tuple_text("icmp", &v.reply),
            "203.0.113.5 > 198.51.100.1 id 1077"
        );
        assert_eq!(human_duration(59.9), "59s");
        assert_eq!(human_duration(61.0), "1m01s");
        assert_eq!(human_duration(7441.0), "2h04m");
        assert_eq!(human_duration(90_000.0), "1d01h");
        assert_eq!(human_duration(-1.0), "0s");
        assert_eq!(human_count(999), "999");
        assert_eq!(human_count(1_500), "1.5k");
        assert_eq!(human_count(12_000_000), "12M");
    }
}
