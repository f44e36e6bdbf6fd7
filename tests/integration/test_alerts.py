"""The Prometheus alerting rules shipped in prometheus/event-piper-alerts.yml.

* `promtool check rules` accepts them and `promtool test rules` runs their tests on synthetic
  series (tests/prometheus/event-piper-alerts.test.yml): each alert fires when it should, with
  its labels and summary, and stays quiet otherwise (short blips, a reload's new pids).
* Every metric the rules and their tests name is one that a real nginx with the module exposes
  at /status?format=prometheus, with the `pid` label the rules aggregate away; so a renamed
  metric breaks this test instead of silently disarming an alert.
* The README explains every alert.

Needs promtool (Debian's `prometheus`, installed by scripts/deps.sh test).
"""

import os
import re
import shutil
import subprocess
import urllib.request

from harness import REPO, T

RULES = os.path.join(REPO, "prometheus", "event-piper-alerts.yml")
RULES_TEST = os.path.join(REPO, "tests", "prometheus", "event-piper-alerts.test.yml")
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

NGINX_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
    server {
        listen 127.0.0.1:{{ port }};
        location = /events { event_piper; }
        location = /status { event_piper_status; }
    }
}
"""

METRIC = re.compile(r"\bevent_piper_[a-z_]+\b")


def promtool(*args):
    assert os.access(PROMTOOL, os.X_OK), \
        "promtool is missing: Debian's `prometheus` package (scripts/deps.sh test installs it)"
    r = subprocess.run([PROMTOOL] + list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=T(120))
    return r.returncode, r.stdout


def read(path):
    with open(path) as f:
        return f.read()


def alert_names():
    return re.findall(r"(?m)^\s*- alert: (\w+)\s*$", read(RULES))


def exprs():
    """The text of every expr (one line, or a folded block) of the rules file."""
    out, block = [], None
    for line in read(RULES).splitlines():
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if m:
            if m.group(2) in (">", "|"):
                block = (len(m.group(1)), [])
                out.append(block[1])
            else:
                out.append([m.group(2)])
                block = None
            continue
        if block is not None:
            if line.strip() and len(line) - len(line.lstrip()) > block[0]:
                block[1].append(line.strip())
            else:
                block = None
    return [" ".join(e) for e in out]


def test_promtool_checks_the_rules_and_their_tests_pass():
    rc, out = promtool("check", "rules", RULES)
    assert rc == 0, out
    assert "SUCCESS: %d rules found" % len(alert_names()) in out, out
    rc, out = promtool("test", "rules", RULES_TEST)
    assert rc == 0, out
    assert "SUCCESS" in out, out
    # Every alert has a test in which it fires.
    tested = set(re.findall(r"(?m)^\s*alertname: (\w+)\s*$", read(RULES_TEST)))
    assert set(alert_names()) <= tested, set(alert_names()) - tested


def test_the_rules_name_only_metrics_that_status_exposes(db, nginx):
    ngx = nginx.start(db)
    with urllib.request.urlopen("http://127.0.0.1:%d/status?format=prometheus" % ngx.port,
                                timeout=T(10)) as r:
        assert r.status == 200
        text = r.read().decode()
    exposed = set(re.findall(r"(?m)^# TYPE (\w+) ", text))
    # One sample per worker, labelled pid (what the rules aggregate away).
    for name in ("event_piper_listener_up", "event_piper_replay_queued"):
        samples = re.findall(r"(?m)^%s\{pid=\"\d+\"\} \d+$" % name, text)
        assert len(samples) == 2, (name, text)
    used = set()
    for e in exprs():
        used |= set(METRIC.findall(e))
    assert used, "no metric found in the rules' expressions"
    assert used <= exposed, "rules name metrics /status does not expose: %s" % (used - exposed)
    series = set(re.findall(r"series: '(event_piper_[a-z_]+)\{", read(RULES_TEST)))
    assert series <= exposed, "the rule tests use unknown metrics: %s" % (series - exposed)
    assert used <= series | {"up"}, "rules without synthetic series: %s" % (used - series)


def test_the_readme_explains_every_alert():
    readme = read(os.path.join(REPO, "README.md"))
    section = readme.split("\n### Alerts\n", 1)
    assert len(section) == 2, "README has no Alerts section"
    text = section[1].split("\n## ", 1)[0]
    missing = [a for a in alert_names() if "`%s`" % a not in text]
    assert not missing, "README's Alerts section does not explain %s" % missing
