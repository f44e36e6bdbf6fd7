// One non-blocking libpq connection driven by nginx's event loop (nginx adapter).
// libpq owns the socket: we register it with ngx_get_connection() and free the nginx connection
// without ever closing the fd. Events are level-triggered: PQconsumeInput() may leave bytes in
// the socket, which edge-triggered epoll would never report again.
#pragma once

extern "C" {
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
}

#include "core/ports.hpp"

#include <libpq-fe.h>

#include <string>
#include <sys/types.h>

namespace event_piper {

class PgLink final : public DbLink {
public:
    // An owner built after its link (it takes the link too) is attached before connect().
    PgLink(ngx_log_t *log, std::string conninfo, const char *application)
        : log_(log), conninfo_(std::move(conninfo)), application_(application) {
        ngx_memzero(&connect_timer_, sizeof(connect_timer_));
        connect_timer_.handler = connect_timeout_handler;
        connect_timer_.data = this;
        connect_timer_.log = log;
        connect_timer_.cancelable = 1;
    }
    PgLink(DbLinkOwner &owner, ngx_log_t *log, std::string conninfo, const char *application)
        : PgLink(log, std::move(conninfo), application) {
        attach(owner);
    }
    void attach(DbLinkOwner &owner) { owner_ = &owner; }
    ~PgLink() { close(); }
    PgLink(const PgLink &) = delete;
    PgLink &operator=(const PgLink &) = delete;

    State state() const override { return state_; }
    void connect() override;
    bool send(const char *sql, int n_params, const char *const *params) override;
    void close() override;

private:
    static void read_handler(ngx_event_t *ev) noexcept;
    static void connect_timeout_handler(ngx_event_t *ev) noexcept;
    static void write_handler(ngx_event_t *ev) noexcept;
    static void notice_processor(void *arg, const char *message) noexcept;
    void on_readable();
    void on_writable();
    void poll_connect();
    void sync_socket();
    void detach_socket();
    void want_write(bool on);
    bool flush();
    void fail(const char *why);

    DbLinkOwner *owner_ = nullptr; // told of everything the link does
    ngx_log_t *log_;
    std::string conninfo_;
    const char *application_;
    PGconn *conn_ = nullptr;
    ngx_connection_t *c_ = nullptr;
    ngx_event_t connect_timer_;
    ino_t inode_ = 0;
    State state_ = State::Down;
    bool writing_ = false;
};

} // namespace event_piper
