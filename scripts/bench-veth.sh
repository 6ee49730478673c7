#!/usr/bin/env bash
# Enforced vs unenforced veth path, measured with iperf3 between lab pods on one node.
# Two client/server pod pairs run side by side in one lab: pair "e" keeps Bulkhead's TC
# programs (its namespace isolated, an allow policy admitting the iperf3 port), pair "u" has
# the programs detached from its host veths — the same veths, routes and node otherwise.
# Measures: single-stream TCP and 64-byte UDP (iperf3), and new connections per second (a
# client loop that connects, reads the server's one-line greeting and resets, one at a time).
# Rounds alternate between the pairs so machine noise hits both alike; the report gives
# medians and the enforced/unenforced ratio. Usage (root): bash scripts/bench-veth.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_prepare
ROUNDS=${ROUNDS:-5}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-3}
PORT=8080
WORK=$(mktemp -d /tmp/bulkhead-bench-veth.XXXXXX)
LAB="$BH lab --lab-dir $WORK/lab"
cleanup() { bench_stop_servers "$WORK"/*.pid; $LAB down >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT

{
  printf 'apiVersion: v1\nkind: Namespace\nmetadata: {name: e}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: u}\n'
  # The server's declared port is served by the lab (its name, then close); iperf3 uses 5201.
  bench_pod client e; bench_pod server e "" "$PORT"; bench_pod client u; bench_pod server u "" "$PORT"
  # Enforced pair: both directions isolated, with rules that admit the benchmark flow.
  printf -- '---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: iperf, namespace: e}\n'
  printf 'spec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n'
  printf '  ingress: [{from: [{podSelector: {matchLabels: {role: client}}}], ports: [{port: 5201, protocol: TCP}, {port: 5201, protocol: UDP}, {port: %s, protocol: TCP}]}]\n' "$PORT"
  printf '  egress: [{to: [{podSelector: {matchLabels: {role: server}}}], ports: [{port: 5201, protocol: TCP}, {port: 5201, protocol: UDP}, {port: %s, protocol: TCP}]}]\n' "$PORT"
} >"$WORK/bench.yaml"
$LAB up -f "$WORK/bench.yaml" >/dev/null
NODE_NS=$($LAB status -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nodes"][0]["netns"])')
E_SERVER=$(bench_ip_of e server); U_SERVER=$(bench_ip_of u server)

# Detach the programs from the unenforced pair's host veths: each veth is found by the
# /32 route the CNI plugin installed for its pod.
for pip in "$(bench_ip_of u client)" "$U_SERVER"; do
  dev=$(ip -n "$NODE_NS" -4 route show "$pip/32" | awk '{for (i=1;i<NF;i++) if ($i=="dev") print $(i+1)}')
  [ -n "$dev" ] || { echo "no route to $pip" >&2; exit 1; }
  tc -n "$NODE_NS" qdisc del dev "$dev" clsact
done

bench_iperf3_server e/server "$WORK/e.pid"
bench_iperf3_server u/server "$WORK/u.pid"
sleep 0.5

measure() { # pair server-ip mode -> one number
  case $3 in
    conn) $LAB exec "$1/client" -- python3 -c "$BENCH_CONNECT_LOOP" "$2" "$PORT" "$SECONDS_PER_RUN" ;;
    *) bench_iperf3 "$1/client" "$2" "$3" "$SECONDS_PER_RUN" ;;
  esac
}

declare -A results
for mode in tcp udp64 conn; do
  : >"$WORK/e.$mode"; : >"$WORK/u.$mode"
  for _ in $(seq "$ROUNDS"); do
    measure e "$E_SERVER" "$mode" >>"$WORK/e.$mode"
    measure u "$U_SERVER" "$mode" >>"$WORK/u.$mode"
  done
  results[e.$mode]=$(bench_median <"$WORK/e.$mode")
  results[u.$mode]=$(bench_median <"$WORK/u.$mode")
done

mkdir -p bench
python3 - "${results[e.tcp]}" "${results[u.tcp]}" "${results[e.udp64]}" "${results[u.udp64]}" \
  "${results[e.conn]}" "${results[u.conn]}" "$ROUNDS" "$SECONDS_PER_RUN" >bench/veth.md <<'PY'
import sys
et, ut, eu, uu, ec, uc = map(float, sys.argv[1:7])
rounds, secs = sys.argv[7], sys.argv[8]
print("# Enforced vs unenforced veth path\n")
print(f"`bash scripts/bench-veth.sh` — iperf3 between two lab pods on one node, {rounds} alternating rounds of {secs} s per")
print("mode, medians. Enforced: Bulkhead's TC programs on both host veths, both pods isolated, an allow policy for the")
print("flow. Unenforced: the same lab, a second pod pair with the programs detached. Established packets take the")
print("conntrack fast path; UDP with 64-byte datagrams is a new flow once, then established. New connections: a")
print("Python client loop that connects, reads the server's one-line greeting and resets (SO_LINGER 0), one at a time.\n")
print("| mode | enforced | unenforced | enforced / unenforced |")
print("|---|---:|---:|---:|")
print(f"| TCP, 1 stream (Gbit/s) | {et/1e9:.2f} | {ut/1e9:.2f} | {et/ut:.3f} |")
print(f"| UDP, 64-byte datagrams (packets/s received) | {eu:,.0f} | {uu:,.0f} | {eu/uu:.3f} |")
print(f"| new connections/s | {ec:,.0f} | {uc:,.0f} | {ec/uc:.3f} |")
PY
cat bench/veth.md
