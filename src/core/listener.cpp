// The listener's state machine (see listener.hpp).
#include "listener.hpp"

#include <algorithm>
#include <charconv>

namespace event_piper {

namespace {

std::string to_text(uint64_t v) {
    char buf[24];
    return std::string(buf, std::to_chars(buf, buf + sizeof buf, v).ptr);
}

} // namespace

Listener::Listener(DbLink &link, Timer &retry, Timer &check, ListenerEvents &events, Log &log,
                   Settings settings)
    : link_(link), retry_(retry), check_(check), events_(events), log_(log),
      settings_(std::move(settings)), listen_sql_("LISTEN \"" + settings_.channel + "\"") {}

void Listener::start() {
    if (closed_) {
        return;
    }
    phase_ = Phase::Connecting;
    link_.connect(); // may report on_link_lost at once
}

void Listener::close() {
    closed_ = true;
    stop();
}

void Listener::stop() {
    retry_.cancel();
    check_.cancel();
    link_.close();
    phase_ = Phase::Down;
    epoch_ = 0;
}

void Listener::on_link_ready(DbLink &) {
    phase_ = Phase::Listening;
    link_.send(listen_sql_.c_str(), 0, nullptr);
}

void Listener::read_newest() {
    // LISTEN is active now: a snapshot taken from here on misses nothing that is notified.
    // The same query reads the channel the trigger notifies (event_piper.channel).
    phase_ = Phase::ReadingNewest;
    newest_ = 0;
    start_for_waiting_ = 0;
    std::string since = to_text(events_.waiting_since_ms());
    const char *params[1] = {since.c_str()};
    // Streams opened without a resume point while the database was unreachable start after what
    // was committed before they opened, by the database's commit clock ($1 = 0: none waiting).
    link_.send("SELECT (SELECT coalesce(max(position), 0) FROM event_positions),"
               " CASE WHEN $1::bigint = 0 THEN NULL ELSE coalesce((SELECT position"
               "  FROM event_positions"
               "  WHERE committed_at <= to_timestamp($1::float8 / 1000)"
               "  ORDER BY position DESC LIMIT 1), 0) END,"
               " coalesce(nullif(current_setting('event_piper.channel', true), ''), 'new_events')",
               1, params);
}

// The check's round trip. Rows without a position: those with an id above the one the previous
// check found settled (the first check looks at the newest 100,000 ids), an anti-join of
// events' primary key against event_positions' index on event_id. Answers the count and where
// the next check starts: usually a handful of rows, cheap enough to run every few seconds.
// The third column is the newest committed position that the trigger notifies (a subscriber
// of 7,900 bytes or more is never notified: see schema.sql), for note_committed().
const char *const check_sql =
    "SELECT unpositioned, next_after_id,"
    " (SELECT position FROM event_positions WHERE octet_length(subscriber) < 7900"
    "   ORDER BY position DESC LIMIT 1)"
    " FROM event_piper_unpositioned($1)";

// The check's second query: event writers held back in COMMIT. Each transaction that reserved
// positions holds the commit-order lock named after its last position (advisory, key 1 =
// 1885958245, see schema.sql) until it ends, and the next one waits for it in COMMIT; a wait of a
// second means the chain is stuck behind a transaction that does not end. It reads the lock table
// only (no table of ours, so no lock on `events` can hold it up): how many writers have waited
// over a second, the longest wait, and the head of the chain (a holder of a waited-for lock that
// waits for none): its backend pid, user and application, or its gid if it is prepared (no pid).
const char *const held_writers_sql =
    "WITH l AS (SELECT objid, pid, virtualtransaction AS vxid, granted, waitstart, mode"
    "   FROM pg_locks WHERE locktype = 'advisory' AND classid = 1885958245 AND objsubid = 2"
    "   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())),"
    " w AS (SELECT waitstart FROM l"
    "   WHERE NOT granted AND waitstart < clock_timestamp() - interval '1 second'),"
    " h AS (SELECT pid, vxid FROM l WHERE granted AND mode = 'ExclusiveLock'"
    "   AND objid IN (SELECT objid FROM l WHERE NOT granted)"
    "   AND vxid NOT IN (SELECT vxid FROM l WHERE NOT granted) LIMIT 1)"
    " SELECT (SELECT count(*) FROM w),"
    " (SELECT (extract(epoch FROM clock_timestamp() - min(waitstart)) * 1000)::bigint FROM w),"
    " h.pid,"
    " (SELECT p.gid FROM pg_prepared_xacts p JOIN pg_locks x ON x.locktype = 'transactionid'"
    "   AND x.transactionid = p.transaction"
    "   WHERE h.pid IS NULL AND x.pid IS NULL AND x.virtualtransaction = h.vxid LIMIT 1),"
    " a.usename, a.application_name"
    " FROM (SELECT 1) one LEFT JOIN h ON true LEFT JOIN pg_stat_activity a ON a.pid = h.pid";

void Listener::on_link_result(DbLink &, const QueryResult &result) {
    if (phase_ == Phase::Checking && checking_writers_) {
        if (result.ok()) {
            note_held_writers(result);
        } else {
            // An answer is an answer: the link is alive. Without this query (a server that does
            // not know pg_locks.waitstart, before PostgreSQL 14) the check goes on without it.
            writers_check_ = false;
            std::string why = result.error();
            while (!why.empty() && (why.back() == '\n' || why.back() == '\r')) {
                why.pop_back();
            }
            log_.write(LogLevel::Warn, "event_piper: cannot look for event writers held back in "
                                       "COMMIT (" +
                                           why + "); not looking any more");
        }
        return;
    }
    if (result.ok() && phase_ == Phase::Checking) {
        if (result.rows() == 1 && result.columns() >= 3) {
            note_unpositioned(result.number(0, 0));
            check_after_id_ = result.number(0, 1);
            note_committed(result.is_null(0, 2) ? 0 : result.number(0, 2));
        }
        return;
    }
    if (result.ok()) {
        if (phase_ == Phase::ReadingNewest && result.rows() == 1 && result.columns() >= 3) {
            newest_ = result.number(0, 0);
            start_for_waiting_ = result.is_null(0, 1) ? newest_ : result.number(0, 1);
            std::string_view channel = result.value(0, 2);
            bool mismatch = channel != settings_.channel;
            if (mismatch && !channel_mismatch_) {
                log_.write(LogLevel::Warn,
                           "event_piper: the database notifies channel \"" + std::string(channel) +
                               "\" (setting event_piper.channel) but event_piper_channel is \"" +
                               settings_.channel +
                               "\": no notification reaches this listener, streams get events "
                               "only from its periodic check, up to two thirds of "
                               "event_piper_listener_timeout late; make them the same");
            }
            channel_mismatch_ = mismatch;
        }
        return;
    }
    std::string why = result.error();
    while (!why.empty() && (why.back() == '\n' || why.back() == '\r')) {
        why.pop_back();
    }
    link_.close();
    lose(why.empty() ? "unexpected result" : why);
}

void Listener::on_link_idle(DbLink &) {
    switch (phase_) {
    case Phase::Listening:
        read_newest();
        return;
    case Phase::ReadingNewest:
        go_live();
        return;
    case Phase::Checking:
        if (!checking_writers_ && writers_check_) {
            checking_writers_ = true; // the same round, within the same timeout
            link_.send(held_writers_sql, 0, nullptr);
            return;
        }
        checking_writers_ = false;
        phase_ = Phase::Live; // the server answered: the link is alive
        if (settings_.check_ms != 0) {
            check_.arm(settings_.check_ms);
        }
        return;
    default:
        return;
    }
}

void Listener::go_live() {
    phase_ = Phase::Live;
    epoch_ = ++listens_;
    announced_floor_ = std::max(announced_floor_, newest_); // the hub starts from here
    checked_newest_ = 0;
    backoff_.reset();
    if (!last_error_.empty() || !ever_live_) {
        log_.write(LogLevel::Notice, "event_piper: listening for notifications (newest position " +
                                         to_text(static_cast<uint64_t>(newest_)) + ")");
    }
    last_error_.clear();
    ever_live_ = true;
    if (settings_.check_ms != 0) {
        check_.arm(settings_.check_ms);
    }
    events_.on_listener_ready(epoch_, newest_, start_for_waiting_);
}

void Listener::on_check_timer() {
    if (phase_ == Phase::Live) {
        phase_ = Phase::Checking;
        check_.arm(settings_.timeout_ms);
        std::string after = to_text(static_cast<uint64_t>(check_after_id_));
        const char *params[1] = {after.c_str()};
        link_.send(check_sql, 1, params); // failure: on_link_lost has run
        return;
    }
    if (phase_ == Phase::Checking) {
        link_.close();
        lose("no answer from the server for " + to_text(settings_.timeout_ms) +
             " ms (server or network frozen? or a lock held on table events, such as a long "
             "LOCK TABLE events, that the check's query waits for)");
    }
}

void Listener::on_link_lost(DbLink &, std::string_view why) {
    lose(why);
}

void Listener::lose(std::string_view why) {
    bool was_live = epoch_ != 0;
    epoch_ = 0;
    checking_writers_ = false;
    phase_ = Phase::Down;
    check_.cancel();
    if (closed_) {
        return;
    }
    std::string reason(why.empty() ? "unknown error" : why);
    if (was_live) {
        ++reconnects_;
        log_.write(LogLevel::Error,
                   "event_piper: listener connection lost: " + reason + "; reconnecting");
    } else if (reason != last_error_) {
        // Logged again whenever the reason changes ("the database system is starting up",
        // "too many clients already", ...), never once per attempt.
        log_.write(LogLevel::Error,
                   "event_piper: listener cannot connect: " + reason + "; retrying with backoff");
    }
    last_error_ = reason;
    if (was_live) {
        events_.on_listener_lost();
    }
    if (!retry_.armed()) {
        retry_.arm(backoff_.next());
    }
}

void Listener::on_link_notify(DbLink &, std::string_view payload) {
    events_.on_notification(payload);
}

// The table is the truth, a notification a hint. Positions that were committed when the previous
// check ran (a whole check period ago) and that no notification has announced since will not be
// announced: the trigger notifies another channel (event_piper.channel differs), or a foreign or
// missing trigger. A bare position sends every stream to the table for them, so that a stream
// is late by at most two check periods instead of stalled; the first time, the log says why.
void Listener::note_committed(int64_t newest_committed) {
    if (checked_newest_ > std::max(announced_floor_, events_.newest_notified())) {
        if (unnotified_hints_ == 0) {
            log_.write(LogLevel::Warn,
                       "event_piper: positions up to " +
                           to_text(static_cast<uint64_t>(checked_newest_)) +
                           " were committed a check period ago but not notified on channel \"" +
                           settings_.channel +
                           "\" (does the database's event_piper.channel name it? is the trigger "
                           "events_commit_notify installed?): streams read them from the table");
        }
        ++unnotified_hints_;
        announced_floor_ = checked_newest_;
        events_.on_notification("p " + to_text(static_cast<uint64_t>(checked_newest_)));
        events_.on_notifications_done();
    }
    checked_newest_ = newest_committed;
}

void Listener::note_unpositioned(int64_t rows) {
    if (rows != unpositioned_) {
        if (rows > 0) {
            log_.write(LogLevel::Warn,
                       "event_piper: " + to_text(static_cast<uint64_t>(rows)) +
                           " committed rows of table events have no position (was the trigger "
                           "events_commit_notify disabled or dropped?): no client can receive "
                           "them; apply postgresql/schema.sql again to give them positions");
        } else {
            log_.write(LogLevel::Notice, "event_piper: every row of table events has a position "
                                         "again");
        }
    }
    unpositioned_ = rows;
}

// Logged when the head of a held-back chain changes (once while the same transaction holds the
// writers), and once when they no longer wait.
void Listener::note_held_writers(const QueryResult &result) {
    if (result.rows() != 1 || result.columns() < 6) {
        return;
    }
    int64_t waiting = result.number(0, 0);
    writers_waiting_ = waiting;
    if (waiting == 0) {
        if (!writers_blocker_.empty()) {
            log_.write(LogLevel::Notice, "event_piper: event writers no longer wait in COMMIT");
            writers_blocker_.clear();
        }
        return;
    }
    std::string blocker, release;
    if (!result.is_null(0, 2)) {
        std::string pid(result.value(0, 2));
        blocker = "backend pid " + pid;
        if (!result.is_null(0, 4)) {
            blocker += " (user \"" + std::string(result.value(0, 4)) + "\", application \"" +
                       std::string(result.is_null(0, 5) ? "" : result.value(0, 5)) + "\")";
        }
        release = "the end of that transaction (pg_terminate_backend(" + pid + ") if it is stuck)";
    } else if (!result.is_null(0, 3)) {
        std::string gid(result.value(0, 3));
        blocker = "prepared transaction '" + gid + "'";
        release = "COMMIT PREPARED or ROLLBACK PREPARED '" + gid + "'";
    } else {
        blocker = "a transaction that ended meanwhile";
        release = "the next check";
    }
    if (blocker == writers_blocker_) {
        return;
    }
    writers_blocker_ = blocker;
    uint64_t ms = result.is_null(0, 1) ? 0 : static_cast<uint64_t>(result.number(0, 1));
    log_.write(LogLevel::Warn,
               "event_piper: " + to_text(static_cast<uint64_t>(waiting)) +
                   " event writers have waited in COMMIT for up to " + to_text(ms / 1000) + "." +
                   to_text(ms % 1000 / 100) + " s behind " + blocker +
                   ", whose transaction reserved positions before theirs and has not ended (open "
                   "after SET CONSTRAINTS ... IMMEDIATE, a slow deferred trigger, a synchronous "
                   "standby, a transaction prepared under an older schema.sql); they wait for " +
                   release + "; lock_timeout bounds their wait, statement_timeout does not");
}

} // namespace event_piper
