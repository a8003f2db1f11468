//! The local API: HTTP+JSON over a unix socket.
//!
//! Requests become messages to the task that owns the maps (`owner`); the handlers only
//! parse, forward and encode. Access control is the socket file: mode 0660, owned by the
//! agent's user (root) and by `[agent] api_group` when configured, so exactly root and that
//! operator group may connect. There is no TCP listener for this API.
//!
//! Routes (the OpenAPI document at `GET /v1/openapi.json` describes each in full):
//! - `GET /v1/rules` -> [`RuleDocument`]; `PUT /v1/rules` replaces every rule;
//!   `POST /v1/rules/{kind}` adds one; `PUT` / `DELETE /v1/rules/{kind}/{name}` change or
//!   delete one. Every change takes `dry_run=true` (report only) and `generation=N` (refuse
//!   unless the rules in force are at generation N) and answers an [`ApplyReport`].
//! - `GET /v1/sessions?protocol=&address=&port=&rule=&limit=&offset=` -> `SessionList`;
//!   `DELETE /v1/sessions?...` (at least one filter); `POST /v1/sessions/flush`.
//! - `GET /v1/status`, `GET /v1/stats`.
//!
//! Errors are `{"error": "..."}` with 400 (bad request), 404 (no such rule), 409 (stale
//! generation, or a rule that exists already), 503 (no connection tracking, or shutting down)
//! or 500.

mod openapi;
mod rules;
mod sessions;

use std::{
    io::ErrorKind,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post, put},
    Json, Router,
};
use serde::Serialize;
use tokio::{
    net::UnixListener,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tracing::{error, info, warn};
use utoipa::ToSchema;

use crate::{
    owner::Request,
    ruleset::EditError,
    status::{Stats, Status},
};

pub use openapi::document as openapi_document;

/// The socket file's mode: owner and group may connect.
pub const SOCKET_MODE: u32 = 0o660;

/// An API error and the status it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// The request is wrong (400).
    BadRequest(String),
    /// The rule named does not exist (404).
    NotFound(String),
    /// The request conflicts with the state: a stale generation, a rule that exists (409).
    Conflict(String),
    /// The agent cannot serve it now (503).
    Unavailable(String),
    /// Reading or writing the maps failed (500).
    Internal(String),
}

impl ApiError {
    /// A map access failure, with its context chain.
    pub fn internal(e: anyhow::Error) -> Self {
        ApiError::Internal(format!("{e:#}"))
    }

    /// The message, whatever the status.
    pub fn message(&self) -> &str {
        match self {
            ApiError::BadRequest(m)
            | ApiError::NotFound(m)
            | ApiError::Conflict(m)
            | ApiError::Unavailable(m)
            | ApiError::Internal(m) => m,
        }
    }
}

impl From<EditError> for ApiError {
    fn from(e: EditError) -> Self {
        match e {
            EditError::NotFound(..) => ApiError::NotFound(e.to_string()),
            EditError::Exists(..) => ApiError::Conflict(e.to_string()),
            EditError::Invalid(_) => ApiError::BadRequest(e.to_string()),
        }
    }
}

/// The JSON body of an error.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
            ApiError::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, m),
        };
        (status, Json(ErrorBody { error })).into_response()
    }
}

/// The running API server; [`ApiServer::stop`] removes its socket.
pub(crate) struct ApiServer {
    task: JoinHandle<()>,
    path: PathBuf,
}

/// Every route. The OpenAPI document lists the same paths (a test checks both ways).
pub(crate) fn router(owner: mpsc::Sender<Request>) -> Router {
    Router::new()
        .route("/v1/rules", get(rules::get_rules).put(rules::replace_rules))
        .route("/v1/rules/{kind}", post(rules::add_rule))
        .route(
            "/v1/rules/{kind}/{name}",
            put(rules::update_rule).delete(rules::delete_rule),
        )
        .route("/v1/sessions", get(sessions::list).delete(sessions::delete))
        .route("/v1/sessions/flush", post(sessions::flush))
        .route("/v1/status", get(status))
        .route("/v1/stats", get(stats))
        .route("/v1/openapi.json", get(openapi::serve))
        .with_state(owner)
}

impl ApiServer {
    /// Binds `path` (creating its directory), hands it to `group` (a gid) when given, and
    /// serves until stopped.
    pub(crate) async fn start(
        path: &Path,
        group: Option<u32>,
        owner: mpsc::Sender<Request>,
    ) -> Result<Self> {
        let listener = bind(path, group)?;
        let app = router(owner);
        info!(socket = %path.display(), "serving the local API");
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                error!(error = %e, "local API server stopped");
            }
        });
        Ok(ApiServer {
            task,
            path: path.to_path_buf(),
        })
    }

    /// Stops serving and removes the socket file.
    pub(crate) fn stop(self) {
        self.task.abort();
        if let Err(e) = std::fs::remove_file(&self.path) {
            warn!(socket = %self.path.display(), error = %e, "removing the API socket");
        }
    }
}

/// Creates the socket's directory, clears a stale socket left by an agent that died, refuses
/// to take over one that a live agent still serves, binds, and sets the mode.
fn bind(path: &Path, group: Option<u32>) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the API socket directory {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => bail!(
                    "another agent is serving the API socket {}; give this one its own \
                     [agent] api_socket",
                    path.display()
                ),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).with_context(|| {
                        format!("removing the stale API socket {}", path.display())
                    })?;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("checking the existing API socket {}", path.display())
                    })
                }
            }
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; [agent] api_socket must name a path the agent \
             owns",
            path.display()
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the API socket {}", path.display()))?;
    // Group first, then mode: the socket is never open to a group it was not meant for.
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("giving {} to group {gid}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}

/// Sends a request to the owner and waits for its answer.
pub(crate) async fn ask<T>(
    owner: &mpsc::Sender<Request>,
    make: impl FnOnce(oneshot::Sender<Result<T, ApiError>>) -> Request,
) -> Result<T, ApiError> {
    let shutting_down = || ApiError::Unavailable("the agent is shutting down".into());
    let (tx, rx) = oneshot::channel();
    owner.send(make(tx)).await.map_err(|_| shutting_down())?;
    rx.await.map_err(|_| shutting_down())?
}

/// [`ask`] for requests whose answer cannot fail.
pub(crate) async fn ask_infallible<T>(
    owner: &mpsc::Sender<Request>,
    make: impl FnOnce(oneshot::Sender<T>) -> Request,
) -> Result<T, ApiError> {
    let shutting_down = || ApiError::Unavailable("the agent is shutting down".into());
    let (tx, rx) = oneshot::channel();
    owner.send(make(tx)).await.map_err(|_| shutting_down())?;
    rx.await.map_err(|_| shutting_down())
}

/// The agent's status.
#[utoipa::path(get, path = "/v1/status", tag = "agent",
    responses((status = 200, description = "The agent's status", body = Status),
              (status = 503, description = "Shutting down", body = ErrorBody)))]
pub(crate) async fn status(
    State(owner): State<mpsc::Sender<Request>>,
) -> Result<Json<Status>, ApiError> {
    ask(&owner, Request::Status).await.map(Json)
}

/// The dataplane's counters: packets by exit reason, forwarding results, per-rule counters.
#[utoipa::path(get, path = "/v1/stats", tag = "agent",
    responses((status = 200, description = "Counters summed over CPUs", body = Stats),
              (status = 500, description = "Reading the maps failed", body = ErrorBody)))]
pub(crate) async fn stats(
    State(owner): State<mpsc::Sender<Request>>,
) -> Result<Json<Stats>, ApiError> {
    ask(&owner, Request::Stats).await.map(Json)
}

#[cfg(test)]
mod tests;
