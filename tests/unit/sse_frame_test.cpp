// SSE framing and JSON compaction: the exact bytes a client sees.
#include "sse_frame.hpp"

#include <gtest/gtest.h>

using namespace event_piper;

TEST(SseFrame, OriginalWalkthroughEvent) {
    std::string out;
    append_event_frame(out, 1, "insert", R"({"foo": "bar"})");
    EXPECT_EQ(out, "id: 1\nevent: insert\ndata: {\"foo\":\"bar\"}\n\n");
}

TEST(SseFrame, AppendsToExistingBytes) {
    std::string out = "x";
    append_event_frame(out, 42, "t", "[1, 2]");
    EXPECT_EQ(out, "xid: 42\nevent: t\ndata: [1,2]\n\n");
}

TEST(SseFrame, LineBreaksInPayloadBecomeSeveralDataLines) {
    std::string out;
    append_event_frame(out, 3, "t", "\"a\nb\r\nc\rd\"");
    EXPECT_EQ(out, "id: 3\nevent: t\ndata: \"a\ndata: b\ndata: c\ndata: d\"\n\n");
}

TEST(SseFrame, PayloadCannotInjectFields) {
    // jsonb escapes newlines inside strings, so the text stays on one data line.
    std::string out;
    append_event_frame(out, 7, "t", R"({"x": "\n\nid: 999"})");
    EXPECT_EQ(out, "id: 7\nevent: t\ndata: {\"x\":\"\\n\\nid: 999\"}\n\n");
}

TEST(SseFrame, LineBreaksAreRemovedFromType) {
    std::string out;
    append_event_frame(out, 1, "in\r\nsert\nid: 5", "1");
    EXPECT_EQ(out, "id: 1\nevent: insertid: 5\ndata: 1\n\n");
}

TEST(SseFrame, HeartbeatHasNoId) {
    EXPECT_EQ(heartbeat_frame(), "event: heartbeat\ndata: \n\n");
}

TEST(SseFrame, Retry) {
    std::string out;
    append_retry_frame(out, 2000);
    EXPECT_EQ(out, "retry: 2000\n\n");
}

TEST(CompactJson, DropsWhitespaceOutsideStrings) {
    std::string out;
    append_compact_json(out, "{\"a b\": [1, 2, {\"c\": \"d e\"}],\n\t\"f\": null}");
    EXPECT_EQ(out, "{\"a b\":[1,2,{\"c\":\"d e\"}],\"f\":null}");
}

TEST(CompactJson, KeepsEscapedQuotesAndBackslashes) {
    std::string out;
    append_compact_json(out, R"({"q": "say \"hi there\" \\", "r": "\\"})");
    EXPECT_EQ(out, R"({"q":"say \"hi there\" \\","r":"\\"})");
}

TEST(CompactJson, KeepsEveryDigitOfNumbers) {
    std::string out;
    append_compact_json(out, R"({"big": 12345678901234567890123, "f": 0.1000000000000000055511})");
    EXPECT_EQ(out, R"({"big":12345678901234567890123,"f":0.1000000000000000055511})");
}

TEST(CompactJson, Utf8PassesThrough) {
    std::string out;
    append_compact_json(out, "{\"é\": \"日本 語\"}");
    EXPECT_EQ(out, "{\"é\":\"日本 語\"}");
}

TEST(SseFrame, PatchNamesItsTargetInTheJsonData) {
    std::string out;
    append_target_frame(out, 42, 17, TargetMember::Patch, "order",
                        R"({"status": "delivered", "n": 12345678901234567890, "x": null})");
    EXPECT_EQ(out, "id: 42\nevent: patch\ndata: {\"target\":17,\"type\":\"order\",\"patch\":"
                   "{\"status\":\"delivered\",\"n\":12345678901234567890,\"x\":null}}\n\n");
}

TEST(SseFrame, FoldedStateAndTombstone) {
    std::string out;
    append_target_frame(out, 9, 3, TargetMember::State, "t", "[1, 2]");
    append_target_frame(out, 10, 4, TargetMember::State, "t", "null");
    EXPECT_EQ(out, "id: 9\nevent: patch\ndata: {\"target\":3,\"type\":\"t\",\"state\":[1,2]}\n\n"
                   "id: 10\nevent: patch\ndata: {\"target\":4,\"type\":\"t\",\"state\":null}\n\n");
}

TEST(SseFrame, TypeInsideThePatchDataIsAJsonString) {
    std::string out;
    append_json_string(out, std::string("a\"b\\c\x01\td\xc3\xa9", 10));
    EXPECT_EQ(out, "\"a\\\"b\\\\c\\u0001\\u0009d\xc3\xa9\"");
    out.clear();
    // A type with a line break (refused by the schema) still cannot break the frame.
    append_target_frame(out, 1, 1, TargetMember::Patch, "a\nb", "{}");
    EXPECT_EQ(out,
              "id: 1\nevent: patch\ndata: {\"target\":1,\"type\":\"a\\u000ab\",\"patch\":{}}\n\n");
}

TEST(SseFrame, HistoryGoneHasNoIdAndNamesBothPositions) {
    std::string out;
    append_history_gone_frame(out, 5, 1200);
    EXPECT_EQ(out, "event: history-gone\ndata: {\"last_event_id\":5,\"removed_upto\":1200}\n\n");
}
