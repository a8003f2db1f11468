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
bootstrap_version=6

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
  # deploy/ checks: the venv for the Python tools below, and the libraries cloud-init's schema
  # validator imports (plain Python modules; no services)
  python3-venv python3-yaml python3-jsonschema python3-jinja2 python3-configobj
  python3-jsonpatch python3-requests python3-netifaces
)

# Debian packages whose programs the tests run but which must not be installed as packages:
# `prometheus` (for promtool) would enable and start a Prometheus server, and `cloud-init`
# (for `cloud-init schema`) would enable its boot-time services, which reconfigure the machine
# they run on. Each is fetched with `apt-get download` (checked against the archive's signed
# index like any install) and unpacked under .tools/deb/ without running its maintainer
# scripts; .tools/bin gets a launcher for the one program the tests need.
EXTRACTED_PACKAGES=(prometheus cloud-init)

# Python tools for the deploy/ template checks: a venv of Debian's python3 under .tools/venv,
# pinned with hashes (Debian 12 on x86_64: CPython 3.11 wheels).
PY_REQUIREMENTS="$top/scripts/tools-requirements.txt"

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

# FRR for the BGP announcement test (nat-agent/tests/e2e_bgp.rs runs its own zebra and bgpd in
# lab namespaces). Installed as a package, because its daemons need its libraries and the frr
# user, but with service start-up denied for the install (policy-rc.d), so no FRR starts on
# this machine; its boot-time service is disabled too where systemd runs.
install_frr() {
  dpkg-query -W -f='${Status}' frr 2>/dev/null | grep -q 'install ok installed' && return 0
  log "installing frr (its services kept off)"
  local policy=/usr/sbin/policy-rc.d own_policy=0 rc=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# bootstrap.sh: no service starts while frr installs\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    own_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null || rc=$?
  [ "$rc" -eq 0 ] && { apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends frr >/dev/null || rc=$?; }
  [ "$own_policy" -eq 1 ] && rm -f "$policy"
  [ "$rc" -eq 0 ] || { log "installing frr failed"; exit "$rc"; }
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now frr.service >/dev/null 2>&1 || true
  fi
}

# Unpacks each of EXTRACTED_PACKAGES into .tools/deb/<package> (again when the archive has a
# newer version) and writes the launchers into .tools/bin.
extract_packages() {
  local p version dir tmp
  mkdir -p "$tools/deb" "$tools/bin"
  for p in "${EXTRACTED_PACKAGES[@]}"; do
    version=$(apt-cache policy "$p" | sed -n 's/^  Candidate: //p')
    if [ -z "$version" ] || [ "$version" = "(none)" ]; then
      apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
      version=$(apt-cache policy "$p" | sed -n 's/^  Candidate: //p')
    fi
    if [ -z "$version" ] || [ "$version" = "(none)" ]; then
      log "Debian package $p not found"
      exit 1
    fi
    dir="$tools/deb/$p"
    if [ -f "$dir.version" ] && [ "$(cat "$dir.version")" = "$version" ]; then
      continue
    fi
    log "unpacking Debian package $p $version into $dir (not installed)"
    tmp=$(mktemp -d)
    chmod 0755 "$tmp"   # apt fetches as _apt, which must be able to write there
    chown _apt "$tmp" 2>/dev/null || true
    (cd "$tmp" && apt-get -o DPkg::Lock::Timeout=600 download -q "$p=$version" >/dev/null)
    rm -rf "$dir"
    mkdir -p "$dir"
    dpkg-deb -x "$tmp"/*.deb "$dir"
    rm -rf "$tmp"
    echo "$version" > "$dir.version"
  done
  ln -sfn "$tools/deb/prometheus/usr/bin/promtool" "$tools/bin/promtool"
  {
    echo '#!/bin/sh'
    echo '# cloud-init from the unpacked Debian package (scripts/bootstrap.sh), on Debian python3.'
    echo "PYTHONPATH='$tools/deb/cloud-init/usr/lib/python3/dist-packages' \\"
    echo "  exec /usr/bin/python3 '$tools/deb/cloud-init/usr/bin/cloud-init' \"\$@\""
  } > "$tools/bin/cloud-init"
  chmod 0755 "$tools/bin/cloud-init"
}

# The venv for the Python tools; rebuilt when the requirements file changes.
python_tools() {
  local want
  want=$(sha256sum "$PY_REQUIREMENTS" | cut -d' ' -f1)
  if [ -x "$tools/venv/bin/python" ] && [ -f "$tools/venv.requirements" ] \
     && [ "$(cat "$tools/venv.requirements")" = "$want" ]; then
    return 0
  fi
  log "creating the Python tools venv in $tools/venv"
  rm -rf "$tools/venv"
  /usr/bin/python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install -q --disable-pip-version-check --no-deps --require-hashes \
    -r "$PY_REQUIREMENTS"
  echo "$want" > "$tools/venv.requirements"
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
     && [ -x /usr/bin/rustc ] && [ -x "$tools/bin/bpf-linker" ] \
     && [ -x "$tools/bin/promtool" ] && [ -x "$tools/bin/cloud-init" ]; then
    apt_install   # cheap check; catches packages removed by hand
    install_frr   # likewise
    python_tools  # cheap too: a hash of the requirements file
    return 0
  fi
  apt_install
  install_frr
  install_bpf_linker
  extract_packages
  python_tools
  # cargo fmt / clippy are rustup components; present on this machine kind, add if missing.
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt >/dev/null 2>&1 || true
  echo "$bootstrap_version" > "$stamp"
  log "toolchain ready"
}

main "$@"
