// Client input validation, kept strict: a consumer id reaches SQL only as a bound parameter,
// but it is also logged and compared, so control characters are refused outright.
#include "request_check.hpp"

#include "text.hpp"

#include <charconv>

namespace event_piper {

namespace {

// Well-formed UTF-8 (no overlong forms, no surrogates, at most U+10FFFF). PostgreSQL refuses any
// other bytes in a text parameter, so such an id could never match a subscriber.
bool valid_utf8(std::string_view s) {
    size_t i = 0;
    while (i < s.size()) {
        auto c = static_cast<unsigned char>(s[i]);
        if (c < 0x80) {
            ++i;
            continue;
        }
        size_t n;
        uint32_t cp;
        if ((c & 0xe0) == 0xc0) {
            n = 1;
            cp = c & 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            n = 2;
            cp = c & 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            n = 3;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (i + n >= s.size()) {
            return false;
        }
        for (size_t k = 1; k <= n; ++k) {
            auto cc = static_cast<unsigned char>(s[i + k]);
            if ((cc & 0xc0) != 0x80) {
                return false;
            }
            cp = (cp << 6) | (cc & 0x3f);
        }
        if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) ||
            cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
            return false;
        }
        i += n + 1;
    }
    return true;
}

} // namespace

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
    if (!valid_utf8(consumer)) {
        return ConsumerCheck::NotUtf8;
    }
    return ConsumerCheck::Ok;
}

std::string_view consumer_error_text(ConsumerCheck check) {
    switch (check) {
    case ConsumerCheck::Missing:
        return "missing consumer id (by default the X-Consumer-Id header, see "
               "event_piper_consumer)\n";
    case ConsumerCheck::TooLong: {
        static const std::string text =
            "consumer id is longer than " + to_text(max_consumer_length) + " bytes\n";
        return text;
    }
    case ConsumerCheck::ControlCharacter:
        return "consumer id contains control characters\n";
    case ConsumerCheck::NotUtf8:
        return "consumer id is not valid UTF-8\n";
    case ConsumerCheck::Ok:
        break;
    }
    return "";
}

namespace {

int hex_digit(char c) {
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

void trim(std::string &item, const char *blanks) {
    size_t first = item.find_first_not_of(blanks);
    if (first == std::string::npos) {
        item.clear();
        return;
    }
    item.erase(item.find_last_not_of(blanks) + 1);
    item.erase(0, first);
}

} // namespace

std::optional<std::string> percent_decode(std::string_view text) {
    std::string out;
    out.reserve(text.size());
    for (size_t i = 0; i < text.size(); ++i) {
        if (text[i] != '%') {
            out.push_back(text[i] == '+' ? ' ' : text[i]);
            continue;
        }
        int hi = i + 2 < text.size() ? hex_digit(text[i + 1]) : -1;
        int lo = hi >= 0 ? hex_digit(text[i + 2]) : -1;
        if (lo < 0) {
            return std::nullopt;
        }
        out.push_back(static_cast<char>(hi * 16 + lo));
        i += 2;
    }
    return out;
}

std::optional<std::string> consumer_id_from(std::string_view value, bool decode) {
    std::string id(value);
    trim(id, " \t");
    if (decode) {
        auto decoded = percent_decode(id);
        if (!decoded) {
            return std::nullopt;
        }
        id = std::move(*decoded);
        trim(id, " "); // "a,%20b" is b, as "a, b" is
    }
    return id;
}

std::string_view header_of_variable(std::string_view value) {
    constexpr std::string_view prefix = "$http_";
    if (value.substr(0, prefix.size()) != prefix || value.size() == prefix.size()) {
        return {};
    }
    std::string_view name = value.substr(prefix.size());
    for (char c : name) {
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_')) {
            return {};
        }
    }
    return name;
}

bool header_matches_variable(std::string_view name, std::string_view variable) {
    if (name.size() != variable.size()) {
        return false;
    }
    for (size_t i = 0; i < name.size(); ++i) {
        char c = name[i];
        c = c == '-' ? '_' : (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
        char v = variable[i];
        v = (v >= 'A' && v <= 'Z') ? static_cast<char>(v - 'A' + 'a') : v;
        if (c != v) {
            return false;
        }
    }
    return true;
}

std::vector<std::string> consumer_ids(std::string consumer, std::string_view list, bool decode,
                                      std::string &error) {
    std::vector<std::string> ids;
    ids.push_back(std::move(consumer));
    if (list.empty()) {
        return ids;
    }
    size_t start = 0;
    while (start <= list.size()) {
        size_t comma = list.find(',', start);
        size_t end = comma == std::string_view::npos ? list.size() : comma;
        auto item = consumer_id_from(list.substr(start, end - start), decode);
        if (!item) {
            error = "consumer id list has a bad %-escape\n";
            return {};
        }
        std::string id = std::move(*item);
        if (id.empty()) {
            error = "consumer id list has an empty id\n";
            return {};
        }
        ConsumerCheck check = check_consumer(id);
        if (check != ConsumerCheck::Ok) {
            error = "in the consumer id list: ";
            error.append(consumer_error_text(check));
            return {};
        }
        bool seen = false;
        for (const std::string &known : ids) {
            seen = seen || known == id;
        }
        if (!seen) {
            if (ids.size() == max_stream_consumers) {
                error =
                    "more than " + to_text(max_stream_consumers) + " consumer ids in one stream\n";
                return {};
            }
            ids.push_back(std::move(id));
        }
        if (comma == std::string_view::npos) {
            break;
        }
        start = comma + 1;
    }
    return ids;
}

std::optional<int64_t> parse_last_event_id(std::string_view text) {
    if (text.empty() || text.size() > max_last_event_id_digits) {
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

std::optional<bool> parse_folded_choice(std::string_view text) {
    auto is = [text](std::string_view word) {
        if (text.size() != word.size()) {
            return false;
        }
        for (size_t i = 0; i < word.size(); ++i) {
            char c = text[i];
            if (c >= 'A' && c <= 'Z') {
                c = static_cast<char>(c - 'A' + 'a');
            }
            if (c != word[i]) {
                return false;
            }
        }
        return true;
    };
    if (text.empty() || is("0") || is("off") || is("no") || is("false")) {
        return false;
    }
    if (is("1") || is("on") || is("yes") || is("true")) {
        return true;
    }
    return std::nullopt;
}

std::string conninfo_error_for_log(std::string_view message) {
    std::string out;
    size_t i = 0;
    while (i < message.size()) {
        size_t open = message.find('"', i);
        size_t close = open == std::string_view::npos ? open : message.find('"', open + 1);
        if (close == std::string_view::npos) {
            out.append(message.substr(i));
            break;
        }
        std::string_view inside = message.substr(open + 1, close - open - 1);
        bool name = !inside.empty();
        for (char c : inside) {
            name = name && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_');
        }
        out.append(message.substr(i, open + 1 - i));
        out.append(name || inside.size() <= 1 ? inside : "...");
        out.push_back('"');
        i = close + 1;
    }
    for (char &c : out) {
        c = (c == '\n' || c == '\r') ? ' ' : c;
    }
    while (!out.empty() && out.back() == ' ') {
        out.pop_back();
    }
    return out;
}

} // namespace event_piper
