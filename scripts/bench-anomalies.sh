#!/usr/bin/env bash
# Anomaly detection over a longer run (issue 15's note; a benchmark, not a test): a 2-node lab
# with the shop of `bulkhead lab traffic`, its relay learning for LEARNING_SECS while the shop
# scales, rolls and changes its load; then RUN_MINUTES of the same normal variation with each
# attack of `bulkhead lab attack` injected ROUNDS times (scan, new-peer, upload, exfil at 20x),
# spaced by GAP_SECS. Writes bench/anomalies.md: detection latency per attack kind (median,
# max, missed) and false alerts per workload-hour (anomalies naming no attacker of the moment,
# over the shop's workloads and the time after learning).
# Knobs: RUN_MINUTES (15), LEARNING_SECS (120), ROUNDS (3), GAP_SECS (40), DETECT_SECS (30:
# how long to wait for a detection before counting it missed), SEED (1), REPORT.
# Needs root. Usage: bash scripts/bench-anomalies.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, BPF)" >&2; exit 1; }
[ "${BENCH_PREPARED:-}" = 1 ] || { bash scripts/setup.sh && cargo build --locked --release --bins; }
BH=${BULKHEAD_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/bulkhead}
WORK=$(mktemp -d /tmp/bench-anomalies.XXXXXX)
LAB_DIR=$WORK/lab
cleanup() {
  "$BH" lab --lab-dir "$LAB_DIR" down >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
REPORT=${REPORT:-bench/anomalies.md}
mkdir -p "$(dirname "$REPORT")"

"$BH" lab traffic manifests --seed "${SEED:-1}" >"$WORK/shop.yaml"
"$BH" lab --lab-dir "$LAB_DIR" up --nodes 2 -f "$WORK/shop.yaml" \
  --relay-arg="--learning-secs=${LEARNING_SECS:-120}" >/dev/null

BH=$BH LAB_DIR=$LAB_DIR REPORT=$REPORT python3 - <<'EOF'
import json, os, random, statistics, subprocess, time

BH, LAB, REPORT = os.environ["BH"], os.environ["LAB_DIR"], os.environ["REPORT"]
LEARNING = int(os.environ.get("LEARNING_SECS", "120"))
RUN = int(os.environ.get("RUN_MINUTES", "15")) * 60
ROUNDS = int(os.environ.get("ROUNDS", "3"))
GAP = int(os.environ.get("GAP_SECS", "40"))
DETECT = int(os.environ.get("DETECT_SECS", "30"))
SEED = int(os.environ.get("SEED", "1"))
WORKLOADS = 7  # the shop's: loadgen, frontend, catalog, orders, postgres, redis, coredns
rng = random.Random(SEED)

def lab(*args, check=True):
    p = subprocess.run([BH, "lab", "--lab-dir", LAB, *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise SystemExit(f"lab {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout

def anomalies():
    p = subprocess.run([BH, "observe", "--lab-dir", LAB, "--anomalies", "-o", "json"], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"observe --anomalies: {p.stderr.strip()}")
    return [json.loads(l) for l in p.stdout.splitlines() if l.strip()]

def ms(text):
    # RFC 3339 with up to nanoseconds, UTC.
    from datetime import datetime, timezone
    base, _, frac = text.rstrip("Z").partition(".")
    t = datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    return int(t * 1000 + int((frac + "000")[:3]))

def now_ms():
    return int(time.time() * 1000)

def pods(workload):
    s = json.loads(lab("traffic", "status", "-o", "json"))
    return next(w["pods"] for w in s["workloads"] if w["workload"] == workload)

def vary():
    step = rng.choice([
        ["rate", str(rng.choice([0.5, 1, 1.5, 2, 3]))],
        ["scale", rng.choice(["frontend", "catalog", "orders"]), str(rng.randint(1, 3))],
        ["roll", rng.choice(["frontend", "catalog", "orders"])],
    ])
    lab("traffic", *step)

def vary_for(seconds, every=12):
    end = time.time() + seconds
    while time.time() < end:
        vary()
        time.sleep(min(every, max(0, end - time.time())))

relay_started = time.time()
lab("traffic", "start", "--seed", str(SEED), "--no-churn")
vary_for(max(0, LEARNING - 5))
time.sleep(max(0, relay_started + LEARNING + 3 - time.time()))
learnt = now_ms()
print(f"learnt after {LEARNING} s; {RUN} s of variation and {ROUNDS} rounds of attacks", flush=True)

KINDS = [("scan", "scan"), ("new-peer", "new_peer"), ("upload", "new_external"), ("exfil", "exfiltration")]
latencies = {k: [] for _, k in KINDS}
missed = {k: 0 for _, k in KINDS}
# The relay reports one anomaly per (kind, workload, peer) per 10 min (the peer of a scan or an
# exfiltration is the pod): a repeat of an attack already reported in that window is counted
# as deduplicated, not missed.
DEDUPE_MS = 600_000
reported = {}  # (kind, dedupe key) -> ms of the last detection
deduped = {k: 0 for _, k in KINDS}
windows = []  # (pod, from ms, to ms): anomalies of the attacker in its window are not false
attacks = [(r, a) for r in range(ROUNDS) for a in KINDS]
gap = max(GAP, (RUN - len(attacks) * DETECT) / max(1, len(attacks)))
ended = time.time() + RUN
for _, (attack, kind) in attacks:
    vary_for(gap)
    if attack == "exfil":
        src = rng.choice(pods("shop-api/orders"))
        args = ["exfil", "--from", src, "--multiple", "20", "--duration", "15s"]
    else:
        src = rng.choice(pods("shop-web/frontend"))
        args = {"scan": ["scan", "--from", src, "--ports", "1-200"],
                "new-peer": ["new-peer", "--from", src],
                "upload": ["upload", "--from", src, "--bytes", "2000000"]}[attack]
    t0 = now_ms()
    child = subprocess.Popen([BH, "lab", "--lab-dir", LAB, "attack", *args, "-o", "json"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hit = None
    while hit is None and now_ms() - t0 < DETECT * 1000:
        hit = next((a for a in anomalies() if a["kind"] == kind and a.get("pod") == src and ms(a["time"]) >= t0), None)
        time.sleep(0.25)
    child.wait()
    windows.append((src, t0, now_ms() + 5000))
    # new_peer and new_external are deduplicated per workload and peer, the others per pod.
    dedupe_key = src if kind in ("scan", "exfiltration") else src.rsplit("-", 2)[0]
    last = reported.get((kind, dedupe_key))
    if hit is None and last is not None and t0 - last < DEDUPE_MS:
        deduped[kind] += 1
        print(f"{attack} from {src}: deduplicated (reported {(t0 - last) // 1000} s before)", flush=True)
    elif hit is None:
        missed[kind] += 1
        print(f"{attack} from {src}: missed", flush=True)
    else:
        latencies[kind].append(ms(hit["time"]) - t0)
        reported[(kind, dedupe_key)] = ms(hit["time"])
        print(f"{attack} from {src}: {kind} after {latencies[kind][-1]} ms", flush=True)
vary_for(max(0, ended - time.time()))
lab("traffic", "stop")
finished = now_ms()

false = [a for a in anomalies() if ms(a["time"]) >= learnt
         and not any(a.get("pod") == pod and lo <= ms(a["time"]) <= hi for pod, lo, hi in windows)]
hours = (finished - learnt) / 3_600_000
per_wh = len(false) / (WORKLOADS * hours) if hours > 0 else float("nan")

with open(REPORT, "w") as f:
    f.write("# Anomaly detection\n\n")
    f.write("`bash scripts/bench-anomalies.sh` (release build): a 2-node lab with the shop of `bulkhead lab traffic`\n")
    f.write(f"(steady uploads of `orders` to the outside host), the relay learning for {LEARNING} s while the shop\n")
    f.write(f"scales, rolls and changes its load; then {(finished - learnt) / 60000:.1f} min of the same variation with each\n")
    f.write(f"attack injected {ROUNDS} times. Latency: the anomaly's time less the attack's start; missed: not\n")
    f.write(f"reported with the right kind and pod within {DETECT} s; deduplicated: a repeat the relay does not report\n")
    f.write("again because the same anomaly (kind, workload, peer — for scan and exfiltration the pod) was reported\n")
    f.write("less than 10 min before.\n\n")
    f.write("| attack | kind | detected | median ms | max ms | missed | deduplicated |\n| --- | --- | --- | --- | --- | --- | --- |\n")
    for attack, kind in KINDS:
        l = latencies[kind]
        med = f"{statistics.median(l):.0f}" if l else "-"
        mx = f"{max(l)}" if l else "-"
        f.write(f"| {attack} | {kind} | {len(l)}/{len(l) + missed[kind]} | {med} | {mx} | {missed[kind]} | {deduped[kind]} |\n")
    f.write(f"\nFalse alerts: {len(false)} over {WORKLOADS} workloads x {hours:.3f} h = "
            f"**{per_wh:.2f} per workload-hour**.\n")
    for a in false[:20]:
        f.write(f"- {a['time']} {a['kind']} {a['namespace']}/{a['workload']}: {a['explanation']}\n")
print(open(REPORT).read())
EOF
