#!/usr/bin/env bash
# Records raw pgoutput message bodies from a real PostgreSQL server into the
# fixtures under tests/fixtures/pgoutput/, so the decoder is tested (and
# benchmarked) against what the server actually sends, not what we believe it sends.
#
#   eval "$(scripts/services.sh env)"; scripts/record_pgoutput.sh [OUT_DIR]
#
# It creates a scratch database, Odoo-like tables, a publication and, per
# recording, a temporary logical slot with pgoutput; runs a workload; and dumps
# the slot through pg_logical_slot_peek_binary_changes. Output format, one
# message per line after '#' header lines:  <lsn> <hex body>
#
# Recordings:
#   v1_text.txt      proto 1, messages: every DML kind, old keys/rows, unchanged
#                    TOAST, a user-defined type, truncate, logical messages
#   v1_binary.txt    the same slot decoded with binary 'true' (column kind 'b')
#   v2_stream.txt    proto 2, streaming on, logical_decoding_work_mem 64kB:
#                    stream start/stop/commit/abort (top-level and subtransaction)
#   v1_bench.txt     proto 1: 2500 sale_order_line rows in 10-row transactions
#                    plus 500 updates, for benches/pgoutput_decode.rs
# Two-phase messages (proto 3) need max_prepared_transactions > 0; they are
# recorded into v3_twophase.txt only when the server allows it.
set -euo pipefail

: "${ODOO_CDC_TEST_PG:?ODOO_CDC_TEST_PG is not set; run: eval \"\$(scripts/services.sh env)\"}"

OUT_DIR="${1:-$(cd "$(dirname "$0")/.." && pwd)/tests/fixtures/pgoutput}"
mkdir -p "$OUT_DIR"

DB="odoo_cdc_record_$$"
# Swap the database name in the URL, keeping any ?query part.
base="${ODOO_CDC_TEST_PG%%\?*}"
query="${ODOO_CDC_TEST_PG#"$base"}"
DB_URL="${base%/*}/$DB$query"

psql_admin() { psql "$ODOO_CDC_TEST_PG" -X -q -v ON_ERROR_STOP=1 "$@"; }
psql_db() { psql "$DB_URL" -X -q -v ON_ERROR_STOP=1 "$@"; }

cleanup() {
  # Temporary slots die with their session, so dropping the database is enough.
  psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT

psql_admin -c "CREATE DATABASE $DB"
SERVER_VERSION="$(psql_db -At -c 'SHOW server_version')"

psql_db <<'SQL'
CREATE TYPE doc_status AS ENUM ('draft', 'posted', 'cancel');

-- Shaped like Odoo 17's sale_order_line: serial id, many2one ids, translated
-- jsonb name, numerics, timestamps without time zone, nullable selection fields.
CREATE TABLE sale_order_line (
    id               serial PRIMARY KEY,
    order_id         integer NOT NULL,
    sequence         integer DEFAULT 10,
    product_id       integer,
    name             jsonb NOT NULL,
    product_uom_qty  numeric NOT NULL,
    price_unit       numeric NOT NULL,
    price_subtotal   numeric,
    discount         double precision,
    state            varchar,
    display_type     varchar,
    is_downpayment   boolean,
    note             text,
    create_uid       integer,
    create_date      timestamp without time zone,
    write_date       timestamp without time zone
);

-- REPLICA IDENTITY FULL: updates and deletes send the whole old row ('O').
CREATE TABLE res_partner (
    id      integer PRIMARY KEY,
    name    varchar NOT NULL,
    email   varchar,
    active  boolean DEFAULT true,
    comment text
);
ALTER TABLE res_partner REPLICA IDENTITY FULL;

-- EXTERNAL storage keeps the large body out of line and uncompressed, so an
-- update that does not touch it sends it as an unchanged TOAST value ('u').
CREATE TABLE ir_attachment (
    id       integer PRIMARY KEY,
    res_id   integer,
    status   doc_status NOT NULL,
    datas    text
);
ALTER TABLE ir_attachment ALTER COLUMN datas SET STORAGE EXTERNAL;

CREATE PUBLICATION pub FOR ALL TABLES;
SQL

TMP="$(mktemp -d)"
trap 'cleanup; rm -rf "$TMP"' EXIT

# psql settings that print "<lsn> <hex>" lines and nothing else. The test
# cluster runs synchronous_commit=off, and the SQL interface decodes only up to
# the WAL flush pointer: without flushed commits the last transactions would be
# silently missing from the recording.
RAW_OUTPUT='SET synchronous_commit = on;
\pset format unaligned
\pset tuples_only on
\pset fieldsep '"' '"'
\pset footer off'

# SQL (for the same session) that dumps slot $1 with options $3 into file $2.
dump_sql() {
  printf '%s\n' "\\o $2" \
    "SELECT lsn, encode(data, 'hex') FROM pg_logical_slot_peek_binary_changes('$1', NULL, NULL, $3);" \
    '\o'
}

finish() { # out file, options, raw dump
  {
    echo "# pgoutput recording made by scripts/record_pgoutput.sh"
    echo "# server: PostgreSQL $SERVER_VERSION"
    echo "# options: $2"
    echo "# format: <lsn> <hex body>, one message per line"
    cat "$3"
  } >"$1"
  echo "recorded $(grep -vc '^#' "$1") messages into $1 ($(wc -c <"$1") bytes)" >&2
}

# Each recording runs in one psql session: its temporary slot lives exactly as
# long as the session, so nothing is left behind if the script dies.

# --- v1: every DML kind, text and binary -------------------------------------
OPTS_V1="'proto_version', '1', 'publication_names', 'pub', 'messages', 'true'"
OPTS_V1_BIN="$OPTS_V1, 'binary', 'true'"
{
  echo "$RAW_OUTPUT"
  cat <<'SQL'
SELECT 1 FROM pg_create_logical_replication_slot('rec_v1', 'pgoutput', true) \g /dev/null

-- 5 inserts in one transaction, some with NULL optional columns.
INSERT INTO sale_order_line (order_id, product_id, name, product_uom_qty, price_unit, price_subtotal,
                             discount, state, display_type, is_downpayment, note, create_uid, create_date, write_date)
VALUES
 (1, 11, '{"en_US": "[FURN_8888] Office Lamp", "fr_FR": "Lampe de bureau"}', 2, 40.50, 81.00, 0, 'draft', NULL, false, 'fragile', 2, '2026-11-21 23:40:01.123456', '2026-11-21 23:40:01.123456'),
 (1, 12, '{"en_US": "[E-COM11] Cabinet with Doors"}', 1, 140, 140, 10.5, 'draft', NULL, false, NULL, 2, '2026-11-21 23:40:01', '2026-11-21 23:40:01'),
 (1, NULL, '{"en_US": "Section: Extras"}', 0, 0, NULL, NULL, 'draft', 'line_section', NULL, NULL, 2, '2026-11-21 23:40:01', NULL),
 (2, 13, '{"en_US": "Down payment: 30%"}', 1, 300, 300, 0, 'sale', NULL, true, 'Ünïcødé note ✓', 2, '2026-11-22 08:00:00', '2026-11-22 08:00:00'),
 (2, 14, '{"en_US": "Customizable Desk (Steel, White)"}', 3, 750.00, 2250.00, 0, 'sale', NULL, false, NULL, 2, '2026-11-22 08:00:00', '2026-11-22 08:00:00');
-- No key change: no old tuple.
UPDATE sale_order_line SET price_unit = 42.00, price_subtotal = 84.00, write_date = '2026-11-23 10:00:00' WHERE id = 1;
-- Key change: old key ('K').
UPDATE sale_order_line SET id = 100 WHERE id = 2;
-- Old key ('K').
DELETE FROM sale_order_line WHERE id = 3;

INSERT INTO res_partner VALUES (7, 'Azure Interior', 'azure@example.com', true, NULL),
                               (8, 'Deco Addict', NULL, true, 'VIP');
UPDATE res_partner SET email = 'info@azure.example.com' WHERE id = 7;   -- old row ('O')
DELETE FROM res_partner WHERE id = 8;                                    -- old row ('O')

INSERT INTO ir_attachment VALUES (1, 7, 'draft', repeat('0123456789abcdef', 1024));
UPDATE ir_attachment SET status = 'posted' WHERE id = 1;                 -- datas: unchanged TOAST ('u')

SELECT 1 FROM pg_logical_emit_message(true, 'odoo_cdc', 'transactional hello') \g /dev/null
SELECT 1 FROM pg_logical_emit_message(false, 'odoo_cdc.heartbeat', '{"ts": 1}') \g /dev/null

BEGIN;
INSERT INTO sale_order_line (order_id, name, product_uom_qty, price_unit) VALUES (3, '{"en_US": "in tx with message"}', 1, 1);
SELECT 1 FROM pg_logical_emit_message(true, 'odoo_cdc', '\x00ff'::bytea) \g /dev/null
COMMIT;

TRUNCATE res_partner, ir_attachment RESTART IDENTITY CASCADE;
TRUNCATE sale_order_line;
SQL
  dump_sql rec_v1 "$TMP/v1_text" "$OPTS_V1"
  dump_sql rec_v1 "$TMP/v1_binary" "$OPTS_V1_BIN"
} | psql_db
finish "$OUT_DIR/v1_text.txt" "$OPTS_V1" "$TMP/v1_text"
finish "$OUT_DIR/v1_binary.txt" "$OPTS_V1_BIN" "$TMP/v1_binary"

# --- v2: streamed transactions ----------------------------------------------
# 64kB is the smallest logical_decoding_work_mem; the decoding happens in this
# backend (SQL interface), so the session setting applies.
OPTS_V2="'proto_version', '2', 'publication_names', 'pub', 'messages', 'true', 'streaming', 'on'"
{
  echo "$RAW_OUTPUT"
  cat <<'SQL'
SET logical_decoding_work_mem = '64kB';
SELECT 1 FROM pg_create_logical_replication_slot('rec_v2', 'pgoutput', true) \g /dev/null

-- A small transaction stays a plain Begin .. Commit.
INSERT INTO sale_order_line (order_id, name, product_uom_qty, price_unit) VALUES (10, '{"en_US": "small"}', 1, 1);

-- A large committed transaction: Stream Start .. Stop blocks, then Stream Commit.
BEGIN;
INSERT INTO sale_order_line (order_id, product_id, name, product_uom_qty, price_unit, price_subtotal, state, create_date)
SELECT 11, g, jsonb_build_object('en_US', 'Streamed line ' || g), g % 7 + 1, 9.99, (g % 7 + 1) * 9.99, 'sale',
       '2026-11-24 00:00:00'::timestamp + g * interval '1 second'
FROM generate_series(1, 700) g;
SELECT 1 FROM pg_logical_emit_message(true, 'odoo_cdc', 'inside a streamed transaction') \g /dev/null
UPDATE sale_order_line SET state = 'done' WHERE order_id = 11 AND product_id <= 5;
DELETE FROM sale_order_line WHERE order_id = 11 AND product_id > 695;
-- A subtransaction that is streamed and then rolled back: Stream Abort with subxid.
SAVEPOINT sp;
INSERT INTO sale_order_line (order_id, name, product_uom_qty, price_unit)
SELECT 12, jsonb_build_object('en_US', 'Rolled back ' || g), 1, 1 FROM generate_series(1, 700) g;
ROLLBACK TO SAVEPOINT sp;
INSERT INTO sale_order_line (order_id, name, product_uom_qty, price_unit) VALUES (13, '{"en_US": "after savepoint"}', 1, 1);
COMMIT;

-- A large transaction that is rolled back: Stream Abort with subxid = xid.
BEGIN;
INSERT INTO sale_order_line (order_id, name, product_uom_qty, price_unit)
SELECT 14, jsonb_build_object('en_US', 'Aborted ' || g), 1, 1 FROM generate_series(1, 700) g;
ROLLBACK;
-- An abort record is never flushed on its own: a committed transaction after
-- it moves the flush pointer past it, so the Stream Abort gets decoded.
INSERT INTO sale_order_line (order_id, name, product_uom_qty, price_unit) VALUES (15, '{"en_US": "flush"}', 1, 1);
SQL
  dump_sql rec_v2 "$TMP/v2_stream" "$OPTS_V2"
} | psql_db
finish "$OUT_DIR/v2_stream.txt" "$OPTS_V2" "$TMP/v2_stream"

# --- bench: a few thousand Odoo-like rows ------------------------------------
{
  echo "$RAW_OUTPUT"
  cat <<'SQL'
-- Ids 1..2500, whatever the earlier recordings left in the table.
TRUNCATE sale_order_line RESTART IDENTITY;
SELECT 1 FROM pg_create_logical_replication_slot('rec_bench', 'pgoutput', true) \g /dev/null
-- 250 transactions of 10 rows, like Odoo confirming orders one by one.
SELECT format($f$
INSERT INTO sale_order_line (order_id, sequence, product_id, name, product_uom_qty, price_unit, price_subtotal,
                             discount, state, display_type, is_downpayment, note, create_uid, create_date, write_date)
SELECT %1$s, 10 * (g - %2$s), 1000 + g %% 97,
       jsonb_build_object('en_US', '[PROD-' || (1000 + g %% 97) || '] Product ' || (1000 + g %% 97), 'fr_FR', 'Produit ' || (1000 + g %% 97)),
       g %% 5 + 1, round((g %% 1000) * 1.37, 2), round((g %% 5 + 1) * (g %% 1000) * 1.37, 2),
       CASE WHEN g %% 4 = 0 THEN 5.0 ELSE 0 END, 'sale', NULL, false,
       CASE WHEN g %% 3 = 0 THEN 'Deliver before noon' END, 2,
       '2026-11-21 08:00:00'::timestamp + g * interval '7 seconds',
       '2026-11-21 08:00:00'::timestamp + g * interval '7 seconds'
FROM generate_series(%2$s + 1, %2$s + 10) g$f$, b + 1, b * 10)
FROM generate_series(0, 249) b \gexec
-- 50 transactions updating 10 rows each.
SELECT format($f$UPDATE sale_order_line SET state = 'done', write_date = write_date + interval '1 day'
                WHERE id BETWEEN %1$s AND %2$s$f$, b * 10 + 1, b * 10 + 10)
FROM generate_series(0, 49) b \gexec
SQL
  dump_sql rec_bench "$TMP/v1_bench" "$OPTS_V1"
} | psql_db
finish "$OUT_DIR/v1_bench.txt" "$OPTS_V1" "$TMP/v1_bench"

# --- v3: two-phase, only where the server allows PREPARE TRANSACTION ---------
if [ "$(psql_db -At -c 'SHOW max_prepared_transactions')" -gt 0 ]; then
  OPTS_V3="'proto_version', '3', 'publication_names', 'pub', 'two_phase', 'on'"
  {
    echo "$RAW_OUTPUT"
    cat <<'SQL'
SELECT 1 FROM pg_create_logical_replication_slot('rec_v3', 'pgoutput', true, true) \g /dev/null
BEGIN;
INSERT INTO res_partner VALUES (20, 'Prepared Partner', NULL, true, NULL);
PREPARE TRANSACTION 'odoo_cdc_gid_1';
COMMIT PREPARED 'odoo_cdc_gid_1';
BEGIN;
INSERT INTO res_partner VALUES (21, 'Rolled back Partner', NULL, true, NULL);
PREPARE TRANSACTION 'odoo_cdc_gid_2';
ROLLBACK PREPARED 'odoo_cdc_gid_2';
SQL
    dump_sql rec_v3 "$TMP/v3_twophase" "$OPTS_V3"
  } | psql_db
  finish "$OUT_DIR/v3_twophase.txt" "$OPTS_V3" "$TMP/v3_twophase"
else
  echo "max_prepared_transactions = 0: skipping the two-phase (v3) recording" >&2
fi
