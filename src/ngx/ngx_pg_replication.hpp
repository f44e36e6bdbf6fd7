// A libpq replication connection (replication=database) in nginx's event loop: replication
// commands, then the CopyBoth stream of START_REPLICATION read with PQgetCopyData(conn, &buf, 1)
// (never blocks) and written with PQputCopyData + PQflush. Like PgLink, libpq owns the socket
// and events are level-triggered; while the owner does not read, the read event is removed (a
// level-triggered socket left unread would wake the worker without end).
#pragma once

extern "C" {
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
}

#include "core/positioner.hpp"

#include <libpq-fe.h>

#include <string>
#include <sys/types.h>

namespace event_piper {

class PgReplicationLink final : public ReplicationLink {
public:
    // `wal_sender_timeout_ms`: the server ends the stream of a positioner silent for this long
    // (a frozen worker), which frees the slot for another one.
    // The owner (built after the link: it takes the link too) is attached before connect().
    PgReplicationLink(ngx_log_t *log, std::string conninfo, uint64_t wal_sender_timeout_ms);
    void attach(ReplicationOwner &owner) { owner_ = &owner; }
    ~PgReplicationLink() { close(); }
    PgReplicationLink(const PgReplicationLink &) = delete;
    PgReplicationLink &operator=(const PgReplicationLink &) = delete;

    State state() const override { return state_; }
    void connect() override;
    bool command(const std::string &command) override;
    bool send_copy(std::string_view bytes) override;
    void set_reading(bool reading) override;
    void close() override;

private:
    static void read_handler(ngx_event_t *ev) noexcept;
    static void write_handler(ngx_event_t *ev) noexcept;
    static void connect_timeout_handler(ngx_event_t *ev) noexcept;
    static void notice_processor(void *arg, const char *message) noexcept;
    void on_readable();
    void on_writable();
    void poll_connect();
    void read_stream();
    void sync_socket();
    void detach_socket();
    void want_write(bool on);
    void want_read(bool on);
    bool flush();
    void fail(const char *why);

    ReplicationOwner *owner_ = nullptr;
    ngx_log_t *log_;
    std::string conninfo_;
    std::string options_;
    PGconn *conn_ = nullptr;
    ngx_connection_t *c_ = nullptr;
    ngx_event_t connect_timer_;
    ino_t inode_ = 0;
    State state_ = State::Down;
    bool writing_ = false;
    bool reading_ = true;
    bool read_registered_ = false;
};

} // namespace event_piper
