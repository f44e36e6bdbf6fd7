"""Retention: event_piper_retain removes old events with their positions, in short batches; a
client resuming from below what was removed is told, once, with an `event: history-gone` frame
without an id, then gets everything kept, then goes live. Byte-exact, with the trigger (the
positioner's side is in test_wal_source.py); patched events stay whole while a patch of them is
kept (docs/patching.md).
"""

import threading

import psycopg2
import pytest

from harness import HEARTBEAT, T, frame
from test_patching import insert, patch_frame

NGINX_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
    {{ http }}
    server {
        listen 127.0.0.1:{{ port }}{{ listen_params }};
        location = /events {
            event_piper;
            event_piper_folded $arg_folded;
            {{ location }}
        }
    }
}
"""


def gone(last_event_id, removed_upto):
    return ('event: history-gone\ndata: {"last_event_id":%d,"removed_upto":%d}\n\n'
            % (last_event_id, removed_upto)).encode()


def body(c):
    return bytes(c.body).replace(HEARTBEAT, b"")


def horizon(db):
    return db.scalar("select pg_sequence_last_value('event_piper_removed_upto')")


def retain(db, older_than=None, upto=None, max_events=2):
    db.sql("CALL event_piper_retain(%s, %s, %s)", (older_than, upto, max_events))


def test_a_resume_from_below_what_was_removed_is_told_once_then_gets_what_is_kept(db, nginx,
                                                                                  clients):
    for _ in range(5):
        db.insert("toto")  # 1..5
        db.insert("bob")   # 2..10, even
    assert horizon(db) is None
    retain(db, upto=6)  # batches of 2 positions
    assert horizon(db) == 6
    assert db.positions("toto") == [7, 9]
    assert db.positions("bob") == [8, 10]
    assert db.scalar("select count(*) from events") == 4
    ngx = nginx.start(db)
    c = clients.stream(ngx, "toto", last_event_id="2", settle=0)
    c.wait_events(2, timeout=T(10))
    db.insert("toto")  # 11: live
    c.wait_events(3, timeout=T(10))
    c.read_for(0.3)
    assert body(c) == gone(2, 6) + frame(7) + frame(9) + frame(11)
    # Resuming from the last id it got, or from the horizon: nothing was removed above those.
    for last in ("9", "6"):
        again = clients.stream(ngx, "toto", last_event_id=last, settle=0)
        again.wait_events(1 if last == "9" else 2, timeout=T(10))
        again.read_for(0.3)
        assert body(again) == (b"" if last == "9" else frame(7) + frame(9)) + frame(11)
    # Nothing kept after the resume point of bob's client: told, then live.
    b = clients.stream(ngx, "bob", last_event_id="0", settle=0)
    b.wait_events(2, timeout=T(10))
    b.read_for(0.3)
    assert body(b) == gone(0, 6) + frame(8) + frame(10)
    # A stream without Last-Event-ID starts at the newest: nothing to tell.
    fresh = clients.stream(ngx, "toto", settle=0.5)
    db.insert("toto")
    fresh.wait_events(1, timeout=T(10))
    assert body(fresh) == frame(12)


def test_a_patched_event_stays_whole_while_a_patch_of_it_is_kept(db, nginx, clients):
    order = insert(db, "toto", '{"status": "paid"}')             # 1
    insert(db, "toto", '{"x": 1}', type="other")                 # 2
    insert(db, "toto", '{"status": "shipped"}', patches=order)   # 3
    insert(db, "toto", '{"x": 2}', type="other")                 # 4
    insert(db, "toto", '{"status": "delivered"}', patches=order)  # 5
    retain(db, upto=4)
    assert db.positions("toto") == [1, 3, 5]  # the order and its patches; 2 and 4 went
    ngx = nginx.start(db)
    full = clients.stream(ngx, "toto", last_event_id="0", settle=0)
    full.wait_events(3, timeout=T(10))
    full.read_for(0.3)
    assert body(full) == (gone(0, 4) + frame(1, "order", '{"status":"paid"}')
                          + patch_frame(3, 1, '{"status":"shipped"}')
                          + patch_frame(5, 1, '{"status":"delivered"}'))
    folded = clients.stream(ngx, "toto", last_event_id="2", settle=0, path="/events?folded=1")
    folded.wait_events(1, timeout=T(10))
    folded.read_for(0.3)
    assert body(folded) == (gone(2, 4)
                            + patch_frame(5, 1, '{"status":"delivered"}', member="state"))
    # Once the whole family is below the cut, it goes; a later run looks at it again.
    retain(db, upto=5)
    assert db.scalar("select count(*) from events") == 0
    assert db.scalar("select count(*) from event_positions") == 0
    assert horizon(db) == 5


def test_retention_by_commit_time_keeps_what_committed_after_it(db):
    for _ in range(3):
        db.insert("toto")  # 1..3
    t = db.scalar("select clock_timestamp()")
    for _ in range(3):
        db.insert("toto")  # 4..6
    retain(db, older_than=t)
    assert db.positions("toto") == [4, 5, 6]
    assert horizon(db) == 3
    retain(db, older_than=t)  # again: nothing more
    assert db.positions("toto") == [4, 5, 6]
    assert horizon(db) == 3


def test_history_gone_is_a_reserved_type(db):
    with pytest.raises(psycopg2.errors.CheckViolation):
        db.insert("toto", type="history-gone")


def test_a_batch_in_progress_holds_no_writer_and_no_stream(db, nginx, clients):
    for _ in range(4):
        db.insert("toto")  # 1..4
    ngx = nginx.start(db)
    live = clients.stream(ngx, "toto")
    conn = db.connect(autocommit=False)
    try:
        with conn.cursor() as cur:
            cur.execute("select * from event_piper_retain_batch(3, 0, 10)")
            assert cur.fetchone() == (3, 3)
            # Not committed yet: a writer and the commit order go on meanwhile.
            writer = db.connect()
            with writer.cursor() as w:
                w.execute("set lock_timeout = '2s'")
                w.execute("insert into events (type, timestamp, subscriber, payload) "
                          "values ('insert', now(), 'toto', '{\"foo\": \"bar\"}')")
            writer.close()
            live.wait_events(1, timeout=T(10))
            assert body(live) == frame(5)
        conn.commit()
    finally:
        conn.close()
    assert db.positions("toto") == [4, 5]


def test_a_patch_racing_the_removal_of_its_target_never_outlives_it(db):
    order = insert(db, "toto", '{"status": "paid"}')  # 1
    insert(db, "toto", '{"x": 1}', type="other")      # 2
    # A writer whose patch of event 1 is being committed holds it (FOR KEY SHARE): the removal
    # skips it, and the family stays whole.
    writer = db.connect(autocommit=False)
    with writer.cursor() as w:
        w.execute("insert into events (type, timestamp, subscriber, payload, patches) "
                  "values ('order', now(), 'toto', '{\"status\": \"shipped\"}', %s)", (order,))
        w.execute("set constraints events_commit_notify immediate")  # its commit-time work now
        assert db.scalar("select removed from event_piper_retain_batch(2, 0, 10)") == 1
    writer.commit()
    writer.close()
    assert db.positions("toto") == [1, 3]
    # A removal in progress holds the target: a patch of it waits, then is refused.
    remover = db.connect(autocommit=False)
    with remover.cursor() as r:
        r.execute("select removed from event_piper_retain_batch(3, 0, 10)")
        assert r.fetchone() == (2,)
        result = {}

        def patch():
            conn = db.connect()
            try:
                with conn.cursor() as c:
                    c.execute("insert into events (type, timestamp, subscriber, payload, patches) "
                              "values ('order', now(), 'toto', '{\"a\": 1}', %s)", (order,))
            except psycopg2.Error as e:
                result["error"] = str(e)
            finally:
                conn.close()

        t = threading.Thread(target=patch)
        t.start()
        t.join(0.5)
        assert t.is_alive(), "the patch did not wait for the removal of its target"
        remover.commit()
        t.join(T(10))
    remover.close()
    assert "which does not exist" in result.get("error", ""), result
    assert db.scalar("select count(*) from events") == 0
