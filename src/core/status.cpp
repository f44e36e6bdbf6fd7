// Rendering of instance-wide status (see status.hpp). One table of fields drives the JSON totals,
// the JSON per worker and the Prometheus text. The JSON documents are built with cJSON.
#include "status.hpp"

#include <cjson/cJSON.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

namespace event_piper {

void SharedWorkerStats::store(const WorkerStats &stats) {
    uint64_t w[words];
    std::memcpy(w, &stats, sizeof w);
    uint64_t newest = std::max(copy[0].seq.load(std::memory_order_relaxed),
                               copy[1].seq.load(std::memory_order_relaxed));
    uint64_t m = (newest + 1) / 2 + 1; // after the last store begun (by any owner of the slot)
    Copy &c = copy[m % 2];
    c.seq.store(2 * m - 1, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_release); // the odd count before any word
    for (size_t i = 0; i < words; ++i) {
        c.word[i].store(w[i], std::memory_order_relaxed);
    }
    c.seq.store(2 * m, std::memory_order_release); // every word before the even count
}

bool SharedWorkerStats::load(WorkerStats &out) const {
    uint64_t w[words];
    for (int attempt = 0; attempt < 100; ++attempt) {
        bool taken = false;
        uint64_t taken_seq = 0, highest = 0;
        for (const Copy &c : copy) {
            uint64_t before = c.seq.load(std::memory_order_acquire);
            highest = std::max(highest, before);
            if (before % 2 != 0 || (taken && before <= taken_seq)) {
                continue; // being written, or older than the one taken
            }
            for (size_t k = 0; k < words; ++k) {
                w[k] = c.word[k].load(std::memory_order_relaxed);
            }
            std::atomic_thread_fence(std::memory_order_acquire); // the words before the recheck
            uint64_t after = c.seq.load(std::memory_order_relaxed);
            highest = std::max(highest, after);
            if (after == before) {
                std::memcpy(&out, w, sizeof w);
                taken = true;
                taken_seq = before;
            }
        }
        // The newest whole store, unless one completed since (a count above it): then a reader
        // could go back from what it read before, so it tries again.
        if (taken && taken_seq + 1 >= highest) {
            return true;
        }
    }
    out = WorkerStats{};
    return false;
}

namespace {

struct Field {
    const char *json;   // nullptr: Prometheus only
    const char *metric; // Prometheus name
    const char *type;
    const char *help;
    uint64_t WorkerStats::*member;
    bool maximum = false; // the instance's figure is the largest of the workers', not the sum
};

const Field fields[] = {
    {"streams", "event_piper_streams", "gauge", "Open SSE streams.", &WorkerStats::streams},
    {"consumers", "event_piper_consumers", "gauge",
     "Distinct consumers with a stream on the worker.", &WorkerStats::consumers},
    {"streams_catching_up", "event_piper_streams_catching_up", "gauge",
     "Streams reading history from the table.", &WorkerStats::streams_catching_up},
    {"events_delivered", "event_piper_events_delivered_total", "counter",
     "Events handed to client sockets.", &WorkerStats::events_delivered},
    {"bytes_sent", "event_piper_bytes_sent_total", "counter", "SSE bytes handed to client sockets.",
     &WorkerStats::bytes_sent},
    {"replay_queries", "event_piper_replay_queries_total", "counter", "Replay batch queries sent.",
     &WorkerStats::replay_queries},
    {"replay_queued", "event_piper_replay_queued", "gauge",
     "Streams waiting for a replay connection.", &WorkerStats::replay_queued},
    {"notifications", "event_piper_notifications_total", "counter", "Notifications received.",
     &WorkerStats::notifications},
    {"notifications_dropped", "event_piper_notifications_dropped_total", "counter",
     "Notifications for consumers with no stream on the worker: skipped, not lost.",
     &WorkerStats::notifications_dropped},
    {"stream_overflows", "event_piper_stream_overflows_total", "counter",
     "Slow streams that fell back to reading the table.", &WorkerStats::stream_overflows},
    {"listener_reconnects", "event_piper_listener_reconnects_total", "counter",
     "Listener reconnections.", &WorkerStats::listener_reconnects},
    {nullptr, "event_piper_listener_up", "gauge",
     "1 while the worker hears live notifications: its own LISTEN connection is up, or "
     "(event_piper_listener shared) the holder's is and relays to it.",
     &WorkerStats::listener_state},
    {"channel_mismatch", "event_piper_channel_mismatch", "gauge",
     "1 when the database's event_piper.channel differs from event_piper_channel.",
     &WorkerStats::channel_mismatch},
    {"listener_holder", "event_piper_listener_holder", "gauge",
     "1 for the worker that holds the instance's LISTEN connection (event_piper_listener shared).",
     &WorkerStats::listener_holder},
    {"relay_forwarded", "event_piper_relay_forwarded_total", "counter",
     "Notifications forwarded to the worker by the listener's holder.",
     &WorkerStats::relay_forwarded},
    {"relay_dropped", "event_piper_relay_dropped_total", "counter",
     "Notifications the holder could not forward to the worker (its buffer full).",
     &WorkerStats::relay_dropped},
    {"relay_catchups", "event_piper_relay_catchups_total", "counter",
     "Times the worker's streams re-read the table after a forwarding loss.",
     &WorkerStats::relay_catchups},
    {"unpositioned_rows", "event_piper_unpositioned_rows", "gauge",
     "Committed rows of events without a position: no client receives them.",
     &WorkerStats::unpositioned_rows},
    {"position_hints", "event_piper_position_hints_total", "counter",
     "Times the listener's check found positions no notification announced and sent every "
     "stream to the table (the late path).",
     &WorkerStats::position_hints},
    {"listener_takeovers", "event_piper_listener_takeovers_total", "counter",
     "Times the worker took the instance's listener over from a holder gone or frozen "
     "(event_piper_listener shared).",
     &WorkerStats::listener_takeovers},
    {"writers_waiting", "event_piper_writers_waiting", "gauge",
     "Event writers that had waited in COMMIT for over a second at the listener's last check.",
     &WorkerStats::writers_waiting},
    {"replay_failures", "event_piper_replay_failures_total", "counter",
     "Replay queries that failed (the server refused them or cancelled them).",
     &WorkerStats::replay_failures},
    {"replay_primary_queries", "event_piper_replay_primary_queries_total", "counter",
     "Replay batch queries sent to the primary (event_piper_postgres).",
     &WorkerStats::replay_primary_queries},
    {"replay_primary_rows", "event_piper_replay_primary_rows_total", "counter",
     "Rows of replay batches read from the primary.", &WorkerStats::replay_primary_rows},
    {"replay_standby_queries", "event_piper_replay_standby_queries_total", "counter",
     "Replay batch queries sent to a standby (event_piper_replay_postgres).",
     &WorkerStats::replay_standby_queries},
    {"replay_standby_rows", "event_piper_replay_standby_rows_total", "counter",
     "Rows of replay batches read from a standby.", &WorkerStats::replay_standby_rows},
    {"replay_standby_up", "event_piper_replay_standby_up", "gauge",
     "1 while a standby link of the worker is connected and answered its standby check.",
     &WorkerStats::replay_standby_up},
    {"replay_standby_lag_ms", "event_piper_replay_standby_lag_milliseconds", "gauge",
     "The standby's replay lag at the worker's last check: the age of its last replayed commit "
     "while it has WAL left to replay (0: caught up, or no standby up). The instance's figure "
     "is the largest.",
     &WorkerStats::replay_standby_lag_ms, true},
    {nullptr, "event_piper_source_wal", "gauge",
     "1 when positions come from the write-ahead log (event_piper_source wal).",
     &WorkerStats::source_wal},
    {"positioner_holder", "event_piper_positioner_holder", "gauge",
     "1 for the worker whose positioner reads the replication slot.",
     &WorkerStats::positioner_holder},
    {"positioner_lag_bytes", "event_piper_positioner_lag_bytes", "gauge",
     "WAL bytes the positioner has read but not yet committed as positions.",
     &WorkerStats::positioner_lag_bytes},
    {"positioner_lag_ms", "event_piper_positioner_lag_milliseconds", "gauge",
     "Age of the oldest committed transaction the positioner has not yet positioned.",
     &WorkerStats::positioner_lag_ms},
    {"positioned_transactions", "event_piper_positioned_transactions_total", "counter",
     "Transactions the positioner gave positions.", &WorkerStats::positioned_transactions},
    {"positioned_rows", "event_piper_positioned_rows_total", "counter",
     "Events the positioner gave positions.", &WorkerStats::positioned_rows},
    {nullptr, "event_piper_schema_version", "gauge",
     "The database schema's version the worker's listener read at its last connection (0: "
     "none yet; 1: the previous release's schema).",
     &WorkerStats::schema_version},
};

void append_number(std::string &out, unsigned long long v) {
    char buf[24];
    int n = std::snprintf(buf, sizeof buf, "%llu", v);
    out.append(buf, static_cast<size_t>(n));
}

// Seconds with millisecond precision since `last_ms`, or `none` if there was none.
void append_age(std::string &out, uint64_t last_ms, uint64_t now_ms, const char *none) {
    if (last_ms == 0) {
        out.append(none);
        return;
    }
    uint64_t age = now_ms > last_ms ? now_ms - last_ms : 0;
    char buf[48];
    int n =
        std::snprintf(buf, sizeof buf, "%llu.%03llu", static_cast<unsigned long long>(age / 1000),
                      static_cast<unsigned long long>(age % 1000));
    out.append(buf, static_cast<size_t>(n));
}

// Owns a cJSON tree; every cJSON call that allocates returns nullptr when out of memory.
struct JsonDeleter {
    void operator()(cJSON *item) const { cJSON_Delete(item); }
};
using Json = std::unique_ptr<cJSON, JsonDeleter>;

cJSON *checked(cJSON *item) {
    if (item == nullptr) {
        throw std::bad_alloc();
    }
    return item;
}

// The counters are uint64: written as decimal digits (cJSON raw values), so no count is rounded
// by cJSON's double, however large.
void add_count(cJSON *object, const char *name, unsigned long long v) {
    std::string digits;
    append_number(digits, v);
    checked(cJSON_AddRawToObject(object, name, digits.c_str()));
}

void add_json_fields(cJSON *object, const WorkerStats &w, uint64_t now_ms) {
    for (const Field &f : fields) {
        if (f.json != nullptr) {
            add_count(object, f.json, w.*f.member);
        }
    }
    std::string age;
    append_age(age, w.last_notification_ms, now_ms, "null");
    checked(cJSON_AddRawToObject(object, "last_notification_age_seconds", age.c_str()));
}

std::string print(const cJSON *document) {
    std::unique_ptr<char, decltype(&cJSON_free)> text(cJSON_PrintUnformatted(document),
                                                      &cJSON_free);
    if (text == nullptr) {
        throw std::bad_alloc();
    }
    return std::string(text.get());
}

std::string render_health(const char *status, const char *reason) {
    Json document(checked(cJSON_CreateObject()));
    checked(cJSON_AddStringToObject(document.get(), "status", status));
    if (reason != nullptr) {
        checked(cJSON_AddStringToObject(document.get(), "reason", reason));
    }
    return print(document.get());
}

const char *health_reason(Health health) {
    switch (health) {
    case Health::Up:
        return nullptr;
    case Health::ListenerDown:
        return "the listener is not connected to PostgreSQL";
    case Health::NoHolder:
        return "no worker holds the listener";
    case Health::HolderFrozen:
        return "the worker holding the listener is frozen (no heartbeat within "
               "event_piper_listener_timeout / 2)";
    case Health::ChannelMismatch:
        return "the database notifies another channel than event_piper_channel";
    case Health::Unpositioned:
        return "committed events have no position (is the trigger events_commit_notify "
               "enabled? with event_piper_source wal: is the positioner running?)";
    }
    return "unknown";
}

uint64_t newest_notification(const std::vector<WorkerStats> &workers) {
    uint64_t last = 0;
    for (const auto &w : workers) {
        last = w.last_notification_ms > last ? w.last_notification_ms : last;
    }
    return last;
}

} // namespace

std::string render_status_json(const std::vector<WorkerStats> &workers, uint64_t now_ms) {
    WorkerStats total;
    for (const auto &w : workers) {
        for (const Field &f : fields) {
            total.*f.member =
                f.maximum ? std::max(total.*f.member, w.*f.member) : total.*f.member + w.*f.member;
        }
    }
    total.last_notification_ms = newest_notification(workers);
    Json document(checked(cJSON_CreateObject()));
    add_json_fields(document.get(), total, now_ms);
    int64_t holder = 0; // the worker holding the instance's listener (shared mode)
    for (const auto &w : workers) {
        holder = w.listener_holder == 1 ? w.pid : holder;
    }
    add_count(document.get(), "listener_holder_pid", static_cast<unsigned long long>(holder));
    int64_t positioner = 0; // the worker whose positioner reads the slot (wal mode)
    bool wal = false;
    for (const auto &w : workers) {
        positioner = w.positioner_holder == 1 ? w.pid : positioner;
        wal = wal || w.source_wal == 1;
    }
    checked(cJSON_AddStringToObject(document.get(), "source", wal ? "wal" : "trigger"));
    add_count(document.get(), "positioner_holder_pid", static_cast<unsigned long long>(positioner));
    uint64_t schema = 0; // as the instance's listeners last read it (the newest of them)
    for (const auto &w : workers) {
        schema = w.schema_version > schema ? w.schema_version : schema;
    }
    add_count(document.get(), "schema_version", schema);
    cJSON *list = checked(cJSON_AddArrayToObject(document.get(), "workers"));
    for (const WorkerStats &w : workers) {
        Json worker(checked(cJSON_CreateObject()));
        add_count(worker.get(), "pid", static_cast<unsigned long long>(w.pid));
        checked(cJSON_AddStringToObject(worker.get(), "listener",
                                        w.listener_state == 1 ? "listening" : "connecting"));
        add_json_fields(worker.get(), w, now_ms);
        if (!cJSON_AddItemToArray(list, worker.get())) {
            throw std::bad_alloc();
        }
        worker.release(); // owned by the list now
    }
    return print(document.get()) + "\n";
}

Health decide_health(const HealthInput &in) {
    if (in.listener != Health::Up) {
        return in.listener;
    }
    if (in.channel_mismatch) {
        return Health::ChannelMismatch;
    }
    if (in.unpositioned_rows > 0) {
        return Health::Unpositioned;
    }
    return Health::Up;
}

const std::string &health_body(Health health) {
    static const Health all[] = {
        Health::Up,           Health::ListenerDown,    Health::NoHolder,
        Health::HolderFrozen, Health::ChannelMismatch, Health::Unpositioned};
    static const std::vector<std::string> bodies = [] {
        std::vector<std::string> out;
        for (Health h : all) {
            out.push_back(render_health(h == Health::Up ? "UP" : "DOWN", health_reason(h)));
        }
        return out;
    }();
    return bodies.at(static_cast<size_t>(health));
}

std::string render_status_prometheus(const std::vector<WorkerStats> &workers, uint64_t now_ms) {
    std::string out;
    for (const Field &f : fields) {
        out.append("# HELP ").append(f.metric).append(" ").append(f.help).append("\n");
        out.append("# TYPE ").append(f.metric).append(" ").append(f.type).append("\n");
        for (const auto &w : workers) {
            out.append(f.metric).append("{pid=\"");
            append_number(out, static_cast<unsigned long long>(w.pid));
            out.append("\"} ");
            append_number(out, w.*f.member);
            out.append("\n");
        }
    }
    out.append("# HELP event_piper_last_notification_age_seconds Age of the newest notification "
               "received by any worker.\n# TYPE event_piper_last_notification_age_seconds gauge\n");
    uint64_t last = newest_notification(workers);
    if (last != 0) {
        out.append("event_piper_last_notification_age_seconds ");
        append_age(out, last, now_ms, "");
        out.append("\n");
    }
    return out;
}

} // namespace event_piper
