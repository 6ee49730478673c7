#!/usr/bin/env bash
# Every benchmark, as ratios against baselines measured in the same run; writes bench/*.md.
# One command for issue 13's tables, in about 10 minutes on 2 cores:
#   bench/datapath.md   per-packet cost of the real programs (BPF_PROG_TEST_RUN), flow records
#   bench/dataplane.md  new connections/s, UDP 64-byte packets/s, TCP throughput between lab pods:
#                       enforced vs detached, 10 vs 10,000 policies, iptables + ipset 1k / 10k rules
#   bench/xdp.md        XDP vs TC drop rates (scripts/bench-xdp.sh, when present)
#   bench/control.md    the control plane's times and memory (scripts/bench-control.sh, when present)
#   bench/anomalies.md  anomaly detection latency and false alerts (scripts/bench-anomalies.sh): only with
#                       BENCH_ANOMALIES=1, as it runs 15 minutes or more (RUN_MINUTES, LEARNING_SECS, ...)
# A benchmark that fails is reported and the others still run; the exit code is then 1.
# Never part of scripts/test.sh. Needs root (BPF, network namespaces). Usage: bash scripts/bench.sh
# Each lab script takes BENCH_BUDGET_SECONDS (the share of the 10 minutes it should fit in) and
# its own knobs (ROUNDS, SECONDS_PER_RUN, ...; see each script's header).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, BPF)" >&2; exit 1; }
STARTED=$(date +%s)
FAILED=()
declare -A TOOK
step() { # name command...
  local t0 rc=0
  t0=$(date +%s)
  echo "== $1" >&2
  "${@:2}" || rc=$?
  TOOK[$1]=$(($(date +%s) - t0))
  if [ "$rc" != 0 ]; then
    echo "== $1 failed (exit $rc)" >&2
    FAILED+=("$1")
  fi
}

bash scripts/setup.sh
# The one release build every step uses (bench_prepare in bench-lib.sh skips its own).
cargo build --locked --release --bins
cargo build --locked --release -p bulkhead --example connrate
export BENCH_PREPARED=1
mkdir -p bench

# The flow-record rate depends on the agent code, not only the kernel: a release build.
step datapath env BULKHEAD_BENCH_REPORT="$PWD/bench/datapath.md" cargo bench --locked -p bulkhead --bench datapath
step dataplane env BENCH_BUDGET_SECONDS="${DATAPLANE_BUDGET_SECONDS:-300}" bash scripts/bench-dataplane.sh
# Written by other changes; run when they are in the tree.
if [ -f scripts/bench-xdp.sh ]; then
  step xdp env BENCH_BUDGET_SECONDS="${XDP_BUDGET_SECONDS:-90}" bash scripts/bench-xdp.sh
fi
# The control plane at 1k × 1k, 10k × 1k and 10k × 10k (CONTROL_ROUNDS policy changes each),
# and the agent memory each pod adds (RSS at 10k pods less RSS at 1k, over the 9,000 between).
control() {
  local bh=${CARGO_TARGET_DIR:-$PWD/target}/release/bulkhead rows
  rows=$(for spec in "1000 1000" "10000 1000" "10000 10000"; do
    # shellcheck disable=SC2086 # two words: pods and policies
    bash scripts/bench-control.sh "$bh" $spec "${CONTROL_ROUNDS:-9}" 2>/dev/null || return 1
  done) || return 1
  {
    echo "# Control plane"
    echo
    echo "\`bash scripts/bench.sh\` (scripts/bench-control.sh, release build): one agent with the files source, 20 of"
    echo "its pods added one by one over its socket on real veths, then bursts of 20 and 100 simultaneous ADDs;"
    echo "the other pods on 50 other nodes. A policy change is a new file, then Reload (answered once the"
    echo "maps hold it). Times from one Python process; RSS after the bursts."
    echo
    bash scripts/bench-control.sh --header
    echo "$rows"
    echo
    echo "$rows" | awk -F'|' 'NR == 1 {a = $8 + 0} NR == 2 {b = $8 + 0} END {printf "Agent memory per pod (RSS at 10k × 1k less 1k × 1k, over 9,000 pods): %.1f KiB\n", (b - a) * 1024 / 9000}'
  } >bench/control.md
}
step control control
# Optional: longer than this script's 10 minutes.
if [ "${BENCH_ANOMALIES:-}" = 1 ]; then
  step anomalies bash scripts/bench-anomalies.sh
fi

echo >&2
for s in "${!TOOK[@]}"; do echo "  $s: ${TOOK[$s]} s" >&2; done
echo "bench.sh: $(($(date +%s) - STARTED)) s in all; reports in bench/" >&2
if [ "${#FAILED[@]}" != 0 ]; then
  echo "failed: ${FAILED[*]}" >&2
  exit 1
fi
