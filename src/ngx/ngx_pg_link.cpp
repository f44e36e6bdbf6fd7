// libpq in nginx's event loop: connect with PQconnectStart/PQconnectPoll, send with
// PQsendQuery*, read with PQconsumeInput/PQgetResult/PQnotifies, never block.
#include "ngx_pg_link.hpp"

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

// A PGresult seen through the core's QueryResult.
class PgResult final : public QueryResult {
public:
    explicit PgResult(PGresult *res) : res_(res) {}
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

void PgLink::connect() {
    close();
    // libpq processes these in order and the last value of a key wins. Before the user's conninfo
    // (in "dbname"): TCP keepalive defaults that notice a dead server within about a minute,
    // which the conninfo may override. After it: application_name, so that pg_stat_activity
    // always tells listener and replay connections apart.
    const char *keys[] = {"keepalives_idle", "keepalives_interval", "keepalives_count",
                          "dbname",          "application_name",    nullptr};
    const char *values[] = {default_keepalives_idle,
                            default_keepalives_interval,
                            default_keepalives_count,
                            conninfo_.c_str(),
                            application_,
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
    // Server notices and libpq warnings go to the error log, not to the worker's stderr.
    PQsetNoticeProcessor(conn_, notice_processor, this);
    state_ = State::Connecting;
    sync_socket();
    if (c_ == nullptr) {
        fail("no socket");
        return;
    }
    // PQconnectPoll does not enforce connect_timeout: a silent server would hang us forever.
    ngx_add_timer(&connect_timer_, connect_timeout_ms);
    want_write(true); // "behave as if PQconnectPoll last returned PGRES_POLLING_WRITING"
}

void PgLink::connect_timeout_handler(ngx_event_t *ev) noexcept {
    auto *self = static_cast<PgLink *>(ev->data);
    try {
        if (self->state_ == State::Connecting) {
            self->fail("timeout while connecting");
        }
    } catch (const std::exception &e) {
        ngx_log_error(NGX_LOG_ERR, ev->log, 0, "event_piper: connect timeout: %s", e.what());
    } catch (...) {
        ngx_log_error(NGX_LOG_ERR, ev->log, 0, "event_piper: connect timeout failed");
    }
}

void PgLink::notice_processor(void *arg, const char *message) noexcept {
    auto *self = static_cast<PgLink *>(arg);
    std::string_view line = without_line_end(message);
    ngx_log_error(NGX_LOG_NOTICE, self->log_, 0, "event_piper: %s connection: %*s",
                  self->application_, line.size(), line.data());
}

void PgLink::poll_connect() {
    PostgresPollingStatusType st = PQconnectPoll(conn_);
    if (st == PGRES_POLLING_FAILED) {
        fail(PQerrorMessage(conn_));
        return;
    }
    sync_socket(); // libpq may have opened a new socket (next host, SSL fallback)
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
        owner_->on_link_ready(*this);
        return;
    default:
        return;
    }
}

void PgLink::sync_socket() {
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
    if (ngx_add_event(c->read, NGX_READ_EVENT, NGX_LEVEL_EVENT) != NGX_OK) {
        ngx_free_connection(c);
        return;
    }
    c_ = c;
    inode_ = inode_of(fd);
    writing_ = false;
}

void PgLink::detach_socket() {
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
    // libpq closes (or has closed) the fd itself: NGX_CLOSE_EVENT skips epoll_ctl, the kernel
    // drops the registration when the file is closed.
    if (ngx_del_conn) {
        ngx_del_conn(c, NGX_CLOSE_EVENT);
    } else {
        c->read->active = 0;
        c->write->active = 0;
    }
    c->fd = (ngx_socket_t)-1;
    ngx_free_connection(c);
}

void PgLink::want_write(bool on) {
    if (c_ == nullptr || writing_ == on) {
        return;
    }
    if (on) {
        if (ngx_add_event(c_->write, NGX_WRITE_EVENT, NGX_LEVEL_EVENT) == NGX_OK) {
            writing_ = true;
        }
    } else {
        if (ngx_del_event(c_->write, NGX_WRITE_EVENT, 0) == NGX_OK) {
            writing_ = false;
        }
    }
}

void PgLink::close() {
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

void PgLink::fail(const char *why) {
    // Copy the message (PQfinish frees the libpq error buffer), at most failure_text_max bytes.
    std::string msg =
        one_line(std::string_view(why ? why : "unknown error").substr(0, failure_text_max));
    close();
    owner_->on_link_lost(*this, msg);
}

bool PgLink::flush() {
    int rc = PQflush(conn_);
    if (rc < 0) {
        fail(PQerrorMessage(conn_));
        return false;
    }
    want_write(rc == 1);
    return true;
}

bool PgLink::send(const char *sql, int n, const char *const *values) {
    if (state_ != State::Ready) {
        return false;
    }
    int sent = n == 0 ? PQsendQuery(conn_, sql)
                      : PQsendQueryParams(conn_, sql, n, nullptr, values, nullptr, nullptr, 0);
    if (!sent) {
        fail(PQerrorMessage(conn_));
        return false;
    }
    state_ = State::Busy;
    return flush();
}

void PgLink::on_writable() {
    if (state_ == State::Connecting) {
        poll_connect();
        return;
    }
    if (conn_ != nullptr) {
        flush();
    }
}

void PgLink::on_readable() {
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
    if (state_ == State::Busy && writing_ && !flush()) {
        return;
    }
    while (state_ == State::Busy && !PQisBusy(conn_)) {
        PGresult *res = PQgetResult(conn_);
        if (res == nullptr) {
            state_ = State::Ready;
            owner_->on_link_idle(*this);
            break;
        }
        std::unique_ptr<PGresult, void (*)(PGresult *)> owned(res, PQclear);
        owner_->on_link_result(*this, PgResult(res));
        if (conn_ == nullptr) {
            return; // the owner closed the link
        }
    }
    bool notified = false;
    while (conn_ != nullptr) {
        PGnotify *n = PQnotifies(conn_);
        if (n == nullptr) {
            break;
        }
        std::unique_ptr<PGnotify, void (*)(void *)> owned(n, PQfreemem);
        notified = true;
        owner_->on_link_notify(*this, n->extra != nullptr ? n->extra : "");
    }
    if (notified && conn_ != nullptr) {
        owner_->on_link_notifies_done(*this);
    }
    if (conn_ != nullptr && PQstatus(conn_) == CONNECTION_BAD) {
        fail(PQerrorMessage(conn_));
    }
}

void PgLink::read_handler(ngx_event_t *ev) noexcept {
    auto *c = static_cast<ngx_connection_t *>(ev->data);
    auto *self = static_cast<PgLink *>(c->data);
    try {
        self->on_readable();
    } catch (const std::exception &e) {
        ngx_log_error(NGX_LOG_ERR, self->log_, 0, "event_piper: %s", e.what());
        self->fail(e.what());
    } catch (...) {
        self->fail("unexpected exception");
    }
}

void PgLink::write_handler(ngx_event_t *ev) noexcept {
    auto *c = static_cast<ngx_connection_t *>(ev->data);
    auto *self = static_cast<PgLink *>(c->data);
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
