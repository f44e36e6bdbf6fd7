#!/usr/bin/env python3
"""The reading side of bench/writers.sh's `wal` column, and its lag sampler.

    wal_streams.py read <port> <first> <last> <count-file>
        SSE streams to nginx (127.0.0.1:<port>/events) that together read every event of the
        subscribers user-<first> .. user-<last> (64 ids per stream: X-Consumer-Id and
        X-Consumer-Groups), until killed; every 0.2 s writes the number of events received so
        far to <count-file>. HTTP/1.0, so the body is the SSE text itself (no chunks).

    wal_streams.py lag <conninfo> <status-url> <seconds> <out-jsonl>
        once a second for <seconds>: the positioner's lag as PostgreSQL sees it (WAL bytes
        between pg_current_wal_lsn() and the slot's confirmed_flush_lsn; events whose id was
        given but that have no position yet) and as the module reports it (/status:
        positioner_lag_ms, positioner_lag_bytes); one JSON object per line.
"""
import json
import os
import selectors
import socket
import sys
import time
import urllib.request

IDS_PER_STREAM = 64


def read(port, first, last, count_file):
    sel = selectors.DefaultSelector()
    ids = ["user-%d" % i for i in range(first, last + 1)]
    for k in range(0, len(ids), IDS_PER_STREAM):
        chunk = ids[k:k + IDS_PER_STREAM]
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(("GET /events HTTP/1.0\r\nHost: bench\r\nX-Consumer-Id: %s\r\n"
                   "X-Consumer-Groups: %s\r\n\r\n" % (chunk[0], ", ".join(chunk[1:]))).encode())
        sel.register(s, selectors.EVENT_READ, {"tail": b"", "head": True})
    received = 0
    next_write = 0.0
    while True:
        for key, _ in sel.select(0.2):
            data = key.fileobj.recv(1 << 20)
            if not data:
                sys.exit("wal_streams: a stream ended")
            st = key.data
            buf = st["tail"] + data
            if st["head"]:
                if b"\r\n\r\n" not in buf:
                    st["tail"] = buf
                    continue
                status, buf = buf.split(b"\r\n\r\n", 1)
                if not status.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                    sys.exit("wal_streams: %r" % status[:200])
                st["head"] = False
                buf = b"\n" + buf
            received += buf.count(b"\nid: ")
            st["tail"] = buf[-4:]
        now = time.monotonic()
        if now >= next_write:
            tmp = count_file + ".tmp"
            with open(tmp, "w") as f:
                f.write("%d\n" % received)
            os.replace(tmp, count_file)
            next_write = now + 0.2


def lag(conninfo, status_url, seconds, out):
    import psycopg2
    conn = psycopg2.connect(conninfo, application_name="bench_wal_lag")
    conn.autocommit = True
    cur = conn.cursor()
    t0 = time.monotonic()
    with open(out, "w") as f:
        for i in range(1, seconds + 1):
            time.sleep(max(0.0, t0 + i - time.monotonic()))
            # The position first: the id read after it is never behind it.
            cur.execute("SELECT last_position FROM event_piper_wal_progress")
            positioned = cur.fetchone()[0]
            cur.execute("""
                SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint,
                       (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM events_id_seq),
                       (SELECT count(*) FROM pg_stat_activity WHERE state = 'active'
                           AND application_name = 'pgbench')
                  FROM pg_replication_slots s WHERE s.slot_name = 'event_piper'""")
            row = cur.fetchone() or (None, None, None)
            try:
                with urllib.request.urlopen(status_url, timeout=2) as r:
                    st = json.loads(r.read())
            except OSError:
                st = {}
            f.write(json.dumps({
                "t": i, "slot_lag_bytes": row[0], "last_id": row[1],
                "last_position": positioned, "writers_active": row[2],
                "lag_ms": st.get("positioner_lag_ms"),
                "lag_bytes": st.get("positioner_lag_bytes")}) + "\n")
            f.flush()


if __name__ == "__main__":
    if sys.argv[1] == "read":
        read(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    elif sys.argv[1] == "lag":
        lag(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        sys.exit(__doc__)
