#!/usr/bin/env bash
# Sustained throughput of `odoo-cdc run` on this machine, for both granularities:
# writes ROWS Odoo-like sale_order_line rows in 10-row transactions into a slot
# first, then times the connector draining it into a classic queue until the broker
# holds every message. A reproducible figure until the benchmark harness lands.
#
#   scripts/measure_run.sh [ROWS]      (default 100000)
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${1:-100000}"
scripts/services.sh up >/dev/null
eval "$(scripts/services.sh env)"
cargo build --release --bin odoo-cdc >/dev/null 2>&1
BIN=target/release/odoo-cdc
PGBASE="${ODOO_CDC_TEST_PG%/*}"

measure() {
  local gran="$1" db="measure_$1" expect
  psql -q "$ODOO_CDC_TEST_PG" -c "SELECT pg_drop_replication_slot('$db') FROM pg_replication_slots WHERE slot_name = '$db'" >/dev/null
  psql -q "$ODOO_CDC_TEST_PG" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" 2>/dev/null
  psql -q "$PGBASE/$db" <<SQL >/dev/null
CREATE TABLE sale_order_line (id serial PRIMARY KEY, order_id int, name jsonb, product_uom_qty numeric(16,3),
  price_unit numeric(16,2), price_subtotal numeric(16,2), state text, analytic_distribution jsonb,
  create_uid int, create_date timestamp, write_uid int, write_date timestamp);
CREATE PUBLICATION $db FOR ALL TABLES;
SELECT pg_create_logical_replication_slot('$db', 'pgoutput');
DO \$\$ BEGIN FOR i IN 0..($ROWS / 10 - 1) LOOP
  INSERT INTO sale_order_line (order_id, name, product_uom_qty, price_unit, price_subtotal, state, analytic_distribution, create_uid, create_date, write_uid, write_date)
  SELECT i, jsonb_build_object('en_US', 'Office chair ' || g), g, 125.50, g * 125.50, 'sale', '{"12": 100.0}', 2, now(), 2, now()
  FROM generate_series(1, 10) g;
  COMMIT;
END LOOP; END \$\$;
SQL
  if [ "$gran" = row ]; then expect=$ROWS; else expect=$((ROWS / 10)); fi
  local q="measure_q_$gran"
  timeout 30 rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  local start end n=0
  start=$(date +%s.%N)
  ODOO_CDC_LOG=warn,lapin=error "$BIN" run --source "$PGBASE/$db" --amqp "$ODOO_CDC_TEST_AMQP" --slot "$db" --publication "$db" \
     --exchange measure.cdc --queue "$q" --queue-type classic --queue-binding '#' --granularity "$gran" &
  local pid=$!
  while [ "$n" -lt "$expect" ]; do
    sleep 0.5
    n=$(timeout 30 rabbitmqctl -q list_queues name messages 2>/dev/null | awk -v q="$q" '$1 == q {print $2}')
    n=${n:-0}
  done
  end=$(date +%s.%N)
  local cpu
  cpu=$(awk '{print ($14 + $15) / 100}' "/proc/$pid/stat")
  kill -TERM "$pid"; wait "$pid" || true
  timeout 30 rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  python3 - "$gran" "$ROWS" "$expect" "$start" "$end" "$cpu" <<'PY'
import sys, json
gran, rows, msgs, start, end, cpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
secs = end - start
print(json.dumps({"granularity": gran, "changes": rows, "messages": msgs, "seconds": round(secs, 2),
  "changes_per_sec": round(rows / secs), "messages_per_sec": round(msgs / secs),
  "connector_cpu_seconds": cpu, "cpu_seconds_per_million_changes": round(cpu / rows * 1e6, 2)}))
PY
  psql -q "$ODOO_CDC_TEST_PG" -c "SELECT pg_drop_replication_slot('$db')" >/dev/null 2>&1 || true
}

measure row
measure transaction
