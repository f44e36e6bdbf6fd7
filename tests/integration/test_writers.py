"""Writers that are never stuck and never refused (README "Writers: grants, two-phase commit,
waits").

A role with exactly the grants the README documents runs every writer shape; a transaction that
reserved positions cannot be prepared; writers held back in COMMIT are shown in status and named
in the error log; an event's id cannot change; types that would mislead a client are refused for
new rows, and rows already stored are still sent. On a cluster of its own: it allows prepared
transactions (a restart), adds a role and changes policies.
"""

import os
import sys
import threading
import time

import psycopg2
import pytest

sys.path.append(os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                              "chaos")))

from harness import HEARTBEAT, REPO, T, frame, wait_until  # noqa: E402
from piper_chaos import http_get, status  # noqa: E402

NGINX_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
    {{ http }}
    server {
        listen 127.0.0.1:{{ port }};
        location = /events {
            event_piper;
        }
        location = /status { event_piper_status; }
    }
}
"""

# A check round every second: held writers are seen within a second or two.
FAST_CHECK = {"event_piper_listener_timeout": "3s"}

INSERT = ("insert into events (type, timestamp, subscriber, payload) "
          "values ('insert', now(), %s, %s)")

# Exactly what the README ("Writers' grants") documents for a writer role.
WRITER_GRANTS = """
    GRANT INSERT, SELECT, UPDATE, DELETE, TRUNCATE ON events TO piper_writer;
    GRANT USAGE ON SEQUENCE events_id_seq TO piper_writer;
"""


def without_heartbeats(body):
    return bytes(body).replace(HEARTBEAT, b"")


@pytest.fixture(scope="module")
def wpg(private_pg):
    private_pg.superuser_sql("alter system set max_prepared_transactions = 10")
    private_pg.stop()
    private_pg.start()
    private_pg.superuser_sql(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'piper_writer') "
        "THEN CREATE ROLE piper_writer LOGIN; END IF; END $$")
    private_pg.sql(WRITER_GRANTS)  # as the owner of the tables, who applied schema.sql
    return private_pg


def rollback_prepared(pg):
    for gid, in pg.superuser_sql("select gid from pg_prepared_xacts"):
        pg.superuser_sql("rollback prepared %s" % psycopg2.extensions.QuotedString(gid).getquoted()
                         .decode())


@pytest.fixture
def db(wpg):
    rollback_prepared(wpg)
    wpg.truncate()
    yield wpg
    rollback_prepared(wpg)


def writer(db, autocommit=True, **settings):
    conn = db.connect(user="piper_writer", autocommit=autocommit)
    for name, value in settings.items():
        with conn.cursor() as cur:
            cur.execute("select set_config(%s, %s, false)", (name, value))
    return conn


def run(conn, query, params=None):
    with conn.cursor() as cur:
        cur.execute(query, params)


# --------------------------------------------------------------------------------------------
# Grants
# --------------------------------------------------------------------------------------------

def test_a_role_with_the_documented_grants_runs_every_writer_shape(db, nginx, clients):
    """Before: a transaction of 2 events failed at COMMIT with `permission denied for sequence
    events_position_seq` (the trigger ran as the writer), UPDATE and DELETE of events with
    `permission denied for table event_positions`."""
    ngx = nginx.start(db)
    one = clients.stream(ngx, "w1", settle=0)
    two = clients.stream(ngx, "w2", settle=0)
    w = writer(db)
    run(w, INSERT, ("w1", '{"n": 1}'))  # one row
    run(w, "insert into events (type, timestamp, subscriber, payload) values "
           "('insert', now(), 'w1', '{\"n\": 2}'), ('insert', now(), 'w1', '{\"n\": 3}')")
    with w.cursor() as cur:  # COPY
        cur.copy_expert("copy events (type, timestamp, subscriber, payload) from stdin",
                        _Lines(['insert\t2024-01-01\tw1\t{"n": 4}',
                                'insert\t2024-01-01\tw1\t{"n": 5}']))
    tx = writer(db, autocommit=False)  # a subscriber corrected before the commit
    run(tx, INSERT, ("w1", '{"n": 6}'))
    run(tx, "update events set subscriber = 'w2' where payload->>'n' = '6'")
    run(tx, "savepoint s")
    run(tx, INSERT, ("w1", '{"n": 99}'))
    run(tx, "rollback to savepoint s")
    tx.commit()
    one.wait_events(5)
    two.wait_events(1)
    one.read_for(0.3)
    assert without_heartbeats(one.body) == b"".join(
        frame(i, data='{"n":%d}' % i) for i in range(1, 6))
    assert without_heartbeats(two.body) == frame(6, data='{"n":6}')
    # After the commit: a subscriber corrected (replay follows it), an event deleted.
    run(w, "update events set subscriber = 'w2' where payload->>'n' = '1'")
    run(w, "delete from events where payload->>'n' = '2'")
    assert db.sql("select position, subscriber from event_positions order by position") == [
        (1, "w2"), (3, "w1"), (4, "w1"), (5, "w1"), (6, "w2")]
    again = clients.stream(ngx, "w2", last_event_id="0", settle=0)
    again.wait_events(2)
    assert without_heartbeats(again.body) == frame(1, data='{"n":1}') + frame(6, data='{"n":6}')
    # TRUNCATE (granted): event_positions is emptied with it, positions go on.
    run(w, "truncate events")
    assert db.scalar("select count(*) from event_positions") == 0
    run(w, INSERT, ("w1", '{"n": 7}'))
    one.wait_events(6)
    assert one.events[-1].raw == frame(7, data='{"n":7}')
    # What the writer cannot do: touch the positions.
    for sql in ("insert into event_positions (position, event_id, subscriber) values (100, 1, 'x')",
                "select setval('events_position_seq', 1)", "delete from event_positions"):
        with pytest.raises(psycopg2.Error) as cm:
            run(w, sql)
        assert cm.value.pgcode == "42501", sql  # insufficient_privilege
    w.close()
    tx.close()


class _Lines:
    """A file-like object for copy_expert: the lines, then EOF."""

    def __init__(self, lines):
        self.data = ("\n".join(lines) + "\n").encode()

    def read(self, size=-1):
        out, self.data = (self.data, b"") if size < 0 else (self.data[:size], self.data[size:])
        return out

    def readline(self, size=-1):
        i = self.data.find(b"\n") + 1 or len(self.data)
        out, self.data = self.data[:i], self.data[i:]
        return out


# --------------------------------------------------------------------------------------------
# Two-phase commit
# --------------------------------------------------------------------------------------------

def test_a_transaction_that_reserved_positions_cannot_be_prepared(db, nginx, clients):
    """Inserted then deleted, nothing notified, so PostgreSQL let it
    be prepared, and every later event writer waited in COMMIT until ROLLBACK PREPARED."""
    ngx = nginx.start(db)
    c = clients.stream(ngx, "after", settle=0)
    big = "s" * 8000  # a subscriber too long to notify: not notified either
    cases = [
        [(INSERT, ("x", "{}")), ("delete from events where subscriber = 'x'", None)],
        [(INSERT, ("x", "{}"))],
        [(INSERT, ("x", "{}")), (INSERT, ("x", "{}")),
         ("delete from events where subscriber = 'x'", None)],
        [(INSERT, (big, "{}"))],
    ]
    for steps in cases:
        tx = writer(db, autocommit=False)
        for sql, params in steps:
            run(tx, sql, params)
        with pytest.raises(psycopg2.Error) as cm:
            run(tx, "PREPARE TRANSACTION 'p'")
        assert cm.value.pgcode == "0A000", str(cm.value)
        assert "a transaction that inserts events cannot be prepared" in str(cm.value)
        tx.rollback()
        tx.close()
    # In a string of several statements: PostgreSQL's own refusal (the trigger notified).
    tx = writer(db, autocommit=False)
    run(tx, INSERT, ("x", "{}"))
    with pytest.raises(psycopg2.Error) as cm:
        run(tx, "delete from events where subscriber = 'x'; PREPARE TRANSACTION 'p'")
    assert "cannot PREPARE a transaction that has executed LISTEN, UNLISTEN, or NOTIFY" in \
        str(cm.value)
    tx.rollback()
    tx.close()
    assert db.sql("select gid from pg_prepared_xacts") == []
    # Transactions that insert no event can still be prepared.
    tx = writer(db, autocommit=False)
    run(tx, "select 1")
    run(tx, "PREPARE TRANSACTION 'no-events'")
    tx.close()
    # Nobody is held back: the next writer commits at once, with statement_timeout as a guard.
    w = writer(db, statement_timeout="5s")
    t0 = time.monotonic()
    run(w, INSERT, ("after", '{"n": 1}'))
    assert time.monotonic() - t0 < T(2)
    c.wait_events(1)
    assert c.events[0].data == '{"n":1}'
    w.close()


def held_writer(db, subscriber, result, **settings):
    """A writer in a thread: one insert in its own transaction; `result` gets None or the
    error."""
    def go():
        conn = writer(db, **settings)
        try:
            run(conn, INSERT, (subscriber, '{"held": true}'))
            result.append(None)
        except psycopg2.Error as e:
            result.append(e)
        finally:
            conn.close()
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_writers_held_back_by_a_long_open_transaction_are_shown_and_its_pid_named(
        db, nginx, clients):
    """A transaction whose deferred constraints were checked early (SET CONSTRAINTS ALL
    IMMEDIATE) reserved its positions and stays open: every later event writer waits in COMMIT.
    statement_timeout does not bound that wait (PostgreSQL ends the statement's timeout before
    the commit's work), lock_timeout does. Status counts the writers, the log names the pid."""
    ngx = nginx.start(db, http=FAST_CHECK)
    c = clients.stream(ngx, "hold", settle=0)
    blocker = writer(db, autocommit=False)
    run(blocker, INSERT, ("hold", '{"first": true}'))
    run(blocker, "SET CONSTRAINTS ALL IMMEDIATE")
    with blocker.cursor() as cur:
        cur.execute("select pg_backend_pid()")
        blocker_pid = cur.fetchone()[0]
    waited, bounded = [], []
    waiting = held_writer(db, "hold", waited, statement_timeout="1s")
    wait_until(lambda: status(ngx)["writers_waiting"] >= 1, T(15), what="writers_waiting >= 1")
    ngx.wait_log("behind backend pid %d" % blocker_pid, 1, T(10))
    assert waiting.is_alive(), "statement_timeout ended the wait: %r" % waited
    # lock_timeout bounds a writer's wait: its COMMIT fails instead.
    t = held_writer(db, "hold", bounded, lock_timeout="500ms")
    t.join(T(10))
    assert len(bounded) == 1 and bounded[0] is not None
    assert bounded[0].pgcode == "55P03", str(bounded[0])  # lock_not_available
    assert waiting.is_alive()
    prom = http_get(ngx.port, "/status?format=prometheus")
    assert b"\nevent_piper_writers_waiting{pid=" in bytes(prom.body)
    blocker.commit()
    waiting.join(T(10))
    assert waited == [None]
    c.wait_events(2)
    assert [e.data for e in c.events] == ['{"first":true}', '{"held":true}']
    wait_until(lambda: status(ngx)["writers_waiting"] == 0, T(15), what="writers_waiting 0")
    ngx.wait_log("event writers no longer wait in COMMIT", 1, T(10))
    assert ngx.log_count("event writers have waited in COMMIT") == 1  # once per blocker
    blocker.close()


def test_a_prepared_transaction_that_holds_writers_is_named_by_its_gid(db, nginx, clients):
    """Under an older schema.sql a transaction with reserved positions could be prepared; one
    that holds the commit-order lock of the newest position stands in for it here."""
    ngx = nginx.start(db, http=FAST_CHECK)
    c = clients.stream(ngx, "held", settle=0)
    db.insert("held")
    newest = db.scalar("select max(position) from event_positions")
    tx = db.connect(autocommit=False)
    run(tx, "select pg_advisory_xact_lock(1885958245, event_piper_position_lock_key(%s))",
        (newest,))
    run(tx, "PREPARE TRANSACTION 'old-schema-tx'")
    tx.close()
    waited = []
    t = held_writer(db, "held", waited)
    ngx.wait_log("behind prepared transaction 'old-schema-tx'", 1, T(15))
    assert ngx.log_count("ROLLBACK PREPARED 'old-schema-tx'") >= 1
    # status is published once a second
    wait_until(lambda: status(ngx)["writers_waiting"] >= 1, T(5), what="writers_waiting >= 1")
    db.superuser_sql("ROLLBACK PREPARED 'old-schema-tx'")
    t.join(T(10))
    assert waited == [None]
    c.wait_events(2)
    ngx.wait_log("event writers no longer wait in COMMIT", 1, T(10))


def test_a_long_lock_on_events_is_named_in_the_checks_log_line(db, nginx, clients):
    """Before: a 45 s LOCK TABLE events made the listener log "no answer from the server ...
    (server or network frozen?)". Nothing is lost either way."""
    ngx = nginx.start(db, http=FAST_CHECK)
    c = clients.stream(ngx, "toto", settle=0)
    tx = db.connect(autocommit=False)
    run(tx, "LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
    try:
        ngx.wait_log("a lock held on table events", 1, T(15))
    finally:
        tx.rollback()
        tx.close()
    db.insert("toto")
    c.wait_events(1)
    assert c.events[0].raw == frame(1)


# --------------------------------------------------------------------------------------------
# Changed ids, misleading types
# --------------------------------------------------------------------------------------------

def test_an_update_of_an_event_id_is_refused(db, nginx, clients):
    """Before: the event left every replay (its position pointed at the old id), and nothing
    reported it."""
    ngx = nginx.start(db)
    for n in (1, 2):
        db.insert("toto", '{"n": %d}' % n)
    w = writer(db)
    with pytest.raises(psycopg2.Error) as cm:
        run(w, "update events set id = id + 100 where payload->>'n' = '1'")
    assert cm.value.pgcode == "0A000" and "the id of an event cannot change" in str(cm.value)
    tx = writer(db, autocommit=False)  # also before its own commit
    run(tx, INSERT, ("toto", '{"n": 3}'))
    with pytest.raises(psycopg2.Error):
        run(tx, "update events set id = 1000 where payload->>'n' = '3'")
    tx.rollback()
    run(w, "update events set id = id where payload->>'n' = '2'")  # the same id: fine
    c = clients.stream(ngx, "toto", last_event_id="0", settle=0)
    c.wait_events(2)
    assert without_heartbeats(c.body) == frame(1, data='{"n":1}') + frame(2, data='{"n":2}')
    w.close()
    tx.close()


def test_misleading_types_are_refused_for_new_rows_and_stored_ones_are_still_sent(
        db, nginx, clients):
    ngx = nginx.start(db)
    for t in ("", "heartbeat", "error", "open", "patch"):
        with pytest.raises(psycopg2.Error) as cm:
            db.insert("toto", type=t)
        assert cm.value.pgcode == "23514", "%r: %s" % (t, cm.value)  # check_violation
        assert "events_type_not_reserved" in str(cm.value)
    for t in ("message", "Heartbeat", "heartbeats", " "):
        db.insert("toto", type=t)
    # Rows stored before the check: the constraint goes, rows come, schema.sql comes again.
    db.superuser_sql("alter table events drop constraint events_type_not_reserved")
    db.insert("toto", '{"old": 1}', type="")
    db.insert("toto", '{"old": 2}', type="heartbeat")
    rc, out = db.psql(open(os.path.join(REPO, "postgresql", "schema.sql")).read(),
                      "--single-transaction")
    assert rc == 0, out
    assert db.scalar("select convalidated from pg_constraint "
                     "where conname = 'events_type_not_reserved'") is False
    with pytest.raises(psycopg2.Error):
        db.insert("toto", type="heartbeat")
    c = clients.stream(ngx, "toto", last_event_id="4", settle=0)
    # (the harness's client counts a frame named heartbeat as a heartbeat: wait for the bytes)
    c.wait(lambda: b'{"old":2}' in bytes(c.body), T(15), "the stored rows")
    c.read_for(0.3)
    # Sent as stored: `event: ` (EventSource: a plain message) and `event: heartbeat` with an
    # id and the payload (the module's heartbeat has neither).
    assert bytes(c.body).replace(HEARTBEAT, b"") == (
        b'id: 5\nevent: \ndata: {"old":1}\n\n' + b'id: 6\nevent: heartbeat\ndata: {"old":2}\n\n')


# --------------------------------------------------------------------------------------------
# Failed replay queries
# --------------------------------------------------------------------------------------------

def test_failed_replay_queries_are_counted_and_logged_once_per_reason(db, nginx, clients):
    """Before: each failed replay query wrote an error line (1,034 lines in 40 s for about 44
    clients with a tiny statement_timeout), and status had no counter for them."""
    for n in range(3):
        db.insert("toto", '{"n": %d}' % n)
    db.sql("""
        create or replace function event_piper_test_refuse() returns boolean
        language plpgsql as $$ begin
            if current_setting('application_name') = 'event_piper_replay' then
                raise exception 'replay refused by the test';
            end if;
            return true;
        end $$;
        alter table events enable row level security;
        alter table events force row level security;
        drop policy if exists event_piper_test_refuse on events;
        create policy event_piper_test_refuse on events using (event_piper_test_refuse());
    """)
    try:
        ngx = nginx.start(db)
        n = 12
        for i in range(n):
            c = clients.open(ngx, "toto", last_event_id=str(i % 3))
            c.wait_complete(T(10))
        wait_until(lambda: status(ngx)["replay_failures"] >= n, T(5),
                   what="replay_failures >= %d" % n)
        prom = bytes(http_get(ngx.port, "/status?format=prometheus").body).decode()
        total = sum(int(line.rsplit(" ", 1)[1]) for line in prom.splitlines()
                    if line.startswith("event_piper_replay_failures_total{"))
        assert total >= n, prom
        lines = ngx.log_count("replay query failed: ERROR:  replay refused by the test")
        assert 1 <= lines <= 2, lines  # one per reason per worker within 10 s
    finally:
        db.sql("drop policy if exists event_piper_test_refuse on events; "
               "alter table events no force row level security; "
               "alter table events disable row level security")
