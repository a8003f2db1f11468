//! The task that owns the dataplane: it alone touches the maps. The metrics handler and the
//! local API send it [`Request`]s; between requests it runs the expiry sweep on its own timer,
//! so a sweep never races a deletion from the API, and rule changes are applied one at a time.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tracing::{debug, info, warn};

use crate::{
    api::ApiError,
    compile::{compile, slot_history_after, Compiled},
    config::ConfigFile,
    dataplane::{Dataplane, SessionStore},
    gc::{boottime_ns, next_delay, Gc, GcConfig, PortCapacity, MAX_VISITS_PER_RUN},
    metrics::{ConntrackView, RuleInfo, RuleKind, ScrapeView},
    model::{validate, Model, ValidationError},
    ruleset::{self, RuleChange, RuleDocument},
    sessions::{self, check_rule, Deleted, ListQuery, RuleNames, SessionFilter, SessionList},
    status::{
        ApplyCounts, ApplyReport, ApplySource, InterfaceStatus, LastApply, RuleStats,
        SessionsStatus, Stats, Status,
    },
    Loaded,
};

/// A change to the rules in force.
pub(crate) enum Change {
    /// An edit through the API.
    Edit(RuleChange),
    /// The config file, re-read: its rules replace those in force; its other sections must
    /// not differ from the running config's.
    File(Box<ConfigFile>),
    /// The config file could not be read or parsed (the message says why): refused, and
    /// counted like any refusal.
    Unreadable(String),
}

/// A rule change request.
pub(crate) struct ChangeRequest {
    /// What to change.
    pub change: Change,
    /// Refuse unless the rules in force are at this generation.
    pub expected_generation: Option<u64>,
    /// Report only.
    pub dry_run: bool,
    /// Who asks.
    pub source: ApplySource,
}

/// Requests to the task that owns the dataplane.
pub(crate) enum Request {
    /// Read counters and the state needed to label them.
    Scrape(oneshot::Sender<Result<ScrapeView>>),
    /// List sessions.
    ListSessions {
        query: ListQuery,
        reply: oneshot::Sender<Result<SessionList, ApiError>>,
    },
    /// Delete the sessions matching a filter (all of them for an empty filter: flush).
    DeleteSessions {
        filter: SessionFilter,
        reply: oneshot::Sender<Result<Deleted, ApiError>>,
    },
    /// The rules in force.
    GetRules(oneshot::Sender<RuleDocument>),
    /// Change the rules (or report what a change would do).
    ChangeRules {
        request: ChangeRequest,
        reply: oneshot::Sender<Result<ApplyReport, ApiError>>,
    },
    /// The agent's status.
    Status(oneshot::Sender<Result<Status, ApiError>>),
    /// The dataplane's counters.
    Stats(oneshot::Sender<Result<Stats, ApiError>>),
}

/// The dataplane and everything needed to serve requests about it.
pub(crate) struct Owner {
    dataplane: Dataplane,
    /// The config file the agent started from (names it in errors and in the status).
    config_path: String,
    /// The desired state in force: the file as read, with the rule changes applied since.
    running: ConfigFile,
    model: Model,
    compiled: Compiled,
    /// Rule id -> counter slot, for every rule that has had one (see `compile`).
    slot_history: BTreeMap<u32, u32>,
    rules: Vec<RuleInfo>,
    /// Names of the rules in force and of deleted rules whose slot is still theirs.
    names: RuleNames,
    gc: Option<Gc>,
    gc_interval: Duration,
    generation: u64,
    applies: ApplyCounts,
    last_apply: Option<LastApply>,
    started: Instant,
    /// The event log, when on, and the rule names it labels events with.
    events: Option<(
        crate::events::EventLogger,
        tokio::sync::watch::Sender<BTreeMap<u32, String>>,
    )>,
    /// Where the VIP prefixes to announce go after every applied change.
    vips: Option<tokio::sync::watch::Sender<std::collections::BTreeSet<ipnet::Ipv4Net>>>,
}

impl Owner {
    /// Takes over `dataplane`, which holds `loaded.compiled`.
    pub(crate) fn new(dataplane: Dataplane, config_path: &str, loaded: Loaded) -> Self {
        let Loaded {
            raw,
            model,
            compiled,
        } = loaded;
        let gc = dataplane.has_conntrack().then(|| {
            Gc::new(GcConfig {
                timeouts: model.conntrack.timeouts,
                max_sessions: dataplane.max_sessions(),
                max_visits: MAX_VISITS_PER_RUN,
                ports: PortCapacity::from_rules(&model.snat),
            })
        });
        // Pinned state carries the slots of earlier runs (and of rules deleted since).
        let earlier = dataplane.slot_history().unwrap_or_else(|e| {
            warn!("reading the pinned slot table: {e:#}");
            BTreeMap::new()
        });
        let slot_history = slot_history_after(&earlier, &compiled.slots);
        let rules = rule_infos(&model, &compiled);
        let names = RuleNames::default().after(&name_slots(&rules));
        let mut applies = ApplyCounts::default();
        applies.record(ApplySource::File, true);
        Owner {
            dataplane,
            config_path: config_path.to_string(),
            gc_interval: model.conntrack.gc_interval,
            running: raw,
            model,
            compiled,
            slot_history,
            rules,
            names,
            gc,
            generation: 1,
            applies,
            last_apply: Some(LastApply {
                source: ApplySource::File,
                applied: true,
                error: None,
                unix_time: unix_now(),
            }),
            started: Instant::now(),
            vips: None,
            events: None,
        }
    }

    /// Starts the NAT event log (`[events] log`).
    pub(crate) fn start_event_log(&mut self, log: &crate::events::EventLog) -> Result<()> {
        let (names, rx) = tokio::sync::watch::channel(self.names.by_slot().clone());
        let logger = self.dataplane.start_event_log(log, rx)?;
        self.events = Some((logger, names));
        Ok(())
    }

    /// Sends the VIP prefixes of every applied rule change to `vips` (see `announce`).
    pub(crate) fn announcing(
        mut self,
        vips: tokio::sync::watch::Sender<std::collections::BTreeSet<ipnet::Ipv4Net>>,
    ) -> Self {
        self.vips = Some(vips);
        self
    }

    /// Serves requests and runs the sweep until every sender is gone, then drops the
    /// dataplane (which detaches the program).
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut next_sweep = Instant::now();
        loop {
            tokio::select! {
                request = rx.recv() => match request {
                    Some(request) => self.handle(request),
                    None => break,
                },
                _ = tokio::time::sleep_until(next_sweep), if self.gc.is_some() => {
                    let delay = blocking(|| self.sweep());
                    next_sweep = Instant::now() + delay;
                }
            }
        }
    }

    fn handle(&mut self, request: Request) {
        match request {
            Request::Scrape(reply) => {
                let _ = reply.send(self.scrape());
            }
            Request::ListSessions { query, reply } => {
                let result = blocking(|| self.list(&query));
                let _ = reply.send(result);
            }
            Request::DeleteSessions { filter, reply } => {
                let result = blocking(|| self.delete(&filter));
                let _ = reply.send(result);
            }
            Request::GetRules(reply) => {
                let _ = reply.send(RuleDocument::of(&self.running, self.generation));
            }
            Request::ChangeRules { request, reply } => {
                let result = blocking(|| self.change(request));
                let _ = reply.send(result);
            }
            Request::Status(reply) => {
                let _ = reply.send(Ok(self.status()));
            }
            Request::Stats(reply) => {
                let _ = reply.send(self.stats().map_err(ApiError::internal));
            }
        }
    }

    /// Validates, compiles and applies a rule change, all or nothing: on any refusal the rules
    /// in force stay exactly as they were (the dataplane writes into the rule bank not in use
    /// and switches only when everything is written).
    fn change(&mut self, request: ChangeRequest) -> Result<ApplyReport, ApiError> {
        let ChangeRequest {
            change,
            expected_generation,
            dry_run,
            source,
        } = request;
        let outcome = self.try_change(change, expected_generation, dry_run);
        if !dry_run {
            match &outcome {
                Ok(report) if !report.applied => {}
                Ok(report) => {
                    info!(
                        source = source.as_str(),
                        generation = report.generation,
                        added = ?report.changes.added,
                        removed = ?report.changes.removed,
                        changed = ?report.changes.changed,
                        moved = ?report.changes.moved,
                        "rules changed"
                    );
                    self.record_apply(source, None);
                }
                Err(e) => {
                    warn!(
                        source = source.as_str(),
                        "rule change refused: {}",
                        e.message()
                    );
                    self.record_apply(source, Some(e.message().to_string()));
                }
            }
        }
        outcome
    }

    fn record_apply(&mut self, source: ApplySource, error: Option<String>) {
        self.applies.record(source, error.is_none());
        self.last_apply = Some(LastApply {
            source,
            applied: error.is_none(),
            error,
            unix_time: unix_now(),
        });
    }

    fn try_change(
        &mut self,
        change: Change,
        expected_generation: Option<u64>,
        dry_run: bool,
    ) -> Result<ApplyReport, ApiError> {
        if let Some(expected) = expected_generation {
            if expected != self.generation {
                return Err(ApiError::Conflict(format!(
                    "stale generation {expected}: the rules in force are at generation {}; \
                     read them again and redo the change",
                    self.generation
                )));
            }
        }
        let (next, label) = match change {
            Change::Edit(edit) => (
                ruleset::edit(&self.running, edit).map_err(ApiError::from)?,
                "the changed rules".to_string(),
            ),
            Change::File(file) => {
                let differ = ruleset::restart_only_differences(&self.running, &file);
                if !differ.is_empty() {
                    return Err(ApiError::BadRequest(format!(
                        "{}: {} differ from the running agent's; only [[dnat]] and [[snat]] \
                         apply without a restart (restart the agent to apply the rest)",
                        self.config_path,
                        differ.join(", ")
                    )));
                }
                (*file, self.config_path.clone())
            }
            Change::Unreadable(message) => return Err(ApiError::BadRequest(message)),
        };
        let model = validate(&label, &next).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let compiled = compile(&model, &self.slot_history).map_err(|problems| {
            ApiError::BadRequest(
                ValidationError {
                    file: label.clone(),
                    problems,
                }
                .to_string(),
            )
        })?;
        let changes = ruleset::diff(&self.running, &next);
        // `[[bypass]]` entries are not rules of the API (they come from the file, and a reload
        // applies them), so a reload that changes only them is still a change to apply.
        let bypass_changed = self.running.bypass != next.bypass;
        if dry_run || (changes.is_empty() && !bypass_changed) {
            return Ok(ApplyReport {
                dry_run,
                applied: false,
                generation: self.generation,
                changes,
            });
        }
        // Slots no rule has counted into before start from zero; slots coming back to their
        // rule keep counting from where they were (Prometheus counters never go down).
        for (id, slot) in &compiled.slots {
            let reused_by_another = self
                .slot_history
                .iter()
                .any(|(old_id, old_slot)| old_slot == slot && old_id != id);
            if !self.slot_history.contains_key(id) || reused_by_another {
                self.dataplane
                    .reset_rule_counters(*slot)
                    .map_err(ApiError::internal)?;
            }
        }
        if model.snat.iter().any(|r| r.action.translates()) {
            for iface in &model.interfaces {
                if let Err(e) = crate::sysctl::enable_accept_local(&iface.name) {
                    warn!(interface = %iface.name, "{e:#}");
                }
            }
        }
        self.dataplane
            .apply(&compiled)
            .map_err(|e| ApiError::Internal(format!("{e:#} (the rules in force are unchanged)")))?;

        self.slot_history = slot_history_after(&self.slot_history, &compiled.slots);
        self.rules = rule_infos(&model, &compiled);
        self.names = self.names.after(&name_slots(&self.rules));
        if let Some((_, names)) = &self.events {
            names.send_replace(self.names.by_slot().clone());
        }
        if let Some(gc) = self.gc.as_mut() {
            gc.set_ports(PortCapacity::from_rules(&model.snat));
        }
        for rule in &compiled.stateful {
            info!("{rule}");
        }
        if let Some(vips) = &self.vips {
            vips.send_replace(crate::announce::vip_prefixes(&model));
        }
        self.running = next;
        self.model = model;
        self.compiled = compiled;
        self.generation += 1;
        Ok(ApplyReport {
            dry_run: false,
            applied: true,
            generation: self.generation,
            changes,
        })
    }

    fn status(&self) -> Status {
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            config: self.config_path.clone(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            generation: self.generation,
            dnat_rules: self.model.dnat.len(),
            snat_rules: self.model.snat.len(),
            interfaces: self
                .dataplane
                .attachments()
                .map(|(name, hook)| InterfaceStatus {
                    name: name.to_string(),
                    xdp_mode: hook.mode().to_string(),
                })
                .collect(),
            sessions: self.gc.as_ref().map(|gc| SessionsStatus {
                in_use: gc.status().sessions_in_use,
                capacity: u64::from(self.dataplane.max_sessions()),
            }),
            applies: self.applies.all(),
            last_apply: self.last_apply.clone(),
        }
    }

    fn stats(&self) -> Result<Stats> {
        let snapshot = self.dataplane.snapshot(self.rules.iter().map(|r| r.slot))?;
        let count = |v: &Vec<u64>, i: usize| v.get(i).copied().unwrap_or(0);
        Ok(Stats {
            reasons: nat_common::stats::Reason::ALL
                .iter()
                .map(|r| (r.name().to_string(), count(&snapshot.reasons, *r as usize)))
                .collect(),
            forward: nat_common::stats::ForwardResult::ALL
                .iter()
                .map(|r| (r.name().to_string(), count(&snapshot.forward, *r as usize)))
                .collect(),
            route_cache: nat_common::route_cache::RouteCacheResult::ALL
                .iter()
                .map(|r| {
                    let n = count(&snapshot.route_cache, *r as usize);
                    (r.name().to_string(), n)
                })
                .collect(),
            rules: self
                .rules
                .iter()
                .map(|r| {
                    let c = snapshot.rules.get(&r.slot).copied().unwrap_or_default();
                    RuleStats {
                        name: r.name.clone(),
                        kind: r.kind,
                        original_packets: c.orig_packets,
                        original_bytes: c.orig_bytes,
                        reply_packets: c.reply_packets,
                        reply_bytes: c.reply_bytes,
                    }
                })
                .collect(),
        })
    }

    /// One sweep run; returns the delay until the next.
    fn sweep(&mut self) -> Duration {
        // Interfaces come and go independently of sessions; the sweep's timer is a convenient
        // heartbeat to notice an SNAT out_interface appearing.
        if let Err(e) = self.dataplane.refresh_snat_interfaces() {
            warn!("re-resolving SNAT out_interfaces: {e:#}");
        }
        // MASQUERADE's addresses come and go with the interfaces': index the current ones.
        if let Err(e) = self.dataplane.refresh_port_spaces() {
            warn!("updating the free-port indexes: {e:#}");
        }
        // ... and this host's addresses changing (packets to them are never translated).
        if let Err(e) = self.dataplane.refresh_local_addresses() {
            warn!("updating the local addresses: {e:#}");
        }
        // ... and MTUs changing (a tunnel coming up lowers the path MTU floor).
        if let Err(e) = self.dataplane.refresh_path_mtu_floor() {
            warn!("updating the path MTU floor: {e:#}");
        }
        let (Some(gc), Some(store)) = (self.gc.as_mut(), self.dataplane.sessions()) else {
            return self.gc_interval;
        };
        match gc.run(store, boottime_ns()) {
            Ok(report) => {
                debug!(
                    visited = report.visited,
                    expired = report.expired.total(),
                    pass_completed = report.pass_completed,
                    "expiry sweep run"
                );
                next_delay(&report, self.gc_interval)
            }
            Err(e) => {
                warn!("expiry sweep: {e:#}");
                self.gc_interval
            }
        }
    }

    fn scrape(&self) -> Result<ScrapeView> {
        let stats = self.dataplane.snapshot(self.rules.iter().map(|r| r.slot))?;
        let conntrack = self.gc.as_ref().map(|gc| {
            let status = gc.status();
            ConntrackView {
                sessions: status.sessions_in_use,
                capacity: u64::from(self.dataplane.max_sessions()),
                ports: status.ports.clone(),
                expiries: status.expiries,
                gc_runs: status.runs,
                gc_last_duration: status.last_duration,
                filter_slots_in_use: self
                    .dataplane
                    .session_filter()
                    .map_or(0, |f| u64::from(f.slots_in_use())),
            }
        });
        Ok(ScrapeView {
            stats,
            rules: self.rules.clone(),
            attachments: self
                .dataplane
                .attachments()
                .map(|(n, m)| (n.to_string(), m))
                .collect(),
            generation: self.generation,
            conntrack,
            applies: self.applies.all(),
            events_dropped: self.events.as_ref().map(|(logger, _)| {
                logger.dropped.load(std::sync::atomic::Ordering::Relaxed)
                    + self.dataplane.kernel_event_drops().unwrap_or(0)
            }),
        })
    }

    fn list(&mut self, query: &ListQuery) -> Result<SessionList, ApiError> {
        let store = self
            .dataplane
            .sessions()
            .map(|s| s as &mut dyn SessionStore);
        answer_list(store, &self.names, query, boottime_ns())
    }

    fn delete(&mut self, filter: &SessionFilter) -> Result<Deleted, ApiError> {
        let store = self
            .dataplane
            .sessions()
            .map(|s| s as &mut dyn SessionStore);
        answer_delete(store, &self.names, filter)
    }
}

/// The rules in force with their counter slots, DNAT then SNAT, in priority order.
fn rule_infos(model: &Model, compiled: &Compiled) -> Vec<RuleInfo> {
    model
        .dnat
        .iter()
        .map(|r| (r.id, &r.name, RuleKind::Dnat))
        .chain(model.snat.iter().map(|r| (r.id, &r.name, RuleKind::Snat)))
        .filter_map(|(id, name, kind)| {
            compiled.slots.get(&id).map(|&slot| RuleInfo {
                name: name.clone(),
                slot,
                kind,
            })
        })
        .collect()
}

fn name_slots(rules: &[RuleInfo]) -> Vec<(String, u32)> {
    rules.iter().map(|r| (r.name.clone(), r.slot)).collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The answer to a listing from `store` (`None`: no connection tracking).
pub(crate) fn answer_list(
    store: Option<&mut dyn SessionStore>,
    names: &RuleNames,
    query: &ListQuery,
    now_ns: u64,
) -> Result<SessionList, ApiError> {
    check_rule(&query.filter, names).map_err(ApiError::BadRequest)?;
    let store = store.ok_or_else(no_conntrack)?;
    sessions::list(store, query, names, now_ns).map_err(ApiError::internal)
}

/// The answer to a deletion (or, with an empty filter, a flush) from `store`.
pub(crate) fn answer_delete(
    store: Option<&mut dyn SessionStore>,
    names: &RuleNames,
    filter: &SessionFilter,
) -> Result<Deleted, ApiError> {
    check_rule(filter, names).map_err(ApiError::BadRequest)?;
    let store = store.ok_or_else(no_conntrack)?;
    sessions::delete(store, filter, names).map_err(ApiError::internal)
}

fn no_conntrack() -> ApiError {
    ApiError::Unavailable("the loaded XDP program has no connection tracking".into())
}

/// Runs map-walking work that can take a while without stalling the runtime's other tasks
/// (metrics, API) on this worker; on a single-threaded runtime it just runs.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
