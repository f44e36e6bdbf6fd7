// The replication stream as bytes: CopyBoth framing (XLogData, keepalive), the standby status
// update, every pgoutput message the positioner reads, LSN text, and malformed input.
#include "pgoutput.hpp"

#include "wal_bytes.hpp"

#include <gtest/gtest.h>

using namespace event_piper::pgoutput;
using event_piper::testing::Bytes;
namespace wal = event_piper::testing::wal;

TEST(PgoutputLsn, TextBothWays) {
    EXPECT_EQ(lsn_text(0), "0/0");
    EXPECT_EQ(lsn_text(0x16B374D848ULL), "16/B374D848");
    Lsn lsn = 0;
    ASSERT_TRUE(parse_lsn("16/B374D848", lsn));
    EXPECT_EQ(lsn, 0x16B374D848ULL);
    ASSERT_TRUE(parse_lsn("0/0", lsn));
    EXPECT_EQ(lsn, 0u);
    ASSERT_TRUE(parse_lsn("FFFFFFFF/FFFFFFFF", lsn));
    EXPECT_EQ(lsn, ~0ULL);
    for (const char *bad : {"", "/", "1/", "/1", "1/2/3", "x/1", "1/1 ", "100000000/0", "1-2"}) {
        EXPECT_FALSE(parse_lsn(bad, lsn)) << bad;
    }
}

TEST(PgoutputCopy, XLogDataCarriesOneMessage) {
    std::string bytes = Bytes().c('w').u64(0x100).u64(0x200).u64(77).raw("B...").str();
    CopyMessage m;
    std::string error;
    ASSERT_TRUE(parse_copy(bytes, m, error)) << error;
    EXPECT_EQ(m.kind, CopyMessage::Kind::XLogData);
    EXPECT_EQ(m.wal_start, 0x100u);
    EXPECT_EQ(m.wal_end, 0x200u);
    EXPECT_EQ(m.send_time, 77);
    EXPECT_EQ(m.data, "B...");
}

TEST(PgoutputCopy, Keepalive) {
    CopyMessage m;
    std::string error;
    ASSERT_TRUE(parse_copy(Bytes().c('k').u64(0xABCDEF).u64(5).u8(1).str(), m, error)) << error;
    EXPECT_EQ(m.kind, CopyMessage::Kind::Keepalive);
    EXPECT_EQ(m.wal_end, 0xABCDEFu);
    EXPECT_EQ(m.send_time, 5);
    EXPECT_TRUE(m.reply_requested);
    ASSERT_TRUE(parse_copy(Bytes().c('k').u64(1).u64(5).u8(0).str(), m, error));
    EXPECT_FALSE(m.reply_requested);
}

TEST(PgoutputCopy, MalformedFramesAreErrors) {
    CopyMessage m;
    std::string error;
    EXPECT_FALSE(parse_copy("", m, error));
    EXPECT_FALSE(parse_copy(Bytes().c('w').u64(1).u64(2).str(), m, error)); // no send time
    EXPECT_NE(error.find("XLogData"), std::string::npos);
    EXPECT_FALSE(parse_copy(Bytes().c('k').u64(1).u64(2).str(), m, error)); // no reply flag
    EXPECT_FALSE(parse_copy(Bytes().c('k').u64(1).u64(2).u8(0).u8(0).str(), m, error));
    EXPECT_FALSE(parse_copy("x", m, error));
    EXPECT_NE(error.find("unknown replication message 'x'"), std::string::npos);
}

TEST(PgoutputCopy, StandbyStatusUpdateLayout) {
    std::string s = standby_status_update(0x1122334455667788ULL, 2, 3, 4, true);
    EXPECT_EQ(s, Bytes().c('r').u64(0x1122334455667788ULL).u64(2).u64(3).u64(4).u8(1).str());
    EXPECT_EQ(s.size(), 34u);
    EXPECT_EQ(standby_status_update(1, 1, 1, 9, false).back(), '\0');
}

TEST(PgoutputMessage, BeginAndCommit) {
    Message m;
    std::string error;
    ASSERT_TRUE(parse_message(wal::begin(0x5000, 123456, 731), m, error)) << error;
    EXPECT_EQ(m.kind, Message::Kind::Begin);
    EXPECT_EQ(m.final_lsn, 0x5000u);
    EXPECT_EQ(m.commit_time, 123456);
    EXPECT_EQ(m.xid, 731u);
    ASSERT_TRUE(parse_message(wal::commit(0x5000, 0x5030, 123456), m, error)) << error;
    EXPECT_EQ(m.kind, Message::Kind::Commit);
    EXPECT_EQ(m.commit_lsn, 0x5000u);
    EXPECT_EQ(m.end_lsn, 0x5030u);
    EXPECT_EQ(m.commit_time, 123456);
}

TEST(PgoutputMessage, RelationWithColumns) {
    Message m;
    std::string error;
    ASSERT_TRUE(parse_message(wal::events_relation(16384), m, error)) << error;
    EXPECT_EQ(m.kind, Message::Kind::Relation);
    EXPECT_EQ(m.relation_id, 16384u);
    EXPECT_EQ(m.nspname, "public");
    EXPECT_EQ(m.relname, "events");
    EXPECT_EQ(m.replica_identity, 'd');
    ASSERT_EQ(m.relation_columns.size(), 5u);
    EXPECT_TRUE(m.relation_columns[0].key);
    EXPECT_EQ(m.relation_columns[0].name, "id");
    EXPECT_EQ(m.relation_columns[0].type_oid, 20u);
    EXPECT_FALSE(m.relation_columns[3].key);
    EXPECT_EQ(m.relation_columns[3].name, "subscriber");
    EXPECT_EQ(m.relation_columns[4].name, "payload");
    EXPECT_EQ(m.relation_columns[4].type_modifier, -1);
}

TEST(PgoutputMessage, InsertTupleWithTextNullAndUnchanged) {
    Message m;
    std::string error;
    std::string bytes =
        Bytes().c('I').u32(16384).c('N').u16(3).c('t').u32(2).raw("42").c('n').c('u').str();
    ASSERT_TRUE(parse_message(bytes, m, error)) << error;
    EXPECT_EQ(m.kind, Message::Kind::Insert);
    EXPECT_EQ(m.relation_id, 16384u);
    ASSERT_EQ(m.new_tuple.size(), 3u);
    EXPECT_EQ(m.new_tuple[0].kind, 't');
    EXPECT_EQ(m.new_tuple[0].text, "42");
    EXPECT_EQ(m.new_tuple[1].kind, 'n');
    EXPECT_EQ(m.new_tuple[2].kind, 'u');
}

TEST(PgoutputMessage, EventInsertAsTheServerSendsIt) {
    Message m;
    std::string error;
    // Parsed views point into the bytes: they must outlive the message.
    std::string bytes = wal::insert(16384, 7, "toto", "insert", "{\"foo\": \"bar\"}");
    ASSERT_TRUE(parse_message(bytes, m, error)) << error;
    ASSERT_EQ(m.new_tuple.size(), 5u);
    EXPECT_EQ(m.new_tuple[0].text, "7");
    EXPECT_EQ(m.new_tuple[1].text, "insert");
    EXPECT_EQ(m.new_tuple[3].text, "toto");
    EXPECT_EQ(m.new_tuple[4].text, "{\"foo\": \"bar\"}");
}

TEST(PgoutputMessage, UpdateWithAndWithoutOldKey) {
    Message m;
    std::string error;
    std::string bytes = wal::update(16384, 7, "alice", "t", "{}");
    ASSERT_TRUE(parse_message(bytes, m, error)) << error;
    EXPECT_EQ(m.kind, Message::Kind::Update);
    EXPECT_EQ(m.old_kind, 0);
    EXPECT_TRUE(m.old_tuple.empty());
    EXPECT_EQ(m.new_tuple[3].text, "alice");
    std::string with_key = Bytes()
                               .c('U')
                               .u32(16384)
                               .c('K')
                               .u16(1)
                               .c('t')
                               .u32(1)
                               .raw("7")
                               .c('N')
                               .u16(1)
                               .c('t')
                               .u32(1)
                               .raw("8")
                               .str();
    ASSERT_TRUE(parse_message(with_key, m, error)) << error;
    EXPECT_EQ(m.old_kind, 'K');
    EXPECT_EQ(m.old_tuple[0].text, "7");
    EXPECT_EQ(m.new_tuple[0].text, "8");
}

TEST(PgoutputMessage, DeleteCarriesTheKey) {
    Message m;
    std::string error;
    std::string bytes = wal::del(16384, 9);
    ASSERT_TRUE(parse_message(bytes, m, error)) << error;
    EXPECT_EQ(m.kind, Message::Kind::Delete);
    EXPECT_EQ(m.old_kind, 'K');
    ASSERT_EQ(m.old_tuple.size(), 5u);
    EXPECT_EQ(m.old_tuple[0].text, "9");
    EXPECT_EQ(m.old_tuple[1].kind, 'n');
}

TEST(PgoutputMessage, TruncateListsRelations) {
    Message m;
    std::string error;
    ASSERT_TRUE(parse_message(Bytes().c('T').u32(2).u8(1).u32(10).u32(11).str(), m, error));
    EXPECT_EQ(m.kind, Message::Kind::Truncate);
    EXPECT_EQ(m.truncate_options, 1);
    EXPECT_EQ(m.truncated, (std::vector<uint32_t>{10, 11}));
    // A count larger than the message: refused before any allocation.
    EXPECT_FALSE(parse_message(Bytes().c('T').u32(0x40000000).u8(0).u32(1).str(), m, error));
}

TEST(PgoutputMessage, LogicalDecodingMessage) {
    Message m;
    std::string error;
    std::string bytes = wal::logical("event_piper", "source wal", 0x77);
    ASSERT_TRUE(parse_message(bytes, m, error)) << error;
    EXPECT_EQ(m.kind, Message::Kind::Logical);
    EXPECT_TRUE(m.transactional);
    EXPECT_EQ(m.message_lsn, 0x77u);
    EXPECT_EQ(m.prefix, "event_piper");
    EXPECT_EQ(m.content, "source wal");
}

TEST(PgoutputMessage, OriginAndTypeAreParsedAndSkipped) {
    Message m;
    std::string error;
    ASSERT_TRUE(parse_message(Bytes().c('O').u64(5).cstr("node1").str(), m, error)) << error;
    EXPECT_EQ(m.kind, Message::Kind::Origin);
    ASSERT_TRUE(parse_message(Bytes().c('Y').u32(5).cstr("public").cstr("mood").str(), m, error));
    EXPECT_EQ(m.kind, Message::Kind::Type);
}

TEST(PgoutputMessage, TruncatedAndOverlongMessagesAreErrors) {
    Message m;
    std::string error;
    std::string insert = wal::insert(16384, 7, "toto", "insert", "{}");
    // Every proper prefix of a valid message is refused, never read past.
    for (size_t n = 0; n < insert.size(); ++n) {
        EXPECT_FALSE(parse_message(insert.substr(0, n), m, error)) << n;
    }
    EXPECT_FALSE(parse_message(insert + "x", m, error));
    EXPECT_NE(error.find("longer"), std::string::npos);
    // A column length beyond the message.
    EXPECT_FALSE(parse_message(Bytes().c('I').u32(1).c('N').u16(1).c('t').u32(1000).raw("ab").str(),
                               m, error));
    // Binary columns (never asked for) and unknown kinds.
    EXPECT_FALSE(
        parse_message(Bytes().c('I').u32(1).c('N').u16(1).c('b').u32(1).raw("a").str(), m, error));
    EXPECT_NE(error.find("column kind 'b'"), std::string::npos);
    EXPECT_FALSE(parse_message(Bytes().c('I').u32(1).c('X').u16(0).str(), m, error));
    EXPECT_FALSE(parse_message("S", m, error)); // a streamed transaction: never asked for
    EXPECT_NE(error.find("unknown pgoutput message 'S'"), std::string::npos);
    std::string relation = wal::events_relation(3);
    for (size_t n = 0; n < relation.size(); ++n) {
        EXPECT_FALSE(parse_message(relation.substr(0, n), m, error)) << n;
    }
    EXPECT_FALSE(parse_message(Bytes().c('M').u8(1).u64(0).raw("no terminator").str(), m, error));
}

TEST(PgoutputCommand, StartReplication) {
    EXPECT_EQ(start_replication_command("event_piper", 0x16B374D848ULL, "event_piper_events"),
              "START_REPLICATION SLOT event_piper LOGICAL 16/B374D848 (proto_version '1', "
              "publication_names 'event_piper_events', messages 'true')");
}
