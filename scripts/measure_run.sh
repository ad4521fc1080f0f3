#!/usr/bin/env bash
# Sustained throughput of `odoo-cdc run` on this machine against its ceilings: a
# shortcut to the end-to-end harness (benches/e2e.rs) running only its throughput
# phase with a classic queue, both granularities. See docs/performance.md.
#
#   scripts/measure_run.sh [ROWS] [more harness flags, e.g. --json out.json]   (ROWS default 100000)
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${1:-100000}"
shift || true
scripts/services.sh up >/dev/null
eval "$(scripts/services.sh env)"
exec cargo bench --bench e2e -- --rows "$ROWS" --queues classic --skip latency,rss "$@"
