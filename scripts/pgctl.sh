#!/usr/bin/env bash
# pgctl.sh - a private, throw-away-friendly PostgreSQL cluster for ngx_event_piper.
#
#   scripts/pgctl.sh start <datadir> <port>   initdb if needed, start, create role/database, apply schema
#   scripts/pgctl.sh stop  <datadir>          stop it (fast); no error if it is not running
#   scripts/pgctl.sh psql  <datadir> <port> [psql args...]
#                                             psql as event_piper on event_piper (reads stdin when
#                                             stdin is not a terminal: echo "select 1" | pgctl.sh psql ...)
#
# The cluster runs as the `postgres` system user (initdb refuses root). It listens on
# 127.0.0.1:<port> (scram-sha-256 for TCP) and on a unix socket in <datadir> (trust).
# Durable by default (fsync, synchronous_commit and full_page_writes on, as PostgreSQL ships):
# `make run` must never acknowledge an event it could lose. EVENT_PIPER_PG_FAST=1 turns the three
# off for throw-away clusters (the test suite; the benchmark says what it uses).
# Environment: PG_BIN (default /usr/lib/postgresql/15/bin), PG_USER (default postgres),
# EVENT_PIPER_PG_FAST (default 0), EVENT_PIPER_PG_LOGICAL (1: wal_level = logical and replication
# slots, for event_piper_source wal; default 0).
set -euo pipefail

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PG_USER=${PG_USER:-postgres}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCHEMA=${EVENT_PIPER_SCHEMA:-$ROOT/postgresql/schema.sql}

die() { echo "pgctl.sh: $*" >&2; exit 1; }
usage() {
    cat >&2 <<'EOF'
usage: pgctl.sh start <datadir> <port>
       pgctl.sh stop  <datadir>
       pgctl.sh psql  <datadir> <port> [psql args...]
EOF
    exit 2
}

# Run a command as the postgres system user (or directly when we already are that user).
as_pg() {
    if [ "$(id -un)" = "$PG_USER" ]; then
        "$@"
    elif [ "$(id -u)" = 0 ]; then
        runuser -u "$PG_USER" -- "$@"
    else
        die "must run as root or as $PG_USER"
    fi
}

abspath() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s/%s\n' "$(pwd)" "$1" ;;
    esac
}

check_port() {
    case "$1" in
        ''|*[!0-9]*) die "port must be a number, got '$1'" ;;
    esac
    [ "$1" -ge 1 ] && [ "$1" -le 65535 ] || die "port out of range: $1"
}

# Every parent folder of the data directory must be traversable by postgres.
check_parents() {
    local dir=$1 parent
    parent=$(dirname "$dir")
    while :; do
        if [ -d "$parent" ] && ! as_pg test -x "$parent"; then
            die "the '$PG_USER' user cannot traverse $parent (needed for $dir); chmod o+x $parent (e.g. chmod 755)"
        fi
        [ "$parent" = / ] && break
        parent=$(dirname "$parent")
    done
}

is_running() {
    [ -f "$1/PG_VERSION" ] && as_pg "$PG_BIN/pg_ctl" -D "$1" status >/dev/null 2>&1
}

psql_super() { # datadir port [args]
    local d=$1 p=$2; shift 2
    psql -X -q -v ON_ERROR_STOP=1 -h "$d" -p "$p" -U "$PG_USER" -d postgres "$@"
}

cmd_start() {
    [ $# -eq 2 ] || usage
    local datadir port
    datadir=$(abspath "$1"); port=$2
    check_port "$port"
    [ -x "$PG_BIN/initdb" ] || die "PostgreSQL binaries not found in $PG_BIN (apt-get install postgresql-15)"
    id "$PG_USER" >/dev/null 2>&1 || die "system user '$PG_USER' does not exist (install postgresql)"
    check_parents "$datadir"
    # The unix socket path (<datadir>/.s.PGSQL.<port>) must fit in sun_path (107 bytes).
    [ ${#datadir} -le 90 ] || die "datadir path too long for a unix socket (${#datadir} > 90 chars): $datadir"

    if [ ! -f "$datadir/PG_VERSION" ]; then
        mkdir -p "$datadir"
        if [ -n "$(ls -A "$datadir" 2>/dev/null)" ]; then
            die "$datadir exists, is not empty and is not a PostgreSQL cluster"
        fi
        chown "$PG_USER": "$datadir"
        chmod 700 "$datadir"
        as_pg "$PG_BIN/initdb" -D "$datadir" -U "$PG_USER" --auth=trust -E UTF8 --locale=C.UTF-8 \
            >"$datadir.initdb.log" 2>&1 \
            || { cat "$datadir.initdb.log" >&2; die "initdb failed"; }
        rm -f "$datadir.initdb.log"
        # TCP clients (nginx) authenticate with a password; the local socket trusts (tests, psql).
        cat >"$datadir/pg_hba.conf" <<'EOF'
# ngx_event_piper private cluster
local   all   all                     trust
host    all   all   127.0.0.1/32      scram-sha-256
host    all   all   ::1/128           scram-sha-256
EOF
        cat >>"$datadir/postgresql.conf" <<'EOF'

# --- ngx_event_piper test/dev cluster (scripts/pgctl.sh) ---
listen_addresses = '127.0.0.1'
max_connections = 200
wal_level = minimal
max_wal_senders = 0
checkpoint_timeout = 30min
max_wal_size = 1GB
shared_buffers = 128MB
password_encryption = 'scram-sha-256'
logging_collector = off
log_min_messages = warning
log_line_prefix = '%m [%p] %q%a '
EOF
        chown "$PG_USER": "$datadir/pg_hba.conf" "$datadir/postgresql.conf"
    fi

    if ! is_running "$datadir"; then
        # Port and socket folder are given at each start, so one cluster can move ports.
        touch "$datadir/server.log"; chown "$PG_USER": "$datadir/server.log"
        # Given at each start (not in postgresql.conf), so a cluster of an older version of this
        # script that wrote "fsync = off" into its configuration is durable again too.
        local durability="-c fsync=on -c synchronous_commit=on -c full_page_writes=on"
        if [ "${EVENT_PIPER_PG_FAST:-0}" = 1 ]; then
            durability="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        fi
        # event_piper_source wal reads a logical replication slot (wal_level needs a restart).
        local logical=""
        if [ "${EVENT_PIPER_PG_LOGICAL:-0}" = 1 ]; then
            logical="-c wal_level=logical -c max_wal_senders=10 -c max_replication_slots=10"
        fi
        as_pg "$PG_BIN/pg_ctl" -D "$datadir" -w -t 60 -l "$datadir/server.log" \
            -o "-p $port -c unix_socket_directories='$datadir' -c listen_addresses=127.0.0.1 $durability $logical" \
            start >/dev/null \
            || { tail -n 30 "$datadir/server.log" >&2; die "pg_ctl start failed (log: $datadir/server.log)"; }
    else
        local running_port
        running_port=$(sed -n 4p "$datadir/postmaster.pid" 2>/dev/null || true)
        if [ -n "$running_port" ] && [ "$running_port" != "$port" ]; then
            die "cluster $datadir is already running on port $running_port, not $port"
        fi
    fi

    # Wait until it accepts connections on the socket (pg_ctl -w did, but be safe on reuse).
    local i
    for i in $(seq 1 100); do
        "$PG_BIN/pg_isready" -q -h "$datadir" -p "$port" && break
        sleep 0.1
    done

    psql_super "$datadir" "$port" <<'EOF'
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'event_piper') THEN
        CREATE ROLE event_piper LOGIN PASSWORD 'event_piper';
    ELSE
        ALTER ROLE event_piper LOGIN PASSWORD 'event_piper';
    END IF;
END
$$;
SELECT 'CREATE DATABASE event_piper OWNER event_piper'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'event_piper') \gexec
EOF
    [ -f "$SCHEMA" ] || die "schema not found: $SCHEMA"
    # One transaction: writers inserting meanwhile wait for the new trigger instead of slipping
    # between its DROP and CREATE.
    psql -X -q -v ON_ERROR_STOP=1 --single-transaction -h "$datadir" -p "$port" -U event_piper \
        -d event_piper -c 'SET client_min_messages = warning' -f "$SCHEMA" >/dev/null \
        || die "applying $SCHEMA failed"
    if [ "${EVENT_PIPER_PG_LOGICAL:-0}" = 1 ]; then
        # What event_piper_source wal needs: the role may read a replication slot; wal.sql.
        echo 'ALTER ROLE event_piper REPLICATION' | psql_super "$datadir" "$port" >/dev/null
        psql -X -q -v ON_ERROR_STOP=1 --single-transaction -h "$datadir" -p "$port" \
            -U event_piper -d event_piper -c 'SET client_min_messages = warning' \
            -f "$ROOT/postgresql/wal.sql" >/dev/null || die "applying postgresql/wal.sql failed"
    fi
}

cmd_stop() {
    [ $# -eq 1 ] || usage
    local datadir
    datadir=$(abspath "$1")
    if is_running "$datadir"; then
        as_pg "$PG_BIN/pg_ctl" -D "$datadir" -w -t 60 -m fast stop >/dev/null
    fi
}

cmd_psql() {
    [ $# -ge 2 ] || usage
    local datadir port
    datadir=$(abspath "$1"); port=$2; shift 2
    check_port "$port"
    exec psql -h "$datadir" -p "$port" -U event_piper -d event_piper "$@"
}

[ $# -ge 1 ] || usage
sub=$1; shift
case "$sub" in
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    psql) cmd_psql "$@" ;;
    -h|--help|help) usage ;;
    *) echo "pgctl.sh: unknown command '$sub'" >&2; usage ;;
esac
