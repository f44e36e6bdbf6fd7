// A core Timer on an nginx timer event. Cancelable: it never holds a shutting-down worker.
#pragma once

extern "C" {
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
}

#include "core/ports.hpp"

#include <functional>
#include <utility>

namespace event_piper {

class NgxTimer final : public Timer {
public:
    // `what` names the timer in the error log if `fire` throws.
    NgxTimer(ngx_log_t *log, const char *what, std::function<void()> fire)
        : what_(what), fire_(std::move(fire)) {
        ngx_memzero(&ev_, sizeof(ev_));
        ev_.handler = handler;
        ev_.data = this;
        ev_.log = log;
        ev_.cancelable = 1;
    }
    ~NgxTimer() { cancel(); }
    NgxTimer(const NgxTimer &) = delete;
    NgxTimer &operator=(const NgxTimer &) = delete;

    void arm(uint64_t ms) override { ngx_add_timer(&ev_, static_cast<ngx_msec_t>(ms)); }
    void cancel() override {
        if (ev_.timer_set) {
            ngx_del_timer(&ev_);
        }
    }
    bool armed() const override { return ev_.timer_set; }

private:
    static void handler(ngx_event_t *ev) noexcept {
        auto *self = static_cast<NgxTimer *>(ev->data);
        try {
            self->fire_();
        } catch (const std::exception &e) {
            ngx_log_error(NGX_LOG_ERR, ev->log, 0, "event_piper: %s failed: %s", self->what_,
                          e.what());
        } catch (...) {
            ngx_log_error(NGX_LOG_ERR, ev->log, 0, "event_piper: %s failed", self->what_);
        }
    }

    ngx_event_t ev_;
    const char *what_;
    std::function<void()> fire_;
};

// The core's Log and Clock on nginx's error log and cached time.
class NgxLog final : public Log {
public:
    explicit NgxLog(ngx_log_t *log) : log_(log) {}
    void write(LogLevel level, std::string_view message) override {
        ngx_uint_t l = level == LogLevel::Error    ? NGX_LOG_ERR
                       : level == LogLevel::Warn   ? NGX_LOG_WARN
                       : level == LogLevel::Notice ? NGX_LOG_NOTICE
                                                   : NGX_LOG_INFO;
        ngx_log_error(l, log_, 0, "%*s", message.size(), message.data());
    }

private:
    ngx_log_t *log_;
};

class NgxClock final : public Clock {
public:
    uint64_t now_ms() const override {
        const ngx_time_t *tp = ngx_timeofday();
        return static_cast<uint64_t>(tp->sec) * 1000 + tp->msec;
    }
};

} // namespace event_piper
