//! The API's OpenAPI document, generated from the handlers' and types' definitions (utoipa),
//! served at `GET /v1/openapi.json`.

use axum::Json;
use utoipa::OpenApi;

use super::ErrorBody;
use crate::{
    config::{AddressList, DnatEntry, PortSpec, SnatEntry},
    ruleset::{RuleDiff, RuleDocument, RuleKind, RuleRef},
    sessions::{Deleted, SessionList, SessionView, Tuple},
    status::{
        ApplyCount, ApplyReport, ApplySource, InterfaceStatus, LastApply, RuleStats,
        SessionsStatus, Stats, Status,
    },
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "xdp-nat agent local API",
        description = "HTTP+JSON on the agent's unix socket. Access control is the socket's \
                       permissions (root and [agent] api_group)."
    ),
    paths(
        super::rules::get_rules,
        super::rules::replace_rules,
        super::rules::add_rule,
        super::rules::update_rule,
        super::rules::delete_rule,
        super::sessions::list,
        super::sessions::delete,
        super::sessions::flush,
        super::status,
        super::stats,
        serve,
    ),
    components(schemas(
        RuleDocument, RuleDiff, RuleRef, RuleKind, DnatEntry, SnatEntry, AddressList, PortSpec,
        ApplyReport, ApplySource, Status, InterfaceStatus, SessionsStatus, ApplyCount,
        LastApply, Stats, RuleStats, SessionList, SessionView, Tuple, Deleted, ErrorBody,
    )),
    tags(
        (name = "rules", description = "The NAT rules in force; every change is one transaction"),
        (name = "sessions", description = "Connection-tracking sessions"),
        (name = "agent", description = "Status, counters and this document"),
    )
)]
struct ApiDoc;

/// The OpenAPI document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "agent",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API")))]
pub(crate) async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(document())
}
