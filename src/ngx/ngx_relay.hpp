// The shared listener's effects (event_piper_listener shared): the listener role in the status
// zone, one AF_UNIX datagram socket per worker in the abstract namespace, its events in nginx's
// loop, and a 500 ms check that beats this worker's heartbeat, claims the role when its holder is
// gone or frozen, and steps down when another worker took it. The rules live in core/relay.hpp
// (RelaySender, RelayReceiver) and core/role.hpp (Role).
#pragma once

extern "C" {
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
}

#include "core/relay.hpp"
#include "core/role.hpp"
#include "ngx_status_zone.hpp"
#include "ngx_timer.hpp"

#include <functional>
#include <memory>
#include <sys/socket.h>
#include <sys/un.h>
#include <vector>

namespace event_piper {

class NgxRelay final : public RelayPeers, public InterestBits {
public:
    // `listener` starts and stops this worker's listener with the role (its events go to
    // sender()); `stale_ms`: a holder silent that long is frozen and replaced.
    static std::unique_ptr<NgxRelay> create(ngx_log_t *log, ngx_shm_zone_t *zone, StatusSlot *slot,
                                            size_t send_buffer, Hub &hub, EpochSource &epochs,
                                            Log &logger, RoleHooks &listener, uint64_t stale_ms);
    ~NgxRelay();
    NgxRelay(const NgxRelay &) = delete;
    NgxRelay &operator=(const NgxRelay &) = delete;

    // Registers the socket and runs the first check (claims the role if nobody holds it).
    void start();
    // Graceful exit: hands the role back at once, closes the socket.
    void release();
    bool holder() const { return holder_; }
    // More work that runs in the worker holding the role: told after the listener when the role
    // is gained, before it when it is lost. Not owned; must outlive the relay.
    void add_role_hooks(RoleHooks &hooks) { hooks_.push_back(&hooks); }
    RelaySender &sender() { return sender_; }
    void fill_stats(WorkerStats &stats) const;

    // RelayPeers (this worker as the holder)
    size_t size() const override { return status_slots; }
    bool wants(size_t peer, size_t bit) const override;
    uint64_t next_seq(size_t peer) override;
    Sent send(size_t peer, std::string_view datagram) override;
    void overrun(size_t peer) override;
    uint64_t new_epoch() override;
    void publish(bool live, uint64_t epoch, int64_t newest, int64_t start_for_waiting) override;
    void publish_newest(int64_t newest) override;
    uint64_t waiting_since_ms(uint64_t mine) const override;

    // InterestBits
    void set(size_t bit, bool on) override;
    int64_t newest_published() const override;
    void publish_waiting_since(uint64_t ms) override;

private:
    NgxRelay(ngx_log_t *log, StatusZone *zone, StatusSlot *slot, Hub &hub, EpochSource &epochs,
             Log &logger, RoleHooks &listener, uint64_t stale_ms);
    static void read_handler(ngx_event_t *ev) noexcept;
    void drain();
    void tick();
    void check_role();
    void gain(const RoleSight &seen);
    void step_down(uint64_t by);
    // Holds the role by shared memory, not only by its own belief (it may have been frozen).
    bool mine() const { return holder_ && zone_->board.holder.load() == word_; }
    void follow(uint64_t holder);
    RelayView view(bool check_holder) const;
    size_t index() const { return static_cast<size_t>(slot_ - zone_->slots); }

    ngx_log_t *log_;
    StatusZone *zone_;
    StatusSlot *slot_;
    Hub &hub_;
    RelaySender sender_;
    RelayReceiver receiver_;
    InterestMap interest_;
    Role role_;
    std::vector<RoleHooks *> hooks_; // the listener first
    uint64_t word_;                  // this worker's holder word
    uint64_t takeovers_ = 0;         // roles taken from a holder that had not handed it back
    NgxTimer tick_timer_;
    int fd_ = -1;
    ngx_connection_t *c_ = nullptr;
    std::vector<sockaddr_un> addrs_; // every slot's socket name
    socklen_t addr_len_ = 0;
    uint64_t following_ = 0; // the holder this socket is connected to
    std::vector<char> buf_;
    bool holder_ = false;
};

// Monotonic milliseconds, the same clock in every worker (heartbeats are compared across them).
uint64_t monotonic_ms();

// What shared memory says about the instance's listener, for event_piper_health in shared mode.
struct InstanceListener {
    enum class State { Listening, NotConnected, NoHolder, HolderFrozen } state;
    const StatusSlot *holder_slot; // its published figures (nullptr: no live holder)
};
InstanceListener instance_listener(ngx_shm_zone_t *zone, uint64_t stale_ms);

} // namespace event_piper
