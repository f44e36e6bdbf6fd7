-- The schema of ngx_event_piper 5baac6e (positions in events.position, one commit-time firing
-- per transaction), kept verbatim below this header to test the upgrade to postgresql/schema.sql.
-- ngx_event_piper schema: the events table (the log), its indexes and the commit-ordered
-- notification trigger. Safe to apply more than once, also while writers insert, provided it is
-- applied in one transaction:  psql --single-transaction -f postgresql/schema.sql
--
-- Delivery order is commit order, not id order. A BIGSERIAL id is taken at INSERT, but
-- transactions commit in any order: a reader that saw id 6 and resumes "after 6" would never see
-- id 5 if 5 committed later. So each row also gets a `position`, assigned at COMMIT by a deferred
-- constraint trigger, such that positions become visible strictly in increasing order: once a
-- reader sees position p, no position below p can appear later.
--
-- How, cheaply (issue 11). The trigger runs once per transaction, not once per row: its WHEN
-- clause notes each inserted id in a transaction-local setting and queues only the first row;
-- at commit that one firing
--   1. reserves one contiguous range of positions for all of the transaction's rows (a few
--      microseconds under a session-level advisory lock) and takes a transaction-level advisory
--      lock named after the last position of the range, which it holds until it is visible;
--   2. writes the positions with one UPDATE and queues the notifications, built from the rows as
--      committed (UPDATE ... RETURNING), in position order, several events per notification;
--   3. waits for the lock named after the position just below its range: the transaction that
--      reserved it is then visible (or rolled back), and so, by induction, is every smaller one.
-- Only step 3 and the commit itself are serialised, in position order. NOTIFY already serialises
-- notifying commits (a cluster-wide lock held through the commit record's flush), so the chain
-- adds no new bottleneck, and the work of steps 1-2 runs in parallel with other commits.
-- Rolled-back transactions release their locks without a visible row; a reserved position whose
-- row was deleted again by its own transaction stays unused (positions may have gaps).
-- The SSE `id:` field and Last-Event-ID are positions. With one writer at a time, position equals
-- id; the original service's rows keep position = id (see the migration below).

-- Rows of the original service's table (no position column yet) keep their ids as positions, so
-- its clients resume with the Last-Event-ID they hold. Decided before the column exists.
SELECT set_config('event_piper.from_original',
                  CASE WHEN to_regclass('events') IS NOT NULL
                        AND NOT EXISTS (SELECT 1 FROM pg_attribute
                                         WHERE attrelid = to_regclass('events')
                                           AND attname = 'position' AND NOT attisdropped)
                       THEN 'on' ELSE 'off' END, true);

CREATE TABLE IF NOT EXISTS events (
    id         BIGSERIAL PRIMARY KEY,
    type       varchar   NOT NULL,
    timestamp  timestamp NOT NULL,
    subscriber varchar   NOT NULL,
    payload    jsonb     NOT NULL,
    position   bigint    UNIQUE,
    -- When the position was assigned (the database's clock, at commit). Lets a stream opened
    -- while the database was unreachable start exactly after what was committed before it.
    committed_at timestamptz,
    -- A line break in a type would end the SSE `event:` field early and let a writer inject fields.
    CONSTRAINT events_type_single_line CHECK (type !~ '[\r\n]')
);

-- Tables created by the original service or an older schema get the new columns. The first ALTER
-- waits for the writers in flight and holds the others back until this transaction commits.
ALTER TABLE events ADD COLUMN IF NOT EXISTS position bigint UNIQUE;
ALTER TABLE events ADD COLUMN IF NOT EXISTS committed_at timestamptz;

CREATE SEQUENCE IF NOT EXISTS events_position_seq OWNED BY events.position;

-- Rows without a position: the original service's rows get position = id, and new positions
-- continue above every id it ever handed out. Rows committed while the trigger was missing (an
-- older schema, a disabled trigger) get positions above the newest one, in id order. No writer is
-- in flight here (the ALTER TABLE above holds them back), so nothing else assigns positions.
DO $$
DECLARE
    r record;
    above bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'events_type_single_line') THEN
        ALTER TABLE events ADD CONSTRAINT events_type_single_line CHECK (type !~ '[\r\n]');
    END IF;
    IF current_setting('event_piper.from_original') = 'on' THEN
        UPDATE events SET position = id, committed_at = clock_timestamp() WHERE position IS NULL;
        SELECT greatest(max(id), (SELECT CASE WHEN is_called THEN last_value END
                                    FROM events_id_seq))
          INTO above FROM events;
        IF above IS NOT NULL THEN
            PERFORM setval('events_position_seq', above);
            PERFORM pg_notify(coalesce(nullif(current_setting('event_piper.channel', true), ''),
                                       'new_events'), 'p ' || above);
        END IF;
    ELSIF EXISTS (SELECT 1 FROM events WHERE position IS NULL) THEN
        FOR r IN SELECT id FROM events WHERE position IS NULL ORDER BY id LOOP
            UPDATE events SET position = nextval('events_position_seq'),
                              committed_at = clock_timestamp()
             WHERE id = r.id;
        END LOOP;
        -- A bare position: every open stream reads the table for what it has not sent.
        PERFORM pg_notify(coalesce(nullif(current_setting('event_piper.channel', true), ''),
                                   'new_events'),
                          'p ' || currval('events_position_seq'));
    END IF;
END;
$$;

-- Replay reads "subscriber = $1 AND position > $2 ORDER BY position LIMIT n": one index range scan.
CREATE INDEX IF NOT EXISTS events_subscriber_position_idx ON events (subscriber, position);

-- The original's index on subscriber alone is covered by the one above.
DROP INDEX IF EXISTS events_subscriber_idx;

-- Committed rows that never got a position (the trigger was disabled or dropped for a while):
-- they reach no client until schema.sql is applied again. Counted from the NULL end of the
-- position index (an index-only range scan, no table scan), so it can run every few seconds.
CREATE OR REPLACE FUNCTION event_piper_unpositioned_count() RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT count(*) FROM events WHERE position IS NULL
$$;

-- The advisory locks, in their own key spaces: the session-level lock that makes a range
-- reservation atomic (the same bigint key older schemas used), and the two-int4 locks
-- (1885958245, low 32 bits of a position) that order commits.
CREATE OR REPLACE FUNCTION event_piper_position_lock_key(pos bigint) RETURNS int
LANGUAGE sql IMMUTABLE AS $$
    SELECT ((pos % 4294967296) - 2147483648)::int
$$;

-- The WHEN clause of the trigger, at INSERT time, once per row: notes the row's id in the
-- transaction-local setting event_piper.ids and answers true only for the transaction's first
-- row, so that one firing at commit handles them all. Each append copies the list, so a list of
-- 2,000 bytes (about 250 ids) is set aside as event_piper.ids_<k> and a new one begun: the cost
-- per row stays small and constant in transactions of any size. (PL/pgSQL keeps its compiled
-- form per session; a SQL function in a trigger's WHEN clause would be parsed and planned again
-- for every INSERT statement.) Settings made inside a savepoint are undone with it, like its
-- rows.
CREATE OR REPLACE FUNCTION event_piper_note_insert(row_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    ids text := current_setting('event_piper.ids', true);
    k   int;
    t   text; -- set_config's answer (an assignment is cheaper than PERFORM)
BEGIN
    IF ids IS NULL OR ids = '' THEN
        t := set_config('event_piper.ids', row_id::text, true);
        RETURN true;
    ELSIF octet_length(ids) < 2000 THEN
        t := set_config('event_piper.ids', ids || ',' || row_id, true);
        RETURN false;
    END IF;
    k := coalesce(nullif(current_setting('event_piper.chunks', true), ''), '0')::int + 1;
    t := set_config('event_piper.ids_' || k, ids, true);
    t := set_config('event_piper.chunks', k::text, true);
    t := set_config('event_piper.ids', row_id::text, true);
    RETURN false;
END;
$$;

-- Notification payload (one line of header, then raw bytes), parsed by src/core/notification.cpp:
--   "e <position> <subscriber bytes> <type bytes>\n<subscriber><type><payload as jsonb text>"
--     the whole event, when it fits in NOTIFY's 8000-byte limit;
--   "r <position> <subscriber bytes>\n<subscriber>"
--     a reference: the event is too large to notify, readers fetch it from the table;
--   "p <position>"
--     a bare position (rows given positions by this script). A row whose subscriber is too long
--     to name in a notification (7,900 bytes or more) is not notified at all: no request can
--     name such a consumer (ids are at most 256 bytes), and a bare position would send every
--     stream to the table for nothing (issue 9, item 8);
--   "b\n" then "<position> <subscriber bytes> <type bytes> <payload bytes>\n<subscriber><type>
--   <payload>" per event (since issue 11; modules before it ignore these)
--     several events of one transaction, in position order, as many as fit in 7,999 bytes.
-- The table is the truth: a notification is a hint that something was committed.
-- STABLE, not IMMUTABLE: `text || bigint` is stable, and a SQL function is inlined (instead of
-- being parsed and planned again at every call) only if its body is no more volatile than it.
CREATE OR REPLACE FUNCTION event_piper_message(pos bigint, sub text, typ text, body text)
RETURNS text LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN octet_length(sub) + octet_length(typ) + octet_length(body) + length(pos::text)
             + length(octet_length(sub)::text) + length(octet_length(typ)::text) + 5 < 7999
            THEN 'e ' || pos || ' ' || octet_length(sub) || ' ' || octet_length(typ) || E'\n'
                 || sub || typ || body
        WHEN octet_length(sub) < 7900 THEN 'r ' || pos || ' ' || octet_length(sub) || E'\n' || sub
        ELSE 'p ' || pos
    END
$$;

-- Runs at COMMIT (deferred), once per transaction (see event_piper_note_insert).
CREATE OR REPLACE FUNCTION events_commit_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ids       bigint[];
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
    -- The transaction's rows: the noted ids, with the lists set aside.
    IF coalesce(current_setting('event_piper.chunks', true), '') = '' THEN
        ids := string_to_array(current_setting('event_piper.ids'), ',')::bigint[];
    ELSE
        SELECT string_to_array(string_agg(current_setting('event_piper.ids_' || k), ',')
                               || ',' || current_setting('event_piper.ids'), ',')::bigint[]
          INTO ids
          FROM generate_series(1, current_setting('event_piper.chunks')::int) AS k;
    END IF;
    -- 1. Reserve [pos_first, pos_last]; name the commit-order lock after its end.
    BEGIN
        PERFORM pg_advisory_lock(7402652111030151173);
        held := true;
        pos_first := nextval('events_position_seq');
        pos_last := pos_first + cardinality(ids) - 1;
        IF pos_last > pos_first THEN
            PERFORM setval('events_position_seq', pos_last);
        END IF;
        PERFORM pg_advisory_xact_lock(1885958245, event_piper_position_lock_key(pos_last));
        PERFORM pg_advisory_unlock(7402652111030151173);
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        IF held THEN
            PERFORM pg_advisory_unlock(7402652111030151173);
        END IF;
        RAISE;
    END;
    -- 2. Positions in id order, notifications from the rows as committed (a row may have been
    --    changed since its INSERT; one deleted again has no row and leaves its position unused).
    --    As few notifications as fit: a batch "b\n<event><event>..." of up to 7,999 bytes, or
    --    "e ..." for a lone event, "r ..."/"p ..." for one too large to notify.
    IF cardinality(ids) = 1 THEN -- the common case, without the batch machinery
        UPDATE events SET position = pos_first, committed_at = clock_timestamp()
         WHERE id = ids[1]
        RETURNING subscriber, type, payload::text INTO sub1, typ1, body1;
        IF FOUND AND octet_length(sub1) < 7900 THEN
            PERFORM pg_notify(chan, event_piper_message(pos_first, sub1, typ1, body1));
        END IF;
    ELSE
        FOR r IN WITH mine AS (
                     SELECT id, pos_first + row_number() OVER (ORDER BY id) - 1 AS pos
                       FROM events WHERE id = ANY (ids)),
                 upd AS (
                     UPDATE events e SET position = mine.pos, committed_at = clock_timestamp()
                       FROM mine WHERE e.id = mine.id
                     RETURNING e.position, e.subscriber::text AS sub, e.type::text AS typ,
                               e.payload::text AS body)
                 SELECT * FROM upd ORDER BY position LOOP
            size := octet_length(r.sub) + octet_length(r.typ) + octet_length(r.body);
            IF size <= 7900 THEN
                rec := r.position || ' ' || octet_length(r.sub) || ' ' || octet_length(r.typ)
                       || ' ' || octet_length(r.body) || E'\n' || r.sub || r.typ || r.body;
            END IF;
            -- Flush the batch when this event does not fit in it (or goes alone): in order.
            IF buf <> '' AND (size > 7900 OR octet_length(buf) + octet_length(rec) > 7997) THEN
                PERFORM pg_notify(chan, CASE WHEN lone IS NOT NULL THEN lone
                                             ELSE E'b\n' || buf END);
                buf := '';
            END IF;
            IF size > 7900 THEN
                IF octet_length(r.sub) < 7900 THEN
                    PERFORM pg_notify(chan, event_piper_message(r.position, r.sub, r.typ,
                                                                r.body));
                END IF;
                CONTINUE;
            END IF;
            lone := CASE WHEN buf = ''
                         THEN event_piper_message(r.position, r.sub, r.typ, r.body) END;
            buf := buf || rec;
        END LOOP;
        IF buf <> '' THEN
            PERFORM pg_notify(chan, CASE WHEN lone IS NOT NULL THEN lone ELSE E'b\n' || buf END);
        END IF;
    END IF;
    -- 3. Wait until every smaller position is visible or rolled back: the transaction that
    --    reserved pos_first - 1 holds this lock until it is visible.
    PERFORM pg_advisory_xact_lock_shared(1885958245, event_piper_position_lock_key(pos_first - 1));
    -- Done. A later round (SET CONSTRAINTS ... IMMEDIATE, then more inserts) is refused above.
    PERFORM set_config('event_piper.ids', '', true), set_config('event_piper.chunks', '', true),
            set_config('event_piper.last', pos_last::text, true);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS events_notify ON events;
DROP TRIGGER IF EXISTS events_commit_notify ON events;
CREATE CONSTRAINT TRIGGER events_commit_notify
    AFTER INSERT ON events
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (event_piper_note_insert(NEW.id))
    EXECUTE FUNCTION events_commit_notify();
