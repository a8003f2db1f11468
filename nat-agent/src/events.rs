//! The NAT event log: one JSON line per session created (from the XDP program's ring buffer)
//! and per session deleted (expired by the sweep, or deleted through the API; the agent alone
//! deletes, so it reports those itself), with the translation and, for deletions, the
//! session's counters. Off by default (`[events] log`); cost when on is bounded: the program
//! drops events rather than wait when the ring is full, the agent drops them when its writer
//! falls behind, and both count what they dropped (`xdpnat_events_dropped_total`).

use std::{
    collections::BTreeMap,
    io::Write,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use nat_common::{
    conntrack::{FlowKey, Session, NO_RULE},
    events::{SessionEvent, EVENT_CREATED},
};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::{gc::protocol_name, sessions::Tuple};

/// Where the event log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventLog {
    /// The agent's standard output (the journal, under systemd).
    Stdout,
    /// Appended to a file.
    File(PathBuf),
}

/// Records waiting for the writer; beyond this, records are dropped and counted.
const QUEUE: usize = 8192;

/// One line of the event log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRecord {
    /// Seconds since the Unix epoch when the agent saw the event.
    pub time: f64,
    /// `created` or `deleted`.
    pub event: &'static str,
    /// `tcp`, `udp`, `icmp`.
    pub protocol: &'static str,
    /// The original direction as it arrived.
    pub original: Tuple,
    /// The original direction after translation (what left the NAT).
    pub translated: Tuple,
    /// The DNAT rule that made the session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dnat_rule: Option<String>,
    /// The SNAT rule that made the session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat_rule: Option<String>,
    /// For deletions: packets and bytes in each direction over the session's life.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counters: Option<Counters>,
}

/// A deleted session's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Packets in the original direction.
    pub original_packets: u64,
    /// Bytes in the original direction.
    pub original_bytes: u64,
    /// Packets in the reply direction.
    pub reply_packets: u64,
    /// Bytes in the reply direction.
    pub reply_bytes: u64,
}

/// What a record needs before rule names are attached.
#[derive(Debug, Clone, Copy)]
struct Raw {
    created: bool,
    key: FlowKey,
    translated: FlowKey,
    dnat_rule: u32,
    snat_rule: u32,
    counters: Option<Counters>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Raw {
    fn record(&self, names: &BTreeMap<u32, String>) -> EventRecord {
        let name = |slot: u32| {
            (slot != NO_RULE).then(|| {
                names
                    .get(&slot)
                    .cloned()
                    .unwrap_or_else(|| format!("#{slot}"))
            })
        };
        EventRecord {
            time: now(),
            event: if self.created { "created" } else { "deleted" },
            protocol: protocol_name(self.key.proto),
            original: Tuple::from(&self.key),
            translated: Tuple::from(&self.translated),
            dnat_rule: name(self.dnat_rule),
            snat_rule: name(self.snat_rule),
            counters: self.counters,
        }
    }
}

/// The agent's side of deletions: a bounded queue to the writer (a full queue drops and
/// counts, so a sweep of a million sessions never waits for a disk).
#[derive(Debug, Clone)]
pub struct DeletionSink {
    queue: mpsc::Sender<Raw>,
    dropped: Arc<AtomicU64>,
}

impl DeletionSink {
    /// Reports `session` (as last read) as deleted.
    pub fn report(&self, key: &FlowKey, session: &Session) {
        let raw = Raw {
            created: false,
            key: *key,
            translated: session.translated,
            dnat_rule: session.dnat_rule,
            snat_rule: session.snat_rule,
            counters: Some(Counters {
                original_packets: session.orig_packets,
                original_bytes: session.orig_bytes,
                reply_packets: session.reply_packets,
                reply_bytes: session.reply_bytes,
            }),
        };
        if self.queue.try_send(raw).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The running event log.
pub struct EventLogger {
    /// Where the deletions go (hand to the session store).
    pub deletions: DeletionSink,
    /// Records the agent dropped.
    pub dropped: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl EventLogger {
    /// Opens `log` and starts the writer and the ring-buffer reader. `names` follows the rule
    /// names by counter slot (the owner updates it with every rule change).
    pub fn start(
        log: &EventLog,
        ring: RingBuf<MapData>,
        names: watch::Receiver<BTreeMap<u32, String>>,
    ) -> Result<Self> {
        let out: Box<dyn Write + Send> = match log {
            EventLog::Stdout => Box::new(std::io::stdout()),
            EventLog::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening the event log {}", path.display()))?,
            ),
        };
        let (queue, rx) = mpsc::channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let writer = tokio::spawn(write_records(rx, out, names));
        let reader = tokio::spawn(read_ring(ring, queue.clone(), Arc::clone(&dropped)));
        Ok(EventLogger {
            deletions: DeletionSink {
                queue,
                dropped: Arc::clone(&dropped),
            },
            dropped,
            tasks: vec![writer, reader],
        })
    }
}

impl Drop for EventLogger {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn write_records(
    mut rx: mpsc::Receiver<Raw>,
    mut out: Box<dyn Write + Send>,
    names: watch::Receiver<BTreeMap<u32, String>>,
) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 256).await > 0 {
        let names = names.borrow().clone();
        let mut text = String::new();
        for raw in batch.drain(..) {
            match serde_json::to_string(&raw.record(&names)) {
                Ok(line) => {
                    text.push_str(&line);
                    text.push('\n');
                }
                Err(e) => warn!("encoding an event: {e}"),
            }
        }
        // Written whole and flushed per batch, so a reader of the file sees complete lines.
        if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            warn!("writing the event log: {e}");
        }
    }
}

async fn read_ring(ring: RingBuf<MapData>, queue: mpsc::Sender<Raw>, dropped: Arc<AtomicU64>) {
    // SAFETY: the AsyncFd owns the ring buffer, which owns its map fd: the fd stays open and
    // unchanged for the AsyncFd's whole life.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("cannot poll the session event ring: {e}");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<SessionEvent>() {
                continue;
            }
            // SAFETY: the program writes exactly one `SessionEvent` per record; the length is
            // checked above and `read_unaligned` needs no alignment.
            let event: SessionEvent =
                unsafe { std::ptr::read_unaligned(item.as_ptr() as *const SessionEvent) };
            drop(item);
            let raw = Raw {
                created: event.kind == EVENT_CREATED,
                key: event.key,
                translated: event.translated,
                dnat_rule: event.dnat_rule,
                snat_rule: event.snat_rule,
                counters: None,
            };
            if queue.try_send(raw).is_err() {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        guard.clear_ready();
    }
}
