// ngx_event_piper: streams rows inserted into a PostgreSQL `events` table to the consumers they
// are addressed to, as Server-Sent Events. This file is the nginx glue: directives, configuration,
// process hooks and the content handlers. The delivery logic lives in src/.
extern "C" {
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
}

#include "src/ngx_worker.hpp"
#include "src/request_check.hpp"

#include <libpq-fe.h>

#include <cerrno>
#include <csignal>
#include <new>
#include <string>
#include <vector>

using event_piper::LocConf;
using event_piper::MainConf;
using event_piper::Session;

namespace {

// ---------------------------------------------------------------------------------------------
// Configuration

void *create_main_conf(ngx_conf_t *cf) noexcept {
    auto *mcf = static_cast<MainConf *>(ngx_pcalloc(cf->pool, sizeof(MainConf)));
    if (mcf == nullptr) {
        return nullptr;
    }
    mcf->replay_connections = NGX_CONF_UNSET_UINT;
    mcf->used = NGX_CONF_UNSET;
    return mcf;
}

char *init_main_conf(ngx_conf_t *, void *conf) noexcept {
    auto *mcf = static_cast<MainConf *>(conf);
    if (mcf->channel.len == 0) {
        ngx_str_set(&mcf->channel, "new_events");
    }
    ngx_conf_init_uint_value(mcf->replay_connections, 2);
    ngx_conf_init_value(mcf->used, 0);
    return NGX_CONF_OK;
}

void *create_loc_conf(ngx_conf_t *cf) noexcept {
    auto *lcf = static_cast<LocConf *>(ngx_pcalloc(cf->pool, sizeof(LocConf)));
    if (lcf == nullptr) {
        return nullptr;
    }
    lcf->consumer = static_cast<ngx_http_complex_value_t *>(NGX_CONF_UNSET_PTR);
    lcf->last_event_id = static_cast<ngx_http_complex_value_t *>(NGX_CONF_UNSET_PTR);
    lcf->heartbeat = NGX_CONF_UNSET_MSEC;
    lcf->retry = NGX_CONF_UNSET_MSEC;
    lcf->replay_batch = NGX_CONF_UNSET_UINT;
    lcf->stream_buffer = NGX_CONF_UNSET_SIZE;
    return lcf;
}

ngx_http_complex_value_t *compile_default(ngx_conf_t *cf, const char *text) {
    auto *cv = static_cast<ngx_http_complex_value_t *>(
        ngx_pcalloc(cf->pool, sizeof(ngx_http_complex_value_t)));
    if (cv == nullptr) {
        return nullptr;
    }
    ngx_str_t value;
    value.data = reinterpret_cast<u_char *>(const_cast<char *>(text));
    value.len = ngx_strlen(text);
    ngx_http_compile_complex_value_t ccv;
    ngx_memzero(&ccv, sizeof(ccv));
    ccv.cf = cf;
    ccv.value = &value;
    ccv.complex_value = cv;
    return ngx_http_compile_complex_value(&ccv) == NGX_OK ? cv : nullptr;
}

char *merge_loc_conf(ngx_conf_t *cf, void *parent, void *child) noexcept {
    auto *prev = static_cast<LocConf *>(parent);
    auto *conf = static_cast<LocConf *>(child);
    ngx_conf_merge_ptr_value(conf->consumer, prev->consumer, nullptr);
    ngx_conf_merge_ptr_value(conf->last_event_id, prev->last_event_id, nullptr);
    if (conf->consumer == nullptr) {
        conf->consumer = compile_default(cf, "$http_x_consumer_id");
    }
    if (conf->last_event_id == nullptr) {
        conf->last_event_id = compile_default(cf, "$http_last_event_id");
    }
    if (conf->consumer == nullptr || conf->last_event_id == nullptr) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    ngx_conf_merge_msec_value(conf->heartbeat, prev->heartbeat, 10000);
    ngx_conf_merge_msec_value(conf->retry, prev->retry, 0);
    ngx_conf_merge_uint_value(conf->replay_batch, prev->replay_batch, 500);
    ngx_conf_merge_size_value(conf->stream_buffer, prev->stream_buffer, 256 * 1024);
    return NGX_CONF_OK;
}

// `event_piper_postgres "<conninfo>";`: checked by libpq's own parser at `nginx -t`.
char *set_postgres(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) noexcept {
    auto *mcf = static_cast<MainConf *>(conf);
    if (mcf->conninfo.data != nullptr) {
        return const_cast<char *>("is duplicate");
    }
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    std::string conninfo(reinterpret_cast<char *>(args[1].data), args[1].len);
    char *err = nullptr;
    PQconninfoOption *opts = PQconninfoParse(conninfo.c_str(), &err);
    if (opts == nullptr) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "invalid connection string \"%V\" in \"%V\": %s",
                           &args[1], &cmd->name, err ? err : "out of memory");
        if (err != nullptr) {
            PQfreemem(err);
        }
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    PQconninfoFree(opts);
    mcf->conninfo = args[1];
    return NGX_CONF_OK;
}

// `event_piper_channel <name>;`: a plain SQL identifier, as LISTEN needs.
char *set_channel(ngx_conf_t *cf, ngx_command_t *, void *conf) noexcept {
    auto *mcf = static_cast<MainConf *>(conf);
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    ngx_str_t name = args[1];
    bool ok = name.len > 0 && name.len <= 63 && !(name.data[0] >= '0' && name.data[0] <= '9');
    for (size_t i = 0; ok && i < name.len; ++i) {
        u_char ch = name.data[i];
        ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
             ch == '_';
    }
    if (!ok) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid channel name \"%V\" in \"event_piper_channel\": use letters, "
                           "digits and '_', at most 63 characters, not starting with a digit",
                           &name);
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    mcf->channel = name;
    return NGX_CONF_OK;
}

ngx_int_t stream_handler(ngx_http_request_t *r) noexcept;
ngx_int_t health_handler(ngx_http_request_t *r) noexcept;
ngx_int_t status_handler(ngx_http_request_t *r) noexcept;

char *set_event_piper(ngx_conf_t *cf, ngx_command_t *, void *) noexcept {
    auto *clcf = static_cast<ngx_http_core_loc_conf_t *>(
        ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module));
    clcf->handler = stream_handler;
    auto *mcf =
        static_cast<MainConf *>(ngx_http_conf_get_module_main_conf(cf, ngx_event_piper_module));
    mcf->used = 1;
    return NGX_CONF_OK;
}

char *set_health(ngx_conf_t *cf, ngx_command_t *, void *) noexcept {
    auto *clcf = static_cast<ngx_http_core_loc_conf_t *>(
        ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module));
    clcf->handler = health_handler;
    auto *mcf =
        static_cast<MainConf *>(ngx_http_conf_get_module_main_conf(cf, ngx_event_piper_module));
    mcf->used = 1;
    return NGX_CONF_OK;
}

char *set_status(ngx_conf_t *cf, ngx_command_t *, void *) noexcept {
    auto *clcf = static_cast<ngx_http_core_loc_conf_t *>(
        ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module));
    clcf->handler = status_handler;
    return NGX_CONF_OK;
}

// `event_piper_heartbeat <time> | off;`
char *set_heartbeat(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) noexcept {
    auto *lcf = static_cast<LocConf *>(conf);
    if (lcf->heartbeat != NGX_CONF_UNSET_MSEC) {
        return const_cast<char *>("is duplicate");
    }
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    if (args[1].len == 3 && ngx_strncmp(args[1].data, "off", 3) == 0) {
        lcf->heartbeat = 0;
        return NGX_CONF_OK;
    }
    ngx_int_t ms = ngx_parse_time(&args[1], 0);
    if (ms == NGX_ERROR || ms <= 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid value \"%V\" in \"%V\": a positive time (\"10s\") or \"off\"",
                           &args[1], &cmd->name);
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    lcf->heartbeat = static_cast<ngx_msec_t>(ms);
    return NGX_CONF_OK;
}

// Numeric directives, parsed here rather than with nginx's slots so that the message names the
// directive, the bad value and what is expected.
struct NumberRange {
    ngx_int_t min;
    ngx_int_t max;
};
NumberRange batch_range = {1, 100000};
NumberRange connections_range = {1, 64};

char *invalid_value(ngx_conf_t *cf, ngx_command_t *cmd, const char *expected) {
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "invalid value \"%V\" in \"%V\": %s", &args[1],
                       &cmd->name, expected);
    return static_cast<char *>(NGX_CONF_ERROR);
}

char *set_number(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) noexcept {
    auto *field = reinterpret_cast<ngx_uint_t *>(static_cast<char *>(conf) + cmd->offset);
    if (*field != NGX_CONF_UNSET_UINT) {
        return const_cast<char *>("is duplicate");
    }
    auto *range = static_cast<NumberRange *>(cmd->post);
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    ngx_int_t n = ngx_atoi(args[1].data, args[1].len);
    if (n == NGX_ERROR || n < range->min || n > range->max) {
        char expected[64];
        ngx_snprintf(reinterpret_cast<u_char *>(expected), sizeof expected,
                     "a whole number from %i to %i%Z", range->min, range->max);
        return invalid_value(cf, cmd, expected);
    }
    *field = static_cast<ngx_uint_t>(n);
    return NGX_CONF_OK;
}

char *set_stream_buffer(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) noexcept {
    auto *lcf = static_cast<LocConf *>(conf);
    if (lcf->stream_buffer != NGX_CONF_UNSET_SIZE) {
        return const_cast<char *>("is duplicate");
    }
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    ssize_t size = ngx_parse_size(&args[1]);
    if (size == NGX_ERROR || size < 4096) {
        return invalid_value(cf, cmd, "a size of at least 4k (\"256k\", \"1m\")");
    }
    lcf->stream_buffer = static_cast<size_t>(size);
    return NGX_CONF_OK;
}

char *set_retry(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) noexcept {
    auto *lcf = static_cast<LocConf *>(conf);
    if (lcf->retry != NGX_CONF_UNSET_MSEC) {
        return const_cast<char *>("is duplicate");
    }
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    ngx_int_t ms = ngx_parse_time(&args[1], 0);
    if (ms == NGX_ERROR || ms <= 0) {
        return invalid_value(cf, cmd, "a positive time (\"2s\", \"500ms\")");
    }
    lcf->retry = static_cast<ngx_msec_t>(ms);
    return NGX_CONF_OK;
}

ngx_command_t commands[] = {
    {ngx_string("event_piper_postgres"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1, set_postgres,
     NGX_HTTP_MAIN_CONF_OFFSET, 0, nullptr},
    {ngx_string("event_piper_channel"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1, set_channel,
     NGX_HTTP_MAIN_CONF_OFFSET, 0, nullptr},
    {ngx_string("event_piper_replay_connections"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1, set_number,
     NGX_HTTP_MAIN_CONF_OFFSET, offsetof(MainConf, replay_connections), &connections_range},
    {ngx_string("event_piper"), NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS, set_event_piper,
     NGX_HTTP_LOC_CONF_OFFSET, 0, nullptr},
    {ngx_string("event_piper_health"), NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS, set_health,
     NGX_HTTP_LOC_CONF_OFFSET, 0, nullptr},
    {ngx_string("event_piper_status"), NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS, set_status,
     NGX_HTTP_LOC_CONF_OFFSET, 0, nullptr},
    {ngx_string("event_piper_consumer"),
     NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1,
     ngx_http_set_complex_value_slot, NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, consumer),
     nullptr},
    {ngx_string("event_piper_last_event_id"),
     NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1,
     ngx_http_set_complex_value_slot, NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, last_event_id),
     nullptr},
    {ngx_string("event_piper_heartbeat"),
     NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, set_heartbeat,
     NGX_HTTP_LOC_CONF_OFFSET, 0, nullptr},
    {ngx_string("event_piper_retry"),
     NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, set_retry,
     NGX_HTTP_LOC_CONF_OFFSET, 0, nullptr},
    {ngx_string("event_piper_replay_batch"),
     NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, set_number,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, replay_batch), &batch_range},
    {ngx_string("event_piper_stream_buffer"),
     NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, set_stream_buffer,
     NGX_HTTP_LOC_CONF_OFFSET, 0, nullptr},
    ngx_null_command,
};

// The status zone survives reloads: old and new workers publish side by side.
ngx_int_t init_status_zone(ngx_shm_zone_t *zone, void *data) noexcept {
    if (data != nullptr) {
        zone->data = data;
        return NGX_OK;
    }
    auto *shpool = reinterpret_cast<ngx_slab_pool_t *>(zone->shm.addr);
    if (zone->shm.exists) {
        zone->data = shpool->data;
        return NGX_OK;
    }
    void *slots = ngx_slab_calloc(shpool, sizeof(event_piper::StatusZone));
    if (slots == nullptr) {
        return NGX_ERROR;
    }
    shpool->data = slots;
    zone->data = slots;
    return NGX_OK;
}

// `event_piper;` somewhere but no `event_piper_postgres`: refuse the configuration.
ngx_int_t postconfiguration(ngx_conf_t *cf) noexcept {
    auto *mcf =
        static_cast<MainConf *>(ngx_http_conf_get_module_main_conf(cf, ngx_event_piper_module));
    if (mcf->used == 1 && mcf->conninfo.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"event_piper\" and \"event_piper_health\" need "
                           "\"event_piper_postgres\" in the http block");
        return NGX_ERROR;
    }
    ngx_str_t name = ngx_string("event_piper_status");
    mcf->status_zone = ngx_shared_memory_add(
        cf, &name, 8 * ngx_pagesize + sizeof(event_piper::StatusZone), &ngx_event_piper_module);
    if (mcf->status_zone == nullptr) {
        return NGX_ERROR;
    }
    mcf->status_zone->init = init_status_zone;
    return NGX_OK;
}

ngx_http_module_t module_ctx = {
    nullptr,           // preconfiguration
    postconfiguration, // postconfiguration
    create_main_conf,  // create main configuration
    init_main_conf,    // init main configuration
    nullptr,           // create server configuration
    nullptr,           // merge server configuration
    create_loc_conf,   // create location configuration
    merge_loc_conf,    // merge location configuration
};

// ---------------------------------------------------------------------------------------------
// Process hooks

ngx_int_t init_process(ngx_cycle_t *cycle) noexcept {
    if (ngx_process != NGX_PROCESS_WORKER && ngx_process != NGX_PROCESS_SINGLE) {
        return NGX_OK;
    }
    auto *mcf =
        static_cast<MainConf *>(ngx_http_cycle_get_module_main_conf(cycle, ngx_event_piper_module));
    if (mcf == nullptr || mcf->used != 1) {
        return NGX_OK;
    }
    try {
        event_piper::create_worker(cycle, *mcf);
    } catch (const std::exception &e) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0, "event_piper: worker start failed: %s",
                      e.what());
        return NGX_ERROR;
    }
    return NGX_OK;
}

void exit_process(ngx_cycle_t *) noexcept {
    event_piper::destroy_worker();
}

// ---------------------------------------------------------------------------------------------
// Content handlers

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

ngx_int_t open_stream(ngx_http_request_t *r) {
    // Read and drop any body first, so that an error answer leaves the connection usable.
    if (ngx_http_discard_request_body(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    if (!(r->method & (NGX_HTTP_GET | NGX_HTTP_HEAD))) {
        if (!add_header(r, "Allow", "GET, HEAD")) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        return send_text(r, NGX_HTTP_NOT_ALLOWED, "text/plain",
                         "method not allowed: open the event stream with GET\n");
    }
    auto *lcf = static_cast<LocConf *>(ngx_http_get_module_loc_conf(r, ngx_event_piper_module));

    ngx_str_t consumer;
    if (ngx_http_complex_value(r, lcf->consumer, &consumer) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    std::string_view consumer_view(reinterpret_cast<char *>(consumer.data), consumer.len);
    event_piper::ConsumerCheck check = event_piper::check_consumer(consumer_view);
    if (check != event_piper::ConsumerCheck::Ok) {
        ngx_uint_t status = check == event_piper::ConsumerCheck::Missing ? NGX_HTTP_UNAUTHORIZED
                                                                         : NGX_HTTP_BAD_REQUEST;
        return send_text(r, status, "text/plain", event_piper::consumer_error_text(check));
    }

    ngx_str_t last;
    if (ngx_http_complex_value(r, lcf->last_event_id, &last) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    int64_t last_position = -1;
    if (last.len > 0) {
        auto parsed = event_piper::parse_last_event_id(
            std::string_view(reinterpret_cast<char *>(last.data), last.len));
        if (!parsed) {
            return send_text(r, NGX_HTTP_BAD_REQUEST, "text/plain",
                             "Last-Event-ID must be a non-negative integer\n");
        }
        last_position = *parsed;
    }

    event_piper::Worker *worker = event_piper::current_worker();
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
        return send_text(r, NGX_HTTP_OK, "text/event-stream", "retry: 1000\n\n");
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

    // A live-only stream starts at the newest position this worker knows; if it knows none yet,
    // the stream takes the listener's first reading (see Stream::on_listener_ready).
    bool live_now = false;
    if (last_position < 0 && worker->head() >= 0) {
        last_position = worker->head();
        live_now = worker->listening();
    }

    void *mem = ngx_palloc(r->pool, sizeof(Session));
    ngx_http_cleanup_t *cln = ngx_http_cleanup_add(r, 0);
    if (mem == nullptr || cln == nullptr) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    auto *s = new (mem) Session(*worker, r, *lcf, std::string(consumer_view), last_position);
    cln->handler = Session::cleanup_handler;
    cln->data = s;
    ngx_http_set_ctx(r, s, ngx_event_piper_module);
    if (live_now) {
        s->core.go_live();
    } else if (last_position < 0) {
        worker->note_unpositioned_stream();
    }

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

    ngx_int_t rc = ngx_http_send_header(r);
    if (rc == NGX_ERROR || rc > NGX_OK) {
        return rc;
    }
    // Headers go out now, not with the first event: clients see the 200 at once.
    rc = ngx_http_send_special(r, NGX_HTTP_FLUSH);
    if (rc == NGX_ERROR) {
        return rc;
    }
    r->read_event_handler = ngx_http_test_reading; // notices the client going away
    r->write_event_handler = Session::write_handler;
    r->main->count++;
    s->start();
    return NGX_DONE;
}

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

// The original's /manage/health: UP while this worker's listener is connected.
ngx_int_t health_handler(ngx_http_request_t *r) noexcept {
    if (!(r->method & (NGX_HTTP_GET | NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }
    if (ngx_http_discard_request_body(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    event_piper::Worker *worker = event_piper::current_worker();
    if (worker != nullptr && worker->listening()) {
        return send_text(r, NGX_HTTP_OK, "application/json", event_piper::health_body(true));
    }
    return send_text(r, NGX_HTTP_SERVICE_UNAVAILABLE, "application/json",
                     event_piper::health_body(false));
}

// Instance-wide figures from every live worker's slot; JSON, or Prometheus text with
// ?format=prometheus.
ngx_int_t status_handler(ngx_http_request_t *r) noexcept {
    if (!(r->method & (NGX_HTTP_GET | NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }
    if (ngx_http_discard_request_body(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    try {
        auto *mcf =
            static_cast<MainConf *>(ngx_http_get_module_main_conf(r, ngx_event_piper_module));
        std::vector<event_piper::WorkerStats> workers;
        if (mcf->status_zone != nullptr && mcf->status_zone->data != nullptr) {
            auto *zone = static_cast<event_piper::StatusZone *>(mcf->status_zone->data);
            for (const auto &slot : zone->slots) {
                ngx_atomic_uint_t owner = slot.owner;
                if (owner != 0 && !(kill(static_cast<pid_t>(owner), 0) == -1 && errno == ESRCH)) {
                    workers.push_back(slot.stats);
                    workers.back().pid = static_cast<int64_t>(owner);
                }
            }
        }
        const ngx_time_t *tp = ngx_timeofday();
        uint64_t now_ms = static_cast<uint64_t>(tp->sec) * 1000 + tp->msec;
        ngx_str_t format;
        bool prometheus = ngx_http_arg(r, reinterpret_cast<u_char *>(const_cast<char *>("format")),
                                       6, &format) == NGX_OK &&
                          format.len == 10 && ngx_strncmp(format.data, "prometheus", 10) == 0;
        std::string body = prometheus ? event_piper::render_status_prometheus(workers, now_ms)
                                      : event_piper::render_status_json(workers, now_ms);
        auto *copy = static_cast<u_char *>(ngx_pnalloc(r->pool, body.size()));
        if (copy == nullptr) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        ngx_memcpy(copy, body.data(), body.size());
        r->headers_out.last_modified_time = -1;
        return send_text(r, NGX_HTTP_OK,
                         prometheus ? "text/plain; version=0.0.4" : "application/json",
                         std::string_view(reinterpret_cast<char *>(copy), body.size()));
    } catch (const std::exception &e) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0, "event_piper: status failed: %s",
                      e.what());
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
}

} // namespace

extern "C" {
ngx_module_t ngx_event_piper_module = {
    NGX_MODULE_V1,
    &module_ctx,     // module context
    commands,        // module directives
    NGX_HTTP_MODULE, // module type
    nullptr,         // init master
    nullptr,         // init module
    init_process,    // init process
    nullptr,         // init thread
    nullptr,         // exit thread
    exit_process,    // exit process
    nullptr,         // exit master
    NGX_MODULE_V1_PADDING,
};
}
