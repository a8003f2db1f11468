//! The local API: sessions list, delete and flush over a unix socket (`conntrack -L/-D/-F`).
//!
//! Requests become messages to the task that owns the maps (`owner`); the handlers
//! only parse, forward and encode. Access control is the socket file's mode (0660) and its
//! directory: whoever can connect may delete sessions.
//!
//! Routes:
//! - `GET /v1/sessions?protocol=&address=&port=&rule=&limit=` -> [`SessionList`]
//! - `DELETE /v1/sessions?protocol=&address=&port=&rule=` (at least one) -> [`Deleted`]
//! - `POST /v1/sessions/flush` -> [`Deleted`]
//!
//! Errors are `{"error": "..."}` with 400 (bad request), 503 (no connection tracking, or
//! shutting down) or 500.

use std::{
    io::ErrorKind,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use axum::{
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::Serialize;
use tokio::{
    net::UnixListener,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    owner::Request,
    sessions::{Deleted, SessionFilter, SessionList},
};

/// The socket file's mode: owner and group may connect.
pub const SOCKET_MODE: u32 = 0o660;

/// An API error and the status it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// The request is wrong (400).
    BadRequest(String),
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
}

/// The JSON body of an error.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
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

impl ApiServer {
    /// Binds `path` (creating its directory) and serves until stopped.
    pub(crate) async fn start(path: &Path, owner: mpsc::Sender<Request>) -> Result<Self> {
        let listener = bind(path)?;
        let app = Router::new()
            .route("/v1/sessions", get(list).delete(delete))
            .route("/v1/sessions/flush", post(flush))
            .with_state(owner);
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
fn bind(path: &Path) -> Result<UnixListener> {
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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}

/// Sends a request to the owner and waits for its answer.
async fn ask<T>(
    owner: &mpsc::Sender<Request>,
    make: impl FnOnce(oneshot::Sender<Result<T, ApiError>>) -> Request,
) -> Result<T, ApiError> {
    let shutting_down = || ApiError::Unavailable("the agent is shutting down".into());
    let (tx, rx) = oneshot::channel();
    owner.send(make(tx)).await.map_err(|_| shutting_down())?;
    rx.await.map_err(|_| shutting_down())?
}

async fn list(
    State(owner): State<mpsc::Sender<Request>>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<SessionList>, ApiError> {
    let query = SessionFilter::from_pairs(&pairs, true).map_err(ApiError::BadRequest)?;
    ask(&owner, |reply| Request::ListSessions { query, reply })
        .await
        .map(Json)
}

async fn delete(
    State(owner): State<mpsc::Sender<Request>>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<Deleted>, ApiError> {
    let filter = SessionFilter::from_pairs(&pairs, false)
        .map_err(ApiError::BadRequest)?
        .filter;
    if filter.is_empty() {
        return Err(ApiError::BadRequest(
            "give at least one of protocol, address, port, rule; POST /v1/sessions/flush \
             deletes every session"
                .into(),
        ));
    }
    ask(&owner, |reply| Request::DeleteSessions { filter, reply })
        .await
        .map(Json)
}

async fn flush(State(owner): State<mpsc::Sender<Request>>) -> Result<Json<Deleted>, ApiError> {
    ask(&owner, |reply| Request::DeleteSessions {
        filter: SessionFilter::default(),
        reply,
    })
    .await
    .map(Json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        client::{self, ClientError, SessionsCommand},
        dataplane::MemStore,
        owner::{answer_delete, answer_list},
        sessions::RuleNames,
    };
    use hyper::Method;
    use nat_common::conntrack::{FlowKey, Session, NO_RULE, SESSION_SNAT};

    fn session(port: u16) -> (FlowKey, Session) {
        let key = FlowKey {
            src: [198, 18, 0, 2],
            dst: [203, 0, 113, 5],
            sport: port.to_be_bytes(),
            dport: 123u16.to_be_bytes(),
            proto: 17,
            _pad: [0; 3],
        };
        let s = Session {
            translated: FlowKey {
                src: [198, 51, 100, 1],
                ..key
            },
            dnat_rule: NO_RULE,
            snat_rule: 0,
            flags: SESSION_SNAT,
            ..Default::default()
        };
        (key, s)
    }

    /// Answers like the real owner, from an in-memory store (`None`: no conntrack).
    fn fake_owner(mut store: Option<MemStore>) -> mpsc::Sender<Request> {
        let (tx, mut rx) = mpsc::channel(4);
        let names = RuleNames::new([("private-out".to_string(), 0)]);
        tokio::spawn(async move {
            while let Some(request) = rx.recv().await {
                let store = store
                    .as_mut()
                    .map(|s| s as &mut dyn crate::dataplane::SessionStore);
                match request {
                    Request::ListSessions { query, reply } => {
                        let _ = reply.send(answer_list(store, &names, &query, 0));
                    }
                    Request::DeleteSessions { filter, reply } => {
                        let _ = reply.send(answer_delete(store, &names, &filter));
                    }
                    Request::Scrape(_) => {}
                }
            }
        });
        tx
    }

    fn socket_path(label: &str) -> PathBuf {
        std::env::temp_dir()
            .join(format!("nat-agent-api-{}-{label}", std::process::id()))
            .join("agent.sock")
    }

    fn refused(e: ClientError) -> (u16, String) {
        match e {
            ClientError::Refused { status, message } => (status, message),
            other => panic!("expected a refusal, got {other}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn list_delete_and_flush_over_the_socket() {
        let path = socket_path("round-trip");
        let mut store = MemStore::default();
        for port in [40000, 40001, 40002] {
            let (k, s) = session(port);
            store.insert_session(k, s);
        }
        let server = ApiServer::start(&path, fake_owner(Some(store)))
            .await
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, SOCKET_MODE);

        let list = |filter: SessionFilter, json| {
            let path = path.clone();
            async move {
                client::run(
                    &path,
                    &SessionsCommand::List {
                        filter,
                        limit: None,
                    },
                    json,
                )
                .await
            }
        };
        let table = list(SessionFilter::default(), false).await.unwrap();
        assert!(table.ends_with("\n3 sessions\n"), "{table}");
        assert!(table.contains("private-out"), "{table}");
        let json = list(
            SessionFilter {
                port: Some(40001),
                ..Default::default()
            },
            true,
        )
        .await
        .unwrap();
        let parsed: SessionList = serde_json::from_str(&json).unwrap();
        assert_eq!((parsed.matched, parsed.sessions.len()), (1, 1));
        assert_eq!(parsed.sessions[0].snat_rule.as_deref(), Some("private-out"));

        // Bad requests come back as 400 with the reason.
        let (status, message) = refused(
            client::request(&path, Method::GET, "/v1/sessions?prot=tcp")
                .await
                .unwrap_err(),
        );
        assert_eq!(status, 400);
        assert!(message.contains("unknown parameter \"prot\""), "{message}");
        let (status, message) = refused(
            client::request(&path, Method::DELETE, "/v1/sessions")
                .await
                .unwrap_err(),
        );
        assert_eq!(status, 400);
        assert!(message.contains("flush"), "{message}");
        let (status, message) = refused(
            client::request(&path, Method::GET, "/v1/sessions?rule=nope")
                .await
                .unwrap_err(),
        );
        assert_eq!((status, message.as_str()), (400, "no rule named \"nope\""));

        let deleted = client::run(
            &path,
            &SessionsCommand::Delete {
                filter: SessionFilter {
                    port: Some(40000),
                    ..Default::default()
                },
            },
            false,
        )
        .await
        .unwrap();
        assert_eq!(deleted, "deleted 1 session\n");
        let flushed = client::run(&path, &SessionsCommand::Flush, true)
            .await
            .unwrap();
        assert_eq!(
            serde_json::from_str::<Deleted>(&flushed).unwrap(),
            Deleted { deleted: 2 }
        );
        assert!(list(SessionFilter::default(), false)
            .await
            .unwrap()
            .ends_with("0 sessions\n"));

        // A second agent on the same socket is refused; the first keeps serving.
        let err = ApiServer::start(&path, fake_owner(None))
            .await
            .err()
            .expect("second bind must fail");
        assert!(format!("{err:#}").contains("another agent"), "{err:#}");
        assert!(list(SessionFilter::default(), false).await.is_ok());

        server.stop();
        assert!(!path.exists(), "socket removed on stop");
        let _ = std::fs::remove_dir(path.parent().unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_socket_is_replaced_and_no_conntrack_is_503() {
        let path = socket_path("stale");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        // An agent that died left its socket file behind.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let server = ApiServer::start(&path, fake_owner(None)).await.unwrap();
        let (status, message) = refused(
            client::request(&path, Method::POST, "/v1/sessions/flush")
                .await
                .unwrap_err(),
        );
        assert_eq!(status, 503);
        assert!(message.contains("no connection tracking"), "{message}");
        server.stop();
        let _ = std::fs::remove_dir(path.parent().unwrap());

        // A path that is not a socket is never removed.
        let file = socket_path("not-a-socket");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, "x").unwrap();
        let err = ApiServer::start(&file, fake_owner(None))
            .await
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("is not a socket"), "{err:#}");
        assert!(file.exists());
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::remove_dir(file.parent().unwrap());
    }
}
