#!/usr/bin/env bash
# Runs every `cargo fuzz` target in fuzz/ for FUZZ_SECONDS each (default 20; CI runs 15)
# and prints each target's executions; exits non-zero on the first crash, leaving the
# reproducer under $FUZZ_HOME/artifacts/<target>/ (replay: `cargo +nightly fuzz run
# --fuzz-dir fuzz <target> <file>`). Installs cargo-fuzz when missing. Root: the
# datapath target loads the real programs and runs frames through BPF_PROG_TEST_RUN.
#
#   FUZZ_SECONDS=300 bash scripts/fuzz.sh               # a longer run of every target
#   FUZZ_SECONDS=600 bash scripts/fuzz.sh manifests     # one target
#
# Builds and the corpora live outside the clone, in FUZZ_HOME (default
# /var/tmp/bulkhead-fuzz), so that later runs rebuild only what changed and start from
# what earlier runs found; `rm -rf` it to start afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "fuzz.sh needs root (the datapath target runs BPF programs)" >&2; exit 1; }

SECONDS_EACH="${FUZZ_SECONDS:-20}"
FUZZ_HOME="${FUZZ_HOME:-/var/tmp/bulkhead-fuzz}"
ALL_TARGETS="cni_config manifests socket_protocol datapath_parser"
TARGETS="${*:-$ALL_TARGETS}"
log() { printf '[fuzz] %s\n' "$*" >&2; }

# cargo-fuzz builds with the nightly toolchain, which setup.sh provides (and never updates).
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

mkdir -p "$FUZZ_HOME"
# Codegen units: a few times faster to build than cargo-fuzz's default of 1, for a
# slightly slower fuzzer — the right trade for short runs on small CI machines.
build=(cargo +nightly fuzz build --fuzz-dir fuzz --target-dir "$FUZZ_HOME/target" --codegen-units 16)
log "building the fuzz targets in $FUZZ_HOME/target"
# fuzz/Cargo.lock pins what the workspace's Cargo.lock pins (aya-build 0.2.0 among them).
# cargo-fuzz has no --locked: a build that had to change the lock fails as --locked would.
lock_before=$(sha256sum fuzz/Cargo.lock)
"${build[@]}"
if [ "$(sha256sum fuzz/Cargo.lock)" != "$lock_before" ]; then
  echo "[fuzz] fuzz/Cargo.lock was out of date (a dependency changed?): commit the updated one" >&2
  exit 1
fi

bin_dir="$FUZZ_HOME/target/x86_64-unknown-linux-gnu/release"
status=0
for target in $TARGETS; do
  corpus="$FUZZ_HOME/corpus/$target"
  artifacts="$FUZZ_HOME/artifacts/$target"
  mkdir -p "$corpus" "$artifacts"
  seeds=()
  [ -d "fuzz/seeds/$target" ] && seeds+=("fuzz/seeds/$target")
  dict=()
  [ -f "fuzz/dicts/$target.dict" ] && dict+=("-dict=fuzz/dicts/$target.dict")
  out="$FUZZ_HOME/$target.log"
  log "$target: ${SECONDS_EACH}s"
  set +e
  # -rss_limit_mb/-malloc_limit_mb: bounded memory is part of what is checked.
  "$bin_dir/$target" "$corpus" "${seeds[@]}" "${dict[@]}" \
    -max_total_time="$SECONDS_EACH" -rss_limit_mb=1024 -malloc_limit_mb=256 -max_len=4096 \
    -artifact_prefix="$artifacts/" -print_final_stats=1 >"$out" 2>&1
  rc=$?
  set -e
  # What a crashed datapath run leaves pinned.
  rm -rf /sys/fs/bpf/bulkhead-fuzz-* 2>/dev/null || true
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out" | tail -1)
  units=$(find "$corpus" -type f | wc -l)
  if [ "$rc" = 0 ]; then
    printf '[fuzz] %-16s ok      %10s executions (%s/s), corpus %s\n' "$target" "${execs:-?}" "${rate:-?}" "$units"
  else
    printf '[fuzz] %-16s FAILED  %10s executions (exit %s); log %s, reproducer in %s\n' \
      "$target" "${execs:-?}" "$rc" "$out" "$artifacts" >&2
    grep -E -m1 -A12 "panicked|ERROR: libFuzzer|SUMMARY" "$out" >&2 || tail -30 "$out" >&2
    status=1
  fi
done
exit "$status"
