//! Health probes for load balancers (Azure ILB HA ports, AWS target groups): a small TCP
//! listener separate from the API, answering `GET /healthz` (the process serves) and
//! `GET /readyz` (the task that owns the maps answers and the program is attached).

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use axum::{extract::State, http::StatusCode, routing::get, Router};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info};

use crate::owner::Request;

/// How long a readiness probe waits for the dataplane task.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

/// Binds `addr` and serves the probes until the task is aborted.
pub(crate) async fn start(
    addr: SocketAddr,
    owner: mpsc::Sender<Request>,
) -> Result<tokio::task::JoinHandle<()>> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(owner);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the health listener {addr}"))?;
    info!(%addr, "serving health probes on /healthz and /readyz");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!(error = %e, "health listener stopped");
        }
    }))
}

async fn ready(State(owner): State<mpsc::Sender<Request>>) -> (StatusCode, String) {
    let (tx, rx) = oneshot::channel();
    if owner.send(Request::Scrape(tx)).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopping\n".into());
    }
    match tokio::time::timeout(READY_TIMEOUT, rx).await {
        Ok(Ok(Ok(view))) if !view.attachments.is_empty() => (StatusCode::OK, "ready\n".into()),
        Ok(Ok(Ok(_))) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not attached to any interface\n".into(),
        ),
        Ok(Ok(Err(e))) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}\n")),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the dataplane task did not answer\n".into(),
        ),
    }
}
