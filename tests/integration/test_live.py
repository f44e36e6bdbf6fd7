"""Live event streaming, told as the user stories of the original service.

Each test starts its own nginx (2 workers, NGINX_CONF) with the module against the run's PostgreSQL
(fixtures `db`, `nginx`, `clients` of conftest.py), speaks raw HTTP/1.1 over sockets and asserts on
the bytes. A client can land on either worker, so tests about
"every session" open streams until both workers serve at least one.
"""

import re
import time

import pytest

from harness import (HEARTBEAT, LISTENER_APP, REPLAY_APP, T, client_socket_count, fd_count, frame,
                     pump_all, streams_on_every_worker, wait_until)

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
    }
}
"""

ORIGINAL_INSERT = ("insert into events (type, timestamp, subscriber, payload) "
                   "values ('insert', now(), 'toto', '{\"foo\": \"bar\"}');")


def without_heartbeats(body):
    return bytes(body).replace(HEARTBEAT, b"")


def assert_one_line_text_error(c, status, what=""):
    c.wait_complete()
    ctx = "%s: response %r" % (what, bytes(c.raw[:600]))
    assert c.status == status, ctx
    ctype = c.header("Content-Type") or ""
    assert ctype.startswith("text/plain"), "Content-Type %r; %s" % (ctype, ctx)
    body = bytes(c.body)
    assert body.endswith(b"\n"), "body is not one terminated line: %r" % body
    assert body.count(b"\n") == 1, "body is not one line: %r" % body
    assert len(body.strip()) > 3, "body says nothing: %r" % body
    assert b"<html" not in body.lower(), "nginx's HTML error page instead of a text line: " + ctx
    assert b"\r" not in body, ctx
    return body


# -- TheOriginalWalkthrough --
# README: curl /events with X-Consumer-Id: toto, insert with psql, see the event.

@pytest.mark.smoke
def test_an_inserted_event_is_pushed_byte_exact(db, nginx, clients):
    ngx = nginx.start(db)
    c = clients.stream(ngx, "toto")
    assert without_heartbeats(c.body) == b"", "nothing but heartbeats before an insert"

    rc, out = db.psql(ORIGINAL_INSERT)  # the original's statement, the way a user runs it
    assert rc == 0, out
    c.wait_events(1)
    assert c.events[0].raw == b'id: 1\nevent: insert\ndata: {"foo":"bar"}\n\n'
    assert without_heartbeats(c.body) == b'id: 1\nevent: insert\ndata: {"foo":"bar"}\n\n'


def test_more_events_are_pushed_as_they_come_in_order(db, nginx, clients):
    ngx = nginx.start(db)
    c = clients.stream(ngx, "toto")
    for i in range(1, 6):
        db.insert("toto", '{"foo": "bar", "n": %d}' % i, type="update" if i % 2 else "insert")
    c.wait_events(5)
    expected = b"".join(frame(i, "update" if i % 2 else "insert", '{"n":%d,"foo":"bar"}' % i)
                        for i in range(1, 6))
    assert without_heartbeats(c.body) == expected


def test_payload_json_is_compacted_without_changing_it(db, nginx, clients):
    ngx = nginx.start(db)
    c = clients.stream(ngx, "toto")
    cases = [
        # (payload as inserted, payload on the wire): jsonb orders keys (shorter first)
        ('{"foo": "bar"}', '{"foo":"bar"}'),
        ('{ "a" : [1, 2, {"b": null}], "c": true, "d": false }',
         '{"a":[1,2,{"b":null}],"c":true,"d":false}'),
        ('{"text": "caf\u00e9 \u2603 \U0001F600"}', '{"text":"caf\u00e9 \u2603 \U0001F600"}'),
        ('{"esc": "quote \\" backslash \\\\ slash / nl \\n tab \\t ctl \\u0001"}',
         '{"esc":"quote \\" backslash \\\\ slash / nl \\n tab \\t ctl \\u0001"}'),
        ('{"big": 12345678901234567890123, "dec": 0.1, "neg": -2.50, "exp": 1e3}',
         '{"big":12345678901234567890123,"dec":0.1,"exp":1000,"neg":-2.50}'),
        ('[1, "two", {"three": 3}]', '[1,"two",{"three":3}]'),
        ('"just a string"', '"just a string"'),
        ('42', '42'),
        ('{}', '{}'),
        ('{"spaces in key": "  value  "}', '{"spaces in key":"  value  "}'),
    ]
    for payload, _ in cases:
        db.insert("toto", payload)
    c.wait_events(len(cases))
    for i, (payload, wire) in enumerate(cases, 1):
        assert c.events[i - 1].raw == frame(i, "insert", wire), "payload %r" % payload


def test_two_sessions_of_toto_both_receive_every_event(db, nginx, clients):
    ngx = nginx.start(db)
    streams, by_worker = streams_on_every_worker(clients, ngx, "toto", minimum=2)
    db.insert("toto")
    db.insert("toto", '{"second": true}')
    expected = frame(1) + frame(2, data='{"second":true}')
    pump_all(streams, lambda: all(len(s.events) >= 2 for s in streams), T(15),
             "every session to get 2 events")
    for w, ss in by_worker.items():
        for s in ss:
            assert without_heartbeats(s.body) == expected, "session on worker %d" % w


def test_another_consumer_receives_nothing_of_toto(db, nginx, clients):
    ngx = nginx.start(db)
    toto = clients.stream(ngx, "toto")
    others, _ = streams_on_every_worker(clients, ngx, "titi", minimum=2)
    lookalikes = [clients.stream(ngx, name, settle=0)
                  for name in ("tot", "toto2", "TOTO", "toto ", "%", "*")]
    # "toto " above: nginx strips trailing spaces, so that one IS toto; checked below.
    db.insert("toto")
    toto.wait_events(1)
    for c in others + lookalikes:
        c.read_for(0.3)
    time.sleep(1)
    for c in others + lookalikes:
        c.drain()
    assert without_heartbeats(toto.body) == frame(1)
    for c in others:
        assert without_heartbeats(c.body) == b"", "titi got toto's event"
    for name, c in zip(("tot", "toto2", "TOTO", "toto ", "%", "*"), lookalikes):
        want = frame(1) if name == "toto " else b""
        assert without_heartbeats(c.body) == want, "consumer %r" % name

    # And titi's own events reach titi only.
    db.insert("titi", '{"for": "titi"}')
    pump_all(others, lambda: all(len(c.events) >= 1 for c in others), T(15), "titi's event")
    for c in others:
        assert without_heartbeats(c.body) == frame(2, data='{"for":"titi"}')
    toto.read_for(1)
    assert without_heartbeats(toto.body) == frame(1)


# -- StreamHeaders --

def test_the_stream_starts_with_event_stream_headers_at_once(db, nginx, clients):
    ngx = nginx.start(db)
    t0 = time.monotonic()
    c = clients.open(ngx, "toto")  # headers come before any event
    assert time.monotonic() - t0 < T(5), "headers must not wait for a first event"
    assert c.status_line == "HTTP/1.1 200 OK"
    assert c.header_all("Content-Type") == ["text/event-stream"]
    assert c.header_all("Cache-Control") == ["no-cache"]
    assert c.header_all("X-Accel-Buffering") == ["no"]
    assert c.header("Transfer-Encoding") == "chunked"
    assert c.header("Content-Length") is None
    db.insert("toto")
    c.wait_events(1)
    # The body is chunked: the raw bytes after the head are valid chunk framing around it.
    raw_body = bytes(c.raw[len(c.head):])
    assert re.search(rb"^([0-9a-fA-F]+\r\n)", raw_body)
    assert frame(1) in b"".join(c.chunks)


def test_head_gets_the_headers_and_no_body(db, nginx, clients):
    ngx = nginx.start(db)
    c = clients.client(ngx)
    c.request("HEAD", "/events", [("X-Consumer-Id", "toto")])
    c.wait_headers()
    assert c.status == 200, c.head
    assert c.header("Content-Type") == "text/event-stream"
    c.read_for(1)
    assert bytes(c.raw[len(c.head):]) == b"", "a HEAD response has no body"


# -- Heartbeat --

def test_an_idle_stream_gets_heartbeats(db, nginx, clients):
    ngx = nginx.start(db, location={"event_piper_heartbeat": "1s"})
    c = clients.stream(ngx, "toto", settle=0)
    t0 = time.monotonic()
    c.wait(lambda: len(c.heartbeats) >= 2, T(8), "two heartbeats")
    assert time.monotonic() - t0 > 1.0, "heartbeats come after the idle time"
    for f in c.frames:
        assert f.raw == b"event: heartbeat\ndata: \n\n"
        assert f.id is None, "a heartbeat has no id (it must not move Last-Event-ID)"
    assert bytes(c.body) == HEARTBEAT * len(c.heartbeats)
    # An event between heartbeats is framed as usual.
    db.insert("toto")
    c.wait_events(1)
    c.wait(lambda: len(c.heartbeats) >= 3, T(8), "a heartbeat after the event")
    assert without_heartbeats(c.body) == frame(1)


def test_no_heartbeat_while_events_flow(db, nginx, clients):
    ngx = nginx.start(db, location={"event_piper_heartbeat": "1s"})
    c = clients.stream(ngx, "toto", settle=0)
    # The idle timer starts when the stream opens; insert well within it, for 3 seconds.
    deadline = time.monotonic() + 3
    n = 0
    while time.monotonic() < deadline:
        n += 1
        db.insert("toto", '{"n": %d}' % n)
        c.read_for(0.35)
    c.wait_events(n)
    assert len(c.heartbeats) == 0, "heartbeat sent although the stream was not idle"
    c.wait(lambda: len(c.heartbeats) >= 1, T(6), "a heartbeat once idle")


# -- ErrorAnswers --

def test_no_consumer_id_is_401(db, nginx, clients):
    ngx = nginx.start(db)
    for headers in ([], [("X-Consumer-Id", "")], [("X-Consumer-Id", "   ")]):
        c = clients.client(ngx)
        c.request("GET", "/events", headers)
        assert_one_line_text_error(c, 401, "headers %r" % headers)


def test_bad_consumer_id_is_400(db, nginx, clients):
    ngx = nginx.start(db)
    bad = [b"a" * 257, b"to\x01to", b"to\x1bto", b"to\x7fto", b"to\tto", b"\x1f"]
    for value in bad:
        c = clients.client(ngx)
        c.request("GET", "/events", [("X-Consumer-Id", value)])
        assert_one_line_text_error(c, 400, "consumer %r (%d bytes)" % (value[:20], len(value)))


def test_consumer_ids_up_to_256_bytes_are_fine(db, nginx, clients):
    ngx = nginx.start(db)
    names = ["a" * 256, "user@example.com", "caf\u00e9-\u2603", "a b", "o'neil;--"]
    streams = []
    for name in names:
        c = clients.open(ngx, name.encode("utf-8"))
        assert c.status == 200, "consumer %r: %r" % (name, c.head)
        streams.append(c)
    for c in streams:
        c.read_for(0.05)
    for name in names:
        db.insert(name, '{"to": %d}' % len(name))
    for i, (name, c) in enumerate(zip(names, streams), 1):
        c.wait_events(1)
        assert without_heartbeats(c.body) == frame(i, data='{"to":%d}' % len(name)), \
            "consumer %r" % name[:20]


def test_methods_other_than_get_and_head_are_405(db, nginx, clients):
    ngx = nginx.start(db)
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        c = clients.client(ngx)
        body = b'{"foo": "bar"}' if method in ("POST", "PUT", "PATCH") else b""
        c.request(method, "/events", [("X-Consumer-Id", "toto")], body)
        assert_one_line_text_error(c, 405, method)


# -- Cleanup --

@pytest.mark.smoke
def test_a_client_that_disconnects_is_cleaned_up_at_once(db, nginx, clients):
    ngx = nginx.start(db, location={"event_piper_heartbeat": "1s"})
    workers = ngx.worker_pids()
    fds_before = {w: fd_count(w) for w in workers}
    c = clients.stream(ngx, "toto", settle=0)
    ngx.wait_log("event_piper: stream opened", 1)
    assert ngx.log_count("event_piper: stream closed") == 0
    t0 = time.monotonic()
    c.close()
    ngx.wait_log("event_piper: stream closed", 1, timeout=T(3))
    assert time.monotonic() - t0 < T(3)

    # Many at once, closed politely (FIN) and abruptly (RST), on both workers.
    many = [clients.stream(ngx, "toto%d" % (i % 3), settle=0) for i in range(20)]
    ngx.wait_log("event_piper: stream opened", 21)
    for i, s in enumerate(many):
        if i % 2:
            s.reset()
        else:
            s.close()
    ngx.wait_log("event_piper: stream closed", 21, timeout=T(5))
    assert ngx.log_count("event_piper: stream opened") == \
        ngx.log_count("event_piper: stream closed")

    # Nothing left behind: no client connection stays open, and the workers hold no more fds
    # than before but for the replay connections they opened on demand and keep (a stream that
    # opens before its worker has heard the listener's position catches up through one); then
    # events for the gone consumers harm nothing, and no timer holds the workers at quit.
    def fds_back():
        replay = len(db.app_connections(REPLAY_APP))
        return all(client_socket_count(w, ngx.port) == 0 for w in workers) and \
            sum(fd_count(w) for w in workers) <= sum(fds_before.values()) + replay
    try:
        wait_until(fds_back, T(5), what="no client socket left, fds back to %r + the replay "
                   "connections" % fds_before)
    except AssertionError as e:
        now = {w: (fd_count(w), client_socket_count(w, ngx.port)) for w in workers}
        raise AssertionError("%s; now (fds, client sockets): %r, replay connections: %d" %
                             (e, now, len(db.app_connections(REPLAY_APP)))) from None
    for name in ("toto", "toto0", "toto1", "toto2"):
        db.insert(name)
    time.sleep(0.5)
    assert ngx.quit() < T(5), "nginx -s quit took too long"
    errors = [l for l in ngx.read_error_log().splitlines()
              if "[error]" in l or "[crit]" in l]
    assert errors == []


# -- GracefulQuit --

@pytest.mark.smoke
def test_quit_with_open_streams_ends_them_with_a_retry_hint(db, nginx, clients):
    ngx = nginx.start(db)
    streams, _ = streams_on_every_worker(clients, ngx, "toto", minimum=4)
    db.insert("toto")
    pump_all(streams, lambda: all(len(s.events) >= 1 for s in streams), T(15),
             "the event on every stream")
    t0 = time.monotonic()
    elapsed = ngx.quit(timeout=T(10))
    assert elapsed < T(5), "the master exited %.1fs after quit" % elapsed
    for s in streams:
        s.wait_complete(timeout=T(5))
        assert s.complete, "stream not ended with the last chunk: %r" % bytes(s.raw[-120:])
        assert bytes(s.raw).endswith(b"\r\n0\r\n\r\n"), bytes(s.raw[-120:])
        last = s.frames[-1]
        assert re.search(rb"^retry: [1-9][0-9]*\n\n$", last.raw), \
            "the last frame is not a retry hint: %r" % bytes(s.body[-120:])
        assert without_heartbeats(s.body)[:len(frame(1))] == frame(1)
        s.wait_eof(timeout=T(5))
    assert time.monotonic() - t0 < T(10)
    assert ngx.bad_log_lines() == []


# -- ListenerConnections --

def test_two_workers_hold_exactly_two_listening_connections(db, nginx, clients):
    # One listener per worker: `per_worker` (the shared default is test_shared_listener.py's).
    ngx = nginx.start(db, workers=2, http={"event_piper_listener": "per_worker"})
    db.wait_listening(2)
    streams = [clients.stream(ngx, "c%d" % i, settle=0) for i in range(6)]
    db.insert("c1")
    streams[1].wait_events(1)
    for _ in range(10):  # stays at two, never more
        rows = db.listeners()
        assert len(rows) == 2, "listener connections: %r" % (rows,)
        for pid, state, query in rows:
            assert "subscriber" not in (query or "").lower(), \
                "the listener ran a replay query: %r" % query
        time.sleep(0.2)
    assert db.app_connections(REPLAY_APP) == [], "live streams must not open replay connections"
    # Each worker holds one of them.
    by_worker = {}
    for (port,) in db.superuser_sql(
            "select client_port from pg_stat_activity where application_name = %s",
            (LISTENER_APP,)):
        by_worker.setdefault(ngx.worker_of_socket(port, db.port), 0)
        by_worker[ngx.worker_of_socket(port, db.port)] += 1
    assert by_worker == {w: 1 for w in ngx.worker_pids()}

