"""Patching events: a patch is an event naming the event it patches (events.patches), its payload
an RFC 7396 merge patch; folded replay resumes in the current state; compaction folds old patches.

Byte-exact frames live and in replay, the database's refusals, the merge in jsonb, and the
invariant, property-tested over random histories (events, patches, tombstones, several ids per
stream) and random resume points P: a client that applies what a folded (or full) resume sends to
the state it held at P ends in the state of a client that read the whole history, also after a
compaction, and also when it resumes again from any id it was sent.
"""

import json
import os
import subprocess

import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from harness import HEARTBEAT, T, frame

NGINX_CONF = """
http {
    event_piper_postgres "{{ postgres }}";
    {{ http }}
    server {
        listen 127.0.0.1:{{ port }}{{ listen_params }};
        location = /events {
            event_piper;
            event_piper_consumer_groups $http_x_groups;
            event_piper_folded $arg_folded;
            {{ location }}
        }
    }
}
"""


def insert(db, subscriber, payload, patches=None, type="order"):
    """One event (a patch when `patches` names an event id), its own transaction; its id."""
    return db.scalar("insert into events (type, timestamp, subscriber, payload, patches) "
                     "values (%s, now(), %s, %s, %s) returning id",
                     (type, subscriber, payload, patches))


def patch_frame(id, target, data, type="order", member="patch"):
    return ('id: %s\nevent: patch\ndata: {"target":%s,"type":"%s","%s":%s}\n\n'
            % (id, target, type, member, data)).encode()


def body(c):
    return bytes(c.body).replace(HEARTBEAT, b"")


# -- the wire format --

def test_a_patch_is_delivered_live_and_in_replay_naming_its_target(db, nginx, clients):
    ngx = nginx.start(db)
    live = clients.stream(ngx, "toto")
    order = insert(db, "toto", '{"status": "paid", "n": 12345678901234567890}')
    insert(db, "toto", '{"status": "shipped", "n": null}', patches=order)
    insert(db, "toto", '{"x": 1}', type="other")  # an event that patches nothing
    expected = (frame(1, "order", '{"n":12345678901234567890,"status":"paid"}')
                + patch_frame(2, 1, '{"n":null,"status":"shipped"}')
                + frame(3, "other", '{"x":1}'))
    live.wait_events(3)
    assert body(live) == expected
    replay = clients.stream(ngx, "toto", last_event_id="0", settle=0)
    replay.wait_events(3)
    replay.read_for(0.3)
    assert body(replay) == expected


def test_patches_of_one_transaction_travel_in_one_notification(db, nginx, clients):
    ngx = nginx.start(db)
    live = clients.stream(ngx, "toto")
    conn = db.connect(autocommit=False)
    with conn, conn.cursor() as cur:
        cur.execute("insert into events (type, timestamp, subscriber, payload) "
                    "values ('order', now(), 'toto', '{\"a\": 1}') returning id")
        order = cur.fetchone()[0]
        for i in range(3):
            cur.execute("insert into events (type, timestamp, subscriber, payload, patches) "
                        "values ('order', now(), 'toto', %s, %s)", ('{"a": %d}' % (i + 2), order))
    conn.close()
    live.wait_events(4)
    assert body(live) == (frame(1, "order", '{"a":1}') + patch_frame(2, 1, '{"a":2}')
                          + patch_frame(3, 1, '{"a":3}') + patch_frame(4, 1, '{"a":4}'))


def test_the_database_refuses_bad_patches_with_a_clear_error(db):
    order = insert(db, "toto", '{"a": 1}')
    patch = insert(db, "toto", '{"a": 2}', patches=order)
    for subscriber, target, message in [
            ("toto", 999, "event 3 patches event 999, which does not exist"),
            ("bob", order, "patches event 1, which belongs to another subscriber"),
            ("toto", patch, "patches event 2, which is itself a patch: name the event it "
                            "patches (1) instead")]:
        with pytest.raises(psycopg2.Error) as err:
            insert(db, subscriber, "{}", patches=target)
        assert message in str(err.value)
    # Nothing of the refused transactions is left; the original's insert is unchanged.
    db.insert("toto")
    assert db.scalar("select count(*) from events") == 3


@pytest.mark.parametrize("target,patch,result", [
    # RFC 7396, Appendix A
    ('{"a":"b"}', '{"a":"c"}', '{"a":"c"}'),
    ('{"a":"b"}', '{"b":"c"}', '{"a":"b","b":"c"}'),
    ('{"a":"b"}', '{"a":null}', '{}'),
    ('{"a":"b","b":"c"}', '{"a":null}', '{"b":"c"}'),
    ('{"a":["b"]}', '{"a":"c"}', '{"a":"c"}'),
    ('{"a":"c"}', '{"a":["b"]}', '{"a":["b"]}'),
    ('{"a":{"b":"c"}}', '{"a":{"b":"d","c":null}}', '{"a":{"b":"d"}}'),
    ('{"a":[{"b":"c"}]}', '{"a":[1]}', '{"a":[1]}'),
    ('["a","b"]', '["c","d"]', '["c","d"]'),
    ('{"a":"b"}', '["c"]', '["c"]'),
    ('{"a":"foo"}', 'null', 'null'),
    ('{"a":"foo"}', '"bar"', '"bar"'),
    ('{"e":null}', '{"a":1}', '{"e":null,"a":1}'),
    ('[1,2]', '{"a":"b","c":null}', '{"a":"b"}'),
    ('{}', '{"a":{"bb":{"ccc":null}}}', '{"a":{"bb":{}}}'),
    # numbers stay exact
    ('{"n":1}', '{"n":123456789012345678901234567890.000000000000000001}',
     '{"n":123456789012345678901234567890.000000000000000001}'),
])
def test_merge_is_rfc_7396_in_jsonb(db, target, patch, result):
    assert db.scalar("select event_piper_merge_patch(%s::jsonb, %s::jsonb) = %s::jsonb",
                     (target, patch, result))


# -- the property: folded (and full) resumes end in the full history's state --

def merge(target, patch):
    """RFC 7396 in Python: what a client does with a patch frame."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge(out.get(k), v)
    return out


def apply(state, f):
    """What a browser client does with one frame (README "Patching events")."""
    if f.event == "heartbeat" or f.id is None:
        return
    data = json.loads(f.data)
    if f.event == "patch":
        key = data["target"]
        value = data["state"] if "state" in data else merge(state.get(key), data["patch"])
    else:
        key, value = int(f.id), data
    if value is None:
        state.pop(key, None)
    else:
        state[key] = value


def state_of(frames):
    state = {}
    for f in frames:
        apply(state, f)
    return state


IDS = ["alice", "team"]  # the stream's ids; "other" is another consumer's
value = st.one_of(st.integers(-5, 5), st.none(),
                  st.dictionaries(st.sampled_from("xy"), st.one_of(st.integers(0, 3), st.none()),
                                  max_size=2))
patch_payload = st.one_of(st.dictionaries(st.sampled_from("abc"), value, max_size=3),
                          st.just(None),  # a tombstone
                          st.just([1, 2]))  # replaces the whole payload
step = st.one_of(
    st.tuples(st.just("event"), st.sampled_from(IDS + ["other"]),
              st.dictionaries(st.sampled_from("abc"), st.integers(0, 9), max_size=3)),
    st.tuples(st.just("patch"), st.integers(0, 1000), patch_payload),
)
history = st.lists(st.tuples(step, st.booleans()), min_size=1, max_size=30)


def write(db, steps):
    """Writes the history: steps grouped into transactions (the boolean ends one)."""
    roots = []  # (id, subscriber)
    conn = db.connect(autocommit=False)
    try:
        cur = conn.cursor()
        for (kind, a, payload), commit in steps:
            if kind == "event":
                cur.execute("insert into events (type, timestamp, subscriber, payload) "
                            "values ('order', now(), %s, %s) returning id",
                            (a, json.dumps(payload)))
                roots.append((cur.fetchone()[0], a))
            elif roots:
                target, sub = roots[a % len(roots)]
                cur.execute("insert into events (type, timestamp, subscriber, payload, patches) "
                            "values ('fix', now(), %s, %s, %s)",
                            (sub, json.dumps(payload), target))
            if commit:
                conn.commit()
        conn.commit()
    finally:
        conn.close()


def read(clients, ngx, last, folded, count):
    """The frames of a stream resumed at `last`, once `count` events came (and a moment more)."""
    c = clients.stream(ngx, "alice", last_event_id=str(last), settle=0,
                       path="/events?folded=1" if folded else "/events",
                       extra_headers=[("X-Groups", ",".join(IDS[1:]))])
    if count:
        c.wait_events(count, timeout=T(10))
    c.read_for(0.1)
    c.close()
    return [f for f in c.frames if f.id is not None]


def expected_count(db, last, folded):
    if folded:
        return db.scalar("select count(*) from (select max(position) as l from event_positions "
                         "where subscriber = any(%s) group by coalesce(target, position)) f "
                         "where l > %s", (IDS, last))
    return db.scalar("select count(*) from event_positions where subscriber = any(%s) "
                     "and position > %s", (IDS, last))


def check_resumes(db, clients, ngx, full, points, cut_seed):
    """For each P: folded and full resumes from P, applied to the state at P, give the state
    of the whole history; and resuming again from an id of the folded answer does too."""
    final = state_of(full)
    for p in points:
        at_p = state_of([f for f in full if int(f.id) <= p])
        for folded in (True, False):
            got = read(clients, ngx, p, folded, expected_count(db, p, folded))
            state = dict(at_p)
            for f in got:
                apply(state, f)
            assert state == final, "%s resume from %d" % ("folded" if folded else "full", p)
            ids = [int(f.id) for f in got]
            assert ids == sorted(set(ids)), "ids of the %s resume from %d" % (folded, p)
            if folded and got:
                # Interrupted after frame k, resumed from its id.
                k = cut_seed % len(got)
                state = dict(at_p)
                for f in got[:k + 1]:
                    apply(state, f)
                rest = int(got[k].id)
                for f in read(clients, ngx, rest, True, expected_count(db, rest, True)):
                    apply(state, f)
                assert state == final, "folded resume from %d, then again from %d" % (p, rest)


@pytest.fixture
def patched(db, nginx):
    return db, nginx.start(db)


@settings(max_examples=int(__import__("os").environ.get("EVENT_PIPER_PATCH_EXAMPLES", "25")),
          deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                HealthCheck.too_slow])
@given(steps=history, points=st.lists(st.integers(0, 45), min_size=1, max_size=3),
       cut_seed=st.integers(0, 1000), compact_at=st.integers(0, 45))
def test_resumes_end_in_the_state_of_the_whole_history(patched, clients, steps, points, cut_seed,
                                                       compact_at):
    db, ngx = patched
    db.truncate()
    write(db, steps)
    # The whole history, read in full: the reference client.
    full = read(clients, ngx, 0, False, expected_count(db, 0, False))
    final = state_of(full)
    # The SQL fold agrees with the client's merge.
    for root, value in final.items():
        assert db.scalar("select event_piper_state(%s)", (root,)) == value
    check_resumes(db, clients, ngx, full, points, cut_seed)
    # Compaction up to a random position: every client, whatever P (a deleted patch's too),
    # still ends in the same state, from the states it held before the compaction.
    db.sql("call event_piper_compact_all(%s, null, 2)", (compact_at,))
    assert db.scalar("select count(*) from event_positions p join events e on e.id = p.event_id "
                     "where e.patches is not null and p.position <= %s", (compact_at,)) == 0
    check_resumes(db, clients, ngx, full, points + [compact_at], cut_seed)


def test_folded_resume_sends_each_event_once_in_its_current_state(db, nginx, clients):
    ngx = nginx.start(db)
    a = insert(db, "alice", '{"status": "paid"}')        # 1
    b = insert(db, "alice", '{"status": "paid"}')        # 2
    insert(db, "alice", '{"status": "shipped"}', a)      # 3
    insert(db, "alice", '{"x": 1}', type="other")        # 4, patches nothing
    insert(db, "alice", 'null', b)                       # 5, a tombstone
    insert(db, "alice", '{"status": "delivered"}', a)    # 6
    c = read(clients, ngx, 2, True, 3)
    assert b"".join(f.raw for f in c) == (
        frame(4, "other", '{"x":1}')
        + patch_frame(5, 2, 'null', member="state")
        + patch_frame(6, 1, '{"status":"delivered"}', member="state"))
    # The choice is off by default, and checked.
    assert len(read(clients, ngx, 2, False, 4)) == 4
    bad = clients.open(ngx, "alice", "2", path="/events?folded=maybe")
    bad.read_for(0.3)
    assert bad.status == 400


def test_folded_replay_against_a_schema_without_patches_sends_the_full_history(db, nginx,
                                                                               clients):
    db.insert("alice")
    db.insert("alice")
    db.superuser_sql("alter function event_piper_state(bigint) rename to event_piper_state_x")
    try:
        ngx = nginx.start(db)
        got = read(clients, ngx, 0, True, 2)
        assert b"".join(f.raw for f in got) == frame(1) + frame(2)
        ngx.wait_log("folded replay asked for, but the database has no event_piper_state()")
    finally:
        db.superuser_sql("alter function event_piper_state_x(bigint) rename to event_piper_state")


# -- the README's browser snippet, under a real EventSource --

def snippet_state(ngx, last_event_id, folded, count):
    from test_real_clients import CLIENTS, node_clients_ready
    node_clients_ready()
    url = "http://127.0.0.1:%d/events%s" % (ngx.port, "?folded=1" if folded else "")
    out = subprocess.run(["node", os.path.join(CLIENTS, "patching_state.mjs"), url,
                          "--header", "X-Consumer-Id: alice",
                          "--header", "Last-Event-ID: %d" % last_event_id,
                          "--count", str(count), "--timeout", str(int(T(20)))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         timeout=T(30))
    assert out.returncode == 0, out.stderr
    return {int(k): v for k, v in json.loads(out.stdout).items()}


def test_the_readme_browser_snippet_keeps_the_current_state(db, nginx, clients):
    ngx = nginx.start(db)
    a = insert(db, "alice", '{"status": "paid", "n": 12, "addr": {"city": "Lyon", "zip": 1}}')
    b = insert(db, "alice", '{"status": "paid"}')
    insert(db, "alice", '{"status": "shipped", "addr": {"zip": null}, "n": null}', a)
    insert(db, "alice", 'null', b)  # deleted
    c = insert(db, "alice", '{"status": "paid"}')
    insert(db, "alice", '{"tags": [1, 2]}', c)
    expected = {1: {"status": "shipped", "addr": {"city": "Lyon"}}, 5: {"status": "paid",
                                                                        "tags": [1, 2]}}
    for root, value in expected.items():
        assert db.scalar("select event_piper_state(%s)", (root,)) == value
    assert snippet_state(ngx, 0, False, 6) == expected  # the whole history
    assert snippet_state(ngx, 0, True, 3) == expected   # folded: 1, 2 (deleted) and 5, once each
