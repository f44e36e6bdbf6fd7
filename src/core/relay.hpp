// One LISTEN connection per nginx instance (`event_piper_listener shared`): the worker holding
// the listener forwards each notification to the workers that may have a stream for its
// consumer (RelaySender); every other worker turns what it receives, and what shared memory says
// about the holder, into the listener events of its own hub (RelayReceiver). A datagram carries
// the holder's listening session (epoch) and a per-receiver sequence number: any gap, overrun or
// new session sends the receiver's streams through the table before they are live again.
#pragma once

#include "hub.hpp"
#include "listener.hpp"

#include <atomic>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace event_piper {

// Consumers are published to the holder as bits of a hashed set: a false positive costs one
// wake-up, a false negative cannot happen.
constexpr size_t interest_bits = 65536;
size_t consumer_bit(std::string_view consumer);

// The shared-memory bits of one worker's interest set.
class InterestBits {
public:
    virtual void set(size_t bit, bool on) = 0;
    // Read after setting bits: the newest position the listener's holder has published, if this
    // worker follows it (-1: none, or this worker holds the listener). The holder publishes a
    // position before it reads the bits, so every event above it reaches a stream whose bits
    // were set before this read (forwarded, or re-read from the table).
    virtual int64_t newest_published() const { return -1; }
    // When this worker's oldest stream without a position began waiting (0: none), published
    // at once: the listener's holder reads it for the start point of waiting streams.
    virtual void publish_waiting_since(uint64_t) {}

protected:
    ~InterestBits() = default;
};

// Streams per bit of this worker; a bit is set while at least one stream hashes to it. Set
// before the stream's first query, so every notification the query cannot see is forwarded.
class InterestMap {
public:
    explicit InterestMap(InterestBits &bits) : bits_(bits), counts_(interest_bits, 0) {}
    void add(std::string_view consumer);
    void remove(std::string_view consumer);
    int64_t newest_published() const { return bits_.newest_published(); }
    void publish_waiting_since(uint64_t ms) { bits_.publish_waiting_since(ms); }

private:
    InterestBits &bits_;
    std::vector<uint32_t> counts_;
};

// The instance's listener in shared memory (atomics in zeroed memory: lock-free words across
// processes). init_relay_board() gives it the state it starts from: no position known.
struct RelayBoard {
    std::atomic<uint64_t> instance; // random at zone creation: names the instance's sockets
    std::atomic<uint64_t> holder;   // the role's word: (pid << 8) | slot of its holder (0: none)
    std::atomic<uint64_t> epochs;   // the last epoch handed out
    std::atomic<uint64_t> epoch;    // the holder's listening session
    std::atomic<uint64_t> live;     // 1: the holder's listener is listening
    std::atomic<int64_t> newest;    // the newest position the holder knows (-1: none yet)
    std::atomic<int64_t> start_for_waiting;
};
void init_relay_board(RelayBoard &board, uint64_t instance);
// Two holders may overlap for a moment (a frozen one waking up): the newest only grows.
void raise_newest(RelayBoard &board, int64_t newest);

// What shared memory says about the instance's listener, as one receiver sees it.
struct RelayView {
    bool live = false;  // a live holder whose listener is listening
    uint64_t epoch = 0; // its listening session, unique and increasing in the instance
    int64_t newest = -1;
    int64_t start_for_waiting = -1;
    uint64_t sent = 0;     // the last sequence number the holder took for this worker
    uint64_t overruns = 0; // sends to this worker that failed (its buffer full)
};

// The holder's side of shared memory and of the sockets.
class RelayPeers {
public:
    enum class Sent { Ok, Lost, Gone }; // Lost: not delivered (full, too large); Gone: no process
    static constexpr size_t any_stream = static_cast<size_t>(-1);

    virtual size_t size() const = 0; // peer indexes are 0..size()-1
    // A worker other than this one that may want it: interest `bit` set (any_stream: any stream).
    virtual bool wants(size_t peer, size_t bit) const = 0;
    virtual uint64_t next_seq(size_t peer) = 0;
    virtual Sent send(size_t peer, std::string_view datagram) = 0;
    virtual void overrun(size_t peer) = 0; // counted in the peer's shared slot
    virtual uint64_t new_epoch() = 0;
    virtual void publish(bool live, uint64_t epoch, int64_t newest, int64_t start_for_waiting) = 0;
    virtual void publish_newest(int64_t newest) = 0;
    // The oldest "waiting since" of all workers (streams opened while no position was known).
    virtual uint64_t waiting_since_ms(uint64_t mine) const = 0;

protected:
    ~RelayPeers() = default;
};

// Hub epochs of one worker: whether from its own listener or from the relay, every listening
// session it has seen gets a new number, so no catch-up query spans two sessions unnoticed.
struct EpochSource {
    uint64_t last = 0;
    uint64_t take() { return ++last; }
};

// A datagram, in host byte order (both ends are on one machine):
//   bytes 0-7    epoch: the holder's listening session (0: none)
//   bytes 8-15   seq: this receiver's sequence number (RelayPeers::next_seq; 0 in a bare header)
//   then records, each a 4-byte length and that many bytes: one notification's payload.
// A bare header (no record) asks the receiver to look at shared memory now. The holder sends a
// worker one datagram per read of its listening socket (or per relay_batch_bytes), not one per
// notification.
struct RelayHeader {
    static constexpr size_t epoch_at = 0;
    static constexpr size_t seq_at = 8;
    static constexpr size_t size = 16;
    uint64_t epoch = 0;
    uint64_t seq = 0;
};
constexpr size_t relay_header = RelayHeader::size;
constexpr size_t relay_length_bytes = 4; // each record's length
constexpr size_t relay_batch_bytes = 32768;

// `datagram` becomes a bare header of `epoch` (seq 0).
void start_relay_datagram(std::string &datagram, uint64_t epoch);
// Numbers a datagram begun by start_relay_datagram().
void set_relay_seq(std::string &datagram, uint64_t seq);
void append_relay_record(std::string &datagram, std::string_view payload);
// False if `datagram` is shorter than a header.
bool read_relay_header(std::string_view datagram, RelayHeader &header);
// Takes the first whole record off `records` (the bytes after the header); false, and `records`
// unchanged, if none is whole.
bool next_relay_record(std::string_view &records, std::string_view &payload);

// Sits between the holder's Listener and its hub.
class RelaySender : public ListenerEvents {
public:
    RelaySender(Hub &local, RelayPeers &peers, EpochSource &epochs)
        : local_(local), peers_(peers), epochs_(epochs) {}

    void on_listener_ready(uint64_t epoch, int64_t newest, int64_t start_for_waiting) override;
    void on_listener_lost() override;
    void on_notification(std::string_view payload) override;
    uint64_t waiting_since_ms() const override;
    int64_t newest_notified() const override { return local_.newest_notified(); }
    void on_notifications_done() override { flush(); }

    // This worker lost the role (another took it over while it was frozen): its session ends
    // without a word to shared memory, which belongs to the new holder now.
    void abandon();

    uint64_t forwarded() const { return forwarded_; }
    uint64_t overruns() const { return overruns_; }

private:
    struct Batch {
        std::string bytes; // header, then records
        uint64_t count = 0;
    };
    void forward(const std::vector<Notification> &events, std::string_view payload);
    void append(size_t peer, std::string_view payload);
    void flush();
    void flush_peer(size_t peer);
    void ping();

    Hub &local_;
    RelayPeers &peers_;
    EpochSource &epochs_;
    std::vector<Batch> batches_;       // by peer
    std::vector<size_t> dirty_;        // peers with a batch to send
    std::vector<Notification> parsed_; // the events of the notification being forwarded
    std::vector<size_t> bits_;         // their interest bits
    uint64_t epoch_ = 0;               // instance-wide session, 0: not listening
    uint64_t forwarded_ = 0;
    uint64_t overruns_ = 0;
};

// A worker that does not hold the listener.
class RelayReceiver {
public:
    RelayReceiver(Hub &local, EpochSource &epochs, Log &log)
        : local_(local), epochs_(epochs), log_(log) {}

    // One datagram from the holder; `view` is shared memory read now. A bare header asks for
    // a sync().
    void on_datagram(std::string_view datagram, const RelayView &view);
    // Periodically and after each drain of the socket.
    void sync(const RelayView &view);
    // This worker takes the listener role: its own listener reports from now on.
    void stop();
    // This worker lost the role: it follows the holder again.
    void resume() { stopped_ = false; }

    bool ready() const { return hub_epoch_ != 0; }
    uint64_t received() const { return received_; }
    uint64_t catchups() const { return catchups_; } // re-reads caused by loss on the way

private:
    void resync(const RelayView &view);
    void lose();

    Hub &local_;
    EpochSource &epochs_;
    Log &log_;
    uint64_t hub_epoch_ = 0;
    uint64_t relay_epoch_ = 0;
    uint64_t last_seq_ = 0;
    uint64_t overruns_seen_ = 0;
    uint64_t received_ = 0;
    uint64_t catchups_ = 0;
    bool stopped_ = false;
    bool warned_malformed_ = false;
};

} // namespace event_piper
