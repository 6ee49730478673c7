#!/usr/bin/env bash
# The README's test command: installs prerequisites, then runs every test tier as root —
# unit tests, datapath tests on crafted packets (BPF_PROG_TEST_RUN), privileged netns tests
# and the lab end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "tests need root (network namespaces, BPF)" >&2; exit 1; }
bash scripts/setup.sh
# The e2e tests drive the real binaries.
cargo build --locked --bins
cargo test --locked --workspace --exclude bulkhead-ebpf -- --test-threads="${TEST_THREADS:-4}"
