// The listener's state machine (see listener.hpp).
#include "listener.hpp"

#include "defaults.hpp"
#include "grammar.hpp"
#include "text.hpp"

#include <algorithm>
#include <charconv>

namespace event_piper {

namespace {

// "12,15,40" (NULL or empty: none).
void parse_ids(std::string_view text, std::vector<int64_t> &out) {
    out.clear();
    const char *p = text.data();
    const char *end = p + text.size();
    while (p < end) {
        int64_t v = 0;
        auto r = std::from_chars(p, end, v);
        if (r.ec != std::errc()) {
            return;
        }
        out.push_back(v);
        p = r.ptr < end && *r.ptr == ',' ? r.ptr + 1 : end;
    }
}

} // namespace

Listener::Listener(DbLink &link, DbLink &table_link, Timer &retry, Timer &check,
                   ListenerEvents &events, Log &log, Settings settings)
    : link_(link), table_link_(table_link), retry_(retry), check_(check), events_(events),
      log_(log), settings_(std::move(settings)),
      listen_sql_("LISTEN \"" + settings_.channel + "\"") {}

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
    table_link_.close();
    table_query_ = TableQuery::None;
    phase_ = Phase::Down;
    epoch_ = 0;
}

void Listener::on_link_ready(DbLink &link) {
    if (&link == &table_link_) {
        send_table_round();
        return;
    }
    phase_ = Phase::Listening;
    link_.send(listen_sql_.c_str(), 0, nullptr);
}

namespace {
// The columns of read_newest()'s query, and of the schema version's.
namespace newest_column {
enum : int { position, start_for_waiting, channel, has_version_function };
}
namespace version_column {
enum : int { version };
}
} // namespace

void Listener::read_newest() {
    // LISTEN is active now: a snapshot taken from here on misses nothing that is notified.
    // The same query reads the channel the trigger notifies (event_piper.channel).
    phase_ = Phase::ReadingNewest;
    newest_ = 0;
    start_for_waiting_ = 0;
    since_read_ = events_.waiting_since_ms();
    std::string since = to_text(since_read_);
    const char *params[1] = {since.c_str()};
    // Streams opened without a resume point while the database was unreachable start after what
    // was committed before they opened, by the database's commit clock ($1 = 0: none waiting).
    // The fourth column says whether the schema has a version (the previous schema has none);
    // if so, the version is read next, before going live (a call to a function that may not
    // exist would fail the whole query).
    has_version_function_ = false;
    // The third column falls back to the channel the trigger falls back to (schema.sql).
    static const std::string newest_sql =
        std::string("SELECT (SELECT coalesce(max(position), 0) FROM event_positions),"
                    " CASE WHEN $1::bigint = 0 THEN NULL ELSE coalesce((SELECT position"
                    "  FROM event_positions"
                    "  WHERE committed_at <= to_timestamp($1::float8 / 1000)"
                    "  ORDER BY position DESC LIMIT 1), 0) END,"
                    " coalesce(nullif(current_setting('event_piper.channel', true), ''), '") +
        default_channel +
        "'),"
        " to_regprocedure('event_piper_schema_version()') IS NOT NULL";
    link_.send(newest_sql.c_str(), 1, params);
}

// The check's round trip on the LISTEN connection, which must stay trivial (notifications wait
// behind it): the newest committed position that the trigger notifies (a subscriber of
// grammar::subscriber_below bytes or more is never notified: docs/notification-grammar.md), for
// note_committed(), among the newest 100 positions, so that its cost is bounded whatever the
// rows hold.
const std::string round_trip_sql =
    "SELECT (SELECT position FROM (SELECT position, subscriber FROM event_positions"
    "   ORDER BY position DESC LIMIT 100) AS newest"
    " WHERE octet_length(subscriber) < " +
    std::to_string(grammar::subscriber_below) + " ORDER BY position DESC LIMIT 1)";
namespace {
namespace round_trip_column {
enum : int { newest_notified };
}
} // namespace

// The first query of a round on the second connection: event writers held back in COMMIT. Each
// transaction that reserved positions holds the commit-order lock named after its last position
// (advisory, key 1 = 1885958245, see schema.sql) until it ends, and the next one waits for it in
// COMMIT; a wait of a second means the chain is stuck behind a transaction that does not end. It
// reads the lock table only (no table of ours, so no lock on `events` can hold it up): how many
// writers have waited over a second, the longest wait, and the head of the chain (a holder of a
// waited-for lock that waits for none): its backend pid, user and application, or its gid if it is
// prepared (no pid).
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
namespace {
namespace writers_column {
enum : int { waiting, longest_wait_ms, head_pid, head_gid, head_user, head_application, count };
}
} // namespace

// The table check, on the second connection: ids of events above $1 (the first round, or after
// the ids started again with TRUNCATE ... RESTART IDENTITY: from 100,000 below the newest; never
// further back than that, when writers outpace the check), at most $3 of them in id order (the
// first round 100,000, later ones 10,000), and which of them have no row in event_positions (one
// index probe each: a correlated subquery, so that no plan can turn it into a scan of
// event_positions); then which of the ids found before ($2) still have none. Answers the last
// id read (NULL: none above $1), how many of the ids read have no position, the first 1,000 of
// those, and the ids of $2 still without. Its cost depends on neither the table's size nor the
// rows that never get a position.
const char *const table_check_sql =
    "WITH newest AS (SELECT coalesce(max(id), 0) AS id FROM events),"
    " window_ids AS MATERIALIZED ("
    "   SELECT e.id FROM events e"
    "    WHERE e.id > CASE WHEN $1::bigint = 0 OR $1::bigint > (SELECT id FROM newest)"
    "                      THEN (SELECT id FROM newest) - 100000"
    "                      ELSE greatest($1::bigint, (SELECT id FROM newest) - 100000) END"
    "    ORDER BY e.id LIMIT $3::int),"
    " missing AS MATERIALIZED ("
    "   SELECT w.id FROM window_ids w"
    "    WHERE (SELECT true FROM event_positions p WHERE p.event_id = w.id LIMIT 1) IS NULL)"
    " SELECT (SELECT max(id) FROM window_ids),"
    "  (SELECT count(*) FROM missing),"
    "  (SELECT string_agg(m.id::text, ',' ORDER BY m.id)"
    "     FROM (SELECT id FROM missing ORDER BY id LIMIT 1000) m),"
    "  (SELECT string_agg(k.id::text, ',' ORDER BY k.id) FROM unnest($2::bigint[]) AS k(id)"
    "    WHERE EXISTS (SELECT 1 FROM events e WHERE e.id = k.id)"
    "      AND (SELECT true FROM event_positions p WHERE p.event_id = k.id LIMIT 1) IS NULL)";
namespace {
namespace table_column {
enum : int { scanned_to, found, found_ids, still_ids, count };
}
} // namespace
static_assert(Listener::oldest_id_scanned == 100000 && Listener::unpositioned_followed == 1000,
              "table_check_sql spells these out");

void Listener::on_link_result(DbLink &link, const QueryResult &result) {
    if (&link == &table_link_) {
        on_table_result(result);
        return;
    }
    if (result.ok() && phase_ == Phase::Checking) {
        constexpr int c = round_trip_column::newest_notified;
        if (result.rows() == 1 && result.columns() > c) {
            note_committed(result.is_null(0, c) ? 0 : result.number(0, c));
        }
        return;
    }
    if (result.ok()) {
        namespace col = newest_column;
        if (phase_ == Phase::ReadingNewest && result.rows() == 1 &&
            result.columns() > col::channel) {
            newest_ = result.number(0, col::position);
            start_for_waiting_ = result.is_null(0, col::start_for_waiting)
                                     ? newest_
                                     : result.number(0, col::start_for_waiting);
            std::string_view channel = result.value(0, col::channel);
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
            has_version_function_ = result.columns() > col::has_version_function &&
                                    result.value(0, col::has_version_function) == "t";
            schema_version_ = schema_version_unversioned;
        }
        constexpr int v = version_column::version;
        if (phase_ == Phase::ReadingVersion && result.rows() == 1 && result.columns() > v &&
            !result.is_null(0, v)) {
            schema_version_ = result.number(0, v);
        }
        return;
    }
    std::string why(without_line_end(result.error()));
    link_.close();
    lose(why.empty() ? "unexpected result" : why);
}

void Listener::on_link_idle(DbLink &link) {
    if (&link == &table_link_) {
        on_table_idle();
        return;
    }
    switch (phase_) {
    case Phase::Listening:
        read_newest();
        return;
    case Phase::ReadingNewest:
        if (has_version_function_) {
            phase_ = Phase::ReadingVersion;
            link_.send("SELECT event_piper_schema_version()", 0, nullptr);
            return;
        }
        go_live();
        return;
    case Phase::ReadingVersion:
        go_live();
        return;
    case Phase::Checking:
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
    // A stream may have started waiting after the oldest waiting time was read, and before the
    // query's snapshot: the snapshot may hold events committed after it opened. Its time is
    // known now (a worker publishes it when the stream opens): read the start point again.
    uint64_t waiting = events_.waiting_since_ms();
    if (waiting != 0 && (since_read_ == 0 || waiting < since_read_)) {
        read_newest();
        return;
    }
    phase_ = Phase::Live;
    epoch_ = ++listens_;
    announced_floor_ = std::max(announced_floor_, newest_); // the hub starts from here
    checked_newest_ = 0;
    backoff_.reset();
    bool announce = !last_error_.empty() || !ever_live_;
    last_error_.clear();
    ever_live_ = true;
    note_schema_version();
    if (settings_.check_ms != 0) {
        check_.arm(settings_.check_ms);
    }
    events_.on_listener_ready(epoch_, newest_, start_for_waiting_);
    if (announce) { // after the hub (and the relay's board) know: tests wait for this line
        log_.write(LogLevel::Notice, "event_piper: listening for notifications (newest position " +
                                         to_text(static_cast<uint64_t>(newest_)) + ")");
    }
}

// Named in the log when it changes: an older schema works, but its fixes and rules for writers
// are missing until schema.sql is applied; a newer one works as far as this module knows it.
void Listener::note_schema_version() {
    if (schema_version_ == version_logged_) {
        return;
    }
    version_logged_ = schema_version_;
    std::string v = to_text(static_cast<uint64_t>(schema_version_));
    std::string mine = to_text(static_cast<uint64_t>(schema_version_current));
    if (schema_version_ < schema_version_current) {
        log_.write(LogLevel::Notice,
                   "event_piper: the database's schema is version " + v +
                       ", older than this module's postgresql/schema.sql (version " + mine +
                       "): streams work as before; apply schema.sql to have the rest");
    } else if (schema_version_ > schema_version_current) {
        log_.write(LogLevel::Warn, "event_piper: the database's schema is version " + v +
                                       ", newer than this module knows (version " + mine +
                                       "): streams work as with version " + mine +
                                       "; upgrade the module to have the rest");
    } else {
        log_.write(LogLevel::Notice, "event_piper: the database's schema is version " + v);
    }
}

void Listener::on_check_timer() {
    if (phase_ == Phase::Live) {
        phase_ = Phase::Checking;
        check_.arm(settings_.timeout_ms);
        if (link_.send(round_trip_sql.c_str(), 0, nullptr)) { // failure: on_link_lost has run
            start_table_check();
        }
        return;
    }
    if (phase_ == Phase::Checking) {
        link_.close();
        lose("no answer from the server for " + to_text(settings_.timeout_ms) +
             " ms (server or network frozen? or a lock held on table event_positions that the "
             "check's query waits for)");
    }
}

void Listener::on_link_lost(DbLink &link, std::string_view why) {
    if (&link == &table_link_) {
        table_query_ = TableQuery::None;
        table_failed(why);
        return;
    }
    lose(why);
}

void Listener::lose(std::string_view why) {
    bool was_live = epoch_ != 0;
    epoch_ = 0;
    phase_ = Phase::Down;
    check_.cancel();
    table_link_.close(); // opened again at the first check after the listener is back
    answer_ = TableAnswer{};
    table_query_ = TableQuery::None;
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
        // A bare position hint (docs/notification-grammar.md, form "p").
        events_.on_notification(std::string{grammar::form_position, grammar::field_separator} +
                                to_text(static_cast<uint64_t>(checked_newest_)));
        events_.on_notifications_done();
    }
    checked_newest_ = newest_committed;
}

void Listener::start_table_check() {
    switch (table_link_.state()) {
    case DbLink::State::Down:
        table_busy_rounds_ = 0;
        table_link_.connect(); // on_link_ready sends the query, or on_link_lost says why not
        return;
    case DbLink::State::Ready:
        send_table_round();
        return;
    default:
        // Still busy since an earlier round (a slow or frozen server): it holds back no
        // notification, and is replaced after two whole check periods.
        if (++table_busy_rounds_ >= 2) {
            table_link_.close();
            table_failed("no answer for two check periods (a lock held on table events, such as a "
                         "long LOCK TABLE events, that the check waits for? a slow server?)");
            table_busy_rounds_ = 0;
            table_link_.connect();
        }
        return;
    }
}

// The held writers' query first: it reads the lock table only, so that no lock on a table of
// ours can hold it up; then the table check.
void Listener::send_table_round() {
    if (writers_check_) {
        table_query_ = TableQuery::Writers;
        table_busy_rounds_ = 0;
        table_link_.send(held_writers_sql, 0, nullptr); // failure: on_link_lost has run
        return;
    }
    send_table_check();
}

void Listener::send_table_check() {
    known_param_ = "{";
    for (int64_t id : unpositioned_ids_) {
        if (known_param_.size() > 1) {
            known_param_ += ',';
        }
        known_param_ += to_text(static_cast<uint64_t>(id));
    }
    known_param_ += '}';
    std::string after = to_text(static_cast<uint64_t>(scanned_to_));
    std::string limit =
        to_text(static_cast<uint64_t>(scanned_to_ == 0 ? oldest_id_scanned : ids_per_check));
    const char *params[3] = {after.c_str(), known_param_.c_str(), limit.c_str()};
    answer_ = TableAnswer{};
    table_busy_rounds_ = 0;
    table_query_ = TableQuery::Table;
    table_link_.send(table_check_sql, 3, params); // failure: on_link_lost has run
}

void Listener::on_table_result(const QueryResult &result) {
    if (table_query_ == TableQuery::Writers) {
        if (result.ok()) {
            note_held_writers(result);
            return;
        }
        // Without this query (a server that does not know pg_locks.waitstart, before PostgreSQL
        // 14) the rounds go on with the table check alone.
        writers_check_ = false;
        std::string why(without_line_end(result.error()));
        log_.write(LogLevel::Warn,
                   "event_piper: cannot look for event writers held back in COMMIT (" + why +
                       "); not looking any more");
        return;
    }
    if (!result.ok()) {
        std::string why(without_line_end(result.error()));
        table_failed(why.empty() ? "unexpected result" : why);
        return;
    }
    namespace col = table_column;
    if (result.rows() == 1 && result.columns() >= col::count) {
        answer_.ok = true;
        answer_.scanned_to =
            result.is_null(0, col::scanned_to) ? 0 : result.number(0, col::scanned_to);
        answer_.found = result.number(0, col::found);
        parse_ids(result.is_null(0, col::found_ids) ? std::string_view()
                                                    : result.value(0, col::found_ids),
                  answer_.found_ids);
        parse_ids(result.is_null(0, col::still_ids) ? std::string_view()
                                                    : result.value(0, col::still_ids),
                  answer_.still_ids);
    }
}

// The ids read before that still have no position, then those found now, lowest first, up to
// unpositioned_followed; the next round reads ids after the last one read, or again from the
// first row found that is not followed.
void Listener::on_table_idle() {
    table_busy_rounds_ = 0;
    if (table_query_ == TableQuery::Writers) {
        send_table_check(); // the same round
        return;
    }
    table_query_ = TableQuery::None;
    if (!answer_.ok) {
        return;
    }
    TableAnswer a = std::move(answer_);
    answer_ = TableAnswer{};
    table_error_.clear();
    size_t still_count = a.still_ids.size();
    std::vector<int64_t> ids = std::move(a.still_ids);
    size_t taken = 0;
    while (taken < a.found_ids.size() && ids.size() < unpositioned_followed) {
        ids.push_back(a.found_ids[taken++]);
    }
    int64_t next = a.scanned_to != 0 ? a.scanned_to : scanned_to_;
    if (static_cast<int64_t>(taken) < a.found && !a.found_ids.empty()) {
        next = taken < a.found_ids.size() ? a.found_ids[taken] - 1 : a.found_ids.back();
    }
    scanned_to_ = next; // lower only when the ids started again
    int64_t rows = static_cast<int64_t>(ids.size()) + a.found - static_cast<int64_t>(taken);
    if (settings_.positioned_after_commit) {
        rows = static_cast<int64_t>(still_count); // late; those found this round may be in flight
    }
    unpositioned_ids_ = std::move(ids);
    note_unpositioned(rows);
}

void Listener::table_failed(std::string_view why) {
    std::string reason(why.empty() ? "unknown error" : why);
    if (reason != table_error_) {
        log_.write(LogLevel::Warn, "event_piper: the check for rows without a position failed: " +
                                       reason + "; tried again at the next check");
    }
    table_error_ = reason;
}

void Listener::note_held_writers(const QueryResult &result) {
    namespace col = writers_column;
    if (result.rows() != 1 || result.columns() < col::count) {
        return;
    }
    int64_t waiting = result.number(0, col::waiting);
    writers_waiting_ = waiting;
    if (waiting == 0) {
        if (!writers_blocker_.empty()) {
            log_.write(LogLevel::Notice, "event_piper: event writers no longer wait in COMMIT");
            writers_blocker_.clear();
        }
        return;
    }
    std::string blocker, release;
    if (!result.is_null(0, col::head_pid)) {
        std::string pid(result.value(0, col::head_pid));
        blocker = "backend pid " + pid;
        if (!result.is_null(0, col::head_user)) {
            blocker += " (user \"" + std::string(result.value(0, col::head_user)) +
                       "\", application \"" +
                       std::string(result.is_null(0, col::head_application)
                                       ? ""
                                       : result.value(0, col::head_application)) +
                       "\")";
        }
        release = "the end of that transaction (pg_terminate_backend(" + pid + ") if it is stuck)";
    } else if (!result.is_null(0, col::head_gid)) {
        std::string gid(result.value(0, col::head_gid));
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
    uint64_t ms = result.is_null(0, col::longest_wait_ms)
                      ? 0
                      : static_cast<uint64_t>(result.number(0, col::longest_wait_ms));
    log_.write(LogLevel::Warn,
               "event_piper: " + to_text(static_cast<uint64_t>(waiting)) +
                   " event writers have waited in COMMIT for up to " + to_text(ms / 1000) + "." +
                   to_text(ms % 1000 / 100) + " s behind " + blocker +
                   ", whose transaction reserved positions before theirs and has not ended (open "
                   "after SET CONSTRAINTS ... IMMEDIATE, a slow deferred trigger, a synchronous "
                   "standby, a transaction prepared under an older schema.sql); they wait for " +
                   release + "; lock_timeout bounds their wait, statement_timeout does not");
}

void Listener::note_unpositioned(int64_t rows) {
    // Beyond the rows followed by id the count is a lower bound that moves from round to round:
    // said when it gets there, not at every move.
    auto capped = [](int64_t n) { return n >= static_cast<int64_t>(unpositioned_followed); };
    if (rows != unpositioned_ && !(capped(rows) && capped(unpositioned_))) {
        if (rows > 0) {
            log_.write(LogLevel::Warn,
                       "event_piper: " + std::string(capped(rows) ? "at least " : "") +
                           to_text(static_cast<uint64_t>(rows)) +
                           (settings_.positioned_after_commit
                                ? " committed rows of table events have had no position for a "
                                  "check period (event_piper_source wal: has the positioner "
                                  "stopped? its log lines say why): no client receives them "
                                  "until it positions them"
                                : " committed rows of table events have no position (was the "
                                  "trigger events_commit_notify disabled or dropped?): no client "
                                  "can receive them; apply postgresql/schema.sql again to give "
                                  "them positions"));
        } else {
            log_.write(LogLevel::Notice, "event_piper: every row of table events has a position "
                                         "again");
        }
    }
    unpositioned_ = rows;
}

} // namespace event_piper
