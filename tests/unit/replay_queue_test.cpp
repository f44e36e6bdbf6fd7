// The replay queue: FIFO service over a fixed set of links, opened on demand; the more-rows
// rule; failures (link lost mid-batch, query refused); a stream gone while its batch is in
// flight; backoff; a listener epoch change during a batch.
#include "replay_queue.hpp"

#include "fakes.hpp"
#include "sse_frame.hpp"

#include <gtest/gtest.h>

#include <memory>

using namespace event_piper;
using namespace event_piper::testing;

namespace {

struct Events : ReplayEvents {
    uint64_t listener_epoch() const override { return epoch; }
    void note_position(int64_t position) override { newest = std::max(newest, position); }
    uint64_t epoch = 1;
    int64_t newest = 0;
};

using Row = FakeResult::Row;

// A batch result: rows (position, type, body), `fetched` as the query counted it, `newest`.
FakeResult batch(std::vector<int64_t> positions, size_t fetched, int64_t newest) {
    std::vector<Row> rows;
    for (int64_t p : positions) {
        rows.push_back({std::to_string(p), std::string("t"), std::string("{}"),
                        std::to_string(fetched), std::to_string(newest)});
    }
    if (rows.empty()) {
        rows.push_back(
            {std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::to_string(newest)});
    }
    return FakeResult(rows);
}

std::string frames(std::vector<int64_t> positions) {
    std::string out;
    for (int64_t p : positions) {
        append_event_frame(out, p, "t", "{}");
    }
    return out;
}

struct ReplayQueueTest : ::testing::Test {
    FakeLink a, b;
    FakeTimer retry;
    Events events;
    FakeLog log;
    ReplayQueue queue{retry, events, log};
    FakeOwner owner;

    void SetUp() override {
        queue.add_link(a);
        queue.add_link(b);
    }
    std::unique_ptr<Stream> stream(const char *consumer, int64_t last, size_t rows = 3) {
        Stream::Limits limits;
        limits.batch_rows = rows;
        return std::make_unique<Stream>(consumer, last, limits, &owner);
    }
    void answer(FakeLink &link, const FakeResult &result) {
        queue.on_link_result(link, result);
        link.idle(queue);
    }
    std::string drain(Stream &s) {
        std::string out;
        s.take_pending(out);
        return out;
    }
};

} // namespace

TEST_F(ReplayQueueTest, OpensLinksOnDemandAndServesFirstComeFirstServed) {
    auto s1 = stream("alice", 0);
    auto s2 = stream("bob", 5);
    auto s3 = stream("carol", 7);
    queue.request(*s1);
    EXPECT_EQ(a.connects, 1);
    EXPECT_EQ(b.connects, 0); // one waiting stream, one connection
    queue.request(*s2);
    queue.request(*s3);
    EXPECT_EQ(b.connects, 1);
    EXPECT_EQ(queue.queued(), 3u);
    a.connected(queue);
    EXPECT_EQ(a.last_params, (std::vector<std::string>{"0", "3", "262144", "alice"}));
    b.connected(queue);
    EXPECT_EQ(b.last_params[3], "bob");
    EXPECT_EQ(queue.queued(), 1u);
    EXPECT_EQ(queue.queries(), 2u);
    answer(a, batch({}, 0, 9)); // alice has nothing: carol is next, on the freed link
    EXPECT_EQ(a.last_params[3], "carol");
    EXPECT_EQ(queue.queued(), 0u);
}

TEST_F(ReplayQueueTest, AShortBatchGoesLiveAFullOneAsksAgain) {
    auto s = stream("alice", 0, 3);
    queue.request(*s);
    a.connected(queue);
    answer(a, batch({1, 2, 3}, 3, 9));
    EXPECT_EQ(s->mode(), Stream::Mode::CatchingUp); // full: more rows may follow
    EXPECT_EQ(drain(*s), frames({1, 2, 3}));
    EXPECT_TRUE(s->wants_query(true));
    EXPECT_EQ(owner.wakes, 1);
    queue.request(*s);
    EXPECT_EQ(a.last_params[0], "3");
    answer(a, batch({5}, 1, 9));
    EXPECT_EQ(s->mode(), Stream::Mode::Live);
    EXPECT_EQ(drain(*s), frames({5}));
    EXPECT_EQ(events.newest, 9);
}

TEST_F(ReplayQueueTest, ABatchCutByTheByteCapAsksAgain) {
    auto s = stream("alice", 0, 100);
    queue.request(*s);
    a.connected(queue);
    answer(a, batch({1, 2}, 50, 60)); // 50 rows found, 2 fit in the byte budget
    EXPECT_EQ(s->mode(), Stream::Mode::CatchingUp);
}

TEST_F(ReplayQueueTest, ARequestWhileQueuedOrInFlightIsIgnored) {
    auto s = stream("alice", 0);
    queue.request(*s);
    queue.request(*s);
    EXPECT_EQ(queue.queued(), 1u);
    a.connected(queue);
    queue.request(*s);
    EXPECT_EQ(queue.queued(), 0u);
    EXPECT_EQ(queue.queries(), 1u);
}

TEST_F(ReplayQueueTest, ALinkLostMidBatchRequeuesTheStreamFirstAndBacksOff) {
    auto s1 = stream("alice", 0);
    auto s2 = stream("bob", 0);
    queue.request(*s1);
    a.connected(queue);
    queue.on_link_result(a, batch({1}, 3, 9)); // part of a result, then the link dies
    queue.request(*s2);
    a.lost(queue, "server closed the connection");
    EXPECT_FALSE(s1->query_in_flight());
    EXPECT_EQ(queue.queued(), 2u);
    EXPECT_EQ(retry.armed_ms, 100u);
    EXPECT_EQ(log.count("replay connection failed: server closed the connection"), 1u);
    // b was connecting for bob; it comes up and serves the oldest waiter first.
    b.connected(queue);
    EXPECT_EQ(b.last_params[3], "alice");
    EXPECT_EQ(b.last_params[0], "1"); // from the row already queued: nothing twice
    EXPECT_EQ(log.count("replay connection is back"), 1u);
}

TEST_F(ReplayQueueTest, ALinkLostMidBatchHandsTheStreamToAnIdleLinkAtOnce) {
    auto s1 = stream("alice", 0), s2 = stream("bob", 0);
    queue.request(*s1);
    queue.request(*s2);
    a.connected(queue);
    b.connected(queue);
    answer(b, batch({}, 0, 9)); // bob is live: b is idle
    a.lost(queue, "server closed the connection");
    // Not after the backoff: b is there now.
    EXPECT_EQ(b.last_params[3], "alice");
    EXPECT_TRUE(s1->query_in_flight());
    EXPECT_EQ(queue.queued(), 0u);
}

TEST_F(ReplayQueueTest, ConnectFailuresBackOffAndDoubling) {
    auto s = stream("alice", 0);
    queue.request(*s);
    a.lost(queue, "connection refused");
    EXPECT_EQ(retry.fire(), 100u);
    queue.on_retry_timer();
    EXPECT_EQ(a.connects, 2);
    a.lost(queue, "connection refused");
    EXPECT_EQ(retry.fire(), 200u);
    queue.on_retry_timer();
    a.connected(queue);
    EXPECT_EQ(a.sent.size(), 1u);
    answer(a, batch({}, 0, 0));
    a.lost(queue, "again");
    EXPECT_EQ(retry.fire(), 100u); // reset by the success
    EXPECT_EQ(log.count("replay connection failed"), 2u);
}

TEST_F(ReplayQueueTest, ARefusedQueryFailsTheStreamInsteadOfLooping) {
    auto s = stream("alice", 0);
    queue.request(*s);
    a.connected(queue);
    answer(a, FakeResult::failure("ERROR: permission denied for table events\n"));
    EXPECT_TRUE(s->failed());
    EXPECT_FALSE(s->wants_query(true));
    EXPECT_EQ(owner.wakes, 1);
    EXPECT_EQ(log.count("replay query failed: ERROR: permission denied for table events"), 1u);
}

TEST_F(ReplayQueueTest, FailedQueriesAreCountedAndLoggedOncePerReasonPerPeriod) {
    FakeClock clock;
    FakeTimer t;
    Events ev;
    ReplayQueue q(t, ev, log, 0, &clock);
    FakeLink l;
    q.add_link(l);
    std::vector<std::unique_ptr<Stream>> streams;
    auto fail_one = [&](const char *why) {
        streams.push_back(stream("alice", 0));
        q.request(*streams.back());
        if (l.state() == DbLink::State::Down) {
            l.connected(q);
        }
        q.on_link_result(l, FakeResult::failure(why));
        l.idle(q);
    };
    const char *timeout = "ERROR: canceling statement due to statement timeout\n";
    for (int i = 0; i < 25; ++i) {
        fail_one(timeout);
        clock.now += 100;
    }
    fail_one("ERROR: permission denied for table events\n");
    EXPECT_EQ(q.failures(), 26u);
    EXPECT_EQ(log.count("replay query failed: ERROR: canceling statement due to statement "
                        "timeout"),
              1u);
    EXPECT_EQ(log.count("permission denied"), 1u); // another reason: its own line
    clock.now += ReplayQueue::failure_log_period_ms;
    fail_one(timeout);
    EXPECT_EQ(log.count("statement timeout (24 more since the last such line)"), 1u);
    EXPECT_EQ(q.failures(), 27u);
}

TEST_F(ReplayQueueTest, AStreamCancelledWhileItsBatchIsInFlightIsForgotten) {
    auto s1 = stream("alice", 0);
    auto s2 = stream("bob", 0);
    queue.request(*s1);
    a.connected(queue);
    queue.request(*s2);
    queue.cancel(*s1);
    s1.reset(); // the client went away: the stream is gone
    queue.cancel(*s2);
    EXPECT_EQ(queue.queued(), 0u);
    answer(a, batch({1, 2}, 2, 2)); // discarded
    EXPECT_EQ(a.sent.size(), 1u);
    EXPECT_EQ(owner.wakes, 0);
}

TEST_F(ReplayQueueTest, AListenerEpochChangeDuringABatchMeansReadAgain) {
    auto s = stream("alice", 0);
    queue.request(*s);
    a.connected(queue);
    events.epoch = 2; // the listener reconnected while the query ran
    answer(a, batch({1}, 1, 1));
    EXPECT_EQ(s->mode(), Stream::Mode::CatchingUp);
    drain(*s);
    queue.request(*s);
    answer(a, batch({}, 0, 1));
    EXPECT_EQ(s->mode(), Stream::Mode::Live);
}

TEST_F(ReplayQueueTest, WithoutAListenerAShortBatchParksTheStream) {
    auto s = stream("alice", 0);
    events.epoch = 0;
    queue.request(*s);
    a.connected(queue);
    answer(a, batch({}, 0, 5));
    EXPECT_EQ(s->mode(), Stream::Mode::CatchingUp);
    EXPECT_FALSE(s->wants_query(true)); // until the listener is back
    s->on_listener_ready(5);
    EXPECT_TRUE(s->wants_query(true));
}

TEST_F(ReplayQueueTest, CloseAllForgetsEverything) {
    auto s1 = stream("alice", 0);
    auto s2 = stream("bob", 0);
    queue.request(*s1);
    queue.request(*s2);
    a.connected(queue);
    queue.close_all();
    EXPECT_EQ(queue.queued(), 0u);
    EXPECT_FALSE(s1->query_in_flight());
    EXPECT_EQ(a.state(), DbLink::State::Down);
    EXPECT_EQ(b.state(), DbLink::State::Down);
}

TEST_F(ReplayQueueTest, StreamsWaitingForTheSameRowsShareOneQuery) {
    std::vector<std::unique_ptr<Stream>> tabs;
    for (int i = 0; i < 100; ++i) {
        tabs.push_back(stream("alice", 7));
    }
    auto other = stream("alice", 3);
    auto bob = stream("bob", 7);
    queue.request(*tabs[0]);
    queue.request(*other);
    for (int i = 1; i < 100; ++i) {
        queue.request(*tabs[i]);
    }
    queue.request(*bob);
    a.connected(queue); // tab 0 and the 99 others at position 7
    EXPECT_EQ(queue.queries(), 1u);
    EXPECT_EQ(queue.queued(), 2u);
    b.connected(queue); // alice at 3
    EXPECT_EQ(b.last_params, (std::vector<std::string>{"3", "3", "262144", "alice"}));
    answer(a, batch({8}, 1, 8));
    for (auto &t : tabs) {
        EXPECT_EQ(drain(*t), frames({8}));
        EXPECT_EQ(t->mode(), Stream::Mode::Live);
    }
    EXPECT_EQ(a.last_params[3], "bob"); // then bob on the freed link
    EXPECT_EQ(queue.queries(), 3u);
}

TEST_F(ReplayQueueTest, AStreamGoneFromASharedQueryDoesNotHarmTheOthers) {
    auto s1 = stream("alice", 0);
    auto s2 = stream("alice", 0);
    queue.request(*s1);
    queue.request(*s2); // queued behind: a is still connecting
    a.connected(queue);
    queue.cancel(*s1);
    s1.reset();
    answer(a, batch({1}, 1, 1));
    EXPECT_EQ(drain(*s2), frames({1}));
}

TEST_F(ReplayQueueTest, ALostSharedQueryRequeuesEveryStreamInOrder) {
    auto s1 = stream("alice", 0), s2 = stream("alice", 0), s3 = stream("bob", 0);
    queue.request(*s1);
    queue.request(*s2);
    queue.request(*s3);
    a.connected(queue);
    a.lost(queue);
    EXPECT_EQ(queue.queued(), 3u);
    EXPECT_FALSE(s1->query_in_flight());
    EXPECT_FALSE(s2->query_in_flight());
}

TEST_F(ReplayQueueTest, BatchesThatClientsHaveNotTakenHoldTheBudget) {
    FakeLink c;
    Events ev;
    FakeTimer t;
    ReplayQueue small(t, ev, log, 1000); // bytes
    small.add_link(c);
    auto s1 = stream("alice", 0), s2 = stream("bob", 0);
    small.request(*s1);
    c.connected(small);
    std::string big(1500, 'x');
    small.on_link_result(c, FakeResult({{std::string("1"), std::string("t"), "\"" + big + "\"",
                                         std::string("1"), std::string("1")}}));
    c.idle(small);
    EXPECT_GT(small.held_bytes(), 1000u); // one row is always sent, however large
    small.request(*s2);
    EXPECT_EQ(c.sent.size(), 1u); // bob waits: alice's client has not taken her batch
    EXPECT_EQ(small.queued(), 1u);
    drain(*s1);
    small.release(*s1); // her client took it
    EXPECT_EQ(small.held_bytes(), 0u);
    EXPECT_EQ(c.sent.size(), 2u);
    EXPECT_EQ(c.last_params[3], "bob");
    small.cancel(*s2); // a closed stream gives its share back too
    EXPECT_EQ(small.held_bytes(), 0u);
}

TEST_F(ReplayQueueTest, ASharedBatchGoesToAsManyStreamsAsTheBudgetHolds) {
    FakeLink c;
    Events ev;
    FakeTimer t;
    ReplayQueue small(t, ev, log, 1000); // bytes
    small.add_link(c);
    auto s1 = stream("heavy", 0), s2 = stream("heavy", 0), s3 = stream("heavy", 0);
    small.request(*s1);
    small.request(*s2);
    small.request(*s3);
    c.connected(small); // one query for the three
    EXPECT_EQ(small.queries(), 1u);
    std::string big(1500, 'x');
    small.on_link_result(c, FakeResult({{std::string("1"), std::string("t"), "\"" + big + "\"",
                                         std::string("1"), std::string("1")}}));
    c.idle(small);
    EXPECT_TRUE(s1->has_pending()); // the first takes it, however large
    EXPECT_FALSE(s2->has_pending());
    EXPECT_FALSE(s3->has_pending());
    EXPECT_EQ(small.queued(), 2u); // the others wait for the budget, first in line
    EXPECT_EQ(small.queries(), 1u);
    drain(*s1);
    small.release(*s1);
    EXPECT_EQ(small.queries(), 2u);
    EXPECT_EQ(c.last_params[3], "heavy");
    EXPECT_EQ(c.last_params[0], "0");
}

TEST_F(ReplayQueueTest, AStreamOfSeveralIdsAsksWithEachIdAndSharesOnlyWithTheSameSet) {
    Stream::Limits limits;
    Stream multi({"alice", "team", "everyone"}, 4, limits, &owner);
    Stream same({"alice", "team", "everyone"}, 4, limits, &owner);
    Stream other(std::vector<std::string>{"alice", "team"}, 4, limits, &owner);
    queue.request(multi);
    queue.request(same);
    queue.request(other);
    a.connected(queue);
    EXPECT_EQ(a.last_params,
              (std::vector<std::string>{"4", "500", "262144", "alice", "team", "everyone"}));
    EXPECT_NE(a.sent.back().find("subscriber = $6"), std::string::npos);
    EXPECT_EQ(queue.queued(), 1u); // `same` rode along; `other` waits for its own query
    answer(a, batch({5, 9}, 2, 9));
    EXPECT_EQ(drain(multi), frames({5, 9}));
    EXPECT_EQ(drain(same), frames({5, 9}));
    EXPECT_EQ(a.last_params, (std::vector<std::string>{"4", "500", "262144", "alice", "team"}));
}

TEST(ReplayQueueSql, OneIndexRangeScanPerIdMergedByPosition) {
    std::string one = ReplayQueue::batch_sql(1);
    EXPECT_NE(one.find("FROM event_positions p JOIN events e ON e.id = p.event_id WHERE "
                       "p.subscriber = $4 AND p.position > $1 ORDER BY p.position LIMIT $2"),
              std::string::npos);
    EXPECT_EQ(one.find("UNION ALL"), std::string::npos);
    std::string three = ReplayQueue::batch_sql(3);
    for (const char *id : {"$4", "$5", "$6"}) {
        EXPECT_NE(three.find(std::string("p.subscriber = ") + id +
                             " AND p.position > $1 ORDER BY "
                             "p.position LIMIT $2)"),
                  std::string::npos);
    }
    EXPECT_EQ(three.find("$7"), std::string::npos);
    EXPECT_NE(three.find(") AS ids ORDER BY position LIMIT $2"), std::string::npos);
}

TEST_F(ReplayQueueTest, FoldedStreamsAskTheSchemaOncePerConnectionThenGetFoldedBatches) {
    auto s = stream("alice", 5);
    s->set_folded(true);
    queue.request(*s);
    a.connected(queue);
    ASSERT_EQ(a.sent.size(), 1u);
    EXPECT_EQ(a.sent[0], ReplayQueue::folding_probe_sql());
    EXPECT_FALSE(s->query_in_flight()); // still first in line
    answer(a, FakeResult({{std::string("t")}}));
    ASSERT_EQ(a.sent.size(), 2u);
    EXPECT_EQ(a.sent[1], ReplayQueue::folded_sql(1));
    EXPECT_EQ(a.last_params, (std::vector<std::string>{"5", "3", "262144", "alice"}));
    // A folded event (target 2, whole state) and a plain one.
    answer(a, FakeResult({{std::string("7"), std::string("order"), std::string("{\"a\": 1}"),
                           std::string("2"), std::string("8"), std::string("2"), std::string("t")},
                          {std::string("8"), std::string("t"), std::string("{}"), std::string("2"),
                           std::string("8"), std::nullopt, std::nullopt}}));
    std::string expected;
    append_target_frame(expected, 7, 2, TargetMember::State, "order", "{\"a\":1}");
    append_event_frame(expected, 8, "t", "{}");
    EXPECT_EQ(drain(*s), expected);
    EXPECT_EQ(s->mode(), Stream::Mode::Live);
    // The same connection is not asked again.
    auto again = stream("alice", 8);
    again->set_folded(true);
    queue.request(*again);
    ASSERT_EQ(a.sent.size(), 3u);
    EXPECT_EQ(a.sent[2], ReplayQueue::folded_sql(1));
}

TEST_F(ReplayQueueTest, WithoutThePatchFunctionsFoldedStreamsGetTheFullHistory) {
    auto s = stream("alice", 5);
    s->set_folded(true);
    queue.request(*s);
    a.connected(queue);
    answer(a, FakeResult({{std::string("f")}}));
    ASSERT_EQ(a.sent.size(), 2u);
    EXPECT_EQ(a.sent[1], ReplayQueue::batch_sql(1));
    EXPECT_EQ(log.lines.size(), 1u);
    // A new connection asks again (the schema may have been upgraded meanwhile).
    a.lost(queue);
    retry.fire();
    a.connected(queue);
    ASSERT_EQ(a.sent.size(), 3u);
    EXPECT_EQ(a.sent[2], ReplayQueue::folding_probe_sql());
}

TEST_F(ReplayQueueTest, PatchesAndStandInsOfTheFullHistoryNameTheirTarget) {
    auto s = stream("alice", 0);
    queue.request(*s);
    a.connected(queue);
    ASSERT_EQ(a.sent[0], ReplayQueue::batch_sql(1));
    answer(a, FakeResult({{std::string("1"), std::string("t"), std::string("{}"), std::string("3"),
                           std::string("3"), std::nullopt, std::nullopt},
                          {std::string("2"), std::string("p"), std::string("{\"x\": null}"),
                           std::string("3"), std::string("3"), std::string("1"), std::string("f")},
                          {std::string("3"), std::string("t"), std::string("{}"), std::string("3"),
                           std::string("3"), std::string("1"), std::string("t")}}));
    std::string expected;
    append_event_frame(expected, 1, "t", "{}");
    append_target_frame(expected, 2, 1, TargetMember::Patch, "p", "{\"x\":null}");
    append_target_frame(expected, 3, 1, TargetMember::State, "t", "{}");
    EXPECT_EQ(drain(*s), expected);
}

namespace {

// One primary link and one standby link (event_piper_replay_postgres).
struct StandbyTest : ReplayQueueTest {
    FakeLink sb;
    FakeClock clock;
    ReplayQueue q{retry, events, log, 0, &clock};

    void SetUp() override {
        q.add_link(a);
        q.add_standby_link(sb);
    }
    void answer(FakeLink &link, const FakeResult &result) {
        q.on_link_result(link, result);
        link.idle(q);
    }
    static FakeResult standby(const char *in_recovery, const char *lag_ms) {
        return FakeResult({{std::string(in_recovery), std::string(lag_ms)}});
    }
    // The standby connects and answers its check.
    void standby_up(const char *lag_ms = "0") {
        sb.connected(q);
        ASSERT_EQ(sb.sent.back(), ReplayQueue::standby_probe_sql());
        answer(sb, standby("t", lag_ms));
    }
};

} // namespace

TEST_F(StandbyTest, TheStandbyServesHistoryAndThePrimaryConfirmsTheTail) {
    auto s = stream("alice", 0, 3);
    q.request(*s);
    EXPECT_EQ(sb.connects, 1);
    EXPECT_EQ(a.connects, 0);
    standby_up("250");
    EXPECT_EQ(sb.last_params, (std::vector<std::string>{"0", "3", "262144", "alice"}));
    EXPECT_TRUE(q.standby_up());
    EXPECT_EQ(q.standby_lag_ms(), 250u);
    answer(sb, batch({1, 2, 3}, 3, 7)); // full: more rows follow
    EXPECT_EQ(drain(*s), frames({1, 2, 3}));
    q.request(*s);
    EXPECT_EQ(sb.last_params[0], "3");
    // Short: the standby's end of the history, not necessarily the tail.
    answer(sb, batch({4}, 1, 4));
    EXPECT_EQ(drain(*s), frames({4}));
    EXPECT_EQ(s->mode(), Stream::Mode::CatchingUp);
    EXPECT_TRUE(s->wants_query(true));
    EXPECT_EQ(events.newest, 0); // a standby's positions are no news of the tail
    q.request(*s);
    EXPECT_EQ(a.connects, 1); // the primary confirms the tail
    a.connected(q);
    EXPECT_EQ(a.last_params[0], "4");
    answer(a, batch({5}, 1, 9));
    EXPECT_EQ(drain(*s), frames({5}));
    EXPECT_EQ(s->mode(), Stream::Mode::Live);
    EXPECT_EQ(q.standby_served().queries, 2u);
    EXPECT_EQ(q.standby_served().rows, 4u);
    EXPECT_EQ(q.primary_served().queries, 1u);
    EXPECT_EQ(q.primary_served().rows, 1u);
    EXPECT_EQ(q.queries(), 3u);
}

TEST_F(StandbyTest, ALaggingStandbyOnlyMovesWorkToThePrimary) {
    auto s = stream("alice", 10, 3);
    q.request(*s);
    standby_up();
    // The standby has replayed up to 5 only: nothing after 10 there.
    answer(sb, batch({}, 0, 5));
    EXPECT_EQ(s->last_position(), 10); // not brought back to the standby's newest
    EXPECT_EQ(s->mode(), Stream::Mode::CatchingUp);
    q.request(*s);
    a.connected(q);
    EXPECT_EQ(a.last_params[0], "10");
    answer(a, batch({11, 12, 13}, 3, 20)); // full: still on the primary until live
    q.request(*s);
    EXPECT_EQ(a.last_params[0], "13");
    EXPECT_EQ(sb.sent.size(), 2u); // the check and one batch
    answer(a, batch({}, 0, 13));
    EXPECT_EQ(s->mode(), Stream::Mode::Live);
    // Its next catch-up (a slow client, say) starts on the standby again.
    s->on_event(14, std::string(300 * 1024, 'x'));
    ASSERT_EQ(s->mode(), Stream::Mode::CatchingUp);
    q.request(*s);
    EXPECT_EQ(sb.sent.size(), 3u);
}

TEST_F(StandbyTest, AStandbyLostMidBatchSendsItsStreamsToThePrimaryAndComesBackLater) {
    auto s1 = stream("alice", 0), s2 = stream("bob", 0);
    q.request(*s1);
    standby_up();
    q.request(*s2); // waits for the standby link (busy)
    EXPECT_EQ(a.connects, 0);
    sb.lost(q, "server closed the connection");
    EXPECT_FALSE(q.standby_up());
    EXPECT_EQ(log.count("replay standby unavailable, replay reads the primary: server closed"), 1u);
    EXPECT_EQ(a.connects, 1);
    a.connected(q);
    EXPECT_EQ(a.last_params[3], "alice"); // first in line still
    answer(a, batch({1}, 1, 1));
    EXPECT_EQ(a.last_params[3], "bob");
    EXPECT_EQ(s1->mode(), Stream::Mode::Live);
    // After its backoff, a dispatch tries the standby again; it is used once it answers.
    clock.now += 100;
    auto s3 = stream("carol", 0);
    q.request(*s3);
    EXPECT_EQ(sb.connects, 2);
    standby_up();
    answer(a, batch({}, 0, 1));
    EXPECT_EQ(log.count("replay standby is back"), 1u);
    EXPECT_EQ(sb.last_params[3], "carol");
}

TEST_F(StandbyTest, AServerThatIsNotInRecoveryIsNotUsed) {
    auto s = stream("alice", 0);
    q.request(*s);
    sb.connected(q);
    EXPECT_FALSE(q.standby_up());  // not before it passed the check
    answer(sb, standby("f", "0")); // a primary (prefer-standby found none), or promoted
    EXPECT_EQ(sb.state(), DbLink::State::Down);
    EXPECT_EQ(log.count("the server is not a standby"), 1u);
    a.connected(q);
    EXPECT_EQ(a.last_params[3], "alice");
    answer(a, batch({1}, 1, 1));
    EXPECT_EQ(s->mode(), Stream::Mode::Live);
}

TEST_F(StandbyTest, APromotedStandbyIsNoticedBetweenBatches) {
    auto s = stream("alice", 0, 3);
    q.request(*s);
    standby_up();
    answer(sb, batch({1, 2, 3}, 3, 7));
    clock.now += ReplayQueue::standby_probe_period_ms;
    q.request(*s);
    EXPECT_EQ(sb.sent.back(), ReplayQueue::standby_probe_sql()); // checked again first
    answer(sb, standby("f", "0"));
    EXPECT_EQ(sb.state(), DbLink::State::Down);
    a.connected(q);
    EXPECT_EQ(a.last_params[0], "3");
}

TEST_F(StandbyTest, AQueryTheStandbyCancelsIsReadFromThePrimary) {
    auto s = stream("alice", 0);
    q.request(*s);
    standby_up();
    answer(sb, FakeResult::failure("canceling statement due to conflict with recovery"));
    EXPECT_FALSE(s->failed());
    EXPECT_EQ(log.count("replay query failed: on a standby (read again from the primary): "
                        "canceling statement"),
              1u);
    a.connected(q);
    EXPECT_EQ(a.last_params[3], "alice");
    answer(a, batch({1}, 1, 1));
    EXPECT_EQ(s->mode(), Stream::Mode::Live);
}

TEST_F(StandbyTest, StreamsBoundForThePrimaryDoNotWaitBehindTheStandbyQueue) {
    auto s1 = stream("alice", 0, 3), s2 = stream("bob", 0, 3);
    q.request(*s1);
    standby_up();
    answer(sb, batch({1}, 1, 1)); // alice: to the primary next
    q.request(*s2);               // bob: on the standby
    q.request(*s1);
    a.connected(q);
    EXPECT_EQ(a.last_params[3], "alice");
    EXPECT_EQ(sb.last_params[3], "bob");
}
