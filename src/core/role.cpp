// The role's decisions (see role.hpp).
#include "role.hpp"

namespace event_piper {

bool Role::holder_live(const RoleSight &seen, uint64_t now_ms) const {
    return seen.holder != 0 && !seen.holder_gone && silence_ms(seen, now_ms) <= stale_ms_;
}

Role::Step Role::decide(uint64_t mine, bool holding, const RoleSight &seen, uint64_t now_ms) const {
    if (holding) {
        // Someone took the role while this worker was not running: it must not act as holder.
        return seen.holder == mine ? Step::Keep : Step::StepDown;
    }
    if (seen.holder == mine) {
        return Step::Claim; // ours by the word (a step-down not yet seen through): take it back
    }
    return holder_live(seen, now_ms) ? Step::Keep : Step::Claim;
}

} // namespace event_piper
