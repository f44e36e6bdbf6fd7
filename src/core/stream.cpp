// Stream delivery rules (see stream.hpp).
#include "stream.hpp"

#include <utility>

namespace event_piper {

Stream::Stream(std::vector<std::string> consumers, int64_t last_position, Limits limits,
               StreamOwner *owner)
    : consumers_(std::move(consumers)), owner_(owner), last_(last_position),
      handed_last_(last_position), limits_(limits), waiting_for_listener_(last_position < 0),
      resumed_(last_position >= 0) {}

bool Stream::on_event(int64_t position, std::string_view frame) {
    if (mode_ != Mode::Live) {
        if (query_in_flight_ && position > notified_max_) {
            notified_max_ = position;
        }
        return false;
    }
    if (position <= last_) {
        return false;
    }
    if (pending_.size() + frame.size() > limits_.buffer_bytes) {
        // Slow client: forget the queue, re-read from the table once the socket drains.
        pending_.clear();
        pending_events_ = 0;
        last_ = handed_last_;
        mode_ = Mode::CatchingUp;
        ++overflows_;
        return false;
    }
    pending_.append(frame);
    ++pending_events_;
    last_ = position;
    return true;
}

void Stream::on_hint(int64_t position) {
    if (mode_ == Mode::Live) {
        if (position > last_) {
            mode_ = Mode::CatchingUp;
        }
    } else if (query_in_flight_ && position > notified_max_) {
        notified_max_ = position;
    }
}

void Stream::begin_query(uint64_t epoch) {
    query_in_flight_ = true;
    query_epoch_ = epoch;
    notified_max_ = 0;
}

void Stream::on_framed_row(int64_t position, std::string_view frame) {
    if (position <= last_) {
        return;
    }
    pending_.append(frame);
    ++pending_events_;
    last_ = position;
}

void Stream::end_query(bool full_batch, uint64_t current_epoch) {
    query_in_flight_ = false;
    if (mode_ != Mode::CatchingUp || full_batch) {
        return;
    }
    if (current_epoch == 0) {
        // No listener: going live now could miss events. Park until it is back.
        waiting_for_listener_ = true;
        return;
    }
    if (query_epoch_ != current_epoch) {
        return; // the listener reconnected during the query: notifications may be lost, re-read
    }
    if (notified_max_ > last_) {
        return; // committed after the query's snapshot: ask again
    }
    mode_ = Mode::Live;
}

void Stream::on_newest(int64_t newest) {
    if (last_ > newest && !has_pending()) {
        last_ = newest;
        handed_last_ = newest;
    }
}

bool Stream::wants_query(bool socket_drained) const {
    return mode_ == Mode::CatchingUp && !query_in_flight_ && !waiting_for_listener_ && !failed_ &&
           last_ >= 0 && pending_.empty() && socket_drained;
}

void Stream::on_listener_lost() {
    if (mode_ == Mode::Live) {
        mode_ = Mode::CatchingUp; // keeps reading the table; goes live with the next listener
    }
}

void Stream::on_listener_ready(int64_t newest) {
    if (last_ < 0) {
        last_ = newest;
        handed_last_ = newest;
    }
    waiting_for_listener_ = false;
    if (mode_ == Mode::Live) {
        mode_ = Mode::CatchingUp; // a new LISTEN session: re-check the table once
    }
}

void Stream::take_pending(std::string &out) {
    out.clear();
    out.swap(pending_);
    handed_last_ = last_;
    pending_events_ = 0;
}

} // namespace event_piper
