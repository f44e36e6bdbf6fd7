"""The notification grammar, both sides (docs/notification-grammar.md).

postgresql/schema.sql produces notifications; src/core/notification.cpp parses them and
src/core/positioner.cpp produces them too (event_piper_source wal). src/core/grammar.hpp holds
the grammar's constants. Here:

- the schema's limits are the header's (each read from its source: the header's text, the
  schema's functions);
- at each limit (the boundary byte, one byte under, one over) the trigger picks the form the
  grammar names, and what it sends parses, through build/grammar_check, into exactly the event
  written (position, target, subscriber, type, payload);
- the positioner's notifications for the same rows are the trigger's, byte for byte;
- the catch-up's bare "p" parses too.

So a change of either side alone (a limit, a separator, a form) fails here.
"""

import os
import re
import select
import subprocess

import pytest

import harness

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
HEADER = os.path.join(ROOT, "src", "core", "grammar.hpp")
SCHEMA = os.path.join(ROOT, "postgresql", "schema.sql")
CHECK = os.path.join(ROOT, "build", "grammar_check")

TYPE = "insert"


def header_constants():
    """The constexpr values of grammar.hpp: chars as one-byte strings, sizes as ints."""
    text = open(HEADER).read()
    values = {}
    for name, expr in re.findall(r"constexpr\s+\w+\s+(\w+)\s*=\s*([^;]+);", text):
        char = re.fullmatch(r"'(\\?.)'", expr.strip())
        if char:
            values[name] = char.group(1).encode().decode("unicode_escape")
        else:
            values[name] = eval(expr, {"__builtins__": {}}, dict(values))
    return values


G = header_constants()


@pytest.fixture(scope="module")
def check_binary():
    r = subprocess.run(["make", "-s", "-C", ROOT, "build/grammar_check"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert r.returncode == 0, r.stdout
    return CHECK


def parse(check, notifications):
    """build/grammar_check parse: per notification None (malformed) or its events as dicts."""
    data = b"".join(b"%d\n%s" % (len(n), n) for n in notifications)
    out = subprocess.run([check, "parse"], input=data, stdout=subprocess.PIPE, check=True).stdout
    lines = iter(out.decode().splitlines())
    parsed = []
    for n in notifications:
        head = next(lines).split()
        if head[0] == "fail":
            parsed.append(None)
            continue
        events = []
        for _ in range(int(head[1])):
            kind, pos, tgt, so, sl, to, tl, po, pl = next(lines).split()
            so, sl, to, tl, po, pl = map(int, (so, sl, to, tl, po, pl))
            events.append(dict(kind=kind, position=int(pos), target=int(tgt) or None,
                               subscriber=n[so:so + sl], type=n[to:to + tl],
                               payload=n[po:po + pl]))
        parsed.append(events)
    return parsed


def positioner(check, rows):
    """build/grammar_check wal: the positioner's notifications for one transaction's rows,
    given as dicts with position, target, subscriber, type, payload (bytes)."""
    data = b"%d\n" % len(rows) + b"".join(
        b"%d %d %d %d %d\n%s%s%s" % (r["position"], r["target"] or 0, len(r["subscriber"]),
                                     len(r["type"]), len(r["payload"]), r["subscriber"],
                                     r["type"], r["payload"]) for r in rows)
    out = subprocess.run([check, "wal"], input=data, stdout=subprocess.PIPE, check=True).stdout
    count, _, rest = out.partition(b"\n")
    notes = []
    for _ in range(int(count)):
        size, _, rest = rest.partition(b"\n")
        notes.append(rest[:int(size)])
        rest = rest[int(size):]
    assert rest == b""
    return notes


class Channel:
    """LISTEN on new_events; each transaction is followed by a marker, so that one that
    notifies nothing is seen as such."""

    def __init__(self, pg):
        self.pg = pg
        self.listener = pg.connect()
        self.writer = pg.connect(autocommit=False)
        self.marks = 0
        pg.run(self.listener, "LISTEN new_events")

    def close(self):
        self.listener.close()
        self.writer.close()

    def transaction(self, rows):
        """Inserts rows (subscriber, payload text, patches: an index into the ids of earlier
        rows of this call or an id, or None) in one transaction; returns (their events as
        committed, with positions and targets, in position order; the notifications sent)."""
        ids = []
        with self.writer.cursor() as cur:
            for sub, payload, patches in rows:
                target_id = ids[patches] if isinstance(patches, int) and patches < 0 else patches
                cur.execute("insert into events (type, timestamp, subscriber, payload, patches) "
                            "values (%s, now(), %s, %s, %s) returning id",
                            (TYPE, sub, payload, target_id))
                ids.append(cur.fetchone()[0])
        self.writer.commit()
        self.marks += 1
        mark = "grammar-mark-%d" % self.marks
        self.pg.run(self.writer, "select pg_notify('new_events', %s)", (mark,))
        self.writer.commit()
        got = []
        while True:
            assert select.select([self.listener], [], [], harness.T(10))[0], "no marker"
            self.listener.poll()
            done = False
            while self.listener.notifies:
                n = self.listener.notifies.pop(0)
                if n.payload == mark:
                    done = True
                else:
                    got.append(n.payload.encode())
            if done:
                break
        events = [dict(position=p, target=t, subscriber=s.encode(), type=ty.encode(),
                       payload=b.encode())
                  for p, t, s, ty, b in self.pg.sql(
                      "select p.position, p.target, e.subscriber, e.type, e.payload::text "
                      "from events e join event_positions p on p.event_id = e.id "
                      "where e.id = any(%s) order by p.position", (ids,))]
        return events, got


@pytest.fixture
def channel(db):
    assert db.scalar("select encoding from pg_database where datname = current_database()"
                     ) == 6  # UTF8: notification text encodes back to the bytes sent
    c = Channel(db)
    yield c
    c.close()


def body(size):
    """A jsonb payload whose text is `size` bytes (a JSON string of x's)."""
    assert size >= 2
    return '"' + "x" * (size - 2) + '"'


def header_bytes(*numbers):
    """Bytes of a header's numbers, each with the separator before it."""
    return sum(1 + len(str(n)) for n in numbers)


def event_form_size(pos, sub, typ, payload, target=None):
    """The size of the "e" form of an event (docs/notification-grammar.md)."""
    numbers = [pos, sub, typ] + ([target] if target else [])
    return 1 + header_bytes(*numbers) + 1 + sub + typ + payload


def record_size(pos, sub, typ, payload, target=None):
    """The size of one record of a "b" form."""
    numbers = [sub, typ, payload] + ([target] if target else [])
    return len(str(pos)) + header_bytes(*numbers) + 1 + sub + typ + payload


def next_position(db):
    return db.scalar("select coalesce(max(position), 0) + 1 from event_positions")


def expected_event_form(e):
    b = bytearray(G["form_event"].encode())
    numbers = [e["position"], len(e["subscriber"]), len(e["type"])]
    if e["target"]:
        numbers.append(e["target"])
    for n in numbers:
        b += G["field_separator"].encode() + str(n).encode()
    return bytes(b) + G["header_end"].encode() + e["subscriber"] + e["type"] + e["payload"]


def check_round_trip(check, events, notes):
    """What the trigger sent parses into exactly its events, and the positioner sends the
    same bytes for the same rows."""
    parsed = parse(check, notes)
    assert None not in parsed, notes
    assert positioner(check, events) == notes
    return parsed


def assert_whole(events, parsed_events):
    assert [dict(e, kind="e") for e in events] == parsed_events


def test_limits_are_the_headers(db):
    assert G["notify_payload_limit"] == 8000
    schema = db.sql("select event_piper_grammar_event_below(), "
                    "event_piper_grammar_batch_records_max(), "
                    "event_piper_grammar_batch_event_max(), "
                    "event_piper_grammar_subscriber_below()")[0]
    assert schema == (G["event_below"], G["batch_records_max"], G["batch_event_max"],
                      G["subscriber_below"])
    assert G["batch_records_max"] + 2 == G["batch_max"] < G["notify_payload_limit"]
    assert G["event_below"] <= G["notify_payload_limit"]
    # NOTIFY's limit is PostgreSQL's: a payload of that many bytes is refused, one less is not.
    db.sql("select pg_notify('grammar_unheard', %s)", ("x" * (G["notify_payload_limit"] - 1),))
    with pytest.raises(Exception, match="payload string too long"):
        db.sql("select pg_notify('grammar_unheard', %s)", ("x" * G["notify_payload_limit"],))


@pytest.mark.parametrize("delta", [-2, -1, 0])
def test_one_event_at_the_event_bound(channel, check_binary, delta):
    # An "e" notification is shorter than event_below bytes: at event_below - 1 it is "e", at
    # event_below the event goes as "r".
    size = G["event_below"] + delta
    pos = next_position(channel.pg)
    sub = "toto"
    fixed = event_form_size(pos, len(sub), len(TYPE), 0)
    payload = size - fixed
    events, notes = channel.transaction([(sub, body(payload), None)])
    assert events[0]["position"] == pos
    parsed = check_round_trip(check_binary, events, notes)
    if size < G["event_below"]:
        assert notes == [expected_event_form(events[0])]
        assert len(notes[0]) == size
        assert_whole(events, parsed[0])
    else:
        assert notes == [b"r %d 4\ntoto" % pos]
        assert parsed == [[dict(kind="r", position=pos, target=None, subscriber=b"toto",
                                type=b"", payload=b"")]]


@pytest.mark.parametrize("delta", [-1, 0, 1])
@pytest.mark.parametrize("wide", [False, True])
def test_subscriber_bound(channel, check_binary, delta, wide):
    # A subscriber of subscriber_below bytes or more is never notified; one byte shorter, it is
    # named: "r" for an event too large for "e", "e" otherwise. Bytes, not characters (wide:
    # a two-byte character).
    length = G["subscriber_below"] + delta
    sub = ("\u00e9" * (length // 2) + "a" * (length % 2)) if wide else "s" * length
    assert len(sub.encode()) == length
    for payload in (2, 200):
        events, notes = channel.transaction([(sub, body(payload), None)])
        parsed = check_round_trip(check_binary, events, notes)
        e = events[0]
        if length >= G["subscriber_below"]:
            assert notes == []
        elif event_form_size(e["position"], length, len(TYPE), payload) < G["event_below"]:
            assert notes == [expected_event_form(e)]
            assert_whole(events, parsed[0])
        else:
            assert notes == [b"r %d %d\n" % (e["position"], length) + sub.encode()]
            assert parsed[0] == [dict(kind="r", position=e["position"], target=None,
                                      subscriber=sub.encode(), type=b"", payload=b"")]


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_batch_at_its_bound(channel, check_binary, delta):
    # Two events of one transaction share a "b" notification while their records hold at most
    # batch_records_max bytes (the notification batch_max); one byte more, each goes alone.
    pos = next_position(channel.pg)
    first = ("toto", body(3000))
    first_rec = record_size(pos, 4, len(TYPE), 3000)
    total = G["batch_records_max"] + delta
    payload = total - first_rec - (record_size(pos + 1, 4, len(TYPE), 1000) - 1000)
    assert record_size(pos + 1, 4, len(TYPE), payload) + first_rec == total
    events, notes = channel.transaction([first + (None,), ("toto", body(payload), None)])
    parsed = check_round_trip(check_binary, events, notes)
    if total <= G["batch_records_max"]:
        assert len(notes) == 1 and notes[0].startswith(
            (G["form_batch"] + G["header_end"]).encode())
        assert len(notes[0]) == total + 2 <= G["batch_max"]
        assert_whole(events, parsed[0])
    else:
        assert notes == [expected_event_form(e) for e in events]
        assert_whole(events[:1], parsed[0])
        assert_whole(events[1:], parsed[1])


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_event_in_a_batch_at_its_bound(channel, check_binary, delta):
    # An event of at most batch_event_max bytes (subscriber, type and payload) may share a
    # batch; one byte more, it goes alone although the batch would hold it.
    size = G["batch_event_max"] + delta
    events, notes = channel.transaction([("toto", body(size - 4 - len(TYPE)), None),
                                         ("toto", body(2), None)])
    parsed = check_round_trip(check_binary, events, notes)
    assert sum(map(len, (events[0]["subscriber"], events[0]["type"], events[0]["payload"]))) \
        == size
    if size <= G["batch_event_max"]:
        assert len(notes) == 1 and notes[0][:2] == b"b\n" and len(notes[0]) <= G["batch_max"]
        assert_whole(events, parsed[0])
    else:
        assert notes == [expected_event_form(e) for e in events]


def test_batches_of_many_events(channel, check_binary):
    # Many small events: as many as fit in each "b", in position order, none over batch_max.
    rows = [("toto", body(100 + i % 7), None) for i in range(300)]
    events, notes = channel.transaction(rows)
    parsed = check_round_trip(check_binary, events, notes)
    assert len(notes) > 1
    assert all(n[:2] == b"b\n" and len(n) <= G["batch_max"] for n in notes)
    # Each batch was full: the next event's record would not have fitted.
    flat = [e for p in parsed for e in p]
    assert_whole(events, flat)
    i = 0
    for n, p in zip(notes[:-1], parsed[:-1]):
        i += len(p)
        e = events[i]
        assert len(n) - 2 + record_size(e["position"], 4, len(TYPE), len(e["payload"])) \
            > G["batch_records_max"]


def test_patch_forms(channel, check_binary):
    # A patch carries its target's position after the lengths, in "e" and in "b" records.
    events, notes = channel.transaction([("toto", '{"a": 1}', None)])
    root = events[0]
    root_id = channel.pg.scalar("select event_id from event_positions where position = %s",
                                (root["position"],))
    events, notes = channel.transaction([("toto", '{"a": 2}', root_id)])
    parsed = check_round_trip(check_binary, events, notes)
    assert events[0]["target"] == root["position"]
    assert notes == [expected_event_form(events[0])]
    assert b" %d\n" % root["position"] in notes[0]
    assert_whole(events, parsed[0])
    # In one transaction: the event and two patches of it, one "b".
    events, notes = channel.transaction([("toto", '{"b": 1}', None), ("toto", '{"b": 2}', -1),
                                         ("toto", '{"b": 3}', -2)])
    parsed = check_round_trip(check_binary, events, notes)
    assert [e["target"] for e in events] == [None, events[0]["position"], events[0]["position"]]
    assert len(notes) == 1 and notes[0][:2] == b"b\n"
    assert_whole(events, parsed[0])


@pytest.mark.parametrize("delta", [-1, 0])
def test_patch_at_the_event_bound(channel, check_binary, delta):
    # The target's digits count in the "e" form's size.
    events, _ = channel.transaction([("toto", '{"a": 1}', None)])
    root_id = channel.pg.scalar("select event_id from event_positions where position = %s",
                                (events[0]["position"],))
    pos = next_position(channel.pg)
    size = G["event_below"] + delta
    payload = size - event_form_size(pos, 4, len(TYPE), 0, target=events[0]["position"])
    # A JSON object, as merge patches are: {"x": "..."} is 9 bytes around the string's content.
    patch = '{"x": "' + "x" * (payload - 9) + '"}'
    patched, notes = channel.transaction([("toto", patch, root_id)])
    assert patched[0]["position"] == pos and len(patched[0]["payload"]) == payload
    parsed = check_round_trip(check_binary, patched, notes)
    if size < G["event_below"]:
        assert notes == [expected_event_form(patched[0])] and len(notes[0]) == size
        assert_whole(patched, parsed[0])
    else:
        assert notes == [b"r %d 4\ntoto" % pos]


def test_bare_position_from_the_catch_up(db, check_binary):
    # Rows committed while the trigger was off get positions when schema.sql is applied again,
    # with one bare position notification.
    c = Channel(db)
    try:
        db.superuser_sql("alter table events disable trigger events_commit_notify")
        try:
            db.insert("toto")
            db.insert("toto")
        finally:
            db.superuser_sql("alter table events enable trigger events_commit_notify")
        rc, out = db.psql(open(SCHEMA).read())
        assert rc == 0, out
        top = db.scalar("select max(position) from event_positions")
        assert db.scalar("select count(*) from event_positions where position >= %s",
                         (top - 1,)) == 2
        _, notes = c.transaction([])
        assert notes == [G["form_position"].encode() + G["field_separator"].encode()
                         + b"%d" % top]
        assert parse(check_binary, notes) == [[dict(kind="p", position=top, target=None,
                                                     subscriber=b"", type=b"", payload=b"")]]
    finally:
        c.close()


def test_malformed_is_refused(check_binary):
    # The parser's side of the grammar: the bounds of each form's header.
    good = [b"e 3 4 6\ntotoinsert{}", b"e 3 4 6 2\ntotoinsert{}", b"r 3 4\ntoto", b"p 3",
            b"b\n3 4 6 2\ntotoinsert{}4 4 6 2 3\ntotoinsert{}"]
    bad = [b"e 3 4 6\ntotoinsert", b"e 3 4 6 3\ntotoinsert{}", b"e 3  4 6\ntotoinsert{}",
           b"r 3 5\ntoto", b"p 0", b"p 3 ", b"b\n", b"b\n4 4 6 2\ntotoinsert{}3 4 6 2\ntotoi"
           b"nsert{}", b"b 3 4 6 2\ntotoinsert{}", b"x 3"]
    parsed = parse(check_binary, good + bad)
    assert None not in parsed[:len(good)]
    assert parsed[len(good):] == [None] * len(bad)
