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

class FakePeers : public RelayPeers {
public:
    explicit FakePeers(size_t n) : peers(n) {}
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
    uint64_t new_epoch() override { return ++epochs; }
    void publish(bool l, uint64_t e, int64_t n, int64_t s) override {
        live = l;
        epoch = e;
        newest = n;
        start = s;
    }
    void publish_newest(int64_t n) override { newest = n; }
    uint64_t waiting_since_ms(uint64_t mine) const override {
        return mine == 0 || (others != 0 && others < mine) ? others : mine;
    }
    // What a receiver `peer` reads in shared memory.
    RelayView view(size_t peer) const {
        return RelayView{live, epoch, newest, start, peers[peer].seq, peers[peer].overruns};
    }

    std::vector<FakePeer> peers;
    uint64_t epochs = 100;
    bool live = false;
    uint64_t epoch = 0;
    int64_t newest = -1;
    int64_t start = -1;
    uint64_t others = 0;
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
};

} // namespace

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
    // A stream of several ids (issue 13) wants each of them.
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
    EXPECT_TRUE(peers.live);
    EXPECT_EQ(peers.epoch, 101u);
    EXPECT_EQ(peers.newest, 7);
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
                                      101, 1, {event(8, "alice"), event(10, "alice"), "p 11"})});
    EXPECT_TRUE(peers.peers[1].got.empty()); // no stream for either: never woken
    EXPECT_EQ(peers.peers[2].got,
              std::vector<std::string>{datagram(101, 1, {event(9, "bob"), "p 11"})});
    sender.on_notification(event(12, "bob"));
    sender.on_notifications_done();
    EXPECT_EQ(peers.peers[2].got.back(), datagram(101, 2, {event(12, "bob")}));
    EXPECT_EQ(peers.newest, 12);
    EXPECT_EQ(sender.forwarded(), 6u);
}

TEST(RelaySenderTest, ATransactionsBatchGoesToEveryWorkerThatWantsAnyOfItsEvents) {
    // Issue 11's "b" notifications carry the events of one transaction, for several consumers.
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
    EXPECT_EQ(peers.peers[0].got, std::vector<std::string>{datagram(101, 1, {batch})});
    EXPECT_TRUE(peers.peers[1].got.empty());
    EXPECT_EQ(peers.peers[2].got, std::vector<std::string>{datagram(101, 1, {batch})});
    EXPECT_EQ(peers.newest, 9);
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
    EXPECT_FALSE(peers.live);
    EXPECT_FALSE(holder.hub.listening());
    sender.on_listener_ready(2, 1, 1);
    EXPECT_EQ(peers.epoch, 102u); // a new session, instance-wide
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
    std::string stale = datagram(101, 1, {event(1, "alice")});
    sender.on_listener_lost();
    sender.on_listener_ready(2, 0, 0); // another holder or session: epoch 102
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
    w.receiver.on_datagram(datagram(101, 5, {event(3, "alice")}), peers.view(0));
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
    std::string cut = datagram(101, peers.peers[0].seq + 1, {event(1, "alice")});
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
