"""The chaos test.

Eight C++ writers (tests/chaos/writer.cpp, one libpq connection each) insert events in
transactions of random length with pauses inside (so that they commit out of id order), roll some
back, make some payloads larger than NOTIFY's 8000 bytes, and ride out PostgreSQL restarts (a
transaction whose COMMIT answer is lost is looked up by its marker). Sixty SSE clients over twelve
consumers disconnect at random moments (FIN or RST, often in the middle of a frame) and resume
with the Last-Event-ID of the last complete frame they got, as EventSource does. Meanwhile
PostgreSQL is restarted twice (pg_ctl stop -m fast, then pg_ctl start on the same port), nginx
is reloaded once, and the worker holding the instance's one LISTEN connection
(`event_piper_listener shared`, the default) is killed with -9 twice: the master respawns it and
another worker takes the listener.

Twelve more clients carry several ids each (`X-Consumer-Groups`, overlapping sets of the
same consumers), and must hold the events of all their ids merged in position order.

At the end every client must hold exactly the committed events of its ids, as the table has
them (`select position, type, payload ... where subscriber = ... order by position`), byte for
byte: 0 lost, 0 duplicated, 0 out of order. The counts are printed.

It runs twice: with the trigger giving positions, and with `event_piper_source wal` (the cluster
restarted with wal_level = logical, the database switched with event_piper_set_source('wal')):
there the worker killed holds the positioner too, and PostgreSQL's restarts cut its writes.
EVENT_PIPER_CHAOS_SOURCES=trigger (or wal) runs one of them.
"""

import os
import random
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

sys.path.append(os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                              "chaos")))

import harness  # noqa: E402
from harness import HttpClient, T, compact_json, frame, wait_until  # noqa: E402
from piper_chaos import (pg_back_up, restart_pg, status, wait_all_listening,  # noqa: E402
                         worker_status, writer_binary)

NGINX_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
    event_piper_replay_connections 2;
    {{ http }}
    server {
        listen 127.0.0.1:{{ port }};
        location = /events {
            event_piper;
            event_piper_heartbeat 2s;
            event_piper_retry 1s;
            event_piper_replay_batch 50;
            event_piper_stream_buffer 16k;
            event_piper_consumer_groups $http_x_consumer_groups;
        }
        location = /status { event_piper_status; }
        location = /manage/health { event_piper_health; }
    }
}
"""

CONSUMERS = ["c%02d" % i for i in range(10)] + ["o'neil; --", "caf\u00e9 \u2603"]
NOBODY = "nobody-listens"          # events nobody subscribes to
CLIENTS_PER_CONSUMER = 5
# Multiplexed clients: a consumer plus groups, overlapping one another.
MULTIPLEXED = [("c00", ["c01", "c02"]), ("c02", ["c03", "o'neil; --"]),
               ("c05", ["c06", "c07", "c00"]), ("caf\u00e9 \u2603", ["c09", "c08", "c01"])]
CLIENTS_PER_MULTIPLEXED = 3
WRITERS = 8
SEED = int(os.environ.get("EVENT_PIPER_CHAOS_SEED", "0")) or int(time.time())

# Seconds from the start of the writers.
PG_RESTART_1 = 10
KILL_HOLDER_1 = 16
NGINX_RELOAD = 21
KILL_HOLDER_2 = 27
PG_RESTART_2 = 32
WRITERS_STOP = 44
PG_DOWN_1, PG_DOWN_2 = 2.0, 3.0


def say(msg):
    harness.say("    [chaos] %s" % msg)


class ChaosClient:
    """An EventSource-like client: reconnects with the last complete frame's id."""

    # What is kept of each frame's bytes (the soak keeps a checksum: it runs for minutes).
    keep = staticmethod(lambda raw: raw)

    def __init__(self, idx, consumer, port, rnd, groups=()):
        self.idx, self.consumer, self.port, self.rnd = idx, consumer, port, rnd
        self.ids = [consumer] + list(groups)
        self.got = []            # [(id, raw frame)] over every connection, in arrival order
        self.conn = None
        self.seen = 0            # events of self.conn already moved to self.got
        self.reconnect_at = 0.0
        self.drop_at = None
        self.connects = 0
        self.drops = 0           # random disconnects by the client
        self.server_ends = 0     # the server ended the response (reload: retry + last chunk)
        self.abrupt_ends = 0     # the connection was closed without the last chunk
        self.bad_status = []     # non-200 answers
        self.connect_errors = 0
        self.slow = idx % 10 == 0  # stops reading now and then (the server must fall back)
        self.paused = False
        self.pause_at = self.rnd.uniform(1, 4) if self.slow else None
        self.pauses = 0

    @property
    def last_id(self):
        return self.got[-1][0] if self.got else 0

    def connect(self, now, chaos):
        try:
            c = HttpClient(self.port, keep_raw=False, connect_timeout=5,
                           rcvbuf=8192 if self.slow else None)
            headers = [("X-Consumer-Id", self.consumer.encode("utf-8")),
                       ("Last-Event-ID", str(self.last_id))]
            if len(self.ids) > 1:
                headers.append(("X-Consumer-Groups", ",".join(self.ids[1:]).encode("utf-8")))
            c.request("GET", "/events", headers)
            c.sock.setblocking(False)
        except OSError:
            self.connect_errors += 1
            self.reconnect_at = now + 0.2
            return None
        c.noted_status = False
        self.conn, self.seen = c, 0
        self.connects += 1
        if not chaos:
            self.drop_at = None
        elif self.slow:
            self.drop_at = now + self.rnd.uniform(4, 8)
        else:
            self.drop_at = now + min(6.0, max(0.1, self.rnd.expovariate(1 / 1.8)))
        return c

    def collect(self):
        c = self.conn
        if c.status is not None and c.status != 200 and not c.noted_status and c.complete:
            c.noted_status = True
            self.bad_status.append((c.status, bytes(c.body[:200])))
        evs = c.events
        while self.seen < len(evs):
            f = evs[self.seen]
            self.seen += 1
            try:
                self.got.append((int(f.id), self.keep(f.raw)))
            except ValueError:
                self.got.append((-1, self.keep(f.raw)))

    def close(self, now, reset=False):
        c = self.conn
        self.conn = None
        if c is None:
            return
        if reset:
            try:
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        c.close()
        self.reconnect_at = now + self.rnd.uniform(0.0, 0.3)


def check_client(cl, expected):
    """Counts for one client against the expected [(position, frame)] of its consumer."""
    exp_ids = [p for p, _ in expected]
    exp_set = set(exp_ids)
    exp_frames = {p: cl.keep(f) for p, f in expected}
    got_ids = [i for i, _ in cl.got]
    seen = set()
    dup = disorder = extra = wrong_bytes = 0
    prev = None
    for i, raw in cl.got:
        if i in seen:
            dup += 1
        seen.add(i)
        if i not in exp_set:
            extra += 1
        elif exp_frames[i] != raw:
            wrong_bytes += 1
        if prev is not None and i < prev:
            disorder += 1
        prev = i
    lost = [i for i in exp_ids if i not in seen]
    return {"expected": len(exp_ids), "delivered": len(got_ids), "lost": len(lost),
            "duplicated": dup, "out_of_order": disorder, "unexpected": extra,
            "wrong_bytes": wrong_bytes, "first_lost": lost[:5]}


class Writers:
    """The C++ writers (tests/chaos/writer.cpp), one process each, outputs in `tmp`. stop() ends
    them with SIGTERM and returns their outputs; kill() ends whatever is left."""

    def __init__(self, db, tmp, count=WRITERS, seed=SEED, max_pause_ms=30):
        self.db, self.tmp, self.count, self.seed, self.max_pause_ms = (db, tmp, count, seed,
                                                                       max_pause_ms)
        self.procs = []

    def start(self):
        binary = writer_binary()
        subs = ",".join(CONSUMERS + [NOBODY])
        for w in range(self.count):
            out = open(os.path.join(self.tmp, "writer%d.out" % w), "w+")
            p = subprocess.Popen([binary, self.db.conninfo, str(w), str(self.seed * 100 + w), subs,
                                  "6", "12", str(self.max_pause_ms)], stdout=out,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            self.procs.append((p, out))

    def stop(self):
        for p, _ in self.procs:
            p.send_signal(signal.SIGTERM)
        results = []
        for p, out in self.procs:
            try:
                p.wait(T(30))
            except subprocess.TimeoutExpired:
                pytest.fail("a writer did not stop within 30s of SIGTERM")
            out.seek(0)
            results.append(out.read())
        return results

    def kill(self):
        for p, out in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            out.close()


def writer_accounts(outputs):
    """The writers' own accounts: (committed {marker: rows}, rolled back, aborted, lost answers,
    errors)."""
    committed, rolled, aborted, unknown, errors = {}, set(), set(), [], []
    for text in outputs:
        for line in text.splitlines():
            parts = line.split(" ")
            if parts[0] == "C":
                committed[parts[1]] = int(parts[2])
            elif parts[0] == "R":
                rolled.add(parts[1])
            elif parts[0] == "A":
                aborted.add(parts[1])
            elif parts[0] == "U":
                unknown.append(line)
                if parts[3] == "C":
                    committed[parts[1]] = int(parts[2])
                else:
                    aborted.add(parts[1])
            elif parts[0] == "E":
                errors.append(line)
    return committed, rolled, aborted, unknown, errors


def committed_frames(db):
    """The truth, once nobody writes any more: (rows, {consumer: [(position, frame)]})."""
    if getattr(db, "source", "trigger") == "wal":  # the positioner's lag: every row positioned
        wait_until(lambda: int(db.scalar("select count(*) from event_log where position is null"))
                   == 0, T(30), what="the positioner to position every committed row")
    rows = db.sql("select subscriber, position, type, payload::text from event_log "
                  "where position is not null order by position")
    final = {k: [] for k in CONSUMERS}
    for sub, pos, typ, payload in rows:
        if sub in final:
            final[sub].append((int(pos), frame(int(pos), typ, compact_json(payload))))
    return rows, final


def expected_for(cl, final):
    """The events of all a client's ids, merged in position order."""
    return sorted((e for k in cl.ids for e in final[k]), key=lambda e: e[0])


def make_clients(port, seed=SEED, client_class=ChaosClient):
    clients = [client_class(i, CONSUMERS[i % len(CONSUMERS)], port, random.Random(seed * 1000 + i))
               for i in range(CLIENTS_PER_CONSUMER * len(CONSUMERS))]
    for consumer, groups in MULTIPLEXED * CLIENTS_PER_MULTIPLEXED:
        i = len(clients)
        clients.append(client_class(i, consumer, port, random.Random(seed * 1000 + i), groups))
    return clients


def disrupt(what, ngx, db, t_start):
    """One disruption ("kill": kill -9 of the listener's holder, "reload", or ("pg", seconds
    down): a PostgreSQL restart); returns its log line."""
    t0 = time.monotonic()
    if what == "kill":
        holder = wait_until(lambda: int(status(ngx).get("listener_holder_pid", 0)),
                            T(10), what="a worker holding the listener")
        ngx.allowed_alerts.append("worker process %d exited on signal 9" % holder)
        os.kill(holder, signal.SIGKILL)
        new = wait_until(
            lambda: (lambda p: p if p not in (0, holder) else None)(
                int(status(ngx).get("listener_holder_pid", 0))),
            T(10), interval=0.05, what="another worker holding the listener")
        return ("kill -9 of the listener's holder %d at %.1fs: %d holds it after %.1fs"
                % (holder, t0 - t_start, new, time.monotonic() - t0))
    if what == "reload":
        old, new = ngx.reload()
        wait_until(lambda: not any(os.path.exists("/proc/%d" % p) for p in old),
                   T(10), what="old workers to exit after the reload")
        return ("nginx reload at %.1fs: old workers %s gone after %.1fs"
                % (t0 - t_start, sorted(old), time.monotonic() - t0))
    restart_pg(db, what[1])
    return ("PostgreSQL restart at %.1fs: down %.1fs" % (t0 - t_start, time.monotonic() - t0))


class ClientPool:
    """Runs the clients in one thread with a selector: connects, reads, drops connections at
    random while `chaos` is on, pauses the slow ones, reconnects with the last id."""

    def __init__(self, clients, t_start):
        self.clients, self.t_start = clients, t_start
        self.sel = selectors.DefaultSelector()
        self.chaos = True

    def pump(self, until):
        sel, t_start, chaos = self.sel, self.t_start, self.chaos
        while True:
            now = time.monotonic()
            if now >= until:
                return
            for cl in self.clients:
                if cl.slow and chaos and now - t_start >= cl.pause_at:
                    # Slow client: stop reading for a while, then read again.
                    if not cl.paused and cl.conn is not None:
                        sel.unregister(cl.conn.sock)
                        cl.paused, cl.pause_at = True, now - t_start + cl.rnd.uniform(1.5, 3)
                        cl.pauses += 1
                        continue
                    if cl.paused:
                        cl.paused, cl.pause_at = False, now - t_start + cl.rnd.uniform(2, 5)
                        if cl.conn is not None:
                            sel.register(cl.conn.sock, selectors.EVENT_READ, cl)
                if cl.paused:
                    continue
                if cl.conn is None and now >= cl.reconnect_at:
                    c = cl.connect(now, chaos)
                    if c is not None:
                        sel.register(c.sock, selectors.EVENT_READ, cl)
                elif cl.conn is not None and cl.drop_at is not None and now >= cl.drop_at:
                    cl.collect()
                    sel.unregister(cl.conn.sock)
                    cl.drops += 1
                    cl.close(now, reset=cl.rnd.random() < 0.5)
            for key, _ in sel.select(timeout=0.02):
                cl = key.data
                c = cl.conn
                for _ in range(4):
                    if not c._recv(262144):
                        break
                cl.collect()
                if c.eof or (c.status is not None and c.status != 200 and c.complete):
                    sel.unregister(c.sock)
                    if c.complete:
                        cl.server_ends += 1
                    else:
                        cl.abrupt_ends += 1
                    cl.close(time.monotonic())

    def calm(self):
        """No more random disconnects or pauses: every client reads until told otherwise."""
        self.chaos = False
        for cl in self.clients:
            cl.drop_at = None
            if cl.paused:
                cl.paused = False
                if cl.conn is not None:
                    self.sel.register(cl.conn.sock, selectors.EVENT_READ, cl)

    def drain(self, targets, timeout):
        """Pump until every client's last id reaches targets[client idx] (or the timeout), then
        half a second more (anything extra would arrive now). Returns the seconds it took."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if all(cl.last_id >= targets[cl.idx] for cl in self.clients):
                break
            self.pump(time.monotonic() + 0.25)
        self.pump(time.monotonic() + 0.5)
        return time.monotonic() - t0

    def close(self):
        for cl in self.clients:
            if cl.conn is not None:
                cl.collect()
                self.sel.unregister(cl.conn.sock)
                cl.close(time.monotonic())
        self.sel.close()


def table_checks(db):
    """(marker: rows in the table, rows without a position, rows committed out of id order,
    payloads over 8000 bytes)."""
    in_table = {m: int(n) for m, n in db.sql(
        "select payload->>'tx', count(*) from event_log group by 1")}
    unpositioned = int(db.scalar("select count(*) from event_log where position is null"))
    out_of_id_order = int(db.scalar(
        "select count(*) from (select id, lag(id) over (order by position) as prev "
        "from event_log) x where id < prev"))
    big = int(db.scalar("select count(*) from events where octet_length(payload::text) > 8000"))
    return in_table, unpositioned, out_of_id_order, big


def check_clients(clients, final):
    """Every client against its expected events: (totals, bad clients, '503 shutting down'
    answers)."""
    totals = {"expected": 0, "delivered": 0, "lost": 0, "duplicated": 0, "out_of_order": 0,
              "unexpected": 0, "wrong_bytes": 0}
    bad_clients = []
    shutdown_503 = 0
    for cl in clients:
        r = check_client(cl, expected_for(cl, final))
        for k in totals:
            totals[k] += r[k]
        # A request that lands on an old worker during the reload gets a 503 (see
        # test_failures.ShutdownRace): this client reconnects after it, as an EventSource
        # would not. Counted and printed here; any other non-200 answer is a failure.
        others = [b for b in cl.bad_status if not (b[0] == 503 and b"shutting down" in b[1])]
        shutdown_503 += len(cl.bad_status) - len(others)
        if any(r[k] for k in ("lost", "duplicated", "out_of_order", "unexpected",
                              "wrong_bytes")) or others:
            bad_clients.append((cl.idx, cl.consumer, r, others[:2]))
    return totals, bad_clients, shutdown_503


@pytest.fixture(params=os.environ.get("EVENT_PIPER_CHAOS_SOURCES", "trigger,wal").split(","))
def db(private_pg, request):
    """This module's own cluster (the test restarts it), up and with the events table empty, in
    the source mode of the parameter (wal: wal_level = logical and event_piper_set_source)."""
    pg = private_pg
    pg.source = request.param
    pg_back_up(pg)
    if pg.source == "wal" and not pg.logical:
        pg.logical = True
        pg.stop()
        pg.start()
    if pg.logical and pg.scalar("SELECT source FROM event_piper_wal_progress") == "wal":
        pg.superuser_sql("SELECT event_piper_set_source('trigger', 0)")
    pg.truncate()
    if pg.source == "wal":
        pg.sql("UPDATE event_piper_wal_progress SET lsn = NULL, last_position = 0")
        assert pg.superuser_sql("SELECT event_piper_set_source('wal')")[0][0] == "wal"
    yield pg
    pg_back_up(pg)


@pytest.fixture
def writers(db, nginx):
    """start() runs the C++ writers (tests/chaos/writer.cpp); start.stop() ends them with SIGTERM
    and returns their outputs. Whatever is left is killed at the end of the test."""
    w = Writers(db, nginx.tmp)

    def start():
        w.start()

    start.stop = w.stop
    yield start
    w.kill()


def test_writers_restarts_reload_and_resuming_clients_lose_nothing(db, nginx, writers, request):
    say("seed %d (EVENT_PIPER_CHAOS_SEED=%d reproduces the random choices)" % (SEED, SEED))
    ngx = nginx.start(db, workers=2, wait_listening=False,
                      http={"event_piper_source": db.source})
    wait_all_listening(ngx)
    clients = make_clients(ngx.port)
    request.addfinalizer(lambda: [c.close(0) for c in clients])

    # Disruptions run in their own thread: the client loop keeps reading meanwhile.
    log = []
    problems = []
    t_start = time.monotonic()

    def at(t):
        delay = t_start + t - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def disruptions():
        try:
            for t, what in ((PG_RESTART_1, ("pg", PG_DOWN_1)), (KILL_HOLDER_1, "kill"),
                            (NGINX_RELOAD, "reload"), (KILL_HOLDER_2, "kill"),
                            (PG_RESTART_2, ("pg", PG_DOWN_2))):
                at(t)
                log.append(disrupt(what, ngx, db, t_start))
        except Exception as e:  # reported by the main thread
            problems.append(repr(e))

    writers()
    disruptor = threading.Thread(target=disruptions, daemon=True)
    disruptor.start()

    pool = ClientPool(clients, t_start)
    t_writing = time.monotonic()
    pool.pump(t_start + WRITERS_STOP)
    disruptor.join(T(30))
    assert not disruptor.is_alive(), "the disruptions did not finish"
    assert problems == []
    writer_outputs = writers.stop()
    writing_s = time.monotonic() - t_writing
    for line in log:
        say(line)

    # The truth, now that nobody writes any more.
    rows, final = committed_frames(db)
    targets = {cl.idx: (expected_for(cl, final)[-1][0] if expected_for(cl, final) else 0)
               for cl in clients}

    # Drain: no more random disconnects; every client catches up to its consumer's newest.
    pool.calm()
    drain_s = pool.drain(targets, T(60))
    pool.close()

    committed, rolled, aborted, unknown, errors = writer_accounts(writer_outputs)
    in_table, unpositioned, out_of_id_order, big = table_checks(db)
    totals, bad_clients, shutdown_503 = check_clients(clients, final)
    n_events = sum(len(v) for v in final.values())
    say("writers: %d transactions committed (%d rows; %d rows in the table, %d of them for "
        "nobody), %d rolled back on purpose, %d cut by a restart and retried, %d commits "
        "with a lost answer (%s), %d writer errors"
        % (len(committed), sum(committed.values()), len(rows), len(rows) - n_events,
           len(rolled), len(aborted), len(unknown),
           ", ".join(u.split(" ", 1)[1] for u in unknown[:4]), len(errors)))
    say("table: %d rows committed out of id order, %d payloads over 8000 bytes"
        % (out_of_id_order, big))
    say("clients: %d over %d consumers (%d of them with several ids); %d connections, %d random disconnects, %d responses "
        "ended by the server, %d cut, %d connect errors, %d '503 shutting down' answers; "
        "writing %.1fs, drain %.1fs"
        % (len(clients), len(CONSUMERS), sum(len(c.ids) > 1 for c in clients),
           sum(c.connects for c in clients),
           sum(c.drops for c in clients), sum(c.server_ends for c in clients),
           sum(c.abrupt_ends for c in clients), sum(c.connect_errors for c in clients),
           shutdown_503, writing_s, drain_s))
    say("events committed %d (for the clients' consumers), deliveries expected %d, "
        "delivered %d, lost %d, duplicated %d, out of order %d, unexpected %d, wrong bytes %d"
        % (n_events, totals["expected"], totals["delivered"], totals["lost"],
           totals["duplicated"], totals["out_of_order"], totals["unexpected"],
           totals["wrong_bytes"]))
    for b in bad_clients[:8]:
        say("client %d (%r): %s; non-200: %s" % b)
    try:
        ws = worker_status(ngx)
        say("status (listener, reconnects, streams, overflows to the table): %s; slow clients "
            "paused %d times" % ({p: (w["listener"], w["listener_reconnects"], w["streams"],
                                      w["stream_overflows"]) for p, w in ws.items()},
                                 sum(c.pauses for c in clients)))
    except Exception as e:
        say("status unavailable: %r" % e)

    assert errors == [], "writer errors"
    assert len(log) == 5, "not every disruption happened: %s" % log
    assert unpositioned == 0, "committed rows without a position"
    assert {m: n for m, n in in_table.items()} == committed, \
        "the table and the writers disagree on what was committed"
    assert not rolled & set(in_table), "rolled back transactions are in the table"
    assert not aborted & set(in_table), "aborted transactions are in the table"
    assert out_of_id_order > 0, "no commit out of id order: the test proved nothing"
    assert big > 0
    assert len(rolled) > 0
    assert bad_clients == [], ("%d of %d clients did not get exactly their consumer's "
                               "events" % (len(bad_clients), len(clients)))
    assert totals["delivered"] == totals["expected"]
    assert totals["expected"] > 1000
