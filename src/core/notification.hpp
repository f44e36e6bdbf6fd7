// Parses the payload of a `new_events` notification, as written by the trigger in
// postgresql/schema.sql, the positioner and the listener (the grammar:
// docs/notification-grammar.md). A notification is a hint, never the only carrier of an event.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

namespace event_piper {

struct Notification {
    enum class Kind {
        Event,     // "e <pos> <sublen> <typelen>\n<subscriber><type><payload>": the whole event
        Reference, // "r <pos> <sublen>\n<subscriber>": too large to notify, read it from the table
        Position,  // "p <pos>": only the position is known; every stream must look at the table
    };
    Kind kind = Kind::Position;
    int64_t position = 0;
    int64_t target = 0; // a patch (Event only): the position of the event it patches; 0: none
    std::string_view subscriber; // views into the parsed text
    std::string_view type;
    std::string_view payload; // jsonb text, not yet compacted
};

// A patch's "e" header carries its target's position after the lengths:
//   "e <pos> <sublen> <typelen> <target>\n..." (plain events keep the form above).
// Returns false for anything malformed (the caller logs it and treats it as a bare hint).
bool parse_notification(std::string_view text, Notification &out);

// A notification holds one event ("e", "r" or "p" above) or several: the events of one
// transaction that fit in one notification, in increasing positions,
//   "b\n" then, per event, "<pos> <sublen> <typelen> <paylen>\n<subscriber><type><payload>",
// a patch with " <target>" after <paylen>.
// Fills `out` (cleared first) with every event, in order; returns false, with `out` empty, if
// any part is malformed. Views point into `text`.
bool parse_notifications(std::string_view text, std::vector<Notification> &out);

} // namespace event_piper
