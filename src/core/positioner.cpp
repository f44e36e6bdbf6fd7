// The positioner (see positioner.hpp and docs/wal-source.md).
#include "positioner.hpp"

#include "grammar.hpp"
#include "text.hpp"

#include <algorithm>
#include <charconv>

namespace event_piper {

using pgoutput::Lsn;

namespace {

namespace g = grammar;

// The notifications below follow docs/notification-grammar.md, byte for byte as the trigger
// builds them.

// A patch's target after the lengths (" <position>"); nothing for a plain event.
std::string target_field(const WalRow &r) {
    return r.target != 0 ? g::field_separator + to_text(r.target) : std::string();
}

// A form's letter and separator: "e ", "r ", "p ".
std::string form(char letter) {
    return std::string{letter, g::field_separator};
}

// event_piper_message in schema.sql.
std::string one_message(int64_t pos, const WalRow &r) {
    const std::string p = to_text(pos);
    const std::string tgt = target_field(r);
    const size_t sub = r.subscriber.size(), typ = r.type.size(), body = r.payload.size();
    // The header's fixed bytes: the letter and 3 separators, and the header's end.
    if (sub + typ + body + p.size() + to_text(sub).size() + to_text(typ).size() + tgt.size() + 5 <
        g::event_below) {
        return form(g::form_event) + p + g::field_separator + to_text(sub) + g::field_separator +
               to_text(typ) + tgt + g::header_end + r.subscriber + r.type + r.payload;
    }
    if (sub < g::subscriber_below) {
        return form(g::form_reference) + p + g::field_separator + to_text(sub) + g::header_end +
               r.subscriber;
    }
    return form(g::form_position) + p;
}

// event_piper_batch_record in schema.sql.
std::string batch_record(const WalRow &r) {
    return to_text(r.position) + g::field_separator + to_text(r.subscriber.size()) +
           g::field_separator + to_text(r.type.size()) + g::field_separator +
           to_text(r.payload.size()) + target_field(r) + g::header_end + r.subscriber + r.type +
           r.payload;
}

void quote_into(std::string &out, const std::string &item) {
    out.push_back('"');
    for (char c : item) {
        if (c == '"' || c == '\\') {
            out.push_back('\\');
        }
        out.push_back(c);
    }
    out.push_back('"');
}

} // namespace

std::vector<std::string> wal_notifications(const std::vector<const WalRow *> &rows) {
    // The loop of events_commit_notify: a batch is flushed when the next event does not fit in
    // it or must go alone; a batch of one event goes in the "e" form.
    const std::string batch_head{g::form_batch, g::header_end};
    std::vector<std::string> out;
    std::string buf;
    std::string lone;
    for (const WalRow *r : rows) {
        size_t size = r->subscriber.size() + r->type.size() + r->payload.size();
        std::string rec = size <= g::batch_event_max ? batch_record(*r) : std::string();
        if (!buf.empty() &&
            (size > g::batch_event_max || buf.size() + rec.size() > g::batch_records_max)) {
            out.push_back(!lone.empty() ? lone : batch_head + buf);
            buf.clear();
        }
        if (size > g::batch_event_max) {
            if (r->subscriber.size() < g::subscriber_below) {
                out.push_back(one_message(r->position, *r));
            }
            continue;
        }
        lone = buf.empty() ? one_message(r->position, *r) : std::string();
        buf += rec;
    }
    if (!buf.empty()) {
        out.push_back(!lone.empty() ? lone : batch_head + buf);
    }
    return out;
}

std::string text_array(const std::vector<std::string> &items) {
    std::string out = "{";
    for (size_t i = 0; i < items.size(); ++i) {
        if (i > 0) {
            out.push_back(',');
        }
        quote_into(out, items[i]);
    }
    out.push_back('}');
    return out;
}

// Like int_array, with 0 as NULL (a plain event's target).
static std::string target_array(const std::vector<int64_t> &items) {
    std::string out = "{";
    for (size_t i = 0; i < items.size(); ++i) {
        if (i > 0) {
            out.push_back(',');
        }
        out += items[i] != 0 ? to_text(items[i]) : std::string("NULL");
    }
    out.push_back('}');
    return out;
}

std::string int_array(const std::vector<int64_t> &items) {
    std::string out = "{";
    for (size_t i = 0; i < items.size(); ++i) {
        if (i > 0) {
            out.push_back(',');
        }
        out += to_text(items[i]);
    }
    out.push_back('}');
    return out;
}

const char *Positioner::progress_sql() {
    return "SELECT source, lsn::text, last_position FROM event_piper_wal_progress WHERE id = 1";
}
namespace {
namespace progress_column {
enum : int { source, lsn, last_position };
}
} // namespace

const char *Positioner::drop_idle_slot_sql() {
    return "SELECT event_piper_wal_drop_idle_slot()";
}

const char *Positioner::recreate_slot_sql() {
    // Arguments: the holder, the channel. Answers the outcome ('recreated', 'exists': another
    // positioner did it, 'trigger': the database switched meanwhile), how many rows got
    // positions, above which position.
    return "SELECT outcome, caught_up, above FROM event_piper_wal_recreate_slot($1, $2)";
}

const char *Positioner::apply_sql() {
    // Arguments: the progress this positioner expects (fencing; '' = NULL), the new one ('' =
    // a part: progress unchanged), the last position given, the rows, the notifications, later
    // changes, the holder, the channel, the ids of the decoded transactions written, and the
    // rows' targets (positions; NULL: plain).
    return "SELECT event_piper_wal_apply(nullif($1, '')::pg_lsn, nullif($2, '')::pg_lsn, "
           "$3::bigint, $4::bigint[], $5::bigint[], $6::text[], $7::bigint[], $8::text[], "
           "$9::bigint[], $10::text[], $11::bigint[], $12::boolean, $13, $14, $15::bigint[], "
           "$16::bigint[])";
}

const char *Positioner::targets_sql() {
    // The event's own position is its smallest (a compaction's stand-in comes later).
    return "SELECT e.id, e.subscriber, e.patches, (SELECT min(p.position) FROM event_positions p "
           "WHERE p.event_id = e.id) FROM events e WHERE e.id = ANY ($1::bigint[])";
}
namespace {
namespace targets_column {
enum : int { id, subscriber, patches, position };
}
} // namespace

Positioner::Positioner(DbLink &apply, ReplicationLink &replication, Timer &retry, Timer &status,
                       Clock &clock, Log &log, Settings settings)
    : apply_(apply), replication_(replication), retry_(retry), status_(status), clock_(clock),
      log_(log), settings_(std::move(settings)) {}

void Positioner::start() {
    if (phase_ != Phase::Stopped) {
        return;
    }
    backoff_.reset();
    connect();
}

void Positioner::stop() {
    if (phase_ == Phase::Stopped) {
        return;
    }
    lose("stopped", true);
    retry_.cancel();
    phase_ = Phase::Stopped;
}

void Positioner::on_retry_timer() {
    if (phase_ == Phase::Waiting) {
        connect();
    }
}

void Positioner::connect() {
    phase_ = Phase::Connecting;
    apply_ready_ = false;
    replication_ready_ = false;
    apply_.connect();
    if (phase_ == Phase::Connecting) {
        replication_.connect();
    }
}

void Positioner::note_error(LogLevel level, const std::string &text) {
    // One line: server errors span several ("ERROR: ...\nCONTEXT: ...").
    std::string message;
    for (char c : text) {
        if (c == '\n' || c == '\r' || c == '\t') {
            if (!message.empty() && message.back() != ' ') {
                message.push_back(' ');
            }
        } else {
            message.push_back(c);
        }
    }
    while (!message.empty() && message.back() == ' ') {
        message.pop_back();
    }
    if (message != last_error_) {
        last_error_ = message;
        log_.write(level, message);
    }
}

void Positioner::wait(uint64_t ms) {
    phase_ = Phase::Waiting;
    retry_.arm(ms);
}

void Positioner::lose(std::string_view why, bool quiet) {
    apply_.close();
    replication_.close();
    status_.cancel();
    apply_ready_ = replication_ready_ = false;
    dropping_slot_ = trigger_mode_ = recreating_slot_ = false;
    // Whatever was not committed is read again from the slot.
    in_txn_ = skip_txn_ = txn_spilled_ = false;
    txn_switch_wal_ = txn_switch_trigger_ = false;
    open_.clear();
    open_index_.clear();
    done_.clear();
    done_index_.clear();
    notifications_.clear();
    xids_.clear();
    deferred_.clear();
    looked_up_.clear();
    moves_.clear();
    deletes_.clear();
    truncate_ = done_dirty_ = false;
    done_transactions_ = 0;
    pending_count_ = pending_bytes_ = notification_bytes_ = 0;
    oldest_pending_ms_ = inflight_oldest_ms_ = 0;
    applying_ = Apply::None;
    explicit_txn_ = false;
    reading_ = true;
    events_relid_ = 0;
    last_position_ = stored_position_;
    if (!quiet) {
        note_error(LogLevel::Error, "event_piper positioner: " + std::string(why));
    }
    wait(backoff_.next());
}

void Positioner::on_link_ready(DbLink &) {
    apply_ready_ = true;
    if (phase_ == Phase::Connecting && replication_ready_) {
        phase_ = Phase::ReadingProgress;
        apply_.send(progress_sql(), 0, nullptr);
    }
}

void Positioner::on_replication_ready() {
    replication_ready_ = true;
    if (phase_ == Phase::Connecting && apply_ready_) {
        phase_ = Phase::ReadingProgress;
        apply_.send(progress_sql(), 0, nullptr);
    }
}

void Positioner::on_link_lost(DbLink &, std::string_view why) {
    if (phase_ != Phase::Stopped && phase_ != Phase::Waiting) {
        lose("positions connection lost: " + std::string(why));
    }
}

void Positioner::on_replication_lost(std::string_view why) {
    if (phase_ != Phase::Stopped && phase_ != Phase::Waiting) {
        lose("replication connection lost: " + std::string(why));
    }
}

void Positioner::on_link_result(DbLink &, const QueryResult &result) {
    if (recreating_slot_) {
        if (!result.ok()) {
            lose("replication slot \"" + settings_.slot + "\" was " + slot_gone_ +
                 " and cannot be created again (" + result.error() +
                 "): run SELECT event_piper_set_source('trigger'), then SELECT "
                 "event_piper_set_source('wal')");
        } else if (result.rows() == 1 && result.value(0, 0) == "recreated") {
            note_error(LogLevel::Warn,
                       "event_piper positioner: replication slot \"" + settings_.slot + "\" was " +
                           slot_gone_ + ": created it again; " + std::string(result.value(0, 1)) +
                           " events committed while it was missing got the positions after " +
                           std::string(result.value(0, 2)) +
                           ", in id order (out of commit order, above every position handed "
                           "out: no client misses one)");
        }
        return;
    }
    if (phase_ == Phase::ReadingProgress && dropping_slot_) {
        if (!result.ok()) {
            note_error(LogLevel::Warn, "event_piper positioner: cannot drop the idle replication "
                                       "slot: " +
                                           result.error());
        }
        return;
    }
    if (phase_ == Phase::ReadingProgress) {
        if (!result.ok()) {
            lose("cannot read event_piper_wal_progress (" + result.error() +
                 "): apply postgresql/wal.sql, then SELECT event_piper_set_source('wal')");
            return;
        }
        namespace col = progress_column;
        if (result.rows() == 0 || result.value(0, col::source) != "wal") {
            // Trigger mode: nothing to do until someone switches the database, but a slot left
            // by the switch back (it was being read then) must not keep WAL.
            trigger_mode_ = true;
            return;
        }
        trigger_mode_ = false;
        stored_null_ = result.is_null(0, col::lsn);
        stored_lsn_ = 0;
        if (!stored_null_ && !pgoutput::parse_lsn(result.value(0, col::lsn), stored_lsn_)) {
            lose("event_piper_wal_progress holds a bad lsn: " +
                 std::string(result.value(0, col::lsn)));
            return;
        }
        stored_position_ = last_position_ = result.number(0, col::last_position);
        awaiting_switch_ = stored_null_;
        confirmed_lsn_ = stored_lsn_;
        return;
    }
    if (applying_ == Apply::Lookup && result.ok()) {
        namespace col = targets_column;
        for (int row = 0; row < result.rows(); ++row) {
            TargetRow &t = looked_up_[result.number(row, col::id)];
            t.subscriber.assign(result.value(row, col::subscriber));
            t.patches = result.is_null(row, col::patches) ? 0 : result.number(row, col::patches);
            t.position = result.is_null(row, col::position) ? 0 : result.number(row, col::position);
        }
        return;
    }
    if (applying_ != Apply::None && !result.ok()) {
        std::string error = result.error();
        if (applying_ == Apply::Lookup) {
            lose("reading the targets of patches failed: " + error);
        } else if (error.find("fenced") != std::string::npos) {
            lose("another positioner wrote the progress (" + error + "): stepping down");
        } else {
            lose("writing positions failed: " + error);
        }
    }
}

void Positioner::on_link_idle(DbLink &) {
    if (recreating_slot_ && phase_ == Phase::Starting) {
        // Start afresh: the progress row now says to skip up to the re-creation's marker.
        recreating_slot_ = false;
        backoff_.reset();
        lose("", true);
        return;
    }
    if (phase_ != Phase::ReadingProgress && phase_ != Phase::Streaming) {
        return; // lost meanwhile
    }
    if (phase_ == Phase::ReadingProgress) {
        if (!trigger_mode_) {
            start_replication();
        } else if (!dropping_slot_) {
            dropping_slot_ = true;
            apply_.send(drop_idle_slot_sql(), 0, nullptr);
        } else {
            dropping_slot_ = false;
            lose("", true);
            note_error(LogLevel::Notice,
                       "event_piper positioner: the database gives positions with its trigger "
                       "(event_piper_source wal needs SELECT event_piper_set_source('wal'))");
            retry_.arm(settings_.idle_retry_ms);
        }
        return;
    }
    switch (applying_) {
    case Apply::None:
        return;
    case Apply::Lookup:
        applying_ = Apply::None;
        looked_up();
        return;
    case Apply::Begin:
        applying_ = Apply::None;
        explicit_txn_ = true;
        maybe_apply();
        return;
    case Apply::Part:
        applying_ = Apply::None;
        maybe_apply();
        return;
    case Apply::Final:
        if (explicit_txn_) {
            send_plain("COMMIT", Apply::Commit);
            return;
        }
        applying_ = Apply::None;
        applied();
        return;
    case Apply::Commit:
        applying_ = Apply::None;
        explicit_txn_ = false;
        applied();
        return;
    }
}

void Positioner::start_replication() {
    phase_ = Phase::Starting;
    replication_.command(pgoutput::start_replication_command(
        settings_.slot, stored_null_ ? 0 : stored_lsn_, settings_.publication));
}

void Positioner::on_replication_result(const QueryResult &result) {
    if (phase_ != Phase::Starting || result.ok()) {
        return;
    }
    std::string error = result.error();
    std::string slot = "replication slot \"" + settings_.slot + "\"";
    if (error.find("is active for PID") != std::string::npos) {
        // Another positioner (this or another instance) reads the slot: this one is a candidate.
        lose("", true);
        note_error(LogLevel::Notice,
                   "event_piper positioner: " + slot + " is read by another positioner; retrying");
        return;
    }
    bool dropped = error.find(slot + " does not exist") != std::string::npos;
    bool invalidated = error.find("can no longer get changes") != std::string::npos ||
                       error.find("invalidated") != std::string::npos;
    if (dropped || invalidated) {
        // Created again on the positions connection, which also positions the rows committed
        // while no slot decoded them (docs/wal-source.md, section 7).
        slot_gone_ = dropped ? "dropped" : "invalidated";
        note_error(LogLevel::Warn, "event_piper positioner: cannot read " + slot + " (" + error +
                                       "): creating it again");
        recreating_slot_ = true;
        const char *params[] = {settings_.holder.c_str(), settings_.channel.c_str()};
        apply_.send(recreate_slot_sql(), 2, params);
        return;
    }
    std::string hint;
    if (error.find("does not exist") != std::string::npos) {
        hint = ": run SELECT event_piper_set_source('wal')";
    } else if (error.find("wal_level") != std::string::npos) {
        hint = ": set wal_level = logical and restart PostgreSQL";
    } else if (error.find("permission") != std::string::npos ||
               error.find("must be superuser or replication role") != std::string::npos ||
               error.find("must have") != std::string::npos) {
        hint = ": the role needs the REPLICATION attribute (ALTER ROLE ... REPLICATION; on "
               "managed services the replication role)";
    } else if (error.find("publication") != std::string::npos) {
        hint = ": run SELECT event_piper_set_source('wal'), which creates it";
    }
    lose("cannot read " + slot + " (" + error + ")" + hint);
    if (!hint.empty() && error.find("does not exist") != std::string::npos) {
        retry_.arm(settings_.idle_retry_ms);
    }
}

void Positioner::on_replication_idle() {}

void Positioner::on_replication_streaming() {
    if (phase_ != Phase::Starting) {
        return;
    }
    phase_ = Phase::Streaming;
    backoff_.reset();
    if (!last_error_.empty()) {
        log_.write(LogLevel::Notice,
                   "event_piper positioner: reading replication slot \"" + settings_.slot +
                       "\" from " +
                       (stored_null_ ? std::string("its start") : pgoutput::lsn_text(stored_lsn_)));
        last_error_.clear();
    }
    reading_ = true;
    replication_.set_reading(true);
    status_.arm(settings_.status_ms);
}

void Positioner::on_status_timer() {
    if (phase_ != Phase::Streaming) {
        return;
    }
    confirm(confirmed_lsn_, false);
    status_.arm(settings_.status_ms);
}

void Positioner::confirm(Lsn lsn, bool reply) {
    if (phase_ != Phase::Streaming) {
        return;
    }
    confirmed_lsn_ = std::max(confirmed_lsn_, lsn);
    int64_t now_us = static_cast<int64_t>(clock_.now_ms()) * 1000 - pgoutput::pg_epoch_unix_us;
    replication_.send_copy(pgoutput::standby_status_update(confirmed_lsn_, confirmed_lsn_,
                                                           confirmed_lsn_, now_us, reply));
}

void Positioner::on_replication_data(std::string_view copy_data) {
    if (phase_ != Phase::Streaming) {
        return;
    }
    pgoutput::CopyMessage copy;
    std::string error;
    if (!pgoutput::parse_copy(copy_data, copy, error)) {
        lose("bad replication message: " + error);
        return;
    }
    server_wal_end_ = std::max(server_wal_end_, copy.wal_end);
    if (copy.kind == pgoutput::CopyMessage::Kind::Keepalive) {
        bool idle = !in_txn_ && !done_dirty_ && applying_ == Apply::None && !explicit_txn_;
        if (idle && copy.wal_end > confirmed_lsn_) {
            // Nothing pending: everything the server sent up to here is handled.
            confirm(copy.wal_end, false);
        } else if (copy.reply_requested) {
            confirm(confirmed_lsn_, false);
        }
        return;
    }
    pgoutput::Message m;
    if (!pgoutput::parse_message(copy.data, m, error)) {
        lose("bad pgoutput message: " + error);
        return;
    }
    handle_message(m);
}

void Positioner::on_replication_drained() {
    if (phase_ == Phase::Streaming) {
        maybe_apply();
    }
}

void Positioner::handle_message(const pgoutput::Message &m) {
    using Kind = pgoutput::Message::Kind;
    switch (m.kind) {
    case Kind::Begin:
        if (in_txn_) {
            lose("Begin inside a transaction");
            return;
        }
        in_txn_ = true;
        // Handled before (stored), or a transaction of the trigger era before the switch.
        skip_txn_ = awaiting_switch_ || (!stored_null_ && m.final_lsn < stored_lsn_);
        txn_spilled_ = txn_switch_wal_ = txn_switch_trigger_ = false;
        txn_commit_time_ = m.commit_time;
        txn_xid_ = m.xid;
        txn_last_position_ = 0;
        return;
    case Kind::Commit:
        if (!in_txn_) {
            lose("Commit outside a transaction");
            return;
        }
        on_commit(m);
        return;
    case Kind::Relation: {
        if (m.relname != "events") {
            return;
        }
        events_relid_ = m.relation_id;
        col_id_ = col_type_ = col_subscriber_ = col_payload_ = col_patches_ = -1;
        for (size_t i = 0; i < m.relation_columns.size(); ++i) {
            const std::string &name = m.relation_columns[i].name;
            int index = static_cast<int>(i);
            if (name == "id") {
                col_id_ = index;
            } else if (name == "type") {
                col_type_ = index;
            } else if (name == "subscriber") {
                col_subscriber_ = index;
            } else if (name == "payload") {
                col_payload_ = index;
            } else if (name == "patches") {
                col_patches_ = index;
            }
        }
        if (col_id_ < 0 || col_type_ < 0 || col_subscriber_ < 0 || col_payload_ < 0) {
            lose("the events table sent by the slot lacks id, type, subscriber or payload");
        }
        return;
    }
    case Kind::Insert:
    case Kind::Update:
    case Kind::Delete:
        if (!in_txn_) {
            lose("a change outside a transaction");
            return;
        }
        if (!skip_txn_ && m.relation_id == events_relid_ && events_relid_ != 0) {
            handle_change(m);
        }
        return;
    case Kind::Truncate:
        if (in_txn_ && !skip_txn_ &&
            std::find(m.truncated.begin(), m.truncated.end(), events_relid_) != m.truncated.end()) {
            truncate_pending();
        }
        return;
    case Kind::Logical:
        if (in_txn_ && m.transactional && m.prefix == "event_piper") {
            txn_switch_wal_ = txn_switch_wal_ || m.content == "source wal";
            txn_switch_trigger_ = txn_switch_trigger_ || m.content == "source trigger";
        }
        return;
    case Kind::Origin:
    case Kind::Type:
        return;
    }
}

bool Positioner::column(const std::vector<pgoutput::Column> &tuple, int index,
                        std::string &out) const {
    if (index < 0 || static_cast<size_t>(index) >= tuple.size() ||
        tuple[static_cast<size_t>(index)].kind != 't') {
        return false;
    }
    out.assign(tuple[static_cast<size_t>(index)].text);
    return true;
}

int64_t Positioner::patches_of(const std::vector<pgoutput::Column> &tuple) const {
    std::string text;
    int64_t id = 0;
    if (column(tuple, col_patches_, text)) {
        std::from_chars(text.data(), text.data() + text.size(), id);
    }
    return id;
}

void Positioner::handle_change(const pgoutput::Message &m) {
    using Kind = pgoutput::Message::Kind;
    const std::vector<pgoutput::Column> &tuple = m.kind == Kind::Delete ? m.old_tuple : m.new_tuple;
    std::string id_text;
    if (!column(tuple, col_id_, id_text)) {
        lose("an events change without its id");
        return;
    }
    int64_t id = 0;
    auto [ptr, ec] = std::from_chars(id_text.data(), id_text.data() + id_text.size(), id);
    if (ec != std::errc() || ptr != id_text.data() + id_text.size()) {
        lose("an events change with a bad id: " + id_text);
        return;
    }
    if (m.kind == Kind::Insert) {
        WalRow row;
        row.id = id;
        row.commit_time = txn_commit_time_;
        if (!column(tuple, col_subscriber_, row.subscriber) ||
            !column(tuple, col_type_, row.type) || !column(tuple, col_payload_, row.payload)) {
            lose("an events insert without subscriber, type or payload");
            return;
        }
        row.patches = patches_of(tuple);
        pending_bytes_ += row.subscriber.size() + row.type.size() + row.payload.size();
        open_index_[id] = open_.size();
        open_.push_back(std::move(row));
    } else if (m.kind == Kind::Update) {
        auto in_open = open_index_.find(id);
        auto in_done = done_index_.find(id);
        if (in_open != open_index_.end()) {
            // Changed by its own transaction: it is delivered as committed. An unchanged TOASTed
            // column ('u') keeps the value held.
            WalRow &row = open_[in_open->second];
            column(tuple, col_subscriber_, row.subscriber);
            column(tuple, col_type_, row.type);
            column(tuple, col_payload_, row.payload);
            row.patches = patches_of(tuple);
            pending_bytes_ += row.subscriber.size() + row.type.size() + row.payload.size();
        } else if (in_done != done_index_.end()) {
            column(tuple, col_subscriber_, done_[in_done->second].subscriber);
        } else {
            std::string subscriber;
            if (column(tuple, col_subscriber_, subscriber)) {
                pending_bytes_ += subscriber.size();
                moves_[id] = std::move(subscriber);
            }
        }
    } else {
        auto in_open = open_index_.find(id);
        auto in_done = done_index_.find(id);
        if (in_open != open_index_.end()) {
            open_[in_open->second].alive = false;
            open_index_.erase(in_open);
        } else if (in_done != done_index_.end()) {
            done_[in_done->second].alive = false;
            done_index_.erase(in_done);
        } else {
            moves_.erase(id);
            deletes_.push_back(id);
        }
    }
    count_pending();
    if (pending_count_ >= settings_.rows_max || pending_bytes_ >= settings_.bytes_max) {
        maybe_apply();
    }
}

void Positioner::count_pending() {
    pending_count_ = open_.size() + done_.size() + moves_.size() + deletes_.size();
    peak_pending_ = std::max(peak_pending_, pending_count_);
}

void Positioner::truncate_pending() {
    // Everything before the truncate, written or not, goes; positions given stay used.
    for (WalRow &r : open_) {
        r.alive = false;
    }
    for (WalRow &r : done_) {
        r.alive = false;
    }
    open_index_.clear();
    done_index_.clear();
    moves_.clear();
    deletes_.clear();
    truncate_ = true;
}

void Positioner::on_commit(const pgoutput::Message &m) {
    in_txn_ = false;
    if (txn_switch_trigger_ && !skip_txn_) {
        // The database went back to its trigger (event_piper_set_source('trigger')), which
        // waited until this positioner had confirmed everything before it.
        lose("", true);
        note_error(LogLevel::Notice, "event_piper positioner: the database was switched to its "
                                     "trigger (event_piper_set_source('trigger'))");
        retry_.arm(settings_.idle_retry_ms);
        return;
    }
    if (skip_txn_) {
        if (awaiting_switch_ && txn_switch_wal_) {
            // The switch to wal: every transaction after it is ours; store that at once.
            awaiting_switch_ = false;
            skip_txn_ = false;
        } else {
            return;
        }
    }
    // The transaction's surviving rows get the next positions, in the order they were inserted,
    // then its patches their targets' positions.
    std::vector<const WalRow *> rows;
    for (WalRow &r : open_) {
        if (r.alive) {
            r.position = ++last_position_;
            txn_last_position_ = r.position;
            rows.push_back(&r);
        }
    }
    if (!rows.empty()) {
        note_xid();
    }
    bool lookup = false;
    for (WalRow &r : open_) {
        if (r.alive) {
            resolve_target(r);
            lookup = lookup || r.lookup;
        }
    }
    if (!txn_spilled_ && lookup) {
        // Built once the targets are read (send_apply), in this place of the order.
        deferred_.push_back({notifications_.size(), done_.size(), done_.size() + rows.size()});
        notifications_.emplace_back();
        for (const WalRow *r : rows) {
            pending_bytes_ += r->subscriber.size() + r->type.size() + r->payload.size() + 48;
        }
    } else if (!txn_spilled_) {
        for (std::string &n : wal_notifications(rows)) {
            notification_bytes_ += n.size();
            pending_bytes_ += n.size();
            notifications_.push_back(std::move(n));
        }
    } else if (txn_last_position_ > 0) {
        // Too large to hold: a bare position sends the streams to the table.
        notifications_.push_back(form(g::form_position) + to_text(txn_last_position_));
    }
    if (oldest_pending_ms_ == 0) {
        oldest_pending_ms_ =
            static_cast<uint64_t>((txn_commit_time_ + pgoutput::pg_epoch_unix_us) / 1000);
    }
    for (WalRow &r : open_) {
        if (r.alive) {
            done_index_[r.id] = done_.size();
            done_.push_back(std::move(r));
        }
    }
    open_.clear();
    open_index_.clear();
    done_lsn_ = m.end_lsn;
    done_dirty_ = true;
    ++done_transactions_;
    count_pending();
    if (explicit_txn_) {
        maybe_apply(); // the large transaction is complete: commit it
    }
}

void Positioner::note_xid() {
    // A writer's commit is in the WAL (and so decoded) a moment before other sessions see it:
    // its positions must not be visible before its rows (a stream reading the table would pass
    // over them), so the database waits for these transactions before it writes positions.
    if (xids_.empty() || xids_.back() != txn_xid_) {
        xids_.push_back(txn_xid_);
    }
}

void Positioner::maybe_apply() {
    if (phase_ != Phase::Streaming || applying_ != Apply::None) {
        bool over = pending_count_ >= settings_.rows_max || pending_bytes_ >= settings_.bytes_max;
        if (over && reading_ && phase_ == Phase::Streaming) {
            reading_ = false;
            replication_.set_reading(false);
        }
        return;
    }
    bool over = pending_count_ >= settings_.rows_max || pending_bytes_ >= settings_.bytes_max;
    if (in_txn_ && over) {
        // A transaction too large to hold: write what is pending in a part of one positioner
        // transaction, which commits with the transaction's end.
        if (!explicit_txn_) {
            send_plain("BEGIN", Apply::Begin);
        } else {
            // The open transaction's rows so far get their positions now, in order, and its
            // patches their targets (rows of earlier parts are in the table already).
            for (WalRow &r : open_) {
                if (r.alive) {
                    r.position = ++last_position_;
                    txn_last_position_ = r.position;
                }
            }
            for (WalRow &r : open_) {
                if (r.alive) {
                    resolve_target(r);
                }
            }
            for (WalRow &r : open_) {
                if (r.alive) {
                    done_.push_back(std::move(r));
                }
            }
            open_.clear();
            open_index_.clear();
            txn_spilled_ = true;
            note_xid();
            send_apply(false);
        }
        return;
    }
    if (!in_txn_ && done_dirty_) {
        send_apply(true);
        return;
    }
    if (!in_txn_ && explicit_txn_) {
        send_apply(true); // defensive: a part was written, the transaction ended
        return;
    }
    if (in_txn_ && !explicit_txn_ && done_dirty_) {
        // Complete transactions before the open one (not too large so far) go now.
        send_apply(true);
        return;
    }
    if (!reading_) {
        reading_ = true;
        replication_.set_reading(true);
    }
}

void Positioner::send_plain(const char *sql, Apply what) {
    applying_ = what;
    apply_.send(sql, 0, nullptr);
}

void Positioner::resolve_target(WalRow &row) {
    row.target = 0;
    row.lookup = false;
    if (row.patches == 0) {
        return;
    }
    // An earlier row of the same transaction, or of a transaction of this batch.
    auto in_open = open_index_.find(row.patches);
    if (in_open != open_index_.end()) {
        const WalRow &t = open_[in_open->second];
        check_target(row, t.alive, t.subscriber, t.patches, t.position);
        return;
    }
    auto in_done = done_index_.find(row.patches);
    if (in_done != done_index_.end()) {
        const WalRow &t = done_[in_done->second];
        check_target(row, t.alive, t.subscriber, t.patches, t.position);
        return;
    }
    row.lookup = true; // in the table (or nowhere): send_lookup
}

void Positioner::check_target(WalRow &row, bool exists, const std::string &subscriber,
                              int64_t patches, int64_t position) {
    // The checks of the trigger (event_piper_patch_target in schema.sql). Here the writer has
    // committed already: a bad patch cannot be refused, so it is delivered as a plain event
    // (nothing is lost, and a client keyed by targets ignores an id it never saw), and logged.
    row.lookup = false;
    const char *why = nullptr;
    if (!exists) {
        why = "does not exist";
    } else if (subscriber != row.subscriber) {
        why = "belongs to another subscriber";
    } else if (patches != 0) {
        why = "is itself a patch";
    } else if (position == 0 || position >= row.position) {
        why = "has no position before it";
    }
    if (why == nullptr) {
        row.target = position;
        return;
    }
    row.target = 0;
    log_.write(LogLevel::Warn, "event_piper positioner: event " + to_text(row.id) +
                                   " patches event " + to_text(row.patches) + ", which " + why +
                                   ": delivered as a plain event at position " +
                                   to_text(row.position));
}

void Positioner::send_lookup(bool final) {
    std::vector<int64_t> ids;
    for (const WalRow &r : done_) {
        if (r.lookup) {
            ids.push_back(r.patches);
        }
    }
    std::sort(ids.begin(), ids.end());
    ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
    lookup_params_ = int_array(ids);
    lookup_ids_ = std::move(ids);
    lookup_final_ = final;
    looked_up_.clear();
    const char *params[1] = {lookup_params_.c_str()};
    applying_ = Apply::Lookup;
    apply_.send(targets_sql(), 1, params);
}

void Positioner::looked_up() {
    for (WalRow &r : done_) {
        if (!r.lookup || !std::binary_search(lookup_ids_.begin(), lookup_ids_.end(), r.patches)) {
            continue; // decoded while the read ran: the next round
        }
        auto t = looked_up_.find(r.patches);
        if (t == looked_up_.end()) {
            check_target(r, false, std::string(), 0, 0);
        } else {
            check_target(r, true, t->second.subscriber, t->second.patches, t->second.position);
        }
    }
    looked_up_.clear();
    send_apply(lookup_final_);
}

void Positioner::send_apply(bool final) {
    // Patches whose targets were not in memory: their positions are read first (rows decoded
    // meanwhile may need another round).
    if (std::any_of(done_.begin(), done_.end(), [](const WalRow &r) { return r.lookup; })) {
        send_lookup(final);
        return;
    }
    if (!deferred_.empty()) {
        std::vector<std::string> all;
        size_t next = 0;
        for (size_t i = 0; i < notifications_.size(); ++i) {
            if (next < deferred_.size() && deferred_[next].slot == i) {
                std::vector<const WalRow *> rows;
                for (size_t k = deferred_[next].first; k < deferred_[next].last; ++k) {
                    rows.push_back(&done_[k]);
                }
                for (std::string &n : wal_notifications(rows)) {
                    all.push_back(std::move(n));
                }
                ++next;
            } else {
                all.push_back(std::move(notifications_[i]));
            }
        }
        notifications_ = std::move(all);
        deferred_.clear();
    }
    std::vector<int64_t> positions, ids, times, targets;
    std::vector<std::string> subscribers;
    size_t rows = 0;
    for (const WalRow &r : done_) {
        if (!r.alive) {
            continue;
        }
        positions.push_back(r.position);
        ids.push_back(r.id);
        targets.push_back(r.target);
        subscribers.push_back(r.subscriber);
        times.push_back(r.commit_time);
        ++rows;
    }
    std::vector<int64_t> move_ids;
    std::vector<std::string> move_subscribers;
    for (auto &[id, subscriber] : moves_) {
        move_ids.push_back(id);
        move_subscribers.push_back(subscriber);
    }
    std::string p_xids = int_array(xids_);
    std::string expect = stored_null_ ? std::string() : pgoutput::lsn_text(stored_lsn_);
    std::string next = final ? pgoutput::lsn_text(done_lsn_) : std::string();
    std::string last = to_text(last_position_);
    std::string p_positions = int_array(positions), p_ids = int_array(ids),
                p_subscribers = text_array(subscribers), p_times = int_array(times),
                p_notifications = text_array(notifications_), p_move_ids = int_array(move_ids),
                p_move_subscribers = text_array(move_subscribers), p_deletes = int_array(deletes_),
                p_targets = target_array(targets);
    const char *truncate = truncate_ ? "true" : "false";
    const char *params[16] = {expect.c_str(),
                              next.c_str(),
                              last.c_str(),
                              p_positions.c_str(),
                              p_ids.c_str(),
                              p_subscribers.c_str(),
                              p_times.c_str(),
                              p_notifications.c_str(),
                              p_move_ids.c_str(),
                              p_move_subscribers.c_str(),
                              p_deletes.c_str(),
                              truncate,
                              settings_.holder.c_str(),
                              settings_.channel.c_str(),
                              p_xids.c_str(),
                              p_targets.c_str()};
    if (inflight_oldest_ms_ == 0) {
        inflight_oldest_ms_ = oldest_pending_ms_;
    }
    oldest_pending_ms_ = 0;
    if (final) {
        applying_lsn_ = done_lsn_;
        applying_position_ = last_position_;
    }
    applying_transactions_ += done_transactions_;
    applying_rows_ += rows;
    applying_final_ = final;
    done_.clear();
    done_index_.clear();
    notifications_.clear();
    xids_.clear();
    moves_.clear();
    deletes_.clear();
    truncate_ = false;
    done_dirty_ = false;
    done_transactions_ = 0;
    notification_bytes_ = 0;
    pending_bytes_ = 0;
    for (const WalRow &r : open_) {
        pending_bytes_ += r.subscriber.size() + r.type.size() + r.payload.size();
    }
    count_pending();
    applying_ = final ? Apply::Final : Apply::Part;
    apply_.send(apply_sql(), 16, params);
}

void Positioner::applied() {
    stored_lsn_ = applying_lsn_;
    stored_null_ = false;
    stored_position_ = applying_position_;
    transactions_ += applying_transactions_;
    rows_ += applying_rows_;
    applying_transactions_ = 0;
    applying_rows_ = 0;
    // Only now may the slot forget these transactions.
    confirm(stored_lsn_, false);
    inflight_oldest_ms_ = 0;
    maybe_apply();
}

} // namespace event_piper
