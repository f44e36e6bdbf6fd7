// The HTTP side of one stream (see ngx_http_stream.hpp).
#include "ngx_http_stream.hpp"

#include "core/sse_frame.hpp"

namespace event_piper {

namespace {

// At shutdown, a client that does not take its final bytes within this time is disconnected
// (it resumes like after any other disconnect) instead of holding the old worker for
// send_timeout.
constexpr ngx_msec_t end_grace = 2000;

Stream::Limits limits_of(const LocConf &conf) {
    Stream::Limits limits;
    limits.buffer_bytes = conf.stream_buffer;
    limits.batch_rows = conf.replay_batch;
    return limits;
}

} // namespace

HttpStream::HttpStream(Hub &hub, ngx_http_request_t *r, const LocConf &conf,
                       std::vector<std::string> consumers, int64_t last_position, bool folded)
    : stream_(std::move(consumers), last_position, limits_of(conf), this), hub_(&hub), r_(r),
      heartbeat_(conf.heartbeat), retry_(conf.retry), end_retry_(conf.end_retry()),
      last_write_(ngx_current_msec) {
    stream_.set_folded(folded);
    ngx_memzero(&heartbeat_ev_, sizeof(heartbeat_ev_));
    heartbeat_ev_.handler = heartbeat_handler;
    heartbeat_ev_.data = this;
    heartbeat_ev_.log = r->connection->log;
    heartbeat_ev_.cancelable = 1;
}

void HttpStream::start() {
    if (retry_ != 0) {
        std::string frame;
        append_retry_frame(frame, retry_);
        stream_.append_raw(frame);
    }
    hub_->open(stream_);
    started_ = true;
    ngx_log_error(NGX_LOG_INFO, r_->connection->log, 0,
                  "event_piper: stream opened for consumer \"%s\" (%uz ids) after position %L",
                  stream_.consumer().c_str(), stream_.consumers().size(), stream_.last_position());
    arm_heartbeat();
    flush();
}

void HttpStream::wake() {
    if (finished_) {
        return;
    }
    ngx_post_event(r_->connection->write, &ngx_posted_events);
}

bool HttpStream::nginx_holds_output() const {
    ngx_connection_t *c = r_->connection;
    return r_->out != nullptr || r_->buffered || c->buffered;
}

void HttpStream::flush() {
    if (finished_) {
        return;
    }
    if (stream_.failed()) {
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
    if (stream_.has_pending()) {
        WorkerStats &stats = hub_->stats();
        stats.events_delivered += stream_.pending_events();
        stream_.take_pending(inflight_);
        stats.bytes_sent += inflight_.size();
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
    // Drained: drop big buffers so an idle stream costs little, give back the replay budget,
    // then maybe read the table.
    if (inflight_.capacity() > 16384) {
        std::string().swap(inflight_);
    }
    if (stream_.replay_held() != 0) {
        hub_->replay().release(stream_);
    }
    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }
    if (stream_.wants_query(true)) {
        hub_->request_batch(stream_);
    }
}

// Sends `in` (nullptr: what nginx still holds) down the output filters. True when everything is
// in the socket; false when the socket is full (the write event will call flush again) or the
// request was finalised on an error.
bool HttpStream::push(ngx_chain_t *in) {
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

void HttpStream::wait_for_socket() {
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

void HttpStream::arm_heartbeat() {
    if (heartbeat_ != 0 && !finished_) {
        ngx_add_timer(&heartbeat_ev_, heartbeat_);
    }
}

void HttpStream::heartbeat_handler(ngx_event_t *ev) noexcept {
    auto *s = static_cast<HttpStream *>(ev->data);
    try {
        ngx_msec_t idle = ngx_current_msec - s->last_write_;
        if (idle + 1 >= s->heartbeat_) {
            if (!s->stream_.has_pending() && s->inflight_.empty()) {
                s->stream_.append_raw(heartbeat_frame());
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

void HttpStream::write_handler(ngx_http_request_t *r) noexcept {
    auto *s = static_cast<HttpStream *>(ngx_http_get_module_ctx(r, ngx_event_piper_module));
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

void HttpStream::finish(bool graceful) {
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
        stream_.take_pending(tail);
        append_retry_frame(tail, end_retry_);
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
    bool unsent = rc != NGX_ERROR && nginx_holds_output();
    ngx_http_finalize_request(r, rc == NGX_ERROR ? NGX_ERROR : NGX_OK);
    // With bytes left, nginx keeps the connection and waits up to send_timeout for the client
    // (the request, and this object, stay alive meanwhile). When the worker is exiting, wait
    // only a short grace period: a client that does not read must not hold a reload.
    if (unsent && (ngx_exiting || ngx_terminate) && c->write->timer_set) {
        ngx_add_timer(c->write, end_grace);
    }
    ngx_http_run_posted_requests(c);
}

void HttpStream::detach() {
    if (detached_) {
        return;
    }
    detached_ = true;
    if (heartbeat_ev_.timer_set) {
        ngx_del_timer(&heartbeat_ev_);
    }
    if (!started_) {
        return; // the client went away before the stream opened
    }
    hub_->close(stream_);
    ngx_log_error(NGX_LOG_INFO, r_->connection->log, 0,
                  "event_piper: stream closed for consumer \"%s\" at position %L",
                  stream_.consumer().c_str(), stream_.last_position());
}

void HttpStream::cleanup_handler(void *data) noexcept {
    auto *s = static_cast<HttpStream *>(data);
    s->finished_ = true;
    s->~HttpStream();
}

} // namespace event_piper
