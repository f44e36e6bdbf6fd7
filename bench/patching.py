#!/usr/bin/env python3
"""Folded replay against the full history (README "Patching events").

Loads N events with K patches each into a private PostgreSQL (scripts/pgctl.sh; positions and
targets written directly, the trigger bypassed, then ANALYZE), starts nginx with the module, and
reads the whole history of the consumer from Last-Event-ID 0, in full and folded, alternately,
REPS times each. Reports per mode the bytes on the wire, the seconds until the last frame arrived
and the history rows per second (N * (K + 1) rows either way, since a folded replay covers the
same history), then the two ratios the issue sets: folded bytes / full bytes (target <= 0.2) and
folded rows/s / full rows/s (target >= 1).

    bench/patching.py                 N=100000, K=10, 3 repetitions (a few minutes)
    BENCH_PATCH_EVENTS=2000 BENCH_PATCH_PATCHES=10 BENCH_REPS=1 bench/patching.py   (a try)

Environment: BENCH_PATCH_EVENTS, BENCH_PATCH_PATCHES, BENCH_REPS, EVENT_PIPER_MODULE, NGINX_BIN,
BENCH_OUT (where patching.json goes, default bench/). Everything it starts is stopped on exit.
"""

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PGCTL = os.path.join(ROOT, "scripts", "pgctl.sh")
MODULE = os.environ.get("EVENT_PIPER_MODULE", os.path.join(ROOT, "build",
                                                           "ngx_event_piper_module.so"))
NGINX = os.environ.get("NGINX_BIN", "/usr/sbin/nginx")
N = int(os.environ.get("BENCH_PATCH_EVENTS", "100000"))
K = int(os.environ.get("BENCH_PATCH_PATCHES", "10"))
REPS = int(os.environ.get("BENCH_REPS", "3"))
OUT = os.environ.get("BENCH_OUT", os.path.join(ROOT, "bench"))

CONF = """
load_module %(module)s;
worker_processes 2;
error_log %(prefix)s/error.log notice;
pid %(prefix)s/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    event_piper_postgres "host=127.0.0.1 port=%(pgport)d dbname=event_piper user=event_piper password=event_piper";
    server {
        listen 127.0.0.1:%(port)d;
        location = /events {
            event_piper;
            event_piper_folded $arg_folded;
        }
    }
}
"""

# Roots first (positions 1..N), then the patches round after round: patch j of event i at
# position N*j + i. Ids equal positions. A root is an order of about 100 bytes; a patch changes
# its status and one counter.
LOAD = """
SET session_replication_role = replica;
INSERT INTO events (id, type, timestamp, subscriber, payload, patches)
SELECT g, 'order', now(), 'bench',
       jsonb_build_object('order', g, 'status', 'created', 'customer', 'customer-' || g,
                          'total', g * 3, 'lines', jsonb_build_array(mod(g, 7), mod(g, 11), mod(g, 13))),
       NULL
  FROM generate_series(1, %(n)d) AS g;
INSERT INTO events (id, type, timestamp, subscriber, payload, patches)
SELECT %(n)d * j + i, 'order', now(), 'bench',
       jsonb_build_object('status', 'step-' || j, 'updates', j), i
  FROM generate_series(1, %(k)d) AS j, generate_series(1, %(n)d) AS i;
INSERT INTO event_positions (position, event_id, subscriber, target)
SELECT id, id, subscriber, patches FROM events;
SELECT setval('events_id_seq', %(last)d);
SELECT setval('events_position_seq', %(last)d);
ANALYZE events;
ANALYZE event_positions;
"""


def log(msg):
    print("[patching %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def read_history(port, folded, last):
    """GET the whole history; returns (bytes received, seconds until `id: last` arrived)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    path = "/events?folded=1" if folded else "/events"
    start = time.monotonic()
    s.sendall(("GET %s HTTP/1.1\r\nHost: bench\r\nX-Consumer-Id: bench\r\n"
               "Last-Event-ID: 0\r\n\r\n" % path).encode())
    needle = b"id: %d\n" % last
    total = 0
    tail = b""
    buf = bytearray(1 << 20)
    deadline = start + 600
    while True:
        n = s.recv_into(buf)
        if n == 0:
            raise SystemExit("the stream ended early")
        total += n
        window = tail + bytes(buf[:n])
        if needle in window:
            break
        tail = window[-64:]
        if time.monotonic() > deadline:
            raise SystemExit("no end after 600 s")
    elapsed = time.monotonic() - start
    s.close()
    return total, elapsed


def main():
    tmp = tempfile.mkdtemp(prefix="event_piper-bench-patching-")
    os.chmod(tmp, 0o777)
    pgdata = os.path.join(tmp, "pg")
    pgport = free_port()
    prefix = os.path.join(tmp, "nginx")
    os.makedirs(os.path.join(prefix, "logs"))
    nginx_started = False
    env = dict(os.environ, EVENT_PIPER_PG_FAST="1")
    try:
        subprocess.run([PGCTL, "start", pgdata, str(pgport)], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        last = N * (K + 1)
        log("loading %d events with %d patches each (%d rows)" % (N, K, last))
        sql = LOAD % dict(n=N, k=K, last=last)
        subprocess.run(["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/psql",
                        "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", pgdata, "-p", str(pgport),
                        "-d", "event_piper"], input=sql, text=True, check=True,
                       stdout=subprocess.DEVNULL)
        port = free_port()
        with open(os.path.join(prefix, "nginx.conf"), "w") as f:
            f.write(CONF % dict(module=MODULE, prefix=prefix, pgport=pgport, port=port))
        subprocess.run([NGINX, "-p", prefix, "-c", os.path.join(prefix, "nginx.conf")],
                       check=True)
        nginx_started = True
        time.sleep(1.0)
        runs = {"full": [], "folded": []}
        for rep in range(REPS):
            order = ("full", "folded") if rep % 2 == 0 else ("folded", "full")
            for mode in order:
                size, secs = read_history(port, mode == "folded", last)
                runs[mode].append({"bytes": size, "seconds": secs, "rows_per_s": last / secs})
                log("%-6s %12d bytes %8.2f s %10.0f rows/s" % (mode, size, secs, last / secs))
        med = {m: {k: statistics.median(r[k] for r in v) for k in ("bytes", "seconds",
                                                                   "rows_per_s")}
               for m, v in runs.items()}
        result = {"events": N, "patches_each": K, "rows": last, "reps": REPS, "runs": runs,
                  "median": med,
                  "bytes_ratio": med["folded"]["bytes"] / med["full"]["bytes"],
                  "rows_per_s_ratio": med["folded"]["rows_per_s"] / med["full"]["rows_per_s"]}
        print("folded/full bytes: %.3f (target <= 0.2); folded/full rows/s: %.2f (target >= 1)"
              % (result["bytes_ratio"], result["rows_per_s_ratio"]))
        with open(os.path.join(OUT, "patching.json"), "w") as f:
            json.dump(result, f, indent=1)
    finally:
        if nginx_started:
            subprocess.run([NGINX, "-p", prefix, "-c", os.path.join(prefix, "nginx.conf"),
                            "-s", "stop"], stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        subprocess.run([PGCTL, "stop", pgdata], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        if os.environ.get("BENCH_KEEP") != "1":
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    main()
