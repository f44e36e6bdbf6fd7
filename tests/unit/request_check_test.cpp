// Client input validation: consumer ids and Last-Event-ID.
#include "request_check.hpp"

#include <gtest/gtest.h>

using namespace event_piper;

TEST(Consumer, Accepts) {
    EXPECT_EQ(check_consumer("toto"), ConsumerCheck::Ok);
    EXPECT_EQ(check_consumer("a'b\"c\\d; drop table events;--"), ConsumerCheck::Ok);
    EXPECT_EQ(check_consumer(std::string(256, 'x')), ConsumerCheck::Ok);
    EXPECT_EQ(check_consumer("\xc3\xa9t\xc3\xa9"), ConsumerCheck::Ok);
}

TEST(Consumer, Refuses) {
    EXPECT_EQ(check_consumer(""), ConsumerCheck::Missing);
    EXPECT_EQ(check_consumer(std::string(257, 'x')), ConsumerCheck::TooLong);
    EXPECT_EQ(check_consumer("to\rto"), ConsumerCheck::ControlCharacter);
    EXPECT_EQ(check_consumer("to\nto"), ConsumerCheck::ControlCharacter);
    EXPECT_EQ(check_consumer(std::string("to\0to", 5)), ConsumerCheck::ControlCharacter);
    EXPECT_EQ(check_consumer("tab\there"), ConsumerCheck::ControlCharacter);
    EXPECT_EQ(check_consumer("del\x7f"), ConsumerCheck::ControlCharacter);
}

TEST(Consumer, ErrorTextsAreOneLine) {
    for (auto c :
         {ConsumerCheck::Missing, ConsumerCheck::TooLong, ConsumerCheck::ControlCharacter}) {
        std::string_view text = consumer_error_text(c);
        ASSERT_FALSE(text.empty());
        EXPECT_EQ(text.find('\n'), text.size() - 1);
    }
}

TEST(LastEventId, Accepts) {
    EXPECT_EQ(parse_last_event_id("0"), 0);
    EXPECT_EQ(parse_last_event_id("5"), 5);
    EXPECT_EQ(parse_last_event_id("9223372036854775807"), INT64_MAX);
    // Leading zeros, within 19 digits in all.
    EXPECT_EQ(parse_last_event_id("05"), 5);
    EXPECT_EQ(parse_last_event_id("0000000000000000005"), 5);
    EXPECT_FALSE(parse_last_event_id("00000000000000000005").has_value());
}

TEST(LastEventId, Refuses) {
    for (const char *bad : {"", "-1", "+1", " 5", "5 ", "5x", "abc", "1.5", "0x10",
                            "9223372036854775808", "99999999999999999999999"}) {
        EXPECT_FALSE(parse_last_event_id(bad).has_value()) << bad;
    }
}

TEST(Consumer, RefusesMalformedUtf8) {
    for (const char *bad : {"\xff", "abc\xc3", "\xc3\x28", "\xc0\xaf", "\xe0\x80\xaf",
                            "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xf8\x88\x80\x80\x80"}) {
        EXPECT_EQ(check_consumer(bad), ConsumerCheck::NotUtf8) << bad;
    }
    for (const char *good : {"\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x98\x80", "\xef\xbf\xbf"}) {
        EXPECT_EQ(check_consumer(good), ConsumerCheck::Ok) << good;
    }
}

TEST(Consumer, PercentDecoding) {
    EXPECT_EQ(percent_decode("alice%40example.com"), "alice@example.com");
    // application/x-www-form-urlencoded, as URLSearchParams writes it: '+' is a space, a plus
    // is %2B.
    EXPECT_EQ(percent_decode("a+b%2Bc"), "a b+c");
    EXPECT_EQ(percent_decode("team+7%20a++"), "team 7 a  ");
    EXPECT_EQ(percent_decode("%c3%A9t%C3%a9"), "\xc3\xa9t\xc3\xa9");
    EXPECT_EQ(percent_decode("plain"), "plain");
    EXPECT_EQ(percent_decode("%00"), std::string("\0", 1));
    EXPECT_EQ(percent_decode("50%"), std::nullopt);
    EXPECT_EQ(percent_decode("%4"), std::nullopt);
    EXPECT_EQ(percent_decode("%zz"), std::nullopt);
    // Decoded bytes are checked like any id.
    EXPECT_EQ(check_consumer(*percent_decode("%0a")), ConsumerCheck::ControlCharacter);
    EXPECT_EQ(check_consumer(*percent_decode("%ff")), ConsumerCheck::NotUtf8);
}

TEST(Consumer, HeaderOfVariable) {
    EXPECT_EQ(header_of_variable("$http_x_consumer_id"), "x_consumer_id");
    EXPECT_EQ(header_of_variable("$arg_consumer"), "");
    EXPECT_EQ(header_of_variable("$http_x_consumer_id$arg_x"), "");
    EXPECT_EQ(header_of_variable("$http_"), "");
    EXPECT_EQ(header_of_variable("user-$http_x"), "");
    EXPECT_TRUE(header_matches_variable("X-Consumer-Id", "x_consumer_id"));
    EXPECT_TRUE(header_matches_variable("x-consumer-id", "x_consumer_id"));
    EXPECT_FALSE(header_matches_variable("X-Consumer-Ids", "x_consumer_id"));
    EXPECT_FALSE(header_matches_variable("X-Consumer", "x_consumer_id"));
}

TEST(ConsumerIds, TheConsumerAloneWhenThereIsNoList) {
    std::string error;
    EXPECT_EQ(consumer_ids("toto", "", false, error), std::vector<std::string>{"toto"});
    // The consumer itself may hold the separator: it is never split.
    EXPECT_EQ(consumer_ids("a,b", "", false, error), std::vector<std::string>{"a,b"});
}

TEST(Consumer, OneIdFromTheRequest) {
    // Blanks at either end dropped, before decoding and (spaces) after: as for listed ids.
    EXPECT_EQ(consumer_id_from("alice", false), "alice");
    EXPECT_EQ(consumer_id_from(" \talice \t", false), "alice");
    EXPECT_EQ(consumer_id_from("a b", false), "a b");
    EXPECT_EQ(consumer_id_from("+alice%20", false), "+alice%20"); // literal without urldecode
    EXPECT_EQ(consumer_id_from("+alice%20", true), "alice");
    EXPECT_EQ(consumer_id_from("%20+alice+smith++", true), "alice smith");
    EXPECT_EQ(consumer_id_from("alice%2B", true), "alice+");
    EXPECT_EQ(consumer_id_from(" alice%40example.com ", true), "alice@example.com");
    // Only blanks: an empty id, which check_consumer calls missing (401).
    EXPECT_EQ(consumer_id_from("+%20+", true), "");
    EXPECT_EQ(consumer_id_from(" \t ", false), "");
    EXPECT_EQ(check_consumer(*consumer_id_from("+", true)), ConsumerCheck::Missing);
    // A decoded tab stays, and is refused; so is a bad escape.
    EXPECT_EQ(consumer_id_from("alice%09", true), "alice\t");
    EXPECT_EQ(check_consumer(*consumer_id_from("alice%09", true)), ConsumerCheck::ControlCharacter);
    EXPECT_EQ(consumer_id_from(" alice%4 ", true), std::nullopt);
    EXPECT_EQ(consumer_id_from("alice%4", false), "alice%4");
}

TEST(ConsumerIds, ListItemsTrimmedDecodedAndDeduplicated) {
    std::string error;
    EXPECT_EQ(consumer_ids("alice", "team-7, everyone", false, error),
              (std::vector<std::string>{"alice", "team-7", "everyone"}));
    EXPECT_EQ(consumer_ids("alice", " everyone ,alice,\teveryone", false, error),
              (std::vector<std::string>{"alice", "everyone"}));
    EXPECT_EQ(consumer_ids("alice", "a%2Cb,c%40d", true, error),
              (std::vector<std::string>{"alice", "a,b", "c@d"}));
    EXPECT_EQ(consumer_ids("alice", "a%2Cb", false, error),
              (std::vector<std::string>{"alice", "a%2Cb"}));
    // Encoded blanks at either end go too (encodeURIComponent("everyone, team-7") split by
    // hand): " team-7" would be an id that no writer means.
    EXPECT_EQ(consumer_ids("alice", "everyone,%20team-7%20%20", true, error),
              (std::vector<std::string>{"alice", "everyone", "team-7"}));
    EXPECT_TRUE(consumer_ids("alice", "team-7%09", true, error).empty()); // a tab: refused
    EXPECT_EQ(error, "in the consumer id list: consumer id contains control characters\n");
    EXPECT_EQ(consumer_ids("alice", "a%20b", true, error),
              (std::vector<std::string>{"alice", "a b"}));
    // URLSearchParams({groups: "everyone, team 7"}) sends "everyone%2C+team+7": the comma is
    // inside an item then; "everyone,+team+7" (a literal comma) is two ids.
    EXPECT_EQ(consumer_ids("alice", "everyone,+team+7+", true, error),
              (std::vector<std::string>{"alice", "everyone", "team 7"}));
    EXPECT_EQ(consumer_ids("alice", "everyone%2C+team+7", true, error),
              (std::vector<std::string>{"alice", "everyone, team 7"}));
    EXPECT_EQ(consumer_ids("alice", "a+b", false, error),
              (std::vector<std::string>{"alice", "a+b"}));
    EXPECT_TRUE(consumer_ids("alice", "a,+", true, error).empty());
    EXPECT_EQ(error, "consumer id list has an empty id\n");
    EXPECT_TRUE(consumer_ids("alice", "a,%20", true, error).empty());
    EXPECT_EQ(error, "consumer id list has an empty id\n");
}

TEST(ConsumerIds, RefusesEmptyBadAndTooManyIds) {
    std::string error;
    for (std::string_view list : {"a,,b", "a,", ",a", " , ", "a, ,b"}) {
        error.clear();
        EXPECT_TRUE(consumer_ids("alice", list, false, error).empty()) << list;
        EXPECT_EQ(error, "consumer id list has an empty id\n");
    }
    EXPECT_TRUE(consumer_ids("alice", "ok,bad\x01", false, error).empty());
    EXPECT_EQ(error, "in the consumer id list: consumer id contains control characters\n");
    EXPECT_TRUE(consumer_ids("alice", "%ff", true, error).empty());
    EXPECT_EQ(error, "in the consumer id list: consumer id is not valid UTF-8\n");
    EXPECT_TRUE(consumer_ids("alice", "%zz", true, error).empty());
    EXPECT_TRUE(consumer_ids("alice", std::string(257, 'x'), false, error).empty());
    std::string list;
    for (int i = 1; i < 64; ++i) {
        list += (i > 1 ? "," : "") + std::to_string(i);
    }
    EXPECT_EQ(consumer_ids("alice", list, false, error).size(), 64u); // at the limit
    EXPECT_TRUE(consumer_ids("alice", list + ",64", false, error).empty());
    EXPECT_EQ(error, "more than 64 consumer ids in one stream\n");
}

TEST(ConninfoErrorForLog, KeepsOptionNamesAndDropsQuotedStrings) {
    EXPECT_EQ(conninfo_error_for_log("invalid connection option \"bogus_option\"\n"),
              "invalid connection option \"bogus_option\"");
    // libpq quotes the whole URI (password included) or the offending token.
    EXPECT_EQ(conninfo_error_for_log("end of string reached when looking for matching \"]\" in "
                                     "IPv6 host address in URI: \"postgresql://u:s3cret@[::1\"\n"),
              "end of string reached when looking for matching \"]\" in IPv6 host address in "
              "URI: \"...\"");
    EXPECT_EQ(conninfo_error_for_log("missing \"=\" after \"password\" in connection info "
                                     "string\n"),
              "missing \"=\" after \"password\" in connection info string");
    EXPECT_EQ(conninfo_error_for_log("invalid URI query parameter: \"s3cret\""),
              "invalid URI query parameter: \"...\"");
    EXPECT_EQ(conninfo_error_for_log("invalid percent-encoded token: \"pa%zzss\"\n"),
              "invalid percent-encoded token: \"...\"");
    EXPECT_EQ(conninfo_error_for_log("a \"dangling quote\nsecond line"),
              "a \"dangling quote second line");
}

TEST(FoldedChoice, OnOffAndRefusals) {
    for (const char *on : {"1", "on", "ON", "yes", "True"}) {
        EXPECT_EQ(parse_folded_choice(on), std::optional<bool>(true)) << on;
    }
    for (const char *off : {"", "0", "off", "No", "FALSE"}) {
        EXPECT_EQ(parse_folded_choice(off), std::optional<bool>(false)) << off;
    }
    for (const char *bad : {"2", "onn", " on", "folded", "y"}) {
        EXPECT_FALSE(parse_folded_choice(bad).has_value()) << bad;
    }
}
