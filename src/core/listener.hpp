// The LISTEN connection's state machine: connect, LISTEN, read the newest position, then hand
// notifications on; check the connection with a timed round trip now and then (which also counts
// committed rows that never got a position, then looks for event writers held back in COMMIT);
// reconnect with backoff.
// Each successful LISTEN has a new epoch: a stream that read the table during another epoch (or
// none) may have missed notifications and must read again before it goes live.
#pragma once

#include "ports.hpp"

#include <string>

namespace event_piper {

class ListenerEvents {
public:
    // Listening since epoch `epoch`; `newest` is the newest committed position. Streams opened
    // without a resume point while no position was known start at `start_for_waiting`.
    virtual void on_listener_ready(uint64_t epoch, int64_t newest, int64_t start_for_waiting) = 0;
    virtual void on_listener_lost() = 0;
    virtual void on_notification(std::string_view payload) = 0;
    // When the oldest stream still waiting for a start position opened (0: none).
    virtual uint64_t waiting_since_ms() const = 0;
    // The notifications of one read have all been handed over (a batch ends here).
    virtual void on_notifications_done() {}
    // The newest position that a notification announced (kept where notifications are parsed
    // anyway, so that the listener's check costs the hot path nothing).
    virtual int64_t newest_notified() const = 0;

protected:
    ~ListenerEvents() = default;
};

class Listener : public DbLinkOwner {
public:
    enum class Phase { Down, Connecting, Listening, ReadingNewest, Live, Checking };

    struct Settings {
        std::string channel;     // a plain identifier (checked by the configuration)
        uint64_t check_ms = 0;   // period of the round trip that checks the link (0: never)
        uint64_t timeout_ms = 0; // how long that round trip may take
    };

    // `retry` fires on_retry_timer, `check` fires on_check_timer.
    Listener(DbLink &link, Timer &retry, Timer &check, ListenerEvents &events, Log &log,
             Settings settings);

    void start();
    void close(); // for good: nothing is reported after this
    // Closes the connection, reporting nothing; start() listens again (the shared listener's
    // role went to another worker).
    void stop();
    void on_retry_timer() { start(); }
    void on_check_timer();

    Phase phase() const { return phase_; }
    uint64_t epoch() const { return epoch_; } // 0 while not listening
    uint64_t reconnects() const { return reconnects_; }
    // The database's event_piper.channel setting differs from ours: the trigger notifies another
    // channel: no notification arrives, streams get events only from the check's hints.
    bool channel_mismatch() const { return channel_mismatch_; }
    // Committed rows without a position (the trigger was disabled or dropped): no client can
    // receive them until schema.sql is applied again. Counted by every check round trip.
    int64_t unpositioned_rows() const { return unpositioned_; }
    // Times the check found positions committed a whole check period earlier that no
    // notification had announced (another channel, a foreign or missing trigger): each time the
    // streams were sent to the table with a bare position hint.
    uint64_t unnotified_hints() const { return unnotified_hints_; }
    // Event writers that had waited in COMMIT for more than a second at the last check: a
    // transaction that reserved positions before them has not ended (see held_writers_sql).
    int64_t writers_waiting() const { return writers_waiting_; }

    void on_link_ready(DbLink &link) override;
    void on_link_result(DbLink &link, const QueryResult &result) override;
    void on_link_idle(DbLink &link) override;
    void on_link_lost(DbLink &link, std::string_view why) override;
    void on_link_notify(DbLink &link, std::string_view payload) override;
    void on_link_notifies_done(DbLink &) override { events_.on_notifications_done(); }

private:
    void lose(std::string_view why);
    void read_newest();
    void go_live();
    void note_unpositioned(int64_t rows);
    void note_committed(int64_t newest_committed);
    void note_held_writers(const QueryResult &result);

    DbLink &link_;
    Timer &retry_;
    Timer &check_;
    ListenerEvents &events_;
    Log &log_;
    Settings settings_;
    std::string listen_sql_;
    Backoff backoff_;
    Phase phase_ = Phase::Down;
    uint64_t epoch_ = 0;
    uint64_t listens_ = 0; // successful LISTENs so far: the next epoch
    uint64_t reconnects_ = 0;
    int64_t newest_ = 0;
    int64_t start_for_waiting_ = 0;
    std::string last_error_; // logged once per distinct reason
    int64_t unpositioned_ = 0;
    int64_t check_after_id_ = 0; // ids up to here had positions at the last check
    // Positions up to here need no announcement (read when the listener went live, or hinted
    // by the check), and the newest committed one the previous check saw.
    int64_t announced_floor_ = 0;
    int64_t checked_newest_ = 0;
    uint64_t unnotified_hints_ = 0;
    // The second query of a check round (held writers) is in flight; false after the server
    // refused it once (then only the first query runs).
    bool checking_writers_ = false;
    bool writers_check_ = true;
    int64_t writers_waiting_ = 0;
    std::string writers_blocker_; // as last logged ("" : none)
    bool ever_live_ = false;
    bool channel_mismatch_ = false;
    bool closed_ = false;
};

} // namespace event_piper
