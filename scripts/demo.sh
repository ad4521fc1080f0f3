#!/usr/bin/env bash
# The one-command demo: an Odoo-like database under an ORM-style workload,
# odoo-cdc streaming its changes to RabbitMQ, and a downstream order service
# (examples/order_consumer.rs) keeping its own copy of the orders from the events.
#
#   scripts/demo.sh                     # ~30 s of orders, then leaves odoo-cdc and the order service running
#   DEMO_SECONDS=10 scripts/demo.sh     # non-interactive (CI): stops both itself, exit 0
#   scripts/demo.sh stop                # stop what a demo left running and remove all it created
#
# Knobs: DEMO_SECONDS (workload duration, default 30), DEMO_RATE (orders/s, default 20,
# 0 = as fast as possible), DEMO_DIR (logs, default target/demo), DEMO_PORT (the order
# service's HTTP port, default 18080), DEMO_NAME (database, slot, exchange and queue
# name prefix, default odoo_demo), DEMO_PROFILE (the cargo profile the programs are
# built with, default demo-build; `release` for throughput figures worth quoting).
#
# What it does: starts the local services (scripts/services.sh up), recreates the
# database odoo_demo (dropping a leftover slot of that name), builds the connector,
# the workload and the order service (cargo profile demo-build, Cargo.toml: release
# settings without optimisation, a third of a release build's time), starts the order service (its
# own quorum queue bound to sale_order, sale_order_line and res_partner events, a
# SQLite file, HTTP on DEMO_PORT), then
#   odoo-cdc run ... --exchange odoo_demo --queue odoo_demo_orders --queue-type quorum
#                    --queue-binding 'odoo_demo.public.sale_order.*'
#                    --queue-binding 'odoo_demo.public.sale_order_line.*'
# in the background, loads the Odoo schema, runs the workload, and prints a progress
# line every 2 s. At the end the queue must hold exactly one message per
# sale_order/sale_order_line row the workload changed, and the order service's copy
# must equal the database (orders, lines, partners); the script fails otherwise.
# After the workload it prints the slot's lag every 2 s until the connector has
# caught up. Everything goes through the demo's own exchange (odoo_demo), never
# the default odoo.cdc other programs on the broker may use.
#
# `scripts/demo.sh stop` removes everything a demo created: the connector and
# the order service (by their recorded pids), the queues, the exchange, the
# slots, the database odoo_demo (with its publication) and the files in DEMO_DIR.
# The services themselves stay up (scripts/services.sh down removes them).
set -euo pipefail
cd "$(dirname "$0")/.."

# Every name the demo creates derives from DEMO_NAME (default odoo_demo).
DB="${DEMO_NAME:-odoo_demo}"
SLOT="$DB"
EXCHANGE="$DB"
QUEUE="${DB}_orders"
PEEK_SLOT="${DB}_peek"
SERVICE_QUEUE="${DB}_order_service"
PORT="${DEMO_PORT:-18080}"
DURATION="${DEMO_SECONDS:-30}"
RATE="${DEMO_RATE:-20}"
DIR="${DEMO_DIR:-target/demo}"
PROFILE="${DEMO_PROFILE:-demo-build}"
# Set when the caller chose the duration: then nobody is watching, clean up at the end.
UNATTENDED="${DEMO_SECONDS+yes}"

if [ -t 1 ]; then B=$'\033[1m' N=$'\033[0m'; else B='' N=''; fi
say() { printf '%s[demo]%s %s\n' "$B" "$N" "$*"; }
die() { printf '[demo] error: %s\n' "$*" >&2; exit 1; }

case "$DB" in '' | *[!a-z0-9_]* | [0-9]*) die "DEMO_NAME must be a lower-case SQL identifier (letters, digits, _)" ;; esac
case "$DURATION" in '' | *[!0-9]*) die "DEMO_SECONDS must be a whole number of seconds" ;; esac
case "$RATE" in '' | *[!0-9]*) die "DEMO_RATE must be a whole number of orders per second" ;; esac
case "$PORT" in '' | *[!0-9]*) die "DEMO_PORT must be a port number" ;; esac
case "$PROFILE" in '' | *[!a-z0-9_-]*) die "DEMO_PROFILE must be a cargo profile name (demo-build, release, dev)" ;; esac
[ "$DURATION" -gt 0 ] || die "DEMO_SECONDS must be at least 1"
case "${1:-}" in
  '' | stop) ;;
  *) die "usage: scripts/demo.sh [stop]" ;;
esac

if [ "${1:-}" = stop ]; then
  eval "$(scripts/services.sh env)"
else
  say "starting PostgreSQL (wal_level=logical) and RabbitMQ"
  scripts/services.sh up
  eval "$(scripts/services.sh env)"
fi
ADMIN_URL="$ODOO_CDC_TEST_PG"
SOURCE="${ADMIN_URL%/*}/$DB"
AMQP="$ODOO_CDC_TEST_AMQP"
psql_admin() { psql -X -q -At -v ON_ERROR_STOP=1 "$ADMIN_URL" "$@"; }
psql_db() { psql -X -q -At -v ON_ERROR_STOP=1 "$SOURCE" "$@"; }
queue_depth() {
  timeout 30 rabbitmqctl -q list_queues name messages 2>/dev/null |
    awk -v q="$QUEUE" '$1 == q { print $2; found = 1 } END { if (!found) print 0 }'
}

service() { curl -fsS --max-time 10 "http://127.0.0.1:$PORT$1"; }
# One number out of the service's /stats JSON (no jq needed).
stat_of() { printf '%s' "$1" | grep -o "\"$2\":[0-9]*" | grep -o '[0-9]*$' || echo 0; }

# The broker objects of a demo (queues, then the exchange they were bound to).
remove_broker_objects() {
  timeout 30 rabbitmqctl -q delete_queue "$QUEUE" >/dev/null 2>&1 || true
  timeout 30 rabbitmqctl -q delete_queue "$SERVICE_QUEUE" >/dev/null 2>&1 || true
  if command -v rabbitmqadmin >/dev/null 2>&1; then
    timeout 30 rabbitmqadmin -q delete exchange name="$EXCHANGE" >/dev/null 2>&1 || true
  else
    say "rabbitmqadmin not found: exchange $EXCHANGE left on the broker (delete it in the management UI)"
  fi
}

# Drops the demo's slots (any walsender still streaming one is terminated first;
# a logical slot of the database blocks DROP DATABASE).
drop_slots() {
  psql_admin -c "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                 WHERE (slot_name IN ('$SLOT', '$PEEK_SLOT') OR database = '$DB') AND active_pid IS NOT NULL" >/dev/null
  local left=1
  for _ in $(seq 1 50); do
    left="$(psql_admin -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name IN ('$SLOT', '$PEEK_SLOT') OR database = '$DB'")"
    [ "$left" = 0 ] && break
    psql_admin -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                   WHERE (slot_name IN ('$SLOT', '$PEEK_SLOT') OR database = '$DB') AND NOT active" >/dev/null || true
    sleep 0.2
  done
  [ "$left" = 0 ] || die "could not drop replication slot $SLOT (still active?)"
}

# The files a demo writes into DEMO_DIR.
DEMO_FILES="odoo-cdc.log odoo-cdc.pid order_consumer.log order_consumer.pid peek.log
  sample-events.jsonl workload.json workload.log orders.sqlite orders.sqlite-wal orders.sqlite-shm"

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"

# A connector or order service left running by an earlier interactive demo holds the
# slot / the port: stop it, but only if the recorded pid still is that program.
stop_earlier() { # pidfile, name in its command line
  if [ -f "$DIR/$1" ]; then
    local old
    old="$(cat "$DIR/$1")"
    if [ -n "$old" ] && grep -q "$2" "/proc/$old/cmdline" 2>/dev/null; then
      say "stopping the $2 of an earlier demo (pid $old)"
      kill -TERM "$old" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$DIR/$1"
  fi
}
stop_earlier odoo-cdc.pid odoo-cdc
stop_earlier order_consumer.pid order_consumer

if [ "${1:-}" = stop ]; then
  say "removing queues $QUEUE, $SERVICE_QUEUE and exchange $EXCHANGE"
  remove_broker_objects
  say "dropping slots $SLOT, $PEEK_SLOT and database $DB (with publication $DB)"
  drop_slots
  psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
  for f in $DEMO_FILES; do rm -f "$DIR/$f"; done
  rmdir "$DIR" 2>/dev/null || true
  say "done: nothing of the demo is left (the services stay up: scripts/services.sh down removes them)"
  exit 0
fi

say "recreating database $DB"
drop_slots
psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
# The schema is loaded after the connector starts (so the seed rows flow as events):
# the publication must cover tables that do not exist yet, hence FOR ALL TABLES,
# made here. (--create-publication would create it with the tables that exist,
# keeping tables without a primary key out: see "Filters and the Odoo profile".)
psql_db -c "CREATE PUBLICATION $DB FOR ALL TABLES"
# The queue of an earlier run would make the counts below meaningless.
remove_broker_objects
rm -f "$DIR/orders.sqlite" "$DIR/orders.sqlite-wal" "$DIR/orders.sqlite-shm"

# Unoptimised by default: a cold release build of these three is most of a first
# demo's time, and the demo's rate needs no optimiser (see [profile.demo-build]).
say "building odoo-cdc, the workload and the order service (cargo profile $PROFILE)"
# The workload and the order service are the examples' files built as binaries of
# the workspace member demo/, which does not compile odoo-cdc's dev-dependencies.
cargo build --profile "$PROFILE" -p odoo-cdc --bin odoo-cdc \
  -p odoo-cdc-demo --bin odoo_workload --bin order_consumer
TARGET="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)"
case "$PROFILE" in dev | test) OUT="$TARGET/debug" ;; bench) OUT="$TARGET/release" ;; *) OUT="$TARGET/$PROFILE" ;; esac
CDC="$OUT/odoo-cdc"
WORKLOAD="$OUT/odoo_workload"
CONSUMER="$OUT/order_consumer"

CDC_PID=""
CONSUMER_PID=""
PEEK_PID=""
WL_PID=""
cleanup() {
  # Only what this script started, by pid. The connector and the order service
  # survive a normal interactive end (their pids are cleared then).
  for pid in $WL_PID $PEEK_PID $CDC_PID $CONSUMER_PID; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The order service first: it declares its queue, so no order event is published
# before something is bound to keep it. It never connects to PostgreSQL.
say "starting the order service (examples/order_consumer.rs, log: $DIR/order_consumer.log)"
nohup "$CONSUMER" --amqp "$AMQP" --exchange "$EXCHANGE" --prefix "$DB" --queue "$SERVICE_QUEUE" --queue-type quorum \
  --sqlite "$DIR/orders.sqlite" --listen "127.0.0.1:$PORT" >"$DIR/order_consumer.log" 2>&1 &
CONSUMER_PID=$!
echo "$CONSUMER_PID" >"$DIR/order_consumer.pid"
for _ in $(seq 1 150); do
  kill -0 "$CONSUMER_PID" 2>/dev/null || { cat "$DIR/order_consumer.log" >&2; die "the order service exited (port $PORT in use? set DEMO_PORT)"; }
  service /healthz >/dev/null 2>&1 && break
  sleep 0.2
done
service /healthz >/dev/null 2>&1 || die "the order service did not answer on port $PORT within 30 s"

say "starting odoo-cdc run (log: $DIR/odoo-cdc.log)"
# The other tables' events are unroutable by design here, and the connector warns
# once per dropped event: keep that module to errors so the log stays readable.
NO_COLOR=1 ODOO_CDC_LOG="${ODOO_CDC_LOG:-info,lapin=error,odoo_cdc::sink::rabbitmq::confirm=error}" nohup "$CDC" run \
  --source "$SOURCE" --amqp "$AMQP" --exchange "$EXCHANGE" \
  --slot "$SLOT" --publication "$DB" --create-slot \
  --queue "$QUEUE" --queue-type quorum \
  --queue-binding "$DB.public.sale_order.*" --queue-binding "$DB.public.sale_order_line.*" \
  --unroutable drop --status-interval-secs 1 \
  >"$DIR/odoo-cdc.log" 2>&1 &
CDC_PID=$!
echo "$CDC_PID" >"$DIR/odoo-cdc.pid"
# odoo-cdc publishes every table of the publication; only the two order tables are
# bound to the queue, so the others are confirmed by the broker and dropped
# (--unroutable drop) instead of failing the connector.

ready=""
for _ in $(seq 1 300); do
  kill -0 "$CDC_PID" 2>/dev/null || { tail -n 20 "$DIR/odoo-cdc.log" >&2; die "odoo-cdc exited during startup"; }
  active="$(psql_admin -c "SELECT active FROM pg_replication_slots WHERE slot_name = '$SLOT'")"
  if [ "$active" = t ] && grep -q "connected to RabbitMQ" "$DIR/odoo-cdc.log"; then ready=yes; break; fi
  sleep 0.2
done
[ -n "$ready" ] || { tail -n 20 "$DIR/odoo-cdc.log" >&2; die "odoo-cdc did not start streaming within 60 s"; }
say "odoo-cdc is streaming (pid $CDC_PID)"

# The schema after the connector: the seed partners and products flow as events too.
say "loading the Odoo schema and seed data into $DB"
"$WORKLOAD" --source "$SOURCE" --init --orders 0

# Sample event bodies: a second, temporary slot read by `odoo-cdc tail`, which uses
# the same encoder as `run` (the queue's messages are byte for byte these lines).
# It ends with its connection, so it leaves nothing behind.
ODOO_CDC_LOG=warn "$CDC" tail --source "$SOURCE" --slot "$PEEK_SLOT" --publication "$DB" \
  --create-slot --temporary >"$DIR/sample-events.jsonl" 2>"$DIR/peek.log" &
PEEK_PID=$!
for _ in $(seq 1 150); do
  [ "$(psql_admin -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '$PEEK_SLOT'")" = 1 ] && break
  sleep 0.2
done

ORDERS=$((RATE * DURATION))
[ "$RATE" -gt 0 ] || ORDERS=$((200 * DURATION))  # as fast as possible: a bigger batch
say "workload: $ORDERS orders at ${RATE} orders/s (0 = unthrottled), ORM-style transactions"
start_ns=$(date +%s%N)
"$WORKLOAD" --source "$SOURCE" --orders "$ORDERS" --rate "$RATE" --seed 1 --progress \
  >"$DIR/workload.json" 2>"$DIR/workload.log" &
WL_PID=$!

elapsed() { echo $(( ($(date +%s%N) - start_ns) / 1000000000 )); }
slot_lag() {
  psql_admin -c "SELECT coalesce(pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)), '?')
                 FROM pg_replication_slots WHERE slot_name = '$SLOT'"
}
progress_line() {
  local depth wl st
  depth="$(queue_depth)"
  wl="$(tail -n 1 "$DIR/workload.log" 2>/dev/null | sed 's/^odoo_workload: //')"
  st="$(service /stats 2>/dev/null || echo '{}')"
  say "t=$(elapsed)s  queue $QUEUE: ${depth} events  slot lag: $(slot_lag)  order service: $(stat_of "$st" orders) orders, $(stat_of "$st" applied) events applied  | workload: ${wl:-starting}"
}

while kill -0 "$WL_PID" 2>/dev/null; do
  kill -0 "$CDC_PID" 2>/dev/null || { tail -n 20 "$DIR/odoo-cdc.log" >&2; die "odoo-cdc exited"; }
  progress_line
  sleep 2
done
wait "$WL_PID" || { cat "$DIR/workload.log" >&2; die "the workload failed"; }
WL_PID=""
wl_secs_ns=$(( $(date +%s%N) - start_ns ))
# Everything the workload committed lies before this LSN; the slot's confirmed LSN
# passes it only once RabbitMQ has confirmed every one of those events.
end_lsn="$(psql_admin -c "SELECT pg_current_wal_lsn()")"
caught_ns=""
# Catch-up progress: how much WAL up to the workload's end is not confirmed yet.
behind() {
  psql_admin -c "SELECT CASE WHEN confirmed_flush_lsn >= '$end_lsn' THEN 'caught up'
                        ELSE pg_size_pretty(pg_wal_lsn_diff('$end_lsn', confirmed_flush_lsn)) END
                 FROM pg_replication_slots WHERE slot_name = '$SLOT'"
}
say "workload finished at LSN $end_lsn; waiting for odoo-cdc to catch up (slot lag: $(behind))"
for i in $(seq 1 600); do
  kill -0 "$CDC_PID" 2>/dev/null || { tail -n 20 "$DIR/odoo-cdc.log" >&2; die "odoo-cdc exited"; }
  if [ "$(psql_admin -c "SELECT confirmed_flush_lsn >= '$end_lsn' FROM pg_replication_slots WHERE slot_name = '$SLOT'")" = t ]; then
    caught_ns=$(( $(date +%s%N) - start_ns ))
    break
  fi
  [ $((i % 20)) = 0 ] && say "t=$(elapsed)s  catching up: slot lag $(behind) to the workload's end, queue $QUEUE: $(queue_depth) events"
  sleep 0.1
done
[ -n "$caught_ns" ] || die "the slot did not reach $end_lsn within 60 s of the workload's end"

report="$(tail -n 1 "$DIR/workload.json")"
# Rows the workload changed in one table, all operations (the JSON is one compact line).
rows_of() {
  printf '%s' "$report" | grep -o "\"$1\":{[^}]*}" | grep -o '[0-9]\+' | awk '{ s += $1 } END { print s + 0 }'
}
expected=$(( $(rows_of sale_order) + $(rows_of sale_order_line) ))
all_rows="$(printf '%s' "$report" | grep -o '"total":[0-9]*' | grep -o '[0-9]*')"
say "workload done: $all_rows rows changed; $expected of them in sale_order/sale_order_line"

# RabbitMQ refreshes a queue's message count every few seconds: wait for it to settle.
depth=0
for _ in $(seq 1 30); do
  depth="$(queue_depth)"
  [ "$depth" -ge "$expected" ] && break
  sleep 1
done
progress_line

if command -v jq >/dev/null 2>&1; then shown="null columns left out"; else shown="in full"; fi
say "3 sample events as published to $QUEUE, $shown (a new order, its confirmation, a line):"
{
  grep -m 1 '"op":"c",.*"table":"sale_order",' "$DIR/sample-events.jsonl" || true
  grep -m 1 '"op":"u",.*"table":"sale_order",.*"state":"sale"' "$DIR/sample-events.jsonl" || true
  grep -m 1 '"op":"c",.*"table":"sale_order_line",' "$DIR/sample-events.jsonl" || true
} | if command -v jq >/dev/null 2>&1; then jq -c '{op, source: {table: .source.table, commit_lsn: .source.commit_lsn, seq: .source.seq}, key, after: (.after | with_entries(select(.value != null)))}'; else cat; fi
kill -TERM "$PEEK_PID" 2>/dev/null || true
wait "$PEEK_PID" 2>/dev/null || true
PEEK_PID=""

# The order service's copy must equal the database.
want="$(psql_db -c "SELECT (SELECT count(*) FROM sale_order) || ' ' || (SELECT count(*) FROM sale_order_line) || ' ' || (SELECT count(*) FROM res_partner)")"
got=""
for _ in $(seq 1 120); do
  st="$(service /stats 2>/dev/null || echo '{}')"
  got="$(stat_of "$st" orders) $(stat_of "$st" lines) $(stat_of "$st" partners)"
  [ "$got" = "$want" ] && break
  sleep 0.5
done
order_id="$(psql_db -c "SELECT id FROM sale_order WHERE state = 'sale' ORDER BY id DESC LIMIT 1")"
if [ -n "$order_id" ]; then
  say "order $order_id as the order service serves it (curl http://127.0.0.1:$PORT/orders/$order_id):"
  if command -v jq >/dev/null 2>&1; then
    service "/orders/$order_id" | jq -c '{order: (.order | {id, name, state, amount_total}), lines: [.lines[] | {id, name, product_uom_qty, price_subtotal}], partner: (.partner | {id, name, email})}'
  else
    service "/orders/$order_id"; echo
  fi
fi
say "order service: $(service /stats 2>/dev/null || echo '?')"

say "last lines of the odoo-cdc log:"
tail -n 5 "$DIR/odoo-cdc.log"

secs() { awk -v ns="$1" 'BEGIN { printf "%.1f", ns / 1e9 }'; }
per_sec() { awk -v n="$1" -v ns="$2" 'BEGIN { printf "%.0f", n / (ns / 1e9) }'; }
say "figures: the workload changed $all_rows rows in $(secs "$wl_secs_ns") s ($(per_sec "$all_rows" "$wl_secs_ns") rows/s);"
say "         odoo-cdc had every one of them confirmed by RabbitMQ $(secs "$caught_ns") s after the start: $(per_sec "$all_rows" "$caught_ns") change events/s published, $(per_sec "$expected" "$caught_ns")/s of them routed to $QUEUE"

status=0
if [ "$got" != "$want" ]; then
  printf '[demo] error: the order service has %s (orders lines partners), the database %s\n' "$got" "$want" >&2
  status=1
else
  set -- $want
  say "check: the order service's copy equals the database ($1 orders, $2 lines, $3 partners)"
fi
if [ "$depth" != "$expected" ]; then
  printf '[demo] error: queue %s holds %s messages, the workload changed %s order rows\n' "$QUEUE" "$depth" "$expected" >&2
  status=1
else
  say "check: queue depth equals the rows the workload changed in sale_order + sale_order_line ($expected)"
fi

if [ -n "$UNATTENDED" ]; then
  say "stopping odoo-cdc (SIGTERM)"
  kill -TERM "$CDC_PID"
  code=0
  wait "$CDC_PID" || code=$?
  CDC_PID=""
  rm -f "$DIR/odoo-cdc.pid"
  [ "$code" = 0 ] || { tail -n 20 "$DIR/odoo-cdc.log" >&2; die "odoo-cdc exited with $code"; }
  say "odoo-cdc stopped cleanly"
  kill -TERM "$CONSUMER_PID"
  wait "$CONSUMER_PID" || true
  CONSUMER_PID=""
  rm -f "$DIR/order_consumer.pid"
  remove_broker_objects
  # An idle slot pins WAL on the cluster for as long as it exists: nobody will resume
  # this one. The database stays for inspection.
  drop_slots
  say "removed queues $QUEUE, $SERVICE_QUEUE, exchange $EXCHANGE and slot $SLOT; database $DB and $DIR are left for inspection (scripts/demo.sh stop removes them)"
  exit "$status"
fi

CDC_RUNNING="$CDC_PID"
CONSUMER_RUNNING="$CONSUMER_PID"
CDC_PID=""  # keep both running after this script ends
CONSUMER_PID=""
cat <<EOF

odoo-cdc (pid $CDC_RUNNING) streams every change of $DB; the order service
(pid $CONSUMER_RUNNING) keeps its copy of the orders and answers without PostgreSQL.
  more orders:   $WORKLOAD --source $SOURCE --orders 1000 --rate 50 --progress
  read orders:   curl http://127.0.0.1:$PORT/orders/$order_id ; curl http://127.0.0.1:$PORT/stats
  watch it:      tail -f $DIR/odoo-cdc.log ; rabbitmqctl list_queues name messages
  stop it all:   scripts/demo.sh stop   (both programs, queues, exchange $EXCHANGE, slot, database, $DIR;
                                          until then the slot pins WAL)
  stop services: scripts/services.sh down
EOF
exit "$status"
