#!/usr/bin/env bash
# ngx_event_piper benchmark suite (design.md section 6, issue 6).
#
#   bench/run.sh            full run: every measurement repeated 5 times (about 10-15 minutes)
#   bench/run.sh --quick    fewer repetitions and shorter runs (under 5 minutes)
#   bench/run.sh --writers  only the writer section (bench/writers.sh: what an event costs the
#                           database, issue 11); the full run ends with it, the quick run skips it
#   Both runs end with the patching section (bench/patching.py, also alone: make bench-patching):
#   folded replay against the full history; BENCH_PATCHING=0 skips it
#   and the standby section (bench/standby.py, also alone: make bench-standby): 100 clients
#   resuming 100,000 events each from a hot standby; BENCH_STANDBY=0 skips it
#
# Starts its own PostgreSQL (scripts/pgctl.sh, temp folder), nginx with this module and a second
# nginx with Debian's nchan (same /usr/sbin/nginx binary, same worker settings), each on a free
# loopback port in its own prefix; builds the epoll load client (bench/loadclient.cpp) into
# build/bench/; measures the two systems alternately; writes bench/results.md, bench/results.jsonl
# (raw figures, one JSON object per run) and bench/*.png (gnuplot). Everything it starts is
# stopped on exit, Ctrl-C or SIGTERM.
#
# Environment (all optional):
#   BENCH_TESTS="a b c d e f g h i j"  which measurements to run (i: shared listener vs
#                              per_worker; j: latency on a large table, alone: make bench-stall)
#   BENCH_REPS=N               repetitions (default 5, quick 2)
#   BENCH_WORKERS=N            worker_processes for both nginx (default 2 = nproc here)
#   BENCH_RATE=N               publish rate of the latency test, events/s (default 50)
#   BENCH_REPLAY_ROWS=N        stored events for the replay test (default 1000000)
#   BENCH_STALL_ROWS=N         events in the table for (j) (default 10000000, quick 1000000)
#   BENCH_STALL_MS=N           publishing time of (j) (default 60000: three listener checks)
#   BENCH_NGINX_EXTRA="..."    extra http{} directives for both nginx (e.g. "request_pool_size 1k;")
#   BENCH_KEEP=1               keep the temporary folder (logs, configs)
#   EVENT_PIPER_MODULE=path    module to load (default build/ngx_event_piper_module.so)
#   BENCH_OUT=dir              where results.md, results.jsonl and plots go (default bench/)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
OUT=${BENCH_OUT:-$BENCH}
NGINX=${NGINX_BIN:-/usr/sbin/nginx}
NCHAN_SO=${NCHAN_SO:-/usr/lib/nginx/modules/ngx_nchan_module.so}
MODULE_SO=${EVENT_PIPER_MODULE:-$ROOT/build/ngx_event_piper_module.so}
CLIENT=$ROOT/build/bench/loadclient

QUICK=0
for arg in "$@"; do
    case $arg in
        --quick) QUICK=1 ;;
        --writers) BENCH_COMMAND=${BENCH_COMMAND:-"bench/run.sh --writers"} exec "$BENCH/writers.sh" ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "bench/run.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done
if [[ -n ${MAKELEVEL:-} ]]; then   # started by make
    if [[ $QUICK == 1 ]]; then COMMAND="make bench-quick"; else COMMAND="make bench"; fi
else
    COMMAND="bench/run.sh $*"
fi
COMMAND=${BENCH_COMMAND:-$COMMAND}

TESTS=${BENCH_TESTS:-"a b c d e f g h i j"}
WORKERS=${BENCH_WORKERS:-2}
RATE=${BENCH_RATE:-50}
REPLAY_ROWS=${BENCH_REPLAY_ROWS:-1000000}
if [[ $QUICK == 1 ]]; then
    REPS=${BENCH_REPS:-2}
    PUB_MS=2000      # publishing time of the throughput runs
    LAT_MS=4000      # latency run
    HOLD_MS=1000     # idle time before the memory sample
    FANOUT_SIZES=${BENCH_FANOUT_SIZES:-"1 100 1000 10000"}
    STALL_ROWS=${BENCH_STALL_ROWS:-1000000}
else
    REPS=${BENCH_REPS:-5}
    PUB_MS=4000
    LAT_MS=10000
    HOLD_MS=2000
    FANOUT_SIZES=${BENCH_FANOUT_SIZES:-"1 100 1000 10000"}
    STALL_ROWS=${BENCH_STALL_ROWS:-10000000}
fi
STALL_MS=${BENCH_STALL_MS:-60000}
NGINX_EXTRA=${BENCH_NGINX_EXTRA:-}   # extra http{} directives, the same for both systems
MEM_STREAMS=10000
LAT_STREAMS=1000
FILTER_STREAMS=10000
PAYLOAD_BYTES=100
PUB_CONNS=2      # publisher connections (libpq or HTTP keep-alive), closed-loop tests
PIPELINE=16      # requests in flight on each

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ -x $NGINX ]] || die "$NGINX not found (apt-get install nginx)"
[[ -f $NCHAN_SO ]] || die "$NCHAN_SO not found (make deps-bench installs libnginx-mod-nchan)"
[[ -f $MODULE_SO ]] || die "$MODULE_SO not found (make build)"
command -v gnuplot >/dev/null || die "gnuplot not found (make deps-bench installs gnuplot-nox)"
command -v python3 >/dev/null || die "python3 not found"

# --- file descriptors: 10,000 streams need as many sockets in the client and in nginx --------
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
if (( NOFILE < MEM_STREAMS + 200 )); then
    die "open-file limit is $NOFILE (hard $(ulimit -Hn)); 10,000 streams need more (raise the hard limit)"
fi

# --- the load client ----------------------------------------------------------------------
mkdir -p "$(dirname "$CLIENT")"
if [[ ! -x $CLIENT || $BENCH/loadclient.cpp -nt $CLIENT ]]; then
    log "building $CLIENT"
    g++ -std=c++17 -O2 -Wall -Wextra -pthread "$BENCH/loadclient.cpp" -o "$CLIENT" \
        -I/usr/include/postgresql -lpq
fi

# --- temporary folder and cleanup -----------------------------------------------------------
TMP=$(mktemp -d /tmp/epbench.XXXXXX)
chmod 755 "$TMP"
PGDATA_DIR=$TMP/pg
declare -A MASTER=() PORTS=() WPIDS=()
CLIENT_PID=""

stop_nginx() { # system
    local sys=$1 pid=${MASTER[$1]:-}
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "nginx ($sys) did not stop in 10 s, killing it"
        kill -KILL "$pid" 2>/dev/null || true
        pkill -KILL -P "$pid" 2>/dev/null || true
    fi
    MASTER[$sys]=""
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $CLIENT_PID ]]; then kill -TERM "$CLIENT_PID" 2>/dev/null || true; fi
    stop_nginx module || true
    stop_nginx module_pw || true
    stop_nginx nchan || true
    if [[ -n ${IDLE_PID:-} ]]; then kill -TERM "$IDLE_PID" 2>/dev/null || true; fi
    "$ROOT/scripts/pgctl.sh" stop "$PGDATA_DIR" >/dev/null 2>&1 || true
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then
        log "kept $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Snapshot the module: a rebuild during the run must not change what is measured.
cp "$MODULE_SO" "$TMP/ngx_event_piper_module.so"
MODULE_SHA=$(sha256sum "$MODULE_SO" | cut -c1-12)

# --- PostgreSQL -----------------------------------------------------------------------------
PGPORT=$(free_port)
log "starting PostgreSQL on 127.0.0.1:$PGPORT"
# The streaming measurements (a-f) use a throw-away cluster with fsync and synchronous_commit
# off: they measure the module and its peers, not the disk. Writer measurements say their own.
EVENT_PIPER_PG_FAST=1 "$ROOT/scripts/pgctl.sh" start "$PGDATA_DIR" "$PGPORT"
CONNINFO="host=127.0.0.1 port=$PGPORT dbname=event_piper user=event_piper password=event_piper"
psql_su() { psql -X -q -v ON_ERROR_STOP=1 -h "$PGDATA_DIR" -p "$PGPORT" -U postgres -d event_piper "$@"; }

# --- nginx ----------------------------------------------------------------------------------
write_conf() { # system prefix port
    local sys=$1 p=$2 port=$3
    mkdir -p "$p/logs" "$p/tmp" "$p/conf"
    {
        if [[ $sys == module* ]]; then
            echo "load_module $TMP/ngx_event_piper_module.so;"
        else
            echo "load_module $NCHAN_SO;"
        fi
        cat <<EOF
worker_processes $WORKERS;
worker_rlimit_nofile $NOFILE;
pid $p/nginx.pid;
error_log $p/logs/error.log warn;
daemon on;
events {
    worker_connections $((NOFILE - 100));
}
http {
    access_log off;
    client_body_temp_path $p/tmp/body;
    proxy_temp_path $p/tmp/proxy;
    fastcgi_temp_path $p/tmp/fastcgi;
    uwsgi_temp_path $p/tmp/uwsgi;
    scgi_temp_path $p/tmp/scgi;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    tcp_nodelay on;
    $NGINX_EXTRA
EOF
        if [[ $sys == module* ]]; then
            # module: the default shared listener; module_pw: one listener per worker (issue 12).
            [[ $sys == module_pw ]] && echo "    event_piper_listener per_worker;"
            cat <<EOF
    event_piper_postgres "$CONNINFO";
    server {
        listen 127.0.0.1:$port backlog=4096;
        location = /events {
            event_piper;
            event_piper_consumer_groups \$http_x_consumer_groups;
        }
        location = /health { event_piper_health; }
        location = /status { event_piper_status; }
        # Baseline of test (a): a plain request that waits for its body (no module involved).
        location = /hold { client_body_timeout 3600s; proxy_pass http://127.0.0.1:9; }
    }
}
EOF
        else
            cat <<EOF
    server {
        listen 127.0.0.1:$port backlog=4096;
        location ~ ^/sub/(\w+)$ {
            nchan_subscriber eventsource;
            nchan_channel_id \$1;
            nchan_subscriber_first_message newest;
        }
        location ~ ^/pub/(\w+)$ {
            nchan_publisher;
            nchan_channel_id \$1;
        }
    }
}
EOF
        fi
    } >"$p/conf/nginx.conf"
}

start_nginx() { # system
    local sys=$1 p=$TMP/nginx-$1 port
    port=${PORTS[$sys]:-$(free_port)}
    PORTS[$sys]=$port
    write_conf "$sys" "$p" "$port"
    rm -f "$p/nginx.pid"
    "$NGINX" -p "$p" -c "$p/conf/nginx.conf" -g "" 2>"$p/logs/start.err" \
        || { cat "$p/logs/start.err" "$p/logs/error.log" >&2 2>/dev/null; die "nginx ($sys) failed to start"; }
    local i master="" kids=""
    for i in $(seq 1 100); do
        [[ -s $p/nginx.pid ]] && master=$(cat "$p/nginx.pid")
        if [[ -n $master ]]; then
            kids=$(cat "/proc/$master/task/$master/children" 2>/dev/null || true)
            (( $(wc -w <<<"$kids") >= WORKERS )) && break
        fi
        sleep 0.05
    done
    [[ -n $master ]] || die "nginx ($sys) wrote no pid file"
    MASTER[$sys]=$master
    WPIDS[$sys]=$(tr ' ' ',' <<<"$kids" | sed 's/,*$//')
    if [[ $sys == module* ]]; then
        # Ready when its listeners are connected (one, or one per worker) and the other workers
        # follow the shared one (they do within 500 ms).
        local want=1
        [[ $sys == module_pw ]] && want=$WORKERS
        for i in $(seq 1 200); do
            local n
            n=$(psql_su -At -c "select count(*) from pg_stat_activity where application_name = 'event_piper_listener'")
            (( n >= want )) && break
            sleep 0.05
        done
        sleep 0.6
    fi
    sleep 0.3
}

restart_nginx() { stop_nginx "$1"; start_nginx "$1"; }

# --- bookkeeping ----------------------------------------------------------------------------
JSONL=$TMP/results.jsonl
: >"$JSONL"

run_client() { # tags-json client-args...
    local tags=$1; shift
    local line
    "$CLIENT" "$@" --tags "$tags" >"$TMP/client.out" 2>"$TMP/client.err" &
    CLIENT_PID=$!
    if ! wait "$CLIENT_PID"; then
        CLIENT_PID=""
        cat "$TMP/client.err" >&2
        die "load client failed: $*"
    fi
    CLIENT_PID=""
    if [[ -s $TMP/client.err ]]; then sed 's/^/    /' "$TMP/client.err" >&2; fi
    line=$(tail -n 1 "$TMP/client.out")
    echo "$line" >>"$JSONL"
    python3 - "$line" <<'EOF' >&2
import json, sys
d = json.loads(sys.argv[1])
keys = ["test", "system", "n", "rep", "opened", "failed", "deliveries", "expected",
        "deliveries_per_s", "cpu_us_per_delivery", "rss_per_stream", "rss_growth", "secs"]
parts = []
for k in keys:
    if k in d:
        v = d[k]
        parts.append("%s=%s" % (k, ("%.4g" % v) if isinstance(v, float) else v))
lat = d.get("latency_us")
if lat and d.get("test") == "c":
    parts.append("p50=%dus p99=%dus p99.9=%dus" % (lat["pct"]["50"], lat["pct"]["99"], lat["pct"]["99.9"]))
print("    " + " ".join(parts))
EOF
}

order_for_rep() { # rep a b -> "a b" or "b a", alternating who goes first
    if (( $1 % 2 == 0 )); then echo "$2 $3"; else echo "$3 $2"; fi
}

stream_args() { # system
    if [[ $1 == module* ]]; then
        echo "--system module --port ${PORTS[$1]} --path /events"
    else
        echo "--system nchan --port ${PORTS[nchan]} --sub-path /sub/%s"
    fi
}

pub_args() { # system
    # The same publisher shape for both: PUB_CONNS connections, PIPELINE requests in flight each.
    if [[ $1 == module* ]]; then
        echo "--publish pg --pub-conns $PUB_CONNS --pipeline $PIPELINE"
    else
        echo "--publish http --pub-path /pub/%s --pub-conns $PUB_CONNS --pipeline $PIPELINE"
    fi
}

# --- the measurements -----------------------------------------------------------------------
# (a) memory per idle stream: fresh nginx, 10,000 streams opened, idle, worker RSS delta / streams.
# Run with stock nginx settings, then (variant "pool1k") with `request_pool_size 1k;` in both.
test_a_variant() { # variant extra-directives
    local variant=$1 rep sys saved=$NGINX_EXTRA
    NGINX_EXTRA="$saved $2"
    for rep in $(seq 1 "$REPS"); do
        for sys in $(order_for_rep "$rep" module nchan); do
            restart_nginx "$sys"
            log "(a) memory [$variant]: $sys, $MEM_STREAMS idle streams, rep $rep"
            run_client "\"test\":\"a\",\"variant\":\"$variant\",\"rep\":$rep,\"n\":$MEM_STREAMS" \
                stream $(stream_args "$sys") --conns "$MEM_STREAMS" --consumer "mem%d" --consumers 100 \
                --pids "${WPIDS[$sys]}" --hold-ms "$HOLD_MS" --memory
        done
        # nginx's own cost of an idle request, for reference: module nginx, /hold location.
        restart_nginx module
        log "(a) memory [$variant]: nginx baseline (idle requests waiting for a body), rep $rep"
        run_client "\"test\":\"a\",\"variant\":\"$variant\",\"rep\":$rep,\"n\":$MEM_STREAMS" \
            stream --system hold --port "${PORTS[module]}" --path /hold --conns "$MEM_STREAMS" \
            --pids "${WPIDS[module]}" --hold-ms "$HOLD_MS" --memory
    done
    NGINX_EXTRA=$saved
    restart_nginx module
    restart_nginx nchan
}

test_a() {
    test_a_variant default ""
    test_a_variant pool1k "request_pool_size 1k;"
}

# (b) one event to N streams of one consumer / channel: deliveries/s and worker CPU per delivery.
test_b() {
    local rep sys n window
    for n in $FANOUT_SIZES; do
        window=$(( 20000 / n )); (( window < 4 )) && window=4; (( window > 64 )) && window=64
        for rep in $(seq 1 "$REPS"); do
            for sys in $(order_for_rep "$rep" module nchan); do
                log "(b) fan-out: $sys, $n streams, rep $rep"
                run_client "\"test\":\"b\",\"rep\":$rep,\"n\":$n" stream $(stream_args "$sys") $(pub_args "$sys") \
                    --pg-conninfo "$CONNINFO" --conns "$n" --consumer "fan$n" \
                    --pids "${WPIDS[$sys]}" --duration-ms "$PUB_MS" --window "$window" \
                    --payload-bytes "$PAYLOAD_BYTES" --drain-ms 15000
            done
        done
    done
}

# (c) commit-to-receipt latency at a fixed rate (open loop): 1,000 streams of the module vs one raw
# LISTEN connection (the PostgreSQL floor); also the module with a single stream (its own added
# latency, without fan-out) and nchan's 1,000 subscribers fed by POST, for context.
test_c() {
    local rep sys n
    for rep in $(seq 1 "$REPS"); do
        for sys in $(order_for_rep "$rep" module pg_listen) module1 nchan; do
            log "(c) latency: $sys at $RATE events/s, rep $rep"
            case $sys in
            module|nchan|module1)
                n=$LAT_STREAMS; [[ $sys == module1 ]] && n=1
                run_client "\"test\":\"c\",\"rep\":$rep,\"n\":$n,\"rate\":$RATE" stream $(stream_args "${sys%1}") \
                    $(pub_args "${sys%1}") --pub-conns 1 --pg-conninfo "$CONNINFO" --conns "$n" \
                    --consumer lat --pids "${WPIDS[${sys%1}]}" --duration-ms "$LAT_MS" --rate "$RATE" \
                    --payload-bytes "$PAYLOAD_BYTES" --drain-ms 10000 ;;
            pg_listen)
                run_client "\"test\":\"c\",\"rep\":$rep,\"n\":1,\"rate\":$RATE" listen \
                    --publish pg --pg-conninfo "$CONNINFO" --consumer lat \
                    --duration-ms "$LAT_MS" --rate "$RATE" --payload-bytes "$PAYLOAD_BYTES" --drain-ms 10000 ;;
            esac
        done
    done
}

# (d) sustained events/s to one stream, publisher as fast as PostgreSQL commits.
test_d() {
    local rep sys
    for rep in $(seq 1 "$REPS"); do
        for sys in $(order_for_rep "$rep" module pg_listen); do
            log "(d) sustained: $sys, rep $rep"
            if [[ $sys == module ]]; then
                run_client "\"test\":\"d\",\"rep\":$rep,\"n\":1" stream $(stream_args module) \
                    --publish pg --pg-conninfo "$CONNINFO" --conns 1 --consumer sustained \
                    --pids "${WPIDS[module]}" --duration-ms "$PUB_MS" --window 2000 --pub-conns "$PUB_CONNS" --pipeline "$PIPELINE" \
                    --payload-bytes "$PAYLOAD_BYTES" --drain-ms 15000
            else
                run_client "\"test\":\"d\",\"rep\":$rep,\"n\":1" listen \
                    --publish pg --pg-conninfo "$CONNINFO" --consumer sustained \
                    --duration-ms "$PUB_MS" --window 2000 --pub-conns "$PUB_CONNS" --pipeline "$PIPELINE" \
                    --payload-bytes "$PAYLOAD_BYTES" --drain-ms 15000
            fi
        done
    done
}

# (e) replay of REPLAY_ROWS stored events to one client from Last-Event-ID 0.
REPLAY_LOADED=0
load_replay_rows() {
    (( REPLAY_LOADED )) && return 0
    log "(e) storing $REPLAY_ROWS events for consumer 'replay' (trigger bypassed, positions 1..$REPLAY_ROWS)"
    local have
    have=$(psql_su -At -c "select count(*) from events")
    (( have == 0 )) || die "the events table is not empty before loading the replay rows"
    # (h) also reads the same number of rows spread over ten ids rmx0..rmx9, after those.
    psql_su >/dev/null <<EOF
SET session_replication_role = replica;  -- no commit trigger: positions are set here, no NOTIFY
INSERT INTO events (type, timestamp, subscriber, payload)
SELECT 'bench', now(), 'replay', jsonb_build_object('t', 0, 's', g, 'p', repeat('x', 64))
  FROM generate_series(1, $REPLAY_ROWS) g;
INSERT INTO events (type, timestamp, subscriber, payload)
SELECT 'bench', now(), 'rmx' || (g % 10), jsonb_build_object('t', 0, 's', g, 'p', repeat('x', 64))
  FROM generate_series(1, $REPLAY_ROWS) g;
INSERT INTO event_positions (position, event_id, subscriber)
SELECT row_number() OVER (ORDER BY id), id, subscriber FROM events;
SELECT setval('events_position_seq', 2 * $REPLAY_ROWS);
RESET session_replication_role;
VACUUM ANALYZE events;
VACUUM ANALYZE event_positions;
EOF
    REPLAY_LOADED=1
}

test_e() {
    local rep
    for rep in $(seq 1 "$REPS"); do
        log "(e) replay: $REPLAY_ROWS rows, rep $rep"
        run_client "\"test\":\"e\",\"rep\":$rep,\"n\":$REPLAY_ROWS" stream $(stream_args module) \
            --conns 1 --consumer replay --last-event-id 0 --pids "${WPIDS[module]}" \
            --expect-events "$REPLAY_ROWS" --run-ms 120000 --no-latency
    done
}

# (f) filtered fan-out: 10,000 streams of 10,000 consumers, each event matches one stream.
test_f() {
    local rep sys
    for rep in $(seq 1 "$REPS"); do
        for sys in $(order_for_rep "$rep" module nchan); do
            log "(f) filtered: $sys, $FILTER_STREAMS consumers, rep $rep"
            run_client "\"test\":\"f\",\"rep\":$rep,\"n\":$FILTER_STREAMS" stream $(stream_args "$sys") $(pub_args "$sys") \
                --pg-conninfo "$CONNINFO" --conns "$FILTER_STREAMS" --consumer "flt%d" \
                --consumers "$FILTER_STREAMS" --pub-consumers "$FILTER_STREAMS" \
                --pids "${WPIDS[$sys]}" --duration-ms "$PUB_MS" --window 64 \
                --payload-bytes "$PAYLOAD_BYTES" --drain-ms 15000
        done
    done
}

# (g) fan-out with several ids per stream (issue 13): N streams, each of the ten ids mx0..mx9,
# events spread over the ten ids, against N single-id streams; every event reaches every stream.
MX_IDS="mx1,mx2,mx3,mx4,mx5,mx6,mx7,mx8,mx9"
test_g() {
    local rep n variant
    for n in 100 1000; do
        for rep in $(seq 1 "$REPS"); do
            for variant in $(order_for_rep "$rep" ids1 ids10); do
                log "(g) fan-out, $variant: $n streams, rep $rep"
                if [[ $variant == ids1 ]]; then
                    run_client "\"test\":\"g\",\"variant\":\"ids1\",\"rep\":$rep,\"n\":$n" \
                        stream $(stream_args module) $(pub_args module) --pg-conninfo "$CONNINFO" \
                        --conns "$n" --consumer mxs --pub-consumer mxs --pids "${WPIDS[module]}" \
                        --duration-ms "$PUB_MS" --window 16 --payload-bytes "$PAYLOAD_BYTES" --drain-ms 15000
                else
                    run_client "\"test\":\"g\",\"variant\":\"ids10\",\"rep\":$rep,\"n\":$n" \
                        stream $(stream_args module) $(pub_args module) --pg-conninfo "$CONNINFO" \
                        --conns "$n" --consumer mx0 --groups "$MX_IDS" --pub-consumer "mx%d" \
                        --pub-consumers 10 --pids "${WPIDS[module]}" \
                        --duration-ms "$PUB_MS" --window 16 --payload-bytes "$PAYLOAD_BYTES" --drain-ms 15000
                fi
            done
        done
    done
}

# (h) replay of REPLAY_ROWS rows to one stream of ten ids (rmx0..rmx9) against one stream of one
# id ('replay'), the same number of rows.
test_h() {
    local rep variant
    for rep in $(seq 1 "$REPS"); do
        for variant in $(order_for_rep "$rep" ids1 ids10); do
            log "(h) replay, $variant: $REPLAY_ROWS rows, rep $rep"
            if [[ $variant == ids1 ]]; then
                run_client "\"test\":\"h\",\"variant\":\"ids1\",\"rep\":$rep,\"n\":$REPLAY_ROWS" \
                    stream $(stream_args module) --conns 1 --consumer replay --last-event-id 0 \
                    --pids "${WPIDS[module]}" --expect-events "$REPLAY_ROWS" --run-ms 120000 --no-latency
            else
                run_client "\"test\":\"h\",\"variant\":\"ids10\",\"rep\":$rep,\"n\":$REPLAY_ROWS" \
                    stream $(stream_args module) --conns 1 --consumer rmx0 \
                    --groups "rmx1,rmx2,rmx3,rmx4,rmx5,rmx6,rmx7,rmx8,rmx9" \
                    --last-event-id "$REPLAY_ROWS" --pids "${WPIDS[module]}" \
                    --expect-events "$REPLAY_ROWS" --run-ms 120000 --no-latency
            fi
        done
    done
}

# (i) issue 12: the shared listener against one listener per worker, in the same run.
#   f: worker CPU per event summed over the workers, 10,000 streams of 10,000 consumers;
#   c: commit-to-receipt latency at 1 stream;
#   writers: commits/s of 8 single-row writers (pgbench) while 16 or 64 idle sessions LISTEN on
#   new_events, standing in for a fleet of 16 instances x 4 workers (shared: 16, per_worker:
#   64); no nginx runs meanwhile; fsync and synchronous_commit on for that part.
test_i() {
    local rep sys other variant n i tps
    stop_nginx module
    for rep in $(seq 1 "$REPS"); do
        for sys in $(order_for_rep "$rep" module module_pw); do
            other=module_pw; [[ $sys == module_pw ]] && other=module
            variant=shared; [[ $sys == module_pw ]] && variant=per_worker
            stop_nginx "$other"
            restart_nginx "$sys"
            log "(i) $variant: filtered, $FILTER_STREAMS consumers, rep $rep"
            run_client "\"test\":\"i\",\"part\":\"f\",\"variant\":\"$variant\",\"rep\":$rep,\"n\":$FILTER_STREAMS" \
                stream $(stream_args "$sys") $(pub_args "$sys") \
                --pg-conninfo "$CONNINFO" --conns "$FILTER_STREAMS" --consumer "gflt%d" \
                --consumers "$FILTER_STREAMS" --pub-consumers "$FILTER_STREAMS" \
                --pids "${WPIDS[$sys]}" --duration-ms "$PUB_MS" --window 64 \
                --payload-bytes "$PAYLOAD_BYTES" --drain-ms 15000
            restart_nginx "$sys"
            log "(i) $variant: latency at 1 stream, $RATE events/s, rep $rep"
            run_client "\"test\":\"i\",\"part\":\"c\",\"variant\":\"$variant\",\"rep\":$rep,\"n\":1,\"rate\":$RATE" \
                stream $(stream_args "$sys") $(pub_args "$sys") --pub-conns 1 \
                --pg-conninfo "$CONNINFO" --conns 1 --consumer glat --pids "${WPIDS[$sys]}" \
                --duration-ms "$LAT_MS" --rate "$RATE" --payload-bytes "$PAYLOAD_BYTES" \
                --drain-ms 10000
        done
    done
    stop_nginx module
    stop_nginx module_pw
    psql_su -c "ALTER SYSTEM SET fsync = on" -c "ALTER SYSTEM SET synchronous_commit = on" \
        -c "SELECT pg_reload_conf()" >/dev/null
    echo "insert into events (type, timestamp, subscriber, payload) values ('w', now(), 'writer' || :client_id, '{\"n\": 1}');" >"$TMP/writer.sql"
    for rep in $(seq 1 "$REPS"); do
        for n in $(order_for_rep "$rep" 16 64); do
            variant=shared; (( n == 64 )) && variant=per_worker
            /usr/bin/python3 "$BENCH/idle_listeners.py" "$CONNINFO" "$n" &
            IDLE_PID=$!
            for i in $(seq 1 200); do
                (( $(psql_su -At -c "select count(*) from pg_stat_activity where application_name = 'bench_idle_listener' and state = 'idle' and query like 'LISTEN%'") >= n )) && break
                sleep 0.05
            done
            log "(i) writers: 8 single-row writers, $n idle listeners ($variant), rep $rep"
            tps=$(PGPASSWORD=event_piper pgbench -n -h 127.0.0.1 -p "$PGPORT" -U event_piper \
                -c 8 -j 2 -T $(( PUB_MS * 2 / 1000 )) -f "$TMP/writer.sql" event_piper 2>&1 \
                | awk '/^tps = / {print $3; exit}')
            kill -TERM "$IDLE_PID" 2>/dev/null || true
            wait "$IDLE_PID" 2>/dev/null || true
            IDLE_PID=""
            log "    commits/s $tps"
            echo "{\"test\":\"i\",\"part\":\"writers\",\"variant\":\"$variant\",\"rep\":$rep,\"listeners\":$n,\"commits_per_s\":${tps:-0}}" >>"$JSONL"
        done
    done
    psql_su -c "ALTER SYSTEM RESET fsync" -c "ALTER SYSTEM RESET synchronous_commit" \
        -c "SELECT pg_reload_conf()" >/dev/null
    start_nginx module
}

# (j) issue 20: latency at 1 stream, 50 events/s for 60 s, on a table of STALL_ROWS events with
# one row that never got a position. With the default event_piper_listener_timeout (60s) the
# listener checks every 20 s, so each repetition spans at least two checks; nginx is restarted
# before each, so its first check starts from nothing. The rows are added after whatever the
# table holds (positions continue); the row without a position is 5,000 ids below the newest,
# within the newest 100,000 ids that the listener's first check reads. unpositioned_rows from /status is recorded after each run.
STALL_LOADED=0
load_stall_rows() {
    (( STALL_LOADED )) && return 0
    log "(j) storing $STALL_ROWS events (trigger bypassed), one of them without a position"
    psql_su >/dev/null <<EOF
SET session_replication_role = replica;  -- no commit trigger: positions are set here, no NOTIFY
CREATE TEMP TABLE stall_from AS
SELECT (SELECT coalesce(max(id), 0) FROM events) AS id,
       (SELECT coalesce(max(position), 0) FROM event_positions) AS position;
INSERT INTO events (type, timestamp, subscriber, payload)
SELECT 'bench', now(), 'stall' || (g % 1000), jsonb_build_object('t', 0, 's', g, 'p', repeat('x', 64))
  FROM generate_series(1, $STALL_ROWS) g;
INSERT INTO event_positions (position, event_id, subscriber)
SELECT f.position + row_number() OVER (ORDER BY e.id), e.id, e.subscriber
  FROM events e, stall_from f
 WHERE e.id > f.id AND e.id <> (SELECT max(id) - 5000 FROM events);
SELECT setval('events_position_seq', (SELECT max(position) FROM event_positions));
RESET session_replication_role;
VACUUM ANALYZE events;
VACUUM ANALYZE event_positions;
EOF
    STALL_LOADED=1
}

test_j() {
    local rep unpositioned
    load_stall_rows
    for rep in $(seq 1 "$REPS"); do
        restart_nginx module
        log "(j) latency on $STALL_ROWS events: 1 stream, $RATE events/s for $(( STALL_MS / 1000 )) s, rep $rep"
        run_client "\"test\":\"j\",\"rep\":$rep,\"n\":1,\"rate\":$RATE,\"rows\":$STALL_ROWS" \
            stream $(stream_args module) $(pub_args module) --pub-conns 1 --pg-conninfo "$CONNINFO" \
            --conns 1 --consumer stall_live --pids "${WPIDS[module]}" --duration-ms "$STALL_MS" \
            --rate "$RATE" --payload-bytes "$PAYLOAD_BYTES" --drain-ms 10000
        unpositioned=$(python3 -c 'import json, sys, urllib.request
print(json.load(urllib.request.urlopen("http://127.0.0.1:%s/status" % sys.argv[1], timeout=5)).get("unpositioned_rows", -1))' "${PORTS[module]}" 2>/dev/null || echo -1)
        log "    unpositioned_rows $unpositioned"
        echo "{\"test\":\"j\",\"part\":\"status\",\"rep\":$rep,\"unpositioned_rows\":$unpositioned}" >>"$JSONL"
    done
}

# --- run ------------------------------------------------------------------------------------
STARTED=$(date +%s)
log "temp folder $TMP; workers $WORKERS; reps $REPS; tests: $TESTS"
# The replay rows go in first, at positions 1..N, before anything else is published.
if [[ " $TESTS " == *" e "* || " $TESTS " == *" h "* ]]; then load_replay_rows; fi
start_nginx module
start_nginx nchan
for t in $TESTS; do
    case $t in
        a) test_a ;;
        b) test_b ;;
        c) test_c ;;
        d) test_d ;;
        e) test_e ;;
        f) test_f ;;
        g) test_g ;;
        h) test_h ;;
        i) test_i ;;
        j) test_j ;;
        *) die "unknown test $t" ;;
    esac
done
ELAPSED=$(( $(date +%s) - STARTED ))

for sys in module module_pw nchan; do
    [[ -f $TMP/nginx-$sys/logs/error.log ]] || continue
    if grep -E '\[(alert|emerg)\]' "$TMP/nginx-$sys/logs/error.log" >&2; then
        log "warning: nginx ($sys) logged alerts (above)"
    fi
done

# --- report ---------------------------------------------------------------------------------
cat >"$TMP/meta.json" <<EOF
{
  "command": $(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$COMMAND"),
  "quick": $QUICK,
  "reps": $REPS,
  "workers": $WORKERS,
  "rate": $RATE,
  "replay_rows": $REPLAY_ROWS,
  "stall_rows": $STALL_ROWS,
  "stall_ms": $STALL_MS,
  "pub_ms": $PUB_MS,
  "lat_ms": $LAT_MS,
  "hold_ms": $HOLD_MS,
  "payload_bytes": $PAYLOAD_BYTES,
  "pub_conns": $PUB_CONNS,
  "pipeline": $PIPELINE,
  "nofile": $NOFILE,
  "elapsed_s": $ELAPSED,
  "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "nproc": $(nproc),
  "cpu": $(python3 -c 'import json; print(json.dumps(next((l.split(":",1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")))'),
  "mem_kb": $(awk '/MemTotal/ {print $2}' /proc/meminfo),
  "kernel": "$(uname -r)",
  "nginx": "$("$NGINX" -v 2>&1 | sed 's/.*nginx\///')",
  "postgresql": "$(/usr/lib/postgresql/15/bin/postgres --version | awk '{print $3}')",
  "nchan": "$(dpkg-query -W -f '${Version}' libnginx-mod-nchan 2>/dev/null || echo '?')",
  "module_sha": "$MODULE_SHA",
  "git": "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- . ':!bench' 2>/dev/null || echo '+dirty')"
}
EOF
mkdir -p "$OUT"
cp "$JSONL" "$OUT/results.jsonl"
cp "$TMP/meta.json" "$OUT/results-meta.json"
python3 "$BENCH/report.py" "$OUT/results-meta.json" "$OUT/results.jsonl" "$OUT"
log "done in ${ELAPSED}s: $OUT/results.md"

# The writer section (its own PostgreSQL with fsync on; nginx is not involved).
if [[ $QUICK == 0 && ${BENCH_WRITERS:-1} == 1 ]]; then
    BENCH_COMMAND="$COMMAND" "$BENCH/writers.sh"
fi

# The patching section (bench/patching.py: folded replay of N events with K patches each against
# their full history; its own PostgreSQL and nginx). Quick: 10,000 events, once.
if [[ ${BENCH_PATCHING:-1} == 1 ]]; then
    if [[ $QUICK == 1 ]]; then
        BENCH_PATCH_EVENTS=${BENCH_PATCH_EVENTS:-10000} BENCH_REPS=1 BENCH_OUT="$OUT" \
            python3 "$BENCH/patching.py"
    else
        BENCH_OUT="$OUT" python3 "$BENCH/patching.py"
    fi
fi

# The standby section (bench/standby.py: C clients resuming N events each at once with a hot
# standby named by event_piper_replay_postgres: the primary's share of the replayed rows; its
# own primary, standby and nginx). Quick: 10 clients x 10,000 events.
if [[ ${BENCH_STANDBY:-1} == 1 ]]; then
    if [[ $QUICK == 1 ]]; then
        BENCH_STANDBY_CLIENTS=${BENCH_STANDBY_CLIENTS:-10} \
            BENCH_STANDBY_EVENTS=${BENCH_STANDBY_EVENTS:-10000} BENCH_OUT="$OUT" \
            python3 "$BENCH/standby.py"
    else
        BENCH_OUT="$OUT" python3 "$BENCH/standby.py"
    fi
fi
