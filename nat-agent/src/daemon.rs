//! `nat-agent run`: load, attach, fill the maps, serve metrics and the local API, sweep
//! expired sessions, re-read the rules on SIGHUP, detach on SIGTERM/SIGINT.
//!
//! One task owns the [`Dataplane`] (`owner`); everything else (the metrics handler,
//! the local API) talks to it through messages, so map access is never shared or locked.

use std::{net::SocketAddr, path::Path, sync::Arc};

use anyhow::{Context, Result};
use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use tokio::sync::{mpsc, oneshot, Mutex};
use tracing::{error, info, warn};

use crate::{
    api::ApiServer,
    compile::compile,
    config::ConfigFile,
    dataplane::{Dataplane, LoadOptions},
    metrics::Metrics,
    model::Model,
    owner::{Change, ChangeRequest, Owner, Request},
    route_watch::RouteWatch,
    status::ApplySource,
    Loaded,
};

/// Runs the agent until SIGTERM or SIGINT. The caller has validated and compiled the config.
pub async fn run(config_path: &Path, mut loaded: Loaded) -> Result<()> {
    // Signal handlers first: a SIGTERM that arrives while the program is being loaded or
    // attached must end in a clean shutdown, not kill the process half-way (the default
    // action), which could leave an owned attachment behind.
    let signals = Signals::install()?;
    let mut dataplane = Dataplane::load_with(&LoadOptions {
        max_sessions: loaded.model.conntrack.max_sessions,
        state_dir: loaded.model.state_dir.clone(),
        ..Default::default()
    })?;
    dataplane.start_log_forwarding();
    // With pinned state, rules keep the counter slots of the last run, so their counters
    // continue; only slots new to a rule start from zero.
    let history = dataplane.slot_history()?;
    if !history.is_empty() {
        loaded.compiled = compile(&loaded.model, &history).map_err(|problems| {
            anyhow::anyhow!(
                "{}",
                crate::model::ValidationError {
                    file: config_path.display().to_string(),
                    problems,
                }
            )
        })?;
    }
    let (model, compiled) = (loaded.model.clone(), &loaded.compiled);
    // Rules first, then attach: the first packet the program sees already has its rules.
    for (id, slot) in &compiled.slots {
        if history.get(id) != Some(slot) {
            dataplane.reset_rule_counters(*slot)?;
        }
    }
    dataplane
        .apply(compiled)
        .context("writing the rules into the maps")?;
    for rule in &compiled.stateful {
        info!("{rule}");
    }
    if model.snat.iter().any(|r| r.action.translates()) {
        for iface in &model.interfaces {
            crate::sysctl::enable_accept_local(&iface.name)?;
        }
    }
    dataplane
        .attach_all(&model.interfaces)
        .context("attaching to the interfaces")?;
    // Without the route cache the program asks the FIB for every packet, which is correct,
    // only dearer: a failure to listen is reported, not fatal.
    let route_watch = match RouteWatch::for_config(&model, &dataplane) {
        Ok(Some(watch)) => {
            info!(
                "route cache on: FIB answers are reused until the kernel reports a routing change"
            );
            Some(watch)
        }
        Ok(None) => None,
        Err(e) => {
            warn!("route cache off (every forwarded packet asks the FIB): {e:#}");
            None
        }
    };
    info!(
        config = %config_path.display(),
        dnat_rules = model.dnat.len(),
        snat_rules = model.snat.len(),
        interfaces = model.interfaces.len(),
        max_sessions = model.conntrack.max_sessions,
        "agent running"
    );

    // VIP announcements follow the rules in force (the owner sends every change).
    let (vips, vips_rx) = tokio::sync::watch::channel(crate::announce::vip_prefixes(&model));
    let announcer = if model.announce_vips {
        let routes = crate::announce::VipRoutes::connect()?;
        // Withdraw at the end only if the program goes away with the agent.
        let withdraw = !dataplane.is_persistent();
        Some(tokio::spawn(crate::announce::follow(
            routes, vips_rx, withdraw,
        )))
    } else {
        None
    };

    let mut owner =
        Owner::new(dataplane, &config_path.display().to_string(), loaded).announcing(vips);
    if let Some(log) = &model.event_log {
        owner.start_event_log(log)?;
    }
    let (tx, rx) = mpsc::channel(16);
    let owner = tokio::spawn(owner.run(rx));

    // From here on, a failure must still let the owner task detach: drop the sender and wait.
    let served = serve(&model, tx.clone()).await;
    let result = match served {
        Ok((metrics, api)) => {
            let health = match model.health_listen {
                Some(addr) => match crate::health::start(addr, tx.clone()).await {
                    Ok(server) => Some(server),
                    Err(e) => {
                        if let Some(server) = metrics {
                            server.abort();
                        }
                        api.stop();
                        drop(tx);
                        owner.await.context("dataplane task")?;
                        if let Some(announcer) = announcer {
                            let _ = announcer.await;
                        }
                        return Err(e);
                    }
                },
                None => None,
            };
            crate::notify::ready();
            let watchdog = crate::notify::start_watchdog(tx.clone());
            let waited = signals.wait_for_shutdown(config_path, &tx).await;
            info!("shutting down");
            // Before anything else: a pinned program goes on forwarding after the agent, and
            // without anyone listening to routing changes it must ask the FIB every time.
            if let Some(watch) = &route_watch {
                if let Err(e) = watch.stop() {
                    warn!("turning the route cache off: {e:#}");
                }
            }
            crate::notify::stopping();
            if let Some(watchdog) = watchdog {
                watchdog.abort();
            }
            if let Some(server) = health {
                server.abort();
            }
            if let Some(server) = metrics {
                server.abort();
            }
            api.stop();
            waited
        }
        Err(e) => Err(e),
    };
    drop(tx);
    // The owner task drops the Dataplane, which detaches from every interface it owns; pinned
    // links stay and keep translating.
    owner.await.context("dataplane task")?;
    // The owner dropped its end of the VIP channel: the announcer withdraws (or not) and ends.
    if let Some(announcer) = announcer {
        let _ = announcer.await;
    }
    if let Some(dir) = &model.state_dir {
        info!(state_dir = %dir.display(), "translation continues with the pinned program; `nat-agent state detach` detaches it");
    }
    info!("stopped");
    result
}

/// Starts the metrics listener (if configured) and the local API.
async fn serve(
    model: &Model,
    tx: mpsc::Sender<Request>,
) -> Result<(Option<tokio::task::JoinHandle<()>>, ApiServer)> {
    let metrics = match model.metrics_listen {
        Some(addr) => Some(start_metrics(addr, tx.clone()).await?),
        None => None,
    };
    let group = model.api_group.as_ref().map(|(_, gid)| *gid);
    match ApiServer::start(&model.api_socket, group, tx).await {
        Ok(api) => Ok((metrics, api)),
        Err(e) => {
            if let Some(server) = metrics {
                server.abort();
            }
            Err(e).context("starting the local API")
        }
    }
}

#[derive(Clone)]
struct MetricsState {
    dataplane: mpsc::Sender<Request>,
    // Rendering resets and refills shared families: one scrape at a time.
    metrics: Arc<Mutex<Metrics>>,
}

async fn start_metrics(
    addr: SocketAddr,
    dataplane: mpsc::Sender<Request>,
) -> Result<tokio::task::JoinHandle<()>> {
    let state = MetricsState {
        dataplane,
        metrics: Arc::new(Mutex::new(Metrics::new()?)),
    };
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener {addr}"))?;
    info!(%addr, "serving metrics on /metrics");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!(error = %e, "metrics server stopped");
        }
    }))
}

async fn scrape(State(state): State<MetricsState>) -> impl IntoResponse {
    let (tx, rx) = oneshot::channel();
    if state.dataplane.send(Request::Scrape(tx)).await.is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n".to_string(),
        );
    }
    let view = match rx.await {
        Ok(Ok(view)) => view,
        Ok(Err(e)) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")),
        Err(_) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting down\n".to_string(),
            )
        }
    };
    let metrics = state.metrics.lock().await;
    match metrics.render(&view) {
        Ok(text) => (StatusCode::OK, text),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")),
    }
}

/// The signals the agent handles, installed before anything else is done.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    /// Waits for SIGTERM or SIGINT (also one that arrived during start-up); meanwhile every
    /// SIGHUP re-reads the rules from the file.
    async fn wait_for_shutdown(
        mut self,
        config_path: &Path,
        owner: &mpsc::Sender<Request>,
    ) -> Result<()> {
        loop {
            tokio::select! {
                _ = self.term.recv() => { info!("SIGTERM received"); return Ok(()); }
                _ = self.int.recv() => { info!("SIGINT received"); return Ok(()); }
                _ = self.hup.recv() => {
                    info!(config = %config_path.display(), "SIGHUP received: re-reading the rules");
                    reload(config_path, owner).await;
                }
            }
        }
    }
}

/// Applies the rules of the config file as it is now, with the guarantees of any change: all
/// or nothing, and a refusal (unreadable file, invalid rules, changed non-rule sections)
/// keeps the rules in force. The outcome is logged and counted by the owner.
async fn reload(config_path: &Path, owner: &mpsc::Sender<Request>) {
    let change = match ConfigFile::read(config_path) {
        Ok(file) => Change::File(Box::new(file)),
        Err(e) => Change::Unreadable(e.to_string()),
    };
    let request = ChangeRequest {
        change,
        expected_generation: None,
        dry_run: false,
        source: ApplySource::Sighup,
    };
    let (reply, answer) = oneshot::channel();
    if owner
        .send(Request::ChangeRules { request, reply })
        .await
        .is_err()
    {
        return;
    }
    match answer.await {
        Ok(Ok(report)) if report.applied => {
            info!(generation = report.generation, "SIGHUP: rules reloaded")
        }
        Ok(Ok(_)) => info!("SIGHUP: the file's rules are those in force; nothing to do"),
        Ok(Err(e)) => error!(
            "SIGHUP: reload refused, the rules in force are unchanged: {}",
            e.message()
        ),
        Err(_) => {}
    }
}
