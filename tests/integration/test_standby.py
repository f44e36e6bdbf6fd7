"""Replay from hot standbys (`event_piper_replay_postgres`): standbys read history, the primary
confirms the tail before a stream goes live. A real streaming standby (`pg_basebackup -R` of a
primary of this module's own, on another port): a lagging standby, a standby stopped in the
middle of a replay and a promoted one never cost a gap, a duplicate or a stall; with no standby,
replay reads the primary. Each test gets a fresh standby.
"""

import json
import os
import shutil
import subprocess
import threading
import time

import pytest

import harness
from harness import T, Nginx, make_tmp, wait_until

NGINX_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
    event_piper_replay_postgres "{{ standby }}";
    {{ http }}
    server {
        listen 127.0.0.1:{{ port }};
        location = /events {
            event_piper;
            {{ location }}
        }
        location = /status { event_piper_status; }
    }
}
"""

PG_BIN = os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin")


def as_postgres(*cmd, check=True):
    if os.getuid() == 0:
        cmd = ("runuser", "-u", "postgres", "--") + cmd
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if check and r.returncode != 0:
        raise AssertionError("%s failed (%d):\n%s" % (" ".join(cmd), r.returncode, r.stdout))
    return r


class Standby:
    """A hot standby of `primary`: pg_basebackup -R, streaming from it, on its own port."""

    def __init__(self, primary, datadir):
        self.primary, self.datadir, self.port = primary, datadir, harness.free_port()

    def conninfo(self, attrs="standby"):
        return ("host=127.0.0.1 port=%d dbname=event_piper user=event_piper password=event_piper"
                " target_session_attrs=%s" % (self.port, attrs))

    def create(self):
        os.makedirs(os.path.dirname(self.datadir), exist_ok=True)
        shutil.chown(os.path.dirname(self.datadir), "postgres")
        as_postgres(PG_BIN + "/pg_basebackup", "-D", self.datadir, "-h", self.primary.datadir,
                    "-p", str(self.primary.port), "-U", "postgres", "-R", "-X", "stream",
                    "-c", "fast")
        return self

    def start(self):
        as_postgres(PG_BIN + "/pg_ctl", "-D", self.datadir, "-w", "-t", "60", "-l",
                    self.datadir + "/server.log", "-o",
                    "-p %d -c unix_socket_directories='%s' -c listen_addresses=127.0.0.1 "
                    "-c hot_standby=on -c wal_level=replica -c max_wal_senders=10"
                    % (self.port, self.datadir), "start")
        return self

    def stop(self, mode="fast"):
        as_postgres(PG_BIN + "/pg_ctl", "-D", self.datadir, "-w", "-m", mode, "stop",
                    check=False)

    def sql(self, query):
        conn = harness.Postgres(self.datadir, self.port).connect(user="postgres")
        try:
            return harness.Postgres.run(conn, query)
        finally:
            conn.close()

    def newest(self):
        return self.sql("SELECT coalesce(max(position), 0) FROM event_positions")[0][0]

    def caught_up(self):
        want = self.primary.scalar("SELECT coalesce(max(position), 0) FROM event_positions")
        wait_until(lambda: self.newest() >= want, T(20), what="the standby to replay %d" % want)


@pytest.fixture(scope="module")
def primary():
    # wal_level logical (>= replica) and max_wal_senders: what pg_basebackup and streaming need.
    cluster = harness.Postgres(os.path.join(make_tmp("pg-standby"), "pg"), harness.free_port())
    cluster.logical = True
    cluster.start()
    with open(os.path.join(cluster.datadir, "pg_hba.conf"), "a") as f:
        f.write("local   replication   all   trust\n")
    cluster.superuser_sql("SELECT pg_reload_conf()")
    yield cluster
    cluster.stop()


@pytest.fixture
def db(primary):
    primary.truncate()
    return primary


@pytest.fixture
def standby(db):
    sb = Standby(db, os.path.join(make_tmp("standby"), "data")).create().start()
    sb.caught_up()
    yield sb
    sb.stop(mode="immediate")
    shutil.rmtree(sb.datadir, ignore_errors=True)


def start(nginx, db, sb_conninfo, batch=500, **kw):
    return nginx.start(db, values={"standby": sb_conninfo},
                       location={"event_piper_replay_batch": batch}, **kw)


def status(ngx):
    c = harness.HttpClient(ngx.port).request("GET", "/status")
    try:
        c.wait_complete()
        return json.loads(bytes(c.body))
    finally:
        c.close()


def status_when(ngx, pred, what):
    """/status once it satisfies pred (workers publish their figures every second)."""
    found = []
    wait_until(lambda: found.append(status(ngx)) or pred(found[-1]), T(5),
               what="status with %s" % what)
    return found[-1]


def assert_exact(db, c, consumer="toto"):
    want = db.positions(consumer)
    c.wait_events(len(want), timeout=T(30))
    c.read_for(0.3)
    assert harness.sequence_problems(c.event_ids(), want) == ""


class Writer(threading.Thread):
    """Inserts single events for `consumer` on the primary until stopped."""

    def __init__(self, db, consumer="toto"):
        super().__init__(daemon=True)
        self.conn = db.connect()
        self.consumer = consumer
        self.halt = threading.Event()
        self.count = 0

    def run(self):
        while not self.halt.is_set():
            harness.Postgres.run(self.conn, "insert into events (type, timestamp, subscriber, "
                                 "payload) values ('insert', now(), %s, '{}')", (self.consumer,))
            self.count += 1
            time.sleep(0.005)

    def stop(self):
        self.halt.set()
        self.join()
        self.conn.close()


def test_replay_is_exact_while_the_standby_lags_and_writers_insert(db, standby, nginx, clients):
    db.insert_many("toto", 3000)
    standby.caught_up()
    standby.sql("SELECT pg_wal_replay_pause()")
    db.insert_many("toto", 2000, start=3001)  # the standby does not have these
    ngx = start(nginx, db, standby.conninfo())
    writer = Writer(db)
    writer.start()
    try:
        c = clients.stream(ngx, "toto", last_event_id="0", settle=0)
        c.wait_events(5000, timeout=T(30))
    finally:
        writer.stop()
    assert writer.count > 0
    assert_exact(db, c)
    db.insert("toto")  # and live after that
    assert_exact(db, c)
    s = status_when(ngx, lambda s: s["replay_standby_rows"] + s["replay_primary_rows"] >= 5000,
                    "5000 rows replayed")
    assert s["replay_standby_rows"] >= 3000, s
    assert s["replay_primary_rows"] >= 2000, s
    assert s["replay_standby_up"] >= 1, s
    assert s["replay_standby_lag_ms"] > 0, s  # paused with WAL received and not replayed
    standby.sql("SELECT pg_wal_replay_resume()")


def test_a_standby_stopped_in_the_middle_of_a_replay(db, standby, nginx, clients):
    db.insert_many("toto", 20000, payload_sql="jsonb_build_object('n', g, 'pad', repeat('x', 200))")
    standby.caught_up()
    ngx = start(nginx, db, standby.conninfo(), batch=100)
    # A client that does not read yet: its stream waits with the socket full, mid-replay.
    c = clients.stream(ngx, "toto", last_event_id="0", settle=0, rcvbuf=16384)
    wait_until(lambda: status(ngx)["replay_standby_rows"] > 0, T(10), what="standby rows")
    standby.stop(mode="immediate")
    assert_exact(db, c)
    s = status_when(ngx, lambda s: s["replay_standby_rows"] + s["replay_primary_rows"] >= 20000,
                    "20000 rows replayed")
    assert s["replay_standby_rows"] < 20000 and s["replay_primary_rows"] > 0, s
    assert ngx.log_count("replay standby unavailable, replay reads the primary") >= 1


def test_a_promoted_standby_is_not_used_and_costs_nothing(db, standby, nginx, clients):
    db.insert_many("toto", 1000)
    standby.caught_up()
    ngx = start(nginx, db, standby.conninfo(), workers=1)
    c = clients.stream(ngx, "toto", last_event_id="0", settle=0)
    assert_exact(db, c)
    status_when(ngx, lambda s: s["replay_standby_rows"] == 1000, "1000 rows from the standby")
    as_postgres(PG_BIN + "/pg_ctl", "-D", standby.datadir, "-w", "promote")
    db.insert_many("toto", 1000, start=1001)  # the promoted server never sees these
    time.sleep(2.5)  # past the standby check's period: the next batch checks first
    c2 = clients.stream(ngx, "toto", last_event_id="0", settle=0)
    assert_exact(db, c2)
    assert_exact(db, c)  # the live stream got the new ones too
    assert ngx.log_count("the server is not a standby") >= 1
    status_when(ngx, lambda s: s["replay_standby_up"] == 0, "no standby up")


def test_without_a_standby_replay_reads_the_primary(db, nginx, clients):
    db.insert_many("toto", 700)
    closed = "host=127.0.0.1 port=%d dbname=event_piper user=event_piper password=event_piper " \
             "target_session_attrs=prefer-standby" % harness.free_port()
    ngx = start(nginx, db, closed)
    c = clients.stream(ngx, "toto", last_event_id="0", settle=0)
    assert_exact(db, c)
    s = status_when(ngx, lambda s: s["replay_primary_rows"] >= 700, "700 rows replayed")
    assert (s["replay_primary_rows"], s["replay_standby_rows"]) == (700, 0), s
    c = harness.HttpClient(ngx.port).request("GET", "/status?format=prometheus")
    text = bytes(c.wait_complete().body).decode()
    c.close()
    for metric in ("event_piper_replay_primary_rows_total", "event_piper_replay_standby_up",
                   "event_piper_replay_standby_lag_milliseconds"):
        assert "\n# TYPE %s " % metric in text, metric
    assert ngx.log_count("replay standby unavailable, replay reads the primary") >= 1


def test_nginx_t_checks_the_directive(db):
    bad = Nginx(make_tmp("conf"), NGINX_CONF, pg=db, values={"standby": "host=x nonsense=1"})
    rc, out = bad.test_config()
    assert rc != 0 and 'invalid connection string in "event_piper_replay_postgres"' in out, out
    many = "host=127.0.0.1,127.0.0.2 port=1,2 target_session_attrs=prefer-standby"
    good = Nginx(make_tmp("conf"), NGINX_CONF, pg=db, values={"standby": many})
    rc, out = good.test_config()
    assert rc == 0, out
