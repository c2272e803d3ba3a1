#!/usr/bin/env bash
# Instructions per request, counted by callgrind (deterministic where wall-clock runs are noise):
# one tidegate worker under valgrind, the scenario's conf from bench/conf/, an origin nginx for
# proxied scenarios, a warm-up, counters zeroed, then a bounded wrk run.
#   bench/callgrind.sh b_plain              # -> "b_plain: N requests, M Ir/request"
#   SERVER=/usr/sbin/nginx bench/callgrind.sh b_plain   # the same count for nginx's worker
#   KEEP=1 bench/callgrind.sh b_plain       # keep callgrind.out for callgrind_annotate
set -euo pipefail
cd "$(dirname "$0")"
BENCH=$(pwd)
ROOT=$(cd .. && pwd)
SC=${1:-b_plain}
URL_PATH=${URL_PATH:-/}
SERVER=${SERVER:-$ROOT/target/release/tidegate}
NGINX=${NGINX:-/usr/sbin/nginx}
RUN_DIR=${RUN_DIR:-/tmp/tidegate-callgrind}
PORT=${PORT:-18090}
ORIGIN_PORT=${ORIGIN_PORT:-18091}
ORIGIN_BIG_PORT=${ORIGIN_BIG_PORT:-18092}
CONNS=${CONNS:-10}
DURATION=${DURATION:-5s}
rm -rf "$RUN_DIR"; mkdir -p "$RUN_DIR"

render() {
    sed -e "s|@PROXY_PORT@|$PORT|g" -e "s|@PROXY_WORKERS@|1|g" -e "s|@ORIGIN_WORKERS@|1|g" \
        -e "s|@ORIGIN_PORT@|$ORIGIN_PORT|g" -e "s|@ORIGIN_BIG_PORT@|$ORIGIN_BIG_PORT|g" \
        -e "s|@RUN_DIR@|$RUN_DIR|g" -e "s|@LUA_PATH@|$BENCH/lua-none/?.lua|g" "$1"
}
wait_port() { for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

pids=()
trap 'for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true' EXIT
if grep -q '@ORIGIN_' "conf/$SC.conf"; then
    mkdir -p "$RUN_DIR/origin/logs" "$RUN_DIR/origin/tmp" "$RUN_DIR/origin/html"
    head -c 102400 /dev/zero | tr '\0' x > "$RUN_DIR/origin/html/big.html"
    render conf/origin.conf > "$RUN_DIR/origin/nginx.conf"
    taskset -c 0 "$NGINX" -p "$RUN_DIR/origin" -c "$RUN_DIR/origin/nginx.conf" > "$RUN_DIR/origin.log" 2>&1 &
    pids+=($!)
    wait_port "$ORIGIN_PORT"
fi
mkdir -p "$RUN_DIR/server/logs" "$RUN_DIR/server/tmp"
render "conf/$SC.conf" | sed -e 's|^master_process on;|master_process off;|' > "$RUN_DIR/server/nginx.conf"
taskset -c 1 valgrind --tool=callgrind ${VG_OPTS:-} --trace-children=yes --collect-atstart=yes \
    --callgrind-out-file="$RUN_DIR/callgrind.out.%p" \
    "$SERVER" -p "$RUN_DIR/server" -c "$RUN_DIR/server/nginx.conf" > "$RUN_DIR/server.log" 2>&1 &
pids+=($!)
wait_port "$PORT"
taskset -c 0 wrk -t1 -c"$CONNS" -d3s -H 'Host: bench.test' "http://127.0.0.1:$PORT$URL_PATH" > /dev/null
callgrind_control -z > /dev/null
out=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"$DURATION" -H 'Host: bench.test' "http://127.0.0.1:$PORT$URL_PATH")
callgrind_control -d > /dev/null
reqs=$(echo "$out" | awk '/requests in/ {print $1}')
sleep 1
ir=0
for f in "$RUN_DIR"/callgrind.out.*; do
    # The dump after zeroing is the numbered one (callgrind.out.PID.1 ...).
    case $f in *.*.[0-9]*) v=$(awk '/^summary:/ {print $2}' "$f"); ir=$((ir + ${v:-0}));; esac
done
awk -v sc="$SC" -v n="$reqs" -v ir="$ir" 'BEGIN { printf "%s: %d requests, %.0f Ir/request\n", sc, n, ir / n }'
if [ -n "${KEEP:-}" ]; then echo "callgrind files: $(ls "$RUN_DIR"/callgrind.out.*)"; fi
