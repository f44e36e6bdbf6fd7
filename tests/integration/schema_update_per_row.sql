-- ngx_event_piper schema: the events table (the log), its indexes and the commit-ordered
-- notification trigger. Safe to apply more than once, also while writers insert, provided it is
-- applied in one transaction:  psql --single-transaction -f postgresql/schema.sql
--
-- Delivery order is commit order, not id order. A BIGSERIAL id is taken at INSERT, but
-- transactions commit in any order: a reader that saw id 6 and resumes "after 6" would never see
-- id 5 if 5 committed later. So each row also gets a `position`, assigned at COMMIT by a deferred
-- constraint trigger that first takes a transaction-level advisory lock. The lock is held until
-- the transaction is visible, so positions become visible strictly in increasing order: once a
-- reader sees position p, no position below p can appear later. NOTIFY already serialises
-- notifying commits on a global lock, so the extra serialisation costs little.
-- The SSE `id:` field and Last-Event-ID are positions. With one writer at a time, position equals id.

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

-- Tables created by the original service or an older schema get the new columns.
ALTER TABLE events ADD COLUMN IF NOT EXISTS position bigint UNIQUE;
ALTER TABLE events ADD COLUMN IF NOT EXISTS committed_at timestamptz;

CREATE SEQUENCE IF NOT EXISTS events_position_seq OWNED BY events.position;

-- Rows written before this schema (the original service's table) get positions in id order,
-- under the same lock as the trigger below, and the single-line type check.
DO $$
DECLARE
    r record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'events_type_single_line') THEN
        ALTER TABLE events ADD CONSTRAINT events_type_single_line CHECK (type !~ '[\r\n]');
    END IF;
    IF EXISTS (SELECT 1 FROM events WHERE position IS NULL) THEN
        PERFORM pg_advisory_xact_lock(7402652111030151173);
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

-- Runs at COMMIT (deferred), once per inserted row.
--
-- Notification payload (one line of header, then raw bytes), parsed by src/notification.cpp:
--   "e <position> <subscriber bytes> <type bytes>\n<subscriber><type><payload as jsonb text>"
--     the whole event, when it fits in NOTIFY's 8000-byte limit;
--   "r <position> <subscriber bytes>\n<subscriber>"
--     a reference: the event is too large to notify, readers fetch it from the table;
--   "p <position>"
--     a bare position, for subscribers too long to name in a notification.
-- The table is the truth: a notification is a hint that something was committed.
CREATE OR REPLACE FUNCTION events_commit_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    pos  bigint;
    sub  text;
    typ  text;
    body text;
    msg  text;
    -- The channel: `new_events` unless the setting event_piper.channel names another one
    -- (ALTER DATABASE ... SET event_piper.channel = '...'), to match event_piper_channel.
    chan text := coalesce(nullif(current_setting('event_piper.channel', true), ''), 'new_events');
BEGIN
    -- Serialise committing writers until each is visible: positions become visible in order.
    PERFORM pg_advisory_xact_lock(7402652111030151173);
    pos := nextval('events_position_seq');
    -- The notification is built from the row as it is committed (RETURNING), never from NEW:
    -- NEW is the INSERT's image, and the transaction may have changed the row since (another
    -- subscriber, type or payload). Replay reads the committed row; live delivery must match it.
    UPDATE events SET position = pos, committed_at = clock_timestamp() WHERE id = NEW.id
        RETURNING subscriber, type, payload::text INTO sub, typ, body;
    IF NOT FOUND THEN
        RETURN NULL; -- deleted again by its own transaction
    END IF;
    msg := 'e ' || pos || ' ' || octet_length(sub) || ' ' || octet_length(typ)
           || E'\n' || sub || typ || body;
    IF octet_length(msg) >= 7999 THEN
        IF octet_length(sub) < 7900 THEN
            msg := 'r ' || pos || ' ' || octet_length(sub) || E'\n' || sub;
        ELSE
            msg := 'p ' || pos;
        END IF;
    END IF;
    PERFORM pg_notify(chan, msg);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS events_notify ON events;
DROP TRIGGER IF EXISTS events_commit_notify ON events;
CREATE CONSTRAINT TRIGGER events_commit_notify
    AFTER INSERT ON events
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION events_commit_notify();
