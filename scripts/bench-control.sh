#!/usr/bin/env bash
# Control-plane benchmark: one real `bulkhead agent` (files source) in a network namespace of
# its own, fed PODS pods (140 on its node: 20 added one by one over the agent socket on real
# veths, then bursts of 20 and 100 simultaneous ADDs; the rest on other nodes, with IPs) and
# POLICIES NetworkPolicies. Prints one markdown row: start -> maps programmed, one policy
# change end to end (a new file, then `Reload`, answered once the maps hold it; median of
# ROUNDS), one ADD, the bursts, agent RSS and peak (scripts/bench-control-timings.py times).
#
# Usage (root): bash scripts/bench-control.sh BULKHEAD_BINARY PODS POLICIES [ROUNDS]
# (BENCH_AGENT_WRAP="perf record -g -o FILE" profiles the agent.)
# Reused by the benchmark command; prints the header with `--header`.
set -euo pipefail

if [ "${1:-}" = --header ]; then
  echo "| pods × policies | start → maps programmed | one policy change (median) | one ADD (median of 20) | 20 simultaneous ADDs (median / slowest) | 100 simultaneous ADDs (median / slowest) | agent RSS | peak RSS |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, BPF)" >&2; exit 1; }
BIN=$(readlink -f "$1")
PODS=$2
POLICIES=$3
ROUNDS=${4:-7}
LOCAL=20

ID="bhctl$$"
WORK=$(mktemp -d "/tmp/$ID.XXXX")
PIN="/sys/fs/bpf/$ID"
AGENT_PID=""
cleanup() {
  if [ -n "$AGENT_PID" ]; then
    kill -TERM "$AGENT_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$AGENT_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$AGENT_PID" 2>/dev/null || true
  fi
  # Under BENCH_AGENT_WRAP the PID above is the wrapper's: anything left in the namespace goes too.
  ip netns pids "$ID" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
  ip netns del "$ID" 2>/dev/null || true
  rm -rf "$PIN" "$WORK"
}
trap cleanup EXIT
ip netns add "$ID"
ip -n "$ID" link set lo up

python3 - "$WORK/manifests" "$PODS" "$POLICIES" "$((LOCAL + 120))" <<'EOF'
import os, sys
out, pods, policies, local = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
os.makedirs(out)
# 10 namespaces, 100 apps; pods of one app share their labels (as a Deployment's do).
def ns(i): return f"ns{i % 10}"
def pod(i):
    node = "bench" if i < local else f"node{1 + i % 50}"
    ip = f"10.200.0.{10 + i}" if i < local else f"10.{201 + i // 60000}.{(i // 250) % 240}.{1 + i % 250}"
    return (f"---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: {ns(i)}, "
            f"labels: {{app: app{i % 100}, tier: t{i % 3}}}}}\n"
            f"spec: {{nodeName: {node}, containers: [{{name: c, image: x, ports: [{{name: http, containerPort: 80}}]}}]}}\n"
            f"status: {{podIP: {ip}}}\n")
def policy(j):
    return (f"---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np{j}, namespace: {ns(j)}}}\n"
            f"spec:\n  podSelector: {{matchLabels: {{app: app{j % 100}}}}}\n"
            f"  ingress:\n  - from:\n    - podSelector: {{matchLabels: {{app: app{(j * 7 + 1) % 100}}}}}\n"
            f"      namespaceSelector: {{}}\n    ports: [{{port: http}}, {{port: {1000 + j % 1000}}}]\n")
def write(name, docs):
    with open(os.path.join(out, name), "w") as f:
        f.write("".join(docs))
write("namespaces.yaml", [f"---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{k}, labels: {{team: t{k}}}}}\n" for k in range(10)])
for start in range(0, pods, 100):
    write(f"pods-{start // 100:04}.yaml", [pod(i) for i in range(start, min(pods, start + 100))])
for start in range(0, policies, 100):
    write(f"policies-{start // 100:04}.yaml", [policy(j) for j in range(start, min(policies, start + 100))])
EOF

start=$(date +%s.%N)
# BENCH_AGENT_WRAP: a command to run the agent under, e.g. "perf record -g -o /tmp/agent.perf".
# shellcheck disable=SC2086
ip netns exec "$ID" ${BENCH_AGENT_WRAP:-} "$BIN" agent --node-name bench --manifests "$WORK/manifests" --state-dir "$WORK/state" \
  --bpffs "$PIN" --pod-cidr 10.200.0.0/24 --routing none --metrics-address none >"$WORK/agent.log" 2>&1 &
AGENT_PID=$!

# One request to the agent socket; prints the JSON answer.
call() {
  python3 - "$WORK/state/agent.sock" "$1" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(600)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
buf = b""
while not buf.endswith(b"\n"):
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
print(buf.decode().strip())
EOF
}
status() { call '{"op":"status"}' 2>/dev/null || true; }

until status | grep -q '"ready":true'; do
  kill -0 "$AGENT_PID" 2>/dev/null || { cat "$WORK/agent.log" >&2; echo "agent exited" >&2; exit 1; }
  sleep 0.05
done
ready=$(date +%s.%N)

# The timed requests, from one Python process (see the script for what each is).
python3 "$(dirname "$0")/bench-control-timings.py" "$WORK/state/agent.sock" "$ID" "$WORK/manifests" "$LOCAL" "$ROUNDS" >"$WORK/times"
read -r change add b20 b20max b100 b100max <"$WORK/times"

rss=$(awk '/^VmRSS/ {print $2}' "/proc/$AGENT_PID/status")
hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$AGENT_PID/status")
startup=$(echo "$ready - $start" | bc -l)
printf '| %s × %s | %.2f s | %s ms | %s ms | %s / %s ms | %s / %s ms | %.1f MB | %.1f MB |\n' "$PODS" "$POLICIES" "$startup" \
  "$change" "$add" "$b20" "$b20max" "$b100" "$b100max" "$(echo "$rss / 1024" | bc -l)" "$(echo "$hwm / 1024" | bc -l)"
