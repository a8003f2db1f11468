//! Contract tests of the local API and its CLI against the real agent binary, attached in a
//! client -- NAT -- backend lab: every route of the OpenAPI document answers, rule changes are
//! transactions (stale generations refused, dry runs change nothing, invalid changes leave the
//! old rules applied), changes reach the dataplane (curl through added, changed and deleted
//! rules), SIGHUP re-reads the file with the same guarantees, and the socket's permissions
//! are the access control (root and `api_group`; anyone else refused).
//!
//! HTTP requests are made with curl over the unix socket (a client that is not ours); the CLI
//! is the agent binary itself. Needs root. Never skips.

use std::{
    net::Ipv4Addr,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use nat_lab::{wait_until, Check, DnatLab, HttpEcho};
use serde_json::{json, Value};

#[path = "common/agent.rs"]
mod agent;

use agent::{api_request as http, served_by, Agent, AGENT, API_SOCKET_PLACEHOLDER};

/// The group the socket is handed to: present on every Debian system.
const OPERATOR_GROUP: &str = "nogroup";
const NOGROUP_GID: u32 = 65534;
const NOBODY_UID: u32 = 65534;

fn config(extra_rules: &str) -> String {
    format!(
        r#"
[agent]
metrics_listen = "127.0.0.1:9469"
api_socket = "{API_SOCKET_PLACEHOLDER}"
api_group = "{OPERATOR_GROUP}"

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
{extra_rules}"#
    )
}

/// Added, changed and deleted through the API: VIP2:80 onto the first or second backend.
fn vip2_rule(backend: Ipv4Addr) -> String {
    format!(
        r#"
[[dnat]]
id = 2
name = "vip2-http"
destination = "198.18.100.11"
protocol = "tcp"
port = 80
to_address = "{backend}"
to_port = 80
"#
    )
}

fn ok(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let (status, value) = http(socket, method, path, body)?;
    ensure!(status == 200, "{method} {path}: {status} {value}");
    Ok(value)
}

/// `nat-agent <args> --socket S` as root: (exit code, stdout, stderr).
fn cli(socket: &Path, args: &[&str]) -> Result<(i32, String, String)> {
    cli_as(None, socket, args)
}

/// The CLI as `uid`:`gid` with no supplementary groups (`None`: as root).
fn cli_as(ids: Option<(u32, u32)>, socket: &Path, args: &[&str]) -> Result<(i32, String, String)> {
    let mut cmd = match ids {
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups")
                .arg(AGENT);
            c
        }
        None => Command::new(AGENT),
    };
    cmd.args(args).arg("--socket").arg(socket);
    let out = cmd.output().context("running the CLI")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn generation(socket: &Path) -> Result<u64> {
    ok(socket, "GET", "/v1/rules", None)?["generation"]
        .as_u64()
        .context("rules without generation")
}

fn rule_names(socket: &Path) -> Result<Vec<String>> {
    let doc = ok(socket, "GET", "/v1/rules", None)?;
    let mut names = Vec::new();
    for kind in ["dnat", "snat"] {
        for r in doc[kind].as_array().context("rule list")? {
            names.push(r["name"].as_str().unwrap_or_default().to_string());
        }
    }
    Ok(names)
}

fn applies(socket: &Path, source: &str, result: &str) -> Result<u64> {
    let status = ok(socket, "GET", "/v1/status", None)?;
    for a in status["applies"].as_array().context("applies")? {
        if a["source"] == source && a["result"] == result {
            return a["count"].as_u64().context("count");
        }
    }
    bail!("no applies entry for {source}/{result} in {status}")
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[test]
fn api_and_cli_contract_against_a_running_agent() -> Result<()> {
    let lab = DnatLab::new()?;
    // One server on :80 of both backend addresses; its answer names the address it served.
    let _web = HttpEcho::start(lab.backend.name(), &[80])?;
    let mut agent = Agent::start(&lab.nat, &config(""))?;
    let socket = agent.api_socket();
    let dir = socket.parent().context("socket dir")?.to_path_buf();
    let scratch = dir.join("rules");
    std::fs::create_dir_all(&scratch)?;

    // --- Every documented route exists and answers JSON (never the router's bare 404/405).
    let doc = ok(&socket, "GET", "/v1/openapi.json", None)?;
    ensure!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{doc}"
    );
    let paths = doc["paths"].as_object().context("paths")?;
    let mut routes = 0;
    for (path, item) in paths {
        for method in ["get", "put", "post", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            routes += 1;
            let concrete = path
                .replace("{kind}", "dnat")
                .replace("{name}", "no-such-rule");
            // Changes as dry runs with an empty or minimal body: the answer may be a
            // refusal, but it must be the API's (JSON with an error), not a missing route.
            let (url, body) = match (method, path.as_str()) {
                ("put", "/v1/rules") => (format!("{concrete}?dry_run=true"), Some(json!({}))),
                ("post", _) if path.starts_with("/v1/rules") => {
                    (format!("{concrete}?dry_run=true"), Some(json!({})))
                }
                ("put", _) => (format!("{concrete}?dry_run=true"), Some(json!({}))),
                ("delete", "/v1/sessions") => (format!("{concrete}?port=1"), None),
                ("delete", _) => (format!("{concrete}?dry_run=true"), None),
                _ => (concrete.clone(), None),
            };
            let (status, value) = http(&socket, &method.to_uppercase(), &url, body.as_ref())?;
            ensure!(
                value.is_object() && status != 405,
                "{method} {path} ({url}): {status} {value}"
            );
        }
    }
    ensure!(routes >= 10, "only {routes} routes documented");
    // And the router has nothing undocumented: an unknown path is the router's own 404.
    let (status, value) = http(&socket, "GET", "/v1/nope", None)?;
    ensure!(status == 404 && !value.is_object(), "{status} {value}");

    // --- Reading.
    ensure!(generation(&socket)? == 1);
    ensure!(rule_names(&socket)? == ["vip1-http"]);
    let (code, table, _) = cli(&socket, &["rules", "list"])?;
    ensure!(
        code == 0 && table.contains("vip1-http") && table.contains("generation 1"),
        "{table}"
    );
    let status = ok(&socket, "GET", "/v1/status", None)?;
    ensure!(
        status["interfaces"].as_array().map(Vec::len) == Some(2),
        "{status}"
    );
    let stats = ok(&socket, "GET", "/v1/stats", None)?;
    ensure!(stats["reasons"]["no_match"].is_u64(), "{stats}");
    ensure!(stats["rules"][0]["name"] == "vip1-http", "{stats}");
    ensure!(
        served_by(&lab, DnatLab::VIP1)?.is_some(),
        "vip1 does not answer"
    );
    ensure!(
        served_by(&lab, DnatLab::VIP2)?.is_none(),
        "vip2 answers without a rule"
    );

    // --- A dry run changes nothing.
    let vip2_file = scratch.join("vip2.toml");
    write_file(&vip2_file, &vip2_rule(DnatLab::BACKEND_ADDR))?;
    let vip2 = vip2_file.display().to_string();
    let (code, out, err) = cli(&socket, &["rules", "add", &vip2, "--dry-run", "--json"])?;
    ensure!(code == 0, "{out}{err}");
    let report: Value = serde_json::from_str(&out)?;
    ensure!(
        report["dry_run"] == true && report["applied"] == false,
        "{report}"
    );
    ensure!(
        report["changes"]["added"][0]["name"] == "vip2-http",
        "{report}"
    );
    ensure!(generation(&socket)? == 1 && rule_names(&socket)? == ["vip1-http"]);
    ensure!(
        served_by(&lab, DnatLab::VIP2)?.is_none(),
        "a dry run changed the dataplane"
    );

    // --- A stale generation is refused, and nothing changes.
    let (code, out, err) = cli(&socket, &["rules", "add", &vip2, "--generation", "7"])?;
    ensure!(
        code == 1 && err.contains("409") && err.contains("stale generation 7"),
        "{out}{err}"
    );
    ensure!(generation(&socket)? == 1 && rule_names(&socket)? == ["vip1-http"]);

    // --- An invalid change is refused with a precise error; the old rules stay applied.
    let bad = json!({"id": 9, "name": "bad", "destination": "198.18.100.300",
                     "to_address": "198.18.1.2"});
    let (status, value) = http(&socket, "POST", "/v1/rules/dnat", Some(&bad))?;
    let message = value["error"].as_str().unwrap_or_default();
    ensure!(
        status == 400 && message.contains("destination"),
        "{status} {value}"
    );
    let (status, value) = http(&socket, "POST", "/v1/rules/dnat", Some(&json!({"nme": 1})))?;
    ensure!(
        status == 400 && value["error"].as_str().unwrap_or("").contains("nme"),
        "{value}"
    );
    // A rule id that clashes with the existing rule: refused by validation.
    let clash = json!({"id": 1, "name": "clash", "destination": "198.18.100.12",
                       "to_address": "198.18.1.2"});
    let (status, value) = http(&socket, "POST", "/v1/rules/dnat", Some(&clash))?;
    ensure!(
        status == 400 && value["error"].as_str().unwrap_or("").contains("id 1"),
        "{value}"
    );
    let (status, _) = http(&socket, "DELETE", "/v1/rules/dnat/no-such-rule", None)?;
    ensure!(status == 404);
    let (status, _) = http(&socket, "POST", "/v1/rules/nat", Some(&bad))?;
    ensure!(status == 404);
    ensure!(generation(&socket)? == 1 && rule_names(&socket)? == ["vip1-http"]);
    // Counted: the stale generation, the bad destination, the id clash, the absent rule.
    // Requests refused before they become a change (an unparsable body, an unknown table)
    // are answered but not counted.
    let refused = applies(&socket, "api", "refused")?;
    ensure!(refused == 4, "{refused} refusals counted");
    ensure!(
        served_by(&lab, DnatLab::VIP1)?.is_some(),
        "vip1 broken by a refused change"
    );

    // --- Add, change, delete through the CLI reach the dataplane.
    let (code, out, err) = cli(&socket, &["rules", "add", &vip2, "--generation", "1"])?;
    ensure!(
        code == 0 && out.contains("applied: generation 2"),
        "{out}{err}"
    );
    ensure!(
        served_by(&lab, DnatLab::VIP2)?.as_deref() == Some("198.18.1.2:80"),
        "vip2 after add"
    );
    let moved_file = scratch.join("vip2-moved.toml");
    write_file(&moved_file, &vip2_rule(DnatLab::BACKEND_ADDR2))?;
    let moved = moved_file.display().to_string();
    let (code, out, err) = cli(&socket, &["rules", "change", "vip2-http", &moved])?;
    ensure!(
        code == 0 && out.contains("~ dnat vip2-http (changed)"),
        "{out}{err}"
    );
    ensure!(
        served_by(&lab, DnatLab::VIP2)?.as_deref() == Some("198.18.1.3:80"),
        "vip2 after change"
    );
    let (code, out, err) = cli(&socket, &["rules", "del", "dnat", "vip2-http"])?;
    ensure!(code == 0 && out.contains("- dnat vip2-http"), "{out}{err}");
    ensure!(
        served_by(&lab, DnatLab::VIP2)?.is_none(),
        "vip2 after delete"
    );
    ensure!(generation(&socket)? == 4);

    // --- Replace and diff with whole files.
    let full_file = scratch.join("full.toml");
    write_file(&full_file, &config(&vip2_rule(DnatLab::BACKEND_ADDR)))?;
    let full = full_file.display().to_string();
    let (code, out, _) = cli(&socket, &["rules", "diff", &full])?;
    ensure!(
        code == 0 && out.contains("dry run") && out.contains("+ dnat vip2-http"),
        "{out}"
    );
    ensure!(generation(&socket)? == 4);
    let (code, out, err) = cli(&socket, &["rules", "replace", &full, "--generation", "4"])?;
    ensure!(
        code == 0 && out.contains("applied: generation 5"),
        "{out}{err}"
    );
    let (code, out, _) = cli(&socket, &["rules", "diff", &full])?;
    ensure!(
        code == 0 && out.starts_with("no change (generation 5)"),
        "{out}"
    );
    ensure!(served_by(&lab, DnatLab::VIP2)?.as_deref() == Some("198.18.1.2:80"));

    // --- SIGHUP re-reads the file: applied when valid, refused (rules kept) otherwise.
    let config_path = agent.config_path().to_path_buf();
    let running_text = std::fs::read_to_string(&config_path)?;
    let hup = |agent: &mut Agent| -> Result<()> {
        agent.ensure_running()?;
        let pid = i32::try_from(agent.pid()).context("pid")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        )
        .context("sending SIGHUP")
    };
    // The file still has only vip1: a reload removes vip2 (the file is the desired state).
    hup(&mut agent)?;
    wait_until("the SIGHUP reload", Duration::from_secs(10), || {
        Ok(if generation(&socket)? == 6 {
            Check::Done(())
        } else {
            Check::NotYet("generation still 5".into())
        })
    })?;
    ensure!(rule_names(&socket)? == ["vip1-http"]);
    ensure!(applies(&socket, "sighup", "applied")? == 1);
    // Invalid file: refused, counted, rules kept.
    write_file(
        &config_path,
        &running_text.replace("198.18.1.2", "198.18.1.999"),
    )?;
    hup(&mut agent)?;
    wait_until("the refused SIGHUP reload", Duration::from_secs(10), || {
        Ok(if applies(&socket, "sighup", "refused")? == 1 {
            Check::Done(())
        } else {
            Check::NotYet("no refusal counted yet".into())
        })
    })?;
    ensure!(generation(&socket)? == 6 && rule_names(&socket)? == ["vip1-http"]);
    let status = ok(&socket, "GET", "/v1/status", None)?;
    let error = status["last_apply"]["error"].as_str().unwrap_or_default();
    ensure!(error.contains("to_address"), "{status}");
    // A change outside the rules needs a restart: refused as a whole.
    write_file(
        &config_path,
        &format!("{running_text}\n[conntrack]\nmax_sessions = 4096\n"),
    )?;
    hup(&mut agent)?;
    wait_until("the second refused reload", Duration::from_secs(10), || {
        Ok(if applies(&socket, "sighup", "refused")? == 2 {
            Check::Done(())
        } else {
            Check::NotYet("no second refusal yet".into())
        })
    })?;
    let status = ok(&socket, "GET", "/v1/status", None)?;
    let error = status["last_apply"]["error"].as_str().unwrap_or_default();
    ensure!(
        error.contains("[conntrack]") && error.contains("restart"),
        "{status}"
    );
    ensure!(
        served_by(&lab, DnatLab::VIP1)?.is_some(),
        "vip1 after refused reloads"
    );
    // The metrics say the same.
    let metrics = agent.metrics()?;
    ensure!(
        metrics.require(
            "xdpnat_config_applies_total",
            &[("source", "sighup"), ("result", "refused")]
        )? == 2.0
    );
    ensure!(metrics.require("xdpnat_config_generation", &[])? == 6.0);

    // --- Permissions: root and the operator group may use the socket, nobody else.
    let meta = std::fs::metadata(&socket)?;
    ensure!(
        meta.mode() & 0o777 == 0o660,
        "socket mode {:o}",
        meta.mode()
    );
    ensure!(meta.gid() == NOGROUP_GID, "socket group {}", meta.gid());
    // The scratch directory is private to root; open it so only the socket decides.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let (code, out, err) = cli_as(Some((NOBODY_UID, NOGROUP_GID)), &socket, &["status"])?;
    ensure!(
        code == 0 && out.contains("generation 6"),
        "operator group refused: {out}{err}"
    );
    let (code, out, err) = cli_as(Some((NOBODY_UID, NOGROUP_GID - 1)), &socket, &["status"])?;
    ensure!(
        code != 0 && err.to_lowercase().contains("permission denied"),
        "a user outside the group got in: {code} {out}{err}"
    );
    let (code, _, err) = cli_as(
        Some((NOBODY_UID, NOGROUP_GID - 1)),
        &socket,
        &["rules", "del", "dnat", "vip1-http"],
    )?;
    ensure!(
        code != 0 && err.to_lowercase().contains("permission denied"),
        "{err}"
    );
    ensure!(rule_names(&socket)? == ["vip1-http"]);

    agent.ensure_running()?;
    Ok(())
}
