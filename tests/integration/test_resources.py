"""Resource safety.

10,000 connect/disconnect cycles of /events streams (open, read the response headers, close; a
mix of live streams, replays that are cut before they finish, polite closes and resets, each with a
consumer id of its own) must leave every worker's RSS within 2 MB of its value after a warm-up of
1,000 cycles, and its open fd count unchanged.
"""

import os
import socket
import struct
import sys
import time

import pytest

sys.path.append(os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                              "chaos")))

import harness  # noqa: E402
from harness import T, open_stream, pump_all, rss_kb, wait_until  # noqa: E402
from piper_chaos import fd_inventory, log_entries, status, wait_all_listening  # noqa: E402

NGINX_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
    event_piper_replay_connections 2;
    server {
        listen 127.0.0.1:{{ port }} reuseport;
        location = /events {
            event_piper;
            event_piper_heartbeat 1s;
            event_piper_replay_batch 100;
        }
        location = /status { event_piper_status; }
        location = /manage/health { event_piper_health; }
    }
}
"""

WARMUP = 1000
CYCLES = 10000
RSS_LIMIT_KB = 2048
UNDER_ASAN = "asan" in os.environ.get("EVENT_PIPER_NGINX_PRELOAD", "")


def say(msg):
    harness.say("    [resources] %s" % msg)


def cycle_request(i):
    kind = i % 4
    headers = b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Consumer-Id: cycle-%d\r\n" % i
    if kind == 0:    # a replay of a long history, cut right after the headers
        headers = (b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Consumer-Id: hist\r\n"
                   b"Last-Event-ID: %d\r\n" % (i % 50))
    elif kind == 1:  # a replay of an empty history
        headers += b"Last-Event-ID: 0\r\n"
    return headers + b"\r\n", kind in (1, 2)  # (request, reset)


def cycles(port, start, n):
    statuses = {}
    for i in range(start, start + n):
        req, reset = cycle_request(i)
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            s.sendall(req)
            buf = b""
            while b"\r\n\r\n" not in buf:
                d = s.recv(4096)
                if not d:
                    break
                buf += d
            code = buf[9:12].decode("latin-1", "replace")
            statuses[code] = statuses.get(code, 0) + 1
            if reset:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            s.close()
    return statuses


def quiet(pg, ngx, pids, idle_tcp):
    """Wait until no stream is left and the fd counts hold still; returns the snapshot."""
    try:
        wait_until(lambda: status(ngx)["streams"] == 0 and
                   all(fd_inventory(p, pg.port).get("tcp", 0) <= idle_tcp[p]
                       for p in pids), T(30), interval=0.2, what="every stream closed")
    finally:
        say("status streams %s; fds %s (idle: %s TCP sockets)"
            % (status(ngx)["streams"], {p: fd_inventory(p, pg.port) for p in pids},
               idle_tcp))
    time.sleep(1.2)  # one more status publication, timers settle
    snap = {p: (rss_kb(p), len(os.listdir("/proc/%d/fd" % p)), fd_inventory(p, pg.port))
            for p in pids}
    time.sleep(0.3)
    again = {p: len(os.listdir("/proc/%d/fd" % p)) for p in pids}
    assert {p: v[1] for p, v in snap.items()} == again, "fd counts still moving"
    return snap


def fill_the_replay_pools(pg, ngx, pids):
    """Replay connections are opened on demand: make every worker open all of them (2) now,
    so that the baseline holds them."""
    for attempt in range(10):
        # Two replay connections each, and the listener (shared: on one worker only).
        if sum(fd_inventory(p, pg.port).get("pg", 0) for p in pids) >= \
                2 * len(pids) + ngx.listeners_expected and \
                all(fd_inventory(p, pg.port).get("pg", 0) >= 2 for p in pids):
            return
        streams = [open_stream(ngx.port, "hist", "0", keep_raw=False) for _ in range(12)]
        pump_all(streams, lambda: all(len(c.events) >= 2000 for c in streams), T(30),
                 "concurrent replays")
        for c in streams:
            c.close()
        wait_until(lambda: status(ngx)["streams"] == 0, T(10), what="streams closed")
    pytest.fail("replay pools not full: %s" % {p: fd_inventory(p, pg.port) for p in pids})


def test_10000_connect_disconnect_cycles_leave_rss_and_fds_unchanged(db, nginx):
    db.insert_many("hist", 20000,
                   payload_sql="jsonb_build_object('n', g, 'pad', repeat('x', 100))")
    ngx = nginx.start(db, workers=2, wait_listening=False)
    wait_all_listening(ngx)
    pids = sorted(ngx.worker_pids())
    idle_tcp = {p: fd_inventory(p, db.port).get("tcp", 0) for p in pids}  # listeners
    fill_the_replay_pools(db, ngx, pids)
    t0 = time.monotonic()
    st = cycles(ngx.port, 0, WARMUP)
    assert st == {"200": WARMUP}
    base = quiet(db, ngx, pids, idle_tcp)
    t1 = time.monotonic()
    st = cycles(ngx.port, WARMUP, CYCLES)
    cycles_s = time.monotonic() - t1
    assert st == {"200": CYCLES}
    after = quiet(db, ngx, pids, idle_tcp)

    opened = {}
    for lvl, p, m in log_entries(ngx):
        if "event_piper: stream opened" in m:
            opened[p] = opened.get(p, 0) + 1
    for p in pids:
        say("worker %d: %d streams opened; RSS %d -> %d kB (%+d), fds %d -> %d; %s -> %s"
            % (p, opened.get(p, 0), base[p][0], after[p][0], after[p][0] - base[p][0],
               base[p][1], after[p][1], base[p][2], after[p][2]))
    say("%d cycles in %.1fs (warm-up %d in %.1fs)" % (CYCLES, cycles_s, WARMUP, t1 - t0))
    assert sorted(ngx.worker_pids()) == pids, "a worker was replaced (crash?)"
    assert "exited on signal" not in ngx.read_error_log()
    for p in pids:
        assert opened.get(p, 0) > (WARMUP + CYCLES) // 5, \
            "worker %d served too few of the cycles to judge" % p
        assert after[p][1] == base[p][1], (
            "worker %d: open fds %d after the cycles, %d before (%s -> %s)"
            % (p, after[p][1], base[p][1], base[p][2], after[p][2]))
        growth = after[p][0] - base[p][0]
        if UNDER_ASAN:
            say("AddressSanitizer build: RSS not judged (its quarantine keeps freed memory)")
        else:
            assert growth <= RSS_LIMIT_KB, ("worker %d: RSS grew %d kB over %d "
                                            "cycles" % (p, growth, CYCLES))

