-- ngx_event_piper schema: the events table (the log), its positions and the commit-ordered
-- notification trigger. Safe to apply more than once, also while writers insert, provided it is
-- applied in one transaction:  psql --single-transaction -f postgresql/schema.sql
--
-- Delivery order is commit order, not id order. A BIGSERIAL id is taken at INSERT, but
-- transactions commit in any order: a reader that saw id 6 and resumes "after 6" would never see
-- id 5 if 5 committed later. So each row also gets a `position`, assigned at COMMIT by a deferred
-- constraint trigger, such that positions become visible strictly in increasing order: once a
-- reader sees position p, no position below p can appear later.
--
-- Where positions live. Not in the event row: writing them there is an UPDATE of an
-- indexed column, which writes the whole row a second time with all its index entries and leaves
-- a dead row version per event for autovacuum. They live in `event_positions`, a narrow
-- insert-only table (position, event id, subscriber, commit time) whose index on
-- (subscriber, position) is the one replay reads; the event row is written once and never
-- updated. The view `event_log` shows the events with their positions.
--
-- How, cheaply. The trigger runs once per transaction, not once per row: its WHEN clause notes
-- each inserted id in a transaction-local setting and queues only the first row; at commit that
-- one firing
--   1. reserves one contiguous range of positions for all of the transaction's rows (a few
--      microseconds under a session-level advisory lock) and takes a transaction-level advisory
--      lock named after the last position of the range, which it holds until it is visible;
--   2. inserts the positions with one INSERT and queues the notifications, built from the rows
--      as committed, in position order, several events per notification;
--   3. waits for the lock named after the position just below its range: the transaction that
--      reserved it is then visible (or rolled back), and so, by induction, is every smaller one.
-- Only step 3 and the commit itself are serialised, in position order. NOTIFY already serialises
-- notifying commits (a cluster-wide lock held through the commit record's flush), so the chain
-- adds no new bottleneck, and the work of steps 1-2 runs in parallel with other commits.
-- Rolled-back transactions release their locks without a visible row; a reserved position whose
-- row was deleted again by its own transaction stays unused (positions may have gaps).
-- The SSE `id:` field and Last-Event-ID are positions. With one writer at a time, position equals
-- id; the original service's rows keep position = id (see the migration below).

-- What this database has before this script: nothing, the original service's table (no
-- positions), a schema that kept positions in events.position (before event_positions), or
-- this one. Decided before anything is created.
SELECT set_config('event_piper.layout',
                  CASE WHEN to_regclass('events') IS NULL THEN 'new'
                       WHEN to_regclass('event_positions') IS NOT NULL THEN 'current'
                       WHEN EXISTS (SELECT 1 FROM pg_attribute
                                     WHERE attrelid = to_regclass('events')
                                       AND attname = 'position' AND NOT attisdropped)
                       THEN 'column'
                       ELSE 'original' END,
                  false); -- for the session: also right when applied without --single-transaction

CREATE TABLE IF NOT EXISTS events (
    id         BIGSERIAL PRIMARY KEY,
    type       varchar   NOT NULL,
    timestamp  timestamp NOT NULL,
    subscriber varchar   NOT NULL,
    payload    jsonb     NOT NULL,
    -- A line break in a type would end the SSE `event:` field early and let a writer inject fields.
    CONSTRAINT events_type_single_line CHECK (type !~ '[\r\n]')
);

-- Writers wait here for this transaction (readers do not): nothing assigns positions while the
-- rows below are moved or given theirs. Writers in flight finish first. (In a DO block: applied
-- without --single-transaction, as docker-entrypoint-initdb.d does on an empty database, a bare
-- LOCK TABLE is an error; there the lock only lasts this statement.)
DO $$ BEGIN LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE; END $$;

-- One row per positioned event, never updated by the trigger. `committed_at` (the database's
-- clock, at commit) lets a stream opened while the database was unreachable start exactly after
-- what was committed before it opened.
CREATE TABLE IF NOT EXISTS event_positions (
    position     bigint      PRIMARY KEY,
    event_id     bigint      NOT NULL,
    subscriber   varchar     NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Replay reads "subscriber = $1 AND position > $2 ORDER BY position LIMIT n" here, one index
-- range scan, then each event by its primary key.
CREATE INDEX IF NOT EXISTS event_positions_subscriber_position_idx
    ON event_positions (subscriber, position) INCLUDE (event_id);
-- Finds an event's position: deletes and subscriber changes follow the event, and the check for
-- rows without a position.
CREATE INDEX IF NOT EXISTS event_positions_event_id_idx ON event_positions (event_id);

CREATE SEQUENCE IF NOT EXISTS events_position_seq;
ALTER SEQUENCE events_position_seq OWNED BY event_positions.position;

-- Patches (docs/patching.md). `events.patches` names the event a row patches, by the id its
-- writer got from INSERT ... RETURNING id (NULL: a plain event, as every row before). Its payload
-- is an RFC 7396 merge patch of that event's payload; a payload of JSON `null` is a tombstone.
-- `event_positions.target` is the position of the patched event (NULL for plain events), written
-- by whoever assigns positions, so that notifications and replay carry it without a lookup; a
-- row whose event is not a patch but has a target is a compaction's stand-in: the patched
-- event's whole state as of that position (see event_piper_compact).
ALTER TABLE events ADD COLUMN IF NOT EXISTS patches bigint;
ALTER TABLE event_positions ADD COLUMN IF NOT EXISTS target bigint;
-- Folded replay and compaction find an event's patches here (only patches have entries).
CREATE INDEX IF NOT EXISTS event_positions_target_idx
    ON event_positions (target, position) WHERE target IS NOT NULL;

-- The view operators (and the tests) read: each event with its position, NULL for rows that
-- have none (not committed through the trigger). A compaction's stand-in is not the event's
-- position: left out.
CREATE OR REPLACE VIEW event_log AS
    SELECT e.id, e.type, e.timestamp, e.subscriber, e.payload, p.position, p.committed_at
      FROM events e LEFT JOIN event_positions p
        ON p.event_id = e.id AND (p.target IS NULL OR e.patches IS NOT NULL);

-- The advisory locks, in their own key spaces: the session-level lock that makes a range
-- reservation atomic (the same bigint key older schemas used), and the two-int4 locks
-- (1885958245, low 32 bits of a position) that order commits.
CREATE OR REPLACE FUNCTION event_piper_position_lock_key(pos bigint) RETURNS int
LANGUAGE sql IMMUTABLE AS $$
    SELECT ((pos % 4294967296) - 2147483648)::int
$$;

-- The k-th position (from 1) of a range that starts at `first_pos`: a transaction's rows take
-- positions in id order, the notifications list them in that order (docs/notification-grammar.md).
-- A SQL function, IMMUTABLE: inlined, it costs nothing at run time.
CREATE OR REPLACE FUNCTION event_piper_nth_position(first_pos bigint, k bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT first_pos + k - 1
$$;

-- Existing rows. The original service's rows get position = id, and new positions continue above
-- every id it ever handed out, so its clients resume with the Last-Event-ID they hold. A schema
-- that kept positions in events.position moves them here unchanged (and the column goes, so
-- that no reader can take a stale column for the truth). Rows committed while the trigger was
-- missing (a disabled trigger, an older schema) get positions above the newest one, in id order.
DO $$
DECLARE
    above bigint;
    pos0  bigint;
    n     bigint;
    chan  text := coalesce(nullif(current_setting('event_piper.channel', true), ''), 'new_events');
    src   text; -- event_piper_wal_progress.source, when wal.sql was applied
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'events_type_single_line') THEN
        ALTER TABLE events ADD CONSTRAINT events_type_single_line CHECK (type !~ '[\r\n]');
    END IF;
    -- Types a client would take for something else: empty (`event: ` is a plain message to
    -- EventSource), the module's own `heartbeat`, and EventSource's own `error` and `open` (a
    -- listener for them, onerror and onopen included, would take the event for the connection's).
    -- NOT VALID: refused for new and changed rows; rows already stored stay and are sent as they
    -- are (README "HTTP contract").
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'events_type_not_reserved') THEN
        ALTER TABLE events ADD CONSTRAINT events_type_not_reserved
            CHECK (type NOT IN ('', 'heartbeat', 'error', 'open', 'patch')) NOT VALID;
    END IF;
    IF current_setting('event_piper.layout') = 'column' THEN
        INSERT INTO event_positions (position, event_id, subscriber, committed_at)
            SELECT position, id, subscriber, coalesce(committed_at, clock_timestamp())
              FROM events WHERE position IS NOT NULL;
        -- Its sequence now belongs to event_positions (above): dropping the column keeps it.
        ALTER TABLE events DROP COLUMN position, DROP COLUMN IF EXISTS committed_at;
    ELSIF current_setting('event_piper.layout') = 'original' THEN
        INSERT INTO event_positions (position, event_id, subscriber)
            SELECT id, id, subscriber FROM events;
        SELECT greatest(max(id), (SELECT CASE WHEN is_called THEN last_value END
                                    FROM events_id_seq))
          INTO above FROM events;
        IF above IS NOT NULL THEN
            PERFORM setval('events_position_seq', above);
            PERFORM pg_notify(chan, 'p ' || above);
        END IF;
        RETURN;
    END IF;
    -- event_piper_source wal (postgresql/wal.sql): the positioner gives the rows committed since
    -- its last batch their positions; giving them here too would position them twice.
    IF to_regclass('event_piper_wal_progress') IS NOT NULL THEN
        EXECUTE 'SELECT source FROM event_piper_wal_progress WHERE id = 1' INTO src;
        IF src = 'wal' THEN
            RETURN;
        END IF;
    END IF;
    -- Never hand out a position below one that exists.
    SELECT max(position) INTO above FROM event_positions;
    IF above IS NOT NULL AND above > (SELECT CASE WHEN is_called THEN last_value ELSE 0 END
                                        FROM events_position_seq) THEN
        PERFORM setval('events_position_seq', above);
    END IF;
    SELECT count(*) INTO n FROM events e
     WHERE NOT EXISTS (SELECT 1 FROM event_positions p WHERE p.event_id = e.id);
    IF n > 0 THEN
        pos0 := nextval('events_position_seq');
        PERFORM setval('events_position_seq', event_piper_nth_position(pos0, n));
        INSERT INTO event_positions (position, event_id, subscriber)
            SELECT event_piper_nth_position(pos0, row_number() OVER (ORDER BY e.id)), e.id,
                   e.subscriber
              FROM events e
             WHERE NOT EXISTS (SELECT 1 FROM event_positions p WHERE p.event_id = e.id);
        -- A bare position ("p", docs/notification-grammar.md): every open stream reads the
        -- table for what it has not sent.
        PERFORM pg_notify(chan, 'p ' || event_piper_nth_position(pos0, n));
    END IF;
END;
$$;

-- Older schemas' indexes: the original's on subscriber alone, and events.position's.
DROP INDEX IF EXISTS events_subscriber_idx;
DROP INDEX IF EXISTS events_subscriber_position_idx;

-- Committed rows that never got a position (the trigger was disabled or dropped for a while, or
-- rows were written with session_replication_role = replica): they reach no client until
-- schema.sql is applied again.
--   event_piper_unpositioned_count()     all of them (reads every event: for operators);
--   event_piper_unpositioned(after_id)   those with an id above after_id, and the id to pass next
--                                        time (the periodic check of earlier modules;
--                                        after_id 0 looks at the newest 100,000 ids). Its plan
--                                        scans all of event_positions (the argument is unknown
--                                        when a SQL function is planned): the module now counts
--                                        these rows itself, in bounded windows, on a connection
--                                        of its own (README, "Rows that never got a position").
CREATE OR REPLACE FUNCTION event_piper_unpositioned_count() RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT count(*) FROM events e
     WHERE NOT EXISTS (SELECT 1 FROM event_positions p WHERE p.event_id = e.id)
$$;

CREATE OR REPLACE FUNCTION event_piper_unpositioned(after_id bigint, OUT unpositioned bigint,
                                                    OUT next_after_id bigint)
LANGUAGE sql STABLE AS $$
    WITH newest AS (SELECT coalesce(max(id), 0) AS id FROM events),
         missing AS (
             SELECT e.id FROM events e
              WHERE e.id > CASE WHEN after_id > 0 THEN after_id
                                ELSE (SELECT id FROM newest) - 100000 END
                AND NOT EXISTS (SELECT 1 FROM event_positions p WHERE p.event_id = e.id))
    SELECT count(*), coalesce(min(id) - 1, (SELECT id FROM newest)) FROM missing
$$;

-- The trigger's WHEN clause (below) notes each inserted id in the transaction-local setting
-- event_piper.ids, with built-in functions, and is true for the transaction's first row only, so
-- that one firing at commit handles them all. Each append copies the list: once it reaches 2,000
-- bytes (about 250 ids) the clause calls this function instead, which sets the list aside as
-- event_piper.ids_<k> and begins a new one, so the cost per row stays small and constant in
-- transactions of any size. Settings made inside a savepoint are undone with it, like its rows.
CREATE OR REPLACE FUNCTION event_piper_note_insert(row_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    k int := coalesce(nullif(current_setting('event_piper.chunks', true), ''), '0')::int + 1;
    t text; -- set_config's answer (an assignment is cheaper than PERFORM)
BEGIN
    t := set_config('event_piper.ids_' || k, current_setting('event_piper.ids'), true);
    t := set_config('event_piper.chunks', k::text, true);
    t := set_config('event_piper.ids', row_id::text, true);
    RETURN false; -- the list was not empty: not the transaction's first row
END;
$$;

-- RFC 7396 JSON Merge Patch, in jsonb (numbers stay exact): a patch that is not an object
-- replaces the document (JSON `null`: a tombstone); an object's members replace, recursively
-- merge (objects) or remove (`null`) the target's members. A SQL NULL patch changes nothing.
CREATE OR REPLACE FUNCTION event_piper_merge_patch(target jsonb, patch jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF patch IS NULL THEN
        RETURN target;
    ELSIF jsonb_typeof(patch) <> 'object' THEN
        RETURN patch;
    ELSIF target IS NULL OR jsonb_typeof(target) <> 'object' THEN
        target := '{}';
    END IF;
    IF NOT jsonb_path_exists(patch, '$.* ? (@ == null || @.type() == "object")') THEN
        RETURN target || patch; -- the common case: no member to remove or merge deeper
    END IF;
    RETURN (target || coalesce((SELECT jsonb_object_agg(key,
                                         CASE WHEN jsonb_typeof(value) = 'object'
                                              THEN event_piper_merge_patch(target -> key, value)
                                              ELSE value END)
                                  FROM jsonb_each(patch) WHERE value <> 'null'), '{}'))
           - ARRAY(SELECT key FROM jsonb_each(patch) WHERE value = 'null');
END;
$$;

-- event_piper_fold(payload ORDER BY position): an event's payload with its patches applied in
-- order (the first row is taken as it is: the event's own nulls stay).
-- (PL/pgSQL with the common case inline: an aggregate calls its step through fmgr, where a SQL
-- function is not inlined and costs more than this; measured 4 times faster.)
CREATE OR REPLACE FUNCTION event_piper_fold_step(state jsonb, patch jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
BEGIN
    IF jsonb_typeof(patch) = 'object' AND jsonb_typeof(state) = 'object'
       AND NOT jsonb_path_exists(patch, '$.* ? (@ == null || @.type() == "object")') THEN
        RETURN state || patch;
    END IF;
    RETURN event_piper_merge_patch(state, patch);
END;
$$;
CREATE OR REPLACE AGGREGATE event_piper_fold(jsonb) (SFUNC = event_piper_fold_step, STYPE = jsonb);

-- The current state of the event at position `root`: its payload with every patch applied, in
-- position order (a compaction's stand-in is not a patch: its event is the root itself).
CREATE OR REPLACE FUNCTION event_piper_state(root bigint) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT event_piper_fold(payload ORDER BY position) FROM (
        SELECT p.position, e.payload FROM event_positions p JOIN events e ON e.id = p.event_id
         WHERE p.position = root
        UNION ALL
        SELECT p.position, e.payload FROM event_positions p JOIN events e ON e.id = p.event_id
         WHERE p.target = root AND e.patches IS NOT NULL) AS family
$$;

-- Checks the patch `patch_id` (at position `pos`, of `sub`) against the event it names and
-- returns that event's position: when the target is one of this transaction's rows `ids`
-- (positioned from `pos_first` in id order), its place among them, else the one in
-- event_positions. (Looked up per patch, never joined: a cached generic plan of a join of the
-- transaction's rows with themselves became a nested loop, quadratic in a 100,000-row insert.)
-- Refused: a target that does not exist (or is not visible: not committed yet), of another
-- subscriber, itself a patch (patches name the event they change; docs/patching.md), or without
-- a position. The target is locked FOR KEY SHARE
-- until commit, so that a concurrent DELETE of it waits (a patch never outlives its target by a
-- race); writers of other patches of it are not held.
CREATE OR REPLACE FUNCTION event_piper_patch_target(patch_id bigint, target_id bigint, sub text,
                                                    pos bigint, ids bigint[], pos_first bigint)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    tsub     text;
    tpatches bigint;
    tpos     bigint;
BEGIN
    SELECT subscriber, patches INTO tsub, tpatches FROM events WHERE id = target_id FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'event_piper: event % patches event %, which does not exist', patch_id,
            target_id USING ERRCODE = 'foreign_key_violation';
    ELSIF tsub IS DISTINCT FROM sub THEN
        RAISE EXCEPTION 'event_piper: event % patches event %, which belongs to another subscriber',
            patch_id, target_id USING ERRCODE = 'foreign_key_violation';
    ELSIF tpatches IS NOT NULL THEN
        RAISE EXCEPTION 'event_piper: event % patches event %, which is itself a patch: name the '
            'event it patches (%) instead', patch_id, target_id, tpatches
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF target_id = ANY (ids) THEN
        tpos := pos_first + (SELECT count(*) FROM events WHERE id = ANY (ids) AND id < target_id);
    ELSE
        SELECT min(position) INTO tpos FROM event_positions WHERE event_id = target_id;
    END IF;
    IF tpos IS NULL OR tpos >= pos THEN
        RAISE EXCEPTION 'event_piper: event % patches event %, which has no position before it',
            patch_id, target_id USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN tpos;
END;
$$;

-- Compaction: folds the patches at or below position `upto` (and, if `older_than` is given,
-- committed before it) into the events they patch, and deletes them; at most `max_events` events
-- per call, so that each call is a short transaction (CALL event_piper_compact_all for all of
-- them: it goes on from the last event of each batch, one transaction per batch). Per event, the
-- patches up to the newest one chosen, P, are folded into its payload, and P's position is kept
-- as a stand-in: an event_positions row for the event itself with target set, which replay sends
-- as the event's whole state ("state" frame). So a
-- client resuming from any position, even a deleted patch's, in full or folded replay, ends in
-- the same state as before (docs/patching.md). Locks: the patched events' rows FOR NO KEY
-- UPDATE, which writers' patches (FOR KEY SHARE at commit) do not wait for.
CREATE OR REPLACE FUNCTION event_piper_compact_batch(upto bigint, older_than timestamptz,
                                                     max_events int, after_target bigint,
                                                     OUT folded int, OUT last_target bigint)
LANGUAGE plpgsql AS $$
DECLARE
    r     record;
    rid   bigint;
    rsub  text;
    state jsonb;
    gone  bigint[];
BEGIN
    folded := 0;
    last_target := after_target;
    -- Events in position order of the event (`target`), after the previous batch's last one:
    -- each batch reads the partial index from where the previous one stopped.
    FOR r IN SELECT p.target AS root, max(p.position) AS last, max(p.committed_at) AS at
               FROM event_positions p JOIN events e ON e.id = p.event_id
              WHERE p.target > after_target AND p.position <= upto AND e.patches IS NOT NULL
                AND (older_than IS NULL OR p.committed_at < older_than)
              GROUP BY p.target ORDER BY p.target LIMIT max_events LOOP
        last_target := r.root;
        SELECT rp.event_id, rp.subscriber INTO rid, rsub
          FROM event_positions rp JOIN events e ON e.id = rp.event_id
         WHERE rp.position = r.root FOR NO KEY UPDATE OF e;
        CONTINUE WHEN NOT FOUND; -- the event was deleted: its patches are left alone
        SELECT event_piper_fold(payload ORDER BY position), array_agg(id) FILTER (WHERE is_patch)
          INTO state, gone
          FROM (SELECT p.position, e.id, e.payload, p.position <> r.root AS is_patch
                  FROM event_positions p JOIN events e ON e.id = p.event_id
                 WHERE p.position = r.root
                    OR (p.target = r.root AND p.position <= r.last AND e.patches IS NOT NULL)) f;
        UPDATE events SET payload = state WHERE id = rid;
        DELETE FROM events WHERE id = ANY (gone);
        -- Their positions: the delete trigger has removed them in trigger mode; in wal mode it is
        -- disabled, and the positioner would remove them only later, after the stand-in below
        -- has taken one of their positions.
        DELETE FROM event_positions WHERE event_id = ANY (gone);
        DELETE FROM event_positions WHERE target = r.root AND event_id = rid; -- older stand-in
        INSERT INTO event_positions (position, event_id, subscriber, committed_at, target)
            VALUES (r.last, rid, rsub, r.at, r.root);
        folded := folded + 1;
    END LOOP;
END;
$$;

CREATE OR REPLACE FUNCTION event_piper_compact(upto bigint, older_than timestamptz DEFAULT NULL,
                                               max_events int DEFAULT 1000)
RETURNS int LANGUAGE sql AS $$
    SELECT folded FROM event_piper_compact_batch(upto, older_than, max_events, 0)
$$;

-- The whole compaction, one transaction per batch (CALL it outside a transaction block).
CREATE OR REPLACE PROCEDURE event_piper_compact_all(upto bigint,
                                                    older_than timestamptz DEFAULT NULL,
                                                    max_events int DEFAULT 1000)
LANGUAGE plpgsql AS $$
DECLARE
    n     int;
    after bigint := 0;
    prev  bigint;
BEGIN
    LOOP
        prev := after;
        SELECT folded, last_target INTO n, after
          FROM event_piper_compact_batch(upto, older_than, max_events, after);
        EXIT WHEN after = prev; -- no event left after the previous batch's last
        COMMIT;
    END LOOP;
END;
$$;

-- The notification grammar's limits (docs/notification-grammar.md; the same constants in
-- src/core/grammar.hpp, checked against these by tests/integration/test_grammar.py). SQL
-- functions, IMMUTABLE: inlined where they are used, so they cost what a literal costs.
-- An "e" notification is shorter than this many bytes (NOTIFY refuses 8000 or more).
CREATE OR REPLACE FUNCTION event_piper_grammar_event_below() RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 7999';
-- The records of a "b" notification ("b\n" before them) hold at most this many bytes.
CREATE OR REPLACE FUNCTION event_piper_grammar_batch_records_max() RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 7997';
-- An event whose subscriber, type and payload hold more bytes than this goes alone, not in a "b".
CREATE OR REPLACE FUNCTION event_piper_grammar_batch_event_max() RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 7900';
-- A subscriber of this many bytes or more is never notified (see below).
CREATE OR REPLACE FUNCTION event_piper_grammar_subscriber_below() RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 7900';

-- Notification payload (one line of header, then raw bytes), parsed by src/core/notification.cpp
-- (the grammar in full: docs/notification-grammar.md):
--   "e <position> <subscriber bytes> <type bytes>\n<subscriber><type><payload as jsonb text>"
--     the whole event, when it fits in NOTIFY's 8000-byte limit;
--   "r <position> <subscriber bytes>\n<subscriber>"
--     a reference: the event is too large to notify, readers fetch it from the table;
--   "p <position>"
--     a bare position (rows given positions by this script). A row whose subscriber is too long
--     to name in a notification (7,900 bytes or more) is not notified at all: no request can
--     name such a consumer (ids are at most 256 bytes), and a bare position would send every
--     stream to the table for nothing;
--   "b\n" then "<position> <subscriber bytes> <type bytes> <payload bytes>\n<subscriber><type>
--   <payload>" per event (modules older than this form ignore these)
--     several events of one transaction, in position order, as many as fit in 7,999 bytes.
--   A patch (events.patches set) carries its target's position after the lengths:
--   "e <position> <subscriber bytes> <type bytes> <target position>\n..." and, in a batch,
--   "<position> <subscriber bytes> <type bytes> <payload bytes> <target position>\n...". Plain
--   events keep the forms above byte for byte; modules before patches ignore a notification with
--   a patch, and their listener's periodic check sends their streams to the table for it.
-- The table is the truth: a notification is a hint that something was committed.
-- STABLE, not IMMUTABLE: `text || bigint` is stable, and a SQL function is inlined (instead of
-- being parsed and planned again at every call) only if its body is no more volatile than it.
DROP FUNCTION IF EXISTS event_piper_message(bigint, text, text, text);
CREATE OR REPLACE FUNCTION event_piper_message(pos bigint, sub text, typ text, body text,
                                               tgt bigint)
RETURNS text LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN octet_length(sub) + octet_length(typ) + octet_length(body) + length(pos::text)
             + length(octet_length(sub)::text) + length(octet_length(typ)::text)
             + coalesce(length(tgt::text) + 1, 0) + 5 < event_piper_grammar_event_below()
            THEN 'e ' || pos || ' ' || octet_length(sub) || ' ' || octet_length(typ)
                 || coalesce(' ' || tgt, '') || E'\n' || sub || typ || body
        WHEN octet_length(sub) < event_piper_grammar_subscriber_below()
            THEN 'r ' || pos || ' ' || octet_length(sub) || E'\n' || sub
        ELSE 'p ' || pos
    END
$$;

-- Once this transaction's events were positioned and notified (SET CONSTRAINTS ... IMMEDIATE, or
-- a deferred trigger of the writer's that runs after ours at commit), their notifications are
-- queued as they were then: changing or deleting those rows would deliver a stale event, to the
-- old subscriber. Refused, like inserts after that point.
CREATE OR REPLACE FUNCTION event_piper_refuse_notified(ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    notified text := coalesce(current_setting('event_piper.last', true), '');
BEGIN
    IF notified <> '' AND EXISTS (
           SELECT 1 FROM event_positions
            WHERE event_id = ANY (ids)
              AND position BETWEEN split_part(notified, ':', 1)::bigint
                               AND coalesce(nullif(split_part(notified, ':', 2), ''),
                                            split_part(notified, ':', 1))::bigint) THEN
        RAISE EXCEPTION 'event_piper: events of this transaction were already notified '
            '(SET CONSTRAINTS ... IMMEDIATE): they cannot be changed or deleted any more in it; '
            'change them before, or in another transaction';
    END IF;
END;
$$;

-- The rows of this transaction changed or deleted since their INSERT are read again at commit;
-- otherwise a lone row is taken as inserted (the trigger's NEW), without reading it again. This
-- notes, per transaction, that events were updated or deleted; and keeps event_positions in step
-- with events changed or deleted after their commit (retention deletes, a subscriber corrected).
CREATE OR REPLACE FUNCTION event_piper_events_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    t text;
BEGIN
    IF coalesce(current_setting('event_piper.last', true), '') <> '' THEN
        PERFORM event_piper_refuse_notified(ARRAY(SELECT id FROM new_rows));
    END IF;
    t := set_config('event_piper.touched', 'on', true);
    -- `= ANY (ARRAY(...))`: an index scan of event_positions whatever the cached plan guessed.
    UPDATE event_positions p SET subscriber = n.subscriber
      FROM new_rows n
     WHERE p.event_id = ANY (ARRAY(SELECT id FROM new_rows))
       AND p.event_id = n.id AND p.subscriber IS DISTINCT FROM n.subscriber;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION event_piper_events_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    t text;
BEGIN
    IF coalesce(current_setting('event_piper.last', true), '') <> '' THEN
        PERFORM event_piper_refuse_notified(ARRAY(SELECT id FROM old_rows));
    END IF;
    t := set_config('event_piper.touched', 'on', true);
    DELETE FROM event_positions WHERE event_id = ANY (ARRAY(SELECT id FROM old_rows));
    RETURN NULL;
END;
$$;

-- One event of a "b" batch (see above): "<position> <subscriber bytes> <type bytes> <payload
-- bytes>\n<subscriber><type><payload>". STABLE, so inlined like event_piper_message.
DROP FUNCTION IF EXISTS event_piper_batch_record(bigint, text, text, text);
CREATE OR REPLACE FUNCTION event_piper_batch_record(pos bigint, sub text, typ text, body text,
                                                    tgt bigint)
RETURNS text LANGUAGE sql STABLE AS $$
    SELECT pos || ' ' || octet_length(sub) || ' ' || octet_length(typ) || ' '
           || octet_length(body) || coalesce(' ' || tgt, '') || E'\n' || sub || typ || body
$$;

-- Runs at COMMIT (deferred), once per transaction (see event_piper_note_insert). Its
-- notifications: docs/notification-grammar.md.
CREATE OR REPLACE FUNCTION events_commit_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    noted     text := current_setting('event_piper.ids');
    chunks    text := current_setting('event_piper.chunks', true);
    ids       bigint[];
    n         bigint;
    pos_first bigint;
    pos_last  bigint;
    held      boolean := false;
    r         record;
    size      int;
    rec       text;
    buf       text := '';
    lone      text; -- the notification of the batch's only event, in the one-event format
    sub1      text;
    typ1      text;
    body1     text;
    shortest  int;  -- the shortest subscriber of a batch (none under 7,900 bytes: no NOTIFY)
    tgt1      bigint; -- the patched event's position (NULL: a plain event)
    t         text; -- answers of void functions (an assignment is cheaper than PERFORM)
    -- The channel: `new_events` unless the setting event_piper.channel names another one
    -- (ALTER DATABASE ... SET event_piper.channel = '...'), to match event_piper_channel.
    chan text := coalesce(nullif(current_setting('event_piper.channel', true), ''), 'new_events');
BEGIN
    IF coalesce(current_setting('event_piper.last', true), '') <> '' THEN
        -- This transaction's rows were positioned already (SET CONSTRAINTS ... IMMEDIATE): later
        -- rows could only be ordered after writers that now wait for this transaction.
        RAISE EXCEPTION 'event_piper: events inserted after the transaction''s deferred '
            'constraints were checked (SET CONSTRAINTS ... IMMEDIATE) cannot be ordered; '
            'insert them before, or in another transaction';
    END IF;
    -- Two-phase commit: a prepared transaction would keep its place in the commit order, and
    -- every later event writer would wait in COMMIT until COMMIT or ROLLBACK PREPARED, however
    -- long. Refused here with a clear message when the statement is a PREPARE TRANSACTION (its
    -- first 7 bytes, then a pattern for those few: well under a microsecond); in any other form
    -- (after a comment, in a multi-statement string), by the NOTIFY that every such transaction
    -- sends (see the end of step 2), with PostgreSQL's message.
    IF upper(left(current_query(), 7)) = 'PREPARE'
       AND current_query() ~* '^prepare\s+transaction\M' THEN
        RAISE EXCEPTION 'event_piper: a transaction that inserts events cannot be prepared '
            '(PREPARE TRANSACTION): it would hold back every later event writer until it is '
            'committed or rolled back; insert events in a transaction of its own'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    -- The transaction's rows: the noted ids, with the lists set aside.
    IF coalesce(chunks, '') <> '' THEN
        SELECT string_to_array(string_agg(current_setting('event_piper.ids_' || k), ',')
                               || ',' || noted, ',')::bigint[]
          INTO ids
          FROM generate_series(1, chunks::int) AS k;
        n := cardinality(ids);
    ELSIF strpos(noted, ',') = 0 THEN
        n := 1; -- the common case: one row (NEW)
    ELSE
        ids := string_to_array(noted, ',')::bigint[];
        n := cardinality(ids);
    END IF;
    -- 1. Reserve [pos_first, pos_last]; name the commit-order lock after its end.
    BEGIN
        t := pg_advisory_lock(7402652111030151173)::text;
        held := true;
        pos_first := nextval('events_position_seq');
        pos_last := event_piper_nth_position(pos_first, n);
        IF pos_last > pos_first THEN
            t := setval('events_position_seq', pos_last)::text;
        END IF;
        t := pg_advisory_xact_lock(1885958245, event_piper_position_lock_key(pos_last))::text;
        t := pg_advisory_unlock(7402652111030151173)::text;
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        IF held THEN
            t := pg_advisory_unlock(7402652111030151173)::text;
        END IF;
        RAISE;
    END;
    -- 2. Positions in id order, notifications from the rows as committed (a row may have been
    --    changed since its INSERT; one deleted again has no row and leaves its position unused).
    --    As few notifications as fit: a batch "b\n<event><event>..." of up to 7,999 bytes, or
    --    "e ..." for a lone event, "r ..."/"p ..." for one too large to notify.
    IF n = 1 THEN -- the common case, without the batch machinery
        IF current_setting('event_piper.touched', true) = 'on' THEN
            SELECT subscriber, type, payload::text, patches INTO sub1, typ1, body1, tgt1
              FROM events WHERE id = NEW.id;
        ELSE
            sub1 := NEW.subscriber;
            typ1 := NEW.type;
            body1 := NEW.payload::text;
            tgt1 := NEW.patches;
        END IF;
        IF tgt1 IS NOT NULL THEN
            tgt1 := event_piper_patch_target(NEW.id, tgt1, sub1, pos_first, NULL, NULL);
        END IF;
        IF sub1 IS NOT NULL THEN
            INSERT INTO event_positions (position, event_id, subscriber, target)
                VALUES (pos_first, NEW.id, sub1, tgt1);
            IF octet_length(sub1) < event_piper_grammar_subscriber_below() THEN
                t := pg_notify(chan, event_piper_message(pos_first, sub1, typ1, body1,
                                                         tgt1))::text;
            END IF;
        END IF;
    ELSE
        -- Positions in id order (the order of the INSERTs). One statement writes
        -- them and, when the events fit in one notification (the common case: a few small
        -- events), builds it.
        -- (Plans of PL/pgSQL statements are cached, made once while the table may still be
        -- small: `id = ANY (ids)` stays an index scan whatever the statistics said then; a join
        -- with unnest(ids) became a sequential scan of events.)
        -- A patch's target is checked, and its position found (it may be one of ours).
        WITH mine AS (
                 SELECT position, id, sub, typ, body,
                        CASE WHEN patches IS NOT NULL THEN event_piper_patch_target(
                            id, patches, sub, position, ids, pos_first) END AS tgt
                   FROM (SELECT event_piper_nth_position(pos_first,
                                                         row_number() OVER (ORDER BY id))
                                    AS position, id,
                                subscriber::text AS sub, type::text AS typ,
                                payload::text AS body, patches
                           FROM events WHERE id = ANY (ids)) AS ordered),
             ins AS (
                 INSERT INTO event_positions (position, event_id, subscriber, target)
                 SELECT position, id, sub, tgt FROM mine)
        SELECT count(*),
               max(octet_length(sub) + octet_length(typ) + octet_length(body)),
               string_agg(event_piper_batch_record(position, sub, typ, body, tgt), ''
                          ORDER BY position),
               min(octet_length(sub))
          INTO n, size, buf, shortest
          FROM mine;
        IF n > 1 AND size <= event_piper_grammar_batch_event_max()
           AND octet_length(buf) <= event_piper_grammar_batch_records_max() THEN
            t := pg_notify(chan, E'b\n' || buf)::text;
        ELSIF n > 0 THEN
            -- Several notifications (or a lone event): as few as fit, in position order.
            buf := '';
            FOR r IN SELECT event_piper_nth_position(pos_first, row_number() OVER (ORDER BY id))
                                AS position,
                            subscriber::text AS sub, type::text AS typ, payload::text AS body,
                            -- (by event_id alone: a cached plan chose a position range
                            -- scan per row for a BETWEEN here, quadratic in large inserts)
                            (SELECT p.target FROM event_positions p
                              WHERE p.event_id = events.id LIMIT 1) AS tgt
                       FROM events WHERE id = ANY (ids) ORDER BY id LOOP
                size := octet_length(r.sub) + octet_length(r.typ) + octet_length(r.body);
                IF size <= event_piper_grammar_batch_event_max() THEN
                    rec := event_piper_batch_record(r.position, r.sub, r.typ, r.body, r.tgt);
                END IF;
                -- Flush the batch when this event does not fit in it (or goes alone).
                IF buf <> '' AND (size > event_piper_grammar_batch_event_max()
                                  OR octet_length(buf) + octet_length(rec)
                                     > event_piper_grammar_batch_records_max()) THEN
                    t := pg_notify(chan, CASE WHEN lone IS NOT NULL THEN lone
                                              ELSE E'b\n' || buf END)::text;
                    buf := '';
                END IF;
                IF size > event_piper_grammar_batch_event_max() THEN
                    IF octet_length(r.sub) < event_piper_grammar_subscriber_below() THEN
                        t := pg_notify(chan, event_piper_message(r.position, r.sub, r.typ,
                                                                 r.body, r.tgt))::text;
                    END IF;
                    CONTINUE;
                END IF;
                lone := CASE WHEN buf = ''
                             THEN event_piper_message(r.position, r.sub, r.typ, r.body,
                                                      r.tgt) END;
                buf := buf || rec;
            END LOOP;
            IF buf <> '' THEN
                t := pg_notify(chan, CASE WHEN lone IS NOT NULL THEN lone
                                          ELSE E'b\n' || buf END)::text;
            END IF;
        END IF;
    END IF;
    -- Nothing was notified (the rows were deleted again, or their subscribers are too long to
    -- name): NOTIFY anyway, on a channel nobody listens to, so that PREPARE TRANSACTION refuses
    -- this transaction like every other that reserved positions (PostgreSQL cannot prepare a
    -- transaction that notified).
    IF coalesce(octet_length(sub1), shortest, event_piper_grammar_subscriber_below())
       >= event_piper_grammar_subscriber_below() THEN
        t := pg_notify('event_piper_unprepared', '')::text;
    END IF;
    -- 3. Wait until every smaller position is visible or rolled back: the transaction that
    --    reserved pos_first - 1 holds this lock until it is visible.
    t := pg_advisory_xact_lock_shared(1885958245,
                                      event_piper_position_lock_key(pos_first - 1))::text;
    -- Done. A later round (SET CONSTRAINTS ... IMMEDIATE, then more inserts) is refused above.
    t := set_config('event_piper.ids', '', true);
    t := set_config('event_piper.chunks', '', true);
    -- The range this transaction notified (the statement triggers below refuse to change or
    -- delete those rows afterwards).
    t := set_config('event_piper.last', pos_first::text || ':' || pos_last::text, true);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS events_notify ON events;
DROP TRIGGER IF EXISTS events_commit_notify ON events;
CREATE CONSTRAINT TRIGGER events_commit_notify
    AFTER INSERT ON events
    DEFERRABLE INITIALLY DEFERRED
    -- True for the transaction's first row only. Built-in functions while the id list is short
    -- (a trigger condition is not planned: a function of ours would be called, not inlined);
    -- event_piper_note_insert sets long lists aside. The condition is read from the catalog and
    -- prepared again for every INSERT statement, so it stays small and calls no SQL function:
    -- `text || NEW.id` would be `text || anynonarray`, a SQL function whose body PostgreSQL
    -- parses again each time (measured: 18 us of every single-row transaction); `NEW.id::text`
    -- makes it the built-in `text || text`.
    FOR EACH ROW WHEN (
        CASE WHEN octet_length(coalesce(current_setting('event_piper.ids', true), '')) < 2000
             THEN octet_length(set_config('event_piper.ids',
                                          coalesce(nullif(current_setting('event_piper.ids', true),
                                                          '') || ',', '') || NEW.id::text,
                                          true)) = octet_length(NEW.id::text)
             ELSE event_piper_note_insert(NEW.id) END)
    EXECUTE FUNCTION events_commit_notify();

DROP TRIGGER IF EXISTS events_updated ON events;
CREATE TRIGGER events_updated
    AFTER UPDATE ON events REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION event_piper_events_updated();
DROP TRIGGER IF EXISTS events_deleted ON events;
CREATE TRIGGER events_deleted
    AFTER DELETE ON events REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION event_piper_events_deleted();

-- TRUNCATE events empties event_positions too (positions go on from where they were).
CREATE OR REPLACE FUNCTION event_piper_events_truncated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('event_piper.last', true), '') <> '' THEN
        RAISE EXCEPTION 'event_piper: events of this transaction were already notified '
            '(SET CONSTRAINTS ... IMMEDIATE): events cannot be truncated any more in it';
    END IF;
    TRUNCATE event_positions;
    RETURN NULL;
END;
$$;
DROP TRIGGER IF EXISTS events_truncated ON events;
CREATE TRIGGER events_truncated
    AFTER TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION event_piper_events_truncated();

-- An event's id is what its position points to (and what its own transaction noted for the
-- commit-time trigger): a changed id would leave the event without a position, out of every
-- replay, unreported. Refused; insert a new event instead. Only updates that set `id` fire this.
CREATE OR REPLACE FUNCTION event_piper_refuse_id_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'event_piper: the id of an event cannot change (event %): its position '
        'refers to it; insert a new event instead', OLD.id
        USING ERRCODE = 'feature_not_supported';
END;
$$;
DROP TRIGGER IF EXISTS events_id_unchanged ON events;
CREATE TRIGGER events_id_unchanged
    BEFORE UPDATE OF id ON events
    FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION event_piper_refuse_id_change();

-- Grants. The trigger functions run as their owner (the role that applied this script first:
-- make it the owner of `events`, not a superuser), with a fixed search_path (this schema, then
-- pg_temp, so that no temporary table of the writer's can stand in for ours). A writer then needs
-- only what its own statements need: INSERT on events and USAGE on events_id_seq to insert;
-- UPDATE, DELETE (with SELECT for a WHERE clause) or TRUNCATE on events to change them. It needs
-- nothing on event_positions or events_position_seq, so it cannot forge, move or delete
-- positions, nor set the position sequence back. Set after every CREATE OR REPLACE above, which
-- resets them.
DO $$
DECLARE
    f text;
    home text := (SELECT relnamespace::regnamespace::text FROM pg_class
                   WHERE oid = to_regclass('events'));
BEGIN
    FOREACH f IN ARRAY ARRAY['events_commit_notify()', 'event_piper_events_updated()',
                             'event_piper_events_deleted()', 'event_piper_events_truncated()']
    LOOP
        EXECUTE format('ALTER FUNCTION %s.%s SECURITY DEFINER SET search_path = %s, pg_temp',
                       home, f, home);
    END LOOP;
END;
$$;

-- ---- event_piper_source wal (postgresql/wal.sql, docs/wal-source.md) ------------------------
-- A database switched to wal mode gives positions with the positioner: the triggers created
-- above stay disabled (applied again in wal mode, this file must not bring them back).
DO $$
DECLARE
    src text;
BEGIN
    IF to_regclass('event_piper_wal_progress') IS NOT NULL THEN
        EXECUTE 'SELECT source FROM event_piper_wal_progress WHERE id = 1' INTO src;
        IF src = 'wal' THEN
            ALTER TABLE events DISABLE TRIGGER events_commit_notify,
                DISABLE TRIGGER events_updated, DISABLE TRIGGER events_deleted,
                DISABLE TRIGGER events_truncated;
        END IF;
    END IF;
END;
$$;
-- ---- end of event_piper_source wal ----------------------------------------------------------

-- The schema's version, read by the module once per listening connection (README "Upgrades").
--   1  the schema of c28232f, which has no such function;
--   2  writers' rules: definer trigger functions, PREPARE TRANSACTION and id changes refused,
--      reserved types (never released alone);
--   3  patches: events.patches, event_positions.target, the patch notification forms, folding.
-- A change that a module must know of raises it; a module works against its own version and the
-- earlier ones, and each version keeps what the earlier modules read working, so that module and
-- schema can be upgraded in either order. Created last: a module that reads this version finds
-- everything above in place, also when this file is applied statement by statement.
CREATE OR REPLACE FUNCTION event_piper_schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 3';
