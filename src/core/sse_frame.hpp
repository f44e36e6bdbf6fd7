// Server-Sent Events framing: turns an event (position, type, JSON payload) into the exact bytes
// of one SSE message. Pure functions, no allocation beyond the output string.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace event_piper {

// Appends `id: <id>\nevent: <type>\ndata: <payload>\n\n`.
// The payload is re-serialised compactly (JSON whitespace outside strings dropped); any CR, LF or
// CRLF left in it starts a new `data:` line, as the SSE specification requires, so a payload can
// never end the message early or inject fields. CR and LF are removed from the type.
void append_event_frame(std::string &out, int64_t id, std::string_view type,
                        std::string_view json_payload);

// A patch, or a folded event's state: `id: <id>\nevent: patch\ndata: {"target":<target>,
// "type":<type as a JSON string>,"<member>":<payload compacted>}\n\n`, member "patch" (an RFC 7396
// merge patch of the event whose SSE id is <target>) or "state" (that event's whole current
// state, to replace what the client holds; JSON null: deleted). JSON.parse(e.data) reads it.
enum class TargetMember { Patch, State };
void append_target_frame(std::string &out, int64_t id, int64_t target, TargetMember member,
                         std::string_view type, std::string_view json_payload);

// Appends `text` as a JSON string (quotes, backslashes and control characters escaped).
void append_json_string(std::string &out, std::string_view text);

// `event: heartbeat\ndata: \n\n`: no id, so it never moves the client's Last-Event-ID.
std::string_view heartbeat_frame();

// `event: history-gone\ndata: {"last_event_id":<resumed after>,"removed_upto":<position>}\n\n`:
// retention removed events at or below `removed_upto`, above the client's resume point, so part
// of what it asked for is gone; everything kept follows. No id: it never moves Last-Event-ID.
void append_history_gone_frame(std::string &out, int64_t resumed_after, int64_t removed_upto);

// `retry: <ms>\n\n`.
void append_retry_frame(std::string &out, uint64_t milliseconds);

// Appends the JSON text with insignificant whitespace removed. Input is trusted to be valid JSON
// (PostgreSQL's jsonb output); strings are copied byte for byte, numbers keep every digit.
void append_compact_json(std::string &out, std::string_view json);

} // namespace event_piper
