// Per-worker machinery (nginx adapter): sessions, the listener, the replay pool.
// Rule of thumb: anything outside a request's own event handler only changes the session's
// state and posts its write event (Session::wake); the write handler does the nginx output work
// in request context. nginx's posted-event queue thus batches writes per wake-up, and a
// finalised request is never touched by a loop that is still iterating over sessions.
#include "ngx_worker.hpp"

#include "notification.hpp"
#include "sse_frame.hpp"

#include <cerrno>
#include <charconv>
#include <csignal>
#include <cstdlib>
#include <new>
#include <sys/eventfd.h>
#include <unistd.h>

namespace event_piper {

namespace {

Worker *the_worker = nullptr;

constexpr ngx_msec_t backoff_first = 100;
constexpr ngx_msec_t backoff_max = 2000;
constexpr ngx_msec_t shutdown_retry_default = 1000;

ngx_msec_t next_backoff(ngx_msec_t current) {
    return current == 0 ? backoff_first : (current * 2 > backoff_max ? backoff_max : current * 2);
}

// One keyset batch: at most $3 rows, and no more rows than fit in about $4 bytes (at least one),
// so that a batch of large payloads cannot balloon the worker. `fetched` tells a batch cut by the
// byte cap (more rows follow) from a short batch (the end of the history). `newest` is the newest
// committed position; with no row left, the query still answers one row of NULLs carrying it.
const char *const replay_sql =
    "SELECT b.position, b.type, b.body, b.fetched, m.newest"
    " FROM (SELECT coalesce(max(position), 0) AS newest FROM events) AS m"
    " LEFT JOIN LATERAL ("
    "  SELECT position, type, body, count(*) OVER () AS fetched,"
    "   sum(octet_length(body)) OVER (ORDER BY position) - octet_length(body) AS before"
    "  FROM (SELECT position, type, payload::text AS body FROM events"
    "   WHERE subscriber = $1 AND position > $2 ORDER BY position LIMIT $3) AS batch"
    " ) AS b ON b.before < $4"
    " ORDER BY b.position";

int64_t to_int64(const char *text, int len) {
    int64_t v = 0;
    std::from_chars(text, text + len, v);
    return v;
}

void init_timer_event(ngx_event_t &ev, ngx_event_handler_pt handler, void *data, ngx_log_t *log) {
    ngx_memzero(&ev, sizeof(ev));
    ev.handler = handler;
    ev.data = data;
    ev.log = log;
    ev.cancelable = 1; // never holds a shutting-down worker
}

} // namespace

Worker *current_worker() {
    return the_worker;
}

void create_worker(ngx_cycle_t *cycle, const MainConf &conf) {
    the_worker = new Worker(cycle, conf);
    the_worker->start();
}

void destroy_worker() {
    delete the_worker;
    the_worker = nullptr;
}

// ---------------------------------------------------------------------------------------------
// Session

Session::Session(Worker &worker, ngx_http_request_t *r, const LocConf &conf, std::string consumer,
                 int64_t last_position)
    : core(std::move(consumer), last_position, conf.stream_buffer), worker_(&worker), r_(r),
      heartbeat_(conf.heartbeat), retry_(conf.retry), last_write_(ngx_current_msec),
      batch_(conf.replay_batch), buffer_limit_(conf.stream_buffer) {
    init_timer_event(heartbeat_ev_, heartbeat_handler, this, r->connection->log);
}

void Session::start() {
    if (retry_ != 0) {
        std::string frame;
        append_retry_frame(frame, retry_);
        core.append_raw(frame);
    }
    worker_->add(*this);
    started_ = true;
    ngx_log_error(NGX_LOG_INFO, r_->connection->log, 0,
                  "event_piper: stream opened for consumer \"%s\" after position %L",
                  core.consumer().c_str(), core.last_position());
    arm_heartbeat();
    flush();
}

void Session::wake() {
    if (finished_) {
        return;
    }
    ngx_event_t *wev = r_->connection->write;
    ngx_post_event(wev, &ngx_posted_events);
}

bool Session::nginx_holds_output() const {
    ngx_connection_t *c = r_->connection;
    return r_->out != nullptr || r_->buffered || c->buffered;
}

void Session::flush() {
    if (finished_) {
        return;
    }
    if (end_requested) {
        finish(true);
        return;
    }
    ngx_connection_t *c = r_->connection;
    if (!inflight_.empty()) {
        if (nginx_holds_output() && !push(nullptr)) {
            return;
        }
        inflight_.clear();
    }
    if (core.has_pending()) {
        worker_->stats().events_delivered += core.pending_events();
        core.take_pending(inflight_);
        worker_->stats().bytes_sent += inflight_.size();
        auto tag = reinterpret_cast<ngx_buf_tag_t>(&ngx_event_piper_module);
        ngx_chain_t *cl = ngx_chain_get_free_buf(r_->pool, &free_);
        if (cl == nullptr) {
            ngx_http_finalize_request(r_, NGX_ERROR);
            return;
        }
        ngx_buf_t *b = cl->buf;
        ngx_memzero(b, sizeof(ngx_buf_t));
        b->start = b->pos = reinterpret_cast<u_char *>(inflight_.data());
        b->end = b->last = b->pos + inflight_.size();
        b->memory = 1;
        b->flush = 1;
        b->tag = tag;
        last_write_ = ngx_current_msec;
        if (!push(cl)) {
            return;
        }
        inflight_.clear();
    }
    // Drained: drop big buffers so an idle stream costs little, then maybe read the table.
    if (inflight_.capacity() > 16384) {
        std::string().swap(inflight_);
    }
    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }
    if (!queued && serving == nullptr && core.wants_query(true)) {
        worker_->request_batch(*this);
    }
}

// Sends `in` (nullptr: what nginx still holds) down the output filters. True when everything is
// in the socket; false when the socket is full (the write event will call flush again) or the
// request was finalised on an error.
bool Session::push(ngx_chain_t *in) {
    ngx_int_t rc = ngx_http_output_filter(r_, in);
    if (in != nullptr) {
        ngx_chain_update_chains(r_->pool, &free_, &busy_, &in,
                                reinterpret_cast<ngx_buf_tag_t>(&ngx_event_piper_module));
    }
    if (rc == NGX_ERROR) {
        ngx_http_finalize_request(r_, NGX_ERROR);
        return false;
    }
    if (nginx_holds_output()) {
        wait_for_socket();
        return false;
    }
    return true;
}

void Session::wait_for_socket() {
    ngx_connection_t *c = r_->connection;
    auto *clcf = static_cast<ngx_http_core_loc_conf_t *>(
        ngx_http_get_module_loc_conf(r_, ngx_http_core_module));
    if (!c->write->ready && !c->write->timer_set) {
        ngx_add_timer(c->write, clcf->send_timeout);
    }
    if (ngx_handle_write_event(c->write, clcf->send_lowat) != NGX_OK) {
        ngx_http_finalize_request(r_, NGX_ERROR);
    }
}

void Session::arm_heartbeat() {
    if (heartbeat_ != 0 && !finished_) {
        ngx_add_timer(&heartbeat_ev_, heartbeat_);
    }
}

void Session::heartbeat_handler(ngx_event_t *ev) noexcept {
    auto *s = static_cast<Session *>(ev->data);
    try {
        ngx_msec_t idle = ngx_current_msec - s->last_write_;
        if (idle + 1 >= s->heartbeat_) {
            if (!s->core.has_pending() && s->inflight_.empty()) {
                s->core.append_raw(heartbeat_frame());
                s->wake();
            }
            ngx_add_timer(&s->heartbeat_ev_, s->heartbeat_);
        } else {
            ngx_add_timer(&s->heartbeat_ev_, s->heartbeat_ - idle);
        }
    } catch (...) {
        ngx_log_error(NGX_LOG_ERR, ev->log, 0, "event_piper: heartbeat failed");
    }
}

void Session::write_handler(ngx_http_request_t *r) noexcept {
    auto *s = static_cast<Session *>(ngx_http_get_module_ctx(r, ngx_event_piper_module));
    if (s == nullptr) {
        return;
    }
    ngx_connection_t *c = r->connection;
    if (c->write->timedout) {
        c->timedout = 1;
        ngx_log_error(NGX_LOG_INFO, c->log, NGX_ETIMEDOUT,
                      "event_piper: client stopped reading, closing stream");
        ngx_http_finalize_request(r, NGX_HTTP_REQUEST_TIME_OUT);
        return;
    }
    try {
        s->flush();
    } catch (const std::exception &e) {
        ngx_log_error(NGX_LOG_ERR, c->log, 0, "event_piper: %s", e.what());
        ngx_http_finalize_request(r, NGX_ERROR);
    } catch (...) {
        ngx_http_finalize_request(r, NGX_ERROR);
    }
}

void Session::finish(bool graceful) {
    if (finished_) {
        return;
    }
    ngx_http_request_t *r = r_;
    ngx_connection_t *c = r->connection;
    detach();
    finished_ = true;
    std::string tail;
    if (graceful) {
        // What was queued, then a reconnect hint: the client resumes with its Last-Event-ID.
        core.take_pending(tail);
        append_retry_frame(tail, retry_ != 0 ? retry_ : shutdown_retry_default);
    }
    auto *b = static_cast<ngx_buf_t *>(ngx_calloc_buf(r->pool));
    ngx_chain_t *cl = ngx_alloc_chain_link(r->pool);
    u_char *data =
        tail.empty() ? nullptr : static_cast<u_char *>(ngx_pnalloc(r->pool, tail.size()));
    if (b == nullptr || cl == nullptr || (!tail.empty() && data == nullptr)) {
        ngx_http_finalize_request(r, NGX_ERROR);
        ngx_http_run_posted_requests(c);
        return;
    }
    if (data != nullptr) {
        ngx_memcpy(data, tail.data(), tail.size());
        b->pos = b->start = data;
        b->last = b->end = data + tail.size();
        b->memory = 1;
    }
    b->last_buf = 1;
    b->flush = 1;
    cl->buf = b;
    cl->next = nullptr;
    r->keepalive = 0;
    ngx_int_t rc = ngx_http_output_filter(r, cl);
    ngx_http_finalize_request(r, rc == NGX_ERROR ? NGX_ERROR : NGX_OK);
    ngx_http_run_posted_requests(c);
}

void Session::detach() {
    if (detached_) {
        return;
    }
    detached_ = true;
    if (heartbeat_ev_.timer_set) {
        ngx_del_timer(&heartbeat_ev_);
    }
    if (worker_ != nullptr) {
        worker_->remove(*this);
    }
    if (!started_) {
        return; // the client went away before the stream opened
    }
    ngx_log_error(NGX_LOG_INFO, r_->connection->log, 0,
                  "event_piper: stream closed for consumer \"%s\" at position %L",
                  core.consumer().c_str(), core.last_position());
}

void Session::cleanup_handler(void *data) noexcept {
    auto *s = static_cast<Session *>(data);
    s->finished_ = true;
    s->~Session();
}

// ---------------------------------------------------------------------------------------------
// ReplayPool

ReplayPool::ReplayPool(Worker &worker, ngx_log_t *log, const std::string &conninfo, size_t size)
    : worker_(worker), log_(log) {
    for (size_t i = 0; i < size; ++i) {
        links_.push_back(std::make_unique<PgLink>(*this, log, conninfo, "event_piper_replay"));
        links_.back()->user = reinterpret_cast<void *>(i);
    }
    jobs_.resize(size);
    init_timer_event(retry_ev_, retry_handler, this, log);
}

ReplayPool::~ReplayPool() {
    close_all();
}

void ReplayPool::close_all() {
    if (retry_ev_.timer_set) {
        ngx_del_timer(&retry_ev_);
    }
    for (size_t i = 0; i < links_.size(); ++i) {
        links_[i]->close();
        if (jobs_[i].session != nullptr) {
            jobs_[i].session->serving = nullptr;
        }
        jobs_[i] = Job{};
    }
    for (Session *s : queue_) {
        s->queued = false;
    }
    queue_.clear();
}

void ReplayPool::request(Session &s) {
    if (s.queued || s.serving != nullptr) {
        return;
    }
    s.queued = true;
    queue_.push_back(&s);
    dispatch();
}

void ReplayPool::cancel(Session &s) {
    if (s.queued) {
        for (auto it = queue_.begin(); it != queue_.end(); ++it) {
            if (*it == &s) {
                queue_.erase(it);
                break;
            }
        }
        s.queued = false;
    }
    if (s.serving != nullptr) {
        jobs_[reinterpret_cast<size_t>(s.serving->user)].session = nullptr; // result discarded
        s.serving = nullptr;
    }
}

void ReplayPool::dispatch() {
    while (!queue_.empty()) {
        PgLink *idle = nullptr;
        size_t connecting = 0;
        for (size_t i = 0; i < links_.size(); ++i) {
            PgLink::State st = links_[i]->state();
            if (st == PgLink::State::Ready && jobs_[i].session == nullptr && idle == nullptr) {
                idle = links_[i].get();
            } else if (st == PgLink::State::Connecting) {
                ++connecting;
            }
        }
        if (idle == nullptr) {
            if (retry_ev_.timer_set) {
                return; // backing off after a failure
            }
            for (auto &link : links_) {
                if (connecting >= queue_.size()) {
                    break;
                }
                if (link->state() == PgLink::State::Down) {
                    ++connecting;
                    link->connect(); // may fail at once: on_link_lost arms the backoff timer
                    if (retry_ev_.timer_set) {
                        return;
                    }
                }
            }
            return;
        }
        Session *s = queue_.front();
        queue_.pop_front();
        s->queued = false;
        size_t i = reinterpret_cast<size_t>(idle->user);
        char last[24];
        char batch[24];
        char bytes[24];
        *std::to_chars(last, last + sizeof last - 1, s->core.last_position()).ptr = '\0';
        *std::to_chars(batch, batch + sizeof batch - 1, s->replay_batch()).ptr = '\0';
        *std::to_chars(bytes, bytes + sizeof bytes - 1, s->replay_bytes()).ptr = '\0';
        const char *values[4] = {s->core.consumer().c_str(), last, batch, bytes};
        s->core.begin_query(worker_.listener_epoch());
        s->serving = idle;
        jobs_[i] = Job{s, 0, 0, 0, false};
        ++queries_;
        idle->send_query_params(replay_sql, 4, values); // failure: on_link_lost re-queues s
    }
}

void ReplayPool::on_link_ready(PgLink &) {
    if (reported_down_) {
        ngx_log_error(NGX_LOG_NOTICE, log_, 0, "event_piper: replay connection is back");
        reported_down_ = false;
    }
    backoff_ = 0;
    dispatch();
}

void ReplayPool::on_link_result(PgLink &link, PGresult *res) {
    Job &job = jobs_[reinterpret_cast<size_t>(link.user)];
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        ngx_log_error(NGX_LOG_ERR, log_, 0, "event_piper: replay query failed: %s",
                      PQresultErrorMessage(res));
        job.failed = true;
        return;
    }
    if (job.session == nullptr) {
        return; // the client went away meanwhile
    }
    int n = PQntuples(res);
    if (n > 0) {
        job.newest = to_int64(PQgetvalue(res, 0, 4), PQgetlength(res, 0, 4));
        worker_.note_position(job.newest);
        if (PQgetisnull(res, 0, 0)) {
            return; // nothing after the stream's position
        }
        job.fetched = static_cast<size_t>(to_int64(PQgetvalue(res, 0, 3), PQgetlength(res, 0, 3)));
    }
    Stream &core = job.session->core;
    for (int row = 0; row < n; ++row) {
        int64_t pos = to_int64(PQgetvalue(res, row, 0), PQgetlength(res, row, 0));
        core.on_row(pos, std::string_view(PQgetvalue(res, row, 1), PQgetlength(res, row, 1)),
                    std::string_view(PQgetvalue(res, row, 2), PQgetlength(res, row, 2)));
        worker_.note_position(pos);
    }
    job.rows += static_cast<size_t>(n);
}

void ReplayPool::on_link_idle(PgLink &link) {
    Job job = jobs_[reinterpret_cast<size_t>(link.user)];
    jobs_[reinterpret_cast<size_t>(link.user)] = Job{};
    if (job.session != nullptr) {
        Session &s = *job.session;
        s.serving = nullptr;
        if (job.failed) {
            // The server refused the query itself (not the connection): asking again would fail
            // again. End the stream; the client reconnects and resumes from its last id.
            s.core.query_failed();
            s.end_requested = true;
        } else {
            bool more = job.rows > 0 && (job.fetched >= s.replay_batch() || job.rows < job.fetched);
            if (job.rows == 0) {
                s.core.on_newest(job.newest);
            }
            s.core.end_query(more, worker_.listener_epoch());
        }
        s.wake();
    }
    dispatch();
}

void ReplayPool::on_link_lost(PgLink &link, const char *why) {
    size_t i = reinterpret_cast<size_t>(link.user);
    Job job = jobs_[i];
    jobs_[i] = Job{};
    if (job.session != nullptr) {
        job.session->serving = nullptr;
        job.session->core.query_failed();
        job.session->queued = true;
        queue_.push_front(job.session);
    }
    if (!reported_down_) {
        ngx_log_error(NGX_LOG_ERR, log_, 0, "event_piper: replay connection failed: %s", why);
        reported_down_ = true;
    }
    backoff_ = next_backoff(backoff_);
    if (!retry_ev_.timer_set) {
        ngx_add_timer(&retry_ev_, backoff_);
    }
}

void ReplayPool::retry_handler(ngx_event_t *ev) noexcept {
    auto *self = static_cast<ReplayPool *>(ev->data);
    try {
        self->dispatch();
    } catch (...) {
        ngx_log_error(NGX_LOG_ERR, ev->log, 0, "event_piper: replay dispatch failed");
    }
}

// ---------------------------------------------------------------------------------------------
// Listener

Listener::Listener(Worker &worker, ngx_log_t *log, const std::string &conninfo,
                   const std::string &channel)
    : worker_(worker), log_(log), link_(*this, log, conninfo, "event_piper_listener"),
      listen_sql_("LISTEN \"" + channel + "\"") {
    init_timer_event(retry_ev_, retry_handler, this, log);
}

Listener::~Listener() {
    close();
}

void Listener::start() {
    phase_ = Phase::Connecting;
    link_.connect();
}

void Listener::close() {
    closing_ = true;
    if (retry_ev_.timer_set) {
        ngx_del_timer(&retry_ev_);
    }
    link_.close();
    epoch_ = 0;
}

void Listener::on_link_ready(PgLink &) {
    phase_ = Phase::Listening;
    link_.send_query(listen_sql_.c_str());
}

void Listener::on_link_result(PgLink &, PGresult *res) {
    ExecStatusType st = PQresultStatus(res);
    if (phase_ == Phase::Listening && st == PGRES_COMMAND_OK) {
        return;
    }
    if (phase_ == Phase::ReadingHead && st == PGRES_TUPLES_OK && PQntuples(res) == 1) {
        head_seen_ = to_int64(PQgetvalue(res, 0, 0), PQgetlength(res, 0, 0));
        before_seen_ = PQnfields(res) > 1 ? to_int64(PQgetvalue(res, 0, 1), PQgetlength(res, 0, 1))
                                          : head_seen_;
        return;
    }
    // Keep the message: closing the link frees the result's connection, not the result.
    std::string why = PQresultErrorMessage(res);
    while (!why.empty() && why.back() == '\n') {
        why.pop_back();
    }
    link_.close();
    on_link_lost(link_, why.empty() ? "unexpected result" : why.c_str());
}

void Listener::on_link_idle(PgLink &) {
    if (phase_ == Phase::Listening) {
        // LISTEN is active now: a snapshot taken from here on misses nothing that is notified.
        phase_ = Phase::ReadingHead;
        head_seen_ = 0;
        uint64_t since = worker_.unpositioned_since_ms();
        if (since == 0) {
            link_.send_query("SELECT coalesce(max(position), 0) FROM events");
            return;
        }
        // Streams opened without a resume point while the database was unreachable start after
        // what was committed before they opened, by the database's commit clock.
        char ms[24];
        *std::to_chars(ms, ms + sizeof ms - 1, since).ptr = '\0';
        const char *values[1] = {ms};
        link_.send_query_params("SELECT (SELECT coalesce(max(position), 0) FROM events),"
                                " coalesce((SELECT position FROM events"
                                "  WHERE committed_at <= to_timestamp($1::float8 / 1000)"
                                "  ORDER BY position DESC LIMIT 1), 0)",
                                1, values);
        return;
    }
    if (phase_ == Phase::ReadingHead) {
        phase_ = Phase::Live;
        epoch_ = ++sessions_;
        backoff_ = 0;
        if (reported_down_ || !ever_connected_) {
            ngx_log_error(NGX_LOG_NOTICE, log_, 0,
                          "event_piper: listening for notifications (newest position %L)",
                          head_seen_);
        }
        reported_down_ = false;
        ever_connected_ = true;
        worker_.on_listener_ready(head_seen_, before_seen_);
    }
}

void Listener::on_link_lost(PgLink &, const char *why) {
    bool was_live = epoch_ != 0;
    epoch_ = 0;
    phase_ = Phase::Connecting;
    if (closing_) {
        return;
    }
    if (was_live) {
        ++reconnects_;
        ngx_log_error(NGX_LOG_ERR, log_, 0,
                      "event_piper: listener connection lost: %s; reconnecting", why);
        worker_.on_listener_lost();
    } else if (!reported_down_) {
        ngx_log_error(NGX_LOG_ERR, log_, 0,
                      "event_piper: listener cannot connect: %s; retrying with backoff", why);
    }
    reported_down_ = true;
    backoff_ = next_backoff(backoff_);
    if (!retry_ev_.timer_set) {
        ngx_add_timer(&retry_ev_, backoff_);
    }
}

void Listener::on_link_notify(PgLink &, PGnotify *n) {
    worker_.on_notification(n->extra);
}

void Listener::retry_handler(ngx_event_t *ev) noexcept {
    auto *self = static_cast<Listener *>(ev->data);
    try {
        self->start();
    } catch (...) {
        ngx_log_error(NGX_LOG_ERR, ev->log, 0, "event_piper: listener restart failed");
    }
}

// ---------------------------------------------------------------------------------------------
// Worker

Worker::Worker(ngx_cycle_t *cycle, const MainConf &conf)
    : log_(cycle->log),
      listener_(*this, cycle->log,
                std::string(reinterpret_cast<char *>(conf.conninfo.data), conf.conninfo.len),
                std::string(reinterpret_cast<char *>(conf.channel.data), conf.channel.len)),
      pool_(*this, cycle->log,
            std::string(reinterpret_cast<char *>(conf.conninfo.data), conf.conninfo.len),
            conf.replay_connections) {
    init_timer_event(publish_ev_, publish_handler, this, log_);
    claim_status_slot(conf.status_zone);
}

Worker::~Worker() {
    if (publish_ev_.timer_set) {
        ngx_del_timer(&publish_ev_);
    }
    if (slot_ != nullptr) {
        slot_->stats = WorkerStats{};
        slot_->owner = 0; // free for the next worker
    }
    listener_.close();
    pool_.close_all();
    if (quit_sentinel_ != nullptr) {
        ngx_close_connection(quit_sentinel_);
        quit_sentinel_ = nullptr;
    }
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
    listener_.start();
    publish();
}

// Another worker (or a past one) may hold a slot: a slot is free when its owner is 0 or dead.
void Worker::claim_status_slot(ngx_shm_zone_t *zone) {
    if (zone == nullptr || zone->data == nullptr) {
        return;
    }
    auto *z = static_cast<StatusZone *>(zone->data);
    ngx_atomic_uint_t me = static_cast<ngx_atomic_uint_t>(ngx_pid);
    for (StatusSlot &slot : z->slots) {
        ngx_atomic_uint_t owner = slot.owner;
        bool free = owner == 0 || (kill(static_cast<pid_t>(owner), 0) == -1 && errno == ESRCH);
        if (free && ngx_atomic_cmp_set(&slot.owner, owner, me)) {
            slot_ = &slot;
            slot.stats = WorkerStats{};
            stats_.pid = ngx_pid;
            return;
        }
    }
    ngx_log_error(NGX_LOG_WARN, log_, 0,
                  "event_piper: no free status slot, this worker is missing from the status");
}

// Counts that are cheaper to take once a second than to keep exact on every transition.
void Worker::publish() {
    uint64_t catching_up = 0;
    registry_.for_each_all([&catching_up](Session &s) {
        if (s.core.mode() == Stream::Mode::CatchingUp) {
            ++catching_up;
        }
    });
    stats_.streams = registry_.streams();
    stats_.consumers = registry_.consumers();
    stats_.streams_catching_up = catching_up;
    stats_.listener_state = listening() ? 1 : 0;
    stats_.listener_reconnects = listener_.reconnects();
    stats_.replay_queries = pool_.queries();
    stats_.replay_queued = pool_.queued_count();
    if (slot_ != nullptr) {
        slot_->stats = stats_;
    }
    if (!shutting_down_) {
        ngx_add_timer(&publish_ev_, 1000);
    }
}

void Worker::publish_handler(ngx_event_t *ev) noexcept {
    try {
        static_cast<Worker *>(ev->data)->publish();
    } catch (...) {
        ngx_log_error(NGX_LOG_ERR, ev->log, 0, "event_piper: status publish failed");
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
                  registry_.streams());
    registry_.for_each_all([](Session &s) { s.finish(true); });
    if (publish_ev_.timer_set) {
        ngx_del_timer(&publish_ev_);
    }
    publish();
    listener_.close();
    pool_.close_all();
    if (quit_sentinel_ != nullptr) {
        ngx_close_connection(quit_sentinel_);
        quit_sentinel_ = nullptr;
    }
}

void Worker::add(Session &s) {
    registry_.add(s.core.consumer(), &s);
}

void Worker::remove(Session &s) {
    registry_.remove(s.core.consumer(), &s);
    pool_.cancel(s);
}

void Worker::on_notification(const char *payload) {
    Notification n;
    if (!parse_notification(payload, n)) {
        if (!warned_foreign_) { // once: another trigger on the channel would flood the log
            ngx_log_error(NGX_LOG_WARN, log_, 0,
                          "event_piper: ignoring notifications not written by "
                          "postgresql/schema.sql's trigger (is an old trigger still installed?): "
                          "\"%.64s\"",
                          payload);
            warned_foreign_ = true;
        }
        return;
    }
    note_position(n.position);
    ++stats_.notifications;
    const ngx_time_t *tp = ngx_timeofday();
    stats_.last_notification_ms = static_cast<uint64_t>(tp->sec) * 1000 + tp->msec;
    switch (n.kind) {
    case Notification::Kind::Event: {
        bool framed = false;
        bool found = registry_.for_each(n.subscriber, [&](Session &s) {
            if (!framed) {
                frame_.clear();
                append_event_frame(frame_, n.position, n.type, n.payload);
                framed = true;
            }
            uint64_t overflows = s.core.overflows();
            s.core.on_event(n.position, frame_);
            stats_.stream_overflows += s.core.overflows() - overflows;
            s.wake();
        });
        if (!found) {
            ++stats_.notifications_dropped;
        }
        return;
    }
    case Notification::Kind::Reference: {
        bool found = registry_.for_each(n.subscriber, [&](Session &s) {
            s.core.on_hint(n.position);
            s.wake();
        });
        if (!found) {
            ++stats_.notifications_dropped;
        }
        return;
    }
    case Notification::Kind::Position:
        registry_.for_each_all([&](Session &s) {
            s.core.on_hint(n.position);
            s.wake();
        });
        return;
    }
}

void Worker::on_listener_ready(int64_t head, int64_t before_unpositioned) {
    note_position(head);
    unpositioned_since_ms_ = 0;
    registry_.for_each_all([before_unpositioned](Session &s) {
        s.core.on_listener_ready(before_unpositioned);
        s.wake();
    });
}

void Worker::note_unpositioned_stream() {
    if (unpositioned_since_ms_ == 0) {
        const ngx_time_t *tp = ngx_timeofday();
        unpositioned_since_ms_ = static_cast<uint64_t>(tp->sec) * 1000 + tp->msec;
    }
}

void Worker::on_listener_lost() {
    registry_.for_each_all([](Session &s) { s.core.on_listener_lost(); });
}

} // namespace event_piper
