// The logical replication stream as bytes: the CopyBoth framing of the streaming replication
// protocol (XLogData 'w', primary keepalive 'k', the standby status update 'r' we send back) and
// the messages of the built-in pgoutput plugin, protocol version 1 (PostgreSQL's "Logical
// Replication Message Formats"). Every read is bounds-checked: a malformed message is an error,
// never a read past the buffer. Parsed views point into the bytes they were parsed from.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace event_piper::pgoutput {

using Lsn = uint64_t;

// "16/B374D848", as PostgreSQL prints a pg_lsn; and back (false if not one).
std::string lsn_text(Lsn lsn);
bool parse_lsn(std::string_view text, Lsn &lsn);

// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 00:00:00 UTC).
constexpr int64_t pg_epoch_unix_us = 946684800000000LL;

// One CopyData message of the replication stream.
struct CopyMessage {
    enum class Kind { XLogData, Keepalive };
    Kind kind = Kind::Keepalive;
    Lsn wal_start = 0;            // XLogData: where its data starts in the WAL
    Lsn wal_end = 0;              // both: the server's current end of WAL
    int64_t send_time = 0;        // both: server clock, microseconds since 2000-01-01
    bool reply_requested = false; // Keepalive: answer at once or be timed out
    std::string_view data;        // XLogData: one pgoutput message
};

// False (and `error` says why) if `bytes` is not a well-formed 'w' or 'k' message.
bool parse_copy(std::string_view bytes, CopyMessage &out, std::string &error);

// The standby status update ('r'): positions written, flushed (the slot's confirmed LSN) and
// applied, the client's clock (microseconds since 2000-01-01), whether the server should answer.
std::string standby_status_update(Lsn written, Lsn flushed, Lsn applied, int64_t client_time_us,
                                  bool reply_requested);

// One column of a tuple: 'n' NULL, 'u' an unchanged TOASTed value (not sent), 't' text.
struct Column {
    char kind = 'n';
    std::string_view text;
};

struct RelationColumn {
    bool key = false;
    std::string name;
    uint32_t type_oid = 0;
    int32_t type_modifier = 0;
};

// A parsed pgoutput message. Which fields are set depends on `kind`.
struct Message {
    enum class Kind {
        Begin,    // final_lsn, commit_time, xid
        Commit,   // commit_lsn, end_lsn, commit_time
        Origin,   // (skipped by the positioner)
        Relation, // relation_id, nspname, relname, replica_identity, relation_columns
        Type,     // (skipped)
        Insert,   // relation_id, new_tuple
        Update,   // relation_id, old_kind ('K', 'O' or 0) + old_tuple, new_tuple
        Delete,   // relation_id, old_kind + old_tuple
        Truncate, // truncate_options, truncated
        Logical,  // transactional, message_lsn, prefix, content (pg_logical_emit_message)
    };
    Kind kind = Kind::Begin;
    Lsn final_lsn = 0;
    Lsn commit_lsn = 0;
    Lsn end_lsn = 0;
    int64_t commit_time = 0;
    uint32_t xid = 0;
    uint32_t relation_id = 0;
    std::string nspname;
    std::string relname;
    char replica_identity = 0;
    std::vector<RelationColumn> relation_columns;
    char old_kind = 0;
    std::vector<Column> old_tuple;
    std::vector<Column> new_tuple;
    uint8_t truncate_options = 0;
    std::vector<uint32_t> truncated;
    bool transactional = false;
    Lsn message_lsn = 0;
    std::string_view prefix;
    std::string_view content;
};

// Parses one pgoutput message (the data of one XLogData). False (and `error` says why) if it is
// malformed or of a kind protocol version 1 does not send (streaming, two-phase).
bool parse_message(std::string_view bytes, Message &out, std::string &error);

// START_REPLICATION for a pgoutput slot, protocol version 1, with transactional logical messages.
// `slot` and `publication` are plain identifiers (checked by the caller).
std::string start_replication_command(std::string_view slot, Lsn start,
                                      std::string_view publication);

} // namespace event_piper::pgoutput
