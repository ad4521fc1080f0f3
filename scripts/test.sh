#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this script):
# services up, formatting, lints, examples, unit + integration tests, benches in test mode.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh up
eval "$(scripts/services.sh env)"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== cargo build --examples"
cargo build --examples
echo "== docker/ and README offline checks"
# No container engine in CI: tests/docker.rs checks the compose file and the
# Dockerfile offline; tests/readme.rs checks the options reference.
cargo test --test docker --test readme
echo "== cargo test"
# Each test binary runs its tests in parallel; binaries run one after another,
# so the fault-injection binary never overlaps others (it stops and alarms only its
# own private PostgreSQL cluster and RabbitMQ node, see tests/common).
mkdir -p target
cargo test --all-targets 2>&1 | tee target/test-output.log
cargo test --doc
passed=$(grep -Eo 'test result: ok\. [0-9]+ passed' target/test-output.log | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' target/test-output.log | awk '{s+=$1} END {print s+0}')
echo "tests: $passed passed, $failed failed"
