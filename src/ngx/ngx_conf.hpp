// The module's configuration as nginx stores it (http block and locations). Parsed and checked
// by the directive handlers in ngx_event_piper_module.cpp.
#pragma once

extern "C" {
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
}

#include "core/defaults.hpp"

extern "C" ngx_module_t ngx_event_piper_module;

namespace event_piper {

struct MainConf {
    ngx_shm_zone_t *status_zone; // one status slot per worker, for event_piper_status
    ngx_str_t conninfo;
    ngx_str_t replay_conninfo; // event_piper_replay_postgres: hot standbys for history ("": none)
    ngx_str_t channel;
    ngx_uint_t replay_connections;
    size_t replay_memory;        // bytes read for catching-up streams and not yet sent
    ngx_msec_t listener_timeout; // a frozen listening connection is noticed within this time
    ngx_uint_t listener_shared;  // event_piper_listener: 1 shared (one per instance), 0 per_worker
    size_t relay_buffer;         // send buffer of the shared listener's socket
    ngx_uint_t source_wal;       // event_piper_source: 1 wal (this instance runs a positioner)
    ngx_flag_t used;             // some location has `event_piper;` or `event_piper_health;`
};

struct LocConf {
    ngx_http_complex_value_t *consumer;
    ngx_str_t consumer_header;  // the header a bare `$http_...` consumer value reads ("" if not)
    ngx_flag_t consumer_decode; // `event_piper_consumer ... urldecode`: decode %XX first
    ngx_http_complex_value_t *groups; // more ids, comma-separated (nullptr: none)
    ngx_str_t groups_header;          // as consumer_header, for the groups value
    ngx_flag_t groups_decode;
    ngx_http_complex_value_t *last_event_id;
    ngx_str_t last_event_id_header;   // as consumer_header, for the resume point
    ngx_http_complex_value_t *folded; // event_piper_folded: the client's choice (nullptr: off)
    ngx_msec_t heartbeat;             // 0: off
    ngx_msec_t retry;                 // 0: unset
    ngx_uint_t replay_batch;
    size_t stream_buffer;
    // The directive that made this location a content handler of the module (nullptr: none);
    // this location's own, not inherited.
    const ngx_str_t *handler_directive;
    ngx_http_handler_pt handler; // the one it set

    // The reconnect hint sent when nginx ends a stream (reload, stop) or answers a request in
    // its shutdown: event_piper_retry, or default_end_retry_ms when it is unset.
    ngx_msec_t end_retry() const { return retry != 0 ? retry : default_end_retry_ms; }
};

// The module context's configuration callbacks (defaults: README "Configuration").
void *create_main_conf(ngx_conf_t *cf) noexcept;
// Refuses `directive` in a location that another module's directive also makes a content
// handler: which of the two answers would be a guess.
char *another_content_handler(ngx_conf_t *cf, const ngx_str_t *directive,
                              const ngx_http_core_loc_conf_t *clcf);
char *init_main_conf(ngx_conf_t *cf, void *conf) noexcept;
void *create_loc_conf(ngx_conf_t *cf) noexcept;
char *merge_loc_conf(ngx_conf_t *cf, void *parent, void *child) noexcept;

} // namespace event_piper
