// Rendering of instance-wide status (see status.hpp). One table of fields drives the JSON totals,
// the JSON per worker and the Prometheus text.
#include "status.hpp"

#include <cstdio>

namespace event_piper {

namespace {

struct Field {
    const char *json;   // nullptr: Prometheus only
    const char *metric; // Prometheus name
    const char *type;
    const char *help;
    uint64_t WorkerStats::*member;
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
     "Notifications for consumers with no stream on the worker.",
     &WorkerStats::notifications_dropped},
    {"stream_overflows", "event_piper_stream_overflows_total", "counter",
     "Slow streams that fell back to reading the table.", &WorkerStats::stream_overflows},
    {"listener_reconnects", "event_piper_listener_reconnects_total", "counter",
     "Listener reconnections.", &WorkerStats::listener_reconnects},
    {nullptr, "event_piper_listener_up", "gauge", "1 while the worker's LISTEN connection is up.",
     &WorkerStats::listener_state},
    {"channel_mismatch", "event_piper_channel_mismatch", "gauge",
     "1 when the database's event_piper.channel differs from event_piper_channel.",
     &WorkerStats::channel_mismatch},
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

void append_json_fields(std::string &out, const WorkerStats &w, uint64_t now_ms) {
    for (const Field &f : fields) {
        if (f.json != nullptr) {
            out.append("\"").append(f.json).append("\":");
            append_number(out, w.*f.member);
            out.append(",");
        }
    }
    out.append("\"last_notification_age_seconds\":");
    append_age(out, w.last_notification_ms, now_ms, "null");
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
            total.*f.member += w.*f.member;
        }
    }
    total.last_notification_ms = newest_notification(workers);
    std::string out = "{";
    append_json_fields(out, total, now_ms);
    out.append(",\"workers\":[");
    for (size_t i = 0; i < workers.size(); ++i) {
        const WorkerStats &w = workers[i];
        out.append(i == 0 ? "{\"pid\":" : ",{\"pid\":");
        append_number(out, static_cast<unsigned long long>(w.pid));
        out.append(w.listener_state == 1 ? ",\"listener\":\"listening\","
                                         : ",\"listener\":\"connecting\",");
        append_json_fields(out, w, now_ms);
        out.append("}");
    }
    out.append("]}\n");
    return out;
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
