#!/usr/bin/env bash
# Side-by-side benchmark: the same nginx.conf on nginx + lua-nginx-module (Debian packages) and
# on tidegate, alternated in one run, pinned (server on CPU 1, wrk on CPU 0), one worker each.
# Reports req/s, p99 and server CPU per request, and tidegate/nginx ratios.
#   bench/run.sh                       # scenarios d_lua_content g_access_shdict, 3 rounds
#   SCENARIOS=d_lua_content ROUNDS=5 DURATION=10s bench/run.sh
#   SCENARIOS="b_plain b_plain:/big.html" bench/run.sh   # scenario[:path]; default path /
# A scenario whose conf uses @ORIGIN_PORT@/@ORIGIN_BIG_PORT@ gets an origin nginx (conf/origin.conf,
# no Lua) started once for the run, pinned with wrk on CPU 0.
set -euo pipefail
cd "$(dirname "$0")"
BENCH=$(pwd)
ROOT=$(cd .. && pwd)
SCENARIOS=${SCENARIOS:-"d_lua_content g_access_shdict"}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8s}
WARMUP=${WARMUP:-2s}
CONNS=${CONNS:-50}
PORT=${PORT:-18080}
ORIGIN_PORT=${ORIGIN_PORT:-18081}
ORIGIN_BIG_PORT=${ORIGIN_BIG_PORT:-18082}
RUN_DIR=${RUN_DIR:-/tmp/tidegate-bench}
TIDEGATE=${TIDEGATE:-$ROOT/target/release/tidegate}
NGINX=${NGINX:-/usr/sbin/nginx}
OUT=${OUT:-$BENCH/results/run-$(date +%Y%m%dT%H%M%S).md}

need=()
command -v wrk >/dev/null || need+=(wrk)
[ -x "$NGINX" ] || need+=(nginx)
[ -f /usr/lib/nginx/modules/ngx_http_lua_module.so ] || need+=(libnginx-mod-http-lua lua-resty-core)
if grep -q @REDIS_PORT@ $(for s in $SCENARIOS; do echo "conf/${s%%:*}.conf"; done); then
    command -v redis-server >/dev/null || need+=(redis-server)
    [ -f /usr/share/lua/5.1/nginx/redis.lua ] || need+=(lua-nginx-redis)
fi
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ -x "$TIDEGATE" ] || "$ROOT/scripts/build.sh"
mkdir -p "$(dirname "$OUT")" "$RUN_DIR"

# Redis for the scenarios that use it: pinned with wrk on CPU 0, seeded, stopped on exit.
REDIS_PORT=${REDIS_PORT:-18379}
REDIS_PID=
if grep -q @REDIS_PORT@ $(for s in $SCENARIOS; do echo "conf/${s%%:*}.conf"; done); then
    taskset -c 0 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$RUN_DIR" > "$RUN_DIR/redis.log" 2>&1 &
    REDIS_PID=$!
    # Wait for it to exit: a run started right after this one reuses the port.
    trap '[ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null && wait "$REDIS_PID" 2>/dev/null' EXIT
    for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
    redis-cli -p "$REDIS_PORT" set license:bench.test origin_1k >/dev/null
    kill -0 "$REDIS_PID" 2>/dev/null || { echo "redis-server did not start (port $REDIS_PORT busy?)" >&2; exit 1; }
fi

ticks() { # utime+stime of a pid and its children (threads are included in the process)
    local t=0 p v
    for p in $1 $(ps -o pid= --ppid "$1" 2>/dev/null); do
        v=$(awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$p/stat" 2>/dev/null || echo 0)
        t=$((t + ${v:-0}))
    done
    echo $t
}

render() { # template -> stdout
    sed -e "s|@PROXY_PORT@|$PORT|g" -e "s|@PROXY_WORKERS@|1|g" -e "s|@ORIGIN_WORKERS@|1|g" \
        -e "s|@ORIGIN_PORT@|$ORIGIN_PORT|g" -e "s|@ORIGIN_BIG_PORT@|$ORIGIN_BIG_PORT|g" \
        -e "s|@RUN_DIR@|$RUN_DIR|g" "$1"
}

gen_big_html() {  # deterministic 102400-byte HTML with "origin-server" in every line (as the shared harness)
    awk 'BEGIN {
        s = "<!DOCTYPE html>\n<html><head><title>origin-server big page</title></head><body>\n"; n = length(s)
        printf "%s", s
        for (i = 1; ; i++) {
            l = sprintf("<p>line %05d served by origin-server, lorem ipsum dolor sit amet consectetur</p>\n", i)
            if (n + length(l) + 15 > 102400) break
            printf "%s", l; n += length(l)
        }
        pad = 102400 - n - 15
        for (j = 0; j < pad; j++) printf "x"
        printf "\n</body></html>"
    }' > "$1"
}

ORIGIN_PID=
start_origin() {
    local prefix=$RUN_DIR/origin
    rm -rf "$prefix"; mkdir -p "$prefix/logs" "$prefix/tmp" "$prefix/html"
    gen_big_html "$prefix/html/big.html"
    render "$BENCH/conf/origin.conf" > "$prefix/nginx.conf"
    taskset -c 0 "$NGINX" -p "$prefix" -c "$prefix/nginx.conf" > "$prefix/out.log" 2>&1 &
    ORIGIN_PID=$!
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$ORIGIN_BIG_PORT") 2>/dev/null && break; sleep 0.1; done
}
stop_origin() { [ -n "$ORIGIN_PID" ] && { kill -TERM "$ORIGIN_PID" 2>/dev/null; wait "$ORIGIN_PID" 2>/dev/null || true; }; }
stop_redis() { [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null && wait "$REDIS_PID" 2>/dev/null; }
trap 'stop_origin; stop_redis' EXIT

origin_accepts() { # connections the origin accepted so far (0 without an origin)
    if [ -z "$ORIGIN_PID" ]; then echo 0; return; fi
    curl -s "http://127.0.0.1:$ORIGIN_PORT/__origin_status" | awk 'NR == 3 {print $1}'
}

run_one() { # server scenario[:path] -> "rps p99_ms cpu_us_per_req upstream_conns"
    local server=$1 sc=${2%%:*} path=/ prefix=$RUN_DIR/$1
    [[ $2 == *:* ]] && path=${2#*:}
    rm -rf "$prefix"; mkdir -p "$prefix/logs" "$prefix/tmp"
    local a0; a0=$(origin_accepts)
    # nginx gets bench/lua first on its path (resty.redis -> Debian's nginx.redis on cosockets);
    # tidegate gets its bundled resty.redis, or the same shim with TIDEGATE_REDIS=cosocket.
    local lua_path="$BENCH/lua/?.lua"
    if [ "$server" != nginx ] && [ "${TIDEGATE_REDIS:-bundled}" = bundled ]; then
        lua_path="$BENCH/lua-none/?.lua"
    fi
    render "$BENCH/conf/$sc.conf" | sed -e "s|@REDIS_PORT@|$REDIS_PORT|g" -e "s|@LUA_PATH@|$lua_path|g" \
        > "$prefix/nginx.conf"
    if [ "$server" = nginx ]; then
        taskset -c 1 "$NGINX" -p "$prefix" -c "$prefix/nginx.conf" > "$prefix/out.log" 2>&1 &
    else
        taskset -c 1 "$TIDEGATE" -p "$prefix" -c "$prefix/nginx.conf" > "$prefix/out.log" 2>&1 &
    fi
    local pid=$!
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
    curl -sf -H 'Host: bench.test' "http://127.0.0.1:$PORT$path" > /dev/null || { echo "sanity failed for $server $sc" >&2; cat "$prefix/out.log" >&2; }
    taskset -c 0 wrk -t2 -c"$CONNS" -d"$WARMUP" -H 'Host: bench.test' "http://127.0.0.1:$PORT$path" > /dev/null
    local t0; t0=$(ticks $pid)
    local out; out=$(taskset -c 0 wrk -t2 -c"$CONNS" -d"$DURATION" --latency -H 'Host: bench.test' "http://127.0.0.1:$PORT$path")
    local t1; t1=$(ticks $pid)
    kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true
    # Upstream connections opened over sanity check, warm-up and run (less our status request).
    local a1; a1=$(origin_accepts)
    local conns=0; [ -n "$ORIGIN_PID" ] && conns=$((a1 - a0 - 1))
    local rps reqs p99
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    p99=$(echo "$out" | awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}')
    local cpu_us; cpu_us=$(awk -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v n="$reqs" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
    echo "$rps $p99 $cpu_us $conns"
}

{
echo "# tidegate vs nginx + lua-nginx-module ($(date -u +%Y-%m-%dT%H:%MZ))"
echo
echo "wrk -t2 -c$CONNS -d$DURATION on CPU 0, one server worker on CPU 1, $ROUNDS alternated rounds."
echo "nginx $("$NGINX" -v 2>&1 | sed 's|.*nginx/||'), tidegate $("$TIDEGATE" -v 2>&1 | sed 's|.*tidegate/||')"
echo
echo "| scenario | round | nginx req/s | tidegate req/s | ratio req/s | nginx p99 ms | tidegate p99 ms | nginx CPU us/req | tidegate CPU us/req | ratio CPU/req | nginx upstream conns | tidegate upstream conns |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
} | tee "$OUT"
for sc in $SCENARIOS; do
    if [ -z "$ORIGIN_PID" ] && grep -q '@ORIGIN_' "$BENCH/conf/${sc%%:*}.conf"; then start_origin; fi
    # Upstream connection counts only mean something for scenarios that proxy to the origin.
    proxied=; grep -q '@ORIGIN_' "$BENCH/conf/${sc%%:*}.conf" && proxied=1
    for r in $(seq "$ROUNDS"); do
        read -r n_rps n_p99 n_cpu n_up < <(run_one nginx "$sc")
        read -r t_rps t_p99 t_cpu t_up < <(run_one tidegate "$sc")
        awk -v sc="$sc" -v r="$r" -v nr="$n_rps" -v tr="$t_rps" -v np="$n_p99" -v tp="$t_p99" -v nc="$n_cpu" -v tc="$t_cpu" \
            -v nu="$n_up" -v tu="$t_up" -v origin="$proxied" \
            'BEGIN { if (origin == "") { nu = "-"; tu = "-" }
                     printf "| %s | %d | %.0f | %.0f | %.2f | %.2f | %.2f | %.1f | %.1f | %.2f | %s | %s |\n", sc, r, nr, tr, tr/nr, np, tp, nc, tc, tc/nc, nu, tu }' | tee -a "$OUT"
    done
done
# One line per scenario: medians over the rounds (a single round on these shared machines swings
# 20-40%; the median of alternated rounds is the number to compare).
{
echo
echo "| scenario | rounds | median ratio req/s | min-max ratio req/s | median ratio p99 (tidegate/nginx) | median ratio CPU/req |"
echo "|---|---:|---:|---:|---:|---:|"
awk -F'|' 'NR > 2 && $3 ~ /^ *[0-9]+ *$/ {
        sc = $2; gsub(/ /, "", sc); n[sc]++; if (!(sc in order)) { order[sc] = ++k; name[k] = sc }
        r[sc, n[sc]] = $6 + 0; p[sc, n[sc]] = ($8 + 0) / (($7 + 0) > 0 ? $7 : 1); c[sc, n[sc]] = $11 + 0 }
    function med(a, sc, m,    i, j, t, v) {
        for (i = 1; i <= m; i++) v[i] = a[sc, i]
        for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
        return m % 2 ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2 }
    function lo(a, sc, m,    i, x) { x = a[sc, 1]; for (i = 2; i <= m; i++) if (a[sc, i] < x) x = a[sc, i]; return x }
    function hi(a, sc, m,    i, x) { x = a[sc, 1]; for (i = 2; i <= m; i++) if (a[sc, i] > x) x = a[sc, i]; return x }
    END { for (i = 1; i <= k; i++) { sc = name[i]; m = n[sc]
            printf "| %s | %d | %.2f | %.2f-%.2f | %.2f | %.2f |\n", sc, m, med(r, sc, m), lo(r, sc, m), hi(r, sc, m), med(p, sc, m), med(c, sc, m) } }' "$OUT"
} | tee -a "$OUT.summary"
cat "$OUT.summary" >> "$OUT" && rm -f "$OUT.summary"
echo "results: $OUT"
