// libpq's replication protocol in nginx's event loop (see ngx_pg_replication.hpp).
#include "ngx_pg_replication.hpp"

#include "core/defaults.hpp"
#include "core/text.hpp"

#include <memory>
#include <sys/stat.h>

namespace event_piper {

namespace {

ino_t inode_of(int fd) {
    struct stat st;
    return fstat(fd, &st) == 0 ? st.st_ino : 0;
}

class ReplicationResult final : public QueryResult {
public:
    explicit ReplicationResult(PGresult *res) : res_(res) {}
    bool ok() const override {
        ExecStatusType st = PQresultStatus(res_);
        return st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;
    }
    std::string error() const override { return PQresultErrorMessage(res_); }
    int rows() const override { return PQntuples(res_); }
    int columns() const override { return PQnfields(res_); }
    bool is_null(int row, int column) const override { return PQgetisnull(res_, row, column) != 0; }
    std::string_view value(int row, int column) const override {
        return std::string_view(PQgetvalue(res_, row, column),
                                static_cast<size_t>(PQgetlength(res_, row, column)));
    }

private:
    PGresult *res_;
};

} // namespace

PgReplicationLink::PgReplicationLink(ngx_log_t *log, std::string conninfo,
                                     uint64_t wal_sender_timeout_ms)
    : log_(log), conninfo_(std::move(conninfo)),
      options_("-c wal_sender_timeout=" + std::to_string(wal_sender_timeout_ms)) {
    ngx_memzero(&connect_timer_, sizeof(connect_timer_));
    connect_timer_.handler = connect_timeout_handler;
    connect_timer_.data = this;
    connect_timer_.log = log;
    connect_timer_.cancelable = 1;
}

void PgReplicationLink::connect() {
    close();
    // After the user's conninfo: a logical replication connection to its database, named for
    // pg_stat_activity, with the server-side timeout that frees the slot of a frozen worker.
    const char *keys[] = {"keepalives_idle", "keepalives_interval", "keepalives_count", "dbname",
                          "replication",     "application_name",    "options",          nullptr};
    const char *values[] = {default_keepalives_idle,
                            default_keepalives_interval,
                            default_keepalives_count,
                            conninfo_.c_str(),
                            "database",
                            "event_piper_positioner",
                            options_.c_str(),
                            nullptr};
    conn_ = PQconnectStartParams(keys, values, 1);
    if (conn_ == nullptr) {
        fail("out of memory");
        return;
    }
    if (PQstatus(conn_) == CONNECTION_BAD) {
        fail(PQerrorMessage(conn_));
        return;
    }
    PQsetNoticeProcessor(conn_, notice_processor, this);
    state_ = State::Connecting;
    reading_ = true;
    sync_socket();
    if (c_ == nullptr) {
        fail("no socket");
        return;
    }
    ngx_add_timer(&connect_timer_, connect_timeout_ms);
    want_write(true);
}

void PgReplicationLink::connect_timeout_handler(ngx_event_t *ev) noexcept {
    auto *self = static_cast<PgReplicationLink *>(ev->data);
    try {
        if (self->state_ == State::Connecting) {
            self->fail("timeout while connecting");
        }
    } catch (...) {
        ngx_log_error(NGX_LOG_ERR, ev->log, 0, "event_piper: replication connect timeout failed");
    }
}

void PgReplicationLink::notice_processor(void *arg, const char *message) noexcept {
    auto *self = static_cast<PgReplicationLink *>(arg);
    std::string_view line = without_line_end(message);
    ngx_log_error(NGX_LOG_NOTICE, self->log_, 0, "event_piper: positioner replication: %*s",
                  line.size(), line.data());
}

void PgReplicationLink::poll_connect() {
    PostgresPollingStatusType st = PQconnectPoll(conn_);
    if (st == PGRES_POLLING_FAILED) {
        fail(PQerrorMessage(conn_));
        return;
    }
    sync_socket();
    if (c_ == nullptr) {
        fail("connection has no socket");
        return;
    }
    switch (st) {
    case PGRES_POLLING_WRITING:
        want_write(true);
        return;
    case PGRES_POLLING_READING:
        want_write(false);
        return;
    case PGRES_POLLING_OK:
        if (connect_timer_.timer_set) {
            ngx_del_timer(&connect_timer_);
        }
        want_write(false);
        if (PQsetnonblocking(conn_, 1) != 0) {
            fail(PQerrorMessage(conn_));
            return;
        }
        state_ = State::Ready;
        owner_->on_replication_ready();
        return;
    default:
        return;
    }
}

void PgReplicationLink::sync_socket() {
    int fd = PQsocket(conn_);
    if (c_ != nullptr && fd == c_->fd && inode_of(fd) == inode_) {
        return;
    }
    detach_socket();
    if (fd < 0) {
        return;
    }
    ngx_connection_t *c = ngx_get_connection(fd, log_);
    if (c == nullptr) {
        return;
    }
    c->data = this;
    c->log = log_;
    c->read->log = log_;
    c->write->log = log_;
    c->read->handler = read_handler;
    c->write->handler = write_handler;
    c_ = c;
    inode_ = inode_of(fd);
    writing_ = false;
    read_registered_ = false;
    want_read(true);
    if (!read_registered_) {
        c_ = nullptr;
        ngx_free_connection(c);
    }
}

void PgReplicationLink::detach_socket() {
    if (c_ == nullptr) {
        return;
    }
    ngx_connection_t *c = c_;
    c_ = nullptr;
    if (c->read->posted) {
        ngx_delete_posted_event(c->read);
    }
    if (c->write->posted) {
        ngx_delete_posted_event(c->write);
    }
    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }
    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }
    if (ngx_del_conn) {
        ngx_del_conn(c, NGX_CLOSE_EVENT);
    } else {
        c->read->active = 0;
        c->write->active = 0;
    }
    c->fd = (ngx_socket_t)-1;
    ngx_free_connection(c);
    read_registered_ = false;
}

void PgReplicationLink::want_write(bool on) {
    if (c_ == nullptr || writing_ == on) {
        return;
    }
    if (on) {
        if (ngx_add_event(c_->write, NGX_WRITE_EVENT, NGX_LEVEL_EVENT) == NGX_OK) {
            writing_ = true;
        }
    } else if (ngx_del_event(c_->write, NGX_WRITE_EVENT, 0) == NGX_OK) {
        writing_ = false;
    }
}

void PgReplicationLink::want_read(bool on) {
    if (c_ == nullptr || read_registered_ == on) {
        return;
    }
    if (on) {
        if (ngx_add_event(c_->read, NGX_READ_EVENT, NGX_LEVEL_EVENT) == NGX_OK) {
            read_registered_ = true;
        }
    } else if (ngx_del_event(c_->read, NGX_READ_EVENT, 0) == NGX_OK) {
        read_registered_ = false;
    }
}

void PgReplicationLink::close() {
    if (connect_timer_.timer_set) {
        ngx_del_timer(&connect_timer_);
    }
    detach_socket();
    if (conn_ != nullptr) {
        PQfinish(conn_);
        conn_ = nullptr;
    }
    state_ = State::Down;
}

void PgReplicationLink::fail(const char *why) {
    std::string msg =
        one_line(std::string_view(why ? why : "unknown error").substr(0, failure_text_max));
    close();
    owner_->on_replication_lost(msg);
}

bool PgReplicationLink::flush() {
    int rc = PQflush(conn_);
    if (rc < 0) {
        fail(PQerrorMessage(conn_));
        return false;
    }
    want_write(rc == 1);
    return true;
}

bool PgReplicationLink::command(const std::string &command) {
    if (state_ != State::Ready) {
        return false;
    }
    if (!PQsendQuery(conn_, command.c_str())) {
        fail(PQerrorMessage(conn_));
        return false;
    }
    state_ = State::Busy;
    return flush();
}

bool PgReplicationLink::send_copy(std::string_view bytes) {
    if (state_ != State::Streaming) {
        return false;
    }
    if (PQputCopyData(conn_, bytes.data(), static_cast<int>(bytes.size())) != 1) {
        fail(PQerrorMessage(conn_));
        return false;
    }
    return flush();
}

void PgReplicationLink::set_reading(bool reading) {
    if (reading_ == reading) {
        return;
    }
    reading_ = reading;
    if (c_ == nullptr || state_ != State::Streaming) {
        return;
    }
    want_read(reading);
    if (reading) {
        // Messages libpq holds already raise no socket event: read them on the next turn.
        ngx_post_event(c_->read, &ngx_posted_events);
    }
}

void PgReplicationLink::on_writable() {
    if (state_ == State::Connecting) {
        poll_connect();
        return;
    }
    if (conn_ != nullptr) {
        flush();
    }
}

void PgReplicationLink::on_readable() {
    if (state_ == State::Connecting) {
        poll_connect();
        return;
    }
    if (conn_ == nullptr) {
        return;
    }
    if (!PQconsumeInput(conn_)) {
        fail(PQerrorMessage(conn_));
        return;
    }
    if (writing_ && !flush()) {
        return;
    }
    while (state_ == State::Busy && !PQisBusy(conn_)) {
        PGresult *res = PQgetResult(conn_);
        if (res == nullptr) {
            state_ = State::Ready;
            owner_->on_replication_idle();
            return;
        }
        std::unique_ptr<PGresult, void (*)(PGresult *)> owned(res, PQclear);
        if (PQresultStatus(res) == PGRES_COPY_BOTH) {
            state_ = State::Streaming;
            owned.reset();
            owner_->on_replication_streaming();
            break;
        }
        owner_->on_replication_result(ReplicationResult(res));
        if (conn_ == nullptr) {
            return;
        }
    }
    if (state_ == State::Streaming) {
        read_stream();
    }
}

void PgReplicationLink::read_stream() {
    while (conn_ != nullptr && state_ == State::Streaming && reading_) {
        char *buf = nullptr;
        int n = PQgetCopyData(conn_, &buf, 1);
        if (n > 0) {
            std::unique_ptr<char, void (*)(void *)> owned(buf, PQfreemem);
            owner_->on_replication_data(std::string_view(buf, static_cast<size_t>(n)));
            continue;
        }
        if (n == 0) {
            owner_->on_replication_drained();
            return;
        }
        if (n == -1) {
            // The server ended the stream: its reason is in the result that follows.
            PGresult *res = PQgetResult(conn_);
            std::string why = res != nullptr ? PQresultErrorMessage(res) : "";
            if (res != nullptr) {
                PQclear(res);
            }
            fail(why.empty() ? "the server ended the replication stream" : why.c_str());
            return;
        }
        fail(PQerrorMessage(conn_));
        return;
    }
    if (conn_ != nullptr && state_ == State::Streaming) {
        owner_->on_replication_drained();
    }
}

void PgReplicationLink::read_handler(ngx_event_t *ev) noexcept {
    auto *c = static_cast<ngx_connection_t *>(ev->data);
    auto *self = static_cast<PgReplicationLink *>(c->data);
    try {
        self->on_readable();
    } catch (const std::exception &e) {
        ngx_log_error(NGX_LOG_ERR, self->log_, 0, "event_piper: %s", e.what());
        self->fail(e.what());
    } catch (...) {
        self->fail("unexpected exception");
    }
}

void PgReplicationLink::write_handler(ngx_event_t *ev) noexcept {
    auto *c = static_cast<ngx_connection_t *>(ev->data);
    auto *self = static_cast<PgReplicationLink *>(c->data);
    try {
        self->on_writable();
    } catch (const std::exception &e) {
        ngx_log_error(NGX_LOG_ERR, self->log_, 0, "event_piper: %s", e.what());
        self->fail(e.what());
    } catch (...) {
        self->fail("unexpected exception");
    }
}

} // namespace event_piper
