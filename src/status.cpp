// Rendering of instance-wide status (see status.hpp).
#include "status.hpp"

#include <cstdio>

namespace event_piper {

namespace {

struct Totals {
    uint64_t streams = 0, consumers = 0, catching_up = 0, delivered = 0, bytes = 0, queries = 0,
             queued = 0, reconnects = 0, notifications = 0, dropped = 0, overflows = 0,
             listening = 0, last_ms = 0;
};

Totals sum(const std::vector<WorkerStats> &workers) {
    Totals t;
    for (const auto &w : workers) {
        t.streams += w.streams;
        t.consumers += w.consumers;
        t.catching_up += w.streams_catching_up;
        t.delivered += w.events_delivered;
        t.bytes += w.bytes_sent;
        t.queries += w.replay_queries;
        t.queued += w.replay_queued;
        t.reconnects += w.listener_reconnects;
        t.notifications += w.notifications;
        t.dropped += w.notifications_dropped;
        t.overflows += w.stream_overflows;
        t.listening += w.listener_state == 1 ? 1 : 0;
        if (w.last_notification_ms > t.last_ms) {
            t.last_ms = w.last_notification_ms;
        }
    }
    return t;
}

void add(std::string &out, const char *fmt, unsigned long long v) {
    char buf[160];
    int n = std::snprintf(buf, sizeof buf, fmt, v);
    if (n > 0) {
        out.append(buf,
                   static_cast<size_t>(n) < sizeof buf ? static_cast<size_t>(n) : sizeof buf - 1);
    }
}

void add_age(std::string &out, const char *prefix, uint64_t last_ms, uint64_t now_ms,
             const char *none) {
    out.append(prefix);
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

} // namespace

std::string render_status_json(const std::vector<WorkerStats> &workers, uint64_t now_ms) {
    Totals t = sum(workers);
    std::string out = "{";
    add(out, "\"streams\":%llu,", t.streams);
    add(out, "\"consumers\":%llu,", t.consumers);
    add(out, "\"streams_catching_up\":%llu,", t.catching_up);
    add(out, "\"events_delivered\":%llu,", t.delivered);
    add(out, "\"bytes_sent\":%llu,", t.bytes);
    add(out, "\"replay_queries\":%llu,", t.queries);
    add(out, "\"replay_queued\":%llu,", t.queued);
    add(out, "\"notifications\":%llu,", t.notifications);
    add(out, "\"notifications_dropped\":%llu,", t.dropped);
    add(out, "\"stream_overflows\":%llu,", t.overflows);
    add(out, "\"listener_reconnects\":%llu,", t.reconnects);
    add_age(out, "\"last_notification_age_seconds\":", t.last_ms, now_ms, "null");
    out.append(",\"workers\":[");
    bool first = true;
    for (const auto &w : workers) {
        out.append(first ? "{" : ",{");
        first = false;
        add(out, "\"pid\":%llu,", static_cast<unsigned long long>(w.pid));
        out.append(w.listener_state == 1 ? "\"listener\":\"listening\","
                                         : "\"listener\":\"connecting\",");
        add(out, "\"listener_reconnects\":%llu,", w.listener_reconnects);
        add(out, "\"streams\":%llu,", w.streams);
        add(out, "\"consumers\":%llu,", w.consumers);
        add(out, "\"streams_catching_up\":%llu,", w.streams_catching_up);
        add(out, "\"events_delivered\":%llu,", w.events_delivered);
        add(out, "\"bytes_sent\":%llu,", w.bytes_sent);
        add(out, "\"replay_queries\":%llu,", w.replay_queries);
        add(out, "\"replay_queued\":%llu,", w.replay_queued);
        add(out, "\"notifications\":%llu,", w.notifications);
        add(out, "\"notifications_dropped\":%llu,", w.notifications_dropped);
        add(out, "\"stream_overflows\":%llu,", w.stream_overflows);
        add_age(out, "\"last_notification_age_seconds\":", w.last_notification_ms, now_ms, "null");
        out.append("}");
    }
    out.append("]}\n");
    return out;
}

std::string render_status_prometheus(const std::vector<WorkerStats> &workers, uint64_t now_ms) {
    struct Metric {
        const char *name;
        const char *type;
        const char *help;
        uint64_t WorkerStats::*field;
    };
    static const Metric metrics[] = {
        {"event_piper_streams", "gauge", "Open SSE streams.", &WorkerStats::streams},
        {"event_piper_consumers", "gauge", "Distinct consumers with a stream on the worker.",
         &WorkerStats::consumers},
        {"event_piper_streams_catching_up", "gauge", "Streams reading history from the table.",
         &WorkerStats::streams_catching_up},
        {"event_piper_events_delivered_total", "counter", "Events handed to client sockets.",
         &WorkerStats::events_delivered},
        {"event_piper_bytes_sent_total", "counter", "SSE bytes handed to client sockets.",
         &WorkerStats::bytes_sent},
        {"event_piper_replay_queries_total", "counter", "Replay batch queries sent.",
         &WorkerStats::replay_queries},
        {"event_piper_replay_queued", "gauge", "Streams waiting for a replay connection.",
         &WorkerStats::replay_queued},
        {"event_piper_notifications_total", "counter", "Notifications received.",
         &WorkerStats::notifications},
        {"event_piper_notifications_dropped_total", "counter",
         "Notifications for consumers with no stream on the worker.",
         &WorkerStats::notifications_dropped},
        {"event_piper_stream_overflows_total", "counter",
         "Slow streams that fell back to reading the table.", &WorkerStats::stream_overflows},
        {"event_piper_listener_up", "gauge", "1 while the worker's LISTEN connection is up.",
         &WorkerStats::listener_state},
        {"event_piper_listener_reconnects_total", "counter", "Listener reconnections.",
         &WorkerStats::listener_reconnects},
    };
    std::string out;
    char buf[256];
    for (const Metric &m : metrics) {
        int n = std::snprintf(buf, sizeof buf, "# HELP %s %s\n# TYPE %s %s\n", m.name, m.help,
                              m.name, m.type);
        out.append(buf, static_cast<size_t>(n));
        for (const auto &w : workers) {
            n = std::snprintf(buf, sizeof buf, "%s{pid=\"%lld\"} %llu\n", m.name,
                              static_cast<long long>(w.pid),
                              static_cast<unsigned long long>(w.*m.field));
            out.append(buf, static_cast<size_t>(n));
        }
    }
    out.append("# HELP event_piper_last_notification_age_seconds Age of the newest notification "
               "received by any worker.\n# TYPE event_piper_last_notification_age_seconds gauge\n");
    uint64_t last = 0;
    for (const auto &w : workers) {
        if (w.last_notification_ms > last) {
            last = w.last_notification_ms;
        }
    }
    if (last != 0) {
        add_age(out, "event_piper_last_notification_age_seconds ", last, now_ms, "");
        out.append("\n");
    }
    return out;
}

} // namespace event_piper
