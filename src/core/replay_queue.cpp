// The replay queue (see replay_queue.hpp).
#include "replay_queue.hpp"

#include "sse_frame.hpp"
#include "text.hpp"

#include <algorithm>
#include <charconv>
#include <string>

namespace event_piper {

namespace {

// The columns of batch_sql() and folded_sql(), in the order of their SELECT lists below.
namespace batch_col {
constexpr int position = 0;
constexpr int type = 1;
constexpr int body = 2;
constexpr int fetched = 3; // rows found before the byte cap
constexpr int newest = 4;  // the newest committed position
constexpr int target = 5;  // a patch's or stand-in's target position (NULL: a plain event)
constexpr int state = 6;   // "t": a whole state, not a merge patch
// The retention horizon (positions at or below it may have been removed), NULL on a schema
// without retention or a role that may not read it: the query runs on every schema.
constexpr int removed = 7;
} // namespace batch_col

// The one column of folding_probe_sql().
constexpr int probe_has_folding = 0;
// The columns of standby_probe_sql().
constexpr int standby_in_recovery = 0;
constexpr int standby_lag_col = 1; // milliseconds

// Column batch_col::removed.
constexpr const char *removed_sql =
    "(SELECT CASE WHEN has_sequence_privilege(k.s, 'SELECT') THEN pg_sequence_last_value(k.s)"
    " END FROM (SELECT to_regclass('event_piper_removed_upto') AS s) AS k)";

} // namespace

std::string ReplayQueue::batch_sql(size_t ids) {
    std::string branches;
    for (size_t i = 0; i < ids; ++i) {
        branches += i == 0 ? "  (" : "  UNION ALL (";
        // One index range scan of event_positions per id, each event then by its primary key.
        // The target through to_jsonb(p): a schema without the column answers NULL.
        branches += "SELECT p.position, p.event_id, (to_jsonb(p) ->> 'target')::bigint AS target,"
                    " e.type, e.payload FROM event_positions p JOIN events e"
                    " ON e.id = p.event_id WHERE p.subscriber = $" +
                    std::to_string(i + 4) + " AND p.position > $1 ORDER BY p.position LIMIT $2)";
    }
    return "SELECT b.position, b.type, b.body, b.fetched, m.newest, b.target, b.state, m.removed"
           " FROM (SELECT coalesce(max(position), 0) AS newest, " +
           std::string(removed_sql) +
           " AS removed FROM event_positions) AS m"
           " LEFT JOIN LATERAL ("
           "  SELECT position, type, body, target, state, count(*) OVER () AS fetched,"
           "   sum(octet_length(body)) OVER (ORDER BY position) - octet_length(body) AS before"
           "  FROM (SELECT position, type, payload::text AS body, target,"
           // A row of the patched event itself (not of a patch): a compaction's stand-in.
           "   CASE WHEN target IS NOT NULL THEN event_id = (SELECT r.event_id FROM"
           "    event_positions r WHERE r.position = ids.target) END AS state FROM (" +
           branches +
           "  ) AS ids ORDER BY position LIMIT $2) AS batch"
           " ) AS b ON b.before < $3"
           " ORDER BY b.position";
}

std::string ReplayQueue::folded_sql(size_t ids) {
    std::string branches;
    for (size_t i = 0; i < ids; ++i) {
        branches += i == 0 ? "  (" : "  UNION ALL (";
        // The rows after $1 that are the newest of their family: nothing of the same event
        // (its patches and stand-ins, by event_positions_target_idx) comes after them.
        branches += "SELECT p.position, p.subscriber, coalesce(p.target, p.position) AS root"
                    " FROM event_positions p WHERE p.subscriber = $" +
                    std::to_string(i + 4) +
                    " AND p.position > $1 AND NOT EXISTS (SELECT 1 FROM event_positions q"
                    " WHERE q.target = coalesce(p.target, p.position) AND q.position > p.position)"
                    " ORDER BY p.position LIMIT $2)";
    }
    return "SELECT b.position, b.type, b.body, b.fetched, m.newest, b.target, b.state, m.removed"
           " FROM (SELECT coalesce(max(position), 0) AS newest, " +
           std::string(removed_sql) +
           " AS removed FROM event_positions) AS m"
           " LEFT JOIN LATERAL ("
           "  SELECT position, type, body, target, state, fetched,"
           "   sum(octet_length(body)) OVER (ORDER BY position) - octet_length(body) AS before"
           "  FROM (SELECT f.position, f.fetched, coalesce(r.type, '') AS type,"
           // An event without patches goes as it is; a patched one as its state (null: the
           // event was deleted, or moved to another subscriber, while its patches stayed).
           "    CASE WHEN f.root = f.position THEN r.payload::text"
           "     WHEN r.id IS NULL THEN 'null' ELSE event_piper_state(f.root)::text END AS body,"
           "    CASE WHEN f.root <> f.position THEN f.root END AS target, true AS state"
           "   FROM (SELECT position, subscriber, root, count(*) OVER () AS fetched FROM (" +
           branches +
           "    ) AS ids ORDER BY position LIMIT $2) AS f"
           // The event by its position: a lookup per row, never a scan of the table.
           "   LEFT JOIN LATERAL (SELECT e.id, e.type, e.payload FROM event_positions rp"
           "    JOIN events e ON e.id = rp.event_id WHERE rp.position = f.root"
           "    AND rp.subscriber = f.subscriber) AS r ON true"
           // OFFSET 0: not flattened, so that each state is merged once, not once more for the
           // byte count.
           "   OFFSET 0) AS batch"
           " ) AS b ON b.before < $3"
           " ORDER BY b.position";
}

const char *ReplayQueue::standby_probe_sql() {
    // The lag: how old the last replayed commit is while WAL received waits to be replayed
    // (0 when the standby has replayed all it received).
    return "SELECT pg_is_in_recovery(), CASE WHEN pg_last_wal_receive_lsn() IS NULL"
           " OR pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0 ELSE"
           " coalesce((extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000)"
           "::bigint, 0) END";
}

const char *ReplayQueue::folding_probe_sql() {
    return "SELECT to_regprocedure('event_piper_state(bigint)') IS NOT NULL";
}

ReplayQueue::ReplayQueue(Timer &retry, ReplayEvents &events, Log &log, size_t memory_budget,
                         const Clock *clock)
    : retry_(retry), events_(events), log_(log), budget_(memory_budget), clock_(clock) {}

ReplayQueue::Slot &ReplayQueue::slot_of(DbLink &link) {
    for (Slot &slot : slots_) {
        if (slot.link == &link) {
            return slot;
        }
    }
    return slots_.front(); // unreachable: every link of this queue has a slot
}

void ReplayQueue::reset(Slot &slot) {
    Slot kept = std::move(slot);
    slot = Slot{};
    slot.link = kept.link;
    slot.folding = kept.folding;
    slot.standby = kept.standby;
    slot.probed_ms = kept.probed_ms;
    slot.checked = kept.checked;
}

void ReplayQueue::close_all() {
    retry_.cancel();
    for (Slot &slot : slots_) {
        slot.link->close();
        for (Stream *s : slot.streams) {
            if (s != nullptr) {
                s->query_lost();
            }
        }
        reset(slot);
    }
    queue_.clear();
    primary_queue_.clear();
    queued_.clear();
    on_primary_.clear();
    held_ = 0; // the streams' shares are forgotten with them (shutdown)
}

void ReplayQueue::request(Stream &s) {
    if (s.query_in_flight() || queued_.count(&s) != 0) {
        return;
    }
    enqueue(s, false);
    dispatch();
}

void ReplayQueue::cancel(Stream &s) {
    if (queued_.erase(&s) != 0) {
        std::deque<Stream *> &q = on_primary_.count(&s) != 0 ? primary_queue_ : queue_;
        q.erase(std::find(q.begin(), q.end(), &s));
    }
    on_primary_.erase(&s);
    for (Slot &slot : slots_) {
        std::replace(slot.streams.begin(), slot.streams.end(), &s, static_cast<Stream *>(nullptr));
        slot.deferred.erase(std::remove(slot.deferred.begin(), slot.deferred.end(), &s),
                            slot.deferred.end());
    }
    release(s);
}

void ReplayQueue::release(Stream &s) {
    if (s.replay_held() == 0) {
        return;
    }
    held_ -= std::min(held_, s.replay_held());
    s.set_replay_held(0);
    if (!queue_.empty() || !primary_queue_.empty()) {
        dispatch();
    }
}

bool ReplayQueue::standby_up() const {
    if (!has_standby_ || standby_down_) {
        return false;
    }
    for (const Slot &slot : slots_) {
        DbLink::State st = slot.link->state();
        if (slot.standby && slot.checked &&
            (st == DbLink::State::Ready || st == DbLink::State::Busy)) {
            return true;
        }
    }
    return false;
}

void ReplayQueue::enqueue(Stream &s, bool front) {
    queued_.insert(&s);
    std::deque<Stream *> &q = on_primary_.count(&s) != 0 ? primary_queue_ : queue_;
    if (front) {
        q.push_front(&s);
    } else {
        q.push_back(&s);
    }
}

void ReplayQueue::dispatch() {
    // A send or connect that fails at once reports on_link_lost from inside this loop, which
    // dispatches again: the loop that is running goes on with what is left.
    if (dispatching_) {
        return;
    }
    dispatching_ = true;
    struct Done {
        bool &flag;
        ~Done() { flag = false; }
    } done{dispatching_};
    retry_standby();
    while (!queue_.empty() || !primary_queue_.empty()) {
        if (budget_ != 0 && held_ >= budget_) {
            return; // clients have not taken what was read for them: wait for release()
        }
        if (!primary_queue_.empty() && serve(primary_queue_, false)) {
            continue;
        }
        if (!queue_.empty()) {
            bool standby = has_standby_ && !standby_down_;
            if (serve(queue_, standby)) {
                continue;
            }
            if (standby && standby_down_) {
                continue; // the standby failed at once: the primary serves them
            }
        }
        return;
    }
}

// Sends the next query of `q` on an idle link of the standby or the primary pool; false if
// none is idle (links of the pool are then opened on demand).
bool ReplayQueue::serve(std::deque<Stream *> &q, bool standby) {
    Slot *idle = nullptr;
    size_t connecting = 0;
    for (Slot &slot : slots_) {
        if (slot.standby != standby) {
            continue;
        }
        DbLink::State st = slot.link->state();
        if (st == DbLink::State::Ready && idle == nullptr) {
            idle = &slot;
        } else if (st == DbLink::State::Connecting) {
            ++connecting;
        }
    }
    if (idle == nullptr) {
        if (!standby && retry_.armed()) {
            return false; // backing off after a failure
        }
        // Streams the primary serves: its own queue, and the other one while no standby does.
        size_t waiting =
            standby ? queue_.size()
                    : primary_queue_.size() + (has_standby_ && !standby_down_ ? 0 : queue_.size());
        // Open links on demand: no more than there are streams waiting.
        for (Slot &slot : slots_) {
            if (connecting >= waiting) {
                break;
            }
            if (slot.standby == standby && slot.link->state() == DbLink::State::Down) {
                ++connecting;
                // May fail at once: on_link_lost arms the retry timer (or marks the standby down).
                slot.link->connect();
                if (standby ? standby_down_ : retry_.armed()) {
                    return false;
                }
            }
        }
        return false;
    }
    Stream *s = q.front();
    reset(*idle);
    if (standby && clock_ != nullptr &&
        clock_->now_ms() - idle->probed_ms >= standby_probe_period_ms) {
        // Still a standby (not promoted), and how far behind: now and then, between batches.
        idle->probe = Probe::Standby;
        idle->link->send(standby_probe_sql(), 0, nullptr);
        return true;
    }
    if (s->folded() && idle->folding == Folding::Unknown) {
        // First ask this connection's schema; the stream stays first in line.
        idle->probe = Probe::Folding;
        idle->link->send(folding_probe_sql(), 0, nullptr);
        return true;
    }
    bool folded = s->folded() && idle->folding == Folding::Yes;
    q.pop_front();
    queued_.erase(s);
    idle->streams.push_back(s);
    // Every stream waiting for exactly the same rows rides along.
    for (auto it = q.begin(); it != q.end();) {
        Stream *o = *it;
        if (o->consumers() == s->consumers() && o->last_position() == s->last_position() &&
            o->folded() == s->folded() && o->batch_rows() == s->batch_rows() &&
            o->batch_bytes() == s->batch_bytes()) {
            idle->streams.push_back(o);
            queued_.erase(o);
            it = q.erase(it);
        } else {
            ++it;
        }
    }
    std::string last = to_text(s->last_position());
    std::string rows = to_text(s->batch_rows());
    std::string bytes = to_text(s->batch_bytes());
    const std::vector<std::string> &ids = s->consumers();
    params_.assign({last.c_str(), rows.c_str(), bytes.c_str()});
    for (const std::string &id : ids) {
        params_.push_back(id.c_str());
    }
    std::vector<std::string> &cache = folded ? folded_sql_ : sql_;
    if (cache.size() < ids.size()) {
        cache.resize(ids.size());
    }
    if (cache[ids.size() - 1].empty()) {
        cache[ids.size() - 1] = folded ? folded_sql(ids.size()) : batch_sql(ids.size());
    }
    uint64_t epoch = events_.listener_epoch();
    for (Stream *o : idle->streams) {
        o->begin_query(epoch);
    }
    ++queries_;
    ++(standby ? standby_ : primary_).queries;
    // Failure: on_link_lost has re-queued them.
    idle->link->send(cache[ids.size() - 1].c_str(), static_cast<int>(params_.size()),
                     params_.data());
    return true;
}

// While the standby pool is down, one of its links tries again after its backoff (dispatch
// runs often enough while streams catch up; nobody needs the standby otherwise).
void ReplayQueue::retry_standby() {
    if (!standby_down_ || clock_ == nullptr || clock_->now_ms() < standby_retry_at_ms_) {
        return;
    }
    Slot *down = nullptr;
    for (Slot &slot : slots_) {
        if (!slot.standby) {
            continue;
        }
        DbLink::State st = slot.link->state();
        if (st == DbLink::State::Connecting || st == DbLink::State::Busy) {
            return; // an attempt or a probe is under way
        }
        if (st == DbLink::State::Ready) {
            reset(slot);
            slot.probe = Probe::Standby;
            slot.link->send(standby_probe_sql(), 0, nullptr);
            return;
        }
        down = down == nullptr ? &slot : down;
    }
    if (down != nullptr) {
        standby_retry_at_ms_ = clock_->now_ms() + standby_backoff_.next();
        down->link->connect();
    }
}

void ReplayQueue::on_link_ready(DbLink &link) {
    Slot &slot = slot_of(link);
    slot.folding = Folding::Unknown; // a new connection
    slot.checked = false;
    if (slot.standby) {
        // Before its first batch: is it a standby at all, and how far behind.
        reset(slot);
        slot.probe = Probe::Standby;
        link.send(standby_probe_sql(), 0, nullptr);
        return;
    }
    if (reported_down_) {
        log_.write(LogLevel::Notice, "event_piper: replay connection is back");
        reported_down_ = false;
    }
    backoff_.reset();
    dispatch();
}

void ReplayQueue::on_link_result(DbLink &link, const QueryResult &result) {
    Slot &slot = slot_of(link);
    if (slot.probe == Probe::Folding) {
        bool yes = result.ok() && result.rows() == 1 && result.value(0, probe_has_folding) == "t";
        slot.folding = yes ? Folding::Yes : Folding::No;
        if (!yes && !warned_no_folding_) {
            log_.write(LogLevel::Warn,
                       "event_piper: folded replay asked for, but the database has no "
                       "event_piper_state() (apply postgresql/schema.sql): such streams get the "
                       "full history");
            warned_no_folding_ = true;
        }
        return;
    }
    if (slot.probe == Probe::Standby) {
        slot.probed_ms = clock_ != nullptr ? clock_->now_ms() : 1;
        if (!result.ok()) {
            slot.not_standby = "the standby check failed: " + result.error();
        } else if (result.rows() != 1 || result.value(0, standby_in_recovery) != "t") {
            slot.not_standby = "the server is not a standby (pg_is_in_recovery() is false)";
        } else {
            standby_lag_ms_ =
                static_cast<uint64_t>(std::max<int64_t>(0, result.number(0, standby_lag_col)));
        }
        return;
    }
    if (!result.ok()) {
        std::string why(without_line_end(result.error()));
        ++failures_;
        log_failure(slot.standby ? "on a standby (read again from the primary): " + why : why);
        slot.failed = true;
        return;
    }
    int n = result.rows();
    if (n > 0) {
        slot.newest = result.number(0, batch_col::newest);
        if (!slot.standby) {
            events_.note_position(slot.newest); // a standby's newest may lag: not news
        }
        // Retention: a stream resumed from below the horizon is told before anything else.
        int64_t removed =
            result.columns() > batch_col::removed && !result.is_null(0, batch_col::removed)
                ? result.number(0, batch_col::removed)
                : 0;
        for (Stream *s : slot.streams) {
            if (s != nullptr && s->history_gone(removed)) {
                std::string frame;
                append_history_gone_frame(frame, s->last_position(), removed);
                s->append_raw(frame);
            }
        }
        if (result.is_null(0, batch_col::position)) {
            return; // nothing after the streams' position
        }
        slot.fetched = static_cast<size_t>(result.number(0, batch_col::fetched));
    }
    frames_.clear();
    ends_.clear();
    for (int row = 0; row < n; ++row) {
        int64_t pos = result.number(row, batch_col::position);
        if (result.columns() > batch_col::state && !result.is_null(row, batch_col::target)) {
            append_target_frame(frames_, pos, result.number(row, batch_col::target),
                                result.value(row, batch_col::state) == "t" ? TargetMember::State
                                                                           : TargetMember::Patch,
                                result.value(row, batch_col::type),
                                result.value(row, batch_col::body));
        } else {
            append_event_frame(frames_, pos, result.value(row, batch_col::type),
                               result.value(row, batch_col::body));
        }
        ends_.emplace_back(pos, frames_.size());
        if (!slot.standby) {
            events_.note_position(pos);
        }
    }
    slot.rows += static_cast<size_t>(n);
    (slot.standby ? standby_ : primary_).rows += static_cast<uint64_t>(n);
    slot.bytes += frames_.size();
    // Every stream of the query gets its own copy: as many as the budget allows (at least one)
    // take the batch now; the others are asked again, first, once clients have taken theirs.
    size_t fit = slot.streams.size();
    if (budget_ != 0 && !frames_.empty()) {
        size_t room = held_ < budget_ ? budget_ - held_ : 0;
        fit = std::max<size_t>(1, room / frames_.size());
    }
    size_t taken = 0;
    for (Stream *&s : slot.streams) {
        if (s == nullptr) {
            continue;
        }
        if (taken == fit) {
            slot.deferred.push_back(s);
            s = nullptr;
            continue;
        }
        ++taken;
        size_t start = 0;
        for (const auto &[pos, end] : ends_) {
            s->on_framed_row(pos, std::string_view(frames_).substr(start, end - start));
            start = end;
        }
    }
}

void ReplayQueue::on_link_idle(DbLink &link) {
    Slot &slot = slot_of(link);
    if (slot.probe == Probe::Folding) {
        reset(slot);
        dispatch();
        return;
    }
    if (slot.probe == Probe::Standby) {
        std::string why = std::move(slot.not_standby);
        reset(slot);
        slot.checked = why.empty();
        if (!why.empty()) {
            link.close();
            standby_lost(why);
        } else if (standby_down_ || standby_reported_down_) {
            standby_down_ = false;
            standby_backoff_.reset();
            if (standby_reported_down_) {
                log_.write(LogLevel::Notice, "event_piper: replay standby is back");
                standby_reported_down_ = false;
            }
        }
        dispatch();
        return;
    }
    Slot done = slot;
    reset(slot);
    for (auto it = done.deferred.rbegin(); it != done.deferred.rend(); ++it) {
        (*it)->query_lost();
        enqueue(**it, true);
    }
    for (Stream *s : done.streams) {
        if (s == nullptr) {
            continue; // the client went away meanwhile
        }
        if (done.failed && done.standby) {
            // A standby may cancel a query (a conflict with recovery): the primary reads it.
            s->query_lost();
            on_primary_.insert(s);
            enqueue(*s, true);
            continue;
        }
        if (done.failed) {
            s->fail();
        } else {
            // More rows follow when the batch was full, or cut short by the byte cap.
            bool more =
                done.rows > 0 && (done.fetched >= s->batch_rows() || done.rows < done.fetched);
            if (done.standby && !more) {
                // The standby's end of the history is not the tail: the primary's next batch
                // decides whether the stream is at the tail and may go live.
                on_primary_.insert(s);
                more = true;
            }
            if (done.rows == 0 && !done.standby) {
                s->on_newest(done.newest);
            }
            s->end_query(more, events_.listener_epoch());
            if (s->mode() == Stream::Mode::Live) {
                on_primary_.erase(s); // its next catch-up starts on a standby again
            }
            s->set_replay_held(s->replay_held() + done.bytes);
            held_ += done.bytes;
        }
        s->wake();
    }
    dispatch();
}

void ReplayQueue::on_link_lost(DbLink &link, std::string_view why) {
    Slot &slot = slot_of(link);
    slot.folding = Folding::Unknown; // the next connection may see another schema
    slot.checked = false;
    std::vector<Stream *> streams = std::move(slot.streams);
    streams.insert(streams.end(), slot.deferred.begin(), slot.deferred.end());
    bool standby = slot.standby;
    reset(slot);
    // Asked again first, in their order: they have waited longest.
    for (auto it = streams.rbegin(); it != streams.rend(); ++it) {
        if (Stream *s = *it) {
            s->query_lost();
            enqueue(*s, true);
        }
    }
    if (standby) {
        standby_lost(why);
    } else {
        if (!reported_down_) {
            log_.write(LogLevel::Error,
                       "event_piper: replay connection failed: " + std::string(why));
            reported_down_ = true;
        }
        if (!retry_.armed()) {
            retry_.arm(backoff_.next());
        }
    }
    // Another link may be idle now: it serves them without waiting out the backoff (which only
    // holds back opening links).
    dispatch();
}

// The standby pool is down until one of its links answers the standby check again; meanwhile
// the primary serves every stream.
void ReplayQueue::standby_lost(std::string_view why) {
    standby_down_ = true;
    standby_lag_ms_ = 0;
    uint64_t now = clock_ != nullptr ? clock_->now_ms() : 0;
    standby_retry_at_ms_ = now + standby_backoff_.next();
    if (!standby_reported_down_) {
        log_.write(LogLevel::Warn, "event_piper: replay standby unavailable, replay reads the "
                                   "primary: " +
                                       std::string(why));
        standby_reported_down_ = true;
    }
}

// A tiny statement_timeout on the role, a missing grant: every catching-up stream fails the same
// way, over and over (each retries after its client reconnects). One line per reason per
// period, saying how many failed since the last one; status counts them all.
void ReplayQueue::log_failure(const std::string &why) {
    uint64_t now = clock_ != nullptr ? clock_->now_ms() : 0;
    FailureLine *line = nullptr;
    for (FailureLine &l : failure_lines_) {
        if (l.why == why) {
            line = &l;
        }
    }
    if (line != nullptr && clock_ != nullptr && now - line->logged_ms < failure_log_period_ms) {
        ++line->unlogged;
        return;
    }
    std::string text = "event_piper: replay query failed: " + why;
    if (line != nullptr && line->unlogged > 0) {
        text += " (" + std::to_string(line->unlogged) + " more since the last such line)";
    }
    log_.write(LogLevel::Error, text);
    if (line == nullptr) {
        if (failure_lines_.size() >= 16) {
            failure_lines_.erase(failure_lines_.begin()); // the oldest reason
        }
        failure_lines_.push_back({why, now, 0});
    } else {
        line->logged_ms = now;
        line->unlogged = 0;
    }
}

} // namespace event_piper
