// Parsing the trigger's notification payloads (postgresql/schema.sql).
#include "notification.hpp"

#include <gtest/gtest.h>

using namespace event_piper;

TEST(Notification, WholeEvent) {
    Notification n;
    ASSERT_TRUE(parse_notification("e 12 4 6\ntotoinsert{\"foo\": \"bar\"}", n));
    EXPECT_EQ(n.kind, Notification::Kind::Event);
    EXPECT_EQ(n.position, 12);
    EXPECT_EQ(n.subscriber, "toto");
    EXPECT_EQ(n.type, "insert");
    EXPECT_EQ(n.payload, "{\"foo\": \"bar\"}");
}

TEST(Notification, SubscriberWithSpacesAndNewlinesIsLengthDelimited) {
    Notification n;
    std::string text = "e 1 5 1\na \nb\"t[]";
    ASSERT_TRUE(parse_notification(text, n));
    EXPECT_EQ(n.subscriber, "a \nb\"");
    EXPECT_EQ(n.type, "t");
    EXPECT_EQ(n.payload, "[]");
}

TEST(Notification, Reference) {
    Notification n;
    ASSERT_TRUE(parse_notification("r 99 4\ntoto", n));
    EXPECT_EQ(n.kind, Notification::Kind::Reference);
    EXPECT_EQ(n.position, 99);
    EXPECT_EQ(n.subscriber, "toto");
}

TEST(Notification, BarePosition) {
    Notification n;
    ASSERT_TRUE(parse_notification("p 7", n));
    EXPECT_EQ(n.kind, Notification::Kind::Position);
    EXPECT_EQ(n.position, 7);
}

TEST(Notification, RejectsMalformed) {
    Notification n;
    for (const char *bad :
         {"", "e", "x 1", "p", "p -1", "p 0", "p 1x", "r 1 5\ntoto", "r 1 3\ntoto", "e 1 4 6\ntoto",
          "e 1 4 6\ntotoinsert", "e 1 99 1\nab", "{\"id\": 1}", "e a 1 1\nabc"}) {
        EXPECT_FALSE(parse_notification(bad, n)) << bad;
    }
}
