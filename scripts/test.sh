#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this script):
# services up, formatting, lints, examples, unit + integration tests, benches in test mode.
#
# Every step runs even when an earlier one failed, and every test binary runs
# (`--no-fail-fast`), so one failure does not hide the others. The last line is
# always `tests: N passed, M failed` (CI reads it); the exit status is non-zero
# if any step or test failed.
set -uo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh up || exit 1
eval "$(scripts/services.sh env)"

mkdir -p target
log=target/test-output.log
: >"$log"
failed_steps=()

# step NAME COMMAND...: runs the command, output also into the log.
step() {
    local name=$1
    shift
    echo "== $name"
    if ! "$@" 2>&1 | tee -a "$log"; then
        failed_steps+=("$name")
    fi
}

step "cargo fmt --check" cargo fmt --all -- --check
# --workspace: also demo/, the demo's programs built without the dev-dependencies
# (same files as examples/odoo_workload.rs and examples/order_consumer.rs, its own
# dependency list). It has no tests of its own: tests/ compile those files in.
step "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
step "cargo build --examples" cargo build --workspace --bins --examples
# No container engine in CI: tests/docker.rs checks the compose file and the
# Dockerfile offline; tests/readme.rs checks the options reference. (They run
# again below; this step only makes their failure show first.)
step "docker/ and README offline checks" cargo test --test docker --test readme
# Each test binary runs its tests in parallel; binaries run one after another,
# so the fault-injection binary never overlaps others (it stops and alarms only its
# own private PostgreSQL cluster and RabbitMQ node, see tests/common).
: >target/test-results.log
step "cargo test" bash -c 'set -o pipefail; cargo test --all-targets --no-fail-fast 2>&1 | tee target/test-results.log'
# Fault points at exact code points need a build of their own (--features failpoints).
step "cargo test --features failpoints" bash -c 'set -o pipefail; cargo test --features failpoints --test failpoints --no-fail-fast 2>&1 | tee -a target/test-results.log'
step "cargo test --doc" bash -c 'set -o pipefail; cargo test --doc --no-fail-fast 2>&1 | tee -a target/test-results.log'
if command -v promtool >/dev/null 2>&1; then
    step "promtool check rules" promtool check rules deploy/prometheus/alerts.yml
    step "promtool test rules" promtool test rules deploy/prometheus/alerts.test.yml
else
    echo "== promtool check/test rules: skipped, promtool is not installed (apt-get install prometheus)"
fi

results=target/test-results.log
passed=$(grep -Eo 'test result: [A-Za-z]+\. [0-9]+ passed' "$results" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo 'test result: [A-Za-z]+\. [0-9]+ passed; [0-9]+ failed' "$results" | awk '{s+=$6} END {print s+0}')
# A test binary that crashed prints no `test result` line; count it as one failure.
crashed=$(grep -Ec 'process didn.t exit successfully' "$results" || true)
reported=$(grep -Ec 'test result: FAILED' "$results" || true)
if [ "$crashed" -gt "$reported" ]; then
    failed=$((failed + crashed - reported))
fi
if [ ${#failed_steps[@]} -gt 0 ]; then
    echo "failed steps: ${failed_steps[*]}"
fi
echo "tests: $passed passed, $failed failed"
[ ${#failed_steps[@]} -eq 0 ] && [ "$failed" -eq 0 ]
