//! Rule routes: read the rules in force, replace them all, or add, change or delete one.
//! Every change is one transaction in the owner task (see `owner::Owner::change`).

use axum::{
    body::Bytes,
    extract::{Path, Query, State},
    Json,
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::{ask, ask_infallible, ApiError, ErrorBody};
use crate::{
    config::{DnatEntry, SnatEntry},
    owner::{Change, ChangeRequest, Request},
    ruleset::{RuleChange, RuleDocument, RuleEntry, RuleKind},
    status::{ApplyReport, ApplySource},
};

/// The query parameters of a change.
#[derive(Debug, Default, PartialEq, Eq)]
struct ChangeParams {
    dry_run: bool,
    generation: Option<u64>,
    position: Option<usize>,
}

impl ChangeParams {
    /// Parses `dry_run`, `generation` and (when `allow_position`) `position`, each at most
    /// once; anything else is refused by name, so a typo never turns a dry run into a change.
    fn parse(pairs: &[(String, String)], allow_position: bool) -> Result<Self, ApiError> {
        let bad = |m: String| ApiError::BadRequest(m);
        let mut p = ChangeParams::default();
        let mut seen: Vec<&str> = Vec::new();
        for (name, value) in pairs {
            if seen.contains(&name.as_str()) {
                return Err(bad(format!("{name} is given twice")));
            }
            seen.push(name);
            match name.as_str() {
                "dry_run" => {
                    p.dry_run = match value.as_str() {
                        "true" | "1" | "" => true,
                        "false" | "0" => false,
                        _ => return Err(bad(format!("dry_run {value:?} is not true or false"))),
                    }
                }
                "generation" => {
                    p.generation = Some(value.parse().map_err(|_| {
                        bad(format!("generation {value:?} is not a generation number"))
                    })?)
                }
                "position" if allow_position => {
                    p.position = Some(
                        value
                            .parse()
                            .map_err(|_| bad(format!("position {value:?} is not an index")))?,
                    )
                }
                other => {
                    let known = if allow_position {
                        "dry_run, generation, position"
                    } else {
                        "dry_run, generation"
                    };
                    return Err(bad(format!("unknown parameter {other:?} (known: {known})")));
                }
            }
        }
        Ok(p)
    }
}

fn kind_of(segment: &str) -> Result<RuleKind, ApiError> {
    RuleKind::parse(segment).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no rule table {segment:?} (the tables are dnat and snat)"
        ))
    })
}

fn json_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("request body: {e}")))
}

/// A rule of `kind` from a JSON body; a missing `name` is taken from `default_name`.
fn entry_of(
    kind: RuleKind,
    body: &Bytes,
    default_name: Option<&str>,
) -> Result<RuleEntry, ApiError> {
    let fill = |name: &mut Option<String>| {
        if name.is_none() {
            *name = default_name.map(str::to_string);
        }
    };
    Ok(match kind {
        RuleKind::Dnat => {
            let mut e: DnatEntry = json_body(body)?;
            fill(&mut e.name);
            RuleEntry::Dnat(e)
        }
        RuleKind::Snat => {
            let mut e: SnatEntry = json_body(body)?;
            fill(&mut e.name);
            RuleEntry::Snat(e)
        }
    })
}

async fn submit(
    owner: &mpsc::Sender<Request>,
    change: RuleChange,
    params: &ChangeParams,
) -> Result<Json<ApplyReport>, ApiError> {
    let request = ChangeRequest {
        change: Change::Edit(change),
        expected_generation: params.generation,
        dry_run: params.dry_run,
        source: ApplySource::Api,
    };
    ask(owner, |reply| Request::ChangeRules { request, reply })
        .await
        .map(Json)
}

/// The rules in force and their generation.
#[utoipa::path(get, path = "/v1/rules", tag = "rules",
    responses((status = 200, description = "The rules in force", body = RuleDocument)))]
pub(crate) async fn get_rules(
    State(owner): State<mpsc::Sender<Request>>,
) -> Result<Json<RuleDocument>, ApiError> {
    ask_infallible(&owner, Request::GetRules).await.map(Json)
}

/// Replaces every rule in one transaction. With `generation` in the body, refused (409) if the
/// rules changed since that generation.
#[utoipa::path(put, path = "/v1/rules", tag = "rules",
    params(("dry_run" = Option<bool>, Query, description = "Only report what would change")),
    request_body = RuleDocument,
    responses((status = 200, description = "What changed (or would)", body = ApplyReport),
              (status = 400, description = "Invalid rules; nothing changed", body = ErrorBody),
              (status = 409, description = "Stale generation; nothing changed", body = ErrorBody)))]
pub(crate) async fn replace_rules(
    State(owner): State<mpsc::Sender<Request>>,
    Query(pairs): Query<Vec<(String, String)>>,
    body: Bytes,
) -> Result<Json<ApplyReport>, ApiError> {
    let mut params = ChangeParams::parse(&pairs, false)?;
    let doc: RuleDocument = json_body(&body)?;
    if params.generation.is_some() && doc.generation.is_some() {
        return Err(ApiError::BadRequest(
            "give the generation in the body or in the query, not both".into(),
        ));
    }
    params.generation = params.generation.or(doc.generation);
    let change = RuleChange::Replace {
        dnat: doc.dnat,
        snat: doc.snat,
    };
    submit(&owner, change, &params).await
}

/// Adds one rule, last among its table's rules unless `position` says where (0: first).
#[utoipa::path(post, path = "/v1/rules/{kind}", tag = "rules",
    params(
        ("kind" = String, Path, description = "dnat or snat"),
        ("dry_run" = Option<bool>, Query, description = "Only report what would change"),
        ("generation" = Option<u64>, Query, description = "Refuse unless the rules are at this generation"),
        ("position" = Option<usize>, Query, description = "Index among the table's rules (0: highest priority)"),
    ),
    request_body(content = DnatEntry, description = "A [[dnat]] entry (or a [[snat]] entry, SnatEntry, for kind snat)"),
    responses((status = 200, description = "What changed (or would)", body = ApplyReport),
              (status = 400, description = "Invalid rule; nothing changed", body = ErrorBody),
              (status = 404, description = "No such table", body = ErrorBody),
              (status = 409, description = "The rule exists, or stale generation", body = ErrorBody)))]
pub(crate) async fn add_rule(
    State(owner): State<mpsc::Sender<Request>>,
    Path(kind): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
    body: Bytes,
) -> Result<Json<ApplyReport>, ApiError> {
    let kind = kind_of(&kind)?;
    let params = ChangeParams::parse(&pairs, true)?;
    let entry = entry_of(kind, &body, None)?;
    let change = RuleChange::Add {
        entry,
        position: params.position,
    };
    submit(&owner, change, &params).await
}

/// Replaces one rule in place (keeping its priority); the body may rename it.
#[utoipa::path(put, path = "/v1/rules/{kind}/{name}", tag = "rules",
    params(
        ("kind" = String, Path, description = "dnat or snat"),
        ("name" = String, Path, description = "The rule's name"),
        ("dry_run" = Option<bool>, Query, description = "Only report what would change"),
        ("generation" = Option<u64>, Query, description = "Refuse unless the rules are at this generation"),
    ),
    request_body(content = DnatEntry, description = "A [[dnat]] entry (or a [[snat]] entry, SnatEntry, for kind snat); name defaults to the path's"),
    responses((status = 200, description = "What changed (or would)", body = ApplyReport),
              (status = 400, description = "Invalid rule; nothing changed", body = ErrorBody),
              (status = 404, description = "No such rule", body = ErrorBody),
              (status = 409, description = "Stale generation", body = ErrorBody)))]
pub(crate) async fn update_rule(
    State(owner): State<mpsc::Sender<Request>>,
    Path((kind, name)): Path<(String, String)>,
    Query(pairs): Query<Vec<(String, String)>>,
    body: Bytes,
) -> Result<Json<ApplyReport>, ApiError> {
    let kind = kind_of(&kind)?;
    let params = ChangeParams::parse(&pairs, false)?;
    let entry = entry_of(kind, &body, Some(&name))?;
    submit(&owner, RuleChange::Update { name, entry }, &params).await
}

/// Deletes one rule. Its sessions keep their translation until they expire or are deleted.
#[utoipa::path(delete, path = "/v1/rules/{kind}/{name}", tag = "rules",
    params(
        ("kind" = String, Path, description = "dnat or snat"),
        ("name" = String, Path, description = "The rule's name"),
        ("dry_run" = Option<bool>, Query, description = "Only report what would change"),
        ("generation" = Option<u64>, Query, description = "Refuse unless the rules are at this generation"),
    ),
    responses((status = 200, description = "What changed (or would)", body = ApplyReport),
              (status = 404, description = "No such rule", body = ErrorBody),
              (status = 409, description = "Stale generation", body = ErrorBody)))]
pub(crate) async fn delete_rule(
    State(owner): State<mpsc::Sender<Request>>,
    Path((kind, name)): Path<(String, String)>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<ApplyReport>, ApiError> {
    let kind = kind_of(&kind)?;
    let params = ChangeParams::parse(&pairs, false)?;
    submit(&owner, RuleChange::Delete { kind, name }, &params).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn change_parameters_are_strict() {
        assert_eq!(
            ChangeParams::parse(&pairs(&[("dry_run", "true"), ("generation", "7")]), false)
                .unwrap(),
            ChangeParams {
                dry_run: true,
                generation: Some(7),
                position: None
            }
        );
        for (bad, allow_position) in [
            (vec![("dryrun", "true")], true),
            (vec![("position", "1")], false),
            (vec![("dry_run", "yes")], false),
            (vec![("generation", "-1")], false),
            (vec![("dry_run", "true"), ("dry_run", "true")], false),
        ] {
            assert!(
                ChangeParams::parse(&pairs(&bad), allow_position).is_err(),
                "{bad:?}"
            );
        }
    }
}
