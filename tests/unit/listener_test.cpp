// The listener's state machine: connect, LISTEN, read the newest position, live; losses in every
// phase; backoff; epochs; the silent-link check; the channel check.
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
    FakeLink link;
    FakeTimer retry, check;
    Events events;
    FakeLog log;
    Listener listener{link, retry, check, events, log, {"new_events", 20000, 20000}};

    FakeResult newest_row(const char *newest, const char *channel = "new_events",
                          std::optional<std::string> start = std::nullopt) {
        return FakeResult({{std::string(newest), start, std::string(channel)}});
    }
    // The check's third column: the newest committed (notifiable) position (nullptr: none yet).
    static FakeResult check_row(const char *newest_committed) {
        return FakeResult({{std::string("0"), std::string("0"),
                            newest_committed != nullptr
                                ? std::optional<std::string>(std::string(newest_committed))
                                : std::nullopt}});
    }
    // The check's second query: event writers held back in COMMIT (none by default).
    static FakeResult writers_row(const char *waiting = "0", const char *longest_ms = nullptr,
                                  const char *pid = nullptr, const char *gid = nullptr) {
        auto opt = [](const char *v) {
            return v != nullptr ? std::optional<std::string>(v) : std::nullopt;
        };
        return FakeResult({{std::string(waiting), opt(longest_ms), opt(pid), opt(gid),
                            pid != nullptr ? opt("w") : std::nullopt,
                            pid != nullptr ? opt("psql") : std::nullopt}});
    }
    void answer_writers(const FakeResult &row = writers_row()) {
        ASSERT_NE(link.sent.back().find("FROM pg_locks"), std::string::npos);
        listener.on_link_result(link, row);
        link.idle(listener);
    }
    // One answered check round trip (both queries).
    void check_round(const char *newest_committed, const FakeResult &writers = writers_row()) {
        check.fire();
        listener.on_check_timer();
        listener.on_link_result(link, check_row(newest_committed));
        link.idle(listener);
        answer_writers(writers);
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

TEST_F(ListenerTest, ASilentLinkIsCheckedAndAFrozenOneIsReplaced) {
    bring_up();
    EXPECT_EQ(check.fire(), 20000u);
    listener.on_check_timer();
    EXPECT_EQ(listener.phase(), Listener::Phase::Checking);
    EXPECT_EQ(link.sent.back(),
              "SELECT unpositioned, next_after_id,"
              " (SELECT position FROM event_positions WHERE octet_length(subscriber) < 7900"
              "   ORDER BY position DESC LIMIT 1)"
              " FROM event_piper_unpositioned($1)");
    EXPECT_EQ(link.last_params, std::vector<std::string>{"0"}); // the first check: newest ids
    EXPECT_EQ(check.fire(), 20000u);                            // no answer in time
    listener.on_check_timer();
    EXPECT_EQ(link.state(), DbLink::State::Down);
    EXPECT_EQ(events.lost, 1);
    EXPECT_EQ(listener.epoch(), 0u);
    EXPECT_EQ(log.count("listener connection lost: no answer from the server for 20000 ms"), 1u);
    // A long LOCK TABLE events looks the same from here: the line names it.
    EXPECT_EQ(log.count("a lock held on table events"), 1u);
    EXPECT_TRUE(retry.armed());
}

TEST_F(ListenerTest, AnAnsweredCheckKeepsTheLinkAndCountsRowsWithoutAPosition) {
    bring_up();
    check.fire();
    listener.on_check_timer();
    listener.on_link_result(
        link, FakeResult({{std::string("0"), std::string("500"), std::string("42")}}));
    link.idle(listener);
    EXPECT_EQ(listener.phase(), Listener::Phase::Checking); // then the held writers
    answer_writers();
    EXPECT_EQ(listener.phase(), Listener::Phase::Live);
    EXPECT_EQ(listener.epoch(), 1u);
    EXPECT_EQ(check.armed_ms, 20000u); // the next round trip
    EXPECT_EQ(listener.unpositioned_rows(), 0);
    EXPECT_EQ(log.count("have no position"), 0u);
    // The trigger was disabled for a while: 80 committed rows have no position, the first of
    // them id 521. The check starts from the last settled id.
    check.fire();
    listener.on_check_timer();
    EXPECT_EQ(link.last_params, std::vector<std::string>{"500"});
    listener.on_link_result(
        link, FakeResult({{std::string("80"), std::string("520"), std::string("42")}}));
    link.idle(listener);
    answer_writers();
    EXPECT_EQ(listener.unpositioned_rows(), 80);
    EXPECT_EQ(log.count("80 committed rows of table events have no position"), 1u);
    check.fire();
    listener.on_check_timer();
    EXPECT_EQ(link.last_params, std::vector<std::string>{"520"}); // they are looked at again
    listener.on_link_result(
        link, FakeResult({{std::string("80"), std::string("520"), std::string("42")}}));
    link.idle(listener);
    answer_writers();
    EXPECT_EQ(log.count("have no position"), 1u); // said once, not every round trip
    // schema.sql applied again: positions given.
    check.fire();
    listener.on_check_timer();
    listener.on_link_result(
        link, FakeResult({{std::string("0"), std::string("700"), std::string("42")}}));
    link.idle(listener);
    answer_writers();
    EXPECT_EQ(listener.unpositioned_rows(), 0);
    EXPECT_EQ(log.count("every row of table events has a position again"), 1u);
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
    check_round("42");
    EXPECT_EQ(listener.writers_waiting(), 0);
    // A transaction left open after SET CONSTRAINTS ALL IMMEDIATE holds two writers back.
    check_round("42", writers_row("2", "3450", "4242"));
    EXPECT_EQ(listener.writers_waiting(), 2);
    EXPECT_EQ(log.count("2 event writers have waited in COMMIT for up to 3.4 s behind backend "
                        "pid 4242 (user \"w\", application \"psql\")"),
              1u);
    EXPECT_EQ(log.count("pg_terminate_backend(4242)"), 1u);
    EXPECT_EQ(log.count("statement_timeout does not"), 1u);
    check_round("42", writers_row("3", "23450", "4242")); // the same blocker: said once
    EXPECT_EQ(listener.writers_waiting(), 3);
    EXPECT_EQ(log.count("event writers have waited in COMMIT"), 1u);
    // Then a prepared transaction (under an older schema.sql) holds them: named by its gid.
    check_round("42", writers_row("1", "1200", nullptr, "tx-17"));
    EXPECT_EQ(log.count("behind prepared transaction 'tx-17'"), 1u);
    EXPECT_EQ(log.count("COMMIT PREPARED or ROLLBACK PREPARED 'tx-17'"), 1u);
    check_round("42");
    EXPECT_EQ(listener.writers_waiting(), 0);
    EXPECT_EQ(log.count("event writers no longer wait in COMMIT"), 1u);
    check_round("42");
    EXPECT_EQ(log.count("no longer wait"), 1u);
}

TEST_F(ListenerTest, AServerThatCannotLookForHeldWritersKeepsTheLink) {
    bring_up();
    check.fire();
    listener.on_check_timer();
    listener.on_link_result(link, check_row("42"));
    link.idle(listener);
    listener.on_link_result(link, FakeResult::failure("ERROR: column \"waitstart\" does not "
                                                      "exist\n"));
    link.idle(listener);
    EXPECT_EQ(listener.phase(), Listener::Phase::Live);
    EXPECT_EQ(listener.epoch(), 1u);
    EXPECT_EQ(log.count("cannot look for event writers held back in COMMIT"), 1u);
    // The next rounds run the first query only.
    check.fire();
    listener.on_check_timer();
    listener.on_link_result(link, check_row("42"));
    link.idle(listener);
    EXPECT_EQ(listener.phase(), Listener::Phase::Live);
    EXPECT_EQ(link.sent.back().find("pg_locks"), std::string::npos);
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
