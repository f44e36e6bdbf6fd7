"""Real SSE clients against the module, with nothing hand-rolled on the client side.

* Node: the npm `eventsource` package (WhatWG EventSource, tests/clients/eventsource_client.mjs)
  sends X-Consumer-Id through its `fetch` option, receives live events, and when nginx reloads
  (each stream ends with a `retry:` hint) reconnects by itself with Last-Event-ID and misses
  nothing.
* Chromium: Debian's headless `chromium`, driven over the DevTools protocol on a pipe, opens
  tests/clients/page/eventsource.html served by the same nginx; the page's own `EventSource` uses
  the query-argument setup (`event_piper_consumer $arg_consumer;`) and writes what it receives
  into the DOM. Same story: live, server-side end, automatic reconnect, exact list. Plus
  cross-origin: a page from one origin streams from another port whose location adds the CORS
  headers of docs/setups.md, and a page from an origin that is not allowed receives nothing.

Needs node (with tests/clients/node_modules, installed here with `npm ci` when missing) and
/usr/bin/chromium (package `chromium`). A missing tool makes its tests SKIP with the reason.
"""

import json
import os
import re
import select
import shutil
import subprocess
import threading
import time
import unittest
import urllib.parse

from harness import (REPO, EventPiperTestCase, T, compact_json, free_port, log,
                     make_tmp, sequence_problems, wait_until)

# The Node tests use it as it is (X-Consumer-Id, a retry hint); the browser tests add the page's
# location, the `sse` access log (LOG_FORMAT), the query-argument or cookie consumer and, for
# cross-origin, a second server for the page and the CORS map of docs/setups.md (cors_nginx).
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
        {{ locations }}
    }
}
"""

CLIENTS = os.path.join(REPO, "tests", "clients")
NODE_CLIENT = os.path.join(CLIENTS, "eventsource_client.mjs")
PAGE = os.path.join(CLIENTS, "page", "eventsource.html")
CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def expected_events(pg, subscriber):
    """[(id, type, data)] of every committed event of `subscriber`, as an EventSource sees them."""
    rows = pg.sql("select position, type, payload::text from event_log where subscriber = %s "
                  "and position is not null order by position", (subscriber,))
    return [(str(p), t, compact_json(d)) for p, t, d in rows]


def insert(pg, subscriber, n, type="insert"):
    pg.insert(subscriber, '{"n": %d, "who": "%s"}' % (n, subscriber), type=type)


_node_ready = None


def node_clients_ready():
    """node is there and tests/clients/node_modules has the pinned `eventsource` (installed with
    `npm ci` from the committed package-lock.json when it is missing). Raises SkipTest if node
    is missing, AssertionError if the install fails."""
    global _node_ready
    if _node_ready:
        return
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node:
        raise unittest.SkipTest("node is not installed")
    with open(os.path.join(CLIENTS, "package.json")) as f:
        want = json.load(f)["dependencies"]["eventsource"]
    installed = os.path.join(CLIENTS, "node_modules", "eventsource", "package.json")

    def have():
        try:
            with open(installed) as f:
                return json.load(f)["version"] == want
        except (OSError, ValueError, KeyError):
            return False

    if not have():
        if not npm:
            raise unittest.SkipTest("npm is not installed (needed once for tests/clients)")
        lock = os.path.exists(os.path.join(CLIENTS, "package-lock.json"))
        cmd = [npm, "ci" if lock else "install", "--prefix", CLIENTS, "--no-audit", "--no-fund"]
        log("installing the node test clients: %s" % " ".join(cmd))
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=600)
        if r.returncode != 0 or not have():
            raise AssertionError("%s failed (%d):\n%s" % (" ".join(cmd), r.returncode, r.stdout))
    _node_ready = True


class NodeClient:
    """tests/clients/eventsource_client.mjs in a subprocess; its JSON lines are collected by a
    thread into `lines` (each with the client's `t`, ms, and `at`, the time.time() it was read)."""

    def __init__(self, tmp, url, headers=(), types=("insert",), count=0, timeout=120):
        cmd = ["node", NODE_CLIENT, url, "--count", str(count), "--timeout", str(int(timeout))]
        for h in headers:
            cmd += ["--header", h]
        for t in types:
            cmd += ["--type", t]
        self.stderr_path = os.path.join(tmp, "node-client.stderr")
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr,
                                     stdin=subprocess.DEVNULL, cwd=CLIENTS)
        self.lines = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for raw in self.proc.stdout:
            try:
                obj = json.loads(raw)
            except ValueError:
                obj = {"kind": "garbage", "raw": raw.decode("utf-8", "replace")}
            obj["at"] = time.time()
            with self.cond:
                self.lines.append(obj)
                self.cond.notify_all()
        with self.cond:
            self.lines.append({"kind": "exit", "at": time.time()})
            self.cond.notify_all()

    def of(self, kind):
        with self.cond:
            return [l for l in self.lines if l["kind"] == kind]

    def events(self):
        return [(e["id"], e["type"], e["data"]) for e in self.of("event")]

    def wait(self, pred, timeout, what):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0 or any(l["kind"] in ("exit", "timeout") for l in self.lines):
                    raise AssertionError("node client: gave up waiting for %s; its output:\n%s\n"
                                         "stderr: %s" % (what, self.transcript(),
                                                         self.stderr()[-2000:]))
                self.cond.wait(min(left, 0.5))

    def transcript(self):
        return "\n".join(json.dumps({k: v for k, v in l.items() if k not in ("at", "t")})
                         for l in self.lines[-60:])

    def stderr(self):
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.thread.join(5)
        self._stderr.close()


class Chromium:
    """Headless Debian Chromium driven over the DevTools protocol on a pipe
    (--remote-debugging-pipe: JSON messages ending in NUL, browser reads fd 3, writes fd 4)."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--remote-debugging-pipe"]

    def __init__(self, tmp):
        self.profile = os.path.join(tmp, "chromium-profile")
        os.makedirs(self.profile)
        self.log_path = os.path.join(tmp, "chromium.log")
        self._log = open(self.log_path, "wb")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def child_fds():
            # Duplicate first: the pipe ends may already sit on 3 or 4 (with close-on-exec).
            a, b = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([CHROMIUM] + self.FLAGS +
                                     ["--user-data-dir=" + self.profile, "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, preexec_fn=child_fds,
                                     close_fds=False, start_new_session=True)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf = b""
        self._next_id = 0
        self._closed = False
        self.call("Browser.getVersion", timeout=T(60))

    def call(self, method, params=None, session=None, timeout=None):
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout or T(30))
        while True:
            m = self._recv(deadline, method)
            if m.get("id") == self._next_id:
                if "error" in m:
                    raise AssertionError("chromium: %s failed: %s" % (method, m["error"]))
                return m["result"]

    def _recv(self, deadline, what):
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            r, _, _ = select.select([self._from_browser], [], [], max(left, 0))
            if not r:
                raise AssertionError("chromium did not answer %s in time (log %s)"
                                     % (what, self.log_path))
            data = os.read(self._from_browser, 1 << 20)
            if not data:
                raise AssertionError("chromium closed the DevTools pipe (log: %s)\n%s"
                                     % (self.log_path, self.log_tail()))
            self._buf += data
        msg, _, self._buf = self._buf.partition(b"\0")
        return json.loads(msg)

    def log_tail(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-3000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def open(self, url):
        """A new tab on `url`; returns its DevTools session id."""
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        return self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def evaluate(self, session, expression):
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                      session=session)
        if "exceptionDetails" in r:
            raise AssertionError("page script failed: %s" % r["exceptionDetails"])
        return r["result"].get("value")

    def close(self):
        if self._closed:
            return
        self._closed = True
        if self.proc.poll() is None:
            try:
                self.call("Browser.close", timeout=T(10))
            except (AssertionError, OSError):
                pass
            try:
                self.proc.wait(T(10))
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()


# What the page wrote into the DOM.
READ_DOM = """document.body === null || document.readyState === 'loading' ? null : JSON.stringify({
  done: document.body.dataset.done,
  events: Array.from(document.querySelectorAll('#events li'))
               .map(li => [li.dataset.id, li.dataset.type, li.textContent]),
  log: Array.from(document.querySelectorAll('#log li')).map(li => li.textContent)
})"""

# A log format that shows what each /events request carried (written when the stream ends).
LOG_FORMAT = ('    log_format sse \'$server_port "$request" $status "$http_last_event_id" '
              '"$http_origin" "$sent_http_access_control_allow_origin"\';\n')
SSE_LOG_LINE = re.compile(r'^(\d+) "GET (\S+) HTTP/1.1" (\d+) "([^"]*)" "([^"]*)" "([^"]*)"$')


class RealClientTestCase(EventPiperTestCase):

    def sse_log(self):
        """Parsed lines of the `sse` access log: (port, uri, status, last_event_id, origin, acao)."""
        path = os.path.join(self.tmp, "sse.log")
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            return []
        out = []
        for l in lines:
            m = SSE_LOG_LINE.match(l)
            self.assertIsNotNone(m, "unexpected access log line %r" % l)
            out.append(m.groups())
        return out


# --------------------------------------------------------------------------------------------
# Node: npm `eventsource`
# --------------------------------------------------------------------------------------------

class NodeEventSource(RealClientTestCase):
    """The npm `eventsource` client with the X-Consumer-Id header (the default setup)."""

    def setUp(self):
        node_clients_ready()
        super().setUp()

    def client(self, ngx, consumer, count, types=("insert", "update")):
        c = NodeClient(self.tmp, "http://127.0.0.1:%d/events" % ngx.port,
                       headers=["X-Consumer-Id: %s" % consumer], types=types, count=count,
                       timeout=T(120))
        self.addCleanup(c.close)
        return c

    def test_live_events_then_reload_reconnect_with_last_event_id_misses_nothing(self):
        retry_ms = 1500
        ngx = self.start_nginx(location={"event_piper_retry": "%dms" % retry_ms})
        total = 9
        es = self.client(ngx, "alice", total)
        es.wait(lambda: es.of("open"), T(20), "the first open")

        # Live: alice's events arrive, bob's (interleaved) never do.
        insert(self.pg, "alice", 1)
        insert(self.pg, "bob", 1)
        insert(self.pg, "alice", 2, type="update")
        insert(self.pg, "alice", 3)
        es.wait(lambda: len(es.of("event")) >= 3, T(20), "3 live events")

        sent = 3
        for cycle in (1, 2):
            # The server ends the stream: nginx reload, old workers send `retry:` and close.
            errors_before = len(es.of("error"))
            ngx.reload()
            es.wait(lambda: len(es.of("error")) > errors_before, T(20),
                    "the stream end (an error event while reconnecting), cycle %d" % cycle)
            err = es.of("error")[-1]
            self.assertEqual(err["readyState"], 0, "the client gave up instead of reconnecting: "
                             "%s" % es.transcript())
            # While the client waits `retry` ms: events it must get through Last-Event-ID replay.
            insert(self.pg, "alice", 10 * cycle)
            insert(self.pg, "bob", 10 * cycle)
            insert(self.pg, "alice", 10 * cycle + 1, type="update")
            inserted_at = time.time()
            sent += 2
            es.wait(lambda: len(es.of("open")) > cycle, T(30), "reconnection %d" % cycle)
            # Then live again on the new workers.
            insert(self.pg, "alice", 10 * cycle + 2)
            sent += 1
            es.wait(lambda: len(es.of("event")) >= sent, T(30), "%d events" % sent)

            req = es.of("request")[cycle]
            self.assertEqual(req["n"], cycle + 1)
            # `t` is the client's own clock (ms): the reconnect waited for the retry hint, and
            # went out after the gap events were committed (so they came by replay).
            self.assertGreaterEqual(req["t"] - err["t"], retry_ms * 0.8,
                                    "reconnected before event_piper_retry: %s" % es.transcript())
            self.assertGreater(req["t"] / 1000.0, inserted_at,
                               "the reconnect went out before the gap events were committed, "
                               "so the replay path was not exercised")

        es.wait(lambda: es.of("done"), T(20), "the client to finish")
        expected = expected_events(self.pg, "alice")
        self.assertEqual(len(expected), total)
        got = es.events()
        self.assertEqual(sequence_problems([int(i) for i, _, _ in got],
                                           [int(i) for i, _, _ in expected]), "")
        self.assertEqual(got, expected)
        # The library's own reconnects, each with the last id it had seen.
        self.assertEqual([r["lastEventId"] for r in es.of("request")],
                         [None, expected[2][0], expected[5][0]], es.transcript())
        self.assertEqual([r["status"] for r in es.of("response")], [200, 200, 200])
        self.assertEqual(len(es.of("open")), 3)


# --------------------------------------------------------------------------------------------
# Chromium: the browser's own EventSource
# --------------------------------------------------------------------------------------------

class BrowserEventSource(RealClientTestCase):
    """A page served by the same nginx opens `new EventSource('/events?consumer=alice')`."""

    def setUp(self):
        if not os.access(CHROMIUM, os.X_OK):
            raise unittest.SkipTest("%s is missing: install Debian's `chromium` "
                                    "(scripts/deps.sh should)" % CHROMIUM)
        super().setUp()
        self.www = os.path.join(self.tmp, "www")
        os.makedirs(os.path.join(self.www, "page"))
        os.chmod(self.www, 0o755)
        os.chmod(os.path.join(self.www, "page"), 0o755)
        shutil.copy(PAGE, os.path.join(self.www, "page", "eventsource.html"))
        self.browser = None

    def start_browser(self):
        self.browser = Chromium(make_tmp("chromium"))
        self.addCleanup(self.browser.close)
        return self.browser

    def page_location(self):
        return "        location /page/ { root %s; }\n" % self.www

    def page_url(self, port, src, expect, types="insert,update", **more):
        return "http://127.0.0.1:%d/page/eventsource.html?%s" % (port, urllib.parse.urlencode(
            dict({"src": src, "expect": expect, "types": types}, **more)))

    def dom(self, session):
        text = self.browser.evaluate(session, READ_DOM)
        if text is None:  # still loading
            return {"done": None, "events": [], "log": []}
        return json.loads(text)

    def wait_dom(self, session, pred, timeout, what):
        state = {}

        def check():
            state.update(self.dom(session))
            return pred(state)
        try:
            wait_until(check, timeout, interval=0.1, what=what)
        except AssertionError as e:
            raise AssertionError("%s; the page shows %s" % (e, json.dumps(state)))
        return state

    def run_reconnect_story(self, ngx, session, total, expect_origin=None):
        """Live events, then two server-side stream ends (reload) with gap events inserted while
        the browser waits to reconnect; returns the DOM at the end."""
        self.wait_dom(session, lambda s: "open readyState=1" in s["log"], T(30), "the page's open")
        insert(self.pg, "alice", 1)
        insert(self.pg, "bob", 1)
        insert(self.pg, "alice", 2, type="update")
        insert(self.pg, "alice", 3)
        self.wait_dom(session, lambda s: len(s["events"]) >= 3, T(20), "3 live events")
        sent = 3
        for cycle in (1, 2):
            ngx.reload()
            self.wait_dom(session, lambda s: s["log"].count("error readyState=0") >= cycle, T(20),
                          "the stream end (error, readyState CONNECTING), cycle %d" % cycle)
            insert(self.pg, "alice", 10 * cycle)
            insert(self.pg, "bob", 10 * cycle)
            insert(self.pg, "alice", 10 * cycle + 1, type="update")
            sent += 2
            self.wait_dom(session, lambda s: s["log"].count("open readyState=1") > cycle, T(30),
                          "reconnection %d" % cycle)
            insert(self.pg, "alice", 10 * cycle + 2)
            sent += 1
            self.wait_dom(session, lambda s: len(s["events"]) >= sent, T(30), "%d events" % sent)
        state = self.wait_dom(session, lambda s: s["done"] == "yes", T(20), "the page to finish")
        expected = expected_events(self.pg, "alice")
        self.assertEqual(len(expected), total)
        got = [tuple(e) for e in state["events"]]
        self.assertEqual(sequence_problems([int(i) for i, _, _ in got],
                                           [int(i) for i, _, _ in expected]), "")
        self.assertEqual(got, expected)
        self.assertNotIn("error readyState=2", state["log"], "the browser gave up on the stream")
        return expected

    def assert_requests(self, ngx, port, expected, origin="", uri="/events?consumer=alice"):
        """After nginx quit: the browser's /events requests on `port`, from the access log
        (`-` for an empty value): first without Last-Event-ID, then each reconnect with the last
        id the page had seen."""
        # The browser first: Chromium keeps preconnected sockets that have sent no request yet,
        # and nginx lets a worker wait for those until client_header_timeout (60s), reload or
        # quit alike (stock nginx behaviour, not the module's).
        self.browser.close()
        ngx.quit(timeout=T(20))
        reqs = [l for l in self.sse_log() if int(l[0]) == port]
        self.assertEqual([(uri, status) for _, uri, status, _, _, _ in reqs],
                         [(uri, "200")] * 3, reqs)
        self.assertEqual([lei for _, _, _, lei, _, _ in reqs],
                         ["-", expected[2][0], expected[5][0]], reqs)
        self.assertEqual({o for _, _, _, _, o, _ in reqs}, {origin or "-"}, reqs)
        return reqs

    def test_same_origin_page_query_argument_setup_reconnects_and_misses_nothing(self):
        ngx = self.start_nginx(
            extra_http=LOG_FORMAT,
            location=[("event_piper_consumer", "$arg_consumer"), ("event_piper_retry", "1500ms"),
                      ("access_log", "%s/sse.log sse" % self.tmp)],
            extra_locations=self.page_location())
        self.start_browser()
        session = self.browser.open(self.page_url(ngx.port, "/events?consumer=alice", 9))
        expected = self.run_reconnect_story(ngx, session, 9)
        self.assert_requests(ngx, ngx.port, expected)

    def test_page_with_a_user_and_a_broadcast_id_in_query_arguments(self):
        """`new EventSource('/events?consumer=' + user + '&groups=everyone')` with
        `event_piper_consumer $arg_consumer urldecode; event_piper_consumer_groups $arg_groups
        urldecode;` receives the user's events and the broadcasts, merged in order."""
        ngx = self.start_nginx(
            location=[("event_piper_consumer", "$arg_consumer urldecode"),
                      ("event_piper_consumer_groups", "$arg_groups urldecode")],
            extra_locations=self.page_location())
        self.start_browser()
        src = "/events?consumer=%s&groups=everyone" % urllib.parse.quote("alice@example.com")
        session = self.browser.open(self.page_url(ngx.port, src, 4))
        self.wait_dom(session, lambda s: "open readyState=1" in s["log"], T(30), "the page's open")
        insert(self.pg, "alice@example.com", 1)
        insert(self.pg, "everyone", 2)
        insert(self.pg, "bob", 3)
        insert(self.pg, "everyone", 4, type="update")
        insert(self.pg, "alice@example.com", 5)
        state = self.wait_dom(session, lambda s: s["done"] == "yes", T(20), "4 events")
        rows = self.pg.sql("select position, type, payload::text from event_log where subscriber "
                           "in ('alice@example.com', 'everyone') order by position")
        self.assertEqual([tuple(e) for e in state["events"]],
                         [(str(p), t, compact_json(d)) for p, t, d in rows])

    def test_page_that_builds_its_url_with_url_search_params(self):
        """`new EventSource('/events?' + new URLSearchParams({consumer: 'alice smith+co'}))`
        sends `consumer=alice+smith%2Bco`; with `urldecode` that is the id `alice smith+co`."""
        ngx = self.start_nginx(
            extra_http=LOG_FORMAT,
            location=[("event_piper_consumer", "$arg_consumer urldecode"),
                      ("access_log", "%s/sse.log sse" % self.tmp)],
            extra_locations=self.page_location())
        self.start_browser()
        session = self.browser.open(self.page_url(ngx.port, "/events", 2,
                                                  consumer="alice smith+co"))
        self.wait_dom(session, lambda s: "open readyState=1" in s["log"], T(30), "the page's open")
        for n, sub in enumerate(("alice+smith+co", "alice smith+co", "alice smith co",
                                 "alice smith+co"), 1):
            insert(self.pg, sub, n)
        state = self.wait_dom(session, lambda s: s["done"] == "yes", T(20), "2 events")
        self.assertEqual([tuple(e) for e in state["events"]],
                         expected_events(self.pg, "alice smith+co"))
        self.browser.close()
        ngx.quit(timeout=T(20))
        self.assertEqual([(uri, status) for _, uri, status, _, _, _ in self.sse_log()],
                         [("/events?consumer=alice+smith%2Bco", "200")])

    def cors_nginx(self, allowed_origin, consumer="$arg_consumer", credentials=False):
        """The stream on the harness's server (origin B) with the CORS setup of docs/setups.md;
        the page on a second server (origin A). Only origins listed in the map get an
        Access-Control-Allow-Origin header. Returns (nginx, port A)."""
        port_a = free_port()
        extra_http = (LOG_FORMAT +
                      "    map $http_origin $cors_allow_origin {\n"
                      "        default \"\";\n"
                      "        \"%s\" $http_origin;\n"
                      "    }\n"
                      "    server {\n"
                      "        listen 127.0.0.1:%d;\n"
                      "%s"
                      "    }\n" % (allowed_origin or "http://127.0.0.1:%d" % port_a, port_a,
                                   self.page_location()))
        ngx = self.start_nginx(
            extra_http=extra_http,
            location=[("event_piper_consumer", consumer), ("event_piper_retry", "1500ms"),
                      ("add_header", "Access-Control-Allow-Origin $cors_allow_origin always"),
                      ("add_header", "Vary Origin always"),
                      ("access_log", "%s/sse.log sse" % self.tmp)] +
                     ([("add_header", "Access-Control-Allow-Credentials true always")]
                      if credentials else []))
        return ngx, port_a

    def test_cross_origin_page_receives_events_with_cors_headers_and_reconnects(self):
        ngx, port_a = self.cors_nginx(None)
        self.start_browser()
        src = "http://127.0.0.1:%d/events?consumer=alice" % ngx.port
        session = self.browser.open(self.page_url(port_a, src, 9))
        expected = self.run_reconnect_story(ngx, session, 9)
        origin = "http://127.0.0.1:%d" % port_a
        reqs = self.assert_requests(ngx, ngx.port, expected, origin=origin)
        self.assertEqual({acao for *_, acao in reqs}, {origin})

    def test_cross_origin_cookie_setup_with_credentials_reconnects_and_misses_nothing(self):
        # event_piper_consumer $cookie_consumer; the page sets the cookie and opens the stream
        # on the other origin with {withCredentials: true}.
        ngx, port_a = self.cors_nginx(None, consumer="$cookie_consumer", credentials=True)
        self.start_browser()
        src = "http://127.0.0.1:%d/events" % ngx.port
        session = self.browser.open(self.page_url(port_a, src, 9, cookie="consumer=alice",
                                                  credentials="1"))
        expected = self.run_reconnect_story(ngx, session, 9)
        origin = "http://127.0.0.1:%d" % port_a
        reqs = self.assert_requests(ngx, ngx.port, expected, origin=origin, uri="/events")
        self.assertEqual({acao for *_, acao in reqs}, {origin})

    def test_cross_origin_page_from_an_origin_not_allowed_receives_nothing(self):
        # Only some other origin is allowed: the page's origin gets no CORS header.
        ngx, port_a = self.cors_nginx("http://127.0.0.1:%d" % free_port())
        self.start_browser()
        src = "http://127.0.0.1:%d/events?consumer=alice" % ngx.port
        session = self.browser.open(self.page_url(port_a, src, 1))
        self.wait_dom(session, lambda s: "error readyState=2" in s["log"], T(20),
                      "the browser to refuse the stream (error, readyState CLOSED)")
        insert(self.pg, "alice", 1)
        time.sleep(T(2))
        state = self.dom(session)
        self.assertEqual(state["events"], [], "a page from a foreign origin read the stream")
        self.assertNotIn("open readyState=1", state["log"])

