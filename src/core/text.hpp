// Small text helpers shared by the core and the adapters: integers in decimal, and messages from
// libpq or the server made fit for one log line.
#pragma once

#include <charconv>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

namespace event_piper {

// Appends the decimal digits of `v`: no locale, nothing allocated beyond `out`'s growth (frames
// on the hot path are built this way).
template <typename Int> void append_decimal(std::string &out, Int v) {
    static_assert(std::is_integral_v<Int>, "an integer");
    char buf[24];
    auto res = std::to_chars(buf, buf + sizeof buf, v);
    out.append(buf, static_cast<size_t>(res.ptr - buf));
}

template <typename Int> std::string to_text(Int v) {
    std::string out;
    append_decimal(out, v);
    return out;
}

// A size as nginx.conf writes it: "4m", "256k", "100".
inline std::string size_text(uint64_t bytes) {
    if (bytes != 0 && bytes % (1024 * 1024) == 0) {
        return to_text(bytes / (1024 * 1024)) + "m";
    }
    if (bytes != 0 && bytes % 1024 == 0) {
        return to_text(bytes / 1024) + "k";
    }
    return to_text(bytes);
}

// A time as nginx.conf writes it: "60s", "500ms".
inline std::string time_text(uint64_t ms) {
    return ms != 0 && ms % 1000 == 0 ? to_text(ms / 1000) + "s" : to_text(ms) + "ms";
}

// `message` without the line ends that libpq and the server put at its end.
inline std::string_view without_line_end(std::string_view message) {
    while (!message.empty() && (message.back() == '\n' || message.back() == '\r')) {
        message.remove_suffix(1);
    }
    return message;
}

// Failure texts from libpq are cut to this many bytes before they reach the log and the status.
constexpr size_t failure_text_max = 511;

// One log line: libpq's messages span several ("...\n\tThis probably means..."). The line ends
// at the end are dropped, and each line break or tab inside becomes a space.
inline std::string one_line(std::string_view message) {
    std::string line(without_line_end(message));
    for (char &c : line) {
        if (c == '\n' || c == '\r' || c == '\t') {
            c = ' ';
        }
    }
    return line;
}

} // namespace event_piper
