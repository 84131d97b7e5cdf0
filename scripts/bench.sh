#!/usr/bin/env bash
# Benchmarks of the node read path, side by side with the peers (../shared/bench/peers.sh).
#
#   scripts/bench.sh            build release, run everything, print a Markdown report
#   PEERS=0 scripts/bench.sh    skip the peers' run (LXD REST figure)
#   DURATION=10 scripts/bench.sh  seconds per wrk run
#
# It starts its own grid-api and core0 (own redis-server) on free loopback ports under a
# temporary directory and removes all of it on exit. Needs root for apt (wrk, hyperfine).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DURATION=${DURATION:-10}
PEERS=${PEERS:-1}
scripts/setup.sh --bench >&2
cargo build --release --workspace -q
BIN=$ROOT/target/release

W=$(mktemp -d /tmp/grid-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -d "$W/node" ] && "$BIN/core0" teardown --data-dir "$W/node" >/dev/null 2>&1 || true
    rm -rf "$W"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
API_PORT=$(free_port); REDIS_PORT=$(free_port)
TOKEN=bench-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n'); JOIN=join-$TOKEN
URL=http://127.0.0.1:$API_PORT

"$BIN/grid-api" --listen 127.0.0.1:$API_PORT --data-dir "$W/api" --admin-token "$TOKEN" \
    --join-token "$JOIN" 2>"$W/api.log" &
pids+=($!)
until curl -sf "$URL/health" >/dev/null; do sleep 0.05; done
"$BIN/core0" run --node-id benchnode --data-dir "$W/node" --redis-listen 127.0.0.1:$REDIS_PORT \
    --join "$URL" --join-token "$JOIN" >"$W/core0.out" 2>"$W/core0.log" &
pids+=($!)
until grep -q '^core0 ready' "$W/core0.out" 2>/dev/null; do sleep 0.05; done
until curl -sf -H "Authorization: Bearer $TOKEN" "$URL/nodes/benchnode" | grep -q '"running"'; do sleep 0.05; done
PW=$(cat "$W/node/redis.password")
MEM=$URL/nodes/benchnode/mem
AUTH="Authorization: Bearer $TOKEN"

commands() { curl -sf -H "$AUTH" "$URL/nodes/benchnode/state" | python3 -c 'import json,sys; print(json.load(sys.stdin)["commands"])'; }

echo "## Node read path: GET /nodes/{id}/mem (API → Redis → core0 → back)"
echo
echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r), $(. /etc/os-release; echo "$PRETTY_NAME"); $(date -u +%Y-%m-%dT%H:%MZ)"
echo "Command: \`scripts/bench.sh\` (DURATION=$DURATION)"
echo
c0=$(commands)
one=$(wrk -t1 -c1 -d"${DURATION}s" --latency -H "$AUTH" "$MEM")
c1=$(commands)
many=$(wrk -t2 -c64 -d"${DURATION}s" --latency -H "$AUTH" "$MEM")
c2=$(commands)
req1=$(echo "$one" | awk '/requests in/ {print $1}')
req64=$(echo "$many" | awk '/requests in/ {print $1}')
err1=$(echo "$one" | awk '/Non-2xx|Socket errors/' | tr '\n' ' ')
err64=$(echo "$many" | awk '/Non-2xx|Socket errors/' | tr '\n' ' ')
p50=$(echo "$one" | awk '$1=="50%" {print $2}'); p99=$(echo "$one" | awk '$1=="99%" {print $2}')
rps=$(echo "$many" | awk '/Requests\/sec/ {print $2}')
m50=$(echo "$many" | awk '$1=="50%" {print $2}'); m99=$(echo "$many" | awk '$1=="99%" {print $2}')
echo "| measurement | result |"
echo "|---|---|"
echo "| 1 connection (wrk -t1 -c1 ${DURATION}s): p50 / p99 | $p50 / $p99 ($req1 requests; errors: ${err1:-none}) |"
echo "| 64 connections (wrk -t2 -c64 ${DURATION}s): requests/s | $rps (p50 $m50, p99 $m99; $req64 requests; errors: ${err64:-none}) |"
# Each wrk run's requests must each have run a command on the node (+1 for the state read).
echo "| commands executed by core0 during the runs (its own counter) | $((c1 - c0 - 1)) for $req1 requests; $((c2 - c1 - 1)) for $req64 requests |"
echo
echo "Raw wrk output (1 connection):"
echo '```'; echo "$one"; echo '```'
echo "Raw wrk output (64 connections):"
echo '```'; echo "$many"; echo '```'

echo
echo "## A client process per request: curl spawned by hyperfine"
echo
hyperfine -N --style none --warmup 20 --runs 200 --export-json "$W/curl.json" \
    "curl -sf -o /dev/null -H '$AUTH' $MEM" >/dev/null
python3 - "$W/curl.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"][0]
ts = sorted(r["times"])
print(f"| Grid: curl GET /nodes/{{id}}/mem | median {ts[len(ts)//2]*1e3:.2f} ms, mean {r['mean']*1e3:.2f} ms ± {r['stddev']*1e3:.2f} ({len(ts)} runs) |")
PY
hyperfine -N --style none --warmup 20 --runs 200 --export-json "$W/curl0.json" \
    "curl -sf -o /dev/null $URL/health" >/dev/null
python3 - "$W/curl0.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"][0]
ts = sorted(r["times"])
print(f"| Grid: curl GET /health (no token, no node: curl's own start-up plus HTTP) | median {ts[len(ts)//2]*1e3:.2f} ms |")
PY
if [ "$PEERS" = 1 ] && [ -f ../shared/bench/peers.sh ]; then
    PEERS_DIR=$W/peers bash ../shared/bench/peers.sh >"$W/peers.out" 2>"$W/peers.log" || true
    if [ -f "$W/peers/results/lxd-rest.json" ]; then
        python3 - "$W/peers/results/lxd-rest.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"][0]
ts = sorted(r["times"])
print(f"| LXD: curl GET /1.0/instances on its unix socket (peers.sh, same run) | median {ts[len(ts)//2]*1e3:.2f} ms, mean {r['mean']*1e3:.2f} ms |")
PY
    else
        echo "| LXD (peers.sh) | not measured: $(tail -n 1 "$W/peers.log" 2>/dev/null) |"
    fi
fi

echo
echo "## Raw core0 round trip over Redis (no API)"
echo
"$BIN/grid-bench" rtt --redis 127.0.0.1:$REDIS_PORT --password "$PW" --runs 3000 --command core.system
"$BIN/grid-bench" rtt --redis 127.0.0.1:$REDIS_PORT --password "$PW" --runs 3000 --command core.ping
