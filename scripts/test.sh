#!/usr/bin/env bash
# Runs every test layer: formatting and lints, host unit/property tests, BPF_PROG_TEST_RUN
# packet fixtures through the real XDP object, and network-namespace end-to-end tests.
# Needs root (BPF, namespaces). Installs what it needs first (scripts/bootstrap.sh).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

if [ "$(id -u)" -ne 0 ]; then
  echo "test: must run as root: the tests load BPF programs and create network namespaces" >&2
  exit 1
fi

bash scripts/bootstrap.sh

step() { printf '\n==> %s\n' "$*"; }

step "format"
cargo fmt --all -- --check
cargo fmt --manifest-path nat-ebpf/Cargo.toml -- --check

step "lint"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests (unit, property, packet fixtures, end-to-end)"
# Namespace tests clean up after themselves; a crashed earlier run is swept by the lab itself.
cargo test --workspace --locked --no-fail-fast
