#!/usr/bin/env bash
# The README's "run it": `sudo scripts/run-lab.sh [--release] [--duration SECS] [--down]`.
#
# Installs what the lab needs (scripts/bootstrap.sh: toolchain, iproute2, ethtool, nftables,
# curl, python3, ...), then runs the demo `cargo xtask lab` with the given arguments: a client,
# the NAT agent and a backend in network namespaces, all traffic confined to 198.18.0.0/15.
# Ctrl-C stops the agent and removes the namespaces; `--down` removes a crashed run's leftovers.
# Works from any directory.
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [ "$(id -u)" -ne 0 ]; then
  echo "run-lab: needs root (network namespaces, XDP, nftables): sudo $0 $*" >&2
  exit 1
fi

# sudo resets PATH, which usually drops rustup's ~/.cargo/bin.
if ! command -v cargo >/dev/null 2>&1; then
  for dir in "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin; do
    if [ -x "$dir/cargo" ]; then
      PATH="$dir:$PATH"
      break
    fi
  done
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "run-lab: cargo not found in PATH; if sudo dropped it, run: sudo env PATH=\"\$PATH\" $0 $*" >&2
  exit 1
fi

"$top/scripts/bootstrap.sh"

# The `cargo xtask` alias lives in the workspace's .cargo/config.toml: run from the root.
cd "$top"
# exec: Ctrl-C and SIGTERM reach the demo itself (cargo run execs it), which cleans up.
exec cargo xtask lab "$@"
