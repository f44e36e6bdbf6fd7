"""Issue 2: live event streaming, told as the user stories of the original service.

Each test starts its own nginx (2 workers) with the module against the run's PostgreSQL, speaks raw
HTTP/1.1 over sockets and asserts on the bytes. A client can land on either worker, so tests about
"every session" open streams until both workers serve at least one.
"""

import time

from harness import (EventPiperTestCase, HEARTBEAT, LISTENER_APP, REPLAY_APP, T, fd_count,
                     frame, open_stream, pump_all, wait_until)

NGINX_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
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


class LiveTestCase(EventPiperTestCase):

    def streams_on_every_worker(self, ngx, consumer="toto", minimum=2, attempts=40, **kw):
        """Open streams of `consumer` until every worker serves at least one of them (and at
        least `minimum` are open). Returns (streams, {worker pid: [streams]})."""
        streams, by_worker = [], {}
        workers = set(ngx.worker_pids())
        for _ in range(attempts):
            c = self.stream(ngx, consumer, settle=0, **kw)
            w = ngx.wait_worker_of(c)
            streams.append(c)
            by_worker.setdefault(w, []).append(c)
            if set(by_worker) >= workers and len(streams) >= minimum:
                break
            time.sleep(0.02)
        self.assertEqual(set(by_worker), workers,
                         "could not get a stream on every worker in %d connections" % attempts)
        for c in streams:
            c.read_for(0.05)
        return streams, by_worker

    def assert_one_line_text_error(self, c, status):
        c.wait_complete()
        ctx = "response %r" % bytes(c.raw[:600])
        self.assertEqual(c.status, status, ctx)
        ctype = c.header("Content-Type") or ""
        self.assertTrue(ctype.startswith("text/plain"), "Content-Type %r; %s" % (ctype, ctx))
        body = bytes(c.body)
        self.assertTrue(body.endswith(b"\n"), "body is not one terminated line: %r" % body)
        self.assertEqual(body.count(b"\n"), 1, "body is not one line: %r" % body)
        self.assertGreater(len(body.strip()), 3, "body says nothing: %r" % body)
        self.assertNotIn(b"<html", body.lower(), "nginx's HTML error page instead of a text line")
        self.assertNotIn(b"\r", body)
        return body


class TheOriginalWalkthrough(LiveTestCase):
    """README: curl /events with X-Consumer-Id: toto, insert with psql, see the event."""

    def test_an_inserted_event_is_pushed_byte_exact(self):
        ngx = self.start_nginx()
        c = self.stream(ngx, "toto")
        self.assertEqual(without_heartbeats(c.body), b"", "nothing but heartbeats before an insert")

        rc, out = self.pg.psql(ORIGINAL_INSERT)  # the original's statement, the way a user runs it
        self.assertEqual(rc, 0, out)
        c.wait_events(1)
        self.assertEqual(c.events[0].raw, b'id: 1\nevent: insert\ndata: {"foo":"bar"}\n\n')
        self.assertEqual(without_heartbeats(c.body), b'id: 1\nevent: insert\ndata: {"foo":"bar"}\n\n')

    def test_more_events_are_pushed_as_they_come_in_order(self):
        ngx = self.start_nginx()
        c = self.stream(ngx, "toto")
        for i in range(1, 6):
            self.pg.insert("toto", '{"foo": "bar", "n": %d}' % i, type="update" if i % 2 else "insert")
        c.wait_events(5)
        expected = b"".join(frame(i, "update" if i % 2 else "insert", '{"n":%d,"foo":"bar"}' % i)
                            for i in range(1, 6))
        self.assertEqual(without_heartbeats(c.body), expected)

    def test_payload_json_is_compacted_without_changing_it(self):
        ngx = self.start_nginx()
        c = self.stream(ngx, "toto")
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
            self.pg.insert("toto", payload)
        c.wait_events(len(cases))
        for i, (payload, wire) in enumerate(cases, 1):
            with self.subTest(payload=payload):
                self.assertEqual(c.events[i - 1].raw, frame(i, "insert", wire))

    def test_two_sessions_of_toto_both_receive_every_event(self):
        ngx = self.start_nginx()
        streams, by_worker = self.streams_on_every_worker(ngx, "toto", minimum=2)
        self.pg.insert("toto")
        self.pg.insert("toto", '{"second": true}')
        expected = frame(1) + frame(2, data='{"second":true}')
        pump_all(streams, lambda: all(len(s.events) >= 2 for s in streams), T(15),
                 "every session to get 2 events")
        for w, ss in by_worker.items():
            for s in ss:
                self.assertEqual(without_heartbeats(s.body), expected, "session on worker %d" % w)

    def test_another_consumer_receives_nothing_of_toto(self):
        ngx = self.start_nginx()
        toto = self.stream(ngx, "toto")
        others, _ = self.streams_on_every_worker(ngx, "titi", minimum=2)
        lookalikes = [self.stream(ngx, name, settle=0)
                      for name in ("tot", "toto2", "TOTO", "toto ", "%", "*")]
        # "toto " above: nginx strips trailing spaces, so that one IS toto; checked below.
        self.pg.insert("toto")
        toto.wait_events(1)
        for c in others + lookalikes:
            c.read_for(0.3)
        time.sleep(1)
        for c in others + lookalikes:
            c.drain()
        self.assertEqual(without_heartbeats(toto.body), frame(1))
        for c in others:
            self.assertEqual(without_heartbeats(c.body), b"", "titi got toto's event")
        for name, c in zip(("tot", "toto2", "TOTO", "toto ", "%", "*"), lookalikes):
            want = frame(1) if name == "toto " else b""
            self.assertEqual(without_heartbeats(c.body), want, "consumer %r" % name)

        # And titi's own events reach titi only.
        self.pg.insert("titi", '{"for": "titi"}')
        pump_all(others, lambda: all(len(c.events) >= 1 for c in others), T(15), "titi's event")
        for c in others:
            self.assertEqual(without_heartbeats(c.body), frame(2, data='{"for":"titi"}'))
        toto.read_for(1)
        self.assertEqual(without_heartbeats(toto.body), frame(1))


class StreamHeaders(LiveTestCase):

    def test_the_stream_starts_with_event_stream_headers_at_once(self):
        ngx = self.start_nginx()
        t0 = time.monotonic()
        c = open_stream(ngx.port, "toto")  # headers come before any event
        self.addCleanup(c.close)
        self.assertLess(time.monotonic() - t0, T(5), "headers must not wait for a first event")
        self.assertEqual(c.status_line, "HTTP/1.1 200 OK")
        self.assertEqual(c.header_all("Content-Type"), ["text/event-stream"])
        self.assertEqual(c.header_all("Cache-Control"), ["no-cache"])
        self.assertEqual(c.header_all("X-Accel-Buffering"), ["no"])
        self.assertEqual(c.header("Transfer-Encoding"), "chunked")
        self.assertIsNone(c.header("Content-Length"))
        self.pg.insert("toto")
        c.wait_events(1)
        # The body is chunked: the raw bytes after the head are valid chunk framing around it.
        raw_body = bytes(c.raw[len(c.head):])
        self.assertRegex(raw_body, rb"^([0-9a-fA-F]+\r\n)")
        self.assertIn(frame(1), b"".join(c.chunks))

    def test_head_gets_the_headers_and_no_body(self):
        ngx = self.start_nginx()
        c = self.client(ngx)
        c.request("HEAD", "/events", [("X-Consumer-Id", "toto")])
        c.wait_headers()
        self.assertEqual(c.status, 200, c.head)
        self.assertEqual(c.header("Content-Type"), "text/event-stream")
        c.read_for(1)
        self.assertEqual(bytes(c.raw[len(c.head):]), b"", "a HEAD response has no body")


class Heartbeat(LiveTestCase):

    def test_an_idle_stream_gets_heartbeats(self):
        ngx = self.start_nginx(location={"event_piper_heartbeat": "1s"})
        c = self.stream(ngx, "toto", settle=0)
        t0 = time.monotonic()
        c.wait(lambda: len(c.heartbeats) >= 2, T(8), "two heartbeats")
        self.assertGreater(time.monotonic() - t0, 1.0, "heartbeats come after the idle time")
        for f in c.frames:
            self.assertEqual(f.raw, b"event: heartbeat\ndata: \n\n")
            self.assertIsNone(f.id, "a heartbeat has no id (it must not move Last-Event-ID)")
        self.assertEqual(bytes(c.body), HEARTBEAT * len(c.heartbeats))
        # An event between heartbeats is framed as usual.
        self.pg.insert("toto")
        c.wait_events(1)
        c.wait(lambda: len(c.heartbeats) >= 3, T(8), "a heartbeat after the event")
        self.assertEqual(without_heartbeats(c.body), frame(1))

    def test_no_heartbeat_while_events_flow(self):
        ngx = self.start_nginx(location={"event_piper_heartbeat": "1s"})
        c = self.stream(ngx, "toto", settle=0)
        # The idle timer starts when the stream opens; insert well within it, for 3 seconds.
        deadline = time.monotonic() + 3
        n = 0
        while time.monotonic() < deadline:
            n += 1
            self.pg.insert("toto", '{"n": %d}' % n)
            c.read_for(0.35)
        c.wait_events(n)
        self.assertEqual(len(c.heartbeats), 0, "heartbeat sent although the stream was not idle")
        c.wait(lambda: len(c.heartbeats) >= 1, T(6), "a heartbeat once idle")


class ErrorAnswers(LiveTestCase):

    def test_no_consumer_id_is_401(self):
        ngx = self.start_nginx()
        for headers in ([], [("X-Consumer-Id", "")], [("X-Consumer-Id", "   ")]):
            with self.subTest(headers=headers):
                c = self.client(ngx)
                c.request("GET", "/events", headers)
                self.assert_one_line_text_error(c, 401)

    def test_bad_consumer_id_is_400(self):
        ngx = self.start_nginx()
        bad = [b"a" * 257, b"to\x01to", b"to\x1bto", b"to\x7fto", b"to\tto", b"\x1f"]
        for value in bad:
            with self.subTest(consumer=value[:20], length=len(value)):
                c = self.client(ngx)
                c.request("GET", "/events", [("X-Consumer-Id", value)])
                self.assert_one_line_text_error(c, 400)

    def test_consumer_ids_up_to_256_bytes_are_fine(self):
        ngx = self.start_nginx()
        names = ["a" * 256, "user@example.com", "caf\u00e9-\u2603", "a b", "o'neil;--"]
        streams = []
        for name in names:
            c = open_stream(ngx.port, name.encode("utf-8"))
            self.addCleanup(c.close)
            self.assertEqual(c.status, 200, "consumer %r: %r" % (name, c.head))
            streams.append(c)
        for c in streams:
            c.read_for(0.05)
        for name in names:
            self.pg.insert(name, '{"to": %d}' % len(name))
        for i, (name, c) in enumerate(zip(names, streams), 1):
            with self.subTest(consumer=name[:20]):
                c.wait_events(1)
                self.assertEqual(without_heartbeats(c.body),
                                 frame(i, data='{"to":%d}' % len(name)))

    def test_methods_other_than_get_and_head_are_405(self):
        ngx = self.start_nginx()
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            with self.subTest(method=method):
                c = self.client(ngx)
                body = b'{"foo": "bar"}' if method in ("POST", "PUT", "PATCH") else b""
                c.request(method, "/events", [("X-Consumer-Id", "toto")], body)
                self.assert_one_line_text_error(c, 405)


class Cleanup(LiveTestCase):

    def test_a_client_that_disconnects_is_cleaned_up_at_once(self):
        ngx = self.start_nginx(location={"event_piper_heartbeat": "1s"})
        workers = ngx.worker_pids()
        fds_before = {w: fd_count(w) for w in workers}
        c = self.stream(ngx, "toto", settle=0)
        ngx.wait_log("event_piper: stream opened", 1)
        self.assertEqual(ngx.log_count("event_piper: stream closed"), 0)
        t0 = time.monotonic()
        c.close()
        ngx.wait_log("event_piper: stream closed", 1, timeout=T(3))
        self.assertLess(time.monotonic() - t0, T(3))

        # Many at once, closed politely (FIN) and abruptly (RST), on both workers.
        many = [self.stream(ngx, "toto%d" % (i % 3), settle=0) for i in range(20)]
        ngx.wait_log("event_piper: stream opened", 21)
        for i, s in enumerate(many):
            if i % 2:
                s.reset()
            else:
                s.close()
        ngx.wait_log("event_piper: stream closed", 21, timeout=T(5))
        self.assertEqual(ngx.log_count("event_piper: stream opened"),
                         ngx.log_count("event_piper: stream closed"))

        # Nothing left behind: the fds are back, events for the gone consumers harm nothing,
        # and no timer holds the workers at quit.
        def fds_back():
            return all(fd_count(w) <= fds_before[w] for w in workers)
        wait_until(fds_back, T(5), what="worker fd counts back to %r" % fds_before)
        for name in ("toto", "toto0", "toto1", "toto2"):
            self.pg.insert(name)
        time.sleep(0.5)
        self.assertLess(ngx.quit(), T(5), "nginx -s quit took too long")
        errors = [l for l in ngx.read_error_log().splitlines()
                  if "[error]" in l or "[crit]" in l]
        self.assertEqual(errors, [])


class GracefulQuit(LiveTestCase):

    def test_quit_with_open_streams_ends_them_with_a_retry_hint(self):
        ngx = self.start_nginx()
        streams, _ = self.streams_on_every_worker(ngx, "toto", minimum=4)
        self.pg.insert("toto")
        pump_all(streams, lambda: all(len(s.events) >= 1 for s in streams), T(15),
                 "the event on every stream")
        t0 = time.monotonic()
        elapsed = ngx.quit(timeout=T(10))
        self.assertLess(elapsed, T(5), "the master exited %.1fs after quit" % elapsed)
        for s in streams:
            s.wait_complete(timeout=T(5))
            self.assertTrue(s.complete, "stream not ended with the last chunk: %r"
                            % bytes(s.raw[-120:]))
            self.assertTrue(bytes(s.raw).endswith(b"\r\n0\r\n\r\n"), bytes(s.raw[-120:]))
            last = s.frames[-1]
            self.assertRegex(last.raw, rb"^retry: [1-9][0-9]*\n\n$",
                             "the last frame is not a retry hint: %r" % bytes(s.body[-120:]))
            self.assertEqual(without_heartbeats(s.body)[:len(frame(1))], frame(1))
            s.wait_eof(timeout=T(5))
        self.assertLess(time.monotonic() - t0, T(10))
        self.assertEqual(ngx.bad_log_lines(), [])


class ListenerConnections(LiveTestCase):

    def test_two_workers_hold_exactly_two_listening_connections(self):
        ngx = self.start_nginx(workers=2)
        self.pg.wait_listening(2)
        streams = [self.stream(ngx, "c%d" % i, settle=0) for i in range(6)]
        self.pg.insert("c1")
        streams[1].wait_events(1)
        for _ in range(10):  # stays at two, never more
            rows = self.pg.listeners()
            self.assertEqual(len(rows), 2, "listener connections: %r" % (rows,))
            for pid, state, query in rows:
                self.assertNotIn("subscriber", (query or "").lower(),
                                 "the listener ran a replay query: %r" % query)
            time.sleep(0.2)
        self.assertEqual(self.pg.app_connections(REPLAY_APP), [],
                         "live streams must not open replay connections")
        # Each worker holds one of them.
        by_worker = {}
        for (port,) in self.pg.superuser_sql(
                "select client_port from pg_stat_activity where application_name = %s",
                (LISTENER_APP,)):
            by_worker.setdefault(ngx.worker_of_socket(port, self.pg.port), 0)
            by_worker[ngx.worker_of_socket(port, self.pg.port)] += 1
        self.assertEqual(by_worker, {w: 1 for w in ngx.worker_pids()})

