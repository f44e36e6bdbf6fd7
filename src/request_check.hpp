// Validation of what a client sends: the consumer id and the Last-Event-ID resume point.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace event_piper {

constexpr size_t max_consumer_length = 256;

enum class ConsumerCheck { Ok, Missing, TooLong, ControlCharacter, NotUtf8 };

ConsumerCheck check_consumer(std::string_view consumer);

// One line of text for the error body (ends with '\n'), empty for Ok.
std::string_view consumer_error_text(ConsumerCheck check);

// A non-negative decimal integer that fits in int64, nothing else (no sign, no spaces).
std::optional<int64_t> parse_last_event_id(std::string_view text);

} // namespace event_piper
