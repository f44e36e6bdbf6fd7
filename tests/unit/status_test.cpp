// Rendering of instance-wide status from the workers' slots.
#include "status.hpp"

#include <gtest/gtest.h>

using namespace event_piper;

namespace {
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

TEST(Status, JsonWithoutNotificationsHasNullAge) {
    std::string json = render_status_json({}, 2000);
    EXPECT_NE(json.find("\"last_notification_age_seconds\":null"), std::string::npos) << json;
    EXPECT_NE(json.find("\"workers\":[]"), std::string::npos);
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
