// The shared listener's sockets and shared memory (see ngx_relay.hpp).
//
// A receiver connect()s its datagram socket to the holder's: the kernel then bounds what is
// queued for it by the holder's send buffer (event_piper_relay_buffer) instead of the tiny
// net.unix.max_dgram_qlen (10 by default), and refuses datagrams from anyone else.
#include "ngx_relay.hpp"

#include "core/grammar.hpp"

#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <unistd.h>

namespace event_piper {

namespace {

constexpr ngx_msec_t tick_ms = 500;
// The receive buffer. A datagram holds at most relay_batch_bytes, or one notification, which is
// shorter than grammar::notify_payload_limit (docs/notification-grammar.md).
constexpr size_t max_datagram = 65536;
static_assert(relay_batch_bytes <= max_datagram &&
                  relay_header + 4 + grammar::notify_payload_limit <= max_datagram,
              "every datagram fits in the receive buffer");

// The holder word: pid and status slot together, so that one compare-and-swap claims both and
// a follower never pairs a new holder with the previous holder's socket.
uint64_t holder_word(ngx_pid_t pid, size_t slot) {
    return (static_cast<uint64_t>(pid) << 8) | slot;
}
ngx_atomic_uint_t holder_pid(uint64_t word) {
    return static_cast<ngx_atomic_uint_t>(word >> 8);
}
size_t holder_slot(uint64_t word) {
    return static_cast<size_t>(word & 0xff);
}
static_assert(status_slots <= 256, "the holder word keeps the slot in 8 bits");

// The role as shared memory shows it. `check_process`: also ask the kernel whether the pid
// exists (a syscall: not per datagram). A pid that exists proves nothing (frozen, or reused):
// the heartbeat in the holder's own slot does.
RoleSight sight(const StatusZone *zone, bool check_process) {
    RoleSight seen;
    seen.holder = zone->board.holder.load();
    if (seen.holder == 0) {
        return seen;
    }
    size_t slot = holder_slot(seen.holder);
    ngx_atomic_uint_t pid = holder_pid(seen.holder);
    if (slot >= status_slots || zone->slots[slot].owner != pid ||
        (check_process && !process_alive(pid))) {
        seen.holder_gone = true;
        return seen;
    }
    seen.holder_beat_ms = zone->slots[slot].relay.beat_ms.load();
    return seen;
}

} // namespace

uint64_t monotonic_ms() {
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<uint64_t>(ts.tv_sec) * 1000 + static_cast<uint64_t>(ts.tv_nsec) / 1000000;
}

std::unique_ptr<NgxRelay> NgxRelay::create(ngx_log_t *log, ngx_shm_zone_t *zone, StatusSlot *slot,
                                           size_t send_buffer, Hub &hub, EpochSource &epochs,
                                           Log &logger, RoleHooks &listener, uint64_t stale_ms) {
    if (zone == nullptr || zone->data == nullptr || slot == nullptr) {
        return nullptr;
    }
    std::unique_ptr<NgxRelay> relay(new NgxRelay(log, static_cast<StatusZone *>(zone->data), slot,
                                                 hub, epochs, logger, listener, stale_ms));
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        ngx_log_error(NGX_LOG_WARN, log, ngx_errno, "event_piper: relay socket() failed");
        return nullptr;
    }
    relay->fd_ = fd;
    int size = static_cast<int>(send_buffer);
    // Beyond net.core.wmem_max only with CAP_NET_ADMIN; otherwise the kernel caps it.
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size) != 0) {
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    }
    const sockaddr_un &me = relay->addrs_[relay->index()];
    if (bind(fd, reinterpret_cast<const sockaddr *>(&me), relay->addr_len_) != 0) {
        ngx_log_error(NGX_LOG_WARN, log, ngx_errno, "event_piper: relay bind() failed");
        return nullptr;
    }
    return relay;
}

NgxRelay::NgxRelay(ngx_log_t *log, StatusZone *zone, StatusSlot *slot, Hub &hub,
                   EpochSource &epochs, Log &logger, RoleHooks &listener, uint64_t stale_ms)
    : log_(log), zone_(zone), slot_(slot), hub_(hub), sender_(hub, *this, epochs),
      receiver_(hub, epochs, logger), interest_(*this), role_(stale_ms), hooks_{&listener},
      word_(holder_word(ngx_pid, static_cast<size_t>(slot - zone->slots))),
      tick_timer_(log, "listener role check", [this] { tick(); }), addrs_(status_slots),
      buf_(max_datagram) {
    unsigned long long instance = zone_->board.instance;
    for (size_t i = 0; i < status_slots; ++i) {
        sockaddr_un &a = addrs_[i];
        std::memset(&a, 0, sizeof a);
        a.sun_family = AF_UNIX;
        // Abstract namespace: sun_path[0] is '\0'; the name is not NUL-terminated.
        int n = std::snprintf(a.sun_path + 1, sizeof a.sun_path - 1, "event_piper/%016llx/%03zu",
                              instance, i);
        addr_len_ = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + n);
    }
    hub_.set_interest(&interest_);
}

NgxRelay::~NgxRelay() {
    hub_.set_interest(nullptr);
    release();
}

void NgxRelay::start() {
    ngx_connection_t *c = ngx_get_connection(fd_, log_);
    if (c != nullptr) {
        c->data = this;
        c->read->handler = read_handler;
        c->read->log = log_;
        c->write->log = log_;
        if (ngx_add_event(c->read, NGX_READ_EVENT, NGX_LEVEL_EVENT) != NGX_OK) {
            c->fd = (ngx_socket_t)-1;
            ngx_free_connection(c);
            c = nullptr;
        }
    }
    if (c == nullptr) {
        ngx_log_error(NGX_LOG_WARN, log_, 0, "event_piper: cannot watch the relay socket");
    }
    c_ = c;
    slot_->relay.bound = 1;
    tick();
}

void NgxRelay::release() {
    tick_timer_.cancel();
    if (holder_) {
        holder_ = false; // first: this worker publishes and forwards nothing any more
        uint64_t mine = word_;
        if (zone_->board.holder.load() == mine) {
            zone_->board.live = 0;
            zone_->board.holder.compare_exchange_strong(mine, 0);
        }
    }
    if (fd_ < 0) {
        return; // released already
    }
    slot_->relay.bound = 0;
    if (c_ != nullptr) {
        ngx_close_connection(c_); // closes fd_ too
        c_ = nullptr;
        fd_ = -1;
    } else if (fd_ >= 0) {
        ::close(fd_);
        fd_ = -1;
    }
}

RelayView NgxRelay::view(bool check_holder) const {
    const RelayBoard &b = zone_->board;
    RelayView v;
    v.live = b.live == 1 && role_.holder_live(sight(zone_, check_holder), monotonic_ms());
    v.epoch = b.epoch;
    v.newest = b.newest;
    v.start_for_waiting = b.start_for_waiting;
    v.sent = slot_->relay.seq;
    v.overruns = slot_->relay.overruns;
    return v;
}

void NgxRelay::tick() {
    slot_->relay.beat_ms = monotonic_ms(); // this worker's event loop runs
    if (fd_ >= 0) {
        check_role();
    }
    if (!holder_ && fd_ >= 0) {
        follow(zone_->board.holder.load());
        receiver_.sync(view(true));
    }
    slot_->relay.waiting_since_ms = hub_.waiting_since_ms();
    tick_timer_.arm(tick_ms);
}

void NgxRelay::check_role() {
    RoleSight seen = sight(zone_, true);
    switch (role_.decide(word_, holder_, seen, monotonic_ms())) {
    case Role::Step::Claim: {
        uint64_t expected = seen.holder;
        if (zone_->board.holder.compare_exchange_strong(expected, word_)) {
            gain(seen);
        }
        return;
    }
    case Role::Step::StepDown:
        step_down(seen.holder);
        return;
    case Role::Step::Keep:
        return;
    }
}

void NgxRelay::gain(const RoleSight &seen) {
    // The role is ours: the previous holder's session is over for everyone.
    zone_->board.live = 0;
    holder_ = true;
    receiver_.stop();
    sockaddr unspec{};
    unspec.sa_family = AF_UNSPEC; // dissolve the association with the previous holder
    connect(fd_, &unspec, sizeof unspec);
    following_ = 0;
    if (seen.holder != 0 && seen.holder != word_) {
        ++takeovers_;
        if (seen.holder_gone) {
            ngx_log_error(NGX_LOG_WARN, log_, 0,
                          "event_piper: this worker took the listener over from worker %P, which "
                          "is gone",
                          static_cast<ngx_pid_t>(holder_pid(seen.holder)));
        } else {
            ngx_log_error(NGX_LOG_WARN, log_, 0,
                          "event_piper: this worker took the listener over from worker %P, whose "
                          "last heartbeat is %uL ms old (frozen?)",
                          static_cast<ngx_pid_t>(holder_pid(seen.holder)),
                          static_cast<uint64_t>(Role::silence_ms(seen, monotonic_ms())));
        }
    } else {
        ngx_log_error(NGX_LOG_NOTICE, log_, 0, "event_piper: this worker holds the listener");
    }
    for (RoleHooks *hooks : hooks_) {
        hooks->on_role_gained();
    }
}

void NgxRelay::step_down(uint64_t by) {
    ngx_log_error(NGX_LOG_WARN, log_, 0,
                  "event_piper: worker %P took the listener over while this worker was not "
                  "running (stopped or stalled): this worker steps down and follows it",
                  static_cast<ngx_pid_t>(holder_pid(by)));
    holder_ = false; // first: this worker publishes and forwards nothing any more
    for (auto it = hooks_.rbegin(); it != hooks_.rend(); ++it) {
        (*it)->on_role_lost();
    }
    sender_.abandon(); // its streams re-read the table before they follow the new holder
    receiver_.resume();
}

void NgxRelay::follow(uint64_t holder) {
    if (holder == 0 || holder == following_) {
        return;
    }
    size_t slot = holder_slot(holder);
    if (slot >= status_slots) {
        return;
    }
    // Fails while the new holder has not published its slot yet: tried again next tick.
    if (connect(fd_, reinterpret_cast<const sockaddr *>(&addrs_[slot]), addr_len_) == 0) {
        following_ = holder;
    }
}

void NgxRelay::read_handler(ngx_event_t *ev) noexcept {
    auto *c = static_cast<ngx_connection_t *>(ev->data);
    auto *self = static_cast<NgxRelay *>(c->data);
    try {
        self->drain();
    } catch (const std::exception &e) {
        ngx_log_error(NGX_LOG_ERR, ev->log, 0, "event_piper: relay: %s", e.what());
    } catch (...) {
        ngx_log_error(NGX_LOG_ERR, ev->log, 0, "event_piper: relay failed");
    }
}

void NgxRelay::drain() {
    for (;;) {
        ssize_t n = recv(fd_, buf_.data(), buf_.size(), 0);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            break; // EAGAIN: drained (errors: the next tick checks shared memory)
        }
        if (!holder_) {
            receiver_.on_datagram(std::string_view(buf_.data(), static_cast<size_t>(n)),
                                  view(false));
        }
    }
    if (!holder_) {
        receiver_.sync(view(false)); // an overrun that no later datagram revealed
    }
}

bool NgxRelay::wants(size_t peer, size_t bit) const {
    const StatusSlot &s = zone_->slots[peer];
    if (!holder_ || &s == slot_ || s.owner == 0 || s.relay.bound != 1) {
        return false;
    }
    if (!mine()) {
        return false; // woken after a takeover: the role is another worker's now
    }
    if (bit == any_stream) {
        return true; // a bare position: every stream may need the table
    }
    // seq_cst, after the newest position was published (see InterestBits::newest_published).
    return (s.relay.interest[bit / 64].load() >> (bit % 64)) & 1;
}

uint64_t NgxRelay::next_seq(size_t peer) {
    return zone_->slots[peer].relay.seq.fetch_add(1) + 1;
}

NgxRelay::Sent NgxRelay::send(size_t peer, std::string_view datagram) {
    ssize_t n = sendto(fd_, datagram.data(), datagram.size(), MSG_DONTWAIT,
                       reinterpret_cast<const sockaddr *>(&addrs_[peer]), addr_len_);
    if (n >= 0) {
        return Sent::Ok;
    }
    // ECONNREFUSED: no such socket, the worker is gone. EAGAIN, ENOBUFS: full. EPERM: it still
    // follows the previous holder. EMSGSIZE: too large. All but the first: it re-reads.
    return errno == ECONNREFUSED || errno == ENOENT ? Sent::Gone : Sent::Lost;
}

void NgxRelay::overrun(size_t peer) {
    zone_->slots[peer].relay.overruns.fetch_add(1);
}

uint64_t NgxRelay::new_epoch() {
    return zone_->board.epochs.fetch_add(1) + 1;
}

void NgxRelay::publish(bool live, uint64_t epoch, int64_t newest, int64_t start_for_waiting) {
    if (!mine()) {
        return; // the role went to another worker: its board now
    }
    RelayBoard &b = zone_->board;
    b.live = 0;
    b.epoch = epoch;
    b.newest = newest;
    b.start_for_waiting = start_for_waiting;
    b.live = live ? 1 : 0; // last: a reader that sees it live sees this session's figures
}

void NgxRelay::publish_newest(int64_t newest) {
    if (holder_) {
        raise_newest(zone_->board, newest);
    }
}

int64_t NgxRelay::newest_published() const {
    return holder_ ? -1 : zone_->board.newest.load();
}

void NgxRelay::publish_waiting_since(uint64_t ms) {
    slot_->relay.waiting_since_ms = ms; // also each tick, from the hub
}

uint64_t NgxRelay::waiting_since_ms(uint64_t mine) const {
    uint64_t oldest = mine;
    for (const StatusSlot &s : zone_->slots) {
        uint64_t w = s.owner != 0 ? s.relay.waiting_since_ms.load() : 0;
        if (w != 0 && (oldest == 0 || w < oldest)) {
            oldest = w;
        }
    }
    return oldest;
}

void NgxRelay::set(size_t bit, bool on) {
    uint64_t mask = uint64_t{1} << (bit % 64);
    if (on) {
        slot_->relay.interest[bit / 64].fetch_or(mask); // seq_cst: before the first query
    } else {
        slot_->relay.interest[bit / 64].fetch_and(~mask);
    }
}

void NgxRelay::fill_stats(WorkerStats &stats) const {
    stats.listener_holder = holder_ ? 1 : 0;
    stats.listener_takeovers = takeovers_;
    stats.relay_forwarded = receiver_.received();
    stats.relay_dropped = slot_->relay.overruns;
    stats.relay_catchups = receiver_.catchups();
    if (!holder_) {
        stats.listener_state = receiver_.ready() ? 1 : 0;
    }
}

InstanceListener instance_listener(ngx_shm_zone_t *zone, uint64_t stale_ms) {
    using State = InstanceListener::State;
    if (zone == nullptr || zone->data == nullptr) {
        return {State::NoHolder, nullptr};
    }
    const auto *z = static_cast<const StatusZone *>(zone->data);
    RoleSight seen = sight(z, true);
    if (seen.holder == 0 || seen.holder_gone) {
        return {State::NoHolder, nullptr};
    }
    if (!Role(stale_ms).holder_live(seen, monotonic_ms())) {
        return {State::HolderFrozen, nullptr};
    }
    const StatusSlot *slot = &z->slots[holder_slot(seen.holder)];
    return {z->board.live == 1 ? State::Listening : State::NotConnected, slot};
}

} // namespace event_piper
