// The replication stream's bytes (see pgoutput.hpp). All integers are big-endian (network order).
#include "pgoutput.hpp"

#include <charconv>
#include <cstdio>

namespace event_piper::pgoutput {

namespace {

// Reads big-endian fields from a byte string; once a read runs past the end, every later read
// fails too and `ok()` is false.
class Reader {
public:
    explicit Reader(std::string_view bytes) : bytes_(bytes) {}

    bool ok() const { return ok_; }
    bool at_end() const { return pos_ == bytes_.size(); }
    size_t left() const { return bytes_.size() - pos_; }

    uint64_t uint(size_t n) {
        if (!need(n)) {
            return 0;
        }
        uint64_t v = 0;
        for (size_t i = 0; i < n; ++i) {
            v = (v << 8) | static_cast<unsigned char>(bytes_[pos_ + i]);
        }
        pos_ += n;
        return v;
    }
    uint8_t u8() { return static_cast<uint8_t>(uint(1)); }
    uint16_t u16() { return static_cast<uint16_t>(uint(2)); }
    uint32_t u32() { return static_cast<uint32_t>(uint(4)); }
    uint64_t u64() { return uint(8); }
    int64_t i64() { return static_cast<int64_t>(uint(8)); }

    std::string_view bytes(size_t n) {
        if (!need(n)) {
            return {};
        }
        std::string_view v = bytes_.substr(pos_, n);
        pos_ += n;
        return v;
    }
    // A NUL-terminated string.
    std::string_view cstring() {
        if (!ok_) {
            return {};
        }
        size_t end = bytes_.find('\0', pos_);
        if (end == std::string_view::npos) {
            ok_ = false;
            return {};
        }
        std::string_view v = bytes_.substr(pos_, end - pos_);
        pos_ = end + 1;
        return v;
    }

private:
    bool need(size_t n) {
        if (!ok_ || bytes_.size() - pos_ < n) {
            ok_ = false;
        }
        return ok_;
    }

    std::string_view bytes_;
    size_t pos_ = 0;
    bool ok_ = true;
};

void put_u64(std::string &out, uint64_t v) {
    for (int shift = 56; shift >= 0; shift -= 8) {
        out.push_back(static_cast<char>((v >> shift) & 0xff));
    }
}

bool read_tuple(Reader &r, std::vector<Column> &tuple, std::string &error) {
    uint16_t n = r.u16();
    tuple.clear();
    for (uint16_t i = 0; i < n && r.ok(); ++i) {
        Column c;
        c.kind = static_cast<char>(r.u8());
        switch (c.kind) {
        case 'n':
        case 'u':
            break;
        case 't':
            c.text = r.bytes(r.u32());
            break;
        default:
            if (r.ok()) {
                error = std::string("unknown tuple column kind '") + c.kind +
                        "' (binary columns are not asked for)";
                return false;
            }
        }
        tuple.push_back(c);
    }
    return r.ok();
}

} // namespace

std::string lsn_text(Lsn lsn) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%X/%X", static_cast<unsigned>(lsn >> 32),
                  static_cast<unsigned>(lsn & 0xffffffffu));
    return buf;
}

bool parse_lsn(std::string_view text, Lsn &lsn) {
    size_t slash = text.find('/');
    if (slash == std::string_view::npos || slash == 0 || slash + 1 == text.size() || slash > 8 ||
        text.size() - slash - 1 > 8) {
        return false;
    }
    uint32_t hi = 0, lo = 0;
    auto a = std::from_chars(text.data(), text.data() + slash, hi, 16);
    auto b = std::from_chars(text.data() + slash + 1, text.data() + text.size(), lo, 16);
    if (a.ec != std::errc() || a.ptr != text.data() + slash || b.ec != std::errc() ||
        b.ptr != text.data() + text.size()) {
        return false;
    }
    lsn = (static_cast<Lsn>(hi) << 32) | lo;
    return true;
}

bool parse_copy(std::string_view bytes, CopyMessage &out, std::string &error) {
    Reader r(bytes);
    char kind = static_cast<char>(r.u8());
    if (!r.ok()) {
        error = "empty replication message";
        return false;
    }
    if (kind == 'w') {
        out.kind = CopyMessage::Kind::XLogData;
        out.wal_start = r.u64();
        out.wal_end = r.u64();
        out.send_time = r.i64();
        out.reply_requested = false;
        out.data = r.bytes(r.left());
        if (!r.ok()) {
            error = "XLogData message shorter than its header";
            return false;
        }
        return true;
    }
    if (kind == 'k') {
        out.kind = CopyMessage::Kind::Keepalive;
        out.wal_start = 0;
        out.wal_end = r.u64();
        out.send_time = r.i64();
        out.reply_requested = r.u8() != 0;
        out.data = {};
        if (!r.ok() || !r.at_end()) {
            error = "keepalive message of " + std::to_string(bytes.size()) + " bytes, not 18";
            return false;
        }
        return true;
    }
    error = std::string("unknown replication message '") + kind + "'";
    return false;
}

std::string standby_status_update(Lsn written, Lsn flushed, Lsn applied, int64_t client_time_us,
                                  bool reply_requested) {
    std::string out;
    out.reserve(34);
    out.push_back('r');
    put_u64(out, written);
    put_u64(out, flushed);
    put_u64(out, applied);
    put_u64(out, static_cast<uint64_t>(client_time_us));
    out.push_back(reply_requested ? 1 : 0);
    return out;
}

bool parse_message(std::string_view bytes, Message &out, std::string &error) {
    Reader r(bytes);
    char kind = static_cast<char>(r.u8());
    if (!r.ok()) {
        error = "empty pgoutput message";
        return false;
    }
    bool tuples_ok = true;
    switch (kind) {
    case 'B':
        out.kind = Message::Kind::Begin;
        out.final_lsn = r.u64();
        out.commit_time = r.i64();
        out.xid = r.u32();
        break;
    case 'C':
        out.kind = Message::Kind::Commit;
        r.u8(); // flags, unused
        out.commit_lsn = r.u64();
        out.end_lsn = r.u64();
        out.commit_time = r.i64();
        break;
    case 'O':
        out.kind = Message::Kind::Origin;
        r.u64();
        r.cstring();
        break;
    case 'Y':
        out.kind = Message::Kind::Type;
        r.u32();
        r.cstring();
        r.cstring();
        break;
    case 'R': {
        out.kind = Message::Kind::Relation;
        out.relation_id = r.u32();
        out.nspname = std::string(r.cstring());
        out.relname = std::string(r.cstring());
        out.replica_identity = static_cast<char>(r.u8());
        uint16_t n = r.u16();
        out.relation_columns.clear();
        for (uint16_t i = 0; i < n && r.ok(); ++i) {
            RelationColumn c;
            c.key = (r.u8() & 1) != 0;
            c.name = std::string(r.cstring());
            c.type_oid = r.u32();
            c.type_modifier = static_cast<int32_t>(r.u32());
            out.relation_columns.push_back(std::move(c));
        }
        break;
    }
    case 'I':
        out.kind = Message::Kind::Insert;
        out.relation_id = r.u32();
        if (r.u8() != 'N' && r.ok()) {
            error = "insert message without a new tuple";
            return false;
        }
        tuples_ok = read_tuple(r, out.new_tuple, error);
        break;
    case 'U': {
        out.kind = Message::Kind::Update;
        out.relation_id = r.u32();
        char part = static_cast<char>(r.u8());
        out.old_kind = 0;
        out.old_tuple.clear();
        if (part == 'K' || part == 'O') {
            out.old_kind = part;
            tuples_ok = read_tuple(r, out.old_tuple, error);
            part = static_cast<char>(r.u8());
        }
        if (tuples_ok && part != 'N' && r.ok()) {
            error = "update message without a new tuple";
            return false;
        }
        tuples_ok = tuples_ok && read_tuple(r, out.new_tuple, error);
        break;
    }
    case 'D': {
        out.kind = Message::Kind::Delete;
        out.relation_id = r.u32();
        char part = static_cast<char>(r.u8());
        if (part != 'K' && part != 'O' && r.ok()) {
            error = "delete message without a key or old tuple";
            return false;
        }
        out.old_kind = part;
        tuples_ok = read_tuple(r, out.old_tuple, error);
        break;
    }
    case 'T': {
        out.kind = Message::Kind::Truncate;
        uint32_t n = r.u32();
        out.truncate_options = r.u8();
        out.truncated.clear();
        if (r.ok() && n > r.left() / 4) {
            error = "truncate message names more relations than it holds";
            return false;
        }
        for (uint32_t i = 0; i < n && r.ok(); ++i) {
            out.truncated.push_back(r.u32());
        }
        break;
    }
    case 'M':
        out.kind = Message::Kind::Logical;
        out.transactional = (r.u8() & 1) != 0;
        out.message_lsn = r.u64();
        out.prefix = r.cstring();
        out.content = r.bytes(r.u32());
        break;
    default:
        error = std::string("unknown pgoutput message '") + kind + "'";
        return false;
    }
    if (!tuples_ok) {
        if (error.empty()) {
            error = std::string("pgoutput message '") + kind + "' shorter than its fields";
        }
        return false;
    }
    if (!r.ok()) {
        error = std::string("pgoutput message '") + kind + "' shorter than its fields";
        return false;
    }
    if (!r.at_end()) {
        error = std::string("pgoutput message '") + kind + "' longer than its fields";
        return false;
    }
    return true;
}

std::string start_replication_command(std::string_view slot, Lsn start,
                                      std::string_view publication) {
    std::string sql = "START_REPLICATION SLOT ";
    sql += slot;
    sql += " LOGICAL ";
    sql += lsn_text(start);
    sql += " (proto_version '1', publication_names '";
    sql += publication;
    sql += "', messages 'true')";
    return sql;
}

} // namespace event_piper::pgoutput
