"""Several consumer ids in one stream (a user, their groups, a broadcast id).

    location = /events {
        auth_request /_auth;
        auth_request_set $consumer $upstream_http_x_consumer_id;
        auth_request_set $groups $upstream_http_x_consumer_groups;
        event_piper;
        event_piper_consumer $consumer;
        event_piper_consumer_groups $groups;
    }

The stream receives every event addressed to any of its ids, once, in position order, live and in
replay; Last-Event-ID resumes all of them from one position. The auth backend is a server of the
same nginx that maps a bearer token to a user and a list of groups.
"""

import os
import re
import time

import pytest

import harness
from harness import HEARTBEAT, T, compact_json, free_port, frame, rss_kb, sequence_problems

NGINX_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
    map $http_authorization $token_user {
        default "";
        "Bearer alice-token" alice;
        "Bearer bob-token" bob;
    }
    map $http_authorization $token_groups {
        default "";
        "Bearer alice-token" "team-7, everyone";
        "Bearer bob-token" "team-8, everyone";
    }
    server {
        listen 127.0.0.1:{{ backend_port }};
        location = /auth {
            if ($token_user = "") {
                return 401;
            }
            add_header X-Consumer-Id $token_user;
            add_header X-Consumer-Groups $token_groups;
            return 204;
        }
    }
    server {
        listen 127.0.0.1:{{ port }};
        location = /events {
            auth_request /_auth;
            auth_request_set $consumer $upstream_http_x_consumer_id;
            auth_request_set $groups $upstream_http_x_consumer_groups;
            event_piper;
            event_piper_consumer $consumer;
            event_piper_consumer_groups $groups;
        }
        location = /_auth {
            internal;
            proxy_pass http://127.0.0.1:{{ backend_port }}/auth;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
        }
        # Headers straight from the client (development), and the browser setup.
        location = /headers/events {
            event_piper;
            event_piper_consumer_groups $http_x_consumer_groups;
        }
        location = /browser/events {
            event_piper;
            event_piper_consumer $arg_consumer urldecode;
            event_piper_consumer_groups $arg_groups urldecode;
        }
        location = /status { event_piper_status; }
    }
}
"""

ALICE = ("alice", "team-7", "everyone")


def without_heartbeats(body):
    return bytes(body).replace(HEARTBEAT, b"")


def expected(db, ids, after=0):
    rows = db.sql("select position, type, payload::text from event_log where subscriber = any(%s) "
                  "and position > %s order by position", (list(ids), after))
    return b"".join(frame(p, t, compact_json(d)) for p, t, d in rows)


def start(db, nginx, **kw):
    return nginx.start(db, values={"backend_port": free_port()}, **kw)


def alice_stream(clients, ngx, last_event_id=None, token="alice-token"):
    return clients.stream(ngx, consumer=None, last_event_id=last_event_id,
                          extra_headers=[("Authorization", "Bearer " + token)], settle=0)


def insert_mix(db, n, start=1):
    """n events spread over alice, her groups, bob, his group and nobody."""
    subs = ["alice", "team-7", "bob", "everyone", "team-8", "nobody"]
    for i in range(start, start + n):
        db.insert(subs[i % len(subs)], '{"i": %d}' % i)


@pytest.mark.smoke
def test_a_user_with_groups_gets_their_events_once_in_order_live_and_in_replay(db, nginx,
                                                                               clients):
    ngx = start(db, nginx)
    alice = alice_stream(clients, ngx)
    bob = alice_stream(clients, ngx, token="bob-token")
    time.sleep(0.3)
    insert_mix(db, 60)
    want_alice = expected(db, ALICE)
    want_bob = expected(db, ("bob", "team-8", "everyone"))
    alice.wait(lambda: without_heartbeats(alice.body) == want_alice, T(15), "alice's events")
    bob.wait(lambda: without_heartbeats(bob.body) == want_bob, T(15), "bob's events")
    assert len(alice.events) == 30  # alice, team-7 and everyone: 3 of every 6
    # Replay from 0, and a resume from the middle: one position resumes every id.
    replay = alice_stream(clients, ngx, last_event_id="0")
    replay.wait(lambda: without_heartbeats(replay.body) == want_alice, T(15), "alice's replay")
    middle = alice.events[14].id
    resumed = alice_stream(clients, ngx, last_event_id=middle)
    want_after = expected(db, ALICE, after=int(middle))
    resumed.wait(lambda: without_heartbeats(resumed.body) == want_after, T(15), "the resume")
    # Then live again, on every stream.
    insert_mix(db, 6, start=61)
    everything, after = expected(db, ALICE), expected(db, ALICE, after=int(middle))
    for c, want in ((alice, everything), (replay, everything), (resumed, after)):
        c.wait(lambda c=c, want=want: without_heartbeats(c.body) == want, T(15),
               "the live events after the replay")


def test_a_single_consumer_id_behaves_as_before(db, nginx, clients):
    ngx = start(db, nginx)
    plain = clients.stream(ngx, "a,b", path="/headers/events")  # the separator is just a byte
    db.insert("a,b")
    db.insert("a")
    plain.wait_events(1)
    plain.read_for(0.3)
    assert without_heartbeats(plain.body) == frame(1)


@pytest.mark.smoke
def test_ids_from_headers_and_query_arguments(db, nginx, clients):
    ngx = start(db, nginx)
    h = clients.stream(ngx, "carol", path="/headers/events",
                       extra_headers=[("X-Consumer-Groups", "ops,everyone")])
    q = clients.stream(ngx, consumer=None,
                       path="/browser/events?consumer=dave%40example.com&groups=everyone,a%2Cb")
    db.insert("ops", '{"n": 1}')
    db.insert("everyone", '{"n": 2}')
    db.insert("a,b", '{"n": 3}')
    db.insert("dave@example.com", '{"n": 4}')
    h.wait_events(2)
    q.wait_events(3)
    h.read_for(0.3)
    assert without_heartbeats(h.body) == frame(1, data='{"n":1}') + frame(2, data='{"n":2}')
    assert without_heartbeats(q.body) == (frame(2, data='{"n":2}') + frame(3, data='{"n":3}') +
                                          frame(4, data='{"n":4}'))


def test_query_argument_lists_as_browsers_send_them(db, nginx, clients):
    """With `urldecode`, '+' is a space: "+team+7+" is the id "team 7"; "%2C" stays a comma
    inside an id (what URLSearchParams makes of a comma)."""
    ngx = start(db, nginx)
    q = clients.stream(ngx, consumer=None,
                       path="/browser/events?consumer=+erin+&groups=everyone,+team+7+,x%2Cy")
    for sub, n in (("team+7", 1), ("team 7", 2), ("erin", 3), (" erin ", 4), ("x,y", 5),
                   ("x", 6), ("everyone", 7)):
        db.insert(sub, '{"n": %d}' % n)
    q.wait_events(4)
    q.read_for(0.3)
    assert without_heartbeats(q.body) == b"".join(frame(n, data='{"n":%d}' % n)
                                                  for n in (2, 3, 5, 7))


@pytest.mark.parametrize("groups, reason", [
    ("a,,b", b"empty id"),
    ("a,", b"empty id"),
    (" , ", b"empty id"),
    ("ok,bad\x01", b"control characters"),
    (",".join("g%d" % i for i in range(64)), b"more than 64"),
    ("x" * 257, b"longer than 256"),
])
def test_bad_id_lists_are_400_and_subscribe_nothing(db, nginx, clients, groups, reason):
    ngx = start(db, nginx)
    c = clients.open(ngx, "carol", path="/headers/events",
                     extra_headers=[("X-Consumer-Groups", groups)])
    c.wait_complete(T(10))
    assert c.status == 400, (c.status_line, bytes(c.body))
    body = bytes(c.body)
    assert reason in body and body.endswith(b"\n") and body.count(b"\n") == 1, body
    time.sleep(1.2)
    assert harness_status(ngx)["streams"] == 0


def test_63_groups_are_accepted(db, nginx, clients):
    ngx = start(db, nginx)
    groups = ",".join("g%d" % i for i in range(63))
    c = clients.stream(ngx, "carol", path="/headers/events",
                       extra_headers=[("X-Consumer-Groups", groups)])
    db.insert("g62")
    c.wait_events(1)


def test_status_counts_a_stream_once_and_each_id_once(db, nginx, clients):
    ngx = start(db, nginx, workers=1)
    alice_stream(clients, ngx)
    alice_stream(clients, ngx, token="bob-token")
    time.sleep(1.3)
    st = harness_status(ngx)
    assert st["streams"] == 2
    assert st["consumers"] == 5  # alice, team-7, everyone, bob, team-8


def harness_status(ngx):
    import json
    c = harness.HttpClient(ngx.port)
    try:
        c.request("GET", "/status")
        c.wait_complete(T(10))
    finally:
        c.close()
    return json.loads(bytes(c.body))


def auto_explain_plans(db, since):
    """The plans PostgreSQL logged (auto_explain) after byte offset `since` of its log."""
    with open(os.path.join(db.datadir, "server.log"), errors="replace") as f:
        f.seek(since)
        text = f.read()
    return [p for p in text.split("plan:") if "Merge Append" in p or "Index Scan" in p]


def test_replay_over_10_ids_of_100000_events_each_is_an_index_scan_per_id(db, nginx, clients):
    """Bounded replay: one index range scan per id under a Merge Append (auto_explain logs the
    module's own queries), first events in well under a second, bounded worker memory."""
    db.superuser_sql(
        "alter table events disable trigger events_commit_notify;"
        "insert into events (type, timestamp, subscriber, payload) "
        "select 't', now(), 'id-' || (g % 10), jsonb_build_object('n', g) "
        "from generate_series(1, 1000000) g;"
        "alter table events enable trigger events_commit_notify;"
        "insert into event_positions (position, event_id, subscriber) "
        "select nextval('events_position_seq'), id, subscriber from events;"
        "analyze events; analyze event_positions;")
    db.superuser_sql("alter role event_piper set session_preload_libraries = 'auto_explain'")
    db.superuser_sql("alter role event_piper set auto_explain.log_min_duration = 0")
    # The cluster logs from WARNING up (scripts/pgctl.sh).
    db.superuser_sql("alter role event_piper set auto_explain.log_level = warning")
    log_at = os.path.getsize(os.path.join(db.datadir, "server.log"))
    try:
        ngx = nginx.start(db, workers=1, values={"backend_port": free_port()})
        [worker] = ngx.worker_pids()
        base = rss_kb(worker)
        groups = ",".join("id-%d" % i for i in range(1, 10))
        t0 = time.monotonic()
        c = clients.stream(ngx, "id-0", last_event_id="0", path="/headers/events",
                           extra_headers=[("X-Consumer-Groups", groups)], settle=0)
        c.wait_events(1, T(10))
        first = time.monotonic() - t0
        peak = base
        while len(c.events) < 50000:
            c.pump(1)
            peak = max(peak, rss_kb(worker))
        took = time.monotonic() - t0
        harness.note("10 ids x 100,000 events: first event after %.3fs, 50,000 in %.1fs, worker "
                     "RSS +%d kB" % (first, took, peak - base))
        assert first < 1.0, first
        ids = c.event_ids()[:50000]
        assert ids == list(range(1, 50001)), sequence_problems(ids, list(range(1, 50001)))
        if not os.environ.get("EVENT_PIPER_NGINX_PRELOAD"):  # ASan's quarantine
            assert peak - base < 30000, peak - base
    finally:
        db.superuser_sql("alter role event_piper reset session_preload_libraries")
        db.superuser_sql("alter role event_piper reset auto_explain.log_min_duration")
        db.superuser_sql("alter role event_piper reset auto_explain.log_level")
    plans = auto_explain_plans(db, log_at)
    multi = [p for p in plans if p.count("subscriber") >= 10]
    assert multi, "no plan of the replay query in the server log"
    for plan in multi:
        assert "Merge Append" in plan, plan
        assert "Seq Scan" not in plan, plan
        assert len(re.findall(r"Index (Only )?Scan", plan)) >= 10, plan
        # Nothing is sorted below the merge: no sort of a consumer's history.
        below = plan.split("Merge Append", 1)[1]
        assert "Sort" not in below.split("Sort Key", 1)[1], plan
