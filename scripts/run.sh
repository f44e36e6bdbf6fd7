#!/usr/bin/env bash
# Local servers for trying the module by hand (make run / make psql / make stop).
#   scripts/run.sh start   private PostgreSQL cluster + nginx with build/ngx_event_piper_module.so,
#                          nginx in the foreground logging to the terminal; Ctrl-C or SIGTERM
#                          stops both
#   scripts/run.sh psql    psql as event_piper on that cluster (reads stdin when piped)
#   scripts/run.sh stop    stops what `start` left running
#   scripts/run.sh conf    only writes the run folder's nginx.conf and prints its path (the page
#                          test, tests/integration/test_watch_page.py, runs nginx with it)
# Environment: PORT (HTTP, default 4000), PGPORT (PostgreSQL, default 5433), EVENT_PIPER_RUN_DIR
# (the run folder, default below), SOURCE (trigger or wal, default trigger: where positions come
# from, README "Positions from the write-ahead log"; wal starts PostgreSQL with wal_level = logical
# and switches the database, trigger switches it back).
# Everything lives in the run folder: .run/ in the repo when the `postgres` user can reach it,
# else /tmp/event_piper-run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PORT=${PORT:-4000}
SOURCE=${SOURCE:-trigger}
PGCTL=${PGCTL:-$ROOT/scripts/pgctl.sh}
NGINX=${NGINX:-/usr/sbin/nginx}
MODULE=$ROOT/build/ngx_event_piper_module.so
EXAMPLE=$ROOT/nginx.conf.example
WWW=$ROOT/www

die() { echo "run: $*" >&2; exit 1; }
say() { echo "run: $*" >&2; }

# initdb runs as `postgres`, which must be able to reach the cluster folder.
pick_run_dir() {
    if [[ -n ${EVENT_PIPER_RUN_DIR:-} ]]; then
        RUN=$EVENT_PIPER_RUN_DIR
    elif runuser -u postgres -- test -x "$ROOT" -a -r "$ROOT" 2>/dev/null; then
        RUN=$ROOT/.run
    else
        RUN=/tmp/event_piper-run
    fi
}

# The PostgreSQL port: PGPORT, else the one the last `start` used, else 5433.
pick_pg_port() {
    if [[ -n ${PGPORT:-} ]]; then
        PG_PORT=$PGPORT
    elif [[ -f $RUN/pgport ]]; then
        PG_PORT=$(<"$RUN/pgport")
    else
        PG_PORT=5433
    fi
    [[ $PG_PORT =~ ^[0-9]+$ ]] || die "bad PostgreSQL port '$PG_PORT'"
}

port_busy() { [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]]; }

nginx_pid() {
    local pid
    [[ -f $RUN/nginx.pid ]] || return 1
    pid=$(<"$RUN/nginx.pid")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# Graceful stop (streams end with a retry hint), then fast stop if it takes too long.
stop_nginx() {
    local pid=$1 i
    kill -QUIT "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    say "nginx did not quit within 10 s, terminating it"
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

pg_running() {
    local pid
    [[ -f $RUN/pgdata/postmaster.pid ]] || return 1
    pid=$(head -n1 "$RUN/pgdata/postmaster.pid")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

require_pgctl() {
    [[ -x $PGCTL ]] || die "$PGCTL is missing (written by the test helper)"
}

# nginx.conf for this run: nginx.conf.example with the built module, our ports, the page at /
# from the project's www/, and every path (pid, logs, temp files) inside the run folder; errors
# go to the terminal.
write_nginx_conf() {
    local conf=$RUN/nginx.conf tmp=$RUN/nginx.conf.tmp
    [[ -f $EXAMPLE ]] || die "$EXAMPLE is missing"
    mkdir -p "$RUN/tmp"
    sed -E \
        -e "s#^([[:space:]]*load_module[[:space:]]+)[^;]*ngx_event_piper_module\.so;#\1$MODULE;#" \
        -e "s#^([[:space:]]*pid[[:space:]]+)[^;]*;#\1$RUN/nginx.pid;#" \
        -e "s#^([[:space:]]*error_log[[:space:]]+)[^;]*;#\1stderr info;#" \
        -e "s#^([[:space:]]*access_log[[:space:]]+)[^;]*;#\1$RUN/access.log;#" \
        -e "s#^([[:space:]]*listen[[:space:]]+)([0-9.]+:)?4000([[:space:];])#\1127.0.0.1:$PORT\3#" \
        -e "/^[[:space:]]*event_piper_postgres[[:space:]]/s#port=[0-9]+#port=$PG_PORT#" \
        -e "s#^([[:space:]]*root[[:space:]]+)/usr/share/libnginx-mod-http-event-piper/www;#\1$WWW;#" \
        -e "s#^([[:space:]]*)http[[:space:]]*\{#&\n\1    event_piper_source $SOURCE;\n\1    client_body_temp_path $RUN/tmp/body;\n\1    proxy_temp_path $RUN/tmp/proxy;\n\1    fastcgi_temp_path $RUN/tmp/fastcgi;\n\1    uwsgi_temp_path $RUN/tmp/uwsgi;\n\1    scgi_temp_path $RUN/tmp/scgi;#" \
        "$EXAMPLE" >"$tmp"
    # Fail loudly if the example changed shape and a substitution silently did nothing.
    local expect
    for expect in "load_module $MODULE;" "pid $RUN/nginx.pid;" "error_log stderr info;" \
        "listen 127.0.0.1:$PORT" "port=$PG_PORT" "client_body_temp_path $RUN/tmp/body;" \
        "root $WWW;" "event_piper_source $SOURCE;"; do
        grep -qF -- "$expect" "$tmp" || die "could not set '$expect' in $conf (check $EXAMPLE)"
    done
    mv -f "$tmp" "$conf"
}

cmd_start() {
    [[ -f $MODULE ]] || die "$MODULE is missing: run make build"
    [[ $SOURCE == trigger || $SOURCE == wal ]] || die "SOURCE is trigger or wal, not '$SOURCE'"
    require_pgctl
    mkdir -p "$RUN"
    chmod 755 "$RUN"
    say "run folder: $RUN"

    # A run still in progress (another terminal, maybe another user) is not ours to stop: one
    # run folder, one run. run.pid is created atomically (noclobber); a stale one is replaced.
    local pid
    if ! (set -C; echo "$$" >"$RUN/run.pid") 2>/dev/null; then
        pid=$(cat "$RUN/run.pid" 2>/dev/null || true)
        if [[ $pid =~ ^[0-9]+$ && -d /proc/$pid ]] \
            && grep -qa 'run\.sh' "/proc/$pid/cmdline" 2>/dev/null; then
            die "another make run is in progress (pid $pid, run folder $RUN); stop it first (Ctrl-C there, or make stop)"
        fi
        rm -f "$RUN/run.pid"
        (set -C; echo "$$" >"$RUN/run.pid") 2>/dev/null \
            || die "another make run is starting in $RUN; stop it first"
    fi
    trap 'release_run' EXIT
    # Leftovers of a previous run that was killed without cleaning up are ours: stop them.
    if pid=$(nginx_pid); then
        say "stopping nginx left by a previous run (pid $pid)"
        stop_nginx "$pid"
    fi
    if pg_running; then
        say "stopping PostgreSQL left by a previous run"
        "$PGCTL" stop "$RUN/pgdata"
    fi

    port_busy "$PG_PORT" && die "PostgreSQL port $PG_PORT is in use; choose another with PGPORT=..."
    port_busy "$PORT" && die "HTTP port $PORT is in use; choose another with PORT=..."

    write_nginx_conf

    NGINX_PID=
    # A requested stop (Ctrl-C, SIGTERM, hangup) is a success once both servers are down.
    trap 'shutdown 0' INT TERM HUP

    # wal_level = logical while the database is in wal mode, and for the run that switches it
    # back (PostgreSQL refuses to start below logical while a logical slot exists).
    local logical=0
    [[ $SOURCE == wal || $(cat "$RUN/source" 2>/dev/null) == wal ]] && logical=1
    say "starting PostgreSQL on 127.0.0.1:$PG_PORT (data: $RUN/pgdata, source $SOURCE)"
    if ! EVENT_PIPER_PG_LOGICAL=$logical "$PGCTL" start "$RUN/pgdata" "$PG_PORT"; then
        "$PGCTL" stop "$RUN/pgdata" || true
        die "PostgreSQL did not start (see the messages above)"
    fi
    echo "$PG_PORT" >"$RUN/pgport"
    if ! switch_source; then
        "$PGCTL" stop "$RUN/pgdata" || true
        die "could not switch the database to event_piper_source $SOURCE"
    fi

    say "starting nginx on http://127.0.0.1:$PORT (config: $RUN/nginx.conf); Ctrl-C stops"
    "$NGINX" -p "$RUN" -c "$RUN/nginx.conf" -g 'daemon off;' &
    NGINX_PID=$!
    local status=0
    wait "$NGINX_PID" || status=$?
    # nginx ended by itself (bad config, crash, make stop): take PostgreSQL down with it.
    NGINX_PID=
    say "nginx exited (status $status)"
    shutdown "$status"
}

# The database to SOURCE (postgresql/wal.sql's event_piper_set_source; pgctl.sh applied wal.sql
# and gave the role REPLICATION when it started the cluster with wal_level = logical).
switch_source() {
    if [[ $SOURCE == wal ]]; then
        "$PGCTL" psql "$RUN/pgdata" "$PG_PORT" -X -q -v ON_ERROR_STOP=1 \
            -c "SELECT event_piper_set_source('wal')" >/dev/null || return 1
    elif [[ -f $RUN/source && $(<"$RUN/source") == wal ]]; then
        # No positioner runs yet (nginx starts after): the rows committed since the last one
        # stopped get their positions from the switch at once.
        "$PGCTL" psql "$RUN/pgdata" "$PG_PORT" -X -q -v ON_ERROR_STOP=1 \
            -c "SELECT event_piper_set_source('trigger', 0)" >/dev/null || return 1
    fi
    echo "$SOURCE" >"$RUN/source"
}

# The run's marker goes when this run ends, however it ends (not another run's).
release_run() {
    [[ -f $RUN/run.pid && $(<"$RUN/run.pid") == "$$" ]] && rm -f "$RUN/run.pid"
    return 0
}

shutdown() {
    trap '' INT TERM HUP
    if [[ -n ${NGINX_PID:-} ]]; then
        say "stopping nginx"
        stop_nginx "$NGINX_PID"
        wait "$NGINX_PID" 2>/dev/null || true
    fi
    say "stopping PostgreSQL"
    "$PGCTL" stop "$RUN/pgdata" || true
    exit "$1"
}

cmd_psql() {
    require_pgctl
    [[ -d $RUN/pgdata ]] || die "no cluster in $RUN/pgdata: start it with make run"
    exec "$PGCTL" psql "$RUN/pgdata" "$PG_PORT" "$@"
}

cmd_stop() {
    local pid stopped=0
    if pid=$(nginx_pid); then
        say "stopping nginx (pid $pid)"
        stop_nginx "$pid"
        stopped=1
    fi
    if pg_running; then
        require_pgctl
        say "stopping PostgreSQL ($RUN/pgdata)"
        "$PGCTL" stop "$RUN/pgdata"
        stopped=1
    fi
    [[ $stopped == 1 ]] || say "nothing running in $RUN"
}

pick_run_dir
pick_pg_port
case "${1:-}" in
    start) cmd_start ;;
    psql) shift; cmd_psql "$@" ;;
    stop) cmd_stop ;;
    dir) echo "$RUN" ;;
    conf) mkdir -p "$RUN" && write_nginx_conf && echo "$RUN/nginx.conf" ;;
    *) echo "usage: $0 start|psql|stop|dir|conf" >&2; exit 2 ;;
esac
