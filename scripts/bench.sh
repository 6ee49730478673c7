#!/usr/bin/env bash
# Benchmarks, as ratios against baselines measured in the same run; writes bench/*.md.
# Needs root (BPF). Usage: bash scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p bench
# Release build: the flow-record rate depends on the agent code, not only the kernel.
BULKHEAD_BENCH_REPORT="$PWD/bench/datapath.md" cargo bench --locked -p bulkhead --bench datapath
