// The delivery state of one SSE stream, free of nginx: catching up from the table or live from
// notifications, the last position it queued, and the bytes not yet handed to the socket.
// These rules are what make delivery gap-free and duplicate-free; see README "How it works".
#pragma once

#include "defaults.hpp"

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace event_piper {

// Whoever carries a stream's bytes to its client (the HTTP response): told that the stream has
// something to do (bytes to send, a batch to ask for, an end to write).
class StreamOwner {
public:
    virtual void wake() = 0;
    // End the response now, after what is queued, with a reconnect hint (graceful shutdown).
    virtual void end() = 0;

protected:
    ~StreamOwner() = default;
};

class Stream {
public:
    enum class Mode { CatchingUp, Live };

    struct Limits {
        size_t buffer_bytes = default_stream_buffer; // live bytes queued before the table
        size_t batch_rows = default_replay_batch;    // rows per replay query
    };

    // last_position < 0: the client gave no Last-Event-ID and the worker does not yet know the
    // newest position; the stream takes it when the listener is ready (see on_listener_ready).
    // `consumers`: the ids whose events the stream carries (at least one; the first is its
    // primary id, used in logs).
    Stream(std::vector<std::string> consumers, int64_t last_position, Limits limits,
           StreamOwner *owner = nullptr);
    Stream(std::string consumer, int64_t last_position, Limits limits, StreamOwner *owner = nullptr)
        : Stream(std::vector<std::string>{std::move(consumer)}, last_position, limits, owner) {}

    // Folded replay: catching up sends each event once in its current state (its patches
    // merged), instead of every row (README "Patching events").
    void set_folded(bool folded) { folded_ = folded; }
    bool folded() const { return folded_; }

    const std::string &consumer() const { return consumers_.front(); }
    const std::vector<std::string> &consumers() const { return consumers_; }
    Mode mode() const { return mode_; }
    int64_t last_position() const { return last_; }
    bool query_in_flight() const { return query_in_flight_; }
    size_t batch_rows() const { return limits_.batch_rows; }
    // Byte budget of one replay batch: the stream buffer (at least one row is always sent).
    size_t batch_bytes() const { return limits_.buffer_bytes; }

    void wake() {
        if (owner_ != nullptr) {
            owner_->wake();
        }
    }
    // The database refused this stream's query: asking again would fail again. The owner ends
    // the stream with a retry hint; the client resumes from its last id.
    void fail() {
        query_in_flight_ = false;
        failed_ = true;
    }
    bool failed() const { return failed_; }

    // A stream opened without a resume point starts after `position` (the newest known).
    void start_at(int64_t position) {
        last_ = handed_last_ = position;
        waiting_for_listener_ = false;
    }
    // Starts live: only valid when the listener is ready and last_position is the newest.
    void go_live() { mode_ = Mode::Live; }
    void end() {
        if (owner_ != nullptr) {
            owner_->end();
        }
    }

    // A notified event for this stream's consumer, already framed. Returns true when bytes were
    // queued. A live stream whose queue would exceed the buffer limit drops its queue and falls
    // back to catching up from the last position handed to the socket: the table is the buffer.
    bool on_event(int64_t position, std::string_view frame);

    // Something for this consumer was committed at `position` but not carried by the
    // notification (too large): a live stream that has not sent it must read the table.
    void on_hint(int64_t position);

    // Catch-up queries. `epoch` identifies the listener's LISTEN session (0: not listening).
    void begin_query(uint64_t epoch);
    // A row of the batch, framed (one framing shared by the streams of one query); rows at or
    // below the last position are skipped (no duplicates).
    void on_framed_row(int64_t position, std::string_view frame);
    // The batch is complete. A short batch switches to live only when the listener has been
    // listening since before the query was sent and nothing newer was notified meanwhile.
    void end_query(bool full_batch, uint64_t current_epoch);
    // The query was lost with its connection: it will be asked again.
    void query_lost() { query_in_flight_ = false; }
    // A query found nothing after the stream's position; `newest` is the newest committed
    // position. A resume point beyond it (a client's id from a reset database) is brought back
    // to it, so the stream goes live instead of waiting for positions to catch up with it.
    void on_newest(int64_t newest);

    // The first replay result this stream sees tells it the retention horizon: positions at or
    // below `removed_upto` may have been removed (0: none). True, once, when the client resumed
    // (Last-Event-ID) from below it: the stream must say that history it asked for is gone.
    // Later batches never do: a stream that was live meanwhile missed nothing.
    bool history_gone(int64_t removed_upto) {
        if (history_checked_) {
            return false;
        }
        history_checked_ = true;
        return resumed_ && removed_upto > last_;
    }

    // True when the stream should ask for its next batch: catching up, positioned, no query out,
    // all bytes written (backpressure), and not parked waiting for the listener.
    bool wants_query(bool socket_drained) const;

    void on_listener_lost();
    void on_listener_ready(int64_t newest);

    // Output bytes. The glue takes what is pending when the socket can take more.
    void append_raw(std::string_view bytes) { pending_.append(bytes); }
    bool has_pending() const { return !pending_.empty(); }
    // Swaps the pending bytes into `out` (whose old content is discarded, its capacity reused).
    void take_pending(std::string &out);

    // Bytes of replay batches this stream holds against the replay budget (ReplayQueue's).
    size_t replay_held() const { return replay_held_; }
    void set_replay_held(size_t bytes) { replay_held_ = bytes; }

    uint64_t overflows() const { return overflows_; }
    // Events in the pending bytes (what take_pending will hand over).
    size_t pending_events() const { return pending_events_; }

private:
    std::vector<std::string> consumers_;
    StreamOwner *owner_;
    std::string pending_;
    int64_t last_;        // position of the last event queued (pending or handed to the socket)
    int64_t handed_last_; // position of the last event handed to the socket
    int64_t notified_max_ = 0; // newest position notified while a query was in flight
    uint64_t query_epoch_ = 0;
    Limits limits_;
    uint64_t overflows_ = 0;
    size_t pending_events_ = 0;
    size_t replay_held_ = 0;
    Mode mode_ = Mode::CatchingUp;
    bool query_in_flight_ = false;
    bool waiting_for_listener_ = false;
    bool failed_ = false;
    bool folded_ = false;
    bool resumed_ = false;         // the client gave its resume point
    bool history_checked_ = false; // the first replay result was seen
};

} // namespace event_piper
