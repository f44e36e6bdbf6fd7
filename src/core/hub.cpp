// The worker's hub (see hub.hpp).
#include "hub.hpp"

#include "notification.hpp"
#include "relay.hpp"
#include "sse_frame.hpp"

#include <algorithm>

namespace event_piper {

Hub::Hub(Timer &replay_retry, Clock &clock, Log &log, size_t replay_memory)
    : clock_(clock), log_(log), replay_(replay_retry, *this, log, replay_memory, &clock) {}

void Hub::open(Stream &s) {
    // All or nothing: the registry and the interest bits may fail to grow (std::bad_alloc), and
    // then no trace of the stream stays (its owner, which did not open it, never closes it).
    const std::vector<std::string> &ids = s.consumers();
    size_t interested = 0;
    size_t registered = 0;
    try {
        if (interest_ != nullptr) {
            for (; interested < ids.size(); ++interested) {
                interest_->add(ids[interested]); // before the stream's first query
            }
        }
        for (; registered < ids.size(); ++registered) {
            registry_.add(ids[registered], &s);
        }
    } catch (...) {
        while (registered > 0) {
            --registered;
            registry_.remove(ids[registered], &s);
        }
        while (interested > 0) {
            --interested;
            interest_->remove(ids[interested]);
        }
        throw;
    }
    if (interest_ != nullptr) {
        // A worker that follows the listener's holder hears only of its own consumers: what it
        // knows may be older than what the holder has already seen (and will not forward here).
        note_position(interest_->newest_published());
    }
    if (s.last_position() < 0) {
        if (newest_ >= 0) {
            // A live-only stream starts at the newest position this worker knows.
            s.start_at(newest_);
            if (listening()) {
                s.go_live();
            }
        } else if (waiting_since_ms_ == 0) {
            // No position known yet: the listener's first reading decides where it starts.
            waiting_since_ms_ = clock_.now_ms();
            if (interest_ != nullptr) {
                interest_->publish_waiting_since(waiting_since_ms_);
            }
        }
    }
}

void Hub::close(Stream &s) {
    for (const std::string &id : s.consumers()) {
        registry_.remove(id, &s);
    }
    replay_.cancel(s);
    if (interest_ != nullptr) {
        for (const std::string &id : s.consumers()) {
            interest_->remove(id);
        }
    }
}

void Hub::end_all() {
    // Owners end their responses inside this loop, which removes them from the registry: the
    // registry leaves holes during iteration and compacts after, so that is safe here.
    registry_.for_each_all([](Stream &s) { s.end(); });
}

size_t Hub::streams_catching_up() {
    size_t n = 0;
    registry_.for_each_all([&n](Stream &s) {
        if (s.mode() == Stream::Mode::CatchingUp) {
            ++n;
        }
    });
    return n;
}

void Hub::deliver(Stream &s, int64_t position, std::string_view frame) {
    uint64_t before = s.overflows();
    s.on_event(position, frame);
    stats_.stream_overflows += s.overflows() - before;
    s.wake();
}

void Hub::on_notification(std::string_view payload) {
    if (!parse_notifications(payload, batch_)) {
        warn_foreign(payload);
        return;
    }
    on_events(batch_);
}

void Hub::on_events(const std::vector<Notification> &events) {
    for (const Notification &n : events) {
        on_event_notification(n);
    }
}

void Hub::warn_foreign(std::string_view payload) {
    if (!warned_foreign_) { // once: another trigger on the channel would flood the log
        log_.write(LogLevel::Warn,
                   "event_piper: ignoring notifications not written by postgresql/schema.sql's "
                   "trigger (is an old trigger still installed?): \"" +
                       std::string(payload.substr(0, 64)) + "\"");
        warned_foreign_ = true;
    }
}

void Hub::on_event_notification(const Notification &n) {
    note_position(n.position);
    newest_notified_ = std::max(newest_notified_, n.position);
    ++stats_.notifications;
    stats_.last_notification_ms = clock_.now_ms();
    bool found = true;
    switch (n.kind) {
    case Notification::Kind::Event: {
        bool framed = false;
        found = registry_.for_each(n.subscriber, [&](Stream &s) {
            if (!framed) { // framed once, only if some stream wants it
                frame_.clear();
                if (n.target > 0) {
                    append_target_frame(frame_, n.position, n.target, TargetMember::Patch, n.type,
                                        n.payload);
                } else {
                    append_event_frame(frame_, n.position, n.type, n.payload);
                }
                framed = true;
            }
            deliver(s, n.position, frame_);
        });
        break;
    }
    case Notification::Kind::Reference:
        found = registry_.for_each(n.subscriber, [&](Stream &s) {
            s.on_hint(n.position);
            s.wake();
        });
        break;
    case Notification::Kind::Position:
        registry_.for_each_all([&](Stream &s) {
            s.on_hint(n.position);
            s.wake();
        });
        break;
    }
    if (!found) {
        ++stats_.notifications_dropped;
    }
}

void Hub::on_listener_ready(uint64_t epoch, int64_t newest, int64_t start_for_waiting) {
    epoch_ = epoch;
    note_position(newest);
    waiting_since_ms_ = 0;
    if (interest_ != nullptr) {
        interest_->publish_waiting_since(0);
    }
    registry_.for_each_all([start_for_waiting](Stream &s) {
        s.on_listener_ready(start_for_waiting);
        s.wake();
    });
}

void Hub::on_listener_lost() {
    epoch_ = 0;
    registry_.for_each_all([](Stream &s) { s.on_listener_lost(); });
}

} // namespace event_piper
