//! Session routes: `conntrack -L/-D/-F` over the API.

use axum::{
    extract::{Query, State},
    Json,
};
use tokio::sync::mpsc;

use super::{ask, ApiError, ErrorBody};
use crate::{
    owner::Request,
    sessions::{Deleted, SessionFilter, SessionList},
};

/// Lists sessions matching the filters, one page at a time.
#[utoipa::path(get, path = "/v1/sessions", tag = "sessions",
    params(
        ("protocol" = Option<String>, Query, description = "tcp, udp, icmp or a protocol number"),
        ("address" = Option<String>, Query, description = "An IPv4 address of either tuple"),
        ("port" = Option<u16>, Query, description = "A port or ICMP echo id of either tuple"),
        ("rule" = Option<String>, Query, description = "The name of the rule that made the session"),
        ("limit" = Option<usize>, Query, description = "Page size (default 10000, at most 1000000)"),
        ("offset" = Option<usize>, Query, description = "Matching sessions to skip (the previous page's next_offset)"),
    ),
    responses((status = 200, description = "A page of sessions", body = SessionList),
              (status = 400, description = "Bad filter", body = ErrorBody),
              (status = 503, description = "No connection tracking", body = ErrorBody)))]
pub(crate) async fn list(
    State(owner): State<mpsc::Sender<Request>>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<SessionList>, ApiError> {
    let query = SessionFilter::from_pairs(&pairs, true).map_err(ApiError::BadRequest)?;
    ask(&owner, |reply| Request::ListSessions { query, reply })
        .await
        .map(Json)
}

/// Deletes the sessions matching the filters (at least one filter).
#[utoipa::path(delete, path = "/v1/sessions", tag = "sessions",
    params(
        ("protocol" = Option<String>, Query, description = "tcp, udp, icmp or a protocol number"),
        ("address" = Option<String>, Query, description = "An IPv4 address of either tuple"),
        ("port" = Option<u16>, Query, description = "A port or ICMP echo id of either tuple"),
        ("rule" = Option<String>, Query, description = "The name of the rule that made the session"),
    ),
    responses((status = 200, description = "How many were deleted", body = Deleted),
              (status = 400, description = "No or bad filter", body = ErrorBody),
              (status = 503, description = "No connection tracking", body = ErrorBody)))]
pub(crate) async fn delete(
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

/// Deletes every session.
#[utoipa::path(post, path = "/v1/sessions/flush", tag = "sessions",
    responses((status = 200, description = "How many were deleted", body = Deleted),
              (status = 503, description = "No connection tracking", body = ErrorBody)))]
pub(crate) async fn flush(
    State(owner): State<mpsc::Sender<Request>>,
) -> Result<Json<Deleted>, ApiError> {
    ask(&owner, |reply| Request::DeleteSessions {
        filter: SessionFilter::default(),
        reply,
    })
    .await
    .map(Json)
}
