"""A frozen listener holder is replaced, and health says whether the instance delivers.

The shared listener's holder proves it is alive with a heartbeat in the shared zone. SIGSTOP it
(under writers and 200 streams over three workers) and another worker takes the listener over
within event_piper_listener_timeout; when the frozen worker is continued 90 s later it notices it
lost the role and steps down; every stream gets every event exactly once, in order; status and
the error log show the takeover. Health answers DOWN with a one-line reason for each way of not
delivering (listener not connected, holder frozen or gone, channel mismatch, committed events
without a position) and `{"status":"UP"}`, byte for byte, once all is well again.
"""

import json
import os
import signal
import sys
import time

import pytest

from harness import T, wait_until

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "chaos"))
from piper_chaos import (hold_tcp, http_get, log_entries, pg_back_up,  # noqa: E402
                         status, worker_status)
from test_shared_listener import Resuming, Writer, expected, read_until_all  # noqa: E402

# A short listener timeout keeps the test short: a silent holder is stale after half of it.
NGINX_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
    event_piper_listener_timeout 6s;
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
        location = /status { event_piper_status; }
    }
}
"""

UP = b'{"status":"UP"}'
TIMEOUT = 6.0


@pytest.fixture
def db(private_pg):
    pg_back_up(private_pg)
    private_pg.truncate()
    yield private_pg
    pg_back_up(private_pg)


def health(ngx, timeout=2.0):
    """(status, body, worker pid) of one /health, or None if no live worker answered in time
    (a connection accepted by the frozen worker's turn waits)."""
    try:
        c = http_get(ngx.port, "/health", timeout=timeout)
    except (OSError, AssertionError):
        return None
    return c.status, bytes(c.body), int(c.header("X-Worker") or 0)


def down_reason(body):
    doc = json.loads(body)
    assert doc["status"] == "DOWN" and set(doc) == {"status", "reason"}, body
    assert "\n" not in body.decode()
    return doc["reason"]


def holder_of(ngx, exclude=()):
    """The live worker whose status says it holds a listening listener."""
    try:
        ws = worker_status(ngx)
    except (OSError, AssertionError):
        return None
    for pid, w in ws.items():
        if pid not in exclude and w.get("listener_holder") == 1 and w.get("listener") == \
                "listening":
            return pid
    return None


def wait_holder(ngx, exclude=(), timeout=None):
    return wait_until(lambda: holder_of(ngx, exclude), timeout or T(15), interval=0.1,
                      what="a listening holder")


def test_a_frozen_holder_is_replaced_and_steps_down_when_it_wakes_without_loss_or_duplicate(
        db, nginx):
    ngx = nginx.start(db, workers=3)
    holder = wait_holder(ngx)
    consumers = ["f%d" % i for i in range(20)]
    readers = [Resuming(ngx.port, consumers[i % len(consumers)]) for i in range(200)]
    on = {}
    for r in readers:
        w = ngx.worker_of(r.c)
        on[w] = on.get(w, 0) + 1
    assert len(on) == 3, "200 streams on fewer than 3 workers: %s" % on
    writer = Writer(db, consumers, pause=0.02)
    writer.start()
    stopped = False
    try:
        t_end = time.monotonic() + 1
        while time.monotonic() < t_end:
            for r in readers:
                r.pump(0.001)
        os.kill(holder, signal.SIGSTOP)
        stopped = True
        t0 = time.monotonic()
        saw = []  # health from the other workers while the holder is frozen

        def taken_over():
            h = health(ngx, timeout=0.5)
            if h is not None:
                saw.append((round(time.monotonic() - t0, 2),) + h)
            for r in readers:
                r.pump(0.0)
            return holder_of(ngx, exclude=(holder,)) if h and h[0] == 200 and \
                time.monotonic() - t0 > 1 else None
        new = wait_until(taken_over, T(TIMEOUT * 2), interval=0.02, what="a new holder")
        took = time.monotonic() - t0
        assert took < TIMEOUT * float(os.environ.get("EVENT_PIPER_TIME_SCALE", "1")) + 1, (
            "the frozen holder was replaced after %.1fs (listener timeout %.0fs)" % (took, TIMEOUT))
        downs = [(t, down_reason(b)) for t, s, b, _ in saw if s == 503]
        print("takeover after %.2fs; health while frozen: %s" % (took, downs[:6]))
        assert all(b == UP for _, s, b, _ in saw if s == 200)
        time.sleep(1.1)  # figures are published once a second
        st = status(ngx)
        ws = {int(w["pid"]): w for w in st["workers"]}
        assert ws[new]["listener_takeovers"] == 1, ws[new]
        assert st["listener_takeovers"] == 1 and st["listener_holder"] == 1, st
        assert st["listener_holder_pid"] == new, "the frozen worker still shows as holder"
        assert any("took the listener over from worker %d" % holder in m
                   for _, p, m in log_entries(ngx) if p == new)
        # The rest of the 90 s: the other workers' streams keep getting events.
        while time.monotonic() - t0 < 90:
            for r in readers:
                r.pump(0.001)
        os.kill(holder, signal.SIGCONT)
        stopped = False
        ngx.wait_log("this worker steps down and follows it", timeout=T(10))
        t_end = time.monotonic() + 2
        while time.monotonic() < t_end:
            for r in readers:
                r.pump(0.001)
    finally:
        if stopped:
            os.kill(holder, signal.SIGCONT)
        writer.stop()
    assert writer.count > 1000, writer.count
    read_until_all(readers, expected(db, consumers), T(60))
    assert holder_of(ngx) == new
    assert len(db.listeners()) == 1, "one listening connection again: %s" % db.listeners()
    h = health(ngx)
    assert h is not None and h[:2] == (200, UP)
    for r in readers:
        r.close()


# -- health: one reason for each way of not delivering, and back to UP --

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def health_of_every_worker(ngx, want_status, reason_part=None, timeout=None):
    """Wait until /health answers `want_status` from every worker (with a reason containing
    `reason_part` when DOWN); returns the body."""
    seen = {}

    def ok():
        h = health(ngx)
        if h is None:
            return None
        status_code, body, pid = h
        good = status_code == want_status and (
            body == UP if want_status == 200 else reason_part in down_reason(body))
        if good:
            seen[pid] = body
        else:
            seen.pop(pid, None)
        return body if set(seen) >= set(ngx.worker_pids()) else None
    return wait_until(ok, timeout or T(15), interval=0.05,
                      what="health %d (%s) from every worker" % (want_status, reason_part))


def terminate_listener(db):
    db.superuser_sql("select pg_terminate_backend(pid) from pg_stat_activity "
                     "where application_name = 'event_piper_listener'")


@pytest.mark.parametrize("mode", ["shared", "per_worker"])
def test_health_is_down_while_postgresql_is_unreachable_then_up(db, nginx, mode):
    ngx = nginx.start(db, workers=2, http={"event_piper_listener": mode})
    health_of_every_worker(ngx, 200)
    hold_tcp(db)
    terminate_listener(db)
    body = health_of_every_worker(ngx, 503, "not connected to PostgreSQL")
    assert body == (b'{"status":"DOWN","reason":"the listener is not connected to '
                    b'PostgreSQL"}')
    hold_tcp(db, False)
    assert health_of_every_worker(ngx, 200) == UP


def test_health_is_down_while_the_database_notifies_another_channel_then_up(db, nginx):
    ngx = nginx.start(db, workers=2)
    health_of_every_worker(ngx, 200)
    db.superuser_sql("alter database event_piper set event_piper.channel = 'elsewhere'")
    try:
        terminate_listener(db)  # the setting is read when the listener connects
        health_of_every_worker(ngx, 503, "another channel")
        # Events still arrive, late, through the check's position hints (counted in status).
        conn = db.connect()  # a new session: its trigger notifies 'elsewhere'
        try:
            db.run(conn, "insert into events (type, timestamp, subscriber, payload) "
                   "values ('insert', now(), 'toto', '{}')")
        finally:
            conn.close()
        wait_until(lambda: status(ngx)["position_hints"] >= 1, T(20), what="a position hint")
    finally:
        db.superuser_sql("alter database event_piper reset event_piper.channel")
    terminate_listener(db)
    health_of_every_worker(ngx, 200)


def test_health_is_down_while_committed_events_have_no_position_then_up(db, nginx):
    ngx = nginx.start(db, workers=2)
    health_of_every_worker(ngx, 200)
    db.superuser_sql("alter table events disable trigger events_commit_notify")
    try:
        db.insert_many("toto", 5)
    finally:
        db.superuser_sql("alter table events enable trigger events_commit_notify")
    # Found by the listener's next check (every third of event_piper_listener_timeout).
    health_of_every_worker(ngx, 503, "have no position")
    rc, out = db.psql("", "--single-transaction", "-f",
                      os.path.join(REPO, "postgresql", "schema.sql"))
    assert rc == 0, out
    health_of_every_worker(ngx, 200)


def test_health_is_down_when_the_holder_is_frozen_or_gone_and_nobody_can_listen(db, nginx):
    """SIGSTOP of the holder while PostgreSQL refuses new logins: the other worker's health
    stops saying UP within the listener timeout (the holder frozen, then the role taken over by a
    worker that cannot connect); UP again once it can. Then kill -9 of the holder likewise."""
    ngx = nginx.start(db, workers=2)
    holder = wait_holder(ngx)
    other = [p for p in ngx.worker_pids() if p != holder][0]
    health_of_every_worker(ngx, 200)
    hold_tcp(db)
    os.kill(holder, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        reasons = []
        while time.monotonic() - t0 < T(TIMEOUT):
            h = health(ngx, timeout=0.5)
            if h is not None and h[2] == other:
                reasons.append(h[1] if h[0] == 200 else down_reason(h[1]))
                if h[0] == 503 and "not connected" in reasons[-1]:
                    break
            time.sleep(0.01)
        print("health of worker %d after SIGSTOP of the holder: %s"
              % (other, sorted(set(map(str, reasons)))))
        assert reasons and reasons[-1] == "the listener is not connected to PostgreSQL", reasons
        frozen = [r for r in reasons if isinstance(r, str) and "frozen" in r]
        assert set(reasons) <= {UP, "the listener is not connected to PostgreSQL"} | set(frozen)
    finally:
        os.kill(holder, signal.SIGCONT)
    hold_tcp(db, False)
    ngx.wait_log("this worker steps down and follows it", timeout=T(10))
    health_of_every_worker(ngx, 200)
    # Gone: kill -9 of the (new) holder while logins are refused.
    holder = wait_holder(ngx)
    hold_tcp(db)
    ngx.allowed_alerts.append("worker process %d exited on signal 9" % holder)
    os.kill(holder, signal.SIGKILL)
    health_of_every_worker(ngx, 503, "")
    hold_tcp(db, False)
    health_of_every_worker(ngx, 200)
