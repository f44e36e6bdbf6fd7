// The module's configuration structures: creation, defaults and inheritance (nginx's merge).
#include "ngx_conf.hpp"

#include "core/defaults.hpp"
#include "core/request_check.hpp"

#include <string_view>

namespace event_piper {

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
    mcf->source_wal = NGX_CONF_UNSET_UINT;
    mcf->used = NGX_CONF_UNSET;
    return mcf;
}

char *init_main_conf(ngx_conf_t *, void *conf) noexcept {
    auto *mcf = static_cast<MainConf *>(conf);
    if (mcf->channel.len == 0) {
        ngx_str_set(&mcf->channel, default_channel);
    }
    ngx_conf_init_uint_value(mcf->replay_connections, default_replay_connections);
    ngx_conf_init_msec_value(mcf->listener_timeout, default_listener_timeout_ms);
    ngx_conf_init_size_value(mcf->replay_memory, default_replay_memory);
    ngx_conf_init_uint_value(mcf->listener_shared, default_listener_shared ? 1 : 0);
    ngx_conf_init_size_value(mcf->relay_buffer, default_relay_buffer);
    ngx_conf_init_uint_value(mcf->source_wal, default_source_wal ? 1 : 0);
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
    lcf->folded = static_cast<ngx_http_complex_value_t *>(NGX_CONF_UNSET_PTR);
    lcf->heartbeat = NGX_CONF_UNSET_MSEC;
    lcf->retry = NGX_CONF_UNSET_MSEC;
    lcf->replay_batch = NGX_CONF_UNSET_UINT;
    lcf->stream_buffer = NGX_CONF_UNSET_SIZE;
    return lcf;
}

namespace {

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

} // namespace

char *another_content_handler(ngx_conf_t *cf, const ngx_str_t *directive,
                              const ngx_http_core_loc_conf_t *clcf) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "\"%V\" directive conflicts with another content handler (proxy_pass, "
                       "fastcgi_pass, ...) in location \"%V\"",
                       directive, &clcf->name);
    return static_cast<char *>(NGX_CONF_ERROR);
}

char *merge_loc_conf(ngx_conf_t *cf, void *parent, void *child) noexcept {
    auto *prev = static_cast<LocConf *>(parent);
    auto *conf = static_cast<LocConf *>(child);
    if (conf->handler_directive != nullptr) {
        // While merging, the core configuration at hand is this location's.
        auto *clcf = static_cast<ngx_http_core_loc_conf_t *>(
            ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module));
        if (clcf->handler != conf->handler) {
            return another_content_handler(cf, conf->handler_directive, clcf);
        }
    }
    if (conf->consumer == NGX_CONF_UNSET_PTR) {
        conf->consumer = prev->consumer;
        conf->consumer_header = prev->consumer_header;
        conf->consumer_decode = prev->consumer_decode;
    }
    ngx_conf_merge_ptr_value(conf->last_event_id, prev->last_event_id, nullptr);
    ngx_conf_merge_ptr_value(conf->folded, prev->folded, nullptr);
    if (conf->consumer == NGX_CONF_UNSET_PTR || conf->consumer == nullptr) {
        conf->consumer = compile_default(cf, default_consumer_value);
        std::string_view header = header_of_variable(default_consumer_value);
        conf->consumer_header.data = reinterpret_cast<u_char *>(const_cast<char *>(header.data()));
        conf->consumer_header.len = header.size();
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
        conf->last_event_id = compile_default(cf, default_last_event_id_value);
    }
    if (conf->consumer == nullptr || conf->last_event_id == nullptr) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    // The compiled value keeps its source text (configuration memory): "$http_last_event_id".
    std::string_view header = header_of_variable(std::string_view(
        reinterpret_cast<char *>(conf->last_event_id->value.data), conf->last_event_id->value.len));
    conf->last_event_id_header.data = reinterpret_cast<u_char *>(const_cast<char *>(header.data()));
    conf->last_event_id_header.len = header.size();
    ngx_conf_merge_msec_value(conf->heartbeat, prev->heartbeat, default_heartbeat_ms);
    ngx_conf_merge_msec_value(conf->retry, prev->retry, 0);
    ngx_conf_merge_uint_value(conf->replay_batch, prev->replay_batch, default_replay_batch);
    ngx_conf_merge_size_value(conf->stream_buffer, prev->stream_buffer, default_stream_buffer);
    return NGX_CONF_OK;
}

} // namespace event_piper
