// The replay queue (see replay_queue.hpp).
#include "replay_queue.hpp"

#include "sse_frame.hpp"
#include "text.hpp"

#include <algorithm>
#include <charconv>
#include <string>

namespace event_piper {

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
    return "SELECT b.position, b.type, b.body, b.fetched, m.newest, b.target, b.state"
           " FROM (SELECT coalesce(max(position), 0) AS newest FROM event_positions) AS m"
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
    return "SELECT b.position, b.type, b.body, b.fetched, m.newest, b.target, b.state"
           " FROM (SELECT coalesce(max(position), 0) AS newest FROM event_positions) AS m"
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
    DbLink *link = slot.link;
    Folding folding = slot.folding;
    slot = Slot{};
    slot.link = link;
    slot.folding = folding;
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
    queued_.clear();
    held_ = 0; // the streams' shares are forgotten with them (shutdown)
}

void ReplayQueue::request(Stream &s) {
    if (s.query_in_flight() || !queued_.insert(&s).second) {
        return;
    }
    queue_.push_back(&s);
    dispatch();
}

void ReplayQueue::cancel(Stream &s) {
    if (queued_.erase(&s) != 0) {
        queue_.erase(std::find(queue_.begin(), queue_.end(), &s));
    }
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
    if (!queue_.empty()) {
        dispatch();
    }
}

void ReplayQueue::dispatch() {
    while (!queue_.empty()) {
        if (budget_ != 0 && held_ >= budget_) {
            return; // clients have not taken what was read for them: wait for release()
        }
        Slot *idle = nullptr;
        size_t connecting = 0;
        for (Slot &slot : slots_) {
            DbLink::State st = slot.link->state();
            if (st == DbLink::State::Ready && idle == nullptr) {
                idle = &slot;
            } else if (st == DbLink::State::Connecting) {
                ++connecting;
            }
        }
        if (idle == nullptr) {
            if (retry_.armed()) {
                return; // backing off after a failure
            }
            // Open links on demand: no more than there are streams waiting.
            for (Slot &slot : slots_) {
                if (connecting >= queue_.size()) {
                    break;
                }
                if (slot.link->state() == DbLink::State::Down) {
                    ++connecting;
                    slot.link->connect(); // may fail at once: on_link_lost arms the retry timer
                    if (retry_.armed()) {
                        return;
                    }
                }
            }
            return;
        }
        Stream *s = queue_.front();
        reset(*idle);
        if (s->folded() && idle->folding == Folding::Unknown) {
            // First ask this connection's schema; the stream stays first in line.
            idle->probing = true;
            idle->link->send(folding_probe_sql(), 0, nullptr);
            continue;
        }
        bool folded = s->folded() && idle->folding == Folding::Yes;
        queue_.pop_front();
        queued_.erase(s);
        idle->streams.push_back(s);
        // Every stream waiting for exactly the same rows rides along.
        for (auto it = queue_.begin(); it != queue_.end();) {
            Stream *o = *it;
            if (o->consumers() == s->consumers() && o->last_position() == s->last_position() &&
                o->folded() == s->folded() && o->batch_rows() == s->batch_rows() &&
                o->batch_bytes() == s->batch_bytes()) {
                idle->streams.push_back(o);
                queued_.erase(o);
                it = queue_.erase(it);
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
        // Failure: on_link_lost has re-queued them.
        idle->link->send(cache[ids.size() - 1].c_str(), static_cast<int>(params_.size()),
                         params_.data());
    }
}

void ReplayQueue::on_link_ready(DbLink &link) {
    slot_of(link).folding = Folding::Unknown; // a new connection
    if (reported_down_) {
        log_.write(LogLevel::Notice, "event_piper: replay connection is back");
        reported_down_ = false;
    }
    backoff_.reset();
    dispatch();
}

void ReplayQueue::on_link_result(DbLink &link, const QueryResult &result) {
    Slot &slot = slot_of(link);
    if (slot.probing) {
        bool yes = result.ok() && result.rows() == 1 && result.value(0, 0) == "t";
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
    if (!result.ok()) {
        std::string why(without_line_end(result.error()));
        ++failures_;
        log_failure(why);
        slot.failed = true;
        return;
    }
    int n = result.rows();
    if (n > 0) {
        slot.newest = result.number(0, 4);
        events_.note_position(slot.newest);
        if (result.is_null(0, 0)) {
            return; // nothing after the streams' position
        }
        slot.fetched = static_cast<size_t>(result.number(0, 3));
    }
    frames_.clear();
    ends_.clear();
    for (int row = 0; row < n; ++row) {
        int64_t pos = result.number(row, 0);
        if (result.columns() > 6 && !result.is_null(row, 5)) {
            append_target_frame(frames_, pos, result.number(row, 5),
                                result.value(row, 6) == "t" ? TargetMember::State
                                                            : TargetMember::Patch,
                                result.value(row, 1), result.value(row, 2));
        } else {
            append_event_frame(frames_, pos, result.value(row, 1), result.value(row, 2));
        }
        ends_.emplace_back(pos, frames_.size());
        events_.note_position(pos);
    }
    slot.rows += static_cast<size_t>(n);
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
    if (slot.probing) {
        reset(slot);
        dispatch();
        return;
    }
    Slot done = slot;
    reset(slot);
    for (auto it = done.deferred.rbegin(); it != done.deferred.rend(); ++it) {
        (*it)->query_lost();
        queued_.insert(*it);
        queue_.push_front(*it);
    }
    for (Stream *s : done.streams) {
        if (s == nullptr) {
            continue; // the client went away meanwhile
        }
        if (done.failed) {
            s->fail();
        } else {
            // More rows follow when the batch was full, or cut short by the byte cap.
            bool more =
                done.rows > 0 && (done.fetched >= s->batch_rows() || done.rows < done.fetched);
            if (done.rows == 0) {
                s->on_newest(done.newest);
            }
            s->end_query(more, events_.listener_epoch());
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
    std::vector<Stream *> streams = std::move(slot.streams);
    streams.insert(streams.end(), slot.deferred.begin(), slot.deferred.end());
    reset(slot);
    // Asked again first, in their order: they have waited longest.
    for (auto it = streams.rbegin(); it != streams.rend(); ++it) {
        if (Stream *s = *it) {
            s->query_lost();
            queued_.insert(s);
            queue_.push_front(s);
        }
    }
    if (!reported_down_) {
        log_.write(LogLevel::Error, "event_piper: replay connection failed: " + std::string(why));
        reported_down_ = true;
    }
    if (!retry_.armed()) {
        retry_.arm(backoff_.next());
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
