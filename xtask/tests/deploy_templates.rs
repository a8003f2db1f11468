//! The cloud deployments under deploy/, validated offline as far as the tools here allow
//! (what is and is not covered: deploy/README.md):
//!
//! - every `cloud-init.yaml` passes `cloud-init schema --config-file` (Debian's cloud-init,
//!   unpacked into .tools by scripts/bootstrap.sh, not installed) and embeds its target's
//!   `nat.toml` byte for byte (the agent-side validation of those files is
//!   nat-agent/tests/deploy_configs.rs);
//! - every Terraform module is `terraform fmt -check` clean (terraform's own parser) and passes
//!   scripts/check-terraform-refs.py (python-hcl2: references, variables, providers, files);
//! - the AWS module passes `terraform init -backend=false` + `terraform validate` with the
//!   hashicorp/aws provider from a local plugin directory (no registry access here);
//! - the Azure module's load-balancer probe, NSG and route agree with deploy/azure/nat.toml.
//!
//! Missing tools fail the test with what to install, never skip it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

const TARGETS: &[&str] = &["azure", "aws", "onprem"];
const TERRAFORM_MODULES: &[&str] = &["azure", "aws"];
/// Where the hashicorp/aws provider is looked up (`terraform init -plugin-dir`), unless
/// XDPNAT_TF_PLUGIN_DIR says otherwise. Neither terraform nor its providers come from the
/// package registries this project can reach; this machine image ships both.
const DEFAULT_PLUGIN_DIR: &str = "/opt/tf-plugins";
/// The placeholder the Terraform modules replace with var.xdp_nat_deb_url.
const DEB_URL_PLACEHOLDER: &str = "https://packages.example.invalid/xdp-nat_amd64.deb";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .to_path_buf()
}

fn deploy(target: &str) -> PathBuf {
    workspace().join("deploy").join(target)
}

/// `.tools/<relative>` when it exists, else `name` from PATH; panics saying how to get it.
fn tool(relative: &str, name: &str, how: &str) -> PathBuf {
    let local = workspace().join(".tools").join(relative);
    if local.is_file() {
        return local;
    }
    nat_lab::tools::find_tool(name)
        .unwrap_or_else(|| panic!("{name} not found ({} nor in PATH): {how}", local.display()))
}

/// Runs `cmd`; panics with its output unless it succeeds. Returns stdout + stderr.
fn run_ok(cmd: &mut Command) -> String {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn terraform() -> Command {
    let bin = nat_lab::tools::find_tool("terraform").unwrap_or_else(|| {
        panic!(
            "terraform not found in PATH: it is not in Debian, PyPI or npm; install HashiCorp's \
             terraform (>= 1.5) or OpenTofu's tofu as `terraform`"
        )
    });
    let mut cmd = Command::new(bin);
    // No update check, no CLI config from the user's home.
    cmd.env("CHECKPOINT_DISABLE", "1")
        .env("TF_IN_AUTOMATION", "1")
        .env("TF_CLI_CONFIG_FILE", "/dev/null");
    cmd
}

/// The `content: |` block of the write_files entry for `path`, unindented.
fn write_files_content(yaml: &str, path: &str) -> Option<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim() == format!("- path: {path}"))?;
    let content = at + lines[at..].iter().position(|l| l.trim() == "content: |")?;
    let body: Vec<&str> = lines[content + 1..]
        .iter()
        .take_while(|l| l.is_empty() || l.starts_with("      "))
        .copied()
        .collect();
    let indent = body
        .iter()
        .filter(|l| !l.is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()?;
    let mut text: String = body
        .iter()
        .map(|l| format!("{}\n", l.get(indent..).unwrap_or("")))
        .collect();
    // Literal block, clip chomping: one final newline.
    while text.ends_with("\n\n") {
        text.pop();
    }
    Some(text)
}

#[test]
fn cloud_init_files_pass_the_schema_and_embed_their_config() {
    let cloud_init = tool(
        "bin/cloud-init",
        "cloud-init",
        "run scripts/bootstrap.sh as root (it unpacks Debian's cloud-init into .tools)",
    );
    for target in TARGETS {
        let file = deploy(target).join("cloud-init.yaml");
        let out = run_ok(
            Command::new(&cloud_init)
                .args(["schema", "--config-file"])
                .arg(&file),
        );
        assert!(out.contains("Valid cloud-config"), "{target}: {out}");

        let yaml = fs::read_to_string(&file).unwrap();
        assert!(yaml.starts_with("#cloud-config\n"), "{target}: header");
        assert!(
            yaml.contains(DEB_URL_PLACEHOLDER),
            "{target}: the package URL placeholder the Terraform modules replace"
        );
        let embedded = write_files_content(&yaml, "/etc/xdp-nat/nat.toml")
            .unwrap_or_else(|| panic!("{target}: no write_files entry for /etc/xdp-nat/nat.toml"));
        let config = fs::read_to_string(deploy(target).join("nat.toml")).unwrap();
        assert!(
            embedded == config,
            "{target}: cloud-init.yaml's nat.toml differs from deploy/{target}/nat.toml"
        );
        for step in [
            "--force-confold",
            "nat-agent check --config /etc/xdp-nat/nat.toml",
            "systemctl enable --now xdp-nat",
        ] {
            assert!(yaml.contains(step), "{target}: runcmd lacks `{step}`");
        }
    }
}

#[test]
fn terraform_modules_are_formatted_and_their_references_resolve() {
    let python = tool(
        "venv/bin/python",
        "no-python-venv",
        "run scripts/bootstrap.sh as root (it creates .tools/venv with python-hcl2)",
    );
    let script = workspace().join("scripts/check-terraform-refs.py");
    for module in TERRAFORM_MODULES {
        let dir = deploy(module).join("terraform");
        run_ok(
            terraform()
                .args(["fmt", "-check", "-diff", "-recursive"])
                .arg(&dir),
        );
        let out = run_ok(Command::new(&python).arg(&script).arg(&dir));
        assert!(out.contains(" 0 problems"), "{module}: {out}");
    }
}

#[test]
fn aws_module_passes_terraform_validate() {
    let plugins = std::env::var_os("XDPNAT_TF_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PLUGIN_DIR));
    let provider = plugins.join("registry.terraform.io/hashicorp/aws");
    assert!(
        provider.is_dir(),
        "no hashicorp/aws provider under {} (set XDPNAT_TF_PLUGIN_DIR to a directory laid out \
         as registry.terraform.io/hashicorp/aws/VERSION/linux_amd64/): `terraform validate` \
         needs the provider's schema and the registry is not reachable",
        plugins.display()
    );
    // A scratch copy: init writes .terraform/ and a lock file, and the module reads
    // ../cloud-init.yaml.
    let scratch = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deploy-aws");
    if scratch.exists() {
        fs::remove_dir_all(&scratch).unwrap();
    }
    fs::create_dir_all(scratch.join("terraform")).unwrap();
    fs::copy(
        deploy("aws").join("cloud-init.yaml"),
        scratch.join("cloud-init.yaml"),
    )
    .unwrap();
    for entry in fs::read_dir(deploy("aws").join("terraform")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "tf") {
            fs::copy(
                &path,
                scratch.join("terraform").join(path.file_name().unwrap()),
            )
            .unwrap();
        }
    }
    let dir = scratch.join("terraform");
    run_ok(
        terraform()
            .current_dir(&dir)
            .args(["init", "-backend=false", "-input=false", "-no-color"])
            .arg(format!("-plugin-dir={}", plugins.display())),
    );
    let out = run_ok(
        terraform()
            .current_dir(&dir)
            .args(["validate", "-json", "-no-color"]),
    );
    let result: serde_json::Value =
        serde_json::from_str(&out[out.find('{').unwrap_or(0)..]).expect("validate -json output");
    assert_eq!(result["valid"], true, "{out}");
    assert_eq!(result["warning_count"], 0, "warnings: {out}");
}

#[test]
fn azure_module_agrees_with_the_agent_config() {
    let main = fs::read_to_string(deploy("azure").join("terraform/main.tf")).unwrap();
    let config = fs::read_to_string(deploy("azure").join("nat.toml")).unwrap();
    let normalized: String = main.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(config.contains("health_listen = \"0.0.0.0:8080\""));
    for needle in [
        // The probe asks the agent's readiness on health_listen's port.
        r#"protocol = "Http" port = 8080 request_path = "/readyz""#,
        // HA ports.
        r#"protocol = "All" frontend_port = 0 backend_port = 0"#,
        // The NSG admits the probe's source.
        r#"source_address_prefix = "AzureLoadBalancer""#,
        // IP forwarding on the NIC.
        "ip_forwarding_enabled = true",
        // The spokes' default route to the frontend.
        r#"address_prefix = "0.0.0.0/0" next_hop_type = "VirtualAppliance" next_hop_in_ip_address = local.frontend_ip"#,
    ] {
        assert!(
            normalized.contains(needle),
            "terraform/main.tf lacks `{needle}`"
        );
    }
}
