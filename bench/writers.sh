#!/usr/bin/env bash
# What an event costs its writer (issue 11): commits/s and rows/s of concurrent pgbench writers
# against four `events` tables side by side, in one PostgreSQL 15 cluster with fsync on and
# default durability (synchronous_commit on, full_page_writes on) and wal_level logical (every
# column; WRITERS_WAL=0: replica and no wal column):
#
#   plain     the original service's table, no trigger
#   original  the same table with the original's trigger:
#             AFTER INSERT ... FOR EACH ROW pg_notify('new_events', row_to_json(NEW)::text)
#   ours      postgresql/schema.sql (event_piper_source trigger)
#   wal       postgresql/schema.sql + wal.sql switched to event_piper_source wal: nginx with the
#             module (build/ngx_event_piper_module.so, 2 workers) runs the positioner on this
#             database, and SSE streams (bench/wal_streams.py) read every event written
#
# Each table lives in its own database (the same cluster, so the same WAL and the same NOTIFY
# queue) with 2 sessions LISTENing on new_events that read each notification as it comes (wal:
# the module's listener instead). Writers: 8 pgbench clients, each
# transaction one INSERT of 1, 10 or 100 rows (the original's insert statement, several VALUES
# rows). The tables are measured alternately (order reversed every other repetition); the report
# gives medians with min-max, ratios ours / original of the medians, and pg_stat_user_tables of
# each table after all runs. After the runs (wal column only): single-row writers at full rate
# for WRITERS_LAG_SECONDS (60) with the positioner's lag sampled each second.
#
#   bench/writers.sh [--quick]   (make bench-writers; also the last section of make bench)
#
# Environment: WRITERS_REPS (default 5, quick 2), WRITERS_SECONDS per run (default 10, quick 4),
# WRITERS_CLIENTS (8), WRITERS_SIZES ("1 10 100"), WRITERS_SCHEMA (the schema of "ours", default
# postgresql/schema.sql: for experiments), WRITERS_WAL (1), WRITERS_LAG_SECONDS (60, quick 10),
# EVENT_PIPER_MODULE (build/ngx_event_piper_module.so), BENCH_OUT (default bench/), BENCH_KEEP=1.
# Writes the section between the "writers" markers of $BENCH_OUT/results.md (the rest is kept)
# and $BENCH_OUT/results-writers.jsonl.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${BENCH_OUT:-$ROOT/bench}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
QUICK=0
for arg in "$@"; do
    case $arg in
        --quick) QUICK=1 ;;
        -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
        *) echo "bench/writers.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done
if [[ $QUICK == 1 ]]; then
    REPS=${WRITERS_REPS:-2}; SECONDS_PER_RUN=${WRITERS_SECONDS:-4}
    LAG_SECONDS=${WRITERS_LAG_SECONDS:-10}
else
    REPS=${WRITERS_REPS:-5}; SECONDS_PER_RUN=${WRITERS_SECONDS:-10}
    LAG_SECONDS=${WRITERS_LAG_SECONDS:-60}
fi
WAL=${WRITERS_WAL:-1}
NGINX=${NGINX_BIN:-/usr/sbin/nginx}
MODULE_SO=${EVENT_PIPER_MODULE:-$ROOT/build/ngx_event_piper_module.so}
CLIENTS=${WRITERS_CLIENTS:-8}
SIZES=${WRITERS_SIZES:-"1 10 100"}
COMMAND=${BENCH_COMMAND:-"bench/writers.sh${*:+ $*}"}
TABLES="plain original ours"
WAL_LEVEL=replica
if [[ $WAL == 1 ]]; then TABLES="plain original ours wal"; WAL_LEVEL=logical; fi

log() { printf '[writers %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
[[ -x $PG_BIN/pgbench ]] || die "$PG_BIN/pgbench not found (apt-get install postgresql-15)"
if [[ $WAL == 1 ]]; then
    [[ -f $MODULE_SO ]] || die "$MODULE_SO not found (make build)"
    [[ -x $NGINX ]] || die "$NGINX not found (apt-get install nginx)"
fi

TMP=$(mktemp -d /tmp/epwriters.XXXXXX)
chmod 755 "$TMP"
PGDATA_DIR=$TMP/pg
LISTENERS=()
NGINX_MASTER=""
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${LISTENERS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    if [[ -n $NGINX_MASTER ]]; then
        kill -TERM "$NGINX_MASTER" 2>/dev/null || true
        for pid in $(seq 1 50); do kill -0 "$NGINX_MASTER" 2>/dev/null || break; sleep 0.1; done
    fi
    "$ROOT/scripts/pgctl.sh" stop "$PGDATA_DIR" >/dev/null 2>&1 || true
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

PGPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
log "PostgreSQL on port $PGPORT (fsync on, default durability, wal_level $WAL_LEVEL)"
"$ROOT/scripts/pgctl.sh" start "$PGDATA_DIR" "$PGPORT" >/dev/null
psql_db() { # db [psql args]
    local db=$1; shift
    psql -X -q -v ON_ERROR_STOP=1 -h "$PGDATA_DIR" -p "$PGPORT" -U postgres -d "$db" "$@"
}
# pgctl.sh tunes its clusters for tests (fsync off): back to PostgreSQL's defaults here.
psql_db postgres <<EOF
ALTER SYSTEM SET fsync = on;
ALTER SYSTEM SET synchronous_commit = on;
ALTER SYSTEM SET full_page_writes = on;
ALTER SYSTEM SET wal_level = '$WAL_LEVEL';
ALTER SYSTEM SET max_wal_senders = 10;
ALTER SYSTEM SET max_replication_slots = 10;
ALTER SYSTEM SET checkpoint_timeout = '5min';
EOF
"$ROOT/scripts/pgctl.sh" stop "$PGDATA_DIR"
"$ROOT/scripts/pgctl.sh" start "$PGDATA_DIR" "$PGPORT" >/dev/null
[[ $(psql_db postgres -At -c "select current_setting('fsync') || current_setting('synchronous_commit') || current_setting('wal_level')") == onon$WAL_LEVEL ]] \
    || die "durability settings did not apply"

ORIGINAL_TABLE='
CREATE TABLE events (
    id         BIGSERIAL PRIMARY KEY,
    type       varchar   NOT NULL,
    timestamp  timestamp NOT NULL,
    subscriber varchar   NOT NULL,
    payload    jsonb     NOT NULL
);
CREATE INDEX events_subscriber_idx ON events (subscriber);'
for t in $TABLES; do
    psql_db postgres -c "CREATE DATABASE $t OWNER event_piper"
done
psql_db plain -c "SET client_min_messages = warning" -c "$ORIGINAL_TABLE"
psql_db original -c "SET client_min_messages = warning" -c "$ORIGINAL_TABLE" -c "
CREATE FUNCTION notify_event() RETURNS trigger LANGUAGE plpgsql AS \$\$
BEGIN
    PERFORM pg_notify('new_events', row_to_json(NEW)::text);
    RETURN NULL;
END;
\$\$;
CREATE TRIGGER events_notify AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION notify_event();"
psql_db ours --single-transaction -c "SET client_min_messages = warning" \
    -f "${WRITERS_SCHEMA:-$ROOT/postgresql/schema.sql}" >/dev/null
if [[ $WAL == 1 ]]; then
    # The positioner's role reads a replication slot; the switch creates the slot and disables
    # the triggers (docs/wal-source.md).
    psql_db postgres -c "ALTER ROLE event_piper REPLICATION"
    psql_db wal --single-transaction -c "SET client_min_messages = warning" \
        -f "${WRITERS_SCHEMA:-$ROOT/postgresql/schema.sql}" -f "$ROOT/postgresql/wal.sql" >/dev/null
    [[ $(psql_db wal -At -c "SELECT event_piper_set_source('wal')") == wal ]] \
        || die "the wal database did not switch to event_piper_source wal"
fi
for t in $TABLES; do psql_db "$t" -c "GRANT ALL ON ALL TABLES IN SCHEMA public TO event_piper; GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO event_piper"; done

# Two listeners per database that read every notification as it comes (like a module that keeps
# up), and cost nothing in between. (They were psql sessions polling every 50 ms: 120 forks of
# `sleep` per second on this 2-core machine, which took CPU from the writers being measured.)
for t in plain original ours; do
    /usr/bin/python3 "$ROOT/bench/idle_listeners.py" \
        "host=$PGDATA_DIR port=$PGPORT user=postgres dbname=$t" 2 --read &
    LISTENERS+=($!)
done
sleep 0.5
listening=$(psql_db postgres -At -c "select count(*) from pg_stat_activity where application_name = 'bench_idle_listener'")
(( listening >= 6 )) || die "expected 6 listening sessions, found $listening"

# The wal column: nginx with the module in wal mode on database wal (its positioner, its
# listener), and streams that read every event the writers insert (subscribers user-2 ..
# user-1100, see write_script; 18 streams of 64 ids).
NGINX_PORT=""
READ_COUNT=$TMP/wal-read.count
if [[ $WAL == 1 ]]; then
    NGX=$TMP/nginx
    mkdir -p "$NGX/logs" "$NGX/conf"
    cp "$MODULE_SO" "$TMP/ngx_event_piper_module.so"
    NGINX_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
    cat >"$NGX/conf/nginx.conf" <<NGINX_CONF
load_module $TMP/ngx_event_piper_module.so;
worker_processes 2;
pid $NGX/nginx.pid;
error_log $NGX/logs/error.log notice;
daemon on;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $NGX/body;
    proxy_temp_path $NGX/proxy;
    fastcgi_temp_path $NGX/fastcgi;
    uwsgi_temp_path $NGX/uwsgi;
    scgi_temp_path $NGX/scgi;
    event_piper_postgres "host=127.0.0.1 port=$PGPORT dbname=wal user=event_piper password=event_piper";
    event_piper_source wal;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location = /events {
            event_piper;
            event_piper_consumer_groups \$http_x_consumer_groups;
        }
        location = /status { event_piper_status; }
    }
}
NGINX_CONF
    "$NGINX" -p "$NGX" -c "$NGX/conf/nginx.conf" -g "" 2>"$NGX/logs/start.err" \
        || { cat "$NGX/logs/start.err" "$NGX/logs/error.log" >&2; die "nginx failed to start"; }
    for i in $(seq 1 100); do [[ -s $NGX/nginx.pid ]] && break; sleep 0.05; done
    NGINX_MASTER=$(cat "$NGX/nginx.pid")
    for i in $(seq 1 200); do
        [[ $(psql_db postgres -At -c "select count(*) from pg_replication_slots where slot_name = 'event_piper' and active") == 1 ]] && break
        sleep 0.1
    done
    (( i < 200 )) || { cat "$NGX/logs/error.log" >&2; die "no positioner reads the slot"; }
    /usr/bin/python3 "$ROOT/bench/wal_streams.py" read "$NGINX_PORT" 1 1152 "$READ_COUNT" &
    LISTENERS+=($!)
    for i in $(seq 1 100); do [[ -s $READ_COUNT ]] && break; sleep 0.05; done
    [[ -s $READ_COUNT ]] || die "the wal streams did not start"
    log "nginx (wal mode) on port $NGINX_PORT: its positioner reads the slot, 18 streams read every event"
fi

# Every event of the wal database reached the streams, once: waits up to 60 s and prints how
# long the last ones took after the writers stopped.
wal_drain() {
    local want got t0=$SECONDS
    want=$(psql_db wal -At -c "select count(*) from events")
    while :; do
        got=$(cat "$READ_COUNT" 2>/dev/null || echo 0)
        (( got >= want )) && break
        (( SECONDS - t0 < 60 )) || die "the wal streams read $got of $want events"
        sleep 0.2
    done
    (( got == want )) || die "the wal streams read $got events, $want were written (duplicates?)"
    echo $(( SECONDS - t0 ))
}

# The original's insert statement, n rows per statement (one transaction each).
write_script() { # rows file
    local n=$1 i
    {
        echo '\set s random(1, 1000)'
        printf 'insert into events (type, timestamp, subscriber, payload) values\n'
        for ((i = 1; i <= n; i++)); do
            printf "  ('order_paid', now(), 'user-' || (:s + %d), '{\"order\": %d, \"status\": \"paid\", \"amount\": 99.5, \"currency\": \"EUR\"}')%s\n" \
                "$i" "$i" "$([[ $i == "$n" ]] && echo ';' || echo ',')"
        done
    } >"$2"
}

JSONL=$TMP/results-writers.jsonl
: >"$JSONL"
STARTED=$(date +%s)
for rep in $(seq 1 "$REPS"); do
    order=$TABLES
    (( rep % 2 == 0 )) && order=$(tr ' ' '\n' <<<"$TABLES" | tac | tr '\n' ' ')
    for n in $SIZES; do
        write_script "$n" "$TMP/insert$n.sql"
        for t in $order; do
            out=$("$PG_BIN/pgbench" -n -c "$CLIENTS" -j 2 -T "$SECONDS_PER_RUN" \
                -f "$TMP/insert$n.sql" -h "$PGDATA_DIR" -p "$PGPORT" -U event_piper "$t" 2>&1) \
                || { echo "$out" >&2; die "pgbench failed ($t, $n rows)"; }
            tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' <<<"$out" | head -1)
            [[ -n $tps ]] || { echo "$out" >&2; die "no tps in pgbench output"; }
            if [[ $t == wal ]]; then
                drained=$(wal_drain)
                log "rep $rep, $n-row transactions, $t: $tps commits/s (the streams had every event ${drained}s after the writers stopped)"
            else
                log "rep $rep, $n-row transactions, $t: $tps commits/s"
            fi
            printf '{"rep":%d,"rows":%d,"table":"%s","tps":%s}\n' "$rep" "$n" "$t" "$tps" >>"$JSONL"
        done
    done
done
ELAPSED=$(( $(date +%s) - STARTED ))

# The positioner keeps up: single-row writers at full rate on the wal database for LAG_SECONDS,
# its lag sampled each second.
LAG=$TMP/wal-lag.jsonl
: >"$LAG"
if [[ $WAL == 1 ]] && (( LAG_SECONDS > 0 )); then
    write_script 1 "$TMP/insert1.sql"
    log "wal: $CLIENTS single-row writers for ${LAG_SECONDS}s, the positioner's lag each second"
    /usr/bin/python3 "$ROOT/bench/wal_streams.py" lag \
        "host=$PGDATA_DIR port=$PGPORT user=postgres dbname=wal" \
        "http://127.0.0.1:$NGINX_PORT/status" "$LAG_SECONDS" "$LAG" &
    sampler=$!
    out=$("$PG_BIN/pgbench" -n -c "$CLIENTS" -j 2 -T "$LAG_SECONDS" \
        -f "$TMP/insert1.sql" -h "$PGDATA_DIR" -p "$PGPORT" -U event_piper wal 2>&1) \
        || { echo "$out" >&2; die "pgbench failed (lag run)"; }
    wait "$sampler" || die "the lag sampler failed"
    drained=$(wal_drain)
    log "wal lag run: $(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' <<<"$out" | head -1) commits/s, the streams had every event ${drained}s after"
fi
if [[ $WAL == 1 ]] && grep -E '\[(alert|emerg)\]' "$TMP/nginx/logs/error.log"; then
    die "nginx logged an alert ($TMP/nginx/logs/error.log)"
fi

STATS=$TMP/stats.txt
for t in $TABLES; do
    psql_db "$t" -At -F ' ' -c "select '$t', n_tup_ins, n_tup_upd, n_tup_hot_upd, n_dead_tup,
        autovacuum_count, pg_total_relation_size('events'), pg_relation_size('events')
        from pg_stat_user_tables where relname = 'events'"
done >"$STATS"
# The narrow side tables of ours, if any (and of wal, named so).
psql_db ours -At -F ' ' -c "select relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_dead_tup,
    autovacuum_count, pg_total_relation_size(relid), pg_relation_size(relid)
    from pg_stat_user_tables where relname <> 'events'" >>"$STATS"
if [[ $WAL == 1 ]]; then
    psql_db wal -At -F ' ' -c "select 'wal:' || relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_dead_tup,
    autovacuum_count, pg_total_relation_size(relid), pg_relation_size(relid)
    from pg_stat_user_tables where relname <> 'events'" >>"$STATS"
fi

mkdir -p "$OUT"
cp "$JSONL" "$OUT/results-writers.jsonl"
[[ -s $LAG ]] && cp "$LAG" "$OUT/results-writers-lag.jsonl"
python3 "$ROOT/bench/report_writers.py" "$JSONL" "$STATS" "$OUT/results.md" \
    "$COMMAND" "$REPS" "$SECONDS_PER_RUN" "$CLIENTS" "$ELAPSED" \
    "$("$PG_BIN/postgres" --version | awk '{print $3}')" \
    "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- postgresql src 2>/dev/null || echo '+dirty')" \
    "$WAL_LEVEL" "$LAG"
log "done in ${ELAPSED}s: $OUT/results.md (writers section)"
