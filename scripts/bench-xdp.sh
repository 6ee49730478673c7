#!/usr/bin/env bash
# XDP vs TC for the same drop (issue 13.4), in one lab, interleaved rounds:
#  1. discard rate: pod x/flood (egress isolated, nothing allowed) floods a denied UDP port of
#     x/sink with 64-byte raw frames (scripts/xdp-flood.c: AF_PACKET, qdisc bypassed) pinned
#     to one CPU; the sender and the drop share that core (veth delivers on the sending CPU).
#     Rate = packets the datapath dropped per second (bulkhead_drops_total policy_denied).
#     "xdp": xdp_from_pod on the flood pod's host veth (native mode); "tc": detached, so
#     from_pod (TC) makes the same drop.
#  2. a neighbour pair (n/client -> n/server, allowed) runs iperf3 TCP during that flood,
#     XDP on vs off, and without a flood for reference.
# Writes bench/xdp.md. Usage (root): bash scripts/bench-xdp.sh; BH=path/to/bulkhead skips
# the release build (any build: the datapath object is always built optimised).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
if [ -z "${BH:-}" ]; then bench_prepare; fi
ROUNDS=${ROUNDS:-5}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-3}
FLOOD_CPU=${FLOOD_CPU:-1}
WORK=$(mktemp -d /tmp/bulkhead-bench-xdp.XXXXXX)
LAB="$BH lab --lab-dir $WORK/lab"
cleanup() { bench_stop_servers "$WORK"/*.pid; $LAB down >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT
gcc -O2 -o "$WORK/flood" scripts/xdp-flood.c

{
  printf 'apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: n}\n'
  bench_pod flood x; bench_pod sink x; bench_pod client n; bench_pod server n
  # x: every pod isolated both ways, nothing allowed.
  printf -- '---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\n'
  printf 'spec: {podSelector: {}, policyTypes: [Ingress, Egress]}\n'
  printf -- '---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: iperf, namespace: n}\n'
  printf 'spec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n'
  printf '  ingress: [{from: [{podSelector: {matchLabels: {role: client}}}], ports: [{port: 5201, protocol: TCP}]}]\n'
  printf '  egress: [{to: [{podSelector: {matchLabels: {role: server}}}], ports: [{port: 5201, protocol: TCP}]}]\n'
} >"$WORK/bench.yaml"
$LAB up -f "$WORK/bench.yaml" >/dev/null
STATUS=$($LAB status -o json)
NODE_NS=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["nodes"][0]["netns"])' <<<"$STATUS")
METRICS=$(python3 -c 'import json,sys; n=json.load(sys.stdin)["nodes"][0]; print(n.get("metricsURL") or "")' <<<"$STATUS")
[ -n "$METRICS" ] || { echo "no metrics URL in lab status: $STATUS" >&2; exit 1; }
FLOOD_IP=$(bench_ip_of x flood); SINK_IP=$(bench_ip_of x sink); SERVER_IP=$(bench_ip_of n server)
HOST_DEV=$(ip -n "$NODE_NS" -4 route show "$FLOOD_IP/32" | awk '{for (i=1;i<NF;i++) if ($i=="dev") print $(i+1)}')
HOST_MAC=$(ip -n "$NODE_NS" -j link show "$HOST_DEV" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["address"])')
POD_MAC=$($LAB exec x/flood -- ip -j link show eth0 | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["address"])')
XDP_ID=$(ip -n "$NODE_NS" -j -d link show "$HOST_DEV" | python3 -c '
import json,sys
x=json.load(sys.stdin)[0].get("xdp") or {}
assert x.get("mode") == 1, "xdp_from_pod is not attached in native (driver) mode: %r" % x
print(x["prog"]["id"])')

xdp_on() { ip netns exec "$NODE_NS" bpftool net attach xdpdrv id "$XDP_ID" dev "$HOST_DEV" overwrite; }
xdp_off() { ip -n "$NODE_NS" link set dev "$HOST_DEV" xdpdrv off; }
dropped() { # policy_denied drops, egress, so far
  curl -sf "$METRICS" | awk '/^bulkhead_drops_total\{/ && /reason="policy_denied"/ && /direction="egress"/ {print $2}' | head -1
}
flood() { # seconds
  $LAB exec x/flood -- taskset -c "$FLOOD_CPU" "$WORK/flood" eth0 "$HOST_MAC" "$POD_MAC" "$FLOOD_IP" "$SINK_IP" 9 "$1"
}
discard_rate() {
  local before after t0 t1
  before=$(dropped); t0=$(date +%s.%N)
  flood "$SECONDS_PER_RUN" >/dev/null
  t1=$(date +%s.%N); after=$(dropped)
  python3 -c "print(($after - ${before:-0}) / ($t1 - $t0))"
}
neighbour() { # with-flood|no-flood
  local pid=
  if [ "$1" = with-flood ]; then flood $((SECONDS_PER_RUN + 2)) >/dev/null & pid=$!; sleep 0.5; fi
  bench_iperf3 n/client "$SERVER_IP" tcp "$SECONDS_PER_RUN"
  if [ -n "$pid" ]; then wait "$pid"; fi
}

bench_iperf3_server n/server "$WORK/n.pid"
sleep 0.5
: >"$WORK/rate.xdp"; : >"$WORK/rate.tc"; : >"$WORK/nb.xdp"; : >"$WORK/nb.tc"; : >"$WORK/nb.none"
for _ in $(seq "$ROUNDS"); do
  xdp_on; discard_rate >>"$WORK/rate.xdp"
  xdp_off; discard_rate >>"$WORK/rate.tc"
  xdp_on; neighbour with-flood >>"$WORK/nb.xdp"
  xdp_off; neighbour with-flood >>"$WORK/nb.tc"
  neighbour no-flood >>"$WORK/nb.none"
done
# Where the flood CPU's time goes in each mode (perf: the top symbols, self time).
profile() { # mode
  perf record -q -C "$FLOOD_CPU" -o "$WORK/perf.$1" -- sleep 2 >/dev/null 2>&1 & local p=$!
  flood 2 >/dev/null; wait "$p" || true
  # Only the flood's own samples (its sends and the softirq drops it runs): the CPU is shared.
  perf report -q -i "$WORK/perf.$1" --comms flood --no-children --sort symbol --stdio 2>/dev/null |
    awk 'NF && $1 ~ /%$/ && n < 14 {print $1, $2, $3; n++}' >"$WORK/top.$1" || true
}
xdp_on; profile xdp
xdp_off; profile tc
xdp_on
XDP_DROPS=$(curl -sf "$METRICS" | awk '/^bulkhead_xdp_drops_total\{/ && /policy_denied/ {print $2}')

mkdir -p bench
python3 - "$(bench_median <"$WORK/rate.xdp")" "$(bench_median <"$WORK/rate.tc")" \
  "$(bench_median <"$WORK/nb.xdp")" "$(bench_median <"$WORK/nb.tc")" "$(bench_median <"$WORK/nb.none")" \
  "$ROUNDS" "$SECONDS_PER_RUN" "$(uname -r)" "${XDP_DROPS:-0}" >bench/xdp.md <<'PY'
import sys
rx, rt, nx, nt, nn = map(float, sys.argv[1:6])
rounds, secs, kernel, xdrops = sys.argv[6], sys.argv[7], sys.argv[8], sys.argv[9]
print(f"""# XDP vs TC: the same drop

`bash scripts/bench-xdp.sh` (kernel {kernel}; {rounds} interleaved rounds of {secs} s, medians).
A pod whose egress policy allows nothing floods a denied UDP port with 64-byte raw frames from
one CPU (AF_PACKET, qdisc bypassed); the veth delivers on the sending CPU, so sending and
dropping share that core. `xdp`: `xdp_from_pod` in native (driver) mode on the pod's host
veth drops the flood before an skb reaches the stack; `tc`: XDP detached, `from_pod` drops it.
Both count it as `bulkhead_drops_total{{reason="policy_denied"}}` (XDP drops counted over the
run: {xdrops}).

| | XDP | TC | XDP / TC |
| --- | --- | --- | --- |
| packets/s one core discards | {rx:,.0f} | {rt:,.0f} | {rx/rt:.2f} |
| neighbour pod TCP throughput during the flood (Gbit/s) | {nx/1e9:.2f} | {nt/1e9:.2f} | {nx/nt:.2f} |

Neighbour pod TCP throughput without a flood: {nn/1e9:.2f} Gbit/s (XDP on); during the flood
it keeps {nx/nn:.2f} of it with XDP, {nt/nn:.2f} with TC.
""")
PY
for m in xdp tc; do
  printf '\nProfile of the flood process, `%s` (perf on its CPU, self time, top symbols):\n\n```\n' "$m"
  cat "$WORK/top.$m"
  printf '```\n'
done >>bench/xdp.md
cat bench/xdp.md
