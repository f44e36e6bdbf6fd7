"""What an attack on the product found, each item with the test that failed before.

Identity (two consumer headers, %-encoded query arguments), silent stalls (a frozen listening
backend, the server's reason for refusing a connection, server notices, a channel mismatch),
query storms (large events, undeliverable events), memory pinned by clients that do not read,
reloads held by such clients, 405 on the status and health locations, durable defaults. The tests
run on a cluster of their own, since they change roles, settings and policies and freeze backends.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

sys.path.append(os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                              "chaos")))

import harness  # noqa: E402
from harness import (HEARTBEAT, REPO, T, frame, pid_alive, rss_kb,  # noqa: E402
                     streams_on_every_worker, wait_until)
from piper_chaos import (LISTENER_APP, hold_tcp, http_get, log_entries, pg_back_up,  # noqa: E402
                         status, wait_all_listening)

NGINX_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
    {{ http }}
    server {
        listen 127.0.0.1:{{ port }};
        location = /events {
            event_piper;
            {{ location }}
        }
        location = /browser/events {
            event_piper;
            event_piper_consumer $arg_consumer urldecode;
        }
        location = /literal/events {
            event_piper;
            event_piper_consumer $arg_consumer;
        }
        location = /gateway/events {
            event_piper;
            event_piper_consumer $http_x_user;
        }
        location = /status { event_piper_status; }
        location = /manage/health { event_piper_health; }
    }
}
"""


def without_heartbeats(body):
    return bytes(body).replace(HEARTBEAT, b"")


@pytest.fixture
def db(private_pg):
    pg_back_up(private_pg)
    private_pg.truncate()
    yield private_pg
    pg_back_up(private_pg)


def replay_queries(ngx):
    return status(ngx)["replay_queries"]


def one_line_error(c, code):
    c.wait_complete(T(10))
    body = bytes(c.body)
    assert c.status == code, (c.status_line, body)
    assert (c.header("Content-Type") or "").startswith("text/plain")
    assert body.endswith(b"\n") and body.count(b"\n") == 1, body
    return body


def request(ngx, path, headers=(), method="GET"):
    c = harness.HttpClient(ngx.port)
    c.request(method, path, headers)
    return c


# --------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------

def test_two_consumer_headers_are_refused(db, nginx, clients):
    """Item 2: a gateway that appends its header after the client's must not be overridden."""
    ngx = nginx.start(db)
    c = clients.track(request(ngx, "/events", [("X-Consumer-Id", "a"), ("X-Consumer-Id", "b")]))
    assert b"more than one consumer id header" in one_line_error(c, 400)
    c = clients.track(request(ngx, "/events", [("X-Consumer-Id", "a"), ("x-consumer-id", "b")]))
    one_line_error(c, 400)
    # The same for a header named by event_piper_consumer.
    c = clients.track(request(ngx, "/gateway/events", [("X-User", "a"), ("X-User", "b")]))
    one_line_error(c, 400)
    # One header: a stream, as before.
    single = clients.track(request(ngx, "/gateway/events", [("X-User", "bob")]))
    single.wait_headers(T(10))
    assert single.status == 200
    db.insert("bob")
    single.wait_events(1)
    assert single.events[0].raw == frame(1)


def test_urldecode_gives_the_decoded_id_and_checks_its_bytes(db, nginx, clients):
    """Item 3: ?consumer=alice%40example.com is alice@example.com with `urldecode`."""
    ngx = nginx.start(db)
    c = clients.stream(ngx, path="/browser/events?consumer=alice%40example.com", consumer=None)
    literal = clients.stream(ngx, path="/literal/events?consumer=alice%40example.com",
                             consumer=None)
    db.insert("alice@example.com", '{"to": "alice"}')
    db.insert("alice%40example.com", '{"to": "literal"}')
    c.wait_events(1)
    literal.wait_events(1)
    c.read_for(0.3)
    assert without_heartbeats(c.body) == frame(1, data='{"to":"alice"}')
    assert without_heartbeats(literal.body) == frame(2, data='{"to":"literal"}')
    for bad, reason in (("%00", b"control"), ("a%0ab", b"control"), ("%ff", b"UTF-8"),
                        ("50%", b"escape"), ("%4", b"escape"), ("%zz", b"escape")):
        r = clients.track(request(ngx, "/browser/events?consumer=" + bad))
        assert reason in one_line_error(r, 400), bad


def test_urldecode_reads_query_arguments_as_browsers_send_them(db, nginx, clients):
    """With `urldecode`, '+' is a space (URLSearchParams, forms) and a plus is %2B; blanks at
    either end of the id go, as for listed ids; an id of blanks only is missing."""
    ngx = nginx.start(db)
    plus = clients.stream(ngx, path="/browser/events?consumer=alice+smith", consumer=None)
    padded = clients.stream(ngx, path="/browser/events?consumer=+bob%20%20", consumer=None)
    escaped = clients.stream(ngx, path="/browser/events?consumer=a%2Bb", consumer=None)
    literal = clients.stream(ngx, path="/literal/events?consumer=a+b", consumer=None)
    for sub, n in (("alice+smith", 1), (" bob", 2), ("a b", 3), ("alice smith", 4), ("bob", 5),
                   ("a+b", 6)):
        db.insert(sub, '{"n": %d}' % n)
    for c in (plus, padded, escaped, literal):
        c.wait_events(1)
    literal.read_for(0.3)
    assert without_heartbeats(plus.body) == frame(4, data='{"n":4}')
    assert without_heartbeats(padded.body) == frame(5, data='{"n":5}')
    assert without_heartbeats(escaped.body) == frame(6, data='{"n":6}')
    assert without_heartbeats(literal.body) == frame(6, data='{"n":6}')
    for blank in ("+", "%20+%20", ""):
        r = clients.track(request(ngx, "/browser/events?consumer=" + blank))
        assert one_line_error(r, 401) == (b"missing consumer id (by default the X-Consumer-Id "
                                          b"header, see event_piper_consumer)\n"), blank
    r = clients.track(request(ngx, "/browser/events?consumer=bob%09"))
    assert b"control" in one_line_error(r, 400)


# --------------------------------------------------------------------------------------------
# Silent stalls
# --------------------------------------------------------------------------------------------

def listener_backends(db):
    return [pid for pid, in db.superuser_sql(
        "select pid from pg_stat_activity where application_name = %s", (LISTENER_APP,))]


def test_a_frozen_listener_is_noticed_reported_down_and_its_streams_catch_up(db, nginx, clients):
    """Item 4: kill -STOP of the listening backend; with event_piper_listener_timeout 3s the
    worker notices, reports DOWN while it cannot reconnect, and catches its stream up."""
    ngx = nginx.start(db, workers=1, http={"event_piper_listener_timeout": "3s"})
    wait_all_listening(ngx)
    c = clients.stream(ngx, "toto")
    db.insert("toto", '{"n": 1}')
    c.wait_events(1)
    [frozen] = listener_backends(db)
    os.kill(frozen, signal.SIGSTOP)
    try:
        hold_tcp(db)  # the replacement cannot log in yet: DOWN must be visible
        db.insert("toto", '{"n": 2}')  # notified to the frozen backend: never read
        wait_until(lambda: http_get(ngx.port, "/manage/health").status == 503, T(15),
                   what="health DOWN after the frozen listener is noticed")
        wait_until(lambda: status(ngx)["workers"][0]["listener"] == "connecting", T(5),
                   what="status to say the listener is not listening")  # published each second
        lines = [m for _, _, m in log_entries(ngx)
                 if "listener connection lost: no answer from the server" in m]
        assert len(lines) == 1, log_entries(ngx)
        hold_tcp(db, False)
        wait_until(lambda: http_get(ngx.port, "/manage/health").status == 200, T(20),
                   what="health UP with a new listener")
        # The frozen backend stays in pg_stat_activity until it runs again; a new one listens.
        assert len(set(listener_backends(db)) - {frozen}) == 1
        c.wait_events(2, T(15))
        db.insert("toto", '{"n": 3}')
        c.wait_events(3, T(15))
        c.read_for(0.3)
        assert without_heartbeats(c.body) == b"".join(
            frame(i, data='{"n":%d}' % i) for i in (1, 2, 3))
    finally:
        os.kill(frozen, signal.SIGCONT)


def test_the_servers_reason_for_refusing_the_listener_is_logged(db, nginx, clients):
    """Item 6: the listener is cut and cannot log in again ("too many connections for role"):
    the log says why, not only that it lost the connection."""
    ngx = nginx.start(db, workers=1)
    wait_all_listening(ngx)
    db.superuser_sql("alter role event_piper connection limit 0")
    try:
        db.superuser_sql("select pg_terminate_backend(pid) from pg_stat_activity "
                         "where application_name = %s", (LISTENER_APP,))
        ngx.wait_log('listener cannot connect: ', 1, T(15))
        [line] = [m for _, _, m in log_entries(ngx) if "listener cannot connect" in m]
        assert 'too many connections for role "event_piper"' in line, line
    finally:
        db.superuser_sql("alter role event_piper connection limit -1")
    wait_all_listening(ngx)


def test_server_notices_reach_the_error_log_with_a_level(db, nginx, clients):
    """Item 6: a NOTICE on a module connection is an error-log line with nginx's timestamp and
    level, not raw text on the worker's stderr. The notice comes from a row security policy
    that the replay query runs into."""
    db.superuser_sql("""
        create or replace function event_piper_test_notice() returns boolean
        language plpgsql as $$ begin raise notice 'hello from the policy'; return true; end $$;
        alter table events enable row level security;
        alter table events force row level security;
        drop policy if exists event_piper_test on events;
        create policy event_piper_test on events using (event_piper_test_notice());
    """)
    try:
        ngx = nginx.start(db, workers=1)
        db.insert("toto")
        c = clients.stream(ngx, "toto", last_event_id="0", settle=0)
        c.wait_events(1)
        ngx.wait_log("hello from the policy", 1, T(10))
        raw = [line for line in ngx.read_error_log().splitlines()
               if "hello from the policy" in line]
        assert all(re.match(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[notice\] \d+#\d+: event_piper: "
                            r"event_piper_replay connection: NOTICE:  hello from the policy$",
                            line) for line in raw), raw
    finally:
        db.superuser_sql("""
            drop policy if exists event_piper_test on events;
            alter table events no force row level security;
            alter table events disable row level security;
            drop function if exists event_piper_test_notice();
        """)


def test_a_channel_the_database_does_not_notify_is_reported(db, nginx, clients):
    """Item 15: event_piper_channel differs from the database's event_piper.channel."""
    db.superuser_sql("alter database event_piper set event_piper.channel = 'elsewhere'")
    try:
        ngx = nginx.start(db, workers=1)
        wait_all_listening(ngx)
        ngx.wait_log('the database notifies channel "elsewhere" (setting event_piper.channel) '
                     'but event_piper_channel is "new_events"', 1, T(10))
        wait_until(lambda: status(ngx)["channel_mismatch"] == 1, T(5), what="status mismatch")
    finally:
        db.superuser_sql("alter database event_piper reset event_piper.channel")
    ngx2 = nginx.start(db, workers=1)
    wait_all_listening(ngx2)
    time.sleep(1.2)
    assert status(ngx2)["channel_mismatch"] == 0
    assert ngx2.log_count("event_piper_channel is") == 0


def test_with_a_channel_the_database_does_not_notify_streams_still_get_every_event(db, nginx,
                                                                                   clients):
    """No notification reaches the listener (the database notifies another channel): the
    listener's check sees positions committed a check period earlier that nothing announced and
    sends every stream to the table. Late (here the check runs every second), never stalled, on
    both workers (the hint goes through the relay), each event once."""
    db.superuser_sql("alter database event_piper set event_piper.channel = 'elsewhere'")
    try:
        ngx = nginx.start(db, http={"event_piper_listener_timeout": "3s"})
        wait_all_listening(ngx)
        toto, _ = streams_on_every_worker(clients, ngx, "toto", minimum=2)
        titi = clients.stream(ngx, "titi")
        conn = db.connect()  # a new session: it notifies 'elsewhere'
        try:
            cur = conn.cursor()
            for n in range(3):
                cur.execute("insert into events (type, timestamp, subscriber, payload) "
                            "values ('insert', now(), 'toto', %s)", ('{"n": %d}' % n,))
                conn.commit()
        finally:
            conn.close()
        for c in toto:
            c.wait_events(3, T(15))
        time.sleep(2.5)  # two more checks: nothing is sent twice
        for c in toto:
            assert [e.raw for e in c.events] == \
                [frame(p, data='{"n":%d}' % n) for n, p in enumerate((1, 2, 3))]
        titi.read_for(0.1)
        assert titi.events == []
        ngx.wait_log("were committed a check period ago but not notified on channel "
                     "\"new_events\"", 1, T(5))
    finally:
        db.superuser_sql("alter database event_piper reset event_piper.channel")


def test_rows_that_never_got_a_position_are_reported_and_repaired_by_the_schema(db, nginx,
                                                                                 clients):
    """Item 5: the trigger disabled for a while: 80 committed rows without a position. The
    listener's check counts them: a warning in the error log and `unpositioned_rows` in status;
    applying schema.sql again gives them positions and they reach the live stream."""
    ngx = nginx.start(db, workers=1, http={"event_piper_listener_timeout": "3s"})
    wait_all_listening(ngx)
    c = clients.stream(ngx, "toto")
    db.superuser_sql("alter table events disable trigger events_commit_notify")
    try:
        db.insert_many("toto", 80)
    finally:
        db.superuser_sql("alter table events enable trigger events_commit_notify")
    ngx.wait_log("80 committed rows of table events have no position", 1, T(10))
    wait_until(lambda: status(ngx)["unpositioned_rows"] == 80, T(5), what="status count")
    assert without_heartbeats(c.body) == b""
    rc, out = db.psql("", "--single-transaction", "-f",
                      os.path.join(REPO, "postgresql", "schema.sql"))
    assert rc == 0, out
    c.wait_events(80, T(20))
    assert c.event_ids() == [p for p in db.positions("toto")]
    ngx.wait_log("every row of table events has a position again", 1, T(10))
    wait_until(lambda: status(ngx)["unpositioned_rows"] == 0, T(5), what="status count 0")


# --------------------------------------------------------------------------------------------
# Query storms and memory
# --------------------------------------------------------------------------------------------

def big_payload(n, size=9000):
    return '{"n": %d, "pad": "%s"}' % (n, "x" * size)


def test_large_events_are_read_once_per_consumer_not_once_per_stream(db, nginx, clients):
    """Item 7: 200 live streams of one consumer and 5 events over NOTIFY's limit. Before: one
    replay query per stream per event (about 1,000); now the streams at the same position share
    a query."""
    ngx = nginx.start(db)
    wait_all_listening(ngx)
    streams = [clients.stream(ngx, "many", settle=0) for _ in range(200)]
    harness.pump_all(streams, lambda: all(c.status == 200 for c in streams), T(20),
                     "200 streams open")
    time.sleep(1.2)
    before = replay_queries(ngx)
    for n in range(1, 6):
        db.insert("many", big_payload(n))
    want = b"".join(frame(n, data='{"n":%d,"pad":"%s"}' % (n, "x" * 9000)) for n in range(1, 6))
    harness.pump_all(streams, lambda: all(len(c.events) >= 5 for c in streams), T(60),
                     "5 large events everywhere")
    for c in streams:
        assert without_heartbeats(c.body) == want
    time.sleep(1.2)  # status is published once a second
    queries = replay_queries(ngx) - before
    harness.note("200 streams x 5 large events: %d replay queries" % queries)
    assert queries <= 40, queries


def test_events_nobody_can_receive_cause_no_query(db, nginx, clients):
    """Item 8: events for a subscriber of 8,000 bytes (no request can name it: ids over 256
    bytes are refused) with 100 unrelated live streams open cause no replay query."""
    ngx = nginx.start(db)
    wait_all_listening(ngx)
    streams = [clients.stream(ngx, "unrelated-%d" % i, settle=0) for i in range(100)]
    harness.pump_all(streams, lambda: all(c.status == 200 for c in streams), T(20),
                     "100 streams open")
    time.sleep(1.2)
    before = replay_queries(ngx)
    for n in range(5):
        db.insert("s" * 8000, '{"n": %d}' % n)
    db.insert("unrelated-7", '{"last": true}')
    streams[7].wait_events(1, T(15))
    time.sleep(1.2)
    assert replay_queries(ngx) - before == 0
    assert streams[7].events[0].raw == frame(6, data='{"last":true}')


def test_clients_that_do_not_read_cannot_pin_more_than_the_replay_budget(db, nginx, clients):
    """Item 9: 10 clients that never read resume on rows of 4 MB. The worker holds at most
    event_piper_replay_memory (8m) of their batches plus one batch; the others wait their turn,
    and everything arrives once they read."""
    ngx = nginx.start(db, workers=1, http={"event_piper_replay_memory": "8m"})
    wait_all_listening(ngx)
    [worker] = ngx.worker_pids()
    db.insert_many("heavy", 5, payload_sql="jsonb_build_object('n', g, 'pad', repeat('y', 4000000))")
    base = rss_kb(worker)
    sleepers = [clients.open(ngx, "heavy", "0", rcvbuf=4096, keep_raw=False) for _ in range(10)]
    # Most wait for the budget (the first batches fill it); then the worker's memory is read.
    wait_until(lambda: status(ngx)["replay_queued"] >= 5, T(30), what="5 streams waiting")
    time.sleep(1)
    grown_mb = (rss_kb(worker) - base) / 1024
    st = status(ngx)
    harness.note("10 non-reading clients on 4 MB rows: RSS +%.0f MB, %d waiting"
                 % (grown_mb, st["replay_queued"]))
    assert st["replay_queued"] >= 5, st  # most wait for the budget
    if not os.environ.get("EVENT_PIPER_NGINX_PRELOAD"):  # ASan's quarantine keeps freed memory
        assert grown_mb < 60, grown_mb  # 10 x 4 MB x copies would be well over 100 MB
    for c in sleepers:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    harness.pump_all(sleepers, lambda: all(len(c.events) >= 5 for c in sleepers), T(120),
                     "every row to every client")
    for c in sleepers:
        assert c.event_ids() == [1, 2, 3, 4, 5]


def test_a_reload_is_not_held_by_clients_that_do_not_read(db, nginx, clients):
    """Item 10: with 5 clients that stopped reading, the old workers exit within seconds of a
    reload, not after send_timeout (60 s); the clients resume like after any disconnect."""
    ngx = nginx.start(db, http={"send_timeout": "60s"})
    wait_all_listening(ngx)
    stuck = [clients.open(ngx, "stuck", rcvbuf=4096, keep_raw=False) for _ in range(5)]
    db.insert_many("stuck", 40, payload_sql="jsonb_build_object('n', g, 'pad', repeat('z', 60000))")
    time.sleep(2)  # their sockets fill up
    old = ngx.worker_pids()
    t0 = time.monotonic()
    ngx.reload()
    wait_until(lambda: not any(pid_alive(p) for p in old), T(30),
               what="old workers to exit")
    took = time.monotonic() - t0
    harness.note("old workers exited %.1fs after the reload" % took)
    assert took < 15, took
    wait_all_listening(ngx)


# --------------------------------------------------------------------------------------------
# Small things
# --------------------------------------------------------------------------------------------

def test_status_and_health_answer_other_methods_like_the_event_location(db, nginx, clients):
    """Item 13: 405 with Allow and a one-line text, not nginx's HTML page."""
    ngx = nginx.start(db)
    for path in ("/manage/health", "/status", "/events"):
        c = clients.track(request(ngx, path, method="POST"))
        one_line_error(c, 405)
        assert c.header("Allow") == "GET, HEAD", path


def test_pgctl_clusters_are_durable_unless_asked(run_root):
    """Item 11: `make run`'s PostgreSQL keeps fsync and synchronous_commit on."""
    datadir = os.path.join(harness.make_tmp("pg-durable"), "pg")
    env = dict(os.environ)
    env.pop("EVENT_PIPER_PG_FAST", None)
    port = harness.free_port()
    pgctl = os.path.join(REPO, "scripts", "pgctl.sh")
    r = subprocess.run([pgctl, "start", datadir, str(port)], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    assert r.returncode == 0, r.stdout
    try:
        pg = harness.Postgres(datadir, port)
        got = {name: pg.superuser_sql("show %s" % name)[0][0]
               for name in ("fsync", "synchronous_commit", "full_page_writes")}
        assert got == {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
    finally:
        subprocess.run([pgctl, "stop", datadir], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def test_the_example_is_sized_for_real_loads():
    """Item 12: nginx.conf.example holds more than 10,000 idle streams per instance."""
    with open(os.path.join(REPO, "nginx.conf.example")) as f:
        text = f.read()
    workers = int(re.search(r"(?m)^worker_processes (\d+);", text).group(1))
    connections = int(re.search(r"(?m)^\s*worker_connections (\d+);", text).group(1))
    nofile = int(re.search(r"(?m)^worker_rlimit_nofile (\d+);", text).group(1))
    assert workers * connections >= 20000
    assert nofile >= connections + 64
