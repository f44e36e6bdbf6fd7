// The wiring of one nginx worker: its hub, its listener and replay links, its status slot and
// the hook that hears of a graceful shutdown. Built in init_process, destroyed in exit_process;
// nothing of it exists in the master. Built in two steps: the constructor builds the parts that
// stand alone (timers, links, log, clock), wire() the parts that take others, in the order it
// states; nothing depends on the order in which members are declared.
#pragma once

extern "C" {
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
}

#include "core/hub.hpp"
#include "core/listener.hpp"
#include "core/positioner.hpp"
#include "ngx_conf.hpp"
#include "ngx_pg_link.hpp"
#include "ngx_pg_replication.hpp"
#include "ngx_relay.hpp"
#include "ngx_status_zone.hpp"
#include "ngx_timer.hpp"

#include <memory>
#include <optional>
#include <vector>

namespace event_piper {

class Worker final : private RoleHooks {
public:
    Worker(ngx_cycle_t *cycle, const MainConf &conf);
    ~Worker(); // also of a worker that wire() left half-built (it threw)
    Worker(const Worker &) = delete;
    Worker &operator=(const Worker &) = delete;

    // Builds the hub, the relay, the listener and the positioner and connects the links to them.
    void wire(const MainConf &conf);
    void start();
    // Graceful stop (nginx quit/reload): end every stream with a retry hint, close connections.
    void shutdown();
    bool shutting_down() const { return shutting_down_; }
    Hub &hub() { return *hub_; }
    bool listening() const { return hub_->listening(); }
    bool shared_listener() const { return relay_ != nullptr; }
    const Listener &listener() const { return *listener_; }

    // event_piper_listener shared: what shared memory says of the instance's listener, and
    // the time after which a silent holder counts as frozen.
    uint64_t role_stale_ms() const { return role_stale_ms_; }

private:
    // RoleHooks: the shared listener's role starts and stops this worker's listener, and in
    // wal mode its positioner (one role, one heartbeat, one takeover for both).
    void on_role_gained() override { take_listener_role(); }
    void on_role_lost() override {
        listener_->stop();
        positioner_->stop();
    }
    static void quit_handler(ngx_event_t *ev) noexcept;
    void publish();
    void take_listener_role();
    ListenerEvents &listener_events();

    // Built by the constructor: each from the configuration alone. A timer calls a part built in
    // wire() when it fires, which is never before start().
    ngx_log_t *log_;
    uint64_t role_stale_ms_;
    bool source_wal_; // event_piper_source wal: the positioner runs where the listener runs
    NgxLog logger_;
    NgxClock clock_;
    EpochSource epochs_;
    NgxTimer replay_retry_;
    NgxTimer listener_retry_;
    NgxTimer listener_check_;
    NgxTimer positioner_retry_;
    NgxTimer positioner_status_;
    NgxTimer publish_timer_;
    PgLink listener_link_;
    PgLink check_link_; // the listener's table check: never on the LISTEN connection
    PgLink positioner_link_;
    PgReplicationLink replication_link_;

    // Built by wire(), in this order, and destroyed by ~Worker in the reverse order, before the
    // links and timers they use.
    std::optional<Hub> hub_;
    std::vector<std::unique_ptr<PgLink>> replay_links_; // told of by hub_'s replay queue
    StatusSlot *slot_ = nullptr;
    std::unique_ptr<NgxRelay> relay_; // event_piper_listener shared (nullptr: per_worker)
    std::optional<Listener> listener_;
    std::optional<Positioner> positioner_;

    ngx_connection_t *quit_sentinel_ = nullptr;
    bool shutting_down_ = false;
};

// The worker of this process, or nullptr (master, helpers, or module unused).
Worker *current_worker();
void create_worker(ngx_cycle_t *cycle, const MainConf &conf);
void destroy_worker();

} // namespace event_piper
