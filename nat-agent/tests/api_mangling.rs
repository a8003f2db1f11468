//! Mangled rule documents through the running agent's API, generated: a property test of "a
//! rejected change keeps the last good rules".
//!
//! The agent's own rule document (`GET /v1/rules`, DNAT and SNAT rules) is mangled at random:
//! a value replaced by an edge case (out-of-range and negative numbers, wrong types, empty and
//! oversized strings, addresses that are not addresses, null), a field removed, a rule
//! repeated (clashing ids and names), an unknown field added. Each mangled document is sent
//! whole (`PUT /v1/rules`, applied, not a dry run) to the agent attached in a
//! client -- NAT -- backend lab, and:
//! - the answer is 200 or 400, never a server error, and always a JSON object; a 400 says what
//!   is wrong;
//! - after a 400 the rules read back are exactly those before (generation included);
//! - after a 200 the rules read back are the ones sent, and the generation moved on by one,
//!   or stayed when nothing changed, as the answer says;
//! - the agent is still running.
//!
//! At the end the original rules are put back and the VIP answers through them: the dataplane
//! survived the accepted changes. Seeded; a failure is shrunk to the smallest mangling. Needs
//! root. Never skips.

use std::{cell::Cell, path::Path};

use anyhow::{ensure, Context, Result};
use nat_lab::{DnatLab, HttpEcho};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

#[path = "common/agent.rs"]
mod agent;
#[path = "common/props.rs"]
mod props;

use agent::{api_request, served_by, Agent, API_SOCKET_PLACEHOLDER};

/// Mangled documents sent. Each is two or three requests over the socket (curl): a few
/// seconds for all.
const CASES: u32 = 250;

fn config() -> String {
    format!(
        r#"
[agent]
metrics_listen = "127.0.0.1:9469"
api_socket = "{API_SOCKET_PLACEHOLDER}"

[conntrack]
max_sessions = 4096

[[interfaces]]
name = "n0"
xdp_mode = "native"

[[interfaces]]
name = "n1"
xdp_mode = "native"

[[dnat]]
id = 1
name = "vip1-http"
destination = "198.18.100.10"
protocol = "tcp"
port = 80
to_address = "198.18.1.2"
to_port = 80

[[dnat]]
id = 2
name = "vip2-whole"
destination = "198.18.100.11"
to_address = "198.18.1.2"

[[snat]]
id = 3
name = "clients-out"
source = "198.18.0.0/24"
destination = "198.18.1.0/24"
out_interface = "n1"
masquerade = true
port_range = "20000-29999"
"#
    )
}

/// Values a field may be given instead of its own: edge cases, and a few that are valid for
/// some field (so that some mangled documents are applied, and the agent is tested on
/// accepted changes too).
fn edge_values() -> Vec<Value> {
    vec![
        json!(8080),
        json!(22),
        json!("198.18.1.3"),
        json!("198.18.100.12"),
        json!("renamed"),
        json!("udp"),
        json!(null),
        json!(0),
        json!(-1),
        json!(65536),
        json!(4294967296u64),
        json!(u64::MAX),
        json!(1.5),
        json!(true),
        json!(""),
        json!(" "),
        json!("x".repeat(300)),
        json!("198.18.100.300"),
        json!("198.18.0.0/33"),
        json!("0.0.0.0/0"),
        json!("255.255.255.255"),
        json!("203.0.113.9-203.0.113.1"),
        json!("65535-1024"),
        json!("0-0"),
        json!("::1"),
        json!("tcp"),
        json!("icmp"),
        json!("gre"),
        json!("n0"),
        json!("no-such-interface"),
        json!([]),
        json!([1, 2]),
        json!({}),
        json!({"id": 1}),
    ]
}

/// One change to the document.
#[derive(Debug, Clone)]
enum Edit {
    /// The n-th leaf (modulo their count, in document order) replaced by an edge value.
    Replace { leaf: usize, value: usize },
    /// The n-th field of a rule removed.
    Remove { field: usize },
    /// The n-th rule repeated.
    Repeat { rule: usize },
    /// An unknown field added to the n-th rule.
    Unknown { rule: usize },
}

fn edits(values: usize) -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        5 => (any::<usize>(), 0..values).prop_map(|(leaf, value)| Edit::Replace { leaf, value }),
        2 => any::<usize>().prop_map(|field| Edit::Remove { field }),
        1 => any::<usize>().prop_map(|rule| Edit::Repeat { rule }),
        1 => any::<usize>().prop_map(|rule| Edit::Unknown { rule }),
    ];
    prop::collection::vec(edit, 1..4)
}

/// The rules of a document as (table, index) pairs, in document order.
fn rules(doc: &Value) -> Vec<(&'static str, usize)> {
    ["dnat", "snat"]
        .into_iter()
        .flat_map(|table| {
            let n = doc[table].as_array().map_or(0, Vec::len);
            (0..n).map(move |i| (table, i))
        })
        .collect()
}

fn rule_mut<'a>(
    doc: &'a mut Value,
    (table, i): (&str, usize),
) -> Option<&'a mut Map<String, Value>> {
    doc.get_mut(table)?.get_mut(i)?.as_object_mut()
}

fn apply(original: &Value, edits: &[Edit], values: &[Value]) -> Value {
    let mut doc = original.clone();
    if let Some(map) = doc.as_object_mut() {
        // Sent without a generation: no concurrency check, every document is judged on its
        // rules.
        map.remove("generation");
    }
    for edit in edits {
        let all = rules(&doc);
        if all.is_empty() {
            break;
        }
        match edit {
            Edit::Replace { leaf, value } => {
                let fields: Vec<((&str, usize), String)> = all
                    .iter()
                    .flat_map(|&r| {
                        doc[r.0][r.1]
                            .as_object()
                            .map(|m| m.keys().cloned().collect::<Vec<_>>())
                            .unwrap_or_default()
                            .into_iter()
                            .map(move |k| (r, k))
                    })
                    .collect();
                if fields.is_empty() {
                    continue;
                }
                let (r, key) = &fields[leaf % fields.len()];
                if let Some(rule) = rule_mut(&mut doc, *r) {
                    rule.insert(key.clone(), values[*value].clone());
                }
            }
            Edit::Remove { field } => {
                let r = all[field % all.len()];
                if let Some(rule) = rule_mut(&mut doc, r) {
                    let keys: Vec<String> = rule.keys().cloned().collect();
                    if !keys.is_empty() {
                        rule.remove(&keys[(field / all.len()) % keys.len()]);
                    }
                }
            }
            Edit::Repeat { rule } => {
                let (table, i) = all[rule % all.len()];
                let copy = doc[table][i].clone();
                if let Some(list) = doc[table].as_array_mut() {
                    list.push(copy);
                }
            }
            Edit::Unknown { rule } => {
                if let Some(map) = rule_mut(&mut doc, all[rule % all.len()]) {
                    map.insert("priority".into(), json!(7));
                }
            }
        }
    }
    doc
}

/// `rules` (a table of a rule document) with its rules' null fields left out.
fn without_nulls(rules: &Value) -> Value {
    match rules {
        Value::Array(list) => Value::Array(
            list.iter()
                .map(|rule| match rule {
                    Value::Object(fields) => Value::Object(
                        fields
                            .iter()
                            .filter(|(_, v)| !v.is_null())
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                    ),
                    other => other.clone(),
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

fn get_rules(socket: &Path) -> Result<Value> {
    let (status, doc) = api_request(socket, "GET", "/v1/rules", None)?;
    ensure!(status == 200, "GET /v1/rules: {status} {doc}");
    Ok(doc)
}

fn generation(doc: &Value) -> u64 {
    doc["generation"].as_u64().unwrap_or(0)
}

#[test]
fn mangled_rule_documents_are_refused_whole_or_applied() -> Result<()> {
    let lab = DnatLab::new()?;
    let _web = HttpEcho::start(lab.backend.name(), &[80])?;
    let mut agent = Agent::start(&lab.nat, &config())?;
    let socket = agent.api_socket();
    let original = get_rules(&socket)?;
    ensure!(
        rules(&original).len() == 3,
        "the rules as loaded: {original}"
    );
    // vip1's backend, by the original rules.
    let backend = format!("{}:80", DnatLab::BACKEND_ADDR);
    ensure!(
        served_by(&lab, DnatLab::VIP1)?.as_deref() == Some(backend.as_str()),
        "vip1 is not served by {backend}"
    );

    let values = edge_values();
    let (applied, refused) = (Cell::new(0u32), Cell::new(0u32));
    let mut runner = props::seeded_runner(CASES);
    let result = runner.run(&edits(values.len()), |edits| {
        let fail = |e: anyhow::Error| TestCaseError::fail(format!("{e:#}"));
        let before = get_rules(&socket).map_err(fail)?;
        let mangled = apply(&original, &edits, &values);
        let (status, answer) =
            api_request(&socket, "PUT", "/v1/rules", Some(&mangled)).map_err(fail)?;
        let after = get_rules(&socket).map_err(fail)?;
        prop_assert!(
            answer.is_object(),
            "{}: not JSON: {}\n{}",
            status,
            answer,
            mangled
        );
        match status {
            200 => {
                applied.set(applied.get() + 1);
                // A change moves the generation on by exactly one and says it applied; the
                // rules sent again unchanged leave it where it was.
                let changed = ["dnat", "snat"]
                    .iter()
                    .any(|t| without_nulls(&after[*t]) != without_nulls(&before[*t]));
                prop_assert_eq!(
                    generation(&after),
                    generation(&before) + u64::from(changed),
                    "accepted (rules changed: {}), generation {} -> {}",
                    changed,
                    generation(&before),
                    generation(&after)
                );
                prop_assert_eq!(
                    (answer["applied"].as_bool(), answer["generation"].as_u64()),
                    (Some(changed), Some(generation(&after))),
                    "the answer does not say what happened: {}",
                    answer
                );
                // What was accepted is what is in force, field for field (an absent optional
                // field reads back as null).
                for table in ["dnat", "snat"] {
                    prop_assert_eq!(
                        without_nulls(&after[table]),
                        without_nulls(&mangled[table]),
                        "accepted, but the {} rules read back differ from those sent",
                        table
                    );
                }
            }
            400 => {
                refused.set(refused.get() + 1);
                let message = answer["error"].as_str().unwrap_or_default();
                prop_assert!(message.len() > 8, "a refusal that says nothing: {}", answer);
                prop_assert_eq!(
                    &after,
                    &before,
                    "refused ({}), yet the rules changed; sent:\n{}",
                    message,
                    mangled
                );
            }
            other => {
                return Err(TestCaseError::fail(format!(
                    "status {other}: {answer}\nsent:\n{mangled}"
                )))
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}\n{}", agent.log_tail(3000));
    }
    agent.ensure_running()?;
    let (applied, refused) = (applied.get(), refused.get());
    ensure!(
        applied >= CASES / 25 && refused >= CASES / 4,
        "applied {applied}, refused {refused}: the manglings test too little of one side"
    );

    // The original rules back, and through them traffic.
    let mut restore = original.clone();
    restore
        .as_object_mut()
        .context("document")?
        .remove("generation");
    let (status, answer) = api_request(&socket, "PUT", "/v1/rules", Some(&restore))?;
    ensure!(status == 200, "restoring the rules: {status} {answer}");
    let back = get_rules(&socket)?;
    ensure!(
        back["dnat"] == original["dnat"] && back["snat"] == original["snat"],
        "the rules restored: {back}"
    );
    ensure!(
        served_by(&lab, DnatLab::VIP1)?.as_deref() == Some(backend.as_str()),
        "vip1 is not served by {backend} after the mangled documents\n{}",
        agent.log_tail(3000)
    );
    drop(agent);
    Ok(())
}
