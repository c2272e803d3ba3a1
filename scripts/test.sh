#!/usr/bin/env bash
# Install what the tests need, then run every test: rustfmt, clippy, cargo test, and the Lua
# specs under spec/ through tidegate's own runner. Ends with one line: "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# Unmodified Debian builds of pure-Lua OpenResty libraries, run on our cosockets (tests/debian_libs.rs).
[ -f /usr/share/lua/5.1/nginx/redis.lua ] || need_apt+=(lua-nginx-redis)
[ -f /usr/share/lua/5.1/resty/lrucache.lua ] || need_apt+=(lua-resty-lrucache)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "== installing: ${need_apt[*]}"
    if [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}") >/dev/null 2>&1 \
            || echo "warning: apt-get install ${need_apt[*]} failed; tests that need them will fail"
    else
        echo "warning: not root, cannot install ${need_apt[*]}"
    fi
fi

passed=0
failed=0
step() { # name, command...
    local name=$1; shift
    echo "== $name"
    if "$@"; then passed=$((passed + 1)); else echo "FAILED: $name"; failed=$((failed + 1)); fi
}

step "cargo fmt --check" cargo fmt --check
step "cargo clippy" cargo clippy --all-targets -- -D warnings

# Private logs: two runs at once (worktrees, CI) must not read each other's counts.
logdir=$(mktemp -d)
trap 'rm -rf "$logdir"' EXIT

echo "== cargo test"
cargo test 2>&1 | tee "$logdir/cargo-test.log"
cargo_rc=${PIPESTATUS[0]}
while read -r p f; do
    passed=$((passed + p)); failed=$((failed + f))
done < <(sed -n 's/^test result: [a-zA-Z]*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\1 \2/p' "$logdir/cargo-test.log")
if [ "$cargo_rc" -ne 0 ] && ! grep -q '^test result: FAILED' "$logdir/cargo-test.log"; then
    echo "FAILED: cargo test did not run to completion (exit $cargo_rc)"
    failed=$((failed + 1))
fi

echo "== tidegate spec"
bin=${CARGO_TARGET_DIR:-target}/debug/tidegate
[ -x "$bin" ] || cargo build -q
"$bin" spec spec 2>&1 | tee "$logdir/spec.log"
spec_rc=${PIPESTATUS[0]}
line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$logdir/spec.log" | tail -1)
if [ -n "$line" ]; then
    p=${line%% passed*}; f=${line#*, }; f=${f%% failed*}
    passed=$((passed + p)); failed=$((failed + f))
elif [ "$spec_rc" -ne 0 ]; then
    echo "FAILED: spec runner exited $spec_rc"
    failed=$((failed + 1))
fi

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
