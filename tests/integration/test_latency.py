"""Nothing holds notifications back.

A backend sends notifications only between queries: whatever the LISTEN connection runs holds
back every notification until it answers. The listener's periodic check once read table events
there (rows that never got a position), and on a table of 2,000,000 events that took up to 3 s
on a loaded machine, during which live events waited and then came all at once
(bench/findings.md). These tests run the same conditions on a smaller table: a few hundred
thousand events with a row that never got a position, checks every second, live events at
50 a second on both workers (the holder's own streams and the relayed ones) over several checks.

The tests run on a cluster of their own (the table is large).
"""

import json
import os
import select
import sys
import threading
import time

import psycopg2
import pytest

sys.path.append(os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                              "chaos")))

from harness import LISTENER_APP, T, streams_on_every_worker, wait_until  # noqa: E402
from piper_chaos import status  # noqa: E402

NGINX_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
    event_piper_listener_timeout 3s;
    server {
        listen 127.0.0.1:{{ port }};
        location = /events { event_piper; }
        location = /status { event_piper_status; }
    }
}
"""

ROWS = int(os.environ.get("EVENT_PIPER_LATENCY_ROWS", "400000"))
RATE = 50          # events a second
SECONDS = 6        # six checks at least (one a second with event_piper_listener_timeout 3s)


@pytest.fixture(scope="module")
def big(private_pg):
    """ROWS events with positions (written the way a bulk load bypasses the trigger), and one
    row, 5,000 ids below the newest (among those the listener's first check reads), that never
    got a position."""
    unpositioned_id = ROWS - 5000
    conn = private_pg.connect(user="postgres")
    try:
        cur = conn.cursor()
        cur.execute("SET session_replication_role = replica")
        cur.execute("INSERT INTO events (type, timestamp, subscriber, payload) "
                    "SELECT 'bulk', now(), 'bulk' || (g %% 100), "
                    "       jsonb_build_object('n', g, 'p', repeat('x', 64)) "
                    "  FROM generate_series(1, %s) g", (ROWS,))
        cur.execute("INSERT INTO event_positions (position, event_id, subscriber) "
                    "SELECT row_number() OVER (ORDER BY id), id, subscriber FROM events "
                    " WHERE id <> %s", (unpositioned_id,))
        cur.execute("SELECT setval('events_position_seq', %s)", (ROWS,))
        cur.execute("RESET session_replication_role")
        cur.execute("VACUUM ANALYZE events")
        cur.execute("VACUUM ANALYZE event_positions")
    finally:
        conn.close()
    return private_pg


class ListenerSampler:
    """Polls pg_stat_activity: the longest time the listening backend was seen running one
    query, and that query."""

    def __init__(self, pg):
        self.conn = pg.connect(user="postgres")
        self.longest, self.query, self.samples = 0.0, None, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        cur = self.conn.cursor()
        while not self._stop.is_set():
            cur.execute("SELECT extract(epoch FROM clock_timestamp() - query_start)::float8, "
                        "       query FROM pg_stat_activity "
                        " WHERE application_name = %s AND state = 'active'", (LISTENER_APP,))
            for secs, query in cur.fetchall():
                if secs is not None and secs > self.longest:
                    self.longest, self.query = secs, query
            self.samples += 1
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.conn.close()


def publish(pg, n, rate, stop):
    """n events of consumer 'lat' at `rate` a second, each carrying its send time."""
    conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user="event_piper",
                            password="event_piper", dbname="event_piper")
    conn.autocommit = True
    cur = conn.cursor()
    t0 = time.time()
    try:
        for s in range(n):
            if stop.is_set():
                return
            delay = t0 + s / rate - time.time()
            if delay > 0:
                time.sleep(delay)
            cur.execute("insert into events (type, timestamp, subscriber, payload) "
                        "values ('insert', now(), 'lat', %s)",
                        (json.dumps({"t": time.time(), "s": s}),))
    finally:
        conn.close()


def receive(streams, n, timeout):
    """Reads every stream until each has n events; returns {stream index: [latency s]}, the
    latency of an event being the time it was read minus the time its insert was sent."""
    latencies = {i: [] for i in range(len(streams))}
    seen = [len(c.events) for c in streams]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(len(c.events) < n for c in streams):
        ready, _, _ = select.select(streams, [], [], 0.05)
        for c in ready:
            c.pump(0)
        now = time.time()
        for i, c in enumerate(streams):
            for e in c.events[seen[i]:]:
                latencies[i].append(now - json.loads(e.data)["t"])
            seen[i] = len(c.events)
    return latencies


def test_live_events_are_never_held_back_by_the_check_of_a_large_table(big, nginx, clients):
    """No event later than 1 s (the lag measured before the fix grew with the table: 3 s on
    2,000,000 rows), and the listening backend never runs a query for long: its check must be a
    trivial round trip. The row without a position is still counted (status)."""
    ngx = nginx.start(big)
    streams, by_worker = streams_on_every_worker(clients, ngx, "lat", minimum=2)
    n = RATE * SECONDS
    stop = threading.Event()
    with ListenerSampler(big) as sampler:
        writer = threading.Thread(target=publish, args=(big, n, RATE, stop))
        writer.start()
        try:
            latencies = receive(streams, n, SECONDS + T(20))
        finally:
            stop.set()
            writer.join()
    for i, c in enumerate(streams):
        assert len(c.events) == n, "stream %d got %d of %d events" % (i, len(c.events), n)
        assert [json.loads(e.data)["s"] for e in c.events] == list(range(n))
    worst = max(max(v) for v in latencies.values())
    late = sum(1 for v in latencies.values() for x in v if x > 0.1)
    print("latency: worst %.1f ms, %d of %d deliveries over 100 ms; the listening backend's "
          "longest query seen %.1f ms (%d samples): %r"
          % (worst * 1000, late, n * len(streams), sampler.longest * 1000, sampler.samples,
             (sampler.query or "")[:80]))
    assert worst <= T(1.0), "an event came %.0f ms after its insert" % (worst * 1000)
    assert sampler.longest <= T(0.2), (
        "the listening backend ran one query for %.0f ms: %r"
        % (sampler.longest * 1000, sampler.query))
    assert sampler.samples >= SECONDS * 20
    # The guarantee the check gives is kept: the row without a position is counted.
    wait_until(lambda: status(ngx)["unpositioned_rows"] == 1, T(10), what="unpositioned_rows 1")
    ngx_log = ngx.read_error_log()
    assert "1 committed rows of table events have no position" in ngx_log
