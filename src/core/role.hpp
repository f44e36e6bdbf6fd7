// A role that one worker of the instance holds at a time (the shared listener), kept in shared
// memory: a word names the holder, and every worker writes a heartbeat in its own slot. A process
// id alone proves nothing (a frozen worker exists; a pid is reused), so the holder is live while
// its process exists, still owns its slot and its heartbeat is fresh. Another worker takes the
// role over when it is not; a holder that finds the word changed (it was frozen) steps down.
// Pure decisions here; the adapter does the compare-and-swap and calls the RoleHooks.
#pragma once

#include <cstdint>

namespace event_piper {

// What shared memory shows of the role, read now.
struct RoleSight {
    uint64_t holder = 0;         // the holder's word (0: nobody holds the role)
    bool holder_gone = false;    // its process is gone, or its slot belongs to another process
    uint64_t holder_beat_ms = 0; // its last heartbeat (a monotonic clock shared by the workers)
};

// Told when this worker gains or loses the role (a takeover included). Whatever runs in the
// worker that holds the role (the listener; later the WAL positioner) starts and stops here.
class RoleHooks {
public:
    virtual void on_role_gained() = 0;
    virtual void on_role_lost() = 0;

protected:
    ~RoleHooks() = default;
};

class Role {
public:
    enum class Step { Keep, Claim, StepDown };

    // A heartbeat older than `stale_ms` is a frozen holder.
    explicit Role(uint64_t stale_ms) : stale_ms_(stale_ms) {}

    // `mine`: this worker's word; `holding`: whether it believes it holds the role.
    Step decide(uint64_t mine, bool holding, const RoleSight &seen, uint64_t now_ms) const;
    bool holder_live(const RoleSight &seen, uint64_t now_ms) const;
    // How long the holder has been silent (0: its heartbeat is in the future of this clock).
    static uint64_t silence_ms(const RoleSight &seen, uint64_t now_ms) {
        return now_ms > seen.holder_beat_ms ? now_ms - seen.holder_beat_ms : 0;
    }
    uint64_t stale_ms() const { return stale_ms_; }

private:
    uint64_t stale_ms_;
};

// The stale time for an event_piper_listener_timeout: half of it, so that with a check every
// half second a frozen holder is replaced within the timeout (at least 3 s).
inline uint64_t role_stale_ms(uint64_t listener_timeout_ms) {
    return listener_timeout_ms / 2;
}

} // namespace event_piper
