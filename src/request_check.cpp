// Client input validation, kept strict: a consumer id reaches SQL only as a bound parameter,
// but it is also logged and compared, so control characters are refused outright.
#include "request_check.hpp"

#include <charconv>

namespace event_piper {

ConsumerCheck check_consumer(std::string_view consumer) {
    if (consumer.empty()) {
        return ConsumerCheck::Missing;
    }
    if (consumer.size() > max_consumer_length) {
        return ConsumerCheck::TooLong;
    }
    for (unsigned char c : consumer) {
        if (c < 0x20 || c == 0x7f) {
            return ConsumerCheck::ControlCharacter;
        }
    }
    return ConsumerCheck::Ok;
}

std::string_view consumer_error_text(ConsumerCheck check) {
    switch (check) {
    case ConsumerCheck::Missing:
        return "missing consumer id (by default the X-Consumer-Id header, see "
               "event_piper_consumer)\n";
    case ConsumerCheck::TooLong:
        return "consumer id is longer than 256 bytes\n";
    case ConsumerCheck::ControlCharacter:
        return "consumer id contains control characters\n";
    case ConsumerCheck::Ok:
        break;
    }
    return "";
}

std::optional<int64_t> parse_last_event_id(std::string_view text) {
    if (text.empty() || text.size() > 19) {
        return std::nullopt;
    }
    for (char c : text) {
        if (c < '0' || c > '9') {
            return std::nullopt;
        }
    }
    int64_t value = 0;
    auto res = std::from_chars(text.data(), text.data() + text.size(), value);
    if (res.ec != std::errc() || res.ptr != text.data() + text.size()) {
        return std::nullopt;
    }
    return value;
}

} // namespace event_piper
