"""Issue 4, points 1-5: never lose an event when things break.

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

sys.path.append(os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                             "chaos")))

import harness  # noqa: E402
from harness import (HEARTBEAT, PGCTL, T, compact_json, frame,  # noqa: E402
                     last_event_id_locations, open_stream, pid_alive, pump_all,
                     sequence_problems, wait_until)
from piper_chaos import (LISTENER_APP, PrivatePgCase, cpu_seconds, expected_events,  # noqa: E402
                         fd_inventory, hold_tcp, http_get, log_entries, module_backends, status,
                         worker_status, wait_all_listening)

# Every test has the status and health locations (piper_chaos.PrivatePgCase waits for the
# listeners in /status).
NGINX_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
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


class FailureCase(PrivatePgCase):
    pg_name = "failures"

    def streams_on_every_worker(self, ngx, consumer, minimum=2, attempts=60, **kw):
        """Open streams of `consumer` until every worker serves one and `minimum` are open."""
        streams, by_worker = [], {}
        workers = set(ngx.worker_pids())
        for _ in range(attempts):
            c = self.stream(ngx, consumer, settle=0, **kw)
            streams.append(c)
            by_worker.setdefault(ngx.wait_worker_of(c), []).append(c)
            if set(by_worker) >= workers and len(streams) >= minimum:
                break
            time.sleep(0.02)
        self.assertEqual(set(by_worker), workers,
                         "could not get a stream on every worker in %d connections" % attempts)
        return streams, by_worker

    def assert_stream_is(self, body, subscriber, what, superuser=False, events=None):
        """The body (heartbeats aside) is exactly every committed event of `subscriber`."""
        exp = expected_events(self.pg, subscriber, superuser=superuser)
        got = without_heartbeats(body)
        want = b"".join(f for _, f in exp)
        if got != want:
            ids = [int(x) for x in re.findall(rb"(?m)^id: (\d+)$", got)]
            self.fail("%s (%s): %s\n got (last 600 bytes): %r\nwant (last 600 bytes): %r"
                      % (what, subscriber, sequence_problems(ids, [p for p, _ in exp])
                         or "ids right, bytes differ", got[-600:], want[-600:]))

    def rejected_logins(self):
        """TCP logins refused by pg_hba so far (PostgreSQL's server log)."""
        with open(os.path.join(self.pg.datadir, "server.log"), errors="replace") as f:
            return f.read().count("pg_hba.conf rejects connection")

    def problem_lines(self, ngx, pid=None, needle=""):
        return [(lvl, p, m) for lvl, p, m in log_entries(ngx)
                if lvl in PROBLEM_LEVELS and (pid is None or p == pid) and needle in m]


# --------------------------------------------------------------------------------------------
# 1. Listener loss: PostgreSQL restart, the listening connection dropped
# --------------------------------------------------------------------------------------------

class PostgresRestart(FailureCase):

    def test_restart_with_open_streams_delivers_catch_up_and_live_once_and_logs_the_loss_once(self):
        ngx = self.start_nginx(location={"event_piper_heartbeat": "1s"})
        pids = ngx.worker_pids()
        toto, by_worker = self.streams_on_every_worker(ngx, "toto", minimum=4)
        titi = self.stream(ngx, "titi", settle=0)
        everyone = toto + [titi]
        self.pg.insert("toto", '{"n": 1}')
        self.pg.insert("titi", '{"n": 2}')
        self.pg.insert("toto", '{"n": 3}')
        pump_all(everyone, lambda: all(len(c.events) >= 2 for c in toto) and len(titi.events) >= 1,
                 T(15), "the first events")
        reconnects = {p: w["listener_reconnects"] for p, w in worker_status(ngx).items()}

        rejected_before = self.rejected_logins()
        # Down: new TCP logins are refused first (the unix socket still works for the test), then
        # PostgreSQL stops; every connection of the module is cut.
        hold_tcp(self.pg)
        self.pg.stop()
        t_down = time.monotonic()
        wait_until(lambda: all(self.problem_lines(ngx, p, "listener connection lost")
                               for p in pids), T(10), what="each worker to log the listener loss")
        # A stream opened during the outage without Last-Event-ID starts from what its worker
        # knew (position 3) and must get everything committed after it.
        late = self.stream(ngx, "toto", settle=0)
        everyone.append(late)
        time.sleep(3.0)  # connection refused, again and again (backoff)

        # Up again on the same port, but the module cannot log in yet: these events are committed
        # while no listener (and no replay connection) exists.
        self.pg.start()
        self.assertEqual(module_backends(self.pg), [])
        self.pg.insert("toto", '{"n": 4, "during": "reconnect"}')
        self.pg.insert("titi", '{"n": 5, "during": "reconnect"}')
        self.pg.insert("toto", '{"n": 6, "during": "reconnect"}')
        # The module keeps trying (with backoff): wait for its attempts to be refused.
        wait_until(lambda: self.rejected_logins() - rejected_before >= len(pids), T(15),
                   what="the module's login attempts while held")
        self.assertEqual(module_backends(self.pg), [], "a module connection got in while held")
        for c in everyone:
            c.drain()
            self.assertFalse(c.eof, "a stream ended during the outage: %r" % bytes(c.raw[-200:]))
        down_s = time.monotonic() - t_down

        hold_tcp(self.pg, False)
        wait_all_listening(ngx, reconnects_above=reconnects, timeout=T(20))
        pump_all(everyone, lambda: all(len(c.events) >= 4 for c in toto) and len(titi.events) >= 2
                 and len(late.events) >= 2, T(15), "the catch-up after the restart")
        # Live after the restart.
        self.pg.insert("toto", '{"n": 7, "after": "restart"}')
        self.pg.insert("titi", '{"n": 8, "after": "restart"}')
        pump_all(everyone, lambda: all(len(c.events) >= 5 for c in toto) and len(titi.events) >= 3
                 and len(late.events) >= 3, T(15), "the live events after the restart")
        for c in everyone:
            c.read_for(0.3)  # anything extra (a duplicate) would show up now
        for w, ss in by_worker.items():
            for s in ss:
                self.assertFalse(s.eof)
                self.assert_stream_is(s.body, "toto", "stream on worker %d" % w)
        self.assert_stream_is(titi.body, "titi", "titi's stream")
        self.assertEqual(without_heartbeats(late.body),
                         b"".join(f for p, f in expected_events(self.pg, "toto") if p > 3),
                         "the stream opened during the outage")

        # The log: the loss once per worker, not once per attempt, and the recovery.
        rejected = self.rejected_logins() - rejected_before
        for p in pids:
            lines = self.problem_lines(ngx, p, "listener")
            note("worker %d, %.1fs down (%d TCP logins rejected by pg_hba meanwhile): %s"
                 % (p, down_s, rejected, [m[:90] for _, _, m in lines]))
            lost = [m for _, _, m in lines if "listener connection lost" in m]
            self.assertEqual(len(lost), 1, "worker %d logged the loss %d times" % (p, len(lost)))
            self.assertLessEqual(len(lines), 2, "worker %d logged listener problems per attempt:\n%s"
                                 % (p, "\n".join(m for _, _, m in lines)))

    def test_a_dropped_listening_connection_catches_up_what_was_committed_meanwhile(self):
        ngx = self.start_nginx()
        pids = ngx.worker_pids()
        toto, _ = self.streams_on_every_worker(ngx, "toto", minimum=2)
        self.pg.insert("toto", '{"n": 1}')
        pump_all(toto, lambda: all(len(c.events) >= 1 for c in toto), T(15), "the first event")
        reconnects = {p: w["listener_reconnects"] for p, w in worker_status(ngx).items()}
        hold_tcp(self.pg)
        killed = self.pg.superuser_sql(
            "select pg_terminate_backend(pid) from pg_stat_activity where application_name = %s",
            (LISTENER_APP,))
        self.assertEqual(len(killed), len(pids))
        wait_until(lambda: all(self.problem_lines(ngx, p, "listener connection lost")
                               for p in pids), T(10), what="each worker to log the listener loss")
        self.assertEqual(module_backends(self.pg, LISTENER_APP), [])
        for n in (2, 3, 4):
            self.pg.insert("toto", '{"n": %d, "while": "no listener"}' % n)
        time.sleep(1.0)
        hold_tcp(self.pg, False)
        wait_all_listening(ngx, reconnects_above=reconnects)
        pump_all(toto, lambda: all(len(c.events) >= 4 for c in toto), T(15), "the catch-up")
        self.pg.insert("toto", '{"n": 5}')
        pump_all(toto, lambda: all(len(c.events) >= 5 for c in toto), T(15), "the live event")
        for c in toto:
            c.read_for(0.3)
            self.assert_stream_is(c.body, "toto", "stream")
        for p in pids:
            lost = self.problem_lines(ngx, p, "listener connection lost")
            self.assertEqual(len(lost), 1, lost)


class SchemaReapplied(FailureCase):

    def test_reapplying_the_schema_while_writers_insert_leaves_every_event_deliverable(self):
        # scripts/pgctl.sh start (and so `make run`) applies postgresql/schema.sql at every start,
        # also to a running cluster, while writers may already be inserting. schema.sql says it is
        # safe to apply more than once: a row inserted between its DROP TRIGGER and CREATE
        # TRIGGER would get no position, and so would never be delivered.
        ngx = self.start_nginx()
        c = self.stream(ngx, "w", settle=0)
        stop, count, error = threading.Event(), [0], []

        def write():
            conn = self.pg.connect()
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
        self.addCleanup(stop.set)
        time.sleep(0.2)
        for _ in range(10):
            r = subprocess.run([PGCTL, "start", self.pg.datadir, str(self.pg.port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            self.assertEqual(r.returncode, 0, r.stdout)
        time.sleep(0.2)
        stop.set()
        t.join()
        self.assertEqual(error, [])
        total, unpositioned = (int(x) for x in self.pg.sql(
            "select count(*), count(*) filter (where position is null) from events")[0])
        positions = self.pg.positions("w")
        try:
            c.wait(lambda: c.events and int(c.events[-1].id) >= positions[-1], T(30),
                   "the newest event")
        finally:
            c.read_for(0.5)
        note("%d events inserted while the schema was re-applied 10 times, %d without a "
             "position; the stream got %d" % (total, unpositioned, len(c.events)))
        got = set(c.event_ids())
        missing = [p for p in positions if p not in got]
        self.assertEqual(sequence_problems(c.event_ids(), positions), "",
                         "the live stream against the positioned rows; the missing rows "
                         "(position, id, neighbour ids): %s" % [
                             (p, self.pg.scalar("select id from events where position = %s",
                                                (p,)),
                              [i for i, in self.pg.sql("select id from events where position in "
                                                       "(%s, %s)", (p - 1, p + 1))])
                             for p in missing[:4]])
        self.assertEqual(unpositioned, 0, "%d of %d events inserted while the schema was "
                         "re-applied have no position and reach no client (ids %s)" % (
                             unpositioned, total, [int(i) for i, in self.pg.sql(
                                 "select id from events where position is null order by id")][:10]))


# --------------------------------------------------------------------------------------------
# 1b. PostgreSQL down when nginx starts
# --------------------------------------------------------------------------------------------

class PostgresDownAtStart(FailureCase):

    def assert_health(self, ngx, code, body, times=6):
        for _ in range(times):
            h = http_get(ngx.port, "/manage/health")
            self.assertEqual((h.status, bytes(h.body)), (code, body), h.head)
            self.assertEqual(h.header("Content-Type"), "application/json")

    def test_nginx_starts_streams_wait_health_is_down_then_everything_arrives(self):
        self.pg.stop()
        ngx = self.start_nginx(wait=False)
        pids = ngx.worker_pids()
        c = self.stream(ngx, "toto", settle=0)
        self.assertEqual(c.header("Content-Type"), "text/event-stream")
        self.assert_health(ngx, 503, b'{"status":"DOWN"}')
        c.read_for(1.0)
        self.assertFalse(c.eof, "the stream ended while PostgreSQL is down")
        self.assertEqual(without_heartbeats(c.body), b"")
        ws = worker_status(ngx)
        self.assertEqual(sorted(ws), sorted(pids))
        self.assertEqual({w["listener"] for w in ws.values()}, {"connecting"})

        self.pg.start()
        wait_all_listening(ngx)
        self.pg.insert("toto", '{"after": "start"}')
        c.wait_events(1)
        c.read_for(0.3)
        self.assertEqual(without_heartbeats(c.body), frame(1, data='{"after":"start"}'))
        self.assert_health(ngx, 200, b'{"status":"UP"}')
        # A stream opened now, and a replay, work as usual.
        d = self.stream(ngx, "toto", last_event_id="0", settle=0)
        d.wait_events(1)
        self.assertEqual(without_heartbeats(d.body), frame(1, data='{"after":"start"}'))
        for p in pids:
            lines = self.problem_lines(ngx, p, "listener")
            note("worker %d: %s" % (p, [m[:90] for _, _, m in lines]))
            self.assertEqual(len(lines), 1, "worker %d: listener problems logged per attempt" % p)

    def test_an_event_committed_before_the_listener_is_back_reaches_a_stream_opened_while_down(self):
        # The stream subscribed (200, no Last-Event-ID) while PostgreSQL was down: what was
        # committed before is not its to receive (positions 1, 2), everything committed after is,
        # including what is committed before the module's listener manages to log in again.
        self.pg.insert("toto", '{"n": 1, "committed": "before nginx started"}')
        self.pg.insert("toto", '{"n": 2, "committed": "before nginx started"}')
        hold_tcp(self.pg)
        self.pg.stop()
        ngx = self.start_nginx(wait=False)
        c = self.stream(ngx, "toto", settle=0)
        c.read_for(0.5)
        self.pg.start()
        self.assertEqual(module_backends(self.pg), [])
        self.pg.insert("toto", '{"n": 3, "committed": "after the stream opened, listener away"}')
        hold_tcp(self.pg, False)
        wait_all_listening(ngx)
        self.pg.insert("toto", '{"n": 4, "committed": "after the listener was back"}')
        try:
            c.wait(lambda: b'"n":4' in c.body, T(15), "the event committed after the listener")
        finally:
            c.read_for(0.5)
        self.assertEqual(without_heartbeats(c.body),
                         b"".join(f for p, f in expected_events(self.pg, "toto") if p > 2),
                         "a stream opened while PostgreSQL was down (nginx started meanwhile) "
                         "must get exactly what was committed after it opened; the module's "
                         "line: %s" % [m for _, _, m in log_entries(ngx) if "stream opened" in m])


# --------------------------------------------------------------------------------------------
# 2. Commits out of id order, rollbacks, the original insert
# --------------------------------------------------------------------------------------------

class OutOfOrderCommits(FailureCase):

    def insert_on(self, conn, payload, subscriber="toto"):
        """Insert on a connection of the test's (in its transaction, if it has one open); return
        the row's id."""
        return self.pg.run(conn, "insert into events (type, timestamp, subscriber, payload) "
                           "values ('insert', now(), %s, %s) returning id",
                           (subscriber, payload))[0][0]

    def test_a_commit_behind_a_resumed_client_arrives_exactly_once(self):
        ngx = self.start_nginx()
        for n in range(1, 5):
            self.pg.insert("toto", '{"n": %d}' % n)
        watcher = self.stream(ngx, "toto", last_event_id="0", settle=0)  # never disconnects
        c = self.stream(ngx, "toto", last_event_id="4", settle=0.3)
        self.assertEqual(without_heartbeats(c.body), b"")
        a, b = self.pg.connect(autocommit=False), self.pg.connect()  # b: each insert commits
        self.addCleanup(a.close)
        self.addCleanup(b.close)

        # A takes id 5 and stays open; B takes id 6 and commits: B is position 5.
        self.assertEqual(self.insert_on(a, '{"tx": "A"}'), 5)
        self.assertEqual(self.insert_on(b, '{"tx": "B"}'), 6)
        c.wait_events(1)
        c.read_for(0.5)
        self.assertEqual(without_heartbeats(c.body), frame(5, data='{"tx":"B"}'))
        last = c.events[-1].id
        c.close()
        resumed = self.stream(ngx, "toto", last_event_id=last, settle=0.5)
        self.assertEqual(without_heartbeats(resumed.body), b"", "nothing new yet: A is open")
        a.commit()
        resumed.wait_events(1)
        resumed.read_for(0.5)
        self.assertEqual(without_heartbeats(resumed.body), frame(6, data='{"tx":"A"}'))
        self.assertEqual(self.pg.sql("select payload->>'tx', id, position from events "
                                     "where payload ? 'tx' order by id"),
                         [("A", 5, 6), ("B", 6, 5)])

        # Again, but A commits while the client is away: the resume replays it.
        self.assertEqual(self.insert_on(a, '{"tx": "A2"}'), 7)
        self.assertEqual(self.insert_on(b, '{"tx": "B2"}'), 8)
        resumed.wait_events(2)
        self.assertEqual(resumed.events[-1].raw, frame(7, data='{"tx":"B2"}'))
        resumed.close()
        a.commit()
        again = self.stream(ngx, "toto", last_event_id="7", settle=0)
        again.wait_events(1)
        again.read_for(0.5)
        self.assertEqual(without_heartbeats(again.body), frame(8, data='{"tx":"A2"}'))

        watcher.wait_events(8)
        watcher.read_for(0.3)
        self.assert_stream_is(watcher.body, "toto", "the stream that never disconnected")
        self.assertEqual(watcher.event_ids(), list(range(1, 9)))

    def test_rolled_back_inserts_never_appear(self):
        ngx = self.start_nginx()
        live = self.stream(ngx, "toto", settle=0)
        # Transactions: psycopg2 opens one at the first statement; commit() or rollback() ends it.
        r, s, d = (self.pg.connect(autocommit=False) for _ in range(3))
        for conn in (r, s, d):
            self.addCleanup(conn.close)
        # A whole transaction rolled back.
        self.insert_on(r, '{"rolled": "back"}')
        # A savepoint rolled back inside a committed transaction.
        self.insert_on(s, '{"sp": "kept"}')
        self.pg.run(s, "savepoint x")
        self.insert_on(s, '{"sp": "dropped"}')
        self.pg.run(s, "rollback to savepoint x")
        r.rollback()
        s.commit()
        # A row deleted again by its own transaction.
        self.insert_on(d, '{"deleted": "by its own transaction"}')
        self.pg.run(d, "delete from events where payload ? 'deleted'")
        self.insert_on(d, '{"after": "delete"}')
        d.commit()
        # A failed statement aborts its transaction.
        self.insert_on(r, '{"aborted": "by an error"}')
        with self.assertRaises(psycopg2.Error):
            self.pg.run(r, "select 1/0")
        r.commit()  # COMMIT of a failed transaction: the server answers ROLLBACK
        self.pg.insert("toto", '{"last": true}')
        live.wait(lambda: b'"last":true' in live.body, T(15), "the last event")
        live.read_for(0.5)
        body = without_heartbeats(live.body)
        for word in (b"rolled", b"dropped", b"deleted", b"aborted"):
            self.assertNotIn(word, body)
        self.assertEqual([p for p, in self.pg.sql("select payload::text from events order by id")],
                         ['{"sp": "kept"}', '{"after": "delete"}', '{"last": true}'])
        self.assert_stream_is(live.body, "toto", "live stream")
        replay = self.stream(ngx, "toto", last_event_id="0", settle=0)
        replay.wait_events(3)
        replay.read_for(0.3)
        self.assert_stream_is(replay.body, "toto", "replay")

    def test_a_row_changed_by_its_own_transaction_is_delivered_as_committed(self):
        """Issue 9, item 1: live delivery carries the committed row, never the INSERT's image."""
        ngx = self.start_nginx()
        alice = self.stream(ngx, "alice", settle=0)
        bob = self.stream(ngx, "bob", settle=0)
        carol = self.stream(ngx, "carol", settle=0)
        w = self.pg.connect(autocommit=False)
        self.addCleanup(w.close)
        ins = ("insert into events (type, timestamp, subscriber, payload) values "
               "('t', now(), %s, %s)")
        # The subscriber changed before commit: only bob may see it.
        with w, w.cursor() as cur:  # one transaction, committed at the end of the block
            cur.execute(ins, ("alice", '{"secret": "for bob only"}'))
            cur.execute("update events set subscriber = 'bob' where subscriber = 'alice' "
                        "and position is null")
        # Type and payload changed before commit.
        with w, w.cursor() as cur:
            cur.execute(ins, ("carol", '{"draft": 1}'))
            cur.execute("update events set type = 'final', payload = '{\"final\": 2}' "
                        "where subscriber = 'carol' and position is null")
        # Changed twice, the second time back to alice, then a plain event for each.
        with w, w.cursor() as cur:
            cur.execute(ins, ("bob", '{"hop": 1}'))
            cur.execute("update events set subscriber = 'carol' where position is null")
            cur.execute("update events set subscriber = 'alice', payload = '{\"hop\": 3}' "
                        "where position is null")
        for who in ("alice", "bob", "carol"):
            self.pg.insert(who, '{"end": "%s"}' % who)
        for c, who in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
            c.wait(lambda c=c, who=who: ('"end":"%s"' % who).encode() in c.body, T(15),
                   "the last event of " + who)
        for c in (alice, bob, carol):
            c.read_for(0.3)
        self.assertNotIn(b"secret", without_heartbeats(alice.body))
        self.assertEqual(without_heartbeats(bob.body),
                         frame(1, "t", '{"secret":"for bob only"}') + frame(5, data='{"end":"bob"}'))
        self.assertEqual(without_heartbeats(carol.body),
                         frame(2, "final", '{"final":2}') + frame(6, data='{"end":"carol"}'))
        self.assertEqual(without_heartbeats(alice.body),
                         frame(3, "t", '{"hop":3}') + frame(4, data='{"end":"alice"}'))
        for c, who in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
            self.assert_stream_is(c.body, who, "live stream of " + who)

    def test_the_originals_plain_insert_works_unchanged(self):
        ngx = self.start_nginx()
        c = self.stream(ngx, "toto", settle=0)
        rc, out = self.pg.psql(ORIGINAL_INSERT)
        self.assertEqual(rc, 0, out)
        c.wait_events(1)
        self.assertEqual(bytes(c.events[0].raw), b'id: 1\nevent: insert\ndata: {"foo":"bar"}\n\n')
        # In an explicit transaction, and twice in one statement.
        rc, out = self.pg.psql("begin;\n" + ORIGINAL_INSERT + "\ncommit;\n" +
                               ORIGINAL_INSERT.replace("'{\"foo\": \"bar\"}');",
                                                       "'{\"foo\": \"bar\"}'), ('insert', now(), "
                                                       "'toto', '{\"foo\": \"baz\"}');"))
        self.assertEqual(rc, 0, out)
        c.wait_events(4)
        c.read_for(0.3)
        self.assertEqual(without_heartbeats(c.body),
                         frame(1) + frame(2) + frame(3) + frame(4, data='{"foo":"baz"}'))
        self.assertEqual(self.pg.sql("select id, position from events order by id"),
                         [(i, i) for i in range(1, 5)])


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


class LargePayloads(FailureCase):

    def test_9kb_100kb_and_1mb_payloads_live_and_in_replay_byte_exact(self):
        ngx = self.start_nginx()
        live, _ = self.streams_on_every_worker(ngx, "toto", minimum=2)
        sizes = [("9k", 9 * 1024), ("100k", 100 * 1024), ("1m", 1024 * 1024)]
        self.pg.insert("toto", '{"small": 0}')
        for tag, size in sizes:
            self.pg.insert("toto", big_json(size, tag), type="big")
            self.pg.insert("toto", '{"small": "%s"}' % tag)
        n = 1 + 2 * len(sizes)
        pump_all(live, lambda: all(len(c.events) >= n for c in live), T(30), "%d events" % n)
        lengths = {t: int(l) for t, l in self.pg.sql(
            "select payload->>'tag', octet_length(payload::text) from events where type = 'big'")}
        note("payload sizes as jsonb text: %s" % lengths)
        for tag, size in sizes:
            self.assertGreaterEqual(lengths[tag], size)
        for c in live:
            c.read_for(0.3)
            self.assert_stream_is(c.body, "toto", "live")
            for f in c.events:
                self.assertEqual(len([1 for k, _ in f.fields if k == "data"]), 1)
        for i, (tag, size) in zip((1, 3, 5), sizes):
            self.assertGreaterEqual(len(live[0].events[i].data), size, tag)
        replay = self.stream(ngx, "toto", last_event_id="0", settle=0)
        replay.wait_events(n, timeout=T(30))
        replay.read_for(0.3)
        self.assert_stream_is(replay.body, "toto", "replay")
        # From the middle.
        part = open_stream(ngx.port, "toto", "3")
        self.addCleanup(part.close)
        part.wait_events(n - 3, timeout=T(30))
        part.read_for(0.3)
        self.assertEqual(without_heartbeats(part.body),
                         b"".join(f for p, f in expected_events(self.pg, "toto") if p > 3))

    def test_payloads_around_the_8000_byte_notification_limit(self):
        ngx = self.start_nginx()
        live = self.stream(ngx, "toto", settle=0)
        # The notification carries "e <pos> 4 6\n" + "toto" + "insert" + payload; the trigger
        # switches to a reference at 7999 bytes: cover both sides, and a 1 MB one in between.
        for k, pad in enumerate(range(7940, 7990)):
            self.pg.insert("toto", '{"k": %d, "pad": "%s"}' % (k, "p" * (pad - 22)))
            if k == 25:
                self.pg.insert("toto", big_json(1024 * 1024, "mid"), type="big")
        live.wait_events(51, timeout=T(30))
        live.read_for(0.3)
        lengths = [int(l) for l, in self.pg.sql(
            "select octet_length(payload::text) from events order by position")]
        self.assertLess(min(lengths), 7999 - 30)
        self.assertGreater(max(lengths), 8000)
        self.assert_stream_is(live.body, "toto", "live")
        replay = self.stream(ngx, "toto", last_event_id="0", settle=0)
        replay.wait_events(51, timeout=T(30))
        replay.read_for(0.3)
        self.assert_stream_is(replay.body, "toto", "replay")


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


class ReloadAndQuit(FailureCase):

    def assert_ended_with_retry(self, s, what):
        s.wait_complete(timeout=T(10))
        tail = bytes(s.raw[-160:])
        self.assertTrue(s.complete, "%s: not ended with the last chunk: %r" % (what, tail))
        self.assertTrue(bytes(s.raw).endswith(b"\r\n0\r\n\r\n"), "%s: %r" % (what, tail))
        self.assertRegex(s.frames[-1].raw, retry_frame_re(),
                         "%s: the last frame is not a retry hint: %r" % (what, bytes(s.body[-160:])))
        self.assertTrue(bytes(s.body).endswith(s.frames[-1].raw), "%s: bytes after the retry "
                        "hint: %r" % (what, bytes(s.body[-160:])))
        s.wait_eof(timeout=T(10))

    def resume_all(self, ngx, old_streams):
        """Reconnect each stream with its Last-Event-ID; returns [(old, new)]."""
        pairs = []
        for s in old_streams:
            last = s.events[-1].id if s.events else "0"
            pairs.append((s, self.stream(ngx, s.consumer, last_event_id=last, settle=0)))
        return pairs

    def open_streams(self, ngx, **kw):
        toto, _ = self.streams_on_every_worker(ngx, "toto", minimum=4, **kw)
        titi, _ = self.streams_on_every_worker(ngx, "titi", minimum=2, **kw)
        for s in toto:
            s.consumer = "toto"
        for s in titi:
            s.consumer = "titi"
        return toto + titi

    def check_pairs(self, pairs, writer_count):
        final = {k: expected_events(self.pg, k) for k in ("toto", "titi")}
        pump_all([n for _, n in pairs], lambda: all(
            len(o.events) + len(n.events) >= len(final[o.consumer]) for o, n in pairs), T(30),
            "every resumed stream to catch up")
        for _, n in pairs:
            n.read_for(0.2)
        for i, (o, n) in enumerate(pairs):
            self.assert_stream_is(strip_retry(o.body) + strip_retry(n.body),
                                  o.consumer, "stream %d before + after" % i)
        note("%d writes during the test, %d toto and %d titi events"
             % (writer_count, len(final["toto"]), len(final["titi"])))

    def test_reload_ends_streams_with_retry_and_resuming_misses_nothing(self):
        ngx = self.start_nginx()
        streams = self.open_streams(ngx)
        writer = Writer(self.pg, ["toto", "titi", "toto"]).start()
        self.addCleanup(lambda: writer._stop.set())
        pump_all(streams, lambda: all(len(s.events) >= 3 for s in streams), T(15), "events")
        t0 = time.monotonic()
        old, new = ngx.reload()
        for i, s in enumerate(streams):
            self.assert_ended_with_retry(s, "stream %d" % i)
        ended_s = time.monotonic() - t0
        wait_until(lambda: not any(pid_alive(p) for p in old), T(5),
                   what="the old workers %s to exit" % sorted(old))
        exit_s = time.monotonic() - t0
        wait_all_listening(ngx)
        pairs = self.resume_all(ngx, streams)
        time.sleep(1.0)
        count = writer.stop()
        note("reload: streams ended %.2fs and old workers gone %.2fs after the reload"
             % (ended_s, exit_s))
        self.check_pairs(pairs, count)
        self.assertEqual(ngx.bad_log_lines(), [])

    def test_quit_ends_streams_with_retry_and_resuming_on_a_new_nginx_misses_nothing(self):
        ngx = self.start_nginx(location={"event_piper_retry": "1500ms"})
        streams = self.open_streams(ngx)
        for s in streams:
            s.wait_body(b"retry: 1500\n\n")
            self.assertTrue(bytes(s.body).startswith(b"retry: 1500\n\n"), bytes(s.body[:40]))
        writer = Writer(self.pg, ["toto", "titi", "toto"]).start()
        self.addCleanup(lambda: writer._stop.set())
        pump_all(streams, lambda: all(len(s.events) >= 3 for s in streams), T(15), "events")
        workers = ngx.worker_pids()
        elapsed = ngx.quit(timeout=T(10))
        self.assertLess(elapsed, T(5), "nginx took %.1fs to quit" % elapsed)
        self.assertFalse(any(pid_alive(p) for p in workers))
        for i, s in enumerate(streams):
            self.assert_ended_with_retry(s, "stream %d" % i)
        time.sleep(0.5)  # events keep coming while no nginx runs
        ngx2 = self.start_nginx(location={"event_piper_retry": "1500ms"})
        pairs = self.resume_all(ngx2, streams)
        time.sleep(1.0)
        count = writer.stop()
        for _, n in pairs:
            n.wait_body(b"retry: 1500\n\n")
            self.assertTrue(bytes(n.body).startswith(b"retry: 1500\n\n"))
        note("quit took %.2fs" % elapsed)
        self.check_pairs(pairs, count)
        self.assertEqual(ngx.bad_log_lines(), [])


class ShutdownRace(FailureCase):

    def test_a_request_that_reaches_a_worker_in_its_shutdown_is_told_to_reconnect(self):
        # A client reconnecting during a reload can land on an old worker: its connection was
        # accepted before the reload and its request completes after. An EventSource reconnects
        # after a network error or after a 200 event stream that ends, but a non-200 answer
        # "fails the connection" for good (WHATWG HTML, EventSource): the client stops.
        self.pg.insert("toto")
        ngx = self.start_nginx()
        c = self.client(ngx)
        c.send(b"GET /events HTTP/1.1\r\nHost: x\r\nX-Consumer-Id: toto\r\n")
        old_worker = ngx.wait_worker_of(c)
        old, new = ngx.reload()
        self.assertIn(old_worker, old)
        ngx.wait_log("event_piper: shutting down", 2)
        self.assertTrue(pid_alive(old_worker))
        c.send(b"Last-Event-ID: 0\r\n\r\n")
        c.wait_complete(timeout=T(10))
        note("request completed on a worker in its shutdown: %r" % bytes(c.raw[:300]))
        if c.raw:
            self.assertEqual(c.status, 200, "an EventSource would give up on this answer: %r"
                             % bytes(c.raw[:300]))
            self.assertEqual(c.header("Content-Type"), "text/event-stream")
            self.assertTrue(c.complete)
            self.assertRegex(c.frames[-1].raw, retry_frame_re())
        wait_until(lambda: not pid_alive(old_worker), T(5), what="the old worker to exit")


# --------------------------------------------------------------------------------------------
# 5. Bad input
# --------------------------------------------------------------------------------------------

class BadInput(FailureCase):

    def assert_400(self, c, module_level=True, what=""):
        c.wait_complete()
        ctx = "%s: response %r" % (what, bytes(c.raw[:300]))
        self.assertEqual(c.status, 400, ctx)
        if module_level:
            self.assertTrue((c.header("Content-Type") or "").startswith("text/plain"), ctx)
            body = bytes(c.body)
            self.assertTrue(body.endswith(b"\n") and body.count(b"\n") == 1 and len(body) > 4,
                            "%s: not a one-line text body: %r" % (what, body))

    def assert_still_serves(self, ngx, pids):
        self.assertEqual(sorted(ngx.worker_pids()), sorted(pids), "a worker died")
        self.assertNotIn("exited on signal", ngx.read_error_log())
        self.assertEqual(self.pg.scalar("select to_regclass('public.events')::text"), "events")
        c = self.stream(ngx, "normal", settle=0.2)
        self.pg.insert("normal", '{"still": "serving"}')
        c.wait_events(1)
        pos = self.pg.positions("normal")[-1]
        self.assertEqual(c.events[0].raw, frame(pos, data='{"still":"serving"}'))
        c.close()

    def test_consumer_ids_with_quotes_backslashes_sql_and_utf8_are_plain_ids(self):
        ngx = self.start_nginx()
        pids = ngx.worker_pids()
        names = ['quo"te', "it's", "back\\slash", "'; drop table events; --",
                 '"; drop table events; --', "x' or '1'='1", "caf\u00e9 \u2603 \U0001F600",
                 "%s%n%x", "$1", "a,b;c", "\\x00", "toto"]
        live = {}
        for name in names:
            c = open_stream(ngx.port, name.encode("utf-8"))
            self.addCleanup(c.close)
            self.assertEqual(c.status, 200, "consumer %r: %r" % (name, bytes(c.raw[:200])))
            live[name] = c
        for c in live.values():
            c.read_for(0.05)
        for i, name in enumerate(names, 1):
            self.pg.insert(name, '{"for": %d}' % i)
        pump_all(list(live.values()), lambda: all(len(c.events) >= 1 for c in live.values()),
                 T(15), "every consumer's event")
        for c in live.values():
            c.read_for(0.2)
        for i, name in enumerate(names, 1):
            with self.subTest(consumer=name):
                self.assertEqual(without_heartbeats(live[name].body), frame(i, data='{"for":%d}' % i))
                replay = open_stream(ngx.port, name.encode("utf-8"), "0")
                self.addCleanup(replay.close)
                replay.wait_events(1)
                replay.read_for(0.2)
                self.assertEqual(without_heartbeats(replay.body), frame(i, data='{"for":%d}' % i))
        self.assertEqual(self.pg.scalar("select count(*) from events"), len(names))
        self.assert_still_serves(ngx, pids)

    def test_non_utf8_consumer_ids_harm_nothing(self):
        ngx = self.start_nginx()
        pids = ngx.worker_pids()
        self.pg.insert("toto", '{"n": 1}')
        time.sleep(1.0)
        cpu0 = {p: cpu_seconds(p) for p in pids}
        t0 = time.monotonic()
        outcome = {}
        for raw in (b"caf\xe9", b"\xff\xfe", b"\xc3\x28", b"ok\x80"):
            for lei in (None, "0"):
                c = open_stream(ngx.port, raw, lei)
                self.addCleanup(c.close)
                outcome[(raw, lei)] = c
        for (raw, lei), c in outcome.items():
            c.read_for(0.2)
            if c.status != 200:
                self.assert_400(c, what=repr(raw))
            else:
                self.assertEqual(without_heartbeats(c.body), b"", "%r got something" % raw)
        # The replay pool is not stuck behind them, and live delivery works.
        for _ in range(3):
            r = self.stream(ngx, "toto", last_event_id="0", settle=0)
            r.wait_events(1, timeout=T(10))
            self.assertEqual(without_heartbeats(r.body), frame(1, data='{"n":1}'))
            r.close()
        self.assert_still_serves(ngx, pids)
        time.sleep(3)
        elapsed = time.monotonic() - t0
        cpu = {p: round(cpu_seconds(p) - cpu0[p], 2) for p in pids}
        errors = self.problem_lines(ngx)
        note("non-UTF-8 consumer ids: %s; in %.1fs the workers used %s CPU seconds and logged %d "
             "problem lines, e.g. %s"
             % ({"%r/%s" % k: c.status for k, c in outcome.items()}, elapsed, cpu, len(errors),
                [m[:110] for _, _, m in errors[:2]]))
        self.assertLessEqual(len(errors), 16, "the error log keeps growing (%d lines), last:\n%s"
                             % (len(errors), "\n".join(m for _, _, m in errors[-4:])))
        for p in pids:
            self.assertLess(cpu[p], 0.1 * elapsed, "worker %d is busy (%.2f CPU seconds in "
                            "%.1fs) with streams whose consumer id is not UTF-8" % (p, cpu[p], elapsed))

    def test_nul_cr_lf_in_the_consumer_id_are_refused(self):
        # Through a variable, the module sees the control characters itself: its own 400.
        locs = ""
        for name, value in (("lf", "to\\nto"), ("cr", "to\\rto"), ("crlf", "to\\r\\nid: 9"),
                            ("tab", "to\\tto")):
            locs += ("        location = /events-%s {\n            set $cid \"%s\";\n"
                     "            event_piper_consumer $cid;\n            event_piper;\n"
                     "        }\n" % (name, value))
        ngx = self.start_nginx(extra_locations=locs)
        pids = ngx.worker_pids()
        for name in ("lf", "cr", "crlf", "tab"):
            c = self.client(ngx)
            c.request("GET", "/events-" + name, [])
            self.assert_400(c, what="/events-" + name)
        # In a raw header, nginx's parser answers 400 itself, or ends the header line at the LF
        # (bare LF is a line end in HTTP/1.1): then the id is the part before it, a plain id.
        results = {}
        for value in (b"to\x00to", b"\x00", b"to\rto", b"to\r\rto", b"to\nto", b"toto\r"):
            c = self.client(ngx)
            c.send(b"GET /events HTTP/1.1\r\nHost: x\r\nX-Consumer-Id: " + value + b"\r\n\r\n")
            c.wait_headers()
            results[value] = c
            if c.status == 400:
                c.wait_complete()
            else:
                self.assertEqual(c.status, 200, bytes(c.raw[:200]))
        self.pg.insert("to", '{"for": "to"}')
        self.pg.insert("toto", '{"for": "toto"}')
        for value, c in results.items():
            if c.status == 200:
                want = value.split(b"\n")[0].split(b"\r")[0].decode()
                c.wait_events(1)
                c.read_for(0.3)
                self.assertEqual(without_heartbeats(c.body),
                                 frame(self.pg.positions(want)[0], data='{"for":"%s"}' % want),
                                 "consumer id %r" % value)
        note("raw NUL/CR/LF consumer ids: %s" % {v: c.status_line for v, c in results.items()})
        self.assert_still_serves(ngx, pids)

    def test_long_consumer_ids_are_400(self):
        ngx = self.start_nginx()
        pids = ngx.worker_pids()
        for n in (257, 300, 1000, 4000):
            c = self.client(ngx)
            c.request("GET", "/events", [("X-Consumer-Id", b"k" * n)])
            self.assert_400(c, what="%d-byte id" % n)
        ok = open_stream(ngx.port, b"k" * 256)
        self.addCleanup(ok.close)
        self.assertEqual(ok.status, 200)
        c = self.client(ngx)
        c.request("GET", "/events", [("X-Consumer-Id", b"k" * 10240)])
        c.wait_complete()
        note("10 KB consumer id: %r" % c.status_line)
        self.assertEqual(c.status, 400, bytes(c.raw[:300]))
        self.assert_still_serves(ngx, pids)

    def test_bad_last_event_ids_are_400(self):
        for _ in range(6):
            self.pg.insert("toto")
        locs = last_event_id_locations(
            (("leading-space", " 5"), ("trailing-space", "5 "), ("set-5", "5")))
        ngx = self.start_nginx(extra_locations=locs)
        pids = ngx.worker_pids()
        for value in (b"-1", b"99999999999999999999", b"abc", b"-0", b"+5", b"5abc"):
            c = self.client(ngx)
            c.request("GET", "/events", [("X-Consumer-Id", "toto"), ("Last-Event-ID", value)])
            self.assert_400(c, what="Last-Event-ID %r" % value)
        for path in ("/events-leading-space", "/events-trailing-space"):
            c = self.client(ngx)
            c.request("GET", path, [("X-Consumer-Id", "toto")])
            self.assert_400(c, what=path)
        good = self.stream(ngx, "toto", path="/events-set-5", settle=0)
        good.wait_events(1)
        good.read_for(0.3)
        self.assertEqual(without_heartbeats(good.body), frame(6))
        self.assert_still_serves(ngx, pids)

    def test_a_type_with_a_line_break_is_refused_by_the_schema(self):
        ngx = self.start_nginx()
        c = self.stream(ngx, "toto", settle=0)
        for t in ("in\nsert", "in\rsert", "insert\n\nid: 999", "\n", "x\r\n"):
            with self.assertRaises(psycopg2.Error) as cm:
                self.pg.insert("toto", type=t)
            self.assertEqual(cm.exception.pgcode, "23514", str(cm.exception))
        self.assertEqual(self.pg.scalar("select count(*) from events"), 0)
        self.pg.insert("toto", type="in sert")
        c.wait_events(1)
        c.read_for(0.3)
        self.assertEqual(without_heartbeats(c.body), frame(1, type="in sert"))

    def test_a_payload_with_sse_lookalike_text_arrives_as_one_data_line(self):
        ngx = self.start_nginx()
        c = self.stream(ngx, "toto", settle=0)
        evil = [
            ('{"s": "x\\n\\nid: 999"}', '{"s":"x\\n\\nid: 999"}'),
            ('{"s": "a\\r\\n\\r\\nid: 999\\r\\nevent: evil\\ndata: y\\n\\n"}',
             '{"s":"a\\r\\n\\r\\nid: 999\\r\\nevent: evil\\ndata: y\\n\\n"}'),
            ('{"\\n\\nid: 999": "\\n\\nretry: 1"}', '{"\\n\\nid: 999":"\\n\\nretry: 1"}'),
            ('"\\n\\nid: 999\\n\\n"', '"\\n\\nid: 999\\n\\n"'),
            ('{"u": "\\u2028\\u2029\\u0085"}', '{"u":"\u2028\u2029\u0085"}'),
        ]
        for payload, _ in evil:
            self.pg.insert("toto", payload)
        c.wait_events(len(evil))
        c.read_for(0.5)
        self.assertEqual(without_heartbeats(c.body),
                         b"".join(frame(i, data=w) for i, (_, w) in enumerate(evil, 1)))
        for f in c.events:
            self.assertEqual([k for k, _ in f.fields], ["id", "event", "data"])
        self.assertNotIn("999", [f.id for f in c.frames])

    def test_a_type_that_bypasses_the_schema_check_cannot_inject_fields(self):
        # The module defends itself too: drop the schema's check for a moment.
        ngx = self.start_nginx()
        c = self.stream(ngx, "toto", settle=0)
        self.pg.superuser_sql("alter table events drop constraint events_type_single_line")
        try:
            self.pg.insert("toto", '{"n": 1}', type="evil\n\nid: 999\nretry: 1\ndata: x")
            self.pg.insert("toto", '{"n": 2}', type="evil\rid: 999")
        finally:
            self.pg.superuser_sql("alter table events add constraint events_type_single_line "
                                  "check (type !~ '[\\r\\n]') not valid")
        self.pg.insert("toto", '{"n": 3}')
        c.wait(lambda: b'{"n":3}' in c.body, T(15), "the event after the evil ones")
        c.read_for(0.3)
        note("types with line breaks (schema check bypassed): %r" % without_heartbeats(c.body))
        self.assertNotIn("999", [f.id for f in c.frames])
        for f in c.frames:
            self.assertNotIn("retry", [k for k, _ in f.fields], f)
        self.assertEqual(c.events[-1].raw, frame(3, data='{"n":3}'))

    def test_2000_connections_that_drop_mid_request_then_a_normal_stream(self):
        ngx = self.start_nginx()
        pids = ngx.worker_pids()
        time.sleep(0.5)
        fds = {p: fd_inventory(p, self.pg.port) for p in pids}
        partials = [
            b"GET /eve",
            b"GET /events HTTP/1.1\r\nHost: x\r\nX-Consu",
            b"GET /events HTTP/1.1\r\nHost: x\r\nX-Consumer-Id: toto\r\nLast-Event-ID: 0\r\n",
            b"GET /events HTTP/1.1\r\nHost: x\r\nX-Consumer-Id: toto\r\n\r\n",  # then gone
            b"GET /events HTTP/1.1\r\nHost: x\r\nX-Consumer-Id: toto\r\nLast-Event-ID: 0\r\n\r\n",
            b"",
        ]
        for n in range(3):
            self.pg.insert("toto", '{"n": %d}' % n)
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
            return all(fd_inventory(p, self.pg.port).get("tcp", 0) <= fds[p].get("tcp", 0)
                       for p in pids) and status(ngx)["streams"] == 0
        try:
            wait_until(settled, T(20), interval=0.2,
                       what="worker client sockets back to %s and no stream left" % fds)
        finally:
            note("fds before %s, now %s; streams opened %d, closed %d, open now %d"
                 % (fds, {p: fd_inventory(p, self.pg.port) for p in pids},
                    ngx.log_count("event_piper: stream opened"),
                    ngx.log_count("event_piper: stream closed"), status(ngx)["streams"]))
        for p in pids:
            inv = fd_inventory(p, self.pg.port)
            for kind in ("tcp", "socket", "anon", "file"):
                self.assertEqual(inv.get(kind, 0), fds[p].get(kind, 0),
                                 "worker %d: %s fds %s, before %s" % (p, kind, inv, fds[p]))
            self.assertLessEqual(inv.get("pg", 0), 3, "worker %d: %s" % (p, inv))
        self.assertGreater(ngx.log_count("event_piper: stream opened"), 0)
        self.assert_still_serves(ngx, pids)
        replay = self.stream(ngx, "toto", last_event_id="0", settle=0)
        replay.wait_events(3)
        self.assertEqual(without_heartbeats(replay.body),
                         b"".join(frame(i, data='{"n":%d}' % (i - 1)) for i in (1, 2, 3)))

