"""Moving a database to postgresql/schema.sql keeps every position; and the once-per-transaction
trigger with transactions larger than one id list.

- A database with the schema before event_positions (tests/integration/schema_update_per_row.sql:
  one advisory lock and one UPDATE per row), or with positions still in events.position
  (schema_positions_in_events.sql), rows whose positions
  differ from their ids, gets
  schema.sql applied in one transaction while writers insert: no existing position changes, and
  every row committed meanwhile gets a new, larger one.
- The original service's table (no positions yet, ids with gaps): its rows get position = id,
  new positions continue above the largest id it handed out, and a client of the original that
  resumes with `Last-Event-ID: <events.id>` gets exactly the rows after it.

- This module started against a database still on the previous schema: it says why it cannot
  read, health is DOWN, nothing is delivered, and a resuming client gets exactly the rest once
  schema.sql is applied.

The upgrade tests work in databases of their own on the run's cluster, created and dropped here.
"""

import os
import subprocess
import sys
import threading
import time

import psycopg2
import pytest

import harness
from harness import HEARTBEAT, T, compact_json, frame, wait_until

sys.path.append(os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                              "chaos")))
from piper_chaos import http_get  # noqa: E402

NGINX_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
    server {
        listen 127.0.0.1:{{ port }};
        location = /events { event_piper; }
        location = /status { event_piper_status; }
        location = /manage/health { event_piper_health; }
    }
}
"""

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA = os.path.join(HERE, "..", "..", "postgresql", "schema.sql")
SCHEMA_BEFORE = os.path.join(HERE, "schema_update_per_row.sql")
SCHEMA_POSITIONS_IN_EVENTS = os.path.join(HERE, "schema_positions_in_events.sql")

ORIGINAL_SCHEMA = """
CREATE TABLE events (
    id         BIGSERIAL PRIMARY KEY,
    type       varchar   NOT NULL,
    timestamp  timestamp NOT NULL,
    subscriber varchar   NOT NULL,
    payload    jsonb     NOT NULL
);
CREATE INDEX events_subscriber_idx ON events (subscriber);
CREATE FUNCTION notify_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('new_events', row_to_json(NEW)::text);
    RETURN NULL;
END;
$$;
CREATE TRIGGER events_notify AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION notify_event();
"""

INSERT = ("insert into events (type, timestamp, subscriber, payload) "
          "values ('insert', now(), %s, %s)")


class Database(harness.Postgres):
    """A database of its own on the run's cluster, owned by event_piper; `conninfo` and
    `connect()` name it, so harness.Nginx and the helpers of harness.Postgres work on it."""

    def __init__(self, pg, name):
        super().__init__(pg.datadir, pg.port)
        self.cluster, self.name, self.running = pg, name, True
        pg.superuser_sql("drop database if exists %s" % name)  # names: constants of this file
        pg.superuser_sql("create database %s owner event_piper" % name)

    @property
    def conninfo(self):
        return self.cluster.conninfo.replace("dbname=event_piper", "dbname=" + self.name)

    def connect(self, database=None, **kw):
        return super().connect(database=database or self.name, **kw)

    def apply(self, path, single_transaction=True):
        """psql --single-transaction -f path, the documented way to apply schema.sql (without
        --single-transaction: how docker-entrypoint-initdb.d applies it)."""
        r = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1"] +
                           (["--single-transaction"] if single_transaction else []) + [
                            "-h", self.datadir, "-p", str(self.port), "-U", "event_piper",
                            "-d", self.name, "-c", "SET client_min_messages = warning",
                            "-f", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
        assert r.returncode == 0, r.stdout

    def drop(self):
        if self._conn is not None:
            self._conn.close()
        self.cluster.superuser_sql("select pg_terminate_backend(pid) from pg_stat_activity "
                                   "where datname = %s", (self.name,))
        self.cluster.superuser_sql("drop database if exists %s" % self.name)


@pytest.fixture
def database(pg, request):
    made = []

    def make(name):
        made.append(Database(pg, name))
        return made[-1]
    yield make
    for d in made:
        d.drop()


class Writers:
    """Threads that insert one to three events per transaction (one in five rolled back) until
    stopped; `committed` counts the rows committed."""

    def __init__(self, db, count=3):
        self.db, self.committed, self.errors = db, 0, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                         for n in range(count)]
        for t in self._threads:
            t.start()

    def _run(self, n):
        conn = self.db.connect(autocommit=False)
        try:
            k = 0
            while not self._stop.is_set():
                k += 1
                rows = 1 + k % 3
                with conn.cursor() as cur:
                    for i in range(rows):
                        cur.execute(INSERT, ("w%d" % n, '{"k": %d, "i": %d}' % (k, i)))
                if k % 5 == 0:
                    conn.rollback()
                else:
                    conn.commit()
                    self.committed += rows
        except Exception as e:
            self.errors.append(e)
        finally:
            conn.close()

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join()


@pytest.mark.parametrize("name,before_schema", [
    ("upgrade_from_update_per_row", SCHEMA_BEFORE),
    ("upgrade_from_positions_in_events", SCHEMA_POSITIONS_IN_EVENTS)])
def test_todays_schema_upgraded_while_writers_insert_keeps_every_position(
        database, name, before_schema):
    db = database(name)
    db.apply(before_schema)
    # Positions that differ from ids: A takes id 2 and commits after B (id 3), and a gap.
    a, b = db.connect(autocommit=False), db.connect()
    try:
        db.run(b, INSERT, ("toto", '{"n": 1}'))
        db.run(a, INSERT, ("toto", '{"n": 2}'))
        db.run(b, INSERT, ("toto", '{"n": 3}'))
        a.commit()
        b.autocommit = False
        db.run(b, INSERT, ("toto", '{"n": "rolled back"}'))
        b.rollback()
        b.autocommit = True
        db.run(b, INSERT, ("toto", '{"n": 5}'))
    finally:
        a.close()
        b.close()
    before = db.sql("select id, position from events order by id")  # where they were
    assert before == [(1, 1), (2, 3), (3, 2), (5, 4)]

    writers = Writers(db)
    time.sleep(0.3)
    for _ in range(3):
        db.apply(SCHEMA)
        time.sleep(0.2)
    writers.stop()
    assert writers.errors == []

    assert db.sql("select id, position from event_log where id <= 5 order by id") == before, \
        "positions of rows committed before the upgrade"
    total, positioned, distinct, lowest_new = db.sql(
        "select count(*), count(position), count(distinct position), "
        "min(position) filter (where id > 5) from event_log")[0]
    assert total == 4 + writers.committed
    assert (positioned, distinct) == (total, total), "every row has its own position"
    assert lowest_new > 4, "new positions continue above the old ones"
    assert "event_piper_note_insert" in db.scalar(
        "select pg_get_triggerdef(oid) from pg_trigger where tgname = 'events_commit_notify'")
    assert db.scalar("select count(*) from pg_attribute where attrelid = 'events'::regclass "
                     "and attname = 'position' and not attisdropped") == 0, \
        "positions live in event_positions only"
    assert db.scalar("select event_piper_unpositioned_count()") == 0


TRIGGER_FUNCTIONS = ("events_commit_notify", "event_piper_events_updated",
                     "event_piper_events_deleted", "event_piper_events_truncated")


def test_the_writers_rules_reach_a_database_of_the_previous_schema_while_writers_insert(
        database):
    """The previous schema, as far as the writers' rules go: trigger functions that run as the
    writer, no type check, no id trigger; and a row of a type now refused. schema.sql applied
    while writers insert gives them all; the stored row stays."""
    db = database("upgrade_writers_rules")
    db.apply(SCHEMA)
    db.sql("alter table events drop constraint events_type_not_reserved; "
           "drop trigger events_id_unchanged on events; " + "".join(
               "alter function %s() security invoker reset search_path; " % f
               for f in TRIGGER_FUNCTIONS))
    db.sql(INSERT.replace("'insert'", "'heartbeat'"), ("old", '{"stored": true}'))
    writers = Writers(db)
    time.sleep(0.3)
    for _ in range(2):
        db.apply(SCHEMA)
        time.sleep(0.2)
    writers.stop()
    assert writers.errors == []
    assert db.scalar("select event_piper_unpositioned_count()") == 0
    assert db.sql("select proname, prosecdef, proconfig from pg_proc where proname = any(%s) "
                  "order by proname", (list(TRIGGER_FUNCTIONS),)) == [
        (f, True, ["search_path=public, pg_temp"]) for f in sorted(TRIGGER_FUNCTIONS)]
    assert db.scalar("select convalidated from pg_constraint "
                     "where conname = 'events_type_not_reserved'") is False
    assert db.sql("select type, subscriber from event_log where position = 1") == [
        ("heartbeat", "old")]
    # A writer with the documented grants only.
    db.cluster.superuser_sql(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'piper_writer_up') "
        "THEN CREATE ROLE piper_writer_up LOGIN; END IF; END $$")
    db.sql("grant insert on events to piper_writer_up; "
           "grant usage on sequence events_id_seq to piper_writer_up")
    w = db.connect(user="piper_writer_up")
    try:
        db.run(w, "insert into events (type, timestamp, subscriber, payload) values "
                  "('insert', now(), 'new', '{}'), ('insert', now(), 'new', '{}')")
    finally:
        w.close()
    assert len(db.positions("new")) == 2
    with pytest.raises(psycopg2.Error):
        db.sql("update events set id = id + 1000 where subscriber = 'new'")


def test_the_original_services_rows_keep_their_ids_and_its_clients_resume(
        database, nginx, clients):
    db = database("migrate_from_original")
    db.sql(ORIGINAL_SCHEMA)
    for n in range(1, 11):
        db.sql(INSERT, ("toto", '{"n": %d}' % n))
    db.sql("delete from events where id in (3, 4, 7)")  # gaps in the ids
    conn = db.connect(autocommit=False)
    db.run(conn, INSERT, ("toto", '{"n": "rolled back"}'))  # takes id 11
    conn.rollback()
    conn.close()

    db.apply(SCHEMA)
    assert db.sql("select id, position from event_log order by id") == \
        [(i, i) for i in (1, 2, 5, 6, 8, 9, 10)]
    db.sql(INSERT, ("toto", '{"n": "after"}'))
    assert db.sql("select id, position from event_log where id > 10") == [(12, 12)], \
        "new positions continue above the largest id handed out"

    # A client of the original service that last saw events.id 5.
    ngx = nginx.start(db)
    c = clients.stream(ngx, "toto", last_event_id="5", settle=0)
    c.wait_events(5, timeout=T(15))
    c.read_for(0.3)
    expected = b"".join(frame(i, data=compact_json(p)) for i, p in db.sql(
        "select id, payload::text from events where id > 5 order by id"))
    assert bytes(c.body).replace(HEARTBEAT, b"") == expected
    assert c.event_ids() == [6, 8, 9, 10, 12]


def test_a_large_transaction_gets_one_range_of_positions_in_id_order_and_arrives_live(
        db, nginx, clients):
    ngx = nginx.start(db)
    c = clients.stream(ngx, "big", settle=0)
    many = ("insert into events (type, timestamp, subscriber, payload) "
            "select 'insert', now(), 'big', jsonb_build_object('n', g) "
            "from generate_series(%s, %s) as g")
    # 900 rows in 3 statements (the trigger notes ids in lists of about 250), 300 rolled back to
    # a savepoint, then one more: ids 1-900 and 1201, positions 1-901.
    w = db.connect(autocommit=False)
    try:
        for start in (1, 301, 601):
            db.run(w, many, (start, start + 299))
        db.run(w, "savepoint s")
        db.run(w, many, (901, 1200))
        db.run(w, "rollback to savepoint s")
        db.run(w, INSERT, ("big", '{"n": "last"}'))
        w.commit()
    finally:
        w.close()
    rows = db.sql("select id, position, payload::text from event_log order by id")
    assert [(i, p) for i, p, _ in rows] == [(n, n) for n in range(1, 901)] + [(1201, 901)]
    c.wait_events(901, timeout=T(30))
    c.read_for(0.3)
    assert bytes(c.body).replace(HEARTBEAT, b"") == \
        b"".join(frame(p, data=compact_json(d)) for _, p, d in rows)


def test_events_inserted_after_set_constraints_immediate_are_refused(db):
    w = db.connect(autocommit=False)
    try:
        db.run(w, INSERT, ("toto", '{"n": 1}'))
        db.run(w, "set constraints all immediate")  # positions this transaction's rows now
        with pytest.raises(psycopg2.Error, match=r"SET CONSTRAINTS \.\.\. IMMEDIATE"):
            db.run(w, INSERT, ("toto", '{"n": 2}'))
        w.rollback()
    finally:
        w.close()
    assert db.scalar("select count(*) from events") == 0
    db.insert("toto")  # the next writer is not held back
    assert db.scalar("select count(*) from event_log where position is not null") == 1


def test_events_of_a_transaction_checked_early_cannot_be_changed_or_deleted_in_it(
        db, nginx, clients):
    """Found by an attack: after SET CONSTRAINTS ALL IMMEDIATE the transaction's notifications
    are queued as the rows were then; an UPDATE of the subscriber delivered bob's event to
    alice at commit, a DELETE delivered an event that was never committed. Both are refused now
    (and TRUNCATE); older events can still be changed in such a transaction."""
    ngx = nginx.start(db)
    alice, bob = clients.stream(ngx, "alice"), clients.stream(ngx, "bob")
    db.insert("old", '{"n": 0}')
    for change in ("update events set subscriber = 'bob' where subscriber = 'alice'",
                   "update events set payload = '{\"n\": 2}' where subscriber = 'alice'",
                   "delete from events where subscriber = 'alice'",
                   "truncate events"):
        w = db.connect(autocommit=False)
        try:
            db.run(w, INSERT, ("alice", '{"secret": "for bob"}'))
            db.run(w, "set constraints all immediate")
            with pytest.raises(psycopg2.Error, match=r"already notified"):
                db.run(w, change)
            w.rollback()
        finally:
            w.close()
    # Changing an event of an earlier transaction is not refused.
    w = db.connect(autocommit=False)
    try:
        db.run(w, INSERT, ("alice", '{"n": 1}'))
        db.run(w, "set constraints all immediate")
        db.run(w, "update events set subscriber = 'bob' where subscriber = 'old'")
        w.commit()
    finally:
        w.close()
    db.insert("bob", '{"n": 3}')
    alice.wait_events(1)
    bob.wait_events(1)
    alice.read_for(0.5)
    bob.read_for(0.1)
    # The refused transactions' positions are gaps. "old" became bob's after it was delivered
    # (to nobody): a later stream of bob's would replay it, a live one does not get it again.
    pos = dict(db.sql("select payload::text, position from event_log"))
    assert [e.raw for e in alice.events] == [frame(pos['{"n": 1}'], data='{"n":1}')]
    assert [e.raw for e in bob.events] == [frame(pos['{"n": 3}'], data='{"n":3}')]


def test_the_module_upgraded_before_the_schema_waits_for_it_and_loses_nothing(
        database, nginx, clients):
    """This module reads positions from event_positions. Against a database still on the previous
    schema (positions in events.position) its listener cannot read the newest position: the
    error log says why, health is DOWN and nothing is delivered; once schema.sql is applied, a
    client that resumes with the Last-Event-ID it holds gets exactly the rest, then live."""
    db = database("module_before_schema")
    db.apply(SCHEMA_POSITIONS_IN_EVENTS)
    for n in range(1, 6):
        db.sql(INSERT, ("toto", '{"n": %d}' % n))
    ngx = nginx.start(db, wait_listening=False)  # it listens, then fails to read the newest
    ngx.wait_log('relation "event_positions" does not exist', 1, T(10))
    assert http_get(ngx.port, "/manage/health").status == 503
    early = clients.stream(ngx, "toto", last_event_id="2", settle=0)
    early.read_for(1.0)
    assert early.events == [], "nothing is delivered while positions cannot be read"
    early.close()
    db.apply(SCHEMA)
    # Like EventSource, the client comes back with the Last-Event-ID it holds.
    c = clients.stream(ngx, "toto", last_event_id="2", settle=0)
    c.wait_events(3, timeout=T(20))
    wait_until(lambda: http_get(ngx.port, "/manage/health").status == 200, T(15),
               what="health UP once the listener reads event_positions")
    db.sql(INSERT, ("toto", '{"n": 6}'))
    c.wait_events(4, timeout=T(10))
    c.read_for(0.3)
    assert c.event_ids() == [3, 4, 5, 6]
    expected = b"".join(frame(p, data=compact_json(d)) for p, d in db.sql(
        "select position, payload::text from event_log where position > 2 order by position"))
    assert bytes(c.body).replace(HEARTBEAT, b"") == expected


def test_schema_sql_applied_without_single_transaction_keeps_the_original_services_ids(database):
    """docker-entrypoint-initdb.d and hand-run `psql -f` apply schema.sql statement by statement:
    it must still work there (a bare LOCK TABLE was an error), and an original service's table
    must still keep its ids as positions (what the schema found before creating anything was a
    transaction-local setting, gone after its own statement)."""
    db = database("migrate_without_single_transaction")
    db.sql(ORIGINAL_SCHEMA)
    for n in range(1, 6):
        db.sql(INSERT, ("toto", '{"n": %d}' % n))
    db.sql("delete from events where id = 2")
    db.apply(SCHEMA, single_transaction=False)
    db.apply(SCHEMA, single_transaction=False)  # and again
    db.sql(INSERT, ("toto", '{"n": "after"}'))
    assert db.sql("select id, position from event_log order by id") == \
        [(1, 1), (3, 3), (4, 4), (5, 5), (6, 6)]


# The schema before patches is the previous release's (no events.patches, no
# event_positions.target), which test_upgrade_order.py keeps too.
SCHEMA_BEFORE_PATCHES = os.path.join(HERE, "schema_c28232f.sql")
FOLDED_CONF = NGINX_CONF.replace("location = /events { event_piper; }",
                                 "location = /events { event_piper; "
                                 "event_piper_folded $arg_folded; }")


def test_the_module_against_the_schema_before_patches_then_upgraded(database, nginx, clients):
    """The schema before patches (no events.patches, no event_positions.target, no merge
    functions): full and folded streams both get the plain history (folded replay falls back
    to it, and says so once). Once schema.sql is applied under the running module, a patch is
    delivered live and in replay with its target, also on replay connections opened before."""
    db = database("before_patches")
    db.apply(SCHEMA_BEFORE_PATCHES)
    for n in range(1, 4):
        db.sql(INSERT, ("toto", '{"n": %d}' % n))
    plain = b"".join(frame(n, data='{"n":%d}' % n) for n in range(1, 4))
    ngx = nginx.start(db, conf=FOLDED_CONF)
    full = clients.stream(ngx, "toto", last_event_id="0", settle=0)
    folded = clients.stream(ngx, "toto", last_event_id="0", settle=0, path="/events?folded=1")
    for c in (full, folded):
        c.wait_events(3, timeout=T(10))
        c.read_for(0.3)
        assert bytes(c.body).replace(HEARTBEAT, b"") == plain
    ngx.wait_log("folded replay asked for, but the database has no event_piper_state()")
    db.apply(SCHEMA)
    db.sql("insert into events (type, timestamp, subscriber, payload, patches) "
           "values ('insert', now(), 'toto', '{\"n\": null}', 1)")
    patch = b'id: 4\nevent: patch\ndata: {"target":1,"type":"insert","patch":{"n":null}}\n\n'
    full.wait_events(4, timeout=T(10))
    assert bytes(full.body).replace(HEARTBEAT, b"") == plain + patch
    again = clients.stream(ngx, "toto", last_event_id="3", settle=0)
    again.wait_events(1, timeout=T(10))
    again.read_for(0.3)
    assert bytes(again.body).replace(HEARTBEAT, b"") == patch
