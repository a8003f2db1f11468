//! Builds the XDP program (`../nat-ebpf`) and leaves the object in `OUT_DIR` for
//! `include_bytes!`, so `cargo build` and `cargo test` need no extra step.
//!
//! The kernel program needs Debian's `/usr/bin/rustc` (it ships the prebuilt `core` for
//! bpfel-unknown-none) and `bpf-linker` from the project's `.tools/bin`, both installed by
//! `scripts/bootstrap.sh`; see ../shared/TOOLCHAIN.md for why not the usual aya recipe.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// Variables the outer cargo sets that would make the inner build use the wrong compiler,
/// target or target directory.
const LEAKED_ENV: &[&str] = &[
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "RUSTUP_TOOLCHAIN",
    "CARGO_MAKEFLAGS",
    "CARGO",
    "RUSTDOC",
    "CARGO_BUILD_RUSTC",
];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets this"));
    let root = manifest_dir
        .parent()
        .expect("nat-agent lives in the workspace");
    let ebpf_dir = root.join("nat-ebpf");
    let common_dir = root.join("nat-common");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets this"));

    for dir in [ebpf_dir.join("src"), common_dir.join("src")] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    for file in [
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join("Cargo.lock"),
        ebpf_dir.join(".cargo/config.toml"),
        common_dir.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let target_dir = out_dir.join("ebpf-target");
    let tools_bin = root.join(".tools/bin");
    let path = format!(
        "{}:{}",
        tools_bin.display(),
        env::var("PATH").unwrap_or_default()
    );
    check_toolchain(&tools_bin);

    let mut cmd = Command::new("cargo");
    for var in LEAKED_ENV {
        cmd.env_remove(var);
    }
    cmd.current_dir(&ebpf_dir)
        .env("RUSTC", "/usr/bin/rustc")
        .env("PATH", path)
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(&target_dir);
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot start cargo for nat-ebpf: {e}"));
    if !status.success() {
        panic!("building nat-ebpf failed ({status}); run scripts/bootstrap.sh if the toolchain is missing");
    }
    let object = target_dir.join("bpfel-unknown-none/release/nat-ebpf");
    std::fs::copy(&object, out_dir.join("nat-ebpf.o"))
        .unwrap_or_else(|e| panic!("cannot copy {}: {e}", object.display()));
}

fn check_toolchain(tools_bin: &Path) {
    let mut missing = Vec::new();
    if !Path::new("/usr/bin/rustc").exists() {
        missing.push("/usr/bin/rustc (apt package rustc-web)");
    }
    if !Path::new("/usr/lib/rustlib/bpfel-unknown-none").exists() {
        missing.push("core for bpfel-unknown-none (apt package libstd-rust-web-dev-bpf)");
    }
    if !tools_bin.join("bpf-linker").exists() {
        missing.push("bpf-linker in .tools/bin");
    }
    if !missing.is_empty() {
        panic!(
            "the eBPF toolchain is incomplete: missing {}. Run `sudo scripts/bootstrap.sh` first.",
            missing.join(", ")
        );
    }
}
