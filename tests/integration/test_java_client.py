"""The Java example client (examples/java/EventPiperClient.java): the JDK's own
java.net.http.HttpClient, compiled here with javac and run as a user runs it.

* Against a scripted server (a socket in this test that answers exact bytes): the parts of the
  SSE specification the module never sends but a client must get right: a byte order mark,
  comments, multi-line data, CR, LF and CRLF line ends, `data` without a colon, an `id` that
  comes alone, an `id` with NUL (ignored), bad `retry` values (ignored), an event cut short by the
  end of the stream (dropped); the reconnect waits the `retry` delay and sends the last id as
  Last-Event-ID; a 204 ends it for good.
* Against nginx and PostgreSQL: live events, an nginx reload (the stream ends with a retry hint,
  the client reconnects with Last-Event-ID and gets what was committed meanwhile from the table)
  and a PostgreSQL restart (the stream stays open; what was committed while the listener was
  down arrives after it is back): every event of the consumer exactly once, in order.

Needs javac and java (Debian's openjdk-17-jdk-headless, installed by scripts/deps.sh test). The
PostgreSQL restart runs on this module's own cluster (conftest.py's `private_pg`).
"""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

sys.path.append(os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                              "chaos")))

from harness import REPO, T, compact_json, make_tmp, sequence_problems  # noqa: E402
from piper_chaos import pg_back_up, wait_all_listening, worker_status  # noqa: E402
from test_real_clients import NodeClient  # noqa: E402

SOURCE = os.path.join(REPO, "examples", "java", "EventPiperClient.java")
JAVAC = shutil.which("javac") or "/usr/bin/javac"
JAVA = shutil.which("java") or "/usr/bin/java"

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
    }
}
"""


@pytest.fixture(scope="module")
def java_classes():
    """The client compiled once for the module (javac -Xlint:all -Werror)."""
    for tool in (JAVAC, JAVA):
        assert os.access(tool, os.X_OK), \
            "%s is missing: Debian's openjdk-17-jdk-headless (scripts/deps.sh test)" % tool
    out = make_tmp("java-classes")
    r = subprocess.run([JAVAC, "-Xlint:all", "-Werror", "-d", out, SOURCE],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=T(180))
    assert r.returncode == 0, "javac failed:\n%s" % r.stdout
    return out


class JavaClient(NodeClient):
    """EventPiperClient in a JVM; its JSON lines are collected like the Node client's."""

    def __init__(self, classes, tmp, url, args=()):
        cmd = [JAVA, "-Xshare:auto", "-XX:TieredStopAtLevel=1", "-cp", classes,
               "EventPiperClient", url] + list(args)
        self.stderr_path = os.path.join(tmp, "java-client.%d.stderr" % time.monotonic_ns())
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr,
                                     stdin=subprocess.DEVNULL)
        self.lines = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def events(self, heartbeats=False):
        return [(e["id"], e["type"], e["data"]) for e in self.of("event")
                if heartbeats or e["type"] != "heartbeat"]

    def wait(self, pred, timeout, what):
        try:
            super().wait(pred, timeout, what)
        except AssertionError as e:
            raise AssertionError(str(e).replace("node client", "java client"))


# --------------------------------------------------------------------------------------------
# The SSE specification against a scripted server
# --------------------------------------------------------------------------------------------

FIRST_BODY = (
    b"\xef\xbb\xbf: a comment, ignored\n"
    b"retry: 300\n\n"                                     # no data: nothing dispatched
    b"id: 1\nevent: insert\ndata: a\ndata:  b\n\n"        # two data lines, one space stripped
    b"data:c\r\n\r\n"                                     # CRLF; the id stays 1, type message
    b"id: 2\rdata: d\r\r"                                 # CR line ends
    b"id: 3\n\n"                                          # an id alone: no event, id becomes 3
    b"id: 9\x00z\ndata: nul\n\n"                          # an id with NUL is ignored
    b"retry: 1x\nretry\nbogus: 1\ndata\n\n"               # bad retry, unknown field, empty data
    b"data: caf\xc3\xa9 \xe2\x9c\x93\n\n"                 # UTF-8
    b"id: 4\ndata: cut short"                             # the stream ends mid-event: dropped
)
SECOND_BODY = b"id: 5\nevent: update\ndata: after\n\n"


class ScriptedServer:
    """Answers the n-th connection with the n-th (status line, headers, body[, seconds to keep
    the connection open and silent after the body]); records each request's headers and the
    time it arrived."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.requests = []
        self.closed_at = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        for status, headers, body, *hold in self.answers:
            conn, _ = self.sock.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
                fields = {}
                for h in head[1:]:
                    name, _, value = h.partition(":")
                    fields[name.strip().lower()] = value.strip()
                self.requests.append((time.monotonic(), head[0], fields))
                conn.sendall(("HTTP/1.1 %s\r\n%sConnection: close\r\n\r\n"
                              % (status, "".join("%s: %s\r\n" % h for h in headers))).encode()
                             + body)
                if hold:
                    time.sleep(hold[0])
                conn.shutdown(socket.SHUT_WR)
                time.sleep(0.05)
            self.closed_at.append(time.monotonic())

    def close(self):
        self.sock.close()


def test_the_client_parses_fields_as_the_sse_specification_says(java_classes):
    sse = [("Content-Type", "text/event-stream; charset=utf-8")]
    server = ScriptedServer([("200 OK", sse, FIRST_BODY), ("200 OK", sse, SECOND_BODY),
                             ("204 No Content", [], b"")])
    tmp = make_tmp("java-scripted")
    c = JavaClient(java_classes, tmp, "http://127.0.0.1:%d/events" % server.port,
                   ["--consumer", "toto", "--header", "Authorization: Bearer x", "--retry",
                    "5000"])
    try:
        c.wait(lambda: c.of("done"), T(60), "the client to stop after the 204")
        assert c.proc.wait(T(10)) == 0, c.stderr()
    finally:
        c.close()
        server.close()
    assert c.events() == [
        ("1", "insert", "a\n b"),
        ("1", "message", "c"),
        ("2", "message", "d"),
        ("3", "message", "nul"),
        ("3", "message", ""),
        ("3", "message", "caf\u00e9 \u2713"),
        ("5", "update", "after"),
    ], c.transcript()
    assert [r["ms"] for r in c.of("retry")] == [300], c.transcript()
    # Three requests: the first without Last-Event-ID, the reconnect with the last id
    # dispatched (3, not the 4 of the cut event), then with 5; each with the client's headers.
    ids = [r[2].get("last-event-id") for r in server.requests]
    assert ids == [None, "3", "5"], server.requests
    for _, line, fields in server.requests:
        assert line == "GET /events HTTP/1.1"
        assert fields["x-consumer-id"] == "toto"
        assert fields["authorization"] == "Bearer x"
        assert fields["accept"] == "text/event-stream"
        assert "upgrade" not in fields
    # It waited the server's retry (300 ms), not its own default (5000 ms).
    gap = server.requests[1][0] - server.closed_at[0]
    assert 0.25 <= gap < 3.0, gap
    assert [(o["n"], o["lastEventId"]) for o in c.of("open")] == [(1, None), (2, "3")]
    errors = c.of("error")
    assert [e["reconnecting"] for e in errors] == [True, True, False], c.transcript()
    assert "204" in errors[-1]["message"]


def test_a_status_other_than_200_ends_the_client_without_reconnecting(java_classes):
    server = ScriptedServer([("401 Unauthorized", [("Content-Type", "text/plain")],
                              b"missing consumer id\n")])
    c = JavaClient(java_classes, make_tmp("java-401"), "http://127.0.0.1:%d/" % server.port)
    try:
        c.wait(lambda: c.of("done"), T(60), "the client to stop")
    finally:
        c.close()
        server.close()
    assert c.of("open") == [] and c.events() == []
    assert [(e["reconnecting"], "401" in e["message"]) for e in c.of("error")] == [(False, True)]
    assert len(server.requests) == 1


def test_a_connection_silent_past_the_idle_timeout_is_replaced_and_resumes(java_classes):
    """A network black hole never ends the stream: the client gives up on it after
    --idle-timeout without a byte, and reconnects with its Last-Event-ID."""
    sse = [("Content-Type", "text/event-stream")]
    server = ScriptedServer([("200 OK", sse, b"retry: 200\nid: 7\ndata: x\n\n", T(8)),
                             ("204 No Content", [], b"")])
    c = JavaClient(java_classes, make_tmp("java-idle"), "http://127.0.0.1:%d/" % server.port,
                   ["--idle-timeout", "1000"])
    try:
        c.wait(lambda: c.of("error"), T(30), "the idle timeout")
        first = c.of("error")[0]
        assert first["reconnecting"], c.transcript()
        assert "nothing received for 1000 ms" in first["message"], c.transcript()
        # Well before the server's silent connection ended by itself.
        assert first["at"] - c.of("open")[0]["at"] < T(4), c.transcript()
        c.wait(lambda: c.of("done"), T(30), "the 204")
    finally:
        c.close()
        server.close()
    assert c.events() == [("7", "message", "x")]
    assert [r[2].get("last-event-id") for r in server.requests] == [None, "7"]


# --------------------------------------------------------------------------------------------
# Against nginx and PostgreSQL: a reload and a PostgreSQL restart
# --------------------------------------------------------------------------------------------

@pytest.fixture
def db(private_pg):
    pg_back_up(private_pg)
    private_pg.truncate()
    yield private_pg
    pg_back_up(private_pg)


def expected_events(pg, subscriber):
    rows = pg.sql("select position, type, payload::text from event_log where subscriber = %s "
                  "and position is not null order by position", (subscriber,))
    return [(str(p), t, compact_json(d)) for p, t, d in rows]


def insert(pg, subscriber, n, type="insert"):
    pg.insert(subscriber, '{"n": %d, "who": "%s"}' % (n, subscriber), type=type)


def test_events_arrive_exactly_once_in_order_through_a_reload_and_a_postgres_restart(
        java_classes, db, nginx):
    retry_ms = 1000
    ngx = nginx.start(db, wait_listening=False,
                      location={"event_piper_retry": "%dms" % retry_ms})
    wait_all_listening(ngx)
    total = 10
    c = JavaClient(java_classes, ngx.tmp, "http://127.0.0.1:%d/events" % ngx.port,
                   ["--consumer", "alice", "--count", str(total)])
    try:
        c.wait(lambda: c.of("open"), T(60), "the first open")

        # Live; bob's events never reach alice.
        insert(db, "alice", 1)
        insert(db, "bob", 1)
        insert(db, "alice", 2, type="update")
        insert(db, "alice", 3)
        c.wait(lambda: len(c.events()) >= 3, T(20), "3 live events")

        # nginx reload: the stream ends with `retry: 1000`; events committed before the client
        # is back come from the table (Last-Event-ID), then live again.
        ngx.reload()
        c.wait(lambda: c.of("error"), T(20), "the stream end")
        assert c.of("error")[0]["reconnecting"], c.transcript()
        insert(db, "alice", 10)
        insert(db, "bob", 10)
        insert(db, "alice", 11, type="update")
        inserted_at = time.time()
        c.wait(lambda: len(c.of("open")) >= 2, T(30), "the reconnection")
        insert(db, "alice", 12)
        c.wait(lambda: len(c.events()) >= 6, T(20), "6 events")
        assert c.of("open")[1]["at"] > inserted_at, "reconnected before the gap events"

        # PostgreSQL restart: the stream stays open; an event committed as soon as it is back
        # (before or while the listener reconnects) and one after are delivered once each.
        wait_all_listening(ngx)
        reconnects = {p: w["listener_reconnects"] for p, w in worker_status(ngx).items()}
        db.stop()
        time.sleep(T(1))
        db.start()
        insert(db, "alice", 20)
        insert(db, "bob", 20)
        insert(db, "alice", 21, type="update")
        holder = [p for p, w in worker_status(ngx).items() if w.get("listener_holder") == 1]
        wait_all_listening(ngx, reconnects_above={p: reconnects[p] for p in holder},
                           timeout=T(30))
        insert(db, "alice", 22)
        insert(db, "alice", 23)
        c.wait(lambda: c.of("done"), T(30), "all %d events" % total)
        assert c.proc.wait(T(10)) == 0, c.stderr()
    finally:
        c.close()

    expected = expected_events(db, "alice")
    assert len(expected) == total
    got = c.events()
    assert sequence_problems([int(i) for i, _, _ in got],
                             [int(i) for i, _, _ in expected]) == ""
    assert got == expected
    # One reconnect (the reload), with the last id seen; the restart kept the stream.
    assert [(o["n"], o["lastEventId"]) for o in c.of("open")] == [(1, None), (2, expected[2][0])]
    assert [e["reconnecting"] for e in c.of("error")] == [True], c.transcript()
    # The hint at each stream start and before the reload's end.
    assert [r["ms"] for r in c.of("retry")] == [retry_ms] * 3, c.transcript()
