#!/usr/bin/env bash
# The release build, target/release/tidegate: optimised with the profile in pgo/ (profile-guided
# optimisation; bench/README.md has what it buys and bench/pgo.sh retrains it) when this
# toolchain can read it, else without. Arguments go to cargo. TIDEGATE_NO_PGO=1 skips the profile.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
flags=${RUSTFLAGS:-}
if [ -z "${TIDEGATE_NO_PGO:-}" ] && [ -f pgo/tidegate.profdata.gz ]; then
    # Named by its checksum: a retrained profile changes RUSTFLAGS, so cargo rebuilds with it.
    sum=$(cksum < pgo/tidegate.profdata.gz | cut -d' ' -f1)
    prof=$ROOT/target/pgo-$sum.profdata
    mkdir -p target
    [ -s "$prof" ] || gzip -dc pgo/tidegate.profdata.gz > "$prof"
    # --target as in bench/pgo.sh: cargo names the crates' symbols after the target kind too,
    # and the profile is matched by symbol name.
    triple=$(rustc -vV | awk '/^host:/ {print $2}')
    if RUSTFLAGS="$flags -Cprofile-use=$prof" cargo build --release --target "$triple" "$@"; then
        mkdir -p target/release
        cp "target/$triple/release/tidegate" target/release/tidegate.pgo
        mv -f target/release/tidegate.pgo target/release/tidegate
        exit 0
    fi
    echo "scripts/build.sh: the build with pgo/tidegate.profdata.gz failed; building without it" >&2
fi
RUSTFLAGS="$flags" cargo build --release "$@"
