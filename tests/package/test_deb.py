#!/usr/bin/env python3
"""The Debian package, installed the way a user installs it (make test-deb).

    tests/package/test_deb.py build/deb/libnginx-mod-http-event-piper_<version>_<arch>.deb

Installs the package into this machine's nginx with `apt-get install ./...deb`, checks what it
installed and enabled, adds a server block in /etc/nginx/conf.d pointing at a PostgreSQL cluster
of its own (scripts/pgctl.sh, free port, with the schema the package ships), runs `nginx -t`,
starts the system nginx (/usr/sbin/nginx with /etc/nginx/nginx.conf; no systemd here), streams
the README's walkthrough event with curl, stops nginx, purges the package and checks that
`nginx -t` still passes and that nothing of the package is left, in dpkg or on disk.

It changes the machine: it needs root, and refuses to run if the package is already installed or
a system nginx is running. /etc/nginx is snapshotted first and put back as it was at the end,
failure or not. Python standard library only.
"""

import fcntl
import hashlib
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

PACKAGE = "libnginx-mod-http-event-piper"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PGCTL = os.path.join(ROOT, "scripts", "pgctl.sh")
NGINX = "/usr/sbin/nginx"
ETC = "/etc/nginx"
SERVER_BLOCK = os.path.join(ETC, "conf.d", "event-piper-package-test.conf")
ERROR_LOG = "/var/log/nginx/error.log"  # the system configuration's error_log
LOCK = "/run/lock/event-piper-test-deb.lock"

# What the package must install, and what must be gone after the purge.
MODULE = "/usr/lib/nginx/modules/ngx_event_piper_module.so"
AVAILABLE = "/usr/share/nginx/modules-available/mod-http-event-piper.conf"
ENABLED = os.path.join(ETC, "modules-enabled", "50-mod-http-event-piper.conf")
SCHEMA = "/usr/share/%s/schema.sql" % PACKAGE
EXAMPLE = "/usr/share/doc/%s/examples/nginx.conf.example" % PACKAGE
ALERTS = "/usr/share/doc/%s/examples/event-piper-alerts.yml" % PACKAGE
PAGE = "/usr/share/%s/www/index.html" % PACKAGE  # the example's `location = /`
DOC_DIR = "/usr/share/doc/%s" % PACKAGE

INSERT = ("insert into events (type, timestamp, subscriber, payload) "
          "values ('insert', now(), 'toto', '{\"foo\": \"bar\"}');")
EXPECTED = b'id: 1\nevent: insert\ndata: {"foo":"bar"}\n\n'
HEARTBEAT = b"event: heartbeat\ndata: \n\n"

APT = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "-y", "-q"]


class Failure(Exception):
    pass


def log(msg):
    print("test-deb: %s" % msg, flush=True)


def run(cmd, check=True, env=None, input=None):
    """Runs a command, returns its output (stdout and stderr); raises Failure if it fails."""
    full_env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8")
    full_env.update(env or {})
    p = subprocess.run(cmd, env=full_env, input=input, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, stdin=None if input else subprocess.DEVNULL)
    out = p.stdout.decode(errors="replace")
    if check and p.returncode != 0:
        raise Failure("%s exited %d:\n%s" % (" ".join(cmd), p.returncode, out))
    return out


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise Failure("timed out after %ss waiting for %s" % (timeout, what))


# --- /etc/nginx, snapshotted and put back ------------------------------------------------------

def snapshot(top):
    """Every entry under `top`: kind, mode, and the link target or the content's digest."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, top)
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                entries[rel] = ("file", stat.S_IMODE(st.st_mode), digest)
    return entries


def differences(before, after):
    lines = []
    for rel in sorted(set(before) | set(after)):
        if before.get(rel) != after.get(rel):
            lines.append("  %s: %s -> %s" % (rel, before.get(rel, "absent"),
                                               after.get(rel, "absent")))
    return lines


def restore(top, backup, before):
    """Puts `top` back to the backup entry by entry: nginx processes of other people may read
    /etc/nginx/mime.types meanwhile, so the tree is never removed as a whole."""
    now = snapshot(top)
    for rel in sorted(set(now) - set(before), key=lambda r: -r.count(os.sep)):
        path = os.path.join(top, rel)
        if now[rel][0] == "dir":
            shutil.rmtree(path)
        else:
            os.unlink(path)
    for rel in sorted(before, key=lambda r: r.count(os.sep)):
        if now.get(rel) == before[rel]:
            continue
        path, saved = os.path.join(top, rel), os.path.join(backup, rel)
        if os.path.lexists(path) and not os.path.isdir(path) or os.path.islink(path):
            os.unlink(path)
        elif os.path.isdir(path) and before[rel][0] != "dir":
            shutil.rmtree(path)
        if before[rel][0] == "link":
            os.symlink(os.readlink(saved), path)
        elif before[rel][0] == "dir":
            os.makedirs(path, exist_ok=True)
            os.chmod(path, before[rel][1])
        else:
            shutil.copy2(saved, path)


# --- the package --------------------------------------------------------------------------------

def package_state():
    out = run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", PACKAGE], check=False)
    return out.strip() if not out.startswith("dpkg-query:") else ""


def nginx_test():
    return run([NGINX, "-t"])


def check_installed(deb):
    check(package_state().startswith("ii"), "%s is not installed after apt-get install (%r)"
          % (PACKAGE, package_state()))
    files = run(["dpkg", "-L", PACKAGE]).split()
    for path in (MODULE, AVAILABLE, SCHEMA, EXAMPLE, ALERTS, PAGE):
        check(path in files and os.path.isfile(path), "the package did not install %s" % path)
    check(os.path.islink(ENABLED) and os.readlink(ENABLED) == AVAILABLE,
          "%s is not a link to %s" % (ENABLED, AVAILABLE))
    with open(AVAILABLE) as f:
        snippet = f.read()
    check(snippet.strip() == "load_module modules/ngx_event_piper_module.so;",
          "unexpected load snippet: %r" % snippet)
    depends = run(["dpkg-deb", "-f", deb, "Depends"])
    for dep in ("nginx-abi-", "libpq5", "libcjson1"):
        check(dep in depends, "Depends lacks %s: %s" % (dep, depends))
    log("installed: %s; enabled by %s; Depends: %s" % (MODULE, ENABLED, depends.strip()))


def check_purged(files):
    check(package_state() == "", "dpkg still knows %s after the purge (%r)"
          % (PACKAGE, package_state()))
    out = run(["dpkg", "-L", PACKAGE], check=False)
    check("is not installed" in out, "dpkg -L %s still answers: %s" % (PACKAGE, out))
    left = [path for path in files
            if path.startswith(("/usr/lib/nginx/modules/", "/usr/share/nginx/modules-available/",
                                "/usr/share/%s" % PACKAGE, DOC_DIR))
            and os.path.lexists(path)]
    check(not left, "left behind by the purge: %s" % left)
    for path in (MODULE, AVAILABLE, ENABLED, ENABLED + ".removed", DOC_DIR,
                 os.path.dirname(SCHEMA)):
        check(not os.path.lexists(path), "left behind by the purge: %s" % path)


# --- servers ------------------------------------------------------------------------------------

def system_nginx_running():
    try:
        with open("/run/nginx.pid") as f:
            os.kill(int(f.read().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


def worker_pids(master):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == master:
                    pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return pids


def stop_nginx(proc):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, master removes its pid file
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise Failure("nginx did not stop within 15 s of SIGQUIT")


def stream_walkthrough(nginx_port, pg_dir, pg_port):
    """curl -N /events as toto, insert the walkthrough row, expect exactly its frame."""
    curl = subprocess.Popen(
        ["curl", "-sS", "-N", "-i", "--max-time", "30", "http://127.0.0.1:%d/events" % nginx_port,
         "-H", "X-Consumer-Id: toto"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        received = b""
        inserted = False
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ready, _, _ = select.select([curl.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(curl.stdout.fileno(), 65536)
                if not chunk:
                    break
                received += chunk
            head, sep, body = received.partition(b"\r\n\r\n")
            if sep and not inserted:
                check(head.startswith(b"HTTP/1.1 200"), "GET /events answered %r" % head)
                check(b"content-type: text/event-stream" in head.lower(), "not SSE: %r" % head)
                run([PGCTL, "psql", pg_dir, str(pg_port), "-X", "-q", "-v", "ON_ERROR_STOP=1"],
                    input=INSERT.encode())
                inserted = True
            if inserted and body.replace(HEARTBEAT, b"").startswith(EXPECTED):
                time.sleep(0.5)  # anything more would be a wrong or duplicated frame
                ready, _, _ = select.select([curl.stdout], [], [], 0)
                if ready:
                    received += os.read(curl.stdout.fileno(), 65536)
                break
        head, _, body = received.partition(b"\r\n\r\n")
        check(inserted, "no response headers from GET /events: %r %r"
              % (received, curl.stderr.read1() if curl.poll() is not None else b""))
        check(body.replace(HEARTBEAT, b"") == EXPECTED,
              "the stream carried %r, expected exactly %r" % (body, EXPECTED))
        log("streamed %r" % EXPECTED.decode())
    finally:
        curl.kill()
        curl.wait()


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    deb = os.path.abspath(sys.argv[1])
    if os.geteuid() != 0:
        print("test-deb: needs root (installs a package and runs the system nginx)",
              file=sys.stderr)
        return 1
    if not os.path.isfile(deb):
        print("test-deb: no such package file: %s" % deb, file=sys.stderr)
        return 1
    started = time.monotonic()
    # make or CI stopping the test (SIGTERM, hangup) still runs the clean-up below.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))

    # One run at a time on a machine: the test owns dpkg's view of the package and /etc/nginx.
    lock = open(LOCK, "w")
    fcntl.flock(lock, fcntl.LOCK_EX)

    if package_state() not in ("",):
        print("test-deb: %s is already on this machine (%s): purge it first, the test "
              "will not remove your installation" % (PACKAGE, package_state()), file=sys.stderr)
        return 1
    if system_nginx_running():
        print("test-deb: a system nginx is running (/run/nginx.pid): stop it first",
              file=sys.stderr)
        return 1

    work = tempfile.mkdtemp(prefix="ep-deb-", dir="/tmp")
    os.chmod(work, 0o755)  # the postgres user enters it
    backup = os.path.join(work, "etc-nginx")
    shutil.copytree(ETC, backup, symlinks=True)
    before = snapshot(ETC)
    pg_dir, pg_port, nginx_port = os.path.join(work, "pg"), free_port(), free_port()
    nginx = None
    failed = True
    try:
        log("apt-get install %s" % deb)
        run(APT + ["install", "--no-install-recommends", deb])
        check_installed(deb)
        files = run(["dpkg", "-L", PACKAGE]).split()

        # The database, set up with the schema the package ships.
        run([PGCTL, "start", pg_dir, str(pg_port)], env={"EVENT_PIPER_SCHEMA": SCHEMA})

        with open(SERVER_BLOCK, "w") as f:
            f.write("""# written by tests/package/test_deb.py; removed when it ends
event_piper_postgres "host=127.0.0.1 port=%d dbname=event_piper user=event_piper password=event_piper";

server {
    listen 127.0.0.1:%d;
    location = /events { event_piper; }
    location = /manage/health { event_piper_health; }
}
""" % (pg_port, nginx_port))
        log("nginx -t: %s" % nginx_test().strip().splitlines()[-1])

        log_start = os.path.getsize(ERROR_LOG) if os.path.exists(ERROR_LOG) else 0
        nginx = subprocess.Popen([NGINX, "-g", "daemon off;"], stdin=subprocess.DEVNULL)
        wait_until(lambda: nginx.poll() is not None or len(worker_pids(nginx.pid)) > 0, 10,
                   "nginx workers")
        check(nginx.poll() is None, "the system nginx exited at once (%s)" % nginx.returncode)
        count = [PGCTL, "psql", pg_dir, str(pg_port), "-X", "-A", "-t", "-c",
                 "select count(*) from pg_stat_activity "
                 "where application_name = 'event_piper_listener'"]
        # One listening connection for the instance (event_piper_listener shared, the default).
        wait_until(lambda: int(run(count).strip() or 0) >= 1, 15, "the listener connection")
        stream_walkthrough(nginx_port, pg_dir, pg_port)

        stop_nginx(nginx)
        with open(ERROR_LOG, "rb") as f:
            f.seek(log_start)
            bad = [line for line in f.read().decode(errors="replace").splitlines()
                   if re.search(r"\[(alert|emerg|crit)\]", line)]
        check(not bad, "the error log has:\n" + "\n".join(bad))

        # A user removes their server block before removing the module it uses.
        os.unlink(SERVER_BLOCK)
        log("apt-get purge %s" % PACKAGE)
        run(APT + ["purge", PACKAGE])
        check_purged(files)
        log("nginx -t after the purge: %s" % nginx_test().strip().splitlines()[-1])
        diff = differences(before, snapshot(ETC))
        check(not diff, "/etc/nginx differs from before the test:\n" + "\n".join(diff))
        failed = False
    except Failure as e:
        print("test-deb: FAIL: %s" % e, file=sys.stderr)
    finally:
        try:
            stop_nginx(nginx)
        except Failure as e:
            print("test-deb: %s" % e, file=sys.stderr)
        if os.path.exists(pg_dir):  # also when stopped half-way through starting it
            run([PGCTL, "stop", pg_dir], check=False)
        if package_state():
            run(APT + ["purge", PACKAGE], check=False)
        restore(ETC, backup, before)
        diff = differences(before, snapshot(ETC))
        if diff:
            failed = True
            print("test-deb: could not restore /etc/nginx (backup kept in %s):\n%s"
                  % (backup, "\n".join(diff)), file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    log("%s in %.1f s" % ("FAILED" if failed else "passed", time.monotonic() - started))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
