"""Integration-test harness for ngx_event_piper: the pieces conftest.py's fixtures and the tests
use (Python 3 standard library, psycopg2 and pytest, all from Debian).

What it gives a test:
  * Postgres: a throw-away PostgreSQL cluster (scripts/pgctl.sh on a free port) with SQL through
    psycopg2 and bound parameters; conftest.py starts and stops it (fixtures `pg`, `private_pg`);
  * Nginx: a real nginx (/usr/sbin/nginx) with the built module, on a free port, in a temporary
    prefix, configured from the test module's NGINX_CONF text, with helpers to reload/quit it,
    find its workers, read their RSS and map a client socket to the worker that serves it;
    conftest.py's `nginx` fixture stops it and checks its error log for `[alert]`/`[emerg]`;
  * a raw-socket HTTP/1.1 client that sends exact request bytes and exposes the exact response
    bytes: status line, headers, de-chunked body, SSE frames;
  * Clients (the `clients` fixture): the HTTP clients of a test, closed at its end;
  * EventPiperTestCase, a unittest.TestCase base for the tests still written as classes
    (test_real_clients): the fixtures give it `self.pg`, `self.tmp` and `self.start_nginx`.

Environment:
  EVENT_PIPER_MODULE      module path (default <repo>/build/ngx_event_piper_module.so)
  NGINX_BIN               nginx binary (default /usr/sbin/nginx)
  EVENT_PIPER_TIME_SCALE  multiply every timeout (default 1)
  EVENT_PIPER_KEEP_TMP    keep the temporary folders even when everything passed
"""

import os
import re
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import psycopg2

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODULE = os.environ.get("EVENT_PIPER_MODULE",
                        os.path.join(REPO, "build", "ngx_event_piper_module.so"))
NGINX_BIN = os.environ.get("NGINX_BIN", "/usr/sbin/nginx")
PGCTL = os.path.join(REPO, "scripts", "pgctl.sh")
TIME_SCALE = float(os.environ.get("EVENT_PIPER_TIME_SCALE", "1"))

LISTENER_APP = "event_piper_listener"
CHECK_APP = "event_piper_check"  # the listener's table check (rows without a position)
REPLAY_APP = "event_piper_replay"


# Under AddressSanitizer (make test-asan) freed memory sits in ASan's quarantine and every heap
# byte has shadow memory: RSS bounds say nothing there, so tests assert them only without it.
UNDER_ASAN = "asan" in os.environ.get("EVENT_PIPER_NGINX_PRELOAD", "")


def T(seconds):
    """A timeout, scaled by EVENT_PIPER_TIME_SCALE."""
    return seconds * TIME_SCALE


def log(msg):
    sys.stderr.write("    [harness] %s\n" % msg)
    sys.stderr.flush()


_terminal = None  # set by conftest.py: writes past pytest's output capture


def set_terminal(write):
    global _terminal
    _terminal = write


def say(text):
    """Print a line at once, even under pytest's output capture (measurements and counts worth
    seeing in every run: the chaos test's 0 lost / 0 duplicated / 0 out of order, timings)."""
    text = text.rstrip("\n") + "\n"
    if _terminal is not None:
        _terminal(text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def note(msg):
    """A measurement worth seeing in the test output."""
    say("      note: %s" % msg)


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def wait_until(pred, timeout, interval=0.05, what="condition"):
    """Poll pred() until it returns something truthy; return it, or raise AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# Temporary folders: one run root (made and removed by conftest.py's `run_root` fixture), one
# folder per test.
# --------------------------------------------------------------------------------------------

_run_root = None


def set_run_root(path):
    """Called by conftest.py's session fixture: the folder every temporary folder goes into."""
    global _run_root
    _run_root = path


def run_root():
    if _run_root is None:
        raise RuntimeError("no run root: the tests run under pytest (conftest.py makes it)")
    return _run_root


def make_tmp(name):
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[-60:]
    d = tempfile.mkdtemp(prefix=safe + ".", dir=run_root())
    os.chmod(d, 0o755)
    return d


# --------------------------------------------------------------------------------------------
# PostgreSQL: a private cluster (scripts/pgctl.sh), SQL through psycopg2 with bound parameters.
# --------------------------------------------------------------------------------------------

class Postgres:
    """A private PostgreSQL cluster managed with scripts/pgctl.sh."""

    def __init__(self, datadir, port):
        self.datadir, self.port = datadir, port
        self._conn = None
        self._lock = threading.Lock()
        self.running = False
        self.hba_original = None  # tests/chaos/piper_chaos.py hold_tcp: pg_hba.conf as it was
        self.hba_held = False
        self.logical = False  # wal_level = logical (event_piper_source wal), kept across starts

    @property
    def conninfo(self):
        return ("host=127.0.0.1 port=%d dbname=event_piper user=event_piper password=event_piper"
                % self.port)

    def start(self):
        t0 = time.monotonic()
        env = dict(os.environ, EVENT_PIPER_PG_LOGICAL="1") if self.logical else None
        r = subprocess.run([PGCTL, "start", self.datadir, str(self.port)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError("pgctl.sh start failed (%d):\n%s" % (r.returncode, r.stdout))
        self.running = True
        log("PostgreSQL on port %d, data in %s (%.1fs)" % (self.port, self.datadir,
                                                           time.monotonic() - t0))

    def stop(self):
        if self._conn:
            self._conn.close()
            self._conn = None
        subprocess.run([PGCTL, "stop", self.datadir], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        self.running = False

    def connect(self, tcp=False, user="event_piper", database="event_piper",
                application_name="event_piper_tests", autocommit=True):
        """A new psycopg2 connection: over the unix socket by default (trust), or with tcp=True
        over 127.0.0.1 with the password, as nginx logs in. Autocommit unless asked otherwise."""
        kw = dict(host="127.0.0.1" if tcp else self.datadir, port=self.port, user=user,
                  dbname=database, application_name=application_name, connect_timeout=10)
        if tcp:
            kw["password"] = "event_piper"
        conn = psycopg2.connect(**kw)
        conn.autocommit = autocommit
        return conn

    @staticmethod
    def run(conn, query, params=None):
        """Execute on a connection; return the rows of the statement ([] if it returns none)."""
        with conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description is not None else []

    def sql(self, query, params=None):
        """Run SQL on the harness's shared connection (autocommit, reconnected after a restart);
        return the rows."""
        with self._lock:
            for attempt in (1, 2):
                if self._conn is None or self._conn.closed:
                    self._conn = self.connect()
                try:
                    return self.run(self._conn, query, params)
                except (psycopg2.OperationalError, psycopg2.InterfaceError):
                    if not self._conn.closed:
                        raise
                    self._conn = None
                    if attempt == 2:
                        raise

    def scalar(self, query, params=None):
        rows = self.sql(query, params)
        return rows[0][0] if rows else None

    def psql(self, sql, *args):
        """Run SQL through `pgctl.sh psql` (the path a user takes); return (rc, output)."""
        r = subprocess.run([PGCTL, "psql", self.datadir, str(self.port), "-X", "-q",
                            "-v", "ON_ERROR_STOP=1"] + list(args),
                           input=sql, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return r.returncode, r.stdout

    def superuser_sql(self, query, params=None):
        """As the `postgres` superuser over the unix socket, on a connection of its own."""
        conn = self.connect(user="postgres")
        try:
            return self.run(conn, query, params)
        finally:
            conn.close()

    def truncate(self):
        # event_positions first: its RESTART IDENTITY restarts the positions (their sequence)
        self.sql("TRUNCATE event_positions RESTART IDENTITY; TRUNCATE events RESTART IDENTITY")

    def insert(self, subscriber, payload='{"foo": "bar"}', type="insert"):
        """The original's insert statement, one event, its own transaction."""
        self.sql("insert into events (type, timestamp, subscriber, payload) "
                 "values (%s, now(), %s, %s)", (type, subscriber, payload))

    def insert_many(self, subscriber, count, payload_sql="jsonb_build_object('n', g)",
                    type="insert", start=1):
        """One statement inserting `count` rows (g runs from start to start+count-1);
        payload_sql is an SQL expression of g (code of the test, not a value)."""
        self.sql("insert into events (type, timestamp, subscriber, payload) "
                 "select %%s, now(), %%s, %s from generate_series(%%s, %%s) as g" % payload_sql,
                 (type, subscriber, start, start + count - 1))

    def positions(self, subscriber):
        return [r[0] for r in self.sql(
            "select position from event_log where subscriber = %s and position is not null "
            "order by position", (subscriber,))]

    def app_connections(self, application_name):
        """Client backends connected with this application_name: list of (pid, state, query)."""
        return self.superuser_sql(
            "select pid, state, query from pg_stat_activity where application_name = %s "
            "and backend_type = 'client backend'", (application_name,))

    def listeners(self):
        return self.app_connections(LISTENER_APP)

    def listening(self):
        """Listener connections that are idle after having run something (connected, past their
        start-up queries: LISTEN and whatever the module asks next)."""
        return [r for r in self.listeners() if r[1] == "idle" and r[2]]

    def wait_listening(self, n, timeout=None):
        return wait_until(lambda: len(self.listening()) >= n, timeout or T(15),
                          what="%d idle listener connections (%s)" % (n, LISTENER_APP))

    def wait_no_module_connections(self, timeout=None):
        def none_left():
            return not self.superuser_sql(
                "select 1 from pg_stat_activity where application_name in (%s, %s, %s)",
                (LISTENER_APP, CHECK_APP, REPLAY_APP))
        try:
            wait_until(none_left, timeout or T(10), what="module connections to go away")
            return True
        except AssertionError:
            return False


# --------------------------------------------------------------------------------------------
# /proc helpers
# --------------------------------------------------------------------------------------------

def proc_children(pid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces and parentheses
        rest = stat[stat.rfind(b")") + 2:].split()
        if int(rest[1]) == pid:
            out.append(int(d))
    return sorted(out)


def proc_cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def rss_kb(pid):
    """VmRSS of a process in kB (None if it is gone)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return None


def streams_on_every_worker(clients, ngx, consumer="toto", minimum=2, attempts=60, **kw):
    """Open streams of `consumer` until every worker serves at least one of them (and at
    least `minimum` are open). Returns (streams, {worker pid: [streams]})."""
    streams, by_worker = [], {}
    workers = set(ngx.worker_pids())
    for _ in range(attempts):
        c = clients.stream(ngx, consumer, settle=0, **kw)
        w = ngx.wait_worker_of(c)
        streams.append(c)
        by_worker.setdefault(w, []).append(c)
        if set(by_worker) >= workers and len(streams) >= minimum:
            break
        time.sleep(0.02)
    assert set(by_worker) == workers, \
        "could not get a stream on every worker in %d connections" % attempts
    for c in streams:
        c.read_for(0.05)
    return streams, by_worker


def client_socket_count(pid, port):
    """How many of pid's fds are TCP connections accepted on port (not the listening socket)."""
    try:
        inodes = {os.readlink("/proc/%d/fd/%s" % (pid, fd))
                  for fd in os.listdir("/proc/%d/fd" % pid)}
    except OSError:
        return None
    accepted = set()
    for table in ("tcp", "tcp6"):
        try:
            with open("/proc/%d/net/%s" % (pid, table)) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    local_port = int(cols[1].rsplit(":", 1)[1], 16)
                    if local_port == port and cols[3] != "0A":  # 0A: LISTEN
                        accepted.add("socket:[%s]" % cols[9])
        except OSError:
            pass
    return len(inodes & accepted)


def pid_alive(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
        return stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] != b"Z"
    except OSError:
        return False


class RssSampler:
    """Samples VmRSS of some pids in a thread; `.max[pid]`, `.first[pid]`, `.samples`."""

    def __init__(self, pids, interval=0.02):
        self.pids, self.interval = list(pids), interval
        self.first, self.max, self.samples = {}, {}, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for p in self.pids:
                v = rss_kb(p)
                if v is not None:
                    self.first.setdefault(p, v)
                    self.max[p] = max(self.max.get(p, 0), v)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def growth_kb(self, pid, baseline=None):
        base = baseline if baseline is not None else self.first.get(pid, 0)
        return self.max.get(pid, base) - base


def _tcp_inode(local_port, remote_port):
    """Inode of the socket 127.0.0.1:local_port <-> 127.0.0.1:remote_port (from /proc/net/tcp)."""
    want_l = "0100007F:%04X" % local_port
    want_r = "0100007F:%04X" % remote_port
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[1] == want_l and parts[2] == want_r:
                return parts[9]
    return None


# --------------------------------------------------------------------------------------------
# nginx
# --------------------------------------------------------------------------------------------

_snapshots = {}


def module_snapshot(path):
    """A copy of the module taken at its first use in this run, so that a rebuild during the run
    (the linker rewrites the file in place) cannot crash the nginx instances of later tests."""
    if os.environ.get("EVENT_PIPER_NO_SNAPSHOT"):
        return path
    if path not in _snapshots:
        d = os.path.join(run_root(), "module")
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o755)
        dst = os.path.join(d, "%d_%s" % (len(_snapshots), os.path.basename(path)))
        shutil.copy2(path, dst)
        st = os.stat(path)
        log("module under test: %s (%d bytes, built %s)"
            % (path, st.st_size, time.strftime("%H:%M:%S", time.localtime(st.st_mtime))))
        _snapshots[path] = dst
    return _snapshots[path]

def last_event_id_locations(values):
    """Locations /events-<name> whose Last-Event-ID is a fixed `set` value: nginx strips spaces
    around header values, so " 5" and "5 " can only reach the module through a variable."""
    return "".join("        location = /events-%s {\n            set $lid \"%s\";\n"
                   "            event_piper_last_event_id $lid;\n            event_piper;\n"
                   "        }\n" % (name, value) for name, value in values)


def render_directives(d, indent):
    """{name: value} or [(name, value)] -> nginx lines. value None -> `name;`, a list -> repeated."""
    if not d:
        return ""
    items = d.items() if isinstance(d, dict) else d
    lines = []
    for name, value in items:
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            lines.append("%s%s;" % (name, "" if v is None else " " + str(v)))
    return "".join(indent + l + "\n" for l in lines)


# What every test nginx has around the test module's configuration (NGINX_CONF): the module, the
# workers, and files in the test's own folder. The http lines go right after `http {`.
MAIN_CONF = """\
{{ load_module }}
worker_processes {{ workers }};
pid {{ tmp }}/nginx.pid;
error_log {{ tmp }}/error.log info;
events {
    worker_connections 4096;
}
"""

HTTP_PRELUDE = """\
    access_log {{ tmp }}/access.log;
    client_body_temp_path {{ tmp }}/client_body;
    proxy_temp_path {{ tmp }}/proxy;
    fastcgi_temp_path {{ tmp }}/fastcgi;
    uwsgi_temp_path {{ tmp }}/uwsgi;
    scgi_temp_path {{ tmp }}/scgi;
    default_type application/octet-stream;
"""

_PLACEHOLDER = re.compile(r"\{\{ *(\w+) *\}\}")


def render_conf(template, values):
    """Fill a configuration text's `{{ name }}` placeholders.

    A placeholder alone on its line takes a block: directives from a dict or a list of pairs
    (indented like the placeholder) or raw text; nothing, and the line goes. A placeholder inside
    a line takes str(value); the value None leaves the whole line out (e.g. no
    event_piper_postgres when a test has no PostgreSQL). A value the text has no place for is an
    error, so that nothing a test asks for is silently dropped."""
    used = set()
    out = []
    for line in template.splitlines(keepends=True):
        names = _PLACEHOLDER.findall(line)
        if not names:
            out.append(line)
            continue
        for n in names:
            if n not in values:
                raise KeyError("configuration placeholder {{ %s }} has no value" % n)
            used.add(n)
        stripped = line.strip()
        if len(names) == 1 and _PLACEHOLDER.fullmatch(stripped):
            v = values[names[0]]
            indent = line[:len(line) - len(line.lstrip())]
            if isinstance(v, (dict, list, tuple)):
                out.append(render_directives(v, indent))
            elif v:
                out.append(v if v.endswith("\n") else v + "\n")
            continue
        if any(values[n] is None for n in names):
            continue
        out.append(_PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), line))
    unused = [k for k, v in values.items() if k not in used and v not in (None, "", {}, [], ())]
    if unused:
        raise KeyError("the configuration has no place for %s" % ", ".join(sorted(unused)))
    return "".join(out)


class Nginx:
    """A real nginx master (foreground) with the module, in a temporary prefix.

    `conf` is the test module's configuration text (NGINX_CONF): `http { ... }` with the
    placeholders {{ port }}, {{ postgres }} (the module's connection string) and, where a test
    may add directives, {{ http }}, {{ server }}, {{ location }}, {{ locations }},
    {{ listen_params }} (see render_conf), and any others the test gives in `values`. The run's
    nginx.conf is kept in the test's folder."""

    def __init__(self, tmp, conf, pg=None, workers=2, http=None, server=None, location=None,
                 extra_locations="", extra_http="", listen_params="", module=MODULE,
                 with_module=True, values=None):
        self.tmp = tmp
        self.pg = pg
        self.workers = workers
        self.port = free_port()
        self.conf_path = os.path.join(tmp, "nginx.conf")
        self.error_log = os.path.join(tmp, "error.log")
        self.access_log = os.path.join(tmp, "access.log")
        self.pid_file = os.path.join(tmp, "nginx.pid")
        self.stdout_path = os.path.join(tmp, "nginx.stdout")
        self.proc = None
        self.with_module = with_module
        self.allowed_alerts = []
        self._log_checked_upto = 0
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.makedirs(os.path.join(tmp, sub), exist_ok=True)
        load = ""
        if with_module:
            if not os.path.exists(module):
                raise AssertionError("module not built: %s (run `make build`)" % module)
            load = "load_module %s;" % module_snapshot(module)
        main = render_conf(MAIN_CONF, {"load_module": load, "workers": workers, "tmp": tmp})
        http_values = render_directives(http, "    ") + (extra_http or "")
        body = render_conf(conf, {
            "port": self.port, "postgres": pg.conninfo if pg is not None else None,
            "listen_params": (" " + listen_params) if listen_params else "",
            "http": http_values, "server": server or "", "location": location or "",
            "locations": extra_locations or "", **(values or {})})
        prelude = render_conf(HTTP_PRELUDE, {"tmp": tmp})
        body, n = re.subn(r"(?m)^http \{\n", lambda m: m.group(0) + prelude, body, count=1)
        if n != 1:
            raise ValueError("the configuration has no `http {` line")
        self.conf = main + body.lstrip("\n")
        with open(self.conf_path, "w") as f:
            f.write(self.conf)

    @property
    def listeners_expected(self):
        """LISTEN connections of this instance: one (event_piper_listener shared, the default),
        or one per worker (per_worker)."""
        if re.search(r"(?m)^\s*event_piper_listener\s+per_worker\s*;", self.conf):
            return self.workers
        return 1

    # -- lifecycle --
    @staticmethod
    def env():
        env = dict(os.environ)
        preload = os.environ.get("EVENT_PIPER_NGINX_PRELOAD")
        if preload:
            env["LD_PRELOAD"] = (preload + " " + env.get("LD_PRELOAD", "")).strip()
        return env

    def cmd(self, *args):
        return [NGINX_BIN, "-p", self.tmp + "/", "-c", self.conf_path, "-e", self.error_log] + list(args)

    def test_config(self):
        """`nginx -t`: (returncode, output)."""
        r = subprocess.run(self.cmd("-t"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=self.env())
        return r.returncode, r.stdout

    def start(self, wait_listening=True):
        self._stdout = open(self.stdout_path, "wb")
        self.proc = subprocess.Popen(self.cmd("-g", "daemon off;"), stdout=self._stdout,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env())
        deadline = time.monotonic() + T(15)
        while True:
            if self.proc.poll() is not None:
                raise AssertionError("nginx exited at start (rc %s):\n%s\n--- error.log ---\n%s"
                                     % (self.proc.returncode, self._read(self.stdout_path),
                                        self.log_summary()))
            if self._accepting() and len(self.worker_pids()) >= self.workers:
                break
            if "exited on signal" in self.read_error_log():
                raise AssertionError("nginx workers crash at start\n%s" % self.log_summary())
            if time.monotonic() > deadline:
                raise AssertionError("nginx did not start (listening on %d, %d of %d workers up)\n%s"
                                     % (self.port, len(self.worker_pids()), self.workers,
                                        self.log_summary()))
            time.sleep(0.02)
        if wait_listening and self.with_module and self.pg is not None:
            try:
                self.pg.wait_listening(self.listeners_expected, timeout=T(10))
                # The server shows the LISTEN connection idle between the module's start-up
                # queries: the module is live once it says so (then health is UP, and the
                # board holds the newest position).
                wait_until(lambda: self.read_error_log().count(
                    "event_piper: listening for notifications") >= self.listeners_expected,
                    T(10), what="the module's listening line in the error log")
            except AssertionError as e:
                log("warning: %s; going on" % e)
        return self

    def _accepting(self):
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=1)
            s.close()
            return True
        except OSError:
            return False

    @property
    def master_pid(self):
        return self.proc.pid if self.proc else None

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def worker_pids(self):
        if not self.running():
            return []
        return [p for p in proc_children(self.proc.pid) if "worker process" in proc_cmdline(p)]

    def signal(self, sig):
        self.proc.send_signal(sig)

    def reload(self, timeout=None):
        """`nginx -s reload`; wait for a new set of workers. Returns (old_pids, new_pids)."""
        old = set(self.worker_pids())
        r = subprocess.run(self.cmd("-s", "reload"), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=self.env())
        if r.returncode != 0:
            raise AssertionError("nginx -s reload failed: %s" % r.stdout)
        new = wait_until(lambda: (lambda n: n if len(n) >= self.workers else None)(
            set(self.worker_pids()) - old), timeout or T(15), what="new workers after reload")
        return old, new

    def quit(self, timeout=None, use_cli=True):
        """Graceful stop (`nginx -s quit`). Returns seconds until the master exited, or raises."""
        t0 = time.monotonic()
        if use_cli:
            r = subprocess.run(self.cmd("-s", "quit"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=self.env())
            if r.returncode != 0:
                raise AssertionError("nginx -s quit failed: %s" % r.stdout)
        else:
            self.signal(signal.SIGQUIT)
        try:
            self.proc.wait(timeout or T(10))
        except subprocess.TimeoutExpired:
            raise AssertionError("nginx master did not exit within %.0fs of quit; workers: %s"
                                 % (timeout or T(10), self.worker_pids()))
        return time.monotonic() - t0

    def stop(self):
        """Stop whatever is left: QUIT, then TERM, then KILL. Returns a note if it needed force."""
        if not self.running():
            return None
        note = None
        self.signal(signal.SIGQUIT)
        try:
            self.proc.wait(T(10))
        except subprocess.TimeoutExpired:
            note = "nginx did not exit within %.0fs of SIGQUIT (workers %s)" % (
                T(10), self.worker_pids())
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                for w in self.worker_pids():
                    try:
                        os.kill(w, signal.SIGKILL)
                    except OSError:
                        pass
                self.proc.kill()
                self.proc.wait()
        return note

    # -- logs --
    @staticmethod
    def _read(path):
        try:
            with open(path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def read_error_log(self):
        return self._read(self.error_log)

    def log_summary(self, lines=12):
        """The first [alert]/[emerg] lines and the last lines of the error log, for messages."""
        text = self.read_error_log().splitlines()
        bad = [l for l in text if "[alert]" in l or "[emerg]" in l]
        out = ""
        if bad:
            out += "%d [alert]/[emerg] lines, first: %s\n" % (len(bad), "\n".join(bad[:3]))
        return out + "last lines of %s:\n%s" % (self.error_log, "\n".join(text[-lines:]))

    def bad_log_lines(self):
        """[alert] and [emerg] lines, but those a test caused on purpose (allowed_alerts: e.g.
        the master's "exited on signal 9" after a test killed a worker)."""
        return [l for l in self.read_error_log().splitlines()
                if ("[alert]" in l or "[emerg]" in l)
                and not any(a in l for a in self.allowed_alerts)]

    def log_count(self, needle):
        return self.read_error_log().count(needle)

    def wait_log(self, needle, count=1, timeout=None):
        """Wait until the error log holds `needle` at least `count` times."""
        return wait_until(lambda: self.log_count(needle) >= count, timeout or T(10),
                          what="%d x %r in the error log" % (count, needle))

    # -- workers and clients --
    def worker_of(self, client):
        """The pid of the worker that holds the server side of this client's connection."""
        return self.worker_of_socket(self.port, client.local_port)

    def worker_of_socket(self, local_port, remote_port):
        """The pid of the worker holding the TCP socket 127.0.0.1:local_port <-> :remote_port
        (e.g. a PostgreSQL connection: local_port = pg_stat_activity.client_port)."""
        inode = _tcp_inode(local_port, remote_port)
        if inode is None:
            return None
        target = "socket:[%s]" % inode
        for w in self.worker_pids():
            try:
                for fd in os.listdir("/proc/%d/fd" % w):
                    try:
                        if os.readlink("/proc/%d/fd/%s" % (w, fd)) == target:
                            return w
                    except OSError:
                        pass
            except OSError:
                pass
        return None

    def wait_worker_of(self, client, timeout=None):
        return wait_until(lambda: self.worker_of(client), timeout or T(5),
                          what="the worker serving client port %d" % client.local_port)


# --------------------------------------------------------------------------------------------
# Raw HTTP/1.1 + SSE client
# --------------------------------------------------------------------------------------------

class Frame:
    """One SSE frame: the exact bytes up to and including the blank line, and its fields."""

    __slots__ = ("raw", "fields")

    def __init__(self, raw):
        self.raw = bytes(raw)
        self.fields = []
        for line in self.raw[:-2].split(b"\n"):
            if line.startswith(b":"):
                self.fields.append(("", line[1:].decode("utf-8", "replace")))
                continue
            name, colon, value = line.partition(b":")
            if colon and value.startswith(b" "):
                value = value[1:]
            self.fields.append((name.decode("utf-8", "replace"), value.decode("utf-8", "replace")))

    def get(self, name):
        vals = [v for n, v in self.fields if n == name]
        return vals[-1] if vals else None

    @property
    def id(self):
        return self.get("id")

    @property
    def event(self):
        return self.get("event")

    @property
    def data(self):
        vals = [v for n, v in self.fields if n == "data"]
        return "\n".join(vals) if vals else None

    @property
    def retry(self):
        return self.get("retry")

    @property
    def is_heartbeat(self):
        return self.event == "heartbeat"

    def __repr__(self):
        return "Frame(%r)" % self.raw


def frame(id, type="insert", data='{"foo":"bar"}'):
    """The exact bytes of an event frame."""
    return ("id: %s\nevent: %s\ndata: %s\n\n" % (id, type, data)).encode()


HEARTBEAT = b"event: heartbeat\ndata: \n\n"


def build_request(method="GET", path="/events", host="127.0.0.1", headers=(), body=b""):
    """Exact request bytes. headers: (name, value) pairs; value may be bytes."""
    out = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method.encode(), path.encode(), host.encode())
    for name, value in headers:
        if isinstance(value, str):
            value = value.encode("latin-1")
        out += name.encode() + b": " + value + b"\r\n"
    if body or method in ("POST", "PUT"):
        out += b"Content-Length: %d\r\n" % len(body)
    return out + b"\r\n" + body


class HttpClient:
    """A raw-socket HTTP/1.1 client for one request on one connection, reading incrementally.

    raw:      every byte received
    head:     the status line and headers, up to and including the blank line
    status, reason, headers (list of (name, value)), header(name)
    body:     the de-chunked body so far; chunks: the chunk payloads in order
    complete: the last chunk (or Content-Length bytes) was received
    eof:      the server closed the connection
    frames:   SSE frames parsed from the body; events: frames with an id; heartbeats
    """

    def __init__(self, port, host="127.0.0.1", rcvbuf=None, keep_raw=True, connect_timeout=10):
        """port None: no connection, a bare parser to `feed()` bytes to."""
        self.port = port
        self.sock = None
        self.local_port = None
        if port is not None:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if rcvbuf:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.settimeout(connect_timeout)
            self.sock.connect((host, port))
            self.local_port = self.sock.getsockname()[1]
        self.keep_raw = keep_raw
        self.raw = bytearray()
        self.request_bytes = b""
        self._in = bytearray()      # unparsed bytes (head, chunk framing)
        self.head = None
        self.status = None
        self.reason = None
        self.status_line = None
        self.headers = []
        self.body = bytearray()
        self.chunks = []
        self.complete = False
        self.eof = False
        self.error = None
        self._chunked = False
        self._length = None
        self._chunk_left = None     # bytes left in the current chunk (None: expecting a size line)
        self._after_chunk = False   # expecting CRLF after chunk data
        self._trailer = False
        self.frames = []
        self.events = []
        self.heartbeats = []
        self._frame_pos = 0
        self.bytes_received = 0
        self.closed = False

    # -- sending --
    def send(self, data):
        self.request_bytes += data
        self.sock.sendall(data)

    def request(self, method="GET", path="/events", headers=(), body=b""):
        self.send(build_request(method, path, "127.0.0.1:%d" % self.port, headers, body))
        return self

    # -- receiving --
    def fileno(self):
        return self.sock.fileno()

    def pump(self, timeout, max_bytes=262144):
        """Receive once (waiting up to timeout). Returns the number of bytes read (0 on timeout
        or EOF)."""
        if self.eof or self.closed:
            if timeout:
                time.sleep(min(timeout, 0.05))
            return 0
        r, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if not r:
            return 0
        return self._recv(max_bytes)

    def _recv(self, max_bytes=262144):
        try:
            data = self.sock.recv(max_bytes)
        except (ConnectionResetError, BrokenPipeError) as e:
            self.error = e
            self.eof = True
            return 0
        except (BlockingIOError, socket.timeout):
            return 0
        if not data:
            self.eof = True
            return 0
        self.feed(data)
        return len(data)

    def feed(self, data):
        self.bytes_received += len(data)
        if self.keep_raw:
            self.raw += data
        self._in += data
        self._parse()

    def _parse(self):
        if self.head is None:
            i = self._in.find(b"\r\n\r\n")
            if i < 0:
                return
            self.head = bytes(self._in[:i + 4])
            del self._in[:i + 4]
            lines = self.head[:-4].split(b"\r\n")
            self.status_line = lines[0].decode("latin-1")
            parts = self.status_line.split(" ", 2)
            self.status = int(parts[1])
            self.reason = parts[2] if len(parts) > 2 else ""
            for l in lines[1:]:
                name, _, value = l.decode("latin-1").partition(":")
                self.headers.append((name, value.strip()))
            te = (self.header("Transfer-Encoding") or "").lower()
            self._chunked = "chunked" in te
            cl = self.header("Content-Length")
            self._length = int(cl) if cl is not None else None
            if self._length == 0 and not self._chunked:
                self.complete = True
        if self._chunked:
            self._parse_chunks()
        else:
            if self._in:
                self.body += self._in
                del self._in[:]
            if self._length is not None and len(self.body) >= self._length:
                self.complete = True
        self._parse_frames()

    def _parse_chunks(self):
        buf = self._in
        pos = 0
        n = len(buf)
        while not self.complete:
            if self._after_chunk:
                if n - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise AssertionError("bad chunk framing: expected CRLF after chunk data, got %r"
                                         % bytes(buf[pos:pos + 20]))
                pos += 2
                self._after_chunk = False
            elif self._trailer:
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    break
                line = buf[pos:i]
                pos = i + 2
                if not line:
                    self.complete = True
            elif self._chunk_left is None:
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    break
                size_line = bytes(buf[pos:i])
                pos = i + 2
                try:
                    size = int(size_line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise AssertionError("bad chunk size line %r" % size_line)
                if size == 0:
                    self._trailer = True
                else:
                    self._chunk_left = size
            else:
                take = min(self._chunk_left, n - pos)
                if take == 0:
                    break
                piece = buf[pos:pos + take]
                self.body += piece
                if self.chunks and self._chunk_partial:
                    self.chunks[-1] += piece
                else:
                    self.chunks.append(bytes(piece))
                pos += take
                self._chunk_left -= take
                self._chunk_partial = self._chunk_left > 0
                if self._chunk_left == 0:
                    self._chunk_left = None
                    self._after_chunk = True
        del buf[:pos]

    _chunk_partial = False

    def _parse_frames(self):
        body = self.body
        pos = self._frame_pos
        while True:
            i = body.find(b"\n\n", pos)
            if i < 0:
                break
            f = Frame(body[pos:i + 2])
            pos = i + 2
            self.frames.append(f)
            if f.is_heartbeat:
                self.heartbeats.append(f)
            elif f.id is not None:
                self.events.append(f)
        self._frame_pos = pos

    def header(self, name):
        lname = name.lower()
        vals = [v for n, v in self.headers if n.lower() == lname]
        return vals[-1] if vals else None

    def header_all(self, name):
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]

    # -- waiting --
    def wait(self, pred, timeout, what="condition"):
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("timed out after %.1fs waiting for %s; received %d bytes, "
                                     "last: %r" % (timeout, what, self.bytes_received,
                                                   bytes(self.raw[-300:])))
            if self.eof and not pred():
                raise AssertionError("connection closed while waiting for %s; received %d "
                                     "bytes, last: %r" % (what, self.bytes_received,
                                                          bytes(self.raw[-300:])))
            self.pump(min(left, 0.5))
        return self

    def wait_headers(self, timeout=None):
        return self.wait(lambda: self.head is not None, timeout or T(10), "response headers")

    def wait_events(self, n, timeout=None):
        return self.wait(lambda: len(self.events) >= n, timeout or T(15),
                         "%d events (have %d)" % (n, len(self.events)))

    def wait_frames(self, n, timeout=None):
        return self.wait(lambda: len(self.frames) >= n, timeout or T(15), "%d frames" % n)

    def wait_body(self, data, timeout=None):
        return self.wait(lambda: data in self.body, timeout or T(15), "body to contain %r" % data)

    def wait_complete(self, timeout=None):
        """Wait for the end of the response (last chunk / full length / EOF)."""
        deadline = time.monotonic() + (timeout or T(15))
        while not (self.complete or self.eof):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("response did not end within %.1fs; last bytes %r"
                                     % (timeout or T(15), bytes(self.raw[-300:])))
            self.pump(min(left, 0.5))
        return self

    def wait_eof(self, timeout=None):
        deadline = time.monotonic() + (timeout or T(15))
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("connection not closed within %.1fs" % (timeout or T(15)))
            self.pump(min(left, 0.5))
        return self

    def read_for(self, seconds):
        """Keep reading for a while (to see that nothing, or what, arrives)."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return self
            self.pump(min(left, 0.2))

    def drain(self):
        """Read whatever is already available without waiting."""
        while self.pump(0):
            pass
        return self

    def event_ids(self):
        return [int(f.id) for f in self.events]

    def close(self):
        if not self.closed and self.sock is not None:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass

    def reset(self):
        """Close abruptly with a TCP RST (SO_LINGER 0)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()


def open_stream(port, consumer="toto", last_event_id=None, path="/events", extra_headers=(),
                rcvbuf=None, keep_raw=True, wait_headers=True):
    """GET an event stream the way curl does; returns the HttpClient (headers read)."""
    headers = [("User-Agent", "event-piper-tests"), ("Accept", "text/event-stream")]
    if consumer is not None:
        headers.append(("X-Consumer-Id", consumer))
    if last_event_id is not None:
        headers.append(("Last-Event-ID", last_event_id))
    headers.extend(extra_headers)
    c = HttpClient(port, rcvbuf=rcvbuf, keep_raw=keep_raw)
    c.request("GET", path, headers)
    if wait_headers:
        c.wait_headers()
    return c


def pump_all(clients, pred, timeout, what="condition", paced=None):
    """Read from many clients at once until pred() is true. `paced(client)` may return False to
    skip reading a client for now."""
    sel = selectors.DefaultSelector()
    for c in clients:
        if not c.eof and not c.closed:
            sel.register(c.sock, selectors.EVENT_READ, c)
    deadline = time.monotonic() + timeout
    try:
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
            ready = sel.select(min(left, 0.5))
            for key, _ in ready:
                c = key.data
                if paced is not None and not paced(c):
                    continue
                c._recv()
                if c.eof:
                    sel.unregister(c.sock)
            if not sel.get_map() and not pred():
                raise AssertionError("all connections closed while waiting for %s" % what)
    finally:
        sel.close()


# --------------------------------------------------------------------------------------------
# The test case base
# --------------------------------------------------------------------------------------------

class NginxInstances:
    """The nginx instances of one test (conftest.py's `nginx` fixture): `start(pg, ...)` starts
    one from the test module's NGINX_CONF (or `conf=`); `finish()`, at the test's teardown,
    stops them all and fails if one needed force or logged an `[alert]` or `[emerg]` line."""

    def __init__(self, tmp, module_conf):
        self.tmp = tmp
        self.module_conf = module_conf
        self.instances = []

    def start(self, pg, workers=2, wait_listening=True, conf=None, **kw):
        if conf is None:
            conf = self.module_conf
        if conf is None:
            raise AssertionError("the test module has no NGINX_CONF")
        tmp = make_tmp("nginx") if self.instances else self.tmp
        ngx = Nginx(tmp, conf, pg=pg, workers=workers, **kw)
        self.instances.append(ngx)
        ngx.start(wait_listening=wait_listening)
        return ngx

    def finish(self):
        problems = []
        # Every instance stopped first: waiting for one instance's connections to go away while
        # another still runs would wait for nothing (the second instance's stay).
        stopped = [(ngx, ngx.stop()) for ngx in self.instances]
        for ngx, forced in stopped:
            if ngx.pg is not None and ngx.pg.running and ngx.with_module:
                ngx.pg.wait_no_module_connections()
            bad = ngx.bad_log_lines()
            if forced or bad:
                problems.append("%s%s\n(error log: %s)" % (
                    (forced + "\n") if forced else "",
                    ("%d [alert]/[emerg] lines in the nginx error log, first:\n%s"
                     % (len(bad), "\n".join(bad[:5]))) if bad else "",
                    ngx.error_log))
        self.instances = []
        if problems:
            raise AssertionError("\n".join(problems))


class Clients:
    """The HTTP clients of one test (conftest.py's `clients` fixture), closed at its teardown."""

    def __init__(self):
        self.opened = []

    def track(self, c):
        self.opened.append(c)
        return c

    def open(self, ngx, consumer="toto", last_event_id=None, **kw):
        """open_stream, headers read, status not checked."""
        return self.track(open_stream(ngx.port, consumer, last_event_id, **kw))

    def stream(self, ngx, consumer="toto", last_event_id=None, settle=0.2, **kw):
        """Open a stream and check it is a 200 event stream; read for `settle` seconds."""
        c = self.open(ngx, consumer, last_event_id, **kw)
        assert c.status == 200, "status line %r, body %r" % (c.status_line, bytes(c.body))
        if settle:
            c.read_for(settle)
        return c

    def client(self, ngx, rcvbuf=None):
        """A connected client that has sent nothing yet."""
        return self.track(HttpClient(ngx.port, rcvbuf=rcvbuf))

    def close_all(self):
        for c in self.opened:
            c.close()
        self.opened = []


class EventPiperTestCase(unittest.TestCase):
    """Base of the tests written as unittest classes (test_real_clients). conftest.py's autouse
    fixture gives each test `self.pg` (the run's cluster), `self.tmp` and the nginx instances,
    which its teardown stops and checks. The events table is emptied before each test."""

    maxDiff = 4000

    def setUp(self):
        self.pg.truncate()

    def start_nginx(self, workers=2, wait_listening=True, **kw):
        return self.nginx_instances.start(self.pg, workers=workers, wait_listening=wait_listening,
                                          **kw)

    def stream(self, ngx, consumer="toto", last_event_id=None, settle=0.2, **kw):
        """Open a stream, check it is a 200 event stream, and close it at the end of the test."""
        c = open_stream(ngx.port, consumer, last_event_id, **kw)
        self.addCleanup(c.close)
        self.assertEqual(c.status, 200, "status line %r, body %r" % (c.status_line, bytes(c.body)))
        if settle:
            c.read_for(settle)
        return c

    def client(self, ngx, rcvbuf=None):
        c = HttpClient(ngx.port, rcvbuf=rcvbuf)
        self.addCleanup(c.close)
        return c


# --------------------------------------------------------------------------------------------
# Sequence checks
# --------------------------------------------------------------------------------------------

def sequence_problems(got, expected):
    """'' when got == expected, else a short account: missing, duplicated, out of order, extra."""
    if list(got) == list(expected):
        return ""
    exp_set = set(expected)
    seen, dups, extra, disorder = set(), 0, 0, 0
    prev = None
    for x in got:
        if x in seen:
            dups += 1
        seen.add(x)
        if x not in exp_set:
            extra += 1
        if prev is not None and x <= prev:
            disorder += 1
        prev = x
    missing = [x for x in expected if x not in seen]
    first_diff = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
                      min(len(got), len(expected)))
    return ("received %d, expected %d: %d missing (first %s), %d duplicated, %d out of order, "
            "%d unexpected; first difference at index %d: got %s, expected %s"
            % (len(got), len(expected), len(missing), missing[:5], dups, disorder, extra,
               first_diff, list(got[first_diff:first_diff + 3]),
               list(expected[first_diff:first_diff + 3])))


def compact_json(text):
    """Compact JSON text the way the module must (only for simple payloads: ints, ASCII strings,
    no floats), e.g. jsonb's '{"n": 1, "pad": "x"}' -> '{"n":1,"pad":"x"}'."""
    import json
    return json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
