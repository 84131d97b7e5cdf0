#!/usr/bin/env bash
# Benchmarks of containers (issue 3), side by side with the peers (../shared/bench/peers.sh).
#
#   scripts/bench-containers.sh             build release, run everything, print a Markdown report
#   PEERS=0 scripts/bench-containers.sh     skip the peers' run (their figures then come from
#                                           ../shared/bench/peers-baseline.md)
#   RUNS=30 WARMUP=5 NIDLE=100 scripts/bench-containers.sh
#
# It starts its own grid-api and core0 (own redis-server) on free loopback ports under a
# temporary directory, inside a network namespace of its own (`unshare --net`): the containers
# with a default nic get their NAT bridge, veths and nftables table there, never on the host.
# Everything (processes, containers, cgroups, the directory) is removed at exit, also on failure.
# Needs root (namespaces, cgroups, apt for hyperfine).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BIN=$ROOT/target/release
RUNS=${RUNS:-30}
WARMUP=${WARMUP:-5}
NIDLE=${NIDLE:-100}
PEERS=${PEERS:-1}
export RUNS WARMUP NIDLE

# ---------------------------------------------------------------------------------------------
# Inside the network namespace: the grid, the containers and the measurements. Results go to
# $W/ours as hyperfine JSON files and mem.txt.
if [ "${1:-}" = "--in-netns" ]; then
    W=$2
    O=$W/ours
    mkdir -p "$O"
    ip link set lo up
    pids=()
    cleanup() {
        # Containers first, through core0, while it runs; then the processes; then teardown.
        if [ -n "${PW:-}" ]; then
            "$BIN/grid-bench" corex-list --redis "127.0.0.1:$REDIS_PORT" --password "$PW" 2>/dev/null |
                while read -r _ name _; do
                    "$BIN/grid-bench" corex-terminate --redis "127.0.0.1:$REDIS_PORT" --password "$PW" \
                        --name "$name" --if-exists >/dev/null 2>&1 || true
                done
        fi
        for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
        wait 2>/dev/null || true
        [ -d "$W/node" ] && "$BIN/core0" teardown --data-dir "$W/node" >/dev/null 2>&1 || true
        for c in /sys/fs/cgroup/*/grid/n"$IDX" /sys/fs/cgroup/grid/n"$IDX"; do
            [ -d "$c" ] && rmdir "$c" 2>/dev/null || true
        done
    }
    trap cleanup EXIT
    trap 'exit 143' TERM INT

    free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
    API_PORT=$(free_port); REDIS_PORT=$(free_port)
    TOKEN=bench-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n'); JOIN=join-$TOKEN
    URL=http://127.0.0.1:$API_PORT
    # A node index of its own (cgroups grid/n<idx> are host-wide), apart from the tests' 900-999.
    IDX=$((800 + $$ % 50))
    mkdir -p "$W/node"
    echo "$IDX" >"$W/node/node-index"

    "$BIN/grid-api" --listen 127.0.0.1:$API_PORT --data-dir "$W/api" --admin-token "$TOKEN" \
        --join-token "$JOIN" >"$W/api.log" 2>&1 &
    pids+=($!)
    until curl -sf "$URL/health" >/dev/null; do sleep 0.05; done
    "$BIN/core0" run --node-id benchnode --data-dir "$W/node" --redis-listen 127.0.0.1:$REDIS_PORT \
        --join "$URL" --join-token "$JOIN" >"$W/core0.out" 2>"$W/core0.log" &
    pids+=($!)
    until grep -q '^core0 ready' "$W/core0.out" 2>/dev/null; do sleep 0.05; done
    until curl -sf -H "Authorization: Bearer $TOKEN" "$URL/nodes/benchnode" | grep -q '"running"'; do sleep 0.05; done
    PW=$(cat "$W/node/redis.password")
    export GRID_URL=$URL GRID_TOKEN=$TOKEN
    IMAGE=file://$W/image/busybox.tar.gz
    GB=("$BIN/grid-bench")
    R=(--redis "127.0.0.1:$REDIS_PORT" --password "$PW")
    HF=(hyperfine -N --style none --warmup "$WARMUP" --runs "$RUNS")
    q() { printf '%q ' "$@"; }

    # Resolve the image once: core0 keeps it unpacked, keyed by its URL.
    "${GB[@]}" corex-create "${R[@]}" --image "$IMAGE" --name gb-warm
    "${GB[@]}" corex-terminate "${R[@]}" --name gb-warm

    echo "core0: create to running" >&2
    "${GB[@]}" corex-create "${R[@]}" --image "$IMAGE" --name gb-c
    "${HF[@]}" --export-json "$O/core0-create.json" \
        --prepare "$(q "${GB[@]}" corex-terminate "${R[@]}" --name gb-c)" \
        "$(q "${GB[@]}" corex-create "${R[@]}" --image "$IMAGE" --name gb-c)" >/dev/null
    "${GB[@]}" corex-terminate "${R[@]}" --name gb-c
    echo "core0: delete" >&2
    "${HF[@]}" --export-json "$O/core0-delete.json" \
        --prepare "$(q "${GB[@]}" corex-create "${R[@]}" --image "$IMAGE" --name gb-c)" \
        "$(q "${GB[@]}" corex-terminate "${R[@]}" --name gb-c)" >/dev/null
    echo "core0: create + delete in one process" >&2
    "${HF[@]}" --export-json "$O/core0-start-delete.json" \
        "$(q "${GB[@]}" corex-start-delete "${R[@]}" --image "$IMAGE" --name gb-sd)" >/dev/null
    echo "core0: create to running, default nic (veth + address)" >&2
    "${GB[@]}" corex-create "${R[@]}" --image "$IMAGE" --name gb-n --nic
    "${HF[@]}" --export-json "$O/core0-create-nic.json" \
        --prepare "$(q "${GB[@]}" corex-terminate "${R[@]}" --name gb-n)" \
        "$(q "${GB[@]}" corex-create "${R[@]}" --image "$IMAGE" --name gb-n --nic)" >/dev/null
    "${GB[@]}" corex-terminate "${R[@]}" --name gb-n

    # Through the API: curl and the grid CLI with "nics": [] (the same container as the core0
    # rows), and the CLI with a default nic.
    NODE=$URL/nodes/benchnode
    printf '{"id":"ba","hostname":"ba","flist":"%s","hostNetworking":false,"filesystems":[],"initprocesses":[],"ports":[],"nics":[]}' \
        "$IMAGE" >"$W/ba.json"
    CURL=(curl -sf -o /dev/null -H "Authorization: Bearer $TOKEN")
    echo "API (curl): create to running" >&2
    "${CURL[@]}" -X POST -H 'content-type: application/json' --data-binary "@$W/ba.json" "$NODE/containers"
    "${HF[@]}" --export-json "$O/api-create.json" \
        --prepare "$(q "${CURL[@]}" -X DELETE "$NODE/containers/ba")" \
        "$(q "${CURL[@]}" -X POST -H 'content-type: application/json' --data-binary "@$W/ba.json" "$NODE/containers")" >/dev/null
    "${CURL[@]}" -X DELETE "$NODE/containers/ba"
    echo "API (curl): delete" >&2
    "${HF[@]}" --export-json "$O/api-delete.json" \
        --prepare "$(q "${CURL[@]}" -X POST -H 'content-type: application/json' --data-binary "@$W/ba.json" "$NODE/containers")" \
        "$(q "${CURL[@]}" -X DELETE "$NODE/containers/ba")" >/dev/null
    echo "API (grid CLI): create to running, no nic" >&2
    "$BIN/grid" container create benchnode bn --image "$IMAGE" --no-nic >/dev/null
    "${HF[@]}" --export-json "$O/cli-create-nonic.json" \
        --prepare "$(q "$BIN/grid" container rm benchnode bn)" \
        "$(q "$BIN/grid" container create benchnode bn --image "$IMAGE" --no-nic)" >/dev/null
    "$BIN/grid" container rm benchnode bn >/dev/null
    echo "API (grid CLI): create to running, default nic" >&2
    "$BIN/grid" container create benchnode bc --image "$IMAGE" >/dev/null
    "${HF[@]}" --export-json "$O/cli-create.json" \
        --prepare "$(q "$BIN/grid" container rm benchnode bc)" \
        "$(q "$BIN/grid" container create benchnode bc --image "$IMAGE")" >/dev/null
    "$BIN/grid" container rm benchnode bc >/dev/null
    echo "API (grid CLI): delete" >&2
    "${HF[@]}" --export-json "$O/cli-delete.json" \
        --prepare "$(q "$BIN/grid" container create benchnode bc --image "$IMAGE")" \
        "$(q "$BIN/grid" container rm benchnode bc)" >/dev/null

    echo "exec true" >&2
    "${GB[@]}" corex-create "${R[@]}" --image "$IMAGE" --name gb-x
    XID=$("${GB[@]}" corex-list "${R[@]}" | awk '$2 == "gb-x" {print $1}')
    "${HF[@]}" --export-json "$O/core0-exec.json" \
        "$(q "${GB[@]}" corex-exec "${R[@]}" --name gb-x -- true)" >/dev/null
    "${HF[@]}" --export-json "$O/core0-exec-id.json" \
        "$(q "${GB[@]}" corex-exec "${R[@]}" --id "$XID" -- true)" >/dev/null
    "${GB[@]}" corex-terminate "${R[@]}" --name gb-x
    "$BIN/grid" container create benchnode bx --image "$IMAGE" >/dev/null
    "${HF[@]}" --export-json "$O/cli-exec.json" \
        "$(q "$BIN/grid" container exec benchnode bx -- true)" >/dev/null
    "$BIN/grid" container rm benchnode bx >/dev/null
    "${GB[@]}" rtt "${R[@]}" --runs 2000 --command core.system >"$O/rtt.txt"

    echo "idle memory: $NIDLE containers" >&2
    avail() { awk '/MemAvailable/ {print $2}' /proc/meminfo; }
    before=$(avail)
    for i in $(seq 1 "$NIDLE"); do
        "${GB[@]}" corex-create "${R[@]}" --image "$IMAGE" --name "gb-idle-$i"
    done
    sleep 2 # let the containers settle (nothing to wait for: they are idle)
    after=$(avail)
    "${GB[@]}" corex-list "${R[@]}" | awk '$2 ~ /^gb-idle-/ {print $4}' >"$W/idle.pids"
    python3 - "$W/idle.pids" "$before" "$after" "$(pgrep -x core0 | head -n1)" >"$O/mem.txt" <<'PY'
import sys
pids = [p for p in open(sys.argv[1]).read().split() if p != "0"]
def rollup(pid):
    out = {}
    for line in open(f"/proc/{pid}/smaps_rollup"):
        parts = line.split()
        if len(parts) >= 3 and parts[-1] == "kB":
            out[parts[0].rstrip(":")] = int(parts[1])
    return out
rs = [rollup(p) for p in pids]
n = len(rs)
anon = sum(r.get("Pss_Anon", 0) for r in rs)
pss = sum(r.get("Pss", 0) for r in rs)
rss = sum(r.get("Rss", 0) for r in rs)
drop = (int(sys.argv[2]) - int(sys.argv[3])) / max(n, 1)
print(f"n={n} anon_sum={anon} anon_avg={anon / max(n, 1):.0f} pss_avg={pss / max(n, 1):.0f} rss_avg={rss / max(n, 1):.0f} drop_avg={drop:.0f}")
PY
    for i in $(seq 1 "$NIDLE"); do
        "${GB[@]}" corex-terminate "${R[@]}" --name "gb-idle-$i"
    done
    left=$("${GB[@]}" corex-list "${R[@]}" | wc -l)
    echo "left=$left" >>"$O/mem.txt"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# Outside: build, peers, then the grid part in a network namespace, then the report.
scripts/setup.sh --bench >&2
cargo build --release --workspace -q
W=$(mktemp -d /tmp/grid-bench-containers.XXXXXX)
inner=
cleanup() {
    [ -n "$inner" ] && kill "$inner" 2>/dev/null && wait "$inner" 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

scripts/build-test-image.sh "$W/image" >/dev/null
peers_note="from ../shared/bench/peers-baseline.md (2026-11-26T23:25Z run), not this run"
if [ "$PEERS" = 1 ] && [ -f ../shared/bench/peers.sh ]; then
    echo "peers.sh ..." >&2
    t0=$(date +%s)
    if PEERS_DIR=$W/peers RUNS=$RUNS WARMUP=$WARMUP timeout 600 bash ../shared/bench/peers.sh \
        >"$W/peers.out" 2>"$W/peers.log"; then
        peers_note="measured by ../shared/bench/peers.sh in this run ($(($(date +%s) - t0)) s, --runs $RUNS)"
    else
        peers_note="peers.sh failed in this run ($(tail -n 1 "$W/peers.log")): figures from ../shared/bench/peers-baseline.md"
    fi
fi

unshare --net -- bash "$0" --in-netns "$W" &
inner=$!
wait "$inner"
inner=

python3 - "$W" "$peers_note" "$RUNS" "$WARMUP" "$NIDLE" <<'PY'
import json, os, sys, subprocess, datetime
W, note, runs, warmup, nidle = sys.argv[1:6]
O = f"{W}/ours"; P = f"{W}/peers/results"

def med(path):
    if not os.path.exists(path):
        return None
    r = json.load(open(path))["results"][0]
    t = sorted(r["times"])
    return {"med": r["median"] * 1e3, "min": t[0] * 1e3, "max": t[-1] * 1e3, "p90": t[int(0.9 * (len(t) - 1))] * 1e3, "n": len(t)}

base = {"lxc-start-d": 6.1, "crun-start": 6.8, "runc-start": 25.7, "lxd-launch": 184.1, "lxd-start": 151.6,
        "crun-exec": 4.8, "lxc-attach": 4.8, "lxd-exec": 34.1, "runc-exec": 13.8}
def peer(key):
    m = med(f"{P}/{key}.json")
    return f"{m['med']:.1f}" if m else (f"{base[key]} (baseline)" if key in base else "-")

def ms(m):
    return f"{m['med']:.2f} (min {m['min']:.2f}, p90 {m['p90']:.2f}, max {m['max']:.2f})" if m else "failed"

o = {k: med(f"{O}/{k}.json") for k in ["core0-create", "core0-delete", "core0-start-delete", "core0-create-nic",
     "api-create", "api-delete", "cli-create-nonic", "cli-create", "cli-delete", "core0-exec", "core0-exec-id", "cli-exec"]}
mem = dict(kv.split("=") for kv in open(f"{O}/mem.txt").read().split()) if os.path.exists(f"{O}/mem.txt") else {}
rtt = open(f"{O}/rtt.txt").read().strip() if os.path.exists(f"{O}/rtt.txt") else "missing"

print("## Containers (issue 3)")
print()
mach = open("/proc/meminfo").readline().split()[1]
osr = dict(l.rstrip().split("=", 1) for l in open("/etc/os-release") if "=" in l)["PRETTY_NAME"].strip('"')
print(f"Machine: {os.cpu_count()} cores, {int(mach) // 1048576} GiB, {os.uname().release}, {osr}; "
      f"{datetime.datetime.utcnow():%Y-%m-%dT%H:%MZ}; load average at the end {open('/proc/loadavg').read().split()[0]} "
      "(other work on the machine makes every row, the peers' too, slower and noisier)")
print(f"Command: `scripts/bench-containers.sh` (hyperfine 1.15 `-N --warmup {warmup} --runs {runs}`, a client "
      "process per run; busybox image from `scripts/build-test-image.sh`, `file://` URL, unpacked once and "
      "cached by core0). The grid runs in a network namespace the script makes; containers have "
      "`\"nics\": []` (a network namespace holding only `lo`, like the peers' containers) unless the row says "
      "default nic. Peers: " + note + ".")
print()
print("All figures in ms, medians unless said otherwise.")
print()
print("| operation | Grid | peers (median) | target |")
print("|---|---|---|---|")
def row(op, m, peers, target):
    print(f"| {op} | {ms(m)} | {peers} | {target} |")
row("start to running, core0 (`grid-bench corex-create`; delete in --prepare)", o["core0-create"],
    f"lxc-start -d {peer('lxc-start-d')}, crun run -d {peer('crun-start')}, runc run -d {peer('runc-start')}, LXD launch {peer('lxd-launch')}, LXD start {peer('lxd-start')}",
    "≤ fastest peer")
row("delete, core0 (`grid-bench corex-terminate`: corex.find + corex.terminate)", o["core0-delete"], "-", "")
row("start + delete in one process, core0 (`grid-bench corex-start-delete`)", o["core0-start-delete"], "-", "")
row("start to running, core0, default nic (veth, address)", o["core0-create-nic"], f"lxc-execute with veth {peer('lxc-execute-veth')} (run /bin/true, not detached)", "")
row("start to running, API (`curl POST .../containers`, nics [])", o["api-create"], f"LXD launch {peer('lxd-launch')}", "< 12")
row("delete, API (`curl DELETE .../containers/{name}`)", o["api-delete"], "-", "")
row("start to running, API (`grid container create --no-nic`)", o["cli-create-nonic"], f"LXD launch {peer('lxd-launch')}", "< 12")
row("start to running, API (`grid container create`, default nic)", o["cli-create"], f"LXD launch {peer('lxd-launch')}", "")
row("delete, API (`grid container rm`)", o["cli-delete"], "-", "")
s = o["api-create"], o["api-delete"]
if all(s):
    print(f"| start + delete, API (sum of the two curl medians) | {s[0]['med'] + s[1]['med']:.2f} | - | |")
row("exec `true`, core0 (`grid-bench corex-exec --name`: corex.find + corex.dispatch + result)", o["core0-exec"],
    f"crun exec {peer('crun-exec')}, lxc-attach {peer('lxc-attach')}, runc exec {peer('runc-exec')}, LXD exec {peer('lxd-exec')}", "< 4")
row("exec `true`, core0, id known (`grid-bench corex-exec --id`: corex.dispatch + result)", o["core0-exec-id"], "", "< 4")
row("exec `true`, API (`grid container exec`)", o["cli-exec"], f"LXD exec {peer('lxd-exec')}", "")
print()
if mem:
    n = int(mem["n"])
    print(f"Idle memory: {n} idle containers (of {nidle} asked), Pss_Anon of their corex processes "
          f"(`/proc/<pid>/smaps_rollup`): sum {int(mem['anon_sum'])} kB, **{mem['anon_avg']} kB per container** "
          f"(target < 512 kB; LXC monitor 353 kB, LXD monitor 11230 kB in peers-baseline.md). Pss per corex "
          f"{mem['pss_avg']} kB, Rss {mem['rss_avg']} kB; host MemAvailable drop {mem['drop_avg']} kB per container "
          f"(noisy, kernel objects included). Containers left after deleting them: {mem.get('left', '?')}.")
    print()
idx = f"{P}/index.tsv"
if os.path.exists(idx):
    bad = [l.rstrip("\n").split("\t") for l in open(idx) if not l.rstrip("\n").endswith("\tok")]
    if bad:
        print("Peers' rows not measured in this run (their baseline figure is shown instead where there is one):")
        print()
        for f in bad:
            print(f"- {f[1]} {f[2]}: {f[3]}")
        print()
pm = f"{P}/mem.tsv"
if os.path.exists(pm):
    print("Peers' idle memory in this run (kB per container; tool, process, Pss, Pss_Anon, MemAvailable drop):")
    print()
    for line in open(pm):
        f = line.rstrip("\n").split("\t")
        print(f"- {f[0]} {f[1]}: Pss {f[4]}, Pss_Anon {f[5]}, drop {f[6]}")
    print()
print(f"Raw core0 round trip in the same run (one client process, {rtt})")
print()
print("Hyperfine commands: `grid-bench corex-create --redis A --password P --image file://…/busybox.tar.gz --name gb-c`, "
      "`grid-bench corex-exec … --name gb-x -- true`, `curl -sf -X POST -H 'Authorization: Bearer …' --data-binary @ba.json …/nodes/benchnode/containers`, "
      "`grid container create benchnode bn --image … --no-nic`, `grid container exec benchnode bx -- true`.")
PY
