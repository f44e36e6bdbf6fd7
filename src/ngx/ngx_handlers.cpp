// The content handlers: the event stream (checks the request, then hands it to an HttpStream),
// the original's health answer and the instance-wide status.
#include "ngx_handlers.hpp"

#include "core/request_check.hpp"
#include "core/sse_frame.hpp"
#include "ngx_http_stream.hpp"
#include "ngx_status_zone.hpp"
#include "ngx_worker.hpp"

#include <new>
#include <string>
#include <vector>

namespace event_piper {

namespace {
// A short plain-text answer: one line that says what is wrong.
ngx_int_t send_text(ngx_http_request_t *r, ngx_uint_t status, std::string_view type,
                    std::string_view body) {
    r->headers_out.status = status;
    r->headers_out.content_type.len = type.size();
    r->headers_out.content_type.data = reinterpret_cast<u_char *>(const_cast<char *>(type.data()));
    r->headers_out.content_type_len = type.size();
    r->headers_out.content_length_n = static_cast<off_t>(body.size());
    ngx_int_t rc = ngx_http_send_header(r);
    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }
    auto *b = static_cast<ngx_buf_t *>(ngx_calloc_buf(r->pool));
    if (b == nullptr) {
        return NGX_ERROR;
    }
    b->pos = reinterpret_cast<u_char *>(const_cast<char *>(body.data()));
    b->last = b->pos + body.size();
    b->memory = 1;
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;
    ngx_chain_t out = {b, nullptr};
    return ngx_http_output_filter(r, &out);
}

// A copy in the request pool, for a body that must outlive the handler (send_text does not copy).
std::string_view pool_copy(ngx_http_request_t *r, const std::string &text) {
    auto *copy = static_cast<char *>(ngx_pnalloc(r->pool, text.size()));
    if (copy == nullptr) {
        return "out of memory\n";
    }
    ngx_memcpy(copy, text.data(), text.size());
    return std::string_view(copy, text.size());
}

bool add_header(ngx_http_request_t *r, const char *name, const char *value) {
    auto *h = static_cast<ngx_table_elt_t *>(ngx_list_push(&r->headers_out.headers));
    if (h == nullptr) {
        return false;
    }
    h->hash = 1;
    h->key.data = reinterpret_cast<u_char *>(const_cast<char *>(name));
    h->key.len = ngx_strlen(name);
    h->value.data = reinterpret_cast<u_char *>(const_cast<char *>(value));
    h->value.len = ngx_strlen(value);
    return true;
}

// GET and HEAD only: anything else is 405 with Allow, like every location of the module.
// Reads and drops any body first, so that an error answer leaves the connection usable.
// Returns NGX_DECLINED when the request may go on, else the handler's return code.
ngx_int_t accept_method(ngx_http_request_t *r, const char *what) {
    if (ngx_http_discard_request_body(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    if (r->method & (NGX_HTTP_GET | NGX_HTTP_HEAD)) {
        return NGX_DECLINED;
    }
    if (!add_header(r, "Allow", "GET, HEAD")) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    return send_text(r, NGX_HTTP_NOT_ALLOWED, "text/plain", what);
}

// How many times the request carries header `variable` (as `$http_<variable>` names it).
ngx_uint_t count_header(ngx_http_request_t *r, const ngx_str_t &variable) {
    std::string_view var(reinterpret_cast<char *>(variable.data), variable.len);
    ngx_uint_t n = 0;
    for (ngx_list_part_t *part = &r->headers_in.headers.part; part != nullptr; part = part->next) {
        auto *h = static_cast<ngx_table_elt_t *>(part->elts);
        for (ngx_uint_t i = 0; i < part->nelts; ++i) {
            if (header_matches_variable(
                    std::string_view(reinterpret_cast<char *>(h[i].key.data), h[i].key.len), var)) {
                ++n;
            }
        }
    }
    return n;
}

ngx_int_t open_stream(ngx_http_request_t *r) {
    ngx_int_t rc = accept_method(r, "method not allowed: open the event stream with GET\n");
    if (rc != NGX_DECLINED) {
        return rc;
    }
    auto *lcf = static_cast<LocConf *>(ngx_http_get_module_loc_conf(r, ngx_event_piper_module));

    // Two identity headers: a gateway that appends its header after the client's would be
    // silently overridden by the client. Refuse rather than guess.
    if ((lcf->consumer_header.len > 0 && count_header(r, lcf->consumer_header) > 1) ||
        (lcf->groups_header.len > 0 && count_header(r, lcf->groups_header) > 1)) {
        return send_text(r, NGX_HTTP_BAD_REQUEST, "text/plain",
                         "more than one consumer id header in the request\n");
    }
    ngx_str_t consumer;
    if (ngx_http_complex_value(r, lcf->consumer, &consumer) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    auto from_request =
        consumer_id_from(std::string_view(reinterpret_cast<char *>(consumer.data), consumer.len),
                         lcf->consumer_decode);
    if (!from_request) {
        return send_text(r, NGX_HTTP_BAD_REQUEST, "text/plain", "consumer id has a bad %-escape\n");
    }
    std::string consumer_id = std::move(*from_request);
    ConsumerCheck check = check_consumer(consumer_id);
    if (check != ConsumerCheck::Ok) {
        ngx_uint_t status =
            check == ConsumerCheck::Missing ? NGX_HTTP_UNAUTHORIZED : NGX_HTTP_BAD_REQUEST;
        return send_text(r, status, "text/plain", consumer_error_text(check));
    }
    ngx_str_t groups = ngx_null_string;
    if (lcf->groups != nullptr && ngx_http_complex_value(r, lcf->groups, &groups) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    std::string error;
    std::vector<std::string> ids = consumer_ids(
        std::move(consumer_id), std::string_view(reinterpret_cast<char *>(groups.data), groups.len),
        lcf->groups_decode, error);
    if (ids.empty()) {
        return send_text(r, NGX_HTTP_BAD_REQUEST, "text/plain", pool_copy(r, error));
    }

    // Two resume points: which one the client meant is a guess (nginx's variable takes the first).
    if (lcf->last_event_id_header.len > 0 && count_header(r, lcf->last_event_id_header) > 1) {
        return send_text(r, NGX_HTTP_BAD_REQUEST, "text/plain",
                         "more than one Last-Event-ID header in the request\n");
    }
    ngx_str_t last;
    if (ngx_http_complex_value(r, lcf->last_event_id, &last) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    int64_t last_position = -1;
    if (last.len > 0) {
        auto parsed =
            parse_last_event_id(std::string_view(reinterpret_cast<char *>(last.data), last.len));
        if (!parsed) {
            return send_text(r, NGX_HTTP_BAD_REQUEST, "text/plain",
                             "Last-Event-ID must be a non-negative integer\n");
        }
        last_position = *parsed;
    }
    bool folded = false;
    if (lcf->folded != nullptr) {
        ngx_str_t choice;
        if (ngx_http_complex_value(r, lcf->folded, &choice) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        auto parsed = parse_folded_choice(
            std::string_view(reinterpret_cast<char *>(choice.data), choice.len));
        if (!parsed) {
            return send_text(r, NGX_HTTP_BAD_REQUEST, "text/plain",
                             "the folded replay choice must be on or off (1, yes, true; 0, no, "
                             "false; empty is off)\n");
        }
        folded = *parsed;
    }

    Worker *worker = current_worker();
    if (worker == nullptr) {
        return send_text(r, NGX_HTTP_SERVICE_UNAVAILABLE, "text/plain",
                         "event_piper is not running in this process\n");
    }
    if (worker->shutting_down()) {
        // A request that reached a worker in its graceful shutdown: an empty stream with a
        // reconnect hint. A non-200 answer would make EventSource give up for good.
        if (!add_header(r, "Cache-Control", "no-cache") ||
            !add_header(r, "X-Accel-Buffering", "no")) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        r->keepalive = 0;
        std::string hint;
        append_retry_frame(hint, lcf->end_retry());
        return send_text(r, NGX_HTTP_OK, "text/event-stream", pool_copy(r, hint));
    }

    r->headers_out.status = NGX_HTTP_OK;
    ngx_str_set(&r->headers_out.content_type, "text/event-stream");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    ngx_http_clear_content_length(r);
    ngx_http_clear_accept_ranges(r);
    ngx_http_clear_last_modified(r);
    if (!add_header(r, "Cache-Control", "no-cache") || !add_header(r, "X-Accel-Buffering", "no")) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    if (r->method == NGX_HTTP_HEAD) {
        r->header_only = 1;
        return ngx_http_send_header(r);
    }

    // Owned by the request pool: the cleanup handler runs the destructor.
    void *mem = ngx_palloc(r->pool, sizeof(HttpStream));
    ngx_http_cleanup_t *cln = ngx_http_cleanup_add(r, 0);
    if (mem == nullptr || cln == nullptr) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    auto *s = new (mem) HttpStream(worker->hub(), r, *lcf, std::move(ids), last_position, folded);
    cln->handler = HttpStream::cleanup_handler;
    cln->data = s;
    ngx_http_set_ctx(r, s, ngx_event_piper_module);

    // nginx sets TCP_NODELAY only on keep-alive connections; a stream that never ends would
    // otherwise hold each small event until the client's delayed ACK (tens of milliseconds).
    auto *clcf = static_cast<ngx_http_core_loc_conf_t *>(
        ngx_http_get_module_loc_conf(r, ngx_http_core_module));
    bool http2 = false;
#if (NGX_HTTP_V2)
    http2 = r->stream != nullptr;
#endif
    if (clcf->tcp_nodelay && !http2 && ngx_tcp_nodelay(r->connection) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_http_send_header(r);
    if (rc == NGX_ERROR || rc > NGX_OK) {
        return rc;
    }
    // Headers go out now, not with the first event: clients see the 200 at once.
    rc = ngx_http_send_special(r, NGX_HTTP_FLUSH);
    if (rc == NGX_ERROR) {
        return rc;
    }
    r->read_event_handler = ngx_http_test_reading; // notices the client going away
    r->write_event_handler = HttpStream::write_handler;
    r->main->count++;
    s->start();
    return NGX_DONE;
}

} // namespace

ngx_int_t stream_handler(ngx_http_request_t *r) noexcept {
    try {
        return open_stream(r);
    } catch (const std::exception &e) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0, "event_piper: cannot open stream: %s",
                      e.what());
    } catch (...) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0, "event_piper: cannot open stream");
    }
    return NGX_HTTP_INTERNAL_SERVER_ERROR;
}

// The original's /manage/health: UP while this instance delivers what commits; DOWN with a
// one-line reason when it cannot (see Health). With event_piper_listener shared, the figures are
// those of the worker holding the listener (its slot, published once a second); with
// per_worker, this worker's.
static HealthInput health_input(const Worker &worker, const MainConf &mcf) {
    HealthInput in;
    if (!worker.shared_listener()) {
        in.listener = worker.listening() ? Health::Up : Health::ListenerDown;
        in.channel_mismatch = worker.listener().channel_mismatch();
        in.unpositioned_rows = static_cast<uint64_t>(worker.listener().unpositioned_rows());
        return in;
    }
    InstanceListener il = instance_listener(mcf.status_zone, worker.role_stale_ms());
    switch (il.state) {
    case InstanceListener::State::Listening:
        in.listener = Health::Up;
        break;
    case InstanceListener::State::NotConnected:
        in.listener = Health::ListenerDown;
        break;
    case InstanceListener::State::NoHolder:
        in.listener = Health::NoHolder;
        break;
    case InstanceListener::State::HolderFrozen:
        in.listener = Health::HolderFrozen;
        break;
    }
    if (il.holder_slot != nullptr) {
        WorkerStats holder;
        il.holder_slot->stats.load(holder);
        in.channel_mismatch = holder.channel_mismatch != 0;
        in.unpositioned_rows = holder.unpositioned_rows;
    }
    return in;
}

ngx_int_t health_handler(ngx_http_request_t *r) noexcept {
    try {
        ngx_int_t rc = accept_method(r, "method not allowed: use GET\n");
        if (rc != NGX_DECLINED) {
            return rc;
        }
        Worker *worker = current_worker();
        auto *mcf =
            static_cast<MainConf *>(ngx_http_get_module_main_conf(r, ngx_event_piper_module));
        Health health =
            worker == nullptr ? Health::ListenerDown : decide_health(health_input(*worker, *mcf));
        return send_text(r, health == Health::Up ? NGX_HTTP_OK : NGX_HTTP_SERVICE_UNAVAILABLE,
                         "application/json", health_body(health));
    } catch (...) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0, "event_piper: health failed");
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
}

// Instance-wide figures from every live worker's slot: JSON (also ?format=json or an empty
// ?format=), or Prometheus text with ?format=prometheus (any case); another format is a 400.
ngx_int_t status_handler(ngx_http_request_t *r) noexcept {
    try {
        ngx_int_t rc = accept_method(r, "method not allowed: use GET\n");
        if (rc != NGX_DECLINED) {
            return rc;
        }
        ngx_str_t format;
        bool prometheus = false;
        if (ngx_http_arg(r, reinterpret_cast<u_char *>(const_cast<char *>("format")), 6, &format) ==
                NGX_OK &&
            format.len > 0) {
            prometheus =
                format.len == 10 && ngx_strncasecmp(format.data, (u_char *)"prometheus", 10) == 0;
            if (!prometheus &&
                !(format.len == 4 && ngx_strncasecmp(format.data, (u_char *)"json", 4) == 0)) {
                return send_text(r, NGX_HTTP_BAD_REQUEST, "text/plain",
                                 "unknown format: use ?format=json or ?format=prometheus\n");
            }
        }
        auto *mcf =
            static_cast<MainConf *>(ngx_http_get_module_main_conf(r, ngx_event_piper_module));
        std::vector<WorkerStats> workers = read_status_zone(mcf->status_zone);
        const ngx_time_t *tp = ngx_timeofday();
        uint64_t now_ms = static_cast<uint64_t>(tp->sec) * 1000 + tp->msec;
        std::string body = prometheus ? render_status_prometheus(workers, now_ms)
                                      : render_status_json(workers, now_ms);
        r->headers_out.last_modified_time = -1;
        return send_text(r, NGX_HTTP_OK,
                         prometheus ? "text/plain; version=0.0.4" : "application/json",
                         pool_copy(r, body));
    } catch (const std::exception &e) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0, "event_piper: status failed: %s",
                      e.what());
    } catch (...) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0, "event_piper: status failed");
    }
    return NGX_HTTP_INTERNAL_SERVER_ERROR;
}

} // namespace event_piper
