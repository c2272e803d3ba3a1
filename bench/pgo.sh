#!/usr/bin/env bash
# Profile-guided optimisation: retrain the profile the release build uses (pgo/tidegate.profdata.gz,
# read by scripts/build.sh). An instrumented build serves every bench scenario once (bench/run.sh,
# the same loads as the side-by-side runs), its counters are merged, and the sparse merged profile
# is written gzipped. Rerun it after changing the request path: functions whose code changed since
# the profile was taken lose their profile (they are built as without PGO), the rest keep it.
#   bench/pgo.sh                              # needs what bench/run.sh needs, plus llvm-tools
#   SCENARIOS="b_plain d_lua_content" bench/pgo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TRIPLE=$(rustc -vV | awk '/^host:/ {print $2}')
PROFDATA=$(rustc --print sysroot)/lib/rustlib/$TRIPLE/bin/llvm-profdata
[ -x "$PROFDATA" ] || rustup component add llvm-tools
DATA=$ROOT/target/pgo-data
rm -rf "$DATA"; mkdir -p "$DATA"
# --target: RUSTFLAGS then reach only the target's crates, not build scripts (which would write
# counters of their own while building).
RUSTFLAGS="-Cprofile-generate=$DATA" cargo build --release --target "$TRIPLE" --target-dir target/pgo-gen
# Every process writes its counters when it exits (SIGTERM: exit(0)); runs merge into one file.
TIDEGATE=$ROOT/target/pgo-gen/$TRIPLE/release/tidegate \
    SCENARIOS=${SCENARIOS:-"b_plain b_plain:/big.html c_lua_proxy d_lua_content g_access_shdict f_lua_redis"} \
    ROUNDS=1 DURATION=${DURATION:-5s} OUT=$DATA/training.md bench/run.sh
ls "$DATA"/*.profraw > /dev/null
"$PROFDATA" merge --sparse -o "$DATA/merged.profdata" "$DATA"/*.profraw
mkdir -p pgo
gzip -9 -n -c "$DATA/merged.profdata" > pgo/tidegate.profdata.gz
echo "pgo/tidegate.profdata.gz: $(wc -c < pgo/tidegate.profdata.gz) bytes from $(ls "$DATA"/*.profraw | wc -l) profile(s); scripts/build.sh uses it"
