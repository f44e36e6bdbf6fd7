// The catch-up / live rules of a stream: no gap, no duplicate, bounded memory.
#include "stream.hpp"

#include "sse_frame.hpp"

#include <gtest/gtest.h>

using namespace event_piper;

namespace {
std::string frame(int64_t id) {
    std::string out;
    append_event_frame(out, id, "t", "{}");
    return out;
}
Stream::Limits buffer(size_t bytes) {
    Stream::Limits limits;
    limits.buffer_bytes = bytes;
    return limits;
}
std::string drain(Stream &s) {
    std::string out;
    s.take_pending(out);
    return out;
}
} // namespace

TEST(Stream, LiveDeliversNewerEventsAndDropsOlderOnes) {
    Stream s("toto", 5, buffer(1 << 20));
    s.go_live();
    EXPECT_FALSE(s.on_event(5, frame(5)));
    EXPECT_TRUE(s.on_event(6, frame(6)));
    EXPECT_FALSE(s.on_event(6, frame(6)));
    EXPECT_TRUE(s.on_event(8, frame(8)));
    EXPECT_EQ(drain(s), frame(6) + frame(8));
    EXPECT_EQ(s.last_position(), 8);
}

TEST(Stream, CatchUpThenLiveWhenBatchIsShort) {
    Stream s("toto", 5, buffer(1 << 20));
    EXPECT_TRUE(s.wants_query(true));
    EXPECT_FALSE(s.wants_query(false)); // backpressure: only when the socket is drained
    s.begin_query(1);
    EXPECT_FALSE(s.wants_query(true));
    s.on_framed_row(6, frame(6));
    s.on_framed_row(7, frame(7));
    s.end_query(false, 1);
    EXPECT_EQ(s.mode(), Stream::Mode::Live);
    EXPECT_EQ(drain(s), frame(6) + frame(7));
}

TEST(Stream, FullBatchAsksAgainAfterDrain) {
    Stream s("toto", 0, buffer(1 << 20));
    s.begin_query(1);
    s.on_framed_row(1, frame(1));
    s.on_framed_row(2, frame(2));
    s.end_query(true, 1);
    EXPECT_EQ(s.mode(), Stream::Mode::CatchingUp);
    EXPECT_FALSE(s.wants_query(true)); // bytes still pending
    drain(s);
    EXPECT_TRUE(s.wants_query(true));
}

TEST(Stream, NotificationDuringQueryForcesAnotherQuery) {
    Stream s("toto", 5, buffer(1 << 20));
    s.begin_query(1);
    EXPECT_FALSE(s.on_event(7, frame(7))); // committed after the snapshot, maybe
    s.on_framed_row(6, frame(6));
    s.end_query(false, 1);
    EXPECT_EQ(s.mode(), Stream::Mode::CatchingUp);
    drain(s);
    EXPECT_TRUE(s.wants_query(true));
    s.begin_query(1);
    s.on_framed_row(7, frame(7));
    s.end_query(false, 1);
    EXPECT_EQ(s.mode(), Stream::Mode::Live);
    EXPECT_EQ(drain(s), frame(7));
}

TEST(Stream, NotificationAlreadyInTheBatchDoesNotForceAnotherQuery) {
    Stream s("toto", 5, buffer(1 << 20));
    s.begin_query(1);
    s.on_event(6, frame(6));
    s.on_framed_row(6, frame(6));
    s.end_query(false, 1);
    EXPECT_EQ(s.mode(), Stream::Mode::Live);
}

TEST(Stream, RowsAtOrBelowLastAreSkipped) {
    Stream s("toto", 5, buffer(1 << 20));
    s.begin_query(1);
    s.on_framed_row(4, frame(4));
    s.on_framed_row(5, frame(5));
    s.on_framed_row(6, frame(6));
    s.end_query(false, 1);
    EXPECT_EQ(drain(s), frame(6));
}

TEST(Stream, ListenerReconnectDuringQueryRereads) {
    Stream s("toto", 5, buffer(1 << 20));
    s.begin_query(1);
    s.end_query(false, 2); // a new LISTEN session since the query was sent
    EXPECT_EQ(s.mode(), Stream::Mode::CatchingUp);
    EXPECT_TRUE(s.wants_query(true));
}

TEST(Stream, NoListenerParksUntilItIsBack) {
    Stream s("toto", 5, buffer(1 << 20));
    s.begin_query(0);
    s.on_framed_row(6, frame(6));
    s.end_query(false, 0);
    drain(s);
    EXPECT_EQ(s.mode(), Stream::Mode::CatchingUp);
    EXPECT_FALSE(s.wants_query(true));
    s.on_listener_ready(10);
    EXPECT_EQ(s.last_position(), 6); // a positioned stream keeps its place
    EXPECT_TRUE(s.wants_query(true));
}

TEST(Stream, ListenerLossTurnsLiveStreamsBackToCatchingUp) {
    Stream s("toto", 5, buffer(1 << 20));
    s.go_live();
    s.on_listener_lost();
    EXPECT_EQ(s.mode(), Stream::Mode::CatchingUp);
    EXPECT_FALSE(s.on_event(6, frame(6)));
    EXPECT_TRUE(s.wants_query(true)); // still reads the table meanwhile
}

TEST(Stream, UnpositionedStreamTakesTheListenersHead) {
    Stream s("toto", -1, buffer(1 << 20));
    EXPECT_FALSE(s.wants_query(true));
    s.on_listener_ready(42);
    EXPECT_EQ(s.last_position(), 42);
    EXPECT_TRUE(s.wants_query(true));
}

TEST(Stream, SlowClientOverflowFallsBackToTheTable) {
    std::string f = frame(1);
    Stream s("toto", 0, buffer(f.size() * 3));
    s.go_live();
    EXPECT_TRUE(s.on_event(1, frame(1)));
    std::string handed = drain(s); // 1 handed to the socket
    EXPECT_TRUE(s.on_event(2, frame(2)));
    EXPECT_TRUE(s.on_event(3, frame(3)));
    EXPECT_TRUE(s.on_event(4, frame(4)));
    EXPECT_FALSE(s.on_event(5, frame(5))); // over the limit: queue dropped
    EXPECT_EQ(s.mode(), Stream::Mode::CatchingUp);
    EXPECT_FALSE(s.has_pending());
    EXPECT_EQ(s.last_position(), 1); // resumes after what the socket has
    EXPECT_EQ(s.overflows(), 1u);
    EXPECT_TRUE(s.wants_query(true));
    s.begin_query(1);
    for (int i = 2; i <= 5; ++i) {
        s.on_framed_row(i, frame(i));
    }
    s.end_query(false, 1);
    EXPECT_EQ(drain(s), frame(2) + frame(3) + frame(4) + frame(5));
    EXPECT_EQ(s.mode(), Stream::Mode::Live);
}

TEST(Stream, HintMakesLiveStreamReadTheTable) {
    Stream s("toto", 5, buffer(1 << 20));
    s.go_live();
    s.on_hint(5);
    EXPECT_EQ(s.mode(), Stream::Mode::Live);
    s.on_hint(6);
    EXPECT_EQ(s.mode(), Stream::Mode::CatchingUp);
}

TEST(Stream, FailedQueryCanBeRetried) {
    Stream s("toto", 5, buffer(1 << 20));
    s.begin_query(1);
    s.query_lost();
    EXPECT_TRUE(s.wants_query(true));
}

TEST(Stream, ResumePointBeyondTheNewestComesBackToIt) {
    Stream s("toto", 1000, buffer(1 << 20));
    s.begin_query(1);
    s.on_newest(8);
    s.end_query(false, 1);
    EXPECT_EQ(s.mode(), Stream::Mode::Live);
    EXPECT_EQ(s.last_position(), 8);
    EXPECT_TRUE(s.on_event(9, frame(9)));
}

TEST(Stream, ResumePointAtOrBelowTheNewestIsKept) {
    Stream s("toto", 5, buffer(1 << 20));
    s.on_newest(8);
    EXPECT_EQ(s.last_position(), 5);
}

TEST(Stream, HistoryGoneOnlyOnceAndOnlyForAResumeBelowTheHorizon) {
    Stream below("toto", 5, buffer(1 << 20));
    EXPECT_TRUE(below.history_gone(6));
    EXPECT_FALSE(below.history_gone(6)); // told once
    EXPECT_FALSE(below.history_gone(9)); // later batches never: a live stream missed nothing

    Stream at("toto", 6, buffer(1 << 20));
    EXPECT_FALSE(at.history_gone(6)); // everything above 6 is kept
    EXPECT_FALSE(at.history_gone(9)); // only the first result counts

    Stream none("toto", 5, buffer(1 << 20));
    EXPECT_FALSE(none.history_gone(0)); // no retention

    Stream fresh("toto", -1, buffer(1 << 20)); // no Last-Event-ID: starts at the newest
    fresh.start_at(3);
    EXPECT_FALSE(fresh.history_gone(6));
}
