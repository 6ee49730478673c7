"""The timed part of scripts/bench-control.sh, in one Python process (an interpreter start per
request would dwarf what is measured).

LOCAL sequential ADDs; ROUNDS policy changes (a new file or its removal, then Reload, which the
agent answers once the maps hold the result); then bursts of 20 and of 100 simultaneous ADDs
for pods of this node the model already holds (as when a Deployment scales up). Veths are made
before each timed request. Prints one line: change, add, burst-20 median and slowest,
burst-100 median and slowest (ms); the samples go to stderr.

Usage: python3 bench-control-timings.py SOCKET NETNS MANIFESTS LOCAL ROUNDS
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

SOCK, NS, MANIFESTS = sys.argv[1], sys.argv[2], sys.argv[3]
LOCAL, ROUNDS = int(sys.argv[4]), int(sys.argv[5])


def call(msg):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(600)
    s.connect(SOCK)
    s.sendall(json.dumps(msg).encode() + b"\n")
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    s.close()
    answer = json.loads(buf)
    if answer.get("result") != "ok":
        sys.exit(f"{msg['op']}: {answer}")


def veths(first, count):
    cmds = "".join(f"link add bhc{i} type veth peer name bhp{i}\nlink set bhc{i} up\n" for i in range(first, first + count))
    subprocess.run(["ip", "-n", NS, "-batch", "-"], input=cmds.encode(), check=True)
    out = subprocess.run(["ip", "-n", NS, "-o", "link", "show"], capture_output=True, check=True, text=True).stdout
    index = {}
    for line in out.splitlines():
        num, name = line.split(":")[0:2]
        index[name.strip().split("@")[0]] = int(num)
    return index


def add(i, index):
    return {
        "op": "add_endpoint",
        "container_id": f"bench{i}",
        "ifname": "eth0",
        "netns": f"/run/netns/{NS}",
        "pod_namespace": f"ns{i % 10}",
        "pod_name": f"p{i}",
        "host_ifname": f"bhc{i}",
        "host_ifindex": index[f"bhc{i}"],
        "ipv4": f"10.200.0.{10 + i}",
        "mac": f"02:00:00:00:{i // 256:02x}:{i % 256:02x}",
        "network": "bench",
    }


def timed(msg):
    t = time.perf_counter()
    call(msg)
    return (time.perf_counter() - t) * 1000


def ms(v):
    return f"{v:.1f}"


index = veths(0, LOCAL)
adds = [timed(add(i, index)) for i in range(LOCAL)]

changes = []
path = os.path.join(MANIFESTS, "zz-change.yaml")
for r in range(1, ROUNDS + 1):
    if r % 2:
        with open(path + ".tmp", "w") as f:
            f.write(
                "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: change, namespace: ns1}\n"
                f"spec:\n  podSelector: {{matchLabels: {{app: app1}}}}\n  ingress:\n"
                f"  - from: [{{podSelector: {{matchLabels: {{app: app{r}}}}}}}]\n"
            )
        os.rename(path + ".tmp", path)
    else:
        os.remove(path)
    changes.append(timed({"op": "reload"}))

bursts = []
first = LOCAL
for size in (20, 100):
    index = veths(first, size)
    msgs = [add(i, index) for i in range(first, first + size)]
    out = [0.0] * size

    def run(k):
        out[k] = timed(msgs[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bursts.append((statistics.median(out), max(out)))
    first += size

print(
    ms(statistics.median(changes)),
    ms(statistics.median(adds)),
    ms(bursts[0][0]),
    ms(bursts[0][1]),
    ms(bursts[1][0]),
    ms(bursts[1][1]),
)
print("changes (ms): " + " ".join(ms(c) for c in changes), file=sys.stderr)
print("adds (ms): " + " ".join(ms(a) for a in adds), file=sys.stderr)
