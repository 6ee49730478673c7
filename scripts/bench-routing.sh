#!/usr/bin/env bash
# Pod-to-pod across nodes, native routes vs the VXLAN overlay, each against the same-node path.
# Two labs of two nodes run side by side, one per routing mode; in each, a server pod on node0,
# a client on node0 ("same") and one on node1 ("cross"), all under an allow-all policy so the
# datapath's policy lookups are on the path as in any enforcing cluster. Two measures:
# single-stream TCP throughput (iperf3), and new connections per second (a client loop that
# connects, reads the server's short reply to EOF and closes, one connection at a time).
# Rounds visit the four paths in turn, reversing the order every other round, so machine
# noise falls on all of them alike; the report gives medians and ratios.
# Usage (root): bash scripts/bench-routing.sh   (ROUNDS, SECONDS_PER_RUN to change the defaults)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_prepare
ROUNDS=${ROUNDS:-5}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-3}
MODES=(native vxlan)
# The server pod's declared port: the lab answers each connection with the pod's name, then
# closes. The server closing first keeps TIME_WAIT off the client, so its ephemeral ports
# never run out however many connections a run makes.
PORT=8080
WORK=$(mktemp -d /tmp/bulkhead-bench-routing.XXXXXX)
lab_for() { LAB="$BH lab --lab-dir $WORK/$1"; }
cleanup() {
  bench_stop_servers "$WORK"/*.pid
  for m in "${MODES[@]}"; do
    lab_for "$m"
    $LAB down >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

{
  printf 'apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n'
  bench_pod server bench node0 "$PORT"; bench_pod same bench node0; bench_pod cross bench node1
  printf -- '---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-all, namespace: bench}\n'
  printf 'spec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: [{}]\n  egress: [{}]\n'
} >"$WORK/bench.yaml"

# Connections per second from one client, one at a time, for SECONDS; fails on a bad reply.
CONNECT_LOOP='
import socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
n, start = 0, time.monotonic()
while time.monotonic() - start < secs:
    s = socket.create_connection((host, port), timeout=5)
    reply = b""
    while chunk := s.recv(256):
        reply += chunk
    s.close()
    if not reply.endswith(b"\n"):
        sys.exit(f"bad reply {reply!r}")
    n += 1
print(n / (time.monotonic() - start))'

# Waits until a client reaches the server's port: the agents route between nodes on their own.
WAIT_LOOP='
import socket, sys, time
deadline = time.monotonic() + 30
while True:
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
        break
    except OSError as e:
        if time.monotonic() > deadline:
            sys.exit(f"{sys.argv[1]}:{sys.argv[2]} unreachable after 30 s: {e}")
        time.sleep(0.2)'

declare -A SERVER
for m in "${MODES[@]}"; do
  lab_for "$m"
  $LAB up --nodes 2 --routing "$m" -f "$WORK/bench.yaml" >/dev/null
  SERVER[$m]=$(bench_ip_of bench server)
  for c in same cross; do
    $LAB exec "bench/$c" -- python3 -c "$WAIT_LOOP" "${SERVER[$m]}" "$PORT"
  done
  bench_iperf3_server bench/server "$WORK/$m.pid"
done
sleep 0.5
MTU=$(for m in "${MODES[@]}"; do
  lab_for "$m"
  # sysfs shows the mounting namespace's links, so ask netlink from inside the pod.
  printf '%s ' "$m" "$($LAB exec bench/cross -- ip -o link show dev eth0 | sed -n 's/.* mtu \([0-9]*\).*/\1/p')"
done)

measure() { # mode client metric -> one number
  lab_for "$1"
  case $3 in
    tcp) bench_iperf3 "bench/$2" "${SERVER[$1]}" tcp "$SECONDS_PER_RUN" ;;
    conn) $LAB exec "bench/$2" -- python3 -c "$CONNECT_LOOP" "${SERVER[$1]}" "$PORT" "$SECONDS_PER_RUN" ;;
  esac
}

PATHS=(native.same native.cross vxlan.same vxlan.cross)
for metric in tcp conn; do
  for p in "${PATHS[@]}"; do : >"$WORK/$p.$metric"; done
  for round in $(seq "$ROUNDS"); do
    order=("${PATHS[@]}")
    if [ $((round % 2)) = 0 ]; then order=(vxlan.cross vxlan.same native.cross native.same); fi
    for p in "${order[@]}"; do
      measure "${p%.*}" "${p#*.}" "$metric" >>"$WORK/$p.$metric"
    done
  done
done

mkdir -p bench
MACHINE="$(nproc) CPUs, Linux $(uname -r)"
python3 - "$WORK" "$ROUNDS" "$SECONDS_PER_RUN" "$MTU" "$MACHINE" >bench/routing.md <<'PY'
import statistics, sys
work, rounds, secs, mtu, machine = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(), sys.argv[5]
mtu = dict(zip(mtu[::2], mtu[1::2]))
paths = {"ns": "native.same", "nc": "native.cross", "vs": "vxlan.same", "vc": "vxlan.cross"}
samples = {(k, m): [float(x) for x in open(f"{work}/{p}.{m}").read().split()]
           for k, p in paths.items() for m in ("tcp", "conn")}
# The lower middle of an even count, as bench_median.
tcp = {k: statistics.median_low(samples[(k, "tcp")]) for k in paths}
conn = {k: statistics.median_low(samples[(k, "conn")]) for k in paths}
print("# Pod to pod across nodes: native routing vs VXLAN\n")
print("`bash scripts/bench-routing.sh` — two labs of two nodes side by side, one routing natively, one over the")
print(f"VXLAN overlay (pod MTU {mtu['native']} native, {mtu['vxlan']} vxlan). In each: a server pod on node0, a client on")
print("node0 (same node) and one on node1 (cross node), all under an allow-all policy, so the TC programs and")
print(f"their policy lookups are on every path. {rounds} rounds of {secs} s per measure, visiting the four paths in turn")
print("(order reversed every other round); medians. TCP: iperf3, one stream. Connections: one client loop that")
print("connects, reads the server's one-line reply to EOF and closes, one connection at a time (in Python: the")
print(f"client's own cost is in every number alike). Machine: {machine}.\n")
print("| measure | mode | same node | cross node | cross / same |")
print("|---|---|---:|---:|---:|")
for name, d, fmt in (("TCP, 1 stream (Gbit/s)", tcp, lambda x: f"{x/1e9:.2f}"),
                     ("new connections/s", conn, lambda x: f"{x:,.0f}")):
    for mode, k in (("native", "n"), ("vxlan", "v")):
        s, c = d[k + "s"], d[k + "c"]
        print(f"| {name} | {mode} | {fmt(s)} | {fmt(c)} | {c/s:.3f} |")
print("\n| measure | vxlan / native, cross node | vxlan / native, same node |")
print("|---|---:|---:|")
print(f"| TCP, 1 stream | {tcp['vc']/tcp['nc']:.3f} | {tcp['vs']/tcp['ns']:.3f} |")
print(f"| new connections/s | {conn['vc']/conn['nc']:.3f} | {conn['vs']/conn['ns']:.3f} |")
print("\nSpread, min – max over the rounds:\n")
print("| path | TCP (Gbit/s) | new connections/s |")
print("|---|---:|---:|")
for k, p in paths.items():
    t, c = samples[(k, "tcp")], samples[(k, "conn")]
    print(f"| {p} | {min(t)/1e9:.2f} – {max(t)/1e9:.2f} | {min(c):,.0f} – {max(c):,.0f} |")
PY
cat bench/routing.md
