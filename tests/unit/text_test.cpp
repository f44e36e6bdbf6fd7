// The shared text helpers: integers in decimal, libpq messages as one log line.
#include "text.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>

namespace event_piper {
namespace {

TEST(Text, IntegersInDecimal) {
    EXPECT_EQ(to_text(0), "0");
    EXPECT_EQ(to_text(int64_t{-42}), "-42");
    EXPECT_EQ(to_text(std::numeric_limits<int64_t>::max()), "9223372036854775807");
    EXPECT_EQ(to_text(std::numeric_limits<uint64_t>::max()), "18446744073709551615");
    EXPECT_EQ(to_text(size_t{256}), "256");
    std::string out = "id: ";
    append_decimal(out, int64_t{17});
    EXPECT_EQ(out, "id: 17");
}

TEST(Text, MessagesWithoutTheirLineEnds) {
    EXPECT_EQ(without_line_end("ERROR:  boom\n"), "ERROR:  boom");
    EXPECT_EQ(without_line_end("a\r\n\n"), "a");
    EXPECT_EQ(without_line_end("\n"), "");
    EXPECT_EQ(without_line_end("a\nb"), "a\nb");
}

TEST(Text, MessagesAsOneLogLine) {
    EXPECT_EQ(one_line("server closed the connection unexpectedly\n\tThis probably means the "
                       "server terminated abnormally\n"),
              "server closed the connection unexpectedly  This probably means the server "
              "terminated abnormally");
    EXPECT_EQ(one_line("a\r\nb\n\n"), "a  b");
    EXPECT_EQ(one_line(""), "");
}

} // namespace
} // namespace event_piper
