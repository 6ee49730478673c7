# Shared by the lab benchmarks (bench-veth.sh, bench-routing.sh); sourced, not run.
# The sourcing script sets LAB (`bulkhead lab --lab-dir DIR`) before calling the lab helpers.

# Root, the machine set up, iperf3, a release build; sets BH to the bulkhead binary.
# BULKHEAD_BIN names a binary to measure instead of building (bulkhead-cni must be next to it),
# e.g. a copy of an earlier build, to compare two builds with the same script.
bench_prepare() {
  [ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, BPF)" >&2; exit 1; }
  # scripts/bench.sh sets BENCH_PREPARED=1 once it has run setup and the release build.
  [ "${BENCH_PREPARED:-}" = 1 ] || bash scripts/setup.sh
  dpkg-query -W -f='${Status}' iperf3 2>/dev/null | grep -q 'install ok installed' || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iperf3 >/dev/null
  }
  if [ -n "${BULKHEAD_BIN:-}" ]; then
    BH=$BULKHEAD_BIN
    return
  fi
  [ "${BENCH_PREPARED:-}" = 1 ] || cargo build --locked --release --bins
  BH=${CARGO_TARGET_DIR:-$PWD/target}/release/bulkhead
}

# One Pod document, labelled role=NAME. NODE pins it (spec.nodeName); PORT is a declared TCP
# containerPort, which the lab serves by writing the pod's name and closing. Without PORT the
# pod serves nothing, leaving every port (iperf3's 5201) free.
bench_pod() { # name namespace [node] [port]
  local spec="containers: [{name: c, image: iperf3}]"
  [ -z "${4:-}" ] || spec="containers: [{name: c, image: iperf3, ports: [{containerPort: $4}]}]"
  [ -z "${3:-}" ] || spec="nodeName: $3, $spec"
  printf -- '---\napiVersion: v1\nkind: Pod\nmetadata: {name: %s, namespace: %s, labels: {role: %s}}\nspec: {%s}\n' "$1" "$2" "$1" "$spec"
}

# The pod's IP, from `lab pods`.
bench_ip_of() { # namespace name
  $LAB pods -o json | python3 -c "import json,sys; print([p['ip'] for p in json.load(sys.stdin) if p['namespace']=='$1' and p['name']=='$2'][0])"
}

# Starts a detached iperf3 server on 5201 in a pod; its pid goes to PIDFILE for
# bench_stop_servers, as `lab down` stops only the lab's own processes.
bench_iperf3_server() { # ns/pod pidfile
  $LAB exec "$1" -- iperf3 -s -D -p 5201 -I "$2" >/dev/null
}

# Stops the iperf3 servers whose pidfiles are given (missing ones are skipped).
bench_stop_servers() { # pidfile...
  local f
  for f in "$@"; do
    if [ -s "$f" ]; then kill "$(cat "$f")" 2>/dev/null || true; fi
  done
}

# One iperf3 run from a pod to a server already listening on 5201: TCP prints bits/s received,
# udp64 (64-byte datagrams, unlimited rate) prints packets/s received.
bench_iperf3() { # ns/client server-ip tcp|udp64 seconds
  local args=(-c "$2" -p 5201 -t "$4" -J)
  if [ "$3" = udp64 ]; then args+=(-u -b 0 -l 64); fi
  $LAB exec "$1" -- iperf3 "${args[@]}" | python3 -c '
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

# The median of the numbers on stdin, one a line (the lower middle one of an even count).
bench_median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# A Python client loop for `python3 -c "$BENCH_CONNECT_LOOP" HOST PORT SECONDS`: connections
# per second from one client, one at a time, to a pod's declared port (the lab writes the pod's
# name and then echoes): connect, read the name's line, close with a reset (SO_LINGER 0), so
# no TIME_WAIT piles up and ephemeral ports never run out. Fails on a bad reply.
BENCH_CONNECT_LOOP='
import socket, struct, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
linger = struct.pack("ii", 1, 0)
n, start = 0, time.monotonic()
while time.monotonic() - start < secs:
    s = socket.create_connection((host, port), timeout=5)
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = s.recv(256)
        if not chunk:
            sys.exit(f"bad reply {reply!r}")
        reply += chunk
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    s.close()
    n += 1
print(n / (time.monotonic() - start))'
