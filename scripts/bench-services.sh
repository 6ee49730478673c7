#!/usr/bin/env bash
# New connections per second to a ClusterIP Service: Bulkhead's datapath translation vs the
# backend pod's own IP, and vs kube-proxy's iptables rules for 1,000 (and 10) Services.
# Three labs of one node run side by side, the same pods in each: a server pod with a declared
# port (the lab answers each connection with the pod's name, then closes) and one client pod per
# path (`direct`, `service`, `mixed`), under an allow-all policy (ingress and egress), so the
# datapath's policy lookups are on every path.
#   bh      the Service `bench/web` (clusterIP 10.96.0.50, selector-less, a hand-written
#           EndpointSlice naming the server pod), translated by the agent in the datapath;
#           paths: direct (client -> pod IP:8080), service (client -> 10.96.0.50:80) and mixed
#           (one client alternating the two, see below).
#   kp1000  in the node's network namespace, a ruleset shaped like kube-proxy's iptables mode
#           (KUBE-SERVICES from PREROUTING/OUTPUT, KUBE-SVC-/KUBE-SEP- chains, statistic
#           --mode random, DNAT; KUBE-MARK-MASQ, KUBE-POSTROUTING; the filter table's
#           KUBE-FORWARD and friends) for 1,000 Services whose VIPs are in 10.97.0.0/16, which
#           the agent does not translate; the measured one is the last in KUBE-SERVICES;
#           paths: service (client -> its VIP:80, DNAT to pod IP:8080), direct and mixed.
#   kp10    the same ruleset with 10 Services; path: service.
# The kube-proxy labs have a node of their own because a nat table in a namespace hooks every
# packet there: the bh paths must not pay for rules they do not use.
# Each path has its own client because one client reaching the same pod both directly and
# through a Service meets the server's TIME_WAIT sockets of the other path: `mixed` measures
# exactly that (Bulkhead translates without choosing another source port on a clash, as
# netfilter's NAT does), the other paths measure the translation alone.
# Rounds visit the seven paths in turn, reversing the order every other round, so machine noise
# falls on all of them alike; the report (bench/services.md) gives medians, ratios to the
# direct path, the spread, and proof that each path went where it says.
# Usage (root): bash scripts/bench-services.sh   (ROUNDS, SECONDS_PER_RUN to change the defaults)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_prepare
command -v iptables-restore >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iptables >/dev/null
}
ROUNDS=${ROUNDS:-7}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-3}
LABS=(bh kp10 kp1000)
# The server's declared port; the lab answers with the pod's name and closes first, which keeps
# TIME_WAIT off the client so its ephemeral ports never run out.
PORT=8080
SVC_PORT=80
BH_VIP=10.96.0.50
KP_VIP_BASE=10.97.0.0
WORK=$(mktemp -d /tmp/bulkhead-bench-services.XXXXXX)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
lab_for() { LAB="$BH lab --lab-dir $WORK/$1"; }
# The kube-proxy tables live in the node's namespace; `lab down` deletes the namespace, and
# this deletes the tables first in case it cannot (iptables-nft's tables are nft tables).
drop_kube_proxy_rules() { # netns
  if [ -e "/run/netns/$1" ]; then
    ip netns exec "$1" nft delete table ip nat 2>/dev/null || true
    ip netns exec "$1" nft delete table ip filter 2>/dev/null || true
  fi
}
cleanup() {
  local l
  for l in "${LABS[@]}"; do
    if [ -s "$WORK/$l.netns" ]; then drop_kube_proxy_rules "$(cat "$WORK/$l.netns")"; fi
    lab_for "$l"
    $LAB down >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

{
  printf 'apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n'
  bench_pod server bench node0 "$PORT"
  for c in direct service mixed; do bench_pod "$c" bench node0; done
  printf -- '---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-all, namespace: bench}\n'
  printf 'spec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: [{}]\n  egress: [{}]\n'
} >"$WORK/bench.yaml"

# Connections per second from one client, one at a time, for SECONDS, to the targets in turn;
# prints the rate and the share of connections that took over 5 ms; fails on a bad reply.
CONNECT_LOOP='
import socket, sys, time
secs, args = float(sys.argv[1]), sys.argv[2:]
targets = [(args[i], int(args[i + 1])) for i in range(0, len(args), 2)]
n, slow, start = 0, 0, time.monotonic()
while (t0 := time.monotonic()) - start < secs:
    s = socket.create_connection(targets[n % len(targets)], timeout=5)
    reply = b""
    while chunk := s.recv(256):
        reply += chunk
    s.close()
    if not reply.endswith(b"\n"):
        sys.exit(f"bad reply {reply!r}")
    n += 1
    slow += time.monotonic() - t0 > 0.005
print(n / (time.monotonic() - start), slow / n)'

# Waits until HOST:PORT answers with the server pod's name (30 s at most), then prints it.
REACH='
import socket, sys, time
deadline = time.monotonic() + 30
while True:
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1)
        reply = b""
        while chunk := s.recv(256):
            reply += chunk
        s.close()
        if reply.strip() == b"bench/server":
            print(reply.decode().strip())
            break
        err = f"reply {reply!r}"
    except OSError as e:
        err = e
    if time.monotonic() > deadline:
        sys.exit(f"{sys.argv[1]}:{sys.argv[2]} did not answer as bench/server in 30 s: {err}")
    time.sleep(0.2)'

# The Service as a user would write it without a selector: the EndpointSlice is hand-written,
# naming the server pod (its IP is known only once the lab is up).
service_yaml() { # server-ip
  printf 'apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: bench}\n'
  printf 'spec:\n  clusterIP: %s\n  ports: [{name: http, protocol: TCP, port: %s, targetPort: %s}]\n' "$BH_VIP" "$SVC_PORT" "$PORT"
  printf -- '---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n'
  printf 'metadata: {name: web-1, namespace: bench, labels: {kubernetes.io/service-name: web}}\n'
  printf 'addressType: IPv4\nports: [{name: http, protocol: TCP, port: %s}]\n' "$PORT"
  printf 'endpoints: [{addresses: ["%s"], conditions: {ready: true, serving: true, terminating: false}, nodeName: node0}]\n' "$1"
}

# kube-proxy's iptables-mode output (pkg/proxy/iptables, v1.28+) for N Services of one TCP port,
# as iptables-restore input. Service i (1..N) has VIP base+i and 1-3 endpoints (statistic
# --mode random among them) at addresses no pod has; Service N, the last in KUBE-SERVICES,
# has one endpoint: the server pod. Chain names are kube-proxy's (sha256, base32, 16 chars).
# Left out: kube-proxy's nfacct counter on the INVALID drop (not needed to forward), NodePorts,
# external IPs and load balancers (none of these Services has them).
KUBE_PROXY_RULES='
import base64, hashlib, ipaddress, sys
n, base, server, target, svc_port, cluster = sys.argv[1:7]
n, base, target = int(n), ipaddress.IPv4Address(base), int(target)
fake = ipaddress.IPv4Network(cluster)[1 << 15]  # the upper half of the cluster CIDR: no pod in a 1-node lab
def chain(prefix, text):
    return prefix + base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]
chains, services, svc_rules, sep_rules = [], [], [], []
for i in range(1, n + 1):
    name, vip = f"bench/svc-{i}:http", base + i
    eps = [(str(server), target)] if i == n else [(str(fake + 3 * i + k), 8080) for k in range(i % 3 + 1)]
    svc = chain("KUBE-SVC-", name + "tcp")
    chains.append(svc)
    services.append(f"-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {vip} --dport {svc_port} -j {svc}")
    svc_rules.append(f"-A {svc} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {vip} --dport {svc_port} ! -s {cluster} -j KUBE-MARK-MASQ")
    for k, (ip, port) in enumerate(eps):
        sep = chain("KUBE-SEP-", name + "tcp" + f"{ip}:{port}")
        chains.append(sep)
        stat = f" -m statistic --mode random --probability {1 / (len(eps) - k):.10f}" if k < len(eps) - 1 else ""
        svc_rules.append(f"-A {svc} -m comment --comment \"{name} -> {ip}:{port}\"{stat} -j {sep}")
        sep_rules.append(f"-A {sep} -m comment --comment {name} -s {ip} -j KUBE-MARK-MASQ")
        sep_rules.append(f"-A {sep} -m comment --comment {name} -m tcp -p tcp -j DNAT --to-destination {ip}:{port}")
    if i == n:
        print(svc, sep, file=sys.stderr)  # the measured chains, for the counters
print("*filter")
for c in ("KUBE-NODEPORTS", "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FIREWALL", "KUBE-FORWARD", "KUBE-PROXY-FIREWALL"):
    print(f":{c} - [0:0]")
print("""-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat""")
for c in ["KUBE-NODEPORTS", "KUBE-SERVICES", "KUBE-MARK-MASQ", "KUBE-POSTROUTING"] + chains:
    print(f":{c} - [0:0]")
print("""-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully""")
print("\n".join(services))
print("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")
print("\n".join(svc_rules))
print("\n".join(sep_rules))
print("COMMIT")'

# The VIP of the last of N kube-proxy Services.
kp_vip() { python3 -c "import ipaddress,sys; print(ipaddress.IPv4Address(sys.argv[1]) + int(sys.argv[2]))" "$KP_VIP_BASE" "$1"; }

declare -A SERVER NETNS MEASURED_CHAINS
for l in "${LABS[@]}"; do
  lab_for "$l"
  $LAB up --nodes 1 -f "$WORK/bench.yaml" >/dev/null
  SERVER[$l]=$(bench_ip_of bench server)
  NETNS[$l]=$($LAB status -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nodes"][0]["netns"])')
  echo "${NETNS[$l]}" >"$WORK/$l.netns"
  case $l in
    bh)
      service_yaml "${SERVER[$l]}" >"$WORK/service.yaml"
      $LAB apply -f "$WORK/service.yaml" >/dev/null
      ;;
    kp*)
      cluster=$($LAB status -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nodes"][0]["podCIDR"])')
      # The cluster CIDR is the lab's /16 around its node's pod CIDR.
      cluster=$(python3 -c "import ipaddress,sys; print(ipaddress.IPv4Network(sys.argv[1]).supernet(new_prefix=16))" "$cluster")
      python3 -c "$KUBE_PROXY_RULES" "${l#kp}" "$KP_VIP_BASE" "${SERVER[$l]}" "$PORT" "$SVC_PORT" "$cluster" \
        >"$WORK/$l.rules" 2>"$WORK/$l.chains"
      ip netns exec "${NETNS[$l]}" iptables-restore "$WORK/$l.rules"
      MEASURED_CHAINS[$l]=$(cat "$WORK/$l.chains")
      ;;
  esac
done

# path (LAB.CLIENT) -> its targets, "address port" pairs
declare -A P_TARGETS
PATHS=(bh.direct bh.service bh.mixed kp10.service kp1000.service kp1000.direct kp1000.mixed)
for p in "${PATHS[@]}"; do
  l=${p%.*}
  direct="${SERVER[$l]} $PORT"
  if [ "$l" = bh ]; then service="$BH_VIP $SVC_PORT"; else service="$(kp_vip "${l#kp}") $SVC_PORT"; fi
  case ${p#*.} in
    direct) P_TARGETS[$p]=$direct ;;
    service) P_TARGETS[$p]=$service ;;
    mixed) P_TARGETS[$p]="$direct $service" ;;
  esac
done

# Every path reaches the server before anything is measured.
for p in "${PATHS[@]}"; do
  lab_for "${p%.*}"
  read -ra t <<<"${P_TARGETS[$p]}"
  for ((i = 0; i < ${#t[@]}; i += 2)); do
    $LAB exec "bench/${p#*.}" -- python3 -c "$REACH" "${t[$i]}" "${t[$((i + 1))]}" >/dev/null
  done
done
# The Service path is Bulkhead's translation: the client's node reports the flow with the
# Service and its VIP (without translation the datapath would decide it on the VIP, and
# nothing in this lab would answer there).
lab_for bh
TRANSLATED=$($BH observe --lab-dir "$WORK/bh" --to-service bench/web --last 50 -o json | python3 -c '
import json, sys
flows = [json.loads(l) for l in sys.stdin if l.strip()]
hits = [f for f in flows if (f.get("service") or {}).get("vip") == sys.argv[1] and f["verdict"] == "FORWARDED"]
if not hits:
    sys.exit(f"no translated flow to {sys.argv[1]} in bulkhead observe --to-service bench/web: {flows!r}")
src, dst, svc = hits[-1]["source"], hits[-1]["destination"], hits[-1]["service"]
print("%d forwarded flows from %s to %s:%s translated to %s:%s" % (len(hits), src["ip"], svc["vip"], svc["port"], dst["ip"], dst["port"]))' "$BH_VIP")

measure() { # path -> connections/s and the share slower than 5 ms
  lab_for "${1%.*}"
  read -ra t <<<"${P_TARGETS[$1]}"
  $LAB exec "bench/${1#*.}" -- python3 -c "$CONNECT_LOOP" "$SECONDS_PER_RUN" "${t[@]}"
}

for p in "${PATHS[@]}"; do : >"$WORK/$p.conn"; done
for round in $(seq "$ROUNDS"); do
  order=("${PATHS[@]}")
  if [ $((round % 2)) = 0 ]; then
    order=()
    for ((i = ${#PATHS[@]} - 1; i >= 0; i--)); do order+=("${PATHS[$i]}"); done
  fi
  for p in "${order[@]}"; do
    measure "$p" >>"$WORK/$p.conn"
  done
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# Proof from the counters: the measured Service's DNAT rule matched, no other Service did.
for l in kp10 kp1000; do
  ip netns exec "${NETNS[$l]}" iptables-save -c -t nat >"$WORK/$l.counters"
done

mkdir -p bench
MACHINE="$(nproc) CPUs, Linux $(uname -r), $(iptables --version)"
python3 - "$WORK" "$ROUNDS" "$SECONDS_PER_RUN" "$MACHINE" "$LOAD_START" "$LOAD_END" "$TRANSLATED" \
  "${MEASURED_CHAINS[kp10]}" "${MEASURED_CHAINS[kp1000]}" "$BH_VIP" "$(kp_vip 1000)" >bench/services.md <<'PY'
import re, statistics, sys
work, rounds, secs, machine, load0, load1, translated = sys.argv[1:8]
chains = {"kp10": sys.argv[8].split(), "kp1000": sys.argv[9].split()}
bh_vip, kp_vip = sys.argv[10], sys.argv[11]
label = {
    "bh.direct": "direct: client → pod IP:8080 (Bulkhead node, no kube-proxy rules)",
    "bh.service": f"Bulkhead Service: client → {bh_vip}:80, translated in the datapath",
    "kp10.service": "kube-proxy, 10 Services: client → the last VIP:80, DNAT by iptables",
    "kp1000.service": f"kube-proxy, 1,000 Services: client → {kp_vip}:80 (last of 1,000), DNAT by iptables",
    "kp1000.direct": "direct on the kube-proxy-1,000 node: client → pod IP:8080",
    "bh.mixed": f"Bulkhead: one client alternating pod IP:8080 and {bh_vip}:80",
    "kp1000.mixed": f"kube-proxy 1,000: one client alternating pod IP:8080 and {kp_vip}:80",
}
paths = list(label)
runs = {p: [tuple(map(float, l.split())) for l in open(f"{work}/{p}.conn") if l.strip()] for p in paths}
rate = {p: [r for r, _ in runs[p]] for p in paths}
slow = {p: [s for _, s in runs[p]] for p in paths}
# The lower middle of an even count, as bench_median.
med = {p: statistics.median_low(rate[p]) for p in paths}
med_slow = {p: statistics.median_low(slow[p]) for p in paths}
base = med["bh.direct"]

def counters(lab):
    """Rules in the nat table; packets of the measured Service's KUBE-SERVICES and DNAT rules
    and of every other Service's KUBE-SERVICES rule."""
    svc, sep = chains[lab]
    rules, measured, dnat, others = 0, 0, 0, 0
    for line in open(f"{work}/{lab}.counters"):
        m = re.match(r"\[(\d+):\d+\] -A (\S+) (.*)", line)
        if not m:
            continue
        pkts, chain, rest = int(m[1]), m[2], m[3]
        rules += 1
        if chain == "KUBE-SERVICES" and "cluster IP" in rest:
            if rest.endswith(f"-j {svc}"):
                measured = pkts
            else:
                others += pkts
        if chain == sep and "DNAT" in rest:
            dnat = pkts
    return rules, measured, dnat, others

print("# ClusterIP Services: Bulkhead's translation vs the pod IP vs kube-proxy's iptables\n")
print("`bash scripts/bench-services.sh` — new connections per second from a client pod to a server pod")
print("on the same node, under an allow-all policy (ingress and egress), so the TC programs and their")
print("policy lookups are on every path. Three labs of one node side by side, the same pods in each:")
print(f"`bh` has the Service `bench/web` (selector-less, `clusterIP` {bh_vip}, port 80 → targetPort")
print("8080, a hand-written EndpointSlice naming the server pod), which the agent translates in the")
print("datapath; `kp1000` and `kp10` have, in the node's network namespace, a ruleset shaped like")
print("kube-proxy's iptables mode (nat: KUBE-SERVICES jumped to from PREROUTING and OUTPUT, one")
print("`-d VIP/32 -p tcp --dport 80 -j KUBE-SVC-…` per Service, KUBE-SVC- chains choosing among 1–3")
print("endpoints with `statistic --mode random`, KUBE-SEP- chains with `DNAT --to-destination`,")
print("KUBE-MARK-MASQ and KUBE-POSTROUTING; filter: KUBE-FORWARD, KUBE-SERVICES, KUBE-PROXY-FIREWALL,")
print("…) for 1,000 or 10 Services with VIPs in 10.97.0.0/16, which Bulkhead does not translate. The")
print("measured Service is the last in KUBE-SERVICES: kube-proxy's list is linear, so a new connection")
print("to it is compared against every Service's rule before its own (the worst case; a Service in the")
print("middle of the list costs half as many). Bulkhead's translation is a hash lookup whatever the")
print("number of Services. The kube-proxy rules live in labs of their own because a nat table in a")
print("namespace hooks every packet there. `kp1000.direct` shows what those rules cost traffic that is")
print("not even addressed to a Service: every new connection still walks KUBE-SERVICES.\n")
print(f"{rounds} rounds of {secs} s per path, visiting the seven paths in turn (order reversed every")
print("other round); medians. Each path has a client pod of its own; the client connects, reads the")
print("server's one-line reply to EOF and closes, one connection at a time (in Python: the client's own")
print("cost is in every number alike). \"> 5 ms\": the median share of connections that took longer")
print(f"than 5 ms. Machine: {machine}; load average (1, 5, 15 min) {load0} at the start, {load1} at")
print("the end.\n")
print("| path | new connections/s | / direct | > 5 ms |")
print("|---|---:|---:|---:|")
for p in paths[:5]:
    print(f"| {label[p]} | {med[p]:,.0f} | {med[p] / base:.3f} | {med_slow[p]:.1%} |")
svc = med["bh.service"] / base
print("\n| ratio | value |")
print("|---|---:|")
print(f"| Bulkhead Service / direct (target ≥ 0.95) | **{svc:.3f}** ({'met' if svc >= 0.95 else 'not met'}) |")
print(f"| kube-proxy 1,000 Services / direct | **{med['kp1000.service'] / base:.3f}** |")
print(f"| kube-proxy 10 Services / direct | {med['kp10.service'] / base:.3f} |")
print(f"| kube-proxy 1,000 Services / direct on that node | {med['kp1000.service'] / med['kp1000.direct']:.3f} |")
print(f"| Bulkhead Service / kube-proxy 1,000 Services | {med['bh.service'] / med['kp1000.service']:.3f} |")
print("\n## One client, both paths\n")
print("A client that reaches the same pod both directly and through its Service (or through two")
print("Services) within a minute:\n")
print("| path | new connections/s | / direct | > 5 ms |")
print("|---|---:|---:|---:|")
for p in paths[5:]:
    print(f"| {label[p]} | {med[p]:,.0f} | {med[p] / base:.3f} | {med_slow[p]:.1%} |")
print("\nBulkhead rewrites only the destination: the client's kernel chose the source port and the TCP")
print("timestamp offset for (client, VIP:80), and the server may still hold a TIME_WAIT socket for")
print("(client:port, pod:8080) from a direct connection. A SYN whose timestamps come from the other")
print("offset looks old about half the time (PAWS): the server answers with the old connection's ACK,")
print("the client resets and retries its SYN some 10 ms later. netfilter's NAT (kube-proxy) gives a")
print("new connection whose translated tuple clashes with a tracked one another source port, so the")
print("server does not see that clash. The other paths use one client each and do not meet this.")
print("\nSpread, min – max over the rounds (new connections/s):\n")
print("| path | min – max | max / min |")
print("|---|---:|---:|")
for p in paths:
    s = rate[p]
    print(f"| {p} | {min(s):,.0f} – {max(s):,.0f} | {max(s) / min(s):.2f} |")
print("\nProof of the paths, from this run:\n")
print("- Bulkhead translated the Service (`bulkhead observe --to-service bench/web`, before the rounds):")
print(f"  {translated}.")
for lab in ("kp10", "kp1000"):
    rules, measured, dnat, others = counters(lab)
    print(f"- `{lab}`: {rules:,} nat rules (`iptables-save -c -t nat`); the measured Service's KUBE-SERVICES")
    print(f"  rule matched {measured:,} packets and its DNAT rule {dnat:,} (one per connection); every other")
    print(f"  Service's KUBE-SERVICES rule: {others:,}.")
PY
cat bench/services.md
