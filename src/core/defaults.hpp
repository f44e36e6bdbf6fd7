// Every default and limit of the directives and of the request checks, in one place: the
// configuration, Stream::Limits, the checks and their error texts all read them from here.
// README "Configuration" states them to users; tests/unit/defaults_test.cpp holds the two equal.
#pragma once

#include <cstddef>
#include <cstdint>

namespace event_piper {

// event_piper_channel: the NOTIFY channel. schema.sql's trigger falls back to the same name
// when the setting event_piper.channel is unset; at most PostgreSQL's identifier length.
constexpr char default_channel[] = "new_events";
constexpr size_t max_channel_length = 63;

// event_piper_consumer and event_piper_last_event_id: nginx values read when not configured.
constexpr char default_consumer_value[] = "$http_x_consumer_id";
constexpr char default_last_event_id_value[] = "$http_last_event_id";

// event_piper_heartbeat: idle time before a heartbeat frame ("off": 0).
constexpr uint64_t default_heartbeat_ms = 10 * 1000;

// event_piper_retry is unset by default (no `retry:` when a stream starts); the hint sent when
// nginx ends a stream falls back to this.
constexpr uint64_t default_end_retry_ms = 1000;

// event_piper_replay_batch: rows per replay query.
constexpr size_t default_replay_batch = 500;
constexpr size_t min_replay_batch = 1;
constexpr size_t max_replay_batch = 100000;

// event_piper_replay_connections: replay connections per worker.
constexpr size_t default_replay_connections = 2;
constexpr size_t min_replay_connections = 1;
constexpr size_t max_replay_connections = 64;

// event_piper_replay_memory: replay bytes one worker may hold for its clients.
constexpr size_t default_replay_memory = 64 * 1024 * 1024;
constexpr size_t min_replay_memory = 1024 * 1024;

// event_piper_stream_buffer: live bytes queued per stream, also one replay batch's byte budget.
constexpr size_t default_stream_buffer = 256 * 1024;
constexpr size_t min_stream_buffer = 4 * 1024;

// event_piper_relay_buffer: send buffer of the shared listener's socket.
constexpr size_t default_relay_buffer = 4 * 1024 * 1024;
constexpr size_t min_relay_buffer = 64 * 1024;

// event_piper_listener (shared or per_worker) and event_piper_source (trigger or wal).
constexpr bool default_listener_shared = true;
constexpr bool default_source_wal = false;

// event_piper_listener_timeout: a frozen listening connection is replaced within this time.
constexpr uint64_t default_listener_timeout_ms = 60 * 1000;
constexpr uint64_t min_listener_timeout_ms = 3 * 1000;

// How the listener spends its timeout: every third of it a round trip that must come back
// within another third, so that two silent periods and one unanswered check fit in it.
struct ListenerCheck {
    uint64_t period_ms; // between round trips
    uint64_t answer_ms; // how long one round trip may take
};
constexpr ListenerCheck listener_check(uint64_t listener_timeout_ms) {
    return {listener_timeout_ms / 3, listener_timeout_ms - 2 * (listener_timeout_ms / 3)};
}

// Request checks: a consumer id's length in bytes, and the ids one stream may carry (its
// consumer plus the list). The replay query has one index range scan per id, merged: 64 keeps
// that plan and the statement small, and covers a user, their teams and a few broadcast ids.
constexpr size_t max_consumer_length = 256;
constexpr size_t max_stream_consumers = 64;
// Last-Event-ID: a non-negative int64 has at most 19 digits.
constexpr size_t max_last_event_id_digits = 19;

// Every PostgreSQL connection: a connect that PQconnectPoll would let hang is given up after
// this long.
constexpr uint64_t connect_timeout_ms = 10 * 1000;
// TCP keepalives (seconds, and probes) put before the user's conninfo, which may override them:
// a dead server is noticed within about a minute.
constexpr char default_keepalives_idle[] = "30";
constexpr char default_keepalives_interval[] = "10";
constexpr char default_keepalives_count[] = "3";

} // namespace event_piper
