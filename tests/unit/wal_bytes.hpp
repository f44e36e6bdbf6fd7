// Builds replication stream bytes for the tests: big-endian fields, and the pgoutput messages the
// server sends for the events table (columns id, type, timestamp, subscriber, payload).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace event_piper::testing {

class Bytes {
public:
    Bytes &c(char v) {
        s_.push_back(v);
        return *this;
    }
    Bytes &u8(uint8_t v) { return c(static_cast<char>(v)); }
    Bytes &u16(uint16_t v) { return be(v, 2); }
    Bytes &u32(uint32_t v) { return be(v, 4); }
    Bytes &u64(uint64_t v) { return be(v, 8); }
    Bytes &raw(std::string_view v) {
        s_.append(v);
        return *this;
    }
    Bytes &cstr(std::string_view v) {
        s_.append(v);
        s_.push_back('\0');
        return *this;
    }
    Bytes &text(std::string_view v) { return c('t').u32(static_cast<uint32_t>(v.size())).raw(v); }
    std::string str() const { return s_; }
    operator std::string() const { return s_; }

private:
    Bytes &be(uint64_t v, int n) {
        for (int i = n - 1; i >= 0; --i) {
            s_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
        }
        return *this;
    }
    std::string s_;
};

namespace wal {

inline std::string begin(uint64_t final_lsn, int64_t commit_time, uint32_t xid) {
    return Bytes().c('B').u64(final_lsn).u64(static_cast<uint64_t>(commit_time)).u32(xid);
}

inline std::string commit(uint64_t commit_lsn, uint64_t end_lsn, int64_t commit_time) {
    return Bytes()
        .c('C')
        .u8(0)
        .u64(commit_lsn)
        .u64(end_lsn)
        .u64(static_cast<uint64_t>(commit_time));
}

inline std::string events_relation(uint32_t relid) {
    Bytes b;
    b.c('R').u32(relid).cstr("public").cstr("events").c('d').u16(5);
    b.u8(1).cstr("id").u32(20).u32(0xffffffff);
    b.u8(0).cstr("type").u32(1043).u32(0xffffffff);
    b.u8(0).cstr("timestamp").u32(1114).u32(0xffffffff);
    b.u8(0).cstr("subscriber").u32(1043).u32(0xffffffff);
    b.u8(0).cstr("payload").u32(3802).u32(0xffffffff);
    return b;
}

inline std::string row(char tag, uint32_t relid, int64_t id, std::string_view subscriber,
                       std::string_view type, std::string_view payload) {
    return Bytes()
        .c(tag)
        .u32(relid)
        .c('N')
        .u16(5)
        .text(std::to_string(id))
        .text(type)
        .text("2026-12-03 15:00:00")
        .text(subscriber)
        .text(payload);
}

inline std::string insert(uint32_t relid, int64_t id, std::string_view subscriber,
                          std::string_view type, std::string_view payload) {
    return row('I', relid, id, subscriber, type, payload);
}

// An UPDATE under the default replica identity that does not change the key: the new tuple only.
inline std::string update(uint32_t relid, int64_t id, std::string_view subscriber,
                          std::string_view type, std::string_view payload) {
    return row('U', relid, id, subscriber, type, payload);
}

// A DELETE under the default replica identity: the key, the other columns NULL.
inline std::string del(uint32_t relid, int64_t id) {
    return Bytes()
        .c('D')
        .u32(relid)
        .c('K')
        .u16(5)
        .text(std::to_string(id))
        .c('n')
        .c('n')
        .c('n')
        .c('n');
}

// The events table with the column of patches (schema.sql since patches): a sixth column.
inline std::string patched_relation(uint32_t relid) {
    Bytes b;
    b.c('R').u32(relid).cstr("public").cstr("events").c('d').u16(6);
    b.u8(1).cstr("id").u32(20).u32(0xffffffff);
    b.u8(0).cstr("type").u32(1043).u32(0xffffffff);
    b.u8(0).cstr("timestamp").u32(1114).u32(0xffffffff);
    b.u8(0).cstr("subscriber").u32(1043).u32(0xffffffff);
    b.u8(0).cstr("payload").u32(3802).u32(0xffffffff);
    b.u8(0).cstr("patches").u32(20).u32(0xffffffff);
    return b;
}

// An insert into patched_relation: `patches` 0 is NULL (a plain event).
inline std::string patch_insert(uint32_t relid, int64_t id, std::string_view subscriber,
                                std::string_view type, std::string_view payload, int64_t patches) {
    Bytes b;
    b.c('I')
        .u32(relid)
        .c('N')
        .u16(6)
        .text(std::to_string(id))
        .text(type)
        .text("2026-12-03 15:00:00")
        .text(subscriber)
        .text(payload);
    if (patches != 0) {
        b.text(std::to_string(patches));
    } else {
        b.c('n');
    }
    return b;
}

inline std::string truncate(uint32_t relid) {
    return Bytes().c('T').u32(1).u8(0).u32(relid);
}

inline std::string logical(std::string_view prefix, std::string_view content, uint64_t lsn) {
    return Bytes()
        .c('M')
        .u8(1)
        .u64(lsn)
        .cstr(prefix)
        .u32(static_cast<uint32_t>(content.size()))
        .raw(content);
}

// Wraps a pgoutput message in an XLogData frame, or builds a keepalive.
inline std::string xlog(std::string_view message, uint64_t wal_start = 0, uint64_t wal_end = 0) {
    return Bytes().c('w').u64(wal_start).u64(wal_end).u64(0).raw(message);
}

inline std::string keepalive(uint64_t wal_end, bool reply = false) {
    return Bytes().c('k').u64(wal_end).u64(0).u8(reply ? 1 : 0);
}

} // namespace wal

} // namespace event_piper::testing
