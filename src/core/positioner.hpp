// The positioner (event_piper_source wal, docs/wal-source.md): reads the committed transactions
// of the events table from a logical replication slot (pgoutput), in commit order, and gives
// their surviving rows the next positions, several transactions per positioner transaction,
// together with the notifications the workers read and the progress (the last LSN handled). It
// confirms an LSN to the slot only after that commit, and on restart skips what the stored LSN
// says is done: nothing twice, nothing skipped. A transaction of any size is written in parts
// within one positioner transaction, so memory stays bounded by the batch limits.
#pragma once

#include "defaults.hpp"
#include "pgoutput.hpp"
#include "ports.hpp"

#include <string>
#include <unordered_map>
#include <vector>

namespace event_piper {

// A replication connection (replication=database) in the event loop: replication commands, then
// the CopyBoth stream of START_REPLICATION. Its owner hears through ReplicationOwner.
class ReplicationLink {
public:
    enum class State { Down, Connecting, Ready, Busy, Streaming };

    virtual State state() const = 0;
    virtual void connect() = 0;
    // A replication command (Ready only). START_REPLICATION ends in on_replication_streaming or
    // a failed result; other commands in results and on_replication_idle. False if it failed at
    // once: the link is then Down and the owner has heard on_replication_lost.
    virtual bool command(const std::string &command) = 0;
    // One CopyData message to the server (Streaming only); false: the link is lost (heard).
    virtual bool send_copy(std::string_view bytes) = 0;
    // Streaming: whether to keep reading the socket (false: the server waits, memory stays put).
    virtual void set_reading(bool reading) = 0;
    virtual void close() = 0; // without telling the owner

protected:
    ~ReplicationLink() = default;
};

class ReplicationOwner {
public:
    virtual void on_replication_ready() = 0;
    virtual void on_replication_result(const QueryResult &result) = 0;
    virtual void on_replication_idle() = 0;
    virtual void on_replication_streaming() = 0;
    virtual void on_replication_data(std::string_view copy_data) = 0;
    // Every message read from the socket in one go has been handed over.
    virtual void on_replication_drained() = 0;
    virtual void on_replication_lost(std::string_view why) = 0;

protected:
    ~ReplicationOwner() = default;
};

// One event as the positioner holds it until it is written.
struct WalRow {
    int64_t position = 0; // 0 until given
    int64_t id = 0;
    std::string subscriber;
    std::string type;
    std::string payload;
    int64_t commit_time = 0; // microseconds since 2000-01-01
    bool alive = true;       // false: deleted (or truncated) before it was written
    int64_t patches = 0;     // the id of the event it patches (events.patches); 0: none
    int64_t target = 0;      // that event's position, once checked; 0: delivered as plain
    bool lookup = false;     // the target is not in memory: read from the table before writing
};

// The notifications the trigger would send for one transaction's rows, in position order, built
// the same way (events_commit_notify in schema.sql): one "b" batch of as many as fit in 7,999
// bytes, "e" for a lone event, "r" for an event too large to notify. A patch's records carry
// its target's position after the lengths (docs/notification-grammar.md).
std::vector<std::string> wal_notifications(const std::vector<const WalRow *> &rows);

// A PostgreSQL array literal of text elements, each quoted.
std::string text_array(const std::vector<std::string> &items);
std::string int_array(const std::vector<int64_t> &items);

class Positioner : public DbLinkOwner, public ReplicationOwner {
public:
    enum class Phase {
        Stopped,         // not this worker's role
        Connecting,      // both links
        ReadingProgress, // SELECT the progress row
        Starting,        // START_REPLICATION sent
        Streaming,       // reading; batches applied as they are due
        Waiting,         // after a failure, or the database in trigger mode: retry timer armed
    };

    struct Settings {
        std::string slot = "event_piper";
        std::string publication = "event_piper_events";
        std::string channel = default_channel;
        std::string holder;            // "host pid", stored with the progress
        size_t rows_max = 5000;        // rows (and later changes) pending before a part
        size_t bytes_max = 4 << 20;    // bytes of pending rows and notifications
        uint64_t status_ms = 3000;     // standby status update at least this often
        uint64_t idle_retry_ms = 5000; // retry while the database is in trigger mode
    };

    // `retry` fires on_retry_timer, `status` fires on_status_timer.
    Positioner(DbLink &apply, ReplicationLink &replication, Timer &retry, Timer &status,
               Clock &clock, Log &log, Settings settings);

    void start(); // this worker gained the role
    void stop();  // lost it (or exits): both links closed, nothing pending kept
    void on_retry_timer();
    void on_status_timer();

    Phase phase() const { return phase_; }
    // The LSN whose transactions are positioned and committed (the progress row); 0: none yet.
    pgoutput::Lsn stored_lsn() const { return stored_lsn_; }
    pgoutput::Lsn confirmed_lsn() const { return confirmed_lsn_; }
    pgoutput::Lsn server_wal_end() const { return server_wal_end_; }
    int64_t last_position() const { return last_position_; }
    uint64_t transactions() const { return transactions_; }
    uint64_t rows() const { return rows_; }
    // Commit time (ms since the Unix epoch) of the oldest decoded transaction not yet committed
    // as positions; 0 when nothing is pending.
    uint64_t oldest_pending_ms() const {
        return inflight_oldest_ms_ != 0 ? inflight_oldest_ms_ : oldest_pending_ms_;
    }
    size_t pending_rows() const { return pending_count_; }
    size_t peak_pending_rows() const { return peak_pending_; }
    bool awaiting_switch() const { return awaiting_switch_; }

    // The SQL the positioner sends (postgresql/wal.sql defines the function).
    static const char *progress_sql();
    static const char *apply_sql();
    static const char *drop_idle_slot_sql();
    // A dropped or invalidated slot: created again, with the rows committed meanwhile
    // positioned (event_piper_wal_recreate_slot in wal.sql).
    static const char *recreate_slot_sql();
    // The patched events not in memory: their subscriber, whether they are patches, position.
    static const char *targets_sql();

    // DbLinkOwner (the apply link)
    void on_link_ready(DbLink &link) override;
    void on_link_result(DbLink &link, const QueryResult &result) override;
    void on_link_idle(DbLink &link) override;
    void on_link_lost(DbLink &link, std::string_view why) override;

    // ReplicationOwner
    void on_replication_ready() override;
    void on_replication_result(const QueryResult &result) override;
    void on_replication_idle() override;
    void on_replication_streaming() override;
    void on_replication_data(std::string_view copy_data) override;
    void on_replication_drained() override;
    void on_replication_lost(std::string_view why) override;

private:
    enum class Apply { None, Lookup, Begin, Part, Final, Commit };

    // A transaction whose notifications wait for its patches' targets: its rows are
    // done_[first, last), its notifications go in place of notifications_[slot].
    struct Deferred {
        size_t slot, first, last;
    };

    void connect();
    void lose(std::string_view why, bool quiet = false);
    void wait(uint64_t ms);
    void note_error(LogLevel level, const std::string &text);
    void start_replication();
    void handle_message(const pgoutput::Message &m);
    void handle_change(const pgoutput::Message &m);
    void on_commit(const pgoutput::Message &m);
    void truncate_pending();
    bool column(const std::vector<pgoutput::Column> &tuple, int index, std::string &out) const;
    int64_t patches_of(const std::vector<pgoutput::Column> &tuple) const;
    void maybe_apply();
    void note_xid();
    void send_apply(bool final);
    void resolve_target(WalRow &row);
    void check_target(WalRow &row, bool exists, const std::string &subscriber, int64_t patches,
                      int64_t position);
    void send_lookup(bool final);
    void looked_up();
    void send_plain(const char *sql, Apply what);
    void applied();
    void confirm(pgoutput::Lsn lsn, bool reply);
    void count_pending();

    DbLink &apply_;
    ReplicationLink &replication_;
    Timer &retry_;
    Timer &status_;
    Clock &clock_;
    Log &log_;
    Settings settings_;
    Backoff backoff_;
    Phase phase_ = Phase::Stopped;
    bool apply_ready_ = false;
    bool replication_ready_ = false;
    std::string last_error_;

    // The progress as stored, and what the slot was told.
    pgoutput::Lsn stored_lsn_ = 0;
    bool stored_null_ = true; // the progress row's lsn is NULL (waiting for the switch marker)
    pgoutput::Lsn confirmed_lsn_ = 0;
    pgoutput::Lsn server_wal_end_ = 0;
    int64_t last_position_ = 0; // last position given (written or pending)
    int64_t stored_position_ = 0;
    bool awaiting_switch_ = false; // skipping until the "source wal" message
    bool trigger_mode_ = false;    // the progress row says trigger
    bool dropping_slot_ = false;   // event_piper_wal_drop_idle_slot() in flight
    bool recreating_slot_ = false; // event_piper_wal_recreate_slot() in flight
    std::string slot_gone_;        // why: "dropped" or "invalidated"

    // The relation id of events and its columns' indexes.
    uint32_t events_relid_ = 0;
    int col_id_ = -1, col_type_ = -1, col_subscriber_ = -1, col_payload_ = -1;
    int col_patches_ = -1; // absent before the schema had patches

    // The transaction being decoded.
    bool in_txn_ = false;
    bool skip_txn_ = false;
    bool txn_spilled_ = false; // some of its rows were written in a part already
    bool txn_switch_wal_ = false;
    bool txn_switch_trigger_ = false;
    int64_t txn_commit_time_ = 0;
    int64_t txn_xid_ = 0; // the open transaction's id (pgoutput's Begin)
    // The ids of the decoded transactions whose rows the next write positions: the database
    // waits until they are visible before it commits their positions (see event_piper_wal_apply).
    std::vector<int64_t> xids_;
    int64_t txn_last_position_ = 0;
    std::vector<WalRow> open_;
    std::unordered_map<int64_t, size_t> open_index_;

    // Complete transactions (and the flushed-in-memory parts) not yet written.
    std::vector<WalRow> done_;
    std::unordered_map<int64_t, size_t> done_index_;
    std::vector<std::string> notifications_;
    std::vector<Deferred> deferred_;
    size_t notification_bytes_ = 0;
    std::unordered_map<int64_t, std::string> moves_; // later subscriber changes, by event id
    std::vector<int64_t> deletes_;
    bool truncate_ = false;
    pgoutput::Lsn done_lsn_ = 0; // end LSN of the last complete transaction pending
    bool done_dirty_ = false;    // a complete transaction pending (even without rows)
    uint64_t done_transactions_ = 0;
    size_t pending_count_ = 0;
    size_t pending_bytes_ = 0;
    size_t peak_pending_ = 0;
    uint64_t oldest_pending_ms_ = 0;  // of the transactions pending
    uint64_t inflight_oldest_ms_ = 0; // of those being written

    // The positioner transaction in flight.
    Apply applying_ = Apply::None;
    bool explicit_txn_ = false; // BEGIN sent: parts written, COMMIT to come
    bool apply_failed_ = false;
    pgoutput::Lsn applying_lsn_ = 0;
    int64_t applying_position_ = 0;
    uint64_t applying_transactions_ = 0;
    size_t applying_rows_ = 0;
    bool applying_final_ = false;
    bool lookup_final_ = false; // what send_apply goes on with after the targets' lookup
    std::string lookup_params_;
    std::vector<int64_t> lookup_ids_; // sorted: the ids that read asked for
    struct TargetRow {
        std::string subscriber;
        int64_t patches = 0, position = 0;
    };
    std::unordered_map<int64_t, TargetRow> looked_up_;
    bool reading_ = true;

    uint64_t transactions_ = 0;
    uint64_t rows_ = 0;
};

} // namespace event_piper
