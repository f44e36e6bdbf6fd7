// The listener's state machine: connect, LISTEN, read the newest position, live; losses in every
// phase; backoff; epochs; the silent-link check; the channel check; the table check on its own
// connection (rows without a position), which never holds a notification back.
#include "listener.hpp"

#include "fakes.hpp"
#include "notification.hpp"

#include <gtest/gtest.h>

#include <algorithm>

using namespace event_piper;
using namespace event_piper::testing;

namespace {

struct Events : ListenerEvents {
    void on_listener_ready(uint64_t epoch, int64_t newest, int64_t start) override {
        ready.push_back({epoch, newest, start});
    }
    void on_listener_lost() override { ++lost; }
    void on_notification(std::string_view payload) override {
        notes.emplace_back(payload);
        std::vector<Notification> parsed; // as the hub does
        if (parse_notifications(payload, parsed)) {
            for (const Notification &n : parsed) {
                notified = std::max(notified, n.position);
            }
        }
    }
    uint64_t waiting_since_ms() const override { return waiting_since; }
    int64_t newest_notified() const override { return notified; }

    struct Ready {
        uint64_t epoch;
        int64_t newest;
        int64_t start;
    };
    std::vector<Ready> ready;
    int lost = 0;
    std::vector<std::string> notes;
    uint64_t waiting_since = 0;
    int64_t notified = 0;
};

struct ListenerTest : ::testing::Test {
    FakeLink link;  // LISTEN
    FakeLink table; // the table check
    FakeTimer retry, check;
    Events events;
    FakeLog log;
    Listener listener{link, table, retry, check, events, log, {"new_events", 20000, 20000}};

    FakeResult newest_row(const char *newest, const char *channel = "new_events",
                          std::optional<std::string> start = std::nullopt) {
        return FakeResult({{std::string(newest), start, std::string(channel)}});
    }
    // The round trip's answer: the newest committed (notifiable) position (nullptr: none yet).
    static FakeResult check_row(const char *newest_committed) {
        return FakeResult({{newest_committed != nullptr
                                ? std::optional<std::string>(std::string(newest_committed))
                                : std::nullopt}});
    }
    // One answered check round trip (the table check is left to itself).
    void check_round(const char *newest_committed) {
        check.fire();
        listener.on_check_timer();
        listener.on_link_result(link, check_row(newest_committed));
        link.idle(listener);
    }
    static std::optional<std::string> opt(const char *v) {
        return v != nullptr ? std::optional<std::string>(v) : std::nullopt;
    }
    // The table check's answer: the last id read, how many read have no position, the first of
    // those, and the ids asked about that still have none.
    void table_answers(const char *scanned_to, const char *found, const char *found_ids,
                       const char *still_ids) {
        listener.on_link_result(
            table, FakeResult({{opt(scanned_to), opt(found), opt(found_ids), opt(still_ids)}}));
        table.idle(listener);
    }
    // The second connection's first query of a round: event writers held back in COMMIT (none
    // by default).
    static FakeResult writers_row(const char *waiting = "0", const char *longest_ms = nullptr,
                                  const char *pid = nullptr, const char *gid = nullptr) {
        return FakeResult({{std::string(waiting), opt(longest_ms), opt(pid), opt(gid),
                            pid != nullptr ? opt("w") : std::nullopt,
                            pid != nullptr ? opt("psql") : std::nullopt}});
    }
    void answer_writers(const FakeResult &row = writers_row()) {
        ASSERT_NE(table.sent.back().find("FROM pg_locks"), std::string::npos);
        listener.on_link_result(table, row);
        table.idle(listener);
    }
    // A check period: the round trip on the LISTEN connection, answered; on the other connection
    // (opened first if needed) the held writers' query answered, then the table check sent.
    // Returns the table check's parameters.
    std::vector<std::string> table_round(const FakeResult &writers = writers_row()) {
        check_round("42");
        if (table.state() == DbLink::State::Connecting) {
            table.connected(listener);
        }
        answer_writers(writers);
        EXPECT_EQ(table.state(), DbLink::State::Busy);
        return table.last_params;
    }
    // Drives a fresh connection to Live with the given newest position.
    void bring_up(const char *newest = "42") {
        listener.start();
        link.connected(listener);
        ASSERT_EQ(link.sent.back(), "LISTEN \"new_events\"");
        listener.on_link_result(link, FakeResult::command_ok());
        link.idle(listener);
        ASSERT_EQ(listener.phase(), Listener::Phase::ReadingNewest);
        listener.on_link_result(link, newest_row(newest));
        link.idle(listener);
        ASSERT_EQ(listener.phase(), Listener::Phase::Live);
    }
};

} // namespace

TEST_F(ListenerTest, ConnectsListensReadsTheNewestThenGoesLive) {
    bring_up("42");
    ASSERT_EQ(events.ready.size(), 1u);
    EXPECT_EQ(events.ready[0].epoch, 1u);
    EXPECT_EQ(events.ready[0].newest, 42);
    EXPECT_EQ(events.ready[0].start, 42);
    EXPECT_EQ(listener.epoch(), 1u);
    EXPECT_EQ(log.count("listening for notifications (newest position 42)"), 1u);
    EXPECT_TRUE(check.armed());
}

TEST_F(ListenerTest, NotificationsAreHandedOn) {
    bring_up();
    listener.on_link_notify(link, "e 43 4 1\ntotot{}");
    ASSERT_EQ(events.notes.size(), 1u);
    EXPECT_EQ(events.notes[0], "e 43 4 1\ntotot{}");
}

TEST_F(ListenerTest, LostWhileConnectingRetriesWithGrowingBackoffAndLogsOncePerReason) {
    listener.start();
    link.lost(listener, "connection refused");
    EXPECT_EQ(listener.phase(), Listener::Phase::Down);
    EXPECT_EQ(retry.fire(), 100u);
    listener.on_retry_timer();
    link.lost(listener, "connection refused");
    EXPECT_EQ(retry.fire(), 200u);
    listener.on_retry_timer();
    link.lost(listener, "FATAL: sorry, too many clients already");
    EXPECT_EQ(retry.fire(), 400u);
    for (int i = 0; i < 10; ++i) {
        listener.on_retry_timer();
        link.lost(listener, "FATAL: sorry, too many clients already");
        retry.fire();
    }
    EXPECT_EQ(retry.history.back(), 5000u); // capped at 5 s
    EXPECT_EQ(log.count("cannot connect: connection refused"), 1u);
    EXPECT_EQ(log.count("cannot connect: FATAL: sorry, too many clients already"), 1u);
    EXPECT_EQ(events.lost, 0); // never was live: nothing to tell the streams
    EXPECT_EQ(listener.reconnects(), 0u);
}

TEST_F(ListenerTest, LostWhileListenIsPending) {
    listener.start();
    link.connected(listener);
    link.lost(listener);
    EXPECT_EQ(listener.epoch(), 0u);
    EXPECT_TRUE(retry.armed());
    EXPECT_TRUE(events.ready.empty());
}

TEST_F(ListenerTest, ListenRefusedClosesAndRetries) {
    listener.start();
    link.connected(listener);
    listener.on_link_result(link, FakeResult::failure("ERROR: permission denied\n"));
    EXPECT_EQ(link.state(), DbLink::State::Down);
    EXPECT_TRUE(retry.armed());
    EXPECT_EQ(log.count("cannot connect: ERROR: permission denied;"), 1u);
}

TEST_F(ListenerTest, LostWhileReadingTheNewest) {
    listener.start();
    link.connected(listener);
    link.idle(listener);
    EXPECT_EQ(listener.phase(), Listener::Phase::ReadingNewest);
    link.lost(listener);
    EXPECT_TRUE(events.ready.empty());
    EXPECT_EQ(listener.epoch(), 0u);
    retry.fire();
    bring_up("50");
    EXPECT_EQ(events.ready.back().epoch, 1u); // the first successful LISTEN
}

// The schema's version: the newest position's query says whether event_piper_schema_version()
// exists (the previous schema has none: version 1); if so, it is read before going live.
namespace {
FakeResult newest_with_version(const char *newest, const char *has_version) {
    return FakeResult(
        {{std::string(newest), std::nullopt, std::string("new_events"), std::string(has_version)}});
}
} // namespace

TEST_F(ListenerTest, TheSchemaVersionIsReadOncePerConnectionAndNamedWhenItChanges) {
    listener.start();
    link.connected(listener);
    link.idle(listener);
    ASSERT_EQ(listener.phase(), Listener::Phase::ReadingNewest);
    EXPECT_NE(link.sent.back().find("to_regprocedure('event_piper_schema_version()')"),
              std::string::npos);
    listener.on_link_result(link, newest_with_version("42", "t"));
    link.idle(listener);
    ASSERT_EQ(listener.phase(), Listener::Phase::ReadingVersion);
    EXPECT_EQ(link.sent.back(), "SELECT event_piper_schema_version()");
    EXPECT_TRUE(events.ready.empty()); // live only once the version is known
    listener.on_link_result(link, FakeResult({{std::to_string(Listener::schema_version_current)}}));
    link.idle(listener);
    ASSERT_EQ(listener.phase(), Listener::Phase::Live);
    EXPECT_EQ(listener.schema_version(), Listener::schema_version_current);
    ASSERT_EQ(events.ready.size(), 1u);
    EXPECT_EQ(events.ready[0].newest, 42);
    EXPECT_EQ(log.count("the database's schema is version " +
                        std::to_string(Listener::schema_version_current)),
              1u);

    // Reconnected to the same schema: read again, not logged again.
    link.lost(listener);
    retry.fire();
    listener.on_retry_timer();
    link.connected(listener);
    link.idle(listener);
    listener.on_link_result(link, newest_with_version("43", "t"));
    link.idle(listener);
    listener.on_link_result(link, FakeResult({{std::to_string(Listener::schema_version_current)}}));
    link.idle(listener);
    ASSERT_EQ(listener.phase(), Listener::Phase::Live);
    EXPECT_EQ(log.count("the database's schema is version"), 1u);

    // A newer schema: a warning, and streams as before.
    link.lost(listener);
    retry.fire();
    listener.on_retry_timer();
    link.connected(listener);
    link.idle(listener);
    listener.on_link_result(link, newest_with_version("44", "t"));
    link.idle(listener);
    std::string mine = std::to_string(Listener::schema_version_current);
    std::string newer = std::to_string(Listener::schema_version_current + 1);
    listener.on_link_result(link, FakeResult({{newer}}));
    link.idle(listener);
    ASSERT_EQ(listener.phase(), Listener::Phase::Live);
    EXPECT_EQ(listener.schema_version(), Listener::schema_version_current + 1);
    EXPECT_EQ(log.count("the database's schema is version " + newer +
                        ", newer than this module knows (version " + mine +
                        "): streams work as with version " + mine),
              1u);
}

TEST_F(ListenerTest, ThePreviousSchemaHasNoVersionAndGoesLiveAtOnce) {
    listener.start();
    link.connected(listener);
    link.idle(listener);
    listener.on_link_result(link, newest_with_version("7", "f"));
    size_t sent = link.sent.size();
    link.idle(listener);
    ASSERT_EQ(listener.phase(), Listener::Phase::Live);
    EXPECT_EQ(link.sent.size(), sent); // no call to a function that is not there
    EXPECT_EQ(listener.schema_version(), Listener::schema_version_unversioned);
    EXPECT_EQ(log.count("the database's schema is version 1, older than this module's "
                        "postgresql/schema.sql (version " +
                        std::to_string(Listener::schema_version_current) +
                        "): streams work as before"),
              1u);
}

TEST_F(ListenerTest, AFailedVersionQueryIsALostConnection) {
    listener.start();
    link.connected(listener);
    link.idle(listener);
    listener.on_link_result(link, newest_with_version("7", "t"));
    link.idle(listener);
    ASSERT_EQ(listener.phase(), Listener::Phase::ReadingVersion);
    // Dropped in between (schema.sql being applied again without one transaction).
    listener.on_link_result(link, FakeResult::failure("function event_piper_schema_version() "
                                                      "does not exist"));
    EXPECT_EQ(listener.phase(), Listener::Phase::Down);
    EXPECT_TRUE(events.ready.empty());
    EXPECT_TRUE(retry.armed());
    EXPECT_EQ(log.count("function event_piper_schema_version() does not exist"), 1u);
}

TEST_F(ListenerTest, LossWhenLiveTellsTheStreamsAndTheNextEpochIsNew) {
    bring_up("42");
    link.lost(listener, "server closed the connection unexpectedly");
    EXPECT_EQ(events.lost, 1);
    EXPECT_EQ(listener.epoch(), 0u);
    EXPECT_EQ(listener.reconnects(), 1u);
    EXPECT_FALSE(check.armed());
    EXPECT_EQ(log.count("listener connection lost: server closed the connection unexpectedly"), 1u);
    EXPECT_EQ(retry.fire(), 100u);
    bring_up("45");
    EXPECT_EQ(events.ready.back().epoch, 2u);
    EXPECT_EQ(events.ready.back().newest, 45);
    EXPECT_EQ(log.count("listening for notifications (newest position 45)"), 1u);
}

TEST_F(ListenerTest, BackoffResetsAfterASuccess) {
    listener.start();
    link.lost(listener);
    retry.fire();
    listener.on_retry_timer();
    link.lost(listener);
    EXPECT_EQ(retry.fire(), 200u);
    bring_up();
    link.lost(listener);
    EXPECT_EQ(retry.fire(), 100u);
}

TEST_F(ListenerTest, StreamsWaitingForAPositionStartByTheCommitClock) {
    events.waiting_since = 1700000000123;
    listener.start();
    link.connected(listener);
    link.idle(listener);
    EXPECT_EQ(link.last_params, std::vector<std::string>{"1700000000123"});
    listener.on_link_result(link, newest_row("42", "new_events", std::string("40")));
    link.idle(listener);
    EXPECT_EQ(events.ready.back().newest, 42);
    EXPECT_EQ(events.ready.back().start, 40);
}

// A stream that began waiting after the listener read the oldest waiting time may have opened
// before events the query's snapshot holds: the start point is read again for it.
TEST_F(ListenerTest, AStreamThatBeganWaitingDuringTheReadGetsTheStartPointReadAgain) {
    listener.start();
    link.connected(listener);
    link.idle(listener);
    EXPECT_EQ(link.last_params, std::vector<std::string>{"0"}); // none waiting yet
    events.waiting_since = 1700000000123;                       // published by a worker meanwhile
    listener.on_link_result(link, newest_row("42"));
    link.idle(listener);
    EXPECT_TRUE(events.ready.empty());
    EXPECT_EQ(link.last_params, std::vector<std::string>{"1700000000123"});
    listener.on_link_result(link, newest_row("42", "new_events", std::string("41")));
    link.idle(listener);
    ASSERT_EQ(events.ready.size(), 1u);
    EXPECT_EQ(events.ready.back().newest, 42);
    EXPECT_EQ(events.ready.back().start, 41);
}

TEST_F(ListenerTest, ASilentLinkIsCheckedAndAFrozenOneIsReplaced) {
    bring_up();
    EXPECT_EQ(check.fire(), 20000u);
    listener.on_check_timer();
    EXPECT_EQ(listener.phase(), Listener::Phase::Checking);
    EXPECT_EQ(check.fire(), 20000u); // no answer in time
    listener.on_check_timer();
    EXPECT_EQ(link.state(), DbLink::State::Down);
    EXPECT_EQ(events.lost, 1);
    EXPECT_EQ(listener.epoch(), 0u);
    EXPECT_EQ(log.count("listener connection lost: no answer from the server for 20000 ms"), 1u);
    // A long lock on the table the round trip reads looks the same from here: the line names it.
    EXPECT_EQ(log.count("a lock held on table event_positions"), 1u);
    EXPECT_TRUE(retry.armed());
    EXPECT_EQ(table.state(), DbLink::State::Down); // closed with the listener
}

// A backend sends notifications only between queries: whatever the LISTEN connection runs
// holds back every notification until it answers. Its round trip reads the newest positions
// only (an index scan of at most 100 rows); table events is read on the other connection.
TEST_F(ListenerTest, TheListenConnectionRunsATrivialRoundTripAndTheTableIsReadElsewhere) {
    bring_up();
    EXPECT_EQ(table.connects, 0); // opened at the first check, not before
    check.fire();
    listener.on_check_timer();
    EXPECT_EQ(link.sent.back(),
              "SELECT (SELECT position FROM (SELECT position, subscriber FROM event_positions"
              "   ORDER BY position DESC LIMIT 100) AS newest"
              " WHERE octet_length(subscriber) < 7900 ORDER BY position DESC LIMIT 1)");
    EXPECT_TRUE(link.last_params.empty());
    EXPECT_EQ(link.sent.back().find("FROM events"), std::string::npos);
    ASSERT_EQ(table.connects, 1);
    table.connected(listener);
    ASSERT_EQ(table.sent.size(), 1u); // the held writers first: no lock on events can hold it up
    EXPECT_EQ(table.sent.back().find("events"), std::string::npos);
    answer_writers();
    ASSERT_EQ(table.sent.size(), 2u);
    EXPECT_NE(table.sent.back().find("FROM events e"), std::string::npos);
    EXPECT_NE(table.sent.back().find("LIMIT $3::int"), std::string::npos);
    EXPECT_EQ(table.last_params, (std::vector<std::string>{"0", "{}", "100000"})); // the newest
    // The round trip answers; notifications flow while the table check is still reading.
    listener.on_link_result(link, check_row("42"));
    link.idle(listener);
    EXPECT_EQ(listener.phase(), Listener::Phase::Live);
    EXPECT_EQ(check.armed_ms, 20000u);
    listener.on_link_notify(link, "e 43 4 1\ntotot{}");
    EXPECT_EQ(events.notes, std::vector<std::string>{"e 43 4 1\ntotot{}"});
    table_answers("500", "0", nullptr, nullptr);
    EXPECT_EQ(listener.unpositioned_rows(), 0);
    EXPECT_EQ(log.count("have no position"), 0u);
    EXPECT_EQ(table_round(),
              (std::vector<std::string>{"500", "{}", "10000"})); // the same connection
    EXPECT_EQ(table.connects, 1);
}

TEST_F(ListenerTest, RowsWithoutAPositionAreCountedAndFollowedByIdSoTheReadMovesOn) {
    bring_up();
    table_round();
    table_answers("500", "0", nullptr, nullptr);
    // The trigger was disabled for a while: 3 committed rows have no position, ids 521 to 523.
    EXPECT_EQ(table_round(), (std::vector<std::string>{"500", "{}", "10000"}));
    table_answers("700", "3", "521,522,523", nullptr);
    EXPECT_EQ(listener.unpositioned_rows(), 3);
    EXPECT_EQ(log.count("3 committed rows of table events have no position"), 1u);
    // The next round reads after 700, not after 520 again: those three are asked about by id.
    EXPECT_EQ(table_round(), (std::vector<std::string>{"700", "{521,522,523}", "10000"}));
    table_answers("750", "0", nullptr, "521,522,523");
    EXPECT_EQ(listener.unpositioned_rows(), 3);
    EXPECT_EQ(log.count("have no position"), 1u); // said once, not every round
    EXPECT_EQ(table_round(), (std::vector<std::string>{"750", "{521,522,523}", "10000"}));
    table_answers(nullptr, "0", nullptr, "521,522,523"); // nothing new
    EXPECT_EQ(table_round(), (std::vector<std::string>{"750", "{521,522,523}", "10000"}));
    // schema.sql applied again: positions given.
    table_answers("760", "0", nullptr, nullptr);
    EXPECT_EQ(listener.unpositioned_rows(), 0);
    EXPECT_EQ(log.count("every row of table events has a position again"), 1u);
    EXPECT_EQ(table_round(), (std::vector<std::string>{"760", "{}", "10000"}));
    // The table emptied with TRUNCATE ... RESTART IDENTITY: ids start again below 760.
    table_answers("12", "0", nullptr, nullptr);
    EXPECT_EQ(table_round(), (std::vector<std::string>{"12", "{}", "10000"}));
}

// With event_piper_source wal a row gets its position a moment after its commit: a check that
// finds rows without one may see them in flight. They count (status, health, the log) only when
// the next round finds them still without: the positioner stalled.
TEST(ListenerWal, RowsCountAsWithoutAPositionOnlyWhenTheNextRoundStillFindsThem) {
    FakeLink link, table;
    FakeTimer retry, check;
    Events events;
    FakeLog log;
    Listener::Settings settings{"new_events", 20000, 20000};
    settings.positioned_after_commit = true;
    Listener listener{link, table, retry, check, events, log, settings};
    listener.start();
    link.connected(listener);
    listener.on_link_result(link, FakeResult::command_ok());
    link.idle(listener);
    listener.on_link_result(
        link, FakeResult({{std::string("42"), std::nullopt, std::string("new_events")}}));
    link.idle(listener);
    ASSERT_EQ(listener.phase(), Listener::Phase::Live);
    auto round = [&](std::optional<std::string> found, std::optional<std::string> ids,
                     std::optional<std::string> still) {
        check.fire();
        listener.on_check_timer();
        listener.on_link_result(link, FakeResult({{std::string("42")}}));
        link.idle(listener);
        if (table.state() == DbLink::State::Connecting) {
            table.connected(listener);
        }
        listener.on_link_result(table, FakeResult({{std::string("0"), std::nullopt, std::nullopt,
                                                    std::nullopt, std::nullopt, std::nullopt}}));
        table.idle(listener); // no writer held back; the table check is sent
        listener.on_link_result(table, FakeResult({{std::string("700"), found, ids, still}}));
        table.idle(listener);
    };
    round(std::string("2"), std::string("698,699"), std::nullopt); // in flight
    EXPECT_EQ(listener.unpositioned_rows(), 0);
    EXPECT_EQ(log.count("have had no position"), 0u);
    round(std::string("0"), std::nullopt, std::nullopt); // positioned meanwhile
    EXPECT_EQ(listener.unpositioned_rows(), 0);
    round(std::string("1"), std::string("750"), std::nullopt);
    round(std::string("0"), std::nullopt, std::string("750")); // still none a period later
    EXPECT_EQ(listener.unpositioned_rows(), 1);
    EXPECT_EQ(log.count("1 committed rows of table events have had no position for a check "
                        "period (event_piper_source wal: has the positioner stopped?"),
              1u);
}

TEST_F(ListenerTest, BeyondTheRowsFollowedByIdTheCountIsALowerBoundAndTheReadWaitsForRoom) {
    bring_up();
    table_round();
    std::string first; // ids 1..1000 have no position, and 500 more after them
    for (int id = 1; id <= 1000; ++id) {
        first += (id > 1 ? "," : "") + std::to_string(id);
    }
    table_answers("5000", "1500", first.c_str(), nullptr);
    EXPECT_EQ(listener.unpositioned_rows(), 1500);
    EXPECT_EQ(log.count("at least 1500 committed rows of table events have no position"), 1u);
    // 1,000 followed: the read goes on after the last of them, where the 500 are found again.
    std::vector<std::string> params = table_round();
    EXPECT_EQ(params[0], "1000");
    EXPECT_EQ(params[1], "{" + first + "}");
    std::string more;
    for (int id = 1001; id <= 1500; ++id) {
        more += (id > 1001 ? "," : "") + std::to_string(id);
    }
    table_answers("5000", "500", more.c_str(), first.c_str());
    EXPECT_EQ(listener.unpositioned_rows(), 1500);
    EXPECT_EQ(table_round()[0], "1000"); // no room: read again from the first not followed
    table_answers("5000", "499", more.c_str() + 5, first.c_str());
    EXPECT_EQ(listener.unpositioned_rows(), 1499);
    EXPECT_EQ(log.count("have no position"), 1u); // a lower bound that moves: said once
    // Half of the followed rows got positions: room for the others.
    std::string half;
    for (int id = 501; id <= 1000; ++id) {
        half += (id > 501 ? "," : "") + std::to_string(id);
    }
    table_round();
    table_answers("5000", "500", more.c_str(), half.c_str());
    EXPECT_EQ(listener.unpositioned_rows(), 1000);
    params = table_round();
    EXPECT_EQ(params[0], "5000");
    EXPECT_EQ(params[1], "{" + half + "," + more + "}");
}

TEST_F(ListenerTest, ASlowOrFailingTableCheckHoldsNothingBackAndIsRetried) {
    bring_up();
    table_round(); // the table check sent, never answered
    check_round("42");
    EXPECT_EQ(table.sent.size(), 2u); // still busy: not sent again
    EXPECT_EQ(listener.phase(), Listener::Phase::Live);
    listener.on_link_notify(link, "e 43 4 1\ntotot{}");
    EXPECT_EQ(events.notes.size(), 1u);
    check_round("43"); // busy for two whole periods: replaced
    EXPECT_EQ(table.connects, 2);
    EXPECT_EQ(log.count("the check for rows without a position failed: no answer for two check "
                        "periods (a lock held on table events"),
              1u);
    table.connected(listener);
    answer_writers();
    EXPECT_EQ(table.sent.size(), 4u);
    listener.on_link_result(table, FakeResult::failure("relation \"events\" does not exist\n"));
    table.idle(listener);
    EXPECT_EQ(log.count("the check for rows without a position failed: relation \"events\" does "
                        "not exist; tried again at the next check"),
              1u);
    table_round();
    listener.on_link_result(table, FakeResult::failure("relation \"events\" does not exist\n"));
    table.idle(listener);
    EXPECT_EQ(log.count("relation \"events\" does not exist"), 1u); // once per reason
    table.lost(listener, "server closed the connection");
    EXPECT_EQ(log.count("failed: server closed the connection"), 1u);
    EXPECT_EQ(listener.phase(), Listener::Phase::Live); // the listener is not concerned
    EXPECT_EQ(events.lost, 0);
    table_round(); // opened again
    EXPECT_EQ(table.connects, 3);
    link.lost(listener);
    EXPECT_EQ(table.state(), DbLink::State::Down);
}

TEST_F(ListenerTest, PositionsCommittedButNeverNotifiedSendTheStreamsToTheTable) {
    bring_up("42");
    check_round("50"); // committed, perhaps not yet notified: nothing yet
    EXPECT_TRUE(events.notes.empty());
    check_round("55"); // a check period later 50 was still not notified: the table has it
    ASSERT_EQ(events.notes, std::vector<std::string>{"p 50"});
    EXPECT_EQ(listener.unnotified_hints(), 1u);
    EXPECT_EQ(log.count("positions up to 50 were committed a check period ago but not notified "
                        "on channel \"new_events\""),
              1u);
    check_round("55");
    EXPECT_EQ(events.notes, (std::vector<std::string>{"p 50", "p 55"}));
    check_round("55"); // nothing new
    EXPECT_EQ(events.notes.size(), 2u);
    EXPECT_EQ(log.count("were committed a check period ago"), 1u); // said once
    EXPECT_EQ(listener.phase(), Listener::Phase::Live);
}

TEST_F(ListenerTest, NotifiedPositionsAndAnEmptyTableNeedNoHint) {
    bring_up("42");
    check_round(nullptr); // no event yet
    check_round("43");
    listener.on_link_notify(link, "e 43 4 1\ntotot{}");
    check_round("45");
    // Two events of one transaction in one notification; a foreign payload is handed on as is.
    listener.on_link_notify(link, "b\n44 4 1 2\ntotot{}45 4 1 2\ntotot{}");
    listener.on_link_notify(link, "hello");
    check_round("45");
    check_round(
        "42"); // positions at or below what the listener started from (read when it went live)
    check_round("42");
    EXPECT_EQ(listener.unnotified_hints(), 0u);
    EXPECT_EQ(events.notes.size(), 3u);
    EXPECT_EQ(log.count("were committed a check period ago"), 0u);
}

TEST_F(ListenerTest, AChannelMismatchIsReportedOnce) {
    listener.start();
    link.connected(listener);
    link.idle(listener);
    listener.on_link_result(link, newest_row("1", "other_channel"));
    link.idle(listener);
    EXPECT_TRUE(listener.channel_mismatch());
    EXPECT_EQ(log.count("notifies channel \"other_channel\""), 1u);
    link.lost(listener);
    retry.fire();
    listener.on_retry_timer();
    link.connected(listener);
    link.idle(listener);
    listener.on_link_result(link, newest_row("1", "other_channel"));
    link.idle(listener);
    EXPECT_EQ(log.count("notifies channel \"other_channel\""), 1u);
}

TEST_F(ListenerTest, WritersHeldBackInCommitAreCountedAndTheirBlockerNamedOnce) {
    bring_up();
    auto round = [&](const FakeResult &writers) {
        table_round(writers);
        table_answers("500", "0", nullptr, nullptr);
    };
    round(writers_row());
    EXPECT_EQ(listener.writers_waiting(), 0);
    // A transaction left open after SET CONSTRAINTS ALL IMMEDIATE holds two writers back.
    round(writers_row("2", "3450", "4242"));
    EXPECT_EQ(listener.writers_waiting(), 2);
    EXPECT_EQ(log.count("2 event writers have waited in COMMIT for up to 3.4 s behind backend "
                        "pid 4242 (user \"w\", application \"psql\")"),
              1u);
    EXPECT_EQ(log.count("pg_terminate_backend(4242)"), 1u);
    EXPECT_EQ(log.count("statement_timeout does not"), 1u);
    round(writers_row("3", "23450", "4242")); // the same blocker: said once
    EXPECT_EQ(listener.writers_waiting(), 3);
    EXPECT_EQ(log.count("event writers have waited in COMMIT"), 1u);
    // Then a prepared transaction (under an older schema.sql) holds them: named by its gid.
    round(writers_row("1", "1200", nullptr, "tx-17"));
    EXPECT_EQ(log.count("behind prepared transaction 'tx-17'"), 1u);
    EXPECT_EQ(log.count("COMMIT PREPARED or ROLLBACK PREPARED 'tx-17'"), 1u);
    round(writers_row());
    EXPECT_EQ(listener.writers_waiting(), 0);
    EXPECT_EQ(log.count("event writers no longer wait in COMMIT"), 1u);
    round(writers_row());
    EXPECT_EQ(log.count("no longer wait"), 1u);
    EXPECT_EQ(link.sent.back().find("pg_locks"), std::string::npos); // never on the LISTEN link
}

TEST_F(ListenerTest, AServerThatCannotLookForHeldWritersGoesOnWithTheTableCheck) {
    bring_up();
    check_round("42");
    table.connected(listener);
    listener.on_link_result(table, FakeResult::failure("ERROR: column \"waitstart\" does not "
                                                       "exist\n"));
    table.idle(listener);
    EXPECT_EQ(log.count("cannot look for event writers held back in COMMIT"), 1u);
    EXPECT_NE(table.sent.back().find("FROM events e"), std::string::npos); // the same round
    table_answers("500", "0", nullptr, nullptr);
    EXPECT_EQ(listener.phase(), Listener::Phase::Live);
    // The next rounds run the table check only.
    check_round("42");
    EXPECT_EQ(table.sent.back().find("pg_locks"), std::string::npos);
    EXPECT_NE(table.sent.back().find("FROM events e"), std::string::npos);
}

TEST_F(ListenerTest, CloseIsForGood) {
    bring_up();
    listener.close();
    EXPECT_EQ(link.state(), DbLink::State::Down);
    EXPECT_FALSE(retry.armed());
    EXPECT_FALSE(check.armed());
    listener.on_link_lost(link, "late");
    EXPECT_FALSE(retry.armed());
    EXPECT_EQ(events.lost, 0);
}
