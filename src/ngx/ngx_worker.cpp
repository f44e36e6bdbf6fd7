// The wiring of one nginx worker (see ngx_worker.hpp).
#include "ngx_worker.hpp"

#include <string>
#include <sys/eventfd.h>
#include <unistd.h>

namespace event_piper {

namespace {

Worker *the_worker = nullptr;

std::string text(const ngx_str_t &s) {
    return std::string(reinterpret_cast<const char *>(s.data), s.len);
}

Listener::Settings listener_settings(const MainConf &conf) {
    Listener::Settings settings;
    settings.channel = text(conf.channel);
    ListenerCheck check = listener_check(conf.listener_timeout);
    settings.check_ms = check.period_ms;
    settings.timeout_ms = check.answer_ms;
    settings.positioned_after_commit = conf.source_wal == 1;
    return settings;
}

// The server ends the replication stream of a positioner silent this long (a frozen worker) and
// frees the slot; the positioner sends a status update every third of it.
constexpr uint64_t wal_sender_timeout_ms = 10000;

Positioner::Settings positioner_settings(const MainConf &conf) {
    Positioner::Settings settings;
    settings.channel = text(conf.channel);
    char host[256] = "";
    gethostname(host, sizeof host - 1);
    settings.holder = std::string(host) + " " + std::to_string(ngx_pid);
    settings.status_ms = wal_sender_timeout_ms / 3;
    return settings;
}

} // namespace

Worker *current_worker() {
    return the_worker;
}

void create_worker(ngx_cycle_t *cycle, const MainConf &conf) {
    auto worker = std::make_unique<Worker>(cycle, conf);
    worker->wire(conf);
    the_worker = worker.release();
    the_worker->start();
}

void destroy_worker() {
    delete the_worker;
    the_worker = nullptr;
}

Worker::Worker(ngx_cycle_t *cycle, const MainConf &conf)
    : log_(cycle->log), role_stale_ms_(event_piper::role_stale_ms(conf.listener_timeout)),
      source_wal_(conf.source_wal != 0), logger_(cycle->log),
      replay_retry_(cycle->log, "replay dispatch", [this] { hub_->replay().on_retry_timer(); }),
      listener_retry_(cycle->log, "listener restart", [this] { listener_->on_retry_timer(); }),
      listener_check_(cycle->log, "listener check", [this] { listener_->on_check_timer(); }),
      positioner_retry_(cycle->log, "positioner restart",
                        [this] { positioner_->on_retry_timer(); }),
      positioner_status_(cycle->log, "positioner status",
                         [this] { positioner_->on_status_timer(); }),
      publish_timer_(cycle->log, "status publish", [this] { publish(); }),
      listener_link_(cycle->log, text(conf.conninfo), "event_piper_listener"),
      check_link_(cycle->log, text(conf.conninfo), "event_piper_check"),
      positioner_link_(cycle->log, text(conf.conninfo), "event_piper_positioner"),
      replication_link_(cycle->log, text(conf.conninfo), wal_sender_timeout_ms) {}

void Worker::wire(const MainConf &conf) {
    hub_.emplace(replay_retry_, clock_, logger_, conf.replay_memory);
    hub_->stats().pid = ngx_pid;
    for (ngx_uint_t i = 0; i < conf.replay_connections; ++i) {
        replay_links_.push_back(std::make_unique<PgLink>(hub_->replay(), log_, text(conf.conninfo),
                                                         "event_piper_replay"));
        hub_->replay().add_link(*replay_links_.back());
    }
    // As many standby links, which read history while a standby answers.
    for (ngx_uint_t i = 0; conf.replay_conninfo.len != 0 && i < conf.replay_connections; ++i) {
        replay_links_.push_back(std::make_unique<PgLink>(
            hub_->replay(), log_, text(conf.replay_conninfo), "event_piper_replay"));
        hub_->replay().add_standby_link(*replay_links_.back());
    }
    slot_ = claim_status_slot(conf.status_zone, log_);
    if (conf.listener_shared) {
        relay_ = NgxRelay::create(log_, conf.status_zone, slot_, conf.relay_buffer, *hub_, epochs_,
                                  logger_, *this, role_stale_ms_);
        if (relay_ == nullptr) {
            ngx_log_error(NGX_LOG_WARN, log_, 0,
                          "event_piper: no relay for the shared listener, this worker listens "
                          "itself");
        }
    }
    listener_.emplace(listener_link_, check_link_, listener_retry_, listener_check_,
                      listener_events(), logger_, listener_settings(conf));
    listener_link_.attach(*listener_);
    check_link_.attach(*listener_);
    positioner_.emplace(positioner_link_, replication_link_, positioner_retry_, positioner_status_,
                        clock_, logger_, positioner_settings(conf));
    positioner_link_.attach(*positioner_);
    replication_link_.attach(*positioner_);
}

// Shared listener: the holder's notifications go through the relay to the other workers.
ListenerEvents &Worker::listener_events() {
    if (relay_ != nullptr) {
        return relay_->sender();
    }
    return *hub_;
}

Worker::~Worker() {
    publish_timer_.cancel();
    if (relay_ != nullptr) {
        relay_->release(); // first: another worker takes the role at once
    }
    release_status_slot(slot_);
    if (positioner_) {
        positioner_->stop();
    }
    if (listener_) {
        listener_->close();
    }
    if (hub_) {
        hub_->replay().close_all();
    }
    if (quit_sentinel_ != nullptr) {
        ngx_close_connection(quit_sentinel_);
        quit_sentinel_ = nullptr;
    }
    // What wire() built, newest first, while the links and timers it uses still exist.
    positioner_.reset();
    listener_.reset();
    relay_.reset();
    hub_.reset();
    replay_links_.clear();
}

void Worker::start() {
    // nginx calls the read handler of every "idle" connection when it starts a graceful
    // shutdown (quit, reload). This never-polled eventfd is how the worker hears of it, early
    // enough to end its streams before nginx checks for open connections.
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd >= 0) {
        quit_sentinel_ = ngx_get_connection(fd, log_);
        if (quit_sentinel_ == nullptr) {
            ::close(fd);
        } else {
            quit_sentinel_->data = this;
            quit_sentinel_->idle = 1;
            quit_sentinel_->read->handler = quit_handler;
            quit_sentinel_->read->log = log_;
            quit_sentinel_->write->log = log_;
        }
    }
    if (relay_ != nullptr) {
        relay_->start(); // starts the listener if this worker takes the role
    } else {
        take_listener_role();
    }
    publish();
}

void Worker::take_listener_role() {
    listener_->start();
    if (source_wal_) {
        positioner_->start();
    }
}

// Counts that are cheaper to take once a second than to keep exact on every transition.
void Worker::publish() {
    WorkerStats &stats = hub_->stats();
    stats.streams = hub_->streams();
    stats.consumers = hub_->consumers();
    stats.streams_catching_up = hub_->streams_catching_up();
    stats.listener_state = listening() ? 1 : 0;
    stats.listener_reconnects = listener_->reconnects();
    stats.channel_mismatch = listener_->channel_mismatch() ? 1 : 0;
    stats.position_hints = listener_->unnotified_hints();
    stats.unpositioned_rows = static_cast<uint64_t>(listener_->unpositioned_rows());
    stats.writers_waiting = static_cast<uint64_t>(listener_->writers_waiting());
    stats.schema_version = static_cast<uint64_t>(listener_->schema_version());
    stats.replay_failures = hub_->replay().failures();
    stats.replay_queries = hub_->replay().queries();
    stats.replay_queued = hub_->replay().queued();
    stats.replay_primary_queries = hub_->replay().primary_served().queries;
    stats.replay_primary_rows = hub_->replay().primary_served().rows;
    stats.replay_standby_queries = hub_->replay().standby_served().queries;
    stats.replay_standby_rows = hub_->replay().standby_served().rows;
    stats.replay_standby_up = hub_->replay().standby_up() ? 1 : 0;
    stats.replay_standby_lag_ms = hub_->replay().standby_lag_ms();
    if (relay_ != nullptr) {
        relay_->fill_stats(stats);
    }
    stats.source_wal = source_wal_ ? 1 : 0;
    stats.positioner_holder = positioner_->phase() == Positioner::Phase::Streaming ? 1 : 0;
    stats.positioner_lag_bytes =
        stats.positioner_holder == 1 && positioner_->server_wal_end() > positioner_->confirmed_lsn()
            ? positioner_->server_wal_end() - positioner_->confirmed_lsn()
            : 0;
    uint64_t oldest = positioner_->oldest_pending_ms(), now = clock_.now_ms();
    stats.positioner_lag_ms = oldest != 0 && now > oldest ? now - oldest : 0;
    stats.positioned_transactions = positioner_->transactions();
    stats.positioned_rows = positioner_->rows();
    if (slot_ != nullptr) {
        slot_->stats.store(stats);
    }
    if (!shutting_down_) {
        publish_timer_.arm(1000);
    }
}

void Worker::quit_handler(ngx_event_t *ev) noexcept {
    auto *c = static_cast<ngx_connection_t *>(ev->data);
    if (!c->close) {
        return;
    }
    auto *self = static_cast<Worker *>(c->data);
    try {
        self->shutdown();
    } catch (const std::exception &e) {
        ngx_log_error(NGX_LOG_ERR, ev->log, 0, "event_piper: shutdown failed: %s", e.what());
    } catch (...) {
        ngx_log_error(NGX_LOG_ERR, ev->log, 0, "event_piper: shutdown failed");
    }
}

void Worker::shutdown() {
    if (shutting_down_) {
        return;
    }
    shutting_down_ = true;
    ngx_log_error(NGX_LOG_NOTICE, log_, 0, "event_piper: shutting down, ending %uz streams",
                  hub_->streams());
    if (relay_ != nullptr) {
        relay_->release(); // another worker takes the listener within one check (500 ms)
    }
    hub_->end_all();
    publish_timer_.cancel();
    publish();
    positioner_->stop();
    listener_->close();
    hub_->replay().close_all();
    if (quit_sentinel_ != nullptr) {
        ngx_close_connection(quit_sentinel_);
        quit_sentinel_ = nullptr;
    }
}

} // namespace event_piper
