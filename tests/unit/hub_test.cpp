// The hub: where a new stream starts (all or nothing), fan-out of notifications (framed once, drop
// accounting, references and bare positions), and what listener readiness and loss mean for every
// stream.
#include "hub.hpp"

#include "alloc_failure.hpp"
#include "fakes.hpp"
#include "relay.hpp"
#include "sse_frame.hpp"

#include <gtest/gtest.h>

#include <memory>
#include <new>
#include <set>

using namespace event_piper;
using namespace event_piper::testing;

namespace {

struct HubTest : ::testing::Test {
    FakeTimer retry;
    FakeClock clock;
    FakeLog log;
    Hub hub{retry, clock, log};
    FakeLink link;
    FakeOwner owner;

    void SetUp() override { hub.replay().add_link(link); }
    std::unique_ptr<Stream> stream(const char *consumer, int64_t last = -1,
                                   StreamOwner *o = nullptr) {
        return std::make_unique<Stream>(consumer, last, Stream::Limits{},
                                        o != nullptr ? o : &owner);
    }
    static std::string frame(int64_t id, const char *data = "{}") {
        std::string out;
        append_event_frame(out, id, "t", data);
        return out;
    }
    static std::string drain(Stream &s) {
        std::string out;
        s.take_pending(out);
        return out;
    }
    static std::string event(int64_t pos, const std::string &sub, const std::string &payload) {
        return "e " + std::to_string(pos) + " " + std::to_string(sub.size()) + " 1\n" + sub + "t" +
               payload;
    }
};

} // namespace

TEST_F(HubTest, BeforeTheListenerAStreamWithoutResumePointWaitsAndRemembersWhen) {
    auto s = stream("alice");
    hub.open(*s);
    EXPECT_EQ(s->last_position(), -1);
    EXPECT_EQ(hub.waiting_since_ms(), clock.now);
    EXPECT_FALSE(s->wants_query(true));
    hub.on_listener_ready(1, 10, 8);
    EXPECT_EQ(s->last_position(), 8); // the commit-clock start the listener read
    EXPECT_EQ(hub.waiting_since_ms(), 0u);
    EXPECT_TRUE(s->wants_query(true)); // reads the table once, then goes live
}

TEST_F(HubTest, WhileListeningAStreamWithoutResumePointIsLiveAtTheNewest) {
    hub.on_listener_ready(1, 10, 10);
    auto s = stream("alice");
    hub.open(*s);
    EXPECT_EQ(s->last_position(), 10);
    EXPECT_EQ(s->mode(), Stream::Mode::Live);
    hub.on_notification(event(11, "alice", "{}"));
    EXPECT_EQ(drain(*s), frame(11));
}

TEST_F(HubTest, WithAKnownPositionButNoListenerAStreamStartsThereAndCatchesUp) {
    hub.on_listener_ready(1, 10, 10);
    hub.on_listener_lost();
    auto s = stream("alice");
    hub.open(*s);
    EXPECT_EQ(s->last_position(), 10);
    EXPECT_EQ(s->mode(), Stream::Mode::CatchingUp);
}

TEST_F(HubTest, AnEventReachesEveryStreamOfItsConsumerAndNoOther) {
    hub.on_listener_ready(1, 0, 0);
    FakeOwner other;
    auto a1 = stream("alice"), a2 = stream("alice"), b = stream("bob", -1, &other);
    hub.open(*a1);
    hub.open(*a2);
    hub.open(*b);
    hub.on_notification(event(1, "alice", "{\"x\": 1}"));
    EXPECT_EQ(drain(*a1), frame(1, "{\"x\":1}"));
    EXPECT_EQ(drain(*a2), frame(1, "{\"x\":1}"));
    EXPECT_EQ(drain(*b), "");
    EXPECT_EQ(owner.wakes, 2);
    EXPECT_EQ(other.wakes, 0);
    EXPECT_EQ(hub.stats().notifications, 1u);
    EXPECT_EQ(hub.stats().notifications_dropped, 0u);
    EXPECT_EQ(hub.stats().last_notification_ms, clock.now);
}

TEST_F(HubTest, ABatchOfOneTransactionReachesEachConsumerInPositionOrder) {
    hub.on_listener_ready(1, 0, 0);
    FakeOwner other;
    auto a = stream("alice"), b = stream("bob", -1, &other);
    hub.open(*a);
    hub.open(*b);
    hub.on_notification("b\n"
                        "1 5 1 2\nalicet{}"
                        "2 3 1 8\nbobt{\"x\": 2}"
                        "3 5 1 8\nalicet{\"x\": 3}"
                        "4 6 1 2\nnobodyt{}");
    EXPECT_EQ(drain(*a), frame(1) + frame(3, "{\"x\":3}"));
    EXPECT_EQ(drain(*b), frame(2, "{\"x\":2}"));
    EXPECT_EQ(hub.stats().notifications, 4u); // counted per event
    EXPECT_EQ(hub.stats().notifications_dropped, 1u);
    EXPECT_EQ(hub.newest(), 4);
}

TEST_F(HubTest, AnEventForNobodyHereIsCountedAsDropped) {
    hub.on_listener_ready(1, 0, 0);
    hub.on_notification(event(1, "nobody", "{}"));
    hub.on_notification("r 2 6\nnobody");
    EXPECT_EQ(hub.stats().notifications_dropped, 2u);
    EXPECT_EQ(hub.newest(), 2);
}

TEST_F(HubTest, TheNewestNotifiedPositionCountsNotificationsOnly) {
    hub.on_listener_ready(1, 7, 7); // read from the table when the listener went live
    EXPECT_EQ(hub.newest_notified(), 0);
    hub.on_notification(event(8, "nobody", "{}"));
    hub.on_notification("b\n9 1 1 2\nat{}10 1 1 2\nbt{}");
    EXPECT_EQ(hub.newest_notified(), 10);
    hub.note_position(12); // learned by a replay, not announced
    EXPECT_EQ(hub.newest(), 12);
    EXPECT_EQ(hub.newest_notified(), 10);
    hub.on_notification("p 11");
    EXPECT_EQ(hub.newest_notified(), 11);
}

TEST_F(HubTest, AReferenceSendsTheConsumersLiveStreamsToTheTable) {
    hub.on_listener_ready(1, 0, 0);
    auto a = stream("alice"), b = stream("bob");
    hub.open(*a);
    hub.open(*b);
    hub.on_notification("r 1 5\nalice");
    EXPECT_EQ(a->mode(), Stream::Mode::CatchingUp);
    EXPECT_EQ(b->mode(), Stream::Mode::Live);
    EXPECT_TRUE(a->wants_query(true));
}

TEST_F(HubTest, ABarePositionSendsEveryLiveStreamToTheTable) {
    hub.on_listener_ready(1, 0, 0);
    auto a = stream("alice"), b = stream("bob");
    hub.open(*a);
    hub.open(*b);
    hub.on_notification("p 3");
    EXPECT_EQ(a->mode(), Stream::Mode::CatchingUp);
    EXPECT_EQ(b->mode(), Stream::Mode::CatchingUp);
    EXPECT_EQ(hub.stats().notifications_dropped, 0u);
}

TEST_F(HubTest, ForeignNotificationsAreIgnoredAndLoggedOnce) {
    hub.on_notification("{\"id\": 1}");
    hub.on_notification("{\"id\": 2}");
    EXPECT_EQ(log.count("ignoring notifications not written by"), 1u);
    EXPECT_EQ(hub.stats().notifications, 0u);
}

TEST_F(HubTest, ASlowStreamOverflowsBackToTheTableAndIsCounted) {
    hub.on_listener_ready(1, 0, 0);
    Stream::Limits small;
    small.buffer_bytes = 64;
    Stream s("alice", -1, small, &owner);
    hub.open(s);
    for (int i = 1; i <= 5; ++i) {
        hub.on_notification(event(i, "alice", "{\"pad\": \"xxxxxxxxxxxxxxxxxxxx\"}"));
    }
    EXPECT_EQ(s.mode(), Stream::Mode::CatchingUp);
    EXPECT_EQ(hub.stats().stream_overflows, 1u);
}

TEST_F(HubTest, ListenerLossAndReturnSendLiveStreamsThroughTheTable) {
    hub.on_listener_ready(1, 5, 5);
    auto s = stream("alice");
    hub.open(*s);
    EXPECT_EQ(hub.listener_epoch(), 1u);
    hub.on_listener_lost();
    EXPECT_FALSE(hub.listening());
    EXPECT_EQ(hub.listener_epoch(), 0u);
    EXPECT_EQ(s->mode(), Stream::Mode::CatchingUp);
    hub.on_listener_ready(2, 9, 9);
    EXPECT_EQ(hub.listener_epoch(), 2u);
    EXPECT_EQ(hub.newest(), 9);
    EXPECT_EQ(s->last_position(), 5); // resumes from where it was, not from the newest
    EXPECT_TRUE(s->wants_query(true));
}

TEST_F(HubTest, ClosedStreamsGetNothingAndLeaveTheQueue) {
    hub.on_listener_ready(1, 0, 0);
    auto s = stream("alice", 0);
    hub.open(*s);
    hub.request_batch(*s);
    EXPECT_EQ(hub.replay().queued(), 1u);
    hub.close(*s);
    EXPECT_EQ(hub.replay().queued(), 0u);
    EXPECT_EQ(hub.streams(), 0u);
    EXPECT_EQ(hub.consumers(), 0u);
    hub.on_notification(event(1, "alice", "{}"));
    EXPECT_EQ(hub.stats().notifications_dropped, 1u);
}

TEST_F(HubTest, EndAllAsksEveryOwnerToEndEvenWhenOwnersLeaveDuringTheLoop) {
    struct Leaving : StreamOwner {
        Hub *hub = nullptr;
        Stream *stream = nullptr;
        int ends = 0;
        void wake() override {}
        void end() override {
            ++ends;
            hub->close(*stream);
        }
    };
    Leaving o1, o2, o3;
    Stream s1("alice", 0, {}, &o1), s2("alice", 0, {}, &o2), s3("bob", 0, {}, &o3);
    for (auto [o, s] : {std::pair{&o1, &s1}, std::pair{&o2, &s2}, std::pair{&o3, &s3}}) {
        o->hub = &hub;
        o->stream = s;
        hub.open(*s);
    }
    hub.end_all();
    EXPECT_EQ(o1.ends + o2.ends + o3.ends, 3);
    EXPECT_EQ(hub.streams(), 0u);
    EXPECT_EQ(hub.consumers(), 0u);
}

TEST_F(HubTest, CountsStreamsCatchingUp) {
    hub.on_listener_ready(1, 0, 0);
    auto live = stream("alice"), behind = stream("bob", 0);
    hub.open(*live);
    hub.open(*behind);
    EXPECT_EQ(hub.streams_catching_up(), 1u);
}

TEST_F(HubTest, APatchIsFramedWithItsTarget) {
    hub.on_listener_ready(1, 10, 10);
    auto s = stream("alice");
    hub.open(*s);
    ASSERT_EQ(s->mode(), Stream::Mode::Live);
    hub.on_notification("b\n11 5 1 2\naliceo{}12 5 1 11 11\nalicep{\"a\": null}");
    std::string expected = frame(11);
    expected.replace(expected.find("event: t"), 8, "event: o");
    append_target_frame(expected, 12, 11, TargetMember::Patch, "p", "{\"a\":null}");
    EXPECT_EQ(drain(*s), expected);
    EXPECT_EQ(drain(*s), "");
    hub.on_notification("e 13 5 1 11\nalicet{\"b\": 1}");
    EXPECT_EQ(drain(*s),
              "id: 13\nevent: patch\ndata: {\"target\":11,\"type\":\"t\",\"patch\":{\"b\":1}}\n\n");
}

namespace {

// A worker's interest bits and its published waiting time; set() may be told to throw.
struct RecordingBits : InterestBits {
    void set(size_t bit, bool on) override {
        if (on && fail_at_set > 0 && --fail_at_set == 0) {
            throw std::bad_alloc();
        }
        if (on) {
            bits.insert(bit);
        } else {
            bits.erase(bit);
        }
    }
    void publish_waiting_since(uint64_t ms) override { waiting_since = ms; }
    std::set<size_t> bits;
    uint64_t waiting_since = 0;
    int fail_at_set = 0; // this call to set(bit, true) throws (0: none)
};

// A hub whose worker follows the shared listener, with a stream of "team" already open.
struct FailingOpen {
    FakeTimer retry;
    FakeClock clock;
    FakeLog log;
    Hub hub{retry, clock, log};
    RecordingBits bits;
    InterestMap interest{bits};
    FakeOwner other_owner, owner;
    Stream other{"team", 0, {}, &other_owner};
    Stream s{std::vector<std::string>{"alice", "team", "everyone"}, -1, {}, &owner};

    FailingOpen() {
        hub.set_interest(&interest);
        hub.open(other);
    }
    // Nothing of `s` is left: no registry entry, no interest bit, no waiting mark; no event of
    // its ids reaches it.
    void expect_nothing_of_s() {
        EXPECT_EQ(hub.streams(), 1u);
        EXPECT_EQ(hub.consumers(), 1u);
        EXPECT_EQ(bits.bits, std::set<size_t>{consumer_bit("team")});
        EXPECT_EQ(hub.waiting_since_ms(), 0u);
        EXPECT_EQ(bits.waiting_since, 0u);
        hub.on_listener_ready(1, 10, 10);
        hub.on_notification("e 11 5 1\nalicet{}");
        hub.on_notification("e 12 4 1\nteamt{}");
        hub.on_notification("e 13 8 1\neveryonet{}");
        EXPECT_EQ(owner.wakes, 0);
        EXPECT_EQ(hub.stats().notifications_dropped, 2u);
        EXPECT_GT(other_owner.wakes, 0);
        hub.on_listener_lost();
    }
};

} // namespace

// Every allocation open() makes fails in turn (the second id's among them): each failure leaves
// nothing registered, and the same stream opens and closes normally afterwards.
TEST(HubOpenTest, AnAllocationThatFailsLeavesNothingRegistered) {
    int failures = 0;
    for (int nth = 1; nth < 1000; ++nth) {
        FailingOpen t;
        bool threw = false;
        {
            FailingAllocation fail(nth);
            try {
                t.hub.open(t.s);
            } catch (const std::bad_alloc &) {
                threw = true;
            }
            ASSERT_EQ(threw, fail.failed());
        }
        if (!threw) {
            EXPECT_EQ(t.hub.streams(), 2u);
            t.hub.close(t.s);
            break;
        }
        ++failures;
        SCOPED_TRACE("allocation " + std::to_string(nth));
        t.expect_nothing_of_s();
        t.hub.open(t.s);
        EXPECT_EQ(t.hub.streams(), 2u);
        EXPECT_EQ(t.hub.consumers(), 3u);
        t.hub.close(t.s);
        EXPECT_EQ(t.hub.streams(), 1u);
        EXPECT_EQ(t.bits.bits, std::set<size_t>{consumer_bit("team")});
    }
    EXPECT_GE(failures, 2); // a new group for "alice", then "everyone" at least
}

// The interest bit of the second id cannot be set: the first id's is cleared again.
TEST(HubOpenTest, AnInterestBitThatCannotBeSetLeavesNothingRegistered) {
    FailingOpen t;
    t.bits.fail_at_set = 2; // "alice" sets a bit, "team" has one, "everyone" fails
    EXPECT_THROW(t.hub.open(t.s), std::bad_alloc);
    t.expect_nothing_of_s();
}
