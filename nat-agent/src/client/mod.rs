//! The CLI side of the local API (`nat-agent sessions|rules|status ...`): one HTTP/1.1
//! request over the agent's unix socket, and the answer rendered for a person (a table) or as
//! JSON.

pub mod rules;

pub use rules::{run_rules, run_status, RulesCommand};

use std::{path::Path, time::Duration};

use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::{
    api::ErrorBody,
    sessions::{render_table, Deleted, SessionFilter, SessionList},
};

/// How long a request may take: listing or deleting across a table of millions walks it all.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// What to ask the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionsCommand {
    /// List the matching sessions.
    List {
        /// Which sessions.
        filter: SessionFilter,
        /// At most this many (the agent's default when `None`).
        limit: Option<usize>,
        /// Skip this many matching sessions first.
        offset: Option<usize>,
    },
    /// Delete the matching sessions (the filter must not be empty).
    Delete {
        /// Which sessions.
        filter: SessionFilter,
    },
    /// Delete every session.
    Flush,
}

/// Why a sessions command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error(
        "cannot reach the agent at {socket}: {source} (is `nat-agent run` running? --socket \
         names another path)"
    )]
    Connect {
        /// The socket path.
        socket: String,
        /// Why.
        source: std::io::Error,
    },
    /// The agent answered with an error.
    #[error("the agent refused ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The agent's message.
        message: String,
    },
    /// Anything else (protocol, timeout, a malformed answer).
    #[error("{0}")]
    Other(String),
}

/// Sends one request with an empty body and returns the response body of a 2xx answer.
pub async fn request(
    socket: &Path,
    method: Method,
    path_and_query: &str,
) -> Result<Bytes, ClientError> {
    request_with_body(socket, method, path_and_query, None).await
}

/// Sends one request, with `json` as its body when given, and returns the response body of a
/// 2xx answer.
pub async fn request_with_body(
    socket: &Path,
    method: Method,
    path_and_query: &str,
    json: Option<Vec<u8>>,
) -> Result<Bytes, ClientError> {
    tokio::time::timeout(
        REQUEST_TIMEOUT,
        request_inner(socket, method, path_and_query, json),
    )
    .await
    .map_err(|_| {
        ClientError::Other(format!(
            "no answer from the agent within {}s",
            REQUEST_TIMEOUT.as_secs()
        ))
    })?
}

async fn request_inner(
    socket: &Path,
    method: Method,
    path_and_query: &str,
    json: Option<Vec<u8>>,
) -> Result<Bytes, ClientError> {
    let other = |what: &str, e: &dyn std::fmt::Display| ClientError::Other(format!("{what}: {e}"));
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            socket: socket.display().to_string(),
            source,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| other("HTTP handshake with the agent", &e))?;
    // The connection future drives the socket; it ends when the request is done.
    let driver = tokio::spawn(connection);
    let mut req = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(hyper::header::HOST, "localhost");
    if json.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(json.unwrap_or_default())))
        .map_err(|e| other("building the request", &e))?;
    let response = sender
        .send_request(req)
        .await
        .map_err(|e| other("sending the request", &e))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| other("reading the answer", &e))?
        .to_bytes();
    driver.abort();
    if status.is_success() {
        return Ok(body);
    }
    let message = serde_json::from_slice::<ErrorBody>(&body)
        .map(|b| b.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_string());
    Err(ClientError::Refused {
        status: status.as_u16(),
        message,
    })
}

pub(crate) fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|e| {
        ClientError::Other(format!("the agent's answer is not what was expected: {e}"))
    })
}

pub(crate) fn pretty<T: serde::Serialize>(value: &T) -> Result<String, ClientError> {
    serde_json::to_string_pretty(value)
        .map(|s| s + "\n")
        .map_err(|e| ClientError::Other(format!("encoding JSON: {e}")))
}

/// The request line of a command: method and path with query.
pub fn route(command: &SessionsCommand) -> Result<(Method, String), ClientError> {
    let with_query = |path: &str, q: String| {
        if q.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{q}")
        }
    };
    Ok(match command {
        SessionsCommand::List {
            filter,
            limit,
            offset,
        } => (
            Method::GET,
            with_query("/v1/sessions", filter.to_query(*limit, *offset)),
        ),
        SessionsCommand::Delete { filter } if filter.is_empty() => {
            return Err(ClientError::Other(
                "delete needs at least one of --protocol, --address, --port, --rule \
                 (`sessions flush` deletes every session)"
                    .into(),
            ))
        }
        SessionsCommand::Delete { filter } => (
            Method::DELETE,
            with_query("/v1/sessions", filter.to_query(None, None)),
        ),
        SessionsCommand::Flush => (Method::POST, "/v1/sessions/flush".into()),
    })
}

/// Runs `command` against the agent at `socket` and returns what to print.
pub async fn run(
    socket: &Path,
    command: &SessionsCommand,
    json: bool,
) -> Result<String, ClientError> {
    let (method, path) = route(command)?;
    let body = request(socket, method, &path).await?;
    match command {
        SessionsCommand::List { .. } => {
            let list: SessionList = parse(&body)?;
            if json {
                pretty(&list)
            } else {
                Ok(render_table(&list))
            }
        }
        SessionsCommand::Delete { .. } | SessionsCommand::Flush => {
            let deleted: Deleted = parse(&body)?;
            if json {
                pretty(&deleted)
            } else {
                let noun = if deleted.deleted == 1 {
                    "session"
                } else {
                    "sessions"
                };
                Ok(format!("deleted {} {noun}\n", deleted.deleted))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_carry_the_filters() {
        let filter = SessionFilter {
            port: Some(123),
            ..Default::default()
        };
        assert_eq!(
            route(&SessionsCommand::List {
                filter: filter.clone(),
                limit: Some(10),
                offset: Some(20),
            })
            .unwrap(),
            (
                Method::GET,
                "/v1/sessions?port=123&limit=10&offset=20".into()
            )
        );
        assert_eq!(
            route(&SessionsCommand::List {
                filter: SessionFilter::default(),
                limit: None,
                offset: None,
            })
            .unwrap(),
            (Method::GET, "/v1/sessions".into())
        );
        assert_eq!(
            route(&SessionsCommand::Delete { filter }).unwrap(),
            (Method::DELETE, "/v1/sessions?port=123".into())
        );
        assert_eq!(
            route(&SessionsCommand::Flush).unwrap(),
            (Method::POST, "/v1/sessions/flush".into())
        );
        assert!(route(&SessionsCommand::Delete {
            filter: SessionFilter::default()
        })
        .is_err());
    }

    #[tokio::test]
    async fn an_absent_socket_says_where_it_looked() {
        let path =
            std::env::temp_dir().join(format!("nat-agent-no-such-{}.sock", std::process::id()));
        let err = run(&path, &SessionsCommand::Flush, false)
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("cannot reach the agent at") && msg.contains("no-such"),
            "{msg}"
        );
    }
}
