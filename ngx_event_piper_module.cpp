// ngx_event_piper: streams rows inserted into a PostgreSQL `events` table to the consumers they
// are addressed to, as Server-Sent Events. This file is the nginx module: its directives, the
// module context and the process hooks. Configuration structures and their defaults are in
// src/ngx/ngx_conf, the content handlers in src/ngx/ngx_handlers, the delivery logic in src/core.
extern "C" {
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
}

#include "core/defaults.hpp"
#include "core/request_check.hpp"
#include "core/text.hpp"
#include "ngx/ngx_handlers.hpp"
#include "ngx/ngx_status_zone.hpp"
#include "ngx/ngx_worker.hpp"

#include <libpq-fe.h>

#include <new>
#include <string>
#include <vector>

using event_piper::create_loc_conf;
using event_piper::create_main_conf;
using event_piper::health_handler;
using event_piper::init_main_conf;
using event_piper::LocConf;
using event_piper::MainConf;
using event_piper::merge_loc_conf;
using event_piper::status_handler;
using event_piper::stream_handler;

namespace {

// ---------------------------------------------------------------------------------------------
// Directives

// `event_piper_postgres "<conninfo>";` and `event_piper_replay_postgres "<conninfo>";`:
// checked by libpq's own parser at `nginx -t`.
char *set_postgres(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) noexcept {
    auto *field = reinterpret_cast<ngx_str_t *>(static_cast<char *>(conf) + cmd->offset);
    if (field->data != nullptr) {
        return const_cast<char *>("is duplicate");
    }
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    char *err = nullptr;
    try {
        std::string conninfo(reinterpret_cast<char *>(args[1].data), args[1].len);
        PQconninfoOption *opts = PQconninfoParse(conninfo.c_str(), &err);
        if (opts == nullptr) {
            // The string itself is not repeated, nor what libpq quotes of it: it may hold a
            // password, and error logs are read by more people than nginx.conf.
            std::string why =
                event_piper::conninfo_error_for_log(err != nullptr ? err : "out of memory");
            if (err != nullptr) {
                PQfreemem(err);
                err = nullptr;
            }
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "invalid connection string in \"%V\": %s",
                               &cmd->name, why.c_str());
            return static_cast<char *>(NGX_CONF_ERROR);
        }
        PQconninfoFree(opts);
    } catch (...) {
        if (err != nullptr) {
            PQfreemem(err);
        }
        return const_cast<char *>("failed: out of memory");
    }
    *field = args[1];
    return NGX_CONF_OK;
}

// `event_piper_channel <name>;`: a plain SQL identifier, as LISTEN needs.
char *set_channel(ngx_conf_t *cf, ngx_command_t *, void *conf) noexcept {
    auto *mcf = static_cast<MainConf *>(conf);
    if (mcf->channel.data != nullptr) {
        return const_cast<char *>("is duplicate");
    }
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    ngx_str_t name = args[1];
    bool ok = name.len > 0 && name.len <= event_piper::max_channel_length &&
              !(name.data[0] >= '0' && name.data[0] <= '9');
    for (size_t i = 0; ok && i < name.len; ++i) {
        u_char ch = name.data[i];
        ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
             ch == '_';
    }
    if (!ok) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid channel name \"%V\" in \"event_piper_channel\": use letters, "
                           "digits and '_', at most %uz characters, not starting with a digit",
                           &name, event_piper::max_channel_length);
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

// The content handler of a location: one of `event_piper;`, `event_piper_health;`,
// `event_piper_status;`, once. A second one is refused in nginx's words for `root` after `alias`.
char *set_content_handler(ngx_conf_t *cf, ngx_command_t *cmd, void *conf,
                          ngx_http_handler_pt handler) {
    auto *lcf = static_cast<LocConf *>(conf);
    if (lcf->handler_directive != nullptr) {
        if (lcf->handler_directive == &cmd->name) {
            return const_cast<char *>("is duplicate");
        }
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" directive is duplicate, \"%V\" directive was specified earlier",
                           &cmd->name, lcf->handler_directive);
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    auto *clcf = static_cast<ngx_http_core_loc_conf_t *>(
        ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module));
    if (clcf->handler != nullptr) {
        // Another module's (proxy_pass, fastcgi_pass, ...); one set after this one is found
        // by merge_loc_conf.
        return event_piper::another_content_handler(cf, &cmd->name, clcf);
    }
    lcf->handler_directive = &cmd->name;
    lcf->handler = handler;
    clcf->handler = handler;
    return NGX_CONF_OK;
}

// The locations that need the database.
void mark_used(ngx_conf_t *cf) {
    auto *mcf =
        static_cast<MainConf *>(ngx_http_conf_get_module_main_conf(cf, ngx_event_piper_module));
    mcf->used = 1;
}

char *set_event_piper(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) noexcept {
    char *rv = set_content_handler(cf, cmd, conf, stream_handler);
    if (rv == NGX_CONF_OK) {
        mark_used(cf);
    }
    return rv;
}

char *set_health(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) noexcept {
    char *rv = set_content_handler(cf, cmd, conf, health_handler);
    if (rv == NGX_CONF_OK) {
        mark_used(cf);
    }
    return rv;
}

char *set_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) noexcept {
    return set_content_handler(cf, cmd, conf, status_handler);
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
        try {
            std::string example = event_piper::time_text(event_piper::default_heartbeat_ms);
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid value \"%V\" in \"%V\": a positive time (\"%s\") or "
                               "\"off\"",
                               &args[1], &cmd->name, example.c_str());
        } catch (...) {
            return const_cast<char *>("failed: out of memory");
        }
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
NumberRange batch_range = {static_cast<ngx_int_t>(event_piper::min_replay_batch),
                           static_cast<ngx_int_t>(event_piper::max_replay_batch)};
NumberRange connections_range = {static_cast<ngx_int_t>(event_piper::min_replay_connections),
                                 static_cast<ngx_int_t>(event_piper::max_replay_connections)};

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

// Sizes and times: at least `min`, with two examples of good values in the message (the first
// is the default where there is one).
struct Minimum {
    bool time; // a time in milliseconds, else a size in bytes
    uint64_t min;
    uint64_t example;
    const char *other_example;
};
Minimum stream_buffer_min = {false, event_piper::min_stream_buffer,
                             event_piper::default_stream_buffer, "1m"};
Minimum replay_memory_min = {false, event_piper::min_replay_memory,
                             event_piper::default_replay_memory, "1g"};
Minimum listener_timeout_min = {true, event_piper::min_listener_timeout_ms,
                                event_piper::default_listener_timeout_ms, "2m"};
Minimum retry_min = {true, 1, 2000, "500ms"};
Minimum relay_buffer_min = {false, event_piper::min_relay_buffer, event_piper::default_relay_buffer,
                            "16m"};

// "a size of at least 4k (\"256k\", \"1m\")", "a positive time (\"2s\", \"500ms\")"
char *invalid_amount(ngx_conf_t *cf, ngx_command_t *cmd, const Minimum &minimum) {
    try {
        auto amount = minimum.time ? event_piper::time_text : event_piper::size_text;
        std::string expected = minimum.time ? "a time" : "a size";
        if (minimum.min <= 1) {
            expected.insert(2, "positive ");
        } else {
            expected += " of at least " + amount(minimum.min);
        }
        expected += " (\"" + amount(minimum.example) + "\", \"" + minimum.other_example + "\")";
        return invalid_value(cf, cmd, expected.c_str());
    } catch (...) {
        return const_cast<char *>("failed: out of memory");
    }
}

// `event_piper_listener shared | per_worker;` (nginx's enum slot would not name the directive).
char *set_listener_mode(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) noexcept {
    auto *mcf = static_cast<MainConf *>(conf);
    if (mcf->listener_shared != NGX_CONF_UNSET_UINT) {
        return const_cast<char *>("is duplicate");
    }
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    // Case-insensitive, as nginx's own enum directives (and this one before it named itself).
    if (args[1].len == 6 && ngx_strncasecmp(args[1].data, (u_char *)"shared", 6) == 0) {
        mcf->listener_shared = 1;
    } else if (args[1].len == 10 &&
               ngx_strncasecmp(args[1].data, (u_char *)"per_worker", 10) == 0) {
        mcf->listener_shared = 0;
    } else {
        return invalid_value(cf, cmd, "\"shared\" or \"per_worker\"");
    }
    return NGX_CONF_OK;
}

// `event_piper_source trigger | wal;` (docs/wal-source.md).
char *set_source(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) noexcept {
    auto *mcf = static_cast<MainConf *>(conf);
    if (mcf->source_wal != NGX_CONF_UNSET_UINT) {
        return const_cast<char *>("is duplicate");
    }
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    if (args[1].len == 7 && ngx_strncasecmp(args[1].data, (u_char *)"trigger", 7) == 0) {
        mcf->source_wal = 0;
    } else if (args[1].len == 3 && ngx_strncasecmp(args[1].data, (u_char *)"wal", 3) == 0) {
        mcf->source_wal = 1;
    } else {
        return invalid_value(cf, cmd, "\"trigger\" or \"wal\"");
    }
    return NGX_CONF_OK;
}

char *set_size(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) noexcept {
    auto *field = reinterpret_cast<size_t *>(static_cast<char *>(conf) + cmd->offset);
    if (*field != NGX_CONF_UNSET_SIZE) {
        return const_cast<char *>("is duplicate");
    }
    auto *minimum = static_cast<Minimum *>(cmd->post);
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    ssize_t size = ngx_parse_size(&args[1]);
    if (size == NGX_ERROR || static_cast<uint64_t>(size) < minimum->min) {
        return invalid_amount(cf, cmd, *minimum);
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
    if (ms == NGX_ERROR || static_cast<uint64_t>(ms) < minimum->min) {
        return invalid_amount(cf, cmd, *minimum);
    }
    *field = static_cast<ngx_msec_t>(ms);
    return NGX_CONF_OK;
}

ngx_command_t commands[] = {
    {ngx_string("event_piper_postgres"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1, set_postgres,
     NGX_HTTP_MAIN_CONF_OFFSET, offsetof(MainConf, conninfo), nullptr},
    {ngx_string("event_piper_replay_postgres"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1, set_postgres,
     NGX_HTTP_MAIN_CONF_OFFSET, offsetof(MainConf, replay_conninfo), nullptr},
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
    {ngx_string("event_piper_listener"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1, set_listener_mode,
     NGX_HTTP_MAIN_CONF_OFFSET, 0, nullptr},
    {ngx_string("event_piper_source"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1, set_source,
     NGX_HTTP_MAIN_CONF_OFFSET, 0, nullptr},
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
    {ngx_string("event_piper_folded"),
     NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1,
     ngx_http_set_complex_value_slot, NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, folded), nullptr},
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
