//! The task that owns the dataplane: it alone touches the maps. The metrics handler and the
//! local API send it [`Request`]s; between requests it runs the expiry sweep on its own timer,
//! so a sweep never races a deletion from the API.

use std::time::Duration;

use anyhow::Result;
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tracing::{debug, warn};

use crate::{
    api::ApiError,
    compile::Compiled,
    dataplane::{Dataplane, SessionStore},
    gc::{boottime_ns, next_delay, Gc, GcConfig, PortCapacity, MAX_VISITS_PER_RUN},
    metrics::{ConntrackView, RuleInfo, RuleKind, ScrapeView},
    model::Model,
    sessions::{self, check_rule, Deleted, ListQuery, RuleNames, SessionFilter, SessionList},
};

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
}

/// The dataplane and everything needed to serve requests about it.
pub(crate) struct Owner {
    dataplane: Dataplane,
    rules: Vec<RuleInfo>,
    names: RuleNames,
    gc: Option<Gc>,
    gc_interval: Duration,
    generation: u64,
}

impl Owner {
    /// Takes over `dataplane`, which holds `compiled` (generated from `model`).
    pub(crate) fn new(dataplane: Dataplane, model: &Model, compiled: &Compiled) -> Self {
        let rules: Vec<RuleInfo> = model
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
            .collect();
        let names = RuleNames::new(rules.iter().map(|r| (r.name.clone(), r.slot)));
        let gc = dataplane.has_conntrack().then(|| {
            Gc::new(GcConfig {
                timeouts: model.conntrack.timeouts,
                max_sessions: dataplane.max_sessions(),
                max_visits: MAX_VISITS_PER_RUN,
                ports: PortCapacity::from_rules(&model.snat),
            })
        });
        Owner {
            dataplane,
            rules,
            names,
            gc,
            gc_interval: model.conntrack.gc_interval,
            generation: 1,
        }
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
        }
    }

    /// One sweep run; returns the delay until the next.
    fn sweep(&mut self) -> Duration {
        // Interfaces come and go independently of sessions; the sweep's timer is a convenient
        // heartbeat to notice an SNAT out_interface appearing.
        if let Err(e) = self.dataplane.refresh_snat_interfaces() {
            warn!("re-resolving SNAT out_interfaces: {e:#}");
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
