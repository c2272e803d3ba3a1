#!/usr/bin/env bash
# Command 1: build (scripts/build.sh) and run the bundled example, conf/nginx.conf + lua/, on
# http://127.0.0.1:8080 (TIDEGATE_PORT to change it). Extra arguments go to tidegate.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
exec target/release/tidegate -p . -c conf/nginx.conf "$@"
