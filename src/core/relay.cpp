// The shared listener's forwarding rules (see relay.hpp).
#include "relay.hpp"

#include "notification.hpp"

#include <cstring>

namespace event_piper {

size_t consumer_bit(std::string_view consumer) {
    uint64_t h = 14695981039346656037ull; // FNV-1a
    for (unsigned char c : consumer) {
        h = (h ^ c) * 1099511628211ull;
    }
    return static_cast<size_t>((h ^ (h >> 32)) % interest_bits);
}

void InterestMap::add(std::string_view consumer) {
    size_t bit = consumer_bit(consumer);
    if (counts_[bit] == 0) {
        bits_.set(bit, true);
    }
    ++counts_[bit]; // after: a set() that throws leaves the count as it was
}

void InterestMap::remove(std::string_view consumer) {
    size_t bit = consumer_bit(consumer);
    if (counts_[bit] > 0 && --counts_[bit] == 0) {
        bits_.set(bit, false);
    }
}

void init_relay_board(RelayBoard &board, uint64_t instance) {
    board.instance = instance;
    board.holder = 0;
    board.epochs = 0;
    board.epoch = 0;
    board.live = 0;
    board.newest = -1;
    board.start_for_waiting = -1;
}

void raise_newest(RelayBoard &board, int64_t newest) {
    int64_t seen = board.newest.load();
    while (newest > seen && !board.newest.compare_exchange_weak(seen, newest)) {
    }
}

// --- the datagram (layout in relay.hpp) ---

void start_relay_datagram(std::string &datagram, uint64_t epoch) {
    datagram.assign(RelayHeader::size, '\0');
    std::memcpy(&datagram[RelayHeader::epoch_at], &epoch, sizeof epoch);
}

void set_relay_seq(std::string &datagram, uint64_t seq) {
    std::memcpy(&datagram[RelayHeader::seq_at], &seq, sizeof seq);
}

void append_relay_record(std::string &datagram, std::string_view payload) {
    auto length = static_cast<uint32_t>(payload.size());
    static_assert(sizeof length == relay_length_bytes, "the record length's size");
    datagram.append(reinterpret_cast<const char *>(&length), sizeof length);
    datagram.append(payload);
}

bool read_relay_header(std::string_view datagram, RelayHeader &header) {
    if (datagram.size() < RelayHeader::size) {
        return false;
    }
    std::memcpy(&header.epoch, datagram.data() + RelayHeader::epoch_at, sizeof header.epoch);
    std::memcpy(&header.seq, datagram.data() + RelayHeader::seq_at, sizeof header.seq);
    return true;
}

bool next_relay_record(std::string_view &records, std::string_view &payload) {
    if (records.size() < relay_length_bytes) {
        return false;
    }
    uint32_t length = 0;
    std::memcpy(&length, records.data(), sizeof length);
    if (length > records.size() - relay_length_bytes) {
        return false;
    }
    payload = records.substr(relay_length_bytes, length);
    records.remove_prefix(relay_length_bytes + length);
    return true;
}

// --- the holder ---

void RelaySender::on_listener_ready(uint64_t, int64_t newest, int64_t start_for_waiting) {
    epoch_ = peers_.new_epoch();
    peers_.publish(true, epoch_, newest, start_for_waiting);
    local_.on_listener_ready(epochs_.take(), newest, start_for_waiting);
    ping();
}

void RelaySender::on_listener_lost() {
    flush(); // what this session heard goes out with its epoch
    peers_.publish(false, epoch_, local_.newest(), local_.newest());
    ping();
    epoch_ = 0;
    local_.on_listener_lost();
}

void RelaySender::abandon() {
    for (size_t peer : dirty_) {
        batches_[peer].count = 0;
        batches_[peer].bytes.clear();
    }
    dirty_.clear();
    if (epoch_ != 0) {
        epoch_ = 0;
        local_.on_listener_lost();
    }
}

void RelaySender::ping() {
    // A bare header: "look at shared memory now" (else the receivers' next check does).
    std::string header;
    start_relay_datagram(header, epoch_);
    for (size_t peer = 0; peer < peers_.size(); ++peer) {
        if (peers_.wants(peer, RelayPeers::any_stream)) {
            peers_.send(peer, header);
        }
    }
}

uint64_t RelaySender::waiting_since_ms() const {
    return peers_.waiting_since_ms(local_.waiting_since_ms());
}

void RelaySender::on_notification(std::string_view payload) {
    // One notification may carry the events of a whole transaction (a "b" batch): it goes, whole,
    // to every worker that may want any of its events.
    // Parsed once, for forwarding and for this worker's own streams.
    if (!parse_notifications(payload, parsed_)) {
        local_.on_notification(payload); // logs what it cannot parse
        return;
    }
    if (epoch_ != 0) {
        // Published before the interest bits are read (see InterestBits::newest_published).
        peers_.publish_newest(parsed_.back().position);
        forward(parsed_, payload);
    }
    local_.on_events(parsed_);
}

void RelaySender::forward(const std::vector<Notification> &events, std::string_view payload) {
    bits_.clear();
    for (const Notification &n : events) {
        bits_.push_back(n.kind == Notification::Kind::Position ? RelayPeers::any_stream
                                                               : consumer_bit(n.subscriber));
    }
    for (size_t peer = 0; peer < peers_.size(); ++peer) {
        for (size_t bit : bits_) {
            if (peers_.wants(peer, bit)) {
                append(peer, payload);
                break;
            }
        }
    }
}

void RelaySender::append(size_t peer, std::string_view payload) {
    if (batches_.size() < peers_.size()) {
        batches_.resize(peers_.size());
    }
    Batch &b = batches_[peer];
    if (b.count > 0 && b.bytes.size() + relay_length_bytes + payload.size() > relay_batch_bytes) {
        flush_peer(peer);
    }
    if (b.count == 0) {
        start_relay_datagram(b.bytes, epoch_);
        dirty_.push_back(peer);
    }
    append_relay_record(b.bytes, payload);
    ++b.count;
}

void RelaySender::flush() {
    for (size_t peer : dirty_) {
        flush_peer(peer);
    }
    dirty_.clear();
}

void RelaySender::flush_peer(size_t peer) {
    Batch &b = batches_[peer];
    if (b.count == 0) {
        return;
    }
    uint64_t seq = peers_.next_seq(peer);
    set_relay_seq(b.bytes, seq);
    switch (peers_.send(peer, b.bytes)) {
    case RelayPeers::Sent::Ok:
        forwarded_ += b.count;
        break;
    case RelayPeers::Sent::Lost:
        // Never wait for a slow worker: it learns of the loss and re-reads the table.
        overruns_ += b.count;
        peers_.overrun(peer);
        break;
    case RelayPeers::Sent::Gone:
        break; // no process, no stream to serve
    }
    b.count = 0;
    b.bytes.clear();
}

// --- the other workers ---

void RelayReceiver::lose() {
    hub_epoch_ = 0;
    local_.on_listener_lost();
}

void RelayReceiver::resync(const RelayView &view) {
    bool was_ready = ready();
    if (was_ready) {
        local_.on_listener_lost();
        ++catchups_;
    }
    relay_epoch_ = view.epoch;
    overruns_seen_ = view.overruns;
    if (view.sent > last_seq_) {
        // Numbered before now: committed before the streams' next query, which will see it.
        last_seq_ = view.sent;
    }
    hub_epoch_ = epochs_.take();
    local_.on_listener_ready(hub_epoch_, view.newest < 0 ? 0 : view.newest,
                             view.start_for_waiting < 0 ? 0 : view.start_for_waiting);
}

void RelayReceiver::on_datagram(std::string_view datagram, const RelayView &view) {
    if (stopped_) {
        return;
    }
    if (datagram.size() == relay_header) {
        sync(view); // the holder's session began or ended
        return;
    }
    RelayHeader header;
    if (!read_relay_header(datagram, header)) {
        if (!warned_malformed_) {
            log_.write(LogLevel::Warn, "event_piper: ignoring a malformed relay datagram");
            warned_malformed_ = true;
        }
        return;
    }
    uint64_t epoch = header.epoch;
    uint64_t seq = header.seq;
    if (seq <= last_seq_) {
        return; // covered by a re-read of the table already
    }
    bool in_order = seq == last_seq_ + 1;
    last_seq_ = seq;
    if (!(ready() && epoch == relay_epoch_ && in_order)) {
        // Something was missed, or a new session began: through the table again.
        if (view.live && view.epoch == epoch) {
            resync(view);
        } else if (ready()) {
            lose();
        }
    }
    // Also after a resync: catching-up streams note how far notifications have gone.
    std::string_view rest = datagram.substr(relay_header);
    std::string_view payload;
    while (next_relay_record(rest, payload)) {
        ++received_;
        local_.on_notification(payload);
    }
    if (!rest.empty()) { // cut short: what it carried may be lost
        if (!warned_malformed_) {
            log_.write(LogLevel::Warn, "event_piper: ignoring a malformed relay datagram");
            warned_malformed_ = true;
        }
        if (ready()) {
            lose();
        }
        sync(view);
    }
}

void RelayReceiver::sync(const RelayView &view) {
    if (stopped_) {
        return;
    }
    if (view.newest >= 0) {
        local_.note_position(view.newest); // where a new live-only stream starts
    }
    if (!view.live) {
        if (ready()) {
            lose();
        }
        return;
    }
    if (!ready() || view.epoch != relay_epoch_ || view.overruns != overruns_seen_) {
        resync(view);
    }
}

void RelayReceiver::stop() {
    if (ready()) {
        lose();
    }
    stopped_ = true;
}

} // namespace event_piper
