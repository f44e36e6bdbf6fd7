"""History replay with Last-Event-ID, bounded and gap-free into live.

A client that was away resumes with `Last-Event-ID: N` and gets every event of its consumer after
N, in order, then live events: no gap, no duplicate, whatever the size of the history and however
slow the client. Byte-exact, against a real nginx (2 workers) and PostgreSQL.
"""

import threading
import time

import pytest

from harness import (HEARTBEAT, LISTENER_APP, REPLAY_APP, UNDER_ASAN,
                     RssSampler, T, compact_json, frame, last_event_id_locations, note,
                     pump_all, rss_kb, sequence_problems)

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


def expected_frames(db, subscriber):
    """(positions, exact bytes) of every committed event of `subscriber`, from the table."""
    rows = db.sql("select position, type, payload::text from event_log where subscriber = %s "
                  "and position is not null order by position", (subscriber,))
    positions = [r[0] for r in rows]
    return positions, b"".join(frame(p, t, compact_json(d)) for p, t, d in rows)


def assert_stream_is(db, c, subscriber, what="stream"):
    positions, body = expected_frames(db, subscriber)
    problems = sequence_problems(c.event_ids(), positions)
    assert problems == "", "%s of %s: %s" % (what, subscriber, problems)
    assert without_heartbeats(c.body) == body, \
        "%s of %s: the ids are right but the bytes differ" % (what, subscriber)


# -- TheOriginalReplayWalkthrough --
# README: `curl /events -H "X-Consumer-Id: toto" -H "Last-Event-ID: 5"` gives 6, 7, 8...

@pytest.mark.smoke
def test_last_event_id_5_replays_6_7_8_then_goes_live(db, nginx, clients):
    for _ in range(8):
        db.insert("toto")
    ngx = nginx.start(db)
    c = clients.stream(ngx, "toto", last_event_id="5", settle=0)
    c.wait_events(3, timeout=T(10))
    assert without_heartbeats(c.body) == frame(6) + frame(7) + frame(8)
    db.insert("toto", '{"foo": "live"}')
    c.wait_events(4)
    c.read_for(0.5)
    assert without_heartbeats(c.body) == \
        frame(6) + frame(7) + frame(8) + frame(9, data='{"foo":"live"}')


def test_replay_holds_only_the_consumers_own_events(db, nginx, clients):
    for i in range(1, 21):  # toto gets the odd positions, titi the even ones
        db.insert("toto" if i % 2 else "titi", '{"i": %d}' % i)
    ngx = nginx.start(db)
    toto = clients.stream(ngx, "toto", last_event_id="6", settle=0)
    titi = clients.stream(ngx, "titi", last_event_id="0", settle=0)
    toto.wait_events(7)
    titi.wait_events(10)
    toto.read_for(0.5)
    titi.drain()
    assert without_heartbeats(toto.body) == \
        b"".join(frame(i, data='{"i":%d}' % i) for i in range(7, 21, 2))
    assert without_heartbeats(titi.body) == \
        b"".join(frame(i, data='{"i":%d}' % i) for i in range(2, 21, 2))


def test_the_resume_point_can_come_from_another_variable(db, nginx, clients):
    for _ in range(8):
        db.insert("toto")
    ngx = nginx.start(db, extra_locations=EVENTS_ARG)
    c = clients.stream(ngx, "toto", path="/events-arg?last=5", settle=0)
    c.wait_events(3)
    c.read_for(0.3)
    assert without_heartbeats(c.body) == frame(6) + frame(7) + frame(8)


# -- ResumePointEdges --

def test_last_event_id_of_the_newest_event_is_just_live(db, nginx, clients):
    for _ in range(8):
        db.insert("toto")
    ngx = nginx.start(db)
    c = clients.stream(ngx, "toto", last_event_id="8", settle=0)
    c.read_for(1)
    assert without_heartbeats(c.body) == b""
    db.insert("toto")
    c.wait_events(1)
    assert without_heartbeats(c.body) == frame(9)


def test_last_event_id_zero_replays_everything(db, nginx, clients):
    for _ in range(3):
        db.insert("toto")
    ngx = nginx.start(db)
    c = clients.stream(ngx, "toto", last_event_id="0", settle=0)
    c.wait_events(3)
    assert without_heartbeats(c.body) == frame(1) + frame(2) + frame(3)


def test_last_event_id_beyond_the_newest_is_just_live(db, nginx, clients):
    """N beyond the newest event: just live. The stream opens, replays
    nothing, and the next event inserted for the consumer is delivered."""
    for _ in range(8):
        db.insert("toto")
    ngx = nginx.start(db)
    c = clients.stream(ngx, "toto", last_event_id="1000", settle=0)
    top = clients.stream(ngx, "toto", last_event_id="9223372036854775807", settle=0)
    c.read_for(1)
    top.drain()
    assert without_heartbeats(c.body) == b""
    assert without_heartbeats(top.body) == b""
    db.insert("toto")
    c.wait_events(1)
    top.wait_events(1)
    assert without_heartbeats(c.body) == frame(9)
    assert without_heartbeats(top.body) == frame(9)


def test_a_last_event_id_that_is_not_a_non_negative_integer_is_400(db, nginx, clients):
    for _ in range(8):
        db.insert("toto")
    # nginx strips spaces around header values, so " 5" and "5 " reach the module through
    # a variable; /events-set-5 proves that path works with a good value.
    locs = last_event_id_locations(
        (("leading-space", " 5"), ("trailing-space", "5 "), ("set-5", "5")))
    ngx = nginx.start(db, extra_locations=locs)
    for value in (b"-1", b"abc", b"5x", b"99999999999999999999999", b"18446744073709551616",
                  b"9223372036854775808", b"\t5", b"5 5", b"0x10", b"1.5", b"5\x01"):
        c = clients.client(ngx)
        c.request("GET", "/events", [("X-Consumer-Id", "toto"), ("Last-Event-ID", value)])
        assert_400(c, "Last-Event-ID %r" % value)
    for path in ("/events-leading-space", "/events-trailing-space"):
        c = clients.client(ngx)
        c.request("GET", path, [("X-Consumer-Id", "toto")])
        assert_400(c, path)
    good = clients.stream(ngx, "toto", path="/events-set-5", settle=0)
    good.wait_events(3)
    assert without_heartbeats(good.body) == frame(6) + frame(7) + frame(8)


def test_two_last_event_id_headers_are_400(db, nginx, clients):
    """Which of two resume points the client meant is a guess (nginx's variable takes the
    first): refused like two consumer headers."""
    for _ in range(3):
        db.insert("toto")
    ngx = nginx.start(db)
    for values in ((b"1", b"2"), (b"2", b"2"), (b"", b"1")):
        c = clients.client(ngx)
        c.request("GET", "/events", [("X-Consumer-Id", "toto")]
                  + [("Last-Event-ID", v) for v in values])
        assert_400(c, "Last-Event-ID twice: %r" % (values,))
        assert b"more than one Last-Event-ID header" in bytes(c.body)
    c = clients.client(ngx)
    c.request("GET", "/events", [("X-Consumer-Id", "toto"), ("Last-Event-ID", "1"),
                                 ("last-event-id", "2")])
    assert_400(c, "Last-Event-ID twice, in two cases")
    one = clients.stream(ngx, "toto", last_event_id="1", settle=0)
    one.wait_events(2)
    assert without_heartbeats(one.body) == frame(2) + frame(3)


def assert_400(c, what):
    c.wait_complete()
    assert c.status == 400, "%s: %r" % (what, bytes(c.raw[:400]))
    assert (c.header("Content-Type") or "").startswith("text/plain"), "%s: %r" % (what, c.head)
    body = bytes(c.body)
    assert body.endswith(b"\n") and body.count(b"\n") == 1 and len(body) > 4, \
        "%s: not a one-line text body: %r" % (what, body)


# -- BigHistory --

def test_100000_events_replay_complete_in_order_with_bounded_worker_memory(db, nginx, clients):
    n = 100000
    t0 = time.monotonic()
    db.insert_many("bulk", n, type="bulk")  # one insert ... select generate_series
    assert db.scalar("select max(position) from event_log") == n
    insert_s = time.monotonic() - t0
    ngx = nginx.start(db)
    workers = ngx.worker_pids()
    time.sleep(0.5)
    baseline = {w: rss_kb(w) for w in workers}
    with RssSampler(workers) as rss:
        t0 = time.monotonic()
        c = clients.open(ngx, "bulk", "0", keep_raw=False)
        assert c.status == 200
        worker = ngx.wait_worker_of(c)
        c.wait_events(n, timeout=T(240))
        replay_s = time.monotonic() - t0
        c.read_for(0.5)
    ids = c.event_ids()
    assert sequence_problems(ids, list(range(1, n + 1))) == ""
    expected = b"".join(frame(i, "bulk", '{"n":%d}' % i) for i in range(1, n + 1))
    assert (without_heartbeats(c.body) == expected), "ids right, bytes differ"
    growth = {w: (rss.max.get(w, baseline[w]) - baseline[w]) / MB for w in workers}
    note("100k replay: insert %.1fs, replay %.1fs, %d RSS samples, growth MB %s "
         "(serving worker %d)" % (insert_s, replay_s, rss.samples,
                                  {w: round(g, 1) for w, g in growth.items()}, worker))
    assert rss.samples > 10
    if not UNDER_ASAN:
        assert growth[worker] < 16, "serving worker RSS grew %.1f MB" % growth[worker]
    # The stream is live afterwards.
    db.insert("bulk", '{"n": "live"}', type="bulk")
    c.wait_events(n + 1)
    assert c.events[-1].raw == frame(n + 1, "bulk", '{"n":"live"}')


# -- ManyReplays --

def test_20_clients_replaying_at_once_share_a_pool_of_2_and_all_complete(db, nginx, clients):
    consumers = ["c%d" % k for k in range(5)]
    per_consumer = 4000
    # 20,000 events interleaved over 5 consumers; 4 clients per consumer, 100 rows a batch:
    # 800 batch queries through 2 replay connections per worker.
    db.sql("insert into events (type, timestamp, subscriber, payload) "
           "select 'insert', now(), 'c' || (g %% 5), jsonb_build_object('n', g) "
           "from generate_series(1, %s) as g", (5 * per_consumer,))
    ngx = nginx.start(db, http={"event_piper_replay_connections": 2},
                      location={"event_piper_replay_batch": 100})
    workers = ngx.worker_pids()
    expected = {k: expected_frames(db, k) for k in consumers}

    # A watcher samples pg_stat_activity as fast as it can while the clients replay.
    seen = {"max_total": 0, "ports": set(), "listener_queries": set(), "samples": 0}
    stop = threading.Event()
    started = threading.Event()

    def watch_pool():
        conn = db.connect(user="postgres")
        try:
            while not stop.is_set():
                rows = db.run(
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
        replaying = []
        for i in range(20):
            c = clients.open(ngx, consumers[i % 5], "0", keep_raw=False)
            assert c.status == 200
            replaying.append(c)
        pump_all(replaying, lambda: all(len(c.events) >= per_consumer for c in replaying),
                 T(180), "20 replays of %d events" % per_consumer)
    finally:
        stop.set()
        watcher.join()
    elapsed = time.monotonic() - t0
    for i, c in enumerate(replaying):
        k = consumers[i % 5]
        assert sequence_problems(c.event_ids(), expected[k][0]) == "", "client %d (%s)" % (i, k)
        assert (without_heartbeats(c.body) == expected[k][1]), "client %d bytes" % i
    # Every replay connection ever seen, by worker (pool connections stay open for later
    # replays, so they can still be traced to their worker through /proc).
    ever = {}
    for port in seen["ports"]:
        w = ngx.worker_of_socket(port, db.port)
        ever[w] = ever.get(w, 0) + 1
    note("pool: 20 replays of %d events in %.1fs; %d samples, at most %d replay connections "
         "at once; distinct replay connections by worker: %s"
         % (per_consumer, elapsed, seen["samples"], seen["max_total"], ever))
    assert len(seen["ports"]) > 0, "no replay connection was ever seen"
    assert seen["max_total"] <= 2 * len(workers)
    for w, n in ever.items():
        assert n <= 2, ("%d replay connections of worker %s (None: closed since)"
                        % (n, w))
    for q in seen["listener_queries"]:
        assert "subscriber" not in q, "the listening connection ran a replay query: %r" % q
    assert len(db.listeners()) == ngx.listeners_expected
    # Every client went live.
    for k in consumers:
        db.insert(k, '{"live": "%s"}' % k)
    pump_all(replaying, lambda: all(len(c.events) >= per_consumer + 1 for c in replaying), T(15),
             "the live event on every client")
    for i, c in enumerate(replaying):
        assert (c.events[-1].raw == frame(5 * per_consumer + 1 + i % 5,
                                          data='{"live":"%s"}' % consumers[i % 5]))


# -- Handover --

def test_inserts_made_during_a_replay_arrive_exactly_once_and_in_order(db, nginx, clients):
    history = 20000
    db.insert_many("toto", history,
                   payload_sql="jsonb_build_object('n', g, 'pad', repeat('h', 150))")
    # Small buffers on the server's side too (its send buffer, the stream's buffer): while the
    # client does not read, the replay cannot run ahead of it by more than ~100 kB.
    ngx = nginx.start(db, location={"event_piper_replay_batch": 200,
                                    "event_piper_stream_buffer": "64k"},
                      listen_params="sndbuf=16k")
    c = clients.open(ngx, "toto", "0", rcvbuf=16384, keep_raw=False)
    assert c.status == 200
    c.wait_events(1)

    state = {"received_when_done": None, "error": None}

    def writer():
        conn = db.connect()
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
    # Read slowly (8 KB every 10 ms) so that the replay is still running while they insert,
    # and not past half the history before the writer is done: a slow writer (a loaded machine)
    # must not let the replay end first. With the buffers above, half the history (~2 MB) is
    # then still in the table when the last insert commits.
    deadline = time.monotonic() + T(180)
    while t.is_alive() or len(c.events) < history + 300:
        assert time.monotonic() < deadline, \
            "timed out: %d of %d events" % (len(c.events), history + 300)
        assert not c.eof, "the stream ended"
        if t.is_alive() and len(c.events) >= history // 2:
            time.sleep(0.05)
        elif c.pump(0.2, max_bytes=8192):
            time.sleep(0.01)
    t.join()
    assert state["error"] is None
    c.read_for(1)  # anything after this point would be a duplicate
    note("handover: %d of %d history events had arrived when the 300 inserts were "
         "done" % (state["received_when_done"], history))
    assert state["received_when_done"] < history, \
        "the replay ended before the inserts did: the handover was not exercised"
    assert_stream_is(db, c, "toto", "replay + live")


# -- SlowClient --

def test_a_client_that_stops_reading_during_20000_events_gets_them_all_later(db, nginx, clients):
    n = 20000
    ngx = nginx.start(db, location={"event_piper_stream_buffer": "64k"},
                      listen_params="sndbuf=16k")
    workers = ngx.worker_pids()
    c = clients.open(ngx, "slow", rcvbuf=65536, keep_raw=False)
    assert c.status == 200
    c.read_for(0.3)
    time.sleep(0.3)
    baseline = {w: rss_kb(w) for w in workers}
    with RssSampler(workers) as rss:
        # 20 transactions of 1,000 events of ~2 KB each (40 MB), while the client reads nothing.
        t0 = time.monotonic()
        for b in range(20):
            db.insert_many("slow", 1000, start=b * 1000 + 1,
                           payload_sql="jsonb_build_object('n', g, 'pad', repeat('s', 2000))")
        insert_s = time.monotonic() - t0
        time.sleep(3)
        stalled = {w: rss_kb(w) for w in workers}
        # Now read everything.
        c.wait_events(n, timeout=T(180))
        c.read_for(1)
    ids = c.event_ids()
    assert sequence_problems(ids, list(range(1, n + 1))) == ""
    pad = "s" * 2000
    expected = b"".join(frame(i, data='{"n":%d,"pad":"%s"}' % (i, pad)) for i in range(1, n + 1))
    assert (without_heartbeats(c.body) == expected), "ids right, bytes differ"
    growth = {w: (rss.max.get(w, baseline[w]) - baseline[w]) / MB for w in workers}
    note("slow client: inserts %.1fs; RSS growth MB %s (while stalled: %s)"
         % (insert_s, {w: round(g, 1) for w, g in growth.items()},
            {w: round((stalled[w] - baseline[w]) / MB, 1) for w in workers}))
    for w in workers:
        if not UNDER_ASAN:
            assert growth[w] < 16, ("worker %d RSS grew %.1f MB (40 MB of events)"
                                    % (w, growth[w]))
    # Still live afterwards.
    db.insert("slow", '{"after": true}')
    c.wait_events(n + 1)
    assert c.events[-1].raw == frame(n + 1, data='{"after":true}')

