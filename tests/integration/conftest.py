"""pytest fixtures of the integration tests: they own every server a test uses.

  run_root    (session) a folder under /tmp for everything the run writes; removed at the end
              unless a test failed or EVENT_PIPER_KEEP_TMP is set (then its path is printed)
  pg          (session) the run's PostgreSQL cluster (scripts/pgctl.sh start on a free port,
              postgresql/schema.sql applied), stopped when the run ends
  private_pg  (module)  a cluster of the test module's own, for tests that stop, restart or hold
              it off TCP (test_failures, test_chaos), stopped after the module
  db          (function) `pg` with the events table emptied (TRUNCATE ... RESTART IDENTITY)
  nginx       (function) harness.NginxInstances: `nginx.start(pg, ...)` starts a real nginx with
              the module from the test module's NGINX_CONF; the teardown stops every instance
              and fails the test if one needed force or its error log has [alert]/[emerg]
  clients     (function) harness.Clients: `clients.stream(ngx, "toto")` opens an event stream
              (and checks it is a 200), `clients.client(ngx)` a bare connection; all closed at
              the teardown, before nginx is stopped

The tests are functions that take these fixtures; test_real_clients keeps unittest classes
(harness.EventPiperTestCase), which get the same through `_event_piper_case`.

Environment: EVENT_PIPER_MODULE (module to test), EVENT_PIPER_NGINX_PRELOAD (LD_PRELOAD for nginx,
the sanitizer runtimes under `make test-asan`), EVENT_PIPER_TIME_SCALE (multiplies timeouts),
EVENT_PIPER_KEEP_TMP (keep the run's folder), NGINX_BIN.
"""

import os
import shutil
import signal
import sys
import tempfile

import pytest

import harness


def _terminate(signum, frame):
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C: pytest then tears the fixtures down,
    # which stops nginx and PostgreSQL.
    raise KeyboardInterrupt("signal %d" % signum)


# Throw-away clusters: fsync and synchronous_commit off (scripts/pgctl.sh). `make run` keeps
# PostgreSQL's durable defaults.
os.environ.setdefault("EVENT_PIPER_PG_FAST", "1")


def pytest_configure(config):
    signal.signal(signal.SIGTERM, _terminate)
    capture = config.pluginmanager.getplugin("capturemanager")

    def write(text):
        # On a line of its own in pytest's report, whether or not output is captured.
        reporter = config.pluginmanager.getplugin("terminalreporter")
        if capture is None or reporter is None:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        with capture.global_and_fixture_disabled():
            for line in text.rstrip("\n").split("\n"):
                reporter.write_line(line)

    harness.set_terminal(write)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if outcome.get_result().failed:
        item.config.event_piper_failures = True


@pytest.fixture(scope="session", autouse=True)
def run_root(request):
    path = tempfile.mkdtemp(prefix="epit.", dir="/tmp")
    os.chmod(path, 0o755)  # PostgreSQL runs as `postgres` and keeps its data in here
    harness.set_run_root(path)
    yield path
    if os.environ.get("EVENT_PIPER_KEEP_TMP") or getattr(request.config,
                                                         "event_piper_failures", False):
        harness.note("integration test files kept in %s" % path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _cluster(datadir):
    pg = harness.Postgres(datadir, harness.free_port())
    pg.start()
    return pg


@pytest.fixture(scope="session")
def pg(run_root):
    cluster = _cluster(os.path.join(run_root, "pg"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def private_pg(run_root, request):
    name = request.module.__name__.rsplit(".", 1)[-1]
    cluster = _cluster(os.path.join(harness.make_tmp("pg-" + name), "pg"))
    yield cluster
    cluster.stop()


@pytest.fixture
def db(pg):
    pg.truncate()
    return pg


@pytest.fixture
def nginx(request, run_root):
    instances = harness.NginxInstances(harness.make_tmp(request.node.name),
                                       getattr(request.module, "NGINX_CONF", None))
    yield instances
    instances.finish()


@pytest.fixture
def clients(nginx):  # set up after nginx, so torn down before it
    opened = harness.Clients()
    yield opened
    opened.close_all()


@pytest.fixture(autouse=True)
def _event_piper_case(request):
    """What the fixtures give test functions, for the tests written as unittest classes
    (harness.EventPiperTestCase, in test_real_clients): self.pg, self.tmp, self.start_nginx."""
    case = request.instance
    if isinstance(case, harness.EventPiperTestCase):
        case.pg = request.getfixturevalue("pg")
        case.nginx_instances = request.getfixturevalue("nginx")
        case.tmp = case.nginx_instances.tmp
    yield
