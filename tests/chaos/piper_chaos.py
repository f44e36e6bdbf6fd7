"""Support for the failure, chaos and resource tests (tests/integration/test_failures.py,
test_chaos.py, test_resources.py). Builds on tests/integration/harness.py and adds only what those
tests need beyond it:

  * restart_pg / pg_back_up for the test module's own PostgreSQL cluster (conftest.py's
    `private_pg` fixture), that the tests stop and restart at will on the same port;
  * `hold_tcp(pg)`: make PostgreSQL refuse new TCP logins (pg_hba `reject` + reload) while the
    tests keep using the unix socket. nginx connects over TCP, so this keeps the module's listener
    and replay connections away for as long as a test needs, deterministically;
  * the instance status (`event_piper_status`) and health locations, and a wait for "every
    current worker is listening" based on the status JSON (the harness's own wait looks for a
    LISTEN statement in pg_stat_activity, which the module follows by another query);
  * error-log parsing (level, pid, message);
  * building the C++ libpq writer (tests/chaos/writer.cpp) once per run.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time

import psycopg2

HERE = os.path.dirname(os.path.abspath(__file__))
_INTEGRATION = os.path.normpath(os.path.join(HERE, "..", "integration"))
if _INTEGRATION not in sys.path:
    sys.path.append(_INTEGRATION)

import harness  # noqa: E402
from harness import HttpClient, T, compact_json, frame, run_root, wait_until  # noqa: E402

LISTENER_APP = harness.LISTENER_APP
CHECK_APP = harness.CHECK_APP
REPLAY_APP = harness.REPLAY_APP

def _hba_path(pg):
    return os.path.join(pg.datadir, "pg_hba.conf")


def _tcp_login_works(pg):
    try:
        c = pg.connect(tcp=True, application_name="event_piper_tests_probe")
    except psycopg2.OperationalError as e:
        if "pg_hba.conf rejects connection" in str(e):
            return False
        return None  # not running
    c.close()
    return True


def hold_tcp(pg, hold=True):
    """hold=True: new TCP logins are rejected (existing connections stay); False: back to normal.
    Works whether PostgreSQL runs or not (the file is read at start)."""
    path = _hba_path(pg)
    if pg.hba_original is None:
        with open(path) as f:
            pg.hba_original = f.read()
    if hold:
        text = ("# held by tests/chaos/piper_chaos.py: TCP logins rejected\n"
                "local   all   all                     trust\n"
                "host    all   all   127.0.0.1/32      reject\n"
                "host    all   all   ::1/128           reject\n")
    else:
        text = pg.hba_original
    st = os.stat(path)
    with open(path, "w") as f:
        f.write(text)
    os.chown(path, st.st_uid, st.st_gid)
    pg.hba_held = hold
    if pg.running:
        pg.superuser_sql("select pg_reload_conf()")
        want = not hold
        wait_until(lambda: _tcp_login_works(pg) == want, T(10),
                   what="TCP logins to be %s" % ("accepted" if want else "rejected"))


PG_BIN = os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin")


def start_pg_plain(pg):
    """Start an existing, stopped cluster with pg_ctl alone, the way an operator restarts it.
    Unlike scripts/pgctl.sh start, it does not re-apply postgresql/schema.sql (which drops and
    re-creates the commit trigger, and so races with writers that reconnect at once)."""
    r = subprocess.run(
        ["runuser", "-u", "postgres", "--", os.path.join(PG_BIN, "pg_ctl"), "-D", pg.datadir,
         "-w", "-t", "60", "-l", os.path.join(pg.datadir, "server.log"), "-o",
         "-p %d -c unix_socket_directories='%s' -c listen_addresses=127.0.0.1%s"
         % (pg.port, pg.datadir,
            " -c wal_level=logical -c max_wal_senders=10 -c max_replication_slots=10"
            if pg.logical else ""), "start"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise AssertionError("pg_ctl start failed: %s" % r.stdout)
    pg.running = True


def restart_pg(pg, down_for=0.0):
    """Stop PostgreSQL (fast: every connection is cut), stay down `down_for` seconds, start it
    again on the same port with pg_ctl. Returns the seconds it was down."""
    t0 = time.monotonic()
    pg.stop()
    if down_for:
        time.sleep(down_for)
    start_pg_plain(pg)
    return time.monotonic() - t0


def module_backends(pg, app=None):
    apps = [app] if app else [LISTENER_APP, CHECK_APP, REPLAY_APP]
    return pg.superuser_sql(
        "select pid, application_name, state from pg_stat_activity "
        "where application_name = any(%s)", (apps,))


# --------------------------------------------------------------------------------------------
# HTTP helpers: one-shot requests, status, health
# --------------------------------------------------------------------------------------------

def http_get(port, path, headers=(), timeout=None):
    """One GET; returns the complete HttpClient (status, headers, body)."""
    c = HttpClient(port)
    try:
        c.request("GET", path, headers)
        c.wait_complete(timeout or T(10))
    finally:
        c.close()
    return c


def status(ngx):
    c = http_get(ngx.port, "/status")
    if c.status != 200:
        raise AssertionError("/status answered %r: %r" % (c.status_line, bytes(c.body)))
    return json.loads(bytes(c.body).decode())


def worker_status(ngx):
    """{pid: worker entry of the status JSON}."""
    return {int(w["pid"]): w for w in status(ngx).get("workers", [])}


def wait_all_listening(ngx, reconnects_above=None, timeout=None):
    """Wait until every current worker reports its listener as listening in /status (published
    once a second). reconnects_above: {pid: n} - also require listener_reconnects > n."""
    def ok():
        pids = ngx.worker_pids()
        if len(pids) < ngx.workers:
            return False
        ws = worker_status(ngx)
        for p in pids:
            w = ws.get(p)
            if w is None or w.get("listener") != "listening":
                return False
            if reconnects_above is not None and w.get("listener_reconnects", 0) <= \
                    reconnects_above.get(p, -1):
                return False
        return ws
    return wait_until(ok, timeout or T(20), interval=0.1,
                      what="every worker's listener to be listening (status)")


# --------------------------------------------------------------------------------------------
# /proc: fds by kind, CPU time
# --------------------------------------------------------------------------------------------

def _tcp_table():
    """{socket inode: (local port, remote port)} of every TCP socket (IPv4 and IPv6)."""
    out = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    out[parts[9]] = (int(parts[1].rsplit(":", 1)[1], 16),
                                     int(parts[2].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return out


def fd_inventory(pid, pg_port=None):
    """{kind: count} of a process's open fds: 'pg' (TCP sockets to PostgreSQL), 'tcp' (other TCP
    sockets), 'socket' (other sockets), 'anon' (eventfd, epoll...), 'file'. None if it is gone."""
    try:
        fds = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        return None
    tcp = _tcp_table()
    kinds = {}
    for fd in fds:
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            ports = tcp.get(target[8:-1])
            if ports is None:
                kind = "socket"
            elif pg_port is not None and ports[1] == pg_port:
                kind = "pg"
            else:
                kind = "tcp"
        elif target.startswith("anon_inode:"):
            kind = "anon"
        else:
            kind = "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def cpu_seconds(pid):
    """utime + stime of a process, in seconds."""
    with open("/proc/%d/stat" % pid, "rb") as f:
        stat = f.read()
    rest = stat[stat.rfind(b")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# Error log
# --------------------------------------------------------------------------------------------

_LOG_RE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[(\w+)\] (\d+)#\d+: (.*)$")


def log_entries(ngx):
    """[(level, pid, message)] of the error log (continuation lines are skipped)."""
    out = []
    for line in ngx.read_error_log().splitlines():
        m = _LOG_RE.match(line)
        if m:
            out.append((m.group(1), int(m.group(2)), m.group(3)))
    return out


# --------------------------------------------------------------------------------------------
# Expected frames, from the table
# --------------------------------------------------------------------------------------------

def expected_events(pg, subscriber, superuser=False):
    """[(position, exact frame bytes)] of every committed event of `subscriber`, in order."""
    q = ("select position, type, payload::text from event_log where subscriber = %s "
         "and position is not null order by position")
    rows = pg.superuser_sql(q, (subscriber,)) if superuser else pg.sql(q, (subscriber,))
    return [(p, frame(p, t, compact_json(d))) for p, t, d in rows]


# --------------------------------------------------------------------------------------------
# The C++ writer
# --------------------------------------------------------------------------------------------

_writer_bin = None
_writer_lock = threading.Lock()


def writer_binary():
    """Compile tests/chaos/writer.cpp (once per run) and return the binary's path."""
    global _writer_bin
    with _writer_lock:
        if _writer_bin is None:
            src = os.path.join(HERE, "writer.cpp")
            d = os.path.join(run_root(), "chaos-bin")
            os.makedirs(d, exist_ok=True)
            out = os.path.join(d, "writer")
            cmd = ["g++", "-std=c++17", "-O2", "-Wall", "-Wextra", "-I/usr/include/postgresql",
                   src, "-o", out, "-lpq", "-pthread"]
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if r.returncode != 0:
                raise AssertionError("compiling the writer failed: %s\n%s" % (" ".join(cmd), r.stdout))
            _writer_bin = out
        return _writer_bin


# --------------------------------------------------------------------------------------------
# After a test that stopped PostgreSQL or held it off TCP
# --------------------------------------------------------------------------------------------

def pg_back_up(pg):
    """PostgreSQL running and open to TCP logins again, whatever a test did to it."""
    if not pg.running:
        pg.start()
    if pg.hba_held:
        hold_tcp(pg, False)
