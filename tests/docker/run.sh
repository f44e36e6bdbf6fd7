#!/usr/bin/env bash
# make test-docker: the compose stack of docker/ built and run as a user would, with docker or
# podman (docker/engine.sh picks). tests/docker/compose.override.yaml puts a database image built
# from debian:12 in place of the official postgres:15 (no image registry is reachable here).
#   1. build the images (make docker-build, and the test's database image), start the stack on a
#      free port, wait for the database's health check and for /manage/health to answer UP;
#   2. the original walkthrough: curl -N as `toto`, an insert through psql in the container
#      `postgresql`, the exact frame;
#   3. a replay with Last-Event-ID;
#   4. a database restart: inserts while and after it, the client resumes with Last-Event-ID and
#      gets every event exactly once;
#   5. event_piper_source wal: the database switched in place (compose runs PostgreSQL with
#      wal_level = logical), nginx reloaded with the directive set by its entry point
#      (docker/nginx-entrypoint.sh); a client resuming with its last id gets the next event once,
#      through the positioner. EVENT_PIPER_SOURCE=wal make test-docker starts the stack in wal
#      mode instead (the database switched when its volume is created), steps 2-4 included;
#   6. nginx logged no [alert] or [emerg].
# Everything it starts (containers, pod, network, volume) is removed at the end, also on failure;
# the images stay, so a rerun builds nothing. Ends with "docker test: passed" or exits non-zero.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
# shellcheck source=docker/engine.sh
source docker/engine.sh

PROJECT=event_piper_test
DB_CONTAINER=postgresql # container_name in docker/compose.yaml
DB_IMAGE=localhost/event_piper_test_postgres:15
COMPOSE_FILES=(-f docker/compose.yaml -f tests/docker/compose.override.yaml)
compose() { "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" "$@"; }
engine() { "${ENGINE[@]}" "$@"; }

T0=$SECONDS
TMP=$(mktemp -d /tmp/event_piper_docker_test.XXXXXX)
CURL_PIDS=()
log() { printf '[docker test %4ds] %s\n' $((SECONDS - T0)) "$*"; }
fail() {
    log "FAILED: $*"
    exit 1
}

# --- teardown (EXIT trap): streams, then the stack, then whatever compose left -----------------
teardown() {
    local rc=$?
    set +e
    for pid in "${CURL_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    if [[ $rc -ne 0 && ${STACK_STARTED:-0} == 1 ]]; then
        for f in "$TMP"/*.body; do
            [[ -e $f ]] && printf -- '--- stream %s: %q\n' "$(basename "$f" .body)" "$(cat "$f")"
        done
        log "logs of the stack (last 40 lines each):"
        for c in $(stack_containers); do
            echo "--- $c"
            engine logs --tail 40 "$c" 2>&1 | cat # podman logs may write after it exits: wait for EOF
        done
    fi
    if [[ ${STACK_STARTED:-0} == 1 ]]; then
        log "tearing down: ${COMPOSE[*]} down -v"
        compose down -v >"$TMP/down.log" 2>&1 || cat "$TMP/down.log"
        # podman-compose 1.0.3 leaves the network (and the pod); both engines label what they made.
        local label=com.docker.compose.project=$PROJECT
        local ids
        mapfile -t ids < <(engine ps -aq --filter "label=$label")
        [[ ${#ids[@]} -gt 0 ]] && engine rm -f "${ids[@]}" >/dev/null
        if [[ ${ENGINE[0]} == podman ]]; then
            mapfile -t ids < <(podman pod ls -q --filter "label=$label" 2>/dev/null)
            [[ ${#ids[@]} -gt 0 ]] && podman pod rm -f "${ids[@]}" >/dev/null
        fi
        mapfile -t ids < <(engine network ls -q --filter "label=$label")
        [[ ${#ids[@]} -gt 0 ]] && engine network rm "${ids[@]}" >/dev/null
        mapfile -t ids < <(engine volume ls -q --filter "label=$label")
        [[ ${#ids[@]} -gt 0 ]] && engine volume rm -f "${ids[@]}" >/dev/null
        local left
        left=$({
            engine ps -aq --filter "label=$label"
            engine network ls -q --filter "label=$label"
            engine volume ls -q --filter "label=$label"
        })
        if [[ -n $left ]]; then
            log "teardown left: $left"
            rc=1
        else
            log "torn down: no container, network or volume of project $PROJECT is left"
        fi
    fi
    rm -rf "$TMP"
    log "images kept for the next run: localhost/ngx_event_piper, $DB_IMAGE, docker.io/library/debian:12"
    if [[ $rc -eq 0 ]]; then log "docker test: passed (${SECONDS}s)"; else log "docker test: FAILED"; fi
    exit $rc
}
trap teardown EXIT
trap 'exit 130' INT TERM

stack_containers() { engine ps -a --format '{{.Names}}' --filter "label=com.docker.compose.project=$PROJECT"; }

# --- helpers ------------------------------------------------------------------------------------
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# psql inside the database container, as in the original walkthrough (docker exec postgresql).
psql_in_db() { engine exec -i "$DB_CONTAINER" psql -X -q -v ON_ERROR_STOP=1 -d event_piper -U event_piper "$@"; }

# Inserts the event {"n": N} for toto unless it is there already: an insert retried after a lost
# reply (the server stopped between commit and answer) must not make a second event.
insert_n() {
    psql_in_db -v n="$1" <<'SQL'
INSERT INTO events (type, timestamp, subscriber, payload)
SELECT 'numbered', now(), 'toto', jsonb_build_object('n', :n)
WHERE NOT EXISTS (SELECT 1 FROM events WHERE payload = jsonb_build_object('n', :n));
SQL
}

# open_stream NAME [LAST_EVENT_ID]: curl -N as toto in the background, body to $TMP/NAME.body;
# returns once the response headers are in (the stream is registered in nginx from then on).
open_stream() {
    local name=$1 args=(-N -sS -H 'X-Consumer-Id: toto' -D "$TMP/$1.headers")
    [[ -n ${2:-} ]] && args+=(-H "Last-Event-ID: $2")
    : >"$TMP/$name.headers"
    curl "${args[@]}" "http://127.0.0.1:$PORT/events" >"$TMP/$name.body" 2>"$TMP/$name.err" &
    local pid=$!
    CURL_PIDS+=("$pid")
    eval "PID_$name=$pid"
    for _ in $(seq 100); do
        grep -q '^HTTP/[0-9.]* 200' "$TMP/$name.headers" && grep -q $'^\r$' "$TMP/$name.headers" && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    cat "$TMP/$name.headers" "$TMP/$name.err" >&2
    fail "stream $name did not open"
}
close_stream() {
    local pid_var=PID_$1
    kill "${!pid_var}" 2>/dev/null || true
    wait "${!pid_var}" 2>/dev/null || true
}

# The body of stream NAME without heartbeat frames (the exact bytes otherwise).
body() { python3 - "$TMP/$1.body" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
sys.stdout.buffer.write(data.replace(b"event: heartbeat\ndata: \n\n", b""))
PY
}
# The `id:` of each event frame of stream NAME, one a line.
ids() { body "$1" | sed -n 's/^id: //p'; }

# wait_for_body NAME EXPECTED_BYTES SECONDS: until the body (heartbeats removed) is exactly that.
wait_for_body() {
    local deadline=$((SECONDS + $3))
    while [[ $SECONDS -lt $deadline ]]; do
        [[ $(body "$1"; echo x) == "$2x" ]] && return 0
        sleep 0.2
    done
    printf 'expected: %q\n     got: %q\n' "$2" "$(body "$1")" >&2
    return 1
}
# wait_for_id NAME ID SECONDS: until stream NAME has delivered the event ID (returns 1 if not).
wait_for_id() {
    local deadline=$((SECONDS + $3))
    while [[ $SECONDS -lt $deadline ]]; do
        ids "$1" | grep -qx "$2" && return 0
        sleep 0.2
    done
    return 1
}
frame_n() { printf 'id: %s\nevent: numbered\ndata: {"n":%s}\n\n' "$1" "$2"; }

# --- 1. build and start -------------------------------------------------------------------------
if engine container exists "$DB_CONTAINER" 2>/dev/null ||
    engine ps -a --format '{{.Names}}' | grep -qx "$DB_CONTAINER"; then
    fail "a container named $DB_CONTAINER exists already (another stack of docker/compose.yaml?)"
fi

log "engine: ${ENGINE[*]} (compose: ${COMPOSE[*]})${CONTAINERS_CONF:+, CONTAINERS_CONF=$CONTAINERS_CONF}"
docker/debian-base.sh
log "base image docker.io/library/debian:12 ready"
docker/build.sh
log "built localhost/ngx_event_piper"
docker/build.sh -f tests/docker/postgres.Dockerfile -t "$DB_IMAGE"
log "built $DB_IMAGE"
# The runtime image holds nginx, the module, libpq and libcjson; no compiler or test tool.
engine run --rm --entrypoint bash localhost/ngx_event_piper -c '
    set -e
    installed=$(dpkg-query -W -f="\${Status}\n" nginx libpq5 libcjson1 | grep -c "install ok installed")
    [ "$installed" = 3 ]
    test -s /usr/lib/nginx/modules/ngx_event_piper_module.so
    for tool in cc gcc g++ make chromium node npm psql; do
        command -v "$tool" >/dev/null && { echo "runtime image has $tool" >&2; exit 1; }
    done
    exit 0' || fail "the runtime image is not nginx + module + libpq5 + libcjson1 only"
log "runtime image: nginx, the module, libpq5, libcjson1; no cc, make, chromium, node, psql ($(engine image inspect -f '{{.Size}}' localhost/ngx_event_piper | awk '{printf "%.0f MB", $1/1e6}'))"

PORT=$(free_port)
export EVENT_PIPER_PORT=$PORT
STACK_STARTED=1
compose up -d >"$TMP/up.log" 2>&1 || {
    cat "$TMP/up.log"
    fail "compose up failed"
}
log "stack up, nginx published on 127.0.0.1:$PORT"

# The database's health check (docker runs it by itself; podman without systemd runs it on demand).
deadline=$((SECONDS + 120))
until if [[ ${ENGINE[0]} == podman ]]; then
    podman healthcheck run "$DB_CONTAINER" >/dev/null 2>&1
else
    [[ $(docker inspect -f '{{.State.Health.Status}}' "$DB_CONTAINER") == healthy ]]
fi; do
    [[ $SECONDS -lt $deadline ]] || fail "the database's health check did not pass in 120 s"
    sleep 1
done
log "database healthy (pg_isready over TCP: the schema is applied)"

deadline=$((SECONDS + 120))
until [[ $(curl -sS "http://127.0.0.1:$PORT/manage/health" 2>/dev/null) == '{"status":"UP"}' ]]; do
    [[ $SECONDS -lt $deadline ]] || fail "/manage/health did not answer UP in 120 s"
    sleep 0.5
done
log '/manage/health: {"status":"UP"}'

# --- 2. the walkthrough -------------------------------------------------------------------------
open_stream walk
engine exec "$DB_CONTAINER" psql -d event_piper -U event_piper -c \
    "insert into events (type, timestamp, subscriber, payload) values ('insert', now(), 'toto', '{\"foo\": \"bar\"}');" \
    >/dev/null
FRAME1=$'id: 1\nevent: insert\ndata: {"foo":"bar"}\n\n'
wait_for_body walk "$FRAME1" 15 || fail "walkthrough: the stream did not carry exactly the frame"
close_stream walk
log "walkthrough: curl -N got exactly 'id: 1\\nevent: insert\\ndata: {\"foo\":\"bar\"}\\n\\n'"

# --- 3. replay ----------------------------------------------------------------------------------
open_stream replay 0
wait_for_body replay "$FRAME1" 15 || fail "replay with Last-Event-ID: 0 did not carry event 1"
close_stream replay
log "replay: Last-Event-ID: 0 gets event 1 again"

# --- 4. database restart ------------------------------------------------------------------------
# Stream `kept` is open through the restart; stream `down` opens while the database is stopped.
# Event 3 goes in as soon as the database is back (before nginx's listener has reconnected, which
# waits for its backoff), event 4 once /manage/health is UP again, event 5 at the end. A stream
# that ends meanwhile is resumed with the Last-Event-ID it got, as a client does. Each client
# must get every event after its starting point exactly once, in order.
health() { curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/manage/health" || true; }

open_stream kept 1
insert_n 2
wait_for_id kept 2 15 || fail "event 2 was not delivered live"
started_before=$(engine inspect -f '{{.State.StartedAt}}' "$DB_CONTAINER")
engine stop "$DB_CONTAINER" >"$TMP/stop.log" 2>&1 || { cat "$TMP/stop.log"; fail "stop failed"; }
deadline=$((SECONDS + 30))
until [[ $(health) == 503 ]]; do
    [[ $SECONDS -lt $deadline ]] || fail "/manage/health still answers $(health) with the database stopped"
    sleep 0.2
done
log "database container stopped; /manage/health answers 503"
open_stream down 2
engine start "$DB_CONTAINER" >"$TMP/start.log" 2>&1 || { cat "$TMP/start.log"; fail "start failed"; }
deadline=$((SECONDS + 120))
until insert_n 3 >/dev/null 2>&1; do
    [[ $SECONDS -lt $deadline ]] || fail "event 3 could not be inserted in 120 s"
    sleep 0.2
done
log "database container started again; event 3 inserted (/manage/health: $(health))"
[[ $(engine inspect -f '{{.State.StartedAt}}' "$DB_CONTAINER") != "$started_before" ]] ||
    fail "the database container was not restarted"
deadline=$((SECONDS + 60))
until [[ $(health) == 200 ]]; do
    [[ $SECONDS -lt $deadline ]] || fail "/manage/health not UP again 60 s after the restart"
    sleep 0.2
done
insert_n 4
log "/manage/health UP again; event 4 inserted"

# finish NAME TO: waits for id TO on stream NAME; if it does not come, resumes the way a client
# does, with the last id it got (stream NAME.2), and waits there.
finish() {
    local name=$1 to=$2 last
    wait_for_id "$name" "$to" 20 && return 0
    close_stream "$name"
    last=$(ids "$name" | tail -n 1)
    log "stream $name got ids $(ids "$name" | tr '\n' ' ')then waited in vain for $to: resuming with Last-Event-ID: $last"
    open_stream "$name.2" "$last"
    RESUMED+=("$name")
    wait_for_id "$name.2" "$to" 30 || fail "stream $name resumed from $last did not reach event $to"
}
RESUMED=()
finish kept 4
finish down 4
insert_n 5
for name in kept down; do
    [[ " ${RESUMED[*]:-} " == *" $name "* ]] && name=$name.2
    wait_for_id "$name" 5 15 || fail "event 5 was not delivered live to stream $name"
    close_stream "$name"
done
check_exactly_once() { # NAME FIRST: the stream (and its resumption) carried FIRST..5, once each
    local expected got
    expected=$(for ((n = $2; n <= 5; n++)); do frame_n "$n" "$n"; done; echo x)
    got=$(body "$1"; [[ -e $TMP/$1.2.body ]] && body "$1.2"; echo x)
    [[ $got == "$expected" ]] || {
        printf 'expected: %q\n     got: %q\n' "$expected" "$got" >&2
        fail "stream $1: events were not delivered exactly once each, in order"
    }
    log "stream $1: events $2..5 each exactly once, in order$([[ -e $TMP/$1.2.body ]] && echo ", resumed once")"
}
check_exactly_once kept 2
check_exactly_once down 3

# --- 5. event_piper_source wal -------------------------------------------------------------------
nginx_container=$(engine ps -a --format '{{.Names}}' \
    --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=nginx")
[[ -n $nginx_container ]] || fail "no nginx container found by its compose labels"
status_json() { engine exec "$nginx_container" curl -sS http://127.0.0.1:4000/status; }
if [[ ${EVENT_PIPER_SOURCE:-trigger} != wal ]]; then
    [[ $(psql_in_db -At -c "SELECT event_piper_set_source('wal')") == wal ]] ||
        fail "the database did not switch to wal"
    engine exec -e EVENT_PIPER_SOURCE=wal "$nginx_container" nginx-entrypoint.sh nginx -s reload ||
        fail "nginx-entrypoint.sh with EVENT_PIPER_SOURCE=wal, then nginx -s reload, failed"
    log "database switched with event_piper_set_source('wal'); nginx reloaded with event_piper_source wal"
fi
[[ $(psql_in_db -At -c "SELECT source FROM event_piper_wal_progress") == wal ]] ||
    fail "the database is not in wal mode"
deadline=$((SECONDS + 60))
until status_json | grep -q '"source":"wal"' &&
    [[ $(psql_in_db -At -c "SELECT count(*) FROM pg_replication_slots WHERE active") == 1 ]]; do
    [[ $SECONDS -lt $deadline ]] || fail "no positioner reads the slot 60 s after the switch: $(status_json)"
    sleep 0.5
done
open_stream wal 5
insert_n 6
FRAME6=$(frame_n 6 6; echo x) # the x keeps the frame's final newlines
wait_for_body wal "${FRAME6%x}" 15 || fail "event 6 did not come through the positioner exactly once"
close_stream wal
log "event_piper_source wal: the positioner reads the slot; a client resuming from 5 got event 6 exactly once"

# --- 6. logs ------------------------------------------------------------------------------------
# Through a pipe: podman logs may still be writing when it exits; cat waits for the end.
engine logs "$nginx_container" 2>&1 | cat >"$TMP/nginx.log"
grep -q 'listening for notifications' "$TMP/nginx.log" || fail "nginx's log is not complete"
if grep -E '\[(alert|emerg)\]' "$TMP/nginx.log"; then
    fail "nginx logged [alert] or [emerg]"
fi
log "nginx logged no [alert] or [emerg]"
