// The HTTP side of one stream: the nginx request, its output, its heartbeat timer and its end.
// Its delivery state is the core Stream it owns. Lives in the request pool (placement new); the
// request's cleanup handler destroys it, which takes it out of the worker's hub.
#pragma once

extern "C" {
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_http.h>
}

#include "core/hub.hpp"
#include "core/stream.hpp"
#include "ngx_conf.hpp"

#include <string>
#include <vector>

namespace event_piper {

class HttpStream final : public StreamOwner {
public:
    HttpStream(Hub &hub, ngx_http_request_t *r, const LocConf &conf,
               std::vector<std::string> consumers, int64_t last_position, bool folded);
    ~HttpStream() { detach(); }
    HttpStream(const HttpStream &) = delete;
    HttpStream &operator=(const HttpStream &) = delete;

    // Opens the stream in the hub, sends the retry hint if configured, starts heartbeats.
    void start();
    // StreamOwner: schedules flush() in request context (posts the connection's write event).
    // Everything outside the request's own handlers only changes state and wakes: nginx's
    // posted-event queue batches writes per wake-up, and no loop over streams ever touches a
    // finalised request.
    void wake() override;
    // StreamOwner: ends the response now with a retry hint (graceful shutdown).
    void end() override { finish(true); }

    static void write_handler(ngx_http_request_t *r) noexcept;
    static void heartbeat_handler(ngx_event_t *ev) noexcept;
    static void cleanup_handler(void *data) noexcept;

private:
    // Hands pending bytes to nginx when it can take them; asks for the next batch when drained.
    void flush();
    // Ends the response: optional final bytes, last chunk, finalize. `graceful`: add a retry hint.
    void finish(bool graceful);
    // Leaves the hub and stops the heartbeat. Idempotent.
    void detach();
    bool nginx_holds_output() const;
    bool push(ngx_chain_t *in);
    void wait_for_socket();
    void arm_heartbeat();

    Stream stream_;
    Hub *hub_;
    ngx_http_request_t *r_;
    ngx_event_t heartbeat_ev_;
    ngx_msec_t heartbeat_;
    ngx_msec_t retry_;     // sent when the stream starts (0: unset)
    ngx_msec_t end_retry_; // sent when nginx ends the stream
    ngx_msec_t last_write_;
    std::string inflight_; // bytes handed to nginx, alive until it has sent them
    ngx_chain_t *free_ = nullptr;
    ngx_chain_t *busy_ = nullptr;
    bool detached_ = false;
    bool started_ = false;
    bool finished_ = false;
};

} // namespace event_piper
