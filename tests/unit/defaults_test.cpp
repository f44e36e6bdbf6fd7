// The README states the defaults and limits that src/core/defaults.hpp defines: its directive
// table ("Configuration"), the HTTP contract and "Limits". Either changed alone fails here.
#include "defaults.hpp"
#include "text.hpp"

#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace event_piper {
namespace {

// README.md of this checkout: next to tests/, found from this file's path (relative paths are
// the build's, which runs from the top of the checkout, as the tests do).
std::string read_readme() {
    std::string here = __FILE__;
    std::string top = here.substr(0, here.rfind("tests/unit/"));
    std::ifstream in(top + "README.md");
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
}

struct Row {
    std::string context;
    std::string default_value;
    std::string meaning;
};

// The cells of a Markdown table row; "\|" is a pipe inside a cell.
std::vector<std::string> cells(const std::string &line) {
    std::vector<std::string> out;
    std::string cell;
    for (size_t i = 1; i < line.size(); ++i) {
        if (line[i] == '|' && line[i - 1] != '\\') {
            size_t first = cell.find_first_not_of(' ');
            size_t last = cell.find_last_not_of(' ');
            out.push_back(first == std::string::npos ? "" : cell.substr(first, last - first + 1));
            cell.clear();
        } else {
            cell.push_back(line[i]);
        }
    }
    return out;
}

// The table of section "Configuration", by directive name.
std::map<std::string, Row> directive_table(const std::string &readme) {
    std::map<std::string, Row> rows;
    size_t at = readme.find("\n## Configuration\n");
    size_t end = readme.find("\n## ", at + 1);
    std::istringstream lines(readme.substr(at, end - at));
    std::string line;
    while (std::getline(lines, line)) {
        if (line.rfind("| `event_piper", 0) != 0) {
            continue;
        }
        std::vector<std::string> c = cells(line);
        if (c.size() < 4) {
            continue;
        }
        std::string name = c[0].substr(1, c[0].find_first_of(" ;`", 1) - 1);
        rows[name] = Row{c[1], c[2], c[3]};
    }
    return rows;
}

std::string code(const std::string &text) {
    return "`" + text + "`";
}

class ReadmeDefaults : public ::testing::Test {
protected:
    void SetUp() override {
        readme = read_readme();
        ASSERT_FALSE(readme.empty()) << "README.md not found from " << __FILE__;
        table = directive_table(readme);
        ASSERT_FALSE(table.empty()) << "no directive table in README \"Configuration\"";
    }
    const Row &row(const std::string &directive) {
        static const Row none;
        auto it = table.find(directive);
        EXPECT_NE(it, table.end()) << directive << " has no row in the directive table";
        return it == table.end() ? none : it->second;
    }
    void expect_default(const std::string &directive, const std::string &value) {
        EXPECT_EQ(row(directive).default_value, value) << directive;
    }
    void expect_in_meaning(const std::string &directive, const std::string &text) {
        EXPECT_NE(row(directive).meaning.find(text), std::string::npos)
            << directive << ": \"" << text << "\" not in: " << row(directive).meaning;
    }
    // Prose: wherever its lines break.
    void expect_in_readme(const std::string &text) {
        std::string flat = readme;
        for (char &c : flat) {
            c = c == '\n' ? ' ' : c;
        }
        EXPECT_NE(flat.find(text), std::string::npos) << "\"" << text << "\" not in README.md";
    }
    std::string readme;
    std::map<std::string, Row> table;
};

TEST_F(ReadmeDefaults, ChannelDefaultAndLength) {
    expect_default("event_piper_channel", code(default_channel));
    expect_in_meaning("event_piper_channel",
                      "at most " + to_text(max_channel_length) + " characters");
    expect_in_meaning("event_piper_channel", "(default `" + std::string(default_channel) + "`)");
}

TEST_F(ReadmeDefaults, IdValues) {
    expect_default("event_piper_consumer", code(default_consumer_value));
    expect_default("event_piper_last_event_id", code(default_last_event_id_value));
    expect_in_meaning("event_piper_consumer_groups",
                      "at most " + to_text(max_stream_consumers) + " ids in all");
}

TEST_F(ReadmeDefaults, HeartbeatAndRetry) {
    expect_default("event_piper_heartbeat", code(time_text(default_heartbeat_ms)));
    expect_default("event_piper_retry", "unset");
    expect_in_meaning("event_piper_retry", "(" + to_text(default_end_retry_ms) + " ms if unset)");
}

TEST_F(ReadmeDefaults, Replay) {
    expect_default("event_piper_replay_batch", code(to_text(default_replay_batch)));
    expect_in_meaning("event_piper_replay_batch",
                      "(" + to_text(min_replay_batch) + "–" + to_text(max_replay_batch) + ")");
    expect_default("event_piper_replay_connections", code(to_text(default_replay_connections)));
    expect_in_meaning("event_piper_replay_connections", "(" + to_text(min_replay_connections) +
                                                            "–" + to_text(max_replay_connections) +
                                                            ")");
    expect_default("event_piper_replay_memory", code(size_text(default_replay_memory)));
    expect_in_meaning("event_piper_replay_memory",
                      "(at least " + code(size_text(min_replay_memory)) + ")");
}

TEST_F(ReadmeDefaults, Buffers) {
    expect_default("event_piper_stream_buffer", code(size_text(default_stream_buffer)));
    expect_in_meaning("event_piper_stream_buffer",
                      "(at least " + code(size_text(min_stream_buffer)) + ")");
    expect_default("event_piper_relay_buffer", code(size_text(default_relay_buffer)));
    expect_in_meaning("event_piper_relay_buffer", "(at least " + code(size_text(min_relay_buffer)));
}

TEST_F(ReadmeDefaults, Listener) {
    expect_default("event_piper_listener", code(default_listener_shared ? "shared" : "per_worker"));
    expect_default("event_piper_source", code(default_source_wal ? "wal" : "trigger"));
    expect_default("event_piper_listener_timeout", code(time_text(default_listener_timeout_ms)));
    expect_in_meaning("event_piper_listener_timeout",
                      "(at least " + code(time_text(min_listener_timeout_ms)) + ")");
    expect_in_meaning("event_piper_listener_timeout",
                      "every third of it the listener sends a round trip (a trivial query, which "
                      "also finds positions no notification announced) that must come back "
                      "within another third");
    ListenerCheck check = listener_check(default_listener_timeout_ms);
    EXPECT_EQ(check.period_ms, default_listener_timeout_ms / 3);
    EXPECT_EQ(2 * check.period_ms + check.answer_ms, default_listener_timeout_ms);
    EXPECT_EQ(listener_check(min_listener_timeout_ms).answer_ms, 1000u);
    EXPECT_EQ(listener_check(10000).period_ms, 3333u);
    EXPECT_EQ(listener_check(10000).answer_ms, 3334u);
}

TEST_F(ReadmeDefaults, RequestLimits) {
    expect_in_readme("Consumer ids: at most " + to_text(max_consumer_length) +
                     " bytes, no control characters; at most " + to_text(max_stream_consumers) +
                     " ids per stream.");
    expect_in_readme("| consumer id over " + to_text(max_consumer_length) + " bytes,");
    expect_in_readme("64-bit integer of at most " + to_text(max_last_event_id_digits) + " digits");
}

TEST_F(ReadmeDefaults, Connections) {
    expect_in_readme("The module adds `keepalives_idle=" + std::string(default_keepalives_idle) +
                     " keepalives_interval=" + default_keepalives_interval +
                     " keepalives_count=" + default_keepalives_count + "`");
    expect_in_readme("enforces a " + to_text(connect_timeout_ms / 1000) + " s connect timeout");
}

// The texts the directives and checks build from the constants.
TEST(Defaults, TextsAsNginxConfWritesThem) {
    EXPECT_EQ(size_text(256 * 1024), "256k");
    EXPECT_EQ(size_text(64 * 1024 * 1024), "64m");
    EXPECT_EQ(size_text(1500), "1500");
    EXPECT_EQ(time_text(60000), "60s");
    EXPECT_EQ(time_text(500), "500ms");
    EXPECT_EQ(time_text(1500), "1500ms");
}

} // namespace
} // namespace event_piper
