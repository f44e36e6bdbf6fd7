-- ngx_event_piper, `event_piper_source wal` (docs/wal-source.md): positions given after the
-- commit by the positioner, which reads the committed transactions from a logical replication
-- slot, instead of by the trigger inside every writer's commit. Trigger mode (schema.sql alone)
-- stays the default; this file only adds what wal mode needs, and nothing of it runs for writers.
--
-- Apply after schema.sql, in one transaction (safe to apply again, also while writers insert):
--   psql --single-transaction -f postgresql/schema.sql -f postgresql/wal.sql
-- Then switch, on its own (creating a slot is refused in a transaction that wrote), as a role
-- with REPLICATION that owns the events table, while writers insert:
--   psql -c "SELECT event_piper_set_source('wal')"       -- and back: 'trigger'
-- PostgreSQL needs wal_level = logical (a restart), a free replication slot and WAL sender.

-- The positioner's progress, one row: which source gives positions, the end LSN of the last
-- decoded transaction whose rows are positioned (NULL right after a switch to wal: the positioner
-- skips until the switch's own message), and the last position it gave. Written in the same
-- transaction as the positions: that is the exactly-once.
CREATE TABLE IF NOT EXISTS event_piper_wal_progress (
    id            int         PRIMARY KEY CHECK (id = 1),
    source        text        NOT NULL DEFAULT 'trigger' CHECK (source IN ('trigger', 'wal')),
    lsn           pg_lsn,
    last_position bigint      NOT NULL DEFAULT 0,
    holder        text,
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
INSERT INTO event_piper_wal_progress (id) VALUES (1) ON CONFLICT (id) DO NOTHING;

-- What the positioner reads: the events table's changes. Created here, long before any slot, so
-- that every decoded transaction sees it in its catalog snapshot.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'event_piper_events') THEN
        CREATE PUBLICATION event_piper_events FOR TABLE events;
    END IF;
END;
$$;

-- Whether every transaction of `xids` (32-bit transaction ids, as logical decoding gives them)
-- is visible to a snapshot taken now. Each id is placed below the snapshot's xmax (at most 2^31
-- back, as PostgreSQL compares transaction ids); an id at or after xmax is not visible yet.
CREATE OR REPLACE FUNCTION event_piper_wal_visible(xids bigint[]) RETURNS boolean
LANGUAGE sql VOLATILE AS $$
    SELECT NOT EXISTS (
        SELECT 1
          FROM (SELECT s, pg_snapshot_xmax(s)::text::bigint AS xmax
                  FROM pg_current_snapshot() AS s) AS cur,
               LATERAL (SELECT (cur.xmax % 4294967296 - x + 4294967296) % 4294967296 AS back
                          FROM unnest(xids) AS x) AS d
         WHERE d.back = 0 OR d.back > 2147483648
            OR NOT pg_visible_in_snapshot((cur.xmax - d.back)::text::xid8, cur.s))
$$;

-- The apply function before it took the transactions' ids and the patches' targets (replaced by
-- the one below).
DROP FUNCTION IF EXISTS event_piper_wal_apply(pg_lsn, pg_lsn, bigint, bigint[], bigint[], text[],
                                              bigint[], text[], bigint[], text[], bigint[],
                                              boolean, text, text);
DROP FUNCTION IF EXISTS event_piper_wal_apply(pg_lsn, pg_lsn, bigint, bigint[], bigint[], text[],
                                              bigint[], text[], bigint[], text[], bigint[],
                                              boolean, text, text, bigint[]);

-- One positioner transaction (or one part of it, new_lsn NULL, inside BEGIN ... COMMIT):
-- fencing first (the progress row locked and compared: a positioner that froze and woke up after
-- another took over finds another lsn and steps down), a wait until the decoded transactions
-- (`xids`) are visible, then the later changes in commit order (a TRUNCATE, deletes, subscriber
-- moves), the new positions, the notifications (the trigger's formats, built by the positioner),
-- the progress. `targets`: per row, the position of the event a patch patches
-- (event_positions.target), found and checked by the positioner; NULL for plain events and for
-- patches it delivers as plain events (docs/patching.md, "In wal mode").
CREATE OR REPLACE FUNCTION event_piper_wal_apply(
    expect_lsn pg_lsn, new_lsn pg_lsn, new_last_position bigint,
    positions bigint[], ids bigint[], subscribers text[], commit_times bigint[],
    notifications text[], move_ids bigint[], move_subscribers text[], delete_ids bigint[],
    truncate_first boolean, holder_name text, channel text, xids bigint[] DEFAULT '{}',
    targets bigint[] DEFAULT NULL)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    cur record;
    n   text;
    t   text;
BEGIN
    SELECT source, lsn INTO cur FROM event_piper_wal_progress WHERE id = 1 FOR UPDATE;
    IF NOT FOUND OR cur.source <> 'wal' OR cur.lsn IS DISTINCT FROM expect_lsn THEN
        RAISE EXCEPTION 'event_piper: positioner fenced: the progress is % (source %), not %',
            coalesce(cur.lsn::text, 'NULL'), coalesce(cur.source, 'none'),
            coalesce(expect_lsn::text, 'NULL');
    END IF;
    -- A writer's commit record is flushed, and so decoded, a moment before the commit becomes
    -- visible to other sessions (on a loaded server, milliseconds; with a synchronous standby,
    -- once the standby confirmed). Positions committed in that moment would be visible without
    -- their rows: a stream reading the table (after an "r" or "p" hint, or catching up) would
    -- find the position but not the event, and pass over it. So wait, each check with a new
    -- snapshot, until every decoded transaction written here is visible.
    WHILE cardinality(xids) > 0 LOOP
        EXIT WHEN event_piper_wal_visible(xids);
        PERFORM pg_sleep(0.001);
    END LOOP;
    IF truncate_first THEN
        TRUNCATE event_positions;
    END IF;
    IF cardinality(delete_ids) > 0 THEN
        DELETE FROM event_positions WHERE event_id = ANY (delete_ids);
    END IF;
    IF cardinality(move_ids) > 0 THEN
        UPDATE event_positions p SET subscriber = m.sub
          FROM unnest(move_ids, move_subscribers) AS m(id, sub)
         WHERE p.event_id = m.id AND p.subscriber IS DISTINCT FROM m.sub;
    END IF;
    -- committed_at is when the position becomes visible (clock_timestamp(), as the trigger
    -- has it), not the writer's commit time (commit_times, from the WAL: not stored): a stream
    -- opened while the database was unreachable starts after the positions committed before it
    -- opened, and a writer's commit is visible as a position only after the positioner's.
    IF cardinality(positions) > 0 THEN
        INSERT INTO event_positions (position, event_id, subscriber, target)
        SELECT r.pos, r.id, r.sub, r.tgt
          FROM unnest(positions, ids, subscribers, targets) AS r(pos, id, sub, tgt);
    END IF;
    -- Built by the positioner (docs/notification-grammar.md), sent as they are.
    FOREACH n IN ARRAY notifications LOOP
        t := pg_notify(channel, n)::text;
    END LOOP;
    UPDATE event_piper_wal_progress
       SET lsn = coalesce(new_lsn, lsn), last_position = new_last_position,
           holder = holder_name, updated_at = clock_timestamp()
     WHERE id = 1;
END;
$$;

-- Rows committed without a position get the next positions in id order (the catch-up schema.sql
-- does too), with a bare position notification; returns how many. Used when no positioner
-- caught up before a switch back to the trigger, and after a slot was lost.
CREATE OR REPLACE FUNCTION event_piper_wal_catch_up(above bigint, channel text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    INSERT INTO event_positions (position, event_id, subscriber)
        SELECT above + row_number() OVER (ORDER BY e.id), e.id, e.subscriber
          FROM events e
         WHERE NOT EXISTS (SELECT 1 FROM event_positions p WHERE p.event_id = e.id);
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify(channel, 'p ' || (above + n)); -- docs/notification-grammar.md
    END IF;
    RETURN n;
END;
$$;

-- The triggers schema.sql creates, which wal mode disables (a disabled trigger runs nothing, not
-- even its WHEN clause) and trigger mode enables again.
CREATE OR REPLACE FUNCTION event_piper_set_triggers(enabled boolean) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['events_commit_notify', 'events_updated', 'events_deleted',
                                'events_truncated'] LOOP
        EXECUTE format('ALTER TABLE events %s TRIGGER %I',
                       CASE WHEN enabled THEN 'ENABLE' ELSE 'DISABLE' END, name);
    END LOOP;
END;
$$;

-- Switches the database between the trigger and the positioner, in both directions, while
-- writers insert, without losing, duplicating or renumbering a position (docs/wal-source.md,
-- section 6). `wait_seconds`: how long the switch back to the trigger waits for the positioner
-- to confirm everything committed before it (writers wait meanwhile); after it, the rows left
-- without a position get the next ones in id order.
CREATE OR REPLACE FUNCTION event_piper_set_source(target text, wait_seconds numeric DEFAULT 30)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    cur       record;
    above     bigint;
    sync_lsn  pg_lsn;
    confirmed pg_lsn;
    deadline  timestamptz;
    n         bigint;
    chan      text := coalesce(nullif(current_setting('event_piper.channel', true), ''),
                               'new_events');
BEGIN
    IF target IS NULL OR target NOT IN ('trigger', 'wal') THEN
        RAISE EXCEPTION 'event_piper_set_source: the source is ''trigger'' or ''wal'', not %',
            coalesce(quote_literal(target), 'NULL');
    END IF;
    SELECT source INTO cur FROM event_piper_wal_progress WHERE id = 1;
    IF cur.source = target THEN
        RETURN 'already ' || target;
    END IF;
    IF target = 'wal' THEN
        -- Not while a positioner drops an idle slot (event_piper_wal_drop_idle_slot).
        PERFORM pg_advisory_xact_lock(7402652111030151174);
        -- 1. The slot, before this transaction writes anything (PostgreSQL refuses otherwise).
        --    Its consistent point precedes this transaction's commit, so every transaction that
        --    commits after the switch is decoded. A leftover slot nobody reads starts afresh.
        PERFORM pg_drop_replication_slot(slot_name) FROM pg_replication_slots
          WHERE slot_name = 'event_piper' AND NOT active;
        IF NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'event_piper') THEN
            PERFORM pg_create_logical_replication_slot('event_piper', 'pgoutput');
        END IF;
        -- 2. The cut: writers that inserted already commit through the trigger first; new
        --    inserts wait for this transaction.
        LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE;
        SELECT greatest(coalesce(max(position), 0),
                        (SELECT CASE WHEN is_called THEN last_value ELSE 0 END
                           FROM events_position_seq))
          INTO above FROM event_positions;
        PERFORM event_piper_set_triggers(false);
        UPDATE event_piper_wal_progress
           SET source = 'wal', lsn = NULL, last_position = above, holder = NULL,
               updated_at = clock_timestamp()
         WHERE id = 1;
        -- 3. The positioner skips every decoded transaction before this message.
        PERFORM pg_logical_emit_message(true, 'event_piper', 'source wal');
        RETURN 'wal';
    END IF;
    -- Back to the trigger. 1. The cut.
    LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE;
    -- 2. A record after every transaction committed before the cut; once the slot's confirmed
    --    LSN passes it, the positioner has stored everything before it (it confirms only what it
    --    committed, or keepalive positions while nothing is pending).
    sync_lsn := pg_logical_emit_message(false, 'event_piper', 'sync');
    deadline := clock_timestamp() + wait_seconds * interval '1 second';
    LOOP
        SELECT confirmed_flush_lsn INTO confirmed
          FROM pg_replication_slots WHERE slot_name = 'event_piper';
        EXIT WHEN confirmed > sync_lsn OR confirmed IS NULL OR clock_timestamp() >= deadline;
        PERFORM pg_sleep(0.01);
    END LOOP;
    -- 3. The progress row: a positioner transaction in flight finishes first; the next one
    --    finds source = 'trigger' and steps down.
    SELECT last_position INTO above FROM event_piper_wal_progress WHERE id = 1 FOR UPDATE;
    above := greatest(above, (SELECT coalesce(max(position), 0) FROM event_positions));
    IF confirmed IS NULL OR confirmed <= sync_lsn THEN
        n := event_piper_wal_catch_up(above, chan);
        IF n > 0 THEN
            RAISE NOTICE 'event_piper: no positioner caught up within % s: % rows got positions '
                'after %, in id order', wait_seconds, n, above;
            above := above + n;
        END IF;
    END IF;
    -- 4. Trigger positions continue above every position handed out.
    IF above > 0 THEN
        PERFORM setval('events_position_seq', above);
    END IF;
    PERFORM event_piper_set_triggers(true);
    UPDATE event_piper_wal_progress
       SET source = 'trigger', updated_at = clock_timestamp() WHERE id = 1;
    PERFORM pg_logical_emit_message(true, 'event_piper', 'source trigger');
    -- A slot nobody reads would keep WAL for ever; a positioner still reading it drops it when it
    -- reads the message above.
    PERFORM pg_drop_replication_slot(slot_name) FROM pg_replication_slots
      WHERE slot_name = 'event_piper' AND NOT active;
    RETURN 'trigger';
END;
$$;

-- The positioner calls this when it finds the database in trigger mode: a slot left behind by the
-- switch back to the trigger (the positioner was reading it then) would keep WAL for ever. The
-- advisory lock keeps it from dropping the slot a concurrent switch to wal has just created.
CREATE OR REPLACE FUNCTION event_piper_wal_drop_idle_slot() RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock(7402652111030151174)
       OR (SELECT source FROM event_piper_wal_progress WHERE id = 1) IS DISTINCT FROM 'trigger' THEN
        RETURN false;
    END IF;
    PERFORM pg_drop_replication_slot(slot_name) FROM pg_replication_slots
      WHERE slot_name = 'event_piper' AND NOT active;
    RETURN FOUND;
END;
$$;

-- schema.sql applied again (an upgrade) re-creates its triggers enabled: in wal mode they are
-- disabled again here, in the same transaction.
DO $$
BEGIN
    IF (SELECT source FROM event_piper_wal_progress WHERE id = 1) = 'wal' THEN
        PERFORM event_piper_set_triggers(false);
    END IF;
END;
$$;
