// Consumer registry and fan-out, including streams removed while the fan-out runs.
#include "registry.hpp"

#include <gtest/gtest.h>

#include <vector>

using namespace event_piper;

namespace {
struct Fake {
    std::string consumer;
    int received = 0;
    std::vector<std::string> more = {};
    std::vector<std::string> consumers() const {
        std::vector<std::string> ids{consumer};
        ids.insert(ids.end(), more.begin(), more.end());
        return ids;
    }
};
} // namespace

TEST(Registry, FanOutReachesEveryStreamOfTheConsumerOnly) {
    Registry<Fake> reg;
    Fake a1{"a"}, a2{"a"}, b{"b"};
    reg.add("a", &a1);
    reg.add("a", &a2);
    reg.add("b", &b);
    EXPECT_TRUE(reg.for_each("a", [](Fake &f) { ++f.received; }));
    EXPECT_EQ(a1.received, 1);
    EXPECT_EQ(a2.received, 1);
    EXPECT_EQ(b.received, 0);
    EXPECT_FALSE(reg.for_each("nobody", [](Fake &f) { ++f.received; }));
    EXPECT_EQ(reg.consumers(), 2u);
    EXPECT_EQ(reg.streams(), 3u);
}

TEST(Registry, RemovalDuringFanOutIsSafe) {
    Registry<Fake> reg;
    std::vector<Fake> fakes(5, Fake{"a"});
    for (auto &f : fakes) {
        reg.add("a", &f);
    }
    // The first stream's callback removes itself and the third one.
    reg.for_each("a", [&](Fake &f) {
        ++f.received;
        if (&f == &fakes[0]) {
            reg.remove("a", &fakes[0]);
            reg.remove("a", &fakes[2]);
        }
    });
    EXPECT_EQ(fakes[0].received, 1);
    EXPECT_EQ(fakes[1].received, 1);
    EXPECT_EQ(fakes[2].received, 0);
    EXPECT_EQ(fakes[3].received, 1);
    EXPECT_EQ(reg.streams(), 3u);
    reg.for_each("a", [](Fake &f) { ++f.received; });
    EXPECT_EQ(fakes[1].received, 2);
    EXPECT_EQ(fakes[2].received, 0);
}

TEST(Registry, RemovingEveryStreamDuringFanOutDropsTheConsumer) {
    Registry<Fake> reg;
    Fake a1{"a"}, a2{"a"};
    reg.add("a", &a1);
    reg.add("a", &a2);
    reg.for_each("a", [&](Fake &f) { reg.remove("a", &f); });
    EXPECT_EQ(reg.consumers(), 0u);
    EXPECT_EQ(reg.streams(), 0u);
    reg.add("a", &a1);
    EXPECT_EQ(reg.streams(), 1u);
}

TEST(Registry, StreamsAddedDuringFanOutWaitForTheNextEvent) {
    Registry<Fake> reg;
    Fake a1{"a"}, late{"a"};
    reg.add("a", &a1);
    reg.for_each("a", [&](Fake &f) {
        ++f.received;
        reg.add("a", &late);
    });
    EXPECT_EQ(late.received, 0);
    EXPECT_EQ(reg.streams(), 2u);
}

TEST(Registry, ForEachAllWithRemovals) {
    Registry<Fake> reg;
    Fake a{"a"}, b{"b"}, c{"c"};
    reg.add("a", &a);
    reg.add("b", &b);
    reg.add("c", &c);
    int seen = 0;
    reg.for_each_all([&](Fake &f) {
        ++seen;
        reg.remove(f.consumer, &f);
    });
    EXPECT_EQ(seen, 3);
    EXPECT_EQ(reg.consumers(), 0u);
    EXPECT_EQ(reg.streams(), 0u);
}

TEST(Registry, RemoveUnknownIsHarmless) {
    Registry<Fake> reg;
    Fake a{"a"};
    reg.remove("a", &a);
    reg.add("a", &a);
    Fake other{"a"};
    reg.remove("a", &other);
    EXPECT_EQ(reg.streams(), 1u);
}

TEST(Registry, AStreamWithSeveralIdsIsReachedByEachAndCountedOnce) {
    Registry<Fake> reg;
    Fake multi{"alice", 0, {"team", "everyone"}}, bob{"bob", 0, {"everyone"}};
    for (Fake *f : {&multi, &bob}) {
        for (const std::string &id : f->consumers()) {
            reg.add(id, f);
        }
    }
    EXPECT_EQ(reg.streams(), 2u);
    EXPECT_EQ(reg.consumers(), 4u); // alice, team, everyone, bob: once per id
    reg.for_each("everyone", [](Fake &f) { ++f.received; });
    EXPECT_EQ(multi.received, 1);
    EXPECT_EQ(bob.received, 1);
    reg.for_each("team", [](Fake &f) { ++f.received; });
    EXPECT_EQ(multi.received, 2);
    int visits = 0;
    reg.for_each_all([&](Fake &) { ++visits; });
    EXPECT_EQ(visits, 2);
    for (const std::string &id : multi.consumers()) {
        reg.remove(id, &multi);
    }
    EXPECT_EQ(reg.streams(), 1u);
    EXPECT_EQ(reg.consumers(), 2u);
}
