// The shared listener: interest bits, what the holder forwards to whom (and what it does when a
// worker's buffer is full), and when a receiving worker's streams are live or re-read the table
// (new session, gap, overrun, holder lost or gone, stale datagrams).
#include "relay.hpp"

#include "fakes.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <set>

using namespace event_piper;
using namespace event_piper::testing;

namespace {

class FakeBits : public InterestBits {
public:
    void set(size_t bit, bool on) override {
        if (on) {
            bits.insert(bit);
        } else {
            bits.erase(bit);
        }
    }
    std::set<size_t> bits;
};

struct FakePeer {
    std::set<size_t> interest;
    RelayPeers::Sent answer = RelayPeers::Sent::Ok;
    uint64_t seq = 0;
    uint64_t overruns = 0;
    std::vector<std::string> got;
};

// The holder's side, over a real RelayBoard that starts as the shared zone's does.
class FakePeers : public RelayPeers {
public:
    explicit FakePeers(size_t n) : peers(n) { init_relay_board(board, 1); }
    size_t size() const override { return peers.size(); }
    bool wants(size_t peer, size_t bit) const override {
        const auto &p = peers[peer];
        return bit == any_stream ? !p.interest.empty() : p.interest.count(bit) > 0;
    }
    uint64_t next_seq(size_t peer) override { return ++peers[peer].seq; }
    Sent send(size_t peer, std::string_view d) override {
        if (peers[peer].answer == Sent::Ok) {
            peers[peer].got.emplace_back(d);
        }
        return peers[peer].answer;
    }
    void overrun(size_t peer) override { ++peers[peer].overruns; }
    uint64_t new_epoch() override { return ++board.epochs; }
    void publish(bool l, uint64_t e, int64_t n, int64_t s) override {
        board.live = 0;
        board.epoch = e;
        board.newest = n;
        board.start_for_waiting = s;
        board.live = l ? 1 : 0;
    }
    void publish_newest(int64_t n) override {
        raise_newest(board, n);
        ++newest_published;
    }
    uint64_t waiting_since_ms(uint64_t mine) const override {
        return mine == 0 || (others != 0 && others < mine) ? others : mine;
    }
    // What a receiver `peer` reads in shared memory.
    RelayView view(size_t peer) const {
        return RelayView{board.live == 1,         board.epoch,     board.newest,
                         board.start_for_waiting, peers[peer].seq, peers[peer].overruns};
    }
    bool live() const { return board.live == 1; }
    uint64_t epoch() const { return board.epoch; }
    int64_t newest() const { return board.newest; }

    std::vector<FakePeer> peers;
    RelayBoard board{};
    uint64_t others = 0;
    int newest_published = 0;
};

std::string event(int64_t pos, const std::string &sub) {
    return "e " + std::to_string(pos) + " " + std::to_string(sub.size()) + " 1\n" + sub + "t{}";
}

std::string datagram(uint64_t epoch, uint64_t seq, std::vector<std::string> payloads) {
    std::string d(relay_header, '\0');
    std::memcpy(&d[0], &epoch, 8);
    std::memcpy(&d[8], &seq, 8);
    for (const auto &p : payloads) {
        auto length = static_cast<uint32_t>(p.size());
        d.append(reinterpret_cast<const char *>(&length), 4);
        d += p;
    }
    return d;
}

// One worker: a hub, its streams and the receiver or sender around it.
struct Worker {
    FakeTimer retry;
    FakeClock clock;
    FakeLog log;
    FakeLink link;
    FakeOwner owner;
    Hub hub{retry, clock, log};
    EpochSource epochs;
    RelayReceiver receiver{hub, epochs, log};
    Worker() { hub.replay().add_link(link); }
    std::unique_ptr<Stream> open(const char *consumer, int64_t last) {
        auto s = std::make_unique<Stream>(consumer, last, Stream::Limits{}, &owner);
        hub.open(*s);
        return s;
    }
    // Plays the replay link until `s` is live or parked: the table holds nothing newer.
    void catch_up(Stream &s) {
        for (int i = 0; i < 5 && (s.wants_query(true) || s.query_in_flight()); ++i) {
            if (!s.query_in_flight()) {
                hub.request_batch(s);
            }
            if (link.state() != DbLink::State::Busy) {
                link.connected(hub.replay());
            }
            FakeResult::Row empty{std::nullopt, std::nullopt, std::nullopt, std::nullopt, "1000"};
            hub.replay().on_link_result(link, FakeResult({empty}));
            link.idle(hub.replay());
        }
    }
    // The same, against a table holding events of `s`'s consumer at `table`'s positions.
    void catch_up(Stream &s, const std::vector<int64_t> &table) {
        for (int i = 0; i < 5 && (s.wants_query(true) || s.query_in_flight()); ++i) {
            if (!s.query_in_flight()) {
                hub.request_batch(s);
            }
            if (link.state() != DbLink::State::Busy) {
                link.connected(hub.replay());
            }
            std::vector<FakeResult::Row> rows;
            int64_t newest = table.empty() ? 0 : table.back();
            for (int64_t p : table) {
                if (p > s.last_position()) {
                    rows.push_back(
                        {std::to_string(p), "insert", "{}", "1", std::to_string(newest)});
                }
            }
            if (rows.empty()) {
                rows.push_back({std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                                std::to_string(newest)});
            } else {
                for (auto &row : rows) {
                    row[3] = std::to_string(rows.size());
                }
            }
            hub.replay().on_link_result(link, FakeResult(rows));
            link.idle(hub.replay());
        }
    }
};

} // namespace

// The layout relay.hpp describes, byte by byte: the epoch at 0, the sequence number at 8, then
// records of a 4-byte length and the payload.
TEST(RelayDatagramTest, HeaderAndRecordsSitWhereTheLayoutSays) {
    std::string d;
    start_relay_datagram(d, 0x0102030405060708ull);
    EXPECT_EQ(d, datagram(0x0102030405060708ull, 0, {}));
    append_relay_record(d, "p 11");
    append_relay_record(d, "");
    set_relay_seq(d, 42);
    ASSERT_EQ(d.size(), 16u + 4 + 4 + 4);
    uint64_t epoch = 0, seq = 0;
    uint32_t first = 0, second = 1;
    std::memcpy(&epoch, d.data(), 8);
    std::memcpy(&seq, d.data() + 8, 8);
    std::memcpy(&first, d.data() + 16, 4);
    std::memcpy(&second, d.data() + 24, 4);
    EXPECT_EQ(epoch, 0x0102030405060708ull);
    EXPECT_EQ(seq, 42u);
    EXPECT_EQ(first, 4u);
    EXPECT_EQ(d.substr(20, 4), "p 11");
    EXPECT_EQ(second, 0u);
    EXPECT_EQ(d, datagram(0x0102030405060708ull, 42, {"p 11", ""}));

    RelayHeader header;
    ASSERT_TRUE(read_relay_header(d, header));
    EXPECT_EQ(header.epoch, 0x0102030405060708ull);
    EXPECT_EQ(header.seq, 42u);
    std::string_view rest = std::string_view(d).substr(relay_header);
    std::string_view payload;
    ASSERT_TRUE(next_relay_record(rest, payload));
    EXPECT_EQ(payload, "p 11");
    ASSERT_TRUE(next_relay_record(rest, payload));
    EXPECT_EQ(payload, "");
    EXPECT_TRUE(rest.empty());
    EXPECT_FALSE(next_relay_record(rest, payload));
}

TEST(RelayDatagramTest, AShortHeaderOrACutRecordIsNotRead) {
    RelayHeader header;
    EXPECT_FALSE(read_relay_header(std::string(15, '\0'), header));
    std::string d = datagram(1, 1, {"e 1"});
    std::string_view cut = std::string_view(d).substr(relay_header, d.size() - relay_header - 1);
    std::string_view payload = "untouched";
    EXPECT_FALSE(next_relay_record(cut, payload));
    EXPECT_EQ(cut.size(), 4u + 2);
    EXPECT_EQ(payload, "untouched");
    std::string_view three = std::string_view(d).substr(relay_header, 3);
    EXPECT_FALSE(next_relay_record(three, payload));
    EXPECT_EQ(three.size(), 3u);
}

TEST(InterestMapTest, ABitStaysSetWhileAnyStreamHashesToIt) {
    FakeBits bits;
    InterestMap map(bits);
    map.add("alice");
    map.add("alice");
    EXPECT_EQ(bits.bits, std::set<size_t>{consumer_bit("alice")});
    map.remove("alice");
    EXPECT_EQ(bits.bits.size(), 1u);
    map.remove("alice");
    EXPECT_TRUE(bits.bits.empty());
    map.remove("alice"); // an unbalanced removal changes nothing
    EXPECT_TRUE(bits.bits.empty());
    EXPECT_LT(consumer_bit("bob"), interest_bits);
}

TEST(InterestMapTest, TheHubPublishesItsConsumersBeforeTheFirstQuery) {
    Worker w;
    FakeBits bits;
    InterestMap map(bits);
    w.hub.set_interest(&map);
    auto s = w.open("alice", 0);
    EXPECT_EQ(bits.bits.count(consumer_bit("alice")), 1u);
    w.hub.close(*s);
    EXPECT_TRUE(bits.bits.empty());
    // A stream of several ids wants each of them.
    Stream multi(std::vector<std::string>{"alice", "bob"}, 0, Stream::Limits{}, &w.owner);
    w.hub.open(multi);
    EXPECT_EQ(bits.bits, (std::set<size_t>{consumer_bit("alice"), consumer_bit("bob")}));
    w.hub.close(multi);
    EXPECT_TRUE(bits.bits.empty());
}

TEST(RelaySenderTest, ForwardsOnlyToWorkersThatWantTheConsumerAndNumbersPerWorker) {
    Worker holder;
    FakePeers peers(3);
    RelaySender sender(holder.hub, peers, holder.epochs);
    peers.peers[0].interest = {consumer_bit("alice")};
    peers.peers[2].interest = {consumer_bit("bob")};
    sender.on_listener_ready(1, 7, 5);
    EXPECT_TRUE(peers.live());
    EXPECT_EQ(peers.epoch(), 1u);
    EXPECT_EQ(peers.newest(), 7);
    EXPECT_TRUE(holder.hub.listening());

    peers.peers[0].got.clear(); // the session's pings
    peers.peers[2].got.clear();
    sender.on_notification(event(8, "alice"));
    sender.on_notification(event(9, "bob"));
    sender.on_notification(event(10, "alice"));
    sender.on_notification("p 11");          // a bare position goes to every worker
    EXPECT_TRUE(peers.peers[0].got.empty()); // one datagram per read of the listener's socket
    sender.on_notifications_done();
    EXPECT_EQ(peers.peers[0].got, std::vector<std::string>{datagram(
                                      1, 1, {event(8, "alice"), event(10, "alice"), "p 11"})});
    EXPECT_TRUE(peers.peers[1].got.empty()); // no stream for either: never woken
    EXPECT_EQ(peers.peers[2].got,
              std::vector<std::string>{datagram(1, 1, {event(9, "bob"), "p 11"})});
    sender.on_notification(event(12, "bob"));
    sender.on_notifications_done();
    EXPECT_EQ(peers.peers[2].got.back(), datagram(1, 2, {event(12, "bob")}));
    EXPECT_EQ(peers.newest(), 12);
    EXPECT_EQ(sender.forwarded(), 6u);
}

TEST(RelaySenderTest, ATransactionsBatchGoesToEveryWorkerThatWantsAnyOfItsEvents) {
    // A "b" notification carries the events of one transaction, for several consumers.
    Worker holder;
    FakePeers peers(3);
    RelaySender sender(holder.hub, peers, holder.epochs);
    peers.peers[0].interest = {consumer_bit("alice")};
    peers.peers[1].interest = {consumer_bit("carol")};
    peers.peers[2].interest = {consumer_bit("bob")};
    sender.on_listener_ready(1, 7, 7);
    for (auto &p : peers.peers) {
        p.got.clear();
    }
    std::string batch = "b\n8 5 1 2\nalicet{}9 3 1 2\nbobt{}";
    sender.on_notification(batch);
    sender.on_notifications_done();
    EXPECT_EQ(peers.peers[0].got, std::vector<std::string>{datagram(1, 1, {batch})});
    EXPECT_TRUE(peers.peers[1].got.empty());
    EXPECT_EQ(peers.peers[2].got, std::vector<std::string>{datagram(1, 1, {batch})});
    EXPECT_EQ(peers.newest(), 9);
}

TEST(RelaySenderTest, AFullWorkerIsCountedAndSkippedNeverWaitedFor) {
    Worker holder;
    FakePeers peers(2);
    RelaySender sender(holder.hub, peers, holder.epochs);
    peers.peers[0].interest = peers.peers[1].interest = {consumer_bit("alice")};
    sender.on_listener_ready(1, 0, 0);
    peers.peers[0].answer = RelayPeers::Sent::Lost;
    peers.peers[1].answer = RelayPeers::Sent::Gone;
    sender.on_notification(event(1, "alice"));
    sender.on_notifications_done();
    EXPECT_EQ(peers.peers[0].overruns, 1u);
    EXPECT_EQ(peers.peers[0].seq, 1u); // numbered: the next datagram shows the gap
    EXPECT_EQ(peers.peers[1].overruns, 0u);
    EXPECT_EQ(sender.overruns(), 1u);
}

TEST(RelaySenderTest, NothingIsForwardedOutsideAListeningSessionAndLossIsPublished) {
    Worker holder;
    FakePeers peers(1);
    RelaySender sender(holder.hub, peers, holder.epochs);
    peers.peers[0].interest = {consumer_bit("alice")};
    sender.on_notification(event(1, "alice")); // heard while reading the newest position
    sender.on_notifications_done();
    EXPECT_TRUE(peers.peers[0].got.empty());
    sender.on_listener_ready(1, 1, 1);
    sender.on_listener_lost();
    EXPECT_FALSE(peers.live());
    EXPECT_FALSE(holder.hub.listening());
    sender.on_listener_ready(2, 1, 1);
    EXPECT_EQ(peers.epoch(), 2u); // a new session, instance-wide
    peers.others = 1000;
    EXPECT_EQ(sender.waiting_since_ms(), 1000u);
}

struct ReceiverTest : ::testing::Test {
    Worker holder;
    FakePeers peers{1};
    RelaySender sender{holder.hub, peers, holder.epochs};
    Worker w;
    std::unique_ptr<Stream> s;

    void SetUp() override {
        s = w.open("alice", 0);
        peers.peers[0].interest = {consumer_bit("alice")};
        sender.on_listener_ready(1, 0, 0);
    }
    // The holder hears one notification (one read of its socket).
    void notify(const std::string &payload) {
        sender.on_notification(payload);
        sender.on_notifications_done();
    }
    // Hands the receiver what the holder sent it since last time.
    void deliver() {
        for (const auto &d : peers.peers[0].got) {
            w.receiver.on_datagram(d, peers.view(0));
        }
        peers.peers[0].got.clear();
    }
    std::string drain() {
        std::string out;
        s->take_pending(out);
        return out;
    }
};

TEST_F(ReceiverTest, GoesLiveWhenSharedMemoryShowsALiveHolderThenTakesEvents) {
    EXPECT_FALSE(w.receiver.ready());
    w.receiver.sync(peers.view(0));
    EXPECT_TRUE(w.receiver.ready());
    EXPECT_TRUE(w.hub.listening());
    w.catch_up(*s);
    ASSERT_EQ(s->mode(), Stream::Mode::Live);
    notify(event(1, "alice"));
    notify(event(2, "alice"));
    deliver();
    EXPECT_NE(drain().find("id: 2"), std::string::npos);
    EXPECT_EQ(s->last_position(), 2);
    EXPECT_EQ(w.receiver.received(), 2u);
    EXPECT_EQ(w.receiver.catchups(), 0u);
}

TEST_F(ReceiverTest, AGapSendsTheStreamsThroughTheTable) {
    w.receiver.sync(peers.view(0));
    w.catch_up(*s);
    notify(event(1, "alice"));
    peers.peers[0].got.clear(); // lost on the way
    notify(event(2, "alice"));
    deliver();
    EXPECT_EQ(s->mode(), Stream::Mode::CatchingUp);
    EXPECT_TRUE(s->wants_query(true));
    EXPECT_EQ(w.receiver.catchups(), 1u);
    EXPECT_TRUE(w.receiver.ready()); // the holder is live: live again after one read
    w.catch_up(*s);
    EXPECT_EQ(s->mode(), Stream::Mode::Live);
}

TEST_F(ReceiverTest, AnOverrunWithoutAFollowingDatagramIsNoticedBySync) {
    w.receiver.sync(peers.view(0));
    w.catch_up(*s);
    peers.peers[0].answer = RelayPeers::Sent::Lost;
    notify(event(1, "alice"));
    w.receiver.sync(peers.view(0)); // after the drain, or by the periodic check
    EXPECT_EQ(s->mode(), Stream::Mode::CatchingUp);
    EXPECT_EQ(w.receiver.catchups(), 1u);
    peers.peers[0].answer = RelayPeers::Sent::Ok;
    w.catch_up(*s);
    notify(event(2, "alice"));
    deliver(); // in order after the resync: delivered
    EXPECT_EQ(s->last_position(), 2);
    EXPECT_EQ(w.receiver.catchups(), 1u);
}

TEST_F(ReceiverTest, TheHolderLosingPostgresParksTheStreamsUntilItIsBack) {
    w.receiver.sync(peers.view(0));
    w.catch_up(*s);
    sender.on_listener_lost();
    w.receiver.sync(peers.view(0));
    EXPECT_FALSE(w.receiver.ready());
    EXPECT_EQ(s->mode(), Stream::Mode::CatchingUp);
    w.catch_up(*s); // a short batch without a listener parks the stream
    EXPECT_FALSE(s->wants_query(true));
    sender.on_listener_ready(2, 0, 0);
    w.receiver.sync(peers.view(0));
    EXPECT_TRUE(w.receiver.ready());
    EXPECT_TRUE(s->wants_query(true)); // re-reads once, then live
}

TEST_F(ReceiverTest, ANewSessionSeenFirstInADatagramResyncsAndAStaleOneIsIgnored) {
    w.receiver.sync(peers.view(0));
    w.catch_up(*s);
    std::string stale = datagram(1, 1, {event(1, "alice")});
    sender.on_listener_lost();
    sender.on_listener_ready(2, 0, 0); // another holder or session: epoch 2
    notify(event(2, "alice"));
    deliver();
    EXPECT_EQ(s->mode(), Stream::Mode::CatchingUp);
    EXPECT_EQ(w.receiver.catchups(), 1u);
    w.receiver.on_datagram(stale, peers.view(0)); // already covered by the re-read
    EXPECT_EQ(w.receiver.catchups(), 1u);
    w.catch_up(*s);
    EXPECT_EQ(s->mode(), Stream::Mode::Live);
}

TEST_F(ReceiverTest, ADatagramOfADeadSessionDoesNotMakeStreamsLive) {
    w.receiver.sync(peers.view(0));
    w.catch_up(*s);
    notify(event(1, "alice"));
    sender.on_listener_lost(); // sent just before the holder lost PostgreSQL
    w.receiver.on_datagram(datagram(1, 5, {event(3, "alice")}), peers.view(0));
    EXPECT_FALSE(w.receiver.ready());
    EXPECT_FALSE(w.hub.listening());
}

TEST_F(ReceiverTest, TheHoldersPingAtANewSessionMakesItReadyAtOnce) {
    deliver(); // the ping of the session begun in SetUp
    EXPECT_TRUE(w.receiver.ready());
    sender.on_listener_lost();
    deliver();
    EXPECT_FALSE(w.receiver.ready());
    EXPECT_EQ(w.receiver.received(), 0u);
}

TEST_F(ReceiverTest, MalformedDatagramsAreIgnoredAndLoggedOnce) {
    w.receiver.sync(peers.view(0));
    w.receiver.on_datagram("short", peers.view(0));
    w.receiver.on_datagram("short", peers.view(0));
    EXPECT_EQ(w.log.count("malformed relay datagram"), 1u);
    EXPECT_TRUE(w.receiver.ready());
    w.catch_up(*s);
    std::string cut = datagram(1, peers.peers[0].seq + 1, {event(1, "alice")});
    cut.resize(cut.size() - 2); // a record cut short: what it carried may be lost
    peers.peers[0].seq += 1;
    w.receiver.on_datagram(cut, peers.view(0));
    EXPECT_EQ(s->mode(), Stream::Mode::CatchingUp);
    EXPECT_TRUE(w.receiver.ready());
}

TEST_F(ReceiverTest, TakingTheRoleHandsOverToTheWorkersOwnListener) {
    w.receiver.sync(peers.view(0));
    w.catch_up(*s);
    w.receiver.stop();
    EXPECT_FALSE(w.hub.listening());
    EXPECT_EQ(s->mode(), Stream::Mode::CatchingUp);
    w.receiver.sync(peers.view(0)); // no longer listens to shared memory
    EXPECT_FALSE(w.receiver.ready());
}

TEST(RelaySenderTest, ALargeBatchIsSplitIntoSeveralNumberedDatagrams) {
    Worker holder;
    FakePeers peers(1);
    RelaySender sender(holder.hub, peers, holder.epochs);
    peers.peers[0].interest = {consumer_bit("alice")};
    sender.on_listener_ready(1, 0, 0);
    peers.peers[0].got.clear();
    std::string big = event(1, "alice") + std::string(7000, ' ');
    for (int i = 0; i < 6; ++i) {
        sender.on_notification(big);
    }
    sender.on_notifications_done();
    ASSERT_EQ(peers.peers[0].got.size(), 2u);
    for (const auto &d : peers.peers[0].got) {
        EXPECT_LE(d.size(), relay_batch_bytes);
    }
    EXPECT_EQ(peers.peers[0].seq, 2u);
    EXPECT_EQ(sender.forwarded(), 6u);
}

// A follower's interest bits are the holder's view of it (FakePeers' peer), and it reads the
// holder's newest position from the same board, as NgxRelay does.
class FollowerBits : public InterestBits {
public:
    FollowerBits(FakePeers &peers, size_t peer) : peers_(peers), peer_(peer) {}
    void set(size_t bit, bool on) override {
        if (on) {
            peers_.peers[peer_].interest.insert(bit);
        } else {
            peers_.peers[peer_].interest.erase(bit);
        }
    }
    int64_t newest_published() const override { return peers_.board.newest; }

private:
    FakePeers &peers_;
    size_t peer_;
};

struct StartPointTest : ::testing::Test {
    Worker holder;
    FakePeers peers{1};
    RelaySender sender{holder.hub, peers, holder.epochs};
    Worker w;
    FollowerBits bits{peers, 0};
    InterestMap interest{bits};
    void SetUp() override { w.hub.set_interest(&interest); }
    void TearDown() override { w.hub.set_interest(nullptr); }
    void notify(const std::string &payload) {
        sender.on_notification(payload);
        sender.on_notifications_done();
    }
    void deliver() {
        for (const auto &d : peers.peers[0].got) {
            w.receiver.on_datagram(d, peers.view(0));
        }
        peers.peers[0].got.clear();
    }
};

TEST_F(StartPointTest, AFreshZoneKnowsNoPositionSoAStreamWaitsForTheListenersReading) {
    EXPECT_EQ(peers.view(0).newest, -1); // what ngx_slab_calloc + init_relay_board give
    w.receiver.sync(peers.view(0));      // no holder yet, or it cannot reach PostgreSQL
    EXPECT_EQ(w.hub.newest(), -1);
    auto s = w.open("alice", -1);
    EXPECT_EQ(s->last_position(), -1); // not 0: that would replay the consumer's history
    EXPECT_FALSE(s->wants_query(true));
    sender.on_listener_ready(1, 500, 498); // 498: committed before the stream opened
    w.receiver.sync(peers.view(0));
    EXPECT_EQ(s->last_position(), 498);
}

TEST_F(StartPointTest, AStreamOnAFollowerStartsAfterWhatTheHolderHeardNotAStaleValue) {
    sender.on_listener_ready(1, 10, 10);
    w.receiver.sync(peers.view(0));
    EXPECT_EQ(w.hub.newest(), 10);
    notify(event(11, "bob")); // no stream of bob's here: not forwarded, not seen by w
    deliver();
    EXPECT_EQ(w.hub.newest(), 10);
    auto s = w.open("bob", -1);
    EXPECT_EQ(s->last_position(), 11); // committed before it opened: not its to receive
    EXPECT_EQ(s->mode(), Stream::Mode::Live);
    notify(event(12, "bob"));
    deliver();
    std::string out;
    s->take_pending(out);
    EXPECT_EQ(out.find("id: 11"), std::string::npos);
    EXPECT_NE(out.find("id: 12"), std::string::npos);
}

TEST_F(StartPointTest, TheHolderPublishesAPositionBeforeItReadsTheInterestBits) {
    // The order that makes newest_published() safe: a follower that sets its bit and then reads
    // a position below p is asked for p, because p was published before the bit was read.
    struct OrderPeers : FakePeers {
        OrderPeers() : FakePeers(1) {}
        bool wants(size_t peer, size_t bit) const override {
            wants_saw_newest.push_back(board.newest);
            return FakePeers::wants(peer, bit);
        }
        mutable std::vector<int64_t> wants_saw_newest;
    } order;
    RelaySender s2{holder.hub, order, holder.epochs};
    s2.on_listener_ready(1, 1, 1);
    order.wants_saw_newest.clear();
    s2.on_notification(event(7, "carol"));
    ASSERT_FALSE(order.wants_saw_newest.empty());
    EXPECT_EQ(order.wants_saw_newest.front(), 7);
}

// Two holders at once (a frozen one waking up before it notices the takeover): a follower may
// hear the same events from both; its streams deliver each once, in order.
TEST_F(StartPointTest, TwoHoldersAtOnceDeliverNothingTwice) {
    Worker old_holder;
    RelaySender old_sender{old_holder.hub, peers, old_holder.epochs};
    old_sender.on_listener_ready(1, 0, 0); // epoch 1
    w.receiver.sync(peers.view(0));
    auto s = w.open("alice", 0);
    w.catch_up(*s, {});
    ASSERT_EQ(s->mode(), Stream::Mode::Live);
    std::vector<int64_t> table;
    std::string out;
    auto step = [&] { // the receiver reads its socket; the client takes the bytes; re-reads
        deliver();
        std::string some;
        s->take_pending(some);
        out += some;
        w.catch_up(*s, table);
        s->take_pending(some);
        out += some;
    };
    auto both = [&](int64_t p) { // committed, and heard by both holders' LISTEN connections
        table.push_back(p);
        old_sender.on_notification(event(p, "alice"));
        old_sender.on_notifications_done();
        step();
        notify(event(p, "alice"));
        step();
    };
    table.push_back(1);
    old_sender.on_notification(event(1, "alice"));
    old_sender.on_notifications_done();
    step();
    sender.on_listener_ready(1, 1, 1); // another worker took the role: epoch 2
    step();
    both(2);
    both(3);
    old_sender.abandon(); // it noticed the takeover and steps down
    EXPECT_FALSE(old_holder.hub.listening());
    EXPECT_TRUE(peers.live());
    std::vector<std::string> ids;
    for (size_t at = out.find("id: "); at != std::string::npos; at = out.find("id: ", at + 1)) {
        ids.push_back(out.substr(at + 4, out.find('\n', at) - at - 4));
    }
    EXPECT_EQ(ids, (std::vector<std::string>{"1", "2", "3"}));
    EXPECT_EQ(s->mode(), Stream::Mode::Live);
}

TEST_F(StartPointTest, AHolderThatLostTheRoleFollowsTheNewHolder) {
    sender.on_listener_ready(1, 5, 5);
    auto s = holder.open("alice", 5);
    holder.catch_up(*s, {});
    EXPECT_EQ(s->mode(), Stream::Mode::Live);
    // Another worker took the role: this one abandons its session without touching the board.
    Worker new_holder;
    RelaySender new_sender{new_holder.hub, peers, new_holder.epochs};
    new_sender.on_listener_ready(1, 6, 6);
    sender.abandon();
    EXPECT_TRUE(peers.live()); // the new holder's session stands
    EXPECT_FALSE(holder.hub.listening());
    EXPECT_EQ(s->mode(), Stream::Mode::CatchingUp);
    holder.receiver.stop();
    holder.receiver.resume();
    holder.receiver.sync(peers.view(0));
    EXPECT_TRUE(holder.receiver.ready());
    EXPECT_TRUE(holder.hub.listening());
}
