// A worker's hub: its open streams by consumer, where a new stream starts, the fan-out of each
// notification to the streams of its consumer, and what a listener epoch change means for every
// stream. It owns the replay queue and the worker's counters. Pure C++; the nginx side wires it
// to the listener, the replay links and the HTTP responses.
#pragma once

#include "listener.hpp"
#include "notification.hpp"
#include "registry.hpp"
#include "replay_queue.hpp"
#include "status.hpp"
#include "stream.hpp"

#include <string>
#include <vector>

namespace event_piper {

class InterestMap;

class Hub : public ListenerEvents, public ReplayEvents {
public:
    // `replay_retry` fires replay().on_retry_timer(); links are added with replay().add_link().
    // `replay_memory`: the replay queue's budget (see ReplayQueue).
    Hub(Timer &replay_retry, Clock &clock, Log &log, size_t replay_memory = 0);

    // A new stream: registered under its consumer. Without a resume point it starts at the
    // newest position known (live at once if the listener is up), or waits for the listener.
    void open(Stream &s);
    // Gone: out of the registry and of the replay queue.
    void close(Stream &s);
    void request_batch(Stream &s) { replay_.request(s); }
    // Graceful shutdown: asks every stream's owner to end (with a retry hint).
    void end_all();

    ReplayQueue &replay() { return replay_; }
    // Shared listener: the consumers of this worker's streams, published for the holder.
    void set_interest(InterestMap *interest) { interest_ = interest; }
    int64_t newest() const { return newest_; } // -1: not known yet
    bool listening() const { return epoch_ != 0; }
    size_t streams() const { return registry_.streams(); }
    size_t consumers() const { return registry_.consumers(); }
    size_t streams_catching_up();

    // Counters of this worker (the owner of the HTTP side adds what it sends).
    WorkerStats &stats() { return stats_; }

    // ListenerEvents
    void on_listener_ready(uint64_t epoch, int64_t newest, int64_t start_for_waiting) override;
    void on_listener_lost() override;
    void on_notification(std::string_view payload) override;
    uint64_t waiting_since_ms() const override { return waiting_since_ms_; }
    int64_t newest_notified() const override { return newest_notified_; }

    // ReplayEvents
    uint64_t listener_epoch() const override { return epoch_; }
    void note_position(int64_t position) override {
        if (position > newest_) {
            newest_ = position;
        }
    }

    // The same, already parsed (the shared listener's holder parses once to forward and deliver).
    void on_events(const std::vector<Notification> &events);

private:
    void deliver(Stream &s, int64_t position, std::string_view frame);
    void on_event_notification(const Notification &n);
    void warn_foreign(std::string_view payload);

    Clock &clock_;
    Log &log_;
    InterestMap *interest_ = nullptr;
    Registry<Stream> registry_;
    ReplayQueue replay_;
    WorkerStats stats_;
    std::string frame_;               // one serialisation per event, shared by all its streams
    std::vector<Notification> batch_; // the events of the notification being handled
    int64_t newest_ = -1;
    int64_t newest_notified_ = 0; // notifications only (newest_ also learns from replays)
    uint64_t epoch_ = 0;
    uint64_t waiting_since_ms_ = 0;
    bool warned_foreign_ = false;
};

} // namespace event_piper
