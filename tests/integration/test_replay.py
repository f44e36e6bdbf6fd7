"""Issue 3: history replay with Last-Event-ID, bounded and gap-free into live.

A client that was away resumes with `Last-Event-ID: N` and gets every event of its consumer after
N, in order, then live events: no gap, no duplicate, whatever the size of the history and however
slow the client. Byte-exact, against a real nginx (2 workers) and PostgreSQL.
"""

import threading
import time

from harness import (EventPiperTestCase, HEARTBEAT, LISTENER_APP, REPLAY_APP, UNDER_ASAN,
                     RssSampler, T, compact_json, frame, last_event_id_locations, note,
                     open_stream, pump_all, rss_kb, sequence_problems)

NGINX_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
    {{ http }}
    server {
        listen 127.0.0.1:{{ port }}{{ listen_params }};
        location = /events {
            event_piper;
            {{ location }}
        }
        {{ locations }}
    }
}
"""

# The resume point from a query argument (TheOriginalReplayWalkthrough).
EVENTS_ARG = """\
        location = /events-arg {
            event_piper;
            event_piper_last_event_id $arg_last;
        }
"""

MB = 1024  # VmRSS is in kB


def without_heartbeats(body):
    return bytes(body).replace(HEARTBEAT, b"")


class ReplayTestCase(EventPiperTestCase):

    def expected_frames(self, subscriber):
        """(positions, exact bytes) of every committed event of `subscriber`, from the table."""
        rows = self.pg.sql("select position, type, payload::text from events where subscriber = %s "
                           "and position is not null order by position", (subscriber,))
        positions = [r[0] for r in rows]
        return positions, b"".join(frame(p, t, compact_json(d)) for p, t, d in rows)

    def assert_stream_is(self, c, subscriber, what="stream"):
        positions, body = self.expected_frames(subscriber)
        problems = sequence_problems(c.event_ids(), positions)
        self.assertEqual(problems, "", "%s of %s: %s" % (what, subscriber, problems))
        self.assertTrue(without_heartbeats(c.body) == body,
                        "%s of %s: the ids are right but the bytes differ" % (what, subscriber))


class TheOriginalReplayWalkthrough(ReplayTestCase):
    """README: `curl /events -H "X-Consumer-Id: toto" -H "Last-Event-ID: 5"` gives 6, 7, 8..."""

    def test_last_event_id_5_replays_6_7_8_then_goes_live(self):
        for _ in range(8):
            self.pg.insert("toto")
        ngx = self.start_nginx()
        c = self.stream(ngx, "toto", last_event_id="5", settle=0)
        c.wait_events(3, timeout=T(10))
        self.assertEqual(without_heartbeats(c.body), frame(6) + frame(7) + frame(8))
        self.pg.insert("toto", '{"foo": "live"}')
        c.wait_events(4)
        c.read_for(0.5)
        self.assertEqual(without_heartbeats(c.body),
                         frame(6) + frame(7) + frame(8) + frame(9, data='{"foo":"live"}'))

    def test_replay_holds_only_the_consumers_own_events(self):
        for i in range(1, 21):  # toto gets the odd positions, titi the even ones
            self.pg.insert("toto" if i % 2 else "titi", '{"i": %d}' % i)
        ngx = self.start_nginx()
        toto = self.stream(ngx, "toto", last_event_id="6", settle=0)
        titi = self.stream(ngx, "titi", last_event_id="0", settle=0)
        toto.wait_events(7)
        titi.wait_events(10)
        toto.read_for(0.5)
        titi.drain()
        self.assertEqual(without_heartbeats(toto.body),
                         b"".join(frame(i, data='{"i":%d}' % i) for i in range(7, 21, 2)))
        self.assertEqual(without_heartbeats(titi.body),
                         b"".join(frame(i, data='{"i":%d}' % i) for i in range(2, 21, 2)))

    def test_the_resume_point_can_come_from_another_variable(self):
        for _ in range(8):
            self.pg.insert("toto")
        ngx = self.start_nginx(extra_locations=EVENTS_ARG)
        c = self.stream(ngx, "toto", path="/events-arg?last=5", settle=0)
        c.wait_events(3)
        c.read_for(0.3)
        self.assertEqual(without_heartbeats(c.body), frame(6) + frame(7) + frame(8))


class ResumePointEdges(ReplayTestCase):

    def test_last_event_id_of_the_newest_event_is_just_live(self):
        for _ in range(8):
            self.pg.insert("toto")
        ngx = self.start_nginx()
        c = self.stream(ngx, "toto", last_event_id="8", settle=0)
        c.read_for(1)
        self.assertEqual(without_heartbeats(c.body), b"")
        self.pg.insert("toto")
        c.wait_events(1)
        self.assertEqual(without_heartbeats(c.body), frame(9))

    def test_last_event_id_zero_replays_everything(self):
        for _ in range(3):
            self.pg.insert("toto")
        ngx = self.start_nginx()
        c = self.stream(ngx, "toto", last_event_id="0", settle=0)
        c.wait_events(3)
        self.assertEqual(without_heartbeats(c.body), frame(1) + frame(2) + frame(3))

    def test_last_event_id_beyond_the_newest_is_just_live(self):
        """design/issue 3: "N beyond the newest event: just live"; the stream opens, replays
        nothing, and the next event inserted for the consumer is delivered."""
        for _ in range(8):
            self.pg.insert("toto")
        ngx = self.start_nginx()
        c = self.stream(ngx, "toto", last_event_id="1000", settle=0)
        top = self.stream(ngx, "toto", last_event_id="9223372036854775807", settle=0)
        c.read_for(1)
        top.drain()
        self.assertEqual(without_heartbeats(c.body), b"")
        self.assertEqual(without_heartbeats(top.body), b"")
        self.pg.insert("toto")
        c.wait_events(1)
        top.wait_events(1)
        self.assertEqual(without_heartbeats(c.body), frame(9))
        self.assertEqual(without_heartbeats(top.body), frame(9))

    def test_a_last_event_id_that_is_not_a_non_negative_integer_is_400(self):
        for _ in range(8):
            self.pg.insert("toto")
        # nginx strips spaces around header values, so " 5" and "5 " reach the module through
        # a variable; /events-set-5 proves that path works with a good value.
        locs = last_event_id_locations(
            (("leading-space", " 5"), ("trailing-space", "5 "), ("set-5", "5")))
        ngx = self.start_nginx(extra_locations=locs)
        for value in (b"-1", b"abc", b"5x", b"99999999999999999999999", b"18446744073709551616",
                      b"9223372036854775808", b"\t5", b"5 5", b"0x10", b"1.5", b"5\x01"):
            with self.subTest(last_event_id=value):
                c = self.client(ngx)
                c.request("GET", "/events", [("X-Consumer-Id", "toto"), ("Last-Event-ID", value)])
                self.assert_400(c)
        for path in ("/events-leading-space", "/events-trailing-space"):
            with self.subTest(path=path):
                c = self.client(ngx)
                c.request("GET", path, [("X-Consumer-Id", "toto")])
                self.assert_400(c)
        good = self.stream(ngx, "toto", path="/events-set-5", settle=0)
        good.wait_events(3)
        self.assertEqual(without_heartbeats(good.body), frame(6) + frame(7) + frame(8))

    def assert_400(self, c):
        c.wait_complete()
        self.assertEqual(c.status, 400, bytes(c.raw[:400]))
        self.assertTrue((c.header("Content-Type") or "").startswith("text/plain"), c.head)
        body = bytes(c.body)
        self.assertTrue(body.endswith(b"\n") and body.count(b"\n") == 1 and len(body) > 4,
                        "not a one-line text body: %r" % body)


class BigHistory(ReplayTestCase):

    def test_100000_events_replay_complete_in_order_with_bounded_worker_memory(self):
        n = 100000
        t0 = time.monotonic()
        self.pg.insert_many("bulk", n, type="bulk")  # one insert ... select generate_series
        self.assertEqual(self.pg.scalar("select max(position) from events"), n)
        insert_s = time.monotonic() - t0
        ngx = self.start_nginx()
        workers = ngx.worker_pids()
        time.sleep(0.5)
        baseline = {w: rss_kb(w) for w in workers}
        with RssSampler(workers) as rss:
            t0 = time.monotonic()
            c = open_stream(ngx.port, "bulk", "0", keep_raw=False)
            self.addCleanup(c.close)
            self.assertEqual(c.status, 200)
            worker = ngx.wait_worker_of(c)
            c.wait_events(n, timeout=T(240))
            replay_s = time.monotonic() - t0
            c.read_for(0.5)
        ids = c.event_ids()
        self.assertEqual(sequence_problems(ids, list(range(1, n + 1))), "")
        expected = b"".join(frame(i, "bulk", '{"n":%d}' % i) for i in range(1, n + 1))
        self.assertTrue(without_heartbeats(c.body) == expected, "ids right, bytes differ")
        growth = {w: (rss.max.get(w, baseline[w]) - baseline[w]) / MB for w in workers}
        note("100k replay: insert %.1fs, replay %.1fs, %d RSS samples, growth MB %s "
              "(serving worker %d)" % (insert_s, replay_s, rss.samples,
                                       {w: round(g, 1) for w, g in growth.items()}, worker))
        self.assertGreater(rss.samples, 10)
        if not UNDER_ASAN:
            self.assertLess(growth[worker], 16,
                            "serving worker RSS grew %.1f MB" % growth[worker])
        # The stream is live afterwards.
        self.pg.insert("bulk", '{"n": "live"}', type="bulk")
        c.wait_events(n + 1)
        self.assertEqual(c.events[-1].raw, frame(n + 1, "bulk", '{"n":"live"}'))


class ManyReplays(ReplayTestCase):

    def test_20_clients_replaying_at_once_share_a_pool_of_2_and_all_complete(self):
        consumers = ["c%d" % k for k in range(5)]
        per_consumer = 4000
        # 20,000 events interleaved over 5 consumers; 4 clients per consumer, 100 rows a batch:
        # 800 batch queries through 2 replay connections per worker.
        self.pg.sql("insert into events (type, timestamp, subscriber, payload) "
                    "select 'insert', now(), 'c' || (g %% 5), jsonb_build_object('n', g) "
                    "from generate_series(1, %s) as g", (5 * per_consumer,))
        ngx = self.start_nginx(http={"event_piper_replay_connections": 2},
                               location={"event_piper_replay_batch": 100})
        workers = ngx.worker_pids()
        expected = {k: self.expected_frames(k) for k in consumers}

        # A watcher samples pg_stat_activity as fast as it can while the clients replay.
        seen = {"max_total": 0, "ports": set(), "listener_queries": set(), "samples": 0}
        stop = threading.Event()
        started = threading.Event()

        def watch_pool():
            conn = self.pg.connect(user="postgres")
            try:
                while not stop.is_set():
                    rows = self.pg.run(
                        conn, "select application_name, client_port, query from pg_stat_activity "
                        "where application_name in (%s, %s)", (REPLAY_APP, LISTENER_APP))
                    total = 0
                    for app, port, query in rows:
                        if app == LISTENER_APP:
                            seen["listener_queries"].add((query or "").strip().lower()[:200])
                        else:
                            total += 1
                            seen["ports"].add(port)
                    seen["max_total"] = max(seen["max_total"], total)
                    seen["samples"] += 1
                    started.set()
                    stop.wait(0.005)
            finally:
                conn.close()
                started.set()

        watcher = threading.Thread(target=watch_pool, daemon=True)
        watcher.start()
        started.wait(10)
        t0 = time.monotonic()
        try:
            clients = []
            for i in range(20):
                c = open_stream(ngx.port, consumers[i % 5], "0", keep_raw=False)
                self.addCleanup(c.close)
                self.assertEqual(c.status, 200)
                clients.append(c)
            pump_all(clients, lambda: all(len(c.events) >= per_consumer for c in clients),
                     T(180), "20 replays of %d events" % per_consumer)
        finally:
            stop.set()
            watcher.join()
        elapsed = time.monotonic() - t0
        for i, c in enumerate(clients):
            k = consumers[i % 5]
            self.assertEqual(sequence_problems(c.event_ids(), expected[k][0]), "",
                             "client %d (%s)" % (i, k))
            self.assertTrue(without_heartbeats(c.body) == expected[k][1], "client %d bytes" % i)
        # Every replay connection ever seen, by worker (pool connections stay open for later
        # replays, so they can still be traced to their worker through /proc).
        ever = {}
        for port in seen["ports"]:
            w = ngx.worker_of_socket(port, self.pg.port)
            ever[w] = ever.get(w, 0) + 1
        note("pool: 20 replays of %d events in %.1fs; %d samples, at most %d replay connections "
             "at once; distinct replay connections by worker: %s"
             % (per_consumer, elapsed, seen["samples"], seen["max_total"], ever))
        self.assertGreater(len(seen["ports"]), 0, "no replay connection was ever seen")
        self.assertLessEqual(seen["max_total"], 2 * len(workers))
        for w, n in ever.items():
            self.assertLessEqual(n, 2, "%d replay connections of worker %s (None: closed since)"
                                 % (n, w))
        for q in seen["listener_queries"]:
            self.assertNotIn("subscriber", q, "the listening connection ran a replay query: %r" % q)
        self.assertEqual(len(self.pg.listeners()), len(workers))
        # Every client went live.
        for k in consumers:
            self.pg.insert(k, '{"live": "%s"}' % k)
        pump_all(clients, lambda: all(len(c.events) >= per_consumer + 1 for c in clients), T(15),
                 "the live event on every client")
        for i, c in enumerate(clients):
            self.assertEqual(c.events[-1].raw,
                             frame(5 * per_consumer + 1 + i % 5,
                                   data='{"live":"%s"}' % consumers[i % 5]))


class Handover(ReplayTestCase):

    def test_inserts_made_during_a_replay_arrive_exactly_once_and_in_order(self):
        history = 20000
        self.pg.insert_many("toto", history,
                            payload_sql="jsonb_build_object('n', g, 'pad', repeat('h', 150))")
        ngx = self.start_nginx(location={"event_piper_replay_batch": 200})
        c = open_stream(ngx.port, "toto", "0", rcvbuf=16384, keep_raw=False)
        self.addCleanup(c.close)
        self.assertEqual(c.status, 200)
        c.wait_events(1)

        state = {"received_when_done": None, "error": None}

        def writer():
            conn = self.pg.connect()
            try:
                cur = conn.cursor()
                for k in range(1, 301):
                    cur.execute("insert into events (type, timestamp, subscriber, payload) "
                                "values ('insert', now(), 'toto', %s)", ('{"live": %d}' % k,))
                    if k % 3 == 0:
                        cur.execute("insert into events (type, timestamp, subscriber, payload) "
                                    "values ('insert', now(), 'other', %s)", ('{"k": %d}' % k,))
                    time.sleep(0.004)
            except Exception as e:  # reported by the main thread
                state["error"] = e
            finally:
                conn.close()
                state["received_when_done"] = len(c.events)

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        # Read slowly (8 KB every 10 ms) so that the replay is still running while they insert.
        deadline = time.monotonic() + T(180)
        while t.is_alive() or len(c.events) < history + 300:
            self.assertLess(time.monotonic(), deadline,
                            "timed out: %d of %d events" % (len(c.events), history + 300))
            self.assertFalse(c.eof, "the stream ended")
            if c.pump(0.2, max_bytes=8192):
                time.sleep(0.01)
        t.join()
        self.assertIsNone(state["error"])
        c.read_for(1)  # anything after this point would be a duplicate
        note("handover: %d of %d history events had arrived when the 300 inserts were "
              "done" % (state["received_when_done"], history))
        self.assertLess(state["received_when_done"], history,
                        "the replay ended before the inserts did: the handover was not exercised")
        self.assert_stream_is(c, "toto", "replay + live")


class SlowClient(ReplayTestCase):

    def test_a_client_that_stops_reading_during_20000_events_gets_them_all_later(self):
        n = 20000
        ngx = self.start_nginx(location={"event_piper_stream_buffer": "64k"},
                               listen_params="sndbuf=16k")
        workers = ngx.worker_pids()
        c = open_stream(ngx.port, "slow", rcvbuf=65536, keep_raw=False)
        self.addCleanup(c.close)
        self.assertEqual(c.status, 200)
        c.read_for(0.3)
        time.sleep(0.3)
        baseline = {w: rss_kb(w) for w in workers}
        with RssSampler(workers) as rss:
            # 20 transactions of 1,000 events of ~2 KB each (40 MB), while the client reads nothing.
            t0 = time.monotonic()
            for b in range(20):
                self.pg.insert_many("slow", 1000, start=b * 1000 + 1,
                                    payload_sql="jsonb_build_object('n', g, 'pad', repeat('s', 2000))")
            insert_s = time.monotonic() - t0
            time.sleep(3)
            stalled = {w: rss_kb(w) for w in workers}
            # Now read everything.
            c.wait_events(n, timeout=T(180))
            c.read_for(1)
        ids = c.event_ids()
        self.assertEqual(sequence_problems(ids, list(range(1, n + 1))), "")
        pad = "s" * 2000
        expected = b"".join(frame(i, data='{"n":%d,"pad":"%s"}' % (i, pad)) for i in range(1, n + 1))
        self.assertTrue(without_heartbeats(c.body) == expected, "ids right, bytes differ")
        growth = {w: (rss.max.get(w, baseline[w]) - baseline[w]) / MB for w in workers}
        note("slow client: inserts %.1fs; RSS growth MB %s (while stalled: %s)"
             % (insert_s, {w: round(g, 1) for w, g in growth.items()},
                {w: round((stalled[w] - baseline[w]) / MB, 1) for w in workers}))
        for w in workers:
            if not UNDER_ASAN:
                self.assertLess(growth[w], 16, "worker %d RSS grew %.1f MB (40 MB of events)"
                                % (w, growth[w]))
        # Still live afterwards.
        self.pg.insert("slow", '{"after": true}')
        c.wait_events(n + 1)
        self.assertEqual(c.events[-1].raw, frame(n + 1, data='{"after":true}'))

