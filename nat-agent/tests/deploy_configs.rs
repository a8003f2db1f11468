//! Every deployment's agent config (`deploy/<target>/nat.toml`) passes the agent's validation,
//! through the same code path as `nat-agent check`: the binary itself, and the library's
//! `load_config` that `check` calls. Deployment-specific promises are checked too: the AWS NAT
//! keeps external ports in 1024-65535 (the public subnet's stateless ACL admits replies only
//! there), the Azure NAT answers the load balancer's probe on `health_listen`, and the on-prem
//! gateway's bypass rules come before any translating rule.

use std::{path::PathBuf, process::Command};

use nat_agent::model::SnatAction;

const BIN: &str = env!("CARGO_BIN_EXE_nat-agent");
const TARGETS: &[&str] = &["azure", "aws", "onprem"];

fn config(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("nat-agent has a parent")
        .join("deploy")
        .join(target)
        .join("nat.toml")
}

#[test]
fn every_deploy_config_passes_nat_agent_check() {
    for target in TARGETS {
        let path = config(target);
        let out = Command::new(BIN)
            .arg("check")
            .arg("--config")
            .arg(&path)
            .output()
            .expect("running nat-agent check");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains(": OK ("),
            "nat-agent check --config {} failed ({}):\n{stdout}{stderr}",
            path.display(),
            out.status
        );
        assert!(
            !stderr.contains("warning"),
            "{}: warnings:\n{stderr}",
            path.display()
        );
    }
}

#[test]
fn deploy_configs_keep_their_promises() {
    let load = |t: &str| {
        nat_agent::load_config(&config(t))
            .unwrap_or_else(|e| panic!("{t}: {e}"))
            .0
    };

    let aws = load("aws");
    let translating: Vec<_> = aws
        .snat
        .iter()
        .filter(|r| !matches!(r.action, SnatAction::NoNat))
        .collect();
    assert!(!translating.is_empty(), "aws: no translating SNAT rule");
    for rule in &translating {
        let ports = match &rule.action {
            SnatAction::ToAddresses { ports, .. } | SnatAction::Masquerade { ports } => ports,
            SnatAction::NoNat => unreachable!("filtered above"),
        };
        assert_eq!(
            (ports.min, ports.max),
            (1024, 65535),
            "aws: {} must keep external ports in 1024-65535",
            rule.name
        );
    }

    let azure = load("azure");
    assert_eq!(
        azure.health_listen.map(|a| a.port()),
        Some(8080),
        "azure: the load balancer probes /readyz on 8080 (terraform/main.tf)"
    );
    assert!(
        azure
            .snat
            .iter()
            .any(|r| matches!(r.action, SnatAction::NoNat)
                && r.destination.to_string() == "168.63.129.16/32"),
        "azure: 168.63.129.16 must be exempt from NAT"
    );

    let onprem = load("onprem");
    let first_translating = onprem
        .snat
        .iter()
        .position(|r| !matches!(r.action, SnatAction::NoNat))
        .expect("onprem: a translating rule");
    assert!(
        onprem.snat[first_translating..]
            .iter()
            .all(|r| !matches!(r.action, SnatAction::NoNat)),
        "onprem: every bypass (no_nat) rule must come before the translating ones"
    );
    assert!(first_translating >= 2, "onprem: bypass rules expected");
}
