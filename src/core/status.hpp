// Figures of the whole nginx instance: each worker publishes its WorkerStats into a shared memory
// slot; the status handler renders all live slots as JSON or Prometheus text. Pure C++ (JSON
// with cJSON).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace event_piper {

// Plain counters, written by one worker only (its own slot), read by any.
struct WorkerStats {
    int64_t pid = 0;
    uint64_t listener_state = 0; // 0 connecting / down, 1 listening
    uint64_t listener_reconnects = 0;
    uint64_t streams = 0;
    uint64_t consumers = 0; // distinct within this worker
    uint64_t streams_catching_up = 0;
    uint64_t events_delivered = 0; // events handed to client sockets
    uint64_t bytes_sent = 0;
    uint64_t replay_queries = 0;
    uint64_t replay_queued = 0;
    uint64_t notifications = 0;
    // Notifications for consumers with no stream on this worker: skipped, nothing lost (the
    // holder of a shared listener hears of every consumer).
    uint64_t notifications_dropped = 0;
    uint64_t stream_overflows = 0;     // slow clients sent back to the table
    uint64_t last_notification_ms = 0; // wall clock, 0: never
    uint64_t channel_mismatch = 0;     // 1: the database notifies another channel than ours
    // event_piper_listener shared: the worker that holds the instance's LISTEN connection, and
    // what it forwarded to this one.
    uint64_t listener_holder = 0;   // 1: this worker holds it
    uint64_t relay_forwarded = 0;   // notifications received from the holder
    uint64_t relay_dropped = 0;     // notifications the holder could not send it (buffer full)
    uint64_t relay_catchups = 0;    // times its streams re-read the table after a loss on the way
    uint64_t unpositioned_rows = 0; // committed rows without a position (listener's count)
    // Times the listener's check found positions no notification announced and sent every
    // stream to the table with a bare position hint (the late path).
    uint64_t position_hints = 0;
    uint64_t listener_takeovers = 0; // roles this worker took from a holder gone or frozen
    uint64_t writers_waiting = 0;    // event writers held back in COMMIT over 1 s (listener's)
    uint64_t replay_failures = 0;    // replay queries the server refused
    // Replay batches by the kind of server that answered them (event_piper_replay_postgres),
    // and the standby as this worker last checked it.
    uint64_t replay_primary_queries = 0;
    uint64_t replay_primary_rows = 0;
    uint64_t replay_standby_queries = 0;
    uint64_t replay_standby_rows = 0;
    uint64_t replay_standby_up = 0;     // 1: a standby link is connected and checked
    uint64_t replay_standby_lag_ms = 0; // its replay lag at the last check
    // event_piper_source wal: the positioner (docs/wal-source.md), in the worker that reads the
    // slot; the lag is what it has not committed yet.
    uint64_t source_wal = 0;           // 1: event_piper_source wal
    uint64_t positioner_holder = 0;    // 1: this worker's positioner reads the slot
    uint64_t positioner_lag_bytes = 0; // WAL the server sent beyond what is confirmed
    uint64_t positioner_lag_ms = 0;    // age of the oldest commit not yet positioned
    uint64_t positioned_transactions = 0;
    uint64_t positioned_rows = 0;
    // The database schema's version its listener read at its last listening connection (0:
    // none yet; 1: the previous release's schema, which has no event_piper_schema_version()).
    uint64_t schema_version = 0;
};

// A worker's WorkerStats in shared memory: written by that worker only, read by any, never torn
// (neither a half-written number nor figures of two different stores). Two copies, each under a
// sequence count (a seqlock): store number m goes to copy m % 2, whose count is 2m - 1 (odd)
// while it is written and 2m after, so the writer never touches the newest whole copy, and a
// reader takes the newest copy whose count was even and did not move while it read it. A writer
// stopped half-way (SIGSTOP, a debugger, kill -9) leaves the other copy whole. Zeroed memory is
// a valid state: zero figures. Lock-free atomics only, so that it works across processes.
struct SharedWorkerStats {
    static constexpr size_t words = sizeof(WorkerStats) / sizeof(uint64_t);
    struct Copy {
        std::atomic<uint64_t> seq; // odd: being written
        std::atomic<uint64_t> word[words];
    };

    // By the slot's owner only.
    void store(const WorkerStats &stats);
    // False (and `out` zero figures) only if the writer rewrote the copies on every try while
    // this read them: a writer that stores without pause can outrun a reader, ours store once a
    // second.
    bool load(WorkerStats &out) const;

    Copy copy[2];
};
static_assert(std::is_trivially_copyable_v<WorkerStats> &&
                  sizeof(WorkerStats) % sizeof(uint64_t) == 0,
              "WorkerStats travels as 64-bit words");
static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared memory needs lock-free words");

// `now_ms`: wall clock in milliseconds, for the age of the last notification.
std::string render_status_json(const std::vector<WorkerStats> &workers, uint64_t now_ms);
std::string render_status_prometheus(const std::vector<WorkerStats> &workers, uint64_t now_ms);

// Whether the instance delivers what commits, for event_piper_health: UP, or DOWN for one reason.
enum class Health {
    Up,
    ListenerDown,    // the listener is not connected to PostgreSQL (or not listening yet)
    NoHolder,        // shared listener: no worker holds it (its holder gone)
    HolderFrozen,    // shared listener: its holder's heartbeat is older than the stale time
    ChannelMismatch, // the database notifies another channel than event_piper_channel
    Unpositioned,    // the listener's check found committed events without a position
};

struct HealthInput {
    Health listener = Health::Up; // Up, ListenerDown, NoHolder or HolderFrozen
    bool channel_mismatch = false;
    uint64_t unpositioned_rows = 0;
};
Health decide_health(const HealthInput &in);

// The event_piper_health body: {"status":"UP"}, or {"status":"DOWN","reason":"..."}. Built once
// per process and kept for its lifetime, so nginx may send it without copying it into the
// request's pool.
const std::string &health_body(Health health);

} // namespace event_piper
