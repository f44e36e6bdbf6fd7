// Rendering of instance-wide status from the workers' slots, and the slots' shared figures
// (never read torn).
#include "status.hpp"

#include <cjson/cJSON.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <thread>

using namespace event_piper;

namespace {
// Parses a document back with cJSON: the test fails if it is not JSON.
struct JsonDeleter {
    void operator()(cJSON *item) const { cJSON_Delete(item); }
};
using Json = std::unique_ptr<cJSON, JsonDeleter>;

Json parse(const std::string &text) {
    Json document(cJSON_ParseWithLength(text.data(), text.size()));
    EXPECT_NE(document, nullptr) << "not JSON: " << text;
    return document;
}

double number(const cJSON *object, const char *name) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(object, name);
    EXPECT_TRUE(cJSON_IsNumber(item)) << name;
    return cJSON_IsNumber(item) ? item->valuedouble : -1;
}

std::string text(const cJSON *object, const char *name) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(object, name);
    EXPECT_TRUE(cJSON_IsString(item)) << name;
    return cJSON_IsString(item) ? item->valuestring : "";
}

const char *const counters[] = {"streams",
                                "consumers",
                                "streams_catching_up",
                                "events_delivered",
                                "bytes_sent",
                                "replay_queries",
                                "replay_queued",
                                "notifications",
                                "notifications_dropped",
                                "stream_overflows",
                                "listener_reconnects",
                                "channel_mismatch",
                                "listener_holder",
                                "relay_forwarded",
                                "relay_dropped",
                                "relay_catchups",
                                "unpositioned_rows",
                                "position_hints",
                                "listener_takeovers",
                                "writers_waiting",
                                "replay_failures",
                                "replay_primary_queries",
                                "replay_primary_rows",
                                "replay_standby_queries",
                                "replay_standby_rows",
                                "replay_standby_up",
                                "replay_standby_lag_ms",
                                "positioner_holder",
                                "positioner_lag_bytes",
                                "positioner_lag_ms",
                                "positioned_transactions",
                                "positioned_rows"};
const int counter_count = sizeof counters / sizeof counters[0];

std::vector<WorkerStats> two_workers() {
    WorkerStats a;
    a.pid = 10;
    a.listener_state = 1;
    a.streams = 3;
    a.consumers = 2;
    a.events_delivered = 7;
    a.last_notification_ms = 1000;
    WorkerStats b;
    b.pid = 11;
    b.streams = 1;
    b.consumers = 1;
    b.listener_reconnects = 2;
    b.notifications_dropped = 4;
    b.last_notification_ms = 1500;
    return {a, b};
}
} // namespace

TEST(Status, JsonSumsWorkersAndListsEach) {
    std::string json = render_status_json(two_workers(), 2000);
    EXPECT_NE(json.find("\"streams\":4,"), std::string::npos) << json;
    EXPECT_NE(json.find("\"consumers\":3,"), std::string::npos);
    EXPECT_NE(json.find("\"events_delivered\":7,"), std::string::npos);
    EXPECT_NE(json.find("\"listener_reconnects\":2,"), std::string::npos);
    EXPECT_NE(json.find("\"notifications_dropped\":4,"), std::string::npos);
    EXPECT_NE(json.find("\"last_notification_age_seconds\":0.500"), std::string::npos);
    EXPECT_NE(json.find("{\"pid\":10,\"listener\":\"listening\""), std::string::npos);
    EXPECT_NE(json.find("{\"pid\":11,\"listener\":\"connecting\""), std::string::npos);
    EXPECT_EQ(json.back(), '\n');
}

TEST(Status, StandbyRowsAddUpAndTheLagIsTheLargestWorkers) {
    std::vector<WorkerStats> workers = two_workers();
    workers[0].replay_standby_rows = 900;
    workers[1].replay_standby_rows = 100;
    workers[0].replay_standby_lag_ms = 40;
    workers[1].replay_standby_lag_ms = 700;
    std::string json = render_status_json(workers, 2000);
    EXPECT_NE(json.find("\"replay_standby_rows\":1000,"), std::string::npos) << json;
    EXPECT_NE(json.find("\"replay_standby_lag_ms\":700,"), std::string::npos) << json;
    std::string text = render_status_prometheus(workers, 2000);
    EXPECT_NE(text.find("event_piper_replay_standby_lag_milliseconds{pid=\"11\"} 700\n"),
              std::string::npos);
}

TEST(Status, JsonParsesWithEveryFieldTotalAndPerWorker) {
    std::string json = render_status_json(two_workers(), 2000);
    Json document = parse(json);
    ASSERT_NE(document, nullptr);
    // Totals: the same fields as each worker, without pid and listener.
    for (const char *name : counters) {
        number(document.get(), name);
    }
    EXPECT_EQ(number(document.get(), "streams"), 4);
    EXPECT_EQ(number(document.get(), "consumers"), 3);
    EXPECT_EQ(number(document.get(), "events_delivered"), 7);
    EXPECT_EQ(number(document.get(), "listener_reconnects"), 2);
    EXPECT_EQ(number(document.get(), "notifications_dropped"), 4);
    EXPECT_DOUBLE_EQ(number(document.get(), "last_notification_age_seconds"), 0.5);
    EXPECT_EQ(cJSON_GetObjectItemCaseSensitive(document.get(), "pid"), nullptr);
    // and age, workers, the holder's pid (shared listener), the source, the positioner's pid,
    // the schema version
    EXPECT_EQ(cJSON_GetArraySize(document.get()), counter_count + 6);
    EXPECT_EQ(number(document.get(), "listener_holder_pid"), 0);
    EXPECT_EQ(text(document.get(), "source"), "trigger");
    EXPECT_EQ(number(document.get(), "positioner_holder_pid"), 0);

    const cJSON *workers = cJSON_GetObjectItemCaseSensitive(document.get(), "workers");
    ASSERT_TRUE(cJSON_IsArray(workers));
    ASSERT_EQ(cJSON_GetArraySize(workers), 2);
    const cJSON *a = cJSON_GetArrayItem(workers, 0);
    const cJSON *b = cJSON_GetArrayItem(workers, 1);
    for (const cJSON *w : {a, b}) {
        for (const char *name : counters) {
            number(w, name);
        }
        EXPECT_EQ(cJSON_GetArraySize(w), counter_count + 3); // and pid, listener, age
    }
    EXPECT_EQ(number(a, "pid"), 10);
    EXPECT_EQ(text(a, "listener"), "listening");
    EXPECT_EQ(number(a, "streams"), 3);
    EXPECT_DOUBLE_EQ(number(a, "last_notification_age_seconds"), 1.0);
    EXPECT_EQ(number(b, "pid"), 11);
    EXPECT_EQ(text(b, "listener"), "connecting");
    EXPECT_EQ(number(b, "notifications_dropped"), 4);
}

TEST(Status, WalSourceShowsThePositionerItsWorkerAndItsLag) {
    std::vector<WorkerStats> workers = two_workers();
    for (WorkerStats &w : workers) {
        w.source_wal = 1;
    }
    workers[1].positioner_holder = 1;
    workers[1].positioner_lag_bytes = 4096;
    workers[1].positioner_lag_ms = 12;
    workers[1].positioned_rows = 99;
    Json document = parse(render_status_json(workers, 2000));
    ASSERT_NE(document, nullptr);
    EXPECT_EQ(text(document.get(), "source"), "wal");
    EXPECT_EQ(number(document.get(), "positioner_holder_pid"), 11);
    EXPECT_EQ(number(document.get(), "positioner_lag_bytes"), 4096);
    EXPECT_EQ(number(document.get(), "positioner_lag_ms"), 12);
    EXPECT_EQ(number(document.get(), "positioned_rows"), 99);
    std::string prom = render_status_prometheus(workers, 2000);
    EXPECT_NE(prom.find("event_piper_source_wal{pid=\"10\"} 1\n"), std::string::npos) << prom;
    EXPECT_NE(prom.find("event_piper_positioner_holder{pid=\"11\"} 1\n"), std::string::npos);
    EXPECT_NE(prom.find("event_piper_positioner_lag_bytes{pid=\"11\"} 4096\n"), std::string::npos);
}

TEST(Status, TheSchemaVersionIsTheNewestAListenerRead) {
    std::vector<WorkerStats> workers = two_workers();
    EXPECT_EQ(number(parse(render_status_json(workers, 2000)).get(), "schema_version"), 0);
    workers[0].schema_version = 1; // a worker that held the listener before the schema changed
    workers[1].schema_version = 2;
    Json document = parse(render_status_json(workers, 2000));
    ASSERT_NE(document, nullptr);
    EXPECT_EQ(number(document.get(), "schema_version"), 2);
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(document.get(), "workers");
    EXPECT_EQ(cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(list, 0), "schema_version"),
              nullptr); // not a per-worker JSON field: Prometheus has it per worker
    std::string prom = render_status_prometheus(workers, 2000);
    EXPECT_NE(prom.find("# TYPE event_piper_schema_version gauge\n"
                        "event_piper_schema_version{pid=\"10\"} 1\n"
                        "event_piper_schema_version{pid=\"11\"} 2\n"),
              std::string::npos)
        << prom;
}

TEST(Status, JsonKeepsEveryDigitOfLargeCounters) {
    WorkerStats w;
    w.pid = 1;
    w.bytes_sent = 18446744073709551615ULL; // a double would print 1.8446744073709552e+19
    std::string json = render_status_json({w}, 0);
    ASSERT_NE(parse(json), nullptr);
    EXPECT_NE(json.find("\"bytes_sent\":18446744073709551615,"), std::string::npos) << json;
}

TEST(Status, JsonWithoutNotificationsHasNullAge) {
    std::string json = render_status_json({}, 2000);
    EXPECT_NE(json.find("\"last_notification_age_seconds\":null"), std::string::npos) << json;
    EXPECT_NE(json.find("\"workers\":[]"), std::string::npos);
    Json document = parse(json);
    ASSERT_NE(document, nullptr);
    EXPECT_TRUE(cJSON_IsNull(
        cJSON_GetObjectItemCaseSensitive(document.get(), "last_notification_age_seconds")));
}

TEST(Status, HealthUpIsTheOriginalJsonAndDownSaysWhyInOneLine) {
    EXPECT_EQ(health_body(Health::Up), "{\"status\":\"UP\"}");
    EXPECT_EQ(health_body(Health::ListenerDown),
              "{\"status\":\"DOWN\",\"reason\":\"the listener is not connected to "
              "PostgreSQL\"}");
    for (Health h : {Health::Up, Health::ListenerDown, Health::NoHolder, Health::HolderFrozen,
                     Health::ChannelMismatch, Health::Unpositioned}) {
        Json document = parse(health_body(h));
        ASSERT_NE(document, nullptr);
        bool up = h == Health::Up;
        EXPECT_EQ(text(document.get(), "status"), up ? "UP" : "DOWN");
        EXPECT_EQ(cJSON_GetArraySize(document.get()), up ? 1 : 2);
        EXPECT_EQ(health_body(h).find('\n'), std::string::npos);
    }
    EXPECT_EQ(&health_body(Health::Up), &health_body(Health::Up)); // one string for the process
}

TEST(Status, HealthIsDownForTheFirstReasonThatStopsDelivery) {
    EXPECT_EQ(decide_health({}), Health::Up);
    EXPECT_EQ(decide_health({Health::HolderFrozen, true, 5}), Health::HolderFrozen);
    EXPECT_EQ(decide_health({Health::ListenerDown, false, 0}), Health::ListenerDown);
    EXPECT_EQ(decide_health({Health::Up, true, 5}), Health::ChannelMismatch);
    EXPECT_EQ(decide_health({Health::Up, false, 5}), Health::Unpositioned);
}

TEST(Status, PositionHintsAndTakeoversAreCounted) {
    WorkerStats w;
    w.pid = 10;
    w.position_hints = 3;
    w.listener_takeovers = 1;
    std::string json = render_status_json({w}, 2000);
    EXPECT_NE(json.find("\"position_hints\":3"), std::string::npos) << json;
    EXPECT_NE(json.find("\"listener_takeovers\":1"), std::string::npos) << json;
    std::string text = render_status_prometheus({w}, 2000);
    EXPECT_NE(text.find("event_piper_position_hints_total{pid=\"10\"} 3\n"), std::string::npos);
    EXPECT_NE(text.find("event_piper_listener_takeovers_total{pid=\"10\"} 1\n"), std::string::npos);
}

TEST(Status, PrometheusHasTypedMetricsPerWorker) {
    std::string text = render_status_prometheus(two_workers(), 2000);
    EXPECT_NE(text.find("# TYPE event_piper_streams gauge\n"), std::string::npos) << text;
    EXPECT_NE(text.find("event_piper_streams{pid=\"10\"} 3\n"), std::string::npos);
    EXPECT_NE(text.find("event_piper_streams{pid=\"11\"} 1\n"), std::string::npos);
    EXPECT_NE(text.find("event_piper_listener_up{pid=\"10\"} 1\n"), std::string::npos);
    EXPECT_NE(text.find("event_piper_events_delivered_total{pid=\"10\"} 7\n"), std::string::npos);
    EXPECT_NE(text.find("event_piper_last_notification_age_seconds 0.500\n"), std::string::npos);
}

namespace {

constexpr size_t stats_words = SharedWorkerStats::words;

// Figures whose every word is `v`.
WorkerStats all(uint64_t v) {
    uint64_t w[stats_words];
    for (uint64_t &x : w) {
        x = v;
    }
    WorkerStats s;
    std::memcpy(&s, w, sizeof w);
    return s;
}

// The value of every word, or -1 if they differ (figures of two publications mixed).
int64_t uniform(const WorkerStats &s) {
    uint64_t w[stats_words];
    std::memcpy(w, &s, sizeof w);
    for (uint64_t x : w) {
        if (x != w[0]) {
            return -1;
        }
    }
    return static_cast<int64_t>(w[0]);
}

// A slot as the status zone has it: zeroed memory.
std::unique_ptr<SharedWorkerStats> zeroed() {
    return std::make_unique<SharedWorkerStats>();
}

} // namespace

TEST(SharedWorkerStatsTest, ZeroedMemoryReadsAsZeroFiguresThenTheLastStore) {
    auto shared = zeroed();
    WorkerStats s = all(7);
    ASSERT_TRUE(shared->load(s));
    EXPECT_EQ(uniform(s), 0);
    WorkerStats w;
    w.pid = 12;
    w.streams = 3;
    w.schema_version = 2;
    shared->store(w);
    ASSERT_TRUE(shared->load(s));
    EXPECT_EQ(s.pid, 12);
    EXPECT_EQ(s.streams, 3u);
    EXPECT_EQ(s.schema_version, 2u);
    shared->store(all(5));
    shared->store(all(6));
    ASSERT_TRUE(shared->load(s));
    EXPECT_EQ(uniform(s), 6);
}

// A writer stopped half-way through a store (SIGSTOP): the copy it writes has an odd count and
// is half new; readers get the previous store, whole. Once that copy is whole again, it is read.
TEST(SharedWorkerStatsTest, AWriterStoppedHalfWayLeavesThePreviousStoreWhole) {
    auto shared = zeroed();
    shared->store(all(1)); // copy 1, count 2
    shared->store(all(2)); // copy 0, count 4
    EXPECT_EQ(shared->copy[1].seq.load(), 2u);
    EXPECT_EQ(shared->copy[0].seq.load(), 4u);
    SharedWorkerStats::Copy &writing = shared->copy[1]; // store 3
    writing.seq = 5;
    for (size_t i = 0; i < stats_words / 2; ++i) {
        writing.word[i] = 3;
    }
    WorkerStats s;
    ASSERT_TRUE(shared->load(s));
    EXPECT_EQ(uniform(s), 2);
    for (size_t i = stats_words / 2; i < stats_words; ++i) {
        writing.word[i] = 3;
    }
    writing.seq = 6;
    ASSERT_TRUE(shared->load(s));
    EXPECT_EQ(uniform(s), 3);
}

// A writer killed half-way through its first store leaves an odd count; the slot's next owner
// stores after it, and the figures read are its own.
TEST(SharedWorkerStatsTest, TheNextOwnerStoresAfterACopyLeftHalfWritten) {
    auto shared = zeroed();
    shared->copy[1].seq = 1; // store 1 died half-way
    shared->copy[1].word[0] = 99;
    WorkerStats s;
    ASSERT_TRUE(shared->load(s));
    EXPECT_EQ(uniform(s), 0);
    shared->store(all(4)); // store 2: copy 0
    ASSERT_TRUE(shared->load(s));
    EXPECT_EQ(uniform(s), 4);
    shared->store(all(5)); // store 3: copy 1 again, whole
    EXPECT_EQ(shared->copy[1].seq.load(), 6u);
    ASSERT_TRUE(shared->load(s));
    EXPECT_EQ(uniform(s), 5);
}

// A writer and a reader at once (as a worker publishes while another renders /status): every
// read is one whole store, and never older than the read before it. Runs until the reader has
// seen the figures change 5,000 times (or for 2 s on a machine too loaded to run both at once).
TEST(SharedWorkerStatsTest, AReaderNeverSeesTwoStoresMixed) {
    auto shared = zeroed();
    std::atomic<bool> stop{false};
    std::thread writer([&] {
        for (uint64_t v = 1; !stop.load(std::memory_order_relaxed); ++v) {
            shared->store(all(v));
        }
    });
    uint64_t reads = 0, changes = 0, mixed = 0, backwards = 0, failed = 0;
    int64_t last = 0;
    auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (changes < 5000 && (reads % 1024 != 0 || std::chrono::steady_clock::now() < until)) {
        WorkerStats s;
        if (!shared->load(s)) {
            ++failed;
            EXPECT_EQ(uniform(s), 0);
            continue;
        }
        int64_t v = uniform(s);
        mixed += v < 0 ? 1 : 0;
        backwards += v >= 0 && v < last ? 1 : 0;
        changes += v > last ? 1 : 0;
        last = v >= 0 ? v : last;
        ++reads;
    }
    stop = true;
    writer.join();
    EXPECT_EQ(mixed, 0u) << "of " << reads << " reads";
    EXPECT_EQ(backwards, 0u);
    // A writer that stores without pause may outrun a reader's tries now and then (ours store
    // once a second); a failed load reads as zero figures, never as mixed ones.
    EXPECT_LT(failed * 1000, reads) << failed << " failed loads";
}
