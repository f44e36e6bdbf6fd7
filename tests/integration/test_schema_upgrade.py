"""Issue 11, points 3 and 4: moving a database to postgresql/schema.sql keeps every position;
and the once-per-transaction trigger with transactions larger than one id list.

- A database with the schema before issue 11 (tests/integration/schema_before_issue11.sql: one
  advisory lock and one UPDATE per row), rows whose positions differ from their ids, gets
  schema.sql applied in one transaction while writers insert: no existing position changes, and
  every row committed meanwhile gets a new, larger one.
- The original service's table (no positions yet, ids with gaps): its rows get position = id,
  new positions continue above the largest id it handed out, and a client of the original that
  resumes with `Last-Event-ID: <events.id>` gets exactly the rows after it.

Each test works in a database of its own on the shared cluster, created and dropped by the test.
"""

import os
import subprocess
import threading
import time

from harness import HEARTBEAT, EventPiperTestCase, Nginx, PgError, T, compact_json, frame, lit

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA = os.path.join(HERE, "..", "..", "postgresql", "schema.sql")
SCHEMA_BEFORE = os.path.join(HERE, "schema_before_issue11.sql")

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


class Database:
    """A database of its own on the shared cluster, owned by event_piper."""

    def __init__(self, pg, name):
        self.pg, self.name = pg, name
        pg.superuser_sql("drop database if exists %s" % name)
        pg.superuser_sql("create database %s owner event_piper" % name)
        self.conn = self.connect()

    @property
    def conninfo(self):  # for harness.Nginx
        return self.pg.conninfo.replace("dbname=event_piper", "dbname=" + self.name)

    def connect(self):
        return self.pg.connect(database=self.name)

    def wait_listening(self, workers, timeout):  # for harness.Nginx
        self.pg.wait_listening(workers, timeout=timeout)

    def sql(self, query):
        return self.conn.query(query)

    def apply(self, path):
        """psql --single-transaction -f path, the documented way to apply schema.sql."""
        r = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction",
                            "-h", self.pg.datadir, "-p", str(self.pg.port), "-U", "event_piper",
                            "-d", self.name, "-c", "SET client_min_messages = warning",
                            "-f", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
        assert r.returncode == 0, r.stdout

    def drop(self):
        self.conn.close()
        self.pg.superuser_sql("select pg_terminate_backend(pid) from pg_stat_activity "
                              "where datname = '%s' and pid <> pg_backend_pid()" % self.name)
        self.pg.superuser_sql("drop database if exists %s" % self.name)


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
        conn = self.db.connect()
        try:
            k = 0
            while not self._stop.is_set():
                k += 1
                rows = 1 + k % 3
                conn.query("begin")
                for i in range(rows):
                    conn.query(INSERT % (lit("w%d" % n), lit('{"k": %d, "i": %d}' % (k, i))))
                if k % 5 == 0:
                    conn.query("rollback")
                else:
                    conn.query("commit")
                    self.committed += rows
        except Exception as e:
            self.errors.append(e)
        finally:
            conn.close()

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join()


class SchemaUpgrade(EventPiperTestCase):

    def database(self, name):
        db = Database(self.pg, name)
        self.addCleanup(db.drop)
        return db

    def test_todays_schema_upgraded_while_writers_insert_keeps_every_position(self):
        db = self.database("upgrade_from_before_issue11")
        db.apply(SCHEMA_BEFORE)
        # Positions that differ from ids: A takes id 2 and commits after B (id 3), and a gap.
        a, b = db.connect(), db.connect()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        b.query(INSERT % (lit("toto"), lit('{"n": 1}')))
        a.query("begin")
        a.query(INSERT % (lit("toto"), lit('{"n": 2}')))
        b.query(INSERT % (lit("toto"), lit('{"n": 3}')))
        a.query("commit")
        b.query("begin")
        b.query(INSERT % (lit("toto"), lit('{"n": "rolled back"}')))
        b.query("rollback")
        b.query(INSERT % (lit("toto"), lit('{"n": 5}')))
        before = db.sql("select id, position from events order by id")
        self.assertEqual(before, [("1", "1"), ("2", "3"), ("3", "2"), ("5", "4")])

        writers = Writers(db)
        time.sleep(0.3)
        for _ in range(3):
            db.apply(SCHEMA)
            time.sleep(0.2)
        writers.stop()
        self.assertEqual(writers.errors, [])

        self.assertEqual(db.sql("select id, position from events where id <= 5 order by id"),
                         before, "positions of rows committed before the upgrade")
        total, positioned, distinct, lowest_new = db.sql(
            "select count(*), count(position), count(distinct position), "
            "min(position) filter (where id > 5) from events")[0]
        self.assertEqual(int(total), 4 + writers.committed)
        self.assertEqual((positioned, distinct), (total, total), "every row has its own position")
        self.assertGreater(int(lowest_new), 4, "new positions continue above the old ones")
        self.assertIn("event_piper_note_insert", db.sql(
            "select pg_get_triggerdef(oid) from pg_trigger "
            "where tgname = 'events_commit_notify'")[0][0])
        self.assertEqual(db.sql("select event_piper_unpositioned_count()"), [("0",)])

    def test_the_original_services_rows_keep_their_ids_and_its_clients_resume(self):
        db = self.database("migrate_from_original")
        db.sql(ORIGINAL_SCHEMA)
        for n in range(1, 11):
            db.sql(INSERT % (lit("toto"), lit('{"n": %d}' % n)))
        db.sql("delete from events where id in (3, 4, 7)")  # gaps in the ids
        db.sql("begin")
        db.sql(INSERT % (lit("toto"), lit('{"n": "rolled back"}')))  # takes id 11
        db.sql("rollback")

        db.apply(SCHEMA)
        self.assertEqual(db.sql("select id, position from events order by id"),
                         [(str(i), str(i)) for i in (1, 2, 5, 6, 8, 9, 10)])
        db.sql(INSERT % (lit("toto"), lit('{"n": "after"}')))
        self.assertEqual(db.sql("select id, position from events where id > 10"),
                         [("12", "12")], "new positions continue above the largest id handed out")

        # A client of the original service that last saw events.id 5.
        ngx = Nginx(self.tmp, pg=db)
        self._nginxes.append(ngx)
        self.addCleanup(self._finish_nginx, ngx)
        ngx.start()
        c = self.stream(ngx, "toto", last_event_id="5", settle=0)
        c.wait_events(5, timeout=T(15))
        c.read_for(0.3)
        expected = b"".join(frame(int(i), data=compact_json(p)) for i, p in db.sql(
            "select id, payload::text from events where id > 5 order by id"))
        self.assertEqual(bytes(c.body).replace(HEARTBEAT, b""), expected)
        self.assertEqual(c.event_ids(), [6, 8, 9, 10, 12])


class OncePerTransaction(EventPiperTestCase):

    def test_a_large_transaction_gets_one_range_of_positions_in_id_order_and_arrives_live(self):
        ngx = self.start_nginx()
        c = self.stream(ngx, "big", settle=0)
        w = self.pg.connect()
        self.addCleanup(w.close)
        many = ("insert into events (type, timestamp, subscriber, payload) "
                "select 'insert', now(), 'big', jsonb_build_object('n', g) "
                "from generate_series(%d, %d) as g")
        # 900 rows in 3 statements (the trigger notes ids in lists of about 250), 300 rolled
        # back to a savepoint, then one more: ids 1-900 and 1201, positions 1-901.
        w.query("begin")
        for start in (1, 301, 601):
            w.query(many % (start, start + 299))
        w.query("savepoint s")
        w.query(many % (901, 1200))
        w.query("rollback to savepoint s")
        w.query(INSERT % (lit("big"), lit('{"n": "last"}')))
        w.query("commit")
        rows = self.pg.sql("select id, position, payload::text from events order by id")
        self.assertEqual([(int(i), int(p)) for i, p, _ in rows],
                         [(n, n) for n in range(1, 901)] + [(1201, 901)])
        c.wait_events(901, timeout=T(30))
        c.read_for(0.3)
        self.assertEqual(bytes(c.body).replace(HEARTBEAT, b""),
                         b"".join(frame(int(p), data=compact_json(d)) for _, p, d in rows))

    def test_events_inserted_after_set_constraints_immediate_are_refused(self):
        w = self.pg.connect()
        self.addCleanup(w.close)
        w.query("begin")
        w.query(INSERT % (lit("toto"), lit('{"n": 1}')))
        w.query("set constraints all immediate")  # positions this transaction's rows now
        with self.assertRaises(PgError) as e:
            w.query(INSERT % (lit("toto"), lit('{"n": 2}')))
        self.assertIn("SET CONSTRAINTS ... IMMEDIATE", str(e.exception))
        w.query("commit")  # answers ROLLBACK
        self.assertEqual(self.pg.sql("select count(*) from events"), [("0",)])
        self.pg.insert("toto")  # the next writer is not held back
        self.assertEqual(self.pg.sql("select count(*) from events where position is not null"),
                         [("1",)])
