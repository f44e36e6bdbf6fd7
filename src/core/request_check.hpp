// Validation of what a client sends: the consumer id and the Last-Event-ID resume point.
#pragma once

#include "defaults.hpp"

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace event_piper {

enum class ConsumerCheck { Ok, Missing, TooLong, ControlCharacter, NotUtf8 };

ConsumerCheck check_consumer(std::string_view consumer);

// One line of text for the error body (ends with '\n'), empty for Ok.
std::string_view consumer_error_text(ConsumerCheck check);

// Decodes a value as application/x-www-form-urlencoded, the way browsers send query arguments
// (URLSearchParams, HTML forms): %XX escapes, and '+' is a space (a plus is "%2B", which
// encodeURIComponent writes too). nullopt if a '%' is not followed by two hexadecimal digits. The
// result is checked like any id (check_consumer).
std::optional<std::string> percent_decode(std::string_view text);

// One id as the request gives it: blanks (space, tab) at either end dropped, then, when `decode`,
// decoded (percent_decode) and spaces at either end dropped again ("+alice" and "%20alice" are
// alice); a decoded tab stays, and is refused as a control character. nullopt on a bad %-escape.
// The result may be empty (then check_consumer says Missing).
std::optional<std::string> consumer_id_from(std::string_view value, bool decode);

// The request header that a variable such as `$http_x_consumer_id` reads ("x_consumer_id"), or
// empty if `value` is not exactly one `$http_...` variable.
std::string_view header_of_variable(std::string_view value);
// Whether header `name` ("X-Consumer-Id") is the one a `$http_<variable>` reads: nginx lowercases
// the name and turns '-' into '_'.
bool header_matches_variable(std::string_view name, std::string_view variable);

// The ids of one stream: `consumer` (already checked) followed by the items of `list`, a
// comma-separated value such as "team-7, everyone" (each item read by consumer_id_from, so with
// `decode` "%2C" is a comma inside an id). Duplicates are dropped. An empty
// `list` adds nothing. On error, `error` is a one-line reason and the result is empty.
std::vector<std::string> consumer_ids(std::string consumer, std::string_view list, bool decode,
                                      std::string &error);

// A non-negative decimal integer that fits in int64, nothing else (no sign, no spaces).
std::optional<int64_t> parse_last_event_id(std::string_view text);

// The value of event_piper_folded: "1", "on", "yes", "true" (any case) ask for folded replay;
// empty, "0", "off", "no", "false" for the full history; anything else is nullopt (a 400).
std::optional<bool> parse_folded_choice(std::string_view text);

// libpq's message about a connection string it cannot parse, fit for the error log: one line,
// and every quoted fragment other than a single character or an option name (letters and `_`)
// replaced by "...": libpq quotes the offending token or the whole URI, password included.
std::string conninfo_error_for_log(std::string_view libpq_message);

} // namespace event_piper
