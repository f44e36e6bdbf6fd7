// The positioner's state machine against fake links, with the replication stream as bytes:
// connect, read the progress, start replication, stream, batch, commit, confirm, lose the link,
// resume; skipping what is stored; fencing; changes by a row's own transaction and by later
// ones; a transaction of 200,000 rows in bounded memory; the switch markers; the notifications.
#include "positioner.hpp"

#include "fakes.hpp"
#include "grammar.hpp"
#include "notification.hpp"
#include "wal_bytes.hpp"

#include <gtest/gtest.h>

#include <algorithm>

using namespace event_piper;
using namespace event_piper::testing;
using pgoutput::Lsn;

namespace {

class FakeReplication : public ReplicationLink {
public:
    State state() const override { return state_; }
    void connect() override {
        ++connects;
        state_ = State::Connecting;
    }
    bool command(const std::string &c) override {
        if (state_ != State::Ready) {
            return false;
        }
        commands.push_back(c);
        state_ = State::Busy;
        return true;
    }
    bool send_copy(std::string_view bytes) override {
        if (state_ != State::Streaming) {
            return false;
        }
        copies.emplace_back(bytes);
        return true;
    }
    void set_reading(bool r) override { reading = r; }
    void close() override { state_ = State::Down; }

    void connected(ReplicationOwner &o) {
        state_ = State::Ready;
        o.on_replication_ready();
    }
    void streaming(ReplicationOwner &o) {
        state_ = State::Streaming;
        o.on_replication_streaming();
    }
    void lost(ReplicationOwner &o) {
        state_ = State::Down;
        o.on_replication_lost("server closed the connection unexpectedly");
    }
    // The flushed LSN of the last standby status update sent.
    Lsn last_flush() const {
        EXPECT_FALSE(copies.empty());
        if (copies.empty()) {
            return 0;
        }
        const std::string &s = copies.back();
        EXPECT_EQ(s.size(), 34u);
        EXPECT_EQ(s[0], 'r');
        Lsn v = 0;
        for (int i = 9; i < 17; ++i) {
            v = (v << 8) | static_cast<unsigned char>(s[static_cast<size_t>(i)]);
        }
        return v;
    }

    int connects = 0;
    std::vector<std::string> commands;
    std::vector<std::string> copies;
    bool reading = true;

private:
    State state_ = State::Down;
};

constexpr uint32_t kRel = 16384;

size_t elements(const std::string &array) {
    return array == "{}" ? 0 : static_cast<size_t>(std::count(array.begin(), array.end(), ',')) + 1;
}
constexpr int64_t kTime = 818000000000000; // 2025-12-03 in microseconds since 2000-01-01

struct PositionerTest : ::testing::Test {
    FakeLink apply;
    FakeReplication repl;
    FakeTimer retry, status;
    FakeClock clock;
    FakeLog log;
    Positioner::Settings settings() {
        Positioner::Settings s;
        s.holder = "host 42";
        s.rows_max = 100;
        return s;
    }
    Positioner p{apply, repl, retry, status, clock, log, settings()};

    // Connects both links and answers the progress query.
    void start(std::optional<std::string> lsn = std::string("0/100"), int64_t last = 10) {
        p.start();
        apply.connected(p);
        repl.connected(p);
        ASSERT_EQ(p.phase(), Positioner::Phase::ReadingProgress);
        ASSERT_EQ(apply.sent.back(), Positioner::progress_sql());
        p.on_link_result(apply, FakeResult({{std::string("wal"), lsn, std::to_string(last)}}));
        apply.idle(p);
        ASSERT_EQ(p.phase(), Positioner::Phase::Starting);
        repl.streaming(p);
        ASSERT_EQ(p.phase(), Positioner::Phase::Streaming);
    }
    void data(const std::string &message, Lsn wal_end = 0) {
        p.on_replication_data(wal::xlog(message, 0, wal_end));
    }
    void relation() { data(wal::events_relation(kRel)); }
    // One transaction of inserts (id, subscriber), committed at [commit, end).
    void txn(Lsn commit, Lsn end, std::vector<std::pair<int64_t, std::string>> rows) {
        data(wal::begin(commit, kTime, 700));
        for (auto &[id, sub] : rows) {
            data(wal::insert(kRel, id, sub, "insert", "{\"n\": " + std::to_string(id) + "}"));
        }
        data(wal::commit(commit, end, kTime));
    }
    // The apply statement in flight: answers it (ok or an error) and completes it.
    void applied(const char *error = nullptr) {
        ASSERT_EQ(apply.sent.back(), Positioner::apply_sql());
        if (error != nullptr) {
            p.on_link_result(apply, FakeResult::failure(error));
            return;
        }
        p.on_link_result(apply, FakeResult({{std::string("")}}));
        apply.idle(p);
    }
    const std::vector<std::string> &params() const { return apply.last_params; }
};

} // namespace

TEST(WalNotifications, LoneEventBatchAndLargeEvent) {
    WalRow a{5, 1, "toto", "insert", "{\"foo\": \"bar\"}", 0, true};
    EXPECT_EQ(wal_notifications({&a}),
              std::vector<std::string>{"e 5 4 6\ntotoinsert{\"foo\": \"bar\"}"});
    WalRow b{6, 2, "alice", "t", "{}", 0, true};
    auto two = wal_notifications({&a, &b});
    ASSERT_EQ(two.size(), 1u);
    EXPECT_EQ(two[0], "b\n5 4 6 14\ntotoinsert{\"foo\": \"bar\"}6 5 1 2\nalicet{}");
    // The hub's parser reads what the positioner builds.
    std::vector<Notification> parsed;
    ASSERT_TRUE(parse_notifications(two[0], parsed));
    ASSERT_EQ(parsed.size(), 2u);
    EXPECT_EQ(parsed[1].position, 6);
    WalRow big{7, 3, "toto", "insert", "\"" + std::string(9000, 'x') + "\"", 0, true};
    EXPECT_EQ(wal_notifications({&big}), std::vector<std::string>{"r 7 4\ntoto"});
    // A large event between two small ones: the batch is cut around it.
    auto three = wal_notifications({&a, &big, &b});
    ASSERT_EQ(three.size(), 3u);
    EXPECT_EQ(three[0].substr(0, 4), "e 5 ");
    EXPECT_EQ(three[1], "r 7 4\ntoto");
    EXPECT_EQ(three[2].substr(0, 4), "e 6 ");
    // Many small events fill batches of at most 7,999 bytes, in position order.
    std::vector<WalRow> many;
    for (int i = 0; i < 100; ++i) {
        many.push_back({100 + i, i, "sub", "insert", "\"" + std::string(200, 'y') + "\"", 0, true});
    }
    std::vector<const WalRow *> ptrs;
    for (auto &r : many) {
        ptrs.push_back(&r);
    }
    auto batches = wal_notifications(ptrs);
    ASSERT_GT(batches.size(), 1u);
    int64_t expect = 100;
    for (auto &n : batches) {
        EXPECT_LE(n.size(), 7999u);
        std::vector<Notification> got;
        ASSERT_TRUE(parse_notifications(n, got));
        for (auto &g : got) {
            EXPECT_EQ(g.position, expect++);
        }
    }
    EXPECT_EQ(expect, 200);
}

TEST(WalNotifications, APatchCarriesItsTargetAfterTheLengths) {
    WalRow a{5, 1, "toto", "order", "{\"a\": 1}", 0, true};
    WalRow b{6, 2, "toto", "order", "{\"a\": 2}", 0, true, 1, 5};
    EXPECT_EQ(wal_notifications({&b}), std::vector<std::string>{"e 6 4 5 5\ntotoorder{\"a\": 2}"});
    auto two = wal_notifications({&a, &b});
    ASSERT_EQ(two.size(), 1u);
    EXPECT_EQ(two[0], "b\n5 4 5 8\ntotoorder{\"a\": 1}6 4 5 8 5\ntotoorder{\"a\": 2}");
    std::vector<Notification> parsed;
    ASSERT_TRUE(parse_notifications(two[0], parsed));
    ASSERT_EQ(parsed.size(), 2u);
    EXPECT_EQ(parsed[0].target, 0);
    EXPECT_EQ(parsed[1].target, 5);
    EXPECT_EQ(parsed[1].payload, "{\"a\": 2}");
}

TEST(WalArrays, QuotedLiterals) {
    EXPECT_EQ(int_array({}), "{}");
    EXPECT_EQ(int_array({1, -2, 30}), "{1,-2,30}");
    EXPECT_EQ(text_array({"a", "b\"c", "d\\e", "", "{,}"}),
              "{\"a\",\"b\\\"c\",\"d\\\\e\",\"\",\"{,}\"}");
}

TEST_F(PositionerTest, ConnectReadProgressStartReplicationFromStoredLsn) {
    start(std::string("0/100"), 10);
    ASSERT_EQ(repl.commands.size(), 1u);
    EXPECT_EQ(repl.commands[0], "START_REPLICATION SLOT event_piper LOGICAL 0/100 (proto_version "
                                "'1', publication_names 'event_piper_events', messages 'true')");
    EXPECT_EQ(p.stored_lsn(), 0x100u);
    EXPECT_EQ(p.last_position(), 10);
    EXPECT_TRUE(status.armed());
}

TEST_F(PositionerTest, OneTransactionIsPositionedNotifiedStoredThenConfirmed) {
    start();
    relation();
    txn(0x200, 0x230, {{7, "toto"}});
    EXPECT_EQ(apply.sent.size(), 1u); // nothing before the socket is drained
    p.on_replication_drained();
    ASSERT_EQ(apply.sent.back(), Positioner::apply_sql());
    ASSERT_EQ(params().size(), 16u);
    EXPECT_EQ(params()[0], "0/100");      // the progress it expects (fencing)
    EXPECT_EQ(params()[1], "0/230");      // the progress it stores: the commit's end LSN
    EXPECT_EQ(params()[2], "11");         // the last position given
    EXPECT_EQ(params()[3], "{11}");       // positions
    EXPECT_EQ(params()[4], "{7}");        // event ids
    EXPECT_EQ(params()[5], "{\"toto\"}"); // subscribers
    EXPECT_EQ(params()[6], "{" + std::to_string(kTime) + "}");
    EXPECT_EQ(params()[7], text_array({"e 11 4 6\ntotoinsert{\"n\": 7}"}));
    EXPECT_EQ(params()[11], "false");
    EXPECT_EQ(params()[12], "host 42");
    EXPECT_EQ(params()[13], "new_events");
    EXPECT_EQ(params()[14], "{700}");  // the database waits until this transaction is visible
    EXPECT_EQ(params()[15], "{NULL}"); // targets: a plain event has none
    EXPECT_EQ(p.oldest_pending_ms(), static_cast<uint64_t>((kTime + 946684800000000LL) / 1000));
    // Not confirmed before the positions are committed.
    size_t copies = repl.copies.size();
    EXPECT_EQ(copies, 0u);
    applied();
    EXPECT_EQ(repl.copies.size(), 1u);
    EXPECT_EQ(repl.last_flush(), 0x230u);
    EXPECT_EQ(p.stored_lsn(), 0x230u);
    EXPECT_EQ(p.transactions(), 1u);
    EXPECT_EQ(p.rows(), 1u);
    EXPECT_EQ(p.oldest_pending_ms(), 0u);
}

TEST_F(PositionerTest, TransactionsArrivingDuringAWriteGoInTheNextOne) {
    start();
    relation();
    txn(0x200, 0x230, {{7, "toto"}});
    p.on_replication_drained();
    txn(0x300, 0x330, {{8, "a"}, {9, "b"}});
    txn(0x400, 0x430, {{10, "a"}});
    p.on_replication_drained();
    EXPECT_EQ(apply.sent.size(), 2u); // progress + the first write, still in flight
    applied();
    // The next write carries both transactions, in commit order, as one positioner transaction.
    ASSERT_EQ(apply.sent.size(), 3u);
    EXPECT_EQ(params()[0], "0/230");
    EXPECT_EQ(params()[1], "0/430");
    EXPECT_EQ(params()[3], "{12,13,14}");
    EXPECT_EQ(params()[4], "{8,9,10}");
    applied();
    EXPECT_EQ(repl.last_flush(), 0x430u);
    EXPECT_EQ(p.transactions(), 3u);
    EXPECT_EQ(p.last_position(), 14);
}

TEST_F(PositionerTest, RestartSkipsWhatTheProgressSaysIsDoneAndGivesTheSamePositions) {
    start();
    relation();
    txn(0x200, 0x230, {{7, "toto"}});
    p.on_replication_drained();
    applied();
    txn(0x300, 0x330, {{8, "toto"}});
    p.on_replication_drained();
    std::vector<std::string> first = params();
    // The positions connection dies before the second write's result: it never committed.
    apply.lost(p);
    EXPECT_EQ(p.phase(), Positioner::Phase::Waiting);
    EXPECT_EQ(repl.state(), ReplicationLink::State::Down);
    EXPECT_EQ(log.count("positions connection lost"), 1u);
    ASSERT_TRUE(retry.armed());
    EXPECT_EQ(retry.fire(), 100u);
    p.on_retry_timer();
    apply.connected(p);
    repl.connected(p);
    // The progress row says 0/230, position 11. The slot resends from its confirmed LSN (0/230
    // here; after a crash between commit and confirmation it would resend 0/200 too).
    p.on_link_result(apply,
                     FakeResult({{std::string("wal"), std::string("0/230"), std::string("11")}}));
    apply.idle(p);
    EXPECT_NE(repl.commands.back().find(" LOGICAL 0/230 "), std::string::npos);
    repl.streaming(p);
    relation();
    txn(0x200, 0x230, {{7, "toto"}}); // already stored: skipped
    txn(0x300, 0x330, {{8, "toto"}});
    p.on_replication_drained();
    EXPECT_EQ(params(), first); // the same transaction, the same position, the same notification
    applied();
    EXPECT_EQ(repl.last_flush(), 0x330u);
}

TEST_F(PositionerTest, ACrashBetweenCommitAndConfirmationSkipsTheResentTransaction) {
    start(std::string("0/230"), 11);
    relation();
    txn(0x200, 0x230, {{7, "toto"}}); // committed before the crash, never confirmed
    p.on_replication_drained();
    EXPECT_EQ(apply.sent.size(), 1u); // nothing to write
    txn(0x300, 0x330, {{8, "toto"}});
    p.on_replication_drained();
    EXPECT_EQ(params()[3], "{12}");
}

TEST_F(PositionerTest, LosingTheReplicationLinkDropsWhatIsPendingAndResumes) {
    start();
    relation();
    data(wal::begin(0x200, kTime, 1));
    data(wal::insert(kRel, 7, "toto", "insert", "{}"));
    repl.lost(p);
    EXPECT_EQ(p.phase(), Positioner::Phase::Waiting);
    EXPECT_EQ(apply.state(), DbLink::State::Down);
    EXPECT_EQ(p.pending_rows(), 0u);
    EXPECT_EQ(log.count("replication connection lost"), 1u);
    // Backoff doubles while it keeps failing.
    p.on_retry_timer();
    apply.lost(p);
    EXPECT_EQ(retry.armed_ms, 200u);
    p.on_retry_timer();
    apply.connected(p);
    repl.connected(p);
    p.on_link_result(apply,
                     FakeResult({{std::string("wal"), std::string("0/100"), std::string("10")}}));
    apply.idle(p);
    repl.streaming(p);
    relation();
    txn(0x200, 0x230, {{7, "toto"}});
    p.on_replication_drained();
    EXPECT_EQ(params()[3], "{11}"); // the position it would have had
}

TEST_F(PositionerTest, AFencedWriteStepsDown) {
    start();
    relation();
    txn(0x200, 0x230, {{7, "toto"}});
    p.on_replication_drained();
    applied("ERROR:  event_piper: positioner fenced: the progress is 0/500, not 0/100\n"
            "CONTEXT:  PL/pgSQL function event_piper_wal_apply line 9 at RAISE\n");
    EXPECT_EQ(p.phase(), Positioner::Phase::Waiting);
    EXPECT_EQ(repl.state(), ReplicationLink::State::Down);
    EXPECT_EQ(log.count("stepping down"), 1u);
    EXPECT_EQ(log.lines.back().second.find('\n'), std::string::npos); // one line in the log
    EXPECT_TRUE(repl.copies.empty()); // never confirmed what it could not store
    EXPECT_EQ(p.last_position(), 10);
}

TEST_F(PositionerTest, RowsChangedOrDeletedByTheirOwnTransactionAreDeliveredAsCommitted) {
    start();
    relation();
    data(wal::begin(0x200, kTime, 1));
    data(wal::insert(kRel, 7, "toto", "insert", "{\"v\": 1}"));
    data(wal::insert(kRel, 8, "toto", "insert", "{}"));
    data(wal::insert(kRel, 9, "toto", "insert", "{}"));
    data(wal::update(kRel, 7, "alice", "changed", "{\"v\": 2}"));
    data(wal::del(kRel, 8));
    data(wal::commit(0x200, 0x230, kTime));
    p.on_replication_drained();
    EXPECT_EQ(params()[3], "{11,12}"); // the deleted row takes no position
    EXPECT_EQ(params()[4], "{7,9}");
    EXPECT_EQ(params()[5], "{\"alice\",\"toto\"}");
    std::vector<Notification> parsed;
    std::string note = "b\n11 5 7 8\nalicechanged{\"v\": 2}12 4 6 2\ntotoinsert{}";
    EXPECT_EQ(params()[7], text_array({note}));
    EXPECT_EQ(params()[8], "{}");
    EXPECT_EQ(params()[10], "{}");
}

TEST_F(PositionerTest, LaterUpdatesDeletesAndTruncatesKeepPositionsRight) {
    start();
    relation();
    txn(0x200, 0x230, {{7, "toto"}});
    p.on_replication_drained();
    applied();
    // Later transactions change rows positioned before: applied in commit order.
    data(wal::begin(0x300, kTime, 2));
    data(wal::update(kRel, 7, "alice", "insert", "{}"));
    data(wal::del(kRel, 3));
    data(wal::commit(0x300, 0x330, kTime));
    p.on_replication_drained();
    EXPECT_EQ(params()[3], "{}");
    EXPECT_EQ(params()[7], "{}");
    EXPECT_EQ(params()[8], "{7}");
    EXPECT_EQ(params()[9], "{\"alice\"}");
    EXPECT_EQ(params()[10], "{3}");
    applied();
    // A later transaction changes a row still pending in the same batch: folded in memory.
    txn(0x400, 0x430, {{20, "toto"}});
    data(wal::begin(0x500, kTime, 3));
    data(wal::update(kRel, 20, "bob", "insert", "{}"));
    data(wal::commit(0x500, 0x530, kTime));
    p.on_replication_drained();
    EXPECT_EQ(params()[4], "{20}");
    EXPECT_EQ(params()[5], "{\"bob\"}");
    EXPECT_EQ(params()[8], "{}");
    applied();
    // TRUNCATE: what came before goes, what comes after in the same batch stays.
    txn(0x600, 0x630, {{21, "toto"}});
    data(wal::begin(0x700, kTime, 4));
    data(wal::truncate(kRel));
    data(wal::commit(0x700, 0x730, kTime));
    txn(0x800, 0x830, {{22, "toto"}});
    p.on_replication_drained();
    EXPECT_EQ(params()[11], "true");
    EXPECT_EQ(params()[4], "{22}");
    EXPECT_EQ(params()[1], "0/830");
}

// A writer's commit is decoded a moment before other sessions can see it: positions committed
// then are visible without their rows, and a stream reading the table passes over them (the
// chaos test in wal mode lost deliveries this way). Every write names the transactions whose
// rows it positions, so that the database waits until they are visible.
TEST_F(PositionerTest, EveryWriteNamesTheTransactionsItPositionsForTheVisibilityWait) {
    start();
    relation();
    data(wal::begin(0x200, kTime, 701));
    data(wal::insert(kRel, 7, "toto", "insert", "{}"));
    data(wal::commit(0x200, 0x230, kTime));
    data(wal::begin(0x240, kTime, 702));
    data(wal::insert(kRel, 8, "toto", "insert", "{}"));
    data(wal::insert(kRel, 9, "alice", "insert", "{}"));
    data(wal::commit(0x240, 0x270, kTime));
    p.on_replication_drained();
    ASSERT_EQ(apply.sent.back(), Positioner::apply_sql());
    ASSERT_EQ(params().size(), 16u);
    EXPECT_EQ(params()[4], "{7,8,9}");
    EXPECT_EQ(params()[14], "{701,702}");
    applied();
    // A transaction whose rows all went again (deleted by itself) positions nothing: no wait.
    data(wal::begin(0x300, kTime, 703));
    data(wal::insert(kRel, 10, "toto", "insert", "{}"));
    data(wal::del(kRel, 10));
    data(wal::commit(0x300, 0x330, kTime));
    p.on_replication_drained();
    ASSERT_EQ(apply.sent.back(), Positioner::apply_sql());
    EXPECT_EQ(params()[4], "{}");
    EXPECT_EQ(params()[14], "{}");
    applied();
    // The next transaction alone.
    txn(0x400, 0x430, {{11, "toto"}});
    p.on_replication_drained();
    EXPECT_EQ(params()[14], "{700}");
}

TEST_F(PositionerTest, ATransactionOf200000RowsIsWrittenInPartsInBoundedMemory) {
    start();
    relation();
    data(wal::begin(0x1000, kTime, 9));
    int64_t next_expected = 11;
    size_t parts = 0;
    bool began = false, final_sent = false;
    for (int64_t id = 1; id <= 200000; ++id) {
        ASSERT_TRUE(repl.reading) << id; // the fake delivers only while the positioner reads
        data(wal::insert(kRel, id, "toto", "insert", "{}"));
        // Play the positions connection: answer whatever is in flight.
        while (apply.state() == DbLink::State::Busy) {
            const std::string &sql = apply.sent.back();
            if (sql == "BEGIN") {
                began = true;
            } else {
                ASSERT_EQ(sql, Positioner::apply_sql());
                EXPECT_EQ(params()[1], "");     // a part: no progress yet
                EXPECT_EQ(params()[7], "{}");   // no notifications held for it
                EXPECT_EQ(params()[14], "{9}"); // visible before its positions are
                std::string list = params()[3];
                // Positions continue without a gap, in insert order.
                size_t count = elements(list);
                EXPECT_EQ(list.substr(0, list.find_first_of(",}")),
                          "{" + std::to_string(next_expected));
                next_expected += static_cast<int64_t>(count);
                ++parts;
            }
            p.on_link_result(apply, FakeResult::command_ok());
            apply.idle(p);
        }
        EXPECT_LE(p.pending_rows(), 100u);
    }
    data(wal::commit(0x1000, 0x1030, kTime));
    ASSERT_EQ(apply.sent.back(), Positioner::apply_sql());
    EXPECT_EQ(params()[1], "0/1030");
    EXPECT_EQ(params()[7], text_array({"p 200010"})); // a bare position for the whole transaction
    // The parts waited already, in the same positioner transaction.
    EXPECT_EQ(params()[14], elements(params()[3]) > 0 ? "{9}" : "{}");
    next_expected += static_cast<int64_t>(elements(params()[3]));
    final_sent = true;
    p.on_link_result(apply, FakeResult::command_ok());
    apply.idle(p);
    EXPECT_EQ(apply.sent.back(), "COMMIT");
    EXPECT_TRUE(repl.copies.empty()); // confirmed only after COMMIT
    apply.idle(p);
    EXPECT_EQ(repl.last_flush(), 0x1030u);
    EXPECT_TRUE(began);
    EXPECT_TRUE(final_sent);
    EXPECT_GE(parts, 1999u);
    EXPECT_EQ(next_expected, 200011);
    EXPECT_LE(p.peak_pending_rows(), 100u);
    EXPECT_EQ(p.rows(), 200000u);
    EXPECT_EQ(p.transactions(), 1u);
    EXPECT_EQ(std::count(apply.sent.begin(), apply.sent.end(), std::string("BEGIN")), 1);
}

TEST_F(PositionerTest, ReadingPausesWhileAWriteIsInFlightAndTheBatchIsFull) {
    start();
    relation();
    txn(0x200, 0x230, {{1, "toto"}});
    p.on_replication_drained(); // write in flight
    data(wal::begin(0x300, kTime, 2));
    for (int64_t id = 2; id < 102; ++id) {
        data(wal::insert(kRel, id, "toto", "insert", "{}"));
    }
    EXPECT_FALSE(repl.reading);
    applied(); // the first write completes: BEGIN for the large one, reading resumes after parts
    EXPECT_EQ(apply.sent.back(), "BEGIN");
    apply.idle(p);
    EXPECT_EQ(apply.sent.back(), Positioner::apply_sql());
    EXPECT_EQ(params()[1], "");
    p.on_link_result(apply, FakeResult::command_ok());
    apply.idle(p);
    EXPECT_TRUE(repl.reading);
}

TEST_F(PositionerTest, AfterTheSwitchToWalOnlyTransactionsAfterTheMarkerArePositioned) {
    start(std::nullopt, 500); // progress lsn NULL: set by event_piper_set_source('wal')
    EXPECT_NE(repl.commands[0].find(" LOGICAL 0/0 "), std::string::npos);
    EXPECT_TRUE(p.awaiting_switch());
    relation();
    txn(0x200, 0x230, {{7, "toto"}}); // positioned by the trigger before the switch
    p.on_replication_drained();
    EXPECT_EQ(apply.sent.size(), 1u);
    data(wal::begin(0x300, kTime, 3));
    data(wal::logical("event_piper", "source wal", 0x310));
    data(wal::commit(0x300, 0x330, kTime));
    txn(0x400, 0x430, {{8, "toto"}});
    p.on_replication_drained();
    EXPECT_FALSE(p.awaiting_switch());
    EXPECT_EQ(params()[0], ""); // expects NULL
    EXPECT_EQ(params()[1], "0/430");
    EXPECT_EQ(params()[3], "{501}"); // continues from the sequence
    EXPECT_EQ(params()[4], "{8}");
    applied();
    EXPECT_EQ(repl.last_flush(), 0x430u);
}

TEST_F(PositionerTest, TheSwitchBackToTheTriggerStopsPositioning) {
    start();
    relation();
    data(wal::begin(0x300, kTime, 3));
    data(wal::logical("event_piper", "source trigger", 0x310));
    data(wal::commit(0x300, 0x330, kTime));
    EXPECT_EQ(p.phase(), Positioner::Phase::Waiting);
    EXPECT_EQ(log.count("switched to its trigger"), 1u);
    EXPECT_EQ(retry.armed_ms, 5000u);
    // Next time the progress row says trigger: it waits, quietly after the first notice.
    p.on_retry_timer();
    apply.connected(p);
    repl.connected(p);
    p.on_link_result(apply,
                     FakeResult({{std::string("trigger"), std::nullopt, std::string("12")}}));
    apply.idle(p);
    // A slot left behind by the switch (it was being read then) is dropped, so it keeps no WAL.
    EXPECT_EQ(apply.sent.back(), Positioner::drop_idle_slot_sql());
    size_t commands = repl.commands.size();
    p.on_link_result(apply, FakeResult({{std::string("t")}}));
    apply.idle(p);
    EXPECT_EQ(repl.commands.size(), commands); // no START_REPLICATION in trigger mode
    EXPECT_EQ(p.phase(), Positioner::Phase::Waiting);
    EXPECT_EQ(apply.state(), DbLink::State::Down);
    EXPECT_EQ(log.count("gives positions with its trigger"), 1u);
    EXPECT_EQ(retry.armed_ms, 5000u);
}

TEST_F(PositionerTest, KeepalivesConfirmWhenNothingIsPendingAndAnswerWhenAsked) {
    start();
    p.on_replication_data(wal::keepalive(0x900));
    EXPECT_EQ(repl.last_flush(), 0x900u);
    EXPECT_EQ(p.server_wal_end(), 0x900u);
    relation();
    data(wal::begin(0xA00, kTime, 3));
    size_t n = repl.copies.size();
    p.on_replication_data(wal::keepalive(0xB00)); // a transaction is being read: no confirmation
    EXPECT_EQ(repl.copies.size(), n);
    p.on_replication_data(wal::keepalive(0xB00, true)); // but an answer when the server asks
    EXPECT_EQ(repl.copies.size(), n + 1);
    EXPECT_EQ(repl.last_flush(), 0x900u);
    // And on the status timer, so that wal_sender_timeout never ends a busy positioner.
    EXPECT_EQ(status.fire(), 3000u);
    p.on_status_timer();
    EXPECT_EQ(repl.copies.size(), n + 2);
    EXPECT_TRUE(status.armed());
}

TEST_F(PositionerTest, ASlotReadElsewhereIsANoticeAndARetry) {
    p.start();
    apply.connected(p);
    repl.connected(p);
    p.on_link_result(apply,
                     FakeResult({{std::string("wal"), std::string("0/100"), std::string("1")}}));
    apply.idle(p);
    p.on_replication_result(
        FakeResult::failure("ERROR:  replication slot \"event_piper\" is active for PID 4242"));
    EXPECT_EQ(p.phase(), Positioner::Phase::Waiting);
    EXPECT_EQ(log.count("is read by another positioner"), 1u);
    EXPECT_EQ(log.lines.back().first, LogLevel::Notice);
    EXPECT_TRUE(retry.armed());
}

TEST_F(PositionerTest, WhyTheSlotCannotBeReadIsLoggedWithTheFix) {
    struct Case {
        const char *error;
        const char *fix;
    };
    for (Case c :
         {Case{"ERROR:  logical decoding requires wal_level >= logical", "set wal_level = logical"},
          Case{"ERROR:  must be superuser or replication role to start walsender",
               "REPLICATION attribute"},
          Case{"ERROR:  replication slot \"event_piper\" does not exist",
               "event_piper_set_source('wal')"},
          Case{"ERROR:  publication \"event_piper_events\" does not exist",
               "event_piper_set_source('wal')"},
          Case{"ERROR:  can no longer get changes from replication slot",
               "max_slot_wal_keep_size"}}) {
        p.stop();
        p.start();
        apply.connected(p);
        repl.connected(p);
        p.on_link_result(
            apply, FakeResult({{std::string("wal"), std::string("0/100"), std::string("1")}}));
        apply.idle(p);
        p.on_replication_result(FakeResult::failure(c.error));
        EXPECT_EQ(p.phase(), Positioner::Phase::Waiting) << c.error;
        EXPECT_NE(log.lines.back().second.find(c.fix), std::string::npos) << c.error;
    }
}

TEST_F(PositionerTest, StopClosesEverythingAndStartsAfresh) {
    start();
    relation();
    txn(0x200, 0x230, {{7, "toto"}});
    p.stop();
    EXPECT_EQ(p.phase(), Positioner::Phase::Stopped);
    EXPECT_FALSE(retry.armed());
    EXPECT_FALSE(status.armed());
    EXPECT_EQ(apply.state(), DbLink::State::Down);
    EXPECT_EQ(repl.state(), ReplicationLink::State::Down);
    EXPECT_EQ(log.lines.size(), 0u);
    p.start();
    EXPECT_EQ(p.phase(), Positioner::Phase::Connecting);
}

TEST_F(PositionerTest, MalformedStreamIsALostLink) {
    start();
    p.on_replication_data("w short");
    EXPECT_EQ(p.phase(), Positioner::Phase::Waiting);
    EXPECT_EQ(log.count("bad replication message"), 1u);
}

// Patches: the target's position is found in memory (the same transaction, or one of the batch)
// or read from the table before the write, stored with the row and sent in the notification.
TEST_F(PositionerTest, APatchOfAnEventOfTheSameBatchCarriesItsTarget) {
    start();
    data(wal::patched_relation(kRel));
    data(wal::begin(0x200, kTime, 700));
    data(wal::patch_insert(kRel, 7, "toto", "order", "{\"a\": 1}", 0));
    data(wal::patch_insert(kRel, 8, "toto", "order", "{\"a\": 2}", 7));
    data(wal::commit(0x200, 0x230, kTime));
    data(wal::begin(0x300, kTime, 701));
    data(wal::patch_insert(kRel, 9, "toto", "order", "null", 7));
    data(wal::commit(0x300, 0x330, kTime));
    p.on_replication_drained();
    ASSERT_EQ(apply.sent.back(), Positioner::apply_sql()); // no lookup: all in memory
    EXPECT_EQ(params()[3], "{11,12,13}");
    EXPECT_EQ(params()[15], "{NULL,11,11}");
    EXPECT_EQ(params()[7], text_array({"b\n11 4 5 8\ntotoorder{\"a\": 1}12 4 5 8 11\n"
                                       "totoorder{\"a\": 2}",
                                       "e 13 4 5 11\ntotoordernull"}));
    applied();
    EXPECT_EQ(log.count("patches event"), 0u);
}

TEST_F(PositionerTest, APatchOfAnOlderEventReadsItsTargetFromTheTableFirst) {
    start();
    data(wal::patched_relation(kRel));
    data(wal::begin(0x200, kTime, 700));
    data(wal::patch_insert(kRel, 1, "toto", "other", "{}", 0));
    data(wal::patch_insert(kRel, 9, "toto", "order", "{\"a\": 2}", 3));
    data(wal::patch_insert(kRel, 10, "toto", "other", "{}", 0));
    data(wal::commit(0x200, 0x230, kTime));
    p.on_replication_drained();
    ASSERT_EQ(apply.sent.back(), Positioner::targets_sql());
    EXPECT_EQ(params(), std::vector<std::string>{"{3}"});
    // Rows decoded meanwhile wait for the next write.
    data(wal::begin(0x300, kTime, 701));
    data(wal::patch_insert(kRel, 11, "toto", "order", "{\"a\": 3}", 2));
    data(wal::commit(0x300, 0x330, kTime));
    p.on_link_result(apply, FakeResult({{std::string("3"), std::string("toto"), std::nullopt,
                                         std::string("4")}}));
    apply.idle(p);
    // The second transaction's patch needs the table too: another round, then the write.
    ASSERT_EQ(apply.sent.back(), Positioner::targets_sql());
    EXPECT_EQ(params(), std::vector<std::string>{"{2}"});
    p.on_link_result(apply, FakeResult({{std::string("2"), std::string("toto"), std::nullopt,
                                         std::string("3")}}));
    apply.idle(p);
    ASSERT_EQ(apply.sent.back(), Positioner::apply_sql());
    EXPECT_EQ(params()[1], "0/330");
    EXPECT_EQ(params()[3], "{11,12,13,14}");
    EXPECT_EQ(params()[15], "{NULL,4,NULL,3}");
    EXPECT_EQ(params()[7],
              text_array({"b\n11 4 5 2\ntotoother{}12 4 5 8 4\ntotoorder{\"a\": 2}13 4 5 2\n"
                          "totoother{}",
                          "e 14 4 5 3\ntotoorder{\"a\": 3}"}));
    applied();
    EXPECT_EQ(repl.last_flush(), 0x330u);
    EXPECT_EQ(log.count("patches event"), 0u);
    EXPECT_EQ(p.rows(), 4u);
}

TEST_F(PositionerTest, BadPatchesAreDeliveredAsPlainEventsAndLogged) {
    start();
    data(wal::patched_relation(kRel));
    data(wal::begin(0x200, kTime, 700));
    data(wal::patch_insert(kRel, 7, "toto", "order", "{}", 0));
    data(wal::patch_insert(kRel, 8, "toto", "order", "{\"a\": 1}", 7));
    data(wal::patch_insert(kRel, 9, "toto", "order", "{\"a\": 2}", 8));   // a patch of a patch
    data(wal::patch_insert(kRel, 10, "alice", "order", "{\"a\": 3}", 7)); // another subscriber
    data(wal::patch_insert(kRel, 11, "toto", "order", "{\"a\": 4}", 12)); // inserted after it
    data(wal::patch_insert(kRel, 12, "toto", "order", "{}", 0));
    data(wal::patch_insert(kRel, 13, "toto", "order", "{\"a\": 5}", 5)); // gone
    data(wal::patch_insert(kRel, 14, "toto", "order", "{\"a\": 6}", 6)); // elsewhere
    data(wal::commit(0x200, 0x230, kTime));
    p.on_replication_drained();
    ASSERT_EQ(apply.sent.back(), Positioner::targets_sql());
    EXPECT_EQ(params(), std::vector<std::string>{"{5,6}"});
    p.on_link_result(apply, FakeResult({{std::string("6"), std::string("bob"), std::nullopt,
                                         std::string("3")}}));
    apply.idle(p);
    ASSERT_EQ(apply.sent.back(), Positioner::apply_sql());
    EXPECT_EQ(params()[15], "{NULL,11,NULL,NULL,NULL,NULL,NULL,NULL}");
    EXPECT_EQ(log.count("event 9 patches event 8, which is itself a patch: delivered as a plain "
                        "event at position 13"),
              1u);
    EXPECT_EQ(log.count("event 10 patches event 7, which belongs to another subscriber"), 1u);
    EXPECT_EQ(log.count("event 11 patches event 12, which has no position before it"), 1u);
    EXPECT_EQ(log.count("event 13 patches event 5, which does not exist"), 1u);
    EXPECT_EQ(log.count("event 14 patches event 6, which belongs to another subscriber"), 1u);
    applied();
    EXPECT_EQ(p.rows(), 8u);
}

TEST_F(PositionerTest, PatchesInTheWrittenPartsOfALargeTransactionGetTheirTargets) {
    start();
    data(wal::patched_relation(kRel));
    data(wal::begin(0x1000, kTime, 9));
    std::vector<std::string> targets;
    // 250 rows: each tenth patches the row before it, the first patch a row from before.
    for (int64_t id = 1; id <= 250; ++id) {
        int64_t patches = id % 10 == 0 ? id - 1 : 0;
        if (id == 5) {
            patches = 1000; // in the table
        }
        data(wal::patch_insert(kRel, id, "toto", "order", "{}", patches));
        while (apply.state() == DbLink::State::Busy) {
            const std::string &sql = apply.sent.back();
            if (sql == Positioner::targets_sql()) {
                // The table: 1000 at position 3, rows of earlier parts at 10 + id.
                std::vector<FakeResult::Row> rows;
                std::string list = params()[0];
                for (size_t at = 1; at < list.size();) {
                    size_t end = list.find_first_of(",}", at);
                    int64_t id = std::stoll(list.substr(at, end - at));
                    rows.push_back({std::to_string(id), std::string("toto"), std::nullopt,
                                    std::to_string(id == 1000 ? 3 : 10 + id)});
                    at = end + 1;
                }
                p.on_link_result(apply, FakeResult(rows));
            } else if (sql == Positioner::apply_sql()) {
                targets.push_back(params()[15]);
                p.on_link_result(apply, FakeResult::command_ok());
            } else {
                p.on_link_result(apply, FakeResult::command_ok());
            }
            apply.idle(p);
        }
    }
    data(wal::commit(0x1000, 0x1030, kTime));
    while (apply.state() == DbLink::State::Busy) {
        if (apply.sent.back() == Positioner::apply_sql()) {
            targets.push_back(params()[15]);
        }
        p.on_link_result(apply, FakeResult::command_ok());
        apply.idle(p);
    }
    std::string all;
    for (auto &t : targets) {
        all += t.substr(1, t.size() - 2) + (t == "{}" ? "" : ",");
    }
    // Position of id n is 10 + n: a patch of id n - 1 names position 9 + n.
    size_t patches = 0;
    size_t start_at = 0;
    for (int64_t id = 1; id <= 250; ++id) {
        size_t end = all.find(',', start_at);
        std::string got = all.substr(start_at, end - start_at);
        start_at = end + 1;
        std::string want = id == 5        ? "3"
                           : id % 10 == 0 ? std::to_string(9 + id)
                                          : std::string("NULL");
        EXPECT_EQ(got, want) << id;
        patches += got != "NULL" ? 1 : 0;
    }
    EXPECT_EQ(patches, 26u);
    EXPECT_EQ(repl.last_flush(), 0x1030u);
    EXPECT_EQ(log.count("patches event"), 0u);
}

TEST(WalNotifications, AtTheGrammarsLimits) {
    // docs/notification-grammar.md: "e" while shorter than event_below bytes, then "r"; nothing
    // for a subscriber of subscriber_below bytes; an event of batch_event_max bytes may share a
    // batch, one byte more goes alone.
    const std::string head = "e 5 4 6\n";
    for (size_t size : {grammar::event_below - 1, grammar::event_below}) {
        WalRow a{5, 1, "toto", "insert", std::string(size - head.size() - 10, '1'), 0, true};
        auto out = wal_notifications({&a});
        ASSERT_EQ(out.size(), 1u);
        if (size < grammar::event_below) {
            EXPECT_EQ(out[0].size(), size);
            EXPECT_EQ(out[0].substr(0, head.size()), head);
        } else {
            EXPECT_EQ(out[0], "r 5 4\ntoto");
        }
    }
    for (size_t sub : {grammar::subscriber_below - 1, grammar::subscriber_below}) {
        WalRow a{5, 1, std::string(sub, 's'), "t", std::string(200, '1'), 0, true};
        auto out = wal_notifications({&a});
        EXPECT_EQ(out.size(), sub < grammar::subscriber_below ? 1u : 0u) << sub;
    }
    for (size_t size : {grammar::batch_event_max, grammar::batch_event_max + 1}) {
        WalRow a{5, 1, "s", "t", std::string(size - 2, '1'), 0, true};
        WalRow b{6, 2, "s", "t", "{}", 0, true};
        auto out = wal_notifications({&a, &b});
        EXPECT_EQ(out.size(), size <= grammar::batch_event_max ? 1u : 2u) << size;
    }
}
