#!/usr/bin/env bash
# Benchmarks, as ratios against baselines measured in the same run; writes bench/*.md.
# Needs root (BPF). Usage: bash scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p bench
# The kernel side is what is measured; the user-space profile only affects setup time.
BULKHEAD_BENCH_REPORT="$PWD/bench/datapath.md" cargo bench --locked --profile dev -p bulkhead --bench datapath
