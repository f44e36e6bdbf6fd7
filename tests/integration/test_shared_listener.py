"""One LISTEN connection per nginx instance (`event_piper_listener shared`, the
default), forwarded to the workers that have streams for the notified consumer.

The stories: an instance holds exactly one listening backend (two with `per_worker` and two
workers); every worker's streams get their events; the worker holding the listener can be
reloaded away or killed with -9 and another worker listens within about 2 s while every stream
resumes without loss or duplicate; health answers UP from any worker; and two instances behind a
third nginx (a load balancer without the module) hand clients over on `nginx -s quit`.
"""

import os
import signal
import sys
import threading
import time

from harness import LISTENER_APP, T, Nginx, make_tmp, open_stream, wait_until

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "chaos"))
from piper_chaos import http_get, status, worker_status  # noqa: E402

NGINX_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
    {{ http }}
    server {
        listen 127.0.0.1:{{ port }};
        location = /events {
            event_piper;
            event_piper_heartbeat 1s;
            event_piper_retry 200ms;
        }
        location = /health {
            event_piper_health;
            add_header X-Worker $pid always;
        }
        location = /status {
            event_piper_status;
        }
    }
}
"""

BALANCER_CONF = """
http {
    upstream piper {
        server 127.0.0.1:{{ a }} max_fails=0;
        server 127.0.0.1:{{ b }} max_fails=0;
    }
    server {
        listen 127.0.0.1:{{ port }};
        location / {
            proxy_pass http://piper;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 1h;
            proxy_next_upstream error timeout http_502 http_503;
        }
    }
}
"""


def listening_pids(db):
    """Backend pids of the idle (listening) listener connections."""
    return sorted(pid for pid, _, _ in db.listening())


def wait_holder(ngx, exclude=(), timeout=None):
    """The worker pid that the status names as the listener's holder, once it is listening."""
    def holder():
        s = status(ngx)
        pid = int(s.get("listener_holder_pid", 0))
        if pid and pid not in exclude and pid in ngx.worker_pids():
            w = worker_status(ngx).get(pid)
            if w and w.get("listener") == "listening":
                return pid
        return None
    return wait_until(holder, timeout or T(10), interval=0.05, what="a listening holder")


def all_ready(ngx):
    """Every worker shows its listener (own or forwarded) as listening."""
    def ok():
        ws = worker_status(ngx)
        pids = ngx.worker_pids()
        return len(pids) >= ngx.workers and all(
            ws.get(p, {}).get("listener") == "listening" for p in pids)
    return wait_until(ok, T(10), interval=0.05, what="every worker listening")


class Resuming:
    """An EventSource-like reader: follows one consumer's stream and, when the server ends it
    (graceful stop, a killed worker), reconnects with Last-Event-ID."""

    def __init__(self, port, consumer, start="0"):
        # `start`: the first Last-Event-ID ("0": the table is empty when the test begins). A
        # reader without one that is cut before its first event could not resume exactly.
        self.port, self.consumer, self.start = port, consumer, start
        self.ids = []
        self.reconnects = 0
        self.c = None
        self._connect()

    def _connect(self):
        last = str(self.ids[-1]) if self.ids else self.start
        while True:
            try:
                self.c = open_stream(self.port, self.consumer, last)
                self.seen = 0  # events of this connection taken into ids
                if self.c.status == 200:
                    return
                self.c.close()
            except (OSError, AssertionError):
                pass
            time.sleep(0.05)

    def pump(self, timeout=0.05):
        self.c.pump(timeout)
        self.ids.extend(int(f.id) for f in self.c.events[self.seen:])
        self.seen = len(self.c.events)
        if self.c.eof or self.c.complete:
            self.c.close()
            self.reconnects += 1
            self._connect()

    def close(self):
        self.c.close()


def read_until_all(readers, expected, timeout):
    """Pump every reader until each has seen the positions `expected[consumer]`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = True
        for r in readers:
            r.pump(0.01)
            if len(r.ids) < len(expected[r.consumer]):
                done = False
        if done:
            break
    for r in readers:
        assert r.ids == expected[r.consumer], (
            "consumer %s: got %d events (%d reconnects), expected %d; missing %s, duplicated %s"
            % (r.consumer, len(r.ids), r.reconnects, len(expected[r.consumer]),
               sorted(set(expected[r.consumer]) - set(r.ids))[:10],
               sorted({i for i in r.ids if r.ids.count(i) > 1})[:10]))


class Writer(threading.Thread):
    """Inserts events for the consumers round-robin, one transaction each, until stopped."""

    def __init__(self, db, consumers, pause=0.005):
        super().__init__(daemon=True)
        self.db, self.consumers, self.pause = db, consumers, pause
        self.stop_flag = threading.Event()
        self.count = 0

    def run(self):
        conn = self.db.connect()
        try:
            while not self.stop_flag.is_set():
                sub = self.consumers[self.count % len(self.consumers)]
                self.db.run(conn, "insert into events (type, timestamp, subscriber, payload) "
                            "values ('insert', now(), %s, '{\"n\": 1}')", (sub,))
                self.count += 1
                time.sleep(self.pause)
        finally:
            conn.close()

    def stop(self):
        self.stop_flag.set()
        self.join(T(10))


def streams_on_both(ngx, consumer, attempts=40):
    """Readers of `consumer` until both workers serve one; returns them."""
    readers, workers = [], set()
    for _ in range(attempts):
        r = Resuming(ngx.port, consumer)
        readers.append(r)
        workers.add(ngx.wait_worker_of(r.c))
        if workers >= set(ngx.worker_pids()):
            return readers
    raise AssertionError("no stream of %s on every worker in %d connections" % (consumer,
                                                                              attempts))


def expected(db, consumers):
    return {c: db.positions(c) for c in consumers}


# -- one listener per instance --

def test_one_listening_backend_per_instance_and_two_with_per_worker(db, nginx):
    ngx = nginx.start(db, workers=2)
    holder = wait_holder(ngx)
    for _ in range(5):  # stays at one
        rows = db.listeners()
        assert len(rows) == 1, "listener connections in shared mode: %r" % (rows,)
        time.sleep(0.2)
    (port,) = db.superuser_sql("select client_port from pg_stat_activity "
                               "where application_name = %s", (LISTENER_APP,))[0]
    assert ngx.worker_of_socket(port, db.port) == holder
    s = status(ngx)
    assert s["listener_holder"] == 1
    ngx.quit()
    db.wait_no_module_connections()

    ngx2 = nginx.start(db, workers=2, http={"event_piper_listener": "per_worker"})
    assert ngx2.listeners_expected == 2
    db.wait_listening(2)
    time.sleep(0.5)
    assert len(db.listeners()) == 2
    assert status(ngx2)["listener_holder"] == 0


def test_every_worker_gets_the_events_of_its_streams_and_only_those(db, nginx):
    ngx = nginx.start(db, workers=2)
    holder = wait_holder(ngx)
    all_ready(ngx)
    readers = streams_on_both(ngx, "shared") + [Resuming(ngx.port, "c%d" % i) for i in range(6)]
    consumers = ["shared"] + ["c%d" % i for i in range(6)]
    # A consumer whose only stream is on the holder: the other worker must not hear of it.
    lonely = None
    for _ in range(40):
        r = Resuming(ngx.port, "lonely")
        if ngx.wait_worker_of(r.c) == holder:
            lonely = r
            break
        r.close()
    assert lonely is not None
    other = [p for p in ngx.worker_pids() if p != holder][0]
    time.sleep(1.2)  # the status is published once a second
    forwarded_before = worker_status(ngx)[other]["relay_forwarded"]
    for _ in range(20):
        db.insert("lonely")
    for i in range(60):
        db.insert(consumers[i % len(consumers)])
    read_until_all(readers + [lonely], expected(db, consumers + ["lonely"]), T(15))
    time.sleep(1.2)
    w = worker_status(ngx)
    forwarded = w[other]["relay_forwarded"] - forwarded_before
    # 60 events of the others' consumers may go there, none of the 20 of "lonely".
    assert forwarded <= 60, "the other worker was woken for a consumer it has no stream for"
    assert forwarded > 0
    assert w[other]["relay_dropped"] == 0 and w[other]["relay_catchups"] == 0
    for r in readers + [lonely]:
        r.close()


def test_health_is_up_from_any_worker_while_the_instance_listens(db, nginx):
    ngx = nginx.start(db, workers=2)
    wait_holder(ngx)
    all_ready(ngx)
    seen = set()
    for _ in range(60):
        c = http_get(ngx.port, "/health")
        assert c.status == 200, bytes(c.body)
        assert bytes(c.body) == b'{"status":"UP"}'
        seen.add(c.header("X-Worker"))
        if len(seen) == 2:
            break
    assert len(seen) == 2, "health was answered by one worker only: %s" % seen


def test_the_directives_are_checked_by_nginx_t(db):
    for directive, value, expected in (
            ("event_piper_listener", "both",
             'invalid value "both" in "event_piper_listener": "shared" or "per_worker"'),
            ("event_piper_relay_buffer", "1k", "at least 64k")):
        rc, out = Nginx(make_tmp("conf"), NGINX_CONF, pg=db,
                        http={directive: value}).test_config()
        assert rc != 0 and expected in out, out
    rc, out = Nginx(make_tmp("conf"), NGINX_CONF, pg=db,
                    http={"event_piper_listener": "Per_Worker",  # any case, as nginx's enums
                          "event_piper_relay_buffer": "16m"}).test_config()
    assert rc == 0, out


# -- failover --

def _failover(db, ngx, stop_holder):
    holder = wait_holder(ngx)
    all_ready(ngx)
    consumers = ["a", "b", "c"]
    readers = []
    for c in consumers:
        readers += streams_on_both(ngx, c)
    writer = Writer(db, consumers)
    writer.start()
    try:
        for r in readers:
            r.pump(0.05)
        t0 = time.monotonic()
        stop_holder(holder)
        new = wait_holder(ngx, exclude=(holder,), timeout=T(5))
        took = time.monotonic() - t0
        assert took < T(2.5), "another worker held the listener %.2fs after the holder left" % took
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            for r in readers:
                r.pump(0.01)
    finally:
        writer.stop()
    assert writer.count > 50
    read_until_all(readers, expected(db, consumers), T(20))
    assert len(db.listeners()) == 1
    for r in readers:
        r.close()
    return holder, new


def test_kill_9_of_the_holder_hands_the_listener_over_without_loss(db, nginx):
    ngx = nginx.start(db, workers=2)

    def kill(holder):
        ngx.allowed_alerts.append("worker process %d exited on signal 9" % holder)
        os.kill(holder, signal.SIGKILL)

    holder, new = _failover(db, ngx, kill)
    assert new != holder


def test_reload_hands_the_listener_to_a_new_worker_without_loss(db, nginx):
    ngx = nginx.start(db, workers=2)

    def reload(holder):
        ngx.reload()

    _failover(db, ngx, reload)


# -- two instances behind a load balancer --

def test_two_instances_behind_a_balancer_hand_clients_over_on_quit(db, nginx):
    a = nginx.start(db, workers=2)
    b = nginx.start(db, workers=2)
    wait_holder(a)
    wait_holder(b)
    lb = Nginx(make_tmp("balancer"), BALANCER_CONF, workers=1, with_module=False,
               values={"a": a.port, "b": b.port})
    nginx.instances.append(lb)
    lb.start()
    wait_until(lambda: len(db.listening()) == 2, T(10), what="two listening backends")
    assert len(db.listeners()) == 2, "one listening backend per instance"

    consumers = ["u%d" % i for i in range(8)]
    readers = [Resuming(lb.port, c) for c in consumers for _ in range(2)]
    for r in readers:
        r.pump(0.05)
    writer = Writer(db, consumers)
    writer.start()
    try:
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            for r in readers:
                r.pump(0.01)
        a.quit()  # its clients get a retry hint and come back through the balancer to b
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            for r in readers:
                r.pump(0.01)
    finally:
        writer.stop()
    want = expected(db, consumers)
    read_until_all(readers, {r.consumer: want[r.consumer] for r in readers}, T(20))
    assert any(r.reconnects for r in readers), "no client was on the stopped instance"
    assert len(db.listeners()) == 1, "the remaining instance keeps one listener"
    for r in readers:
        r.close()
