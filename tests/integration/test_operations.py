"""What an operator sees. `nginx -t` refuses bad configurations with a message naming the
directive and the value; the example configuration passes; /status reports the whole instance
(JSON and Prometheus); /manage/health follows the listener.
"""

import json
import os
import re
import subprocess

import pytest

from harness import (MODULE, NGINX_BIN, Nginx, T, make_tmp, module_snapshot,
                     streams_on_every_worker, wait_until)

NGINX_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
    {{ http }}
    server {
        listen 127.0.0.1:{{ port }}{{ listen_params }};
        location = /events {
            event_piper;
            {{ location }}
        }
        location = /status { event_piper_status; }
        location = /manage/health { event_piper_health; }
    }
}
"""

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- ConfigurationChecks --
# `nginx -t` catches configuration mistakes before anything runs.

def refused(pg, message_re, **kw):
    """`nginx -t` of NGINX_CONF with these additions fails, and says why."""
    ngx = Nginx(make_tmp("conf"), NGINX_CONF, pg=pg, **kw)
    rc, out = ngx.test_config()
    assert rc != 0, "nginx -t accepted:\n%s\n%s" % (ngx.conf, out)
    assert re.search(message_re, out), out
    assert "[emerg]" in out, out
    return out


def test_event_piper_without_postgres_is_refused():
    refused(None, r'"event_piper" and "event_piper_health" need "event_piper_postgres"')


def test_a_non_numeric_batch_is_refused(pg):
    refused(pg, r'invalid value "many" in "event_piper_replay_batch": '
            r'a whole number from 1 to 100000',
            location={"event_piper_replay_batch": "many"})


def test_a_batch_out_of_range_is_refused(pg):
    refused(pg, r'invalid value "0" in "event_piper_replay_batch"',
            location={"event_piper_replay_batch": "0"})


def test_a_bad_channel_name_is_refused(pg):
    out = refused(pg, r'invalid channel name "new-events" in "event_piper_channel"',
                  http={"event_piper_channel": "new-events"})
    assert "letters, digits" in out


def test_a_bad_heartbeat_is_refused(pg):
    refused(pg, r'invalid value "soon" in "event_piper_heartbeat"',
            location={"event_piper_heartbeat": "soon"})


def test_a_bad_connection_string_is_refused_without_repeating_it():
    # One line that names the directive and libpq's reason; neither the string nor what libpq
    # quotes of it (a URI, password included) reaches the error log.
    for conninfo, reason in (
            ('"host=x password=s3cret bogus_option=1"',
             r'invalid connection option "bogus_option"'),
            ('"postgresql://u:s3cret@[::1"',
             r'end of string reached when looking for matching "\]" in IPv6 host address in '
             r'URI: "\.\.\."')):
        ngx = Nginx(make_tmp("conf"), NGINX_CONF, pg=None, http={"event_piper_postgres": conninfo})
        rc, out = ngx.test_config()
        assert rc != 0, out
        line = [l for l in out.splitlines() if "[emerg]" in l]
        assert len(line) == 1, out
        assert re.search(r'invalid connection string in "event_piper_postgres": ' + reason +
                         r' in .*nginx.conf:\d+$', line[0]), out
        assert "s3cret" not in out


def test_a_tiny_stream_buffer_is_refused(pg):
    refused(pg, r'invalid value "1k" in "event_piper_stream_buffer": a size of at least 4k',
            location={"event_piper_stream_buffer": "1k"})


def test_a_bad_retry_is_refused(pg):
    refused(pg, r'invalid value "later" in "event_piper_retry"',
            location={"event_piper_retry": "later"})


def test_a_bad_replay_connections_is_refused(pg):
    refused(pg, r'invalid value "0" in "event_piper_replay_connections": '
            r'a whole number from 1 to 64',
            http={"event_piper_replay_connections": "0"})


# The messages for values out of range, built from src/core/defaults.hpp, read as before.
@pytest.mark.parametrize("level, directive, value, expected", [
    ("location", "event_piper_stream_buffer", "1k", r'a size of at least 4k \("256k", "1m"\)'),
    ("location", "event_piper_retry", "0", r'a positive time \("2s", "500ms"\)'),
    ("location", "event_piper_heartbeat", "0", r'a positive time \("10s"\) or "off"'),
    ("location", "event_piper_replay_batch", "100001", r'a whole number from 1 to 100000'),
    ("http", "event_piper_replay_memory", "1k", r'a size of at least 1m \("64m", "1g"\)'),
    ("http", "event_piper_relay_buffer", "1k", r'a size of at least 64k \("4m", "16m"\)'),
    ("http", "event_piper_listener_timeout", "2s", r'a time of at least 3s \("60s", "2m"\)'),
    ("http", "event_piper_replay_connections", "65", r'a whole number from 1 to 64'),
])
def test_a_value_out_of_range_says_what_is_expected(pg, level, directive, value, expected):
    refused(pg, r'invalid value "%s" in "%s": %s in ' % (value, directive, expected),
            **{level: {directive: value}})


def test_a_long_channel_name_is_refused(pg):
    refused(pg, r'invalid channel name "%s" in "event_piper_channel": use letters, digits and '
            r"'_', at most 63 characters, not starting with a digit" % ("c" * 64),
            http={"event_piper_channel": "c" * 64})


# A directive given twice is refused, as nginx's own are ("... directive is duplicate"), rather
# than the last one silently winning.
@pytest.mark.parametrize("level, directive, value", [
    ("http", "event_piper_channel", "new_events"),
    ("http", "event_piper_replay_connections", "2"),
    ("http", "event_piper_replay_memory", "64m"),
    ("http", "event_piper_listener", "shared"),
    ("http", "event_piper_source", "trigger"),
    ("http", "event_piper_relay_buffer", "4m"),
    ("http", "event_piper_listener_timeout", "60s"),
    ("location", "event_piper_consumer", "$arg_consumer"),
    ("location", "event_piper_consumer_groups", "$arg_groups"),
    ("location", "event_piper_last_event_id", "$arg_last"),
    ("location", "event_piper_folded", "$arg_folded"),
    ("location", "event_piper_heartbeat", "10s"),
    ("location", "event_piper_retry", "1s"),
    ("location", "event_piper_replay_batch", "500"),
    ("location", "event_piper_stream_buffer", "256k"),
])
def test_a_directive_given_twice_is_refused(pg, level, directive, value):
    refused(pg, r'"%s" directive is duplicate in .*nginx\.conf:\d+' % directive,
            **{level: {directive: [value, value]}})


def test_the_connection_string_given_twice_is_refused(pg):
    refused(pg, r'"event_piper_postgres" directive is duplicate in .*nginx\.conf:\d+',
            http={"event_piper_postgres": '"%s"' % pg.conninfo})


def test_the_stream_handler_given_twice_in_a_location_is_refused(pg):
    refused(pg, r'"event_piper" directive is duplicate in .*nginx\.conf:\d+',
            location={"event_piper": None})


@pytest.mark.parametrize("directive", ["event_piper_status", "event_piper_health"])
def test_two_handlers_in_one_location_are_refused(pg, directive):
    # The location /events has `event_piper;` first: which answer it gives would be a guess.
    refused(pg, r'"%s" directive is duplicate, "event_piper" directive was specified earlier '
            r'in .*nginx\.conf:\d+' % directive, location={directive: None})


def test_another_modules_handler_after_event_piper_is_refused(pg):
    refused(pg, r'"event_piper" directive conflicts with another content handler '
            r'\(proxy_pass, fastcgi_pass, \.\.\.\) in location "/events"',
            location={"proxy_pass": "http://127.0.0.1:9"})


def test_another_modules_handler_before_event_piper_health_is_refused(pg):
    conf = NGINX_CONF.replace("location = /manage/health { event_piper_health; }",
                              "location = /manage/health { proxy_pass http://127.0.0.1:9; "
                              "event_piper_health; }")
    ngx = Nginx(make_tmp("conf"), conf, pg=pg)
    rc, out = ngx.test_config()
    assert rc != 0, out
    assert re.search(r'\[emerg\].*"event_piper_health" directive conflicts with another content '
                     r'handler \(proxy_pass, fastcgi_pass, \.\.\.\) in location "/manage/health" '
                     r'in .*nginx\.conf:\d+', out), out


@pytest.mark.smoke
def test_the_example_configuration_passes():
    tmp = make_tmp("example")
    with open(os.path.join(REPO, "nginx.conf.example")) as f:
        conf = f.read()
    conf = conf.replace("/usr/lib/nginx/modules/ngx_event_piper_module.so",
                        module_snapshot(MODULE))
    conf = re.sub(r"/run/nginx-event-piper\.pid", tmp + "/nginx.pid", conf)
    conf = conf.replace("/var/log/nginx/", tmp + "/")
    path = os.path.join(tmp, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    r = subprocess.run([NGINX_BIN, "-t", "-p", tmp + "/", "-c", path, "-e",
                        tmp + "/error.log"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, env=Nginx.env())
    assert r.returncode == 0, r.stdout
    assert "test is successful" in r.stdout


# -- StatusAndHealth --
# `event_piper_status` shows every worker; `event_piper_health` follows the listener.

def get(clients, ngx, path):
    c = clients.client(ngx).request("GET", path)
    c.wait_complete()
    return c


@pytest.mark.smoke
def test_status_counts_streams_and_deliveries_of_all_workers(db, nginx, clients):
    ngx = nginx.start(db)
    # toto's streams on both workers: the holder forwards the notification to the other worker
    # only when that one has a stream it is for, and the count below is one per worker.
    toto, _ = streams_on_every_worker(clients, ngx, "toto", minimum=4)
    streams = toto + [clients.stream(ngx, "other")]
    db.insert("toto", '{"n": 1}')
    for c in toto:
        c.wait_events(1, T(10))

    def figures():
        c = get(clients, ngx, "/status")
        assert c.status == 200
        assert c.header("Content-Type") == "application/json"
        return json.loads(bytes(c.body))

    n = len(streams)
    wait_until(lambda: figures()["events_delivered"] >= n - 1 and figures()["streams"] == n,
               T(10), what="published figures")
    s = figures()
    assert s["streams"] == n
    assert s["events_delivered"] == n - 1
    assert len(s["workers"]) == 2
    assert sorted(w["pid"] for w in s["workers"]) == sorted(ngx.worker_pids())
    assert all(w["listener"] == "listening" for w in s["workers"])
    assert s["consumers"] >= 2
    assert s["notifications"] == 2  # one per worker
    assert s["last_notification_age_seconds"] is not None
    for key in ("bytes_sent", "replay_queries", "replay_queued", "streams_catching_up",
                "notifications_dropped", "listener_reconnects", "stream_overflows"):
        assert key in s

    c = get(clients, ngx, "/status?format=prometheus")
    assert c.status == 200
    text = bytes(c.body).decode()
    assert "# TYPE event_piper_streams gauge" in text
    total = sum(int(v) for v in re.findall(r"^event_piper_streams\{pid=\"\d+\"\} (\d+)$",
                                           text, re.M))
    assert total == n
    assert re.search(r"(?m)^event_piper_listener_up\{pid=\"\d+\"\} 1$", text)

    # ?format=json (or an empty one) is the default spelled out, the value's case does not
    # matter; any other format is a clear 400.
    for query in ("?format=json", "?format=", "?format=JSON"):
        c = get(clients, ngx, "/status" + query)
        assert (c.status, c.header("Content-Type")) == (200, "application/json"), query
        assert json.loads(bytes(c.body))["streams"] == n
    c = get(clients, ngx, "/status?format=Prometheus")
    assert (c.status, c.header("Content-Type")) == (200, "text/plain; version=0.0.4")
    c = get(clients, ngx, "/status?format=xml")
    assert (c.status, c.header("Content-Type"), bytes(c.body)) == \
        (400, "text/plain", b"unknown format: use ?format=json or ?format=prometheus\n")


@pytest.mark.smoke
def test_health_is_up_while_listening_and_down_without_the_database(db, nginx, clients):
    ngx = nginx.start(db)
    c = get(clients, ngx, "/manage/health")
    assert (c.status, bytes(c.body)) == (200, b'{"status":"UP"}')
    assert c.header("Content-Type") == "application/json"
    db.stop()
    try:
        wait_until(lambda: get(clients, ngx, "/manage/health").status == 503, T(15),
                   what="health DOWN")
        c = get(clients, ngx, "/manage/health")
        assert bytes(c.body) == \
            b'{"status":"DOWN","reason":"the listener is not connected to PostgreSQL"}'
    finally:
        db.start()
    wait_until(lambda: all(get(clients, ngx, "/manage/health").status == 200 for _ in range(4)),
               T(20), what="health UP again")


# -- Http2 --
# The same stream over HTTP/2 (curl with prior knowledge: no TLS needed).

@pytest.mark.smoke
def test_live_and_replayed_events_over_http2(db, nginx):
    ngx = nginx.start(db, listen_params="http2")
    db.insert("toto", '{"n": 1}')
    curl = subprocess.Popen(
        ["curl", "-sN", "--http2-prior-knowledge", "-i", "--max-time", str(int(T(8))),
         "-H", "X-Consumer-Id: toto", "-H", "Last-Event-ID: 0",
         "http://127.0.0.1:%d/events" % ngx.port],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: db.scalar(
            "select count(*) from pg_stat_activity where application_name = "
            "'event_piper_replay'") != 0, T(10), what="the replay")
        db.insert("toto", '{"n": 2}')
        out, _ = curl.communicate(timeout=T(15))
    finally:
        if curl.poll() is None:
            curl.kill()
            curl.wait()
    assert out.startswith(b"HTTP/2 200"), out[:200]
    assert b"\r\ncontent-type: text/event-stream\r\n" in out
    body = out.split(b"\r\n\r\n", 1)[1].replace(b"event: heartbeat\ndata: \n\n", b"")
    assert body == (b'id: 1\nevent: insert\ndata: {"n":1}\n\n'
                    b'id: 2\nevent: insert\ndata: {"n":2}\n\n')


# -- AnotherChannel --
# event_piper_channel with the trigger's event_piper.channel setting naming the same one.

def test_events_notified_on_the_configured_channel_arrive_live(db, nginx, clients):
    ngx = nginx.start(db, http={"event_piper_channel": "piper_other"})
    c = clients.stream(ngx, "toto")
    rc, out = db.psql(
        "SET event_piper.channel = 'piper_other';\n"
        "insert into events (type, timestamp, subscriber, payload) "
        "values ('insert', now(), 'toto', '{\"on\": \"piper_other\"}');\n")
    assert rc == 0, out
    c.wait_events(1, T(10))
    assert bytes(c.body).replace(b"event: heartbeat\ndata: \n\n", b"") == \
        b'id: 1\nevent: insert\ndata: {"on":"piper_other"}\n\n'
