//! `nat-agent run`: load, attach, fill the maps, serve metrics, detach on SIGTERM/SIGINT.
//!
//! One task owns the [`Dataplane`]; everything else (the metrics handler today, the API later)
//! talks to it through messages, so map access is never shared or locked.

use std::{net::SocketAddr, path::Path, sync::Arc};

use anyhow::{Context, Result};
use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use tokio::sync::{mpsc, oneshot, Mutex};
use tracing::{error, info};

use crate::{
    compile::CompiledDnat,
    dataplane::Dataplane,
    metrics::{Metrics, ScrapeView},
    model::Model,
};

/// Requests to the task that owns the dataplane.
enum Request {
    /// Read counters and the state needed to label them.
    Scrape(oneshot::Sender<Result<ScrapeView>>),
}

/// Runs the agent until SIGTERM or SIGINT. The caller has validated and compiled the config.
pub async fn run(config_path: &Path, model: Model, compiled: CompiledDnat) -> Result<()> {
    let mut dataplane = Dataplane::load()?;
    dataplane.start_log_forwarding();
    // Rules first, then attach: the first packet the program sees already has its rules.
    for slot in compiled.slots.values() {
        dataplane.reset_rule_counters(*slot)?;
    }
    dataplane
        .apply(&compiled)
        .context("writing the DNAT rules into the maps")?;
    dataplane
        .attach_all(&model.interfaces)
        .context("attaching the XDP program")?;
    info!(
        config = %config_path.display(),
        dnat_rules = model.dnat.len(),
        interfaces = model.interfaces.len(),
        "agent running"
    );

    let (tx, rx) = mpsc::channel(16);
    let owner = tokio::spawn(own_dataplane(dataplane, model.clone(), compiled, rx));

    let server = match model.metrics_listen {
        Some(addr) => Some(start_metrics(addr, tx.clone()).await?),
        None => None,
    };

    wait_for_shutdown().await?;
    info!("shutting down");
    if let Some(server) = server {
        server.abort();
    }
    drop(tx);
    // The owner task drops the Dataplane, which detaches from every interface.
    owner.await.context("dataplane task")?;
    info!("stopped");
    Ok(())
}

async fn own_dataplane(
    dataplane: Dataplane,
    model: Model,
    compiled: CompiledDnat,
    mut rx: mpsc::Receiver<Request>,
) {
    let rules: Vec<(String, u32)> = model
        .dnat
        .iter()
        .map(|r| (r.name.clone(), compiled.slots[&r.id]))
        .collect();
    while let Some(request) = rx.recv().await {
        match request {
            Request::Scrape(reply) => {
                let view = dataplane
                    .snapshot(rules.iter().map(|(_, s)| *s))
                    .map(|stats| ScrapeView {
                        stats,
                        rules: rules.clone(),
                        attachments: dataplane
                            .attachments()
                            .map(|(n, m)| (n.to_string(), m))
                            .collect(),
                        generation: 1,
                    });
                let _ = reply.send(view);
            }
        }
    }
    drop(dataplane);
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

async fn wait_for_shutdown() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    Ok(())
}
