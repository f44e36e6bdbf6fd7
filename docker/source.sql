-- docker/compose.yaml: the database's source of positions, from EVENT_PIPER_SOURCE (trigger, the
-- default, or wal), when the volume is first created (after schema.sql and wal.sql). Switching
-- to wal creates the replication slot, which needs wal_level = logical (the compose command).
\getenv source EVENT_PIPER_SOURCE
\if :{?source}
\else
\set source trigger
\endif
SELECT event_piper_set_source(:'source');
