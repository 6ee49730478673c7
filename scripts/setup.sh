#!/usr/bin/env bash
# Installs everything Bulkhead needs on a fresh Debian machine; safe to run again.
# Both README commands call it. Never runs `rustup update`: the nightly must keep
# LLVM 22 so that bpf-linker (built against LLVM 22) can link its output.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { echo "setup.sh must run as root" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
# prometheus: the real server (and promtool) the metrics tests run against.
PKGS="llvm-22-dev libpolly-22-dev libzstd-dev iproute2 bpftool iptables tcpdump clang prometheus"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  log "installing apt packages:$missing"
  apt-get update -qq
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
log "ready"
