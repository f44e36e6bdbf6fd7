// Parsing the trigger's notification payloads (postgresql/schema.sql).
#include "notification.hpp"

#include "grammar.hpp"

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

TEST(Notifications, OneEventFormatsStillParse) {
    std::vector<Notification> v;
    ASSERT_TRUE(parse_notifications("e 12 4 6\ntotoinsert{}", v));
    ASSERT_EQ(v.size(), 1u);
    EXPECT_EQ(v[0].kind, Notification::Kind::Event);
    EXPECT_EQ(v[0].payload, "{}");
    ASSERT_TRUE(parse_notifications("r 99 4\ntoto", v));
    ASSERT_EQ(v.size(), 1u);
    EXPECT_EQ(v[0].kind, Notification::Kind::Reference);
    ASSERT_TRUE(parse_notifications("p 7", v));
    ASSERT_EQ(v.size(), 1u);
    EXPECT_EQ(v[0].position, 7);
    EXPECT_FALSE(parse_notifications("{\"id\": 1}", v)); // the original service's row_to_json
    EXPECT_TRUE(v.empty());
}

TEST(Notifications, SeveralEventsOfOneTransaction) {
    std::vector<Notification> v;
    std::string text = "b\n"
                       "41 4 6 10\ntotoinsert{\"foo\": 1}"
                       "42 5 1 2\na \nb\"t[]"
                       "44 4 6 10\ntitiinsert{\"foo\": 3}";
    ASSERT_TRUE(parse_notifications(text, v));
    ASSERT_EQ(v.size(), 3u);
    EXPECT_EQ(v[0].kind, Notification::Kind::Event);
    EXPECT_EQ(v[0].position, 41);
    EXPECT_EQ(v[0].subscriber, "toto");
    EXPECT_EQ(v[0].type, "insert");
    EXPECT_EQ(v[0].payload, "{\"foo\": 1}");
    EXPECT_EQ(v[1].position, 42);
    EXPECT_EQ(v[1].subscriber, "a \nb\"");
    EXPECT_EQ(v[1].type, "t");
    EXPECT_EQ(v[1].payload, "[]");
    EXPECT_EQ(v[2].position, 44);
    EXPECT_EQ(v[2].subscriber, "titi");
    EXPECT_EQ(v[2].payload, "{\"foo\": 3}");
}

TEST(Notifications, MalformedBatchesDeliverNothing) {
    std::vector<Notification> v;
    for (const char *bad : {
             "b\n",                                           // no event
             "b\n1 4 6 2\ntotoinsert{}2",                     // trailing bytes
             "b\n1 4 6 3\ntotoinsert{}",                      // payload shorter than announced
             "b\n1 4 6 0\ntotoinsert",                        // empty payload
             "b\n2 4 6 2\ntotoinsert{}1 4 6 2\ntotoinsert{}", // positions not increasing
             "b\n0 4 6 2\ntotoinsert{}",                      // position 0
             "b\n1 4 6\ntotoinsert{}",                        // header too short
             "b 1 4 6 2\ntotoinsert{}",                       // not a batch header
         }) {
        EXPECT_FALSE(parse_notifications(bad, v)) << bad;
        EXPECT_TRUE(v.empty()) << bad;
    }
}

TEST(Notification, PatchCarriesItsTargetsPosition) {
    Notification n;
    ASSERT_TRUE(parse_notification("e 12 4 5 7\ntotoorder{\"a\": null}", n));
    EXPECT_EQ(n.kind, Notification::Kind::Event);
    EXPECT_EQ(n.position, 12);
    EXPECT_EQ(n.target, 7);
    EXPECT_EQ(n.subscriber, "toto");
    EXPECT_EQ(n.type, "order");
    EXPECT_EQ(n.payload, "{\"a\": null}");
    ASSERT_TRUE(parse_notification("e 12 4 5\ntotoorder{}", n));
    EXPECT_EQ(n.target, 0); // a plain event
}

TEST(Notification, RejectsMalformedPatches) {
    Notification n;
    // No target, a target that is not a number, not positive, not before the patch, or followed
    // by anything but the line break.
    for (const char *bad :
         {"e 12 4 5 \ntotoorder{}", "e 12 4 5 x\ntotoorder{}", "e 12 4 5 0\ntotoorder{}",
          "e 12 4 5 12\ntotoorder{}", "e 12 4 5 13\ntotoorder{}", "e 12 4 5 7 \ntotoorder{}",
          "e 12 4 5-7\ntotoorder{}", "e 12 4 5 -7\ntotoorder{}"}) {
        EXPECT_FALSE(parse_notification(bad, n)) << bad;
    }
}

TEST(Notifications, BatchWithPatches) {
    std::vector<Notification> v;
    ASSERT_TRUE(parse_notifications("b\n3 4 1 8\ntotox{\"z\": 1}4 4 2 8 3\ntotoxp{\"z\": 2}"
                                    "5 4 2 4 1\ntotoxpnull",
                                    v));
    ASSERT_EQ(v.size(), 3u);
    EXPECT_EQ(v[0].target, 0);
    EXPECT_EQ(v[0].payload, "{\"z\": 1}");
    EXPECT_EQ(v[1].position, 4);
    EXPECT_EQ(v[1].target, 3);
    EXPECT_EQ(v[1].type, "xp");
    EXPECT_EQ(v[1].payload, "{\"z\": 2}");
    EXPECT_EQ(v[2].target, 1);
    EXPECT_EQ(v[2].payload, "null");
    EXPECT_FALSE(parse_notifications("b\n4 4 2 8 4\ntotoxp{\"z\": 2}", v));
    EXPECT_FALSE(parse_notifications("b\n4 4 2 8 x\ntotoxp{\"z\": 2}", v));
    EXPECT_TRUE(v.empty());
}

// The grammar at its limits (docs/notification-grammar.md, grammar.hpp): the largest notification
// of each form parses whole; test_grammar.py checks that the trigger builds exactly these.
namespace {

std::string repeat(size_t n, char c) {
    return std::string(n, c);
}

} // namespace

TEST(NotificationGrammar, TheFormsLettersAndSeparators) {
    std::vector<Notification> v;
    std::string e{grammar::form_event, grammar::field_separator};
    e += "3 1 1";
    e += grammar::header_end;
    e += "st{}";
    ASSERT_TRUE(parse_notifications(e, v));
    EXPECT_EQ(v[0].kind, Notification::Kind::Event);
    std::string b{grammar::form_batch, grammar::header_end};
    ASSERT_TRUE(parse_notifications(b + "3 1 1 2\nst{}", v));
    ASSERT_TRUE(parse_notifications(std::string{grammar::form_reference, ' '} + "3 1\ns", v));
    EXPECT_EQ(v[0].kind, Notification::Kind::Reference);
    ASSERT_TRUE(parse_notifications(std::string{grammar::form_position, ' '} + "3", v));
    EXPECT_EQ(v[0].kind, Notification::Kind::Position);
}

TEST(NotificationGrammar, TheLargestOfEachFormParses) {
    std::vector<Notification> v;
    // "e": event_below - 1 bytes, with a target.
    std::string head = "e 12 4 6 7\n";
    std::string e = head + "totoinsert" +
                    repeat(grammar::event_below - 1 - head.size() - 10, '1'); // a JSON number
    ASSERT_EQ(e.size(), grammar::event_below - 1);
    ASSERT_TRUE(parse_notifications(e, v));
    EXPECT_EQ(v[0].target, 7);
    EXPECT_EQ(v[0].payload.size(), e.size() - head.size() - 10);
    // "r": the longest subscriber that is notified.
    std::string sub = repeat(grammar::subscriber_below - 1, 's');
    std::string r = "r 9223372036854775807 " + std::to_string(sub.size()) + "\n" + sub;
    EXPECT_LT(r.size(), grammar::notify_payload_limit);
    ASSERT_TRUE(parse_notifications(r, v));
    EXPECT_EQ(v[0].subscriber.size(), grammar::subscriber_below - 1);
    // "b": batch_max bytes, two records, the second of batch_event_max bytes.
    std::string first = "1 1 1 2\nst{}";
    std::string second_head = "2 1 1 " + std::to_string(grammar::batch_event_max - 2) + "\n";
    std::string second = second_head + "st" + repeat(grammar::batch_event_max - 2, '2');
    std::string pad = "3 1 1 ";
    std::string records = first + second;
    size_t room = grammar::batch_records_max - records.size();
    // A third record that fills the batch to the byte: "3 1 1 <n>\nst<n bytes>".
    size_t n = 1;
    while (pad.size() + std::to_string(n).size() + 3 + n < room) {
        ++n;
    }
    records += pad + std::to_string(n) + "\nst" + repeat(n, '3');
    ASSERT_EQ(records.size(), grammar::batch_records_max);
    std::string batch = "b\n" + records;
    ASSERT_EQ(batch.size(), grammar::batch_max);
    ASSERT_TRUE(parse_notifications(batch, v));
    ASSERT_EQ(v.size(), 3u);
    EXPECT_EQ(v[1].subscriber.size() + v[1].type.size() + v[1].payload.size(),
              grammar::batch_event_max);
    EXPECT_EQ(v[2].payload.size(), n);
}
