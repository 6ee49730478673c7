#!/usr/bin/env bash
# Installs everything Bulkhead needs on a fresh Debian machine; safe to run again.
# Both README commands call it. Never runs `rustup update`: the nightly must keep
# LLVM 22 so that bpf-linker (built against LLVM 22) can link its output.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { echo "setup.sh must run as root" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
PKGS="llvm-22-dev libpolly-22-dev libzstd-dev iproute2 bpftool iptables tcpdump clang"
# A real CNI client for the podman test (CNI backend, runc: crun refuses some cgroup setups)
# and the reference plugins (portmap) for chaining tests.
PKGS="$PKGS podman runc conmon containernetworking-plugins busybox-static"
# prometheus: the real server (and promtool) the metrics tests run against.
PKGS="$PKGS prometheus"
# nftables: `nft`, which the agent drives (JSON) for masquerade; its tests run it in netns.
PKGS="$PKGS nftables"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  log "installing apt packages:$missing"
  apt-get update -qq
  # --no-install-recommends keeps netavark out: podman then uses its CNI backend.
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# Nightly with LLVM 22 builds the eBPF crate.
if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing a nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
llvm_major=$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
if [ "$llvm_major" != "22" ]; then
  cat >&2 <<TXT
[setup] rustc +nightly reports LLVM $llvm_major, but bpf-linker here is built against LLVM 22.
[setup] Install a dated nightly that ships LLVM 22 and make it the 'nightly' toolchain, e.g.:
[setup]   rustup toolchain install nightly-2026-05-19 && rustup toolchain link nightly "\$(rustc +nightly-2026-05-19 --print sysroot)"
TXT
  exit 1
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  log "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly
fi
for c in rustfmt clippy; do
  rustup component list --installed | grep -q "^$c" || rustup component add "$c"
done

if ! command -v bpf-linker >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/bpf-linker" ]; then
  log "building bpf-linker against LLVM 22 (about a minute)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --locked --no-default-features --features llvm-22
fi
# The manifest tests (tests/tests/manifests.rs): the Kubernetes schema validator, pinned, in
# its own venv so it neither needs nor disturbs the system Python's packages.
KV_VERSION=1.37.0
KV_VENV=/opt/bulkhead-tools/venv
if [ "$(kubernetes-validate --version 2>/dev/null)" != "$KV_VERSION" ]; then
  log "installing kubernetes-validate $KV_VERSION into $KV_VENV"
  if ! python3 -m venv --clear "$KV_VENV" >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
    python3 -m venv --clear "$KV_VENV"
  fi
  "$KV_VENV/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$KV_VERSION"
  ln -sf "$KV_VENV/bin/kubernetes-validate" /usr/local/bin/kubernetes-validate
  hash -r
  [ "$(kubernetes-validate --version 2>/dev/null)" = "$KV_VERSION" ] || {
    echo "[setup] kubernetes-validate on PATH ($(command -v kubernetes-validate)) is not $KV_VERSION; put /usr/local/bin first in PATH" >&2
    exit 1
  }
fi
# `kubectl kustomize` renders manifests/ in the same tests.
if ! command -v kubectl >/dev/null 2>&1; then
  if apt-cache show google-cloud-cli-kubectl >/dev/null 2>&1; then
    log "installing kubectl (google-cloud-cli-kubectl)"
    apt-get install -y -qq --no-install-recommends google-cloud-cli-kubectl >/dev/null
  else
    cat >&2 <<TXT
[setup] kubectl is missing (the manifest tests run \`kubectl kustomize\`). Install it, e.g.
[setup]   the apt package google-cloud-cli-kubectl from the Google Cloud SDK repository, or
[setup]   https://kubernetes.io/docs/tasks/tools/install-kubectl-linux/ (any kubectl >= 1.27).
TXT
    exit 1
  fi
fi
log "ready"
