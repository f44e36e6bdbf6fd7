// The notification grammar's constants: the form letters, separators and size limits of what the
// trigger (postgresql/schema.sql), the positioner and the listener send on the NOTIFY channel, and
// what notification.cpp parses. The grammar itself: docs/notification-grammar.md.
// tests/integration/test_grammar.py reads this file and checks schema.sql against it.
#pragma once

#include <cstddef>

namespace event_piper::grammar {

// The first byte of a notification names its form.
constexpr char form_event = 'e'; // "e <pos> <sublen> <typelen>[ <target>]\n<sub><type><payload>"
constexpr char form_reference = 'r'; // "r <pos> <sublen>\n<sub>"
constexpr char form_position = 'p';  // "p <pos>"
constexpr char form_batch = 'b';     // "b\n" then records "<pos> <sublen> <typelen> <paylen>..."

constexpr char field_separator = ' '; // between the form letter and the numbers of a header
constexpr char header_end = '\n';     // ends a header; raw bytes follow, unescaped

// PostgreSQL refuses a NOTIFY payload of this many bytes or more.
constexpr size_t notify_payload_limit = 8000;
// An "e" notification is shorter than this; a larger event goes as "r" (or not at all).
constexpr size_t event_below = 7999;
// A "b" notification holds at most this many bytes: "b\n" and at most batch_records_max bytes
// of records.
constexpr size_t batch_max = 7999;
constexpr size_t batch_records_max = batch_max - 2;
// An event whose subscriber, type and payload together exceed this many bytes never goes in a
// batch: it goes alone ("e", "r" or nothing).
constexpr size_t batch_event_max = 7900;
// A subscriber of this many bytes or more is never notified: no request can name it (ids are at
// most 256 bytes), and a bare position would send every stream to the table for nothing.
constexpr size_t subscriber_below = 7900;

static_assert(event_below <= notify_payload_limit && batch_max < notify_payload_limit,
              "every form fits in a NOTIFY payload");

} // namespace event_piper::grammar
