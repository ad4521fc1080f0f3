#!/usr/bin/env bash
# Local services for the tests and the demo: a throwaway PostgreSQL cluster with
# wal_level=logical on port 54329, and a RabbitMQ broker on 127.0.0.1:5672 with
# the stream plugin (rabbitmq_stream, port 5552; see docs/streams.md).
#
#   scripts/services.sh up     # idempotent: create/start what is missing
#   scripts/services.sh down   # stop and delete the throwaway cluster (RabbitMQ is left running)
#   scripts/services.sh env    # print the URLs the tests read, as shell exports
#   scripts/services.sh pg-restart|pg-stop|pg-start   # used by fault-injection tests
#
# Works on a fresh Debian machine as root (installs packages with apt when missing)
# and on a machine where PostgreSQL and RabbitMQ already run.
set -euo pipefail

PG_PORT="${ODOO_CDC_PG_PORT:-54329}"
STATE_DIR="${ODOO_CDC_SERVICES_DIR:-/tmp/odoo-cdc-services}"
PGDATA="$STATE_DIR/pgdata"
PG_LOG="$STATE_DIR/postgres.log"
PG_SOCKET_DIR="$STATE_DIR/socket"
AMQP_URL="${ODOO_CDC_TEST_AMQP:-amqp://guest:guest@127.0.0.1:5672/%2f}"
STREAM_URL="${ODOO_CDC_TEST_STREAM:-rabbitmq-stream://guest:guest@127.0.0.1:5552/%2f}"

log() { printf '[services] %s\n' "$*" >&2; }

as_postgres() {
  if [ "$(id -un)" = postgres ]; then "$@"; else
    # runuser keeps the environment small and needs no password as root
    runuser -u postgres -- "$@"
  fi
}

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    log "need to install $* but not running as root; install them and retry"
    exit 1
  fi
  log "installing $* with apt"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "$@" >/dev/null
}

pg_bindir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return 0; fi
  done
  return 1
}

ensure_pg_installed() {
  if ! pg_bindir >/dev/null; then
    apt_install postgresql postgresql-contrib
  fi
  command -v openssl >/dev/null || apt_install openssl
  id postgres >/dev/null 2>&1 || { log "no postgres OS user after install"; exit 1; }
}

make_tls_material() {
  # A private CA and a server certificate for localhost/127.0.0.1, so the tests can
  # exercise sslmode=require and sslmode=verify-full against the real server.
  local tls="$STATE_DIR/tls"
  [ -f "$tls/server.crt" ] && return 0
  mkdir -p "$tls"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=odoo-cdc test CA" \
    -keyout "$tls/ca.key" -out "$tls/ca.crt" >/dev/null 2>&1
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$tls/server.key" -out "$tls/server.csr" >/dev/null 2>&1
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$tls/san.ext"
  openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" -CAcreateserial \
    -days 3650 -extfile "$tls/san.ext" -out "$tls/server.crt" >/dev/null 2>&1
  chmod 600 "$tls/server.key"
  chown -R postgres: "$tls" 2>/dev/null || true
  chmod 644 "$tls/ca.crt"
}

pg_ctl_cmd() {
  as_postgres "$(pg_bindir)/pg_ctl" -D "$PGDATA" -l "$PG_LOG" -w -t 60 "$@"
}

pg_running() {
  [ -f "$PGDATA/PG_VERSION" ] && as_postgres "$(pg_bindir)/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1
}

init_pg() {
  mkdir -p "$STATE_DIR"
  chmod 755 "$STATE_DIR"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$STATE_DIR"; fi
  mkdir -p "$PG_SOCKET_DIR"; chown postgres: "$PG_SOCKET_DIR" 2>/dev/null || true
  make_tls_material
  log "initdb into $PGDATA"
  as_postgres "$(pg_bindir)/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
  cat >>"$PGDATA/postgresql.conf" <<CONF

# --- odoo-cdc test cluster ---
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_SOCKET_DIR'
wal_level = logical
max_wal_senders = 64
max_replication_slots = 64
max_connections = 300
shared_buffers = 256MB
fsync = off
max_prepared_transactions = 16
full_page_writes = off
wal_sender_timeout = 60s
logical_decoding_work_mem = 64MB
password_encryption = 'scram-sha-256'
ssl = on
ssl_cert_file = '$STATE_DIR/tls/server.crt'
ssl_key_file = '$STATE_DIR/tls/server.key'
CONF
  cat >"$PGDATA/pg_hba.conf" <<HBA
# TYPE  DATABASE  USER           ADDRESS        METHOD
local   all       all                           trust
host    all       odoo_cdc_scram 127.0.0.1/32   scram-sha-256
host    all       odoo_cdc_md5   127.0.0.1/32   md5
host    all       all            127.0.0.1/32   trust
host    all       all            ::1/128        trust
HBA
}

create_roles() {
  local psql=( "$(pg_bindir)/psql" -X -q -h "$PG_SOCKET_DIR" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 )
  as_postgres "${psql[@]}" <<'SQL'
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'odoo_cdc_scram') THEN
    SET LOCAL password_encryption = 'scram-sha-256';
    CREATE ROLE odoo_cdc_scram LOGIN REPLICATION PASSWORD 'scram-secret';
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'odoo_cdc_md5') THEN
    SET LOCAL password_encryption = 'md5';
    CREATE ROLE odoo_cdc_md5 LOGIN REPLICATION PASSWORD 'md5-secret';
  END IF;
END $$;
SQL
}

pg_up() {
  ensure_pg_installed
  if [ ! -f "$PGDATA/PG_VERSION" ]; then init_pg; fi
  if ! pg_running; then
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
    pg_ctl_cmd start >/dev/null
  fi
  create_roles
  drop_stale_slots
}

# A test that was killed (or a developer's ^C) leaves its slot behind, and an
# inactive slot pins WAL until the disk is full: the cluster is throwaway, so
# every slot nobody is streaming from is dropped when the services come up.
drop_stale_slots() {
  local psql=( "$(pg_bindir)/psql" -X -q -At -h "$PG_SOCKET_DIR" -p "$PG_PORT" -U postgres -d postgres )
  local n
  n=$(as_postgres "${psql[@]}" -c "SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots WHERE NOT active" 2>/dev/null || echo 0)
  [ "${n:-0}" = 0 ] || log "dropped $n inactive replication slot(s) left by earlier runs"
}

rabbit_running() {
  timeout 20 rabbitmqctl -q status >/dev/null 2>&1
}

rabbit_up() {
  if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/sbin/rabbitmq-server ]; then
    apt_install rabbitmq-server
  fi
  if ! rabbit_running; then
    log "starting RabbitMQ"
    # Debian's package may have started it through a service manager; otherwise detach it.
    (rabbitmq-server -detached >/dev/null 2>&1 || true)
    for _ in $(seq 1 90); do
      if timeout 10 rabbitmqctl -q await_startup >/dev/null 2>&1; then break; fi
      sleep 1
    done
  fi
  rabbit_running || { log "RabbitMQ did not start; see /var/log/rabbitmq"; exit 1; }
  # A connection from a test that was killed may leave blocking alarms set from an
  # earlier fault-injection run: clear the ones tests may set.
  timeout 20 rabbitmqctl -q set_vm_memory_high_watermark 0.4 >/dev/null 2>&1 || true
  timeout 20 rabbitmqctl -q set_disk_free_limit 50MB >/dev/null 2>&1 || true
  enable_stream_plugin
}

# The stream sink (--sink stream) needs rabbitmq_stream, listening on 5552 by
# default; its management extension is optional (only newer packages ship it
# separately). Enabling an enabled plugin is a no-op, but asking first keeps
# `up` quiet and fast when nothing changes.
enable_stream_plugin() {
  local enabled want=() p
  enabled=$(timeout 30 rabbitmq-plugins -q list -e -m 2>/dev/null || true)
  for p in rabbitmq_stream rabbitmq_stream_management; do
    grep -qx "$p" <<<"$enabled" && continue
    timeout 30 rabbitmq-plugins -q list -m "^$p\$" 2>/dev/null | grep -qx "$p" || continue
    want+=("$p")
  done
  [ "${#want[@]}" = 0 ] && return 0
  log "enabling RabbitMQ plugin(s) ${want[*]}"
  timeout 60 rabbitmq-plugins -q enable "${want[@]}" >/dev/null \
    || { log "could not enable ${want[*]}; see /var/log/rabbitmq"; exit 1; }
}

print_env() {
  cat <<ENV
export ODOO_CDC_TEST_PG='postgres://postgres@127.0.0.1:$PG_PORT/postgres'
export ODOO_CDC_TEST_AMQP='$AMQP_URL'
export ODOO_CDC_TEST_STREAM='$STREAM_URL'
export ODOO_CDC_TEST_PG_DATA='$PGDATA'
export ODOO_CDC_TEST_PG_BIN='$(pg_bindir 2>/dev/null || true)'
export ODOO_CDC_TEST_TLS_CA='$STATE_DIR/tls/ca.crt'
export ODOO_CDC_SERVICES='$(readlink -f "$0")'
ENV
}

# Prometheus (server and promtool) for the checks of deploy/: the alerting
# rules are unit-tested with promtool and one is evaluated end to end by the
# real server against a running connector (tests/deploy.rs).
prometheus_up() {
  command -v prometheus >/dev/null && command -v promtool >/dev/null && return 0
  apt_install prometheus
}

cmd="${1:-}"
case "$cmd" in
  up)
    pg_up
    rabbit_up
    prometheus_up
    log "ready: PostgreSQL 127.0.0.1:$PG_PORT (wal_level=logical), RabbitMQ 127.0.0.1:5672 (streams on 5552)"
    ;;
  down)
    if pg_running; then pg_ctl_cmd stop -m fast >/dev/null || true; fi
    rm -rf "$STATE_DIR"
    log "throwaway cluster removed (RabbitMQ left as it was)"
    ;;
  env) print_env ;;
  pg-restart) pg_ctl_cmd restart -m fast >/dev/null ;;
  pg-stop) pg_ctl_cmd stop -m fast >/dev/null ;;
  pg-start) pg_ctl_cmd start >/dev/null ;;
  rabbit-stop) timeout 60 rabbitmqctl -q stop_app >/dev/null ;;
  rabbit-start) timeout 60 rabbitmqctl -q start_app >/dev/null ;;
  *)
    echo "usage: $0 up|down|env|pg-restart|pg-stop|pg-start|rabbit-stop|rabbit-start" >&2
    exit 2
    ;;
esac
