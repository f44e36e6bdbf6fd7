#!/usr/bin/env bash
# What retention costs (README "Retention"): event_piper_retain removing RETENTION_EVENTS events
# (default 1,000,000) while pgbench writers insert single-row events, in a PostgreSQL 15 cluster
# of its own with PostgreSQL's durable defaults (fsync, synchronous_commit, full_page_writes on).
#
#   1. load RETENTION_EVENTS + RETENTION_KEEP events (1,000 consumers, the payload of
#      bench/writers.sh) in bulk, and give them positions with postgresql/schema.sql; print the
#      size of events + event_positions with their indexes per million events;
#   2. RETENTION_CLIENTS pgbench writers, one INSERT per transaction, for
#      RETENTION_BASELINE_SECONDS: their commits/s before;
#   3. CALL event_piper_retain(upto => RETENTION_EVENTS, max_events => RETENTION_BATCH) while
#      the same writers go on: how long it takes, events removed per second, the writers'
#      commits/s during it (per-second pgbench progress, median and minimum) and their mean
#      latency (worst second);
#   4. the sizes after, and after a VACUUM (the space is reused, not returned).
#
#   bench/retention.sh   (make bench-retention)
#
# Environment: RETENTION_EVENTS (1000000), RETENTION_KEEP (RETENTION_EVENTS / 10),
# RETENTION_BATCH (1000), RETENTION_CLIENTS (4), RETENTION_BASELINE_SECONDS (10),
# BENCH_OUT (build/bench-retention: the report, retention.md), BENCH_KEEP=1 keeps the cluster.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${BENCH_OUT:-$ROOT/build/bench-retention}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
N=${RETENTION_EVENTS:-1000000}
KEEP=${RETENTION_KEEP:-$((N / 10))}
BATCH=${RETENTION_BATCH:-1000}
CLIENTS=${RETENTION_CLIENTS:-4}
BASELINE=${RETENTION_BASELINE_SECONDS:-10}

log() { printf '[retention %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
[[ -x $PG_BIN/pgbench ]] || die "$PG_BIN/pgbench not found (apt-get install postgresql-15)"

TMP=$(mktemp -d /tmp/epretention.XXXXXX)
chmod 755 "$TMP"
PGDATA_DIR=$TMP/pg
WRITERS=
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [[ -n $WRITERS ]] && kill -TERM "$WRITERS" 2>/dev/null || true
    "$ROOT/scripts/pgctl.sh" stop "$PGDATA_DIR" >/dev/null 2>&1 || true
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

PGPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
EVENT_PIPER_PG_FAST=0 "$ROOT/scripts/pgctl.sh" start "$PGDATA_DIR" "$PGPORT" >/dev/null
psql_db() { psql -X -q -v ON_ERROR_STOP=1 -h "$PGDATA_DIR" -p "$PGPORT" -U postgres -d event_piper "$@"; }
durability=$(psql_db -At -c "select current_setting('fsync') || '/' || current_setting('synchronous_commit') || '/' || current_setting('full_page_writes')")
log "PostgreSQL on port $PGPORT; fsync/synchronous_commit/full_page_writes: $durability"

SIZE_SQL="select pg_total_relation_size('events') + pg_total_relation_size('event_positions')"
log "loading $N + $KEEP events"
t0=$(date +%s.%N)
psql_db <<SQL
SET session_replication_role = replica; -- no trigger: positions below, all at once
INSERT INTO events (type, timestamp, subscriber, payload)
SELECT 'order_paid', now(), 'user-' || (g % 1000),
       jsonb_build_object('order', g, 'status', 'paid', 'amount', 99.5, 'currency', 'EUR')
  FROM generate_series(1, $N + $KEEP) AS g;
SQL
psql_db --single-transaction -c "SET client_min_messages = warning" -f "$ROOT/postgresql/schema.sql" >/dev/null
psql_db -c "VACUUM ANALYZE events, event_positions"
log "loaded in $(python3 -c "import time; print('%.0f s' % (time.time() - $t0))")"
rows=$(psql_db -At -c "select count(*) from event_positions")
(( rows == N + KEEP )) || die "expected $((N + KEEP)) positions, found $rows"
size_before=$(psql_db -At -c "$SIZE_SQL")
detail=$(psql_db -At -F ' ' -c "select pg_relation_size('events'), pg_indexes_size('events'),
    pg_relation_size('event_positions'), pg_indexes_size('event_positions')")

cat >"$TMP/insert.sql" <<'SQL'
\set s random(1, 1000)
insert into events (type, timestamp, subscriber, payload) values ('order_paid', now(), 'user-' || :s, '{"order": 1, "status": "paid", "amount": 99.5, "currency": "EUR"}');
SQL
"$PG_BIN/pgbench" -n -c "$CLIENTS" -j 2 -T 3600 -P 1 --progress-timestamp -f "$TMP/insert.sql" \
    -h "$PGDATA_DIR" -p "$PGPORT" -U event_piper event_piper 2>"$TMP/progress.txt" >/dev/null &
WRITERS=$!
sleep 1 # pgbench connecting
t_base=$(date +%s.%N)
sleep "$BASELINE"
t_start=$(date +%s.%N)
log "retention of positions 1..$N in batches of $BATCH, $CLIENTS writers inserting"
psql_db -c "CALL event_piper_retain(upto => $N, max_events => $BATCH)"
t_end=$(date +%s.%N)
sleep 2
kill -TERM "$WRITERS" 2>/dev/null || true
wait "$WRITERS" 2>/dev/null || true
WRITERS=
left=$(psql_db -At -c "select count(*) from event_positions where position <= $N")
(( left == 0 )) || die "$left positions at or below $N left"
size_after=$(psql_db -At -c "$SIZE_SQL")
psql_db -c "VACUUM events, event_positions"
size_vacuumed=$(psql_db -At -c "$SIZE_SQL")

mkdir -p "$OUT"
python3 - "$TMP/progress.txt" "$t_base" "$t_start" "$t_end" "$N" "$KEEP" "$BATCH" "$CLIENTS" \
    "$size_before" "$size_after" "$size_vacuumed" "$durability" "$detail" <<'PY' | tee "$OUT/retention.md"
import re, statistics, sys
(progress, t_base, t_start, t_end, n, keep, batch, clients, before, after, vacuumed, durability,
 detail) = sys.argv[1:]
t_base, t_start, t_end = float(t_base), float(t_start), float(t_end)
n, keep, before, after, vacuumed = int(n), int(keep), int(before), int(after), int(vacuumed)
base, during = [], []
for line in open(progress):
    m = re.match(r"progress: ([0-9.]+) s, ([0-9.]+) tps, lat ([0-9.]+) ms", line)
    if not m:
        continue
    t, tps, lat = float(m.group(1)), float(m.group(2)), float(m.group(3))
    if t_base + 1 <= t <= t_start:
        base.append((tps, lat))
    elif t_start + 1 <= t <= t_end:
        during.append((tps, lat))
secs = t_end - t_start
mb = lambda b: "%.0f MB" % (b / 1e6)
rel = [int(x) for x in detail.split()]
print("## Retention: removing %d events while %s writers insert" % (n, clients))
print()
print("PostgreSQL 15, fsync/synchronous_commit/full_page_writes %s; %d events kept above the "
      "cut; batches of %s events." % (durability, keep, batch))
print()
print("| | |\n|---|---|")
print("| size of events + event_positions with indexes, per 1,000,000 events | %s (events %s "
      "+ its indexes %s, event_positions %s + its indexes %s, for %d events) |"
      % (mb(before * 1e6 / (n + keep)), mb(rel[0]), mb(rel[1]), mb(rel[2]), mb(rel[3]), n + keep))
print("| `CALL event_piper_retain(upto => %d)` | %.1f s, %.0f events/s |" % (n, secs, n / secs))
def fig(xs):
    if not xs:
        return "no full second"
    tps = [x[0] for x in xs]
    return "median %.0f commits/s (min %.0f, %d s), mean latency up to %.1f ms" % (
        statistics.median(tps), min(tps), len(xs), max(x[1] for x in xs))
print("| writers before | %s |" % fig(base))
print("| writers during | %s |" % fig(during))
if base and during:
    print("| during / before (medians) | %.2f |" % (statistics.median(x[0] for x in during)
                                                / statistics.median(x[0] for x in base)))
print("| size after / after VACUUM | %s / %s (was %s: the space is reused by new rows) |"
      % (mb(after), mb(vacuumed), mb(before)))
PY
log "report in $OUT/retention.md"
