"""Never lose an event when things break.

PostgreSQL restarts and listener loss, PostgreSQL down at nginx start, commits out of id order and
rollbacks, payloads of up to 1 MB, nginx reload and quit with open streams, and bad input. The
tests break things for real against a PostgreSQL cluster of their own (stopped, restarted on the
same port, or made to refuse the module's TCP logins) and a real nginx with the module, and assert
the exact bytes on the wire against the table (`select position, type, payload ... order by
position`), which is the truth.

"Made to refuse TCP logins" (tests/chaos/piper_chaos.py `hold_tcp`): pg_hba rejects 127.0.0.1 while
the tests keep inserting over the unix socket. nginx connects over TCP, so events inserted then are
committed while the module has provably no connection: the deterministic version of "inserted
while the listener was reconnecting".
"""

import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time

import psycopg2
import pytest

sys.path.append(os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                              "chaos")))

import harness  # noqa: E402
from harness import (HEARTBEAT, PGCTL, T, compact_json, frame,  # noqa: E402
                     last_event_id_locations, pid_alive, pump_all,
                     sequence_problems, streams_on_every_worker, wait_until)
from piper_chaos import (LISTENER_APP, cpu_seconds, pg_back_up, expected_events,  # noqa: E402
                         fd_inventory, hold_tcp, http_get, log_entries, module_backends, status,
                         worker_status, wait_all_listening)

# Every test has the status and health locations (start_nginx waits for the listeners in
# /status). These tests follow each worker's own listener through failures (one loss logged per
# worker, reconnects per worker): they pin `per_worker`; the shared listener's failures are in
# test_shared_listener.py and test_chaos.py.
NGINX_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
    event_piper_listener per_worker;
    server {
        listen 127.0.0.1:{{ port }};
        location = /events {
            event_piper;
            {{ location }}
        }
        location = /status { event_piper_status; }
        location = /manage/health { event_piper_health; }
        {{ locations }}
    }
}
"""

ORIGINAL_INSERT = ("insert into events (type, timestamp, subscriber, payload) "
                   "values ('insert', now(), 'toto', '{\"foo\": \"bar\"}');")

PROBLEM_LEVELS = ("warn", "error", "crit", "alert", "emerg")


def note(msg):
    harness.say("    [failures] %s" % msg)


def without_heartbeats(body):
    return bytes(body).replace(HEARTBEAT, b"")


def strip_retry(body):
    """The body without its `retry:` frames (they can only start a frame)."""
    return re.sub(rb"(?:^|(?<=\n\n))retry: [0-9]+\n\n", b"", bytes(body))


def retry_frame_re():
    return re.compile(rb"^retry: [1-9][0-9]*\n\n$")


# The tests run on this module's own cluster (conftest.py's `private_pg`): they stop it, restart
# it and make it refuse TCP logins; `db` brings it back up and open before and after each test.

@pytest.fixture
def db(private_pg):
    pg_back_up(private_pg)
    private_pg.truncate()
    return private_pg


@pytest.fixture
def start_nginx(db, nginx):
    """Start nginx (NGINX_CONF) and, unless wait=False, wait until every worker's listener is
    listening (/status). At the end, PostgreSQL is up and open again before nginx is stopped."""
    def start(wait=True, **kw):
        ngx = nginx.start(db, wait_listening=False, **kw)
        if wait:
            wait_all_listening(ngx)
        return ngx
    yield start
    pg_back_up(db)


def assert_stream_is(db, body, subscriber, what, superuser=False):
    """The body (heartbeats aside) is exactly every committed event of `subscriber`."""
    exp = expected_events(db, subscriber, superuser=superuser)
    got = without_heartbeats(body)
    want = b"".join(f for _, f in exp)
    if got != want:
        ids = [int(x) for x in re.findall(rb"(?m)^id: (\d+)$", got)]
        pytest.fail("%s (%s): %s\n got (last 600 bytes): %r\nwant (last 600 bytes): %r"
                    % (what, subscriber, sequence_problems(ids, [p for p, _ in exp])
                       or "ids right, bytes differ", got[-600:], want[-600:]))


def rejected_logins(db):
    """TCP logins refused by pg_hba so far (PostgreSQL's server log)."""
    with open(os.path.join(db.datadir, "server.log"), errors="replace") as f:
        return f.read().count("pg_hba.conf rejects connection")


def problem_lines(ngx, pid=None, needle=""):
    return [(lvl, p, m) for lvl, p, m in log_entries(ngx)
            if lvl in PROBLEM_LEVELS and (pid is None or p == pid) and needle in m]


# --------------------------------------------------------------------------------------------
# 1. Listener loss: PostgreSQL restart, the listening connection dropped
# --------------------------------------------------------------------------------------------


# -- PostgresRestart --

def test_restart_with_open_streams_delivers_catch_up_and_live_once_and_logs_the_loss_once(
        db, start_nginx, clients):
    ngx = start_nginx(location={"event_piper_heartbeat": "1s"})
    pids = ngx.worker_pids()
    toto, by_worker = streams_on_every_worker(clients, ngx, "toto", minimum=4)
    titi = clients.stream(ngx, "titi", settle=0)
    everyone = toto + [titi]
    db.insert("toto", '{"n": 1}')
    db.insert("titi", '{"n": 2}')
    db.insert("toto", '{"n": 3}')
    pump_all(everyone, lambda: all(len(c.events) >= 2 for c in toto) and len(titi.events) >= 1,
             T(15), "the first events")
    reconnects = {p: w["listener_reconnects"] for p, w in worker_status(ngx).items()}

    rejected_before = rejected_logins(db)
    # Down: new TCP logins are refused first (the unix socket still works for the test), then
    # PostgreSQL stops; every connection of the module is cut.
    hold_tcp(db)
    db.stop()
    t_down = time.monotonic()
    wait_until(lambda: all(problem_lines(ngx, p, "listener connection lost")
                           for p in pids), T(10), what="each worker to log the listener loss")
    # A stream opened during the outage without Last-Event-ID starts from what its worker
    # knew (position 3) and must get everything committed after it.
    late = clients.stream(ngx, "toto", settle=0)
    everyone.append(late)
    time.sleep(3.0)  # connection refused, again and again (backoff)

    # Up again on the same port, but the module cannot log in yet: these events are committed
    # while no listener (and no replay connection) exists.
    db.start()
    assert module_backends(db) == []
    db.insert("toto", '{"n": 4, "during": "reconnect"}')
    db.insert("titi", '{"n": 5, "during": "reconnect"}')
    db.insert("toto", '{"n": 6, "during": "reconnect"}')
    # The module keeps trying (with backoff): wait for its attempts to be refused.
    wait_until(lambda: rejected_logins(db) - rejected_before >= len(pids), T(15),
               what="the module's login attempts while held")
    assert module_backends(db) == [], "a module connection got in while held"
    for c in everyone:
        c.drain()
        assert not c.eof, "a stream ended during the outage: %r" % bytes(c.raw[-200:])
    down_s = time.monotonic() - t_down

    hold_tcp(db, False)
    wait_all_listening(ngx, reconnects_above=reconnects, timeout=T(20))
    pump_all(everyone, lambda: all(len(c.events) >= 4 for c in toto) and len(titi.events) >= 2
             and len(late.events) >= 2, T(15), "the catch-up after the restart")
    # Live after the restart.
    db.insert("toto", '{"n": 7, "after": "restart"}')
    db.insert("titi", '{"n": 8, "after": "restart"}')
    pump_all(everyone, lambda: all(len(c.events) >= 5 for c in toto) and len(titi.events) >= 3
             and len(late.events) >= 3, T(15), "the live events after the restart")
    for c in everyone:
        c.read_for(0.3)  # anything extra (a duplicate) would show up now
    for w, ss in by_worker.items():
        for s in ss:
            assert not s.eof
            assert_stream_is(db, s.body, "toto", "stream on worker %d" % w)
    assert_stream_is(db, titi.body, "titi", "titi's stream")
    assert without_heartbeats(late.body) == \
        b"".join(f for p, f in expected_events(db, "toto") if p > 3), \
        "the stream opened during the outage"

    # The log: the loss once per worker, not once per attempt, and the recovery.
    rejected = rejected_logins(db) - rejected_before
    for p in pids:
        lines = problem_lines(ngx, p, "listener")
        note("worker %d, %.1fs down (%d TCP logins rejected by pg_hba meanwhile): %s"
             % (p, down_s, rejected, [m[:90] for _, _, m in lines]))
        lost = [m for _, _, m in lines if "listener connection lost" in m]
        assert len(lost) == 1, "worker %d logged the loss %d times" % (p, len(lost))
        # Once per distinct reason, not per attempt: a loaded machine can meet a second or third
        # reason on the way back (a timeout as well as the refusal), never the same one twice.
        reasons = [m for _, _, m in lines]
        assert len(reasons) == len(set(reasons)) and len(reasons) <= 4, (
            "worker %d logged listener problems per attempt:\n%s" % (p, "\n".join(reasons)))


def test_a_dropped_listening_connection_catches_up_what_was_committed_meanwhile(
        db, start_nginx, clients):
    ngx = start_nginx()
    pids = ngx.worker_pids()
    toto, _ = streams_on_every_worker(clients, ngx, "toto", minimum=2)
    db.insert("toto", '{"n": 1}')
    pump_all(toto, lambda: all(len(c.events) >= 1 for c in toto), T(15), "the first event")
    reconnects = {p: w["listener_reconnects"] for p, w in worker_status(ngx).items()}
    hold_tcp(db)
    killed = db.superuser_sql(
        "select pg_terminate_backend(pid) from pg_stat_activity where application_name = %s",
        (LISTENER_APP,))
    assert len(killed) == len(pids)
    wait_until(lambda: all(problem_lines(ngx, p, "listener connection lost")
                           for p in pids), T(10), what="each worker to log the listener loss")
    assert module_backends(db, LISTENER_APP) == []
    for n in (2, 3, 4):
        db.insert("toto", '{"n": %d, "while": "no listener"}' % n)
    time.sleep(1.0)
    hold_tcp(db, False)
    wait_all_listening(ngx, reconnects_above=reconnects)
    pump_all(toto, lambda: all(len(c.events) >= 4 for c in toto), T(15), "the catch-up")
    db.insert("toto", '{"n": 5}')
    pump_all(toto, lambda: all(len(c.events) >= 5 for c in toto), T(15), "the live event")
    for c in toto:
        c.read_for(0.3)
        assert_stream_is(db, c.body, "toto", "stream")
    for p in pids:
        lost = problem_lines(ngx, p, "listener connection lost")
        assert len(lost) == 1, lost


# -- SchemaReapplied --

def test_reapplying_the_schema_while_writers_insert_leaves_every_event_deliverable(
        db, start_nginx, clients, request):
    # scripts/pgctl.sh start (and so `make run`) applies postgresql/schema.sql at every start,
    # also to a running cluster, while writers may already be inserting. schema.sql says it is
    # safe to apply more than once: a row inserted between its DROP TRIGGER and CREATE
    # TRIGGER would get no position, and so would never be delivered.
    ngx = start_nginx()
    c = clients.stream(ngx, "w", settle=0)
    stop, count, error = threading.Event(), [0], []

    def write():
        conn = db.connect()
        try:
            cur = conn.cursor()
            while not stop.is_set():
                cur.execute("insert into events (type, timestamp, subscriber, payload) values "
                            "('insert', now(), 'w', %s)", ('{"n": %d}' % count[0],))
                count[0] += 1
        except Exception as e:
            error.append(e)
        finally:
            conn.close()

    t = threading.Thread(target=write, daemon=True)
    t.start()
    request.addfinalizer(stop.set)
    time.sleep(0.2)
    for _ in range(10):
        r = subprocess.run([PGCTL, "start", db.datadir, str(db.port)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert r.returncode == 0, r.stdout
    time.sleep(0.2)
    stop.set()
    t.join()
    assert error == []
    total, unpositioned = (int(x) for x in db.sql(
        "select count(*), count(*) filter (where position is null) from event_log")[0])
    positions = db.positions("w")
    try:
        c.wait(lambda: c.events and int(c.events[-1].id) >= positions[-1], T(30),
               "the newest event")
    finally:
        c.read_for(0.5)
    note("%d events inserted while the schema was re-applied 10 times, %d without a "
         "position; the stream got %d" % (total, unpositioned, len(c.events)))
    got = set(c.event_ids())
    missing = [p for p in positions if p not in got]
    assert sequence_problems(c.event_ids(), positions) == "", (
        "the live stream against the positioned rows; the missing rows "
        "(position, id, neighbour ids): %s" % [
            (p, db.scalar("select id from event_log where position = %s", (p,)),
             [i for i, in db.sql("select id from event_log where position in (%s, %s)",
                                 (p - 1, p + 1))])
            for p in missing[:4]])
    assert unpositioned == 0, (
        "%d of %d events inserted while the schema was re-applied have no position and reach "
        "no client (ids %s)" % (unpositioned, total, [i for i, in db.sql(
            "select id from event_log where position is null order by id")][:10]))


# --------------------------------------------------------------------------------------------
# 1b. PostgreSQL down when nginx starts
# --------------------------------------------------------------------------------------------


# -- PostgresDownAtStart --

def assert_health(ngx, code, body, times=6):
    for _ in range(times):
        h = http_get(ngx.port, "/manage/health")
        assert (h.status, bytes(h.body)) == (code, body), h.head
        assert h.header("Content-Type") == "application/json"


def test_nginx_starts_streams_wait_health_is_down_then_everything_arrives(db, start_nginx, clients):
    db.stop()
    ngx = start_nginx(wait=False)
    pids = ngx.worker_pids()
    c = clients.stream(ngx, "toto", settle=0)
    assert c.header("Content-Type") == "text/event-stream"
    assert_health(ngx, 503,
                  b'{"status":"DOWN","reason":"the listener is not connected to PostgreSQL"}')
    c.read_for(1.0)
    assert not c.eof, "the stream ended while PostgreSQL is down"
    assert without_heartbeats(c.body) == b""
    ws = worker_status(ngx)
    assert sorted(ws) == sorted(pids)
    assert {w["listener"] for w in ws.values()} == {"connecting"}

    db.start()
    wait_all_listening(ngx)
    db.insert("toto", '{"after": "start"}')
    c.wait_events(1)
    c.read_for(0.3)
    assert without_heartbeats(c.body) == frame(1, data='{"after":"start"}')
    assert_health(ngx, 200, b'{"status":"UP"}')
    # A stream opened now, and a replay, work as usual.
    d = clients.stream(ngx, "toto", last_event_id="0", settle=0)
    d.wait_events(1)
    assert without_heartbeats(d.body) == frame(1, data='{"after":"start"}')
    for p in pids:
        lines = problem_lines(ngx, p, "listener")
        note("worker %d: %s" % (p, [m[:90] for _, _, m in lines]))
        assert len(lines) == 1, "worker %d: listener problems logged per attempt" % p


def test_an_event_committed_before_the_listener_is_back_reaches_a_stream_opened_while_down(
        db, start_nginx, clients):
    # The stream subscribed (200, no Last-Event-ID) while PostgreSQL was down: what was
    # committed before is not its to receive (positions 1, 2), everything committed after is,
    # including what is committed before the module's listener manages to log in again.
    db.insert("toto", '{"n": 1, "committed": "before nginx started"}')
    db.insert("toto", '{"n": 2, "committed": "before nginx started"}')
    hold_tcp(db)
    db.stop()
    ngx = start_nginx(wait=False)
    c = clients.stream(ngx, "toto", settle=0)
    c.read_for(0.5)
    db.start()
    assert module_backends(db) == []
    db.insert("toto", '{"n": 3, "committed": "after the stream opened, listener away"}')
    hold_tcp(db, False)
    wait_all_listening(ngx)
    db.insert("toto", '{"n": 4, "committed": "after the listener was back"}')
    try:
        c.wait(lambda: b'"n":4' in c.body, T(15), "the event committed after the listener")
    finally:
        c.read_for(0.5)
    assert without_heartbeats(c.body) == \
        b"".join(f for p, f in expected_events(db, "toto") if p > 2), (
            "a stream opened while PostgreSQL was down (nginx started meanwhile) must get "
            "exactly what was committed after it opened; the module's line: %s"
            % [m for _, _, m in log_entries(ngx) if "stream opened" in m])


# --------------------------------------------------------------------------------------------
# 2. Commits out of id order, rollbacks, the original insert
# --------------------------------------------------------------------------------------------


# -- OutOfOrderCommits --

def insert_on(db, conn, payload, subscriber="toto"):
    """Insert on a connection of the test's (in its transaction, if it has one open); return
    the row's id."""
    return db.run(conn, "insert into events (type, timestamp, subscriber, payload) "
                  "values ('insert', now(), %s, %s) returning id",
                  (subscriber, payload))[0][0]


def test_a_commit_behind_a_resumed_client_arrives_exactly_once(db, start_nginx, clients, request):
    ngx = start_nginx()
    for n in range(1, 5):
        db.insert("toto", '{"n": %d}' % n)
    watcher = clients.stream(ngx, "toto", last_event_id="0", settle=0)  # never disconnects
    c = clients.stream(ngx, "toto", last_event_id="4", settle=0.3)
    assert without_heartbeats(c.body) == b""
    a, b = db.connect(autocommit=False), db.connect()  # b: each insert commits
    request.addfinalizer(a.close)
    request.addfinalizer(b.close)

    # A takes id 5 and stays open; B takes id 6 and commits: B is position 5.
    assert insert_on(db, a, '{"tx": "A"}') == 5
    assert insert_on(db, b, '{"tx": "B"}') == 6
    c.wait_events(1)
    c.read_for(0.5)
    assert without_heartbeats(c.body) == frame(5, data='{"tx":"B"}')
    last = c.events[-1].id
    c.close()
    resumed = clients.stream(ngx, "toto", last_event_id=last, settle=0.5)
    assert without_heartbeats(resumed.body) == b"", "nothing new yet: A is open"
    a.commit()
    resumed.wait_events(1)
    resumed.read_for(0.5)
    assert without_heartbeats(resumed.body) == frame(6, data='{"tx":"A"}')
    assert (db.sql("select payload->>'tx', id, position from event_log "
                   "where payload ? 'tx' order by id") == [("A", 5, 6), ("B", 6, 5)])

    # Again, but A commits while the client is away: the resume replays it.
    assert insert_on(db, a, '{"tx": "A2"}') == 7
    assert insert_on(db, b, '{"tx": "B2"}') == 8
    resumed.wait_events(2)
    assert resumed.events[-1].raw == frame(7, data='{"tx":"B2"}')
    resumed.close()
    a.commit()
    again = clients.stream(ngx, "toto", last_event_id="7", settle=0)
    again.wait_events(1)
    again.read_for(0.5)
    assert without_heartbeats(again.body) == frame(8, data='{"tx":"A2"}')

    watcher.wait_events(8)
    watcher.read_for(0.3)
    assert_stream_is(db, watcher.body, "toto", "the stream that never disconnected")
    assert watcher.event_ids() == list(range(1, 9))


def test_rolled_back_inserts_never_appear(db, start_nginx, clients, request):
    ngx = start_nginx()
    live = clients.stream(ngx, "toto", settle=0)
    # Transactions: psycopg2 opens one at the first statement; commit() or rollback() ends it.
    r, s, d = (db.connect(autocommit=False) for _ in range(3))
    for conn in (r, s, d):
        request.addfinalizer(conn.close)
    # A whole transaction rolled back.
    insert_on(db, r, '{"rolled": "back"}')
    # A savepoint rolled back inside a committed transaction.
    insert_on(db, s, '{"sp": "kept"}')
    db.run(s, "savepoint x")
    insert_on(db, s, '{"sp": "dropped"}')
    db.run(s, "rollback to savepoint x")
    r.rollback()
    s.commit()
    # A row deleted again by its own transaction.
    insert_on(db, d, '{"deleted": "by its own transaction"}')
    db.run(d, "delete from events where payload ? 'deleted'")
    insert_on(db, d, '{"after": "delete"}')
    d.commit()
    # A failed statement aborts its transaction.
    insert_on(db, r, '{"aborted": "by an error"}')
    with pytest.raises(psycopg2.Error):
        db.run(r, "select 1/0")
    r.commit()  # COMMIT of a failed transaction: the server answers ROLLBACK
    db.insert("toto", '{"last": true}')
    live.wait(lambda: b'"last":true' in live.body, T(15), "the last event")
    live.read_for(0.5)
    body = without_heartbeats(live.body)
    for word in (b"rolled", b"dropped", b"deleted", b"aborted"):
        assert word not in body
    assert [p for p, in db.sql("select payload::text from events order by id")] == \
        ['{"sp": "kept"}', '{"after": "delete"}', '{"last": true}']
    assert_stream_is(db, live.body, "toto", "live stream")
    replay = clients.stream(ngx, "toto", last_event_id="0", settle=0)
    replay.wait_events(3)
    replay.read_for(0.3)
    assert_stream_is(db, replay.body, "toto", "replay")


def test_a_row_changed_by_its_own_transaction_is_delivered_as_committed(
        db, start_nginx, clients, request):
    """Live delivery carries the committed row, never the INSERT's image."""
    ngx = start_nginx()
    alice = clients.stream(ngx, "alice", settle=0)
    bob = clients.stream(ngx, "bob", settle=0)
    carol = clients.stream(ngx, "carol", settle=0)
    w = db.connect(autocommit=False)
    request.addfinalizer(w.close)
    ins = ("insert into events (type, timestamp, subscriber, payload) values "
           "('t', now(), %s, %s)")
    # The subscriber changed before commit: only bob may see it.
    with w, w.cursor() as cur:  # one transaction, committed at the end of the block
        cur.execute(ins, ("alice", '{"secret": "for bob only"}'))
        cur.execute("update events set subscriber = 'bob' "
                    "where id = currval('events_id_seq')")
    # Type and payload changed before commit.
    with w, w.cursor() as cur:
        cur.execute(ins, ("carol", '{"draft": 1}'))
        cur.execute("update events set type = 'final', payload = '{\"final\": 2}' "
                    "where id = currval('events_id_seq')")
    # Changed twice, the second time back to alice, then a plain event for each.
    with w, w.cursor() as cur:
        cur.execute(ins, ("bob", '{"hop": 1}'))
        cur.execute("update events set subscriber = 'carol' where id = currval('events_id_seq')")
        cur.execute("update events set subscriber = 'alice', payload = '{\"hop\": 3}' "
                    "where id = currval('events_id_seq')")
    for who in ("alice", "bob", "carol"):
        db.insert(who, '{"end": "%s"}' % who)
    for c, who in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
        c.wait(lambda c=c, who=who: ('"end":"%s"' % who).encode() in c.body, T(15),
               "the last event of " + who)
    for c in (alice, bob, carol):
        c.read_for(0.3)
    assert b"secret" not in without_heartbeats(alice.body)
    assert without_heartbeats(bob.body) == \
        frame(1, "t", '{"secret":"for bob only"}') + frame(5, data='{"end":"bob"}')
    assert without_heartbeats(carol.body) == \
        frame(2, "final", '{"final":2}') + frame(6, data='{"end":"carol"}')
    assert without_heartbeats(alice.body) == \
        frame(3, "t", '{"hop":3}') + frame(4, data='{"end":"alice"}')
    for c, who in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
        assert_stream_is(db, c.body, who, "live stream of " + who)


def test_the_originals_plain_insert_works_unchanged(db, start_nginx, clients):
    ngx = start_nginx()
    c = clients.stream(ngx, "toto", settle=0)
    rc, out = db.psql(ORIGINAL_INSERT)
    assert rc == 0, out
    c.wait_events(1)
    assert bytes(c.events[0].raw) == b'id: 1\nevent: insert\ndata: {"foo":"bar"}\n\n'
    # In an explicit transaction, and twice in one statement.
    rc, out = db.psql("begin;\n" + ORIGINAL_INSERT + "\ncommit;\n" +
                      ORIGINAL_INSERT.replace("'{\"foo\": \"bar\"}');",
                                              "'{\"foo\": \"bar\"}'), ('insert', now(), "
                                              "'toto', '{\"foo\": \"baz\"}');"))
    assert rc == 0, out
    c.wait_events(4)
    c.read_for(0.3)
    assert without_heartbeats(c.body) == \
        frame(1) + frame(2) + frame(3) + frame(4, data='{"foo":"baz"}')
    assert db.sql("select id, position from event_log order by id") == [(i, i) for i in range(1, 5)]


# --------------------------------------------------------------------------------------------
# 3. Large payloads
# --------------------------------------------------------------------------------------------


def big_json(size, tag):
    """Pretty-printed JSON text whose compact form is at least `size` bytes (and not much more):
    compaction has spaces and line breaks to remove."""
    def build(count):
        items = []
        for n in range(count):
            word = "%s-%06d-%s" % (tag, n, "abcdefghijklmnopqrstuvwxyz"[n % 26] * (n % 40))
            items.append('{ "i" : %d, "word" : "%s", "ok" : %s }'
                         % (n, word, "true" if n % 2 else "false"))
        return '{ "tag" : "%s", "items" : [\n  %s\n] }' % (tag, ",\n  ".join(items))
    count = max(1, size // 70)
    while len(compact_json(build(count))) < size:
        count += max(1, count // 50)
    return build(count)


# -- LargePayloads --

def test_9kb_100kb_and_1mb_payloads_live_and_in_replay_byte_exact(db, start_nginx, clients):
    ngx = start_nginx()
    live, _ = streams_on_every_worker(clients, ngx, "toto", minimum=2)
    sizes = [("9k", 9 * 1024), ("100k", 100 * 1024), ("1m", 1024 * 1024)]
    db.insert("toto", '{"small": 0}')
    for tag, size in sizes:
        db.insert("toto", big_json(size, tag), type="big")
        db.insert("toto", '{"small": "%s"}' % tag)
    n = 1 + 2 * len(sizes)
    pump_all(live, lambda: all(len(c.events) >= n for c in live), T(30), "%d events" % n)
    lengths = {t: int(l) for t, l in db.sql(
        "select payload->>'tag', octet_length(payload::text) from events where type = 'big'")}
    note("payload sizes as jsonb text: %s" % lengths)
    for tag, size in sizes:
        assert lengths[tag] >= size
    for c in live:
        c.read_for(0.3)
        assert_stream_is(db, c.body, "toto", "live")
        for f in c.events:
            assert len([1 for k, _ in f.fields if k == "data"]) == 1
    for i, (tag, size) in zip((1, 3, 5), sizes):
        assert len(live[0].events[i].data) >= size, tag
    replay = clients.stream(ngx, "toto", last_event_id="0", settle=0)
    replay.wait_events(n, timeout=T(30))
    replay.read_for(0.3)
    assert_stream_is(db, replay.body, "toto", "replay")
    # From the middle.
    part = clients.open(ngx, "toto", "3")
    part.wait_events(n - 3, timeout=T(30))
    part.read_for(0.3)
    assert without_heartbeats(part.body) == \
        b"".join(f for p, f in expected_events(db, "toto") if p > 3)


def test_payloads_around_the_8000_byte_notification_limit(db, start_nginx, clients):
    ngx = start_nginx()
    live = clients.stream(ngx, "toto", settle=0)
    # The notification carries "e <pos> 4 6\n" + "toto" + "insert" + payload; the trigger
    # switches to a reference at 7999 bytes: cover both sides, and a 1 MB one in between.
    for k, pad in enumerate(range(7940, 7990)):
        db.insert("toto", '{"k": %d, "pad": "%s"}' % (k, "p" * (pad - 22)))
        if k == 25:
            db.insert("toto", big_json(1024 * 1024, "mid"), type="big")
    live.wait_events(51, timeout=T(30))
    live.read_for(0.3)
    lengths = [int(l) for l, in db.sql(
        "select octet_length(payload::text) from event_log order by position")]
    assert min(lengths) < 7999 - 30
    assert max(lengths) > 8000
    assert_stream_is(db, live.body, "toto", "live")
    replay = clients.stream(ngx, "toto", last_event_id="0", settle=0)
    replay.wait_events(51, timeout=T(30))
    replay.read_for(0.3)
    assert_stream_is(db, replay.body, "toto", "replay")


# --------------------------------------------------------------------------------------------
# 4. nginx reload and quit with open streams
# --------------------------------------------------------------------------------------------


class Writer:
    """Inserts events for some subscribers every `interval` seconds in a thread."""

    def __init__(self, pg, subscribers, interval=0.02):
        self.pg, self.subscribers, self.interval = pg, subscribers, interval
        self.count, self.error = 0, None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        conn = self.pg.connect()
        try:
            cur = conn.cursor()
            while not self._stop.is_set():
                sub = self.subscribers[self.count % len(self.subscribers)]
                self.count += 1
                cur.execute("insert into events (type, timestamp, subscriber, payload) values "
                            "('tick', now(), %s, %s)", (sub, '{"w": %d}' % self.count))
                self._stop.wait(self.interval)
        except Exception as e:
            self.error = e
        finally:
            conn.close()

    def start(self):
        self._t.start()
        return self

    def stop(self):
        self._stop.set()
        self._t.join()
        if self.error:
            raise self.error
        return self.count


# -- ReloadAndQuit --

def assert_ended_with_retry(s, what):
    s.wait_complete(timeout=T(10))
    tail = bytes(s.raw[-160:])
    assert s.complete, "%s: not ended with the last chunk: %r" % (what, tail)
    assert bytes(s.raw).endswith(b"\r\n0\r\n\r\n"), "%s: %r" % (what, tail)
    assert re.search(retry_frame_re(), s.frames[-1].raw), \
        "%s: the last frame is not a retry hint: %r" % (what, bytes(s.body[-160:]))
    assert bytes(s.body).endswith(s.frames[-1].raw), ("%s: bytes after the retry "
                                                      "hint: %r" % (what, bytes(s.body[-160:])))
    s.wait_eof(timeout=T(10))


def resume_all(clients, ngx, old_streams):
    """Reconnect each stream with its Last-Event-ID; returns [(old, new)]."""
    pairs = []
    for s in old_streams:
        last = s.events[-1].id if s.events else "0"
        pairs.append((s, clients.stream(ngx, s.consumer, last_event_id=last, settle=0)))
    return pairs


def open_streams(clients, ngx, **kw):
    toto, _ = streams_on_every_worker(clients, ngx, "toto", minimum=4, **kw)
    titi, _ = streams_on_every_worker(clients, ngx, "titi", minimum=2, **kw)
    for s in toto:
        s.consumer = "toto"
    for s in titi:
        s.consumer = "titi"
    return toto + titi


def check_pairs(db, pairs, writer_count):
    final = {k: expected_events(db, k) for k in ("toto", "titi")}
    pump_all([n for _, n in pairs], lambda: all(
        len(o.events) + len(n.events) >= len(final[o.consumer]) for o, n in pairs), T(30),
             "every resumed stream to catch up")
    for _, n in pairs:
        n.read_for(0.2)
    for i, (o, n) in enumerate(pairs):
        assert_stream_is(db, strip_retry(o.body) + strip_retry(n.body),
                         o.consumer, "stream %d before + after" % i)
    note("%d writes during the test, %d toto and %d titi events"
         % (writer_count, len(final["toto"]), len(final["titi"])))


@pytest.mark.smoke
def test_reload_ends_streams_with_retry_and_resuming_misses_nothing(
        db, start_nginx, clients, request):
    ngx = start_nginx()
    streams = open_streams(clients, ngx)
    writer = Writer(db, ["toto", "titi", "toto"]).start()
    request.addfinalizer(writer._stop.set)
    pump_all(streams, lambda: all(len(s.events) >= 3 for s in streams), T(15), "events")
    t0 = time.monotonic()
    old, new = ngx.reload()
    for i, s in enumerate(streams):
        assert_ended_with_retry(s, "stream %d" % i)
    ended_s = time.monotonic() - t0
    wait_until(lambda: not any(pid_alive(p) for p in old), T(5),
               what="the old workers %s to exit" % sorted(old))
    exit_s = time.monotonic() - t0
    wait_all_listening(ngx)
    pairs = resume_all(clients, ngx, streams)
    time.sleep(1.0)
    count = writer.stop()
    note("reload: streams ended %.2fs and old workers gone %.2fs after the reload"
         % (ended_s, exit_s))
    check_pairs(db, pairs, count)
    assert ngx.bad_log_lines() == []


def test_quit_ends_streams_with_retry_and_resuming_on_a_new_nginx_misses_nothing(
        db, start_nginx, clients, request):
    ngx = start_nginx(location={"event_piper_retry": "1500ms"})
    streams = open_streams(clients, ngx)
    for s in streams:
        s.wait_body(b"retry: 1500\n\n")
        assert bytes(s.body).startswith(b"retry: 1500\n\n"), bytes(s.body[:40])
    writer = Writer(db, ["toto", "titi", "toto"]).start()
    request.addfinalizer(writer._stop.set)
    pump_all(streams, lambda: all(len(s.events) >= 3 for s in streams), T(15), "events")
    workers = ngx.worker_pids()
    elapsed = ngx.quit(timeout=T(10))
    assert elapsed < T(5), "nginx took %.1fs to quit" % elapsed
    assert not any(pid_alive(p) for p in workers)
    for i, s in enumerate(streams):
        assert_ended_with_retry(s, "stream %d" % i)
    time.sleep(0.5)  # events keep coming while no nginx runs
    ngx2 = start_nginx(location={"event_piper_retry": "1500ms"})
    pairs = resume_all(clients, ngx2, streams)
    time.sleep(1.0)
    count = writer.stop()
    for _, n in pairs:
        n.wait_body(b"retry: 1500\n\n")
        assert bytes(n.body).startswith(b"retry: 1500\n\n")
    note("quit took %.2fs" % elapsed)
    check_pairs(db, pairs, count)
    assert ngx.bad_log_lines() == []


# -- ShutdownRace --

def test_a_request_that_reaches_a_worker_in_its_shutdown_is_told_to_reconnect(
        db, start_nginx, clients):
    # A client reconnecting during a reload can land on an old worker: its connection was
    # accepted before the reload and its request completes after. An EventSource reconnects
    # after a network error or after a 200 event stream that ends, but a non-200 answer
    # "fails the connection" for good (WHATWG HTML, EventSource): the client stops.
    db.insert("toto")
    ngx = start_nginx()
    c = clients.client(ngx)
    c.send(b"GET /events HTTP/1.1\r\nHost: x\r\nX-Consumer-Id: toto\r\n")
    old_worker = ngx.wait_worker_of(c)
    old, new = ngx.reload()
    assert old_worker in old
    ngx.wait_log("event_piper: shutting down", 2)
    assert pid_alive(old_worker)
    c.send(b"Last-Event-ID: 0\r\n\r\n")
    c.wait_complete(timeout=T(10))
    note("request completed on a worker in its shutdown: %r" % bytes(c.raw[:300]))
    if c.raw:
        assert c.status == 200, ("an EventSource would give up on this answer: %r"
                                 % bytes(c.raw[:300]))
        assert c.header("Content-Type") == "text/event-stream"
        assert c.complete
        assert re.search(retry_frame_re(), c.frames[-1].raw)
    wait_until(lambda: not pid_alive(old_worker), T(5), what="the old worker to exit")


def test_the_answer_in_shutdown_uses_the_configured_retry(db, start_nginx, clients):
    # The same race with event_piper_retry set: the reconnect hint is the configured one, as on
    # the streams that the shutdown ends (it was 1000 ms whatever the configuration said).
    ngx = start_nginx(location={"event_piper_retry": "2500ms"})
    for attempt in range(5):
        c = clients.client(ngx)
        c.send(b"GET /events HTTP/1.1\r\nHost: x\r\nX-Consumer-Id: toto\r\n")
        old_worker = ngx.wait_worker_of(c)
        ngx.reload()
        ngx.wait_log("event_piper: shutting down", 2 * (attempt + 1))
        c.send(b"Last-Event-ID: 0\r\n\r\n")
        c.wait_complete(timeout=T(10))
        wait_until(lambda: not pid_alive(old_worker), T(5), what="the old worker to exit")
        if c.raw:
            break
    assert c.raw, "no attempt reached a worker in its shutdown"
    assert c.status == 200
    assert bytes(c.body) == b"retry: 2500\n\n"


# --------------------------------------------------------------------------------------------
# 5. Bad input
# --------------------------------------------------------------------------------------------


# -- BadInput --

def assert_400(c, module_level=True, what=""):
    c.wait_complete()
    ctx = "%s: response %r" % (what, bytes(c.raw[:300]))
    assert c.status == 400, ctx
    if module_level:
        assert (c.header("Content-Type") or "").startswith("text/plain"), ctx
        body = bytes(c.body)
        assert body.endswith(b"\n") and body.count(b"\n") == 1 and len(body) > 4, \
            "%s: not a one-line text body: %r" % (what, body)


def assert_still_serves(db, clients, ngx, pids):
    assert sorted(ngx.worker_pids()) == sorted(pids), "a worker died"
    assert "exited on signal" not in ngx.read_error_log()
    assert db.scalar("select to_regclass('public.events')::text") == "events"
    c = clients.stream(ngx, "normal", settle=0.2)
    db.insert("normal", '{"still": "serving"}')
    c.wait_events(1)
    pos = db.positions("normal")[-1]
    assert c.events[0].raw == frame(pos, data='{"still":"serving"}')
    c.close()


def test_consumer_ids_with_quotes_backslashes_sql_and_utf8_are_plain_ids(db, start_nginx, clients):
    ngx = start_nginx()
    pids = ngx.worker_pids()
    names = ['quo"te', "it's", "back\\slash", "'; drop table events; --",
             '"; drop table events; --', "x' or '1'='1", "caf\u00e9 \u2603 \U0001F600",
             "%s%n%x", "$1", "a,b;c", "\\x00", "toto"]
    live = {}
    for name in names:
        c = clients.open(ngx, name.encode("utf-8"))
        assert c.status == 200, "consumer %r: %r" % (name, bytes(c.raw[:200]))
        live[name] = c
    for c in live.values():
        c.read_for(0.05)
    for i, name in enumerate(names, 1):
        db.insert(name, '{"for": %d}' % i)
    pump_all(list(live.values()), lambda: all(len(c.events) >= 1 for c in live.values()),
             T(15), "every consumer's event")
    for c in live.values():
        c.read_for(0.2)
    for i, name in enumerate(names, 1):
        assert without_heartbeats(live[name].body) == frame(i, data='{"for":%d}' % i), \
            "live, consumer %r" % name
        replay = clients.open(ngx, name.encode("utf-8"), "0")
        replay.wait_events(1)
        replay.read_for(0.2)
        assert without_heartbeats(replay.body) == frame(i, data='{"for":%d}' % i), \
            "replay, consumer %r" % name
    assert db.scalar("select count(*) from events") == len(names)
    assert_still_serves(db, clients, ngx, pids)


def test_non_utf8_consumer_ids_harm_nothing(db, start_nginx, clients):
    ngx = start_nginx()
    pids = ngx.worker_pids()
    db.insert("toto", '{"n": 1}')
    time.sleep(1.0)
    cpu0 = {p: cpu_seconds(p) for p in pids}
    t0 = time.monotonic()
    outcome = {}
    for raw in (b"caf\xe9", b"\xff\xfe", b"\xc3\x28", b"ok\x80"):
        for lei in (None, "0"):
            c = clients.open(ngx, raw, lei)
            outcome[(raw, lei)] = c
    for (raw, lei), c in outcome.items():
        c.read_for(0.2)
        if c.status != 200:
            assert_400(c, what=repr(raw))
        else:
            assert without_heartbeats(c.body) == b"", "%r got something" % raw
    # The replay pool is not stuck behind them, and live delivery works.
    for _ in range(3):
        r = clients.stream(ngx, "toto", last_event_id="0", settle=0)
        r.wait_events(1, timeout=T(10))
        assert without_heartbeats(r.body) == frame(1, data='{"n":1}')
        r.close()
    assert_still_serves(db, clients, ngx, pids)
    time.sleep(3)
    elapsed = time.monotonic() - t0
    cpu = {p: round(cpu_seconds(p) - cpu0[p], 2) for p in pids}
    errors = problem_lines(ngx)
    note("non-UTF-8 consumer ids: %s; in %.1fs the workers used %s CPU seconds and logged %d "
         "problem lines, e.g. %s"
         % ({"%r/%s" % k: c.status for k, c in outcome.items()}, elapsed, cpu, len(errors),
            [m[:110] for _, _, m in errors[:2]]))
    assert len(errors) <= 16, ("the error log keeps growing (%d lines), last:\n%s"
                               % (len(errors), "\n".join(m for _, _, m in errors[-4:])))
    for p in pids:
        assert cpu[p] < 0.1 * elapsed, (
            "worker %d is busy (%.2f CPU seconds in %.1fs) with streams whose consumer id is "
            "not UTF-8" % (p, cpu[p], elapsed))


def test_nul_cr_lf_in_the_consumer_id_are_refused(db, start_nginx, clients):
    # Through a variable, the module sees the control characters itself: its own 400.
    locs = ""
    for name, value in (("lf", "to\\nto"), ("cr", "to\\rto"), ("crlf", "to\\r\\nid: 9"),
                        ("tab", "to\\tto")):
        locs += ("        location = /events-%s {\n            set $cid \"%s\";\n"
                 "            event_piper_consumer $cid;\n            event_piper;\n"
                 "        }\n" % (name, value))
    ngx = start_nginx(extra_locations=locs)
    pids = ngx.worker_pids()
    for name in ("lf", "cr", "crlf", "tab"):
        c = clients.client(ngx)
        c.request("GET", "/events-" + name, [])
        assert_400(c, what="/events-" + name)
    # In a raw header, nginx's parser answers 400 itself, or ends the header line at the LF
    # (bare LF is a line end in HTTP/1.1): then the id is the part before it, a plain id.
    results = {}
    for value in (b"to\x00to", b"\x00", b"to\rto", b"to\r\rto", b"to\nto", b"toto\r"):
        c = clients.client(ngx)
        c.send(b"GET /events HTTP/1.1\r\nHost: x\r\nX-Consumer-Id: " + value + b"\r\n\r\n")
        c.wait_headers()
        results[value] = c
        if c.status == 400:
            c.wait_complete()
        else:
            assert c.status == 200, bytes(c.raw[:200])
    db.insert("to", '{"for": "to"}')
    db.insert("toto", '{"for": "toto"}')
    for value, c in results.items():
        if c.status == 200:
            want = value.split(b"\n")[0].split(b"\r")[0].decode()
            c.wait_events(1)
            c.read_for(0.3)
            assert without_heartbeats(c.body) == \
                frame(db.positions(want)[0], data='{"for":"%s"}' % want), "consumer id %r" % value
    note("raw NUL/CR/LF consumer ids: %s" % {v: c.status_line for v, c in results.items()})
    assert_still_serves(db, clients, ngx, pids)


def test_long_consumer_ids_are_400(db, start_nginx, clients):
    ngx = start_nginx()
    pids = ngx.worker_pids()
    for n in (257, 300, 1000, 4000):
        c = clients.client(ngx)
        c.request("GET", "/events", [("X-Consumer-Id", b"k" * n)])
        assert_400(c, what="%d-byte id" % n)
    ok = clients.open(ngx, b"k" * 256)
    assert ok.status == 200
    c = clients.client(ngx)
    c.request("GET", "/events", [("X-Consumer-Id", b"k" * 10240)])
    c.wait_complete()
    note("10 KB consumer id: %r" % c.status_line)
    assert c.status == 400, bytes(c.raw[:300])
    assert_still_serves(db, clients, ngx, pids)


def test_bad_last_event_ids_are_400(db, start_nginx, clients):
    for _ in range(6):
        db.insert("toto")
    locs = last_event_id_locations(
        (("leading-space", " 5"), ("trailing-space", "5 "), ("set-5", "5")))
    ngx = start_nginx(extra_locations=locs)
    pids = ngx.worker_pids()
    for value in (b"-1", b"99999999999999999999", b"abc", b"-0", b"+5", b"5abc"):
        c = clients.client(ngx)
        c.request("GET", "/events", [("X-Consumer-Id", "toto"), ("Last-Event-ID", value)])
        assert_400(c, what="Last-Event-ID %r" % value)
    for path in ("/events-leading-space", "/events-trailing-space"):
        c = clients.client(ngx)
        c.request("GET", path, [("X-Consumer-Id", "toto")])
        assert_400(c, what=path)
    good = clients.stream(ngx, "toto", path="/events-set-5", settle=0)
    good.wait_events(1)
    good.read_for(0.3)
    assert without_heartbeats(good.body) == frame(6)
    assert_still_serves(db, clients, ngx, pids)


def test_a_type_with_a_line_break_is_refused_by_the_schema(db, start_nginx, clients):
    ngx = start_nginx()
    c = clients.stream(ngx, "toto", settle=0)
    for t in ("in\nsert", "in\rsert", "insert\n\nid: 999", "\n", "x\r\n"):
        with pytest.raises(psycopg2.Error) as cm:
            db.insert("toto", type=t)
        assert cm.value.pgcode == "23514", str(cm.value)
    assert db.scalar("select count(*) from events") == 0
    db.insert("toto", type="in sert")
    c.wait_events(1)
    c.read_for(0.3)
    assert without_heartbeats(c.body) == frame(1, type="in sert")


def test_a_payload_with_sse_lookalike_text_arrives_as_one_data_line(db, start_nginx, clients):
    ngx = start_nginx()
    c = clients.stream(ngx, "toto", settle=0)
    evil = [
        ('{"s": "x\\n\\nid: 999"}', '{"s":"x\\n\\nid: 999"}'),
        ('{"s": "a\\r\\n\\r\\nid: 999\\r\\nevent: evil\\ndata: y\\n\\n"}',
         '{"s":"a\\r\\n\\r\\nid: 999\\r\\nevent: evil\\ndata: y\\n\\n"}'),
        ('{"\\n\\nid: 999": "\\n\\nretry: 1"}', '{"\\n\\nid: 999":"\\n\\nretry: 1"}'),
        ('"\\n\\nid: 999\\n\\n"', '"\\n\\nid: 999\\n\\n"'),
        ('{"u": "\\u2028\\u2029\\u0085"}', '{"u":"\u2028\u2029\u0085"}'),
    ]
    for payload, _ in evil:
        db.insert("toto", payload)
    c.wait_events(len(evil))
    c.read_for(0.5)
    assert without_heartbeats(c.body) == \
        b"".join(frame(i, data=w) for i, (_, w) in enumerate(evil, 1))
    for f in c.events:
        assert [k for k, _ in f.fields] == ["id", "event", "data"]
    assert "999" not in [f.id for f in c.frames]


def test_a_type_that_bypasses_the_schema_check_cannot_inject_fields(db, start_nginx, clients):
    # The module defends itself too: drop the schema's check for a moment.
    ngx = start_nginx()
    c = clients.stream(ngx, "toto", settle=0)
    db.superuser_sql("alter table events drop constraint events_type_single_line")
    try:
        db.insert("toto", '{"n": 1}', type="evil\n\nid: 999\nretry: 1\ndata: x")
        db.insert("toto", '{"n": 2}', type="evil\rid: 999")
    finally:
        db.superuser_sql("alter table events add constraint events_type_single_line "
                         "check (type !~ '[\\r\\n]') not valid")
    db.insert("toto", '{"n": 3}')
    c.wait(lambda: b'{"n":3}' in c.body, T(15), "the event after the evil ones")
    c.read_for(0.3)
    note("types with line breaks (schema check bypassed): %r" % without_heartbeats(c.body))
    assert "999" not in [f.id for f in c.frames]
    for f in c.frames:
        assert "retry" not in [k for k, _ in f.fields], f
    assert c.events[-1].raw == frame(3, data='{"n":3}')


def test_2000_connections_that_drop_mid_request_then_a_normal_stream(db, start_nginx, clients):
    ngx = start_nginx()
    pids = ngx.worker_pids()
    time.sleep(0.5)
    fds = {p: fd_inventory(p, db.port) for p in pids}
    partials = [
        b"GET /eve",
        b"GET /events HTTP/1.1\r\nHost: x\r\nX-Consu",
        b"GET /events HTTP/1.1\r\nHost: x\r\nX-Consumer-Id: toto\r\nLast-Event-ID: 0\r\n",
        b"GET /events HTTP/1.1\r\nHost: x\r\nX-Consumer-Id: toto\r\n\r\n",  # then gone
        b"GET /events HTTP/1.1\r\nHost: x\r\nX-Consumer-Id: toto\r\nLast-Event-ID: 0\r\n\r\n",
        b"",
    ]
    for n in range(3):
        db.insert("toto", '{"n": %d}' % n)
    rnd = random.Random(4)
    t0 = time.monotonic()
    total = 0
    while total < 2000:
        batch = []
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", ngx.port), timeout=10)
            s.sendall(partials[total % len(partials)])
            batch.append(s)
            total += 1
        rnd.shuffle(batch)
        for i, s in enumerate(batch):
            if i % 2:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
    note("2000 dropped connections in %.1fs" % (time.monotonic() - t0))

    def settled():
        return all(fd_inventory(p, db.port).get("tcp", 0) <= fds[p].get("tcp", 0)
                   for p in pids) and status(ngx)["streams"] == 0
    try:
        wait_until(settled, T(20), interval=0.2,
                   what="worker client sockets back to %s and no stream left" % fds)
    finally:
        note("fds before %s, now %s; streams opened %d, closed %d, open now %d"
             % (fds, {p: fd_inventory(p, db.port) for p in pids},
                ngx.log_count("event_piper: stream opened"),
                ngx.log_count("event_piper: stream closed"), status(ngx)["streams"]))
    for p in pids:
        inv = fd_inventory(p, db.port)
        for kind in ("tcp", "socket", "anon", "file"):
            assert inv.get(kind, 0) == fds[p].get(kind, 0), \
                "worker %d: %s fds %s, before %s" % (p, kind, inv, fds[p])
        assert inv.get("pg", 0) <= 3, "worker %d: %s" % (p, inv)
    assert ngx.log_count("event_piper: stream opened") > 0
    assert_still_serves(db, clients, ngx, pids)
    replay = clients.stream(ngx, "toto", last_event_id="0", settle=0)
    replay.wait_events(3)
    assert without_heartbeats(replay.body) == \
        b"".join(frame(i, data='{"n":%d}' % (i - 1)) for i in (1, 2, 3))

