#!/usr/bin/env python3
"""Replay from a hot standby (README "Replay from standbys"): what share of a mass resume the
primary still serves.

Starts a private primary (scripts/pgctl.sh, wal_level logical, fsync off: the figure is about
where rows are read, not about durability), loads C consumers with N events each (interleaved,
positions written directly, the trigger bypassed, then ANALYZE), makes a hot standby of it with
`pg_basebackup -R` on another port, starts nginx (2 workers) with `event_piper_replay_postgres`
naming the standby, then opens C streams at once, each resuming from Last-Event-ID 0, and reads
until every one has received its consumer's last event. Reports the seconds until the last one
had everything, the rows the primary and the standby served (the module's /status), and the
primary's share of the replayed rows (target: at most 5 %).

    bench/standby.py                                       C=100, N=100000 (10,000,000 rows)
    BENCH_STANDBY_CLIENTS=5 BENCH_STANDBY_EVENTS=2000 bench/standby.py      (a try)

Environment: BENCH_STANDBY_CLIENTS, BENCH_STANDBY_EVENTS, EVENT_PIPER_MODULE, NGINX_BIN,
BENCH_OUT (where standby.json goes, default bench/). Everything it starts is stopped on exit.
"""

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PGCTL = os.path.join(ROOT, "scripts", "pgctl.sh")
PG_BIN = os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin")
MODULE = os.environ.get("EVENT_PIPER_MODULE", os.path.join(ROOT, "build",
                                                           "ngx_event_piper_module.so"))
NGINX = os.environ.get("NGINX_BIN", "/usr/sbin/nginx")
C = int(os.environ.get("BENCH_STANDBY_CLIENTS", "100"))
N = int(os.environ.get("BENCH_STANDBY_EVENTS", "100000"))
OUT = os.environ.get("BENCH_OUT", os.path.join(ROOT, "bench"))
TARGET = 0.05

CONF = """
load_module %(module)s;
worker_processes 2;
error_log %(prefix)s/error.log notice;
pid %(prefix)s/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    event_piper_postgres "host=127.0.0.1 port=%(pgport)d dbname=event_piper user=event_piper password=event_piper";
    event_piper_replay_postgres "host=127.0.0.1 port=%(sbport)d dbname=event_piper user=event_piper password=event_piper target_session_attrs=standby";
    server {
        listen 127.0.0.1:%(port)d;
        location = /events { event_piper; }
        location = /status { event_piper_status; }
    }
}
"""

# Event g belongs to consumer c<g mod C>; ids equal positions.
LOAD = """
SET session_replication_role = replica;
INSERT INTO events (id, type, timestamp, subscriber, payload)
SELECT g, 'insert', now(), 'c' || (g %% %(c)d), jsonb_build_object('n', g, 'kind', 'order')
  FROM generate_series(1, %(last)d) AS g;
INSERT INTO event_positions (position, event_id, subscriber)
SELECT id, id, subscriber FROM events;
SELECT setval('events_id_seq', %(last)d);
SELECT setval('events_position_seq', %(last)d);
ANALYZE events;
ANALYZE event_positions;
"""


def log(msg):
    print("[standby %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def as_postgres(*cmd, **kw):
    return subprocess.run(["runuser", "-u", "postgres", "--"] + list(cmd), check=True, **kw)


def psql(datadir, port, sql, user="postgres", db="event_piper"):
    return as_postgres(PG_BIN + "/psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", datadir,
                       "-p", str(port), "-U", user, "-d", db, input=sql, text=True,
                       stdout=subprocess.PIPE).stdout.strip()


def resume_all(port, streams):
    """C streams from Last-Event-ID 0 at once; seconds until each had its last event. The
    streams stay open (in `streams`): each goes live after the primary confirmed its tail."""
    sel = selectors.DefaultSelector()
    start = time.monotonic()
    for k in range(C):
        last = C * N if k == 0 else C * (N - 1) + k
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(("GET /events HTTP/1.1\r\nHost: bench\r\nX-Consumer-Id: c%d\r\n"
                   "Last-Event-ID: 0\r\n\r\n" % k).encode())
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, {"needle": b"id: %d\n" % last, "tail": b""})
    left = C
    buf = bytearray(1 << 20)
    while left > 0:
        if time.monotonic() - start > 1800:
            raise SystemExit("not done after 1800 s")
        for key, _ in sel.select(timeout=1.0):
            n = key.fileobj.recv_into(buf)
            if n == 0:
                raise SystemExit("a stream ended early")
            window = key.data["tail"] + bytes(buf[:n])
            if key.data["needle"] in window:
                sel.unregister(key.fileobj)
                streams.append(key.fileobj)
                left -= 1
            else:
                key.data["tail"] = window[-32:]
    return time.monotonic() - start


def status(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /status HTTP/1.0\r\nHost: bench\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def main():
    tmp = tempfile.mkdtemp(prefix="event_piper-bench-standby-")
    os.chmod(tmp, 0o777)
    pgdata, sbdata = os.path.join(tmp, "pg"), os.path.join(tmp, "standby")
    pgport, sbport, port = free_port(), free_port(), free_port()
    prefix = os.path.join(tmp, "nginx")
    os.makedirs(os.path.join(prefix, "logs"))
    nginx_started = standby_started = False
    env = dict(os.environ, EVENT_PIPER_PG_FAST="1", EVENT_PIPER_PG_LOGICAL="1")
    try:
        subprocess.run([PGCTL, "start", pgdata, str(pgport)], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        log("loading %d consumers with %d events each (%d rows)" % (C, N, C * N))
        psql(pgdata, pgport, LOAD % dict(c=C, last=C * N))
        with open(os.path.join(pgdata, "pg_hba.conf"), "a") as f:
            f.write("local   replication   all   trust\n")
        psql(pgdata, pgport, "SELECT pg_reload_conf()")
        as_postgres(PG_BIN + "/pg_basebackup", "-D", sbdata, "-h", pgdata, "-p", str(pgport),
                    "-U", "postgres", "-R", "-X", "stream", "-c", "fast",
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        as_postgres(PG_BIN + "/pg_ctl", "-D", sbdata, "-w", "-t", "120", "-l",
                    sbdata + "/server.log", "-o",
                    "-p %d -c unix_socket_directories='%s' -c listen_addresses=127.0.0.1 "
                    "-c hot_standby=on -c wal_level=replica -c max_wal_senders=10"
                    % (sbport, sbdata), "start", stdout=subprocess.DEVNULL)
        standby_started = True
        with open(os.path.join(prefix, "nginx.conf"), "w") as f:
            f.write(CONF % dict(module=MODULE, prefix=prefix, pgport=pgport, sbport=sbport,
                                port=port))
        subprocess.run([NGINX, "-p", prefix, "-c", os.path.join(prefix, "nginx.conf")],
                       check=True)
        nginx_started = True
        time.sleep(1.0)
        streams = []
        secs = resume_all(port, streams)
        time.sleep(1.5)  # the workers publish their figures every second
        st = status(port)
        for s in streams:
            s.close()
        primary, standby = st["replay_primary_rows"], st["replay_standby_rows"]
        share = primary / max(1, primary + standby)
        result = {"clients": C, "events_each": N, "seconds": secs,
                  "primary_rows": primary, "standby_rows": standby,
                  "primary_queries": st["replay_primary_queries"],
                  "standby_queries": st["replay_standby_queries"], "primary_share": share}
        print("%d clients x %d events: %.1f s; rows from the primary %d, from the standby %d: "
              "primary share %.2f %% (target <= %d %%)"
              % (C, N, secs, primary, standby, 100 * share, 100 * TARGET))
        with open(os.path.join(OUT, "standby.json"), "w") as f:
            json.dump(result, f, indent=1)
    finally:
        if nginx_started:
            subprocess.run([NGINX, "-p", prefix, "-c", os.path.join(prefix, "nginx.conf"),
                            "-s", "stop"], stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        if standby_started:
            subprocess.run(["runuser", "-u", "postgres", "--", PG_BIN + "/pg_ctl", "-D", sbdata,
                            "-m", "fast", "stop"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        subprocess.run([PGCTL, "stop", pgdata], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        if os.environ.get("BENCH_KEEP") != "1":
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    main()
