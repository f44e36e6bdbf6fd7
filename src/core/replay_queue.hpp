// The replay queue: streams waiting for their next catch-up batch, served first come, first
// served by a fixed set of database links (opened on demand, each back in the pool after every
// batch: no transaction or cursor outlives a batch). Decides which stream is served, when a
// batch means "more rows follow", when a stream may go live, and when to retry after a failure.
// Streams waiting for the same rows (same consumer, same position: a thousand tabs of one user
// sent to the table by one large event) share one query. The bytes that served batches hold
// until their clients take them are bounded: beyond the budget, streams wait their turn.
#pragma once

#include "ports.hpp"
#include "stream.hpp"

#include <deque>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

namespace event_piper {

class ReplayEvents {
public:
    virtual uint64_t listener_epoch() const = 0; // 0: not listening
    virtual void note_position(int64_t position) = 0;

protected:
    ~ReplayEvents() = default;
};

class ReplayQueue : public DbLinkOwner {
public:
    // One keyset batch for a stream of `ids` consumer ids: $1 the last position, $2 the rows,
    // $3 the bytes, $4... the ids. One index range scan per id (ORDER BY position LIMIT $2 on
    // (subscriber, position)), merged by position and cut at $2 rows: never a sort of a
    // consumer's history. No more rows than fit in about $3 bytes (at least one), so that a
    // batch of large payloads cannot balloon the worker. `fetched` tells a batch cut by the byte
    // cap (more rows follow) from a short batch (the end of the history). `newest` is the
    // newest committed position; with no row left, the query still answers one row of NULLs
    // carrying it.
    // Columns 5 and 6: a patch's target position (NULL for a plain event) and whether the row
    // is a whole state rather than a merge patch (a compaction's stand-in). The target is read
    // from the row as JSON, so the query also runs on a schema without patches (NULL then).
    static std::string batch_sql(size_t ids);
    // The folded batch (same parameters and columns): per event touched after $1, one row at
    // the position of the newest row of its family (the event, its patches, a stand-in), ordered
    // by that position: a plain event as it is, else its state merged in PostgreSQL
    // (event_piper_state), target = the event's position. Needs the schema's patch functions.
    static std::string folded_sql(size_t ids);
    // Does the schema have them? Asked once per connection, when a folded stream first needs it.
    static const char *folding_probe_sql();
    // Asked of a standby link when it connects and now and then between batches: whether the
    // server is in recovery (a standby), and its replay lag in milliseconds.
    static const char *standby_probe_sql();
    static constexpr uint64_t standby_probe_period_ms = 2000;

    // `retry` fires on_retry_timer. `memory_budget`: bytes of served batches that clients have
    // not taken yet, beyond which no batch is sent (0: no limit). `clock` spaces out the log
    // lines of failed queries (nullptr: every failure is logged).
    ReplayQueue(Timer &retry, ReplayEvents &events, Log &log, size_t memory_budget = 0,
                const Clock *clock = nullptr);

    // A failed query is logged at most once per reason per this period, with the number of
    // failures for that reason since its previous line.
    static constexpr uint64_t failure_log_period_ms = 10000;
    // A connection for the pool; its owner (DbLinkOwner) must be this queue.
    void add_link(DbLink &link) {
        Slot slot;
        slot.link = &link;
        slots_.push_back(slot);
    }
    // A connection to a hot standby (event_piper_replay_postgres). Standbys read history; the
    // primary confirms the tail: a batch from a standby is trusted up to its last row only, so a
    // short one (the standby's end of the history, maybe behind the primary's) sends the
    // stream's next batch to the primary, whose short batch alone may turn it live. A server
    // that is not in recovery is not used. While no standby answers, the primary serves all.
    void add_standby_link(DbLink &link) {
        add_link(link);
        slots_.back().standby = true;
        has_standby_ = true;
    }

    // Queues the stream for its next batch (no-op if queued or in flight).
    void request(Stream &s);
    // Forgets the stream: out of the queue; a batch in flight is discarded when it completes;
    // its bytes leave the budget.
    void cancel(Stream &s);
    // The stream's client has taken the bytes of its batches: they leave the budget.
    void release(Stream &s);
    size_t held_bytes() const { return held_; }
    void close_all();
    void on_retry_timer() { dispatch(); }

    uint64_t queries() const { return queries_; }
    uint64_t failures() const { return failures_; } // queries the server refused
    size_t queued() const { return queue_.size() + primary_queue_.size(); }
    // Per kind of server: batch queries sent and rows received.
    struct Served {
        uint64_t queries = 0;
        uint64_t rows = 0;
    };
    const Served &primary_served() const { return primary_; }
    const Served &standby_served() const { return standby_; }
    // A standby link is connected and answered the standby check.
    bool standby_up() const;
    // The replay lag a standby reported at its last check (0 while none is up).
    uint64_t standby_lag_ms() const { return standby_up() ? standby_lag_ms_ : 0; }

    void on_link_ready(DbLink &link) override;
    void on_link_result(DbLink &link, const QueryResult &result) override;
    void on_link_idle(DbLink &link) override;
    void on_link_lost(DbLink &link, std::string_view why) override;

private:
    enum class Folding { Unknown, Yes, No };     // the link's schema has the patch functions
    enum class Probe { None, Folding, Standby }; // a check in flight instead of a batch
    struct Slot {
        DbLink *link = nullptr;
        Folding folding = Folding::Unknown; // kept by reset(): a property of the connection
        bool standby = false;               // kept by reset(): of the standby pool
        uint64_t probed_ms = 0;             // kept by reset(): its last standby check
        bool checked = false;               // kept by reset(): passed it on this connection
        Probe probe = Probe::None;          // the query in flight is a check
        std::string not_standby;            // the standby check's refusal, if any
        std::vector<Stream *> streams;      // whose batch is in flight (nullptr: gone meanwhile)
        std::vector<Stream *> deferred;     // beyond the budget: asked again, first
        size_t rows = 0;                    // rows received
        size_t bytes = 0;                   // bytes of the frames those rows made
        size_t fetched = 0;                 // rows the query found before the byte cap
        int64_t newest = 0;                 // newest committed position when the query ran
        bool failed = false;                // the server refused the query
    };
    void dispatch();
    bool serve(std::deque<Stream *> &q, bool standby);
    void enqueue(Stream &s, bool front);
    void retry_standby();
    void standby_lost(std::string_view why);
    Slot &slot_of(DbLink &link);
    static void reset(Slot &slot);
    void log_failure(const std::string &why);

    std::vector<Slot> slots_;
    Timer &retry_;
    ReplayEvents &events_;
    Log &log_;
    std::deque<Stream *> queue_;              // served by a standby if one is up, else the primary
    std::deque<Stream *> primary_queue_;      // streams whose next batch must come from the primary
    std::unordered_set<Stream *> on_primary_; // until they go live
    std::unordered_set<Stream *> queued_;
    std::vector<std::string> sql_;        // batch_sql(n) at [n - 1], built when first needed
    std::vector<std::string> folded_sql_; // folded_sql(n) likewise
    bool warned_no_folding_ = false;
    std::vector<const char *> params_;             // of the query being sent
    std::string frames_;                           // a batch, framed once for all its streams
    std::vector<std::pair<int64_t, size_t>> ends_; // each frame's position and end in frames_
    size_t budget_;
    size_t held_ = 0; // sum of the streams' replay_held()
    Backoff backoff_;
    uint64_t queries_ = 0;
    uint64_t failures_ = 0;
    const Clock *clock_;
    struct FailureLine {
        std::string why;
        uint64_t logged_ms = 0;
        uint64_t unlogged = 0; // failures for this reason since its last line
    };
    std::vector<FailureLine> failure_lines_; // a few reasons (bounded)
    bool reported_down_ = false;
    bool dispatching_ = false;
    bool has_standby_ = false;
    bool standby_down_ = false; // until a standby link answers the standby check again
    bool standby_reported_down_ = false;
    uint64_t standby_retry_at_ms_ = 0;
    Backoff standby_backoff_;
    uint64_t standby_lag_ms_ = 0;
    Served primary_;
    Served standby_;
};

} // namespace event_piper
