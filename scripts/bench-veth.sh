#!/usr/bin/env bash
# Enforced vs unenforced veth path, measured with iperf3 between lab pods on one node.
# Two client/server pod pairs run side by side in one lab: pair "e" keeps Bulkhead's TC
# programs (its namespace isolated, an allow policy admitting the iperf3 port), pair "u" has
# the programs detached from its host veths — the same veths, routes and node otherwise.
# Rounds alternate between the pairs so machine noise hits both alike; the report gives
# medians and the enforced/unenforced ratio. Usage (root): bash scripts/bench-veth.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, BPF)" >&2; exit 1; }
bash scripts/setup.sh
dpkg-query -W -f='${Status}' iperf3 2>/dev/null | grep -q 'install ok installed' || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iperf3 >/dev/null
}
cargo build --locked --release --bins
BH=$PWD/target/release/bulkhead
ROUNDS=${ROUNDS:-5}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-3}
WORK=$(mktemp -d /tmp/bulkhead-bench-veth.XXXXXX)
LAB="$BH lab --lab-dir $WORK/lab"
cleanup() { $LAB down >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT

# No containerPorts: the lab would serve them itself, and iperf3 needs 5201.
pod() { # name namespace
  printf -- '---\napiVersion: v1\nkind: Pod\nmetadata: {name: %s, namespace: %s, labels: {role: %s}}\nspec: {containers: [{name: c, image: iperf3}]}\n' "$1" "$2" "$1"
}
{
  printf 'apiVersion: v1\nkind: Namespace\nmetadata: {name: e}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: u}\n'
  pod client e; pod server e; pod client u; pod server u
  # Enforced pair: both directions isolated, with rules that admit the benchmark flow.
  printf -- '---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: iperf, namespace: e}\n'
  printf 'spec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n'
  printf '  ingress: [{from: [{podSelector: {matchLabels: {role: client}}}], ports: [{port: 5201, protocol: TCP}, {port: 5201, protocol: UDP}]}]\n'
  printf '  egress: [{to: [{podSelector: {matchLabels: {role: server}}}], ports: [{port: 5201, protocol: TCP}, {port: 5201, protocol: UDP}]}]\n'
} >"$WORK/bench.yaml"
$LAB up -f "$WORK/bench.yaml" >/dev/null
NODE_NS=$($LAB status -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nodes"][0]["netns"])')
ip_of() { $LAB pods -o json | python3 -c "import json,sys; print([p['ip'] for p in json.load(sys.stdin) if p['namespace']=='$1' and p['name']=='$2'][0])"; }
E_SERVER=$(ip_of e server); U_SERVER=$(ip_of u server)

# Detach the programs from the unenforced pair's host veths: each veth is found by the
# /32 route the CNI plugin installed for its pod.
for pip in "$(ip_of u client)" "$U_SERVER"; do
  dev=$(ip -n "$NODE_NS" -4 route show "$pip/32" | awk '{for (i=1;i<NF;i++) if ($i=="dev") print $(i+1)}')
  [ -n "$dev" ] || { echo "no route to $pip" >&2; exit 1; }
  tc -n "$NODE_NS" qdisc del dev "$dev" clsact
done

$LAB exec e/server -- iperf3 -s -D -p 5201 >/dev/null
$LAB exec u/server -- iperf3 -s -D -p 5201 >/dev/null
sleep 0.5

run() { # ns server-ip mode -> one number
  local args=(-c "$2" -p 5201 -t "$SECONDS_PER_RUN" -J)
  if [ "$3" = udp64 ]; then args+=(-u -b 0 -l 64); fi
  $LAB exec "$1/client" -- iperf3 "${args[@]}" | python3 -c '
import json,sys
doc=json.load(sys.stdin)
if "error" in doc:
    sys.exit("iperf3: " + doc["error"])
r=doc["end"]
if sys.argv[1] == "tcp":
    print(r["sum_received"]["bits_per_second"])
else:
    s=r["sum"]
    print((s["packets"] - s.get("lost_packets", 0)) / s["seconds"])' "$3"
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A results
for mode in tcp udp64; do
  : >"$WORK/e.$mode"; : >"$WORK/u.$mode"
  for _ in $(seq "$ROUNDS"); do
    run e "$E_SERVER" "$mode" >>"$WORK/e.$mode"
    run u "$U_SERVER" "$mode" >>"$WORK/u.$mode"
  done
  results[e.$mode]=$(median <"$WORK/e.$mode")
  results[u.$mode]=$(median <"$WORK/u.$mode")
done

mkdir -p bench
python3 - "${results[e.tcp]}" "${results[u.tcp]}" "${results[e.udp64]}" "${results[u.udp64]}" "$ROUNDS" "$SECONDS_PER_RUN" >bench/veth.md <<'PY'
import sys
et, ut, eu, uu = map(float, sys.argv[1:5])
rounds, secs = sys.argv[5], sys.argv[6]
print("# Enforced vs unenforced veth path\n")
print(f"`bash scripts/bench-veth.sh` — iperf3 between two lab pods on one node, {rounds} alternating rounds of {secs} s per")
print("mode, medians. Enforced: Bulkhead's TC programs on both host veths, both pods isolated, an allow policy for the")
print("flow. Unenforced: the same lab, a second pod pair with the programs detached. Established packets take the")
print("conntrack fast path; UDP with 64-byte datagrams is a new flow once, then established.\n")
print("| mode | enforced | unenforced | enforced / unenforced |")
print("|---|---:|---:|---:|")
print(f"| TCP, 1 stream (Gbit/s) | {et/1e9:.2f} | {ut/1e9:.2f} | {et/ut:.3f} |")
print(f"| UDP, 64-byte datagrams (packets/s received) | {eu:,.0f} | {uu:,.0f} | {eu/uu:.3f} |")
PY
cat bench/veth.md
