// ngx_event_piper: streams rows inserted into a PostgreSQL `events` table to the consumers they
// are addressed to, as Server-Sent Events. This file is the nginx glue: directives, configuration,
// process hooks and the content handlers. The delivery logic lives in src/.
extern "C" {
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
}

#include "core/request_check.hpp"
#include "ngx/ngx_http_stream.hpp"
#include "ngx/ngx_status_zone.hpp"
#include "ngx/ngx_worker.hpp"

#include <libpq-fe.h>

#include <new>
#include <string>
#include <vector>

using event_piper::HttpStream;
using event_piper::LocConf;
using event_piper::MainConf;

namespace {

// ---------------------------------------------------------------------------------------------
// Configuration

void *create_main_conf(ngx_conf_t *cf) noexcept {
    auto *mcf = static_cast<MainConf *>(ngx_pcalloc(cf->pool, sizeof(MainConf)));
    if (mcf == nullptr) {
        return nullptr;
    }
    mcf->replay_connections = NGX_CONF_UNSET_UINT;
    mcf->listener_timeout = NGX_CONF_UNSET_MSEC;
    mcf->replay_memory = NGX_CONF_UNSET_SIZE;
    mcf->listener_shared = NGX_CONF_UNSET_UINT;
    mcf->relay_buffer = NGX_CONF_UNSET_SIZE;
    mcf->used = NGX_CONF_UNSET;
    return mcf;
}

char *init_main_conf(ngx_conf_t *, void *conf) noexcept {
    auto *mcf = static_cast<MainConf *>(conf);
    if (mcf->channel.len == 0) {
        ngx_str_set(&mcf->channel, "new_events");
    }
    ngx_conf_init_uint_value(mcf->replay_connections, 2);
    ngx_conf_init_msec_value(mcf->listener_timeout, 60000);
    ngx_conf_init_size_value(mcf->replay_memory, 64 * 1024 * 1024);
    ngx_conf_init_uint_value(mcf->listener_shared, 1);
    ngx_conf_init_size_value(mcf->relay_buffer, 4 * 1024 * 1024);
    ngx_conf_init_value(mcf->used, 0);
    return NGX_CONF_OK;
}

void *create_loc_conf(ngx_conf_t *cf) noexcept {
    auto *lcf = static_cast<LocConf *>(ngx_pcalloc(cf->pool, sizeof(LocConf)));
    if (lcf == nullptr) {
        return nullptr;
    }
    lcf->consumer = static_cast<ngx_http_complex_value_t *>(NGX_CONF_UNSET_PTR);
    lcf->consumer_decode = NGX_CONF_UNSET;
    lcf->groups = static_cast<ngx_http_complex_value_t *>(NGX_CONF_UNSET_PTR);
    lcf->groups_decode = NGX_CONF_UNSET;
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
    if (conf->consumer == NGX_CONF_UNSET_PTR) {
        conf->consumer = prev->consumer;
        conf->consumer_header = prev->consumer_header;
        conf->consumer_decode = prev->consumer_decode;
    }
    ngx_conf_merge_ptr_value(conf->last_event_id, prev->last_event_id, nullptr);
    if (conf->consumer == NGX_CONF_UNSET_PTR || conf->consumer == nullptr) {
        conf->consumer = compile_default(cf, "$http_x_consumer_id");
        ngx_str_set(&conf->consumer_header, "x_consumer_id");
        conf->consumer_decode = 0;
    }
    ngx_conf_merge_value(conf->consumer_decode, prev->consumer_decode, 0);
    if (conf->groups == NGX_CONF_UNSET_PTR) {
        conf->groups = prev->groups == NGX_CONF_UNSET_PTR ? nullptr : prev->groups;
        conf->groups_header = prev->groups_header;
        conf->groups_decode = prev->groups_decode;
    }
    ngx_conf_merge_value(conf->groups_decode, prev->groups_decode, 0);
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

// An id value: `<value> [urldecode]`, compiled; `header` names the request header the value is,
// when it is exactly one `$http_...` variable (that header must then appear at most once).
char *compile_id_value(ngx_conf_t *cf, ngx_command_t *cmd, ngx_http_complex_value_t **value,
                       ngx_str_t *header, ngx_flag_t *decode) {
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    *decode = 0;
    if (cf->args->nelts == 3) {
        if (args[2].len != 9 || ngx_strncmp(args[2].data, "urldecode", 9) != 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\" in \"%V\": the only parameter is "
                               "\"urldecode\"",
                               &args[2], &cmd->name);
            return static_cast<char *>(NGX_CONF_ERROR);
        }
        *decode = 1;
    }
    auto *cv = static_cast<ngx_http_complex_value_t *>(
        ngx_pcalloc(cf->pool, sizeof(ngx_http_complex_value_t)));
    if (cv == nullptr) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    ngx_http_compile_complex_value_t ccv;
    ngx_memzero(&ccv, sizeof(ccv));
    ccv.cf = cf;
    ccv.value = &args[1];
    ccv.complex_value = cv;
    if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    *value = cv;
    std::string_view name = event_piper::header_of_variable(
        std::string_view(reinterpret_cast<char *>(args[1].data), args[1].len));
    header->data = reinterpret_cast<u_char *>(const_cast<char *>(name.data()));
    header->len = name.size();
    return NGX_CONF_OK;
}

// `event_piper_consumer <value> [urldecode];`
char *set_consumer(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) noexcept {
    auto *lcf = static_cast<LocConf *>(conf);
    if (lcf->consumer != NGX_CONF_UNSET_PTR) {
        return const_cast<char *>("is duplicate");
    }
    return compile_id_value(cf, cmd, &lcf->consumer, &lcf->consumer_header, &lcf->consumer_decode);
}

// `event_piper_consumer_groups <value> [urldecode];`: more ids, comma-separated.
char *set_groups(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) noexcept {
    auto *lcf = static_cast<LocConf *>(conf);
    if (lcf->groups != NGX_CONF_UNSET_PTR) {
        return const_cast<char *>("is duplicate");
    }
    return compile_id_value(cf, cmd, &lcf->groups, &lcf->groups_header, &lcf->groups_decode);
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

// Sizes and times: at least `min`, with an example of a good value in the message.
struct Minimum {
    ngx_int_t min;
    const char *expected;
};
Minimum stream_buffer_min = {4096, "a size of at least 4k (\"256k\", \"1m\")"};
Minimum replay_memory_min = {1024 * 1024, "a size of at least 1m (\"64m\", \"1g\")"};
Minimum listener_timeout_min = {3000, "a time of at least 3s (\"60s\", \"2m\")"};
Minimum retry_min = {1, "a positive time (\"2s\", \"500ms\")"};
Minimum relay_buffer_min = {64 * 1024, "a size of at least 64k (\"4m\", \"16m\")"};

ngx_conf_enum_t listener_modes[] = {
    {ngx_string("shared"), 1},
    {ngx_string("per_worker"), 0},
    {ngx_null_string, 0},
};

char *set_size(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) noexcept {
    auto *field = reinterpret_cast<size_t *>(static_cast<char *>(conf) + cmd->offset);
    if (*field != NGX_CONF_UNSET_SIZE) {
        return const_cast<char *>("is duplicate");
    }
    auto *minimum = static_cast<Minimum *>(cmd->post);
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    ssize_t size = ngx_parse_size(&args[1]);
    if (size == NGX_ERROR || size < minimum->min) {
        return invalid_value(cf, cmd, minimum->expected);
    }
    *field = static_cast<size_t>(size);
    return NGX_CONF_OK;
}

char *set_time(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) noexcept {
    auto *field = reinterpret_cast<ngx_msec_t *>(static_cast<char *>(conf) + cmd->offset);
    if (*field != NGX_CONF_UNSET_MSEC) {
        return const_cast<char *>("is duplicate");
    }
    auto *minimum = static_cast<Minimum *>(cmd->post);
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    ngx_int_t ms = ngx_parse_time(&args[1], 0);
    if (ms == NGX_ERROR || ms < minimum->min) {
        return invalid_value(cf, cmd, minimum->expected);
    }
    *field = static_cast<ngx_msec_t>(ms);
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
    {ngx_string("event_piper_replay_memory"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1, set_size,
     NGX_HTTP_MAIN_CONF_OFFSET, offsetof(MainConf, replay_memory), &replay_memory_min},
    {ngx_string("event_piper_listener_timeout"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1, set_time,
     NGX_HTTP_MAIN_CONF_OFFSET, offsetof(MainConf, listener_timeout), &listener_timeout_min},
    {ngx_string("event_piper_listener"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
     ngx_conf_set_enum_slot, NGX_HTTP_MAIN_CONF_OFFSET, offsetof(MainConf, listener_shared),
     listener_modes},
    {ngx_string("event_piper_relay_buffer"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1, set_size,
     NGX_HTTP_MAIN_CONF_OFFSET, offsetof(MainConf, relay_buffer), &relay_buffer_min},
    {ngx_string("event_piper_consumer"),
     NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE12, set_consumer,
     NGX_HTTP_LOC_CONF_OFFSET, 0, nullptr},
    {ngx_string("event_piper_consumer_groups"),
     NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE12, set_groups,
     NGX_HTTP_LOC_CONF_OFFSET, 0, nullptr},
    {ngx_string("event_piper_last_event_id"),
     NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1,
     ngx_http_set_complex_value_slot, NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, last_event_id),
     nullptr},
    {ngx_string("event_piper_heartbeat"),
     NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, set_heartbeat,
     NGX_HTTP_LOC_CONF_OFFSET, 0, nullptr},
    {ngx_string("event_piper_retry"),
     NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, set_time,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, retry), &retry_min},
    {ngx_string("event_piper_replay_batch"),
     NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, set_number,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, replay_batch), &batch_range},
    {ngx_string("event_piper_stream_buffer"),
     NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, set_size,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, stream_buffer), &stream_buffer_min},
    ngx_null_command,
};

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
    mcf->status_zone = event_piper::add_status_zone(cf);
    return mcf->status_zone != nullptr ? NGX_OK : NGX_ERROR;
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

void exit_process(ngx_cycle_t *cycle) noexcept {
    try {
        event_piper::destroy_worker();
    } catch (...) {
        ngx_log_error(NGX_LOG_ERR, cycle->log, 0, "event_piper: worker teardown failed");
    }
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
            if (event_piper::header_matches_variable(
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
    std::string consumer_id(reinterpret_cast<char *>(consumer.data), consumer.len);
    if (lcf->consumer_decode) {
        auto decoded = event_piper::percent_decode(consumer_id);
        if (!decoded) {
            return send_text(r, NGX_HTTP_BAD_REQUEST, "text/plain",
                             "consumer id has a bad %-escape\n");
        }
        consumer_id = std::move(*decoded);
    }
    event_piper::ConsumerCheck check = event_piper::check_consumer(consumer_id);
    if (check != event_piper::ConsumerCheck::Ok) {
        ngx_uint_t status = check == event_piper::ConsumerCheck::Missing ? NGX_HTTP_UNAUTHORIZED
                                                                         : NGX_HTTP_BAD_REQUEST;
        return send_text(r, status, "text/plain", event_piper::consumer_error_text(check));
    }
    ngx_str_t groups = ngx_null_string;
    if (lcf->groups != nullptr && ngx_http_complex_value(r, lcf->groups, &groups) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    std::string error;
    std::vector<std::string> ids = event_piper::consumer_ids(
        std::move(consumer_id), std::string_view(reinterpret_cast<char *>(groups.data), groups.len),
        lcf->groups_decode, error);
    if (ids.empty()) {
        return send_text(r, NGX_HTTP_BAD_REQUEST, "text/plain", pool_copy(r, error));
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

    // Owned by the request pool: the cleanup handler runs the destructor.
    void *mem = ngx_palloc(r->pool, sizeof(HttpStream));
    ngx_http_cleanup_t *cln = ngx_http_cleanup_add(r, 0);
    if (mem == nullptr || cln == nullptr) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    auto *s = new (mem) HttpStream(worker->hub(), r, *lcf, std::move(ids), last_position);
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

// The original's /manage/health: UP while the listener is connected (the instance's, with
// event_piper_listener shared; this worker's with per_worker).
ngx_int_t health_handler(ngx_http_request_t *r) noexcept {
    try {
        ngx_int_t rc = accept_method(r, "method not allowed: use GET\n");
        if (rc != NGX_DECLINED) {
            return rc;
        }
        event_piper::Worker *worker = event_piper::current_worker();
        auto *mcf =
            static_cast<MainConf *>(ngx_http_get_module_main_conf(r, ngx_event_piper_module));
        bool up = worker != nullptr &&
                  (worker->shared_listener() ? event_piper::instance_listening(mcf->status_zone)
                                             : worker->listening());
        if (up) {
            return send_text(r, NGX_HTTP_OK, "application/json", event_piper::health_body(true));
        }
        return send_text(r, NGX_HTTP_SERVICE_UNAVAILABLE, "application/json",
                         event_piper::health_body(false));
    } catch (...) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0, "event_piper: health failed");
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
}

// Instance-wide figures from every live worker's slot; JSON, or Prometheus text with
// ?format=prometheus.
ngx_int_t status_handler(ngx_http_request_t *r) noexcept {
    try {
        ngx_int_t rc = accept_method(r, "method not allowed: use GET\n");
        if (rc != NGX_DECLINED) {
            return rc;
        }
        auto *mcf =
            static_cast<MainConf *>(ngx_http_get_module_main_conf(r, ngx_event_piper_module));
        std::vector<event_piper::WorkerStats> workers =
            event_piper::read_status_zone(mcf->status_zone);
        const ngx_time_t *tp = ngx_timeofday();
        uint64_t now_ms = static_cast<uint64_t>(tp->sec) * 1000 + tp->msec;
        ngx_str_t format;
        bool prometheus = ngx_http_arg(r, reinterpret_cast<u_char *>(const_cast<char *>("format")),
                                       6, &format) == NGX_OK &&
                          format.len == 10 && ngx_strncmp(format.data, "prometheus", 10) == 0;
        std::string body = prometheus ? event_piper::render_status_prometheus(workers, now_ms)
                                      : event_piper::render_status_json(workers, now_ms);
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
