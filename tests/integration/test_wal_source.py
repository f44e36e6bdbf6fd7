"""event_piper_source wal, end to end (docs/wal-source.md): nginx's positioner reads the slot and
gives positions after the commit; writers run nothing of ours.

A cluster of its own with wal_level = logical (scripts/pgctl.sh, EVENT_PIPER_PG_LOGICAL=1), the
database switched with event_piper_set_source('wal') before each test. Told as user stories:
a live event byte-exact; commits out of id order, a rollback, and rows changed or deleted by
their own transaction, live and in replay; the positioner's worker killed with -9 while writers
insert; patches, live, in replay and folded, with their targets found by the positioner.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

import harness
from harness import T, frame, wait_until

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "chaos"))
from piper_chaos import http_get  # noqa: E402

NGINX_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
    event_piper_source wal;
    {{ http }}
    server {
        listen 127.0.0.1:{{ port }};
        location = /events { event_piper; event_piper_folded $arg_folded; }
        location = /status { event_piper_status; }
        location = /health { event_piper_health; }
    }
}
"""


@pytest.fixture(scope="module")
def wal_pg():
    cluster = harness.Postgres(os.path.join(harness.make_tmp("pg-wal-source"), "pg"), harness.free_port())
    cluster.logical = True  # wal_level = logical, also after a restart
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def db(wal_pg):
    pg = wal_pg
    if pg.scalar("SELECT source FROM event_piper_wal_progress") == "wal":
        pg.superuser_sql("SELECT event_piper_set_source('trigger', 0)")
    pg.sql("TRUNCATE event_positions RESTART IDENTITY; TRUNCATE events RESTART IDENTITY")
    pg.sql("UPDATE event_piper_wal_progress SET lsn = NULL, last_position = 0")
    assert pg.superuser_sql("SELECT event_piper_set_source('wal')")[0][0] == "wal"
    return pg


def positions(pg):
    return pg.sql("SELECT position, event_id, subscriber FROM event_positions ORDER BY position")


def assert_positioned_once_in_order(db, inserted):
    """Every event written got exactly one position, and positions run 1..n with no gap; n."""
    total = db.scalar("SELECT count(*) FROM events")
    wait_until(lambda: db.scalar("SELECT count(*) FROM event_positions") >= total, T(20),
               what="every event positioned")
    rows = positions(db)
    assert len(rows) == total == len(inserted)
    assert len({r[1] for r in rows}) == total, "an event positioned twice"
    assert [r[0] for r in rows] == list(range(1, total + 1)), "positions skipped or repeated"
    return total


def test_an_event_reaches_a_live_stream_through_the_positioner(db, nginx, clients):
    ngx = nginx.start(db)
    c = clients.stream(ngx, "toto")
    rc, out = db.psql("insert into events (type, timestamp, subscriber, payload) "
                      "values ('insert', now(), 'toto', '{\"foo\": \"bar\"}');")
    assert rc == 0, out
    c.wait_events(1, timeout=T(10))
    assert c.events[0].raw == b'id: 1\nevent: insert\ndata: {"foo":"bar"}\n\n'
    assert positions(db) == [(1, 1, "toto")]
    # The writer ran no trigger of ours: those that give positions are all disabled. The one
    # that refuses a change of an event's id fires only on such an UPDATE, never on INSERT.
    assert dict(db.sql("SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = "
                       "'events'::regclass AND NOT tgisinternal")) == {
        "events_commit_notify": "D", "events_updated": "D", "events_deleted": "D",
        "events_truncated": "D", "events_id_unchanged": "O"}
    holder = int(db.scalar("SELECT holder FROM event_piper_wal_progress").split()[-1])
    assert holder in ngx.worker_pids()

    # Status: the source, the worker that holds the positioner, what it positioned.
    def figures():
        s = clients.client(ngx).request("GET", "/status")
        s.wait_complete()
        assert s.status == 200
        return json.loads(bytes(s.body))

    wait_until(lambda: figures()["positioned_rows"] == 1, T(5), what="status published")
    status = figures()
    assert status["source"] == "wal"
    assert status["positioner_holder_pid"] == holder
    assert status["positioned_transactions"] >= 1
    assert status["positioner_lag_ms"] < 5000


def test_commit_order_rollback_and_own_changes_live_and_in_replay(db, nginx, clients):
    ngx = nginx.start(db)
    live = clients.stream(ngx, "toto")
    a = db.connect(autocommit=False)
    b = db.connect(autocommit=False)
    ins = ("insert into events (type, timestamp, subscriber, payload) "
           "values (%s, now(), 'toto', %s) returning id")
    # id 1 is inserted first but commits last: it gets the later position.
    first = db.run(a, ins, ("a", '{"n": 1}'))[0][0]
    db.run(b, ins, ("b", '{"n": 2}'))
    b.commit()
    a.commit()
    # Rolled back: never seen.
    db.run(b, ins, ("rolled back", '{"n": 3}'))
    b.rollback()
    # Changed and deleted by their own transaction: delivered as committed, or not at all.
    x = db.run(b, ins, ("x", '{"n": 4}'))[0][0]
    y = db.run(b, ins, ("y", '{"n": 5}'))[0][0]
    db.run(b, "update events set payload = '{\"n\": 44}', type = 'x2' where id = %s", (x,))
    db.run(b, "delete from events where id = %s", (y,))
    b.commit()
    a.close()
    b.close()
    expected = (frame(1, "b", '{"n":2}') + frame(2, "a", '{"n":1}') + frame(3, "x2", '{"n":44}'))
    live.wait_events(3, timeout=T(10))
    assert b"".join(e.raw for e in live.events) == expected
    assert [r[1] for r in positions(db)] == [first + 1, first, first + 3]
    replay = clients.stream(ngx, "toto", last_event_id="0")
    replay.wait_events(3, timeout=T(10))
    assert b"".join(e.raw for e in replay.events) == expected


def test_kill_9_of_the_positioner_worker_loses_and_duplicates_nothing(db, nginx, clients):
    ngx = nginx.start(db)
    stop = threading.Event()
    inserted = []

    def writer():
        conn = db.connect()
        n = 0
        while not stop.is_set():
            n += 1
            db.run(conn, "insert into events (type, timestamp, subscriber, payload) "
                         "values ('insert', now(), 'toto', %s)", ('{"n": %d}' % n,))
            inserted.append(n)
            time.sleep(0.005)
        conn.close()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        wait_until(lambda: db.scalar("SELECT holder FROM event_piper_wal_progress") is not None,
                   T(10), what="a positioner")
        holder = int(db.scalar("SELECT holder FROM event_piper_wal_progress").split()[-1])
        ngx.allowed_alerts.append("exited on signal 9")
        os.kill(holder, signal.SIGKILL)
        # Another worker takes the role and the slot; positions continue.
        wait_until(lambda: (db.scalar("SELECT holder FROM event_piper_wal_progress") or "")
                   .split()[-1] not in ("", str(holder)), T(20), what="another positioner")
        time.sleep(1)
    finally:
        stop.set()
        t.join(10)
    total = assert_positioned_once_in_order(db, inserted)
    c = clients.stream(ngx, "toto", last_event_id="0")
    c.wait_events(total, timeout=T(20))
    assert [int(e.id) for e in c.events] == list(range(1, total + 1))


def test_no_position_is_visible_before_its_event(db, nginx, clients):
    """A writer's commit is decoded a moment before other sessions can see it (a loaded server,
    or here, held that way: a synchronous standby that never answers). Positions committed in
    that moment were visible without their event: a stream reading the table passed over it
    (the chaos test in wal mode lost deliveries so). The positioner waits until the writer's
    commit is visible."""
    su = db.superuser_sql
    # nginx's sessions commit without waiting for the standby; the held writer waits for it.
    su("ALTER ROLE event_piper SET synchronous_commit = local")
    held = None
    try:
        ngx = nginx.start(db)
        live = clients.stream(ngx, "toto")
        db.insert("toto", '{"n": 1}')
        live.wait_events(1, timeout=T(10))
        su("ALTER SYSTEM SET synchronous_standby_names = 'event_piper_test_nobody'")
        su("SELECT pg_reload_conf()")
        held = db.connect(autocommit=False)
        pid = db.run(held, "SELECT pg_backend_pid()")[0][0]
        db.run(held, "SET synchronous_commit = on")
        db.run(held, "insert into events (type, timestamp, subscriber, payload) "
                     "values ('insert', now(), 'toto', '{\"n\": 2}')")
        done = threading.Event()
        threading.Thread(target=lambda: (held.commit(), done.set()), daemon=True).start()
        wait_until(lambda: db.scalar("SELECT wait_event FROM pg_stat_activity WHERE pid = %s",
                                     (pid,)) == "SyncRep", T(10), what="the writer held in COMMIT")
        db.insert("toto", '{"n": 3}')  # committed, visible, decoded after the held one

        def orphans():
            return db.scalar("SELECT count(*) FROM event_positions p "
                             "WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.id = p.event_id)")

        def positioner_waits():
            return db.superuser_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                "'event_piper_positioner' AND state = 'active' "
                "AND query LIKE '%event_piper_wal_apply%'")[0][0] > 0

        # The positioner has decoded the held commit: it waits, or (the bug) wrote its position.
        wait_until(lambda: orphans() > 0 or positioner_waits(), T(10),
                   what="the positioner to decode the held commit")
        time.sleep(0.5)
        assert orphans() == 0, "a position is visible before its event"
        assert positioner_waits()
        assert positions(db) == [(1, 1, "toto")]  # the held commit holds the later one back
        late = clients.stream(ngx, "toto", last_event_id="1")
        su("SELECT pg_cancel_backend(%s)", (pid,))  # the commit becomes visible
        assert done.wait(T(10))
    finally:
        su("ALTER SYSTEM RESET synchronous_standby_names")
        su("SELECT pg_reload_conf()")
        su("ALTER ROLE event_piper RESET synchronous_commit")
        if held is not None:
            held.close()
    expected = frame(2, "insert", '{"n":2}') + frame(3, "insert", '{"n":3}')
    for c in (live, late):
        c.wait_events(2 if c is late else 3, timeout=T(10))
    assert b"".join(e.raw for e in late.events) == expected
    assert b"".join(e.raw for e in live.events[1:]) == expected
    assert [r[1] for r in positions(db)] == [1, 2, 3]


def holder_pid(db):
    return int((db.scalar("SELECT holder FROM event_piper_wal_progress") or "0").split()[-1])


def test_two_instances_kill_9_then_a_frozen_positioner_lose_nothing_and_it_stands_down(
        db, nginx, clients):
    """Two instances on one database, writers and readers running: the positioner's worker is
    killed with -9, then the next positioner's worker is frozen (SIGSTOP) for longer than the
    takeover bound (wal_sender_timeout 10 s + the 5 s retry). Nothing lost, duplicated or out of
    order, live or in replay, on either instance; the frozen one steps down when it wakes."""
    instances = [nginx.start(db), nginx.start(db)]
    stop = threading.Event()

    def writer(subscriber):
        conn = db.connect()
        while not stop.is_set():
            db.run(conn, "insert into events (type, timestamp, subscriber, payload) "
                         "values ('insert', now(), %s, '{}')", (subscriber,))
            time.sleep(0.01)
        conn.close()

    threads = [threading.Thread(target=writer, args=(s,), daemon=True) for s in ("toto", "titi")]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: holder_pid(db) != 0, T(10), what="a positioner")
        killed = holder_pid(db)
        for n in instances:
            n.allowed_alerts.append("exited on signal 9")
        os.kill(killed, signal.SIGKILL)
        wait_until(lambda: holder_pid(db) not in (0, killed), T(20),
                   what="another positioner after the kill")
        frozen = holder_pid(db)
        owner = next(n for n in instances if frozen in n.worker_pids())
        other = next(n for n in instances if n is not owner)
        # Readers on both instances, from the start (replay, then live through the freeze).
        reader = clients.stream(other, "toto", last_event_id="0")
        near = clients.stream(owner, "titi", last_event_id="0")
        os.kill(frozen, signal.SIGSTOP)
        try:
            # The server ends the frozen one's stream after wal_sender_timeout (10 s); the other
            # instance takes the slot at its next try (at most 5 s later).
            t0 = time.monotonic()
            wait_until(lambda: (db.scalar("SELECT holder FROM event_piper_wal_progress") or "")
                       .split()[-1] != str(frozen), T(30), what="another positioner")
            took = time.monotonic() - t0
            assert took < T(20), "takeover took %.1f s" % took
            time.sleep(2)
        finally:
            os.kill(frozen, signal.SIGCONT)
        time.sleep(3)  # the woken one finds its stream gone or its progress stale

        # It stepped down: its instance's status no longer names it as the positioner.
        def owner_positioner():
            s = clients.client(owner).request("GET", "/status")
            s.wait_complete()
            return json.loads(bytes(s.body))["positioner_holder_pid"]

        wait_until(lambda: owner_positioner() != frozen, T(10), what="the woken one to step down")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    total = db.scalar("SELECT count(*) FROM events")
    wait_until(lambda: db.scalar("SELECT count(*) FROM event_positions") >= total, T(20),
               what="every event positioned")
    rows = positions(db)
    assert len({r[1] for r in rows}) == total == len(rows), "an event lost or positioned twice"
    assert [r[0] for r in rows] == list(range(1, total + 1)), "positions skipped or repeated"
    assert str(frozen) not in db.scalar("SELECT holder FROM event_piper_wal_progress")
    assert "event_piper positioner:" in owner.read_error_log()
    toto = [r[0] for r in rows if r[2] == "toto"]
    reader.wait_events(len(toto), timeout=T(20))
    got = [int(e.id) for e in reader.events]
    assert got == toto, "the reader on the other instance: lost, duplicated or out of order"
    titi = [r[0] for r in rows if r[2] == "titi"]
    near.wait_events(len(titi), timeout=T(20))
    got = [int(e.id) for e in near.events]
    assert got == titi, "the reader on the frozen one's instance: lost, duplicated or out of order"


def test_a_dropped_slot_is_created_again_and_the_rows_committed_meanwhile_come_above(
        db, nginx, clients):
    """The slot is dropped while nginx runs and writers insert (an operator; an invalidated slot
    takes the same path): the positioner creates it again and the rows committed while it was
    missing get the next positions in id order, above every position handed out, logged. No
    event lost or positioned twice; the live stream and a replay get each one once, in
    position order."""
    ngx = nginx.start(db)
    live = clients.stream(ngx, "toto")
    stop = threading.Event()
    inserted = []

    def writer():
        conn = db.connect()
        while not stop.is_set():
            db.run(conn, "insert into events (type, timestamp, subscriber, payload) "
                         "values ('insert', now(), 'toto', '{}')")
            inserted.append(1)
            time.sleep(0.01)
        conn.close()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        wait_until(lambda: db.scalar("SELECT count(*) FROM pg_replication_slots WHERE active")
                   == 1 and db.scalar("SELECT count(*) FROM event_positions") > 5, T(10),
                   what="a positioner reading the slot")
        # The advisory lock of the switches holds the re-creation back while rows commit without
        # a slot; the slot's reader is ended, then the slot dropped.
        su = db.connect(user="postgres", autocommit=False)
        try:
            db.run(su, "SELECT pg_advisory_xact_lock(7402652111030151174)")
            for _ in range(50):
                db.run(su, "SELECT pg_terminate_backend(active_pid, 5000) FROM "
                           "pg_replication_slots WHERE slot_name = 'event_piper' AND active")
                db.run(su, "SAVEPOINT s")
                try:
                    db.run(su, "SELECT pg_drop_replication_slot('event_piper')")
                    break
                except Exception:
                    db.run(su, "ROLLBACK TO SAVEPOINT s")  # read again already: once more
            else:
                pytest.fail("could not drop the slot")
            missed = db.scalar("SELECT count(*) FROM events")
            time.sleep(1)  # rows commit, no slot decodes them
            missed = db.scalar("SELECT count(*) FROM events") - missed
            assert missed > 0
            assert db.scalar("SELECT count(*) FROM pg_replication_slots") == 0
        finally:
            su.commit()
            su.close()
        wait_until(lambda: db.scalar("SELECT count(*) FROM pg_replication_slots WHERE active")
                   == 1, T(10), what="the slot created again and read")
        time.sleep(1)
    finally:
        stop.set()
        t.join(10)
    total = assert_positioned_once_in_order(db, inserted)
    log = ngx.read_error_log()
    assert "replication slot \"event_piper\" was dropped: created it again; " in log
    caught = int(log.split("created it again; ")[1].split()[0])
    assert caught >= missed
    live.wait_events(total, timeout=T(20))
    assert [int(e.id) for e in live.events] == list(range(1, total + 1))
    replay = clients.stream(ngx, "toto", last_event_id="0")
    replay.wait_events(total, timeout=T(20))
    assert [int(e.id) for e in replay.events] == list(range(1, total + 1))


def test_a_transaction_of_200000_rows_arrives_whole_in_order_in_bounded_memory(
        db, nginx, clients):
    ngx = nginx.start(db)
    live = clients.stream(ngx, "toto")
    wait_until(lambda: db.scalar("SELECT count(*) FROM pg_replication_slots WHERE active") == 1,
               T(10), what="a positioner reading the slot")
    pids = ngx.worker_pids()
    conn = db.connect(autocommit=False)
    # 200,000 rows of about 450 bytes (90 MB), one in a thousand for toto; then the transaction
    # changes one of its first rows and deletes another, long after they were written in parts.
    first = db.run(conn, "SELECT nextval('events_id_seq') + 1")[0][0]
    db.run(conn, "INSERT INTO events (type, timestamp, subscriber, payload) "
                 "SELECT 'bulk', now(), CASE WHEN g % 1000 = 0 THEN 'toto' ELSE 'other' END, "
                 "jsonb_build_object('n', g, 'pad', repeat('x', 400)) "
                 "FROM generate_series(1, 200000) g")
    db.run(conn, "UPDATE events SET subscriber = 'toto', payload = '{\"changed\": true}' "
                 "WHERE id = %s", (first + 4,))
    db.run(conn, "DELETE FROM events WHERE id = %s", (first + 6,))
    with harness.RssSampler(pids, interval=0.05) as rss:
        conn.commit()
        wait_until(lambda: db.scalar("SELECT count(*) FROM event_positions") == 199999, T(120),
                   interval=0.5, what="the transaction positioned")
    conn.close()
    growth = max(rss.growth_kb(p) for p in pids)
    harness.log("largest worker growth while positioning 200,000 rows: %d kB" % growth)
    assert growth < 40 * 1024, "a worker grew by %d kB (the transaction is 90 MB)" % growth
    order = db.sql("SELECT event_id FROM event_positions ORDER BY position")
    assert [r[0] for r in order] == sorted(r[0] for r in order), "not in insert order"
    assert db.scalar("SELECT subscriber FROM event_positions WHERE event_id = %s",
                     (first + 4,)) == "toto"
    toto = db.sql("SELECT position FROM event_positions WHERE subscriber = 'toto' "
                  "ORDER BY position")
    assert len(toto) == 201
    live.wait_events(201, timeout=T(60))
    assert [int(e.id) for e in live.events] == [r[0] for r in toto]
    assert live.events[0].data == '{"changed":true}'


# -- patches (docs/patching.md): the positioner finds each patch's target and stores it --

from test_patching import body, insert, patch_frame  # noqa: E402  (the same helpers)


def positioned(db, n):
    wait_until(lambda: db.scalar("SELECT count(*) FROM event_positions") >= n, T(10),
               what="%d events positioned" % n)


def test_a_patch_is_delivered_live_and_in_replay_with_its_target(db, nginx, clients):
    ngx = nginx.start(db)
    live = clients.stream(ngx, "toto")
    wait_until(lambda: db.scalar("SELECT count(*) FROM pg_replication_slots WHERE active") == 1,
               T(10), what="a positioner reading the slot")
    order = insert(db, "toto", '{"status": "paid", "n": 12345678901234567890}')
    positioned(db, 1)
    # Its target is in the table: the positioner reads its position before writing.
    insert(db, "toto", '{"status": "shipped", "n": null}', patches=order)
    insert(db, "toto", '{"x": 1}', type="other")  # an event that patches nothing
    # A transaction with an event and its patches: the targets are in the positioner's batch.
    conn = db.connect(autocommit=False)
    with conn, conn.cursor() as cur:
        cur.execute("insert into events (type, timestamp, subscriber, payload) "
                    "values ('order', now(), 'toto', '{\"a\": 1}') returning id")
        second = cur.fetchone()[0]
        for i in range(2):
            cur.execute("insert into events (type, timestamp, subscriber, payload, patches) "
                        "values ('order', now(), 'toto', %s, %s)", ('{"a": %d}' % (i + 2), second))
        cur.execute("insert into events (type, timestamp, subscriber, payload, patches) "
                    "values ('order', now(), 'toto', 'null', %s)", (order,))  # a tombstone
    conn.close()
    expected = (frame(1, "order", '{"n":12345678901234567890,"status":"paid"}')
                + patch_frame(2, 1, '{"n":null,"status":"shipped"}')
                + frame(3, "other", '{"x":1}')
                + frame(4, "order", '{"a":1}')
                + patch_frame(5, 4, '{"a":2}')
                + patch_frame(6, 4, '{"a":3}')
                + patch_frame(7, 1, 'null'))
    live.wait_events(7, timeout=T(10))
    assert body(live) == expected
    assert db.sql("SELECT position, target FROM event_positions ORDER BY position") == [
        (1, None), (2, 1), (3, None), (4, None), (5, 4), (6, 4), (7, 1)]
    replay = clients.stream(ngx, "toto", last_event_id="0", settle=0)
    replay.wait_events(7, timeout=T(10))
    replay.read_for(0.3)
    assert body(replay) == expected


def test_folded_resume_sends_each_event_once_in_its_current_state(db, nginx, clients):
    ngx = nginx.start(db)
    a = insert(db, "alice", '{"status": "paid"}')        # 1
    b = insert(db, "alice", '{"status": "paid"}')        # 2
    positioned(db, 2)
    insert(db, "alice", '{"status": "shipped"}', a)      # 3
    insert(db, "alice", '{"x": 1}', type="other")        # 4, patches nothing
    insert(db, "alice", 'null', b)                       # 5, a tombstone
    insert(db, "alice", '{"status": "delivered"}', a)    # 6
    positioned(db, 6)
    c = clients.stream(ngx, "alice", last_event_id="2", settle=0, path="/events?folded=1")
    c.wait_events(3, timeout=T(10))
    c.read_for(0.3)
    assert body(c) == (
        frame(4, "other", '{"x":1}')
        + patch_frame(5, 2, 'null', member="state")
        + patch_frame(6, 1, '{"status":"delivered"}', member="state"))
    # Then live, as usual.
    insert(db, "alice", '{"status": "returned"}', a)
    c.wait_events(4, timeout=T(10))
    assert c.events[3].raw == patch_frame(7, 1, '{"status":"returned"}')


def test_a_bad_patch_is_delivered_as_a_plain_event_and_logged(db, nginx, clients):
    """Nothing of ours runs at INSERT in wal mode: a patch naming an event of another subscriber,
    a patch or no event cannot be refused; the positioner delivers it as a plain event (nothing
    lost; a client keyed by target ids never saw such an id) and says so in the error log."""
    ngx = nginx.start(db)
    live = clients.stream(ngx, "toto")
    theirs = insert(db, "alice", '{"a": 1}')               # 1
    mine = insert(db, "toto", '{"a": 1}')                  # 2
    positioned(db, 2)
    patch = insert(db, "toto", '{"a": 2}', patches=mine)   # 3, good
    bad = [insert(db, "toto", '{"b": 1}', patches=theirs),  # 4, another subscriber's
           insert(db, "toto", '{"b": 2}', patches=patch),   # 5, a patch of a patch
           insert(db, "toto", '{"b": 3}', patches=99999)]   # 6, no such event
    expected = (frame(2, "order", '{"a":1}') + patch_frame(3, 2, '{"a":2}')
                + frame(4, "order", '{"b":1}') + frame(5, "order", '{"b":2}')
                + frame(6, "order", '{"b":3}'))
    live.wait_events(5, timeout=T(10))
    assert body(live) == expected
    replay = clients.stream(ngx, "toto", last_event_id="0", settle=0)
    replay.wait_events(5, timeout=T(10))
    replay.read_for(0.3)
    assert body(replay) == expected
    log = ngx.read_error_log()
    for event, target, why in ((bad[0], theirs, "belongs to another subscriber"),
                               (bad[1], patch, "is itself a patch"),
                               (bad[2], 99999, "does not exist")):
        assert ("event %d patches event %d, which %s: delivered as a plain event"
                % (event, target, why)) in log


def test_compaction_in_wal_mode_keeps_every_resume_right(db, nginx, clients):
    """Compaction deletes the folded patches; in wal mode no trigger deletes their positions, and
    the positioner applies the decoded deletes later, at their place in the commit order."""
    ngx = nginx.start(db)
    a = insert(db, "toto", '{"s": "paid", "n": 1}')     # 1
    positioned(db, 1)
    insert(db, "toto", '{"s": "shipped"}', a)           # 2
    insert(db, "toto", '{"x": 1}', type="other")        # 3
    insert(db, "toto", '{"n": null}', a)                # 4
    insert(db, "toto", '{"s": "delivered"}', a)         # 5
    positioned(db, 5)
    assert db.scalar("SELECT event_piper_compact(4)") == 1
    insert(db, "toto", '{"y": 1}', type="other")        # 6: after the compaction's changes
    wait_until(lambda: db.scalar("SELECT max(position) FROM event_positions") == 6, T(10),
               what="the compaction's changes and one more event positioned")
    assert db.sql("SELECT position, event_id, target FROM event_positions ORDER BY position") == [
        (1, a, None), (3, 3, None), (4, a, 1), (5, 5, 1), (6, 6, None)]
    tail = (patch_frame(4, 1, '{"s":"shipped"}', member="state")
            + patch_frame(5, 1, '{"s":"delivered"}') + frame(6, "other", '{"y":1}'))
    for last, expected in (("0", frame(1, "order", '{"s":"shipped"}') + frame(3, "other", '{"x":1}')
                            + tail),
                           ("2", frame(3, "other", '{"x":1}') + tail),  # a deleted patch's
                           ("3", tail)):
        c = clients.stream(ngx, "toto", last_event_id=last, settle=0)
        c.wait_events(expected.count(b"\n\n"), timeout=T(10))
        c.read_for(0.3)
        assert body(c) == expected, last
    assert "event_piper positioner:" not in ngx.read_error_log()


def test_retention_in_wal_mode_the_positioner_follows_the_deletes(db, nginx, clients):
    """event_piper_retain deletes the positions itself (the delete trigger is disabled); the
    positioner then decodes the deletes, finds nothing left to do, and goes on positioning."""
    ngx = nginx.start(db)
    for _ in range(6):
        insert(db, "toto", '{"foo": "bar"}', type="insert")  # 1..6
    positioned(db, 6)
    db.sql("CALL event_piper_retain(upto => 4, max_events => 3)")
    assert [p for p, _, _ in positions(db)] == [5, 6]
    insert(db, "toto", '{"foo": "bar"}', type="insert")  # 7: after the deletes in commit order
    wait_until(lambda: db.scalar("SELECT max(position) FROM event_positions") == 7, T(10),
               what="the retention's deletes decoded and one more event positioned")
    assert [p for p, _, _ in positions(db)] == [5, 6, 7]
    c = clients.stream(ngx, "toto", last_event_id="1", settle=0)
    c.wait_events(3, timeout=T(10))
    insert(db, "toto", '{"foo": "bar"}', type="insert")  # 8: live
    c.wait_events(4, timeout=T(10))
    c.read_for(0.3)
    assert body(c) == (b'event: history-gone\ndata: {"last_event_id":1,"removed_upto":4}\n\n'
                       + frame(5) + frame(6) + frame(7) + frame(8))
    assert "event_piper positioner:" not in ngx.read_error_log()


def test_patches_from_concurrent_writers_all_get_their_targets(db, nginx, clients):
    """Writers insert events and patches of recent events (their own, just committed, or of the
    same transaction) in transactions of 1 to 4 rows: every patch's target is found, whether in
    the positioner's batch or in the table, and the live frames are the replay's."""
    ngx = nginx.start(db)
    live = clients.stream(ngx, "toto")
    wait_until(lambda: db.scalar("SELECT count(*) FROM pg_replication_slots WHERE active") == 1,
               T(10), what="a positioner reading the slot")
    stop = threading.Event()
    ids = []

    def writer(seed):
        rnd = random.Random(seed)
        conn = db.connect(autocommit=False)
        mine = []
        while not stop.is_set():
            with conn.cursor() as cur:
                for _ in range(rnd.randint(1, 4)):
                    target = rnd.choice(mine) if mine and rnd.random() < 0.6 else None
                    cur.execute("insert into events (type, timestamp, subscriber, payload, "
                                "patches) values ('order', now(), 'toto', %s, %s) returning id",
                                ('{"w": %d, "n": %d}' % (seed, len(ids)), target))
                    new = cur.fetchone()[0]
                    if target is None:
                        mine.append(new)
                    ids.append(new)
            conn.commit()
            time.sleep(0.002)
        conn.close()

    threads = [threading.Thread(target=writer, args=(s,), daemon=True) for s in range(3)]
    for t in threads:
        t.start()
    time.sleep(T(3))
    stop.set()
    for t in threads:
        t.join(10)
    total = len(ids)
    positioned(db, total)
    patches = db.scalar("SELECT count(*) FROM events WHERE patches IS NOT NULL")
    harness.log("%d events, %d of them patches" % (total, patches))
    assert patches > total // 4
    # Every patch carries its target's position, every plain event none.
    assert db.scalar(
        "SELECT count(*) FROM event_positions p JOIN events e ON e.id = p.event_id "
        "LEFT JOIN event_positions t ON t.event_id = e.patches "
        "WHERE p.target IS DISTINCT FROM t.position") == 0
    live.wait_events(total, timeout=T(20))
    replay = clients.stream(ngx, "toto", last_event_id="0", settle=0)
    replay.wait_events(total, timeout=T(20))
    replay.read_for(0.3)
    assert body(live) == body(replay)
    assert sum(1 for e in live.events if e.event == "patch") == db.scalar(
        "SELECT count(*) FROM events WHERE patches IS NOT NULL")
    assert "patches event" not in ngx.read_error_log()


def test_health_is_up_while_the_positioner_follows_and_down_while_it_is_stalled(
        db, nginx, clients):
    """A row the positioner is about to position is in flight, not missing: health stays UP under
    steady writes with a check every second. Rows still without a position a check period later
    (the positioner cannot read the slot) turn it DOWN, with the reason, until it is back."""
    ngx = nginx.start(db, http={"event_piper_listener_timeout": "3s"})

    def health():
        c = http_get(ngx.port, "/health")
        return c.status, bytes(c.body)

    wait_until(lambda: health()[0] == 200, T(10), what="health UP")
    conn = db.connect()
    answers = []
    try:
        t_end = time.monotonic() + 4  # four checks
        n = 0
        while time.monotonic() < t_end:
            n += 1
            db.run(conn, "insert into events (type, timestamp, subscriber, payload) "
                         "values ('insert', now(), 'toto', %s)", ('{"n": %d}' % n,))
            if n % 10 == 0:
                answers.append(health())
            time.sleep(0.005)
        assert answers and all(a == (200, b'{"status":"UP"}') for a in answers), \
            [a for a in answers if a[0] != 200][:3]
        # The positioner stalled: it cannot log in for replication any more.
        db.superuser_sql("ALTER ROLE event_piper NOREPLICATION")
        db.superuser_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE backend_type = 'walsender'")
        db.run(conn, "insert into events (type, timestamp, subscriber, payload) "
                     "values ('insert', now(), 'toto', '{}')")
        wait_until(lambda: health()[0] == 503, T(20), what="health DOWN")
        status, body = health()
        doc = json.loads(body)
        assert doc["status"] == "DOWN" and "is the positioner running?" in doc["reason"], body
    finally:
        db.superuser_sql("ALTER ROLE event_piper REPLICATION")
        conn.close()
    wait_until(lambda: health() == (200, b'{"status":"UP"}'), T(40), what="health UP again")
    total = db.scalar("SELECT count(*) FROM events")
    c = clients.stream(ngx, "toto", last_event_id="0")
    c.wait_events(total, timeout=T(20))
    assert [int(e.id) for e in c.events] == list(range(1, total + 1))


def test_make_run_starts_in_wal_mode_with_source_wal_and_switches_back_without(clients):
    """`make run SOURCE=wal` (scripts/run.sh start): PostgreSQL with wal_level = logical, the
    database switched, nginx with event_piper_source wal: an event reaches a stream through the
    positioner. The next `make run` without SOURCE switches the database back to the trigger."""
    run = os.path.join(harness.make_tmp("make-run-wal"), "run")
    port, pgport = harness.free_port(), harness.free_port()
    run_sh = os.path.join(harness.REPO, "scripts", "run.sh")

    class Ngx:
        pass

    ngx = Ngx()
    ngx.port = port

    def start(source):
        env = dict(os.environ, EVENT_PIPER_RUN_DIR=run, PORT=str(port), PGPORT=str(pgport),
                   SOURCE=source)
        env.pop("EVENT_PIPER_PG_FAST", None)
        log = open(os.path.join(os.path.dirname(run), "run-%s.log" % source), "w+")
        proc = subprocess.Popen([run_sh, "start"], env=env, stdout=log, stderr=subprocess.STDOUT)
        def serving():
            if proc.poll() is not None:
                return True
            try:
                return http_get(port, "/manage/health").status == 200
            except OSError:
                return False

        wait_until(serving, T(60), what="make run to serve")
        assert proc.poll() is None, open(log.name).read()
        return proc, log

    def stop(proc, log):
        proc.terminate()
        assert proc.wait(T(30)) == 0, open(log.name).read()
        text = open(log.name).read()
        assert "[alert]" not in text and "[emerg]" not in text, text
        return text

    def psql(sql):
        r = subprocess.run([run_sh, "psql", "-X", "-q", "-At", "-c", sql],
                           env=dict(os.environ, EVENT_PIPER_RUN_DIR=run, PGPORT=str(pgport)),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert r.returncode == 0, r.stdout
        return r.stdout.strip()

    proc, log = start("wal")
    try:
        assert psql("SHOW wal_level") == "logical"
        assert psql("SELECT source FROM event_piper_wal_progress") == "wal"
        live = clients.stream(ngx, "toto")
        psql("insert into events (type, timestamp, subscriber, payload) "
             "values ('insert', now(), 'toto', '{\"foo\": \"bar\"}')")
        live.wait_events(1, timeout=T(10))
        assert live.events[0].raw == frame(1, "insert", '{"foo":"bar"}')
        assert json.loads(bytes(http_get(port, "/status").body))["source"] == "wal"
    finally:
        stop(proc, log)
    proc, log = start("trigger")
    try:
        assert psql("SELECT source FROM event_piper_wal_progress") == "trigger"
        assert psql("SELECT count(*) FROM pg_replication_slots") == "0"
        live = clients.stream(ngx, "toto", last_event_id="0")
        psql("insert into events (type, timestamp, subscriber, payload) "
             "values ('insert', now(), 'toto', '{\"n\": 2}')")
        live.wait_events(2, timeout=T(10))
        assert [int(e.id) for e in live.events] == [1, 2]
    finally:
        stop(proc, log)


def test_schema_upgrade_in_wal_mode_while_writers_insert_and_the_positioner_runs(
        db, nginx, clients):
    """The upgrade (schema.sql and wal.sql applied again, in one transaction, three times) on a
    database in wal mode, while writers insert (one to three rows per transaction, one in five
    rolled back) and nginx's positioner gives positions: the mode stays (the triggers disabled,
    the slot read), every committed row gets one position, in commit order, and the streams get
    each event once, live and in replay."""
    from test_schema_upgrade import Writers
    ngx = nginx.start(db)
    live = clients.stream(ngx, "w0")
    writers = Writers(db)
    try:
        wait_until(lambda: db.scalar("SELECT count(*) FROM event_positions") > 5, T(10),
                   what="positions from the positioner")
        for _ in range(3):
            r = subprocess.run(
                ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-h",
                 db.datadir, "-p", str(db.port), "-U", "event_piper", "-d", "event_piper", "-c",
                 "SET client_min_messages = warning", "-f",
                 os.path.join(harness.REPO, "postgresql", "schema.sql"), "-f",
                 os.path.join(harness.REPO, "postgresql", "wal.sql")],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert r.returncode == 0, r.stdout
            time.sleep(0.3)
    finally:
        writers.stop()
    assert writers.errors == []
    total = db.scalar("SELECT count(*) FROM events")
    assert total == writers.committed
    wait_until(lambda: db.scalar("SELECT count(*) FROM event_positions") >= total, T(20),
               what="every event positioned")
    rows = positions(db)
    assert len({r[1] for r in rows}) == total == len(rows), "an event lost or positioned twice"
    assert [r[0] for r in rows] == list(range(1, total + 1)), "positions skipped or repeated"
    assert db.scalar("SELECT source FROM event_piper_wal_progress") == "wal"
    assert {t for t, e in db.sql("SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = "
                                 "'events'::regclass AND NOT tgisinternal")
            if e != "D"} == {"events_id_unchanged"}
    assert db.scalar("SELECT count(*) FROM pg_replication_slots WHERE active") == 1
    mine = [r[0] for r in rows if r[2] == "w0"]
    live.wait_events(len(mine), timeout=T(20))
    assert [int(e.id) for e in live.events] == mine
    replay = clients.stream(ngx, "w1", last_event_id="0")
    theirs = [r[0] for r in rows if r[2] == "w1"]
    replay.wait_events(len(theirs), timeout=T(20))
    assert [int(e.id) for e in replay.events] == theirs
