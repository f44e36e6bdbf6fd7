"""Self-tests of the harness (no module needed): the PostgreSQL helpers and the raw HTTP/SSE client
against a plain nginx that returns fixed bytes. If these fail, the other results mean nothing."""

import select
import time

import pytest

from harness import HttpClient, build_request, compact_json, frame, sequence_problems

# A plain nginx (no module): fixed answers for the raw HTTP client to parse.
NGINX_CONF = r"""
http {
    server {
        listen 127.0.0.1:{{ port }};
        location = /fixed {
            default_type text/html;
            sub_filter_types *;
            sub_filter NOPE X;
            return 200 "id: 1\nevent: insert\ndata: {\"foo\":\"bar\"}\n\nevent: heartbeat\ndata: \n\n";
        }
        location = /e {
            default_type text/plain;
            return 401 "no consumer id\n";
        }
        location = /h {
            return 200 "[$http_last_event_id]";
        }
    }
}
"""


@pytest.fixture
def plain_nginx(nginx):
    return nginx.start(None, with_module=False)


# -- the PostgreSQL helpers --

def test_the_original_insert_gets_positions_1_2_3_after_a_truncate(db):
    pg = db
    rc, out = pg.psql("insert into events (type, timestamp, subscriber, payload) values "
                      "('insert', now(), 'toto', '{\"foo\": \"bar\"}');")
    assert rc == 0, out
    pg.insert("toto")
    pg.insert("titi")
    assert pg.positions("toto") == [1, 2]
    assert pg.positions("titi") == [3]
    pg.truncate()
    pg.insert("toto")
    assert pg.sql("select id, position from event_log") == [(1, 1)]


def test_password_login_over_tcp_like_nginx(pg):
    conn = pg.connect(tcp=True)
    try:
        assert pg.run(conn, "select current_user, current_database()") == \
            [("event_piper", "event_piper")]
    finally:
        conn.close()


def test_notifications_reach_a_listener(db):
    pg = db
    conn = pg.connect()
    try:
        pg.run(conn, "LISTEN new_events")
        pg.insert("toto")
        deadline = time.monotonic() + 5
        while not conn.notifies and time.monotonic() < deadline:
            select.select([conn], [], [], 0.5)
            conn.poll()
        assert len(conn.notifies) == 1
        assert conn.notifies[0].channel == "new_events"
    finally:
        conn.close()


def test_sequence_problems_counts():
    assert sequence_problems([1, 2, 3], [1, 2, 3]) == ""
    p = sequence_problems([1, 3, 3, 2], [1, 2, 3, 4])
    assert "1 missing" in p
    assert "1 duplicated" in p
    assert "2 out of order" in p
    assert compact_json('{"n": 1, "pad": "x y"}') == '{"n":1,"pad":"x y"}'


# -- the raw HTTP client --

def test_chunked_body_and_sse_frames(plain_nginx):
    ngx = plain_nginx
    c = HttpClient(ngx.port)
    try:
        c.request("GET", "/fixed", [("X-Consumer-Id", "toto")])
        assert c.request_bytes == (b"GET /fixed HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                   b"X-Consumer-Id: toto\r\n\r\n" % ngx.port)
        c.wait_complete()
        assert c.status_line == "HTTP/1.1 200 OK"
        assert c.header("transfer-encoding") == "chunked"
        assert c.complete
        assert bytes(c.raw).endswith(b"\r\n0\r\n\r\n")
        assert bytes(c.body) == frame(1) + b"event: heartbeat\ndata: \n\n"
        assert [f.raw for f in c.events] == [frame(1)]
        assert len(c.heartbeats) == 1
        assert (c.events[0].id, c.events[0].event, c.events[0].data) == \
            ("1", "insert", '{"foo":"bar"}')
        assert ngx.worker_of(c) in ngx.worker_pids() + [None]
    finally:
        c.close()


def test_byte_by_byte_chunk_parsing():
    c = HttpClient(None)  # a bare parser, fed one byte at a time
    resp = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"7\r\nid: 5\ne\r\n1c\r\nvent: insert\ndata: {\"a\":1}\n\n\r\n"
            b"d\r\nretry: 2000\n\n\r\n0\r\n\r\n")
    for i in range(len(resp)):
        c.feed(resp[i:i + 1])
    assert c.complete
    assert [f.raw for f in c.frames] == \
        [b'id: 5\nevent: insert\ndata: {"a":1}\n\n', b"retry: 2000\n\n"]
    assert c.frames[1].retry == "2000"
    assert c.chunks == [b"id: 5\ne", b'vent: insert\ndata: {"a":1}\n\n', b"retry: 2000\n\n"]


def test_content_length_error_body(plain_nginx):
    c = HttpClient(plain_nginx.port)
    try:
        c.send(build_request("GET", "/e", "x"))
        c.wait_complete()
        assert (c.status, bytes(c.body)) == (401, b"no consumer id\n")
    finally:
        c.close()


def test_nginx_strips_spaces_but_not_tabs_around_header_values(plain_nginx):
    # Why test_replay sends " 5" through a variable rather than a header.
    got = {}
    for v in (b" 5", b"5 ", b"\t5"):
        c = HttpClient(plain_nginx.port)
        try:
            c.request("GET", "/h", [("Last-Event-ID", v)])
            c.wait_complete()
            got[v] = bytes(c.body)
        finally:
            c.close()
    assert got == {b" 5": b"[5]", b"5 ": b"[5]", b"\t5": b"[\t5]"}
