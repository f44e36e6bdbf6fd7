"""Identity from nginx's auth_request, the setup for production (docs/setups.md).

A client-sent X-Consumer-Id is a claim, not a proof. With

    location = /events {
        auth_request /_auth;
        auth_request_set $consumer $upstream_http_x_consumer_id;
        event_piper;
        event_piper_consumer $consumer;
    }

the consumer is whatever the auth backend says the client's credentials belong to. Here the backend
is a tiny nginx server that maps a bearer token to a consumer (204 + X-Consumer-Id) or answers 401.
The tests prove that a client holding alice's token gets alice's events, live and replayed, and
never one of bob's, whatever X-Consumer-Id header, ?consumer= argument, cookie or Last-Event-ID it
sends; and that without a valid token nothing streams at all.
"""

import re
import time

import pytest

from harness import T, compact_json, free_port, frame, pump_all, sequence_problems

# The auth backend is a server of the same nginx (in production, any HTTP service): it maps a
# bearer token to a consumer (204 + X-Consumer-Id) or answers 401. /_auth, the auth_request
# target, is a subrequest proxied to it, without the body.
NGINX_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
    map $http_authorization $token_consumer {
        default "";
        "Bearer alice-token" alice;
        "Bearer bob-token" bob;
    }
    server {
        listen 127.0.0.1:{{ backend_port }};
        location = /auth {
            if ($http_authorization = "Bearer anonymous-token") {
                return 204;
            }
            if ($token_consumer = "") {
                return 401;
            }
            add_header X-Consumer-Id $token_consumer;
            return 204;
        }
    }
    server {
        listen 127.0.0.1:{{ port }};
        location = /events {
            auth_request /_auth;
            auth_request_set $consumer $upstream_http_x_consumer_id;
            event_piper;
            event_piper_consumer $consumer;
        }
        location = /_auth {
            internal;
            proxy_pass http://127.0.0.1:{{ backend_port }}/auth;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
        }
    }
}
"""

# docs/setups.md: $upstream_http_x_consumer_id needs a proxied auth response; a local `return`
# in the auth location names nobody.
LOCAL_RETURN_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
    server {
        listen 127.0.0.1:{{ port }};
        location = /events {
            auth_request /_auth;
            auth_request_set $consumer $upstream_http_x_consumer_id;
            event_piper;
            event_piper_consumer $consumer;
        }
        location = /_auth {
            internal;
            add_header X-Consumer-Id alice;
            return 204;
        }
    }
}
"""

ALICE = ("Authorization", "Bearer alice-token")
BOB = ("Authorization", "Bearer bob-token")


def frame_of(frames, id):
    """The frame with this id out of concatenated frames."""
    for f in frames.split(b"\n\n"):
        if f.startswith(b"id: %d\n" % id):
            return f + b"\n\n"
    raise AssertionError("no frame with id %d" % id)


@pytest.fixture
def auth_nginx(db, nginx):
    """nginx with NGINX_CONF: the auth backend on a port of its own."""
    return nginx.start(db, values={"backend_port": free_port()})


def expected(db, subscriber, after=0):
    rows = db.sql("select position, type, payload::text from event_log where subscriber = "
                  "%s and position > %s order by position", (subscriber, after))
    return [r[0] for r in rows], b"".join(frame(p, t, compact_json(d)) for p, t, d in rows)


def insert_mixed(db, n0, count):
    for i in range(n0, n0 + count):
        db.insert("bob", '{"n": %d, "secret": "bob"}' % i)
        db.insert("alice", '{"n": %d}' % i)


def open_as(clients, ngx, headers, path="/events", last_event_id=None):
    """A stream request with these headers and no X-Consumer-Id of the harness's own."""
    return clients.open(ngx, consumer=None, last_event_id=last_event_id, path=path,
                        extra_headers=headers)


def test_a_local_return_in_the_auth_location_names_nobody(db, nginx, clients):
    """docs/setups.md: $upstream_http_x_consumer_id needs a proxied auth response. With a
    local `return 204` + add_header in /_auth, $consumer stays empty: 401, nothing leaks."""
    ngx = nginx.start(db, conf=LOCAL_RETURN_CONF)
    insert_mixed(db, 1, 2)
    c = open_as(clients, ngx, [ALICE, ("X-Consumer-Id", "alice")], "/events", last_event_id="0")
    c.wait_complete()
    assert c.status == 401, bytes(c.raw[:300])
    assert re.search(rb"(^|\n)id: ", bytes(c.body)) is None


# What a client holding alice's token may try, to read bob's events.
ATTEMPTS = [
    ("alice's token alone", [ALICE], "/events"),
    ("X-Consumer-Id: bob", [ALICE, ("X-Consumer-Id", "bob")], "/events"),
    ("?consumer=bob", [ALICE], "/events?consumer=bob"),
    ("Cookie consumer=bob", [ALICE, ("Cookie", "consumer=bob")], "/events"),
    ("all of them", [ALICE, ("X-Consumer-Id", "bob"), ("Cookie", "consumer=bob")],
     "/events?consumer=bob&consumer_id=bob"),
    ("X-Consumer-Id twice", [ALICE, ("X-Consumer-Id", "bob"), ("X-Consumer-Id", "bob")],
     "/events"),
    ("X-Consumer-Id: bob on a path with a query string", [ALICE, ("x-consumer-id", "bob")],
     "/events?x=1"),
]


def test_alices_token_never_receives_bobs_events_whatever_it_claims(db, auth_nginx, clients):
    ngx = auth_nginx
    insert_mixed(db, 1, 5)  # history: bob 1, alice 2, bob 3, ...

    live, replay = [], []
    for what, headers, path in ATTEMPTS:
        c = open_as(clients, ngx, headers, path)
        assert c.status == 200, "%s: %r %r" % (what, c.status_line, bytes(c.body))
        live.append((what, c))
        # The same, resuming from the start of history: replay must not leak either.
        r = open_as(clients, ngx, headers, path, last_event_id="0")
        assert r.status == 200, "%s + Last-Event-ID: %r" % (what, r.status_line)
        replay.append((what + " + Last-Event-ID: 0", r))
    everyone = [c for _, c in live + replay]
    for c in everyone:
        c.read_for(0.05)

    newest = db.scalar("select max(position) from event_log")
    insert_mixed(db, 100, 5)
    alice_live, _ = expected(db, "alice", after=newest)
    alice_all, alice_all_bytes = expected(db, "alice")

    def enough():
        return (all(len(c.events) >= len(alice_live) for _, c in live) and
                all(len(c.events) >= len(alice_all) for _, c in replay))
    pump_all(everyone, enough, T(20), "alice's events on every stream")
    # Bob's events that would have come by now are here, or never: give them a moment.
    for c in everyone:
        c.read_for(0.05)
    time.sleep(0.5)
    for c in everyone:
        c.drain()

    for what, c in live:
        # A stream without Last-Event-ID starts "from now": an event committed just before
        # it opened may still come (its notification was on the way). So: a suffix of
        # alice's events that holds every event inserted after the stream opened.
        ids = c.event_ids()
        start = alice_all.index(ids[0]) if ids and ids[0] in alice_all else 0
        assert start <= alice_all.index(alice_live[0]), what
        assert sequence_problems(ids, alice_all[start:]) == "", what
        assert b"".join(e.raw for e in c.events) == \
            b"".join(frame_of(alice_all_bytes, i) for i in ids), what
        assert b"bob" not in bytes(c.body), what
    for what, c in replay:
        assert sequence_problems(c.event_ids(), alice_all) == "", what
        assert b"".join(e.raw for e in c.events) == alice_all_bytes, what
        assert b"bob" not in bytes(c.body), what

    # Every stream of that run was alice's, as the error log says too.
    assert ngx.log_count('stream opened for consumer "bob"') == 0


def test_bobs_token_receives_bobs_events(db, auth_nginx, clients):
    ngx = auth_nginx
    insert_mixed(db, 1, 3)
    c = open_as(clients, ngx, [BOB, ("X-Consumer-Id", "alice")], "/events?consumer=alice",
                last_event_id="0")
    assert c.status == 200, c.status_line
    insert_mixed(db, 10, 2)
    bob_all, bob_bytes = expected(db, "bob")
    c.wait_events(len(bob_all))
    c.read_for(0.3)
    assert c.event_ids() == bob_all
    assert b"".join(e.raw for e in c.events) == bob_bytes


def test_no_valid_token_no_stream_whatever_it_claims(db, auth_nginx, clients):
    ngx = auth_nginx
    insert_mixed(db, 1, 2)
    cases = [
        ("no Authorization, X-Consumer-Id: bob", [("X-Consumer-Id", "bob")], "/events"),
        ("no Authorization, ?consumer=bob", [], "/events?consumer=bob"),
        ("unknown token", [("Authorization", "Bearer mallory-token"),
                           ("X-Consumer-Id", "bob")], "/events"),
        ("bob's token with a suffix", [("Authorization", "Bearer bob-token2")],
         "/events?consumer=bob"),
        ("a token that names bob", [("Authorization", "Bearer bob")], "/events"),
    ]
    for what, headers, path in cases:
        c = open_as(clients, ngx, headers, path, last_event_id="0")
        c.wait_complete()
        assert c.status == 401, "%s: %r" % (what, bytes(c.raw[:300]))
        assert b"text/event-stream" not in bytes(c.head).lower(), what
        assert re.search(rb"(^|\n)id: ", bytes(c.body)) is None, what
    # A backend that says yes without naming a consumer: the module refuses (fail closed).
    c = open_as(clients, ngx,
                [("Authorization", "Bearer anonymous-token"), ("X-Consumer-Id", "bob")],
                "/events?consumer=bob", last_event_id="0")
    c.wait_complete()
    assert c.status == 401, bytes(c.raw[:300])
    assert re.search(rb"(^|\n)id: ", bytes(c.body)) is None
    # Two Authorization headers: nginx refuses the request before anybody is asked.
    c = open_as(clients, ngx, [ALICE, BOB], "/events")
    c.wait_complete()
    assert c.status == 400, bytes(c.raw[:300])
    assert ngx.log_count("stream opened") == 0
