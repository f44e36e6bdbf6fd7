// The LISTEN connection's state machine: connect, LISTEN, read the newest position, then hand
// notifications on; check the connection with a timed round trip now and then; reconnect with
// backoff. A backend sends notifications only between queries, so every query on the LISTEN
// connection is a trivial round trip; the periodic reads of the database (event writers held
// back in COMMIT, then rows of table events that never got a position, a bounded number of ids)
// run on a second connection.
// Each successful LISTEN has a new epoch: a stream that read the table during another epoch (or
// none) may have missed notifications and must read again before it goes live.
#pragma once

#include "ports.hpp"

#include <string>
#include <vector>

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
    enum class Phase { Down, Connecting, Listening, ReadingNewest, ReadingVersion, Live, Checking };

    struct Settings {
        std::string channel;     // a plain identifier (checked by the configuration)
        uint64_t check_ms = 0;   // period of the round trip that checks the link (0: never)
        uint64_t timeout_ms = 0; // how long that round trip may take
        // Rows get their positions after their commit (event_piper_source wal: the positioner
        // follows the writers by milliseconds): a row counts as without a position only when a
        // later round finds it still without, that is after a whole check period.
        bool positioned_after_commit = false;
    };

    // `retry` fires on_retry_timer, `check` fires on_check_timer. `table_link` (its owner must
    // be this listener too) runs the check of table events, opened at the first check.
    Listener(DbLink &link, DbLink &table_link, Timer &retry, Timer &check, ListenerEvents &events,
             Log &log, Settings settings);

    // The table check's first round reads the newest oldest_id_scanned ids of events, later
    // rounds at most ids_per_check ids above those read (never further back than
    // oldest_id_scanned below the newest); the rows without a position it finds are followed
    // by id, at most unpositioned_followed of them (beyond, unpositioned_rows() is a lower
    // bound).
    static constexpr int64_t ids_per_check = 10000;
    static constexpr int64_t oldest_id_scanned = 100000;
    static constexpr size_t unpositioned_followed = 1000;

    // The database schema's version (postgresql/schema.sql's event_piper_schema_version()),
    // read once per listening connection; schema_version_unversioned is a schema without that
    // function (the release of c28232f). This module works against this version and the
    // earlier ones down to that; a newer schema is read as this one (each schema change keeps
    // what older modules read working).
    static constexpr int64_t schema_version_unversioned = 1;
    static constexpr int64_t schema_version_current = 4;

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
    // receive them until schema.sql is applied again. Counted by the table check that runs
    // with every check round trip (exact up to unpositioned_followed rows).
    int64_t unpositioned_rows() const { return unpositioned_; }
    // Times the check found positions committed a whole check period earlier that no
    // notification had announced (another channel, a foreign or missing trigger): each time the
    // streams were sent to the table with a bare position hint.
    uint64_t unnotified_hints() const { return unnotified_hints_; }
    // Event writers that had waited in COMMIT for more than a second at the last check: a
    // transaction that reserved positions before them has not ended (see held_writers_sql).
    int64_t writers_waiting() const { return writers_waiting_; }
    // The schema version read by the current (or last) listening connection (0: none read yet).
    int64_t schema_version() const { return schema_version_; }

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
    void note_schema_version();
    void note_unpositioned(int64_t rows);
    void note_committed(int64_t newest_committed);
    void note_held_writers(const QueryResult &result);
    void start_table_check();
    void send_table_round();
    void send_table_check();
    void on_table_result(const QueryResult &result);
    void on_table_idle();
    void table_failed(std::string_view why);

    DbLink &link_;
    DbLink &table_link_;
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
    uint64_t since_read_ = 0; // the oldest waiting stream's time the start point was read for
    std::string last_error_;  // logged once per distinct reason
    int64_t unpositioned_ = 0;
    // The table check: ids up to scanned_to_ were read (those without a position are in
    // unpositioned_ids_, lowest first, and read again by id every round); what the round in
    // flight answered; rounds that found it still busy; its last error (logged once).
    int64_t scanned_to_ = 0;
    std::vector<int64_t> unpositioned_ids_;
    std::string known_param_;
    struct TableAnswer {
        bool ok = false;
        int64_t scanned_to = 0; // 0: no id above scanned_to_
        int64_t found = 0;      // rows without a position among the ids read
        std::vector<int64_t> found_ids, still_ids;
    } answer_;
    int table_busy_rounds_ = 0;
    std::string table_error_;
    // The query in flight on the second connection: a round sends the held writers' query, then
    // the table check.
    enum class TableQuery { None, Writers, Table } table_query_ = TableQuery::None;
    bool writers_check_ = true; // false after the server refused that query once
    int64_t writers_waiting_ = 0;
    std::string writers_blocker_; // as last logged ("": none)
    // Positions up to here need no announcement (read when the listener went live, or hinted
    // by the check), and the newest committed one the previous check saw.
    int64_t announced_floor_ = 0;
    int64_t checked_newest_ = 0;
    uint64_t unnotified_hints_ = 0;
    bool ever_live_ = false;
    int64_t schema_version_ = 0;
    bool has_version_function_ = false; // the newest position's query found the function
    int64_t version_logged_ = 0;        // the version last named in the log (0: none)
    bool channel_mismatch_ = false;
    bool closed_ = false;
};

} // namespace event_piper
