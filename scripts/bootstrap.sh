#!/usr/bin/env bash
# Installs everything the build and the tests need, following ../shared/TOOLCHAIN.md.
# Idempotent: on a machine that already has it all, it costs a couple of seconds.
#
# Why not rustup's nightly + build-std: no rust-src here. Debian's rustc-web ships a prebuilt
# `core` for bpfel-unknown-none (libstd-rust-web-dev-bpf); bpf-linker is built from crates.io
# against the same LLVM major as /usr/bin/rustc.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
tools="$top/.tools"
stamp="$tools/bootstrap.stamp"
# Bump when the list below changes so machines that ran an older list install the new bits.
bootstrap_version=4

APT_PACKAGES=(
  # eBPF toolchain (TOOLCHAIN.md)
  rustc-web cargo-web libstd-rust-web-dev-bpf
  # lab and end-to-end tests
  iproute2 ethtool tcpdump bpftool nftables conntrack iputils-ping iputils-tracepath
  curl chrony iperf3 python3 python3-scapy procps psmisc
  # build of -sys crates
  gcc pkg-config
  # `cargo xtask package` (dpkg-deb, dpkg-shlibdeps, strip) and its test: systemd-analyze
  # verify/security, man --warnings, setpriv (the unit's capabilities), strace (its
  # system-call filter). Assembled with dpkg-deb, so no cargo-deb to build.
  dpkg dpkg-dev binutils systemd man-db util-linux strace
)

log() { printf 'bootstrap: %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (installs apt packages; tests need BPF and namespaces)"
    exit 1
  fi
}

apt_install() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

llvm_major() {
  /usr/bin/rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p'
}

install_bpf_linker() {
  local major prefix libllvm
  major=$(llvm_major)
  [ -n "$major" ] || { log "cannot read the LLVM version of /usr/bin/rustc"; exit 1; }
  if [ -x "$tools/bin/bpf-linker" ] && [ -f "$tools/bpf-linker.llvm" ] \
     && [ "$(cat "$tools/bpf-linker.llvm")" = "$major" ]; then
    return 0
  fi
  # bpf-linker's build wants an unversioned libLLVM.so; Debian's runtime ships only the
  # versioned one, so a private prefix with one symlink avoids the 585 MB llvm-dev package.
  prefix="$tools/llvm-prefix"
  libllvm=$(ls /usr/lib/x86_64-linux-gnu/libLLVM.so."$major"* /usr/lib/llvm-"$major"/lib/libLLVM.so."$major"* 2>/dev/null | head -n1 || true)
  [ -n "$libllvm" ] || { log "libLLVM.so.$major not found (rustc-web should pull it in)"; exit 1; }
  mkdir -p "$prefix/lib"
  ln -sf "$libllvm" "$prefix/lib/libLLVM.so"
  log "building bpf-linker 0.13.0 for LLVM $major (about 40 s)"
  LLVM_PREFIX="$prefix" cargo +stable install bpf-linker@0.13.0 --locked \
    --no-default-features --features "llvm-$major" --root "$tools" -q
  echo "$major" > "$tools/bpf-linker.llvm"
}

main() {
  need_root
  mkdir -p "$tools"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$bootstrap_version" ] \
     && [ -x /usr/bin/rustc ] && [ -x "$tools/bin/bpf-linker" ]; then
    apt_install   # cheap check; catches packages removed by hand
    return 0
  fi
  apt_install
  install_bpf_linker
  # cargo fmt / clippy are rustup components; present on this machine kind, add if missing.
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt >/dev/null 2>&1 || true
  echo "$bootstrap_version" > "$stamp"
  log "toolchain ready"
}

main "$@"
