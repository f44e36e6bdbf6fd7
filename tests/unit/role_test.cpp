// The shared role's decisions: who claims it, when a silent holder counts as frozen, and that a
// holder which finds the role taken steps down.
#include "role.hpp"

#include <gtest/gtest.h>

using namespace event_piper;

namespace {

RoleSight held_by(uint64_t word, uint64_t beat_ms, bool gone = false) {
    RoleSight s;
    s.holder = word;
    s.holder_beat_ms = beat_ms;
    s.holder_gone = gone;
    return s;
}

} // namespace

TEST(RoleTest, NobodyHoldingItIsClaimed) {
    Role role(5000);
    EXPECT_EQ(role.decide(7, false, RoleSight{}, 1000), Role::Step::Claim);
}

TEST(RoleTest, ALiveHolderKeepsItAndAGoneOneIsReplacedAtOnce) {
    Role role(5000);
    EXPECT_EQ(role.decide(7, false, held_by(9, 1000), 1400), Role::Step::Keep);
    EXPECT_EQ(role.decide(7, false, held_by(9, 1000, true), 1400), Role::Step::Claim);
}

TEST(RoleTest, AHolderSilentLongerThanTheStaleTimeIsFrozenAndReplaced) {
    Role role(5000);
    EXPECT_EQ(role.decide(7, false, held_by(9, 1000), 6000), Role::Step::Keep);
    EXPECT_EQ(role.decide(7, false, held_by(9, 1000), 6001), Role::Step::Claim);
    EXPECT_FALSE(role.holder_live(held_by(9, 1000), 6001));
    // A heartbeat a little ahead of this worker's clock reading is fresh, not an underflow.
    EXPECT_EQ(role.decide(7, false, held_by(9, 2000), 1999), Role::Step::Keep);
}

TEST(RoleTest, AHolderThatFindsTheRoleTakenStepsDownAndOneThatStillHoldsItKeepsIt) {
    Role role(5000);
    EXPECT_EQ(role.decide(7, true, held_by(9, 60000), 60000), Role::Step::StepDown);
    EXPECT_EQ(role.decide(7, true, held_by(7, 1000), 90000), Role::Step::Keep);
}

TEST(RoleTest, TheStaleTimeFitsTheListenerTimeout) {
    // Checked every 500 ms: a frozen holder is replaced within stale + 1 s, inside the timeout.
    for (uint64_t timeout : {3000u, 60000u}) {
        EXPECT_LE(role_stale_ms(timeout) + 1000, timeout);
    }
}
