"""Upgrades in any order, with no outage: module and schema of the previous release (c28232f:
tests/integration/schema_c28232f.sql and the module built from that commit) to this one's,
while writers insert at a steady rate and clients read through a load balancer.

Two instances behind a third nginx (the README's "Scaling out" setup) are upgraded one after the
other (quit: its clients come back through the balancer to the other one; started again with
this module on the same port), and postgresql/schema.sql is applied:
  - module first, then schema;
  - schema first, then module;
  - between the two instances (one old and one new module against each schema).
One instance alone is upgraded the way nginx replaces its binary with no outage (USR2: a new
master with this module beside the old one, then QUIT of the old one: its clients come back to
the new workers on the same sockets), module first then schema, and schema first then module.
Every stream gets every event exactly once, in order; no event reaches a stream later than
LONGEST_DELAY after its commit (the figures are printed). The module names the schema version
it found (1: the previous schema, which has no event_piper_schema_version()).

The previous module is built once from `git archive c28232f` in build/module-c28232f (a few
minutes the first time, then cached).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import harness
from harness import REPO, T, Nginx, make_tmp, note, open_stream, wait_until
from test_schema_upgrade import SCHEMA, database  # noqa: F401  (database: the fixture)

sys.path.append(os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                              "chaos")))
from piper_chaos import status  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PREVIOUS_COMMIT = "c28232f"
SCHEMA_PREVIOUS = os.path.join(HERE, "schema_c28232f.sql")
PREVIOUS_TREE = os.path.join(REPO, "build", "module-" + PREVIOUS_COMMIT)
PREVIOUS_MODULE = os.path.join(PREVIOUS_TREE, "build", "ngx_event_piper_module.so")

# The version schema.sql gives (event_piper_schema_version()); the previous schema has none: 1.
with open(SCHEMA) as _f:
    CURRENT_VERSION = int(re.search(r"event_piper_schema_version\(\) RETURNS integer\s+"
                                    r"LANGUAGE sql [^']*'SELECT (\d+)'", _f.read()).group(1))

# The listener's checks every 3.3 s (its round trip, the held writers' query, the table check),
# so that they run against each schema during a step; and the log lines they write on failure.
CHECKS = {"event_piper_listener_timeout": "5s"}
CHECK_FAILURES = ("cannot look for event writers", "the check for rows without a position failed",
                  "no answer from the server")

# "No interval longer than a few seconds in which live streams receive nothing that was
# committed": the longest a committed event may take to reach a stream, reconnects included.
LONGEST_DELAY = 3.0

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
        location = /status { event_piper_status; }
        location = /manage/health { event_piper_health; }
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


@pytest.fixture(scope="session")
def previous_module():
    """The module of the previous release, built from its commit (cached in build/)."""
    if not os.path.exists(PREVIOUS_MODULE):
        os.makedirs(PREVIOUS_TREE, exist_ok=True)
        archive = subprocess.run(
            "git -C %s archive %s | tar -x -C %s" % (REPO, PREVIOUS_COMMIT, PREVIOUS_TREE),
            shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert archive.returncode == 0, "cannot extract commit %s (a clone without it?): %s" % (
            PREVIOUS_COMMIT, archive.stdout)
        note("building the module of %s in %s (once)" % (PREVIOUS_COMMIT, PREVIOUS_TREE))
        built = subprocess.run([os.path.join(PREVIOUS_TREE, "scripts", "build.sh")],
                               cwd=PREVIOUS_TREE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        assert built.returncode == 0, built.stdout[-3000:]
    return PREVIOUS_MODULE


class Reader:
    """An EventSource-like reader through the balancer: reconnects with Last-Event-ID when its
    stream ends, and notes how long each event took from its commit (the writer's clock in the
    payload) to its receipt."""

    def __init__(self, port, consumer):
        self.port, self.consumer = port, consumer
        self.ids, self.reconnects, self.worst, self.worst_id = [], 0, 0.0, None
        self.c = None
        self._connect()

    def _connect(self):
        last = str(self.ids[-1]) if self.ids else "0"
        while True:
            try:
                self.c = open_stream(self.port, self.consumer, last)
                self.seen = 0
                if self.c.status == 200:
                    return
                self.c.close()
            except (OSError, AssertionError):
                pass
            time.sleep(0.05)

    def pump(self, timeout=0.01):
        self.c.pump(timeout)
        now = time.time()
        for f in self.c.events[self.seen:]:
            self.ids.append(int(f.id))
            delay = now - json.loads(f.data)["t"]
            if delay > self.worst:
                self.worst, self.worst_id = delay, int(f.id)
        self.seen = len(self.c.events)
        if self.c.eof or self.c.complete:
            self.c.close()
            self.reconnects += 1
            self._connect()

    def close(self):
        self.c.close()


class SteadyWriter(threading.Thread):
    """One event every `pause` seconds, round-robin over the consumers, each in its own
    transaction, with its commit time (this clock) in the payload."""

    def __init__(self, db, consumers, pause=0.02):
        super().__init__(daemon=True)
        self.db, self.consumers, self.pause = db, consumers, pause
        self.stop_flag = threading.Event()
        self.count, self.errors = 0, []

    def run(self):
        conn = self.db.connect()
        try:
            while not self.stop_flag.is_set():
                sub = self.consumers[self.count % len(self.consumers)]
                self.db.run(conn, "insert into events (type, timestamp, subscriber, payload) "
                            "values ('insert', now(), %s, %s)",
                            (sub, json.dumps({"t": time.time()})))
                self.count += 1
                time.sleep(self.pause)
        except Exception as e:  # noqa: BLE001 (reported by the test)
            self.errors.append(e)
        finally:
            conn.close()

    def stop(self):
        self.stop_flag.set()
        self.join(T(10))


class Rollout:
    """Two instances behind a balancer, readers and a writer; each step runs while the readers
    keep reading."""

    def __init__(self, db, nginx, module):
        self.db, self.nginx = db, nginx
        self.instances = [self._start(module), self._start(module)]
        self.lb = Nginx(make_tmp("balancer"), BALANCER_CONF, workers=1, with_module=False,
                        values={"a": self.instances[0].port, "b": self.instances[1].port})
        nginx.instances.append(self.lb)
        self.lb.start()
        self._wait_two_listeners()
        self.consumers = ["u%d" % i for i in range(6)]
        self.readers = [Reader(self.lb.port, c) for c in self.consumers for _ in range(2)]
        self.writer = SteadyWriter(db, self.consumers)
        self.writer.start()
        self.read_for(1.0)

    def _start(self, module, port=None):
        real_free_port = harness.free_port
        if port is not None:  # the balancer names the instance by its port
            harness.free_port = lambda: port
        try:
            ngx = Nginx(make_tmp("instance"), NGINX_CONF, pg=self.db, workers=2, module=module,
                        http=CHECKS)
        finally:
            harness.free_port = real_free_port
        self.nginx.instances.append(ngx)
        ngx.start(wait_listening=False)
        return ngx

    def _wait_two_listeners(self):
        wait_until(lambda: len(self.db.listening()) == 2, T(15), interval=0.05,
                   what="a listening backend per instance")

    def read_for(self, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for r in self.readers:
                r.pump(0.005)

    def meanwhile(self, step):
        """Runs `step` in a thread while the readers read; returns its result."""
        out, errors = [], []

        def run():
            try:
                out.append(step())
            except BaseException as e:  # noqa: BLE001 (raised below)
                errors.append(e)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        while t.is_alive():
            self.read_for(0.05)
        if errors:
            raise errors[0]
        return out[0]

    def upgrade(self, i, module):
        """Instance i quits (its clients come back through the balancer to the other one) and
        starts again on its port with `module`."""
        old = self.instances[i]
        self.meanwhile(old.quit)
        self.instances[i] = self.meanwhile(lambda: self._start(module, port=old.port))
        self.meanwhile(self._wait_two_listeners)
        self.read_for(1.0)
        return self.instances[i]

    def apply_schema(self):
        self.meanwhile(lambda: self.db.apply(SCHEMA))
        self.read_for(1.0)

    def finish(self):
        self.writer.stop()
        assert self.writer.errors == []
        assert self.writer.count > 100
        want = {c: self.db.positions(c) for c in self.consumers}
        deadline = time.monotonic() + T(20)
        while time.monotonic() < deadline and any(
                len(r.ids) < len(want[r.consumer]) for r in self.readers):
            self.read_for(0.1)
        for r in self.readers:
            assert r.ids == want[r.consumer], (
                "consumer %s: got %d events (%d reconnects), expected %d; missing %s, "
                "duplicated %s" % (r.consumer, len(r.ids), r.reconnects, len(want[r.consumer]),
                                   sorted(set(want[r.consumer]) - set(r.ids))[:10],
                                   sorted({i for i in r.ids if r.ids.count(i) > 1})[:10]))
        worst = max(self.readers, key=lambda r: r.worst)
        note("upgrade: %d events, %d streams, %d reconnects; the longest from commit to a "
             "stream: %.2f s (position %s)" % (
                 self.writer.count, len(self.readers), sum(r.reconnects for r in self.readers),
                 worst.worst, worst.worst_id))
        assert any(r.reconnects for r in self.readers), "no stream moved to another instance"
        assert worst.worst <= T(LONGEST_DELAY), (
            "position %s reached a stream %.2f s after its commit" % (worst.worst_id,
                                                                      worst.worst))
        for r in self.readers:
            r.close()
        for ngx in self.instances:
            for failure in CHECK_FAILURES:
                assert ngx.log_count(failure) == 0, "%s: %s" % (ngx.error_log, failure)


class Master:
    """An nginx master that is not this process's child (started by another master's USR2),
    with what harness.Nginx uses of a Popen."""

    def __init__(self, pid):
        self.pid, self.returncode = pid, None

    def poll(self):
        try:
            with open("/proc/%d/stat" % self.pid, "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            state = b"X"
        if state in (b"Z", b"X"):
            self.returncode = 0
        return self.returncode

    def send_signal(self, sig):
        os.kill(self.pid, sig)

    def wait(self, timeout=None):
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("nginx", timeout)
            time.sleep(0.02)
        return self.returncode


class OneInstance(Rollout):
    """One instance, its clients connected to it directly; its module replaced by nginx's
    binary upgrade."""

    def __init__(self, db, nginx, module):
        self.db, self.nginx = db, nginx
        self.ngx = self._start_detached(module)
        self.instances = [self.ngx]
        wait_until(lambda: len(self.db.listening()) == 1, T(15), interval=0.05,
                   what="a listening backend")
        self.consumers = ["u%d" % i for i in range(6)]
        self.readers = [Reader(self.ngx.port, c) for c in self.consumers for _ in range(2)]
        self.writer = SteadyWriter(db, self.consumers)
        self.writer.start()
        self.read_for(1.0)

    def _start_detached(self, module):
        """Started by a shell that exits at once: nginx takes USR2 only from a master whose
        parent is no longer the one that started it (as after daemonizing)."""
        ngx = Nginx(make_tmp("instance"), NGINX_CONF, pg=self.db, workers=2, module=module,
                    http=CHECKS)
        self.nginx.instances.append(ngx)
        # The shell stays until nginx wrote its pid file: nginx notes its parent at start.
        out = subprocess.run(
            ["sh", "-c", '"$@" >"$0" 2>&1 </dev/null & echo $!; n=0; '
             'while [ ! -s "%s" ] && [ $n -lt 300 ]; do sleep 0.05; n=$((n+1)); done'
             % ngx.pid_file, ngx.stdout_path] + ngx.cmd("-g", "daemon off;"),
            stdout=subprocess.PIPE, text=True, env=ngx.env(), check=True)
        ngx.proc = Master(int(out.stdout.strip()))
        wait_until(lambda: ngx._accepting() and len(ngx.worker_pids()) >= ngx.workers, T(15),
                   what="nginx accepting with its workers")
        return ngx

    def upgrade_binary(self, module):
        """USR2 with nginx.conf naming `module`: a second master starts beside the first; once
        its workers run, QUIT of the first."""
        ngx = self.ngx
        with open(ngx.conf_path) as f:
            conf = f.read()
        conf = re.sub(r"(?m)^load_module [^;]+;", lambda m: "load_module %s;"
                      % harness.module_snapshot(module), conf, count=1)
        with open(ngx.conf_path, "w") as f:
            f.write(conf)
        old_master = ngx.proc
        old_workers = set(ngx.worker_pids())
        old_master.send_signal(signal.SIGUSR2)

        def new_master():
            pids = [p for p in harness.proc_children(old_master.pid)
                    if "master process" in harness.proc_cmdline(p)]
            if pids and len([w for w in harness.proc_children(pids[0])
                             if "worker process" in harness.proc_cmdline(w)]) >= ngx.workers:
                return pids[0]
            return None
        pid = self.meanwhile(lambda: wait_until(new_master, T(15), interval=0.05,
                                                what="a new master with its workers"))
        self.meanwhile(lambda: wait_until(lambda: len(self.db.listening()) == 2, T(15),
                                          interval=0.05, what="the new master's listener"))
        old_master.send_signal(signal.SIGQUIT)
        self.meanwhile(lambda: old_master.wait(T(15)))
        ngx.proc = Master(pid)
        assert not set(ngx.worker_pids()) & old_workers
        self.meanwhile(lambda: wait_until(lambda: len(self.db.listening()) == 1, T(15),
                                          interval=0.05, what="one listening backend"))
        self.read_for(1.0)
        return ngx


@pytest.mark.parametrize("order", ["module_first", "schema_first"])
def test_one_instance_upgraded_by_binary_upgrade_in_either_order_loses_nothing_and_stalls_nothing(
        database, nginx, previous_module, order):
    db = database("upgrade_one_" + order)
    db.apply(SCHEMA_PREVIOUS)
    one = OneInstance(db, nginx, previous_module)
    if order == "module_first":
        ngx = one.upgrade_binary(harness.MODULE)
        one.apply_schema()
        assert schema_version_logged(ngx, 1)
    else:
        one.apply_schema()
        ngx = one.upgrade_binary(harness.MODULE)
        assert schema_version_logged(ngx, CURRENT_VERSION)
    one.finish()


def schema_version_logged(ngx, version):
    """The module named `version` in its log, and shows it in /status."""
    wait_until(lambda: status(ngx).get("schema_version") == version, T(5), interval=0.1,
               what="schema_version %d in /status" % version)
    return ngx.log_count("the database's schema is version %d" % version) > 0


@pytest.mark.parametrize("order", ["module_first", "schema_first", "between_instances"])
def test_two_instances_and_the_schema_upgraded_in_any_order_lose_nothing_and_stall_nothing(
        database, nginx, previous_module, order):
    db = database("upgrade_" + order)
    db.apply(SCHEMA_PREVIOUS)
    new = harness.MODULE
    rollout = Rollout(db, nginx, previous_module)
    if order == "module_first":
        a = rollout.upgrade(0, new)
        b = rollout.upgrade(1, new)
        # Both instances' checks (this module's, on a connection of their own) ran on schema 1.
        rollout.meanwhile(lambda: wait_until(
            lambda: len(db.app_connections(harness.CHECK_APP)) == 2, T(15), interval=0.1,
            what="the check connection of each instance"))
        rollout.read_for(0.5)
        rollout.apply_schema()
        for ngx in (a, b):  # read at their listener's connection: the schema was older then
            assert schema_version_logged(ngx, 1)
    elif order == "schema_first":
        rollout.apply_schema()
        a = rollout.upgrade(0, new)
        b = rollout.upgrade(1, new)
        for ngx in (a, b):
            assert schema_version_logged(ngx, CURRENT_VERSION)
    else:
        a = rollout.upgrade(0, new)  # this module against the previous schema
        rollout.apply_schema()       # both modules against this schema
        b = rollout.upgrade(1, new)
        assert schema_version_logged(a, 1) and schema_version_logged(b, CURRENT_VERSION)
    rollout.finish()
    assert db.scalar("select event_piper_schema_version()") == CURRENT_VERSION


def test_a_reload_keeps_the_module_it_loaded_even_when_its_file_was_replaced(
        database, nginx, previous_module):
    """Why the module is upgraded by a binary upgrade or a restart, never by a reload: the
    master asks the dynamic loader for the file it loaded already, and gets the loaded one
    back. Here the previous module's file is replaced (by rename, as a package upgrade does)
    with this one, then nginx reloads: the new workers still run the previous module (which
    never names the schema version)."""
    db = database("upgrade_by_reload")
    db.apply(SCHEMA)
    path = os.path.join(make_tmp("module"), "ngx_event_piper_module.so")
    shutil.copy2(previous_module, path)
    ngx = Nginx(make_tmp("instance"), NGINX_CONF, pg=db, workers=2, module=path)
    nginx.instances.append(ngx)
    ngx.start()
    loaded = harness.module_snapshot(path)  # the file nginx.conf names
    shutil.copy2(harness.MODULE, loaded + ".new")
    os.rename(loaded + ".new", loaded)
    before = {pid for pid, _, _ in db.listening()}
    ngx.reload()
    wait_until(lambda: (lambda now: now and not now & before)(
        {pid for pid, _, _ in db.listening()}), T(15), what="a new listening connection")
    time.sleep(0.5)
    assert ngx.log_count("the database's schema is version") == 0, \
        "the reload loaded the new file"


def test_the_previous_module_gets_patches_from_its_check_late_and_loses_nothing(
        database, nginx, clients, previous_module):
    """Why patches wait for the last module (README "Upgrades"): the previous module against
    this schema ignores a notification holding a patch (a form it does not know), also the plain
    events of its batch; its listener's check finds the positions no notification announced and
    sends the streams to the table: late by up to two check periods (two thirds of
    event_piper_listener_timeout each), nothing lost. Plain events alone stay live."""
    db = database("upgrade_patches_old_module")
    db.apply(SCHEMA)
    ngx = nginx.start(db, module=previous_module, http={"event_piper_listener_timeout": "3s"})
    c = clients.stream(ngx, "p", last_event_id="0", settle=0)
    c.read_for(0.5)

    def commit(rows):
        """One transaction of (payload, patches) rows; returns the time of its commit."""
        conn = db.connect(autocommit=False)
        try:
            ids = {}
            with conn.cursor() as cur:
                for name, payload, patches in rows:
                    cur.execute("insert into events (type, timestamp, subscriber, payload, "
                                "patches) values ('order', now(), 'p', %s, %s) returning id",
                                (payload, ids.get(patches)))
                    ids[name] = cur.fetchone()[0]
            conn.commit()
            return time.monotonic()
        finally:
            conn.close()

    def arrival(count, timeout):
        c.wait_events(count, timeout=timeout)
        return time.monotonic()

    t = commit([("a", '{"n": 1}', None)])
    plain = arrival(1, T(5)) - t
    t = commit([("b", '{"n": 2}', None), ("b1", '{"n": 3}', "b")])  # a batch with a patch
    patched = arrival(3, T(10)) - t
    c.read_for(0.3)
    assert c.event_ids() == db.positions("p"), "every event once, in order"
    note("previous module, this schema: a plain event %.2f s after its commit; a batch holding "
         "a patch %.2f s (check period 2 s)" % (plain, patched))
    assert plain < T(1.0)
    assert patched <= T(2 * 2.0 + 1.0), "later than two check periods"
    assert ngx.log_count("were committed a check period ago but not notified") >= 1
