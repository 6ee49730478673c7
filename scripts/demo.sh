#!/usr/bin/env bash
# The README's main command: build, bring up the built-in demo lab, and show the
# connectivity matrix the policies produce. `bulkhead lab down` removes it all.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "the lab needs root (network namespaces, BPF)" >&2; exit 1; }
bash scripts/setup.sh
cargo build --locked --release --bins
BH=target/release/bulkhead
$BH lab down >/dev/null 2>&1 || true
$BH lab up
echo
echo "== pods"
$BH lab pods -o json
for port in 80 8080 5432 9090; do
  echo
  echo "== probe TCP/$port (. connected, X dropped by policy, r refused: nothing listens)"
  $BH lab probe --port "$port"
done
echo
echo "== every pod has a ClusterIP Service of its own"
$BH lab services
echo
echo "== probe TCP/5432 through those Services (translated before policy: the same matrix as above)"
$BH lab probe --port 5432 --via service
echo
echo "The lab is still running. Try: $BH lab exec frontend/web -- ip addr; then: $BH lab down"
