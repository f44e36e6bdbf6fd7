"""Where a stream without Last-Event-ID starts, with the shared listener (the default), on the
worker that holds the listener and on the one that follows it, with PostgreSQL up and down when
nginx starts.

The promise: the stream starts exactly after the newest position committed when it opened, or at
a position it then really delivers from. So whatever its error log line "stream opened ... after
position S" says, it receives every event of its consumer above S and none at or below S; and a
stream opened after a history was committed never replays that history.
"""

import os
import random
import re
import sys
import time

import pytest

from harness import T

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "chaos"))
from piper_chaos import (expected_events, hold_tcp, log_entries, pg_back_up,  # noqa: E402
                         status, wait_all_listening)

NGINX_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
    {{ http }}
    server {
        listen 127.0.0.1:{{ port }};
        location = /events {
            event_piper;
            event_piper_heartbeat 1s;
        }
        location = /status { event_piper_status; }
        location = /manage/health { event_piper_health; }
    }
}
"""


@pytest.fixture
def db(private_pg):
    pg_back_up(private_pg)
    private_pg.truncate()
    yield private_pg
    pg_back_up(private_pg)


def start_line(ngx, consumer):
    """The start position the module logged for the (single) stream of `consumer`."""
    needle = 'stream opened for consumer "%s" ' % consumer
    lines = [m for _, _, m in log_entries(ngx) if needle in m]
    assert len(lines) == 1, lines
    return int(re.search(r"after position (\d+)", lines[0]).group(1))


def positions(body):
    return [int(x) for x in re.findall(rb"(?m)^id: (\d+)$", bytes(body))]


def open_on_both(clients, ngx, consumer, per_worker, attempts=80):
    """Streams of `consumer` without Last-Event-ID until each worker serves `per_worker` of them.
    Returns {worker pid: [streams]}."""
    by_worker = {}
    workers = set(ngx.worker_pids())
    for _ in range(attempts):
        c = clients.stream(ngx, consumer, settle=0)
        by_worker.setdefault(ngx.wait_worker_of(c), []).append(c)
        if set(by_worker) >= workers and all(len(v) >= per_worker for v in by_worker.values()):
            break
    assert set(by_worker) == workers, "no stream on every worker in %d connections" % attempts
    return by_worker


@pytest.mark.parametrize("pg_at_start", ["down", "up"])
def test_a_stream_opened_after_a_history_never_replays_it_on_either_worker(
        db, nginx, clients, pg_at_start):
    history = 3 if pg_at_start == "down" else 500
    for n in range(history):
        db.insert("x", '{"old": %d}' % n)
    lock = None
    if pg_at_start == "down":
        hold_tcp(db)
        db.stop()
    else:
        # PostgreSQL is up, but the listener's first reading of the newest position waits
        # behind this lock: the streams below open before any worker knows a position (the
        # first fraction of a second after a start, made to last).
        lock = db.connect(user="postgres", autocommit=False)
        db.run(lock, "lock table event_positions in access exclusive mode")
    ngx = nginx.start(db, workers=2, wait_listening=False)
    by_worker = open_on_both(clients, ngx, "x", per_worker=4)
    streams = [c for v in by_worker.values() for c in v]
    for c in streams:
        c.read_for(0.05)
    if pg_at_start == "down":
        db.start()
        hold_tcp(db, False)
    else:
        lock.rollback()
        lock.close()
    wait_all_listening(ngx)
    db.insert("x", '{"new": 1}')
    (new, new_frame), = [e for e in expected_events(db, "x") if e[0] > history]
    for pid, group in by_worker.items():
        for c in group:
            c.wait(lambda c=c: new in positions(c.body), T(15), "the new event")
            c.read_for(0.05)
            got = positions(c.body)
            assert got == [new], (
                "worker %d (%s the listener), PostgreSQL %s at start: a stream opened after %d "
                "events were committed received %d of them before the new one"
                % (pid, "holds" if ngx_holder(ngx) == pid else "follows", pg_at_start, history,
                   len(got) - 1))


def ngx_holder(ngx):
    return int(status(ngx).get("listener_holder_pid", 0))


@pytest.mark.parametrize("pg_at_start,mode", [("down", "shared"), ("up", "shared"),
                                              ("up", "per_worker")])
def test_a_stream_gets_every_event_above_its_start_and_none_below_on_either_worker(
        db, nginx, clients, pg_at_start, mode):
    if pg_at_start == "down":
        hold_tcp(db)
        db.stop()
    ngx = nginx.start(db, workers=2, wait_listening=False, http={"event_piper_listener": mode})
    if pg_at_start == "down":
        time.sleep(0.5)
        db.start()
        hold_tcp(db, False)
    wait_all_listening(ngx)
    holder = ngx_holder(ngx)
    rng = random.Random(19)
    trials, problems, by_worker = 0, [], {}
    deadline = time.monotonic() + T(60)
    while (len(by_worker) < 2 or min(by_worker.values()) < 8) and time.monotonic() < deadline:
        trials += 1
        consumer = "s%d" % trials
        db.insert(consumer, '{"p": 1}')
        time.sleep(rng.choice((0, 0.05, 0.1, 0.15, 0.2)))
        c = clients.stream(ngx, consumer, settle=0)
        pid = ngx.wait_worker_of(c)
        by_worker[pid] = by_worker.get(pid, 0) + 1
        db.insert(consumer, '{"p": 2}')
        events = expected_events(db, consumer)
        c.wait(lambda: events[-1][0] in positions(c.body), T(10), "the second event")
        c.read_for(0.05)
        start = start_line(ngx, consumer)
        want = [p for p, _ in events if p > start]
        if positions(c.body) != want:
            problems.append("worker %d (%s), stream after %d: got %s, committed %s" % (
                pid, "holder" if pid == holder else "follower", start, positions(c.body),
                [p for p, _ in events]))
        c.close()
    assert len(by_worker) == 2, "streams on one worker only: %s" % by_worker
    assert not problems, "%d of %d streams broke their start point:\n%s" % (
        len(problems), trials, "\n".join(problems))
