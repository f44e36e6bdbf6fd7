"""The page at / (www/index.html), served by nginx with the configuration `make run` writes.

scripts/run.sh conf writes the run's nginx.conf from nginx.conf.example exactly as `make run`
does (its own folder, free ports, this module's PostgreSQL cluster); the only change here is the
error log, moved from the terminal to a file so that the teardown can check it for [alert] and
[emerg]. Headless Chromium (driven as in test_real_clients.py) opens
/?consumer=alice&groups=everyone, and the test inserts events and reads what the page shows:
each event with its id, type and data, the connection state, the server's health, and the
resume after a disconnect (an nginx reload: the browser's EventSource reconnects with the last
id it received and the events committed meanwhile arrive first); through a PostgreSQL restart the
stream stays open, the health shows DOWN then UP, and nothing is lost or repeated.

EVENT_PIPER_PAGE_SCREENSHOT=path saves a PNG of the page at the end (docs/watch-page.png was
made so).
"""

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

sys.path.append(os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                              "chaos")))

from harness import (REPO, T, Nginx, compact_json, free_port, make_tmp,  # noqa: E402
                     sequence_problems, wait_until)
from piper_chaos import pg_back_up  # noqa: E402
from test_real_clients import CHROMIUM, Chromium  # noqa: E402

RUN_SH = os.path.join(REPO, "scripts", "run.sh")
PAGE = os.path.join(REPO, "www", "index.html")


class RunConfNginx(Nginx):
    """nginx with the configuration of `make run` (scripts/run.sh conf), error log in a file."""

    def __init__(self, tmp, pg):
        self.tmp = tmp
        self.pg = pg
        self.workers = 2
        self.port = free_port()
        self.proc = None
        self.with_module = True
        self.allowed_alerts = []
        self._log_checked_upto = 0
        run = os.path.join(tmp, "run")
        r = subprocess.run([RUN_SH, "conf"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=dict(os.environ, EVENT_PIPER_RUN_DIR=run,
                                               PORT=str(self.port), PGPORT=str(pg.port)))
        assert r.returncode == 0, "scripts/run.sh conf failed:\n%s" % r.stdout
        self.conf_path = r.stdout.strip().splitlines()[-1]
        assert self.conf_path == os.path.join(run, "nginx.conf")
        self.error_log = os.path.join(tmp, "error.log")
        self.stdout_path = os.path.join(tmp, "nginx.stdout")
        with open(self.conf_path) as f:
            conf = f.read()
        # make run logs to the terminal (stderr); the test needs the lines in a file.
        line = "error_log stderr info;"
        assert conf.count(line) == 1, conf
        self.conf = conf.replace(line, "error_log %s info;" % self.error_log)
        assert "root %s;" % os.path.join(REPO, "www") in self.conf
        with open(self.conf_path, "w") as f:
            f.write(self.conf)


@pytest.fixture
def db(private_pg):
    pg_back_up(private_pg)
    private_pg.truncate()
    yield private_pg
    pg_back_up(private_pg)


@pytest.fixture
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail("%s is missing: Debian's `chromium` (scripts/deps.sh test)" % CHROMIUM)
    b = Chromium(make_tmp("chromium"))
    yield b
    b.close()


READ_PAGE = """document.readyState === 'loading' || !document.getElementById('state') ? null : JSON.stringify({
  state: document.getElementById('state').dataset.state,
  health: document.getElementById('health').dataset.health,
  lastId: document.getElementById('last-id').textContent,
  count: document.getElementById('count').textContent,
  src: document.getElementById('src').textContent,
  events: Array.from(document.querySelectorAll('#events tr')).reverse().map(tr =>
      [tr.dataset.id, tr.dataset.type, tr.querySelector('td.data').textContent, tr.dataset.conn,
       tr.querySelector('td.id').textContent]),
  log: Array.from(document.querySelectorAll('#log li')).map(li => li.textContent)
})"""


def expected_events(pg, subscribers):
    rows = pg.sql("select position, type, payload::text from event_log where subscriber = any(%s) "
                  "and position is not null order by position", (list(subscribers),))
    return [(str(p), t, compact_json(d)) for p, t, d in rows]


def insert(pg, subscriber, n, type="insert"):
    pg.insert(subscriber, '{"n": %d, "to": "%s"}' % (n, subscriber), type=type)


def start_run_nginx(nginx, db):
    ngx = RunConfNginx(nginx.tmp, db)
    nginx.instances.append(ngx)  # stopped and its error log checked at the teardown
    ngx.start()
    return ngx


def watch(browser, session):
    """page(pred, timeout, what): waits until pred(what the page shows) holds; returns it."""
    shown = {}

    def page(pred, timeout, what):
        def check():
            text = browser.evaluate(session, READ_PAGE)
            if text is None:
                return False
            shown.clear()
            shown.update(json.loads(text))
            return pred(shown)
        try:
            wait_until(check, timeout, interval=0.1, what=what)
        except AssertionError as e:
            raise AssertionError("%s; the page shows %s" % (e, json.dumps(shown, indent=1)))
        return shown
    return page


def test_the_form_connects_a_consumer_and_disconnects(db, nginx, browser):
    ngx = start_run_nginx(nginx, db)
    session = browser.open("http://127.0.0.1:%d/" % ngx.port)
    page = watch(browser, session)
    shown = page(lambda s: s["health"] == "UP", T(30), "the page loaded, health UP")
    assert shown["state"] == "idle" and shown["events"] == []
    # Typed in and submitted, as a user does.
    browser.evaluate(session, "document.getElementById('consumer').value = 'bob@example.com';"
                              "document.getElementById('connect').click(); true")
    page(lambda s: s["state"] == "open", T(30), "the stream open")
    assert shown["src"] == "/browser/events?consumer=bob%40example.com"
    assert browser.evaluate(session, "location.search") == "?consumer=bob%40example.com"
    insert(db, "bob@example.com", 1)
    insert(db, "alice", 2)
    insert(db, "bob@example.com", 3, type="update")
    page(lambda s: len(s["events"]) >= 2, T(20), "bob's events")
    assert [tuple(e[:3]) for e in shown["events"]] == expected_events(db, ["bob@example.com"])
    browser.evaluate(session, "document.getElementById('disconnect').click(); true")
    page(lambda s: s["state"] == "closed", T(10), "the stream closed")
    insert(db, "bob@example.com", 4)
    time.sleep(T(1))
    page(lambda s: True, T(5), "the page")
    assert len(shown["events"]) == 2, "an event arrived after Disconnect"
    browser.close()


def test_the_page_shows_live_events_resumes_after_a_reload_and_survives_a_postgres_restart(
        db, nginx, browser):
    ngx = start_run_nginx(nginx, db)

    # The page itself: served from the project's www/ by the run's nginx.
    with urllib.request.urlopen("http://127.0.0.1:%d/" % ngx.port, timeout=T(10)) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        with open(PAGE, "rb") as f:
            assert r.read() == f.read()

    session = browser.open("http://127.0.0.1:%d/?consumer=alice&groups=everyone" % ngx.port)
    browser.call("Emulation.setDeviceMetricsOverride", {"width": 1000, "height": 640,
                                                        "deviceScaleFactor": 1, "mobile": False},
                 session=session)
    page = watch(browser, session)
    shown = page(lambda s: True, T(30), "the page loaded")

    def events():
        return [tuple(e[:3]) for e in shown["events"]]

    page(lambda s: s["state"] == "open" and s["health"] == "UP", T(30), "the stream open, UP")
    assert shown["src"] == "/browser/events?consumer=alice&groups=everyone"

    # Live: alice's events and the broadcasts, with their ids; bob's never.
    insert(db, "alice", 1)
    insert(db, "bob", 2)
    insert(db, "everyone", 3)
    insert(db, "alice", 4, type="update")
    page(lambda s: len(s["events"]) >= 3, T(20), "3 live events")
    assert events() == expected_events(db, ["alice", "everyone"])
    assert [e[4] for e in shown["events"]] == [e[0] for e in shown["events"]]  # the id column
    assert shown["lastId"] == shown["events"][-1][0]
    resumed_after = shown["lastId"]

    # A disconnect (nginx reload ends the stream with `retry: 2000`): the page says it will
    # resume after the last id; events committed meanwhile arrive first on connection #2.
    ngx.reload()
    page(lambda s: s["state"] == "reconnecting", T(20), "the page to show it reconnects")
    assert any("resumes after id %s" % resumed_after in l for l in shown["log"]), shown["log"]
    insert(db, "alice", 10)
    insert(db, "everyone", 11, type="delete")
    page(lambda s: s["state"] == "open" and len(s["events"]) >= 5, T(30),
         "the reconnection and the events committed meanwhile")
    assert any("connection #2 open: the browser sent Last-Event-ID: %s" % resumed_after in l
               for l in shown["log"]), shown["log"]
    insert(db, "alice", 12)
    page(lambda s: len(s["events"]) >= 6, T(20), "a live event after the reconnection")
    assert [e[3] for e in shown["events"]] == ["1"] * 3 + ["2"] * 3

    # PostgreSQL restart: the stream stays open, the health goes DOWN and comes back UP; what is
    # committed as soon as PostgreSQL is back, and after, is shown once.
    db.stop()
    page(lambda s: s["health"] == "DOWN", T(30), "health DOWN while PostgreSQL is stopped")
    assert shown["state"] == "open"
    db.start()
    insert(db, "alice", 20)
    insert(db, "everyone", 21)
    page(lambda s: s["health"] == "UP", T(40), "health UP again")
    assert any("server DOWN" in l for l in shown["log"]), shown["log"]
    insert(db, "alice", 22)
    page(lambda s: len(s["events"]) >= 9, T(30), "the events after the restart")
    time.sleep(T(1))  # a duplicate would show up now
    page(lambda s: True, T(5), "the page")
    expected = expected_events(db, ["alice", "everyone"])
    assert len(expected) == 9
    assert sequence_problems([int(e[0]) for e in events()], [int(e[0]) for e in expected]) == ""
    assert events() == expected
    assert [e[3] for e in shown["events"]] == ["1"] * 3 + ["2"] * 6, "the stream was reopened"
    assert shown["state"] == "open" and shown["count"] == "9"
    assert shown["lastId"] == expected[-1][0]

    shot = browser.call("Page.captureScreenshot", {"format": "png"}, session=session)
    png = base64.b64decode(shot["data"])
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    with open(os.path.join(ngx.tmp, "watch-page.png"), "wb") as f:
        f.write(png)
    if os.environ.get("EVENT_PIPER_PAGE_SCREENSHOT"):
        shutil.copy(os.path.join(ngx.tmp, "watch-page.png"),
                    os.environ["EVENT_PIPER_PAGE_SCREENSHOT"])
    # Chromium first: its preconnected sockets would keep old workers until their timeout.
    browser.close()
