"""event_piper_source wal, the database side (postgresql/wal.sql, docs/wal-source.md).

A cluster with wal_level = logical (scripts/pgctl.sh with EVENT_PIPER_PG_LOGICAL=1). The
positioner here is a small Python stand-in that follows the module's rules through SQL: it reads
the slot with pg_logical_slot_peek_binary_changes (pgoutput, protocol 1, the module's options),
writes with event_piper_wal_apply, and moves the slot (pg_replication_slot_advance) only after
its write committed. With it:

- switching a database to wal and back, twice, while writers insert (with rollbacks and
  multi-row transactions): every committed event has exactly one position, no position is
  handed out twice, none that existed before a switch changes; the switch back once with a
  positioner that catches up, once without one (the rows left get positions in id order);
- in wal mode the writers' triggers are disabled, and schema.sql applied again keeps them so and
  positions nothing itself;
- a positioner whose progress is stale is fenced.

No nginx here: the module's positioner (the nginx adapter) is not built yet.
"""

import os
import random
import struct
import subprocess
import threading
import time

import psycopg2
import pytest

import harness

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA = os.path.join(HERE, "..", "..", "postgresql", "schema.sql")

PEEK = ("SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes('event_piper', NULL, "
        "NULL, 'proto_version', '1', 'publication_names', 'event_piper_events', "
        "'messages', 'true')")

APPLY = ("SELECT event_piper_wal_apply(%s::pg_lsn, %s::pg_lsn, %s, %s::bigint[], %s::bigint[], "
         "%s::text[], %s::bigint[], %s::text[], %s::bigint[], %s::text[], %s::bigint[], %s, %s, "
         "%s)")


@pytest.fixture(scope="module")
def wal_pg():
    cluster = harness.Postgres(os.path.join(harness.make_tmp("pg-wal"), "pg"), harness.free_port())
    cluster.logical = True  # wal_level = logical, also after a restart
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def wal_db(wal_pg):
    if wal_pg.scalar("SELECT source FROM event_piper_wal_progress") == "wal":
        wal_pg.superuser_sql("SELECT event_piper_set_source('trigger', 0)")
    wal_pg.sql("TRUNCATE event_positions RESTART IDENTITY; TRUNCATE events RESTART IDENTITY")
    wal_pg.sql("UPDATE event_piper_wal_progress SET lsn = NULL, last_position = 0")
    return wal_pg


def lsn_int(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def lsn_text(value):
    return "%X/%X" % (value >> 32, value & 0xFFFFFFFF)


def parse_tuple(data, pos):
    (n,) = struct.unpack_from(">H", data, pos)
    pos += 2
    cols = []
    for _ in range(n):
        kind = chr(data[pos])
        pos += 1
        if kind == "t":
            (length,) = struct.unpack_from(">I", data, pos)
            pos += 4
            cols.append(bytes(data[pos:pos + length]).decode())
            pos += length
        else:
            cols.append(None)
    return cols, pos


def decode(data):
    """The fields of one pgoutput message the stand-in needs."""
    data = bytes(data)
    kind = chr(data[0])
    if kind == "B":
        final_lsn, commit_time, _xid = struct.unpack_from(">QqI", data, 1)
        return kind, {"final_lsn": final_lsn, "commit_time": commit_time}
    if kind == "C":
        _flags, _commit, end_lsn, _time = struct.unpack_from(">BQQq", data, 1)
        return kind, {"end_lsn": end_lsn}
    if kind == "I":
        cols, _ = parse_tuple(data, 6)
        return kind, {"id": int(cols[0]), "subscriber": cols[3]}
    if kind == "M":
        flags = data[1]
        end = data.index(b"\0", 10)
        prefix = data[10:end].decode()
        (length,) = struct.unpack_from(">I", data, end + 1)
        content = data[end + 5:end + 5 + length].decode()
        return kind, {"transactional": bool(flags & 1), "prefix": prefix, "content": content}
    return kind, {}


class StandIn:
    """The positioner's rules, in Python, one step at a time."""

    def __init__(self, pg):
        self.conn = pg.connect()
        self.written = 0

    def step(self):
        run = harness.Postgres.run
        source, stored, last = run(self.conn, "SELECT source, lsn::text, last_position "
                                              "FROM event_piper_wal_progress WHERE id = 1")[0]
        if source != "wal":
            return
        flushed = run(self.conn, "SELECT pg_current_wal_flush_lsn()::text")[0][0]
        try:
            changes = run(self.conn, PEEK)
        except psycopg2.Error:
            return  # the slot was dropped by a switch back to the trigger
        awaiting = stored is None
        stored = lsn_int(stored) if stored else 0
        rows, end, skip, txn, stop = [], None, False, [], False
        for _lsn, data in changes:
            kind, m = decode(data)
            if kind == "B":
                skip = awaiting or m["final_lsn"] < stored
                txn, commit_time, switch = [], m["commit_time"], None
            elif kind == "I" and not skip:
                txn.append((m["id"], m["subscriber"], commit_time))
            elif kind == "M" and m["transactional"] and m["prefix"] == "event_piper":
                switch = m["content"]
            elif kind == "C":
                if switch == "source trigger" and not skip:
                    stop = True
                    break
                if skip and not (awaiting and switch == "source wal"):
                    continue
                awaiting = False
                for event_id, subscriber, when in txn:
                    last += 1
                    rows.append((last, event_id, subscriber, when))
                end = m["end_lsn"]
        if end is not None:
            try:
                run(self.conn, APPLY, (lsn_text(stored) if stored else None, lsn_text(end), last,
                                       [r[0] for r in rows], [r[1] for r in rows],
                                       [r[2] for r in rows], [r[3] for r in rows], [], [], [], [],
                                       False, "stand-in", "new_events"))
            except psycopg2.Error as e:
                assert "fenced" in str(e), e
                return
            self.written += len(rows)
        if not stop:
            # Confirm only what is committed: everything decoded up to the flush point read
            # before the peek is handled now.
            target = flushed if end is None or lsn_int(flushed) > end else lsn_text(end)
            try:
                run(self.conn, "SELECT pg_replication_slot_advance('event_piper', %s::pg_lsn)",
                    (target,))
            except psycopg2.Error:
                pass


class Writers:
    """Threads inserting with the original's statement: single and multi-row transactions,
    some rolled back, commits out of id order."""

    def __init__(self, pg, count=4):
        self.pg, self.stop, self.threads = pg, threading.Event(), []
        self.errors = []
        for i in range(count):
            t = threading.Thread(target=self.run, args=(i,), daemon=True)
            self.threads.append(t)
            t.start()

    def run(self, i):
        rnd = random.Random(i)
        conn = self.pg.connect(autocommit=False)
        try:
            while not self.stop.is_set():
                with conn.cursor() as cur:
                    for _ in range(rnd.choice([1, 1, 3, 10])):
                        cur.execute("insert into events (type, timestamp, subscriber, payload) "
                                    "values ('insert', now(), %s, '{}')", ("s%d" % i,))
                    time.sleep(rnd.random() * 0.005)
                if rnd.random() < 0.1:
                    conn.rollback()
                else:
                    conn.commit()
        except Exception as e:  # noqa: BLE001 - reported by finish()
            self.errors.append(e)
        finally:
            conn.close()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not self.errors, self.errors


def positions_by_event(pg):
    return dict(pg.sql("SELECT event_id, position FROM event_positions"))


def check_exactly_once(pg):
    events = {r[0] for r in pg.sql("SELECT id FROM events")}
    pos = pg.sql("SELECT event_id, position FROM event_positions")
    by_event = {}
    for event_id, position in pos:
        by_event.setdefault(event_id, []).append(position)
    missing = events - set(by_event)
    twice = {e: p for e, p in by_event.items() if len(p) > 1}
    assert not missing, "events without a position: %s" % sorted(missing)[:20]
    assert not twice, "events with several positions: %s" % list(twice.items())[:20]
    assert len({p for _, p in pos}) == len(pos)
    return by_event


def triggers(pg):
    # The four the modes switch; events_id_unchanged (an update that sets id is refused) stays
    # enabled in both: it never fires for an insert.
    return dict(pg.sql("SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = "
                       "'events'::regclass AND NOT tgisinternal "
                       "AND tgname <> 'events_id_unchanged'"))


def test_switching_to_wal_and_back_while_writers_insert_keeps_every_position_once(wal_db):
    pg = wal_db
    writers = Writers(pg)
    stand_in = StandIn(pg)
    running = threading.Event()
    running.set()
    done = threading.Event()

    def positioner():
        while not done.is_set():
            if running.is_set():
                stand_in.step()
            time.sleep(0.02)

    thread = threading.Thread(target=positioner, daemon=True)
    thread.start()
    try:
        time.sleep(1)
        before = positions_by_event(pg)
        assert before, "the trigger positioned nothing"
        assert pg.superuser_sql("SELECT event_piper_set_source('wal')")[0][0] == "wal"
        assert set(triggers(pg).values()) == {"D"}
        time.sleep(2)
        # Back, with a positioner that catches up before the trigger takes over.
        assert pg.superuser_sql("SELECT event_piper_set_source('trigger', 30)")[0][0] == "trigger"
        assert set(triggers(pg).values()) == {"O"}
        assert stand_in.written > 0, "the stand-in positioned nothing in wal mode"
        middle = positions_by_event(pg)
        assert {e: middle[e] for e in before} == before, "a position changed"
        time.sleep(1)
        # Again, and back without any positioner: the rows left get the next positions.
        assert pg.superuser_sql("SELECT event_piper_set_source('wal')")[0][0] == "wal"
        time.sleep(1)
        running.clear()
        time.sleep(0.5)
        assert pg.superuser_sql("SELECT event_piper_set_source('trigger', 0.5)")[0][0] == "trigger"
        time.sleep(0.5)
    finally:
        writers.finish()
        done.set()
        thread.join(10)
    after = check_exactly_once(pg)
    assert {e: after[e][0] for e in middle} == middle, "a position changed"
    assert pg.scalar("SELECT count(*) FROM pg_replication_slots") == 0
    assert pg.scalar("SELECT last_value FROM events_position_seq") == \
        pg.scalar("SELECT max(position) FROM event_positions")


def test_in_wal_mode_writers_run_no_trigger_and_schema_sql_keeps_it_so(wal_db):
    pg = wal_db
    pg.insert("toto")
    assert pg.superuser_sql("SELECT event_piper_set_source('wal')")[0][0] == "wal"
    assert pg.scalar("SELECT last_position FROM event_piper_wal_progress") == 1
    pg.insert("toto")
    pg.sql("UPDATE events SET subscriber = 'bob' WHERE id = 1")
    pg.sql("DELETE FROM events WHERE id = 1")
    # Nothing of ours ran for these writes: no position given, none moved or deleted.
    assert pg.sql("SELECT event_id, position, subscriber FROM event_positions") == \
        [(1, 1, "toto")]
    r = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction",
                        "-h", pg.datadir, "-p", str(pg.port), "-U", "event_piper", "-d",
                        "event_piper", "-c", "SET client_min_messages = warning", "-f", SCHEMA],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert r.returncode == 0, r.stdout
    assert set(triggers(pg).values()) == {"D"}
    assert pg.scalar("SELECT count(*) FROM event_positions WHERE event_id = 2") == 0
    assert pg.scalar("SELECT source FROM event_piper_wal_progress") == "wal"
    assert pg.scalar("SELECT count(*) FROM pg_replication_slots WHERE slot_name = "
                     "'event_piper'") == 1


def test_a_positioner_with_a_stale_progress_is_fenced(wal_db):
    pg = wal_db
    assert pg.superuser_sql("SELECT event_piper_set_source('wal')")[0][0] == "wal"
    args = [None, "0/10", 1, [1], [5], ["toto"], [0], ["p 1"], [], [], [], False, "a", "new_events"]
    pg.sql(APPLY, args)  # expects NULL: the first after the switch
    assert pg.sql("SELECT lsn::text, last_position, holder FROM event_piper_wal_progress") == \
        [("0/10", 1, "a")]
    stale = [None, "0/20", 2, [2], [6], ["toto"], [0], [], [], [], [], False, "b", "new_events"]
    with pytest.raises(psycopg2.Error, match="fenced"):
        pg.sql(APPLY, stale)
    assert pg.sql("SELECT position FROM event_positions") == [(1,)]
    # Later changes, in commit order: a move, a delete, a truncate.
    pg.sql(APPLY, ["0/10", "0/30", 3, [2, 3], [6, 7], ["a", "b"], [0, 0], [], [], [], [], False,
                   "a", "new_events"])
    pg.sql(APPLY, ["0/30", "0/40", 3, [], [], [], [], [], [6], ["z"], [7], False, "a",
                   "new_events"])
    assert pg.sql("SELECT position, event_id, subscriber FROM event_positions ORDER BY 1") == \
        [(1, 5, "toto"), (2, 6, "z")]
    pg.sql(APPLY, ["0/40", "0/50", 4, [4], [8], ["c"], [0], [], [], [], [], True, "a",
                   "new_events"])
    # committed_at: when the position became visible, not the writer's commit time
    assert pg.sql("SELECT position, event_id, committed_at > now() - interval '1 minute' "
                  "FROM event_positions") == [(4, 8, True)]
    # Back to the trigger: the stand-in writes above are not real events, so no catch-up.
    pg.sql("TRUNCATE event_positions")
