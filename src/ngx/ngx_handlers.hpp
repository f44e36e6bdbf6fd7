// The content handlers of the module's locations (event_piper, event_piper_health,
// event_piper_status). Every one is noexcept and turns errors into an HTTP status.
#pragma once

extern "C" {
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
}

namespace event_piper {

ngx_int_t stream_handler(ngx_http_request_t *r) noexcept;
ngx_int_t health_handler(ngx_http_request_t *r) noexcept;
ngx_int_t status_handler(ngx_http_request_t *r) noexcept;

} // namespace event_piper
