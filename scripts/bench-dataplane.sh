#!/usr/bin/env bash
# The data-plane rows of issue 13's table, in one run, as ratios: new connections per second
# (connect, request, reply, close), UDP 64-byte packets/s and TCP one-stream throughput between
# two pods on one node, through
#   p10     Bulkhead enforcing: both pods isolated (ingress and egress), an allow policy for
#           the measured flows, and 10 extra policies;
#   p10k    the same with 10,000 extra policies;
#   bare    Bulkhead's programs detached from the pair's host veths (the baseline of both);
# all three pairs in one lab (one node, one agent, one map set), and
#   nf0     a pair with the programs detached and no netfilter table at all in the node
#           (the agent's masquerade table deleted: it alone turns conntrack on);
#   ipt1k   as nf0, plus the iptables + ipset ruleset kube-router writes for one NetworkPolicy
#   ipt10k  of 1,000 / 10,000 rules (layout below), the measured flow admitted by the last one;
# each in a lab of its own, since a table in the node's namespace hooks every packet there.
# Extra policies select both pods and never admit the measured flows, so their entries sit in
# the maps the lookups search: half admit the client on ports the benchmark does not use (the
# same identity, many ports), half admit an ipBlock /32 no pod has on the measured ports (many
# identities and ipcache entries). Rounds visit every (mode, path), reversing the path order
# every other round, so machine noise falls on all of them alike; the report gives medians,
# ratios per round (median, min–max) and proof from the maps and rule counters.
# Usage (root): bash scripts/bench-dataplane.sh
#   ROUNDS (default 5), SECONDS_PER_RUN (2), CONN_WORKERS (4 client threads),
#   MODES ("conn udp64 tcp"), EXTRA_POLICIES (10000), IPT_MODES (modes for the iptables paths,
#   default: MODES). Writes bench/dataplane.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_prepare
for tool in iptables ipset; do
  command -v "$tool" >/dev/null || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$tool" >/dev/null
  }
done
[ "${BENCH_PREPARED:-}" = 1 ] || cargo build --locked --release -p bulkhead --example connrate
CONNRATE=${CARGO_TARGET_DIR:-$PWD/target}/release/examples/connrate
SECONDS_PER_RUN=${SECONDS_PER_RUN:-2}
CONN_WORKERS=${CONN_WORKERS:-4}
MODES=${MODES:-conn udp64 tcp}
IPT_MODES=${IPT_MODES:-$MODES}
# Rounds: ROUNDS, else as many as BENCH_BUDGET_SECONDS (from scripts/bench.sh) allows: about
# 40 s of setup, and per round 3 paths × MODES + 3 × IPT_MODES runs of SECONDS_PER_RUN plus
# ~0.6 s each to start them; at least 3, at most 9. Default 5.
if [ -z "${ROUNDS:-}" ] && [ -n "${BENCH_BUDGET_SECONDS:-}" ]; then
  runs=$((3 * $(wc -w <<<"$MODES") + 3 * $(wc -w <<<"$IPT_MODES")))
  ROUNDS=$(((BENCH_BUDGET_SECONDS - 40) * 10 / (runs * (SECONDS_PER_RUN * 10 + 6))))
  ROUNDS=$((ROUNDS < 3 ? 3 : ROUNDS > 9 ? 9 : ROUNDS))
fi
ROUNDS=${ROUNDS:-5}
EXTRA_POLICIES=${EXTRA_POLICIES:-10000}
CONN_PORT=7000
STARTED=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
WORK=$(mktemp -d /tmp/bulkhead-bench-dataplane.XXXXXX)
LABS=(bh nf0 ipt1k ipt10k)
PATHS=(p10 p10k bare nf0 ipt1k ipt10k)
declare -A LAB_OF=([p10]=bh [p10k]=bh [bare]=bh [nf0]=nf0 [ipt1k]=ipt1k [ipt10k]=ipt10k)
declare -A NS_OF=([p10]=p10 [p10k]=p10k [bare]=bare [nf0]=bench [ipt1k]=bench [ipt10k]=bench)
declare -A NETNS SERVER METRICS
lab_for() { LAB="$BH lab --lab-dir $WORK/$1"; }
# Tables before sets: a set in use by a rule cannot be destroyed. `lab down` deletes the
# namespace, which would drop both; this leaves nothing even if it cannot.
drop_netfilter() { # netns
  if [ -e "/run/netns/$1" ]; then
    ip netns exec "$1" nft delete table ip filter 2>/dev/null || true
    ip netns exec "$1" ipset destroy 2>/dev/null || true
  fi
}
cleanup() {
  local l
  set +e
  bench_stop_servers "$WORK"/*.pid
  for l in "${LABS[@]}"; do
    if [ -s "$WORK/$l.netns" ]; then drop_netfilter "$(cat "$WORK/$l.netns")"; fi
    lab_for "$l"
    $LAB down >/dev/null 2>&1
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

# The Bulkhead lab: three namespaces of a client and a server each; p10 and p10k isolated with
# an allow policy and their extra policies, bare with none (its programs are detached below).
python3 - "$EXTRA_POLICIES" "$CONN_PORT" >"$WORK/bh.yaml" <<'PY'
import sys
extra, conn_port = int(sys.argv[1]), int(sys.argv[2])
out = []
def pod(name, ns):
    out.append(f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{role: {name}}}}}\n"
               "spec: {containers: [{name: c, image: iperf3}]}")
measured = f"[{{port: {conn_port}, protocol: TCP}}, {{port: 5201, protocol: TCP}}, {{port: 5201, protocol: UDP}}]"
for ns, n in (("p10", 10), ("p10k", extra), ("bare", None)):
    out.append(f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}")
    pod("client", ns)
    pod("server", ns)
    if n is None:
        continue
    out.append(f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-bench, namespace: {ns}}}\n"
               "spec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n"
               f"  ingress: [{{from: [{{podSelector: {{matchLabels: {{role: client}}}}}}], ports: {measured}}}]\n"
               f"  egress: [{{to: [{{podSelector: {{matchLabels: {{role: server}}}}}}], ports: {measured}}}]")
    for i in range(n):
        if i % 2 == 0:
            # The client's own identity, on a port nobody uses: 20000.. (5,000 ports at 10k).
            peer_in = "podSelector: {matchLabels: {role: client}}"
            peer_out = "podSelector: {matchLabels: {role: server}}"
            ports = f"[{{port: {20000 + i // 2}, protocol: TCP}}]"
        else:
            # An address no pod has, on the measured ports: 10.250.0.0/16 is outside the lab.
            cidr = f"10.250.{(i // 2) // 256}.{(i // 2) % 256}/32"
            peer_in = peer_out = f"ipBlock: {{cidr: {cidr}}}"
            ports = measured
        out.append(f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: extra-{i}, namespace: {ns}}}\n"
                   "spec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n"
                   f"  ingress: [{{from: [{{{peer_in}}}], ports: {ports}}}]\n"
                   f"  egress: [{{to: [{{{peer_out}}}], ports: {ports}}}]")
print("\n---\n".join(out))
PY
{
  printf 'apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n'
  bench_pod client bench; bench_pod server bench
} >"$WORK/plain.yaml"

# kube-router's filter rules for one NetworkPolicy with N rules selecting the server pod
# (pkg/controllers/netpol: FORWARD -> KUBE-ROUTER-FORWARD -> KUBE-POD-FW-<pod> ->
# KUBE-NWPLCY-<policy>), as `ipset restore` and `iptables-restore` input. Rules 1..N-1 admit
# source sets holding an address no pod has, so every new connection walks the whole chain (two
# failed set lookups per rule); rule N admits the client on the measured ports. Every set is
# hash:ip with timeout 0, as kube-router makes them.
KUBE_ROUTER_RULES='
import sys
n, server, client, conn_port, sets_path, rules_path = sys.argv[1:7]
n = int(n)
with open(sets_path, "w") as f:
    print("create KUBE-DST-BENCH hash:ip timeout 0", file=f)
    print(f"add KUBE-DST-BENCH {server} timeout 0", file=f)
    for i in range(1, n + 1):
        member = client if i == n else f"10.251.{i // 256}.{i % 256}"
        print(f"create KUBE-SRC-{i:05d} hash:ip timeout 0", file=f)
        print(f"add KUBE-SRC-{i:05d} {member} timeout 0", file=f)
pod, pol = "KUBE-POD-FW-BENCHSERVER", "KUBE-NWPLCY-BENCH"
lines = ["*filter", ":KUBE-ROUTER-FORWARD - [0:0]", f":{pod} - [0:0]", f":{pol} - [0:0]",
         "-A FORWARD -m comment --comment \"kube-router netpol\" -j KUBE-ROUTER-FORWARD",
         f"-A KUBE-ROUTER-FORWARD -d {server} -m comment --comment \"rule to jump traffic destined to POD name:server namespace: bench to chain {pod}\" -j {pod}",
         f"-A {pod} -m comment --comment \"rule for stateful firewall for pod\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
         f"-A {pod} -d {server} -m comment --comment \"rule to permit the traffic traffic to pods when source is the pod local node\" -m addrtype --src-type LOCAL -j ACCEPT",
         f"-A {pod} -m comment --comment \"run through nw policy bench\" -j {pol}"]
for i in range(1, n + 1):
    ports = [("tcp", conn_port), ("tcp", "5201"), ("udp", "5201")] if i == n else [("tcp", conn_port)]
    for proto, port in ports:
        m = (f"-m comment --comment \"rule {i} of policy bench\" -m set --match-set KUBE-SRC-{i:05d} src "
             f"-m set --match-set KUBE-DST-BENCH dst -p {proto} -m {proto} --dport {port}")
        lines.append(f"-A {pol} {m} -j MARK --set-xmark 0x10000/0x10000")
        lines.append(f"-A {pol} {m} -m mark --mark 0x10000/0x10000 -j RETURN")
lines += [f"-A {pod} -m comment --comment \"default rule to REJECT traffic destined for POD name:server namespace: bench\" -m mark ! --mark 0x10000/0x10000 -j REJECT --reject-with icmp-port-unreachable",
          f"-A {pod} -j MARK --set-xmark 0x0/0x10000",
          f"-A {pod} -m comment --comment \"accept traffic that complies to network policies\" -j ACCEPT",
          "COMMIT"]
with open(rules_path, "w") as f:
    print("\n".join(lines), file=f)'

# Detaches Bulkhead's programs from the host veth of a pod (found by the CNI plugin's /32 route).
detach() { # node-netns pod-ip
  local dev
  dev=$(ip -n "$1" -4 route show "$2/32" | awk '{for (i=1;i<NF;i++) if ($i=="dev") print $(i+1)}')
  [ -n "$dev" ] || { echo "no route to $2" >&2; exit 1; }
  tc -n "$1" qdisc del dev "$dev" clsact
  ip -n "$1" link set dev "$dev" xdp off 2>/dev/null || true
}

for l in "${LABS[@]}"; do
  lab_for "$l"
  if [ "$l" = bh ]; then $LAB up -f "$WORK/bh.yaml" >/dev/null; else $LAB up -f "$WORK/plain.yaml" >/dev/null; fi
  NETNS[$l]=$($LAB status -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nodes"][0]["netns"])')
  echo "${NETNS[$l]}" >"$WORK/$l.netns"
  METRICS[$l]=$($LAB status -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nodes"][0]["metricsURL"])') || true
done
for p in "${PATHS[@]}"; do
  l=${LAB_OF[$p]}
  lab_for "$l"
  SERVER[$p]=$(bench_ip_of "${NS_OF[$p]}" server)
  if [ "$l" != bh ] || [ "$p" = bare ]; then
    detach "${NETNS[$l]}" "$(bench_ip_of "${NS_OF[$p]}" client)"
    detach "${NETNS[$l]}" "${SERVER[$p]}"
  fi
done
# No netfilter in the nf0 and iptables labs: the agent's masquerade table goes (the agent
# writes it only when its settings change, so it stays gone; the report checks).
for l in nf0 ipt1k ipt10k; do
  ip netns exec "${NETNS[$l]}" nft delete table inet bulkhead
done
for l in ipt1k ipt10k; do
  n=${l#ipt}; n=${n%k}000
  lab_for "$l"
  python3 -c "$KUBE_ROUTER_RULES" "$n" "${SERVER[$l]}" "$(bench_ip_of bench client)" "$CONN_PORT" "$WORK/$l.sets" "$WORK/$l.rules"
  ip netns exec "${NETNS[$l]}" ipset restore <"$WORK/$l.sets"
  ip netns exec "${NETNS[$l]}" iptables-restore --noflush "$WORK/$l.rules"
done

# Servers: iperf3 on 5201 and connrate on CONN_PORT in every server pod.
for p in "${PATHS[@]}"; do
  lab_for "${LAB_OF[$p]}"
  bench_iperf3_server "${NS_OF[$p]}/server" "$WORK/$p.iperf3.pid"
  $LAB exec "${NS_OF[$p]}/server" -- "$CONNRATE" serve --port "$CONN_PORT" --threads "$CONN_WORKERS" \
    --pid-file "$WORK/$p.connrate.pid" >"$WORK/$p.connrate.log" 2>&1 &
done
for p in "${PATHS[@]}"; do
  for _ in $(seq 50); do [ -s "$WORK/$p.connrate.pid" ] && break; sleep 0.1; done
  [ -s "$WORK/$p.connrate.pid" ] || { echo "connrate server for $p did not start" >&2; cat "$WORK/$p.connrate.log" >&2; exit 1; }
done
sleep 0.5

measure() { # path mode -> one number
  lab_for "${LAB_OF[$1]}"
  case $2 in
    conn)
      $LAB exec "${NS_OF[$1]}/client" -- "$CONNRATE" run --to "${SERVER[$1]}:$CONN_PORT" \
        --seconds "$SECONDS_PER_RUN" --workers "$CONN_WORKERS" | tee -a "$WORK/$1.conn.raw" | cut -d' ' -f1
      ;;
    *) bench_iperf3 "${NS_OF[$1]}/client" "${SERVER[$1]}" "$2" "$SECONDS_PER_RUN" ;;
  esac
}
modes_of() { # path
  case $1 in ipt*|nf0) echo "$IPT_MODES" ;; *) echo "$MODES" ;; esac
}

for p in "${PATHS[@]}"; do for m in $MODES; do : >"$WORK/$p.$m"; done; : >"$WORK/$p.conn.raw"; done
# One short run of every path first: it fails fast on a path that does not connect.
for p in "${PATHS[@]}"; do measure "$p" conn >/dev/null; done
MEASURE_START=$(date +%s)
for round in $(seq "$ROUNDS"); do
  order=("${PATHS[@]}")
  if [ $((round % 2)) = 0 ]; then
    order=()
    for ((i = ${#PATHS[@]} - 1; i >= 0; i--)); do order+=("${PATHS[$i]}"); done
  fi
  for m in $MODES; do
    for p in "${order[@]}"; do
      case " $(modes_of "$p") " in *" $m "*) measure "$p" "$m" >>"$WORK/$p.$m" ;; esac
    done
  done
  echo "round $round of $ROUNDS done ($(($(date +%s) - MEASURE_START)) s)" >&2
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# Proof: the Bulkhead lab's maps and verdicts, the kube-router counters, the tables present.
python3 - "${METRICS[bh]}" >"$WORK/bh.metrics" <<'PY'
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())
PY
for l in nf0 ipt1k ipt10k; do
  ip netns exec "${NETNS[$l]}" nft list tables >"$WORK/$l.tables"
done
ip netns exec "${NETNS[bh]}" nft list tables >"$WORK/bh.tables"
for l in ipt1k ipt10k; do
  ip netns exec "${NETNS[$l]}" iptables-save -c -t filter >"$WORK/$l.counters"
  ip netns exec "${NETNS[$l]}" ipset list -n | wc -l >"$WORK/$l.nsets"
done
for p in "${PATHS[@]}"; do
    l=${LAB_OF[$p]}
    dev=$(ip -n "${NETNS[$l]}" -4 route show "${SERVER[$p]}/32" | awk '{for (i=1;i<NF;i++) if ($i=="dev") print $(i+1)}')
    # Into a variable first: `grep -q` would close the pipe early and pipefail report that.
    filters=$(tc -n "${NETNS[$l]}" filter show dev "$dev" ingress 2>/dev/null || true)
    if [[ $filters == *bpf* ]]; then
      echo "$p attached" >>"$WORK/attached"
    else
      echo "$p detached" >>"$WORK/attached"
    fi
done

mkdir -p bench
MACHINE="$(nproc) CPUs, Linux $(uname -r), $(iptables --version)"
python3 - "$WORK" "$ROUNDS" "$SECONDS_PER_RUN" "$CONN_WORKERS" "$EXTRA_POLICIES" "$MACHINE" \
  "$LOAD_START" "$LOAD_END" "$MODES" "$IPT_MODES" "$CONN_PORT" "$(($(date +%s) - STARTED))" >bench/dataplane.md <<'PY'
import re, statistics, sys
(work, rounds, secs, workers, extra, machine, load0, load1, modes, ipt_modes, conn_port,
 took) = sys.argv[1:13]
modes, ipt_modes, extra = modes.split(), ipt_modes.split(), int(extra)
def runs(path, mode):
    try:
        return [float(l) for l in open(f"{work}/{path}.{mode}") if l.strip()]
    except FileNotFoundError:
        return []
NAME = {"conn": "new connections/s (connect, request, reply, close)",
        "udp64": "UDP 64-byte packets/s (received)", "tcp": "TCP one stream (Gbit/s)"}
SCALE = {"conn": 1, "udp64": 1, "tcp": 1e-9}
FMT = {"conn": "{:,.0f}", "udp64": "{:,.0f}", "tcp": "{:.2f}"}
def med(path, mode):
    r = runs(path, mode)
    return statistics.median_low(r) if r else None
def ratio(a, b, mode):
    """Median and min–max of the per-round ratios a/b (both measured in the same round)."""
    x, y = runs(a, mode), runs(b, mode)
    r = [p / q for p, q in zip(x, y) if q > 0]
    if not r:
        return "–"
    return f"**{statistics.median_low(r):.3f}** ({min(r):.2f}–{max(r):.2f})"
def val(path, mode):
    m = med(path, mode)
    return "–" if m is None else FMT[mode].format(m * SCALE[mode])
metrics = {}
for line in open(f"{work}/bh.metrics"):
    m = re.match(r'(bulkhead_[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$', line.strip())
    if m:
        metrics[m[1] + (m[2] or "")] = float(m[3])
def metric(name, label=""):
    return int(metrics.get(name + label, -1))
def verdicts(policy):
    return int(sum(v for k, v in metrics.items()
                   if k.startswith("bulkhead_policy_verdicts_total") and f'policy="{policy}"' in k))
drops = sum(v for k, v in metrics.items() if k.startswith("bulkhead_drops_total"))
policy_entries = metric("bulkhead_map_entries", '{map="policy"}')
ipcache_entries = metric("bulkhead_map_entries", '{map="ipcache"}')
attached = dict(l.split() for l in open(f"{work}/attached"))
conn_total = {}
for p in ("ipt1k", "ipt10k", "nf0"):
    try:
        conn_total[p] = sum(int(l.split()[1]) for l in open(f"{work}/{p}.conn.raw") if l.strip())
    except FileNotFoundError:
        conn_total[p] = 0

print("# Data plane: Bulkhead enforcing vs detached, 10 vs 10,000 policies, vs iptables + ipset\n")
print("`bash scripts/bench-dataplane.sh` (also run by `bash scripts/bench.sh`) — two pods on one node, in")
print(f"{rounds} rounds of {secs} s per path and mode; each round visits every mode and every path, the")
print("path order reversed every other round. Ratios are the median (min–max) of the per-round ratios,")
print("both sides measured seconds apart. New connections: a Rust client (`controller/examples/connrate.rs`)")
print(f"with {workers} threads in the client pod, each connecting, writing a 23-byte request, reading the")
print("server's 64-byte reply to EOF and closing (the server closes first); UDP and TCP: iperf3 as in")
print(f"`bench/veth.md`. Machine: {machine}; load average (1, 5, 15 min) {load0} at the start, {load1} at")
print(f"the end; the script took {took} s. Other work on the machine moves the absolute numbers; the")
print("ratios are what this measures.\n")
print("## Bulkhead\n")
print("One lab, one node, one agent: pair `p10` (both pods isolated in ingress and egress, an allow")
print(f"policy for the measured ports, 10 extra policies), pair `p10k` (the same with {extra:,} extra")
print("policies) and pair `bare` (Bulkhead's TC programs detached from both host veths, no policy).")
print("The extra policies select both pods and never admit the measured flows: half admit the client")
print("on a port the benchmark does not use, half an ipBlock /32 no pod has on the measured ports.\n")
print("| measure | detached | enforced, 10 policies | enforced, 10k policies | 10 policies / detached | 10k policies / detached | 10k / 10 policies |")
print("|---|---:|---:|---:|---:|---:|---:|")
for m in modes:
    print(f"| {NAME[m]} | {val('bare', m)} | {val('p10', m)} | {val('p10k', m)} | {ratio('p10', 'bare', m)} | "
          f"{ratio('p10k', 'bare', m)} | {ratio('p10k', 'p10', m)} |")
print("\nProof, from the agent's metrics after the rounds: "
      f"{metric('bulkhead_policies')} NetworkPolicies in the model, "
      f"{policy_entries:,} policy map entries, {ipcache_entries:,} ipcache entries, "
      f"{metric('bulkhead_identities'):,} identities; new flows allowed by `p10/allow-bench`: "
      f"{verdicts('p10/allow-bench'):,}, by `p10k/allow-bench`: {verdicts('p10k/allow-bench'):,}; "
      f"datapath drops: {int(drops)}; "
      "programs on the server's host veth: "
      + ", ".join(f"`{p}` {attached.get(p, '?')}" for p in ("p10", "p10k", "bare")) + ".")
print("\n## iptables + ipset (kube-router's layout), for reference\n")
print("Three more labs, one pair each, Bulkhead's programs detached and the agent's masquerade table")
print("deleted: `nf0` has no netfilter table at all in the node; `ipt1k` / `ipt10k` have the filter")
print("rules and ipsets kube-router writes for one NetworkPolicy of 1,000 / 10,000 rules selecting the")
print("server: `FORWARD → KUBE-ROUTER-FORWARD → (-d server) KUBE-POD-FW-… → KUBE-NWPLCY-…`, two rules per")
print("(rule, port) matching `-m set --match-set KUBE-SRC-<rule> src -m set --match-set KUBE-DST-<policy>")
print("dst -p P --dport X` (MARK, then MARK-matched RETURN), every set `hash:ip timeout 0`. Rules 1..N-1")
print("admit sources no pod has, so a new connection walks the whole chain; rule N admits the client on")
print("the measured ports. Established packets stop at the per-pod chain's conntrack rule.\n")
print("| measure | no netfilter | iptables 1k rules | iptables 10k rules | 1k / none | 10k / none | Bulkhead 10k policies / none |")
print("|---|---:|---:|---:|---:|---:|---:|")
for m in ipt_modes:
    print(f"| {NAME[m]} | {val('nf0', m)} | {val('ipt1k', m)} | {val('ipt10k', m)} | {ratio('ipt1k', 'nf0', m)} | "
          f"{ratio('ipt10k', 'nf0', m)} | {ratio('p10k', 'nf0', m)} |")
print("\n(The last column compares across labs: Bulkhead's node also has the agent's masquerade table,")
print("which keeps conntrack on for every packet; `bare` / `nf0` shows that alone: "
      + ", ".join(f"{m} {ratio('bare', 'nf0', m)}" for m in ipt_modes if m in modes) + ".)\n")
print("Proof, after the rounds:\n")
for l in ("nf0", "ipt1k", "ipt10k"):
    tables = [t.strip() for t in open(f"{work}/{l}.tables") if t.strip()]
    print(f"- `{l}`: netfilter tables in the node: {', '.join(tables) if tables else 'none'}; "
          f"programs on the server's host veth: {attached.get(l, 'detached')}.")
for l in ("ipt1k", "ipt10k"):
    rules, rule_n, reject, others = 0, 0, 0, 0
    for line in open(f"{work}/{l}.counters"):
        m = re.match(r"\[(\d+):\d+\] -A (\S+) (.*)", line)
        if not m:
            continue
        rules += 1
        pkts, chain, rest = int(m[1]), m[2], m[3]
        if chain.startswith("KUBE-NWPLCY") and "-j MARK" in rest:
            s = re.search(r"KUBE-SRC-(\d+)", rest)
            if s and f"--dport {conn_port}" in rest and "-p tcp" in rest:
                if int(s[1]) == int(l[3:-1]) * 1000:
                    rule_n = pkts
                else:
                    others += pkts
        if "-j REJECT" in rest:
            reject = pkts
    nsets = int(open(f"{work}/{l}.nsets").read().strip())
    print(f"- `{l}`: {rules:,} filter rules and {nsets:,} ipsets (`iptables-save -c`, `ipset list -n`); rule N's")
    print(f"  MARK rule for TCP {conn_port} matched {rule_n:,} packets (one per new connection: the client")
    print(f"  completed {conn_total[l]:,}, warm-up included), rules 1..N-1 {others:,}, the REJECT rule {reject:,}.")
PY
cat bench/dataplane.md
echo "bench-dataplane.sh: $(($(date +%s) - STARTED)) s" >&2
